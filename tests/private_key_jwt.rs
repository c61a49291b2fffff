//! `auth = "private_key_jwt"` (RFC 7523) against the real `oidc-provider`
//! 8.8.1 (`tests/oidc/server.mjs`), and `tokend check` on its settings.
//!
//! Keys are made fresh for each test with `openssl genpkey`, the command
//! the README gives operators; the server registers their public halves
//! (`PKJWT_*_PUBLIC_KEY`) for its clients `tokend-jwt-rsa` (with a `kid`)
//! and `tokend-jwt-ec` (without). oidc-provider answers every failed client
//! authentication with the same `invalid_client: client authentication
//! failed`; the reason it had (wrong key, audience, expiry) is on its
//! stderr, which the refusal tests read to prove each was refused for the
//! reason meant. Every daemon's log is checked for the key files' text and
//! for any JWS (`eyJ`), assertions and access tokens alike.

mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{json, Value};
use support::cli::{run, tokend};
use support::daemon::{assert_same_token, token_of, write_private, Answer, Daemon, PATIENCE};
use support::keys::Key;
use support::oidc::OidcProvider;

const RSA_CLIENT: &str = "tokend-jwt-rsa";
const RSA_KID: &str = "tokend-rsa-1";
const EC_CLIENT: &str = "tokend-jwt-ec";
/// What tokend logs (at debug) before each issuer request.
const REQUESTING: &str = "requesting a token from the issuer";
/// What every refused assertion is answered with.
const REFUSED: &str = "HTTP 401: invalid_client: client authentication failed";

/// Private keys in a temporary directory, each mode 0600.
struct KeyFiles {
    dir: tempfile::TempDir,
}

