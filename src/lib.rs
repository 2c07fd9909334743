//! ringgate: a thread-per-core io_uring edge proxy for realtime traffic.
//!
//! Layers, bottom up: [`runtime`] (shards, listeners, the io_uring/epoll backends), [`http`]
//! (hyper, routing, upgrades), [`ws`] (RFC 6455 frames, handshake, sessions). Protocol logic
//! lives in plain types (`ws::frame`, `ws::reader`, `ws::handshake`, `config`) with unit tests
//! and no sockets; the I/O modules stay thin.

pub mod agent;
pub mod auth;
pub mod codes;
pub mod config;
pub mod http;
pub mod hub;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod payload;
pub mod runtime;
pub mod tls;
pub mod ws;
