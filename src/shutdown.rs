//! Shutdown as one value with two phases, in the order the daemon goes
//! through them:
//!
//! 1. **Stopping** ([`Shutdown::begin`]): the server accepts no more
//!    connections, handlers stop between requests, the cache's owners stop
//!    their timers. Answers already being worked on go on.
//! 2. **Expired** ([`Shutdown::expire`]): the answer deadline. A get still
//!    waiting on an issuer is answered `unavailable`, issuer requests under
//!    way are abandoned, and a handler still writing to a caller that does
//!    not read gives up.
//!
//! The daemon owns the value and moves it through both phases in a straight
//! line; everything else only watches it.

use tokio_util::sync::CancellationToken;

/// Both phases of a shutdown; cheap to clone, every clone sees the same.
#[derive(Clone, Debug, Default)]
pub(crate) struct Shutdown {
    stopping: CancellationToken,
    expired: CancellationToken,
}

impl Shutdown {
    pub(crate) fn new() -> Shutdown {
        Shutdown::default()
    }

    /// Phase 1: stop taking new work.
    pub(crate) fn begin(&self) {
        self.stopping.cancel();
    }

    /// Phase 2: give up on work still waiting. Implies phase 1.
    pub(crate) fn expire(&self) {
        self.stopping.cancel();
        self.expired.cancel();
    }

    /// Resolves once phase 1 has begun.
    pub(crate) async fn stopping(&self) {
        self.stopping.cancelled().await;
    }

    /// Resolves once the answer deadline has passed.
    pub(crate) async fn expired(&self) {
        self.expired.cancelled().await;
    }

    /// The answer deadline as a token, for what takes one (the cache's
    /// issuer requests, gets waiting on them).
    pub(crate) fn deadline(&self) -> CancellationToken {
        self.expired.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn expiring_implies_stopping() {
        let shutdown = Shutdown::new();
        let watcher = shutdown.clone();
        assert!(!watcher.deadline().is_cancelled());
        shutdown.expire();
        watcher.stopping().await;
        watcher.expired().await;
        assert!(watcher.deadline().is_cancelled());
    }
}
