//! Runs the real `tokend` the way systemd does, for tests/systemd.rs.
//!
//! [`NotifySocket`] is a datagram socket standing in for systemd's
//! `$NOTIFY_SOCKET`: a thread records every message with its arrival time,
//! and tests await messages (an event, not a sleep). [`Unit`] starts
//! `tokend serve` with that socket and `WATCHDOG_USEC`, or under the real
//! `systemd-socket-activate`; it collects stderr, prints it if the test
//! fails, and [`Unit::stop_and_check_log`] ends every test: SIGTERM,
//! `STOPPING=1`, exit 0, and no secret in the log. [`Unit::start_journald`]
//! gives it stderr as systemd connects it to the journal, and reads what it
//! sends journald instead.
#![allow(dead_code, unreachable_pub)]

use std::ffi::CString;
use std::io::{BufRead, BufReader};
use std::os::fd::OwnedFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::daemon::{assert_log_clean, write_private, PATIENCE, TOKEND};

/// The filter tests run the daemon with unless they say otherwise.
pub const RUST_LOG: &str = "tokend=trace,info";

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
        // The reader wakes now and then to notice that the test is done.
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("read timeout");
        let messages = Arc::new(Record::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (sink, done) = (messages.clone(), stop.clone());
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            while !done.load(Ordering::Relaxed) {
                if let Ok(n) = socket.recv(&mut buf) {
                    sink.push(Message {
                        text: String::from_utf8_lossy(&buf[..n]).into_owned(),
                        bytes: buf[..n].to_vec(),
                        at: Instant::now(),
                    });
                }
            }
        });
        NotifySocket {
            address,
            messages,
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
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

fn unique() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// `tokend serve` as systemd would run it.
pub struct Unit {
    child: Option<Child>,
    /// Taken by [`Unit::stop_and_check_log`], so a test can look at what
    /// the daemon left behind.
    dir: Option<tempfile::TempDir>,
    /// The socket callers connect to.
    pub socket: PathBuf,
    pub config_path: PathBuf,
    log: Arc<Record<String>>,
    log_reader: Option<JoinHandle<()>>,
    pub notify: Option<NotifySocket>,
    /// What tokend sent journald, when started by [`Unit::start_journald`].
    journal: Option<NotifySocket>,
}

impl Unit {
    /// A config whose `[daemon]` puts the socket in `dir`, then `body`:
    /// more `[daemon]` settings if any, then `[keys.*]` tables.
    pub fn config_text(dir: &Path, body: &str) -> String {
        format!(
            "[daemon]\nsocket = {:?}\n{body}\n",
            dir.join("tokend.sock").display().to_string()
        )
    }

    /// Rewrites the configuration (for a reload).
    pub fn write_config(&self, text: &str) {
        write_private(&self.config_path, text);
    }

    /// Starts `tokend serve` with a [`NotifySocket`] as `$NOTIFY_SOCKET`
    /// (at an abstract address or a path) and a one-second watchdog, and
    /// waits for `READY=1`.
    pub fn start_notify(keys: &str, abstract_address: bool) -> Unit {
        Unit::start_notify_with(keys, abstract_address, Some(RUST_LOG))
    }

    /// Like [`Unit::start_notify`], with `$RUST_LOG` set to `rust_log` or
    /// unset.
    pub fn start_notify_with(keys: &str, abstract_address: bool, rust_log: Option<&str>) -> Unit {
        let dir = tempfile::tempdir().expect("temp dir");
        let notify = if abstract_address {
            NotifySocket::bind_abstract()
        } else {
            NotifySocket::bind_path(dir.path())
        };
        let config_path = dir.path().join("tokend.toml");
        write_private(&config_path, &Unit::config_text(dir.path(), keys));
        let mut command = Command::new(TOKEND);
        command
            .args(["serve", "--config"])
            .arg(&config_path)
            .env("NOTIFY_SOCKET", &notify.address)
            .env("WATCHDOG_USEC", "1000000");
        let socket = dir.path().join("tokend.sock");
        let unit = Unit::spawn(
            command,
            rust_log,
            None,
            dir,
            socket,
            config_path,
            Some(notify),
        );
        unit.notify().wait_for(0, "READY=1");
        unit
    }

    /// Starts `tokend serve` under `systemd-socket-activate`, which listens
    /// on `dir/activated.sock` and starts tokend (passing the socket as fd
    /// 3) at the first connection. Waits until the socket listens. The
    /// config names `dir/tokend.sock`, which tokend must not create.
    pub fn start_activated(keys: &str) -> Unit {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod dir");
        let config_path = dir.path().join("tokend.toml");
        write_private(&config_path, &Unit::config_text(dir.path(), keys));
        let socket = dir.path().join("activated.sock");
        let mut command = Command::new(SOCKET_ACTIVATE);
        command
            .arg("--listen")
            .arg(&socket)
            .arg(TOKEND)
            .args(["serve", "--config"])
            .arg(&config_path);
        let mut unit = Unit::spawn(
            command,
            Some(RUST_LOG),
            None,
            dir,
            socket,
            config_path,
            None,
        );
        unit.wait_for_log("Listening on ");
        unit
    }

    /// Starts `tokend serve` with stderr connected the way systemd
    /// connects it to the journal (`$JOURNAL_STREAM` names the stream), in
    /// a mount namespace whose /run/systemd/journal/socket is a socket this
    /// harness reads. Waits for the "listening" entry.
    pub fn start_journald(keys: &str) -> Unit {
        let dir = tempfile::tempdir().expect("temp dir");
        let config_path = dir.path().join("tokend.toml");
        write_private(&config_path, &Unit::config_text(dir.path(), keys));
        let journal_path = dir.path().join("journal.sock");
        let journal = NotifySocket::bind_file(&journal_path);

        let (read, write) = nix::unistd::pipe().expect("pipe");
        let meta = std::fs::File::from(write.try_clone().expect("dup"))
            .metadata()
            .expect("fstat the pipe");
        let stream = format!("{}:{}", meta.dev(), meta.ino());
        let journal_path = CString::new(journal_path.as_os_str().as_bytes()).expect("path");
        let mut command = Command::new(TOKEND);
        command
            .args(["serve", "--config"])
            .arg(&config_path)
            .env("JOURNAL_STREAM", stream)
            .stderr(Stdio::from(write));
        // SAFETY: between fork and exec the closure makes only raw system
        // calls on C strings prepared before the fork; it allocates nothing
        // and takes no lock.
        unsafe {
            command.pre_exec(move || mount_journal(&journal_path));
        }
        let socket = dir.path().join("tokend.sock");
        let mut unit = Unit::spawn(
            command,
            Some(RUST_LOG),
            Some(read),
            dir,
            socket,
            config_path,
            None,
        );
        unit.journal = Some(journal);
        unit.wait_for_entry("listening entry", |e| {
            field(e, "MESSAGE") == Some("listening")
        });
        unit
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn(
        mut command: Command,
        rust_log: Option<&str>,
        stderr: Option<OwnedFd>,
        dir: tempfile::TempDir,
        socket: PathBuf,
        config_path: PathBuf,
        notify: Option<NotifySocket>,
    ) -> Unit {
        match rust_log {
            Some(filter) => command.env("RUST_LOG", filter),
            None => command.env_remove("RUST_LOG"),
        };
        command
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        if stderr.is_none() {
            command.env_remove("JOURNAL_STREAM").stderr(Stdio::piped());
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start {command:?}: {e}"));
        // Our copy of a given stderr's write end goes with the command, so
        // the reader sees EOF when the daemon exits.
        drop(command);
        let stderr: Box<dyn std::io::Read + Send> = match stderr {
            Some(read) => Box::new(std::fs::File::from(read)),
            None => Box::new(child.stderr.take().expect("piped stderr")),
        };
        let log = Arc::new(Record::default());
        let sink = log.clone();
        let log_reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                sink.push(line);
            }
        });
        Unit {
            child: Some(child),
            dir: Some(dir),
            socket,
            config_path,
            log,
            log_reader: Some(log_reader),
            notify,
            journal: None,
        }
    }

    /// The journal entries so far, each as its fields.
    pub fn journal(&self) -> Vec<Vec<(String, String)>> {
        let journal = self.journal.as_ref().expect("started with start_journald");
        journal
            .messages()
            .iter()
            .map(|m| journal_fields(&m.bytes))
            .collect()
    }

    /// The first journal entry that `matches`; panics after [`PATIENCE`].
    pub fn wait_for_entry(
        &self,
        what: &str,
        matches: impl Fn(&[(String, String)]) -> bool,
    ) -> Vec<(String, String)> {
        let journal = self.journal.as_ref().expect("started with start_journald");
        let (_, message) = journal.wait_until(0, what, |m| matches(&journal_fields(&m.bytes)));
        journal_fields(&message.bytes)
    }

    /// The unit's temporary directory: config, sockets.
    pub fn dir(&self) -> &Path {
        self.dir.as_ref().expect("not stopped").path()
    }

    pub fn notify(&self) -> &NotifySocket {
        self.notify.as_ref().expect("started with a notify socket")
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Everything the daemon logged: stderr, and journal entries as
    /// `NAME=value` lines.
    pub fn log(&self) -> String {
        let mut text = self.log.snapshot().join("\n");
        if self.journal.is_some() {
            for entry in self.journal() {
                for (name, value) in entry {
                    text.push_str(&format!("\n{name}={value}"));
                }
            }
        }
        text
    }

    /// What the daemon wrote to stderr.
    pub fn stderr(&self) -> Vec<String> {
        self.log.snapshot()
    }

    /// Blocks until a log line contains `needle`; panics after [`PATIENCE`]
    /// or if the process exits first.
    pub fn wait_for_log(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let slice =
                Duration::from_millis(200).min(deadline.saturating_duration_since(Instant::now()));
            if let Some((_, line)) = self.log.wait(0, slice, |l| l.contains(needle)) {
                return line;
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                self.drain_log();
                panic!("tokend exited ({status}) before logging {needle:?}");
            }
            if Instant::now() >= deadline {
                panic!("tokend did not log {needle:?} within {PATIENCE:?}");
            }
        }
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid, which we have not reaped.
        let rc = unsafe { libc::kill(self.pid() as i32, signal) };
        assert_eq!(rc, 0, "kill: {}", std::io::Error::last_os_error());
    }

    /// Waits for the stderr reader to reach EOF (the process closed it).
    fn drain_log(&mut self) {
        if let Some(reader) = self.log_reader.take() {
            let _ = reader.join();
        }
    }

    /// SIGTERM; asserts `STOPPING=1` (when notifying), exit 0 within 5 s,
    /// and that the log holds none of `secrets`. Returns the directory,
    /// which is deleted when dropped.
    pub fn stop_and_check_log<S: AsRef<str>>(mut self, secrets: &[S]) -> tempfile::TempDir {
        let mut child = self.child.take().expect("running");
        let sent = Instant::now();
        // SAFETY: kill(2) on our own child's pid, which we have not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let status = child.wait().expect("wait for tokend");
        let took = sent.elapsed();
        self.drain_log();
        assert!(status.success(), "tokend exited with {status}");
        assert!(
            took < Duration::from_secs(5),
            "tokend took {took:?} to stop"
        );
        if let Some(notify) = &self.notify {
            notify.wait_for(0, "STOPPING=1");
        }
        assert_log_clean(&self.log(), secrets);
        self.dir.take().expect("not stopped")
    }
}

impl Drop for Unit {
    fn drop(&mut self) {
        super::reap(self.child.take(), "tokend log", || self.log());
        if let Some(notify) = self.notify.as_ref().filter(|_| std::thread::panicking()) {
            eprintln!("---- notifications ----\n{:#?}", notify.messages());
        }
    }
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
fn mount_journal(journal: &CString) -> std::io::Result<()> {
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
