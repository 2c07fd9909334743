//! Rooms: topics with ordered delivery, presence and history (docs/PROTOCOL.md `/ws`, `/api/*`).
//!
//! Every topic has a home shard (a hash of its name). The home shard alone assigns `seq`, keeps
//! history and presence, so ordering needs no lock. A publish on any shard goes to the home
//! shard, which encodes the frame once (and a compressed variant once, when some subscriber
//! takes it) and sends the shared bytes to each shard with subscribers; each of those queues it
//! for its own subscribers. Shards talk over their control channels ([`HubMsg`]); a message for
//! the shard itself is handled in place.
//!
//! Subscribing is atomic with respect to live messages without any lock: the subscriber's shard
//! asks the home shard, which answers with the `subscribed` reply and the replayed history; the
//! subscriber joins its shard's delivery list only when that answer arrives. Deliveries travel
//! the same FIFO channel as the answer, so everything before it was covered by the replay and
//! everything after it is live: no gap, no duplicate.
//!
//! The [`Hub`] is a state machine: the driver passes the time in ([`Now`]) and sends what it
//! returns ([`Hub::poll_transmit`], [`Hub::poll_timeout`]); it reads no clock and knows no
//! channel or task. Its only direct effects are local: queueing into this shard's connections'
//! mailboxes and answering `/api/*` requests' oneshots. [`SharedHub`] is how a shard's tasks
//! call it. docs/ARCHITECTURE.md ("The rooms hub as a state machine") has the ordering argument; `sim.rs` checks it.

pub mod config;
pub mod conflate;
pub mod conn;
pub mod proto;
mod redis;
pub mod room;
#[cfg(test)]
mod sim;

use std::cell::{OnceCell, RefCell};
use std::collections::hash_map::{DefaultHasher, Entry};
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use slab::Slab;
use tokio::sync::oneshot;

use crate::cluster::UserMsg;
use crate::error::Code;
use crate::metrics as m;
use crate::ws::close::CloseCode;
use crate::ws::connection::Close;
use crate::ws::deflate::{self, Tuning};
use crate::ws::frame::{header_len, write_frame, OpCode};
use crate::ws::handle::ConnHandle;
use crate::ws::mailbox::{Broadcast, Outgoing};
use conn::RoomConn;
use proto::ClientError;
use room::{Member, Recovery, Room, Stored};

/// The clocks at one input, read by the driver: the hub never reads a clock itself.
#[derive(Debug, Clone, Copy)]
pub struct Now {
    /// Monotonic: history TTL, publish latency, the write delay.
    pub at: Instant,
    /// Seconds since the Unix epoch: the timestamps clients read.
    pub wall: f64,
}

impl Now {
    /// The system's clocks now.
    pub fn system() -> Now {
        Now {
            at: Instant::now(),
            wall: proto::now(),
        }
    }
}

/// Which shard is home to `topic` (the same answer on every shard).
pub fn home_of(topic: &str, shards: usize) -> usize {
    let mut h = DefaultHasher::new();
    topic.hash(&mut h);
    (h.finish() % shards.max(1) as u64) as usize
}

/// Where a connection lives: its shard and its connection id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnRef {
    pub shard: usize,
    pub conn: u64,
}

/// Who gets the answer to a request handled on the home shard.
#[derive(Debug)]
pub enum Reply {
    /// Nobody (a publish without `id`).
    None,
    /// A WebSocket client; `id` is echoed (JSON text).
    Conn { to: ConnRef, id: Option<String> },
    /// An HTTP request of `/api/*`.
    Http(oneshot::Sender<ApiAnswer>),
}

/// The home shard's answer to an `/api/*` request.
#[derive(Debug, PartialEq, Eq)]
pub enum ApiAnswer {
    Published {
        seq: u64,
    },
    /// A JSON document.
    Json(String),
    /// Not done: a shard it needs is over its backlog (HTTP 503, retry).
    Overloaded,
    /// `[cluster] engine = "redis"` and Redis is down or too slow: why.
    Unavailable(String),
}

/// What a publish asks for beyond its topic and content.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PublishOpts {
    /// Volatile (no seq, no history) or not, as the publisher said; `None`: the topic's
    /// default (`[[rooms.topic]] volatile`).
    pub volatile: Option<bool>,
    /// The publisher's trace id: carried in every delivery and in the debug logs.
    pub trace: Option<Arc<str>>,
}

/// What the subscriber's shard knows of a delivery besides its bytes.
#[derive(Debug, Clone, Default)]
pub struct Meta {
    /// The room message's seq (none: volatile, or a presence event).
    pub seq: Option<u64>,
    /// Dropped rather than queued for a connection already behind (see [`Hub::handle`]).
    pub volatile: bool,
    pub trace: Option<Arc<str>>,
    /// A connection (on the receiving shard) not to deliver to: a member's own `join`.
    pub skip: Option<u64>,
}

/// What a publish carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// JSON text (the `data` of a JSON publish).
    Json(Box<str>),
    /// The opaque payload of a binary topic's message, relayed as it came.
    Binary(Bytes),
}

impl From<String> for Payload {
    fn from(s: String) -> Payload {
        Payload::Json(s.into())
    }
}

impl From<&str> for Payload {
    fn from(s: &str) -> Payload {
        Payload::Json(s.into())
    }
}

impl std::fmt::Display for Payload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Payload::Json(s) => f.write_str(s),
            Payload::Binary(b) => write!(f, "<{} bytes>", b.len()),
        }
    }
}

/// A publish taken by the home shard, until it is delivered (it may wait for its topic's
/// conflation window).
struct Publish {
    kind: Box<str>,
    data: Payload,
    from: Option<Arc<str>>,
    volatile: bool,
    trace: Option<Arc<str>>,
}

/// Messages between shards about rooms.
#[derive(Debug)]
pub enum HubMsg {
    // To a topic's home shard.
    Subscribe {
        topic: Arc<str>,
        from: ConnRef,
        member: Member,
        since: Option<u64>,
        epoch: Option<String>,
        id: Option<String>,
        shared_deflate: bool,
        /// Which subscribe of this connection this is (see [`conn::Sub::Pending`]).
        request: u64,
    },
    Unsubscribe {
        topic: Arc<str>,
        from: ConnRef,
        shared_deflate: bool,
    },
    Publish {
        topic: Arc<str>,
        kind: Box<str>,
        data: Payload,
        from: Option<Arc<str>>,
        reply: Reply,
        opts: PublishOpts,
    },
    Presence {
        topic: Arc<str>,
        reply: Reply,
    },
    History {
        topic: Arc<str>,
        since: u64,
        limit: usize,
        reply: Reply,
    },
    // To a subscriber's shard.
    /// The answer to `Subscribe`: the reply, then the replay, then live messages.
    Subscribed {
        topic: Arc<str>,
        conn: u64,
        reply: Bytes,
        replay: Vec<Broadcast>,
        request: u64,
    },
    /// A subscribe the home shard could not take (Redis mode, Redis unavailable): the error
    /// reply, and the pending subscription given up, so that the next subscribe is a first
    /// one again (with its own `since`/`epoch`).
    SubscribeRefused {
        topic: Arc<str>,
        conn: u64,
        reply: Bytes,
        request: u64,
    },
    /// A message for every subscriber of `topic` on the receiving shard.
    Deliver {
        topic: Arc<str>,
        msg: Broadcast,
        /// When the home shard took the publish (publish-to-queue latency).
        at: Instant,
        meta: Meta,
    },
    /// A reply for one connection (JSON text).
    Reply {
        conn: u64,
        text: Bytes,
    },
    // To every shard.
    /// A message (JSON text) for every connection of `user` on the receiving shard.
    ToUser {
        user: Arc<str>,
        text: Bytes,
    },
    /// Closes every connection of `user` on the receiving shard with `code`.
    Disconnect {
        user: Arc<str>,
        code: u16,
    },
}

impl Publish {
    /// The message as delivered, with `seq` (none: volatile), and its frame's opcode.
    fn encode(&self, topic: &str, seq: Option<u64>, wall: f64) -> (Vec<u8>, OpCode) {
        match &self.data {
            Payload::Json(data) => {
                let (from, trace) = (self.from.as_deref(), self.trace.as_deref());
                let text = proto::room_message(&self.kind, topic, seq, data, from, wall, trace);
                (text.into_bytes(), OpCode::Text)
            }
            Payload::Binary(data) => (proto::binary_message(topic, seq, data), OpCode::Binary),
        }
    }
}

/// What waits for a conflation window: a publish that will take its seq when it goes (memory
/// mode), or a message from Redis, encoded, for this node's subscribers (Redis mode).
enum Held {
    Publish(Publish),
    Delivery(Broadcast, Meta),
}

