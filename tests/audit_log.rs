//! The audit log's contract at the default level (`log_level = "info"`, no
//! `RUST_LOG`): a caller's flood of gets costs a handful of lines, another
//! caller's denial still appears at once, and the repeats are summed up
//! when the window ends, across a reload, and at shutdown.

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use support::daemon::{test_user, Daemon, TOKEND};
use support::issuer::{ClientSpec, Dialect, Issuer};
use support::keys::{secrets, tables, Key};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

const SECRET: &str = "audit-secret-5e5e5e";
/// The audit log's window (`tokend::audit::WINDOW`).
const WINDOW: Duration = Duration::from_secs(10);

/// The flood: of every four gets, two of key `k` (handed out), one of key
/// `f` (nobody may read it) and one of a fresh random name (no such key).
fn flood_line(i: u64) -> String {
    let request = match i % 4 {
        0 | 1 => json!({"op":"get","key":"k"}),
        2 => json!({"op":"get","key":"f"}),
        _ => json!({"op":"get","key":format!("nope-{:016x}", scramble(i))}),
    };
    format!("{request}\n")
}

/// A bijection on u64 (splitmix64's finaliser): names no one would guess,
/// reproducible from a run to the next.
fn scramble(i: u64) -> u64 {
    let mut x = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

type Answers = tokio::io::Lines<tokio::io::BufReader<OwnedReadHalf>>;

/// Sends gets `range` of the flood, pipelined, and reads every answer as
/// it comes, checking each.
async fn flood(writer: &mut OwnedWriteHalf, lines: &mut Answers, range: std::ops::Range<u64>) {
    let requests: String = range.clone().map(flood_line).collect();
    let write = async move {
        writer
            .write_all(requests.as_bytes())
            .await
            .expect("send the flood");
    };
    let read = async {
        for i in range {
            let line = tokio::time::timeout(support::daemon::PATIENCE, lines.next_line())
                .await
                .expect("an answer in time")
                .expect("read")
                .expect("an answer per request");
            let answer: serde_json::Value = serde_json::from_str(&line).expect("JSON");
            let expected = match i % 4 {
                0 | 1 => None,
                2 => Some("forbidden"),
                _ => Some("unknown_key"),
            };
            match expected {
                None => assert_eq!(answer["ok"], true, "get {i}: {}", answer["error"]),
                Some(code) => assert_eq!(answer["error"]["code"], code, "get {i}"),
            }
        }
    };
    tokio::join!(write, read);
}

/// The `repeats=N` field of a summary line.
fn repeats(line: &str) -> u64 {
    line.split_whitespace()
        .find_map(|field| field.strip_prefix("repeats="))
        .unwrap_or_else(|| panic!("no repeats field: {line}"))
        .parse()
        .expect("a count")
}

/// Waits for the summary lines containing `what` until their `repeats` add
/// up to `expected` (one line when the flood fit in one window, one per
/// window otherwise); returns the lines.
fn await_summed(daemon: &mut Daemon, what: &str, expected: u64) -> Vec<String> {
    let mut count = 1;
    loop {
        let log = daemon.wait_for_log_count(what, count);
        let lines: Vec<String> = log
            .lines()
            .filter(|l| l.contains(what))
            .map(str::to_owned)
            .collect();
        let sum: u64 = lines.iter().map(|l| repeats(l)).sum();
        if sum >= expected {
            assert_eq!(sum, expected, "{lines:#?}");
            return lines;
        }
        count = lines.len() + 1;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_gets_costs_a_few_lines_and_others_still_appear_at_once() {
    // Of every four gets, two are handouts, one forbidden, one unknown.
    const GETS: u64 = 40_000;
    const HALF: u64 = GETS / 2;
    let bob = test_user("tokend-test-bob");
    let issuer = Issuer::start(vec![ClientSpec::checkout("c", SECRET, &[])]).await;
    let key = |name: &str| {
        Key::new(name)
            .issuer(&issuer, Dialect::Checkout)
            .client("c", SECRET)
    };
    let keys = tables(&[key("k").allow_uids(&[0]), key("f")]);
    let dir = tempfile::tempdir().expect("dir");
    // No RUST_LOG: the config's log_level decides, and it is left at its
    // default, info, as a production daemon's is.
    let mut daemon = Daemon::start_with(dir, "socket_mode = \"0666\"", &keys, |_| {
        let mut command = Command::new(TOKEND);
        command.env_remove("RUST_LOG");
        command
    });
    let me = std::process::id();
    let before = daemon.log().lines().count();

    // 40,000 gets on one connection, reading answers as they come: 20,000
    // handouts, 10,000 forbidden, 10,000 of random names. Halfway the
    // configuration is reloaded: the counts must survive the new service.
    let started = Instant::now();
    let (read, mut write) = UnixStream::connect(&daemon.socket)
        .await
        .expect("connect")
        .into_split();
    let mut lines = tokio::io::BufReader::new(read).lines();
    flood(&mut write, &mut lines, 0..HALF).await;
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(daemon.pid() as i32, libc::SIGHUP) };
    let reloaded = daemon.wait_for_log("reloaded keys=");
    assert!(
        reloaded.contains("carried=1"),
        "the token is kept: {reloaded}"
    );
    flood(&mut write, &mut lines, HALF..2 * HALF).await;
    let flooded_in = started.elapsed();
    let after_flood = daemon.log().lines().count();

    // Another uid's denials are logged at once, mid-window.
    let asked = Instant::now();
    let stream = support::foreign::connect_as(&daemon.socket, bob.uid, bob.gid, &bob.groups, 1)
        .pop()
        .expect("a connection");
    let (bob_read, mut bob_write) = stream.into_split();
    let mut bob_lines = tokio::io::BufReader::new(bob_read).lines();
    for request in [
        json!({"op":"get","key":"k"}),
        json!({"op":"get","key":"no-such-key-of-bobs"}),
    ] {
        bob_write
            .write_all(format!("{request}\n").as_bytes())
            .await
            .expect("bob asks");
        bob_lines.next_line().await.expect("read").expect("answer");
    }
    let bob_field = format!("peer_uid={}", bob.uid);
    let log = daemon.wait_for_log_count_within(&bob_field, 2, Duration::from_secs(2));
    let bob_logged_in = asked.elapsed();
    let bobs: Vec<&str> = log.lines().filter(|l| l.contains(&bob_field)).collect();
    assert!(
        bobs[0].contains("denied: caller is not on the key's allow lists key=k"),
        "{bobs:#?}"
    );
    assert!(
        bobs[1].contains("denied: no such key key=no-such-key-of-bobs"),
        "{bobs:#?}"
    );

    // Each subject of the flood was logged once, in full, at once.
    let log = daemon.log();
    let root = format!("peer_uid=0 peer_pid={me}");
    let firsts = |what: &str| {
        log.lines()
            .filter(|l| l.contains(what) && l.contains(&root))
            .count()
    };
    assert_eq!(firsts("handed out a token key=k"), 1, "{log}");
    assert_eq!(
        firsts("denied: caller is not on the key's allow lists key=f"),
        1
    );
    assert_eq!(firsts("denied: no such key key=nope-"), 1);

    // When the window ends, one line sums up each subject's repeats.
    let handouts = await_summed(&mut daemon, "more handouts of key k to uid 0", GETS / 2 - 1);
    let summed_after = started.elapsed();
    let forbidden = await_summed(
        &mut daemon,
        "more denials of key f to uid 0: caller is not on the key's allow lists",
        GETS / 4 - 1,
    );
    let unknown = await_summed(
        &mut daemon,
        "more denials of keys that do not exist to uid 0",
        GETS / 4 - 1,
    );
    assert!(
        handouts[0].contains(&format!(
            "… and 19,999 more handouts of key k to uid 0 key=k scopes=[] peer_uid=0 peer_pid={me}"
        )) || handouts.len() > 1,
        "{handouts:#?}"
    );
    let after_summaries = daemon.log().lines().count();

    // At shutdown, what is still counted is written: bob's repeats of a
    // new subject, well inside its window.
    for _ in 0..3 {
        let request = json!({"op":"get","key":"f"});
        bob_write
            .write_all(format!("{request}\n").as_bytes())
            .await
            .expect("bob asks");
        bob_lines.next_line().await.expect("read").expect("answer");
    }
    let log = daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));

    println!(
        "40,000 pipelined gets ({flooded_in:?}, a reload halfway) added {} log lines; with the \
         window's summaries {} (summary of handouts {summed_after:?} after the flood began: {} \
         line(s), forbidden {}, unknown names {}); bob's denials were logged {bob_logged_in:?} \
         after he asked",
        after_flood - before,
        after_summaries - before,
        handouts.len(),
        forbidden.len(),
        unknown.len(),
    );
    for line in handouts.iter().chain(&forbidden).chain(&unknown) {
        println!("  {line}");
    }
    assert!(
        after_summaries - before <= 300,
        "{} lines for 40,000 gets",
        after_summaries - before
    );
    assert!(
        summed_after < WINDOW + Duration::from_secs(3),
        "the summary came {summed_after:?} after the flood began"
    );
    let flushed = format!(
        "… and 2 more denials of key f to uid {}: caller is not on the key's allow lists",
        bob.uid
    );
    assert!(log.contains(&flushed), "{log}");
}

