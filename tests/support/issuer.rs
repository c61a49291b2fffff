//! A loopback OAuth 2.0 authorization server for tests and the demo.
//!
//! [`Issuer`] owns an in-process axum server on `127.0.0.1:0` that speaks the
//! `client_credentials` grant in the two seed dialects:
//!
//! - [`Dialect::Checkout`] at `/connect/token`: RFC 6749 error bodies, scopes
//!   checked against the client's allowed set, JWT-shaped access tokens.
//! - [`Dialect::Checkissuing`] at `/oauth/token`: scope ignored, 40-hex access
//!   tokens, and `{"status":0,"errors":["Access Denied"]}` for bad credentials.
//!
//! Each endpoint only knows the clients registered with its dialect. Every
//! request, failed or not, is recorded before it is answered, so tests can
//! await the log ([`Issuer::wait_for_requests`]) instead of sleeping.
//! [`Fault`]s make the server misbehave in the ways real issuers do.
//!
//! [`Issuer::serve`] runs it on another listener, such as the TLS one of
//! `support::tls`; this file itself knows nothing of TLS (the unit tests
//! and the demo include it alone). It does not own: other grant types, token introspection, or any
//! resource server. Secrets here are test fixtures, so types derive `Debug`.
// Test crates include this file as a private module (`mod support;`, or
// `#[path]` from the example), so `pub` items are unreachable by design and
// each crate uses only some of them.
#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeSet, HashSet};
use std::fmt::Write as _;
use std::hash::{BuildHasher, RandomState};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::Response;
use axum::Router;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use serde_json::{json, Map, Value};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

const CHECKOUT_PATH: &str = "/connect/token";
const CHECKISSUING_PATH: &str = "/oauth/token";
const FORM_CONTENT_TYPE: &str = "application/x-www-form-urlencoded";
const JSON_CONTENT_TYPE: &str = "application/json";

/// Which real issuer's wire format an endpoint and its clients follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dialect {
    Checkissuing,
    Checkout,
}

impl Dialect {
    fn path(self) -> &'static str {
        match self {
            Dialect::Checkout => CHECKOUT_PATH,
            Dialect::Checkissuing => CHECKISSUING_PATH,
        }
    }

    fn for_path(path: &str) -> Option<Dialect> {
        match path {
            CHECKOUT_PATH => Some(Dialect::Checkout),
            CHECKISSUING_PATH => Some(Dialect::Checkissuing),
            _ => None,
        }
    }
}

/// A registered client.
#[derive(Clone, Debug)]
pub struct ClientSpec {
    pub id: String,
    pub secret: String,
    pub dialect: Dialect,
    /// Checkout: requested scopes must be a subset, else 400 `invalid_scope`.
    pub allowed_scopes: Vec<String>,
    /// Checkout: granted when the request names no scope.
    pub default_scopes: Vec<String>,
    pub lifetime_secs: u64,
}

impl ClientSpec {
    /// A Checkout client whose default scopes are all of `allowed`.
    pub fn checkout(id: impl Into<String>, secret: impl Into<String>, allowed: &[&str]) -> Self {
        let allowed: Vec<String> = allowed.iter().map(|s| (*s).to_owned()).collect();
        ClientSpec {
            id: id.into(),
            secret: secret.into(),
            dialect: Dialect::Checkout,
            default_scopes: allowed.clone(),
            allowed_scopes: allowed,
            lifetime_secs: 3600,
        }
    }

    pub fn checkissuing(id: impl Into<String>, secret: impl Into<String>) -> Self {
        ClientSpec {
            id: id.into(),
            secret: secret.into(),
            dialect: Dialect::Checkissuing,
            allowed_scopes: Vec::new(),
            default_scopes: Vec::new(),
            lifetime_secs: 3600,
        }
    }
}

