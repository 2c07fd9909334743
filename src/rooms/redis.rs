//! The hub with `[cluster] engine = "redis"`: the home shard of a topic is this node's gateway
//! to Redis for it (docs/CLUSTER.md; what is stored where is in [`crate::cluster`]).
//!
//! - A publish becomes one script run in Redis, which assigns the seq cluster-wide, keeps the
//!   history and publishes the message; the hub acks with Redis's seq. It is not delivered
//!   here directly: it comes back on the topic's channel like everyone else's, so every node
//!   delivers every topic in one order.
//! - While the node has subscribers of a topic, its room here is a mirror of the topic in
//!   Redis: the home shard follows the topic's channel, and the room holds Redis's epoch, seq
//!   and (a copy of) its history. Subscribes, recovery, history and presence then run on the
//!   mirror exactly as in memory mode. The first request for a topic not followed yet waits for
//!   the mirror: `SUBSCRIBE` and a read of the topic's state, on the one connection, so that
//!   the read covers every message before it and the channel every message after it.
//! - When the connection to Redis fails, mirrors keep serving what they hold, publishes and
//!   requests that need Redis are answered `unavailable`, and once reconnected every mirror is
//!   followed and read again: messages missed meanwhile are delivered in order, and a new epoch
//!   (Redis lost the topic) replaces the mirror's history.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use super::room::{Room, Stored};
use super::{epoch, frame, proto, ApiAnswer, Hub, HubMsg, Meta, Now, Reply};
use crate::cluster::config::ClusterConfig;
use crate::cluster::{Command, Event, Keys, Snapshot, Tag};
use crate::error::Code;
use crate::metrics as m;
use crate::ws::deflate;
use crate::ws::frame::OpCode;
use crate::ws::mailbox::Broadcast;

/// The hub's Redis state.
pub struct Cluster {
    keys: Keys,
    /// The link is connected.
    up: bool,
    /// Tagged commands awaiting their answer.
    in_flight: usize,
    max_pending: usize,
    /// Commands for the link, in order ([`Hub::poll_cluster`]).
    out: VecDeque<Command>,
    /// Who gets the ack of each publish in flight.
    publishes: HashMap<u64, Reply>,
    next_publish: u64,
    /// Topics whose state is being read, with the requests waiting for it.
    syncing: HashMap<Arc<str>, Vec<HubMsg>>,
}

impl Cluster {
    pub fn new(cfg: &ClusterConfig) -> Cluster {
        Cluster {
            keys: Keys::new(&cfg.key_prefix),
            up: false,
            in_flight: 0,
            max_pending: cfg.max_pending,
            out: VecDeque::new(),
            publishes: HashMap::new(),
            next_publish: 0,
            syncing: HashMap::new(),
        }
    }

    /// Why Redis cannot take a command now, if it cannot.
    fn refusal(&self) -> Option<&'static str> {
        if !self.up {
            Some("the cluster's Redis is unavailable")
        } else if self.in_flight >= self.max_pending {
            Some("the cluster's Redis is too slow (max_pending reached)")
        } else {
            None
        }
    }

    fn follow(&mut self, topic: &str, epoch: &str) {
        let (sub, read) = self.keys.follow(topic, epoch);
        self.out.push_back(Command {
            tag: None,
            bytes: sub,
        });
        self.out.push_back(Command {
            tag: Some(Tag::Sync(topic.into())),
            bytes: read,
        });
        self.in_flight += 1;
    }
}

fn topic_of(msg: &HubMsg) -> Option<&Arc<str>> {
    match msg {
        HubMsg::Subscribe { topic, .. }
        | HubMsg::History { topic, .. }
        | HubMsg::Presence { topic, .. } => Some(topic),
        _ => None,
    }
}

impl Hub {
    /// Carries the rooms over Redis: publishes go to Redis, and rooms mirror Redis's topics.
    pub fn with_redis(mut self, cfg: &ClusterConfig) -> Hub {
        self.cluster = Some(Cluster::new(cfg));
        self
    }

