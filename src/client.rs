//! The caller's side of the socket, as `tokend get`, `reload`, `status`,
//! `keys` and `metrics` use it: one request, one answer, within one
//! deadline and a bound on what is read. The peer may be any program
//! (`--socket`), so what it answers is checked before it is printed.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr};
use zeroize::{Zeroize, Zeroizing};

use crate::issuer::MAX_ANSWER_BYTES;
use crate::printable;
use crate::protocol::{
    self, ErrorBody, KeyInfo, KeysAnswer, MetricsAnswer, Op, ReloadAnswer, Request, StatusAnswer,
    TokenAnswer,
};
#[cfg(doc)]
use crate::scope::MAX_GRANTED_BYTES;
use crate::secret::AccessToken;

/// Token answers longer than this are not tokend's. What a get answer
/// holds of the issuer's comes from an answer of at most
/// [`MAX_ANSWER_BYTES`]: the token, whose JSON escapes (`\"`, `\\`) cost
/// the issuer as much as they cost us, and the granted scopes, at most
/// [`MAX_GRANTED_BYTES`] of text, which takes at most about twice that as
/// a JSON list. Add the token type (300 bytes, escapes doubling them), the
/// key name (64) and the times, and the largest answer tokend sends
/// `tokend get` (which sends no `id`) is under 1.13 MiB, even counting the
/// token and the scopes each at their own maximum; twice the issuer's
/// limit leaves room to spare (a test below builds that answer).
const MAX_TOKEN_ANSWER: u64 = 2 * MAX_ANSWER_BYTES as u64;
/// Other answers longer than this are not tokend's. Status and metrics
/// grow with the cached scope sets, a few hundred bytes each, and
/// `max_scope_sets` allows up to 100,000 per key.
const MAX_ANSWER: u64 = 256 << 20;
/// The first read's room: a token answer with a large JWT fits.
const FIRST_READ: usize = 8 << 10;

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
    /// No whole answer within the caller's `--timeout`, from connect to
    /// the answer's last byte.
    #[error(
        "tokend at {} did not answer within {}",
        path.display(),
        humantime::format_duration(*timeout)
    )]
    TimedOut { path: PathBuf, timeout: Duration },
    /// A token answer that `tokend get` will not print: what is wrong
    /// with it, never its text.
    #[error("tokend at {} answered {problem}; it is not printed", path.display())]
    Unprintable { path: PathBuf, problem: Unprintable },
    /// The daemon answered with an error.
    #[error("{}", .0.message)]
    Refused(ErrorBody),
}

/// Why a token answer is not printed: what `tokend get` prints is pasted
/// into headers and shown on terminals, and `--socket` may name any
/// program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unprintable {
    #[error(
        "a token that is not visible ASCII (RFC 6749 A.12: 1*VSCHAR) without spaces around it"
    )]
    Token,
    #[error("a token_type that is not visible ASCII without spaces (RFC 6749 A.7)")]
    TokenType,
    #[error("a line with a control character in it")]
    Line,
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
    if let Some(problem) = unprintable(&line, &answer) {
        return Err(ClientError::Unprintable {
            path: socket.to_owned(),
            problem,
        });
    }
    Ok(Token {
        access_token: answer.access_token,
        token_type: answer.token_type,
        line,
    })
}

/// What is wrong with a token answer for printing, if anything: each
/// `--format` prints the token, the type before it, or the whole line,
/// and none of them may carry a control character, so the answer is
/// judged whole whatever the format.
fn unprintable(line: &str, answer: &TokenAnswer) -> Option<Unprintable> {
    // The rule the daemon holds issuers' tokens to: a token it would not
    // hand out is not printed from another program on `--socket` either.
    if !answer.access_token.is_well_formed() {
        return Some(Unprintable::Token);
    }
    let token_type = &answer.token_type;
    if token_type.is_empty() || !token_type.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Some(Unprintable::TokenType);
    }
    // The line's other fields reach the terminal only inside the line
    // (`--format json`), where JSON escapes stay escaped: only a raw
    // character, which no tokend writes, could command the terminal.
    line.chars()
        .any(printable::is_unsafe)
        .then_some(Unprintable::Line)
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

/// When an exchange must be over: `None` for a timeout too long to add to
/// the clock, which waits as long as it takes.
#[derive(Clone, Copy)]
struct Deadline {
    at: Option<Instant>,
    timeout: Duration,
}

impl Deadline {
    fn after(timeout: Duration) -> Deadline {
        Deadline {
            at: Instant::now().checked_add(timeout),
            timeout,
        }
    }

    /// The time left, as a socket timeout (`None`: no limit); an error of
    /// kind `TimedOut` once none is left, since a socket timeout of zero
    /// would mean no limit at all.
    fn left(&self) -> io::Result<Option<Duration>> {
        let Some(at) = self.at else {
            return Ok(None);
        };
        match at.saturating_duration_since(Instant::now()) {
            Duration::ZERO => Err(io::ErrorKind::TimedOut.into()),
            left => Ok(Some(left)),
        }
    }
}

/// Sends one request line and reads one answer line of at most `limit`
/// bytes, all within `timeout`: a daemon that answers a byte at a time
/// does not keep the caller (a health check, a service's start) waiting
/// past it.
fn exchange(
    socket: &Path,
    request: &str,
    timeout: Duration,
    limit: u64,
) -> Result<String, ClientError> {
    let deadline = Deadline::after(timeout);
    let stream = connect(socket, deadline)?;
    let mut request = request.as_bytes().to_vec();
    request.push(b'\n');
    write_all(&stream, &request, deadline).map_err(|e| failure(socket, deadline, e))?;
    let line = read_line(&stream, deadline, limit).map_err(|e| failure(socket, deadline, e))?;
    let garbled = || ClientError::Garbled(socket.to_owned());
    let Some(mut line) = line else {
        return Err(garbled());
    };
    match String::from_utf8(std::mem::take(&mut *line)) {
        Ok(text) => Ok(text),
        Err(not_utf8) => {
            // The bytes may be most of a token: wipe them too.
            not_utf8.into_bytes().zeroize();
            Err(garbled())
        }
    }
}

