//! Issue 14's trust and proxy settings, through the real binary, real TLS
//! and a real tunnel: a loopback issuer whose certificate a test CA signs,
//! `ca_file` per key and in `[daemon]`, the system store (as
//! `SSL_CERT_FILE` replaces it), a reload that changes a CA file, and a
//! CONNECT proxy named per key or in `HTTPS_PROXY` (and bypassed by
//! `NO_PROXY`), whose credentials never reach the log, even when the proxy
//! quotes them back in an encoding of its own. `tokend check`
//! errors for these settings name FILE:LINE:COL.

mod support;

use std::path::Path;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde_json::{json, Value};
use support::cli::{check, check_error, run, tokend};
use support::daemon::{assert_same_token, write_private, write_public, Answer, Daemon};
use support::issuer::{holds_part_of, ClientSpec, Dialect, Echo, Issuer};
use support::keys::{secrets, Key};
use support::proxy::ConnectProxy;
use support::tls::{daemon, TestCa, TlsListener};

const ID: &str = "tls-client";
const SECRET: &str = "tls-secret-0c0c0c";
const PROXY_USER: &str = "proxy-user";
const PROXY_PASSWORD: &str = "pr0xy-pa55w0rd-9d9d";
const UNKNOWN_CA: &str = "TLS: the issuer's certificate is signed by an unknown CA (set ca_file)";

/// A Checkout issuer over TLS with a certificate `ca` signs.
async fn tls_issuer(ca: &TestCa) -> Issuer {
    let listener = TlsListener::bind(ca.server_config()).await;
    Issuer::serve(
        vec![ClientSpec::checkout(ID, SECRET, &[])],
        listener,
        "https",
    )
    .await
}

/// Key `name` for `issuer`, readable by root, with `extra` lines.
fn key(name: &str, issuer: &Issuer, extra: &str) -> String {
    Key::new(name)
        .issuer(issuer, Dialect::Checkout)
        .client(ID, SECRET)
        .allow_uids(&[0])
        .extra(extra)
        .toml()
}

/// `path` as a TOML string.
fn quoted(path: &Path) -> String {
    toml::Value::String(path.display().to_string()).to_string()
}

fn get(key: &str) -> Value {
    json!({"op":"get","key":key})
}

fn assert_served(answer: &Answer) {
    assert_eq!(answer["ok"], true, "{answer}");
}

fn assert_unknown_ca(answer: &Answer) {
    assert_eq!(answer["error"]["code"], "unavailable", "{answer}");
    let message = answer["error"]["message"].as_str().expect("message");
    assert!(message.contains(UNKNOWN_CA), "{message}");
}

