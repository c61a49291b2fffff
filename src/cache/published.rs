//! An entry's published state: written by its owner alone, read by gets
//! and `status`, and awaited by the gets that woke the owner.
//!
//! This is what a `tokio::sync::watch` channel gave the cache, in less
//! memory. Watch's shared part carries eight `Notify`s so that many
//! receivers can wait on one value without contending on one list; each of
//! 10,000 cached sets paid 464 bytes for its channel (malloc_stats and
//! heaptrack), more than for its token. An entry has one writer, and
//! waiters only while its owner answers a get that found no usable token,
//! so one `Notify` serves. Readers take a read lock for a copy of what they
//! need, as they did inside watch; nobody holds it across an `.await`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{PoisonError, RwLock, RwLockReadGuard};

use tokio::sync::Notify;

/// A value with one writer, the owner, which ends it with [`close`].
///
/// [`close`]: Published::close
pub(super) struct Published<T> {
    value: RwLock<T>,
    /// Woken after every change that [`Published::send_if_modified`]
    /// reports, and at [`Published::close`].
    changed: Notify,
    closed: AtomicBool,
}

impl<T> Published<T> {
    pub(super) fn new(value: T) -> Published<T> {
        Published {
            value: RwLock::new(value),
            changed: Notify::new(),
            closed: AtomicBool::new(false),
        }
    }

    /// The value now. Held briefly, never across an `.await`: the owner
    /// waits for it to publish.
    pub(super) fn borrow(&self) -> RwLockReadGuard<'_, T> {
        // A panic inside `modify` leaves the fields it had set, each of
        // them valid: the state is usable, if out of step for one answer.
        self.value.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Applies `modify`, and wakes the waiters when it says it changed
    /// something they may wait for.
    pub(super) fn send_if_modified(&self, modify: impl FnOnce(&mut T) -> bool) -> bool {
        let modified = {
            let mut value = self.value.write().unwrap_or_else(PoisonError::into_inner);
            modify(&mut value)
        };
        if modified {
            self.changed.notify_waiters();
        }
        modified
    }

    pub(super) fn send_modify(&self, modify: impl FnOnce(&mut T)) {
        self.send_if_modified(|value| {
            modify(value);
            true
        });
    }

    /// The writer is gone: waiters get `None` once the value no longer
    /// satisfies them.
    pub(super) fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }

    pub(super) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// The first `Some` that `ready` makes of the value, now or after a
    /// change; `None` when the writer closed before that. As watch's
    /// `wait_for`: the value is looked at before the closing is.
    pub(super) async fn wait_for<R>(&self, mut ready: impl FnMut(&T) -> Option<R>) -> Option<R> {
        loop {
            // Registered before the value is read, so a change made after
            // the read wakes this wait.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(found) = ready(&self.borrow()) {
                return Some(found);
            }
            if self.is_closed() {
                return None;
            }
            changed.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_waiter_sees_the_change_it_waits_for() {
        let published = Arc::new(Published::new(0u32));
        let waiter = tokio::spawn({
            let published = published.clone();
            async move { published.wait_for(|n| (*n >= 2).then_some(*n)).await }
        });
        tokio::task::yield_now().await;
        published.send_modify(|n| *n += 1);
        // Not reported as a change: nobody is woken for it.
        assert!(!published.send_if_modified(|_| false));
        published.send_modify(|n| *n += 1);
        let seen = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert_eq!(seen.unwrap().unwrap(), Some(2));
    }

    #[tokio::test]
    async fn closing_ends_the_wait_but_a_satisfied_wait_still_answers() {
        let published = Arc::new(Published::new(1u32));
        assert_eq!(published.wait_for(|n| Some(*n)).await, Some(1));
        let waiter = tokio::spawn({
            let published = published.clone();
            async move { published.wait_for(|n| (*n > 1).then_some(())).await }
        });
        tokio::task::yield_now().await;
        assert!(!published.is_closed());
        published.close();
        assert!(published.is_closed());
        let seen = tokio::time::timeout(Duration::from_secs(5), waiter).await;
        assert_eq!(seen.unwrap().unwrap(), None);
        assert_eq!(published.wait_for(|n| Some(*n)).await, Some(1));
    }
}