impl Held {
    fn into_publish(self) -> Option<Publish> {
        match self {
            Held::Publish(p) => Some(p),
            Held::Delivery(..) => None,
        }
    }
}

/// One history entry in the shard's recording order (the byte budget's queue).
struct Recorded {
    topic: Arc<str>,
    life: u64,
    seq: u64,
}

/// One shard's part of the rooms: the rooms homed here, and this shard's subscribers.
pub struct Hub {
    shard: usize,
    shards: usize,
    cfg: config::RoomsConfig,
    tuning: Tuning,
    /// `max_outbound_bytes`.
    limit: usize,
    /// Messages for other shards, in the order they were made (see [`Hub::poll_transmit`]).
    outbox: VecDeque<(usize, HubMsg)>,
    // Home side.
    rooms: HashMap<Arc<str>, Room>,
    /// History in the order it was recorded, over all rooms homed here, for the byte budget and
    /// TTL. Entries a room already dropped (its count cap) are skipped when met.
    recorded: VecDeque<Recorded>,
    history_bytes: usize,
    /// Messages in history over all rooms homed here.
    history_len: usize,
    history_budget: usize,
    /// Rooms created so far: each one's `life`.
    lives: u64,
    /// Makes epochs unique per process run (drawn by the driver).
    epoch_seed: u64,
    /// What waits for its topic's conflation window (`[[rooms.topic]] conflate`).
    conflation: conflate::Conflation<Held>,
    // Subscriber side.
    /// This shard's subscribers per topic.
    local: HashMap<Arc<str>, Slab<Rc<ConnHandle>>>,
    /// This shard's `/ws` connections, for replies by id.
    conns: HashMap<u64, Rc<RoomConn>>,
    /// This shard's connections of each authenticated user (the token's `sub`).
    users: HashMap<Arc<str>, Vec<u64>>,
    subscriptions: usize,
    /// Numbers this shard's subscribe requests.
    requests: u64,
    /// With `write_delay`: connections holding room messages not yet handed to their session.
    delayed: Vec<Rc<ConnHandle>>,
    /// When `delayed` is released: the earliest end of the write delays of the messages held.
    delay_due: Option<Instant>,
    /// Shards whose inbound queue is over `max_shard_backlog`, as the driver last saw it:
    /// requests that would add to one are answered `overloaded` instead of queued, so a shard
    /// that falls behind slows its publishers rather than growing memory or losing messages.
    congested: Vec<bool>,
    congested_count: usize,
    /// `[cluster] engine = "redis"`: rooms mirror Redis ([`Hub::with_redis`]).
    cluster: Option<redis::Cluster>,
}

impl Hub {
    /// The hub of shard `shard` of `shards`; `epoch_seed` makes its topics' epochs differ from
    /// those of any other run (the server draws it at random, a simulation fixes it).
    pub fn new(
        shard: usize,
        shards: usize,
        cfg: config::RoomsConfig,
        tuning: Tuning,
        limit: usize,
        epoch_seed: u64,
    ) -> Hub {
        let history_budget = cfg.history_max_bytes / shards.max(1);
        Hub {
            shard,
            shards: shards.max(1),
            cfg,
            tuning,
            limit,
            outbox: VecDeque::new(),
            rooms: HashMap::new(),
            recorded: VecDeque::new(),
            history_bytes: 0,
            history_len: 0,
            history_budget,
            lives: 0,
            epoch_seed,
            conflation: conflate::Conflation::default(),
            local: HashMap::new(),
            conns: HashMap::new(),
            users: HashMap::new(),
            subscriptions: 0,
            requests: 0,
            delayed: Vec::new(),
            delay_due: None,
            congested: vec![false; shards.max(1)],
            congested_count: 0,
            cluster: None,
        }
    }

    pub fn config(&self) -> &config::RoomsConfig {
        &self.cfg
    }

    pub fn shard(&self) -> usize {
        self.shard
    }

    pub fn home_of(&self, topic: &str) -> usize {
        home_of(topic, self.shards)
    }

    /// The next message for another shard: `(shard, message)`. The driver sends them in this
    /// order after each call; that keeps every shard-to-shard stream FIFO.
    pub fn poll_transmit(&mut self) -> Option<(usize, HubMsg)> {
        self.outbox.pop_front()
    }

    /// When [`handle_timeout`](Self::handle_timeout) is due: the earliest of the end of the
    /// write delay of the messages held now and the end of a conflation window. It only ever
    /// moves earlier until it is handled.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match (self.delay_due, self.conflation.next_due()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Conflation windows that ended deliver the values that won; a write delay that is over
    /// lets every connection holding room messages write them.
    pub fn handle_timeout(&mut self, now: Now) {
        for (topic, held) in self.conflation.expire(now.at) {
            for h in held {
                match h {
                    Held::Publish(p) => {
                        self.deliver_publish(now, &topic, &p);
                    }
                    Held::Delivery(msg, meta) => self.deliver_mirrored_now(now, &topic, msg, meta),
                }
            }
        }
        if self.delay_due.is_some_and(|due| due <= now.at) {
            self.delay_due = None;
            for entry in self.delayed.drain(..) {
                entry.release_held();
            }
        }
    }

    /// Sends `msg` to shard `to`; a message for this shard is handled right away.
    fn send(&mut self, now: Now, to: usize, msg: HubMsg) {
        if to == self.shard {
            self.handle(now, msg)
        } else {
            self.outbox.push_back((to, msg));
        }
    }

    /// Sends `msg` to the home shard of its topic. A request for a congested home is answered
    /// `overloaded` here; other messages (subscriptions, bounded by the request rates) go.
    pub fn route(&mut self, now: Now, topic: &str, msg: HubMsg) {
        let home = self.home_of(topic);
        if home != self.shard && self.congested[home] {
            match msg {
                HubMsg::Publish { reply, .. }
                | HubMsg::Presence { reply, .. }
                | HubMsg::History { reply, .. } => return self.overloaded(now, reply, home),
                msg => return self.send(now, home, msg),
            }
        }
        self.send(now, home, msg)
    }

    /// The driver's view of shard `shard`'s inbound queue: over the bound or not.
    pub fn set_congested(&mut self, shard: usize, on: bool) {
        if let Some(c) = self.congested.get_mut(shard) {
            if *c != on {
                *c = on;
                self.congested_count = if on {
                    self.congested_count + 1
                } else {
                    self.congested_count - 1
                };
            }
        }
    }

    /// Whether any shard is marked congested (then the driver re-checks before each call).
    pub fn any_congested(&self) -> bool {
        self.congested_count > 0
    }

    /// Clears the marks of the congested shards for which `drained` says so.
    pub fn recheck_congested(&mut self, mut drained: impl FnMut(usize) -> bool) {
        for s in 0..self.congested.len() {
            if self.congested[s] && drained(s) {
                self.set_congested(s, false);
            }
        }
    }

    fn overloaded(&mut self, now: Now, reply: Reply, shard: usize) {
        ::metrics::counter!(m::HUB_OVERLOADED).increment(1);
        let text = match &reply {
            Reply::Conn { id, .. } => proto::error(
                &ClientError::new(Code::Overloaded, format!("shard {shard} is behind; retry")),
                id.as_deref(),
            ),
            _ => String::new(),
        };
        self.answer(now, reply, text, ApiAnswer::Overloaded);
    }

    /// One message from another shard, or from this one (handled in place).
    pub fn handle(&mut self, now: Now, msg: HubMsg) {
        match msg {
            msg if self.needs_mirror(&msg) => self.wait_for_mirror(now, msg),
            HubMsg::Subscribe {
                topic,
                from,
                member,
                since,
                epoch,
                id,
                shared_deflate,
                request,
            } => {
                let (reply, replay) = self.home_subscribe(
                    now,
                    &topic,
                    from,
                    member,
                    since,
                    epoch,
                    id,
                    shared_deflate,
                );
                self.send(
                    now,
                    from.shard,
                    HubMsg::Subscribed {
                        topic,
                        conn: from.conn,
                        reply,
                        replay,
                        request,
                    },
                );
            }
            HubMsg::Unsubscribe {
                topic,
                from,
                shared_deflate,
            } => self.home_unsubscribe(now, topic, from, shared_deflate),
            HubMsg::Publish {
                topic,
                kind,
                data,
                from,
                reply,
                opts,
            } => {
                let default = || self.cfg.rule_for(&topic).is_some_and(|r| r.volatile);
                let p = Publish {
                    kind,
                    data,
                    from,
                    volatile: opts.volatile.unwrap_or_else(default),
                    trace: opts.trace,
                };
                self.home_publish(now, topic, p, reply)
            }
            HubMsg::Presence { topic, reply } => self.home_presence(now, topic, reply),
            HubMsg::History {
                topic,
                since,
                limit,
                reply,
            } => self.home_history(now, topic, since, limit, reply),
            HubMsg::Subscribed {
                topic,
                conn,
                reply,
                replay,
                request,
            } => self.local_subscribed(topic, conn, reply, replay, request),
            HubMsg::SubscribeRefused {
                topic,
                conn,
                reply,
                request,
            } => self.local_refused(&topic, conn, reply, request),
            HubMsg::Deliver {
                topic,
                msg,
                at,
                meta,
            } => self.local_deliver(now.at, &topic, msg, at, &meta),
            HubMsg::Reply { conn, text } => {
                if let Some(c) = self.conns.get(&conn) {
                    c.entry.send(Outgoing::Text(text), self.limit);
                }
            }
            HubMsg::ToUser { user, text } => {
                for c in self.user_conns(&user) {
                    c.entry.send(Outgoing::Text(text.clone()), self.limit);
                }
            }
            HubMsg::Disconnect { user, code } => {
                for c in self.user_conns(&user) {
                    c.entry.request_close(Close {
                        code: CloseCode(code),
                        reason: "disconnected by the server",
                    });
                }
            }
        }
    }

