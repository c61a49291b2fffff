//! Client assertions: the signed JWTs `auth = "private_key_jwt"` sends
//! instead of a client secret (RFC 7523 2.2, OIDC Core 9).
//!
//! A [`SigningKey`] is the PEM text of `private_key_file`, held in memory
//! that is wiped, and what the JOSE crate made of it. Loading one proves
//! the key can sign (one trial signature), so a key ring would refuse (an
//! RSA key under 2048 bits, an EC key off P-256) fails `tokend check`
//! rather than the first token request. A [`ClientAssertion`] is a key's
//! settings plus its loaded key; [`ClientAssertion::sign`] makes a fresh
//! assertion for each token request: `iss` = `sub` = the client id, `aud` =
//! the token endpoint (or the URL `assertion_audience` names), a random
//! 128-bit `jti`, `iat` now and `exp` [`LIFETIME`] later. This module reads
//! no files and sends nothing: `config` reads the file under issue 7's
//! rules, `issuer` puts the assertion in the form.
//!
//! The JOSE crate is `jsonwebtoken` 9.3: it signs RS256, ES256 and EdDSA
//! from PEM (PKCS#8, and PKCS#1 for RSA), it is the most used and
//! maintained JWT crate, and it signs with `ring`, which tokend already
//! links through rustls, so no second crypto library comes in. Its 10 and
//! 11 releases need Rust 1.88, above our MSRV. Its alternatives signing
//! with the RustCrypto `rsa` crate were passed over: that crate's private
//! key operations are not constant-time (RUSTSEC-2023-0071).
//!
//! What is not wiped: `jsonwebtoken` and `ring` keep their own copies of
//! the key (the DER inside `EncodingKey`, the key pair ring parses for each
//! signature) and of the assertion while they build it, in memory they do
//! not zero. tokend's own copies (the PEM text, the finished assertion, the
//! form it goes into) are wiped; `hardening` keeps core dumps and
//! debuggers away from the rest. So that the unwiped DER is not multiplied,
//! a loaded key is shared, never copied: every clone of a [`SigningKey`]
//! (the daemon clones a key's configuration into each cache and service) is
//! the same `Arc`, and a reload that finds the file's text unchanged keeps
//! the running key ([`SigningKey::was_read_from`]) instead of parsing it
//! again. One `EncodingKey` exists per distinct key text in force; it is
//! freed, unwiped, when no configuration in force holds it any longer.
//!
//! Testing: debug builds read [`SKEW_ENV`], a number of seconds added to the
//! clock `iat` and `exp` are computed from, so a test can make the issuer
//! see an expired assertion. Release builds never read it.

use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use url::Url;
use zeroize::Zeroizing;

/// `client_assertion_type` for a JWT (RFC 7523 2.2).
pub const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// How long an assertion is valid. It is used at once, so a short life
/// costs nothing and limits what a copy is worth; Auth0 recommends a
/// minute at most, and the issue asks for no more.
pub const LIFETIME: u64 = 60;

/// Random bytes in a `jti`: 128 bits, so two never collide.
const JTI_BYTES: usize = 16;

/// The test-only clock skew, in seconds (debug builds only).
pub const SKEW_ENV: &str = "TOKEND_TEST_ASSERTION_SKEW";

/// The JWS algorithms tokend signs with, one per key type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum SigningAlg {
    RS256,
    ES256,
    EdDSA,
}

impl SigningAlg {
    fn jose(self) -> Algorithm {
        match self {
            SigningAlg::RS256 => Algorithm::RS256,
            SigningAlg::ES256 => Algorithm::ES256,
            SigningAlg::EdDSA => Algorithm::EdDSA,
        }
    }
}

impl fmt::Display for SigningAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// What kind of private key a PEM file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyKind {
    Rsa,
    /// An EC key; only P-256 signs (a trial signature checks the curve).
    EcP256,
    Ed25519,
}

impl KeyKind {
    /// The one algorithm each kind signs with.
    pub fn alg(self) -> SigningAlg {
        match self {
            KeyKind::Rsa => SigningAlg::RS256,
            KeyKind::EcP256 => SigningAlg::ES256,
            KeyKind::Ed25519 => SigningAlg::EdDSA,
        }
    }
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            KeyKind::Rsa => "an RSA key",
            KeyKind::EcP256 => "an EC key",
            KeyKind::Ed25519 => "an Ed25519 key",
        })
    }
}

