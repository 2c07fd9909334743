//! Browser support over plain HTTP: `/static/*`, and room delivery without a WebSocket
//! (`GET /sse`, `GET /poll`, `POST /publish`), against the real binary on both backends.

mod common;

use std::time::Duration;

use common::{within, Backend, Server};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

both_backends!(
    static_files_with_etag,
    static_files_off,
    sse_delivers_in_order_and_resumes,
    sse_refuses_bad_input,
    poll_batches_and_resumes,
    poll_times_out_empty,
    a_long_poll_is_not_a_presence_member,
    http_publish_checks_input,
    http_publish_is_rate_limited_per_client,
    fallbacks_take_the_ws_token,
);

async fn static_files_with_etag(backend: Backend) {
    let server = Server::start(backend, &[]);
    for (path, ty) in [
        ("/static/ringgate.js", "text/javascript; charset=utf-8"),
        (
            "/static/ringgate.d.ts",
            "application/typescript; charset=utf-8",
        ),
        ("/static/test_websocket.html", "text/html; charset=utf-8"),
        ("/static/test_websocket.css", "text/css; charset=utf-8"),
    ] {
        let r = server.get(path).await;
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.header("content-type"), Some(ty), "{path}");
        assert_eq!(r.header("cache-control"), Some("no-cache"));
        assert!(!r.body.is_empty());
        let etag = r.header("etag").expect("etag").to_string();
        let again = server
            .request(&format!(
                "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nIf-None-Match: {etag}\r\n\r\n"
            ))
            .await;
        assert_eq!(again.status, 304, "{path}");
        assert_eq!(again.body, "");
        assert_eq!(again.header("etag"), Some(etag.as_str()));
        let other = server
            .request(&format!(
                "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nIf-None-Match: \"nope\"\r\n\r\n"
            ))
            .await;
        assert_eq!(other.status, 200);
    }
    let js = server.get("/static/ringgate.js").await;
    assert!(js.body.contains("export class RinggateClient"));
    let head = server
        .request("HEAD /static/ringgate.js HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(head.status, 200);
    assert_eq!(
        head.header("content-length"),
        Some(js.body.len().to_string().as_str())
    );
    assert_eq!(server.get("/static/nope.js").await.status, 404);
    assert_eq!(server.get("/static/../Cargo.toml").await.status, 404);
    assert_eq!(server.get("/static/").await.status, 404);
    let post = server.post("/static/ringgate.js", "", "{}").await;
    assert_eq!(post.status, 405);
}

async fn static_files_off(backend: Backend) {
    let server = Server::start_with_config(backend, "static = false\n", &[]);
    assert_eq!(server.get("/static/ringgate.js").await.status, 404);
}

/// An open `/sse` response: the raw bytes read so far.
struct Sse {
    s: TcpStream,
    buf: String,
}

impl Sse {
    async fn open(server: &Server, query: &str, extra: &str) -> (u16, Sse) {
        let mut s = server.tcp().await;
        s.write_all(format!("GET /sse?{query} HTTP/1.1\r\nHost: t\r\n{extra}\r\n").as_bytes())
            .await
            .unwrap();
        let mut sse = Sse {
            s,
            buf: String::new(),
        };
        while !sse.buf.contains("\r\n\r\n") {
            sse.read().await;
        }
        let status = sse.buf[9..12].parse().unwrap();
        (status, sse)
    }

    async fn read(&mut self) -> bool {
        let mut chunk = [0u8; 8192];
        let n = within("sse bytes", self.s.read(&mut chunk)).await.unwrap();
        self.buf.push_str(&String::from_utf8_lossy(&chunk[..n]));
        n > 0
    }

