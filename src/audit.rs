//! The audit log: the lines tokend writes about token handouts, denials
//! and reloads, and the bound that keeps any one caller from flooding them.
//!
//! A line about a caller carries its key and scope set (where it has them)
//! and the caller's `peer_uid`, `peer_pid` and `peer_gid` as the kernel
//! recorded them when it connected, and `peer_exe` and `peer_comm`: the
//! target of `/proc/<pid>/exe` and the contents of `/proc/<pid>/comm`.
//! Those two are informational only: the pid may have been reused by the
//! time they are read, a process picks its own `comm`, and where /proc
//! hides the process from tokend (the shipped unit's `ProtectProc=`) they
//! are `?`. They are read once per connection, when its first line is
//! written ([`crate::peer::Caller::process`]), never for counted repeats.
//!
//! Text a caller chose reaches a line only cut short and printable
//! ([`crate::printable::shown`]): a name that is not a key, and the scope
//! set of a `scope_not_allowed` denial, which holds what the key does not
//! list ([`SHOWN_SCOPES`], with `refused_scopes` counting them). Every other
//! scope set in a line is within its key's configured list.
//!
//! Every handout and every denial belongs to a *subject*:
//! - a handout: the caller's uid and pid, the key, the scope set and the
//!   token's fingerprint (so: the first time a process gets a token);
//! - a denial: its kind (no such key, forbidden, scopes not allowed,
//!   unavailable, busy for too many scope sets, a reload it may not ask
//!   for), the caller's uid and the key. For "no such key" the uid alone:
//!   the name is the caller's choice, and random names would each make a
//!   subject of their own.
//!
//! The first event of a subject is logged at once, at info, and opens a
//! [`WINDOW`]. Further events of it within the window are counted (and
//! logged one by one only at debug); when the window ends one line sums
//! them up, `… and 19,999 more handouts of key payments to uid 1000`, with
//! a `repeats` field. A window that had repeats is followed by another, so
//! a steady flood writes one line per window; a subject whose window passed
//! without any is forgotten, and its next event is logged in full again.
//!
//! A handout's subject holds the pid, so a uid that forks a process per
//! get would make each process a subject, and a line, of its own. At most
//! [`ITEMISED_PER_UID_AND_KEY`] handout subjects of one uid and key are
//! tracked at once; handouts of further ones are *folded*: counted under
//! one more subject of that uid and key, announced when its window opens
//! and summed up like any other (`… and 484 more handouts of key payments
//! to uid 1000 not itemised`). A slot frees up when one of the tracked
//! subjects is forgotten. Denials need no such bound: their subjects are
//! already one per uid, kind and key. So another uid, another key or a new
//! kind of denial still appears at once, while one uid's forks of one key
//! cost a bounded number of lines per window.
//!
//! At most [`MAX_SUBJECTS`] subjects (folded ones included) are tracked at
//! once: events of further ones are counted and summed up as "events not
//! itemised", so memory stays bounded whatever callers do; the count of
//! subjects per uid and key lives only while one of them is tracked. Every
//! summary says how long its window ran (`window_ms`). A summary carries
//! its subject's fields, not a process's `peer_exe` and `peer_comm`: those
//! are on the subject's first line.
//!
//! `[daemon] audit = false` ([`Audit::set_handouts_logged`]) writes
//! handouts at debug, uncounted, for hosts too busy for a line per process
//! and token; denials are logged as ever. Reloads ([`reloaded`]) are
//! always logged: only root and tokend's own user can ask for one.
//!
//! [`Audit`] is that state's one owner, shared by every
//! [`crate::service::Service`] so counts survive a reload; its
//! [`Audit::run`] writes the summaries on a timer set for the earliest
//! window end, sleeps without a timer while nothing is pending, and writes
//! everything still pending when told to stop. Deciding whether a caller
//! gets a token is [`crate::service`]'s business, and where lines go is
//! the subscriber [`crate::daemon`] sets up. No token ever reaches this
//! module: a handout carries its fingerprint.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Level;

use crate::cache::GetError;
use crate::peer::Caller;
use crate::scope::ScopeSet;
use crate::secret::Fingerprint;

/// How long repeats of a subject are counted before one line sums them up:
/// a flood costs at most one line per subject per window, and journald's
/// default rate limit (10,000 messages per 30 s per service) is far away.
pub(crate) const WINDOW: Duration = Duration::from_secs(10);

/// The most subjects tracked at once. A subject holds a configured key
/// name, a scope set the key allows and a fingerprint, never a caller's
/// free text: a few hundred bytes (twice, map and queue), so a few MiB at
/// worst. Legitimate traffic (processes × keys × scope sets) is far below.
pub(crate) const MAX_SUBJECTS: usize = 10_000;

/// The most handout subjects of one uid and key tracked, so itemised, at
/// once. A handout's subject holds the caller's pid, so without this a
/// uid that forks a process per get writes a line per process; with it,
/// one uid and key cost at most this many lines per window for their
/// tracked subjects (a first line or a summary each) and one for the rest.
/// 16 leaves a pool of workers, or a few scope sets across a token's
/// refresh, itemised one by one, and keeps a forking uid's lines per key
/// at 51 in 30 s, half a percent of journald's default rate limit.
pub(crate) const ITEMISED_PER_UID_AND_KEY: usize = 16;

/// How many characters of a caller's scope set a `scope_not_allowed` line
/// shows. The set is the caller's text, as long as `max_request_bytes`
/// lets it be (4,000 made-up scopes in 64 KiB); cut here, a denial's line
/// stays a few hundred bytes, while a set of a dozen real scopes still
/// shows whole. `refused_scopes` counts what the cut hides.
pub(crate) const SHOWN_SCOPES: usize = 256;

/// One handout or denial, as [`crate::service`] saw it.
pub(crate) enum Event<'a> {
    HandedOut {
        key: &'a str,
        scopes: &'a ScopeSet,
        /// The RFC 8707 resource asked for. Not part of the subject: the
        /// fingerprint already tells two resources' tokens apart.
        resource: Option<&'a str>,
        /// The token's fingerprint, never the token.
        fingerprint: Fingerprint,
        expires_in: u64,
    },
    /// `shown` is the caller's key name, bounded and without control
    /// characters (a newline could forge a log line).
    NoSuchKey {
        shown: &'a str,
    },
    Forbidden {
        key: &'a str,
    },
    /// Scopes, or a resource, the key does not list. `asked` is the
    /// caller's set, as long as its request line allowed: its line shows
    /// [`SHOWN_SCOPES`] characters of it and `refused`, how many of them
    /// the key does not list (0 when only the resource was refused).
    ScopesNotAllowed {
        key: &'a str,
        asked: &'a ScopeSet,
        refused: usize,
        resource: Option<&'a str>,
    },
    /// The cache had no token to give: unavailable, shutting down, or busy
    /// (the key's `max_scope_sets`).
    NoToken {
        key: &'a str,
        scopes: &'a ScopeSet,
        resource: Option<&'a str>,
        error: &'a GetError,
    },
    /// A reload asked for by a caller other than root and tokend's user.
    ReloadForbidden,
}

/// What repeats of an event are counted under. Its key name is the
/// ledger's one copy of that name ([`Ledger::names`]).
#[derive(Clone, Debug)]
enum Subject {
    HandedOut {
        uid: u32,
        pid: Option<i32>,
        key: Arc<str>,
        scopes: ScopeSet,
        fingerprint: Fingerprint,
    },
    Denied {
        uid: u32,
        denial: Denial,
        /// `None` for [`Denial::NoSuchKey`]: see the module doc.
        key: Option<Arc<str>>,
    },
    /// Handouts of a uid and key while [`ITEMISED_PER_UID_AND_KEY`] of its
    /// handout subjects are tracked: counted together, none itemised.
    Folded { uid: u32, key: Arc<str> },
}

