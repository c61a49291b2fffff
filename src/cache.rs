//! The token cache: one entry per (key, scope set), filled on demand with a
//! single issuer request however many callers ask at once.
//!
//! Locks here are std mutexes held for a few field reads or writes, never
//! across an `.await`: a `get` for a cached token never waits behind an
//! issuer request. Fetches run in tasks the cache owns (tracked, and
//! cancelled at shutdown), so a caller that hangs up does not cancel the
//! request other callers are waiting on.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, KeyConfig};
use crate::issuer::{Grant, IssuerClient, IssuerError};
use crate::scope::ScopeSet;
use crate::secret::AccessToken;

/// What we assume when an issuer leaves `expires_in` out. RFC 6749 lets it,
/// and reusing such a token forever (as some clients do) ends in failures
/// nobody can explain; an hour is the common default lifetime.
const ASSUMED_LIFETIME: Duration = Duration::from_secs(3600);

/// A token as we hold it.
#[derive(Debug)]
pub struct CachedToken {
    pub access_token: AccessToken,
    pub token_type: String,
    /// What the issuer granted, or what was asked when it did not say.
    pub scopes: ScopeSet,
    /// On the monotonic clock: a wall-clock jump neither expires nor
    /// revives a token.
    pub expires: Instant,
    /// The wall-clock time of expiry as computed on receipt, for callers.
    pub expires_at: SystemTime,
    pub obtained_at: SystemTime,
    /// The key's `min_valid`, capped at a quarter of this token's lifetime.
    pub min_valid: Duration,
}

impl CachedToken {
    pub fn remaining(&self, now: Instant) -> Duration {
        self.expires.saturating_duration_since(now)
    }

    /// May this token still be handed out?
    pub fn usable(&self, now: Instant) -> bool {
        self.remaining(now) > self.min_valid
    }
}

/// Why a `get` produced no token.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GetError {
    #[error("no key named {0:?}")]
    UnknownKey(String),
    #[error("no valid token can be had now: {0}")]
    Unavailable(Arc<IssuerError>),
    #[error("tokend is shutting down")]
    ShuttingDown,
}

/// The cache in numbers, for systemd's STATUS= line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CacheSummary {
    pub keys: usize,
    /// Scope sets holding a token that may be handed out.
    pub fresh: usize,
    /// Keys whose last fetch failed, with a short reason such as
    /// "500 from issuer".
    pub failing: Vec<(String, String)>,
}

/// A point-in-time view of one entry for `status`.
#[derive(Debug)]
pub struct EntryStatus {
    pub scopes: ScopeSet,
    pub expires_at: Option<SystemTime>,
    pub remaining: Option<Duration>,
    pub usable: bool,
    pub fetching: bool,
    pub last_refresh: Option<SystemTime>,
    pub last_error: Option<String>,
}

type Outcome = Result<Arc<CachedToken>, Arc<IssuerError>>;

pub struct TokenCache {
    keys: BTreeMap<String, Arc<KeySlot>>,
    issuer: IssuerClient,
    tasks: TaskTracker,
    cancel: CancellationToken,
}

struct KeySlot {
    name: String,
    config: KeyConfig,
    sets: Mutex<HashMap<ScopeSet, Arc<Entry>>>,
    warned_no_expiry: AtomicBool,
}

#[derive(Default)]
struct Entry {
    state: Mutex<EntryState>,
}

#[derive(Default)]
struct EntryState {
    token: Option<Arc<CachedToken>>,
    /// Present while an issuer request is under way; every waiter holds a
    /// receiver and sees the one outcome.
    inflight: Option<watch::Receiver<Option<Outcome>>>,
    last_refresh: Option<SystemTime>,
    last_error: Option<Arc<IssuerError>>,
}

impl TokenCache {
    /// `cancel` stops fetches under way; `tasks` tracks them so shutdown can
    /// wait for them.
    pub fn new(
        config: &Config,
        issuer: IssuerClient,
        tasks: TaskTracker,
        cancel: CancellationToken,
    ) -> TokenCache {
        let keys = config
            .keys
            .iter()
            .map(|(name, key)| {
                let slot = KeySlot {
                    name: name.clone(),
                    config: key.clone(),
                    sets: Mutex::default(),
                    warned_no_expiry: AtomicBool::new(false),
                };
                (name.clone(), Arc::new(slot))
            })
            .collect();
        TokenCache {
            keys,
            issuer,
            tasks,
            cancel,
        }
    }

    /// Starts fetching every key's `prefetch` sets without waiting for them.
    pub fn prefetch(&self) {
        for slot in self.keys.values() {
            for set in &slot.config.prefetch {
                let entry = slot.entry(set);
                let mut state = lock(&entry.state);
                if state.inflight.is_none() {
                    self.start_fetch(slot, set, &entry, &mut state);
                }
            }
        }
    }

