//! Runs the real `tokend` binary for integration tests: the one harness
//! for a running daemon, plain or as systemd runs it.
//!
//! [`Daemon::builder`] writes a config into a fresh temporary directory and
//! starts `tokend serve` on it: plainly, with a [`NotifySocket`] as
//! `$NOTIFY_SOCKET` (and a watchdog), with stderr connected the way systemd
//! connects it to journald, or under the real `systemd-socket-activate`. It
//! waits for readiness (an event, not a sleep: the "listening" log line,
//! `READY=1`, the journal's "listening" entry, or the activator's
//! "Listening on"). Stderr is collected by a thread that also reports its
//! end, which is how the harness learns the daemon exited; on drop the
//! daemon is killed and, if the test is failing, its log (and
//! notifications) printed. [`Daemon::start`] and its siblings are the
//! plain case. [`Conn`] speaks the line protocol over the real socket.
//! [`test_user`] looks up the users `scripts/test-setup` creates, for tests
//! that run callers under other uids. The systemd stand-ins themselves live
//! in [`super::systemd`].
#![allow(dead_code, unreachable_pub)]

use std::ffi::{CString, OsStr, OsString};
use std::io::{BufRead, BufReader};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as AsyncBufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

use super::systemd::{field, journal_fields, mount_journal, NotifySocket, SOCKET_ACTIVATE};

pub const TOKEND: &str = env!("CARGO_BIN_EXE_tokend");
/// The program `tokend` hands `serve` and `check` to.
pub const TOKEND_DAEMON: &str = env!("CARGO_BIN_EXE_tokend-daemon");

/// How long a test waits for any one event before it fails.
pub const PATIENCE: Duration = Duration::from_secs(15);

/// The filter tests run the daemon with unless they say otherwise: every
/// event tokend has.
pub const RUST_LOG: &str = "tokend=trace,info";

/// What the daemon wrote to stderr, and whether it has closed it (exited:
/// tokend never closes its stderr otherwise).
#[derive(Default)]
struct Log {
    state: Mutex<LogState>,
    grew: Condvar,
}

#[derive(Default)]
struct LogState {
    text: String,
    closed: bool,
}

impl Log {
    fn lock(&self) -> MutexGuard<'_, LogState> {
        self.state.lock().expect("log lock")
    }

    /// Reads `stderr` to its end, line by line, waking waiters on each line
    /// and at the end.
    fn collect(self: Arc<Self>, stderr: impl std::io::Read + Send + 'static) {
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let mut state = self.lock();
                state.text.push_str(&line);
                state.text.push('\n');
                self.grew.notify_all();
            }
            self.lock().closed = true;
            self.grew.notify_all();
        });
    }

    /// Waits until `done` holds of the log or `limit` passes; the state
    /// either way.
    fn wait(&self, limit: Duration, done: impl Fn(&LogState) -> bool) -> MutexGuard<'_, LogState> {
        let deadline = Instant::now() + limit;
        let mut state = self.lock();
        while !done(&state) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            state = self.grew.wait_timeout(state, left).expect("log lock").0;
        }
        state
    }
}

/// Where [`DaemonBuilder::notify`] binds the notification socket.
enum NotifyAt {
    Path,
    Abstract,
}

/// Makes the command that runs tokend, given the daemon's directory.
type MakeCommand<'a> = Box<dyn FnOnce(&Path) -> Command + 'a>;

/// How a [`Daemon`] is started; [`Daemon::builder`] makes one.
#[derive(Default)]
#[must_use]
pub struct DaemonBuilder<'a> {
    dir: Option<tempfile::TempDir>,
    daemon_lines: String,
    keys: String,
    command: Option<MakeCommand<'a>>,
    env: Vec<(OsString, Option<OsString>)>,
    notify: Option<NotifyAt>,
    watchdog: Option<Duration>,
    journald: bool,
    socket_activated: bool,
}

impl<'a> DaemonBuilder<'a> {
    /// Extra `[daemon]` lines; the socket is set by the harness.
    pub fn daemon_lines(mut self, lines: &str) -> Self {
        lines.clone_into(&mut self.daemon_lines);
        self
    }

    /// The `[keys.*]` tables.
    pub fn keys(mut self, keys: &str) -> Self {
        keys.clone_into(&mut self.keys);
        self
    }