    /// The next command for Redis. The driver sends them in this order after each call.
    pub fn poll_cluster(&mut self) -> Option<Command> {
        self.cluster.as_mut()?.out.pop_front()
    }

    /// Whether `msg` needs its topic's mirror first (a subscribe, history or presence request
    /// for a topic this node does not follow yet).
    pub(super) fn needs_mirror(&self, msg: &HubMsg) -> bool {
        self.cluster.is_some() && topic_of(msg).is_some_and(|t| !self.rooms.contains_key(t))
    }

    /// Holds `msg` until its topic's mirror is made (following the topic if nobody asked yet).
    pub(super) fn wait_for_mirror(&mut self, now: Now, msg: HubMsg) {
        let Some(topic) = topic_of(&msg).cloned() else {
            return;
        };
        self.lives += 1;
        let fresh = epoch(self.epoch_seed, self.shard, self.lives);
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        if let Some(waiting) = c.syncing.get_mut(&topic) {
            waiting.push(msg);
            return;
        }
        if let Some(why) = c.refusal() {
            return self.refuse(now, msg, why);
        }
        c.follow(&topic, &fresh);
        c.syncing.insert(topic, vec![msg]);
    }

    /// Answers a request that needed Redis with `unavailable`.
    fn refuse(&mut self, now: Now, msg: HubMsg, why: &str) {
        let reply = match msg {
            HubMsg::Subscribe { from, id, .. } => Reply::Conn { to: from, id },
            HubMsg::History { reply, .. } | HubMsg::Presence { reply, .. } => reply,
            HubMsg::Publish { reply, .. } => reply,
            _ => return,
        };
        self.unavailable(now, reply, why);
    }

    pub(super) fn unavailable(&mut self, now: Now, reply: Reply, why: &str) {
        ::metrics::counter!(m::CLUSTER_UNAVAILABLE).increment(1);
        let id = match &reply {
            Reply::Conn { id, .. } => id.clone(),
            _ => None,
        };
        let text = proto::error(
            &proto::ClientError::new(Code::Unavailable, why),
            id.as_deref(),
        );
        self.answer(now, reply, text, ApiAnswer::Unavailable(why.into()));
    }

    /// A publish, in Redis mode: one script run; the ack follows Redis's answer.
    pub(super) fn redis_publish(
        &mut self,
        now: Now,
        topic: &str,
        kind: &str,
        data: &str,
        from: Option<&str>,
        reply: Reply,
    ) {
        self.lives += 1;
        let fresh = epoch(self.epoch_seed, self.shard, self.lives);
        let (cap, ttl) = (self.cfg.history_size, self.cfg.history_ttl);
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        if let Some(why) = c.refusal() {
            return self.unavailable(now, reply, why);
        }
        let (head, tail) = proto::room_message_around_seq(kind, topic, data, from, now.wall);
        let wall_ms = (now.wall * 1000.0) as u64;
        let ttl_ms = (ttl * 1000.0) as u64;
        let bytes = c
            .keys
            .publish(topic, &head, &tail, wall_ms, cap, ttl_ms, &fresh);
        c.next_publish += 1;
        c.publishes.insert(c.next_publish, reply);
        c.out.push_back(Command {
            tag: Some(Tag::Publish(c.next_publish)),
            bytes,
        });
        c.in_flight += 1;
    }

