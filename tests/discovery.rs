//! Issuer discovery (`issuer = …` instead of `token_url`): against the real
//! oidc-provider's well-known document, and against a small loopback
//! document server that counts what it is asked, to show the document is
//! read once for many gets and a failing one is retried with the key's
//! backoff rather than per get.

mod support;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::Router;
use serde_json::{json, Value};
use support::daemon::{Answer, Daemon};
use support::issuer::{ClientSpec, Dialect, Issuer};
use support::keys::Key;
use support::oidc::OidcProvider;

const PLAIN_ID: &str = "tokend-plain";
const PLAIN_SECRET: &str = "plain-secret-0123456789";
const LOCAL_ID: &str = "disc-client";
const LOCAL_SECRET: &str = "disc-secret-do-not-log-8181";

/// A loopback server of discovery documents: each path answers the status
/// and body set for it (404 otherwise), and every request's path is kept.
struct Documents {
    addr: SocketAddr,
    state: Arc<DocState>,
    _server: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct DocState {
    answers: Mutex<HashMap<String, (u16, String)>>,
    asked: Mutex<Vec<String>>,
}

async fn answer(State(state): State<Arc<DocState>>, uri: Uri) -> (StatusCode, String) {
    let path = uri.path().to_owned();
    state
        .asked
        .lock()
        .expect("document server lock")
        .push(path.clone());
    let found = state
        .answers
        .lock()
        .expect("document server lock")
        .get(&path)
        .cloned();
    match found {
        Some((status, body)) => (StatusCode::from_u16(status).expect("a status code"), body),
        None => (StatusCode::NOT_FOUND, "not here".to_owned()),
    }
}

impl Documents {
    async fn start() -> Documents {
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("bound address");
        let state = Arc::new(DocState::default());
        let app = Router::new().fallback(answer).with_state(state.clone());
        let server = tokio::spawn(async move {
            axum::serve(listener, app).await.expect("document server");
        });
        Documents {
            addr,
            state,
            _server: server,
        }
    }