    /// Runs in `dir`, whose `tokend.sock` is the configured socket, instead
    /// of a fresh temporary directory.
    pub fn dir(mut self, dir: tempfile::TempDir) -> Self {
        self.dir = Some(dir);
        self
    }

    /// The command `make` returns for the directory (to run tokend under
    /// another uid, with other limits, …), after the config is written
    /// there; the harness adds the arguments, environment and pipes.
    /// `RUST_LOG` is [`RUST_LOG`] unless `make` or [`DaemonBuilder::env`]
    /// set or removed it (removed, the config's `log_level` decides, as in
    /// production).
    pub fn command(mut self, make: impl FnOnce(&Path) -> Command + 'a) -> Self {
        self.command = Some(Box::new(make));
        self
    }

    /// Sets an environment variable for the daemon.
    pub fn env(mut self, name: impl AsRef<OsStr>, value: impl AsRef<OsStr>) -> Self {
        self.env
            .push((name.as_ref().to_owned(), Some(value.as_ref().to_owned())));
        self
    }

    /// Removes an environment variable from the daemon's.
    pub fn env_remove(mut self, name: impl AsRef<OsStr>) -> Self {
        self.env.push((name.as_ref().to_owned(), None));
        self
    }

    /// A [`NotifySocket`] at `dir/notify.sock` as `$NOTIFY_SOCKET`;
    /// readiness is `READY=1`.
    pub fn notify(mut self) -> Self {
        self.notify = Some(NotifyAt::Path);
        self
    }

    /// Like [`DaemonBuilder::notify`] at an abstract address, as systemd's
    /// own is for services in containers.
    pub fn notify_abstract(mut self) -> Self {
        self.notify = Some(NotifyAt::Abstract);
        self
    }

    /// `$WATCHDOG_USEC` set to `every`.
    pub fn watchdog(mut self, every: Duration) -> Self {
        self.watchdog = Some(every);
        self
    }

    /// Stderr connected the way systemd connects it to the journal
    /// (`$JOURNAL_STREAM` names the stream), in a mount namespace whose
    /// /run/systemd/journal/socket is a socket the harness reads (needs
    /// root); readiness is the journal's "listening" entry.
    pub fn journald(mut self) -> Self {
        self.journald = true;
        self
    }

    /// Under `systemd-socket-activate`, which listens on
    /// `dir/activated.sock` (then [`Daemon::socket`]) and starts tokend,
    /// passing the socket as fd 3, at the first connection. Readiness is
    /// the activator listening. The config names `dir/tokend.sock`, which
    /// tokend must not create.
    pub fn socket_activated(mut self) -> Self {
        self.socket_activated = true;
        self
    }

