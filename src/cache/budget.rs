//! A key's issuer budget. Issuers rate-limit and reject clients, not scope
//! sets: after such a failure every set of the key waits out one pause, and
//! when it ends one owner probes while the others wait for its outcome.

use std::sync::Arc;
use std::time::Duration;

use rand::Rng;

use super::schedule::{backoff, MAX_RETRY_AFTER};
use super::Key;
use crate::issuer::{FailureKind, IssuerError};

/// A key's issuer budget: after a failure that is the client's rather than
/// one scope set's, no set of the key asks the issuer before `until`; then
/// the first owner to try is the one probe (`probing`) and the others wait
/// for its outcome.
#[derive(Clone, Debug, Default)]
pub(super) struct Pause {
    until: Option<Duration>,
    /// Client failures in a row; drives the backoff.
    failures: u32,
    pub(super) error: Option<Arc<IssuerError>>,
    probing: bool,
}

impl Key {
    /// Why the key is paused, while it is.
    pub(super) fn paused(&self, now: Duration) -> Option<Arc<IssuerError>> {
        let pause = self.pause.borrow();
        pause
            .until
            .filter(|until| now < *until)
            .and(pause.error.clone())
    }

    /// When the key's pause ends, while it is paused.
    pub(super) fn paused_until(&self, now: Duration) -> Option<Duration> {
        self.pause.borrow().until.filter(|until| now < *until)
    }

    /// May an owner ask the issuer now? `Ok(probe)`: yes, and `probe` says
    /// it is the one request a pause that just ended allows. `Err(Some(t))`:
    /// the key is paused until `t`. `Err(None)`: another set's probe is out.
    pub(super) fn admit(&self, now: Duration) -> Result<bool, Option<Duration>> {
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
    pub(super) fn pause(&self, error: &Arc<IssuerError>, probe: bool, now: Duration) -> Duration {
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

    /// Carries `old`'s pause over a reload. A probe under way reports to
    /// its owner's key of the moment; not marking it here risks one more
    /// probe, never a key stuck.
    pub(super) fn carry_pause(&self, old: &Key) {
        let pause = old.pause.borrow().clone();
        self.pause.send_replace(Pause {
            probing: false,
            ..pause
        });
    }

    /// Ends the pause after a probe came back without a client failure.
    pub(super) fn lift_pause(&self) {
        self.pause.send_if_modified(|pause| {
            let paused = pause.until.is_some();
            *pause = Pause::default();
            paused
        });
    }
}

/// Failures that are the client's rather than one scope set's: the
/// issuer's rate limit or maintenance notice (429 or 503 with
/// `Retry-After`), rejected or unreadable credentials, and a failed
/// discovery (every set of the key needs the same token endpoint).
pub(super) fn pauses_key(error: &IssuerError) -> bool {
    error.retry_after.is_some()
        || matches!(
            error.kind,
            FailureKind::Denied { .. } | FailureKind::NoSecret(_) | FailureKind::Discovery(_)
        )
}
