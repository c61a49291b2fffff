//! The token-endpoint client: one `client_credentials` exchange per call.
//!
//! Request building follows RFC 6749 4.4 and 2.3.1; answer parsing accepts
//! the RFC's shapes and the two seed issuers' dialects (Checkout.com's
//! `/connect/token`, Checkissuing's `{"status":0,"errors":[…]}`). Parsing is
//! a pure function over status and body so tests can feed it bytes. This
//! module caches nothing and knows nothing of sockets.

use std::fmt;
use std::time::Duration;

use reqwest::header::{HeaderMap, ACCEPT, CONTENT_TYPE, RETRY_AFTER};
use serde_json::Value;
use zeroize::Zeroizing;

use crate::config::{AuthMethod, KeyConfig};
use crate::scope::ScopeSet;
use crate::secret::{AccessToken, ClientSecret};

/// The most of an issuer's answer we read. Token answers are a few KiB even
/// with large JWTs; anything bigger is a misbehaving server.
pub const MAX_ANSWER_BYTES: usize = 1 << 20;

/// Longest piece of an issuer's own error text we repeat.
const MAX_WORDS: usize = 300;

/// A successful token answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub access_token: AccessToken,
    /// `Bearer` whatever case the issuer used; other types as sent.
    pub token_type: String,
    /// `None` when the issuer left `expires_in` out.
    pub expires_in: Option<Duration>,
    /// The granted scope when the issuer said it.
    pub scope: Option<ScopeSet>,
}

/// A failed exchange. The message carries the issuer's URL, the HTTP status
/// and the issuer's own words, and never a secret or a token.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{kind} (issuer {url})")]
pub struct IssuerError {
    pub url: String,
    pub kind: FailureKind,
    /// What a 429 or 503 asked for in `Retry-After`.
    pub retry_after: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FailureKind {
    /// The issuer refused our credentials: an operator must fix the secret.
    #[error("access denied: the issuer rejected the client credentials (HTTP {status}: {words})")]
    Denied { status: u16, words: String },
    /// The issuer answered with an error of its own.
    #[error("the issuer refused the request (HTTP {status}: {words})")]
    Refused { status: u16, words: String },
    /// A non-JSON error page, such as a proxy's HTML 502.
    #[error("the issuer answered HTTP {status} {reason} with a non-JSON body ({content_type})")]
    Http {
        status: u16,
        reason: String,
        content_type: String,
    },
    #[error("the issuer's answer is not a usable token answer (HTTP {status}): {problem}")]
    Malformed { status: u16, problem: String },
    #[error("the issuer's answer is larger than {} bytes", MAX_ANSWER_BYTES)]
    TooLarge,
    #[error("no answer from the issuer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("failed to reach the issuer: {0}")]
    Transport(String),
}

impl IssuerError {
    /// A few words for a status line: "500 from issuer", "access denied".
    pub fn short(&self) -> String {
        match &self.kind {
            FailureKind::Denied { .. } => "access denied".to_owned(),
            FailureKind::Refused { status, .. }
            | FailureKind::Http { status, .. }
            | FailureKind::Malformed { status, .. } => format!("{status} from issuer"),
            FailureKind::TooLarge => "oversized answer".to_owned(),
            FailureKind::Timeout(_) => "issuer timed out".to_owned(),
            FailureKind::Transport(_) => "issuer unreachable".to_owned(),
        }
    }

    /// The HTTP status the issuer answered with, if it answered.
    pub fn status(&self) -> Option<u16> {
        match &self.kind {
            FailureKind::Denied { status, .. }
            | FailureKind::Refused { status, .. }
            | FailureKind::Http { status, .. }
            | FailureKind::Malformed { status, .. } => Some(*status),
            FailureKind::TooLarge | FailureKind::Timeout(_) | FailureKind::Transport(_) => None,
        }
    }
}

/// Talks to token endpoints. Cheap to clone; one connection pool for all.
#[derive(Clone)]
pub struct IssuerClient {
    http: reqwest::Client,
}

impl fmt::Debug for IssuerClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IssuerClient")
    }
}