    /// Starts the daemon and waits until it is ready.
    pub fn start(self) -> Daemon {
        let dir = self
            .dir
            .unwrap_or_else(|| tempfile::tempdir().expect("temp dir"));
        // Foreign callers must be able to reach the socket inside.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod dir");
        let configured = dir.path().join("tokend.sock");
        let config_path = dir.path().join("tokend.toml");
        write_private(
            &config_path,
            &config_text(&configured, &self.daemon_lines, &self.keys),
        );
        let (mut command, socket) = if self.socket_activated {
            assert!(
                self.command.is_none(),
                "a socket-activated daemon runs under systemd-socket-activate"
            );
            let listen = dir.path().join("activated.sock");
            let mut command = Command::new(SOCKET_ACTIVATE);
            command.arg("--listen").arg(&listen).arg(TOKEND);
            (command, listen)
        } else {
            let make = self
                .command
                .unwrap_or_else(|| Box::new(|_| Command::new(TOKEND)));
            (make(dir.path()), configured)
        };
        command.args(["serve", "--config"]).arg(&config_path);
        for (name, value) in &self.env {
            match value {
                Some(value) => command.env(name, value),
                None => command.env_remove(name),
            };
        }
        if !command.get_envs().any(|(name, _)| name == "RUST_LOG") {
            command.env("RUST_LOG", RUST_LOG);
        }
        let notify = self.notify.map(|at| match at {
            NotifyAt::Path => NotifySocket::bind_path(dir.path()),
            NotifyAt::Abstract => NotifySocket::bind_abstract(),
        });
        match &notify {
            Some(notify) => command.env("NOTIFY_SOCKET", &notify.address),
            None => command.env_remove("NOTIFY_SOCKET"),
        };
        match self.watchdog {
            Some(every) => command.env("WATCHDOG_USEC", every.as_micros().to_string()),
            None => command.env_remove("WATCHDOG_USEC"),
        };
        command
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        let mut journal = None;
        let mut journal_stderr = None;
        if self.journald {
            let journal_path = dir.path().join("journal.sock");
            journal = Some(NotifySocket::bind_file(&journal_path));
            let (read, write) = nix::unistd::pipe().expect("pipe");
            let meta = std::fs::File::from(write.try_clone().expect("dup"))
                .metadata()
                .expect("fstat the pipe");
            let journal_path = CString::new(journal_path.as_os_str().as_bytes()).expect("path");
            command
                .env("JOURNAL_STREAM", format!("{}:{}", meta.dev(), meta.ino()))
                .stderr(Stdio::from(write));
            // SAFETY: between fork and exec the closure makes only raw
            // system calls on C strings prepared before the fork; it
            // allocates nothing and takes no lock.
            unsafe {
                command.pre_exec(move || mount_journal(&journal_path));
            }
            journal_stderr = Some(read);
        } else {
            command.env_remove("JOURNAL_STREAM").stderr(Stdio::piped());
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("failed to start {command:?}: {e}"));
        // Our copy of a given stderr's write end goes with the command, so
        // the reader sees EOF when the daemon exits.
        drop(command);
        let log = Arc::new(Log::default());
        match journal_stderr {
            Some(read) => log.clone().collect(std::fs::File::from(read)),
            None => log
                .clone()
                .collect(child.stderr.take().expect("piped stderr")),
        }
        let mut daemon = Daemon {
            child: Some(child),
            dir,
            socket,
            config_path,
            daemon_lines: self.daemon_lines,
            log,
            notify,
            journal,
        };
        // Activated, tokend starts only at the first connection: ready is
        // the activator listening, whatever else tokend is given.
        if self.socket_activated {
            daemon.wait_for_log("Listening on ");
        } else if daemon.notify.is_some() {
            daemon.notify().wait_for(0, "READY=1");
        } else if daemon.journal.is_some() {
            daemon.wait_for_entry("listening entry", |e| {
                field(e, "MESSAGE") == Some("listening")
            });
        } else {
            daemon.wait_for_log(" listening ");
        }
        daemon
    }
}

/// A running `tokend serve`.
pub struct Daemon {
    child: Option<Child>,
    pub dir: tempfile::TempDir,
    /// The socket callers connect to.
    pub socket: PathBuf,
    pub config_path: PathBuf,
    /// The `[daemon]` lines the test asked for, kept for rewrites.
    daemon_lines: String,
    log: Arc<Log>,
    /// The `$NOTIFY_SOCKET` stand-in, when started with one.
    notify: Option<NotifySocket>,
    /// What tokend sent journald, when started with
    /// [`DaemonBuilder::journald`].
    journal: Option<NotifySocket>,
}

impl Daemon {
    /// A plain daemon with no keys, to be configured.
    pub fn builder<'a>() -> DaemonBuilder<'a> {
        DaemonBuilder::default()
    }

    /// Starts tokend with `keys` (TOML `[keys.*]` tables) and `daemon`
    /// (extra `[daemon]` lines; the socket is set here).
    pub fn start(daemon: &str, keys: &str) -> Daemon {
        Daemon::builder().daemon_lines(daemon).keys(keys).start()
    }

    /// Like [`Daemon::start`], in `dir`, whose `tokend.sock` is the socket.
    pub fn start_in(dir: tempfile::TempDir, daemon: &str, keys: &str) -> Daemon {
        Daemon::builder()
            .dir(dir)
            .daemon_lines(daemon)
            .keys(keys)
            .start()
    }

    /// Like [`Daemon::start_in`], with the command `make` returns for the
    /// directory; see [`DaemonBuilder::command`].
    pub fn start_with(
        dir: tempfile::TempDir,
        daemon: &str,
        keys: &str,
        make: impl FnOnce(&Path) -> Command,
    ) -> Daemon {
        Daemon::builder()
            .dir(dir)
            .daemon_lines(daemon)
            .keys(keys)
            .command(make)
            .start()
    }

