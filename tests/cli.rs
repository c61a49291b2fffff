//! The `tokend` command line: `get` and its formats and exit codes,
//! `check` and its `FILE:LINE:COL: message` errors, `--help`, the
//! `socat` one-liner the README promises works without tokend's client,
//! and the client against a daemon that lies or never finishes.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::time::Instant;

use serde_json::{json, Value};
use support::cli::{check, check_error, run, terminal_commands, tokend, Ran};
use support::daemon::{
    assert_issued, assert_same_token, fingerprint, write_private, Answer, Daemon, TOKEND,
    TOKEND_DAEMON,
};
use support::fake_daemon::{FakeDaemon, FullBacklog};
use support::issuer::{ClientSpec, Dialect, Issuer};
use support::keys::{secrets, Key};

const SECRET: &str = "cli-secret-5d4c3b";
const FILE_SECRET: &str = "cli-file-secret-8a7b6c";

async fn setup() -> (Issuer, Daemon) {
    let issuer = Issuer::start(vec![ClientSpec::checkout(
        "cli-client",
        SECRET,
        &["gateway", "vault", "fx"],
    )])
    .await;
    let keys = Key::new("payments")
        .issuer(&issuer, Dialect::Checkout)
        .client("cli-client", SECRET)
        .allow_uids(&[0])
        .extra(r#"scopes = ["gateway", "vault", "fx"]"#)
        .toml();
    let daemon = Daemon::start("", &keys);
    (issuer, daemon)
}

fn get(daemon: &Daemon, args: &[&str]) -> Command {
    let mut command = tokend();
    command
        .arg("get")
        .args(args)
        .arg("--socket")
        .arg(&daemon.socket);
    command
}

/// The single line on stdout of a successful run.
fn line(ran: &Ran) -> &str {
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(ran.stderr.is_empty(), "{ran:?}");
    let line = ran.stdout.strip_suffix('\n').expect("ends in a newline");
    assert!(!line.contains('\n'), "{ran:?}");
    line
}

#[tokio::test]
async fn get_prints_token_header_or_json() {
    let (issuer, daemon) = setup().await;
    let token = line(&run(get(&daemon, &["payments"]), b"").await).to_owned();
    assert_issued(&issuer.issued_tokens(), &[&token]);

    let ran = run(get(&daemon, &["payments", "--format", "header"]), b"").await;
    assert!(
        line(&ran) == format!("Authorization: Bearer {token}"),
        "not the header for token {}: {ran:?}",
        fingerprint(&token)
    );

    let ran = run(get(&daemon, &["payments", "--format", "json"]), b"").await;
    let answer = Answer(serde_json::from_str(line(&ran)).expect("JSON"));
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(answer["key"], "payments", "{answer}");
    assert_same_token(answer.token(), &token, true, "the JSON answer's token");
    assert_eq!(answer["token_type"], "Bearer", "{answer}");
    assert_eq!(
        issuer.requests().len(),
        1,
        "all three were the cached token"
    );
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));
}

#[tokio::test]
async fn get_sends_every_scope_flag() {
    let (issuer, daemon) = setup().await;
    let args = [
        "payments", "--scope", "vault", "--scope", "gateway", "--format", "json",
    ];
    let ran = run(get(&daemon, &args), b"").await;
    let answer = Answer(serde_json::from_str(line(&ran)).expect("JSON"));
    assert_eq!(answer["scopes"], json!(["gateway", "vault"]), "{answer}");
    let requests = issuer.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].param("scope"), Some("gateway vault"));
    assert_eq!(
        issuer.issued_tokens(),
        [answer["access_token"].as_str().expect("token")]
    );

    // A scope the key does not allow is the daemon's refusal: exit 1.
    let ran = run(get(&daemon, &["payments", "--scope", "admin"]), b"").await;
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(ran.stderr.contains("admin"), "{ran:?}");
    assert!(ran.stdout.is_empty(), "{ran:?}");
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));
}

