//! The token-endpoint client: one `client_credentials` exchange per call.
//!
//! Request building follows RFC 6749 4.4 and 2.3.1; answer parsing accepts
//! the RFC's shapes and the two seed issuers' dialects (Checkout.com's
//! `/connect/token`, Checkissuing's `{"status":0,"errors":[…]}`). Parsing is
//! a pure function over status and body so tests can feed it bytes. It
//! caches no tokens and knows nothing of sockets; for a key with `issuer`
//! it asks [`crate::discovery`] for the token endpoint first.
//!
//! Issuer text (error words, content types, token types, granted scopes)
//! reaches callers and the journal, so the secret (or, for
//! `private_key_jwt`, the request's signed assertion) and the proxy's
//! credentials are scrubbed from it in any encoding that decodes to them
//! ([`Scrubber`], from [`crate::scrub`]) before it is cut to length. The
//! secret's copies we make for a request (the form body, the Basic header)
//! live in buffers that are wiped when the HTTP stack drops them, and the
//! token is parsed straight into an [`AccessToken`], never into a
//! `serde_json::Value`.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER};
use serde::Deserialize;
use serde_json::Value;
use url::Url;
use zeroize::Zeroizing;

use crate::assertion::{self, AssertionError, Jws};
use crate::config::{AuthMethod, Config, KeyConfig};
use crate::discovery::Discoveries;
use crate::scope::ScopeSet;
pub use crate::scrub::Scrubber;
use crate::secret::AccessToken;
use crate::transport::{self, Clients};

/// The most of an issuer's answer we read. Token answers are a few KiB even
/// with large JWTs; anything bigger is a misbehaving server.
pub const MAX_ANSWER_BYTES: usize = 1 << 20;

/// Longest piece of an issuer's or a discovery document's text we repeat,
/// in the log, in answers and on the terminal (`tokend check --online`).
pub const MAX_WORDS: usize = 300;

/// A successful token answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub access_token: AccessToken,
    /// `Bearer` whatever case the issuer used, without an allocation (each
    /// cached token holds one); other types as sent.
    pub token_type: Cow<'static, str>,
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
    /// The issuer granted scopes the key's `scopes` list does not allow;
    /// the token is dropped, never handed out.
    #[error(
        "the issuer granted scopes the key does not allow ({extra}); its token is not handed out"
    )]
    TooWide { status: u16, extra: String },
    #[error("the issuer's answer is larger than {} bytes", MAX_ANSWER_BYTES)]
    TooLarge,
    #[error("no answer from the issuer within {}", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("failed to reach the issuer: {0}")]
    Transport(String),
    /// The TLS handshake failed: most often a CA the key does not trust.
    #[error("TLS: {0}")]
    Tls(String),
    /// The key's secret could not be read at start; the issuer was not asked.
    #[error("the client secret could not be read ({0}); fix it and reload")]
    NoSecret(String),
    /// No client assertion could be signed; the issuer was not asked.
    #[error("{0}")]
    Assertion(AssertionError),
    /// The key's issuer could not be discovered, or its document does not
    /// fit the key; the token endpoint was not asked.
    #[error("discovery failed: {0}")]
    Discovery(String),
}

impl IssuerError {
    /// A few words for a status line: "500 from issuer", "access denied".
    pub fn short(&self) -> String {
        match &self.kind {
            FailureKind::Denied { .. } => "access denied".to_owned(),
            FailureKind::Refused { status, .. }
            | FailureKind::Http { status, .. }
            | FailureKind::Malformed { status, .. } => format!("{status} from issuer"),
            FailureKind::TooWide { .. } => "grant too wide".to_owned(),
            FailureKind::TooLarge => "oversized answer".to_owned(),
            FailureKind::Timeout(_) => "issuer timed out".to_owned(),
            FailureKind::Transport(_) => "issuer unreachable".to_owned(),
            FailureKind::Tls(_) => "TLS handshake failed".to_owned(),
            FailureKind::NoSecret(_) => "secret unreadable".to_owned(),
            FailureKind::Assertion(_) => "assertion unsigned".to_owned(),
            FailureKind::Discovery(_) => "discovery failed".to_owned(),
        }
    }

    /// The HTTP status the issuer answered with, if it answered.
    pub fn status(&self) -> Option<u16> {
        match &self.kind {
            FailureKind::Denied { status, .. }
            | FailureKind::Refused { status, .. }
            | FailureKind::Http { status, .. }
            | FailureKind::Malformed { status, .. }
            | FailureKind::TooWide { status, .. } => Some(*status),
            FailureKind::TooLarge
            | FailureKind::Timeout(_)
            | FailureKind::Transport(_)
            | FailureKind::Tls(_)
            | FailureKind::NoSecret(_)
            | FailureKind::Assertion(_)
            | FailureKind::Discovery(_) => None,
        }
    }
}

/// Talks to token endpoints. Cheap to clone; one connection pool for each
/// distinct `ca_file` and `proxy` of the keys it was built for.
#[derive(Clone)]
pub struct IssuerClient {
    http: Clients,
    /// The token endpoints of keys configured with `issuer`.
    discoveries: Arc<Discoveries>,
}

impl fmt::Debug for IssuerClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("IssuerClient")
    }
}

impl IssuerClient {
    /// A client for keys with neither `ca_file` nor `proxy`.
    pub fn new() -> Result<IssuerClient, reqwest::Error> {
        Ok(IssuerClient {
            http: Clients::for_keys([])?,
            discoveries: Arc::default(),
        })
    }

    /// A client for every key of `config`. Reads the system trust store.
    pub fn for_config(config: &Config) -> Result<IssuerClient, reqwest::Error> {
        Ok(IssuerClient {
            http: Clients::for_keys(config.keys.values())?,
            discoveries: Arc::default(),
        })
    }

    /// Reads the discovery document of a key configured with `issuer`,
    /// uncached and unchecked, for `tokend check --online`. `None` for a
    /// key with `token_url`.
    pub async fn discovery_document(
        &self,
        key: &KeyConfig,
    ) -> Option<Result<crate::discovery::Document, String>> {
        let crate::config::Endpoint::Issuer(issuer) = &key.endpoint else {
            return None;
        };
        let Some(http) = self.http.get(key) else {
            return Some(Err("no HTTP client was set up for this key".to_owned()));
        };
        let fetch = crate::discovery::fetch(http, issuer);
        Some(
            match tokio::time::timeout(key.request_timeout, fetch).await {
                Ok(outcome) => outcome,
                Err(_) => Err(format!(
                    "no answer from {} within {}",
                    issuer.as_str(),
                    humantime::format_duration(key.request_timeout)
                )),
            },
        )
    }

