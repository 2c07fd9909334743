//! HTTP/2 at the edge: every HTTP endpoint over h2 (TLS with ALPN, and h2c prior knowledge),
//! WebSockets over HTTP/2 streams (RFC 8441), and the h2-specific abuse cases, against the real
//! binary on both io backends. The clients are hyper's HTTP/2 client, curl, and hand-made
//! frames for what a well-behaved client never sends.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::upstreams::*;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

both_backends!(
    every_http_endpoint_over_h2,
    curl_speaks_h2_and_http1,
    h2c_prior_knowledge_next_to_http1,
    listener_without_http2_offers_http1_only,
    websocket_echo_over_h2,
    websocket_refusals_over_h2,
    frame_sequences_over_h2,
    rooms_over_h2,
    agent_streaming_over_h2,
    proxy_routes_over_h2,
    websocket_route_over_h2,
    websocket_route_refusals_over_h2,
    route_websockets_one_connection_and_a_slow_reader,
    closing_one_route_stream_leaves_the_others,
    tunnel_route_over_h2_is_byte_exact,
    drain_closes_route_websockets_over_h2,
    many_websockets_one_connection_and_a_slow_reader,
    closing_one_stream_leaves_the_others,
    drain_sends_goaway_and_closes_websockets,
    rapid_reset_is_answered_with_goaway,
    a_body_ends_on_its_last_data_frame,
    continuation_flood_is_refused,
    streams_over_the_limit_are_refused,
    settings_and_ping_floods_stay_bounded,
    silent_connection_is_dropped,
    unanswered_keep_alive_ping_closes_the_connection,
    idle_websockets_on_one_connection_hold_little_heap,
    websockets_count_against_the_per_address_cap,
);

type WsH2 = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// A server with one TLS listener (on loopback: the admin surface is served there too).
async fn start_tls(backend: Backend, extra_config: &str) -> (Server, CertDir) {
    let certs = CertDir::new().await;
    let config = format!(
        "{extra_config}\n[[listen]]\naddr = \"127.0.0.1:0\"\ntls = true\n[tls]\ncert = {:?}\nkey = {:?}\n",
        certs.file("cert.pem"),
        certs.file("key.pem"),
    );
    (Server::start_with_config(backend, &config, &[]), certs)
}

/// A TLS client connection offering `alpn`, trusting the dev CA.
async fn tls(
    addr: SocketAddr,
    certs: &CertDir,
    alpn: &[&[u8]],
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(certs.file("ca.pem")).expect("read CA") {
        roots.add(cert.expect("CA cert")).expect("add CA");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = within("tcp connect", tokio::net::TcpStream::connect(addr))
        .await
        .expect("tcp connect");
    let name = ServerName::try_from("localhost").expect("server name");
    within(
        "tls handshake",
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp),
    )
    .await
    .expect("tls handshake")
}

/// hyper's HTTP/2 client on one connection.
struct H2 {
    send: SendRequest<Full<Bytes>>,
    scheme: &'static str,
}

impl H2 {
    /// Over TLS with ALPN `h2`.
    async fn tls(addr: SocketAddr, certs: &CertDir) -> H2 {
        let io = tls(addr, certs, &[b"h2", b"http/1.1"]).await;
        assert_eq!(io.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        H2::handshake(io, "https").await
    }

    /// Over plain TCP with prior knowledge (h2c).
    async fn h2c(addr: SocketAddr) -> H2 {
        let io = tokio::net::TcpStream::connect(addr)
            .await
            .expect("tcp connect");
        H2::handshake(io, "http").await
    }

    async fn handshake<I>(io: I, scheme: &'static str) -> H2
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        // Small stream windows, a large connection window: a stream the test does not read
        // stops only itself.
        let (send, conn) = within(
            "h2 handshake",
            hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .initial_stream_window_size(65_535)
                .initial_connection_window_size(16 << 20)
                .handshake(TokioIo::new(io)),
        )
        .await
        .expect("h2 handshake");
        tokio::spawn(conn);
        let mut h2 = H2 { send, scheme };
        // One round trip: the server's SETTINGS (with ENABLE_CONNECT_PROTOCOL) have arrived.
        assert_eq!(h2.get("/healthz").await.0, StatusCode::OK);
        h2
    }

    fn uri(&self, path: &str) -> String {
        format!("{}://localhost{path}", self.scheme)
    }

    async fn request(
        &mut self,
        method: Method,
        path: &str,
        body: &str,
    ) -> (StatusCode, http::HeaderMap, Bytes) {
        let req = Request::builder()
            .method(method)
            .uri(self.uri(path))
            .body(Full::new(Bytes::from(body.to_owned())))
            .expect("request");
        within("h2 ready", self.send.ready()).await.expect("ready");
        let resp = within("h2 response", self.send.send_request(req))
            .await
            .expect("h2 response");
        let (parts, body) = resp.into_parts();
        let body = within("h2 body", body.collect())
            .await
            .expect("h2 body")
            .to_bytes();
        (parts.status, parts.headers, body)
    }

    async fn get(&mut self, path: &str) -> (StatusCode, http::HeaderMap, Bytes) {
        self.request(Method::GET, path, "").await
    }

    /// An extended CONNECT (RFC 8441) to `path` with `headers`: the response, and the stream
    /// as bytes when it is a 200.
    async fn connect_raw(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (
        http::Response<hyper::body::Incoming>,
        Option<hyper::upgrade::Upgraded>,
    ) {
        let mut req = Request::builder()
            .method(Method::CONNECT)
            .uri(self.uri(path));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let mut req = req.body(Full::new(Bytes::new())).expect("request");
        req.extensions_mut()
            .insert(hyper::ext::Protocol::from_static("websocket"));
        within("h2 ready", self.send.ready()).await.expect("ready");
        let mut resp = within("extended CONNECT", self.send.send_request(req))
            .await
            .expect("extended CONNECT");
        if resp.status() != StatusCode::OK {
            return (resp, None);
        }
        let upgraded = within("upgraded stream", hyper::upgrade::on(&mut resp))
            .await
            .expect("upgraded stream");
        (resp, Some(upgraded))
    }

    /// An extended CONNECT (RFC 8441) to `path` with `headers`: the response, and the
    /// WebSocket when it is a 200.
    async fn connect(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> (http::Response<hyper::body::Incoming>, Option<WsH2>) {
        let (resp, stream) = self.connect_raw(path, headers).await;
        let ws = match stream {
            Some(s) => {
                Some(WebSocketStream::from_raw_socket(TokioIo::new(s), Role::Client, None).await)
            }
            None => None,
        };
        (resp, ws)
    }

    /// A WebSocket over a new stream of this connection.
    async fn websocket(&mut self, path: &str) -> WsH2 {
        let (resp, ws) = self.connect(path, &[("sec-websocket-version", "13")]).await;
        assert_eq!(resp.status(), StatusCode::OK);
        ws.expect("websocket")
    }
}

async fn echo_h2(ws: &mut WsH2, msg: Message) {
    ws.send(msg.clone()).await.expect("send");
    let got = within("echo", next_data_h2(ws)).await;
    assert_eq!(got, msg);
}

/// The next text or binary message (pings are answered by tungstenite).
async fn next_data_h2(ws: &mut WsH2) -> Message {
    loop {
        match within("a message", ws.next()).await {
            Some(Ok(m @ (Message::Text(_) | Message::Binary(_)))) => return m,
            Some(Ok(Message::Close(c))) => panic!("closed: {c:?}"),
            Some(Ok(_)) => {}
            other => panic!("stream ended: {other:?}"),
        }
    }
}

/// The code of the close the server sends (data messages before it are skipped).
async fn close_code_h2(ws: &mut WsH2) -> Option<u16> {
    within("close", async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Close(c))) => return c.map(|c| u16::from(c.code)),
                Some(Ok(_)) => {}
                _ => return None,
            }
        }
    })
    .await
}

