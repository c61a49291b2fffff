//! The `tokend` command: parses the command line, runs one subcommand and
//! turns its outcome into an exit code. All the work lives in the library.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

use tokend::client::{self, ClientError};
use tokend::config::{self, DEFAULT_CONFIG, DEFAULT_SOCKET};

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
    /// Run the daemon (SIGTERM or SIGINT stop it within 5 seconds).
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
    /// Validate the configuration and secret files without starting.
    #[command(after_help = "Exit status: 0 valid, 1 invalid (FILE:LINE:COL: message on stderr).")]
    Check {
        /// The configuration file.
        #[arg(long, short, value_name = "PATH", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
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
            socket,
            format,
            timeout,
        } => Ok(get(&socket, &key, &scopes, format, timeout)),
        Command::Check { config } => Ok(check(&config)),
    }
}

fn serve(config: &Path) -> anyhow::Result<ExitCode> {
    init_logging();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(tokend::daemon::serve(config))?;
    Ok(ExitCode::SUCCESS)
}

fn get(socket: &Path, key: &str, scopes: &[String], format: Format, timeout: Duration) -> ExitCode {
    match client::get(socket, key, scopes, timeout) {
        Ok(token) => {
            let mut out = std::io::stdout().lock();
            let written = match format {
                Format::Token => writeln!(out, "{}", token.access_token.as_str()),
                Format::Header => writeln!(
                    out,
                    "Authorization: {} {}",
                    token.token_type,
                    token.access_token.as_str()
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
        Err(err) => {
            eprintln!("tokend: {err}");
            match err {
                ClientError::Refused(_) => ExitCode::from(EXIT_REFUSED),
                _ => ExitCode::from(EXIT_UNREACHABLE),
            }
        }
    }
}

fn check(path: &Path) -> ExitCode {
    match config::load(path) {
        Ok(config) => {
            for (name, key) in &config.keys {
                if key.acl.is_empty() {
                    eprintln!("tokend: warning: key {name:?} has no allow_uids, allow_users or allow_groups: nobody can read it");
                }
            }
            println!("{}: ok ({} keys)", path.display(), config.keys.len());
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("{err}");
            ExitCode::FAILURE
        }
    }
}

/// Human-readable lines on stderr; `RUST_LOG` picks the level (info by
/// default).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
