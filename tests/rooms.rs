//! Rooms (`/ws`) of PROTOCOL.md, over real sockets against the real binary with several
//! shards, so topics are homed on other shards than their publishers and subscribers: protocol
//! basics, ordering under concurrent publishers, ids and JSON escaping, presence, every client
//! error, and rooms freed after use. Recovery, realtime delivery, the HTTP API and binary rooms
//! have their own files (`rooms_*.rs`); the client is in `common/rooms.rs`.

mod common;

use std::collections::HashMap;

use common::rooms::*;
use common::*;
use futures_util::SinkExt;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

both_backends!(
    protocol_basics,
    ordering_concurrent_publishers,
    ids_and_json_escaping_round_trip,
    presence_join_leave_and_query,
    presence_events_off_by_prefix_and_member_cap,
    integers_beyond_64_bits_are_bad_json,
    every_client_error_keeps_the_connection_open,
    publish_rate_limited,
    subscribe_unsubscribe_cycles_leave_no_rooms,
);

// ---- protocol basics -----------------------------------------------------------------------

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

// ---- ordering ------------------------------------------------------------------------------

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

// ---- presence ------------------------------------------------------------------------------

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

// ---- client errors -------------------------------------------------------------------------

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

// ---- no rooms left behind ------------------------------------------------------------------

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