/// The `last_error` `tokend status` shows for `key`'s only set.
async fn last_error(daemon: &Daemon, key: &str) -> String {
    let status = daemon.call(json!({"op":"status"})).await;
    let keys = status["keys"].as_array().expect("keys");
    let found = keys.iter().find(|k| k["name"] == key).expect("the key");
    found["sets"][0]["last_error"]
        .as_str()
        .unwrap_or_else(|| panic!("no last_error in {status}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_ca_is_named_and_a_keys_ca_file_trusts_it() {
    let ca = TestCa::new("tokend test CA");
    let issuer = tls_issuer(&ca).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_file = ca.write(dir.path(), "ca.pem");
    let keys = key("plain", &issuer, "")
        + &key(
            "trusting",
            &issuer,
            &format!("ca_file = {}", quoted(&ca_file)),
        );
    let daemon = daemon().dir(dir).keys(&keys).start();

    assert_unknown_ca(&daemon.call(get("plain")).await);
    let shown = last_error(&daemon, "plain").await;
    assert!(shown.contains(UNKNOWN_CA), "{shown}");
    assert!(
        issuer.requests().is_empty(),
        "a refused handshake sends nothing"
    );

    assert_served(&daemon.call(get("trusting")).await);
    assert_eq!(issuer.requests().len(), 1);
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemons_ca_file_is_the_default_and_a_keys_own_replaces_it() {
    let ca = TestCa::new("tokend test CA");
    let other = TestCa::new("some other CA");
    let issuer = tls_issuer(&ca).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_file = ca.write(dir.path(), "ca.pem");
    let other_file = other.write(dir.path(), "other.pem");
    let keys = key("inherits", &issuer, "")
        + &key(
            "own",
            &issuer,
            &format!("ca_file = {}", quoted(&other_file)),
        );
    let daemon = daemon()
        .dir(dir)
        .daemon_lines(&format!("ca_file = {}", quoted(&ca_file)))
        .keys(&keys)
        .start();
    assert_served(&daemon.call(get("inherits")).await);
    // The key's file replaces the daemon's: the test CA is not in it.
    assert_unknown_ca(&daemon.call(get("own")).await);
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));
}

/// rustls-native-certs reads `SSL_CERT_FILE` in place of the system store:
/// a token served with no `ca_file` proves the system roots are loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_system_store_is_trusted() {
    let ca = TestCa::new("tokend test CA");
    let issuer = tls_issuer(&ca).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let bundle = ca.write(dir.path(), "system-bundle.pem");
    let daemon = daemon()
        .env("SSL_CERT_FILE", &bundle)
        .dir(dir)
        .keys(&key("k", &issuer, ""))
        .start();
    assert_served(&daemon.call(get("k")).await);
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_ca_file_is_a_changed_credential() {
    let ca = TestCa::new("tokend test CA");
    let issuer = tls_issuer(&ca).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_file = ca.write(dir.path(), "ca.pem");
    let keys = key("k", &issuer, &format!("ca_file = {}", quoted(&ca_file)));
    let mut daemon = daemon().dir(dir).keys(&keys).start();
    let first = daemon.call(get("k")).await;
    assert_served(&first);

    // The same file: the token is carried over.
    assert!(daemon.reload_and_wait());
    let again = daemon.call(get("k")).await;
    assert_same_token(again.token(), first.token(), true, "the same CA file");
    assert_eq!(issuer.requests().len(), 1);

    // Another CA added to the same file: a new token.
    let other = TestCa::new("another CA");
    write_public(&ca_file, &format!("{}{}", ca.pem(), other.pem()));
    assert!(daemon.reload_and_wait());
    let fresh = daemon.call(get("k")).await;
    assert_served(&fresh);
    assert_same_token(fresh.token(), first.token(), false, "a changed CA file");
    assert_eq!(issuer.requests().len(), 2);
    daemon.stop_and_check_log(&secrets(&[&issuer], &[SECRET]));
}

/// Every form the proxy credentials could take in a log line.
fn proxy_secrets(proxy: &ConnectProxy) -> Vec<String> {
    vec![
        PROXY_PASSWORD.to_owned(),
        STANDARD.encode(format!("{PROXY_USER}:{PROXY_PASSWORD}")),
        proxy.url_with(PROXY_USER, PROXY_PASSWORD),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keys_proxy_carries_its_requests_and_overrides_the_environment() {
    let ca = TestCa::new("tokend test CA");
    let issuer = tls_issuer(&ca).await;
    let proxy = ConnectProxy::requiring(PROXY_USER, PROXY_PASSWORD).await;
    let bystander = ConnectProxy::start().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_file = ca.write(dir.path(), "ca.pem");
    let extra = format!(
        "ca_file = {}\nproxy = {}",
        quoted(&ca_file),
        toml::Value::String(proxy.url_with(PROXY_USER, PROXY_PASSWORD))
    );
    let without_credentials = format!(
        "ca_file = {}\nproxy = {}",
        quoted(&ca_file),
        toml::Value::String(proxy.url())
    );
    let keys = key("k", &issuer, &extra) + &key("refused", &issuer, &without_credentials);
    let daemon = daemon()
        .env("HTTPS_PROXY", bystander.url())
        .dir(dir)
        .keys(&keys)
        .start();
    assert_served(&daemon.call(get("k")).await);
    // A proxy's refusal is told as such, not as the issuer's.
    let refused = daemon.call(get("refused")).await;
    assert_eq!(refused["error"]["code"], "unavailable", "{refused}");
    let message = refused["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("proxy authorization required"),
        "{message}"
    );

    let seen = proxy.wait_for(2, Duration::from_secs(5)).await;
    assert_eq!(
        seen[0].request_line,
        format!("CONNECT {} HTTP/1.1", issuer.addr())
    );
    let basic = STANDARD.encode(format!("{PROXY_USER}:{PROXY_PASSWORD}"));
    assert_eq!(seen[0].authorization, Some(format!("Basic {basic}")));
    assert!(bystander.seen().is_empty(), "{:?}", bystander.seen());
    let mut used = secrets(&[&issuer], &[SECRET]);
    used.extend(proxy_secrets(&proxy));
    daemon.stop_and_check_log(&used);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_proxy_is_honoured_and_no_proxy_bypasses_it() {
    let ca = TestCa::new("tokend test CA");
    let issuer = tls_issuer(&ca).await;
    let proxy = ConnectProxy::requiring(PROXY_USER, PROXY_PASSWORD).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let ca_file = ca.write(dir.path(), "ca.pem");
    let keys = key("k", &issuer, &format!("ca_file = {}", quoted(&ca_file)));
    let through = daemon()
        .env("HTTPS_PROXY", proxy.url_with(PROXY_USER, PROXY_PASSWORD))
        .dir(dir)
        .keys(&keys)
        .start();
    assert_served(&through.call(get("k")).await);
    let seen = proxy.wait_for(1, Duration::from_secs(5)).await;
    assert_eq!(
        seen[0].request_line,
        format!("CONNECT {} HTTP/1.1", issuer.addr())
    );
    let mut used = secrets(&[&issuer], &[SECRET]);
    used.extend(proxy_secrets(&proxy));
    through.stop_and_check_log(&used);

    let dir = tempfile::tempdir().expect("temp dir");
    let ca_file = ca.write(dir.path(), "ca.pem");
    let keys = key("k", &issuer, &format!("ca_file = {}", quoted(&ca_file)));
    let bypassing = daemon()
        .env("HTTPS_PROXY", proxy.url_with(PROXY_USER, PROXY_PASSWORD))
        .env("NO_PROXY", "127.0.0.1")
        .dir(dir)
        .keys(&keys)
        .start();
    assert_served(&bypassing.call(get("k")).await);
    assert_eq!(issuer.requests().len(), 2);
    assert_eq!(proxy.seen().len(), 1, "NO_PROXY must bypass the proxy");
    let mut used = secrets(&[&issuer], &[SECRET]);
    used.extend(proxy_secrets(&proxy));
    bypassing.stop_and_check_log(&used);
}

/// A proxy password with a space, a `+` and characters the common
/// encoders disagree on.
const SPACED_PASSWORD: &str = "pr0xy pa55+w0rd~!*9d";

/// Asserts `text` holds no run of [`SPACED_PASSWORD`] in any encoding,
/// and says where without printing it.
fn assert_no_part_of_password(text: &str, what: &str) {
    assert!(
        !holds_part_of(text, SPACED_PASSWORD),
        "{what} holds a part of the proxy password ({} bytes of text)",
        text.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxys_re_encodings_of_its_password_never_reach_answers_status_or_a_trace_log() {
    // A plain-http issuer: the proxy answers the request itself, as it
    // would for any issuer it refuses to reach.
    let issuer = Issuer::start(vec![ClientSpec::checkout(ID, SECRET, &[])]).await;
    let mut proxies = Vec::new();
    for echo in Echo::ALL {
        proxies.push(ConnectProxy::echoing(PROXY_USER, SPACED_PASSWORD, echo).await);
    }
    // In the URL every byte but letters and digits is percent-encoded,
    // the space as %20; the HTTP stack decodes them before it sends them.
    let written: String =
        percent_encoding::utf8_percent_encode(SPACED_PASSWORD, percent_encoding::NON_ALPHANUMERIC)
            .to_string();
    let keys: String = proxies
        .iter()
        .enumerate()
        .map(|(i, proxy)| {
            let url = proxy.url_with(PROXY_USER, &written);
            key(
                &format!("k{i}"),
                &issuer,
                &format!("proxy = {}", toml::Value::String(url)),
            )
        })
        .collect();
    let daemon = daemon().env("RUST_LOG", "trace").keys(&keys).start();
    let basic = STANDARD.encode(format!("{PROXY_USER}:{SPACED_PASSWORD}"));
    // Every encoding is tried before any assertion, so a failure names
    // them all.
    let mut leaked = Vec::new();
    for (i, echo) in Echo::ALL.iter().enumerate() {
        let answer = daemon.call(get(&format!("k{i}"))).await;
        assert_eq!(answer["error"]["code"], "unavailable", "{echo:?}");
        let message = answer["error"]["message"].as_str().expect("a message");
        assert!(
            message.contains("the upstream refused"),
            "{echo:?}: the proxy's words are shown"
        );
        if !message.contains("[redacted]") || holds_part_of(&answer.0.to_string(), SPACED_PASSWORD)
        {
            leaked.push(echo);
        }
        let seen = proxies[i].wait_for(1, Duration::from_secs(5)).await;
        assert!(
            seen[0].authorization.as_deref() == Some(&format!("Basic {basic}")),
            "{echo:?}: the proxy was not sent the decoded password"
        );
    }
    assert!(
        leaked.is_empty(),
        "the get answer holds a part of the proxy password, unredacted, for {leaked:?}"
    );
    assert!(
        issuer.requests().is_empty(),
        "the proxies answered every request"
    );
    let status = daemon.call(json!({"op": "status"})).await;
    assert_no_part_of_password(&status.0.to_string(), "the status answer");
    let mut command = tokend();
    command
        .args(["status", "--json", "--socket"])
        .arg(&daemon.socket);
    assert_no_part_of_password(&run(command, b"").await.stdout, "tokend status --json");
    let log = daemon.log();
    assert!(log.contains(" TRACE "), "trace level is on");
    assert_no_part_of_password(&log, "the trace log");
    let mut used = secrets(&[&issuer], &[SECRET]);
    used.extend(Echo::ALL.iter().map(|e| e.encode(SPACED_PASSWORD)));
    daemon.stop_and_check_log(&used);
}

const KEY_HEAD: &str = "[keys.a]\ntoken_url = \"https://issuer.example/t\"\nclient_id = \"i\"\n\
                        client_secret_file = \"/dev/null\"\nallow_uids = [0]\n";

#[tokio::test]
async fn check_names_bad_ca_files_and_proxies_by_line_and_column() {
    let dir = tempfile::tempdir().expect("temp dir");
    let dir = dir.path();
    let secret = dir.join("secret");
    write_private(&secret, SECRET);
    let head = KEY_HEAD.replace("/dev/null", &secret.display().to_string());
    let missing = dir.join("missing.pem");

    let text = format!("{head}ca_file = {}\n", quoted(&missing));
    let message = check_error(dir, &text, 0o600, 6, 11).await;
    assert!(
        message.starts_with(&format!(
            "key \"a\": ca_file: failed to open {}",
            missing.display()
        )),
        "{message}"
    );

    let empty = dir.join("empty.pem");
    write_public(&empty, "no certificate here\n");
    let text = format!("{head}ca_file = {}\n", quoted(&empty));
    let message = check_error(dir, &text, 0o600, 6, 11).await;
    assert!(message.contains("holds no certificate"), "{message}");

    let text = format!("[daemon]\nca_file = {}\n\n{head}", quoted(&missing));
    let message = check_error(dir, &text, 0o600, 2, 11).await;
    assert!(
        message.starts_with("[daemon] ca_file: failed to open"),
        "{message}"
    );

    let text = format!("{head}proxy = \"socks5://u:hunter2@proxy:1080\"\n");
    let message = check_error(dir, &text, 0o600, 6, 9).await;
    assert!(message.contains("proxy scheme \"socks5\""), "{message}");
    assert!(!message.contains("hunter2"), "{message}");
    let text = format!("{head}proxy = 3128\n");
    let message = check_error(dir, &text, 0o600, 6, 9).await;
    assert!(message.starts_with("proxy must be a string"), "{message}");

    // Credentials in a proxy URL make the file as private as an inline
    // secret does.
    let text = format!("{head}proxy = \"http://{PROXY_USER}:{PROXY_PASSWORD}@proxy:3128\"\n");
    let message = check_error(dir, &text, 0o644, 6, 9).await;
    assert!(message.contains("proxy URL with credentials"), "{message}");
    assert!(message.contains("readable"), "{message}");
    assert!(!message.contains(PROXY_PASSWORD), "{message}");
    let (ran, _) = check(dir, &text, 0o600).await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
    // Without credentials, any mode will do.
    let text = format!("{head}proxy = \"http://proxy:3128\"\n");
    let (ran, _) = check(dir, &text, 0o644).await;
    assert_eq!(ran.code, Some(0), "{ran:?}");

    let ca = TestCa::new("tokend test CA");
    let ca_file = ca.write(dir, "ca.pem");
    let text = format!("[daemon]\nca_file = {}\n\n{head}", quoted(&ca_file));
    let (ran, _) = check(dir, &text, 0o600).await;
    assert_eq!(ran.code, Some(0), "{ran:?}");
}
