//! Process and connection lifecycle: graceful drain on signals, heartbeats, config checking.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

both_backends!(
    sigterm_drains_with_1001,
    sigint_exits_cleanly,
    heartbeat_pings_keep_a_live_client,
    silent_client_is_closed_by_heartbeat,
    check_config_prints_effective_toml,
    check_config_names_unknown_key,
    restart_under_load_loses_no_connection,
    restart_with_handover_keeps_the_listening_sockets,
    handover_drain_closes_connections_with_receives_in_flight,
);

/// SIGTERM: every WebSocket gets close 1001, `/readyz` answers 503 while the drain waits for a
/// client that ignores the close, and the process exits 0.
async fn sigterm_drains_with_1001(backend: Backend) {
    // close_timeout bounds how long the server waits for the stubborn client's close reply.
    let mut server =
        Server::start_with_config(backend, "close_timeout = 2.0\n", &["--drain-timeout", "20"]);
    let mut polite = server.ws().await;
    echo(&mut polite, Message::text("hi")).await;
    let mut stubborn = server.raw_ws().await;
    // A request head left incomplete until the drain has begun: an HTTP exchange in progress
    // is finished during a drain, so this is how to observe /readyz from outside (the
    // listeners stop accepting at once).
    let mut probe = server.tcp().await;
    probe
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: test\r\n")
        .await
        .unwrap();
    // Let the server read that much before the signal. Nothing observable says a partial head
    // was read (the server answers only once it is whole), so this waits for real.
    tokio::time::sleep(Duration::from_millis(500)).await;

    server.signal(libc::SIGTERM);
    assert_eq!(expect_close(&mut polite).await, CloseCode::Away);
    assert_eq!(stubborn.expect_close().await, 1001);

    probe.write_all(b"\r\n").await.unwrap();
    let r = read_response(&mut probe).await;
    assert_eq!((r.status, r.body.as_str()), (503, "draining\n"), "{r:?}");

    // The polite client finishes the close handshake; the stubborn one never answers, so the
    // server gives up on it after close_timeout and the drain completes.
    while within("polite close", polite.next()).await.is_some() {}
    stubborn.expect_eof().await;
    let status = server.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", server.log());
    assert!(server.log().contains("draining"), "log:\n{}", server.log());
}

async fn sigint_exits_cleanly(backend: Backend) {
    let mut server = Server::start(backend, &[]);
    let mut ws = server.ws().await;
    server.signal(libc::SIGINT);
    assert_eq!(expect_close(&mut ws).await, CloseCode::Away);
    drop(ws);
    let status = server.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "log:\n{}", server.log());
}

/// A client that answers pings (tungstenite does automatically) is pinged every interval and
/// stays connected well past two intervals.
async fn heartbeat_pings_keep_a_live_client(backend: Backend) {
    let server = Server::start(backend, &["--heartbeat-interval", "1"]);
    let mut ws = server.ws().await;
    let mut pings = 0;
    while pings < 4 {
        match within("ping", ws.next()).await {
            Some(Ok(Message::Ping(_))) => pings += 1,
            other => panic!("expected only pings, got {other:?}"),
        }
    }
    echo(&mut ws, Message::text("still open")).await;
}

/// A client that never sends anything is pinged, then closed with 1001 after two silent
/// intervals, then disconnected.
async fn silent_client_is_closed_by_heartbeat(backend: Backend) {
    let server = Server::start(backend, &["--heartbeat-interval", "1"]);
    let mut c = server.raw_ws().await;
    let first = c.read_frame().await.expect("a ping");
    assert_eq!(first.opcode, OP_PING, "{first:?}");
    loop {
        let f = c.read_frame().await.expect("ping or close");
        match f.opcode {
            OP_PING => {}
            OP_CLOSE => {
                assert_eq!(f.close_code(), Some(1001), "{f:?}");
                break;
            }
            _ => panic!("unexpected frame {f:?}"),
        }
    }
    c.expect_eof().await;
}

/// `check-config` prints the effective config (file values included) as TOML and exits 0.
async fn check_config_prints_effective_toml(backend: Backend) {
    let file = TempFile::new(
        "toml",
        &format!(
            "io = \"{}\"\nmax_message_size = 1000\nallowed_origins = [\"https://good.example\"]\n",
            backend.flag()
        ),
    );
    let out = run_to_exit(ringgate_command().arg("check-config").arg(&file.path)).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains(&format!("io = \"{}\"", backend.flag())),
        "{stdout}"
    );
    assert!(stdout.contains("max_message_size = 1000"), "{stdout}");
    assert!(stdout.contains("https://good.example"), "{stdout}");
    // Defaults are filled in.
    assert!(stdout.contains("port = 8003"), "{stdout}");
    assert!(stdout.contains("heartbeat_interval = 30"), "{stdout}");
}