    /// This shard's connections of `user`.
    fn user_conns(&self, user: &str) -> impl Iterator<Item = &Rc<RoomConn>> {
        let ids = self.users.get(user).map_or(&[][..], |v| &v[..]);
        ids.iter().filter_map(|id| self.conns.get(id))
    }

    /// A message for every connection of `user` (the token's `sub`) on every shard: encoded
    /// once, not kept in history, no seq. In Redis mode on every node; `Err` says why Redis
    /// cannot take it.
    pub fn publish_to_user(
        &mut self,
        now: Now,
        user: &str,
        kind: &str,
        data: &str,
        trace: Option<&str>,
    ) -> Result<(), String> {
        let text = Bytes::from(proto::user_message(kind, user, data, now.wall, trace));
        tracing::debug!(user, trace, "user message published");
        self.send_to_users(
            now,
            UserMsg::Message {
                user: user.into(),
                text,
            },
        )
    }

    /// Closes every connection of `user` on every shard (in Redis mode of every node) with
    /// `code`.
    pub fn disconnect_user(&mut self, now: Now, user: &str, code: u16) -> Result<(), String> {
        let user = user.into();
        self.send_to_users(now, UserMsg::Disconnect { user, code })
    }

    fn send_to_users(&mut self, now: Now, msg: UserMsg) -> Result<(), String> {
        if self.cluster.is_some() {
            return self.redis_to_users(msg);
        }
        self.users_on_every_shard(now, &msg);
        Ok(())
    }

    /// `msg` for every shard of this node.
    fn users_on_every_shard(&mut self, now: Now, msg: &UserMsg) {
        for s in 0..self.shards {
            let msg = match msg.clone() {
                UserMsg::Message { user, text } => HubMsg::ToUser { user, text },
                UserMsg::Disconnect { user, code } => HubMsg::Disconnect { user, code },
            };
            self.send(now, s, msg);
        }
    }

    fn answer(&mut self, now: Now, reply: Reply, text: String, api: ApiAnswer) {
        match reply {
            Reply::None => {}
            Reply::Conn { to, .. } => self.send(
                now,
                to.shard,
                HubMsg::Reply {
                    conn: to.conn,
                    text: Bytes::from(text),
                },
            ),
            Reply::Http(tx) => {
                let _ = tx.send(api);
            }
        }
    }

    /// The room of `topic`, created (with a new epoch) when it has no state.
    fn room(&mut self, topic: &Arc<str>) -> &mut Room {
        let (lives, seed, shard, shards) =
            (&mut self.lives, self.epoch_seed, self.shard, self.shards);
        self.rooms.entry(topic.clone()).or_insert_with(|| {
            *lives += 1;
            Room::new(*lives, epoch(seed, shard, *lives), shards)
        })
    }

    /// A listed member joined or left this node's room. Memory mode tells the subscribers
    /// now; Redis mode writes it to Redis, which announces it once to every node.
    fn member_changed(&mut self, now: Now, topic: &Arc<str>, joined: bool, conn: u64, m: &Member) {
        if self.cluster.is_some() {
            return self.redis_member_changed(now, topic, joined, conn, m);
        }
        let kind = if joined { "join" } else { "leave" };
        self.presence_event(now, topic, kind, m, None);
    }

    /// Broadcasts a presence event to the room's subscribers (but `skip`), when the room
    /// emits them.
    fn presence_event(
        &mut self,
        now: Now,
        topic: &Arc<str>,
        kind: &str,
        member: &Member,
        skip: Option<u64>,
    ) {
        let Some(room) = self.rooms.get(topic) else {
            return;
        };
        if !self.cfg.presence_events_for(topic, room.member_count()) {
            return;
        }
        let text = proto::presence_event(kind, topic, &member.client_id, &member.user);
        let msg = Broadcast {
            frame: frame(OpCode::Text, text.as_bytes()),
            deflated: None,
        };
        let shards: Vec<usize> = room.subscriber_shards().collect();
        let meta = Meta {
            skip,
            ..Meta::default()
        };
        self.fan_out(now, topic, &shards, msg, meta);
    }

    fn fan_out(
        &mut self,
        now: Now,
        topic: &Arc<str>,
        shards: &[usize],
        msg: Broadcast,
        meta: Meta,
    ) {
        for &s in shards {
            self.send(
                now,
                s,
                HubMsg::Deliver {
                    topic: topic.clone(),
                    msg: msg.clone(),
                    at: now.at,
                    meta: meta.clone(),
                },
            );
        }
    }

    /// Adds the subscriber; returns the `subscribed` reply and the replay.
    #[allow(clippy::too_many_arguments)]
    fn home_subscribe(
        &mut self,
        now: Now,
        topic: &Arc<str>,
        from: ConnRef,
        member: Member,
        since: Option<u64>,
        epoch: Option<String>,
        id: Option<String>,
        shared_deflate: bool,
    ) -> (Bytes, Vec<Broadcast>) {
        let joined = self
            .room(topic)
            .join(from.shard, from.conn, member.clone(), shared_deflate);
        // Others hear of the join before the new member is on any delivery list (in Redis
        // mode the member's own join is skipped for it).
        if joined && member.listed {
            self.member_changed(now, topic, true, from.conn, &member);
        }
        let room = self.room(topic);
        let recovery = room.recover(since, epoch.as_deref());
        let recovered = match &recovery {
            Recovery::NotAsked => None,
            Recovery::Replay(_) => Some(true),
            Recovery::Lost => Some(false),
        };
        let replay = match recovery {
            Recovery::Replay(seqs) => seqs
                .iter()
                .filter_map(|s| room.stored(*s).map(|e| e.msg.clone()))
                .collect(),
            _ => Vec::new(),
        };
        let reply = proto::subscribed(topic, room.seq, &room.epoch, recovered, id.as_deref());
        (Bytes::from(reply), replay)
    }

    fn home_unsubscribe(&mut self, now: Now, topic: Arc<str>, from: ConnRef, shared_deflate: bool) {
        let Some(room) = self.rooms.get_mut(&topic) else {
            return;
        };
        if let Some(member) = room.leave(from.shard, from.conn, shared_deflate) {
            if member.listed {
                self.member_changed(now, &topic, false, from.conn, &member);
            }
        }
        self.free_if_idle(&topic);
    }

    fn free_if_idle(&mut self, topic: &Arc<str>) {
        if self.cluster.is_some() {
            return self.release_if_unused(topic);
        }
        if self.rooms.get(topic).is_some_and(|r| r.is_idle()) {
            self.rooms.remove(topic);
        }
    }

    /// A publish reaching its topic's home shard: delivered now, or held by the topic's
    /// conflation window; answered with its seq, or that it has none.
    fn home_publish(&mut self, now: Now, topic: Arc<str>, publish: Publish, reply: Reply) {
        // Refused before it takes a seq: no subscriber misses a message, nobody waits on a queue.
        if self.congested_count > 0 {
            let (me, congested) = (self.shard, &self.congested);
            let behind = self.rooms.get(&topic).and_then(|r| {
                r.subscriber_shards()
                    .find(|&s| s != me && congested.get(s).copied().unwrap_or(false))
            });
            if let Some(s) = behind {
                return self.overloaded(now, reply, s);
            }
        }
        // Redis mode: Redis assigns the seq and keeps the history, and every node delivers the
        // message (conflated there) when it comes back on the topic's channel (rooms/redis.rs).
        if self.cluster.is_some() {
            return self.redis_publish(now, &topic, &publish, reply);
        }
        let conflate = self.cfg.rule_for(&topic).and_then(|r| {
            let key = match (&publish.data, r.conflate_key.as_deref()) {
                (Payload::Json(json), Some(field)) => proto::conflate_key(json, field),
                _ => None,
            };
            Some((r.conflate()?, key))
        });
        let publish = match conflate {
            None => Some(publish),
            Some((interval, key)) => self
                .conflation
                .offer(&topic, key, Held::Publish(publish), now.at, interval)
                .and_then(Held::into_publish),
        };
        match &publish {
            Some(p) => {
                let seq = self.deliver_publish(now, &topic, p);
                self.ack_publish(now, reply, seq, false)
            }
            None => self.ack_publish(now, reply, None, true),
        }
    }

