//! The metrics of issue 13 from outside: the `metrics` op and `tokend
//! metrics` under other uids (who may read them), the HTTP endpoint
//! scraped with a real HTTP client and read by a real Prometheus text
//! parser after a known sequence of gets, failures, refusals and reloads,
//! callers unable to add series with made-up key names, and `tokend check`
//! keeping the endpoint on loopback. Then the endpoint against other local
//! users (issue 19): a port bound before tokend's, connections held silent
//! or dripping, and requests addressed to another host (DNS rebinding).
//! Callers under other uids need the users `scripts/test-setup` creates.

mod support;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prometheus_parse::{Scrape, Value};
use serde_json::json;
use support::cli::{as_caller, run, tokend, Ran};
use support::daemon::{
    assert_log_clean, test_user, tokend_for_anyone, write_private, Daemon, TestUser, PATIENCE,
};
use support::issuer::{ClientSpec, Dialect, Fault, Issuer};
use support::keys::{secrets, tables, Key};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt};

const SECRET: &str = "metrics-secret-7e6d5c";
const OTHER_SECRET: &str = "metrics-other-secret-4f3e2d";
const ALICE: &str = "tokend-test-alice";
const BOB: &str = "tokend-test-bob";

/// `payments` (scopes gateway and vault, root may read it) and `billing`
/// (nobody may), at one loopback issuer.
async fn setup(daemon_lines: &str) -> (Issuer, Daemon) {
    let issuer = Issuer::start(vec![
        ClientSpec::checkout("payments-client", SECRET, &["gateway", "vault"]),
        ClientSpec::checkout("billing-client", OTHER_SECRET, &[]),
    ])
    .await;
    let keys = keys(&issuer);
    let daemon = Daemon::start(daemon_lines, &keys);
    (issuer, daemon)
}

