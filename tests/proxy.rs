//! The reverse proxy (`[[route]]`): the real binary in front of real upstreams started here
//! (hyper HTTP/1.1 and h2 servers, tokio-tungstenite WebSocket servers, raw TCP peers), on
//! both io backends.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::upstreams::*;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::Method;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Body, Frame, Incoming};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

both_backends!(
    minimal_route_strips_prefix,
    routes_by_host_and_methods,
    forwarded_and_hop_by_hop_headers,
    trusted_proxy_headers_are_appended,
    streaming_bodies_both_ways,
    chunked_upload_trailers_and_expect_continue,
    h2_upstream,
    refused_upstream_is_502,
    malformed_upstream_is_502,
    slow_upstream_is_504,
    ejected_upstreams_give_503,
    body_over_limit_is_413,
    huge_head_is_431,
    client_disconnect_aborts_upstream,
    retry_on_connect_failure,
    sticky_cookie_hash,
    round_robin_spreads,
    health_check_ejects_and_restores,
    websocket_through_route,
    websocket_close_codes_both_ways,
    websocket_upstream_refusal_is_passed_on,
    websocket_dead_upstream_is_502,
    tunnel_is_byte_exact_with_half_close,
    wss_termination_in_front_of_ws_app,
    sighup_reloads_routes,
    drain_finishes_requests_in_flight,
    relay_close_codes_both_ways,
    relay_upstream_gone_gives_1011,
    relay_client_gone_gives_upstream_1001,
    relay_drain_closes_both_with_1001,
    relay_deflate_at_the_edge_only,
    relay_backpressure_stalled_upstream_reader,
    relay_backpressure_stalled_client_reader,
    https_upstream_h2_by_alpn,
    wss_upstream_relayed,
    metrics_per_route,
    sighup_with_a_broken_file_keeps_routes,
    stale_pooled_connection_is_replaced,
    stale_pooled_connection_takes_a_post,
    pooled_connection_is_reused_after_streamed_bodies,
    early_answer_lets_the_upload_finish,
    least_connections_avoids_the_busy_upstream,
    total_timeout_cuts_a_long_response,
    ipv6_upstream,
    every_response_framing_byte_by_byte,
    upstream_closing_mid_body_truncates,
    oversized_response_head_is_502,
    uploads_arrive_byte_exact,
    upload_to_a_stalled_upstream_is_bounded,
);

// ---- an HTTP upstream ------------------------------------------------------------------------

type RespBody = BoxBody<Bytes, Infallible>;

#[derive(Default)]
struct Seen {
    requests: Mutex<Vec<(String, http::Version, http::HeaderMap)>>,
    /// Response bodies dropped before their end (the proxy went away).
    aborted: AtomicUsize,
    /// Request bodies that ended in an error (the proxy went away mid-upload).
    upload_errors: AtomicUsize,
    healthy: AtomicBool,
    /// `/gate` answers once this is notified.
    gate: tokio::sync::Notify,
    /// Connections accepted.
    accepted: AtomicUsize,
}

struct HttpUp {
    addr: SocketAddr,
    seen: Arc<Seen>,
}

impl HttpUp {
    /// Paths: `/big?N` streams N bytes; `/upload` answers the body's length and sum;
    /// `/digest` its length and FNV-1a hash (which the bytes' order changes);
    /// `/hang` never answers; `/endless` streams forever; `/trailers` sends a trailer;
    /// `/health` answers 200 or 503 by `healthy`; anything else echoes what it saw as
    /// `name path?query`.
    async fn start(name: &'static str) -> HttpUp {
        HttpUp::start_tls(name, None).await
    }

    async fn start_tls(name: &'static str, tls: Option<tokio_rustls::TlsAcceptor>) -> HttpUp {
        HttpUp::start_on("127.0.0.1:0", name, tls).await
    }

    async fn start_on(
        bind: &str,
        name: &'static str,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> HttpUp {
        let listener = TcpListener::bind(bind).await.expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Seen {
            healthy: AtomicBool::new(true),
            ..Seen::default()
        });
        let s = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                s.accepted.fetch_add(1, Ordering::SeqCst);
                let s = s.clone();
                let tls = tls.clone();
                let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let s = s.clone();
                    async move { Ok::<_, Infallible>(serve(name, req, s).await) }
                });
                tokio::spawn(async move {
                    let builder = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    let _ = match tls {
                        None => {
                            builder
                                .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                                .await
                        }
                        Some(a) => {
                            let Ok(t) = a.accept(sock).await else { return };
                            builder
                                .serve_connection(hyper_util::rt::TokioIo::new(t), svc)
                                .await
                        }
                    };
                });
            }
        });
        HttpUp { addr, seen }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> Vec<(String, http::Version, http::HeaderMap)> {
        self.seen.requests.lock().unwrap().clone()
    }
}

async fn serve(name: &str, req: http::Request<Incoming>, s: Arc<Seen>) -> http::Response<RespBody> {
    let pq = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    s.requests
        .lock()
        .unwrap()
        .push((pq.clone(), req.version(), req.headers().clone()));
    let path = req.uri().path().to_string();
    let ok = |body: String| {
        http::Response::builder()
            .header("x-upstream", name)
            .body(Full::new(Bytes::from(body)).boxed())
            .unwrap()
    };
    match path.as_str() {
        "/big" => {
            let n: usize = req.uri().query().and_then(|q| q.parse().ok()).unwrap_or(0);
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let parts = n.div_ceil(chunk.len());
            let stream = futures_util::stream::iter((0..parts).map(move |i| {
                let len = if i + 1 == parts {
                    n - i * chunk.len()
                } else {
                    chunk.len()
                };
                Ok::<_, Infallible>(Frame::data(chunk.slice(..len)))
            }));
            http::Response::builder()
                .header("content-length", n)
                .body(BodyExt::boxed(StreamBody::new(stream)))
                .unwrap()
        }
        "/upload" => {
            let mut body = req.into_body();
            let (mut len, mut sum, mut trailer) = (0u64, 0u64, String::new());
            loop {
                match body.frame().await {
                    None => break,
                    Some(Ok(f)) => {
                        if let Some(d) = f.data_ref() {
                            len += d.len() as u64;
                            sum = d.iter().fold(sum, |a, &b| a.wrapping_add(b as u64));
                        }
                        if let Some(t) = f.trailers_ref() {
                            trailer = t
                                .get("x-checksum")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or("")
                                .into();
                        }
                    }
                    Some(Err(_)) => {
                        s.upload_errors.fetch_add(1, Ordering::SeqCst);
                        return ok("error".into());
                    }
                }
            }
            ok(format!("{len} {sum} {trailer}"))
        }
        "/digest" => {
            let mut body = req.into_body();
            let (mut len, mut hash) = (0usize, FNV_BASIS);
            while let Some(f) = body.frame().await {
                let Ok(f) = f else {
                    s.upload_errors.fetch_add(1, Ordering::SeqCst);
                    return ok("error".into());
                };
                if let Some(d) = f.data_ref() {
                    len += d.len();
                    hash = fnv1a(hash, d);
                }
            }
            ok(format!("{len} {hash:016x}"))
        }
        "/gate" => {
            s.gate.notified().await;
            ok("through the gate".into())
        }
        "/hang" => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        "/endless" => {
            let body = Endless { aborted: s.clone() };
            http::Response::builder().body(body.boxed()).unwrap()
        }
        "/trailers" => {
            let mut t = http::HeaderMap::new();
            t.insert("x-trailer", "done".parse().unwrap());
            let frames = vec![
                Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"body"))),
                Ok(Frame::trailers(t)),
            ];
            http::Response::builder()
                .header("trailer", "x-trailer")
                .body(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(
                    frames,
                ))))
                .unwrap()
        }
        "/health" => {
            let status = if s.healthy.load(Ordering::SeqCst) {
                200
            } else {
                503
            };
            http::Response::builder()
                .status(status)
                .body(Full::new(Bytes::new()).boxed())
                .unwrap()
        }
        _ => {
            let mut r = ok(format!("{name} {pq}"));
            r.headers_mut()
                .insert("connection", "x-hop".parse().unwrap());
            r.headers_mut().insert("x-hop", "1".parse().unwrap());
            r.headers_mut()
                .insert("x-secret-resp", "1".parse().unwrap());
            r
        }
    }
}

