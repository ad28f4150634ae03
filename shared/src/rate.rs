//! Rate limits keyed by API key, source address or user: governor's GCRA limiter with the
//! answer servers need (how long until the next attempt conforms, for `Retry-After`), and a
//! penalty box for failed authentication, which must be refused *before* the credentials
//! are checked again.

use std::collections::HashMap;
use std::hash::Hash;
use std::num::NonZeroU32;
use std::sync::Mutex;
use std::time::Duration;

use governor::clock::Clock;
use governor::{DefaultKeyedRateLimiter, Quota};
use tokio::time::Instant;

/// A sustained rate per second with a burst allowance, per key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Cells per second, sustained; 0 turns the limit off.
    pub per_second: u32,
    /// Cells that may be spent at once.
    pub burst: u32,
}

impl Rate {
    /// `per_second` sustained with a burst of `burst_seconds` seconds' worth.
    pub const fn new(per_second: u32, burst_seconds: u32) -> Self {
        Self {
            per_second,
            burst: per_second.saturating_mul(burst_seconds),
        }
    }

    /// No limit.
    pub const OFF: Rate = Rate {
        per_second: 0,
        burst: 0,
    };
}

/// A keyed limit. Keys idle for longer than a full burst are forgotten by
/// [`KeyedLimit::forget_idle`], so memory follows the keys active lately.
pub struct KeyedLimit<K: Hash + Eq + Clone> {
    /// `None` when the limit is off.
    limiter: Option<DefaultKeyedRateLimiter<K>>,
}

impl<K: Hash + Eq + Clone> KeyedLimit<K> {
    /// A limit of `rate` per key.
    pub fn new(rate: Rate) -> Self {
        let limiter = NonZeroU32::new(rate.per_second).map(|per_second| {
            let burst = NonZeroU32::new(rate.burst).unwrap_or(per_second);
            DefaultKeyedRateLimiter::keyed(Quota::per_second(per_second).allow_burst(burst))
        });
        Self { limiter }
    }

    /// Spends one cell of `key`, or says how long until one is available.
    pub fn check(&self, key: &K) -> Result<(), Duration> {
        self.check_n(key, 1)
    }

    /// Spends `n` cells of `key` at once, or says how long until they are available. More
    /// than a whole burst can never conform: the wait is then the time to refill a burst,
    /// so the caller backs off rather than retrying at once.
    pub fn check_n(&self, key: &K, n: u32) -> Result<(), Duration> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        let Some(n) = NonZeroU32::new(n) else {
            return Ok(());
        };
        match limiter.check_key_n(key, n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(not_until.wait_time_from(limiter.clock().now())),
            Err(_) => Err(Duration::from_secs(1)),
        }
    }

    /// Drops the state of keys that have been quiet for a full burst, and the room it took.
    pub fn forget_idle(&self) {
        if let Some(limiter) = &self.limiter {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }

    /// Keys remembered now.
    pub fn len(&self) -> usize {
        self.limiter.as_ref().map_or(0, |l| l.len())
    }

    /// True when no key is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Failed authentication per source address: failures are counted against a [`Rate`]; an
/// address over it is refused (429) until the rate allows it again, without its credentials
/// being looked at, so guessing is no faster than the rate.
pub struct AuthFailures<K: Hash + Eq + Clone> {
    /// Failures allowed per key.
    failures: KeyedLimit<K>,
    /// Keys refused until the instant.
    blocked: Mutex<HashMap<K, Instant>>,
}

/// Most addresses the penalty box holds; past it, expired entries are dropped, and when none
/// is, a new offender is not boxed (it is still limited by the failure rate next time).
const MAX_BLOCKED: usize = 100_000;

impl<K: Hash + Eq + Clone> AuthFailures<K> {
    /// Allows `rate` failures per key.
    pub fn new(rate: Rate) -> Self {
        Self {
            failures: KeyedLimit::new(rate),
            blocked: Mutex::new(HashMap::new()),
        }
    }

    /// Before checking credentials: `Err(wait)` when `key` is refused for now.
    pub fn admit(&self, key: &K) -> Result<(), Duration> {
        let mut blocked = self.blocked.lock().expect("auth lock is never poisoned");
        match blocked.get(key) {
            Some(until) if *until > Instant::now() => Err(*until - Instant::now()),
            Some(_) => {
                blocked.remove(key);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// After a failure: counts it; `Err(wait)` when this one put `key` over the rate.
    pub fn failed(&self, key: &K) -> Result<(), Duration> {
        let wait = self.failures.check(key).err();
        let Some(wait) = wait else {
            return Ok(());
        };
        let mut blocked = self.blocked.lock().expect("auth lock is never poisoned");
        if blocked.len() >= MAX_BLOCKED {
            let now = Instant::now();
            blocked.retain(|_, until| *until > now);
        }
        if blocked.len() < MAX_BLOCKED {
            blocked.insert(key.clone(), Instant::now() + wait);
        }
        Err(wait)
    }

    /// Forgets quiet keys and served sentences.
    pub fn forget_idle(&self) {
        self.failures.forget_idle();
        let now = Instant::now();
        self.blocked
            .lock()
            .expect("auth lock is never poisoned")
            .retain(|_, until| *until > now);
    }
}

/// `Retry-After` seconds for a wait: rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    (wait.as_secs() + u64::from(wait.subsec_nanos() > 0)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rate_holds_per_key() {
        let limit = KeyedLimit::new(Rate {
            per_second: 10,
            burst: 3,
        });
        for _ in 0..3 {
            assert!(limit.check(&"a").is_ok());
        }
        let wait = limit.check(&"a").expect_err("over the burst");
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        assert!(limit.check(&"b").is_ok(), "keys are independent");
        assert!(limit.check_n(&"c", 3).is_ok());
        assert!(
            limit.check_n(&"d", 4).is_err(),
            "more than a burst never conforms"
        );
        assert_eq!(limit.len(), 3, "a refused-outright batch leaves no state");
    }

    #[test]
    fn an_off_limit_admits_everything() {
        let limit = KeyedLimit::new(Rate::OFF);
        for _ in 0..1000 {
            assert!(limit.check_n(&1, 1000).is_ok());
        }
        assert!(limit.is_empty());
    }

    #[test]
    fn failures_over_the_rate_block_the_key_before_its_next_attempt() {
        let auth = AuthFailures::new(Rate {
            per_second: 1,
            burst: 2,
        });
        assert!(auth.admit(&"ip").is_ok());
        assert!(auth.failed(&"ip").is_ok());
        assert!(auth.failed(&"ip").is_ok());
        let wait = auth
            .failed(&"ip")
            .expect_err("third failure in a burst of two");
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1));
        assert!(
            auth.admit(&"ip").is_err(),
            "refused before credentials are checked"
        );
        assert!(auth.admit(&"other").is_ok());
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_secs(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_secs(Duration::ZERO), 1);
        assert_eq!(retry_after_secs(Duration::from_millis(2500)), 3);
        assert_eq!(retry_after_secs(Duration::from_secs(2)), 2);
    }
}
