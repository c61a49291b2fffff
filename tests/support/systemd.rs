//! Stand-ins for what systemd gives a service, used by the daemon harness
//! ([`super::daemon::DaemonBuilder`]) and the tests that read them.
//!
//! [`NotifySocket`] is a datagram socket standing in for systemd's
//! `$NOTIFY_SOCKET` or journald's socket: a thread records every message
//! with its arrival time, and tests await messages (an event, not a
//! sleep). [`journal_fields`] reads a journal entry in journald's native
//! protocol; [`mount_journal`] puts a socket where tokend looks for
//! journald. Starting the daemon itself is the harness's job.
#![allow(dead_code, unreachable_pub)]

use std::ffi::CString;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::daemon::PATIENCE;

/// The `systemd-socket-activate` Debian 12 ships with systemd.
pub const SOCKET_ACTIVATE: &str = "/usr/bin/systemd-socket-activate";

/// A list that grows, and a way to wait for it to.
struct Record<T> {
    items: Mutex<Vec<T>>,
    grew: Condvar,
}

impl<T> Default for Record<T> {
    fn default() -> Self {
        Record {
            items: Mutex::new(Vec::new()),
            grew: Condvar::new(),
        }
    }
}

impl<T: Clone> Record<T> {
    fn push(&self, item: T) {
        self.items.lock().expect("record lock").push(item);
        self.grew.notify_all();
    }

    fn snapshot(&self) -> Vec<T> {
        self.items.lock().expect("record lock").clone()
    }

    /// The first item from index `from` on that `matches`, with its index;
    /// `None` after `patience`.
    fn wait(
        &self,
        from: usize,
        patience: Duration,
        matches: impl Fn(&T) -> bool,
    ) -> Option<(usize, T)> {
        let deadline = Instant::now() + patience;
        let mut items = self.items.lock().expect("record lock");
        loop {
            if let Some((i, item)) = items
                .iter()
                .enumerate()
                .skip(from)
                .find(|(_, m)| matches(m))
            {
                return Some((i, item.clone()));
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            items = self
                .grew
                .wait_timeout(items, deadline - now)
                .expect("record lock")
                .0;
        }
    }
}

/// One datagram as received: an `sd_notify` message or a journal entry.
#[derive(Clone, Debug)]
pub struct Message {
    pub text: String,
    pub bytes: Vec<u8>,
    pub at: Instant,
}

impl Message {
    /// Does it carry this exact `NAME=value` assignment?
    pub fn has(&self, assignment: &str) -> bool {
        self.text.lines().any(|line| line == assignment)
    }

    /// The value of `NAME=`, if assigned.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.text
            .lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix('='))
    }
}

/// A datagram socket standing in for systemd's notification socket or
/// journald's.
pub struct NotifySocket {
    /// What `$NOTIFY_SOCKET` is set to.
    pub address: String,
    messages: Arc<Record<Message>>,
    /// The reader's socket, shut down on drop to end the reader.
    socket: UnixDatagram,
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<()>>,
}

impl NotifySocket {
    /// Binds `dir/notify.sock`.
    pub fn bind_path(dir: &Path) -> NotifySocket {
        NotifySocket::bind_file(&dir.join("notify.sock"))
    }

    pub fn bind_file(path: &Path) -> NotifySocket {
        let socket = UnixDatagram::bind(path).expect("bind the datagram socket");
        NotifySocket::serve(socket, path.display().to_string())
    }

    /// Binds an abstract address, `@` in `$NOTIFY_SOCKET`, as systemd's own
    /// is for services in containers.
    pub fn bind_abstract() -> NotifySocket {
        let name = format!("tokend-test-notify-{}-{}", std::process::id(), unique());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("abstract address");
        let socket = UnixDatagram::bind_addr(&addr).expect("bind the abstract notify socket");
        NotifySocket::serve(socket, format!("@{name}"))
    }

