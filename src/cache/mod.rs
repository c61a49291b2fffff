//! The token cache: one entry per (key, scope set), each owned by one task.
//!
//! - An entry's [`Owner`] task alone asks the issuer for its token, and
//!   publishes the entry for callers to read ([`published`]). A get with a usable token
//!   returns it without waking anyone; otherwise it wakes the owner and
//!   waits for its next answer, so there is one request at a time per entry
//!   by construction and a caller that hangs up cancels nothing. Between
//!   requests an owner sleeps on one timer (refresh point, retry time, idle
//!   eviction): thousands of idle entries cost no CPU.
//! - Issuers limit clients, not scope sets: a 429 or 503 with `Retry-After`,
//!   or rejected credentials, pause the whole key (written by its sets'
//!   owners, read by gets). While paused every set of the key answers
//!   `unavailable` at once; after it, one owner probes, the others wait.
//! - A key's map of sets is locked by callers only (gets, reloads, status,
//!   and the cache's stop, which rings every owner once). An owner that
//!   ends (idle, or its cache stopped) leaves a dead entry, which the next
//!   caller to meet it replaces or skips.
//! - Memory: each of 10,000 cached sets holds about 1.5 KB of heap
//!   (glibc's malloc_stats and heaptrack over `scripts/bench`'s sequence):
//!   the owner task (384 bytes, [`Owner::run`] says why not more), the
//!   entry (288), the token and its record (~450), its share of the map,
//!   its scope set, and while its audit window is open its audit subject.
//!   Hence a scope set shared by every copy ([`crate::scope`]), an entry
//!   published without a watch channel ([`published`]) and an owner that
//!   waits on one doorbell ([`Entry`]'s `wake`).
//! - A reload moves the sets of unchanged keys, owners included, to the new
//!   cache; the owner follows the new key's settings from then on.
//!
//! Times are on the boot clock (`CLOCK_BOOTTIME`), which counts while the
//! machine is suspended and tokio's clock does not; owners and gets re-read
//! it, so a token that died during a suspend is never handed out and a
//! refresh that fell due is made at once.
//!
//! Here: the cache as callers see it (gets, reloads, status). In
//! [`owner`]: the entry's task. In [`published`]: how it publishes the
//! entry. In [`budget`]: the key's pause. In [`schedule`]: the pure rules
//! (what an owner does next, when to refresh, how long to back off).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use nix::time::{clock_gettime, ClockId};

use arc_swap::ArcSwapOption;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, KeyConfig};
use crate::issuer::{Grant, IssuerClient, IssuerError};
use crate::scope::ScopeSet;
use crate::secret::{AccessToken, Fingerprint};

mod budget;
mod owner;
mod published;
mod schedule;

use budget::Pause;
use owner::Owner;
use published::Published;
use schedule::{due, timing};

/// What we assume when an issuer leaves `expires_in` out. RFC 6749 lets it,
/// and reusing such a token forever (as some clients do) ends in failures
/// nobody can explain; an hour is the common default lifetime.
const ASSUMED_LIFETIME: Duration = Duration::from_secs(3600);
/// `Entry::last_used` of a set nobody asked for (a prefetch set).
const NEVER_USED: u64 = u64::MAX;

/// What one entry holds a token for: a scope set and the RFC 8707
/// resource asked for with it. The same scopes for two resources are two
/// tokens with different audiences, so two entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct SetId {
    pub(crate) scopes: ScopeSet,
    /// One of the key's `resource` values; `None` sends none.
    pub(crate) resource: Option<Arc<str>>,
}

impl SetId {
    /// The entry a get without a resource uses, as `prefetch` fills it.
    pub(crate) fn scopes_only(scopes: ScopeSet) -> SetId {
        SetId {
            scopes,
            resource: None,
        }
    }

    /// A `prefetch` set: prefetch names scope sets only, and asks for no
    /// resource, like a get that names none.
    fn prefetched(&self, key: &KeyConfig) -> bool {
        self.resource.is_none() && key.prefetch.contains(&self.scopes)
    }
}

