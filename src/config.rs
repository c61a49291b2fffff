//! The configuration file: TOML into typed, validated settings.
//!
//! [`load`] does the I/O (the file, its mode, secret files); [`parse`] is
//! pure and turns text into a [`Config`] or an error that names the file,
//! line and column. Nothing here talks to an issuer or opens a socket.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use toml::Spanned;
use tracing_subscriber::filter::LevelFilter;
use url::Url;
use zeroize::Zeroizing;

use crate::scope::ScopeSet;
use crate::secret::ClientSecret;

pub const DEFAULT_CONFIG: &str = "/etc/tokend/tokend.toml";
pub const DEFAULT_SOCKET: &str = "/run/tokend/tokend.sock";

/// Settings of the whole daemon.
#[derive(Debug)]
pub struct Config {
    pub daemon: DaemonConfig,
    /// By name, the name being what callers ask for.
    pub keys: BTreeMap<String, KeyConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DaemonConfig {
    pub socket: PathBuf,
    pub socket_mode: u32,
    /// The group the socket is given, so its mode can open it to callers.
    pub socket_group: Option<String>,
    pub max_connections: usize,
    /// Default: half of `max_connections`, so no uid can take them all.
    pub max_connections_per_uid: usize,
    pub idle_timeout: Duration,
    /// A request line must arrive whole within this of its first byte.
    pub request_timeout_client: Duration,
    pub max_request_bytes: usize,
    /// The log level when `RUST_LOG` does not set one.
    pub log_level: LevelFilter,
}

/// One credential at one issuer.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyConfig {
    pub token_url: Url,
    pub client_id: String,
    pub client_secret: ClientSecret,
    pub auth: AuthMethod,
    /// What callers may ask for; `None` means only the default (empty) set.
    pub scopes: Option<ScopeSet>,
    pub prefetch: Vec<ScopeSet>,
    pub min_valid: Duration,
    pub request_timeout: Duration,
    /// A scope set nobody asked for this long is dropped (prefetch sets
    /// never are).
    pub idle_evict: Duration,
    /// Distinct scope sets cached at once; a get for one more is `busy`.
    pub max_scope_sets: usize,
    /// The longest wait between retries after issuer failures.
    pub max_backoff: Duration,
    pub acl: Acl,
}

/// How the client authenticates at the token endpoint (RFC 6749 2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMethod {
    /// HTTP Basic with the form-urlencoded id and secret.
    Basic,
    /// `client_id` and `client_secret` in the form body.
    Post,
}

/// Who may read a key. Empty means nobody, root included.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    pub uids: Vec<u32>,
    pub users: Vec<String>,
    pub groups: Vec<String>,
}

impl Acl {
    pub fn is_empty(&self) -> bool {
        self.uids.is_empty() && self.users.is_empty() && self.groups.is_empty()
    }
}

impl KeyConfig {
    /// Scopes of `asked` this key does not let callers ask for.
    pub fn scopes_not_allowed<'a>(&self, asked: &'a ScopeSet) -> Vec<&'a str> {
        match &self.scopes {
            Some(allowed) => asked.outside(allowed),
            None => asked.as_slice().iter().map(String::as_str).collect(),
        }
    }

    /// The parts whose change makes cached tokens of this key worthless.
    pub fn same_credential(&self, other: &KeyConfig) -> bool {
        self.token_url == other.token_url
            && self.client_id == other.client_id
            && self.client_secret == other.client_secret
            && self.auth == other.auth
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("failed to read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Rendered as `FILE:LINE:COL: message`, the form editors jump to.
    #[error("{}:{line}:{column}: {message}", path.display())]
    At {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{}: {message}", path.display())]
    File { path: PathBuf, message: String },
}

/// Reads and validates the configuration at `path`, secret files included.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let read_err = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    // The file may hold an inline secret: keep it in memory that is wiped.
    let text = Zeroizing::new(fs::read_to_string(path).map_err(read_err)?);
    let mode = fs::metadata(path).map_err(read_err)?.permissions().mode();
    build(&text, path, Some(mode), read_secret_file)
}

/// Parses configuration text without touching the file system: keys that
/// name a `client_secret_file` get an empty placeholder secret.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    build(text, path, None, |_| Ok(ClientSecret::new(String::new())))
}

