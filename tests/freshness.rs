//! Issue 4's behaviour, end to end: refresh ahead, single flight, backoff
//! through outages and rejected credentials, `Retry-After`, and an idle
//! daemon with thousands of cached sets. Each test drives the real binary
//! and judges it by the loopback issuer's request log and the answers on
//! the socket.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use support::daemon::{assert_same_token, Daemon};
use support::issuer::{ClientSpec, Dialect, Fault, Issuer};
use support::keys::{secrets, Key};

const SECRET: &str = "fresh-secret-0c0c0c";

fn short_lived(lifetime_secs: u64) -> ClientSpec {
    let mut spec = ClientSpec::checkout("c", SECRET, &[]);
    spec.lifetime_secs = lifetime_secs;
    spec
}

/// Key `name`: `issuer`'s short-lived client, readable by root.
fn key(name: &str, issuer: &Issuer) -> Key {
    Key::new(name)
        .issuer(issuer, Dialect::Checkout)
        .client("c", SECRET)
        .allow_uids(&[0])
}

/// Gets `key` on `conn` and returns the answer and how long it took.
async fn timed_get(
    conn: &mut support::daemon::Conn,
    key: &str,
) -> (support::daemon::Answer, Duration) {
    let started = Instant::now();
    let answer = conn.call(json!({"op":"get","key":key})).await;
    (answer, started.elapsed())
}

#[tokio::test]
async fn refresh_ahead_keeps_gets_fast_and_tokens_far_from_expiry() {
    let issuer = Issuer::start(vec![short_lived(10)]).await;
    issuer.set_fault(Some(Fault::Delay(Duration::from_millis(500))));
    let daemon = Daemon::start("", &key("k", &issuer).extra("prefetch = [[]]").toml());
    let mut conn = daemon.connect().await;
    // The cold start (joining the prefetch under way) is not timed.
    let (warm, _) = timed_get(&mut conn, "k").await;
    assert_eq!(warm["ok"], true, "{warm}");
    let mut slowest = Duration::ZERO;
    let mut least_left = Duration::MAX;
    let mut tokens = Vec::new();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    while started.elapsed() < Duration::from_secs(16) {
        tick.tick().await;
        let (answer, took) = timed_get(&mut conn, "k").await;
        slowest = slowest.max(took);
        let token = answer["access_token"]
            .as_str()
            .expect("a token every time")
            .to_owned();
        // The issuer's own clock: the token dies `lifetime` after the
        // request that minted it arrived.
        let minted = issuer
            .requests()
            .into_iter()
            .find(|r| r.access_token.as_deref() == Some(&token))
            .expect("token was issued")
            .at;
        let left = (minted + Duration::from_secs(10)).saturating_duration_since(Instant::now());
        least_left = least_left.min(left);
        if tokens.last() != Some(&token) {
            tokens.push(token);
        }
    }
    let requests = issuer.requests().len();
    println!(
        "16 s of gets every 50 ms: slowest get {slowest:?}, least time left on a handed-out token {least_left:?}, \
         {} distinct tokens, {requests} issuer requests",
        tokens.len()
    );
    assert!(
        slowest < Duration::from_millis(250),
        "a get waited {slowest:?}"
    );
    assert!(
        least_left >= Duration::from_secs(1),
        "a token with {least_left:?} left was handed out"
    );
    assert!(tokens.len() >= 2, "at least one refresh reached callers");
    assert!((2..=6).contains(&requests), "{requests} issuer requests");
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));
}

#[tokio::test]
async fn an_outage_serves_the_cached_token_then_fails_fast_then_recovers() {
    let issuer = Issuer::start(vec![short_lived(8)]).await;
    let extra = r#"min_valid = "2s"
max_backoff = "4s""#;
    let daemon = Daemon::start("", &key("k", &issuer).extra(extra).toml());
    let mut conn = daemon.connect().await;
    let (first, _) = timed_get(&mut conn, "k").await;
    let token = first["access_token"].as_str().expect("token").to_owned();
    let obtained = Instant::now();
    issuer.set_fault(Some(Fault::Status {
        status: 500,
        content_type: "application/json".into(),
        body: r#"{"error":"server_error","error_description":"database on fire"}"#.into(),
    }));
    let outage_start = Instant::now();
    let mut saw_unavailable_at = None;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    // Through the whole lifetime of the token and past it.
    while obtained.elapsed() < Duration::from_secs(10) {
        tick.tick().await;
        let (answer, took) = timed_get(&mut conn, "k").await;
        if answer["ok"] == true {
            assert_eq!(
                answer["access_token"],
                token.as_str(),
                "only the cached token exists"
            );
            assert!(
                saw_unavailable_at.is_none(),
                "served again after unavailable: {answer}"
            );
            assert!(
                obtained.elapsed() < Duration::from_millis(6100),
                "served with under min_valid left"
            );
        } else {
            assert_eq!(answer["error"]["code"], "unavailable", "{answer}");
            let message = answer["error"]["message"].as_str().expect("message");
            assert!(
                message.contains("500") && message.contains("database on fire"),
                "{message}"
            );
            assert!(
                took < Duration::from_millis(100),
                "unavailable took {took:?}: not at once"
            );
            saw_unavailable_at.get_or_insert(obtained.elapsed());
        }
    }
    let unavailable_at = saw_unavailable_at.expect("the token crossed min_valid");
    assert!(
        unavailable_at >= Duration::from_millis(5900),
        "{unavailable_at:?}"
    );
    let outage = outage_start.elapsed();
    let failed = issuer
        .requests()
        .iter()
        .filter(|r| r.outcome_status == 500)
        .count();
    let rate = failed as f64 / outage.as_secs_f64();
    println!("outage of {outage:?}: {failed} issuer requests ({rate:.2}/s)");
    assert!(rate <= 1.0, "{failed} requests in {outage:?}");

    issuer.set_fault(None);
    let recovered = Instant::now();
    loop {
        tick.tick().await;
        let (answer, _) = timed_get(&mut conn, "k").await;
        if answer["ok"] == true {
            assert_same_token(answer.token(), &token, false, "after recovery");
            break;
        }
        assert!(
            recovered.elapsed() < Duration::from_secs(5),
            "no token within max_backoff (4 s) of recovery"
        );
    }
    println!(
        "token back {:?} after the issuer recovered",
        recovered.elapsed()
    );
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));
}

