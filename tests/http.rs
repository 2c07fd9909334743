//! HTTP side: routing, handshake refusals, origin policy, connection limit, slowloris guard,
//! and the HTTP/1.1 server's rules (bad heads, keep-alive, pipelining, unread bodies).

mod common;

use std::time::Duration;

use common::*;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

both_backends!(
    health_and_readiness,
    unknown_path_is_404,
    bad_handshakes_are_400,
    foreign_origin_is_403,
    max_connections_gives_503,
    slowloris_is_disconnected,
    garbage_does_not_affect_others,
    bad_request_heads_get_their_status_then_close,
    keep_alive_pipelining_and_close_rules,
    unread_bodies_are_drained_or_close,
);

async fn health_and_readiness(backend: Backend) {
    let server = Server::start(backend, &[]);
    let r = server.get("/healthz").await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    let r = server.get("/readyz").await;
    assert_eq!((r.status, r.body.as_str()), (200, "ready\n"));
}

async fn unknown_path_is_404(backend: Backend) {
    let server = Server::start(backend, &[]);
    for path in ["/nope", "/ws/echo/extra", "/healthz/x"] {
        let r = server.get(path).await;
        assert_eq!(r.status, 404, "{path}");
        assert_eq!(r.body, "not found\n", "{path}");
    }
}

/// Each refused upgrade gets 400 and a body saying what is wrong.
async fn bad_handshakes_are_400(backend: Backend) {
    let server = Server::start(backend, &[]);
    let good = upgrade_request("");
    let cases = [
        (
            "missing key",
            good.replace("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
            "Sec-WebSocket-Key",
        ),
        (
            "short key",
            good.replace("dGhlIHNhbXBsZSBub25jZQ==", "c2hvcnQ="),
            "16 bytes",
        ),
        (
            "wrong version",
            good.replace("Version: 13", "Version: 8"),
            "want 13",
        ),
        ("POST", good.replacen("GET", "POST", 1), "GET"),
        (
            "no Upgrade header",
            good.replace("Upgrade: websocket\r\n", ""),
            "Upgrade",
        ),
        ("HTTP/1.0", good.replace("HTTP/1.1", "HTTP/1.0"), "HTTP/1.1"),
    ];
    for (what, request, reason) in cases {
        let r = server.request(&request).await;
        assert_eq!(r.status, 400, "{what}: {r:?}");
        assert!(r.body.contains(reason), "{what}: body {:?}", r.body);
        // RFC 6455 §4.4: tell the client which version we speak.
        assert_eq!(r.header("sec-websocket-version"), Some("13"), "{what}");
    }
    // The server is fine afterwards.
    echo(&mut server.ws().await, Message::text("still here")).await;
}

async fn foreign_origin_is_403(backend: Backend) {
    let config = "allowed_origins = [\"https://good.example\"]\n";
    let server = Server::start_with_config(backend, config, &[]);
    let r = server
        .request(&upgrade_request("Origin: https://evil.example\r\n"))
        .await;
    assert_eq!(r.status, 403, "{r:?}");
    assert!(r.body.contains("origin"), "{:?}", r.body);

    let connect = |origin: &'static str| {
        let mut req = server.url("/ws/echo").into_client_request().unwrap();
        req.headers_mut().insert("Origin", origin.parse().unwrap());
        tokio_tungstenite::connect_async(req)
    };
    match within("connect", connect("https://evil.example")).await {
        Err(WsError::Http(resp)) => assert_eq!(resp.status(), 403),
        other => panic!("foreign origin: expected 403, got {:?}", other.map(|_| ())),
    }
    // The allowed origin (compared case-insensitively) gets through and echoes.
    let (mut ws, _) = within("connect", connect("https://GOOD.example"))
        .await
        .expect("allowed origin");
    echo(&mut ws, Message::text("hi")).await;
}

/// With `--max-connections 2` the third upgrade is refused with 503 until a slot frees up.
async fn max_connections_gives_503(backend: Backend) {
    let server = Server::start(backend, &["--max-connections", "2"]);
    let mut a = server.ws().await;
    let mut b = server.ws().await;
    match within(
        "connect",
        tokio_tungstenite::connect_async(server.url("/ws/echo")),
    )
    .await
    {
        Err(WsError::Http(resp)) => assert_eq!(resp.status(), 503),
        other => panic!(
            "third connection: expected 503, got {:?}",
            other.map(|_| ())
        ),
    }
    let r = server.request(&upgrade_request("")).await;
    assert_eq!(r.status, 503);
    assert!(r.body.contains("too many connections"), "{:?}", r.body);
    // Plain HTTP is not limited.
    assert_eq!(server.get("/healthz").await.status, 200);

    // Close one; the server frees its slot once the close handshake ends (shortly after the
    // client sees it), so retry briefly.
    echo(&mut b, Message::text("b")).await;
    futures_util::SinkExt::close(&mut b).await.expect("close b");
    while futures_util::StreamExt::next(&mut b).await.is_some() {}
    drop(b);
    let mut c = within("a free slot", async {
        loop {
            match tokio_tungstenite::connect_async(server.url("/ws/echo")).await {
                Ok((ws, _)) => return ws,
                Err(WsError::Http(resp)) if resp.status() == 503 => {
                    tokio::time::sleep(Duration::from_millis(50)).await
                }
                Err(e) => panic!("reconnect: {e}"),
            }
        }
    })
    .await;
    echo(&mut c, Message::text("c")).await;
    echo(&mut a, Message::text("a")).await;
}