/// Misbehaviour applied to every request while set (see [`Issuer::set_fault`]).
///
/// `Status`, `Bare`, `RetryAfter` and `DeniedWith200` answer before any
/// validation; `Delay` answers normally after the wait; the others alter
/// success bodies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer exactly this, whatever was asked.
    Status {
        status: u16,
        content_type: String,
        body: String,
    },
    /// Answer this status alone: no body and no `Content-Type`, as some
    /// issuers answer a wrong secret with a bare 403.
    Bare(u16),
    /// Record the request at once, wait, then answer normally.
    Delay(Duration),
    /// `"expires_in":"3600"`.
    ExpiresInAsString,
    NoExpiresIn,
    /// `"token_type":"bearer"`.
    LowercaseTokenType,
    /// `status` with a `Retry-After: secs` header and a JSON error body.
    RetryAfter {
        status: u16,
        secs: u64,
    },
    /// `{"status":0,"errors":["Access Denied"]}` with HTTP 200, in both dialects.
    DeniedWith200,
    /// A successful 200 JSON body padded to this many bytes (a `padding` member).
    HugeBody(usize),
    /// A successful answer with these members added or replaced: a wider
    /// `scope` than was asked, an `access_token` or `token_type` holding
    /// control characters, and whatever else an issuer may send.
    Members(Vec<(String, Value)>),
    /// `fault` for requests whose `scope` names `scope`; others are
    /// answered normally. Issuers limit clients, not scope sets: this is
    /// how a test makes one set of a key fail while the others work.
    ForScope {
        scope: String,
        fault: Box<Fault>,
    },
    /// A 401 `invalid_client` whose description ends with the client
    /// secret the request carried, written back as `echo` writes it, and
    /// cut to its first `keep` bytes when given, as an issuer that bounds
    /// its descriptions cuts it.
    EchoSecret {
        echo: Echo,
        keep: Option<usize>,
    },
}

/// How an issuer or a proxy re-encodes a secret it quotes: the encoders
/// that servers use, none of them the one tokend sends with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Echo {
    /// JavaScript's `encodeURIComponent`: `A-Za-z0-9-_.!~*'()` left as
    /// they are, `%XX` for every other byte, `%20` for a space.
    EncodeUriComponent,
    /// Python's `urllib.parse.quote_plus`: `A-Za-z0-9_.-~` left, `+` for
    /// a space.
    QuotePlus,
    /// Form encoding with lowercase hex (`%2b`), `+` for a space.
    LowercasePlus,
    /// Form encoding with lowercase hex, `%20` for a space.
    LowercasePercent20,
}

impl Echo {
    pub const ALL: [Echo; 4] = [
        Echo::EncodeUriComponent,
        Echo::QuotePlus,
        Echo::LowercasePlus,
        Echo::LowercasePercent20,
    ];

    /// `text` as this encoder writes it; always ASCII.
    pub fn encode(self, text: &str) -> String {
        let (kept, space, lowercase) = match self {
            Echo::EncodeUriComponent => ("-_.!~*'()", "%20", false),
            Echo::QuotePlus => ("-_.~", "+", false),
            Echo::LowercasePlus => ("-_.*", "+", true),
            Echo::LowercasePercent20 => ("-_.*", "%20", true),
        };
        let mut out = String::new();
        for byte in text.bytes() {
            match byte {
                b' ' => out.push_str(space),
                b if b.is_ascii_alphanumeric() || kept.as_bytes().contains(&b) => {
                    out.push(char::from(b));
                }
                b if lowercase => write!(out, "%{b:02x}").expect("write to a String"),
                b => write!(out, "%{b:02X}").expect("write to a String"),
            }
        }
        out
    }
}

/// Whether `text`, as written or form-decoded, holds 8 bytes in a row of
/// `secret`, as written or form-decoded: what tokend must never repeat.
pub fn holds_part_of(text: &str, secret: &str) -> bool {
    const RUN: usize = 8;
    let texts = [text.to_owned(), form_decode(text)];
    let secrets = [secret.to_owned(), form_decode(secret)];
    texts.iter().any(|text| {
        secrets.iter().any(|secret| {
            secret
                .as_bytes()
                .windows(RUN)
                .any(|run| text.as_bytes().windows(RUN).any(|w| w == run))
        })
    })
}

