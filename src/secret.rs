//! Types that hold secret bytes: the client secret we authenticate with and
//! the access tokens we hand out.
//!
//! Both zero their memory when dropped and print `[redacted]` under `Debug`.
//! Neither implements `Display` or `Serialize`: the only way to the bytes is
//! an explicit `expose()`, which makes every place a secret leaves the type
//! easy to find with grep.

use std::fmt;

use zeroize::Zeroizing;

/// An OAuth 2.0 client secret.
#[derive(Clone, PartialEq, Eq)]
pub struct ClientSecret(Zeroizing<String>);

impl ClientSecret {
    pub fn new(secret: String) -> ClientSecret {
        ClientSecret(Zeroizing::new(secret))
    }

    /// The secret's text. Callers must not log or format it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// An access token as the issuer sent it.
#[derive(Clone, PartialEq, Eq)]
pub struct AccessToken(Zeroizing<String>);

impl AccessToken {
    pub fn new(token: String) -> AccessToken {
        AccessToken(Zeroizing::new(token))
    }

    /// The token's text. Callers must not log or format it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The first 8 hex digits of the token's SHA-256: enough for an
    /// operator to tell tokens apart in a log, useless for using one.
    pub fn fingerprint(&self) -> String {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(self.0.as_bytes());
        digest[..4].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// Read straight from an answer into memory that is wiped (`tokend get`).
impl<'de> serde::Deserialize<'de> for AccessToken {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(AccessToken::new)
    }
}

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_the_bytes() {
        let secret = ClientSecret::new("hunter2-client".into());
        let token = AccessToken::new("eyJhbGciOi.token".into());
        let shown = format!("{secret:?} {token:?} {:#?}", (&secret, &token));
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(!shown.contains("eyJ"), "{shown}");
        assert!(shown.contains("[redacted]"));
    }

    #[test]
    fn fingerprint_is_the_start_of_the_sha256() {
        // sha256("abc") = ba7816bf8f01cfea…
        assert_eq!(AccessToken::new("abc".into()).fingerprint(), "ba7816bf");
    }
}
