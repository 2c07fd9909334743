//! One validated `Config`, built in layers: embedded defaults → TOML file → environment → flags.
//!
//! Every error names the key (or variable, or flag) and the problem, so `ringgate check-config`
//! can tell an operator exactly what to fix. Unknown keys are errors, not silently ignored.

pub use super::logging::LogFormat;
pub use crate::error::ConfigError;
use serde::{Deserialize, Serialize};
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

/// Which I/O backend the shards run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IoMode {
    /// io_uring when the kernel allows it, else epoll (the reason is logged).
    Auto,
    Uring,
    Epoll,
}

impl std::str::FromStr for IoMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(IoMode::Auto),
            "uring" | "io_uring" => Ok(IoMode::Uring),
            "epoll" => Ok(IoMode::Epoll),
            other => Err(format!("expected auto, uring or epoll, got {other:?}")),
        }
    }
}

/// The effective configuration. Field names are the TOML keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address to listen on (`HOST`).
    pub host: IpAddr,
    /// Port to listen on (`PORT`); 0 picks a free port (tests).
    pub port: u16,
    /// Number of shards (threads); 0 = one per core available to the process.
    pub shards: usize,
    /// Pin each shard to its own core.
    pub pin_shards: bool,
    pub io: IoMode,
    /// Listen backlog per shard listener.
    pub backlog: u32,
    /// Server ping period in seconds (`WS_HEARTBEAT_INTERVAL`); a connection that sends nothing
    /// for two periods is closed. 0 disables heartbeats.
    pub heartbeat_interval: f64,
    /// Seconds a new connection has to send a complete request head (slowloris guard).
    pub handshake_timeout: f64,
    /// Seconds a graceful shutdown waits for connections to finish.
    pub drain_timeout: f64,
    /// Seconds to wait for the peer's close frame after sending ours.
    pub close_timeout: f64,
    /// Maximum concurrent WebSocket connections (`WS_MAX_CONNECTIONS`); 0 = unlimited.
    pub max_connections: usize,
    /// Largest message (after reassembly) a client may send, in bytes.
    pub max_message_size: usize,
    /// Bytes queued for one connection before it is closed as a slow consumer (1013).
    pub max_outbound_bytes: usize,
    /// Allowed `Origin` values for WebSocket upgrades; empty = any origin.
    pub allowed_origins: Vec<String>,
    /// Serve `/ws/echo`.
    pub echo: bool,
    /// Serve the files built into the binary at `/static/*` (src/server/static_files.rs).
    #[serde(rename = "static")]
    pub static_files: bool,
    pub log_format: LogFormat,
    /// permessage-deflate (RFC 7692).
    pub compression: Compression,
    /// TLS certificates (wss://, https://).
    pub tls: Tls,
    /// HTTP/2 server settings and abuse limits (every listener that speaks h2).
    pub http2: Http2,
    /// Listeners; when empty, one on `host:port`, with TLS when `[tls]` has a certificate.
    pub listen: Vec<Listen>,
    /// The admin listener (`/metrics`, `/ws/statistics`, `/api/*`, health): an address,
    /// `"auto"` (127.0.0.1:9003 when a listener is on a non-loopback address and none is marked
    /// `admin`), or `"off"`.
    pub admin_listen: AdminListen,
    /// Unix socket path on which the running process hands its listening sockets to a new
    /// one started with the same path (restart without a reset connection); unset = off.
    pub handover_socket: Option<std::path::PathBuf>,
    /// Record and serve Prometheus metrics.
    pub metrics: bool,
    // ---- agent gateway (`[agent]`, src/agent/config.rs) ----
    /// `/ws/agent` upstreams, timeouts and balancing.
    pub agent: crate::agent::config::AgentConfig,
    /// Rooms: `/ws`, `/api/publish`, `/api/presence`, `/api/history`.
    pub rooms: crate::rooms::config::RoomsConfig,
    /// Rooms across nodes (`[cluster]`, docs/CLUSTER.md): in memory, or through Redis.
    pub cluster: crate::cluster::config::ClusterConfig,
    /// JWT authentication of `/ws` (and `/ws/agent`) clients.
    pub auth: crate::auth::AuthConfig,
    /// Connection caps and rates per client address.
    pub limits: super::admission::LimitsConfig,
    /// The reverse proxy's route table (`[[route]]`, docs/PROXY.md).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub route: Vec<crate::proxy::config::Route>,
}

/// The `[tls]` table: a certificate from files, or one generated at start for development.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tls {
    /// PEM certificate chain, leaf first.
    pub cert: Option<std::path::PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: Option<std::path::PathBuf>,
    /// Generate a localhost certificate in memory at start (development only).
    pub self_signed: bool,
    /// PEM bundle of CAs whose client certificates are required (mTLS); unset = no client auth.
    pub client_ca: Option<std::path::PathBuf>,
    /// Certificates chosen by server name (SNI); `cert`/`key` above serve every other name.
    pub sni: Vec<SniCert>,
}

/// One `[[tls.sni]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniCert {
    pub server_name: String,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
}

