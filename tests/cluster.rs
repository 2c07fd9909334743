//! Rooms across nodes through Redis (`[cluster] engine = "redis"`, docs/CLUSTER.md): a real
//! `redis-server` started by each test, and several real ringgate nodes on it. One seq order
//! for every node, recovery on another node, a node without Redis (degraded, `/readyz`), and
//! Redis restarted under the nodes with and without its data.

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
    an_acl_user_connects_and_a_refused_one_is_named,
    tls_to_redis_trusts_the_ca_file_and_names_an_untrusted_server,
    sentinel_failover_moves_every_node_to_the_new_master,
    sentinels_with_a_password_are_asked_with_sentinel_password,
);

/// A node of the cluster: two shards, so topics are homed away from their clients.
fn node(backend: Backend, redis_url: &str) -> Server {
    node_with(backend, redis_url, "")
}

/// [`node`] with more `[cluster]` keys (TOML lines).
fn node_with(backend: Backend, redis_url: &str, cluster: &str) -> Server {
    let config = format!(
        "[cluster]\nengine = \"redis\"\nredis_url = \"{redis_url}\"\nreconnect_max_delay = 0.2\n\
         {cluster}\n[rooms]\npublish_rate = 0\nrequest_rate = 0\n"
    );
    Server::start_sharded(backend, 2, &config, &[])
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

/// A `/ws` client speaking JSON; what arrives while waiting for something else is stashed.
struct Client {
    ws: Ws,
    stash: VecDeque<Value>,
}

impl Client {
    async fn connect(server: &Server) -> Client {
        let ws = server.ws_path("/ws").await;
        let mut c = Client {
            ws,
            stash: VecDeque::new(),
        };
        let hello = c.next().await;
        assert_eq!(hello["type"], "connected", "{hello}");
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

    /// The next message from the socket.
    async fn read(&mut self) -> Value {
        loop {
            match within("a message", self.ws.next()).await {
                Some(Ok(Message::Text(t))) => {
                    return serde_json::from_str(&t).expect("JSON from the server")
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                other => panic!("expected a text message, got {other:?}"),
            }
        }
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
    let body = json!({"topic": topic, "data": data}).to_string();
    let r = server.post("/api/publish", "", &body).await;
    let v = serde_json::from_str(&r.body).unwrap_or(Value::Null);
    (r.status, v)
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
    let (a, b, c) = (
        node(backend, &redis.url()),
        node(backend, &redis.url()),
        node(backend, &redis.url()),
    );
    for n in [&a, &b, &c] {
        ready_becomes(n, 200).await;
    }
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
        assert_eq!(status, 200, "{url}: {v}");
    }
}

async fn a_node_killed_abruptly_does_not_disturb_the_others(backend: Backend) {
    let redis = Redis::start(false);
    let (a, b, c) = (
        node(backend, &redis.url()),
        node(backend, &redis.url()),
        node(backend, &redis.url()),
    );
    for n in [&a, &b, &c] {
        ready_becomes(n, 200).await;
    }
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
    let (a, b) = (node_with(backend, &url, &ca), node_with(backend, &url, &ca));
    ready_becomes(&a, 200).await;
    ready_becomes(&b, 200).await;
    delivers(&a, &b, "secure").await;
    // Without the CA the server's certificate is not trusted: degraded, and the log says why.
    let untrusted = node(backend, &url);
    ready_becomes(&untrusted, 503).await;
    log_says(&untrusted, "UnknownIssuer").await;
    // TLS to the plain port fails the handshake the same way: not ready, never a hang.
    let plain = node_with(backend, &format!("rediss://127.0.0.1:{port}"), &ca);
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
    // The replica has every write before the master goes.
    assert_eq!(
        master.command(&["WAIT", "1", "5000"]).as_deref(),
        Some(":1")
    );
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
    assert_eq!(seq, 2);
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

async fn sentinels_with_a_password_are_asked_with_sentinel_password(backend: Backend) {
    let master = Redis::start(false);
    let sentinel = Sentinel::start("main", master.port, "requirepass s-pw");
    let url = format!("redis+sentinel://127.0.0.1:{}/main", sentinel.port);
    let asked = node_with(backend, &url, "sentinel_password = \"s-pw\"");
    ready_becomes(&asked, 200).await;
    delivers(&asked, &asked, "guarded").await;
    // Without it the sentinel refuses: not ready, and the log says what was refused.
    let refused = node(backend, &url);
    ready_becomes(&refused, 503).await;
    log_says(&refused, "refused SENTINEL GET-MASTER-ADDR-BY-NAME").await;
    assert!(refused.log().contains("NOAUTH"), "{}", refused.log());
}
