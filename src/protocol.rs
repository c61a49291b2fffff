//! Socket protocol v1: one JSON object per line in, one per line out.
//!
//! This module is pure: it turns request bytes into a [`Request`] and a
//! [`Response`] into bytes, and for `tokend get` and `tokend reload` the
//! other way round ([`Request::encode`], [`decode_reply`]). It knows nothing
//! of sockets, caches or callers, so the daemon and the CLI share one
//! definition of the wire, and tests feed it byte literals.

use std::fmt;

use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::{Map, Value};

use zeroize::Zeroizing;

use crate::scope::ScopeSet;
use crate::secret::AccessToken;

pub const PROTOCOL_VERSION: u32 = 1;

/// A parsed request line. `id` is whatever JSON the caller sent, echoed back.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Request {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<Value>,
    #[serde(flatten)]
    pub op: Op,
}

impl Request {
    /// The request as one line, without its `\n`: what a client sends.
    pub fn encode(&self) -> String {
        // A request is a JSON object of strings and arrays of strings:
        // serde_json cannot fail on it.
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Op {
    Ping,
    /// `scopes` exactly as sent: canonicalising and checking them against
    /// the key is the server's job.
    Get {
        key: String,
        scopes: Vec<String>,
        /// An RFC 8707 resource indicator, as sent: whether the key lists
        /// it is the server's question. Left out, the issuer's default.
        #[serde(skip_serializing_if = "Option::is_none")]
        resource: Option<String>,
    },
    Keys,
    Status,
    /// Re-read the configuration and say whether it took; only root and
    /// tokend's own user may ask (it is what `systemctl reload` runs).
    Reload,
    /// The metrics in the Prometheus text format; root, tokend's own user
    /// and `metrics_allow_uids` may ask.
    Metrics,
}

/// The error codes of protocol v1. Callers match on these strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    UnknownOp,
    UnknownKey,
    Forbidden,
    ScopeNotAllowed,
    Unavailable,
    TooLarge,
    Busy,
    /// A reload was refused; the running configuration stays.
    ReloadFailed,
}

/// An error answer's body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ErrorBody {
        ErrorBody {
            code,
            message: message.into(),
        }
    }
}

/// A request that could not be turned into a [`Request`]. `id` is set when
/// the line was a JSON object carrying one, so even errors can be matched to
/// what the caller sent.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeError {
    pub id: Option<Value>,
    pub error: ErrorBody,
}

/// One answer. The success bodies are flattened next to `"ok": true`.
#[derive(Debug)]
pub enum Response {
    Pong,
    Token(TokenAnswer),
    Keys(Vec<KeyInfo>),
    Status(StatusAnswer),
    Reloaded(ReloadAnswer),
    Metrics(MetricsAnswer),
    Error(ErrorBody),
}

/// The metrics, as a Prometheus text-format scrape would have them.
#[derive(Debug, Serialize, Deserialize)]
pub struct MetricsAnswer {
    pub text: String,
}

