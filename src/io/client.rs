//! The upstream HTTP client of one shard, shared by the reverse proxy and the agent gateway:
//! base URLs, name resolution, connections over the shard's own sockets (plain or TLS, ALPN),
//! hyper's HTTP/1.1 and HTTP/2 handshakes, and one endpoint's keep-alive pool. Per shard
//! (`RefCell`): no locks.
//!
//! An HTTP/1.1 connection has no task of its own: whoever holds it drives it
//! ([`Conn::drive`]) from its own future — the request while it waits for the response head,
//! the response body while it is read — so an exchange costs no extra task, no wake-up of
//! another task and no hop between tasks. An idle pooled connection is driven by nobody: one
//! the upstream closed meanwhile is found closed when it is next checked out (driven once, it
//! reads the end of the stream). An HTTP/2 connection is shared by many requests and keeps
//! hyper's driver task.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::task::AbortHandle;

use super::{Backend, LocalExec, Stream};
use crate::error::{Phase, UpstreamError};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Which HTTP version to speak to an upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Http2 {
    /// `https://`: HTTP/2 when the server picks `h2` by ALPN, else HTTP/1.1; `http://`:
    /// HTTP/1.1.
    #[default]
    Auto,
    /// HTTP/2 without negotiation (h2c on `http://`; only `h2` offered by ALPN on `https://`).
    PriorKnowledge,
    /// HTTP/1.1 only.
    Never,
}

impl Http2 {
    fn alpn(self) -> &'static [&'static [u8]] {
        match self {
            Http2::Auto => &[b"h2", b"http/1.1"],
            Http2::PriorKnowledge => &[b"h2"],
            Http2::Never => &[b"http/1.1"],
        }
    }
}

/// A checked upstream base URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    pub tls: bool,
    /// Without IPv6 brackets.
    pub host: String,
    pub port: u16,
    /// Path prefix without a trailing slash ("" for none).
    pub path: String,
    /// `host[:port]` as written, for the `Host` header / `:authority`.
    pub authority: String,
}

impl BaseUrl {
    /// `http://` or `https://`; with `websocket`, also `ws://` and `wss://` (the same as the
    /// former two: one upstream serves requests and upgrades).
    pub fn parse(s: &str, websocket: bool) -> Result<BaseUrl, String> {
        let uri: http::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
        let tls = match (uri.scheme_str(), websocket) {
            (Some("http"), _) | (Some("ws"), true) => false,
            (Some("https"), _) | (Some("wss"), true) => true,
            (_, false) => return Err(format!("{s:?}: the scheme must be http:// or https://")),
            (_, true) => {
                return Err(format!(
                    "{s:?}: the scheme must be http://, https://, ws:// or wss://"
                ))
            }
        };
        let auth = uri
            .authority()
            .ok_or_else(|| format!("{s:?} has no host"))?;
        if auth.as_str().contains('@') {
            return Err(format!(
                "{s:?}: credentials in the URL are not supported (use headers)"
            ));
        }
        if uri.query().is_some() {
            return Err(format!("{s:?}: an upstream URL cannot have a query"));
        }
        let host = auth.host().trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{s:?} has no host"));
        }
        Ok(BaseUrl {
            tls,
            host: host.to_string(),
            port: auth.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            path: uri.path().trim_end_matches('/').to_string(),
            authority: auth.as_str().to_string(),
        })
    }

    /// `scheme://authority` (the label in metrics and logs).
    pub fn origin(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "https" } else { "http" },
            self.authority
        )
    }
}

/// Checks a configured header: its name, and its value when it is known at start.
pub fn check_header(name: &str, value: Option<&str>) -> Result<(), String> {
    http::HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{name:?} is not a header name"))?;
    match value.map(http::HeaderValue::from_str) {
        Some(Err(_)) => Err(format!("the value of {name} is not a valid header value")),
        _ => Ok(()),
    }
}

/// An HTTP/1.1 connection, driven by whoever holds it.
pub struct H1<B: Body + 'static> {
    send: http1::SendRequest<B>,
    /// `None` once the connection ended (closed by either side, or failed); dropping it
    /// drops hyper's dispatcher, so a request still queued comes back unsent.
    conn: Option<http1::Connection<TokioIo<Stream>, B>>,
}

impl<B> H1<B>
where
    B: Body + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    /// Alive and ready for a request, polled once.
    fn ready_now(&mut self, cx: &mut Context<'_>) -> bool {
        self.drive(cx) && matches!(self.send.poll_ready(cx), Poll::Ready(Ok(())))
    }

    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        match Pin::new(conn).poll(cx) {
            Poll::Pending => true,
            Poll::Ready(r) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "upstream connection ended");
                }
                self.conn = None;
                false
            }
        }
    }
}

/// A connection a request holds.
pub enum Conn<B: Body + 'static> {
    /// Boxed: hyper's HTTP/1.1 connection state is large, and moves in and out of the pool.
    H1(Box<H1<B>>),
    /// Shared by the endpoint's requests; hyper's task drives it.
    H2(http2::SendRequest<B>, AbortHandle),
}