/// A [`Subject`] borrowed from its event: every event is looked up in the
/// ledger this way, so a repeat (most events, in a flood) copies nothing;
/// only the first of a window is made into an owned [`Subject`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum SubjectRef<'a> {
    HandedOut {
        uid: u32,
        pid: Option<i32>,
        key: &'a str,
        scopes: &'a ScopeSet,
        fingerprint: Fingerprint,
    },
    Denied {
        uid: u32,
        denial: Denial,
        key: Option<&'a str>,
    },
    Folded {
        uid: u32,
        key: &'a str,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Denial {
    NoSuchKey,
    Forbidden,
    ScopesNotAllowed,
    Unavailable,
    TooManySets,
    Reload,
}

impl Subject {
    /// The subject of `event`, borrowed from it.
    fn of<'a>(caller: &Caller, event: &Event<'a>) -> SubjectRef<'a> {
        let denied = |denial, key| SubjectRef::Denied {
            uid: caller.uid,
            denial,
            key,
        };
        match *event {
            Event::HandedOut {
                key,
                scopes,
                fingerprint,
                ..
            } => SubjectRef::HandedOut {
                uid: caller.uid,
                pid: caller.pid,
                key,
                scopes,
                fingerprint,
            },
            Event::NoSuchKey { .. } => denied(Denial::NoSuchKey, None),
            Event::Forbidden { key } => denied(Denial::Forbidden, Some(key)),
            Event::ScopesNotAllowed { key, .. } => denied(Denial::ScopesNotAllowed, Some(key)),
            Event::NoToken { key, error, .. } => {
                let denial = match error {
                    GetError::TooManySets { .. } => Denial::TooManySets,
                    GetError::UnknownKey(_) | GetError::Unavailable(_) | GetError::ShuttingDown => {
                        Denial::Unavailable
                    }
                };
                denied(denial, Some(key))
            }
            Event::ReloadForbidden => denied(Denial::Reload, None),
        }
    }

    fn view(&self) -> SubjectRef<'_> {
        match self {
            Subject::HandedOut {
                uid,
                pid,
                key,
                scopes,
                fingerprint,
            } => SubjectRef::HandedOut {
                uid: *uid,
                pid: *pid,
                key,
                scopes,
                fingerprint: *fingerprint,
            },
            Subject::Denied { uid, denial, key } => SubjectRef::Denied {
                uid: *uid,
                denial: *denial,
                key: key.as_deref(),
            },
            Subject::Folded { uid, key } => SubjectRef::Folded { uid: *uid, key },
        }
    }
}

impl<'a> SubjectRef<'a> {
    /// The owned subject, its key name taken from `names` (or added).
    fn to_owned(self, names: &mut HashSet<Arc<str>>) -> Subject {
        let mut name = |key: &str| match names.get(key) {
            Some(name) => name.clone(),
            None => {
                let name: Arc<str> = Arc::from(key);
                names.insert(name.clone());
                name
            }
        };
        match self {
            SubjectRef::HandedOut {
                uid,
                pid,
                key,
                scopes,
                fingerprint,
            } => Subject::HandedOut {
                uid,
                pid,
                key: name(key),
                scopes: scopes.clone(),
                fingerprint,
            },
            SubjectRef::Denied { uid, denial, key } => Subject::Denied {
                uid,
                denial,
                key: key.map(name),
            },
            SubjectRef::Folded { uid, key } => Subject::Folded {
                uid,
                key: name(key),
            },
        }
    }

    /// The uid and key whose itemised handouts this subject counts against
    /// [`ITEMISED_PER_UID_AND_KEY`]. Denials have none: their subjects are
    /// already one per uid, kind and key.
    fn itemised_as(self) -> Option<(u32, &'a str)> {
        match self {
            SubjectRef::HandedOut { uid, key, .. } => Some((uid, key)),
            SubjectRef::Denied { .. } | SubjectRef::Folded { .. } => None,
        }
    }
}

/// Either form of a subject, so the ledger's map (of owned subjects) can
/// be searched with a borrowed one. Hash and equality are the borrowed
/// form's for both, which is what `Borrow` asks.
trait AsSubject {
    fn subject(&self) -> SubjectRef<'_>;
}

impl AsSubject for Subject {
    fn subject(&self) -> SubjectRef<'_> {
        self.view()
    }
}

impl AsSubject for SubjectRef<'_> {
    fn subject(&self) -> SubjectRef<'_> {
        *self
    }
}

impl<'a> std::borrow::Borrow<dyn AsSubject + 'a> for Arc<Subject> {
    fn borrow(&self) -> &(dyn AsSubject + 'a) {
        &**self
    }
}

impl Hash for dyn AsSubject + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.subject().hash(state);
    }
}

impl PartialEq for dyn AsSubject + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.subject() == other.subject()
    }
}

impl Eq for dyn AsSubject + '_ {}

impl Hash for Subject {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.view().hash(state);
    }
}

impl PartialEq for Subject {
    fn eq(&self, other: &Self) -> bool {
        self.view() == other.view()
    }
}

impl Eq for Subject {}

/// How an event stands in its subject's window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Seen {
    /// The first: logged in full, at once.
    First,
    /// Counted for the window's summary.
    Repeat,
    /// A new handout subject of a uid and key that has
    /// [`ITEMISED_PER_UID_AND_KEY`] tracked: counted with the others
    /// folded, not itemised. `first` when it opened their window.
    Folded { first: bool },
    /// Past [`MAX_SUBJECTS`]: counted, not itemised. `first` when it opened
    /// the window of such events.
    Untracked { first: bool },
}

/// A line owed when a window ends. `window` is how long that window ran:
/// its length, a little more when the timer fired late, less when tokend
/// stopped before it ended.
#[derive(Debug, PartialEq, Eq)]
enum Summary {
    /// The events of a subject's window not itemised: the repeats after
    /// its first, or all of a [`Subject::Folded`]'s.
    Repeats {
        subject: Arc<Subject>,
        repeats: u64,
        window: Duration,
    },
    /// Events past the cap, all of them.
    Untracked { events: u64, window: Duration },
}

/// The bounds of a [`Ledger`]: [`WINDOW`], [`MAX_SUBJECTS`] and
/// [`ITEMISED_PER_UID_AND_KEY`] in the daemon, smaller in tests.
#[derive(Clone, Copy, Debug)]
struct Limits {
    window: Duration,
    /// Subjects tracked at once.
    cap: usize,
    /// Handout subjects of one uid and key tracked at once.
    per_uid_and_key: usize,
}

/// The counting, without locks, timers or logging: [`Audit`] gives it the
/// time, so it is tested with plain instants.
struct Ledger {
    limits: Limits,
    /// Each tracked subject and its count in its current window: repeats
    /// after the first for an itemised subject, every event for a folded
    /// one. The map and the queue share one copy of each subject: at
    /// 10,000 subjects a copy each was half a MiB more.
    counts: HashMap<Arc<Subject>, u64>,
    /// Each tracked subject once, by the end of its current window. Every
    /// window is `window` long and opens at the instant it is recorded
    /// (read under [`Audit`]'s lock, so instants arrive in order): appending
    /// keeps the queue sorted, and the earliest end is at the front.
    ends: VecDeque<(Instant, Arc<Subject>)>,
    /// The key names of the subjects, each held once rather than once per
    /// subject (10,000 handouts of one key held 10,000 copies of its
    /// name). Only configured names reach a subject (a key that does not
    /// exist is not one), and the set is emptied whenever no subject is
    /// tracked.
    names: HashSet<Arc<str>>,
    /// How many handout subjects each uid has tracked of each key. An
    /// entry lives only while that number is above zero, so there are
    /// never more entries than tracked subjects, whatever keys, scope sets
    /// or processes a caller cycles through.
    itemised: HashMap<u32, HashMap<Arc<str>, usize>>,
    /// Events past `cap`: when their window ends, and how many.
    untracked: Option<(Instant, u64)>,
}

