//! The socket server: binding the socket, the accept loop with its
//! connection limit, and one handler per connection that reads bounded
//! lines, answers them in order and stops between requests at shutdown.
//!
//! Every wait on a caller is bounded, reading and writing alike: a caller
//! that sends nothing, drips a line, or stops reading its answers is closed,
//! and its connection slots go to others.
//!
//! What a request means is [`crate::service`]'s business; this module moves
//! bytes and enforces limits. The service is looked up afresh for every
//! request, so a reload's new configuration answers the next request even
//! on a connection opened before it.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::config::DaemonConfig;
use crate::metrics::{self, BusyLimit};
use crate::peer::{self, Caller};
use crate::protocol::{self, ErrorBody, ErrorCode, Response};
use crate::service::Service;
use crate::shutdown::Shutdown;

/// Why the socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub(crate) enum BindError {
    #[error("{}: a file that is not a socket is in the way; tokend will not remove it", .0.display())]
    NotASocket(PathBuf),
    #[error("{}: another process is listening on this socket (is tokend already running?)", .0.display())]
    InUse(PathBuf),
    #[error("{}: the socket's directory is writable by others without the sticky bit; anyone could replace the socket", .0.display())]
    UnsafeDirectory(PathBuf),
    #[error("socket_group {0:?} does not exist")]
    NoSuchGroup(String),
    // The causes are named `cause`, not `source`: the message already says
    // it, and a chain printed with `{:#}` would say it twice.
    #[error("failed to bind {}: {cause}", path.display())]
    Io { path: PathBuf, cause: io::Error },
    #[error(
        "failed to give {} to socket_group {group:?}: {cause} (under tokend.service, make \
         socket_group the unit's Group=, which needs no chown)",
        path.display()
    )]
    Chown {
        path: PathBuf,
        group: String,
        cause: io::Error,
    },
    #[error("failed to set the mode of {} to {mode:04o}: {cause}", path.display())]
    Chmod {
        path: PathBuf,
        mode: u32,
        cause: io::Error,
    },
}

/// Binds the listening socket at `path` with `mode` (and `group`, a group
/// name, when set), replacing only a stale socket that nobody listens on.
pub(crate) fn bind(path: &Path, mode: u32, group: Option<&str>) -> Result<UnixListener, BindError> {
    let io_err = |cause| BindError::Io {
        path: path.to_owned(),
        cause,
    };
    check_directory(path)?;
    let group = match group {
        Some(name) => Some((
            name,
            nix::unistd::Group::from_name(name)
                .map_err(|e| io_err(e.into()))?
                .ok_or_else(|| BindError::NoSuchGroup(name.to_owned()))?
                .gid,
        )),
        None => None,
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
    if let Err(e) = restrict(path, mode, group) {
        // A half-set-up socket would be refused as live by nobody and
        // mistaken for ours by the next start: leave nothing behind.
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(listener)
}

/// Gives the new socket its group, then the mode that may open it to that
/// group. The socket is created with the process's group; when that is
/// already the one wanted (the unit's `Group=`), no chown is made, which
/// the unit's system call filter would refuse.
fn restrict(
    path: &Path,
    mode: u32,
    group: Option<(&str, nix::unistd::Gid)>,
) -> Result<(), BindError> {
    if let Some((name, gid)) = group {
        let current = std::fs::symlink_metadata(path)
            .map_err(|cause| BindError::Io {
                path: path.to_owned(),
                cause,
            })?
            .gid();
        if current != gid.as_raw() {
            nix::unistd::chown(path, None, Some(gid)).map_err(|e| BindError::Chown {
                path: path.to_owned(),
                group: name.to_owned(),
                cause: e.into(),
            })?;
        }
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(|cause| {
        BindError::Chmod {
            path: path.to_owned(),
            mode,
            cause,
        }
    })
}

/// Refuses a directory where others could swap our socket for theirs: one
/// writable by group or others without the sticky bit (as /tmp has).
fn check_directory(path: &Path) -> Result<(), BindError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let meta = std::fs::metadata(dir).map_err(|cause| BindError::Io {
        path: dir.to_owned(),
        cause,
    })?;
    let mode = meta.permissions().mode();
    if mode & 0o022 != 0 && mode & 0o1000 == 0 {
        return Err(BindError::UnsafeDirectory(dir.to_owned()));
    }
    Ok(())
}

/// Limits a connection lives under.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_connections: usize,
    /// So that no single uid can take every connection.
    pub(crate) max_connections_per_uid: usize,
    /// Between requests: a connection that sends nothing this long is closed.
    pub(crate) idle_timeout: Duration,
    /// From a line's first byte to its newline, and for writing one answer
    /// whole: a slow-drip client, or one that stops reading, is closed.
    pub(crate) request_timeout: Duration,
    pub(crate) max_request_bytes: usize,
}

impl From<&DaemonConfig> for Limits {
    fn from(daemon: &DaemonConfig) -> Self {
        Limits {
            max_connections: daemon.max_connections,
            max_connections_per_uid: daemon.max_connections_per_uid,
            idle_timeout: daemon.idle_timeout,
            request_timeout: daemon.request_timeout_client,
            max_request_bytes: daemon.max_request_bytes,
        }
    }
}

/// Open connections per uid. Entries leave the map when their count drops
/// to zero, so it holds at most one entry per open connection.
#[derive(Default)]
struct PerUid(std::sync::Mutex<std::collections::HashMap<u32, usize>>);

/// One connection's place in [`PerUid`]; gives it back on drop.
struct UidSlot {
    counts: Arc<PerUid>,
    uid: u32,
}

impl PerUid {
    /// A place for `uid`, unless it already holds `limit` connections.
    fn take(self: &Arc<Self>, uid: u32, limit: usize) -> Option<UidSlot> {
        let mut counts = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let count = counts.entry(uid).or_insert(0);
        if *count >= limit {
            return None;
        }
        *count += 1;
        Some(UidSlot {
            counts: self.clone(),
            uid,
        })
    }
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut counts = self
            .counts
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.uid) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.uid);
            }
        }
    }
}

