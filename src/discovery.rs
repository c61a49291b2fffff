//! Issuer discovery (RFC 8414, OpenID Connect Discovery 1.0): from a key's
//! `issuer` to its token endpoint.
//!
//! Owns the well-known URLs, the reading of a discovery document (a pure
//! function over bytes), the checks tokend makes on it, and the per-key
//! cache of what was found. It does not decide when to retry: a failure is
//! a [`crate::issuer::IssuerError`] with [`FailureKind::Discovery`], which pauses the key
//! in the token cache's issuer budget, so the issuer hears one probe per
//! backoff step whatever the number of scope sets.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use tokio::sync::OnceCell;
use tokio::time::Instant;
use url::Url;

use crate::config::{Endpoint, IssuerId, KeyConfig};
use crate::issuer::{printable, FailureKind};

/// How long a discovered token endpoint is used before the document is
/// read again: issuers move endpoints rarely, and the issue asks for at
/// most hourly.
pub const REFRESH_AFTER: Duration = Duration::from_secs(3600);

/// The most of a discovery document we read. Keycloak's and Entra ID's are
/// a few KiB; anything near this is not a discovery document.
pub const MAX_DOCUMENT_BYTES: usize = 256 * 1024;

/// What tokend reads of a discovery document. Other members are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Document {
    pub issuer: String,
    pub token_endpoint: String,
    /// `None` when the document leaves it out: RFC 8414 2 then implies
    /// `client_secret_basic`, but OIDC Discovery leaves it open, so tokend
    /// does not guess and sends what the key says.
    pub token_endpoint_auth_methods_supported: Option<Vec<String>>,
}

/// The two well-known locations, in the order they are tried.
///
/// OpenID Connect Discovery 4 appends `/.well-known/openid-configuration`
/// to the issuer (its path included). RFC 8414 3.1 inserts
/// `/.well-known/oauth-authorization-server` between the host and the
/// issuer's path. For an issuer without a path both are the same as
/// appending. A trailing `/` of the issuer is dropped before either.
pub fn well_known_urls(issuer: &IssuerId) -> [Url; 2] {
    let base = issuer.url();
    let path = base.path().trim_end_matches('/');
    let mut oidc = base.clone();
    oidc.set_path(&format!("{path}/.well-known/openid-configuration"));
    let mut rfc8414 = base.clone();
    rfc8414.set_path(&format!("/.well-known/oauth-authorization-server{path}"));
    [oidc, rfc8414]
}

/// Reads a document's bytes.
pub fn parse(body: &[u8]) -> Result<Document, String> {
    // serde's words quote the member that did not fit, however long.
    serde_json::from_slice(body)
        .map_err(|e| format!("not a discovery document: {}", printable(&e.to_string())))
}

impl Document {
    /// The token endpoint `key` may use, after the checks RFC 8414 3.3 and
    /// OIDC Discovery 4.3 ask for, and the key's method against the list.
    pub fn token_endpoint_for(&self, key: &KeyConfig, issuer: &IssuerId) -> Result<Url, String> {
        if self.issuer != issuer.as_str() {
            return Err(format!(
                "the document's issuer {:?} is not the configured issuer {:?} (they must be \
                 equal as strings; fix issuer in the key)",
                printable(&self.issuer),
                issuer.as_str()
            ));
        }
        let endpoint = Url::parse(&self.token_endpoint).map_err(|e| {
            format!(
                "token_endpoint {:?} is not a URL: {e}",
                printable(&self.token_endpoint)
            )
        })?;
        // The secret goes wherever the document says: only over TLS, or
        // to loopback when the issuer itself is a loopback test server.
        let allowed = match endpoint.scheme() {
            "https" => true,
            "http" => issuer.is_loopback_http() && is_loopback(&endpoint),
            _ => false,
        };
        if !allowed {
            return Err(format!(
                "token_endpoint {:?} does not use https",
                printable(&self.token_endpoint)
            ));
        }
        if !self.supports(key) {
            return Err(format!(
                "the issuer does not list {} (auth = \"{}\") in \
                 token_endpoint_auth_methods_supported: it lists {}",
                key.auth.registered_name(),
                key.auth,
                self.methods()
            ));
        }
        Ok(endpoint)
    }

    /// Whether the key's method is listed, or no list was given.
    pub fn supports(&self, key: &KeyConfig) -> bool {
        self.token_endpoint_auth_methods_supported
            .as_ref()
            .map_or(true, |methods| {
                methods.iter().any(|m| m == key.auth.registered_name())
            })
    }

    /// The listed methods for a message, or "(not listed)": the list as a
    /// whole is bounded like any issuer text, since a document may list
    /// thousands.
    pub fn methods(&self) -> String {
        match &self.token_endpoint_auth_methods_supported {
            Some(methods) => printable(&methods.join(", ")),
            None => "(not listed)".to_owned(),
        }
    }
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(name)) => name == "localhost",
        None => false,
    }
}

