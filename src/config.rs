//! The configuration file: TOML into typed, validated settings.
//!
//! [`load`] does the I/O (the file, who may read it and who could change
//! it, secret files and systemd credentials, through
//! [`crate::secret_file`], and `ca_file`s and client certificates, through
//! [`crate::transport`], under the same rules); [`parse`] is pure
//! and turns text into a [`Config`] or an error that names the file, line
//! and column. Errors about a secret-bearing setting name the setting and
//! what it expects, never its value. Nothing here talks to an issuer or
//! opens a socket.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use toml::Spanned;
use tracing_subscriber::filter::LevelFilter;
use url::Url;
use zeroize::Zeroizing;

use crate::assertion::{Audience, ClientAssertion, SigningAlg, SigningKey};
use crate::scope::ScopeSet;
use crate::secret::ClientSecret;
use crate::secret_file::{self, Exposure, FileError};
use crate::transport::{CaFile, ClientIdentity, IdentityError, ProxyUrl};

pub const DEFAULT_CONFIG: &str = "/etc/tokend/tokend.toml";
pub const DEFAULT_SOCKET: &str = "/run/tokend/tokend.sock";
/// Where `tokend.service`'s `LoadCredential=secret:…` loads credentials
/// from, and so where `client_secret_credential` looks outside the service.
pub const DEFAULT_CREDENTIALS_DIRECTORY: &str = "/etc/tokend/credentials";
/// The environment variable systemd points at a service's credentials.
pub const CREDENTIALS_ENV: &str = "CREDENTIALS_DIRECTORY";
/// The prefix `LoadCredential=secret:DIR` gives each file of DIR.
const CREDENTIAL_PREFIX: &str = "secret_";

/// A configuration file is a few KiB; a secret file a few hundred bytes.
/// Anything far larger is a mistake, and must not be read into memory whole.
const MAX_CONFIG_BYTES: usize = 1 << 20;
const MAX_SECRET_BYTES: usize = 64 << 10;
/// The longest duration any setting takes: far beyond every sensible value,
/// far below what would overflow the clock.
const MAX_DURATION: Duration = Duration::from_secs(365 * 86400);
const MAX_DURATION_TEXT: &str = "365d";
const MAX_CONNECTIONS: usize = 1_000_000;
const MAX_REQUEST_BYTES: usize = 16 << 20;
/// The byte bounds on unread answers: below a few KiB even a short status
/// would be cut from every batch; past 1 GiB they bound nothing.
const MIN_UNREAD_BYTES: usize = 4 << 10;
const MAX_UNREAD_BYTES: usize = 1 << 30;
const MAX_SCOPE_SETS: usize = 100_000;

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
    /// Answer bytes one connection may make tokend hold before its next
    /// request is read (its first answer always goes).
    pub max_unread_bytes: usize,
    /// Answer bytes a uid's connections may make tokend hold while their
    /// callers do not read; past it each gets one answer at a time.
    pub max_unread_bytes_per_uid: usize,
    /// The log level when `RUST_LOG` does not set one.
    pub log_level: LevelFilter,
    /// Whether token handouts are audit lines at info (`true`) or only
    /// debug lines; denials are logged either way. A reload applies it.
    pub audit: bool,
    /// Where `client_secret_credential` reads from when systemd has not
    /// set `$CREDENTIALS_DIRECTORY` (say, `tokend check` in a shell).
    pub credentials_directory: PathBuf,
    /// Uids that may ask for the metrics over the socket, besides root and
    /// tokend's own user.
    pub metrics_allow_uids: Vec<u32>,
    /// Where the HTTP `/metrics` endpoint listens; none when unset. A
    /// loopback address unless `metrics_listen_non_loopback` said otherwise.
    pub metrics_listen: Option<SocketAddr>,
    pub metrics_listen_non_loopback: bool,
    /// The trust anchors of keys without a `ca_file` of their own.
    pub ca_file: Option<PathBuf>,
}

/// One credential at one issuer.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyConfig {
    /// The key's name in `[keys.NAME]`, for what reports on the key
    /// without the map around it (the issuer's metrics).
    pub name: String,
    /// Where tokens come from: a `token_url` as written, or an `issuer`
    /// whose discovery document names the token endpoint.
    pub endpoint: Endpoint,
    pub client_id: String,
    pub client_secret: ClientSecret,
    /// Why this key cannot ask its issuer for anything: its secret could
    /// not be read when the daemon started. Such a key is served as
    /// `unavailable` with this reason until a reload brings the secret.
    pub unusable: Option<String>,
    pub auth: AuthMethod,
    /// How `private_key_jwt` signs; `Some` exactly for that auth method.
    pub assertion: Option<ClientAssertion>,
    /// What callers may ask for; `None` means only the default (empty) set.
    pub scopes: Option<ScopeSet>,
    /// What a get without scopes asks the issuer for when `scopes` is set:
    /// this, or else all of `scopes`. Never empty when `scopes` is set.
    pub default_scopes: Option<ScopeSet>,
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
    /// Trust anchors beside the bundled and system roots: the key's own
    /// `ca_file`, or else `[daemon] ca_file`.
    pub ca_file: Option<CaFile>,
    /// The proxy to the issuer instead of the environment's.
    pub proxy: Option<ProxyUrl>,
    /// The TLS client certificate and key; `Some` exactly for the
    /// `tls_client_auth` methods.
    pub client_identity: Option<ClientIdentity>,
    /// RFC 8707 resource indicators a get may ask for; empty when the key
    /// sends none. A get without one asks for none: the issuer's default.
    pub resource: Vec<Arc<str>>,
    /// Sent as the `audience` form parameter (Auth0 and its imitators).
    pub audience: Option<String>,
    pub acl: Acl,
}

/// Where a key's tokens come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `token_url`: the token endpoint itself.
    TokenUrl(Url),
    /// `issuer`: the endpoint is read from the issuer's discovery
    /// document (RFC 8414, OpenID Connect Discovery 1.0).
    Issuer(IssuerId),
}

impl Endpoint {
    /// What the operator configured, for messages before discovery.
    pub fn configured(&self) -> &str {
        match self {
            Endpoint::TokenUrl(url) => url.as_str(),
            Endpoint::Issuer(issuer) => issuer.as_str(),
        }
    }
}

/// An issuer identifier as configured. The text is kept as written:
/// RFC 8414 3.3 and OIDC Discovery 4.3 compare it to the document's
/// `issuer` as strings, and a parsed `Url` turns `https://a` into
/// `https://a/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerId {
    text: String,
    url: Url,
}

impl IssuerId {
    pub fn as_str(&self) -> &str {
        &self.text
    }

    pub fn url(&self) -> &Url {
        &self.url
    }

    /// Whether plain http is allowed for this issuer: only on loopback,
    /// as for `token_url`.
    pub fn is_loopback_http(&self) -> bool {
        self.url.scheme() == "http" && is_loopback(&self.url)
    }
}

/// How the client authenticates at the token endpoint (RFC 6749 2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMethod {
    /// HTTP Basic with the form-urlencoded id and secret.
    Basic,
    /// `client_id` and `client_secret` in the form body.
    Post,
    /// A JWT signed with `private_key_file` (RFC 7523 2.2); no secret.
    #[serde(rename = "private_key_jwt")]
    PrivateKeyJwt,
    /// A TLS client certificate a CA signed (RFC 8705 2.1); no secret.
    #[serde(rename = "tls_client_auth")]
    TlsClientAuth,
    /// A self-signed TLS client certificate registered with the issuer
    /// (RFC 8705 2.2); no secret.
    #[serde(rename = "self_signed_tls_client_auth")]
    SelfSignedTlsClientAuth,
}

