//! The hub with `[cluster] engine = "redis"`: the home shard of a topic is this node's gateway
//! to Redis for it (docs/CLUSTER.md; what is stored where is in [`crate::cluster`]).
//!
//! - A publish becomes one script run in Redis, which assigns the seq cluster-wide, keeps the
//!   history and publishes the message; the hub acks with Redis's seq. It is not delivered
//!   here directly: it comes back on the topic's channel like everyone else's, so every node
//!   delivers every topic in one order. A volatile publish is a plain `PUBLISH` on the same
//!   channel: no seq, no history, in order with the others.
//! - While the node has subscribers of a topic, its room here is a mirror of the topic in
//!   Redis: the home shard follows the topic's channel, and the room holds Redis's epoch, seq,
//!   (a copy of) its history and the other nodes' presence members. Subscribes, recovery,
//!   history and presence then run on the mirror exactly as in memory mode; conflation holds
//!   this node's deliveries back. The first request for a topic not followed yet waits for
//!   the mirror: `SUBSCRIBE` and a read of the topic's state, on the one connection, so that
//!   the read covers every message before it and the channel every message after it.
//! - Presence: this shard's members are written to Redis under its owner name, and Redis
//!   announces each join and leave once on the topic's channel; every node (this one too)
//!   tells its subscribers from there. The shard heartbeats its owner name once every third
//!   of `presence_ttl`; whichever shard's heartbeat finds an owner past its deadline removes
//!   that owner's members and announces their leaves. A change Redis could not take marks the
//!   topic stale: its members are written whole when Redis can take it again, and all of them
//!   when a heartbeat finds this owner swept (or Redis emptied).
//! - Messages to users go on one channel that shard 0 of every node follows, and it hands
//!   them to each of its node's shards.
//! - When the connection to Redis fails, mirrors keep serving what they hold, publishes and
//!   requests that need Redis are answered `unavailable`, and once reconnected every mirror is
//!   followed and read again: messages missed meanwhile are delivered in order, and a new epoch
//!   (Redis lost the topic) replaces the mirror's history.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::room::{Member, Room, Stored};
use super::{epoch, proto, ApiAnswer, Held, Hub, HubMsg, Meta, Now, Payload, Publish, Reply};
use crate::cluster::config::{ClusterConfig, Endpoint};
use crate::cluster::{
    Command, Event, Keys, Message, PresenceChange, PresenceEntry, Pushed, Snapshot, Tag, UserMsg,
    Value,
};
use crate::error::Code;
use crate::metrics as m;
use crate::ws::frame::OpCode;
use crate::ws::mailbox::Broadcast;

/// The hub's Redis state.
pub struct Cluster {
    keys: Keys,
    /// This shard's name in Redis's presence (unique to this run): its members are
    /// `owner:conn` there.
    owner: Arc<str>,
    /// The link is connected.
    up: bool,
    /// Tagged commands awaiting their answer.
    in_flight: usize,
    max_pending: usize,
    /// Commands for the link, in order ([`Hub::poll_cluster`]).
    out: VecDeque<Command>,
    /// Who gets the ack of each publish in flight, and whether it is volatile.
    publishes: HashMap<u64, (Reply, bool)>,
    next_publish: u64,
    /// Topics whose state is being read, with the requests waiting for it.
    syncing: HashMap<Arc<str>, Vec<HubMsg>>,
    presence_ttl: Duration,
    /// When the next heartbeat is due.
    next_beat: Option<Instant>,
    /// Topics whose members in Redis may differ from this shard's: written whole when Redis
    /// can take it.
    stale: BTreeSet<Arc<str>>,
    /// This shard follows the users channel for its node.
    users: bool,
    /// Redis has answered a heartbeat of this owner: from then on, Redis not knowing it means
    /// it was swept or Redis lost its data.
    known: bool,
    /// On a Redis Cluster: the topics this shard has members of in Redis, each heartbeated on
    /// its own ([`Keys::presence_per_topic`]).
    present: BTreeSet<Arc<str>>,
}

