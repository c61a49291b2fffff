//! `tokend serve`: puts the pieces together and runs them until a signal.
//!
//! Start-up order matters: the configuration and secrets are validated
//! before the socket exists, the socket is listening before prefetch starts
//! (a slow issuer must not hold up callers of other keys), and on shutdown
//! the socket file goes last, after every answer in flight was written.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cache::TokenCache;
use crate::config;
use crate::issuer::IssuerClient;
use crate::server::{self, Limits, Listener};
use crate::service::Service;

/// From the stop signal to the moment gets still waiting on an issuer are
/// answered `unavailable`.
const ANSWER_DEADLINE: Duration = Duration::from_millis(3500);
/// From the stop signal to giving up on connections that will not finish
/// (a caller that does not read its answer). Under the 5 s we promise.
const DRAIN_DEADLINE: Duration = Duration::from_millis(4500);

pub async fn serve(config_path: &Path) -> anyhow::Result<()> {
    let config = Arc::new(config::load(config_path)?);
    harden();
    let socket = config.daemon.socket.clone();
    let listener = server::bind(&socket, config.daemon.socket_mode)?;

    let shutdown = CancellationToken::new();
    let deadline = CancellationToken::new();
    let tasks = TaskTracker::new();
    let issuer = IssuerClient::new().context("failed to set up the HTTP client")?;
    let cache = TokenCache::new(&config, issuer, tasks.clone(), deadline.clone());
    let limits = Limits {
        max_connections: config.daemon.max_connections,
        idle_timeout: config.daemon.idle_timeout,
        max_request_bytes: config.daemon.max_request_bytes,
    };
    let service = Arc::new(Service::new(config.clone(), cache, deadline.clone()));
    let accept = tokio::spawn(
        Listener {
            listener,
            service: service.clone(),
            limits,
            shutdown: shutdown.clone(),
            connections: tasks.clone(),
        }
        .run(),
    );
    tracing::info!(socket = %socket.display(), keys = config.keys.len(), "listening");
    service.cache().prefetch();

    let signal_name = stop_signal().await?;
    tracing::info!("{signal_name} received: shutting down");
    let stopping = tokio::time::Instant::now();
    shutdown.cancel();
    // Refreshers have nothing to finish; fetches callers wait on do.
    service.cache().stop();
    let answer_deadline = deadline.clone();
    tokio::spawn(async move {
        tokio::time::sleep(ANSWER_DEADLINE).await;
        answer_deadline.cancel();
    });
    let _ = accept.await;
    tasks.close();
    if tokio::time::timeout_at(stopping + DRAIN_DEADLINE, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("some connections did not finish in time; closing them");
    }
    deadline.cancel();
    if let Err(e) = std::fs::remove_file(&socket) {
        tracing::warn!(socket = %socket.display(), "failed to remove the socket: {e}");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Waits for SIGTERM or SIGINT and says which.
async fn stop_signal() -> anyhow::Result<&'static str> {
    let mut term = signal(SignalKind::terminate()).context("failed to watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("failed to watch SIGINT")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}

/// Keeps secrets out of core dumps and away from same-uid debuggers.
fn harden() {
    // SAFETY: both calls take plain integers or a pointer to a local struct
    // and have no memory-safety preconditions.
    unsafe {
        if libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) != 0 {
            tracing::warn!(
                "failed to make the process non-dumpable: {}",
                std::io::Error::last_os_error()
            );
        }
        let none = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::setrlimit(libc::RLIMIT_CORE, &none) != 0 {
            tracing::warn!(
                "failed to disable core dumps: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}
