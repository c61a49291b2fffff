//! The metrics endpoint's connections: the accept loop, the cap on how
//! many are served at once, and which one gives way when another arrives
//! at the cap. One HTTP/1 exchange per connection, hyper's.
//!
//! Whoever can connect may hold connections: over TCP there is no caller
//! uid, and every local user can reach a loopback port. A scraper must
//! still be answered within Prometheus's default scrape timeout (10 s)
//! while others hold connections that send nothing or drip header bytes,
//! reopening each as soon as it is closed. Three ways were weighed:
//!
//! - Waiting for a free slot cannot promise it: while the slots are full,
//!   new connections queue in the kernel's backlog in arrival order, so a
//!   holder who keeps more queued than there are slots keeps a scraper
//!   waiting for as many header timeouts as it likes.
//! - A per-peer limit cannot tell them apart: on loopback every peer is
//!   127.0.0.1.
//! - A shorter header timeout only shortens each wait in that queue.
//!
//! What tells a scraper from a holder is progress: a scraper sends its
//! whole request head at once, and is answered in milliseconds. So:
//!
//! - The listener has `TCP_DEFER_ACCEPT` (set where it is bound): the
//!   kernel hands over a connection only once its first bytes arrived, so
//!   silent ones wait in the kernel, not here, and a scrape arrives with its
//!   request readable.
//! - The endpoint never stops accepting, so nothing queues behind holders.
//!   Each connection is marked, as it is accepted, by whether its whole
//!   request head is already there ([`head_arrived`]), and later when
//!   hyper has read one.
//! - At [`MAX_CONNECTIONS`], the connection that arrives displaces the
//!   oldest one whose request head has not arrived, and only when every
//!   one's has (all are being answered, some to readers too slow to take
//!   their answer) the oldest of all. A newcomer is never the one closed.
//!
//! Holders then displace one another. A scrape, marked as it arrives,
//! gives way only once every other connection is marked too and it is the
//! oldest: to 31 whole requests arriving after it while it is answered,
//! which takes milliseconds. A request head must also arrive within
//! [`HEADER_READ_TIMEOUT`] of the connection's start, however it trickles
//! in, and a whole connection ends after [`CONNECTION_LIMIT`]; an idle
//! keep-alive connection would hold a place for nothing, so there is one
//! request per connection.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper::body::Incoming;
use hyper::Request;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::answer::respond;
use crate::service::Service;

/// Connections served at once. Prometheus keeps one scrape per target in
/// flight, a pair of them two; the rest is room for a person with curl and
/// for holders, who displace one another rather than scrapers. Each costs
/// a task and at most [`MAX_BUFFER`] of buffer.
const MAX_CONNECTIONS: usize = 32;
/// From a connection's start to its request's last header line. A scraper
/// sends its request in one write; this only bounds how long a connection
/// that sends nothing, or drips, keeps its place when nobody needs it.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(2);
/// A whole connection, request and answer. Rendering takes microseconds;
/// what this bounds is a scraper that does not read the answer.
const CONNECTION_LIMIT: Duration = Duration::from_secs(10);
/// hyper's read buffer, and so the most a request's headers may take: a
/// scrape request is a few hundred bytes. hyper's floor is 8 KiB.
const MAX_BUFFER: usize = 16 * 1024;

/// Serves `listener` until `stop`, answering each scrape from the service
/// in force then; connections still open at `stop` are dropped.
pub(super) async fn serve(
    listener: TcpListener,
    services: watch::Receiver<Arc<Service>>,
    stop: CancellationToken,
) {
    let mut open = Connections::default();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        match accepted {
            Ok((stream, _)) => {
                open.admit(stream, &services, &stop);
                // Lets the new connection's task start before the next
                // accept: under a flood of connections the loop would
                // otherwise run until its budget is spent.
                tokio::task::yield_now().await;
            }
            Err(e) => {
                // EMFILE and friends: back off rather than spin.
                tracing::warn!("failed to accept a metrics connection: {e}");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                    () = stop.cancelled() => break,
                }
            }
        }
    }
    open.tasks.close();
    open.tasks.wait().await;
}

/// The connections being served, oldest first.
#[derive(Default)]
struct Connections {
    open: VecDeque<Open>,
    tasks: TaskTracker,
}

/// One connection's task, and whether its request head has arrived.
struct Open {
    task: AbortHandle,
    asked: Arc<AtomicBool>,
}

