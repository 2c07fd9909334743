//! Passive health and a circuit breaker for one upstream target, as a plain state machine with
//! time passed in.
//!
//! Closed: requests flow; `threshold` consecutive failures open it. Open: requests fail fast
//! until `open_for` has passed, then the breaker is half-open: one request goes through as a
//! probe (everything else still fails fast); its success closes the breaker, its failure opens
//! it again for twice as long (up to 16× `open_for`).

use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// What the breaker says about a new request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    Yes,
    /// Yes, as the half-open probe: report its outcome.
    Probe,
    No,
}

#[derive(Debug, Clone)]
pub struct Breaker {
    state: State,
    failures: u32,
    threshold: u32,
    open_for: Duration,
    /// How many times in a row a probe failed (the open period doubles each time).
    trips: u32,
}

const MAX_BACKOFF_SHIFT: u32 = 4;

impl Breaker {
    pub fn new(threshold: u32, open_for: Duration) -> Breaker {
        Breaker {
            state: State::Closed,
            failures: 0,
            threshold: threshold.max(1),
            open_for,
            trips: 0,
        }
    }

    /// The state as of `now` (an open breaker whose time is up reads as half-open).
    pub fn state(&mut self, now: Instant) -> State {
        if let State::Open { until } = self.state {
            if now >= until {
                self.state = State::HalfOpen { probing: false };
            }
        }
        self.state
    }

    /// Could a request go to this target now (without taking the probe slot)?
    pub fn available(&mut self, now: Instant) -> bool {
        match self.state(now) {
            State::Closed => true,
            State::Open { .. } => false,
            State::HalfOpen { probing } => !probing,
        }
    }

    /// Admits a request; a half-open breaker admits one probe at a time.
    pub fn admit(&mut self, now: Instant) -> Admit {
        match self.state(now) {
            State::Closed => Admit::Yes,
            State::Open { .. } => Admit::No,
            State::HalfOpen { probing: true } => Admit::No,
            State::HalfOpen { probing: false } => {
                self.state = State::HalfOpen { probing: true };
                Admit::Probe
            }
        }
    }

    pub fn success(&mut self) {
        self.failures = 0;
        self.trips = 0;
        self.state = State::Closed;
    }

    pub fn failure(&mut self, now: Instant) {
        match self.state(now) {
            State::Closed => {
                self.failures += 1;
                if self.failures >= self.threshold {
                    self.open(now);
                }
            }
            State::HalfOpen { .. } => {
                self.trips = (self.trips + 1).min(MAX_BACKOFF_SHIFT);
                self.open(now);
            }
            // A request admitted before the breaker opened: already counted as down.
            State::Open { .. } => {}
        }
    }

    /// A probe that ended without a verdict (cancelled by the client): let another one try.
    pub fn probe_abandoned(&mut self) {
        if self.state == (State::HalfOpen { probing: true }) {
            self.state = State::HalfOpen { probing: false };
        }
    }

    fn open(&mut self, now: Instant) {
        self.failures = 0;
        self.state = State::Open {
            until: now + self.open_for * (1 << self.trips),
        };
    }

    /// For the gauge: 0 closed, 1 half-open, 2 open.
    pub fn gauge(&mut self, now: Instant) -> f64 {
        match self.state(now) {
            State::Closed => 0.0,
            State::HalfOpen { .. } => 1.0,
            State::Open { .. } => 2.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn opens_after_consecutive_failures_only() {
        let t0 = Instant::now();
        let mut b = Breaker::new(3, 10 * S);
        b.failure(t0);
        b.failure(t0);
        b.success(); // resets the count
        b.failure(t0);
        b.failure(t0);
        assert_eq!(b.admit(t0), Admit::Yes);
        b.failure(t0);
        assert_eq!(b.state(t0), State::Open { until: t0 + 10 * S });
        assert_eq!(b.admit(t0 + 9 * S), Admit::No);
        assert!(!b.available(t0 + 9 * S));
    }

    #[test]
    fn half_open_lets_one_probe_through() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, 10 * S);
        b.failure(t0);
        let later = t0 + 10 * S;
        assert!(b.available(later));
        assert_eq!(b.admit(later), Admit::Probe);
        assert_eq!(b.admit(later), Admit::No, "one probe at a time");
        assert!(!b.available(later));
        b.success();
        assert_eq!(b.state(later), State::Closed);
        assert_eq!(b.admit(later), Admit::Yes);
    }

    #[test]
    fn failed_probes_back_off() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, 10 * S);
        b.failure(t0);
        let mut now = t0;
        for shift in 1..=6u32 {
            let open = b.state(now);
            let State::Open { until } = open else {
                panic!("{open:?}")
            };
            now = until;
            assert_eq!(b.admit(now), Admit::Probe);
            b.failure(now);
            let expect = 10 * S * (1 << shift.min(MAX_BACKOFF_SHIFT));
            assert_eq!(
                b.state(now),
                State::Open {
                    until: now + expect
                }
            );
        }
    }

    #[test]
    fn abandoned_probe_frees_the_slot() {
        let t0 = Instant::now();
        let mut b = Breaker::new(1, S);
        b.failure(t0);
        assert_eq!(b.admit(t0 + S), Admit::Probe);
        b.probe_abandoned();
        assert_eq!(b.admit(t0 + S), Admit::Probe);
        assert_eq!(b.gauge(t0 + S), 1.0);
    }
}
