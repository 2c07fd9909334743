//! Errors that cross module boundaries.
//!
//! Each variant says what went wrong and where; the protocol answers a peer is given (close
//! codes, HTTP statuses, protocol error codes) are chosen by the layer that owns the peer, from
//! these kinds.

/// A configuration problem, always naming where it came from.
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