const FNV_BASIS: u64 = 0xcbf2_9ce4_8422_2325;

fn fnv1a(hash: u64, bytes: &[u8]) -> u64 {
    bytes.iter().fold(hash, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// A body that never ends; counts being dropped.
struct Endless {
    aborted: Arc<Seen>,
}

impl Body for Endless {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(vec![b'e'; 16 * 1024])))))
    }
}

impl Drop for Endless {
    fn drop(&mut self) {
        self.aborted.aborted.fetch_add(1, Ordering::SeqCst);
    }
}

/// A port with nothing listening.
async fn dead_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr")
}

fn route(extra: &str, upstreams: &[String]) -> String {
    let list: Vec<String> = upstreams.iter().map(|u| format!("{u:?}")).collect();
    format!("[[route]]\nupstreams = [{}]\n{extra}\n", list.join(", "))
}

/// `GET path` with extra header lines on a fresh connection.
async fn get(server: &Server, path: &str, extra: &str) -> HttpResponse {
    server
        .request(&format!(
            "GET {path} HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n{extra}\r\n"
        ))
        .await
}

/// A hyper HTTP/1.1 client connection to the server.
async fn client(
    server: &Server,
) -> hyper::client::conn::http1::SendRequest<BoxBody<Bytes, std::io::Error>> {
    let s = server.tcp().await;
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(s))
        .await
        .expect("client handshake");
    tokio::spawn(conn);
    sender
}

// ---- routing ---------------------------------------------------------------------------------

/// The minimal form, exactly as documented: `/app/x` reaches the upstream as `/x`; the
/// built-in endpoints stay; paths no route takes are 404.
async fn minimal_route_strips_prefix(backend: Backend) {
    let up = HttpUp::start("a").await;
    let config = format!(
        "[[route]]\npath_prefix = \"/app/\"\nupstreams = [\"http://{}\"]   # plain and ws alike\nstrip_prefix = true                      # /app/x reaches the upstream as /x\n",
        up.addr
    );
    let server = Server::start_with_config(backend, &config, &[]);
    let r = get(&server, "/app/x/y?q=1", "").await;
    assert_eq!((r.status, r.body.as_str()), (200, "a /x/y?q=1"), "{r:?}");
    assert_eq!(r.header("x-upstream"), Some("a"));
    // The prefix itself keeps its slash: the upstream's root.
    let r = get(&server, "/app/", "").await;
    assert_eq!((r.status, r.body.as_str()), (200, "a /"), "{r:?}");
    assert_eq!(get(&server, "/healthz", "").await.body, "ok\n");
    assert_eq!(get(&server, "/other", "").await.status, 404);
    // A `ws://` URL means the same as `http://`.
    let config = route("path_prefix = \"/\"", &[format!("ws://{}", up.addr)]);
    let server = Server::start_with_config(backend, &config, &[]);
    let r = get(&server, "/x", "").await;
    assert_eq!((r.status, r.body.as_str()), (200, "a /x"));
}

