//! One upstream of a route, as one shard sees it: its connections (the shared client's
//! [`Endpoint`]: addresses, keep-alive pool, shared h2 connection) and its health. Per shard
//! (`Rc`, `Cell`): no locks; each shard learns health on its own.

use std::cell::Cell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::body::ReqBody;
use super::config::{BaseUrl, Http2};
use super::Failure;
use crate::error::UpstreamError;
use crate::io::client::{Conn, Endpoint};
use crate::io::{self, Backend, Stream};

pub struct Upstream {
    pub ep: Endpoint<ReqBody>,
    /// `scheme://authority`, the label in metrics and logs.
    pub label: String,
    /// The `Host` of requests sent here (the URL's authority), made once.
    pub host: Option<http::HeaderValue>,
    /// Requests and tunnels in flight from this shard (least connections).
    pub outstanding: Cell<usize>,
    failures: Cell<u32>,
    ejected_until: Cell<Option<Instant>>,
    /// Taken out by the active health check.
    pub down: Cell<bool>,
}

/// What a failed connect answers.
fn refused(e: UpstreamError) -> Failure {
    match e {
        UpstreamError::Timeout(_) => Failure::ConnectTimeout,
        e => Failure::Refused(e.to_string()),
    }
}

impl Upstream {
    pub fn new(url: BaseUrl, http2: Http2, roots: &Arc<rustls::RootCertStore>) -> Upstream {
        Upstream {
            label: url.origin(),
            host: http::HeaderValue::from_str(&url.authority).ok(),
            ep: Endpoint::new(url, http2, roots, None),
            outstanding: Cell::new(0),
            failures: Cell::new(0),
            ejected_until: Cell::new(None),
            down: Cell::new(false),
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
        if let Err(e) = self.ep.resolve().await {
            tracing::warn!(upstream = %self.label, error = %e, "upstream name does not resolve (tried again on use)");
        }
    }

    /// A new HTTP/1.1 socket to the upstream (TLS when `https`/`wss`), for upgrades and health
    /// checks, bounded by `timeout`.
    pub async fn connect_h1(&self, backend: Backend, timeout: Duration) -> Result<Stream, Failure> {
        self.ep
            .connect_io(backend, true, timeout)
            .await
            .map(|(io, _)| io)
            .map_err(refused)
    }

    /// A connection for one request (see [`Endpoint::connection`]). `true` when reused.
    pub async fn connection(
        &self,
        backend: Backend,
        connect: Duration,
        pool_idle: Duration,
    ) -> Result<(Conn<ReqBody>, bool), Failure> {
        self.ep
            .connection(backend, connect, pool_idle)
            .await
            .map_err(refused)
    }
}

/// The root store for `https://`/`wss://` upstreams: webpki roots plus the route's `ca_file`.
pub fn roots(ca_file: Option<&std::path::Path>) -> Arc<rustls::RootCertStore> {
    io::tls::client_roots(ca_file, "route ca_file")
}

/// A request's claim on an upstream: counts it as outstanding and holds its connection until
/// the exchange ends. Dropped before the end (client gone, error), it closes an HTTP/1.1
/// connection so the upstream sees the request go away; an h2 stream is reset by hyper.
pub struct Lease {
    pub up: Rc<Upstream>,
    pub held: Option<Conn<ReqBody>>,
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
        if let Some(c) = self.held.take() {
            self.up.ep.discard(c);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.up
            .outstanding
            .set(self.up.outstanding.get().saturating_sub(1));
        if let Some(c) = self.held.take() {
            if self.done {
                self.up.ep.release(c, self.pool_size);
            }
            // Else dropped: an HTTP/1.1 connection closes, an h2 stream is reset.
        }
    }
}
