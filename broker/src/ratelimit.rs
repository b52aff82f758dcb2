//! Token buckets: per peer (requests), per identity and channel (`send`).
//!
//! Time is passed in (`now: Instant`) so tests drive a fake clock and the broker reads the clock
//! once per request. A clock that goes backwards (a caller passing an older `now`) adds no tokens.

use std::collections::HashMap;
use std::fmt;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Refused: try again after this long (`Duration::MAX` when the bucket never refills).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryAfter(pub Duration);

impl fmt::Display for RetryAfter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0 == Duration::MAX {
            write!(f, "rate limited (no refill)")
        } else {
            write!(f, "rate limited, retry after {} ms", self.0.as_millis())
        }
    }
}

impl std::error::Error for RetryAfter {}

/// A token bucket: holds at most `burst` tokens, refills at `rate_per_sec`, starts full.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Option<Instant>,
}

fn secs_to_duration(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX)
}

impl Bucket {
    /// `rate_per_sec` that is negative, NaN or infinite is taken as 0 (no refill); `burst` 0
    /// refuses everything.
    pub fn new(rate_per_sec: f64, burst: u32) -> Bucket {
        let rate = if rate_per_sec.is_finite() && rate_per_sec > 0.0 {
            rate_per_sec
        } else {
            0.0
        };
        Bucket {
            rate,
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: None,
        }
    }

    fn refill(&mut self, now: Instant) {
        if let Some(last) = self.last {
            let dt = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + dt * self.rate).min(self.burst);
            if now > last {
                self.last = Some(now);
            }
        } else {
            self.last = Some(now);
        }
    }

    /// Takes one token, or says how long until one is available.
    pub fn try_take(&mut self, now: Instant) -> Result<(), RetryAfter> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return Ok(());
        }
        if self.rate == 0.0 || self.burst < 1.0 {
            return Err(RetryAfter(Duration::MAX));
        }
        Err(RetryAfter(secs_to_duration(
            (1.0 - self.tokens) / self.rate,
        )))
    }

    /// Tokens available at `now` (without taking any).
    pub fn available(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.tokens
    }

    /// True when the bucket is full at `now` (forgetting it loses nothing).
    fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.tokens >= self.burst
    }
}

/// Buckets by key (identity, `(identity, channel)`), all with the same rate and burst, at most
/// `max_keys` of them. When the map is full, buckets that have refilled completely are forgotten
/// (a new full bucket is the same thing); if none has, a *new* key is refused rather than
/// evicting a bucket that still holds a debt (evicting would let a caller reset its own limit by
/// cycling keys). Existing keys are never affected by the cap.
#[derive(Debug)]
pub struct Limiter<K> {
    rate: f64,
    burst: u32,
    max_keys: usize,
    buckets: HashMap<K, Bucket>,
}

impl<K: Eq + Hash + Clone> Limiter<K> {
    pub fn new(rate_per_sec: f64, burst: u32, max_keys: usize) -> Limiter<K> {
        Limiter {
            rate: rate_per_sec,
            burst,
            max_keys: max_keys.max(1),
            buckets: HashMap::new(),
        }
    }

    /// Number of keys currently tracked.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Forgets a key (e.g. a peer that exited).
    pub fn remove(&mut self, key: &K) {
        self.buckets.remove(key);
    }

