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
