//! What a subscriber checks of its deliveries, as plain types: seqs and message numbers in,
//! counters out.
//!
//! Unconflated, every message of the topic must arrive once, in seq order: a skipped seq is a
//! gap (resolved as reordering if it arrives later), a repeated one a duplicate.
//!
//! Conflated (`--conflated`, the topic has `[[rooms.topic]] conflate`), a subscriber gets only
//! some of the values: skipped seqs are expected (on one node conflation happens before seqs
//! are assigned and there are none; across a Redis cluster there are), and what must hold is
//! that seqs still only go up, that no value is older than one already delivered from the same
//! publisher, and that the last value of the topic arrives (the window's end delivers it).

use std::cell::Cell;
use std::collections::BTreeSet;
use std::rc::Rc;

use anyhow::{Context as _, Result};

/// Most missing seqs one subscriber tracks individually.
const MAX_MISSING: usize = 1 << 16;

/// Counters over all subscribers.
#[derive(Default)]
pub struct SeqStats {
    /// Seqs skipped and not (yet) delivered late. Conflated: seqs conflation skipped.
    pub gaps: Cell<u64>,
    /// Gaps too large to track seq by seq (counted, not resolvable as reordering).
    pub gaps_untracked: Cell<u64>,
    pub dups: Cell<u64>,
    pub reordered: Cell<u64>,
    /// Conflated: values older than one already delivered from the same publisher.
    pub stale: Cell<u64>,
    /// Conflated: subscribers whose latest delivery is one of the last values of its topic.
    pub at_final: Cell<u64>,
}

fn add(c: &Cell<u64>, n: u64) {
    c.set(c.get() + n);
}

/// The message number each publisher sends last to each topic (message `n` of the run comes
/// from publisher `n % publishers`, goes to topic `n % topics`, and carries `n` in its data).
pub struct Finals {
    publishers: u64,
    /// Per topic: the last message number of each publisher that sends to it.
    by_topic: Vec<Vec<u64>>,
}

impl Finals {
    /// `quotas[j]`: how many messages publisher `j` sends (its k-th is `k * publishers + j`).
    pub fn new(quotas: &[u64], topics: usize) -> Finals {
        let p = quotas.len() as u64;
        let mut by_topic = vec![Vec::new(); topics];
        for (j, &quota) in quotas.iter().enumerate() {
            let mut seen = vec![false; topics];
            // The topics of a publisher's messages repeat with a period of at most `topics`
            // messages, so its last `topics` messages reach every topic it ever sends to.
            for k in (quota.saturating_sub(topics as u64)..quota).rev() {
                let n = k * p + j as u64;
                let t = (n % topics as u64) as usize;
                if !seen[t] {
                    seen[t] = true;
                    by_topic[t].push(n);
                }
            }
        }
        Finals {
            publishers: p,
            by_topic,
        }
    }

    fn is_final(&self, topic: usize, n: u64) -> bool {
        self.by_topic[topic].contains(&n)
    }
}

/// One subscriber's check.
pub struct SeqCheck {
    /// The next seq expected (None: the `subscribed` reply carried no seq; the first message
    /// sets it).
    next: Option<u64>,
    missing: BTreeSet<u64>,
    conflated: Option<Latest>,
}

/// A conflated topic's subscriber: the newest value seen of each publisher.
struct Latest {
    finals: Rc<Finals>,
    topic: usize,
    newest: Vec<Option<u64>>,
    at_final: bool,
}

impl SeqCheck {
    /// `conflated`: the run's last values and this subscriber's topic.
    pub fn new(conflated: Option<(Rc<Finals>, usize)>) -> SeqCheck {
        SeqCheck {
            next: None,
            missing: BTreeSet::new(),
            conflated: conflated.map(|(finals, topic)| Latest {
                newest: vec![None; finals.publishers as usize],
                finals,
                topic,
                at_final: false,
            }),
        }
    }

    /// The topic's seq in the `subscribed` reply (if it carried one): deliveries follow it.
    pub fn subscribed(&mut self, last: Option<u64>) {
        self.next = last.map(|s| s + 1);
    }

    /// One room message of the subscriber's topic, with its seq and the message number in its
    /// data; whether it is a fresh delivery (not a duplicate).
    pub fn delivery(&mut self, st: &SeqStats, seq: u64, n: Option<u64>) -> Result<bool> {
        let fresh = match self.conflated {
            None => self.in_order(st, seq),
            Some(_) => self.only_up(st, seq),
        };
        if let (true, Some(latest)) = (fresh, self.conflated.as_mut()) {
            latest.value(st, n.context("room message without data.n")?);
        }
        Ok(fresh)
    }

    /// Unconflated: every seq once, gaps filled by late arrivals counted as reordering.
    fn in_order(&mut self, st: &SeqStats, seq: u64) -> bool {
        match self.next {
            Some(n) if seq < n => {
                if self.missing.remove(&seq) {
                    add(&st.reordered, 1);
                    st.gaps.set(st.gaps.get() - 1);
                    return true;
                }
                add(&st.dups, 1);
                return false;
            }
            Some(n) if seq > n => {
                add(&st.gaps, seq - n);
                for s in n..seq {
                    if self.missing.len() >= MAX_MISSING {
                        add(&st.gaps_untracked, 1);
                    } else {
                        self.missing.insert(s);
                    }
                }
            }
            _ => {}
        }
        self.next = Some(seq + 1);
        true
    }

