//! The token cache: one entry per (key, scope set), each owned by one task.
//!
//! - An entry's [`Owner`] task alone asks the issuer for its token, and
//!   publishes the entry in a `watch` channel. A get with a usable token
//!   returns it without waking anyone; otherwise it wakes the owner and
//!   waits for its next answer, so there is one request at a time per entry
//!   by construction and a caller that hangs up cancels nothing. Between
//!   requests an owner sleeps on one timer (refresh point, retry time, idle
//!   eviction): thousands of idle entries cost no CPU.
//! - Issuers limit clients, not scope sets: a 429 or 503 with `Retry-After`,
//!   or rejected credentials, pause the whole key ([`Pause`], written by its
//!   sets' owners, read by gets). While paused every set of the key answers
//!   `unavailable` at once; after it, one owner probes, the others wait.
//! - A key's map of sets is locked by callers only (gets, reloads, status).
//!   An owner that ends (idle, or its cache stopped) leaves a dead entry,
//!   which the next caller to meet it replaces or skips.
//! - A reload moves the sets of unchanged keys, owners included, to the new
//!   cache; the owner follows the new key's settings from then on.
//!
//! Times are on the boot clock (`CLOCK_BOOTTIME`), which counts while the
//! machine is suspended and tokio's clock does not; owners and gets re-read
//! it, so a token that died during a suspend is never handed out and a
//! refresh that fell due is made at once. The pure rules (what an owner does
//! next, when to refresh, how long to back off) are at the bottom.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use nix::time::{clock_gettime, ClockId};
use rand::Rng;
use tokio::sync::{mpsc, watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, KeyConfig};
use crate::issuer::{FailureKind, Grant, IssuerClient, IssuerError};
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

/// `Entry::last_used` of a set nobody asked for (a prefetch set).
const NEVER_USED: u64 = u64::MAX;

/// A token as we hold it. Its times are on the boot clock.
#[derive(Debug)]
pub(crate) struct CachedToken {
    pub(crate) access_token: AccessToken,
    /// The token's fingerprint for log lines, worked out once here rather
    /// than hashed again on every handout.
    pub(crate) fingerprint: String,
    pub(crate) token_type: String,
    /// What the issuer granted, or what was asked when it did not say.
    pub(crate) scopes: ScopeSet,
    /// Boot-clock time of expiry: a wall-clock jump neither expires nor
    /// revives a token, and a suspend ages it.
    pub(crate) expires: Duration,
    /// The wall-clock time of expiry as computed on receipt, for callers.
    pub(crate) expires_at: SystemTime,
    /// The key's `min_valid`, capped at a quarter of this token's lifetime.
    pub(crate) min_valid: Duration,
    /// Boot-clock time the owner renews it.
    pub(crate) refresh_at: Duration,
    /// As granted (or assumed), so that new settings can be applied to a
    /// token a reload carried over.
    lifetime: Duration,
}

impl CachedToken {
    pub(crate) fn remaining(&self, now: Duration) -> Duration {
        self.expires.saturating_sub(now)
    }

    /// May this token still be handed out?
    pub(crate) fn usable(&self, now: Duration) -> bool {
        self.remaining(now) > self.min_valid
    }

    /// This token with `min_valid` and the refresh point `key` gives it.
    fn under(&self, key: &KeyConfig, latency: Duration) -> CachedToken {
        let (min_valid, refresh_in) = timing(key, self.lifetime, latency);
        CachedToken {
            access_token: self.access_token.clone(),
            fingerprint: self.fingerprint.clone(),
            token_type: self.token_type.clone(),
            scopes: self.scopes.clone(),
            min_valid,
            refresh_at: self.expires.saturating_sub(self.lifetime) + refresh_in,
            ..*self
        }
    }
}

/// Why a `get` produced no token.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum GetError {
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
pub(crate) struct EntryStatus {
    pub(crate) scopes: ScopeSet,
    pub(crate) expires_at: Option<SystemTime>,
    pub(crate) remaining: Option<Duration>,
    pub(crate) usable: bool,
    pub(crate) fetching: bool,
    pub(crate) last_refresh: Option<SystemTime>,
    pub(crate) last_error: Option<String>,
}

/// The cache in numbers, for systemd's STATUS= line.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct CacheSummary {
    pub(crate) keys: usize,
    /// Scope sets holding a token that may be handed out.
    pub(crate) fresh: usize,
    /// Keys whose last fetch failed, with a short reason such as
    /// "500 from issuer".
    pub(crate) failing: Vec<(String, String)>,
}

