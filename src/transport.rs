//! How tokend reaches an issuer: whom it trusts, which proxy it goes
//! through, and what a failed TLS handshake means in words.
//!
//! # Trust
//! An issuer's certificate is checked against three sets of roots at once:
//! the Mozilla roots built into tokend (`webpki-roots`), the system's trust
//! store (what `update-ca-certificates` writes under `/etc/ssl/certs`), and
//! the key's `ca_file`, or else `[daemon] ca_file`. A key's own `ca_file`
//! replaces the daemon's, as every per-key setting replaces its default.
//!
//! The system store is read by `rustls-native-certs`, through reqwest's
//! `rustls-tls-native-roots` feature, rather than by
//! `rustls-platform-verifier`. tokend runs on Linux only, where the platform
//! verifier is a WebPKI verifier over the very roots `rustls-native-certs`
//! loads: it would add nothing but a TLS configuration of our own
//! (`use_preconfigured_tls`), and it does not take the bundled roots beside
//! the system's. With the feature, reqwest loads the system roots next to
//! its bundled ones and takes a `ca_file` through `add_root_certificate`, so
//! tokend builds no rustls configuration at all. `rustls-native-certs` also
//! honours `SSL_CERT_FILE` and `SSL_CERT_DIR` (they replace the system
//! store), as OpenSSL does. The store is read when a client is built: at
//! start and at every reload.
//!
//! # Proxies
//! reqwest honours `HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY` (either case)
//! and `NO_PROXY` the way curl reads them, for every client without a proxy
//! of its own. A key's `proxy` replaces them for that key's issuer, and
//! `NO_PROXY` does not apply to it: the operator named it for this issuer.
//! A proxy URL may carry a user and password, so [`ProxyUrl`] is held like
//! a secret: wiped on drop, shown without them, and scrubbed from issuer
//! and proxy text in any encoding that decodes to them
//! ([`ProxyUrl::add_secrets_to`], the same [`Scrubber`] as the client
//! secret's).
//!
//! # Client certificates
//! A key with `auth = "tls_client_auth"` or `"self_signed_tls_client_auth"`
//! (RFC 8705) proves who it is with a TLS client certificate
//! ([`ClientIdentity`]). Its private key is read like a secret file (same
//! ownership and mode rules), checked against the certificate, and handed
//! to reqwest as an [`reqwest::Identity`]; tokend's own copies of the key
//! text are wiped. What is kept to notice a changed file on reload is a
//! SHA-256 digest of the certificate and key, not the key.
//!
//! # Clients
//! Keys with different trust, proxy or client certificate need different
//! HTTP clients.
//! [`Clients`] holds one per distinct [`Route`] of a configuration, built
//! once (not per request); a reload builds a new set beside the old one.
//!
//! This module does not read the configuration file, and knows nothing of
//! token requests.

use std::collections::HashMap;
use std::error::Error as StdError;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use base64::Engine as _;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::{AlertDescription, CertificateError, InconsistentKeys, RootCertStore};
use sha2::{Digest, Sha256};
use url::Url;
use zeroize::{Zeroize, Zeroizing};

use crate::config::KeyConfig;
use crate::scrub::Scrubber;
use crate::secret_file::{self, Exposure, FileError};

/// A CA bundle is a few KiB, a distribution's whole store a few hundred;
/// anything far larger is not a bundle.
const MAX_CA_FILE_BYTES: usize = 4 << 20;
/// A client certificate chain is a few KiB, and its key (RSA 8192 in PEM
/// is under 7 KiB) less: far larger files are not what the settings name.
const MAX_CLIENT_CERT_BYTES: usize = 1 << 20;
const MAX_CLIENT_KEY_BYTES: usize = 64 << 10;

/// The certificates of a `ca_file`, as read when the configuration was
/// loaded: a reload re-reads them, and a change counts as a changed
/// credential.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CaFile {
    pub path: PathBuf,
    /// DER, in file order.
    certs: Arc<[Vec<u8>]>,
}

impl fmt::Debug for CaFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "CaFile({}, {} certificates)",
            self.path.display(),
            self.certs.len()
        )
    }
}

impl CaFile {
    /// Reads and checks the PEM file at `path`. The file holds nothing
    /// secret; it is opened like one all the same (without blocking, a
    /// regular file, bounded), so a FIFO cannot hang a reload, and refused
    /// when anyone but root and tokend's own user could change or replace
    /// it: whoever could would choose whom tokend trusts.
    pub fn read(path: &Path) -> Result<CaFile, String> {
        let file = secret_file::read(path, MAX_CA_FILE_BYTES).map_err(|e| e.to_string())?;
        CaFile::parse(path, file.text.as_bytes())
    }