    /// Asks `key`'s issuer for a token with `scopes` (the issuer's default
    /// set when empty) for `resource` (RFC 8707; none sends none), and
    /// counts the request in the metrics.
    pub async fn fetch(
        &self,
        key: &KeyConfig,
        scopes: &ScopeSet,
        resource: Option<&str>,
    ) -> Result<Grant, IssuerError> {
        let started = tokio::time::Instant::now();
        let result = self.fetch_uncounted(key, scopes, resource).await;
        crate::metrics::issuer_answered(&key.name, &result, started.elapsed());
        result
    }

    async fn fetch_uncounted(
        &self,
        key: &KeyConfig,
        scopes: &ScopeSet,
        resource: Option<&str>,
    ) -> Result<Grant, IssuerError> {
        let configured = |kind| IssuerError {
            url: printable(key.endpoint.configured()),
            kind,
            retry_after: None,
        };
        if let Some(why) = &key.unusable {
            return Err(configured(FailureKind::NoSecret(why.clone())));
        }
        let mut scrubber = Scrubber::for_key(key);
        let token_url = self
            .discoveries
            .token_endpoint(key, self.http.get(key))
            .await
            .map_err(|kind| configured(scrubber.failure(kind)))?;
        // A discovered endpoint is the document's text, as long as it was.
        let shown_url = printable(token_url.as_str());
        let fail = |kind| IssuerError {
            url: shown_url.clone(),
            kind,
            retry_after: None,
        };
        // Signed per request: each assertion has its own jti and a life
        // of a minute. A millisecond or two of CPU for RSA, on this task.
        let assertion = match &key.assertion {
            Some(settings) => Some(
                settings
                    .sign(&key.client_id, &token_url)
                    .map_err(|e| fail(FailureKind::Assertion(e)))?,
            ),
            None => None,
        };
        if let Some(jws) = &assertion {
            scrubber.add_assertion(jws);
        }
        let asked = Asked { scopes, resource };
        let exchange = self.exchange(key, &token_url, asked, assertion.as_ref());
        let (status, headers, body) =
            match tokio::time::timeout(key.request_timeout, exchange).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(kind)) => return Err(fail(scrubber.failure(kind))),
                Err(_) => return Err(fail(FailureKind::Timeout(key.request_timeout))),
            };
        let grant =
            parse_answer(status, content_type(&headers), &body, &scrubber).map_err(|kind| {
                IssuerError {
                    url: shown_url.clone(),
                    kind,
                    retry_after: retry_after(status, &headers),
                }
            })?;
        match wider_than_allowed(key, status, &grant) {
            Some(kind) => Err(fail(kind)),
            None => Ok(grant),
        }
    }

    async fn exchange(
        &self,
        key: &KeyConfig,
        token_url: &Url,
        asked: Asked<'_>,
        assertion: Option<&Jws>,
    ) -> Result<(u16, HeaderMap, Zeroizing<Vec<u8>>), FailureKind> {
        let http = self.http.get(key).ok_or_else(|| {
            FailureKind::Transport(
                "no HTTP client was set up for this key's ca_file and proxy".to_owned(),
            )
        })?;
        let request = build_request(http, key, token_url, asked, assertion);
        let mut response = request.send().await.map_err(|e| transport(e, key))?;
        let status = response.status().as_u16();
        if response
            .content_length()
            .is_some_and(|n| n > MAX_ANSWER_BYTES as u64)
        {
            return Err(FailureKind::TooLarge);
        }
        let mut body = Zeroizing::new(Vec::new());
        while let Some(chunk) = response.chunk().await.map_err(|e| transport(e, key))? {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(FailureKind::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        Ok((status, response.headers().clone(), body))
    }
}

/// What one token request asks the issuer for.
#[derive(Clone, Copy)]
struct Asked<'a> {
    scopes: &'a ScopeSet,
    /// RFC 8707 `resource`; the cache only asks for ones the key allows.
    resource: Option<&'a str>,
}

/// `assertion` is what `private_key_jwt` sends; other methods have none.
fn build_request(
    http: &reqwest::Client,
    key: &KeyConfig,
    token_url: &Url,
    asked: Asked<'_>,
    assertion: Option<&Jws>,
) -> reqwest::RequestBuilder {
    // The cache already asks for effective sets; this makes sure no path
    // can send a key that lists `scopes` to the issuer without `scope`.
    let scopes = &key.effective_scopes(asked.scopes.clone());
    let secret = key.client_secret.expose();
    // Sized up front so the buffer never grows: growing would leave copies
    // of the secret in freed memory.
    let jws = assertion.map_or("", Jws::expose);
    let room = 64
        + 3 * (scopes.joined().len() + key.client_id.len() + secret.len())
        + 3 * assertion::ASSERTION_TYPE.len()
        + jws.len();
    let mut form = form_urlencoded::Serializer::new(String::with_capacity(room));
    form.append_pair("grant_type", "client_credentials");
    if !scopes.is_empty() {
        form.append_pair("scope", scopes.joined());
    }
    // Neither is secret, and both come from the configuration.
    if let Some(resource) = asked.resource {
        form.append_pair("resource", resource);
    }
    if let Some(audience) = &key.audience {
        form.append_pair("audience", audience);
    }
    let request = http
        .post(token_url.clone())
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .header(ACCEPT, "application/json");
    let request = match key.auth {
        AuthMethod::Basic => request.header(AUTHORIZATION, basic_credentials(key)),
        AuthMethod::Post => {
            form.append_pair("client_id", &key.client_id);
            form.append_pair("client_secret", secret);
            request
        }
        AuthMethod::PrivateKeyJwt => {
            form.append_pair("client_id", &key.client_id);
            form.append_pair("client_assertion_type", assertion::ASSERTION_TYPE);
            // base64url and dots: the form encoding leaves it as it is.
            form.append_pair("client_assertion", jws);
            request
        }
        // RFC 8705 2: the TLS handshake authenticated the client; the body
        // says which client it claims to be.
        AuthMethod::TlsClientAuth | AuthMethod::SelfSignedTlsClientAuth => {
            form.append_pair("client_id", &key.client_id);
            request
        }
    };
    request.body(wiped(form.finish().into_bytes()))
}