#[tokio::test]
async fn rejected_credentials_are_not_hammered() {
    let issuer = Issuer::start(vec![
        ClientSpec::checkissuing("ci", SECRET),
        ClientSpec::checkout("ck", SECRET, &[]),
    ])
    .await;
    let denies_with_200 = Issuer::start(vec![ClientSpec::checkissuing("ci", SECRET)]).await;
    denies_with_200.set_fault(Some(Fault::DeniedWith200));
    let wrong = "definitely-wrong-secret";
    let keys = [
        Key::new("ci401")
            .issuer(&issuer, Dialect::Checkissuing)
            .client("ci", wrong),
        Key::new("ck401")
            .issuer(&issuer, Dialect::Checkout)
            .client("ck", wrong),
        Key::new("ci200")
            .issuer(&denies_with_200, Dialect::Checkissuing)
            .client("ci", SECRET),
    ]
    .map(|key| key.allow_uids(&[0]).toml())
    .concat();
    let daemon = Arc::new(Daemon::start("", &keys));
    let mut runs = Vec::new();
    for name in ["ci401", "ck401", "ci200"] {
        let daemon = daemon.clone();
        runs.push(tokio::spawn(async move {
            let mut conn = daemon.connect().await;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            for _ in 0..20 {
                tick.tick().await;
                let (answer, _) = timed_get(&mut conn, name).await;
                assert_eq!(answer["error"]["code"], "unavailable", "{answer}");
                let message = answer["error"]["message"].as_str().expect("message");
                assert!(
                    message.starts_with("no valid token can be had now: access denied"),
                    "{message}"
                );
            }
        }));
    }
    for run in runs {
        run.await.expect("gets");
    }
    let by_client =
        |issuer: &Issuer, path: &str| issuer.requests().iter().filter(|r| r.path == path).count();
    let counts = [
        by_client(&issuer, "/oauth/token"),
        by_client(&issuer, "/connect/token"),
        by_client(&denies_with_200, "/oauth/token"),
    ];
    println!("20 gets in 2 s per key: issuer requests {counts:?} (Checkissuing 401, Checkout 401, Checkissuing 200)");
    assert!(counts.iter().all(|&n| (1..=4).contains(&n)), "{counts:?}");
    let daemon = Arc::into_inner(daemon).expect("sole owner");
    daemon.stop_and_check_log(&secrets(&[&issuer, &denies_with_200], &[SECRET, wrong]));
}

#[tokio::test]
async fn retry_after_on_429_is_honoured() {
    let issuer = Issuer::start(vec![short_lived(3600)]).await;
    issuer.set_fault(Some(Fault::RetryAfter {
        status: 429,
        secs: 5,
    }));
    let daemon = Daemon::start("", &key("k", &issuer).toml());
    let mut conn = daemon.connect().await;
    let (answer, _) = timed_get(&mut conn, "k").await;
    assert_eq!(answer["error"]["code"], "unavailable", "{answer}");
    assert!(answer["error"]["message"]
        .as_str()
        .expect("message")
        .contains("429"));
    let first = issuer.requests()[0].at;
    issuer.set_fault(None);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        let (answer, _) = timed_get(&mut conn, "k").await;
        if answer["ok"] == true {
            break;
        }
        assert!(
            first.elapsed() < Duration::from_secs(8),
            "no token 8 s after a 5 s Retry-After"
        );
    }
    let requests = issuer.requests();
    let second = requests[1].at.duration_since(first);
    println!("second issuer request {second:?} after a 429 with Retry-After: 5");
    assert!(
        second >= Duration::from_secs(5),
        "asked again after {second:?}"
    );
    assert_eq!(requests.len(), 2);
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));
}