impl Connections {
    /// Serves `stream`, first closing the connection it displaces when at
    /// the cap.
    fn admit(
        &mut self,
        stream: TcpStream,
        services: &watch::Receiver<Arc<Service>>,
        stop: &CancellationToken,
    ) {
        self.make_room();
        // The address the peer reached: for a wildcard `metrics_listen`,
        // the one it dialled, which is what its Host: may name.
        let Ok(local) = stream.local_addr() else {
            return;
        };
        let asked = Arc::new(AtomicBool::new(head_arrived(&stream)));
        let task = self.tasks.spawn(exchange(
            stream,
            local,
            asked.clone(),
            services.clone(),
            stop.clone(),
        ));
        self.open.push_back(Open {
            task: task.abort_handle(),
            asked,
        });
    }

    /// Forgets connections that ended, and at [`MAX_CONNECTIONS`] closes
    /// the one [`displaced`] names.
    fn make_room(&mut self) {
        self.open.retain(|c| !c.task.is_finished());
        if self.open.len() < MAX_CONNECTIONS {
            return;
        }
        let asked: Vec<bool> = self
            .open
            .iter()
            .map(|c| c.asked.load(Ordering::Relaxed))
            .collect();
        if let Some(closed) = displaced(&asked).and_then(|i| self.open.remove(i)) {
            // Dropping the task drops its connection: the peer sees it
            // closed.
            closed.task.abort();
        }
    }
}

/// Of connections in arrival order, each with whether its request head
/// arrived, the one a newcomer displaces: the oldest still waiting for its
/// request, else the oldest.
fn displaced(asked: &[bool]) -> Option<usize> {
    if asked.is_empty() {
        return None;
    }
    Some(asked.iter().position(|asked| !asked).unwrap_or(0))
}

/// The most of a connection's first bytes [`head_arrived`] looks at: a
/// scrape's request head is a few hundred bytes.
const PEEK: usize = 4096;

/// Whether `stream` already holds a whole request head (up to the blank
/// line that ends it), without reading it: hyper reads it later.
fn head_arrived(stream: &TcpStream) -> bool {
    use nix::sys::socket::{recv, MsgFlags};
    use std::os::fd::AsRawFd;
    let mut first = [0u8; PEEK];
    let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
    match recv(stream.as_raw_fd(), &mut first, flags) {
        Ok(n) => ends_head(&first[..n]),
        Err(_) => false,
    }
}

/// Whether `bytes` hold the blank line that ends a request head.
fn ends_head(bytes: &[u8]) -> bool {
    bytes.windows(4).any(|w| w == b"\r\n\r\n") || bytes.windows(2).any(|w| w == b"\n\n")
}

/// Serves one connection, one request, within the limits. `asked` is set
/// once the request head has arrived.
async fn exchange(
    stream: TcpStream,
    local: SocketAddr,
    asked: Arc<AtomicBool>,
    services: watch::Receiver<Arc<Service>>,
    stop: CancellationToken,
) {
    let answer = hyper::service::service_fn(move |request: Request<Incoming>| {
        asked.store(true, Ordering::Relaxed);
        let response = respond(&request, local, &services);
        async move { Ok::<_, Infallible>(response) }
    });
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_BUFFER)
        .keep_alive(false);
    let connection = http.serve_connection(TokioIo::new(stream), answer);
    tokio::select! {
        served = tokio::time::timeout(CONNECTION_LIMIT, connection) => match served {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!("metrics connection failed: {e}"),
            Err(_) => tracing::debug!("closing a metrics connection that took too long"),
        },
        () = stop.cancelled() => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_ends_at_its_blank_line() {
        assert!(ends_head(
            b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n"
        ));
        assert!(ends_head(b"GET /metrics HTTP/1.0\n\n"));
        assert!(!ends_head(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n"));
        assert!(!ends_head(b"G"));
        assert!(!ends_head(b""));
    }

    #[test]
    fn the_oldest_connection_without_a_request_gives_way_first() {
        assert_eq!(displaced(&[]), None);
        assert_eq!(displaced(&[false, false]), Some(0));
        assert_eq!(displaced(&[true, false, false]), Some(1));
        assert_eq!(displaced(&[true, true, false]), Some(2));
        // All being answered: the oldest, the likeliest not to be reading.
        assert_eq!(displaced(&[true, true, true]), Some(0));
    }
}