/// The reload took; this many keys are now configured.
#[derive(Debug, Serialize, Deserialize)]
pub struct ReloadAnswer {
    pub keys: usize,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct TokenAnswer {
    pub key: String,
    #[serde(serialize_with = "expose_token")]
    pub access_token: AccessToken,
    pub token_type: String,
    pub expires_in: u64,
    pub expires_at: String,
    pub scopes: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct KeyInfo {
    pub name: String,
    pub scopes: Vec<String>,
}

/// The body of a `keys` answer, as a client reads it.
#[derive(Debug, Deserialize)]
pub struct KeysAnswer {
    pub keys: Vec<KeyInfo>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct KeyStatus {
    pub name: String,
    pub sets: Vec<SetStatus>,
}

/// The body of a `status` answer.
#[derive(Debug, Serialize, Deserialize)]
pub struct StatusAnswer {
    pub keys: Vec<KeyStatus>,
    /// The HTTP metrics endpoint, when `metrics_listen` is set: whether it
    /// listens. Absent otherwise, and from daemons that predate it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_endpoint: Option<EndpointStatus>,
}

/// Whether the HTTP metrics endpoint listens. Failing to bind its address
/// (another process holds it) leaves token service running; the bind is
/// retried, and this says so.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointStatus {
    /// The address it listens on, or the configured one it cannot bind.
    pub address: String,
    pub state: EndpointState,
    /// Why the last attempt to bind failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// When the first failed attempt was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failing_since: Option<String>,
    /// Failed attempts so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// Whole seconds (rounded up) until the next attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_in: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EndpointState {
    /// Serving scrapes.
    Listening,
    /// The address could not be bound; another attempt is scheduled.
    Retrying,
}

/// The state of one cached (key, scope set). Never a token or a secret.
/// Times are RFC 3339 UTC; durations whole seconds.
#[derive(Debug, Serialize, Deserialize)]
pub struct SetStatus {
    pub scopes: Vec<String>,
    /// The RFC 8707 resource this set's token is for; absent when none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    pub state: SetState,
    pub fetching: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_in: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_refresh: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// For operators: `tokend status`'s STATE column.
    pub health: SetHealth,
    /// A `prefetch` set: `tokend status` exits 1 unless it is healthy.
    pub prefetch: bool,
    /// Until tokend next asks the issuer for this set on its own: 0 when
    /// due or under way; absent when only a get would make it ask.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_refresh_in: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_refresh_at: Option<String>,
    /// The issuer's HTTP status in `last_error`, when it answered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error_status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error_at: Option<String>,
    /// Issuer requests made for this set since it was cached.
    pub issuer_requests: u64,
    /// Gets answered with a token from this set since it was cached.
    pub gets: u64,
}

impl SetStatus {
    /// What `tokend status` vouches for: a prefetch set holds a token with
    /// more than `min_valid` left, and its last request did not fail.
    pub fn healthy(&self) -> bool {
        !self.prefetch || (self.state == SetState::Fresh && self.last_error.is_none())
    }
}

/// How a scope set is doing, in an operator's words. The first that
/// applies, in this order (but a usable token under refresh is
/// `refreshing`, one that ran out is `expired`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SetHealth {
    /// The key is paused after a client failure (a rate limit, rejected
    /// credentials): no set of it asks the issuer until the pause ends.
    Paused,
    /// The last request failed; the backoff decides when the next goes.
    Failing,
    /// A usable token, and a request for the next one is under way; or
    /// the first request for the set.
    Refreshing,
    /// A token with more than `min_valid` left.
    Fresh,
    /// The token has less than `min_valid` left: gets wait for the issuer
    /// (a refresh may be under way).
    Expired,
    /// No token yet, and no request has failed.
    NeverFetched,
}

/// What `status` says of a scope set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SetState {
    /// A usable token is cached.
    Fresh,
    /// No usable token; the issuer is being asked.
    Fetching,
    /// The last token ran out and no request is under way.
    Expired,
    /// No token was ever had; the last request failed.
    Failed,
}

/// Reads an answer line as a client: `Ok(T)` for `"ok": true` (the body
/// read straight into `T`, a token into its wiping type), `Err(body)` for
/// an error answer. `None` when the line is not a protocol v1 answer.
pub fn decode_reply<T: serde::de::DeserializeOwned>(line: &str) -> Option<Result<T, ErrorBody>> {
    #[derive(Deserialize)]
    struct Head {
        ok: bool,
        error: Option<ErrorBody>,
    }
    // Two passes over the line rather than one into a flattened envelope:
    // serde's flatten buffers every field, the token included, in copies
    // nobody wipes.
    let head: Head = serde_json::from_str(line).ok()?;
    match (head.ok, head.error) {
        (true, _) => serde_json::from_str(line).ok().map(Ok),
        (false, Some(error)) => Some(Err(error)),
        (false, None) => None,
    }
}

fn expose_token<S: Serializer>(token: &AccessToken, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(token.expose())
}

/// Parses one request line (without its `\n`; a trailing `\r` is ignored).
pub fn decode(line: &[u8]) -> Result<Request, DecodeError> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let bad = |message: String| DecodeError {
        id: None,
        error: ErrorBody::new(ErrorCode::BadRequest, message),
    };
    if line.iter().all(u8::is_ascii_whitespace) {
        return Err(bad("empty request: send one JSON object per line".into()));
    }
    let text = std::str::from_utf8(line).map_err(|e| {
        bad(format!(
            "request is not UTF-8 (bad byte at offset {})",
            e.valid_up_to()
        ))
    })?;
    // serde_json's own errors name only a position, never the input, so
    // they are safe to send back.
    let StrictValue(value) =
        serde_json::from_str(text).map_err(|e| bad(format!("request is not valid JSON: {e}")))?;
    let Value::Object(fields) = value else {
        return Err(bad("request must be a JSON object".into()));
    };
    let id = fields.get("id").cloned();
    interpret(&fields)
        .map_err(|error| DecodeError {
            id: id.clone(),
            error,
        })
        .map(|op| Request { id, op })
}