/// After the answer deadline, how long handlers get to notice it and close
/// their connections (they only have to wake up).
const CLOSE_GRACE: Duration = Duration::from_millis(250);

/// Serves `listener` until `shutdown` begins, then drains its connections:
/// each handler finishes the request it is on; at the answer deadline
/// those still blocked (on an issuer, or on a caller that does not read)
/// give up. Returns when every connection is closed, or [`CLOSE_GRACE`]
/// after the deadline. `services` holds the service in force; a reload
/// replaces it, and each request is answered by the one current then.
pub(crate) async fn run(
    listener: UnixListener,
    services: watch::Receiver<Arc<Service>>,
    limits: Limits,
    shutdown: Shutdown,
) {
    let connections = TaskTracker::new();
    Acceptor {
        listener,
        services,
        limits,
        shutdown: shutdown.clone(),
        connections: connections.clone(),
    }
    .run()
    .await;
    connections.close();
    tokio::select! {
        () = connections.wait() => return,
        () = shutdown.expired() => {}
    }
    if tokio::time::timeout(CLOSE_GRACE, connections.wait())
        .await
        .is_err()
    {
        tracing::warn!("some connections did not close in time; leaving them");
    }
}

/// The accept loop and what it hands each connection.
struct Acceptor {
    listener: UnixListener,
    services: watch::Receiver<Arc<Service>>,
    limits: Limits,
    shutdown: Shutdown,
    connections: TaskTracker,
}

impl Acceptor {
    /// Accepts until the shutdown begins; every connection runs in a task
    /// tracked by `connections`.
    async fn run(self) {
        let slots = Arc::new(Semaphore::new(self.limits.max_connections));
        let per_uid = Arc::new(PerUid::default());
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
                () = self.shutdown.stopping() => break,
            };
            // The kernel recorded who connected; reading it is two
            // getsockopt calls, cheap enough for the accept loop, and done
            // once: the handler gets what was read here.
            let caller = match peer::credentials(&stream) {
                Ok(caller) => caller,
                Err(e) => {
                    tracing::warn!("failed to read a caller's credentials: {e}");
                    continue;
                }
            };
            let uid = caller.uid;
            let Some(uid_slot) = per_uid.take(uid, self.limits.max_connections_per_uid) else {
                // Debug, not info: a hostile caller must not be able to
                // flood the journal by reconnecting.
                tracing::debug!(
                    peer_uid = uid,
                    "refused a connection: uid at max_connections_per_uid"
                );
                metrics::busy_refused(BusyLimit::MaxConnectionsPerUid);
                let message = format!(
                    "uid {uid} is at max_connections_per_uid ({})",
                    self.limits.max_connections_per_uid
                );
                self.connections
                    .spawn(refuse(stream, message, self.limits.request_timeout));
                continue;
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                tracing::debug!(peer_uid = uid, "refused a connection: at max_connections");
                metrics::busy_refused(BusyLimit::MaxConnections);
                let message = format!(
                    "tokend is at max_connections ({})",
                    self.limits.max_connections
                );
                self.connections
                    .spawn(refuse(stream, message, self.limits.request_timeout));
                continue;
            };
            let handler = Handler {
                services: self.services.clone(),
                limits: self.limits,
                shutdown: self.shutdown.clone(),
            };
            let open = metrics::connection_opened();
            self.connections.spawn(async move {
                handler.run(stream, caller).await;
                drop((permit, uid_slot, open));
            });
        }
    }
}