/// One `[[listen]]` entry.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    pub addr: std::net::SocketAddr,
    /// Serve TLS on this listener (needs a certificate in `[tls]`).
    #[serde(default)]
    pub tls: bool,
    /// An admin listener: only `/metrics`, `/ws/statistics`, `/api/*`, `/healthz`, `/readyz`;
    /// while one exists, the other listeners serve none of these but health (and `/api/*` when
    /// `[rooms] api_key` is set).
    #[serde(default)]
    pub admin: bool,
    /// On a TLS listener, offer `h2` in ALPN next to `http/1.1`.
    #[serde(default = "yes")]
    pub http2: bool,
    /// On a plain listener, accept HTTP/2 with prior knowledge (h2c) next to HTTP/1.1.
    #[serde(default)]
    pub h2c: bool,
}

fn yes() -> bool {
    true
}

/// The `[http2]` table: settings every HTTP/2 connection is served with. The limits bound what
/// one connection can make the server hold or do (RFC 9113 §10.5; rapid reset, CVE-2023-44487;
/// CONTINUATION floods, CVE-2024-27316 and kin).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Http2 {
    /// Streams a client may have open at once (requests and WebSockets together).
    pub max_concurrent_streams: u32,
    /// Bytes a client may send on one stream before the server reads them (per-stream
    /// backpressure: a WebSocket that is not being read stops only itself).
    pub initial_stream_window_size: u32,
    /// Bytes a client may send on the whole connection before the server reads them.
    pub initial_connection_window_size: u32,
    /// Largest frame payload the server accepts.
    pub max_frame_size: u32,
    /// Largest header block (HEADERS plus CONTINUATION, decoded) the server accepts.
    pub max_header_list_size: u32,
    /// Bytes buffered per stream for sending before the writer waits for the client's window.
    pub max_send_buf_size: usize,
    /// Streams a client may reset before the server has accepted them; more is a GOAWAY.
    pub max_pending_accept_reset_streams: usize,
    /// Streams the server may reset for a client's protocol errors; more is a GOAWAY.
    pub max_local_error_reset_streams: usize,
    /// Seconds between PINGs on a connection; 0 = none.
    pub keep_alive_interval: f64,
    /// Seconds to wait for a PING's answer before closing the connection.
    pub keep_alive_timeout: f64,
}

impl Default for Http2 {
    fn default() -> Self {
        Http2 {
            max_concurrent_streams: 128,
            initial_stream_window_size: 256 * 1024,
            initial_connection_window_size: 1 << 20,
            max_frame_size: 16 * 1024,
            max_header_list_size: 16 * 1024,
            max_send_buf_size: 256 * 1024,
            max_pending_accept_reset_streams: 20,
            max_local_error_reset_streams: 256,
            keep_alive_interval: 30.0,
            keep_alive_timeout: 20.0,
        }
    }
}

impl Http2 {
    pub fn keep_alive_interval(&self) -> Option<Duration> {
        (self.keep_alive_interval > 0.0).then(|| Duration::from_secs_f64(self.keep_alive_interval))
    }
    pub fn keep_alive_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.keep_alive_timeout)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, reason: &str| ConfigError::Invalid {
            key,
            reason: reason.into(),
        };
        const WINDOW: std::ops::RangeInclusive<u32> = 65_535..=(1 << 31) - 1;
        if self.max_concurrent_streams == 0 {
            return Err(invalid(
                "http2.max_concurrent_streams",
                "must be at least 1",
            ));
        }
        if !WINDOW.contains(&self.initial_stream_window_size) {
            return Err(invalid(
                "http2.initial_stream_window_size",
                "must be 65535 to 2147483647",
            ));
        }
        if !WINDOW.contains(&self.initial_connection_window_size) {
            return Err(invalid(
                "http2.initial_connection_window_size",
                "must be 65535 to 2147483647",
            ));
        }
        if !(16_384..=16_777_215).contains(&self.max_frame_size) {
            return Err(invalid("http2.max_frame_size", "must be 16384 to 16777215"));
        }
        if self.max_header_list_size < 1024 {
            return Err(invalid(
                "http2.max_header_list_size",
                "must be at least 1024",
            ));
        }
        if self.max_send_buf_size < 16 * 1024 {
            return Err(invalid("http2.max_send_buf_size", "must be at least 16384"));
        }
        Ok(())
    }
}

/// The `[compression]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Compression {
    /// Negotiate permessage-deflate with clients that offer it.
    pub enabled: bool,
    /// zlib level, 0 (store) to 9 (smallest); realtime traffic wants the low end.
    pub level: u32,
    /// Messages shorter than this many bytes are sent uncompressed.
    pub threshold: usize,
    /// Largest window the server compresses with (9-15): memory per context vs ratio.
    pub server_max_window_bits: u8,
    /// Answer `server_no_context_takeover`: each message is compressed on its own, so a
    /// broadcast is compressed once for all such connections, and no connection keeps a
    /// compressor (~256 KiB each) between messages; messages compress less well.
    pub broadcast_friendly: bool,
    /// Ask clients for `client_no_context_takeover`, so the server keeps no inflate window
    /// (~40 KiB) per connection; client-to-server messages compress less well.
    pub client_no_context_takeover: bool,
}