/// An unknown key is an error naming the key, from `check-config` and when serving.
async fn check_config_names_unknown_key(backend: Backend) {
    let file = TempFile::new(
        "toml",
        &format!("io = \"{}\"\nhaert_beat = 3\n", backend.flag()),
    );
    let out = run_to_exit(ringgate_command().arg("check-config").arg(&file.path)).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(stderr.contains("haert_beat"), "{stderr}");

    let out = run_to_exit(
        ringgate_command()
            .args(["--host", "127.0.0.1", "--port", "0", "--config"])
            .arg(&file.path),
    )
    .await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(stderr.contains("haert_beat"), "{stderr}");
    assert!(!stderr.contains("ringgate listening"), "{stderr}");
}

/// One `GET /healthz` on a fresh connection; true when it was answered 200.
async fn health_check(addr: std::net::SocketAddr) -> bool {
    let attempt = async {
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut buf = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf)
            .await
            .ok()?;
        Some(buf.starts_with(b"HTTP/1.1 200"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), attempt).await,
        Ok(Some(true))
    )
}

/// Health checks from 4 clients in a loop (at most 5,000 each), counting the answered and the
/// failed ones, while a test restarts the server under them.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(addr: std::net::SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let clients = (0..4)
            .map(|_| {
                let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
                tokio::spawn(async move {
                    for _ in 0..5_000 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let counter = if health_check(addr).await {
                            &ok
                        } else {
                            &failed
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            clients,
        }
    }

    fn ok(&self) -> usize {
        self.ok.load(Ordering::Relaxed)
    }

    /// Waits until `n` requests in all were answered.
    async fn reach(&self, what: &str, n: usize) {
        within(what, async {
            while self.ok() < n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
    }

    /// Stops the clients; returns (answered, failed).
    async fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::Relaxed);
        for c in self.clients {
            c.await.expect("load client");
        }
        let ok = self.ok.load(Ordering::Relaxed);
        (ok, self.failed.load(Ordering::Relaxed))
    }
}

/// Under `load`: starts the successor on the same address, SIGTERMs `old`, waits for it to exit
/// 0 and for 300 more answered requests. Returns the successor and (answered, failed).
async fn restart(
    load: Load,
    old: &mut Server,
    start_new: impl FnOnce() -> Server,
) -> (Server, (usize, usize)) {
    let new = start_new();
    assert_eq!(new.addr, old.addr);
    old.signal(libc::SIGTERM);
    let status = old.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "old process log:\n{}", old.log());
    load.reach("requests after the restart", load.ok() + 300)
        .await;
    (new, load.finish().await)
}

/// A restart under load: a new process starts on the same port (SO_REUSEPORT), the old one
/// drains on SIGTERM, and clients connecting all along see no failed request. The connections
/// still queued on the old process's listeners when it closes them move to the new one when
/// the kernel allows it (`net.ipv4.tcp_migrate_req = 1`, which .ci/run sets); without it they
/// are reset, and the test then only checks that the new process took over (the handover test
/// below needs no sysctl).
async fn restart_under_load_loses_no_connection(backend: Backend) {
    let migrate = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req")
        .is_ok_and(|v| v.trim() == "1");
    let mut old = Server::start(backend, &["--drain-timeout", "10"]);
    let addr = old.addr;
    let load = Load::start(addr);
    load.reach("requests before the restart", 200).await;

    let config = format!("[[listen]]\naddr = \"{addr}\"\n");
    let (_new, (ok, failed)) = restart(load, &mut old, || {
        Server::start_with_config(backend, &config, &[])
    })
    .await;
    if migrate {
        assert_eq!(
            failed,
            0,
            "{failed} of {} requests failed across the restart",
            ok + failed
        );
    } else {
        eprintln!(
            "net.ipv4.tcp_migrate_req is 0 here: {failed} of {} requests failed across the \
             restart (queued connections are reset without it)",
            ok + failed
        );
    }
}

/// The inodes of the sockets listening on `port` (this network namespace, IPv4 and IPv6).
fn listening_sockets(port: u16) -> std::collections::BTreeSet<u64> {
    let mut out = std::collections::BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = f
                .get(1)
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| u16::from_str_radix(p, 16).ok());
            // State 0A is LISTEN; field 9 is the inode.
            if local_port == Some(port) && f.get(3) == Some(&"0A") {
                if let Some(inode) = f.get(9).and_then(|i| i.parse().ok()) {
                    out.insert(inode);
                }
            }
        }
    }
    out
}