/// The `aud` of an assertion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Audience {
    /// The key's `token_url`, what RFC 7523 3 asks for.
    TokenEndpoint,
    /// A URL the operator named, such as the issuer identifier some
    /// issuers expect instead. Kept as written: issuers compare strings,
    /// and a parsed `Url` would add a `/` to a bare origin.
    Named(String),
}

/// Why a key cannot sign, or an assertion could not be made. Never
/// carries key bytes. The messages of a key that cannot be loaded follow
/// the file's name: "/etc/tokend/a.pem holds a public key …".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssertionError {
    #[error(
        "is not a private key tokend can sign with: write an unencrypted PEM private key \
         (RSA of 2048 bits or more, EC P-256 or Ed25519; PKCS#8, or PKCS#1 for RSA)"
    )]
    NotAKey,
    #[error("holds a public key or certificate; private_key_file takes the private key (the issuer gets the public one)")]
    PublicKey,
    #[error(
        "holds an SEC1 \"EC PRIVATE KEY\"; convert it to PKCS#8 with \
         `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.p8`"
    )]
    Sec1,
    #[error("holds an encrypted private key; tokend needs it unencrypted (the file's permissions protect it)")]
    Encrypted,
    #[error("holds {kind}, which signing_alg {alg} does not fit; use {} or leave signing_alg out", kind.alg())]
    AlgMismatch { alg: SigningAlg, kind: KeyKind },
    /// The key parsed but the trial signature failed (an RSA key under
    /// 2048 bits, an EC key on a curve other than P-256).
    #[error("holds {kind} that cannot sign {alg} ({cause}); use an RSA key of 2048 bits or more, an EC P-256 or an Ed25519 key")]
    Unusable {
        kind: KeyKind,
        alg: SigningAlg,
        cause: String,
    },
    #[error("failed to sign the client assertion: {0}")]
    Sign(String),
    #[error("the private key has not been read")]
    NotLoaded,
}

/// A private key that has signed once, so it can sign. Clones share the
/// one loaded copy.
#[derive(Clone)]
pub struct SigningKey {
    loaded: Arc<Loaded>,
}

/// A key as read and parsed, held once behind the `Arc` of every
/// [`SigningKey`] made from it.
struct Loaded {
    /// The file's text: what reload compares to notice a changed key.
    pem: Zeroizing<String>,
    kind: KeyKind,
    alg: SigningAlg,
    /// The key's DER, in the JOSE crate's buffer, which it does not wipe:
    /// why this is shared rather than copied.
    encoding: EncodingKey,
}

impl SigningKey {
    /// Parses `pem` and signs once with `alg` (default: the key's own).
    pub fn from_pem(
        pem: Zeroizing<String>,
        alg: Option<SigningAlg>,
    ) -> Result<SigningKey, AssertionError> {
        let (kind, encoding) = parse_pem(&pem)?;
        let alg = match alg {
            Some(alg) if alg != kind.alg() => {
                return Err(AssertionError::AlgMismatch { alg, kind })
            }
            Some(alg) => alg,
            None => kind.alg(),
        };
        let key = SigningKey {
            loaded: Arc::new(Loaded {
                pem,
                kind,
                alg,
                encoding,
            }),
        };
        let trial = Claims {
            iss: "tokend",
            sub: "tokend",
            aud: "tokend",
            jti: "trial",
            iat: 0,
            exp: 0,
        };
        key.sign_claims(None, &trial)
            .map_err(|e| AssertionError::Unusable {
                kind,
                alg,
                cause: e.to_string(),
            })?;
        Ok(key)
    }

    pub fn kind(&self) -> KeyKind {
        self.loaded.kind
    }

    pub fn alg(&self) -> SigningAlg {
        self.loaded.alg
    }

    /// Whether `other` is this very copy of the key, not an equal one.
    pub fn is_same_copy(&self, other: &SigningKey) -> bool {
        Arc::ptr_eq(&self.loaded, &other.loaded)
    }

    /// Whether this key is what [`SigningKey::from_pem`] would make of
    /// `pem` and `alg`: a reload keeps it rather than parse another copy.
    pub fn was_read_from(&self, pem: &str, alg: Option<SigningAlg>) -> bool {
        *self.loaded.pem == pem && alg.map_or(true, |alg| alg == self.loaded.alg)
    }