/// A client that never finishes its request head is cut off after `--handshake-timeout`.
async fn slowloris_is_disconnected(backend: Backend) {
    let server = Server::start(backend, &["--handshake-timeout", "1"]);
    let mut slow = server.tcp().await;
    slow.write_all(b"GET /ws/echo HTTP/1.1\r\nHost: test\r\nUpgrade: web")
        .await
        .unwrap();
    // A connection that sends nothing at all is held to the same limit.
    let mut silent = server.tcp().await;
    assert!(
        closed_within(&mut slow, PATIENCE).await,
        "partial request head still open"
    );
    assert!(
        closed_within(&mut silent, PATIENCE).await,
        "silent connection still open"
    );
    // Others are served as usual.
    assert_eq!(server.get("/healthz").await.status, 200);
}

/// Random bytes from some clients (after the handshake, and instead of HTTP) do not disturb
/// another client on the same server.
async fn garbage_does_not_affect_others(backend: Backend) {
    let server = Server::start(backend, &[]);
    let mut good = server.ws().await;
    echo(&mut good, Message::text("before")).await;
    // Several connections, so both shards most likely see some.
    for seed in 1..=8u64 {
        let mut bad = server.raw_ws().await;
        bad.send(&pseudo_random(64 * 1024, seed)).await;
        // Garbage is usually a protocol violation, but may also read as the start of a long
        // frame; our FIN makes the server end the connection either way.
        bad.stream.shutdown().await.ok();
        assert!(
            closed_within(&mut bad.stream, PATIENCE).await,
            "garbage connection {seed} still open"
        );
        let mut not_http = server.tcp().await;
        not_http
            .write_all(&pseudo_random(4096, seed + 100))
            .await
            .ok();
        not_http.shutdown().await.ok();
        assert!(
            closed_within(&mut not_http, PATIENCE).await,
            "non-HTTP connection {seed} still open"
        );
        echo(&mut good, Message::binary(pseudo_random(1000, seed))).await;
    }
    echo(&mut good, Message::text("after")).await;
    echo(&mut server.ws().await, Message::text("new client")).await;
}

/// Reads everything until the server closes the connection (bounded by `within`); a reset
/// after the server closed with bytes of ours unread ends it too.
async fn read_to_close(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut all = Vec::new();
    let _ = within("the server closes", s.read_to_end(&mut all)).await;
    String::from_utf8_lossy(&all).into_owned()
}

