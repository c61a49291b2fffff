//! RFC 8705 client authentication (`auth = "tls_client_auth"` and
//! `"self_signed_tls_client_auth"`) against the real `oidc-provider` 8.8.1
//! (`tests/oidc/server.mjs`), which here speaks HTTPS through node's own
//! TLS server: a certificate from one test CA, client certificates checked
//! against another, both made per test with rcgen (and, for the README's
//! recipe, with openssl). Without `MTLS_REJECT_UNAUTHORIZED` node completes
//! every handshake and oidc-provider judges the certificate; with it, node
//! refuses a certificate the client CA did not sign in the handshake.
//! oidc-provider's reason for a refusal is on its stderr, which the tests
//! read. Every daemon's log is checked for the client keys' PEM lines and
//! the tokens it was handed.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{json, Value};
use support::cli::{check, check_error};
use support::daemon::{assert_same_token, token_of, write_private, Answer, Daemon, PATIENCE};
use support::issuer::{ClientSpec, Dialect, Issuer};
use support::keys::Key;
use support::oidc::OidcProvider;
use support::tls::{daemon, self_signed_client, CertAndKey, TestCa, TlsListener};

const CLIENT: &str = "tokend-mtls";
const SELF_SIGNED_CLIENT: &str = "tokend-mtls-self";
const SUBJECT: &str = "tokend-mtls-client";
const UNKNOWN_CA: &str = "TLS: the issuer's certificate is signed by an unknown CA (set ca_file)";
/// What a refusal without a TLS alert (node's way) is reported as.
const CLOSED_ON_US: &str =
    "TLS: the issuer closed the connection without answering: it may have refused the client certificate";

/// The server over mTLS, the CAs it was set up with, and a directory for
/// the files tokend reads.
struct Setup {
    provider: OidcProvider,
    /// Signs client certificates the server accepts.
    client_ca: TestCa,
    /// The server's CA, as a `ca_file`.
    ca_file: PathBuf,
    files: tempfile::TempDir,
}

/// How the server treats a certificate its client CA did not sign.
#[derive(Clone, Copy, PartialEq)]
enum Refuse {
    /// oidc-provider answers invalid_client.
    AtTheIssuer,
    /// node ends the handshake.
    InTheHandshake,
}

impl Setup {
    /// The server, registering `self_signed` (when given) for
    /// [`SELF_SIGNED_CLIENT`].
    fn start(refuse: Refuse, self_signed: Option<&str>) -> Setup {
        let server_ca = TestCa::new("tokend test server CA");
        let client_ca = TestCa::new("tokend test client CA");
        let server = server_ca.server_pem();
        let subject = format!("CN={SUBJECT}");
        let mut env = vec![
            ("MTLS_SERVER_CERT", server.cert.as_str()),
            ("MTLS_SERVER_KEY", server.key.as_str()),
            ("MTLS_CLIENT_CA", client_ca.pem()),
            ("MTLS_SUBJECT_DN", subject.as_str()),
        ];
        if refuse == Refuse::InTheHandshake {
            env.push(("MTLS_REJECT_UNAUTHORIZED", "1"));
        }
        if let Some(cert) = self_signed {
            env.push(("MTLS_SELF_SIGNED_CERT", cert));
        }
        let provider = OidcProvider::start_with_env(&env);
        assert!(
            provider.issuer().starts_with("https://"),
            "{}",
            provider.issuer()
        );
        let files = tempfile::tempdir().expect("temp dir");
        let ca_file = server_ca.write(files.path(), "server-ca.pem");
        Setup {
            provider,
            client_ca,
            ca_file,
            files,
        }
    }

    /// `[keys.NAME]` for `client` with `auth`, the certificate and key at
    /// `files`, and `extra` lines.
    fn key(
        &self,
        name: &str,
        client: &str,
        auth: &str,
        files: &(PathBuf, PathBuf),
        extra: &str,
    ) -> String {
        Key::new(name)
            .url(&self.provider.token_url())
            .client_id(client)
            .allow_me()
            .extra(&format!(
                "auth = {}\nclient_cert_file = {}\nclient_key_file = {}",
                quoted(auth),
                quoted_path(&files.0),
                quoted_path(&files.1)
            ))
            .extra(extra)
            .toml()
    }