/// `config_mode` is the file's mode when it came from disk, to refuse an
/// inline secret that others can read.
fn build(
    text: &str,
    path: &Path,
    config_mode: Option<u32>,
    read_file: impl Fn(&Path) -> Result<ClientSecret, String>,
) -> Result<Config, ConfigError> {
    let raw = parse_raw(text, path)?;
    let mut keys = BTreeMap::new();
    for (name, key) in raw.keys {
        let start = key.span().start;
        let key = key.into_inner();
        let at = |message| locate(text, path, start, message);
        if let Some(mode) = config_mode.filter(|m| m & 0o004 != 0) {
            if key.client_secret.is_some() {
                return Err(at(format!(
                    "key {name:?} has an inline client_secret but {} is readable by others \
                     (mode {:04o}); chmod o-r it or use client_secret_file",
                    path.display(),
                    mode & 0o7777
                )));
            }
        }
        let key = key.finish(&name, &read_file).map_err(at)?;
        keys.insert(name, key);
    }
    Ok(Config {
        daemon: raw.daemon.into(),
        keys,
    })
}

fn parse_raw(text: &str, path: &Path) -> Result<RawConfig, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let start = e.span().map_or(0, |s| s.start);
        locate(text, path, start, e.message().to_owned())
    })
}

/// Turns a byte offset into a 1-based line and column (in characters).
fn locate(text: &str, path: &Path, offset: usize, message: String) -> ConfigError {
    let before = &text[..floor_char_boundary(text, offset)];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    ConfigError::At {
        path: path.to_owned(),
        line,
        column: before[line_start..].chars().count() + 1,
        message,
    }
}

fn floor_char_boundary(text: &str, mut offset: usize) -> usize {
    offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    offset
}