impl Fault {
    /// The fault that applies to `request`, if any.
    fn for_request(self, request: &Incoming) -> Option<Fault> {
        match self {
            Fault::ForScope { scope, fault } => request
                .param("scope")
                .is_some_and(|asked| asked.split(' ').any(|s| s == scope))
                .then_some(*fault),
            fault => Some(fault),
        }
    }
}

/// One request as the server saw it, with what it answered.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
    pub content_type: Option<String>,
    /// Decoded form body pairs, in order.
    pub form: Vec<(String, String)>,
    /// `Authorization: Basic`, base64-decoded and then form-urlencoding-decoded
    /// per RFC 6749 section 2.3.1.
    pub basic: Option<(String, String)>,
    pub outcome_status: u16,
    pub access_token: Option<String>,
    /// When the request arrived (before any [`Fault::Delay`]).
    pub at: Instant,
}

impl RecordedRequest {
    /// First value of a form parameter.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// The client id the request authenticated with, by either method.
    pub fn client_id(&self) -> Option<&str> {
        match &self.basic {
            Some((id, _)) => Some(id),
            None => self.param("client_id"),
        }
    }

    /// A one-line summary without secrets, for failure messages.
    fn summary(&self) -> String {
        format!(
            "{} {} -> {} client={} scope={:?}",
            self.method,
            self.path,
            self.outcome_status,
            self.client_id().unwrap_or("-"),
            self.param("scope"),
        )
    }
}

/// The running loopback server. Dropping it stops the server.
pub struct Issuer {
    addr: SocketAddr,
    /// `http`, or `https` when served over TLS.
    scheme: &'static str,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<()>>,
}

impl Issuer {
    /// Binds `127.0.0.1:0` and serves until dropped.
    ///
    /// Panics if two clients share a dialect and id.
    pub async fn start(clients: Vec<ClientSpec>) -> Issuer {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("loopback issuer must bind 127.0.0.1:0");
        Issuer::serve(clients, listener, "http").await
    }

    /// Serves on `listener` (already bound), whose URLs start with
    /// `scheme`, until dropped.
    pub async fn serve<L>(clients: Vec<ClientSpec>, listener: L, scheme: &'static str) -> Issuer
    where
        L: axum::serve::Listener<Addr = SocketAddr>,
    {
        check_unique_clients(&clients);
        let addr = listener
            .local_addr()
            .expect("a bound listener has a local address");
        let shared = Arc::new(Shared::new(clients, addr));
        let app = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&shared));
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            // A dropped sender also means stop.
            let shutdown = async move {
                let _ = stopped.await;
            };
            let serve = axum::serve(listener, app).with_graceful_shutdown(shutdown);
            if let Err(err) = serve.await {
                eprintln!("loopback issuer on {addr} failed: {err}");
            }
        });
        Issuer {
            addr,
            scheme,
            shared,
            stop: Some(stop),
            server: Some(server),
        }
    }

    /// `http://127.0.0.1:PORT/connect/token` or `.../oauth/token`
    /// (`https://…` when served over TLS).
    pub fn token_url(&self, dialect: Dialect) -> String {
        format!("{}://{}{}", self.scheme, self.addr, dialect.path())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Applies `fault` to every following request until cleared with `None`.
    pub fn set_fault(&self, fault: Option<Fault>) {
        let inner = match &fault {
            Some(Fault::ForScope { fault, .. }) => Some(&**fault),
            other => other.as_ref(),
        };
        if let Some(
            Fault::Status { status, .. } | Fault::RetryAfter { status, .. } | Fault::Bare(status),
        ) = inner
        {
            assert!(
                StatusCode::from_u16(*status).is_ok(),
                "fault status {status} is not a valid HTTP status code"
            );
        }
        *lock(&self.shared.fault) = fault;
    }

    /// A snapshot of every request recorded so far, oldest first.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.shared.log).clone()
    }

    /// Waits until at least `n` requests were recorded and returns them all.
    ///
    /// Panics after `timeout`, listing the requests seen.
    pub async fn wait_for_requests(&self, n: usize, timeout: Duration) -> Vec<RecordedRequest> {
        let mut recorded = self.shared.recorded.subscribe();
        // Map the borrow guard away at once: it holds the watch's read lock.
        let reached = tokio::time::timeout(timeout, recorded.wait_for(|count| *count >= n))
            .await
            .map(|changed| changed.is_ok());
        let seen = self.requests();
        if reached != Ok(true) {
            panic!("{}", timeout_report(n, timeout, &seen));
        }
        seen
    }

    /// Every access token handed out, oldest first.
    pub fn issued_tokens(&self) -> Vec<String> {
        lock(&self.shared.log)
            .iter()
            .filter_map(|request| request.access_token.clone())
            .collect()
    }

    /// Stops accepting, closes idle connections, and waits for in-flight
    /// answers (including [`Fault::Delay`]s) to finish.
    pub async fn shutdown(mut self) {
        self.signal_stop();
        if let Some(server) = self.server.take() {
            server.await.expect("loopback issuer task must not panic");
        }
    }

    fn signal_stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            // The server may already be gone; nothing left to stop then.
            let _ = stop.send(());
        }
    }
}

