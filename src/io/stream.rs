//! [`Stream`]: the one connection type of the crate, plain or TLS (server-accepted or
//! client-initiated) over either backend, and [`connect`], the client constructor.
//!
//! A server connection comes from [`Listener::accept`](super::Listener::accept) plain, and
//! becomes TLS with [`Stream::accept_tls`]. An upstream connection comes from [`connect`]:
//!
//! ```ignore
//! // Every resolved address in turn, then TLS when a client config is given; one timeout
//! // bounds it all. Errors are `UpstreamError::{Connect, Tls, Timeout(Phase::Connect)}`.
//! let io = ringgate::io::connect(backend, &addrs, Some((&client_config, host)), timeout).await?;
//! let h2 = io.alpn_protocol() == Some(b"h2");
//! let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
//! ```
//!
//! Either way the stream implements tokio's `AsyncRead`/`AsyncWrite` (hyper takes it through
//! `hyper_util::rt::TokioIo`) and [`WriteOutbox`] (a WebSocket session writes its outbox with
//! it). On a plain io_uring socket the outbox's chunks go to the kernel as they are, without a
//! copy; TLS copies into records anyway. As with any `AsyncWrite`, flush after writing: on
//! io_uring a write reaches the ring when the stream is next polled (hyper, rustls, the session
//! and `tokio::io::copy_bidirectional` do).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::backend::{connect_tcp, UringStream};
use super::server_tls::ServerTls;
use super::Backend;
use crate::error::{Phase, UpstreamError};
use crate::ws::outbox::{write_slices, Outbox, WriteOutbox};

/// A connection: plain or TLS, accepted or connected, on either backend. Which one is private
/// to `io`: callers read, write and ask [`is_tls`](Self::is_tls) or
/// [`alpn_protocol`](Self::alpn_protocol).
pub struct Stream(Inner);

enum Inner {
    Tcp(tokio::net::TcpStream),
    Uring(UringStream),
    // TLS runs over a plain `Stream`; boxed, so a plain connection does not carry rustls'
    // state in its size. The server side holds no TLS buffer while idle (`server_tls`).
    TlsServer(Box<ServerTls>),
    TlsClient(Box<tokio_rustls::client::TlsStream<Stream>>),
    // One stream of an HTTP/2 connection (a WebSocket over RFC 8441): its bytes travel through
    // hyper's HTTP/2 connection, which its own task drives.
    H2(Box<hyper_util::rt::TokioIo<hyper::upgrade::Upgraded>>),
    // Bytes already read from the stream (looking for the HTTP/2 preface on an h2c listener),
    // read again before the stream's own.
    Prefixed(Box<(bytes::Bytes, Stream)>),
}

impl Stream {
    pub(super) fn tcp(s: tokio::net::TcpStream) -> Stream {
        Stream(Inner::Tcp(s))
    }

    pub(super) fn uring(s: UringStream) -> Stream {
        Stream(Inner::Uring(s))
    }

    /// An HTTP/2 stream hyper handed over after answering an extended CONNECT (RFC 8441).
    pub fn h2(upgraded: hyper::upgrade::Upgraded) -> Stream {
        Stream(Inner::H2(Box::new(hyper_util::rt::TokioIo::new(upgraded))))
    }

    /// This stream with `read` put back in front of what is still to come.
    pub fn unread(self, read: bytes::Bytes) -> Stream {
        if read.is_empty() {
            return self;
        }
        Stream(Inner::Prefixed(Box::new((read, self))))
    }

    /// Runs the server side of a TLS handshake on this (plain, accepted) stream. The caller
    /// bounds it with its handshake timeout.
    pub async fn accept_tls(self, acceptor: &TlsAcceptor) -> io::Result<Stream> {
        let tls = ServerTls::accept(self, acceptor.config().clone()).await?;
        Ok(Stream(Inner::TlsServer(Box::new(tls))))
    }

