//! `tokend status` and `tokend keys` as an operator and a shell user run
//! them: the real binary against a real daemon whose issuers fail on cue
//! (the loopback issuer's faults), judged by the table, the `--json` rows
//! and the exit status a health check reads; and against a stand-in that
//! lies, whose words must reach the terminal as text.

mod support;

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::cli::{as_caller, run, terminal_commands, tokend, Ran};
use support::daemon::{
    assert_log_clean, test_user, tokend_for_anyone, Daemon, TestUser, PATIENCE, TOKEND,
    TOKEND_DAEMON,
};
use support::fake_daemon::FakeDaemon;
use support::issuer::{ClientSpec, Dialect, Fault, Issuer};
use support::keys::{secrets, Key};

const SECRET: &str = "status-secret-7f7e7d";

/// The fields of one `tokend status --json` row, as the README lists them.
const ROW_FIELDS: [&str; 13] = [
    "expires_at",
    "expires_in",
    "gets",
    "healthy",
    "issuer_requests",
    "key",
    "last_error",
    "last_success",
    "next_refresh_at",
    "next_refresh_in",
    "prefetch",
    "scopes",
    "state",
];

fn client(lifetime_secs: u64) -> ClientSpec {
    let mut spec = ClientSpec::checkout("c", SECRET, &[]);
    spec.lifetime_secs = lifetime_secs;
    spec
}

fn prefetched(name: &str, issuer: &Issuer, extra: &str) -> String {
    Key::new(name)
        .issuer(issuer, Dialect::Checkout)
        .client("c", SECRET)
        .allow_uids(&[0])
        .extra(&format!("prefetch = [[]]\n{extra}"))
        .toml()
}

fn cli(daemon: &Daemon, args: &[&str]) -> Command {
    let mut command = tokend();
    command.args(args).arg("--socket").arg(&daemon.socket);
    command
}

