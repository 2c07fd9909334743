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