fn interpret(fields: &Map<String, Value>) -> Result<Op, ErrorBody> {
    let bad = |message: String| ErrorBody::new(ErrorCode::BadRequest, message);
    let op = match fields.get("op") {
        Some(Value::String(op)) => op.as_str(),
        Some(_) => return Err(bad("field `op` must be a string".into())),
        None => return Err(bad("missing field `op`".into())),
    };
    let allowed: &[&str] = match op {
        "ping" | "keys" | "status" | "reload" | "metrics" => &["op", "id"],
        "get" => &["op", "id", "key", "scopes", "resource"],
        _ => {
            return Err(ErrorBody::new(
                ErrorCode::UnknownOp,
                format!(
                    "unknown op {:?}: expected ping, get, keys, status, reload or metrics",
                    clip(op)
                ),
            ))
        }
    };
    if let Some(extra) = fields.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(bad(format!(
            "unknown field {:?} for op {op:?}",
            clip(extra)
        )));
    }
    Ok(match op {
        "ping" => Op::Ping,
        "keys" => Op::Keys,
        "status" => Op::Status,
        "reload" => Op::Reload,
        "metrics" => Op::Metrics,
        _ => Op::Get {
            key: match fields.get("key") {
                Some(Value::String(key)) => key.clone(),
                Some(_) => return Err(bad("field `key` must be a string".into())),
                None => return Err(bad("missing field `key`".into())),
            },
            scopes: scopes_field(fields.get("scopes"))?,
            resource: match fields.get("resource") {
                Some(Value::String(resource)) => Some(resource.clone()),
                Some(_) => return Err(bad("field `resource` must be a string".into())),
                None => None,
            },
        },
    })
}

fn scopes_field(value: Option<&Value>) -> Result<Vec<String>, ErrorBody> {
    let bad = || {
        ErrorBody::new(
            ErrorCode::BadRequest,
            "field `scopes` must be an array of strings",
        )
    };
    match value {
        None => Ok(Vec::new()),
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| item.as_str().map(str::to_owned).ok_or_else(bad))
            .collect(),
        Some(_) => Err(bad()),
    }
}

/// Caller-supplied text quoted in an error: bounded so an answer never
/// grows with the request.
pub(crate) fn clip(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((end, _)) => &s[..end],
        None => s,
    }
}

/// Unused room an answer may keep: below this, giving it back costs more
/// than it saves.
const SLACK_KEPT: usize = 1024;

/// Serialises one answer as a line, `\n` included.
pub fn encode(id: Option<&Value>, response: &Response) -> Zeroizing<Vec<u8>> {
    #[derive(Serialize)]
    struct Envelope<'a, T: Serialize> {
        ok: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a Value>,
        #[serde(flatten)]
        body: T,
    }
    #[derive(Serialize)]
    struct Pong {
        protocol: u32,
    }
    #[derive(Serialize)]
    struct Keys<'a, T> {
        keys: &'a [T],
    }
    #[derive(Serialize)]
    struct Failure<'a> {
        error: &'a ErrorBody,
    }
    /// `secret`: the line will hold a token.
    fn line<T: Serialize>(
        ok: bool,
        id: Option<&Value>,
        body: T,
        secret: bool,
    ) -> Zeroizing<Vec<u8>> {
        let envelope = Envelope { ok, id, body };
        let mut out = Zeroizing::new(Vec::new());
        // Every type here serialises to a JSON object with string keys;
        // serde_json can only fail on non-string map keys or a failing
        // Serialize impl, neither of which exists here.
        let written = if secret {
            // Measured first, so the buffer is allocated once at its final
            // size: a buffer that grows leaves copies of the token in freed
            // memory, where the wipe on drop cannot reach them.
            let mut size = ByteCount(0);
            serde_json::to_writer(&mut size, &envelope).and_then(|()| {
                out.reserve_exact(size.0 + 1);
                serde_json::to_writer(&mut *out, &envelope)
            })
        } else {
            serde_json::to_writer(&mut *out, &envelope)
        };
        if written.is_err() {
            out.clear();
            out.extend_from_slice(INTERNAL_ERROR);
        }
        out.push(b'\n');
        // Grown by doubling, a long answer (`status`, `metrics`) can hold
        // nearly twice its length, and it may wait in memory for a caller
        // that does not read: given back, in place. Never a token's line,
        // which was made at its size (a move would leave a copy behind).
        if !secret && out.capacity() - out.len() > SLACK_KEPT {
            out.shrink_to_fit();
        }
        out
    }
    match response {
        Response::Pong => line(
            true,
            id,
            Pong {
                protocol: PROTOCOL_VERSION,
            },
            false,
        ),
        Response::Token(answer) => line(true, id, answer, true),
        Response::Keys(keys) => line(true, id, Keys { keys }, false),
        Response::Status(status) => line(true, id, status, false),
        Response::Reloaded(reloaded) => line(true, id, reloaded, false),
        Response::Metrics(metrics) => line(true, id, metrics, false),
        Response::Error(error) => line(false, id, Failure { error }, false),
    }
}

