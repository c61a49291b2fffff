//! tokend against a real authorization server: `oidc-provider` 8.8.1
//! (`tests/oidc/server.mjs`), over plain loopback http. The real binary
//! fetches, caches and shares tokens; these tests check what it hands out
//! against what that server really issues (RS256 JWTs with a fresh `jti`
//! each, 300 s lifetime) and how it reports the server's real errors.

mod support;

use std::collections::BTreeSet;

use serde_json::{json, Value};
use support::daemon::{assert_same_token, jwt_claims, token_of, Answer, Daemon};
use support::keys::Key;
use support::oidc::OidcProvider;

const PLAIN_ID: &str = "tokend-plain";
const PLAIN_SECRET: &str = "plain-secret-0123456789";
const TRICKY_ID: &str = "tok:en+d%id with/space";
const TRICKY_SECRET: &str = "s3cr:et+with%percent and/slash";
/// The tricky secret as RFC 6749 2.3.1 sends it: also never to be logged.
const TRICKY_SECRET_ENCODED: &str = "s3cr%3Aet%2Bwith%25percent+and%2Fslash";
const NARROW_ID: &str = "tokend-narrow";
const NARROW_SECRET: &str = "narrow-secret-42";
const WRONG_SECRET: &str = "wrong-secret-do-not-echo-5150";
/// What tokend logs (at debug) before each issuer request.
const REQUESTING: &str = "requesting a token from the issuer";

/// One `[keys.NAME]` table readable by the uid running the tests.
fn key(name: &str, provider: &OidcProvider, id: &str, secret: &str) -> Key {
    Key::new(name)
        .url(&provider.token_url())
        .client(id, secret)
        .allow_me()
}

async fn get(daemon: &Daemon, key: &str, scopes: &[&str]) -> Answer {
    daemon
        .call(json!({"op":"get","key":key,"scopes":scopes}))
        .await
}

/// The JWT's `scope` claim, sorted.
fn granted(claims: &Value) -> Vec<String> {
    let mut scopes: Vec<String> = claims["scope"]
        .as_str()
        .unwrap_or_else(|| panic!("no scope claim: {claims}"))
        .split(' ')
        .map(str::to_owned)
        .collect();
    scopes.sort();
    scopes
}

/// The `unavailable` error message of a failed answer.
fn unavailable_message(answer: &Answer) -> String {
    assert_eq!(answer["ok"], false, "{answer}");
    assert_eq!(answer["error"]["code"], "unavailable", "{answer}");
    answer["error"]["message"]
        .as_str()
        .expect("error message")
        .to_owned()
}

/// Every client secret the tests use, plus `tokens`.
fn secrets(tokens: &[String]) -> Vec<String> {
    let mut all = support::keys::secrets(
        &[],
        &[
            PLAIN_SECRET,
            TRICKY_SECRET,
            TRICKY_SECRET_ENCODED,
            NARROW_SECRET,
            WRONG_SECRET,
        ],
    );
    all.extend_from_slice(tokens);
    all
}

#[tokio::test]
async fn plain_client_default_set_gets_a_cached_bearer_jwt() {
    let provider = OidcProvider::start();
    let daemon = Daemon::start("", &key("plain", &provider, PLAIN_ID, PLAIN_SECRET).toml());

    let first = get(&daemon, "plain", &[]).await;
    let token = token_of(&first);
    let claims = jwt_claims(&token);
    assert_eq!(first["token_type"], "Bearer", "{first}");
    assert_eq!(first["scopes"], json!([]), "{first}");
    let expires_in = first["expires_in"].as_u64().expect("expires_in");
    assert!((290..=300).contains(&expires_in), "{expires_in}");
    assert_eq!(claims["client_id"], PLAIN_ID, "{claims}");
    assert_eq!(claims["aud"], "urn:tokend:test", "{claims}");
    assert!(claims.get("scope").is_none(), "default set: {claims}");
    let jti = claims["jti"].as_str().expect("jti").to_owned();

    // oidc-provider mints a new jti per request: the same string and jti
    // mean the second get never reached it.
    let second = get(&daemon, "plain", &[]).await;
    assert_same_token(&token_of(&second), &token, true, "second get");
    assert_eq!(jwt_claims(&token_of(&second))["jti"], jti.as_str());
    assert_eq!(daemon.log().matches(REQUESTING).count(), 1);

    daemon.stop_and_check_log(&secrets(&[token]));
}

