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

/// Waits until the server has `n` echo sessions running (the gauge rises as each starts).
async fn wait_active(server: &Server, n: usize) {
    let deadline = Instant::now() + PATIENCE;
    while metric(server, "ringgate_connections_active{endpoint=\"echo\"}").await != n as f64 {
        assert!(Instant::now() < deadline, "{n} sessions never ran");
        tokio::task::yield_now().await;
    }
}

/// Opens `n` WebSockets on `/ws/echo`, 100 handshakes at a time.
async fn open(server: &Server, n: usize) -> Vec<RawWs> {
    let mut conns = Vec::with_capacity(n);
    while conns.len() < n {
        let batch = (n - conns.len()).min(100);
        let handshakes = (0..batch).map(|_| async {
            let s = within("tcp connect", TcpStream::connect(server.addr))
                .await
                .expect("tcp connect");
            RawWs::handshake(s, "/ws/echo").await
        });
        conns.extend(futures_util::future::join_all(handshakes).await);
    }
    conns
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
    for c in &mut conns {
        c.send(&common::encode_frame(
            0x80 | OP_TEXT,
            Some([1, 2, 3, 4]),
            b"hello",
        ))
        .await;
    }
    for c in &mut conns {
        let f = c.read_frame().await.expect("the echo");
        assert_eq!(f.payload, b"hello");
    }
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