/// A token answer as the daemon makes one, borrowed from the cached token:
/// a handout copies the token once, into its wiped answer line, and
/// nothing else of it.
pub(crate) struct TokenLine<'a> {
    pub(crate) key: &'a str,
    pub(crate) access_token: &'a AccessToken,
    pub(crate) token_type: &'a str,
    pub(crate) expires_in: u64,
    pub(crate) expires_at: std::time::SystemTime,
    pub(crate) scopes: &'a ScopeSet,
}

/// The line [`encode`] makes of a [`Response::Token`], `\n` included, made
/// straight from `answer`. Every get that finds a token comes here, so it
/// is written field by field rather than through serde's flattening, which
/// buffers and dispatches every field; the fields, their order and their
/// escaping are [`encode`]'s (a test holds the two to the same bytes).
pub(crate) fn encode_token(id: Option<&Value>, answer: &TokenLine<'_>) -> Zeroizing<Vec<u8>> {
    // Measured first, so the buffer is allocated once at its final size
    // (see `encode`).
    let mut size = ByteCount(0);
    let mut out = Zeroizing::new(Vec::new());
    let written = write_token(&mut size, id, answer).and_then(|()| {
        out.reserve_exact(size.0);
        write_token(&mut *out, id, answer)
    });
    if written.is_err() {
        // Writing to a counter or a Vec fails only on a failing Serialize
        // impl for `id`, which serde_json's Value does not have.
        out.clear();
        out.extend_from_slice(INTERNAL_ERROR);
        out.push(b'\n');
    }
    out
}

fn write_token<W: std::io::Write>(
    out: &mut W,
    id: Option<&Value>,
    answer: &TokenLine<'_>,
) -> std::io::Result<()> {
    out.write_all(b"{\"ok\":true")?;
    if let Some(id) = id {
        out.write_all(b",\"id\":")?;
        serde_json::to_writer(&mut *out, id)?;
    }
    out.write_all(b",\"key\":")?;
    json_string(out, answer.key)?;
    out.write_all(b",\"access_token\":")?;
    json_string(out, answer.access_token.expose())?;
    out.write_all(b",\"token_type\":")?;
    json_string(out, answer.token_type)?;
    out.write_all(b",\"expires_in\":")?;
    out.write_all(decimal(answer.expires_in, &mut [0; 20]))?;
    // RFC 3339 in UTC is digits, `-`, `:`, `T` and `Z`: nothing to escape.
    out.write_all(b",\"expires_at\":\"")?;
    match rfc3339_seconds(answer.expires_at) {
        Some(text) => out.write_all(&text)?,
        None => write!(
            out,
            "{}",
            humantime::format_rfc3339_seconds(answer.expires_at)
        )?,
    }
    out.write_all(b"\",\"scopes\":[")?;
    for (i, scope) in answer.scopes.iter().enumerate() {
        if i > 0 {
            out.write_all(b",")?;
        }
        json_string(out, scope)?;
    }
    out.write_all(b"]}\n")
}

/// `text` as a JSON string, escaped exactly as serde_json escapes it.
/// Tokens, names and scopes almost never hold a byte that needs escaping,
/// and checking for one is a loop the compiler vectorises (a fold without
/// an early exit), where serde_json's escaper goes byte by byte.
fn json_string<W: std::io::Write>(out: &mut W, text: &str) -> std::io::Result<()> {
    // serde_json escapes `"`, `\` and the C0 controls, nothing else.
    let escaped = text.as_bytes().iter().fold(false, |any, &b| {
        any | (b < 0x20) | (b == b'"') | (b == b'\\')
    });
    if !escaped {
        out.write_all(b"\"")?;
        out.write_all(text.as_bytes())?;
        out.write_all(b"\"")
    } else {
        serde_json::to_writer(out, text).map_err(std::io::Error::from)
    }
}

