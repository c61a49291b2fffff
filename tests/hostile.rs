//! Hostile local callers: garbage on the socket, an endless line, and
//! attempts to read the daemon's memory. Each test runs the real binary.

mod support;

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::Command;

use serde_json::json;
use support::cli::{as_caller, run};
use support::daemon::{test_user, tokend_for_anyone, Daemon, TOKEND};
use support::issuer::{ClientSpec, Dialect, Issuer};
use support::keys::{secrets, Key};

const SECRET: &str = "hostile-secret-4d4d4d";

async fn issuer() -> Issuer {
    Issuer::start(vec![ClientSpec::checkout("c", SECRET, &[])]).await
}

fn keys(issuer: &Issuer) -> String {
    Key::new("k")
        .issuer(issuer, Dialect::Checkout)
        .client("c", SECRET)
        .allow_uids(&[0])
        .toml()
}

/// A reproducible stream of bytes (xorshift), so a failure can be rerun.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test]
async fn garbage_gets_bad_request_and_the_daemon_keeps_serving() {
    let issuer = issuer().await;
    let daemon = Daemon::start("", &keys(&issuer));
    let mut cases: Vec<(String, Vec<u8>)> = vec![
        ("invalid UTF-8".into(), b"{\"op\":\"p\xffing\"}".to_vec()),
        (
            "lone continuation bytes".into(),
            vec![0x80, 0xbf, 0xc0, 0xc1],
        ),
        ("100,000 [".into(), vec![b'['; 100_000]),
        ("100,000 {\"a\":".into(), b"{\"a\":".repeat(20_000)),
        (
            "huge integer".into(),
            format!("{{\"op\":\"ping\",\"id\":{}}}", "9".repeat(400)).into_bytes(),
        ),
        (
            "huge exponent".into(),
            b"{\"op\":\"ping\",\"id\":1e999999}".to_vec(),
        ),
        (
            "duplicate keys".into(),
            b"{\"op\":\"get\",\"key\":\"k\",\"key\":\"k\"}".to_vec(),
        ),
        ("NUL bytes".into(), b"{\"op\":\"ping\"}\0\0".to_vec()),
        (
            "NUL inside a string".into(),
            b"{\"op\":\"pi\0ng\"}".to_vec(),
        ),
    ];
    for seed in 1..=20u64 {
        let mut bytes = noise(seed, 1 + (seed as usize * 997) % 5000);
        bytes.retain(|&b| b != b'\n');
        cases.push((format!("noise seed {seed}"), bytes));
    }
    for (name, mut bytes) in cases {
        let mut conn = daemon.connect().await;
        bytes.push(b'\n');
        conn.send_raw(&bytes).await;
        let answer = conn.recv().await;
        let code = answer["error"]["code"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(
            code == "bad_request" || code == "too_large",
            "{name}: {answer}"
        );
        if code == "bad_request" {
            assert_eq!(
                conn.call(json!({"op":"ping"})).await["ok"],
                true,
                "{name}: connection survives"
            );
        }
    }
    assert_eq!(
        daemon.call(json!({"op":"get","key":"k"})).await["ok"],
        true,
        "still serving"
    );
    // A key name is the caller's text: a newline in it must not start a
    // line of its own in the log.
    let forged = daemon
        .call(json!({"op":"get","key":"x\nFORGED tokend::service: handed out a token"}))
        .await;
    assert_eq!(forged["error"]["code"], "unknown_key", "{forged}");
    assert!(
        !daemon.log().lines().any(|l| l.starts_with("FORGED")),
        "a caller forged a log line"
    );
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));
}

/// A line of /proc/PID/status, in KiB: `VmRSS` (resident now) or `VmHWM`
/// (the peak).
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let line = status
        .lines()
        .find(|l| l.split(':').next() == Some(field))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"));
    line.split_whitespace()
        .nth(1)
        .expect("value")
        .parse()
        .expect("kib")
}

