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
/// Heap per idle connection in a debug build: about 1.7 KB today on either backend, with
/// headroom (before the cuts of bench/IDLE.md it was about 5 KB; the target is 1 KiB of RSS).
const BUDGET: f64 = 2048.0;

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

/// One message each way on every connection.
async fn echo_once(conns: &mut [RawWs]) {
    for c in conns.iter_mut() {
        c.send(&common::encode_frame(
            0x80 | OP_TEXT,
            Some([1, 2, 3, 4]),
            b"hello",
        ))
        .await;
    }
    for c in conns.iter_mut() {
        let f = c.read_frame().await.expect("the echo");
        assert_eq!(f.payload, b"hello");
    }
}

async fn idle_connections_hold_little_heap(backend: Backend) {
    let server = Server::start_sharded(backend, 1, "", &[]);
    // The first connections size the shard's tables and the runtime's lists: not per
    // connection, so they are made (and closed) before the baseline.
    drop(open(&server, CONNS).await);
    wait_active(&server, 0).await;
    let before = heap(&server).await;

    let mut conns = open(&server, CONNS).await;
    wait_active(&server, CONNS).await;
    let fresh = (heap(&server).await - before) / CONNS as f64;

    // One message each way on every connection: what a used connection keeps when idle.
    echo_once(&mut conns).await;
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
    let after = (heap(&server).await - before) / CONNS as f64;
    assert!(
        after < 64.0,
        "{after:.0} B per closed connection still held"
    );
}

both_backends!(idle_connections_hold_little_heap);

/// Heap per idle proxied WebSocket in a debug build (the proxy's process only: the upstream is
/// another ringgate), relayed or tunnelled: the client side, the upstream connection and what
/// joins them. About 3.5 KB for a relay (a session on each side) and 2.8 KB for a tunnel
/// today, with headroom; a tunnel that keeps its copy buffers (or the bytes read past either
/// handshake) while idle holds 48 KB, a relay's task sized for a tunnel's state 4.9 KB.
const PROXIED_BUDGET: [(&str, f64); 2] = [("relay", 2.0 * BUDGET), ("tunnel", 2.0 * BUDGET)];

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
        // Warm-up, as above: the shard's tables and the upstream pool's growth.
        drop(open_on(&server, &path, CONNS).await);
        wait_gauge(&server, &active, 0).await;
        wait_gauge(&upstream, ECHO_ACTIVE, 0).await;
        let before = heap(&server).await;

        let mut conns = open_on(&server, &path, CONNS).await;
        wait_gauge(&server, &active, CONNS).await;
        let fresh = (heap(&server).await - before) / CONNS as f64;
        echo_once(&mut conns).await;
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
        let after = (heap(&server).await - before) / CONNS as f64;
        assert!(after < 64.0, "{after:.0} B per closed {mode} still held");
    }
}

both_backends!(idle_proxied_connections_hold_little_heap);