pub(crate) struct TokenCache {
    keys: BTreeMap<String, Arc<Key>>,
    /// Stops this cache's owners: cancelled at shutdown and when a reload
    /// replaces this cache.
    stop: CancellationToken,
    clock: fn() -> Duration,
}

/// One configured key in one cache: its settings, its sets, its budget,
/// and what its owners need to run.
struct Key {
    name: String,
    config: KeyConfig,
    /// Locked by callers only, for a lookup, an insert or a copy.
    sets: Mutex<HashMap<ScopeSet, Arc<Entry>>>,
    pause: watch::Sender<Pause>,
    warned_no_expiry: AtomicBool,
    warned_min_valid: AtomicBool,
    issuer: IssuerClient,
    /// The boot clock; a clock that can jump in tests.
    clock: fn() -> Duration,
    tasks: TaskTracker,
    stop: CancellationToken,
    /// Ends issuer requests under way: cancelled only at the shutdown
    /// deadline, so waiting callers get their answers until then.
    deadline: CancellationToken,
}

/// A key's issuer budget: after a failure that is the client's rather than
/// one scope set's, no set of the key asks the issuer before `until`; then
/// the first owner to try is the one probe (`probing`) and the others wait
/// for its outcome.
#[derive(Clone, Debug, Default)]
struct Pause {
    until: Option<Duration>,
    /// Client failures in a row; drives the backoff.
    failures: u32,
    error: Option<Arc<IssuerError>>,
    probing: bool,
}

/// The callers' side of an entry; its owner holds the other ends.
struct Entry {
    state: watch::Receiver<EntryState>,
    wake: Notify,
    /// Boot-clock nanoseconds of the last get, or `NEVER_USED`. Stamped by
    /// gets, read by the owner when it considers eviction.
    last_used: AtomicU64,
    /// Hands the owner over to a new cache's key on reload.
    moves: mpsc::UnboundedSender<Arc<Key>>,
}

/// An entry as its owner keeps it and callers see it.
#[derive(Debug, Default)]
struct EntryState {
    token: Option<Arc<CachedToken>>,
    last_refresh: Option<SystemTime>,
    last_error: Option<Arc<IssuerError>>,
    /// Failures since the last success; drives the backoff.
    failures: u32,
    /// No issuer request for this set before this, after a failure or
    /// while its key is paused.
    retry_at: Option<Duration>,
    /// How long the last successful fetch took, to start refreshes early
    /// enough for a slow issuer.
    latency: Duration,
    /// The last get, as the owner last read it; `None` for sets nobody
    /// asked for yet.
    last_used: Option<Duration>,
    /// A `prefetch` set: kept fresh forever, never evicted.
    kept: bool,
    /// The issuer refused this scope set (`invalid_scope`): only a get,
    /// after the backoff, asks again.
    refused: bool,
    fetching: bool,
    /// Counts the owner's answers, so a get can wait for the next one.
    answers: u64,
}

/// What an owner should do next.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Sleep until then, unless woken earlier.
    SleepUntil(Duration),
    /// Nothing to do until woken.
    Wait,
    Fetch,
    Evict,
}

/// Owns one entry: the only task that asks the issuer for its token. It
/// refreshes it ahead of expiry, answers the gets that wake it, retries
/// with backoff, and ends when the entry is idle or its cache stops.
struct Owner {
    key: Arc<Key>,
    scopes: ScopeSet,
    entry: Arc<Entry>,
    state: watch::Sender<EntryState>,
    moves: mpsc::UnboundedReceiver<Arc<Key>>,
    /// The key's budget, watched while another set's probe is out.
    pause: watch::Receiver<Pause>,
}

impl TokenCache {
    /// `deadline` stops issuer requests under way; `tasks` tracks the
    /// owners so shutdown can wait for them.
    pub(crate) fn new(
        config: &Config,
        issuer: IssuerClient,
        tasks: TaskTracker,
        deadline: CancellationToken,
    ) -> TokenCache {
        TokenCache::with_clock(config, issuer, tasks, deadline, boot_time)
    }