    fn serve(socket: UnixDatagram, address: String) -> NotifySocket {
        let messages = Arc::new(Record::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (sink, done) = (messages.clone(), stop.clone());
        let reading = socket.try_clone().expect("clone the datagram socket");
        // The reader blocks until a message comes or the drop shuts the
        // socket down (an event, not a poll).
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = reading.recv(&mut buf) {
                if done.load(Ordering::Relaxed) {
                    break;
                }
                sink.push(Message {
                    text: String::from_utf8_lossy(&buf[..n]).into_owned(),
                    bytes: buf[..n].to_vec(),
                    at: Instant::now(),
                });
            }
        });
        NotifySocket {
            address,
            messages,
            socket,
            stop,
            reader: Some(reader),
        }
    }

    pub fn messages(&self) -> Vec<Message> {
        self.messages.snapshot()
    }

    /// The first message from index `from` on carrying `assignment` (such
    /// as `READY=1`), and its index; panics after [`PATIENCE`].
    pub fn wait_for(&self, from: usize, assignment: &str) -> (usize, Message) {
        self.wait_until(from, assignment, |m| m.has(assignment))
    }

    /// Like [`NotifySocket::wait_for`] with any test; `what` names it in
    /// the panic message.
    pub fn wait_until(
        &self,
        from: usize,
        what: &str,
        matches: impl Fn(&Message) -> bool,
    ) -> (usize, Message) {
        self.messages
            .wait(from, PATIENCE, matches)
            .unwrap_or_else(|| {
                panic!(
                    "no notification {what:?} from index {from} within {PATIENCE:?}; got:\n{:#?}",
                    self.messages()
                )
            })
    }
}

impl Drop for NotifySocket {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes a blocked recv(2), which then returns 0.
        let _ = self.socket.shutdown(std::net::Shutdown::Read);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The fields of a journal entry in journald's native protocol: `NAME=value`
/// lines, or `NAME`, a newline, a 64-bit little-endian length and that many
/// bytes for values that may hold newlines.
pub fn journal_fields(mut bytes: &[u8]) -> Vec<(String, String)> {
    let mut fields = Vec::new();
    while !bytes.is_empty() {
        let Some(end) = bytes.iter().position(|&b| b == b'=' || b == b'\n') else {
            break;
        };
        let name = String::from_utf8_lossy(&bytes[..end]).into_owned();
        let value;
        if bytes[end] == b'=' {
            let rest = &bytes[end + 1..];
            let stop = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
            value = &rest[..stop];
            bytes = rest.get(stop + 1..).unwrap_or_default();
        } else {
            let rest = &bytes[end + 1..];
            let Some(len) = rest.get(..8) else { break };
            let len = u64::from_le_bytes(len.try_into().expect("8 bytes")) as usize;
            let Some(v) = rest.get(8..8 + len) else { break };
            value = v;
            bytes = rest.get(8 + len + 1..).unwrap_or_default();
        }
        fields.push((name, String::from_utf8_lossy(value).into_owned()));
    }
    fields
}

/// The value of `name` in an entry.
pub fn field<'a>(entry: &'a [(String, String)], name: &str) -> Option<&'a str> {
    entry
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// In the forked child, before exec: a private mount namespace in which
/// /run is a fresh tmpfs whose systemd/journal/socket is `journal`.
pub fn mount_journal(journal: &CString) -> std::io::Result<()> {
    let check = |rc: libc::c_int| {
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    let none = std::ptr::null::<libc::c_char>();
    // SAFETY: plain system calls on NUL-terminated strings that outlive
    // them; the child is single-threaded here.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS))?;
        check(libc::mount(
            none,
            c"/".as_ptr(),
            none,
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        ))?;
        check(libc::mount(
            c"tmpfs".as_ptr(),
            c"/run".as_ptr(),
            c"tmpfs".as_ptr(),
            0,
            std::ptr::null(),
        ))?;
        check(libc::mkdir(c"/run/systemd".as_ptr(), 0o755))?;
        check(libc::mkdir(c"/run/systemd/journal".as_ptr(), 0o755))?;
        let fd = libc::open(
            c"/run/systemd/journal/socket".as_ptr(),
            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
            0o644,
        );
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        libc::close(fd);
        check(libc::mount(
            journal.as_ptr(),
            c"/run/systemd/journal/socket".as_ptr(),
            none,
            libc::MS_BIND,
            std::ptr::null(),
        ))
    }
}
