//! The task that owns one cache entry: it alone asks the issuer for the
//! entry's token, publishes every outcome to the entry's state, and
//! sleeps on one timer between requests.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::Rng;

use super::budget::pauses_key;
use super::schedule::{backoff, next_step, Next};
use super::{grant_fits, Entry, Key};
use crate::issuer::{FailureKind, Grant, IssuerError};

/// Owns one entry: the only task that asks the issuer for its token. It
/// refreshes it ahead of expiry, answers the gets that wake it, retries
/// with backoff, and ends when the entry is idle or its cache stops.
pub(super) struct Owner {
    pub(super) key: Arc<Key>,
    /// The entry it alone writes.
    pub(super) entry: Arc<Entry>,
}

impl Owner {
    /// Most of an owner's life is spent in the `select!` below, so that is
    /// all its task holds: a request and a get's wake-up run boxed, for
    /// the moments they last; the owner waits on one doorbell and one
    /// timer; and what the loop works out before it waits is scoped to die
    /// before the wait (a local still in scope is kept in the task across
    /// every wait, however dead). Each idle owner task is 384 bytes so
    /// (tokio sizes tasks in steps of 128 bytes). With the request's state
    /// inline, a waiter each for moves and for the cache stopping, and the
    /// loop's locals, it was 768: 10,000 idle sets took 3.7 MiB more.
    pub(super) async fn run(mut self) {
        loop {
            // Before anything else: an owner never asks the issuer after
            // its cache stopped, even if the ring that says so is late.
            if self.stopped() {
                return;
            }
            let (sleep, armed) = {
                let until = match self.next_step() {
                    Next::Evict => {
                        tracing::debug!(key = %self.key.name, scopes = %self.entry.id.scopes, resource = self.entry.id.resource.as_deref(), "dropped an idle scope set");
                        return;
                    }
                    Next::Fetch => {
                        if !Box::pin(self.attempt()).await {
                            return;
                        }
                        continue;
                    }
                    Next::SleepUntil(when) => Some(when),
                    Next::Wait => None,
                };
                // Until boot-clock time `until`. Tokio's timer stops during
                // a suspend, so it may fire late: the loop re-reads the
                // boot clock when it does. With nothing to wait for
                // (`None`) the sleep is disabled: never polled, so never a
                // timer.
                let delay =
                    until.map_or(Duration::ZERO, |at| at.saturating_sub((self.key.clock)()));
                (tokio::time::sleep(delay), until.is_some())
            };
            tokio::select! {
                biased;
                () = self.entry.wake.notified() => {
                    // A move first: one handed over just before the old
                    // cache stopped must win over that stop.
                    if self.stopped() {
                        return;
                    }
                    let asked = self.entry.asked.swap(false, Ordering::AcqRel);
                    if asked && !Box::pin(self.woken()).await {
                        return;
                    }
                }
                () = sleep, if armed => {}
            }
        }
    }

    /// What to do next, by the entry's state now.
    fn next_step(&self) -> Next {
        let now = (self.key.clock)();
        let last_used = self.entry.last_used();
        next_step(&self.entry.state.borrow(), last_used, &self.key.config, now)
    }

