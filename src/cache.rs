//! The token cache: one entry per (key, scope set), each kept fresh by its
//! own refresher, with one issuer request at a time per entry and
//! exponential backoff when the issuer fails.
//!
//! Each entry has a refresher task that sleeps until the entry next needs
//! work (its refresh point, its retry time after a failure, or its idle
//! eviction time) and is woken early when a fetch settles. Thousands of
//! idle entries are thousands of parked timers in tokio's wheel and cost no
//! CPU. Fetches run in their own tasks, so a caller that hangs up does not
//! cancel a request other callers are waiting on.
//!
//! Locks here are std mutexes held for a few field reads or writes, never
//! across an `.await`: a `get` for a cached token never waits behind an
//! issuer request. Lock order is a key's set map, then an entry's state.
//!
//! The pure timing rules (when to refresh, how long to back off) are free
//! functions at the bottom, unit-tested with fixed random draws.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use rand::Rng;
use tokio::sync::{watch, Notify};
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

/// The least time we allow for a refresh to come back before the old token
/// drops under `min_valid`. Twice the last fetch's latency when that is more.
const MIN_REFRESH_MARGIN: Duration = Duration::from_secs(1);

/// The base of the backoff: the n-th retry waits up to 1 s × 2ⁿ.
const BACKOFF_BASE: Duration = Duration::from_secs(1);

/// We honour `Retry-After` up to this; a larger value is more likely a
/// misconfigured proxy than a plan, and would leave callers without tokens
/// for longer than any outage we should wait out silently.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

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
    /// The key's `min_valid`, capped at a quarter of this token's lifetime.
    pub min_valid: Duration,
    /// When the refresher renews it.
    pub refresh_at: Instant,
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
    #[error(
        "key {key:?} already caches {limit} scope sets (max_scope_sets); \
         ask for a set in use or raise the limit"
    )]
    TooManySets { key: String, limit: usize },
    #[error("tokend is shutting down")]
    ShuttingDown,
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

type Outcome = Result<Arc<CachedToken>, Arc<IssuerError>>;

pub struct TokenCache {
    keys: BTreeMap<String, Arc<KeySlot>>,
    runner: Runner,
}

/// What fetches and refreshers need to run, without the key map.
#[derive(Clone)]
struct Runner {
    issuer: IssuerClient,
    tasks: TaskTracker,
    /// Stops fetches under way: cancelled only at the shutdown deadline.
    fetches: CancellationToken,
    /// Stops this cache's refreshers: cancelled at shutdown and when a
    /// reload replaces this cache.
    refreshers: CancellationToken,
}

struct KeySlot {
    name: String,
    config: KeyConfig,
    sets: Mutex<HashMap<ScopeSet, Arc<Entry>>>,
    warned_no_expiry: AtomicBool,
    warned_min_valid: AtomicBool,
}

#[derive(Default)]
struct Entry {
    state: Mutex<EntryState>,
    /// Wakes the refresher when a fetch settles or the entry is dropped.
    changed: Notify,
}

#[derive(Default)]
struct EntryState {
    token: Option<Arc<CachedToken>>,
    /// Present while an issuer request is under way; every waiter holds a
    /// receiver and sees the one outcome.
    inflight: Option<watch::Receiver<Option<Outcome>>>,
    last_refresh: Option<SystemTime>,
    last_error: Option<Arc<IssuerError>>,
    /// Failures since the last success; drives the backoff.
    failures: u32,
    /// No issuer request before this, after a failure.
    retry_at: Option<Instant>,
    /// How long the last successful fetch took, to start refreshes early
    /// enough for a slow issuer.
    latency: Duration,
    /// The last `get` of this set; `None` for sets nobody asked for yet.
    last_used: Option<Instant>,
    /// A `prefetch` set: kept fresh forever, never evicted.
    kept: bool,
    /// Removed from its key: its refresher ends.
    evicted: bool,
}

/// What a refresher should do next.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Sleep until then, unless woken earlier.
    SleepUntil(Instant),
    /// Nothing to do until a fetch settles.
    Wait,
    Fetch,
    Evict,
    Stop,
}

