//! The agent gateway's upstream requests on one shard: the shared upstream client
//! ([`crate::io::client`]: HTTP/1.1 pooled and driven by the request itself, HTTP/2 shared per
//! target) plus balancing, breakers and timeouts. Everything is per shard (`Rc`, `Cell`): no
//! locks, and each shard learns a target's health on its own.
//!
//! Cancel: dropping a [`Response`] before its body ended closes an HTTP/1.1 connection (the
//! upstream sees the socket close) and resets an HTTP/2 stream (`RST_STREAM`); either way the
//! upstream sees the request go away.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body_util::Full;
use hyper::body::Frame;

use super::balance::{Candidate, Picker};
use super::breaker::{Admit, Breaker};
use super::config::{AgentConfig, BaseUrl, HeaderValueSource, UpstreamEntry};
use crate::error::{Phase, UpstreamError};
use crate::io::client::{self, Conn, Endpoint};
use crate::io::{self, Backend};
use crate::metrics;

type Body = Full<Bytes>;

/// Which protocol operation a request is (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Query,
    Stream,
    Tool,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Query => "agent_query",
            Kind::Stream => "streaming_query",
            Kind::Tool => "tool_call",
        }
    }
}

/// One request to make.
#[derive(Debug, Clone)]
pub struct Outbound {
    pub kind: Kind,
    /// Path after the base URL's own path, starting with `/`.
    pub path: String,
    pub body: Bytes,
    pub request_id: String,
    pub connection_id: String,
    pub session_id: Option<String>,
}

struct Target {
    ep: Endpoint<Body>,
    /// `scheme://authority/path`, the label in metrics and logs.
    label: String,
    headers: HeaderMap,
    breaker: RefCell<Breaker>,
    outstanding: Cell<usize>,
}

/// `scheme://authority/path`: a target's name in metrics and logs.
fn target_label(base: &BaseUrl) -> String {
    format!("{}{}", base.origin(), base.path)
}

/// Every configured target's metric series at zero, before its first request (dashboards,
/// `absent()` alerts): called once at start, as each shard makes its gateway on first use.
pub fn export_metrics(cfg: &AgentConfig, shards: usize) {
    let kinds = [Kind::Query, Kind::Stream, Kind::Tool].map(Kind::name);
    let phases = crate::error::Phase::ALL.map(crate::error::Phase::as_str);
    for u in &cfg.upstreams {
        let Ok(base) = BaseUrl::parse(u.url(), false) else {
            continue;
        };
        let label = target_label(&base);
        metrics::export_agent_target(&label, &kinds, &phases);
        for shard in 0..shards {
            metrics::agent_breaker(&label, shard, 0.0);
        }
    }
}

/// A shard's upstream client for `/ws/agent`.
pub struct Gateway {
    pub cfg: AgentConfig,
    backend: Backend,
    shard: usize,
    targets: Vec<Target>,
    picker: RefCell<Picker>,
}

impl Gateway {
    pub fn new(cfg: &AgentConfig, backend: Backend, shard: usize) -> Gateway {
        let roots = io::tls::client_roots(cfg.ca_file.as_deref(), "agent.ca_file");
        let targets = cfg
            .upstreams
            .iter()
            .filter_map(|u| match BaseUrl::parse(u.url(), false) {
                Ok(base) => Some(Target::new(cfg, u, base, &roots)),
                // Validated at start; never here.
                Err(e) => {
                    tracing::error!(error = %e, "agent upstream skipped");
                    None
                }
            })
            .collect();
        Gateway {
            cfg: cfg.clone(),
            backend,
            shard,
            targets,
            picker: RefCell::new(Picker::default()),
        }
    }

    pub fn has_targets(&self) -> bool {
        !self.targets.is_empty()
    }