    /// Checks `pem`: one or more certificates, each usable as a trust
    /// anchor. Sections of other kinds (a key, parameters) are skipped.
    pub fn parse(path: &Path, pem: &[u8]) -> Result<CaFile, String> {
        let shown = path.display();
        let certs = CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{shown} is not a PEM file: {e}"))?;
        if certs.is_empty() {
            return Err(format!(
                "{shown} holds no certificate (a PEM \"BEGIN CERTIFICATE\" block)"
            ));
        }
        let mut store = RootCertStore::empty();
        for (n, cert) in certs.iter().enumerate() {
            store.add(cert.clone()).map_err(|e| {
                format!(
                    "certificate {} of {shown} cannot be a trust anchor: {e}",
                    n + 1
                )
            })?;
        }
        Ok(CaFile {
            path: path.to_owned(),
            certs: certs.iter().map(|c| c.as_ref().to_vec()).collect(),
        })
    }

    /// A `ca_file` named but not read, for configurations parsed without
    /// touching the file system ([`crate::config::parse`]).
    pub(crate) fn unread(path: &Path) -> CaFile {
        CaFile {
            path: path.to_owned(),
            certs: Arc::from(Vec::new()),
        }
    }

    pub fn len(&self) -> usize {
        self.certs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.certs.is_empty()
    }
}

/// A key's `proxy`: an `http://` URL that may carry a user and password.
/// Wiped on drop; `Debug` shows it without credentials. Parsed once: every
/// parse would leave a copy of the password in memory that is not wiped.
#[derive(Clone)]
pub struct ProxyUrl {
    url: Zeroizing<String>,
    /// `http://HOST:PORT`.
    shown: String,
    /// The user and password, when the URL names either.
    credentials: Option<Arc<ProxyCredentials>>,
}

impl ProxyUrl {
    /// Checks `text`. Errors never repeat it: it may hold a password.
    pub fn parse(text: &str) -> Result<ProxyUrl, String> {
        let url = Url::parse(text).map_err(|e| format!("bad proxy URL: {e}"))?;
        if url.scheme() != "http" {
            return Err(format!(
                "proxy scheme {:?} is not supported; write http://HOST:PORT",
                url.scheme()
            ));
        }
        let host = url.host_str().unwrap_or("").to_owned();
        if host.is_empty() {
            return Err("proxy URL has no host; write http://HOST:PORT".to_owned());
        }
        if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
            return Err(
                "a proxy URL is http://HOST:PORT (with USER:PASSWORD@ if it needs them), \
                 without a path or query"
                    .to_owned(),
            );
        }
        let shown = match url.port_or_known_default() {
            Some(port) => format!("http://{host}:{port}"),
            None => format!("http://{host}"),
        };
        let credentials = ProxyCredentials::of(&url).map(Arc::new);
        // Moves the URL's own buffer: nothing of it is left unwiped.
        let url = Zeroizing::new(String::from(url));
        Ok(ProxyUrl {
            url,
            shown,
            credentials,
        })
    }

    /// Whether the URL names a user or a password.
    pub fn has_credentials(&self) -> bool {
        self.credentials.is_some()
    }

    /// `http://HOST:PORT`, for messages.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Has `scrubber` look for the URL's credentials, when it has any.
    pub fn add_secrets_to(&self, scrubber: &mut Scrubber) {
        if let Some(credentials) = &self.credentials {
            credentials.add_to(scrubber);
        }
    }
}

/// A proxy URL's user and password, `%XX` decoded as the HTTP stack
/// decodes them before it encodes them for `Proxy-Authorization`.
struct ProxyCredentials {
    user: Zeroizing<String>,
    password: Zeroizing<String>,
}

impl ProxyCredentials {
    /// `None` when `url` names neither.
    fn of(url: &Url) -> Option<ProxyCredentials> {
        let user = percent_decode(url.username());
        let password = url.password().map(percent_decode).unwrap_or_default();
        (!user.is_empty() || !password.is_empty()).then_some(ProxyCredentials { user, password })
    }

