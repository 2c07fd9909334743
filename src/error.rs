//! Errors that cross module boundaries, and what each one tells the peer.
//!
//! In the style of rustls' `Error`: every failure one module reports to another is a variant
//! here, documented with the answer the peer gets (an HTTP status, an agent protocol error
//! code, or nothing because no peer is involved), and that answer is computed here, so every
//! endpoint answers the same failure the same way:
//!
//! | type | raised by | the peer is told |
//! |---|---|---|
//! | [`Code`] | rooms, agent | the `code` of a `{"type": "error"}` message |
//! | [`Rejection`] | `ws::handshake`, `auth`, the server's admission | an HTTP status ([`Rejection::status`]) |
//! | [`AuthError`] | `auth` | 401 (inside [`Rejection::Unauthorized`]) |
//! | [`UpstreamError`] | `io::connect`, the agent gateway | an agent error code ([`UpstreamError::code`]) or a gateway status ([`UpstreamError::http_status`]) |
//! | [`TlsError`] | `io::tls` | nobody: the server does not start, or a reload keeps the old certificate |
//! | [`ConfigError`] | `server::config`, `auth` | nobody: the server does not start |
//! | [`StartError`] | `server::Server::start` | nobody: the process exits before it listens |
//!
//! WebSocket close codes are chosen inside `ws` (`ReadError::close_code`, the session's
//! closes): those failures do not leave the module.

use std::fmt;

use http::{header, HeaderName, HeaderValue, StatusCode};

/// The error codes of PROTOCOL.md, shared by the rooms (`/ws`) and agent (`/ws/agent`)
/// endpoints: `{"type": "error", "error": "…", "code": "…"}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// Not JSON, not an object, or a binary frame outside a binary topic's envelope.
    BadJson,
    /// An unknown `action` (rooms) or `type` (agent).
    UnknownAction,
    /// A required field is missing or has the wrong type.
    MissingField,
    /// The token does not allow it.
    Forbidden,
    RateLimited,
    /// Over a size or count limit.
    TooLarge,
    /// `unsubscribe` from a topic the connection is not subscribed to.
    NotSubscribed,
    /// A malformed binary envelope, binary for a JSON topic, or JSON for a binary one.
    BadBinary,
    /// The upstream failed (connect error, error status, broken stream, open breaker).
    UpstreamError,
    /// The upstream did not answer in time.
    UpstreamTimeout,
    /// A shard this request needs is over its backlog (`[rooms] max_shard_backlog`): retry.
    Overloaded,
    /// The rooms' Redis is down or too slow (`[cluster] engine = "redis"`).
    Unavailable,
    Internal,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::BadJson => "bad_json",
            Code::UnknownAction => "unknown_action",
            Code::MissingField => "missing_field",
            Code::Forbidden => "forbidden",
            Code::RateLimited => "rate_limited",
            Code::TooLarge => "too_large",
            Code::NotSubscribed => "not_subscribed",
            Code::BadBinary => "bad_binary",
            Code::UpstreamError => "upstream_error",
            Code::UpstreamTimeout => "upstream_timeout",
            Code::Overloaded => "overloaded",
            Code::Unavailable => "unavailable",
            Code::Internal => "internal",
        }
    }
}