    /// Sends `req` to a target and waits for the response head (bounded by the connect and
    /// first-byte timeouts). A target that cannot be connected to is skipped for the next one
    /// (nothing was sent); once the request went out it is not retried elsewhere.
    pub async fn send(self: &Rc<Self>, req: &Outbound) -> Result<Response, UpstreamError> {
        if self.targets.is_empty() {
            return Err(UpstreamError::NotConfigured);
        }
        let mut tried = vec![false; self.targets.len()];
        let mut last = UpstreamError::Unavailable;
        for _ in 0..self.targets.len().min(3) {
            let now = Instant::now();
            let candidates: Vec<Candidate> = self
                .targets
                .iter()
                .zip(&tried)
                .map(|(t, &tried)| Candidate {
                    available: t.breaker.borrow_mut().available(now),
                    outstanding: t.outstanding.get(),
                    tried,
                })
                .collect();
            let Some(i) = self.picker.borrow_mut().pick(self.cfg.balance, &candidates) else {
                break;
            };
            tried[i] = true;
            let admit = self.targets[i].breaker.borrow_mut().admit(now);
            if admit == Admit::No {
                continue;
            }
            let lease = Lease::new(self.clone(), i, admit == Admit::Probe, req.kind);
            match self.attempt(lease, req).await {
                Ok(r) => return Ok(r),
                Err(e) if e.nothing_sent() => last = e,
                Err(e) => return Err(e),
            }
        }
        if matches!(last, UpstreamError::Unavailable) {
            metrics::agent_request("none", req.kind.name(), "circuit_open");
        }
        Err(last)
    }

    /// One try on the lease's target; after an error of which nothing was sent
    /// ([`UpstreamError::nothing_sent`]) another target may be tried.
    async fn attempt(
        self: &Rc<Self>,
        mut lease: Lease,
        req: &Outbound,
    ) -> Result<Response, UpstreamError> {
        let t = &self.targets[lease.target];
        let started = Instant::now();
        // A pooled HTTP/1.1 connection may have been closed by the upstream meanwhile: then
        // the request was not sent, and one fresh connection is tried.
        let mut fresh_tries = 0;
        let resp = loop {
            let connection =
                t.ep.connection(self.backend, self.cfg.connect_timeout(), Duration::MAX);
            let (conn, reused) = match connection.await {
                Ok(c) => c,
                Err(e) => {
                    lease.failed(&e);
                    return Err(e);
                }
            };
            let request = self.build(t, req, conn.is_h2());
            let conn = lease.conn.insert(conn);
            let result = tokio::time::timeout(self.cfg.first_byte_timeout(), conn.send(request));
            match result.await {
                Ok(Ok(resp)) => break resp,
                Ok(Err((e, unsent))) => {
                    lease.abort_connection();
                    if unsent.is_some() && reused && fresh_tries == 0 {
                        fresh_tries += 1;
                        continue;
                    }
                    let e = UpstreamError::Protocol(e.to_string());
                    lease.failed(&e);
                    return Err(e);
                }
                Err(_) => {
                    lease.abort_connection();
                    let e = UpstreamError::Timeout(Phase::FirstByte);
                    lease.failed(&e);
                    return Err(e);
                }
            }
        };
        let status = resp.status();
        metrics::agent_latency(&t.label, req.kind.name(), started.elapsed());
        let content_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_ascii_lowercase();
        if status.is_server_error() {
            lease.failed(&UpstreamError::Status(status.as_u16()));
        } else {
            lease.succeeded(status);
        }
        Ok(Response {
            status,
            content_type,
            body: resp.into_body(),
            lease,
        })
    }

    fn build(&self, t: &Target, req: &Outbound, h2: bool) -> Request<Body> {
        let base = &t.ep.url;
        let path = format!("{}{}", base.path, req.path);
        let uri = if h2 {
            format!(
                "{}://{}{}",
                if base.tls { "https" } else { "http" },
                base.authority,
                path
            )
        } else {
            path
        };
        let mut r = Request::new(Full::new(req.body.clone()));
        *r.method_mut() = Method::POST;
        *r.uri_mut() = uri.parse().unwrap_or_else(|_| http::Uri::from_static("/"));
        if h2 {
            *r.version_mut() = http::Version::HTTP_2;
        }
        let h = r.headers_mut();
        if !h2 {
            if let Ok(v) = HeaderValue::from_str(&base.authority) {
                h.insert(header::HOST, v);
            }
        }
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static(match req.kind {
                Kind::Stream => "text/event-stream, application/x-ndjson",
                _ => "application/json",
            }),
        );
        h.insert(
            header::USER_AGENT,
            HeaderValue::from_static(concat!("ringgate/", env!("CARGO_PKG_VERSION"))),
        );
        for (name, value) in [
            ("x-request-id", Some(&req.request_id)),
            ("x-connection-id", Some(&req.connection_id)),
            ("x-session-id", req.session_id.as_ref()),
        ] {
            if let Some(v) = value.and_then(|v| HeaderValue::from_str(v).ok()) {
                h.insert(HeaderName::from_static(name), v);
            }
        }
        for (name, value) in &t.headers {
            h.insert(name.clone(), value.clone());
        }
        r
    }

    fn publish_breaker(&self, i: usize) {
        let t = &self.targets[i];
        let v = t.breaker.borrow_mut().gauge(Instant::now());
        metrics::agent_breaker(&t.label, self.shard, v);
    }
}