    /// (id, data) of every complete event so far.
    fn events(&self) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        let mut id = String::new();
        for line in self.buf.lines() {
            if let Some(v) = line.strip_prefix("id: ") {
                id = v.to_string();
            } else if let Some(d) = line.strip_prefix("data: ") {
                out.push((id.clone(), serde_json::from_str(d).unwrap()));
            }
        }
        out
    }

    async fn until(&mut self, mut done: impl FnMut(&[(String, Value)]) -> bool) {
        while !done(&self.events()) {
            assert!(self.read().await, "stream ended: {}", self.buf);
        }
    }
}

fn room_msgs(evs: &[(String, Value)], topic: &str) -> Vec<(String, u64)> {
    evs.iter()
        .filter(|(_, v)| v["topic"] == topic && v["seq"].is_u64() && v["type"] == "message")
        .map(|(id, v)| (id.clone(), v["seq"].as_u64().unwrap()))
        .collect()
}

async fn publish(server: &Server, topic: &str, n: u64) -> u64 {
    let r = server
        .post(
            "/publish",
            "",
            &json!({"topic": topic, "data": {"n": n}}).to_string(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let v: Value = serde_json::from_str(&r.body).unwrap();
    v["seq"].as_u64().unwrap()
}

async fn sse_delivers_in_order_and_resumes(backend: Backend) {
    let server = Server::start(backend, &[]);
    let (status, mut sse) = Sse::open(&server, "topics=news,odd%2Ctopic", "").await;
    assert_eq!(status, 200);
    assert!(sse.buf.contains("text/event-stream"));
    assert!(sse.buf.contains("retry: 1000"));
    sse.until(|e| e.iter().filter(|(_, v)| v["type"] == "subscribed").count() == 2)
        .await;
    for n in 1..=5 {
        assert_eq!(publish(&server, "news", n).await, n);
    }
    publish(&server, "odd,topic", 1).await;
    sse.until(|e| room_msgs(e, "news").len() == 5 && room_msgs(e, "odd,topic").len() == 1)
        .await;
    let evs = sse.events();
    let news = room_msgs(&evs, "news");
    assert_eq!(
        news.iter().map(|(_, s)| *s).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    let data = evs.iter().find(|(_, v)| v["seq"] == 1).unwrap();
    assert_eq!(data.1["data"], json!({"n": 1}));
    // The id after news:3 resumes there: 4 and 5 again, nothing twice, nothing lost.
    let id3 = news[2].0.clone();
    assert!(id3.contains("news:3:"), "{id3}");
    assert!(id3.contains("odd%2Ctopic:"), "{id3}");
    drop(sse);
    publish(&server, "news", 6).await;
    let (status, mut again) =
        Sse::open(&server, "topics=news", &format!("Last-Event-ID: {id3}\r\n")).await;
    assert_eq!(status, 200);
    again.until(|e| room_msgs(e, "news").len() == 3).await;
    let evs = again.events();
    let sub = evs.iter().find(|(_, v)| v["type"] == "subscribed").unwrap();
    assert_eq!(sub.1["recovered"], true);
    assert_eq!(
        room_msgs(&evs, "news")
            .iter()
            .map(|(_, s)| *s)
            .collect::<Vec<_>>(),
        [4, 5, 6]
    );
    // A stream shows in the metrics.
    let m = server.get("/metrics").await;
    assert!(m.body.contains("ringgate_sse_streams_total"), "{}", m.body);
    assert!(m.body.contains("ringgate_http_publish_total"));
}

async fn sse_refuses_bad_input(backend: Backend) {
    let server = Server::start(backend, &[]);
    for (query, extra, status, code) in [
        ("", "", 400, "missing_field"),
        ("topics=", "", 400, "missing_field"),
        ("topics=a%zz", "", 400, "bad_json"),
        (
            &*format!("topics={}", "x".repeat(200)),
            "",
            400,
            "too_large",
        ),
        ("topics=a&since=a:x", "", 400, "missing_field"),
        (
            "topics=a",
            "Last-Event-ID: garbage\r\n",
            400,
            "missing_field",
        ),
    ] {
        let r = server
            .request(&format!(
                "GET /sse?{query} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{extra}\r\n"
            ))
            .await;
        assert_eq!(r.status, status, "{query}: {}", r.body);
        let v: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["code"], code, "{query}");
    }
    let r = server.post("/sse", "", "{}").await;
    assert_eq!(r.status, 405);
}

async fn poll(server: &Server, query: &str) -> Value {
    let r = server.get(&format!("/poll?{query}")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    serde_json::from_str(&r.body).unwrap()
}

async fn poll_batches_and_resumes(backend: Backend) {
    let server = Server::start(backend, &[]);
    for n in 1..=3 {
        publish(&server, "p", n).await;
    }
    // History from 0: the three at once.
    let v = poll(&server, "topics=p&since=p:0&timeout=5").await;
    let msgs = v["messages"].as_array().unwrap();
    assert_eq!(msgs[0]["type"], "subscribed");
    let seqs: Vec<u64> = msgs
        .iter()
        .filter(|m| m["type"] == "message")
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [1, 2, 3]);
    let cursor = v["cursor"].as_str().unwrap().to_string();
    assert!(cursor.starts_with("p:3:"), "{cursor}");
    // A waiting poll is answered by the next publish.
    let waiting = {
        let addr = server.addr;
        let q = format!("/poll?topics=p&since={cursor}&timeout=20");
        tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!("GET {q} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            common::read_response(&mut s).await
        })
    };
    // The poll is subscribed once the subscriptions gauge (published once a second by the
    // server's sweep, which no test clock reaches) counts it.
    within("poll subscribed", async {
        while subscriptions(&server).await < 1.0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    publish(&server, "p", 4).await;
    let r = within("poll answer", waiting).await.unwrap();
    let v: Value = serde_json::from_str(&r.body).unwrap();
    let seqs: Vec<u64> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["type"] == "message")
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [4]);
    // A wrong epoch cannot be recovered: answered at once, `recovered: false`.
    let v = poll(&server, "topics=p&since=p:1:not-the-epoch&timeout=20").await;
    assert_eq!(v["messages"][0]["recovered"], false, "{v}");
}

/// `ringgate_subscriptions` summed over the shards.
async fn subscriptions(server: &Server) -> f64 {
    let m = server.get("/metrics").await;
    m.body
        .lines()
        .filter(|l| l.starts_with("ringgate_subscriptions{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A long-poll client subscribes anew with every poll: it is not listed in presence, and its
/// polls send the topic's other subscribers no `join` or `leave`.
async fn a_long_poll_is_not_a_presence_member(backend: Backend) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let server = Server::start(backend, &[]);
    let (mut ws, _) = within(
        "connect",
        tokio_tungstenite::connect_async(server.url("/ws")),
    )
    .await
    .unwrap();
    let next = async |ws: &mut common::Ws| loop {
        match within("next", ws.next()).await {
            Some(Ok(Message::Text(t))) => return serde_json::from_str::<Value>(&t).unwrap(),
            Some(Ok(_)) => continue,
            other => panic!("{other:?}"),
        }
    };
    let sub = json!({"action": "subscribe", "topic": "q", "id": 1}).to_string();
    ws.send(Message::text(sub)).await.unwrap();
    while next(&mut ws).await["type"] != "subscribed" {}
    for _ in 0..3 {
        let v = poll(&server, "topics=q&timeout=0").await;
        assert_eq!(v["messages"][0]["type"], "subscribed", "{v}");
    }
    let p: Value = serde_json::from_str(&server.get("/api/presence?topic=q").await.body).unwrap();
    assert_eq!(p["members"].as_array().map(Vec::len), Some(1), "{p}");
    // Everything the home shard sent before this ack has arrived by then (one FIFO per pair of
    // shards): a poll's `join` would be among it.
    let publish = json!({"action": "publish", "topic": "q", "data": 1, "id": 2}).to_string();
    ws.send(Message::text(publish)).await.unwrap();
    let mut seen = Vec::new();
    loop {
        let v = next(&mut ws).await;
        if v["type"] == "ack" {
            break;
        }
        seen.push(v["type"].as_str().unwrap_or("?").to_string());
    }
    assert!(
        seen.iter().all(|t| t != "join" && t != "leave"),
        "presence events from polls: {seen:?}"
    );
}

async fn poll_times_out_empty(backend: Backend) {
    let server = Server::start(backend, &[]);
    let v = poll(&server, "topics=quiet&timeout=0").await;
    let msgs = v["messages"].as_array().unwrap();
    assert!(msgs.iter().all(|m| m["type"] == "subscribed"), "{v}");
    let r = server.get("/poll?topics=quiet&timeout=soon").await;
    assert_eq!(r.status, 400);
    let r = server.get("/poll").await;
    assert_eq!(r.status, 400);
}

async fn http_publish_checks_input(backend: Backend) {
    let server = Server::start(backend, &[]);
    for (body, status, code) in [
        ("not json", 400, "bad_json"),
        ("[1]", 400, "bad_json"),
        (r#"{"data": 1}"#, 400, "missing_field"),
        (r#"{"topic": "", "data": 1}"#, 400, "missing_field"),
        (r#"{"topic": "t"}"#, 400, "missing_field"),
        // Refused, not rounded to a float.
        (
            r#"{"topic": "t", "data": 18446744073709551616}"#,
            400,
            "bad_json",
        ),
        (
            r#"{"topic": "t", "type": "", "data": 1}"#,
            400,
            "missing_field",
        ),
    ] {
        let r = server.post("/publish", "", body).await;
        assert_eq!(r.status, status, "{body}: {}", r.body);
        let v: Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["code"], code, "{body}");
    }
    // Over max_data_size (65536): refused; a body past the envelope's bound: 413.
    let big = json!({"topic": "t", "data": "x".repeat(66_000)}).to_string();
    let r = server.post("/publish", "", &big).await;
    assert_eq!(r.status, 400);
    assert!(r.body.contains("too_large"));
    let huge = json!({"topic": "t", "data": "x".repeat(80_000)}).to_string();
    let r = server.post("/publish", "", &huge).await;
    assert_eq!(r.status, 413);
    assert_eq!(server.get("/publish").await.status, 405);
    let r = server
        .post(
            "/publish",
            "",
            r#"{"topic": "t", "type": "note", "data": [1]}"#,
        )
        .await;
    assert_eq!(r.status, 200);
}

/// `POST /publish` takes `[rooms] publish_rate`/`publish_burst` per client: the token's user,
/// or the address without one. Past the burst: 429 `rate_limited` with `Retry-After`, and the
/// publish does not happen.
async fn http_publish_is_rate_limited_per_client(backend: Backend) {
    // Loopback is `exempt` by default (a proxy on the same host); not here.
    let limits = "[limits]\nexempt = []\n[rooms]\npublish_rate = 0.01\npublish_burst = 3\n";
    let server = Server::start_with_config(backend, limits, &[]);
    let body = r#"{"topic":"t","data":1}"#;
    for i in 1..=3 {
        let r = server.post("/publish", "", body).await;
        assert_eq!(
            (r.status, r.body.as_str()),
            (200, format!("{{\"seq\":{i}}}").as_str())
        );
    }
    let r = server.post("/publish", "", body).await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(r.header("retry-after"), Some("1"));
    let v: Value = serde_json::from_str(&r.body).unwrap();
    assert_eq!(v["code"], "rate_limited");
    // The refused publish took no seq.
    let h = server.get("/history?topic=t&since=0").await;
    let v: Value = serde_json::from_str(&h.body).unwrap();
    assert_eq!(v["messages"].as_array().map(Vec::len), Some(3), "{v}");

    // With tokens, each user has an allowance of their own.
    let server = Server::start_with_config(
        backend,
        &format!("{limits}[auth]\njwt_secret = \"fallback-secret-of-thirty-two-bytes\"\nrequired = true\n"),
        &[],
    );
    let exp = common::unix_in(600);
    let bearer = |sub: &str| {
        format!(
            "Authorization: Bearer {}\r\n",
            token(json!({"sub": sub, "exp": exp, "publish": ["t"]}))
        )
    };
    let (ann, bob) = (bearer("ann"), bearer("bob"));
    for _ in 0..3 {
        assert_eq!(server.post("/publish", &ann, body).await.status, 200);
    }
    assert_eq!(server.post("/publish", &ann, body).await.status, 429);
    assert_eq!(server.post("/publish", &bob, body).await.status, 200);
}

fn token(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(b"fallback-secret-of-thirty-two-bytes"),
    )
    .unwrap()
}

async fn fallbacks_take_the_ws_token(backend: Backend) {
    let server = Server::start_with_config(
        backend,
        "[auth]\njwt_secret = \"fallback-secret-of-thirty-two-bytes\"\nrequired = true\nquery_token = true\n",
        &[],
    );
    let exp = common::unix_in(600);
    let t = token(json!({"sub": "ann", "exp": exp, "channels": ["news"], "publish": ["news"]}));
    // No token, a bad token: 401 with WWW-Authenticate.
    for q in ["topics=news", "topics=news&token=nope"] {
        let r = server.get(&format!("/poll?{q}&timeout=0")).await;
        assert_eq!(r.status, 401, "{q}");
        assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    }
    let r = server
        .post("/publish", "", r#"{"topic":"news","data":1}"#)
        .await;
    assert_eq!(r.status, 401);
    // The claims: topics and publishing outside them are forbidden.
    let r = server
        .get(&format!("/poll?topics=other&timeout=0&token={t}"))
        .await;
    assert_eq!(r.status, 403);
    let auth = format!("Authorization: Bearer {t}\r\n");
    let r = server
        .post("/publish", &auth, r#"{"topic":"other","data":1}"#)
        .await;
    assert_eq!(r.status, 403);
    // Allowed: the stream's member is the token's user, publishes carry it as `from`.
    let (status, mut sse) = Sse::open(&server, &format!("topics=news&token={t}"), "").await;
    assert_eq!(status, 200);
    sse.until(|e| e.iter().any(|(_, v)| v["type"] == "subscribed"))
        .await;
    let p = server.get("/api/presence?topic=news").await;
    assert!(p.body.contains("\"user\":\"ann\""), "{}", p.body);
    let r = server
        .post("/publish", &auth, r#"{"topic":"news","data":7}"#)
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    sse.until(|e| room_msgs(e, "news").len() == 1).await;
    let evs = sse.events();
    let m = evs.iter().find(|(_, v)| v["type"] == "message").unwrap();
    assert_eq!(m.1["from"], "ann");
    // Presence and history for clients, under the same claims.
    let r = get_with(&server, "/presence?topic=news", &auth).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("\"user\":\"ann\""), "{}", r.body);
    let r = get_with(&server, "/history?topic=news&since=0", &auth).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("\"data\":7"), "{}", r.body);
    assert_eq!(
        get_with(&server, "/history?topic=other", &auth)
            .await
            .status,
        403
    );
    assert_eq!(get_with(&server, "/presence", &auth).await.status, 400);
    assert_eq!(server.get("/presence?topic=news").await.status, 401);
    // A server message type cannot be published.
    let r = server
        .post(
            "/publish",
            &auth,
            r#"{"topic":"news","type":"ack","data":1}"#,
        )
        .await;
    assert_eq!(r.status, 403, "{}", r.body);
}

async fn get_with(server: &Server, path: &str, headers: &str) -> common::HttpResponse {
    server
        .request(&format!(
            "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n{headers}\r\n"
        ))
        .await
}
