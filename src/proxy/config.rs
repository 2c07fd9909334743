//! `[[route]]`: the route table's configuration, its validation, and what `check-config` says
//! about it. Plain data: no sockets, no runtime.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::route::{Builtin, HostMatch, Matcher, PathMatch};
use crate::io::client::check_header;
pub use crate::io::client::{BaseUrl, Http2};

/// What a WebSocket upgrade on a route becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// ringgate's own session on the client side, a ringgate client upstream, messages
    /// relayed (src/proxy/relay.rs).
    Websocket,
    /// After both handshakes the bytes are copied as they are.
    Tunnel,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    RoundRobin,
    LeastConnections,
    /// Consistent (rendezvous) hashing on `hash_key`.
    Hash,
}

/// An upstream: a URL, or a table with per-upstream settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum UpstreamEntry {
    Url(String),
    Table(UpstreamTable),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTable {
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http2: Option<Http2>,
}

impl UpstreamEntry {
    pub fn url(&self) -> &str {
        match self {
            UpstreamEntry::Url(u) => u,
            UpstreamEntry::Table(t) => &t.url,
        }
    }
    pub fn http2(&self, route: Http2) -> Http2 {
        match self {
            UpstreamEntry::Url(_) => route,
            UpstreamEntry::Table(t) => t.http2.unwrap_or(route),
        }
    }
}

/// Headers to set (replacing) and to remove.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeaderRules {
    pub set: BTreeMap<String, String>,
    pub remove: Vec<String>,
}

impl HeaderRules {
    fn is_empty(&self) -> bool {
        self.set.is_empty() && self.remove.is_empty()
    }
}

/// `[route.health_check]`: an HTTP GET to every upstream of the route, every `interval`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HealthCheck {
    pub path: String,
    /// Seconds between checks.
    pub interval: f64,
    /// Seconds a check may take.
    pub timeout: f64,
    /// Consecutive good checks that bring a down upstream back.
    pub healthy_threshold: u32,
    /// Consecutive failed checks that take an upstream out.
    pub unhealthy_threshold: u32,
}

impl Default for HealthCheck {
    fn default() -> Self {
        HealthCheck {
            path: "/".into(),
            interval: 5.0,
            timeout: 2.0,
            healthy_threshold: 2,
            unhealthy_threshold: 3,
        }
    }
}

impl HealthCheck {
    pub fn interval(&self) -> Duration {
        Duration::from_secs_f64(self.interval)
    }
    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout)
    }
}

/// One `[[route]]`. Field names are the TOML keys (docs/PROXY.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Route {
    /// Name in logs, metrics and errors; default `route#N` (1-based position).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// `api.example.com` or `*.example.com`; unset = any host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Requests whose path starts with this; the longest prefix wins. Default "/".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// Requests whose path is exactly this (instead of `path_prefix`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Only these methods; unset = all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    /// When several routes match, the highest priority wins before any other rule.
    pub priority: i32,
    pub upstreams: Vec<UpstreamEntry>,
    /// Remove the matched `path_prefix` before forwarding.
    pub strip_prefix: bool,
    /// Forward the client's `Host` instead of the upstream's authority.
    pub preserve_host: bool,
    /// WebSocket upgrades: `websocket` or `tunnel`; unset = the default (`websocket`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    pub balance: Balance,
    /// For `balance = "hash"`: `header:NAME`, `cookie:NAME` or `client_address`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hash_key: Option<String>,
    #[serde(skip_serializing_if = "HeaderRules::is_empty")]
    pub request_headers: HeaderRules,
    #[serde(skip_serializing_if = "HeaderRules::is_empty")]
    pub response_headers: HeaderRules,
    /// Client addresses (IPs or CIDRs) whose `X-Forwarded-*`/`Forwarded` headers are kept
    /// and appended to; from anyone else they are replaced.
    pub trusted_proxies: Vec<String>,
    pub http2: Http2,
    /// Extra CA certificates (PEM) for `https://`/`wss://` upstreams.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Seconds to connect (TCP and TLS) to an upstream.
    pub connect_timeout: f64,
    /// Seconds from sending the request to the upstream's response head.
    pub response_timeout: f64,
    /// Seconds without a byte in either body before the request is abandoned.
    pub idle_timeout: f64,
    /// Seconds the whole exchange may take, body included; 0 = no limit.
    pub total_timeout: f64,
    /// Largest request body in bytes (413 above it); 0 = no limit.
    pub max_body_size: u64,
    /// Further upstreams tried after a failure that is safe to retry.
    pub retries: u32,
    /// Idle keep-alive connections kept per upstream and shard.
    pub pool_size: usize,
    /// Seconds an idle pooled connection is kept.
    pub pool_idle_timeout: f64,
    /// Consecutive failures (connect errors, resets, timeouts) that take an upstream out.
    pub eject_after: u32,
    /// Seconds an ejected upstream stays out before it is tried again.
    pub eject_duration: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
}