async fn json(ws: &mut WsH2) -> serde_json::Value {
    match next_data_h2(ws).await {
        Message::Text(t) => serde_json::from_str(&t).expect("json"),
        other => panic!("not text: {other:?}"),
    }
}

/// The server's resident memory in KiB.
fn rss_kib(server: &Server) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

async fn every_http_endpoint_over_h2(backend: Backend) {
    let (server, certs) = start_tls(backend, "").await;
    let mut h2 = H2::tls(server.addr, &certs).await;
    let (status, _, body) = h2.get("/healthz").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"ok\n"[..]));
    let (status, _, body) = h2.get("/readyz").await;
    assert_eq!((status, &body[..]), (StatusCode::OK, &b"ready\n"[..]));
    let (status, _, body) = h2.get("/metrics").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        String::from_utf8_lossy(&body).contains("ringgate_http2_connections_total"),
        "metrics without the HTTP/2 counter"
    );
    let (status, headers, body) = h2.get("/static/ringgate.js").await;
    assert_eq!(status, StatusCode::OK);
    assert!(headers["content-type"]
        .to_str()
        .unwrap()
        .contains("javascript"));
    assert!(body.len() > 1000);
    assert_eq!(h2.get("/nope").await.0, StatusCode::NOT_FOUND);
    // The rooms API, and an event stream that stays open across other streams' requests.
    let mut sse = {
        let req = Request::builder()
            .uri(h2.uri("/sse?topics=h2news"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        h2.send.ready().await.unwrap();
        let resp = within("sse", h2.send.send_request(req)).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let kind = resp.headers()["content-type"].to_str().unwrap();
        assert!(kind.starts_with("text/event-stream"), "{kind}");
        resp.into_body()
    };
    let (status, _, body) = h2
        .request(
            Method::POST,
            "/api/publish",
            r#"{"topic":"h2news","data":{"n":1}}"#,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    assert_eq!(&body[..], br#"{"seq":1}"#);
    let mut seen = String::new();
    while !seen.contains(r#""n":1"#) {
        let frame = within("sse event", sse.frame()).await.unwrap().unwrap();
        if let Ok(data) = frame.into_data() {
            seen.push_str(&String::from_utf8_lossy(&data));
        }
    }
    let (status, _, body) = h2.get("/api/history?topic=h2news&since=0").await;
    assert_eq!(status, StatusCode::OK);
    assert!(
        String::from_utf8_lossy(&body).contains(r#""n":1"#),
        "{body:?}"
    );
    let (status, _, body) = h2.get("/api/presence?topic=h2news").await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    let (status, _, body) = h2
        .request(Method::POST, "/publish", r#"{"topic":"h2news","data":2}"#)
        .await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    // Statistics list a WebSocket over HTTP/2 as such.
    let _ws = h2.websocket("/ws/echo").await;
    let (status, _, body) = h2.get("/ws/statistics").await;
    assert_eq!(status, StatusCode::OK);
    let stats: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(stats["active_connections"], 1, "{stats}");
    assert_eq!(stats["connections"][0]["http2"], true, "{stats}");
    assert_eq!(stats["connections"][0]["endpoint"], "echo", "{stats}");
}

/// A second HTTP/2 implementation (curl with nghttp2), and HTTP/1.1 on the same listener.
async fn curl_speaks_h2_and_http1(backend: Backend) {
    let curl = ensure_curl();
    let (server, certs) = start_tls(backend, "").await;
    let url = format!("https://localhost:{}/healthz", server.addr.port());
    let resolve = format!("localhost:{}:127.0.0.1", server.addr.port());
    let ca = certs.file("ca.pem");
    for (flag, want) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let out = run_to_exit(
            std::process::Command::new(&curl)
                .args(["-sS", flag, "--resolve", &resolve, "--cacert"])
                .arg(&ca)
                .args(["-w", "\\n%{http_version}", &url]),
        )
        .await;
        assert!(out.status.success(), "curl {flag}: {out:?}");
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("ok\n\n{want}")
        );
    }
}

/// curl on the PATH, installed with apt-get when running as root.
fn ensure_curl() -> String {
    let has = |c: &str| {
        std::process::Command::new(c)
            .arg("--version")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).contains("HTTP2"))
            .unwrap_or(false)
    };
    if !has("curl") {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        assert!(
            root,
            "these tests need curl with HTTP/2: apt-get install curl"
        );
        let ok = std::process::Command::new("apt-get")
            .args(["install", "-y", "curl"])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(ok && has("curl"), "apt-get install -y curl failed");
    }
    "curl".into()
}