    /// The password in any encoding (or, for a URL with a user alone, the
    /// user: some proxies take a token there), the `user:password` pair,
    /// and its base64 as `Proxy-Authorization` carries it. The URL needs
    /// no entry of its own: the password in it is found whatever escapes
    /// it was written with.
    fn add_to(&self, scrubber: &mut Scrubber) {
        let (user, password) = (self.user.as_str(), self.password.as_str());
        let (secret, public) = if password.is_empty() {
            (user, 0)
        } else {
            (password, user.len() + 1)
        };
        scrubber.add_secret(secret);
        let mut pair = Zeroizing::new(String::with_capacity(user.len() + 1 + password.len()));
        pair.push_str(user);
        pair.push(':');
        pair.push_str(password);
        scrubber.add_form(&pair, public);
        scrubber.add_base64(pair.as_bytes(), public);
    }
}

/// `%XX` sequences decoded, as the HTTP stack decodes a URL's user and
/// password before it encodes them for `Proxy-Authorization`.
fn percent_decode(text: &str) -> Zeroizing<String> {
    Zeroizing::new(
        percent_encoding::percent_decode_str(text)
            .decode_utf8_lossy()
            .into_owned(),
    )
}

impl PartialEq for ProxyUrl {
    fn eq(&self, other: &ProxyUrl) -> bool {
        *self.url == *other.url
    }
}

impl Eq for ProxyUrl {}

impl Hash for ProxyUrl {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.url.as_str().hash(state);
    }
}

impl fmt::Debug for ProxyUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rest = self.shown.trim_start_matches("http://");
        let credentials = if self.has_credentials() {
            "[redacted]@"
        } else {
            ""
        };
        write!(f, "ProxyUrl(http://{credentials}{rest})")
    }
}

/// Has `scrubber` look for the proxy credentials of `key`: its own
/// proxy's, or when it has none, those of the proxy variables in the
/// environment (read once: tokend never changes its environment).
pub(crate) fn add_proxy_secrets(key: &KeyConfig, scrubber: &mut Scrubber) {
    static FROM_ENVIRONMENT: OnceLock<Vec<ProxyCredentials>> = OnceLock::new();
    if let Some(proxy) = &key.proxy {
        return proxy.add_secrets_to(scrubber);
    }
    let found = FROM_ENVIRONMENT.get_or_init(|| {
        const VARIABLES: [&str; 6] = [
            "HTTPS_PROXY",
            "https_proxy",
            "HTTP_PROXY",
            "http_proxy",
            "ALL_PROXY",
            "all_proxy",
        ];
        VARIABLES
            .iter()
            .filter_map(|name| std::env::var(name).ok().map(Zeroizing::new))
            .filter_map(|text| environment_credentials(&text))
            .collect()
    });
    for credentials in found {
        credentials.add_to(scrubber);
    }
}

/// The credentials in a proxy variable's value, read as the HTTP stack
/// reads it: any scheme, and `http://` when it has none.
fn environment_credentials(text: &str) -> Option<ProxyCredentials> {
    let full = if text.contains("://") {
        Zeroizing::new(text.to_owned())
    } else {
        Zeroizing::new(format!("http://{text}"))
    };
    ProxyCredentials::of(&Url::parse(&full).ok()?)
}

/// Why a key's client certificate or private key cannot be used. Messages
/// name files and what is wrong with them, never the key's text.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(transparent)]
    ReadCert(FileError),
    #[error(transparent)]
    ReadKey(FileError),
    #[error("{} {exposure}; {advice}", path.display())]
    Exposed {
        path: PathBuf,
        exposure: Exposure,
        advice: String,
    },
    #[error("{} holds no certificate (a PEM \"BEGIN CERTIFICATE\" block)", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{} is not a PEM certificate chain: {cause}", path.display())]
    BadCertificate { path: PathBuf, cause: String },
    /// Without the parser's words: they could quote the key file's text.
    #[error(
        "{} holds no usable private key (a PEM \"BEGIN PRIVATE KEY\", \"BEGIN RSA PRIVATE KEY\" \
         or \"BEGIN EC PRIVATE KEY\" block, not encrypted)",
        path.display()
    )]
    NoKey { path: PathBuf },
    #[error("the private key in {} is not one TLS can sign with ({cause})", path.display())]
    Unsupported { path: PathBuf, cause: String },
    #[error(
        "the private key in {} does not belong to the first certificate of {}",
        key.display(),
        cert.display()
    )]
    Mismatch { cert: PathBuf, key: PathBuf },
    #[error("the HTTP stack refused the client certificate: {0}")]
    Http(String),
}

