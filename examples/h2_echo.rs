//! Echo load over TLS, WebSockets over HTTP/1.1 upgrades or over HTTP/2 streams (RFC 8441),
//! for bench/H2.md: server CPU per echoed message, and server memory per idle WebSocket.
//! Targets 127.0.0.1 only; every loop is bounded in count and time.
//!
//! ```sh
//! h2_echo --port 8443 --ca ca.pem --mode h2 --sockets 100 --connections 1 \
//!     --messages 200000 --server-pid PID            # echo: CPU per message
//! h2_echo ... --mode h2 --sockets 100 --idle        # memory per idle socket
//! h2_echo ... --idle --messages 0                     # the same, no message exchanged
//! h2_echo ... --idle --hold 30                        # then keep the sockets 30 s (heap profile)
//! ```
//!
//! `--mode h1`: one TLS connection per socket (ALPN http/1.1, GET upgrade). `--mode h2`: the
//! sockets spread over `--connections` TLS connections (ALPN h2, extended CONNECT). One
//! message in flight per socket; the client is one thread (pin it with taskset).

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::Empty;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const MAX_SOCKETS: usize = 10_000;
const MAX_MESSAGES: u64 = 10_000_000;
const TIME_LIMIT: Duration = Duration::from_secs(120);

struct Args {
    port: u16,
    ca: String,
    h2: bool,
    sockets: usize,
    connections: usize,
    messages: u64,
    size: usize,
    server_pid: Option<u32>,
    idle: bool,
    /// Seconds to keep the idle sockets open after measuring (at most 600).
    hold: u64,
}

fn args() -> Args {
    let mut a = Args {
        port: 8443,
        ca: String::new(),
        h2: false,
        sockets: 100,
        connections: 1,
        messages: 200_000,
        size: 32,
        server_pid: None,
        idle: false,
        hold: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut v = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--port" => a.port = v().parse().expect("--port"),
            "--ca" => a.ca = v(),
            "--mode" => a.h2 = v() == "h2",
            "--sockets" => a.sockets = v().parse().expect("--sockets"),
            "--connections" => a.connections = v().parse().expect("--connections"),
            "--messages" => a.messages = v().parse().expect("--messages"),
            "--size" => a.size = v().parse().expect("--size"),
            "--server-pid" => a.server_pid = Some(v().parse().expect("--server-pid")),
            "--idle" => a.idle = true,
            "--hold" => a.hold = v().parse::<u64>().expect("--hold").min(600),
            other => panic!("unknown argument {other}"),
        }
    }
    assert!(a.sockets <= MAX_SOCKETS && a.messages <= MAX_MESSAGES);
    assert!(a.connections >= 1 && !a.ca.is_empty());
    a
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type Ws = WebSocketStream<Box<dyn Io>>;

async fn tls(
    port: u16,
    config: &Arc<rustls::ClientConfig>,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    let name = ServerName::try_from("localhost").expect("name");
    tokio_rustls::TlsConnector::from(config.clone())
        .connect(name, tcp)
        .await
        .expect("tls")
}

fn client_config(ca: &str, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).expect("read --ca") {
        roots.add(c.expect("CA")).expect("CA");
    }
    let mut c = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    c.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(c)
}

