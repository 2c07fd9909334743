//! One upstream of a route, as one shard sees it: its addresses, its keep-alive pool (HTTP/1.1)
//! or shared connection (h2), its health, and connections to it over the shard's own sockets
//! (io_uring or epoll). Per shard (`Rc`, `Cell`): no locks; each shard learns health on its own.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::task::AbortHandle;

use super::body::ReqBody;
use super::config::{Http2, UpstreamUrl};
use super::Failure;
use crate::error::UpstreamError;
use crate::io::{self, Backend, LocalExec, Stream};

pub enum Sender {
    H1(http1::SendRequest<ReqBody>),
    H2(http2::SendRequest<ReqBody>),
}

/// A connection a request holds: its sender and the task driving it.
pub struct Held {
    pub sender: Sender,
    pub driver: AbortHandle,
}

struct Idle {
    held: Held,
    since: Instant,
}

pub struct Upstream {
    pub url: UpstreamUrl,
    /// `scheme://authority`, the label in metrics and logs.
    pub label: String,
    http2: Http2,
    addrs: RefCell<Option<Vec<SocketAddr>>>,
    /// For requests (ALPN per `http2`).
    tls: Option<Arc<rustls::ClientConfig>>,
    /// For upgrades and health checks: HTTP/1.1 only.
    tls_h1: Option<Arc<rustls::ClientConfig>>,
    /// Requests and tunnels in flight from this shard (least connections).
    pub outstanding: Cell<usize>,
    failures: Cell<u32>,
    ejected_until: Cell<Option<Instant>>,
    /// Taken out by the active health check.
    pub down: Cell<bool>,
    idle: RefCell<Vec<Idle>>,
    h2: RefCell<Option<(http2::SendRequest<ReqBody>, AbortHandle)>>,
}

impl Upstream {
    pub fn new(url: UpstreamUrl, http2: Http2, roots: &Arc<rustls::RootCertStore>) -> Upstream {
        let tls = url.tls.then(|| client_tls(roots, http2));
        let tls_h1 = url.tls.then(|| client_tls(roots, Http2::Never));
        Upstream {
            label: url.origin(),
            url,
            http2,
            addrs: RefCell::new(None),
            tls,
            tls_h1,
            outstanding: Cell::new(0),
            failures: Cell::new(0),
            ejected_until: Cell::new(None),
            down: Cell::new(false),
            idle: RefCell::new(Vec::new()),
            h2: RefCell::new(None),
        }
    }

    /// Neither taken out by health checks nor ejected after failures (an ejection ends by
    /// itself: the next request tries the upstream again).
    pub fn available(&self, now: Instant) -> bool {
        !self.down.get() && self.ejected_until.get().is_none_or(|t| now >= t)
    }

    pub fn success(&self) {
        self.failures.set(0);
        self.ejected_until.set(None);
    }

    /// A transport failure (connect, reset, timeout); `eject_after` in a row take the
    /// upstream out for `eject_for`.
    pub fn failure(&self, eject_after: u32, eject_for: Duration, shard: usize) {
        let n = self.failures.get().saturating_add(1);
        self.failures.set(n);
        if n >= eject_after {
            if self.ejected_until.get().is_none() {
                tracing::warn!(upstream = %self.label, shard, failures = n, "upstream ejected");
            }
            self.ejected_until.set(Some(Instant::now() + eject_for));
        }
    }

    /// Resolves the name at start, so a name that does not resolve is logged before traffic.
    pub async fn resolve_early(&self) {
        if let Err(e) = self.resolve().await {
            tracing::warn!(upstream = %self.label, error = ?e, "upstream name does not resolve (tried again on use)");
        }
    }

