//! tokend against the loopback issuer in both seed dialects: token shapes,
//! every error shape, client authentication, single flight, `min_valid`
//! and timeouts, all through the real binary and socket.

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use support::daemon::{assert_same_token, Answer, Daemon, PATIENCE};
use support::issuer::{ClientSpec, Dialect, Fault, Issuer};
use support::keys::{secrets, Key};

const CK_ID: &str = "ack_checkout";
const CK_SECRET: &str = "checkout-secret-5a5a5a";
const CI_ID: &str = "ci-api-id";
const CI_SECRET: &str = "checkissuing-secret-7b7b";

async fn issuer() -> Issuer {
    Issuer::start(vec![
        ClientSpec::checkout(CK_ID, CK_SECRET, &["gateway", "vault"]),
        ClientSpec::checkissuing(CI_ID, CI_SECRET),
    ])
    .await
}

/// Key `payments`: `issuer`'s Checkout client, readable by root.
fn checkout_key(issuer: &Issuer, extra: &str) -> String {
    Key::new("payments")
        .issuer(issuer, Dialect::Checkout)
        .client(CK_ID, CK_SECRET)
        .allow_uids(&[0])
        .extra(extra)
        .toml()
}

/// Key `cards`: `issuer`'s Checkissuing client, readable by root.
fn checkissuing_key(issuer: &Issuer, extra: &str) -> String {
    Key::new("cards")
        .issuer(issuer, Dialect::Checkissuing)
        .client(CI_ID, CI_SECRET)
        .allow_uids(&[0])
        .extra(extra)
        .toml()
}

fn used_secrets(issuer: &Issuer) -> Vec<String> {
    secrets(&[issuer], &[CK_SECRET, CI_SECRET])
}

fn get(key: &str) -> Value {
    json!({"op":"get","key":key})
}

fn assert_unavailable(answer: &Answer, words: &[&str]) {
    assert_eq!(answer["ok"], false, "{answer}");
    assert_eq!(answer["error"]["code"], "unavailable", "{answer}");
    let message = answer["error"]["message"].as_str().expect("message");
    for word in words {
        assert!(message.contains(word), "{message:?} lacks {word:?}");
    }
}

#[tokio::test]
async fn checkissuing_token_with_basic_auth() {
    let issuer = issuer().await;
    let daemon = Daemon::start("", &checkissuing_key(&issuer, ""));
    let answer = daemon.call(get("cards")).await;
    assert_eq!(answer["ok"], true, "{answer}");
    let token = answer["access_token"].as_str().expect("token");
    assert_eq!(token.len(), 40);
    assert_eq!(answer["scopes"], json!([]));
    let request = &issuer.requests()[0];
    assert_eq!(
        request.basic,
        Some((CI_ID.to_owned(), CI_SECRET.to_owned()))
    );
    assert_eq!(request.param("scope"), None);
    assert_eq!(
        request.param("client_secret"),
        None,
        "basic auth keeps the secret out of the body"
    );
    daemon.stop_and_check_log(&used_secrets(&issuer));
}

#[tokio::test]
async fn checkissuing_access_denied_with_401_and_with_200() {
    let issuer = issuer().await;
    // Two keys: each has its own backoff, so the second is asked at once.
    let key = |name: &str, secret: &str| {
        Key::new(name)
            .issuer(&issuer, Dialect::Checkissuing)
            .client(CI_ID, secret)
            .allow_uids(&[0])
            .toml()
    };
    let keys = key("cards", "wrong-secret-123") + &key("cards2", CI_SECRET);
    let daemon = Daemon::start("", &keys);
    assert_unavailable(
        &daemon.call(get("cards")).await,
        &["access denied", "HTTP 401", "Access Denied"],
    );
    issuer.set_fault(Some(Fault::DeniedWith200));
    assert_unavailable(
        &daemon.call(get("cards2")).await,
        &["access denied", "HTTP 200", "Access Denied"],
    );
    let mut secrets = used_secrets(&issuer);
    secrets.push("wrong-secret-123".into());
    daemon.stop_and_check_log(&secrets);
}