/// A refused WebSocket upgrade. The `Display` text is the response body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// The request is not a valid RFC 6455 upgrade (method, version, headers, key); the text
    /// says what is wrong. Peer: 400 Bad Request with `Sec-WebSocket-Version: 13` (RFC 6455
    /// §4.4: the version this server speaks).
    #[error("{0}")]
    BadRequest(&'static str),
    /// The `Origin` is not in `allowed_origins`. Peer: 403 Forbidden.
    #[error("origin not allowed")]
    OriginNotAllowed,
    /// `[auth]` applies and the token is missing or invalid. Peer: 401 Unauthorized with
    /// `WWW-Authenticate: Bearer`.
    #[error(transparent)]
    Unauthorized(#[from] AuthError),
    /// The server is draining for a shutdown or restart. Peer: 503 Service Unavailable.
    #[error("server is draining")]
    Draining,
    /// `max_connections` WebSockets are open. Peer: 503 Service Unavailable.
    #[error("too many connections")]
    AtCapacity,
}

impl Rejection {
    /// The HTTP status of the refusal.
    pub fn status(&self) -> StatusCode {
        match self {
            Rejection::BadRequest(_) => StatusCode::BAD_REQUEST,
            Rejection::OriginNotAllowed => StatusCode::FORBIDDEN,
            Rejection::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Rejection::Draining | Rejection::AtCapacity => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// A header the refusal carries besides `Content-Type`.
    pub fn header(&self) -> Option<(HeaderName, HeaderValue)> {
        match self {
            Rejection::BadRequest(_) => Some((
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            )),
            Rejection::Unauthorized(_) => {
                Some((header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer")))
            }
            _ => None,
        }
    }

    /// The `reason` label of `ringgate_handshakes_failed_total`.
    pub fn metric_reason(&self) -> &'static str {
        match self {
            Rejection::BadRequest(_) => "bad_request",
            Rejection::OriginNotAllowed => "origin",
            Rejection::Unauthorized(_) => "auth",
            Rejection::Draining => "draining",
            Rejection::AtCapacity => "capacity",
        }
    }
}

/// Why a client's token was not accepted. Peer: 401 Unauthorized, as
/// [`Rejection::Unauthorized`], with this text as the body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AuthError {
    /// `auth.required` and no token in the request.
    #[error("a token is required")]
    Missing,
    /// The token does not verify (signature, expiry, audience, issuer, claims).
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Which wait on an upstream ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Resolving, TCP connect and TLS handshake (`connect_timeout`).
    Connect,
    /// The request was sent; the response head did not come (`first_byte_timeout`).
    FirstByte,
    /// The body stopped arriving (`idle_timeout`).
    Idle,
}

impl Phase {
    pub const ALL: [Phase; 3] = [Phase::Connect, Phase::FirstByte, Phase::Idle];

    /// The `phase` label in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Connect => "connect",
            Phase::FirstByte => "first_byte",
            Phase::Idle => "idle",
        }
    }
}

/// A request to an upstream (agent gateway, reverse proxy) that failed. The `Display` text is
/// what the client is told (no upstream internals beyond its status). The agent sends it as
/// `{"type": "error", "code": …}` with [`code`](Self::code); a gateway answering HTTP uses
/// [`http_status`](Self::http_status).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UpstreamError {
    /// The agent has no upstream configured. Agent: `upstream_error`. HTTP: 503.
    #[error(
        "no agent upstream is configured (set [agent] upstreams, AGENT_UPSTREAM or \
         --agent-upstream)"
    )]
    NotConfigured,
    /// Every upstream is out of service (circuit open, ejected). Agent: `upstream_error`.
    /// HTTP: 503.
    #[error("every upstream is unavailable (circuit open)")]
    Unavailable,
    /// The TCP connection failed: name not resolved, refused, reset, unreachable. Nothing was
    /// sent, so another upstream may be tried. Agent: `upstream_error`. HTTP: 502.
    #[error("cannot reach the upstream: {0}")]
    Connect(String),
    /// The TLS handshake with the upstream failed (certificate, protocol, server name).
    /// Nothing was sent. Agent: `upstream_error`. HTTP: 502.
    #[error("cannot reach the upstream: TLS: {0}")]
    Tls(String),
    /// A wait ran out. Agent: `upstream_timeout`. HTTP: 504.
    #[error("{}", timeout_text(*.0))]
    Timeout(Phase),
    /// The upstream answered with an error status. Agent: `upstream_error` with the status.
    /// HTTP: 502 (a proxy that forwards the upstream's answer does not make this error).
    #[error("the upstream answered {0}")]
    Status(u16),
    /// The connection broke, or the answer was malformed or too large. Agent:
    /// `upstream_error`. HTTP: 502.
    #[error("upstream error: {0}")]
    Protocol(String),
}