    pub fn is_tls(&self) -> bool {
        match &self.0 {
            Inner::Prefixed(p) => p.1.is_tls(),
            i => matches!(i, Inner::TlsServer(_) | Inner::TlsClient(_)),
        }
    }

    /// The protocol ALPN settled on (`h2`, `http/1.1`), if TLS and the peers agreed on one.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        match &self.0 {
            Inner::TlsServer(s) => s.alpn_protocol(),
            Inner::TlsClient(s) => s.get_ref().1.alpn_protocol(),
            Inner::Prefixed(p) => p.1.alpn_protocol(),
            Inner::Tcp(_) | Inner::Uring(_) | Inner::H2(_) => None,
        }
    }

    /// The server name (SNI) the client asked for, on an accepted TLS stream.
    pub fn server_name(&self) -> Option<&str> {
        match &self.0 {
            Inner::TlsServer(s) => s.server_name(),
            Inner::Prefixed(p) => p.1.server_name(),
            _ => None,
        }
    }
}

/// Opens a connection to the first of `addrs` that accepts, on the shard's `backend`, with
/// `TCP_NODELAY`; with `tls = Some((config, server_name))` runs a TLS client handshake on it
/// (`server_name` is checked against the certificate and sent as SNI; ALPN comes from
/// `config`). `timeout` bounds the whole, all addresses and the handshake.
///
/// Errors: [`UpstreamError::Connect`] (no address accepted: the last address's error),
/// [`UpstreamError::Tls`] (bad server name, failed handshake),
/// [`UpstreamError::Timeout`]`(`[`Phase::Connect`]`)`. Nothing was sent in any of them.
pub async fn connect(
    backend: Backend,
    addrs: &[SocketAddr],
    tls: Option<(&Arc<rustls::ClientConfig>, &str)>,
    timeout: Duration,
) -> Result<Stream, UpstreamError> {
    tokio::time::timeout(timeout, connect_now(backend, addrs, tls))
        .await
        .unwrap_or(Err(UpstreamError::Timeout(Phase::Connect)))
}

async fn connect_now(
    backend: Backend,
    addrs: &[SocketAddr],
    tls: Option<(&Arc<rustls::ClientConfig>, &str)>,
) -> Result<Stream, UpstreamError> {
    let tls = match tls {
        Some((config, name)) => Some((
            TlsConnector::from(config.clone()),
            ServerName::try_from(name.to_owned())
                .map_err(|e| UpstreamError::Tls(format!("server name {name:?}: {e}")))?,
        )),
        None => None,
    };
    let mut last = UpstreamError::Connect("no address".into());
    let mut plain = None;
    for &addr in addrs {
        match connect_tcp(backend, addr).await {
            Ok(s) => {
                plain = Some(s);
                break;
            }
            Err(e) => last = UpstreamError::Connect(e.to_string()),
        }
    }
    let plain = plain.ok_or(last)?;
    let Some((connector, name)) = tls else {
        return Ok(plain);
    };
    let tls = connector
        .connect(name, plain)
        .await
        .map_err(|e| UpstreamError::Tls(e.to_string()))?;
    Ok(Stream(Inner::TlsClient(Box::new(tls))))
}

