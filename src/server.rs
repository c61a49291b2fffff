//! The socket server: binding the socket, the accept loop with its
//! connection limit, and one handler per connection that reads bounded
//! lines, answers them in order and stops between requests at shutdown.
//!
//! What a request means is [`crate::service`]'s business; this module moves
//! bytes and enforces limits.

use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::peer;
use crate::protocol::{self, ErrorBody, ErrorCode, Response};
use crate::service::Service;

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    #[error("{}: a file that is not a socket is in the way; tokend will not remove it", .0.display())]
    NotASocket(PathBuf),
    #[error("{}: another process is listening on this socket (is tokend already running?)", .0.display())]
    InUse(PathBuf),
    #[error("failed to bind {}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

/// Binds the listening socket at `path` with `mode`, replacing only a stale
/// socket that nobody listens on.
pub fn bind(path: &Path, mode: u32) -> Result<UnixListener, BindError> {
    let io_err = |source| BindError::Io {
        path: path.to_owned(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(BindError::NotASocket(path.to_owned()))
        }
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => return Err(BindError::InUse(path.to_owned())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                tracing::info!(socket = %path.display(), "replacing a stale socket");
                std::fs::remove_file(path).map_err(io_err)?;
            }
            Err(e) => return Err(io_err(e)),
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err(e)),
    }
    // bind() creates the file with the process umask: make it owner-only so
    // there is no moment the socket is more open than `mode`.
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = listener.map_err(io_err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(io_err)?;
    Ok(listener)
}

/// Limits a connection lives under.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub idle_timeout: Duration,
    pub max_request_bytes: usize,
}

/// Owns the accept loop.
pub struct Listener {
    pub listener: UnixListener,
    pub service: Arc<Service>,
    pub limits: Limits,
    /// Stop accepting and let handlers finish the request they are on.
    pub shutdown: CancellationToken,
    pub connections: TaskTracker,
}

impl Listener {
    /// Accepts until `shutdown`; every connection runs in a task tracked by
    /// `connections`.
    pub async fn run(self) {
        let slots = Arc::new(Semaphore::new(self.limits.max_connections));
        loop {
            let stream = tokio::select! {
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of
                        // spinning on an error that persists.
                        tracing::warn!("failed to accept a connection: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = self.shutdown.cancelled() => break,
            };
            match slots.clone().try_acquire_owned() {
                Ok(permit) => {
                    let handler = Handler {
                        service: self.service.clone(),
                        limits: self.limits,
                        shutdown: self.shutdown.clone(),
                    };
                    self.connections.spawn(async move {
                        handler.run(stream).await;
                        drop(permit);
                    });
                }
                Err(_) => {
                    let message = format!(
                        "tokend is at max_connections ({})",
                        self.limits.max_connections
                    );
                    self.connections.spawn(refuse(stream, message));
                }
            }
        }
    }
}

/// Answers `busy` to a connection over the limit and closes it.
async fn refuse(mut stream: UnixStream, message: String) {
    let answer = protocol::encode(
        None,
        &Response::Error(ErrorBody::new(ErrorCode::Busy, message)),
    );
    // A caller that does not read gets no more than a second of our time.
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&answer)).await;
    let _ = stream.shutdown().await;
}

/// Serves one connection.
struct Handler {
    service: Arc<Service>,
    limits: Limits,
    shutdown: CancellationToken,
}

impl Handler {
    async fn run(self, stream: UnixStream) {
        let std_stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => return tracing::warn!("failed to inspect a connection: {e}"),
        };
        let identified = tokio::task::spawn_blocking(move || {
            peer::identify(&std_stream).map(|c| (c, std_stream))
        })
        .await;
        let (caller, std_stream) = match identified {
            Ok(Ok(found)) => found,
            Ok(Err(e)) => return tracing::warn!("failed to read the caller's credentials: {e}"),
            Err(e) => return tracing::warn!("caller identification failed: {e}"),
        };
        let stream = match UnixStream::from_std(std_stream) {
            Ok(s) => s,
            Err(e) => return tracing::warn!("failed to register a connection: {e}"),
        };
        tracing::debug!(
            peer_uid = caller.uid,
            peer_pid = caller.pid,
            "connection opened"
        );
        let (read, mut write) = stream.into_split();
        let mut lines = LineReader::new(read, self.limits.max_request_bytes);
        loop {
            let frame = tokio::select! {
                frame = tokio::time::timeout(self.limits.idle_timeout, lines.next()) => frame,
                // Between requests: nothing is lost by stopping here.
                () = self.shutdown.cancelled() => break,
            };
            let (answer, close) = match frame {
                Err(_) => {
                    tracing::debug!(peer_uid = caller.uid, "closing an idle connection");
                    break;
                }
                Ok(Err(e)) => {
                    tracing::debug!(peer_uid = caller.uid, "connection read failed: {e}");
                    break;
                }
                Ok(Ok(Frame::Eof)) => break,
                Ok(Ok(Frame::TooLarge)) => {
                    let message = format!(
                        "request line is longer than max_request_bytes ({})",
                        self.limits.max_request_bytes
                    );
                    let error = Response::Error(ErrorBody::new(ErrorCode::TooLarge, message));
                    (protocol::encode(None, &error), true)
                }
                Ok(Ok(Frame::Line(line))) => (self.service.answer(&caller, &line).await, false),
            };
            if let Err(e) = write.write_all(&answer).await {
                tracing::debug!(peer_uid = caller.uid, "connection write failed: {e}");
                break;
            }
            if close {
                break;
            }
        }
        let _ = write.shutdown().await;
    }
}

