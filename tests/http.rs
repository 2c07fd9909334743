//! HTTP side: routing, handshake refusals, origin policy, connection limit, slowloris guard.

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