    /// Conflated: seqs only go up; the ones skipped never come.
    fn only_up(&mut self, st: &SeqStats, seq: u64) -> bool {
        match self.next {
            Some(n) if seq + 1 == n => {
                add(&st.dups, 1);
                return false;
            }
            Some(n) if seq < n => {
                add(&st.reordered, 1);
                return false;
            }
            Some(n) => add(&st.gaps, seq - n),
            None => {}
        }
        self.next = Some(seq + 1);
        true
    }
}

impl Latest {
    fn value(&mut self, st: &SeqStats, n: u64) {
        let from = (n % self.finals.publishers) as usize;
        if self.newest[from].is_some_and(|m| m >= n) {
            add(&st.stale, 1);
        } else {
            self.newest[from] = Some(n);
        }
        let at_final = self.finals.is_final(self.topic, n);
        match (self.at_final, at_final) {
            (false, true) => add(&st.at_final, 1),
            (true, false) => st.at_final.set(st.at_final.get() - 1),
            _ => {}
        }
        self.at_final = at_final;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(st: &SeqStats) -> [u64; 6] {
        [
            st.gaps.get(),
            st.gaps_untracked.get(),
            st.dups.get(),
            st.reordered.get(),
            st.stale.get(),
            st.at_final.get(),
        ]
    }

    #[test]
    fn finals_per_topic_and_publisher() {
        // Two publishers of 5 and 4 messages over 3 topics: publisher 0 sends 0 2 4 6 8,
        // publisher 1 sends 1 3 5 7.
        let f = Finals::new(&[5, 4], 3);
        let mut by_topic = f.by_topic.clone();
        by_topic.iter_mut().for_each(|v| v.sort());
        assert_eq!(by_topic, vec![vec![3, 6], vec![4, 7], vec![5, 8]]);
        // One publisher, one topic: the last message.
        assert_eq!(Finals::new(&[10], 1).by_topic, vec![vec![9]]);
        // A publisher with nothing to send has no last value.
        assert_eq!(Finals::new(&[0, 2], 1).by_topic, vec![vec![3]]);
    }

    #[test]
    fn unconflated_gaps_duplicates_and_late_arrivals() {
        let st = SeqStats::default();
        let mut c = SeqCheck::new(None);
        c.subscribed(Some(0));
        assert!(c.delivery(&st, 1, None).unwrap());
        assert!(c.delivery(&st, 4, None).unwrap());
        assert_eq!(counts(&st), [2, 0, 0, 0, 0, 0]);
        // 2 comes late: reordered, the gap closes; 4 again is a duplicate.
        assert!(c.delivery(&st, 2, None).unwrap());
        assert!(!c.delivery(&st, 4, None).unwrap());
        assert_eq!(counts(&st), [1, 0, 1, 1, 0, 0]);
    }

    #[test]
    fn conflated_skips_are_expected_order_is_not() {
        let st = SeqStats::default();
        let finals = Rc::new(Finals::new(&[10], 1));
        let mut c = SeqCheck::new(Some((finals, 0)));
        c.subscribed(Some(0));
        // Values 0, 4, 9 of ten delivered as seqs 1, 2, 3: no gaps, the last value arrived.
        assert!(c.delivery(&st, 1, Some(0)).unwrap());
        assert!(c.delivery(&st, 2, Some(4)).unwrap());
        assert_eq!(st.at_final.get(), 0);
        assert!(c.delivery(&st, 3, Some(9)).unwrap());
        assert_eq!(counts(&st), [0, 0, 0, 0, 0, 1]);
        // Skipped seqs (conflation after Redis assigned them) are counted, not missing.
        assert!(c.delivery(&st, 7, Some(9)).unwrap());
        assert_eq!(counts(&st), [3, 0, 0, 0, 1, 1]);
        // A seq again, an older seq, an older value: failures.
        assert!(!c.delivery(&st, 7, Some(9)).unwrap());
        assert!(!c.delivery(&st, 5, Some(9)).unwrap());
        assert!(c.delivery(&st, 8, Some(4)).unwrap());
        assert_eq!(counts(&st), [3, 0, 1, 1, 2, 0]);
        // A room message without its number cannot be checked.
        assert!(c.delivery(&st, 9, None).is_err());
    }

    #[test]
    fn conflated_last_values_of_several_publishers() {
        let st = SeqStats::default();
        // Publishers 0 and 1, three messages each, one topic: 4 and 5 are the last values.
        let finals = Rc::new(Finals::new(&[3, 3], 1));
        let mut c = SeqCheck::new(Some((finals, 0)));
        assert!(c.delivery(&st, 10, Some(5)).unwrap());
        assert_eq!(st.at_final.get(), 1);
        // Publisher 0's last after publisher 1's: still a last value, and newer for its
        // publisher.
        assert!(c.delivery(&st, 11, Some(4)).unwrap());
        assert_eq!(counts(&st), [0, 0, 0, 0, 0, 1]);
    }
}