/// What a failed read or write of the exchange means.
fn failure(socket: &Path, deadline: Deadline, err: io::Error) -> ClientError {
    match err.kind() {
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => ClientError::TimedOut {
            path: socket.to_owned(),
            timeout: deadline.timeout,
        },
        _ => ClientError::Io {
            path: socket.to_owned(),
            source: err,
        },
    }
}

/// Connects within the deadline. The socket's send timeout bounds the
/// connect too: Linux waits that long for room in a listener's full
/// backlog, then fails with EAGAIN. `std` connects before a timeout can
/// be set, hence the socket made by hand.
fn connect(socket: &Path, deadline: Deadline) -> Result<UnixStream, ClientError> {
    let failed = |err: io::Error| failure(socket, deadline, err);
    let fd = nix::sys::socket::socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|errno| failed(errno.into()))?;
    let stream = UnixStream::from(fd);
    let address = UnixAddr::new(socket).map_err(|errno| failed(errno.into()))?;
    loop {
        deadline
            .left()
            .and_then(|left| stream.set_write_timeout(left))
            .map_err(failed)?;
        match nix::sys::socket::connect(stream.as_raw_fd(), &address) {
            Ok(()) => return Ok(stream),
            Err(Errno::EINTR) => continue,
            Err(Errno::EAGAIN) => return Err(failed(io::ErrorKind::TimedOut.into())),
            Err(errno) => return Err(not_connected(socket, errno.into())),
        }
    }
}

/// Why a connect failed, in the words an operator acts on.
fn not_connected(socket: &Path, source: io::Error) -> ClientError {
    let path = socket.to_owned();
    match source.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => {
            ClientError::NotRunning { path, source }
        }
        io::ErrorKind::PermissionDenied => ClientError::NotPermitted { path, source },
        _ => ClientError::Io { path, source },
    }
}

/// Writes all of `bytes`, each write limited to the time left.
fn write_all(mut stream: &UnixStream, mut bytes: &[u8], deadline: Deadline) -> io::Result<()> {
    while !bytes.is_empty() {
        stream.set_write_timeout(deadline.left()?)?;
        match stream.write(bytes) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => bytes = &bytes[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads up to the first `\n`, each read limited to the time left; the
/// line without it, or `None` when the daemon closed first or sent more
/// than `limit` bytes without one. The line may be a token: it only ever
/// lives in memory that is wiped, growing by copy rather than by
/// reallocation, which would leave the old bytes behind.
fn read_line(
    mut stream: &UnixStream,
    deadline: Deadline,
    limit: u64,
) -> io::Result<Option<Zeroizing<Vec<u8>>>> {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let mut line = Zeroizing::new(Vec::with_capacity(FIRST_READ));
    loop {
        if line.len() == line.capacity() {
            let mut bigger = Zeroizing::new(Vec::with_capacity(line.len().saturating_mul(2)));
            bigger.extend_from_slice(&line);
            line = bigger;
        }
        let start = line.len();
        let room = line.capacity();
        line.resize(room, 0);
        stream.set_read_timeout(deadline.left()?)?;
        let read = match stream.read(&mut line[start..]) {
            Ok(0) => return Ok(None),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => 0,
            Err(e) => return Err(e),
        };
        line.truncate(start + read);
        if let Some(end) = line[start..].iter().position(|&b| b == b'\n') {
            line.truncate(start + end);
            return Ok((line.len() <= limit).then_some(line));
        }
        if line.len() > limit {
            return Ok(None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{encode, Response};
    use crate::scope::MAX_GRANTED_BYTES;

    fn answer(token: &str, token_type: &str, scopes: Vec<String>) -> TokenAnswer {
        TokenAnswer {
            key: "k".repeat(64),
            access_token: AccessToken::new(token.to_owned()),
            token_type: token_type.to_owned(),
            expires_in: u64::MAX,
            expires_at: "2026-11-25T10:00:00Z".into(),
            scopes,
        }
    }

    #[test]
    fn the_largest_token_answer_tokend_sends_is_read() {
        // A token of quotes fills the issuer's answer at two bytes each;
        // one-letter scopes take the most room per granted byte.
        let token = "\"".repeat(MAX_ANSWER_BYTES / 2);
        let scopes = vec!["a".to_owned(); MAX_GRANTED_BYTES / 2];
        let largest = answer(&token, &"\"".repeat(300), scopes);
        let line = encode(None, &Response::Token(largest));
        assert!(
            (line.len() as u64) < MAX_TOKEN_ANSWER,
            "{} bytes",
            line.len()
        );
    }

    #[test]
    fn a_token_the_daemon_would_not_hand_out_is_not_printed() {
        let judged = |token: &str| {
            let line = encode(None, &Response::Token(answer(token, "Bearer", vec![])));
            // As `exchange` returns it: without its `\n`.
            let line = String::from_utf8(line.to_vec()).unwrap();
            unprintable(
                line.trim_end_matches('\n'),
                &answer(token, "Bearer", vec![]),
            )
        };
        for token in [
            "",
            " ",
            "   ",
            " x",
            "x ",
            "x\u{1b}[2J",
            "x\r\nX-Injected: yes",
        ] {
            assert_eq!(
                judged(token),
                Some(Unprintable::Token),
                "a token of {} bytes",
                token.len()
            );
        }
        assert_eq!(judged("eyJ.a b"), None);
    }
}