    /// A token for `key` with `scopes`: the cached one while it has more
    /// than `min_valid` left, else the result of one issuer request shared
    /// with every concurrent caller.
    pub async fn get(&self, key: &str, scopes: &ScopeSet) -> Result<Arc<CachedToken>, GetError> {
        let slot = self
            .keys
            .get(key)
            .ok_or_else(|| GetError::UnknownKey(key.to_owned()))?;
        let entry = slot.entry(scopes);
        let mut waiter = {
            let mut state = lock(&entry.state);
            if let Some(token) = state.token.as_ref().filter(|t| t.usable(Instant::now())) {
                return Ok(token.clone());
            }
            match &state.inflight {
                Some(waiter) => waiter.clone(),
                None => self.start_fetch(slot, scopes, &entry, &mut state),
            }
        };
        let outcome = match waiter.wait_for(Option::is_some).await {
            Ok(outcome) => outcome.clone(),
            // The fetch task was cancelled before it had an answer.
            Err(_) => None,
        };
        match outcome {
            Some(Ok(token)) => Ok(token),
            Some(Err(error)) => Err(GetError::Unavailable(error)),
            None => Err(GetError::ShuttingDown),
        }
    }

    /// Carries over, from the cache a reload replaces, the tokens of every
    /// key whose issuer, client and secret did not change. Returns how many
    /// scope sets were carried over.
    pub fn adopt(&self, old: &TokenCache) -> usize {
        let mut carried = 0;
        for (name, slot) in &self.keys {
            let Some(old_slot) = old.keys.get(name) else {
                continue;
            };
            if !slot.config.same_credential(&old_slot.config) {
                continue;
            }
            let old_sets = lock(&old_slot.sets).clone();
            let mut sets = lock(&slot.sets);
            for (scopes, entry) in old_sets {
                if slot.config.scopes_not_allowed(&scopes).is_empty() {
                    sets.insert(scopes, entry);
                    carried += 1;
                }
            }
        }
        carried
    }

    /// Stops this cache's background work; a reload calls it on the cache
    /// it replaced.
    pub fn stop(&self) {}

    /// Counts for a one-line status: keys, fresh sets, and the keys whose
    /// last fetch failed with the reason.
    pub fn summary(&self) -> CacheSummary {
        let now = Instant::now();
        let mut summary = CacheSummary {
            keys: self.keys.len(),
            ..CacheSummary::default()
        };
        for (name, slot) in &self.keys {
            let entries: Vec<Arc<Entry>> = lock(&slot.sets).values().cloned().collect();
            let mut failing = None;
            for entry in entries {
                let state = lock(&entry.state);
                if state.token.as_ref().is_some_and(|t| t.usable(now)) {
                    summary.fresh += 1;
                }
                if let Some(error) = &state.last_error {
                    failing.get_or_insert_with(|| error.short());
                }
            }
            if let Some(reason) = failing {
                summary.failing.push((name.clone(), reason));
            }
        }
        summary
    }

    pub fn contains(&self, key: &str) -> bool {
        self.keys.contains_key(key)
    }

    /// Every cached entry of `key`, sorted by scope set.
    pub fn status(&self, key: &str) -> Vec<EntryStatus> {
        let Some(slot) = self.keys.get(key) else {
            return Vec::new();
        };
        let entries: Vec<(ScopeSet, Arc<Entry>)> = lock(&slot.sets)
            .iter()
            .map(|(set, entry)| (set.clone(), entry.clone()))
            .collect();
        let now = Instant::now();
        let mut out: Vec<EntryStatus> = entries
            .into_iter()
            .map(|(scopes, entry)| {
                let state = lock(&entry.state);
                EntryStatus {
                    scopes,
                    expires_at: state.token.as_ref().map(|t| t.expires_at),
                    remaining: state.token.as_ref().map(|t| t.remaining(now)),
                    usable: state.token.as_ref().is_some_and(|t| t.usable(now)),
                    fetching: state.inflight.is_some(),
                    last_refresh: state.last_refresh,
                    last_error: state.last_error.as_ref().map(|e| e.to_string()),
                }
            })
            .collect();
        out.sort_by(|a, b| a.scopes.cmp(&b.scopes));
        out
    }

