//! The socket server: binding the socket, the accept loop with its
//! connection limit, and one handler per connection that reads bounded
//! lines, answers them in order and stops between requests at shutdown.
//!
//! Every wait on a caller is bounded, reading and writing alike: a caller
//! that sends nothing, drips a line, or stops reading its answers is closed,
//! and its connection slots go to others. What a caller can make tokend
//! hold is bounded in bytes too, per connection and per uid
//! ([`crate::unread`] says how).
//!
//! What a request means is [`crate::service`]'s business; this module moves
//! bytes and enforces limits. The service is looked up afresh for every
//! request, so a reload's new configuration answers the next request even
//! on a connection opened before it.

use std::future::Future;
use std::io::{self, IoSlice};
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{watch, Semaphore};
use tokio::time::{Instant, Sleep};
use tokio_util::task::TaskTracker;
use zeroize::Zeroizing;

use crate::config::DaemonConfig;
use crate::metrics::{self, BusyLimit};
use crate::peer::{self, Caller};
use crate::protocol::{self, ErrorBody, ErrorCode, Response};
use crate::service::Service;
use crate::shutdown::Shutdown;
use crate::unread::{Held, Trimmer, Unread};

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
    /// Answer bytes one connection's batch may hold beyond its first
    /// answer: a batch is cut here and written before more requests are read.
    pub(crate) max_unread_bytes: usize,
    /// Answer bytes a uid's connections may hold while their writes wait;
    /// past it each connection of the uid gets one answer per batch.
    pub(crate) max_unread_bytes_per_uid: usize,
}

impl From<&DaemonConfig> for Limits {
    fn from(daemon: &DaemonConfig) -> Self {
        Limits {
            max_connections: daemon.max_connections,
            max_connections_per_uid: daemon.max_connections_per_uid,
            idle_timeout: daemon.idle_timeout,
            request_timeout: daemon.request_timeout_client,
            max_request_bytes: daemon.max_request_bytes,
            max_unread_bytes: daemon.max_unread_bytes,
            max_unread_bytes_per_uid: daemon.max_unread_bytes_per_uid,
        }
    }
}

/// Open connections per uid, and the answer bytes they hold unwritten.
/// Entries leave the map when their count drops to zero, so it holds at
/// most one entry per open connection.
struct PerUid {
    counts: std::sync::Mutex<std::collections::HashMap<u32, UidEntry>>,
    /// Given to each uid's count, which asks it to return freed memory.
    trimmer: Arc<Trimmer>,
}

struct UidEntry {
    connections: usize,
    unread: Arc<Unread>,
}

/// One connection's place in [`PerUid`]; gives it back on drop.
struct UidSlot {
    per_uid: Arc<PerUid>,
    uid: u32,
    /// The uid's count of held answer bytes, shared by its connections.
    unread: Arc<Unread>,
}

impl PerUid {
    fn new(trimmer: Arc<Trimmer>) -> PerUid {
        PerUid {
            counts: std::sync::Mutex::default(),
            trimmer,
        }
    }

    /// A place for `uid`, unless it already holds `limit` connections.
    fn take(self: &Arc<Self>, uid: u32, limit: usize) -> Option<UidSlot> {
        let mut counts = self
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = counts.entry(uid).or_insert_with(|| UidEntry {
            connections: 0,
            unread: Arc::new(Unread::new(self.trimmer.clone())),
        });
        if entry.connections >= limit {
            return None;
        }
        entry.connections += 1;
        Some(UidSlot {
            per_uid: self.clone(),
            uid,
            unread: entry.unread.clone(),
        })
    }
}