/// Reads a secret file, refusing one that others could read too.
fn read_secret_file(path: &Path) -> Result<ClientSecret, String> {
    let shown = path.display();
    let meta = fs::metadata(path)
        .map_err(|e| format!("failed to read client_secret_file {shown}: {e}"))?;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "client_secret_file {shown} is readable by group or others (mode {:04o}); chmod 0600 it",
            mode & 0o7777
        ));
    }
    let mut text = Zeroizing::new(
        fs::read_to_string(path)
            .map_err(|e| format!("failed to read client_secret_file {shown}: {e}"))?,
    );
    // One trailing newline is what editors and `echo` add; it is never part
    // of the secret.
    if text.ends_with('\n') {
        text.pop();
        if text.ends_with('\r') {
            text.pop();
        }
    }
    if text.is_empty() {
        return Err(format!("client_secret_file {shown} is empty"));
    }
    Ok(ClientSecret::new(std::mem::take(&mut *text)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    daemon: RawDaemon,
    #[serde(default)]
    keys: BTreeMap<String, Spanned<RawKey>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawDaemon {
    socket: PathBuf,
    #[serde(deserialize_with = "mode")]
    socket_mode: u32,
    socket_group: Option<String>,
    #[serde(deserialize_with = "at_least_one")]
    max_connections: usize,
    #[serde(deserialize_with = "optional_at_least_one")]
    max_connections_per_uid: Option<usize>,
    #[serde(deserialize_with = "positive_duration")]
    idle_timeout: Duration,
    #[serde(deserialize_with = "positive_duration")]
    request_timeout_client: Duration,
    #[serde(deserialize_with = "request_bytes")]
    max_request_bytes: usize,
    #[serde(deserialize_with = "log_level")]
    log_level: LevelFilter,
}

impl Default for RawDaemon {
    fn default() -> Self {
        RawDaemon {
            socket: PathBuf::from(DEFAULT_SOCKET),
            socket_mode: 0o660,
            socket_group: None,
            max_connections: 1024,
            max_connections_per_uid: None,
            idle_timeout: Duration::from_secs(30),
            request_timeout_client: Duration::from_secs(10),
            max_request_bytes: 65536,
            log_level: LevelFilter::INFO,
        }
    }
}

impl From<RawDaemon> for DaemonConfig {
    fn from(raw: RawDaemon) -> Self {
        DaemonConfig {
            socket: raw.socket,
            socket_mode: raw.socket_mode,
            socket_group: raw.socket_group,
            max_connections: raw.max_connections,
            max_connections_per_uid: raw
                .max_connections_per_uid
                .unwrap_or((raw.max_connections / 2).max(1)),
            idle_timeout: raw.idle_timeout,
            request_timeout_client: raw.request_timeout_client,
            max_request_bytes: raw.max_request_bytes,
            log_level: raw.log_level,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    #[serde(deserialize_with = "token_url")]
    token_url: Url,
    client_id: String,
    client_secret: Option<ClientSecret>,
    client_secret_file: Option<PathBuf>,
    #[serde(default = "default_auth")]
    auth: AuthMethod,
    #[serde(default, deserialize_with = "optional_scopes")]
    scopes: Option<ScopeSet>,
    #[serde(default, deserialize_with = "scope_sets")]
    prefetch: Vec<ScopeSet>,
    #[serde(default = "default_min_valid", deserialize_with = "duration")]
    min_valid: Duration,
    #[serde(
        default = "default_request_timeout",
        deserialize_with = "positive_duration"
    )]
    request_timeout: Duration,
    #[serde(default = "default_idle_evict", deserialize_with = "positive_duration")]
    idle_evict: Duration,
    #[serde(default = "default_max_scope_sets", deserialize_with = "at_least_one")]
    max_scope_sets: usize,
    #[serde(default = "default_max_backoff", deserialize_with = "backoff_ceiling")]
    max_backoff: Duration,
    #[serde(default)]
    allow_uids: Vec<u32>,
    #[serde(default)]
    allow_users: Vec<String>,
    #[serde(default)]
    allow_groups: Vec<String>,
}

fn default_auth() -> AuthMethod {
    AuthMethod::Basic
}

fn default_min_valid() -> Duration {
    Duration::from_secs(60)
}

fn default_idle_evict() -> Duration {
    Duration::from_secs(3600)
}

fn default_max_scope_sets() -> usize {
    64
}

fn default_max_backoff() -> Duration {
    Duration::from_secs(30)
}

fn default_request_timeout() -> Duration {
    Duration::from_secs(10)
}

impl RawKey {
    /// Checks what a single field's type cannot, and resolves the secret.
    fn finish(
        self,
        name: &str,
        read_file: impl Fn(&Path) -> Result<ClientSecret, String>,
    ) -> Result<KeyConfig, String> {
        check_key_name(name)?;
        if self.client_id.is_empty() {
            return Err(format!("key {name:?}: client_id may not be empty"));
        }
        let client_secret = match (self.client_secret, self.client_secret_file) {
            (Some(secret), None) if secret.expose().is_empty() => {
                return Err(format!("key {name:?}: client_secret may not be empty"))
            }
            (Some(secret), None) => secret,
            (None, Some(file)) => read_file(&file)?,
            (Some(_), Some(_)) => {
                return Err(format!(
                    "key {name:?} sets both client_secret and client_secret_file; keep exactly one"
                ))
            }
            (None, None) => {
                return Err(format!(
                    "key {name:?} needs client_secret or client_secret_file"
                ))
            }
        };
        let key = KeyConfig {
            token_url: self.token_url,
            client_id: self.client_id,
            client_secret,
            auth: self.auth,
            scopes: self.scopes,
            prefetch: self.prefetch,
            min_valid: self.min_valid,
            request_timeout: self.request_timeout,
            idle_evict: self.idle_evict,
            max_scope_sets: self.max_scope_sets,
            max_backoff: self.max_backoff,
            acl: Acl {
                uids: self.allow_uids,
                users: self.allow_users,
                groups: self.allow_groups,
            },
        };
        for set in &key.prefetch {
            let outside = key.scopes_not_allowed(set);
            if !outside.is_empty() {
                return Err(format!(
                    "key {name:?}: prefetch set {set} asks for {outside:?}, which `scopes` does not allow"
                ));
            }
        }
        if key.prefetch.len() > key.max_scope_sets {
            return Err(format!(
                "key {name:?} prefetches {} scope sets but max_scope_sets is {}",
                key.prefetch.len(),
                key.max_scope_sets
            ));
        }
        Ok(key)
    }
}

/// Key names appear in log lines, metrics and shell commands: keep them
/// plain.
fn check_key_name(name: &str) -> Result<(), String> {
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || name.len() > 64 || !name.chars().all(plain) {
        return Err(format!(
            "key name {name:?} must be 1 to 64 letters, digits, '-', '_' or '.'"
        ));
    }
    Ok(())
}

impl<'de> Deserialize<'de> for ClientSecret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(ClientSecret::new)
    }
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(|e| {
        serde::de::Error::custom(format!(
            "bad duration {text:?} ({e}); write e.g. \"30s\", \"5m\" or \"1h\""
        ))
    })
}