impl IdentityError {
    /// Whether the fix is in `client_key_file`; otherwise it is in
    /// `client_cert_file` (a key that is not the certificate's included).
    pub fn about_the_key(&self) -> bool {
        matches!(
            self,
            IdentityError::ReadKey(_)
                | IdentityError::Exposed { .. }
                | IdentityError::NoKey { .. }
                | IdentityError::Unsupported { .. }
        )
    }
}

/// A key's TLS client certificate and private key (RFC 8705), as read when
/// the configuration was loaded. Equal when the paths are and the files
/// held the same text: a reload that changes either is a changed credential.
#[derive(Clone)]
pub struct ClientIdentity {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The chain and key as reqwest takes them; `None` when the files were
    /// not read ([`crate::config::parse`]). Shared: a clone of the key
    /// config (one per request, for its client's lookup) must not copy
    /// the key, which reqwest's type would not wipe.
    identity: Option<Arc<reqwest::Identity>>,
    /// SHA-256 over the chain's and the key's DER: tells a changed file
    /// apart without keeping the key's text around.
    digest: [u8; 32],
}

impl ClientIdentity {
    /// Reads `cert_file` (a PEM chain, leaf first) and `key_file` (a PEM
    /// private key, held to the rules of a secret file), and checks that
    /// the key belongs to the leaf.
    pub fn read(cert_file: &Path, key_file: &Path) -> Result<ClientIdentity, IdentityError> {
        let chain =
            secret_file::read(cert_file, MAX_CLIENT_CERT_BYTES).map_err(IdentityError::ReadCert)?;
        let key =
            secret_file::read(key_file, MAX_CLIENT_KEY_BYTES).map_err(IdentityError::ReadKey)?;
        if let Some(exposure) = key.exposure {
            return Err(IdentityError::Exposed {
                path: key_file.to_owned(),
                advice: exposure.advice(key_file),
                exposure,
            });
        }
        ClientIdentity::parse(
            cert_file,
            chain.text.as_bytes(),
            key_file,
            key.text.as_bytes(),
        )
    }

    /// Checks the PEM texts of a chain and its key and prepares them for
    /// the HTTP stack.
    pub fn parse(
        cert_file: &Path,
        chain: &[u8],
        key_file: &Path,
        key: &[u8],
    ) -> Result<ClientIdentity, IdentityError> {
        let certs = CertificateDer::pem_slice_iter(chain)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| IdentityError::BadCertificate {
                path: cert_file.to_owned(),
                cause: e.to_string(),
            })?;
        if certs.is_empty() {
            return Err(IdentityError::NoCertificate {
                path: cert_file.to_owned(),
            });
        }
        let mut key = PrivateKeyDer::from_pem_slice(key).map_err(|_| IdentityError::NoKey {
            path: key_file.to_owned(),
        })?;
        let checked = check_pair(&certs, &key, cert_file, key_file);
        let prepared = checked.and_then(|()| {
            let pem = identity_pem(&certs, &key);
            reqwest::Identity::from_pem(pem.as_bytes())
                .map_err(|e| IdentityError::Http(e.to_string()))
        });
        let digest = digest(&certs, &key);
        // `PrivateKeyDer` does not wipe itself on drop.
        key.zeroize();
        Ok(ClientIdentity {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            identity: Some(Arc::new(prepared?)),
            digest,
        })
    }

    /// Files named but not read, for configurations parsed without
    /// touching the file system.
    pub(crate) fn unread(cert_file: &Path, key_file: &Path) -> ClientIdentity {
        ClientIdentity {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            identity: None,
            digest: [0; 32],
        }
    }
}