impl Drop for UidSlot {
    fn drop(&mut self) {
        let mut counts = self
            .per_uid
            .counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(entry) = counts.get_mut(&self.uid) {
            entry.connections -= 1;
            if entry.connections == 0 {
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
    let trimmer = Arc::new(Trimmer::default());
    connections.spawn(trimmer.clone().run({
        let shutdown = shutdown.clone();
        async move { shutdown.stopping().await }
    }));
    Acceptor {
        listener,
        services,
        limits,
        shutdown: shutdown.clone(),
        connections: connections.clone(),
        per_uid: Arc::new(PerUid::new(trimmer)),
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
    per_uid: Arc<PerUid>,
}

impl Acceptor {
    /// Accepts until the shutdown begins; every connection runs in a task
    /// tracked by `connections`.
    async fn run(self) {
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
            let Some(uid_slot) = self.per_uid.take(uid, self.limits.max_connections_per_uid) else {
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
                uid_slot,
            };
            let open = metrics::connection_opened();
            self.connections.spawn(async move {
                handler.run(stream, caller).await;
                drop((permit, open));
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
    /// The connection's place among its uid's, with the uid's count of
    /// answer bytes held for callers that have not read them.
    uid_slot: UidSlot,
}

/// The most answers written with one `writev`: enough that a pipelining
/// caller costs one write per batch rather than one per answer, few enough
/// that the iovec array stays on the stack (Linux allows 1024).
const MAX_BATCH: usize = 64;

/// Answers made but not yet written, oldest first. Each is its own wiped
/// buffer, written in place by a vectored write: gathering them into one
/// growing buffer would leave copies of tokens behind in freed memory.
#[derive(Default)]
struct Outbox {
    answers: Vec<Zeroizing<Vec<u8>>>,
    /// The memory they hold, summed as they come: the batch's size against
    /// the byte bounds without a second pass.
    bytes: usize,
}

impl Outbox {
    fn push(&mut self, answer: Zeroizing<Vec<u8>>) {
        // Capacity, not length: what the answer keeps from the system.
        self.bytes += answer.capacity();
        self.answers.push(answer);
    }

    /// Wipes and frees the answers, keeping the list's few pointers of room.
    fn clear(&mut self) {
        self.answers.clear();
        self.bytes = 0;
    }
}

/// Why a connection ends while answers are written.
enum Closed {
    Io(io::Error),
    /// The answers were not taken within `request_timeout`.
    Stalled,
    /// The shutdown's answer deadline passed first.
    Expired,
}

impl Handler {
    async fn run(self, stream: UnixStream, mut caller: Caller) {
        let uid = caller.uid;
        tracing::debug!(peer_uid = uid, peer_pid = caller.pid, "connection opened");
        let (read, mut write) = stream.into_split();
        let mut lines = LineReader::new(read, self.limits.max_request_bytes);
        let mut outbox = Outbox::default();
        // Both shutdown phases are watched through one future each for the
        // whole connection: registered once, not once per request.
        let stopping = self.shutdown.stopping();
        tokio::pin!(stopping);
        let expired = self.shutdown.expired();
        tokio::pin!(expired);
        'connection: loop {
            let frame = tokio::select! {
                // Between requests, stopping comes first: nothing is lost
                // by stopping here, and a pipelined request read now would
                // be work begun after the shutdown began.
                biased;
                () = &mut stopping => break,
                frame = lines.next(self.limits.idle_timeout, self.limits.request_timeout) => frame,
            };
            let mut frame = match frame {
                Ok(Frame::Idle) => {
                    tracing::debug!(peer_uid = uid, "closing an idle connection");
                    break;
                }
                Ok(Frame::Slow) => {
                    tracing::debug!(
                        peer_uid = uid,
                        "closing a connection whose request line did not arrive in time"
                    );
                    break;
                }
                Err(e) => {
                    tracing::debug!(peer_uid = uid, "connection read failed: {e}");
                    break;
                }
                Ok(Frame::Eof) => break,
                Ok(frame) => frame,
            };
            // This request and every whole one already read behind it are
            // answered in order, and the answers written together: a
            // pipelining caller costs one write per batch. The batch is
            // also cut at its byte room, and no request is read while it
            // waits to be written: that is the bound on what one caller
            // can make tokend hold.
            let room = self.room();
            let mut close = false;
            loop {
                let line = match frame {
                    Frame::Line(line) => line,
                    // Idle, Slow and Eof come only from waiting: not here.
                    _ => {
                        outbox.push(self.too_large());
                        close = true;
                        break;
                    }
                };
                // Boxed: an answer's future (the service, the cache, a
                // reload) is the largest part of a connection's task, and
                // inline it would be carried by every idle connection too.
                let mut answering = Box::pin(self.answer(&mut caller, &line));
                let answer = match now_or_never(answering.as_mut()).await {
                    Some(answer) => answer,
                    None => {
                        // This one waits (on the issuer, a reload, a name
                        // look-up): the answers before it go out now
                        // rather than wait with it.
                        if !self
                            .flush(&mut outbox, &mut write, expired.as_mut(), uid)
                            .await
                        {
                            break 'connection;
                        }
                        answering.await
                    }
                };
                outbox.push(answer);
                if outbox.answers.len() >= MAX_BATCH || outbox.bytes >= room {
                    break;
                }
                // A buffered request costs no I/O, so nothing else would
                // count it against the task's cooperative budget: one
                // connection's flood would then keep its worker for
                // thousands of answers while other connections wait.
                self.take_turns(&outbox).await;
                if now_or_never(stopping.as_mut()).await.is_some() {
                    // Answer what was answered, then stop between requests.
                    close = true;
                    break;
                }
                match lines.buffered() {
                    Some(next) => frame = next,
                    None => break,
                }
            }
            if !self
                .flush(&mut outbox, &mut write, expired.as_mut(), uid)
                .await
                || close
            {
                break;
            }
        }
        let _ = write.shutdown().await;
        tracing::trace!(peer_uid = uid, "connection closed");
    }

    /// One request line's answer, from the service in force now.
    async fn answer(&self, caller: &mut Caller, line: &[u8]) -> Zeroizing<Vec<u8>> {
        // Cloned out so the watch's lock is released at once, not held
        // across the answer.
        let service = self.services.borrow().clone();
        if service.needs_names() && !caller.named {
            *caller = named(caller.clone()).await;
        }
        service.answer(caller, line).await
    }

    /// The bytes this connection's next batch may hold beyond its first
    /// answer: its own bound, or what is left of its uid's, whichever is
    /// less. With none left the batch is one answer, which the caller must
    /// read before its next request is read.
    fn room(&self) -> usize {
        let left = self
            .limits
            .max_unread_bytes_per_uid
            .saturating_sub(self.uid_slot.unread.held());
        self.limits.max_unread_bytes.min(left)
    }

    fn too_large(&self) -> Zeroizing<Vec<u8>> {
        let message = format!(
            "request line is longer than max_request_bytes ({})",
            self.limits.max_request_bytes
        );
        protocol::encode(
            None,
            &Response::Error(ErrorBody::new(ErrorCode::TooLarge, message)),
        )
    }

    /// Writes every answer in `outbox` and wipes them; false when the
    /// connection must end instead.
    async fn flush(
        &self,
        outbox: &mut Outbox,
        write: &mut OwnedWriteHalf,
        expired: Pin<&mut impl Future<Output = ()>>,
        uid: u32,
    ) -> bool {
        if outbox.answers.is_empty() {
            return true;
        }
        let (written, held) = self.write_or_wait(outbox, write, expired).await;
        outbox.clear();
        // Released after the answers are freed: its drop may ask for the
        // freed memory to be returned to the system.
        drop(held);
        match written {
            Ok(()) => true,
            Err(Closed::Io(e)) => {
                tracing::debug!(peer_uid = uid, "connection write failed: {e}");
                false
            }
            Err(Closed::Stalled) => {
                tracing::debug!(
                    peer_uid = uid,
                    "closing a connection that did not read its answer in time"
                );
                false
            }
            Err(Closed::Expired) => {
                tracing::debug!(
                    peer_uid = uid,
                    "closing a connection whose answer was not taken by the end of the drain"
                );
                false
            }
        }
    }

    /// Counts one unit of the task's cooperative budget, and when it is
    /// spent gives the worker to other tasks. The answers in hand count
    /// against the uid while this task waits for its turn: like a write
    /// that waits, this is a wait on which other connections may answer.
    async fn take_turns(&self, outbox: &Outbox) {
        let mut spend = std::pin::pin!(tokio::task::consume_budget());
        if now_or_never(spend.as_mut()).await.is_none() {
            let _held = self.uid_slot.unread.hold(outbox.bytes);
            spend.await;
        }
    }

    /// Writes the batch at once if the socket takes it; otherwise counts it
    /// against the uid (the returned guard) while the write waits, and
    /// gives up after `request_timeout` or at the drain's deadline.
    async fn write_or_wait<'a>(
        &'a self,
        outbox: &Outbox,
        write: &mut OwnedWriteHalf,
        expired: Pin<&mut impl Future<Output = ()>>,
    ) -> (Result<(), Closed>, Option<Held<'a>>) {
        let writing = write_answers(write, &outbox.answers);
        tokio::pin!(writing);
        if let Some(written) = now_or_never(writing.as_mut()).await {
            return (written, None);
        }
        let held = self.uid_slot.unread.hold(outbox.bytes);
        // The answers must be taken whole within `request_timeout`: a
        // caller that pipelines requests and never reads would otherwise
        // keep its slots (and its uid's) for as long as it liked, since we
        // stop reading its requests while its answers wait.
        // The write was tried first, so an answer made at the deadline
        // (`unavailable`) still reaches a caller that reads; only one that
        // would block gives up once the deadline has passed.
        let written = tokio::select! {
            biased;
            written = tokio::time::timeout(self.limits.request_timeout, writing)
                => written.unwrap_or(Err(Closed::Stalled)),
            () = expired => Err(Closed::Expired),
        };
        (written, Some(held))
    }
}

/// Writes `answers` whole, in order, with as few writes as the socket
/// allows: one `writev` for the lot when its buffer has room.
async fn write_answers(
    write: &mut OwnedWriteHalf,
    answers: &[Zeroizing<Vec<u8>>],
) -> Result<(), Closed> {
    if let [one] = answers {
        return write.write_all(one).await.map_err(Closed::Io);
    }
    // The first answer not wholly written, and how much of it was.
    let (mut first, mut offset) = (0, 0);
    std::future::poll_fn(|cx| {
        while first < answers.len() {
            // Built afresh on each poll, so the iovec array lives on the
            // stack of the poll and not in every connection's task.
            let mut slices = [IoSlice::new(&[]); MAX_BATCH];
            let mut count = 0;
            for (slot, answer) in slices.iter_mut().zip(&answers[first..]) {
                let start = if count == 0 { offset } else { 0 };
                *slot = IoSlice::new(&answer[start..]);
                count += 1;
            }
            let mut written = match Pin::new(&mut *write).poll_write_vectored(cx, &slices[..count])
            {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(Closed::Io(e))),
                Poll::Ready(Ok(0)) => {
                    return Poll::Ready(Err(Closed::Io(io::ErrorKind::WriteZero.into())))
                }
                Poll::Ready(Ok(n)) => n,
            };
            while first < answers.len() && written >= answers[first].len() - offset {
                written -= answers[first].len() - offset;
                first += 1;
                offset = 0;
            }
            offset += written;
        }
        Poll::Ready(Ok(()))
    })
    .await
}

/// Polls `future` once: its output if it is ready at once, else `None`,
/// leaving it to be awaited later.
async fn now_or_never<F: Future + ?Sized>(mut future: Pin<&mut F>) -> Option<F::Output> {
    std::future::poll_fn(|cx| {
        Poll::Ready(match future.as_mut().poll(cx) {
            Poll::Ready(output) => Some(output),
            Poll::Pending => None,
        })
    })
    .await
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

/// A byte source that can say when a read would not block, so that a
/// connection holds no read buffer while it waits (10,000 idle connections
/// would otherwise hold 10,000 buffers).
pub(crate) trait Source: AsyncRead + Unpin {
    /// Whether [`Source::poll_readable`] means anything; in-memory sources
    /// (tests) are simply read.
    const SAYS_READABLE: bool = false;

    /// Ready once a read may not block; like epoll, it can be wrong, and a
    /// read that then blocks makes the wait start again.
    fn poll_readable(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl Source for OwnedReadHalf {
    const SAYS_READABLE: bool = true;

    fn poll_readable(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let stream: &UnixStream = (*self).as_ref();
        stream.poll_read_ready(cx)
    }
}

/// How much is read at a time: a pipelining caller's requests come in a
/// few reads, and the buffer, taken only once data is there, is given back
/// when the connection goes idle.
const READ_CHUNK: usize = 8 * 1024;

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
    /// The connection's one timer, made at its first wait. It is moved
    /// earlier when a wait's deadline is earlier, but never later: a
    /// timer left at a past request's deadline fires, finds the wait's
    /// real deadline still ahead, and is moved on then. So a busy
    /// connection touches the timer wheel about once per idle timeout,
    /// not twice per request.
    timer: Option<Pin<Box<Sleep>>>,
}

impl<R: Source> LineReader<R> {
    pub(crate) fn new(inner: R, max: usize) -> Self {
        LineReader {
            inner,
            buf: BytesMut::new(),
            scanned: 0,
            max,
            eof: false,
            line_started: None,
            timer: None,
        }
    }

    /// The next frame. Waiting for a line to begin ends after `idle`; a
    /// line that has begun must end within `whole` of its first byte.
    pub(crate) async fn next(&mut self, idle: Duration, whole: Duration) -> io::Result<Frame> {
        let idle_deadline = Instant::now() + idle;
        loop {
            if let Some(frame) = self.buffered() {
                return Ok(frame);
            }
            if self.eof {
                return Ok(if self.buf.is_empty() {
                    Frame::Eof
                } else {
                    self.scanned = 0;
                    Frame::Line(self.buf.split())
                });
            }
            if self.line_started.is_none() && !self.buf.is_empty() {
                // The rest of a pipelined line: its window opens now, when
                // it is waited for, not when the line before it was taken
                // (which may have waited on the issuer since).
                self.line_started = Some(Instant::now());
            }
            let (deadline, expired) = match self.line_started {
                Some(started) => (started + whole, Frame::Slow),
                None => (idle_deadline, Frame::Idle),
            };
            match self.fill(deadline).await? {
                None => return Ok(expired),
                Some(0) => self.eof = true,
                Some(_) if self.line_started.is_none() => self.line_started = Some(Instant::now()),
                Some(_) => {}
            }
        }
    }

    /// A whole line (or `TooLarge`) from what was already read, without
    /// reading more: how a handler finds pipelined requests to answer in
    /// the same batch.
    pub(crate) fn buffered(&mut self) -> Option<Frame> {
        if let Some(pos) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
            let end = self.scanned + pos;
            if end > self.max {
                return Some(Frame::TooLarge);
            }
            let mut line = self.buf.split_to(end + 1);
            line.truncate(end);
            self.scanned = 0;
            // A pipelined next line gets its own full window, opened when
            // `next` has to wait for its end.
            self.line_started = None;
            return Some(Frame::Line(line));
        }
        self.scanned = self.buf.len();
        (self.buf.len() > self.max).then_some(Frame::TooLarge)
    }

    /// Reads once, waiting no later than `deadline`: the bytes read (0 at
    /// EOF), or `None` if the deadline came first.
    async fn fill(&mut self, deadline: Instant) -> io::Result<Option<usize>> {
        if self.buf.is_empty() {
            // Give back the last batch's buffer before a wait that may be
            // long; the next read takes one when data is there.
            self.buf = BytesMut::new();
        }
        let timer = self
            .timer
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if timer.deadline() > deadline {
            timer.as_mut().reset(deadline);
        }
        loop {
            tokio::select! {
                biased;
                read = read_some(&mut self.inner, &mut self.buf, self.max) => return read.map(Some),
                () = timer.as_mut() => {
                    if Instant::now() >= deadline {
                        return Ok(None);
                    }
                    timer.as_mut().reset(deadline);
                }
            }
        }
    }
}

/// Waits until `inner` has data, then reads what fits into `buf`, never
/// past one byte over the line limit `max`.
async fn read_some<R: Source>(inner: &mut R, buf: &mut BytesMut, max: usize) -> io::Result<usize> {
    // Read no further than one byte past the limit.
    let room = (max + 1).saturating_sub(buf.len()).min(READ_CHUNK);
    if !R::SAYS_READABLE {
        buf.reserve(room);
        return inner.take(room as u64).read_buf(buf).await;
    }
    loop {
        std::future::poll_fn(|cx| inner.poll_readable(cx)).await?;
        buf.reserve(room);
        let mut chunk = (&mut *inner).take(room as u64);
        let reading = chunk.read_buf(buf);
        tokio::pin!(reading);
        if let Some(read) = now_or_never(reading).await {
            return read;
        }
        // Readiness said yes and the read said no (it does so once for
        // every new connection: strace shows one recvfrom with EAGAIN
        // each): wait again without the buffer.
        if buf.is_empty() {
            *buf = BytesMut::new();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Source for &[u8] {}
    impl Source for tokio::io::DuplexStream {}
    impl Source for tokio::io::Repeat {}

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