impl AuthMethod {
    /// The name RFC 8414's `token_endpoint_auth_methods_supported` (from
    /// the IANA registry OAuth 2.0 Token Endpoint Authentication Methods)
    /// gives this method.
    pub fn registered_name(self) -> &'static str {
        match self {
            AuthMethod::Basic => "client_secret_basic",
            AuthMethod::Post => "client_secret_post",
            AuthMethod::PrivateKeyJwt => "private_key_jwt",
            AuthMethod::TlsClientAuth => "tls_client_auth",
            AuthMethod::SelfSignedTlsClientAuth => "self_signed_tls_client_auth",
        }
    }

    /// Whether the TLS client certificate is the credential.
    pub fn is_mtls(self) -> bool {
        matches!(
            self,
            AuthMethod::TlsClientAuth | AuthMethod::SelfSignedTlsClientAuth
        )
    }
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
            None => asked.iter().collect(),
        }
    }

    /// The scope set a get for `asked` is served from. A key that lists
    /// `scopes` never lets an empty set reach the issuer: some issuers
    /// (Checkout.com) grant every scope of the credential when asked for
    /// none, which would widen what the operator allowed.
    pub fn effective_scopes(&self, asked: ScopeSet) -> ScopeSet {
        if asked.is_empty() {
            self.effective_scopes_of(&asked).clone()
        } else {
            asked
        }
    }

    /// [`KeyConfig::effective_scopes`] without a copy: what a get serves
    /// is either what it asked for or one of the key's own sets.
    pub fn effective_scopes_of<'a>(&'a self, asked: &'a ScopeSet) -> &'a ScopeSet {
        match (&self.scopes, &self.default_scopes) {
            (Some(_), Some(default)) if asked.is_empty() => default,
            (Some(all), None) if asked.is_empty() => all,
            _ => asked,
        }
    }

    /// The parts whose change makes cached tokens of this key worthless.
    pub fn same_credential(&self, other: &KeyConfig) -> bool {
        // A changed issuer may name another token endpoint.
        self.endpoint == other.endpoint
            && self.client_id == other.client_id
            && self.client_secret == other.client_secret
            && self.unusable == other.unusable
            && self.auth == other.auth
            // The key file's path and text, and how it signs.
            && self.assertion == other.assertion
            // A token from an issuer tokend now trusts differently may
            // come from a server it no longer would talk to.
            && self.ca_file == other.ca_file
            // The certificate's and key's paths and contents.
            && self.client_identity == other.client_identity
            // The same resource with another audience is another token.
            // A changed `resource` list only drops the resources it no
            // longer allows (see `TokenCache::adopt`).
            && self.audience == other.audience
    }

    /// Whether a get may ask for `resource`.
    pub fn allows_resource(&self, resource: &str) -> bool {
        self.resource.iter().any(|allowed| &**allowed == resource)
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Read(#[from] FileError),
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

/// Reads and validates the configuration at `path`, secret files and
/// credentials included.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    read(path, false, None)
}

/// Like [`load`], for a daemon running `running`: a private key file that
/// still holds the same text keeps the running key, shared, rather than a
/// new copy of it (see [`crate::assertion`] for why copies matter).
pub fn reload(path: &Path, running: &Config) -> Result<Config, ConfigError> {
    read(path, false, Some(running))
}

/// Like [`load`], for a daemon that is starting: a key whose secret cannot
/// be read does not stop the others from being served (nor, under systemd,
/// a restart loop from failing the socket unit). It is kept with the
/// reason in [`KeyConfig::unusable`]. Every other error still is one.
pub fn load_serving(path: &Path) -> Result<Config, ConfigError> {
    read(path, true, None)
}

fn read(path: &Path, lenient: bool, running: Option<&Config>) -> Result<Config, ConfigError> {
    // The file may hold an inline secret: its text lives in memory that is
    // wiped, and who else may read it is judged from the same descriptor.
    let file = secret_file::read(path, MAX_CONFIG_BYTES)?;
    let credentials = std::env::var_os(CREDENTIALS_ENV).map(PathBuf::from);
    let sources = Sources {
        config_exposure: file.exposure.as_ref(),
        credentials: credentials.as_deref(),
        lenient,
        read_key: Some(read_private_key),
        read_ca: Some(CaFile::read),
        read_identity: Some(ClientIdentity::read),
        running,
    };
    build(&file.text, path, sources, read_secret_file)
}

/// Parses configuration text without touching the file system: keys that
/// name a secret file or credential get an empty placeholder secret.
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
    let placeholder = |_: &Path| Ok(ClientSecret::new(String::new()));
    build(text, path, Sources::default(), placeholder)
}

/// What [`build`] needs to know of the world outside the text.
#[derive(Default, Clone, Copy)]
struct Sources<'a> {
    /// Who else may read the configuration file, to refuse inline secrets
    /// in a file that is not private.
    config_exposure: Option<&'a Exposure>,
    /// `$CREDENTIALS_DIRECTORY`, when systemd set it.
    credentials: Option<&'a Path>,
    /// Keep keys whose secret cannot be read, marked unusable.
    lenient: bool,
    /// Reads `private_key_file`; `None` leaves keys unread (`parse`).
    read_key: Option<ReadKey>,
    /// Reads a `ca_file`; `None` leaves them unread (see [`parse`]).
    read_ca: Option<ReadCa>,
    /// Reads `client_cert_file` and `client_key_file`; `None` leaves them
    /// unread.
    read_identity: Option<ReadIdentity>,
    /// The configuration in force, whose loaded keys a reload keeps.
    running: Option<&'a Config>,
}

/// Reads a private key file's text, or says why not.
type ReadKey = fn(&Path) -> Result<Zeroizing<String>, String>;

/// How [`load`] reads a `ca_file`.
type ReadCa = fn(&Path) -> Result<CaFile, String>;

/// How [`load`] reads a client certificate and its key.
type ReadIdentity = fn(&Path, &Path) -> Result<ClientIdentity, IdentityError>;

fn build(
    text: &str,
    path: &Path,
    sources: Sources<'_>,
    read_file: impl Fn(&Path) -> Result<ClientSecret, String>,
) -> Result<Config, ConfigError> {
    let raw = parse_raw(text, path)?;
    let read_ca = |setting: &Spanned<PathBuf>, owner: &str| {
        let file = setting.get_ref();
        match sources.read_ca {
            Some(read) => read(file).map_err(|e| {
                locate(
                    text,
                    path,
                    setting.span().start,
                    format!("{owner}ca_file: {e}"),
                )
            }),
            None => Ok(CaFile::unread(file)),
        }
    };
    let daemon_ca = raw
        .daemon
        .ca_file
        .as_ref()
        .map(|setting| read_ca(setting, "[daemon] "))
        .transpose()?;
    let daemon = raw.daemon.finish(text, path)?;
    let mut keys = BTreeMap::new();
    for (name, key) in raw.keys {
        let start = key.span().start;
        let mut key = key.into_inner();
        let at = |message| locate(text, path, start, message);
        if let Some(exposure) = sources.config_exposure {
            if key.client_secret.is_some() {
                return Err(at(format!(
                    "key {name:?} has an inline client_secret but {} {exposure}; {} or use \
                     client_secret_file",
                    path.display(),
                    exposure.advice(Path::new("it")),
                )));
            }
            if let Some(proxy) = key.proxy.as_ref().filter(|p| p.get_ref().has_credentials()) {
                return Err(locate(
                    text,
                    path,
                    proxy.span().start,
                    format!(
                        "key {name:?} has a proxy URL with credentials but {} {exposure}; {} or \
                         set HTTPS_PROXY in an environment file only root can read",
                        path.display(),
                        exposure.advice(Path::new("it")),
                    ),
                ));
            }
        }
        // A key's own ca_file replaces the daemon's, as a key's setting
        // replaces any default.
        let ca_file = match key.ca_file.take() {
            Some(setting) => Some(read_ca(&setting, &format!("key {name:?}: "))?),
            None => daemon_ca.clone(),
        };
        if let Some(audience) = &key.assertion_audience {
            if matches!(audience.get_ref().0, AudienceChoice::Issuer) && key.issuer.is_none() {
                return Err(locate(
                    text,
                    path,
                    audience.span().start,
                    "assertion_audience = \"issuer\" needs an issuer setting; this key gives \
                     token_url, so write the issuer identifier's URL instead"
                        .to_owned(),
                ));
            }
        }
        let identity_files = (key.client_cert_file.clone(), key.client_key_file.clone());
        let credentials = sources
            .credentials
            .map(|dir| (dir, CREDENTIAL_PREFIX))
            .unwrap_or((&daemon.credentials_directory, ""));
        let mut key = key
            .finish(&name, credentials, sources.lenient, &read_file)
            .map_err(at)?;
        key.ca_file = ca_file;
        if let Some(read_key) = sources.read_key {
            load_signing_key(&name, &mut key, read_key, sources).map_err(at)?;
        }
        if let (Some(cert), Some(key_file)) = identity_files {
            let located = |offset: usize, message| locate(text, path, offset, message);
            load_identity(&name, &mut key, (&cert, &key_file), sources, located)?;
        }
        keys.insert(name, key);
    }
    Ok(Config { daemon, keys })
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

/// Reads a key's client certificate and private key into `key`. An error
/// points at the setting of the file it is about; in lenient mode it is
/// the reason the key stays unusable instead.
fn load_identity(
    name: &str,
    key: &mut KeyConfig,
    (cert, key_file): (&Spanned<PathBuf>, &Spanned<PathBuf>),
    sources: Sources<'_>,
    located: impl Fn(usize, String) -> ConfigError,
) -> Result<(), ConfigError> {
    let Some(read) = sources.read_identity else {
        key.client_identity = Some(ClientIdentity::unread(cert.get_ref(), key_file.get_ref()));
        return Ok(());
    };
    let e = match read(cert.get_ref(), key_file.get_ref()) {
        Ok(identity) => {
            key.client_identity = Some(identity);
            return Ok(());
        }
        Err(e) => e,
    };
    let (setting, at) = if e.about_the_key() {
        ("client_key_file", key_file.span().start)
    } else {
        ("client_cert_file", cert.span().start)
    };
    if sources.lenient {
        key.unusable = Some(format!("{setting}: {e}"));
        return Ok(());
    }
    Err(located(at, format!("key {name:?}: {setting}: {e}")))
}

/// Reads a secret file, refusing one that anyone but its owner, root and
/// tokend's own user could read.
fn read_secret_file(path: &Path) -> Result<ClientSecret, String> {
    let shown = path.display();
    let file =
        secret_file::read(path, MAX_SECRET_BYTES).map_err(|e| format!("client secret: {e}"))?;
    if let Some(exposure) = &file.exposure {
        return Err(format!(
            "secret file {shown} {exposure}; {}",
            exposure.advice(path)
        ));
    }
    let mut text = file.text;
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

/// Reads `private_key_file` into `key` and proves it signs, unless the
/// running configuration holds a key read from the same text, which is
/// kept. A key that cannot sign is an error, or in lenient mode the reason
/// the key is unusable.
fn load_signing_key(
    name: &str,
    key: &mut KeyConfig,
    read_key: ReadKey,
    sources: Sources<'_>,
) -> Result<(), String> {
    let Some(assertion) = &mut key.assertion else {
        return Ok(());
    };
    let path = &assertion.key_file;
    let alg = assertion.signing_alg;
    let loaded = read_key(path).and_then(|pem| {
        if let Some(kept) = running_keys(sources.running).find(|k| k.was_read_from(&pem, alg)) {
            return Ok(kept.clone());
        }
        SigningKey::from_pem(pem, alg).map_err(|e| format!("{} {e}", path.display()))
    });
    match loaded {
        Ok(signing) => assertion.key = Some(signing),
        Err(e) if sources.lenient => key.unusable = Some(format!("private_key_file: {e}")),
        Err(e) => return Err(format!("key {name:?}: private_key_file: {e}")),
    }
    Ok(())
}

/// The loaded signing keys of the configuration in force, if any.
fn running_keys(running: Option<&Config>) -> impl Iterator<Item = &SigningKey> {
    running
        .into_iter()
        .flat_map(|config| config.keys.values())
        .filter_map(|key| key.assertion.as_ref()?.key.as_ref())
}

/// Reads a private key file under the same rule as a secret file. The
/// text is kept whole: a PEM parser ignores the trailing newline.
fn read_private_key(path: &Path) -> Result<Zeroizing<String>, String> {
    let file = secret_file::read(path, MAX_SECRET_BYTES).map_err(|e| e.to_string())?;
    if let Some(exposure) = &file.exposure {
        return Err(format!(
            "{} {exposure}; {}",
            path.display(),
            exposure.advice(path)
        ));
    }
    Ok(file.text)
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
    #[serde(deserialize_with = "connections")]
    max_connections: usize,
    #[serde(deserialize_with = "optional_connections")]
    max_connections_per_uid: Option<usize>,
    #[serde(deserialize_with = "positive_duration")]
    idle_timeout: Duration,
    #[serde(deserialize_with = "positive_duration")]
    request_timeout_client: Duration,
    #[serde(deserialize_with = "request_bytes")]
    max_request_bytes: usize,
    #[serde(deserialize_with = "unread_bytes")]
    max_unread_bytes: usize,
    #[serde(deserialize_with = "unread_bytes")]
    max_unread_bytes_per_uid: usize,
    #[serde(deserialize_with = "log_level")]
    log_level: LevelFilter,
    audit: bool,
    credentials_directory: PathBuf,
    metrics_allow_uids: Vec<u32>,
    /// Spanned: whether the address may be used depends on another setting,
    /// and the error must still point at this one.
    metrics_listen: Option<Spanned<String>>,
    metrics_listen_non_loopback: bool,
    ca_file: Option<Spanned<PathBuf>>,
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
            // A batch of 64 gets, the most one write carries, is far
            // smaller; a status of many keys fills it with a few answers.
            max_unread_bytes: 256 << 10,
            // Sixteen connections' full batches; with one answer more per
            // connection past it, the most one local user can make tokend
            // hold for callers that do not read.
            max_unread_bytes_per_uid: 4 << 20,
            log_level: LevelFilter::INFO,
            audit: true,
            credentials_directory: PathBuf::from(DEFAULT_CREDENTIALS_DIRECTORY),
            metrics_allow_uids: Vec::new(),
            metrics_listen: None,
            metrics_listen_non_loopback: false,
            ca_file: None,
        }
    }
}