impl Cluster {
    fn new(cfg: &ClusterConfig, owner: Arc<str>, users: bool) -> Cluster {
        let sharded = cfg
            .target()
            .is_ok_and(|t| matches!(t.endpoint, Endpoint::Cluster { .. }));
        Cluster {
            keys: Keys::new(&cfg.key_prefix, sharded),
            owner,
            up: false,
            in_flight: 0,
            max_pending: cfg.max_pending,
            out: VecDeque::new(),
            publishes: HashMap::new(),
            next_publish: 0,
            syncing: HashMap::new(),
            presence_ttl: cfg.presence_ttl(),
            next_beat: None,
            stale: BTreeSet::new(),
            users,
            known: false,
            present: BTreeSet::new(),
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

    /// Queues a command for the keys (or channel) of `slot`.
    fn send(&mut self, tag: Option<Tag>, slot: u16, bytes: Vec<u8>) {
        self.in_flight += usize::from(tag.is_some());
        self.out.push_back(Command::new(tag, bytes, slot));
    }

    /// Follows `topic` and reads it; `seen` is the epoch and seq of its mirror, if any.
    fn follow(&mut self, topic: &str, epoch: &str, seen: Option<(&str, u64)>) {
        let (sub, read) = self.keys.follow(topic, epoch, seen);
        let slot = self.keys.slot(topic);
        self.send(None, slot, sub);
        self.send(Some(Tag::Sync(topic.into())), slot, read);
    }

    fn unfollow(&mut self, topic: &str) {
        let bytes = self.keys.unfollow(topic);
        self.send(None, self.keys.slot(topic), bytes);
    }

    fn follow_users(&mut self) {
        let bytes = self.keys.follow_users();
        self.send(None, self.keys.users_slot(), bytes);
    }

    /// Heartbeats this owner (and writes `change`); due again a third of the TTL later. On a
    /// Redis Cluster each topic is heartbeated on its own, and a change heartbeats its topic
    /// only.
    fn presence(&mut self, at: Instant, change: Option<&PresenceChange>) {
        let ttl_ms = self.presence_ttl.as_millis() as u64;
        if !self.keys.presence_per_topic() {
            let bytes = self.keys.presence(&self.owner, ttl_ms, change);
            // One Redis only: the slot does not route it.
            self.send(
                Some(Tag::Presence(change.map(|c| c.topic.into()))),
                0,
                bytes,
            );
            self.next_beat = Some(at + self.presence_ttl / 3);
            return;
        }
        if let Some(change) = change {
            return self.presence_of_topic(ttl_ms, change);
        }
        let topics: Vec<Arc<str>> = self.present.iter().cloned().collect();
        for topic in &topics {
            let beat = PresenceChange {
                topic,
                replace: false,
                leave: &[],
                join: &[],
                known: true,
            };
            self.presence_of_topic(ttl_ms, &beat);
        }
        self.next_beat = Some(at + self.presence_ttl / 3);
    }

    fn presence_of_topic(&mut self, ttl_ms: u64, change: &PresenceChange) {
        let bytes = self.keys.presence(&self.owner, ttl_ms, Some(change));
        let tag = Tag::Presence(Some(change.topic.into()));
        self.send(Some(tag), self.keys.slot(change.topic), bytes);
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

/// A member as Redis holds it (written by [`proto::member`]).
#[derive(serde::Deserialize)]
struct MemberJson {
    client_id: String,
    user: String,
    joined_at: f64,
}

fn member_of(json: &[u8]) -> Option<Member> {
    let m: MemberJson = serde_json::from_slice(json).ok()?;
    Some(Member {
        client_id: m.client_id.into(),
        user: m.user.into(),
        joined_at: m.joined_at,
        listed: true,
    })
}

impl Hub {
    /// Carries the rooms over Redis: publishes go to Redis, and rooms mirror Redis's topics.
    pub fn with_redis(mut self, cfg: &ClusterConfig) -> Hub {
        // Life 0 is no room's: the owner name is this run's and shard's alone.
        let owner = epoch(self.epoch_seed, self.shard, 0);
        self.cluster = Some(Cluster::new(cfg, owner, self.shard == 0));
        self
    }

    /// In Redis mode, connections are named after their shard's owner name (see
    /// [`SharedHub::client_id`](super::SharedHub::client_id)).
    pub(super) fn client_id_prefix(&self) -> Option<Arc<str>> {
        self.cluster.as_ref().map(|c| c.owner.clone())
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
        c.follow(&topic, &fresh, None);
        c.syncing.insert(topic, vec![msg]);
    }

    /// Answers a request that needed Redis with `unavailable`.
    fn refuse(&mut self, now: Now, msg: HubMsg, why: &str) {
        let reply = match msg {
            HubMsg::Subscribe {
                topic,
                from,
                id,
                request,
                ..
            } => {
                let reply = Bytes::from(unavailable_text(why, id.as_deref()));
                let refused = HubMsg::SubscribeRefused {
                    topic,
                    conn: from.conn,
                    reply,
                    request,
                };
                return self.send(now, from.shard, refused);
            }
            HubMsg::History { reply, .. } | HubMsg::Presence { reply, .. } => reply,
            HubMsg::Publish { reply, .. } => reply,
            _ => return,
        };
        self.unavailable(now, reply, why);
    }

    pub(super) fn unavailable(&mut self, now: Now, reply: Reply, why: &str) {
        let id = match &reply {
            Reply::Conn { id, .. } => id.clone(),
            _ => None,
        };
        let text = unavailable_text(why, id.as_deref());
        self.answer(now, reply, text, ApiAnswer::Unavailable(why.into()));
    }

    /// A publish, in Redis mode: one script run (a plain `PUBLISH` when volatile); the ack
    /// follows Redis's answer.
    pub(super) fn redis_publish(&mut self, now: Now, topic: &str, p: &Publish, reply: Reply) {
        self.lives += 1;
        let fresh = epoch(self.epoch_seed, self.shard, self.lives);
        let (cap, ttl) = (self.cfg.history_size, self.cfg.history_ttl);
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        if let Some(why) = c.refusal() {
            return self.unavailable(now, reply, why);
        }
        let trace = p.trace.as_deref();
        tracing::debug!(
            topic,
            trace,
            volatile = p.volatile,
            "room message sent to Redis"
        );
        let slot = c.keys.slot(topic);
        let bytes = if p.volatile {
            let (msg, _) = p.encode(topic, None, now.wall);
            c.keys.publish_volatile(topic, &msg, trace)
        } else {
            let (head, tail, binary) = match &p.data {
                Payload::Json(data) => {
                    let from = p.from.as_deref();
                    let (head, tail) =
                        proto::room_message_around_seq(&p.kind, topic, data, from, now.wall, trace);
                    (head.into_bytes(), Bytes::from(tail), false)
                }
                Payload::Binary(data) => (proto::binary_head(topic, true, 0), data.clone(), true),
            };
            let m = Message {
                head: &head,
                tail: &tail,
                binary,
                trace,
            };
            let wall_ms = (now.wall * 1000.0) as u64;
            let ttl_ms = (ttl * 1000.0) as u64;
            c.keys.publish(topic, &m, wall_ms, cap, ttl_ms, &fresh)
        };
        c.next_publish += 1;
        c.publishes.insert(c.next_publish, (reply, p.volatile));
        c.send(Some(Tag::Publish(c.next_publish)), slot, bytes);
    }

    /// A message for users on every node, through Redis.
    pub(super) fn redis_to_users(&mut self, msg: UserMsg) -> Result<(), String> {
        let Some(c) = self.cluster.as_mut() else {
            return Ok(());
        };
        if let Some(why) = c.refusal() {
            ::metrics::counter!(m::CLUSTER_UNAVAILABLE).increment(1);
            return Err(why.into());
        }
        let bytes = c.keys.to_users(&msg);
        c.send(Some(Tag::ToUsers), c.keys.users_slot(), bytes);
        Ok(())
    }

    /// A member joined or left this node's room: written to Redis, which announces it; if
    /// Redis cannot take it now, the topic's members are written whole later.
    pub(super) fn redis_member_changed(
        &mut self,
        now: Now,
        topic: &Arc<str>,
        joined: bool,
        conn: u64,
        member: &Member,
    ) {
        let left_none = self
            .rooms
            .get(topic)
            .is_none_or(|r| r.listed().next().is_none());
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        if c.refusal().is_some() {
            c.stale.insert(topic.clone());
            return;
        }
        let (join, leave) = if joined {
            let json = proto::member(&member.client_id, &member.user, member.joined_at);
            (vec![(conn, json)], vec![])
        } else {
            (vec![], vec![conn])
        };
        let change = PresenceChange {
            topic,
            replace: false,
            leave: &leave,
            join: &join,
            known: c.present.contains(topic),
        };
        c.presence(now.at, Some(&change));
        if left_none {
            c.present.remove(topic);
        } else {
            c.present.insert(topic.clone());
        }
    }

    /// Writes the members of the stale topics whole, as long as Redis takes commands.
    fn rewrite_stale(&mut self, now: Now) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        while c.refusal().is_none() {
            let Some(topic) = c.stale.pop_first() else {
                break;
            };
            let join: Vec<(u64, String)> = self.rooms.get(&topic).map_or(Vec::new(), |r| {
                r.listed()
                    .map(|(conn, m)| (conn, proto::member(&m.client_id, &m.user, m.joined_at)))
                    .collect()
            });
            let change = PresenceChange {
                topic: &topic,
                replace: true,
                leave: &[],
                join: &join,
                known: false,
            };
            c.presence(now.at, Some(&change));
            if join.is_empty() {
                c.present.remove(&topic);
            } else {
                c.present.insert(topic);
            }
        }
    }

    /// From the once-a-second sweep: the heartbeat, when due, and stale topics' members.
    pub(super) fn cluster_tick(&mut self, now: Now) {
        let Some(c) = self.cluster.as_mut().filter(|c| c.up) else {
            return;
        };
        if c.next_beat.is_none_or(|due| due <= now.at) {
            c.presence(now.at, None);
        }
        self.rewrite_stale(now);
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
        if room.subscribers() > 0 || c.syncing.contains_key(topic) {
            return;
        }
        if c.up {
            c.unfollow(topic);
        }
        self.history_bytes -= room.history_bytes();
        self.history_len -= room.history_len();
        self.rooms.remove(topic);
    }

    /// What the link reports.
    pub fn handle_cluster(&mut self, now: Now, event: Event) {
        match event {
            Event::Up => {
                let mut topics = Vec::new();
                for (t, room) in &self.rooms {
                    self.lives += 1;
                    let fresh = epoch(self.epoch_seed, self.shard, self.lives);
                    topics.push((t.clone(), fresh, room.epoch.clone(), room.seq));
                }
                let Some(c) = self.cluster.as_mut() else {
                    return;
                };
                c.up = true;
                // First the heartbeat: no member of this owner is written before it is alive.
                c.presence(now.at, None);
                if c.users {
                    c.follow_users();
                }
                // A new connection follows nothing: follow and read every mirror again.
                for (t, fresh, seen, seq) in topics {
                    if !c.syncing.contains_key(&t) {
                        c.follow(&t, &fresh, Some((&seen, seq)));
                        c.syncing.insert(t, Vec::new());
                    }
                }
                self.rewrite_stale(now);
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
                    Tag::Presence(topic) => self.presence_written(now, topic, answer),
                    Tag::ToUsers => {
                        if let Err(e) = answer.and_then(|v| match v {
                            Value::Error(e) => Err(e),
                            _ => Ok(()),
                        }) {
                            tracing::warn!("a message to users through Redis failed: {e}");
                        }
                    }
                }
            }
            Event::Message { channel, payload } => self.pushed(now, &channel, &payload),
            Event::Unsubscribed(channel) => self.unsubscribed(&channel),
        }
    }

    /// Redis ended a subscription (on a Redis Cluster, its slot moved to another master):
    /// followed again, and a mirror read again, as after a reconnection.
    fn unsubscribed(&mut self, channel: &[u8]) {
        self.lives += 1;
        let fresh = epoch(self.epoch_seed, self.shard, self.lives);
        let Some(c) = self.cluster.as_mut().filter(|c| c.up) else {
            return;
        };
        if c.users && c.keys.is_users(channel) {
            return c.follow_users();
        }
        let Some((topic, room)) = c
            .keys
            .topic_of(channel)
            .and_then(|t| self.rooms.get_key_value(t))
        else {
            return;
        };
        if !c.syncing.contains_key(topic) {
            tracing::info!(%topic, "Redis ended the topic's subscription: following it again");
            c.follow(topic, &fresh, Some((&room.epoch, room.seq)));
            c.syncing.insert(topic.clone(), Vec::new());
        }
    }

    /// A pub/sub message: a topic's, or one for users.
    fn pushed(&mut self, now: Now, channel: &[u8], payload: &Bytes) {
        let Some(c) = self.cluster.as_ref() else {
            return;
        };
        if c.users && c.keys.is_users(channel) {
            match Keys::user_msg(payload) {
                Some(msg) => self.users_on_every_shard(now, &msg),
                None => tracing::warn!("a message on ringgate's users channel not written by it"),
            }
            return;
        }
        let Some(topic) = c.keys.topic_of(channel) else {
            return;
        };
        // A read in flight covers every message before its answer.
        if c.syncing.contains_key(topic) {
            return;
        }
        let Some(p) = Keys::pushed(payload) else {
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
        match p {
            Pushed::Message {
                epoch,
                seq,
                trace,
                msg,
            } => {
                if room.epoch != epoch {
                    // Redis lost the topic and it started again: so does the mirror.
                    self.restart_mirror(&topic, epoch, 0);
                }
                self.deliver_mirrored(now, &topic, seq, msg, now.at, trace);
            }
            Pushed::Volatile { trace, msg } => {
                let meta = Meta {
                    volatile: true,
                    trace,
                    ..Meta::default()
                };
                let frame = self.broadcast(&topic, &msg, self.opcode(&topic));
                self.fan_out_mirrored(now, &topic, &msg, frame, meta);
            }
            Pushed::Join(e) => self.presence_pushed(now, &topic, true, e),
            Pushed::Leave(e) => self.presence_pushed(now, &topic, false, e),
        }
    }

    /// A join or leave Redis announced: into the mirror's members (another owner's), and out
    /// to this node's subscribers but the member itself.
    fn presence_pushed(&mut self, now: Now, topic: &Arc<str>, joined: bool, e: PresenceEntry) {
        let Some(c) = self.cluster.as_ref() else {
            return;
        };
        let mine = e.owner == c.owner;
        let Some(member) = member_of(&e.json) else {
            tracing::warn!(%topic, "a presence member in Redis not written by ringgate");
            return;
        };
        let Some(room) = self.rooms.get_mut(topic) else {
            return;
        };
        let news = if mine {
            true
        } else if joined {
            room.remote
                .insert((e.owner, e.conn), member.clone())
                .is_none()
        } else {
            room.remote.remove(&(e.owner, e.conn)).is_some()
        };
        if news {
            let kind = if joined { "join" } else { "leave" };
            self.presence_event(now, topic, kind, &member, mine.then_some(e.conn));
        }
    }

    /// The answer to a heartbeat or a presence change. This owner missing from Redis's live
    /// owners (swept, or Redis emptied): every topic's members are written again.
    fn presence_written(
        &mut self,
        now: Now,
        topic: Option<Arc<str>>,
        answer: Result<Value, String>,
    ) {
        let Some(c) = self.cluster.as_mut() else {
            return;
        };
        let answer = answer.and_then(|v| Keys::presence_answer(&v));
        if answer.as_ref().is_ok_and(|a| a.more) {
            // Dead owners' members left to sweep: the next run at once.
            let beat = topic.as_ref().filter(|_| c.keys.presence_per_topic());
            match beat {
                Some(t) => {
                    let beat = PresenceChange {
                        topic: t,
                        replace: false,
                        leave: &[],
                        join: &[],
                        known: true,
                    };
                    c.presence(now.at, Some(&beat));
                }
                None => c.presence(now.at, None),
            }
        }
        match answer.map(|a| a.missing) {
            Ok(false) => c.known = true,
            Ok(true) if c.keys.presence_per_topic() => {
                tracing::warn!(
                    owner = %c.owner,
                    ?topic,
                    "Redis no longer knew this shard's presence in the topic (its heartbeats \
                     lapsed past presence_ttl, or Redis lost its data): writing its members again"
                );
                c.stale.extend(topic);
                self.rewrite_stale(now);
            }
            Ok(true) => {
                if std::mem::replace(&mut c.known, true) {
                    tracing::warn!(
                        owner = %c.owner,
                        "Redis no longer knew this shard's presence (its heartbeats lapsed past \
                         presence_ttl, or Redis lost its data): writing its members again"
                    );
                }
                c.stale.extend(self.rooms.keys().cloned());
                self.rewrite_stale(now);
            }
            Err(e) => {
                tracing::debug!(?topic, "writing presence to Redis failed: {e}");
                c.stale.extend(topic);
            }
        }
    }

    fn published(&mut self, now: Now, n: u64, answer: Result<Value, String>) {
        let Some((reply, volatile)) = self.cluster.as_mut().and_then(|c| c.publishes.remove(&n))
        else {
            return;
        };
        let seq = answer.and_then(|v| match v {
            Value::Error(e) => Err(e),
            _ if volatile => Ok(None),
            v => Keys::published(&v).map(Some),
        });
        match seq {
            Ok(seq) => {
                ::metrics::counter!(m::PUBLISHED).increment(1);
                self.ack_publish(now, reply, seq, false);
            }
            Err(e) => {
                tracing::warn!("publish through Redis failed: {e}");
                self.unavailable(now, reply, "the cluster's Redis did not take the publish");
            }
        }
    }

    /// A topic's state read: make or update its mirror, then serve the requests that waited.
    fn synced(&mut self, now: Now, topic: Arc<str>, answer: Result<Value, String>) {
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
                c.unfollow(&topic);
            }
        }
    }

    /// Makes the mirror of `topic` from `snap`, or brings it up to date.
    fn mirror(&mut self, now: Now, topic: &Arc<str>, snap: Snapshot) {
        let ttl_ms = (self.cfg.history_ttl * 1000.0) as u64;
        let wall_ms = (now.wall * 1000.0) as u64;
        let fresh = |e: &crate::cluster::Entry| wall_ms.saturating_sub(e.wall_ms) <= ttl_ms;
        let Some(same) = self.rooms.get(topic).map(|r| r.epoch == snap.epoch) else {
            // A new mirror: history and members only, nobody to deliver to yet.
            self.lives += 1;
            let mut room = Room::new(self.lives, snap.epoch.clone(), self.shards);
            room.seq = snap.seq;
            self.rooms.insert(topic.clone(), room);
            self.set_remote(now, topic, snap.members, false);
            let opcode = self.opcode(topic);
            for e in snap.history.into_iter().filter(fresh) {
                let stored = Stored {
                    seq: e.seq,
                    at: age(now, e.wall_ms),
                    msg: self.broadcast(topic, &e.msg, opcode),
                };
                self.keep(topic, stored);
            }
            return;
        };
        // Read again after a reconnection. A new epoch: Redis lost the topic, the mirror starts
        // over with it. Either way the subscribers get what was published meanwhile, in order,
        // and hear of who joined and left.
        self.set_remote(now, topic, snap.members, true);
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
            self.deliver_mirrored(now, topic, e.seq, e.msg, at, None);
        }
        if let Some(room) = self.rooms.get_mut(topic) {
            room.seq = room.seq.max(snap.seq);
        }
    }

