//! The reverse proxy: `[[route]]` → upstream HTTP and WebSocket services.
//!
//! Layering: this module uses the io backend (`runtime::io`), `tls`, `ws` and `metrics`, never
//! the server layer (`http`, `runtime::shard`, `config`): the server asks [`Proxy::find`] for a
//! route and hands the request to [`http::forward`] or [`tunnel::handshake`]. Everything here
//! is per shard (`Rc`, `Cell`).

pub mod balance;
pub mod body;
pub mod config;
pub mod headers;
pub mod health;
pub mod http;
pub mod net;
pub mod relay;
pub mod route;
pub mod tunnel;
pub mod upstream;

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;

use ::http::{HeaderName, HeaderValue, Request};

use crate::io::Backend;
use body::Bytes2;
use config::{BaseUrl, HashKey, Route};
use net::Cidr;
use route::{Builtin, Table};
use upstream::Upstream;

pub use crate::metrics::{
    PROXY_BYTES_IN as BYTES_IN, PROXY_BYTES_OUT as BYTES_OUT, PROXY_LATENCY as LATENCY,
    PROXY_REQUESTS as REQUESTS, PROXY_RETRIES as RETRIES,
    PROXY_UPSTREAM_HEALTHY as UPSTREAM_HEALTHY, PROXY_WEBSOCKETS as WEBSOCKETS,
};

/// Who is asking, as the server layer knows it.
#[derive(Debug, Clone)]
pub struct Client {
    pub remote: SocketAddr,
    pub tls: bool,
    /// The TLS server name the client sent.
    pub sni: Option<String>,
}

/// Why an exchange failed; decides the status and the short body the client gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// Connect refused or reset, name not resolved, TLS failed.
    Refused(String),
    ConnectTimeout,
    /// The upstream took longer than `response_timeout` for its response head.
    HeadTimeout,
    /// The connection broke or the answer was malformed.
    Broken(String),
    /// Every upstream is ejected or down.
    NoUpstream,
    TooLarge,
    /// The request's headers are over [`MAX_REQUEST_HEAD`].
    HeadTooLarge,
    ClientIdle,
    Draining,
}

/// Largest request head (all header lines) forwarded; hyper's own read limit does not catch a
/// head that arrives in one large read.
pub const MAX_REQUEST_HEAD: usize = 64 * 1024;

pub fn head_too_large(h: &::http::HeaderMap) -> bool {
    h.iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum::<usize>()
        > MAX_REQUEST_HEAD
}

impl Failure {
    pub fn status(&self) -> ::http::StatusCode {
        use ::http::StatusCode as S;
        match self {
            Failure::Refused(_) | Failure::Broken(_) => S::BAD_GATEWAY,
            Failure::ConnectTimeout | Failure::HeadTimeout => S::GATEWAY_TIMEOUT,
            Failure::NoUpstream | Failure::Draining => S::SERVICE_UNAVAILABLE,
            Failure::TooLarge => S::PAYLOAD_TOO_LARGE,
            Failure::HeadTooLarge => S::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Failure::ClientIdle => S::REQUEST_TIMEOUT,
        }
    }

    pub fn message(&self) -> String {
        match self {
            Failure::Refused(e) => format!("bad gateway: cannot connect to the upstream ({e})\n"),
            Failure::ConnectTimeout => {
                "gateway timeout: connecting to the upstream timed out\n".into()
            }
            Failure::HeadTimeout => "gateway timeout: the upstream did not answer in time\n".into(),
            Failure::Broken(e) => format!("bad gateway: {e}\n"),
            Failure::NoUpstream => "service unavailable: no healthy upstream\n".into(),
            Failure::TooLarge => {
                "payload too large: the request body is over this route's limit\n".into()
            }
            Failure::HeadTooLarge => "request header fields too large\n".into(),
            Failure::ClientIdle => "request timeout: the request body stopped arriving\n".into(),
            Failure::Draining => "service unavailable: the server is draining\n".into(),
        }
    }

    /// Counts against the upstream's health.
    pub fn is_upstream_fault(&self) -> bool {
        matches!(
            self,
            Failure::Refused(_)
                | Failure::ConnectTimeout
                | Failure::HeadTimeout
                | Failure::Broken(_)
        )
    }
}