/// CPU time (user + system) the process has used, from /proc.
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    // Fields after the parenthesised command name; utime and stime are the
    // 14th and 15th fields of the whole line.
    let after = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / hz)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_idle_sets_cost_no_cpu_and_still_refresh_on_time() {
    const KEYS: usize = 20;
    const SETS: usize = 100;
    const LIFETIME: u64 = 24;
    let scopes = ["s0", "s1", "s2", "s3", "s4", "s5", "s6"];
    let mut specs = Vec::new();
    for k in 0..KEYS {
        let mut spec = ClientSpec::checkout(format!("client{k}"), SECRET, &scopes);
        spec.lifetime_secs = LIFETIME;
        specs.push(spec);
    }
    let issuer = Issuer::start(specs).await;
    // The first SETS non-empty subsets of the seven scopes.
    let sets: Vec<Vec<&str>> = (1u32..)
        .take(SETS)
        .map(|mask| {
            (0..7)
                .filter(|b| mask & (1 << b) != 0)
                .map(|b| scopes[b])
                .collect()
        })
        .collect();
    let prefetch = serde_json::to_string(&sets).expect("json");
    let extra = format!(
        "scopes = {}\nprefetch = {prefetch}\nmax_scope_sets = 128\n",
        serde_json::to_string(&scopes).expect("json")
    );
    let keys: String = (0..KEYS)
        .map(|k| {
            Key::new(&format!("k{k}"))
                .issuer(&issuer, Dialect::Checkout)
                .client(&format!("client{k}"), SECRET)
                .allow_uids(&[0])
                .extra(&extra)
                .toml()
        })
        .collect();
    let mut daemon = Daemon::start("", &keys);
    let total = KEYS * SETS;
    let first_round = issuer
        .wait_for_requests(total, Duration::from_secs(20))
        .await;
    assert!(first_round.iter().all(|r| r.outcome_status == 200));
    // tokend sends the whole first round at once; how far apart the issuer
    // logged them is how late it may have logged any one of them.
    let spread = first_round
        .last()
        .expect("requests")
        .at
        .duration_since(first_round[0].at);
    // Requests are logged on arrival; the daemon logs each answer's receipt.
    daemon.wait_for_log_count("received a token", total);
    let answer = daemon.call(json!({"op":"status"})).await;
    let fresh: usize = answer["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| {
            k["sets"]
                .as_array()
                .expect("sets")
                .iter()
                .filter(|s| s["state"] == "fresh")
                .count()
        })
        .sum();
    assert_eq!(fresh, total, "every set holds a fresh token");

    let before = cpu_time(daemon.pid());
    let idle_from = Instant::now();
    // The sleep is the measurement: CPU used over ten idle seconds, a
    // window in which nothing may happen (no refresh is due before 60% of
    // the lifetime), so there is no event to wait for instead.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let used = cpu_time(daemon.pid()).saturating_sub(before);
    let idle = idle_from.elapsed();
    println!("{total} cached sets, idle {idle:?}: {used:?} of CPU");
    assert!(
        issuer.requests().len() == total,
        "a refresh came before 60% of the lifetime"
    );
    assert!(
        used < Duration::from_millis(50),
        "idle daemon used {used:?} of CPU"
    );

    // Every set refreshes between 60% and 75% of its life (plus a little
    // for the first fetch's and this machine's latency).
    let all = issuer
        .wait_for_requests(2 * total, Duration::from_secs(LIFETIME))
        .await;
    let mut first_at: HashMap<(String, String), Instant> = HashMap::new();
    let mut gaps = Vec::new();
    for request in &all {
        let id = (
            request.client_id().unwrap_or("-").to_owned(),
            request.param("scope").unwrap_or("").to_owned(),
        );
        match first_at.get(&id) {
            None => {
                first_at.insert(id, request.at);
            }
            Some(first) => gaps.push(request.at.duration_since(*first)),
        }
    }
    assert_eq!(first_at.len(), total);
    let earliest = gaps.iter().min().copied().unwrap_or_default();
    let latest = gaps.iter().max().copied().unwrap_or_default();
    println!(
        "refresh gaps for {} sets: {earliest:?} to {latest:?} (60-75% of {LIFETIME} s is 14.4-18 s; \
         the issuer logged the first round over {spread:?})",
        gaps.len()
    );
    assert!(gaps.len() >= total);
    let lowest =
        Duration::from_secs_f64(LIFETIME as f64 * 0.6) - spread - Duration::from_millis(100);
    assert!(earliest >= lowest, "{earliest:?} < {lowest:?}");
    assert!(
        latest <= Duration::from_secs_f64(LIFETIME as f64 * 0.75) + Duration::from_secs(2),
        "{latest:?}"
    );
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));
}