/// Each kind of bad request head gets its status, then the connection closes (nothing after
/// the bad head is read as a request).
async fn bad_request_heads_get_their_status_then_close(backend: Backend) {
    let server = Server::start(backend, &[]);
    let big = "a".repeat(70 * 1024);
    let many: String = (0..200).map(|i| format!("x-{i}: v\r\n")).collect();
    let cases = [
        ("bad request line", "GET\r\n\r\n".to_string(), "400"),
        ("bad version", "GET / HTTP/2.5\r\nHost: t\r\n\r\n".into(), "400"),
        ("bad header name", "GET / HTTP/1.1\r\nBad Name: v\r\n\r\n".into(), "400"),
        (
            "both lengths",
            "POST /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n".into(),
            "400",
        ),
        (
            "encoding not chunked",
            "POST /healthz HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n".into(),
            "400",
        ),
        (
            "bad length",
            "POST /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 1x\r\n\r\n".into(),
            "400",
        ),
        (
            "two lengths",
            "POST /healthz HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n".into(),
            "400",
        ),
        (
            "head too large",
            format!("GET / HTTP/1.1\r\nHost: t\r\nX-Big: {big}\r\n\r\n"),
            "431",
        ),
        ("too many fields", format!("GET / HTTP/1.1\r\n{many}\r\n"), "431"),
    ];
    for (what, head, status) in cases {
        let mut s = server.tcp().await;
        // A request that would be answered follows the bad head: it must not be.
        let pipelined = format!("{head}GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
        // (The server may close before reading everything of a head too large.)
        let _ = s.write_all(pipelined.as_bytes()).await;
        let all = read_to_close(&mut s).await;
        assert!(
            all.starts_with(&format!("HTTP/1.1 {status} ")),
            "{what}: {all:?}"
        );
        assert!(all.contains("connection: close\r\n"), "{what}: {all:?}");
        assert_eq!(all.matches("HTTP/1.1").count(), 1, "{what}: {all:?}");
    }
    // The server is fine afterwards.
    assert_eq!(server.get("/healthz").await.status, 200);
}

/// Keep-alive by default in HTTP/1.1 and only when asked in HTTP/1.0; `Connection: close`
/// closes after the response; pipelined requests are answered in order; `Date` on every
/// response; HEAD gets the length of a GET and no body.
async fn keep_alive_pipelining_and_close_rules(backend: Backend) {
    let server = Server::start(backend, &[]);
    let mut s = server.tcp().await;
    s.write_all(
        b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\nHEAD /readyz HTTP/1.1\r\nHost: t\r\n\r\n\
          GET /nope HTTP/1.1\r\nHost: t\r\n\r\nGET /readyz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n\
          GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n",
    )
    .await
    .unwrap();
    let all = read_to_close(&mut s).await;
    let statuses: Vec<&str> = all
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &all[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["200", "200", "404", "200"], "{all:?}");
    // The bodies in order: `ok`, none for HEAD (with the length a GET gets), `not found`,
    // `ready` (after which the connection closed: the fifth request was not answered).
    let bodies: Vec<&str> = all.split("\r\n\r\n").skip(1).collect();
    assert!(bodies[0].starts_with("ok\n"), "{all:?}");
    assert!(
        bodies[1].starts_with("HTTP/1.1 404"),
        "HEAD has no body: {all:?}"
    );
    assert!(all.contains("content-length: 6\r\n"), "{all:?}");
    assert!(bodies[3].starts_with("ready\n"), "{all:?}");
    assert_eq!(all.matches("\r\ndate: ").count(), 4, "{all:?}");

    // HTTP/1.0: closed after the response unless keep-alive is asked for.
    let mut s = server.tcp().await;
    s.write_all(b"GET /healthz HTTP/1.0\r\n\r\nGET /healthz HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let all = read_to_close(&mut s).await;
    assert!(all.starts_with("HTTP/1.0 200 OK\r\n"), "{all:?}");
    assert_eq!(all.matches("HTTP/1.0 200").count(), 1, "{all:?}");
    let mut s = server.tcp().await;
    s.write_all(
        b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /readyz HTTP/1.0\r\n\r\n",
    )
    .await
    .unwrap();
    let all = read_to_close(&mut s).await;
    assert!(all.contains("connection: keep-alive\r\n"), "{all:?}");
    assert_eq!(all.matches("HTTP/1.0 200").count(), 2, "{all:?}");
    assert!(all.ends_with("ready\n"), "{all:?}");
}

/// A request body the handler did not read is read and dropped (the next request on the
/// connection is answered), up to a bound past which the connection closes; a bad chunk
/// size in an unread body closes the connection after the response.
async fn unread_bodies_are_drained_or_close(backend: Backend) {
    let server = Server::start(backend, &[]);
    // Small bodies, by length and chunked: drained, the next request answered.
    let mut s = server.tcp().await;
    s.write_all(
        b"POST /nope HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello\
          POST /nope HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx-t: 1\r\n\r\n\
          GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let all = read_to_close(&mut s).await;
    assert_eq!(all.matches("HTTP/1.1 404").count(), 2, "{all:?}");
    assert!(all.ends_with("ok\n"), "{all:?}");
    // A bad chunk size: the answer, then the connection closes.
    let mut s = server.tcp().await;
    s.write_all(
        b"POST /nope HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n\
          GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n",
    )
    .await
    .unwrap();
    let all = read_to_close(&mut s).await;
    assert_eq!(all.matches("HTTP/1.1 ").count(), 1, "{all:?}");
    assert!(all.starts_with("HTTP/1.1 404"), "{all:?}");
    // A body over the bound: answered, then closed without reading it all.
    let mut s = server.tcp().await;
    s.write_all(b"POST /nope HTTP/1.1\r\nHost: t\r\nContent-Length: 10000000\r\n\r\nxx")
        .await
        .unwrap();
    let r = read_response(&mut s).await;
    assert_eq!(r.status, 404);
    let _ = s.write_all(&vec![b'x'; 128 * 1024]).await;
    assert!(closed_within(&mut s, PATIENCE).await, "still open");
    // A client that closes mid-body: the server goes on serving others.
    let mut s = server.tcp().await;
    s.write_all(b"POST /nope HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nabc")
        .await
        .unwrap();
    drop(s);
    assert_eq!(server.get("/healthz").await.status, 200);
}