    fn origin(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn serve(&self, path: &str, status: u16, body: &Value) {
        self.state
            .answers
            .lock()
            .expect("document server lock")
            .insert(path.to_owned(), (status, body.to_string()));
    }

    fn asked(&self, path: &str) -> usize {
        self.state
            .asked
            .lock()
            .expect("document server lock")
            .iter()
            .filter(|p| *p == path)
            .count()
    }
}

async fn get(daemon: &Daemon, key: &str, scopes: &[&str]) -> Answer {
    daemon
        .call(json!({"op":"get","key":key,"scopes":scopes}))
        .await
}

fn unavailable_message(answer: &Answer) -> String {
    assert_eq!(answer["ok"], false, "{answer}");
    assert_eq!(answer["error"]["code"], "unavailable", "{answer}");
    answer["error"]["message"]
        .as_str()
        .expect("message")
        .to_owned()
}

fn issuer_key(name: &str, issuer: &str, id: &str, secret: &str) -> Key {
    Key::new(name)
        .client(id, secret)
        .allow_me()
        .extra(&format!("issuer = {issuer:?}"))
}

#[tokio::test]
async fn oidc_provider_is_discovered_from_its_well_known_document() {
    let provider = OidcProvider::start();
    let key = issuer_key("plain", provider.issuer(), PLAIN_ID, PLAIN_SECRET)
        .extra("scopes = [\"gateway\", \"vault\"]");
    let daemon = Daemon::start("", &key.toml());

    let first = get(&daemon, "plain", &[]).await;
    assert_eq!(first["ok"], true, "{first}");
    let scoped = get(&daemon, "plain", &["gateway"]).await;
    assert_eq!(scoped["ok"], true, "{scoped}");
    assert_eq!(scoped["scopes"], json!(["gateway"]), "{scoped}");
    let log = daemon.stop_and_check_log(&[PLAIN_SECRET]);
    assert!(
        log.contains(&format!("{}/token", provider.issuer())),
        "the discovered endpoint is logged: {log}"
    );
}

#[tokio::test]
async fn an_issuer_the_document_does_not_name_exactly_is_refused() {
    let provider = OidcProvider::start();
    // The same server, written with a trailing slash: its document says
    // `http://127.0.0.1:PORT`, and issuers are compared as strings.
    let configured = format!("{}/", provider.issuer());
    let key = issuer_key("plain", &configured, PLAIN_ID, PLAIN_SECRET);
    let daemon = Daemon::start("", &key.toml());

    let message = unavailable_message(&get(&daemon, "plain", &[]).await);
    assert!(message.contains("discovery failed"), "{message}");
    assert!(
        message.contains(&format!("{:?}", provider.issuer()))
            && message.contains(&format!("{configured:?}")),
        "both issuers are named: {message}"
    );
    daemon.stop_and_check_log(&[PLAIN_SECRET]);
}

#[tokio::test]
async fn a_method_the_issuer_does_not_list_is_refused() {
    let documents = Documents::start().await;
    let origin = documents.origin();
    documents.serve(
        "/.well-known/openid-configuration",
        200,
        &json!({
            "issuer": origin,
            "token_endpoint": format!("{origin}/token"),
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt"],
        }),
    );
    let key = issuer_key("k", &origin, LOCAL_ID, LOCAL_SECRET);
    let daemon = Daemon::start("", &key.toml());

    let message = unavailable_message(&get(&daemon, "k", &[]).await);
    assert!(
        message.contains("does not list client_secret_basic (auth = \"basic\")")
            && message.contains("client_secret_post, private_key_jwt"),
        "{message}"
    );
    assert_eq!(documents.asked("/token"), 0, "the endpoint was not asked");
    daemon.stop_and_check_log(&[LOCAL_SECRET]);
}

#[tokio::test]
async fn the_document_is_read_once_for_many_gets_at_its_rfc8414_location() {
    let issuer = Issuer::start(vec![ClientSpec::checkout(
        LOCAL_ID,
        LOCAL_SECRET,
        &["a", "b", "c"],
    )])
    .await;
    let documents = Documents::start().await;
    // An issuer with a path: RFC 8414 3.1 puts the well-known segment
    // before it. The OIDC location answers 404, so tokend falls back.
    let configured = format!("{}/tenant", documents.origin());
    let oidc_path = "/tenant/.well-known/openid-configuration";
    let rfc_path = "/.well-known/oauth-authorization-server/tenant";
    documents.serve(
        rfc_path,
        200,
        &json!({
            "issuer": configured,
            "token_endpoint": issuer.token_url(Dialect::Checkout),
        }),
    );
    let key = issuer_key("k", &configured, LOCAL_ID, LOCAL_SECRET)
        .extra("scopes = [\"a\", \"b\", \"c\"]\nprefetch = [[\"a\"], [\"b\"], [\"c\"]]");
    let daemon = Daemon::start("", &key.toml());

    let calls = [
        get(&daemon, "k", &["a"]),
        get(&daemon, "k", &["b"]),
        get(&daemon, "k", &["c"]),
        get(&daemon, "k", &["a", "b"]),
    ];
    for answer in futures_join(calls).await {
        assert_eq!(answer["ok"], true, "{answer}");
    }
    assert_eq!(get(&daemon, "k", &["b", "c"]).await["ok"], true);
    assert_eq!(documents.asked(oidc_path), 1, "OIDC location asked once");
    assert_eq!(documents.asked(rfc_path), 1, "RFC 8414 location read once");
    assert!(issuer.requests().len() >= 5);
    daemon.stop_and_check_log(&[LOCAL_SECRET]);
}

#[tokio::test]
async fn a_failing_discovery_is_retried_with_backoff_not_per_get() {
    let documents = Documents::start().await;
    let origin = documents.origin();
    let path = "/.well-known/openid-configuration";
    documents.serve(path, 500, &json!({"error": "down"}));
    let key = issuer_key("k", &origin, LOCAL_ID, LOCAL_SECRET)
        .extra("max_backoff = \"1s\"\nscopes = [\"a\", \"b\"]");
    let daemon = Daemon::start("", &key.toml());

    for scopes in [&["a"][..], &["b"], &["a"], &["a", "b"], &["b"]] {
        let message = unavailable_message(&get(&daemon, "k", scopes).await);
        assert!(
            message.contains("discovery failed") && message.contains("answered HTTP 500"),
            "{message}"
        );
    }
    // Five gets within the first backoff step: one discovery request.
    assert_eq!(documents.asked(path), 1);

    // The step ends; the next get is the one probe, and it succeeds.
    let issuer = Issuer::start(vec![ClientSpec::checkout(
        LOCAL_ID,
        LOCAL_SECRET,
        &["a", "b"],
    )])
    .await;
    documents.serve(
        path,
        200,
        &json!({"issuer": origin, "token_endpoint": issuer.token_url(Dialect::Checkout)}),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = get(&daemon, "k", &["a"]).await;
        if answer["ok"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "never recovered: {answer}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let asked = documents.asked(path);
    assert!((2..=3).contains(&asked), "{asked} discovery requests");
    daemon.stop_and_check_log(&[LOCAL_SECRET]);
}

/// Awaits all of `calls` at once, as concurrent callers would.
async fn futures_join<F: std::future::Future<Output = Answer>>(calls: [F; 4]) -> Vec<Answer> {
    let [a, b, c, d] = calls;
    let (a, b, c, d) = tokio::join!(a, b, c, d);
    vec![a, b, c, d]
}

fn check_online(dir: &std::path::Path, keys: &str) -> Output {
    let path = dir.join("tokend.toml");
    support::daemon::write_private(&path, keys);
    support::cli::tokend()
        .args(["check", "--online", "--config"])
        .arg(&path)
        .output()
        .expect("run tokend check")
}

#[tokio::test]
async fn check_online_prints_the_document_and_fails_for_an_unreachable_issuer() {
    let provider = OidcProvider::start();
    let dir = tempfile::tempdir().unwrap();
    let key = issuer_key("plain", provider.issuer(), PLAIN_ID, PLAIN_SECRET).toml();
    let ran = check_online(dir.path(), &key);
    let stdout = String::from_utf8_lossy(&ran.stdout);
    assert_eq!(ran.status.code(), Some(0), "{ran:?}");
    assert!(
        stdout.contains(&format!("key \"plain\": issuer {}", provider.issuer()))
            && stdout.contains(&format!("token_endpoint: {}/token", provider.issuer()))
            && stdout.contains("client_secret_basic")
            && stdout.contains("auth client_secret_basic: supported"),
        "{stdout}"
    );

    // A port nothing listens on: bound, then let go.
    let unused = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let gone = format!("http://{}", unused.local_addr().unwrap());
    drop(unused);
    let keys = format!(
        "{key}{}",
        issuer_key("gone", &gone, PLAIN_ID, PLAIN_SECRET).toml()
    );
    let ran = check_online(dir.path(), &keys);
    assert_eq!(ran.status.code(), Some(1), "{ran:?}");
    let stderr = String::from_utf8_lossy(&ran.stderr);
    assert!(
        stderr.contains("key \"gone\": discovery failed: failed to read"),
        "{stderr}"
    );
    assert!(
        !stderr.contains(PLAIN_SECRET)
            && !String::from_utf8_lossy(&ran.stdout).contains(PLAIN_SECRET)
    );
}

/// The discovery example in `config/tokend.toml` (each line commented with
/// "# ", its prose with "# # ") parses once the first "# " of each line is
/// removed.
#[test]
fn the_example_config_issuer_key_parses() {
    let (block, path) = support::keys::example_block("reports");
    let config = tokend::config::parse(&block, &path).unwrap_or_else(|e| panic!("{e}"));
    let tokend::config::Endpoint::Issuer(issuer) = &config.keys["reports"].endpoint else {
        panic!("the example names an issuer");
    };
    assert_eq!(issuer.as_str(), "https://keycloak.example.com/realms/main");
}

/// An EC P-256 key made with `openssl genpkey`, mode 0600, and its public
/// half (PEM) for the server.
fn ec_key(dir: &std::path::Path) -> (std::path::PathBuf, String) {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("ec.pem");
    let made = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
        ])
        .arg(&path)
        .output()
        .expect("run openssl");
    assert!(made.status.success(), "{made:?}");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let public = std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&path)
        .output()
        .expect("run openssl");
    assert!(public.status.success(), "{public:?}");
    (path, String::from_utf8(public.stdout).expect("PEM"))
}

#[tokio::test]
async fn private_key_jwt_signs_for_the_issuer_it_discovered() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (file, public) = ec_key(dir.path());
    let provider = OidcProvider::start_with_env(&[("PKJWT_EC_PUBLIC_KEY", &public)]);
    let key = Key::new("signed")
        .client_id("tokend-jwt-ec")
        .allow_me()
        .extra(&format!(
            "issuer = {:?}\nauth = \"private_key_jwt\"\nprivate_key_file = {:?}\n\
             assertion_audience = \"issuer\"",
            provider.issuer(),
            file.display().to_string()
        ));
    let daemon = Daemon::start("", &key.toml());
    let answer = get(&daemon, "signed", &[]).await;
    assert_eq!(
        answer["ok"],
        true,
        "{answer}; server: {}",
        provider.stderr()
    );
    daemon.stop_and_check_log(&["eyJ"]);
}