#[tokio::test]
async fn get_takes_the_socket_from_tokend_socket() {
    let (issuer, daemon) = setup().await;
    let mut command = tokend();
    command
        .args(["get", "payments"])
        .env("TOKEND_SOCKET", &daemon.socket);
    let token = line(&run(command, b"").await).to_owned();
    assert_issued(&issuer.issued_tokens(), &[&token]);

    // --socket wins over the environment.
    let mut command = get(&daemon, &["payments"]);
    command.env("TOKEND_SOCKET", daemon.dir.path().join("elsewhere.sock"));
    line(&run(command, b"").await);
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));
}

#[tokio::test]
async fn get_unknown_key_exits_1_with_the_daemons_message() {
    let (issuer, daemon) = setup().await;
    let ran = run(get(&daemon, &["nosuch"]), b"").await;
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert_eq!(ran.stderr, "tokend: no key named \"nosuch\"\n");
    assert!(ran.stdout.is_empty(), "{ran:?}");
    assert!(issuer.requests().is_empty());
    daemon.stop_and_check_log(&[SECRET]);
}

#[tokio::test]
async fn get_without_a_daemon_exits_3() {
    let dir = tempfile::tempdir().expect("temp dir");
    // Nothing at the path, and a socket file nobody listens on any more.
    let missing = dir.path().join("missing.sock");
    let stale = dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).expect("bind"));
    assert!(stale.exists());
    for path in [&missing, &stale] {
        let mut command = tokend();
        command.args(["get", "payments", "--socket"]).arg(path);
        let ran = run(command, b"").await;
        assert_eq!(ran.code, Some(3), "{ran:?}");
        assert!(
            ran.stderr.starts_with(&format!(
                "tokend: tokend is not running at {} (",
                path.display()
            )),
            "{ran:?}"
        );
        assert!(ran.stdout.is_empty(), "{ran:?}");
    }
}

const KEY_HEAD: &str = "[keys.a]\ntoken_url = \"https://issuer.example/t\"\nclient_id = \"i\"\n";

#[tokio::test]
async fn check_accepts_a_valid_config() {
    let dir = tempfile::tempdir().expect("temp dir");
    let text = format!("{KEY_HEAD}client_secret = \"{SECRET}\"\nallow_uids = [0]\n");
    let (ran, path) = check(dir.path(), &text, 0o600).await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert_eq!(ran.stdout, format!("{path}: ok (1 keys)\n"));
    assert!(ran.stderr.is_empty(), "{ran:?}");

    // Valid but unreadable by anyone: a warning, still exit 0.
    let text = format!("{KEY_HEAD}client_secret = \"{SECRET}\"\n");
    let (ran, _) = check(dir.path(), &text, 0o600).await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(ran.stderr.contains("nobody can read it"), "{ran:?}");
}

#[tokio::test]
async fn check_errors_name_file_line_and_column() {
    let dir = tempfile::tempdir().expect("temp dir");
    let dir = dir.path();
    let message = check_error(dir, "[daemon]\nsockett = \"/x\"\n", 0o600, 2, 1).await;
    assert!(message.starts_with("unknown field `sockett`, expected one of `socket`"));
    // Indented, in a key: the column counts.
    let text = format!("{KEY_HEAD}  client_idd = \"x\"\nclient_secret = \"s\"\n");
    let message = check_error(dir, &text, 0o600, 4, 3).await;
    assert!(
        message.starts_with("unknown field `client_idd`"),
        "{message}"
    );

    let message = check_error(dir, "[daemon]\nidle_timeout = \"soon\"\n", 0o600, 2, 16).await;
    assert!(message.starts_with("bad duration \"soon\""), "{message}");
    let message = check_error(dir, "[daemon]\nsocket_mode = \"0999\"\n", 0o600, 2, 15).await;
    assert_eq!(
        message,
        "bad mode \"0999\": write an octal string such as \"0660\""
    );

    // The secret-source errors point at the key's table header.
    let both =
        format!("# tokend\n\n{KEY_HEAD}client_secret = \"s\"\nclient_secret_file = \"/f\"\n");
    let message = check_error(dir, &both, 0o600, 3, 1).await;
    assert_eq!(
        message,
        "key \"a\" sets both client_secret and client_secret_file; keep exactly one"
    );
    let neither = format!("# tokend\n\n{KEY_HEAD}");
    let message = check_error(dir, &neither, 0o600, 3, 1).await;
    assert_eq!(
        message,
        "key \"a\" needs client_secret or client_secret_file"
    );
}

