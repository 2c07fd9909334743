//! Rooms delivery under realtime rules: slow consumers, fan-out, write delays, volatile
//! messages, conflation, trace ids and user-directed delivery (PROTOCOL.md).

mod common;

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use common::rooms::*;
use common::*;
use serde_json::{json, Value};

both_backends!(
    slow_consumer_closed_1013_others_get_everything,
    fanout_2000_subscribers_exact_counts,
    write_delay_holds_room_messages_not_replies,
    volatile_publishes_are_never_in_history_nor_replayed,
    conflation_delivers_the_latest_and_never_an_older_value_after_a_newer,
    trace_ids_are_delivered_and_logged_from_publish_to_delivery,
    user_messages_reach_every_connection_of_the_user_across_shards_only,
    per_prefix_write_delay_keeps_chat_instant_while_tickers_batch,
);

// ---- slow consumer -------------------------------------------------------------------------

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

// ---- fan-out -------------------------------------------------------------------------------

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

// ---- volatile, conflation, trace ids, user-directed delivery (docs/PROTOCOL.md) ------------

impl Client {
    /// Connects to `/ws` with `token` as the `bearer.` subprotocol.
    async fn connect_with_token(server: &Server, token: &str) -> Client {
        let mut ws = server.ws_with_token(token).await;
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