impl Ledger {
    fn new(limits: Limits) -> Ledger {
        Ledger {
            limits,
            counts: HashMap::new(),
            ends: VecDeque::new(),
            names: HashSet::new(),
            itemised: HashMap::new(),
            untracked: None,
        }
    }

    fn record(&mut self, subject: SubjectRef<'_>, now: Instant) -> Seen {
        if let Some(repeats) = self.counts.get_mut(&subject as &dyn AsSubject) {
            *repeats += 1;
            return Seen::Repeat;
        }
        if let Some((uid, key)) = subject.itemised_as() {
            if self.itemised_of(uid, key) >= self.limits.per_uid_and_key {
                return self.fold(uid, key, now);
            }
        }
        if self.counts.len() >= self.limits.cap {
            return self.untrack(now);
        }
        self.open(subject, 0, now);
        Seen::First
    }

    /// Counts a handout of a uid and key that has its fill of itemised
    /// subjects under their [`Subject::Folded`], opening its window if
    /// none is open. It is a subject like any other: summed up when its
    /// window ends, followed by another while events keep coming.
    fn fold(&mut self, uid: u32, key: &str, now: Instant) -> Seen {
        let folded = SubjectRef::Folded { uid, key };
        if let Some(events) = self.counts.get_mut(&folded as &dyn AsSubject) {
            *events += 1;
            return Seen::Folded { first: false };
        }
        if self.counts.len() >= self.limits.cap {
            return self.untrack(now);
        }
        self.open(folded, 1, now);
        Seen::Folded { first: true }
    }

    fn untrack(&mut self, now: Instant) -> Seen {
        match &mut self.untracked {
            Some((_, events)) => {
                *events += 1;
                Seen::Untracked { first: false }
            }
            None => {
                self.untracked = Some((now + self.limits.window, 1));
                Seen::Untracked { first: true }
            }
        }
    }

    /// Starts tracking `subject` with `count` events in its window.
    fn open(&mut self, subject: SubjectRef<'_>, count: u64, now: Instant) {
        let subject = Arc::new(subject.to_owned(&mut self.names));
        if let Subject::HandedOut { uid, key, .. } = &*subject {
            let keys = self.itemised.entry(*uid).or_default();
            *keys.entry(key.clone()).or_default() += 1;
        }
        self.ends
            .push_back((now + self.limits.window, subject.clone()));
        self.counts.insert(subject, count);
    }

    fn itemised_of(&self, uid: u32, key: &str) -> usize {
        let keys = self.itemised.get(&uid);
        keys.and_then(|keys| keys.get(key)).copied().unwrap_or(0)
    }

    /// Stops tracking `subject`: its next event is a first again, and its
    /// uid and key have room for one more itemised subject.
    fn forget(&mut self, subject: &Arc<Subject>) {
        self.counts.remove(subject);
        let Subject::HandedOut { uid, key, .. } = &**subject else {
            return;
        };
        let Some(keys) = self.itemised.get_mut(uid) else {
            return;
        };
        if let Some(tracked) = keys.get_mut(key) {
            *tracked = tracked.saturating_sub(1);
            if *tracked == 0 {
                keys.remove(key);
            }
        }
        if keys.is_empty() {
            self.itemised.remove(uid);
        }
    }

    /// When the earliest open window ends; `None` when nothing is pending.
    fn next_end(&self) -> Option<Instant> {
        let tracked = self.ends.front().map(|(end, _)| *end);
        let untracked = self.untracked.map(|(end, _)| end);
        match (tracked, untracked) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// How long the window ending at `end` has run by `now`.
    fn ran(&self, end: Instant, now: Instant) -> Duration {
        // `end` is an instant `window` after one the ledger was given.
        now.saturating_duration_since(end - self.limits.window)
    }

    /// The summaries of the windows ended by `now`. A window with repeats
    /// is followed by another from `now`; one without forgets its subject.
    fn due(&mut self, now: Instant) -> Vec<Summary> {
        let mut due = Vec::new();
        while self.ends.front().is_some_and(|(end, _)| *end <= now) {
            let Some((end, subject)) = self.ends.pop_front() else {
                break;
            };
            match self.counts.get_mut(&subject) {
                Some(count) if *count > 0 => {
                    due.push(Summary::Repeats {
                        subject: subject.clone(),
                        repeats: std::mem::take(count),
                        window: self.ran(end, now),
                    });
                    // Later than every end in the queue, which all opened
                    // by `now`: the queue stays sorted, and this loop ends.
                    self.ends.push_back((now + self.limits.window, subject));
                }
                _ => self.forget(&subject),
            }
        }
        if self.counts.is_empty() {
            self.names.clear();
        }
        if let Some((end, events)) = self.untracked {
            if end <= now {
                due.push(Summary::Untracked {
                    events,
                    window: self.ran(end, now),
                });
                self.untracked = None;
            }
        }
        due
    }

    /// Every summary still owed at `now`, windows ended or not; forgets
    /// everything.
    fn drain(&mut self, now: Instant) -> Vec<Summary> {
        let ends = std::mem::take(&mut self.ends);
        let mut all: Vec<Summary> = ends
            .into_iter()
            .filter_map(|(end, subject)| {
                let count = self.counts.remove(&subject)?;
                (count > 0).then(|| Summary::Repeats {
                    subject,
                    repeats: count,
                    window: self.ran(end, now),
                })
            })
            .collect();
        self.itemised.clear();
        self.names.clear();
        if let Some((end, events)) = self.untracked.take() {
            all.push(Summary::Untracked {
                events,
                window: self.ran(end, now),
            });
        }
        all
    }
}

/// The audit log's one owner: what was seen in the current windows, and
/// the wake-up of the task that writes their summaries.
pub(crate) struct Audit {
    /// Held only to count, never while logging or awaiting.
    ledger: Mutex<Ledger>,
    /// Wakes [`Audit::run`] when a window opens while none was open: it
    /// has no timer to wait on then.
    opened: Notify,
    /// `[daemon] audit`: whether handouts are counted and logged at info.
    /// A reload sets it; requests read it without a lock.
    handouts_logged: AtomicBool,
}

impl Default for Audit {
    fn default() -> Self {
        Audit::new()
    }
}

impl Audit {
    pub(crate) fn new() -> Audit {
        Audit::with_limits(Limits {
            window: WINDOW,
            cap: MAX_SUBJECTS,
            per_uid_and_key: ITEMISED_PER_UID_AND_KEY,
        })
    }

    fn with_limits(limits: Limits) -> Audit {
        Audit {
            ledger: Mutex::new(Ledger::new(limits)),
            opened: Notify::new(),
            handouts_logged: AtomicBool::new(true),
        }
    }

