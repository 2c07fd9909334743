//! Rate limits: a token bucket with time passed in (plain data, unit-tested without clocks).

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Instant;

#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Tokens added per second; 0 means unlimited.
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(rate: f64, burst: f64, now: Instant) -> TokenBucket {
        TokenBucket {
            rate,
            burst,
            tokens: burst,
            last: now,
        }
    }

    /// Takes one token if there is one.
    pub fn try_take(&mut self, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        // An earlier `now` than the last one must not move `last` back: the next call would be
        // credited the same time twice.
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether the bucket is full at `now`: its user has nothing left to be remembered for.
    pub fn is_full(&self, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens + elapsed * self.rate >= self.burst
    }
}

/// One token bucket per client (an address, a user), for limits that outlive a connection
/// (HTTP requests). Bounded by the clients that matter: a client whose bucket has refilled has
/// nothing to be remembered for and is forgotten at the next sweep, which runs once the map has
/// doubled since the last one (amortised O(1) per call).
#[derive(Debug)]
pub struct KeyedBuckets<K> {
    rate: f64,
    burst: f64,
    buckets: HashMap<K, TokenBucket>,
    sweep_at: usize,
}

impl<K: Hash + Eq> KeyedBuckets<K> {
    pub fn new(rate: f64, burst: f64) -> KeyedBuckets<K> {
        KeyedBuckets {
            rate,
            burst,
            buckets: HashMap::new(),
            sweep_at: 64,
        }
    }

    /// Takes one token from `key`'s bucket (a new client starts full).
    pub fn try_take(&mut self, key: K, now: Instant) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        if self.buckets.len() >= self.sweep_at {
            self.buckets.retain(|_, b| !b.is_full(now));
            self.sweep_at = (self.buckets.len() * 2).max(64);
        }
        let (rate, burst) = (self.rate, self.burst);
        self.buckets
            .entry(key)
            .or_insert_with(|| TokenBucket::new(rate, burst, now))
            .try_take(now)
    }

    /// Clients remembered now.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn burst_then_refill_at_the_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10.0, 3.0, t0);
        assert!((0..3).all(|_| b.try_take(t0)));
        assert!(!b.try_take(t0));
        // 100 ms at 10/s is one token.
        assert!(b.try_take(t0 + Duration::from_millis(100)));
        assert!(!b.try_take(t0 + Duration::from_millis(100)));
        // A long pause refills only up to the burst.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| b.try_take(later)).count(), 3);
    }

    #[test]
    fn zero_rate_is_unlimited() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(0.0, 0.0, t0);
        assert!((0..1000).all(|_| b.try_take(t0)));
    }

    #[test]
    fn keyed_buckets_are_per_client_and_forget_refilled_ones() {
        let t0 = Instant::now();
        let mut k = KeyedBuckets::new(1.0, 2.0);
        assert!(k.try_take("a", t0) && k.try_take("a", t0));
        assert!(!k.try_take("a", t0), "a's burst is spent");
        assert!(k.try_take("b", t0), "b has its own bucket");
        // Many one-off clients: the map stays bounded by those still owed a refill.
        let mut big = KeyedBuckets::new(1.0, 1.0);
        for i in 0..10_000u32 {
            // Each client is seen once at its own second: all earlier ones have refilled.
            assert!(big.try_take(i, t0 + Duration::from_secs(u64::from(i))));
        }
        assert!(big.len() <= 128, "{} remembered", big.len());
    }
}