/// Asks the daemon's `status` until every named key's one set is in the
/// named state, and returns that answer.
async fn wait_for_states(daemon: &Daemon, want: &[(&str, &str)]) -> Value {
    let started = Instant::now();
    loop {
        let answer = daemon.call(json!({"op": "status"})).await.0;
        let health = |name: &str| {
            answer["keys"]
                .as_array()
                .and_then(|keys| keys.iter().find(|k| k["name"] == name))
                .map(|key| key["sets"][0]["health"].clone())
        };
        if want
            .iter()
            .all(|(name, state)| health(name) == Some(json!(state)))
        {
            return answer;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "never reached {want:?}: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The table's rows by key, each cut into its columns by the header's
/// column starts (the columns are left-aligned under their titles).
fn table_rows(ran: &Ran) -> Vec<(String, Vec<String>)> {
    let mut lines = ran.stdout.lines();
    let header = lines.next().expect("a header");
    let starts: Vec<usize> = [
        "KEY",
        "SCOPES",
        "PREFETCH",
        "STATE",
        "LEFT",
        "NEXT REFRESH",
        "LAST SUCCESS",
        "REQUESTS",
        "GETS",
        "LAST ERROR",
    ]
    .iter()
    .map(|title| header.find(title).expect("a column title"))
    .collect();
    lines
        .map(|line| {
            let cells: Vec<String> = starts
                .iter()
                .enumerate()
                .map(|(i, &start)| {
                    let end = starts.get(i + 1).copied().unwrap_or(line.len());
                    line.get(start..end.min(line.len()))
                        .unwrap_or("")
                        .trim()
                        .to_owned()
                })
                .collect();
            (cells[0].clone(), cells)
        })
        .collect()
}

fn row<'a>(rows: &'a [(String, Vec<String>)], key: &str) -> &'a [String] {
    &rows
        .iter()
        .find(|(name, _)| name == key)
        .unwrap_or_else(|| panic!("no row for {key}: {rows:?}"))
        .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_fresh_failing_expired_and_paused_sets_and_exits_by_their_health() {
    let steady = Issuer::start(vec![client(3600)]).await;
    let failing = Issuer::start(vec![client(2)]).await;
    let paused = Issuer::start(vec![client(2)]).await;
    let slow = Issuer::start(vec![client(2)]).await;
    let keys = [
        prefetched("steady", &steady, ""),
        prefetched("failing", &failing, ""),
        prefetched("paused", &paused, ""),
        prefetched("slow", &slow, "request_timeout = \"60s\""),
    ]
    .concat();
    let daemon = Daemon::start("", &keys);
    let all_fresh = [
        ("steady", "fresh"),
        ("failing", "fresh"),
        ("paused", "fresh"),
        ("slow", "fresh"),
    ];
    wait_for_states(&daemon, &all_fresh).await;
    for _ in 0..3 {
        let answer = daemon.call(json!({"op": "get", "key": "steady"})).await;
        assert_eq!(answer["ok"], true, "{answer}");
    }

    // Every prefetch set holds a fresh token: healthy.
    let ran = run(cli(&daemon, &["status"]), b"").await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let rows = table_rows(&ran);
    assert_eq!(rows.len(), 4, "{ran:?}");
    for (_, cells) in &rows {
        assert_eq!(cells[3], "fresh", "{ran:?}");
        assert_eq!(cells[2], "yes", "{ran:?}");
        assert_eq!(cells[9], "-", "{ran:?}");
    }
    let steady_row = row(&rows, "steady");
    assert_eq!(steady_row[1], "(default)");
    assert!(steady_row[4].starts_with("59m"), "{ran:?}");
    assert!(steady_row[5].starts_with("in "), "{ran:?}");
    assert!(steady_row[6].ends_with(" ago"), "{ran:?}");
    assert_eq!((steady_row[7].as_str(), steady_row[8].as_str()), ("1", "3"));
    assert!(
        !ran.stdout.contains('\x1b'),
        "no colour when piped: {ran:?}"
    );

    // Then each issuer misbehaves its own way, at the short-lived keys'
    // next refresh.
    failing.set_fault(Some(Fault::Status {
        status: 500,
        content_type: "application/json".into(),
        body: r#"{"error":"server_error","error_description":"database down"}"#.into(),
    }));
    paused.set_fault(Some(Fault::RetryAfter {
        status: 429,
        secs: 60,
    }));
    slow.set_fault(Some(Fault::Delay(Duration::from_secs(30))));
    wait_for_states(
        &daemon,
        &[
            ("steady", "fresh"),
            ("failing", "failing"),
            ("paused", "paused"),
            ("slow", "expired"),
        ],
    )
    .await;

    let mut printed = Vec::new();
    let ran = run(cli(&daemon, &["status"]), b"").await;
    printed.push(ran.stdout.clone());
    assert_eq!(ran.code, Some(1), "{ran:?}");
    let rows = table_rows(&ran);
    assert_eq!(row(&rows, "steady")[3], "fresh", "{ran:?}");
    let failing_row = row(&rows, "failing");
    assert_eq!(failing_row[3], "failing", "{ran:?}");
    assert!(
        failing_row[9].contains("HTTP 500") && failing_row[9].contains("database down"),
        "{ran:?}"
    );
    let paused_row = row(&rows, "paused");
    assert_eq!(paused_row[3], "paused", "{ran:?}");
    assert!(paused_row[9].contains("HTTP 429"), "{ran:?}");
    assert!(paused_row[5].starts_with("in "), "{ran:?}");
    let slow_row = row(&rows, "slow");
    assert_eq!(slow_row[3], "expired", "{ran:?}");
    assert_eq!(slow_row[4], "0s", "{ran:?}");
    assert_eq!(slow_row[5], "now", "the refresh is under way: {ran:?}");

    // The same rows for scripts, with the verdict.
    let ran = run(cli(&daemon, &["status", "--json"]), b"").await;
    printed.push(ran.stdout.clone());
    assert_eq!(ran.code, Some(1), "{ran:?}");
    let report: Value = serde_json::from_str(&ran.stdout).expect("JSON");
    assert_eq!(report["healthy"], false, "{report}");
    let sets = report["sets"].as_array().expect("sets");
    assert_eq!(sets.len(), 4, "{report}");
    for set in sets {
        let fields: BTreeSet<&str> = set
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(fields, ROW_FIELDS.into_iter().collect(), "{set}");
        assert_eq!(set["scopes"], json!([]), "{set}");
        assert_eq!(set["prefetch"], true, "{set}");
        assert!(set["issuer_requests"].as_u64().is_some_and(|n| n >= 1));
    }
    let by_key = |name: &str| {
        sets.iter()
            .find(|s| s["key"] == name)
            .unwrap_or_else(|| panic!("no {name}: {report}"))
    };
    let steady_set = by_key("steady");
    assert_eq!(steady_set["state"], "fresh");
    assert_eq!(steady_set["healthy"], true);
    assert_eq!(steady_set["gets"], 3);
    assert_eq!(steady_set["issuer_requests"], 1);
    assert_eq!(steady_set["last_error"], Value::Null);
    assert!(steady_set["expires_in"].as_u64().is_some_and(|s| s > 3500));
    assert!(steady_set["expires_at"].is_string() && steady_set["last_success"].is_string());
    let failing_set = by_key("failing");
    assert_eq!(failing_set["state"], "failing");
    assert_eq!(failing_set["healthy"], false);
    assert_eq!(failing_set["last_error"]["status"], 500, "{failing_set}");
    assert!(failing_set["last_error"]["at"].is_string(), "{failing_set}");
    let paused_set = by_key("paused");
    assert_eq!(paused_set["state"], "paused");
    assert_eq!(paused_set["last_error"]["status"], 429, "{paused_set}");
    let quiet = paused_set["next_refresh_in"].as_u64().expect("a pause end");
    assert!((30..=60).contains(&quiet), "{paused_set}");
    let slow_set = by_key("slow");
    assert_eq!(slow_set["state"], "expired");
    assert_eq!(slow_set["next_refresh_in"], 0);
    assert_eq!(slow_set["last_error"], Value::Null);

    // Unreachable is its own exit status.
    let mut command = tokend();
    command
        .args(["status", "--socket"])
        .arg(daemon.socket.with_extension("gone"));
    let ran = run(command, b"").await;
    assert_eq!(ran.code, Some(3), "{ran:?}");
    assert!(ran.stderr.contains("not running"), "{ran:?}");

    let secrets = secrets(&[&steady, &failing, &paused, &slow], &[SECRET]);
    assert_log_clean(&printed.concat(), &secrets);
    daemon.stop_and_check_log(&secrets);
}

/// `script` gives the command a terminal, as a person at a shell has.
#[tokio::test]
async fn colour_only_on_a_terminal_and_never_with_no_color() {
    let issuer = Issuer::start(vec![client(3600)]).await;
    let daemon = Daemon::start("", &prefetched("steady", &issuer, ""));
    wait_for_states(&daemon, &[("steady", "fresh")]).await;
    let line = format!(
        "{} status --socket {}",
        support::daemon::TOKEND,
        daemon.socket.display()
    );
    let on_terminal = |no_color: Option<&str>| {
        let mut command = Command::new("script");
        command.args(["-qec", &line, "/dev/null"]);
        command.env_remove("NO_COLOR").env("TERM", "xterm");
        if let Some(value) = no_color {
            command.env("NO_COLOR", value);
        }
        run(command, b"")
    };
    let ran = on_terminal(None).await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(ran.stdout.contains("\x1b[32mfresh\x1b[0m"), "{ran:?}");
    let ran = on_terminal(Some("1")).await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(
        ran.stdout.contains("fresh") && !ran.stdout.contains('\x1b'),
        "{ran:?}"
    );
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));
}

