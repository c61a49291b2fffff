//! The loopback issuer as a process, for the README demo.
//!
//! Registers one Checkout-dialect client, prints its token URL as the only
//! line on stdout, and serves until SIGTERM, SIGINT or EOF on stdin. A stdin
//! that is `/dev/null` is not watched: non-interactive shells give background
//! jobs `/dev/null` as stdin, which would otherwise stop the server at once.
//!
//! ```text
//! cargo run --example loopback_issuer -- --client-id demo --client-secret s3cret --scopes "fx vault"
//! ```
//!
//! The server itself lives in `tests/support/issuer.rs`; this file owns only
//! argument parsing and the process lifetime.

#[path = "../tests/support/issuer.rs"]
mod issuer;

use std::io::{Read, Write};

use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

use issuer::{ClientSpec, Dialect, Issuer};

/// Serve OAuth 2.0 client_credentials tokens on 127.0.0.1 for one client.
#[derive(Parser)]
struct Args {
    /// The client id to accept.
    #[arg(long)]
    client_id: String,
    /// The client secret to accept.
    #[arg(long)]
    client_secret: String,
    /// Space-separated scopes the client may ask for; all are granted by default.
    #[arg(long)]
    scopes: String,
    /// Token lifetime (`expires_in`) in seconds.
    #[arg(long, default_value_t = 3600)]
    lifetime: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let scopes: Vec<&str> = args.scopes.split(' ').filter(|s| !s.is_empty()).collect();
    let mut client = ClientSpec::checkout(args.client_id, args.client_secret, &scopes);
    client.lifetime_secs = args.lifetime;
    let issuer = Issuer::start(vec![client]).await;

    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{}", issuer.token_url(Dialect::Checkout))?;
    stdout.flush()?;
    drop(stdout);

    let reason = stop_requested().await?;
    eprintln!(
        "loopback issuer: stopping on {reason} after {} request(s)",
        issuer.requests().len()
    );
    // Returning drops the runtime, which ends every connection task.
    Ok(())
}

/// Resolves with what asked the process to stop.
async fn stop_requested() -> std::io::Result<&'static str> {
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = terminate.recv() => Ok("SIGTERM"),
        _ = interrupt.recv() => Ok("SIGINT"),
        () = stdin_closed() => Ok("stdin EOF"),
    }
}

/// Resolves at EOF (or a read error) on stdin; never if stdin is `/dev/null`.
async fn stdin_closed() {
    if stdin_is_dev_null() {
        return std::future::pending().await;
    }
    let (closed, on_closed) = oneshot::channel::<()>();
    // A detached thread, not `spawn_blocking`: runtime shutdown waits for
    // blocking tasks, and this read may never return.
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut discard = [0u8; 1024];
        loop {
            match stdin.read(&mut discard) {
                Ok(0) => break,
                Ok(_) => {}
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => break,
            }
        }
        // The receiver is gone if a signal won the race; nothing to tell.
        let _ = closed.send(());
    });
    let _ = on_closed.await;
}

fn stdin_is_dev_null() -> bool {
    use std::os::fd::AsFd;
    use std::os::unix::fs::{FileTypeExt, MetadataExt};

    let Ok(fd) = std::io::stdin().as_fd().try_clone_to_owned() else {
        return false;
    };
    match (
        std::fs::File::from(fd).metadata(),
        std::fs::metadata("/dev/null"),
    ) {
        (Ok(stdin), Ok(null)) => stdin.file_type().is_char_device() && stdin.rdev() == null.rdev(),
        _ => false,
    }
}