/// A route as one shard runs it.
pub struct RouteState {
    pub name: String,
    pub cfg: Route,
    /// What `strip_prefix` removes.
    pub prefix: String,
    pub upstreams: Vec<Rc<Upstream>>,
    pub rr: Cell<usize>,
    pub hash: Option<HashKey>,
    pub trusted: Vec<Cidr>,
    pub req_set: Vec<(HeaderName, HeaderValue)>,
    pub req_remove: Vec<HeaderName>,
    pub resp_set: Vec<(HeaderName, HeaderValue)>,
    pub resp_remove: Vec<HeaderName>,
    pub backend: Backend,
    pub shard: usize,
    pub counted: Rc<Bytes2>,
    /// The route's metric handles, looked up once: a labelled `counter!` builds and hashes
    /// its key on every call.
    pub metrics: Rc<RouteMetrics>,
    /// Cleared when the table is replaced: health checks of the old table stop.
    pub live: Cell<bool>,
}

/// One route's metrics.
pub struct RouteMetrics {
    /// By status class: 1xx to 5xx.
    requests: [::metrics::Counter; 5],
    pub retries: ::metrics::Counter,
    pub latency: ::metrics::Histogram,
    pub bytes_in: ::metrics::Counter,
    pub bytes_out: ::metrics::Counter,
    pub websockets: ::metrics::Gauge,
}

impl RouteMetrics {
    fn new(route: &str) -> RouteMetrics {
        use ::metrics::{counter, gauge, histogram};
        let r = route.to_string();
        RouteMetrics {
            requests: ["1xx", "2xx", "3xx", "4xx", "5xx"]
                .map(|class| counter!(REQUESTS, "route" => r.clone(), "class" => class)),
            retries: counter!(RETRIES, "route" => r.clone()),
            latency: histogram!(LATENCY, "route" => r.clone()),
            bytes_in: counter!(BYTES_IN, "route" => r.clone()),
            bytes_out: counter!(BYTES_OUT, "route" => r.clone()),
            websockets: gauge!(WEBSOCKETS, "route" => r),
        }
    }

    /// The request counter for a response with `status`.
    pub fn requests(&self, status: ::http::StatusCode) -> &::metrics::Counter {
        let class = (status.as_u16() / 100).clamp(1, 5) as usize;
        &self.requests[class - 1]
    }
}

impl RouteState {
    pub fn eject(&self) -> (u32, std::time::Duration, usize) {
        (self.cfg.eject_after, self.cfg.eject_duration(), self.shard)
    }
}

/// One shard's route table.
#[derive(Default)]
pub struct Proxy {
    table: Table,
    routes: Vec<Rc<RouteState>>,
}

fn header_pairs(
    set: &std::collections::BTreeMap<String, String>,
) -> Vec<(HeaderName, HeaderValue)> {
    set.iter()
        .filter_map(|(k, v)| {
            Some((
                HeaderName::from_bytes(k.as_bytes()).ok()?,
                HeaderValue::from_str(v).ok()?,
            ))
        })
        .collect()
}

fn header_names(list: &[String]) -> Vec<HeaderName> {
    list.iter()
        .filter_map(|k| HeaderName::from_bytes(k.as_bytes()).ok())
        .collect()
}