impl Default for Route {
    fn default() -> Self {
        Route {
            name: None,
            host: None,
            path_prefix: None,
            path: None,
            methods: None,
            priority: 0,
            upstreams: Vec::new(),
            strip_prefix: false,
            preserve_host: false,
            mode: None,
            balance: Balance::RoundRobin,
            hash_key: None,
            request_headers: HeaderRules::default(),
            response_headers: HeaderRules::default(),
            trusted_proxies: Vec::new(),
            http2: Http2::Auto,
            ca_file: None,
            connect_timeout: 5.0,
            response_timeout: 60.0,
            idle_timeout: 60.0,
            total_timeout: 0.0,
            max_body_size: 0,
            retries: 1,
            pool_size: 32,
            pool_idle_timeout: 60.0,
            eject_after: 5,
            eject_duration: 10.0,
            health_check: None,
        }
    }
}

/// What `hash_key` hashes on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    Header(http::HeaderName),
    Cookie(String),
    ClientAddress,
}

impl HashKey {
    pub fn parse(s: &str) -> Result<HashKey, String> {
        if s == "client_address" {
            return Ok(HashKey::ClientAddress);
        }
        if let Some(h) = s.strip_prefix("header:") {
            return http::HeaderName::from_bytes(h.trim().as_bytes())
                .map(HashKey::Header)
                .map_err(|_| format!("{h:?} is not a header name"));
        }
        if let Some(c) = s.strip_prefix("cookie:") {
            let c = c.trim();
            if !c.is_empty() {
                return Ok(HashKey::Cookie(c.to_string()));
            }
        }
        Err(format!(
            "{s:?}: expected \"header:NAME\", \"cookie:NAME\" or \"client_address\""
        ))
    }
}

impl Route {
    /// The route's name in messages: `name`, else `route#N` (1-based).
    pub fn label(&self, index: usize) -> String {
        self.name
            .clone()
            .unwrap_or_else(|| format!("route#{}", index + 1))
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.connect_timeout)
    }
    pub fn response_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.response_timeout)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.idle_timeout)
    }
    pub fn total_timeout(&self) -> Option<Duration> {
        (self.total_timeout > 0.0).then(|| Duration::from_secs_f64(self.total_timeout))
    }
    pub fn pool_idle_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.pool_idle_timeout)
    }
    pub fn eject_duration(&self) -> Duration {
        Duration::from_secs_f64(self.eject_duration)
    }

    /// The match part of the route (validated first).
    pub fn matcher(&self, index: usize) -> Result<Matcher, String> {
        let host = match self.host.as_deref() {
            None => HostMatch::Any,
            Some(h) => HostMatch::parse(h)?,
        };
        let path = match (&self.path, &self.path_prefix) {
            (Some(_), Some(_)) => {
                return Err("`path` (exact) and `path_prefix` exclude each other".into())
            }
            (Some(p), None) => PathMatch::Exact(p.clone()),
            (None, Some(p)) => PathMatch::Prefix(p.clone()),
            (None, None) => PathMatch::Prefix("/".into()),
        };
        let p = match &path {
            PathMatch::Exact(p) | PathMatch::Prefix(p) => p,
        };
        if !p.starts_with('/') {
            return Err(format!("path {p:?} must start with \"/\""));
        }
        let methods = match &self.methods {
            None => None,
            Some(list) => {
                let mut out = Vec::new();
                for m in list {
                    let m = http::Method::from_bytes(m.to_ascii_uppercase().as_bytes())
                        .map_err(|_| format!("{m:?} is not an HTTP method"))?;
                    if !out.contains(&m) {
                        out.push(m);
                    }
                }
                Some(out)
            }
        };
        Ok(Matcher {
            host,
            path,
            methods,
            priority: self.priority,
            index,
        })
    }

    fn validate_one(&self) -> Result<(), String> {
        if self.upstreams.is_empty() {
            return Err("`upstreams` is empty: a route needs at least one upstream URL".into());
        }
        for u in &self.upstreams {
            BaseUrl::parse(u.url(), true)?;
        }
        if let Some(m) = &self.methods {
            if m.is_empty() {
                return Err("`methods` is empty: the route can never match".into());
            }
        }
        let seconds = |key: &str, v: f64, zero_ok: bool| {
            if !v.is_finite() || v < 0.0 || (!zero_ok && v == 0.0) || v > 86_400.0 {
                Err(format!(
                    "`{key}` = {v} is not a duration in seconds ({}up to 86400)",
                    if zero_ok { "0 " } else { "above 0 " }
                ))
            } else {
                Ok(())
            }
        };
        seconds("connect_timeout", self.connect_timeout, false)?;
        seconds("response_timeout", self.response_timeout, false)?;
        seconds("idle_timeout", self.idle_timeout, false)?;
        seconds("total_timeout", self.total_timeout, true)?;
        seconds("pool_idle_timeout", self.pool_idle_timeout, false)?;
        seconds("eject_duration", self.eject_duration, false)?;
        if self.eject_after == 0 {
            return Err("`eject_after` must be at least 1".into());
        }
        match (self.balance, &self.hash_key) {
            (Balance::Hash, None) => {
                return Err("`balance = \"hash\"` needs `hash_key`".into());
            }
            (Balance::Hash, Some(k)) => {
                HashKey::parse(k)?;
            }
            (_, Some(_)) => return Err("`hash_key` is only used with `balance = \"hash\"`".into()),
            _ => {}
        }
        for rules in [&self.request_headers, &self.response_headers] {
            for (k, v) in &rules.set {
                check_header(k, Some(v))?;
            }
            for k in &rules.remove {
                check_header(k, None)?;
            }
        }
        for p in &self.trusted_proxies {
            super::net::Cidr::parse(p)?;
        }
        if let Some(h) = &self.health_check {
            seconds("health_check.interval", h.interval, false)?;
            seconds("health_check.timeout", h.timeout, false)?;
            if !h.path.starts_with('/') {
                return Err(format!(
                    "health_check.path {:?} must start with \"/\"",
                    h.path
                ));
            }
            if h.healthy_threshold == 0 || h.unhealthy_threshold == 0 {
                return Err("health_check thresholds must be at least 1".into());
            }
        }
        if self.strip_prefix && self.path.is_some() {
            // Exact path: stripping leaves "/", which is allowed and documented.
        }
        Ok(())
    }
}

