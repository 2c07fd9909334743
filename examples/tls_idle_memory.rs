//! What an idle TLS connection holds on the server, measured without sockets: N rustls
//! client/server pairs (ring provider, the development certificate ringgate's `dev-cert`
//! makes, TLS 1.3 as negotiated by default) complete their handshake in memory, exchange an
//! upgrade request and a 101 response as ringgate's connections do, and then the server side
//! makes one read attempt that would block, as an idle connection's pending read does. A
//! counting allocator reports the heap the server connections hold at each step (requested
//! bytes; the real allocator rounds up to its size classes).
//!
//!     cargo run --release --example tls_idle_memory [-- N]
//!
//! Used for bench/TLS.md; prints sizes in bytes per connection.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{self, Read, Write};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConnection, ServerConnection};

struct Counting;
static LIVE: AtomicIsize = AtomicIsize::new(0);
/// Live allocations by exact size (sizes up to 64 KiB; larger ones in the last slot).
const SLOTS: usize = 65537;
#[allow(clippy::declare_interior_mutable_const)]
const ZERO: AtomicIsize = AtomicIsize::new(0);
static BY_SIZE: [AtomicIsize; SLOTS] = [ZERO; SLOTS];

fn count(size: usize, d: isize) {
    LIVE.fetch_add(d * size as isize, Ordering::Relaxed);
    BY_SIZE[size.min(SLOTS - 1)].fetch_add(d, Ordering::Relaxed);
}

fn by_size() -> Vec<isize> {
    BY_SIZE.iter().map(|a| a.load(Ordering::Relaxed)).collect()
}

// SAFETY: forwards to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        let p = System.alloc(l);
        if !p.is_null() {
            count(l.size(), 1);
        }
        p
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l);
        count(l.size(), -1);
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        let q = System.realloc(p, l, new);
        if !q.is_null() {
            count(l.size(), -1);
            count(new, 1);
        }
        q
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn live() -> isize {
    LIVE.load(Ordering::Relaxed)
}

/// A socket with nothing to read.
struct WouldBlock;
impl Read for WouldBlock {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
}

fn client_to_server(c: &mut ClientConnection, s: &mut ServerConnection) -> bool {
    let mut buf = Vec::new();
    while c.wants_write() {
        c.write_tls(&mut buf).expect("client write_tls");
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        s.read_tls(&mut rd).expect("server read_tls");
        s.process_new_packets().expect("server process");
    }
    !buf.is_empty()
}

fn server_to_client(s: &mut ServerConnection, c: &mut ClientConnection) -> bool {
    let mut buf = Vec::new();
    while s.wants_write() {
        s.write_tls(&mut buf).expect("server write_tls");
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        c.read_tls(&mut rd).expect("client read_tls");
        c.process_new_packets().expect("client process");
    }
    !buf.is_empty()
}