    /// Applies `[daemon] audit`, at start and on every reload. Handouts
    /// already counted are still summed up when their window ends.
    pub(crate) fn set_handouts_logged(&self, logged: bool) {
        // Relaxed: no other memory is published with it; a request that
        // races a reload may go either way, as it may with any setting.
        self.handouts_logged.store(logged, Ordering::Relaxed);
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        // Nothing in the ledger can panic short of allocation failing; if a
        // holder did, the worst left is one subject counted but never
        // summed up, which beats failing every later request.
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts `event` of `caller` and logs it: at info if it is its
    /// subject's first in the window, else at debug. With `audit = false`
    /// a handout is logged at debug and not counted: on a host that busy,
    /// the lock and the map are worth saving too.
    pub(crate) fn record(&self, caller: &Caller, event: Event<'_>) {
        if matches!(event, Event::HandedOut { .. }) && !self.handouts_logged.load(Ordering::Relaxed)
        {
            log_event(caller, &event, Level::DEBUG);
            return;
        }
        let subject = Subject::of(caller, &event);
        let (seen, was_idle, limits) = {
            let mut ledger = self.ledger();
            let was_idle = ledger.next_end().is_none();
            // Read under the lock, so instants reach the ledger in order.
            let seen = ledger.record(subject, Instant::now());
            (seen, was_idle, ledger.limits)
        };
        if was_idle {
            self.opened.notify_one();
        }
        let level = if seen == Seen::First {
            Level::INFO
        } else {
            Level::DEBUG
        };
        log_event(caller, &event, level);
        match (seen, subject.itemised_as()) {
            (Seen::Untracked { first: true }, _) => tracing::warn!(
                "the audit log already tracks {} callers and keys in this window; \
                 events of others are counted, not itemised, until it ends",
                thousands(limits.cap as u64)
            ),
            (Seen::Folded { first: true }, Some((uid, key))) => tracing::info!(
                key = %key,
                peer_uid = uid,
                "handouts of key {key} to uid {uid} are counted, not itemised, until the \
                 window ends: {} processes, scope sets and tokens of theirs are itemised \
                 already",
                limits.per_uid_and_key
            ),
            _ => {}
        }
    }

    /// Writes each window's summary when it ends, until `stop`; then
    /// everything still pending, so no count is lost at shutdown.
    pub(crate) async fn run(self: Arc<Self>, stop: CancellationToken) {
        loop {
            let (due, next, limits) = {
                let mut ledger = self.ledger();
                let due = ledger.due(Instant::now());
                (due, ledger.next_end(), ledger.limits)
            };
            for summary in &due {
                log_summary(summary, limits);
            }
            // One timer, for the earliest end; none at all while nothing
            // is pending, so an idle daemon spends no CPU here.
            let wait = async {
                match next {
                    Some(end) => tokio::time::sleep_until(end).await,
                    None => self.opened.notified().await,
                }
            };
            tokio::select! {
                () = wait => {}
                () = stop.cancelled() => break,
            }
        }
        self.flush();
    }

    /// Writes every summary still owed now, windows ended or not.
    pub(crate) fn flush(&self) {
        let (all, limits) = {
            let mut ledger = self.ledger();
            (ledger.drain(Instant::now()), ledger.limits)
        };
        for summary in &all {
            log_summary(summary, limits);
        }
    }
}

/// The line of one event at `level` (info or debug): the fields it always
/// had, then `peer_gid`, `peer_exe` and `peer_comm`.
fn log_event(caller: &Caller, event: &Event<'_>, level: Level) {
    // Asked first so that /proc is read only for a line that is written:
    // counted repeats, at the default level, cost no reads.
    let enabled = if level == Level::INFO {
        tracing::enabled!(Level::INFO)
    } else {
        tracing::enabled!(Level::DEBUG)
    };
    if !enabled {
        return;
    }
    let process = caller.process();
    // The level is part of a tracing call site, so each line is written
    // out once per level. The process's fields are `&str`, not `%`: the
    // text log quotes them (a path may hold spaces or `key=`), the journal
    // takes them as they are.
    macro_rules! at_level {
        // Fields after `then` follow the process's: fields added later go
        // last, so a line's earlier text reads as it always did.
        ([$($field:tt)+] then [$($after:tt)*] $($message:tt)+) => {
            if level == Level::INFO {
                tracing::info!(
                    $($field)+
                    peer_gid = caller.gid,
                    peer_exe = process.exe.as_str(),
                    peer_comm = process.comm.as_str(),
                    $($after)*
                    $($message)+
                )
            } else {
                tracing::debug!(
                    $($field)+
                    peer_gid = caller.gid,
                    peer_exe = process.exe.as_str(),
                    peer_comm = process.comm.as_str(),
                    $($after)*
                    $($message)+
                )
            }
        };
        ([$($field:tt)+] $($message:tt)+) => {
            at_level!([$($field)+] then [] $($message)+)
        };
    }
    let (uid, pid) = (caller.uid, caller.pid);
    match event {
        Event::HandedOut {
            key,
            scopes,
            resource,
            fingerprint,
            expires_in,
        } => at_level!([
            key = %key,
            scopes = %scopes,
            resource = *resource,
            peer_uid = uid,
            peer_pid = pid,
            expires_in = *expires_in,
            fingerprint = %fingerprint,
        ] "handed out a token"),
        Event::NoSuchKey { shown } => at_level!([
            key = %shown,
            peer_uid = uid,
            peer_pid = pid,
        ] "denied: no such key"),
        Event::Forbidden { key } => at_level!([
            key = %key,
            peer_uid = uid,
            peer_pid = pid,
        ] "denied: caller is not on the key's allow lists"),
        Event::ScopesNotAllowed {
            key,
            asked,
            refused,
            resource,
        } => at_level!([
            key = %key,
            scopes = %CallerScopes(asked),
            resource = *resource,
            peer_uid = uid,
            peer_pid = pid,
        ] then [
            refused_scopes = *refused,
        ] "denied: scopes not allowed"),
        Event::NoToken {
            key,
            scopes,
            resource,
            error,
        } => at_level!([
            key = %key,
            scopes = %scopes,
            resource = *resource,
            peer_uid = uid,
            peer_pid = pid,
        ] "no token to hand out: {error}"),
        Event::ReloadForbidden => at_level!([
            peer_uid = uid,
            peer_pid = pid,
        ] "denied: reload (only root and tokend's own user may ask)"),
    }
}

/// A caller's scope set as a denial's line shows it: `[admin gateway]`,
/// cut after [`SHOWN_SCOPES`] characters with `…`, each character a
/// terminal would act on as `?` (RFC 6749 keeps those out of a scope
/// already; the rule holds here too, whatever let a set in).
struct CallerScopes<'a>(&'a ScopeSet);

impl std::fmt::Display for CallerScopes<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = crate::printable::shown(self.0.joined(), SHOWN_SCOPES);
        write!(f, "[{shown}]")
    }
}

/// Who asked for a reload.
pub(crate) enum ReloadAsker<'a> {
    /// SIGHUP: the kernel does not say who sent it.
    Signal,
    /// The `reload` op, by this caller.
    Socket(&'a Caller),
}

/// How a reload ended.
pub(crate) enum ReloadOutcome {
    /// The new configuration is in force, with this many keys.
    Reloaded(usize),
    /// Refused; the previous configuration stays (the reason is on the
    /// line before, at error).
    Failed,
    /// Asked while shutting down: not run.
    NotRun,
}

/// The audit line of a reload: who asked, and how it ended. Not counted:
/// only root and tokend's own user may ask, so there is no flood to bound.
/// The outcome is a field only: the message does not say "reloaded",
/// which the lines about the reload itself say.
pub(crate) fn reloaded(asked_by: ReloadAsker<'_>, outcome: ReloadOutcome) {
    let (outcome, keys) = match outcome {
        ReloadOutcome::Reloaded(keys) => ("reloaded", Some(keys)),
        ReloadOutcome::Failed => ("failed", None),
        ReloadOutcome::NotRun => ("not_run", None),
    };
    match asked_by {
        ReloadAsker::Signal => {
            tracing::info!(asked_by = "signal", outcome, keys, "reload asked by SIGHUP")
        }
        ReloadAsker::Socket(caller) => {
            let process = caller.process();
            tracing::info!(
                asked_by = "socket",
                outcome,
                keys,
                peer_uid = caller.uid,
                peer_pid = caller.pid,
                peer_gid = caller.gid,
                peer_exe = process.exe.as_str(),
                peer_comm = process.comm.as_str(),
                "reload asked over the socket"
            );
        }
    }
}