/// The daemon runs as bob, as the shipped unit runs it as `tokend`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_lists_what_a_caller_may_read_and_status_shows_tokends_own_user_every_key() {
    let alice = test_user("tokend-test-alice");
    let bob = test_user("tokend-test-bob");
    let issuer = Issuer::start(vec![ClientSpec::checkout("c", SECRET, &["a", "b"])]).await;
    let keys = [
        Key::new("alices")
            .issuer(&issuer, Dialect::Checkout)
            .client("c", SECRET)
            .allow_uids(&[alice.uid])
            .extra("scopes = [\"a\", \"b\"]\nprefetch = [[\"a\"]]")
            .toml(),
        Key::new("roots")
            .issuer(&issuer, Dialect::Checkout)
            .client("c", SECRET)
            .allow_uids(&[0])
            .extra("prefetch = [[]]")
            .toml(),
    ]
    .concat();
    let (uid, gid, groups) = (bob.uid, bob.gid, bob.groups.clone());
    let daemon = Daemon::start_with(
        tempfile::tempdir().expect("dir"),
        "socket_mode = \"0666\"",
        &keys,
        |dir| {
            for entry in [dir.to_path_buf(), dir.join("tokend.toml")] {
                std::os::unix::fs::chown(&entry, Some(uid), Some(gid)).expect("chown");
            }
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod");
            as_caller(&tokend_for_anyone().to_string_lossy(), uid, gid, &groups)
        },
    );
    let as_user = |user: &TestUser, args: &[&str]| {
        let mut command = as_caller(
            &tokend_for_anyone().to_string_lossy(),
            user.uid,
            user.gid,
            &user.groups,
        );
        command
            .env_remove("TOKEND_SOCKET")
            .args(args)
            .arg("--socket")
            .arg(&daemon.socket);
        run(command, b"")
    };

    let ran = as_user(&alice, &["keys"]).await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert_eq!(
        ran.stdout, "KEY     ALLOWED SCOPES\nalices  a b\n",
        "{ran:?}"
    );
    let ran = as_user(&alice, &["keys", "--json"]).await;
    assert_eq!(
        serde_json::from_str::<Value>(&ran.stdout).expect("JSON"),
        json!({"keys": [{"name": "alices", "scopes": ["a", "b"]}]}),
        "{ran:?}"
    );
    let ran = run(cli(&daemon, &["keys"]), b"").await;
    assert_eq!(
        ran.stdout,
        "KEY    ALLOWED SCOPES\nroots  (any the issuer grants)\n"
    );

    // Alice's status covers her key; tokend's own user sees both.
    let shown = |ran: &Ran| -> Vec<String> {
        let report: Value = serde_json::from_str(&ran.stdout).expect("JSON");
        report["sets"]
            .as_array()
            .expect("sets")
            .iter()
            .map(|s| s["key"].as_str().expect("key").to_owned())
            .collect()
    };
    let started = Instant::now();
    let ran = loop {
        let ran = as_user(&bob, &["status", "--json"]).await;
        if ran.code == Some(0) || started.elapsed() > PATIENCE {
            break ran;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert_eq!(shown(&ran), ["alices", "roots"], "{ran:?}");
    let ran = as_user(&alice, &["status", "--json"]).await;
    assert_eq!(shown(&ran), ["alices"], "{ran:?}");
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));
}