async fn h2c_prior_knowledge_next_to_http1(backend: Backend) {
    let server = Server::start_with_config(
        backend,
        "[[listen]]\naddr = \"127.0.0.1:0\"\nh2c = true\n",
        &[],
    );
    // HTTP/1.1 (the harness waited for /healthz over it), and WebSockets over HTTP/1.1.
    let mut ws = server.ws().await;
    echo(&mut ws, Message::text("h1")).await;
    let mut h2 = H2::h2c(server.addr).await;
    assert_eq!(h2.get("/readyz").await.0, StatusCode::OK);
    let mut ws2 = h2.websocket("/ws/echo").await;
    echo_h2(&mut ws2, Message::text("h2c")).await;
    // A request head shorter than the preface that is not the preface stays HTTP/1.1.
    let r = server
        .request("GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(r.status, 404);
    // Without `h2c`, prior knowledge is not HTTP/2 (hyper's HTTP/1.1 refuses the preface).
    let plain = Server::start(backend, &[]);
    let mut s = plain.tcp().await;
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = within("answer", s.read_to_end(&mut buf)).await;
    assert!(
        !buf.starts_with(&[0, 0]),
        "an HTTP/2 frame from a listener without h2c"
    );
}

async fn listener_without_http2_offers_http1_only(backend: Backend) {
    let (server, certs) = start_tls(backend, "").await;
    let io = tls(server.addr, &certs, &[b"h2", b"http/1.1"]).await;
    assert_eq!(io.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    drop(io);
    let certs2 = CertDir::new().await;
    let config = format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\ntls = true\nhttp2 = false\n[tls]\ncert = {:?}\nkey = {:?}\n",
        certs2.file("cert.pem"),
        certs2.file("key.pem"),
    );
    let h1 = Server::start_with_config(backend, &config, &[]);
    let io = tls(h1.addr, &certs2, &[b"h2", b"http/1.1"]).await;
    assert_eq!(io.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
}

async fn websocket_echo_over_h2(backend: Backend) {
    let (server, certs) = start_tls(backend, "").await;
    let mut h2 = H2::tls(server.addr, &certs).await;
    let mut ws = h2.websocket("/ws/echo").await;
    echo_h2(&mut ws, Message::text("over an h2 stream")).await;
    // Larger than the stream windows on both sides: flow control moves it along.
    let big = pseudo_random(1 << 20, 7);
    echo_h2(&mut ws, Message::binary(big)).await;
    // The close handshake (its codes: `frame_sequences_over_h2`) ends the stream; the
    // connection serves on.
    ws.close(None).await.expect("close");
    let end = within("close", async {
        loop {
            match ws.next().await {
                Some(Ok(_)) => {}
                None => return Ok(()),
                Some(Err(e)) => return Err(e),
            }
        }
    })
    .await;
    assert!(
        matches!(
            end,
            Ok(()) | Err(tokio_tungstenite::tungstenite::Error::ConnectionClosed)
        ),
        "{end:?}"
    );
    assert_eq!(h2.get("/healthz").await.0, StatusCode::OK);
    let (_, _, body) = h2.get("/metrics").await;
    let text = String::from_utf8_lossy(&body);
    assert!(
        text.lines()
            .any(|l| l.starts_with("ringgate_http2_websockets_total") && l.ends_with(" 1")),
        "{text}"
    );
}

async fn websocket_refusals_over_h2(backend: Backend) {
    let (server, certs) = start_tls(backend, "allowed_origins = [\"https://app.example\"]\n").await;
    let mut h2 = H2::tls(server.addr, &certs).await;
    let (resp, _) = h2.connect("/ws/echo", &[]).await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let (resp, _) = h2
        .connect("/ws/echo", &[("sec-websocket-version", "8")])
        .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let (resp, _) = h2
        .connect(
            "/ws/echo",
            &[
                ("sec-websocket-version", "13"),
                ("origin", "https://evil.example"),
            ],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    // A refused stream costs the connection nothing.
    let (resp, ws) = h2
        .connect(
            "/ws/echo",
            &[
                ("sec-websocket-version", "13"),
                ("origin", "https://app.example"),
                ("sec-websocket-extensions", "permessage-deflate"),
            ],
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().get("sec-websocket-accept").is_none());
    // permessage-deflate is negotiated as over HTTP/1.1.
    assert!(
        resp.headers()["sec-websocket-extensions"]
            .to_str()
            .unwrap()
            .starts_with("permessage-deflate"),
        "{:?}",
        resp.headers()
    );
    drop(ws);
    // An extended CONNECT to what is not a WebSocket endpoint opens no tunnel.
    for path in [
        "/healthz",
        "/static/ringgate.js",
        "/sse?topics=a",
        "/api/history?topic=a",
    ] {
        let (resp, ws) = h2.connect(path, &[("sec-websocket-version", "13")]).await;
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED, "{path}");
        assert!(ws.is_none());
    }
    // A plain CONNECT (no `:protocol`) is not a WebSocket.
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri("localhost:443")
        .body(Full::new(Bytes::new()))
        .unwrap();
    h2.send.ready().await.unwrap();
    let resp = within("CONNECT", h2.send.send_request(req)).await.unwrap();
    assert!(resp.status().is_client_error(), "{}", resp.status());
}

/// Autobahn cannot speak HTTP/2: its cases' frame sequences (fragmentation, interleaved
/// control frames, protocol violations) go through the h2 transport here. The session is the
/// HTTP/1.1 one; this tests the glue: frames split across DATA frames, and closes.
async fn frame_sequences_over_h2(backend: Backend) {
    let (server, certs) = start_tls(backend, "").await;
    let mut h2 = H2::tls(server.addr, &certs).await;
    let raw = |h2: &mut H2| {
        let req = {
            let mut r = Request::builder()
                .method(Method::CONNECT)
                .uri(h2.uri("/ws/echo"))
                .header("sec-websocket-version", "13")
                .body(Full::new(Bytes::new()))
                .unwrap();
            r.extensions_mut()
                .insert(hyper::ext::Protocol::from_static("websocket"));
            r
        };
        let send = h2.send.send_request(req);
        async move {
            let mut resp = within("CONNECT", send).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let up = hyper::upgrade::on(&mut resp).await.unwrap();
            TokioIo::new(up)
        }
    };
    let mask = Some([1, 2, 3, 4]);
    // (name, frames sent, frames expected back (opcode, payload), close code expected)
    type Case = (&'static str, Vec<Vec<u8>>, Vec<(u8, Vec<u8>)>, Option<u16>);
    let cases: Vec<Case> = vec![
        // 5.x: a fragmented text message, a ping in between.
        (
            "fragments with a ping",
            vec![
                encode_frame(OP_TEXT, mask, b"frag"),
                encode_frame(0x80 | OP_PING, mask, b"p"),
                encode_frame(0x80 | OP_CONT, mask, b"ment"),
            ],
            vec![(OP_PONG, b"p".to_vec()), (OP_TEXT, b"fragment".to_vec())],
            None,
        ),
        // 6.x: invalid UTF-8 is 1007.
        (
            "invalid utf-8",
            vec![encode_frame(0x80 | OP_TEXT, mask, &[0xce, 0xba, 0xff])],
            vec![],
            Some(1007),
        ),
        // 1.x/2.x violations: an unmasked frame, a reserved opcode, a long ping.
        (
            "unmasked",
            vec![encode_frame(0x80 | OP_TEXT, None, b"x")],
            vec![],
            Some(1002),
        ),
        (
            "reserved opcode",
            vec![encode_frame(0x83, mask, b"")],
            vec![],
            Some(1002),
        ),
        (
            "long ping",
            vec![encode_frame(0x80 | OP_PING, mask, &[0; 126])],
            vec![],
            Some(1002),
        ),
        // 7.x: a clean close is echoed.
        (
            "close",
            vec![encode_frame(
                0x80 | OP_CLOSE,
                mask,
                &close_body(1000, "bye"),
            )],
            vec![],
            Some(1000),
        ),
    ];
    for (name, send, want, close) in cases {
        h2.send.ready().await.unwrap();
        let mut io = raw(&mut h2).await;
        // One byte per write: every frame is split across DATA frames.
        for frame in &send {
            for b in frame {
                io.write_all(&[*b]).await.unwrap();
            }
        }
        io.flush().await.unwrap();
        let mut buf = Vec::new();
        let mut got = Vec::new();
        let mut code = None;
        let done = within(name, async {
            loop {
                while let Some((f, used)) = parse_server_frame(&buf) {
                    buf.drain(..used);
                    if f.opcode == OP_CLOSE {
                        code = f.close_code();
                        return;
                    }
                    got.push((f.opcode, f.payload));
                    if close.is_none() && got.len() == want.len() {
                        return;
                    }
                }
                let mut chunk = [0u8; 4096];
                match io.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
        });
        done.await;
        assert_eq!(got, want, "{name}");
        assert_eq!(code, close, "{name}");
    }
    // Every case's stream is gone; the connection is fine.
    assert_eq!(h2.get("/healthz").await.0, StatusCode::OK);
}

async fn rooms_over_h2(backend: Backend) {
    let (server, certs) = start_tls(backend, "").await;
    let mut h2 = H2::tls(server.addr, &certs).await;
    let mut sub = h2.websocket("/ws").await;
    let mut publisher = h2.websocket("/ws").await;
    for ws in [&mut sub, &mut publisher] {
        assert_eq!(json(ws).await["type"], "connected");
    }
    sub.send(Message::text(
        r#"{"action":"subscribe","topic":"t","id":1}"#,
    ))
    .await
    .unwrap();
    let v = json(&mut sub).await;
    assert_eq!(v["type"], "subscribed", "{v}");
    publisher
        .send(Message::text(
            r#"{"action":"publish","topic":"t","data":{"x":1},"id":2}"#,
        ))
        .await
        .unwrap();
    let ack = json(&mut publisher).await;
    assert_eq!(ack["seq"], 1, "{ack}");
    let v = json(&mut sub).await;
    assert_eq!(
        (v["topic"].as_str(), v["seq"].as_u64()),
        (Some("t"), Some(1)),
        "{v}"
    );
    assert_eq!(v["data"]["x"], 1, "{v}");
    // An HTTP/1.1 WebSocket on another connection is in the same room.
    let certs_io = tls(server.addr, &certs, &[b"http/1.1"]).await;
    let (mut h1, _) = tokio_tungstenite::client_async("wss://localhost/ws", certs_io)
        .await
        .expect("h1 upgrade");
    h1.send(Message::text(
        r#"{"action":"publish","topic":"t","data":{"x":2}}"#,
    ))
    .await
    .unwrap();
    let v = json(&mut sub).await;
    assert_eq!(v["data"]["x"], 2, "{v}");
}

/// Two streaming agent queries at once, on two WebSockets of one connection (the built-in demo
/// agent answers word by word).
async fn agent_streaming_over_h2(backend: Backend) {
    let (server, certs) = start_tls(backend, "").await;
    let mut h2 = H2::tls(server.addr, &certs).await;
    let mut sockets = Vec::new();
    for i in 0..2 {
        let mut ws = h2.websocket("/ws/agent").await;
        assert_eq!(json(&mut ws).await["type"], "connected");
        let q = format!(r#"{{"type":"streaming_query","query":"q{i}","id":"s{i}"}}"#);
        ws.send(Message::text(q)).await.unwrap();
        sockets.push(ws);
    }
    for (i, ws) in sockets.iter_mut().enumerate() {
        let start = json(ws).await;
        assert_eq!(
            (start["type"].as_str(), start["id"].as_str()),
            (Some("stream_start"), Some(format!("s{i}").as_str())),
            "{start}"
        );
        let mut text = String::new();
        loop {
            let v = json(ws).await;
            match v["type"].as_str() {
                Some("stream_chunk") => text.push_str(v["content"].as_str().unwrap()),
                Some("stream_end") => break,
                _ => panic!("{v}"),
            }
        }
        assert!(text.contains(&format!("q{i}")), "{text}");
    }
}

/// A `[[route]]` to an HTTP/1.1 upstream started here, asked over HTTP/2: forwarded with the
/// client's host, request bodies included.
async fn proxy_routes_over_h2(backend: Backend) {
    use hyper::service::service_fn;
    let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = upstream.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((sock, _)) = upstream.accept().await {
            let answer = service_fn(|req: Request<hyper::body::Incoming>| async move {
                let (req, body) = req.into_parts();
                let h = |n: &str| {
                    req.headers
                        .get(n)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-")
                        .to_owned()
                };
                let got = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let body = format!(
                    "{} {} {} {}{}",
                    req.uri.path(),
                    h("host"),
                    h("x-forwarded-host"),
                    h("x-forwarded-proto"),
                    String::from_utf8_lossy(&got)
                );
                Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::from(body))))
            });
            tokio::spawn(
                hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(sock), answer),
            );
        }
    });
    let routes = format!(
        "[[route]]\npath_prefix = \"/app/\"\nupstreams = [\"http://{up_addr}\"]\nstrip_prefix = true\n\
         [[route]]\npath_prefix = \"/kept/\"\nupstreams = [\"http://{up_addr}\"]\npreserve_host = true\n"
    );
    let (server, certs) = start_tls(backend, &routes).await;
    let mut h2 = H2::tls(server.addr, &certs).await;
    let (status, _, body) = h2.get("/app/x?y=1").await;
    assert_eq!(status, StatusCode::OK, "{body:?}");
    let up_host = up_addr.to_string();
    assert_eq!(
        String::from_utf8_lossy(&body),
        format!("/x {up_host} localhost https")
    );
    let (_, _, body) = h2.get("/kept/z").await;
    assert_eq!(
        String::from_utf8_lossy(&body),
        "/kept/z localhost localhost https"
    );
    let upload = "x".repeat(200_000);
    let (status, _, body) = h2.request(Method::POST, "/app/up", &upload).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        String::from_utf8_lossy(&body),
        format!("/up {up_host} localhost https{upload}")
    );
    assert_eq!(h2.get("/healthz").await.0, StatusCode::OK);
}