fn timeout_text(phase: Phase) -> &'static str {
    match phase {
        Phase::Connect => "timed out connecting to the upstream",
        Phase::FirstByte => "the upstream did not answer in time",
        Phase::Idle => "the upstream stopped sending",
    }
}

impl UpstreamError {
    /// The agent protocol's error code (PROTOCOL.md).
    pub fn code(&self) -> Code {
        match self {
            UpstreamError::Timeout(_) => Code::UpstreamTimeout,
            _ => Code::UpstreamError,
        }
    }

    /// The status a gateway answers an HTTP client with.
    pub fn http_status(&self) -> StatusCode {
        match self {
            UpstreamError::NotConfigured | UpstreamError::Unavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            UpstreamError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        }
    }

    /// Whether nothing reached the upstream, so the request may go to another one.
    pub fn nothing_sent(&self) -> bool {
        matches!(
            self,
            UpstreamError::Connect(_)
                | UpstreamError::Tls(_)
                | UpstreamError::Timeout(Phase::Connect)
        )
    }

    pub fn is_timeout(&self) -> bool {
        matches!(self, UpstreamError::Timeout(_))
    }

    /// The upstream's status, for [`UpstreamError::Status`].
    pub fn status(&self) -> Option<u16> {
        match self {
            UpstreamError::Status(s) => Some(*s),
            _ => None,
        }
    }
}

/// Why no TLS server configuration could be built; names the file. Peer: nobody, the server
/// does not start (or a reload keeps the certificate in service).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    /// A certificate, key or CA file cannot be read or parsed.
    #[error("{path}: {reason}")]
    File { path: String, reason: String },
    /// The files are readable but do not make a configuration (key does not match, …).
    #[error("certificate and key do not fit together: {0}")]
    Config(String),
    /// The development certificate cannot be generated.
    #[error("cannot generate a certificate: {0}")]
    Generate(String),
}

/// A configuration problem, always naming where it came from. Peer: nobody, the server does
/// not start (`check-config` prints it).
#[derive(Debug, thiserror::Error, PartialEq)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("cannot read config file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("config file {path}: {reason}")]
    Parse { path: String, reason: String },
    #[error("environment variable {var}: {reason}")]
    Env { var: String, reason: String },
    #[error("config key `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// Failure injection for the tests of panic containment: panics at `point` when the process
/// was started with `RINGGATE_TEST_PANIC=<point>`. Compiled only into debug builds; a release
/// binary never reads the variable.
#[inline]
pub fn inject_panic(point: &str) {
    #[cfg(debug_assertions)]
    {
        static POINT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        let armed = POINT.get_or_init(|| std::env::var("RINGGATE_TEST_PANIC").ok());
        if armed.as_deref() == Some(point) {
            panic!("injected panic at {point}");
        }
    }
    #[cfg(not(debug_assertions))]
    let _ = point;
}

