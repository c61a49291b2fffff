//! The HTTP `/metrics` endpoint (`[daemon] metrics_listen`): a bound TCP
//! listener, its accept loop, and one HTTP/1 exchange per connection.
//!
//! It serves the metrics and nothing else: any other path is 404, any
//! other method 405. Whoever can connect may read them (there is no peer
//! uid over TCP), which is why the configuration keeps the address on
//! loopback unless the operator says otherwise.
//!
//! A scraper gets no more of the daemon than a few connections' worth:
//! at most [`MAX_SCRAPERS`] at once (the next waits in the kernel's
//! backlog until one ends), headers must arrive within
//! [`HEADER_READ_TIMEOUT`] and fit in [`MAX_BUFFER`], and a whole
//! connection ends after [`CONNECTION_LIMIT`]. One request per
//! connection: an idle keep-alive connection would hold a slot for nothing.
//! HTTP itself is hyper's; this module only decides what to answer.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::DaemonConfig;
use crate::service::Service;

/// Scrapers served at once. Prometheus keeps one scrape per target in
/// flight; a few more leave room for a person with curl.
const MAX_SCRAPERS: usize = 8;
/// From a connection's start to its request's last header line.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A whole connection, request and answer. Rendering takes microseconds;
/// what this bounds is a scraper that does not read the answer.
const CONNECTION_LIMIT: Duration = Duration::from_secs(10);
/// hyper's read buffer, and so the most a request's headers may take: a
/// scrape request is a few hundred bytes. hyper's floor is 8 KiB.
const MAX_BUFFER: usize = 16 * 1024;
/// The only path served.
const PATH: &str = "/metrics";

/// Why the endpoint could not be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EndpointError {
    #[error("failed to listen on metrics_listen {address}: {cause}")]
    Bind {
        address: SocketAddr,
        cause: std::io::Error,
    },
}

/// The bound listener, until [`Endpoint::run`] serves it.
pub(crate) struct Endpoint {
    listener: TcpListener,
    address: SocketAddr,
}

impl Endpoint {
    /// Binds `metrics_listen`, when set. Done at start-up, before
    /// readiness, so an address in use fails the start rather than going
    /// unnoticed.
    pub(crate) fn bind(daemon: &DaemonConfig) -> Result<Option<Endpoint>, EndpointError> {
        let Some(wanted) = daemon.metrics_listen else {
            return Ok(None);
        };
        let bind_error = |cause| EndpointError::Bind {
            address: wanted,
            cause,
        };
        let listener = std::net::TcpListener::bind(wanted).map_err(bind_error)?;
        listener.set_nonblocking(true).map_err(bind_error)?;
        // The port the kernel picked, when the configuration said 0.
        let address = listener.local_addr().map_err(bind_error)?;
        let listener = TcpListener::from_std(listener).map_err(bind_error)?;
        Ok(Some(Endpoint { listener, address }))
    }

    /// Serves scrapes until `stop`, answering each from the service in
    /// force then; connections still open at `stop` are dropped.
    pub(crate) async fn run(
        self,
        services: watch::Receiver<Arc<Service>>,
        stop: CancellationToken,
    ) {
        tracing::info!(metrics_listen = %self.address, "serving metrics over HTTP");
        let slots = Arc::new(Semaphore::new(MAX_SCRAPERS));
        let connections = TaskTracker::new();
        while let Some((stream, slot)) = self.next(&slots, &stop).await {
            connections.spawn(exchange(stream, slot, services.clone(), stop.clone()));
        }
        connections.close();
        connections.wait().await;
    }

    /// The next connection with its slot; `None` once `stop` is cancelled.
    async fn next(
        &self,
        slots: &Arc<Semaphore>,
        stop: &CancellationToken,
    ) -> Option<(TcpStream, OwnedSemaphorePermit)> {
        loop {
            // A slot first: at the limit, further scrapers wait in the
            // backlog instead of costing a task each.
            let slot = tokio::select! {
                slot = slots.clone().acquire_owned() => slot.ok()?,
                () = stop.cancelled() => return None,
            };
            tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => return Some((stream, slot)),
                    Err(e) => {
                        // EMFILE and friends: back off rather than spin.
                        tracing::warn!("failed to accept a metrics connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                () = stop.cancelled() => return None,
            }
        }
    }
}

/// Serves one connection, one request, within the limits.
async fn exchange(
    stream: TcpStream,
    slot: OwnedSemaphorePermit,
    services: watch::Receiver<Arc<Service>>,
    stop: CancellationToken,
) {
    let answer = hyper::service::service_fn(move |request: Request<Incoming>| {
        let response = respond(&request, &services);
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
    drop(slot);
}

/// What a request gets: the metrics for `GET /metrics`, 404 for another
/// path, 405 for another method.
fn respond<B>(
    request: &Request<B>,
    services: &watch::Receiver<Arc<Service>>,
) -> Response<Full<Bytes>> {
    match route(request.method(), request.uri().path()) {
        Route::Metrics => {}
        Route::NotFound => {
            return plain(
                StatusCode::NOT_FOUND,
                "not found: only /metrics is served\n",
            )
        }
        Route::NotAllowed => {
            let mut response = plain(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed: use GET\n",
            );
            response
                .headers_mut()
                .insert(ALLOW, hyper::header::HeaderValue::from_static("GET"));
            return response;
        }
    }
    // Cloned out so the watch's lock is not held while rendering.
    let service = services.borrow().clone();
    match service.render_metrics() {
        Ok(text) => {
            let mut response = Response::new(Full::new(Bytes::from(text)));
            response.headers_mut().insert(
                CONTENT_TYPE,
                hyper::header::HeaderValue::from_static(super::CONTENT_TYPE),
            );
            response
        }
        Err(e) => {
            tracing::warn!("{e}");
            plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "failed to render the metrics\n",
            )
        }
    }
}

/// What a request is for, by its method and path.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    NotAllowed,
}

/// The path decides first: another path is not found whatever the method.
fn route(method: &Method, path: &str) -> Route {
    if path != PATH {
        Route::NotFound
    } else if method != Method::GET {
        Route::NotAllowed
    } else {
        Route::Metrics
    }
}

fn plain(status: StatusCode, text: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_get_metrics_is_served() {
        assert_eq!(route(&Method::GET, "/metrics"), Route::Metrics);
        for path in ["/", "/metrics/", "/Metrics", "/metrics2", "/debug", ""] {
            assert_eq!(route(&Method::GET, path), Route::NotFound, "{path}");
        }
        for method in [Method::POST, Method::PUT, Method::DELETE, Method::HEAD] {
            assert_eq!(route(&method, "/metrics"), Route::NotAllowed, "{method}");
        }
        assert_eq!(route(&Method::POST, "/other"), Route::NotFound);
    }
}
