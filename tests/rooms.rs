//! Rooms (`/ws`) and the backend API (`/api/*`) of PROTOCOL.md, over real sockets against the
//! real binary with several shards, so topics are homed on other shards than their publishers
//! and subscribers: protocol basics, ordering under concurrent publishers, recovery, presence,
//! slow consumers, fan-out, every client error, and rooms freed after use.

mod common;

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;

both_backends!(
    protocol_basics,
    ordering_concurrent_publishers,
    recovery_replays_exactly_the_missed_messages,
    recovery_lost_after_history_overflow_or_wrong_epoch,
    recovery_after_history_expired_gets_a_new_epoch,
    resubscribe_with_since_while_a_subscribe_is_in_flight,
    a_repeated_subscribe_replays_nothing_of_its_own,
    ids_and_json_escaping_round_trip,
    presence_join_leave_and_query,
    presence_events_off_by_prefix_and_member_cap,
    slow_consumer_closed_1013_others_get_everything,
    fanout_2000_subscribers_exact_counts,
    write_delay_holds_room_messages_not_replies,
    every_client_error_keeps_the_connection_open,
    integers_beyond_64_bits_are_bad_json,
    publish_rate_limited,
    subscribe_unsubscribe_cycles_leave_no_rooms,
    api_publish_presence_history,
    api_publish_without_key_configured,
    room_metrics_follow_traffic,
);

/// Three shards even on a 2-core box: most topics live on another shard than most clients.
const SHARDS: u64 = 3;

fn start(backend: Backend, config: &str) -> Server {
    Server::start_sharded(backend, SHARDS as usize, config, &[])
}

// ---- a `/ws` client --------------------------------------------------------------------------

/// A `/ws` client speaking JSON. Replies are awaited by `id` (or by a predicate); whatever
/// arrives meanwhile is kept, in order, in `stash`.
struct Client {
    ws: Ws,
    /// `connection_id` of the `connected` message.
    id: String,
    stash: VecDeque<Value>,
    next_id: u64,
}

impl Client {
    /// Connects to `/ws` and checks the `connected` greeting.
    async fn connect(server: &Server) -> Client {
        let mut ws = server.ws_path("/ws").await;
        let first = read_json(&mut ws, "connected").await;
        assert_eq!(first["type"], "connected", "first message: {first}");
        let id = first["connection_id"]
            .as_str()
            .unwrap_or_else(|| panic!("connection_id is not a string: {first}"))
            .to_string();
        assert!(!id.is_empty(), "{first}");
        assert_timestamp(&first["timestamp"], &first);
        Client {
            ws,
            id,
            stash: VecDeque::new(),
            next_id: 0,
        }
    }

    /// The shard the connection landed on, from its id (`shard << 48 | n` in hex). Only used
    /// to spread clients over the shards; `None` if the id has another shape.
    fn shard(&self) -> Option<u64> {
        u64::from_str_radix(&self.id, 16).ok().map(|n| n >> 48)
    }

    async fn send(&mut self, v: Value) {
        self.send_text(v.to_string()).await
    }

    async fn send_text(&mut self, text: String) {
        within("send", self.ws.send(Message::text(text)))
            .await
            .expect("send");
    }

    /// Queues without flushing (see [`Client::flush`]).
    async fn feed(&mut self, v: Value) {
        within("feed", self.ws.feed(Message::text(v.to_string())))
            .await
            .expect("feed");
    }

    async fn flush(&mut self) {
        within("flush", self.ws.flush()).await.expect("flush");
    }

    /// The next message (stashed ones first).
    async fn next(&mut self) -> Value {
        match self.stash.pop_front() {
            Some(v) => v,
            None => read_json(&mut self.ws, "a message").await,
        }
    }

    /// The first message (stashed or new) `pred` accepts; the others stay stashed in order.
    async fn until(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.stash.iter().position(&pred) {
            return self.stash.remove(i).expect("stashed");
        }
        loop {
            let v = read_json(&mut self.ws, what).await;
            if pred(&v) {
                return v;
            }
            self.stash.push_back(v);
        }
    }

    /// Sends `req` with `"id": id`; returns the reply carrying that id.
    async fn call(&mut self, mut req: Value, id: Value) -> Value {
        req["id"] = id.clone();
        self.send(req).await;
        self.until(&format!("the reply to id {id}"), |m| {
            m.get("id") == Some(&id)
        })
        .await
    }

    fn fresh_id(&mut self) -> Value {
        self.next_id += 1;
        json!(format!("{}-{}", self.id, self.next_id))
    }

    /// Subscribes; returns the `subscribed` reply.
    async fn subscribe(&mut self, topic: &str) -> Value {
        self.subscribe_with(json!({"action": "subscribe", "topic": topic}))
            .await
    }

    async fn subscribe_with(&mut self, req: Value) -> Value {
        let id = self.fresh_id();
        let topic = req["topic"].clone();
        let r = self.call(req, id).await;
        assert_eq!(r["type"], "subscribed", "{r}");
        assert_eq!(r["topic"], topic, "{r}");
        assert!(r["seq"].is_u64(), "seq: {r}");
        assert!(
            r["epoch"].as_str().is_some_and(|e| !e.is_empty()),
            "epoch: {r}"
        );
        r
    }

    /// Publishes with an id; returns the acknowledged seq.
    async fn publish(&mut self, topic: &str, data: Value) -> u64 {
        let id = self.fresh_id();
        let r = self
            .call(
                json!({"action": "publish", "topic": topic, "data": data}),
                id,
            )
            .await;
        assert_eq!(r["type"], "ack", "{r}");
        r["seq"].as_u64().unwrap_or_else(|| panic!("ack seq: {r}"))
    }

    /// A `ping` round trip: proves the connection is open and everything sent before it was
    /// read by the server.
    async fn ping(&mut self) {
        let id = self.fresh_id();
        let r = self.call(json!({"action": "ping"}), id.clone()).await;
        assert_eq!(r["type"], "pong", "{r}");
        assert_eq!(r["id"], id, "{r}");
        assert_timestamp(&r["timestamp"], &r);
    }

    /// The next room message of `topic`.
    async fn room_message(&mut self, topic: &str) -> Value {
        self.until(&format!("a message of {topic}"), |m| {
            is_room_message(m, topic)
        })
        .await
    }

    /// Takes the stashed messages matching `pred`, leaving the others.
    fn take_stashed(&mut self, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        let (hit, rest): (Vec<Value>, Vec<Value>) = std::mem::take(&mut self.stash)
            .into_iter()
            .partition(|m| pred(m));
        self.stash = rest.into();
        hit
    }

    /// Resets the TCP connection (no close frame, no FIN: an abrupt disconnect).
    fn reset(self) {
        if let MaybeTlsStream::Plain(s) = self.ws.get_ref() {
            // A zero linger time: close sends RST and never blocks.
            socket2::SockRef::from(s)
                .set_linger(Some(Duration::ZERO))
                .expect("SO_LINGER");
        }
        drop(self);
    }
}