impl RawDaemon {
    /// Checks what one field's type cannot: the metrics address against
    /// the setting that allows a non-loopback one.
    fn finish(self, text: &str, path: &Path) -> Result<DaemonConfig, ConfigError> {
        let metrics_listen = match &self.metrics_listen {
            Some(listen) => Some(
                metrics_address(listen.get_ref(), self.metrics_listen_non_loopback)
                    .map_err(|message| locate(text, path, listen.span().start, message))?,
            ),
            None => None,
        };
        Ok(DaemonConfig {
            socket: self.socket,
            socket_mode: self.socket_mode,
            socket_group: self.socket_group,
            max_connections: self.max_connections,
            max_connections_per_uid: self
                .max_connections_per_uid
                .unwrap_or((self.max_connections / 2).max(1)),
            idle_timeout: self.idle_timeout,
            request_timeout_client: self.request_timeout_client,
            max_request_bytes: self.max_request_bytes,
            max_unread_bytes: self.max_unread_bytes,
            max_unread_bytes_per_uid: self.max_unread_bytes_per_uid,
            log_level: self.log_level,
            audit: self.audit,
            credentials_directory: self.credentials_directory,
            metrics_allow_uids: self.metrics_allow_uids,
            metrics_listen,
            metrics_listen_non_loopback: self.metrics_listen_non_loopback,
            ca_file: self.ca_file.map(Spanned::into_inner),
        })
    }
}