/// The key every test below hands out, readable by `uids`.
fn plain_key(issuer: &Issuer, name: &str, uids: &[u32]) -> Key {
    Key::new(name)
        .issuer(issuer, Dialect::Checkout)
        .client("c", SECRET)
        .allow_uids(uids)
}

/// Runs `command` with `request` as its input; its pid and its answer.
async fn ask_as(command: Command, request: serde_json::Value) -> (u32, serde_json::Value) {
    let mut command = tokio::process::Command::from(command);
    command
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("start the caller");
    let pid = child.id().expect("a pid");
    let mut stdin = child.stdin.take().expect("stdin");
    stdin
        .write_all(format!("{request}\n").as_bytes())
        .await
        .expect("write the request");
    drop(stdin);
    let output = tokio::time::timeout(support::daemon::PATIENCE, child.wait_with_output())
        .await
        .expect("the caller ends in time")
        .expect("wait");
    let answer = serde_json::from_slice(&output.stdout).expect("one JSON answer");
    (pid, answer)
}

/// `socat` run as `user`, talking to `socket`.
fn socat_as(user: &support::daemon::TestUser, socket: &std::path::Path) -> Command {
    let mut socat = support::cli::as_caller("/usr/bin/socat", user.uid, user.gid, &user.groups);
    socat
        .arg("-")
        .arg(format!("UNIX-CONNECT:{}", socket.display()));
    socat
}