/// The line that sums up a window, with its subject's fields, `repeats`
/// (the events it sums up) and `window_ms` (how long the window ran).
fn log_summary(summary: &Summary, limits: Limits) {
    let (subject, repeats, window) = match summary {
        Summary::Repeats {
            subject,
            repeats,
            window,
        } => (subject, *repeats, millis(*window)),
        Summary::Untracked { events, window } => {
            tracing::info!(
                repeats = *events,
                window_ms = millis(*window),
                "… and {} more {} not itemised (the audit log tracks at most {} callers and keys \
                 per window)",
                thousands(*events),
                plural(*events, "event"),
                thousands(limits.cap as u64)
            );
            return;
        }
    };
    let n = thousands(repeats);
    match &**subject {
        Subject::HandedOut {
            uid,
            pid,
            key,
            scopes,
            fingerprint,
        } => tracing::info!(
            key = %key,
            scopes = %scopes,
            peer_uid = *uid,
            peer_pid = *pid,
            fingerprint = %fingerprint,
            repeats,
            window_ms = window,
            "… and {n} more {} of key {key} to uid {uid}",
            plural(repeats, "handout")
        ),
        Subject::Denied {
            uid,
            key: Some(key),
            denial,
        } => tracing::info!(
            key = %key,
            peer_uid = *uid,
            repeats,
            window_ms = window,
            "… and {n} more {} of key {key} to uid {uid}: {}",
            plural(repeats, "denial"),
            denial.reason()
        ),
        Subject::Denied {
            uid,
            key: None,
            denial: Denial::Reload,
        } => tracing::info!(
            peer_uid = *uid,
            repeats,
            window_ms = window,
            "… and {n} more {} of a reload to uid {uid}",
            plural(repeats, "denial")
        ),
        Subject::Denied { uid, key: None, .. } => tracing::info!(
            peer_uid = *uid,
            repeats,
            window_ms = window,
            "… and {n} more {} of keys that do not exist to uid {uid}",
            plural(repeats, "denial")
        ),
        Subject::Folded { uid, key } => tracing::info!(
            key = %key,
            peer_uid = *uid,
            repeats,
            window_ms = window,
            "… and {n} more {} of key {key} to uid {uid} not itemised (the audit log itemises \
             {} processes, scope sets and tokens of a uid and key at a time)",
            plural(repeats, "handout"),
            limits.per_uid_and_key
        ),
    }
}

/// A window's length in whole milliseconds, for its `window_ms` field.
fn millis(window: Duration) -> u64 {
    u64::try_from(window.as_millis()).unwrap_or(u64::MAX)
}

impl Denial {
    fn reason(self) -> &'static str {
        match self {
            Denial::NoSuchKey => "no such key",
            Denial::Forbidden => "caller is not on the key's allow lists",
            Denial::ScopesNotAllowed => "scopes not allowed",
            Denial::Unavailable => "no token to hand out",
            Denial::TooManySets => "busy: the key's max_scope_sets is reached",
            Denial::Reload => "only root and tokend's own user may reload",
        }
    }
}

/// `word`, with an `s` unless there is one.
fn plural(n: u64, word: &str) -> String {
    if n == 1 {
        word.to_owned()
    } else {
        format!("{word}s")
    }
}