    /// Answers a publish: its seq, or that it has none (volatile, or held by conflation).
    fn ack_publish(&mut self, now: Now, reply: Reply, seq: Option<u64>, conflated: bool) {
        let id = match &reply {
            Reply::Conn { id: Some(id), .. } => id.as_str(),
            Reply::Conn { id: None, .. } | Reply::None => return,
            Reply::Http(_) => "",
        };
        let (ack, api) = match seq {
            Some(seq) => (proto::ack(id, seq), ApiAnswer::Published { seq }),
            None => {
                let what = if conflated { "conflated" } else { "volatile" };
                (
                    proto::ack_unsequenced(id, conflated),
                    ApiAnswer::Json(format!("{{\"{what}\":true}}")),
                )
            }
        };
        self.answer(now, reply, ack, api);
    }

    /// Delivers a publish to the topic's subscribers: encoded once, with the next seq and
    /// kept in history unless it is volatile. Returns its seq.
    fn deliver_publish(&mut self, now: Now, topic: &Arc<str>, p: &Publish) -> Option<u64> {
        let room = self.room(topic);
        let seq = (!p.volatile).then(|| room.next_seq());
        let trace = p.trace.as_deref();
        let (payload, opcode) = p.encode(topic, seq, now.wall);
        let msg = self.broadcast(topic, &payload, opcode);
        let Some(room) = self.rooms.get(topic) else {
            return seq;
        };
        let shards: Vec<usize> = room.subscriber_shards().collect();
        if let Some(seq) = seq {
            let stored = Stored {
                seq,
                at: now.at,
                msg: msg.clone(),
            };
            self.keep(topic, stored);
        }
        tracing::debug!(%topic, seq, trace, shards = shards.len(), "room message published");
        ::metrics::counter!(m::PUBLISHED).increment(1);
        let meta = Meta {
            seq,
            volatile: p.volatile,
            trace: p.trace.clone(),
            skip: None,
        };
        self.fan_out(now, topic, &shards, msg, meta);
        // No history kept and nobody listening: nothing to remember.
        self.free_if_idle(topic);
        seq
    }

    /// The frame of `payload` for the room's subscribers (and its compressed form once, when
    /// some take it).
    fn broadcast(&self, topic: &Arc<str>, payload: &[u8], opcode: OpCode) -> Broadcast {
        let shared = self.rooms.get(topic).is_some_and(|r| r.shared_deflate > 0);
        Broadcast {
            frame: frame(opcode, payload),
            deflated: if shared {
                deflate::conn::shared_frame(payload, self.tuning, opcode)
            } else {
                None
            },
        }
    }

    /// Keeps `stored` in its room's history (up to `history_size`, within the byte budget).
    fn keep(&mut self, topic: &Arc<str>, stored: Stored) {
        let cap = self.cfg.history_size;
        let Some(room) = self.rooms.get_mut(topic).filter(|_| cap > 0) else {
            return;
        };
        let (added, seq) = (stored.size(), stored.seq);
        let len = room.history_len();
        let freed = room.record(stored, cap);
        let grown = room.history_len() - len;
        let life = room.life;
        self.history_len += grown;
        self.history_bytes = self.history_bytes + added - freed;
        self.recorded.push_back(Recorded {
            topic: topic.clone(),
            life,
            seq,
        });
        self.enforce_budget();
    }

    /// Drops the oldest history over all rooms until the shard is within its byte budget.
    fn enforce_budget(&mut self) {
        while self.history_bytes > self.history_budget {
            let Some(entry) = self.recorded.pop_front() else {
                break;
            };
            self.drop_recorded(&entry);
        }
        // Entries a room dropped by its count cap are stale here: compact now and then so the
        // queue stays proportional to what is held.
        if self.recorded.len() > 1024 && self.recorded.len() > 2 * self.history_len {
            let rooms = &self.rooms;
            self.recorded.retain(|e| {
                rooms
                    .get(&e.topic)
                    .filter(|r| r.life == e.life)
                    .and_then(|r| r.oldest())
                    .is_some_and(|o| o.seq <= e.seq)
            });
        }
    }

    /// Drops the history entry `e` names if it is still its room's oldest.
    fn drop_recorded(&mut self, e: &Recorded) {
        let Some(room) = self.rooms.get_mut(&e.topic).filter(|r| r.life == e.life) else {
            return;
        };
        if room.oldest().is_some_and(|o| o.seq == e.seq) {
            if let Some(freed) = room.pop_oldest() {
                self.history_bytes -= freed;
                self.history_len -= 1;
            }
        }
        self.free_if_idle(&e.topic);
    }

    fn home_presence(&mut self, now: Now, topic: Arc<str>, reply: Reply) {
        let members = match self.rooms.get(&topic) {
            Some(room) => {
                let list: Vec<String> = room
                    .members()
                    .map(|m| proto::member(&m.client_id, &m.user, m.joined_at))
                    .collect();
                format!("[{}]", list.join(","))
            }
            None => "[]".into(),
        };
        let (ws, api) = match &reply {
            Reply::Conn { id, .. } => (proto::presence(&topic, &members, id.as_deref()), None),
            _ => (
                String::new(),
                Some(format!(
                    "{{\"topic\":{},\"members\":{members}}}",
                    proto::json_str(&topic)
                )),
            ),
        };
        self.answer(now, reply, ws, ApiAnswer::Json(api.unwrap_or_default()));
    }

    fn home_history(&mut self, now: Now, topic: Arc<str>, since: u64, limit: usize, reply: Reply) {
        let (epoch, messages) = match self.rooms.get(&topic) {
            Some(room) => {
                // A binary topic's messages are not JSON: its history is replayed by
                // `subscribe` with `since` only.
                let list: Vec<&[u8]> = room
                    .history_after(since, limit)
                    .filter(|e| !e.msg.is_binary())
                    .map(|e| e.msg.payload())
                    .collect();
                let mut s = String::from("[");
                for (i, p) in list.iter().enumerate() {
                    if i > 0 {
                        s.push(',');
                    }
                    s.push_str(std::str::from_utf8(p).unwrap_or("null"));
                }
                s.push(']');
                (room.epoch.to_string(), s)
            }
            // A topic never published to has no epoch yet: say so with an empty one.
            None => (String::new(), "[]".into()),
        };
        let (ws, api) = match &reply {
            Reply::Conn { id, .. } => (
                proto::history(&topic, &epoch, &messages, id.as_deref()),
                String::new(),
            ),
            _ => (
                String::new(),
                format!(
                    "{{\"topic\":{},\"epoch\":{},\"messages\":{messages}}}",
                    proto::json_str(&topic),
                    proto::json_str(&epoch)
                ),
            ),
        };
        self.answer(now, reply, ws, ApiAnswer::Json(api));
    }

    // ---- Subscriber side ------------------------------------------------------------------

    /// A `/ws` connection opened on this shard.
    pub fn attach(&mut self, conn: Rc<RoomConn>) {
        if &*conn.user != crate::auth::ANONYMOUS {
            self.users
                .entry(conn.user.clone())
                .or_default()
                .push(conn.entry.id);
        }
        self.conns.insert(conn.entry.id, conn);
    }

    /// A `/ws` connection closed: it leaves every topic (each `leave` is emitted once), in
    /// name order, so the same inputs always make the same outputs.
    pub fn detach(&mut self, now: Now, conn_id: u64) {
        let Some(conn) = self.conns.remove(&conn_id) else {
            return;
        };
        if let Some(ids) = self.users.get_mut(&conn.user) {
            ids.retain(|&id| id != conn_id);
            if ids.is_empty() {
                self.users.remove(&conn.user);
            }
        }
        let mut topics: Vec<Arc<str>> = conn.topics.borrow().keys().cloned().collect();
        topics.sort_unstable();
        for t in topics {
            self.unsubscribe(now, &conn, &t);
        }
    }

