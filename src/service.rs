//! What each request means: decoding it, deciding whether this caller may
//! have what it asks for, and turning cache results into answers.
//!
//! Every token handout, every denial and every reload asked over the
//! socket is reported to the audit log ([`crate::audit`]), with the key,
//! the scope set and the caller, and never the token; the audit log
//! decides which of them are lines of their own and which are counted.

use std::sync::Arc;
use std::time::SystemTime;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use zeroize::Zeroizing;

use crate::audit::{self, Audit, Event, ReloadAsker, ReloadOutcome};
use crate::cache::{CachedToken, GetError, SetId, TokenCache};
use crate::config::{Config, KeyConfig};
use crate::metrics::http::health::Health;
use crate::metrics::{self, MetricsError};
use crate::peer::{self, Caller};
use crate::protocol::{
    self, ErrorBody, ErrorCode, KeyInfo, KeyStatus, MetricsAnswer, Op, ReloadAnswer, Response,
    SetHealth, SetState, SetStatus, StatusAnswer, TokenLine,
};
use crate::scope::{ScopeError, ScopeSet};

/// The daemon's answering logic over its configuration and cache.
pub(crate) struct Service {
    config: Arc<Config>,
    cache: TokenCache,
    /// Cancelled at the shutdown deadline: a get still waiting on the
    /// issuer then is answered `unavailable` rather than left hanging.
    deadline: CancellationToken,
    /// Where `reload` requests go: the daemon's reloader, which answers
    /// each with the outcome. `None` where nobody reloads.
    reloads: Option<mpsc::Sender<ReloadAsked>>,
    /// Whether an allow list names a user or group: worked out once here,
    /// not per request.
    needs_names: bool,
    /// Shared with the services before and after a reload, so counts of
    /// repeated events survive it.
    audit: Arc<Audit>,
    /// The gets counters of this configuration's keys.
    gets: metrics::GetCounters,
    /// Whether the HTTP metrics endpoint listens, when there is one: the
    /// endpoint outlives reloads, and every service reports it.
    endpoint: Option<watch::Receiver<Health>>,
}

/// A reload asked for over the socket, and where its outcome goes: the
/// number of keys now configured, or why the reload was refused.
pub(crate) type ReloadAsked = oneshot::Sender<Result<usize, String>>;

impl Service {
    pub(crate) fn new(
        config: Arc<Config>,
        cache: TokenCache,
        deadline: CancellationToken,
        audit: Arc<Audit>,
    ) -> Service {
        let needs_names = config
            .keys
            .values()
            .any(|key| !key.acl.users.is_empty() || !key.acl.groups.is_empty());
        let gets = metrics::GetCounters::new(&config);
        Service {
            config,
            cache,
            deadline,
            reloads: None,
            needs_names,
            audit,
            gets,
            endpoint: None,
        }
    }

    /// Lets privileged callers ask for a reload over the socket.
    pub(crate) fn with_reloads(mut self, reloads: mpsc::Sender<ReloadAsked>) -> Service {
        self.reloads = Some(reloads);
        self
    }

    /// Reports the HTTP metrics endpoint's health in `status` answers.
    pub(crate) fn with_endpoint(mut self, endpoint: Option<watch::Receiver<Health>>) -> Service {
        self.endpoint = endpoint;
        self
    }

    /// Whether any key's allow lists name a user or a group, so that
    /// callers' names must be looked up before they can be judged.
    pub(crate) fn needs_names(&self) -> bool {
        self.needs_names
    }

    /// How many keys this service's configuration has.
    pub(crate) fn key_count(&self) -> usize {
        self.config.keys.len()
    }

    pub(crate) fn cache(&self) -> &TokenCache {
        &self.cache
    }

    /// The configuration this service answers by.
    pub(crate) fn config(&self) -> &Arc<Config> {
        &self.config
    }

