//! Self-tests for the loopback issuer in `tests/support/issuer.rs`: that it
//! speaks both seed dialects as documented, so daemon tests can trust it.
//! They talk to it with reqwest, not with tokend.

mod support;

use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use serde_json::{json, Value};
use support::issuer::{ClientSpec, Dialect, Fault, Issuer};

const GRANT: (&str, &str) = ("grant_type", "client_credentials");
const WAIT: Duration = Duration::from_secs(5);

/// What came back, read in full.
struct Answer {
    status: u16,
    content_type: String,
    retry_after: Option<String>,
    body: String,
}

impl Answer {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).expect("issuer answers JSON")
    }
}

/// `Authorization: Basic` as RFC 6749 section 2.3.1 wants it: each part
/// form-urlencoded before base64. (reqwest's `basic_auth` skips the encoding.)
fn basic(id: &str, secret: &str) -> String {
    let enc = |text: &str| form_urlencoded::byte_serialize(text.as_bytes()).collect::<String>();
    format!(
        "Basic {}",
        STANDARD.encode(format!("{}:{}", enc(id), enc(secret)))
    )
}

async fn post(url: &str, authorization: Option<&str>, form: &[(&str, &str)]) -> Answer {
    let mut request = reqwest::Client::new().post(url).form(form);
    if let Some(value) = authorization {
        request = request.header(reqwest::header::AUTHORIZATION, value);
    }
    let response = request.send().await.expect("issuer is reachable");
    let header = |name| {
        response
            .headers()
            .get(name)
            .map(|value: &reqwest::header::HeaderValue| {
                value.to_str().expect("ASCII header").to_owned()
            })
    };
    Answer {
        status: response.status().as_u16(),
        content_type: header(reqwest::header::CONTENT_TYPE).unwrap_or_default(),
        retry_after: header(reqwest::header::RETRY_AFTER),
        body: response.text().await.expect("body is text"),
    }
}

fn jwt_claims(token: &str) -> Value {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "JWT has three parts: {token}");
    let claims = URL_SAFE_NO_PAD
        .decode(parts[1])
        .expect("claims are base64url");
    serde_json::from_slice(&claims).expect("claims are JSON")
}

#[tokio::test]
async fn basic_auth_with_tricky_credentials_gets_a_jwt() {
    let (id, secret) = ("a:b+c%d e/f", "s:e+c%r e/t");
    let issuer = Issuer::start(vec![ClientSpec::checkout(id, secret, &["vault", "fx"])]).await;
    let url = issuer.token_url(Dialect::Checkout);

    let answer = post(&url, Some(&basic(id, secret)), &[GRANT]).await;

    assert_eq!(answer.status, 200, "{}", answer.body);
    let body = answer.json();
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    assert_eq!(body["scope"], "fx vault");
    let token = body["access_token"]
        .as_str()
        .expect("access_token is a string");
    let claims = jwt_claims(token);
    assert_eq!(claims["sub"], id);
    assert_eq!(claims["scope"], "fx vault");
    let seen = issuer.requests();
    assert_eq!(seen[0].basic, Some((id.to_owned(), secret.to_owned())));
    assert_eq!(issuer.issued_tokens(), vec![token.to_owned()]);
}

#[tokio::test]
async fn client_secret_post_gets_a_hex_token_and_tokens_are_unique() {
    let issuer = Issuer::start(vec![ClientSpec::checkissuing("ci", "pw")]).await;
    let url = issuer.token_url(Dialect::Checkissuing);
    let form = [GRANT, ("client_id", "ci"), ("client_secret", "pw")];

    for _ in 0..20 {
        let body = post(&url, None, &form).await.json();
        let token = body["access_token"].as_str().expect("access_token");
        assert_eq!(token.len(), 40, "{token}");
        assert!(token
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)));
    }
    let mut tokens = issuer.issued_tokens();
    tokens.sort();
    tokens.dedup();
    assert_eq!(tokens.len(), 20);
}

#[tokio::test]
async fn wrong_secret_gets_each_dialects_documented_refusal() {
    let issuer = Issuer::start(vec![
        ClientSpec::checkout("co", "right", &["fx"]),
        ClientSpec::checkissuing("ci", "right"),
    ])
    .await;
    let checkout = issuer.token_url(Dialect::Checkout);
    let checkissuing = issuer.token_url(Dialect::Checkissuing);
    let denied = json!({ "status": 0, "errors": ["Access Denied"] });

    let answer = post(&checkout, Some(&basic("co", "wrong")), &[GRANT]).await;
    assert_eq!(
        (answer.status, answer.json()),
        (401, json!({ "error": "invalid_client" }))
    );

    let answer = post(&checkissuing, Some(&basic("ci", "wrong")), &[GRANT]).await;
    assert_eq!((answer.status, answer.json()), (401, denied.clone()));

    issuer.set_fault(Some(Fault::DeniedWith200));
    let answer = post(&checkissuing, Some(&basic("ci", "wrong")), &[GRANT]).await;
    assert_eq!((answer.status, answer.json()), (200, denied));
    assert!(issuer.issued_tokens().is_empty());
}

