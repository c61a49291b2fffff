//! The bytes of answers tokend has made and its callers have not read yet,
//! counted per uid, and giving that memory back to the system once it is
//! freed.
//!
//! A request of a few bytes (`status`) can ask for an answer of tens of
//! kilobytes, so a caller that pipelines requests and never reads would
//! make tokend hold whatever it asked for. Two bounds stop it; the
//! server's handler keeps both ([`crate::server`]):
//! - per connection, `max_unread_bytes`: a handler makes answers in batches
//!   and reads no more requests until a batch is written, so a batch cut
//!   at that many bytes (after its first answer, which always goes) is all
//!   one connection can make tokend hold;
//! - per uid, `max_unread_bytes_per_uid`, counted here. While a uid's
//!   connections hold that much, each of them gets one answer per batch,
//!   written before its next request is read. No connection is refused its
//!   next answer outright: one process of a uid that never reads must not
//!   stall the uid's other callers, which do. The price is one answer per
//!   connection past the bound, which `max_connections_per_uid` bounds.
//!
//! An answer is counted as the memory it holds (its capacity), and only
//! while its task waits with it in hand: a write the socket does not take
//! at once, or a turn given to other tasks once the task's cooperative
//! budget is spent. Between two such waits a task runs alone on its
//! worker, so a batch begun on a count not yet raised by another is one
//! per worker at most. A batch written at once, the common case of a
//! caller that reads, never touches the shared count: a connection reads
//! it once per batch (a relaxed load) and changes it twice per wait. No
//! lock, and nothing per answer.
//!
//! # Giving the memory back
//! Answers are ordinary heap allocations, freed when written or when their
//! connection closes. glibc's malloc keeps freed memory in its arenas for
//! reuse and returns it to the system only from the top of a heap: the
//! answers of hundreds of connections, freed in any order among live
//! allocations (a connection's task, a read buffer, a cache entry), leave
//! resident memory near its peak long after the callers have gone.
//! `malloc_trim(0)` returns the free pages inside every arena too. It walks
//! every arena under its lock, so it is not run per answer: when a uid's
//! held answers drop to none after having passed [`TRIM_AFTER`], the
//! [`Trimmer`] is asked, and it trims at most once per [`TRIM_EVERY`], on a
//! blocking thread. Fewer arenas (`M_ARENA_MAX`) would not help: one arena
//! keeps its free chunks just the same. Nothing of an answer is pooled:
//! answers and batches are freed once written, and a connection's read
//! buffer is given back before each idle wait.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

/// A uid that has held this much of unread answers frees enough, once its
/// callers read or go, to be worth a trim; below it the allocator's own
/// trimming of the heap top is enough.
pub(crate) const TRIM_AFTER: usize = 1 << 20;

/// The least time between two trims: each walks every arena, and a uid
/// whose callers come and go must not make tokend trim continuously.
pub(crate) const TRIM_EVERY: Duration = Duration::from_secs(1);

/// The answer bytes one uid's connections hold while they wait.
pub(crate) struct Unread {
    bytes: AtomicUsize,
    /// Set when the count passes [`TRIM_AFTER`]; cleared when it drops to
    /// zero and a trim is asked for.
    large: AtomicBool,
    trimmer: Arc<Trimmer>,
}

impl Unread {
    pub(crate) fn new(trimmer: Arc<Trimmer>) -> Unread {
        Unread {
            bytes: AtomicUsize::new(0),
            large: AtomicBool::new(false),
            trimmer,
        }
    }

    /// What this uid's connections hold now. Read once per batch, so a
    /// relaxed load: a batch started on a slightly old count overshoots the
    /// bound by at most one batch per runtime worker.
    pub(crate) fn held(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Counts `bytes` until the returned guard is dropped. Dropped after
    /// the answers are freed, the guard that brings the count to zero asks
    /// for a trim when this uid held enough to be worth one.
    pub(crate) fn hold(&self, bytes: usize) -> Held<'_> {
        let now = self.bytes.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if now >= TRIM_AFTER && !self.large.load(Ordering::Relaxed) {
            self.large.store(true, Ordering::Relaxed);
        }
        Held {
            unread: self,
            bytes,
        }
    }
}

/// Answers counted against their uid while their task waits with them.
pub(crate) struct Held<'a> {
    unread: &'a Unread,
    bytes: usize,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        let before = self.unread.bytes.fetch_sub(self.bytes, Ordering::Relaxed);
        if before == self.bytes && self.unread.large.swap(false, Ordering::Relaxed) {
            self.unread.trimmer.ask();
        }
    }
}

/// Returns freed heap memory to the system when asked, at most once per
/// [`TRIM_EVERY`]. One per server; its task ends with the server's.
#[derive(Default)]
pub(crate) struct Trimmer {
    asked: Notify,
}

impl Trimmer {
    /// Asks for a trim; asks made before the trim begins are one trim.
    pub(crate) fn ask(&self) {
        self.asked.notify_one();
    }

    /// Trims each time it is asked, until `stop` completes.
    pub(crate) async fn run(self: Arc<Self>, stop: impl std::future::Future<Output = ()>) {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => return,
                () = self.asked.notified() => {}
            }
            // Blocking: it takes every arena's lock in turn, and its time
            // grows with the heap.
            let trimmed = tokio::task::spawn_blocking(trim).await;
            if let Err(e) = trimmed {
                tracing::debug!("failed to return freed memory to the system: {e}");
            }
            tokio::select! {
                () = &mut stop => return,
                () = tokio::time::sleep(TRIM_EVERY) => {}
            }
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only walks glibc's own arenas under their locks;
    // it takes no pointers from us.
    let released = unsafe { libc::malloc_trim(0) };
    tracing::trace!(
        released = released != 0,
        "returned freed memory to the system"
    );
}

/// Other allocators return memory on their own terms.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_bytes_are_counted_until_released() {
        let unread = Unread::new(Arc::default());
        let a = unread.hold(100);
        let b = unread.hold(50);
        assert_eq!(unread.held(), 150);
        drop(a);
        assert_eq!(unread.held(), 50);
        drop(b);
        assert_eq!(unread.held(), 0);
    }

    /// Whether `future` is ready at its first poll (a zero timeout polls
    /// its future before the clock).
    async fn ready_now(future: impl std::future::Future) -> bool {
        tokio::time::timeout(Duration::ZERO, future).await.is_ok()
    }

    #[tokio::test]
    async fn a_trim_is_asked_for_only_after_a_large_hold_is_released() {
        let trimmer = Arc::new(Trimmer::default());
        let unread = Unread::new(trimmer.clone());
        let asked = trimmer.asked.notified();
        tokio::pin!(asked);
        drop(unread.hold(TRIM_AFTER - 1));
        assert!(!ready_now(asked.as_mut()).await, "a small hold asked");
        let big = unread.hold(TRIM_AFTER);
        let other = unread.hold(10);
        drop(big);
        assert!(!ready_now(asked.as_mut()).await, "asked while held");
        drop(other);
        assert!(ready_now(asked.as_mut()).await, "not asked at zero");
    }
}