    /// Resolves the name (once; again after a failed connect).
    async fn resolve(&self) -> Result<Vec<SocketAddr>, Failure> {
        if let Some(a) = self.addrs.borrow().as_ref() {
            return Ok(a.clone());
        }
        let u = &self.url;
        let a: Vec<SocketAddr> = match u.host.parse::<std::net::IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, u.port)],
            Err(_) => tokio::net::lookup_host((u.host.as_str(), u.port))
                .await
                .map_err(|e| Failure::Refused(format!("{}: {e}", u.host)))?
                .collect(),
        };
        if a.is_empty() {
            return Err(Failure::Refused(format!("{}: no address", u.host)));
        }
        *self.addrs.borrow_mut() = Some(a.clone());
        Ok(a)
    }

    /// A new socket to the upstream (TLS when `https`/`wss`): `true` when ALPN chose h2.
    /// Callers bound the whole connect with their own timeout (`connect_timeout`).
    pub async fn connect_io(
        &self,
        backend: Backend,
        h1_only: bool,
    ) -> Result<(Stream, bool), Failure> {
        /// Only a ceiling: every caller applies the route's shorter connect timeout.
        const CEILING: Duration = Duration::from_secs(3600);
        let addrs = self.resolve().await?;
        let tls = if h1_only { &self.tls_h1 } else { &self.tls };
        let host = self.url.host.as_str();
        let io = io::connect(backend, &addrs, tls.as_ref().map(|c| (c, host)), CEILING)
            .await
            .map_err(|e| {
                self.addrs.borrow_mut().take();
                match e {
                    UpstreamError::Timeout(_) => Failure::ConnectTimeout,
                    e => Failure::Refused(e.to_string()),
                }
            })?;
        let h2 = match tls {
            None => !h1_only && self.http2 == Http2::PriorKnowledge,
            Some(_) => io.alpn_protocol() == Some(b"h2"),
        };
        Ok((io, h2))
    }

    /// A connection for one request: the shared h2 one, an idle pooled HTTP/1.1 one, or a new
    /// one (bounded by `connect`). `true` when reused.
    pub async fn connection(
        &self,
        backend: Backend,
        connect: Duration,
        pool_idle: Duration,
    ) -> Result<(Held, bool), Failure> {
        let h2 = self.h2.borrow().clone();
        if let Some((mut s, driver)) = h2 {
            let ready = tokio::time::timeout(connect, s.ready()).await;
            if !s.is_closed() && matches!(ready, Ok(Ok(()))) {
                let held = Held {
                    sender: Sender::H2(s),
                    driver,
                };
                return Ok((held, true));
            }
            self.h2.borrow_mut().take();
        }
        let now = Instant::now();
        loop {
            let Some(idle) = self.idle.borrow_mut().pop() else {
                break;
            };
            let mut held = idle.held;
            let fresh = now.duration_since(idle.since) < pool_idle;
            let Sender::H1(s) = &mut held.sender else {
                continue;
            };
            if !fresh || s.is_closed() {
                held.driver.abort();
                continue;
            }
            // A connection whose last body just ended may not be marked ready yet.
            let ready = tokio::time::timeout(Duration::from_millis(50), s.ready()).await;
            if matches!(ready, Ok(Ok(()))) {
                return Ok((held, true));
            }
            held.driver.abort();
        }
        match tokio::time::timeout(connect, self.open(backend)).await {
            Ok(r) => r.map(|h| (h, false)),
            Err(_) => {
                self.addrs.borrow_mut().take();
                Err(Failure::ConnectTimeout)
            }
        }
    }

    async fn open(&self, backend: Backend) -> Result<Held, Failure> {
        let (io, h2) = self.connect_io(backend, false).await?;
        let io = TokioIo::new(io);
        let broken = |e: hyper::Error| Failure::Refused(format!("handshake: {e}"));
        if h2 {
            let (sender, conn) = http2::Builder::new(LocalExec)
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(broken)?;
            let driver = tokio::task::spawn_local(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream h2 connection ended");
                }
            })
            .abort_handle();
            *self.h2.borrow_mut() = Some((sender.clone(), driver.clone()));
            Ok(Held {
                sender: Sender::H2(sender),
                driver,
            })
        } else {
            let (sender, conn) = http1::Builder::new()
                .max_buf_size(64 * 1024)
                .handshake(io)
                .await
                .map_err(broken)?;
            let driver = tokio::task::spawn_local(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream connection ended");
                }
            })
            .abort_handle();
            Ok(Held {
                sender: Sender::H1(sender),
                driver,
            })
        }
    }

    /// Returns an HTTP/1.1 connection whose exchange finished to the pool (or closes it).
    pub fn release(&self, held: Held, pool_size: usize) {
        let mut idle = self.idle.borrow_mut();
        if matches!(held.sender, Sender::H1(_)) && idle.len() < pool_size {
            idle.push(Idle {
                held,
                since: Instant::now(),
            });
        } else if matches!(held.sender, Sender::H1(_)) {
            held.driver.abort();
        }
    }

    /// Forgets a broken shared h2 connection.
    pub fn h2_broken(&self) {
        let broken = self
            .h2
            .borrow()
            .as_ref()
            .is_some_and(|(s, _)| s.is_closed());
        if broken {
            if let Some((_, d)) = self.h2.borrow_mut().take() {
                d.abort();
            }
        }
    }

    /// Closes the idle pooled connections (one turned out closed by the upstream: the others
    /// likely are too).
    pub fn drop_idle(&self) {
        for i in self.idle.borrow_mut().drain(..) {
            i.held.driver.abort();
        }
    }

    /// Closes every pooled connection (the route table was replaced).
    pub fn close_all(&self) {
        for i in self.idle.borrow_mut().drain(..) {
            i.held.driver.abort();
        }
        if let Some((_, d)) = self.h2.borrow_mut().take() {
            d.abort();
        }
    }
}

/// The root store for `https://`/`wss://` upstreams: webpki roots plus the route's `ca_file`.
pub fn roots(ca_file: Option<&std::path::Path>) -> Arc<rustls::RootCertStore> {
    io::tls::client_roots(ca_file, "route ca_file")
}

fn client_tls(roots: &Arc<rustls::RootCertStore>, http2: Http2) -> Arc<rustls::ClientConfig> {
    let alpn: &[&[u8]] = match http2 {
        Http2::Auto => &[b"h2", b"http/1.1"],
        Http2::PriorKnowledge => &[b"h2"],
        Http2::Never => &[b"http/1.1"],
    };
    io::tls::client_config(roots, alpn)
}

/// A request's claim on an upstream: counts it as outstanding and holds its connection until
/// the exchange ends. Dropped before the end (client gone, error), it closes an HTTP/1.1
/// connection so the upstream sees the request go away; an h2 stream is reset by hyper.
pub struct Lease {
    pub up: Rc<Upstream>,
    pub held: Option<Held>,
    pub done: bool,
    pub pool_size: usize,
}

impl Lease {
    pub fn new(up: Rc<Upstream>, pool_size: usize) -> Lease {
        up.outstanding.set(up.outstanding.get() + 1);
        Lease {
            up,
            held: None,
            done: false,
            pool_size,
        }
    }

    /// Closes the connection (broken, or abandoned mid-exchange).
    pub fn abort(&mut self) {
        if let Some(h) = self.held.take() {
            match h.sender {
                Sender::H1(_) => h.driver.abort(),
                Sender::H2(_) => self.up.h2_broken(),
            }
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.up
            .outstanding
            .set(self.up.outstanding.get().saturating_sub(1));
        if let Some(h) = self.held.take() {
            match h.sender {
                Sender::H1(_) if self.done => self.up.release(h, self.pool_size),
                Sender::H1(_) => h.driver.abort(),
                Sender::H2(_) => {}
            }
        }
    }
}