impl<B> Conn<B>
where
    B: Body + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    pub fn is_h2(&self) -> bool {
        matches!(self, Conn::H2(..))
    }

    /// Drives an HTTP/1.1 connection (its reads, its writes, the request body): called by
    /// every future that waits on it. `false` once it has ended.
    pub fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        match self {
            Conn::H1(h) => h.drive(cx),
            Conn::H2(..) => true,
        }
    }

    /// Ready for a request: an HTTP/1.1 connection the upstream closed meanwhile is not.
    async fn ready(&mut self) -> bool {
        match self {
            Conn::H2(s, _) => s.ready().await.is_ok() && !s.is_closed(),
            Conn::H1(h) => {
                poll_fn(|cx| {
                    let alive = h.drive(cx);
                    match h.send.poll_ready(cx) {
                        Poll::Ready(r) => Poll::Ready(alive && r.is_ok()),
                        Poll::Pending if !alive => Poll::Ready(false),
                        Poll::Pending => Poll::Pending,
                    }
                })
                .await
            }
        }
    }

    /// Sends `req` and waits for the response head, driving an HTTP/1.1 connection meanwhile.
    /// On failure, the request when it was never sent (the connection had closed): it may go
    /// on another connection.
    pub async fn send(
        &mut self,
        req: Request<B>,
    ) -> Result<Response<Incoming>, (hyper::Error, Option<Request<B>>)> {
        match self {
            Conn::H2(s, _) => s.send_request(req).await.map_err(|e| (e, None)),
            Conn::H1(h) => {
                let mut resp = std::pin::pin!(h.send.try_send_request(req));
                let r = poll_fn(|cx| {
                    h.drive(cx);
                    resp.as_mut().poll(cx)
                })
                .await;
                r.map_err(|mut e| {
                    let unsent = e.take_message();
                    (e.into_error(), unsent)
                })
            }
        }
    }
}

/// The next frame of `body`, the response to a request on `conn`: an HTTP/1.1 connection is
/// driven first (it reads the body).
pub fn poll_body<B>(
    conn: Option<&mut Conn<B>>,
    body: &mut Incoming,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>>
where
    B: Body + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    if let Some(c) = conn {
        c.drive(cx);
    }
    Pin::new(body).poll_frame(cx)
}

/// One upstream as one shard sees it: its addresses, its TLS settings, its idle HTTP/1.1
/// connections and its shared HTTP/2 one.
pub struct Endpoint<B: Body + 'static> {
    pub url: BaseUrl,
    http2: Http2,
    /// HTTP/2 PING interval (`None`: no pings).
    h2_keep_alive: Option<Duration>,
    addrs: RefCell<Option<Vec<SocketAddr>>>,
    /// For requests (ALPN per `http2`).
    tls: Option<Arc<rustls::ClientConfig>>,
    /// For upgrades and health checks: HTTP/1.1 only.
    tls_h1: Option<Arc<rustls::ClientConfig>>,
    idle: RefCell<Vec<(Box<H1<B>>, Instant)>>,
    h2: RefCell<Option<(http2::SendRequest<B>, AbortHandle)>>,
}

