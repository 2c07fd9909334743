//! Choosing a target among several base URLs: round-robin or least-outstanding, skipping
//! targets whose breaker is open and targets already tried for this request.

use super::config::Balance;

/// What the picker knows about one target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Candidate {
    /// Its breaker admits requests.
    pub available: bool,
    /// Requests in flight to it (from this shard).
    pub outstanding: usize,
    /// Already tried for this request.
    pub tried: bool,
}

#[derive(Debug, Default)]
pub struct Picker {
    next: usize,
}

impl Picker {
    /// The index of the target to use, or `None` when every target is unavailable or tried.
    pub fn pick(&mut self, policy: Balance, targets: &[Candidate]) -> Option<usize> {
        let n = targets.len();
        if n == 0 {
            return None;
        }
        let start = self.next % n;
        let mut order = (0..n).map(|k| (start + k) % n);
        let usable = |i: &usize| targets[*i].available && !targets[*i].tried;
        let chosen = match policy {
            Balance::RoundRobin => order.find(usable),
            // `min_by_key` keeps the first of equals: ties go in turn.
            Balance::LeastOutstanding => {
                order.filter(usable).min_by_key(|&i| targets[i].outstanding)
            }
        }?;
        self.next = chosen + 1;
        Some(chosen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(outstanding: usize) -> Candidate {
        Candidate {
            available: true,
            outstanding,
            tried: false,
        }
    }

    #[test]
    fn round_robin_skips_unavailable() {
        let mut p = Picker::default();
        let mut t = [c(0), c(0), c(0)];
        let picks: Vec<_> = (0..4)
            .map(|_| p.pick(Balance::RoundRobin, &t).unwrap())
            .collect();
        assert_eq!(picks, [0, 1, 2, 0]);
        t[2].available = false;
        let picks: Vec<_> = (0..3)
            .map(|_| p.pick(Balance::RoundRobin, &t).unwrap())
            .collect();
        assert_eq!(picks, [1, 0, 1]);
        t[0].tried = true;
        t[1].available = false;
        assert_eq!(p.pick(Balance::RoundRobin, &t), None);
        assert_eq!(p.pick(Balance::RoundRobin, &[]), None);
    }

    #[test]
    fn least_outstanding_prefers_idle_targets_and_rotates_ties() {
        let mut p = Picker::default();
        assert_eq!(
            p.pick(Balance::LeastOutstanding, &[c(3), c(1), c(2)]),
            Some(1)
        );
        let ties = [c(0), c(0), c(5)];
        let picks: Vec<_> = (0..4)
            .map(|_| p.pick(Balance::LeastOutstanding, &ties).unwrap())
            .collect();
        assert_eq!(picks, [0, 1, 0, 1]);
        let mut t = [c(0), c(9)];
        t[0].available = false;
        assert_eq!(p.pick(Balance::LeastOutstanding, &t), Some(1));
    }
}
