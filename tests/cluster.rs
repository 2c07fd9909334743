//! Rooms across nodes through Redis (`[cluster] engine = "redis"`, docs/CLUSTER.md): a real
//! `redis-server` started by each test, and several real ringgate nodes on it. One seq order
//! for every node, recovery on another node, a node without Redis (degraded, `/readyz`),
//! Redis restarted under the nodes with and without its data, presence across nodes (and a
//! node killed without a goodbye), and the realtime features across nodes: volatile
//! messages, traces, binary topics, conflation, messages to users and disconnects.

mod common;

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

both_backends!(
    publishes_on_any_node_reach_every_node_in_one_order,
    reconnecting_to_another_node_recovers_exactly_what_was_missed,
    redis_unreachable_at_start_degrades_and_recovers,
    redis_restarted_under_traffic_keeps_or_loses_history_as_redis_did,
    a_password_is_sent_and_a_wrong_one_is_named,
    a_node_killed_abruptly_does_not_disturb_the_others,
    presence_lists_every_node_and_a_killed_node_s_members_leave_once,
    volatile_and_traced_messages_cross_nodes_without_touching_seq_or_history,
    binary_topics_cross_nodes_byte_exact_with_recovery,
    conflation_holds_back_each_receiving_node,
    user_messages_and_disconnects_reach_every_node,
    an_acl_user_connects_and_a_refused_one_is_named,
    tls_to_redis_trusts_the_ca_file_and_names_an_untrusted_server,
    sentinel_failover_moves_every_node_to_the_new_master,
    sentinels_with_a_password_are_asked_with_sentinel_password,
    a_redis_cluster_carries_topics_of_every_master_in_one_order,
    a_slot_moved_to_another_master_keeps_publishing_and_fan_out,
    a_redirect_loop_fails_its_commands_and_is_logged_once_per_slot,
    presence_crosses_a_redis_cluster_and_a_killed_node_s_members_leave_once,
    a_cluster_master_down_degrades_the_nodes_until_it_is_back,
    a_dead_node_with_many_members_is_swept_in_bounded_runs,
    tls_to_the_sentinels_and_the_master_with_rediss_sentinel,
    writes_lost_behind_a_node_s_mirror_start_a_new_epoch,
);

/// A node of the cluster: two shards, so topics are homed away from their clients.
fn node(backend: Backend, redis_url: &str) -> Server {
    node_with(backend, redis_url, "", "")
}

/// [`node`] with more `[cluster]` keys, and more tables after `[rooms]`.
fn node_with(backend: Backend, redis_url: &str, cluster: &str, more: &str) -> Server {
    Server::start_sharded(backend, 2, &config(redis_url, cluster, more), &[])
}

/// [`node`] logging the rooms' debug lines (the path of each message).
fn node_debug(backend: Backend, redis_url: &str) -> Server {
    let env = [("RUST_LOG", "info,ringgate::rooms=debug")];
    Server::start_with_env(backend, &config(redis_url, "", ""), &env, &[])
}

fn config(redis_url: &str, cluster: &str, more: &str) -> String {
    format!(
        "[cluster]\nengine = \"redis\"\nredis_url = \"{redis_url}\"\nreconnect_max_delay = 0.2\n\
         {cluster}\n[rooms]\npublish_rate = 0\nrequest_rate = 0\n{more}"
    )
}

/// `redis-server` arguments, from one line.
fn words(line: &str) -> Vec<&str> {
    line.split_whitespace().collect()
}

