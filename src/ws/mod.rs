//! WebSocket (RFC 6455): handshake, frames, permessage-deflate, the connection's protocol
//! logic without I/O ([`connection::Connection`]) and the session that drives it over any
//! stream. Knows no endpoint: an endpoint is a [`connection::Handler`].

pub mod close;
pub mod connection;
pub mod deflate;
pub mod frame;
pub mod handle;
pub mod handshake;
pub mod mailbox;
pub mod outbox;
pub mod reader;
pub mod session;