    /// Answers one request line with one answer line.
    /// The answer lives in memory that is wiped once it is dropped.
    pub(crate) async fn answer(&self, caller: &Caller, line: &[u8]) -> Zeroizing<Vec<u8>> {
        let request = match protocol::decode(line) {
            Ok(request) => request,
            Err(e) => {
                tracing::debug!(peer_uid = caller.uid, "bad request: {}", e.error.message);
                return protocol::encode(e.id.as_ref(), &Response::Error(e.error));
            }
        };
        let response = match request.op {
            Op::Ping => Response::Pong,
            Op::Keys => Response::Keys(self.keys(caller)),
            Op::Status => Response::Status(StatusAnswer {
                keys: self.status(caller),
                // Every caller may see it: whether a port is bound is no
                // secret (`ss -ltn` shows it to anyone).
                metrics_endpoint: self.endpoint.as_ref().map(|e| e.borrow().report()),
            }),
            Op::Reload => match self.reload(caller).await {
                Ok(keys) => Response::Reloaded(ReloadAnswer { keys }),
                Err(error) => Response::Error(error),
            },
            Op::Metrics => match self.metrics(caller) {
                Ok(answer) => Response::Metrics(answer),
                Err(error) => Response::Error(error),
            },
            Op::Get {
                key,
                scopes,
                resource,
            } => {
                let answer = self.get(caller, &key, scopes, resource).await;
                self.gets
                    .answered(&key, answer.as_ref().err().map(|e| e.code));
                match answer {
                    Ok((token, expires_in)) => {
                        let line = TokenLine {
                            key: &key,
                            access_token: &token.access_token,
                            token_type: &token.token_type,
                            expires_in,
                            expires_at: token.expires_at,
                            scopes: &token.scopes,
                        };
                        return protocol::encode_token(request.id.as_ref(), &line);
                    }
                    Err(error) => Response::Error(error),
                }
            }
        };
        protocol::encode(request.id.as_ref(), &response)
    }

    /// Asks the daemon to reload and waits for the outcome. Only root and
    /// tokend's own user may: it is what `ExecReload=` runs, and anyone
    /// else could otherwise make tokend re-read its files at will.
    async fn reload(&self, caller: &Caller) -> Result<usize, ErrorBody> {
        let own = nix::unistd::geteuid().as_raw();
        if caller.uid != 0 && caller.uid != own {
            // Counted like every denial: anyone may ask, so a line per
            // attempt would let anyone flood the journal.
            self.audit.record(caller, Event::ReloadForbidden);
            return Err(ErrorBody::new(
                ErrorCode::Forbidden,
                format!(
                    "uid {} may not reload tokend (root and uid {own} may)",
                    caller.uid
                ),
            ));
        }
        let unavailable = || {
            ErrorBody::new(
                ErrorCode::Unavailable,
                "tokend is not taking reloads now (shutting down?)",
            )
        };
        let reloads = self.reloads.as_ref().ok_or_else(unavailable)?;
        let (reply, outcome) = oneshot::channel();
        // Neither queueing nor waiting outlives the shutdown deadline: the
        // daemon stops running reloads once it is stopping.
        let asked = async {
            reloads.send(reply).await.ok()?;
            outcome.await.ok()
        };
        let outcome = tokio::select! {
            outcome = asked => outcome,
            () = self.deadline.cancelled() => None,
        };
        audit::reloaded(
            ReloadAsker::Socket(caller),
            match &outcome {
                Some(Ok(keys)) => ReloadOutcome::Reloaded(*keys),
                Some(Err(_)) => ReloadOutcome::Failed,
                None => ReloadOutcome::NotRun,
            },
        );
        match outcome {
            Some(Ok(keys)) => Ok(keys),
            Some(Err(why)) => Err(ErrorBody::new(
                ErrorCode::ReloadFailed,
                format!("reload refused, still serving the previous configuration: {why}"),
            )),
            None => Err(unavailable()),
        }
    }

    /// The metrics, for root, tokend's own user and `metrics_allow_uids`.
    fn metrics(&self, caller: &Caller) -> Result<MetricsAnswer, ErrorBody> {
        let allowed = &self.config.daemon.metrics_allow_uids;
        if !metrics::may_read(caller.uid, allowed) {
            // Debug, as for reload: the answer says it, and a line per
            // attempt at info would let anyone flood the journal.
            tracing::debug!(
                peer_uid = caller.uid,
                peer_pid = caller.pid,
                "denied: metrics"
            );
            return Err(ErrorBody::new(
                ErrorCode::Forbidden,
                format!(
                    "uid {} may not read the metrics (only the uids in \
                     metrics_allow_uids may)",
                    caller.uid
                ),
            ));
        }
        let text = self
            .render_metrics()
            .map_err(|e| ErrorBody::new(ErrorCode::Unavailable, e.to_string()))?;
        Ok(MetricsAnswer { text })
    }

    /// The metrics in the Prometheus text format, with this service's keys
    /// and cache; for the socket op and the HTTP endpoint.
    pub(crate) fn render_metrics(&self) -> Result<String, MetricsError> {
        metrics::render(&self.config, &self.cache)
    }