/// `19999` as `19,999`: summaries are read by people.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, digit) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(digit);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(uid: u32, pid: i32) -> Caller {
        Caller {
            uid,
            gid: uid,
            pid: Some(pid),
            gids: vec![uid],
            user: None,
            groups: Vec::new(),
            named: false,
            process: std::sync::OnceLock::new(),
        }
    }

    fn limits(cap: usize, per_uid_and_key: usize) -> Limits {
        Limits {
            window: WINDOW,
            cap,
            per_uid_and_key,
        }
    }

    fn handout<'a>(key: &'a str, scopes: &'a ScopeSet) -> Event<'a> {
        Event::HandedOut {
            key,
            scopes,
            resource: None,
            fingerprint: Fingerprint::from_hex(*b"abcd1234"),
            expires_in: 3600,
        }
    }

    /// What is logged at info and above on this thread, as text lines.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Captured {
        /// Starts capturing; stops when the guard is dropped.
        fn start() -> (Captured, tracing::subscriber::DefaultGuard) {
            let captured = Captured::default();
            let writer = captured.clone();
            let subscriber = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::INFO)
                .with_ansi(false)
                .without_time()
                .with_writer(move || writer.clone())
                .finish();
            (captured, tracing::subscriber::set_default(subscriber))
        }

        fn lines(&self) -> Vec<String> {
            String::from_utf8(self.0.lock().unwrap().clone())
                .unwrap()
                .lines()
                .map(str::to_owned)
                .collect()
        }

        /// Lines logged since the last call.
        fn take(&self) -> Vec<String> {
            let lines = self.lines();
            self.0.lock().unwrap().clear();
            lines
        }
    }

    #[test]
    fn a_denial_shows_a_callers_scopes_bounded_and_printable() {
        let (log, _capturing) = Captured::start();
        let audit = Audit::new();
        let deny = |asked: &ScopeSet, refused| {
            let event = Event::ScopesNotAllowed {
                key: "k",
                asked,
                refused,
                resource: None,
            };
            audit.record(&caller(1000, 1), event);
            let lines = log.take();
            assert_eq!(lines.len(), 1, "{lines:#?}");
            lines[0].clone()
        };
        let few = ScopeSet::new(["gateway", "admin"]).unwrap();
        let line = deny(&few, 1);
        assert!(
            line.contains("denied: scopes not allowed key=k scopes=[admin gateway] peer_uid=1000"),
            "{line}"
        );
        assert!(line.ends_with(" refused_scopes=1"), "{line}");
        // A request could not carry these control characters (RFC 6749),
        // but the rule holds whatever let them into a set.
        let mut made_up: Vec<String> = (0..4_000).map(|i| format!("made-up-{i:05}")).collect();
        made_up.push("\u{1b}[2J\u{202e}forged".to_owned());
        let many = ScopeSet::from_granted(&made_up.join(" "));
        // Another uid: a first, so at info.
        let event = Event::ScopesNotAllowed {
            key: "k",
            asked: &many,
            refused: 4_001,
            resource: None,
        };
        audit.record(&caller(1001, 1), event);
        let lines = log.take();
        assert_eq!(lines.len(), 1, "{lines:#?}");
        let line = &lines[0];
        assert!(line.len() < 1024, "a {}-byte line", line.len());
        assert!(
            line.contains("scopes=[?[2J?forged made-up-00000 made-up-00001 "),
            "{line}"
        );
        assert!(line.contains("…] peer_uid=1001 "), "{line}");
        assert!(line.ends_with(" refused_scopes=4001"), "{line}");
        assert!(!line.chars().any(crate::printable::is_unsafe), "{line:?}");
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(19_999), "19,999");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn subjects_are_per_process_token_and_set_for_handouts_and_per_uid_for_unknown_names() {
        let scopes = ScopeSet::default();
        let other = ScopeSet::new(["fx"]).unwrap();
        let mut ledger = Ledger::new(limits(100, ITEMISED_PER_UID_AND_KEY));
        let now = Instant::now();
        let mut seen = |c: &Caller, e: Event<'_>| ledger.record(Subject::of(c, &e), now);
        assert_eq!(seen(&caller(1, 10), handout("k", &scopes)), Seen::First);
        assert_eq!(seen(&caller(1, 10), handout("k", &scopes)), Seen::Repeat);
        // Another process of the same uid, another set, another key.
        assert_eq!(seen(&caller(1, 11), handout("k", &scopes)), Seen::First);
        assert_eq!(seen(&caller(1, 10), handout("k", &other)), Seen::First);
        assert_eq!(seen(&caller(1, 10), handout("j", &scopes)), Seen::First);
        // Unknown names: one subject per uid, whatever the name or pid.
        assert_eq!(
            seen(&caller(1, 10), Event::NoSuchKey { shown: "a" }),
            Seen::First
        );
        assert_eq!(
            seen(&caller(1, 12), Event::NoSuchKey { shown: "b" }),
            Seen::Repeat
        );
        assert_eq!(
            seen(&caller(2, 20), Event::NoSuchKey { shown: "b" }),
            Seen::First
        );
        // Denials: per uid, kind and key, any pid.
        assert_eq!(
            seen(&caller(1, 10), Event::Forbidden { key: "k" }),
            Seen::First
        );
        assert_eq!(
            seen(&caller(1, 13), Event::Forbidden { key: "k" }),
            Seen::Repeat
        );
        assert_eq!(
            seen(&caller(1, 10), Event::Forbidden { key: "j" }),
            Seen::First
        );
        let unavailable = GetError::ShuttingDown;
        let busy = GetError::TooManySets {
            key: "k".into(),
            limit: 1,
        };
        let no_token = |error| Event::NoToken {
            key: "k",
            scopes: &other,
            resource: None,
            error,
        };
        assert_eq!(seen(&caller(1, 10), no_token(&unavailable)), Seen::First);
        assert_eq!(seen(&caller(1, 10), no_token(&busy)), Seen::First);
        assert_eq!(seen(&caller(1, 11), no_token(&busy)), Seen::Repeat);
    }

    #[test]
    fn subjects_share_their_key_name_until_none_is_tracked() {
        let (a, b) = (ScopeSet::default(), ScopeSet::new(["fx"]).unwrap());
        let start = Instant::now();
        let mut ledger = Ledger::new(limits(10, ITEMISED_PER_UID_AND_KEY));
        for (pid, scopes) in [(1, &a), (2, &a), (2, &b)] {
            let event = handout("payments", scopes);
            assert_eq!(
                ledger.record(Subject::of(&caller(1, pid), &event), start),
                Seen::First
            );
        }
        let forbidden = Event::Forbidden { key: "payments" };
        ledger.record(Subject::of(&caller(1, 1), &forbidden), start);
        assert_eq!(ledger.names.len(), 1);
        let name = ledger.names.iter().next().unwrap();
        assert_eq!(&**name, "payments");
        // The set's copy, one per subject, and uid 1's count of the
        // handout subjects it has of the key.
        assert_eq!(Arc::strong_count(name), 6);
        assert!(ledger.due(start + WINDOW).is_empty());
        assert!(ledger.counts.is_empty());
        assert!(ledger.names.is_empty(), "forgotten with the last subject");
    }

    #[test]
    fn past_the_cap_events_are_counted_not_tracked() {
        let scopes = ScopeSet::default();
        let start = Instant::now();
        let mut ledger = Ledger::new(limits(2, ITEMISED_PER_UID_AND_KEY));
        let mut record =
            |pid, at| ledger.record(Subject::of(&caller(1, pid), &handout("k", &scopes)), at);
        assert_eq!(record(1, start), Seen::First);
        assert_eq!(record(2, start), Seen::First);
        assert_eq!(record(3, start), Seen::Untracked { first: true });
        assert_eq!(record(4, start), Seen::Untracked { first: false });
        // Tracked subjects still count their repeats.
        assert_eq!(record(1, start), Seen::Repeat);
        assert_eq!(ledger.counts.len(), 2);
        assert_eq!(ledger.ends.len(), 2);
        let due = ledger.due(start + WINDOW);
        assert_eq!(due.len(), 2, "{due:?}");
        assert!(
            matches!(due[0], Summary::Repeats { repeats: 1, .. }),
            "{due:?}"
        );
        assert_eq!(
            due[1],
            Summary::Untracked {
                events: 2,
                window: WINDOW
            }
        );
        // pid 2's quiet window forgot it; pid 1's flood keeps its place.
        assert_eq!(ledger.counts.len(), 1);
        assert_eq!(ledger.next_end(), Some(start + WINDOW * 2));
        assert_eq!(ledger.due(start + WINDOW * 2), []);
        assert_eq!(ledger.next_end(), None, "nothing pending");
        assert!(ledger.counts.is_empty() && ledger.ends.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_flood_is_one_line_at_once_then_one_summary_per_window() {
        let (log, _capturing) = Captured::start();
        let audit = Arc::new(Audit::new());
        let stop = CancellationToken::new();
        let flusher = tokio::spawn(audit.clone().run(stop.clone()));
        let (alice, bob) = (caller(1000, 42), caller(1001, 43));
        let scopes = ScopeSet::new(["gateway"]).unwrap();

        for i in 0..20_000 {
            audit.record(&alice, handout("payments", &scopes));
            let name = format!("random-{i}");
            audit.record(&alice, Event::NoSuchKey { shown: &name });
        }
        let first = log.take();
        assert_eq!(first.len(), 2, "{first:#?}");
        assert!(first[0].contains("handed out a token key=payments scopes=[gateway] peer_uid=1000 peer_pid=42 expires_in=3600 fingerprint=abcd1234"), "{first:#?}");
        assert!(
            first[1].contains("denied: no such key key=random-0 peer_uid=1000"),
            "{first:#?}"
        );
        // Mid-flood, another caller's denial is logged at once.
        tokio::time::sleep(Duration::from_secs(3)).await;
        audit.record(&bob, Event::Forbidden { key: "payments" });
        let bobs = log.take();
        assert_eq!(bobs.len(), 1, "{bobs:#?}");
        assert!(bobs[0].contains("peer_uid=1001"), "{bobs:#?}");

        // Nothing before the window ends, both sums when it does.
        tokio::time::sleep(WINDOW - Duration::from_secs(3) - Duration::from_millis(1)).await;
        assert_eq!(log.take(), Vec::<String>::new());
        tokio::time::sleep(Duration::from_millis(2)).await;
        let sums = log.take();
        assert_eq!(sums.len(), 2, "{sums:#?}");
        assert!(sums[0].contains("… and 19,999 more handouts of key payments to uid 1000 key=payments scopes=[gateway] peer_uid=1000 peer_pid=42 fingerprint=abcd1234 repeats=19999"), "{sums:#?}");
        assert!(
            sums[1].contains(
                "… and 19,999 more denials of keys that do not exist to uid 1000 peer_uid=1000 repeats=19999"
            ),
            "{sums:#?}"
        );

        // The flood goes on: the next window sums it up, no line at once.
        for _ in 0..10 {
            audit.record(&alice, handout("payments", &scopes));
        }
        assert_eq!(log.take(), Vec::<String>::new());
        // Bob's window (no repeats) ends quietly three seconds in.
        tokio::time::sleep(WINDOW + Duration::from_millis(1)).await;
        let sums = log.take();
        assert_eq!(sums.len(), 1, "{sums:#?}");
        assert!(
            sums[0].contains("… and 10 more handouts of key payments to uid 1000"),
            "{sums:#?}"
        );
        // A quiet window forgets a subject: its next event is a first again.
        tokio::time::sleep(WINDOW).await;
        assert!(forgot_everything(&audit), "everything was forgotten");
        audit.record(&alice, handout("payments", &scopes));
        let again = log.take();
        assert_eq!(again.len(), 1, "{again:#?}");
        assert!(again[0].contains("handed out a token"), "{again:#?}");

        // At shutdown, what is pending is written before its window ends.
        audit.record(&alice, handout("payments", &scopes));
        audit.record(&bob, Event::Forbidden { key: "payments" });
        audit.record(&bob, Event::Forbidden { key: "payments" });
        let stopped_at = Instant::now();
        stop.cancel();
        flusher.await.unwrap();
        assert_eq!(stopped_at, Instant::now(), "stopping waits for no window");
        let last = log.take();
        assert_eq!(last.len(), 3, "{last:#?}");
        assert!(
            last[0].contains(
                "denied: caller is not on the key's allow lists key=payments peer_uid=1001"
            ),
            "{last:#?}"
        );
        assert!(
            last[1].contains("… and 1 more handout of key payments to uid 1000"),
            "{last:#?}"
        );
        assert!(last[2].contains("… and 1 more denial of key payments to uid 1001: caller is not on the key's allow lists key=payments peer_uid=1001 repeats=1"), "{last:#?}");
    }

    /// True when the audit tracks nothing and owes nothing.
    fn forgot_everything(audit: &Audit) -> bool {
        let ledger = audit.ledger();
        ledger.counts.is_empty() && ledger.ends.is_empty() && ledger.untracked.is_none()
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_cap_new_subjects_are_summed_up_not_itemised() {
        let (log, _capturing) = Captured::start();
        let audit = Arc::new(Audit::with_limits(limits(3, ITEMISED_PER_UID_AND_KEY)));
        let stop = CancellationToken::new();
        let flusher = tokio::spawn(audit.clone().run(stop.clone()));
        let scopes = ScopeSet::default();
        for pid in 0..1000 {
            audit.record(&caller(1000, pid), handout("k", &scopes));
        }
        let lines = log.take();
        assert_eq!(lines.len(), 4, "{lines:#?}");
        assert!(lines[..3].iter().all(|l| l.contains("handed out a token")));
        assert!(
            lines[3].contains("WARN") && lines[3].contains("counted, not itemised"),
            "{lines:#?}"
        );
        tokio::time::sleep(WINDOW + Duration::from_millis(1)).await;
        let sums = log.take();
        assert_eq!(sums.len(), 1, "{sums:#?}");
        assert!(sums[0].contains("… and 997 more events not itemised (the audit log tracks at most 3 callers and keys per window) repeats=997"), "{sums:#?}");
        // Room again: a new subject is logged at once.
        audit.record(&caller(1000, 5000), handout("k", &scopes));
        assert_eq!(log.take().len(), 1);
        stop.cancel();
        flusher.await.unwrap();
    }

    #[test]
    fn lines_carry_the_process_read_only_for_a_line_that_is_written() {
        let (log, _capturing) = Captured::start();
        let audit = Audit::new();
        let scopes = ScopeSet::default();
        let me = std::process::id() as i32;
        let first = caller(0, me);
        audit.record(&first, handout("k", &scopes));
        let exe = std::env::current_exe().unwrap();
        let lines = log.take();
        assert_eq!(lines.len(), 1, "{lines:#?}");
        let fields = format!(
            "fingerprint=abcd1234 peer_gid=0 peer_exe={:?} peer_comm={:?}",
            exe.to_string_lossy(),
            first.process().comm
        );
        assert!(lines[0].ends_with(&fields), "{lines:#?}\n{fields}");
        // The same process on another connection: a repeat, at debug,
        // which is not written, so /proc is not read for it.
        let again = caller(0, me);
        audit.record(&again, handout("k", &scopes));
        assert_eq!(log.take(), Vec::<String>::new());
        assert!(again.process.get().is_none(), "a repeat read /proc");
        // A process that cannot be found is `?`, and the line is written.
        let gone = Caller {
            pid: None,
            ..caller(5, 0)
        };
        audit.record(&gone, Event::Forbidden { key: "k" });
        let lines = log.take();
        assert!(
            lines[0].ends_with("peer_uid=5 peer_gid=5 peer_exe=\"?\" peer_comm=\"?\""),
            "{lines:#?}"
        );
    }

    #[test]
    fn without_audit_handouts_are_debug_and_uncounted_and_denials_stay() {
        let (log, _capturing) = Captured::start();
        let audit = Audit::new();
        audit.set_handouts_logged(false);
        let scopes = ScopeSet::default();
        let alice = caller(1000, 42);
        audit.record(&alice, handout("k", &scopes));
        assert_eq!(log.take(), Vec::<String>::new());
        assert!(forgot_everything(&audit), "a handout was counted");
        audit.record(&alice, Event::Forbidden { key: "j" });
        let lines = log.take();
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert!(lines[0].contains("INFO"), "{lines:#?}");
        // A reload turns them back on.
        audit.set_handouts_logged(true);
        audit.record(&alice, handout("k", &scopes));
        assert_eq!(log.take().len(), 1);
    }

    #[test]
    fn reload_denials_are_counted_per_uid() {
        let mut ledger = Ledger::new(limits(100, ITEMISED_PER_UID_AND_KEY));
        let now = Instant::now();
        let mut seen = |c: &Caller| ledger.record(Subject::of(c, &Event::ReloadForbidden), now);
        assert_eq!(seen(&caller(1000, 1)), Seen::First);
        assert_eq!(seen(&caller(1000, 2)), Seen::Repeat);
        assert_eq!(seen(&caller(1001, 1)), Seen::First);
        // Not the same subject as a caller's unknown key names.
        let name = Subject::of(&caller(1000, 1), &Event::NoSuchKey { shown: "x" });
        assert_eq!(ledger.record(name, now), Seen::First);
    }

    #[test]
    fn a_uid_and_key_itemise_a_bounded_number_of_handout_subjects() {
        let (all, fx) = (ScopeSet::default(), ScopeSet::new(["fx"]).unwrap());
        let start = Instant::now();
        let mut ledger = Ledger::new(limits(100, 3));
        let record = |ledger: &mut Ledger, c: &Caller, e: Event<'_>, at| {
            ledger.record(Subject::of(c, &e), at)
        };
        for pid in 1..=3 {
            let seen = record(&mut ledger, &caller(1, pid), handout("k", &all), start);
            assert_eq!(seen, Seen::First);
        }
        // A fourth process, or a new scope set of a tracked one, is folded.
        let seen = record(&mut ledger, &caller(1, 4), handout("k", &all), start);
        assert_eq!(seen, Seen::Folded { first: true });
        let seen = record(&mut ledger, &caller(1, 1), handout("k", &fx), start);
        assert_eq!(seen, Seen::Folded { first: false });
        let seen = record(&mut ledger, &caller(1, 5), handout("k", &all), start);
        assert_eq!(seen, Seen::Folded { first: false });
        // A tracked subject still counts its repeats.
        let seen = record(&mut ledger, &caller(1, 1), handout("k", &all), start);
        assert_eq!(seen, Seen::Repeat);
        // Another uid, another key, and every kind of denial on the
        // folded key: each is a first.
        let firsts = [
            record(&mut ledger, &caller(2, 9), handout("k", &all), start),
            record(&mut ledger, &caller(1, 6), handout("j", &all), start),
            record(
                &mut ledger,
                &caller(1, 6),
                Event::Forbidden { key: "k" },
                start,
            ),
            record(
                &mut ledger,
                &caller(1, 6),
                Event::ScopesNotAllowed {
                    key: "k",
                    asked: &fx,
                    refused: 1,
                    resource: None,
                },
                start,
            ),
            record(
                &mut ledger,
                &caller(1, 6),
                Event::NoToken {
                    key: "k",
                    scopes: &all,
                    resource: None,
                    error: &GetError::ShuttingDown,
                },
                start,
            ),
        ];
        assert_eq!(firsts, [Seen::First; 5]);
        assert_eq!(ledger.itemised_of(1, "k"), 3);

        // The window ends: pid 1's repeat and the three folded handouts
        // are summed up; pids 2 and 3 are forgotten, making room.
        let due = ledger.due(start + WINDOW);
        let counted: Vec<(String, u64)> = due
            .iter()
            .map(|summary| match summary {
                Summary::Repeats {
                    subject, repeats, ..
                } => (format!("{:?}", subject.view()), *repeats),
                Summary::Untracked { .. } => panic!("{due:?}"),
            })
            .collect();
        assert_eq!(counted.len(), 2, "{due:?}");
        assert!(counted[0].0.contains("pid: Some(1)"), "{counted:?}");
        assert_eq!(counted[0].1, 1);
        assert!(counted[1].0.starts_with("Folded { uid: 1, key: \"k\""));
        assert_eq!(counted[1].1, 3);
        assert_eq!(ledger.itemised_of(1, "k"), 1);
        let later = start + WINDOW;
        for pid in [7, 8] {
            let seen = record(&mut ledger, &caller(1, pid), handout("k", &all), later);
            assert_eq!(seen, Seen::First);
        }
        // Folding goes on in the window that followed: not announced again.
        let seen = record(&mut ledger, &caller(1, 10), handout("k", &all), later);
        assert_eq!(seen, Seen::Folded { first: false });

        // Two quiet windows later, nothing is tracked or counted.
        let due = ledger.due(later + WINDOW);
        assert_eq!(due.len(), 1, "{due:?}");
        assert!(ledger.due(later + WINDOW * 2).is_empty());
        assert!(ledger.counts.is_empty() && ledger.ends.is_empty());
        assert!(ledger.itemised.is_empty() && ledger.names.is_empty());
    }

    #[test]
    fn cycling_processes_scope_sets_and_uids_holds_bounded_memory() {
        let start = Instant::now();
        let mut ledger = Ledger::new(limits(1000, 4));
        let sets: Vec<ScopeSet> = (0..50)
            .map(|i| ScopeSet::new([format!("s{i}")]).unwrap())
            .collect();
        // One uid, 10,000 processes, 50 scope sets, 2 keys: each key holds
        // its 4 itemised subjects and one folded.
        for pid in 0..10_000 {
            let key = if pid % 2 == 0 { "k" } else { "j" };
            let scopes = &sets[pid as usize % sets.len()];
            ledger.record(Subject::of(&caller(1, pid), &handout(key, scopes)), start);
        }
        assert_eq!(ledger.counts.len(), 2 * (4 + 1));
        assert_eq!(ledger.itemised.len(), 1);
        assert_eq!(ledger.itemised[&1].len(), 2);
        // Many uids: the cap holds, folded subjects included.
        for uid in 2..5000 {
            for pid in 0..6 {
                let event = handout("k", &sets[0]);
                ledger.record(Subject::of(&caller(uid, pid), &event), start);
            }
        }
        assert_eq!(ledger.counts.len(), 1000);
        assert!(ledger.itemised.len() <= 1000);
        let due = ledger.due(start + WINDOW);
        let summed: u64 = due
            .iter()
            .map(|summary| match summary {
                Summary::Repeats { repeats, .. } => *repeats,
                Summary::Untracked { events, .. } => *events,
            })
            .sum();
        let itemised = 2 * 4 + (1000 - 10) * 4 / 5;
        assert_eq!(
            summed + itemised,
            10_000 + 4998 * 6,
            "every event accounted for"
        );
        assert!(ledger.due(start + WINDOW * 2).is_empty());
        assert!(ledger.counts.is_empty() && ledger.itemised.is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_forking_uid_is_summed_up_per_window_and_others_appear_at_once() {
        let (log, _capturing) = Captured::start();
        let audit = Arc::new(Audit::with_limits(limits(MAX_SUBJECTS, 3)));
        let stop = CancellationToken::new();
        let flusher = tokio::spawn(audit.clone().run(stop.clone()));
        let scopes = ScopeSet::default();
        let fork = |pids: std::ops::Range<i32>| {
            for pid in pids {
                audit.record(&caller(1000, pid), handout("k", &scopes));
            }
        };

        fork(0..100);
        let lines = log.take();
        assert_eq!(lines.len(), 4, "{lines:#?}");
        assert!(lines[..3].iter().all(|l| l.contains("handed out a token")));
        assert!(
            lines[3].contains(
                "INFO tokend::audit: handouts of key k to uid 1000 are counted, not itemised, \
                 until the window ends: 3 processes, scope sets and tokens of theirs are \
                 itemised already key=k peer_uid=1000"
            ),
            "{lines:#?}"
        );
        // Another uid, another key and a denial of the key: at once.
        audit.record(&caller(1001, 1), handout("k", &scopes));
        audit.record(&caller(1000, 100), handout("j", &scopes));
        audit.record(&caller(1000, 101), Event::Forbidden { key: "k" });
        let lines = log.take();
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert!(lines[0].contains("handed out a token key=k scopes=[] peer_uid=1001"));
        assert!(lines[1].contains("handed out a token key=j scopes=[] peer_uid=1000"));
        assert!(lines[2].contains("denied: caller is not on the key's allow lists key=k"));

        tokio::time::sleep(WINDOW - Duration::from_millis(1)).await;
        assert_eq!(log.take(), Vec::<String>::new());
        tokio::time::sleep(Duration::from_millis(2)).await;
        let sums = log.take();
        assert_eq!(sums.len(), 1, "{sums:#?}");
        assert!(sums[0].contains("… and 97 more handouts of key k to uid 1000 not itemised (the audit log itemises 3 processes, scope sets and tokens of a uid and key at a time) key=k peer_uid=1000 repeats=97 window_ms=10000"), "{sums:#?}");

        // The flood goes on: the quiet processes were forgotten, so three
        // new ones are itemised; the rest fold into the window that
        // followed, without a second announcement.
        fork(100..110);
        let lines = log.take();
        assert_eq!(lines.len(), 3, "{lines:#?}");
        assert!(lines.iter().all(|l| l.contains("handed out a token")));
        tokio::time::sleep(WINDOW).await;
        let sums = log.take();
        assert_eq!(sums.len(), 1, "{sums:#?}");
        assert!(
            sums[0].contains("… and 7 more handouts of key k to uid 1000 not itemised"),
            "{sums:#?}"
        );
        assert!(sums[0].ends_with("repeats=7 window_ms=10000"), "{sums:#?}");

        // A quiet window forgets it all.
        tokio::time::sleep(WINDOW).await;
        assert!(forgot_everything(&audit), "everything was forgotten");
        assert!(audit.ledger().itemised.is_empty());

        // At shutdown, a window two seconds old says so.
        fork(200..204);
        assert_eq!(log.take().len(), 4);
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.cancel();
        flusher.await.unwrap();
        let last = log.take();
        assert_eq!(last.len(), 1, "{last:#?}");
        assert!(
            last[0].contains("… and 1 more handout of key k to uid 1000 not itemised"),
            "{last:#?}"
        );
        assert!(last[0].ends_with("repeats=1 window_ms=2000"), "{last:#?}");
    }
}