    /// Starts a subscription: the connection is pending until the home shard answers.
    pub fn subscribe(
        &mut self,
        now: Now,
        conn: &RoomConn,
        topic: &str,
        since: Option<u64>,
        epoch: Option<&str>,
        id: Option<String>,
    ) {
        let member = conn.member(now.wall);
        self.subscribe_as(now, conn, topic, since, epoch, id, member)
    }

    /// [`subscribe`](Self::subscribe) without a presence listing (no `join`/`leave`): for
    /// long-poll clients, which subscribe anew with every poll.
    pub fn subscribe_unlisted(
        &mut self,
        now: Now,
        conn: &RoomConn,
        topic: &str,
        since: Option<u64>,
        epoch: Option<&str>,
    ) {
        let member = Member {
            listed: false,
            ..conn.member(now.wall)
        };
        self.subscribe_as(now, conn, topic, since, epoch, None, member)
    }

    #[allow(clippy::too_many_arguments)]
    fn subscribe_as(
        &mut self,
        now: Now,
        conn: &RoomConn,
        topic: &str,
        since: Option<u64>,
        epoch: Option<&str>,
        id: Option<String>,
        member: Member,
    ) {
        let topic: Arc<str> = topic.into();
        // A repeated subscribe (active, or its first answer still on the way) keeps the
        // subscription as it is: the home shard answers it again, without `since`, so it gets
        // no `recovered` and no replay of its own. The first subscribe's replay is the one
        // delivered, and from there the connection misses nothing.
        self.requests += 1;
        let fresh = self.requests;
        let (request, since, epoch) = match conn.topics.borrow_mut().entry(topic.clone()) {
            Entry::Vacant(e) => {
                e.insert(conn::Sub::Pending(fresh));
                (fresh, since, epoch)
            }
            Entry::Occupied(_) => (0, None, None),
        };
        let msg = HubMsg::Subscribe {
            topic: topic.clone(),
            from: ConnRef {
                shard: self.shard,
                conn: conn.entry.id,
            },
            member,
            since,
            epoch: epoch.map(str::to_owned),
            id,
            shared_deflate: conn.shared_deflate(),
            request,
        };
        self.route(now, &topic, msg);
    }

    /// Ends a subscription; false when the connection was not subscribed.
    pub fn unsubscribe(&mut self, now: Now, conn: &RoomConn, topic: &str) -> bool {
        let Some((topic, sub)) = conn.topics.borrow_mut().remove_entry(topic) else {
            return false;
        };
        if let conn::Sub::Active(key) = sub {
            if let Some(list) = self.local.get_mut(&topic) {
                list.try_remove(key);
                self.subscriptions -= 1;
                if list.is_empty() {
                    self.local.remove(&topic);
                }
            }
        }
        let msg = HubMsg::Unsubscribe {
            topic: topic.clone(),
            from: ConnRef {
                shard: self.shard,
                conn: conn.entry.id,
            },
            shared_deflate: conn.shared_deflate(),
        };
        self.route(now, &topic, msg);
        true
    }

    fn local_subscribed(
        &mut self,
        topic: Arc<str>,
        conn: u64,
        reply: Bytes,
        replay: Vec<Broadcast>,
        request: u64,
    ) {
        let Some(c) = self.conns.get(&conn) else {
            return; // gone meanwhile; its Unsubscribe is on the way to the home shard
        };
        let mut topics = c.topics.borrow_mut();
        let sub = match topics.get_mut(&topic) {
            Some(sub @ conn::Sub::Pending(_)) if *sub == conn::Sub::Pending(request) => sub,
            _ => {
                // A repeated subscribe (already on the list), or the answer to a subscribe
                // given up since: the request gets its reply, nothing else changes.
                c.entry.send(Outgoing::Text(reply), self.limit);
                return;
            }
        };
        let entry = &c.entry;
        entry.send(Outgoing::Text(reply), self.limit);
        for msg in replay {
            entry.send_broadcast(&Rc::new(msg), None, self.limit);
        }
        let key = self.local.entry(topic).or_default().insert(entry.clone());
        *sub = conn::Sub::Active(key);
        self.subscriptions += 1;
    }

    fn local_refused(&mut self, topic: &str, conn: u64, reply: Bytes, request: u64) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let mut topics = c.topics.borrow_mut();
        if topics.get(topic) == Some(&conn::Sub::Pending(request)) {
            topics.remove(topic);
        }
        c.entry.send(Outgoing::Text(reply), self.limit);
    }

    fn local_deliver(
        &mut self,
        now: Instant,
        topic: &str,
        msg: Broadcast,
        at: Instant,
        meta: &Meta,
    ) {
        let Some(list) = self.local.get(topic) else {
            return;
        };
        let msg = &Rc::new(msg);
        // A volatile message is not worth queueing behind half a slow consumer's limit: it
        // is dropped for that connection, which stays open for what it cannot miss.
        let behind = |entry: &ConnHandle| meta.volatile && entry.mailbox.backlog() > self.limit / 2;
        let targets = list
            .iter()
            .map(|(_, e)| e)
            .filter(|e| meta.skip != Some(e.id));
        let mut dropped = 0u64;
        if let Some(delay) = self.cfg.write_delay_for(topic) {
            for entry in targets {
                if behind(entry) {
                    dropped += 1;
                } else if entry.queue_broadcast(msg, Some(at), self.limit) {
                    self.delayed.push(entry.clone());
                }
            }
            if !self.delayed.is_empty() {
                let due = now + delay;
                self.delay_due = Some(self.delay_due.map_or(due, |d| d.min(due)));
            }
        } else {
            for entry in targets {
                if behind(entry) {
                    dropped += 1;
                } else {
                    entry.send_broadcast(msg, Some(at), self.limit);
                }
            }
        }
        if dropped > 0 {
            ::metrics::counter!(m::VOLATILE_DROPPED).increment(dropped);
        }
        tracing::debug!(
            topic,
            seq = meta.seq,
            trace = meta.trace.as_deref(),
            subscribers = list.len(),
            dropped,
            "room message delivered"
        );
        ::metrics::histogram!(m::FANOUT).record(list.len() as f64);
        ::metrics::histogram!(m::PUBLISH_LATENCY)
            .record(now.saturating_duration_since(at).as_secs_f64());
    }

    /// Once a second: expire history, free idle rooms and the table space a burst of topics
    /// left, publish gauges.
    pub fn sweep(&mut self, now: Now) {
        self.cluster_tick(now);
        let ttl = Duration::from_secs_f64(self.cfg.history_ttl);
        let mut freed = 0;
        let mut emptied = Vec::new();
        let mut expired = 0;
        for (topic, room) in self.rooms.iter_mut() {
            let len = room.history_len();
            freed += room.expire(now.at, ttl);
            expired += len - room.history_len();
            if room.is_idle() {
                emptied.push(topic.clone());
            }
        }
        self.history_bytes -= freed;
        self.history_len -= expired;
        for t in emptied {
            self.rooms.remove(&t);
        }
        give_back_spare(&mut self.rooms);
        give_back_spare(&mut self.local);
        if self.rooms.is_empty() {
            self.recorded = VecDeque::new();
        } else {
            self.enforce_budget();
        }
        let shard = self.shard.to_string();
        ::metrics::gauge!(m::ROOMS, "shard" => shard.clone()).set(self.rooms.len() as f64);
        ::metrics::gauge!(m::SUBSCRIPTIONS, "shard" => shard.clone())
            .set(self.subscriptions as f64);
        ::metrics::gauge!(m::HISTORY_BYTES, "shard" => shard).set(self.history_bytes as f64);
    }

    /// Rooms homed here and this shard's subscriptions (tests, statistics).
    pub fn counts(&self) -> (usize, usize) {
        (self.rooms.len(), self.subscriptions)
    }
}

/// Shrinks a per-topic table that holds under a quarter of its capacity (an empty one is
/// freed). A hash map never shrinks by itself, and the tombstones its removals leave can double
/// it at a moment that depends on its random hash keys: without this a shard keeps its peak
/// table, or twice it, for good.
fn give_back_spare<V>(map: &mut HashMap<Arc<str>, V>) {
    if map.is_empty() || map.len() < map.capacity() / 4 {
        map.shrink_to_fit();
    }
}

/// The name of one lifetime of a topic's history: the same inputs make the same epoch, and a
/// new seed (a new run) makes new ones.
fn epoch(seed: u64, shard: usize, life: u64) -> Arc<str> {
    let mut h = DefaultHasher::new();
    (seed, shard, life).hash(&mut h);
    format!("{:016x}", h.finish()).into()
}

/// What a driver does with a hub's outputs after each call.
pub type Flush = Box<dyn Fn(&mut Hub)>;

