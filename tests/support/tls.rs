//! TLS for the loopback issuer: a test CA made at test time, a server
//! certificate it signs for `127.0.0.1` and `localhost`, and an axum
//! [`Listener`] that speaks TLS with it.
//!
//! [`TestCa::new`] generates a fresh CA per test (rcgen, ring), so no
//! certificate is checked in and none outlives the test. [`TlsListener`]
//! accepts TCP connections and hands each to its own handshake task, so a
//! client that fails the handshake (tokend refusing an unknown CA) or
//! stalls in it never holds up the next one; finished handshakes queue for
//! axum's accept loop. [`Issuer::serve`](super::issuer::Issuer::serve)
//! serves the issuer's router on it.
//!
//! For RFC 8705 tests, [`TestCa::server_pem`] gives the server certificate
//! to a server that is not rustls (node), [`TestCa::client_pem`] signs a
//! client certificate, and [`self_signed_client`] makes one nobody signed.
#![allow(dead_code, unreachable_pub)]

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::serve::Listener;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

/// A handshake that has not finished in this long is given up.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);

/// A certificate authority of the test's own.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
    cert_der: Vec<u8>,
}

impl TestCa {
    /// A fresh CA named `name`.
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("self-signed CA");
        TestCa {
            pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
        }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// Writes the CA certificate to `dir/NAME` (mode 0644: nothing secret)
    /// and returns the path.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        super::daemon::write_public(&path, &self.pem);
        path
    }

    /// A server configuration with a certificate this CA signs for
    /// `127.0.0.1` and `localhost`.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        self.server_config_for(None)
    }

    /// Like [`TestCa::server_config`], demanding a client certificate
    /// `clients` signed: rustls ends the handshake with an alert otherwise.
    pub fn server_config_requiring(&self, clients: &TestCa) -> Arc<ServerConfig> {
        self.server_config_for(Some(clients))
    }

    fn server_config_for(&self, clients: Option<&TestCa>) -> Arc<ServerConfig> {
        let params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("server params");
        let key = KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        let chain = vec![CertificateDer::from(cert.der().to_vec())];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .expect("TLS versions");
        let builder = match clients {
            None => builder.with_no_client_auth(),
            Some(clients) => {
                let mut roots = rustls::RootCertStore::empty();
                roots
                    .add(CertificateDer::from(clients.cert_der.clone()))
                    .expect("client CA");
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .expect("client verifier");
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder
            .with_single_cert(chain, key)
            .expect("server certificate");
        Arc::new(config)
    }
}

impl TestCa {
    /// A certificate this CA signs for `127.0.0.1` and `localhost`, and its
    /// key, PEM.
    pub fn server_pem(&self) -> CertAndKey {
        let params = CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("server params");
        let key = KeyPair::generate().expect("server key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        CertAndKey {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// A client certificate for subject `CN=<cn>` this CA signs, and its
    /// key, PEM.
    pub fn client_pem(&self, cn: &str) -> CertAndKey {
        let key = KeyPair::generate().expect("client key");
        let cert = client_params(cn)
            .signed_by(&key, &self.issuer)
            .expect("sign");
        CertAndKey {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// A certificate and its private key, PEM.
pub struct CertAndKey {
    pub cert: String,
    pub key: String,
}

impl CertAndKey {
    /// Writes `dir/NAME.crt` (mode 0644) and `dir/NAME.key` (mode 0600)
    /// and returns their paths.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        super::daemon::write_public(&cert, &self.cert);
        super::daemon::write_private(&key, &self.key);
        (cert, key)
    }

    /// The base64 lines of the key: what must never reach a log.
    pub fn key_lines(&self) -> Vec<String> {
        self.key
            .lines()
            .filter(|line| !line.starts_with("-----") && line.len() >= 16)
            .map(str::to_owned)
            .collect()
    }
}

/// A self-signed client certificate for subject `CN=<cn>`, and its key.
pub fn self_signed_client(cn: &str) -> CertAndKey {
    let key = KeyPair::generate().expect("client key");
    let cert = client_params(cn).self_signed(&key).expect("self-sign");
    CertAndKey {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

fn client_params(cn: &str) -> CertificateParams {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, cn);
    params.distinguished_name = name;
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params
}

/// TLS over `127.0.0.1:0`, as an axum [`Listener`].
pub struct TlsListener {
    addr: SocketAddr,
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    accepting: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    pub async fn bind(config: Arc<ServerConfig>) -> TlsListener {
        let tcp = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind 127.0.0.1:0");
        let addr = tcp.local_addr().expect("local address");
        let (done, ready) = mpsc::channel(16);
        let acceptor = TlsAcceptor::from(config);
        let accepting = tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = tcp.accept().await else {
                    // Out of descriptors, say: give the others time to close.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let (acceptor, done) = (acceptor.clone(), done.clone());
                tokio::spawn(async move {
                    let handshake = tokio::time::timeout(HANDSHAKE_LIMIT, acceptor.accept(stream));
                    // A refused handshake is what some tests are about.
                    if let Ok(Ok(tls)) = handshake.await {
                        let _ = done.send((tls, peer)).await;
                    }
                });
            }
        });
        TlsListener {
            addr,
            ready,
            accepting,
        }
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}

impl Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accepting task is gone: nothing will come.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.addr)
    }
}

/// Variables that would change whom tokend trusts or how it connects.
const ENVIRONMENT: [&str; 10] = [
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "HTTPS_PROXY",
    "https_proxy",
    "HTTP_PROXY",
    "http_proxy",
    "ALL_PROXY",
    "all_proxy",
    "NO_PROXY",
    "no_proxy",
];

/// A daemon builder with none of [`ENVIRONMENT`] set, so the machine
/// running the tests does not decide whom tokend trusts or how it
/// connects.
pub fn daemon<'a>() -> super::daemon::DaemonBuilder<'a> {
    ENVIRONMENT
        .iter()
        .fold(super::daemon::Daemon::builder(), |builder, name| {
            builder.env_remove(name)
        })
}