    /// Takes one token from `key`'s bucket.
    pub fn try_take(&mut self, key: &K, now: Instant) -> Result<(), RetryAfter> {
        if let Some(b) = self.buckets.get_mut(key) {
            return b.try_take(now);
        }
        if self.buckets.len() >= self.max_keys {
            self.buckets.retain(|_, b| !b.is_full(now));
        }
        if self.buckets.len() >= self.max_keys {
            // The soonest any tracked bucket is full again: then there is room.
            let wait = self
                .buckets
                .values()
                .map(|b| {
                    if b.rate == 0.0 {
                        Duration::MAX
                    } else {
                        secs_to_duration((b.burst - b.tokens) / b.rate)
                    }
                })
                .min()
                .unwrap_or(Duration::MAX);
            return Err(RetryAfter(wait));
        }
        let mut b = Bucket::new(self.rate, self.burst);
        let r = b.try_take(now);
        self.buckets.insert(key.clone(), b);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn burst_then_refill_at_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10.0, 3);
        for _ in 0..3 {
            b.try_take(t0).unwrap();
        }
        let RetryAfter(wait) = b.try_take(t0).unwrap_err();
        assert_eq!(wait, ms(100));
        // 50 ms later: half a token, still refused, 50 ms to go.
        let RetryAfter(wait) = b.try_take(t0 + ms(50)).unwrap_err();
        assert!(wait.abs_diff(ms(50)) < ms(1), "{wait:?}");
        // 100 ms after t0: one token.
        b.try_take(t0 + ms(100)).unwrap();
        assert!(b.try_take(t0 + ms(100)).is_err());
        // A long pause refills only up to burst.
        let t1 = t0 + Duration::from_secs(60);
        for _ in 0..3 {
            b.try_take(t1).unwrap();
        }
        assert!(b.try_take(t1).is_err());
    }

    #[test]
    fn fractional_rate_and_clock_going_backwards() {
        let t0 = Instant::now() + Duration::from_secs(10);
        let mut b = Bucket::new(0.5, 1);
        b.try_take(t0).unwrap();
        assert_eq!(
            b.try_take(t0).unwrap_err(),
            RetryAfter(Duration::from_secs(2))
        );
        // Going back in time adds nothing and does not move `last` back.
        assert!(b.try_take(t0 - Duration::from_secs(5)).is_err());
        assert!(b.try_take(t0 + ms(1999)).is_err());
        b.try_take(t0 + Duration::from_secs(2)).unwrap();
    }

    #[test]
    fn degenerate_parameters_refuse_without_panicking() {
        let t0 = Instant::now();
        let mut zero_burst = Bucket::new(100.0, 0);
        assert_eq!(zero_burst.try_take(t0), Err(RetryAfter(Duration::MAX)));
        for rate in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let mut b = Bucket::new(rate, 1);
            b.try_take(t0).unwrap();
            assert_eq!(
                b.try_take(t0 + Duration::from_secs(3600)),
                Err(RetryAfter(Duration::MAX))
            );
        }
        // Tiny rate: the wait is huge but representable.
        let mut b = Bucket::new(1e-300, 1);
        b.try_take(t0).unwrap();
        assert!(b.try_take(t0).is_err());
    }

    #[test]
    fn limiter_keys_are_independent() {
        let t0 = Instant::now();
        let mut l: Limiter<&str> = Limiter::new(1.0, 2, 10);
        l.try_take(&"a", t0).unwrap();
        l.try_take(&"a", t0).unwrap();
        assert!(l.try_take(&"a", t0).is_err());
        l.try_take(&"b", t0).unwrap();
        assert_eq!(l.len(), 2);
        l.remove(&"a");
        l.try_take(&"a", t0).unwrap();
    }

    #[test]
    fn limiter_is_bounded_and_cannot_be_reset_by_cycling_keys() {
        let t0 = Instant::now();
        let mut l: Limiter<u32> = Limiter::new(1.0, 1, 3);
        for k in 0..3 {
            l.try_take(&k, t0).unwrap();
        }
        // Full of indebted buckets: a new key is refused, until one refills (1 s).
        let RetryAfter(wait) = l.try_take(&99, t0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(1));
        assert_eq!(l.len(), 3);
        // Existing keys still work by their own bucket.
        assert!(l.try_take(&0, t0).is_err());
        // After the refill, full buckets are forgotten and the new key gets in.
        let t1 = t0 + Duration::from_secs(1);
        l.try_take(&99, t1).unwrap();
        assert!(l.len() <= 3);
        // Key 0 was used at t0 and refused, so it was full again at t1 and may have been
        // forgotten: it gets a fresh full bucket, which is exactly what it would have had.
        l.try_take(&0, t1).unwrap();
    }
}