impl Proxy {
    /// Builds the table from validated routes; `builtins` are the server's own paths, which
    /// a route takes only with a match at least as specific.
    pub fn new(routes: &[Route], builtins: Vec<Builtin>, backend: Backend, shard: usize) -> Proxy {
        let mut matchers = Vec::new();
        let mut states = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            // Validated at start; a route that fails here is left out, never half-built.
            let m = match r.matcher(i) {
                Ok(m) => m,
                Err(e) => {
                    tracing::error!(route = %r.label(i), error = %e, "route skipped");
                    continue;
                }
            };
            let roots = upstream::roots(r.ca_file.as_deref());
            let upstreams = r
                .upstreams
                .iter()
                .filter_map(|u| {
                    let url = BaseUrl::parse(u.url(), true).ok()?;
                    Some(Rc::new(Upstream::new(url, u.http2(r.http2), &roots)))
                })
                .collect();
            states.push(Rc::new(RouteState {
                name: r.label(i),
                prefix: m.path.prefix().to_string(),
                cfg: r.clone(),
                upstreams,
                rr: Cell::new(0),
                hash: r.hash_key.as_deref().and_then(|k| HashKey::parse(k).ok()),
                trusted: r
                    .trusted_proxies
                    .iter()
                    .filter_map(|c| Cidr::parse(c).ok())
                    .collect(),
                req_set: header_pairs(&r.request_headers.set),
                req_remove: header_names(&r.request_headers.remove),
                resp_set: header_pairs(&r.response_headers.set),
                resp_remove: header_names(&r.response_headers.remove),
                backend,
                shard,
                counted: Rc::default(),
                metrics: Rc::new(RouteMetrics::new(&r.label(i))),
                live: Cell::new(true),
            }));
            // The matcher's index becomes the position in `states` (a skipped route shifts it).
            let mut m = m;
            m.index = states.len() - 1;
            matchers.push(m);
        }
        Proxy {
            table: Table::new(matchers, builtins),
            routes: states,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// Resolves upstream names (again on a failed connect) and starts the active health
    /// checks of this table's routes.
    pub fn start(&self) {
        for r in &self.routes {
            for u in &r.upstreams {
                let u = u.clone();
                tokio::task::spawn_local(async move { u.resolve_early().await });
            }
            health::start(r);
        }
    }

    /// Stops this table's health checks and closes its pooled connections.
    pub fn retire(&self) {
        for r in &self.routes {
            r.live.set(false);
            for u in &r.upstreams {
                u.ep.close_all();
            }
        }
    }

    /// The route for a request, if one takes it.
    pub fn find<B>(&self, req: &Request<B>, sni: Option<&str>) -> Option<Rc<RouteState>> {
        if self.table.is_empty() {
            return None;
        }
        let host_header = req
            .headers()
            .get(::http::header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| req.uri().authority().map(|a| a.as_str()));
        let host = route::request_host(sni, host_header);
        let m = self
            .table
            .find(host.as_deref(), req.uri().path(), req.method())?;
        self.routes.get(m.index).cloned()
    }

    /// Per-route totals for `/ws/statistics`: (name, bytes in, bytes out, upstreams up).
    pub fn stats(&self) -> Vec<RouteStats> {
        let now = std::time::Instant::now();
        self.routes
            .iter()
            .map(|r| RouteStats {
                route: r.name.clone(),
                bytes_in: r.counted.bytes_in.get(),
                bytes_out: r.counted.bytes_out.get(),
                upstreams: r
                    .upstreams
                    .iter()
                    .map(|u| (u.label.clone(), u.available(now), u.outstanding.get()))
                    .collect(),
            })
            .collect()
    }
}

impl RouteStats {
    /// Every shard's view of the routes as one JSON list: bytes summed, upstreams in service
    /// on every shard counted as available, in-flight requests summed.
    pub fn merge(per_shard: Vec<Vec<RouteStats>>) -> serde_json::Value {
        let mut all: Vec<RouteStats> = Vec::new();
        for shard in per_shard {
            for r in shard {
                match all.iter_mut().find(|a| a.route == r.route) {
                    None => all.push(r),
                    Some(a) => {
                        a.bytes_in += r.bytes_in;
                        a.bytes_out += r.bytes_out;
                        for (x, y) in a.upstreams.iter_mut().zip(r.upstreams) {
                            x.1 &= y.1;
                            x.2 += y.2;
                        }
                    }
                }
            }
        }
        all.into_iter()
            .map(|r| {
                serde_json::json!({
                    "route": r.route,
                    "bytes_in": r.bytes_in,
                    "bytes_out": r.bytes_out,
                    "upstreams": r.upstreams.into_iter().map(|(url, available, in_flight)| {
                        serde_json::json!({"url": url, "available": available, "in_flight": in_flight})
                    }).collect::<Vec<_>>(),
                })
            })
            .collect()
    }
}

/// One route's part of `/ws/statistics` from one shard.
#[derive(Debug, Clone, Default)]
pub struct RouteStats {
    pub route: String,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// (upstream, available, in flight)
    pub upstreams: Vec<(String, bool, usize)>,
}