    fn with_clock(
        config: &Config,
        issuer: IssuerClient,
        tasks: TaskTracker,
        deadline: CancellationToken,
        clock: fn() -> Duration,
    ) -> TokenCache {
        let stop = deadline.child_token();
        let keys = config
            .keys
            .iter()
            .map(|(name, config)| {
                let key = Key {
                    name: name.clone(),
                    config: config.clone(),
                    sets: Mutex::default(),
                    pause: watch::Sender::new(Pause::default()),
                    warned_no_expiry: AtomicBool::new(false),
                    warned_min_valid: AtomicBool::new(false),
                    issuer: issuer.clone(),
                    clock,
                    tasks: tasks.clone(),
                    stop: stop.clone(),
                    deadline: deadline.clone(),
                };
                (name.clone(), Arc::new(key))
            })
            .collect();
        TokenCache { keys, stop, clock }
    }

    /// Now on the cache's clock, for [`CachedToken::remaining`].
    pub(crate) fn now(&self) -> Duration {
        (self.clock)()
    }

    /// Starts fetching every key's `prefetch` sets without waiting for
    /// them. Sets a reload carried over keep their schedule: a reload never
    /// skips a backoff.
    pub(crate) fn prefetch(&self) {
        for key in self.keys.values() {
            for set in &key.config.prefetch {
                if let Ok((entry, true)) = key.entry(set, false) {
                    entry.wake.notify_one();
                }
            }
        }
    }

    /// A token for `key` with `scopes`: the cached one while it has more
    /// than `min_valid` left, else the outcome of the owner's next issuer
    /// request. While the key is paused or the set is backing off, the last
    /// error at once.
    pub(crate) async fn get(
        &self,
        key: &str,
        scopes: &ScopeSet,
    ) -> Result<Arc<CachedToken>, GetError> {
        let key = self
            .keys
            .get(key)
            .ok_or_else(|| GetError::UnknownKey(key.to_owned()))?;
        // An owner may end (idle) between our lookup and our wait; the
        // second lookup then starts a new one.
        for _ in 0..2 {
            let (entry, _) = key.entry(scopes, true)?;
            if let Some(answer) = key.ask(&entry).await {
                return answer;
            }
        }
        Err(GetError::ShuttingDown)
    }