/// A `[[route]]` with `strip_prefix` to a WebSocket upstream started here.
fn ws_route(addr: SocketAddr, mode: &str) -> String {
    format!("[[route]]\npath_prefix = \"/app/\"\nupstreams = [\"http://{addr}\"]\nstrip_prefix = true\nmode = \"{mode}\"\n")
}

const VERSION_13: (&str, &str) = ("sec-websocket-version", "13");

/// RFC 8441 through a route (`mode = "websocket"`): the upstream's handshake comes first, the
/// subprotocol crosses both ways, messages are relayed, close codes cross both ways, and the
/// socket is listed as a proxied HTTP/2 WebSocket.
async fn websocket_route_over_h2(backend: Backend) {
    let (addr, seen) = ws_upstream().await;
    let (server, certs) = start_tls(backend, &ws_route(addr, "websocket")).await;
    let mut h2 = H2::tls(server.addr, &certs).await;
    let protocols = ("sec-websocket-protocol", "superchat, chat");
    let (resp, ws) = h2
        .connect("/app/chat?room=1", &[VERSION_13, protocols])
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["sec-websocket-protocol"], "superchat");
    assert!(resp.headers().get("sec-websocket-accept").is_none());
    let mut ws = ws.expect("websocket");
    assert_eq!(seen.paths.lock().unwrap().as_slice(), ["/chat?room=1"]);
    echo_h2(&mut ws, Message::text("hello")).await;
    echo_h2(&mut ws, Message::binary(pseudo_random(1 << 20, 7))).await;
    let (_, _, body) = h2.get("/ws/statistics").await;
    let stats: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let conn = &stats["connections"][0];
    assert_eq!(
        (&conn["endpoint"], &conn["http2"]),
        (&"proxy".into(), &true.into()),
        "{stats}"
    );
    // The upstream closes with 4001: the client gets 4001.
    ws.send(Message::text("close:4001")).await.unwrap();
    let code = close_code_h2(&mut ws).await;
    assert_eq!(code, Some(4001));
    // The client closes with 4002: the upstream gets 4002.
    let mut ws = h2.websocket("/app/b").await;
    echo_h2(&mut ws, Message::text("b")).await;
    ws.close(Some(CloseFrame {
        code: CloseCode::from(4002),
        reason: "client".into(),
    }))
    .await
    .unwrap();
    wait_close(&seen, 4002).await;
}