/// Runs `$e` with `$s` bound to the stream of whichever variant `$inner` is, as an
/// `AsyncRead + AsyncWrite` (the io_uring and the TLS server ones through their own methods,
/// `$ue` with `$u`).
macro_rules! each {
    ($inner:expr, $s:ident => $e:expr, $u:ident => $ue:expr) => {
        match $inner {
            Inner::Tcp($s) => $e,
            Inner::Uring($u) => $ue,
            Inner::TlsServer($u) => $ue,
            Inner::TlsClient($s) => $e,
            Inner::H2($s) => $e,
            Inner::Prefixed(p) => {
                let $s = &mut p.1;
                $e
            }
        }
    };
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Inner::Prefixed(p) = &mut this.0 {
            if !p.0.is_empty() {
                let n = p.0.len().min(buf.remaining());
                buf.put_slice(&p.0.split_to(n));
                return Poll::Ready(Ok(()));
            }
        }
        each!(&mut this.0,
            s => Pin::new(s).poll_read(cx, buf),
            u => u.poll_read(cx, buf))
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        each!(&mut self.get_mut().0,
            s => Pin::new(s).poll_write(cx, buf),
            u => u.poll_write_vectored(cx, &[io::IoSlice::new(buf)]))
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        each!(&mut self.get_mut().0,
            s => Pin::new(s).poll_write_vectored(cx, bufs),
            u => u.poll_write_vectored(cx, bufs))
    }
    fn is_write_vectored(&self) -> bool {
        match &self.0 {
            Inner::Prefixed(p) => p.1.is_write_vectored(),
            Inner::Uring(_) => true,
            Inner::Tcp(s) => s.is_write_vectored(),
            Inner::TlsServer(_) => true,
            Inner::TlsClient(s) => s.is_write_vectored(),
            Inner::H2(s) => s.is_write_vectored(),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(&mut self.get_mut().0,
            s => Pin::new(s).poll_flush(cx),
            u => u.poll_flush(cx))
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        each!(&mut self.get_mut().0,
            s => Pin::new(s).poll_shutdown(cx),
            u => u.poll_shutdown(cx))
    }
}