#[tokio::test]
async fn check_refuses_a_secret_file_others_can_read() {
    let dir = tempfile::tempdir().expect("temp dir");
    let secret = dir.path().join("client.secret");
    write_private(&secret, &format!("{FILE_SECRET}\n"));
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let text = format!(
        "{KEY_HEAD}client_secret_file = {:?}\nallow_uids = [0]\n",
        secret.display().to_string()
    );
    let message = check_error(dir.path(), &text, 0o600, 1, 1).await;
    assert!(
        message.contains(&secret.display().to_string()) && message.contains("chmod 0600"),
        "{message}"
    );
    assert!(!message.contains(FILE_SECRET));

    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let (ran, _) = check(dir.path(), &text, 0o600).await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
}

/// The trailing newline of a secret file is not part of the secret: the
/// issuer, which knows the secret without it, hands out a token.
#[tokio::test]
async fn a_secret_file_with_a_trailing_newline_works() {
    let issuer = Issuer::start(vec![ClientSpec::checkout("file-client", FILE_SECRET, &[])]).await;
    let secret_dir = tempfile::tempdir().expect("temp dir");
    let secret = secret_dir.path().join("client.secret");
    write_private(&secret, &format!("{FILE_SECRET}\n"));
    let keys = Key::new("filed")
        .issuer(&issuer, Dialect::Checkout)
        .client_id("file-client")
        .secret_file(&secret)
        .allow_uids(&[0])
        .toml();
    let daemon = Daemon::start("", &keys);
    let mut command = tokend();
    command.args(["check", "--config"]).arg(&daemon.config_path);
    let ran = run(command, b"").await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let token = line(&run(get(&daemon, &["filed"]), b"").await).to_owned();
    assert_issued(&issuer.issued_tokens(), &[&token]);
    daemon.stop_and_check_log(&secrets(&[&issuer], &[FILE_SECRET]));
}

#[tokio::test]
async fn check_refuses_an_inline_secret_in_a_world_readable_config() {
    let dir = tempfile::tempdir().expect("temp dir");
    let text = format!("{KEY_HEAD}client_secret = \"{SECRET}\"\nallow_uids = [0]\n");
    let message = check_error(dir.path(), &text, 0o644, 1, 1).await;
    let path = dir.path().join("tokend.toml");
    assert_eq!(
        message,
        format!(
            "key \"a\" has an inline client_secret but {} is readable by others \
             (mode 0644); chmod 0600 it or use client_secret_file",
            path.display()
        )
    );
    assert!(!message.contains(SECRET));
    // Readable by its group is refused too (issue 9: it used to pass).
    let message = check_error(dir.path(), &text, 0o640, 1, 1).await;
    assert!(
        message.contains("is readable by group or others (mode 0640)"),
        "{message}"
    );
    let (ran, _) = check(dir.path(), &text, 0o600).await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
}

#[tokio::test]
async fn help_lists_subcommands_and_flags() {
    let mut command = tokend();
    command.arg("--help");
    let ran = run(command, b"").await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    for word in ["serve", "get", "check", "Usage: tokend"] {
        assert!(ran.stdout.contains(word), "--help lacks {word:?}: {ran:?}");
    }

    let mut command = tokend();
    command.args(["get", "--help"]);
    let ran = run(command, b"").await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    for word in [
        "<KEY>",
        "--scope <SCOPE>",
        "--socket <PATH>",
        "TOKEND_SOCKET",
        "--format",
        "token",
        "header",
        "json",
        "--timeout",
        "Exit status",
    ] {
        assert!(
            ran.stdout.contains(word),
            "get --help lacks {word:?}: {ran:?}"
        );
    }
}

