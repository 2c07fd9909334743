//! Secure defaults at the edge, against the real binary: the one authorization rule for every
//! topic action and principal (the matrix of docs/SECURITY.md), the admin surface kept off
//! public listeners, `/api/*` keys, reserved message types, and token expiry.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

both_backends!(
    authorization_matrix,
    api_key_guards_every_api_route,
    api_publish_cannot_forge_server_messages,
    admin_surface_stays_off_public_listeners,
    expired_token_closes_the_session,
    per_address_connection_cap,
    per_address_handshake_rate,
    process_connection_cap,
    a_panicking_connection_leaves_the_shard_serving,
    a_panicking_shard_ends_the_process,
    message_limits_per_endpoint,
    a_shard_that_falls_behind_slows_publishers_and_loses_nothing,
);

const SECRET: &str = "security-test-secret-of-at-least-32-bytes";
const KEY: &str = "api-key-for-tests";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn token(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("encode token")
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens `/ws` with `token` as the `bearer.` subprotocol; `Err(status)` when refused.
async fn open(server: &Server, token: Option<&str>) -> Result<Socket, u16> {
    let mut req = server.url("/ws").into_client_request().expect("request");
    if let Some(t) = token {
        req.headers_mut().insert(
            "sec-websocket-protocol",
            format!("bearer.{t}").parse().expect("header value"),
        );
    }
    match within("connect", tokio_tungstenite::connect_async(req)).await {
        Ok((mut ws, _)) => {
            let hello = recv(&mut ws).await;
            assert_eq!(hello["type"], "connected", "{hello}");
            Ok(ws)
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("connect: {e}"),
    }
}

async fn recv(ws: &mut Socket) -> Value {
    loop {
        match within("next message", ws.next()).await {
            Some(Ok(Message::Text(t))) => return serde_json::from_str(&t).expect("JSON"),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

/// Sends `req` with `id` and returns the reply carrying that id (deliveries skipped).
async fn ask(ws: &mut Socket, mut req: Value, id: u64) -> Value {
    req["id"] = json!(id);
    ws.send(Message::Text(req.to_string())).await.expect("send");
    loop {
        let v = recv(ws).await;
        if v["id"] == json!(id) {
            return v;
        }
    }
}

/// What the server answers to each action: "ok" or the error code.
async fn outcome(ws: &mut Socket, action: &str, topic: &str, id: u64) -> String {
    let req = match action {
        "subscribe" => json!({"action": "subscribe", "topic": topic}),
        "replay" => json!({"action": "subscribe", "topic": topic, "since": 0}),
        "publish" => json!({"action": "publish", "topic": topic, "data": 1}),
        "presence" => json!({"action": "presence", "topic": topic}),
        "history" => json!({"action": "history", "topic": topic}),
        other => panic!("unknown action {other}"),
    };
    let v = ask(ws, req, id).await;
    if v["type"] == "error" {
        v["code"].as_str().unwrap_or("?").to_string()
    } else {
        "ok".into()
    }
}

/// Every topic action × every kind of client, under `[auth]` with anonymous clients allowed
/// to connect. A restricted token may read `allowed.*` and publish to `allowed.pub`.
async fn authorization_matrix(backend: Backend) {
    let server = Server::start_with_config(
        backend,
        &format!("[auth]\njwt_secret = \"{SECRET}\"\n[rooms]\napi_key = \"{KEY}\"\n"),
        &[],
    );
    let open_token = token(json!({"sub": "free", "exp": now() + 600}));
    let restricted = token(json!({
        "sub": "limited", "exp": now() + 600,
        "channels": ["allowed.*"], "publish": ["allowed.pub"],
    }));
    let expired = token(json!({"sub": "late", "exp": now() - 120}));

    // An expired token never gets a session.
    assert_eq!(open(&server, Some(&expired)).await.err(), Some(401));

    let actions = ["subscribe", "replay", "publish", "presence", "history"];
    let cases: [(&str, Option<&str>, &str, [&str; 5]); 4] = [
        // Anonymous: nothing unless the config grants it.
        ("anonymous", None, "allowed.pub", ["forbidden"; 5]),
        (
            "token without claims",
            Some(&open_token),
            "anything",
            ["ok"; 5],
        ),
        (
            "restricted, inside",
            Some(&restricted),
            "allowed.pub",
            ["ok"; 5],
        ),
        (
            "restricted, outside",
            Some(&restricted),
            "elsewhere",
            ["forbidden"; 5],
        ),
    ];
    let mut id = 0;
    for (who, tok, topic, expected) in cases {
        let mut ws = open(&server, tok).await.expect("upgrade accepted");
        for (action, want) in actions.iter().zip(expected) {
            id += 1;
            let got = outcome(&mut ws, action, topic, id).await;
            assert_eq!(got, want, "{who}: {action} {topic}");
        }
    }
    // Reading a topic does not grant publishing to it.
    let mut ws = open(&server, Some(&restricted)).await.expect("upgrade");
    assert_eq!(
        outcome(&mut ws, "publish", "allowed.other", 100).await,
        "forbidden"
    );
    assert_eq!(
        outcome(&mut ws, "subscribe", "allowed.other", 101).await,
        "ok"
    );
}

async fn api_key_guards_every_api_route(backend: Backend) {
    let server =
        Server::start_with_config(backend, &format!("[rooms]\napi_key = \"{KEY}\"\n"), &[]);
    let body = json!({"topic": "t", "data": 1}).to_string();
    let good = format!("Authorization: Bearer {KEY}\r\n");
    for extra in ["", "Authorization: Bearer wrong\r\n"] {
        assert_eq!(server.post("/api/publish", extra, &body).await.status, 401);
        for path in ["/api/presence?topic=t", "/api/history?topic=t"] {
            let r = get_with(&server, path, extra).await;
            assert_eq!(r.status, 401, "{path} with {extra:?}: {r:?}");
        }
    }
    assert_eq!(server.post("/api/publish", &good, &body).await.status, 200);
    assert_eq!(
        get_with(&server, "/api/presence?topic=t", &good)
            .await
            .status,
        200
    );
    assert_eq!(
        get_with(&server, "/api/history?topic=t", &good)
            .await
            .status,
        200
    );
}

async fn api_publish_cannot_forge_server_messages(backend: Backend) {
    let server = Server::start(backend, &[]);
    let mut ws = open(&server, None).await.expect("open /ws");
    assert_eq!(outcome(&mut ws, "subscribe", "room", 1).await, "ok");
    for kind in ["join", "leave", "subscribed", "error"] {
        let body = json!({"topic": "room", "type": kind, "data": {"client_id": "x"}});
        let r = server.post("/api/publish", "", &body.to_string()).await;
        assert_eq!(r.status, 403, "{kind}: {r:?}");
        assert!(r.body.contains("forbidden"), "{}", r.body);
        // Over /ws too.
        let v = ask(
            &mut ws,
            json!({"action": "publish", "topic": "room", "type": kind, "data": 1}),
            10,
        )
        .await;
        assert_eq!(v["code"], "forbidden", "{kind}: {v}");
    }
    // An ordinary type still goes through and is the next message the subscriber sees.
    let body = json!({"topic": "room", "type": "chat", "data": "hi"});
    assert_eq!(
        server
            .post("/api/publish", "", &body.to_string())
            .await
            .status,
        200
    );
    let v = recv(&mut ws).await;
    assert_eq!(
        (v["type"].as_str(), v["data"].as_str()),
        (Some("chat"), Some("hi")),
        "{v}"
    );

    // Allowed on purpose.
    let open_api = Server::start_with_config(backend, "[rooms]\napi_reserved_types = true\n", &[]);
    let body = json!({"topic": "room", "type": "join", "data": 1});
    assert_eq!(
        open_api
            .post("/api/publish", "", &body.to_string())
            .await
            .status,
        200
    );
}

/// On a listener reachable from other hosts, `/metrics`, `/ws/statistics` and a keyless
/// `/api/*` are not served; the admin listener serves them.
async fn admin_surface_stays_off_public_listeners(backend: Backend) {
    let server = Server::start_with_config(
        backend,
        "admin_listen = \"127.0.0.1:0\"\n[[listen]]\naddr = \"0.0.0.0:0\"\n",
        &[],
    );
    for path in ["/metrics", "/ws/statistics", "/api/history?topic=t"] {
        assert_eq!(server.get(path).await.status, 404, "public {path}");
    }
    assert_eq!(server.get("/healthz").await.status, 200);
    let admin = server.admin_addr();
    assert!(admin.ip().is_loopback());
    for path in [
        "/metrics",
        "/ws/statistics",
        "/api/history?topic=t",
        "/readyz",
    ] {
        let r = tokio::task::spawn_blocking(move || http_get_blocking(admin, path))
            .await
            .expect("join")
            .expect("admin GET");
        assert_eq!(r.status, 200, "admin {path}: {r:?}");
    }
    // With a key, the API is served publicly, behind the key.
    let keyed = Server::start_with_config(
        backend,
        &format!("admin_listen = \"off\"\n[rooms]\napi_key = \"{KEY}\"\n[[listen]]\naddr = \"0.0.0.0:0\"\n"),
        &[],
    );
    let good = format!("Authorization: Bearer {KEY}\r\n");
    assert_eq!(
        get_with(&keyed, "/api/history?topic=t", &good).await.status,
        200
    );
    assert_eq!(
        get_with(&keyed, "/api/history?topic=t", "").await.status,
        401
    );
    assert_eq!(keyed.get("/metrics").await.status, 404);
}

/// A session ends (1008) within a couple of seconds of its token's `exp`. The server is a
/// separate process on the wall clock, so this waits for real, a few seconds at most.
async fn expired_token_closes_the_session(backend: Backend) {
    let server = Server::start_with_config(
        backend,
        &format!("[auth]\njwt_secret = \"{SECRET}\"\n"),
        &[],
    );
    let short = token(json!({"sub": "brief", "exp": now() + 2}));
    let long = token(json!({"sub": "stays", "exp": now() + 600}));
    let mut brief = open(&server, Some(&short)).await.expect("upgrade");
    let mut stays = open(&server, Some(&long)).await.expect("upgrade");
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(8), brief.next()).await {
            Ok(Some(Ok(Message::Close(c)))) => break c,
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a close within 8 s of exp, got {other:?}"),
        }
    };
    let close = close.expect("a close frame with a code");
    assert_eq!(u16::from(close.code), 1008);
    assert_eq!(close.reason, "token expired");
    // The other session is untouched.
    assert_eq!(
        ask(&mut stays, json!({"action": "ping"}), 7).await["type"],
        "pong"
    );
}

async fn get_with(server: &Server, path: &str, extra: &str) -> HttpResponse {
    server
        .request(&format!(
            "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{extra}\r\n"
        ))
        .await
}

/// A TCP connection to the server from the loopback address `from` (127.0.0.x: the loopback
/// range gives each test client an address of its own).
async fn connect_from(server: &Server, from: [u8; 4]) -> tokio::net::TcpStream {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind((std::net::Ipv4Addr::from(from), 0).into())
        .expect("bind a loopback source address");
    within("connect", sock.connect(server.addr))
        .await
        .expect("connect")
}

/// Sends `GET /healthz` on `s` and reads the answer.
async fn health_on(mut s: tokio::net::TcpStream) -> HttpResponse {
    use tokio::io::AsyncWriteExt;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    read_response(&mut s).await
}

async fn per_address_connection_cap(backend: Backend) {
    let server = Server::start_with_config(
        backend,
        "[limits]\nexempt = []\nper_ip_connections = 3\nper_ip_handshake_rate = 0\n",
        &[],
    );
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut ws =
            RawWs::handshake(connect_from(&server, [127, 0, 0, 2]).await, "/ws/echo").await;
        ping_pong(&mut ws).await;
        held.push(ws);
    }
    let over = health_on(connect_from(&server, [127, 0, 0, 2]).await).await;
    assert_eq!(over.status, 429, "{over:?}");
    assert_eq!(over.header("retry-after"), Some("1"));
    // Another address is untouched, and so are the held connections.
    assert_eq!(
        health_on(connect_from(&server, [127, 0, 0, 3]).await)
            .await
            .status,
        200
    );
    for ws in &mut held {
        ping_pong(ws).await;
    }
    // A freed place is given again (the close reaches the server asynchronously).
    drop(held.pop());
    let deadline = std::time::Instant::now() + PATIENCE;
    loop {
        let r = health_on(connect_from(&server, [127, 0, 0, 2]).await).await;
        if r.status == 200 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "place never freed: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn per_address_handshake_rate(backend: Backend) {
    let server = Server::start_with_config(
        backend,
        "[limits]\nexempt = []\nper_ip_handshake_rate = 0.01\nper_ip_handshake_burst = 2\n",
        &[],
    );
    let upgrade = upgrade_request_for("/ws/echo", "");
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let mut s = connect_from(&server, [127, 0, 0, 4]).await;
        use tokio::io::AsyncWriteExt;
        s.write_all(upgrade.as_bytes()).await.expect("write");
        let head = read_head(&mut s).await;
        if head.starts_with("HTTP/1.1 429") {
            assert!(
                head.to_ascii_lowercase().contains("retry-after: 1\r\n"),
                "{head}"
            );
        }
        statuses.push(head.split(' ').nth(1).unwrap_or("?").to_string());
    }
    assert_eq!(statuses, ["101", "101", "429"]);
    let mut other = RawWs::handshake(connect_from(&server, [127, 0, 0, 5]).await, "/ws/echo").await;
    ping_pong(&mut other).await;
}

async fn process_connection_cap(backend: Backend) {
    let server = Server::start_with_config(backend, "[limits]\nmax_open_connections = 2\n", &[]);
    let mut a = RawWs::handshake(connect_from(&server, [127, 0, 0, 6]).await, "/ws/echo").await;
    let mut b = RawWs::handshake(connect_from(&server, [127, 0, 0, 7]).await, "/ws/echo").await;
    let over = health_on(connect_from(&server, [127, 0, 0, 8]).await).await;
    assert_eq!(over.status, 503, "{over:?}");
    assert_eq!(over.header("retry-after"), Some("1"));
    ping_pong(&mut a).await;
    ping_pong(&mut b).await;
}

/// A ping answered by a pong: the connection is served.
async fn ping_pong(ws: &mut RawWs) {
    ws.send(&frame(true, 0x9, b"are you there")).await;
    let f = ws.read_frame().await.expect("a pong");
    assert_eq!(
        (f.opcode, f.payload.as_slice()),
        (0xA, &b"are you there"[..])
    );
}

/// Reads a response head (up to the blank line), leaving the connection open.
async fn read_head(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    within("response head", async {
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8; 1];
            match s.read(&mut b).await {
                Ok(1) => head.push(b[0]),
                _ => break,
            }
        }
    })
    .await;
    String::from_utf8_lossy(&head).into_owned()
}

