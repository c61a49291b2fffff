//! The pure rules of the cache: what an owner does next, when a token is
//! renewed, how long a failure backs off. No clock and no I/O, so they are
//! tested with plain numbers.

use std::time::Duration;

use rand::Rng;

use super::EntryState;
use crate::config::KeyConfig;

/// The least time we allow for a refresh to come back before the old token
/// drops under `min_valid`. Twice the last fetch's latency when that is more.
const MIN_REFRESH_MARGIN: Duration = Duration::from_secs(1);

/// The base of the backoff: the n-th retry waits up to 1 s × 2ⁿ.
const BACKOFF_BASE: Duration = Duration::from_secs(1);

/// We honour `Retry-After` up to this; a larger value is more likely a
/// misconfigured proxy than a plan, and would leave callers without tokens
/// for longer than any outage we should wait out silently.
pub(super) const MAX_RETRY_AFTER: Duration = Duration::from_secs(600);

/// What an owner should do next.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    /// Sleep until then, unless woken earlier.
    SleepUntil(Duration),
    /// Nothing to do until woken.
    Wait,
    Fetch,
    Evict,
}

/// The owner's decision for an entry in `state` at `now`, last asked for
/// at `last_used` (`None`: nobody asked for it yet).
pub(super) fn next_step(
    state: &EntryState,
    last_used: Option<Duration>,
    key: &KeyConfig,
    now: Duration,
) -> Next {
    if state.fetching {
        return Next::Wait;
    }
    let idle_until = (!state.kept)
        .then(|| last_used.map(|used| used + key.idle_evict))
        .flatten();
    if idle_until.is_some_and(|until| now >= until) {
        return Next::Evict;
    }
    let due = due(state, now);
    match (due, idle_until) {
        (Some(due), _) if now >= due => Next::Fetch,
        (Some(due), Some(idle)) => Next::SleepUntil(due.min(idle)),
        (Some(due), None) => Next::SleepUntil(due),
        (None, Some(idle)) => Next::SleepUntil(idle),
        (None, None) => Next::Wait,
    }
}

/// When the owner of an entry in `state` asks the issuer next on its own
/// (boot clock), if it will. After a failure the backoff decides, and only
/// for sets worth keeping fresh: prefetch sets, and sets whose token is
/// still in use. A failing set nobody is waiting for waits for the next get;
/// so does a scope set the issuer refused, and one never fetched (the get
/// or prefetch that created it wakes the owner).
pub(super) fn due(state: &EntryState, now: Duration) -> Option<Duration> {
    match (&state.token, state.retry_at) {
        (token, Some(retry_at)) => {
            let worth = state.kept || token.as_ref().is_some_and(|t| t.usable(now));
            (worth && !state.refused).then_some(retry_at)
        }
        (Some(token), None) => Some(token.refresh_at),
        (None, None) => None,
    }
}

/// `min_valid` and the delay to the refresh point for a token of
/// `lifetime` under `key`, after a fetch that took `latency`.
pub(super) fn timing(
    key: &KeyConfig,
    lifetime: Duration,
    latency: Duration,
) -> (Duration, Duration) {
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
pub(super) fn effective_min_valid(min_valid: Duration, lifetime: Duration) -> Duration {
    min_valid.min(lifetime / 4)
}

/// How long after receipt a token is renewed. A point between 60 % and 75 %
/// of its life (`draw` in [0, 1) picks it), so keys and hosts do not refresh
/// in step; but no later than leaves `margin` for the new token to arrive
/// before the old one has only `min_valid` left, and no earlier than a
/// quarter of its life, so a tiny token cannot make us spin.
pub(super) fn refresh_delay(
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
pub(super) fn backoff(
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

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::SystemTime;

    use super::*;
    use crate::cache::CachedToken;
    use crate::scope::ScopeSet;
    use crate::secret::AccessToken;

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
            fingerprint: AccessToken::new("t".into()).fingerprint(),
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
            ..EntryState::default()
        };
        assert_eq!(
            next_step(&state, Some(boot()), &key, now),
            Next::SleepUntil(now + s(60))
        );
        assert_eq!(
            next_step(&state, Some(boot()), &key, now + s(60)),
            Next::Fetch
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_set_is_evicted_and_a_kept_one_is_not() {
        let now = boot();
        let key = key(s(10));
        let mut state = EntryState {
            token: Some(token(now, s(60))),
            ..EntryState::default()
        };
        assert_eq!(
            next_step(&state, Some(boot()), &key, now),
            Next::SleepUntil(now + s(10))
        );
        assert_eq!(
            next_step(&state, Some(boot()), &key, now + s(10)),
            Next::Evict
        );
        state.kept = true;
        assert_eq!(
            next_step(&state, Some(boot()), &key, now + s(10)),
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
            ..EntryState::default()
        };
        assert_eq!(
            next_step(&state, Some(boot()), &key, now),
            Next::SleepUntil(now + s(2))
        );
        assert_eq!(
            next_step(&state, Some(boot()), &key, now + s(2)),
            Next::Fetch
        );
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
        assert_eq!(next_step(&fetching, None, &key, now), Next::Wait);
        let fresh_kept = EntryState {
            kept: true,
            ..EntryState::default()
        };
        assert_eq!(next_step(&fresh_kept, None, &key, now), Next::Wait);
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
}
