//! Resource indicators (RFC 8707) and `audience`, end to end: against the
//! real `oidc-provider` (`tests/oidc/server.mjs`), a get for a resource
//! the key lists yields a JWT whose `aud` is that resource, each resource
//! is its own cache entry, and a resource the key does not list is refused
//! without an issuer request. The loopback issuer's request log shows the
//! form parameters sent; a reload drops only the resources it no longer
//! allows, and a changed `audience` drops the key's tokens.

mod support;

use std::time::Duration;

use serde_json::{json, Value};
use support::cli::{run, tokend};
use support::daemon::{assert_same_token, jwt_claims, token_of, Answer, Daemon};
use support::issuer::{ClientSpec, Dialect, Issuer};
use support::keys::Key;
use support::oidc::OidcProvider;

const PLAIN_ID: &str = "tokend-plain";
const PLAIN_SECRET: &str = "plain-secret-0123456789";
const API: &str = "https://api.example/";
const BILLING: &str = "https://billing.example/";
/// What tokend logs (at info) for each token it receives.
const RECEIVED: &str = "received a token";
/// What tokend logs (at debug) before each issuer request.
const REQUESTING: &str = "requesting a token from the issuer";
const SECRET: &str = "resource-secret-8707";

async fn get(daemon: &Daemon, key: &str, resource: Option<&str>) -> Answer {
    let mut request = json!({"op": "get", "key": key, "scopes": []});
    if let Some(resource) = resource {
        request["resource"] = json!(resource);
    }
    daemon.call(request).await
}
fn oidc_key(provider: &OidcProvider, extra: &str) -> String {
    Key::new("api")
        .url(&provider.token_url())
        .client(PLAIN_ID, PLAIN_SECRET)
        .allow_me()
        .extra(extra)
        .toml()
}

#[tokio::test]
async fn each_listed_resource_gets_its_own_cached_jwt_with_that_audience() {
    let provider = OidcProvider::start();
    let keys = oidc_key(&provider, &format!("resource = [{API:?}, {BILLING:?}]"));
    let mut daemon = Daemon::start("", &keys);

    let api = token_of(&get(&daemon, "api", Some(API)).await);
    assert_eq!(jwt_claims(&api)["aud"], API);
    let billing = token_of(&get(&daemon, "api", Some(BILLING)).await);
    assert_eq!(jwt_claims(&billing)["aud"], BILLING);
    assert_same_token(&api, &billing, false, "two resources, two tokens");
    // Without a resource, tokend sends none: the issuer's default.
    let default = token_of(&get(&daemon, "api", None).await);
    assert_eq!(jwt_claims(&default)["aud"], "urn:tokend:test");
    // The log is read on a thread: wait for the lines, then count them.
    daemon.wait_for_log_count(RECEIVED, 3);

    // All three are cached: no more issuer requests.
    for (resource, token) in [
        (Some(API), &api),
        (Some(BILLING), &billing),
        (None, &default),
    ] {
        let again = token_of(&get(&daemon, "api", resource).await);
        assert_same_token(&again, token, true, "served from the cache");
    }
    assert_eq!(daemon.log().matches(RECEIVED).count(), 3);

    let status = daemon.call(json!({"op": "status"})).await;
    let sets = status["keys"][0]["sets"].as_array().expect("sets").clone();
    let resources: Vec<&Value> = sets.iter().map(|set| &set["resource"]).collect();
    assert_eq!(
        resources,
        [&Value::Null, &json!(API), &json!(BILLING)],
        "{status}"
    );

    let log = daemon.stop_and_check_log(&[
        PLAIN_SECRET,
        api.as_str(),
        billing.as_str(),
        default.as_str(),
    ]);
    // The audit line names the resource a token was handed out for.
    let handed_out: Vec<&str> = log
        .lines()
        .filter(|line| line.contains("handed out a token"))
        .collect();
    let named = |line: &&str| line.contains("resource=") && line.contains(BILLING);
    assert!(handed_out.iter().any(named), "{log}");
    let unnamed = |line: &&str| !line.contains("resource=");
    assert!(handed_out.iter().any(unnamed), "{log}");
}

#[tokio::test]
async fn a_resource_the_key_does_not_list_is_refused_without_asking_the_issuer() {
    let provider = OidcProvider::start();
    let mut daemon = Daemon::start("", &oidc_key(&provider, &format!("resource = {API:?}")));

    for resource in [BILLING, "https://api.example", "not a uri"] {
        let answer = get(&daemon, "api", Some(resource)).await;
        assert_eq!(answer["ok"], false, "{answer}");
        assert_eq!(answer["error"]["code"], "scope_not_allowed", "{answer}");
        let message = answer["error"]["message"].as_str().expect("message");
        assert!(message.contains("does not allow resource"), "{message}");
    }
    // The listed one is served.
    let answer = daemon
        .call(json!({"op": "get", "key": "api", "resource": API}))
        .await;
    assert_eq!(answer["ok"], true, "{answer}");
    // Its line comes after every earlier request's: only one was made.
    daemon.wait_for_log_count(RECEIVED, 1);
    assert_eq!(daemon.log().matches(REQUESTING).count(), 1);

    daemon.stop_and_check_log(&[PLAIN_SECRET, answer.token()]);
}