fn keys(issuer: &Issuer) -> String {
    tables(&[
        Key::new("payments")
            .issuer(issuer, Dialect::Checkout)
            .client("payments-client", SECRET)
            .allow_uids(&[0])
            .extra(r#"scopes = ["gateway", "vault"]"#),
        Key::new("billing")
            .issuer(issuer, Dialect::Checkout)
            .client("billing-client", OTHER_SECRET),
    ])
}

/// `program` as `user`, without a `TOKEND_SOCKET` from whoever runs tests.
fn as_user(user: &TestUser, program: &str) -> Command {
    let mut command = as_caller(program, user.uid, user.gid, &user.groups);
    command.env_remove("TOKEND_SOCKET");
    command
}

fn metrics_command(mut command: Command, daemon: &Daemon) -> Command {
    command.arg("metrics").arg("--socket").arg(&daemon.socket);
    command
}

#[tokio::test]
async fn the_metrics_op_answers_listed_uids_only() {
    let alice = test_user(ALICE);
    let bob = test_user(BOB);
    let lines = format!(
        "socket_mode = \"0666\"\nmetrics_allow_uids = [{}]",
        alice.uid
    );
    let (issuer, daemon) = setup(&lines).await;

    // Root is not listed: `forbidden`, with the id.
    let answer = daemon.call(json!({"op": "metrics", "id": 7})).await;
    assert_eq!(answer["ok"], false, "{answer}");
    assert_eq!(answer["id"], 7, "{answer}");
    assert_eq!(answer["error"]["code"], "forbidden", "{answer}");

    // Alice is listed: `tokend metrics` prints them, exit 0.
    let tokend_path = tokend_for_anyone().to_string_lossy().into_owned();
    let ran = run(metrics_command(as_user(&alice, &tokend_path), &daemon), b"").await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    assert!(ran.stderr.is_empty(), "{ran:?}");
    parse(&ran.stdout);
    assert!(
        ran.stdout.contains("# TYPE tokend_build_info gauge"),
        "{ran:?}"
    );

    // Bob is not: `forbidden` on the wire, with the id; exit 1 from the CLI.
    let mut socat = as_user(&bob, "socat");
    socat
        .arg("-")
        .arg(format!("UNIX-CONNECT:{}", daemon.socket.display()));
    let ran = run(socat, b"{\"op\":\"metrics\",\"id\":\"b1\"}\n").await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let refused: serde_json::Value = serde_json::from_str(&ran.stdout).expect("one answer");
    assert_eq!(refused["ok"], false, "{refused}");
    assert_eq!(refused["id"], "b1", "{refused}");
    assert_eq!(refused["error"]["code"], "forbidden", "{refused}");
    let ran = run(metrics_command(as_user(&bob, &tokend_path), &daemon), b"").await;
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(ran.stdout.is_empty(), "{ran:?}");
    assert_eq!(
        ran.stderr,
        format!(
            "tokend: uid {} may not read the metrics (only the uids in \
             metrics_allow_uids may)\n",
            bob.uid
        )
    );

    // Nobody there: exit 3.
    let mut command = tokend();
    command
        .arg("metrics")
        .arg("--socket")
        .arg(daemon.dir.path().join("nothing.sock"));
    let ran = run(command, b"").await;
    assert_eq!(ran.code, Some(3), "{ran:?}");
    assert!(ran.stderr.contains("tokend is not running at"), "{ran:?}");

    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET, OTHER_SECRET]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_endpoint_serves_the_counted_series_and_nothing_else() {
    let lines = "metrics_listen = \"127.0.0.1:0\"\nmax_connections = 4\n\
                 max_connections_per_uid = 5";
    let (issuer, mut daemon) = setup(&format!("{lines}\nmetrics_allow_uids = [0]")).await;
    let endpoint = endpoint(&mut daemon);
    let http = reqwest::Client::new();

    // Three gets of one set: one issuer request, three handouts.
    for _ in 0..3 {
        let answer = get(&daemon, "payments", &["gateway"]).await;
        assert_eq!(answer["ok"], true, "{answer}");
    }
    // Refusals, each under its code.
    assert_eq!(code(&get(&daemon, "billing", &[]).await), "forbidden");
    assert_eq!(code(&get(&daemon, "no-such-key", &[]).await), "unknown_key");
    assert_eq!(code(&get(&daemon, "another one", &[]).await), "unknown_key");
    assert_eq!(
        code(&get(&daemon, "payments", &["fx"]).await),
        "scope_not_allowed"
    );
    // The issuer fails the vault set with a proxy's HTML 502.
    issuer.set_fault(Some(Fault::ForScope {
        scope: "vault".into(),
        fault: Box::new(Fault::Status {
            status: 502,
            content_type: "text/html".into(),
            body: "<html>bad gateway</html>".into(),
        }),
    }));
    assert_eq!(
        code(&get(&daemon, "payments", &["vault"]).await),
        "unavailable"
    );
    issuer.set_fault(None);
    // Connections up to max_connections stay open; the next is busy.
    let mut held = Vec::new();
    let busy = loop {
        let mut conn = daemon.connect().await;
        // A refused connection is answered and closed at once: the ping
        // may meet a closed socket, the answer is there to read anyway.
        let _ = conn.writer.write_all(b"{\"op\":\"ping\"}\n").await;
        let answer = conn.recv().await;
        if answer["ok"] == false {
            break answer;
        }
        held.push(conn);
        assert!(held.len() <= 4, "never busy at max_connections = 4");
    };
    assert_eq!(busy["error"]["code"], "busy", "{busy}");

    let text = scrape(&http, &endpoint).await;
    let scraped = parse(&text);
    let expect = |metric: &str, labels: &[(&str, &str)], value: f64| {
        assert_eq!(
            sample(&scraped, metric, labels),
            Some(value),
            "{metric} {labels:?} in:\n{text}"
        );
    };
    expect(
        "tokend_gets_total",
        &[("key", "payments"), ("code", "ok")],
        3.0,
    );
    expect(
        "tokend_gets_total",
        &[("key", "billing"), ("code", "forbidden")],
        1.0,
    );
    expect(
        "tokend_gets_total",
        &[("key", "unknown"), ("code", "unknown_key")],
        2.0,
    );
    expect(
        "tokend_gets_total",
        &[("key", "payments"), ("code", "scope_not_allowed")],
        1.0,
    );
    expect(
        "tokend_gets_total",
        &[("key", "payments"), ("code", "unavailable")],
        1.0,
    );
    expect(
        "tokend_issuer_requests_total",
        &[("key", "payments"), ("outcome", "ok")],
        1.0,
    );
    expect(
        "tokend_issuer_requests_total",
        &[("key", "payments"), ("outcome", "http_error")],
        1.0,
    );
    expect(
        "tokend_issuer_request_duration_seconds",
        &[("key", "payments")],
        2.0,
    );
    expect("tokend_refresh_failures_total", &[("key", "payments")], 1.0);
    expect(
        "tokend_token_refresh_failing",
        &[("key", "payments"), ("scopes", "[vault]")],
        1.0,
    );
    expect(
        "tokend_token_refresh_failing",
        &[("key", "payments"), ("scopes", "[gateway]")],
        0.0,
    );
    let left = sample(
        &scraped,
        "tokend_token_expires_in_seconds",
        &[("key", "payments"), ("scopes", "[gateway]")],
    )
    .expect("an expiry for the fetched set");
    assert!((3000.0..=3600.0).contains(&left), "{left}");
    assert_eq!(
        sample(
            &scraped,
            "tokend_token_expires_in_seconds",
            &[("key", "payments"), ("scopes", "[vault]")]
        ),
        None,
        "a set without a token has no expiry"
    );
    expect(
        "tokend_connections_refused_busy_total",
        &[("limit", "max_connections")],
        1.0,
    );
    let open = sample(&scraped, "tokend_connections_open", &[]).expect("open connections");
    assert!(open >= held.len() as f64, "{open} < {}", held.len());
    expect(
        "tokend_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1.0,
    );
    expect("tokend_last_reload_ok", &[], 1.0);
    drop(held);

    // Only GET /metrics is served.
    let other = http
        .get(format!("http://{endpoint}/"))
        .send()
        .await
        .expect("GET /");
    assert_eq!(other.status(), 404);
    let post = http
        .post(format!("http://{endpoint}/metrics"))
        .send()
        .await
        .expect("POST /metrics");
    assert_eq!(post.status(), 405);
    assert_eq!(post.headers()["allow"], "GET");

    // A reload that takes and one that does not; the endpoint serves on.
    assert!(daemon.reload_and_wait());
    daemon.rewrite_keys("[keys.broken]\ntoken_url = 7\n");
    assert!(!daemon.reload_and_wait());
    let after = scrape(&http, &endpoint).await;
    let scraped = parse(&after);
    let reloads = |outcome| sample(&scraped, "tokend_reloads_total", &[("outcome", outcome)]);
    assert_eq!(reloads("ok"), Some(1.0), "{after}");
    assert_eq!(reloads("failed"), Some(1.0), "{after}");
    assert_eq!(sample(&scraped, "tokend_last_reload_ok", &[]), Some(0.0));

    // No secret or token in what was scraped, answered or logged.
    let all = secrets(&[&issuer], &[SECRET, OTHER_SECRET]);
    let op = daemon.call(json!({"op": "metrics"})).await;
    for text in [&text, &after, &op.to_string()] {
        assert_log_clean(text, &all);
    }
    daemon.stop_and_check_log(&all);
    // The endpoint stopped with the daemon.
    assert!(
        http.get(format!("http://{endpoint}/metrics"))
            .send()
            .await
            .is_err(),
        "the endpoint outlived the daemon"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_gets_for_made_up_key_names_add_no_series() {
    let (issuer, daemon) = setup("metrics_allow_uids = [0]").await;
    assert_eq!(get(&daemon, "payments", &[]).await["ok"], true);
    // The one series every unknown name shares exists before counting.
    assert_eq!(code(&get(&daemon, "made-up", &[]).await), "unknown_key");
    let before = series(&op_scrape(&daemon).await);

    let stream = tokio::net::UnixStream::connect(&daemon.socket)
        .await
        .expect("connect");
    let (read, mut write) = stream.into_split();
    // Written while the answers are read: a caller that only writes would
    // be closed once its unread answers stalled the daemon.
    let writer = tokio::spawn(async move {
        let mut batch = String::new();
        for _ in 0..10_000 {
            let name = format!("k{:016x}", rand::random::<u64>());
            batch.push_str(&json!({"op": "get", "key": name}).to_string());
            batch.push('\n');
        }
        write.write_all(batch.as_bytes()).await.expect("write gets");
        write
    });
    let mut answers = tokio::io::BufReader::new(read).lines();
    for n in 0..10_000 {
        let line = answers
            .next_line()
            .await
            .expect("read an answer")
            .unwrap_or_else(|| panic!("closed after {n} answers"));
        assert!(line.contains("\"unknown_key\""), "{line}");
    }
    drop(writer.await.expect("writer"));

    let text = op_scrape(&daemon).await;
    assert_eq!(series(&text), before, "the made-up names added series");
    assert_eq!(
        sample(
            &parse(&text),
            "tokend_gets_total",
            &[("key", "unknown"), ("code", "unknown_key")]
        ),
        Some(10_001.0)
    );
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET, OTHER_SECRET]));
}

