//! The rooms (`/ws`) tests' client and helpers, shared by `tests/rooms*.rs`: a JSON client that
//! awaits replies by id and stashes the rest, shard and topic placement, the HTTP API and
//! metrics helpers.

use std::borrow::Borrow;
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::future::Future;
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;

use super::*;

/// Three shards even on a 2-core box: most topics live on another shard than most clients.
pub const SHARDS: u64 = 3;

pub fn start(backend: Backend, config: &str) -> Server {
    Server::start_sharded(backend, SHARDS as usize, config, &[])
}

// ---- a `/ws` client --------------------------------------------------------------------------

/// The connection a [`Client`] drives: JSON text out, server messages in. [`Ws`] (tungstenite)
/// for most tests; tests/rooms_deflate.rs has its own, which sees RSV1 and inflates frames
/// itself.
pub trait Wire {
    /// A message from the server: its JSON, and whatever else the connection saw of it.
    type Msg: Borrow<Value>;
    fn send_text(&mut self, text: String) -> impl Future<Output = ()>;
    /// The next data message (control frames handled); panics on anything else, or after
    /// [`PATIENCE`].
    fn recv(&mut self, what: &str) -> impl Future<Output = Self::Msg>;
}

impl Wire for Ws {
    type Msg = Value;

    async fn send_text(&mut self, text: String) {
        within("send", self.send(Message::text(text)))
            .await
            .expect("send");
    }

    async fn recv(&mut self, what: &str) -> Value {
        read_json(self, what).await
    }
}

/// A `/ws` client speaking JSON. Replies are awaited by `id` (or by a predicate); whatever
/// arrives meanwhile is kept, in order, in `stash`.
pub struct Client<W: Wire = Ws> {
    pub ws: W,
    /// `connection_id` of the `connected` message.
    pub id: String,
    pub stash: VecDeque<W::Msg>,
    pub next_id: u64,
}

impl Client<Ws> {
    /// Connects to `/ws` and checks the `connected` greeting.
    pub async fn connect(server: &Server) -> Client {
        Client::greeted(server.ws_path("/ws").await).await
    }

    /// Queues without flushing (see [`Client::flush`]).
    pub async fn feed(&mut self, v: Value) {
        within("feed", self.ws.feed(Message::text(v.to_string())))
            .await
            .expect("feed");
    }

    pub async fn flush(&mut self) {
        within("flush", self.ws.flush()).await.expect("flush");
    }

    /// Resets the TCP connection (no close frame, no FIN: an abrupt disconnect).
    pub fn reset(self) {
        if let MaybeTlsStream::Plain(s) = self.ws.get_ref() {
            // A zero linger time: close sends RST and never blocks.
            socket2::SockRef::from(s)
                .set_linger(Some(Duration::ZERO))
                .expect("SO_LINGER");
        }
        drop(self);
    }
}

impl<W: Wire> Client<W> {
    /// Reads and checks the `connected` greeting on a freshly opened `/ws` connection.
    pub async fn greeted(mut ws: W) -> Client<W> {
        let first = ws.recv("connected").await;
        let first = first.borrow();
        assert_eq!(first["type"], "connected", "first message: {first}");
        let id = first["connection_id"]
            .as_str()
            .unwrap_or_else(|| panic!("connection_id is not a string: {first}"))
            .to_string();
        assert!(!id.is_empty(), "{first}");
        assert_timestamp(&first["timestamp"], first);
        Client {
            ws,
            id,
            stash: VecDeque::new(),
            next_id: 0,
        }
    }

    /// The shard the connection landed on, from its id (`shard << 48 | n` in hex). Only used
    /// to spread clients over the shards; `None` if the id has another shape.
    pub fn shard(&self) -> Option<u64> {
        u64::from_str_radix(&self.id, 16).ok().map(|n| n >> 48)
    }

    pub async fn send(&mut self, v: Value) {
        self.send_text(v.to_string()).await
    }

    pub async fn send_text(&mut self, text: String) {
        self.ws.send_text(text).await
    }

    /// The next message (stashed ones first).
    pub async fn next(&mut self) -> W::Msg {
        match self.stash.pop_front() {
            Some(v) => v,
            None => self.ws.recv("a message").await,
        }
    }