impl Target {
    fn new(
        cfg: &AgentConfig,
        entry: &UpstreamEntry,
        base: BaseUrl,
        roots: &std::sync::Arc<rustls::RootCertStore>,
    ) -> Target {
        let (http2, own_headers) = match entry {
            UpstreamEntry::Url(_) => (cfg.http2, None),
            UpstreamEntry::Table(t) => (t.http2.unwrap_or(cfg.http2), Some(&t.headers)),
        };
        let mut headers = HeaderMap::new();
        for (name, src) in cfg.headers.iter().chain(own_headers.into_iter().flatten()) {
            let value = match src {
                HeaderValueSource::Literal(v) => Some(v.clone()),
                HeaderValueSource::Env { env, prefix } => match std::env::var(env) {
                    Ok(v) => Some(format!("{prefix}{v}")),
                    Err(_) => {
                        // The variable's name only: its value is a secret.
                        tracing::warn!(header = %name, variable = %env, "agent upstream header not sent: environment variable not set");
                        None
                    }
                },
            };
            let parsed = (
                HeaderName::from_bytes(name.as_bytes()),
                value.map(|v| HeaderValue::from_str(&v)),
            );
            match parsed {
                (Ok(n), Some(Ok(mut v))) => {
                    v.set_sensitive(true);
                    headers.insert(n, v);
                }
                (_, None) => {}
                _ => {
                    tracing::warn!(header = %name, "agent upstream header not sent: invalid value")
                }
            }
        }
        Target {
            label: target_label(&base),
            ep: Endpoint::new(base, http2, roots, Some(Duration::from_secs(30))),
            headers,
            breaker: RefCell::new(Breaker::new(cfg.failure_threshold, cfg.open_duration())),
            outstanding: Cell::new(0),
        }
    }
}

/// A request's claim on its target: counts it as outstanding, holds its HTTP/1.1 connection,
/// and reports the outcome to the breaker. Dropped before the body ended (cancel, error), it
/// closes the connection.
pub struct Lease {
    gw: Rc<Gateway>,
    target: usize,
    probe: bool,
    kind: Kind,
    verdict: bool,
    conn: Option<Conn<Body>>,
    body_done: bool,
}

impl Lease {
    fn new(gw: Rc<Gateway>, target: usize, probe: bool, kind: Kind) -> Lease {
        let t = &gw.targets[target];
        t.outstanding.set(t.outstanding.get() + 1);
        metrics::agent_in_flight(1.0);
        Lease {
            gw,
            target,
            probe,
            kind,
            verdict: false,
            conn: None,
            body_done: false,
        }
    }

    fn target(&self) -> &Target {
        &self.gw.targets[self.target]
    }

    pub fn label(&self) -> &str {
        &self.target().label
    }

    fn succeeded(&mut self, status: StatusCode) {
        self.verdict = true;
        self.target().breaker.borrow_mut().success();
        self.gw.publish_breaker(self.target);
        metrics::agent_request(&self.target().label, self.kind.name(), status.as_str());
    }