    fn readable<'a>(
        &'a self,
        caller: &'a Caller,
    ) -> impl Iterator<Item = (&'a String, &'a KeyConfig)> {
        self.config
            .keys
            .iter()
            .filter(move |(_, key)| peer::allow(caller, &key.acl))
    }

    fn keys(&self, caller: &Caller) -> Vec<KeyInfo> {
        self.readable(caller)
            .map(|(name, key)| KeyInfo {
                name: name.clone(),
                scopes: key
                    .scopes
                    .as_ref()
                    .map(|s| s.iter().map(str::to_owned).collect())
                    .unwrap_or_default(),
            })
            .collect()
    }

    /// The keys `caller` may read; every key for tokend's own user when
    /// that is not root, which holds every secret already, so that a health
    /// check run as the service (`ExecStartPost=tokend status`) sees all.
    fn status(&self, caller: &Caller) -> Vec<KeyStatus> {
        let own = nix::unistd::geteuid().as_raw();
        let everything = own != 0 && caller.uid == own;
        self.config
            .keys
            .iter()
            .filter(|(_, key)| everything || peer::allow(caller, &key.acl))
            .map(|(name, _)| KeyStatus {
                name: name.clone(),
                sets: self
                    .cache
                    .status(name)
                    .into_iter()
                    .map(set_status)
                    .collect(),
            })
            .collect()
    }

    /// The token for a get, and its whole seconds left.
    async fn get(
        &self,
        caller: &Caller,
        name: &str,
        scopes: Vec<String>,
        resource: Option<String>,
    ) -> Result<(Arc<CachedToken>, u64), ErrorBody> {
        let Some(key) = self.config.keys.get(name) else {
            // The name is the caller's, not ours: without control
            // characters (a newline could forge a log line) and bounded.
            let shown = crate::printable::shown(name, 64);
            self.audit
                .record(caller, Event::NoSuchKey { shown: &shown });
            return Err(ErrorBody::new(
                ErrorCode::UnknownKey,
                format!("no key named {shown:?}"),
            ));
        };
        if !peer::allow(caller, &key.acl) {
            self.audit.record(caller, Event::Forbidden { key: name });
            return Err(ErrorBody::new(
                ErrorCode::Forbidden,
                format!("uid {} may not read key {name:?}", caller.uid),
            ));
        }
        let scopes = ScopeSet::new(scopes).map_err(bad_scope)?;
        let outside = key.scopes_not_allowed(&scopes);
        // A resource the key does not list is refused like a scope it does
        // not list: both ask for more than the key was configured to give.
        let resource = match resource {
            Some(resource) if !key.allows_resource(&resource) => {
                self.audit.record(
                    caller,
                    // Not the refused resource: the caller's text, which
                    // the audit log leaves out (README, Audit log).
                    Event::ScopesNotAllowed {
                        key: name,
                        asked: &scopes,
                        refused: outside.len(),
                        resource: None,
                    },
                );
                return Err(ErrorBody::new(
                    ErrorCode::ScopeNotAllowed,
                    format!(
                        "key {name:?} does not allow resource {:?}",
                        protocol::clip(&resource)
                    ),
                ));
            }
            // The key's own copy, so the cache holds no caller's text.
            Some(resource) => key.resource.iter().find(|r| ***r == *resource).cloned(),
            None => None,
        };
        if !outside.is_empty() {
            self.audit.record(
                caller,
                Event::ScopesNotAllowed {
                    key: name,
                    asked: &scopes,
                    refused: outside.len(),
                    resource: resource.as_deref(),
                },
            );
            return Err(ErrorBody::new(
                ErrorCode::ScopeNotAllowed,
                format!("key {name:?} does not allow scopes {}", refused(&outside)),
            ));
        }
        let id = SetId {
            scopes: key.effective_scopes_of(&scopes).clone(),
            resource,
        };
        let (scopes, resource) = (&id.scopes, id.resource.as_deref());
        let token = tokio::select! {
            token = self.cache.get(name, &id) => token,
            () = self.deadline.cancelled() => Err(GetError::ShuttingDown),
        };
        let token = token.map_err(|e| {
            self.audit.record(
                caller,
                Event::NoToken {
                    key: name,
                    scopes,
                    resource,
                    error: &e,
                },
            );
            let code = match e {
                GetError::UnknownKey(_) => ErrorCode::UnknownKey,
                GetError::TooManySets { .. } => ErrorCode::Busy,
                GetError::Unavailable(_) | GetError::ShuttingDown => ErrorCode::Unavailable,
            };
            ErrorBody::new(code, e.to_string())
        })?;
        let expires_in = token.remaining(self.cache.now()).as_secs();
        self.audit.record(
            caller,
            Event::HandedOut {
                key: name,
                scopes,
                resource,
                fingerprint: token.fingerprint,
                expires_in,
            },
        );
        Ok((token, expires_in))
    }
}