async fn read_json(ws: &mut Ws, what: &str) -> Value {
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

fn assert_timestamp(t: &Value, msg: &Value) {
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
fn is_room_message(m: &Value, topic: &str) -> bool {
    m["topic"] == topic && m["seq"].is_u64() && m["type"] != "subscribed"
}

fn is_presence_event(m: &Value, topic: &str) -> bool {
    m["topic"] == topic && (m["type"] == "join" || m["type"] == "leave")
}

fn seqs(messages: &Value) -> Vec<u64> {
    messages
        .as_array()
        .unwrap_or_else(|| panic!("messages: {messages}"))
        .iter()
        .map(|m| m["seq"].as_u64().expect("seq"))
        .collect()
}

fn member_ids(members: &Value) -> BTreeSet<String> {
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

fn ids<const N: usize>(clients: [&Client; N]) -> BTreeSet<String> {
    clients.iter().map(|c| c.id.clone()).collect()
}

/// Connects until there are `per_shard` clients on every shard (the kernel spreads connections
/// over the shards' listeners); the extra connections are closed.
async fn clients_on_every_shard(server: &Server, per_shard: usize) -> Vec<Client> {
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
fn home_of(topic: &str) -> u64 {
    let mut h = DefaultHasher::new();
    topic.hash(&mut h);
    h.finish() % SHARDS
}

/// `per_shard` topic names homed on each shard.
fn topics_on_every_shard(prefix: &str, per_shard: usize) -> Vec<String> {
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

async fn api_publish(server: &Server, auth: &str, body: &Value) -> HttpResponse {
    server.post("/api/publish", auth, &body.to_string()).await
}

fn json_body(r: &HttpResponse) -> Value {
    serde_json::from_str(&r.body)
        .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {r:?}"))
}

/// `GET path` with extra header lines.
async fn get_with(server: &Server, path: &str, extra: &str) -> HttpResponse {
    server
        .request(&format!(
            "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{extra}\r\n"
        ))
        .await
}

// ---- metrics -------------------------------------------------------------------------------

/// The samples of `name`: (their `shard` label, value).
async fn samples(server: &Server, name: &str) -> Vec<(String, f64)> {
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
async fn gauge_by_shard(server: &Server, name: &str) -> HashMap<String, f64> {
    samples(server, name).await.into_iter().collect()
}

/// The sum of every sample of `name`.
async fn metric_sum(server: &Server, name: &str) -> f64 {
    samples(server, name).await.iter().map(|(_, v)| v).sum()
}

/// Waits (the gauges are published once a second) until the sums of the rooms and
/// subscriptions gauges over every shard are `rooms` and `subs`. Polls on the wall clock: the
/// gauges come from the server process's once-a-second sweep, which no test clock reaches.
async fn wait_for_room_gauges(server: &Server, rooms: f64, subs: f64) {
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

// ---- 1. protocol basics --------------------------------------------------------------------

async fn protocol_basics(backend: Backend) {
    let server = start(backend, "");
    let mut a = Client::connect(&server).await;
    let mut b = Client::connect(&server).await;
    assert_ne!(a.id, b.id, "connection ids are unique");
    let topic = "basics";

    // Subscribe: numeric id echoed as a number, string id as a string.
    let s = a
        .call(json!({"action": "subscribe", "topic": topic}), json!(1))
        .await;
    assert_eq!(s["type"], "subscribed", "{s}");
    assert_eq!(s["topic"], topic, "{s}");
    assert_eq!(s["seq"], 0, "a new topic has seq 0: {s}");
    assert_eq!(s["id"], json!(1), "{s}");
    let epoch = s["epoch"].as_str().expect("epoch").to_string();
    assert!(!epoch.is_empty());
    let s = b
        .call(
            json!({"action": "subscribe", "topic": topic}),
            json!("sub-b"),
        )
        .await;
    assert_eq!(
        (&s["type"], &s["seq"], &s["epoch"], &s["id"]),
        (
            &json!("subscribed"),
            &json!(0),
            &json!(epoch),
            &json!("sub-b")
        ),
        "{s}"
    );

    // Publish with id: ack with the seq; every subscriber gets the message.
    let ack = b
        .call(
            json!({"action": "publish", "topic": topic, "type": "stats_update",
                   "data": {"cpu": 45.2}}),
            json!("p1"),
        )
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(ack["id"], "p1", "{ack}");
    assert_eq!(ack["seq"], 1, "{ack}");
    for c in [&mut a, &mut b] {
        let m = c.room_message(topic).await;
        assert_eq!(m["type"], "stats_update", "{m}");
        assert_eq!(m["seq"], 1, "{m}");
        assert_eq!(m["data"], json!({"cpu": 45.2}), "{m}");
        assert!(
            m["from"].as_str().is_some_and(|f| !f.is_empty()),
            "from: {m}"
        );
        assert_timestamp(&m["timestamp"], &m);
    }

    // Publish without id: no ack. The ack of the next publish (same connection, same topic)
    // comes after anything the first could have caused.
    b.send(json!({"action": "publish", "topic": topic, "data": "two"}))
        .await;
    let ack = b
        .call(
            json!({"action": "publish", "topic": topic, "data": [3]}),
            json!(3),
        )
        .await;
    assert_eq!(
        (&ack["type"], &ack["seq"]),
        (&json!("ack"), &json!(3)),
        "{ack}"
    );
    let stray = b.take_stashed(|m| m["type"] == "ack");
    assert!(
        stray.is_empty(),
        "a publish without id was acked: {stray:?}"
    );
    for c in [&mut a, &mut b] {
        let m = c.room_message(topic).await;
        assert_eq!(m["seq"], 2, "{m}");
        assert_eq!(m["type"], "message", "default type: {m}");
        assert_eq!(m["data"], "two", "{m}");
        let m = c.room_message(topic).await;
        assert_eq!((&m["seq"], &m["data"]), (&json!(3), &json!([3])), "{m}");
    }

    // Ping with and without id.
    let p = a.call(json!({"action": "ping"}), json!(7)).await;
    assert_eq!(p["type"], "pong", "{p}");
    assert_timestamp(&p["timestamp"], &p);
    a.send(json!({"action": "ping"})).await;
    let p = a.until("pong", |m| m["type"] == "pong").await;
    assert!(p.get("id").is_none(), "pong without id got one: {p}");

    // Presence and history, with ids.
    let pr = a
        .call(json!({"action": "presence", "topic": topic}), json!("pr"))
        .await;
    assert_eq!(
        (&pr["type"], &pr["topic"]),
        (&json!("presence"), &json!(topic)),
        "{pr}"
    );
    assert_eq!(member_ids(&pr["members"]), ids([&a, &b]), "{pr}");
    let h = a
        .call(json!({"action": "history", "topic": topic}), json!("h"))
        .await;
    assert_eq!(
        (&h["type"], &h["topic"]),
        (&json!("history"), &json!(topic)),
        "{h}"
    );
    assert_eq!(h["epoch"], epoch.as_str(), "{h}");
    assert_eq!(seqs(&h["messages"]), vec![1, 2, 3], "{h}");
    let first = &h["messages"][0];
    assert_eq!(
        (&first["type"], &first["topic"], &first["data"]),
        (&json!("stats_update"), &json!(topic), &json!({"cpu": 45.2})),
        "history holds messages as delivered: {h}"
    );
    let h = a
        .call(
            json!({"action": "history", "topic": topic, "since": 1}),
            json!(8),
        )
        .await;
    assert_eq!(seqs(&h["messages"]), vec![2, 3], "since=1: {h}");
    let h = a
        .call(
            json!({"action": "history", "topic": topic, "since": 0, "limit": 2}),
            json!(9),
        )
        .await;
    let got = seqs(&h["messages"]);
    assert!(
        got == vec![1, 2] || got == vec![2, 3],
        "limit=2 gives two consecutive messages: {h}"
    );

    // Unsubscribe: no more messages, and presence without a.
    a.send(json!({"action": "unsubscribe", "topic": topic}))
        .await;
    a.ping().await; // the server has read the unsubscribe
    a.stash.clear();
    assert_eq!(b.publish(topic, json!(4)).await, 4);
    assert_eq!(b.room_message(topic).await["seq"], 4);
    // The presence reply travels from the home shard after the publish's delivery would have.
    let pr = a
        .call(json!({"action": "presence", "topic": topic}), json!("pr2"))
        .await;
    assert_eq!(member_ids(&pr["members"]), ids([&b]), "{pr}");
    let late = a.take_stashed(|m| is_room_message(m, topic));
    assert!(late.is_empty(), "messages after unsubscribe: {late:?}");
}

// ---- 2. ordering ---------------------------------------------------------------------------

/// Publishers on every shard and the HTTP API publish to topics homed on every shard at the
/// same time; every subscriber gets each topic's messages in seq order, with no gap and no
/// duplicate, and each seq carries the publish that was acknowledged with it.
async fn ordering_concurrent_publishers(backend: Backend) {
    const PER_PUBLISHER: usize = 300;
    const HTTP: usize = 60;
    let server = start(backend, "[rooms]\npublish_rate = 0\n");
    let topics = topics_on_every_shard("ord.", 2);
    let n_topics = topics.len();

    let mut subscribers = clients_on_every_shard(&server, 2).await;
    for s in subscribers.iter_mut() {
        for t in &topics {
            let r = s.subscribe(t).await;
            assert_eq!(r["seq"], 0, "{r}");
        }
    }
    let publishers = clients_on_every_shard(&server, 2).await;
    let n_pub = publishers.len();

    // Expected count per topic, and the final fence seq.
    let mut expected = vec![0u64; n_topics];
    for p in 0..n_pub {
        for i in 0..PER_PUBLISHER {
            expected[(p + i) % n_topics] += 1;
        }
    }
    for i in 0..HTTP {
        expected[i % n_topics] += 1;
    }

    // Subscribers read until the fence (seq expected+1) of every topic.
    let readers: Vec<_> = subscribers
        .into_iter()
        .map(|mut s| {
            let topics = topics.clone();
            let expected = expected.clone();
            tokio::spawn(async move {
                let mut last = vec![0u64; topics.len()];
                let mut got: Vec<Vec<Value>> = vec![Vec::new(); topics.len()];
                while (0..topics.len()).any(|k| last[k] <= expected[k]) {
                    let m = s.next().await;
                    let Some(k) = topics.iter().position(|t| is_room_message(&m, t)) else {
                        continue; // join events of the other subscribers
                    };
                    let seq = m["seq"].as_u64().expect("seq");
                    assert_eq!(
                        seq,
                        last[k] + 1,
                        "subscriber {}: {} out of order / gap / duplicate: {m}",
                        s.id,
                        topics[k]
                    );
                    last[k] = seq;
                    got[k].push(m);
                }
                (s.id.clone(), got)
            })
        })
        .collect();

    // WebSocket publishers: every publish has an id; the acks give each one's seq.
    let pubs: Vec<_> = publishers
        .into_iter()
        .enumerate()
        .map(|(p, mut c)| {
            let topics = topics.clone();
            tokio::spawn(async move {
                let mut sent = HashMap::new();
                for i in 0..PER_PUBLISHER {
                    let t = &topics[(p + i) % topics.len()];
                    let id = format!("{p}-{i}");
                    c.feed(json!({"action": "publish", "topic": t, "id": id,
                                  "data": {"p": p, "i": i}}))
                        .await;
                    sent.insert(id, (t.clone(), json!({"p": p, "i": i})));
                    if i % 16 == 15 {
                        c.flush().await;
                        tokio::task::yield_now().await;
                    }
                }
                c.flush().await;
                let mut acked = Vec::new();
                while acked.len() < PER_PUBLISHER {
                    let m = c.next().await;
                    assert_eq!(m["type"], "ack", "publisher {p}: {m}");
                    let id = m["id"].as_str().expect("ack id");
                    let (t, data) = sent.remove(id).expect("ack for an unknown id");
                    acked.push((t, m["seq"].as_u64().expect("ack seq"), data));
                }
                (c, acked)
            })
        })
        .collect();

    // HTTP publishes at the same time.
    let mut acked = Vec::new();
    for i in 0..HTTP {
        let t = &topics[i % n_topics];
        let data = json!({"p": "http", "i": i});
        let r = api_publish(&server, "", &json!({"topic": t, "data": data})).await;
        assert_eq!(r.status, 200, "{r:?}");
        let seq = json_body(&r)["seq"].as_u64().expect("seq");
        acked.push((t.clone(), seq, data));
    }
    let mut fencer = None;
    for p in pubs {
        let (c, a) = within("publisher", p).await.expect("publisher task");
        acked.extend(a);
        fencer = Some(c);
    }
    let mut fencer = fencer.expect("a publisher");
    for t in &topics {
        fencer.publish(t, json!("fence")).await;
    }

    // Each seq of each topic was acknowledged exactly once.
    let mut by_seq: HashMap<(String, u64), Value> = HashMap::new();
    for (t, seq, data) in acked {
        let k = (t.clone(), seq);
        assert!(
            !by_seq.contains_key(&k),
            "seq {seq} of {t} acknowledged twice"
        );
        by_seq.insert(k, data);
    }
    for (k, t) in topics.iter().enumerate() {
        for seq in 1..=expected[k] {
            assert!(
                by_seq.contains_key(&(t.clone(), seq)),
                "seq {seq} of {t} never acked"
            );
        }
    }

    // Every subscriber got exactly the acknowledged message at each seq.
    for r in readers {
        let (id, got) = within("subscriber", r).await.expect("subscriber task");
        for (k, t) in topics.iter().enumerate() {
            assert_eq!(got[k].len() as u64, expected[k] + 1, "{id}: count of {t}");
            let mut last_i: HashMap<String, i64> = HashMap::new();
            for m in &got[k][..expected[k] as usize] {
                let seq = m["seq"].as_u64().unwrap();
                assert_eq!(
                    Some(&m["data"]),
                    by_seq.get(&(t.clone(), seq)),
                    "{id}: seq {seq} of {t} carries another publish"
                );
                // One publisher's messages keep their order.
                let p = m["data"]["p"].to_string();
                let i = m["data"]["i"].as_i64().unwrap();
                let prev = last_i.insert(p.clone(), i).unwrap_or(-1);
                assert!(
                    i > prev,
                    "{id}: publisher {p} reordered on {t}: {i} after {prev}"
                );
            }
        }
    }
}

// ---- 3. recovery ---------------------------------------------------------------------------

/// A subscriber that reconnects with `since` + `epoch` while a publisher keeps publishing gets
/// exactly the messages it missed, then the live ones: no gap, no duplicate.
async fn recovery_replays_exactly_the_missed_messages(backend: Backend) {
    const TOTAL: u64 = 400;
    let server = start(backend, "[rooms]\npublish_rate = 0\nhistory_size = 1000\n");
    let topic = "rec";
    let mut publisher = Client::connect(&server).await;
    let mut sub = Client::connect(&server).await;
    let epoch = sub.subscribe(topic).await["epoch"].clone();
    for i in 1..=10u64 {
        assert_eq!(publisher.publish(topic, json!(i)).await, i);
    }
    for i in 1..=10u64 {
        let m = sub.room_message(topic).await;
        assert_eq!((&m["seq"], &m["data"]), (&json!(i), &json!(i)), "{m}");
    }
    drop(sub); // gone without a goodbye
    for i in 11..=20u64 {
        assert_eq!(publisher.publish(topic, json!(i)).await, i);
    }

    // Keep publishing while the subscriber comes back.
    let publishing = tokio::spawn(async move {
        for i in 21..=TOTAL {
            publisher
                .send(json!({"action": "publish", "topic": topic, "data": i, "id": i}))
                .await;
            if i % 8 == 0 {
                tokio::task::yield_now().await;
            }
        }
        for _ in 21..=TOTAL {
            let m = publisher.next().await;
            assert_eq!(m["type"], "ack", "{m}");
            assert_eq!(m["seq"], m["id"], "seq follows the publish order: {m}");
        }
    });
    let mut sub = Client::connect(&server).await;
    let r = sub
        .subscribe_with(json!({"action": "subscribe", "topic": topic, "since": 10,
                               "epoch": epoch}))
        .await;
    assert_eq!(r["recovered"], true, "{r}");
    assert_eq!(r["epoch"], epoch, "{r}");
    let at = r["seq"].as_u64().unwrap();
    assert!((20..=TOTAL).contains(&at), "{r}");
    let early = sub.take_stashed(|m| is_room_message(m, topic));
    assert!(
        early.is_empty(),
        "messages before the subscribed reply: {early:?}"
    );
    for i in 11..=TOTAL {
        let m = sub.room_message(topic).await;
        assert_eq!(
            (&m["seq"], &m["data"]),
            (&json!(i), &json!(i)),
            "replay ({}..={at}) then live: expected seq {i}, got {m}",
            11
        );
    }
    within("publisher", publishing).await.expect("publisher");
    // Nothing doubled after the last one.
    sub.ping().await;
    let extra = sub.take_stashed(|m| is_room_message(m, topic));
    assert!(extra.is_empty(), "extra messages: {extra:?}");
}

/// With `history_size = 5`: recovery exactly at the edge of history works, one message beyond
/// it gives `recovered: false` (and no replay); a wrong epoch or a future `since` too.
async fn recovery_lost_after_history_overflow_or_wrong_epoch(backend: Backend) {
    let server = start(backend, "[rooms]\npublish_rate = 0\nhistory_size = 5\n");
    let topic = "ovf";
    let mut publisher = Client::connect(&server).await;
    let mut sub = Client::connect(&server).await;
    let epoch = sub.subscribe(topic).await["epoch"].clone();
    for i in 1..=2u64 {
        assert_eq!(publisher.publish(topic, json!(i)).await, i);
        assert_eq!(sub.room_message(topic).await["seq"], i);
    }
    drop(sub);
    for i in 3..=12u64 {
        assert_eq!(publisher.publish(topic, json!(i)).await, i);
    }
    // History holds 8..=12 now.

    // `since` beyond history: not recovered, nothing replayed, live messages follow.
    let mut lost = Client::connect(&server).await;
    let r = lost
        .subscribe_with(json!({"action": "subscribe", "topic": topic, "since": 2,
                               "epoch": epoch}))
        .await;
    assert_eq!(
        r["recovered"], false,
        "history of 5 cannot cover since=2: {r}"
    );
    assert_eq!(r["seq"], 12, "{r}");
    let r = lost
        .subscribe_with(
            json!({"action": "subscribe", "topic": "ovf.other", "since": 0,
                               "epoch": epoch}),
        )
        .await;
    assert_eq!(r["recovered"], false, "another topic's epoch: {r}");

    let mut edge = Client::connect(&server).await;
    let r = edge
        .subscribe_with(json!({"action": "subscribe", "topic": topic, "since": 7,
                               "epoch": epoch}))
        .await;
    assert_eq!(r["recovered"], true, "history 8..=12 covers since=7: {r}");
    let mut beyond = Client::connect(&server).await;
    let r = beyond
        .subscribe_with(json!({"action": "subscribe", "topic": topic, "since": 6,
                               "epoch": epoch}))
        .await;
    assert_eq!(r["recovered"], false, "history 8..=12 misses 7: {r}");
    let mut current = Client::connect(&server).await;
    let r = current
        .subscribe_with(json!({"action": "subscribe", "topic": topic, "since": 12,
                               "epoch": epoch}))
        .await;
    assert_eq!(r["recovered"], true, "nothing missed: {r}");
    let mut wrong_epoch = Client::connect(&server).await;
    let r = wrong_epoch
        .subscribe_with(json!({"action": "subscribe", "topic": topic, "since": 10,
                               "epoch": "not-the-epoch"}))
        .await;
    assert_eq!(r["recovered"], false, "wrong epoch: {r}");
    let mut future = Client::connect(&server).await;
    let r = future
        .subscribe_with(json!({"action": "subscribe", "topic": topic, "since": 1000,
                               "epoch": epoch}))
        .await;
    assert_eq!(r["recovered"], false, "since from the future: {r}");

    assert_eq!(publisher.publish(topic, json!(13)).await, 13);
    let expect = |from: u64| (from..=13).collect::<Vec<u64>>();
    for (name, c, want) in [
        ("lost", &mut lost, expect(13)),
        ("edge", &mut edge, expect(8)),
        ("beyond", &mut beyond, expect(13)),
        ("current", &mut current, expect(13)),
        ("wrong epoch", &mut wrong_epoch, expect(13)),
        ("future", &mut future, expect(13)),
    ] {
        let mut got = Vec::new();
        while got.last() != Some(&13) {
            got.push(c.room_message(topic).await["seq"].as_u64().unwrap());
        }
        assert_eq!(got, want, "{name}: replay then live");
    }
}

/// History older than `history_ttl` is gone: a room with no subscriber and no history is
/// freed, and its next lifetime has a new epoch, so `since` from the old one is not recovered.
/// The rules are proven in virtual time (rooms unit tests and rooms::sim); this end-to-end
/// check waits for the binary's own sweep on the wall clock, as nothing else can advance it.
async fn recovery_after_history_expired_gets_a_new_epoch(backend: Backend) {
    let server = start(backend, "[rooms]\nhistory_ttl = 1\n");
    let topic = "ttl";
    let mut c = Client::connect(&server).await;
    let epoch = c.subscribe(topic).await["epoch"].clone();
    for i in 1..=3u64 {
        assert_eq!(c.publish(topic, json!(i)).await, i);
    }
    c.send(json!({"action": "unsubscribe", "topic": topic}))
        .await;
    c.ping().await;
    // Poll the history until it is empty (expiry runs once a second).
    let deadline = Instant::now() + PATIENCE;
    loop {
        let id = c.fresh_id();
        let h = c
            .call(json!({"action": "history", "topic": topic}), id)
            .await;
        if h["messages"].as_array().is_some_and(|m| m.is_empty()) {
            break;
        }
        assert!(Instant::now() < deadline, "history never expired: {h}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let r = c
        .subscribe_with(json!({"action": "subscribe", "topic": topic, "since": 3,
                               "epoch": epoch}))
        .await;
    assert_eq!(r["recovered"], false, "history expired: {r}");
    assert_ne!(
        r["epoch"], epoch,
        "a new lifetime of the topic's history: {r}"
    );
}

/// subscribe, unsubscribe, subscribe-with-since sent back to back (the first answer still on
/// its way from the home shard): the last subscribe decides, so its replay must arrive.
async fn resubscribe_with_since_while_a_subscribe_is_in_flight(backend: Backend) {
    let server = start(backend, "[rooms]\npublish_rate = 0\n");
    let mut publisher = Client::connect(&server).await;
    for round in 0..20 {
        let topic = format!("inflight.{round}");
        let epoch = publisher.subscribe(&topic).await["epoch"].clone();
        for i in 1..=10u64 {
            assert_eq!(publisher.publish(&topic, json!(i)).await, i);
        }
        let mut c = Client::connect(&server).await;
        c.feed(json!({"action": "subscribe", "topic": topic, "id": "first"}))
            .await;
        c.feed(json!({"action": "unsubscribe", "topic": topic}))
            .await;
        let r = c
            .call(
                json!({"action": "subscribe", "topic": topic, "since": 5, "epoch": epoch}),
                json!("second"),
            )
            .await;
        assert_eq!(r["type"], "subscribed", "{r}");
        assert_eq!(r["recovered"], true, "{r}");
        assert_eq!(publisher.publish(&topic, json!(11)).await, 11);
        let mut got = Vec::new();
        while got.last() != Some(&11) {
            got.push(c.room_message(&topic).await["seq"].as_u64().unwrap());
        }
        assert_eq!(
            got,
            (6..=11).collect::<Vec<u64>>(),
            "round {round}: after subscribe, unsubscribe, subscribe since=5: replay 6..=10, \
             then live 11 (stash: {:?})",
            c.stash
        );
    }
}

/// Two subscribes with different `since` back to back (the second sent before the first is
/// answered), then one more once subscribed: the first decides the replay; the repeats are
/// answered without `recovered` and replay nothing, so every message arrives exactly once.
async fn a_repeated_subscribe_replays_nothing_of_its_own(backend: Backend) {
    let server = start(backend, "[rooms]\npublish_rate = 0\n");
    let mut publisher = Client::connect(&server).await;
    for round in 0..10 {
        let topic = format!("repeat.{round}");
        let epoch = publisher.subscribe(&topic).await["epoch"].clone();
        for i in 1..=10u64 {
            assert_eq!(publisher.publish(&topic, json!(i)).await, i);
        }
        let mut c = Client::connect(&server).await;
        let sub = |since: u64, id: &str| {
            json!({"action": "subscribe", "topic": topic, "since": since, "epoch": epoch,
                   "id": id})
        };
        c.feed(sub(2, "first")).await;
        c.feed(sub(6, "second")).await;
        c.flush().await;
        let first = c.until("the first answer", |m| m["id"] == "first").await;
        assert_eq!(first["recovered"], true, "{first}");
        let second = c.until("the second answer", |m| m["id"] == "second").await;
        assert_eq!(second["type"], "subscribed", "{second}");
        assert!(second.get("recovered").is_none(), "a repeat: {second}");
        let third = c.call(sub(9, "third"), json!("third")).await;
        assert_eq!(third["type"], "subscribed", "{third}");
        assert!(third.get("recovered").is_none(), "a repeat: {third}");
        assert_eq!(publisher.publish(&topic, json!(11)).await, 11);
        let mut got = Vec::new();
        while got.last() != Some(&11) {
            got.push(c.room_message(&topic).await["seq"].as_u64().unwrap());
        }
        assert_eq!(
            got,
            (3..=11).collect::<Vec<u64>>(),
            "round {round}: the first subscribe's replay (since 2), then live, once each"
        );
    }
}

/// Ids of every JSON kind come back as sent; topics, types and data with escapes and
/// non-ASCII text survive the server's re-encoding.
async fn ids_and_json_escaping_round_trip(backend: Backend) {
    let server = start(backend, "");
    let mut c = Client::connect(&server).await;
    for id in [
        json!(""),
        json!("with \"quotes\" and \\ and \u{1} and ünïcödé 𝄞"),
        json!(0),
        json!(-3),
        json!(1.5),
        json!(u64::MAX),
    ] {
        let r = c.call(json!({"action": "ping"}), id.clone()).await;
        assert_eq!(r["type"], "pong", "{r}");
        let e = c.call(json!({"action": "nope"}), id.clone()).await;
        assert_eq!(e["code"], "unknown_action", "{e}");
    }
    // Not a string or a number: no id on the reply.
    c.send(json!({"action": "ping", "id": {"a": 1}})).await;
    let p = c.until("pong", |m| m["type"] == "pong").await;
    assert!(p.get("id").is_none(), "{p}");

    let topic = "t \"q\" \\ / \n € 𝄞";
    let data = json!({"s": "a\"b\\c\u{0}\u{1f}\u{2028}é𝄞", "n": -1.5e-7, "big": u64::MAX,
                      "neg": i64::MIN, "arr": [null, true, false, {}, []], "nested": {"x": {"y": [1]}}});
    c.subscribe(topic).await;
    let ack = c
        .call(
            json!({"action": "publish", "topic": topic, "type": "ty\"pe é", "data": data}),
            json!(1),
        )
        .await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let m = c.room_message(topic).await;
    assert_eq!(m["type"], "ty\"pe é", "{m}");
    assert_eq!(m["data"], data, "data round trip");
    let h = c
        .call(json!({"action": "history", "topic": topic}), json!(2))
        .await;
    assert_eq!(h["topic"], topic, "{h}");
    assert_eq!(h["messages"][0]["data"], data, "{h}");
}

// ---- 4. presence ---------------------------------------------------------------------------

async fn presence_join_leave_and_query(backend: Backend) {
    let server = start(backend, "");
    let topic = "lobby";
    let mut a = Client::connect(&server).await;
    a.subscribe(topic).await;
    let mut b = Client::connect(&server).await;
    b.subscribe(topic).await;

    let join = a.until("join of b", |m| is_presence_event(m, topic)).await;
    assert_eq!(
        join,
        json!({"type": "join", "topic": topic, "client_id": b.id, "user": "anonymous"}),
        "the join's client_id is the connection_id of `connected`"
    );
    let pr = a
        .call(json!({"action": "presence", "topic": topic}), json!("q"))
        .await;
    assert_eq!(member_ids(&pr["members"]), ids([&a, &b]), "{pr}");
    let api = get_with(&server, &format!("/api/presence?topic={topic}"), "").await;
    assert_eq!(api.status, 200, "{api:?}");
    let body = json_body(&api);
    assert_eq!(body["topic"], topic, "{body}");
    assert_eq!(member_ids(&body["members"]), ids([&a, &b]), "{body}");

    // Unsubscribe, clean close, close without close frame (FIN), reset (RST): one leave each.
    b.send(json!({"action": "unsubscribe", "topic": topic}))
        .await;
    let leave = a.until("leave of b", |m| is_presence_event(m, topic)).await;
    assert_eq!(
        leave,
        json!({"type": "leave", "topic": topic, "client_id": b.id, "user": "anonymous"})
    );
    let mut events = Vec::new();
    for how in ["close frame", "fin", "reset"] {
        let mut c = Client::connect(&server).await;
        c.subscribe(topic).await;
        let id = c.id.clone();
        let join = a.until("join", |m| is_presence_event(m, topic)).await;
        assert_eq!(
            (&join["type"], &join["client_id"]),
            (&json!("join"), &json!(id))
        );
        match how {
            "close frame" => {
                let close = CloseFrame {
                    code: CloseCode::Normal,
                    reason: "bye".into(),
                };
                within("close", c.ws.close(Some(close)))
                    .await
                    .expect("close");
                drop(c);
            }
            "fin" => drop(c),
            _ => c.reset(),
        }
        let leave = a.until("leave", |m| is_presence_event(m, topic)).await;
        assert_eq!(
            (&leave["type"], &leave["client_id"]),
            (&json!("leave"), &json!(id)),
            "{how}"
        );
        events.push(id);
    }
    // A fence through the same home shard: no second leave came before it.
    let seq = a.publish(topic, json!("fence")).await;
    loop {
        let m = a.room_message(topic).await;
        if m["seq"] == seq {
            break;
        }
    }
    let extra = a.take_stashed(|m| is_presence_event(m, topic));
    assert!(
        extra.is_empty(),
        "more presence events than one leave each: {extra:?}"
    );
    let pr = a
        .call(json!({"action": "presence", "topic": topic}), json!("q2"))
        .await;
    assert_eq!(member_ids(&pr["members"]), ids([&a]), "{pr}");
    let body = json_body(&get_with(&server, &format!("/api/presence?topic={topic}"), "").await);
    assert_eq!(member_ids(&body["members"]), ids([&a]), "{body}");
}

async fn presence_events_off_by_prefix_and_member_cap(backend: Backend) {
    let server = start(
        backend,
        "[rooms]\npresence_events_off = [\"quiet.\"]\npresence_events_max_members = 3\n",
    );
    let (quiet, loud) = ("quiet.room", "loud.room");
    let mut a = Client::connect(&server).await;
    a.subscribe(quiet).await;
    a.subscribe(loud).await;
    let mut b = Client::connect(&server).await;
    b.subscribe(quiet).await;
    b.subscribe(loud).await;
    let pr = a
        .call(json!({"action": "presence", "topic": quiet}), json!(1))
        .await;
    assert_eq!(
        member_ids(&pr["members"]),
        ids([&a, &b]),
        "presence queries work without events: {pr}"
    );
    // With 3 members the loud room still emits; a 4th member is over the cap.
    let mut c = Client::connect(&server).await;
    c.subscribe(loud).await;
    let mut d = Client::connect(&server).await;
    d.subscribe(loud).await;
    b.send(json!({"action": "unsubscribe", "topic": quiet}))
        .await;
    b.send(json!({"action": "unsubscribe", "topic": loud}))
        .await;
    b.ping().await;
    // Fences through the same home shards.
    for t in [quiet, loud] {
        let seq = a.publish(t, json!("fence")).await;
        while a.room_message(t).await["seq"] != seq {}
    }
    let q = a.take_stashed(|m| is_presence_event(m, quiet));
    assert!(q.is_empty(), "{quiet} is off by prefix: {q:?}");
    let l: Vec<(Value, Value)> = a
        .take_stashed(|m| is_presence_event(m, loud))
        .into_iter()
        .map(|m| (m["type"].clone(), m["client_id"].clone()))
        .collect();
    assert!(
        l.starts_with(&[(json!("join"), json!(b.id)), (json!("join"), json!(c.id))]),
        "{loud}: joins of b and c (3 members at most): {l:?}"
    );
    assert!(
        !l.contains(&(json!("join"), json!(d.id))),
        "{loud}: d is the 4th member, over presence_events_max_members = 3: {l:?}"
    );
}

// ---- 5. slow consumer ----------------------------------------------------------------------

/// A subscriber that stops reading is closed with 1013 once its queue is over
/// `max_outbound_bytes`, while every other subscriber gets every message.
async fn slow_consumer_closed_1013_others_get_everything(backend: Backend) {
    // Bursts of 8 x 4 KiB stay well under the 64 KiB limit for a subscriber that reads. How
    // much the slow one's socket buffers absorb depends on the kernel (loopback send buffers
    // grow to MBs), so publishing goes on until the server reports the slow consumer closed
    // (at most MAX messages), then a few more batches.
    const BATCH: u64 = 8;
    const MAX: u64 = 8000;
    let server = start(
        backend,
        "max_outbound_bytes = 65536\n[rooms]\npublish_rate = 0\n",
    );
    let topic = "firehose";
    // The slow one: a small receive buffer, subscribed, then never reads.
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let stream = within("connect", sock.connect(server.addr))
        .await
        .expect("connect");
    let mut slow = RawWs::handshake(stream, "/ws").await;
    let hello = slow.read_frame().await.expect("connected");
    assert_eq!(hello.opcode, OP_TEXT);
    let hello: Value = serde_json::from_slice(&hello.payload).expect("JSON");
    let slow_id = hello["connection_id"].clone();
    let sub = json!({"action": "subscribe", "topic": topic, "id": "s"}).to_string();
    slow.send(&frame(true, OP_TEXT, sub.as_bytes())).await;
    loop {
        let f = slow.read_frame().await.expect("subscribed");
        let v: Value = serde_json::from_slice(&f.payload).expect("JSON");
        if v["type"] == "subscribed" {
            break;
        }
    }

    let mut fast = clients_on_every_shard(&server, 1).await;
    for c in fast.iter_mut() {
        c.subscribe(topic).await;
    }
    let mut publisher = Client::connect(&server).await;
    let pad = "x".repeat(4 * 1024);
    let mut next = vec![1u64; fast.len()];
    let mut end = 0;
    let mut closed_at = None;
    while closed_at.is_none_or(|at| end < at + 4 * BATCH) {
        assert!(
            end < MAX,
            "{end} messages of 4 KiB and the subscriber that never reads is still not \
             closed as a slow consumer (max_outbound_bytes = 65536)"
        );
        for i in end + 1..=end + BATCH {
            publisher
                .feed(json!({"action": "publish", "topic": topic,
                             "data": {"i": i, "pad": pad}}))
                .await;
        }
        publisher.flush().await;
        end += BATCH;
        // Every fast subscriber keeps up with each batch, whatever the slow one does.
        for (k, c) in fast.iter_mut().enumerate() {
            while next[k] <= end {
                let m = c.room_message(topic).await;
                assert_eq!(m["seq"], next[k], "fast subscriber {k}: {m}");
                assert_eq!(m["data"]["i"], next[k], "{m}");
                next[k] += 1;
            }
        }
        if closed_at.is_none()
            && end % (4 * BATCH) == 0
            && metric_sum(&server, "ringgate_slow_consumer_closes_total").await >= 1.0
        {
            closed_at = Some(end);
        }
    }
    let n = end;
    let errors = publisher.take_stashed(|m| m["type"] == "error");
    assert!(errors.is_empty(), "publishes refused: {errors:?}");
    for c in fast.iter_mut() {
        c.ping().await;
        let extra = c.take_stashed(|m| is_room_message(m, topic));
        assert!(extra.is_empty(), "more than {n} messages: {}", extra.len());
    }

    // The slow one: a prefix of the messages, in order, then 1013.
    let mut seen = 0u64;
    let code = loop {
        match slow.read_frame().await {
            Some(f) if f.opcode == OP_TEXT => {
                let v: Value = serde_json::from_slice(&f.payload).expect("JSON");
                if is_room_message(&v, topic) {
                    seen += 1;
                    assert_eq!(v["seq"], seen, "the slow consumer's prefix is in order");
                }
            }
            Some(f) if f.opcode == OP_CLOSE => break f.close_code(),
            Some(f) if f.opcode == OP_PING => {}
            other => panic!("slow consumer: expected messages then a close frame, got {other:?}"),
        }
    };
    assert_eq!(code, Some(1013), "slow consumer close code");
    assert!(
        seen < n,
        "the slow consumer cannot have taken all {n} messages"
    );
    slow.expect_eof().await;

    // The others hear it leave, once.
    let seq = publisher.publish(topic, json!("fence")).await;
    for c in fast.iter_mut() {
        let leave = c
            .until("leave of the slow consumer", |m| {
                m["type"] == "leave" && m["client_id"] == slow_id
            })
            .await;
        assert_eq!(leave["topic"], topic, "{leave}");
        while c.room_message(topic).await["seq"] != seq {}
        let again = c.take_stashed(|m| m["type"] == "leave" && m["client_id"] == slow_id);
        assert!(again.is_empty(), "a second leave: {again:?}");
    }
}

// ---- 6. fan-out ----------------------------------------------------------------------------

async fn fanout_2000_subscribers_exact_counts(backend: Backend) {
    const SUBSCRIBERS: usize = 2000;
    const N: u64 = 40;
    let server = start(
        backend,
        "[rooms]\npublish_rate = 0\npresence_events = false\n",
    );
    let topic = "fan";
    let mut subs = Vec::with_capacity(SUBSCRIBERS);
    while subs.len() < SUBSCRIBERS {
        let batch = futures_util::future::join_all((0..100).map(|_| async {
            let mut c = Client::connect(&server).await;
            c.send(json!({"action": "subscribe", "topic": topic, "id": "s"}))
                .await;
            c
        }))
        .await;
        subs.extend(batch);
    }
    let shards: BTreeSet<Option<u64>> = subs.iter().map(|c| c.shard()).collect();
    assert!(
        shards.len() > 1,
        "subscribers on one shard only: {shards:?}"
    );
    // A subscription is on its shard's delivery list once its `subscribed` reply is sent: with
    // every reply in, every subscriber gets the first publish.
    let subs = futures_util::future::join_all(subs.into_iter().map(|mut c| async move {
        let r = c.until("subscribed", |m| m["id"] == "s").await;
        assert_eq!(
            (&r["type"], &r["seq"]),
            (&json!("subscribed"), &json!(0)),
            "{r}"
        );
        c
    }))
    .await;
    let readers: Vec<_> = subs
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let mut n = 0u64;
                loop {
                    let m = c.room_message(topic).await;
                    assert_eq!(m["seq"], n + 1, "{}: gap or duplicate: {m}", c.id);
                    if m["data"] == "end" {
                        break;
                    }
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut publisher = Client::connect(&server).await;
    let pr = publisher
        .call(json!({"action": "presence", "topic": topic}), json!("p"))
        .await;
    assert_eq!(pr["members"].as_array().map(Vec::len), Some(SUBSCRIBERS));
    for i in 1..=N {
        publisher
            .feed(json!({"action": "publish", "topic": topic, "data": {"i": i, "pad": "0123456789abcdef0123456789abcdef"}}))
            .await;
    }
    publisher.flush().await;
    assert_eq!(publisher.publish(topic, json!("end")).await, N + 1);
    let mut delivered = 0;
    for r in readers {
        let n = within("subscriber", r).await.expect("subscriber task");
        assert_eq!(n, N, "every subscriber gets exactly {N} messages");
        delivered += n;
    }
    assert_eq!(delivered, N * SUBSCRIBERS as u64);
}

/// `[rooms] write_delay`: a room message waits that long before its subscribers' writes start
/// (so one write carries the whole window), while replies such as acks are not held; nothing
/// is lost or reordered. Only lower bounds on time are asserted: a slow machine only makes
/// deliveries later. The hub's part is proven in virtual time (rooms unit tests, rooms::sim);
/// this checks the binary's timer, which runs on the server's wall clock.
async fn write_delay_holds_room_messages_not_replies(backend: Backend) {
    const DELAY: Duration = Duration::from_secs(1);
    const N: u64 = 5;
    let server = start(
        backend,
        "[rooms]\npublish_rate = 0\npresence_events = false\nwrite_delay = 1.0\n",
    );
    let topic = "held";
    let mut sub = Client::connect(&server).await;
    sub.subscribe(topic).await;
    let mut publisher = Client::connect(&server).await;
    let first_publish = Instant::now();
    for i in 1..=N {
        assert_eq!(publisher.publish(topic, json!(i)).await, i);
    }
    let acked = first_publish.elapsed();
    // The subscriber's own traffic does not end the hold: its pong comes back at once, the
    // room messages stay held (on io_uring the session also runs when a write completes).
    sub.ping().await;
    let early = sub.stash.iter().any(|m| is_room_message(m, topic));
    assert!(
        !early || first_publish.elapsed() >= DELAY,
        "room messages arrived with the pong, before the write delay"
    );
    let m = sub.room_message(topic).await;
    let held = first_publish.elapsed();
    assert_eq!(m["seq"], 1, "{m}");
    // Tokio's timer rounds up to whole milliseconds; allow for that and nothing more.
    assert!(
        held >= DELAY - Duration::from_millis(2),
        "the first message arrived after {held:?}, before the write delay"
    );
    assert!(
        acked < held,
        "acks ({acked:?}) must not wait for the delay like room messages ({held:?})"
    );
    for i in 2..=N {
        let m = sub.room_message(topic).await;
        assert_eq!((&m["seq"], &m["data"]), (&json!(i), &json!(i)), "{m}");
    }
    // The delay holds each batch, not only the first: the next publish waits again.
    let again = Instant::now();
    publisher.publish(topic, json!("next")).await;
    let m = sub.room_message(topic).await;
    assert_eq!(m["seq"], N + 1, "{m}");
    assert!(again.elapsed() >= DELAY - Duration::from_millis(2));
}

// ---- 7. client errors ----------------------------------------------------------------------

/// Sends `text` and expects an `error` with `code` (and `id` echoed when the request had one);
/// then proves the connection is still open.
async fn expect_error(c: &mut Client, text: &str, code: &str, id: Option<Value>) {
    c.send_text(text.to_string()).await;
    expect_error_reply(c, text, code, id).await;
}

async fn expect_error_reply(c: &mut Client, sent: &str, code: &str, id: Option<Value>) {
    let e = c.until("an error", |m| m["type"] == "error").await;
    assert_eq!(e["code"], code, "sent {sent:.200}, got {e}");
    assert!(
        e["error"].as_str().is_some_and(|t| !t.is_empty()),
        "human readable error text: {e}"
    );
    match id {
        Some(id) => assert_eq!(e["id"], id, "id echoed on the error to {sent:.200}: {e}"),
        None => assert!(e.get("id").is_none(), "{e}"),
    }
    c.ping().await;
    let stray = c.take_stashed(|m| m.get("id").is_some() || m["type"] == "error");
    assert!(
        stray.is_empty(),
        "unexpected replies after {sent:.200}: {stray:?}"
    );
}

/// An integer beyond 64 bits anywhere in a message is refused, without its id (the message was
/// not read); the largest and smallest 64-bit integers are published and delivered exactly.
async fn integers_beyond_64_bits_are_bad_json(backend: Backend) {
    let server = start(backend, "");
    let mut c = Client::connect(&server).await;
    c.subscribe("wide").await;
    for text in [
        r#"{"action":"publish","topic":"wide","data":18446744073709551616,"id":"a"}"#,
        r#"{"action":"publish","topic":"wide","data":{"n":[-9223372036854775809]},"id":"b"}"#,
        r#"{"action":"ping","id":100000000000000000000}"#,
    ] {
        expect_error(&mut c, text, "bad_json", None).await;
    }
    let data = json!({"max": u64::MAX, "min": i64::MIN});
    assert_eq!(
        c.publish("wide", data.clone()).await,
        1,
        "the refused ones took no seq"
    );
    assert_eq!(c.room_message("wide").await["data"], data);
}

async fn every_client_error_keeps_the_connection_open(backend: Backend) {
    let server = start(
        backend,
        "[rooms]\npublish_rate = 0\nmax_topics_per_connection = 3\n",
    );
    let mut c = Client::connect(&server).await;

    // bad_json: garbage, not an object, a binary frame.
    for text in [
        "garbage{",
        "",
        "[1,2,3]",
        "\"subscribe\"",
        "42",
        "null",
        "{\"action\":",
    ] {
        expect_error(&mut c, text, "bad_json", None).await;
    }
    within(
        "send binary",
        c.ws.send(Message::binary(br#"{"action":"ping","id":1}"#.to_vec())),
    )
    .await
    .expect("send");
    expect_error_reply(&mut c, "a binary frame", "bad_json", None).await;

    // unknown_action.
    expect_error(
        &mut c,
        r#"{"action":"dance","id":"u1"}"#,
        "unknown_action",
        Some(json!("u1")),
    )
    .await;
    expect_error(
        &mut c,
        r#"{"action":"SUBSCRIBE","topic":"t","id":2}"#,
        "unknown_action",
        Some(json!(2)),
    )
    .await;

    // missing_field: absent fields and wrong types.
    for (text, id) in [
        (r#"{"id":"m1"}"#, json!("m1")),
        (r#"{"action":5,"id":"m2"}"#, json!("m2")),
        (r#"{"action":"subscribe","id":"m3"}"#, json!("m3")),
        (r#"{"action":"subscribe","topic":7,"id":"m4"}"#, json!("m4")),
        (
            r#"{"action":"subscribe","topic":"","id":"m5"}"#,
            json!("m5"),
        ),
        (
            r#"{"action":"subscribe","topic":"t","since":"3","id":"m6"}"#,
            json!("m6"),
        ),
        (
            r#"{"action":"subscribe","topic":"t","since":-1,"id":"m7"}"#,
            json!("m7"),
        ),
        (
            r#"{"action":"subscribe","topic":"t","epoch":5,"id":"m8"}"#,
            json!("m8"),
        ),
        (r#"{"action":"unsubscribe","id":"m9"}"#, json!("m9")),
        (
            r#"{"action":"publish","topic":"t","id":"m10"}"#,
            json!("m10"),
        ),
        (r#"{"action":"publish","data":1,"id":"m11"}"#, json!("m11")),
        (
            r#"{"action":"publish","topic":"t","type":3,"data":1,"id":"m12"}"#,
            json!("m12"),
        ),
        (r#"{"action":"presence","id":"m13"}"#, json!("m13")),
        (r#"{"action":"history","id":"m14"}"#, json!("m14")),
        (
            r#"{"action":"history","topic":"t","limit":"x","id":"m15"}"#,
            json!("m15"),
        ),
        (
            r#"{"action":"history","topic":"t","since":1.5,"id":"m16"}"#,
            json!("m16"),
        ),
        (
            r#"{"action":"publish","topic":["t"],"data":1,"id":17}"#,
            json!(17),
        ),
    ] {
        expect_error(&mut c, text, "missing_field", Some(id)).await;
    }

    // too_large: topic length (128 is the limit), data size (65536 bytes of JSON), topics.
    let t128 = "t".repeat(128);
    let t129 = "t".repeat(129);
    assert_eq!(
        c.publish(&t128, json!(1)).await,
        1,
        "a 128-byte topic is fine"
    );
    for action in ["subscribe", "publish", "presence", "history"] {
        let req = json!({"action": action, "topic": t129, "data": 1, "id": action});
        expect_error(&mut c, &req.to_string(), "too_large", Some(json!(action))).await;
    }
    let fits = "d".repeat(65536 - 2); // a JSON string: two quotes
    assert_eq!(
        c.publish("data", json!(fits)).await,
        1,
        "65536 bytes of data fit"
    );
    let over = "d".repeat(65536 - 1);
    let req = json!({"action": "publish", "topic": "data", "data": over, "id": "big"});
    expect_error(&mut c, &req.to_string(), "too_large", Some(json!("big"))).await;
    for t in ["t1", "t2", "t3"] {
        c.subscribe(t).await;
    }
    let req = json!({"action": "subscribe", "topic": "t4", "id": "many"});
    expect_error(&mut c, &req.to_string(), "too_large", Some(json!("many"))).await;
    c.subscribe("t1").await; // again: not a new topic
    c.send(json!({"action": "unsubscribe", "topic": "t1"}))
        .await;
    c.subscribe("t4").await; // room again after an unsubscribe

    // not_subscribed.
    let req = json!({"action": "unsubscribe", "topic": "never", "id": "ns"});
    expect_error(
        &mut c,
        &req.to_string(),
        "not_subscribed",
        Some(json!("ns")),
    )
    .await;
    let req = json!({"action": "unsubscribe", "topic": "t1", "id": "ns2"});
    expect_error(
        &mut c,
        &req.to_string(),
        "not_subscribed",
        Some(json!("ns2")),
    )
    .await;

    // After all that the connection still works end to end.
    let seq = c.publish("t4", json!("still here")).await;
    assert_eq!(c.room_message("t4").await["seq"], seq);
}

async fn publish_rate_limited(backend: Backend) {
    let server = start(backend, "[rooms]\npublish_rate = 1\npublish_burst = 2\n");
    let mut c = Client::connect(&server).await;
    let topic = "rl";
    c.subscribe(topic).await;
    assert_eq!(c.publish(topic, json!(1)).await, 1);
    assert_eq!(c.publish(topic, json!(2)).await, 2);
    let req = json!({"action": "publish", "topic": topic, "data": 3, "id": "third"});
    expect_error(
        &mut c,
        &req.to_string(),
        "rate_limited",
        Some(json!("third")),
    )
    .await;
    // Other requests are not rate limited.
    for _ in 0..5 {
        c.ping().await;
    }
    // The bucket is per connection. (Its refill is ratelimit's unit test, in virtual time.)
    let mut other = Client::connect(&server).await;
    assert_eq!(other.publish(topic, json!("other")).await, 3);
    let got: Vec<Value> = {
        let mut v = Vec::new();
        while v.len() < 3 {
            v.push(c.room_message(topic).await["data"].clone());
        }
        v
    };
    assert_eq!(
        got,
        vec![json!(1), json!(2), json!("other")],
        "refused publish was not delivered"
    );
}

// ---- 8. no rooms left behind ---------------------------------------------------------------

/// Many subscribe/unsubscribe cycles (awaited, and racing the home shard's answer), publishes,
/// and abrupt disconnects: afterwards no room and no subscription is left on any shard.
async fn subscribe_unsubscribe_cycles_leave_no_rooms(backend: Backend) {
    const CLIENTS: usize = 4;
    const ROUNDS: usize = 25;
    const BATCH: usize = 200; // 4 * 25 * 200 = 20,000 cycles
    let server = start(
        backend,
        "[rooms]\npublish_rate = 0\nrequest_rate = 0\nmax_topics_per_connection = 1000\nhistory_ttl = 1\n",
    );
    wait_for_room_gauges(&server, 0.0, 0.0).await;

    // While held, the gauges count the rooms and subscriptions (so they can show a leak).
    let mut holder = Client::connect(&server).await;
    for k in 0..300 {
        holder
            .feed(json!({"action": "subscribe", "topic": format!("hold.{k}")}))
            .await;
    }
    holder.flush().await;
    let mut other = Client::connect(&server).await;
    for k in 0..100 {
        other
            .feed(json!({"action": "subscribe", "topic": format!("hold.{k}")}))
            .await;
    }
    other.flush().await;
    wait_for_room_gauges(&server, 300.0, 400.0).await;
    other.reset(); // an abrupt disconnect frees its subscriptions
    wait_for_room_gauges(&server, 300.0, 300.0).await;

    let workers: Vec<_> = (0..CLIENTS)
        .map(|w| {
            let c = Client::connect(&server);
            async move {
                let mut c = c.await;
                for round in 0..ROUNDS {
                    // Half the topics are shared by all workers, half are the worker's own.
                    let topic = |k: usize| {
                        if k.is_multiple_of(2) {
                            format!("cyc.{round}.{k}")
                        } else {
                            format!("cyc.{w}.{round}.{k}")
                        }
                    };
                    if round % 2 == 0 {
                        // Awaited: subscribe, get every reply, publish to some, unsubscribe.
                        for k in 0..BATCH {
                            c.feed(json!({"action": "subscribe", "topic": topic(k), "id": k}))
                                .await;
                        }
                        c.flush().await;
                        for k in 0..BATCH {
                            let r = c.until("subscribed", |m| m["id"] == k).await;
                            assert_eq!(r["type"], "subscribed", "{r}");
                        }
                        for k in (0..BATCH).step_by(20) {
                            c.publish(&topic(k), json!(k)).await;
                        }
                    } else {
                        // Racing: unsubscribe before the home shard has answered.
                        for k in 0..BATCH {
                            c.feed(json!({"action": "subscribe", "topic": topic(k)}))
                                .await;
                        }
                    }
                    for k in 0..BATCH {
                        c.feed(json!({"action": "unsubscribe", "topic": topic(k)}))
                            .await;
                    }
                    c.flush().await;
                    c.ping().await;
                    c.stash.retain(|m| m["type"] == "error");
                    assert!(c.stash.is_empty(), "worker {w}: {:?}", c.stash);
                }
                c
            }
        })
        .collect();
    let workers = futures_util::future::join_all(workers).await;
    drop(workers); // closed without unsubscribing anything left (nothing should be)
    holder.reset();
    // History entries live for history_ttl (1 s); then nothing may be left anywhere.
    wait_for_room_gauges(&server, 0.0, 0.0).await;
}

// ---- HTTP API ------------------------------------------------------------------------------

async fn api_publish_presence_history(backend: Backend) {
    let server = start(backend, "[rooms]\napi_key = \"s3cret\"\n");
    let key = "Authorization: Bearer s3cret\r\n";
    let topic = "api.t";
    let mut sub = Client::connect(&server).await;
    let epoch = sub.subscribe(topic).await["epoch"].clone();

    // The key is required.
    let body = json!({"topic": topic, "data": {"x": 0}});
    for auth in [
        "",
        "Authorization: Bearer wrong\r\n",
        "Authorization: s3cret\r\n",
        "Authorization: Basic czNjcmV0\r\n",
    ] {
        let r = api_publish(&server, auth, &body).await;
        assert!(
            r.status == 401 || r.status == 403,
            "publish with {auth:?}: {r:?}"
        );
    }

    let r = api_publish(
        &server,
        key,
        &json!({"topic": topic, "type": "backend", "data": {"x": 1}}),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(json_body(&r)["seq"], 1, "{r:?}");
    let m = sub.room_message(topic).await;
    assert_eq!(
        (&m["type"], &m["seq"], &m["data"]),
        (&json!("backend"), &json!(1), &json!({"x": 1})),
        "{m}"
    );
    assert_timestamp(&m["timestamp"], &m);
    let r = api_publish(&server, key, &json!({"topic": topic, "data": [2]})).await;
    assert_eq!(json_body(&r)["seq"], 2, "{r:?}");
    let m = sub.room_message(topic).await;
    assert_eq!(
        (&m["type"], &m["seq"]),
        (&json!("message"), &json!(2)),
        "{m}"
    );

    // Bad input: a clear 4xx, and nothing published.
    for bad in [
        "not json".to_string(),
        "[1]".to_string(),
        json!({"data": 1}).to_string(),
        json!({"topic": "", "data": 1}).to_string(),
        json!({"topic": 5, "data": 1}).to_string(),
        json!({"topic": topic}).to_string(),
        json!({"topic": topic, "type": 3, "data": 1}).to_string(),
        json!({"topic": "t".repeat(129), "data": 1}).to_string(),
        json!({"topic": topic, "data": "d".repeat(65536)}).to_string(),
    ] {
        let r = server.post("/api/publish", key, &bad).await;
        assert!(
            (400..500).contains(&r.status),
            "POST /api/publish {bad:.100}: {r:?}"
        );
        let e = json_body(&r);
        assert!(e["error"].is_string(), "error text: {e}");
    }
    let r = api_publish(&server, key, &json!({"topic": topic, "data": 3})).await;
    assert_eq!(
        json_body(&r)["seq"],
        3,
        "refused publishes took no seq: {r:?}"
    );
    assert_eq!(sub.room_message(topic).await["seq"], 3);

    // Presence.
    let r = get_with(&server, &format!("/api/presence?topic={topic}"), key).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        r.header("content-type")
            .unwrap_or("")
            .starts_with("application/json"),
        "{r:?}"
    );
    let p = json_body(&r);
    assert_eq!(p["topic"], topic, "{p}");
    assert_eq!(member_ids(&p["members"]), ids([&sub]), "{p}");
    let r = get_with(&server, "/api/presence?topic=nobody.here", key).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(json_body(&r)["members"], json!([]));
    let r = get_with(&server, "/api/presence", key).await;
    assert_eq!(r.status, 400, "no topic: {r:?}");
    // Query-string decoding.
    let mut odd = Client::connect(&server).await;
    odd.subscribe("a b/c&d").await;
    let r = get_with(&server, "/api/presence?topic=a%20b%2Fc%26d", key).await;
    assert_eq!(member_ids(&json_body(&r)["members"]), ids([&odd]), "{r:?}");

    // History.
    let r = get_with(&server, &format!("/api/history?topic={topic}"), key).await;
    assert_eq!(r.status, 200, "{r:?}");
    let h = json_body(&r);
    assert_eq!((&h["topic"], &h["epoch"]), (&json!(topic), &epoch), "{h}");
    assert_eq!(seqs(&h["messages"]), vec![1, 2, 3], "{h}");
    assert_eq!(h["messages"][0]["data"], json!({"x": 1}), "{h}");
    assert_eq!(h["messages"][0]["type"], "backend", "{h}");
    let h =
        json_body(&get_with(&server, &format!("/api/history?topic={topic}&since=1"), key).await);
    assert_eq!(seqs(&h["messages"]), vec![2, 3], "{h}");
    let h = json_body(
        &get_with(
            &server,
            &format!("/api/history?topic={topic}&since=0&limit=1"),
            key,
        )
        .await,
    );
    assert_eq!(seqs(&h["messages"]).len(), 1, "{h}");
    for bad in [
        "/api/history".to_string(),
        format!("/api/history?topic={topic}&since=abc"),
        format!("/api/history?topic={topic}&since=-1"),
        format!("/api/history?topic={topic}&limit=x"),
    ] {
        let r = get_with(&server, &bad, key).await;
        assert_eq!(r.status, 400, "GET {bad}: {r:?}");
    }
    // A backend publish and the ws history agree.
    let wh = sub
        .call(json!({"action": "history", "topic": topic}), json!("h"))
        .await;
    assert_eq!(seqs(&wh["messages"]), vec![1, 2, 3], "{wh}");
    assert_eq!(wh["epoch"], epoch, "{wh}");
}

async fn api_publish_without_key_configured(backend: Backend) {
    let server = start(backend, "");
    let mut sub = Client::connect(&server).await;
    sub.subscribe("open").await;
    let r = api_publish(&server, "", &json!({"topic": "open", "data": "hi"})).await;
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(json_body(&r)["seq"], 1, "{r:?}");
    let m = sub.room_message("open").await;
    assert_eq!((&m["seq"], &m["data"]), (&json!(1), &json!("hi")), "{m}");
}

/// Every sample of histogram `name` over all shards: (observations, sum, observations in the
/// `+Inf` bucket), from the `_count`, `_sum` and `_bucket` lines.
async fn histogram(server: &Server, name: &str) -> (f64, f64, f64) {
    let resp = server.get("/metrics").await;
    assert_eq!(resp.status, 200);
    assert!(
        resp.body.contains(&format!("# TYPE {name} histogram")),
        "{name} is not a Prometheus histogram:\n{}",
        resp.body
    );
    let lines = resp.body.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text format");
    let (mut count, mut sum, mut inf) = (0.0, 0.0, 0.0);
    for s in &scrape.samples {
        match &s.value {
            prometheus_parse::Value::Histogram(buckets) if s.metric == name => {
                inf += buckets
                    .iter()
                    .filter(|b| b.less_than.is_infinite())
                    .map(|b| b.count)
                    .sum::<f64>();
            }
            prometheus_parse::Value::Untyped(v) | prometheus_parse::Value::Counter(v) => {
                if s.metric == format!("{name}_count") {
                    count += v;
                } else if s.metric == format!("{name}_sum") {
                    sum += v;
                }
            }
            _ => {}
        }
    }
    (count, sum, inf)
}

/// The rooms series of `/metrics` follow traffic: messages published, the fan-out size summed
/// over the shards is the number of deliveries, and each delivery's shard records the
/// publish-to-queue latency and, once its subscribers' backlogs are written, publish-to-write.
async fn room_metrics_follow_traffic(backend: Backend) {
    // No join events: only the published messages are fanned out.
    let server = start(backend, "[rooms]\npresence_events = false\n");
    let topic = "metered";
    let mut subs = Vec::new();
    for _ in 0..4 {
        let mut c = Client::connect(&server).await;
        c.subscribe(topic).await;
        subs.push(c);
    }
    for i in 0..5 {
        let r = api_publish(&server, "", &json!({"topic": topic, "data": {"i": i}})).await;
        assert_eq!(r.status, 200, "{r:?}");
    }
    for c in &mut subs {
        for i in 0..5 {
            let m = c.room_message(topic).await;
            assert_eq!(m["data"]["i"], i, "{m}");
        }
    }
    assert_eq!(
        metric_sum(&server, "ringgate_room_messages_published_total").await,
        5.0
    );
    let (count, sum, inf) = histogram(&server, "ringgate_fanout_size").await;
    assert_eq!(sum, 20.0, "4 subscribers × 5 messages");
    // One sample per message and shard holding subscribers of the topic.
    assert!(
        (5.0..=5.0 * SHARDS as f64).contains(&count),
        "count {count}"
    );
    assert_eq!(inf, count, "the +Inf bucket holds every observation");
    let (queued, _, _) = histogram(&server, "ringgate_publish_to_queue_seconds").await;
    assert_eq!(queued, count);
    // Cleared backlogs are sampled (the first of every 16 per shard): at least one sample, at
    // most one per delivery. The session samples after its write, which may be just after the
    // client read the message: poll on the wall clock, the sample is the server process's.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let (written, secs, _) = histogram(&server, "ringgate_publish_to_write_seconds").await;
        if (1.0..=20.0).contains(&written) {
            assert!(
                secs >= 0.0 && secs < PATIENCE.as_secs_f64() * written,
                "{secs}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "publish_to_write count {written}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---- volatile, conflation, trace ids, user-directed delivery (docs/PROTOCOL.md) ------------

both_backends!(
    volatile_publishes_are_never_in_history_nor_replayed,
    conflation_delivers_the_latest_and_never_an_older_value_after_a_newer,
    trace_ids_are_delivered_and_logged_from_publish_to_delivery,
    user_messages_reach_every_connection_of_the_user_across_shards_only,
    per_prefix_write_delay_keeps_chat_instant_while_tickers_batch,
);

impl Client {
    /// Connects to `/ws` with `token` as the `bearer.` subprotocol.
    async fn connect_with_token(server: &Server, token: &str) -> Client {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = server.url("/ws").into_client_request().expect("request");
        req.headers_mut().insert(
            "sec-websocket-protocol",
            format!("bearer.{token}").parse().expect("header value"),
        );
        let (mut ws, _) = within("connect", tokio_tungstenite::connect_async(req))
            .await
            .expect("websocket handshake");
        let first = read_json(&mut ws, "connected").await;
        assert_eq!(first["type"], "connected", "{first}");
        let id = first["connection_id"].as_str().expect("id").to_string();
        Client {
            ws,
            id,
            stash: VecDeque::new(),
            next_id: 0,
        }
    }

    /// The next volatile message of `topic`.
    async fn volatile_message(&mut self, topic: &str) -> Value {
        self.until(&format!("a volatile message of {topic}"), |m| {
            m["topic"] == topic && m["volatile"] == true
        })
        .await
    }
}

async fn volatile_publishes_are_never_in_history_nor_replayed(backend: Backend) {
    let server = start(
        backend,
        "[rooms]\npublish_rate = 0\n[[rooms.topic]]\nprefix = \"typing.\"\nvolatile = true\n",
    );
    let topic = "chat.1";
    let mut sub = Client::connect(&server).await;
    sub.subscribe(topic).await;
    let mut p = Client::connect(&server).await;
    assert_eq!(p.publish(topic, json!("a")).await, 1);
    // As written in the docs, then with an id to see its ack.
    p.send_text(
        r#"{"action": "publish", "topic": "chat.1", "data": {"typing": true}, "volatile": true}"#
            .into(),
    )
    .await;
    let id = p.fresh_id();
    let ack = p
        .call(
            json!({"action": "publish", "topic": topic, "data": {"typing": false}, "volatile": true}),
            id,
        )
        .await;
    assert_eq!(
        (&ack["type"], &ack["volatile"]),
        (&json!("ack"), &json!(true)),
        "{ack}"
    );
    assert!(ack.get("seq").is_none(), "{ack}");
    // No seq was taken: the next durable message is 2.
    assert_eq!(p.publish(topic, json!("b")).await, 2);

    let m = sub.room_message(topic).await;
    assert_eq!((&m["seq"], &m["data"]), (&json!(1), &json!("a")));
    let v = sub.volatile_message(topic).await;
    assert_eq!(v["data"], json!({"typing": true}), "{v}");
    assert!(v.get("seq").is_none(), "{v}");
    assert_eq!(sub.volatile_message(topic).await["data"]["typing"], false);
    assert_eq!(sub.room_message(topic).await["seq"], 2);

    // History and recovery hold only the durable ones.
    let id = sub.fresh_id();
    let h = sub
        .call(json!({"action": "history", "topic": topic}), id)
        .await;
    assert_eq!(seqs(&h["messages"]), [1, 2], "{h}");
    let mut late = Client::connect(&server).await;
    late.subscribe_with(json!({"action": "subscribe", "topic": topic, "since": 0}))
        .await;
    assert_eq!(late.room_message(topic).await["seq"], 1);
    assert_eq!(late.room_message(topic).await["seq"], 2);
    late.ping().await;
    assert!(
        !late.stash.iter().any(|m| m["volatile"] == true),
        "{:?}",
        late.stash
    );

    // The prefix default, and the API.
    sub.subscribe("typing.1").await;
    let id = p.fresh_id();
    let ack = p
        .call(
            json!({"action": "publish", "topic": "typing.1", "data": 1}),
            id,
        )
        .await;
    assert_eq!(ack["volatile"], true, "{ack}");
    let r = api_publish(
        &server,
        "",
        &json!({"topic": topic, "data": 3, "volatile": true}),
    )
    .await;
    assert_eq!(
        (r.status, json_body(&r)),
        (200, json!({"volatile": true})),
        "{r:?}"
    );
    assert_eq!(sub.volatile_message("typing.1").await["data"], 1);
    assert_eq!(sub.volatile_message(topic).await["data"], 3);
    let r = api_publish(
        &server,
        "",
        &json!({"topic": topic, "data": 3, "volatile": "yes"}),
    )
    .await;
    assert_eq!(r.status, 400, "{r:?}");
    // A durable publish after all of it is still 3: volatile never took a seq.
    assert_eq!(p.publish(topic, json!("c")).await, 3);
}

async fn conflation_delivers_the_latest_and_never_an_older_value_after_a_newer(backend: Backend) {
    // The as-written form, a keyed topic, and a plain one published alongside.
    let server = start(
        backend,
        "[rooms]\npublish_rate = 0\n\
         [[rooms.topic]]\nprefix = \"ticker.\"\nconflate = 0.1     # seconds\nvolatile = true\n\
         [[rooms.topic]]\nprefix = \"fx.\"\nconflate = 0.2\nconflate_key = \"pair\"\n",
    );
    let (ticker, fx, chat) = ("ticker.btc", "fx.quotes", "chat.plain");
    let mut sub = Client::connect(&server).await;
    for t in [ticker, fx, chat] {
        sub.subscribe(t).await;
    }
    let mut p = Client::connect(&server).await;
    const N: u64 = 60;
    for i in 0..N {
        p.feed(json!({"action": "publish", "topic": ticker, "data": {"v": i}}))
            .await;
        p.feed(json!({"action": "publish", "topic": chat, "data": i}))
            .await;
        for pair in ["eur", "gbp"] {
            p.feed(json!({"action": "publish", "topic": fx, "data": {"pair": pair, "v": i}}))
                .await;
        }
    }
    p.flush().await;

    // Ticker: increasing values, ending with the last one, far fewer than published.
    let mut got = Vec::new();
    while got.last() != Some(&(N - 1)) {
        let m = sub.volatile_message(ticker).await;
        got.push(m["data"]["v"].as_u64().expect("v"));
    }
    assert!(got.windows(2).all(|w| w[0] < w[1]), "{got:?}");
    assert!(got.len() < N as usize / 2, "not conflated: {got:?}");
    // Every key ends with its latest, each key's values increasing; seqs without gaps.
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut seq = 0;
    while last.get("eur") != Some(&(N - 1)) || last.get("gbp") != Some(&(N - 1)) {
        let m = sub.room_message(fx).await;
        seq += 1;
        assert_eq!(m["seq"], seq, "{m}");
        let pair = m["data"]["pair"].as_str().expect("pair").to_string();
        let v = m["data"]["v"].as_u64().expect("v");
        if let Some(prev) = last.insert(pair, v) {
            assert!(prev < v, "an older value after a newer: {m}");
        }
    }
    assert!(seq < N, "not conflated: {seq} deliveries");
    // The plain topic got everything, in order.
    for i in 0..N {
        let m = sub.room_message(chat).await;
        assert_eq!((&m["seq"], &m["data"]), (&json!(i + 1), &json!(i)), "{m}");
    }
    // History of the conflated topic holds just what was delivered.
    let id = sub.fresh_id();
    let h = sub
        .call(json!({"action": "history", "topic": fx}), id)
        .await;
    assert_eq!(seqs(&h["messages"]), (1..=seq).collect::<Vec<_>>());
}

async fn trace_ids_are_delivered_and_logged_from_publish_to_delivery(backend: Backend) {
    let server = Server::start_with_env(
        backend,
        "",
        &[("RUST_LOG", "info,ringgate::rooms=debug")],
        &[],
    );
    let topic = "traced";
    let mut sub = Client::connect(&server).await;
    sub.subscribe(topic).await;
    let mut p = Client::connect(&server).await;
    p.send(json!({"action": "publish", "topic": topic, "data": 1, "trace": "req-7f3a"}))
        .await;
    let m = sub.room_message(topic).await;
    assert_eq!(
        (&m["trace"], &m["seq"]),
        (&json!("req-7f3a"), &json!(1)),
        "{m}"
    );
    let long = "x".repeat(129);
    let id = p.fresh_id();
    let e = p
        .call(
            json!({"action": "publish", "topic": topic, "data": 1, "trace": long}),
            id,
        )
        .await;
    assert_eq!(
        (&e["type"], &e["code"]),
        (&json!("error"), &json!("missing_field")),
        "{e}"
    );
    // Both ends of the message's path name it: topic, seq and trace.
    let logged = |what: &str| {
        server
            .log()
            .lines()
            .any(|l| l.contains(what) && l.contains("req-7f3a") && l.contains("traced"))
    };
    within("the debug lines", async {
        while !(logged("room message published") && logged("room message delivered")) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
}

async fn per_prefix_write_delay_keeps_chat_instant_while_tickers_batch(backend: Backend) {
    const DELAY: Duration = Duration::from_secs(1);
    let server = start(
        backend,
        "[rooms]\npublish_rate = 0\npresence_events = false\nwrite_delay = 1.0\n\
         [[rooms.topic]]\nprefix = \"chat.\"\nwrite_delay = 0\n",
    );
    let (ticker, chat) = ("ticker.1", "chat.1");
    // `both` takes the ticker and the chat, `held` only the ticker.
    let mut both = Client::connect(&server).await;
    both.subscribe(ticker).await;
    both.subscribe(chat).await;
    let mut held = Client::connect(&server).await;
    held.subscribe(ticker).await;
    let mut p = Client::connect(&server).await;
    let t0 = Instant::now();
    p.publish(ticker, json!("t")).await;
    p.publish(chat, json!("c")).await;
    // The chat message goes at once and takes the held ticker message with it, in order.
    let first = both
        .until("a room message", |m| {
            m["seq"].is_u64() && m["type"] == "message"
        })
        .await;
    assert_eq!(
        (&first["topic"], &first["data"]),
        (&json!(ticker), &json!("t")),
        "{first}"
    );
    let m = both.room_message(chat).await;
    assert_eq!(m["data"], "c", "{m}");
    // Not held: a held message waits the whole second (the other assertions' lower bound).
    assert!(
        t0.elapsed() < DELAY,
        "the chat message waited for the write delay"
    );
    // Meanwhile the ticker-only subscriber still waits for the delay.
    held.ping().await;
    let early = held.stash.iter().any(|m| is_room_message(m, ticker));
    assert!(
        !early || t0.elapsed() >= DELAY,
        "the ticker message was not held for its write delay"
    );
    let m = held.room_message(ticker).await;
    assert_eq!(m["data"], "t", "{m}");
    assert!(t0.elapsed() >= DELAY - Duration::from_millis(2));
}

const JWT_SECRET: &str = "rooms-test-secret-of-at-least-32-bytes";

fn user_token(sub: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": sub, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("token")
}

async fn user_messages_reach_every_connection_of_the_user_across_shards_only(backend: Backend) {
    let server = start(
        backend,
        &format!("[auth]\njwt_secret = \"{JWT_SECRET}\"\nanonymous_channels = [\"*\"]\n"),
    );
    // Alice on every shard, Bob, and an anonymous client.
    let alice_token = user_token("alice");
    let mut alice: Vec<Client> = Vec::new();
    let mut shards = BTreeSet::new();
    for _ in 0..200 {
        if shards.len() == SHARDS as usize {
            break;
        }
        let c = Client::connect_with_token(&server, &alice_token).await;
        shards.insert(c.shard());
        alice.push(c);
    }
    assert_eq!(shards.len(), SHARDS as usize, "alice on every shard");
    let mut bob = Client::connect_with_token(&server, &user_token("bob")).await;
    let mut anon = Client::connect(&server).await;

    let r = api_publish(
        &server,
        "",
        &json!({"user": "alice", "type": "notice", "data": {"n": 1}, "trace": "u-1"}),
    )
    .await;
    assert_eq!(
        (r.status, json_body(&r)),
        (200, json!({"user": "alice"})),
        "{r:?}"
    );
    for c in alice.iter_mut() {
        let m = c.until("alice's message", |m| m["type"] == "notice").await;
        assert_eq!(
            (&m["user"], &m["data"], &m["trace"]),
            (&json!("alice"), &json!({"n": 1}), &json!("u-1")),
            "{m}"
        );
        assert!(m.get("seq").is_none() && m.get("topic").is_none(), "{m}");
    }
    // Every shard has handled alice's message (each holds one of her connections): had bob
    // been given it, it would come before his own.
    let r = api_publish(
        &server,
        "",
        &json!({"user": "bob", "type": "notice", "data": 2}),
    )
    .await;
    assert_eq!(r.status, 200, "{r:?}");
    let m = bob.until("bob's message", |m| m["type"] == "notice").await;
    assert_eq!((&m["user"], &m["data"]), (&json!("bob"), &json!(2)), "{m}");
    anon.ping().await;
    assert!(anon.stash.is_empty(), "{:?}", anon.stash);

    // Bad requests have their answers.
    for (body, status) in [
        (json!({"user": "alice", "topic": "t", "data": 1}), 400),
        (json!({"user": "", "data": 1}), 400),
        (json!({"user": 7, "data": 1}), 400),
        (json!({"user": "alice", "data": 1, "volatile": false}), 400),
        (json!({"user": "alice", "type": "join", "data": 1}), 403),
    ] {
        let r = api_publish(&server, "", &body).await;
        assert_eq!(r.status, status, "{body}: {r:?}");
    }
    for body in [
        json!({"code": 4001}),
        json!({"user": "alice", "code": 1234}),
        json!({"user": "alice", "code": "x"}),
    ] {
        let r = server.post("/api/disconnect", "", &body.to_string()).await;
        assert_eq!(r.status, 400, "{body}: {r:?}");
    }

    // A server-initiated disconnect closes every connection of alice with its code.
    let r = server
        .post(
            "/api/disconnect",
            "",
            &json!({"user": "alice", "code": 4001}).to_string(),
        )
        .await;
    assert_eq!(
        (r.status, json_body(&r)),
        (200, json!({"user": "alice", "code": 4001})),
        "{r:?}"
    );
    for c in alice.iter_mut() {
        let code = expect_close(&mut c.ws).await;
        assert_eq!(u16::from(code), 4001);
    }
    bob.ping().await;
    anon.ping().await;
}

// ---- binary rooms: a Yjs-style sync through a relayed binary topic ---------------------------

both_backends!(binary_rooms_relay_a_yjs_style_sync_byte_exact_with_recovery);

/// One binary room message as delivered (docs/PROTOCOL.md, "Binary rooms").
#[derive(Debug, Clone, PartialEq)]
struct BinMsg {
    topic: String,
    /// `None`: volatile.
    seq: Option<u64>,
    payload: Vec<u8>,
}

fn parse_bin(m: &[u8]) -> BinMsg {
    let (kind, len) = (m[0], m[1] as usize);
    let topic = String::from_utf8(m[2..2 + len].to_vec()).expect("topic");
    let rest = &m[2 + len..];
    match kind {
        1 => BinMsg {
            topic,
            seq: Some(u64::from_be_bytes(rest[..8].try_into().expect("seq"))),
            payload: rest[8..].to_vec(),
        },
        2 => BinMsg {
            topic,
            seq: None,
            payload: rest.to_vec(),
        },
        k => panic!("binary message kind {k}: {m:?}"),
    }
}

impl Client {
    /// Publishes `payload` to the binary `topic` (durable, or volatile).
    async fn send_bin(&mut self, topic: &str, volatile: bool, payload: &[u8]) {
        let mut m = vec![if volatile { 2 } else { 1 }, topic.len() as u8];
        m.extend_from_slice(topic.as_bytes());
        m.extend_from_slice(payload);
        within("send", self.ws.send(Message::binary(m)))
            .await
            .expect("send");
    }

    /// The next binary message; JSON messages that come first are stashed.
    async fn next_bin(&mut self) -> BinMsg {
        loop {
            let m = match tokio::time::timeout(PATIENCE, self.ws.next()).await {
                Ok(Some(Ok(m))) => m,
                other => panic!("waiting for a binary message: {other:?}"),
            };
            match m {
                Message::Binary(b) => return parse_bin(&b),
                Message::Text(t) => self
                    .stash
                    .push_back(serde_json::from_str(&t).expect("JSON")),
                _ => {}
            }
        }
    }
}

/// A toy CRDT with the shape of Yjs and its sync protocol (y-protocols): every client numbers
/// its inserts with its own clock; the state vector holds each client's highest clock; an
/// update is a list of inserts; the text orders inserts by (clock, client). Applying an update
/// twice, or out of order, changes nothing: the server only relays bytes.
#[derive(Debug, Default, Clone, PartialEq)]
struct Doc {
    me: u8,
    inserts: BTreeMap<(u8, u32), u8>,
}

/// Sync message types, as in y-protocols.
const SYNC_STEP1: u8 = 0;
const SYNC_STEP2: u8 = 1;
const UPDATE: u8 = 2;

impl Doc {
    fn new(me: u8) -> Doc {
        Doc {
            me,
            inserts: BTreeMap::new(),
        }
    }

    fn clock(&self, client: u8) -> u32 {
        self.inserts
            .range((client, 0)..=(client, u32::MAX))
            .next_back()
            .map_or(0, |((_, c), _)| *c)
    }

    /// Inserts `byte`; returns the sync `Update` message to publish.
    fn edit(&mut self, byte: u8) -> Vec<u8> {
        let clock = self.clock(self.me) + 1;
        self.inserts.insert((self.me, clock), byte);
        self.message(UPDATE, &encode_inserts([(self.me, clock, byte)]))
    }

    /// `[sender][type][body]`.
    fn message(&self, kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![self.me, kind];
        m.extend_from_slice(body);
        m
    }

    fn step1(&self) -> Vec<u8> {
        let mut sv = Vec::new();
        let clients: BTreeSet<u8> = self.inserts.keys().map(|(c, _)| *c).collect();
        for c in clients {
            sv.push(c);
            sv.extend_from_slice(&self.clock(c).to_be_bytes());
        }
        self.message(SYNC_STEP1, &sv)
    }

    /// Handles a sync message from another client; returns the answer to publish, if any.
    fn receive(&mut self, m: &[u8]) -> Option<Vec<u8>> {
        let (sender, kind, body) = (m[0], m[1], &m[2..]);
        if sender == self.me {
            return None;
        }
        match kind {
            SYNC_STEP1 => {
                let sv: HashMap<u8, u32> = body
                    .chunks(5)
                    .map(|c| (c[0], u32::from_be_bytes(c[1..5].try_into().expect("clock"))))
                    .collect();
                let missing = self
                    .inserts
                    .iter()
                    .filter(|((c, k), _)| *k > sv.get(c).copied().unwrap_or(0))
                    .map(|((c, k), b)| (*c, *k, *b));
                Some(self.message(SYNC_STEP2, &encode_inserts(missing)))
            }
            SYNC_STEP2 | UPDATE => {
                for i in body.chunks(6) {
                    let clock = u32::from_be_bytes(i[1..5].try_into().expect("clock"));
                    self.inserts.insert((i[0], clock), i[5]);
                }
                None
            }
            k => panic!("sync message type {k}"),
        }
    }

    fn text(&self) -> Vec<u8> {
        let mut v: Vec<_> = self.inserts.iter().collect();
        v.sort_by_key(|((c, k), _)| (*k, *c));
        v.into_iter().map(|(_, b)| *b).collect()
    }
}

fn encode_inserts(inserts: impl IntoIterator<Item = (u8, u32, u8)>) -> Vec<u8> {
    let mut out = Vec::new();
    for (c, k, b) in inserts {
        out.push(c);
        out.extend_from_slice(&k.to_be_bytes());
        out.push(b);
    }
    out
}

async fn binary_rooms_relay_a_yjs_style_sync_byte_exact_with_recovery(backend: Backend) {
    let server = start(
        backend,
        "[rooms]\npublish_rate = 0\n[[rooms.topic]]\nprefix = \"doc.\"\nbinary = true\n",
    );
    let topic = "doc.1";
    let (mut a, mut b, mut c) = (Doc::new(1), Doc::new(2), Doc::new(3));
    let mut ca = Client::connect(&server).await;
    ca.subscribe(topic).await;
    // A edits alone: bytes that are no valid UTF-8 and every edge value.
    let mut sent = Vec::new();
    for byte in [0x00, 0xff, b'h', 0x80, b'i'] {
        let u = a.edit(byte);
        ca.send_bin(topic, false, &u).await;
        sent.push(u);
    }
    for (i, u) in sent.iter().enumerate() {
        let m = ca.next_bin().await;
        assert_eq!(
            m,
            BinMsg {
                topic: topic.into(),
                seq: Some(i as u64 + 1),
                payload: u.clone()
            }
        );
    }

    // B recovers everything from history, byte for byte, in order.
    let mut cb = Client::connect(&server).await;
    let r = cb
        .subscribe_with(json!({"action": "subscribe", "topic": topic, "since": 0}))
        .await;
    assert_eq!(
        (&r["recovered"], &r["seq"]),
        (&json!(true), &json!(5)),
        "{r}"
    );
    let epoch = r["epoch"].clone();
    for (i, u) in sent.iter().enumerate() {
        let m = cb.next_bin().await;
        assert_eq!((m.seq, &m.payload), (Some(i as u64 + 1), u), "replay {i}");
        assert_eq!(b.receive(&m.payload), None);
    }
    assert_eq!(b.text(), a.text());

    // C joins without history and syncs with a step 1 that A answers (both volatile).
    let mut cc = Client::connect(&server).await;
    cc.subscribe(topic).await;
    cc.send_bin(topic, true, &c.step1()).await;
    let step1 = ca.next_bin().await;
    assert_eq!(step1.seq, None, "volatile: {step1:?}");
    let step2 = a.receive(&step1.payload).expect("A answers step 1");
    ca.send_bin(topic, true, &step2).await;
    loop {
        let m = cc.next_bin().await;
        if m.payload[1] == SYNC_STEP2 {
            c.receive(&m.payload);
            break;
        }
    }
    assert_eq!(c.text(), a.text());
    // B's copy of the step 1 and step 2 change nothing for it.
    for _ in 0..2 {
        let m = cb.next_bin().await;
        assert_eq!(m.seq, None);
        b.receive(&m.payload);
    }
    assert_eq!(b.text(), a.text());

    // B edits; everyone converges.
    for byte in [b'!', 0x01] {
        let u = b.edit(byte);
        cb.send_bin(topic, false, &u).await;
    }
    let mut last = 0;
    for (client, doc) in [(&mut ca, &mut a), (&mut cb, &mut b), (&mut cc, &mut c)] {
        let mut got = 0;
        while got < 2 {
            // Volatile sync messages still queued (a client's own echo) are skipped.
            let m = client.next_bin().await;
            if let Some(seq) = m.seq {
                last = seq;
                got += 1;
                doc.receive(&m.payload);
            }
        }
    }
    assert_eq!(last, 7);
    assert_eq!((a.text(), c.text()), (b.text(), b.text()));

    // B goes away, A edits, B comes back with since/epoch: exactly the missed updates.
    drop(cb);
    let mut missed = Vec::new();
    for byte in [b'x', 0xfe, b'y'] {
        let u = a.edit(byte);
        ca.send_bin(topic, false, &u).await;
        missed.push(u);
    }
    let mut cb = Client::connect(&server).await;
    let r = cb
        .subscribe_with(
            json!({"action": "subscribe", "topic": topic, "since": last, "epoch": epoch}),
        )
        .await;
    assert_eq!(r["recovered"], true, "{r}");
    for (i, u) in missed.iter().enumerate() {
        let m = cb.next_bin().await;
        assert_eq!((m.seq, &m.payload), (Some(last + 1 + i as u64), u));
        b.receive(&m.payload);
    }
    assert_eq!(b.text(), a.text());
    // Inserts ordered by (clock, client): A's 1..8 interleaved with B's 1..2.
    assert_eq!(
        b.text(),
        [0x00, b'!', 0xff, 0x01, b'h', 0x80, b'i', b'x', 0xfe, b'y']
    );

    // Wrong ways in: each has its error, the connection stays open.
    let id = cb.fresh_id();
    let e = cb
        .call(json!({"action": "publish", "topic": topic, "data": 1}), id)
        .await;
    assert_eq!(e["code"], "bad_binary", "{e}");
    for bad in [&[][..], &[9, 1, b't'][..], &[1, 200, b't'][..]] {
        within("send", cb.ws.send(Message::binary(bad.to_vec())))
            .await
            .expect("send");
        let e = cb.until("an error", |m| m["type"] == "error").await;
        assert_eq!(e["code"], "bad_binary", "{bad:?}: {e}");
    }
    cb.send_bin("chat", false, b"x").await;
    let e = cb.until("an error", |m| m["type"] == "error").await;
    assert_eq!(e["code"], "bad_binary", "{e}");
    let r = api_publish(&server, "", &json!({"topic": topic, "data": 1})).await;
    assert_eq!(r.status, 400, "{r:?}");
    // The JSON history of a binary topic lists none (replay is by `subscribe` with `since`).
    let id = cb.fresh_id();
    let h = cb
        .call(json!({"action": "history", "topic": topic}), id)
        .await;
    assert_eq!(h["messages"], json!([]), "{h}");
    cb.ping().await;
}