/// The one log line containing every one of `parts`.
fn the_line(log: &str, parts: &[&str]) -> String {
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| parts.iter().all(|p| l.contains(p)))
        .collect();
    assert_eq!(lines.len(), 1, "{parts:?} in:\n{log}");
    lines[0].to_owned()
}

/// Handouts and denials name the caller as the kernel recorded it (uid,
/// gid, pid) and its executable as /proc shows it: socat run as alice and
/// as bob, under uids other than the daemon's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_lines_carry_the_callers_uid_gid_pid_and_executable() {
    let alice = test_user("tokend-test-alice");
    let bob = test_user("tokend-test-bob");
    let issuer = Issuer::start(vec![ClientSpec::checkout("c", SECRET, &[])]).await;
    let keys = tables(&[plain_key(&issuer, "k", &[alice.uid])]);
    let mut daemon = Daemon::start(r#"socket_mode = "0666""#, &keys);
    let request = json!({"op":"get","key":"k"});

    let (pid, answer) = ask_as(socat_as(&alice, &daemon.socket), request.clone()).await;
    assert_eq!(answer["ok"], true, "{answer}");
    let token = answer["access_token"].as_str().expect("a token");
    let line = daemon.wait_for_log_line(&format!("peer_pid={pid} "));
    assert!(
        line.contains(&format!(
            "handed out a token key=k scopes=[] peer_uid={} peer_pid={pid} expires_in=",
            alice.uid
        )),
        "{line}"
    );
    assert!(
        line.ends_with(&format!(
            "fingerprint={} peer_gid={} peer_exe=\"/usr/bin/socat\" peer_comm=\"socat\"",
            support::daemon::fingerprint(token),
            alice.gid
        )),
        "{line}"
    );

    let (pid, answer) = ask_as(socat_as(&bob, &daemon.socket), request).await;
    assert_eq!(answer["error"]["code"], "forbidden", "{answer}");
    let line = daemon.wait_for_log_line(&format!("peer_pid={pid} "));
    assert!(
        line.ends_with(&format!(
            "denied: caller is not on the key's allow lists key=k peer_uid={} peer_pid={pid} \
             peer_gid={} peer_exe=\"/usr/bin/socat\" peer_comm=\"socat\"",
            bob.uid, bob.gid
        )),
        "{line}"
    );
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));
}

