//! Protocol v1 over the real socket: every op, ids, pipelining, errors that
//! keep the connection, errors that close it, and limits.

mod support;

use std::time::Duration;

use tokio::io::AsyncWriteExt;

use serde_json::{json, Value};
use support::daemon::{assert_issued, assert_same_token, Daemon};
use support::issuer::{ClientSpec, Dialect, Issuer};
use support::keys::{secrets, tables, Key};

const SECRET: &str = "proto-secret-9f8e7d";

async fn setup(daemon_extra: &str) -> (Issuer, Daemon) {
    let issuer = Issuer::start(vec![ClientSpec::checkout(
        "proto-client",
        SECRET,
        &["gateway", "vault", "fx"],
    )])
    .await;
    let key = |name: &str| {
        Key::new(name)
            .issuer(&issuer, Dialect::Checkout)
            .client("proto-client", SECRET)
    };
    let keys = tables(&[
        key("payments")
            .allow_uids(&[0])
            .extra(r#"scopes = ["gateway", "vault", "fx"]"#),
        key("hidden").allow_uids(&[4242]),
    ]);
    let daemon = Daemon::start(daemon_extra, &keys);
    (issuer, daemon)
}

#[tokio::test]
async fn ping_answers_protocol_version() {
    let (issuer, daemon) = setup("").await;
    assert_eq!(
        daemon.call(json!({"op":"ping"})).await,
        json!({"ok":true,"protocol":1})
    );
    assert_eq!(
        daemon.call(json!({"op":"ping","id":"p1"})).await,
        json!({"ok":true,"id":"p1","protocol":1})
    );
    assert!(issuer.requests().is_empty());
    daemon.stop_and_check_log(&[SECRET]);
}

#[tokio::test]
async fn get_returns_a_token_with_canonical_scopes() {
    let (issuer, daemon) = setup("").await;
    let answer = daemon
        .call(json!({"op":"get","key":"payments","scopes":["vault","gateway","vault"],"id":1}))
        .await;
    assert_eq!(answer["ok"], true, "{answer}");
    assert_eq!(answer["id"], 1);
    assert_eq!(answer["key"], "payments");
    assert_eq!(answer["token_type"], "Bearer");
    assert_eq!(answer["scopes"], json!(["gateway", "vault"]));
    let expires_in = answer["expires_in"].as_u64().expect("expires_in");
    assert!((3590..=3600).contains(&expires_in), "{expires_in}");
    let expires_at = humantime::parse_rfc3339(answer["expires_at"].as_str().expect("expires_at"))
        .expect("rfc3339");
    let left = expires_at
        .duration_since(std::time::SystemTime::now())
        .expect("in the future");
    assert!(
        left > Duration::from_secs(3580) && left <= Duration::from_secs(3601),
        "{left:?}"
    );
    let token = answer["access_token"].as_str().expect("token");
    assert_issued(&issuer.issued_tokens(), &[token]);
    let requests = issuer.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!(requests[0].param("scope"), Some("gateway vault"));
    assert_eq!(requests[0].param("grant_type"), Some("client_credentials"));
    assert_eq!(
        requests[0].content_type.as_deref(),
        Some("application/x-www-form-urlencoded")
    );

    // The same set in another order is the same cached token.
    let again = daemon
        .call(json!({"op":"get","key":"payments","scopes":["gateway","vault"]}))
        .await;
    assert_same_token(again.token(), token, true, "same set, other order");
    assert!(again.get("id").is_none());
    assert_eq!(issuer.requests().len(), 1);

    // Another set is another token.
    let other = daemon
        .call(json!({"op":"get","key":"payments","scopes":["fx"]}))
        .await;
    assert_same_token(other.token(), token, false, "another set");
    assert_eq!(other["scopes"], json!(["fx"]));
    let default = daemon.call(json!({"op":"get","key":"payments"})).await;
    assert_eq!(default["ok"], true);
    assert_eq!(issuer.requests().len(), 3);
    // Issue 9: on a key that lists scopes, the default set is that list,
    // never the issuer's own default (which may be wider).
    assert_eq!(
        issuer.requests()[2].param("scope"),
        Some("fx gateway vault"),
        "the default set of a key with scopes asks for all of them"
    );
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order_on_one_connection() {
    let (issuer, daemon) = setup("").await;
    let mut conn = daemon.connect().await;
    let mut batch = String::new();
    for i in 0..20 {
        let op = match i % 4 {
            0 => r#""op":"ping""#,
            1 => r#""op":"get","key":"payments","scopes":["gateway"]"#,
            2 => r#""op":"keys""#,
            _ => r#""op":"nope""#,
        };
        batch.push_str(&format!("{{{op},\"id\":{i}}}\n"));
    }
    conn.send_raw(batch.as_bytes()).await;
    for i in 0..20 {
        let answer = conn.recv().await;
        assert_eq!(answer["id"], i, "{answer}");
        assert_eq!(answer["ok"], i % 4 != 3, "{answer}");
    }
    // One token for the five gets.
    assert_eq!(issuer.requests().len(), 1);
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));
}