impl Default for Compression {
    fn default() -> Self {
        Compression {
            enabled: true,
            level: 1,
            threshold: 256,
            server_max_window_bits: 15,
            broadcast_friendly: false,
            client_no_context_takeover: true,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            host: IpAddr::from([0, 0, 0, 0]),
            port: 8003,
            shards: 0,
            pin_shards: true,
            io: IoMode::Auto,
            backlog: 4096,
            heartbeat_interval: 30.0,
            handshake_timeout: 10.0,
            drain_timeout: 30.0,
            close_timeout: 3.0,
            max_connections: 0,
            max_message_size: 16 << 20,
            max_outbound_bytes: 4 << 20,
            allowed_origins: Vec::new(),
            echo: true,
            static_files: true,
            log_format: LogFormat::Text,
            compression: Compression::default(),
            admin_listen: AdminListen::Auto,
            handover_socket: None,
            metrics: true,
            rooms: crate::rooms::config::RoomsConfig::default(),
            cluster: crate::cluster::config::ClusterConfig::default(),
            auth: crate::auth::AuthConfig::default(),
            limits: super::admission::LimitsConfig::default(),
            tls: Tls::default(),
            http2: Http2::default(),
            listen: Vec::new(),
            // ---- agent gateway ----
            agent: Default::default(),
            route: Vec::new(),
        }
    }
}

/// Where the admin surface listens (`admin_listen`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AdminListen {
    /// [`AdminListen::DEFAULT`] when some listener is on a non-loopback address and none is an
    /// admin listener; otherwise none (loopback listeners are private already).
    #[default]
    Auto,
    Off,
    At(std::net::SocketAddr),
}

impl AdminListen {
    pub const DEFAULT: std::net::SocketAddr =
        std::net::SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 9003);
}

impl std::str::FromStr for AdminListen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(AdminListen::Auto),
            "off" => Ok(AdminListen::Off),
            addr => addr.parse().map(AdminListen::At).map_err(|_| {
                format!("{addr:?} is not \"auto\", \"off\" or an address like 127.0.0.1:9003")
            }),
        }
    }
}

impl Serialize for AdminListen {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            AdminListen::Auto => s.serialize_str("auto"),
            AdminListen::Off => s.serialize_str("off"),
            AdminListen::At(a) => s.serialize_str(&a.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for AdminListen {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Flag values; `None` leaves the lower layers' value in place.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub host: Option<IpAddr>,
    pub port: Option<u16>,
    pub shards: Option<usize>,
    pub io: Option<IoMode>,
    pub heartbeat_interval: Option<f64>,
    pub max_connections: Option<usize>,
    pub drain_timeout: Option<f64>,
    pub handshake_timeout: Option<f64>,
    pub log_format: Option<LogFormat>,
    pub tls_cert: Option<std::path::PathBuf>,
    pub tls_key: Option<std::path::PathBuf>,
    pub tls_self_signed: bool,
    pub handover_socket: Option<std::path::PathBuf>,
    pub admin_listen: Option<AdminListen>,
    // ---- agent gateway ----
    /// `--agent-upstream URL` (repeatable); replaces the lower layers' list when given.
    pub agent_upstreams: Vec<String>,
}

impl Config {
    /// Defaults, then the optional file, then `env`, then `flags`; validated.
    pub fn load(
        file: Option<&Path>,
        env: impl Fn(&str) -> Option<String>,
        flags: &Overrides,
    ) -> Result<Config, ConfigError> {
        let mut cfg = match file {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        cfg.apply_env(env)?;
        cfg.apply_flags(flags);
        cfg.validate()?;
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        Config::from_toml(&text).map_err(|reason| ConfigError::Parse {
            path: path.display().to_string(),
            reason,
        })
    }

    /// Parses TOML text over the defaults; the error text names the key and the line.
    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_string())
    }

    fn apply_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn parse<T: std::str::FromStr>(var: &str, value: &str) -> Result<T, ConfigError>
        where
            T::Err: std::fmt::Display,
        {
            value.trim().parse().map_err(|e: T::Err| ConfigError::Env {
                var: var.to_string(),
                reason: format!("{value:?}: {e}"),
            })
        }
        if let Some(v) = env("HOST") {
            self.host = parse("HOST", &v)?;
        }
        if let Some(v) = env("PORT") {
            self.port = parse("PORT", &v)?;
        }
        if let Some(v) = env("WS_HEARTBEAT_INTERVAL") {
            self.heartbeat_interval = parse("WS_HEARTBEAT_INTERVAL", &v)?;
        }
        if let Some(v) = env("WS_MAX_CONNECTIONS") {
            self.max_connections = parse("WS_MAX_CONNECTIONS", &v)?;
        }
        if let Some(v) = env("CLUSTER_ENGINE") {
            self.cluster.engine = parse("CLUSTER_ENGINE", &v)?;
        }
        if let Some(v) = env("REDIS_URL") {
            self.cluster.redis_url = v.trim().to_string();
        }
        if let Some(v) = env("REDIS_CA_FILE") {
            self.cluster.redis_ca_file = Some(v.trim().into());
        }
        if let Some(v) = env("REDIS_SENTINEL_PASSWORD") {
            self.cluster.sentinel_password = Some(v);
        }
        if let Some(v) = env("REDIS_KEY_PREFIX") {
            self.cluster.key_prefix = v;
        }
        if let Some(v) = env("REDIS_CONNECT_TIMEOUT") {
            self.cluster.connect_timeout = parse("REDIS_CONNECT_TIMEOUT", &v)?;
        }
        if let Some(v) = env("REDIS_COMMAND_TIMEOUT") {
            self.cluster.command_timeout = parse("REDIS_COMMAND_TIMEOUT", &v)?;
        }
        if let Some(v) = env("REDIS_MAX_PENDING") {
            self.cluster.max_pending = parse("REDIS_MAX_PENDING", &v)?;
        }
        // ---- agent gateway ----
        if let Some(v) = env("AGENT_UPSTREAM") {
            self.agent.upstreams = crate::agent::config::parse_upstream_list(&v);
        }
        Ok(())
    }