/// A process names its own `comm`, newlines included: it reaches the log
/// as one field of one line. And `comm` is read once per connection: a
/// change after the connection's first line shows on the next connection
/// only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_comm_stays_in_its_field_and_is_read_once_per_connection() {
    let issuer = Issuer::start(vec![ClientSpec::checkout("c", SECRET, &[])]).await;
    let keys = tables(&[plain_key(&issuer, "k", &[0]), plain_key(&issuer, "j", &[0])]);
    let mut daemon = Daemon::start("", &keys);
    // The kernel keeps 15 bytes of a comm: "x\nhanded out a" is 14.
    let script = r#"
import json, socket, sys
def comm(name):
    with open("/proc/self/comm", "w") as f:
        f.write(name)
def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    return s.makefile("rwb")
def ask(conn, key):
    conn.write((json.dumps({"op": "get", "key": key}) + "\n").encode())
    conn.flush()
    print(conn.readline().decode().strip())
comm("first")
one = connect()
ask(one, "k")
comm("x\nhanded out a")
ask(one, "j")
two = connect()
ask(two, "nope")
"#;
    let mut python = Command::new("/usr/bin/python3");
    python.args(["-c", script]).arg(&daemon.socket);
    let ran = support::cli::run(python, b"").await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let answers: Vec<serde_json::Value> = ran
        .stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    assert_eq!(answers[0]["ok"], true, "{answers:?}");
    assert_eq!(answers[1]["ok"], true, "{answers:?}");
    assert_eq!(answers[2]["error"]["code"], "unknown_key", "{answers:?}");

    let log = daemon.wait_for_log("denied: no such key key=nope");
    let k = the_line(&log, &["handed out a token key=k "]);
    let j = the_line(&log, &["handed out a token key=j "]);
    assert!(k.ends_with("peer_comm=\"first\""), "{k}");
    assert!(j.ends_with("peer_comm=\"first\""), "read again: {j}");
    let nope = the_line(&log, &["denied: no such key key=nope"]);
    assert!(nope.ends_with("peer_comm=\"x?handed out a\""), "{nope}");
    assert!(
        log.lines().all(|l| !l.starts_with("handed out a")),
        "a forged line:\n{log}"
    );
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));
}

/// /proc is read when a line is written, not when the caller connects: a
/// caller whose process is gone by its first audited request is logged
/// with `?` for its executable, and its request is answered as ever. The
/// connection is made by a python process, which hands it to the test and
/// exits once the daemon has answered a `ping` on it (not an audited op).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_executable_is_read_when_the_first_line_is_written_not_at_connect() {
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::process::CommandExt;

    let issuer = Issuer::start(vec![ClientSpec::checkout("c", SECRET, &[])]).await;
    let keys = tables(&[plain_key(&issuer, "k", &[0])]);
    let mut daemon = Daemon::start("", &keys);
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().expect("socketpair");
    let script = r#"
