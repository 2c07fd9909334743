//! WebSocket: handshake, frames, messages, and the per-connection session.

pub mod close;
pub mod deflate;
pub mod frame;
pub mod handshake;
pub mod mailbox;
pub mod outbox;
pub mod reader;
pub mod session;

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use bytes::Bytes;
use tokio::io::AsyncRead;

use crate::auth::Identity;
use crate::runtime::shard::{ConnEntry, Shard};
use deflate::Params;
use session::{Close, Handler, Message, Sink, Summary};

/// The WebSocket endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/ws/echo`: every message back as it came.
    Echo,
    /// `/ws/agent`: the agent gateway (src/agent).
    Agent,
    /// `/ws`: rooms (PROTOCOL.md).
    Rooms,
}

impl Endpoint {
    /// Every endpoint, for per-endpoint tables.
    pub const ALL: [Endpoint; 3] = [Endpoint::Echo, Endpoint::Agent, Endpoint::Rooms];

    /// The `endpoint` label in metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Echo => "echo",
            Endpoint::Agent => "agent",
            Endpoint::Rooms => "rooms",
        }
    }

    /// Whether `[auth]` applies to the endpoint.
    pub fn authenticated(self) -> bool {
        matches!(self, Endpoint::Rooms | Endpoint::Agent)
    }

    /// Subprotocols the endpoint speaks.
    pub fn protocols(self) -> &'static [&'static str] {
        match self {
            Endpoint::Echo | Endpoint::Agent | Endpoint::Rooms => &[],
        }
    }
}

/// Runs the session for `endpoint` on an upgraded connection; `deflate` holds the
/// permessage-deflate parameters when they were negotiated.
///
/// Each endpoint's session is a different type, so the future is boxed: one allocation per
/// connection, and the connection's task stays small whichever endpoint it serves.
pub fn serve<'a, S: AsyncRead + outbox::WriteOutbox + 'a>(
    endpoint: Endpoint,
    io: S,
    early: Bytes,
    deflate: Option<Params>,
    shard: &'a Rc<Shard>,
    entry: &'a Rc<ConnEntry>,
    identity: Option<Identity>,
) -> Pin<Box<dyn Future<Output = Summary> + 'a>> {
    let traffic = shard.traffic(endpoint);
    let settings = &shard.settings;
    match endpoint {
        Endpoint::Echo => Box::pin(session::run(
            io, early, deflate, Echo, settings, entry, traffic,
        )),
        Endpoint::Agent => Box::pin(session::run(
            io,
            early,
            deflate,
            crate::agent::Agent::new(shard, entry, identity.map(|i| i.user)),
            settings,
            entry,
            traffic,
        )),
        Endpoint::Rooms => {
            let rooms = crate::hub::conn::Rooms::new(shard.clone(), entry.clone(), identity);
            Box::pin(session::run(
                io, early, deflate, rooms, settings, entry, traffic,
            ))
        }
    }
}

/// Sends every message back with the same opcode.
pub struct Echo;

impl Handler for Echo {
    fn on_message(&mut self, msg: Message<'_>, out: &mut Sink<'_>) -> Result<(), Close> {
        match msg {
            Message::Text(t) => out.text(t),
            Message::Binary(b) => out.binary(b),
        }
        Ok(())
    }
}
