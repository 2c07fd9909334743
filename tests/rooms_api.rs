//! The rooms HTTP API (`/api/*`) and the rooms' metrics (PROTOCOL.md, "Rooms HTTP API").

mod common;

use std::time::{Duration, Instant};

use common::rooms::*;
use common::*;
use serde_json::json;
use tokio::io::AsyncWriteExt;

both_backends!(
    api_publish_presence_history,
    api_publish_without_key_configured,
    api_publish_refuses_integers_beyond_64_bits,
    publish_bodies_are_refused_alike,
    room_metrics_follow_traffic,
);

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

async fn api_publish_refuses_integers_beyond_64_bits(backend: Backend) {
    let server = start(backend, "");
    let mut sub = Client::connect(&server).await;
    sub.subscribe("wide").await;
    for body in [
        r#"{"topic": "wide", "data": 18446744073709551616}"#,
        r#"{"topic": "wide", "data": {"n": [-9223372036854775809]}}"#,
    ] {
        let r = server.post("/api/publish", "", body).await;
        assert_eq!(r.status, 400, "{body}: {r:?}");
        assert_eq!(json_body(&r)["code"], "bad_json", "{body}: {r:?}");
    }
    // The 64-bit edges pass exactly, and the refused ones took no seq.
    let edges =
        r#"{"topic": "wide", "data": {"max": 18446744073709551615, "min": -9223372036854775808}}"#;
    let r = server.post("/api/publish", "", edges).await;
    assert_eq!((r.status, &json_body(&r)["seq"]), (200, &json!(1)), "{r:?}");
    let m = sub.room_message("wide").await;
    assert_eq!(m["data"], json!({"max": u64::MAX, "min": i64::MIN}), "{m}");
}

/// `POST /api/publish` and `POST /publish` read their bodies alike: each kind of bad body gets
/// the same status, code and text on both, and takes no seq.
async fn publish_bodies_are_refused_alike(backend: Backend) {
    let server = start(backend, "handshake_timeout = 1.0\n");
    // The limit is max_data_size + max_topic_length + 4096 (65536 + 128 + 4096).
    let huge = json!({"topic": "t", "data": "x".repeat(70_000)}).to_string();
    let refusals = [
        ("not json", 400, "bad_json", "invalid JSON: "),
        ("[1]", 400, "bad_json", "body must be a JSON object"),
        (
            r#"{"topic": "t", "data": 18446744073709551616}"#,
            400,
            "bad_json",
            "integers must fit in 64 bits",
        ),
        (&huge, 413, "too_large", "body is larger than 69760 bytes"),
    ];
    for path in ["/api/publish", "/publish"] {
        for (body, status, code, text) in refusals {
            let r = server.post(path, "", body).await;
            assert_eq!(r.status, status, "{path} {body:.40}: {r:?}");
            let e = json_body(&r);
            assert_eq!(e["code"], code, "{path} {body:.40}: {e}");
            let error = e["error"].as_str().unwrap_or_default();
            assert!(error.contains(text), "{path} {body:.40}: {e}");
        }
        // A body announced but never sent: the server answers when handshake_timeout ends.
        let mut s = server.tcp().await;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n\
             Content-Length: 100\r\n\r\n{{\"topic\": "
        );
        s.write_all(head.as_bytes()).await.expect("write request");
        let r = read_response(&mut s).await;
        assert_eq!(r.status, 408, "{path}: {r:?}");
        assert_eq!(
            json_body(&r),
            json!({"error": "the body did not arrive within handshake_timeout", "code": "timeout"}),
            "{path}"
        );
    }
    // None of them published: the first good publish takes seq 1.
    let r = api_publish(&server, "", &json!({"topic": "t", "data": 1})).await;
    assert_eq!(json_body(&r)["seq"], 1, "{r:?}");
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
