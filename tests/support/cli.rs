//! Runs commands (`tokend` itself, `socat`, `bash`) as child processes from
//! async tests, without blocking the runtime that serves the loopback
//! issuer, and captures what they printed.
#![allow(dead_code, unreachable_pub)]

use std::fmt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use tokio::io::AsyncWriteExt;

use super::daemon::{fingerprint, Answer, PATIENCE, TOKEND};

/// A finished command: its exit code (`None` if a signal ended it) and
/// its output as text.
pub struct Ran {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// Shows stdout with tokens replaced by fingerprints: `tokend get` prints
/// tokens, and a failing assertion must not. Control characters are shown
/// escaped: a test of a lying daemon must not command the terminal of
/// whoever reads its failure.
impl fmt::Debug for Ran {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stdout: String = self.stdout.lines().map(|l| redact_line(l) + "\n").collect();
        write!(
            f,
            "exit {:?}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.code,
            escaped(&stdout),
            escaped(&self.stderr)
        )
    }
}

/// `text` with each of its [`terminal_commands`] as a `\u{…}` escape.
fn escaped(text: &str) -> String {
    let commands = terminal_commands(text);
    text.chars()
        .map(|c| {
            if commands.contains(&c) {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

/// A JSON line with its `access_token`s fingerprinted; any other line with
/// each long token-like word fingerprinted.
fn redact_line(line: &str) -> String {
    if let Ok(value) = serde_json::from_str::<serde_json::Value>(line) {
        return Answer(value).to_string();
    }
    let token_like = |w: &str| {
        w.len() >= 20
            && w.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._~+/=".contains(c))
    };
    line.split(' ')
        .map(|w| {
            if token_like(w) {
                format!("[token {}]", fingerprint(w))
            } else {
                w.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// `tokend` with no `TOKEND_SOCKET` inherited from whoever runs the tests.
pub fn tokend() -> Command {
    let mut command = Command::new(TOKEND);
    command.env_remove("TOKEND_SOCKET");
    command
}

/// `program` run as `uid`/`gid` with exactly `groups` as supplementary
/// groups: a real caller the kernel reports under that identity. All three
/// are set in the child, in that order, while it is still root (the
/// standard library's `Command::uid` would drop root before a `pre_exec`
/// hook could call `setgroups`).
pub fn as_caller(program: &str, uid: u32, gid: u32, groups: &[u32]) -> Command {
    let mut command = Command::new(program);
    let groups: Vec<libc::gid_t> = groups.to_vec();
    // SAFETY: setgroups, setgid and setuid are async-signal-safe and touch
    // only `groups`, which the closure owns; it runs in the child between
    // fork and exec.
    unsafe {
        command.pre_exec(move || {
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command
}

/// Runs `command` with `stdin` as its input; panics after [`PATIENCE`].
pub async fn run(command: Command, stdin: &[u8]) -> Ran {
    let shown = format!("{command:?}");
    let mut command = tokio::process::Command::from(command);
    command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("failed to start {shown}: {e}"));
    let mut input = child.stdin.take().expect("piped stdin");
    input.write_all(stdin).await.expect("write stdin");
    drop(input);
    let output = tokio::time::timeout(PATIENCE, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{shown} did not finish within {PATIENCE:?}"))
        .expect("wait for child");
    Ran {
        code: output.status.code(),
        stdout: String::from_utf8(output.stdout).expect("stdout is UTF-8"),
        stderr: String::from_utf8(output.stderr).expect("stderr is UTF-8"),
    }
}

/// `tokend check` on `text` written to `dir/tokend.toml` with `mode`; what
/// it printed, and the file's path as messages show it.
pub async fn check(dir: &std::path::Path, text: &str, mode: u32) -> (Ran, String) {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("tokend.toml");
    super::daemon::write_private(&path, text);
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).expect("chmod");
    let mut command = tokend();
    command.args(["check", "--config"]).arg(&path);
    (run(command, b"").await, path.display().to_string())
}

/// Asserts `check` failed with exactly one line, `FILE:LINE:COL: message`,
/// and nothing on stdout; returns the message.
pub async fn check_error(
    dir: &std::path::Path,
    text: &str,
    mode: u32,
    line: usize,
    col: usize,
) -> String {
    let (ran, path) = check(dir, text, mode).await;
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(ran.stdout.is_empty(), "{ran:?}");
    let prefix = format!("{path}:{line}:{col}: ");
    let message = ran
        .stderr
        .strip_prefix(&prefix)
        .and_then(|rest| rest.strip_suffix('\n'))
        .unwrap_or_else(|| panic!("stderr is not one {prefix}message line: {ran:?}"));
    assert!(!message.contains('\n'), "{ran:?}");
    message.to_owned()
}

/// The characters of `text` that a terminal could act on or that start a
/// line the program did not write: C0 and C1 controls but `\n`, DEL, and
/// Unicode's bidirectional and line-separating format characters.
pub fn terminal_commands(text: &str) -> Vec<char> {
    text.chars()
        .filter(|&c| {
            (c.is_control() && c != '\n')
                || matches!(c, '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
        })
        .collect()
}