impl Drop for Issuer {
    fn drop(&mut self) {
        self.signal_stop();
    }
}

fn check_unique_clients(clients: &[ClientSpec]) {
    let mut seen = HashSet::new();
    for client in clients {
        assert!(
            seen.insert((client.dialect, client.id.as_str())),
            "loopback issuer: client {:?} registered twice for {:?}",
            client.id,
            client.dialect
        );
    }
}

fn timeout_report(n: usize, timeout: Duration, seen: &[RecordedRequest]) -> String {
    let mut report = format!(
        "loopback issuer: expected at least {n} request(s) within {timeout:?}, saw {}",
        seen.len()
    );
    for (i, request) in seen.iter().enumerate() {
        let _ = write!(report, "\n  {}. {}", i + 1, request.summary());
    }
    report
}

/// A std mutex is enough: every critical section is a push or a clone, never
/// held across an `.await`. A panicking test thread must not hide the log.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// State shared by the handler and the [`Issuer`] handle.
struct Shared {
    clients: Vec<ClientSpec>,
    /// The JWT `iss` claim.
    origin: String,
    fault: Mutex<Option<Fault>>,
    log: Mutex<Vec<RecordedRequest>>,
    /// How many requests were recorded; waiters subscribe to it.
    recorded: watch::Sender<usize>,
    mint: TokenMint,
}

impl Shared {
    fn new(clients: Vec<ClientSpec>, addr: SocketAddr) -> Shared {
        Shared {
            clients,
            origin: format!("http://{addr}"),
            fault: Mutex::new(None),
            log: Mutex::new(Vec::new()),
            recorded: watch::Sender::new(0),
            mint: TokenMint::new(),
        }
    }

    fn record(&self, request: RecordedRequest) {
        lock(&self.log).push(request);
        // Incrementing (not storing the length) keeps the count monotonic
        // when two handlers record at once.
        self.recorded.send_modify(|count| *count += 1);
    }

    fn answer(&self, request: &Incoming, fault: Option<&Fault>) -> Outcome {
        if let Some(outcome) = fault.and_then(Outcome::for_fault) {
            return outcome;
        }
        if let Some(Fault::EchoSecret { echo, keep }) = fault {
            return Outcome::echoing(request, *echo, *keep);
        }
        let Some(dialect) = Dialect::for_path(&request.path) else {
            return Outcome::json(StatusCode::NOT_FOUND, json!({ "error": "not_found" }));
        };
        match self.grant(request, dialect) {
            Ok(grant) => self.issue(&grant, fault),
            Err(refusal) => refusal,
        }
    }