/// Refuses a key TLS cannot sign with, or one that is not the leaf
/// certificate's: the issuer would end the handshake with nothing an
/// operator could act on.
fn check_pair(
    certs: &[CertificateDer<'static>],
    key: &PrivateKeyDer<'static>,
    cert_file: &Path,
    key_file: &Path,
) -> Result<(), IdentityError> {
    // By reference: rustls' by-value loaders would drop a copy of the key
    // without wiping it.
    let signing = rustls::crypto::ring::sign::any_supported_type(key).map_err(|e| {
        IdentityError::Unsupported {
            path: key_file.to_owned(),
            cause: e.to_string(),
        }
    })?;
    match CertifiedKey::new(certs.to_vec(), signing).keys_match() {
        // A key type whose public half rustls cannot derive: the issuer
        // will judge.
        Ok(()) | Err(rustls::Error::InconsistentKeys(InconsistentKeys::Unknown)) => Ok(()),
        Err(rustls::Error::InconsistentKeys(_)) => Err(IdentityError::Mismatch {
            cert: cert_file.to_owned(),
            key: key_file.to_owned(),
        }),
        Err(other) => Err(IdentityError::BadCertificate {
            path: cert_file.to_owned(),
            cause: other.to_string(),
        }),
    }
}

/// The chain and key as one PEM text, which is what reqwest's rustls
/// backend takes. Rebuilt from the parsed DER rather than the files' text,
/// which may hold sections reqwest refuses (`EC PARAMETERS`, comments).
/// Sized up front so the buffer holding the key never grows and leaves a
/// copy in freed memory.
fn identity_pem(certs: &[CertificateDer<'_>], key: &PrivateKeyDer<'_>) -> Zeroizing<String> {
    let label = match key {
        PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
        PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
        _ => "PRIVATE KEY",
    };
    let blocks = certs
        .iter()
        .map(|c| ("CERTIFICATE", c.as_ref()))
        .chain(std::iter::once((label, key.secret_der())));
    let room: usize = certs
        .iter()
        .map(|c| c.as_ref().len())
        .chain(std::iter::once(key.secret_der().len()))
        .map(|len| len.div_ceil(3) * 4 + 80)
        .sum();
    let mut pem = Zeroizing::new(String::with_capacity(room));
    for (label, der) in blocks {
        pem.push_str("-----BEGIN ");
        pem.push_str(label);
        pem.push_str("-----\n");
        base64::engine::general_purpose::STANDARD.encode_string(der, &mut pem);
        pem.push_str("\n-----END ");
        pem.push_str(label);
        pem.push_str("-----\n");
    }
    pem
}

fn digest(certs: &[CertificateDer<'_>], key: &PrivateKeyDer<'_>) -> [u8; 32] {
    let mut hasher = Sha256::new();
    for der in certs
        .iter()
        .map(|c| c.as_ref())
        .chain(std::iter::once(key.secret_der()))
    {
        // Lengths first, so no two different lists hash alike.
        hasher.update((der.len() as u64).to_be_bytes());
        hasher.update(der);
    }
    hasher.finalize().into()
}

impl PartialEq for ClientIdentity {
    fn eq(&self, other: &ClientIdentity) -> bool {
        self.cert_file == other.cert_file
            && self.key_file == other.key_file
            && self.digest == other.digest
    }
}

impl Eq for ClientIdentity {}

impl Hash for ClientIdentity {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.cert_file.hash(state);
        self.key_file.hash(state);
        self.digest.hash(state);
    }
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "ClientIdentity({}, {})",
            self.cert_file.display(),
            self.key_file.display()
        )
    }
}

/// What a key's requests go through: its trust anchors, its proxy and its
/// client certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
struct Route {
    ca_file: Option<CaFile>,
    proxy: Option<ProxyUrl>,
    identity: Option<ClientIdentity>,
}

impl Route {
    fn of(key: &KeyConfig) -> Route {
        Route {
            ca_file: key.ca_file.clone(),
            proxy: key.proxy.clone(),
            identity: key.client_identity.clone(),
        }
    }
}

/// One HTTP client per distinct [`Route`]. Cheap to clone; each client has
/// its own connection pool.
#[derive(Clone)]
pub(crate) struct Clients {
    by_route: Arc<HashMap<Route, reqwest::Client>>,
}

impl Clients {
    /// Clients for `keys`, and one for keys with no `ca_file`, `proxy` or
    /// client certificate.
    pub(crate) fn for_keys<'a>(
        keys: impl IntoIterator<Item = &'a KeyConfig>,
    ) -> Result<Clients, reqwest::Error> {
        let mut by_route = HashMap::new();
        let routes = std::iter::once(Route::default()).chain(keys.into_iter().map(Route::of));
        for route in routes {
            if let std::collections::hash_map::Entry::Vacant(slot) = by_route.entry(route) {
                let client = client(slot.key())?;
                slot.insert(client);
            }
        }
        Ok(Clients {
            by_route: Arc::new(by_route),
        })
    }

    /// The client for `key`; `None` for a key these clients were not built
    /// for.
    pub(crate) fn get(&self, key: &KeyConfig) -> Option<&reqwest::Client> {
        self.by_route.get(&Route::of(key))
    }
}

