//! Rooms recovery (`subscribe` with `since`/`epoch`, PROTOCOL.md "Ordering and recovery"): the
//! replay of exactly the missed messages, lost history (overflow, wrong epoch, expiry), and
//! subscribes racing each other or an unsubscribe.

mod common;

use std::time::{Duration, Instant};

use common::rooms::*;
use common::*;
use serde_json::json;

both_backends!(
    recovery_replays_exactly_the_missed_messages,
    recovery_lost_after_history_overflow_or_wrong_epoch,
    recovery_after_history_expired_gets_a_new_epoch,
    resubscribe_with_since_while_a_subscribe_is_in_flight,
    a_repeated_subscribe_replays_nothing_of_its_own,
);

// ---- recovery ------------------------------------------------------------------------------

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
    let r = sub.subscribe_since(topic, 10, &epoch).await;
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
    let r = lost.subscribe_since(topic, 2, &epoch).await;
    assert_eq!(
        r["recovered"], false,
        "history of 5 cannot cover since=2: {r}"
    );
    assert_eq!(r["seq"], 12, "{r}");
    let r = lost.subscribe_since("ovf.other", 0, &epoch).await;
    assert_eq!(r["recovered"], false, "another topic's epoch: {r}");

    // A client each: (name, since, epoch, recovered, why, the first seq it then gets).
    let wrong_epoch = json!("not-the-epoch");
    let cases = [
        ("edge", 7, &epoch, true, "history 8..=12 covers since=7", 8),
        ("beyond", 6, &epoch, false, "history 8..=12 misses 7", 13),
        ("current", 12, &epoch, true, "nothing missed", 13),
        ("wrong epoch", 10, &wrong_epoch, false, "wrong epoch", 13),
        ("future", 1000, &epoch, false, "since from the future", 13),
    ];
    let mut clients = vec![("lost", lost, 13)];
    for (name, since, epoch, recovered, why, first) in cases {
        let mut c = Client::connect(&server).await;
        let r = c.subscribe_since(topic, since, epoch).await;
        assert_eq!(r["recovered"], recovered, "{name}: {why}: {r}");
        clients.push((name, c, first));
    }

    assert_eq!(publisher.publish(topic, json!(13)).await, 13);
    for (name, mut c, first) in clients {
        let got = c.room_seqs_until(topic, 13).await;
        let want: Vec<u64> = (first..=13).collect();
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
    let r = c.subscribe_since(topic, 3, &epoch).await;
    assert_eq!(r["recovered"], false, "history expired: {r}");
    assert_ne!(
        r["epoch"], epoch,
        "a new lifetime of the topic's history: {r}"
    );
}

/// Publishes messages 1..=10 to `topic` (subscribed, so the ack of each is awaited in turn);
/// returns the topic's epoch.
async fn ten_messages(publisher: &mut Client, topic: &str) -> serde_json::Value {
    let epoch = publisher.subscribe(topic).await["epoch"].clone();
    for i in 1..=10u64 {
        assert_eq!(publisher.publish(topic, json!(i)).await, i);
    }
    epoch
}

/// subscribe, unsubscribe, subscribe-with-since sent back to back (the first answer still on
/// its way from the home shard): the last subscribe decides, so its replay must arrive.
async fn resubscribe_with_since_while_a_subscribe_is_in_flight(backend: Backend) {
    let server = start(backend, "[rooms]\npublish_rate = 0\n");
    let mut publisher = Client::connect(&server).await;
    for round in 0..20 {
        let topic = format!("inflight.{round}");
        let epoch = ten_messages(&mut publisher, &topic).await;
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
        let got = c.room_seqs_until(&topic, 11).await;
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
        let epoch = ten_messages(&mut publisher, &topic).await;
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
        let got = c.room_seqs_until(&topic, 11).await;
        assert_eq!(
            got,
            (3..=11).collect::<Vec<u64>>(),
            "round {round}: the first subscribe's replay (since 2), then live, once each"
        );
    }
}