/// The README's contract: any program that can write a line to a Unix
/// socket can get a token, here `socat` fed by a bash here-string.
#[tokio::test]
async fn the_readme_socat_one_liner_gets_a_token() {
    let (issuer, daemon) = setup().await;
    let mut bash = Command::new("bash");
    bash.arg("-c")
        .arg(r#"socat - UNIX-CONNECT:"$SOCK" <<< '{"op":"get","key":"payments"}'"#)
        .env("SOCK", &daemon.socket);
    let ran = run(bash, b"").await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let answer: Value = serde_json::from_str(&ran.stdout).expect("one JSON answer");
    assert_eq!(answer["ok"], true, "{answer}");
    let token = answer["access_token"].as_str().expect("access_token");
    assert_issued(&issuer.issued_tokens(), &[token]);
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));
}

/// A `get` answer as a daemon writes it, with `token` and `token_type`.
fn token_answer(token: &str, token_type: &str) -> String {
    json!({
        "ok": true,
        "key": "k",
        "access_token": token,
        "token_type": token_type,
        "expires_in": 3600,
        "expires_at": "2030-01-01T00:00:00Z",
        "scopes": [],
    })
    .to_string()
}

/// `tokend get --socket` may be pointed at any program: what it prints is
/// what a shell pastes into a header or a terminal shows, so an answer
/// that is not visible ASCII where a token is printed (RFC 6749 A.12:
/// `1*VSCHAR`, without spaces around it, as the daemon requires of an
/// issuer's token), or that holds a control character anywhere, is refused
/// in every format, by both programs, without the token in the message.
#[tokio::test]
async fn get_refuses_to_print_control_characters_from_any_daemon() {
    let hostile = "eyJ.ok\u{1b}]0;pwned\u{7}\u{1b}[2J\r\nX-Injected: yes";
    let clean = token_answer("eyJ.ok-_~+/=", "Bearer");
    let cases = [
        (
            "ESC, BEL, CR and LF in the token",
            token_answer(hostile, "Bearer"),
        ),
        ("DEL in the token", token_answer("eyJ.ok\u{7f}", "Bearer")),
        (
            "a C1 CSI in the token",
            token_answer("eyJ.ok\u{9b}2J", "Bearer"),
        ),
        ("a non-ASCII token", token_answer("eyJ.ok\u{e9}", "Bearer")),
        ("an empty token", token_answer("", "Bearer")),
        // What the daemon refuses from an issuer: HTTP would drop them.
        ("a token of spaces", token_answer("   ", "Bearer")),
        ("a leading space", token_answer(" eyJ.ok", "Bearer")),
        ("a trailing space", token_answer("eyJ.ok ", "Bearer")),
        (
            "CR LF in the token_type",
            token_answer("eyJ.ok", "Bearer\r\nX-Injected: yes"),
        ),
        (
            "a raw C1 CSI in the key",
            clean.replace("\"k\"", "\"k\u{9b}2J\""),
        ),
        (
            "a raw CR between members",
            clean.replace(",\"key\"", ",\r\"key\""),
        ),
    ];
    for (what, answer) in cases {
        let fake = FakeDaemon::answering(move |_| answer.clone());
        for format in ["token", "header", "json"] {
            for program in [TOKEND, TOKEND_DAEMON] {
                let mut command = Command::new(program);
                command
                    .env_remove("TOKEND_SOCKET")
                    .args(["get", "k", "--format", format, "--socket"])
                    .arg(&fake.socket);
                let ran = run(command, b"").await;
                let case = format!("{what}, {program} --format {format}");
                assert_eq!(ran.code, Some(1), "{case}: {ran:?}");
                assert!(ran.stdout.is_empty(), "{case}: printed {ran:?}");
                assert!(
                    ran.stderr.starts_with("tokend: ") && ran.stderr.contains("not printed"),
                    "{case}: {ran:?}"
                );
                assert!(
                    terminal_commands(&ran.stderr).is_empty()
                        && !ran.stderr.contains("eyJ")
                        && !ran.stderr.contains("pwned"),
                    "{case}: the message repeats the answer: {ran:?}"
                );
            }
        }
    }

    // The same daemon with a token of visible ASCII is printed as it is.
    let fake = FakeDaemon::answering(move |_| clean.clone());
    let mut command = tokend();
    command
        .args(["get", "k", "--format", "header", "--socket"])
        .arg(&fake.socket);
    let ran = run(command, b"").await;
    assert_eq!(line(&ran), "Authorization: Bearer eyJ.ok-_~+/=");
}