    fn sign_claims(
        &self,
        key_id: Option<&str>,
        claims: &Claims<'_>,
    ) -> Result<Jws, jsonwebtoken::errors::Error> {
        let mut header = Header::new(self.loaded.alg.jose());
        header.kid = key_id.map(str::to_owned);
        let text = jsonwebtoken::encode(&header, claims, &self.loaded.encoding)?;
        Ok(Jws(Zeroizing::new(text)))
    }
}

/// The same key, as read from the file: reload's "did the key change".
impl PartialEq for SigningKey {
    fn eq(&self, other: &SigningKey) -> bool {
        self.is_same_copy(other)
            || (self.loaded.pem == other.loaded.pem && self.loaded.alg == other.loaded.alg)
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("kind", &self.loaded.kind)
            .field("alg", &self.loaded.alg)
            .finish_non_exhaustive()
    }
}

/// Which kind of key `pem` holds, by asking the JOSE crate for each in
/// turn: it tells them apart by the PKCS#8 algorithm, and refuses a kind
/// the text is not.
fn parse_pem(pem: &str) -> Result<(KeyKind, EncodingKey), AssertionError> {
    // The crate reads public keys and certificates too, and only the
    // trial signature would fail on them, with a vaguer message.
    if !pem.contains("PRIVATE KEY-----") {
        return Err(
            if pem.contains("PUBLIC KEY-----") || pem.contains("CERTIFICATE-----") {
                AssertionError::PublicKey
            } else {
                AssertionError::NotAKey
            },
        );
    }
    let bytes = pem.as_bytes();
    if let Ok(key) = EncodingKey::from_rsa_pem(bytes) {
        return Ok((KeyKind::Rsa, key));
    }
    if let Ok(key) = EncodingKey::from_ec_pem(bytes) {
        return Ok((KeyKind::EcP256, key));
    }
    if let Ok(key) = EncodingKey::from_ed_pem(bytes) {
        return Ok((KeyKind::Ed25519, key));
    }
    // Two forms people have at hand that the crate does not read, named
    // so the fix is one command away.
    Err(if pem.contains("-----BEGIN EC PRIVATE KEY-----") {
        AssertionError::Sec1
    } else if pem.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") {
        AssertionError::Encrypted
    } else {
        AssertionError::NotAKey
    })
}

/// A key's `private_key_jwt` settings and, once read, its key.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientAssertion {
    pub key_file: std::path::PathBuf,
    /// The JWS `kid`, for issuers that hold several keys of the client.
    pub key_id: Option<String>,
    /// As configured; `None` signs with the key's own algorithm.
    pub signing_alg: Option<SigningAlg>,
    pub audience: Audience,
    /// `None` until `config` has read the file: `config::parse` reads no
    /// files, and a daemon keeps a key it cannot read as unusable.
    pub key: Option<SigningKey>,
}

impl ClientAssertion {
    /// A fresh assertion for one request to `token_url` by `client_id`.
    pub fn sign(&self, client_id: &str, token_url: &Url) -> Result<Jws, AssertionError> {
        self.sign_at(client_id, token_url, unix_now())
    }

    fn sign_at(&self, client_id: &str, token_url: &Url, now: u64) -> Result<Jws, AssertionError> {
        let key = self.key.as_ref().ok_or(AssertionError::NotLoaded)?;
        let aud = match &self.audience {
            Audience::TokenEndpoint => token_url.as_str(),
            Audience::Named(url) => url.as_str(),
        };
        let jti = new_jti();
        let claims = Claims {
            iss: client_id,
            sub: client_id,
            aud,
            jti: &jti,
            iat: now,
            exp: now + LIFETIME,
        };
        key.sign_claims(self.key_id.as_deref(), &claims)
            .map_err(|e| AssertionError::Sign(e.to_string()))
    }
}

/// The claims RFC 7523 3 requires, plus `iat`.
#[derive(Serialize)]
struct Claims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    jti: &'a str,
    iat: u64,
    exp: u64,
}

