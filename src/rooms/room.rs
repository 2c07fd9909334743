//! One room's state on its home shard: the sequence, the history ring, presence, and which
//! shards have subscribers. Plain data; time is passed in.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::ws::mailbox::Broadcast;

/// A message kept for replay.
#[derive(Debug, Clone)]
pub struct Stored {
    pub seq: u64,
    pub at: Instant,
    pub msg: Broadcast,
}

impl Stored {
    /// Memory the entry holds (frames plus bookkeeping).
    pub fn size(&self) -> usize {
        self.msg.frame.len() + self.msg.deflated.as_ref().map_or(0, |d| d.len()) + 64
    }
}

/// A presence member.
#[derive(Debug, Clone, PartialEq)]
pub struct Member {
    pub client_id: Arc<str>,
    pub user: Arc<str>,
    pub joined_at: f64,
    /// Listed in presence, with `join`/`leave` events. A long-poll subscriber is not: it
    /// subscribes anew with every poll, and listing it would turn each poll into a leave and a
    /// join for every other subscriber.
    pub listed: bool,
}

/// What a subscriber with `since` gets replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// No `since`: nothing to replay.
    NotAsked,
    /// Every missed message is in history: replay these (possibly none).
    Replay(Vec<u64>),
    /// History no longer reaches back to `since` (or the epoch changed): the client must
    /// resync; nothing is replayed.
    Lost,
}

#[derive(Debug)]
pub struct Room {
    pub epoch: Arc<str>,
    /// Which lifetime of its topic this room is, unique within the hub: the budget queue's
    /// entries name it, so a freed and recreated topic never loses history to an older entry.
    pub life: u64,
    /// The last assigned seq (0: none yet).
    pub seq: u64,
    history: VecDeque<Stored>,
    history_bytes: usize,
    /// Subscribers (and presence: the listed ones), by connection id.
    members: HashMap<u64, Member>,
    listed: usize,
    /// Redis mode: the members of the other nodes (and other shards' lives), by owner and
    /// connection, as Redis announced them.
    pub remote: HashMap<(Arc<str>, u64), Member>,
    /// Subscriptions per shard.
    shards: Vec<u32>,
    /// Subscribers that take the shared compressed frame.
    pub shared_deflate: u32,
}

impl Room {
    pub fn new(life: u64, epoch: Arc<str>, shards: usize) -> Room {
        Room {
            life,
            epoch,
            seq: 0,
            history: VecDeque::new(),
            history_bytes: 0,
            members: HashMap::new(),
            listed: 0,
            remote: HashMap::new(),
            shards: vec![0; shards],
            shared_deflate: 0,
        }
    }

    /// Assigns the next seq.
    pub fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    /// Keeps `entry` in history, at most `cap` entries; returns the bytes freed by entries
    /// that fell out (the caller accounts for `entry.size()` itself).
    pub fn record(&mut self, entry: Stored, cap: usize) -> usize {
        if cap == 0 {
            return 0;
        }
        self.history_bytes += entry.size();
        self.history.push_back(entry);
        let mut freed = 0;
        while self.history.len() > cap {
            freed += self.pop_oldest().unwrap_or(0);
        }
        freed
    }

    /// Drops the oldest history entry; returns its size.
    pub fn pop_oldest(&mut self) -> Option<usize> {
        let e = self.history.pop_front()?;
        self.history_bytes -= e.size();
        Some(e.size())
    }

    /// Seq of the oldest entry in history.
    pub fn oldest(&self) -> Option<&Stored> {
        self.history.front()
    }

    /// Drops entries older than `ttl` at `now`; returns the bytes freed.
    pub fn expire(&mut self, now: Instant, ttl: Duration) -> usize {
        let mut freed = 0;
        while self
            .history
            .front()
            .is_some_and(|e| now.saturating_duration_since(e.at) > ttl)
        {
            freed += self.pop_oldest().unwrap_or(0);
        }
        freed
    }

    /// Messages in history.
    pub fn history_len(&self) -> usize {
        self.history.len()
    }

    pub fn history_bytes(&self) -> usize {
        self.history_bytes
    }

    /// What a subscriber that saw everything up to `since` (in `epoch`) has missed.
    pub fn recover(&self, since: Option<u64>, epoch: Option<&str>) -> Recovery {
        let Some(since) = since else {
            return Recovery::NotAsked;
        };
        if epoch.is_some_and(|e| e != &*self.epoch) || since > self.seq {
            return Recovery::Lost;
        }
        if since == self.seq {
            return Recovery::Replay(Vec::new());
        }
        match self.history.front() {
            Some(first) if first.seq <= since + 1 => Recovery::Replay(
                self.history
                    .iter()
                    .filter(|e| e.seq > since)
                    .map(|e| e.seq)
                    .collect(),
            ),
            _ => Recovery::Lost,
        }
    }

    /// The history entries with `seq > since`, the last `limit` of them.
    pub fn history_after(&self, since: u64, limit: usize) -> impl Iterator<Item = &Stored> {
        let after = self.history.iter().filter(move |e| e.seq > since).count();
        self.history
            .iter()
            .filter(move |e| e.seq > since)
            .skip(after.saturating_sub(limit))
    }

    /// The stored entry for `seq`.
    pub fn stored(&self, seq: u64) -> Option<&Stored> {
        let first = self.history.front()?.seq;
        let i = usize::try_from(seq.checked_sub(first)?).ok()?;
        self.history.get(i).filter(|e| e.seq == seq)
    }

