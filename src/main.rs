//! The `tokend` command: parses the command line, runs one subcommand and
//! turns its outcome into an exit code. All the work lives in the library.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

use tokend::client::{self, ClientError};
use tokend::config::{self, DEFAULT_CONFIG, DEFAULT_SOCKET};
use tokend::issuer::IssuerClient;
use tokend::report;

/// Exit code when the daemon answered with an error.
const EXIT_REFUSED: u8 = 1;
/// Exit code when the daemon could not be reached.
const EXIT_UNREACHABLE: u8 = 3;

#[derive(Parser)]
#[command(
    name = "tokend",
    version,
    about = "Keeps OAuth 2.0 client-credentials tokens fresh and hands them to local processes",
    long_about = "tokend holds OAuth 2.0 client credentials, keeps an access token fresh for every \
                  configured key and scope set, and hands tokens to local processes over a \
                  permission-checked Unix socket speaking line-delimited JSON."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon (SIGHUP reloads the configuration; SIGTERM or SIGINT stop it within 5 seconds).
    Serve {
        /// The configuration file.
        #[arg(long, short, value_name = "PATH", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Ask a running daemon for a token and print it.
    #[command(
        after_help = "Exit status: 0 token printed, 1 the daemon refused (its message is on \
                            stderr), 2 usage error, 3 the daemon could not be reached."
    )]
    Get {
        /// The key's name, as in [keys.NAME].
        key: String,
        /// A scope to ask for; repeat for several. None asks for the key's default set.
        #[arg(long = "scope", value_name = "SCOPE")]
        scopes: Vec<String>,
        /// The resource (RFC 8707) to ask for: one the key's `resource` lists. None asks for none.
        #[arg(long, value_name = "URI")]
        resource: Option<String>,
        /// The daemon's socket.
        #[arg(long, value_name = "PATH", env = "TOKEND_SOCKET", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// What to print: the bare token, an Authorization header line, or the daemon's JSON answer.
        #[arg(long, value_enum, default_value_t = Format::Token)]
        format: Format,
        /// How long to wait for the answer.
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Ask a running daemon to reload its configuration, and wait for the outcome.
    #[command(
        after_help = "Only root and tokend's own user may reload. The shipped unit's ExecReload= runs \
                      this, so `systemctl reload tokend` fails when the new configuration is \
                      refused.\n\nExit status: 0 reloaded, 1 refused (the reason on stderr; the \
                      running configuration stays), 3 the daemon could not be reached."
    )]
    Reload {
        /// The daemon's socket.
        #[arg(long, value_name = "PATH", env = "TOKEND_SOCKET", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// How long to wait for the outcome.
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Show each key's scope sets: state, time left, next refresh, last success and error.
    #[command(
        after_help = "One row per key and scope set the caller may see (tokend's own user, when not \
                      root, sees every key). STATE is fresh, refreshing, failing, expired, never \
                      fetched or paused (the key's issuer asked for quiet or rejected the \
                      credentials). Colour on a terminal only, never with NO_COLOR.\n\nExit status: \
                      0 every prefetch set holds a token with more than min_valid left and its last \
                      refresh did not fail, 1 otherwise (or the daemon refused), 3 the daemon could \
                      not be reached: a health check for a timer unit, a load balancer hook or nagios."
    )]
    Status(Listing),
    /// List the keys the caller may read, with their allowed scopes.
    #[command(
        after_help = "Exit status: 0 listed, 1 the daemon refused, 3 the daemon could not be reached."
    )]
    Keys(Listing),
    /// Print the running daemon's metrics in the Prometheus text format.
    #[command(
        after_help = "Only the uids in [daemon] metrics_allow_uids may read the metrics (list 0 \
                      for root).\n\nExit status: 0 printed, 1 refused (the reason on \
                      stderr), 3 the daemon could not be reached."
    )]
    Metrics {
        /// The daemon's socket.
        #[arg(long, value_name = "PATH", env = "TOKEND_SOCKET", default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// How long to wait for the answer.
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Validate the configuration and secret files without starting.
    #[command(
        after_help = "Exit status: 0 valid, 1 invalid (FILE:LINE:COL: message on stderr), or with --online a discovery document that cannot be read or used."
    )]
    Check {
        /// The configuration file.
        #[arg(long, short, value_name = "PATH", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Also read the discovery document of every key configured with
        /// `issuer`, print what it says, and fail if one cannot be used.
        #[arg(long)]
        online: bool,
    },
    /// Print the tokend(8) manual page (roff) generated from these definitions.
    #[command(hide = true)]
    Man,
}