#[tokio::test]
async fn an_endless_line_is_cut_off_at_the_limit_without_growing_memory() {
    let issuer = issuer().await;
    let daemon = Daemon::start("", &keys(&issuer));
    let before = proc_status_kib(daemon.pid(), "VmHWM");
    let mut conn = daemon.connect().await;
    let writer_half = tokio::spawn({
        let mut conn_writer = support::daemon::Conn::open(&daemon.socket).await;
        async move {
            // 10 MB, no newline, in 64 KiB writes; stops when tokend hangs up.
            let chunk = vec![b'x'; 64 * 1024];
            let mut sent = 0usize;
            while sent < 10_000_000 {
                if tokio::io::AsyncWriteExt::write_all(&mut conn_writer.writer, &chunk)
                    .await
                    .is_err()
                {
                    break;
                }
                sent += chunk.len();
            }
            (sent, conn_writer.recv_line().await)
        }
    });
    let (sent, answer) = writer_half.await.expect("writer");
    let answer: serde_json::Value =
        serde_json::from_str(&answer.expect("an answer")).expect("json");
    assert_eq!(answer["error"]["code"], "too_large", "{answer}");
    println!("tokend answered too_large after {sent} of 10,000,000 bytes were written");
    assert!(
        sent < 10_000_000,
        "tokend read the whole line before answering"
    );
    // The same daemon still answers others.
    assert_eq!(conn.call(json!({"op":"ping"})).await["ok"], true);
    let after = proc_status_kib(daemon.pid(), "VmHWM");
    println!("VmHWM {before} KiB before, {after} KiB after");
    assert!(
        after.saturating_sub(before) < 4096,
        "peak RSS grew {} KiB",
        after - before
    );
    daemon.stop_and_check_log(&[SECRET]);
}

#[tokio::test]
async fn a_same_uid_process_cannot_read_the_daemons_memory_or_environment() {
    let bob = test_user("tokend-test-bob");
    let issuer = issuer().await;
    let dir = tempfile::tempdir().expect("dir");
    let uid = bob.uid;
    let (gid, groups) = (bob.gid, bob.groups.clone());
    let daemon = Daemon::start_with(dir, "", &keys(&issuer), |dir| {
        // The daemon runs as bob; bob must own its directory and config.
        for entry in [dir.to_path_buf(), dir.join("tokend.toml")] {
            std::os::unix::fs::chown(&entry, Some(uid), Some(gid)).expect("chown");
        }
        let mut command = as_caller(&tokend_for_anyone().to_string_lossy(), uid, gid, &groups);
        command.env("TOKEND_PROBE", SECRET);
        command
    });
    let pid = daemon.pid();
    // A control: bob can read the environment of his own ordinary process.
    let mut control = as_caller("sleep", uid, bob.gid, &bob.groups);
    let mut control = control.arg("30").spawn().expect("sleep as bob");
    let read = |path: String| {
        let mut cat = as_caller("cat", uid, bob.gid, &bob.groups);
        cat.arg(path);
        run(cat, b"")
    };
    let control_read = read(format!("/proc/{}/environ", control.id())).await;
    assert_eq!(control_read.code, Some(0), "control: {control_read:?}");
    for file in ["environ", "mem"] {
        let ran = read(format!("/proc/{pid}/{file}")).await;
        assert_ne!(ran.code, Some(0), "bob read the daemon's {file}: {ran:?}");
        assert!(ran.stderr.contains("Permission denied"), "{file}: {ran:?}");
        assert!(!ran.stdout.contains(SECRET));
    }
    let _ = control.kill();
    let _ = control.wait();
    daemon.stop_and_check_log(&[SECRET]);
}

/// Kills the daemon with SIGSEGV. Rust's runtime catches the first SIGSEGV
/// (to report stack overflows), restores the default action and returns,
/// so a SIGSEGV sent with kill(2) rather than raised by a fault takes a
/// second one to act; we send it until the process is gone.
fn segfault(daemon: &mut Daemon) -> std::process::ExitStatus {
    let pid = daemon.pid();
    for _ in 0..50 {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(pid as i32, libc::SIGSEGV) };
        if let Some(status) = daemon.wait_timeout(std::time::Duration::from_millis(100)) {
            return status;
        }
    }
    panic!("tokend survived SIGSEGV");
}

