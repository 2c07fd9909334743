//! What an idle WebSocket costs the server: the heap a connection holds once it is open and
//! idle, fresh or after one message, read from the debug build's allocation count
//! (`ringgate_debug_heap_bytes` on `/metrics`, counted by `metrics::CountingAlloc`). The bound
//! is the per-connection budget of bench/IDLE.md with headroom; a buffer kept while idle (a
//! read buffer, an emptied outbox, hyper's state after the upgrade) breaks it many times over.

mod common;

use std::time::Instant;

use common::{within, Backend, RawWs, Server, OP_TEXT, PATIENCE};
use tokio::net::TcpStream;

/// Connections per measurement: enough that the shard's own growth (its connection table,
/// the runtime's task lists) is small per connection.
const CONNS: usize = 1000;
/// Heap per idle connection in a debug build: 1.10-1.17 KB on either backend, with a little
/// headroom (1.25 KB while the handshake's task outlived the upgrade, holding the session in a
/// box; about 5 KB before the cuts of bench/IDLE.md; the target is 1 KiB of RSS).
const BUDGET: f64 = 1216.0;

/// Scrapes `/metrics` for one unlabelled or fully labelled series.
async fn metric(server: &Server, series: &str) -> f64 {
    let body = server.get("/metrics").await.body;
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {series} in /metrics:\n{body}"))
}

async fn heap(server: &Server) -> f64 {
    metric(server, "ringgate_debug_heap_bytes").await
}

/// Waits until `gauge` (a series of `/metrics`) reads `n`: the gauges rise as sessions start
/// and fall as they end.
async fn wait_gauge(server: &Server, gauge: &str, n: usize) {
    let deadline = Instant::now() + PATIENCE;
    while metric(server, gauge).await != n as f64 {
        assert!(Instant::now() < deadline, "{gauge} never reached {n}");
        tokio::task::yield_now().await;
    }
}

/// Waits until the heap per connection over `before` falls under `limit`, and fails naming
/// the last reading: closed sessions free their state as their tasks finish, which may be after
/// the gauge that counts them has fallen.
async fn wait_heap_returned(server: &Server, before: f64, conns: usize, limit: f64, what: &str) {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let after = (heap(server).await - before) / conns as f64;
        if after < limit {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{after:.0} B per closed {what} still held (limit {limit} B)"
        );
        tokio::task::yield_now().await;
    }
}

const ECHO_ACTIVE: &str = "ringgate_connections_active{endpoint=\"echo\"}";

/// Waits until the server has `n` echo sessions running.
async fn wait_active(server: &Server, n: usize) {
    wait_gauge(server, ECHO_ACTIVE, n).await
}

/// Opens `n` WebSockets on `path`, 100 handshakes at a time.
async fn open_on(server: &Server, path: &str, n: usize) -> Vec<RawWs> {
    let mut conns = Vec::with_capacity(n);
    while conns.len() < n {
        let batch = (n - conns.len()).min(100);
        let handshakes = (0..batch).map(|_| async {
            let s = within("tcp connect", TcpStream::connect(server.addr))
                .await
                .expect("tcp connect");
            RawWs::handshake(s, path).await
        });
        conns.extend(futures_util::future::join_all(handshakes).await);
    }
    conns
}

async fn open(server: &Server, n: usize) -> Vec<RawWs> {
    open_on(server, "/ws/echo", n).await
}

/// One message each way on every connection, all in flight at once.
async fn touch(conns: &mut [RawWs]) {
    for c in conns.iter_mut() {
        c.send(&common::encode_frame(
            0x80 | OP_TEXT,
            Some([1, 2, 3, 4]),
            b"hello",
        ))
        .await;
    }
    for c in conns.iter_mut() {
        // Skipping a heartbeat ping (unanswered: the server counts any input as life).
        let f = loop {
            let f = c.read_frame().await.expect("the echo");
            if f.opcode != common::OP_PING {
                break f;
            }
        };
        assert_eq!(f.payload, b"hello");
    }
}