/// A panic in one connection's task (injected; debug builds only) ends that connection; the
/// shard keeps serving, the panic is logged with its location and counted.
async fn a_panicking_connection_leaves_the_shard_serving(backend: Backend) {
    let server = Server::start_with_env(backend, "", &[("RINGGATE_TEST_PANIC", "connection")], &[]);
    let mut doomed = server.raw_ws().await;
    let mut other = server.ws().await;
    doomed.send(&frame(true, 0x1, b"panic")).await;
    doomed.expect_eof().await;
    echo(&mut other, Message::Text("still served".into())).await;
    assert_eq!(server.get("/readyz").await.status, 200);
    let log = server.wait_log("injected panic at connection").await;
    assert!(log.contains("src/error.rs"), "location missing:\n{log}");
    let metrics = server.get("/metrics").await.body;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("ringgate_panics_total") && !l.ends_with(" 0")),
        "{metrics}"
    );
}

/// A panic in a shard's own loop (injected on a statistics request) is fatal: the process exits
/// with 70 for its supervisor to restart it, instead of running with a dead shard.
async fn a_panicking_shard_ends_the_process(backend: Backend) {
    let mut server =
        Server::start_with_env(backend, "", &[("RINGGATE_TEST_PANIC", "shard-loop")], &[]);
    // The statistics request reaches every shard's control loop; the answer never comes.
    let addr = server.addr;
    std::thread::spawn(move || {
        let _ = http_get_blocking(addr, "/ws/statistics");
    });
    let status = server.wait_exit(PATIENCE).await;
    assert_eq!(status.code(), Some(70), "{}", server.log());
    let log = server.log();
    assert!(log.contains("shard failed"), "{log}");
    assert!(log.contains("injected panic at shard-loop"), "{log}");
}