fn client(route: &Route) -> Result<reqwest::Client, reqwest::Error> {
    let mut builder = reqwest::Client::builder()
        // A redirect would re-send the credentials somewhere the
        // operator did not configure.
        .redirect(reqwest::redirect::Policy::none())
        .user_agent(concat!("tokend/", env!("CARGO_PKG_VERSION")));
    if let Some(ca_file) = &route.ca_file {
        for der in ca_file.certs.iter() {
            builder = builder.add_root_certificate(reqwest::Certificate::from_der(der)?);
        }
    }
    if let Some(proxy) = &route.proxy {
        // Adding a proxy also turns the environment's off for this client.
        builder = builder.proxy(reqwest::Proxy::all(proxy.url.as_str())?);
    }
    if let Some(identity) = route.identity.as_ref().and_then(|i| i.identity.as_deref()) {
        // reqwest takes its own copy, once per client built.
        builder = builder.identity(identity.clone());
    }
    builder.build()
}

/// What an issuer's alert means. The certificate alerts a client receives
/// are about its own certificate: an issuer that checks client
/// certificates (RFC 8705) sends them when it refuses one.
fn describe_alert(alert: AlertDescription) -> String {
    match alert {
        AlertDescription::CertificateRequired => format!(
            "the issuer requires a client certificate ({alert:?}); set auth = \"tls_client_auth\" \
             with client_cert_file and client_key_file"
        ),
        AlertDescription::BadCertificate
        | AlertDescription::UnsupportedCertificate
        | AlertDescription::CertificateRevoked
        | AlertDescription::CertificateExpired
        | AlertDescription::CertificateUnknown
        | AlertDescription::UnknownCA
        | AlertDescription::AccessDenied => {
            format!("the issuer refused the client certificate ({alert:?})")
        }
        other => format!("the issuer ended the handshake ({other:?})"),
    }
}

