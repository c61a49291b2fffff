//! The `tokend` command line, as both of its programs parse it, and the
//! subcommands that only talk to a running daemon (`get`, `reload`,
//! `status`, `keys`, `metrics`) or print the manual.
//!
//! Two programs share it. `tokend` (src/main.rs) is statically linked so
//! that `tokend get` starts about as fast as `/bin/true`: it runs these
//! subcommands itself. `serve` and `check` read user and group names and
//! resolve issuers' host names through the C library's name services,
//! which a statically linked glibc cannot load safely across versions, so
//! `tokend` hands them, with its arguments unchanged, to `tokend-daemon`
//! (src/bin/tokend-daemon.rs), a dynamically linked program that parses
//! the same command line.

use std::ffi::{OsStr, OsString};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};

use crate::client::{self, ClientError};
use crate::config::{DEFAULT_CONFIG, DEFAULT_SOCKET};
use crate::{printable, report};

/// How long `get` waits for its answer unless told.
const GET_TIMEOUT: &str = "30s";

/// Exit code when the daemon answered with an error.
pub const EXIT_REFUSED: u8 = 1;
/// Exit code when the daemon could not be reached.
pub const EXIT_UNREACHABLE: u8 = 3;

#[derive(Parser)]
#[command(
    name = "tokend",
    version,
    about = "Keeps OAuth 2.0 client-credentials tokens fresh and hands them to local processes",
    long_about = "tokend holds OAuth 2.0 client credentials, keeps an access token fresh for every \
                  configured key and scope set, and hands tokens to local processes over a \
                  permission-checked Unix socket speaking line-delimited JSON."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug, PartialEq)]
pub enum Command {
    /// Run the daemon (SIGHUP reloads the configuration; SIGTERM or SIGINT stop it within 5 seconds).
    Serve {
        /// The configuration file.
        #[arg(long, short, value_name = "PATH", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Ask a running daemon for a token and print it.
    #[command(
        after_help = "Exit status: 0 token printed, 1 the daemon refused (its message is on \
                      stderr) or answered what is not printed (a control character, a token \
                      that is not visible ASCII), 2 usage error, 3 the daemon could not be \
                      reached or did not answer within --timeout."
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
        #[arg(long, value_name = "PATH", env = SOCKET_ENV, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// What to print: the bare token, an Authorization header line, or the daemon's JSON answer.
        #[arg(long, value_enum, default_value_t = Format::Token)]
        format: Format,
        /// The most the whole exchange may take, from connect to the answer's last byte (more than 0).
        #[arg(long, value_name = "DURATION", default_value = GET_TIMEOUT, value_parser = parse_timeout)]
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
        #[arg(long, value_name = "PATH", env = SOCKET_ENV, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// The most the whole exchange may take, from connect to the answer's last byte (more than 0).
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_timeout)]
        timeout: Duration,
    },
    /// Show each key's scope sets: state, time left, next refresh, last success and error.
    #[command(
        after_help = "One row per key and scope set the caller may see (tokend's own user, when not \
                      root, sees every key). STATE is fresh, refreshing, failing, expired, never \
                      fetched or paused (the key's issuer asked for quiet or rejected the \
                      credentials). Colour on a terminal only, never with NO_COLOR. With \
                      metrics_listen set, a line under the table says whether the metrics endpoint \
                      listens, and why not.\n\nExit status: \
                      0 every prefetch set holds a token with more than min_valid left and its last \
                      refresh did not fail, 1 otherwise (or the daemon refused), 3 the daemon could \
                      not be reached: a health check for a timer unit, a load balancer hook or nagios. \
                      The metrics endpoint does not change it."
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
        #[arg(long, value_name = "PATH", env = SOCKET_ENV, default_value = DEFAULT_SOCKET)]
        socket: PathBuf,
        /// The most the whole exchange may take, from connect to the answer's last byte (more than 0).
        #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_timeout)]
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
#[derive(Args, Debug, PartialEq)]
pub struct Listing {
    /// Print JSON for scripts instead of a table.
    #[arg(long)]
    pub json: bool,
    /// The daemon's socket.
    #[arg(long, value_name = "PATH", env = SOCKET_ENV, default_value = DEFAULT_SOCKET)]
    pub socket: PathBuf,
    /// The most the whole exchange may take, from connect to the answer's last byte (more than 0).
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = parse_timeout)]
    pub timeout: Duration,
}