/// Bytes whose buffer is zeroed when the last reference (ours or the HTTP
/// stack's) goes away.
fn wiped(bytes: Vec<u8>) -> Bytes {
    Bytes::from_owner(Zeroizing::new(bytes))
}

/// `Basic base64(urlencode(id) ":" urlencode(secret))`. RFC 6749 2.3.1:
/// id and secret are form-urlencoded before they are joined with ':' and
/// base64-encoded, so a ':' in the id survives. Marked sensitive, so the
/// HTTP stack neither indexes nor prints it.
fn basic_credentials(key: &KeyConfig) -> HeaderValue {
    let pair = basic_pair(key);
    let mut header = String::with_capacity(6 + 4 * pair.len().div_ceil(3));
    header.push_str("Basic ");
    base64::engine::general_purpose::STANDARD.encode_string(pair.as_bytes(), &mut header);
    let value = HeaderValue::from_maybe_shared(wiped(header.into_bytes()));
    // Base64 and "Basic " are visible ASCII, which a header value accepts.
    let mut value = value.unwrap_or_else(|_| HeaderValue::from_static("Basic"));
    value.set_sensitive(true);
    value
}

/// `urlencode(id) ":" urlencode(secret)`, in memory that is wiped.
fn basic_pair(key: &KeyConfig) -> Zeroizing<String> {
    let (id, secret) = (&key.client_id, key.client_secret.expose());
    let mut pair = Zeroizing::new(String::with_capacity(3 * (id.len() + secret.len()) + 1));
    pair.extend(form_urlencoded::byte_serialize(id.as_bytes()));
    pair.push(':');
    pair.extend(form_urlencoded::byte_serialize(secret.as_bytes()));
    pair
}

/// What a request for a key could carry that an answer must not repeat.
impl Scrubber {
    /// `key`'s client secret, in any encoding that decodes to it and in
    /// both base64 Basic credentials (of the form-encoded `id:secret` pair
    /// tokend sends, and of the raw one), and its proxy's credentials.
    pub fn for_key(key: &KeyConfig) -> Scrubber {
        let mut scrubber = Scrubber::none();
        let (id, secret) = (&key.client_id, key.client_secret.expose());
        // A key without a secret (`private_key_jwt`, the tls_client_auth
        // methods) has none to scrub; the Basic forms of an empty one
        // would only blank the client id.
        if !secret.is_empty() {
            scrubber.add_secret(secret);
            let encoded_id: usize = form_urlencoded::byte_serialize(id.as_bytes())
                .map(str::len)
                .sum();
            scrubber.add_base64(basic_pair(key).as_bytes(), encoded_id + 1);
            let mut raw_pair = Zeroizing::new(String::with_capacity(id.len() + 1 + secret.len()));
            raw_pair.push_str(id);
            raw_pair.push(':');
            raw_pair.push_str(secret);
            scrubber.add_base64(raw_pair.as_bytes(), id.len() + 1);
        }
        // A proxy's credentials never go to the issuer, but a proxy's own
        // error page could repeat them.
        transport::add_proxy_secrets(key, &mut scrubber);
        scrubber
    }

    /// Also scrubs a request's signed assertion: whole (cut short, only
    /// past its header), and its payload and signature alone (an issuer
    /// may quote a part). The header, the same for every request and
    /// secret in no way, is left.
    pub fn add_assertion(&mut self, jws: &Jws) {
        let whole = jws.expose();
        let header = whole.find('.').map_or(0, |dot| dot + 1);
        self.add_form(whole, header);
        for part in whole.split('.').skip(1).filter(|p| !p.is_empty()) {
            self.add_form(part, 0);
        }
    }

    /// Issuer text as we repeat it: scrubbed first, then one printable
    /// line, then bounded, so a secret straddling the cut leaves no prefix.
    /// Only as much of the text is read as the cut can show.
    fn sanitize(&self, text: &str) -> String {
        let (scrubbed, unread) = self.scrub_head(text, MAX_WORDS);
        let mut out = printable(&scrubbed);
        if unread && !out.ends_with('…') {
            out.push('…');
        }
        out
    }

    /// `kind` with the words a proxy, the HTTP stack or a discovery
    /// document put in it scrubbed. Answers are scrubbed as they are
    /// parsed ([`parse_answer`]).
    fn failure(&self, kind: FailureKind) -> FailureKind {
        match kind {
            FailureKind::Transport(text) => FailureKind::Transport(self.scrub(&text)),
            FailureKind::Tls(text) => FailureKind::Tls(self.scrub(&text)),
            FailureKind::Discovery(text) => FailureKind::Discovery(self.scrub(&text)),
            other => other,
        }
    }
}

/// The innermost cause of a reqwest error: "Connection refused (os error
/// 111)" tells an operator more than "error sending request". A failed TLS
/// handshake is told apart: it needs a different fix.
fn transport(err: reqwest::Error, key: &KeyConfig) -> FailureKind {
    // The HTTP stack's words may name the endpoint's host, which for a
    // discovered endpoint is the document's text: bounded like it.
    if let Some(problem) = transport::tls_failure(&err) {
        return FailureKind::Tls(printable(&problem));
    }
    // Some servers (node's among them) check a client certificate after
    // the handshake and, refusing it, drop the connection without an
    // alert: for a key that sent one, that is the likeliest reason.
    if key.client_identity.is_some() && transport::dropped_by_peer(&err) {
        return FailureKind::Tls(
            "the issuer closed the connection without answering: it may have refused the \
             client certificate (its log will say)"
                .to_owned(),
        );
    }
    let mut cause: &dyn std::error::Error = &err;
    while let Some(next) = cause.source() {
        cause = next;
    }
    FailureKind::Transport(printable(&cause.to_string()))
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
    // Or an HTTP date (RFC 9110 10.2.3), in any of its three forms.
    let when = httpdate::parse_http_date(value).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    )
}

/// The fields of a token or error answer we read. Unknown fields are
/// skipped; the token goes straight into memory that is wiped.
#[derive(Deserialize)]
struct RawAnswer {
    access_token: Option<TokenField>,
    token_type: Option<Value>,
    expires_in: Option<Value>,
    scope: Option<Value>,
    error: Option<Value>,
    error_description: Option<Value>,
    errors: Option<Value>,
    status: Option<Value>,
}

/// `access_token` as sent: a string, or anything else (reported, not kept).
enum TokenField {
    Text(AccessToken),
    Other,
}

impl<'de> Deserialize<'de> for TokenField {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(TokenVisitor)
    }
}

