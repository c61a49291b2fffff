//! What systemd hands tokend and what tokend tells it back: `sd_notify`
//! messages over `$NOTIFY_SOCKET` (readiness, reload, stopping, status,
//! watchdog), the watchdog interval from `$WATCHDOG_USEC`, a listening socket
//! passed by socket activation (`$LISTEN_FDS`), and whether stderr is the
//! journal (`$JOURNAL_STREAM`).
//!
//! The protocol is a few lines of text in a datagram, so it is written here
//! rather than linked from libsystemd. This module only reads the
//! environment and talks to systemd; when to say what is
//! [`crate::daemon`]'s business, and the logging set-up that uses
//! [`stderr_is_journal`] is there too. Outside systemd the variables are
//! unset and nothing here finds or sends anything.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{SocketAddr, UnixDatagram, UnixListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nix::sys::socket::{getsockopt, sockopt, SockType};

use crate::cache::CacheSummary;

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: i32 = 3;

/// How long one notification may wait for room in systemd's queue. systemd
/// reads its socket promptly; a receiver that does not must not stall us.
const SEND_TIMEOUT: Duration = Duration::from_secs(1);

/// Sends `sd_notify` messages to the socket in `$NOTIFY_SOCKET`, or nowhere
/// when it is unset.
#[derive(Debug)]
pub(crate) struct Notifier {
    addr: Option<SocketAddr>,
    /// Set after the first failed send, so a gone receiver costs one
    /// warning rather than one per watchdog tick.
    warned: AtomicBool,
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`. An address that is neither absolute nor
    /// abstract is logged and ignored, as libsystemd does.
    pub(crate) fn from_env() -> Notifier {
        let addr = match std::env::var_os("NOTIFY_SOCKET") {
            None => None,
            Some(value) => match notify_address(value.as_encoded_bytes()) {
                Ok(addr) => Some(addr),
                Err(e) => {
                    tracing::warn!("ignoring NOTIFY_SOCKET: {e}");
                    None
                }
            },
        };
        Notifier {
            addr,
            warned: AtomicBool::new(false),
        }
    }

    pub(crate) fn is_enabled(&self) -> bool {
        self.addr.is_some()
    }

    /// Sends one message: newline-separated `NAME=value` assignments.
    /// Failures are logged, never returned: systemd's bookkeeping must not
    /// take the daemon down.
    pub(crate) async fn notify(&self, message: &str) {
        let Some(addr) = &self.addr else { return };
        // A fresh socket per message, as libsystemd does: a socket connected
        // once would keep pointing at the old receiver after systemd
        // re-executes itself and binds its socket anew.
        let sent = async {
            let socket = UnixDatagram::unbound()?;
            socket.connect_addr(addr)?;
            socket.set_nonblocking(true)?;
            let socket = tokio::net::UnixDatagram::from_std(socket)?;
            socket.send(message.as_bytes()).await
        };
        let result = match tokio::time::timeout(SEND_TIMEOUT, sent).await {
            Ok(result) => result.map(drop),
            Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")),
        };
        match result {
            Ok(()) => self.warned.store(false, Ordering::Relaxed),
            Err(e) => {
                let first = message.lines().next().unwrap_or_default();
                if self.warned.swap(true, Ordering::Relaxed) {
                    tracing::debug!("failed to notify systemd ({first}): {e}");
                } else {
                    tracing::warn!("failed to notify systemd ({first}): {e}");
                }
            }
        }
    }
}

/// Parses `$NOTIFY_SOCKET`: an absolute path, or `@name` for an abstract
/// address.
pub(crate) fn notify_address(value: &[u8]) -> io::Result<SocketAddr> {
    match value {
        [b'@', name @ ..] => SocketAddr::from_abstract_name(name),
        [b'/', ..] => {
            let text = std::str::from_utf8(value)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "not UTF-8"))?;
            SocketAddr::from_pathname(text)
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not an absolute path or an @abstract address",
        )),
    }
}

/// `READY=1` with a status line.
pub(crate) fn ready(status: &str) -> String {
    format!("READY=1\nSTATUS={status}")
}

/// `RELOADING=1` stamped with `CLOCK_MONOTONIC` in microseconds, which
/// systemd needs to tell this reload from an older one.
pub(crate) fn reloading() -> String {
    format!("RELOADING=1\nMONOTONIC_USEC={}", monotonic_usec())
}

pub(crate) const STOPPING: &str = "STOPPING=1\nSTATUS=stopping";
pub(crate) const WATCHDOG: &str = "WATCHDOG=1";

/// `CLOCK_MONOTONIC` in microseconds, the clock systemd compares with.
pub(crate) fn monotonic_usec() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(now) => {
            let secs = u64::try_from(now.tv_sec()).unwrap_or_default();
            let nanos = u64::try_from(now.tv_nsec()).unwrap_or_default();
            secs.saturating_mul(1_000_000).saturating_add(nanos / 1_000)
        }
        // CLOCK_MONOTONIC exists on every Linux; 0 tells systemd "unknown".
        Err(_) => 0,
    }
}

/// How often to send `WATCHDOG=1`: half of `$WATCHDOG_USEC`, when the
/// watchdog is on and meant for this process.
pub(crate) fn watchdog_interval() -> Option<Duration> {
    let usec = std::env::var("WATCHDOG_USEC").ok();
    let pid = std::env::var("WATCHDOG_PID").ok();
    watchdog_interval_from(usec.as_deref(), pid.as_deref(), std::process::id())
}

fn watchdog_interval_from(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    let usec: u64 = usec?.parse().ok().filter(|&u| u > 0)?;
    // Unset WATCHDOG_PID means "you"; set, it must be us (not a parent that
    // passed its environment on).
    if pid.is_some_and(|p| p.parse::<u32>().ok() != Some(me)) {
        return None;
    }
    Some(Duration::from_micros(usec / 2))
}

/// The one-line state `systemctl status` shows, such as
/// "3 keys, 5 tokens fresh, 1 failing: payments (500 from issuer)".
pub(crate) fn status_line(summary: &CacheSummary) -> String {
    let plural =
        |n: usize, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let mut line = format!(
        "{}, {} fresh",
        plural(summary.keys, "key", "keys"),
        plural(summary.fresh, "token", "tokens")
    );
    if !summary.failing.is_empty() {
        let failing: Vec<String> = summary
            .failing
            .iter()
            .map(|(key, why)| format!("{key} ({why})"))
            .collect();
        line.push_str(&format!(
            ", {} failing: {}",
            summary.failing.len(),
            failing.join(", ")
        ));
    }
    line
}

/// Why a socket systemd passed cannot be used.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ActivationError {
    #[error("LISTEN_FDS={0:?} is not a number")]
    BadCount(String),
    #[error(
        "systemd passed {0} sockets; tokend serves exactly one (one ListenStream= in tokend.socket)"
    )]
    TooMany(usize),
    #[error("the descriptor systemd passed is not a listening Unix stream socket{0}")]
    NotAUnixListener(&'static str),
    #[error("failed to take the socket systemd passed: {0}")]
    Io(#[from] io::Error),
}

/// Set once fd 3 has been wrapped, so it is never owned twice.
static TAKEN: AtomicBool = AtomicBool::new(false);

/// The listening socket systemd passed (`$LISTEN_FDS`, `$LISTEN_PID`), or
/// `None` when tokend was not socket-activated. Call once, before anything
/// else could mistake descriptor 3 for its own.
///
/// The variables are left in the environment: tokend starts no children
/// that could inherit them, and changing the environment of a running
/// multi-threaded process races with other threads reading it.
pub(crate) fn listener() -> Result<Option<UnixListener>, ActivationError> {
    let fds = std::env::var("LISTEN_FDS").ok();
    let pid = std::env::var("LISTEN_PID").ok();
    let count = passed_count(fds.as_deref(), pid.as_deref(), std::process::id())?;
    if count == 0 || TAKEN.swap(true, Ordering::SeqCst) {
        return Ok(None);
    }
    // SAFETY: LISTEN_PID names this process, so systemd (or
    // systemd-socket-activate) opened descriptor 3 for us and nothing in
    // this process owns it: descriptors are handed out lowest-first, so no
    // file opened here can have number 3 while it is open, and `TAKEN`
    // makes this the only place that wraps it.
    let fd = unsafe { OwnedFd::from_raw_fd(LISTEN_FDS_START) };
    check_listener(fd.as_fd())?;
    // systemd passes descriptors without close-on-exec.
    nix::fcntl::fcntl(
        LISTEN_FDS_START,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    )
    .map_err(io::Error::from)?;
    let listener = UnixListener::from(fd);
    listener.set_nonblocking(true)?;
    Ok(Some(listener))
}

fn passed_count(fds: Option<&str>, pid: Option<&str>, me: u32) -> Result<usize, ActivationError> {
    // Not for us: unset, or inherited from a parent that was activated.
    if pid.and_then(|p| p.parse::<u32>().ok()) != Some(me) {
        return Ok(0);
    }
    let Some(fds) = fds else { return Ok(0) };
    let count: usize = fds
        .parse()
        .map_err(|_| ActivationError::BadCount(fds.to_owned()))?;
    if count > 1 {
        return Err(ActivationError::TooMany(count));
    }
    Ok(count)
}

fn check_listener(fd: BorrowedFd<'_>) -> Result<(), ActivationError> {
    let kind = getsockopt(&fd, sockopt::SockType)
        .map_err(|_| ActivationError::NotAUnixListener(" (not a socket)"))?;
    if kind != SockType::Stream {
        return Err(ActivationError::NotAUnixListener(
            " (not a stream socket: use ListenStream=)",
        ));
    }
    if !getsockopt(&fd, sockopt::AcceptConn).map_err(io::Error::from)? {
        return Err(ActivationError::NotAUnixListener(" (not listening)"));
    }
    let addr: nix::sys::socket::SockaddrStorage =
        nix::sys::socket::getsockname(std::os::fd::AsRawFd::as_raw_fd(&fd))
            .map_err(io::Error::from)?;
    if addr.as_unix_addr().is_none() {
        return Err(ActivationError::NotAUnixListener(" (not AF_UNIX)"));
    }
    Ok(())
}

/// Where a passed socket lives, for the log.
pub(crate) fn listener_path(listener: &UnixListener) -> String {
    match listener.local_addr() {
        Ok(addr) => match (addr.as_pathname(), addr.as_abstract_name()) {
            (Some(path), _) => path.display().to_string(),
            (None, Some(name)) => format!("@{}", String::from_utf8_lossy(name)),
            (None, None) => "an unnamed socket".to_owned(),
        },
        Err(_) => "an unknown address".to_owned(),
    }
}

/// Is stderr the journal? systemd sets `$JOURNAL_STREAM` to the device and
/// inode of the stream it connected stdout and stderr to; when stderr is
/// still that stream (not redirected by a wrapper), logs should go to
/// journald natively, with fields, rather than as lines of text.
pub(crate) fn stderr_is_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let stderr = std::io::stderr();
    let Ok(fd) = stderr.as_fd().try_clone_to_owned() else {
        return false;
    };
    match std::fs::File::from(fd).metadata() {
        Ok(meta) => journal_stream_matches(value.as_encoded_bytes(), meta.dev(), meta.ino()),
        Err(_) => false,
    }
}

fn journal_stream_matches(value: &[u8], dev: u64, ino: u64) -> bool {
    let Ok(text) = std::str::from_utf8(value) else {
        return false;
    };
    let Some((d, i)) = text.split_once(':') else {
        return false;
    };
    d.parse::<u64>().ok() == Some(dev) && i.parse::<u64>().ok() == Some(ino)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn notify_addresses() {
        let abs = notify_address(b"@/org/freedesktop/systemd1/notify/42").unwrap();
        assert_eq!(
            abs.as_abstract_name(),
            Some(&b"/org/freedesktop/systemd1/notify/42"[..])
        );
        let path = notify_address(b"/run/systemd/notify").unwrap();
        assert_eq!(path.as_pathname(), Some(Path::new("/run/systemd/notify")));
        assert!(notify_address(b"relative/notify").is_err());
        assert!(notify_address(b"").is_err());
    }

    #[test]
    fn watchdog_is_half_the_timeout_and_only_for_us() {
        let half = Some(Duration::from_millis(500));
        assert_eq!(watchdog_interval_from(Some("1000000"), None, 7), half);
        assert_eq!(watchdog_interval_from(Some("1000000"), Some("7"), 7), half);
        assert_eq!(watchdog_interval_from(Some("1000000"), Some("8"), 7), None);
        assert_eq!(watchdog_interval_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_interval_from(Some("soon"), None, 7), None);
        assert_eq!(watchdog_interval_from(None, Some("7"), 7), None);
    }

    #[test]
    fn passed_sockets_count_only_for_our_pid() {
        assert_eq!(passed_count(Some("1"), Some("7"), 7).unwrap(), 1);
        assert_eq!(passed_count(Some("1"), Some("8"), 7).unwrap(), 0);
        assert_eq!(passed_count(Some("1"), None, 7).unwrap(), 0);
        assert_eq!(passed_count(None, Some("7"), 7).unwrap(), 0);
        assert_eq!(passed_count(Some("0"), Some("7"), 7).unwrap(), 0);
        assert!(matches!(
            passed_count(Some("2"), Some("7"), 7),
            Err(ActivationError::TooMany(2))
        ));
        assert!(matches!(
            passed_count(Some("x"), Some("7"), 7),
            Err(ActivationError::BadCount(_))
        ));
    }

    #[test]
    fn journal_stream_is_device_colon_inode() {
        assert!(journal_stream_matches(b"8:12345", 8, 12345));
        assert!(!journal_stream_matches(b"8:12345", 8, 12346));
        assert!(!journal_stream_matches(b"9:12345", 8, 12345));
        assert!(!journal_stream_matches(b"812345", 8, 12345));
        assert!(!journal_stream_matches(b"", 8, 12345));
    }

    #[test]
    fn status_lines() {
        let mut summary = CacheSummary {
            keys: 3,
            fresh: 5,
            failing: vec![("payments".into(), "500 from issuer".into())],
            ..CacheSummary::default()
        };
        assert_eq!(
            status_line(&summary),
            "3 keys, 5 tokens fresh, 1 failing: payments (500 from issuer)"
        );
        summary.failing.push(("cards".into(), "timed out".into()));
        assert_eq!(
            status_line(&summary),
            "3 keys, 5 tokens fresh, 2 failing: payments (500 from issuer), cards (timed out)"
        );
        let one = CacheSummary {
            keys: 1,
            fresh: 1,
            ..CacheSummary::default()
        };
        assert_eq!(status_line(&one), "1 key, 1 token fresh");
        assert_eq!(
            status_line(&CacheSummary::default()),
            "0 keys, 0 tokens fresh"
        );
    }

    #[test]
    fn messages() {
        assert_eq!(ready("1 key"), "READY=1\nSTATUS=1 key");
        let reload = reloading();
        let usec: u64 = reload
            .strip_prefix("RELOADING=1\nMONOTONIC_USEC=")
            .unwrap()
            .parse()
            .unwrap();
        assert!(usec > 0);
    }
}