impl IssuerClient {
    pub fn new() -> Result<IssuerClient, reqwest::Error> {
        let http = reqwest::Client::builder()
            // A redirect would re-send the credentials somewhere the
            // operator did not configure.
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("tokend/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(IssuerClient { http })
    }

    /// Asks `key`'s issuer for a token with `scopes` (the issuer's default
    /// set when empty).
    pub async fn fetch(&self, key: &KeyConfig, scopes: &ScopeSet) -> Result<Grant, IssuerError> {
        let fail = |kind| IssuerError {
            url: key.token_url.to_string(),
            kind,
            retry_after: None,
        };
        let exchange = self.exchange(key, scopes);
        let (status, headers, body) =
            match tokio::time::timeout(key.request_timeout, exchange).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(kind)) => return Err(fail(kind)),
                Err(_) => return Err(fail(FailureKind::Timeout(key.request_timeout))),
            };
        parse_answer(status, content_type(&headers), &body).map_err(|kind| IssuerError {
            url: key.token_url.to_string(),
            kind: redact(kind, &key.client_secret),
            retry_after: retry_after(status, &headers),
        })
    }

    async fn exchange(
        &self,
        key: &KeyConfig,
        scopes: &ScopeSet,
    ) -> Result<(u16, HeaderMap, Zeroizing<Vec<u8>>), FailureKind> {
        let request = build_request(&self.http, key, scopes);
        let mut response = request.send().await.map_err(transport)?;
        let status = response.status().as_u16();
        if response
            .content_length()
            .is_some_and(|n| n > MAX_ANSWER_BYTES as u64)
        {
            return Err(FailureKind::TooLarge);
        }
        let mut body = Zeroizing::new(Vec::new());
        while let Some(chunk) = response.chunk().await.map_err(transport)? {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(FailureKind::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        Ok((status, response.headers().clone(), body))
    }
}

fn build_request(
    http: &reqwest::Client,
    key: &KeyConfig,
    scopes: &ScopeSet,
) -> reqwest::RequestBuilder {
    let mut form = form_urlencoded::Serializer::new(String::new());
    form.append_pair("grant_type", "client_credentials");
    if !scopes.is_empty() {
        form.append_pair("scope", &scopes.joined());
    }
    let request = http
        .post(key.token_url.clone())
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(ACCEPT, "application/json");
    let request = match key.auth {
        // RFC 6749 2.3.1: id and secret are form-urlencoded before they are
        // joined with ':' and base64-encoded, so a ':' in the id survives.
        AuthMethod::Basic => request.basic_auth(
            urlencode(&key.client_id),
            Some(Zeroizing::new(urlencode(key.client_secret.expose())).as_str()),
        ),
        AuthMethod::Post => {
            form.append_pair("client_id", &key.client_id);
            form.append_pair("client_secret", key.client_secret.expose());
            request
        }
    };
    request.body(form.finish())
}

fn urlencode(text: &str) -> String {
    form_urlencoded::byte_serialize(text.as_bytes()).collect()
}

/// The innermost cause of a reqwest error: "Connection refused (os error
/// 111)" tells an operator more than "error sending request".
fn transport(err: reqwest::Error) -> FailureKind {
    let mut cause: &dyn std::error::Error = &err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    FailureKind::Transport(cause.to_string())
}

fn content_type(headers: &HeaderMap) -> &str {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("no content type")
}

fn retry_after(status: u16, headers: &HeaderMap) -> Option<Duration> {
    if status != 429 && status != 503 {
        return None;
    }
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate_to_system_time(value)?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// `Retry-After` may also be an HTTP date (RFC 9110 10.2.3).
fn httpdate_to_system_time(value: &str) -> Option<std::time::SystemTime> {
    humantime::parse_rfc3339_weak(value).ok().or_else(|| {
        // IMF-fixdate: "Sun, 06 Nov 1994 08:49:37 GMT"; humantime reads the
        // same instant written as RFC 3339.
        let parts: Vec<&str> = value.split_whitespace().collect();
        let [_, day, month, year, time, "GMT"] = parts[..] else {
            return None;
        };
        let months = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        let month = months.iter().position(|m| *m == month)? + 1;
        humantime::parse_rfc3339(&format!("{year}-{month:02}-{day:0>2}T{time}Z")).ok()
    })
}

/// Turns an issuer's answer into a grant or a failure.
pub fn parse_answer(status: u16, content_type: &str, body: &[u8]) -> Result<Grant, FailureKind> {
    let Ok(Value::Object(fields)) = serde_json::from_slice::<Value>(body) else {
        return Err(if (200..300).contains(&status) {
            FailureKind::Malformed {
                status,
                problem: format!("the body is not a JSON object ({})", sanitize(content_type)),
            }
        } else {
            FailureKind::Http {
                status,
                reason: reason(status).to_owned(),
                content_type: sanitize(content_type),
            }
        });
    };
    if let Some(failure) = error_in(status, &fields) {
        return Err(failure);
    }
    if !(200..300).contains(&status) {
        return Err(FailureKind::Refused {
            status,
            words: format!("{} with no error field", reason(status)),
        });
    }
    grant_from(status, &fields)
}

/// The failure an answer describes, in any of the shapes issuers use. A 200
/// that carries an error is a failure too.
fn error_in(status: u16, fields: &serde_json::Map<String, Value>) -> Option<FailureKind> {
    let words = if let Some(code) = fields.get("error") {
        // RFC 6749 5.2: {"error": "...", "error_description": "..."}
        let code = text_of(code);
        match fields.get("error_description").map(text_of) {
            Some(description) if !description.is_empty() => format!("{code}: {description}"),
            _ => code,
        }
    } else if let Some(errors) = fields.get("errors") {
        // Checkissuing: {"status": 0, "errors": ["Access Denied"]}
        match errors {
            Value::Array(items) => items.iter().map(text_of).collect::<Vec<_>>().join("; "),
            other => text_of(other),
        }
    } else if fields.get("status").and_then(Value::as_i64) == Some(0)
        && !fields.contains_key("access_token")
    {
        "status 0 with no error text".to_owned()
    } else {
        return None;
    };
    let words = sanitize(&words);
    let denied = matches!(status, 401 | 403) || {
        let lower = words.to_ascii_lowercase();
        lower.starts_with("invalid_client")
            || lower.starts_with("unauthorized_client")
            || lower.contains("access denied")
    };
    Some(if denied {
        FailureKind::Denied { status, words }
    } else {
        FailureKind::Refused { status, words }
    })
}

fn grant_from(status: u16, fields: &serde_json::Map<String, Value>) -> Result<Grant, FailureKind> {
    let malformed = |problem: &str| FailureKind::Malformed {
        status,
        problem: problem.to_owned(),
    };
    let access_token = match fields.get("access_token") {
        Some(Value::String(token)) if !token.is_empty() => AccessToken::new(token.clone()),
        Some(_) => return Err(malformed("access_token is not a non-empty string")),
        None => return Err(malformed("no access_token")),
    };
    let token_type = match fields.get("token_type") {
        Some(Value::String(t)) if t.eq_ignore_ascii_case("bearer") => "Bearer".to_owned(),
        Some(Value::String(t)) if !t.is_empty() => sanitize(t),
        None => "Bearer".to_owned(),
        Some(_) => return Err(malformed("token_type is not a string")),
    };
    let expires_in = match fields.get("expires_in") {
        None | Some(Value::Null) => None,
        Some(value) => Some(
            lifetime(value)
                .ok_or_else(|| malformed("expires_in is not a positive number of seconds"))?,
        ),
    };
    let scope = match fields.get("scope") {
        Some(Value::String(s)) => Some(ScopeSet::from_granted(s)),
        Some(Value::Null) | None => None,
        Some(_) => return Err(malformed("scope is not a string")),
    };
    Ok(Grant {
        access_token,
        token_type,
        expires_in,
        scope,
    })
}

/// `expires_in` as a number or a numeric string. Fractions are rounded
/// down; zero or less is refused (a token born expired is of no use).
fn lifetime(value: &Value) -> Option<Duration> {
    let secs = match value {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    // Ten years: beyond it the value is nonsense, and Instant arithmetic on
    // a huge value could overflow.
    const MAX: f64 = 10.0 * 365.0 * 86400.0;
    (secs.is_finite() && secs >= 1.0).then(|| Duration::from_secs(secs.min(MAX) as u64))
}

fn text_of(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Issuer text as we repeat it: one line, printable, bounded.
fn sanitize(text: &str) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_WORDS)
        .collect();
    if text.chars().count() > MAX_WORDS {
        out.push('…');
    }
    out
}

/// An issuer that echoes what it was sent must not get our secret into a
/// log line through its error text.
fn redact(kind: FailureKind, secret: &ClientSecret) -> FailureKind {
    let scrub = |words: String| {
        let secret = secret.expose();
        if secret.len() >= 4 && words.contains(secret) {
            words.replace(secret, "[redacted]")
        } else {
            words
        }
    };
    match kind {
        FailureKind::Denied { status, words } => FailureKind::Denied {
            status,
            words: scrub(words),
        },
        FailureKind::Refused { status, words } => FailureKind::Refused {
            status,
            words: scrub(words),
        },
        other => other,
    }
}

fn reason(status: u16) -> &'static str {
    reqwest::StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    const JSON: &str = "application/json";

    #[test]
    fn checkissuing_token() {
        let body = br#"{"token_type": "Bearer", "expires_in": 3600, "access_token": "0aba4911442f22c04b1f4f4e7cc50edb9856f213"}"#;
        let grant = parse_answer(200, JSON, body).unwrap();
        assert_eq!(
            grant.access_token.expose(),
            "0aba4911442f22c04b1f4f4e7cc50edb9856f213"
        );
        assert_eq!(grant.token_type, "Bearer");
        assert_eq!(grant.expires_in, Some(Duration::from_secs(3600)));
        assert_eq!(grant.scope, None);
    }

    #[test]
    fn checkout_token_with_scope() {
        let body = br#"{"access_token":"eyJ.x.y","expires_in":"3600","token_type":"bearer","scope":"fx gateway vault"}"#;
        let grant = parse_answer(200, JSON, body).unwrap();
        assert_eq!(grant.token_type, "Bearer");
        assert_eq!(grant.expires_in, Some(Duration::from_secs(3600)));
        assert_eq!(grant.scope.unwrap().joined(), "fx gateway vault");
    }

    #[test]
    fn missing_expires_in_is_reported_as_none() {
        let grant =
            parse_answer(200, JSON, br#"{"access_token":"t","token_type":"Bearer"}"#).unwrap();
        assert_eq!(grant.expires_in, None);
    }

    #[test]
    fn bad_lifetimes_are_malformed() {
        for bad in [r#"0"#, r#"-5"#, r#""soon""#, r#"true"#] {
            let body =
                format!(r#"{{"access_token":"t","token_type":"Bearer","expires_in":{bad}}}"#);
            assert!(
                matches!(
                    parse_answer(200, JSON, body.as_bytes()),
                    Err(FailureKind::Malformed { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn checkissuing_denial_with_401_and_with_200() {
        let body = br#"{"status":0,"errors":["Access Denied"]}"#;
        for status in [401, 200] {
            let failure = parse_answer(status, JSON, body).unwrap_err();
            assert_eq!(
                failure,
                FailureKind::Denied {
                    status,
                    words: "Access Denied".into()
                }
            );
            assert!(failure.to_string().starts_with("access denied"));
        }
    }

    #[test]
    fn rfc6749_errors() {
        let body = br#"{"error":"invalid_client","error_description":"bad secret"}"#;
        let failure = parse_answer(401, JSON, body).unwrap_err();
        assert_eq!(failure.to_string(), "access denied: the issuer rejected the client credentials (HTTP 401: invalid_client: bad secret)");
        let body = br#"{"error":"invalid_scope"}"#;
        assert_eq!(
            parse_answer(400, JSON, body).unwrap_err(),
            FailureKind::Refused {
                status: 400,
                words: "invalid_scope".into()
            }
        );
        // An error inside a 200 is still an error.
        let body = br#"{"error":"invalid_client","access_token":"x"}"#;
        assert!(matches!(
            parse_answer(200, JSON, body),
            Err(FailureKind::Denied { .. })
        ));
    }

    #[test]
    fn html_error_page() {
        let failure =
            parse_answer(502, "text/html", b"<html><title>Bad Gateway</title></html>").unwrap_err();
        assert_eq!(
            failure.to_string(),
            "the issuer answered HTTP 502 Bad Gateway with a non-JSON body (text/html)"
        );
        assert!(matches!(
            parse_answer(200, "text/html", b"<html>"),
            Err(FailureKind::Malformed { .. })
        ));
    }

    #[test]
    fn issuer_words_are_bounded_and_single_line() {
        let body = format!(
            r#"{{"error":"server_error","error_description":"a\nb{}"}}"#,
            "x".repeat(5000)
        );
        let FailureKind::Refused { words, .. } =
            parse_answer(500, JSON, body.as_bytes()).unwrap_err()
        else {
            panic!("expected Refused");
        };
        assert!(!words.contains('\n'));
        assert!(words.chars().count() <= MAX_WORDS + 1);
    }

    #[test]
    fn echoed_secret_is_scrubbed() {
        let secret = ClientSecret::new("sekrit-value".into());
        let kind = FailureKind::Refused {
            status: 400,
            words: "bad client_secret sekrit-value".into(),
        };
        assert_eq!(
            redact(kind, &secret),
            FailureKind::Refused {
                status: 400,
                words: "bad client_secret [redacted]".into()
            }
        );
    }

    #[test]
    fn retry_after_forms() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, "5".parse().unwrap());
        assert_eq!(retry_after(429, &headers), Some(Duration::from_secs(5)));
        assert_eq!(retry_after(500, &headers), None);
        headers.insert(
            RETRY_AFTER,
            "Sun, 06 Nov 1994 08:49:37 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(503, &headers), Some(Duration::ZERO));
    }
}