async fn open(a: &Args) -> Vec<Ws> {
    let mut all = Vec::with_capacity(a.sockets);
    if !a.h2 {
        let config = client_config(&a.ca, b"http/1.1");
        for _ in 0..a.sockets {
            let io: Box<dyn Io> = Box::new(tls(a.port, &config).await);
            let (ws, _) = tokio_tungstenite::client_async("wss://localhost/ws/echo", io)
                .await
                .expect("upgrade");
            all.push(ws);
        }
        return all;
    }
    let config = client_config(&a.ca, b"h2");
    let mut senders = Vec::new();
    for _ in 0..a.connections {
        let io = tls(a.port, &config).await;
        let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake::<_, Empty<Bytes>>(TokioIo::new(io))
            .await
            .expect("h2 handshake");
        tokio::spawn(conn);
        senders.push(send);
    }
    for i in 0..a.sockets {
        let send = &mut senders[i % a.connections];
        let mut resp = loop {
            let mut req = http::Request::builder()
                .method(http::Method::CONNECT)
                .uri("https://localhost/ws/echo")
                .header("sec-websocket-version", "13")
                .body(Empty::new())
                .expect("request");
            req.extensions_mut()
                .insert(hyper::ext::Protocol::from_static("websocket"));
            send.ready().await.expect("ready");
            match send.send_request(req).await {
                Ok(r) => break r,
                // The server's SETTINGS (extended CONNECT allowed) not there yet.
                Err(_) if i < a.connections => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(e) => panic!("CONNECT: {e}"),
            }
        };
        assert_eq!(resp.status(), 200);
        let up = hyper::upgrade::on(&mut resp).await.expect("stream");
        let io: Box<dyn Io> = Box::new(TokioIo::new(up));
        all.push(WebSocketStream::from_raw_socket(io, Role::Client, None).await);
    }
    all
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after = &stat[stat.rfind(')').expect("stat") + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .expect("status")
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Echoes until `budget` is spent or the time limit passes; returns the messages echoed.
async fn echo(sockets: &mut [Ws], budget: u64, size: usize) -> u64 {
    let left = Rc::new(Cell::new(budget));
    let deadline = Instant::now() + TIME_LIMIT;
    let payload = Bytes::from(vec![b'x'; size]);
    let runs = sockets.iter_mut().map(|ws| {
        let (left, payload) = (left.clone(), payload.clone());
        async move {
            let mut n = 0;
            while left.get() > 0 && Instant::now() < deadline {
                left.set(left.get() - 1);
                ws.send(Message::Binary(payload.to_vec()))
                    .await
                    .expect("send");
                loop {
                    match ws.next().await {
                        Some(Ok(Message::Binary(b))) => {
                            assert_eq!(b.len(), size);
                            break;
                        }
                        Some(Ok(_)) => {}
                        other => panic!("echo: {other:?}"),
                    }
                }
                n += 1;
            }
            n
        }
    });
    futures_util::future::join_all(runs).await.into_iter().sum()
}

fn main() {
    let a = args();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let pid = a.server_pid;
        let rss0 = pid.map(rss_kib);
        let mut sockets = open(&a).await;
        let mode = if a.h2 { "h2" } else { "h1" };
        let conns = if a.h2 { a.connections } else { a.sockets };
        if a.idle {
            // One message each (every session has run; `--messages 0`: none), then idle.
            let each = a.messages.min(a.sockets as u64);
            if each > 0 {
                echo(&mut sockets, each, a.size).await;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
            let (Some(pid), Some(rss0)) = (pid, rss0) else {
                panic!("--idle needs --server-pid")
            };
            let rss = rss_kib(pid);
            println!(
                "RESULT idle mode={mode} sockets={} connections={conns} rss_before_kib={rss0} \
                 rss_kib={rss} per_socket_kib={:.2}",
                a.sockets,
                (rss as f64 - rss0 as f64) / a.sockets as f64
            );
            tokio::time::sleep(Duration::from_secs(a.hold)).await;
            return;
        }
        echo(&mut sockets, (a.messages / 10).max(1000), a.size).await;
        let cpu0 = pid.map(cpu_ticks);
        let t0 = Instant::now();
        let n = echo(&mut sockets, a.messages, a.size).await;
        let secs = t0.elapsed().as_secs_f64();
        let cpu = pid.zip(cpu0).map(|(p, c0)| cpu_ticks(p) - c0);
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let us_per_msg = cpu.map_or(f64::NAN, |t| t as f64 / hz * 1e6 / n as f64);
        println!(
            "RESULT echo mode={mode} sockets={} connections={conns} messages={n} secs={secs:.3} \
             per_s={:.0} server_cpu_us_per_msg={us_per_msg:.2}",
            a.sockets,
            n as f64 / secs
        );
    });
}