/// The options `status` and `keys` share.
#[derive(Args)]
struct Listing {
    /// Print JSON for scripts instead of a table.
    #[arg(long)]
    json: bool,
    /// The daemon's socket.
    #[arg(long, value_name = "PATH", env = "TOKEND_SOCKET", default_value = DEFAULT_SOCKET)]
    socket: PathBuf,
    /// How long to wait for the answer.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    /// The access token alone.
    Token,
    /// `Authorization: Bearer <token>`.
    Header,
    /// The daemon's whole JSON answer.
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("tokend: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve { config } => serve(&config),
        Command::Get {
            key,
            scopes,
            resource,
            socket,
            format,
            timeout,
        } => Ok(get(
            &socket,
            (&key, &scopes, resource.as_deref()),
            format,
            timeout,
        )),
        Command::Reload { socket, timeout } => Ok(reload(&socket, timeout)),
        Command::Status(listing) => Ok(status(&listing)),
        Command::Keys(listing) => Ok(keys(&listing)),
        Command::Metrics { socket, timeout } => Ok(metrics(&socket, timeout)),
        Command::Check { config, online } => Ok(check(&config, online)),
        Command::Man => man(),
    }
}

fn serve(config: &Path) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let served = runtime.block_on(tokend::daemon::serve(config));
    // Dropping the runtime would wait for every blocking task, and a reload
    // stuck reading a hung mount never finishes: the daemon has already
    // drained what matters, so leave such threads behind.
    runtime.shutdown_background();
    served?;
    Ok(ExitCode::SUCCESS)
}

/// Prints a token for the key, scopes and resource in the second argument.
fn get(
    socket: &Path,
    (key, scopes, resource): (&str, &[String], Option<&str>),
    format: Format,
    timeout: Duration,
) -> ExitCode {
    match client::get(socket, key, scopes, resource, timeout) {
        Ok(token) => {
            let mut out = std::io::stdout().lock();
            let written = match format {
                Format::Token => writeln!(out, "{}", token.access_token.expose()),
                Format::Header => writeln!(
                    out,
                    "Authorization: {} {}",
                    token.token_type,
                    token.access_token.expose()
                ),
                Format::Json => writeln!(out, "{}", token.line.as_str()),
            };
            match written.and_then(|()| out.flush()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tokend: failed to write the token: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Err(err) => client_failure(&err),
    }
}

fn reload(socket: &Path, timeout: Duration) -> ExitCode {
    match client::reload(socket, timeout) {
        Ok(keys) => {
            println!("tokend: reloaded ({keys} keys)");
            ExitCode::SUCCESS
        }
        Err(err) => client_failure(&err),
    }
}

fn status(
    &Listing {
        json,
        ref socket,
        timeout,
    }: &Listing,
) -> ExitCode {
    let keys = match client::status(socket, timeout) {
        Ok(keys) => keys,
        Err(err) => return client_failure(&err),
    };
    let rows = report::status_rows(&keys);
    let text = if json {
        report::status_json(&rows) + "\n"
    } else {
        let out = std::io::stdout();
        let colour =
            out.is_terminal() && std::env::var_os("NO_COLOR").map_or(true, |v| v.is_empty());
        report::status_table(&rows, SystemTime::now(), colour)
    };
    if rows.is_empty() {
        eprintln!("tokend: no keys to show: status lists the keys this user may read");
    }
    if let Err(e) = print(&text) {
        eprintln!("tokend: failed to write the status: {e}");
        return ExitCode::from(EXIT_REFUSED);
    }
    if rows.iter().all(|row| row.healthy) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_REFUSED)
    }
}

fn keys(
    &Listing {
        json,
        ref socket,
        timeout,
    }: &Listing,
) -> ExitCode {
    let keys = match client::keys(socket, timeout) {
        Ok(keys) => keys,
        Err(err) => return client_failure(&err),
    };
    let text = if json {
        serde_json::json!({ "keys": keys }).to_string() + "\n"
    } else {
        report::keys_table(&keys)
    };
    match print(&text) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tokend: failed to write the keys: {e}");
            ExitCode::FAILURE
        }
    }
}

