//! The HTTP `/metrics` endpoint (`[daemon] metrics_listen`): binding its
//! address, and saying whether it could.
//!
//! It serves the metrics and nothing else (see [`answer`]). Whoever can
//! connect may read them (there is no peer uid over TCP), which is why the
//! configuration keeps the address on loopback unless the operator says
//! otherwise; [`host`] keeps web pages out, [`connections`] keeps holders
//! of connections from locking scrapers out.
//!
//! The endpoint is an extra: its address being taken must not cost token
//! service. Any local user can bind a free port above 1023 before tokend
//! does, so a failure to bind is not fatal. It is logged once, shown by
//! [`Health`] (in `status` and on systemd's status line), and the bind is
//! tried again with backoff, [`health::FIRST_RETRY`] doubling up to
//! [`health::MAX_RETRY`]. When an attempt succeeds, that is logged once and the
//! health says so. Attempts go on until the daemon stops: what holds the
//! port may let go at any time.

mod answer;
mod connections;
pub(crate) mod health;
mod host;

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::DaemonConfig;
use crate::service::Service;
use health::{Health, Retrying, MAX_RETRY};

/// The endpoint, bound or waiting to be, until [`Endpoint::run`] serves it.
pub(crate) struct Endpoint {
    bound: Result<TcpListener, Retrying>,
    health: watch::Sender<Health>,
}

impl Endpoint {
    /// The endpoint for `metrics_listen`, when set. Its first bind is
    /// tried here, at start-up, so that a free address serves before
    /// readiness; a taken one is logged and tried again by
    /// [`Endpoint::run`] while tokens are served.
    pub(crate) fn open(daemon: &DaemonConfig) -> Option<Endpoint> {
        let wanted = daemon.metrics_listen?;
        let (bound, health) = match bind(wanted) {
            Ok(listener) => {
                let address = listener.local_addr().unwrap_or(wanted);
                (Ok(listener), Health::Listening(address))
            }
            Err(cause) => {
                tracing::error!(
                    metrics_listen = %wanted,
                    "failed to listen on metrics_listen {wanted}: {cause}; serving tokens \
                     without the metrics endpoint and trying again, at most {} apart, until \
                     the address is free",
                    humantime::format_duration(MAX_RETRY)
                );
                let retrying = Retrying::new(wanted, &cause);
                (Err(retrying.clone()), Health::Retrying(retrying))
            }
        };
        Some(Endpoint {
            bound,
            health: watch::Sender::new(health),
        })
    }

    /// The endpoint's health from now on.
    pub(crate) fn health(&self) -> watch::Receiver<Health> {
        self.health.subscribe()
    }

    /// Binds the address when it was taken at start-up, then serves
    /// scrapes until `stop`, answering each from the service in force then.
    pub(crate) async fn run(
        self,
        services: watch::Receiver<Arc<Service>>,
        stop: CancellationToken,
    ) {
        let listener = match self.bound {
            Ok(listener) => {
                if let Health::Listening(address) = &*self.health.borrow() {
                    tracing::info!(metrics_listen = %address, "serving metrics over HTTP");
                }
                listener
            }
            Err(retrying) => match bind_when_free(retrying, &self.health, &stop).await {
                Some(listener) => listener,
                None => return,
            },
        };
        connections::serve(listener, services, stop).await;
    }
}

/// Tries to bind `retrying.wanted` whenever an attempt is due, publishing
/// each outcome in `health`, until it binds (`Some`) or `stop` (`None`).
/// A failure like the last one is not logged again.
async fn bind_when_free(
    mut retrying: Retrying,
    health: &watch::Sender<Health>,
    stop: &CancellationToken,
) -> Option<TcpListener> {
    let wanted = retrying.wanted;
    loop {
        tokio::select! {
            () = tokio::time::sleep_until(retrying.next_attempt) => {}
            () = stop.cancelled() => return None,
        }
        match bind(wanted) {
            Ok(listener) => {
                let address = listener.local_addr().unwrap_or(wanted);
                health.send_replace(Health::Listening(address));
                tracing::info!(
                    metrics_listen = %address,
                    failed_attempts = retrying.attempts,
                    "metrics_listen is free again after {} failed attempts: serving metrics over HTTP",
                    retrying.attempts
                );
                return Some(listener);
            }
            Err(cause) => {
                if cause.kind() != retrying.kind {
                    tracing::warn!(
                        metrics_listen = %wanted,
                        "still failing to listen on metrics_listen {wanted}, now: {cause}"
                    );
                }
                retrying.failed_again(&cause);
                health.send_replace(Health::Retrying(retrying.clone()));
            }
        }
    }
}

/// A listener on `wanted`, registered with the runtime, that is handed
/// connections once their first bytes arrived (see [`connections`]).
fn bind(wanted: SocketAddr) -> io::Result<TcpListener> {
    let listener = std::net::TcpListener::bind(wanted)?;
    if let Err(e) = defer_accept(&listener) {
        // Scrapes are still answered; holders of silent connections then
        // reach the accept loop sooner, which displaces them anyway.
        tracing::debug!("failed to set TCP_DEFER_ACCEPT on metrics_listen: {e}");
    }
    listener.set_nonblocking(true)?;
    TcpListener::from_std(listener)
}

/// How long the kernel keeps a connection that has sent nothing from the
/// accept loop (`TCP_DEFER_ACCEPT`, in whole seconds).
const DEFER_ACCEPT: libc::c_int = 2;

/// Sets `TCP_DEFER_ACCEPT` on `listener`: a connection reaches `accept`
/// only once data arrived on it (or after [`DEFER_ACCEPT`]), so a scrape
/// arrives with its request already readable. nix has no wrapper for this
/// option on Linux.
fn defer_accept(listener: &std::net::TcpListener) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let seconds = DEFER_ACCEPT;
    // SAFETY: the descriptor is the listener's, open for the whole call;
    // the kernel reads exactly `size_of::<c_int>()` bytes from a pointer to
    // `seconds`, which lives until the call returns.
    let set = unsafe {
        libc::setsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            std::ptr::from_ref(&seconds).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::EndpointState;

    // The clock is paused: the waits between attempts pass at once.
    #[tokio::test(start_paused = true)]
    async fn a_taken_address_is_reported_and_retried_until_it_is_free() {
        let squatter = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let wanted = squatter.local_addr().unwrap();
        let text = format!("[daemon]\nmetrics_listen = \"{wanted}\"\n");
        let config = crate::config::parse(&text, std::path::Path::new("t")).unwrap();
        let endpoint = Endpoint::open(&config.daemon).unwrap();
        let mut health = endpoint.health();
        let report = health.borrow().report();
        assert_eq!(report.state, EndpointState::Retrying);
        assert_eq!(report.attempts, Some(1));
        assert_eq!(report.address, wanted.to_string());
        assert!(health.borrow().status_note().is_some());

        let stop = CancellationToken::new();
        let Err(retrying) = endpoint.bound else {
            panic!("bound a taken address");
        };
        let binding = tokio::spawn({
            let stop = stop.clone();
            async move { bind_when_free(retrying, &endpoint.health, &stop).await }
        });
        health.changed().await.unwrap();
        assert_eq!(health.borrow_and_update().report().attempts, Some(2));
        drop(squatter);
        health.changed().await.unwrap();
        let listening = health.borrow_and_update().clone();
        assert!(
            matches!(listening, Health::Listening(a) if a == wanted),
            "{listening:?}"
        );
        assert_eq!(listening.status_note(), None);
        assert!(binding.await.unwrap().is_some());
    }
}