/// One unit read from a connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    /// A request line without its `\n`; also a final line that ended at EOF.
    Line(BytesMut),
    /// The line passed the limit; the rest of it was not read.
    TooLarge,
    Eof,
}

/// Reads `\n`-terminated lines holding at most `max` bytes of one line in
/// memory, and says `TooLarge` as soon as a line passes the limit rather
/// than waiting for its end.
pub struct LineReader<R> {
    inner: R,
    buf: BytesMut,
    /// How far `buf` has been searched for `\n`, so a slowly arriving long
    /// line is scanned once, not once per read.
    scanned: usize,
    max: usize,
    eof: bool,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub fn new(inner: R, max: usize) -> Self {
        LineReader {
            inner,
            buf: BytesMut::new(),
            scanned: 0,
            max,
            eof: false,
        }
    }

    pub async fn next(&mut self) -> io::Result<Frame> {
        loop {
            if let Some(pos) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
                let end = self.scanned + pos;
                if end > self.max {
                    return Ok(Frame::TooLarge);
                }
                let mut line = self.buf.split_to(end + 1);
                line.truncate(end);
                self.scanned = 0;
                return Ok(Frame::Line(line));
            }
            self.scanned = self.buf.len();
            if self.buf.len() > self.max {
                return Ok(Frame::TooLarge);
            }
            if self.eof {
                return Ok(if self.buf.is_empty() {
                    Frame::Eof
                } else {
                    self.scanned = 0;
                    Frame::Line(self.buf.split())
                });
            }
            // Read no further than one byte past the limit.
            let room = self.max + 1 - self.buf.len();
            let mut chunk = (&mut self.inner).take(room.min(16 * 1024) as u64);
            if chunk.read_buf(&mut self.buf).await? == 0 {
                self.eof = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn frames(input: &[u8], max: usize) -> Vec<Frame> {
        let mut reader = LineReader::new(input, max);
        let mut out = Vec::new();
        loop {
            let frame = reader.next().await.unwrap();
            let stop = matches!(frame, Frame::Eof | Frame::TooLarge);
            out.push(frame);
            if stop {
                return out;
            }
        }
    }

    fn line(s: &str) -> Frame {
        Frame::Line(BytesMut::from(s))
    }

    #[tokio::test]
    async fn splits_pipelined_lines() {
        assert_eq!(
            frames(b"a\nbb\n\nccc\n", 10).await,
            [line("a"), line("bb"), line(""), line("ccc"), Frame::Eof]
        );
    }

    #[tokio::test]
    async fn partial_line_at_eof_is_still_a_line() {
        assert_eq!(
            frames(b"a\nrest", 10).await,
            [line("a"), line("rest"), Frame::Eof]
        );
    }

    #[tokio::test]
    async fn too_large_without_waiting_for_the_newline() {
        assert_eq!(frames(&[b'x'; 100], 10).await, [Frame::TooLarge]);
        assert_eq!(
            frames(b"0123456789\n", 10).await,
            [line("0123456789"), Frame::Eof]
        );
        assert_eq!(frames(b"0123456789A\n", 10).await, [Frame::TooLarge]);
    }

    #[tokio::test]
    async fn reads_no_more_than_the_limit_from_an_endless_line() {
        let endless = tokio::io::repeat(b'x');
        let mut reader = LineReader::new(endless, 1000);
        assert_eq!(reader.next().await.unwrap(), Frame::TooLarge);
        assert!(reader.buf.len() <= 1001);
    }
}