/// Reads `issuer`'s document with `http`: the OIDC location, and on a 404
/// the RFC 8414 one. No secret is sent. Bounded by [`MAX_DOCUMENT_BYTES`];
/// the caller bounds the time.
pub async fn fetch(http: &reqwest::Client, issuer: &IssuerId) -> Result<Document, String> {
    let [oidc, rfc8414] = well_known_urls(issuer);
    match get(http, &oidc).await? {
        Some(body) => parse(&body),
        None => match get(http, &rfc8414).await? {
            Some(body) => parse(&body),
            None => Err(format!("neither {oidc} nor {rfc8414} exists (HTTP 404)")),
        },
    }
}

/// The body of a 200, `None` for a 404, an error otherwise.
async fn get(http: &reqwest::Client, url: &Url) -> Result<Option<Vec<u8>>, String> {
    let failed = |e: reqwest::Error| {
        let mut source: &dyn std::error::Error = &e;
        while let Some(inner) = source.source() {
            source = inner;
        }
        format!("failed to read {url}: {source}")
    };
    let mut response = http
        .get(url.clone())
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(failed)?;
    match response.status().as_u16() {
        200 => {}
        404 => return Ok(None),
        status => return Err(format!("{url} answered HTTP {status}")),
    }
    let too_large = || format!("{url} is larger than {MAX_DOCUMENT_BYTES} bytes");
    if response
        .content_length()
        .is_some_and(|n| n > MAX_DOCUMENT_BYTES as u64)
    {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(failed)? {
        if body.len() + chunk.len() > MAX_DOCUMENT_BYTES {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// One discovery under way or done: every owner of the key that asks
/// while it is out waits for the same outcome (single flight).
struct Slot {
    issuer: IssuerId,
    outcome: OnceCell<(Result<Url, FailureKind>, Instant)>,
}

impl Slot {
    /// Whether the next lookup must start a new discovery: a failure is
    /// never reused (the key's pause already spaced the retry), a success
    /// for [`REFRESH_AFTER`].
    fn spent(&self, issuer: &IssuerId, now: Instant) -> bool {
        if &self.issuer != issuer {
            return true;
        }
        match self.outcome.get() {
            None => false,
            Some((Err(_), _)) => true,
            Some((Ok(_), at)) => now.duration_since(*at) >= REFRESH_AFTER,
        }
    }
}

/// The discovered token endpoints of one [`crate::issuer::IssuerClient`]'s
/// keys, by key name. A reload builds a new client, and with it an empty
/// cache: a changed `ca_file` or `proxy` may change what is reachable.
#[derive(Default)]
pub struct Discoveries {
    /// Held only to look up or replace a slot, never across an await.
    slots: Mutex<HashMap<String, Arc<Slot>>>,
}

impl Discoveries {
    /// The token endpoint of `key`: its `token_url`, or what its issuer's
    /// document names, discovered at most once at a time per key.
    pub async fn token_endpoint(
        &self,
        key: &KeyConfig,
        http: Option<&reqwest::Client>,
    ) -> Result<Url, FailureKind> {
        let issuer = match &key.endpoint {
            Endpoint::TokenUrl(url) => return Ok(url.clone()),
            Endpoint::Issuer(issuer) => issuer,
        };
        let slot = self.slot(&key.name, issuer);
        let (outcome, _) = slot
            .outcome
            .get_or_init(|| async { (discover(key, issuer, http).await, Instant::now()) })
            .await;
        outcome.clone()
    }

    fn slot(&self, name: &str, issuer: &IssuerId) -> Arc<Slot> {
        let now = Instant::now();
        // A poisoned lock only means another task panicked mid-insert;
        // the map is still a map.
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        match slots.get(name) {
            Some(slot) if !slot.spent(issuer, now) => slot.clone(),
            _ => {
                let slot = Arc::new(Slot {
                    issuer: issuer.clone(),
                    outcome: OnceCell::new(),
                });
                slots.insert(name.to_owned(), slot.clone());
                slot
            }
        }
    }
}

/// One discovery for `key`, within its `request_timeout`.
async fn discover(
    key: &KeyConfig,
    issuer: &IssuerId,
    http: Option<&reqwest::Client>,
) -> Result<Url, FailureKind> {
    let http = http.ok_or_else(|| {
        FailureKind::Discovery("no HTTP client was set up for this key".to_owned())
    })?;
    let document = match tokio::time::timeout(key.request_timeout, fetch(http, issuer)).await {
        Ok(Ok(document)) => document,
        Ok(Err(why)) => return Err(FailureKind::Discovery(why)),
        Err(_) => {
            return Err(FailureKind::Discovery(format!(
                "no answer from {issuer} within {}",
                humantime::format_duration(key.request_timeout),
                issuer = issuer.as_str()
            )))
        }
    };
    let endpoint = document
        .token_endpoint_for(key, issuer)
        .map_err(FailureKind::Discovery)?;
    tracing::info!(
        key = %key.name,
        issuer = issuer.as_str(),
        token_endpoint = printable(endpoint.as_str()),
        "discovered the token endpoint"
    );
    Ok(endpoint)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(text: &str) -> KeyConfig {
        let config = crate::config::parse(text, std::path::Path::new("t.toml")).unwrap();
        config.keys.into_values().next().unwrap()
    }

    fn issuer_of(key: &KeyConfig) -> IssuerId {
        match &key.endpoint {
            Endpoint::Issuer(issuer) => issuer.clone(),
            Endpoint::TokenUrl(_) => panic!("no issuer"),
        }
    }

    const KEY: &str = "[keys.k]\nclient_id = \"i\"\nclient_secret = \"s\"\n";

    #[test]
    fn well_known_urls_follow_both_specs() {
        let k = key(&format!("{KEY}issuer = \"https://a.example\"\n"));
        let [oidc, rfc] = well_known_urls(&issuer_of(&k));
        assert_eq!(
            oidc.as_str(),
            "https://a.example/.well-known/openid-configuration"
        );
        assert_eq!(
            rfc.as_str(),
            "https://a.example/.well-known/oauth-authorization-server"
        );
        let k = key(&format!("{KEY}issuer = \"https://a.example/realms/x/\"\n"));
        let [oidc, rfc] = well_known_urls(&issuer_of(&k));
        assert_eq!(
            oidc.as_str(),
            "https://a.example/realms/x/.well-known/openid-configuration"
        );
        assert_eq!(
            rfc.as_str(),
            "https://a.example/.well-known/oauth-authorization-server/realms/x"
        );
    }

    #[test]
    fn documents_are_checked() {
        let k = key(&format!("{KEY}issuer = \"https://a.example\"\n"));
        let issuer = issuer_of(&k);
        let doc = parse(
            br#"{"issuer":"https://a.example","token_endpoint":"https://a.example/t",
                "token_endpoint_auth_methods_supported":["client_secret_basic"],"x":1}"#,
        )
        .unwrap();
        assert_eq!(
            doc.token_endpoint_for(&k, &issuer).unwrap().as_str(),
            "https://a.example/t"
        );
        let slash = Document {
            issuer: "https://a.example/".into(),
            ..doc.clone()
        };
        let e = slash.token_endpoint_for(&k, &issuer).unwrap_err();
        assert!(
            e.contains("\"https://a.example/\"") && e.contains("\"https://a.example\""),
            "{e}"
        );
        let plain = Document {
            token_endpoint: "http://a.example/t".into(),
            ..doc.clone()
        };
        assert!(plain
            .token_endpoint_for(&k, &issuer)
            .unwrap_err()
            .contains("does not use https"));
        let post_only = Document {
            token_endpoint_auth_methods_supported: Some(vec!["client_secret_post".into()]),
            ..doc.clone()
        };
        let e = post_only.token_endpoint_for(&k, &issuer).unwrap_err();
        assert!(e.contains("client_secret_basic (auth = \"basic\")"), "{e}");
        let unlisted = Document {
            token_endpoint_auth_methods_supported: None,
            ..doc
        };
        assert!(unlisted.token_endpoint_for(&k, &issuer).is_ok());
        assert!(parse(b"<html>").is_err());
        assert!(parse(br#"{"issuer":"x"}"#).is_err());
    }

    #[test]
    fn document_text_in_messages_is_bounded_and_printable() {
        let k = key(&format!("{KEY}issuer = \"https://a.example\"\n"));
        let issuer = issuer_of(&k);
        let method = format!("{}\u{1b}[2J", "m".repeat(200));
        let listed = Document {
            issuer: "https://a.example".into(),
            token_endpoint: "https://a.example/t".into(),
            token_endpoint_auth_methods_supported: Some(vec![method; 1200]),
        };
        let e = listed.token_endpoint_for(&k, &issuer).unwrap_err();
        assert!(e.len() < 1024, "{} bytes", e.len());
        assert!(!e.chars().any(char::is_control), "{e:?}");
        for long in [
            Document {
                issuer: "x".repeat(250_000),
                ..listed.clone()
            },
            Document {
                token_endpoint: "y".repeat(250_000),
                ..listed.clone()
            },
            Document {
                token_endpoint: format!("http://a.example/{}", "z".repeat(250_000)),
                ..listed
            },
        ] {
            let e = long.token_endpoint_for(&k, &issuer).unwrap_err();
            assert!(e.len() < 1024, "{} bytes", e.len());
        }
        let body = format!(
            r#"{{"issuer":"i","token_endpoint":"t","token_endpoint_auth_methods_supported":"{}"}}"#,
            "w".repeat(250_000)
        );
        let e = parse(body.as_bytes()).unwrap_err();
        assert!(e.len() < 1024, "{} bytes", e.len());
    }

    #[test]
    fn loopback_issuers_may_name_loopback_http_endpoints() {
        let k = key(&format!("{KEY}issuer = \"http://127.0.0.1:9\"\n"));
        let issuer = issuer_of(&k);
        let doc = Document {
            issuer: "http://127.0.0.1:9".into(),
            token_endpoint: "http://127.0.0.1:9/token".into(),
            token_endpoint_auth_methods_supported: None,
        };
        assert!(doc.token_endpoint_for(&k, &issuer).is_ok());
        let away = Document {
            token_endpoint: "http://10.0.0.1/token".into(),
            ..doc
        };
        assert!(away.token_endpoint_for(&k, &issuer).is_err());
    }
}