/// Item 4 of issue 19: a local user who binds `metrics_listen`'s port
/// first must not stop token service. The daemon starts, serves tokens,
/// logs the failure once however often it retries, shows it in `status`
/// and on systemd's status line, and takes the port once it is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_squatted_metrics_port_is_retried_while_tokens_are_served() {
    let squatter = std::net::TcpListener::bind("127.0.0.1:0").expect("squat a port");
    let wanted = squatter.local_addr().expect("address").to_string();
    let issuer = Issuer::start(vec![
        ClientSpec::checkout("payments-client", SECRET, &["gateway", "vault"]),
        ClientSpec::checkout("billing-client", OTHER_SECRET, &[]),
    ])
    .await;
    let mut daemon = Daemon::builder()
        .daemon_lines(&format!(
            "metrics_listen = \"{wanted}\"\nmetrics_allow_uids = [0]"
        ))
        .keys(&keys(&issuer))
        .notify()
        .start();
    assert_eq!(get(&daemon, "payments", &["gateway"]).await["ok"], true);

    // The status answer says why there is no endpoint, and that it is
    // being retried; wait for a few retries to have failed.
    let deadline = std::time::Instant::now() + PATIENCE;
    let failing = loop {
        assert!(
            std::time::Instant::now() < deadline,
            "fewer than 3 attempts to bind within {PATIENCE:?}"
        );
        let answer = daemon.call(json!({"op": "status"})).await;
        assert_eq!(answer["ok"], true, "{answer}");
        let endpoint = answer["metrics_endpoint"].clone();
        assert_eq!(endpoint["state"], "retrying", "{answer}");
        if endpoint["attempts"].as_u64().is_some_and(|n| n >= 3) {
            break endpoint;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(failing["address"], wanted.as_str(), "{failing}");
    let error = failing["error"].as_str().expect("an error");
    assert!(error.contains("in use"), "{failing}");
    assert!(failing["failing_since"].is_string(), "{failing}");
    assert!(
        failing["next_attempt_in"].as_u64().is_some_and(|s| s <= 30),
        "{failing}"
    );
    // The keys are in the answer as before.
    assert_eq!(get(&daemon, "payments", &["gateway"]).await["ok"], true);

    let status = |json: bool| {
        let mut command = tokend();
        command.arg("status").arg("--socket").arg(&daemon.socket);
        if json {
            command.arg("--json");
        }
        run(command, b"")
    };
    let table = status(false).await;
    let line = table
        .stdout
        .lines()
        .find(|l| l.starts_with("metrics endpoint"))
        .unwrap_or_else(|| panic!("no metrics endpoint line: {table:?}"));
    assert!(
        line.contains(&wanted) && line.contains("not listening") && line.contains("in use"),
        "{table:?}"
    );
    let json = status(true).await;
    let json: serde_json::Value = serde_json::from_str(&json.stdout).expect("status --json");
    assert_eq!(json["metrics_endpoint"]["state"], "retrying", "{json}");
    assert_eq!(
        json["metrics_endpoint"]["address"],
        wanted.as_str(),
        "{json}"
    );
    // systemd's status line says it too.
    let says = |m: &support::systemd::Message| {
        m.get("STATUS")
            .is_some_and(|s| s.contains("metrics endpoint") && s.contains(&wanted))
    };
    let (seen, _) = daemon
        .notify()
        .wait_until(0, "STATUS= naming the metrics endpoint", says);

    // Once the port is free, the next attempt takes it (the wait between
    // attempts is at most 30 s).
    drop(squatter);
    daemon.wait_for_log_count_within("serving metrics over HTTP", 1, Duration::from_secs(35));
    let http = reqwest::Client::new();
    let text = scrape(&http, &wanted).await;
    assert!(text.contains("tokend_build_info"), "{text}");
    let answer = daemon.call(json!({"op": "status"})).await;
    assert_eq!(answer["metrics_endpoint"]["state"], "listening", "{answer}");
    assert_eq!(
        answer["metrics_endpoint"]["address"],
        wanted.as_str(),
        "{answer}"
    );
    assert!(
        answer["metrics_endpoint"].get("error").is_none(),
        "{answer}"
    );
    daemon
        .notify()
        .wait_until(seen, "STATUS= without the metrics endpoint", |m| {
            m.get("STATUS")
                .is_some_and(|s| !s.contains("metrics endpoint"))
        });

    let log = daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET, OTHER_SECRET]));
    let failures = log.matches("failed to listen on metrics_listen").count();
    assert_eq!(failures, 1, "the failure is logged once:\n{log}");
    let recoveries = log.matches("serving metrics over HTTP").count();
    assert_eq!(recoveries, 1, "the recovery is logged once:\n{log}");
}