#[tokio::test]
async fn bad_requests_keep_the_connection_open() {
    let (issuer, daemon) = setup("").await;
    let mut conn = daemon.connect().await;
    let cases: &[(&[u8], &str, Option<Value>)] = &[
        (b"\n", "bad_request", None),
        (b"not json\n", "bad_request", None),
        (b"\xff\xfe\n", "bad_request", None),
        (
            b"{\"op\":\"ping\",\"op\":\"ping\",\"id\":3}\n",
            "bad_request",
            None,
        ),
        (
            b"{\"op\":\"get\",\"id\":4}\n",
            "bad_request",
            Some(json!(4)),
        ),
        (
            b"{\"op\":\"get\",\"key\":\"payments\",\"scopes\":\"vault\",\"id\":5}\n",
            "bad_request",
            Some(json!(5)),
        ),
        (
            b"{\"op\":\"get\",\"key\":\"payments\",\"scopes\":[\"a b\"],\"id\":6}\n",
            "bad_request",
            Some(json!(6)),
        ),
        (
            b"{\"op\":\"teleport\",\"id\":\"x\"}\n",
            "unknown_op",
            Some(json!("x")),
        ),
        (
            b"{\"op\":\"get\",\"key\":\"nosuch\",\"id\":8}\n",
            "unknown_key",
            Some(json!(8)),
        ),
        (
            b"{\"op\":\"get\",\"key\":\"hidden\",\"id\":9}\n",
            "forbidden",
            Some(json!(9)),
        ),
        (
            b"{\"op\":\"get\",\"key\":\"payments\",\"scopes\":[\"admin\"],\"id\":10}\n",
            "scope_not_allowed",
            Some(json!(10)),
        ),
        (b"[\"op\",\"ping\"]\n", "bad_request", None),
    ];
    for (line, code, id) in cases {
        conn.send_raw(line).await;
        let answer = conn.recv().await;
        assert_eq!(answer["ok"], false, "{answer}");
        assert_eq!(
            answer["error"]["code"],
            *code,
            "{} -> {answer}",
            String::from_utf8_lossy(line)
        );
        assert!(answer["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()));
        assert_eq!(answer.get("id"), id.as_ref(), "{answer}");
    }
    assert_eq!(
        conn.call(json!({"op":"ping"})).await["ok"],
        true,
        "connection survived"
    );
    assert!(
        issuer.requests().is_empty(),
        "no error above may reach the issuer"
    );
    daemon.stop_and_check_log(&[SECRET]);
}

#[tokio::test]
async fn keys_and_status_show_only_readable_keys_and_no_secrets() {
    let (issuer, daemon) = setup("").await;
    let keys = daemon.call(json!({"op":"keys"})).await;
    assert_eq!(
        keys,
        json!({"ok":true,"keys":[{"name":"payments","scopes":["fx","gateway","vault"]}]})
    );
    let token = daemon
        .call(json!({"op":"get","key":"payments","scopes":["vault"]}))
        .await;
    let token = token["access_token"].as_str().expect("token").to_owned();
    let status = daemon.call(json!({"op":"status"})).await;
    let text = status.0.to_string();
    assert!(!text.contains(&token) && !text.contains(SECRET), "{text}");
    assert!(!text.contains("hidden"), "{text}");
    let sets = &status["keys"][0]["sets"];
    assert_eq!(status["keys"][0]["name"], "payments");
    assert_eq!(sets[0]["scopes"], json!(["vault"]));
    assert_eq!(sets[0]["state"], "fresh");
    assert!(
        sets[0]["expires_at"].is_string() && sets[0]["last_refresh"].is_string(),
        "{status}"
    );
    assert!(sets[0].get("last_error").is_none());
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));
}

