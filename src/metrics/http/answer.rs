//! What one request to the metrics endpoint gets: the metrics for
//! `GET /metrics` addressed to the endpoint, and a short plain-text refusal
//! for anything else. No I/O: the connection is [`super::connections`]'.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE, HOST};
use hyper::{Method, Request, Response, StatusCode};
use tokio::sync::watch;

use super::host::{self, Addressed};
use crate::service::Service;

/// The only path served.
const PATH: &str = "/metrics";

/// The answer to `request`, which reached the endpoint at `local`: first
/// whether it is addressed here (421 or 400 when not), then 404 for
/// another path, 405 for another method, else the metrics of the service
/// in force.
pub(super) fn respond<B>(
    request: &Request<B>,
    local: SocketAddr,
    services: &watch::Receiver<Arc<Service>>,
) -> Response<Full<Bytes>> {
    let addressed = host::addressed(
        request.version(),
        request.uri().authority().map(|a| a.as_str()),
        request.headers().get_all(HOST).iter(),
        local,
    );
    match addressed {
        Addressed::Here => {}
        // Neither names what was asked for: the text is fixed, so nothing
        // a page chose comes back to it.
        Addressed::Elsewhere => return plain(
            StatusCode::MISDIRECTED_REQUEST,
            "misdirected request: this endpoint answers only to its own address and localhost\n",
        ),
        Addressed::Malformed => {
            return plain(
                StatusCode::BAD_REQUEST,
                "bad request: HTTP/1.1 needs exactly one Host header\n",
            )
        }
    }
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
                .insert(ALLOW, HeaderValue::from_static("GET"));
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
                HeaderValue::from_static(crate::metrics::CONTENT_TYPE),
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
        HeaderValue::from_static("text/plain; charset=utf-8"),
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