/// `--socket` may name any program, and what it says reaches a terminal:
/// every text of a lying daemon's answer (key names, scopes, times, issuer
/// words, metrics, error messages) is printed with its control characters
/// escaped, in tables, JSON and messages alike, so it can neither command
/// the terminal nor start a line that looks like one of tokend's.
#[tokio::test]
async fn a_lying_daemon_cannot_command_the_terminal_or_forge_a_row() {
    const FORGED: &str = "payments  (default)  yes  fresh";
    let evil = format!("denied\u{1b}]0;pwned\u{7}\u{1b}[2J\r\n{FORGED}\u{9b}31m\u{202e}\u{7f}");
    let fake = FakeDaemon::answering(move |request| {
        let evil = evil.as_str();
        match request["op"].as_str() {
            Some("status") => json!({"ok": true, "keys": [{
                "name": format!("k{evil}"),
                "sets": [{
                    "scopes": [evil],
                    "resource": evil,
                    "state": "failed",
                    "fetching": false,
                    "last_refresh": evil,
                    "last_error": evil,
                    "last_error_at": evil,
                    "health": "failing",
                    "prefetch": true,
                    "issuer_requests": 1,
                    "gets": 0,
                }],
            }]}),
            Some("keys") => json!({"ok": true, "keys": [{"name": evil, "scopes": [evil]}]}),
            Some("metrics") => json!({"ok": true, "text": format!("# HELP x {evil}\nx 1\n")}),
            _ => json!({"ok": false, "error": {"code": "forbidden", "message": evil}}),
        }
        .to_string()
    });
    for args in [
        &["status"][..],
        &["status", "--json"],
        &["keys"],
        &["keys", "--json"],
        &["metrics"],
        &["reload"],
        &["get", "k"],
    ] {
        for program in [TOKEND, TOKEND_DAEMON] {
            let mut command = Command::new(program);
            command
                .env_remove("TOKEND_SOCKET")
                .args(args)
                .arg("--socket")
                .arg(&fake.socket);
            let ran = run(command, b"").await;
            let what = format!("{program} {}", args.join(" "));
            assert!(
                ran.code == Some(1) || ran.code == Some(0),
                "{what}: {ran:?}"
            );
            for text in [&ran.stdout, &ran.stderr] {
                let found = terminal_commands(text);
                assert!(found.is_empty(), "{what} printed {found:?}: {ran:?}");
                // The metrics are the daemon's own lines by design; every
                // other output's lines are tokend's.
                if args != ["metrics"] {
                    assert!(
                        !text
                            .lines()
                            .any(|line| line.trim_start().starts_with(FORGED)),
                        "{what} printed a forged row: {ran:?}"
                    );
                }
            }
        }
    }
}