    /// Spawns the one issuer request for `entry` and returns a receiver for
    /// its outcome. The caller holds `entry`'s lock, so no second request
    /// can start in between.
    fn start_fetch(
        &self,
        slot: &Arc<KeySlot>,
        scopes: &ScopeSet,
        entry: &Arc<Entry>,
        state: &mut EntryState,
    ) -> watch::Receiver<Option<Outcome>> {
        let (done, waiter) = watch::channel(None);
        state.inflight = Some(waiter.clone());
        let (slot, entry, scopes) = (slot.clone(), entry.clone(), scopes.clone());
        let (issuer, cancel) = (self.issuer.clone(), self.cancel.clone());
        self.tasks.spawn(async move {
            tracing::debug!(key = %slot.name, scopes = %scopes, "requesting a token from the issuer");
            let result = tokio::select! {
                result = issuer.fetch(&slot.config, &scopes) => result,
                // Dropping `done` tells the waiters there will be no answer.
                () = cancel.cancelled() => return,
            };
            let outcome = slot.settle(&entry, &scopes, result);
            done.send_replace(Some(outcome));
        });
        waiter
    }
}

impl KeySlot {
    fn entry(&self, scopes: &ScopeSet) -> Arc<Entry> {
        lock(&self.sets).entry(scopes.clone()).or_default().clone()
    }

    /// Records a fetch's result in `entry` and clears its in-flight marker
    /// under one lock, so a `get` sees either the old state or the new one.
    fn settle(
        &self,
        entry: &Entry,
        scopes: &ScopeSet,
        result: Result<Grant, IssuerError>,
    ) -> Outcome {
        let received = (Instant::now(), SystemTime::now());
        let outcome = match result {
            Ok(grant) => Ok(Arc::new(self.cached(grant, scopes, received))),
            Err(error) => {
                tracing::warn!(key = %self.name, scopes = %scopes, issuer_status = error.status(), "token request failed: {error}");
                Err(Arc::new(error))
            }
        };
        let mut state = lock(&entry.state);
        state.inflight = None;
        match &outcome {
            Ok(token) => {
                state.token = Some(token.clone());
                state.last_refresh = Some(received.1);
                state.last_error = None;
            }
            Err(error) => state.last_error = Some(error.clone()),
        }
        outcome
    }

    fn cached(
        &self,
        grant: Grant,
        asked: &ScopeSet,
        (now, wall): (Instant, SystemTime),
    ) -> CachedToken {
        let lifetime = grant.expires_in.unwrap_or_else(|| {
            if !self.warned_no_expiry.swap(true, Ordering::Relaxed) {
                tracing::warn!(key = %self.name, "the issuer sent no expires_in; assuming tokens live {}", humantime::format_duration(ASSUMED_LIFETIME));
            }
            ASSUMED_LIFETIME
        });
        let min_valid = effective_min_valid(self.config.min_valid, lifetime);
        if min_valid < self.config.min_valid {
            tracing::warn!(
                key = %self.name,
                "tokens live only {}; using min_valid {} instead of {} so they stay usable for most of their life",
                humantime::format_duration(lifetime),
                humantime::format_duration(min_valid),
                humantime::format_duration(self.config.min_valid),
            );
        }
        tracing::info!(key = %self.name, scopes = %asked, lifetime_secs = lifetime.as_secs(), "received a token");
        CachedToken {
            access_token: grant.access_token,
            token_type: grant.token_type,
            scopes: grant.scope.unwrap_or_else(|| asked.clone()),
            expires: now + lifetime,
            expires_at: wall + lifetime,
            obtained_at: wall,
            min_valid,
        }
    }
}

/// `min_valid` capped at a quarter of the token's lifetime: a 60 s
/// `min_valid` would make a 60 s token useless on arrival.
pub fn effective_min_valid(min_valid: Duration, lifetime: Duration) -> Duration {
    min_valid.min(lifetime / 4)
}

/// Our critical sections cannot leave data half-written, so a panic in
/// another holder does not make the state unusable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn min_valid_is_capped_at_a_quarter_of_the_lifetime() {
        let s = Duration::from_secs;
        assert_eq!(effective_min_valid(s(60), s(120)), s(30));
        assert_eq!(effective_min_valid(s(60), s(3600)), s(60));
        assert_eq!(effective_min_valid(s(0), s(10)), s(0));
    }

    #[tokio::test(start_paused = true)]
    async fn usable_until_min_valid_is_left() {
        let now = Instant::now();
        let token = CachedToken {
            access_token: AccessToken::new("t".into()),
            token_type: "Bearer".into(),
            scopes: ScopeSet::default(),
            expires: now + Duration::from_secs(100),
            expires_at: SystemTime::now(),
            obtained_at: SystemTime::now(),
            min_valid: Duration::from_secs(25),
        };
        assert!(token.usable(now));
        tokio::time::advance(Duration::from_secs(74)).await;
        assert!(token.usable(Instant::now()));
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(!token.usable(Instant::now()));
        assert_eq!(token.remaining(Instant::now()), Duration::from_secs(25));
    }
}