fn print(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// Says why a request failed; 1 when the daemon refused, 3 when it could
/// not be reached.
fn client_failure(err: &ClientError) -> ExitCode {
    eprintln!("tokend: {err}");
    match err {
        ClientError::Refused(_) => ExitCode::from(EXIT_REFUSED),
        _ => ExitCode::from(EXIT_UNREACHABLE),
    }
}

fn metrics(socket: &Path, timeout: Duration) -> ExitCode {
    let text = match client::metrics(socket, timeout) {
        Ok(text) => text,
        Err(err) => return client_failure(&err),
    };
    match print(&text) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tokend: failed to write the metrics: {e}");
            ExitCode::FAILURE
        }
    }
}

fn check(path: &Path, online: bool) -> ExitCode {
    match config::load(path) {
        Ok(config) => {
            for (name, key) in &config.keys {
                if key.acl.is_empty() {
                    eprintln!("tokend: warning: key {name:?} has no allow_uids, allow_users or allow_groups: nobody can read it");
                }
            }
            println!("{}: ok ({} keys)", path.display(), config.keys.len());
            if online {
                return check_discovery(&config);
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("{err}");
            ExitCode::FAILURE
        }
    }
}

/// `check --online`: what each `issuer` key's discovery document says,
/// and whether tokend could use it. 1 when one could not be read or used.
fn check_discovery(config: &config::Config) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("tokend: failed to start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let issuer = match IssuerClient::for_config(config) {
        Ok(issuer) => issuer,
        Err(e) => {
            eprintln!("tokend: failed to set up the HTTP clients: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut code = ExitCode::SUCCESS;
    for (name, key) in &config.keys {
        let Some(found) = runtime.block_on(issuer.discovery_document(key)) else {
            continue;
        };
        let config::Endpoint::Issuer(configured) = &key.endpoint else {
            continue;
        };
        println!("key {name:?}: issuer {}", configured.as_str());
        let document = match found {
            Ok(document) => document,
            Err(why) => {
                eprintln!("tokend: key {name:?}: discovery failed: {why}");
                code = ExitCode::FAILURE;
                continue;
            }
        };
        println!("  document issuer: {}", document.issuer);
        println!("  token_endpoint: {}", document.token_endpoint);
        println!(
            "  token_endpoint_auth_methods_supported: {}",
            document.methods()
        );
        let method = key.auth.registered_name();
        let listed = if document.supports(key) {
            "supported"
        } else {
            "NOT supported"
        };
        println!("  auth {method}: {listed}");
        match document.token_endpoint_for(key, configured) {
            Ok(endpoint) => println!("  ok: tokens come from {endpoint}"),
            Err(why) => {
                eprintln!("tokend: key {name:?}: discovery failed: {why}");
                code = ExitCode::FAILURE;
            }
        }
    }
    code
}

/// Sections of tokend(8) that are not about options: what the daemon
/// reads, how it behaves under systemd, and what its exit codes mean.
const MAN_EXTRA: &str = r#".SH FILES
.TP
\fI/etc/tokend/tokend.toml\fR
The configuration (mode 0600, owner tokend). \fBtokend check\fR validates it.
.TP
\fI/run/tokend/tokend.sock\fR
The socket callers connect to; members of group \fBtokend\fR may connect, and each key's allow lists decide what they may read.
.TP
\fI/etc/tokend/credentials/\fR
Client secrets loaded by systemd (\fBLoadCredential=\fR) into \fI/run/credentials/tokend.service/secret_NAME\fR; a key names one with \fBclient_secret_credential = "NAME"\fR, and \fBtokend check\fR outside the service reads it here.
.SH SIGNALS
.TP
\fBSIGHUP\fR
Re-read and validate the configuration and secret files (\fBtokend reload\fR does the same and reports the outcome). On success the new configuration answers the next request, on open connections too; tokens of keys whose issuer, client and secret did not change are kept. On error the running configuration stays and the error is logged with FILE:LINE:COL.
.TP
\fBSIGTERM\fR, \fBSIGINT\fR
Stop accepting, answer what is in flight, exit 0 within 5 seconds.
.SH ENVIRONMENT
.TP
\fBRUST_LOG\fR
The log filter; overrides \fBlog_level\fR in [daemon].
.TP
\fBTOKEND_SOCKET\fR
The socket \fBtokend get\fR connects to.
.TP
\fBNOTIFY_SOCKET\fR, \fBWATCHDOG_USEC\fR
Set by systemd for Type=notify: tokend sends READY=1 once its socket listens, STATUS= lines, RELOADING=1 and READY=1 around a reload, WATCHDOG=1 at half the watchdog interval, and STOPPING=1.
.TP
\fBLISTEN_FDS\fR, \fBLISTEN_PID\fR
Socket activation: tokend serves on the socket it is passed and neither creates nor removes a socket file.
.TP
\fBHTTPS_PROXY\fR, \fBHTTP_PROXY\fR, \fBALL_PROXY\fR, \fBNO_PROXY\fR (or lowercase)
The proxy to issuers, as curl reads them, for keys without a \fBproxy\fR of their own; credentials in them are never logged.
.TP
\fBSSL_CERT_FILE\fR, \fBSSL_CERT_DIR\fR
Replace the system trust store (\fI/etc/ssl/certs\fR) that issuers' certificates are checked against, beside tokend's built-in roots and each key's \fBca_file\fR.
.TP
\fBJOURNAL_STREAM\fR
When stderr is the journal, tokend logs to journald with the fields KEY, SCOPES, PEER_UID, PEER_GID, PEER_PID, PEER_EXE, PEER_COMM (the last two informational: a pid can be reused) and ISSUER_STATUS.
.SH EXIT STATUS
\fBserve\fR: 0 after a clean stop, 1 on a start-up error. \fBget\fR: 0 token printed, 1 refused, 2 usage error, 3 unreachable. \fBstatus\fR: 0 every prefetch set fresh and not failing, 1 otherwise, 3 unreachable. \fBkeys\fR, \fBmetrics\fR and \fBreload\fR: 0 done, 1 refused, 3 unreachable. \fBcheck\fR: 0 valid, 1 invalid (with \fB--online\fR, also when a discovery document cannot be read or used).
.SH SEE ALSO
\fBsystemctl\fR(1), \fBsystemd.exec\fR(5), \fBsystemd-creds\fR(1)
"#;

/// Renders tokend(8): clap_mangen's page for the whole command, then a
/// section per subcommand with its synopsis and options, then
/// [`MAN_EXTRA`].
fn man() -> anyhow::Result<ExitCode> {
    let mut cli = Cli::command().disable_help_subcommand(true);
    cli.build();
    let mut page = render(
        clap_mangen::Man::new(cli.clone())
            .section("8")
            .manual("System Administration"),
        |man, out| man.render(out),
    )?;
    for sub in cli.get_subcommands() {
        // The SUBCOMMANDS list points at a page per subcommand; here each
        // is a section of this page.
        let name = sub.get_name();
        page = page.replace(
            &format!("tokend\\-{name}(8)"),
            &format!("\\fBtokend {name}\\fR"),
        );
    }
    for sub in cli.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("tokend {}", sub.get_name());
        let man = clap_mangen::Man::new(sub.clone().bin_name(name.clone()));
        let part = render(man, |man, out| {
            man.render_synopsis_section(out)?;
            man.render_options_section(out)?;
            man.render_extra_section(out)
        })?;
        // clap_mangen heads each part as a section of its own.
        let part = part
            .replace(".SH SYNOPSIS\n", "")
            .replace(".SH OPTIONS\n", "")
            .replace(".SH EXTRA\n", ".PP\n");
        page.push_str(&format!(".SH \"{}\"\n{part}", name.to_uppercase()));
    }
    page.push_str(MAN_EXTRA);
    std::io::stdout().lock().write_all(page.as_bytes())?;
    Ok(ExitCode::SUCCESS)
}

fn render(
    man: clap_mangen::Man,
    parts: impl FnOnce(&clap_mangen::Man, &mut Vec<u8>) -> std::io::Result<()>,
) -> anyhow::Result<String> {
    let mut out = Vec::new();
    parts(&man, &mut out)?;
    Ok(String::from_utf8(out)?)
}