/// Checks every route, then the table as a whole: two routes that match exactly the same
/// requests, or a route that another one always takes first, are refused naming both.
pub fn validate(routes: &[Route]) -> Result<(), String> {
    let mut matchers = Vec::with_capacity(routes.len());
    let mut names = std::collections::HashSet::new();
    for (i, r) in routes.iter().enumerate() {
        let label = r.label(i);
        r.validate_one()
            .and_then(|()| r.matcher(i))
            .map(|m| matchers.push(m))
            .map_err(|e| format!("{label}: {e}"))?;
        if !names.insert(label.clone()) {
            return Err(format!("{label}: two routes have this name"));
        }
    }
    let order = super::route::sorted(matchers);
    for (k, b) in order.iter().enumerate() {
        for a in &order[..k] {
            if a.covers(b) {
                let (an, bn) = (
                    routes[a.index].label(a.index),
                    routes[b.index].label(b.index),
                );
                return Err(if b.covers(a) && a.priority == b.priority {
                    format!(
                        "routes {an} and {bn} match exactly the same requests (give one a \
                         higher `priority`, or change its match)"
                    )
                } else {
                    format!("route {bn} can never match: route {an} takes every request it would")
                });
            }
        }
    }
    Ok(())
}

/// `check-config` lines (TOML comments) saying, for each built-in endpoint a route could
/// take, which one serves it.
pub fn builtin_report(routes: &[Route], builtins: &[Builtin]) -> Vec<String> {
    let mut out = Vec::new();
    for (i, r) in routes.iter().enumerate() {
        let Ok(m) = r.matcher(i) else { continue };
        for b in builtins {
            if !m.overlaps_builtin(b) {
                continue;
            }
            let label = r.label(i);
            out.push(if m.claims(b) {
                format!(
                    "# {}: route {label} wins over the built-in endpoint",
                    b.display()
                )
            } else {
                format!(
                    "# {}: the built-in endpoint wins over route {label} (a route takes it only \
                     with a match at least as specific)",
                    b.display()
                )
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(toml_text: &str) -> Vec<Route> {
        #[derive(Deserialize)]
        struct T {
            route: Vec<Route>,
        }
        toml::from_str::<T>(toml_text)
            .map_err(|e| e.to_string())
            .unwrap()
            .route
    }

    #[test]
    fn minimal_form_parses() {
        let r = route(
            "[[route]]\npath_prefix = \"/app/\"\nupstreams = [\"http://127.0.0.1:9000\"]\nstrip_prefix = true\n",
        );
        validate(&r).unwrap();
        assert!(r[0].strip_prefix);
        assert_eq!(r[0].upstreams[0].url(), "http://127.0.0.1:9000");
    }

    #[test]
    fn upstream_urls() {
        let u = BaseUrl::parse("wss://[::1]:9443/base/", true).unwrap();
        assert!(u.tls);
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("::1", 9443, "/base")
        );
        assert!(!BaseUrl::parse("ws://a", true).unwrap().tls);
        assert!(BaseUrl::parse("ws://a", false).is_err());
        assert!(BaseUrl::parse("ftp://a", true).is_err());
        assert!(BaseUrl::parse("http://u:p@a", true).is_err());
    }

    #[test]
    fn bad_routes_are_named() {
        let r = route("[[route]]\nname = \"x\"\nupstreams = []\n");
        assert!(validate(&r).unwrap_err().starts_with("x:"));
        let r = route("[[route]]\npath_prefix = \"app\"\nupstreams = [\"http://a\"]\n");
        assert!(validate(&r).unwrap_err().contains("route#1"));
        let r = route("[[route]]\nupstreams = [\"http://a\"]\nbalance = \"hash\"\n");
        assert!(validate(&r).unwrap_err().contains("hash_key"));
        let r = route("[[route]]\nupstreams = [\"http://a\"]\nmethods = []\n");
        assert!(validate(&r).unwrap_err().contains("never match"));
    }

    #[test]
    fn duplicates_and_shadowed_routes_are_refused() {
        let r = route(
            "[[route]]\nname = \"a\"\npath_prefix = \"/x/\"\nupstreams = [\"http://a\"]\n\
             [[route]]\nname = \"b\"\npath_prefix = \"/x/\"\nupstreams = [\"http://b\"]\n",
        );
        let e = validate(&r).unwrap_err();
        assert!(
            e.contains("exactly the same") && e.contains('a') && e.contains('b'),
            "{e}"
        );
        let r = route(
            "[[route]]\nname = \"a\"\npath_prefix = \"/x/\"\npriority = 1\nupstreams = [\"http://a\"]\n\
             [[route]]\nname = \"b\"\npath_prefix = \"/x/y\"\nupstreams = [\"http://b\"]\n",
        );
        let e = validate(&r).unwrap_err();
        assert!(e.contains("route b can never match: route a"), "{e}");
        // Different methods on the same path are fine.
        let r = route(
            "[[route]]\nname = \"a\"\npath_prefix = \"/x/\"\nmethods = [\"GET\"]\nupstreams = [\"http://a\"]\n\
             [[route]]\nname = \"b\"\npath_prefix = \"/x/\"\nupstreams = [\"http://b\"]\n",
        );
        validate(&r).unwrap();
    }

    /// What `check-config` prints parses back to the same routes.
    #[test]
    fn rendered_routes_parse_back() {
        #[derive(Serialize, Deserialize)]
        struct T {
            route: Vec<Route>,
        }
        let r = route(
            "[[route]]\nname = \"a\"\nhost = \"*.example.com\"\nupstreams = [\"http://a\", { url = \"https://b\", http2 = \"never\" }]\n\
             balance = \"hash\"\nhash_key = \"cookie:sid\"\nmode = \"tunnel\"\n\
             [route.request_headers]\nset = { \"x-a\" = \"1\" }\n[route.health_check]\npath = \"/h\"\n",
        );
        validate(&r).unwrap();
        let text = toml::to_string(&T { route: r.clone() }).unwrap();
        let back: T = toml::from_str(&text).unwrap();
        assert_eq!(back.route, r, "{text}");
    }

    #[test]
    fn builtins_report_the_winner() {
        let r = route(
            "[[route]]\nname = \"all\"\nupstreams = [\"http://a\"]\n\
             [[route]]\nname = \"health\"\npath = \"/healthz\"\nupstreams = [\"http://a\"]\n",
        );
        let b = [Builtin::exact("/healthz"), Builtin::exact("/ws/echo")];
        let lines = builtin_report(&r, &b);
        assert!(
            lines
                .iter()
                .any(|l| l.contains("/ws/echo: the built-in endpoint wins over route all")),
            "{lines:?}"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.contains("/healthz: route health wins")),
            "{lines:?}"
        );
    }
}