/// Answers `busy` to a connection over the limit and closes it.
async fn refuse(mut stream: UnixStream, message: String, write_timeout: Duration) {
    let answer = protocol::encode(
        None,
        &Response::Error(ErrorBody::new(ErrorCode::Busy, message)),
    );
    // A caller that does not read gets no more of our time than an accepted
    // one would (`request_timeout`), and never more than a second: refusals
    // hold no slot, but each is a task and a file descriptor.
    let limit = write_timeout.min(Duration::from_secs(1));
    let _ = tokio::time::timeout(limit, stream.write_all(&answer)).await;
    let _ = stream.shutdown().await;
}

/// Serves one connection.
struct Handler {
    services: watch::Receiver<Arc<Service>>,
    limits: Limits,
    shutdown: Shutdown,
}

impl Handler {
    async fn run(self, stream: UnixStream, mut caller: Caller) {
        tracing::debug!(
            peer_uid = caller.uid,
            peer_pid = caller.pid,
            "connection opened"
        );
        let (read, mut write) = stream.into_split();
        let mut lines = LineReader::new(read, self.limits.max_request_bytes);
        loop {
            let frame = tokio::select! {
                // Between requests, stopping comes first: nothing is lost
                // by stopping here, and a pipelined request read now would
                // be work begun after the shutdown began.
                biased;
                () = self.shutdown.stopping() => break,
                frame = lines.next(self.limits.idle_timeout, self.limits.request_timeout) => frame,
            };
            let (answer, close) = match frame {
                Ok(Frame::Idle) => {
                    tracing::debug!(peer_uid = caller.uid, "closing an idle connection");
                    break;
                }
                Ok(Frame::Slow) => {
                    tracing::debug!(
                        peer_uid = caller.uid,
                        "closing a connection whose request line did not arrive in time"
                    );
                    break;
                }
                Err(e) => {
                    tracing::debug!(peer_uid = caller.uid, "connection read failed: {e}");
                    break;
                }
                Ok(Frame::Eof) => break,
                Ok(Frame::TooLarge) => {
                    let message = format!(
                        "request line is longer than max_request_bytes ({})",
                        self.limits.max_request_bytes
                    );
                    let error = Response::Error(ErrorBody::new(ErrorCode::TooLarge, message));
                    (protocol::encode(None, &error), true)
                }
                Ok(Frame::Line(line)) => {
                    // Cloned out so the watch's lock is released at once,
                    // not held across the answer.
                    let service = self.services.borrow().clone();
                    if service.needs_names() && !caller.named {
                        caller = named(caller).await;
                    }
                    (service.answer(&caller, &line).await, false)
                }
            };
            // The answer must be taken whole within `request_timeout`: a
            // caller that pipelines requests and never reads would otherwise
            // keep its slots (and its uid's) for as long as it liked, since
            // we stop reading its requests while its answer waits.
            // The write is tried first, so an answer made at the deadline
            // (`unavailable`) still reaches a caller that reads; only one
            // that would block gives up once the deadline has passed.
            let written = tokio::select! {
                biased;
                written = tokio::time::timeout(
                    self.limits.request_timeout,
                    write.write_all(&answer),
                ) => written,
                () = self.shutdown.expired() => {
                    tracing::debug!(
                        peer_uid = caller.uid,
                        "closing a connection whose answer was not taken by the end of the drain"
                    );
                    break;
                }
            };
            match written {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(peer_uid = caller.uid, "connection write failed: {e}");
                    break;
                }
                Err(_) => {
                    tracing::debug!(
                        peer_uid = caller.uid,
                        "closing a connection that did not read its answer in time"
                    );
                    break;
                }
            }
            if close {
                break;
            }
        }
        let _ = write.shutdown().await;
        tracing::trace!(peer_uid = caller.uid, "connection closed");
    }
}