    /// The whole config the harness writes for `keys`, with the `[daemon]`
    /// lines the daemon was started with.
    pub fn config_text(&self, keys: &str) -> String {
        config_text(
            &self.dir.path().join("tokend.sock"),
            &self.daemon_lines,
            keys,
        )
    }

    /// Replaces the configuration with `text` as it is.
    pub fn write_config(&self, text: &str) {
        write_private(&self.config_path, text);
    }

    /// Replaces the configuration's keys, keeping its `[daemon]` lines.
    pub fn rewrite_keys(&self, keys: &str) {
        self.write_config(&self.config_text(keys));
    }

    /// Replaces the configuration's `[daemon]` lines and keys; later
    /// rewrites keep these `[daemon]` lines.
    pub fn rewrite(&mut self, daemon: &str, keys: &str) {
        daemon.clone_into(&mut self.daemon_lines);
        self.rewrite_keys(keys);
    }

    /// Sends `signal` to the running daemon.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid, which we have not reaped.
        let sent = unsafe { libc::kill(self.pid() as i32, signal) };
        assert_eq!(sent, 0, "kill: {}", std::io::Error::last_os_error());
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
        let before = outcomes(&self.log.lock().text);
        self.signal(libc::SIGHUP);
        let state = self.log.wait(PATIENCE, |s| {
            let now = outcomes(&s.text);
            now.0 > before.0 || now.1 > before.1 || s.closed
        });
        let now = outcomes(&state.text);
        if now.0 > before.0 {
            return true;
        }
        if now.1 > before.1 {
            return false;
        }
        let shown = state.text.clone();
        drop(state);
        panic!("no reload outcome within {PATIENCE:?}; log:\n{shown}");
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Everything the daemon logged: stderr, and journal entries as
    /// `NAME=value` lines.
    pub fn log(&self) -> String {
        let mut text = self.log.lock().text.clone();
        if self.journal.is_some() {
            for entry in self.journal() {
                for (name, value) in entry {
                    text.push_str(&format!("{name}={value}\n"));
                }
            }
        }
        text
    }

    /// What the daemon wrote to stderr, line by line.
    pub fn stderr(&self) -> Vec<String> {
        self.log.lock().text.lines().map(str::to_owned).collect()
    }

    /// Blocks until the log contains `needle`; panics with the log after
    /// [`PATIENCE`], or if the daemon exits first.
    pub fn wait_for_log(&mut self, needle: &str) -> String {
        self.wait_for_log_count(needle, 1)
    }

    /// Like [`Daemon::wait_for_log`], returning the first line that
    /// contains `needle` rather than the whole log.
    pub fn wait_for_log_line(&mut self, needle: &str) -> String {
        let text = self.wait_for_log(needle);
        let line = text.lines().find(|l| l.contains(needle));
        line.expect("the log contains the needle").to_owned()
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
        let found = |s: &LogState| s.text.matches(needle).count() >= count;
        let state = self.log.wait(limit, |s| found(s) || s.closed);
        // Released before any panic: a poisoned lock would make the log
        // unreadable to the drop that prints it.
        let (text, found, closed) = (state.text.clone(), found(&state), state.closed);
        drop(state);
        if found {
            return text;
        }
        if closed {
            // Stderr ends when the daemon exits.
            let status = self.child.as_mut().map(|c| c.wait().expect("wait"));
            self.child = None;
            panic!(
                "tokend exited ({status:?}) before logging {needle:?} {count} times; log:\n{text}"
            );
        }
        panic!("tokend did not log {needle:?} {count} times within {limit:?}; log:\n{text}");
    }

    /// Blocks until the daemon's stderr ends (it exited), so the log is
    /// whole; panics after [`PATIENCE`].
    fn wait_for_log_end(&self) {
        let closed = self.log.wait(PATIENCE, |s| s.closed).closed;
        assert!(
            closed,
            "tokend's stderr stayed open {PATIENCE:?} after it exited"
        );
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
        // The end of its stderr is the exit, as an event.
        if !self.log.wait(limit, |s| s.closed).closed {
            return None;
        }
        let status = self.child.take().expect("running").wait().expect("wait");
        Some(status)
    }

