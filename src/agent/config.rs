//! The `[agent]` table: where `/ws/agent` requests go and how long they may take.
//!
//! ```toml
//! [agent]
//! upstreams = ["http://10.0.0.5:8000", "https://agents.internal/v1"]
//! balance = "least_outstanding"         # or "round_robin"
//! headers = { Authorization = { env = "AGENT_API_KEY", prefix = "Bearer " } }
//!
//! [[agent.upstreams]]                   # the table form, with headers of its own
//! url = "http://10.0.0.6:8000"
//! http2 = "prior_knowledge"
//! headers = { "X-Tenant" = "acme" }
//! ```

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::io::client::check_header;
pub use crate::io::client::{BaseUrl, Http2};

/// How requests are spread over several base URLs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    RoundRobin,
    /// The target with the fewest requests in flight (from this shard), ties in turn.
    LeastOutstanding,
}

/// A header value: literal, or read from an environment variable at start (for secrets, so they
/// never sit in a config file; values are never logged).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum HeaderValueSource {
    Literal(String),
    Env {
        env: String,
        #[serde(default, skip_serializing_if = "String::is_empty")]
        prefix: String,
    },
}

/// One upstream base URL, as a bare string or a table.
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
    #[serde(default)]
    pub http2: Option<Http2>,
    /// Added to (and overriding) `agent.headers` for this upstream.
    #[serde(default)]
    pub headers: BTreeMap<String, HeaderValueSource>,
}

impl UpstreamEntry {
    pub fn url(&self) -> &str {
        match self {
            UpstreamEntry::Url(u) => u,
            UpstreamEntry::Table(t) => &t.url,
        }
    }
}

/// The `[agent]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// Base URLs (`AGENT_UPSTREAM=URL[,URL…]`, `--agent-upstream URL`); empty = agent requests
    /// are answered with `upstream_error`.
    pub upstreams: Vec<UpstreamEntry>,
    pub balance: Balance,
    /// HTTP version for upstreams that do not say.
    pub http2: Http2,
    /// Headers sent to every upstream.
    pub headers: BTreeMap<String, HeaderValueSource>,
    /// Extra PEM CA bundle trusted for `https://` upstreams (besides the webpki roots).
    pub ca_file: Option<PathBuf>,
    /// Seconds to open the TCP connection (and TLS, and the HTTP/2 handshake).
    pub connect_timeout: f64,
    /// Seconds from sending the request to the response head.
    pub first_byte_timeout: f64,
    /// Seconds the upstream may stay silent between body chunks.
    pub idle_timeout: f64,
    /// Requests in flight per WebSocket connection; more are refused with `rate_limited`.
    pub max_in_flight: usize,
    /// Consecutive failures (connect errors, timeouts, 5xx) that open a target's breaker.
    pub failure_threshold: u32,
    /// Seconds an open breaker fails fast before it lets one probe through (doubling on each
    /// failed probe, up to 16×).
    pub open_seconds: f64,
    /// Idle HTTP/1.1 connections kept per target and shard.
    pub max_idle_per_target: usize,
    /// Largest upstream answer (`agent_query`, `tool_call`) or single stream event, in bytes.
    pub max_response_bytes: usize,
    /// Largest WebSocket message a `/ws/agent` client may send (1009 beyond); at most the
    /// top-level `max_message_size`.
    pub max_message_size: usize,
    pub query_path: String,
    pub stream_path: String,
    /// `{tool_name}` is replaced by the tool's name.
    pub tool_path: String,
    /// Answer from the built-in demo agent (src/agent/demo.rs) while no upstream is
    /// configured, so a fresh start works end to end; configuring any upstream turns it off.
    pub demo: bool,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            upstreams: Vec::new(),
            balance: Balance::RoundRobin,
            http2: Http2::Auto,
            headers: BTreeMap::new(),
            ca_file: None,
            connect_timeout: 5.0,
            first_byte_timeout: 60.0,
            idle_timeout: 30.0,
            max_in_flight: 32,
            failure_threshold: 5,
            open_seconds: 10.0,
            max_idle_per_target: 64,
            max_response_bytes: 4 << 20,
            max_message_size: 1 << 20,
            query_path: "/agent/query".into(),
            stream_path: "/agent/stream".into(),
            tool_path: "/tools/{tool_name}".into(),
            demo: true,
        }
    }
}

