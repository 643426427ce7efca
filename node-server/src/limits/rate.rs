//! [`RateLimiter`]: requests per second with a burst (GCRA, from `governor`),
//! keyed by token or for one database.

use std::hash::Hash;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::HashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{NotUntil, Quota};

type Instant = <DefaultClock as Clock>::Instant;
type Keyed<K> =
    governor::RateLimiter<K, HashMapStateStore<K>, DefaultClock, NoOpMiddleware<Instant>>;
type Direct = governor::RateLimiter<NotKeyed, InMemoryState, DefaultClock, NoOpMiddleware<Instant>>;

enum Inner<K: Hash + Eq + Clone> {
    Keyed(Keyed<K>),
    Direct(Direct),
}

/// A rate limit: `rate` requests per second, bursts of `burst`.
pub(crate) struct RateLimiter<K: Hash + Eq + Clone> {
    inner: Inner<K>,
    clock: DefaultClock,
}

fn quota(rate: u32, burst: u32) -> Option<Quota> {
    let rate = NonZeroU32::new(rate)?;
    let burst = NonZeroU32::new(burst).unwrap_or(rate);
    Some(Quota::per_second(rate).allow_burst(burst))
}

impl<K: Hash + Eq + Clone> RateLimiter<K> {
    /// One limit per key; `None` when `rate` is 0 (off).
    pub(crate) fn keyed(rate: u32, burst: u32) -> Option<Self> {
        let clock = DefaultClock::default();
        let limiter = governor::RateLimiter::new(
            quota(rate, burst)?,
            HashMapStateStore::default(),
            clock.clone(),
        );
        Some(RateLimiter {
            inner: Inner::Keyed(limiter),
            clock,
        })
    }

    /// Counts one request of `key`; when over the rate, how long to wait.
    pub(crate) fn check(&self, key: &K) -> Result<(), Duration> {
        let outcome = match &self.inner {
            Inner::Keyed(l) => l.check_key(key),
            Inner::Direct(l) => l.check(),
        };
        outcome.map_err(|not_until: NotUntil<Instant>| not_until.wait_time_from(self.clock.now()))
    }

    /// Waits until one more request of `key` is allowed, and counts it.
    pub(crate) async fn wait(&self, key: &K) {
        while let Err(wait) = self.check(key) {
            tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
        }
    }
}

impl RateLimiter<()> {
    /// One limit for everything; `None` when `rate` is 0 (off).
    pub(crate) fn direct(rate: u32, burst: u32) -> Option<Self> {
        let clock = DefaultClock::default();
        let limiter = governor::RateLimiter::direct_with_clock(quota(rate, burst)?, clock.clone());
        Some(RateLimiter {
            inner: Inner::Direct(limiter),
            clock,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refused_with_a_wait_and_keys_are_separate() {
        let l = RateLimiter::<u8>::keyed(1, 3).expect("on");
        for _ in 0..3 {
            assert!(l.check(&1).is_ok());
        }
        let wait = l.check(&1).expect_err("over the burst");
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        assert!(l.check(&2).is_ok(), "another key has its own budget");
        assert!(RateLimiter::<u8>::keyed(0, 10).is_none(), "0 is off");
        let d = RateLimiter::direct(1, 1).expect("on");
        assert!(d.check(&()).is_ok());
        assert!(d.check(&()).is_err());
    }
}