#[derive(Clone, Copy, ValueEnum, Debug, PartialEq)]
pub enum Format {
    /// The access token alone.
    Token,
    /// `Authorization: Bearer <token>`.
    Header,
    /// The daemon's whole JSON answer.
    Json,
}

/// `get` as scripts and services write it, parsed without clap: building
/// clap's parser for the whole command line and running it costs half of a
/// `tokend get`'s instructions (callgrind: 100k of 213k), more than the
/// request. Anything else (help, `--`, an unknown option, an option given
/// twice, an empty value or one that starts with `-`, arguments that are not
/// UTF-8, a `--timeout` of 0) gives `None`, and [`parse`] reads the line
/// with clap, with its messages and exit code 2 for usage errors.
/// `env_socket` is `TOKEND_SOCKET`; empty, it counts as unset, as in
/// [`parse`].
pub fn quick_get(args: &[OsString], env_socket: Option<&OsStr>) -> Option<Command> {
    let mut args = args.iter().skip(1).map(|arg| arg.to_str());
    if args.next()?? != "get" {
        return None;
    }
    let mut key = None;
    let mut scopes = Vec::new();
    let (mut resource, mut socket, mut format, mut timeout) = (None, None, None, None);
    while let Some(arg) = args.next() {
        let arg = arg?;
        let Some(option) = arg.strip_prefix("--") else {
            if arg.is_empty() || arg.starts_with('-') || key.is_some() {
                return None;
            }
            key = Some(arg.to_owned());
            continue;
        };
        let (name, value) = match option.split_once('=') {
            Some(pair) => pair,
            None => (option, args.next()??),
        };
        if value.is_empty() || value.starts_with('-') {
            return None;
        }
        match name {
            "scope" => scopes.push(value.to_owned()),
            "resource" => once(&mut resource, value.to_owned())?,
            "socket" => once(&mut socket, PathBuf::from(value))?,
            "format" => once(&mut format, Format::from_str(value, false).ok()?)?,
            "timeout" => once(&mut timeout, parse_timeout(value).ok()?)?,
            _ => return None,
        }
    }
    let socket = match (socket, env_socket.filter(|env| !env.is_empty())) {
        (Some(socket), _) => socket,
        (None, Some(env)) => PathBuf::from(env),
        (None, None) => PathBuf::from(DEFAULT_SOCKET),
    };
    Some(Command::Get {
        key: key?,
        scopes,
        resource,
        socket,
        format: format.unwrap_or(Format::Token),
        timeout: match timeout {
            Some(timeout) => timeout,
            None => humantime::parse_duration(GET_TIMEOUT).ok()?,
        },
    })
}

/// The environment variable that names the socket when `--socket` does not.
pub const SOCKET_ENV: &str = "TOKEND_SOCKET";

