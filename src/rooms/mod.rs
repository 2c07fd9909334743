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
pub mod conn;
pub mod proto;
mod redis;
pub mod room;
#[cfg(test)]
mod sim;

use std::cell::{OnceCell, RefCell};
use std::collections::hash_map::DefaultHasher;
use std::collections::{HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use slab::Slab;
use tokio::sync::oneshot;

use crate::metrics as m;
use crate::ws::deflate::{self, Tuning};
use crate::ws::frame::{header_len, write_frame, OpCode};
use crate::ws::handle::ConnHandle;
use crate::ws::mailbox::{Broadcast, Outgoing};
use conn::RoomConn;
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
    /// `[cluster] engine = "redis"` and Redis is down or too slow: why.
    Unavailable(String),
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
        /// JSON text.
        data: Box<str>,
        from: Option<Arc<str>>,
        reply: Reply,
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
    /// A message for every subscriber of `topic` on the receiving shard.
    Deliver {
        topic: Arc<str>,
        msg: Broadcast,
        /// When the home shard took the publish (publish-to-queue latency).
        at: Instant,
    },
    /// A reply for one connection (JSON text).
    Reply {
        conn: u64,
        text: Bytes,
    },
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
    /// `[rooms] write_delay`, when set.
    write_delay: Option<Duration>,
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
    // Subscriber side.
    /// This shard's subscribers per topic.
    local: HashMap<Arc<str>, Slab<Rc<ConnHandle>>>,
    /// This shard's `/ws` connections, for replies by id.
    conns: HashMap<u64, Rc<RoomConn>>,
    subscriptions: usize,
    /// Numbers this shard's subscribe requests.
    requests: u64,
    /// With `write_delay`: connections holding room messages not yet handed to their session.
    delayed: Vec<Rc<ConnHandle>>,
    /// When `delayed` is released: set by the first message held.
    delay_due: Option<Instant>,
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
            write_delay: cfg.write_delay(),
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
            local: HashMap::new(),
            conns: HashMap::new(),
            subscriptions: 0,
            requests: 0,
            delayed: Vec::new(),
            delay_due: None,
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

    /// When [`handle_timeout`](Self::handle_timeout) is due: the end of the write delay of the
    /// messages held now. Set by the first held message and unchanged until it is handled.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.delay_due
    }

    /// The write delay is over: every connection holding room messages writes them.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.delay_due.is_some_and(|due| due <= now) {
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

    /// Sends `msg` to the home shard of its topic.
    pub fn route(&mut self, now: Now, topic: &str, msg: HubMsg) {
        let home = self.home_of(topic);
        self.send(now, home, msg)
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
            } => self.home_publish(now, topic, &kind, &data, from.as_deref(), reply),
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
            HubMsg::Deliver { topic, msg, at } => self.local_deliver(now.at, &topic, msg, at),
            HubMsg::Reply { conn, text } => {
                if let Some(c) = self.conns.get(&conn) {
                    c.entry.send(Outgoing::Text(text), self.limit);
                }
            }
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

    /// Broadcasts a presence event to the room's subscribers, when the room emits them.
    fn presence_event(&mut self, now: Now, topic: &Arc<str>, kind: &str, member: &Member) {
        let Some(room) = self.rooms.get(topic) else {
            return;
        };
        if !self.cfg.presence_events_for(topic, room.member_count()) {
            return;
        }
        let text = proto::presence_event(kind, topic, &member.client_id, &member.user);
        let msg = Broadcast {
            frame: text_frame(text.as_bytes()),
            deflated: None,
        };
        let shards: Vec<usize> = room.subscriber_shards().collect();
        self.fan_out(now, topic, &shards, msg);
    }

    fn fan_out(&mut self, now: Now, topic: &Arc<str>, shards: &[usize], msg: Broadcast) {
        for &s in shards {
            self.send(
                now,
                s,
                HubMsg::Deliver {
                    topic: topic.clone(),
                    msg: msg.clone(),
                    at: now.at,
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
        // Others hear of the join before the new member is on any delivery list.
        if joined {
            self.presence_event(now, topic, "join", &member);
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
            self.presence_event(now, &topic, "leave", &member);
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

    fn home_publish(
        &mut self,
        now: Now,
        topic: Arc<str>,
        kind: &str,
        data: &str,
        from: Option<&str>,
        reply: Reply,
    ) {
        if self.cluster.is_some() {
            return self.redis_publish(now, &topic, kind, data, from, reply);
        }
        let tuning = self.tuning;
        let room = self.room(&topic);
        let seq = room.next_seq();
        let text = proto::room_message(kind, &topic, seq, data, from, now.wall);
        let payload = text.as_bytes();
        let msg = Broadcast {
            frame: text_frame(payload),
            deflated: if room.shared_deflate > 0 {
                deflate::conn::shared_frame(payload, tuning)
            } else {
                None
            },
        };
        let shards: Vec<usize> = room.subscriber_shards().collect();
        let stored = Stored {
            seq,
            at: now.at,
            msg: msg.clone(),
        };
        self.keep(&topic, stored);
        ::metrics::counter!(m::PUBLISHED).increment(1);
        self.fan_out(now, &topic, &shards, msg);
        // No history kept and nobody listening: nothing to remember.
        self.free_if_idle(&topic);
        let ack = match &reply {
            Reply::Conn { id: Some(id), .. } => proto::ack(id, seq),
            Reply::Conn { id: None, .. } => return,
            _ => String::new(),
        };
        self.answer(now, reply, ack, ApiAnswer::Published { seq });
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
                let list: Vec<&[u8]> = room
                    .history_after(since, limit)
                    .map(|e| &e.msg.frame[crate::ws::frame::payload_offset(&e.msg.frame)..])
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
        self.conns.insert(conn.entry.id, conn);
    }

    /// A `/ws` connection closed: it leaves every topic (each `leave` is emitted once), in
    /// name order, so the same inputs always make the same outputs.
    pub fn detach(&mut self, now: Now, conn_id: u64) {
        let Some(conn) = self.conns.remove(&conn_id) else {
            return;
        };
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
        let topic: Arc<str> = topic.into();
        // A repeated subscribe keeps the subscription as it is; the home shard answers again.
        self.requests += 1;
        let fresh = self.requests;
        let request = match *conn
            .topics
            .borrow_mut()
            .entry(topic.clone())
            .or_insert(conn::Sub::Pending(fresh))
        {
            conn::Sub::Pending(n) => n,
            conn::Sub::Active(_) => 0,
        };
        let msg = HubMsg::Subscribe {
            topic: topic.clone(),
            from: ConnRef {
                shard: self.shard,
                conn: conn.entry.id,
            },
            member: conn.member(now.wall),
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

    fn local_deliver(&mut self, now: Instant, topic: &str, msg: Broadcast, at: Instant) {
        let Some(list) = self.local.get(topic) else {
            return;
        };
        let msg = &Rc::new(msg);
        if let Some(delay) = self.write_delay {
            for (_, entry) in list.iter() {
                if entry.queue_broadcast(msg, Some(at), self.limit) {
                    self.delayed.push(entry.clone());
                }
            }
            if self.delay_due.is_none() && !self.delayed.is_empty() {
                self.delay_due = Some(now + delay);
            }
        } else {
            for (_, entry) in list.iter() {
                entry.send_broadcast(msg, Some(at), self.limit);
            }
        }
        ::metrics::histogram!(m::FANOUT).record(list.len() as f64);
        ::metrics::histogram!(m::PUBLISH_LATENCY)
            .record(now.saturating_duration_since(at).as_secs_f64());
    }

    /// Once a second: expire history, free idle rooms, publish gauges.
    pub fn sweep(&mut self, now: Now) {
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
}

impl SharedHub {
    pub fn new(hub: Hub) -> SharedHub {
        SharedHub {
            hub: RefCell::new(hub),
            flush: OnceCell::new(),
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

/// An unmasked text frame holding `payload`, as shareable bytes.
fn text_frame(payload: &[u8]) -> Bytes {
    let mut f = Vec::with_capacity(header_len(payload.len()) + payload.len());
    write_frame(&mut f, OpCode::Text, payload);
    Bytes::from(f)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        hub.handle(
            now,
            HubMsg::Publish {
                topic: topic.into(),
                kind: "message".into(),
                data: data.into(),
                from: None,
                reply: Reply::None,
            },
        );
    }

    fn history(hub: &Hub, topic: &str) -> Vec<u64> {
        let Some(room) = hub.rooms.get(topic) else {
            return Vec::new();
        };
        room.history_after(0, usize::MAX).map(|m| m.seq).collect()
    }

    fn conn(hub: &mut Hub, id: u64) -> Rc<RoomConn> {
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
    fn drain(c: &RoomConn) -> Vec<serde_json::Value> {
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
        hub.handle_timeout(at(t0, 1.09).at);
        assert!(!c.entry.mailbox.has_mail(), "released early");
        hub.handle_timeout(at(t0, 1.1).at);
        assert_eq!(hub.poll_timeout(), None);
        assert!(c.entry.mailbox.has_mail());
        let seqs: Vec<_> = drain(&c).iter().map(|m| m["seq"].clone()).collect();
        assert_eq!(seqs, [1, 2]);
    }
}