    /// The first message (stashed or new) `pred` accepts; the others stay stashed in order.
    pub async fn until(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> W::Msg {
        if let Some(i) = self.stash.iter().position(|m| pred(m.borrow())) {
            return self.stash.remove(i).expect("stashed");
        }
        loop {
            let m = self.ws.recv(what).await;
            if pred(m.borrow()) {
                return m;
            }
            self.stash.push_back(m);
        }
    }

    /// Sends `req` with a fresh `id` without waiting for the reply; returns the id.
    pub async fn request(&mut self, mut req: Value) -> Value {
        let id = self.fresh_id();
        req["id"] = id.clone();
        self.send(req).await;
        id
    }

    /// The reply to the request with `id`.
    pub async fn reply(&mut self, id: &Value) -> W::Msg {
        self.until(&format!("the reply to id {id}"), |m| {
            m.get("id") == Some(id)
        })
        .await
    }

    /// Sends `req` with `"id": id`; returns the reply carrying that id.
    pub async fn call(&mut self, mut req: Value, id: Value) -> W::Msg {
        req["id"] = id.clone();
        self.send(req).await;
        self.reply(&id).await
    }

    pub fn fresh_id(&mut self) -> Value {
        self.next_id += 1;
        json!(format!("{}-{}", self.id, self.next_id))
    }

    /// Subscribes; returns the `subscribed` reply.
    pub async fn subscribe(&mut self, topic: &str) -> W::Msg {
        self.subscribe_with(json!({"action": "subscribe", "topic": topic}))
            .await
    }

    /// Subscribes with `since` and `epoch` (recovery); returns the `subscribed` reply.
    pub async fn subscribe_since(&mut self, topic: &str, since: u64, epoch: &Value) -> W::Msg {
        self.subscribe_with(
            json!({"action": "subscribe", "topic": topic, "since": since, "epoch": epoch}),
        )
        .await
    }

    pub async fn subscribe_with(&mut self, req: Value) -> W::Msg {
        let id = self.fresh_id();
        let topic = req["topic"].clone();
        let reply = self.call(req, id).await;
        let r = reply.borrow();
        assert_eq!(r["type"], "subscribed", "{r}");
        assert_eq!(r["topic"], topic, "{r}");
        assert!(r["seq"].is_u64(), "seq: {r}");
        assert!(
            r["epoch"].as_str().is_some_and(|e| !e.is_empty()),
            "epoch: {r}"
        );
        reply
    }

    /// Publishes with an id; returns the acknowledged seq.
    pub async fn publish(&mut self, topic: &str, data: Value) -> u64 {
        let id = self.fresh_id();
        let reply = self
            .call(
                json!({"action": "publish", "topic": topic, "data": data}),
                id,
            )
            .await;
        let r = reply.borrow();
        assert_eq!(r["type"], "ack", "{r}");
        r["seq"].as_u64().unwrap_or_else(|| panic!("ack seq: {r}"))
    }

    /// A `ping` round trip: proves the connection is open and everything sent before it was
    /// read by the server.
    pub async fn ping(&mut self) {
        let id = self.fresh_id();
        let reply = self.call(json!({"action": "ping"}), id.clone()).await;
        let r = reply.borrow();
        assert_eq!(r["type"], "pong", "{r}");
        assert_eq!(r["id"], id, "{r}");
        assert_timestamp(&r["timestamp"], r);
    }

    /// The next room message of `topic`.
    pub async fn room_message(&mut self, topic: &str) -> W::Msg {
        self.until(&format!("a message of {topic}"), |m| {
            is_room_message(m, topic)
        })
        .await
    }

    /// The seqs of `topic`'s room messages, up to and including `last`.
    pub async fn room_seqs_until(&mut self, topic: &str, last: u64) -> Vec<u64> {
        let mut got = Vec::new();
        while got.last() != Some(&last) {
            let m = self.room_message(topic).await;
            let seq = m.borrow()["seq"].as_u64();
            got.push(seq.unwrap_or_else(|| panic!("seq: {}", m.borrow())));
        }
        got
    }

    /// Takes the stashed messages matching `pred`, leaving the others.
    pub fn take_stashed(&mut self, pred: impl Fn(&Value) -> bool) -> Vec<W::Msg> {
        let (hit, rest): (Vec<W::Msg>, Vec<W::Msg>) = std::mem::take(&mut self.stash)
            .into_iter()
            .partition(|m| pred(m.borrow()));
        self.stash = rest.into();
        hit
    }
}

pub async fn read_json(ws: &mut Ws, what: &str) -> Value {
    let m = loop {
        match tokio::time::timeout(PATIENCE, ws.next()).await {
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => {}
            Ok(Some(Ok(m))) => break m,
            Ok(other) => panic!("waiting for {what}: stream ended or failed: {other:?}"),
            Err(_) => panic!("timed out waiting for {what}"),
        }
    };
    match m {
        Message::Text(t) => serde_json::from_str(&t)
            .unwrap_or_else(|e| panic!("server sent invalid JSON ({e}): {t}")),
        other => panic!("waiting for {what}: expected a JSON text message, got {other:?}"),
    }
}

pub fn assert_timestamp(t: &Value, msg: &Value) {
    let t = t.as_f64().unwrap_or_else(|| panic!("timestamp: {msg}"));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        (t - now).abs() < 60.0,
        "timestamp {t} is not now ({now}): {msg}"
    );
}

/// A room message (not a reply or a presence event) of `topic`.
pub fn is_room_message(m: &Value, topic: &str) -> bool {
    m["topic"] == topic && m["seq"].is_u64() && m["type"] != "subscribed"
}

pub fn is_presence_event(m: &Value, topic: &str) -> bool {
    m["topic"] == topic && (m["type"] == "join" || m["type"] == "leave")
}