import socket, sys
channel = socket.socket(fileno=3)
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
socket.send_fds(channel, [b"x"], [s.fileno()])
channel.recv(1)
"#;
    let mut python = Command::new("/usr/bin/python3");
    python.args(["-c", script]).arg(&daemon.socket);
    let fd = theirs.as_raw_fd();
    // SAFETY: dup2 is async-signal-safe; it gives the child our end of the
    // pair as fd 3, without close-on-exec.
    unsafe {
        python.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = python.spawn().expect("start python");
    drop(theirs);
    let received = support::foreign::receive_fd(ours.as_raw_fd()).expect("the connection");
    // SAFETY: the fd was just received and is owned by nobody else.
    let stream = unsafe { std::os::unix::net::UnixStream::from_raw_fd(received) };
    stream.set_nonblocking(true).expect("nonblocking");
    let mut conn =
        support::daemon::Conn::from_stream(UnixStream::from_std(stream).expect("register"));
    // Accepted and served while the process lives.
    assert_eq!(conn.call(json!({"op":"ping"})).await["ok"], true);
    drop(ours);
    let status = child.wait().expect("python ends");
    assert!(status.success(), "{status}");
    let pid = child.id();

    let answer = conn.call(json!({"op":"get","key":"k"})).await;
    assert_eq!(answer["ok"], true, "{answer}");
    let line = daemon.wait_for_log_line(&format!("peer_pid={pid} "));
    assert!(
        line.contains("handed out a token key=k")
            && line.ends_with("peer_gid=0 peer_exe=\"?\" peer_comm=\"?\""),
        "{line}"
    );
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));
}

/// `audit = false`: handouts are not logged at info, denials are; a reload
/// applies the setting. Reloads themselves are audited with who asked:
/// `signal` for SIGHUP, the caller for the `reload` op.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_false_keeps_handouts_off_info_and_reloads_say_who_asked() {
    let alice = test_user("tokend-test-alice");
    let issuer = Issuer::start(vec![ClientSpec::checkout("c", SECRET, &[])]).await;
    let keys = tables(&[plain_key(&issuer, "k", &[0]), plain_key(&issuer, "f", &[])]);
    let dir = tempfile::tempdir().expect("dir");
    // At info, as in production: debug lines would show handouts anyway.
    let mut daemon =
        Daemon::start_with(dir, "audit = false\nsocket_mode = \"0666\"", &keys, |_| {
            let mut command = Command::new(TOKEND);
            command.env_remove("RUST_LOG");
            command
        });
    let mut conn = daemon.connect().await;
    for key in ["k", "f", "k"] {
        conn.call(json!({"op":"get","key":key})).await;
    }
    daemon.wait_for_log("denied: caller is not on the key's allow lists key=f");
    assert!(!daemon.log().contains("handed out"), "{}", daemon.log());

    // SIGHUP with audit back on: the next handout is a line of its own.
    daemon.rewrite("socket_mode = \"0666\"", &keys);
    assert!(daemon.reload_and_wait(), "{}", daemon.log());
    let line = daemon.wait_for_log_line("reload asked by SIGHUP");
    assert!(
        line.ends_with("reload asked by SIGHUP asked_by=\"signal\" outcome=\"reloaded\" keys=2"),
        "{line}"
    );
    conn.call(json!({"op":"get","key":"k"})).await;
    daemon.wait_for_log("handed out a token key=k");

    // Over the socket: root's `tokend reload` is named, alice's refused.
    let mut reload = support::cli::tokend();
    reload.arg("reload").arg("--socket").arg(&daemon.socket);
    let mut reload = tokio::process::Command::from(reload);
    let child = reload
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("tokend reload");
    let pid = child.id().expect("pid");
    let status = child.wait_with_output().await.expect("wait").status;
    assert!(status.success(), "{status}");
    let line = daemon.wait_for_log_line("reload asked over the socket asked_by");
    let exe = std::fs::canonicalize(TOKEND).expect("tokend's path");
    assert!(
        line.ends_with(&format!(
            "reload asked over the socket asked_by=\"socket\" outcome=\"reloaded\" keys=2 \
             peer_uid=0 peer_pid={pid} peer_gid=0 peer_exe={:?} peer_comm=\"tokend\"",
            exe.display().to_string()
        )),
        "{line}"
    );
    let tokend = support::daemon::tokend_for_anyone()
        .to_string_lossy()
        .into_owned();
    let mut refused = support::cli::as_caller(&tokend, alice.uid, alice.gid, &alice.groups);
    refused.arg("reload").arg("--socket").arg(&daemon.socket);
    let ran = support::cli::run(refused, b"").await;
    assert_ne!(ran.code, Some(0), "{ran:?}");
    let line = daemon.wait_for_log_line("denied: reload");
    assert!(
        line.contains(&format!("peer_uid={} ", alice.uid))
            && line.contains("peer_exe=")
            && line.ends_with("peer_comm=\"tokend\""),
        "{line}"
    );
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));
}