    /// A get woke us: it found no usable token (or, after a suspend, one
    /// past its refresh point) and may be waiting for an answer. `false`
    /// when the cache stopped meanwhile.
    async fn woken(&mut self) -> bool {
        let now = (self.key.clock)();
        let wanted = {
            let state = self.entry.state.borrow();
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
        self.entry.state.send_modify(|state| state.answers += 1);
        true
    }

    /// Asks the issuer when the key's budget allows and publishes the
    /// outcome. `false` when the cache stopped meanwhile.
    async fn attempt(&mut self) -> bool {
        loop {
            // Watched from here, not held by the owner: its key may change
            // on a move, and most owners never wait for a probe (a held
            // receiver made every idle owner task larger).
            let mut pause = self.key.pause.subscribe();
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
                        changed = pause.changed() => if changed.is_err() { return false },
                    }
                }
            }
        }
    }

    async fn fetch(&mut self, probe: bool) -> bool {
        self.entry.state.send_modify(|state| {
            state.fetching = true;
            state.requests += 1;
        });
        tracing::debug!(key = %self.key.name, scopes = %self.entry.id.scopes, resource = self.entry.id.resource.as_deref(), probe, "requesting a token from the issuer");
        let key = self.key.clone();
        let started = tokio::time::Instant::now();
        let result = tokio::select! {
            // Boxed: inline, the request's state would make every idle
            // owner task as large as one in the middle of a request.
            result = Box::pin(key.issuer.fetch(&key.config, &self.entry.id.scopes, self.entry.id.resource.as_deref())) => result,
            // Dropping the owner closes the state: waiting gets learn there
            // will be no answer.
            () = key.deadline.cancelled() => return false,
        };
        // A reload during the request: the outcome is the new key's.
        self.take_move();
        let narrowed = !Arc::ptr_eq(&key, &self.key)
            && result.as_ref().is_ok_and(|grant| {
                !grant
                    .scope
                    .as_ref()
                    .map_or(true, |granted| grant_fits(&self.key.config, granted))
            });
        if narrowed {
            // Judged against the list the key had when it asked; a reload
            // narrowed it meanwhile. The credentials worked, so a probe's
            // pause is over; ask again, under the new list, whose
            // answer the issuer client judges by it.
            if probe {
                self.key.lift_pause();
            }
            self.entry.state.send_modify(|state| state.fetching = false);
            return Box::pin(self.attempt()).await;
        }
        self.settle(result, started.elapsed(), probe);
        self.key.changes.notify_one();
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
                let token = Arc::new(key.cached(grant, &self.entry.id, received, latency));
                self.entry.state.send_modify(|state| {
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
        let failures = self.entry.state.borrow().failures.saturating_add(1);
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
            scopes = %self.entry.id.scopes, resource = self.entry.id.resource.as_deref(),
            issuer_status = error.status(),
            failures,
            retry_in_ms = retry_at.saturating_sub(now).as_millis() as u64,
            "token request failed: {error}"
        );
        let refused = refuses_scope(&error);
        self.entry.state.send_modify(|state| {
            state.failures = failures;
            state.retry_at = Some(retry_at);
            state.last_error = Some(error);
            state.last_failure = Some(received.1);
            state.refused = refused;
            state.fetching = false;
            state.answers += 1;
        });
    }

    /// The key is paused until `until`: this set answers with its reason.
    fn blocked(&mut self, until: Duration) {
        let error = self.key.pause.borrow().error.clone();
        self.entry.state.send_modify(|state| {
            state.retry_at = Some(until);
            state.last_error = error.or(state.last_error.take());
            state.answers += 1;
        });
        self.key.changes.notify_one();
    }

    /// From now on this entry is `key`'s, under its settings.
    fn moved(&mut self, key: Arc<Key>) {
        let kept = self.entry.id.prefetched(&key.config);
        self.entry.state.send_if_modified(|state| {
            state.kept = kept;
            // A token granted wider than the new `scopes` list is not
            // handed out again (the reload left such entries behind; this
            // is one granted while it ran).
            state.token = state
                .token
                .as_ref()
                .filter(|token| grant_fits(&key.config, &token.scopes))
                .map(|token| Arc::new(token.under(&key.config, state.latency)));
            false
        });
        self.key = key;
    }

    fn take_move(&mut self) {
        if let Some(key) = self.entry.move_to.swap(None) {
            self.moved(key);
        }
    }

    /// Whether the cache this entry belongs to has stopped, after taking
    /// any move to a new cache handed over before the old one stopped.
    fn stopped(&mut self) -> bool {
        self.take_move();
        self.key.stop.is_cancelled()
    }
}

impl Drop for Owner {
    /// Callers waiting for an answer get none, and the entry counts as
    /// dead; it leaves the count of the STATUS= line.
    fn drop(&mut self) {
        self.entry.state.close();
        self.key.changes.notify_one();
    }
}

/// The issuer refused this scope set itself (RFC 6749 5.2 `invalid_scope`),
/// or its resource (RFC 8707 `invalid_target`, the same verdict on the
/// other half of what an entry asks for).
fn refuses_scope(error: &IssuerError) -> bool {
    matches!(&error.kind, FailureKind::Refused { words, .. }
        if words.starts_with("invalid_scope") || words.starts_with("invalid_target"))
}