/// Item 5 of issue 19: a local user holding connections to the endpoint,
/// some silent and some dripping header bytes, more than the endpoint
/// serves at once and each reopened as soon as the daemon closes it,
/// must not keep a scraper out. Each scrape must be answered within
/// Prometheus's default scrape timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapes_are_answered_within_ten_seconds_while_others_hold_idle_and_dripping_connections() {
    const HOLDERS: usize = 64;
    let (issuer, mut daemon) =
        setup("metrics_listen = \"127.0.0.1:0\"\nmetrics_allow_uids = [0]").await;
    let endpoint = endpoint(&mut daemon);
    let stop = tokio_util::sync::CancellationToken::new();
    let closed = Arc::new(AtomicUsize::new(0));
    let (connected, mut first_connects) = tokio::sync::mpsc::channel(2 * HOLDERS);
    let mut attackers = Vec::new();
    for drip in [false, true] {
        for _ in 0..HOLDERS {
            attackers.push(tokio::spawn(hold_connections(
                endpoint.clone(),
                drip,
                connected.clone(),
                closed.clone(),
                stop.clone(),
            )));
        }
    }
    // Every holder has its first connection open before anyone scrapes.
    for _ in 0..2 * HOLDERS {
        first_connects.recv().await.expect("a holder connected");
    }

    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    for round in 1..=3 {
        let text = tokio::time::timeout(Duration::from_secs(10), scrape(&http, &endpoint))
            .await
            .unwrap_or_else(|_| {
                panic!("scrape {round} not answered within 10 s while connections were held")
            });
        assert!(text.contains("tokend_build_info"), "{text}");
    }
    assert!(
        attackers.iter().all(|a| !a.is_finished()),
        "a holder gave up: the scrapes did not run under the whole load"
    );
    assert!(
        closed.load(Ordering::Relaxed) > 0,
        "the daemon never closed a held connection"
    );
    stop.cancel();
    for attacker in attackers {
        attacker.await.expect("holder");
    }
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET, OTHER_SECRET]));
}

