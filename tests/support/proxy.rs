//! A loopback HTTP proxy that only tunnels: `CONNECT host:port`, then the
//! bytes both ways. It records each request line and its
//! `Proxy-Authorization`, so a test can prove tokend's request went
//! through it, and with what credentials. Anything but CONNECT is answered
//! 405 and recorded too. When made with [`ConnectProxy::requiring`] it
//! answers 407 to a CONNECT without the expected credentials. Made with
//! [`ConnectProxy::echoing`], it answers a plain request (what an `http://`
//! issuer gets through a proxy) with a 502 JSON error that quotes the
//! password it was sent, re-encoded as a proxy's own encoder would.
#![allow(dead_code, unreachable_pub)]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use tokio::io::AsyncReadExt;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use super::issuer::Echo;

/// The most header bytes read from a client before giving up on it.
const MAX_HEAD: usize = 16 << 10;

/// The most body bytes read from a plain request before answering it.
const MAX_BODY: usize = 64 << 10;

/// What the proxy wants and does.
#[derive(Default)]
struct Policy {
    /// The `Proxy-Authorization` a CONNECT must carry.
    expected: Option<String>,
    /// How a plain request's password is quoted back, if it is.
    echo: Option<Echo>,
}

/// What the proxy was asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// `CONNECT 127.0.0.1:4433 HTTP/1.1`, as sent.
    pub request_line: String,
    /// The `Proxy-Authorization` value, as sent.
    pub authorization: Option<String>,
}

/// The running proxy; dropping it stops accepting.
pub struct ConnectProxy {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    count: watch::Receiver<usize>,
    accepting: tokio::task::JoinHandle<()>,
}

impl ConnectProxy {
    /// A proxy that asks for no credentials.
    pub async fn start() -> ConnectProxy {
        ConnectProxy::run(Policy::default()).await
    }

    /// A proxy that wants `Proxy-Authorization: Basic base64(user:password)`.
    pub async fn requiring(user: &str, password: &str) -> ConnectProxy {
        ConnectProxy::run(Policy {
            expected: Some(basic(user, password)),
            echo: None,
        })
        .await
    }

    /// Like [`ConnectProxy::requiring`], and a plain request is answered
    /// 502 with `{"error":"proxy_error","error_description":…}` ending in
    /// `user:password` as the request's `Proxy-Authorization` gave them,
    /// the password written as `echo` writes it.
    pub async fn echoing(user: &str, password: &str, echo: Echo) -> ConnectProxy {
        ConnectProxy::run(Policy {
            expected: Some(basic(user, password)),
            echo: Some(echo),
        })
        .await
    }

    async fn run(policy: Policy) -> ConnectProxy {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (counter, count) = watch::channel(0);
        let counter = Arc::new(counter);
        let policy = Arc::new(policy);
        let log = seen.clone();
        let accepting = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let (log, counter, policy) = (log.clone(), counter.clone(), policy.clone());
                tokio::spawn(async move {
                    let _ = tunnel(client, &log, &counter, &policy).await;
                });
            }
        });
        ConnectProxy {
            addr,
            seen,
            count,
            accepting,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://USER:PASSWORD@127.0.0.1:PORT`.
    pub fn url_with(&self, user: &str, password: &str) -> String {
        format!("http://{user}:{password}@{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("proxy log").clone()
    }

    /// Waits until `n` requests were seen; panics after `limit`.
    pub async fn wait_for(&self, n: usize, limit: Duration) -> Vec<Seen> {
        let mut count = self.count.clone();
        let reached = tokio::time::timeout(limit, count.wait_for(|c| *c >= n)).await;
        assert!(
            matches!(reached, Ok(Ok(_))),
            "the proxy saw {:?}, not {n} requests, within {limit:?}",
            self.seen()
        );
        self.seen()
    }
}

impl Drop for ConnectProxy {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

/// `Basic base64(user:password)`.
fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
}

/// One client: its request head, then the tunnel.
async fn tunnel(
    client: TcpStream,
    log: &Mutex<Vec<Seen>>,
    counter: &watch::Sender<usize>,
    policy: &Policy,
) -> std::io::Result<()> {
    let expected = policy.expected.as_deref();
    let mut client = BufReader::new(client);
    let mut request_line = String::new();
    let mut authorization = None;
    let mut content_length = 0;
    let mut read = 0;
    loop {
        let mut line = String::new();
        let n = client.read_line(&mut line).await?;
        read += n;
        if n == 0 || read > MAX_HEAD {
            return Ok(());
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if request_line.is_empty() {
            request_line = line.to_owned();
        } else if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("proxy-authorization") {
                authorization = Some(value.trim().to_owned());
            } else if name.eq_ignore_ascii_case("content-length") {
                content_length = value.trim().parse().unwrap_or(0);
            }
        }
    }
    let seen = Seen {
        request_line: request_line.clone(),
        authorization: authorization.clone(),
    };
    log.lock().expect("proxy log").push(seen);
    counter.send_modify(|c| *c += 1);
    let mut parts = request_line.split(' ');
    let (Some("CONNECT"), Some(target)) = (parts.next(), parts.next()) else {
        if let Some(echo) = policy.echo {
            return echo_password(client, content_length, authorization.as_deref(), echo).await;
        }
        return client
            .write_all(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n")
            .await;
    };
    if expected.is_some() && authorization.as_deref() != expected {
        return client
            .write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nproxy-authenticate: Basic realm=\"test\"\r\ncontent-length: 0\r\n\r\n")
            .await;
    }
    let Ok(mut upstream) = TcpStream::connect(target).await else {
        return client
            .write_all(b"HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n")
            .await;
    };
    client
        .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        .await?;
    tokio::io::copy_bidirectional(&mut client, &mut upstream).await?;
    Ok(())
}

/// Reads a plain request's body (so closing leaves nothing unread, which
/// would reset the connection under the answer), then answers 502 quoting
/// the `user:password` of `authorization` with the password as `echo`
/// writes it.
async fn echo_password(
    mut client: BufReader<TcpStream>,
    content_length: usize,
    authorization: Option<&str>,
    echo: Echo,
) -> std::io::Result<()> {
    let mut body = vec![0; content_length.min(MAX_BODY)];
    client.read_exact(&mut body).await?;
    let pair = authorization
        .and_then(|value| value.strip_prefix("Basic "))
        .and_then(|encoded| STANDARD.decode(encoded).ok())
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .unwrap_or_default();
    let (user, password) = pair.split_once(':').unwrap_or((&pair, ""));
    let answer = serde_json::json!({
        "error": "proxy_error",
        "error_description": format!("the upstream refused {user}:{}", echo.encode(password)),
    })
    .to_string();
    let head = format!(
        "HTTP/1.1 502 Bad Gateway\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        answer.len()
    );
    client.write_all(head.as_bytes()).await?;
    client.write_all(answer.as_bytes()).await?;
    client.flush().await
}