impl<B> Endpoint<B>
where
    B: Body + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    pub fn new(
        url: BaseUrl,
        http2: Http2,
        roots: &Arc<rustls::RootCertStore>,
        h2_keep_alive: Option<Duration>,
    ) -> Endpoint<B> {
        let tls = url
            .tls
            .then(|| super::tls::client_config(roots, http2.alpn()));
        let tls_h1 = url
            .tls
            .then(|| super::tls::client_config(roots, Http2::Never.alpn()));
        Endpoint {
            url,
            http2,
            h2_keep_alive,
            addrs: RefCell::new(None),
            tls,
            tls_h1,
            idle: RefCell::new(Vec::new()),
            h2: RefCell::new(None),
        }
    }

    /// Resolves the name (once; again after a failed connect).
    pub async fn resolve(&self) -> Result<Vec<SocketAddr>, UpstreamError> {
        if let Some(a) = self.addrs.borrow().as_ref() {
            return Ok(a.clone());
        }
        let u = &self.url;
        let a: Vec<SocketAddr> = match u.host.parse::<std::net::IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, u.port)],
            Err(_) => tokio::net::lookup_host((u.host.as_str(), u.port))
                .await
                .map_err(|e| UpstreamError::Connect(format!("{}: {e}", u.host)))?
                .collect(),
        };
        if a.is_empty() {
            return Err(UpstreamError::Connect(format!("{}: no address", u.host)));
        }
        *self.addrs.borrow_mut() = Some(a.clone());
        Ok(a)
    }

    /// A new socket to the upstream (TLS when `https`/`wss`), bounded by `timeout`: `true`
    /// when HTTP/2 is to be spoken on it (ALPN chose it, or prior knowledge).
    pub async fn connect_io(
        &self,
        backend: Backend,
        h1_only: bool,
        timeout: Duration,
    ) -> Result<(Stream, bool), UpstreamError> {
        let addrs = self.resolve().await?;
        let tls = if h1_only { &self.tls_h1 } else { &self.tls };
        let host = self.url.host.as_str();
        let io = super::connect(backend, &addrs, tls.as_ref().map(|c| (c, host)), timeout)
            .await
            .inspect_err(|_| {
                // Resolve again next time (the name may point elsewhere now).
                self.addrs.borrow_mut().take();
            })?;
        let h2 = match tls {
            None => !h1_only && self.http2 == Http2::PriorKnowledge,
            Some(_) => io.alpn_protocol() == Some(b"h2"),
        };
        Ok((io, h2))
    }

    /// A connection for one request: the shared HTTP/2 one, an idle pooled HTTP/1.1 one kept
    /// less than `pool_idle`, or a new one (bounded by `connect`). `true` when reused.
    pub async fn connection(
        &self,
        backend: Backend,
        connect: Duration,
        pool_idle: Duration,
    ) -> Result<(Conn<B>, bool), UpstreamError> {
        let h2 = self.h2.borrow().clone();
        if let Some((s, driver)) = h2 {
            // Ready unless the connection is gone or at its stream limit; a new one then.
            let mut c = Conn::H2(s, driver);
            if matches!(tokio::time::timeout(connect, c.ready()).await, Ok(true)) {
                return Ok((c, true));
            }
            self.h2.borrow_mut().take();
        }
        let now = Instant::now();
        loop {
            let Some((mut h, since)) = self.idle.borrow_mut().pop() else {
                break;
            };
            if now.duration_since(since) >= pool_idle {
                continue;
            }
            // Polled once (no timer): a connection the upstream closed meanwhile reads its
            // end here; one not ready at once is not waited for.
            if poll_fn(|cx| Poll::Ready(h.ready_now(cx))).await {
                return Ok((Conn::H1(h), true));
            }
        }
        let opened = tokio::time::timeout(connect, self.open(backend, connect)).await;
        opened
            .unwrap_or(Err(UpstreamError::Timeout(Phase::Connect)))
            .inspect_err(|_| {
                self.addrs.borrow_mut().take();
            })
            .map(|c| (c, false))
    }

    async fn open(&self, backend: Backend, connect: Duration) -> Result<Conn<B>, UpstreamError> {
        let (io, h2) = self.connect_io(backend, false, connect).await?;
        let io = TokioIo::new(io);
        let broken = |e: hyper::Error| UpstreamError::Connect(format!("handshake: {e}"));
        if h2 {
            let mut b = http2::Builder::new(LocalExec);
            b.timer(TokioTimer::new());
            if let Some(every) = self.h2_keep_alive {
                b.keep_alive_interval(every);
            }
            let (sender, conn) = b.handshake(io).await.map_err(broken)?;
            let driver = tokio::task::spawn_local(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream h2 connection ended");
                }
            })
            .abort_handle();
            *self.h2.borrow_mut() = Some((sender.clone(), driver.clone()));
            Ok(Conn::H2(sender, driver))
        } else {
            let (send, conn) = http1::Builder::new()
                .max_buf_size(64 * 1024)
                .handshake(io)
                .await
                .map_err(broken)?;
            Ok(Conn::H1(Box::new(H1 {
                send,
                conn: Some(conn),
            })))
        }
    }

    /// Takes back a connection whose exchange finished: an HTTP/1.1 one is kept while fewer
    /// than `pool_size` are idle, else closed.
    pub fn release(&self, c: Conn<B>, pool_size: usize) {
        let Conn::H1(mut h) = c else {
            return;
        };
        // Unless hyper already wants the next request, driven once more (nobody waits on it
        // now: no waker), so the end of a body hyper has read but not yet processed leaves the
        // connection ready.
        if !h.send.is_ready() {
            h.drive(&mut Context::from_waker(std::task::Waker::noop()));
        }
        if h.conn.is_none() {
            return;
        }
        if !h.send.is_ready() {
            // The upstream answered before the request body was all sent: the upload goes on
            // (the client is still sending it) on a task of its own, then the connection closes.
            tokio::task::spawn_local(async move {
                Conn::H1(h).ready().await;
            });
            return;
        }
        let mut idle = self.idle.borrow_mut();
        if idle.len() < pool_size {
            idle.push((h, Instant::now()));
        }
    }

    /// Gives up a connection whose exchange failed: an HTTP/1.1 one closes (the upstream sees
    /// the request go away), the shared HTTP/2 one only when it is broken.
    pub fn discard(&self, c: Conn<B>) {
        if !c.is_h2() {
            return;
        }
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
        self.idle.borrow_mut().clear();
    }

    /// Closes every pooled connection (the configuration was replaced).
    pub fn close_all(&self) {
        self.drop_idle();
        if let Some((_, d)) = self.h2.borrow_mut().take() {
            d.abort();
        }
    }
}