    /// Validates the request in RFC 6749 order; `Err` is the refusal to send.
    fn grant(&self, request: &Incoming, dialect: Dialect) -> Result<Grant<'_>, Outcome> {
        if request.method != Method::POST {
            return Err(
                Outcome::invalid_request("the token endpoint accepts POST only")
                    .with_status(StatusCode::METHOD_NOT_ALLOWED)
                    .with_header(header::ALLOW, "POST".to_owned()),
            );
        }
        if !is_form_content_type(request.content_type.as_deref()) {
            return Err(Outcome::invalid_request(
                "Content-Type must be application/x-www-form-urlencoded",
            ));
        }
        if let Some(name) = repeated_param(&request.form) {
            return Err(Outcome::invalid_request(&format!(
                "parameter {name} is repeated"
            )));
        }
        if request.param("grant_type") != Some("client_credentials") {
            return Err(Outcome::json(
                StatusCode::BAD_REQUEST,
                json!({ "error": "unsupported_grant_type" }),
            ));
        }
        let (id, secret) = request.credentials(dialect)?;
        let client = self
            .authenticate(dialect, id, secret)
            .ok_or_else(|| Outcome::denied(dialect))?;
        let scopes = match dialect {
            Dialect::Checkout => granted_scopes(client, request.param("scope"))?,
            Dialect::Checkissuing => Vec::new(),
        };
        Ok(Grant { client, scopes })
    }

    fn authenticate(&self, dialect: Dialect, id: &str, secret: &str) -> Option<&ClientSpec> {
        self.clients
            .iter()
            .find(|client| client.dialect == dialect && client.id == id && client.secret == secret)
    }

    fn issue(&self, grant: &Grant<'_>, fault: Option<&Fault>) -> Outcome {
        let client = grant.client;
        let scope = grant.scopes.join(" ");
        let token = match client.dialect {
            Dialect::Checkout => self.mint.jwt(&self.origin, client, &scope),
            Dialect::Checkissuing => self.mint.hex(20),
        };
        let mut body = Map::new();
        body.insert("access_token".into(), json!(token));
        let token_type = match fault {
            Some(Fault::LowercaseTokenType) => "bearer",
            _ => "Bearer",
        };
        body.insert("token_type".into(), json!(token_type));
        match fault {
            Some(Fault::NoExpiresIn) => {}
            Some(Fault::ExpiresInAsString) => {
                body.insert("expires_in".into(), json!(client.lifetime_secs.to_string()));
            }
            _ => {
                body.insert("expires_in".into(), json!(client.lifetime_secs));
            }
        }
        if client.dialect == Dialect::Checkout {
            body.insert("scope".into(), json!(scope));
        }
        if let Some(Fault::Members(members)) = fault {
            body.extend(members.iter().cloned());
        }
        // What was sent, which a `Members` fault may have replaced.
        let sent = body.get("access_token").and_then(Value::as_str);
        let token = sent.map(str::to_owned);
        let text = match fault {
            Some(Fault::HugeBody(size)) => padded_json(body, *size),
            _ => Value::Object(body).to_string(),
        };
        let mut outcome = Outcome::json_text(StatusCode::OK, text);
        outcome.access_token = token;
        outcome
    }
}

/// An authenticated request's grant.
struct Grant<'a> {
    client: &'a ClientSpec,
    /// Sorted and de-duplicated; empty for Checkissuing.
    scopes: Vec<String>,
}

/// Checkout scope rules: none asked means the defaults, otherwise every
/// requested scope must be allowed.
fn granted_scopes(client: &ClientSpec, requested: Option<&str>) -> Result<Vec<String>, Outcome> {
    // RFC 6749 section 3.3: scope tokens are separated by single spaces.
    let requested: BTreeSet<&str> = requested
        .unwrap_or("")
        .split(' ')
        .filter(|scope| !scope.is_empty())
        .collect();
    if requested.is_empty() {
        let defaults: BTreeSet<&String> = client.default_scopes.iter().collect();
        return Ok(defaults.into_iter().cloned().collect());
    }
    let refused: Vec<&str> = requested
        .iter()
        .copied()
        .filter(|scope| !client.allowed_scopes.iter().any(|allowed| allowed == scope))
        .collect();
    if !refused.is_empty() {
        return Err(Outcome::json(
            StatusCode::BAD_REQUEST,
            json!({
                "error": "invalid_scope",
                "error_description": format!("scope not allowed for this client: {}", refused.join(" ")),
            }),
        ));
    }
    Ok(requested.into_iter().map(str::to_owned).collect())
}

