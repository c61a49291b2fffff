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
//! a secret: wiped on drop, shown without them, and its forms on the wire
//! are scrubbed from issuer text ([`ProxyUrl::secret_forms`]).
//!
//! # Clients
//! Keys with different trust or proxy settings need different HTTP clients.
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
use rustls::pki_types::CertificateDer;
use rustls::{CertificateError, RootCertStore};
use url::Url;
use zeroize::Zeroizing;

use crate::config::KeyConfig;
use crate::secret_file;

/// A CA bundle is a few KiB, a distribution's whole store a few hundred;
/// anything far larger is not a bundle.
const MAX_CA_FILE_BYTES: usize = 4 << 20;

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
    /// regular file, bounded), so a FIFO cannot hang a reload.
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
    /// What [`ProxyUrl::secret_forms`] returns; empty without credentials.
    forms: Arc<[Zeroizing<String>]>,
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
        let forms = credential_forms(&url);
        // Moves the URL's own buffer: nothing of it is left unwiped.
        let url = Zeroizing::new(String::from(url));
        let mut forms = forms;
        if !forms.is_empty() {
            forms.push(url.clone());
        }
        Ok(ProxyUrl {
            url,
            shown,
            forms: forms.into(),
        })
    }

    /// Whether the URL names a user or a password.
    pub fn has_credentials(&self) -> bool {
        !self.forms.is_empty()
    }

    /// `http://HOST:PORT`, for messages.
    pub fn shown(&self) -> &str {
        &self.shown
    }

    /// Every form the credentials take in what tokend sends or could be
    /// shown: the password as written (percent-encoded) and decoded, the
    /// `user:password` pair and its base64 in `Proxy-Authorization`, and
    /// the whole URL.
    pub fn secret_forms(&self) -> Vec<Zeroizing<String>> {
        self.forms.to_vec()
    }
}

/// The forms of `url`'s credentials but the URL itself; none without them.
fn credential_forms(url: &Url) -> Vec<Zeroizing<String>> {
    if url.username().is_empty() && url.password().is_none() {
        return Vec::new();
    }
    let user = percent_decode(url.username());
    let password = url.password().map(percent_decode).unwrap_or_default();
    let pair = Zeroizing::new(format!("{}:{}", *user, *password));
    let b64 = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(pair.as_bytes()));
    let mut forms = vec![pair, b64];
    if let Some(raw) = url.password() {
        forms.push(Zeroizing::new(raw.to_owned()));
        forms.push(password);
    }
    forms.retain(|f| !f.is_empty());
    forms
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

/// The forms of proxy credentials to scrub for `key`: its own proxy's, or
/// when it has none, those of the proxy variables in the environment
/// (read once: tokend never changes its environment).
pub(crate) fn proxy_secret_forms(key: &KeyConfig) -> Vec<Zeroizing<String>> {
    static FROM_ENVIRONMENT: OnceLock<Vec<Zeroizing<String>>> = OnceLock::new();
    if let Some(proxy) = &key.proxy {
        return proxy.secret_forms();
    }
    FROM_ENVIRONMENT
        .get_or_init(|| {
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
                .flat_map(|text| environment_forms(&text))
                .collect()
        })
        .clone()
}

/// The credential forms of a proxy variable's value, read as the HTTP
/// stack reads it: any scheme, and `http://` when it has none.
fn environment_forms(text: &str) -> Vec<Zeroizing<String>> {
    let full = if text.contains("://") {
        Zeroizing::new(text.to_owned())
    } else {
        Zeroizing::new(format!("http://{text}"))
    };
    let Ok(url) = Url::parse(&full) else {
        return Vec::new();
    };
    let mut forms = credential_forms(&url);
    if !forms.is_empty() {
        forms.push(Zeroizing::new(text.to_owned()));
        forms.push(Zeroizing::new(String::from(url)));
    }
    forms
}

/// What a key's requests go through: its trust anchors and its proxy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
struct Route {
    ca_file: Option<CaFile>,
    proxy: Option<ProxyUrl>,
}

impl Route {
    fn of(key: &KeyConfig) -> Route {
        Route {
            ca_file: key.ca_file.clone(),
            proxy: key.proxy.clone(),
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
    /// Clients for `keys`, and one for keys with neither `ca_file` nor
    /// `proxy`.
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
    builder.build()
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
        rustls::Error::AlertReceived(alert) => {
            return format!("the issuer ended the handshake ({alert:?})")
        }
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
        assert!(plain.secret_forms().is_empty());
        assert_eq!(plain.shown(), "http://proxy.corp:3128");
        assert_eq!(format!("{plain:?}"), "ProxyUrl(http://proxy.corp:3128)");
    }

    #[test]
    fn proxy_credentials_never_show_and_every_form_is_known() {
        let proxy = ProxyUrl::parse("http://alice:p%40ss%3Aw0rd@proxy.corp:3128").unwrap();
        assert!(proxy.has_credentials());
        assert_eq!(proxy.shown(), "http://proxy.corp:3128");
        let debug = format!("{proxy:?}");
        assert_eq!(debug, "ProxyUrl(http://[redacted]@proxy.corp:3128)");
        let forms: Vec<String> = proxy.secret_forms().iter().map(|f| f.to_string()).collect();
        let basic = base64::engine::general_purpose::STANDARD.encode("alice:p@ss:w0rd");
        for form in [
            "p@ss:w0rd",
            "p%40ss%3Aw0rd",
            "alice:p@ss:w0rd",
            basic.as_str(),
        ] {
            assert!(forms.iter().any(|f| f == form), "{form} missing");
        }
    }

    #[test]
    fn credentials_in_proxy_variables_are_found_as_curl_reads_them() {
        let basic = base64::engine::general_purpose::STANDARD.encode("u:s3cret");
        for value in [
            "u:s3cret@proxy:3128",
            "https://u:s3cret@proxy:3128",
            "socks5h://u:s3cret@p",
        ] {
            let forms: Vec<String> = environment_forms(value)
                .iter()
                .map(|f| f.to_string())
                .collect();
            assert!(forms.iter().any(|f| f == "s3cret"), "{value}: {forms:?}");
            assert!(forms.contains(&basic), "{value}");
        }
        assert!(environment_forms("http://proxy:3128").is_empty());
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
