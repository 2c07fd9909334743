//! The error codes of docs/PROTOCOL.md, shared by the rooms (`/ws`) and agent (`/ws/agent`)
//! endpoints: `{"type": "error", "error": "…", "code": "…"}`.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    /// Not JSON, not an object, or not a text frame.
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
    /// The upstream failed (connect error, error status, broken stream, open breaker).
    UpstreamError,
    /// The upstream did not answer in time.
    UpstreamTimeout,
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
            Code::UpstreamError => "upstream_error",
            Code::UpstreamTimeout => "upstream_timeout",
            Code::Internal => "internal",
        }
    }
}