#[tokio::test]
async fn checkout_scopes_jwt_and_invalid_scope() {
    let issuer = issuer().await;
    // The key allows fx, but the issuer does not give this client fx.
    // A get without scopes asks for default_scopes (issue 9: never for
    // the issuer's own default when the key lists scopes).
    let daemon = Daemon::start(
        "",
        &checkout_key(
            &issuer,
            "scopes = [\"gateway\", \"vault\", \"fx\"]\ndefault_scopes = [\"gateway\", \"vault\"]",
        ),
    );
    let answer = daemon
        .call(json!({"op":"get","key":"payments","scopes":["vault"]}))
        .await;
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(
        answer["access_token"]
            .as_str()
            .expect("token")
            .split('.')
            .count(),
        3,
        "a JWT"
    );
    assert_eq!(answer["scopes"], json!(["vault"]));
    // Default set: the issuer's granted scope is what we report.
    let answer = daemon.call(get("payments")).await;
    assert_eq!(answer["scopes"], json!(["gateway", "vault"]), "{answer}");
    let asked: Vec<Option<String>> = issuer
        .requests()
        .iter()
        .map(|r| r.param("scope").map(str::to_owned))
        .collect();
    assert_eq!(
        asked,
        [Some("vault".to_owned()), Some("gateway vault".to_owned())]
    );
    let answer = daemon
        .call(json!({"op":"get","key":"payments","scopes":["fx"]}))
        .await;
    assert_unavailable(&answer, &["HTTP 400", "invalid_scope"]);
    daemon.stop_and_check_log(&used_secrets(&issuer));
}

#[tokio::test]
async fn wrong_secret_at_checkout_is_access_denied() {
    let issuer = issuer().await;
    let keys = Key::new("payments")
        .issuer(&issuer, Dialect::Checkout)
        .client(CK_ID, "not-the-secret-42")
        .allow_uids(&[0])
        .toml();
    let daemon = Daemon::start("", &keys);
    let answer = daemon.call(get("payments")).await;
    assert_unavailable(&answer, &["access denied", "HTTP 401", "invalid_client"]);
    assert!(!answer.0.to_string().contains("not-the-secret-42"));
    daemon.stop_and_check_log(&["not-the-secret-42".to_owned(), CK_SECRET.to_owned()]);
}

#[tokio::test]
async fn client_id_and_secret_are_form_urlencoded_for_basic_auth() {
    let id = "tok:en+d%id with/space";
    let secret = "s3cr:et+with%percent and/slash";
    let issuer = Issuer::start(vec![ClientSpec::checkout(id, secret, &["gateway"])]).await;
    let keys = Key::new("tricky")
        .issuer(&issuer, Dialect::Checkout)
        .client(id, secret)
        .allow_uids(&[0])
        .toml();
    let daemon = Daemon::start("", &keys);
    let answer = daemon.call(get("tricky")).await;
    assert_eq!(answer["ok"], true, "{answer}");
    let request = &issuer.requests()[0];
    assert_eq!(request.basic, Some((id.to_owned(), secret.to_owned())));
    let mut secrets = issuer.issued_tokens();
    secrets.push(secret.to_owned());
    daemon.stop_and_check_log(&secrets);
}