/// One hostile holder: keeps a connection to `endpoint` open, sending
/// nothing or (`drip`) a never-ending header a byte at a time, and opens
/// another as soon as the daemon closes it, until `stop`. Reports its
/// first connection on `connected` and counts each close in `closed`.
async fn hold_connections(
    endpoint: String,
    drip: bool,
    connected: tokio::sync::mpsc::Sender<()>,
    closed: Arc<AtomicUsize>,
    stop: tokio_util::sync::CancellationToken,
) {
    use tokio::io::AsyncReadExt;
    let mut first = Some(connected);
    loop {
        let stream = tokio::select! {
            stream = tokio::net::TcpStream::connect(&endpoint) => match stream {
                Ok(stream) => stream,
                // The daemon is gone: the test is ending.
                Err(_) => return,
            },
            () = stop.cancelled() => return,
        };
        if let Some(connected) = first.take() {
            connected
                .send(())
                .await
                .expect("report the first connection");
        }
        let (mut read, mut write) = stream.into_split();
        let header = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Drip: ";
        let mut sent = 0usize;
        let mut ticks = tokio::time::interval(Duration::from_millis(200));
        let mut byte = [0u8; 1];
        loop {
            tokio::select! {
                // EOF or a reset: the daemon closed it.
                _ = read.read(&mut byte) => break,
                _ = ticks.tick(), if drip => {
                    let next = header.get(sent).copied().unwrap_or(b'a');
                    sent += 1;
                    if write.write_all(&[next]).await.is_err() {
                        break;
                    }
                }
                () = stop.cancelled() => return,
            }
        }
        closed.fetch_add(1, Ordering::Relaxed);
    }
}