impl WriteOutbox for Stream {
    fn poll_write_outbox(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Outbox,
    ) -> Poll<io::Result<usize>> {
        // The stream's own way (io_uring's without a copy), not the generic one.
        if let Inner::Prefixed(p) = &mut self.0 {
            return p.1.poll_write_outbox(cx, out);
        }
        each!(&mut self.0,
            s => write_slices(s, cx, out),
            u => u.poll_write_outbox(cx, out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::tls::{acceptor, dev_cert, CertSource, TlsSettings};
    use crate::io::{block_on, listen, Listener};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const BACKENDS: [Backend; 2] = [Backend::Uring, Backend::Epoll];
    const LONG: Duration = Duration::from_secs(10);

    fn listener(backend: Backend) -> (Listener, SocketAddr) {
        let l = listen::bind_reuseport("127.0.0.1:0".parse().unwrap(), 1, 16)
            .unwrap()
            .remove(0);
        let addr = l.local_addr().unwrap();
        (Listener::new(backend, l).unwrap(), addr)
    }

    /// A port nothing listens on (bound, then closed).
    fn closed_port() -> SocketAddr {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    }

    /// A TLS acceptor for localhost (ALPN `h2`, `http/1.1`) and a client config that trusts it.
    fn tls_pair(alpn: &[&[u8]]) -> (TlsAcceptor, Arc<rustls::ClientConfig>) {
        use rustls::pki_types::pem::PemObject;
        let d = dev_cert().unwrap();
        let dir = std::env::temp_dir().join(format!(
            "ringgate-stream-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, &d.cert_pem).unwrap();
        std::fs::write(&key, &d.key_pem).unwrap();
        let acceptor = acceptor(&TlsSettings {
            default: Some(CertSource::Files { cert, key }),
            sni: vec![],
            client_ca: None,
        })
        .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls::pki_types::CertificateDer::pem_slice_iter(d.ca_pem.as_bytes()) {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        (acceptor, Arc::new(config))
    }

    /// Accepts one connection (TLS with `acceptor`) and echoes what it reads until EOF.
    fn echo_server(l: Listener, acceptor: Option<TlsAcceptor>) -> tokio::task::JoinHandle<()> {
        tokio::task::spawn_local(async move {
            let (mut s, _) = l.accept().await.unwrap();
            if let Some(a) = acceptor {
                s = s.accept_tls(&a).await.unwrap();
                assert!(s.is_tls());
                assert_eq!(s.server_name(), Some("localhost"));
            }
            let mut buf = [0u8; 256];
            loop {
                let n = s.read(&mut buf).await.unwrap();
                if n == 0 {
                    break;
                }
                s.write_all(&buf[..n]).await.unwrap();
                // io_uring writes go out when the write is polled again: a flush.
                s.flush().await.unwrap();
            }
            s.shutdown().await.unwrap();
        })
    }

    /// An echo, then both sides close; returns once the server is done, so no operation is
    /// left in flight when the runtime goes.
    async fn round_trip(mut s: Stream, server: tokio::task::JoinHandle<()>) {
        s.write_all(b"hello").await.unwrap();
        s.flush().await.unwrap();
        let mut got = [0u8; 5];
        s.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        s.shutdown().await.unwrap();
        assert_eq!(s.read(&mut got).await.unwrap(), 0);
        server.await.unwrap();
    }

    #[test]
    fn connects_plain_trying_each_address_in_turn() {
        for backend in BACKENDS {
            block_on(backend, async move {
                let (l, addr) = listener(backend);
                let server = echo_server(l, None);
                let s = connect(backend, &[closed_port(), addr], None, LONG)
                    .await
                    .unwrap();
                assert!(!s.is_tls());
                assert_eq!(s.alpn_protocol(), None);
                round_trip(s, server).await;
            })
            .unwrap();
        }
    }

    #[test]
    fn refused_and_empty_are_connect_errors() {
        for backend in BACKENDS {
            block_on(backend, async move {
                let e = connect(backend, &[closed_port()], None, LONG)
                    .await
                    .err()
                    .unwrap();
                assert!(matches!(e, UpstreamError::Connect(_)), "{e:?}");
                assert!(e.nothing_sent());
                let e = connect(backend, &[], None, LONG).await.err().unwrap();
                assert_eq!(e, UpstreamError::Connect("no address".into()));
            })
            .unwrap();
        }
    }

    #[test]
    fn connects_tls_to_an_accepted_tls_stream() {
        for backend in BACKENDS {
            block_on(backend, async move {
                let (acceptor, client) = tls_pair(&[b"h2", b"http/1.1"]);
                let (l, addr) = listener(backend);
                let server = echo_server(l, Some(acceptor));
                let s = connect(backend, &[addr], Some((&client, "localhost")), LONG)
                    .await
                    .unwrap();
                assert!(s.is_tls());
                // The server's preference.
                assert_eq!(s.alpn_protocol(), Some(&b"h2"[..]));
                assert_eq!(s.server_name(), None);
                round_trip(s, server).await;
            })
            .unwrap();
        }
    }

    #[test]
    fn tls_failures_are_tls_errors() {
        for backend in BACKENDS {
            block_on(backend, async move {
                let (acceptor, client) = tls_pair(&[]);
                let (l, addr) = listener(backend);
                tokio::task::spawn_local(async move {
                    let (s, _) = l.accept().await.unwrap();
                    let _ = s.accept_tls(&acceptor).await;
                });
                // The certificate is for localhost.
                let e = connect(backend, &[addr], Some((&client, "example.com")), LONG)
                    .await
                    .err()
                    .unwrap();
                assert!(matches!(e, UpstreamError::Tls(_)), "{e:?}");
                assert!(e.nothing_sent());
                let e = connect(backend, &[addr], Some((&client, "")), LONG)
                    .await
                    .err()
                    .unwrap();
                assert!(matches!(e, UpstreamError::Tls(_)), "{e:?}");
            })
            .unwrap();
        }
    }

    #[test]
    fn a_silent_server_is_a_connect_timeout() {
        for backend in BACKENDS {
            block_on(backend, async move {
                let (_, client) = tls_pair(&[]);
                // Accepted by the kernel (backlog), never answered.
                let (_l, addr) = listener(backend);
                let short = Duration::from_millis(200);
                let e = connect(backend, &[addr], Some((&client, "localhost")), short)
                    .await
                    .err()
                    .unwrap();
                assert_eq!(e, UpstreamError::Timeout(Phase::Connect));
                assert!(e.nothing_sent());
            })
            .unwrap();
        }
    }

    /// An accepted server TLS stream and a tokio-rustls client connected to it.
    async fn tls_streams(
        backend: Backend,
    ) -> (
        Stream,
        tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    ) {
        let (acceptor, client) = tls_pair(&[b"http/1.1"]);
        let (l, addr) = listener(backend);
        let server = tokio::task::spawn_local(async move {
            let (s, _) = l.accept().await.unwrap();
            s.accept_tls(&acceptor).await.unwrap()
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("localhost").unwrap();
        let c = TlsConnector::from(client).connect(name, tcp).await.unwrap();
        (server.await.unwrap(), c)
    }

    fn held(s: &Stream) -> usize {
        match &s.0 {
            Inner::TlsServer(t) => t.held(),
            _ => panic!("not a server TLS stream"),
        }
    }

    #[test]
    fn tls_small_reads_and_a_key_update_lose_nothing_and_idle_holds_no_buffer() {
        for backend in BACKENDS {
            block_on(backend, async move {
                let (mut server, mut client) = tls_streams(backend).await;
                let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
                let sent = data.clone();
                let writer = tokio::task::spawn_local(async move {
                    client.write_all(&sent[..50_000]).await.unwrap();
                    // New keys both ways from here: the server answers with an update of its own.
                    client.get_mut().1.refresh_traffic_keys().unwrap();
                    client.write_all(&sent[50_000..]).await.unwrap();
                    client.flush().await.unwrap();
                    client
                });
                // Reads smaller than a record: the rest of each record waits in the stream.
                let mut got = Vec::new();
                let mut buf = [0u8; 7];
                while got.len() < data.len() {
                    let n = server.read(&mut buf).await.unwrap();
                    assert!(n > 0, "{backend:?}: early end after {} bytes", got.len());
                    got.extend_from_slice(&buf[..n]);
                }
                assert!(got == data, "{backend:?}: the stream arrived altered");
                let mut client = writer.await.unwrap();
                server.write_all(b"after").await.unwrap();
                server.flush().await.unwrap();
                let mut five = [0u8; 5];
                client.read_exact(&mut five).await.unwrap();
                assert_eq!(&five, b"after");
                assert_eq!(
                    held(&server),
                    0,
                    "{backend:?}: an idle stream holds a buffer"
                );
                // close_notify: a clean end of the stream.
                client.shutdown().await.unwrap();
                assert_eq!(server.read(&mut buf).await.unwrap(), 0);
            })
            .unwrap();
        }
    }

    #[test]
    fn tls_large_writes_arrive_whole_and_a_cut_connection_is_an_error() {
        for backend in BACKENDS {
            block_on(backend, async move {
                let (mut server, mut client) = tls_streams(backend).await;
                const LEN: usize = 1_000_000;
                let data: Vec<u8> = (0..LEN).map(|i| (i % 253) as u8).collect();
                let reader = tokio::task::spawn_local(async move {
                    let mut got = vec![0; LEN];
                    client.read_exact(&mut got).await.unwrap();
                    (client, got)
                });
                let (a, b) = data.split_at(400_000);
                server.write_all(a).await.unwrap();
                // Several slices are sealed together, as far as one write goes.
                let slices = [io::IoSlice::new(&b[..100]), io::IoSlice::new(&b[100..])];
                let n = server.write_vectored(&slices).await.unwrap();
                assert!(n > 100, "{backend:?}: {n}");
                server.write_all(&b[n..]).await.unwrap();
                server.flush().await.unwrap();
                let (client, got) = reader.await.unwrap();
                assert!(got == data, "{backend:?}: the stream arrived altered");
                assert_eq!(held(&server), 0);
                // The client's socket goes without close_notify: a truncation, not an end.
                drop(client);
                let e = server.read(&mut [0u8; 16]).await.unwrap_err();
                assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{backend:?}");
            })
            .unwrap();
        }
    }
}