/// The command line as clap reads it, for both programs, with one
/// difference from clap's own `env`: an empty `TOKEND_SOCKET` counts as
/// unset, as a shell's `${TOKEND_SOCKET:-…}` would, and the default socket
/// is used (clap would take the empty value and refuse it). Exits on a
/// usage error as clap does, with code 2. `env_socket` is `TOKEND_SOCKET`.
pub fn parse(args: &[OsString], env_socket: Option<&OsStr>) -> Cli {
    let mut command = Cli::command();
    if env_socket.is_some_and(OsStr::is_empty) {
        command = command.mut_subcommands(|sub| {
            sub.mut_args(|arg| {
                if arg.get_env() == Some(OsStr::new(SOCKET_ENV)) {
                    arg.env(None::<&'static str>)
                } else {
                    arg
                }
            })
        });
    }
    command
        .try_get_matches_from_mut(args)
        .and_then(|mut matches| Cli::from_arg_matches_mut(&mut matches))
        .unwrap_or_else(|err| err.format(&mut command).exit())
}

/// Why a `--timeout` is refused.
#[derive(Debug, thiserror::Error)]
pub enum TimeoutError {
    #[error(transparent)]
    Duration(#[from] humantime::DurationError),
    /// A socket timeout of 0 means none at all, so 0 could only mean
    /// "wait forever" or "give up at once": neither is what a caller
    /// writing 0 can be assumed to want, and a health check that waits
    /// forever checks nothing.
    #[error("a timeout must be longer than 0; to wait long, give a long one such as 1h")]
    Zero,
}

/// A `--timeout`: a duration as humantime writes them, longer than 0.
pub fn parse_timeout(text: &str) -> Result<Duration, TimeoutError> {
    match humantime::parse_duration(text)? {
        Duration::ZERO => Err(TimeoutError::Zero),
        timeout => Ok(timeout),
    }
}

/// Fills an option's slot, or fails if it was given already.
fn once<T>(slot: &mut Option<T>, value: T) -> Option<()> {
    if slot.is_some() {
        return None;
    }
    *slot = Some(value);
    Some(())
}

/// A subcommand that `tokend-daemon` runs: one that needs the system's name
/// services.
pub enum DaemonCommand {
    Serve { config: PathBuf },
    Check { config: PathBuf, online: bool },
}

/// Runs a subcommand that talks to a running daemon, or prints the manual,
/// and returns its exit code; hands `serve` and `check` back.
pub fn run_client(command: Command) -> Result<u8, DaemonCommand> {
    Ok(match command {
        Command::Serve { config } => return Err(DaemonCommand::Serve { config }),
        Command::Check { config, online } => return Err(DaemonCommand::Check { config, online }),
        Command::Get {
            key,
            scopes,
            resource,
            socket,
            format,
            timeout,
        } => get(
            &socket,
            (&key, &scopes, resource.as_deref()),
            format,
            timeout,
        ),
        Command::Reload { socket, timeout } => reload(&socket, timeout),
        Command::Status(listing) => status(&listing),
        Command::Keys(listing) => keys(&listing),
        Command::Metrics { socket, timeout } => metrics(&socket, timeout),
        Command::Man => man().unwrap_or_else(|err| {
            eprintln!("tokend: {err:#}");
            1
        }),
    })
}

/// Prints a token for the key, scopes and resource in the second argument.
fn get(
    socket: &Path,
    (key, scopes, resource): (&str, &[String], Option<&str>),
    format: Format,
    timeout: Duration,
) -> u8 {
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
            // Straight to stdout: a String of the line would be a copy of
            // the token that nothing wipes.
            reported(written.and_then(|()| out.flush()), "token")
        }
        Err(err) => client_failure(&err),
    }
}