    /// `ca_file` naming the server's CA.
    fn trusting(&self) -> String {
        format!("ca_file = {}", quoted_path(&self.ca_file))
    }
}

fn quoted(value: &str) -> String {
    toml::Value::String(value.to_owned()).to_string()
}

fn quoted_path(path: &Path) -> String {
    quoted(&path.display().to_string())
}

async fn get(daemon: &Daemon, key: &str) -> Answer {
    daemon.call(json!({"op":"get","key":key})).await
}

/// The `unavailable` message of a failed answer.
fn unavailable(answer: &Answer) -> String {
    assert_eq!(answer["error"]["code"], "unavailable", "{answer}");
    answer["error"]["message"]
        .as_str()
        .expect("message")
        .to_owned()
}

/// The claims of a JWT access token.
fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWT");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url"))
        .expect("JSON claims")
}

/// Waits for the server to write `needle` to its stderr, which a thread
/// collects: the answer can come before the line is read.
fn wait_for_server_line(provider: &OidcProvider, needle: &str) {
    let deadline = Instant::now() + PATIENCE;
    while !provider.stderr().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "the oidc server never said {needle:?}; its stderr:\n{}",
            provider.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// RFC 8705 3.1's `x5t#S256`: base64url SHA-256 of the certificate's DER.
fn thumbprint(pem: &str) -> String {
    use sha2::Digest as _;
    use tokio_rustls::rustls::pki_types::pem::PemObject as _;
    use tokio_rustls::rustls::pki_types::CertificateDer;
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).expect("a PEM certificate");
    URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(der.as_ref()))
}