    /// The mirror's members of other owners become `members`; with `announce`, this node's
    /// subscribers hear of each difference (what they missed while the node was cut off).
    fn set_remote(
        &mut self,
        now: Now,
        topic: &Arc<str>,
        members: Vec<PresenceEntry>,
        announce: bool,
    ) {
        let Some(c) = self.cluster.as_ref() else {
            return;
        };
        let remote: HashMap<(Arc<str>, u64), Member> = members
            .into_iter()
            .filter(|e| e.owner != c.owner)
            .filter_map(|e| Some(((e.owner, e.conn), member_of(&e.json)?)))
            .collect();
        let Some(room) = self.rooms.get_mut(topic) else {
            return;
        };
        let old = std::mem::replace(&mut room.remote, remote);
        if !announce {
            return;
        }
        let new = &room.remote;
        let left: Vec<Member> = old
            .iter()
            .filter(|(k, _)| !new.contains_key(*k))
            .map(|(_, m)| m.clone())
            .collect();
        let joined: Vec<Member> = new
            .iter()
            .filter(|(k, _)| !old.contains_key(*k))
            .map(|(_, m)| m.clone())
            .collect();
        for m in left {
            self.presence_event(now, topic, "leave", &m, None);
        }
        for m in joined {
            self.presence_event(now, topic, "join", &m, None);
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

    /// A topic's frames are binary when the topic is (the same `[[rooms.topic]]` on every
    /// node).
    fn opcode(&self, topic: &str) -> OpCode {
        if self.cfg.is_binary(topic) {
            OpCode::Binary
        } else {
            OpCode::Text
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
        at: Instant,
        trace: Option<Arc<str>>,
    ) {
        let frame = self.broadcast(topic, &msg, self.opcode(topic));
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
        let stored = Stored {
            seq,
            at,
            msg: frame.clone(),
        };
        self.keep(topic, stored);
        let meta = Meta {
            seq: Some(seq),
            trace,
            ..Meta::default()
        };
        self.fan_out_mirrored(now, topic, &msg, frame, meta);
    }

    /// A message from Redis (`msg`, framed as `frame`) out to this node's subscribers: now, or
    /// at the end of its topic's conflation window if one is open (the latest per key wins).
    fn fan_out_mirrored(
        &mut self,
        now: Now,
        topic: &Arc<str>,
        msg: &[u8],
        frame: Broadcast,
        meta: Meta,
    ) {
        let conflate = self.cfg.rule_for(topic).and_then(|r| {
            let key = r
                .conflate_key
                .as_deref()
                .and_then(|field| proto::message_conflate_key(msg, field));
            Some((r.conflate()?, key))
        });
        let held = Held::Delivery(frame, meta);
        let now_go = match conflate {
            None => Some(held),
            Some((interval, key)) => self.conflation.offer(topic, key, held, now.at, interval),
        };
        if let Some(Held::Delivery(frame, meta)) = now_go {
            self.deliver_mirrored_now(now, topic, frame, meta);
        }
    }

    /// `frame` to every shard with subscribers of the mirror.
    pub(super) fn deliver_mirrored_now(
        &mut self,
        now: Now,
        topic: &Arc<str>,
        frame: Broadcast,
        meta: Meta,
    ) {
        let Some(room) = self.rooms.get(topic) else {
            return;
        };
        let shards: Vec<usize> = room.subscriber_shards().collect();
        self.fan_out(now, topic, &shards, frame, meta);
    }
}

/// When a message written at `wall_ms` (Unix ms) was written, on the monotonic clock.
fn age(now: Now, wall_ms: u64) -> std::time::Instant {
    let ago = (now.wall - wall_ms as f64 / 1000.0).max(0.0);
    now.at
        .checked_sub(Duration::from_secs_f64(ago))
        .unwrap_or(now.at)
}

/// The `unavailable` error a request that needed Redis gets (and counts).
fn unavailable_text(why: &str, id: Option<&str>) -> String {
    ::metrics::counter!(m::CLUSTER_UNAVAILABLE).increment(1);
    proto::error(&proto::ClientError::new(Code::Unavailable, why), id)
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::cluster::Value;
    use crate::rooms::config::RoomsConfig;
    use crate::rooms::conn::RoomConn;
    use crate::rooms::tests::{conn, drain};
    use crate::ws::deflate;

    /// A one-shard hub on Redis configured by `cluster`.
    fn hub_with(rooms: RoomsConfig, cluster: &ClusterConfig) -> Hub {
        let tuning = deflate::Tuning {
            level: 1,
            threshold: 64,
        };
        Hub::new(0, 1, rooms, tuning, 1 << 20, 7).with_redis(cluster)
    }

    /// Without presence events, which most tests do not look at.
    fn quiet() -> RoomsConfig {
        RoomsConfig {
            presence_events: false,
            ..RoomsConfig::default()
        }
    }

    fn hub() -> Hub {
        hub_with(quiet(), &ClusterConfig::default())
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

    /// Connected: a heartbeat is sent and answered (this owner was alive); returns the
    /// commands sent.
    fn up(hub: &mut Hub) -> Vec<(Option<Tag>, String)> {
        hub.handle_cluster(now(), Event::Up);
        let cmds = sent(hub);
        assert!(
            cmds.iter().any(|c| c.0 == Some(Tag::Presence(None))),
            "{cmds:?}"
        );
        let alive = Event::Reply(
            Tag::Presence(None),
            Ok(Value::Array(vec![Value::Int(0), Value::Int(0)])),
        );
        hub.handle_cluster(now(), alive);
        cmds
    }

    fn msg(seq: u64) -> String {
        proto::room_message("message", "t", Some(seq), &seq.to_string(), None, 1.0, None)
    }

    fn push(hub: &mut Hub, epoch: &str, seq: u64) {
        let payload = format!("m\n{epoch}\n{seq}\n\n{}", msg(seq));
        hub.handle_cluster(
            now(),
            Event::Message {
                channel: Bytes::from_static(b"ringgate:{t}:c"),
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
            Value::Array(vec![]),
        ])
    }

    fn seqs(c: &RoomConn) -> Vec<u64> {
        drain(c).iter().filter_map(|m| m["seq"].as_u64()).collect()
    }

    #[test]
    fn a_mirror_follows_redis_exactly_through_reconnections_and_lost_state() {
        let mut hub = hub();
        up(&mut hub);
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
        assert!(
            up(&mut hub).iter().any(|c| c.0 == Some(t.clone())),
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
    fn on_a_redis_cluster_a_topic_whose_subscription_ended_is_followed_again() {
        let cluster = ClusterConfig {
            redis_url: "redis+cluster://127.0.0.1:7000".into(),
            ..ClusterConfig::default()
        };
        let mut hub = hub_with(quiet(), &cluster);
        hub.handle_cluster(now(), Event::Up);
        let cmds = sent(&mut hub);
        assert!(
            cmds.iter().all(|c| c.0.is_none()),
            "nothing to heartbeat without members: {cmds:?}"
        );
        let c = conn(&mut hub, 1);
        hub.subscribe(now(), &c, "t", None, None, None);
        let cmds = sent(&mut hub);
        assert!(cmds[0].1.contains("SSUBSCRIBE"), "{cmds:?}");
        let t = Tag::Sync("t".into());
        hub.handle_cluster(now(), Event::Reply(t.clone(), Ok(state("E", 1, &[1]))));
        assert_eq!(drain(&c)[0]["type"], "subscribed");
        // The member's join: the per-topic script, on the topic's own keys.
        let cmds = sent(&mut hub);
        assert_eq!(cmds.len(), 1, "{cmds:?}");
        assert_eq!(cmds[0].0, Some(Tag::Presence(Some("t".into()))));
        assert!(cmds[0].1.contains("ringgate:{t}:n"), "{cmds:?}");
        // The slot moved: the old master ended the subscription. Followed and read again.
        let channel = Bytes::from_static(b"ringgate:{t}:c");
        hub.handle_cluster(now(), Event::Unsubscribed(channel));
        let cmds = sent(&mut hub);
        assert!(cmds[0].1.contains("SSUBSCRIBE"), "{cmds:?}");
        assert_eq!(cmds[1].0, Some(t.clone()));
        push(&mut hub, "E", 3);
        hub.handle_cluster(now(), Event::Reply(t, Ok(state("E", 3, &[1, 2, 3]))));
        assert_eq!(seqs(&c), [2, 3], "what was published meanwhile, once");
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
        let cluster = ClusterConfig {
            max_pending: 2,
            ..ClusterConfig::default()
        };
        let mut hub = hub_with(RoomsConfig::default(), &cluster);
        up(&mut hub);
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

    /// A presence announcement on `t`'s channel.
    fn presence_push(hub: &mut Hub, kind: &str, field: &str, client: &str) {
        let payload = format!("{kind}\n{field}\n{}", proto::member(client, "u", 1.0));
        hub.handle_cluster(
            now(),
            Event::Message {
                channel: Bytes::from_static(b"ringgate:{t}:c"),
                payload: Bytes::from(payload),
            },
        );
    }

    /// The `client_id`s `hub` lists for `t`, sorted.
    fn listed(hub: &mut Hub) -> Vec<String> {
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let reply = Reply::Http(tx);
        hub.handle(
            now(),
            HubMsg::Presence {
                topic: "t".into(),
                reply,
            },
        );
        let Ok(ApiAnswer::Json(body)) = rx.try_recv() else {
            panic!("no presence answer")
        };
        let v: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        let mut ids: Vec<String> = v["members"]
            .as_array()
            .expect("members")
            .iter()
            .map(|m| m["client_id"].as_str().expect("id").to_string())
            .collect();
        ids.sort();
        ids
    }

    fn events(c: &RoomConn) -> Vec<(String, String)> {
        drain(c)
            .iter()
            .map(|m| {
                (
                    m["type"].as_str().unwrap_or("").into(),
                    m["client_id"].as_str().unwrap_or("").into(),
                )
            })
            .collect()
    }

    #[test]
    fn presence_mirrors_every_owner_and_rewrites_what_redis_missed() {
        let mut hub = hub_with(RoomsConfig::default(), &ClusterConfig::default());
        let owner = hub
            .cluster
            .as_ref()
            .map(|c| c.owner.clone())
            .expect("redis");
        up(&mut hub);
        let c1 = conn(&mut hub, 1);
        hub.subscribe(now(), &c1, "t", None, None, None);
        sent(&mut hub);
        // Another node's member was there before this node followed the topic.
        let mut state = state("E", 0, &[]);
        if let Value::Array(a) = &mut state {
            let json = proto::member("far", "u", 1.0);
            a[3] = Value::Array(vec![Value::Str("other:5".into()), Value::Str(json.into())]);
        }
        let t = Tag::Sync("t".into());
        hub.handle_cluster(now(), Event::Reply(t, Ok(state)));
        assert_eq!(drain(&c1)[0]["type"], "subscribed");
        let cmds = sent(&mut hub);
        assert_eq!(cmds.len(), 1, "{cmds:?}");
        assert_eq!(cmds[0].0, Some(Tag::Presence(Some("t".into()))));
        assert!(
            cmds[0].1.contains("\"client_id\":\"1\""),
            "the join: {cmds:?}"
        );
        assert_eq!(listed(&mut hub), ["1", "far"]);
        // Redis announces c1's own join: not to c1. Other owners' joins and leaves, once.
        presence_push(&mut hub, "j", &format!("{owner}:1"), "1");
        assert_eq!(events(&c1), []);
        presence_push(&mut hub, "j", "other:6", "near");
        presence_push(&mut hub, "j", "other:6", "near");
        presence_push(&mut hub, "l", "other:5", "far");
        presence_push(&mut hub, "l", "other:5", "far");
        let want = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        assert_eq!(events(&c1), want(&[("join", "near"), ("leave", "far")]));
        assert_eq!(listed(&mut hub), ["1", "near"]);
        presence_push(&mut hub, "j", "other:7", "{bad");
        // A leave Redis cannot take now is written with the topic's whole membership later.
        let c2 = conn(&mut hub, 2);
        hub.subscribe(now(), &c2, "t", None, None, None);
        sent(&mut hub);
        hub.handle_cluster(now(), Event::Down("gone".into()));
        hub.detach(now(), 2);
        assert!(sent(&mut hub).is_empty(), "nothing queued while down");
        let cmds = up(&mut hub);
        let rewrite: Vec<_> = cmds
            .iter()
            .filter(|c| c.0 == Some(Tag::Presence(Some("t".into()))))
            .collect();
        assert_eq!(rewrite.len(), 1, "{cmds:?}");
        assert!(
            rewrite[0].1.contains("\"client_id\":\"1\"")
                && !rewrite[0].1.contains("\"client_id\":\"2\""),
            "{rewrite:?}"
        );
        // A heartbeat that finds this owner swept (or Redis emptied) rewrites every topic.
        let swept = Event::Reply(
            Tag::Presence(None),
            Ok(Value::Array(vec![Value::Int(1), Value::Int(0)])),
        );
        hub.handle_cluster(now(), swept);
        let cmds = sent(&mut hub);
        assert_eq!(cmds.len(), 1, "{cmds:?}");
        assert_eq!(cmds[0].0, Some(Tag::Presence(Some("t".into()))));
    }
}