/// `metrics_listen` as an address. Only an IP address and port: a host
/// name would be resolved once, at start, to whatever it meant then. A
/// non-loopback address opens the metrics to everyone who can reach it, so
/// it takes `metrics_listen_non_loopback = true` to say that is meant.
fn metrics_address(text: &str, non_loopback: bool) -> Result<SocketAddr, String> {
    let address: SocketAddr = text.parse().map_err(|_| {
        format!(
            "bad metrics_listen {text:?}: write an IP address and port, such as \"127.0.0.1:9464\" \
             or \"[::1]:9464\""
        )
    })?;
    if !address.ip().is_loopback() && !non_loopback {
        return Err(format!(
            "metrics_listen {address} is not a loopback address: anyone who can reach it could \
             read the metrics; use 127.0.0.1 or [::1], or set metrics_listen_non_loopback = true \
             if that is meant"
        ));
    }
    Ok(address)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKey {
    #[serde(default, deserialize_with = "optional_token_url")]
    token_url: Option<Url>,
    #[serde(default, deserialize_with = "optional_issuer")]
    issuer: Option<IssuerId>,
    client_id: String,
    client_secret: Option<ClientSecret>,
    client_secret_file: Option<PathBuf>,
    client_secret_credential: Option<String>,
    #[serde(default = "default_auth")]
    auth: AuthMethod,
    private_key_file: Option<PathBuf>,
    key_id: Option<String>,
    signing_alg: Option<SigningAlg>,
    assertion_audience: Option<Spanned<AudienceSetting>>,
    #[serde(default, deserialize_with = "optional_scopes")]
    scopes: Option<ScopeSet>,
    #[serde(default, deserialize_with = "optional_scopes")]
    default_scopes: Option<ScopeSet>,
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
    #[serde(
        default = "default_max_scope_sets",
        deserialize_with = "scope_set_count"
    )]
    max_scope_sets: usize,
    #[serde(default = "default_max_backoff", deserialize_with = "backoff_ceiling")]
    max_backoff: Duration,
    ca_file: Option<Spanned<PathBuf>>,
    proxy: Option<Spanned<ProxyUrl>>,
    client_cert_file: Option<Spanned<PathBuf>>,
    client_key_file: Option<Spanned<PathBuf>>,
    #[serde(default)]
    resource: Resources,
    #[serde(default, deserialize_with = "optional_audience")]
    audience: Option<String>,
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
    /// `credentials` is the directory credentials are read from and the
    /// prefix their file names carry there.
    fn finish(
        self,
        name: &str,
        credentials: (&Path, &str),
        lenient: bool,
        read_file: impl Fn(&Path) -> Result<ClientSecret, String>,
    ) -> Result<KeyConfig, String> {
        check_key_name(name)?;
        if self.client_id.is_empty() {
            return Err(format!("key {name:?}: client_id may not be empty"));
        }
        // A secret file that cannot be read (missing, not private) is an
        // error, or in lenient mode the reason the key stays unusable.
        let mut unusable = None;
        let mut read = |path: &Path, setting: String| match read_file(path) {
            Ok(secret) => Ok(secret),
            Err(e) if lenient => {
                unusable = Some(format!("{setting}: {e}"));
                Ok(ClientSecret::new(String::new()))
            }
            Err(e) => Err(format!("key {name:?}: {setting}: {e}")),
        };
        let endpoint = self.endpoint(name)?;
        let assertion = self.assertion(name, &endpoint)?;
        self.check_client_certificate(name)?;
        // Methods whose credential is no secret: a secret beside it would
        // be sent nowhere, and the operator should know.
        let secretless = match self.auth {
            AuthMethod::Basic | AuthMethod::Post => None,
            AuthMethod::PrivateKeyJwt => Some("signs with private_key_file"),
            AuthMethod::TlsClientAuth | AuthMethod::SelfSignedTlsClientAuth => {
                Some("authenticates with client_cert_file and client_key_file")
            }
        };
        let client_secret = match (
            self.client_secret,
            self.client_secret_file,
            self.client_secret_credential,
        ) {
            (None, None, None) if secretless.is_some() => ClientSecret::new(String::new()),
            (secret, file, credential) if secretless.is_some() => {
                let set = [
                    ("client_secret", secret.is_some()),
                    ("client_secret_file", file.is_some()),
                    ("client_secret_credential", credential.is_some()),
                ]
                .into_iter()
                .find_map(|(setting, given)| given.then_some(setting))
                .unwrap_or("client_secret");
                return Err(format!(
                    "key {name:?} sets both auth = \"{}\" and {set}; that method {} and \
                     sends no secret: remove {set}",
                    self.auth,
                    secretless.unwrap_or("carries no secret"),
                ));
            }
            (Some(secret), None, None) if secret.expose().is_empty() => {
                return Err(format!("key {name:?}: client_secret may not be empty"))
            }
            (Some(secret), None, None) => secret,
            (None, Some(file), None) => read(&file, "client_secret_file".to_owned())?,
            (None, None, Some(credential)) => {
                check_credential_name(name, &credential)?;
                let (dir, prefix) = credentials;
                let path = dir.join(format!("{prefix}{credential}"));
                read(&path, format!("client_secret_credential {credential:?}"))?
            }
            (None, None, None) => {
                return Err(format!(
                    "key {name:?} needs client_secret or client_secret_file"
                ))
            }
            (secret, file, credential) => {
                let set: Vec<&str> = [
                    ("client_secret", secret.is_some()),
                    ("client_secret_file", file.is_some()),
                    ("client_secret_credential", credential.is_some()),
                ]
                .into_iter()
                .filter_map(|(setting, given)| given.then_some(setting))
                .collect();
                return Err(format!(
                    "key {name:?} sets both {}; keep exactly one",
                    set.join(" and ")
                ));
            }
        };
        let mut key = KeyConfig {
            name: name.to_owned(),
            endpoint,
            client_id: self.client_id,
            client_secret,
            unusable,
            auth: self.auth,
            assertion,
            scopes: self.scopes,
            default_scopes: self.default_scopes,
            prefetch: self.prefetch,
            min_valid: self.min_valid,
            request_timeout: self.request_timeout,
            idle_evict: self.idle_evict,
            max_scope_sets: self.max_scope_sets,
            max_backoff: self.max_backoff,
            // Read by `build`, which knows where the setting is.
            ca_file: None,
            proxy: self.proxy.map(Spanned::into_inner),
            // Read by `build`, which knows where the settings are.
            client_identity: None,
            resource: self.resource.0,
            audience: self.audience,
            acl: Acl {
                uids: self.allow_uids,
                users: self.allow_users,
                groups: self.allow_groups,
            },
        };
        check_default_scopes(name, &key)?;
        for set in &key.prefetch {
            let outside = key.scopes_not_allowed(set);
            if !outside.is_empty() {
                return Err(format!(
                    "key {name:?}: prefetch set {set} asks for {outside:?}, which `scopes` does not allow"
                ));
            }
        }
        // Prefetch `[]` means what a get without scopes gets.
        let mut prefetch: Vec<ScopeSet> = std::mem::take(&mut key.prefetch)
            .into_iter()
            .map(|set| key.effective_scopes(set))
            .collect();
        prefetch.sort();
        prefetch.dedup();
        key.prefetch = prefetch;
        if key.prefetch.len() > key.max_scope_sets {
            return Err(format!(
                "key {name:?} prefetches {} scope sets but max_scope_sets is {}",
                key.prefetch.len(),
                key.max_scope_sets
            ));
        }
        Ok(key)
    }

    /// The `private_key_jwt` settings, which only that method takes and
    /// which it needs a key file for. The file itself is read later.
    /// Exactly one of `token_url` and `issuer`.
    fn endpoint(&self, name: &str) -> Result<Endpoint, String> {
        match (&self.token_url, &self.issuer) {
            (Some(url), None) => Ok(Endpoint::TokenUrl(url.clone())),
            (None, Some(issuer)) => Ok(Endpoint::Issuer(issuer.clone())),
            (Some(_), Some(_)) => Err(format!(
                "key {name:?} sets both token_url and issuer; keep exactly one (issuer finds \
                 the token endpoint through discovery)"
            )),
            (None, None) => Err(format!(
                "key {name:?} needs token_url (the token endpoint) or issuer (to discover it)"
            )),
        }
    }

    fn assertion(
        &self,
        name: &str,
        endpoint: &Endpoint,
    ) -> Result<Option<ClientAssertion>, String> {
        if self.auth != AuthMethod::PrivateKeyJwt {
            let stray = [
                ("private_key_file", self.private_key_file.is_some()),
                ("key_id", self.key_id.is_some()),
                ("signing_alg", self.signing_alg.is_some()),
                ("assertion_audience", self.assertion_audience.is_some()),
            ]
            .into_iter()
            .find_map(|(setting, given)| given.then_some(setting));
            return match stray {
                Some(setting) => Err(format!(
                    "key {name:?}: {setting} is only used with auth = \"private_key_jwt\" \
                     (this key's auth is \"{}\")",
                    self.auth
                )),
                None => Ok(None),
            };
        }
        let Some(key_file) = self.private_key_file.clone() else {
            return Err(format!(
                "key {name:?}: auth = \"private_key_jwt\" needs private_key_file (a PEM private key)"
            ));
        };
        if self.key_id.as_deref() == Some("") {
            return Err(format!(
                "key {name:?}: key_id may not be empty (leave it out to send no kid)"
            ));
        }
        let audience = match self.assertion_audience.as_ref().map(|s| &s.get_ref().0) {
            None | Some(AudienceChoice::TokenEndpoint) => Audience::TokenEndpoint,
            Some(AudienceChoice::Named(url)) => Audience::Named(url.clone()),
            // RFC 7523 3 allows the issuer identifier as `aud`; `build`
            // has refused this for a key without one.
            Some(AudienceChoice::Issuer) => match endpoint {
                Endpoint::Issuer(issuer) => Audience::Named(issuer.as_str().to_owned()),
                Endpoint::TokenUrl(_) => Audience::TokenEndpoint,
            },
        };
        Ok(Some(ClientAssertion {
            key_file,
            key_id: self.key_id.clone(),
            signing_alg: self.signing_alg,
            audience,
            key: None,
        }))
    }

    /// `client_cert_file` and `client_key_file`: both for the
    /// `tls_client_auth` methods, neither for the others. The files
    /// themselves are read later.
    fn check_client_certificate(&self, name: &str) -> Result<(), String> {
        let given = [
            ("client_cert_file", self.client_cert_file.is_some()),
            ("client_key_file", self.client_key_file.is_some()),
        ];
        if !self.auth.is_mtls() {
            return match given.iter().find(|(_, set)| *set) {
                Some((setting, _)) => Err(format!(
                    "key {name:?}: {setting} is only used with auth = \"tls_client_auth\" or \
                     \"self_signed_tls_client_auth\" (this key's auth is \"{}\")",
                    self.auth
                )),
                None => Ok(()),
            };
        }
        match given.iter().find(|(_, set)| !*set) {
            Some((setting, _)) => Err(format!(
                "key {name:?}: auth = \"{}\" needs {setting} (client_cert_file: the PEM \
                 certificate chain, client_key_file: its PEM private key)",
                self.auth
            )),
            None => Ok(()),
        }
    }
}

fn check_default_scopes(name: &str, key: &KeyConfig) -> Result<(), String> {
    let Some(default) = &key.default_scopes else {
        return Ok(());
    };
    if key.scopes.is_none() {
        return Err(format!(
            "key {name:?}: default_scopes needs a `scopes` list it is a subset of"
        ));
    }
    if default.is_empty() {
        return Err(format!(
            "key {name:?}: default_scopes may not be empty (leave it out to default to all of `scopes`)"
        ));
    }
    let outside = key.scopes_not_allowed(default);
    if !outside.is_empty() {
        return Err(format!(
            "key {name:?}: default_scopes has {outside:?}, which `scopes` does not list"
        ));
    }
    Ok(())
}

/// A credential name becomes a file name in a directory: no path
/// separators, no `..`.
fn check_credential_name(key: &str, name: &str) -> Result<(), String> {
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if name.is_empty() || name.len() > 64 || !name.chars().all(plain) || name.starts_with('.') {
        return Err(format!(
            "key {key:?}: client_secret_credential {name:?} must be 1 to 64 letters, digits, \
             '-', '_' or '.', not starting with '.'"
        ));
    }
    Ok(())
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

/// A secret accepts only a string, and its errors never repeat the value:
/// serde's own would quote a mistyped number (`client_secret = 8675309`),
/// and the error ends up in `tokend check`'s output and on systemd's status
/// line, which every local user can read.
impl<'de> Deserialize<'de> for ClientSecret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_string(SecretVisitor)
    }
}

struct SecretVisitor;