/// Adds a `padding` member so the serialized body is `size` bytes (or the
/// unpadded size if that is already larger).
fn padded_json(mut body: Map<String, Value>, size: usize) -> String {
    body.insert("padding".into(), json!(""));
    let bare = Value::Object(body.clone()).to_string().len();
    body.insert(
        "padding".into(),
        json!("x".repeat(size.saturating_sub(bare))),
    );
    Value::Object(body).to_string()
}

fn is_form_content_type(content_type: Option<&str>) -> bool {
    content_type
        .and_then(|value| value.split(';').next())
        .is_some_and(|essence| essence.trim().eq_ignore_ascii_case(FORM_CONTENT_TYPE))
}

/// RFC 6749 section 3.2: request parameters must not be repeated.
fn repeated_param(form: &[(String, String)]) -> Option<&str> {
    let mut seen = HashSet::new();
    form.iter()
        .map(|(name, _)| name.as_str())
        .find(|name| !seen.insert(*name))
}

/// The request as parsed from the wire, before any decision.
struct Incoming {
    method: Method,
    path: String,
    authorization: Option<String>,
    content_type: Option<String>,
    form: Vec<(String, String)>,
    basic: BasicAuth,
}

enum BasicAuth {
    Absent,
    Malformed,
    Credentials(String, String),
}

impl Incoming {
    fn parse(method: Method, uri: &Uri, headers: &HeaderMap, body: &[u8]) -> Incoming {
        let text = |name: header::HeaderName| {
            headers
                .get(name)
                .map(|value| String::from_utf8_lossy(value.as_bytes()).into_owned())
        };
        let authorization = text(header::AUTHORIZATION);
        Incoming {
            method,
            path: uri.path().to_owned(),
            basic: parse_basic(authorization.as_deref()),
            authorization,
            content_type: text(header::CONTENT_TYPE),
            form: form_urlencoded::parse(body).into_owned().collect(),
        }
    }

    fn param(&self, name: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }

    /// The one client authentication method used: HTTP Basic or
    /// `client_secret_post`. Using both is a malformed request.
    fn credentials(&self, dialect: Dialect) -> Result<(&str, &str), Outcome> {
        let post = self
            .param("client_secret")
            .map(|secret| (self.param("client_id").unwrap_or(""), secret));
        match (&self.basic, post) {
            (BasicAuth::Absent, Some(pair)) => Ok(pair),
            (BasicAuth::Credentials(id, secret), None) => Ok((id, secret)),
            (BasicAuth::Absent | BasicAuth::Malformed, None) => Err(Outcome::denied(dialect)),
            (_, Some(_)) => Err(Outcome::invalid_request(
                "use one client authentication method, not both Basic and client_secret",
            )),
        }
    }

    fn into_recorded(self, outcome: &Outcome, at: Instant) -> RecordedRequest {
        RecordedRequest {
            method: self.method.to_string(),
            path: self.path,
            authorization: self.authorization,
            content_type: self.content_type,
            form: self.form,
            basic: match self.basic {
                BasicAuth::Credentials(id, secret) => Some((id, secret)),
                BasicAuth::Absent | BasicAuth::Malformed => None,
            },
            outcome_status: outcome.status.as_u16(),
            access_token: outcome.access_token.clone(),
            at,
        }
    }
}

/// Reads `Authorization: Basic base64(urlenc(id):urlenc(secret))`. Other
/// schemes are not client authentication, so they count as absent.
fn parse_basic(authorization: Option<&str>) -> BasicAuth {
    let Some((scheme, encoded)) = authorization.and_then(|value| value.trim().split_once(' '))
    else {
        return BasicAuth::Absent;
    };
    if !scheme.eq_ignore_ascii_case("basic") {
        return BasicAuth::Absent;
    }
    let decoded = STANDARD
        .decode(encoded.trim())
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok());
    // The id is form-encoded, so a raw ':' can only be the separator.
    match decoded.as_deref().and_then(|text| text.split_once(':')) {
        Some((id, secret)) => BasicAuth::Credentials(form_decode(id), form_decode(secret)),
        None => BasicAuth::Malformed,
    }
}

