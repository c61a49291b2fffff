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

    /// Whether the token can be used as sent, the one rule the daemon
    /// (for an issuer's answer) and `tokend get` (for whatever answers on
    /// `--socket`) both apply. RFC 6749 A.12 makes it `1*VSCHAR`, 0x20 to
    /// 0x7E: anything else (ESC, CR, LF) would reach a header or a terminal
    /// as a command. And no space at either end, whatever the token type:
    /// HTTP drops whitespace around a field value (RFC 9110 5.5), so such
    /// a token never reaches a resource server as issued, and one of
    /// spaces alone is as empty as the empty token. Spaces inside are
    /// VSCHAR and stay allowed (RFC 6750's Bearer syntax has none, but
    /// other token types may).
    pub fn is_well_formed(&self) -> bool {
        let token = self.0.as_bytes();
        let edges = [token.first(), token.last()];
        !token.is_empty()
            && token.iter().all(|b| (0x20..=0x7e).contains(b))
            && !edges.contains(&Some(&b' '))
    }

    /// The first 8 hex digits of the token's SHA-256: enough for an
    /// operator to tell tokens apart in a log, useless for using one.
    pub fn fingerprint(&self) -> Fingerprint {
        use sha2::Digest;
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let digest = sha2::Sha256::digest(self.0.as_bytes());
        let mut hex = [0; 8];
        for (i, b) in digest[..4].iter().enumerate() {
            hex[2 * i] = HEX[usize::from(b >> 4)];
            hex[2 * i + 1] = HEX[usize::from(b & 0xf)];
        }
        Fingerprint(hex)
    }
}

/// A token's fingerprint ([`AccessToken::fingerprint`]), not a secret.
/// Held inline rather than as a `String`: every cached token and every
/// audit subject has one, and a heap string of 8 bytes costs 32.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 8]);

impl Fingerprint {
    /// A fingerprint as written in a log line, for tests of those lines.
    #[cfg(test)]
    pub(crate) const fn from_hex(hex: [u8; 8]) -> Fingerprint {
        Fingerprint(hex)
    }

    pub fn as_str(&self) -> &str {
        // Hex digits only, so always UTF-8.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
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
    fn a_well_formed_token_is_visible_ascii_without_spaces_around() {
        let ok = |t: &str| AccessToken::new(t.into()).is_well_formed();
        assert!(ok("eyJ.x.y"));
        assert!(ok("a b"), "a space inside is VSCHAR");
        assert!(ok("x"));
        for bad in [
            "",
            " ",
            "   ",
            " x",
            "x ",
            "x\r\n",
            "\u{1b}[2J",
            "t\u{7f}",
            "é",
            "x\t",
        ] {
            assert!(!ok(bad), "{:?}", bad.len());
        }
    }

    #[test]
    fn fingerprint_is_the_start_of_the_sha256() {
        // sha256("abc") = ba7816bf8f01cfea…
        let fingerprint = AccessToken::new("abc".into()).fingerprint();
        assert_eq!(fingerprint.as_str(), "ba7816bf");
        assert_eq!(fingerprint.to_string(), "ba7816bf");
    }
}