/// Why the server did not start. Peer: nobody, the process exits before listening (a
/// predecessor offering a handover keeps serving).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("TLS set-up failed: {0}")]
    Tls(#[from] TlsError),
    /// `--io uring` was asked for and io_uring cannot be used here.
    #[error("--io uring: io_uring is not usable here: {0}")]
    Uring(String),
    /// A system call failed: `what` says which step (bind, handover, thread).
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl StartError {
    /// A failed step, for `map_err`.
    pub fn io(what: impl fmt::Display) -> impl FnOnce(std::io::Error) -> StartError {
        let what = what.to_string();
        move |source| StartError::Io { what, source }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejections_map_to_statuses_headers_and_labels() {
        let cases = [
            (
                Rejection::BadRequest("missing Sec-WebSocket-Key"),
                400,
                "bad_request",
            ),
            (Rejection::OriginNotAllowed, 403, "origin"),
            (Rejection::Unauthorized(AuthError::Missing), 401, "auth"),
            (Rejection::Draining, 503, "draining"),
            (Rejection::AtCapacity, 503, "capacity"),
        ];
        for (r, status, label) in cases {
            assert_eq!(r.status().as_u16(), status, "{r:?}");
            assert_eq!(r.metric_reason(), label, "{r:?}");
        }
        let (name, value) = Rejection::BadRequest("x").header().unwrap();
        assert_eq!(
            (name.as_str(), value.to_str().unwrap()),
            ("sec-websocket-version", "13")
        );
        let (name, value) = Rejection::from(AuthError::Invalid("expired".into()))
            .header()
            .unwrap();
        assert_eq!(
            (name.as_str(), value.to_str().unwrap()),
            ("www-authenticate", "Bearer")
        );
        assert!(Rejection::OriginNotAllowed.header().is_none());
        assert!(Rejection::Draining.header().is_none());
        // The body is the reason, as the client reads it.
        assert_eq!(
            Rejection::BadRequest("missing Sec-WebSocket-Key").to_string(),
            "missing Sec-WebSocket-Key"
        );
        assert_eq!(
            Rejection::from(AuthError::Missing).to_string(),
            "a token is required"
        );
        assert_eq!(Rejection::AtCapacity.to_string(), "too many connections");
    }

    #[test]
    fn upstream_errors_map_to_agent_codes_and_gateway_statuses() {
        use UpstreamError as E;
        let cases = [
            (E::NotConfigured, Code::UpstreamError, 503),
            (E::Unavailable, Code::UpstreamError, 503),
            (E::Connect("refused".into()), Code::UpstreamError, 502),
            (E::Tls("bad certificate".into()), Code::UpstreamError, 502),
            (E::Timeout(Phase::Connect), Code::UpstreamTimeout, 504),
            (E::Timeout(Phase::FirstByte), Code::UpstreamTimeout, 504),
            (E::Timeout(Phase::Idle), Code::UpstreamTimeout, 504),
            (E::Status(500), Code::UpstreamError, 502),
            (E::Protocol("reset".into()), Code::UpstreamError, 502),
        ];
        for (e, code, status) in cases {
            assert_eq!(e.code(), code, "{e:?}");
            assert_eq!(e.http_status().as_u16(), status, "{e:?}");
        }
        assert_eq!(E::Status(503).status(), Some(503));
        assert_eq!(E::Protocol("x".into()).status(), None);
        assert!(E::Connect("x".into()).nothing_sent());
        assert!(E::Timeout(Phase::Connect).nothing_sent());
        assert!(!E::Timeout(Phase::FirstByte).nothing_sent());
        assert!(!E::Status(500).nothing_sent());
        assert_eq!(Phase::FirstByte.as_str(), "first_byte");
        // What the client reads: no upstream internals beyond the status.
        assert!(E::Unavailable.to_string().contains("circuit open"));
        assert!(E::Connect("refused".into())
            .to_string()
            .contains("cannot reach"));
        assert_eq!(E::Status(502).to_string(), "the upstream answered 502");
        assert_eq!(
            E::Timeout(Phase::Idle).to_string(),
            "the upstream stopped sending"
        );
    }

    #[test]
    fn start_errors_name_the_step() {
        let e = StartError::io("cannot listen on 127.0.0.1:1")(std::io::Error::from(
            std::io::ErrorKind::AddrInUse,
        ));
        assert!(
            e.to_string().starts_with("cannot listen on 127.0.0.1:1: "),
            "{e}"
        );
        let e = StartError::from(ConfigError::Invalid {
            key: "auth.jwt_algorithm",
            reason: "unknown".into(),
        });
        assert_eq!(e.to_string(), "config key `auth.jwt_algorithm`: unknown");
        let e = StartError::from(TlsError::Config("mismatch".into()));
        assert!(e.to_string().starts_with("TLS set-up failed: "), "{e}");
    }
}