impl KeyFiles {
    fn new() -> KeyFiles {
        KeyFiles {
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// `openssl genpkey ARGS` into NAME.pem.
    fn generate(&self, name: &str, args: &[&str]) -> PathBuf {
        let path = self.dir.path().join(format!("{name}.pem"));
        let out = Command::new("openssl")
            .arg("genpkey")
            .args(args)
            .arg("-out")
            .arg(&path)
            .output()
            .expect("run openssl");
        assert!(out.status.success(), "openssl genpkey: {out:?}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        path
    }

    fn rsa(&self, name: &str) -> PathBuf {
        self.generate(
            name,
            &["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"],
        )
    }

    fn ec(&self, name: &str) -> PathBuf {
        self.generate(
            name,
            &["-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"],
        )
    }
}

/// The public half of a private key file, PEM.
fn public_pem(private: &Path) -> String {
    let out = Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(private)
        .output()
        .expect("run openssl");
    assert!(out.status.success(), "openssl pkey: {out:?}");
    String::from_utf8(out.stdout).expect("PEM is text")
}

/// The base64 lines of PEM files: what must never reach a log.
fn pem_bodies(files: &[&Path]) -> Vec<String> {
    files
        .iter()
        .flat_map(|path| {
            let text = std::fs::read_to_string(path).expect("read key");
            text.lines()
                .filter(|line| !line.starts_with("-----") && line.len() >= 16)
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The RSA and EC keys the server knows, and the server.
fn start() -> (KeyFiles, PathBuf, PathBuf, OidcProvider) {
    let keys = KeyFiles::new();
    let rsa = keys.rsa("rsa");
    let ec = keys.ec("ec");
    let provider = OidcProvider::start_with_env(&[
        ("PKJWT_RSA_PUBLIC_KEY", &public_pem(&rsa)),
        ("PKJWT_EC_PUBLIC_KEY", &public_pem(&ec)),
    ]);
    (keys, rsa, ec, provider)
}

fn quote(value: &str) -> String {
    toml::Value::String(value.to_owned()).to_string()
}

/// A `private_key_jwt` key for `client`, signing with `file`.
fn jwt_key(name: &str, provider: &OidcProvider, client: &str, file: &Path, extra: &str) -> Key {
    Key::new(name)
        .url(&provider.token_url())
        .client_id(client)
        .allow_me()
        .extra(&format!(
            "auth = \"private_key_jwt\"\nprivate_key_file = {}\n{extra}",
            quote(&file.display().to_string())
        ))
}

async fn get(daemon: &Daemon, key: &str) -> Answer {
    daemon.call(json!({"op":"get","key":key})).await
}
fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWT");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url")).expect("JSON")
}

fn unavailable_message(answer: &Answer) -> String {
    assert_eq!(answer["ok"], false, "{answer}");
    assert_eq!(answer["error"]["code"], "unavailable", "{answer}");
    answer["error"]["message"]
        .as_str()
        .expect("error message")
        .to_owned()
}

/// Waits until the server's stderr has `needle`. Polled: the stderr sink
/// has no notification, and the server writes the line before it answers,
/// so this ends within a few reads.
fn wait_for_server_line(provider: &OidcProvider, needle: &str) {
    let deadline = Instant::now() + PATIENCE;
    while !provider.stderr().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "the oidc server never said {needle:?}; its stderr:\n{}",
            provider.stderr()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Stops the daemon, checks its log for the key files' text and any JWS.
fn stop_and_check(daemon: Daemon, key_files: &[&Path]) {
    let log = daemon.stop_and_check_log(&pem_bodies(key_files));
    assert!(
        !log.contains("eyJ"),
        "the daemon's log holds a JWS (an assertion or a token)"
    );
}

#[tokio::test]
async fn rsa_and_ec_keys_get_tokens() {
    let (_keys, rsa, ec, provider) = start();
    let issuer_aud = format!("assertion_audience = {}", quote(provider.issuer()));
    let tables = [
        jwt_key(
            "rsa",
            &provider,
            RSA_CLIENT,
            &rsa,
            &format!("key_id = \"{RSA_KID}\""),
        ),
        jwt_key("ec", &provider, EC_CLIENT, &ec, "signing_alg = \"ES256\""),
        // The issuer identifier is an audience oidc-provider accepts too.
        jwt_key("ec-issuer-aud", &provider, EC_CLIENT, &ec, &issuer_aud),
    ];
    let daemon = Daemon::start("", &support::keys::tables(&tables));

    for (name, client) in [
        ("rsa", RSA_CLIENT),
        ("ec", EC_CLIENT),
        ("ec-issuer-aud", EC_CLIENT),
    ] {
        let answer = get(&daemon, name).await;
        let token = token_of(&answer);
        assert_eq!(answer["token_type"], "Bearer", "{answer}");
        assert_eq!(claims(&token)["client_id"], client, "{name}");
        // Cached like any token: the second get makes no request.
        let again = token_of(&get(&daemon, name).await);
        assert_same_token(&again, &token, true, name);
    }
    assert_eq!(daemon.log().matches(REQUESTING).count(), 3);
    assert!(!provider.stderr().contains("grant.error"));

    stop_and_check(daemon, &[&rsa, &ec]);
}

#[tokio::test]
async fn unknown_key_and_wrong_audience_are_refused_clearly() {
    let (keys, rsa, _ec, provider) = start();
    let stranger = keys.rsa("stranger");
    let tables = [
        jwt_key(
            "stranger",
            &provider,
            RSA_CLIENT,
            &stranger,
            &format!("key_id = \"{RSA_KID}\""),
        ),
        jwt_key(
            "wrong-aud",
            &provider,
            RSA_CLIENT,
            &rsa,
            "assertion_audience = \"https://elsewhere.example/token\"",
        ),
    ];
    let daemon = Daemon::start("", &support::keys::tables(&tables));

    for (name, reason) in [
        // jose's words when no registered key verifies the signature.
        ("stranger", "signature verification failed"),
        (
            "wrong-aud",
            "audience (aud) must equal the endpoint url, issuer identifier or token endpoint url",
        ),
    ] {
        let message = unavailable_message(&get(&daemon, name).await);
        assert!(message.contains("access denied"), "{name}: {message}");
        assert!(message.contains(REFUSED), "{name}: {message}");
        assert!(!message.contains("eyJ"), "{name}: {message}");
        wait_for_server_line(&provider, &format!("grant.error: invalid_client: {reason}"));
    }

    stop_and_check(daemon, &[&rsa, &stranger]);
}

#[tokio::test]
async fn an_expired_assertion_is_refused_clearly() {
    let (_keys, rsa, _ec, provider) = start();
    let tables = jwt_key("rsa", &provider, RSA_CLIENT, &rsa, "").toml();
    // An hour back: beyond any clock tolerance, so exp has passed.
    let daemon = Daemon::builder()
        .keys(&tables)
        .env("TOKEND_TEST_ASSERTION_SKEW", "-3600")
        .start();

    let message = unavailable_message(&get(&daemon, "rsa").await);
    assert!(message.contains(REFUSED), "{message}");
    wait_for_server_line(&provider, "grant.error: invalid_client: jwt expired");

    stop_and_check(daemon, &[&rsa]);
}

#[tokio::test]
async fn a_changed_key_file_is_a_changed_credential_on_reload() {
    let (keys, rsa, _ec, provider) = start();
    let table = |file: &Path| {
        jwt_key(
            "rsa",
            &provider,
            RSA_CLIENT,
            file,
            &format!("key_id = \"{RSA_KID}\""),
        )
        .toml()
    };
    let mut daemon = Daemon::start("", &table(&rsa));
    let first = token_of(&get(&daemon, "rsa").await);

    // Nothing changed: the token is carried over.
    assert!(daemon.reload_and_wait());
    assert_same_token(&token_of(&get(&daemon, "rsa").await), &first, true, "kept");

    // The same key at another path: a new request, a new token.
    let moved = keys.dir.path().join("moved.pem");
    std::fs::copy(&rsa, &moved).expect("copy key");
    daemon.rewrite_keys(&table(&moved));
    assert!(daemon.reload_and_wait());
    let second = token_of(&get(&daemon, "rsa").await);
    assert_same_token(&second, &first, false, "after the path changed");

    // Other contents at the same path: the cached token is dropped, and
    // the server does not know the new key.
    let stranger = keys.rsa("stranger");
    std::fs::copy(&stranger, &moved).expect("copy key");
    assert!(daemon.reload_and_wait());
    let message = unavailable_message(&get(&daemon, "rsa").await);
    assert!(message.contains(REFUSED), "{message}");
    assert_eq!(daemon.log().matches(REQUESTING).count(), 3);

    stop_and_check(daemon, &[&rsa, &stranger]);
}

#[tokio::test]
async fn a_daemon_serves_a_key_it_cannot_read_as_unavailable_until_a_reload() {
    let (_keys, rsa, _ec, provider) = start();
    std::fs::set_permissions(&rsa, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let mut daemon = Daemon::start("", &jwt_key("rsa", &provider, RSA_CLIENT, &rsa, "").toml());

    // Started anyway: the key is unusable, with the reason and the fix.
    let message = unavailable_message(&get(&daemon, "rsa").await);
    let shown = rsa.display();
    assert!(
        message.contains(&format!(
            "private_key_file: {shown} is readable by others (mode 0644); chmod 0600 {shown}"
        )),
        "{message}"
    );
    assert!(message.contains("fix it and reload"), "{message}");

    std::fs::set_permissions(&rsa, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    assert!(daemon.reload_and_wait());
    token_of(&get(&daemon, "rsa").await);

    stop_and_check(daemon, &[&rsa]);
}

/// `tokend check` on `keys` after a minimal `[daemon]` section: its exit
/// code and its one stderr line.
async fn check(dir: &Path, keys: &str) -> (Option<i32>, String) {
    let path = dir.join("tokend.toml");
    write_private(&path, keys);
    let mut command = tokend();
    command.args(["check", "--config"]).arg(&path);
    let ran = run(command, b"").await;
    (ran.code, ran.stderr)
}

const HEAD: &str = "[keys.a]\ntoken_url = \"https://issuer.example/t\"\nclient_id = \"i\"\n\
                    allow_uids = [0]\nauth = \"private_key_jwt\"\n";

fn with_file(file: &Path, more: &str) -> String {
    format!(
        "{HEAD}private_key_file = {}\n{more}",
        quote(&file.display().to_string())
    )
}

#[tokio::test]
async fn check_accepts_each_key_type() {
    let keys = KeyFiles::new();
    let ed = keys.generate("ed", &["-algorithm", "ed25519"]);
    for (file, alg) in [
        (keys.rsa("rsa"), "RS256"),
        (keys.ec("ec"), "ES256"),
        (ed, "EdDSA"),
    ] {
        let (code, stderr) = check(keys.dir.path(), &with_file(&file, "")).await;
        assert_eq!((code, stderr.as_str()), (Some(0), ""), "{alg}");
        let explicit = with_file(&file, &format!("signing_alg = \"{alg}\"\n"));
        let (code, stderr) = check(keys.dir.path(), &explicit).await;
        assert_eq!((code, stderr.as_str()), (Some(0), ""), "{alg}");
    }
}

#[tokio::test]
async fn check_refuses_bad_private_key_jwt_settings() {
    let keys = KeyFiles::new();
    let dir = keys.dir.path();
    let rsa = keys.rsa("rsa");
    let config = dir.join("tokend.toml").display().to_string();
    let shown = rsa.display().to_string();

    // Readable by its group: refused like a secret file, key text unsaid.
    std::fs::set_permissions(&rsa, std::fs::Permissions::from_mode(0o640)).expect("chmod");
    let (code, stderr) = check(dir, &with_file(&rsa, "")).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stderr,
        format!(
            "{config}:1:1: key \"a\": private_key_file: {shown} is readable by group or \
             others (mode 0640); chmod 0600 {shown}\n"
        )
    );
    for body in pem_bodies(&[&rsa]) {
        assert!(!stderr.contains(&body));
    }
    std::fs::set_permissions(&rsa, std::fs::Permissions::from_mode(0o600)).expect("chmod");

    let missing = dir.join("missing.pem");
    let (code, stderr) = check(dir, &with_file(&missing, "")).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "{config}:1:1: key \"a\": private_key_file: failed to open {}",
            missing.display()
        )),
        "{stderr}"
    );

    let (code, stderr) = check(dir, &with_file(&rsa, "signing_alg = \"ES256\"\n")).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stderr,
        format!(
            "{config}:1:1: key \"a\": private_key_file: {shown} holds an RSA key, \
             which signing_alg ES256 does not fit; use RS256 or leave signing_alg out\n"
        )
    );

    let (code, stderr) = check(dir, HEAD).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stderr,
        format!(
            "{config}:1:1: key \"a\": auth = \"private_key_jwt\" needs private_key_file \
             (a PEM private key)\n"
        )
    );

    let (code, stderr) = check(dir, &with_file(&rsa, "client_secret = \"s\"\n")).await;
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stderr,
        format!(
            "{config}:1:1: key \"a\" sets both auth = \"private_key_jwt\" and \
             client_secret; that method signs with private_key_file and sends no secret: \
             remove client_secret\n"
        )
    );
}

/// The `private_key_jwt` example at the end of `config/tokend.toml` (each
/// line commented with "# ", its prose with "# # ") parses once the first
/// "# " of each line is removed.
#[test]
fn the_example_config_private_key_jwt_key_parses() {
    let (block, path) = support::keys::example_block("signed");
    let config = tokend::config::parse(&block, &path).unwrap_or_else(|e| panic!("{e}"));
    let key = &config.keys["signed"];
    assert_eq!(key.auth, tokend::config::AuthMethod::PrivateKeyJwt);
    let assertion = key.assertion.as_ref().expect("assertion settings");
    assert_eq!(assertion.key_file, Path::new("/etc/tokend/signed.pem"));
}