    /// Every cached entry of `key`, sorted by scope set.
    pub(crate) fn status(&self, key: &str) -> Vec<EntryStatus> {
        let Some(key) = self.keys.get(key) else {
            return Vec::new();
        };
        let now = self.now();
        let mut out: Vec<EntryStatus> = key
            .entries()
            .into_iter()
            .map(|(scopes, entry)| {
                let state = entry.state.borrow();
                let token = state.token.as_ref();
                EntryStatus {
                    scopes,
                    expires_at: token.map(|t| t.expires_at),
                    remaining: token.map(|t| t.remaining(now)),
                    usable: token.is_some_and(|t| t.usable(now)),
                    fetching: state.fetching,
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
    pub(crate) fn summary(&self) -> CacheSummary {
        let now = self.now();
        let mut summary = CacheSummary {
            keys: self.keys.len(),
            ..CacheSummary::default()
        };
        for (name, key) in &self.keys {
            let mut failing = None;
            for (_, entry) in key.entries() {
                let state = entry.state.borrow();
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

    /// Moves over, from the cache a reload replaces, the entries of every
    /// key whose issuer, client and secret did not change and whose scope
    /// sets the new configuration still allows, with their owners and the
    /// key's pause. A moved set counts as used now. Returns how many sets
    /// moved. Call `old.stop()` afterwards: it stops the owners left behind.
    ///
    /// The old cache keeps its handles to moved entries, so a request
    /// still running on the old service is answered by their new owner.
    pub(crate) fn adopt(&self, old: &TokenCache) -> usize {
        let now = self.now();
        let mut carried = 0;
        for (name, key) in &self.keys {
            let Some(old_key) = old.keys.get(name) else {
                continue;
            };
            if !key.config.same_credential(&old_key.config) {
                continue;
            }
            // A probe under way reports to its owner's key of the moment;
            // not marking it here risks one more probe, never a key stuck.
            let pause = old_key.pause.borrow().clone();
            key.pause.send_replace(Pause {
                probing: false,
                ..pause
            });
            let warned = |flag: &AtomicBool| flag.load(Ordering::Relaxed);
            (key.warned_no_expiry).store(warned(&old_key.warned_no_expiry), Ordering::Relaxed);
            (key.warned_min_valid).store(warned(&old_key.warned_min_valid), Ordering::Relaxed);
            let mut sets = lock(&key.sets);
            for (scopes, entry) in old_key.entries() {
                // Also drops a set the new configuration would serve from
                // another one (an empty set on a key that gained `scopes`).
                if !key.config.scopes_not_allowed(&scopes).is_empty()
                    || key.config.effective_scopes(scopes.clone()) != scopes
                {
                    continue;
                }
                entry.touch(now);
                // Fails only if the owner has just ended: the set is gone.
                if entry.moves.send(key.clone()).is_ok() {
                    sets.insert(scopes, entry);
                    carried += 1;
                }
            }
        }
        carried
    }

    /// Stops this cache's owners. Issuer requests under way still settle,
    /// so callers waiting on them get their answer.
    pub(crate) fn stop(&self) {
        self.stop.cancel();
    }
}

impl Key {
    /// The entry for `scopes` and whether it is new. A new entry's owner is
    /// started; a get (`asked`) stamps the entry as used and may not create
    /// more than `max_scope_sets`.
    fn entry(
        self: &Arc<Key>,
        scopes: &ScopeSet,
        asked: bool,
    ) -> Result<(Arc<Entry>, bool), GetError> {
        let now = (self.clock)();
        let mut sets = lock(&self.sets);
        if let Some(entry) = sets.get(scopes).filter(|e| e.alive()) {
            if asked {
                entry.touch(now);
            }
            return Ok((entry.clone(), false));
        }
        if asked && sets.len() >= self.config.max_scope_sets {
            // Entries whose owners ended do not count.
            sets.retain(|_, entry| entry.alive());
            if sets.len() >= self.config.max_scope_sets {
                return Err(GetError::TooManySets {
                    key: self.name.clone(),
                    limit: self.config.max_scope_sets,
                });
            }
        }
        let initial = EntryState {
            kept: self.config.prefetch.contains(scopes),
            last_used: asked.then_some(now),
            ..EntryState::default()
        };
        let (state, receiver) = watch::channel(initial);
        let (moves, moved) = mpsc::unbounded_channel();
        let last_used = AtomicU64::new(NEVER_USED);
        let entry = Arc::new(Entry {
            state: receiver,
            wake: Notify::new(),
            last_used,
            moves,
        });
        if asked {
            entry.touch(now);
        }
        sets.insert(scopes.clone(), entry.clone());
        drop(sets);
        let owner = Owner {
            key: self.clone(),
            scopes: scopes.clone(),
            entry: entry.clone(),
            state,
            moves: moved,
            pause: self.pause.subscribe(),
        };
        self.tasks.spawn(owner.run());
        Ok((entry, true))
    }

    /// The live entries, copied out of the lock.
    fn entries(&self) -> Vec<(ScopeSet, Arc<Entry>)> {
        lock(&self.sets)
            .iter()
            .filter(|(_, entry)| entry.alive())
            .map(|(set, entry)| (set.clone(), entry.clone()))
            .collect()
    }

    /// One try at a get through `entry`; `None` when its owner ended
    /// without an answer.
    async fn ask(&self, entry: &Entry) -> Option<Result<Arc<CachedToken>, GetError>> {
        let mut state = entry.state.clone();
        let now = (self.clock)();
        let seen = {
            let current = state.borrow_and_update();
            if let Some(token) = current.token.as_ref().filter(|t| t.usable(now)) {
                // Due, not backing off, yet unrenewed: a suspend held back
                // the owner's timer. Renew now, and serve this one.
                let backing_off = current.retry_at.is_some_and(|at| now < at);
                if now >= token.refresh_at && !backing_off {
                    entry.wake.notify_one();
                }
                return Some(Ok(token.clone()));
            }
            if let Some(error) = self.paused(now) {
                return Some(Err(GetError::Unavailable(error)));
            }
            if let (Some(error), Some(retry_at)) = (&current.last_error, current.retry_at) {
                if now < retry_at {
                    return Some(Err(GetError::Unavailable(error.clone())));
                }
            }
            current.answers
        };
        entry.wake.notify_one();
        let answer = state.wait_for(|s| s.answers > seen).await.ok()?;
        let now = (self.clock)();
        Some(match (&answer.token, &answer.last_error) {
            (Some(token), _) if token.usable(now) => Ok(token.clone()),
            (_, Some(error)) => Err(GetError::Unavailable(error.clone())),
            // An owner answers with a token or an error; not reached.
            (_, None) => Err(GetError::ShuttingDown),
        })
    }

    /// Why the key is paused, while it is.
    fn paused(&self, now: Duration) -> Option<Arc<IssuerError>> {
        let pause = self.pause.borrow();
        pause
            .until
            .filter(|until| now < *until)
            .and(pause.error.clone())
    }

    /// May an owner ask the issuer now? `Ok(probe)`: yes, and `probe` says
    /// it is the one request a pause that just ended allows. `Err(Some(t))`:
    /// the key is paused until `t`. `Err(None)`: another set's probe is out.
    fn admit(&self, now: Duration) -> Result<bool, Option<Duration>> {
        let mut verdict = Ok(false);
        // Nobody waits for a pause to become a probe: no notification.
        self.pause.send_if_modified(|pause| {
            verdict = match pause.until {
                None => Ok(false),
                Some(until) if now < until => Err(Some(until)),
                Some(_) if pause.probing => Err(None),
                Some(_) => {
                    pause.probing = true;
                    Ok(true)
                }
            };
            false
        });
        verdict
    }

    /// Pauses the key after `error`, one backoff step further than before;
    /// returns when the pause ends. The late answers of requests sent
    /// before the pause began do not add steps.
    fn pause(&self, error: &Arc<IssuerError>, probe: bool, now: Duration) -> Duration {
        let mut until = now;
        self.pause.send_modify(|pause| {
            if probe || !pause.until.is_some_and(|until| now < until) {
                pause.failures = pause.failures.saturating_add(1);
                let delay = backoff(
                    pause.failures,
                    self.config.max_backoff,
                    error.retry_after,
                    rand::rng().random(),
                );
                pause.until = Some(now + delay);
            } else if let Some(asked) = error.retry_after {
                pause.until = pause.until.max(Some(now + asked.min(MAX_RETRY_AFTER)));
            }
            pause.probing &= !probe;
            pause.error = Some(error.clone());
            until = pause.until.unwrap_or(now);
        });
        until
    }

    /// Ends the pause after a probe came back without a client failure.
    fn lift_pause(&self) {
        self.pause.send_if_modified(|pause| {
            let paused = pause.until.is_some();
            *pause = Pause::default();
            paused
        });
    }

    fn cached(
        &self,
        grant: Grant,
        asked: &ScopeSet,
        (now, wall): (Duration, SystemTime),
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
        let (min_valid, refresh_in) = timing(&self.config, lifetime, latency);
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
        tracing::info!(
            key = %self.name,
            scopes = %asked,
            lifetime_secs = lifetime.as_secs(),
            refresh_in_ms = refresh_in.as_millis() as u64,
            "received a token"
        );
        CachedToken {
            fingerprint: grant.access_token.fingerprint(),
            access_token: grant.access_token,
            token_type: grant.token_type,
            scopes: grant.scope.unwrap_or_else(|| asked.clone()),
            expires: now + lifetime,
            expires_at: wall + lifetime,
            min_valid,
            refresh_at: now + refresh_in,
            lifetime,
        }
    }
}

impl Entry {
    /// Whether its owner still runs.
    fn alive(&self) -> bool {
        self.state.has_changed().is_ok()
    }

    fn touch(&self, now: Duration) {
        let nanos = u64::try_from(now.as_nanos()).unwrap_or(NEVER_USED - 1);
        self.last_used.store(nanos, Ordering::Relaxed);
    }

    fn last_used(&self) -> Option<Duration> {
        match self.last_used.load(Ordering::Relaxed) {
            NEVER_USED => None,
            nanos => Some(Duration::from_nanos(nanos)),
        }
    }
}

impl Owner {
    async fn run(mut self) {
        loop {
            let now = (self.key.clock)();
            let last_used = self.entry.last_used();
            // Read by this task only: no need to wake callers for it.
            self.state.send_if_modified(|state| {
                state.last_used = last_used;
                false
            });
            let next = next_step(&self.state.borrow(), &self.key.config, now);
            let until = match next {
                Next::Evict => {
                    tracing::debug!(key = %self.key.name, scopes = %self.scopes, "dropped an idle scope set");
                    return;
                }
                Next::Fetch => {
                    if !self.attempt().await {
                        return;
                    }
                    continue;
                }
                Next::SleepUntil(when) => Some(when),
                Next::Wait => None,
            };
            let key = self.key.clone();
            // Biased: a move handed over just before the old cache stopped
            // must win over that stop.
            tokio::select! {
                biased;
                Some(key) = self.moves.recv() => self.moved(key),
                () = key.stop.cancelled() => if self.stopped() { return },
                () = self.entry.wake.notified() => if !self.woken().await { return },
                () = sleep_until(until, key.clock) => {}
            }
        }
    }

    /// A get woke us: it found no usable token (or, after a suspend, one
    /// past its refresh point) and may be waiting for an answer. `false`
    /// when the cache stopped meanwhile.
    async fn woken(&mut self) -> bool {
        let now = (self.key.clock)();
        let wanted = {
            let state = self.state.borrow();
            let fresh = state
                .token
                .as_ref()
                .is_some_and(|t| t.usable(now) && now < t.refresh_at);
            let backing_off = state.retry_at.is_some_and(|at| now < at);
            !fresh && !backing_off
        };
        if wanted {
            return self.attempt().await;
        }
        self.state.send_modify(|state| state.answers += 1);
        true
    }

    /// Asks the issuer when the key's budget allows and publishes the
    /// outcome. `false` when the cache stopped meanwhile.
    async fn attempt(&mut self) -> bool {
        loop {
            self.pause.borrow_and_update();
            match self.key.admit((self.key.clock)()) {
                Ok(probe) => return self.fetch(probe).await,
                Err(Some(until)) => {
                    self.blocked(until);
                    return true;
                }
                Err(None) => {
                    let key = self.key.clone();
                    tokio::select! {
                        biased;
                        () = key.stop.cancelled() => if self.stopped() { return false },
                        changed = self.pause.changed() => if changed.is_err() { return false },
                    }
                }
            }
        }
    }

    async fn fetch(&mut self, probe: bool) -> bool {
        self.state.send_modify(|state| state.fetching = true);
        tracing::debug!(key = %self.key.name, scopes = %self.scopes, probe, "requesting a token from the issuer");
        let key = self.key.clone();
        let started = tokio::time::Instant::now();
        let result = tokio::select! {
            result = key.issuer.fetch(&key.config, &self.scopes) => result,
            // Dropping the state's sender tells waiting gets there will be
            // no answer.
            () = key.deadline.cancelled() => return false,
        };
        // A reload during the request: the outcome is the new key's.
        self.take_moves();
        self.settle(result, started.elapsed(), probe);
        true
    }

    /// Publishes a request's outcome, and the key's pause it implies.
    fn settle(&mut self, result: Result<Grant, IssuerError>, latency: Duration, probe: bool) {
        let received = ((self.key.clock)(), SystemTime::now());
        let now = received.0;
        let key = self.key.clone();
        let error = match result {
            Ok(grant) => {
                if probe {
                    key.lift_pause();
                }
                let token = Arc::new(key.cached(grant, &self.scopes, received, latency));
                self.state.send_modify(|state| {
                    state.token = Some(token);
                    state.last_refresh = Some(received.1);
                    state.last_error = None;
                    state.failures = 0;
                    state.retry_at = None;
                    state.latency = latency;
                    state.refused = false;
                    state.fetching = false;
                    state.answers += 1;
                });
                return;
            }
            Err(error) => Arc::new(error),
        };
        let failures = self.state.borrow().failures.saturating_add(1);
        let retry_at = if pauses_key(&error) {
            key.pause(&error, probe, now)
        } else {
            if probe {
                key.lift_pause();
            }
            let draw = rand::rng().random();
            now + backoff(failures, key.config.max_backoff, error.retry_after, draw)
        };
        tracing::warn!(
            key = %key.name,
            scopes = %self.scopes,
            issuer_status = error.status(),
            failures,
            retry_in_ms = retry_at.saturating_sub(now).as_millis() as u64,
            "token request failed: {error}"
        );
        let refused = refuses_scope(&error);
        self.state.send_modify(|state| {
            state.failures = failures;
            state.retry_at = Some(retry_at);
            state.last_error = Some(error);
            state.refused = refused;
            state.fetching = false;
            state.answers += 1;
        });
    }

    /// The key is paused until `until`: this set answers with its reason.
    fn blocked(&mut self, until: Duration) {
        let error = self.key.pause.borrow().error.clone();
        self.state.send_modify(|state| {
            state.retry_at = Some(until);
            state.last_error = error.or(state.last_error.take());
            state.answers += 1;
        });
    }

    /// From now on this entry is `key`'s, under its settings.
    fn moved(&mut self, key: Arc<Key>) {
        let kept = key.config.prefetch.contains(&self.scopes);
        self.state.send_if_modified(|state| {
            state.kept = kept;
            state.token = state
                .token
                .as_ref()
                .map(|token| Arc::new(token.under(&key.config, state.latency)));
            false
        });
        self.pause = key.pause.subscribe();
        self.key = key;
    }

    fn take_moves(&mut self) {
        while let Ok(key) = self.moves.try_recv() {
            self.moved(key);
        }
    }

    /// Whether the cache this entry belongs to has stopped, after taking
    /// any move to a new cache handed over before the old one stopped.
    fn stopped(&mut self) -> bool {
        self.take_moves();
        self.key.stop.is_cancelled()
    }
}

/// Sleeps until boot-clock time `until`, or forever for `None`. Tokio's
/// timer stops during a suspend, so it may fire late: the owner re-reads
/// the boot clock when it does.
async fn sleep_until(until: Option<Duration>, clock: fn() -> Duration) {
    match until {
        Some(until) => tokio::time::sleep(until.saturating_sub(clock())).await,
        None => std::future::pending().await,
    }
}

/// Time since boot, suspend included (`CLOCK_BOOTTIME`).
fn boot_time() -> Duration {
    clock_gettime(ClockId::CLOCK_BOOTTIME)
        // Linux has it since 2.6.39; failing that, the monotonic clock is
        // the best there is.
        .or_else(|_| clock_gettime(ClockId::CLOCK_MONOTONIC))
        .map(Duration::from)
        .unwrap_or_default()
}

/// Failures that are the client's rather than one scope set's: the
/// issuer's rate limit or maintenance notice (429 or 503 with
/// `Retry-After`), and rejected or unreadable credentials.
fn pauses_key(error: &IssuerError) -> bool {
    error.retry_after.is_some()
        || matches!(
            error.kind,
            FailureKind::Denied { .. } | FailureKind::NoSecret(_)
        )
}

/// The issuer refused this scope set itself (RFC 6749 5.2 `invalid_scope`).
fn refuses_scope(error: &IssuerError) -> bool {
    matches!(&error.kind, FailureKind::Refused { words, .. } if words.starts_with("invalid_scope"))
}

/// The owner's decision for an entry in `state` at `now`.
fn next_step(state: &EntryState, key: &KeyConfig, now: Duration) -> Next {
    if state.fetching {
        return Next::Wait;
    }
    let idle_until = (!state.kept)
        .then(|| state.last_used.map(|used| used + key.idle_evict))
        .flatten();
    if idle_until.is_some_and(|until| now >= until) {
        return Next::Evict;
    }
    let due = match (&state.token, state.retry_at) {
        // After a failure the backoff decides, and only for sets worth
        // keeping fresh: prefetch sets, and sets whose token is still in
        // use. A failing set nobody is waiting for waits for the next get;
        // so does a scope set the issuer refused.
        (token, Some(retry_at)) => {
            let worth = state.kept || token.as_ref().is_some_and(|t| t.usable(now));
            (worth && !state.refused).then_some(retry_at)
        }
        (Some(token), None) => Some(token.refresh_at),
        // Never fetched: the get or prefetch that created it wakes us.
        (None, None) => None,
    };
    match (due, idle_until) {
        (Some(due), _) if now >= due => Next::Fetch,
        (Some(due), Some(idle)) => Next::SleepUntil(due.min(idle)),
        (Some(due), None) => Next::SleepUntil(due),
        (None, Some(idle)) => Next::SleepUntil(idle),
        (None, None) => Next::Wait,
    }
}

/// `min_valid` and the delay to the refresh point for a token of
/// `lifetime` under `key`, after a fetch that took `latency`.
fn timing(key: &KeyConfig, lifetime: Duration, latency: Duration) -> (Duration, Duration) {
    let min_valid = effective_min_valid(key.min_valid, lifetime);
    let margin = (latency * 2).clamp(
        MIN_REFRESH_MARGIN,
        key.request_timeout.max(MIN_REFRESH_MARGIN),
    );
    let refresh_in = refresh_delay(lifetime, min_valid, margin, rand::rng().random());
    (min_valid, refresh_in)
}

/// `min_valid` capped at a quarter of the token's lifetime: a 60 s
/// `min_valid` would make a 60 s token useless on arrival.
pub(crate) fn effective_min_valid(min_valid: Duration, lifetime: Duration) -> Duration {
    min_valid.min(lifetime / 4)
}

/// How long after receipt a token is renewed. A point between 60 % and 75 %
/// of its life (`draw` in [0, 1) picks it), so keys and hosts do not refresh
/// in step; but no later than leaves `margin` for the new token to arrive
/// before the old one has only `min_valid` left, and no earlier than a
/// quarter of its life, so a tiny token cannot make us spin.
pub(crate) fn refresh_delay(
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
pub(crate) fn backoff(
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

/// The loopback issuer the integration tests run, for the unit tests that
/// need real issuer requests.
#[cfg(test)]
#[path = "../../tests/support/issuer.rs"]
mod test_issuer;

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

    fn token(now: Duration, refresh_in: Duration) -> Arc<CachedToken> {
        Arc::new(CachedToken {
            access_token: AccessToken::new("t".into()),
            fingerprint: "unchecked".into(),
            token_type: "Bearer".into(),
            scopes: ScopeSet::default(),
            expires: now + s(100),
            expires_at: SystemTime::now(),
            min_valid: s(25),
            refresh_at: now + refresh_in,
            lifetime: s(100),
        })
    }

    /// A boot-clock reading for the pure tests: some time after boot.
    fn boot() -> Duration {
        s(1000)
    }

    #[tokio::test(start_paused = true)]
    async fn refresher_sleeps_until_the_refresh_point_then_fetches() {
        let now = boot();
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
        let now = boot();
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
        let now = boot();
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
        let now = boot();
        let key = key(s(3600));
        let fetching = EntryState {
            fetching: true,
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
        let now = boot();
        let token = token(now, s(60));
        assert!(token.usable(now));
        let now = now + s(74);
        assert!(token.usable(now));
        let now = now + s(1);
        assert!(!token.usable(now));
        assert_eq!(token.remaining(now), s(25));
    }

    /// A boot clock that a test can move on without tokio's timers: what a
    /// suspend looks like from inside the process. Per thread, so tests
    /// running at once do not share it (they use one-thread runtimes).
    mod suspend {
        use std::cell::Cell;
        use std::time::{Duration, Instant};

        thread_local! {
            static BOOTED: Instant = Instant::now();
            static SLEPT: Cell<Duration> = const { Cell::new(Duration::ZERO) };
        }

        pub(super) fn now() -> Duration {
            BOOTED.with(Instant::elapsed) + SLEPT.get()
        }

        pub(super) fn sleep(time: Duration) {
            SLEPT.set(SLEPT.get() + time);
        }
    }

    use super::test_issuer as issuer;

    /// Real time and a real loopback issuer: tokio's paused clock would
    /// fire the request timeout while the loopback request is under way.
    #[tokio::test]
    async fn after_a_suspend_an_expired_token_is_not_served_and_a_due_refresh_runs_at_once() {
        let issuer =
            issuer::Issuer::start(vec![issuer::ClientSpec::checkout("c", "s3cret", &[])]).await;
        let text = format!(
            "[keys.k]\ntoken_url = {:?}\nclient_id = \"c\"\nclient_secret = \"s3cret\"\n",
            issuer.token_url(issuer::Dialect::Checkout)
        );
        let config = crate::config::parse(&text, std::path::Path::new("t")).unwrap();
        let tasks = TaskTracker::new();
        let cache = TokenCache::with_clock(
            &config,
            IssuerClient::new().unwrap(),
            tasks.clone(),
            CancellationToken::new(),
            suspend::now,
        );
        let set = ScopeSet::default();
        let first = cache.get("k", &set).await.unwrap();
        assert!(Arc::ptr_eq(&first, &cache.get("k", &set).await.unwrap()));
        assert_eq!(issuer.requests().len(), 1);

        // Two hours asleep: the hour-long token is dead, though tokio's
        // clock (and the refresh timer) did not move.
        suspend::sleep(s(7200));
        assert!(!first.usable(cache.now()));
        let second = cache.get("k", &set).await.unwrap();
        assert_eq!(issuer.requests().len(), 2);
        assert_ne!(second.access_token, first.access_token);
        assert!(second.usable(cache.now()));

        // 50 minutes asleep: past the refresh point (at most 75 % of the
        // hour), not past min_valid. Served at once, and renewed at once.
        suspend::sleep(s(3000));
        let third = cache.get("k", &set).await.unwrap();
        assert!(
            Arc::ptr_eq(&third, &second),
            "the still-usable token is served"
        );
        issuer.wait_for_requests(3, s(5)).await;
        let fourth = loop {
            let token = cache.get("k", &set).await.unwrap();
            if !Arc::ptr_eq(&token, &second) {
                break token;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        assert!(fourth.remaining(cache.now()) > s(3500));
        assert_eq!(issuer.requests().len(), 3);
        cache.stop();
        tasks.close();
        tasks.wait().await;
    }
}