/// What must never reach the log: the keys' PEM lines and the tokens.
fn never_logged(keys: &[&CertAndKey], tokens: &[&str]) -> Vec<String> {
    let mut all: Vec<String> = keys.iter().flat_map(|k| k.key_lines()).collect();
    all.extend(tokens.iter().map(|t| (*t).to_owned()));
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_client_auth_gets_a_token_with_a_certificate_the_ca_signed() {
    let setup = Setup::start(Refuse::AtTheIssuer, None);
    let client = setup.client_ca.client_pem(SUBJECT);
    let files = client.write(setup.files.path(), "client");
    let keys = setup.key("mtls", CLIENT, "tls_client_auth", &files, &setup.trusting())
        + &setup.key("untrusting", CLIENT, "tls_client_auth", &files, "");
    let daemon = daemon().keys(&keys).start();

    let token = token_of(&get(&daemon, "mtls").await);
    let claims = claims(&token);
    assert_eq!(claims["client_id"], CLIENT);
    // The server bound the token to the certificate it saw: tokend's.
    assert_eq!(claims["cnf"]["x5t#S256"], thumbprint(&client.cert));
    assert!(
        !setup.provider.stderr().contains("grant.error"),
        "{}",
        setup.provider.stderr()
    );
    // The trust branch's rule holds for a certificate-bearing key too.
    let message = unavailable(&get(&daemon, "untrusting").await);
    assert!(message.contains(UNKNOWN_CA), "{message}");

    daemon.stop_and_check_log(&never_logged(&[&client], &[&token]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_another_ca_signed_is_refused_by_the_issuer() {
    let setup = Setup::start(Refuse::AtTheIssuer, None);
    let rogue = TestCa::new("some other CA").client_pem(SUBJECT);
    let files = rogue.write(setup.files.path(), "rogue");
    let keys = setup.key(
        "rogue",
        CLIENT,
        "tls_client_auth",
        &files,
        &setup.trusting(),
    );
    let daemon = daemon().keys(&keys).start();

    let message = unavailable(&get(&daemon, "rogue").await);
    assert!(message.contains("access denied"), "{message}");
    assert!(message.contains("invalid_client"), "{message}");
    wait_for_server_line(
        &setup.provider,
        "grant.error: invalid_client: client certificate was not verified",
    );
    daemon.stop_and_check_log(&never_logged(&[&rogue], &[]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_without_an_alert_is_reported_as_a_likely_certificate_refusal() {
    let setup = Setup::start(Refuse::InTheHandshake, None);
    let good = setup.client_ca.client_pem(SUBJECT);
    let rogue = TestCa::new("some other CA").client_pem(SUBJECT);
    let good_files = good.write(setup.files.path(), "good");
    let rogue_files = rogue.write(setup.files.path(), "rogue");
    let keys = setup.key(
        "good",
        CLIENT,
        "tls_client_auth",
        &good_files,
        &setup.trusting(),
    ) + &setup.key(
        "rogue",
        CLIENT,
        "tls_client_auth",
        &rogue_files,
        &setup.trusting(),
    );
    let daemon = daemon().keys(&keys).start();

    let token = token_of(&get(&daemon, "good").await);
    let message = unavailable(&get(&daemon, "rogue").await);
    assert!(message.contains(CLOSED_ON_US), "{message}");
    daemon.stop_and_check_log(&never_logged(&[&good, &rogue], &[&token]));
}

/// rustls, unlike node, ends the handshake with an alert: the message says
/// the issuer refused the certificate, or that it wants one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_alert_from_the_issuer_says_it_refused_the_client_certificate() {
    let server_ca = TestCa::new("tokend test server CA");
    let client_ca = TestCa::new("tokend test client CA");
    let listener = TlsListener::bind(server_ca.server_config_requiring(&client_ca)).await;
    let issuer = Issuer::serve(
        vec![ClientSpec::checkout(CLIENT, "unused-secret-1", &[])],
        listener,
        "https",
    )
    .await;
    let files = tempfile::tempdir().expect("temp dir");
    let ca_file = server_ca.write(files.path(), "server-ca.pem");
    let rogue = TestCa::new("some other CA").client_pem(SUBJECT);
    let rogue_files = rogue.write(files.path(), "rogue");
    let key = |name: &str, lines: String| {
        Key::new(name)
            .issuer(&issuer, Dialect::Checkout)
            .client_id(CLIENT)
            .allow_me()
            .extra(&format!("ca_file = {}\n{lines}", quoted_path(&ca_file)))
            .toml()
    };
    let keys = key(
        "rogue",
        format!(
            "auth = \"tls_client_auth\"\nclient_cert_file = {}\nclient_key_file = {}",
            quoted_path(&rogue_files.0),
            quoted_path(&rogue_files.1)
        ),
    ) + &key("secret", "client_secret = \"unused-secret-1\"".to_owned());
    let daemon = daemon().keys(&keys).start();

    let message = unavailable(&get(&daemon, "rogue").await);
    assert!(
        message.contains("TLS: the issuer refused the client certificate (UnknownCA)"),
        "{message}"
    );
    let message = unavailable(&get(&daemon, "secret").await);
    assert!(
        message.contains("TLS: the issuer requires a client certificate"),
        "{message}"
    );
    assert!(
        issuer.requests().is_empty(),
        "a refused handshake sends nothing"
    );
    daemon.stop_and_check_log(&never_logged(&[&rogue], &["unused-secret-1"]));
}

/// The README's recipe for a self-signed certificate.
fn openssl_self_signed(dir: &Path, name: &str) -> (CertAndKey, (PathBuf, PathBuf)) {
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args([
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=tokend-self-signed",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(out.status.success(), "openssl req: {out:?}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let read = |path: &Path| std::fs::read_to_string(path).expect("read");
    let pair = CertAndKey {
        cert: read(&cert),
        key: read(&key),
    };
    (pair, (cert, key))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_signed_tls_client_auth_gets_a_token_with_the_registered_certificate() {
    let files = tempfile::tempdir().expect("temp dir");
    let (registered, registered_files) = openssl_self_signed(files.path(), "registered");
    let setup = Setup::start(Refuse::AtTheIssuer, Some(&registered.cert));
    let stranger = self_signed_client("tokend-self-signed");
    let stranger_files = stranger.write(setup.files.path(), "stranger");
    let auth = "self_signed_tls_client_auth";
    let keys = setup.key(
        "self",
        SELF_SIGNED_CLIENT,
        auth,
        &registered_files,
        &setup.trusting(),
    ) + &setup.key(
        "stranger",
        SELF_SIGNED_CLIENT,
        auth,
        &stranger_files,
        &setup.trusting(),
    );
    let daemon = daemon().keys(&keys).start();

    let token = token_of(&get(&daemon, "self").await);
    assert_eq!(claims(&token)["client_id"], SELF_SIGNED_CLIENT);
    let message = unavailable(&get(&daemon, "stranger").await);
    assert!(message.contains("invalid_client"), "{message}");
    wait_for_server_line(
        &setup.provider,
        "grant.error: invalid_client: unregistered client certificate provided",
    );
    daemon.stop_and_check_log(&never_logged(&[&registered, &stranger], &[&token]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_certificate_or_key_is_a_changed_credential() {
    let setup = Setup::start(Refuse::AtTheIssuer, None);
    let first = setup.client_ca.client_pem(SUBJECT);
    let files = first.write(setup.files.path(), "client");
    let keys = setup.key("k", CLIENT, "tls_client_auth", &files, &setup.trusting());
    let mut daemon = daemon().keys(&keys).start();
    let one = token_of(&get(&daemon, "k").await);

    // The same files: the token is carried over.
    assert!(daemon.reload_and_wait());
    let again = token_of(&get(&daemon, "k").await);
    assert_same_token(&one, &again, true, "after a reload with the same files");

    // A new certificate and key in the same files: a new token, which
    // the new certificate got.
    let second = setup.client_ca.client_pem(SUBJECT);
    second.write(setup.files.path(), "client");
    assert!(daemon.reload_and_wait());
    let two = token_of(&get(&daemon, "k").await);
    assert_same_token(&one, &two, false, "after the files changed");
    assert_eq!(claims(&one)["cnf"]["x5t#S256"], thumbprint(&first.cert));
    assert_eq!(claims(&two)["cnf"]["x5t#S256"], thumbprint(&second.cert));

    // The same contents at another path: a changed credential too.
    let moved = second.write(setup.files.path(), "moved");
    let keys = setup.key("k", CLIENT, "tls_client_auth", &moved, &setup.trusting());
    daemon.rewrite_keys(&keys);
    assert!(daemon.reload_and_wait());
    let three = token_of(&get(&daemon, "k").await);
    assert_same_token(&two, &three, false, "after the files moved");
    daemon.stop_and_check_log(&never_logged(&[&first, &second], &[&one, &two, &three]));
}

/// A key file others may read does not stop the daemon (its other keys
/// would go down with it): the key is unavailable with the reason until a
/// reload finds the file private.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exposed_key_file_makes_the_key_unavailable_until_a_reload_fixes_it() {
    let setup = Setup::start(Refuse::AtTheIssuer, None);
    let client = setup.client_ca.client_pem(SUBJECT);
    let files = client.write(setup.files.path(), "client");
    let mode = |mode| {
        std::fs::set_permissions(&files.1, std::fs::Permissions::from_mode(mode)).expect("chmod")
    };
    mode(0o644);
    let keys = setup.key("k", CLIENT, "tls_client_auth", &files, &setup.trusting());
    let mut daemon = daemon().keys(&keys).start();

    let message = unavailable(&get(&daemon, "k").await);
    assert!(
        message.contains(&format!(
            "client_key_file: {} is readable by others",
            files.1.display()
        )),
        "{message}"
    );
    mode(0o600);
    assert!(daemon.reload_and_wait());
    let token = token_of(&get(&daemon, "k").await);
    daemon.stop_and_check_log(&never_logged(&[&client], &[&token]));
}

/// Lines 1 to 5 of a key table; lines 6 and 7 name the files.
fn table(auth: &str, cert: &Path, key: &Path) -> String {
    format!(
        "[keys.a]\ntoken_url = \"https://issuer.example/token\"\nclient_id = \"i\"\n\
         allow_uids = [0]\nauth = {}\nclient_cert_file = {}\nclient_key_file = {}\n",
        quoted(auth),
        quoted_path(cert),
        quoted_path(key)
    )
}

#[tokio::test]
async fn check_names_bad_certificates_and_keys_by_line_and_column() {
    let files = tempfile::tempdir().expect("temp dir");
    let dir = files.path();
    let ca = TestCa::new("tokend test client CA");
    let client = ca.client_pem(SUBJECT);
    let (cert, key) = client.write(dir, "client");
    let (ran, _) = check(dir, &table("tls_client_auth", &cert, &key), 0o600).await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    let (ran, _) = check(
        dir,
        &table("self_signed_tls_client_auth", &cert, &key),
        0o600,
    )
    .await;
    assert_eq!(ran.code, Some(0), "{ran:?}");

    // A key file others may read: refused like a secret file, at its line.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let message = check_error(dir, &table("tls_client_auth", &cert, &key), 0o600, 7, 19).await;
    assert!(
        message.starts_with(&format!(
            "key \"a\": client_key_file: {} is readable",
            key.display()
        )),
        "{message}"
    );
    assert!(message.contains("chmod 0600"), "{message}");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).expect("chmod");

    let missing = dir.join("missing.crt");
    let message = check_error(dir, &table("tls_client_auth", &missing, &key), 0o600, 6, 20).await;
    assert!(
        message.starts_with(&format!(
            "key \"a\": client_cert_file: failed to open {}",
            missing.display()
        )),
        "{message}"
    );

    // A key that is not the certificate's.
    let other = ca.client_pem(SUBJECT);
    let (_, other_key) = other.write(dir, "other");
    let message = check_error(
        dir,
        &table("tls_client_auth", &cert, &other_key),
        0o600,
        6,
        20,
    )
    .await;
    assert!(
        message.contains("does not belong to the first certificate"),
        "{message}"
    );
    // A certificate where the key should be, and the other way round.
    let cert_as_key = dir.join("cert-as-key.pem");
    write_private(&cert_as_key, &client.cert);
    let message = check_error(
        dir,
        &table("tls_client_auth", &cert, &cert_as_key),
        0o600,
        7,
        19,
    )
    .await;
    assert!(message.contains("holds no usable private key"), "{message}");
    let message = check_error(dir, &table("tls_client_auth", &key, &key), 0o600, 6, 20).await;
    assert!(message.contains("holds no certificate"), "{message}");

    // Settings that do not go together, at the key's table.
    let head = "[keys.a]\ntoken_url = \"https://issuer.example/token\"\nclient_id = \"i\"\n\
                allow_uids = [0]\n";
    let message = check_error(
        dir,
        &format!(
            "{head}auth = \"tls_client_auth\"\nclient_cert_file = {}\n",
            quoted_path(&cert)
        ),
        0o600,
        1,
        1,
    )
    .await;
    assert!(
        message.contains("auth = \"tls_client_auth\" needs client_key_file"),
        "{message}"
    );
    let text = format!(
        "{}client_secret = \"s3cret-not-sent\"\n",
        table("tls_client_auth", &cert, &key)
    );
    let message = check_error(dir, &text, 0o600, 1, 1).await;
    assert!(
        message.contains("sets both auth = \"tls_client_auth\" and client_secret"),
        "{message}"
    );
    assert!(!message.contains("s3cret-not-sent"), "{message}");
    let text = format!(
        "{head}client_secret = \"s\"\nclient_key_file = {}\n",
        quoted_path(&key)
    );
    let message = check_error(dir, &text, 0o600, 1, 1).await;
    assert!(
        message.contains("client_key_file is only used with auth = \"tls_client_auth\""),
        "{message}"
    );

    for line in client.key_lines() {
        assert!(!message.contains(&line));
    }
}

/// The mTLS example in `config/tokend.toml` (each line commented with
/// "# ", its prose with "# # ") parses once the first "# " of each line is
/// removed.
#[test]
fn the_example_config_mtls_key_parses() {
    let (block, path) = support::keys::example_block("inventory");
    let config = tokend::config::parse(&block, &path).unwrap_or_else(|e| panic!("{e}"));
    let key = &config.keys["inventory"];
    assert_eq!(key.auth, tokend::config::AuthMethod::TlsClientAuth);
    let identity = key.client_identity.as_ref().expect("client certificate");
    assert_eq!(
        identity.key_file,
        Path::new("/etc/tokend/mtls/inventory.key")
    );
}