async fn routes_by_host_and_methods(backend: Backend) {
    let (a, b, c) = (
        HttpUp::start("a").await,
        HttpUp::start("b").await,
        HttpUp::start("c").await,
    );
    let config = format!(
        "{}{}{}",
        route("host = \"*.example.com\"", &[a.url()]),
        route("host = \"api.example.com\"", &[b.url()]),
        route(
            "host = \"api.example.com\"\nmethods = [\"POST\"]",
            &[c.url()]
        ),
    );
    let server = Server::start_with_config(backend, &config, &[]);
    let req = |method: &str, host: &str| {
        format!("{method} /p HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
    };
    assert_eq!(
        server.request(&req("GET", "www.example.com")).await.body,
        "a /p"
    );
    assert_eq!(
        server
            .request(&req("GET", "API.example.com:8003"))
            .await
            .body,
        "b /p"
    );
    assert_eq!(
        server.request(&req("POST", "api.example.com")).await.body,
        "c /p"
    );
    assert_eq!(server.request(&req("GET", "example.com")).await.status, 404);
}

// ---- headers ---------------------------------------------------------------------------------

async fn forwarded_and_hop_by_hop_headers(backend: Backend) {
    let up = HttpUp::start("a").await;
    let config = route(
        "[route.request_headers]\nset = { \"x-added\" = \"yes\" }\nremove = [\"x-drop\"]\n[route.response_headers]\nremove = [\"x-secret-resp\"]\nset = { \"x-served-by\" = \"ringgate\" }",
        &[up.url()],
    );
    let server = Server::start_with_config(backend, &config, &[]);
    let r = get(
        &server,
        "/h",
        "Connection: x-private\r\nX-Private: 1\r\nKeep-Alive: timeout=5\r\nX-Forwarded-For: 6.6.6.6\r\nForwarded: for=6.6.6.6\r\nX-Drop: 1\r\nX-Request-Id: req-123\r\n",
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("x-hop"),
        None,
        "hop-by-hop response header passed: {r:?}"
    );
    assert_eq!(r.header("x-secret-resp"), None);
    assert_eq!(r.header("x-served-by"), Some("ringgate"));
    let (_, _, h) = up.requests().pop().expect("a request");
    for gone in ["x-private", "keep-alive", "x-drop"] {
        assert!(!h.contains_key(gone), "{gone} reached the upstream: {h:?}");
    }
    assert_eq!(h["x-added"], "yes");
    // Not from a trusted proxy: replaced, not appended.
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "app.test");
    assert_eq!(h["forwarded"], "for=127.0.0.1;proto=http;host=\"app.test\"");
    assert_eq!(h["x-request-id"], "req-123");
    assert_eq!(h["host"], up.addr.to_string().as_str());
    // Without one, a request id is made up.
    get(&server, "/h", "").await;
    let (_, _, h) = up.requests().pop().expect("a request");
    assert_eq!(h["x-request-id"].len(), 32);
    within("the access log line", async {
        while !server.log().contains("request_id=req-123") {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let line = server
        .log()
        .lines()
        .find(|l| l.contains("request_id=req-123"))
        .unwrap_or_default()
        .to_string();
    for field in [
        "route=route#1",
        "status=200",
        "head_ms=",
        "duration_ms=",
        "bytes_out=",
        "complete=true",
    ] {
        assert!(line.contains(field), "{field} missing: {line}");
    }
}

async fn trusted_proxy_headers_are_appended(backend: Backend) {
    let up = HttpUp::start("a").await;
    let config = route(
        "trusted_proxies = [\"127.0.0.0/8\"]\npreserve_host = true",
        &[up.url()],
    );
    let server = Server::start_with_config(backend, &config, &[]);
    get(
        &server,
        "/h",
        "X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nForwarded: for=6.6.6.6\r\n",
    )
    .await;
    let (_, _, h) = up.requests().pop().expect("a request");
    assert_eq!(h["x-forwarded-for"], "6.6.6.6, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "https");
    assert_eq!(
        h["forwarded"],
        "for=6.6.6.6, for=127.0.0.1;proto=http;host=\"app.test\""
    );
    assert_eq!(h["host"], "app.test");
}

// ---- bodies ----------------------------------------------------------------------------------

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// 256 MiB each way, far above any buffer: the server's memory stays flat.
async fn streaming_bodies_both_ways(backend: Backend) {
    const N: usize = 256 << 20;
    let up = HttpUp::start("a").await;
    let server = Server::start_with_config(backend, &route("", &[up.url()]), &[]);
    let before = rss_kib(server.pid());
    let mut c = client(&server).await;
    let req = http::Request::get("/big?268435456")
        .header("host", "t")
        .body(BoxBody::new(
            http_body_util::Empty::new().map_err(|e| match e {}),
        ))
        .unwrap();
    let resp = c.send_request(req).await.expect("download");
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = 0usize;
    let mut peak = 0;
    while let Some(f) = body.frame().await {
        got += f.expect("body frame").data_ref().map_or(0, |d| d.len());
        if got % (32 << 20) < 64 * 1024 {
            peak = peak.max(rss_kib(server.pid()));
        }
    }
    assert_eq!(got, N);
    // Upload, streamed in 64 KiB pieces (chunked).
    let chunk = Bytes::from(vec![7u8; 64 * 1024]);
    let stream = futures_util::stream::iter(
        (0..N / chunk.len()).map(move |_| Ok::<_, std::io::Error>(Frame::data(chunk.clone()))),
    );
    let req = http::Request::post("/upload")
        .header("host", "t")
        .body(BoxBody::new(StreamBody::new(stream)))
        .unwrap();
    let resp = c.send_request(req).await.expect("upload");
    let text = String::from_utf8(
        resp.into_body()
            .collect()
            .await
            .expect("answer")
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert_eq!(text.trim(), format!("{N} {}", 7 * N as u64));
    peak = peak.max(rss_kib(server.pid()));
    assert!(
        peak < before + 64 * 1024,
        "server RSS grew from {before} KiB to {peak} KiB"
    );
}

async fn chunked_upload_trailers_and_expect_continue(backend: Backend) {
    let up = HttpUp::start("a").await;
    let server = Server::start_with_config(backend, &route("", &[up.url()]), &[]);
    // Chunked with a trailer.
    let r = server
        .request("POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nTrailer: x-checksum\r\nConnection: close\r\n\r\n3\r\nabc\r\n0\r\nx-checksum: 42\r\n\r\n")
        .await;
    assert_eq!((r.status, r.body.as_str()), (200, "3 294 42"), "{r:?}");
    // Expect: 100-continue: the 100 comes, then the body goes through.
    let mut s = server.tcp().await;
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 64];
    let n = within("100 Continue", s.read(&mut buf)).await.unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 100"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    s.write_all(b"hello").await.unwrap();
    let r = read_response(&mut s).await;
    assert_eq!((r.status, r.body.as_str()), (200, "5 532 "));
    // Trailers from the upstream reach an HTTP/1.1 client that takes them.
    let mut c = client(&server).await;
    let req = http::Request::get("/trailers")
        .header("host", "t")
        .header("te", "trailers")
        .body(BoxBody::new(
            http_body_util::Empty::new().map_err(|e| match e {}),
        ))
        .unwrap();
    let resp = c.send_request(req).await.expect("trailers");
    let body = resp.into_body().collect().await.expect("body");
    let trailers = body.trailers().cloned().expect("trailers arrived");
    assert_eq!(trailers["x-trailer"], "done");
    assert_eq!(&body.to_bytes()[..], b"body");
}

async fn h2_upstream(backend: Backend) {
    let up = HttpUp::start("a").await;
    let server = Server::start_with_config(
        backend,
        &route("http2 = \"prior_knowledge\"", &[up.url()]),
        &[],
    );
    for _ in 0..3 {
        let r = get(&server, "/two", "").await;
        assert_eq!((r.status, r.body.as_str()), (200, "a /two"));
    }
    let reqs = up.requests();
    assert!(
        reqs.iter().all(|(_, v, _)| *v == http::Version::HTTP_2),
        "{:?}",
        reqs.iter().map(|r| r.1).collect::<Vec<_>>()
    );
}

// ---- errors ----------------------------------------------------------------------------------

async fn refused_upstream_is_502(backend: Backend) {
    let dead = dead_port().await;
    let server = Server::start_with_config(backend, &route("", &[format!("http://{dead}")]), &[]);
    let r = get(&server, "/x", "").await;
    assert_eq!(r.status, 502, "{r:?}");
    assert!(r.body.contains("cannot connect"), "{:?}", r.body);
}

fn not_http(_: &str) -> (Vec<u8>, bool) {
    (b"NOT HTTP AT ALL\r\n\r\n".to_vec(), false)
}

async fn malformed_upstream_is_502(backend: Backend) {
    raw_upstream_is_502(backend, not_http, "malformed").await
}

/// An upstream that answers every request with `answer` is answered 502, naming `cause`.
async fn raw_upstream_is_502(backend: Backend, answer: fn(&str) -> (Vec<u8>, bool), cause: &str) {
    let (addr, _) = raw_upstream(answer, false).await;
    let server = Server::start_with_config(
        backend,
        &route("retries = 0", &[format!("http://{addr}")]),
        &[],
    );
    let r = get(&server, "/x", "").await;
    assert_eq!(r.status, 502, "{r:?}");
    assert!(r.body.contains(cause), "{:?}", r.body);
}

async fn slow_upstream_is_504(backend: Backend) {
    let up = HttpUp::start("a").await;
    let server = Server::start_with_config(
        backend,
        &route("response_timeout = 0.3\nretries = 0", &[up.url()]),
        &[],
    );
    let r = get(&server, "/hang", "").await;
    assert_eq!(r.status, 504, "{r:?}");
    assert!(r.body.contains("did not answer"), "{:?}", r.body);
}

async fn ejected_upstreams_give_503(backend: Backend) {
    let dead = dead_port().await;
    let config = route(
        "eject_after = 1\neject_duration = 60\nretries = 0",
        &[format!("http://{dead}")],
    );
    // One shard: ejection is per shard.
    let server = Server::start_sharded(backend, 1, &config, &[]);
    assert_eq!(get(&server, "/x", "").await.status, 502);
    let r = get(&server, "/x", "").await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.body.contains("no healthy upstream"), "{:?}", r.body);
}

async fn body_over_limit_is_413(backend: Backend) {
    let up = HttpUp::start("a").await;
    let server = Server::start_with_config(backend, &route("max_body_size = 10", &[up.url()]), &[]);
    let r = server.request("POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\nConnection: close\r\n\r\n01234567890").await;
    assert_eq!(r.status, 413, "{r:?}");
    // Chunked: found out while streaming.
    let r = server
        .request("POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n8\r\n01234567\r\n8\r\n01234567\r\n0\r\n\r\n")
        .await;
    assert_eq!(r.status, 413, "{r:?}");
    assert!(r.body.contains("limit"));
    let r = server
        .request(
            "POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc",
        )
        .await;
    assert_eq!(r.status, 200);
}

async fn huge_head_is_431(backend: Backend) {
    let up = HttpUp::start("a").await;
    let server = Server::start_with_config(backend, &route("", &[up.url()]), &[]);
    let big = "a".repeat(100 * 1024);
    let r = get(&server, "/x", &format!("X-Big: {big}\r\n")).await;
    assert_eq!(r.status, 431, "{r:?}");
    assert!(up.requests().is_empty());
}

async fn client_disconnect_aborts_upstream(backend: Backend) {
    let up = HttpUp::start("a").await;
    let server = Server::start_with_config(backend, &route("", &[up.url()]), &[]);
    // Mid-download.
    let mut s = server.tcp().await;
    s.write_all(b"GET /endless HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let n = within("first bytes", s.read(&mut buf)).await.unwrap();
    assert!(n > 0);
    drop(s);
    within("upstream body dropped", async {
        while up.seen.aborted.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // Mid-upload.
    let mut s = server.tcp().await;
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 1000000\r\n\r\npartial")
        .await
        .unwrap();
    within("upload reached upstream", async {
        while up.requests().iter().all(|(p, _, _)| p != "/upload") {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    drop(s);
    within("upstream upload aborted", async {
        while up.seen.upload_errors.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

// ---- balancing, retries, health -------------------------------------------------------------

async fn retry_on_connect_failure(backend: Backend) {
    let up = HttpUp::start("a").await;
    let dead = dead_port().await;
    let config = route(
        "retries = 1\neject_after = 100",
        &[format!("http://{dead}"), up.url()],
    );
    let server = Server::start_with_config(backend, &config, &[]);
    for _ in 0..6 {
        let r = get(&server, "/x", "").await;
        assert_eq!((r.status, r.body.as_str()), (200, "a /x"));
    }
}

async fn sticky_cookie_hash(backend: Backend) {
    let (a, b, c) = (
        HttpUp::start("a").await,
        HttpUp::start("b").await,
        HttpUp::start("c").await,
    );
    let config = route(
        "balance = \"hash\"\nhash_key = \"cookie:sid\"",
        &[a.url(), b.url(), c.url()],
    );
    let server = Server::start_with_config(backend, &config, &[]);
    let mut used = std::collections::HashSet::new();
    for user in 0..12 {
        let cookie = format!("Cookie: theme=dark; sid=user{user}\r\n");
        let first = get(&server, "/s", &cookie).await.body;
        // Fresh connections (any shard) keep the user on one upstream.
        for _ in 0..4 {
            assert_eq!(
                get(&server, "/s", &cookie).await.body,
                first,
                "user{user} moved"
            );
        }
        used.insert(first);
    }
    assert!(used.len() >= 2, "every user on one upstream: {used:?}");
}

async fn round_robin_spreads(backend: Backend) {
    let (a, b) = (HttpUp::start("a").await, HttpUp::start("b").await);
    let server = Server::start_sharded(backend, 1, &route("", &[a.url(), b.url()]), &[]);
    let mut bodies = Vec::new();
    for _ in 0..4 {
        bodies.push(get(&server, "/r", "").await.body);
    }
    assert_eq!(
        bodies.iter().filter(|b| *b == "a /r").count(),
        2,
        "{bodies:?}"
    );
}

async fn health_check_ejects_and_restores(backend: Backend) {
    let (a, b) = (HttpUp::start("a").await, HttpUp::start("b").await);
    let config = route(
        "[route.health_check]\npath = \"/health\"\ninterval = 0.1\ntimeout = 1\nhealthy_threshold = 2\nunhealthy_threshold = 2",
        &[a.url(), b.url()],
    );
    let server = Server::start_with_config(backend, &config, &[]);
    a.seen.healthy.store(false, Ordering::SeqCst);
    // Once every shard took `a` out, ten requests in a row go to `b`.
    within("a taken out", async {
        loop {
            let mut all_b = true;
            for _ in 0..10 {
                all_b &= get(&server, "/h", "").await.body == "b /h";
            }
            if all_b {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    a.seen.healthy.store(true, Ordering::SeqCst);
    within("a back", async {
        while get(&server, "/h", "").await.body != "a /h" {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(server.log().contains("failed its health check"));
}

// ---- WebSocket ------------------------------------------------------------------------------

async fn ws_connect(
    server: &Server,
    path: &str,
    protocols: Option<&str>,
) -> (Ws, http::Response<Option<Vec<u8>>>) {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = server.url(path).into_client_request().unwrap();
    if let Some(p) = protocols {
        req.headers_mut()
            .insert("sec-websocket-protocol", p.parse().unwrap());
    }
    within("ws connect", tokio_tungstenite::connect_async(req))
        .await
        .expect("handshake through the proxy")
}

async fn websocket_through_route(backend: Backend) {
    let (addr, seen) = ws_upstream().await;
    // The minimal form: no mode, a plain URL, strip_prefix.
    let config = format!("[[route]]\npath_prefix = \"/app/\"\nupstreams = [\"http://{addr}\"]\nstrip_prefix = true\n");
    let server = Server::start_with_config(backend, &config, &[]);
    let (mut ws, resp) = ws_connect(&server, "/app/chat?room=1", Some("superchat, chat")).await;
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap()),
        Some("superchat")
    );
    assert_eq!(seen.paths.lock().unwrap().as_slice(), ["/chat?room=1"]);
    echo(&mut ws, Message::text("hello")).await;
    let big = pseudo_random(1 << 20, 7);
    echo(&mut ws, Message::binary(big)).await;
    // Without a subprotocol offered, none comes back.
    let (mut ws2, resp) = ws_connect(&server, "/app/x", None).await;
    assert!(resp.headers().get("sec-websocket-protocol").is_none());
    echo(&mut ws2, Message::text("two")).await;
}

async fn websocket_close_codes_both_ways(backend: Backend) {
    let (addr, seen) = ws_upstream().await;
    let server = Server::start_with_config(
        backend,
        &route("mode = \"tunnel\"", &[format!("ws://{addr}")]),
        &[],
    );
    let (mut ws, _) = ws_connect(&server, "/a", None).await;
    ws.send(Message::text("close:4001")).await.unwrap();
    assert_eq!(expect_close(&mut ws).await, CloseCode::from(4001));
    let (mut ws, _) = ws_connect(&server, "/b", None).await;
    ws.close(Some(CloseFrame {
        code: CloseCode::from(4002),
        reason: "client".into(),
    }))
    .await
    .unwrap();
    within("upstream sees 4002", async {
        while !seen.closes.lock().unwrap().contains(&4002) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

async fn websocket_upstream_refusal_is_passed_on(backend: Backend) {
    let (addr, _) = ws_upstream().await;
    let server = Server::start_with_config(backend, &route("", &[format!("ws://{addr}")]), &[]);
    let r = server.request(&upgrade_request_for("/forbidden", "")).await;
    assert_eq!(r.status, 403, "{r:?}");
    assert_eq!(r.body, "go away");
}

async fn websocket_dead_upstream_is_502(backend: Backend) {
    let dead = dead_port().await;
    let server = Server::start_with_config(backend, &route("", &[format!("ws://{dead}")]), &[]);
    let r = server.request(&upgrade_request_for("/x", "")).await;
    assert_eq!(r.status, 502, "{r:?}");
}

/// Tunnel mode copies bytes as they are: a raw upstream that answers 101 and then echoes
/// arbitrary (non-frame) bytes; the client's half-close reaches it and its answer still
/// comes back.
async fn tunnel_is_byte_exact_with_half_close(backend: Backend) {
    let addr = tunnel_upstream().await;
    let server = Server::start_with_config(
        backend,
        &route("mode = \"tunnel\"", &[format!("http://{addr}")]),
        &[],
    );
    let s = server.tcp().await;
    let (mut raw, head) = RawWs::upgrade(s, "/t", "").await;
    assert_eq!(
        head.header("sec-websocket-accept"),
        Some("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
    );
    let data = pseudo_random(3 << 20, 11);
    let (mut rd, mut wr) = raw.stream.into_split();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        wr.write_all(&sent).await.unwrap();
        wr.shutdown().await.unwrap();
        wr
    });
    let mut got = std::mem::take(&mut raw.buf);
    within("echo and total", async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = rd.read(&mut buf).await.unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let _wr = writer.await.unwrap();
    let mut want = b"early".to_vec();
    want.extend_from_slice(&data);
    want.extend_from_slice(format!("total {}", data.len()).as_bytes());
    assert_eq!(got.len(), want.len());
    assert!(got == want, "bytes differ");
}

/// TLS termination in front of a plain ws app: wss:// to ringgate, ws:// behind it.
async fn wss_termination_in_front_of_ws_app(backend: Backend) {
    use rustls::pki_types::pem::PemObject;
    let (addr, _) = ws_upstream().await;
    let cert = ringgate::io::tls::dev_cert().expect("dev cert");
    let dir = std::env::temp_dir().join(format!(
        "ringgate-proxy-tls-{}-{:?}",
        std::process::id(),
        backend
    ));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("cert.pem"), &cert.cert_pem).unwrap();
    std::fs::write(dir.join("key.pem"), &cert.key_pem).unwrap();
    let (c, k) = (
        dir.join("cert.pem").display().to_string(),
        dir.join("key.pem").display().to_string(),
    );
    let server = Server::start_with_config(
        backend,
        &route("path_prefix = \"/\"", &[format!("ws://{addr}")]),
        &["--tls-cert", &c, "--tls-key", &k],
    );
    let mut roots = rustls::RootCertStore::empty();
    for der in rustls::pki_types::CertificateDer::pem_slice_iter(cert.ca_pem.as_bytes()) {
        roots.add(der.unwrap()).unwrap();
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = server.tcp().await;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let stream = within(
        "tls connect",
        tokio_rustls::TlsConnector::from(Arc::new(tls)).connect(name, tcp),
    )
    .await
    .expect("TLS handshake");
    let url = format!("wss://localhost:{}/secure", server.addr.port());
    let (mut ws, _) = within("wss connect", tokio_tungstenite::client_async(url, stream))
        .await
        .expect("wss handshake");
    ws.send(Message::text("over tls")).await.unwrap();
    match within("echo", ws.next()).await {
        Some(Ok(Message::Text(t))) => assert_eq!(t, "over tls"),
        other => panic!("expected the echo, got {other:?}"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}

// ---- operations -----------------------------------------------------------------------------

async fn sighup_reloads_routes(backend: Backend) {
    let (a, b) = (HttpUp::start("a").await, HttpUp::start("b").await);
    let server = Server::start_with_config(backend, &route("", &[a.url()]), &[]);
    assert_eq!(get(&server, "/x", "").await.body, "a /x");
    std::fs::write(server.config_path().unwrap(), route("", &[b.url()])).unwrap();
    server.signal(libc::SIGHUP);
    within("new routes in use", async {
        while get(&server, "/x", "").await.body != "b /x" {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Statistics list the route.
    let r = get(&server, "/ws/statistics", "").await;
    assert!(r.body.contains("\"routes\""), "{}", r.body);
}

#[tokio::test]
async fn check_config_reports_and_refuses() {
    let ok = TempFile::new(
        "toml",
        "[[route]]\nname = \"all\"\nupstreams = [\"http://127.0.0.1:1\"]\n[[route]]\nname = \"health\"\npath = \"/healthz\"\nupstreams = [\"http://127.0.0.1:1\"]\n",
    );
    let out = run_to_exit(ringgate_command().arg("check-config").arg(&ok.path)).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("[[route]]"), "{stdout}");
    assert!(stdout.contains("/healthz: route health wins"), "{stdout}");
    assert!(
        stdout.contains("/ws/echo: the built-in endpoint wins over route all"),
        "{stdout}"
    );
    let dup = TempFile::new(
        "toml",
        "[[route]]\nname = \"one\"\npath_prefix = \"/x/\"\nupstreams = [\"http://a\"]\n[[route]]\nname = \"two\"\npath_prefix = \"/x/\"\nupstreams = [\"http://b\"]\n",
    );
    let out = run_to_exit(ringgate_command().arg("check-config").arg(&dup.path)).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("one") && stderr.contains("two") && stderr.contains("exactly the same"),
        "{stderr}"
    );
    let bad = TempFile::new("toml", "[[route]]\nupstreams = [\"ftp://a\"]\n");
    let out = run_to_exit(ringgate_command().arg("check-config").arg(&bad.path)).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("route#1"));
}

/// A drain lets a proxied request in flight finish; a proxied WebSocket tunnel is ended.
async fn drain_finishes_requests_in_flight(backend: Backend) {
    let up = HttpUp::start("a").await;
    let (ws_addr, _) = ws_upstream().await;
    let config = format!(
        "{}{}",
        route(
            "path_prefix = \"/ws-app/\"\nmode = \"tunnel\"",
            &[format!("ws://{ws_addr}")]
        ),
        route("", &[up.url()])
    );
    let mut server = Server::start_with_config(backend, &config, &[]);
    let (mut ws, _) = ws_connect(&server, "/ws-app/x", None).await;
    echo(&mut ws, Message::text("before")).await;
    let mut s = server.tcp().await;
    s.write_all(b"GET /gate HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    within("request reached the upstream", async {
        while up.requests().iter().all(|(p, _, _)| p != "/gate") {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    server.signal(libc::SIGTERM);
    // The tunnel goes with the drain.
    loop {
        match within("tunnel ends", ws.next()).await {
            Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break,
            Some(Ok(_)) => {}
        }
    }
    up.seen.gate.notify_one();
    let r = read_response(&mut s).await;
    assert_eq!((r.status, r.body.as_str()), (200, "through the gate"));
    drop(s);
    let status = server.wait_exit(PATIENCE).await;
    assert!(status.success(), "{status:?}");
}

// ---- mode = "websocket" (the relay) ----------------------------------------------------------

async fn relay_server(backend: Backend) -> (Server, Arc<WsSeen>) {
    let (addr, seen) = ws_upstream().await;
    let server = Server::start_with_config(backend, &route("", &[format!("ws://{addr}")]), &[]);
    (server, seen)
}

async fn relay_close_codes_both_ways(backend: Backend) {
    let (server, seen) = relay_server(backend).await;
    let (mut ws, _) = ws_connect(&server, "/a", None).await;
    echo(&mut ws, Message::text("relayed")).await;
    ws.send(Message::text("close:4001")).await.unwrap();
    assert_eq!(expect_close(&mut ws).await, CloseCode::from(4001));
    let (mut ws, _) = ws_connect(&server, "/b", None).await;
    ws.close(Some(CloseFrame {
        code: CloseCode::from(4002),
        reason: "client".into(),
    }))
    .await
    .unwrap();
    wait_close(&seen, 4002).await;
    within("the relay's access log line", async {
        while !server.log().contains("relay closed") {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

async fn relay_upstream_gone_gives_1011(backend: Backend) {
    let (server, _) = relay_server(backend).await;
    let (mut ws, _) = ws_connect(&server, "/a", None).await;
    ws.send(Message::text("drop")).await.unwrap();
    assert_eq!(expect_close(&mut ws).await, CloseCode::from(1011));
}

async fn relay_client_gone_gives_upstream_1001(backend: Backend) {
    let (server, seen) = relay_server(backend).await;
    let (mut ws, _) = ws_connect(&server, "/a", None).await;
    echo(&mut ws, Message::text("x")).await;
    drop(ws);
    wait_close(&seen, 1001).await;
}

async fn relay_drain_closes_both_with_1001(backend: Backend) {
    let (mut server, seen) = relay_server(backend).await;
    let (mut ws, _) = ws_connect(&server, "/a", None).await;
    echo(&mut ws, Message::text("x")).await;
    server.signal(libc::SIGTERM);
    assert_eq!(expect_close(&mut ws).await, CloseCode::Away);
    wait_close(&seen, 1001).await;
    drop(ws);
    assert!(server.wait_exit(PATIENCE).await.success());
}

/// permessage-deflate is negotiated with the client only; the upstream is offered none.
async fn relay_deflate_at_the_edge_only(backend: Backend) {
    let (server, seen) = relay_server(backend).await;
    let s = server.tcp().await;
    let (mut raw, head) = RawWs::upgrade(
        s,
        "/d",
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
    )
    .await;
    let ext = head.header("sec-websocket-extensions").unwrap_or("");
    assert!(ext.starts_with("permessage-deflate"), "{head:?}");
    assert_eq!(seen.extensions.lock().unwrap().as_slice(), [None]);
    raw.send(&frame(true, OP_TEXT, b"plain")).await;
    let f = raw.read_frame().await.expect("echo");
    assert_eq!(
        (f.opcode, f.rsv1, f.payload.as_slice()),
        (OP_TEXT, false, &b"plain"[..])
    );
}

/// An upstream that completes the handshake and then never reads: the client's writes stall
/// once the bounded queues and socket buffers are full, and ringgate's memory stays bounded.
async fn relay_backpressure_stalled_upstream_reader(backend: Backend) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (held_tx, held_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let Ok((s, _)) = l.accept().await else { return };
        let Ok(ws) = tokio_tungstenite::accept_async(s).await else {
            return;
        };
        // Keep the connection, never read.
        let _ = held_tx.send(ws);
    });
    let server = Server::start_with_config(backend, &route("", &[format!("ws://{addr}")]), &[]);
    let s = server.tcp().await;
    let raw = RawWs::handshake(s, "/stall").await;
    let _held = within("upstream handshake", held_rx).await.unwrap();
    let before = rss_kib(server.pid());
    let msg = frame(true, OP_BINARY, &vec![3u8; 1 << 20]);
    stalls_with_memory_bounded(&server, before, raw.stream, msg).await;
}

/// Writes `piece` (1 MiB) 256 times on `stream` and proves that the pipeline behind it stalls:
/// the writer gets some way, then stops well short of 256 MiB, and the server's RSS has grown
/// by less than 48 MiB since `before`.
async fn stalls_with_memory_bounded(
    server: &Server,
    before: u64,
    mut stream: tokio::net::TcpStream,
    piece: Vec<u8>,
) {
    let written = Arc::new(AtomicUsize::new(0));
    let w = written.clone();
    let writer = tokio::spawn(async move {
        for _ in 0..256 {
            if stream.write_all(&piece).await.is_err() {
                return;
            }
            w.fetch_add(1, Ordering::SeqCst);
        }
    });
    within("some of it written", async {
        while written.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // Proving that nothing more moves needs time to pass in the server process: give the
    // stalled pipeline 1.5 s of real time in which 256 MiB would otherwise have gone through.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        !writer.is_finished(),
        "256 MiB went into a stalled upstream"
    );
    let grown = rss_kib(server.pid()).saturating_sub(before);
    assert!(grown < 48 * 1024, "server RSS grew by {grown} KiB");
    writer.abort();
}

/// A client that stops reading: the upstream's sends stall; memory stays bounded.
async fn relay_backpressure_stalled_client_reader(backend: Backend) {
    // 64 MiB: about five times what the stalled pipeline holds (socket buffers on three hops
    // and the relay's queue, 10 to 14 messages here), and still few enough to read back well
    // within the test's time limit on a loaded machine with debug builds.
    const FLOOD: usize = 64;
    let (server, seen) = relay_server(backend).await;
    let (mut ws, _) = ws_connect(&server, "/flood", None).await;
    let before = rss_kib(server.pid());
    ws.send(Message::text(format!("flood:{FLOOD}")))
        .await
        .unwrap();
    within("some messages sent", async {
        while seen.flooded.load(Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // As above: real time in which an unbounded relay would have taken all the messages.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sent = seen.flooded.load(Ordering::SeqCst);
    assert!(
        sent < FLOOD,
        "the upstream sent everything to a client that reads nothing"
    );
    let grown = rss_kib(server.pid()).saturating_sub(before);
    assert!(grown < 48 * 1024, "server RSS grew by {grown} KiB");
    // Reading again, everything arrives. Under load this can run past the server's heartbeat
    // interval, so its pings may come between the messages.
    for _ in 0..FLOOD {
        match next_data(&mut ws).await {
            Message::Binary(b) => assert_eq!(b.len(), 1 << 20),
            other => panic!("expected the flood, got {other:?}"),
        }
    }
}

// ---- TLS upstreams, metrics, reload errors ---------------------------------------------------

/// A TLS acceptor for the dev certificate (localhost), offering `alpn`.
fn upstream_tls(cert: &ringgate::io::tls::DevCert, alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    let chain = rustls::pki_types::CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
}

/// `https://localhost:PORT` (a name: resolved, ::1 then 127.0.0.1), trusted through
/// `ca_file`, h2 chosen by ALPN.
async fn https_upstream_h2_by_alpn(backend: Backend) {
    let cert = ringgate::io::tls::dev_cert().expect("dev cert");
    let up = HttpUp::start_tls("s", Some(upstream_tls(&cert, &[b"h2", b"http/1.1"]))).await;
    let ca = TempFile::new("pem", &cert.ca_pem);
    let config = route(
        &format!("ca_file = {:?}", ca.path.display().to_string()),
        &[format!("https://localhost:{}", up.addr.port())],
    );
    let server = Server::start_with_config(backend, &config, &[]);
    let r = get(&server, "/tls", "").await;
    assert_eq!((r.status, r.body.as_str()), (200, "s /tls"), "{r:?}");
    assert!(up
        .requests()
        .iter()
        .all(|(_, v, _)| *v == http::Version::HTTP_2));
    // Without the CA the upstream's certificate is not trusted: 502.
    let config = route("", &[format!("https://localhost:{}", up.addr.port())]);
    let server = Server::start_with_config(backend, &config, &[]);
    let r = get(&server, "/tls", "").await;
    assert_eq!(r.status, 502, "{r:?}");
}

async fn wss_upstream_relayed(backend: Backend) {
    let cert = ringgate::io::tls::dev_cert().expect("dev cert");
    let (addr, seen) = ws_upstream_tls(Some(upstream_tls(&cert, &[b"http/1.1"]))).await;
    let ca = TempFile::new("pem", &cert.ca_pem);
    let config = route(
        &format!("ca_file = {:?}", ca.path.display().to_string()),
        &[format!("wss://localhost:{}", addr.port())],
    );
    let server = Server::start_with_config(backend, &config, &[]);
    let (mut ws, resp) = ws_connect(&server, "/secure", Some("superchat")).await;
    assert_eq!(
        resp.headers()
            .get("sec-websocket-protocol")
            .map(|v| v.to_str().unwrap()),
        Some("superchat")
    );
    echo(&mut ws, Message::binary(pseudo_random(100_000, 3))).await;
    ws.send(Message::text("close:4003")).await.unwrap();
    assert_eq!(expect_close(&mut ws).await, CloseCode::from(4003));
    assert_eq!(seen.paths.lock().unwrap().as_slice(), ["/secure"]);
}

async fn metrics_per_route(backend: Backend) {
    let up = HttpUp::start("a").await;
    let dead = dead_port().await;
    let config = format!(
        "{}{}",
        route("name = \"app\"\npath_prefix = \"/app/\"", &[up.url()]),
        route(
            "name = \"down\"\npath_prefix = \"/down/\"\nretries = 0",
            &[format!("http://{dead}")]
        ),
    );
    let server = Server::start_with_config(backend, &config, &[]);
    assert_eq!(get(&server, "/app/x", "").await.status, 200);
    assert_eq!(get(&server, "/down/x", "").await.status, 502);
    let m = within("metrics", async {
        loop {
            let m = get(&server, "/metrics", "").await.body;
            if m.contains("ringgate_proxy_upstream_latency_seconds_bucket{route=\"app\"") {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert!(
        m.contains("ringgate_proxy_requests_total{route=\"app\",class=\"2xx\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("ringgate_proxy_requests_total{route=\"down\",class=\"5xx\"} 1"),
        "{m}"
    );
}

async fn sighup_with_a_broken_file_keeps_routes(backend: Backend) {
    let up = HttpUp::start("a").await;
    let server = Server::start_with_config(backend, &route("", &[up.url()]), &[]);
    std::fs::write(server.config_path().unwrap(), "[[route]]\nupstreams = []\n").unwrap();
    server.signal(libc::SIGHUP);
    within("the reload error logged", async {
        while !server.log().contains("keeping the current route table") {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    assert_eq!(get(&server, "/x", "").await.body, "a /x");
}

/// An upstream that closes each keep-alive connection right after its first answer: the
/// pooled connection is dead by the next request, which still succeeds (one upstream, no
/// retries configured).
async fn stale_pooled_connection_is_replaced(backend: Backend) {
    closing_upstream_serves_in_turn(backend, Method::GET).await;
}

/// The same with a POST (never retried once sent): checked out, the pooled connection is found
/// closed before the request is written, so the request goes on a fresh connection.
async fn stale_pooled_connection_takes_a_post(backend: Backend) {
    closing_upstream_serves_in_turn(backend, Method::POST).await;
}

/// Three requests through one client connection to an upstream that closes each connection
/// right after its answer: each gets 200.
async fn closing_upstream_serves_in_turn(backend: Backend, method: Method) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let closed = Arc::new(AtomicUsize::new(0));
    let c2 = closed.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let closed = c2.clone();
            tokio::spawn(async move {
                let Some(head) = read_head(&mut s).await else {
                    return;
                };
                // The body (Content-Length), read before answering so the close is clean.
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                let mut body = vec![0u8; len];
                if s.read_exact(&mut body).await.is_err() {
                    return;
                }
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                    .await;
                drop(s);
                closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    let config = route("retries = 0", &[format!("http://{addr}")]);
    let server = Server::start_sharded(backend, 1, &config, &[]);
    let mut c = client(&server).await;
    for n in 1..=3 {
        let body = if method == Method::POST {
            "payload"
        } else {
            ""
        };
        let req = http::Request::builder()
            .method(method.clone())
            .uri("/k")
            .header("host", "t")
            .body(BoxBody::new(
                Full::new(Bytes::from_static(body.as_bytes())).map_err(|e| match e {}),
            ))
            .unwrap();
        let resp = c.send_request(req).await.expect("request");
        assert_eq!(resp.status(), 200, "{method} request {n}");
        let _ = resp.into_body().collect().await;
        within("the upstream closed", async {
            while closed.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await;
    }
}

/// A keep-alive upstream connection serves request after request, whatever went through it
/// before: a streamed download, a streamed upload, trailers. One connection in all.
async fn pooled_connection_is_reused_after_streamed_bodies(backend: Backend) {
    let up = HttpUp::start("a").await;
    let server = Server::start_sharded(backend, 1, &route("", &[up.url()]), &[]);
    let mut c = client(&server).await;
    for round in 0..2 {
        for (method, path, body) in [
            (Method::GET, "/big?300000", ""),
            (Method::POST, "/upload", "0123456789"),
            (Method::GET, "/trailers", ""),
            (Method::GET, "/plain", ""),
        ] {
            let req = http::Request::builder()
                .method(method)
                .uri(path)
                .header("host", "t")
                .header("te", "trailers")
                .body(BoxBody::new(
                    Full::new(Bytes::from_static(body.as_bytes())).map_err(|e| match e {}),
                ))
                .unwrap();
            let resp = c.send_request(req).await.expect("request");
            assert_eq!(resp.status(), 200, "{path} in round {round}");
            let got = resp.into_body().collect().await.expect("body").to_bytes();
            if path == "/big?300000" {
                assert_eq!(got.len(), 300_000);
            }
        }
    }
    assert_eq!(up.requests().len(), 8);
    assert_eq!(
        up.seen.accepted.load(Ordering::SeqCst),
        1,
        "one upstream connection"
    );
}

/// An upstream that answers before it reads the request body (as nginx's `return 200` does):
/// the client gets the answer, and its whole upload still reaches the upstream.
async fn early_answer_lets_the_upload_finish(backend: Backend) {
    const LEN: usize = 8 << 20;
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (got_tx, got_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        read_head(&mut s).await.expect("request head");
        s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .await
            .unwrap();
        let mut body = vec![0u8; LEN];
        let _ = got_tx.send(
            s.read_exact(&mut body)
                .await
                .map(|_| body.iter().all(|&x| x == b'u')),
        );
    });
    let server = Server::start_sharded(backend, 1, &route("", &[format!("http://{addr}")]), &[]);
    let mut c = client(&server).await;
    let req = http::Request::post("/sink")
        .header("host", "t")
        .header("content-length", LEN.to_string())
        .body(BoxBody::new(
            Full::new(Bytes::from(vec![b'u'; LEN])).map_err(|e| match e {}),
        ))
        .unwrap();
    let resp = within("the answer", c.send_request(req))
        .await
        .expect("answer");
    assert_eq!(resp.status(), 200);
    let body = within("the body", resp.into_body().collect())
        .await
        .expect("body");
    assert_eq!(body.to_bytes(), "ok");
    let got = within("the upload reaches the upstream", got_rx)
        .await
        .unwrap();
    assert!(got.expect("the whole body"), "the body arrived intact");
}

async fn least_connections_avoids_the_busy_upstream(backend: Backend) {
    let (a, b) = (HttpUp::start("a").await, HttpUp::start("b").await);
    let config = route("balance = \"least_connections\"", &[a.url(), b.url()]);
    let server = Server::start_sharded(backend, 1, &config, &[]);
    // One request held open on whichever upstream it reaches.
    let mut held = server.tcp().await;
    held.write_all(b"GET /gate HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let busy = within("the held request arrives", async {
        loop {
            if a.requests().iter().any(|(p, _, _)| p == "/gate") {
                return "a";
            }
            if b.requests().iter().any(|(p, _, _)| p == "/gate") {
                return "b";
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    let idle = if busy == "a" { "b" } else { "a" };
    for _ in 0..4 {
        assert_eq!(get(&server, "/l", "").await.body, format!("{idle} /l"));
    }
    a.seen.gate.notify_one();
    b.seen.gate.notify_one();
    assert_eq!(read_response(&mut held).await.status, 200);
}

/// `total_timeout` ends a response that goes on too long: the client sees it end early.
async fn total_timeout_cuts_a_long_response(backend: Backend) {
    let up = HttpUp::start("a").await;
    let server =
        Server::start_with_config(backend, &route("total_timeout = 0.5", &[up.url()]), &[]);
    let mut s = server.tcp().await;
    s.write_all(b"GET /endless HTTP/1.1\r\nHost: t\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0usize;
    within("the response is cut", async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => total += n,
            }
        }
    })
    .await;
    assert!(total > 0);
    within("upstream body dropped", async {
        while up.seen.aborted.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

async fn ipv6_upstream(backend: Backend) {
    let up = HttpUp::start_on("[::1]:0", "six", None).await;
    let server =
        Server::start_with_config(backend, &route("", &[format!("http://{}", up.addr)]), &[]);
    let r = get(&server, "/v6", "").await;
    assert_eq!((r.status, r.body.as_str()), (200, "six /v6"), "{r:?}");
}

// ---- the upstream HTTP/1.1 codec -------------------------------------------------------------

/// A raw HTTP/1.1 upstream: answers each request head (by its path) with the bytes `answer`
/// gives, one byte per write when `byte_by_byte`; keeps the connection for the next request
/// unless the answer says the connection ends with it (`false`). Counts connections.
async fn raw_upstream(
    answer: fn(&str) -> (Vec<u8>, bool),
    byte_by_byte: bool,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let conns = Arc::new(AtomicUsize::new(0));
    let counted = conns.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            s.set_nodelay(true).unwrap();
            tokio::spawn(async move {
                while let Some(head) = read_head(&mut s).await {
                    let head = String::from_utf8_lossy(&head).into_owned();
                    let path = head.split(' ').nth(1).unwrap_or("").to_string();
                    let (bytes, keep) = answer(&path);
                    if byte_by_byte {
                        for b in bytes {
                            if s.write_all(&[b]).await.is_err() {
                                return;
                            }
                            s.flush().await.unwrap_or(());
                            tokio::task::yield_now().await;
                        }
                    } else if s.write_all(&bytes).await.is_err() {
                        return;
                    }
                    if !keep {
                        return;
                    }
                }
            });
        }
    });
    (addr, conns)
}

fn framings(path: &str) -> (Vec<u8>, bool) {
    let (bytes, keep): (&[u8], bool) = match path {
        // Chunk extensions, upper- and lowercase sizes, a trailer section.
        "/chunked" => (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: x-sum\r\n\r\n5;name=\"v\"\r\nhello\r\nA; x\r\n world 123\r\n0;end\r\nx-sum: 15\r\n\r\n",
            true,
        ),
        // Interim responses before the final one are skipped.
        "/interim" => (
            b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\ninterim",
            true,
        ),
        // To a HEAD request: a length, no body.
        "/head" => (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true),
        "/204" => (b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n", true),
        "/304" => (b"HTTP/1.1 304 Not Modified\r\nETag: \"e\"\r\n\r\n", true),
        "/length" => (b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nlength", true),
        // No framing: the body ends where the upstream closes.
        "/close" => (b"HTTP/1.1 200 OK\r\nX-Until: close\r\n\r\nuntil the close", false),
        _ => (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", true),
    };
    (bytes.to_vec(), keep)
}

/// Every way a response body can be framed, each response written one byte per write (the
/// codec sees it split at every byte boundary the socket lets through): the body, the trailers
/// and the status arrive as sent, and every response but the one that ends at the close leaves
/// the upstream connection reusable (one connection serves them all).
async fn every_response_framing_byte_by_byte(backend: Backend) {
    let (addr, conns) = raw_upstream(framings, true).await;
    let server = Server::start_sharded(backend, 1, &route("", &[format!("http://{addr}")]), &[]);
    let mut c = client(&server).await;
    let send = |method: Method, path: &str| {
        http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "t")
            .header("te", "trailers")
            .body(BoxBody::new(
                http_body_util::Empty::new().map_err(|e| match e {}),
            ))
            .unwrap()
    };
    let resp = c
        .send_request(send(Method::GET, "/chunked"))
        .await
        .expect("chunked");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("chunked body");
    let trailers = body.trailers().cloned().expect("trailers arrived");
    assert_eq!(trailers["x-sum"], "15");
    assert_eq!(&body.to_bytes()[..], b"hello world 123");
    let resp = c
        .send_request(send(Method::GET, "/interim"))
        .await
        .expect("interim");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    assert_eq!(&body[..], b"interim");
    let resp = c
        .send_request(send(Method::HEAD, "/head"))
        .await
        .expect("head");
    assert_eq!(
        (
            resp.status(),
            resp.headers()["content-length"].to_str().unwrap()
        ),
        (http::StatusCode::OK, "5")
    );
    assert!(resp
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
        .is_empty());
    for (path, status) in [("/204", 204), ("/304", 304), ("/length", 200)] {
        let resp = c.send_request(send(Method::GET, path)).await.expect(path);
        assert_eq!(resp.status(), status, "{path}");
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        let want: &[u8] = if status == 200 { b"length" } else { b"" };
        assert_eq!(&body[..], want, "{path}");
    }
    assert_eq!(
        conns.load(Ordering::SeqCst),
        1,
        "one pooled connection served all"
    );
    let resp = c
        .send_request(send(Method::GET, "/close"))
        .await
        .expect("close");
    assert_eq!(resp.headers()["x-until"], "close");
    let body = resp
        .into_body()
        .collect()
        .await
        .expect("body ended by the close")
        .to_bytes();
    assert_eq!(&body[..], b"until the close");
    // The connection that ended the last body is not pooled: the next request opens another.
    let resp = c
        .send_request(send(Method::GET, "/length"))
        .await
        .expect("after close");
    assert_eq!(resp.status(), 200);
    assert_eq!(conns.load(Ordering::SeqCst), 2);
}

/// An upstream that sends a response head and part of the body, then waits for `gate` and
/// closes the connection.
async fn cut_short_upstream(gate: Arc<tokio::sync::Notify>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let gate = gate.clone();
            tokio::spawn(async move {
                let Some(head) = read_head(&mut s).await else {
                    return;
                };
                let bytes: &[u8] = if head.starts_with(b"GET /length") {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b"
                } else if head.starts_with(b"GET /chunked") {
                    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\nonly ten b\r\n"
                } else {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nfine"
                };
                let _ = s.write_all(bytes).await;
                if bytes.ends_with(b"fine") {
                    let _ = read_head(&mut s).await;
                    return;
                }
                gate.notified().await;
            });
        }
    });
    addr
}

/// An upstream that closes the connection before the body's declared end (its length, or the
/// last chunk): the client gets the bytes that came, then the response broken off — never a
/// short body that looks complete — and the next request is served.
async fn upstream_closing_mid_body_truncates(backend: Backend) {
    let gate = Arc::new(tokio::sync::Notify::new());
    let addr = cut_short_upstream(gate.clone()).await;
    let server = Server::start_sharded(backend, 1, &route("", &[format!("http://{addr}")]), &[]);
    for path in ["/length", "/chunked"] {
        let mut c = client(&server).await;
        let req = http::Request::get(path)
            .header("host", "t")
            .body(BoxBody::new(
                http_body_util::Empty::new().map_err(|e| match e {}),
            ))
            .unwrap();
        let resp = c.send_request(req).await.expect(path);
        assert_eq!(resp.status(), 200, "{path}");
        let mut body = resp.into_body();
        let first = within("the first bytes", body.frame()).await;
        let first = first.expect(path).expect(path).into_data().expect("data");
        assert_eq!(&first[..], b"only ten b", "{path}");
        // Now the upstream goes away.
        gate.notify_one();
        let rest = within("the end", body.collect()).await;
        assert!(rest.is_err(), "{path}: the response must not look complete");
    }
    let r = get(&server, "/fine", "").await;
    assert_eq!((r.status, r.body.as_str()), (200, "fine"));
}

fn huge_head(_: &str) -> (Vec<u8>, bool) {
    let mut b = b"HTTP/1.1 200 OK\r\nX-Big: ".to_vec();
    b.extend(std::iter::repeat_n(b'a', 70 * 1024));
    b.extend_from_slice(b"\r\nContent-Length: 2\r\n\r\nok");
    (b, false)
}

/// A response head over the limit (64 KiB) is answered 502, naming the cause.
async fn oversized_response_head_is_502(backend: Backend) {
    raw_upstream_is_502(backend, huge_head, "too large").await
}

// ---- request bodies gathered into vectored writes ----------------------------------------------

/// `n` bytes of a pattern that does not repeat at any power-of-two period, cut into pieces of
/// uneven sizes (1 byte to just over 64 KiB).
fn uneven_pieces(n: usize) -> (Vec<Bytes>, String) {
    let mut x = 0x2545_f491_u32;
    let data: Vec<u8> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let sizes = [1, 3, 100, 4096, 65_537, 10, 1500, 16_384];
    let mut pieces = Vec::new();
    let mut at = 0;
    for size in sizes.iter().cycle() {
        if at == n {
            break;
        }
        let end = (at + size).min(n);
        pieces.push(Bytes::copy_from_slice(&data[at..end]));
        at = end;
    }
    let expected = format!("{n} {:016x}", fnv1a(FNV_BASIS, &data));
    (pieces, expected)
}

fn piece_stream(
    pieces: Vec<Bytes>,
) -> StreamBody<impl futures_util::Stream<Item = Result<Frame<Bytes>, std::io::Error>>> {
    StreamBody::new(futures_util::stream::iter(
        pieces.into_iter().map(|p| Ok(Frame::data(p))),
    ))
}

async fn text_of(resp: http::Response<Incoming>) -> String {
    let body = resp.into_body().collect().await.expect("answer body");
    String::from_utf8_lossy(&body.to_bytes()).into_owned()
}

/// The pieces of a request body that are ready go upstream together (one vectored write, with
/// their chunk framing): an upload in pieces of uneven sizes arrives byte for byte, in order,
/// chunked and with a content length, from HTTP/1.1 and from HTTP/2 clients (whose DATA
/// frames queue up, so that many pieces are ready at once), and from a client that sends the
/// whole chunked request in one write.
async fn uploads_arrive_byte_exact(backend: Backend) {
    const N: usize = (3 << 20) + 17;
    let up = HttpUp::start("a").await;
    let config = format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\nh2c = true\n{}",
        route("", &[up.url()])
    );
    let server = Server::start_with_config(backend, &config, &[]);
    let (pieces, expected) = uneven_pieces(N);
    // HTTP/1.1, chunked (no length known), then with a content length.
    let mut c = client(&server).await;
    for length in [false, true] {
        let mut req = http::Request::post("/digest").header("host", "t");
        if length {
            req = req.header("content-length", N);
        }
        let req = req
            .body(BoxBody::new(piece_stream(pieces.clone())))
            .unwrap();
        let resp = within("the upload", c.send_request(req))
            .await
            .expect("answer");
        assert_eq!(resp.status(), 200);
        assert_eq!(text_of(resp).await, expected, "HTTP/1.1, length {length}");
    }
    // HTTP/2 (h2c), both ways again.
    let io = server.tcp().await;
    let (mut h2, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(io),
    )
    .await
    .expect("h2 handshake");
    tokio::spawn(conn);
    for length in [false, true] {
        let mut req = http::Request::post("http://t/digest");
        if length {
            req = req.header("content-length", N);
        }
        let req = req
            .body(BoxBody::new(piece_stream(pieces.clone())))
            .unwrap();
        let resp = within("the h2 upload", h2.send_request(req))
            .await
            .expect("answer");
        assert_eq!(resp.status(), 200);
        assert_eq!(text_of(resp).await, expected, "HTTP/2, length {length}");
    }
    // The whole chunked request in one write: every chunk is ready at once.
    let mut wire = b"POST /digest HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
    for p in &pieces {
        wire.extend_from_slice(format!("{:x}\r\n", p.len()).as_bytes());
        wire.extend_from_slice(p);
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b"0\r\n\r\n");
    let mut s = server.tcp().await;
    s.write_all(&wire).await.unwrap();
    let r = within("the answer", read_response(&mut s)).await;
    assert_eq!((r.status, r.body.as_str()), (200, expected.as_str()));
    assert_eq!(up.seen.upload_errors.load(Ordering::SeqCst), 0);
}

/// An upstream that takes the request head and never reads the body: the proxy stops reading
/// the client's body (what it gathers for the upstream is bounded), so the client's upload
/// stalls and the server's memory stays flat.
async fn upload_to_a_stalled_upstream_is_bounded(backend: Backend) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (held_tx, held_rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let Ok((mut s, _)) = l.accept().await else {
            return;
        };
        let _ = read_head(&mut s).await;
        // Keep the connection, never read the body, never answer.
        let _ = held_tx.send(s);
    });
    let server = Server::start_with_config(backend, &route("", &[format!("http://{addr}")]), &[]);
    let before = rss_kib(server.pid());
    let mut s = server.tcp().await;
    s.write_all(b"POST /sink HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    let _held = within("the request head upstream", held_rx).await.unwrap();
    let mut chunk = b"100000\r\n".to_vec();
    chunk.extend_from_slice(&vec![9u8; 1 << 20]);
    chunk.extend_from_slice(b"\r\n");
    stalls_with_memory_bounded(&server, before, s, chunk).await;
}