/// A token as we hold it. Its times are on the boot clock.
#[derive(Debug)]
pub(crate) struct CachedToken {
    pub(crate) access_token: AccessToken,
    /// The token's fingerprint for log lines, worked out once here rather
    /// than hashed again on every handout.
    pub(crate) fingerprint: Fingerprint,
    /// `Bearer` is held without an allocation ([`Grant::token_type`]).
    pub(crate) token_type: Cow<'static, str>,
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
            fingerprint: self.fingerprint,
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

/// A point-in-time view of one entry for `status`. Never a token.
#[derive(Debug, Default)]
pub(crate) struct EntryStatus {
    pub(crate) scopes: ScopeSet,
    pub(crate) resource: Option<Arc<str>>,
    /// A `prefetch` set, which `tokend status` vouches for.
    pub(crate) prefetch: bool,
    pub(crate) expires_at: Option<SystemTime>,
    pub(crate) remaining: Option<Duration>,
    pub(crate) usable: bool,
    pub(crate) fetching: bool,
    /// The key is paused after a client failure (a rate limit, rejected
    /// credentials): no set of it asks the issuer until the pause ends.
    pub(crate) paused: bool,
    /// Until the owner next asks the issuer on its own: zero when due or
    /// under way, `None` when only a get would make it ask.
    pub(crate) next_request: Option<Duration>,
    pub(crate) last_refresh: Option<SystemTime>,
    pub(crate) last_error: Option<String>,
    /// The issuer's HTTP status in the last error, when it answered.
    pub(crate) last_error_status: Option<u16>,
    pub(crate) last_failure: Option<SystemTime>,
    /// Issuer requests made for this set.
    pub(crate) requests: u64,
    /// Gets answered with a token from this set.
    pub(crate) served: u64,
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
    /// When the first fresh token drops under `min_valid`: `fresh` changes
    /// then without any owner having done anything.
    pub(crate) stale_in: Option<Duration>,
}

pub(crate) struct TokenCache {
    keys: BTreeMap<String, Arc<Key>>,
    /// Stops this cache's owners: cancelled at shutdown and when a reload
    /// replaces this cache.
    stop: CancellationToken,
    clock: fn() -> Duration,
    /// Told by owners whenever what [`TokenCache::summary`] counts may
    /// have changed, so the STATUS= line is recomputed on events, not on
    /// a timer that would wake an idle daemon.
    changes: Arc<Notify>,
}

/// One configured key in one cache: its settings, its sets, its budget,
/// and what its owners need to run.
struct Key {
    name: String,
    config: KeyConfig,
    /// Locked by callers only, for a lookup, an insert or a copy.
    sets: Mutex<HashMap<SetId, Arc<Entry>>>,
    pause: watch::Sender<Pause>,
    warned_no_expiry: AtomicBool,
    warned_min_valid: AtomicBool,
    issuer: IssuerClient,
    /// The boot clock; a clock that can jump in tests.
    clock: fn() -> Duration,
    changes: Arc<Notify>,
    tasks: TaskTracker,
    stop: CancellationToken,
    /// Ends issuer requests under way: cancelled only at the shutdown
    /// deadline, so waiting callers get their answers until then.
    deadline: CancellationToken,
}

/// The callers' side of an entry; its owner holds the other ends.
struct Entry {
    /// What it holds a token for. Here rather than in the owner, whose
    /// idle task it made a size step (128 bytes) larger.
    id: SetId,
    /// Written by the owner only; closed when it ends.
    state: Published<EntryState>,
    /// The owner's one doorbell, rung by a get that wants an answer
    /// (`asked`), by a reload handing the entry over (`move_to`) and when
    /// the cache stops: the owner looks at all three whenever it rings.
    /// One `Notify` rather than one per reason, because each is a waiter
    /// every idle owner task holds: with three, 10,000 idle owners took
    /// 128 bytes each more (tokio sizes tasks in steps of 128 bytes).
    wake: Notify,
    /// A get (or a prefetch) rang for the owner's answer.
    asked: AtomicBool,
    /// Boot-clock nanoseconds of the last get, or `NEVER_USED`. Stamped by
    /// gets, read by the owner when it considers eviction.
    last_used: AtomicU64,
    /// The new cache's key a reload hands the owner over to, until the
    /// owner takes it. Lock-free: written by the reload, taken by the
    /// owner. (A channel cost 800 bytes per entry.)
    move_to: ArcSwapOption<Key>,
    /// Gets answered with a token, counted by the callers.
    served: AtomicU64,
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
    /// A `prefetch` set: kept fresh forever, never evicted.
    kept: bool,
    /// The issuer refused this scope set (`invalid_scope`): only a get,
    /// after the backoff, asks again.
    refused: bool,
    fetching: bool,
    /// Counts the owner's answers, so a get can wait for the next one.
    answers: u64,
    /// When the last request failed (wall clock, for `status`).
    last_failure: Option<SystemTime>,
    /// Issuer requests made, for `status`.
    requests: u64,
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
        let changes = Arc::new(Notify::new());
        let keys: BTreeMap<String, Arc<Key>> = config
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
                    changes: changes.clone(),
                    tasks: tasks.clone(),
                    stop: stop.clone(),
                    deadline: deadline.clone(),
                };
                (name.clone(), Arc::new(key))
            })
            .collect();
        // Owners do not wait on `stop` themselves (see `Entry::wake`): this
        // rings them when it is cancelled, by `stop()` or by the deadline.
        // An owner started later sees it cancelled before it waits.
        let ring: Vec<Arc<Key>> = keys.values().cloned().collect();
        tasks.spawn({
            let stop = stop.clone();
            async move {
                stop.cancelled().await;
                for key in ring {
                    for entry in lock(&key.sets).values() {
                        entry.wake.notify_one();
                    }
                }
            }
        });
        TokenCache {
            keys,
            stop,
            clock,
            changes,
        }
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
                let id = SetId::scopes_only(set.clone());
                if let Ok((entry, true)) = key.entry(&id, false) {
                    entry.ask_owner();
                }
            }
        }
    }

    /// A token for `key` with `id`'s scopes and resource: the cached one while it has more
    /// than `min_valid` left, else the outcome of the owner's next issuer
    /// request. While the key is paused or the set is backing off, the last
    /// error at once.
    pub(crate) async fn get(&self, key: &str, id: &SetId) -> Result<Arc<CachedToken>, GetError> {
        let key = self
            .keys
            .get(key)
            .ok_or_else(|| GetError::UnknownKey(key.to_owned()))?;
        // An owner may end (idle) between our lookup and our wait; the
        // second lookup then starts a new one.
        for _ in 0..2 {
            let (entry, _) = key.entry(id, true)?;
            if let Some(answer) = key.ask(&entry).await {
                if answer.is_ok() {
                    entry.served.fetch_add(1, Ordering::Relaxed);
                }
                return answer;
            }
        }
        Err(GetError::ShuttingDown)
    }

    /// Every cached entry of `key`, sorted by scope set, then resource.
    pub(crate) fn status(&self, key: &str) -> Vec<EntryStatus> {
        let Some(key) = self.keys.get(key) else {
            return Vec::new();
        };
        let now = self.now();
        let paused_until = key.paused_until(now);
        let mut out: Vec<EntryStatus> = key
            .entries()
            .into_iter()
            .map(|(id, entry)| entry.status(id, paused_until, now))
            .collect();
        // A prefetch set whose owner has not started (or has ended) is
        // still one `status` vouches for: it shows as never fetched.
        for set in &key.config.prefetch {
            let listed = |status: &EntryStatus| &status.scopes == set && status.resource.is_none();
            if !out.iter().any(listed) {
                out.push(EntryStatus {
                    scopes: set.clone(),
                    prefetch: true,
                    paused: paused_until.is_some(),
                    ..EntryStatus::default()
                });
            }
        }
        out.sort_by(|a, b| (&a.scopes, &a.resource).cmp(&(&b.scopes, &b.resource)));
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
            let entries: Vec<Arc<Entry>> = lock(&key.sets).values().cloned().collect();
            for entry in entries.iter().filter(|entry| entry.alive()) {
                let state = entry.state.borrow();
                if let Some(token) = state.token.as_ref().filter(|t| t.usable(now)) {
                    summary.fresh += 1;
                    let stale_in = token.remaining(now) - token.min_valid;
                    summary.stale_in = Some(summary.stale_in.map_or(stale_in, |s| s.min(stale_in)));
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

    /// Resolves after an owner published something [`TokenCache::summary`]
    /// counts (a token, a failure, an eviction) since the last call; at
    /// once when that happened before it. For one waiter.
    pub(crate) async fn changed(&self) {
        self.changes.notified().await;
    }

    /// Moves over, from the cache a reload replaces, the entries of every
    /// key whose issuer, client and secret did not change and whose scope
    /// sets and resources the new configuration still allows, with their owners and the
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
            key.carry_pause(old_key);
            let warned = |flag: &AtomicBool| flag.load(Ordering::Relaxed);
            (key.warned_no_expiry).store(warned(&old_key.warned_no_expiry), Ordering::Relaxed);
            (key.warned_min_valid).store(warned(&old_key.warned_min_valid), Ordering::Relaxed);
            let mut sets = lock(&key.sets);
            for (id, entry) in old_key.entries() {
                // A token granted more than the new list allows stays
                // behind with its owner, which the old cache's stop ends:
                // the new cache asks afresh, and judges the new grant.
                if !still_allowed(&key.config, &id) || !entry.token_fits(&key.config) {
                    continue;
                }
                entry.touch(now);
                // An owner that ends right after this check leaves a dead
                // entry, which the next get replaces.
                if entry.alive() {
                    entry.move_to.store(Some(key.clone()));
                    entry.wake.notify_one();
                    sets.insert(id, entry);
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

/// Whether a token granted `scopes` may be handed out under `config`:
/// within its `scopes` list, when it has one (a key without one takes
/// what the issuer grants). The issuer client judges each grant as it
/// arrives; this judges a held one again when a reload changes the list.
fn grant_fits(config: &KeyConfig, scopes: &ScopeSet) -> bool {
    config
        .scopes
        .as_ref()
        .map_or(true, |allowed| scopes.outside(allowed).is_empty())
}

/// Whether a reload may carry `id`'s entry over to a key configured as
/// `config`. Also false for a set the new configuration would serve from
/// another one (an empty set on a key that gained `scopes`), and for a
/// resource the key no longer lists.
fn still_allowed(config: &KeyConfig, id: &SetId) -> bool {
    let resource_allowed = id
        .resource
        .as_deref()
        .map_or(true, |resource| config.allows_resource(resource));
    resource_allowed
        && config.scopes_not_allowed(&id.scopes).is_empty()
        && config.effective_scopes(id.scopes.clone()) == id.scopes
}

impl Key {
    /// The entry for `id` and whether it is new. A new entry's owner is
    /// started; a get (`asked`) stamps the entry as used and may not create
    /// more than `max_scope_sets`.
    fn entry(self: &Arc<Key>, id: &SetId, asked: bool) -> Result<(Arc<Entry>, bool), GetError> {
        let now = (self.clock)();
        let mut sets = lock(&self.sets);
        if let Some(entry) = sets.get(id).filter(|e| e.alive()) {
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
            kept: id.prefetched(&self.config),
            ..EntryState::default()
        };
        let last_used = AtomicU64::new(NEVER_USED);
        let entry = Arc::new(Entry {
            id: id.clone(),
            state: Published::new(initial),
            wake: Notify::new(),
            asked: AtomicBool::new(false),
            last_used,
            move_to: ArcSwapOption::empty(),
            served: AtomicU64::new(0),
        });
        if asked {
            entry.touch(now);
        }
        sets.insert(id.clone(), entry.clone());
        drop(sets);
        let owner = Owner {
            key: self.clone(),
            entry: entry.clone(),
        };
        self.tasks.spawn(owner.run());
        Ok((entry, true))
    }

    /// The live entries, copied out of the lock.
    fn entries(&self) -> Vec<(SetId, Arc<Entry>)> {
        lock(&self.sets)
            .iter()
            .filter(|(_, entry)| entry.alive())
            .map(|(set, entry)| (set.clone(), entry.clone()))
            .collect()
    }

    /// One try at a get through `entry`; `None` when its owner ended
    /// without an answer.
    async fn ask(&self, entry: &Entry) -> Option<Result<Arc<CachedToken>, GetError>> {
        let now = (self.clock)();
        let seen = {
            let current = entry.state.borrow();
            if let Some(token) = current.token.as_ref().filter(|t| t.usable(now)) {
                // Due, not backing off, yet unrenewed: a suspend held back
                // the owner's timer. Renew now, and serve this one.
                let backing_off = current.retry_at.is_some_and(|at| now < at);
                if now >= token.refresh_at && !backing_off {
                    entry.ask_owner();
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
        entry.ask_owner();
        let answer = |answer: &EntryState| {
            let now = (self.clock)();
            match (&answer.token, &answer.last_error) {
                (Some(token), _) if token.usable(now) => Ok(token.clone()),
                (_, Some(error)) => Err(GetError::Unavailable(error.clone())),
                // An owner answers with a token or an error; not reached.
                (_, None) => Err(GetError::ShuttingDown),
            }
        };
        entry
            .state
            .wait_for(|s| (s.answers > seen).then(|| answer(s)))
            .await
    }

    /// A grant as the cache holds it: its lifetime (assumed when the
    /// issuer gave none), `min_valid` and refresh point on the boot clock.
    fn cached(
        &self,
        grant: Grant,
        asked: &SetId,
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
            scopes = %asked.scopes,
            resource = asked.resource.as_deref(),
            lifetime_secs = lifetime.as_secs(),
            refresh_in_ms = refresh_in.as_millis() as u64,
            "received a token"
        );
        CachedToken {
            fingerprint: grant.access_token.fingerprint(),
            access_token: grant.access_token,
            token_type: grant.token_type,
            // Issuers mostly grant what was asked: the token then shares
            // the entry's set instead of holding a copy of its own.
            scopes: match grant.scope {
                Some(granted) if granted != asked.scopes => granted,
                _ => asked.scopes.clone(),
            },
            expires: now + lifetime,
            expires_at: wall + lifetime,
            min_valid,
            refresh_at: now + refresh_in,
            lifetime,
        }
    }
}

impl Entry {
    /// Asks the owner for an answer: a fetch, unless its token is fresh
    /// or it is backing off.
    fn ask_owner(&self) {
        // Set before the ring, so the owner the ring wakes sees it.
        self.asked.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Whether its token, if it has one, may be handed out under `config`.
    fn token_fits(&self, config: &KeyConfig) -> bool {
        let state = self.state.borrow();
        state
            .token
            .as_ref()
            .map_or(true, |token| grant_fits(config, &token.scopes))
    }

    /// Whether its owner still runs.
    fn alive(&self) -> bool {
        !self.state.is_closed()
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

    /// This entry for `status`, its key paused until `paused_until`.
    fn status(&self, id: SetId, paused_until: Option<Duration>, now: Duration) -> EntryStatus {
        let state = self.state.borrow();
        let token = state.token.as_ref();
        let next_request = if state.fetching {
            Some(Duration::ZERO)
        } else {
            paused_until
                .or_else(|| due(&state, now))
                .map(|at| at.saturating_sub(now))
        };
        EntryStatus {
            scopes: id.scopes,
            resource: id.resource,
            prefetch: state.kept,
            expires_at: token.map(|t| t.expires_at),
            remaining: token.map(|t| t.remaining(now)),
            usable: token.is_some_and(|t| t.usable(now)),
            fetching: state.fetching,
            paused: paused_until.is_some(),
            next_request,
            last_refresh: state.last_refresh,
            last_error: state.last_error.as_ref().map(|e| e.to_string()),
            last_error_status: state.last_error.as_ref().and_then(|e| e.status()),
            last_failure: state.last_failure,
            requests: state.requests,
            served: self.served.load(Ordering::Relaxed),
        }
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

    /// A loopback issuer, and a configuration with one key `k` on it.
    async fn loopback_key() -> (issuer::Issuer, Config) {
        let issuer =
            issuer::Issuer::start(vec![issuer::ClientSpec::checkout("c", "s3cret", &[])]).await;
        let text = format!(
            "[keys.k]\ntoken_url = {:?}\nclient_id = \"c\"\nclient_secret = \"s3cret\"\n",
            issuer.token_url(issuer::Dialect::Checkout)
        );
        let config = crate::config::parse(&text, std::path::Path::new("t")).unwrap();
        (issuer, config)
    }

    /// Real time and a real loopback issuer: tokio's paused clock would
    /// fire the request timeout while the loopback request is under way.
    #[tokio::test]
    async fn after_a_suspend_an_expired_token_is_not_served_and_a_due_refresh_runs_at_once() {
        let (issuer, config) = loopback_key().await;
        let tasks = TaskTracker::new();
        let cache = TokenCache::with_clock(
            &config,
            IssuerClient::new().unwrap(),
            tasks.clone(),
            CancellationToken::new(),
            suspend::now,
        );
        let set = SetId::default();
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

    /// A reload that narrows `scopes` under a token granted wider than the
    /// new list leaves that entry behind: the new cache asks afresh and
    /// judges the new grant by the new list.
    #[tokio::test]
    async fn a_reload_narrowing_scopes_leaves_a_wider_grant_behind() {
        let client = issuer::ClientSpec::checkout("c", "s3cret", &["gateway", "vault"]);
        let issuer = issuer::Issuer::start(vec![client]).await;
        let config = |scopes: &str| {
            let text = format!(
                "[keys.k]\ntoken_url = {:?}\nclient_id = \"c\"\nclient_secret = \"s3cret\"\n\
                 scopes = {scopes}\n",
                issuer.token_url(issuer::Dialect::Checkout)
            );
            crate::config::parse(&text, std::path::Path::new("t")).unwrap()
        };
        let cache_of = |config: &Config| {
            TokenCache::new(
                config,
                IssuerClient::new().unwrap(),
                TaskTracker::new(),
                CancellationToken::new(),
            )
        };
        issuer.set_fault(Some(issuer::Fault::Members(vec![(
            "scope".into(),
            serde_json::json!("gateway vault"),
        )])));
        let wide = config(r#"["gateway", "vault"]"#);
        let old = cache_of(&wide);
        let gateway = SetId::scopes_only(ScopeSet::new(["gateway"]).unwrap());
        let token = old.get("k", &gateway).await.unwrap();
        assert_eq!(token.scopes.joined(), "gateway vault");

        let narrowed = cache_of(&config(r#"["gateway"]"#));
        assert_eq!(narrowed.adopt(&old), 0, "the wide grant was carried over");
        assert!(matches!(
            narrowed.get("k", &gateway).await,
            Err(GetError::Unavailable(_))
        ));
        assert_eq!(
            issuer.requests().len(),
            2,
            "the narrowed cache asked afresh"
        );
        // A list that still allows the grant carries it.
        let same = cache_of(&wide);
        assert_eq!(same.adopt(&old), 1);
        for cache in [old, narrowed, same] {
            cache.stop();
        }
    }

    /// Owners wait on one doorbell, and learn of their cache stopping from
    /// the ring that follows: an owner that started after it stopped, or
    /// one a get rings at the same time, must still never ask the issuer.
    #[tokio::test]
    async fn after_a_stop_no_owner_asks_the_issuer_and_every_owner_ends() {
        let (issuer, config) = loopback_key().await;
        let tasks = TaskTracker::new();
        let cache = TokenCache::new(
            &config,
            IssuerClient::new().unwrap(),
            tasks.clone(),
            CancellationToken::new(),
        );
        let fetched = SetId::default();
        cache.get("k", &fetched).await.unwrap();
        assert_eq!(issuer.requests().len(), 1);
        cache.stop();
        // A new set's owner starts after the stop; the get rings it.
        let late = SetId::scopes_only(ScopeSet::new(["late"]).unwrap());
        assert!(matches!(
            cache.get("k", &late).await,
            Err(GetError::ShuttingDown)
        ));
        tasks.close();
        tokio::time::timeout(s(5), tasks.wait())
            .await
            .expect("every owner, and the ring, ended");
        assert_eq!(issuer.requests().len(), 1);
    }
}