/// With `handover_socket`, the new process takes the old one's listening sockets over, so the
/// old one's drain closes nothing and no request fails, whatever the kernel's
/// `tcp_migrate_req`: the sockets listening after the restart are the very same (same
/// inodes), plus one more for the new process's third shard.
async fn restart_with_handover_keeps_the_listening_sockets(backend: Backend) {
    let path = std::env::temp_dir().join(format!(
        "ringgate-handover-{}-{}.sock",
        std::process::id(),
        backend.log_name()
    ));
    let handover = format!("handover_socket = \"{}\"\n", path.display());
    let mut old = Server::start_with_config(backend, &handover, &["--drain-timeout", "10"]);
    let addr = old.addr;
    let before = listening_sockets(addr.port());
    assert_eq!(before.len(), 2, "one listener per shard: {before:?}");
    let load = Load::start(addr);
    load.reach("requests before the restart", 200).await;

    let config = format!("{handover}[[listen]]\naddr = \"{addr}\"\n");
    let (new, (ok, failed)) = restart(load, &mut old, || {
        Server::start_sharded(backend, 3, &config, &[])
    })
    .await;
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed across the restart",
        ok + failed
    );
    let after = listening_sockets(addr.port());
    assert!(
        before.is_subset(&after) && after.len() == 3,
        "the old sockets plus one: before {before:?}, after {after:?}\nnew log:\n{}",
        new.log()
    );
    assert!(
        old.log().contains("handed the listening sockets"),
        "{}",
        old.log()
    );
    // The new process offers them on the same path for the next restart.
    assert!(path.exists(), "the successor serves {}", path.display());
    drop(new);
    let _ = std::fs::remove_file(&path);
}

/// A handover restart while the old process holds idle WebSockets (on io_uring each has a
/// multishot receive armed) and one that stopped in the middle of a frame: each gets close
/// 1001 and then the end of the stream, the old process exits 0, the new one serves.
async fn handover_drain_closes_connections_with_receives_in_flight(backend: Backend) {
    let path = std::env::temp_dir().join(format!(
        "ringgate-handover-rx-{}-{}.sock",
        std::process::id(),
        backend.log_name()
    ));
    let handover = format!(
        "handover_socket = \"{}\"\nclose_timeout = 2.0\n",
        path.display()
    );
    let mut old = Server::start_with_config(backend, &handover, &["--drain-timeout", "10"]);
    let addr = old.addr;
    let mut idle = Vec::new();
    for _ in 0..20 {
        let mut ws = old.raw_ws().await;
        // An echo: the server has read from this connection and waits for more.
        ws.send(&encode_frame(0x82, Some([1, 2, 3, 4]), b"up"))
            .await;
        assert_eq!(
            ws.read_frame().await.map(|f| f.payload),
            Some(b"up".to_vec())
        );
        idle.push(ws);
    }
    let mut partial = old.raw_ws().await;
    let frame = encode_frame(0x82, Some([5, 6, 7, 8]), &[7u8; 100]);
    partial.send(&frame[..40]).await;

    let config = format!("{handover}[[listen]]\naddr = \"{addr}\"\n");
    let new = Server::start_sharded(backend, 2, &config, &[]);
    old.signal(libc::SIGTERM);
    for ws in idle.iter_mut().chain([&mut partial]) {
        assert_eq!(ws.expect_close().await, 1001);
    }
    for mut ws in idle {
        // Our close reply; then the server ends the connection.
        ws.send(&encode_frame(0x88, Some([0; 4]), &1001u16.to_be_bytes()))
            .await;
        ws.expect_eof().await;
    }
    // Mid-frame, it cannot reply: the server gives up after close_timeout.
    partial.expect_eof().await;
    let status = old.wait_exit(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(0), "old process log:\n{}", old.log());
    let mut ws = new.ws().await;
    echo(&mut ws, Message::text("after")).await;
    drop(new);
    let _ = std::fs::remove_file(&path);
}