impl TokenCache {
    /// `shutdown` stops refreshers, `deadline` stops fetches under way;
    /// `tasks` tracks both so shutdown can wait for them.
    pub fn new(
        config: &Config,
        issuer: IssuerClient,
        tasks: TaskTracker,
        deadline: CancellationToken,
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
                    warned_min_valid: AtomicBool::new(false),
                };
                (name.clone(), Arc::new(slot))
            })
            .collect();
        let runner = Runner {
            issuer,
            tasks,
            refreshers: deadline.child_token(),
            fetches: deadline,
        };
        TokenCache { keys, runner }
    }

    /// Starts fetching every key's `prefetch` sets without waiting for
    /// them, and keeps them fresh from then on.
    pub fn prefetch(&self) {
        for slot in self.keys.values() {
            for set in &slot.config.prefetch {
                let Ok(entry) = self.entry(slot, set, Use::Keep) else {
                    continue;
                };
                let mut state = lock(&entry.state);
                if state.inflight.is_none() && state.token.is_none() {
                    self.runner.start_fetch(slot, set, &entry, &mut state);
                }
            }
        }
    }

    /// A token for `key` with `scopes`: the cached one while it has more
    /// than `min_valid` left, else the result of one issuer request shared
    /// with every concurrent caller. While the issuer is failing and the
    /// backoff forbids a new request, the last error at once.
    pub async fn get(&self, key: &str, scopes: &ScopeSet) -> Result<Arc<CachedToken>, GetError> {
        let slot = self
            .keys
            .get(key)
            .ok_or_else(|| GetError::UnknownKey(key.to_owned()))?;
        let entry = self.entry(slot, scopes, Use::Get)?;
        let mut waiter = {
            let mut state = lock(&entry.state);
            let now = Instant::now();
            if let Some(token) = state.token.as_ref().filter(|t| t.usable(now)) {
                return Ok(token.clone());
            }
            match (&state.inflight, &state.last_error, state.retry_at) {
                (Some(waiter), _, _) => waiter.clone(),
                (None, Some(error), Some(retry_at)) if now < retry_at => {
                    return Err(GetError::Unavailable(error.clone()))
                }
                (None, _, _) => self.runner.start_fetch(slot, scopes, &entry, &mut state),
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

    /// Every cached entry of `key`, sorted by scope set.
    pub fn status(&self, key: &str) -> Vec<EntryStatus> {
        let Some(slot) = self.keys.get(key) else {
            return Vec::new();
        };
        let now = Instant::now();
        let mut out: Vec<EntryStatus> = slot
            .entries()
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

    /// Counts for a one-line status: keys, fresh sets, and the keys whose
    /// last fetch failed with the reason.
    pub fn summary(&self) -> CacheSummary {
        let now = Instant::now();
        let mut summary = CacheSummary {
            keys: self.keys.len(),
            ..CacheSummary::default()
        };
        for (name, slot) in &self.keys {
            let mut failing = None;
            for (_, entry) in slot.entries() {
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

    /// Carries over, from the cache a reload replaces, the entries of every
    /// key whose issuer, client and secret did not change and whose scope
    /// sets the new configuration still allows, and keeps them fresh.
    /// Returns how many scope sets were carried over. Call `old.stop()`
    /// afterwards.
    pub fn adopt(&self, old: &TokenCache) -> usize {
        let mut carried = 0;
        for (name, slot) in &self.keys {
            let Some(old_slot) = old.keys.get(name) else {
                continue;
            };
            if !slot.config.same_credential(&old_slot.config) {
                continue;
            }
            for (scopes, entry) in old_slot.entries() {
                // Also drops a set the new configuration would serve from
                // another one (an empty set on a key that gained `scopes`).
                if !slot.config.scopes_not_allowed(&scopes).is_empty()
                    || slot.config.effective_scopes(scopes.clone()) != scopes
                {
                    continue;
                }
                {
                    let mut state = lock(&entry.state);
                    state.kept = slot.config.prefetch.contains(&scopes);
                    // An adopted set counts as used now, so it gets a full
                    // idle period under the new settings.
                    state.last_used.get_or_insert_with(Instant::now);
                }
                lock(&slot.sets).insert(scopes.clone(), entry.clone());
                self.runner.spawn_refresher(slot, &scopes, &entry);
                carried += 1;
            }
        }
        carried
    }

    /// Stops this cache's refreshers. Fetches under way still settle, so
    /// callers waiting on them get their answer.
    pub fn stop(&self) {
        self.runner.refreshers.cancel();
    }

    /// The entry for `scopes`, created (with its refresher) if new.
    fn entry(
        &self,
        slot: &Arc<KeySlot>,
        scopes: &ScopeSet,
        used: Use,
    ) -> Result<Arc<Entry>, GetError> {
        let mut sets = lock(&slot.sets);
        if let Some(entry) = sets.get(scopes) {
            let entry = entry.clone();
            // Stamped under the set map's lock, so eviction (which holds
            // it too) never drops an entry a get is about to use.
            if used == Use::Get {
                lock(&entry.state).last_used = Some(Instant::now());
            }
            return Ok(entry);
        }
        if used == Use::Get && sets.len() >= slot.config.max_scope_sets {
            return Err(GetError::TooManySets {
                key: slot.name.clone(),
                limit: slot.config.max_scope_sets,
            });
        }
        let entry = Arc::new(Entry::default());
        {
            let mut state = lock(&entry.state);
            state.kept = used == Use::Keep;
            state.last_used = (used == Use::Get).then(Instant::now);
        }
        sets.insert(scopes.clone(), entry.clone());
        drop(sets);
        self.runner.spawn_refresher(slot, scopes, &entry);
        Ok(entry)
    }
}

impl Runner {
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
        let (issuer, cancel) = (self.issuer.clone(), self.fetches.clone());
        self.tasks.spawn(async move {
            tracing::debug!(key = %slot.name, scopes = %scopes, "requesting a token from the issuer");
            let started = Instant::now();
            let result = tokio::select! {
                result = issuer.fetch(&slot.config, &scopes) => result,
                // Dropping `done` tells the waiters there will be no answer.
                () = cancel.cancelled() => return,
            };
            let outcome = slot.settle(&entry, &scopes, result, started.elapsed());
            done.send_replace(Some(outcome));
        });
        waiter
    }

    /// Spawns the task that keeps `entry` fresh until it is evicted or this
    /// cache stops.
    fn spawn_refresher(&self, slot: &Arc<KeySlot>, scopes: &ScopeSet, entry: &Arc<Entry>) {
        let refresher = Refresher {
            runner: self.clone(),
            slot: slot.clone(),
            scopes: scopes.clone(),
            entry: entry.clone(),
        };
        self.tasks.spawn(refresher.run());
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Use {
    /// A caller asked for it: counts as use, subject to `max_scope_sets`.
    Get,
    /// A `prefetch` set: kept forever.
    Keep,
}

/// Keeps one entry fresh: refreshes it ahead of expiry, retries with
/// backoff after failures, and evicts it once idle.
struct Refresher {
    runner: Runner,
    slot: Arc<KeySlot>,
    scopes: ScopeSet,
    entry: Arc<Entry>,
}

impl Refresher {
    async fn run(self) {
        loop {
            let next = {
                let state = lock(&self.entry.state);
                next_step(&state, &self.slot.config, Instant::now())
            };
            match next {
                Next::Stop => return,
                Next::Evict => {
                    if self.evict() {
                        return;
                    }
                }
                Next::Fetch => {
                    let mut state = lock(&self.entry.state);
                    // A get may have started one since we looked.
                    if state.inflight.is_none() {
                        let _ = self.runner.start_fetch(
                            &self.slot,
                            &self.scopes,
                            &self.entry,
                            &mut state,
                        );
                    }
                }
                Next::Wait => tokio::select! {
                    () = self.entry.changed.notified() => {}
                    () = self.runner.refreshers.cancelled() => return,
                },
                Next::SleepUntil(when) => tokio::select! {
                    () = tokio::time::sleep_until(when) => {}
                    () = self.entry.changed.notified() => {}
                    () = self.runner.refreshers.cancelled() => return,
                },
            }
        }
    }

    /// Drops the entry if it is still idle; `false` if a get came in.
    fn evict(&self) -> bool {
        let mut sets = lock(&self.slot.sets);
        let mut state = lock(&self.entry.state);
        if next_step(&state, &self.slot.config, Instant::now()) != Next::Evict {
            return false;
        }
        state.evicted = true;
        // Only our own entry: a reload may have put another in its place.
        if sets
            .get(&self.scopes)
            .is_some_and(|e| Arc::ptr_eq(e, &self.entry))
        {
            sets.remove(&self.scopes);
        }
        tracing::debug!(key = %self.slot.name, scopes = %self.scopes, "dropped an idle scope set");
        true
    }
}

/// The refresher's decision for an entry in `state` at `now`.
fn next_step(state: &EntryState, key: &KeyConfig, now: Instant) -> Next {
    if state.evicted {
        return Next::Stop;
    }
    let idle_until = (!state.kept)
        .then(|| state.last_used.map(|used| used + key.idle_evict))
        .flatten();
    if idle_until.is_some_and(|until| now >= until) && state.inflight.is_none() {
        return Next::Evict;
    }
    if state.inflight.is_some() {
        return Next::Wait;
    }
    let due = match (&state.token, state.retry_at) {
        // After a failure the backoff decides, token or not.
        (_, Some(retry_at)) if state.failures > 0 => Some(retry_at),
        (Some(token), _) => Some(token.refresh_at),
        // Never fetched: the get or prefetch that created it fetches.
        (None, _) => None,
    };
    match (due, idle_until) {
        (Some(due), _) if now >= due => Next::Fetch,
        (Some(due), Some(idle)) => Next::SleepUntil(due.min(idle)),
        (Some(due), None) => Next::SleepUntil(due),
        (None, Some(idle)) => Next::SleepUntil(idle),
        (None, None) => Next::Wait,
    }
}

impl KeySlot {
    fn entries(&self) -> Vec<(ScopeSet, Arc<Entry>)> {
        lock(&self.sets)
            .iter()
            .map(|(set, entry)| (set.clone(), entry.clone()))
            .collect()
    }

    /// Records a fetch's result in `entry` and clears its in-flight marker
    /// under one lock, so a `get` sees either the old state or the new one;
    /// then wakes the entry's refresher.
    fn settle(
        &self,
        entry: &Entry,
        scopes: &ScopeSet,
        result: Result<Grant, IssuerError>,
        latency: Duration,
    ) -> Outcome {
        let received = (Instant::now(), SystemTime::now());
        let mut state = lock(&entry.state);
        state.inflight = None;
        let outcome = match result {
            Ok(grant) => {
                let token = Arc::new(self.cached(grant, scopes, received, latency));
                state.token = Some(token.clone());
                state.last_refresh = Some(received.1);
                state.last_error = None;
                state.failures = 0;
                state.retry_at = None;
                state.latency = latency;
                Ok(token)
            }
            Err(error) => {
                state.failures = state.failures.saturating_add(1);
                let delay = backoff(
                    state.failures,
                    self.config.max_backoff,
                    error.retry_after,
                    rand::rng().random(),
                );
                state.retry_at = Some(received.0 + delay);
                let error = Arc::new(error);
                state.last_error = Some(error.clone());
                tracing::warn!(
                    key = %self.name,
                    scopes = %scopes,
                    issuer_status = error.status(),
                    failures = state.failures,
                    retry_in_ms = delay.as_millis() as u64,
                    "token request failed: {error}"
                );
                Err(error)
            }
        };
        drop(state);
        entry.changed.notify_one();
        outcome
    }

    fn cached(
        &self,
        grant: Grant,
        asked: &ScopeSet,
        (now, wall): (Instant, SystemTime),
        latency: Duration,
    ) -> CachedToken {
        let lifetime = grant.expires_in.unwrap_or_else(|| {
            if !self.warned_no_expiry.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    key = %self.name,
                    "the issuer sent no expires_in; assuming tokens live {}",
                    humantime::format_duration(ASSUMED_LIFETIME)
                );
            }
            ASSUMED_LIFETIME
        });
        let min_valid = effective_min_valid(self.config.min_valid, lifetime);
        if min_valid < self.config.min_valid && !self.warned_min_valid.swap(true, Ordering::Relaxed)
        {
            tracing::warn!(
                key = %self.name,
                "tokens live only {}; using min_valid {} instead of {} so they stay usable for most of their life",
                humantime::format_duration(lifetime),
                humantime::format_duration(min_valid),
                humantime::format_duration(self.config.min_valid),
            );
        }
        let margin = (latency * 2).clamp(
            MIN_REFRESH_MARGIN,
            self.config.request_timeout.max(MIN_REFRESH_MARGIN),
        );
        let refresh_in = refresh_delay(lifetime, min_valid, margin, rand::rng().random());
        tracing::info!(
            key = %self.name,
            scopes = %asked,
            lifetime_secs = lifetime.as_secs(),
            refresh_in_ms = refresh_in.as_millis() as u64,
            "received a token"
        );
        CachedToken {
            access_token: grant.access_token,
            token_type: grant.token_type,
            scopes: grant.scope.unwrap_or_else(|| asked.clone()),
            expires: now + lifetime,
            expires_at: wall + lifetime,
            min_valid,
            refresh_at: now + refresh_in,
        }
    }
}

/// `min_valid` capped at a quarter of the token's lifetime: a 60 s
/// `min_valid` would make a 60 s token useless on arrival.
pub fn effective_min_valid(min_valid: Duration, lifetime: Duration) -> Duration {
    min_valid.min(lifetime / 4)
}

/// How long after receipt a token is renewed. A point between 60 % and 75 %
/// of its life (`draw` in [0, 1) picks it), so keys and hosts do not refresh
/// in step; but no later than leaves `margin` for the new token to arrive
/// before the old one has only `min_valid` left, and no earlier than a
/// quarter of its life, so a tiny token cannot make us spin.
pub fn refresh_delay(
    lifetime: Duration,
    min_valid: Duration,
    margin: Duration,
    draw: f64,
) -> Duration {
    let spread = lifetime.mul_f64(0.60 + 0.15 * draw.clamp(0.0, 1.0));
    let latest = lifetime.saturating_sub(min_valid).saturating_sub(margin);
    spread.min(latest).max(lifetime / 4)
}

/// The wait before retry number `failures` (1 for the first retry): drawn
/// between half and all of min(`max_backoff`, 1 s × 2ⁿ) with n = failures − 1,
/// so retries never bunch up and never spin; at least what `Retry-After`
/// asked (capped at ten minutes).
pub fn backoff(
    failures: u32,
    max_backoff: Duration,
    retry_after: Option<Duration>,
    draw: f64,
) -> Duration {
    let exponent = failures.saturating_sub(1).min(20);
    let ceiling = BACKOFF_BASE.saturating_mul(1 << exponent).min(max_backoff);
    let delay = ceiling.mul_f64(0.5 + 0.5 * draw.clamp(0.0, 1.0));
    match retry_after {
        Some(asked) => delay.max(asked.min(MAX_RETRY_AFTER)),
        None => delay,
    }
}

/// Our critical sections cannot leave data half-written, so a panic in
/// another holder does not make the state unusable.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    const fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn min_valid_is_capped_at_a_quarter_of_the_lifetime() {
        assert_eq!(effective_min_valid(s(60), s(120)), s(30));
        assert_eq!(effective_min_valid(s(60), s(3600)), s(60));
        assert_eq!(effective_min_valid(s(0), s(10)), s(0));
    }

    #[test]
    fn refresh_lands_between_60_and_75_percent_of_a_long_life() {
        assert_eq!(refresh_delay(s(3600), s(60), s(1), 0.0), s(2160));
        assert_eq!(refresh_delay(s(3600), s(60), s(1), 1.0), s(2700));
        let mid = refresh_delay(s(3600), s(60), s(1), 0.5);
        assert!(mid > s(2160) && mid < s(2700));
    }

    #[test]
    fn refresh_leaves_room_for_min_valid_and_the_fetch() {
        // 10 s token, min_valid capped to 2.5 s, 1 s margin: at 6.5 s at
        // the latest, so the new token is there with 2.5 s still left.
        let min_valid = effective_min_valid(s(60), s(10));
        assert_eq!(
            refresh_delay(s(10), min_valid, s(1), 1.0),
            Duration::from_millis(6500)
        );
        assert_eq!(refresh_delay(s(10), min_valid, s(1), 0.0), s(6));
    }

    #[test]
    fn refresh_never_comes_sooner_than_a_quarter_of_the_life() {
        assert_eq!(refresh_delay(s(4), s(1), s(10), 0.0), s(1));
        assert_eq!(
            refresh_delay(s(1), s(0), s(0), 0.0),
            Duration::from_millis(600)
        );
    }

    #[test]
    fn backoff_doubles_within_half_to_full_and_caps() {
        let max = s(30);
        assert_eq!(backoff(1, max, None, 0.0), Duration::from_millis(500));
        assert_eq!(backoff(1, max, None, 1.0), s(1));
        assert_eq!(backoff(2, max, None, 0.0), s(1));
        assert_eq!(backoff(3, max, None, 1.0), s(4));
        assert_eq!(backoff(6, max, None, 1.0), s(30));
        assert_eq!(backoff(6, max, None, 0.0), s(15));
        assert_eq!(backoff(u32::MAX, max, None, 1.0), s(30));
        for n in 1..40 {
            for draw in [0.0, 0.3, 0.99] {
                let d = backoff(n, max, None, draw);
                assert!(
                    d >= Duration::from_millis(500) && d <= max,
                    "{n} {draw} {d:?}"
                );
            }
        }
    }

    #[test]
    fn retry_after_is_honoured_up_to_ten_minutes() {
        assert_eq!(backoff(1, s(30), Some(s(5)), 1.0), s(5));
        assert_eq!(backoff(6, s(30), Some(s(5)), 1.0), s(30));
        assert_eq!(backoff(1, s(30), Some(s(86400)), 0.0), s(600));
    }

    fn key(idle: Duration) -> KeyConfig {
        let text = format!(
            "[keys.k]\ntoken_url = \"https://x/t\"\nclient_id = \"i\"\nclient_secret = \"s\"\nidle_evict = \"{}\"\n",
            humantime::format_duration(idle)
        );
        crate::config::parse(&text, std::path::Path::new("t"))
            .unwrap()
            .keys
            .remove("k")
            .unwrap()
    }

    fn token(now: Instant, refresh_in: Duration) -> Arc<CachedToken> {
        Arc::new(CachedToken {
            access_token: AccessToken::new("t".into()),
            token_type: "Bearer".into(),
            scopes: ScopeSet::default(),
            expires: now + s(100),
            expires_at: SystemTime::now(),
            min_valid: s(25),
            refresh_at: now + refresh_in,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn refresher_sleeps_until_the_refresh_point_then_fetches() {
        let now = Instant::now();
        let key = key(s(3600));
        let state = EntryState {
            token: Some(token(now, s(60))),
            last_used: Some(now),
            ..EntryState::default()
        };
        assert_eq!(next_step(&state, &key, now), Next::SleepUntil(now + s(60)));
        assert_eq!(next_step(&state, &key, now + s(60)), Next::Fetch);
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_set_is_evicted_and_a_kept_one_is_not() {
        let now = Instant::now();
        let key = key(s(10));
        let mut state = EntryState {
            token: Some(token(now, s(60))),
            last_used: Some(now),
            ..EntryState::default()
        };
        assert_eq!(next_step(&state, &key, now), Next::SleepUntil(now + s(10)));
        assert_eq!(next_step(&state, &key, now + s(10)), Next::Evict);
        state.kept = true;
        assert_eq!(
            next_step(&state, &key, now + s(10)),
            Next::SleepUntil(now + s(60))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn after_a_failure_the_backoff_decides() {
        let now = Instant::now();
        let key = key(s(3600));
        let state = EntryState {
            token: Some(token(now, s(60))),
            failures: 2,
            retry_at: Some(now + s(2)),
            last_used: Some(now),
            ..EntryState::default()
        };
        assert_eq!(next_step(&state, &key, now), Next::SleepUntil(now + s(2)));
        assert_eq!(next_step(&state, &key, now + s(2)), Next::Fetch);
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_to_do_while_a_fetch_is_under_way_or_before_the_first() {
        let now = Instant::now();
        let key = key(s(3600));
        let (_tx, rx) = watch::channel(None);
        let fetching = EntryState {
            inflight: Some(rx),
            kept: true,
            ..EntryState::default()
        };
        assert_eq!(next_step(&fetching, &key, now), Next::Wait);
        let fresh_kept = EntryState {
            kept: true,
            ..EntryState::default()
        };
        assert_eq!(next_step(&fresh_kept, &key, now), Next::Wait);
    }

    #[tokio::test(start_paused = true)]
    async fn usable_until_min_valid_is_left() {
        let now = Instant::now();
        let token = token(now, s(60));
        assert!(token.usable(now));
        tokio::time::advance(s(74)).await;
        assert!(token.usable(Instant::now()));
        tokio::time::advance(s(1)).await;
        assert!(!token.usable(Instant::now()));
        assert_eq!(token.remaining(Instant::now()), s(25));
    }
}