pub fn seqs(messages: &Value) -> Vec<u64> {
    messages
        .as_array()
        .unwrap_or_else(|| panic!("messages: {messages}"))
        .iter()
        .map(|m| m["seq"].as_u64().expect("seq"))
        .collect()
}

pub fn member_ids(members: &Value) -> BTreeSet<String> {
    members
        .as_array()
        .unwrap_or_else(|| panic!("members: {members}"))
        .iter()
        .map(|m| {
            assert_eq!(m["user"], "anonymous", "{m}");
            assert_timestamp(&m["joined_at"], m);
            m["client_id"].as_str().expect("client_id").to_string()
        })
        .collect()
}

pub fn ids<const N: usize>(clients: [&Client; N]) -> BTreeSet<String> {
    clients.iter().map(|c| c.id.clone()).collect()
}

/// Connects until there are `per_shard` clients on every shard (the kernel spreads connections
/// over the shards' listeners); the extra connections are closed.
pub async fn clients_on_every_shard(server: &Server, per_shard: usize) -> Vec<Client> {
    let mut by_shard: HashMap<u64, Vec<Client>> = HashMap::new();
    let mut spare = Vec::new();
    for _ in 0..400 {
        if (0..SHARDS).all(|s| by_shard.get(&s).is_some_and(|v| v.len() >= per_shard)) {
            break;
        }
        let c = Client::connect(server).await;
        match c.shard() {
            Some(s) => {
                let list = by_shard.entry(s).or_default();
                if list.len() < per_shard {
                    list.push(c);
                }
            }
            None => spare.push(c),
        }
        if spare.len() >= per_shard * SHARDS as usize {
            return spare; // ids without a shard: take what we have
        }
    }
    let mut out: Vec<Client> = by_shard.into_values().flatten().collect();
    assert_eq!(
        out.len(),
        per_shard * SHARDS as usize,
        "could not get {per_shard} connection(s) on each of {SHARDS} shards"
    );
    out.sort_by(|a, b| a.id.cmp(&b.id));
    out
}

/// The shard `ringgate` homes `topic` on (a std `DefaultHasher` of the name, as src/hub does);
/// only used to pick topics that cover every shard.
pub fn home_of(topic: &str) -> u64 {
    let mut h = DefaultHasher::new();
    topic.hash(&mut h);
    h.finish() % SHARDS
}

/// `per_shard` topic names homed on each shard.
pub fn topics_on_every_shard(prefix: &str, per_shard: usize) -> Vec<String> {
    let mut count = vec![0; SHARDS as usize];
    let mut out = Vec::new();
    for i in 0.. {
        if count.iter().all(|&n| n >= per_shard) {
            break;
        }
        let t = format!("{prefix}{i}");
        let h = home_of(&t) as usize;
        if count[h] < per_shard {
            count[h] += 1;
            out.push(t);
        }
    }
    out
}

// ---- HTTP API helpers ------------------------------------------------------------------------

pub async fn api_publish(server: &Server, auth: &str, body: &Value) -> HttpResponse {
    server.post("/api/publish", auth, &body.to_string()).await
}

pub fn json_body(r: &HttpResponse) -> Value {
    serde_json::from_str(&r.body)
        .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {r:?}"))
}

/// `GET path` with extra header lines.
pub async fn get_with(server: &Server, path: &str, extra: &str) -> HttpResponse {
    server
        .request(&format!(
            "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{extra}\r\n"
        ))
        .await
}

// ---- metrics -------------------------------------------------------------------------------

/// The samples of `name`: (their `shard` label, value).
pub async fn samples(server: &Server, name: &str) -> Vec<(String, f64)> {
    let resp = server.get("/metrics").await;
    assert_eq!(resp.status, 200);
    let lines = resp.body.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .map(|s| {
            let v = match s.value {
                prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            };
            (s.labels.get("shard").unwrap_or("").to_string(), v)
        })
        .collect()
}

/// Per-shard values of gauge `name` (label `shard`).
pub async fn gauge_by_shard(server: &Server, name: &str) -> HashMap<String, f64> {
    samples(server, name).await.into_iter().collect()
}

/// The sum of every sample of `name`.
pub async fn metric_sum(server: &Server, name: &str) -> f64 {
    samples(server, name).await.iter().map(|(_, v)| v).sum()
}

/// Waits (the gauges are published once a second) until the sums of the rooms and
/// subscriptions gauges over every shard are `rooms` and `subs`. Polls on the wall clock: the
/// gauges come from the server process's once-a-second sweep, which no test clock reaches.
pub async fn wait_for_room_gauges(server: &Server, rooms: f64, subs: f64) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let r = gauge_by_shard(server, "ringgate_rooms").await;
        let s = gauge_by_shard(server, "ringgate_subscriptions").await;
        let every_shard = r.len() == SHARDS as usize && s.len() == SHARDS as usize;
        if every_shard && r.values().sum::<f64>() == rooms && s.values().sum::<f64>() == subs {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "expected ringgate_rooms = {rooms} and ringgate_subscriptions = {subs} summed \
             over {SHARDS} shards; have rooms {r:?}, subscriptions {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
