//! `tokend-daemon`: the program behind `tokend serve` and `tokend check`.
//! It parses the same command line as `tokend` (src/cli.rs), which hands
//! it these two subcommands with their arguments unchanged: both read user
//! and group names and resolve issuers' host names through the C library's
//! name services, so this program is dynamically linked, as `tokend` is
//! not. Run directly, it runs every other subcommand as `tokend` would.

use std::ffi::OsString;
use std::path::Path;
use std::process::ExitCode;

use tokend::cli::{self, DaemonCommand};
use tokend::config;
use tokend::hardening;
use tokend::issuer::{IssuerClient, MAX_WORDS};
use tokend::printable;

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    let cli = cli::parse(&args, std::env::var_os(cli::SOCKET_ENV).as_deref());
    match cli::run_client(cli.command) {
        Ok(code) => ExitCode::from(code),
        Err(DaemonCommand::Serve { config }) => serve(&config).unwrap_or_else(|err| {
            eprintln!("tokend: {err:#}");
            ExitCode::FAILURE
        }),
        Err(DaemonCommand::Check { config, online }) => check(&config, online),
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

fn check(path: &Path, online: bool) -> ExitCode {
    // It reads the secrets the daemon reads: they get the same protection.
    for failure in hardening::protect_secrets() {
        eprintln!("tokend: warning: {failure}");
    }
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
                eprintln!(
                    "tokend: key {name:?}: discovery failed: {}",
                    printable::one_line(&why)
                );
                code = ExitCode::FAILURE;
                continue;
            }
        };
        println!("  document issuer: {}", issuer_text(&document.issuer));
        println!(
            "  token_endpoint: {}",
            issuer_text(&document.token_endpoint)
        );
        println!(
            "  token_endpoint_auth_methods_supported: {}",
            issuer_text(&document.methods())
        );
        let method = key.auth.registered_name();
        let listed = if document.supports(key) {
            "supported"
        } else {
            "NOT supported"
        };
        println!("  auth {method}: {listed}");
        match document.token_endpoint_for(key, configured) {
            Ok(endpoint) => println!("  ok: tokens come from {}", issuer_text(endpoint.as_str())),
            Err(why) => {
                eprintln!(
                    "tokend: key {name:?}: discovery failed: {}",
                    printable::one_line(&why)
                );
                code = ExitCode::FAILURE;
            }
        }
    }
    code
}

/// A value of the issuer's document as the terminal shows it: one line
/// without control characters, cut where the daemon cuts issuer text, so
/// a document can neither command the terminal nor print a line of its
/// own. (Errors are ours and quote the document already cut: they are
/// only made one line.)
fn issuer_text(text: &str) -> String {
    printable::shown(text, MAX_WORDS)
}