struct TokenVisitor;

impl<'de> serde::de::Visitor<'de> for TokenVisitor {
    type Value = TokenField;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_str<E>(self, v: &str) -> Result<TokenField, E> {
        Ok(TokenField::Text(AccessToken::new(v.to_owned())))
    }

    fn visit_string<E>(self, v: String) -> Result<TokenField, E> {
        Ok(TokenField::Text(AccessToken::new(v)))
    }

    fn visit_bool<E>(self, _: bool) -> Result<TokenField, E> {
        Ok(TokenField::Other)
    }

    fn visit_i64<E>(self, _: i64) -> Result<TokenField, E> {
        Ok(TokenField::Other)
    }

    fn visit_u64<E>(self, _: u64) -> Result<TokenField, E> {
        Ok(TokenField::Other)
    }

    fn visit_f64<E>(self, _: f64) -> Result<TokenField, E> {
        Ok(TokenField::Other)
    }

    fn visit_unit<E>(self) -> Result<TokenField, E> {
        Ok(TokenField::Other)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<TokenField, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(TokenField::Other)
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<TokenField, A::Error> {
        while map
            .next_entry::<serde::de::IgnoredAny, serde::de::IgnoredAny>()?
            .is_some()
        {}
        Ok(TokenField::Other)
    }
}

/// Turns an issuer's answer into a grant or a failure. Issuer text in a
/// failure has gone through `scrubber`.
pub fn parse_answer(
    status: u16,
    content_type: &str,
    body: &[u8],
    scrubber: &Scrubber,
) -> Result<Grant, FailureKind> {
    // A derived struct would also take a JSON array, field by position.
    let is_object = body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{');
    let parsed = is_object
        .then(|| serde_json::from_slice::<RawAnswer>(body).ok())
        .flatten();
    if matches!(status, 401 | 403) {
        return Err(rejected(status, parsed.as_ref(), body, scrubber));
    }
    let Some(answer) = parsed else {
        return Err(if (200..300).contains(&status) {
            FailureKind::Malformed {
                status,
                problem: format!(
                    "the body is not a usable JSON object ({})",
                    scrubber.sanitize(content_type)
                ),
            }
        } else {
            FailureKind::Http {
                status,
                reason: reason(status).to_owned(),
                content_type: scrubber.sanitize(content_type),
            }
        });
    };
    if let Some(failure) = error_in(status, &answer, scrubber) {
        return Err(failure);
    }
    if !(200..300).contains(&status) {
        return Err(FailureKind::Refused {
            status,
            words: format!("{} with no error field", reason(status)),
        });
    }
    grant_from(status, answer, scrubber)
}

/// A 401 or 403 from the token endpoint: rejected credentials whatever the
/// body's shape, unless its error code names a failure of the set alone
/// ([`fails_the_set_only`]). Real issuers answer a wrong secret with a
/// JSON error, an HTML page, or a bare status with no body at all; each
/// must pause the key, and each says what it can: the error's words, else
/// the body's, else the status's reason.
fn rejected(
    status: u16,
    answer: Option<&RawAnswer>,
    body: &[u8],
    scrubber: &Scrubber,
) -> FailureKind {
    if let Some(failure) = answer.and_then(|answer| error_in(status, answer, scrubber)) {
        return failure;
    }
    let text = String::from_utf8_lossy(body);
    let words = match text.trim() {
        "" => reason(status).to_owned(),
        words => scrubber.sanitize(words),
    };
    FailureKind::Denied { status, words }
}

/// The failure an answer describes, in any of the shapes issuers use. A 200
/// that carries an error is a failure too.
fn error_in(status: u16, answer: &RawAnswer, scrubber: &Scrubber) -> Option<FailureKind> {
    let mut set_only = false;
    let words = if let Some(code) = &answer.error {
        // RFC 6749 5.2: {"error": "...", "error_description": "..."}
        let code = text_of(code);
        set_only = fails_the_set_only(&code);
        match answer.error_description.as_ref().map(text_of) {
            Some(description) if !description.is_empty() => format!("{code}: {description}"),
            _ => code,
        }
    } else if let Some(errors) = &answer.errors {
        // Checkissuing: {"status": 0, "errors": ["Access Denied"]}
        match errors {
            Value::Array(items) => items.iter().map(text_of).collect::<Vec<_>>().join("; "),
            other => text_of(other),
        }
    } else if answer.status.as_ref().and_then(Value::as_i64) == Some(0)
        && answer.access_token.is_none()
    {
        "status 0 with no error text".to_owned()
    } else {
        return None;
    };
    let words = scrubber.sanitize(&words);
    // An error code that names what failed decides over the status: a
    // 403 `invalid_scope` fails its set, and must not let a caller allowed
    // one set pause the key for every other (see `fails_the_set_only`).
    let denied = !set_only
        && (matches!(status, 401 | 403) || {
            let lower = words.to_ascii_lowercase();
            lower.starts_with("invalid_client")
                || lower.starts_with("unauthorized_client")
                || lower.contains("access denied")
        });
    Some(if denied {
        FailureKind::Denied { status, words }
    } else {
        FailureKind::Refused { status, words }
    })
}

/// RFC 6749 5.2 and RFC 8707 error codes that name a failure of one
/// request's scope set or resource, not of the client: `invalid_scope`,
/// `invalid_target`, and `invalid_request` (a parameter missing, repeated
/// or malformed: the scope and resource are what differ between a key's
/// requests, and a client-authentication problem has its own code,
/// `invalid_client`). Such an answer fails its set, retried with the
/// set's backoff, whatever the HTTP status; rejected credentials pause
/// the whole key. Codes are matched exactly (RFC 6749 A.7 fixes them);
/// `invalid_client`, `unauthorized_client`, `invalid_grant`,
/// `unsupported_grant_type` and unknown codes are not set failures.
fn fails_the_set_only(code: &str) -> bool {
    matches!(
        code.trim(),
        "invalid_scope" | "invalid_target" | "invalid_request"
    )
}

fn grant_from(status: u16, answer: RawAnswer, scrubber: &Scrubber) -> Result<Grant, FailureKind> {
    let malformed = |problem: &str| FailureKind::Malformed {
        status,
        problem: problem.to_owned(),
    };
    // Whatever is wrong with a token, the message never repeats it.
    let access_token = match answer.access_token {
        Some(TokenField::Text(token)) if token.is_well_formed() => token,
        Some(_) => {
            return Err(malformed(
                "access_token is not a non-empty string of visible ASCII without \
                 surrounding spaces (RFC 6749 A.12)",
            ))
        }
        None => return Err(malformed("no access_token")),
    };
    let token_type = match &answer.token_type {
        Some(Value::String(t)) if t.eq_ignore_ascii_case("bearer") => Cow::Borrowed("Bearer"),
        Some(Value::String(t)) if is_token_type(t) => Cow::Owned(scrubber.sanitize(t)),
        None => Cow::Borrowed("Bearer"),
        Some(_) => {
            return Err(malformed(
                "token_type is not one word of visible ASCII (RFC 6749 A.13)",
            ))
        }
    };
    let expires_in = match &answer.expires_in {
        None | Some(Value::Null) => None,
        Some(value) => Some(
            lifetime(value)
                .ok_or_else(|| malformed("expires_in is not a positive number of seconds"))?,
        ),
    };
    let scope = match &answer.scope {
        // Granted scopes reach callers, `tokend get` and the log as they
        // are, so they are held to the scope-token rule and a size bound
        // ([`ScopeSet::granted`]). Scrubbed like any issuer text first.
        Some(Value::String(s)) => {
            Some(ScopeSet::granted(&scrubber.scrub(s)).map_err(|e| malformed(&e.to_string()))?)
        }
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

/// RFC 6749 A.13: a type name or a URI, both visible ASCII without spaces.
/// One too long to repeat whole is no type a caller could use.
fn is_token_type(token_type: &str) -> bool {
    (1..=MAX_WORDS).contains(&token_type.len()) && token_type.bytes().all(|b| b.is_ascii_graphic())
}

/// Why `grant` may not be handed out for `key`: it names scopes outside
/// the key's `scopes` list. A key without a list leaves the set to the
/// issuer (callers may only ask for its default one), so any grant fits
/// it; so does a grant that does not say its scope.
fn wider_than_allowed(key: &KeyConfig, status: u16, grant: &Grant) -> Option<FailureKind> {
    let (Some(allowed), Some(granted)) = (&key.scopes, &grant.scope) else {
        return None;
    };
    let extra = granted.outside(allowed);
    (!extra.is_empty()).then(|| FailureKind::TooWide {
        status,
        extra: listed(&extra),
    })
}

/// `scopes` space-separated, as many whole ones as fit in [`MAX_WORDS`]
/// and a count of the rest: an issuer may grant thousands.
fn listed(scopes: &[&str]) -> String {
    let mut out = String::new();
    let mut shown = 0;
    for scope in scopes {
        if !out.is_empty() && out.len() + 1 + scope.len() > MAX_WORDS {
            break;
        }
        if !out.is_empty() {
            out.push(' ');
        }
        // A first scope too long to show whole is cut.
        out.push_str(&printable(scope));
        shown += 1;
    }
    if shown < scopes.len() {
        out.push_str(&format!(" and {} more", scopes.len() - shown));
    }
    out
}

/// Issuer or discovery-document text as tokend repeats it in answers,
/// `status` and the log: [`crate::printable::shown`] at [`MAX_WORDS`], the
/// rule the CLI applies too, so no terminal escape or forged line gets
/// through either. Text that can hold a secret goes through a [`Scrubber`]
/// first.
pub fn printable(text: &str) -> String {
    crate::printable::shown(text, MAX_WORDS)
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

/// A string as it is; anything else (a Google-style `{"code":401,
/// "message":"…"}` error) as JSON text, whose escapes the scrubber's JSON
/// reading undoes, so a secret they split is still found.
fn text_of(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
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

    fn endpoint_of(key: &KeyConfig) -> Url {
        match &key.endpoint {
            crate::config::Endpoint::TokenUrl(url) => url.clone(),
            crate::config::Endpoint::Issuer(_) => panic!("these keys give token_url"),
        }
    }

    const JSON: &str = "application/json";

    #[test]
    fn checkissuing_token() {
        let body = br#"{"token_type": "Bearer", "expires_in": 3600, "access_token": "0aba4911442f22c04b1f4f4e7cc50edb9856f213"}"#;
        let grant = parse_answer(200, JSON, body, &Scrubber::none()).unwrap();
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
        let grant = parse_answer(200, JSON, body, &Scrubber::none()).unwrap();
        assert_eq!(grant.token_type, "Bearer");
        assert_eq!(grant.expires_in, Some(Duration::from_secs(3600)));
        assert_eq!(grant.scope.unwrap().joined(), "fx gateway vault");
    }

    #[test]
    fn missing_expires_in_is_reported_as_none() {
        let grant = parse_answer(
            200,
            JSON,
            br#"{"access_token":"t","token_type":"Bearer"}"#,
            &Scrubber::none(),
        )
        .unwrap();
        assert_eq!(grant.expires_in, None);
    }

    #[test]
    fn bad_lifetimes_are_malformed() {
        for bad in [r#"0"#, r#"-5"#, r#""soon""#, r#"true"#] {
            let body =
                format!(r#"{{"access_token":"t","token_type":"Bearer","expires_in":{bad}}}"#);
            assert!(
                matches!(
                    parse_answer(200, JSON, body.as_bytes(), &Scrubber::none()),
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
            let failure = parse_answer(status, JSON, body, &Scrubber::none()).unwrap_err();
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
        let failure = parse_answer(401, JSON, body, &Scrubber::none()).unwrap_err();
        assert_eq!(failure.to_string(), "access denied: the issuer rejected the client credentials (HTTP 401: invalid_client: bad secret)");
        let body = br#"{"error":"invalid_scope"}"#;
        assert_eq!(
            parse_answer(400, JSON, body, &Scrubber::none()).unwrap_err(),
            FailureKind::Refused {
                status: 400,
                words: "invalid_scope".into()
            }
        );
        // An error inside a 200 is still an error.
        let body = br#"{"error":"invalid_client","access_token":"x"}"#;
        assert!(matches!(
            parse_answer(200, JSON, body, &Scrubber::none()),
            Err(FailureKind::Denied { .. })
        ));
    }

    #[test]
    fn html_error_page() {
        let failure = parse_answer(
            502,
            "text/html",
            b"<html><title>Bad Gateway</title></html>",
            &Scrubber::none(),
        )
        .unwrap_err();
        assert_eq!(
            failure.to_string(),
            "the issuer answered HTTP 502 Bad Gateway with a non-JSON body (text/html)"
        );
        assert!(matches!(
            parse_answer(200, "text/html", b"<html>", &Scrubber::none()),
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
            parse_answer(500, JSON, body.as_bytes(), &Scrubber::none()).unwrap_err()
        else {
            panic!("expected Refused");
        };
        assert!(!words.contains('\n'));
        assert!(words.chars().count() <= MAX_WORDS + 1);
    }

    #[test]
    fn any_401_or_403_is_rejected_credentials() {
        let denied = |status, content_type, body: &[u8]| match parse_answer(
            status,
            content_type,
            body,
            &Scrubber::none(),
        ) {
            Err(FailureKind::Denied { status: s, words }) if s == status => words,
            other => panic!("{status} {body:?}: {other:?}"),
        };
        // Bare, as a real issuer answers a wrong secret.
        assert_eq!(denied(403, "no content type", b""), "Forbidden");
        assert_eq!(denied(401, "text/plain", b" \n"), "Unauthorized");
        // A page or a JSON object without an error member: its words.
        assert_eq!(
            denied(401, "text/html", b"<p>bad\x1b[2J client</p>"),
            "<p>bad?[2J client</p>"
        );
        assert_eq!(
            denied(403, JSON, br#"{"message":"Forbidden"}"#),
            r#"{"message":"Forbidden"}"#
        );
        // Not UTF-8: what can be read of it.
        assert!(denied(403, "text/plain", b"no \xff way").starts_with("no "));
        // A JSON error keeps its own words.
        assert_eq!(
            denied(403, JSON, br#"{"error":"invalid_client"}"#),
            "invalid_client"
        );
        // Long bodies are cut like any issuer text.
        let long = "x".repeat(5000);
        assert!(denied(401, "text/plain", long.as_bytes()).chars().count() <= MAX_WORDS + 1);
        // Other statuses keep their shapes.
        assert!(matches!(
            parse_answer(400, "no content type", b"", &Scrubber::none()),
            Err(FailureKind::Http { .. })
        ));
    }

    #[test]
    fn a_bare_403_never_repeats_the_secret() {
        let key = key_with("id", "echoed-secret-123");
        let shown = parse_answer(
            403,
            "text/plain",
            b"you sent echoed-secret-123",
            &Scrubber::for_key(&key),
        )
        .unwrap_err()
        .to_string();
        assert!(!shown.contains("echoed-secret-123"), "{shown}");
        assert!(shown.contains("you sent [redacted]"), "{shown}");
    }

    #[test]
    fn tokens_and_token_types_are_visible_ascii() {
        let answer = |token: &str, token_type: &str| {
            let body = serde_json::json!({"access_token": token, "token_type": token_type});
            parse_answer(200, JSON, body.to_string().as_bytes(), &Scrubber::none())
        };
        for bad in [
            "",
            "eyJ.ok\u{1b}]0;x\u{7}",
            "a\r\nX-Injected: yes",
            "t\u{7f}",
            "tök",
            "   ",
            " leading",
            "trailing ",
        ] {
            let Err(FailureKind::Malformed { problem, .. }) = answer(bad, "Bearer") else {
                panic!("token {bad:?} was taken");
            };
            assert!(problem.contains("access_token"), "{problem}");
            assert!(bad.trim().is_empty() || !problem.contains(bad), "{problem}");
        }
        // A.12 allows the space and every visible character.
        let grant = answer("a b~!\"#", "Bearer").unwrap();
        assert_eq!(grant.access_token.expose(), "a b~!\"#");
        for bad in ["Bearer\r\nX: y", "two words", "é", ""] {
            assert!(
                matches!(answer("t", bad), Err(FailureKind::Malformed { .. })),
                "token_type {bad:?} was taken"
            );
        }
        let too_long = "N".repeat(MAX_WORDS + 1);
        assert!(matches!(
            answer("t", &too_long),
            Err(FailureKind::Malformed { .. })
        ));
        let grant = answer("t", "urn:ietf:params:oauth:token-type:jwt").unwrap();
        assert_eq!(grant.token_type, "urn:ietf:params:oauth:token-type:jwt");
    }

    #[test]
    fn a_granted_scope_with_a_control_character_is_refused() {
        let body = br#"{"access_token":"t","scope":"gateway \u001b]0;x\u0007"}"#;
        let Err(FailureKind::Malformed { problem, .. }) =
            parse_answer(200, JSON, body, &Scrubber::none())
        else {
            panic!("taken");
        };
        assert!(problem.starts_with("scope is not"), "{problem}");
        assert!(!problem.contains("]0;"), "{problem}");
    }

    #[test]
    fn a_granted_scope_is_held_to_the_scope_token_rule_and_bounded() {
        let scope_of = |scope: &str| {
            let body = serde_json::json!({"access_token": "t", "scope": scope});
            parse_answer(200, JSON, body.to_string().as_bytes(), &Scrubber::none())
        };
        // What `tokend get` would refuse to print, and what could not be
        // sent as a scope, is no grant.
        for bad in ["read\u{2066}", "gateway vault:é", "a\u{a0}b", "quo\"te"] {
            let Err(FailureKind::Malformed { problem, .. }) = scope_of(bad) else {
                panic!("scope {bad:?} was taken");
            };
            assert!(problem.starts_with("scope is not"), "{problem}");
        }
        let huge: Vec<String> = (0..75_000).map(|i| format!("scope-{i:06}")).collect();
        let Err(FailureKind::Malformed { problem, .. }) = scope_of(&huge.join(" ")) else {
            panic!("a scope of 1 MB was taken");
        };
        assert!(problem.starts_with("scope is longer than"), "{problem}");
        let grant = scope_of(" read:all  https://api.example/x ").unwrap();
        assert_eq!(
            grant.scope.unwrap().joined(),
            "https://api.example/x read:all"
        );
    }

    #[test]
    fn an_error_code_naming_the_set_decides_over_401_and_403() {
        for status in [400, 401, 403, 200] {
            for code in ["invalid_scope", "invalid_target", "invalid_request"] {
                let body = serde_json::json!({
                    "error": code,
                    "error_description": "access denied to this one"
                });
                let failure =
                    parse_answer(status, JSON, body.to_string().as_bytes(), &Scrubber::none());
                assert!(
                    matches!(&failure, Err(FailureKind::Refused { status: s, words })
                        if *s == status && words.starts_with(code)),
                    "{status} {code}: {failure:?}"
                );
            }
            for code in ["invalid_client", "unauthorized_client"] {
                let body = serde_json::json!({ "error": code });
                assert!(
                    matches!(
                        parse_answer(status, JSON, body.to_string().as_bytes(), &Scrubber::none()),
                        Err(FailureKind::Denied { .. })
                    ),
                    "{status} {code}"
                );
            }
        }
        // Other codes and bodies without one: any 401 or 403 still pauses.
        for body in [
            r#"{"error":"invalid_grant"}"#,
            r#"{"error":"invalid_scopes"}"#,
            r#"{"errors":["invalid_scope"]}"#,
        ] {
            assert!(
                matches!(
                    parse_answer(403, JSON, body.as_bytes(), &Scrubber::none()),
                    Err(FailureKind::Denied { .. })
                ),
                "{body}"
            );
        }
    }

    fn grant_of(scope: Option<&str>) -> Grant {
        Grant {
            access_token: AccessToken::new("t".to_owned()),
            token_type: Cow::Borrowed("Bearer"),
            expires_in: None,
            scope: scope.map(ScopeSet::from_granted),
        }
    }

    #[test]
    fn a_grant_must_fit_the_keys_scopes() {
        let mut key = key_with("id", "s");
        // No list: the issuer's default set is whatever it grants.
        assert_eq!(wider_than_allowed(&key, 200, &grant_of(Some("a b"))), None);
        key.scopes = Some(ScopeSet::new(["gateway", "vault"]).unwrap());
        for fits in [None, Some("gateway"), Some("vault gateway"), Some("")] {
            assert_eq!(
                wider_than_allowed(&key, 200, &grant_of(fits)),
                None,
                "{fits:?}"
            );
        }
        let wide = wider_than_allowed(&key, 200, &grant_of(Some("fx gateway zz")));
        assert_eq!(
            wide,
            Some(FailureKind::TooWide {
                status: 200,
                extra: "fx zz".into()
            })
        );
        assert_eq!(
            wide.unwrap().to_string(),
            "the issuer granted scopes the key does not allow (fx zz); its token is not handed out"
        );
    }

    #[test]
    fn extra_scopes_are_listed_within_the_limit() {
        let many: Vec<String> = (0..10_000).map(|i| format!("scope{i:05}")).collect();
        let many: Vec<&str> = many.iter().map(String::as_str).collect();
        let shown = listed(&many);
        assert!(shown.len() <= MAX_WORDS + 20, "{} bytes", shown.len());
        assert!(shown.starts_with("scope00000 scope00001 "), "{shown}");
        let whole = shown.split(' ').filter(|s| s.starts_with("scope")).count();
        assert!(
            shown.ends_with(&format!(" and {} more", 10_000 - whole)),
            "{shown}"
        );
        let huge = "x".repeat(10_000);
        let shown = listed(&[&huge, "b"]);
        assert!(shown.chars().count() <= MAX_WORDS + 20, "{shown}");
        assert!(shown.ends_with("… and 1 more"), "{shown}");
        assert_eq!(listed(&["a", "b"]), "a b");
    }

    #[test]
    fn printable_text_is_one_bounded_line() {
        assert_eq!(printable("a\u{1b}[2J\r\nb\u{85}c"), "a?[2J??b?c");
        let long = "é".repeat(MAX_WORDS + 1);
        let shown = printable(&long);
        assert_eq!(shown.chars().count(), MAX_WORDS + 1);
        assert!(shown.ends_with('…'));
        assert_eq!(printable(&"é".repeat(MAX_WORDS)), "é".repeat(MAX_WORDS));
    }

    fn key_with(id: &str, secret: &str) -> KeyConfig {
        let text = format!(
            "[keys.k]\ntoken_url = \"https://issuer.example/t\"\nclient_id = {id:?}\nclient_secret = {secret:?}\n"
        );
        let mut config = crate::config::parse(&text, std::path::Path::new("t")).unwrap();
        config.keys.remove("k").unwrap()
    }

    /// The form of `key`'s request for scope `a`, which must carry no
    /// `Authorization` header.
    fn form_without_basic_auth(key: &KeyConfig, assertion: Option<&Jws>) -> Vec<(String, String)> {
        let scopes = ScopeSet::new(["a"]).unwrap();
        let asked = Asked {
            scopes: &scopes,
            resource: None,
        };
        let request = build_request(
            &reqwest::Client::new(),
            key,
            &endpoint_of(key),
            asked,
            assertion,
        )
        .build()
        .unwrap();
        assert!(request.headers().get(AUTHORIZATION).is_none());
        let body = request.body().unwrap().as_bytes().unwrap();
        form_urlencoded::parse(body).into_owned().collect()
    }

    #[test]
    fn tls_client_auth_sends_the_client_id_and_no_secret() {
        let text = "[keys.k]\ntoken_url = \"https://issuer.example/t\"\nclient_id = \"id\"\n\
                    auth = \"tls_client_auth\"\nclient_cert_file = \"/c\"\nclient_key_file = \"/k\"\n";
        let key = crate::config::parse(text, std::path::Path::new("t"))
            .unwrap()
            .keys
            .remove("k")
            .unwrap();
        let pairs = form_without_basic_auth(&key, None);
        let expected = [
            ("grant_type", "client_credentials"),
            ("scope", "a"),
            ("client_id", "id"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        assert_eq!(pairs, expected);
        // No secret: the client id is issuer text like any other.
        let body = br#"{"error":"invalid_client","error_description":"unknown id"}"#;
        let shown = parse_answer(401, JSON, body, &Scrubber::for_key(&key))
            .unwrap_err()
            .to_string();
        assert!(shown.contains("unknown id"), "{shown}");
    }

    #[test]
    fn every_wire_form_of_the_secret_is_scrubbed() {
        let key = key_with("id:1", "s3cr+t v/al=ue");
        let scrubber = Scrubber::for_key(&key);
        let basic = base64::engine::general_purpose::STANDARD.encode("id%3A1:s3cr%2Bt+v%2Fal%3Due");
        let raw_basic = base64::engine::general_purpose::STANDARD.encode("id:1:s3cr+t v/al=ue");
        for echoed in [
            "s3cr+t v/al=ue",
            "s3cr%2Bt+v%2Fal%3Due",
            "s3cr%2Bt%20v%2Fal%3Due",
            basic.as_str(),
            raw_basic.as_str(),
        ] {
            let body = serde_json::json!({"error": "invalid_client", "error_description": format!("got {echoed} here")});
            let failure =
                parse_answer(401, JSON, body.to_string().as_bytes(), &scrubber).unwrap_err();
            let shown = failure.to_string();
            assert!(!shown.contains(echoed), "{shown}");
            assert!(shown.contains("got [redacted] here"), "{shown}");
        }
    }

    #[test]
    fn scrubbing_comes_before_the_cut() {
        let secret = "straddling-secret-0123456789";
        let key = key_with("id", secret);
        // The secret starts 10 characters before the cut at MAX_WORDS.
        let description = format!(
            "{}{secret}",
            "x".repeat(MAX_WORDS - 10 - "invalid_request: ".len())
        );
        let body =
            serde_json::json!({"error": "invalid_request", "error_description": description});
        let failure = parse_answer(
            400,
            JSON,
            body.to_string().as_bytes(),
            &Scrubber::for_key(&key),
        )
        .unwrap_err();
        let FailureKind::Refused { words, .. } = failure else {
            panic!("expected Refused")
        };
        assert!(!words.contains(&secret[..10]), "{words}");
        let html = parse_answer(
            502,
            &format!("text/html; {secret}"),
            b"<html>",
            &Scrubber::for_key(&key),
        )
        .unwrap_err();
        assert!(!html.to_string().contains(secret), "{html}");
    }

    #[test]
    fn an_array_is_not_an_answer() {
        assert!(matches!(
            parse_answer(200, JSON, br#"["tok", "Bearer", 3600]"#, &Scrubber::none()),
            Err(FailureKind::Malformed { .. })
        ));
        assert!(matches!(
            parse_answer(
                200,
                JSON,
                br#"{"access_token": {"a": [1]}}"#,
                &Scrubber::none()
            ),
            Err(FailureKind::Malformed { .. })
        ));
    }

    /// A `private_key_jwt` key with a fresh Ed25519 key.
    fn jwt_key() -> KeyConfig {
        let text = "[keys.k]\ntoken_url = \"https://issuer.example/t\"\nclient_id = \"id\"\n\
                    auth = \"private_key_jwt\"\nprivate_key_file = \"/k\"\n";
        let mut key = crate::config::parse(text, std::path::Path::new("t"))
            .unwrap()
            .keys
            .remove("k")
            .unwrap();
        let (pem, _) = assertion::openssl_key(&["-algorithm", "ed25519"]);
        let signing = assertion::SigningKey::from_pem(pem, None).unwrap();
        key.assertion.as_mut().unwrap().key = Some(signing);
        key
    }

    #[test]
    fn private_key_jwt_sends_the_assertion_and_no_secret() {
        let key = jwt_key();
        let jws = key
            .assertion
            .as_ref()
            .unwrap()
            .sign(&key.client_id, &endpoint_of(&key))
            .unwrap();
        let pairs = form_without_basic_auth(&key, Some(&jws));
        let expected = [
            ("grant_type", "client_credentials"),
            ("scope", "a"),
            ("client_id", "id"),
            ("client_assertion_type", assertion::ASSERTION_TYPE),
            ("client_assertion", jws.expose()),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()));
        assert_eq!(pairs, expected);
    }

    #[test]
    fn the_assertion_and_its_parts_are_scrubbed() {
        let key = jwt_key();
        let jws = key
            .assertion
            .as_ref()
            .unwrap()
            .sign(&key.client_id, &endpoint_of(&key))
            .unwrap();
        let mut scrubber = Scrubber::for_key(&key);
        scrubber.add_assertion(&jws);
        let parts: Vec<&str> = jws.expose().split('.').collect();
        for echoed in [jws.expose(), parts[1], parts[2]] {
            let body = serde_json::json!({"error": "invalid_client", "error_description": format!("got {echoed}")});
            let shown = parse_answer(401, JSON, body.to_string().as_bytes(), &scrubber)
                .unwrap_err()
                .to_string();
            assert!(!shown.contains(echoed), "{shown}");
            assert!(shown.contains("got [redacted]"), "{shown}");
        }
        // Cut short by an issuer that bounds its words: the header alone
        // is no secret, a part of the payload past it is.
        let header_end = jws.expose().find('.').unwrap() + 1;
        for (kept, redacted) in [(header_end, false), (header_end + 20, true)] {
            let cut = &jws.expose()[..kept];
            let body = serde_json::json!({"error": "invalid_client", "error_description": format!("got {cut}")});
            let shown = parse_answer(401, JSON, body.to_string().as_bytes(), &scrubber)
                .unwrap_err()
                .to_string();
            assert_eq!(shown.contains(cut), !redacted, "{shown}");
        }
        // Without a secret, the client id is issuer text like any other.
        let body = br#"{"error":"invalid_client","error_description":"unknown id"}"#;
        let shown = parse_answer(401, JSON, body, &scrubber)
            .unwrap_err()
            .to_string();
        assert!(shown.contains("unknown id"), "{shown}");
    }

    #[test]
    fn texts_from_the_http_stack_and_discovery_are_scrubbed_too() {
        let key = key_with("id", "s3cr+t v/al=ue");
        let scrubber = Scrubber::for_key(&key);
        for kind in [
            FailureKind::Transport("proxy said s3cr%2bt%20v%2fal%3due".into()),
            FailureKind::Tls("s3cr+t v/al=ue".into()),
            FailureKind::Discovery("token_endpoint \"https://x/?s=s3cr%2Bt+v%2Fal%3Due\"".into()),
        ] {
            let shown = scrubber.failure(kind).to_string();
            assert!(shown.contains("[redacted]"), "{shown}");
            assert!(!shown.contains("s3cr"), "{shown}");
        }
    }

    #[test]
    fn retry_after_forms() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, "5".parse().unwrap());
        assert_eq!(retry_after(429, &headers), Some(Duration::from_secs(5)));
        assert_eq!(retry_after(500, &headers), None);
        // The three HTTP-date forms of RFC 9110 5.6.7, all in the past.
        for past in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ] {
            headers.insert(RETRY_AFTER, past.parse().unwrap());
            assert_eq!(retry_after(503, &headers), Some(Duration::ZERO), "{past}");
        }
        let later =
            httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(120));
        headers.insert(RETRY_AFTER, later.parse().unwrap());
        let wait = retry_after(429, &headers).unwrap();
        assert!(
            wait > Duration::from_secs(100) && wait <= Duration::from_secs(120),
            "{wait:?}"
        );
        headers.insert(RETRY_AFTER, "soon".parse().unwrap());
        assert_eq!(retry_after(429, &headers), None);
    }
}