fn reload(socket: &Path, timeout: Duration) -> u8 {
    match client::reload(socket, timeout) {
        Ok(keys) => {
            println!("tokend: reloaded ({keys} keys)");
            0
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
) -> u8 {
    let answer = match client::status(socket, timeout) {
        Ok(answer) => answer,
        Err(err) => return client_failure(&err),
    };
    let rows = report::status_rows(&answer.keys);
    let endpoint = answer.metrics_endpoint.as_ref();
    let text = if json {
        printable::json(&report::status_json(&rows, endpoint)).into_owned() + "\n"
    } else {
        let out = std::io::stdout();
        let colour =
            out.is_terminal() && std::env::var_os("NO_COLOR").map_or(true, |v| v.is_empty());
        let now = SystemTime::now();
        let mut text = report::status_table(&rows, now, colour);
        // The exit status stays about tokens: the endpoint is shown, and
        // judged by whoever scrapes it.
        if let Some(endpoint) = endpoint {
            text.push('\n');
            text.push_str(&report::endpoint_line(endpoint, now));
        }
        text
    };
    if rows.is_empty() {
        eprintln!("tokend: no keys to show: status lists the keys this user may read");
    }
    if print(&text, "status") != 0 {
        return EXIT_REFUSED;
    }
    if rows.iter().all(|row| row.healthy) {
        0
    } else {
        EXIT_REFUSED
    }
}

fn keys(
    &Listing {
        json,
        ref socket,
        timeout,
    }: &Listing,
) -> u8 {
    let keys = match client::keys(socket, timeout) {
        Ok(keys) => keys,
        Err(err) => return client_failure(&err),
    };
    let text = if json {
        printable::json(&serde_json::json!({ "keys": keys }).to_string()).into_owned() + "\n"
    } else {
        report::keys_table(&keys)
    };
    print(&text, "keys")
}

/// Writes `text` to stdout: 0, or 1 with why the `what` was not written.
fn print(text: &str, what: &str) -> u8 {
    let mut out = std::io::stdout().lock();
    reported(
        out.write_all(text.as_bytes()).and_then(|()| out.flush()),
        what,
    )
}

fn reported(written: std::io::Result<()>, what: &str) -> u8 {
    match written {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("tokend: failed to write the {what}: {e}");
            1
        }
    }
}

/// Says why a request failed; 1 when the daemon refused or answered what
/// is not printed, 3 when it could not be reached or answered too late.
/// The message is the daemon's when it refused, and the daemon may be any
/// program: shown as one line without control characters.
fn client_failure(err: &ClientError) -> u8 {
    eprintln!("tokend: {}", printable::one_line(&err.to_string()));
    match err {
        ClientError::Refused(_) | ClientError::Unprintable { .. } => EXIT_REFUSED,
        _ => EXIT_UNREACHABLE,
    }
}

fn metrics(socket: &Path, timeout: Duration) -> u8 {
    let text = match client::metrics(socket, timeout) {
        Ok(text) => text,
        Err(err) => return client_failure(&err),
    };
    print(&printable::lines(&text), "metrics")
}

/// Sections of tokend(8) that are not about options: what the daemon
/// reads, how it behaves under systemd, and what its exit codes mean.
const MAN_EXTRA: &str = r#".SH FILES
.TP
\fI/etc/tokend/tokend.toml\fR
The configuration (mode 0600, owner tokend). \fBtokend check\fR validates it.
.TP
\fI/usr/libexec/tokend/tokend\-daemon\fR
The program \fBtokend\fR hands \fBserve\fR and \fBcheck\fR to, with the same arguments: it is dynamically linked, for the system's user, group and host name look-ups, where \fBtokend\fR is linked statically so that \fBtokend get\fR starts fast. Run directly, it accepts every subcommand.
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
The socket \fBget\fR, \fBstatus\fR, \fBkeys\fR, \fBreload\fR and \fBmetrics\fR connect to when \fB--socket\fR is not given; empty counts as unset.
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
When stderr is the journal, tokend logs to journald with the fields KEY, SCOPES, PEER_UID, PEER_GID, PEER_PID, PEER_EXE, PEER_COMM (the last two informational: a pid can be reused), FINGERPRINT, REPEATS and WINDOW_MS (on audit summaries), ASKED_BY and OUTCOME (on reloads) and ISSUER_STATUS.
.SH EXIT STATUS
\fBserve\fR: 0 after a clean stop, 1 on a start-up error. \fBget\fR: 0 token printed, 1 refused or not printed (a control character in the answer, a token that is not visible ASCII), 2 usage error, 3 unreachable. \fBstatus\fR: 0 every prefetch set fresh and not failing, 1 otherwise, 3 unreachable. \fBkeys\fR, \fBmetrics\fR and \fBreload\fR: 0 done, 1 refused, 3 unreachable. For every subcommand that talks to the daemon, no whole answer within \fB--timeout\fR counts as unreachable (3), and a \fB--timeout\fR of 0 is a usage error (2). \fBcheck\fR: 0 valid, 1 invalid (with \fB--online\fR, also when a discovery document cannot be read or used).
.SH SEE ALSO
\fBsystemctl\fR(1), \fBsystemd.exec\fR(5), \fBsystemd-creds\fR(1)
"#;

/// Renders tokend(8): clap_mangen's page for the whole command, then a
/// section per subcommand with its synopsis and options, then
/// [`MAN_EXTRA`].
fn man() -> anyhow::Result<u8> {
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
    Ok(0)
}

fn render(
    man: clap_mangen::Man,
    parts: impl FnOnce(&clap_mangen::Man, &mut Vec<u8>) -> std::io::Result<()>,
) -> anyhow::Result<String> {
    let mut out = Vec::new();
    parts(&man, &mut out)?;
    Ok(String::from_utf8(out)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(line: &str) -> Vec<OsString> {
        std::iter::once("tokend")
            .chain(line.split(' '))
            .map(OsString::from)
            .collect()
    }

    fn quick(line: &str) -> Option<Command> {
        quick_get(&argv(line), std::env::var_os("TOKEND_SOCKET").as_deref())
    }

    #[test]
    fn quick_get_reads_what_clap_reads() {
        for line in [
            "get k",
            "get k --scope a --scope b",
            "get --scope=a k --format json",
            "get k --socket /x/y.sock --timeout 2s --resource https://api.example/",
            "get k --format=header --timeout=500ms",
            "get k --scope a=b --format token",
            "get --timeout 1m30s k",
        ] {
            let clap = Cli::try_parse_from(argv(line)).expect(line).command;
            assert_eq!(quick(line), Some(clap), "{line}");
        }
    }

    #[test]
    fn quick_get_leaves_the_unusual_to_clap() {
        for line in [
            "get",
            "get --help",
            "get k -h",
            "get k --format Token",
            "get k --socket a --socket b",
            "get k l",
            "get k -- x",
            "get k --scope ",
            "get k --scope -x",
            "get k --scope",
            "get k --bogus 1",
            "get k --timeout soon",
            "get k --timeout 0s",
            "get -k",
            "status",
            "--version",
            "get-token k",
        ] {
            assert_eq!(quick(line), None, "{line}");
        }
        let non_utf8: OsString = std::os::unix::ffi::OsStringExt::from_vec(b"k\xff".to_vec());
        assert_eq!(
            quick_get(&[OsString::from("tokend"), "get".into(), non_utf8], None),
            None
        );
    }

    #[test]
    fn an_empty_environment_socket_is_unset_for_both_parsers() {
        let args = argv("get k");
        let socket = |env: Option<&str>| match quick_get(&args, env.map(OsStr::new)) {
            Some(Command::Get { socket, .. }) => Some(socket),
            _ => None,
        };
        assert_eq!(socket(None), Some(PathBuf::from(DEFAULT_SOCKET)));
        assert_eq!(
            socket(Some("/run/x.sock")),
            Some(PathBuf::from("/run/x.sock"))
        );
        assert_eq!(socket(Some("")), Some(PathBuf::from(DEFAULT_SOCKET)));
        let empty = Some(OsStr::new(""));
        for line in ["get k", "status", "reload"] {
            let args = argv(line);
            let parsed = parse(&args, empty).command;
            let socket = match parsed {
                Command::Get { ref socket, .. }
                | Command::Reload { ref socket, .. }
                | Command::Status(Listing { ref socket, .. }) => socket,
                _ => panic!("{line}: {parsed:?}"),
            };
            assert_eq!(socket, Path::new(DEFAULT_SOCKET), "{line}");
        }
        assert_eq!(Some(parse(&args, empty).command), quick_get(&args, empty));
        let given = quick_get(&argv("get k --socket /a"), Some(OsStr::new("/b")));
        assert!(matches!(given, Some(Command::Get { socket, .. }) if socket == Path::new("/a")));
    }
}