fn positive_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let value = duration(d)?;
    if value.is_zero() {
        return Err(serde::de::Error::custom("duration must be more than zero"));
    }
    Ok(value)
}

/// Backoff starts at 1 s: a ceiling below that would make every retry
/// come sooner than the first one should.
fn backoff_ceiling<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let value = duration(d)?;
    if value < Duration::from_secs(1) {
        return Err(serde::de::Error::custom("max_backoff must be at least 1s"));
    }
    Ok(value)
}

fn mode<'de, D: Deserializer<'de>>(d: D) -> Result<u32, D::Error> {
    let text = String::deserialize(d)?;
    match u32::from_str_radix(&text, 8) {
        Ok(mode) if mode <= 0o777 && !text.is_empty() => Ok(mode),
        _ => Err(serde::de::Error::custom(format!(
            "bad mode {text:?}: write an octal string such as \"0660\""
        ))),
    }
}

fn at_least_one<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    match usize::deserialize(d)? {
        0 => Err(serde::de::Error::custom("must be at least 1")),
        n => Ok(n),
    }
}

fn optional_at_least_one<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    at_least_one(d).map(Some)
}

fn request_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    // A get with a key name and a few scopes needs a few hundred bytes;
    // below this limit the daemon could not be used at all.
    const MIN: usize = 256;
    match usize::deserialize(d)? {
        n if n < MIN => Err(serde::de::Error::custom(format!("must be at least {MIN}"))),
        n => Ok(n),
    }
}

fn log_level<'de, D: Deserializer<'de>>(d: D) -> Result<LevelFilter, D::Error> {
    let text = String::deserialize(d)?;
    match text.as_str() {
        "error" => Ok(LevelFilter::ERROR),
        "warn" => Ok(LevelFilter::WARN),
        "info" => Ok(LevelFilter::INFO),
        "debug" => Ok(LevelFilter::DEBUG),
        "trace" => Ok(LevelFilter::TRACE),
        _ => Err(serde::de::Error::custom(format!(
            "bad log_level {text:?}: write \"error\", \"warn\", \"info\", \"debug\" or \"trace\""
        ))),
    }
}

