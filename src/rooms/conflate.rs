//! Conflation (`[[rooms.topic]] conflate`): at most one delivery per interval per topic (per
//! key, with `conflate_key`), the latest value winning. Plain data; time is passed in.
//!
//! A publish to a topic with no open window goes out at once and opens one; publishes while
//! it is open replace the pending value of their key. When the window ends, the pending values
//! go out (in the order their keys first arrived) and the next window opens; a window that
//! ends with nothing pending closes. Conflation runs on the topic's home shard, before `seq`
//! is assigned, so every subscriber sees the same gap-free sequence of the values that won.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One topic's open window.
struct Window<T> {
    until: Instant,
    interval: Duration,
    /// The latest value per key, in the order the keys first arrived in this window.
    pending: Vec<T>,
    /// Where each key's value is in `pending` (a topic may have many keys).
    slots: HashMap<Option<Box<str>>, usize>,
}

/// The open windows of the topics homed on one shard.
pub struct Conflation<T> {
    windows: HashMap<Arc<str>, Window<T>>,
    /// Window ends, earliest first; one entry per open window.
    due: BinaryHeap<Reverse<(Instant, Arc<str>)>>,
}

impl<T> Default for Conflation<T> {
    fn default() -> Self {
        Conflation {
            windows: HashMap::new(),
            due: BinaryHeap::new(),
        }
    }
}

impl<T> Conflation<T> {
    /// A publish of `item` (conflated by `key`) at `now`: `Some(item)` when it goes out now,
    /// `None` when it is held for the end of the topic's window (replacing the value its key
    /// held, if any).
    pub fn offer(
        &mut self,
        topic: &Arc<str>,
        key: Option<Box<str>>,
        item: T,
        now: Instant,
        interval: Duration,
    ) -> Option<T> {
        match self.windows.get_mut(topic) {
            Some(w) => {
                match w.slots.get(&key) {
                    Some(&i) => w.pending[i] = item,
                    None => {
                        w.slots.insert(key, w.pending.len());
                        w.pending.push(item);
                    }
                }
                None
            }
            None => {
                let until = now + interval;
                self.windows.insert(
                    topic.clone(),
                    Window {
                        until,
                        interval,
                        pending: Vec::new(),
                        slots: HashMap::new(),
                    },
                );
                self.due.push(Reverse((until, topic.clone())));
                Some(item)
            }
        }
    }

    /// When the earliest window ends.
    pub fn next_due(&self) -> Option<Instant> {
        self.due.peek().map(|Reverse((at, _))| *at)
    }

    /// Ends the windows due by `now`: the values that go out, per topic. A window that held
    /// values opens again from `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<(Arc<str>, Vec<T>)> {
        let mut out = Vec::new();
        while let Some(Reverse((at, _))) = self.due.peek() {
            if *at > now {
                break;
            }
            let Some(Reverse((_, topic))) = self.due.pop() else {
                break;
            };
            let Some(w) = self.windows.get_mut(&topic) else {
                continue;
            };
            if w.pending.is_empty() {
                self.windows.remove(&topic);
                continue;
            }
            w.until = now + w.interval;
            self.due.push(Reverse((w.until, topic.clone())));
            w.slots.clear();
            out.push((topic, std::mem::take(&mut w.pending)));
        }
        out
    }

    /// No topic has an open window.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_first_goes_at_once_then_the_latest_once_per_interval() {
        let t0 = Instant::now();
        let mut c = Conflation::default();
        let t: Arc<str> = "ticker.btc".into();
        let iv = 100 * MS;
        assert_eq!(c.offer(&t, None, 1, t0, iv), Some(1));
        assert_eq!(c.offer(&t, None, 2, t0 + 10 * MS, iv), None);
        assert_eq!(c.offer(&t, None, 3, t0 + 20 * MS, iv), None);
        assert_eq!(c.next_due(), Some(t0 + iv));
        assert!(c.expire(t0 + 99 * MS).is_empty());
        assert_eq!(c.expire(t0 + iv), vec![(t.clone(), vec![3])]);
        // A new window opened at its end; it ends empty and closes.
        assert_eq!(c.offer(&t, None, 4, t0 + 150 * MS, iv), None);
        assert_eq!(c.expire(t0 + 200 * MS), vec![(t.clone(), vec![4])]);
        assert!(c.expire(t0 + 300 * MS).is_empty());
        assert!(c.is_empty() && c.next_due().is_none());
        // Quiet again: the next publish goes at once.
        assert_eq!(c.offer(&t, None, 5, t0 + 400 * MS, iv), Some(5));
    }

    #[test]
    fn each_key_keeps_its_latest_in_first_arrival_order() {
        let t0 = Instant::now();
        let mut c = Conflation::default();
        let t: Arc<str> = "fx".into();
        let k = |s: &str| Some(Box::<str>::from(s));
        let iv = 100 * MS;
        assert_eq!(c.offer(&t, k("eur"), "eur1", t0, iv), Some("eur1"));
        assert_eq!(c.offer(&t, k("gbp"), "gbp1", t0, iv), None);
        assert_eq!(c.offer(&t, k("eur"), "eur2", t0, iv), None);
        assert_eq!(c.offer(&t, k("gbp"), "gbp2", t0, iv), None);
        assert_eq!(c.offer(&t, None, "none", t0, iv), None);
        assert_eq!(
            c.expire(t0 + iv),
            vec![(t.clone(), vec!["gbp2", "eur2", "none"])]
        );
    }

    #[test]
    fn topics_have_their_own_windows() {
        let t0 = Instant::now();
        let mut c = Conflation::default();
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        assert_eq!(c.offer(&a, None, 1, t0, 100 * MS), Some(1));
        assert_eq!(c.offer(&b, None, 1, t0 + 10 * MS, 20 * MS), Some(1));
        c.offer(&a, None, 2, t0 + 11 * MS, 100 * MS);
        c.offer(&b, None, 2, t0 + 12 * MS, 20 * MS);
        assert_eq!(c.next_due(), Some(t0 + 30 * MS));
        assert_eq!(c.expire(t0 + 30 * MS), vec![(b.clone(), vec![2])]);
        assert_eq!(c.expire(t0 + 100 * MS), vec![(a.clone(), vec![2])]);
    }
}
