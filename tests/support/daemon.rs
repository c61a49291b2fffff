//! Runs the real `tokend` binary for integration tests.
//!
//! [`Daemon::start`] writes a config into a fresh temporary directory,
//! starts `tokend serve` on it and waits for its "listening" log line (an
//! event, not a sleep). Its stderr is collected; on drop the daemon is
//! killed and, if the test is failing, its log is printed. [`Conn`] speaks
//! the line protocol over the real socket. [`test_user`] looks up the users
//! `scripts/test-setup` creates, for tests that run callers under other uids.
#![allow(dead_code, unreachable_pub)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as AsyncBufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

pub const TOKEND: &str = env!("CARGO_BIN_EXE_tokend");

/// How long a test waits for any one event before it fails.
pub const PATIENCE: Duration = Duration::from_secs(15);

#[derive(Default)]
struct Log {
    text: Mutex<String>,
    grew: Condvar,
}

pub struct Daemon {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    pub config_path: PathBuf,
    /// The `[daemon]` lines the test asked for, kept for rewrites.
    daemon_lines: String,
    log: Arc<Log>,
}

impl Daemon {
    /// Starts tokend with `keys` (TOML `[keys.*]` tables) and `daemon`
    /// (extra `[daemon]` lines; the socket is set here).
    pub fn start(daemon: &str, keys: &str) -> Daemon {
        Daemon::start_in(tempfile::tempdir().expect("temp dir"), daemon, keys)
    }

    /// Like [`Daemon::start`], in `dir`, whose `tokend.sock` is the socket.
    pub fn start_in(dir: tempfile::TempDir, daemon: &str, keys: &str) -> Daemon {
        Daemon::start_with(dir, daemon, keys, |_| Command::new(TOKEND))
    }

    /// Like [`Daemon::start_in`], with the command `make` returns for the
    /// directory (to run it under another uid, with other limits, …); the
    /// harness adds the arguments, environment and pipes. `RUST_LOG` is
    /// `tokend=trace,info` unless `make` set or removed it (removed, the
    /// config's `log_level` decides, as in production).
    pub fn start_with(
        dir: tempfile::TempDir,
        daemon: &str,
        keys: &str,
        make: impl FnOnce(&Path) -> Command,
    ) -> Daemon {
        // Foreign callers must be able to reach the socket inside.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod dir");
        let socket = dir.path().join("tokend.sock");
        let config_path = dir.path().join("tokend.toml");
        write_private(&config_path, &config_text(&socket, daemon, keys));
        let mut command = make(dir.path());
        // Unless the test chose a filter, every event tokend has.
        if !command.get_envs().any(|(name, _)| name == "RUST_LOG") {
            command.env("RUST_LOG", "tokend=trace,info");
        }
        let mut child = command
            .args(["serve", "--config"])
            .arg(&config_path)
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("failed to start tokend");
        let log = Arc::new(Log::default());
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut text = sink.text.lock().expect("log lock");
                text.push_str(&line);
                text.push('\n');
                sink.grew.notify_all();
            }
        });
        let mut daemon = Daemon {
            child: Some(child),
            dir,
            socket,
            config_path,
            daemon_lines: daemon.to_owned(),
            log,
        };
        daemon.wait_for_log(" listening ");
        daemon
    }

    /// Replaces the configuration's keys, keeping its `[daemon]` lines.
    pub fn rewrite_keys(&self, keys: &str) {
        let text = config_text(&self.socket, &self.daemon_lines, keys);
        write_private(&self.config_path, &text);
    }

    /// Sends SIGHUP and blocks until the daemon logs the outcome: `true`
    /// for "reloaded", `false` for "reload failed".
    pub fn reload_and_wait(&mut self) -> bool {
        let outcomes = |text: &str| {
            (
                text.matches(" reloaded").count(),
                text.matches("reload failed").count(),
            )
        };
        let before = outcomes(&self.log());
        // SAFETY: kill(2) on our own child's pid; no memory is involved.
        let sent = unsafe { libc::kill(self.pid() as i32, libc::SIGHUP) };
        assert_eq!(sent, 0, "SIGHUP: {}", std::io::Error::last_os_error());
        let deadline = Instant::now() + PATIENCE;
        let mut text = self.log.text.lock().expect("log lock");
        loop {
            let now = outcomes(&text);
            if now.0 > before.0 {
                return true;
            }
            if now.1 > before.1 {
                return false;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no reload outcome within {PATIENCE:?}; log:\n{text}"
            );
            text = self.log.grew.wait_timeout(text, left).expect("log lock").0;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn log(&self) -> String {
        self.log.text.lock().expect("log lock").clone()
    }

    /// Blocks until the log contains `needle`; panics with the log after
    /// [`PATIENCE`], or if the daemon exits first.
    pub fn wait_for_log(&mut self, needle: &str) -> String {
        self.wait_for_log_count(needle, 1)
    }

    /// Blocks until `needle` occurs `count` times in the log. Blocking:
    /// from an async test, use a multi-threaded runtime so peers the test
    /// runs in-process keep going.
    pub fn wait_for_log_count(&mut self, needle: &str, count: usize) -> String {
        self.wait_for_log_count_within(needle, count, PATIENCE)
    }

    /// Like [`Daemon::wait_for_log_count`], failing after `limit` instead
    /// of [`PATIENCE`]: for lines that must appear promptly.
    pub fn wait_for_log_count_within(
        &mut self,
        needle: &str,
        count: usize,
        limit: Duration,
    ) -> String {
        let deadline = Instant::now() + limit;
        let mut text = self.log.text.lock().expect("log lock");
        loop {
            if text.matches(needle).count() >= count {
                return text.clone();
            }
            let now = Instant::now();
            if now >= deadline {
                // Released first: a poisoned lock would make the log
                // unreadable to the drop that prints it.
                let shown = text.clone();
                drop(text);
                panic!(
                    "tokend did not log {needle:?} {count} times within {limit:?}; log:\n{shown}"
                );
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                drop(text);
                std::thread::sleep(Duration::from_millis(50)); // let the reader drain
                panic!(
                    "tokend exited ({status}) before logging {needle:?}; log:\n{}",
                    self.log()
                );
            }
            // Wake on each new line, and now and then to notice an exit.
            let wait = (deadline - now).min(Duration::from_millis(200));
            text = self.log.grew.wait_timeout(text, wait).expect("log lock").0;
        }
    }

    pub async fn connect(&self) -> Conn {
        Conn::open(&self.socket).await
    }

    /// One request on a fresh connection.
    pub async fn call(&self, request: Value) -> Answer {
        self.connect().await.call(request).await
    }

    /// The exit status if the daemon exits within `limit`.
    pub fn wait_timeout(&mut self, limit: Duration) -> Option<ExitStatus> {
        let child = self.child.as_mut().expect("running");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.child = None;
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends `signal` and waits for the exit.
    pub fn signal_and_wait(&mut self, signal: i32) -> (ExitStatus, Duration) {
        let mut child = self.child.take().expect("running");
        let sent = Instant::now();
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, signal) };
        let status = child.wait().expect("wait for tokend");
        (status, sent.elapsed())
    }

    /// Stops the daemon with SIGTERM, asserts a clean exit within 5 s, and
    /// asserts its log holds none of `secrets` (client secrets and tokens
    /// the test used). Returns the whole log, for checks of what was
    /// written at shutdown.
    pub fn stop_and_check_log<S: AsRef<str>>(mut self, secrets: &[S]) -> String {
        let (status, took) = self.signal_and_wait(libc::SIGTERM);
        assert!(
            status.success(),
            "tokend exited with {status}; log:\n{}",
            self.log()
        );
        assert!(
            took < Duration::from_secs(5),
            "tokend took {took:?} to stop"
        );
        // The reader thread may still hold the last lines for a moment.
        std::thread::sleep(Duration::from_millis(100));
        let log = self.log();
        assert_log_clean(&log, secrets);
        log
    }
}