fn token_url<'de, D: Deserializer<'de>>(d: D) -> Result<Url, D::Error> {
    let text = String::deserialize(d)?;
    let url = Url::parse(&text)
        .map_err(|e| serde::de::Error::custom(format!("bad token_url {text:?}: {e}")))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(serde::de::Error::custom(
            "token_url may not carry credentials; use client_id and client_secret",
        ));
    }
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback(&url) => Ok(url),
        "http" => Err(serde::de::Error::custom(
            "token_url must use https: plain http would send the client secret in the clear \
             (http is allowed only for loopback issuers)",
        )),
        other => Err(serde::de::Error::custom(format!(
            "token_url scheme {other:?} is not supported; use https"
        ))),
    }
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => name == "localhost",
        None => false,
    }
}

fn scope_set<'de, D: Deserializer<'de>>(d: D) -> Result<ScopeSet, D::Error> {
    ScopeSet::new(Vec::<String>::deserialize(d)?).map_err(serde::de::Error::custom)
}

fn optional_scopes<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ScopeSet>, D::Error> {
    scope_set(d).map(Some)
}

fn scope_sets<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ScopeSet>, D::Error> {
    struct Sets(Vec<ScopeSet>);
    impl<'de> Deserialize<'de> for Sets {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let raw = Vec::<Vec<String>>::deserialize(d)?;
            raw.into_iter()
                .map(|set| ScopeSet::new(set).map_err(serde::de::Error::custom))
                .collect::<Result<Vec<_>, _>>()
                .map(Sets)
        }
    }
    let Sets(mut sets) = Sets::deserialize(d)?;
    sets.sort();
    sets.dedup();
    Ok(sets)
}

impl fmt::Display for AuthMethod {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AuthMethod::Basic => "basic",
            AuthMethod::Post => "post",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FULL: &str = r#"
[daemon]
socket = "/tmp/t.sock"
socket_mode = "0600"
max_connections = 8
idle_timeout = "5s"
max_request_bytes = 4096
log_level = "debug"

[keys.payments]
token_url = "https://access.sandbox.checkout.com/connect/token"
client_id = "ack_x"
client_secret = "s"
auth = "post"
scopes = ["vault", "gateway", "fx"]
prefetch = [["gateway"], []]
min_valid = "30s"
request_timeout = "2s"
allow_uids = [1001]
allow_users = ["payments"]
allow_groups = ["billing"]
"#;

    fn err(text: &str) -> String {
        parse(text, Path::new("t.toml")).unwrap_err().to_string()
    }

    #[test]
    fn parses_every_field() {
        let config = parse(FULL, Path::new("t.toml")).unwrap();
        assert_eq!(config.daemon.socket, PathBuf::from("/tmp/t.sock"));
        assert_eq!(config.daemon.socket_mode, 0o600);
        assert_eq!(config.daemon.max_connections, 8);
        assert_eq!(config.daemon.idle_timeout, Duration::from_secs(5));
        assert_eq!(config.daemon.log_level, LevelFilter::DEBUG);
        let key = &config.keys["payments"];
        assert_eq!(key.auth, AuthMethod::Post);
        assert_eq!(key.scopes.as_ref().unwrap().joined(), "fx gateway vault");
        assert_eq!(key.prefetch.len(), 2);
        assert_eq!(key.min_valid, Duration::from_secs(30));
        assert_eq!(key.acl.uids, [1001]);
        assert_eq!(key.client_secret.expose(), "s");
    }