/// Rooms and the agent take far smaller messages than echo: a 200 KiB message closes `/ws`
/// (1009, over rooms.max_message_size) and `/ws/agent` takes at most agent.max_message_size,
/// while `/ws/echo` still echoes it.
async fn message_limits_per_endpoint(backend: Backend) {
    let server = Server::start_with_config(backend, "[agent]\nmax_message_size = 4096\n", &[]);
    let big = "x".repeat(200 * 1024);
    let mut echo_ws = server.ws().await;
    echo(&mut echo_ws, Message::Text(big.clone())).await;
    for path in ["/ws", "/ws/agent"] {
        let stream = server.tcp().await;
        let mut raw = RawWs::handshake(stream, path).await;
        let _connected = raw.read_frame().await;
        raw.send(&frame(true, 0x1, big.as_bytes())).await;
        assert_eq!(raw.expect_close().await, 1009, "{path}");
    }
}

/// `[rooms] max_shard_backlog`: while one shard is stalled (test-only injection), publishes
/// that would queue for it are answered `overloaded` (nothing is taken, no seq is used);
/// every publish that was acknowledged is in the history, in order and without a gap; once
/// the shard has caught up, publishes go through again.
async fn a_shard_that_falls_behind_slows_publishers_and_loses_nothing(backend: Backend) {
    let server = Server::start_with_env(
        backend,
        "[rooms]\nmax_shard_backlog = 4\n",
        &[("RINGGATE_TEST_STALL", "3000")],
        &[],
    );
    // One topic homed on each of the two shards: whichever shard this client lands on, the
    // publish to the other shard's topic crosses shards and stalls that shard.
    let homed = |shard| {
        (0..)
            .map(|i| format!("t{i}"))
            .find(|t| ringgate::rooms::home_of(t, 2) == shard)
            .expect("a topic")
    };
    let topics = [homed(0), homed(1)];
    let mut ws = open(&server, None).await.expect("open");
    let publish = |topic: &str, data: Value, id: usize| {
        Message::Text(
            json!({"action": "publish", "topic": topic, "data": data, "id": id}).to_string(),
        )
    };
    // The stalls, then 40 more publishes in the same write, alternating between the topics.
    let mut sent = Vec::new();
    for (i, t) in topics.iter().enumerate() {
        ws.feed(publish(t, json!("stall"), i)).await.expect("feed");
        sent.push(t.clone());
    }
    for i in 2..42 {
        let t = &topics[i % 2];
        ws.feed(publish(t, json!(i), i)).await.expect("feed");
        sent.push(t.clone());
    }
    ws.flush().await.expect("flush");
    let mut acked: [Vec<u64>; 2] = [Vec::new(), Vec::new()];
    let mut overloaded = 0;
    let mut answered = 0;
    while answered < sent.len() {
        let v = recv(&mut ws).await;
        let Some(id) = v["id"].as_u64() else { continue };
        answered += 1;
        let which = usize::from(sent[id as usize] == topics[1]);
        match v["type"].as_str() {
            Some("ack") => acked[which].push(v["seq"].as_u64().expect("seq")),
            Some("error") => {
                assert_eq!(v["code"], "overloaded", "{v}");
                overloaded += 1;
            }
            _ => panic!("unexpected answer {v}"),
        }
    }
    assert!(overloaded > 0, "nothing was refused: {acked:?}");
    for (topic, seqs) in topics.iter().zip(&acked) {
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        let expected: Vec<u64> = (1..=seqs.len() as u64).collect();
        assert_eq!(sorted, expected, "{topic}: acked seqs have a gap");
        let h = ask(
            &mut ws,
            json!({"action": "history", "topic": topic, "since": 0}),
            1000,
        )
        .await;
        let in_history: Vec<u64> = h["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .map(|m| m["seq"].as_u64().expect("seq"))
            .collect();
        assert_eq!(in_history, expected, "{topic}: {h}");
    }
    // The stalled shard has caught up: both topics take publishes again.
    for (i, t) in topics.iter().enumerate() {
        let v = ask(
            &mut ws,
            json!({"action": "publish", "topic": t, "data": 0}),
            2000 + i as u64,
        )
        .await;
        assert_eq!(v["type"], "ack", "{v}");
    }
}
