//! WebSocket (RFC 6455): handshake, frames, permessage-deflate, and the per-connection session
//! that drives them over any stream. Knows no endpoint: an endpoint is a [`session::Handler`].

pub mod close;
pub mod deflate;
pub mod frame;
pub mod handle;
pub mod handshake;
pub mod mailbox;
pub mod outbox;
pub mod reader;
pub mod session;