/// How many characters of the refused scopes an answer quotes: they are
/// the caller's own, so the answer shows enough to spot a typo but does
/// not grow with the request (a 64 KiB line holds 4,000 made-up scopes).
const REFUSED_SHOWN: usize = 256;

/// The refused scopes as an answer quotes them, `[fx zz]`: whole when they
/// fit in [`REFUSED_SHOWN`] characters, else cut with `…` and counted.
fn refused(outside: &[&str]) -> String {
    let joined = outside.join(" ");
    let shown = crate::printable::shown(&joined, REFUSED_SHOWN);
    if joined.chars().nth(REFUSED_SHOWN).is_none() {
        format!("[{shown}]")
    } else {
        format!("[{shown}] ({} in all)", outside.len())
    }
}

/// A scope that cannot go on the wire, as the answer says it: the error's
/// own words with the caller's scope cut to [`protocol::clip`]'s length
/// and `…`, so a 60,000-character scope does not come back whole.
fn bad_scope(error: ScopeError) -> ErrorBody {
    let error = match error {
        ScopeError::BadCharacter(scope) => {
            let mut shown = protocol::clip(&scope).to_owned();
            if shown.len() < scope.len() {
                shown.push('…');
            }
            ScopeError::BadCharacter(shown)
        }
        ScopeError::Empty => ScopeError::Empty,
    };
    ErrorBody::new(ErrorCode::BadRequest, error.to_string())
}

fn set_status(entry: crate::cache::EntryStatus) -> SetStatus {
    let state = match (
        entry.usable,
        entry.fetching,
        entry.expires_at,
        &entry.last_error,
    ) {
        (true, _, _, _) => SetState::Fresh,
        (false, true, _, _) => SetState::Fetching,
        (false, false, Some(_), _) => SetState::Expired,
        (false, false, None, _) => SetState::Failed,
    };
    let health = match entry {
        _ if entry.paused => SetHealth::Paused,
        _ if entry.last_error.is_some() => SetHealth::Failing,
        _ if entry.usable && entry.fetching => SetHealth::Refreshing,
        _ if entry.usable => SetHealth::Fresh,
        // Ran out, a refresh under way or not: callers wait for the issuer.
        _ if entry.expires_at.is_some() => SetHealth::Expired,
        _ if entry.fetching => SetHealth::Refreshing,
        _ => SetHealth::NeverFetched,
    };
    let now = SystemTime::now();
    SetStatus {
        scopes: entry.scopes.iter().map(str::to_owned).collect(),
        resource: entry.resource.as_deref().map(str::to_owned),
        state,
        fetching: entry.fetching,
        expires_at: entry.expires_at.map(rfc3339),
        expires_in: entry.remaining.map(|r| r.as_secs()),
        last_refresh: entry.last_refresh.map(rfc3339),
        last_error: entry.last_error,
        health,
        prefetch: entry.prefetch,
        // Rounded up: a pause ending in 0.7 s is not due "now".
        next_refresh_in: entry
            .next_request
            .map(|d| d.as_secs() + u64::from(d.subsec_nanos() > 0)),
        next_refresh_at: entry.next_request.map(|d| rfc3339(now + d)),
        last_error_status: entry.last_error_status,
        last_error_at: entry.last_failure.map(rfc3339),
        issuer_requests: entry.requests,
        gets: entry.served,
    }
}

/// `2026-11-25T10:00:00Z`: whole seconds, UTC.
pub(crate) fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_seconds(time).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_scopes_are_quoted_whole_or_cut_and_counted() {
        assert_eq!(refused(&["admin", "zz"]), "[admin zz]");
        let made_up: Vec<String> = (0..4_000).map(|i| format!("made-up-{i:05}")).collect();
        let made_up: Vec<&str> = made_up.iter().map(String::as_str).collect();
        let quoted = refused(&made_up);
        assert!(
            quoted.starts_with("[made-up-00000 made-up-00001 "),
            "{quoted}"
        );
        assert!(quoted.ends_with("…] (4000 in all)"), "{quoted}");
        assert_eq!(
            quoted.chars().count(),
            REFUSED_SHOWN + "[…] (4000 in all)".chars().count()
        );
    }

    #[test]
    fn a_bad_scope_is_quoted_cut() {
        let long = format!("{} b", "a".repeat(30_000));
        let body = bad_scope(ScopeError::BadCharacter(long));
        assert!(body.message.len() < 200, "{}", body.message);
        assert!(body
            .message
            .starts_with(&format!("scope \"{}…\" has", "a".repeat(64))));
        let short = bad_scope(ScopeError::BadCharacter("a b".to_owned()));
        assert!(
            short.message.starts_with("scope \"a b\" has"),
            "{}",
            short.message
        );
    }
}