impl SecretVisitor {
    fn wrong<E: serde::de::Error>(what: &str) -> E {
        E::custom(format!(
            "client_secret must be a string (got {what}); quote it, and keep the value out of \
             error reports"
        ))
    }
}

impl<'de> serde::de::Visitor<'de> for SecretVisitor {
    type Value = ClientSecret;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ClientSecret, E> {
        Ok(ClientSecret::new(v.to_owned()))
    }

    fn visit_string<E: serde::de::Error>(self, v: String) -> Result<ClientSecret, E> {
        Ok(ClientSecret::new(v))
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<ClientSecret, E> {
        Err(Self::wrong("a boolean"))
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<ClientSecret, E> {
        Err(Self::wrong("a number"))
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<ClientSecret, E> {
        Err(Self::wrong("a number"))
    }

    fn visit_i128<E: serde::de::Error>(self, _: i128) -> Result<ClientSecret, E> {
        Err(Self::wrong("a number"))
    }

    fn visit_u128<E: serde::de::Error>(self, _: u128) -> Result<ClientSecret, E> {
        Err(Self::wrong("a number"))
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<ClientSecret, E> {
        Err(Self::wrong("a number"))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, _: A) -> Result<ClientSecret, A::Error> {
        Err(Self::wrong("an array"))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, _: A) -> Result<ClientSecret, A::Error> {
        Err(Self::wrong("a table or a date"))
    }
}

/// A proxy URL may carry a password: errors name what is wrong with it,
/// never the text.
impl<'de> Deserialize<'de> for ProxyUrl {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = zeroize::Zeroizing::new(String::deserialize(d).map_err(|_| {
            serde::de::Error::custom("proxy must be a string such as \"http://proxy.example:3128\"")
        })?);
        ProxyUrl::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// `resource`: one URI or a list of them, each absolute and without a
/// fragment (RFC 8707 section 2), kept as written because the issuer
/// compares them as strings. Duplicates are dropped, order is kept: the
/// first is not special, but `status` lists them as configured.
#[derive(Default)]
struct Resources(Vec<Arc<str>>);

impl<'de> Deserialize<'de> for Resources {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum OneOrMany {
            One(String),
            Many(Vec<String>),
        }
        let raw = OneOrMany::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "resource must be a URI or an array of URIs such as \"https://api.example/\"",
            )
        })?;
        let raw = match raw {
            OneOrMany::One(one) => vec![one],
            OneOrMany::Many(many) => many,
        };
        let mut out: Vec<Arc<str>> = Vec::with_capacity(raw.len());
        for text in raw {
            check_resource(&text).map_err(serde::de::Error::custom)?;
            if !out.iter().any(|seen| **seen == *text) {
                out.push(text.into());
            }
        }
        Ok(Resources(out))
    }
}

/// RFC 8707 section 2: "an absolute URI", which "MUST NOT include a
/// fragment component".
fn check_resource(text: &str) -> Result<(), String> {
    let url =
        Url::parse(text).map_err(|e| format!("resource {text:?} is not an absolute URI: {e}"))?;
    if url.fragment().is_some() {
        return Err(format!(
            "resource {text:?} has a fragment, which RFC 8707 forbids"
        ));
    }
    Ok(())
}

fn optional_audience<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let text = String::deserialize(d)?;
    if text.is_empty() {
        return Err(serde::de::Error::custom(
            "audience may not be empty (leave it out to send none)",
        ));
    }
    Ok(Some(text))
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    let range = || {
        format!(
            "bad duration {text:?}: write one from \"0s\" to \"{MAX_DURATION_TEXT}\", e.g. \"30s\", \"5m\" or \"1h\""
        )
    };
    match humantime::parse_duration(&text) {
        Ok(value) if value <= MAX_DURATION => Ok(value),
        Ok(_) => Err(serde::de::Error::custom(range())),
        Err(e) => Err(serde::de::Error::custom(format!("{} ({e})", range()))),
    }
}

fn positive_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let value = duration(d)?;
    if value.is_zero() {
        return Err(serde::de::Error::custom(format!(
            "duration must be more than zero and at most {MAX_DURATION_TEXT}"
        )));
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

/// A count within `min..=max`. Read as a signed 64-bit number, which is
/// what TOML integers are, so a negative or huge value gets the same
/// message with the range instead of a type error.
fn count<'de, D: Deserializer<'de>>(d: D, min: usize, max: usize) -> Result<usize, D::Error> {
    let value = i64::deserialize(d)?;
    match usize::try_from(value) {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(serde::de::Error::custom(format!(
            "{value} is out of range: write a number from {min} to {max}"
        ))),
    }
}

fn connections<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    count(d, 1, MAX_CONNECTIONS)
}

fn optional_connections<'de, D: Deserializer<'de>>(d: D) -> Result<Option<usize>, D::Error> {
    connections(d).map(Some)
}

fn scope_set_count<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    count(d, 1, MAX_SCOPE_SETS)
}

fn request_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    // A get with a key name and a few scopes needs a few hundred bytes;
    // below this limit the daemon could not be used at all.
    count(d, 256, MAX_REQUEST_BYTES)
}

fn unread_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    count(d, MIN_UNREAD_BYTES, MAX_UNREAD_BYTES)
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

fn optional_token_url<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Url>, D::Error> {
    token_url(d).map(Some)
}

/// An issuer identifier: https (http on loopback, as for `token_url`),
/// and neither query nor fragment (RFC 8414 2).
fn optional_issuer<'de, D: Deserializer<'de>>(d: D) -> Result<Option<IssuerId>, D::Error> {
    let text = String::deserialize(d)?;
    let url =
        Url::parse(&text).map_err(|e| serde::de::Error::custom(format!("bad issuer: {e}")))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(serde::de::Error::custom(
            "issuer may not carry credentials; use client_id and client_secret",
        ));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(serde::de::Error::custom(
            "an issuer identifier has no query or fragment (RFC 8414 2)",
        ));
    }
    match url.scheme() {
        "https" => {}
        "http" if is_loopback(&url) => {}
        "http" => {
            return Err(serde::de::Error::custom(
                "issuer must use https: the discovery document decides where the client \
                 credentials go (http is allowed only for loopback issuers)",
            ))
        }
        other => {
            return Err(serde::de::Error::custom(format!(
                "issuer scheme {other:?} is not supported; use https"
            )))
        }
    }
    Ok(Some(IssuerId { text, url }))
}