#[tokio::test]
async fn too_large_is_answered_then_closed_before_the_newline() {
    let (_issuer, daemon) = setup("max_request_bytes = 1024").await;
    let mut conn = daemon.connect().await;
    // No newline at all: the answer must come once the limit is passed.
    conn.send_raw(&vec![b'x'; 2000]).await;
    let answer = conn.recv().await;
    assert_eq!(answer["error"]["code"], "too_large", "{answer}");
    conn.expect_eof().await;
    // A line of exactly the limit is fine.
    let mut conn = daemon.connect().await;
    let pad = 1024 - r#"{"op":"ping","id":""}"#.len();
    let line = format!(r#"{{"op":"ping","id":"{}"}}"#, "p".repeat(pad));
    assert_eq!(line.len(), 1024);
    conn.send_raw(format!("{line}\n").as_bytes()).await;
    assert_eq!(conn.recv().await["ok"], true);
    daemon.stop_and_check_log(&[SECRET]);
}

#[tokio::test]
async fn a_partial_line_at_eof_is_still_answered() {
    let (_issuer, daemon) = setup("").await;
    let mut conn = daemon.connect().await;
    conn.send_raw(br#"{"op":"ping","id":1}"#).await;
    conn.writer.shutdown().await.expect("half-close");
    assert_eq!(conn.recv().await, json!({"ok":true,"id":1,"protocol":1}));
    conn.expect_eof().await;
    daemon.stop_and_check_log(&[SECRET]);
}

#[tokio::test]
async fn over_max_connections_is_busy_and_closed() {
    let (_issuer, daemon) = setup("max_connections = 2\nmax_connections_per_uid = 2").await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut conn = daemon.connect().await;
        // A round trip proves the connection holds a slot.
        assert_eq!(conn.call(json!({"op":"ping"})).await["ok"], true);
        held.push(conn);
    }
    let mut extra = daemon.connect().await;
    let answer = extra.recv().await;
    assert_eq!(answer["error"]["code"], "busy", "{answer}");
    extra.expect_eof().await;
    drop(held.pop());
    // The freed slot is usable again; the daemon notices the close first.
    let started = std::time::Instant::now();
    loop {
        let mut conn = daemon.connect().await;
        let answer = conn.call(json!({"op":"ping"})).await;
        if answer["ok"] == true {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "slot never freed: {answer}"
        );
        tokio::task::yield_now().await;
    }
    daemon.stop_and_check_log(&[SECRET]);
}

#[tokio::test]
async fn idle_connections_are_closed() {
    let (_issuer, daemon) = setup(r#"idle_timeout = "300ms""#).await;
    let mut conn = daemon.connect().await;
    assert_eq!(conn.call(json!({"op":"ping"})).await["ok"], true);
    let started = std::time::Instant::now();
    conn.expect_eof().await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(250) && took < Duration::from_secs(3),
        "{took:?}"
    );
    daemon.stop_and_check_log(&[SECRET]);
}

#[tokio::test]
async fn socket_is_created_with_the_configured_mode() {
    use std::os::unix::fs::PermissionsExt;
    let (_issuer, daemon) = setup(r#"socket_mode = "0620""#).await;
    let mode = std::fs::metadata(&daemon.socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o620);
    let (_issuer, daemon2) = setup("").await;
    let mode = std::fs::metadata(&daemon2.socket)
        .expect("socket")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660, "default mode");
    daemon.stop_and_check_log(&[SECRET]);
    daemon2.stop_and_check_log(&[SECRET]);
}

#[tokio::test]
async fn printed_answers_show_fingerprints_not_tokens() {
    let (issuer, daemon) = setup("").await;
    let answer = daemon.call(json!({"op":"get","key":"payments"})).await;
    let token = answer.token().to_owned();
    for shown in [
        format!("{answer}"),
        format!("{answer:?}"),
        format!("{:?}", vec![answer.clone()]),
    ] {
        assert!(!shown.contains(&token), "a printed answer holds the token");
        assert!(
            shown.contains(&support::daemon::fingerprint(&token)),
            "{shown}"
        );
    }
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));
}

/// The answer to a get quotes the caller's own scopes back, so it is
/// bounded like the audit line: 4,000 made-up scopes, or one scope of
/// 60,000 characters with a space in it, must not come back whole.
#[tokio::test]
async fn a_callers_own_scopes_come_back_bounded() {
    let (issuer, daemon) = setup("").await;
    let mut conn = daemon.connect().await;
    let made_up: Vec<String> = (0..4_000).map(|i| format!("made-up-{i:05}")).collect();
    let answer = conn
        .call(json!({"op":"get","key":"payments","scopes": made_up}))
        .await;
    assert_eq!(answer["error"]["code"], "scope_not_allowed", "{answer}");
    let message = answer["error"]["message"].as_str().expect("a message");
    assert!(message.len() <= 512, "a {}-byte answer", message.len());
    assert!(
        message.contains("made-up-00000") && message.contains("4000"),
        "{message}"
    );

    let spaced = format!("{} {}", "a".repeat(30_000), "b".repeat(30_000));
    let answer = conn
        .call(json!({"op":"get","key":"payments","scopes": [spaced]}))
        .await;
    assert_eq!(answer["error"]["code"], "bad_request", "{answer}");
    let message = answer["error"]["message"].as_str().expect("a message");
    assert!(message.len() <= 512, "a {}-byte answer", message.len());

    // A scope or two still comes back whole.
    let answer = conn
        .call(json!({"op":"get","key":"payments","scopes":["admin","gateway","zz"]}))
        .await;
    let message = answer["error"]["message"].as_str().expect("a message");
    assert!(
        message.contains("admin") && message.contains("zz") && !message.contains('…'),
        "{message}"
    );
    assert!(issuer.requests().is_empty());
    daemon.stop_and_check_log(&[SECRET]);
}