/// What went wrong in a TLS handshake, in an operator's words, when `err`
/// failed in one.
pub(crate) fn tls_failure(err: &(dyn StdError + 'static)) -> Option<String> {
    let mut cause = Some(err);
    while let Some(current) = cause {
        if let Some(tls) = rustls_error(current) {
            return Some(describe(tls));
        }
        cause = current.source();
    }
    None
}

/// Whether the peer dropped the connection: closed it without TLS's
/// `close_notify` (rustls reports an unexpected end of file), or reset it
/// (what a close with our request still unread sends).
pub(crate) fn dropped_by_peer(err: &(dyn StdError + 'static)) -> bool {
    use std::io::ErrorKind::{ConnectionReset, UnexpectedEof};
    let mut cause = Some(err);
    while let Some(current) = cause {
        if let Some(io) = current.downcast_ref::<std::io::Error>() {
            if matches!(io.kind(), UnexpectedEof | ConnectionReset) {
                return true;
            }
            if let Some(inner) = io.get_ref() {
                if dropped_by_peer(inner) {
                    return true;
                }
            }
        }
        cause = current.source();
    }
    false
}

/// `err` as rustls' error, looking inside `io::Error`s: the HTTP stack
/// wraps rustls' error in one `io::Error` inside another, and
/// `io::Error::source()` skips the error it wraps, so walking `source()`
/// alone never meets it.
fn rustls_error<'a>(err: &'a (dyn StdError + 'static)) -> Option<&'a rustls::Error> {
    if let Some(tls) = err.downcast_ref::<rustls::Error>() {
        return Some(tls);
    }
    let inner = err.downcast_ref::<std::io::Error>()?.get_ref()?;
    rustls_error(inner)
}

fn describe(err: &rustls::Error) -> String {
    let certificate = match err {
        rustls::Error::InvalidCertificate(problem) => problem,
        rustls::Error::AlertReceived(alert) => return describe_alert(*alert),
        other => return format!("the handshake failed: {other}"),
    };
    match certificate {
        CertificateError::UnknownIssuer => {
            "the issuer's certificate is signed by an unknown CA (set ca_file)".to_owned()
        }
        CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
            "the issuer's certificate is not valid for its host name".to_owned()
        }
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            "the issuer's certificate has expired".to_owned()
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "the issuer's certificate is not valid yet (is the clock right?)".to_owned()
        }
        other => format!("the issuer's certificate was refused: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls_are_checked_without_being_quoted() {
        for bad in [
            "socks5://u:hunter2@proxy:1080",
            "https://u:hunter2@proxy:3128",
            "http://u:hunter2@proxy:3128/path",
            "http://u:hunter2@proxy:3128/?q",
            "proxy:3128",
            "hunter2",
        ] {
            let e = ProxyUrl::parse(bad).unwrap_err();
            assert!(!e.contains("hunter2"), "{e}");
        }
        let plain = ProxyUrl::parse("http://proxy.corp:3128").unwrap();
        assert!(!plain.has_credentials());
        let mut scrubber = Scrubber::none();
        plain.add_secrets_to(&mut scrubber);
        assert!(scrubber.is_empty());
        assert_eq!(plain.shown(), "http://proxy.corp:3128");
        assert_eq!(format!("{plain:?}"), "ProxyUrl(http://proxy.corp:3128)");
    }

    #[test]
    fn proxy_credentials_never_show_and_every_form_is_scrubbed() {
        let proxy = ProxyUrl::parse("http://alice:p%40ss%3Aw0rd@proxy.corp:3128").unwrap();
        assert!(proxy.has_credentials());
        assert_eq!(proxy.shown(), "http://proxy.corp:3128");
        let debug = format!("{proxy:?}");
        assert_eq!(debug, "ProxyUrl(http://[redacted]@proxy.corp:3128)");
        let mut scrubber = Scrubber::none();
        proxy.add_secrets_to(&mut scrubber);
        let basic = base64::engine::general_purpose::STANDARD.encode("alice:p@ss:w0rd");
        for form in [
            "p@ss:w0rd",
            "p%40ss%3Aw0rd",
            "p%40ss%3aw0rd",
            "alice:p@ss:w0rd",
            basic.as_str(),
        ] {
            assert_eq!(
                scrubber.scrub(&format!("<{form}>")),
                "<[redacted]>",
                "{form}"
            );
        }
        let url = "http://alice:p%40ss%3Aw0rd@proxy.corp:3128";
        assert_eq!(scrubber.scrub(url), "http://[redacted]@proxy.corp:3128");
        // The user alone is not the credential.
        assert_eq!(scrubber.scrub("user alice"), "user alice");
    }

    #[test]
    fn a_user_without_a_password_is_the_credential() {
        let proxy = ProxyUrl::parse("http://tok3n-in-user@proxy:3128").unwrap();
        let mut scrubber = Scrubber::none();
        proxy.add_secrets_to(&mut scrubber);
        assert_eq!(scrubber.scrub("as tok3n-in-user"), "as [redacted]");
    }

    #[test]
    fn credentials_in_proxy_variables_are_found_as_curl_reads_them() {
        let basic = base64::engine::general_purpose::STANDARD.encode("u:s3cret-value");
        for value in [
            "u:s3cret-value@proxy:3128",
            "https://u:s3cret-value@proxy:3128",
            "socks5h://u:s3cret%2Dvalue@p",
        ] {
            let mut scrubber = Scrubber::none();
            environment_credentials(value)
                .expect("credentials")
                .add_to(&mut scrubber);
            for form in ["s3cret-value", "s3cret%2dvalue", basic.as_str()] {
                let shown = scrubber.scrub(&format!("({form})"));
                assert_eq!(shown, "([redacted])", "{value}: {form}");
            }
        }
        assert!(environment_credentials("http://proxy:3128").is_none());
    }

    #[test]
    fn a_ca_file_needs_a_certificate() {
        let path = Path::new("/etc/ca.pem");
        let e = CaFile::parse(path, b"").unwrap_err();
        assert!(e.contains("holds no certificate"), "{e}");
        let e = CaFile::parse(path, b"not pem at all\n").unwrap_err();
        assert!(e.contains("holds no certificate"), "{e}");
        let garbage = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let e = CaFile::parse(path, garbage).unwrap_err();
        assert!(e.contains("certificate 1 of /etc/ca.pem"), "{e}");
    }

    /// A client certificate and its PKCS#8 key, PEM, from a fresh CA.
    fn client_pem() -> (String, String) {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.self_signed(&ca_key).unwrap();
        let ca = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    fn identity(cert: &str, key: &str) -> Result<ClientIdentity, IdentityError> {
        ClientIdentity::parse(
            Path::new("/c.crt"),
            cert.as_bytes(),
            Path::new("/c.key"),
            key.as_bytes(),
        )
    }

    #[test]
    fn a_client_certificate_and_its_key_are_checked_and_compared_by_content() {
        let (cert, key) = client_pem();
        let one = identity(&cert, &key).unwrap();
        assert!(one.identity.is_some());
        assert_eq!(one, identity(&cert, &key).unwrap());
        assert_eq!(format!("{one:?}"), "ClientIdentity(/c.crt, /c.key)");
        let (other_cert, other_key) = client_pem();
        assert_ne!(one, identity(&other_cert, &other_key).unwrap());
        let moved = ClientIdentity::parse(
            Path::new("/elsewhere.crt"),
            cert.as_bytes(),
            Path::new("/c.key"),
            key.as_bytes(),
        )
        .unwrap();
        assert_ne!(one, moved);

        let e = identity(&cert, &other_key).unwrap_err().to_string();
        assert_eq!(
            e,
            "the private key in /c.key does not belong to the first certificate of /c.crt"
        );
        let e = identity(&key, &key).unwrap_err().to_string();
        assert!(e.starts_with("/c.crt holds no certificate"), "{e}");
        let e = identity(&cert, &cert).unwrap_err().to_string();
        assert!(e.starts_with("/c.key holds no usable private key"), "{e}");
        // A damaged key is named, never quoted.
        let damaged = key.replacen('M', "!", 1);
        let e = identity(&cert, &damaged).unwrap_err().to_string();
        assert!(e.starts_with("/c.key holds no usable private key"), "{e}");
        for line in key.lines().filter(|l| !l.starts_with("-----")) {
            assert!(!e.contains(line), "{e}");
        }
    }

    /// `openssl ecparam -genkey` writes EC PARAMETERS before a SEC1 key,
    /// a section reqwest's own PEM reader refuses.
    #[test]
    fn an_openssl_sec1_key_with_parameters_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let (key, cert) = (dir.path().join("k.pem"), dir.path().join("c.pem"));
        let run = |args: &[&std::ffi::OsStr]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .output()
                .unwrap();
            assert!(out.status.success(), "{out:?}");
        };
        run(&[
            "ecparam".as_ref(),
            "-name".as_ref(),
            "prime256v1".as_ref(),
            "-genkey".as_ref(),
            "-out".as_ref(),
            key.as_os_str(),
        ]);
        run(&[
            "req".as_ref(),
            "-x509".as_ref(),
            "-key".as_ref(),
            key.as_os_str(),
            "-subj".as_ref(),
            "/CN=sec1".as_ref(),
            "-days".as_ref(),
            "1".as_ref(),
            "-out".as_ref(),
            cert.as_os_str(),
        ]);
        let key = std::fs::read_to_string(&key).unwrap();
        assert!(key.contains("BEGIN EC PARAMETERS"), "{key}");
        let cert = std::fs::read_to_string(&cert).unwrap();
        assert!(identity(&cert, &key).unwrap().identity.is_some());
    }

    #[test]
    fn certificate_alerts_are_told_as_refusals() {
        let refused = describe_alert(AlertDescription::UnknownCA);
        assert_eq!(
            refused,
            "the issuer refused the client certificate (UnknownCA)"
        );
        let wanted = describe_alert(AlertDescription::CertificateRequired);
        assert!(
            wanted.starts_with("the issuer requires a client certificate"),
            "{wanted}"
        );
        let other = describe_alert(AlertDescription::ProtocolVersion);
        assert_eq!(other, "the issuer ended the handshake (ProtocolVersion)");
    }

    #[test]
    fn a_dropped_connection_is_found_inside_io_errors() {
        let reset = std::io::Error::from(std::io::ErrorKind::ConnectionReset);
        assert!(dropped_by_peer(&std::io::Error::other(reset)));
        let eof = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no close_notify");
        assert!(dropped_by_peer(&eof));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(!dropped_by_peer(&refused));
    }

    #[test]
    fn unknown_issuer_is_found_inside_an_io_error() {
        let tls = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, tls);
        #[derive(Debug)]
        struct Outer(std::io::Error);
        impl fmt::Display for Outer {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("error sending request")
            }
        }
        impl StdError for Outer {
            fn source(&self) -> Option<&(dyn StdError + 'static)> {
                Some(&self.0)
            }
        }
        // As the HTTP stack nests them: an io::Error in an io::Error.
        let io = std::io::Error::other(io);
        let found = tls_failure(&Outer(io)).unwrap();
        assert_eq!(
            found,
            "the issuer's certificate is signed by an unknown CA (set ca_file)"
        );
        let plain = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(tls_failure(&plain), None);
    }
}