#[tokio::test]
async fn requested_scopes_are_canonical_in_the_answer_and_granted_in_the_jwt() {
    let provider = OidcProvider::start();
    let keys = key("plain", &provider, PLAIN_ID, PLAIN_SECRET)
        .extra(r#"scopes = ["gateway", "vault", "fx"]"#)
        .toml();
    let daemon = Daemon::start("", &keys);

    let answer = get(&daemon, "plain", &["vault", "gateway"]).await;
    let token = token_of(&answer);
    assert_eq!(answer["scopes"], json!(["gateway", "vault"]), "{answer}");
    let claims = jwt_claims(&token);
    assert_eq!(granted(&claims), ["gateway", "vault"], "{claims}");

    daemon.stop_and_check_log(&secrets(&[token]));
}

#[tokio::test]
async fn reserved_characters_in_id_and_secret_work_with_basic_and_post() {
    let provider = OidcProvider::start();
    let scopes = r#"scopes = ["gateway", "vault"]"#;
    let keys = key("basic", &provider, TRICKY_ID, TRICKY_SECRET)
        .extra(&format!("auth = \"basic\"\n{scopes}"))
        .toml()
        + &key("post", &provider, TRICKY_ID, TRICKY_SECRET)
            .extra(&format!("auth = \"post\"\n{scopes}"))
            .toml();
    let daemon = Daemon::start("", &keys);

    let mut tokens = Vec::new();
    for name in ["basic", "post"] {
        let answer = get(&daemon, name, &["gateway"]).await;
        let token = token_of(&answer);
        assert_eq!(answer["scopes"], json!(["gateway"]), "{name}: {answer}");
        let claims = jwt_claims(&token);
        assert_eq!(claims["client_id"], TRICKY_ID, "{name}: {claims}");
        tokens.push(token);
    }
    assert_same_token(
        &tokens[0],
        &tokens[1],
        false,
        "each key made its own request",
    );

    daemon.stop_and_check_log(&secrets(&tokens));
}

#[tokio::test]
async fn scope_the_client_lacks_is_invalid_scope_and_other_sets_still_work() {
    let provider = OidcProvider::start();
    // The key lets callers ask for vault; the issuer does not give it.
    let keys = key("narrow", &provider, NARROW_ID, NARROW_SECRET)
        .extra(r#"scopes = ["gateway", "vault"]"#)
        .toml();
    let daemon = Daemon::start("", &keys);

    let refused = get(&daemon, "narrow", &["vault"]).await;
    let message = unavailable_message(&refused);
    assert!(message.contains("invalid_scope"), "{message}");
    assert!(message.contains("400"), "{message}");

    let answer = get(&daemon, "narrow", &["gateway"]).await;
    let token = token_of(&answer);
    assert_eq!(answer["scopes"], json!(["gateway"]), "{answer}");
    assert_eq!(jwt_claims(&token)["scope"], "gateway");

    daemon.stop_and_check_log(&secrets(&[token]));
}

#[tokio::test]
async fn wrong_secret_is_access_denied_without_echoing_the_secret() {
    let provider = OidcProvider::start();
    let daemon = Daemon::start("", &key("plain", &provider, PLAIN_ID, WRONG_SECRET).toml());

    let answer = get(&daemon, "plain", &[]).await;
    let message = unavailable_message(&answer);
    assert!(message.contains("access denied"), "{message}");
    assert!(message.contains("401"), "{message}");
    assert!(message.contains("invalid_client"), "{message}");
    assert!(
        !message.contains(WRONG_SECRET),
        "the answer repeats the secret"
    );

    daemon.stop_and_check_log(&secrets(&[]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_cold_gets_share_one_issuer_request() {
    const CALLERS: usize = 50;
    let provider = OidcProvider::start();
    let keys = key("plain", &provider, PLAIN_ID, PLAIN_SECRET)
        .extra(r#"scopes = ["gateway", "vault", "fx"]"#)
        .toml();
    let daemon = Daemon::start("", &keys);

    // Every connection is open before any request is sent, and every
    // request is sent before any answer is read.
    let mut conns = Vec::with_capacity(CALLERS);
    for _ in 0..CALLERS {
        conns.push(daemon.connect().await);
    }
    let request = format!(
        "{}\n",
        json!({"op":"get","key":"plain","scopes":["vault","fx"]})
    );
    for conn in &mut conns {
        conn.send_raw(request.as_bytes()).await;
    }
    let mut tokens = BTreeSet::new();
    for conn in &mut conns {
        tokens.insert(token_of(&conn.recv().await));
    }

    // oidc-provider mints a fresh jti per request, so one token string
    // means one issuer request.
    assert_eq!(tokens.len(), 1, "{} distinct tokens", tokens.len());
    assert_eq!(daemon.log().matches(REQUESTING).count(), 1);
    let tokens: Vec<String> = tokens.into_iter().collect();
    assert_eq!(granted(&jwt_claims(&tokens[0])), ["fx", "vault"]);

    daemon.stop_and_check_log(&secrets(&tokens));
}