    /// In Redis mode a room is a mirror: it goes when its last subscriber does (history stays
    /// in Redis), unless requests wait for it.
    pub(super) fn release_if_unused(&mut self, topic: &Arc<str>) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        let Some(room) = self.rooms.get(topic) else {
            return;
        };
        if room.member_count() > 0 || c.syncing.contains_key(topic) {
            return;
        }
        if c.up {
            c.out.push_back(Command {
                tag: None,
                bytes: c.keys.unfollow(topic),
            });
        }
        self.history_bytes -= room.history_bytes();
        self.history_len -= room.history_len();
        self.rooms.remove(topic);
    }

    /// What the link reports.
    pub fn handle_cluster(&mut self, now: Now, event: Event) {
        match event {
            Event::Up => {
                let mut topics: Vec<(Arc<str>, Arc<str>)> = Vec::new();
                for t in self.rooms.keys() {
                    self.lives += 1;
                    topics.push((t.clone(), epoch(self.epoch_seed, self.shard, self.lives)));
                }
                let Some(c) = self.cluster.as_mut() else {
                    return;
                };
                c.up = true;
                // A new connection follows nothing: follow and read every mirror again.
                for (t, fresh) in topics {
                    if !c.syncing.contains_key(&t) {
                        c.follow(&t, &fresh);
                        c.syncing.insert(t, Vec::new());
                    }
                }
            }
            Event::Down(_) => {
                if let Some(c) = self.cluster.as_mut() {
                    c.up = false;
                }
            }
            Event::Reply(tag, answer) => {
                if let Some(c) = self.cluster.as_mut() {
                    c.in_flight = c.in_flight.saturating_sub(1);
                }
                match tag {
                    Tag::Publish(n) => self.published(now, n, answer),
                    Tag::Sync(topic) => self.synced(now, topic, answer),
                }
            }
            Event::Message { channel, payload } => {
                let Some(c) = self.cluster.as_ref() else {
                    return;
                };
                let Some(topic) = c.keys.topic_of(&channel) else {
                    return;
                };
                // A read in flight covers every message before its answer.
                if c.syncing.contains_key(topic) {
                    return;
                }
                let Some(p) = Keys::message(&payload) else {
                    tracing::warn!(
                        topic,
                        "a message on a ringgate channel not written by ringgate"
                    );
                    return;
                };
                let Some((topic, room)) = self.rooms.get_key_value(topic) else {
                    return;
                };
                let topic = topic.clone();
                if room.epoch != p.epoch {
                    // Redis lost the topic and it started again: so does the mirror.
                    self.restart_mirror(&topic, p.epoch, 0);
                }
                self.deliver_mirrored(now, &topic, p.seq, p.msg, now.at);
            }
        }
    }

    fn published(&mut self, now: Now, n: u64, answer: Result<crate::cluster::Value, String>) {
        let Some(reply) = self.cluster.as_mut().and_then(|c| c.publishes.remove(&n)) else {
            return;
        };
        match answer.and_then(|v| Keys::published(&v)) {
            Ok(seq) => {
                ::metrics::counter!(m::PUBLISHED).increment(1);
                let ack = match &reply {
                    Reply::Conn { id: Some(id), .. } => proto::ack(id, seq),
                    Reply::Conn { id: None, .. } | Reply::None => return,
                    Reply::Http(_) => String::new(),
                };
                self.answer(now, reply, ack, ApiAnswer::Published { seq });
            }
            Err(e) => {
                tracing::warn!("publish through Redis failed: {e}");
                self.unavailable(now, reply, "the cluster's Redis did not take the publish");
            }
        }
    }

    /// A topic's state read: make or update its mirror, then serve the requests that waited.
    fn synced(&mut self, now: Now, topic: Arc<str>, answer: Result<crate::cluster::Value, String>) {
        let waiting = match answer.and_then(|v| Keys::snapshot(&v)) {
            Ok(snap) => {
                self.mirror(now, &topic, snap);
                let waiting = self.cluster.as_mut().and_then(|c| c.syncing.remove(&topic));
                // The room exists now: the requests take the ordinary path.
                for msg in waiting.unwrap_or_default() {
                    self.handle(now, msg);
                }
                self.release_if_unused(&topic);
                return;
            }
            Err(e) => {
                tracing::warn!(%topic, "reading a topic from Redis failed: {e}");
                self.cluster.as_mut().and_then(|c| c.syncing.remove(&topic))
            }
        };
        for msg in waiting.unwrap_or_default() {
            self.refuse(now, msg, "the cluster's Redis is unavailable");
        }
        if !self.rooms.contains_key(&topic) {
            if let Some(c) = self.cluster.as_mut().filter(|c| c.up) {
                c.out.push_back(Command {
                    tag: None,
                    bytes: c.keys.unfollow(&topic),
                });
            }
        }
    }

    /// Makes the mirror of `topic` from `snap`, or brings it up to date.
    fn mirror(&mut self, now: Now, topic: &Arc<str>, snap: Snapshot) {
        let ttl_ms = (self.cfg.history_ttl * 1000.0) as u64;
        let wall_ms = (now.wall * 1000.0) as u64;
        let fresh = |e: &crate::cluster::Entry| wall_ms.saturating_sub(e.wall_ms) <= ttl_ms;
        let Some(same) = self.rooms.get(topic).map(|r| r.epoch == snap.epoch) else {
            // A new mirror: history only, nobody to deliver to yet.
            self.lives += 1;
            let mut room = Room::new(self.lives, snap.epoch.clone(), self.shards);
            room.seq = snap.seq;
            self.rooms.insert(topic.clone(), room);
            for e in snap.history.into_iter().filter(fresh) {
                let stored = Stored {
                    seq: e.seq,
                    at: age(now, e.wall_ms),
                    msg: self.broadcast(topic, &e.msg),
                };
                self.keep(topic, stored);
            }
            return;
        };
        // Read again after a reconnection. A new epoch: Redis lost the topic, the mirror starts
        // over with it. Either way the subscribers get what was published meanwhile, in order.
        if !same {
            self.restart_mirror(topic, snap.epoch.clone(), 0);
        }
        let last = self.rooms.get(topic).map_or(0, |r| r.seq);
        if snap.history.first().is_some_and(|e| e.seq > last + 1) {
            tracing::warn!(%topic, "messages published while Redis was unreachable from here fell out of history");
        }
        for e in snap
            .history
            .into_iter()
            .filter(|e| e.seq > last)
            .filter(fresh)
        {
            let at = age(now, e.wall_ms);
            self.deliver_mirrored(now, topic, e.seq, e.msg, at);
        }
        if let Some(room) = self.rooms.get_mut(topic) {
            room.seq = room.seq.max(snap.seq);
        }
    }

    /// The topic's state in Redis was lost: the mirror forgets its history and takes the new
    /// epoch and seq.
    fn restart_mirror(&mut self, topic: &Arc<str>, epoch: Arc<str>, seq: u64) {
        let Some(room) = self.rooms.get_mut(topic) else {
            return;
        };
        while let Some(freed) = room.pop_oldest() {
            self.history_bytes -= freed;
            self.history_len -= 1;
        }
        room.epoch = epoch;
        room.seq = seq;
    }

    /// The frame of `msg` for the room's subscribers (and its compressed form once, when some
    /// take it).
    fn broadcast(&self, topic: &Arc<str>, msg: &[u8]) -> Broadcast {
        let shared = self.rooms.get(topic).is_some_and(|r| r.shared_deflate > 0);
        Broadcast {
            frame: frame(OpCode::Text, msg),
            deflated: if shared {
                deflate::conn::shared_frame(msg, self.tuning, OpCode::Text)
            } else {
                None
            },
        }
    }

    /// A message of a followed topic: into the mirror's history and out to its subscribers,
    /// once, in seq order.
    fn deliver_mirrored(
        &mut self,
        now: Now,
        topic: &Arc<str>,
        seq: u64,
        msg: Bytes,
        at: std::time::Instant,
    ) {
        let msg = self.broadcast(topic, &msg);
        let Some(room) = self.rooms.get_mut(topic) else {
            return;
        };
        if seq <= room.seq {
            return; // covered by the read that made the mirror
        }
        if seq != room.seq + 1 {
            tracing::warn!(%topic, after = room.seq, seq, "a gap in a topic's messages from Redis");
        }
        room.seq = seq;
        let shards: Vec<usize> = room.subscriber_shards().collect();
        self.keep(
            topic,
            Stored {
                seq,
                at,
                msg: msg.clone(),
            },
        );
        let meta = Meta {
            seq: Some(seq),
            ..Meta::default()
        };
        self.fan_out(now, topic, &shards, msg, meta);
    }
}