/// A shard's hub as the shard's tasks share it. Every call goes through
/// [`with`](Self::with), which passes the time in and, before the borrow ends, hands the hub to
/// the driver's flush: what one call produced leaves before the next call starts, in order.
pub struct SharedHub {
    hub: RefCell<Hub>,
    flush: OnceCell<Flush>,
    /// What [`client_id`](Self::client_id) puts before a connection's number.
    id_prefix: Option<Arc<str>>,
}

impl SharedHub {
    pub fn new(hub: Hub) -> SharedHub {
        SharedHub {
            id_prefix: hub.client_id_prefix(),
            hub: RefCell::new(hub),
            flush: OnceCell::new(),
        }
    }

    /// The name a connection goes by (`connection_id`, presence's `client_id`): its number in
    /// hex, unique in this process; in Redis mode after its shard's owner name, so that it is
    /// unique across the cluster's nodes too.
    pub fn client_id(&self, conn: u64) -> Arc<str> {
        match &self.id_prefix {
            Some(prefix) => format!("{prefix}-{conn:x}").into(),
            None => format!("{conn:x}").into(),
        }
    }

    /// Sets where outputs go (once, when every shard exists). Until then messages for other
    /// shards are dropped: a hub alone (one shard, benchmarks) makes none.
    pub fn set_flush(&self, flush: Flush) {
        if self.flush.set(flush).is_err() {
            tracing::error!("hub outputs already have a driver");
        }
    }

    /// Runs `f` on the hub at the current time, then flushes its outputs.
    pub fn with<R>(&self, f: impl FnOnce(&mut Hub, Now) -> R) -> R {
        let mut hub = self.hub.borrow_mut();
        self.run(&mut hub, f)
    }

    /// [`with`](Self::with), or `None` when the hub is in use further up the stack.
    pub fn try_with<R>(&self, f: impl FnOnce(&mut Hub, Now) -> R) -> Option<R> {
        let mut hub = self.hub.try_borrow_mut().ok()?;
        Some(self.run(&mut hub, f))
    }

    fn run<R>(&self, hub: &mut Hub, f: impl FnOnce(&mut Hub, Now) -> R) -> R {
        // A congested mark is re-checked before the call too, not only after: a shard that
        // caught up while this one was quiet must not cost the next request an `overloaded`.
        if hub.any_congested() {
            if let Some(flush) = self.flush.get() {
                flush(hub);
            }
        }
        let r = f(hub, Now::system());
        match self.flush.get() {
            Some(flush) => flush(hub),
            None => {
                while let Some((to, _)) = hub.poll_transmit() {
                    tracing::error!(shard = to, "hub message without a driver dropped");
                }
            }
        }
        r
    }
}