/// 128 random bits, base64url: unique per assertion so an issuer's replay
/// check (oidc-provider keeps every `jti` until `exp`) never trips.
fn new_jti() -> String {
    let mut bytes = [0u8; JTI_BYTES];
    rand::rng().fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Seconds since the epoch, moved by the test skew in debug builds. A
/// clock before 1970 counts as 1970: the issuer then refuses the
/// assertion as expired, which says what is wrong.
fn unix_now() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    now.saturating_add_signed(skew())
}

#[cfg(debug_assertions)]
fn skew() -> i64 {
    static SKEW: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *SKEW.get_or_init(|| {
        std::env::var(SKEW_ENV)
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    })
}

#[cfg(not(debug_assertions))]
fn skew() -> i64 {
    0
}

/// A signed assertion: a credential until it expires. No `Debug` or
/// `Display`; wiped on drop.
pub struct Jws(Zeroizing<String>);

impl Jws {
    /// The compact JWS. Callers must not log or format it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// A fresh private key from `openssl genpkey` and its public key, PEM,
/// for tests here and in `issuer`.
#[cfg(test)]
pub(crate) fn openssl_key(args: &[&str]) -> (Zeroizing<String>, String) {
    use std::process::Command;
    let dir = tempfile::tempdir().unwrap();
    let private = dir.path().join("key.pem");
    let ran = Command::new("openssl")
        .arg("genpkey")
        .args(args)
        .arg("-out")
        .arg(&private)
        .output()
        .unwrap();
    assert!(ran.status.success(), "{ran:?}");
    let public = Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&private)
        .output()
        .unwrap();
    assert!(public.status.success(), "{public:?}");
    (
        Zeroizing::new(std::fs::read_to_string(&private).unwrap()),
        String::from_utf8(public.stdout).unwrap(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rsa() -> (Zeroizing<String>, String) {
        openssl_key(&["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"])
    }

    fn ec(curve: &str) -> (Zeroizing<String>, String) {
        openssl_key(&[
            "-algorithm",
            "EC",
            "-pkeyopt",
            &format!("ec_paramgen_curve:{curve}"),
        ])
    }

    fn ed25519() -> (Zeroizing<String>, String) {
        openssl_key(&["-algorithm", "ed25519"])
    }

    fn settings(key: SigningKey) -> ClientAssertion {
        ClientAssertion {
            key_file: "/k.pem".into(),
            key_id: Some("kid-1".into()),
            signing_alg: None,
            audience: Audience::TokenEndpoint,
            key: Some(key),
        }
    }

    /// Verifies `jws` with `public` and returns its header and claims.
    fn verify(jws: &Jws, public: &str, alg: Algorithm) -> (Header, serde_json::Value) {
        use jsonwebtoken::{DecodingKey, Validation};
        let key = match alg {
            Algorithm::RS256 => DecodingKey::from_rsa_pem(public.as_bytes()),
            Algorithm::ES256 => DecodingKey::from_ec_pem(public.as_bytes()),
            _ => DecodingKey::from_ed_pem(public.as_bytes()),
        }
        .unwrap();
        let mut rules = Validation::new(alg);
        rules.set_audience(&["https://issuer.example/token"]);
        rules.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(jws.expose(), &key, &rules).unwrap();
        (data.header, data.claims)
    }

    #[test]
    fn each_key_type_signs_with_its_default_algorithm() {
        let url = Url::parse("https://issuer.example/token").unwrap();
        for ((private, public), kind, alg) in [
            (rsa(), KeyKind::Rsa, Algorithm::RS256),
            (ec("P-256"), KeyKind::EcP256, Algorithm::ES256),
            (ed25519(), KeyKind::Ed25519, Algorithm::EdDSA),
        ] {
            let key = SigningKey::from_pem(private, None).unwrap();
            assert_eq!(key.kind(), kind);
            let assertion = settings(key);
            let jws = assertion.sign("client-1", &url).unwrap();
            let (header, claims) = verify(&jws, &public, alg);
            assert_eq!(header.alg, alg);
            assert_eq!(header.kid.as_deref(), Some("kid-1"));
            assert_eq!(claims["iss"], "client-1");
            assert_eq!(claims["sub"], "client-1");
            assert_eq!(claims["aud"], "https://issuer.example/token");
            let (iat, exp) = (
                claims["iat"].as_u64().unwrap(),
                claims["exp"].as_u64().unwrap(),
            );
            assert_eq!(exp - iat, LIFETIME);
            assert!(iat.abs_diff(unix_now()) < 5, "{iat}");
        }
    }

    #[test]
    fn every_assertion_has_its_own_jti() {
        let (private, _) = ec("P-256");
        let assertion = settings(SigningKey::from_pem(private, None).unwrap());
        let url = Url::parse("https://issuer.example/token").unwrap();
        let jti = |jws: &Jws| {
            let payload = jws.expose().split('.').nth(1).unwrap().to_owned();
            let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap();
            let claims: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            claims["jti"].as_str().unwrap().to_owned()
        };
        let first = jti(&assertion.sign_at("c", &url, 1000).unwrap());
        let second = jti(&assertion.sign_at("c", &url, 1000).unwrap());
        assert_ne!(first, second);
        // 16 bytes, base64url without padding.
        assert_eq!(first.len(), 22);
    }

    #[test]
    fn a_named_audience_replaces_the_token_endpoint() {
        let (private, public) = rsa();
        let mut assertion = settings(SigningKey::from_pem(private, None).unwrap());
        assertion.audience = Audience::Named("https://issuer.example/token".into());
        let elsewhere = Url::parse("https://other.example/t").unwrap();
        let (_, claims) = verify(
            &assertion.sign("c", &elsewhere).unwrap(),
            &public,
            Algorithm::RS256,
        );
        assert_eq!(claims["aud"], "https://issuer.example/token");
    }

    #[test]
    fn an_algorithm_that_does_not_fit_the_key_is_refused() {
        let (private, _) = rsa();
        let e = SigningKey::from_pem(private, Some(SigningAlg::ES256)).unwrap_err();
        assert_eq!(
            e.to_string(),
            "holds an RSA key, which signing_alg ES256 does not fit; use RS256 or leave signing_alg out"
        );
        let (private, _) = ed25519();
        let e = SigningKey::from_pem(private, Some(SigningAlg::RS256)).unwrap_err();
        assert!(
            matches!(
                e,
                AssertionError::AlgMismatch {
                    kind: KeyKind::Ed25519,
                    ..
                }
            ),
            "{e}"
        );
        let (private, _) = ec("P-256");
        assert!(SigningKey::from_pem(private, Some(SigningAlg::ES256)).is_ok());
    }

    #[test]
    fn keys_that_cannot_sign_are_refused_when_loaded() {
        let (p384, _) = ec("P-384");
        let e = SigningKey::from_pem(p384, None).unwrap_err();
        assert!(
            matches!(
                e,
                AssertionError::Unusable {
                    kind: KeyKind::EcP256,
                    ..
                }
            ),
            "{e}"
        );
        let (small, _) = openssl_key(&["-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024"]);
        let e = SigningKey::from_pem(small, None).unwrap_err();
        assert!(
            matches!(
                e,
                AssertionError::Unusable {
                    kind: KeyKind::Rsa,
                    ..
                }
            ),
            "{e}"
        );
        for (text, want) in [
            ("not a key", AssertionError::NotAKey),
            ("-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n", AssertionError::Sec1),
            (
                "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
                AssertionError::Encrypted,
            ),
        ] {
            let e = SigningKey::from_pem(Zeroizing::new(text.into()), None).unwrap_err();
            assert_eq!(e, want);
        }
        // A public key is not a private one.
        let (_, public) = rsa();
        let e = SigningKey::from_pem(Zeroizing::new(public), None).unwrap_err();
        assert_eq!(e, AssertionError::PublicKey);
    }

    #[test]
    fn debug_shows_no_key_bytes() {
        let (private, _) = ed25519();
        let body: String = private.lines().nth(1).unwrap().to_owned();
        let assertion = settings(SigningKey::from_pem(private, None).unwrap());
        let shown = format!("{assertion:?} {assertion:#?}");
        assert!(!shown.contains(&body), "{shown}");
        assert!(shown.contains("Ed25519"), "{shown}");
    }

    #[test]
    fn an_unread_key_does_not_sign() {
        let assertion = ClientAssertion {
            key_file: "/k.pem".into(),
            key_id: None,
            signing_alg: None,
            audience: Audience::TokenEndpoint,
            key: None,
        };
        let url = Url::parse("https://issuer.example/token").unwrap();
        assert!(matches!(
            assertion.sign("c", &url),
            Err(AssertionError::NotLoaded)
        ));
    }
}