    /// Sends `signal` and waits for the exit, and for the last of the log.
    pub fn signal_and_wait(&mut self, signal: i32) -> (ExitStatus, Duration) {
        let sent = Instant::now();
        self.signal(signal);
        let mut child = self.child.take().expect("running");
        let status = child.wait().expect("wait for tokend");
        let took = sent.elapsed();
        self.wait_for_log_end();
        (status, took)
    }

    /// Stops the daemon with SIGTERM, asserts a clean exit within 5 s (and
    /// `STOPPING=1`, when it has a notification socket), and asserts its
    /// log holds none of `secrets` (client secrets and tokens the test
    /// used). Returns the whole log, for checks of what was written at
    /// shutdown.
    pub fn stop_and_check_log<S: AsRef<str>>(mut self, secrets: &[S]) -> String {
        self.stop_checked(secrets)
    }

    /// Like [`Daemon::stop_and_check_log`], keeping the directory until
    /// the `Daemon` is dropped, for a look at what the daemon left there.
    pub fn stop_checked<S: AsRef<str>>(&mut self, secrets: &[S]) -> String {
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
        if let Some(notify) = &self.notify {
            notify.wait_for(0, "STOPPING=1");
        }
        let log = self.log();
        assert_log_clean(&log, secrets);
        log
    }

    /// The notification socket; panics if started without one.
    pub fn notify(&self) -> &NotifySocket {
        self.notify.as_ref().expect("started with a notify socket")
    }

    /// The journal entries so far, each as its fields.
    pub fn journal(&self) -> Vec<Vec<(String, String)>> {
        let journal = self.journal.as_ref().expect("started with journald");
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
        let journal = self.journal.as_ref().expect("started with journald");
        let (_, message) = journal.wait_until(0, what, |m| matches(&journal_fields(&m.bytes)));
        journal_fields(&message.bytes)
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
        if let Some(notify) = self.notify.as_ref().filter(|_| std::thread::panicking()) {
            eprintln!("---- notifications ----\n{:#?}", notify.messages());
        }
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

/// The access token of a successful answer.
pub fn token_of(answer: &Answer) -> String {
    assert_eq!(answer["ok"], true, "{answer}");
    answer.token().to_owned()
}

/// The payload of a compact JWS, which must have three parts.
pub fn jwt_claims(token: &str) -> Value {
    use base64::Engine as _;
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "not a JWT: {} parts", parts.len());
    assert!(parts.iter().all(|p| !p.is_empty()), "empty JWT part");
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(parts[1])
        .expect("JWT payload is base64url");
    serde_json::from_slice(&payload).expect("JWT payload is JSON")
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

/// Writes `text` to `path` with mode 0600, whatever the umask.
pub fn write_private(path: &Path, text: &str) {
    write_with_mode(path, text, 0o600);
}

/// Writes `text` to `path` with mode 0644, whatever the umask: for files
/// that hold nothing secret but steer whom tokend trusts (a CA bundle, a
/// client certificate), which tokend refuses when others may write them.
pub fn write_public(path: &Path, text: &str) {
    write_with_mode(path, text, 0o644);
}

/// Creates the file with `mode` (an existing one is set to it) before a
/// byte is written, so it is never open to others, even for a moment.
fn write_with_mode(path: &Path, text: &str, mode: u32) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .unwrap_or_else(|e| panic!("failed to write {}: {e}", path.display()));
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .expect("chmod file");
    file.write_all(text.as_bytes()).expect("write file");
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

/// A copy of `tokend` (and tokend-daemon beside it) that any user can run. The build's own
/// copy may sit under a directory only root can enter (a clone made in a
/// `mktemp -d` folder is 0700), and callers under other uids must exec it.
pub fn tokend_for_anyone() -> &'static Path {
    static COPY: std::sync::OnceLock<(tempfile::TempDir, PathBuf)> = std::sync::OnceLock::new();
    let (_, path) = COPY.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod dir");
        // tokend-daemon beside it, where `tokend` looks for it.
        for (from, name) in [(TOKEND, "tokend"), (TOKEND_DAEMON, "tokend-daemon")] {
            let to = dir.path().join(name);
            std::fs::copy(from, &to).expect("copy tokend");
            std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o755))
                .expect("chmod tokend");
        }
        let path = dir.path().join("tokend");
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