pub fn assert_log_clean<S: AsRef<str>>(log: &str, secrets: &[S]) {
    assert!(
        !secrets.is_empty(),
        "a log check needs something to look for"
    );
    for secret in secrets {
        let secret = secret.as_ref();
        assert!(!secret.is_empty());
        assert!(
            !log.contains(secret),
            "the daemon's log contains a secret or token ({} bytes)",
            secret.len()
        );
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        super::reap(self.child.take(), "tokend log", || self.log());
    }
}

/// An answer from the daemon: the parsed JSON, readable through `Deref`.
/// `Display` and `Debug` show each `access_token` as its fingerprint, so a
/// failing assertion that prints an answer prints no token.
#[derive(Clone, PartialEq)]
pub struct Answer(pub Value);

impl Answer {
    /// The answer's access token; panics (without printing it) if absent.
    pub fn token(&self) -> &str {
        self.0["access_token"]
            .as_str()
            .unwrap_or_else(|| panic!("no access_token in {self}"))
    }
}

impl std::ops::Deref for Answer {
    type Target = Value;

    fn deref(&self) -> &Value {
        &self.0
    }
}

impl PartialEq<Value> for Answer {
    fn eq(&self, other: &Value) -> bool {
        self.0 == *other
    }
}

impl std::fmt::Display for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", redact_tokens(&self.0))
    }
}

impl std::fmt::Debug for Answer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{self}")
    }
}

fn redact_tokens(value: &Value) -> Value {
    match value {
        Value::Object(fields) => Value::Object(
            fields
                .iter()
                .map(|(name, field)| match (name.as_str(), field) {
                    ("access_token", Value::String(token)) => (
                        name.clone(),
                        Value::String(format!("[token {}]", fingerprint(token))),
                    ),
                    _ => (name.clone(), redact_tokens(field)),
                })
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(redact_tokens).collect()),
        other => other.clone(),
    }
}