async fn idle_connections_hold_little_heap(backend: Backend) {
    let server = Server::start_sharded(backend, 1, "", &[]);
    // The first connections size the shard's tables and the runtime's lists: not per
    // connection, so they are made (and closed) before the baseline.
    // Their messages fill the shard's pool of send records (io_uring), up to its fixed size.
    let mut warm = open(&server, CONNS).await;
    touch(&mut warm).await;
    drop(warm);
    wait_active(&server, 0).await;
    let before = heap(&server).await;

    let mut conns = open(&server, CONNS).await;
    wait_active(&server, CONNS).await;
    let fresh = (heap(&server).await - before) / CONNS as f64;

    // One message each way on every connection: what a used connection keeps when idle.
    touch(&mut conns).await;
    let touched = (heap(&server).await - before) / CONNS as f64;
    eprintln!("heap per idle connection ({backend:?}): {fresh:.0} B fresh, {touched:.0} B after a message");
    for (what, per) in [("fresh", fresh), ("after a message", touched)] {
        assert!(
            per <= BUDGET,
            "an idle connection ({what}) holds {per:.0} B of heap (budget {BUDGET} B)"
        );
    }
    // And the heap is given back when they close.
    drop(conns);
    wait_active(&server, 0).await;
    wait_heap_returned(&server, before, CONNS, 64.0, "connection").await;
}

/// Heap per idle proxied WebSocket in a debug build (the proxy's process only: the upstream is
/// another ringgate), relayed or tunnelled: the client side, the upstream connection and what
/// joins them. About 3.1 KB for a relay (a session on each side) and 2.8 KB for a tunnel, with
/// headroom; a tunnel that keeps its copy buffers (or the bytes read past either handshake)
/// while idle holds 48 KB, a relay's task sized for a tunnel's state 4.9 KB.
const PROXIED_BUDGET: [(&str, f64); 2] = [("relay", 4096.0), ("tunnel", 4096.0)];

/// The gauge that falls once a proxied connection of `mode` is over on both sides (a relay's
/// session ends with its upstream side).
fn proxied_gauge(mode: &str) -> String {
    match mode {
        "relay" => "ringgate_connections_active{endpoint=\"proxy\"}".into(),
        _ => format!("ringgate_proxy_websockets_active{{route=\"{mode}\"}}"),
    }
}

async fn idle_proxied_connections_hold_little_heap(backend: Backend) {
    let upstream = Server::start_sharded(backend, 1, "", &[]);
    let routes = PROXIED_BUDGET
        .iter()
        .map(|(mode, _)| {
            format!(
                "[[route]]\nname = \"{mode}\"\npath = \"/{mode}\"\nmode = \"{}\"\n\
                 upstreams = [\"ws://{}/ws/echo\"]\nstrip_prefix = true\n",
                if *mode == "relay" {
                    "websocket"
                } else {
                    "tunnel"
                },
                upstream.addr
            )
        })
        .collect::<String>();
    let server = Server::start_sharded(backend, 1, &routes, &[]);
    for (mode, budget) in PROXIED_BUDGET {
        let path = format!("/{mode}");
        let active = proxied_gauge(mode);
        // Warm-up, as above: the shard's tables, the upstream pool's growth and (a message
        // each) the shard's pool of send records.
        let mut warm = open_on(&server, &path, CONNS).await;
        touch(&mut warm).await;
        drop(warm);
        wait_gauge(&server, &active, 0).await;
        wait_gauge(&upstream, ECHO_ACTIVE, 0).await;
        let before = heap(&server).await;

        let mut conns = open_on(&server, &path, CONNS).await;
        wait_gauge(&server, &active, CONNS).await;
        let fresh = (heap(&server).await - before) / CONNS as f64;
        touch(&mut conns).await;
        let touched = (heap(&server).await - before) / CONNS as f64;
        eprintln!(
            "heap per idle proxied connection ({mode}, {backend:?}): {fresh:.0} B fresh, \
             {touched:.0} B after a message"
        );
        for (what, per) in [("fresh", fresh), ("after a message", touched)] {
            assert!(
                per <= budget,
                "an idle {mode} ({what}) holds {per:.0} B of heap (budget {budget} B)"
            );
        }
        drop(conns);
        wait_gauge(&server, &active, 0).await;
        wait_gauge(&upstream, ECHO_ACTIVE, 0).await;
        wait_heap_returned(&server, before, CONNS, 64.0, mode).await;
    }
}

both_backends!(idle_proxied_connections_hold_little_heap);

/// wss connections per measurement: fewer than plain ones, each costs a TLS handshake in a debug
/// build on both sides.
const TLS_CONNS: usize = 500;
/// Heap per idle wss connection in a debug build. rustls' unbuffered API (src/io/server_tls.rs)
/// keeps no TLS buffer while idle: about 4.8 KB, of which 3.4 KB over a plain connection are
/// rustls' connection state (record keys, traffic secrets). With rustls' buffered connection
/// it was about 4 KiB more (its receive buffer).
const TLS_BUDGET: f64 = 5632.0;

