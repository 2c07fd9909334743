//! ringgate: a thread-per-core io_uring edge proxy for realtime traffic.
//!
//! Layers, bottom up; a module imports only from its own layer's foundations and the layers
//! below it (`tests/layers.rs` checks this):
//! 1. foundation: [`error`] (with the protocol error codes), [`metrics`], [`ratelimit`], [`payload`];
//! 2. protocol cores, plain types driven by bytes and time: [`ws`], [`auth`];
//! 3. I/O: [`io`] (backends, the stream type, TLS, listeners, handover); knows no endpoint;
//! 4. cluster: [`cluster`] (the rooms' Redis engine: what is stored in Redis, the connection);
//! 5. endpoints: [`rooms`], [`agent`], [`echo`], [`proxy`];
//! 6. the server: [`server`] (config assembly, shards, HTTP routing, lifecycle).
//!
//! See docs/ARCHITECTURE.md.

pub mod error;
pub mod json;
pub mod metrics;
pub mod payload;
pub mod ratelimit;

pub mod auth;
pub mod ws;

pub mod io;

pub mod cluster;

pub mod agent;
pub mod echo;
pub mod proxy;
pub mod rooms;

pub mod server;