/// `AGENT_UPSTREAM=URL[,URL…]` (spaces around commas allowed).
pub fn parse_upstream_list(v: &str) -> Vec<UpstreamEntry> {
    v.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| UpstreamEntry::Url(s.to_string()))
        .collect()
}

impl AgentConfig {
    /// Whether `/ws/agent` is served by the built-in demo agent.
    pub fn demo_active(&self) -> bool {
        self.demo && self.upstreams.is_empty()
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.connect_timeout)
    }
    pub fn first_byte_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.first_byte_timeout)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.idle_timeout)
    }
    pub fn open_duration(&self) -> Duration {
        Duration::from_secs_f64(self.open_seconds)
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, reason: String| ConfigError::Invalid { key, reason };
        for (key, v) in [
            ("agent.connect_timeout", self.connect_timeout),
            ("agent.first_byte_timeout", self.first_byte_timeout),
            ("agent.idle_timeout", self.idle_timeout),
            ("agent.open_seconds", self.open_seconds),
        ] {
            if !v.is_finite() || v <= 0.0 || v > 86_400.0 {
                return Err(invalid(
                    key,
                    format!("{v} is not a duration in seconds (above 0 up to 86400)"),
                ));
            }
        }
        for u in &self.upstreams {
            BaseUrl::parse(u.url(), false).map_err(|r| invalid("agent.upstreams", r))?;
            if let UpstreamEntry::Table(t) = u {
                check_headers("agent.upstreams.headers", &t.headers)?;
            }
        }
        check_headers("agent.headers", &self.headers)?;
        if self.max_in_flight == 0 {
            return Err(invalid("agent.max_in_flight", "must be above 0".into()));
        }
        if self.max_message_size < 1024 {
            return Err(invalid(
                "agent.max_message_size",
                "must be at least 1024".into(),
            ));
        }
        if self.failure_threshold == 0 {
            return Err(invalid("agent.failure_threshold", "must be above 0".into()));
        }
        if self.max_response_bytes < 1024 {
            return Err(invalid(
                "agent.max_response_bytes",
                "must be at least 1024".into(),
            ));
        }
        for (key, p) in [
            ("agent.query_path", &self.query_path),
            ("agent.stream_path", &self.stream_path),
            ("agent.tool_path", &self.tool_path),
        ] {
            if !p.starts_with('/') || p.parse::<http::uri::PathAndQuery>().is_err() {
                return Err(invalid(key, format!("{p:?} is not a path starting with /")));
            }
        }
        Ok(())
    }
}

fn check_headers(
    key: &'static str,
    headers: &BTreeMap<String, HeaderValueSource>,
) -> Result<(), ConfigError> {
    for (name, v) in headers {
        let literal = match v {
            HeaderValueSource::Literal(l) => Some(l.as_str()),
            HeaderValueSource::Env { .. } => None,
        };
        check_header(name, literal).map_err(|reason| ConfigError::Invalid { key, reason })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        let b = BaseUrl::parse("https://agents.example/v1/", false).unwrap();
        assert_eq!(
            (b.tls, b.host.as_str(), b.port, b.path.as_str()),
            (true, "agents.example", 443, "/v1")
        );
        let b = BaseUrl::parse("http://127.0.0.1:9000", false).unwrap();
        assert_eq!((b.tls, b.port, b.path.as_str()), (false, 9000, ""));
        assert_eq!(b.origin(), "http://127.0.0.1:9000");
        let b = BaseUrl::parse("http://[::1]:9000", false).unwrap();
        assert_eq!(b.host, "::1");
        for bad in [
            "ftp://x",
            "localhost:80",
            "http://u:p@x",
            "http://x/?a=1",
            "/path",
        ] {
            assert!(BaseUrl::parse(bad, false).is_err(), "{bad}");
        }
    }

    #[test]
    fn env_list() {
        let l = parse_upstream_list(" http://a:1 , http://b:2,,");
        assert_eq!(l.len(), 2);
        assert_eq!(l[1].url(), "http://b:2");
    }
}