/// Opens `n` wss connections on `/ws/echo` at `addr`, 50 handshakes at a time.
async fn open_wss(addr: std::net::SocketAddr, ca: &std::path::Path, n: usize) -> Vec<Wss> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).expect("read CA") {
        roots.add(cert.expect("CA cert")).expect("add CA");
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let mut conns = Vec::with_capacity(n);
    while conns.len() < n {
        let batch = (n - conns.len()).min(50);
        let handshakes = (0..batch).map(|_| async {
            let tcp = within("tcp connect", TcpStream::connect(addr))
                .await
                .expect("tcp connect");
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
            let tls = within("tls handshake", connector.connect(name, tcp))
                .await
                .expect("tls handshake");
            within(
                "wss upgrade",
                tokio_tungstenite::client_async("wss://localhost/ws/echo", tls),
            )
            .await
            .expect("wss upgrade")
            .0
        });
        conns.extend(futures_util::future::join_all(handshakes).await);
    }
    conns
}

type Wss = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>>;

async fn touch_wss(conns: &mut [Wss]) {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    for c in conns.iter_mut() {
        c.send(Message::text("hello")).await.expect("send");
    }
    for c in conns.iter_mut() {
        // A heartbeat ping may come first when opening took a heartbeat interval (tungstenite
        // answers it).
        let got = loop {
            match within("echo", c.next()).await.expect("open").expect("echo") {
                Message::Ping(_) => continue,
                m => break m,
            }
        };
        assert_eq!(got, Message::text("hello"));
    }
}

async fn idle_wss_connections_hold_no_tls_buffer(backend: Backend) {
    let certs = common::CertDir::new().await;
    // A plain listener for /metrics (the harness's client), the TLS one for the WebSockets.
    let config = format!(
        "[[listen]]\naddr = \"127.0.0.1:0\"\n[[listen]]\naddr = \"127.0.0.1:0\"\ntls = true\n[tls]\ncert = {:?}\nkey = {:?}\n",
        certs.file("cert.pem"),
        certs.file("key.pem"),
    );
    let server = Server::start_sharded(backend, 1, &config, &[]);
    let tls_addr: std::net::SocketAddr = server
        .log()
        .lines()
        .find(|l| l.contains("also listening"))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("addr="))
                .and_then(|a| a.parse().ok())
        })
        .expect("the TLS listener's address in the log");
    let ca = certs.file("ca.pem");
    let mut warm = open_wss(tls_addr, &ca, TLS_CONNS).await;
    touch_wss(&mut warm).await;
    drop(warm);
    wait_active(&server, 0).await;
    let before = heap(&server).await;

    let mut conns = open_wss(tls_addr, &ca, TLS_CONNS).await;
    wait_active(&server, TLS_CONNS).await;
    let fresh = (heap(&server).await - before) / TLS_CONNS as f64;
    touch_wss(&mut conns).await;
    let touched = (heap(&server).await - before) / TLS_CONNS as f64;
    eprintln!("heap per idle wss connection ({backend:?}): {fresh:.0} B fresh, {touched:.0} B after a message");
    for (what, per) in [("fresh", fresh), ("after a message", touched)] {
        assert!(
            per <= TLS_BUDGET,
            "an idle wss connection ({what}) holds {per:.0} B of heap (budget {TLS_BUDGET} B)"
        );
    }
    drop(conns);
    wait_active(&server, 0).await;
    // Allowing for the shard's pool of send records (io_uring: at most 256 of ~140 B), which
    // grows with the sends in flight at once and may have grown since the baseline.
    wait_heap_returned(&server, before, TLS_CONNS, 128.0, "wss connection").await;
}

both_backends!(
    idle_connections_hold_little_heap,
    idle_wss_connections_hold_no_tls_buffer
);

/// The server's `THP_enabled` in /proc/PID/status (0 after `PR_SET_THP_DISABLE`).
fn thp_enabled(server: &Server) -> String {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid()))
        .expect("the server's /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("THP_enabled:"))
        .unwrap_or_else(|| panic!("no THP_enabled in /proc status:\n{status}"))
        .trim()
        .to_owned()
}

/// Transparent huge pages are off for the server unless `MIMALLOC_ALLOW_THP` asks for them:
/// with them, mimalloc's arenas are resident in 2 MiB units and an idle connection's RSS is the
/// allocator's span, not what it holds (bench/IDLE.md).
#[tokio::test]
async fn transparent_huge_pages_are_off_unless_asked_for() {
    let server = Server::start(Backend::Epoll, &[]);
    assert_eq!(thp_enabled(&server), "0");
    let asked = Server::start_with_env(Backend::Epoll, "", &[("MIMALLOC_ALLOW_THP", "1")], &[]);
    assert_eq!(thp_enabled(&asked), "1");
}