/// An unmasked frame holding `payload`, as shareable bytes.
fn frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut f = Vec::with_capacity(header_len(payload.len()) + payload.len());
    write_frame(&mut f, opcode, payload);
    Bytes::from(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn hub_with(shards: usize, cfg: config::RoomsConfig) -> Hub {
        let tuning = Tuning {
            level: 1,
            threshold: 64,
        };
        Hub::new(0, shards, cfg, tuning, 1 << 20, 7)
    }

    fn hub(history_size: usize) -> Hub {
        hub_with(
            1,
            config::RoomsConfig {
                history_size,
                ..config::RoomsConfig::default()
            },
        )
    }

    /// Virtual time: `secs` after `t0`.
    fn at(t0: Instant, secs: f64) -> Now {
        Now {
            at: t0 + Duration::from_secs_f64(secs),
            wall: 1_700_000_000.0 + secs,
        }
    }

    fn publish(hub: &mut Hub, now: Now, topic: &str, data: &str) {
        publish_with(hub, now, topic, data, PublishOpts::default());
    }

    fn history(hub: &Hub, topic: &str) -> Vec<u64> {
        let Some(room) = hub.rooms.get(topic) else {
            return Vec::new();
        };
        room.history_after(0, usize::MAX).map(|m| m.seq).collect()
    }

    pub(super) fn conn(hub: &mut Hub, id: u64) -> Rc<RoomConn> {
        let c = Rc::new(RoomConn {
            entry: Rc::new(ConnHandle::new(id, "127.0.0.1:9".parse().expect("address"))),
            client_id: format!("{id:x}").into(),
            user: crate::auth::ANONYMOUS.into(),
            topics: Default::default(),
        });
        hub.attach(c.clone());
        c
    }

    /// The JSON texts queued for `c`, replies and broadcasts alike.
    pub(super) fn drain(c: &RoomConn) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        c.entry.mailbox.drain(|item| {
            let text = match &item {
                Outgoing::Text(t) => t.to_vec(),
                Outgoing::Broadcast(b) => b.payload().to_vec(),
            };
            out.push(serde_json::from_slice(&text).expect("JSON"));
        });
        out
    }

    #[test]
    fn byte_budget_drops_the_oldest_history_over_all_rooms() {
        let t0 = Instant::now();
        let mut hub = hub(100);
        publish(&mut hub, at(t0, 0.0), "a", "1");
        let size = hub.history_bytes;
        hub.history_budget = 3 * size;
        publish(&mut hub, at(t0, 0.0), "b", "1");
        publish(&mut hub, at(t0, 0.0), "a", "2");
        publish(&mut hub, at(t0, 0.0), "b", "2");
        publish(&mut hub, at(t0, 0.0), "a", "3");
        assert!(hub.history_bytes <= hub.history_budget);
        assert_eq!(history(&hub, "a"), [2, 3]);
        assert_eq!(history(&hub, "b"), [2]);
        assert_eq!(hub.history_len, 3);
    }

    #[test]
    fn a_recreated_topic_keeps_its_history_against_its_old_lifes_entries() {
        // `a` records seq 1..5 but keeps 4 and 5 (count cap): 1..3 stay queued, stale.
        let t0 = Instant::now();
        let mut hub = hub(2);
        for i in 0..5 {
            publish(&mut hub, at(t0, 0.0), "a", &i.to_string());
        }
        publish(&mut hub, at(t0, 1.0), "b", "1");
        let size = hub.history_bytes / 3;
        // Expire what `a` holds: the room is freed, `b` lives on.
        let ttl = hub.cfg.history_ttl;
        hub.sweep(at(t0, ttl + 0.5));
        assert!(!hub.rooms.contains_key("a"));
        assert_eq!(history(&hub, "b"), [1]);
        // `a` again, seq from 1, one entry over budget: the oldest live entry (b's) goes, not
        // the new `a` 1 that an entry of the old life also names.
        hub.history_budget = size;
        publish(&mut hub, at(t0, ttl + 0.5), "a", "x");
        assert_eq!(history(&hub, "a"), [1]);
        assert_eq!(history(&hub, "b"), Vec::<u64>::new());
    }

    #[test]
    fn expired_history_frees_the_room_and_its_next_life_has_a_new_epoch() {
        let t0 = Instant::now();
        let mut hub = hub(10);
        let c = conn(&mut hub, 1);
        hub.subscribe(at(t0, 0.0), &c, "t", None, None, None);
        let epoch = drain(&c)[0]["epoch"].clone();
        for i in 1..=3 {
            publish(&mut hub, at(t0, 0.0), "t", &i.to_string());
        }
        assert!(hub.unsubscribe(at(t0, 0.0), &c, "t"));
        // Within the TTL the history stays; just past it the room is gone.
        hub.sweep(at(t0, hub.cfg.history_ttl));
        assert_eq!(history(&hub, "t"), [1, 2, 3]);
        hub.sweep(at(t0, hub.cfg.history_ttl + 0.001));
        assert_eq!(hub.counts(), (0, 0));
        drain(&c);
        hub.subscribe(at(t0, 400.0), &c, "t", Some(3), epoch.as_str(), None);
        let r = &drain(&c)[0];
        assert_eq!(
            (&r["recovered"], &r["seq"]),
            (&false.into(), &0.into()),
            "{r}"
        );
        assert_ne!(r["epoch"], epoch);
    }

    #[test]
    fn epochs_follow_the_seed() {
        let names = |seed| (1..=3).map(|life| epoch(seed, 0, life)).collect::<Vec<_>>();
        assert_eq!(names(1), names(1));
        assert_ne!(names(1), names(2));
        assert_ne!(epoch(1, 0, 1), epoch(1, 1, 1));
    }

    #[test]
    fn requests_that_would_queue_for_a_congested_shard_are_answered_overloaded() {
        let t0 = Instant::now();
        let mut hub = hub_with(2, config::RoomsConfig::default());
        let homed = |hub: &Hub, shard| {
            (0..)
                .map(|i| format!("t{i}"))
                .find(|t| hub.home_of(t) == shard)
                .expect("a topic")
        };
        let (remote, local) = (homed(&hub, 1), homed(&hub, 0));
        let c = conn(&mut hub, 1);
        hub.set_congested(1, true);
        assert!(hub.any_congested());
        // A request for a topic homed on the congested shard: answered here, nothing queued.
        let (tx, mut rx) = oneshot::channel();
        let ask = |topic: &str, reply| HubMsg::Publish {
            topic: topic.into(),
            kind: "message".into(),
            data: String::from("1").into(),
            from: None,
            reply,
            opts: PublishOpts::default(),
        };
        hub.route(at(t0, 0.0), &remote, ask(&remote, Reply::Http(tx)));
        assert_eq!(rx.try_recv(), Ok(ApiAnswer::Overloaded));
        let to = ConnRef { shard: 0, conn: 1 };
        // Ids are kept as the client sent them (raw JSON).
        let id = Some("\"p1\"".to_string());
        hub.route(at(t0, 0.0), &remote, ask(&remote, Reply::Conn { to, id }));
        let r = &drain(&c)[0];
        assert_eq!(
            (&r["code"], &r["id"]),
            (&"overloaded".into(), &"p1".into()),
            "{r}"
        );
        assert!(hub.poll_transmit().is_none());
        // A local topic with a subscriber on the congested shard: refused before taking a seq.
        hub.handle(
            at(t0, 0.0),
            HubMsg::Subscribe {
                topic: local.as_str().into(),
                from: ConnRef { shard: 1, conn: 9 },
                member: Member {
                    client_id: "9".into(),
                    user: "u".into(),
                    joined_at: 0.0,
                    listed: true,
                },
                since: None,
                epoch: None,
                id: None,
                shared_deflate: false,
                request: 1,
            },
        );
        while hub.poll_transmit().is_some() {}
        let (tx, mut rx) = oneshot::channel();
        hub.route(at(t0, 0.0), &local, ask(&local, Reply::Http(tx)));
        assert_eq!(rx.try_recv(), Ok(ApiAnswer::Overloaded));
        assert_eq!(history(&hub, &local), Vec::<u64>::new());
        assert!(hub.poll_transmit().is_none());
        // Once the driver sees the shard drained, the same publish goes through with seq 1.
        hub.recheck_congested(|s| s == 1);
        assert!(!hub.any_congested());
        let (tx, mut rx) = oneshot::channel();
        hub.route(at(t0, 0.0), &local, ask(&local, Reply::Http(tx)));
        assert_eq!(rx.try_recv(), Ok(ApiAnswer::Published { seq: 1 }));
        assert!(matches!(
            hub.poll_transmit(),
            Some((1, HubMsg::Deliver { .. }))
        ));
    }

    #[test]
    fn messages_for_other_shards_are_returned_in_order() {
        let t0 = Instant::now();
        let mut hub = hub_with(2, config::RoomsConfig::default());
        let topic = (0..).map(|i| format!("t{i}")).find(|t| hub.home_of(t) == 1);
        let topic = topic.expect("a topic homed on shard 1");
        let c = conn(&mut hub, 1);
        hub.subscribe(at(t0, 0.0), &c, &topic, None, None, None);
        let msg = HubMsg::Presence {
            topic: topic.as_str().into(),
            reply: Reply::None,
        };
        hub.route(at(t0, 0.0), &topic, msg);
        let sent: Vec<_> = std::iter::from_fn(|| hub.poll_transmit()).collect();
        assert!(
            matches!(
                &sent[..],
                [(1, HubMsg::Subscribe { .. }), (1, HubMsg::Presence { .. })]
            ),
            "{sent:?}"
        );
        // Nothing was delivered: the subscription waits for the home shard's answer.
        assert!(drain(&c).is_empty());
    }

    #[test]
    fn write_delay_holds_room_messages_until_the_timeout() {
        let t0 = Instant::now();
        let mut hub = hub_with(
            1,
            config::RoomsConfig {
                write_delay: 0.1,
                presence_events: false,
                ..config::RoomsConfig::default()
            },
        );
        let c = conn(&mut hub, 1);
        hub.subscribe(at(t0, 0.0), &c, "t", None, None, None);
        assert!(c.entry.mailbox.has_mail(), "the reply is not held");
        drain(&c);
        assert_eq!(hub.poll_timeout(), None);
        publish(&mut hub, at(t0, 1.0), "t", "1");
        publish(&mut hub, at(t0, 1.05), "t", "2");
        // The first held message sets the deadline; the second rides along.
        assert_eq!(hub.poll_timeout(), Some(at(t0, 1.1).at));
        assert!(!c.entry.mailbox.has_mail());
        hub.handle_timeout(at(t0, 1.09));
        assert!(!c.entry.mailbox.has_mail(), "released early");
        hub.handle_timeout(at(t0, 1.1));
        assert_eq!(hub.poll_timeout(), None);
        assert!(c.entry.mailbox.has_mail());
        let seqs: Vec<_> = drain(&c).iter().map(|m| m["seq"].clone()).collect();
        assert_eq!(seqs, [1, 2]);
    }

    fn publish_with(hub: &mut Hub, now: Now, topic: &str, data: &str, opts: PublishOpts) {
        hub.handle(
            now,
            HubMsg::Publish {
                topic: topic.into(),
                kind: "message".into(),
                data: data.into(),
                from: None,
                reply: Reply::None,
                opts,
            },
        );
    }

    fn volatile() -> PublishOpts {
        PublishOpts {
            volatile: Some(true),
            trace: None,
        }
    }

    fn rule(prefix: &str) -> config::TopicRule {
        config::TopicRule::for_prefix(prefix)
    }

    fn quiet(topic: Vec<config::TopicRule>) -> config::RoomsConfig {
        config::RoomsConfig {
            presence_events: false,
            topic,
            ..config::RoomsConfig::default()
        }
    }

    #[test]
    fn volatile_messages_skip_seq_and_history_and_are_never_replayed() {
        let t0 = Instant::now();
        let mut hub = hub_with(
            1,
            quiet(vec![config::TopicRule {
                volatile: true,
                ..rule("typing.")
            }]),
        );
        let c = conn(&mut hub, 1);
        hub.subscribe(at(t0, 0.0), &c, "chat.1", None, None, None);
        hub.subscribe(at(t0, 0.0), &c, "typing.1", None, None, None);
        drain(&c);
        publish(&mut hub, at(t0, 0.0), "chat.1", "1");
        publish_with(
            &mut hub,
            at(t0, 0.0),
            "chat.1",
            r#"{"typing":true}"#,
            volatile(),
        );
        publish(&mut hub, at(t0, 0.0), "chat.1", "2");
        // The prefix default, and a publisher overriding it.
        publish(&mut hub, at(t0, 0.0), "typing.1", "3");
        let durable = PublishOpts {
            volatile: Some(false),
            trace: Some("t-1".into()),
        };
        publish_with(&mut hub, at(t0, 0.0), "typing.1", "4", durable);
        let got = drain(&c);
        let seqs: Vec<_> = got.iter().map(|m| m["seq"].clone()).collect();
        assert_eq!(
            seqs,
            [1.into(), Value::Null, 2.into(), Value::Null, 1.into()]
        );
        assert_eq!(got[1]["volatile"], true);
        assert_eq!(got[1]["data"]["typing"], true);
        assert_eq!(got[3]["volatile"], true);
        assert_eq!(got[4]["trace"], "t-1");
        assert_eq!(history(&hub, "chat.1"), [1, 2]);
        assert_eq!(history(&hub, "typing.1"), [1]);
        // Recovery from 0 replays only what has a seq.
        let r = conn(&mut hub, 2);
        hub.subscribe(at(t0, 1.0), &r, "chat.1", Some(0), None, None);
        let replay: Vec<_> = drain(&r)
            .iter()
            .skip(1)
            .map(|m| m["data"].clone())
            .collect();
        assert_eq!(replay, [1, 2]);
    }

    /// Connection 1, subscribed to `t` with two 300-byte messages queued: more than half of the
    /// hub's limit (set to 1000 bytes) behind.
    fn subscriber_behind(hub: &mut Hub, t0: Instant) -> Rc<RoomConn> {
        hub.limit = 1000;
        let c = conn(hub, 1);
        hub.subscribe(at(t0, 0.0), &c, "t", None, None, None);
        drain(&c);
        let big = format!("\"{}\"", "x".repeat(300));
        publish(hub, at(t0, 0.0), "t", &big);
        publish(hub, at(t0, 0.0), "t", &big);
        assert!(c.entry.mailbox.backlog() > 500);
        c
    }

    #[test]
    fn volatile_messages_are_dropped_first_for_a_connection_behind() {
        let t0 = Instant::now();
        let mut hub = hub_with(1, quiet(Vec::new()));
        let c = subscriber_behind(&mut hub, t0);
        publish_with(&mut hub, at(t0, 0.0), "t", "1", volatile());
        assert!(
            !c.entry.close_requested(),
            "a volatile message never closes it"
        );
        publish(&mut hub, at(t0, 0.0), "t", "2");
        let got: Vec<_> = drain(&c).iter().map(|m| m["seq"].clone()).collect();
        assert_eq!(
            got,
            [1, 2, 3],
            "the volatile one was dropped, the rest kept"
        );
    }

    #[test]
    fn join_and_leave_are_never_dropped_for_a_connection_behind() {
        // PROTOCOL.md: each `join` and `leave` reaches the other subscribers exactly once.
        // They take no seq and are never replayed, so unlike volatile messages they are
        // queued however far behind a subscriber is.
        let t0 = Instant::now();
        let mut hub = hub(100);
        let c = subscriber_behind(&mut hub, t0);
        let d = conn(&mut hub, 2);
        hub.subscribe(at(t0, 0.0), &d, "t", None, None, None);
        hub.unsubscribe(at(t0, 0.0), &d, "t");
        assert!(!c.entry.close_requested());
        let got: Vec<_> = drain(&c).iter().map(|m| m["type"].clone()).collect();
        assert_eq!(got, ["message", "message", "join", "leave"]);
    }

    #[test]
    fn conflation_delivers_the_latest_once_per_interval_with_gap_free_seqs() {
        let t0 = Instant::now();
        let mut hub = hub_with(
            1,
            quiet(vec![config::TopicRule {
                conflate: 0.1,
                ..rule("ticker.")
            }]),
        );
        let c = conn(&mut hub, 1);
        hub.subscribe(at(t0, 0.0), &c, "ticker.btc", None, None, None);
        hub.subscribe(at(t0, 0.0), &c, "chat", None, None, None);
        drain(&c);
        for (i, t) in [0.0, 0.01, 0.02, 0.03].iter().enumerate() {
            publish(&mut hub, at(t0, *t), "ticker.btc", &i.to_string());
            publish(&mut hub, at(t0, *t), "chat", &i.to_string());
        }
        let data = |got: &[Value]| -> Vec<(String, Value, Value)> {
            got.iter()
                .map(|m| {
                    (
                        m["topic"].as_str().unwrap_or("").to_owned(),
                        m["seq"].clone(),
                        m["data"].clone(),
                    )
                })
                .collect()
        };
        // The first at once; chat untouched.
        let got = drain(&c);
        assert_eq!(
            data(&got),
            [
                ("ticker.btc".into(), 1.into(), 0.into()),
                ("chat".into(), 1.into(), 0.into()),
                ("chat".into(), 2.into(), 1.into()),
                ("chat".into(), 3.into(), 2.into()),
                ("chat".into(), 4.into(), 3.into()),
            ]
        );
        assert_eq!(hub.poll_timeout(), Some(at(t0, 0.1).at));
        hub.handle_timeout(at(t0, 0.05));
        assert!(drain(&c).is_empty());
        hub.handle_timeout(at(t0, 0.1));
        assert_eq!(
            data(&drain(&c)),
            [("ticker.btc".into(), 2.into(), 3.into())]
        );
        assert_eq!(history(&hub, "ticker.btc"), [1, 2]);
        // The window reopened and ends empty: closed, no timer.
        hub.handle_timeout(at(t0, 0.2));
        assert_eq!(hub.poll_timeout(), None);
    }

    #[test]
    fn conflation_keeps_the_latest_per_key_and_acks_held_publishes() {
        let t0 = Instant::now();
        let mut hub = hub_with(
            1,
            quiet(vec![config::TopicRule {
                conflate: 0.1,
                conflate_key: Some("pair".into()),
                ..rule("fx")
            }]),
        );
        let c = conn(&mut hub, 1);
        hub.subscribe(at(t0, 0.0), &c, "fx", None, None, None);
        drain(&c);
        let me = ConnRef { shard: 0, conn: 1 };
        for (pair, p) in [("eur", 1), ("gbp", 1), ("eur", 2), ("gbp", 2), ("eur", 3)] {
            hub.handle(
                at(t0, 0.0),
                HubMsg::Publish {
                    topic: "fx".into(),
                    kind: "quote".into(),
                    data: format!(r#"{{"pair":"{pair}","p":{p}}}"#).into(),
                    from: None,
                    reply: Reply::Conn {
                        to: me,
                        id: Some(p.to_string()),
                    },
                    opts: PublishOpts::default(),
                },
            );
        }
        let acks: Vec<_> = drain(&c)
            .into_iter()
            .filter(|m| m["type"] == "ack")
            .map(|m| (m["seq"].clone(), m["conflated"].clone()))
            .collect();
        assert_eq!(acks[0], (1.into(), Value::Null));
        assert!(
            acks[1..].iter().all(|a| a == &(Value::Null, true.into())),
            "{acks:?}"
        );
        hub.handle_timeout(at(t0, 0.1));
        let got: Vec<_> = drain(&c)
            .iter()
            .map(|m| {
                (
                    m["seq"].clone(),
                    m["data"]["pair"].clone(),
                    m["data"]["p"].clone(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (2.into(), "gbp".into(), 2.into()),
                (3.into(), "eur".into(), 3.into())
            ]
        );
    }

    #[test]
    fn per_prefix_write_delay_holds_tickers_and_chat_goes_at_once() {
        let t0 = Instant::now();
        let mut hub = hub_with(
            1,
            quiet(vec![config::TopicRule {
                write_delay: Some(0.2),
                ..rule("ticker.")
            }]),
        );
        let (a, b) = (conn(&mut hub, 1), conn(&mut hub, 2));
        hub.subscribe(at(t0, 0.0), &a, "ticker.1", None, None, None);
        hub.subscribe(at(t0, 0.0), &b, "ticker.1", None, None, None);
        hub.subscribe(at(t0, 0.0), &b, "chat", None, None, None);
        drain(&a);
        drain(&b);
        publish(&mut hub, at(t0, 1.0), "ticker.1", "1");
        assert_eq!(hub.poll_timeout(), Some(at(t0, 1.2).at));
        assert!(!a.entry.mailbox.has_mail() && !b.entry.mailbox.has_mail());
        // Chat is instant: it goes now and takes what b held with it.
        publish(&mut hub, at(t0, 1.05), "chat", "2");
        assert!(b.entry.mailbox.has_mail());
        assert_eq!(drain(&b).len(), 2);
        assert!(!a.entry.mailbox.has_mail());
        hub.handle_timeout(at(t0, 1.2));
        assert_eq!(drain(&a).len(), 1);
    }

    #[test]
    fn user_messages_and_disconnects_reach_every_connection_of_the_user_only() {
        let t0 = Instant::now();
        let mut hub = hub_with(2, quiet(Vec::new()));
        let user_conn = |hub: &mut Hub, id: u64, user: &str| {
            let c = Rc::new(RoomConn {
                entry: Rc::new(ConnHandle::new(id, "127.0.0.1:9".parse().expect("address"))),
                client_id: format!("{id:x}").into(),
                user: user.into(),
                topics: Default::default(),
            });
            hub.attach(c.clone());
            c
        };
        let (a1, a2, b) = (
            user_conn(&mut hub, 1, "alice"),
            user_conn(&mut hub, 2, "alice"),
            user_conn(&mut hub, 3, "bob"),
        );
        let anon = conn(&mut hub, 4);
        hub.publish_to_user(at(t0, 0.0), "alice", "notice", r#"{"n":1}"#, Some("t9"))
            .expect("memory mode");
        for c in [&a1, &a2] {
            let got = drain(c);
            assert_eq!(got.len(), 1);
            assert_eq!(
                (&got[0]["user"], &got[0]["data"]["n"]),
                (&"alice".into(), &1.into())
            );
            assert_eq!(got[0]["trace"], "t9");
        }
        assert!(drain(&b).is_empty() && drain(&anon).is_empty());
        // The other shard is told too.
        let sent: Vec<_> = std::iter::from_fn(|| hub.poll_transmit()).collect();
        assert!(matches!(&sent[..], [(1, HubMsg::ToUser { user, .. })] if &**user == "alice"));
        // A closed connection is forgotten; a disconnect closes the rest with its code.
        hub.detach(at(t0, 0.0), 1);
        hub.disconnect_user(at(t0, 0.0), "alice", 4001)
            .expect("memory mode");
        assert!(!a1.entry.close_requested());
        assert_eq!(a2.entry.take_close_request().map(|c| c.code.0), Some(4001));
        assert!(!b.entry.close_requested());
    }
}