/// Waits until the node's log has `text` (the link logs each state change once).
async fn log_says(server: &Server, text: &str) {
    let deadline = Instant::now() + PATIENCE;
    while !server.log().contains(text) {
        assert!(
            Instant::now() < deadline,
            "no {text:?} in the log:\n{}",
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A subscriber on `sub` gets what `POST /api/publish` on `publish` sent.
async fn delivers(publish: &Server, sub: &Server, topic: &str) {
    let mut c = Client::connect(sub).await;
    let r = c.subscribe(topic, None).await;
    assert_eq!(r["type"], "subscribed", "{r}; log:\n{}", sub.log());
    let (status, v) = api_publish(publish, topic, json!("hi")).await;
    assert_eq!(status, 200, "{v}");
    let seq = v["seq"].as_u64().expect("seq");
    assert_eq!(c.messages(topic, 1).await, [(seq, json!("hi"))]);
}

/// A `/ws` client speaking JSON; what arrives while waiting for something else is stashed
/// (binary messages apart).
struct Client {
    ws: Ws,
    /// The server's name for this connection (its `client_id` in presence).
    id: String,
    stash: VecDeque<Value>,
    binary: VecDeque<Vec<u8>>,
}

impl Client {
    async fn connect(server: &Server) -> Client {
        let ws = server.ws_path("/ws").await;
        Client::hello(ws).await
    }

    /// Connects with `token` as the `bearer.` subprotocol.
    async fn connect_with_token(server: &Server, token: &str) -> Client {
        Client::hello(server.ws_with_token(token).await).await
    }

    async fn hello(ws: Ws) -> Client {
        let mut c = Client {
            ws,
            id: String::new(),
            stash: VecDeque::new(),
            binary: VecDeque::new(),
        };
        let hello = c.next().await;
        assert_eq!(hello["type"], "connected", "{hello}");
        c.id = hello["connection_id"].as_str().expect("id").to_string();
        c
    }

    async fn send(&mut self, v: Value) {
        within("send", self.ws.send(Message::text(v.to_string())))
            .await
            .expect("send");
    }

    async fn next(&mut self) -> Value {
        match self.stash.pop_front() {
            Some(v) => v,
            None => self.read().await,
        }
    }

    /// The next text message from the socket (binary ones are kept for [`Client::next_bin`]).
    async fn read(&mut self) -> Value {
        loop {
            if let Some(v) = self.read_message().await {
                return v;
            }
        }
    }

    /// The next message from the socket: a text one, or `None` (a binary one, kept).
    async fn read_message(&mut self) -> Option<Value> {
        match within("a message", self.ws.next()).await {
            Some(Ok(Message::Text(t))) => Some(serde_json::from_str(&t).expect("JSON")),
            Some(Ok(Message::Binary(b))) => {
                self.binary.push_back(b.to_vec());
                None
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => None,
            other => panic!("expected a message, got {other:?}"),
        }
    }

    /// The next binary message: `(seq, payload)` of the binary envelope (no seq: volatile).
    async fn next_bin(&mut self) -> (Option<u64>, Vec<u8>) {
        while self.binary.is_empty() {
            if let Some(v) = self.read_message().await {
                self.stash.push_back(v);
            }
        }
        let m = self.binary.pop_front().expect("a binary message");
        let len = usize::from(m[1]);
        let rest = &m[2 + len..];
        match m[0] {
            1 => (
                Some(u64::from_be_bytes(rest[..8].try_into().expect("seq"))),
                rest[8..].to_vec(),
            ),
            2 => (None, rest.to_vec()),
            k => panic!("binary message kind {k}: {m:?}"),
        }
    }

    /// Publishes `payload` to the binary topic `topic`.
    async fn send_bin(&mut self, topic: &str, volatile: bool, payload: &[u8]) {
        let m = binary_publish(topic, volatile, payload);
        within("send", self.ws.send(m)).await.expect("send");
    }

    /// A round trip: everything the server queued for this client before the pong is stashed.
    async fn ping(&mut self) {
        self.send(json!({"action": "ping", "id": "sync"})).await;
        self.until(|v| v["id"] == "sync").await;
    }

    /// The `client_id`s of a topic's members, as this client's node lists them, sorted.
    async fn presence(&mut self, topic: &str) -> Vec<String> {
        self.send(json!({"action": "presence", "topic": topic, "id": "p"}))
            .await;
        let r = self.until(|v| v["id"] == "p").await;
        let mut ids: Vec<String> = r["members"]
            .as_array()
            .unwrap_or_else(|| panic!("members: {r}"))
            .iter()
            .map(|m| m["client_id"].as_str().expect("client_id").to_string())
            .collect();
        ids.sort();
        ids
    }

    /// The presence events (`join`/`leave`) stashed so far, as `(type, client_id)`.
    fn presence_events(&mut self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        self.stash.retain(|v| {
            let is_event = v["type"] == "join" || v["type"] == "leave";
            if is_event {
                out.push((
                    v["type"].as_str().unwrap_or_default().to_string(),
                    v["client_id"].as_str().unwrap_or_default().to_string(),
                ));
            }
            !is_event
        });
        out
    }

    /// The first message `pred` accepts; others stay stashed, in order.
    async fn until(&mut self, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(i) = self.stash.iter().position(&pred) {
            return self.stash.remove(i).expect("stashed");
        }
        loop {
            let v = self.read().await;
            if pred(&v) {
                return v;
            }
            self.stash.push_back(v);
        }
    }

    /// Subscribes; returns the `subscribed` reply.
    async fn subscribe(&mut self, topic: &str, recovery: Option<(u64, &str)>) -> Value {
        let mut req = json!({"action": "subscribe", "topic": topic, "id": "s"});
        if let Some((since, epoch)) = recovery {
            req["since"] = since.into();
            req["epoch"] = epoch.into();
        }
        self.send(req).await;
        self.until(|v| v["id"] == "s").await
    }

    /// The next `n` room messages of `topic` (skipping presence events): their seq and data.
    async fn messages(&mut self, topic: &str, n: usize) -> Vec<(u64, Value)> {
        let mut out = Vec::new();
        while out.len() < n {
            let v = self
                .until(|v| v["topic"] == topic && v["type"] == "message")
                .await;
            out.push((v["seq"].as_u64().expect("seq"), v["data"].clone()));
        }
        out
    }
}

/// `POST /api/publish` on `server`: the status and the body.
async fn api_publish(server: &Server, topic: &str, data: Value) -> (u16, Value) {
    api_post(
        server,
        "/api/publish",
        json!({"topic": topic, "data": data}),
    )
    .await
}

/// `POST path` with a JSON body on `server`: the status and the body.
async fn api_post(server: &Server, path: &str, body: Value) -> (u16, Value) {
    let r = server.post(path, "", &body.to_string()).await;
    let v = serde_json::from_str(&r.body).unwrap_or(Value::Null);
    (r.status, v)
}

/// `N` nodes, the `i`th made by `make(i)` (all started before any is waited for), once each
/// is ready.
async fn ready_nodes<const N: usize>(make: impl Fn(usize) -> Server) -> [Server; N] {
    let nodes: [Server; N] = std::array::from_fn(make);
    for n in &nodes {
        ready_becomes(n, 200).await;
    }
    nodes
}

/// Polls `/readyz` until it answers `status` (the nodes' links change state on their own).
async fn ready_becomes(server: &Server, status: u16) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let r = server.get("/readyz").await;
        if r.status == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz stayed {} {:?}; log:\n{}",
            r.status,
            r.body,
            server.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn publishes_on_any_node_reach_every_node_in_one_order(backend: Backend) {
    let redis = Redis::start(false);
    let nodes = [
        node(backend, &redis.url()),
        node(backend, &redis.url()),
        node(backend, &redis.url()),
    ];
    for n in &nodes {
        ready_becomes(n, 200).await;
    }
    let mut subs = Vec::new();
    for n in &nodes {
        for _ in 0..2 {
            let mut c = Client::connect(n).await;
            let r = c.subscribe("race", None).await;
            assert_eq!(r["type"], "subscribed", "{r}");
            subs.push(c);
        }
    }
    // Two publishers at once: a WebSocket client on A, the HTTP API on B.
    let mut publisher = Client::connect(&nodes[0]).await;
    const EACH: u64 = 40;
    let ws = async {
        for i in 0..EACH {
            publisher
                .send(json!({"action": "publish", "topic": "race", "data": {"ws": i}, "id": i}))
                .await;
        }
        let mut acks = Vec::new();
        while acks.len() < EACH as usize {
            let a = publisher.until(|v| v["type"] == "ack").await;
            acks.push(a["seq"].as_u64().expect("ack seq"));
        }
        acks
    };
    let api = async {
        let mut seqs = Vec::new();
        for i in 0..EACH {
            let (status, v) = api_publish(&nodes[1], "race", json!({"api": i})).await;
            assert_eq!(status, 200, "{v}");
            seqs.push(v["seq"].as_u64().expect("seq"));
        }
        seqs
    };
    let (ws_acks, api_seqs) = tokio::join!(ws, api);
    // One sequence for the cluster: every seq handed out once.
    let mut all: Vec<u64> = ws_acks.iter().chain(&api_seqs).copied().collect();
    all.sort_unstable();
    assert_eq!(all, (1..=2 * EACH).collect::<Vec<_>>());
    // Every subscriber, whichever node, gets the same messages in seq order.
    let first = subs[0].messages("race", 2 * EACH as usize).await;
    let seqs: Vec<u64> = first.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, (1..=2 * EACH).collect::<Vec<_>>());
    for (i, c) in subs.iter_mut().enumerate().skip(1) {
        assert_eq!(
            c.messages("race", 2 * EACH as usize).await,
            first,
            "subscriber {i}"
        );
    }
    // Each publisher's own messages in the order it sent them.
    let ws_order: Vec<u64> = first.iter().filter_map(|(_, d)| d["ws"].as_u64()).collect();
    assert_eq!(ws_order, (0..EACH).collect::<Vec<_>>());
}

async fn reconnecting_to_another_node_recovers_exactly_what_was_missed(backend: Backend) {
    let redis = Redis::start(false);
    let [a, b, c] = ready_nodes(|_| node(backend, &redis.url())).await;
    let mut client = Client::connect(&a).await;
    let r = client.subscribe("feed", None).await;
    let epoch = r["epoch"].as_str().expect("epoch").to_string();
    assert!(!epoch.is_empty(), "{r}");
    for i in 1..=3 {
        api_publish(&a, "feed", json!(i)).await;
    }
    let seen = client.messages("feed", 3).await;
    assert_eq!(seen.last().map(|m| m.0), Some(3));
    drop(client);
    // Missed while away, published on other nodes.
    for i in 4..=6 {
        let (status, v) = api_publish(&c, "feed", json!(i)).await;
        assert_eq!((status, v["seq"].as_u64()), (200, Some(i)));
    }
    // B has never followed the topic: the recovery comes from Redis.
    let mut back = Client::connect(&b).await;
    let r = back.subscribe("feed", Some((3, &epoch))).await;
    assert_eq!(
        (&r["recovered"], &r["epoch"], &r["seq"]),
        (&json!(true), &json!(epoch), &json!(6)),
        "{r}"
    );
    let replay = back.messages("feed", 3).await;
    assert_eq!(
        replay,
        [(4, json!(4)), (5, json!(5)), (6, json!(6))],
        "exactly the missed messages"
    );
    // Then live, no duplicate.
    api_publish(&a, "feed", json!(7)).await;
    assert_eq!(back.messages("feed", 1).await, [(7, json!(7))]);
    // Another node, now following the topic, answers from its mirror the same way.
    let mut again = Client::connect(&b).await;
    let r = again.subscribe("feed", Some((5, &epoch))).await;
    assert_eq!(r["recovered"], true, "{r}");
    assert_eq!(
        again.messages("feed", 2).await,
        [(6, json!(6)), (7, json!(7))]
    );
    // An epoch from elsewhere is not this topic's history.
    let mut stranger = Client::connect(&c).await;
    let r = stranger
        .subscribe("feed", Some((5, "0000000000000000")))
        .await;
    assert_eq!(
        (&r["recovered"], &r["epoch"]),
        (&json!(false), &json!(epoch)),
        "{r}"
    );
    // History over the API, from a node that does not follow the topic.
    let h = a.get("/api/history?topic=feed&since=4").await;
    let h: Value = serde_json::from_str(&h.body).expect("history JSON");
    let seqs: Vec<_> = h["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["seq"].clone())
        .collect();
    assert_eq!(
        (seqs, &h["epoch"]),
        (vec![json!(5), json!(6), json!(7)], &json!(epoch))
    );
}

async fn redis_unreachable_at_start_degrades_and_recovers(backend: Backend) {
    // Nothing listens there yet: the node starts, serves what needs no Redis, says not ready.
    let port = Redis::unused_port();
    let n = node(backend, &format!("redis://127.0.0.1:{port}"));
    assert_eq!(n.get("/healthz").await.status, 200);
    ready_becomes(&n, 503).await;
    assert!(n.get("/readyz").await.body.contains("redis unavailable"));
    let (status, v) = api_publish(&n, "t", json!(1)).await;
    assert_eq!((status, &v["code"]), (503, &json!("unavailable")), "{v}");
    let mut c = Client::connect(&n).await;
    c.send(json!({"action": "publish", "topic": "t", "data": 1, "id": "p"}))
        .await;
    let e = c.until(|v| v["id"] == "p").await;
    assert_eq!(
        (&e["type"], &e["code"]),
        (&json!("error"), &json!("unavailable")),
        "{e}"
    );
    let e = c.subscribe("t", None).await;
    assert_eq!(
        (&e["type"], &e["code"]),
        (&json!("error"), &json!("unavailable")),
        "{e}"
    );
    // The connection stays usable.
    c.send(json!({"action": "ping", "id": "q"})).await;
    assert_eq!(c.until(|v| v["id"] == "q").await["type"], "pong");
    // Redis comes up where the node looks for it: ready, and rooms work.
    let _redis = Redis::start_on(port, false);
    ready_becomes(&n, 200).await;
    let r = c.subscribe("t", None).await;
    assert_eq!(r["type"], "subscribed", "{r}");
    let (status, v) = api_publish(&n, "t", json!("up")).await;
    assert_eq!((status, v["seq"].as_u64()), (200, Some(1)), "{v}");
    assert_eq!(c.messages("t", 1).await, [(1, json!("up"))]);
}

async fn redis_restarted_under_traffic_keeps_or_loses_history_as_redis_did(backend: Backend) {
    for persistent in [true, false] {
        let mut redis = Redis::start(persistent);
        let (a, b) = (node(backend, &redis.url()), node(backend, &redis.url()));
        ready_becomes(&a, 200).await;
        ready_becomes(&b, 200).await;
        let mut live = Client::connect(&b).await;
        let r = live.subscribe("news", None).await;
        let epoch = r["epoch"].as_str().expect("epoch").to_string();
        for i in 1..=3 {
            api_publish(&a, "news", json!(i)).await;
        }
        assert_eq!(live.messages("news", 3).await.last().map(|m| m.0), Some(3));
        redis.restart();
        // Publishes fail while a node is cut off, and work once it is back.
        let deadline = Instant::now() + PATIENCE;
        let seq = loop {
            let (status, v) = api_publish(&a, "news", json!("after")).await;
            if status == 200 {
                break v["seq"].as_u64().expect("seq");
            }
            assert_eq!(v["code"], "unavailable", "{v}");
            assert!(Instant::now() < deadline, "publishes never worked again");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // The live subscriber on B gets it: B followed the topic again after reconnecting.
        let got = live.messages("news", 1).await;
        assert_eq!(got, [(seq, json!("after"))], "persistent: {persistent}");
        let mut back = Client::connect(&a).await;
        let r = back.subscribe("news", Some((3, &epoch))).await;
        if persistent {
            // Redis kept the topic: same epoch, seq went on, recovery works.
            assert_eq!(seq, 4);
            assert_eq!(
                (&r["recovered"], &r["epoch"]),
                (&json!(true), &json!(epoch)),
                "{r}"
            );
            assert_eq!(back.messages("news", 1).await, [(4, json!("after"))]);
        } else {
            // Redis lost it: a new epoch, seq from 1, and the client is told to resync.
            assert_eq!(seq, 1);
            assert_eq!(r["recovered"], false, "{r}");
            assert_ne!(r["epoch"], json!(epoch), "{r}");
        }
        // Presence too: B's member, written before the restart, is in Redis again (B writes
        // its members anew when Redis no longer knows B), and A lists it.
        let (ida, idb) = (back.id.clone(), live.id.clone());
        presence_becomes(&mut back, "news", &[&ida, &idb]).await;
        presence_becomes(&mut live, "news", &[&ida, &idb]).await;
    }
}

async fn a_password_is_sent_and_a_wrong_one_is_named(backend: Backend) {
    let port = Redis::unused_port();
    let _redis = Redis::start_with(port, false, &["--requirepass", "s3cret"]);
    let wrong = node(backend, &format!("redis://:nope@127.0.0.1:{port}"));
    ready_becomes(&wrong, 503).await;
    log_says(&wrong, "refused the hello").await;
    assert!(wrong.log().contains("WRONGPASS"), "{}", wrong.log());
    // The default user by name, or by a password alone.
    for url in [
        format!("redis://default:s3cret@127.0.0.1:{port}"),
        format!("redis://:s3cret@127.0.0.1:{port}/1"),
    ] {
        let right = node(backend, &url);
        ready_becomes(&right, 200).await;
        let (status, v) = api_publish(&right, "t", json!(1)).await;
        assert_eq!(status, 200, "{url}: {v}\n{}", right.log());
    }
}

async fn a_node_killed_abruptly_does_not_disturb_the_others(backend: Backend) {
    let redis = Redis::start(false);
    let [a, b, c] = ready_nodes(|_| node(backend, &redis.url())).await;
    let mut on_a = Client::connect(&a).await;
    on_a.subscribe("room", None).await;
    let mut on_b = Client::connect(&b).await;
    on_b.subscribe("room", None).await;
    api_publish(&a, "room", json!(1)).await;
    assert_eq!(on_b.messages("room", 1).await, [(1, json!(1))]);
    // A dies without a goodbye (its Redis connections reset mid-subscription).
    a.signal(libc::SIGKILL);
    drop(on_a);
    for i in 2..=4 {
        let (status, v) = api_publish(&c, "room", json!(i)).await;
        assert_eq!((status, v["seq"].as_u64()), (200, Some(i)), "{v}");
    }
    assert_eq!(
        on_b.messages("room", 3).await,
        [(2, json!(2)), (3, json!(3)), (4, json!(4))]
    );
    assert_eq!(b.get("/readyz").await.status, 200);
}

/// Asks `client`'s node for the members of `topic` until they are `expected` (each node's
/// view follows Redis's announcements, which the other nodes make on their own).
async fn presence_becomes(client: &mut Client, topic: &str, expected: &[&str]) {
    let mut expected: Vec<String> = expected.iter().map(|s| s.to_string()).collect();
    expected.sort();
    let deadline = Instant::now() + PATIENCE;
    loop {
        let got = client.presence(topic).await;
        if got == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "presence stayed {got:?}, not {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn presence_lists_every_node_and_a_killed_node_s_members_leave_once(backend: Backend) {
    let redis = Redis::start(false);
    // Heartbeats every second or so; a node silent for 4 s loses its members.
    let ttl = "presence_ttl = 4";
    let [a, b, c] = ready_nodes(|_| node_with(backend, &redis.url(), ttl, "")).await;
    let topic = "lobby";
    let mut on_b = Client::connect(&b).await;
    on_b.subscribe(topic, None).await;
    let mut on_c = Client::connect(&c).await;
    on_c.subscribe(topic, None).await;
    let mut on_a = Client::connect(&a).await;
    on_a.subscribe(topic, None).await;
    let (ida, idb, idc) = (on_a.id.clone(), on_b.id.clone(), on_c.id.clone());
    // Each node numbers its connections alike: the names differ by node all the same.
    assert!(ida != idb && idb != idc && ida != idc, "{ida} {idb} {idc}");
    let joined = |id: &str| {
        let id = id.to_string();
        move |v: &Value| v["type"] == "join" && v["client_id"] == id.as_str()
    };
    on_b.until(joined(&idc)).await;
    on_b.until(joined(&ida)).await;
    on_c.until(joined(&ida)).await;
    // Every node lists the members of every node.
    for client in [&mut on_a, &mut on_b, &mut on_c] {
        presence_becomes(client, topic, &[&ida, &idb, &idc]).await;
    }
    let api = b.get(&format!("/api/presence?topic={topic}")).await;
    let api: Value = serde_json::from_str(&api.body).expect("presence JSON");
    assert_eq!(api["members"].as_array().map(Vec::len), Some(3), "{api}");

    // A member that says goodbye leaves at once, announced on every node.
    let mut leaving = Client::connect(&c).await;
    leaving.subscribe(topic, None).await;
    let idl = leaving.id.clone();
    on_a.until(joined(&idl)).await;
    drop(leaving);
    let left = |id: &str| {
        let id = id.to_string();
        move |v: &Value| v["type"] == "leave" && v["client_id"] == id.as_str()
    };
    on_a.until(left(&idl)).await;
    on_b.until(left(&idl)).await;
    presence_becomes(&mut on_b, topic, &[&ida, &idb, &idc]).await;

    // A dies without a goodbye: a surviving node sweeps its member once its heartbeats have
    // stopped for presence_ttl (the wait is the TTL on the servers' clocks).
    a.signal(libc::SIGKILL);
    drop(on_a);
    on_b.until(left(&ida)).await;
    on_c.until(left(&ida)).await;
    presence_becomes(&mut on_b, topic, &[&idb, &idc]).await;
    presence_becomes(&mut on_c, topic, &[&idb, &idc]).await;
    // Each event came once: nothing else stashed after a message published since.
    api_publish(&b, topic, json!("after")).await;
    for client in [&mut on_b, &mut on_c] {
        client.messages(topic, 1).await;
        let events = client.presence_events();
        assert_eq!(
            events.iter().filter(|(_, id)| *id == ida).count(),
            0,
            "a second join or leave of the killed node's member: {events:?}"
        );
    }
    // Both of A's shards are gone from Redis's live owners (each node has two).
    let deadline = Instant::now() + PATIENCE;
    while redis.command(&["ZCARD", "ringgate:nodes"]).as_deref() != Some(":4") {
        assert!(Instant::now() < deadline, "A's owners were not swept");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn volatile_and_traced_messages_cross_nodes_without_touching_seq_or_history(
    backend: Backend,
) {
    let redis = Redis::start(false);
    let [a, b, c] = ready_nodes(|i| match i {
        2 => node(backend, &redis.url()),
        _ => node_debug(backend, &redis.url()),
    })
    .await;
    let mut sub = Client::connect(&b).await;
    let r = sub.subscribe("chat", None).await;
    let epoch = r["epoch"].as_str().expect("epoch").to_string();
    let mut publisher = Client::connect(&a).await;
    publisher
        .send(
            json!({"action": "publish", "topic": "chat", "data": {"typing": true},
                     "volatile": true, "trace": "v-1", "id": "v"}),
        )
        .await;
    let ack = publisher.until(|v| v["id"] == "v").await;
    assert_eq!(
        (&ack["type"], &ack["volatile"], ack.get("seq")),
        (&json!("ack"), &json!(true), None),
        "{ack}"
    );
    let (status, v) = api_post(
        &c,
        "/api/publish",
        json!({"topic": "chat", "data": 2, "volatile": true}),
    )
    .await;
    assert_eq!((status, v), (200, json!({"volatile": true})));
    publisher
        .send(json!({"action": "publish", "topic": "chat", "data": "kept",
                     "trace": "t-7", "id": "d"}))
        .await;
    let ack = publisher.until(|v| v["id"] == "d").await;
    assert_eq!(ack["seq"], 1, "volatile messages took no seq: {ack}");
    // Delivered on another node in publish order, with their traces.
    let mut got = Vec::new();
    while got.len() < 3 {
        got.push(sub.until(|v| v["topic"] == "chat").await);
    }
    assert_eq!(
        (&got[0]["volatile"], &got[0]["data"], &got[0]["trace"]),
        (&json!(true), &json!({"typing": true}), &json!("v-1")),
        "{}",
        got[0]
    );
    assert!(got[0].get("seq").is_none(), "{}", got[0]);
    // Both ends of the path log the trace: the publishing node and the delivering one.
    within("the debug lines", async {
        let logged = |n: &Server, what: &str| {
            n.log()
                .lines()
                .any(|l| l.contains(what) && l.contains("t-7") && l.contains("chat"))
        };
        while !(logged(&a, "room message sent to Redis") && logged(&b, "room message delivered")) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(
        (&got[1]["volatile"], &got[1]["data"]),
        (&json!(true), &json!(2))
    );
    assert_eq!(
        (
            &got[2]["seq"],
            &got[2]["data"],
            &got[2]["trace"],
            got[2].get("volatile")
        ),
        (&json!(1), &json!("kept"), &json!("t-7"), None),
        "{}",
        got[2]
    );
    // History holds the kept message only: read where the topic is not followed, and
    // replayed on a third node.
    let h = a.get("/api/history?topic=chat&since=0").await;
    let h: Value = serde_json::from_str(&h.body).expect("history JSON");
    assert_eq!(
        h["messages"].as_array().map(|m| m
            .iter()
            .map(|m| (m["seq"].clone(), m["data"].clone()))
            .collect::<Vec<_>>()),
        Some(vec![(json!(1), json!("kept"))]),
        "{h}"
    );
    let mut late = Client::connect(&c).await;
    let r = late.subscribe("chat", Some((0, &epoch))).await;
    assert_eq!(
        (&r["recovered"], &r["seq"]),
        (&json!(true), &json!(1)),
        "{r}"
    );
    late.ping().await;
    let replayed: Vec<_> = late
        .stash
        .iter()
        .filter(|v| v["topic"] == "chat" && v["type"] == "message")
        .map(|v| v["data"].clone())
        .collect();
    assert_eq!(replayed, [json!("kept")]);
}

async fn binary_topics_cross_nodes_byte_exact_with_recovery(backend: Backend) {
    let redis = Redis::start(false);
    let binary = "[[rooms.topic]]\nprefix = \"doc.\"\nbinary = true\n";
    let [a, b, c] = ready_nodes(|_| node_with(backend, &redis.url(), "", binary)).await;
    let topic = "doc.1";
    let mut sub = Client::connect(&b).await;
    let r = sub.subscribe(topic, None).await;
    let epoch = r["epoch"].as_str().expect("epoch").to_string();
    let mut writer = Client::connect(&a).await;
    // Bytes that are no UTF-8, a newline (the channel's separator) and digits after the seq.
    let updates: [&[u8]; 3] = [b"\x00\xff\n\x80", b"\n\n", b"123"];
    for u in updates {
        writer.send_bin(topic, false, u).await;
    }
    writer.send_bin(topic, true, b"\x01state").await;
    for (i, u) in updates.iter().enumerate() {
        assert_eq!(sub.next_bin().await, (Some(i as u64 + 1), u.to_vec()));
    }
    assert_eq!(sub.next_bin().await, (None, b"\x01state".to_vec()));
    // Recovered on a third node from Redis's history, byte for byte; the volatile one is not.
    let mut late = Client::connect(&c).await;
    let r = late.subscribe(topic, Some((0, &epoch))).await;
    assert_eq!(
        (&r["recovered"], &r["seq"]),
        (&json!(true), &json!(3)),
        "{r}"
    );
    for (i, u) in updates.iter().enumerate() {
        assert_eq!(late.next_bin().await, (Some(i as u64 + 1), u.to_vec()));
    }
    writer.send_bin(topic, false, b"live").await;
    assert_eq!(late.next_bin().await, (Some(4), b"live".to_vec()));
    assert_eq!(sub.next_bin().await, (Some(4), b"live".to_vec()));
}

async fn conflation_holds_back_each_receiving_node(backend: Backend) {
    let redis = Redis::start(false);
    // A window far longer than a burst of publishes takes.
    let ticker = "[[rooms.topic]]\nprefix = \"ticker.\"\nconflate = 2.0\n";
    let (a, b) = (
        node_with(backend, &redis.url(), "", ticker),
        node_with(backend, &redis.url(), "", ticker),
    );
    ready_becomes(&a, 200).await;
    ready_becomes(&b, 200).await;
    let topic = "ticker.eur";
    let mut subs = [Client::connect(&a).await, Client::connect(&b).await];
    for s in subs.iter_mut() {
        s.subscribe(topic, None).await;
    }
    let mut publisher = Client::connect(&a).await;
    const N: u64 = 20;
    for i in 1..=N {
        publisher
            .send(json!({"action": "publish", "topic": topic, "data": i, "id": i}))
            .await;
    }
    for i in 1..=N {
        let ack = publisher.until(|v| v["id"] == i).await;
        assert_eq!(ack["seq"], i, "every publish takes its seq in Redis: {ack}");
    }
    for (n, s) in subs.iter_mut().enumerate() {
        let mut values = Vec::new();
        while values.last() != Some(&N) {
            let m = s
                .until(|v| v["topic"] == topic && v["type"] == "message")
                .await;
            values.push(m["data"].as_u64().expect("data"));
        }
        assert!(
            values.windows(2).all(|w| w[0] < w[1]),
            "node {n}: an older value after a newer: {values:?}"
        );
        assert!(
            values.len() < N as usize,
            "node {n}: nothing conflated: {values:?}"
        );
        assert_eq!(values[0], 1, "node {n}: the first goes at once: {values:?}");
    }
}

async fn user_messages_and_disconnects_reach_every_node(backend: Backend) {
    let redis = Redis::start(false);
    let auth = format!("[auth]\njwt_secret = \"{JWT_SECRET}\"\nanonymous_channels = [\"*\"]\n");
    let [a, b, c] = ready_nodes(|_| node_with(backend, &redis.url(), "", &auth)).await;
    let alice_token = user_token("alice");
    let mut alice = [
        Client::connect_with_token(&a, &alice_token).await,
        Client::connect_with_token(&b, &alice_token).await,
    ];
    let mut bob = Client::connect_with_token(&b, &user_token("bob")).await;
    // Published on a node where alice has no connection.
    let (status, v) = api_post(
        &c,
        "/api/publish",
        json!({"user": "alice", "type": "notice", "data": {"n": 1}, "trace": "u-1"}),
    )
    .await;
    assert_eq!((status, v), (200, json!({"user": "alice"})));
    for client in alice.iter_mut() {
        let m = client.until(|v| v["type"] == "notice").await;
        assert_eq!(
            (&m["user"], &m["data"], &m["trace"]),
            (&json!("alice"), &json!({"n": 1}), &json!("u-1")),
            "{m}"
        );
    }
    // Bob's message goes the same way after alice's: had bob been given hers, it came first.
    api_post(
        &a,
        "/api/publish",
        json!({"user": "bob", "type": "notice", "data": 2}),
    )
    .await;
    let m = bob.until(|v| v["type"] == "notice").await;
    assert_eq!((&m["user"], &m["data"]), (&json!("bob"), &json!(2)), "{m}");

    let (status, v) = api_post(
        &c,
        "/api/disconnect",
        json!({"user": "alice", "code": 4001}),
    )
    .await;
    assert_eq!((status, v), (200, json!({"user": "alice", "code": 4001})));
    for client in alice.iter_mut() {
        assert_eq!(u16::from(expect_close(&mut client.ws).await), 4001);
    }
    bob.ping().await;

    // Without Redis the request is refused, not half-delivered.
    drop(redis);
    ready_becomes(&c, 503).await;
    let (status, v) = api_post(&c, "/api/publish", json!({"user": "bob", "data": 3})).await;
    assert_eq!((status, &v["code"]), (503, &json!("unavailable")), "{v}");
    let (status, v) = api_post(&c, "/api/disconnect", json!({"user": "bob"})).await;
    assert_eq!((status, &v["code"]), (503, &json!("unavailable")), "{v}");
}

async fn an_acl_user_connects_and_a_refused_one_is_named(backend: Backend) {
    let port = Redis::unused_port();
    // No default user: only `app` (everything) and `reader` (reads only) exist.
    let acl = "--user default off --user app on >app-pw ~* &* +@all \
               --user reader on >read-pw ~* &* +@read +hello";
    let _redis = Redis::start_with(port, false, &words(acl));
    let app = node(backend, &format!("redis://app:app-pw@127.0.0.1:{port}"));
    ready_becomes(&app, 200).await;
    delivers(&app, &app, "acl").await;
    // A wrong password, and a user that may not load the scripts: not ready, and the log
    // says what Redis refused.
    for (url, says) in [
        (format!("redis://app:nope@127.0.0.1:{port}"), "WRONGPASS"),
        (format!("redis://reader:read-pw@127.0.0.1:{port}"), "NOPERM"),
    ] {
        let refused = node(backend, &url);
        ready_becomes(&refused, 503).await;
        log_says(&refused, says).await;
        assert!(
            refused.log().contains("refused the hello"),
            "{}",
            refused.log()
        );
        assert!(
            !refused.log().contains("-pw"),
            "a password in the log: {}",
            refused.log()
        );
    }
}

async fn tls_to_redis_trusts_the_ca_file_and_names_an_untrusted_server(backend: Backend) {
    let certs = CertDir::new().await;
    let (port, tls_port) = (Redis::unused_port(), Redis::unused_port());
    let path = |f: &str| certs.file(f).display().to_string();
    let tls = format!(
        "--tls-port {tls_port} --tls-cert-file {} --tls-key-file {} --tls-ca-cert-file {} \
         --tls-auth-clients no",
        path("cert.pem"),
        path("key.pem"),
        path("ca.pem")
    );
    let _redis = Redis::start_with(port, false, &words(&tls));
    let url = format!("rediss://127.0.0.1:{tls_port}");
    let ca = format!("redis_ca_file = \"{}\"", path("ca.pem"));
    let [a, b] = ready_nodes(|_| node_with(backend, &url, &ca, "")).await;
    delivers(&a, &b, "secure").await;
    // Without the CA the server's certificate is not trusted: degraded, and the log says why.
    let untrusted = node(backend, &url);
    ready_becomes(&untrusted, 503).await;
    log_says(&untrusted, "UnknownIssuer").await;
    // TLS to the plain port fails the handshake the same way: not ready, never a hang.
    let plain = node_with(backend, &format!("rediss://127.0.0.1:{port}"), &ca, "");
    ready_becomes(&plain, 503).await;
    log_says(&plain, "Redis unavailable").await;
}

async fn sentinel_failover_moves_every_node_to_the_new_master(backend: Backend) {
    let mut master = Redis::start(false);
    let master_port = master.port.to_string();
    let replica = Redis::start_with(
        Redis::unused_port(),
        false,
        &["--replicaof", "127.0.0.1", &master_port],
    );
    let sentinel = Sentinel::start("main", master.port, "");
    // Neither the replica's first sync nor the sentinel learning of it (from the master's
    // INFO, every 10 s) is announced to a client: the test polls for both.
    let deadline = Instant::now() + TEST_LIMIT / 3;
    let synced = |i: Option<String>| i.is_some_and(|i| i.contains("master_link_status:up"));
    let seen = |i: Option<String>| i.is_some_and(|i| i.contains("slaves=1"));
    while !(synced(replica.command(&["INFO", "replication"]))
        && seen(sentinel.command(&["INFO", "sentinel"])))
    {
        assert!(
            Instant::now() < deadline,
            "the replica never synced, or the sentinel never saw it"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let url = format!("redis+sentinel://127.0.0.1:{}/main", sentinel.port);
    let (a, b) = (node(backend, &url), node(backend, &url));
    ready_becomes(&a, 200).await;
    ready_becomes(&b, 200).await;
    let mut live = Client::connect(&b).await;
    let r = live.subscribe("ha", None).await;
    assert_eq!(r["type"], "subscribed", "{r}; log:\n{}", b.log());
    let (status, v) = api_publish(&a, "ha", json!(1)).await;
    assert_eq!((status, v["seq"].as_u64()), (200, Some(1)), "{v}");
    assert_eq!(live.messages("ha", 1).await, [(1, json!(1))]);
    // The replica has every write before the master goes: it has applied the master's
    // replication stream up to the publish. (Not `WAIT`: from the test's own connection, which
    // wrote nothing, it counts any online replica, even one whose stream the master still
    // holds back until the replica's first ACK after its sync.)
    let offset = |r: &Redis, field: &str| {
        r.command(&["INFO", "replication"])
            .and_then(|i| info_number(&i, field))
    };
    let written = offset(&master, "master_repl_offset").expect("the master's offset");
    let deadline = Instant::now() + TEST_LIMIT / 3;
    while offset(&replica, "slave_repl_offset").is_none_or(|o| o < written) {
        assert!(
            Instant::now() < deadline,
            "the replica never applied the publish; master log:\n{}\nreplica log:\n{}",
            master.log(),
            replica.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    master.kill();
    // The sentinel promotes the replica; publishes fail until a node reaches it, then go on
    // with the same sequence.
    let deadline = Instant::now() + TEST_LIMIT / 2;
    let seq = loop {
        let (status, v) = api_publish(&a, "ha", json!("after")).await;
        if status == 200 {
            break v["seq"].as_u64().expect("seq");
        }
        assert_eq!(v["code"], "unavailable", "{v}");
        assert!(Instant::now() < deadline, "no failover; log:\n{}", a.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        seq,
        2,
        "a new epoch after the failover; a's log:\n{}\nb's log:\n{}\nsentinel's log:\n{}\n\
         old master's log:\n{}\nnew master's log:\n{}",
        a.log(),
        b.log(),
        sentinel.log(),
        master.log(),
        replica.log()
    );
    assert_eq!(live.messages("ha", 1).await, [(2, json!("after"))]);
    assert!(
        replica
            .command(&["INFO", "replication"])
            .is_some_and(|i| i.contains("role:master")),
        "the replica was promoted"
    );
    // A master the sentinels do not know: not ready, and the log says so.
    let unknown = node(
        backend,
        &format!("redis+sentinel://127.0.0.1:{}/other", sentinel.port),
    );
    ready_becomes(&unknown, 503).await;
    log_says(&unknown, "does not know the master").await;
}

/// The number `field:N` of an `INFO` answer.
fn info_number(info: &str, field: &str) -> Option<u64> {
    info.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|n| n.trim().parse().ok())
}

async fn sentinels_with_a_password_are_asked_with_sentinel_password(backend: Backend) {
    let master = Redis::start(false);
    let sentinel = Sentinel::start("main", master.port, "requirepass s-pw");
    let url = format!("redis+sentinel://127.0.0.1:{}/main", sentinel.port);
    let asked = node_with(backend, &url, "sentinel_password = \"s-pw\"", "");
    ready_becomes(&asked, 200).await;
    delivers(&asked, &asked, "guarded").await;
    // Without it the sentinel refuses: not ready, and the log says what was refused.
    let refused = node(backend, &url);
    ready_becomes(&refused, 503).await;
    log_says(&refused, "refused SENTINEL GET-MASTER-ADDR-BY-NAME").await;
    assert!(refused.log().contains("NOAUTH"), "{}", refused.log());
}

/// One topic per master of `cluster`: the first of `t0`, `t1`, … whose slot it serves.
fn topic_per_master(cluster: &RedisCluster) -> Vec<String> {
    let mut topics = vec![String::new(); 3];
    for i in 0.. {
        let topic = format!("t{i}");
        let master = RedisCluster::master_of(cluster.slot(&format!("ringgate:{{{topic}}}:s")));
        if topics[master].is_empty() {
            topics[master] = topic;
        }
        if topics.iter().all(|t| !t.is_empty()) {
            return topics;
        }
    }
    unreachable!()
}

async fn a_redis_cluster_carries_topics_of_every_master_in_one_order(backend: Backend) {
    let cluster = RedisCluster::start();
    let [a, b, c] = ready_nodes(|_| node(backend, &cluster.url())).await;
    let topics = topic_per_master(&cluster);
    let mut on_b = Client::connect(&b).await;
    let mut on_c = Client::connect(&c).await;
    let mut epochs = Vec::new();
    for t in &topics {
        let r = on_b.subscribe(t, None).await;
        assert_eq!(r["type"], "subscribed", "{r}; log:\n{}", b.log());
        epochs.push(r["epoch"].as_str().expect("epoch").to_string());
        let r = on_c.subscribe(t, None).await;
        assert_eq!(
            r["epoch"],
            epochs[epochs.len() - 1],
            "one epoch per topic: {r}"
        );
    }
    // Interleaved publishes on A over the API and a `/ws` client: each topic numbered on
    // its own master, 1 to 4.
    let mut publisher = Client::connect(&a).await;
    for i in 1..=4u64 {
        for t in &topics {
            let (status, v) = api_publish(&a, t, json!({"api": i})).await;
            assert_eq!((status, v["seq"].as_u64()), (200, Some(2 * i - 1)), "{v}");
            publisher
                .send(json!({"action": "publish", "topic": t, "data": {"ws": i}, "id": "p"}))
                .await;
            let ack = publisher.until(|v| v["id"] == "p").await;
            assert_eq!(ack["seq"], 2 * i, "{ack}");
        }
    }
    for t in &topics {
        let got_b = on_b.messages(t, 8).await;
        let got_c = on_c.messages(t, 8).await;
        let seqs: Vec<u64> = got_b.iter().map(|m| m.0).collect();
        assert_eq!(seqs, (1..=8).collect::<Vec<_>>(), "{t}");
        assert_eq!(got_b, got_c, "{t}: one order on every node");
    }
    // Each master holds its own topic's keys: the topics are spread.
    for (m, t) in cluster.masters.iter().zip(&topics) {
        let key = format!("ringgate:{{{t}}}:h");
        assert_eq!(m.command(&["LLEN", &key]).as_deref(), Some(":8"), "{t}");
    }
    // A client of B that left recovers on C exactly what it missed, from Redis.
    drop(on_b);
    for t in &topics {
        api_publish(&a, t, json!("missed")).await;
    }
    let mut back = Client::connect(&c).await;
    for (t, epoch) in topics.iter().zip(&epochs) {
        let r = back.subscribe(t, Some((8, epoch))).await;
        assert_eq!(
            (&r["recovered"], &r["seq"]),
            (&json!(true), &json!(9)),
            "{r}"
        );
        assert_eq!(back.messages(t, 1).await, [(9, json!("missed"))]);
    }
    // Messages to a user cross the cluster on the users channel.
    let (status, v) = api_post(&b, "/api/disconnect", json!({"user": "nobody"})).await;
    assert_eq!(status, 200, "{v}");
}

async fn a_slot_moved_to_another_master_keeps_publishing_and_fan_out(backend: Backend) {
    let cluster = RedisCluster::start();
    let [a, b] = ready_nodes(|_| node(backend, &cluster.url())).await;
    let topic = "moving";
    let keys: Vec<String> = ["s", "h", "p", "n"]
        .iter()
        .map(|k| format!("ringgate:{{{topic}}}:{k}"))
        .collect();
    let slot = cluster.slot(&keys[0]);
    let from = RedisCluster::master_of(slot);
    let to = (from + 1) % 3;
    let mut on_b = Client::connect(&b).await;
    let r = on_b.subscribe(topic, None).await;
    let epoch = r["epoch"].as_str().expect("epoch").to_string();
    for i in 1..=3u64 {
        let (status, v) = api_publish(&a, topic, json!(i)).await;
        assert_eq!((status, v["seq"].as_u64()), (200, Some(i)), "{v}");
    }
    assert_eq!(on_b.messages(topic, 3).await.len(), 3);
    // Resharded under the nodes: the next publish is answered MOVED by the old master, and
    // B's subscription is ended by it.
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    cluster.move_slot(slot, &keys, from, to);
    for i in 4..=6u64 {
        let (status, v) = api_publish(&a, topic, json!(i)).await;
        assert_eq!(
            (status, v["seq"].as_u64()),
            (200, Some(i)),
            "{v}; log:\n{}",
            a.log()
        );
    }
    log_says(&a, "slot moved to another master").await;
    log_says(&b, "Redis ended the topic's subscription").await;
    // B follows the topic on the new master: what was published meanwhile, in order, once.
    let got = on_b.messages(topic, 3).await;
    assert_eq!(
        got,
        [(4, json!(4)), (5, json!(5)), (6, json!(6))],
        "{}",
        b.log()
    );
    api_publish(&a, topic, json!(7)).await;
    assert_eq!(on_b.messages(topic, 1).await, [(7, json!(7))]);
    // The history moved with the slot: a newcomer recovers from the new master.
    let mut late = Client::connect(&a).await;
    let r = late.subscribe(topic, Some((5, &epoch))).await;
    assert_eq!(
        (&r["recovered"], &r["epoch"]),
        (&json!(true), &json!(epoch)),
        "{r}"
    );
    assert_eq!(
        late.messages(topic, 2).await,
        [(6, json!(6)), (7, json!(7))]
    );
    let key = format!("ringgate:{{{topic}}}:h");
    assert_eq!(
        cluster.masters[to].command(&["LLEN", &key]).as_deref(),
        Some(":7")
    );
}

async fn a_redirect_loop_fails_its_commands_and_is_logged_once_per_slot(backend: Backend) {
    let cluster = RedisCluster::start();
    let [a] = ready_nodes(|_| node(backend, &cluster.url())).await;
    // A topic nothing was written to, so its master may give its slot away; then two
    // masters each answer MOVED towards the other for it.
    let topic = "looping";
    let slot = cluster.slot(&format!("ringgate:{{{topic}}}:s"));
    let owner = RedisCluster::master_of(slot);
    cluster.redirect_loop(slot, owner, (owner + 1) % 3);
    for i in 1..=2 {
        let (status, v) = within(
            "a publish to a looping slot",
            api_publish(&a, topic, json!(i)),
        )
        .await;
        assert_eq!(
            (status, &v["code"]),
            (503, &json!("unavailable")),
            "{v}; log:\n{}",
            a.log()
        );
    }
    assert_eq!(
        rooms::metric_sum(&a, "ringgate_redis_redirect_loops_total").await,
        2.0
    );
    // The link stayed up: every other slot is served.
    for t in topic_per_master(&cluster) {
        let (status, v) = api_publish(&a, &t, json!("still")).await;
        assert_eq!(status, 200, "{t}: {v}");
    }
    let log = a.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("redirect loop"))
        .collect();
    assert_eq!(lines.len(), 1, "logged once per slot:\n{log}");
    assert!(lines[0].contains(&format!("slot={slot}")), "{}", lines[0]);
}

async fn presence_crosses_a_redis_cluster_and_a_killed_node_s_members_leave_once(backend: Backend) {
    let cluster = RedisCluster::start();
    let ttl = "presence_ttl = 4";
    let [a, b, c] = ready_nodes(|_| node_with(backend, &cluster.url(), ttl, "")).await;
    // Two topics on two masters: each is heartbeated and swept on its own.
    let topics = topic_per_master(&cluster);
    let topics = &topics[..2];
    let mut on = Vec::new();
    for n in [&b, &c, &a] {
        let mut client = Client::connect(n).await;
        for t in topics {
            client.subscribe(t, None).await;
        }
        on.push(client);
    }
    let ids: Vec<String> = on.iter().map(|c| c.id.clone()).collect();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    for client in &mut on {
        for t in topics {
            presence_becomes(client, t, &id_refs).await;
        }
    }
    for client in &mut on {
        client.presence_events();
    }
    // A (the third) dies without a goodbye: B and C hear its member leave each topic once.
    a.signal(libc::SIGKILL);
    let killed = on.pop().expect("A's client");
    let left = |t: &str| {
        let (t, id) = (t.to_string(), killed.id.clone());
        move |v: &Value| {
            v["type"] == "leave" && v["topic"] == t.as_str() && v["client_id"] == id.as_str()
        }
    };
    for client in &mut on {
        for t in topics {
            client.until(left(t)).await;
            presence_becomes(client, t, &id_refs[..2]).await;
        }
    }
    for t in topics {
        api_publish(&b, t, json!("after")).await;
    }
    for client in &mut on {
        for t in topics {
            client.messages(t, 1).await;
        }
        let events = client.presence_events();
        assert_eq!(
            events.iter().filter(|(_, id)| *id == killed.id).count(),
            0,
            "a second join or leave of the killed node's member: {events:?}"
        );
    }
    // Each topic's deadlines hold the two live owners (B's and C's home shards) only.
    for t in topics {
        let key = format!("ringgate:{{{t}}}:n");
        let master = &cluster.masters[RedisCluster::master_of(cluster.slot(&key))];
        assert_eq!(
            master.command(&["ZCARD", &key]).as_deref(),
            Some(":2"),
            "{t}"
        );
    }
}

async fn a_cluster_master_down_degrades_the_nodes_until_it_is_back(backend: Backend) {
    let mut cluster = RedisCluster::start();
    let [a, b] = ready_nodes(|_| node(backend, &cluster.url())).await;
    let topics = topic_per_master(&cluster);
    let mut on_b = Client::connect(&b).await;
    on_b.subscribe(&topics[0], None).await;
    api_publish(&a, &topics[0], json!("before")).await;
    assert_eq!(on_b.messages(&topics[0], 1).await, [(1, json!("before"))]);
    // The third master dies (without persistence: its data goes with it). The link of every
    // node is one link: down, and requests that need Redis are refused, whatever the topic.
    cluster.masters[2].kill();
    for n in [&a, &b] {
        ready_becomes(n, 503).await;
    }
    for t in &topics {
        let (status, v) = api_publish(&a, t, json!("during")).await;
        assert_eq!((status, &v["code"]), (503, &json!("unavailable")), "{v}");
    }
    // B's subscriber stays, served from the mirror.
    let mut late = Client::connect(&b).await;
    let r = late.subscribe(&topics[0], Some((0, "x"))).await;
    assert_eq!(r["type"], "subscribed", "{r}");
    // Back (its node configuration kept, so it serves its slots again): the nodes reconnect,
    // follow their topics again and carry on in the same order.
    cluster.masters[2].restart();
    cluster.wait_ok();
    for n in [&a, &b] {
        ready_becomes(n, 200).await;
    }
    for t in &topics {
        let (status, v) = api_publish(&a, t, json!("after")).await;
        assert_eq!(status, 200, "{v}");
    }
    assert_eq!(on_b.messages(&topics[0], 1).await, [(2, json!("after"))]);
}

async fn a_dead_node_with_many_members_is_swept_in_bounded_runs(backend: Backend) {
    let redis = Redis::start(false);
    // A node that died with 2,500 members in "lobby", its heartbeat long past.
    let populate = r#"EVAL "for i=1,2500 do redis.call('HSET', KEYS[1], 'dead:'..i, '{\"client_id\":\"d'..i..'\",\"user\":\"u\",\"joined_at\":1}') redis.call('SADD', KEYS[2], i..'\\n'..'lobby') end redis.call('ZADD', KEYS[3], 1, 'dead') return 1" 3 ringgate:{lobby}:p ringgate:o:dead ringgate:nodes"#;
    assert_eq!(redis.command(&[populate]).as_deref(), Some(":1"));
    assert_eq!(
        redis.command(&["HLEN", "ringgate:{lobby}:p"]).as_deref(),
        Some(":2500")
    );
    // Heartbeats every 20 s: the sweep is done by the runs that follow each other at once,
    // 1,000 members each, from the first heartbeat on.
    let n = node_with(backend, &redis.url(), "presence_ttl = 60", "");
    ready_becomes(&n, 200).await;
    let deadline = Instant::now() + PATIENCE;
    while redis.command(&["EXISTS", "ringgate:o:dead"]).as_deref() != Some(":0")
        || redis.command(&["HLEN", "ringgate:{lobby}:p"]).as_deref() != Some(":0")
    {
        assert!(Instant::now() < deadline, "the dead node was not swept");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        redis
            .command(&["ZSCORE", "ringgate:nodes", "dead"])
            .as_deref(),
        Some("$-1"),
        "the dead owner is forgotten"
    );
    let stats = redis.command(&["INFO", "commandstats"]).unwrap_or_default();
    let spops: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_spop:calls="))
        .and_then(|l| l.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(
        spops >= 3,
        "2,500 members in runs of at most 1,000: {stats}"
    );
}

async fn tls_to_the_sentinels_and_the_master_with_rediss_sentinel(backend: Backend) {
    let certs = CertDir::new().await;
    let path = |f: &str| certs.file(f).display().to_string();
    // The same TLS settings for the master (as arguments) and the sentinel (as lines).
    let tls = |port: u16| {
        vec![
            format!("tls-port {port}"),
            format!("tls-cert-file {}", path("cert.pem")),
            format!("tls-key-file {}", path("key.pem")),
            format!("tls-ca-cert-file {}", path("ca.pem")),
            "tls-auth-clients no".to_string(),
        ]
    };
    let master_tls = Redis::unused_port();
    let args: Vec<String> = tls(master_tls).iter().map(|l| format!("--{l}")).collect();
    let args = args.join(" ");
    let _master = Redis::start_with(Redis::unused_port(), false, &words(&args));
    // The sentinel watches the master over TLS too, and answers on its TLS port.
    let sentinel_tls = Redis::unused_port();
    let more = tls(sentinel_tls).join("\n") + "\ntls-replication yes";
    let sentinel = Sentinel::start("main", master_tls, &more);
    let ca = format!("redis_ca_file = \"{}\"", path("ca.pem"));
    let url = format!("rediss+sentinel://127.0.0.1:{sentinel_tls}/main");
    let [a, b] = ready_nodes(|_| node_with(backend, &url, &ca, "")).await;
    delivers(&a, &b, "secure").await;
    // TLS to the sentinel's plain port fails the handshake: not ready, and the log says so.
    let plain = format!("rediss+sentinel://127.0.0.1:{}/main", sentinel.port);
    let wrong = node_with(backend, &plain, &ca, "");
    ready_becomes(&wrong, 503).await;
    log_says(&wrong, "no sentinel named the master").await;
}

async fn writes_lost_behind_a_node_s_mirror_start_a_new_epoch(backend: Backend) {
    let redis = Redis::start(false);
    let [a, b] = ready_nodes(|_| node(backend, &redis.url())).await;
    let mut on_b = Client::connect(&b).await;
    let r = on_b.subscribe("feed", None).await;
    let epoch = r["epoch"].as_str().expect("epoch").to_string();
    for i in 1..=3 {
        api_publish(&a, "feed", json!(i)).await;
    }
    assert_eq!(on_b.messages("feed", 3).await.len(), 3);
    // What a failover to a replica that had not received 2 and 3 leaves: seq 1, under the same
    // epoch. Then every node's connection drops, as it does when the master fails.
    redis.command(&["HSET", "ringgate:{feed}:s", "s", "1"]);
    redis.command(&["LTRIM", "ringgate:{feed}:h", "0", "0"]);
    redis.command(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    redis.command(&["CLIENT", "KILL", "TYPE", "normal"]);
    // B's mirror has seen 3: the topic starts over with a new epoch rather than number new
    // messages 2 and 3 again under the old one.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let e = redis.command(&["HGET", "ringgate:{feed}:s", "e"]);
        if e.as_deref().is_some_and(|e| e != epoch) {
            break;
        }
        assert!(Instant::now() < deadline, "the epoch stayed {e:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for n in [&a, &b] {
        ready_becomes(n, 200).await;
    }
    let (status, v) = api_publish(&a, "feed", json!("next")).await;
    assert_eq!((status, v["seq"].as_u64()), (200, Some(1)), "{v}");
    assert_eq!(on_b.messages("feed", 1).await, [(1, json!("next"))]);
    // A client that saw 3 under the old epoch is told its history is gone.
    let mut back = Client::connect(&a).await;
    let r = back.subscribe("feed", Some((3, &epoch))).await;
    assert_eq!(r["recovered"], false, "{r}");
    assert_ne!(r["epoch"], json!(epoch), "{r}");
}