fn loopback_key(issuer: &Issuer, extra: &str) -> String {
    format!(
        "[keys.k]\ntoken_url = {:?}\nclient_id = \"c\"\nclient_secret = {SECRET:?}\nallow_uids = [0]\n{extra}\n",
        issuer.token_url(Dialect::Checkout)
    )
}

#[tokio::test]
async fn resource_and_audience_are_sent_as_form_parameters() {
    let issuer = Issuer::start(vec![ClientSpec::checkout("c", SECRET, &[])]).await;
    let keys = loopback_key(
        &issuer,
        &format!("resource = [{API:?}, {BILLING:?}]\naudience = \"https://payments.example\""),
    );
    let daemon = Daemon::start("", &keys);

    token_of(&get(&daemon, "k", Some(BILLING)).await);
    token_of(&get(&daemon, "k", None).await);
    let requests = issuer.wait_for_requests(2, Duration::from_secs(5)).await;
    assert_eq!(requests[0].param("resource"), Some(BILLING));
    assert_eq!(requests[1].param("resource"), None);
    for request in &requests {
        assert_eq!(request.param("audience"), Some("https://payments.example"));
        let resources = request.form.iter().filter(|(name, _)| name == "resource");
        assert!(resources.count() <= 1, "{request:?}");
    }

    let mut all = issuer.issued_tokens();
    all.push(SECRET.to_owned());
    daemon.stop_and_check_log(&all);
}

#[tokio::test]
async fn a_reload_keeps_allowed_resources_drops_the_others_and_an_audience_change_drops_all() {
    let issuer = Issuer::start(vec![ClientSpec::checkout("c", SECRET, &[])]).await;
    let both = format!("resource = [{API:?}, {BILLING:?}]\naudience = \"a1\"");
    let mut daemon = Daemon::start("", &loopback_key(&issuer, &both));
    let api = token_of(&get(&daemon, "k", Some(API)).await);
    let billing = token_of(&get(&daemon, "k", Some(BILLING)).await);

    // BILLING is no longer listed: its token is dropped, and asking for it
    // is refused; API's token is carried over.
    daemon.rewrite_keys(&loopback_key(
        &issuer,
        &format!("resource = {API:?}\naudience = \"a1\""),
    ));
    assert!(daemon.reload_and_wait());
    let kept = token_of(&get(&daemon, "k", Some(API)).await);
    assert_same_token(&kept, &api, true, "the allowed resource's token");
    let refused = get(&daemon, "k", Some(BILLING)).await;
    assert_eq!(refused["error"]["code"], "scope_not_allowed", "{refused}");
    assert_eq!(issuer.requests().len(), 2);

    // Listed again: a fresh token, not the one from before.
    daemon.rewrite_keys(&loopback_key(&issuer, &both));
    assert!(daemon.reload_and_wait());
    let again = token_of(&get(&daemon, "k", Some(BILLING)).await);
    assert_same_token(&again, &billing, false, "a resource listed anew");
    assert_eq!(issuer.requests().len(), 3);

    // Another audience: every token of the key is worthless.
    daemon.rewrite_keys(&loopback_key(
        &issuer,
        &format!("resource = [{API:?}, {BILLING:?}]\naudience = \"a2\""),
    ));
    assert!(daemon.reload_and_wait());
    let renewed = token_of(&get(&daemon, "k", Some(API)).await);
    assert_same_token(&renewed, &api, false, "a token for another audience");
    let requests = issuer.requests();
    assert_eq!(requests.len(), 4);
    assert_eq!(requests[3].param("audience"), Some("a2"));

    let mut all = issuer.issued_tokens();
    all.push(SECRET.to_owned());
    daemon.stop_and_check_log(&all);
}

#[tokio::test]
async fn tokend_get_asks_for_a_resource() {
    let provider = OidcProvider::start();
    let daemon = Daemon::start("", &oidc_key(&provider, &format!("resource = {API:?}")));

    let mut command = tokend();
    command
        .args(["get", "api", "--resource", API, "--socket"])
        .arg(&daemon.socket);
    let ran = run(command, b"").await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let token = ran.stdout.trim_end().to_owned();
    assert_eq!(jwt_claims(&token)["aud"], API);

    let mut command = tokend();
    command
        .args(["get", "api", "--resource", BILLING, "--socket"])
        .arg(&daemon.socket);
    let ran = run(command, b"").await;
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(ran.stderr.contains("does not allow resource"), "{ran:?}");
    assert!(ran.stdout.is_empty(), "{ran:?}");

    daemon.stop_and_check_log(&[PLAIN_SECRET, token.as_str()]);
}