    /// Adds a subscription on `shard`; the member joins presence. False when the member was
    /// already present (a repeated subscribe).
    pub fn join(&mut self, shard: usize, conn: u64, member: Member, shared_deflate: bool) -> bool {
        if self.members.contains_key(&conn) {
            return false;
        }
        self.listed += usize::from(member.listed);
        self.members.insert(conn, member);
        if let Some(n) = self.shards.get_mut(shard) {
            *n += 1;
        }
        self.shared_deflate += u32::from(shared_deflate);
        true
    }

    /// Removes a subscription; returns the member that left, once.
    pub fn leave(&mut self, shard: usize, conn: u64, shared_deflate: bool) -> Option<Member> {
        let m = self.members.remove(&conn)?;
        self.listed -= usize::from(m.listed);
        if let Some(n) = self.shards.get_mut(shard) {
            *n = n.saturating_sub(1);
        }
        self.shared_deflate = self
            .shared_deflate
            .saturating_sub(u32::from(shared_deflate));
        Some(m)
    }

    /// Presence: the listed members, this node's and the others'.
    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members
            .values()
            .filter(|m| m.listed)
            .chain(self.remote.values())
    }

    /// How many [`members`](Self::members) there are.
    pub fn member_count(&self) -> usize {
        self.listed + self.remote.len()
    }

    /// This node's listed members, by connection id.
    pub fn listed(&self) -> impl Iterator<Item = (u64, &Member)> {
        self.members
            .iter()
            .filter(|(_, m)| m.listed)
            .map(|(c, m)| (*c, m))
    }

    /// This node's subscribers, listed or not.
    pub fn subscribers(&self) -> usize {
        self.members.len()
    }

    /// Shards with at least one subscriber.
    pub fn subscriber_shards(&self) -> impl Iterator<Item = usize> + '_ {
        self.shards
            .iter()
            .enumerate()
            .filter(|(_, n)| **n > 0)
            .map(|(i, _)| i)
    }

    /// Nothing left worth keeping: no subscriber and no history.
    pub fn is_idle(&self) -> bool {
        self.members.is_empty() && self.history.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn msg(seq: u64, at: Instant) -> Stored {
        Stored {
            seq,
            at,
            msg: Broadcast {
                frame: Bytes::from(vec![0u8; 36]),
                deflated: None,
            },
        }
    }

    fn room_with(n: u64, cap: usize, at: Instant) -> Room {
        let mut r = Room::new(1, "e1".into(), 2);
        for _ in 0..n {
            let seq = r.next_seq();
            r.record(msg(seq, at), cap);
        }
        r
    }

    #[test]
    fn recovery_replays_exactly_the_missed_messages() {
        let r = room_with(10, 100, Instant::now());
        assert_eq!(r.recover(None, None), Recovery::NotAsked);
        assert_eq!(
            r.recover(Some(7), Some("e1")),
            Recovery::Replay(vec![8, 9, 10])
        );
        assert_eq!(
            r.recover(Some(0), None),
            Recovery::Replay((1..=10).collect())
        );
        assert_eq!(r.recover(Some(10), Some("e1")), Recovery::Replay(vec![]));
        // From the future, or another epoch: lost.
        assert_eq!(r.recover(Some(11), None), Recovery::Lost);
        assert_eq!(r.recover(Some(7), Some("e0")), Recovery::Lost);
    }

    #[test]
    fn recovery_is_lost_once_history_no_longer_reaches_back() {
        let r = room_with(10, 4, Instant::now());
        assert_eq!(r.oldest().map(|e| e.seq), Some(7));
        assert_eq!(
            r.recover(Some(6), None),
            Recovery::Replay(vec![7, 8, 9, 10])
        );
        assert_eq!(r.recover(Some(5), None), Recovery::Lost);
        assert_eq!(r.stored(8).map(|e| e.seq), Some(8));
        assert!(r.stored(3).is_none());
    }

    #[test]
    fn expiry_and_byte_accounting() {
        let t0 = Instant::now();
        let mut r = room_with(3, 100, t0);
        let later = t0 + Duration::from_secs(10);
        let seq = r.next_seq();
        r.record(msg(seq, later), 100);
        let per = msg(0, t0).size();
        assert_eq!(r.history_bytes(), 4 * per);
        // At t0 + 15 s with a 10 s TTL the first three are too old, the fourth is not.
        let ttl = Duration::from_secs(10);
        assert_eq!(r.expire(t0 + Duration::from_secs(15), ttl), 3 * per);
        assert_eq!(r.history_bytes(), per);
        assert_eq!(r.recover(Some(2), None), Recovery::Lost);
        assert_eq!(r.recover(Some(3), None), Recovery::Replay(vec![4]));
    }

    #[test]
    fn history_after_takes_the_last_limit() {
        let r = room_with(10, 100, Instant::now());
        let seqs: Vec<u64> = r.history_after(2, 3).map(|e| e.seq).collect();
        assert_eq!(seqs, vec![8, 9, 10]);
        let seqs: Vec<u64> = r.history_after(8, 100).map(|e| e.seq).collect();
        assert_eq!(seqs, vec![9, 10]);
    }

    #[test]
    fn presence_join_leave_once_and_shard_counts() {
        let mut r = Room::new(1, "e".into(), 2);
        let m = Member {
            client_id: "c1".into(),
            user: "u".into(),
            joined_at: 1.0,
            listed: true,
        };
        assert!(r.join(1, 7, m.clone(), true));
        assert!(!r.join(1, 7, m.clone(), true));
        assert_eq!(r.subscriber_shards().collect::<Vec<_>>(), vec![1]);
        assert_eq!(r.shared_deflate, 1);
        assert_eq!(r.leave(1, 7, true), Some(m));
        assert_eq!(r.leave(1, 7, true), None);
        assert_eq!(r.subscriber_shards().count(), 0);
        assert_eq!(r.shared_deflate, 0);
        assert!(r.is_idle());
    }
}