/// `n` in decimal, written at the end of `buf`.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut start = buf.len();
    loop {
        start -= 1;
        buf[start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[start..];
        }
    }
}

/// `2026-11-25T10:00:00Z`, what `humantime::format_rfc3339_seconds` writes,
/// without going through `fmt`; `None` outside years 1970 to 9999.
fn rfc3339_seconds(time: std::time::SystemTime) -> Option<[u8; 20]> {
    let secs = time.duration_since(std::time::UNIX_EPOCH).ok()?.as_secs();
    // 9999-12-31T23:59:59Z
    if secs > 253_402_300_799 {
        return None;
    }
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut text = *b"0000-00-00T00:00:00Z";
    let mut put = |at: usize, value: i64, width: usize| {
        let mut value = value;
        for i in (at..at + width).rev() {
            text[i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, year, 4);
    put(5, month, 2);
    put(8, day, 2);
    put(11, (rest / 3_600) as i64, 2);
    put(14, (rest / 60 % 60) as i64, 2);
    put(17, (rest % 60) as i64, 2);
    Some(text)
}

/// What an answer says when it could not be encoded.
const INTERNAL_ERROR: &[u8] =
    br#"{"ok":false,"error":{"code":"bad_request","message":"internal encoding error"}}"#;

/// A writer that only counts what it is given.
struct ByteCount(usize);

impl std::io::Write for ByteCount {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0 += bytes.len();
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A JSON value parsed with one rule serde_json leaves out: an object may
/// not name a field twice. Depth is still bounded by serde_json's own
/// recursion limit.
struct StrictValue(Value);

impl<'de> Deserialize<'de> for StrictValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(StrictVisitor).map(StrictValue)
    }
}

struct StrictVisitor;

impl<'de> Visitor<'de> for StrictVisitor {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        serde_json::Number::from_f64(v)
            .map(Value::Number)
            .ok_or_else(|| E::custom("number out of range"))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }

    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(StrictValue(item)) = seq.next_element()? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut fields = Map::new();
        while let Some(name) = map.next_key::<String>()? {
            if fields.contains_key(&name) {
                return Err(de::Error::custom(format_args!(
                    "duplicate field {:?}",
                    clip(&name)
                )));
            }
            let StrictValue(value) = map.next_value()?;
            fields.insert(name, value);
        }
        Ok(Value::Object(fields))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn code(line: &[u8]) -> ErrorCode {
        decode(line).unwrap_err().error.code
    }

    #[test]
    fn decodes_each_op() {
        assert_eq!(decode(br#"{"op":"ping"}"#).unwrap().op, Op::Ping);
        assert_eq!(decode(br#"{"op":"keys"}"#).unwrap().op, Op::Keys);
        assert_eq!(decode(br#"{"op":"status"}"#).unwrap().op, Op::Status);
        assert_eq!(decode(br#"{"op":"metrics"}"#).unwrap().op, Op::Metrics);
        let get = decode(br#"{"op":"get","key":"payments","scopes":["vault","gateway"],"id":7}"#)
            .unwrap();
        assert_eq!(get.id, Some(json!(7)));
        assert_eq!(
            get.op,
            Op::Get {
                key: "payments".into(),
                scopes: vec!["vault".into(), "gateway".into()],
                resource: None,
            }
        );
        let no_scopes = decode(b"{\"op\":\"get\",\"key\":\"k\"}\r").unwrap();
        assert_eq!(
            no_scopes.op,
            Op::Get {
                key: "k".into(),
                scopes: vec![],
                resource: None,
            }
        );
    }

    #[test]
    fn any_json_id_is_kept() {
        for id in [
            json!("abc"),
            json!(-3),
            json!(u64::MAX),
            json!(1.5),
            json!({"a":[1,null]}),
            json!(null),
        ] {
            let line = serde_json::to_vec(&json!({"op":"ping","id":id})).unwrap();
            assert_eq!(decode(&line).unwrap().id, Some(id));
        }
    }

    #[test]
    fn malformed_lines_are_bad_requests() {
        for line in [
            &b""[..],
            b"   ",
            b"not json",
            b"\xff\xfe{}",
            b"{\"op\":\"ping\"\x00}",
            b"[1,2]",
            b"\"ping\"",
            br#"{"op":7}"#,
            br#"{"id":1}"#,
            br#"{"op":"get"}"#,
            br#"{"op":"get","key":5}"#,
            br#"{"op":"get","key":"k","scopes":"vault"}"#,
            br#"{"op":"get","key":"k","scopes":[1]}"#,
            br#"{"op":"get","key":"k","scope":["vault"]}"#,
            br#"{"op":"ping","op":"ping"}"#,
            br#"{"op":"ping","id":{"a":1,"a":2}}"#,
            br#"{"op":"ping","id":1e999}"#,
            br#"{"op":"ping"} trailing"#,
        ] {
            assert_eq!(
                code(line),
                ErrorCode::BadRequest,
                "{}",
                String::from_utf8_lossy(line)
            );
        }
    }

    #[test]
    fn deep_nesting_is_refused_without_recursing() {
        let line = vec![b'['; 100_000];
        assert_eq!(code(&line), ErrorCode::BadRequest);
    }

    #[test]
    fn unknown_op_keeps_the_id() {
        let err = decode(br#"{"op":"fly","id":"x1"}"#).unwrap_err();
        assert_eq!(err.error.code, ErrorCode::UnknownOp);
        assert_eq!(err.id, Some(json!("x1")));
        let err = decode(br#"{"op":"get","id":[2]}"#).unwrap_err();
        assert_eq!(err.id, Some(json!([2])));
    }

    #[test]
    fn error_text_does_not_echo_long_input() {
        let long = "x".repeat(10_000);
        let line = format!(r#"{{"op":"{long}"}}"#);
        let err = decode(line.as_bytes()).unwrap_err();
        assert!(err.error.message.len() < 200, "{}", err.error.message);
    }

    /// A token answer for key payments, token "tok", scope gateway.
    fn token_answer() -> Response {
        Response::Token(TokenAnswer {
            key: "payments".into(),
            access_token: AccessToken::new("tok".into()),
            token_type: "Bearer".into(),
            expires_in: 10,
            expires_at: "2026-11-25T10:00:00Z".into(),
            scopes: vec!["gateway".into()],
        })
    }

    #[test]
    fn a_token_line_is_the_token_answer_encoded() {
        // As an issuer may grant them: a quote, a non-ASCII letter, DEL.
        let scopes = ScopeSet::from_granted("gateway va\"ult é\u{7f}");
        let token = AccessToken::new("tok\\en\u{1}".into());
        let expires_at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_795_600_800);
        let general = Response::Token(TokenAnswer {
            key: "pay\nments".into(),
            access_token: token.clone(),
            token_type: "Bearer".into(),
            expires_in: 10,
            expires_at: humantime::format_rfc3339_seconds(expires_at).to_string(),
            scopes: scopes.iter().map(str::to_owned).collect(),
        });
        let line = TokenLine {
            key: "pay\nments",
            access_token: &token,
            token_type: "Bearer",
            expires_in: 10,
            expires_at,
            scopes: &scopes,
        };
        for id in [None, Some(json!({"a": [1, "x"]}))] {
            let fast = encode_token(id.as_ref(), &line);
            assert_eq!(fast.as_slice(), encode(id.as_ref(), &general).as_slice());
            assert_eq!(
                fast.capacity(),
                fast.len(),
                "allocated once, at its final size"
            );
        }
    }

    #[test]
    fn dates_and_numbers_are_written_as_fmt_would() {
        let mut secs = 0u64;
        while secs < 253_402_300_800 {
            let time = std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs);
            let ours = rfc3339_seconds(time).unwrap();
            let theirs = humantime::format_rfc3339_seconds(time).to_string();
            assert_eq!(std::str::from_utf8(&ours).unwrap(), theirs, "{secs}");
            secs += 86_400 * 7 + 3_601 + secs / 1_000;
        }
        let last = std::time::UNIX_EPOCH + std::time::Duration::from_secs(253_402_300_799);
        assert_eq!(&rfc3339_seconds(last).unwrap(), b"9999-12-31T23:59:59Z");
        assert_eq!(
            rfc3339_seconds(last + std::time::Duration::from_secs(1)),
            None
        );
        for n in [0, 7, 10, 3542, u64::MAX] {
            assert_eq!(decimal(n, &mut [0; 20]), n.to_string().as_bytes());
        }
    }

    #[test]
    fn encodes_answers_as_one_line() {
        let id = json!(3);
        assert_eq!(
            encode(Some(&id), &Response::Pong).as_slice(),
            b"{\"ok\":true,\"id\":3,\"protocol\":1}\n"
        );
        let err = encode(
            None,
            &Response::Error(ErrorBody::new(ErrorCode::ScopeNotAllowed, "no")),
        );
        assert_eq!(
            err.as_slice(),
            b"{\"ok\":false,\"error\":{\"code\":\"scope_not_allowed\",\"message\":\"no\"}}\n"
        );
        let token = token_answer();
        let value: Value = serde_json::from_slice(&encode(None, &token)).unwrap();
        assert_eq!(
            value,
            json!({"ok":true,"key":"payments","access_token":"tok","token_type":"Bearer",
                   "expires_in":10,"expires_at":"2026-11-25T10:00:00Z","scopes":["gateway"]})
        );
        assert!(!format!("{token:?}").contains("tok\""));
        // Allocated once, at its final size: nothing was copied on growth.
        let line = encode(None, &token);
        assert_eq!(line.capacity(), line.len());
    }

    #[test]
    fn what_the_client_sends_is_what_the_daemon_reads() {
        let ops = [
            Op::Ping,
            Op::Keys,
            Op::Status,
            Op::Reload,
            Op::Metrics,
            Op::Get {
                key: "payments".into(),
                scopes: vec!["vault".into(), "gateway".into()],
                resource: None,
            },
            Op::Get {
                key: "k".into(),
                scopes: vec![],
                resource: None,
            },
        ];
        for op in ops {
            for id in [None, Some(json!(7))] {
                let request = Request { id, op: op.clone() };
                let line = request.encode();
                assert_eq!(decode(line.as_bytes()), Ok(request), "{line}");
            }
        }
    }

    #[test]
    fn a_client_reads_answers_into_the_shared_types() {
        let token = token_answer();
        let line = String::from_utf8(encode(Some(&json!(1)), &token).to_vec()).unwrap();
        let read: TokenAnswer = decode_reply(&line).unwrap().unwrap();
        assert_eq!(read.access_token.expose(), "tok");
        assert_eq!(read.scopes, ["gateway"]);
        let error = Response::Error(ErrorBody::new(ErrorCode::Forbidden, "no"));
        let line = String::from_utf8(encode(None, &error).to_vec()).unwrap();
        let read = decode_reply::<TokenAnswer>(&line).unwrap().unwrap_err();
        assert_eq!(read, ErrorBody::new(ErrorCode::Forbidden, "no"));
        let line =
            String::from_utf8(encode(None, &Response::Reloaded(ReloadAnswer { keys: 3 })).to_vec())
                .unwrap();
        assert_eq!(
            decode_reply::<ReloadAnswer>(&line).unwrap().unwrap().keys,
            3
        );
        assert!(decode_reply::<TokenAnswer>("{\"ok\":false}").is_none());
        assert!(decode_reply::<TokenAnswer>("{\"ok\":true}").is_none());
        assert!(decode_reply::<TokenAnswer>("nonsense").is_none());
    }

    #[test]
    fn a_get_may_name_one_resource_as_a_string() {
        let get = decode(br#"{"op":"get","key":"k","resource":"https://api.example/"}"#).unwrap();
        assert_eq!(
            get.op,
            Op::Get {
                key: "k".into(),
                scopes: vec![],
                resource: Some("https://api.example/".into()),
            }
        );
        for line in [
            &br#"{"op":"get","key":"k","resource":["https://api.example/"]}"#[..],
            br#"{"op":"get","key":"k","resource":null}"#,
            br#"{"op":"get","key":"k","resource":1}"#,
        ] {
            let error = decode(line).unwrap_err().error;
            assert_eq!(error.code, ErrorCode::BadRequest);
            assert_eq!(error.message, "field `resource` must be a string");
        }
        // Only a get takes it.
        let error = decode(br#"{"op":"status","resource":"urn:a"}"#)
            .unwrap_err()
            .error;
        assert_eq!(error.code, ErrorCode::BadRequest);
        let request = Request {
            id: None,
            op: Op::Get {
                key: "k".into(),
                scopes: vec![],
                resource: Some("urn:a".into()),
            },
        };
        assert_eq!(
            request.encode(),
            r#"{"op":"get","key":"k","scopes":[],"resource":"urn:a"}"#
        );
    }
}