fn token_url<'de, D: Deserializer<'de>>(d: D) -> Result<Url, D::Error> {
    let text = String::deserialize(d)?;
    let url = Url::parse(&text)
        // Not quoted: a mistyped URL may still carry a password.
        .map_err(|e| serde::de::Error::custom(format!("bad token_url: {e}")))?;
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

/// `assertion_audience` as written. Spanned in [`RawKey`]: whether
/// `"issuer"` may be used depends on another setting.
struct AudienceSetting(AudienceChoice);

enum AudienceChoice {
    TokenEndpoint,
    /// The key's `issuer`; only a key with one may say so.
    Issuer,
    Named(String),
}

/// `"token_endpoint"`, `"issuer"` or an http(s) URL such as the issuer
/// identifier.
impl<'de> Deserialize<'de> for AudienceSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let choice = match text.as_str() {
            "token_endpoint" => AudienceChoice::TokenEndpoint,
            "issuer" => AudienceChoice::Issuer,
            _ => match Url::parse(&text) {
                Ok(url) if matches!(url.scheme(), "https" | "http") && url.has_host() => {
                    AudienceChoice::Named(text)
                }
                _ => {
                    return Err(serde::de::Error::custom(format!(
                        "bad assertion_audience {text:?}: write \"token_endpoint\", \"issuer\" \
                         or the URL the issuer expects, such as its issuer identifier"
                    )))
                }
            },
        };
        Ok(AudienceSetting(choice))
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
            AuthMethod::PrivateKeyJwt => "private_key_jwt",
            AuthMethod::TlsClientAuth => "tls_client_auth",
            AuthMethod::SelfSignedTlsClientAuth => "self_signed_tls_client_auth",
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
max_unread_bytes = 65536
max_unread_bytes_per_uid = 1048576
log_level = "debug"
audit = false

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

    const ISSUER_KEY: &str = "[keys.a]\nclient_id = \"i\"\nclient_secret = \"s\"\n";

    #[test]
    fn an_issuer_replaces_token_url_and_is_kept_as_written() {
        let config = parse(
            &format!("{ISSUER_KEY}issuer = \"https://auth.example\"\n"),
            Path::new("t"),
        )
        .unwrap();
        let Endpoint::Issuer(issuer) = &config.keys["a"].endpoint else {
            panic!("no issuer");
        };
        // Not "https://auth.example/": documents are compared as strings.
        assert_eq!(issuer.as_str(), "https://auth.example");
        let both = format!("{ISSUER_KEY}issuer = \"https://a\"\ntoken_url = \"https://a/t\"\n");
        assert!(err(&both).starts_with("t.toml:1:1: key \"a\" sets both token_url and issuer"));
        assert!(err(ISSUER_KEY).starts_with("t.toml:1:1: key \"a\" needs token_url"));
        for (bad, why) in [
            ("http://auth.example", "issuer must use https"),
            ("https://a/?x=1", "no query or fragment"),
            ("https://u:p@a/", "may not carry credentials"),
        ] {
            let e = err(&format!("{ISSUER_KEY}issuer = {bad:?}\n"));
            assert!(e.starts_with("t.toml:4:10: ") && e.contains(why), "{e}");
            assert!(!e.contains(":p@"), "{e}");
        }
        assert!(parse(
            &format!("{ISSUER_KEY}issuer = \"http://127.0.0.1:8080\"\n"),
            Path::new("t")
        )
        .is_ok());
    }

    #[test]
    fn a_changed_issuer_is_a_changed_credential() {
        let at = |url: &str| {
            parse(&format!("{ISSUER_KEY}issuer = {url:?}\n"), Path::new("t"))
                .unwrap()
                .keys["a"]
                .clone()
        };
        assert!(at("https://a").same_credential(&at("https://a")));
        assert!(!at("https://a").same_credential(&at("https://a/")));
    }

    #[test]
    fn the_issuer_audience_is_the_configured_issuer() {
        let text = "[keys.a]\nissuer = \"https://auth.example\"\nclient_id = \"i\"\n\
                    auth = \"private_key_jwt\"\nprivate_key_file = \"/k\"\n\
                    assertion_audience = \"issuer\"\n";
        let config = parse(text, Path::new("t")).unwrap();
        let assertion = config.keys["a"].assertion.clone().unwrap();
        assert_eq!(
            assertion.audience,
            Audience::Named("https://auth.example".into())
        );
    }

    #[test]
    fn parses_every_field() {
        let config = parse(FULL, Path::new("t.toml")).unwrap();
        assert_eq!(config.daemon.socket, PathBuf::from("/tmp/t.sock"));
        assert_eq!(config.daemon.socket_mode, 0o600);
        assert_eq!(config.daemon.max_connections, 8);
        assert_eq!(config.daemon.idle_timeout, Duration::from_secs(5));
        assert_eq!(config.daemon.max_unread_bytes, 65536);
        assert_eq!(config.daemon.max_unread_bytes_per_uid, 1 << 20);
        assert_eq!(config.daemon.log_level, LevelFilter::DEBUG);
        assert!(!config.daemon.audit);
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
        assert_eq!(config.daemon.max_unread_bytes, 256 << 10);
        assert_eq!(config.daemon.max_unread_bytes_per_uid, 4 << 20);
        assert_eq!(
            config.daemon.request_timeout_client,
            Duration::from_secs(10)
        );
        assert_eq!(config.daemon.socket_group, None);
        assert_eq!(config.daemon.log_level, LevelFilter::INFO);
        assert!(config.daemon.audit);
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
        let audit = err("[daemon]\naudit = \"no\"\n");
        assert!(
            audit.starts_with("t.toml:2:9: invalid type: string \"no\", expected a boolean"),
            "{audit}"
        );
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

    const KEY: &str = "[keys.a]\ntoken_url = \"https://x/t\"\nclient_id = \"i\"\n";

    #[test]
    fn a_mistyped_secret_is_never_quoted() {
        for (value, kind) in [
            ("86753091234", "a number"),
            ("8675.3091", "a number"),
            ("true", "a boolean"),
            ("[\"hunter2-in-a-list\"]", "an array"),
            ("{ v = \"hunter2-in-a-table\" }", "a table"),
        ] {
            let e = err(&format!("{KEY}client_secret = {value}\n"));
            assert!(
                e.starts_with("t.toml:4:17: client_secret must be a string"),
                "{e}"
            );
            assert!(e.contains(kind), "{e}");
            for part in ["86753091234", "8675", "3091", "hunter2"] {
                assert!(!e.contains(part), "{e}");
            }
        }
    }

    #[test]
    fn absurd_durations_and_counts_are_refused_with_the_range() {
        let e = err("[daemon]\nidle_timeout = \"500000000000years\"\n");
        assert!(e.starts_with("t.toml:2:16: bad duration"), "{e}");
        assert!(e.contains("\"0s\" to \"365d\""), "{e}");
        let e = err("[daemon]\nidle_timeout = \"366d\"\n");
        assert!(e.contains("to \"365d\""), "{e}");
        let e = err(&format!(
            "{KEY}client_secret = \"s\"\nmin_valid = \"99999999999999999999s\"\n"
        ));
        assert!(e.starts_with("t.toml:5:13: bad duration"), "{e}");
        let e = err("[daemon]\nmax_connections = 1000000000000000000\n");
        assert_eq!(
            e,
            "t.toml:2:19: 1000000000000000000 is out of range: write a number from 1 to 1000000"
        );
        assert!(err("[daemon]\nmax_connections = -3\n").contains("from 1 to 1000000"));
        assert!(err("[daemon]\nmax_request_bytes = 1000000000\n").contains("from 256 to 16777216"));
        assert!(err("[daemon]\nmax_unread_bytes = 100\n").contains("from 4096 to 1073741824"));
        assert!(err("[daemon]\nmax_unread_bytes_per_uid = 1073741825\n")
            .contains("from 4096 to 1073741824"));
        let e = err(&format!("{KEY}client_secret = \"s\"\nmax_scope_sets = 0\n"));
        assert!(e.contains("from 1 to 100000"), "{e}");
    }

    #[test]
    fn a_key_with_scopes_never_asks_for_the_issuers_default() {
        let parse_key = |extra: &str| {
            let text = format!("{KEY}client_secret = \"s\"\n{extra}");
            parse(&text, Path::new("t.toml")).map(|mut c| c.keys.remove("a").unwrap())
        };
        let set = |s: &[&str]| {
            ScopeSet::new(s.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap()
        };
        let key = parse_key("scopes = [\"gateway\"]\nprefetch = [[]]\n").unwrap();
        assert_eq!(key.effective_scopes(set(&[])), set(&["gateway"]));
        assert_eq!(key.prefetch, [set(&["gateway"])]);
        let key = parse_key("scopes = [\"fx\", \"gateway\", \"vault\"]\ndefault_scopes = [\"vault\"]\nprefetch = [[], [\"vault\"]]\n").unwrap();
        assert_eq!(key.effective_scopes(set(&[])), set(&["vault"]));
        assert_eq!(key.effective_scopes(set(&["fx"])), set(&["fx"]));
        assert_eq!(key.prefetch, [set(&["vault"])]);
        // Without a `scopes` list the issuer's default set stays available.
        let key = parse_key("").unwrap();
        assert_eq!(key.effective_scopes(set(&[])), set(&[]));
        let e = parse_key("default_scopes = [\"a\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs a `scopes` list"), "{e}");
        let e = parse_key("scopes = [\"a\"]\ndefault_scopes = [\"b\"]\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("default_scopes has [\"b\"]"), "{e}");
        let e = parse_key("scopes = [\"a\"]\ndefault_scopes = []\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("may not be empty"), "{e}");
    }

    #[test]
    fn metrics_listen_is_loopback_unless_the_operator_says_otherwise() {
        let daemon = |lines: &str| parse(&format!("[daemon]\n{lines}"), Path::new("t.toml"));
        let config =
            daemon("metrics_listen = \"127.0.0.1:9464\"\nmetrics_allow_uids = [7]\n").unwrap();
        assert_eq!(
            config.daemon.metrics_listen,
            Some("127.0.0.1:9464".parse().unwrap())
        );
        assert_eq!(config.daemon.metrics_allow_uids, [7]);
        assert!(daemon("metrics_listen = \"[::1]:0\"\n").is_ok());
        assert_eq!(daemon("").unwrap().daemon.metrics_listen, None);
        for address in ["0.0.0.0:9464", "192.0.2.7:9464", "[::]:9464"] {
            let e = err(&format!("[daemon]\nmetrics_listen = \"{address}\"\n"));
            assert!(
                e.starts_with("t.toml:2:18: metrics_listen") && e.contains("not a loopback"),
                "{e}"
            );
            let open =
                format!("metrics_listen = \"{address}\"\nmetrics_listen_non_loopback = true\n");
            assert!(daemon(&open).is_ok(), "{address}");
        }
        for bad in ["localhost:9464", "127.0.0.1", "9464", ""] {
            let e = err(&format!("[daemon]\nmetrics_listen = \"{bad}\"\n"));
            assert!(e.starts_with("t.toml:2:18: bad metrics_listen"), "{e}");
        }
        let e = err("[daemon]\nmetrics_allow_uids = [-1]\n");
        assert!(e.starts_with("t.toml:2:"), "{e}");
    }

    #[test]
    fn a_keys_ca_file_replaces_the_daemons() {
        let text = format!(
            "[daemon]\nca_file = \"/etc/corp.pem\"\n\n{KEY}client_secret = \"s\"\n\n\
             [keys.b]\ntoken_url = \"https://x/t\"\nclient_id = \"i\"\nclient_secret = \"s\"\n\
             ca_file = \"/etc/b.pem\"\nproxy = \"http://proxy.corp:3128\"\n"
        );
        let config = parse(&text, Path::new("t.toml")).unwrap();
        assert_eq!(config.daemon.ca_file, Some(PathBuf::from("/etc/corp.pem")));
        let ca_of = |name: &str| config.keys[name].ca_file.as_ref().unwrap().path.clone();
        assert_eq!(ca_of("a"), PathBuf::from("/etc/corp.pem"));
        assert_eq!(ca_of("b"), PathBuf::from("/etc/b.pem"));
        assert!(config.keys["a"].proxy.is_none());
        let proxy = config.keys["b"].proxy.as_ref().unwrap();
        assert_eq!(proxy.shown(), "http://proxy.corp:3128");
    }

    #[test]
    fn proxy_errors_point_at_the_value_and_never_quote_it() {
        let e = err(&format!(
            "{KEY}client_secret = \"s\"\nproxy = \"ftp://u:hunter2@proxy\"\n"
        ));
        assert!(e.starts_with("t.toml:5:9: proxy scheme \"ftp\""), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
        let e = err(&format!(
            "{KEY}client_secret = \"s\"\nproxy = [\"hunter2\"]\n"
        ));
        assert!(e.starts_with("t.toml:5:9: proxy must be a string"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn a_changed_ca_file_is_a_changed_credential() {
        let pem = |name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, name);
            params.self_signed(&key).unwrap().pem()
        };
        let (one, two) = (pem("one"), pem("two"));
        let path = Path::new("/etc/ca.pem");
        let text = format!("{KEY}client_secret = \"s\"\n");
        let mut key = parse(&text, Path::new("t"))
            .unwrap()
            .keys
            .remove("a")
            .unwrap();
        key.ca_file = Some(CaFile::parse(path, one.as_bytes()).unwrap());
        let mut same = key.clone();
        same.ca_file = Some(CaFile::parse(path, one.as_bytes()).unwrap());
        assert!(key.same_credential(&same));
        let mut grown = key.clone();
        grown.ca_file = Some(CaFile::parse(path, format!("{one}{two}").as_bytes()).unwrap());
        assert_eq!(grown.ca_file.as_ref().unwrap().len(), 2);
        assert!(!key.same_credential(&grown));
        let mut none = key.clone();
        none.ca_file = None;
        assert!(!key.same_credential(&none));
    }

    const MTLS_KEY: &str = "[keys.a]\ntoken_url = \"https://x/t\"\nclient_id = \"i\"\n\
                            auth = \"tls_client_auth\"\n";

    #[test]
    fn mtls_settings_parse_without_reading_the_files() {
        for auth in ["tls_client_auth", "self_signed_tls_client_auth"] {
            let text = MTLS_KEY.replace("tls_client_auth", auth)
                + "client_cert_file = \"/c.crt\"\nclient_key_file = \"/c.key\"\n";
            let key = &parse(&text, Path::new("t")).unwrap().keys["a"];
            assert_eq!(key.auth.to_string(), auth);
            assert!(key.auth.is_mtls());
            let identity = key.client_identity.as_ref().unwrap();
            assert_eq!(identity.cert_file, PathBuf::from("/c.crt"));
            assert_eq!(identity.key_file, PathBuf::from("/c.key"));
            assert!(key.client_secret.expose().is_empty());
        }
        let basic = parse(&format!("{KEY}client_secret = \"s\"\n"), Path::new("t")).unwrap();
        assert!(basic.keys["a"].client_identity.is_none());
        assert!(!basic.keys["a"].auth.is_mtls());
    }

    #[test]
    fn mtls_needs_both_files_and_no_secret() {
        let e = err(&format!("{MTLS_KEY}client_cert_file = \"/c\"\n"));
        assert_eq!(
            e,
            "t.toml:1:1: key \"a\": auth = \"tls_client_auth\" needs client_key_file \
             (client_cert_file: the PEM certificate chain, client_key_file: its PEM private key)"
        );
        let e = err(&format!("{MTLS_KEY}client_key_file = \"/k\"\n"));
        assert!(e.contains("needs client_cert_file"), "{e}");
        let files = "client_cert_file = \"/c\"\nclient_key_file = \"/k\"\n";
        for secret in [
            "client_secret = \"hunter2\"",
            "client_secret_file = \"/s\"",
            "client_secret_credential = \"c\"",
        ] {
            let e = err(&format!("{MTLS_KEY}{files}{secret}\n"));
            let setting = secret.split(' ').next().unwrap();
            assert_eq!(
                e,
                format!(
                    "t.toml:1:1: key \"a\" sets both auth = \"tls_client_auth\" and {setting}; \
                     that method authenticates with client_cert_file and client_key_file and \
                     sends no secret: remove {setting}"
                )
            );
        }
        for setting in ["client_cert_file", "client_key_file"] {
            let e = err(&format!(
                "{KEY}client_secret = \"s\"\nauth = \"post\"\n{setting} = \"/f\"\n"
            ));
            assert_eq!(
                e,
                format!(
                    "t.toml:1:1: key \"a\": {setting} is only used with auth = \
                     \"tls_client_auth\" or \"self_signed_tls_client_auth\" (this key's auth \
                     is \"post\")"
                )
            );
        }
    }

    fn unreadable_identity(_: &Path, key: &Path) -> Result<ClientIdentity, IdentityError> {
        Err(IdentityError::NoKey {
            path: key.to_owned(),
        })
    }

    #[test]
    fn an_unusable_key_file_points_at_its_setting_or_in_a_daemon_makes_the_key_unusable() {
        let text = format!(
            "{MTLS_KEY}client_cert_file = \"/c\"\nclient_key_file = \"/k\"\nallow_uids = [0]\n"
        );
        let secret = |_: &Path| Ok(ClientSecret::new("x".into()));
        let strict = Sources {
            read_identity: Some(unreadable_identity),
            ..Sources::default()
        };
        let e = build(&text, Path::new("t"), strict, secret)
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("t:6:19: key \"a\": client_key_file: /k holds no usable private key"),
            "{e}"
        );
        let lenient = Sources {
            lenient: true,
            ..strict
        };
        let config = build(&text, Path::new("t"), lenient, secret).unwrap();
        let why = config.keys["a"].unusable.as_deref().unwrap();
        assert!(
            why.starts_with("client_key_file: /k holds no usable private key"),
            "{why}"
        );
    }

    #[test]
    fn a_changed_client_certificate_is_a_changed_credential() {
        let pem = || {
            let key = rcgen::KeyPair::generate().unwrap();
            let params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
        };
        let identity = |(cert, key): &(String, String)| {
            ClientIdentity::parse(
                Path::new("/c"),
                cert.as_bytes(),
                Path::new("/k"),
                key.as_bytes(),
            )
            .unwrap()
        };
        let text = format!("{MTLS_KEY}client_cert_file = \"/c\"\nclient_key_file = \"/k\"\n");
        let mut key = parse(&text, Path::new("t"))
            .unwrap()
            .keys
            .remove("a")
            .unwrap();
        let (one, two) = (pem(), pem());
        key.client_identity = Some(identity(&one));
        let mut same = key.clone();
        same.client_identity = Some(identity(&one));
        assert!(key.same_credential(&same));
        let mut changed = key.clone();
        changed.client_identity = Some(identity(&two));
        assert!(!key.same_credential(&changed));
    }

    #[test]
    fn a_credential_reads_from_the_credentials_directory() {
        let text = format!("{KEY}client_secret_credential = \"payments\"\n");
        let seen = std::cell::RefCell::new(Vec::new());
        let reader = |p: &Path| {
            seen.borrow_mut().push(p.to_owned());
            Ok(ClientSecret::new("x".into()))
        };
        build(&text, Path::new("t"), Sources::default(), reader).unwrap();
        let in_service = Sources {
            credentials: Some(Path::new("/run/credentials/tokend.service")),
            ..Sources::default()
        };
        build(&text, Path::new("t"), in_service, reader).unwrap();
        assert_eq!(
            *seen.borrow(),
            [
                PathBuf::from("/etc/tokend/credentials/payments"),
                PathBuf::from("/run/credentials/tokend.service/secret_payments")
            ]
        );
        let e = err(&format!("{KEY}client_secret_credential = \"../x\"\n"));
        assert!(e.contains("must be 1 to 64 letters"), "{e}");
    }

    const JWT_KEY: &str = "[keys.a]\ntoken_url = \"https://x/t\"\nclient_id = \"i\"\n\
                           auth = \"private_key_jwt\"\n";

    #[test]
    fn private_key_jwt_settings_parse_without_reading_the_file() {
        let text = format!(
            "{JWT_KEY}private_key_file = \"/etc/tokend/a.pem\"\nkey_id = \"k1\"\n\
             signing_alg = \"ES256\"\nassertion_audience = \"https://x\"\n"
        );
        let config = parse(&text, Path::new("t.toml")).unwrap();
        let key = &config.keys["a"];
        assert_eq!(key.auth, AuthMethod::PrivateKeyJwt);
        assert_eq!(key.auth.to_string(), "private_key_jwt");
        let assertion = key.assertion.as_ref().unwrap();
        assert_eq!(assertion.key_file, PathBuf::from("/etc/tokend/a.pem"));
        assert_eq!(assertion.key_id.as_deref(), Some("k1"));
        assert_eq!(assertion.signing_alg, Some(SigningAlg::ES256));
        assert_eq!(assertion.audience, Audience::Named("https://x".into()));
        assert!(assertion.key.is_none());
        let plain = parse(
            &format!("{JWT_KEY}private_key_file = \"/k\"\n"),
            Path::new("t"),
        )
        .unwrap();
        let assertion = plain.keys["a"].assertion.clone().unwrap();
        assert_eq!(assertion.audience, Audience::TokenEndpoint);
        assert_eq!(assertion.signing_alg, None);
        // Secret-based keys carry no assertion settings.
        let basic = parse(&format!("{KEY}client_secret = \"s\"\n"), Path::new("t")).unwrap();
        assert!(basic.keys["a"].assertion.is_none());
    }

    #[test]
    fn private_key_jwt_needs_a_key_file_and_no_secret() {
        let e = err(JWT_KEY);
        assert_eq!(
            e,
            "t.toml:1:1: key \"a\": auth = \"private_key_jwt\" needs private_key_file (a PEM private key)"
        );
        for secret in [
            "client_secret = \"s\"",
            "client_secret_file = \"/s\"",
            "client_secret_credential = \"c\"",
        ] {
            let e = err(&format!("{JWT_KEY}private_key_file = \"/k\"\n{secret}\n"));
            let setting = secret.split(' ').next().unwrap();
            assert_eq!(
                e,
                format!(
                    "t.toml:1:1: key \"a\" sets both auth = \"private_key_jwt\" and {setting}; \
                     that method signs with private_key_file and sends no secret: remove {setting}"
                )
            );
        }
        let e = err(&format!(
            "{JWT_KEY}private_key_file = \"/k\"\nkey_id = \"\"\n"
        ));
        assert!(e.contains("key_id may not be empty"), "{e}");
    }

    #[test]
    fn key_settings_without_private_key_jwt_are_refused() {
        for (line, setting) in [
            ("private_key_file = \"/k\"", "private_key_file"),
            ("key_id = \"k\"", "key_id"),
            ("signing_alg = \"RS256\"", "signing_alg"),
            (
                "assertion_audience = \"token_endpoint\"",
                "assertion_audience",
            ),
        ] {
            let e = err(&format!(
                "{KEY}client_secret = \"s\"\nauth = \"post\"\n{line}\n"
            ));
            assert_eq!(
                e,
                format!(
                    "t.toml:1:1: key \"a\": {setting} is only used with auth = \"private_key_jwt\" \
                     (this key's auth is \"post\")"
                )
            );
        }
    }

    #[test]
    fn bad_algorithms_and_audiences_point_at_the_value() {
        let e = err(&format!(
            "{JWT_KEY}private_key_file = \"/k\"\nsigning_alg = \"HS256\"\n"
        ));
        assert!(e.starts_with("t.toml:6:15: unknown variant `HS256`"), "{e}");
        let e = err(&format!(
            "{JWT_KEY}private_key_file = \"/k\"\nassertion_audience = \"issuer\"\n"
        ));
        assert!(
            e.starts_with("t.toml:6:22: assertion_audience = \"issuer\" needs an issuer setting"),
            "{e}"
        );
        let e = err(&format!(
            "{JWT_KEY}private_key_file = \"/k\"\nassertion_audience = \"ftp://x/\"\n"
        ));
        assert!(e.contains("bad assertion_audience \"ftp://x/\""), "{e}");
    }

    fn unreadable(_: &Path) -> Result<Zeroizing<String>, String> {
        Err("failed to open /k: gone".to_owned())
    }

    #[test]
    fn an_unreadable_key_file_is_an_error_or_in_a_daemon_an_unusable_key() {
        let text = format!("{JWT_KEY}private_key_file = \"/k\"\n");
        let secret = |_: &Path| Ok(ClientSecret::new("x".into()));
        let strict = Sources {
            read_key: Some(unreadable),
            ..Sources::default()
        };
        let e = build(&text, Path::new("t"), strict, secret)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "t:1:1: key \"a\": private_key_file: failed to open /k: gone"
        );
        let lenient = Sources {
            lenient: true,
            ..strict
        };
        let config = build(&text, Path::new("t"), lenient, secret).unwrap();
        assert_eq!(
            config.keys["a"].unusable.as_deref(),
            Some("private_key_file: failed to open /k: gone")
        );
    }

    #[test]
    fn a_moved_key_file_is_a_changed_credential() {
        let key = |file: &str| {
            let text = format!("{JWT_KEY}private_key_file = \"{file}\"\n");
            parse(&text, Path::new("t"))
                .unwrap()
                .keys
                .remove("a")
                .unwrap()
        };
        assert!(key("/k1").same_credential(&key("/k1")));
        assert!(!key("/k1").same_credential(&key("/k2")));
    }

    #[test]
    fn resource_takes_one_uri_or_a_list_and_audience_a_string() {
        let key = |extra: &str| {
            let text = format!("{KEY}client_secret = \"s\"\n{extra}");
            parse(&text, Path::new("t.toml")).map(|mut c| c.keys.remove("a").unwrap())
        };
        let one = key("resource = \"https://api.example/\"\n").unwrap();
        assert_eq!(one.resource, [Arc::from("https://api.example/")]);
        assert_eq!(one.audience, None);
        let many = key(
            "resource = [\"https://b.example/\", \"urn:x:a\", \"https://b.example/\"]\naudience = \"https://api\"\n",
        )
        .unwrap();
        assert_eq!(
            many.resource,
            [Arc::from("https://b.example/"), Arc::from("urn:x:a")]
        );
        assert!(many.allows_resource("urn:x:a"));
        assert!(!many.allows_resource("urn:x:b"));
        assert_eq!(many.audience.as_deref(), Some("https://api"));
        assert!(key("").unwrap().resource.is_empty());
    }

    #[test]
    fn a_bad_resource_or_audience_is_reported_where_it_is() {
        let at = |extra: &str| {
            let text = format!("{KEY}client_secret = \"s\"\n{extra}");
            err(&text)
        };
        let line = KEY.lines().count() + 2;
        let relative = at("resource = \"/api\"\n");
        assert!(
            relative.starts_with(&format!("t.toml:{line}:")),
            "{relative}"
        );
        assert!(relative.contains("not an absolute URI"), "{relative}");
        let fragment = at("resource = [\"https://a.example/\", \"https://a.example/#x\"]\n");
        assert!(fragment.contains("has a fragment"), "{fragment}");
        let number = at("resource = 3\n");
        assert!(number.contains("resource must be a URI"), "{number}");
        let empty = at("audience = \"\"\n");
        assert!(empty.starts_with(&format!("t.toml:{line}:")), "{empty}");
        assert!(empty.contains("audience may not be empty"), "{empty}");
    }

    #[test]
    fn a_changed_audience_is_a_changed_credential_and_a_changed_resource_list_is_not() {
        let key = |extra: &str| {
            let text = format!("{KEY}client_secret = \"s\"\n{extra}");
            parse(&text, Path::new("t.toml"))
                .unwrap()
                .keys
                .remove("a")
                .unwrap()
        };
        let before = key("resource = \"urn:a\"\naudience = \"x\"\n");
        assert!(before.same_credential(&key(
            "resource = [\"urn:a\", \"urn:b\"]\naudience = \"x\"\n"
        )));
        assert!(!before.same_credential(&key("resource = \"urn:a\"\naudience = \"y\"\n")));
        assert!(!before.same_credential(&key("resource = \"urn:a\"\n")));
    }

    /// Writes a fresh EC P-256 private key to `path`, mode 0600.
    fn write_signing_key(path: &Path) {
        use std::os::unix::fs::PermissionsExt;
        let pem = rcgen::KeyPair::generate().unwrap().serialize_pem();
        std::fs::write(path, pem).unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }

    #[test]
    fn a_reload_and_the_daemons_clones_share_the_signing_key_rather_than_copy_it() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("a.pem");
        write_signing_key(&key_file);
        let path = dir.path().join("t.toml");
        std::fs::write(
            &path,
            format!(
                "{JWT_KEY}private_key_file = {:?}\n",
                key_file.display().to_string()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let signing = |config: &Config| {
            config.keys["a"]
                .assertion
                .as_ref()
                .unwrap()
                .key
                .clone()
                .unwrap()
        };
        let first = load(&path).unwrap();
        // Each cache and each service holds its own clone of a key's
        // configuration: the same copy of the key.
        let cloned = first.keys["a"].clone();
        let cloned = cloned.assertion.unwrap().key.unwrap();
        assert!(cloned.is_same_copy(&signing(&first)));
        // A reload of an unchanged file keeps the running key.
        let again = reload(&path, &first).unwrap();
        assert!(signing(&again).is_same_copy(&signing(&first)));
        // A changed file is read and parsed anew.
        write_signing_key(&key_file);
        let changed = reload(&path, &again).unwrap();
        assert!(!signing(&changed).is_same_copy(&signing(&again)));
        assert_ne!(signing(&changed), signing(&again));
    }
}