/// Item 12a of issue 19: a web page in a browser on the host must not read
/// the metrics through DNS rebinding, which reaches the endpoint with the
/// page's own host name in `Host:`. Only the endpoint's address and
/// `localhost` are answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_endpoint_answers_only_requests_addressed_to_it() {
    let (issuer, mut daemon) =
        setup("metrics_listen = \"127.0.0.1:0\"\nmetrics_allow_uids = [0]").await;
    let address = endpoint(&mut daemon);
    let port = address.rsplit_once(':').expect("a port").1.to_owned();
    let ok = |host: &str| format!("GET /metrics HTTP/1.1\r\nHost: {host}\r\n\r\n");
    for host in [
        address.clone(),
        "127.0.0.1".to_owned(),
        format!("localhost:{port}"),
        "localhost".to_owned(),
        format!("LocalHost:{port}"),
    ] {
        let (status, body) = raw_request(&address, &ok(&host)).await;
        assert_eq!(status, 200, "Host: {host}: {body}");
        assert!(body.contains("tokend_build_info"), "Host: {host}");
    }
    for host in [
        format!("attacker.example:{port}"),
        "attacker.example".to_owned(),
        format!("127.0.0.2:{port}"),
        format!("localhost:{}", port.parse::<u16>().expect("port") ^ 1),
        format!("localhost.attacker.example:{port}"),
        format!("user@127.0.0.1:{port}"),
        format!("[::1]:{port}"),
    ] {
        let (status, body) = raw_request(&address, &ok(&host)).await;
        assert_eq!(status, 421, "Host: {host}: {body}");
        assert!(
            !body.contains("tokend_") && body.len() < 200,
            "Host: {host}: {body}"
        );
    }
    // The authority of an absolute-form target is the one that counts.
    let (status, _) = raw_request(
        &address,
        &format!("GET http://attacker.example:{port}/metrics HTTP/1.1\r\nHost: {address}\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 421);
    // HTTP/1.1 requires Host (RFC 9112, 3.2); a browser always sends one,
    // so an HTTP/1.0 request without it is no browser's and is answered.
    let (status, _) = raw_request(&address, "GET /metrics HTTP/1.1\r\n\r\n").await;
    assert_eq!(status, 400);
    let (status, body) = raw_request(&address, "GET /metrics HTTP/1.0\r\n\r\n").await;
    assert_eq!(status, 200, "{body}");
    let (status, _) = raw_request(
        &address,
        &format!("GET /metrics HTTP/1.1\r\nHost: {address}\r\nHost: attacker.example\r\n\r\n"),
    )
    .await;
    assert_eq!(status, 400);
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET, OTHER_SECRET]));

    // On IPv6 the address is bracketed, with or without the port.
    let (issuer, mut daemon) = setup("metrics_listen = \"[::1]:0\"").await;
    let v6 = endpoint(&mut daemon);
    let port = v6.rsplit_once(':').expect("a port").1.to_owned();
    for host in [v6.clone(), "[::1]".to_owned(), format!("localhost:{port}")] {
        let (status, _) = raw_request(&v6, &ok(&host)).await;
        assert_eq!(status, 200, "Host: {host}");
    }
    for host in [
        format!("127.0.0.1:{port}"),
        "::1".to_owned(),
        format!("[::2]:{port}"),
    ] {
        let (status, _) = raw_request(&v6, &ok(&host)).await;
        assert_eq!(status, 421, "Host: {host}");
    }
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET, OTHER_SECRET]));
}