#[tokio::test]
async fn post_auth_puts_credentials_in_the_body() {
    let issuer = issuer().await;
    let daemon = Daemon::start("", &checkout_key(&issuer, r#"auth = "post""#));
    assert_eq!(daemon.call(get("payments")).await["ok"], true);
    let request = &issuer.requests()[0];
    assert_eq!(request.authorization, None);
    assert_eq!(request.param("client_id"), Some(CK_ID));
    assert_eq!(request.param("client_secret"), Some(CK_SECRET));
    daemon.stop_and_check_log(&used_secrets(&issuer));
}

#[tokio::test]
async fn lenient_token_answers_are_accepted() {
    let issuer = issuer().await;
    let daemon = Daemon::start(
        "",
        &checkout_key(&issuer, r#"scopes = ["gateway", "vault"]"#),
    );
    issuer.set_fault(Some(Fault::ExpiresInAsString));
    let answer = daemon
        .call(json!({"op":"get","key":"payments","scopes":["gateway"]}))
        .await;
    assert!(
        (3590..=3600).contains(&answer["expires_in"].as_u64().expect("expires_in")),
        "{answer}"
    );
    issuer.set_fault(Some(Fault::LowercaseTokenType));
    let answer = daemon
        .call(json!({"op":"get","key":"payments","scopes":["vault"]}))
        .await;
    assert_eq!(answer["token_type"], "Bearer", "{answer}");
    // A body under the 1 MiB cap is fine however it is padded.
    issuer.set_fault(Some(Fault::HugeBody(900 * 1024)));
    let answer = daemon
        .call(json!({"op":"get","key":"payments","scopes":["gateway","vault"]}))
        .await;
    assert_eq!(answer["ok"], true, "{answer}");
    daemon.stop_and_check_log(&used_secrets(&issuer));
}

#[tokio::test]
async fn missing_expires_in_assumes_an_hour_and_says_so_once() {
    let issuer = issuer().await;
    let mut daemon = Daemon::start(
        "",
        &checkout_key(&issuer, r#"scopes = ["gateway", "vault"]"#),
    );
    issuer.set_fault(Some(Fault::NoExpiresIn));
    for scopes in [json!(["gateway"]), json!(["vault"])] {
        let answer = daemon
            .call(json!({"op":"get","key":"payments","scopes":scopes}))
            .await;
        assert!(
            (3590..=3600).contains(&answer["expires_in"].as_u64().expect("expires_in")),
            "{answer}"
        );
    }
    let log = daemon.wait_for_log("no expires_in");
    assert_eq!(log.matches("no expires_in").count(), 1, "{log}");
    daemon.stop_and_check_log(&used_secrets(&issuer));
}

#[tokio::test]
async fn error_shapes_become_unavailable_with_the_issuers_words() {
    let issuer = issuer().await;
    // One key per case: a failure starts that key's backoff.
    let keys: String = (0..5)
        .map(|i| {
            Key::new(&format!("k{i}"))
                .issuer(&issuer, Dialect::Checkout)
                .client(CK_ID, CK_SECRET)
                .allow_uids(&[0])
                .toml()
        })
        .collect();
    let daemon = Daemon::start("", &keys);
    let cases: Vec<(Fault, Vec<&str>)> = vec![
        (
            Fault::Status {
                status: 502,
                content_type: "text/html".into(),
                body: "<html><body><h1>502 Bad Gateway</h1></body></html>".into(),
            },
            vec!["HTTP 502", "non-JSON"],
        ),
        (
            Fault::Status {
                status: 200,
                content_type: "application/json".into(),
                body: r#"{"error":"invalid_client","error_description":"client is disabled"}"#
                    .into(),
            },
            vec!["access denied", "HTTP 200", "client is disabled"],
        ),
        (
            Fault::Status {
                status: 500,
                content_type: "application/json".into(),
                body: r#"{"error":"server_error"}"#.into(),
            },
            vec!["HTTP 500", "server_error"],
        ),
        (
            Fault::Status {
                status: 200,
                content_type: "application/json".into(),
                body: r#"{"token_type":"Bearer"}"#.into(),
            },
            vec!["no access_token"],
        ),
        (Fault::HugeBody(2 << 20), vec!["larger than"]),
    ];
    for (i, (fault, words)) in cases.into_iter().enumerate() {
        issuer.set_fault(Some(fault.clone()));
        let answer = daemon.call(get(&format!("k{i}"))).await;
        assert_unavailable(&answer, &words);
    }
    daemon.stop_and_check_log(&used_secrets(&issuer));
}

#[tokio::test]
async fn unreachable_and_slow_issuers() {
    let issuer = issuer().await;
    // Nothing listens on port 9 of loopback (discard is never enabled here).
    let keys = Key::new("down")
        .url("http://127.0.0.1:9/token")
        .client("id", "secret-down-1")
        .allow_uids(&[0])
        .toml()
        + &Key::new("slow")
            .issuer(&issuer, Dialect::Checkout)
            .client(CK_ID, CK_SECRET)
            .allow_uids(&[0])
            .extra(r#"request_timeout = "300ms""#)
            .toml();
    let daemon = Daemon::start("", &keys);
    assert_unavailable(
        &daemon.call(get("down")).await,
        &["failed to reach the issuer"],
    );
    issuer.set_fault(Some(Fault::Delay(Duration::from_secs(3))));
    let started = std::time::Instant::now();
    assert_unavailable(&daemon.call(get("slow")).await, &["within 300ms"]);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    daemon.stop_and_check_log(&["secret-down-1".to_owned(), CK_SECRET.to_owned()]);
}

#[tokio::test]
async fn concurrent_cold_gets_share_one_issuer_request() {
    let issuer = issuer().await;
    issuer.set_fault(Some(Fault::Delay(Duration::from_millis(300))));
    let daemon = Arc::new(Daemon::start(
        "",
        &checkout_key(&issuer, r#"scopes = ["gateway", "vault"]"#),
    ));
    let mut conns = Vec::new();
    for _ in 0..200 {
        conns.push(daemon.connect().await);
    }
    let gets = conns.into_iter().map(|mut conn| {
        tokio::spawn(async move {
            conn.call(json!({"op":"get","key":"payments","scopes":["vault","gateway"]}))
                .await
        })
    });
    let mut tokens = Vec::new();
    for get in gets.collect::<Vec<_>>() {
        let answer = get.await.expect("task");
        tokens.push(answer["access_token"].as_str().expect("token").to_owned());
    }
    tokens.dedup();
    assert_eq!(tokens.len(), 1, "every caller got the same token");
    assert_eq!(
        issuer.requests().len(),
        1,
        "one issuer request for 200 callers"
    );
    let daemon = Arc::into_inner(daemon).expect("sole owner");
    daemon.stop_and_check_log(&used_secrets(&issuer));
}

#[tokio::test]
async fn a_token_with_less_than_min_valid_left_is_not_handed_out() {
    let mut spec = ClientSpec::checkout(CK_ID, CK_SECRET, &["gateway"]);
    spec.lifetime_secs = 2;
    let issuer = Issuer::start(vec![spec]).await;
    // min_valid 60 s on a 2 s token acts as 0.5 s (a quarter of its life).
    let mut daemon = Daemon::start("", &checkout_key(&issuer, r#"min_valid = "60s""#));
    let first = daemon.call(get("payments")).await;
    assert_eq!(first["ok"], true, "{first}");
    daemon.wait_for_log("instead of 1m");
    // Still usable: cached.
    let again = daemon.call(get("payments")).await;
    assert_same_token(again.token(), first.token(), true, "still usable: cached");
    // Past 1.5 s of its 2 s life it has less than 0.5 s left. The sleep is
    // the measurement: the condition is the token's age, which only the
    // clock brings, and 1.6 s after the first answer is at least that long
    // after tokend received the token. (Its refresh ahead, due by 1.5 s
    // minus a margin, may renew it first; either way what it hands out
    // now must not be the old token.)
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let fresh = daemon.call(get("payments")).await;
    assert_same_token(
        fresh.token(),
        first.token(),
        false,
        "under min_valid: renewed",
    );
    assert!(issuer.requests().len() >= 2);
    daemon.stop_and_check_log(&used_secrets(&issuer));
}

/// Checkout.com grants every scope of the credential when asked for none:
/// a key the operator restricted to `gateway` must never ask for none, by
/// a get, a prefetch, or a reload that carries sets over.
// Multi-threaded: the harness blocks a thread while it awaits the reload,
// and the loopback issuer must keep answering meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_with_scopes_never_asks_the_issuer_without_scope() {
    let issuer = issuer().await;
    let restricted = "scopes = [\"gateway\"]\nprefetch = [[]]";
    let mut daemon = Daemon::start("", &checkout_key(&issuer, restricted));
    issuer.wait_for_requests(1, Duration::from_secs(10)).await;
    let answer = daemon.call(get("payments")).await;
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(answer["scopes"], json!(["gateway"]), "{answer}");
    let answer = daemon
        .call(json!({"op":"get","key":"payments","scopes":[]}))
        .await;
    assert_eq!(answer["scopes"], json!(["gateway"]), "{answer}");
    let answer = daemon
        .call(json!({"op":"get","key":"payments","scopes":["vault"]}))
        .await;
    assert_eq!(answer["error"]["code"], "scope_not_allowed", "{answer}");
    // A reload with the same credential carries the set over and refreshes it.
    daemon.rewrite_keys(&checkout_key(&issuer, restricted));
    assert!(daemon.reload_and_wait(), "{}", daemon.log());
    let answer = daemon.call(get("payments")).await;
    assert_eq!(answer["ok"], true, "{answer}");
    let requests = issuer.requests();
    assert!(!requests.is_empty());
    for request in &requests {
        assert_eq!(request.param("scope"), Some("gateway"), "{request:?}");
    }
    daemon.stop_and_check_log(&used_secrets(&issuer));
}

/// The key's one set: its `status` row as the socket answers it.
async fn status_row(daemon: &Daemon, key: &str) -> Value {
    let answer = daemon.call(json!({"op":"status"})).await;
    let keys = answer["keys"].as_array().expect("keys");
    let found = keys.iter().find(|k| k["name"] == key);
    found.unwrap_or_else(|| panic!("no {key} in {answer}"))["sets"][0].clone()
}

/// Issue 19, item 3: a grant wider than the key's `scopes` is not handed
/// out. The get is `unavailable` naming the extra scopes, `status` (the
/// socket's and `tokend status`'s) shows it, and the set backs off as
/// after any failure: the prefetch set's retries are spaced, and gets
/// meanwhile ask nobody. A key without a `scopes` list leaves the choice
/// to the issuer, and takes what it grants.
// Multi-threaded: `tokend status` runs while the issuer answers retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grant_wider_than_the_keys_scopes_is_not_handed_out() {
    let issuer = issuer().await;
    issuer.set_fault(Some(Fault::Members(vec![(
        "scope".into(),
        json!("fx gateway vault"),
    )])));
    let restricted = "scopes = [\"gateway\"]\nprefetch = [[\"gateway\"]]\nmax_backoff = \"1s\"";
    let open = Key::new("open")
        .issuer(&issuer, Dialect::Checkout)
        .client(CK_ID, CK_SECRET)
        .allow_uids(&[0])
        .toml();
    let daemon = Daemon::start(
        "metrics_allow_uids = [0]",
        &(checkout_key(&issuer, restricted) + &open),
    );
    issuer.wait_for_requests(1, PATIENCE).await;

    let answer = daemon.call(get("payments")).await;
    assert_unavailable(&answer, &["granted scopes", "(fx vault)"]);
    let message = answer["error"]["message"].as_str().expect("message");
    assert!(
        !message.contains("gateway"),
        "gateway is allowed: {message}"
    );
    // Backing off: the next get is answered from the failure at once.
    let again = daemon.call(get("payments")).await;
    assert_unavailable(&again, &["(fx vault)"]);
    assert_eq!(issuer.requests().len(), 1, "a get during the backoff asked");

    let row = status_row(&daemon, "payments").await;
    assert_eq!(row["health"], "failing", "{row}");
    assert!(
        row["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("(fx vault)")),
        "{row}"
    );
    let mut status = support::cli::tokend();
    status.args(["status", "--socket"]).arg(&daemon.socket);
    let ran = support::cli::run(status, b"").await;
    assert_eq!(ran.code, Some(1), "a failing prefetch set: {ran:?}");
    assert!(ran.stdout.contains("(fx vault)"), "{ran:?}");
    let metrics = daemon.call(json!({"op":"metrics"})).await;
    let text = metrics["text"].as_str().expect("metrics text");
    assert!(
        text.contains(r#"tokend_issuer_requests_total{key="payments",outcome="too_wide"}"#),
        "{text}"
    );

    // The prefetch set retries on its own, one backoff step later (the
    // first is half to all of a second), and again until the issuer
    // grants only what the key allows.
    let seen = issuer.wait_for_requests(2, PATIENCE).await;
    let gap = seen[1].at.duration_since(seen[0].at);
    assert!(gap >= Duration::from_millis(500), "retried after {gap:?}");
    issuer.set_fault(None);
    issuer.wait_for_requests(3, PATIENCE).await;
    let answer = daemon.call(get("payments")).await;
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(answer["scopes"], json!(["gateway"]), "{answer}");

    // No `scopes` list: the issuer's default set is whatever it grants.
    issuer.set_fault(Some(Fault::Members(vec![(
        "scope".into(),
        json!("fx gateway vault"),
    )])));
    let answer = daemon.call(get("open")).await;
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(
        answer["scopes"],
        json!(["fx", "gateway", "vault"]),
        "{answer}"
    );
    daemon.stop_and_check_log(&used_secrets(&issuer));
}

/// Issue 19, item 8: RFC 6749 A.12 makes an access token visible ASCII.
/// An answer whose token holds control characters (a forged header line,
/// terminal escapes) is refused as unusable, like an empty token, and no
/// message repeats it; so is one whose `token_type` or granted `scope`
/// holds them, since both reach callers too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_with_control_characters_is_refused_without_repeating_them() {
    let issuer = issuer().await;
    let cases = [
        (
            "access_token",
            "eyJ.ok\u{1b}]0;pwned\u{7}\u{1b}[2J\r\nX-Injected: yes",
        ),
        ("token_type", "Bearer\r\nX-Injected: yes"),
        ("scope", "gateway \u{1b}]0;pwned\u{7}"),
    ];
    let keys: String = (0..cases.len())
        .map(|i| {
            Key::new(&format!("k{i}"))
                .issuer(&issuer, Dialect::Checkout)
                .client(CK_ID, CK_SECRET)
                .allow_uids(&[0])
                .toml()
        })
        .collect();
    let daemon = Daemon::start("", &keys);
    for (i, (member, value)) in cases.into_iter().enumerate() {
        issuer.set_fault(Some(Fault::Members(vec![(member.into(), json!(value))])));
        let key = format!("k{i}");
        let answer = daemon.call(get(&key)).await;
        assert_unavailable(&answer, &["not a usable token answer", member]);
        let row = status_row(&daemon, &key).await;
        for shown in [answer.to_string(), row.to_string()] {
            assert!(
                !shown.contains("pwned") && !shown.contains("X-Injected"),
                "the issuer's {member} is repeated: {shown}"
            );
        }
    }
    // What the issue saw: `get --format header` printing a forged header.
    let mut header = support::cli::tokend();
    header
        .args(["get", "k0", "--format", "header", "--socket"])
        .arg(&daemon.socket);
    let ran = support::cli::run(header, b"").await;
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(ran.stdout.is_empty(), "{ran:?}");
    assert!(!ran.stderr.contains("pwned"), "{ran:?}");
    let mut secrets = used_secrets(&issuer);
    secrets.extend(["pwned".to_owned(), "X-Injected".to_owned()]);
    daemon.stop_and_check_log(&secrets);
}

/// Issue 19, item 13: a 401 or 403 from the token endpoint is rejected
/// credentials whatever its body: a bare 403 (no body, no content type,
/// as a real issuer answers a wrong secret) and an HTML 401 both pause
/// the key, so one request answers several scope sets, and the message
/// says so, with the body's words when it has any.
#[tokio::test]
async fn a_bare_403_or_an_html_401_is_rejected_credentials_and_pauses_the_key() {
    let issuer = issuer().await;
    let key = |name: &str| {
        Key::new(name)
            .issuer(&issuer, Dialect::Checkout)
            .client(CK_ID, CK_SECRET)
            .allow_uids(&[0])
            .extra("scopes = [\"gateway\", \"vault\"]")
            .toml()
    };
    let daemon = Daemon::start("", &(key("bare") + &key("html")));
    let sets = [
        json!(["gateway"]),
        json!(["vault"]),
        json!(["gateway", "vault"]),
    ];

    issuer.set_fault(Some(Fault::Bare(403)));
    for scopes in &sets {
        let answer = daemon
            .call(json!({"op":"get","key":"bare","scopes":scopes}))
            .await;
        assert_unavailable(
            &answer,
            &[
                "the issuer rejected the client credentials",
                "(HTTP 403: Forbidden)",
            ],
        );
    }
    assert_eq!(
        issuer.requests().len(),
        1,
        "the key is paused: one request for three scope sets"
    );
    assert_eq!(status_row(&daemon, "bare").await["health"], "paused");

    issuer.set_fault(Some(Fault::Status {
        status: 401,
        content_type: "text/html".into(),
        body: "<html><body>Unauthorized: unknown client</body></html>".into(),
    }));
    for scopes in &sets {
        let answer = daemon
            .call(json!({"op":"get","key":"html","scopes":scopes}))
            .await;
        assert_unavailable(
            &answer,
            &[
                "the issuer rejected the client credentials",
                "HTTP 401",
                "unknown client",
            ],
        );
    }
    assert_eq!(issuer.requests().len(), 2, "one request for the second key");
    daemon.stop_and_check_log(&used_secrets(&issuer));
}

/// Issue 19, item 3: a grant is judged again when a reload narrows the
/// key's `scopes`. A token granted `gateway` and `vault` while the key
/// allowed both is not handed out once a reload narrows it to `gateway`,
/// as the README advises for a grant too wide; an attacker found the cached
/// token still handed out, wider than the key allows, until it expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_granted_wider_than_the_scopes_a_reload_narrowed_to_is_not_handed_out() {
    let issuer = issuer().await;
    issuer.set_fault(Some(Fault::Members(vec![(
        "scope".into(),
        json!("gateway vault"),
    )])));
    let mut daemon = Daemon::start(
        "",
        &checkout_key(&issuer, "scopes = [\"gateway\", \"vault\"]"),
    );
    let ask = json!({"op":"get","key":"payments","scopes":["gateway"]});
    let before = daemon.call(ask.clone()).await;
    assert_eq!(before["ok"], true, "{before}");
    assert_eq!(before["scopes"], json!(["gateway", "vault"]), "{before}");

    daemon.rewrite_keys(&checkout_key(&issuer, "scopes = [\"gateway\"]"));
    assert!(
        daemon.reload_and_wait(),
        "the narrowed configuration is accepted"
    );
    let after = daemon.call(ask).await;
    let handed_out_wide = after["ok"] == true
        && after["scopes"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s == "vault"));
    assert!(
        !handed_out_wide,
        "after a reload narrowed `scopes` to [gateway], a token granted vault is still \
         handed out: {after}"
    );
    daemon.stop_and_check_log(&used_secrets(&issuer));
}

/// Issue 19, items 8 and 9: the daemon and the CLI judge a granted scope
/// by one rule. An issuer that grants `read\u{2066}` (a bidirectional
/// isolate, not a control character) on a key without a `scopes` list does
/// not get its token handed out raw over the socket while `tokend get`
/// refuses to print it on every call until the token is refreshed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_granted_scope_the_cli_will_not_print_is_not_handed_out() {
    let issuer = issuer().await;
    issuer.set_fault(Some(Fault::Members(vec![(
        "scope".into(),
        json!("read\u{2066}"),
    )])));
    let open = Key::new("open")
        .issuer(&issuer, Dialect::Checkout)
        .client(CK_ID, CK_SECRET)
        .allow_uids(&[0])
        .toml();
    let daemon = Daemon::start("", &open);
    let answer = daemon.call(get("open")).await;
    let mut get_cli = support::cli::tokend();
    get_cli
        .args(["get", "open", "--format", "token", "--socket"])
        .arg(&daemon.socket);
    let ran = support::cli::run(get_cli, b"").await;
    let cli_printed = ran.code == Some(0);
    let served = answer["ok"] == true;
    daemon.stop_and_check_log(&used_secrets(&issuer));
    assert!(
        cli_printed || !served,
        "the daemon handed the token out over the socket (granted scopes {:?}) while \
         `tokend get` refused it: exit {:?}, stderr {:?}",
        answer["scopes"].to_string(),
        ran.code,
        ran.stderr
    );
}

/// Issue 19, item 13, as a caller of one scope set: a 403 whose JSON body
/// names `invalid_scope` fails that set alone (the README says it "is final
/// for its set") and leaves the key serving other sets. Were it to pause
/// the key, as any 401 or 403 once did, any caller allowed to ask for a
/// scope the issuer refuses could take the key from every other caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_403_naming_invalid_scope_fails_its_set_and_does_not_pause_the_key() {
    let issuer = issuer().await;
    issuer.set_fault(Some(Fault::ForScope {
        scope: "vault".into(),
        fault: Box::new(Fault::Status {
            status: 403,
            content_type: "application/json".into(),
            body: json!({"error": "invalid_scope", "error_description": "vault is not granted"})
                .to_string(),
        }),
    }));
    let daemon = Daemon::start(
        "",
        &checkout_key(&issuer, "scopes = [\"gateway\", \"vault\"]"),
    );
    let vault = daemon
        .call(json!({"op":"get","key":"payments","scopes":["vault"]}))
        .await;
    assert_eq!(vault["ok"], false, "{vault}");
    let gateway = daemon
        .call(json!({"op":"get","key":"payments","scopes":["gateway"]}))
        .await;
    daemon.stop_and_check_log(&used_secrets(&issuer));
    assert_eq!(
        gateway["ok"], true,
        "one caller's 403 invalid_scope for `vault` paused the key for `gateway` too: {gateway}"
    );
}

/// Issue 19, item 10: a granted `scope` is issuer-supplied text, bounded
/// like the rest. 75,000 short scopes fit in the issuer's 1 MiB answer; a
/// token the daemon hands out over the socket with them is one `tokend get`
/// reads too, rather than calling tokend's own answer "not protocol v1".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_with_a_huge_granted_scope_is_handed_out_by_the_daemon_and_by_tokend_get_alike() {
    let issuer = issuer().await;
    let granted: Vec<String> = (0..75_000).map(|i| format!("scope-{i:06}")).collect();
    issuer.set_fault(Some(Fault::Members(vec![(
        "scope".into(),
        json!(granted.join(" ")),
    )])));
    let open = Key::new("open")
        .issuer(&issuer, Dialect::Checkout)
        .client(CK_ID, CK_SECRET)
        .allow_uids(&[0])
        .toml();
    let daemon = Daemon::start("", &open);
    let answer = daemon.call(get("open")).await;
    let served = answer["ok"] == true;
    let size = answer.0.to_string().len();
    let mut get_cli = support::cli::tokend();
    get_cli
        .args(["get", "open", "--format", "token", "--socket"])
        .arg(&daemon.socket);
    let ran = support::cli::run(get_cli, b"").await;
    daemon.stop_and_check_log(&used_secrets(&issuer));
    assert!(
        !served || ran.code == Some(0),
        "the daemon handed the token out over the socket in a {size}-byte answer, \
         but `tokend get` exited {:?}: {:?}",
        ran.code,
        ran.stderr
    );
}

/// Issue 19, item 8: a Bearer token of spaces alone, or with a space at
/// either end, is refused like the empty token, though VSCHAR includes the
/// space. A field value's surrounding whitespace is not part of it (RFC
/// 9110, section 5.5), so `Authorization: Bearer <token>` never carries
/// such a token as issued; RFC 6750 section 2.1 allows no space at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bearer_token_of_spaces_or_with_surrounding_spaces_is_not_handed_out() {
    let issuer = issuer().await;
    let cases = ["   ", " leading-space", "trailing-space "];
    let keys: String = (0..cases.len())
        .map(|i| {
            Key::new(&format!("k{i}"))
                .issuer(&issuer, Dialect::Checkout)
                .client(CK_ID, CK_SECRET)
                .allow_uids(&[0])
                .toml()
        })
        .collect();
    let daemon = Daemon::start("", &keys);
    let mut handed_out = Vec::new();
    for (i, token) in cases.iter().enumerate() {
        issuer.set_fault(Some(Fault::Members(vec![(
            "access_token".into(),
            json!(token),
        )])));
        let answer = daemon.call(get(&format!("k{i}"))).await;
        if answer["ok"] == true {
            handed_out.push(format!("case {i} ({} bytes)", token.len()));
        }
    }
    daemon.stop_and_check_log(&used_secrets(&issuer));
    assert!(
        handed_out.is_empty(),
        "Bearer tokens with surrounding or only spaces were handed out: {handed_out:?}"
    );
}