/// The upstream's refusal reaches the stream as its status and body; an upstream that cannot
/// be reached is a 502; a bad extended CONNECT is refused before any upstream is asked.
async fn websocket_route_refusals_over_h2(backend: Backend) {
    let (addr, seen) = ws_upstream().await;
    let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = dead.local_addr().unwrap();
    drop(dead);
    let routes = format!(
        "{}[[route]]\npath_prefix = \"/dead/\"\nupstreams = [\"http://{dead_addr}\"]\n",
        ws_route(addr, "websocket")
    );
    let (server, certs) = start_tls(backend, &routes).await;
    let mut h2 = H2::tls(server.addr, &certs).await;
    let (resp, ws) = h2.connect("/app/forbidden", &[VERSION_13]).await;
    assert_eq!(resp.status(), StatusCode::FORBIDDEN);
    assert!(ws.is_none());
    let body = within("body", resp.into_body().collect()).await.unwrap();
    assert_eq!(body.to_bytes(), "go away");
    let (resp, _) = h2.connect("/dead/x", &[VERSION_13]).await;
    assert_eq!(resp.status(), StatusCode::BAD_GATEWAY);
    let (resp, _) = h2
        .connect("/app/x", &[("sec-websocket-version", "8")])
        .await;
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert_eq!(seen.paths.lock().unwrap().as_slice(), ["/forbidden"]);
    // The connection serves on.
    let mut ws = h2.websocket("/app/ok").await;
    echo_h2(&mut ws, Message::text("fine")).await;
}

/// Many relayed sockets share one connection; one whose reader stops (its upstream floods it)
/// holds back only itself, and catches up losslessly once read.
async fn route_websockets_one_connection_and_a_slow_reader(backend: Backend) {
    let (addr, seen) = ws_upstream().await;
    let (server, certs) = start_tls(backend, &ws_route(addr, "websocket")).await;
    let mut h2 = H2::tls(server.addr, &certs).await;
    let mut slow = h2.websocket("/app/slow").await;
    let mut others = Vec::new();
    for i in 0..20 {
        others.push(h2.websocket(&format!("/app/{i}")).await);
    }
    const FLOOD: usize = 32;
    slow.send(Message::text(format!("flood:{FLOOD}")))
        .await
        .unwrap();
    // The upstream gets some way into the flood before the queues fill.
    within("flood started", async {
        while seen.flooded.load(std::sync::atomic::Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    for round in 0..3 {
        for (i, ws) in others.iter_mut().enumerate() {
            echo_h2(ws, Message::text(format!("{round}:{i}"))).await;
        }
    }
    // The flood was still held back while the others went through.
    let flooded = seen.flooded.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        flooded < FLOOD,
        "the whole flood went to a client reading nothing"
    );
    let mut got = 0;
    while got < FLOOD {
        match next_data_h2(&mut slow).await {
            Message::Binary(b) => {
                assert_eq!(b.len(), 1 << 20);
                got += 1;
            }
            other => panic!("{other:?}"),
        }
    }
}

/// One relayed socket reset by the client and one closed cleanly: the upstream sees 1001 and
/// the client's code; the socket left on the connection relays on.
async fn closing_one_route_stream_leaves_the_others(backend: Backend) {
    let (addr, seen) = ws_upstream().await;
    let (server, certs) = start_tls(backend, &ws_route(addr, "websocket")).await;
    let mut h2 = H2::tls(server.addr, &certs).await;
    let mut a = h2.websocket("/app/a").await;
    let mut b = h2.websocket("/app/b").await;
    let mut c = h2.websocket("/app/c").await;
    echo_h2(&mut b, Message::text("b")).await;
    drop(b);
    wait_close(&seen, 1001).await;
    a.close(Some(CloseFrame {
        code: CloseCode::from(4003),
        reason: "done".into(),
    }))
    .await
    .unwrap();
    wait_close(&seen, 4003).await;
    echo_h2(&mut c, Message::text("still here")).await;
}

/// A drain closes a relayed WebSocket over HTTP/2 on both sides with 1001, as over HTTP/1.1.
async fn drain_closes_route_websockets_over_h2(backend: Backend) {
    let (addr, seen) = ws_upstream().await;
    let (server, certs) = start_tls(backend, &ws_route(addr, "websocket")).await;
    let mut h2 = H2::tls(server.addr, &certs).await;
    let mut ws = h2.websocket("/app/d").await;
    echo_h2(&mut ws, Message::text("x")).await;
    server.signal(libc::SIGTERM);
    let code = close_code_h2(&mut ws).await;
    assert_eq!(code, Some(1001));
    wait_close(&seen, 1001).await;
}

/// `mode = "tunnel"` over RFC 8441: after the upstream's 101 (to a key of ringgate's own) the
/// stream's bytes are copied as they are, both ways, and the client's end of stream reaches
/// the upstream as a half-close.
async fn tunnel_route_over_h2_is_byte_exact(backend: Backend) {
    let addr = tunnel_upstream().await;
    let (server, certs) = start_tls(backend, &ws_route(addr, "tunnel")).await;
    let mut h2 = H2::tls(server.addr, &certs).await;
    let (resp, stream) = h2.connect_raw("/app/t", &[VERSION_13]).await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().get("sec-websocket-accept").is_none());
    let (mut rd, mut wr) = tokio::io::split(TokioIo::new(stream.expect("stream")));
    let data = pseudo_random(3 << 20, 11);
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        wr.write_all(&sent).await.unwrap();
        wr.shutdown().await.unwrap();
        wr
    });
    let mut got = Vec::new();
    within("echo and total", rd.read_to_end(&mut got))
        .await
        .unwrap();
    let _wr = writer.await.unwrap();
    let mut want = b"early".to_vec();
    want.extend_from_slice(&data);
    want.extend_from_slice(format!("total {}", data.len()).as_bytes());
    assert_eq!(got.len(), want.len());
    assert!(got == want, "bytes differ");
}