/// `caller` with its user and group names, looked up off the runtime: the
/// look-up may block on NSS. Once per connection, and only when an allow
/// list of the service in force names a user or group.
async fn named(caller: Caller) -> Caller {
    let mut unnamed = caller.clone();
    match tokio::task::spawn_blocking(move || {
        unnamed.resolve_names();
        unnamed
    })
    .await
    {
        Ok(named) => named,
        Err(e) => {
            // Without names only allow_uids can match: safe, and said.
            tracing::warn!(
                peer_uid = caller.uid,
                "failed to look up the caller's names: {e}"
            );
            caller
        }
    }
}

/// One unit read from a connection.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Frame {
    /// A request line without its `\n`; also a final line that ended at EOF.
    Line(BytesMut),
    /// The line passed the limit; the rest of it was not read.
    TooLarge,
    Eof,
    /// Nothing arrived within the idle timeout.
    Idle,
    /// A line began but did not end within the request timeout.
    Slow,
}

/// Reads `\n`-terminated lines holding at most `max` bytes of one line in
/// memory, and says `TooLarge` as soon as a line passes the limit rather
/// than waiting for its end.
pub(crate) struct LineReader<R> {
    inner: R,
    buf: BytesMut,
    /// How far `buf` has been searched for `\n`, so a slowly arriving long
    /// line is scanned once, not once per read.
    scanned: usize,
    max: usize,
    eof: bool,
    /// When the first byte of the line in `buf` arrived.
    line_started: Option<Instant>,
}

impl<R: AsyncRead + Unpin> LineReader<R> {
    pub(crate) fn new(inner: R, max: usize) -> Self {
        LineReader {
            inner,
            buf: BytesMut::new(),
            scanned: 0,
            max,
            eof: false,
            line_started: None,
        }
    }

    /// The next frame. Waiting for a line to begin ends after `idle`; a
    /// line that has begun must end within `whole` of its first byte.
    pub(crate) async fn next(&mut self, idle: Duration, whole: Duration) -> io::Result<Frame> {
        let idle_deadline = Instant::now() + idle;
        loop {
            if let Some(pos) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
                let end = self.scanned + pos;
                if end > self.max {
                    return Ok(Frame::TooLarge);
                }
                let mut line = self.buf.split_to(end + 1);
                line.truncate(end);
                self.scanned = 0;
                // A pipelined next line gets its own full window.
                self.line_started = (!self.buf.is_empty()).then(Instant::now);
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
            let (deadline, expired) = match self.line_started {
                Some(started) => (started + whole, Frame::Slow),
                None => (idle_deadline, Frame::Idle),
            };
            // Read no further than one byte past the limit.
            let room = self.max + 1 - self.buf.len();
            let mut chunk = (&mut self.inner).take(room.min(16 * 1024) as u64);
            match tokio::time::timeout_at(deadline, chunk.read_buf(&mut self.buf)).await {
                Err(_) => return Ok(expired),
                Ok(read) => {
                    if read? == 0 {
                        self.eof = true;
                    } else if self.line_started.is_none() {
                        self.line_started = Some(Instant::now());
                    }
                }
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
            let frame = reader.next(LONG, LONG).await.unwrap();
            let stop = matches!(frame, Frame::Eof | Frame::TooLarge);
            out.push(frame);
            if stop {
                return out;
            }
        }
    }

    const LONG: Duration = Duration::from_secs(3600);

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
        assert_eq!(reader.next(LONG, LONG).await.unwrap(), Frame::TooLarge);
        assert!(reader.buf.len() <= 1001);
    }

    #[tokio::test(start_paused = true)]
    async fn idle_and_slow_drip_are_timed_separately() {
        let idle = Duration::from_secs(30);
        let whole = Duration::from_secs(10);
        // Nothing at all: idle after 30 s.
        let (_client, server) = tokio::io::duplex(64);
        let mut reader = LineReader::new(server, 1000);
        let started = Instant::now();
        assert_eq!(reader.next(idle, whole).await.unwrap(), Frame::Idle);
        assert_eq!(started.elapsed(), idle);
        // Half a line: slow 10 s after its first byte, however the wait began.
        let (mut client, server) = tokio::io::duplex(64);
        let mut reader = LineReader::new(server, 1000);
        let started = Instant::now();
        let drip = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            client.write_all(b"{\"op\":").await.unwrap();
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(client);
        });
        assert_eq!(reader.next(idle, whole).await.unwrap(), Frame::Slow);
        assert_eq!(started.elapsed(), Duration::from_secs(15));
        drip.abort();
    }
}