/// The client subcommands that talk to a daemon, as argument lists.
const CLIENT_COMMANDS: [&[&str]; 5] = [
    &["get", "k"],
    &["status"],
    &["keys"],
    &["reload"],
    &["metrics"],
];

/// `--timeout` is a deadline for the whole exchange: a daemon that answers
/// one byte every half second, never a whole line, does not keep any
/// client subcommand of either program past it. They exit 3 and say so.
#[tokio::test]
async fn the_timeout_is_a_deadline_for_the_whole_exchange() {
    let fake = FakeDaemon::dripping(Duration::from_millis(500));
    every_client_command_ends_at_its_timeout(&fake.socket).await;
}

/// The deadline starts before the connect: a daemon that stopped
/// accepting, its listen backlog full, does not hold a caller either.
#[tokio::test]
async fn the_timeout_bounds_a_connect_to_a_full_backlog() {
    let full = FullBacklog::start();
    every_client_command_ends_at_its_timeout(&full.socket).await;
}

/// Runs every client subcommand of both programs against `socket` with
/// `--timeout 2s`, all at once, and fails unless each exits 3 saying so
/// after 2 s and before 4 s.
async fn every_client_command_ends_at_its_timeout(socket: &Path) {
    let timeout = Duration::from_secs(2);
    // Start-up and exit of a process, on a loaded machine.
    let margin = Duration::from_secs(2);
    let mut children = Vec::new();
    for program in [TOKEND, TOKEND_DAEMON] {
        for args in CLIENT_COMMANDS {
            let mut command = tokio::process::Command::new(program);
            command
                .env_remove("TOKEND_SOCKET")
                .args(args)
                .arg("--socket")
                .arg(socket)
                .args(["--timeout", "2s"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .kill_on_drop(true);
            let started = Instant::now();
            let child = command.spawn().expect("spawn");
            children.push((format!("{program} {}", args.join(" ")), started, child));
        }
    }
    for (what, started, child) in children {
        let out = tokio::time::timeout_at(started + timeout + margin, child.wait_with_output())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "{what} --timeout 2s was still running {:?} after it started",
                    timeout + margin
                )
            })
            .expect("wait");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            started.elapsed() >= timeout,
            "{what} gave up early: {stderr}"
        );
        assert_eq!(out.status.code(), Some(3), "{what}: {stderr}");
        assert_eq!(
            stderr,
            format!(
                "tokend: tokend at {} did not answer within 2s\n",
                socket.display()
            ),
            "{what}"
        );
        assert!(out.stdout.is_empty(), "{what}");
    }
}

/// A timeout of 0 would never wait at all: it is a usage error (exit 2)
/// in both programs, not an unreachable daemon (exit 3).
#[tokio::test]
async fn a_zero_timeout_is_a_usage_error() {
    let fake = FakeDaemon::answering(|_| token_answer("eyJ.ok", "Bearer"));
    for program in [TOKEND, TOKEND_DAEMON] {
        for args in CLIENT_COMMANDS {
            for zero in ["0s", "0ms"] {
                let mut command = Command::new(program);
                command
                    .env_remove("TOKEND_SOCKET")
                    .args(args)
                    .arg("--socket")
                    .arg(&fake.socket)
                    .args(["--timeout", zero]);
                let ran = run(command, b"").await;
                let what = format!("{program} {} --timeout {zero}", args.join(" "));
                assert_eq!(ran.code, Some(2), "{what}: {ran:?}");
                assert!(
                    ran.stderr.contains(&format!(
                        "invalid value '{zero}' for '--timeout <DURATION>'"
                    )),
                    "{what}: {ran:?}"
                );
                assert!(ran.stdout.is_empty(), "{what}: {ran:?}");
            }
        }
    }
}