/// How many handout subjects (processes, scope sets, tokens) of one uid
/// and key the audit log itemises at a time
/// (`tokend::audit::ITEMISED_PER_UID_AND_KEY`).
const ITEMISED_PER_UID_AND_KEY: usize = 16;

/// `tokend get key` run as `user` against `socket`, with `args` after it.
fn get_as(user: &support::daemon::TestUser, socket: &std::path::Path, args: &[&str]) -> Command {
    let tokend = support::daemon::tokend_for_anyone().to_string_lossy();
    let mut get = support::cli::as_caller(&tokend, user.uid, user.gid, &user.groups);
    get.arg("get").args(args).arg("--socket").arg(socket);
    get
}

/// One uid that gets a token from hundreds of short-lived processes (each
/// its own subject, by pid) costs at most a bounded number of itemised
/// lines per window for that uid and key; a summary accounts for every
/// other get, exactly. Mid-flood, another uid, another key of the same uid
/// and a new kind of denial on the flooded key each get a line at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forking_callers_cost_a_bounded_number_of_lines_per_uid_and_key() {
    /// Well above the bound; small enough to run in seconds here.
    const PROCESSES: usize = 500;
    /// Processes running at once: enough to keep both cores busy.
    const AT_ONCE: usize = 8;
    let alice = test_user("tokend-test-alice");
    let bob = test_user("tokend-test-bob");
    let issuer = Issuer::start(vec![ClientSpec::checkout("c", SECRET, &[])]).await;
    let keys = tables(&[
        plain_key(&issuer, "k", &[alice.uid, bob.uid]),
        plain_key(&issuer, "j", &[alice.uid]),
    ]);
    let dir = tempfile::tempdir().expect("dir");
    // At info, as in production: no RUST_LOG.
    let mut daemon = Daemon::start_with(dir, "socket_mode = \"0666\"", &keys, |_| {
        let mut command = Command::new(TOKEND);
        command.env_remove("RUST_LOG");
        command
    });
    let socket = daemon.socket.clone();
    // Copied once, before the clock starts.
    support::daemon::tokend_for_anyone();

    // PROCESSES gets of key k by alice, each from a `tokend get` of its own.
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for worker in 0..AT_ONCE {
        let socket = socket.clone();
        workers.spawn(async move {
            let alice = test_user("tokend-test-alice");
            for _ in (worker..PROCESSES).step_by(AT_ONCE) {
                let ran = support::cli::run(get_as(&alice, &socket, &["k"]), b"").await;
                assert_eq!(ran.code, Some(0), "{ran:?}");
            }
        });
    }
    while let Some(done) = workers.join_next().await {
        done.expect("a worker");
    }
    let flooded_in = started.elapsed();

    // Still inside the flood's window: another uid, another key and a new
    // kind of denial on the flooded key are each itemised at once.
    let at_once = Duration::from_secs(2);
    let ran = support::cli::run(get_as(&bob, &socket, &["k"]), b"").await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    daemon.wait_for_log_count_within(
        &format!("handed out a token key=k scopes=[] peer_uid={} ", bob.uid),
        1,
        at_once,
    );
    let ran = support::cli::run(get_as(&alice, &socket, &["j"]), b"").await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    daemon.wait_for_log_count_within(
        &format!("handed out a token key=j scopes=[] peer_uid={} ", alice.uid),
        1,
        at_once,
    );
    let ran = support::cli::run(get_as(&alice, &socket, &["k", "--scope", "nope"]), b"").await;
    assert_eq!(ran.code, Some(1), "{ran:?}");
    daemon.wait_for_log_count_within(
        &format!(
            "denied: scopes not allowed key=k scopes=[nope] peer_uid={} ",
            alice.uid
        ),
        1,
        at_once,
    );

    // Stopping writes every summary still owed.
    let log = daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));
    let itemised = format!("handed out a token key=k scopes=[] peer_uid={} ", alice.uid);
    let itemised = log.lines().filter(|l| l.contains(&itemised)).count();
    let summed = format!("more handouts of key k to uid {} ", alice.uid);
    let summaries: Vec<&str> = log.lines().filter(|l| l.contains(&summed)).collect();
    let repeats: u64 = summaries.iter().map(|l| repeats(l)).sum();
    println!(
        "{PROCESSES} processes ({flooded_in:?}): {itemised} itemised handout lines, {} \
         summaries of {repeats} more",
        summaries.len()
    );
    for line in &summaries {
        println!("  {line}");
    }
    // Each window itemises at most the bound: one window for a flood
    // shorter than it, one more for each window it spans.
    let windows = (flooded_in.as_secs_f64() / WINDOW.as_secs_f64()).floor() as usize + 1;
    assert!(
        itemised <= ITEMISED_PER_UID_AND_KEY * windows,
        "{itemised} itemised handout lines for {PROCESSES} processes in {windows} window(s)"
    );
    assert_eq!(
        itemised as u64 + repeats,
        PROCESSES as u64,
        "every get is itemised or summed up: {summaries:#?}"
    );
    assert!(
        summaries.iter().any(|l| l.contains("not itemised")),
        "{summaries:#?}"
    );
    // Folding is announced when it starts, once per window of it.
    let announced = format!(
        "handouts of key k to uid {} are counted, not itemised, until the window ends",
        alice.uid
    );
    let announced = log.lines().filter(|l| l.contains(&announced)).count();
    assert!(
        (1..=windows).contains(&announced),
        "{announced} announcements"
    );
}

