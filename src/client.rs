//! The caller's side of the socket, as `tokend get`, `reload`, `status`,
//! `keys` and `metrics` use it: one request, one answer, with a timeout and a bound on
//! what is read.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use zeroize::Zeroizing;

use crate::protocol::{
    self, ErrorBody, KeyInfo, KeysAnswer, MetricsAnswer, Op, ReloadAnswer, Request, StatusAnswer,
    TokenAnswer,
};
use crate::secret::AccessToken;

/// Token answers longer than this are not tokend's.
const MAX_TOKEN_ANSWER: u64 = 1 << 20;
/// Other answers longer than this are not tokend's. Status and metrics
/// grow with the cached scope sets, a few hundred bytes each, and
/// `max_scope_sets` allows up to 100,000 per key.
const MAX_ANSWER: u64 = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("tokend is not running at {} ({source})", path.display())]
    NotRunning { path: PathBuf, source: io::Error },
    /// The socket is there, but its mode keeps this caller out.
    #[error(
        "may not connect to tokend at {} ({source}); the socket's group (tokend under \
         the shipped units) decides who may connect",
        path.display()
    )]
    NotPermitted { path: PathBuf, source: io::Error },
    #[error("failed to talk to tokend at {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("tokend at {} sent an answer that is not protocol v1", .0.display())]
    Garbled(PathBuf),
    /// The daemon answered with an error.
    #[error("{}", .0.message)]
    Refused(ErrorBody),
}

/// A token as the daemon answered it. The whole answer line is kept for
/// `--format json`.
pub struct Token {
    pub access_token: AccessToken,
    pub token_type: String,
    pub line: Zeroizing<String>,
}

/// Asks the daemon at `socket` for a token, for `resource` (RFC 8707)
/// when given.
pub fn get(
    socket: &Path,
    key: &str,
    scopes: &[String],
    resource: Option<&str>,
    timeout: Duration,
) -> Result<Token, ClientError> {
    let request = Request {
        id: None,
        op: Op::Get {
            key: key.to_owned(),
            scopes: scopes.to_vec(),
            resource: resource.map(str::to_owned),
        },
    };
    let line = Zeroizing::new(exchange(
        socket,
        &request.encode(),
        timeout,
        MAX_TOKEN_ANSWER,
    )?);
    let answer: TokenAnswer = reply(socket, &line)?;
    Ok(Token {
        access_token: answer.access_token,
        token_type: answer.token_type,
        line,
    })
}

/// Asks the daemon at `socket` to reload; returns how many keys it now has.
pub fn reload(socket: &Path, timeout: Duration) -> Result<usize, ClientError> {
    let answer: ReloadAnswer = ask(socket, Op::Reload, timeout)?;
    Ok(answer.keys)
}

/// The daemon's view of every key the caller may see, set by set, and of
/// its metrics endpoint.
pub fn status(socket: &Path, timeout: Duration) -> Result<StatusAnswer, ClientError> {
    ask(socket, Op::Status, timeout)
}

/// The keys the caller may read, with their allowed scopes.
pub fn keys(socket: &Path, timeout: Duration) -> Result<Vec<KeyInfo>, ClientError> {
    let answer: KeysAnswer = ask(socket, Op::Keys, timeout)?;
    Ok(answer.keys)
}

/// The daemon's metrics, in the Prometheus text format.
pub fn metrics(socket: &Path, timeout: Duration) -> Result<String, ClientError> {
    let answer: MetricsAnswer = ask(socket, Op::Metrics, timeout)?;
    Ok(answer.text)
}

/// One request without a token in its answer.
fn ask<T: serde::de::DeserializeOwned>(
    socket: &Path,
    op: Op,
    timeout: Duration,
) -> Result<T, ClientError> {
    let line = exchange(
        socket,
        &Request { id: None, op }.encode(),
        timeout,
        MAX_ANSWER,
    )?;
    reply(socket, &line)
}

/// The body of a successful answer, or the daemon's error.
fn reply<T: serde::de::DeserializeOwned>(socket: &Path, line: &str) -> Result<T, ClientError> {
    match protocol::decode_reply(line) {
        Some(Ok(body)) => Ok(body),
        Some(Err(error)) => Err(ClientError::Refused(error)),
        None => Err(ClientError::Garbled(socket.to_owned())),
    }
}

/// Sends one request line and reads one answer line of at most `limit`
/// bytes.
fn exchange(
    socket: &Path,
    request: &str,
    timeout: Duration,
    limit: u64,
) -> Result<String, ClientError> {
    let io_err = |source| ClientError::Io {
        path: socket.to_owned(),
        source,
    };
    let mut stream = UnixStream::connect(socket).map_err(|source| match source.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => ClientError::NotRunning {
            path: socket.to_owned(),
            source,
        },
        io::ErrorKind::PermissionDenied => ClientError::NotPermitted {
            path: socket.to_owned(),
            source,
        },
        _ => io_err(source),
    })?;
    stream.set_read_timeout(Some(timeout)).map_err(io_err)?;
    stream.set_write_timeout(Some(timeout)).map_err(io_err)?;
    stream
        .write_all(format!("{request}\n").as_bytes())
        .map_err(io_err)?;
    let mut answer = String::new();
    BufReader::new(stream.take(limit))
        .read_line(&mut answer)
        .map_err(io_err)?;
    if !answer.ends_with('\n') {
        return Err(ClientError::Garbled(socket.to_owned()));
    }
    answer.pop();
    Ok(answer)
}