async fn many_websockets_one_connection_and_a_slow_reader(backend: Backend) {
    let (server, certs) = start_tls(backend, "").await;
    let mut h2 = H2::tls(server.addr, &certs).await;
    let mut slow = h2.websocket("/ws/echo").await;
    let mut others = Vec::new();
    for _ in 0..50 {
        others.push(h2.websocket("/ws/echo").await);
    }
    // The slow socket is sent far more than its window, never read: its echoes fill its own
    // stream window, the server's send buffer and the session's outbox, then the server stops
    // reading it. The write completes on our side once the client stream window backs up.
    let chunk = Message::binary(vec![9u8; 64 * 1024]);
    let fill = async {
        for _ in 0..64 {
            if slow.send(chunk.clone()).await.is_err() {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(3), fill).await;
    // Every other socket on the connection is unaffected.
    for round in 0..3 {
        for (i, ws) in others.iter_mut().enumerate() {
            echo_h2(ws, Message::text(format!("{round}:{i}"))).await;
        }
    }
    // The slow socket catches up once read: nothing was lost.
    let mut got = 0;
    while got < 4 {
        match next_data_h2(&mut slow).await {
            Message::Binary(b) => {
                assert_eq!(b.len(), 64 * 1024);
                got += 1;
            }
            other => panic!("{other:?}"),
        }
    }
    let (_, _, body) = h2.get("/ws/statistics").await;
    let stats: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(stats["active_connections"], 51, "{stats}");
}

async fn closing_one_stream_leaves_the_others(backend: Backend) {
    let (server, certs) = start_tls(backend, "").await;
    let mut h2 = H2::tls(server.addr, &certs).await;
    let mut a = h2.websocket("/ws/echo").await;
    let b = h2.websocket("/ws/echo").await;
    let mut c = h2.websocket("/ws/echo").await;
    // b goes away without a close handshake (the client resets its stream).
    drop(b);
    // a closes cleanly.
    a.close(None).await.unwrap();
    while let Some(Ok(_)) = within("a closed", a.next()).await {}
    echo_h2(&mut c, Message::text("still here")).await;
    // The server saw both go: only c is left.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let (_, _, body) = h2.get("/ws/statistics").await;
        let stats: serde_json::Value = serde_json::from_slice(&body).unwrap();
        if stats["active_connections"] == 1 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{stats}");
        // The server's view, polled: the reset reaches the session asynchronously.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    echo_h2(&mut c, Message::text("and here")).await;
}

async fn drain_sends_goaway_and_closes_websockets(backend: Backend) {
    let (server, certs) = start_tls(backend, "").await;
    let mut raw = RawH2::open(server.addr, &certs).await;
    let mut h2 = H2::tls(server.addr, &certs).await;
    let mut ws = h2.websocket("/ws/echo").await;
    server.signal(libc::SIGTERM);
    // The WebSocket gets its 1001 over its stream.
    let code = close_code_h2(&mut ws).await;
    assert_eq!(code, Some(1001));
    // An idle connection gets GOAWAY.
    assert_eq!(raw.until_goaway().await, Some(0), "GOAWAY NO_ERROR");
}

/// A client speaking raw HTTP/2 frames over TLS: what no library sends.
struct RawH2 {
    io: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    buf: Vec<u8>,
}

const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;

fn h2_frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, ty, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// `GET /healthz` as an HPACK block (static table entries and literals, no Huffman).
fn get_healthz() -> Vec<u8> {
    let mut b = vec![0x82, 0x87, 0x04, 8];
    b.extend_from_slice(b"/healthz");
    b.extend_from_slice(&[0x01, 9]);
    b.extend_from_slice(b"localhost");
    b
}

impl RawH2 {
    async fn open(addr: SocketAddr, certs: &CertDir) -> RawH2 {
        let mut io = tls(addr, certs, &[b"h2"]).await;
        assert_eq!(io.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
        io.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        io.write_all(&h2_frame(SETTINGS, 0, 0, &[])).await.unwrap();
        io.flush().await.unwrap();
        RawH2 {
            io,
            buf: Vec::new(),
        }
    }

    /// Writes `bytes`; false once the server has closed the connection.
    async fn send(&mut self, bytes: &[u8]) -> bool {
        within("write", async {
            self.io.write_all(bytes).await.is_ok() && self.io.flush().await.is_ok()
        })
        .await
    }

    /// The next frame: (type, flags, stream, payload); `None` at the end of the connection.
    async fn frame(&mut self) -> Option<(u8, u8, u32, Vec<u8>)> {
        loop {
            if self.buf.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                if self.buf.len() >= 9 + len {
                    let f: Vec<u8> = self.buf.drain(..9 + len).collect();
                    let stream = u32::from_be_bytes([f[5], f[6], f[7], f[8]]) & 0x7fff_ffff;
                    return Some((f[3], f[4], stream, f[9..].to_vec()));
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match within("a frame", self.io.read(&mut chunk)).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads frames until GOAWAY (its error code) or the end of the connection (`None`).
    async fn until_goaway(&mut self) -> Option<u32> {
        while let Some((ty, _, _, payload)) = self.frame().await {
            if ty == GOAWAY && payload.len() >= 8 {
                return Some(u32::from_be_bytes([
                    payload[4], payload[5], payload[6], payload[7],
                ]));
            }
        }
        None
    }
}

/// A response whose body knows its end sets END_STREAM on its last DATA frame: no empty DATA
/// frame after the body (one frame, and for the client one wake-up, fewer per response).
async fn a_body_ends_on_its_last_data_frame(backend: Backend) {
    let (server, certs) = start_tls(backend, "").await;
    let mut raw = RawH2::open(server.addr, &certs).await;
    assert!(
        raw.send(&h2_frame(
            HEADERS,
            END_STREAM | END_HEADERS,
            1,
            &get_healthz()
        ))
        .await
    );
    let mut data = Vec::new();
    loop {
        let (ty, flags, stream, payload) = raw.frame().await.expect("the response");
        if stream != 1 {
            continue;
        }
        if ty == DATA {
            data.push((flags, payload.len()));
        }
        if flags & END_STREAM != 0 {
            assert_eq!(ty, DATA, "the stream ends on a DATA frame");
            break;
        }
    }
    assert!(
        data.iter().all(|&(_, len)| len > 0),
        "an empty DATA frame was sent: {data:?}"
    );
    assert!(!data.is_empty());
}

/// CVE-2023-44487: streams opened and reset at once, faster than the server can accept them.
async fn rapid_reset_is_answered_with_goaway(backend: Backend) {
    let (server, certs) = start_tls(backend, "").await;
    let before = rss_kib(&server);
    let mut raw = RawH2::open(server.addr, &certs).await;
    let block = get_healthz();
    let mut stream = 1u32;
    'flood: for _ in 0..100 {
        let mut batch = Vec::new();
        for _ in 0..500 {
            batch.extend(h2_frame(HEADERS, END_STREAM | END_HEADERS, stream, &block));
            batch.extend(h2_frame(RST_STREAM, 0, stream, &8u32.to_be_bytes()));
            stream += 2;
        }
        if !raw.send(&batch).await {
            break 'flood;
        }
    }
    // ENHANCE_YOUR_CALM.
    assert_eq!(raw.until_goaway().await, Some(0xb));
    assert!(
        rss_kib(&server) < before + 32 * 1024,
        "memory grew from {before} KiB"
    );
    let mut h2 = H2::tls(server.addr, &certs).await;
    assert_eq!(h2.get("/healthz").await.0, StatusCode::OK);
}

/// CVE-2024-27316 and kin: a header block that never ends, in CONTINUATION frames.
async fn continuation_flood_is_refused(backend: Backend) {
    let (server, certs) = start_tls(backend, "").await;
    let before = rss_kib(&server);
    let mut raw = RawH2::open(server.addr, &certs).await;
    raw.send(&h2_frame(HEADERS, END_STREAM, 1, &get_healthz()))
        .await;
    // Literal headers `a: b`, never indexed, 16 KiB at a time: up to 64 MiB.
    let field = [0x00, 0x01, b'a', 0x01, b'b'];
    let payload: Vec<u8> = field.iter().copied().cycle().take(16_380).collect();
    let frame = h2_frame(CONTINUATION, 0, 1, &payload);
    let mut sent = 0usize;
    for _ in 0..4096 {
        if !raw.send(&frame).await {
            break;
        }
        sent += frame.len();
    }
    // The connection ends with a GOAWAY long before the flood does.
    let code = raw.until_goaway().await;
    assert!(
        code.is_some_and(|c| c != 0),
        "no GOAWAY with an error: {code:?}"
    );
    assert!(sent < 64 << 20, "the whole flood was accepted");
    assert!(
        rss_kib(&server) < before + 32 * 1024,
        "memory grew from {before} KiB"
    );
    let mut h2 = H2::tls(server.addr, &certs).await;
    assert_eq!(h2.get("/healthz").await.0, StatusCode::OK);
}

/// `[http2] max_concurrent_streams`: a stream past it is refused on its own (RST_STREAM
/// REFUSED_STREAM); the connection and its other streams go on.
async fn streams_over_the_limit_are_refused(backend: Backend) {
    let (server, certs) = start_tls(backend, "[http2]\nmax_concurrent_streams = 2\n").await;
    let mut raw = RawH2::open(server.addr, &certs).await;
    // Wait for the server's SETTINGS (the limit) and acknowledge them.
    loop {
        let (ty, flags, _, _) = raw.frame().await.expect("server SETTINGS");
        if ty == SETTINGS && flags & 1 == 0 {
            raw.send(&h2_frame(SETTINGS, 1, 0, &[])).await;
            break;
        }
    }
    // Three requests whose bodies never end: each keeps its stream open.
    let mut batch = Vec::new();
    for stream in [1, 3, 5] {
        batch.extend(h2_frame(HEADERS, END_HEADERS, stream, &get_healthz()));
    }
    assert!(raw.send(&batch).await);
    let (mut answered, mut refused) = (Vec::new(), Vec::new());
    while answered.len() + refused.len() < 3 {
        match raw.frame().await.expect("connection open") {
            (HEADERS, _, s, _) => answered.push(s),
            (RST_STREAM, _, s, p) => {
                assert_eq!(p, 7u32.to_be_bytes(), "REFUSED_STREAM");
                refused.push(s);
            }
            (GOAWAY, ..) => panic!("GOAWAY for one stream too many"),
            _ => {}
        }
    }
    assert_eq!((answered, refused), (vec![1, 3], vec![5]));
    // Ending one stream makes room for another.
    assert!(raw.send(&h2_frame(DATA, END_STREAM, 1, &[])).await);
    assert!(
        raw.send(&h2_frame(
            HEADERS,
            END_HEADERS | END_STREAM,
            7,
            &get_healthz()
        ))
        .await
    );
    loop {
        match raw.frame().await.expect("connection open") {
            (HEADERS, _, 7, _) => break,
            (RST_STREAM, _, 7, p) => panic!("stream 7 refused: {p:?}"),
            _ => {}
        }
    }
}

/// SETTINGS and PING frames each ask for an answer: a client that floods them without reading
/// the answers gets the server to stop reading (its answers wait), not to queue them without
/// bound.
async fn settings_and_ping_floods_stay_bounded(backend: Backend) {
    let (server, certs) = start_tls(backend, "").await;
    let before = rss_kib(&server);
    for ty in [SETTINGS, PING] {
        let mut raw = RawH2::open(server.addr, &certs).await;
        let payload: &[u8] = if ty == PING { &[7; 8] } else { &[] };
        let frame = h2_frame(ty, 0, 0, payload);
        let batch: Vec<u8> = frame
            .iter()
            .copied()
            .cycle()
            .take(frame.len() * 10_000)
            .collect();
        // Up to 300 batches (27 MB of SETTINGS, 51 MB of PING), stopping when the server stops
        // reading. The bound below is under what a flood this size would cost if the server
        // kept answers or bytes per frame; the io_uring driver's receive overflow and the
        // allocator's retention make a one-time rise of up to ~35 MB that does not grow with
        // the flood (measured: the same with 100 batches and with 300).
        let flood = async {
            for _ in 0..300 {
                if raw.io.write_all(&batch).await.is_err() {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(9), flood).await;
        assert!(
            rss_kib(&server) < before + 48 * 1024,
            "{ty}: memory grew from {before} KiB to {} KiB",
            rss_kib(&server)
        );
        // Others are served meanwhile.
        let mut h2 = H2::tls(server.addr, &certs).await;
        assert_eq!(h2.get("/healthz").await.0, StatusCode::OK);
    }
}

/// A connection that completes TLS and ALPN h2 but sends no request is dropped after
/// `handshake_timeout`, as on HTTP/1.1.
async fn silent_connection_is_dropped(backend: Backend) {
    let (server, certs) = start_tls(backend, "handshake_timeout = 0.5\n").await;
    let mut raw = RawH2::open(server.addr, &certs).await;
    // SETTINGS (and our SETTINGS' ACK), then the end.
    let ended = within("the server drops the connection", async {
        while let Some((ty, ..)) = raw.frame().await {
            // SETTINGS, its ACK, WINDOW_UPDATE, then perhaps GOAWAY.
            assert!(matches!(ty, SETTINGS | 0x8 | GOAWAY), "frame {ty}");
        }
    })
    .await;
    let () = ended;
}

/// `[http2] keep_alive_interval`: the server PINGs a connection; an answered PING keeps it,
/// one left unanswered for `keep_alive_timeout` ends it.
async fn unanswered_keep_alive_ping_closes_the_connection(backend: Backend) {
    let config = "[http2]\nkeep_alive_interval = 0.2\nkeep_alive_timeout = 0.3\n";
    let (server, certs) = start_tls(backend, config).await;
    let mut raw = RawH2::open(server.addr, &certs).await;
    let get = h2_frame(HEADERS, END_STREAM | END_HEADERS, 1, &get_healthz());
    assert!(raw.send(&get).await);
    let mut pings = 0;
    let ended = within("the server ends the connection", async {
        loop {
            match raw.frame().await {
                // The first PING is answered, the second is not.
                Some((PING, 0, 0, payload)) => {
                    pings += 1;
                    if pings == 1 {
                        assert!(raw.send(&h2_frame(PING, 1, 0, &payload)).await);
                    }
                }
                Some((GOAWAY, ..)) | None => break,
                Some(_) => {}
            }
        }
    })
    .await;
    let () = ended;
    // A second PING came: the answered one kept the connection past its timeout.
    assert_eq!(pings, 2, "PINGs before the end");
    let mut h2 = H2::tls(server.addr, &certs).await;
    assert_eq!(h2.get("/healthz").await.0, StatusCode::OK);
}

/// One series of `/metrics`, scraped over `h2`.
async fn metric_h2(h2: &mut H2, series: &str) -> f64 {
    let (_, _, body) = h2.get("/metrics").await;
    let body = String::from_utf8_lossy(&body);
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{body}"))
}

/// Waits until the server has `n` echo sessions running (the gauge rises as each starts).
async fn wait_echo_sessions(h2: &mut H2, n: usize) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let series = "ringgate_connections_active{endpoint=\"echo\"}";
    while metric_h2(h2, series).await != n as f64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} sessions never ran"
        );
        tokio::task::yield_now().await;
    }
}

/// Sockets per measurement in `idle_websockets_on_one_connection_hold_little_heap`.
const H2_SOCKETS: usize = 100;
/// A socket's own heap (its task, session, registration and its stream in h2's table) in a
/// debug build: about 1.1 KB since the session writes into h2's `SendStream` itself (1.7 KB
/// through hyper's upgraded stream, its task and channels), with headroom.
const H2_SOCKET_BUDGET: f64 = 1536.0;
/// With its share of the connection (about 2.2 KB fresh, 2.9 KB after one echo each: h2 keeps
/// its frame queues sized for the 100 echoes in flight at once), an HTTP/2 WebSocket holds at
/// most this part of one on its own TLS connection (about 0.45 and 0.6 of its 5.1 KB).
const H2_SHARE_OF_WSS: f64 = 0.75;

/// Heap held now, from the debug build's allocation count.
async fn heap_h2(h2: &mut H2) -> f64 {
    metric_h2(h2, "ringgate_debug_heap_bytes").await
}

/// `n` WebSockets on `/ws/echo` over one HTTP/2 connection.
async fn h2_websockets(h2: &mut H2, n: usize) -> Vec<WsH2> {
    let mut sockets = Vec::with_capacity(n);
    for _ in 0..n {
        sockets.push(h2.websocket("/ws/echo").await);
    }
    sockets
}

/// What an idle WebSocket over HTTP/2 costs when `H2_SOCKETS` share one connection: the heap
/// the server holds per socket (the debug build's allocation count, as in
/// tests/idle_memory.rs), fresh and after one echo each. Part of it is the connection's: h2's
/// stream table and frame queues grow to the most streams and frames it has had at once and
/// keep that size, so what a socket holds of its own is measured by closing the sockets and
/// opening as many again on the same connection (which also shows nothing accumulates). With
/// the connection's share counted in, a socket holds less than a WebSocket on its own TLS
/// connection (HTTP/1.1): about 3 KB against 5 KB.
async fn idle_websockets_on_one_connection_hold_little_heap(backend: Backend) {
    let (server, certs) = start_tls(backend, "").await;
    let mut admin = H2::tls(server.addr, &certs).await;
    // The first sockets size the shard's tables and the runtime's lists: not per socket, so
    // they are opened (and their connection closed) before the baseline.
    {
        let mut warm = H2::tls(server.addr, &certs).await;
        let _sockets = h2_websockets(&mut warm, H2_SOCKETS).await;
        wait_echo_sessions(&mut admin, H2_SOCKETS).await;
    }
    wait_echo_sessions(&mut admin, 0).await;
    let mut h2 = H2::tls(server.addr, &certs).await;
    let before = heap_h2(&mut admin).await;
    let per_socket = |heap: f64| (heap - before) / H2_SOCKETS as f64;

    let mut sockets = h2_websockets(&mut h2, H2_SOCKETS).await;
    wait_echo_sessions(&mut admin, H2_SOCKETS).await;
    let fresh = per_socket(heap_h2(&mut admin).await);
    // One message each way on every socket, all in flight at once.
    for ws in &mut sockets {
        ws.send(Message::text("hello")).await.expect("send");
    }
    for ws in &mut sockets {
        assert_eq!(next_data_h2(ws).await, Message::text("hello"));
    }
    let touched = per_socket(heap_h2(&mut admin).await);
    // Closed, and as many opened again on the same connection: what the first ones left
    // behind (h2's stream tables keep their size) is reused, nothing accumulates.
    for ws in &mut sockets {
        ws.close(None).await.expect("close");
    }
    drop(sockets);
    wait_echo_sessions(&mut admin, 0).await;
    let closed = per_socket(heap_h2(&mut admin).await);
    let again = h2_websockets(&mut h2, H2_SOCKETS).await;
    wait_echo_sessions(&mut admin, H2_SOCKETS).await;
    let reopened = per_socket(heap_h2(&mut admin).await);
    drop(again);
    drop(h2);
    wait_echo_sessions(&mut admin, 0).await;

    // The same over HTTP/1.1: a TLS connection per WebSocket.
    let before_h1 = heap_h2(&mut admin).await;
    let mut h1 = Vec::with_capacity(H2_SOCKETS);
    for _ in 0..H2_SOCKETS {
        let io = tls(server.addr, &certs, &[b"http/1.1"]).await;
        let (ws, _) = within(
            "wss handshake",
            tokio_tungstenite::client_async("wss://localhost/ws/echo", io),
        )
        .await
        .expect("wss handshake");
        h1.push(ws);
    }
    wait_echo_sessions(&mut admin, H2_SOCKETS).await;
    let per_h1 = (heap_h2(&mut admin).await - before_h1) / H2_SOCKETS as f64;
    eprintln!(
        "heap per idle WebSocket ({backend:?}): HTTP/2 {fresh:.0} B fresh, {touched:.0} B after \
         a message, {closed:.0} B left per closed one, {reopened:.0} B reopened; HTTP/1.1 over \
         its own TLS connection {per_h1:.0} B"
    );
    // Each socket's own share: what a socket adds once the connection's tables are sized.
    let own = reopened - closed;
    assert!(
        own <= H2_SOCKET_BUDGET,
        "an idle HTTP/2 WebSocket holds {own:.0} B of its own (budget {H2_SOCKET_BUDGET} B)"
    );
    assert!(
        reopened <= touched + 64.0,
        "sockets reopened on the same connection hold {reopened:.0} B each, the first {touched:.0} B"
    );
    // With the connection's tables counted in, well under a WebSocket on its own connection.
    for (what, per) in [("fresh", fresh), ("after a message", touched)] {
        assert!(
            per < H2_SHARE_OF_WSS * per_h1,
            "an HTTP/2 WebSocket ({what}) holds {per:.0} B, one on its own TLS connection {per_h1:.0} B"
        );
    }
}

/// `[limits]`: each WebSocket over HTTP/2 counts as a connection of its client's address, as
/// it would on a socket of its own (the HTTP/2 connection is one too), whether it goes to an
/// endpoint or through a route. One over the cap is answered 429 on its stream; the
/// connection, its requests and its other sockets carry on; a closed socket gives its place
/// back.
async fn websockets_count_against_the_per_address_cap(backend: Backend) {
    let (addr, _seen) = ws_upstream().await;
    let limits = "[limits]\nexempt = []\nper_ip_connections = 3\nper_ip_handshake_rate = 0\n";
    let config = format!("{}\n{limits}", ws_route(addr, "websocket"));
    let (server, certs) = start_tls(backend, &config).await;
    let mut h2 = H2::tls(server.addr, &certs).await;
    let mut echo = h2.websocket("/ws/echo").await;
    let mut routed = h2.websocket("/app/a").await;
    for path in ["/ws/echo", "/app/b"] {
        let (resp, ws) = h2.connect(path, &[VERSION_13]).await;
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS, "{path}");
        assert_eq!(resp.headers()["retry-after"], "1");
        assert!(ws.is_none());
    }
    assert_eq!(h2.get("/healthz").await.0, StatusCode::OK);
    echo_h2(&mut echo, Message::text("still here")).await;
    echo_h2(&mut routed, Message::text("and here")).await;
    let refused = "ringgate_connections_refused_total{reason=\"per_ip\"}";
    assert_eq!(metric_h2(&mut h2, refused).await, 2.0);

    // The echo socket closes: its place is given again (the session ends asynchronously).
    echo.close(None).await.expect("close");
    while let Some(Ok(_)) = within("echo closed", echo.next()).await {}
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let mut again = loop {
        let (resp, ws) = h2.connect("/app/c", &[VERSION_13]).await;
        if let Some(ws) = ws {
            break ws;
        }
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert!(
            tokio::time::Instant::now() < deadline,
            "place never given back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    echo_h2(&mut again, Message::text("in its place")).await;
    echo_h2(&mut routed, Message::text("unmoved")).await;
}