#[tokio::test]
async fn a_crash_leaves_no_core_dump() {
    let issuer = issuer().await;
    // Allow core dumps in the child, so only tokend's own setting can stop them.
    fn allow_cores(command: &mut Command) {
        // SAFETY: setrlimit is async-signal-safe; it runs between fork and exec.
        unsafe {
            command.pre_exec(|| {
                let unlimited = libc::rlimit {
                    rlim_cur: libc::RLIM_INFINITY,
                    rlim_max: libc::RLIM_INFINITY,
                };
                if libc::setrlimit(libc::RLIMIT_CORE, &unlimited) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    // The control: an ordinary process in the same conditions does dump
    // core, so a pass below means something.
    let control_dir = tempfile::tempdir().expect("dir");
    let mut sleeper = Command::new("sleep");
    sleeper.arg("30").current_dir(control_dir.path());
    allow_cores(&mut sleeper);
    let mut sleeper = sleeper.spawn().expect("sleep");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(sleeper.id() as i32, libc::SIGSEGV) };
    assert!(
        sleeper.wait().expect("wait").core_dumped(),
        "the control process should dump core here"
    );

    let dir = tempfile::tempdir().expect("dir");
    let mut daemon = Daemon::start_with(dir, "", &keys(&issuer), |dir| {
        let mut command = Command::new(TOKEND);
        command.current_dir(dir);
        allow_cores(&mut command);
        command
    });
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", daemon.pid())).expect("limits");
    let core_line = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("core limit");
    assert_eq!(
        core_line.split_whitespace().collect::<Vec<_>>()[4..6],
        ["0", "0"],
        "{core_line}"
    );
    assert_eq!(daemon.call(json!({"op":"get","key":"k"})).await["ok"], true);
    let status = segfault(&mut daemon);
    assert_eq!(status.signal(), Some(libc::SIGSEGV));
    assert!(!status.core_dumped(), "tokend dumped core");
    let cores: Vec<_> = std::fs::read_dir(&daemon.dir)
        .expect("dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("core"))
        .collect();
    assert!(cores.is_empty(), "core files: {cores:?}");
}

/// How a connection ended, seen from the caller's side.
#[derive(Debug)]
struct Ending {
    /// The answer the daemon sent before closing, if any.
    answer: Option<String>,
    /// From `since` to the close.
    after: std::time::Duration,
}

/// Reads `stream` to its end (EOF or reset), keeping the first line.
async fn ending(
    stream: tokio::net::UnixStream,
    since: std::time::Instant,
    limit: std::time::Duration,
) -> Option<Ending> {
    use tokio::io::AsyncReadExt;
    let mut stream = stream;
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    let read_all = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(limit, read_all).await.ok()?;
    let answer = (!got.is_empty()).then(|| {
        String::from_utf8_lossy(&got)
            .lines()
            .next()
            .unwrap_or("")
            .to_owned()
    });
    Some(Ending {
        answer,
        after: since.elapsed(),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hogs_and_slow_drips_do_not_keep_others_from_their_tokens() {
    use std::time::{Duration, Instant};
    let hog = test_user("tokend-test-bob");
    let dripper = test_user("tokend-test-alice");
    let issuer = issuer().await;
    let limits = "max_connections = 4096\nmax_connections_per_uid = 256\nidle_timeout = \"5s\"\n\
                  request_timeout_client = \"2s\"\nsocket_mode = \"0666\"";
    let mut daemon = Daemon::start(limits, &keys(&issuer));
    // Warm the cache so the timed get below measures serving, not the issuer.
    assert_eq!(daemon.call(json!({"op":"get","key":"k"})).await["ok"], true);

    let hogged_at = Instant::now();
    let hogs = support::foreign::connect_as(&daemon.socket, hog.uid, hog.gid, &hog.groups, 2000);
    let hog_endings: Vec<_> = hogs
        .into_iter()
        .map(|s| tokio::spawn(ending(s, hogged_at, Duration::from_secs(10))))
        .collect();

    let dripped_at = Instant::now();
    let drips = support::foreign::connect_as(
        &daemon.socket,
        dripper.uid,
        dripper.gid,
        &dripper.groups,
        100,
    );
    let mut drip_endings = Vec::new();
    for mut stream in drips {
        tokio::io::AsyncWriteExt::write_all(&mut stream, b"{\"op\":\"get\",\"ke")
            .await
            .expect("half a line");
        drip_endings.push(tokio::spawn(ending(
            stream,
            dripped_at,
            Duration::from_secs(10),
        )));
    }

    // Measure once the daemon has taken in the whole burst (the hog's
    // refusals and every accepted connection), in the state the attack
    // holds it in, not while its accept queue is still full.
    daemon.wait_for_log_count("refused a connection", 2000 - 256);
    daemon.wait_for_log_count("connection opened", 1 + 256 + 100);
    let mut conn = daemon.connect().await;
    let started = Instant::now();
    let answer = conn.call(json!({"op":"get","key":"k"})).await;
    let took = started.elapsed();
    println!("with 2,000 hog and 100 slow-drip connections open, a get took {took:?}");
    assert_eq!(answer["ok"], true, "{answer}");
    assert!(took < Duration::from_millis(100), "{took:?}");

    let mut busy = 0;
    let mut idle_closed = Vec::new();
    for ending in hog_endings {
        let ending = ending
            .await
            .expect("task")
            .expect("every hog connection is closed within 10 s");
        match &ending.answer {
            Some(line) => {
                assert!(
                    line.contains("\"busy\"") && line.contains("max_connections_per_uid"),
                    "{line}"
                );
                busy += 1;
            }
            None => idle_closed.push(ending.after),
        }
    }
    let slowest_idle = idle_closed.iter().max().copied().unwrap_or_default();
    println!(
        "hog: {busy} answered busy, {} held and closed as idle, the last after {slowest_idle:?}",
        idle_closed.len()
    );
    assert_eq!(busy, 2000 - 256);
    assert_eq!(idle_closed.len(), 256);
    assert!(slowest_idle < Duration::from_secs(6), "{slowest_idle:?}");
    assert!(
        idle_closed
            .iter()
            .all(|d| *d >= Duration::from_millis(4900)),
        "closed before idle_timeout"
    );

    let mut slowest_drip = Duration::ZERO;
    for ending in drip_endings {
        let ending = ending
            .await
            .expect("task")
            .expect("every slow drip is closed within 10 s");
        assert!(ending.answer.is_none(), "{ending:?}");
        slowest_drip = slowest_drip.max(ending.after);
    }
    println!("slow drips: all 100 closed, the last after {slowest_drip:?}");
    assert!(slowest_drip < Duration::from_secs(3), "{slowest_drip:?}");
    daemon.stop_and_check_log(&[SECRET]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_on_one_connection_does_not_starve_another() {
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let issuer = issuer().await;
    let daemon = Daemon::start("", &keys(&issuer));
    const FLOOD: usize = 200_000;
    let stream = tokio::net::UnixStream::connect(&daemon.socket)
        .await
        .expect("connect");
    let (read, mut write) = stream.into_split();
    let flooder = tokio::spawn(async move {
        let batch = "{\"op\":\"ping\"}\n".repeat(1000);
        for _ in 0..FLOOD / 1000 {
            write.write_all(batch.as_bytes()).await.expect("flood");
        }
        write
    });
    // The flooder reads its answers as fast as it can, checking the order.
    let reader = tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(read).lines();
        let mut answered = 0;
        while answered < FLOOD {
            let line = lines
                .next_line()
                .await
                .expect("read")
                .expect("an answer per request");
            assert_eq!(line, r#"{"ok":true,"protocol":1}"#);
            answered += 1;
        }
        answered
    });
    let mut slowest = Duration::ZERO;
    let mut samples = 0;
    let mut other = daemon.connect().await;
    while !reader.is_finished() {
        let started = Instant::now();
        assert_eq!(other.call(json!({"op":"get","key":"k"})).await["ok"], true);
        slowest = slowest.max(started.elapsed());
        samples += 1;
        // Not a wait for anything: the pace of the samples, so they
        // measure the flood rather than add a second one. The loop ends on
        // the event, the reader's last answer.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let answered = reader.await.expect("reader");
    drop(flooder.await.expect("flooder"));
    println!("{answered} pipelined pings answered in order; meanwhile {samples} gets on another connection, slowest {slowest:?}");
    assert!(
        samples >= 5,
        "the flood ended before it could be measured against"
    );
    assert!(slowest < Duration::from_millis(100), "{slowest:?}");
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));
}

/// Pipelines pings into `stream` until a write fails, never reading an
/// answer: a caller that stops reading. Returns when the write failed.
async fn ping_without_reading(mut stream: tokio::net::UnixStream) -> std::time::Instant {
    use tokio::io::AsyncWriteExt;
    let batch = "{\"op\":\"ping\"}\n".repeat(4096);
    // Each batch is 57 KiB; the socket buffers of both ends hold a few
    // hundred KiB, so the daemon stops reading after a few batches, once
    // its answers fill ours. The write then blocks until it is closed.
    while stream.write_all(batch.as_bytes()).await.is_ok() {}
    std::time::Instant::now()
}

/// Reads what is queued on `stream` to its end: every line must be a
/// pong, and the end must come (EOF, or a reset since the daemon closed
/// with our requests unread). Returns how many answers had piled up.
async fn pongs_then_close(stream: tokio::net::UnixStream) -> usize {
    use tokio::io::AsyncReadExt;
    let mut stream = stream;
    let mut got = Vec::new();
    let read_all = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => break,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                Err(e) => panic!("read: {e}"),
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(support::daemon::PATIENCE, read_all)
        .await
        .expect("the daemon closed the connection, so its end must come");
    let text = String::from_utf8(got).expect("answers are UTF-8");
    // A close may cut nothing: only whole answers are ever written.
    assert!(text.is_empty() || text.ends_with('\n'), "a partial answer");
    assert!(
        text.lines().all(|l| l == r#"{"ok":true,"protocol":1}"#),
        "only pongs were asked for"
    );
    text.lines().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_that_stop_reading_lose_their_slots_within_request_timeout_client() {
    use std::time::{Duration, Instant};
    let alice = test_user("tokend-test-alice");
    let bob = test_user("tokend-test-bob");
    let issuer = issuer().await;
    const TIMEOUT: Duration = Duration::from_secs(1);
    // Per uid: half of 8. Four connections each from alice and bob fill
    // every slot; root is a third uid, refused only for max_connections.
    let limits = "max_connections = 8\nrequest_timeout_client = \"1s\"\nsocket_mode = \"0666\"";
    let mut daemon = Daemon::start(limits, &keys(&issuer));
    let mut stalled = Vec::new();
    for user in [&alice, &bob] {
        stalled.extend(support::foreign::connect_as(
            &daemon.socket,
            user.uid,
            user.gid,
            &user.groups,
            4,
        ));
    }
    // All eight accepted and holding their slots before the flood starts.
    daemon.wait_for_log_count("connection opened", 8);

    let (mut floods, mut readers) = (Vec::new(), Vec::new());
    let flooded_at = Instant::now();
    for stream in stalled {
        let std = stream.into_std().expect("std stream");
        let reader = std.try_clone().expect("clone the stream");
        let writer = tokio::net::UnixStream::from_std(std).expect("register");
        floods.push(tokio::spawn(ping_without_reading(writer)));
        readers.push(reader);
    }

    // While the eight hold every slot, a caller of a third uid is turned away.
    // tokend answers `busy` as it accepts and closes at once: read, do not
    // write (a write could meet the closed end: EPIPE).
    let mut other = daemon.connect().await;
    let refused = other.recv().await;
    let refused_after = flooded_at.elapsed();
    assert_eq!(refused["error"]["code"], "busy", "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("max_connections (8)"),
        "{refused}"
    );
    other.expect_eof().await;

    // Each stalled writer's pending write fails when the daemon closes its
    // connection; without a bound on writing answers it never would.
    let mut released = Vec::new();
    for flood in floods {
        let failed_at = tokio::time::timeout(TIMEOUT * 10, flood)
            .await
            .expect("a caller that stopped reading still holds its connection after 10 s")
            .expect("flood task");
        released.push(failed_at - flooded_at);
    }
    let slowest = released.iter().max().copied().unwrap_or_default();
    let fastest = released.iter().min().copied().unwrap_or_default();
    println!(
        "8 callers that stopped reading (4 uid {}, 4 uid {}) were closed {fastest:?} to {slowest:?} \
         after they began flooding (request_timeout_client {TIMEOUT:?}); another uid was refused \
         busy {refused_after:?} in",
        alice.uid, bob.uid
    );
    assert!(
        refused_after < fastest,
        "the busy check ran after a stalled connection was closed"
    );
    assert!(
        fastest >= TIMEOUT - Duration::from_millis(50),
        "closed before request_timeout_client: {fastest:?}"
    );
    assert!(
        slowest < TIMEOUT + Duration::from_millis(1500),
        "held past request_timeout_client: {slowest:?}"
    );
    daemon.wait_for_log_count("did not read its answer in time", 8);
    let mut piled_up = 0;
    for reader in readers {
        reader.set_nonblocking(true).expect("nonblocking");
        let reader = tokio::net::UnixStream::from_std(reader).expect("register");
        piled_up += pongs_then_close(reader).await;
    }
    println!("{piled_up} unread pongs were queued on the 8 connections when they closed");

    // Their slots are free again: root gets its token at once.
    let started = Instant::now();
    let answer = daemon.call(json!({"op":"get","key":"k"})).await;
    println!("then a get by root took {:?}", started.elapsed());
    assert_eq!(answer["ok"], true, "{answer}");
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_that_stops_reading_does_not_hold_up_shutdown() {
    use std::time::{Duration, Instant};
    use tokio::io::AsyncWriteExt;
    let issuer = issuer().await;
    // Far longer than the 5 s shutdown may take: only the drain's own
    // deadline can end the blocked write.
    let mut daemon = Daemon::start("request_timeout_client = \"60s\"", &keys(&issuer));
    let stream = tokio::net::UnixStream::connect(&daemon.socket)
        .await
        .expect("connect");
    let (_read, mut write) = stream.into_split();
    let batch = "{\"op\":\"ping\"}\n".repeat(4096);
    // Flood until the daemon stops taking requests: it then sits in a write
    // of an answer we will never read. No event says so; a write that makes
    // no progress for a second (the daemon reads 16 KiB at a time whenever
    // it is not blocked) is the sign.
    loop {
        match tokio::time::timeout(Duration::from_secs(1), write.write_all(batch.as_bytes())).await
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("the daemon closed the connection early: {e}"),
            Err(_) => break,
        }
    }
    let flood = tokio::spawn(async move {
        while write.write_all(batch.as_bytes()).await.is_ok() {}
        Instant::now()
    });
    // Stopped by hand rather than by stop_and_check_log, so the 5 s are
    // counted from this first SIGTERM; the same checks follow.
    let signalled = Instant::now();
    let (status, took) = daemon.signal_and_wait(libc::SIGTERM);
    let closed_at = tokio::time::timeout(Duration::from_secs(1), flood)
        .await
        .expect("the connection outlived the daemon")
        .expect("flood task");
    println!(
        "with a caller that stopped reading, tokend exited {took:?} after SIGTERM; the caller \
         was closed {:?} after it",
        closed_at - signalled
    );
    assert!(status.success(), "tokend exited with {status}");
    assert!(
        took < Duration::from_secs(5),
        "tokend took {took:?} to stop"
    );
    let log = daemon.log();
    support::daemon::assert_log_clean(&log, &[SECRET]);
    assert!(
        log.contains("some connections did not finish in time"),
        "{log}"
    );
    assert!(
        log.contains("not taken by the end of the drain"),
        "the handler should close the connection itself: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_that_pipeline_large_answers_and_never_read_are_bounded_in_bytes() {
    use std::time::{Duration, Instant};
    use tokio::io::AsyncWriteExt;
    const HOGS: usize = 200;
    const PIPELINED: usize = 64;
    // The defaults under test (README: Configuration).
    const PER_CONNECTION: usize = 256 << 10;
    const PER_UID: usize = 4 << 20;
    let bob = test_user("tokend-test-bob");
    let issuer = issuer().await;
    // 300 keys bob (and root) may read, with names of 64 characters: each
    // `status` answer lists them all, about 26 KB from a 16-byte request,
    // the largest answer a caller of this configuration can ask for.
    let keys: String = (0..300)
        .map(|i| {
            Key::new(&format!("{i:03}-{}", "k".repeat(60)))
                .issuer(&issuer, Dialect::Checkout)
                .client("c", SECRET)
                .allow_uids(&[0, bob.uid])
                .toml()
        })
        .collect();
    // The hogs are closed by the test, not by request_timeout_client: they
    // must all still be held while the readers below are answered. The
    // default per-uid connection limit (512) admits all of them.
    let limits = "request_timeout_client = \"120s\"\nsocket_mode = \"0666\"";
    let mut daemon = Daemon::start(limits, &keys);
    let pid = daemon.pid();
    let status = json!({"op":"status"});
    let answer_bytes = {
        let answer = daemon.call(status.clone()).await;
        assert_eq!(answer["ok"], true, "{answer}");
        answer.0.to_string().len() + 1
    };
    let start_kib = proc_status_kib(pid, "VmRSS");

    let hogged_at = Instant::now();
    let mut hogs =
        support::foreign::connect_as(&daemon.socket, bob.uid, bob.gid, &bob.groups, HOGS);
    let pipelined = format!("{status}\n").repeat(PIPELINED);
    for hog in &mut hogs {
        hog.write_all(pipelined.as_bytes()).await.expect("pipeline");
    }
    // Every hog has been answered: the daemon has made each one's first
    // batch and holds what its socket did not take. The first sixteen
    // such batches fill the uid's bound, and none is released before the
    // test closes the hogs.
    for hog in &hogs {
        tokio::time::timeout(support::daemon::PATIENCE * 4, hog.readable())
            .await
            .expect("an answer on every hog connection")
            .expect("readable");
    }
    let held_kib = proc_status_kib(pid, "VmRSS");
    println!(
        "every hog was answered {:?} after the first connected",
        hogged_at.elapsed()
    );

    // Meanwhile a caller of the same uid that reads, and one of another
    // uid, get their answers, pipelined too.
    let same_uid = support::foreign::connect_as(&daemon.socket, bob.uid, bob.gid, &bob.groups, 1);
    let mut same_uid =
        support::daemon::Conn::from_stream(same_uid.into_iter().next().expect("one"));
    let mut other_uid = daemon.connect().await;
    for (who, conn) in [("uid bob", &mut same_uid), ("root", &mut other_uid)] {
        let started = Instant::now();
        conn.send_raw(format!("{status}\n").repeat(4).as_bytes())
            .await;
        for _ in 0..4 {
            let answer = conn.recv().await;
            assert_eq!(answer["ok"], true, "{who}: {answer}");
        }
        println!(
            "{who}, reading while the hogs held their answers: 4 answers in {:?}",
            started.elapsed()
        );
    }
    let closed = format!("connection closed peer_uid={}", bob.uid);
    assert_eq!(
        daemon.log().matches(&closed).count(),
        0,
        "a hog was let go before the readers were answered"
    );

    // A hog that starts reading is read again, and gets every answer.
    let mut reformed = support::daemon::Conn::from_stream(hogs.pop().expect("a hog"));
    for n in 0..PIPELINED {
        let answer = reformed.recv().await;
        assert_eq!(
            answer["ok"], true,
            "answer {n} to a hog that reads: {answer}"
        );
    }

    drop((hogs, reformed, same_uid));
    daemon.wait_for_log_count(&closed, HOGS + 1);
    let peak_kib = proc_status_kib(pid, "VmHWM").max(held_kib);
    let unbounded_mib = (HOGS * PIPELINED * answer_bytes) >> 20;
    println!(
        "{HOGS} callers of one uid each pipelined {PIPELINED} status requests ({answer_bytes} \
         bytes per answer, {unbounded_mib} MiB in all) and read nothing: VmRSS {start_kib} KiB \
         before, {held_kib} KiB once each was answered, peak {peak_kib} KiB"
    );
    // The bound: what the uid may hold; one answer more per connection (a
    // caller is never refused its next answer outright) and the 8 KiB read
    // buffer that keeps its unread requests; one batch per runtime worker
    // begun before another's hold was counted; and 8 MiB for the
    // allocator's own overhead and each connection's task and state.
    let workers = std::thread::available_parallelism().map_or(2, usize::from);
    let bound_kib = ((PER_UID
        + HOGS * (answer_bytes + 8192)
        + workers * (PER_CONNECTION + answer_bytes)
        + (8 << 20))
        >> 10) as u64;
    assert!(
        peak_kib.saturating_sub(start_kib) < bound_kib,
        "RSS grew {} KiB over the start, more than the {bound_kib} KiB bound",
        peak_kib.saturating_sub(start_kib)
    );

    // Once they are closed, the memory goes back to the system: all but a
    // few MiB, what the allocator keeps for reuse at the top of its heaps
    // and the code and data the attack touched first.
    let near = start_kib + (4 << 10);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut rss_kib = proc_status_kib(pid, "VmRSS");
    while rss_kib > near && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
        rss_kib = proc_status_kib(pid, "VmRSS");
    }
    println!("after the hogs were closed: VmRSS {rss_kib} KiB");
    assert!(
        rss_kib <= near,
        "RSS stayed at {rss_kib} KiB, {} KiB over the start",
        rss_kib - start_kib
    );
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));
}