/// When a message written at `wall_ms` (Unix ms) was written, on the monotonic clock.
fn age(now: Now, wall_ms: u64) -> std::time::Instant {
    let ago = (now.wall - wall_ms as f64 / 1000.0).max(0.0);
    now.at
        .checked_sub(Duration::from_secs_f64(ago))
        .unwrap_or(now.at)
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::cluster::Value;
    use crate::rooms::config::RoomsConfig;
    use crate::rooms::conn::RoomConn;
    use crate::rooms::tests::{conn, drain};

    fn hub() -> Hub {
        let tuning = deflate::Tuning {
            level: 1,
            threshold: 64,
        };
        let rooms = RoomsConfig {
            presence_events: false,
            ..RoomsConfig::default()
        };
        Hub::new(0, 1, rooms, tuning, 1 << 20, 7).with_redis(&ClusterConfig::default())
    }

    fn now() -> Now {
        Now::system()
    }

    /// The commands the hub sent, as text, with their tags.
    fn sent(hub: &mut Hub) -> Vec<(Option<Tag>, String)> {
        std::iter::from_fn(|| hub.poll_cluster())
            .map(|c| (c.tag, String::from_utf8_lossy(&c.bytes).into_owned()))
            .collect()
    }

    fn msg(seq: u64) -> String {
        proto::room_message("message", "t", Some(seq), &seq.to_string(), None, 1.0, None)
    }

    fn push(hub: &mut Hub, epoch: &str, seq: u64) {
        let payload = format!("{epoch}\n{seq}\n{}", msg(seq));
        hub.handle_cluster(
            now(),
            Event::Message {
                channel: Bytes::from_static(b"ringgate:c:t"),
                payload: Bytes::from(payload),
            },
        );
    }

    fn state(epoch: &str, seq: u64, history: &[u64]) -> Value {
        let wall = (now().wall * 1000.0) as u64;
        let entries = history
            .iter()
            .map(|s| Value::Str(Bytes::from(format!("{s}\n{wall}\n{}", msg(*s)))))
            .collect();
        Value::Array(vec![
            Value::Int(seq as i64),
            Value::Str(Bytes::copy_from_slice(epoch.as_bytes())),
            Value::Array(entries),
        ])
    }

    fn seqs(c: &RoomConn) -> Vec<u64> {
        drain(c).iter().filter_map(|m| m["seq"].as_u64()).collect()
    }

    #[test]
    fn a_mirror_follows_redis_exactly_through_reconnections_and_lost_state() {
        let mut hub = hub();
        hub.handle_cluster(now(), Event::Up);
        let c = conn(&mut hub, 1);
        hub.subscribe(now(), &c, "t", Some(1), Some("E"), Some("1".into()));
        let cmds = sent(&mut hub);
        assert!(
            cmds[0].0.is_none() && cmds[0].1.contains("SUBSCRIBE"),
            "{cmds:?}"
        );
        assert_eq!(cmds[1].0, Some(Tag::Sync("t".into())));
        assert!(drain(&c).is_empty(), "the subscribe waits for the read");
        // Pushed before the read's answer: the read covers it.
        push(&mut hub, "E", 3);
        let t = Tag::Sync("t".into());
        hub.handle_cluster(now(), Event::Reply(t.clone(), Ok(state("E", 3, &[2, 3]))));
        let got = drain(&c);
        assert_eq!(
            (&got[0]["type"], &got[0]["recovered"]),
            (&"subscribed".into(), &true.into())
        );
        assert_eq!(
            got[1..]
                .iter()
                .map(|m| m["seq"].clone())
                .collect::<Vec<_>>(),
            [2, 3]
        );
        // Live, no duplicate.
        push(&mut hub, "E", 3);
        push(&mut hub, "E", 4);
        assert_eq!(seqs(&c), [4]);
        // Cut off while 5 and 6 were published; 7 arrives during the read again.
        hub.handle_cluster(now(), Event::Down("gone".into()));
        hub.handle_cluster(now(), Event::Up);
        assert_eq!(
            sent(&mut hub)[1].0,
            Some(t.clone()),
            "the mirror is read again"
        );
        push(&mut hub, "E", 7);
        hub.handle_cluster(
            now(),
            Event::Reply(t.clone(), Ok(state("E", 7, &[4, 5, 6, 7]))),
        );
        push(&mut hub, "E", 8);
        assert_eq!(seqs(&c), [5, 6, 7, 8]);
        // Redis lost the topic: a new epoch from seq 1, and the mirror follows it.
        push(&mut hub, "F", 1);
        assert_eq!(seqs(&c), [1]);
        let c2 = conn(&mut hub, 2);
        hub.subscribe(now(), &c2, "t", Some(8), Some("E"), None);
        let r = &drain(&c2)[0];
        assert_eq!(
            (&r["recovered"], &r["epoch"]),
            (&false.into(), &"F".into()),
            "{r}"
        );
    }

    #[test]
    fn without_redis_requests_are_refused_and_nothing_is_queued() {
        let mut hub = hub();
        let c = conn(&mut hub, 1);
        hub.subscribe(now(), &c, "t", None, None, Some("1".into()));
        hub.route(
            now(),
            "t",
            HubMsg::Publish {
                topic: "t".into(),
                kind: "message".into(),
                data: "1".into(),
                from: None,
                reply: Reply::Conn {
                    to: super::super::ConnRef { shard: 0, conn: 1 },
                    id: Some("2".into()),
                },
                opts: Default::default(),
            },
        );
        let got = drain(&c);
        let codes: Vec<_> = got
            .iter()
            .map(|m| (m["code"].clone(), m["id"].clone()))
            .collect();
        assert_eq!(
            codes,
            [
                ("unavailable".into(), 1.into()),
                ("unavailable".into(), 2.into())
            ]
        );
        assert!(sent(&mut hub).is_empty());
    }

    #[test]
    fn past_max_pending_publishes_are_refused_until_answers_come() {
        let tuning = deflate::Tuning {
            level: 1,
            threshold: 64,
        };
        let cluster = ClusterConfig {
            max_pending: 2,
            ..ClusterConfig::default()
        };
        let mut hub =
            Hub::new(0, 1, RoomsConfig::default(), tuning, 1 << 20, 7).with_redis(&cluster);
        hub.handle_cluster(now(), Event::Up);
        let mut answers: Vec<_> = (0..3)
            .map(|_| {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let publish = HubMsg::Publish {
                    topic: "t".into(),
                    kind: "message".into(),
                    data: "1".into(),
                    from: None,
                    reply: Reply::Http(tx),
                    opts: Default::default(),
                };
                hub.handle(now(), publish);
                rx
            })
            .collect();
        assert_eq!(
            sent(&mut hub).len(),
            2,
            "one command per publish, two in flight"
        );
        assert!(matches!(
            answers[2].try_recv(),
            Ok(ApiAnswer::Unavailable(_))
        ));
        let answer = Value::Array(vec![Value::Int(1), Value::Str(Bytes::from_static(b"E"))]);
        hub.handle_cluster(now(), Event::Reply(Tag::Publish(1), Ok(answer)));
        assert_eq!(answers[0].try_recv(), Ok(ApiAnswer::Published { seq: 1 }));
        hub.handle_cluster(now(), Event::Reply(Tag::Publish(2), Err("gone".into())));
        assert!(matches!(
            answers[1].try_recv(),
            Ok(ApiAnswer::Unavailable(_))
        ));
    }
}