#[tokio::test]
async fn scopes_outside_the_allowed_set_are_invalid_scope() {
    let issuer = Issuer::start(vec![ClientSpec::checkout("co", "pw", &["a", "b"])]).await;
    let url = issuer.token_url(Dialect::Checkout);
    let auth = basic("co", "pw");

    let answer = post(&url, Some(&auth), &[GRANT, ("scope", "a z")]).await;
    assert_eq!(answer.status, 400);
    assert_eq!(answer.json()["error"], "invalid_scope");

    let answer = post(&url, Some(&auth), &[GRANT, ("scope", "b")]).await;
    assert_eq!(answer.json()["scope"], "b");
}

#[tokio::test]
async fn malformed_requests_get_rfc_6749_errors() {
    let issuer = Issuer::start(vec![ClientSpec::checkout("co", "pw", &["a"])]).await;
    let url = issuer.token_url(Dialect::Checkout);
    let auth = basic("co", "pw");

    let both = [GRANT, ("client_id", "co"), ("client_secret", "pw")];
    let answer = post(&url, Some(&auth), &both).await;
    assert_eq!(
        (answer.status, answer.json()["error"].clone()),
        (400, json!("invalid_request"))
    );

    let answer = post(&url, Some(&auth), &[("grant_type", "password")]).await;
    assert_eq!(answer.json(), json!({ "error": "unsupported_grant_type" }));

    let answer = reqwest::Client::new()
        .post(&url)
        .header(reqwest::header::AUTHORIZATION, &auth)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .body(r#"{"grant_type":"client_credentials"}"#)
        .send()
        .await
        .expect("issuer is reachable");
    assert_eq!(answer.status().as_u16(), 400);
}

#[tokio::test]
async fn wait_for_requests_wakes_on_the_request() {
    let issuer = Issuer::start(vec![ClientSpec::checkissuing("ci", "pw")]).await;
    let url = issuer.token_url(Dialect::Checkissuing);
    let client = tokio::spawn(async move { post(&url, Some(&basic("ci", "pw")), &[GRANT]).await });

    let seen = issuer.wait_for_requests(1, WAIT).await;

    assert_eq!(seen[0].path, "/oauth/token");
    assert_eq!(seen[0].outcome_status, 200);
    assert_eq!(client.await.expect("client task").status, 200);
}

#[tokio::test]
#[should_panic(expected = "expected at least 2 request(s)")]
async fn wait_for_requests_panics_listing_what_it_saw() {
    let issuer = Issuer::start(vec![ClientSpec::checkissuing("ci", "pw")]).await;
    post(&issuer.token_url(Dialect::Checkissuing), None, &[GRANT]).await;
    issuer.wait_for_requests(2, Duration::from_millis(50)).await;
}

#[tokio::test]
async fn status_fault_is_answered_verbatim() {
    let issuer = Issuer::start(vec![ClientSpec::checkout("co", "pw", &["a"])]).await;
    let html = "<html><body>502 Bad Gateway</body></html>";
    issuer.set_fault(Some(Fault::Status {
        status: 502,
        content_type: "text/html".into(),
        body: html.into(),
    }));

    let answer = post(
        &issuer.token_url(Dialect::Checkout),
        Some(&basic("co", "pw")),
        &[GRANT],
    )
    .await;

    assert_eq!(
        (answer.status, answer.content_type.as_str()),
        (502, "text/html")
    );
    assert_eq!(answer.body, html);
    assert_eq!(issuer.requests()[0].outcome_status, 502);
}

#[tokio::test]
async fn body_faults_change_only_what_they_name() {
    let issuer = Issuer::start(vec![ClientSpec::checkout("co", "pw", &["a"])]).await;
    let url = issuer.token_url(Dialect::Checkout);
    let auth = basic("co", "pw");
    let ask = |fault| {
        issuer.set_fault(Some(fault));
        post(&url, Some(&auth), &[GRANT])
    };

    assert_eq!(
        ask(Fault::ExpiresInAsString).await.json()["expires_in"],
        "3600"
    );
    assert!(ask(Fault::NoExpiresIn)
        .await
        .json()
        .get("expires_in")
        .is_none());
    assert_eq!(
        ask(Fault::LowercaseTokenType).await.json()["token_type"],
        "bearer"
    );
    let huge = ask(Fault::HugeBody(100_000)).await;
    assert_eq!((huge.status, huge.body.len()), (200, 100_000));
    let limited = ask(Fault::RetryAfter {
        status: 429,
        secs: 7,
    })
    .await;
    assert_eq!(
        (limited.status, limited.retry_after.as_deref()),
        (429, Some("7"))
    );
}