    fn apply_flags(&mut self, f: &Overrides) {
        macro_rules! take {
            ($($field:ident),*) => { $( if let Some(v) = f.$field.clone() { self.$field = v; } )* };
        }
        take!(
            host,
            port,
            shards,
            io,
            heartbeat_interval,
            max_connections,
            drain_timeout,
            handshake_timeout,
            log_format
        );
        if f.tls_cert.is_some() {
            self.tls.cert = f.tls_cert.clone();
        }
        if f.tls_key.is_some() {
            self.tls.key = f.tls_key.clone();
        }
        if f.tls_self_signed {
            self.tls.self_signed = true;
        }
        if f.handover_socket.is_some() {
            self.handover_socket = f.handover_socket.clone();
        }
        if let Some(a) = f.admin_listen {
            self.admin_listen = a;
        }
        // ---- agent gateway ----
        if !f.agent_upstreams.is_empty() {
            self.agent.upstreams = f
                .agent_upstreams
                .iter()
                .map(|u| crate::agent::config::UpstreamEntry::Url(u.clone()))
                .collect();
        }
    }

    /// What TLS listeners serve; `None` when no certificate is configured.
    pub fn tls_settings(&self) -> Option<crate::io::tls::TlsSettings> {
        use crate::io::tls::{CertSource, TlsSettings};
        let default = match (&self.tls.cert, &self.tls.key) {
            (Some(cert), Some(key)) => Some(CertSource::Files {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ if self.tls.self_signed => Some(CertSource::SelfSigned),
            _ => None,
        };
        if default.is_none() && self.tls.sni.is_empty() {
            return None;
        }
        Some(TlsSettings {
            default,
            sni: self
                .tls
                .sni
                .iter()
                .map(|s| {
                    let source = CertSource::Files {
                        cert: s.cert.clone(),
                        key: s.key.clone(),
                    };
                    (s.server_name.clone(), source)
                })
                .collect(),
            client_ca: self.tls.client_ca.clone(),
        })
    }

    /// The listeners to open: `[[listen]]`, or `host:port` (TLS when a certificate is set).
    pub fn listeners(&self) -> Vec<Listen> {
        let mut all = if self.listen.is_empty() {
            vec![Listen {
                addr: std::net::SocketAddr::new(self.host, self.port),
                tls: self.tls_settings().is_some(),
                admin: false,
                http2: true,
                h2c: false,
            }]
        } else {
            self.listen.clone()
        };
        let admin = match self.admin_listen {
            AdminListen::At(addr) => Some(addr),
            AdminListen::Auto
                if !all.iter().any(|l| l.admin)
                    && all.iter().any(|l| !l.addr.ip().is_loopback()) =>
            {
                Some(AdminListen::DEFAULT)
            }
            AdminListen::Auto | AdminListen::Off => None,
        };
        if let Some(addr) = admin {
            all.push(Listen {
                addr,
                tls: false,
                admin: true,
                http2: true,
                h2c: false,
            });
        }
        all
    }

    /// Whether the admin surface is kept to admin listeners (else loopback listeners serve it).
    pub fn has_admin_listener(&self) -> bool {
        self.listeners().iter().any(|l| l.admin)
    }

    /// What an operator should know about this configuration's exposure (start-up log and
    /// `check-config`).
    pub fn warnings(&self) -> Vec<String> {
        let mut w = Vec::new();
        let listeners = self.listeners();
        if !self.auth.enabled() && self.rooms.enabled {
            w.push(
                "no [auth]: /ws is open to anonymous clients, who may subscribe and publish to any \
                 topic (fine for development; configure [auth] before exposing it)"
                    .to_string(),
            );
        }
        let exposed_admin: Vec<_> = listeners
            .iter()
            .filter(|l| l.admin && !l.addr.ip().is_loopback())
            .map(|l| l.addr.to_string())
            .collect();
        if !exposed_admin.is_empty() && self.rooms.api_key.is_none() {
            w.push(format!(
                "admin listener on a non-loopback address ({}) without [rooms] api_key: anyone \
                 who reaches it can publish and read every topic",
                exposed_admin.join(", ")
            ));
        }
        let public: Vec<_> = listeners
            .iter()
            .filter(|l| !l.admin && !l.addr.ip().is_loopback())
            .collect();
        if !public.is_empty() && self.rooms.enabled && self.rooms.api_key.is_none() {
            w.push(
                "no [rooms] api_key: /api/* is not served on public listeners, only on the admin \
                 listener"
                    .to_string(),
            );
        }
        if self.rooms.api_reserved_types {
            w.push(
                "rooms.api_reserved_types: /api/publish may send the server's own message types \
                 (join, leave, subscribed, ...)"
                    .to_string(),
            );
        }
        w
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        fn seconds(key: &'static str, v: f64, allow_zero: bool) -> Result<(), ConfigError> {
            if !v.is_finite() || v < 0.0 || (!allow_zero && v == 0.0) || v > 86_400.0 {
                return Err(ConfigError::Invalid {
                    key,
                    reason: format!(
                        "{v} is not a duration in seconds ({}up to 86400)",
                        if allow_zero { "0 " } else { "above 0 " }
                    ),
                });
            }
            Ok(())
        }
        seconds("heartbeat_interval", self.heartbeat_interval, true)?;
        seconds("handshake_timeout", self.handshake_timeout, false)?;
        seconds("drain_timeout", self.drain_timeout, true)?;
        seconds("close_timeout", self.close_timeout, false)?;
        seconds(
            "http2.keep_alive_interval",
            self.http2.keep_alive_interval,
            true,
        )?;
        seconds(
            "http2.keep_alive_timeout",
            self.http2.keep_alive_timeout,
            false,
        )?;
        self.http2.validate()?;
        if self.max_message_size < 125 {
            return Err(ConfigError::Invalid {
                key: "max_message_size",
                reason: "must be at least 125 bytes".into(),
            });
        }
        if self.max_outbound_bytes < 64 * 1024 {
            return Err(ConfigError::Invalid {
                key: "max_outbound_bytes",
                reason: "must be at least 65536 bytes".into(),
            });
        }
        if self.compression.level > 9 {
            return Err(ConfigError::Invalid {
                key: "compression.level",
                reason: format!("{} is not a zlib level (0-9)", self.compression.level),
            });
        }
        if !(9..=15).contains(&self.compression.server_max_window_bits) {
            return Err(ConfigError::Invalid {
                key: "compression.server_max_window_bits",
                reason: format!(
                    "{} is outside 9-15 (zlib cannot compress raw deflate with 8)",
                    self.compression.server_max_window_bits
                ),
            });
        }
        match (&self.tls.cert, &self.tls.key, self.tls.self_signed) {
            (Some(_), None, _) | (None, Some(_), _) => {
                return Err(ConfigError::Invalid {
                    key: "tls",
                    reason: "`cert` and `key` go together".into(),
                })
            }
            (Some(_), Some(_), true) => {
                return Err(ConfigError::Invalid {
                    key: "tls.self_signed",
                    reason: "cannot be combined with `cert` and `key`".into(),
                })
            }
            _ => {}
        }
        if self.listen.iter().any(|l| l.tls) && self.tls_settings().is_none() {
            return Err(ConfigError::Invalid {
                key: "listen",
                reason: "a listener has `tls = true` but [tls] has no certificate".into(),
            });
        }
        if self.tls.client_ca.is_some() && self.tls_settings().is_none() {
            return Err(ConfigError::Invalid {
                key: "tls.client_ca",
                reason: "client authentication needs a server certificate".into(),
            });
        }
        if self.listen.iter().all(|l| l.admin) && !self.listen.is_empty() {
            return Err(ConfigError::Invalid {
                key: "listen",
                reason: "every listener is an admin listener: nothing would serve clients".into(),
            });
        }
        self.rooms.validate()?;
        self.cluster.validate()?;
        self.auth.validate()?;
        self.limits.validate()?;
        if self.backlog == 0 {
            return Err(ConfigError::Invalid {
                key: "backlog",
                reason: "must be above 0".into(),
            });
        }
        if self.shards > 1024 {
            return Err(ConfigError::Invalid {
                key: "shards",
                reason: format!("{} shards is more than 1024", self.shards),
            });
        }
        for o in &self.allowed_origins {
            if o.is_empty() || o.ends_with('/') {
                return Err(ConfigError::Invalid {
                    key: "allowed_origins",
                    reason: format!("{o:?} is not an origin like \"https://example.com\""),
                });
            }
        }
        // ---- agent gateway ----
        self.agent.validate()?;
        crate::proxy::config::validate(&self.route).map_err(|reason| ConfigError::Invalid {
            key: "route",
            reason,
        })?;
        Ok(())
    }

    /// The built-in endpoints' paths on client listeners: a route takes one only with a match
    /// at least as specific.
    pub fn builtin_paths(&self) -> Vec<crate::proxy::route::Builtin> {
        use crate::proxy::route::Builtin;
        let mut b = vec![
            Builtin::exact("/healthz"),
            Builtin::exact("/readyz"),
            Builtin::exact("/ws/agent"),
        ];
        if self.echo {
            b.push(Builtin::exact("/ws/echo"));
        }
        if self.rooms.enabled {
            b.push(Builtin::exact("/ws"));
            b.push(Builtin::prefix("/api/"));
        }
        if !self.has_admin_listener() {
            b.push(Builtin::exact("/metrics"));
            b.push(Builtin::exact("/ws/statistics"));
        }
        b
    }

    /// `check-config`'s notes on routes that overlap built-in endpoints (TOML comments).
    pub fn route_report(&self) -> Vec<String> {
        crate::proxy::config::builtin_report(&self.route, &self.builtin_paths())
    }

    /// The effective config as TOML (what `check-config` prints).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    pub fn heartbeat(&self) -> Option<Duration> {
        (self.heartbeat_interval > 0.0).then(|| Duration::from_secs_f64(self.heartbeat_interval))
    }
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.handshake_timeout)
    }
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.drain_timeout)
    }
    pub fn close_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.close_timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::config::Endpoint;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn defaults_match_the_protocol() {
        let c = Config::load(None, env(&[]), &Overrides::default()).unwrap();
        assert_eq!(c.port, 8003);
        assert_eq!(c.host.to_string(), "0.0.0.0");
        assert_eq!(c.heartbeat(), Some(Duration::from_secs(30)));
        assert_eq!(c.max_message_size, 16 << 20);
        assert_eq!(c.max_connections, 0);
        assert!(c.echo);
    }

    #[test]
    fn the_cluster_table_in_its_minimal_form_and_from_the_environment() {
        let c = Config::from_toml(
            "[cluster]\nengine = \"redis\"\nredis_url = \"redis://127.0.0.1:6379\"",
        )
        .unwrap();
        assert!(c.cluster.is_redis());
        assert_eq!(
            c.cluster.target().unwrap().endpoint,
            Endpoint::Direct("127.0.0.1:6379".into())
        );
        let mut c = Config::default();
        assert!(!c.cluster.is_redis(), "memory is the default");
        c.apply_env(env(&[
            ("CLUSTER_ENGINE", "redis"),
            ("REDIS_URL", "redis://:pw@10.0.0.5:7000/2"),
            ("REDIS_CONNECT_TIMEOUT", "0.5"),
            ("REDIS_COMMAND_TIMEOUT", "3"),
            ("REDIS_MAX_PENDING", "99"),
            ("REDIS_KEY_PREFIX", "app1:"),
        ]))
        .unwrap();
        let t = c.cluster.target().unwrap();
        assert!(c.cluster.is_redis());
        assert_eq!(
            (t.endpoint, t.password.as_deref(), t.db),
            (Endpoint::Direct("10.0.0.5:7000".into()), Some("pw"), 2)
        );
        let k = &c.cluster;
        assert_eq!(
            (
                k.connect_timeout,
                k.command_timeout,
                k.max_pending,
                k.key_prefix.as_str()
            ),
            (0.5, 3.0, 99, "app1:")
        );
        assert!(c.apply_env(env(&[("REDIS_MAX_PENDING", "many")])).is_err());
        c.apply_env(env(&[("REDIS_URL", "mysql://x")])).unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("cluster.redis_url"), "{err}");
    }

    #[test]
    fn layers_apply_in_order() {
        let file = Config::from_toml("port = 9000\nshards = 3\nheartbeat_interval = 5").unwrap();
        let mut c = file;
        c.apply_env(env(&[("PORT", "9100"), ("WS_MAX_CONNECTIONS", "7")]))
            .unwrap();
        assert_eq!((c.port, c.shards, c.max_connections), (9100, 3, 7));
        c.apply_flags(&Overrides {
            port: Some(9200),
            ..Default::default()
        });
        assert_eq!(c.port, 9200);
        assert_eq!(c.heartbeat_interval, 5.0);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = Config::from_toml("port = 1\nhaert_beat = 3\n").unwrap_err();
        assert!(err.contains("haert_beat"), "{err}");
        assert!(err.contains("line 2"), "{err}");
    }

    #[test]
    fn wrong_type_is_named() {
        let err = Config::from_toml("port = \"eighty\"").unwrap_err();
        assert!(err.contains("port"), "{err}");
        let err = Config::from_toml("io = \"kqueue\"").unwrap_err();
        assert!(err.contains("kqueue"), "{err}");
    }

    #[test]
    fn bad_env_names_the_variable() {
        let err = Config::load(None, env(&[("PORT", "99999")]), &Overrides::default()).unwrap_err();
        assert!(
            matches!(&err, ConfigError::Env { var, .. } if var == "PORT"),
            "{err}"
        );
        let err = Config::load(
            None,
            env(&[("WS_HEARTBEAT_INTERVAL", "soon")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("WS_HEARTBEAT_INTERVAL"));
    }

    #[test]
    fn validation_names_the_key() {
        let mut c = Config {
            handshake_timeout: 0.0,
            ..Config::default()
        };
        assert!(
            matches!(c.validate(), Err(ConfigError::Invalid { key, .. }) if key == "handshake_timeout")
        );
        c.handshake_timeout = 1.0;
        c.allowed_origins = vec!["https://a.example/".into()];
        assert!(
            matches!(c.validate(), Err(ConfigError::Invalid { key, .. }) if key == "allowed_origins")
        );
        c.allowed_origins.clear();
        c.heartbeat_interval = f64::NAN;
        assert!(c.validate().is_err());
    }

    #[test]
    fn compression_table() {
        let c = Config::from_toml("[compression]\nlevel = 6\nbroadcast_friendly = true").unwrap();
        assert!(c.compression.enabled && c.compression.broadcast_friendly);
        assert_eq!(c.compression.level, 6);
        let err = Config::from_toml("[compression]\nlevle = 6").unwrap_err();
        assert!(err.contains("levle"), "{err}");
        let c = Config::from_toml("[compression]\nserver_max_window_bits = 8").unwrap();
        assert!(
            matches!(c.validate(), Err(ConfigError::Invalid { key, .. }) if key == "compression.server_max_window_bits")
        );
    }

    #[test]
    fn tls_table() {
        let c = Config::from_toml("[tls]\ncert = \"/a.pem\"\nkey = \"/k.pem\"").unwrap();
        let t = c.tls_settings().unwrap();
        assert!(matches!(
            t.default,
            Some(crate::io::tls::CertSource::Files { .. })
        ));
        assert!(c.listeners()[0].tls);
        let c = Config::from_toml("[tls]\ncert = \"/a.pem\"").unwrap();
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Invalid { key: "tls", .. })
        ));
        let c = Config::from_toml("[tls]\nself_signed = true").unwrap();
        assert_eq!(
            c.tls_settings().unwrap().default,
            Some(crate::io::tls::CertSource::SelfSigned)
        );
        assert_eq!(Config::default().tls_settings(), None);
        assert!(!Config::default().listeners()[0].tls);
    }

    #[test]
    fn listeners_and_sni() {
        let c = Config::from_toml(
            r#"
            [[listen]]
            addr = "127.0.0.1:8080"
            [[listen]]
            addr = "127.0.0.1:8443"
            tls = true
            [tls]
            client_ca = "/ca.pem"
            [[tls.sni]]
            server_name = "api.example"
            cert = "/api.pem"
            key = "/api.key"
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        let l = c.listeners();
        assert_eq!((l.len(), l[0].tls, l[1].tls), (2, false, true));
        let t = c.tls_settings().unwrap();
        assert_eq!(t.default, None);
        assert_eq!(t.sni[0].0, "api.example");
        let c = Config::from_toml("[[listen]]\naddr = \"127.0.0.1:1\"\ntls = true").unwrap();
        assert!(matches!(
            c.validate(),
            Err(ConfigError::Invalid { key: "listen", .. })
        ));
    }

    #[test]
    fn http2_per_listener_and_its_limits() {
        let c = Config::from_toml(
            "[[listen]]\naddr = \"127.0.0.1:80\"\nh2c = true\n\
             [[listen]]\naddr = \"127.0.0.1:443\"\ntls = true\nhttp2 = false\n\
             [http2]\nmax_concurrent_streams = 10\nkeep_alive_interval = 0",
        )
        .unwrap();
        let l = &c.listen;
        assert_eq!(
            (l[0].h2c, l[0].http2, l[1].h2c, l[1].http2),
            (true, true, false, false)
        );
        assert_eq!(c.http2.max_concurrent_streams, 10);
        assert_eq!(c.http2.keep_alive_interval(), None);
        for (table, key) in [
            ("max_concurrent_streams = 0", "http2.max_concurrent_streams"),
            (
                "initial_stream_window_size = 100",
                "http2.initial_stream_window_size",
            ),
            (
                "initial_connection_window_size = 2147483648",
                "http2.initial_connection_window_size",
            ),
            ("max_frame_size = 1000", "http2.max_frame_size"),
            ("max_header_list_size = 10", "http2.max_header_list_size"),
            ("max_send_buf_size = 0", "http2.max_send_buf_size"),
            ("keep_alive_timeout = 0", "http2.keep_alive_timeout"),
        ] {
            let c = Config::from_toml(&format!("[http2]\n{table}")).unwrap();
            assert!(
                matches!(c.validate(), Err(ConfigError::Invalid { key: k, .. }) if k == key),
                "{table}"
            );
        }
    }

    #[test]
    fn rendered_config_parses_back() {
        let c = Config {
            allowed_origins: vec!["https://a.example".into()],
            ..Config::default()
        };
        assert_eq!(Config::from_toml(&c.to_toml()).unwrap(), c);
    }

    // ---- agent gateway ----
    #[test]
    fn agent_upstreams_layer_file_env_flags() {
        let mut c = Config::from_toml("[agent]\nupstreams = [\"http://file:1\"]").unwrap();
        c.apply_env(env(&[("AGENT_UPSTREAM", "http://env:1,http://env:2")]))
            .unwrap();
        let urls = |c: &Config| {
            c.agent
                .upstreams
                .iter()
                .map(|u| u.url().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(urls(&c), ["http://env:1", "http://env:2"]);
        c.apply_flags(&Overrides {
            agent_upstreams: vec!["http://flag:1".into()],
            ..Default::default()
        });
        assert_eq!(urls(&c), ["http://flag:1"]);
        let err = Config::load(
            None,
            env(&[("AGENT_UPSTREAM", "nope")]),
            &Overrides::default(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("agent.upstreams"), "{err}");
    }

    #[test]
    fn missing_file_is_named() {
        let err = Config::from_file(Path::new("/nonexistent/ringgate.toml")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ringgate.toml"));
    }

    // ---- [agent] as part of the whole file ----

    #[test]
    fn agent_upstream_forms_parse_and_render_back() {
        let c = Config::from_toml(
            r#"
            [agent]
            balance = "least_outstanding"
            headers = { Authorization = { env = "KEY", prefix = "Bearer " } }
            upstreams = [
              "http://127.0.0.1:1",
              { url = "http://127.0.0.1:2", http2 = "prior_knowledge", headers = { "X-A" = "b" } },
            ]
            "#,
        )
        .unwrap();
        c.validate().unwrap();
        assert_eq!(
            c.agent.balance,
            crate::agent::config::Balance::LeastOutstanding
        );
        assert_eq!(c.agent.upstreams.len(), 2);
        assert!(
            matches!(&c.agent.upstreams[1], crate::agent::config::UpstreamEntry::Table(t) if t.http2 == Some(crate::agent::config::Http2::PriorKnowledge))
        );
        assert_eq!(Config::from_toml(&c.to_toml()).unwrap(), c);
    }

    #[test]
    fn bad_agent_values_name_the_key() {
        for (toml, key) in [
            ("[agent]\nupstreams = [\"ftp://x\"]", "agent.upstreams"),
            ("[agent]\nidle_timeout = 0", "agent.idle_timeout"),
            (
                "[agent]\nheaders = { \"bad name\" = \"x\" }",
                "agent.headers",
            ),
            ("[agent]\ntool_path = \"tools\"", "agent.tool_path"),
        ] {
            let c = Config::from_toml(toml).unwrap();
            match c.validate() {
                Err(ConfigError::Invalid { key: k, .. }) => assert_eq!(k, key, "{toml}"),
                other => panic!("{toml}: {other:?}"),
            }
        }
        let err = Config::from_toml("[agent]\nupstream = []").unwrap_err();
        assert!(err.contains("upstream"), "{err}");
    }

    #[test]
    fn readme_agent_example_parses() {
        let readme = include_str!("../../README.md");
        let start = readme
            .find("```toml\n[agent]\n")
            .expect("README has an [agent] example")
            + 8;
        let end = start + readme[start..].find("```").expect("closed block");
        let c = Config::from_toml(&readme[start..end]).unwrap();
        c.validate().unwrap();
        assert_eq!(c.agent.upstreams.len(), 2);
    }

    #[test]
    fn the_admin_listener_is_automatic_only_for_public_listeners() {
        let admin = |c: &Config| -> Vec<std::net::SocketAddr> {
            c.listeners()
                .iter()
                .filter(|l| l.admin)
                .map(|l| l.addr)
                .collect()
        };
        // The embedded defaults listen on 0.0.0.0: admin surface on loopback.
        assert_eq!(admin(&Config::default()), [AdminListen::DEFAULT]);
        let local = Config {
            host: "127.0.0.1".parse().unwrap(),
            ..Config::default()
        };
        assert!(admin(&local).is_empty());
        let off = Config {
            admin_listen: AdminListen::Off,
            ..Config::default()
        };
        assert!(admin(&off).is_empty());
        let c = Config::from_toml("admin_listen = \"127.0.0.1:9999\"\n").unwrap();
        assert_eq!(admin(&c), ["127.0.0.1:9999".parse().unwrap()]);
        assert!(Config::from_toml("admin_listen = \"nowhere\"\n").is_err());
        assert_eq!(
            Config::from_toml(&Config::default().to_toml())
                .unwrap()
                .admin_listen,
            AdminListen::Auto
        );
        // Warnings name the exposure.
        let w = Config::default().warnings();
        assert!(w.iter().any(|w| w.contains("no [auth]")), "{w:?}");
        assert!(w.iter().any(|w| w.contains("api_key")), "{w:?}");
        let exposed = Config::from_toml("admin_listen = \"0.0.0.0:9003\"\n").unwrap();
        assert!(exposed
            .warnings()
            .iter()
            .any(|w| w.contains("non-loopback")));
    }
}