fn pump(c: &mut ClientConnection, s: &mut ServerConnection) {
    for _ in 0..32 {
        let a = client_to_server(c, s);
        let b = server_to_client(s, c);
        if !a && !b && !c.is_handshaking() && !s.is_handshaking() {
            return;
        }
    }
    panic!("handshake did not settle");
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let d = ringgate::io::tls::dev_cert().expect("dev cert");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(d.cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .expect("cert");
    let key = PrivateKeyDer::from_pem_slice(d.key_pem.as_bytes()).expect("key");
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    let server = Arc::new(server);
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(d.ca_pem.as_bytes()) {
        roots.add(c.expect("ca")).expect("root");
    }
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    client.resumption = rustls::client::Resumption::disabled();
    let client = Arc::new(client);
    let name = ServerName::try_from("localhost").expect("name");

    let request = b"GET /ws/echo HTTP/1.1\r\nHost: 127.0.0.1:8003\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
        Sec-WebSocket-Version: 13\r\n\r\n";
    let response = b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\
        connection: Upgrade\r\nsec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";

    // Warm up lazily initialised state (ring's CPU detection, the session cache) first.
    let mut pairs = Vec::with_capacity(n + 1);
    for i in 0..=n {
        if i == 1 {
            pairs.clear();
            pairs.shrink_to(n);
        }
        let c = ClientConnection::new(client.clone(), name.clone()).expect("client");
        let s = ServerConnection::new(server.clone()).expect("server");
        pairs.push((c, s));
        if i == 0 {
            let (c, s) = pairs.last_mut().expect("pair");
            pump(c, s);
        }
    }
    let size_server = std::mem::size_of::<ServerConnection>();
    // Heap of fresh pairs (both sides), then only the servers' share is followed below by
    // measuring around server-side steps and dropping the clients at the end.
    let mut step =
        |label: &str, f: &mut dyn FnMut(&mut ClientConnection, &mut ServerConnection)| {
            let before = live();
            for (c, s) in pairs.iter_mut() {
                f(c, s);
            }
            let per = (live() - before) as f64 / n as f64;
            println!("{label:58} {per:>8.0} B/conn (both sides)");
        };
    step("handshake (TLS 1.3, session tickets sent)", &mut |c, s| {
        pump(c, s)
    });
    step("upgrade request and 101 response", &mut |c, s| {
        c.writer().write_all(request).expect("write request");
        pump(c, s);
        let mut got = vec![0u8; request.len()];
        s.reader().read_exact(&mut got).expect("read request");
        s.writer().write_all(response).expect("write response");
        pump(c, s);
        let mut got = vec![0u8; response.len()];
        c.reader().read_exact(&mut got).expect("read response");
    });
    if let Some((_, s)) = pairs.first() {
        println!(
            "negotiated: {:?}, {:?}, key exchange {:?}",
            s.protocol_version(),
            s.negotiated_cipher_suite().map(|c| c.suite()),
            s.negotiated_key_exchange_group().map(|g| g.name())
        );
    }
    let before = live();
    for (_, s) in pairs.iter_mut() {
        let _ = s.read_tls(&mut WouldBlock);
    }
    let deframer = (live() - before) as f64 / n as f64;
    println!(
        "{:58} {deframer:>8.0} B/conn (server)",
        "server: idle read attempt (rustls deframer buffer)"
    );
    // Drop the clients; what is left is the servers' heap.
    let before_clients = live();
    let servers: Vec<ServerConnection> = pairs.into_iter().map(|(_, s)| s).collect();
    let clients_heap = (before_clients - live()) as f64 / n as f64;
    let before_servers = live();
    let sizes_before = by_size();
    drop(servers);
    let _ = before_servers;
    let sizes_after = by_size();
    // Summed by size, leaving out the last slot: it holds the Vec of connections itself.
    let server_heap: f64 = sizes_before[..SLOTS - 1]
        .iter()
        .zip(&sizes_after)
        .enumerate()
        .map(|(size, (b, a))| (b - a) as f64 * size as f64)
        .sum::<f64>()
        / n as f64;
    println!("heap blocks an idle server connection holds (size x count per connection):");
    let mut rest = 0.0;
    for (size, (b, a)) in sizes_before.iter().zip(&sizes_after).enumerate() {
        let per = (b - a) as f64 / n as f64;
        if per >= 0.05 {
            println!("  {size:>6} B x {per:.2}");
        } else if b != a && size < SLOTS - 1 {
            rest += (b - a) as f64 * size as f64 / n as f64;
        }
    }
    println!("  other sizes (rarer than 1 in 20 connections): {rest:.0} B");
    println!(
        "client connections (dropped):                              {clients_heap:>8.0} B/conn"
    );
    println!(
        "server connection, idle: heap {server_heap:.0} B + the ServerConnection value \
         {size_server} B (inline in tokio-rustls' TlsStream) = {:.0} B",
        server_heap + size_server as f64
    );
    println!(
        "sizes: ServerConnection {size_server} B, tokio_rustls::server::TlsStream<TcpStream> {} B, \
         ringgate::io::Stream {} B",
        std::mem::size_of::<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>(),
        std::mem::size_of::<ringgate::io::Stream>()
    );
}