    #[test]
    fn defaults_apply() {
        let config = parse(
            "[keys.a]\ntoken_url = \"https://x/t\"\nclient_id = \"i\"\nclient_secret = \"s\"\n",
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(config.daemon.socket, PathBuf::from(DEFAULT_SOCKET));
        assert_eq!(config.daemon.socket_mode, 0o660);
        assert_eq!(config.daemon.max_connections, 1024);
        assert_eq!(config.daemon.max_request_bytes, 65536);
        assert_eq!(config.daemon.max_connections_per_uid, 512);
        assert_eq!(
            config.daemon.request_timeout_client,
            Duration::from_secs(10)
        );
        assert_eq!(config.daemon.socket_group, None);
        assert_eq!(config.daemon.log_level, LevelFilter::INFO);
        let key = &config.keys["a"];
        assert_eq!(key.auth, AuthMethod::Basic);
        assert_eq!(key.scopes, None);
        assert_eq!(key.min_valid, Duration::from_secs(60));
        assert_eq!(key.request_timeout, Duration::from_secs(10));
        assert_eq!(key.idle_evict, Duration::from_secs(3600));
        assert_eq!(key.max_scope_sets, 64);
        assert_eq!(key.max_backoff, Duration::from_secs(30));
        assert!(key.acl.is_empty());
    }

    #[test]
    fn errors_name_file_line_and_column() {
        let unknown = err("[daemon]\nsockett = \"/x\"\n");
        assert!(
            unknown.starts_with("t.toml:2:1: unknown field `sockett`, expected one of `socket`"),
            "{unknown}"
        );
        assert!(err("[daemon]\nidle_timeout = \"soon\"\n").starts_with("t.toml:2:16: bad duration"));
        assert!(err("[daemon]\nsocket_mode = \"0999\"\n").starts_with("t.toml:2:15: bad mode"));
        assert!(err("[daemon]\nsocket_mode = \"01777\"\n").contains("bad mode"));
        assert!(err("[daemon]\nlog_level = \"loud\"\n").starts_with("t.toml:2:13: bad log_level"));
    }

    #[test]
    fn secret_sources_must_be_exactly_one() {
        let both = "[keys.a]\ntoken_url = \"https://x/t\"\nclient_id = \"i\"\n\
                    client_secret = \"s\"\nclient_secret_file = \"/f\"\n";
        let e = err(both);
        assert!(e.starts_with("t.toml:"), "{e}");
        assert!(
            e.contains("both client_secret and client_secret_file"),
            "{e}"
        );
        let neither = "[keys.a]\ntoken_url = \"https://x/t\"\nclient_id = \"i\"\n";
        assert!(err(neither).contains("needs client_secret or client_secret_file"));
    }

    #[test]
    fn plain_http_only_for_loopback() {
        let key = |url: &str| {
            format!("[keys.a]\ntoken_url = \"{url}\"\nclient_id = \"i\"\nclient_secret = \"s\"\n")
        };
        assert!(parse(&key("http://127.0.0.1:8080/t"), Path::new("t")).is_ok());
        assert!(parse(&key("http://[::1]/t"), Path::new("t")).is_ok());
        assert!(parse(&key("http://localhost/t"), Path::new("t")).is_ok());
        assert!(err(&key("http://issuer.example/t")).contains("must use https"));
        assert!(err(&key("https://u:p@issuer.example/t")).contains("may not carry credentials"));
    }

    #[test]
    fn prefetch_must_stay_within_scopes() {
        let text =
            "[keys.a]\ntoken_url = \"https://x/t\"\nclient_id = \"i\"\nclient_secret = \"s\"\n\
                    scopes = [\"a\"]\nprefetch = [[\"b\"]]\n";
        assert!(err(text).contains("prefetch set [b]"));
        let no_scopes =
            "[keys.a]\ntoken_url = \"https://x/t\"\nclient_id = \"i\"\nclient_secret = \"s\"\n\
                         prefetch = [[\"b\"]]\n";
        assert!(err(no_scopes).contains("prefetch set [b]"));
    }

    #[test]
    fn bad_scope_and_key_names_are_refused() {
        let text =
            "[keys.a]\ntoken_url = \"https://x/t\"\nclient_id = \"i\"\nclient_secret = \"s\"\n\
                    scopes = [\"two words\"]\n";
        assert!(err(text).contains("RFC 6749"));
        let text = "[keys.\"a b\"]\ntoken_url = \"https://x/t\"\nclient_id = \"i\"\nclient_secret = \"s\"\n";
        assert!(err(text).contains("key name"));
    }
}