/// Sends `request` as it is on a fresh connection to `endpoint` and reads
/// the answer to its end (the endpoint closes after one): its status code
/// and body.
async fn raw_request(endpoint: &str, request: &str) -> (u16, String) {
    use tokio::io::AsyncReadExt;
    let mut stream = tokio::net::TcpStream::connect(endpoint)
        .await
        .expect("connect");
    stream
        .write_all(request.as_bytes())
        .await
        .expect("send the request");
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, stream.read_to_end(&mut answer))
        .await
        .expect("an answer in time")
        .expect("read the answer");
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .strip_prefix("HTTP/1.1 ")
        .or_else(|| answer.strip_prefix("HTTP/1.0 "))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    let body = answer
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_owned());
    (status, body)
}

#[tokio::test]
async fn check_refuses_a_non_loopback_metrics_listen_unless_told_otherwise() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("tokend.toml");
    let check = || async {
        let mut command = tokend();
        command.arg("check").arg("--config").arg(&path);
        run(command, b"").await
    };

    write_private(&path, "[daemon]\nmetrics_listen = \"0.0.0.0:9464\"\n");
    let ran: Ran = check().await;
    assert_eq!(ran.code, Some(1), "{ran:?}");
    let at = format!(
        "{}:2:18: metrics_listen 0.0.0.0:9464 is not a loopback",
        path.display()
    );
    assert!(ran.stderr.starts_with(&at), "{ran:?}");
    assert!(
        ran.stderr.contains("metrics_listen_non_loopback = true"),
        "{ran:?}"
    );

    write_private(
        &path,
        "[daemon]\nmetrics_listen = \"0.0.0.0:9464\"\nmetrics_listen_non_loopback = true\n",
    );
    assert_eq!(check().await.code, Some(0));
    write_private(&path, "[daemon]\nmetrics_listen = \"[::1]:9464\"\n");
    assert_eq!(check().await.code, Some(0));
}

/// The address the daemon's metrics endpoint listens on, from its log.
fn endpoint(daemon: &mut Daemon) -> String {
    let line = daemon.wait_for_log_line("serving metrics over HTTP");
    line.split_whitespace()
        .find_map(|word| word.strip_prefix("metrics_listen="))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned()
}

async fn scrape(http: &reqwest::Client, endpoint: &str) -> String {
    let response = http
        .get(format!("http://{endpoint}/metrics"))
        .send()
        .await
        .expect("scrape /metrics");
    assert_eq!(response.status(), 200);
    assert_eq!(
        response.headers()["content-type"],
        "text/plain; version=0.0.4; charset=utf-8"
    );
    response.text().await.expect("scrape body")
}

/// The metrics through the socket op, as root (listed in `metrics_allow_uids`).
async fn op_scrape(daemon: &Daemon) -> String {
    let answer = daemon.call(json!({"op": "metrics"})).await;
    assert_eq!(answer["ok"], true, "{answer}");
    answer["text"].as_str().expect("text").to_owned()
}

async fn get(daemon: &Daemon, key: &str, scopes: &[&str]) -> support::daemon::Answer {
    daemon
        .call(json!({"op": "get", "key": key, "scopes": scopes}))
        .await
}

fn code(answer: &support::daemon::Answer) -> String {
    answer["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("not an error: {answer}"))
        .to_owned()
}

fn parse(text: &str) -> Scrape {
    Scrape::parse(text.lines().map(|l| Ok(l.to_owned()))).expect("Prometheus text")
}

/// The value of the one sample of `metric` with exactly `labels`; for a
/// histogram, its count.
fn sample(scrape: &Scrape, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let matching: Vec<f64> = scrape
        .samples
        .iter()
        .filter(|s| s.metric == metric && s.labels.len() == labels.len())
        .filter(|s| labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .map(|s| match &s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => *v,
            Value::Histogram(buckets) => buckets.iter().map(|b| b.count).fold(0.0, f64::max),
            Value::Summary(_) => f64::NAN,
        })
        .collect();
    assert!(matching.len() <= 1, "{metric} {labels:?}: {matching:?}");
    matching.first().copied()
}

/// Every series in `text`: its name and its labels, sorted.
fn series(text: &str) -> BTreeSet<String> {
    parse(text)
        .samples
        .iter()
        .map(|s| {
            let labels: BTreeSet<String> =
                s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            format!("{}{labels:?}", s.metric)
        })
        .collect()
}