/// Issue 19, item 7 (what one caller can write to the log): a caller
/// allowed to read a key who asks for thousands of made-up scopes gets a
/// denial whose audit line stays under 1 KiB. An attacker found the scopes
/// copied whole, up to `max_request_bytes` of one info line per caller,
/// key and window, though an audit line is to carry configured values only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_made_up_scopes_reach_the_audit_line_bounded() {
    let issuer = Issuer::start(vec![ClientSpec::checkout("audit-id", SECRET, &["gateway"])]).await;
    let key = Key::new("payments")
        .issuer(&issuer, Dialect::Checkout)
        .client("audit-id", SECRET)
        .allow_uids(&[0])
        .extra("scopes = [\"gateway\"]")
        .toml();
    let mut daemon = Daemon::builder().keys(&key).start();
    let made_up: Vec<String> = (0..4_000).map(|i| format!("made-up-{i:05}")).collect();
    let answer = daemon
        .call(json!({"op":"get","key":"payments","scopes": made_up}))
        .await;
    assert_eq!(answer["error"]["code"], "scope_not_allowed", "{answer}");
    let line = daemon.wait_for_log_line("denied: scopes not allowed");
    let length = line.len();
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));
    assert!(
        length <= 1024,
        "one denial wrote a {length}-byte audit line of the caller's scopes"
    );
}