/// `application/x-www-form-urlencoded` decoding of one value: `+` is a space,
/// `%XX` a byte; a `%` without two hex digits stays literal.
pub fn form_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match bytes[i] {
            b'%' => bytes
                .get(i + 1..i + 3)
                .and_then(|hex| Some(hex_value(hex[0])? << 4 | hex_value(hex[1])?)),
            _ => None,
        };
        match (escaped, bytes[i]) {
            (Some(byte), _) => {
                out.push(byte);
                i += 3;
            }
            (None, b'+') => {
                out.push(b' ');
                i += 1;
            }
            (None, byte) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn hex_value(digit: u8) -> Option<u8> {
    char::from(digit)
        .to_digit(16)
        .and_then(|value| u8::try_from(value).ok())
}

/// What the server answers, decided before it is recorded and sent.
struct Outcome {
    status: StatusCode,
    /// `None` sends no `Content-Type` header.
    content_type: Option<String>,
    headers: Vec<(header::HeaderName, String)>,
    body: String,
    access_token: Option<String>,
}

impl Outcome {
    fn json(status: StatusCode, body: Value) -> Outcome {
        Outcome::json_text(status, body.to_string())
    }

    /// RFC 6749 section 5.1: token responses must not be cached.
    fn json_text(status: StatusCode, body: String) -> Outcome {
        Outcome {
            status,
            content_type: Some(JSON_CONTENT_TYPE.to_owned()),
            headers: vec![
                (header::CACHE_CONTROL, "no-store".to_owned()),
                (header::PRAGMA, "no-cache".to_owned()),
            ],
            body,
            access_token: None,
        }
    }

    fn invalid_request(description: &str) -> Outcome {
        Outcome::json(
            StatusCode::BAD_REQUEST,
            json!({ "error": "invalid_request", "error_description": description }),
        )
    }

    /// Unknown client or wrong secret, in the dialect's words.
    fn denied(dialect: Dialect) -> Outcome {
        match dialect {
            Dialect::Checkout => Outcome::json(
                StatusCode::UNAUTHORIZED,
                json!({ "error": "invalid_client" }),
            )
            .with_header(
                header::WWW_AUTHENTICATE,
                r#"Basic realm="loopback-issuer""#.to_owned(),
            ),
            Dialect::Checkissuing => Outcome::json(
                StatusCode::UNAUTHORIZED,
                json!({ "status": 0, "errors": ["Access Denied"] }),
            ),
        }
    }

    /// [`Fault::EchoSecret`]'s answer to `request`.
    fn echoing(request: &Incoming, echo: Echo, keep: Option<usize>) -> Outcome {
        let secret = request
            .credentials(Dialect::Checkout)
            .map_or("", |(_, secret)| secret);
        let mut written = echo.encode(secret);
        if let Some(keep) = keep {
            written.truncate(keep);
        }
        Outcome::json(
            StatusCode::UNAUTHORIZED,
            json!({
                "error": "invalid_client",
                "error_description": format!("wrong client_secret {written}"),
            }),
        )
    }

    /// The faults that answer before any validation.
    fn for_fault(fault: &Fault) -> Option<Outcome> {
        match fault {
            Fault::Status {
                status,
                content_type,
                body,
            } => Some(Outcome {
                status: status_code(*status),
                content_type: Some(content_type.clone()),
                headers: Vec::new(),
                body: body.clone(),
                access_token: None,
            }),
            Fault::Bare(status) => Some(Outcome {
                status: status_code(*status),
                content_type: None,
                headers: Vec::new(),
                body: String::new(),
                access_token: None,
            }),
            Fault::RetryAfter { status, secs } => Some(
                Outcome::json(
                    status_code(*status),
                    json!({
                        "error": "temporarily_unavailable",
                        "error_description": format!("retry after {secs} seconds"),
                    }),
                )
                .with_header(header::RETRY_AFTER, secs.to_string()),
            ),
            Fault::DeniedWith200 => {
                Some(Outcome::denied(Dialect::Checkissuing).with_status(StatusCode::OK))
            }
            Fault::Delay(_)
            | Fault::ExpiresInAsString
            | Fault::NoExpiresIn
            | Fault::LowercaseTokenType
            | Fault::HugeBody(_)
            | Fault::Members(_)
            | Fault::ForScope { .. }
            | Fault::EchoSecret { .. } => None,
        }
    }

    fn with_status(mut self, status: StatusCode) -> Outcome {
        self.status = status;
        self
    }

    fn with_header(mut self, name: header::HeaderName, value: String) -> Outcome {
        self.headers.push((name, value));
        self
    }

    fn into_response(self) -> Response {
        let mut response = Response::new(Body::from(self.body));
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        let content_type = self.content_type.map(|value| (header::CONTENT_TYPE, value));
        let values = content_type.into_iter().chain(self.headers);
        for (name, value) in values {
            let value = HeaderValue::try_from(value)
                .expect("fault and issuer header values are visible ASCII");
            headers.append(name, value);
        }
        response
    }
}

/// `set_fault` has already rejected codes `http` cannot represent.
fn status_code(status: u16) -> StatusCode {
    StatusCode::from_u16(status).expect("set_fault validated the status code")
}

/// Unique, unpredictable-looking tokens without a `rand` dependency: a
/// randomly keyed SipHash (`RandomState`) over a counter and the clock.
/// Distinct inputs to a keyed PRF collide with negligible probability, and
/// JWT `jti`s embed the counter itself, so they are unique outright.
struct TokenMint {
    keys: RandomState,
    counter: AtomicU64,
}

impl TokenMint {
    fn new() -> TokenMint {
        TokenMint {
            keys: RandomState::new(),
            counter: AtomicU64::new(0),
        }
    }

    fn random_bytes(&self, len: usize) -> (u64, Vec<u8>) {
        let draw = self.counter.fetch_add(1, Ordering::Relaxed);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos());
        let bytes = (0..len.div_ceil(8))
            .flat_map(|word| self.keys.hash_one((draw, word, nanos)).to_le_bytes())
            .take(len)
            .collect();
        (draw, bytes)
    }

    /// `2 * len` lowercase hex digits.
    fn hex(&self, len: usize) -> String {
        let (_, bytes) = self.random_bytes(len);
        bytes.iter().fold(String::new(), |mut hex, byte| {
            let _ = write!(hex, "{byte:02x}");
            hex
        })
    }

    /// `base64url(header).base64url(claims).base64url(32 random bytes)`: a
    /// JWT in shape only; nobody verifies the signature.
    fn jwt(&self, origin: &str, client: &ClientSpec, scope: &str) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        let (draw, signature) = self.random_bytes(32);
        let jti = format!("{draw:08x}-{}", self.hex(8));
        let header = json!({ "alg": "HS256", "typ": "JWT" });
        let claims = json!({
            "iss": origin,
            "sub": client.id,
            "scope": scope,
            "iat": now,
            "exp": now + client.lifetime_secs,
            "jti": jti,
        });
        format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string()),
            URL_SAFE_NO_PAD.encode(signature),
        )
    }
}

/// The one handler: every path and method is recorded, then answered.
async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let at = Instant::now();
    let request = Incoming::parse(method, &uri, &headers, &body);
    let fault = lock(&shared.fault)
        .clone()
        .and_then(|fault| fault.for_request(&request));
    let outcome = shared.answer(&request, fault.as_ref());
    // Record before any await, so a client that gives up during a Delay
    // (dropping this future) is still in the log.
    shared.record(request.into_recorded(&outcome, at));
    if let Some(Fault::Delay(delay)) = fault {
        tokio::time::sleep(delay).await;
    }
    outcome.into_response()
}