/// What tests print instead of a token: the first 8 hex digits of its
/// SHA-256, as tokend's own log does.
pub fn fingerprint(token: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(token.as_bytes())[..4]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Asserts two tokens are the same (or not), printing only fingerprints.
#[track_caller]
pub fn assert_same_token(a: &str, b: &str, same: bool, what: &str) {
    assert!(
        (a == b) == same,
        "{what}: tokens {} and {} should {}be the same",
        fingerprint(a),
        fingerprint(b),
        if same { "" } else { "not " }
    );
}

/// Asserts the issuer handed out exactly `expected`, printing fingerprints.
#[track_caller]
pub fn assert_issued(issued: &[String], expected: &[&str]) {
    let shown =
        |tokens: &mut dyn Iterator<Item = &str>| tokens.map(fingerprint).collect::<Vec<_>>();
    assert!(
        issued
            .iter()
            .map(String::as_str)
            .eq(expected.iter().copied()),
        "the issuer issued {:?}, expected {:?}",
        shown(&mut issued.iter().map(String::as_str)),
        shown(&mut expected.iter().copied())
    );
}

/// Writes `text` to `path` with mode 0600.
pub fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod file");
}

/// A client connection speaking protocol v1.
pub struct Conn {
    reader: AsyncBufReader<OwnedReadHalf>,
    pub writer: OwnedWriteHalf,
}

impl Conn {
    pub async fn open(socket: &Path) -> Conn {
        let stream = UnixStream::connect(socket)
            .await
            .expect("connect to tokend");
        Conn::from_stream(stream)
    }

    /// A connection made elsewhere (say, under another uid).
    pub fn from_stream(stream: UnixStream) -> Conn {
        let (read, writer) = stream.into_split();
        Conn {
            reader: AsyncBufReader::new(read),
            writer,
        }
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).await.expect("write to tokend");
    }

    /// The next answer line, parsed; panics on EOF or after [`PATIENCE`].
    pub async fn recv(&mut self) -> Answer {
        let line = self
            .recv_line()
            .await
            .expect("tokend closed the connection");
        let value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("answer is not JSON ({e}), {} bytes", line.len()));
        Answer(value)
    }

    /// The next raw line, or `None` at EOF.
    pub async fn recv_line(&mut self) -> Option<String> {
        let mut line = String::new();
        let n = tokio::time::timeout(PATIENCE, self.reader.read_line(&mut line))
            .await
            .expect("no answer from tokend in time")
            .expect("read from tokend");
        (n > 0).then_some(line)
    }

    pub async fn call(&mut self, request: Value) -> Answer {
        let mut line = request.to_string();
        line.push('\n');
        self.send_raw(line.as_bytes()).await;
        self.recv().await
    }

    /// Asserts the daemon closes the connection without another answer.
    /// A reset counts as closed: the kernel resets a Unix stream whose
    /// reader closed with our unread bytes still queued.
    pub async fn expect_eof(&mut self) {
        let mut line = String::new();
        match tokio::time::timeout(PATIENCE, self.reader.read_line(&mut line)).await {
            Ok(Ok(0)) => {}
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Ok(Ok(_)) => panic!("expected tokend to close the connection, got {line:?}"),
            Ok(Err(e)) => panic!("read from tokend: {e}"),
            Err(_) => panic!("tokend did not close the connection within {PATIENCE:?}"),
        }
    }
}

/// A copy of the `tokend` binary that any user can run. The build's own
/// copy may sit under a directory only root can enter (a clone made in a
/// `mktemp -d` folder is 0700), and callers under other uids must exec it.
pub fn tokend_for_anyone() -> &'static Path {
    static COPY: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
    let (_, path) = COPY.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod dir");
        let path = dir.path().join("tokend");
        std::fs::copy(TOKEND, &path).expect("copy tokend");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
            .expect("chmod tokend");
        (dir, path)
    });
    path
}

/// A user the test-suite set-up (`scripts/test`) creates.
pub struct TestUser {
    pub name: &'static str,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

pub fn test_user(name: &'static str) -> TestUser {
    let user = nix::unistd::User::from_name(name)
        .expect("look up user")
        .unwrap_or_else(|| {
            panic!("test user {name} does not exist: run scripts/test, which creates it")
        });
    let cname = std::ffi::CString::new(name).expect("user name");
    let groups = nix::unistd::getgrouplist(&cname, user.gid)
        .expect("group list")
        .into_iter()
        .map(|g| g.as_raw())
        .collect();
    TestUser {
        name,
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
        groups,
    }
}

fn config_text(socket: &Path, daemon: &str, keys: &str) -> String {
    format!(
        "[daemon]\nsocket = {:?}\n{daemon}\n\n{keys}\n",
        socket.display().to_string()
    )
}
