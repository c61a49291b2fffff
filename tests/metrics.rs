//! The metrics of issue 13 from outside: the `metrics` op and `tokend
//! metrics` under other uids (who may read them), the HTTP endpoint
//! scraped with a real HTTP client and read by a real Prometheus text
//! parser after a known sequence of gets, failures, refusals and reloads,
//! callers unable to add series with made-up key names, and `tokend check`
//! keeping the endpoint on loopback. Callers under other uids need the
//! users `scripts/test-setup` creates.

mod support;

use std::collections::BTreeSet;
use std::process::Command;

use prometheus_parse::{Scrape, Value};
use serde_json::json;
use support::cli::{as_caller, run, tokend, Ran};
use support::daemon::{
    assert_log_clean, test_user, tokend_for_anyone, write_private, Daemon, TestUser,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapers_that_send_nothing_are_cut_off_and_hold_no_more_than_eight_slots() {
    let (issuer, mut daemon) =
        setup("metrics_listen = \"127.0.0.1:0\"\nmetrics_allow_uids = [0]").await;
    let endpoint = endpoint(&mut daemon);
    let http = reqwest::Client::new();
    // Eight connections that never send a request take every slot.
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(
            tokio::net::TcpStream::connect(&endpoint)
                .await
                .expect("connect"),
        );
    }
    // A ninth scrape waits in the backlog until the header timeout (5 s)
    // frees the slots, then is served.
    let started = std::time::Instant::now();
    let text = tokio::time::timeout(std::time::Duration::from_secs(15), scrape(&http, &endpoint))
        .await
        .expect("served once the idle connections were cut off");
    let waited = started.elapsed();
    assert!(text.contains("tokend_build_info"), "{text}");
    assert!(
        waited >= std::time::Duration::from_secs(4),
        "served after {waited:?}: more than eight connections were taken at once"
    );
    // The idle ones were closed by the daemon.
    for mut stream in idle {
        let mut byte = [0u8; 1];
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(1),
            tokio::io::AsyncReadExt::read(&mut stream, &mut byte),
        )
        .await
        .expect("closed, not still waiting");
        assert!(!matches!(read, Ok(n) if n > 0), "{read:?}");
    }
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET, OTHER_SECRET]));
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