#[tokio::test]
async fn a_reload_that_changes_the_issuer_drops_the_cached_token() {
    let provider = OidcProvider::start();
    let key = |issuer: &str| issuer_key("plain", issuer, PLAIN_ID, PLAIN_SECRET).toml();
    let mut daemon = Daemon::start("", &key(provider.issuer()));
    assert_eq!(get(&daemon, "plain", &[]).await["ok"], true);

    // Another issuer string: a changed credential, so the token cached for
    // the old one is not handed out; the new one fails its check.
    daemon.rewrite_keys(&key(&format!("{}/", provider.issuer())));
    assert!(daemon.reload_and_wait(), "the reload was refused");
    let message = unavailable_message(&get(&daemon, "plain", &[]).await);
    assert!(message.contains("discovery failed"), "{message}");
    daemon.stop_and_check_log(&[PLAIN_SECRET]);
}

/// `check --online` prints what the document says, and the document is
/// the issuer's text: its control characters are escaped and its long
/// values cut, so it can neither command the terminal nor print a line of
/// its own, such as a forged verdict for a key.
#[tokio::test]
async fn check_online_prints_a_hostile_document_escaped_and_cut() {
    let documents = Documents::start().await;
    let forged = "key \"k\": ok: tokens come from https://issuer.example/token";
    let evil = format!("\u{1b}]0;pwned\u{7}\u{1b}[2J\r\n{forged}\u{9b}31m\u{202e}");
    let origin = documents.origin();
    documents.serve(
        "/.well-known/openid-configuration",
        200,
        &json!({
            "issuer": format!("{origin}{evil}"),
            "token_endpoint": format!("{origin}/token{evil}{}", "x".repeat(5000)),
            "token_endpoint_auth_methods_supported": [format!("client_secret_basic{evil}")],
        }),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokend.toml");
    let key = issuer_key("k", &origin, LOCAL_ID, LOCAL_SECRET).toml();
    support::daemon::write_private(&path, &key);
    let mut command = support::cli::tokend();
    command.args(["check", "--online", "--config"]).arg(&path);
    let ran = support::cli::run(command, b"").await;
    assert_eq!(ran.code, Some(1), "{ran:?}");
    assert!(
        ran.stdout.contains("  document issuer: "),
        "the document was not printed: {ran:?}"
    );
    for text in [&ran.stdout, &ran.stderr] {
        let found = support::cli::terminal_commands(text);
        assert!(found.is_empty(), "printed {found:?}: {ran:?}");
        for line in text.lines() {
            assert!(!line.starts_with("key \"k\": ok"), "a forged line: {ran:?}");
            assert!(
                line.chars().count() < 1000,
                "a line of {} characters",
                line.chars().count()
            );
        }
    }
    assert!(!ran.stdout.contains(LOCAL_SECRET) && !ran.stderr.contains(LOCAL_SECRET));
}

/// Issue 19, item 10: a hostile document makes no long answer, `status` or
/// log. Three issuers on one loopback server, each with a document built
/// to be repeated: 1,200 listed methods full of terminal escapes, a
/// 250 KB member of the wrong type, and a 250 KB `token_endpoint` that is
/// a URL tokend may use. Every get answer and the `status` answer stay
/// short, hold no control character, and each probe writes a few lines
/// of log, not hundreds of KB.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_document_makes_short_answers_status_and_log() {
    let documents = Documents::start().await;
    let origin = documents.origin();
    let issuer = |tenant: &str| format!("{origin}/{tenant}");
    let method = format!("{}\u{1b}[2J\u{1b}]0;pwned\u{7}", "m".repeat(180));
    let documents_for = [
        (
            "methods",
            json!({
                "issuer": issuer("methods"),
                "token_endpoint": format!("{origin}/token"),
                "token_endpoint_auth_methods_supported": vec![method; 1200],
            }),
        ),
        (
            "field",
            json!({
                "issuer": issuer("field"),
                "token_endpoint": format!("{origin}/token"),
                "token_endpoint_auth_methods_supported": "x".repeat(250_000),
            }),
        ),
        (
            "endpoint",
            json!({
                "issuer": issuer("endpoint"),
                "token_endpoint": format!("{origin}/{}", "e".repeat(250_000)),
            }),
        ),
    ];
    let mut keys = String::new();
    for (tenant, document) in &documents_for {
        let path = format!("/{tenant}/.well-known/openid-configuration");
        documents.serve(&path, 200, document);
        keys += &issuer_key(tenant, &issuer(tenant), LOCAL_ID, LOCAL_SECRET).toml();
    }
    let mut daemon = Daemon::start("", &keys);
    let logged_at_start = daemon.log().len();

    for (tenant, _) in &documents_for {
        let answer = get(&daemon, tenant, &[]).await;
        let message = unavailable_message(&answer);
        let length = answer.0.to_string().len();
        assert!(length < 2048, "{tenant}: a {length}-byte answer");
        assert!(
            !message.chars().any(char::is_control),
            "{tenant}: control characters in {message:?}"
        );
    }
    let status = daemon.call(json!({"op": "status"})).await.0.to_string();
    assert!(status.len() < 8192, "a {}-byte status answer", status.len());
    assert!(!status.contains("\\u001b"), "terminal escapes in {status}");

    let log = daemon.wait_for_log_count("token request failed", documents_for.len());
    let written = log.len() - logged_at_start;
    assert!(
        written < 16 * 1024,
        "{written} bytes of log for three probes"
    );
    assert!(!log.contains('\u{1b}'), "terminal escapes in the log");
    daemon.stop_and_check_log(&[LOCAL_SECRET]);
}