    /// Counts a failure against the target (also after the head: an idle timeout mid-stream;
    /// the request itself was then already counted with its status).
    pub fn failed(&mut self, e: &UpstreamError) {
        let first_verdict = !self.verdict;
        self.verdict = true;
        let label = self.target().label.clone();
        let outcome = match e {
            UpstreamError::Status(s) => s.to_string(),
            UpstreamError::Timeout(phase) => {
                metrics::agent_timeout(&label, phase.as_str());
                "timeout".into()
            }
            _ => "error".into(),
        };
        let now = Instant::now();
        let was_open = self.target().breaker.borrow_mut().gauge(now) == 2.0;
        self.target().breaker.borrow_mut().failure(now);
        if !was_open && self.target().breaker.borrow_mut().gauge(now) == 2.0 {
            tracing::warn!(target_url = %label, shard = self.gw.shard, error = %e, "agent upstream marked down (circuit open)");
        }
        self.gw.publish_breaker(self.target);
        if first_verdict {
            metrics::agent_request(&label, self.kind.name(), &outcome);
        }
        tracing::debug!(target_url = %label, kind = self.kind.name(), error = %e, "agent upstream request failed");
    }

    /// Closes an HTTP/1.1 connection; forgets the shared HTTP/2 one when it is broken.
    fn abort_connection(&mut self) {
        if let Some(c) = self.conn.take() {
            self.target().ep.discard(c);
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let t = &self.gw.targets[self.target];
        t.outstanding.set(t.outstanding.get().saturating_sub(1));
        metrics::agent_in_flight(-1.0);
        if self.probe && !self.verdict {
            t.breaker.borrow_mut().probe_abandoned();
        }
        if let Some(c) = self.conn.take() {
            if self.body_done {
                t.ep.release(c, self.gw.cfg.max_idle_per_target);
            }
            // Else dropped mid-body (cancel, error): the upstream sees the request end.
        }
    }
}

/// A response whose head has arrived; read the body with [`Response::next`].
pub struct Response {
    pub status: StatusCode,
    /// Lowercased `Content-Type`, "" when absent.
    pub content_type: String,
    body: client::ResponseBody,
    pub lease: Lease,
}

impl Response {
    /// The next frame of the body, driving its HTTP/1.1 connection (which reads it).
    async fn frame(&mut self) -> Option<Result<Frame<Bytes>, client::Error>> {
        poll_fn(|cx| client::poll_body(self.lease.conn.as_mut(), &mut self.body, cx)).await
    }

    /// The next piece of the body, `None` at its end; each wait is bounded by the idle timeout.
    pub async fn next(&mut self) -> Result<Option<Bytes>, UpstreamError> {
        let idle = self.lease.gw.cfg.idle_timeout();
        loop {
            let frame = match tokio::time::timeout(idle, self.frame()).await {
                Err(_) => {
                    let e = UpstreamError::Timeout(Phase::Idle);
                    self.lease.failed(&e);
                    return Err(e);
                }
                Ok(None) => {
                    self.lease.body_done = true;
                    return Ok(None);
                }
                Ok(Some(Err(e))) => {
                    let e = UpstreamError::Protocol(e.to_string());
                    self.lease.failed(&e);
                    return Err(e);
                }
                Ok(Some(Ok(f))) => f,
            };
            if let Ok(data) = frame.into_data() {
                if !data.is_empty() {
                    return Ok(Some(data));
                }
            }
        }
    }

    /// Reads what is left of a body whose content has ended (`[DONE]`) for a short while, so
    /// the HTTP/1.1 connection can go back to the pool; no verdict on the target either way.
    pub async fn drain(&mut self) {
        let rest = async {
            let mut n = 0usize;
            while let Some(Ok(f)) = self.frame().await {
                n += f.data_ref().map_or(0, Bytes::len);
                if n > 64 * 1024 {
                    return;
                }
            }
            self.lease.body_done = true;
        };
        let _ = tokio::time::timeout(Duration::from_millis(100), rest).await;
    }

    /// The whole body, at most `limit` bytes.
    pub async fn collect(&mut self, limit: usize) -> Result<Bytes, UpstreamError> {
        let mut buf = Vec::new();
        while let Some(b) = self.next().await? {
            if buf.len() + b.len() > limit {
                return Err(UpstreamError::Protocol(format!(
                    "the answer is larger than {limit} bytes"
                )));
            }
            buf.extend_from_slice(&b);
        }
        Ok(Bytes::from(buf))
    }
}

impl Drop for Response {
    fn drop(&mut self) {
        // A body read to its end (e.g. past `[DONE]`) leaves the connection reusable.
        if self.body.is_end_stream() {
            self.lease.body_done = true;
        }
    }
}
