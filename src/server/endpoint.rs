//! The built-in WebSocket endpoints and the dispatch from an upgraded connection to the
//! endpoint's session handler.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;

use bytes::Bytes;

use super::shard::Shard;
use crate::agent::upstream::Gateway;
use crate::auth::Identity;
use crate::echo::Echo;
use crate::io::Stream;
use crate::rooms::conn::RoomsHandler;
use crate::ws::deflate::Params;
use crate::ws::handle::ConnHandle;
use crate::ws::session::{self, Summary};

/// The WebSocket endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/ws/echo`: every message back as it came.
    Echo,
    /// `/ws/agent`: the agent gateway (src/agent).
    Agent,
    /// `/ws`: rooms (docs/PROTOCOL.md).
    Rooms,
    /// A WebSocket relayed to a `[[route]]` upstream (src/proxy/relay.rs).
    Proxy,
}

impl Endpoint {
    /// Every endpoint, for per-endpoint tables.
    pub const ALL: [Endpoint; 4] = [
        Endpoint::Echo,
        Endpoint::Agent,
        Endpoint::Rooms,
        Endpoint::Proxy,
    ];

    /// The `endpoint` label in metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Echo => "echo",
            Endpoint::Agent => "agent",
            Endpoint::Rooms => "rooms",
            Endpoint::Proxy => "proxy",
        }
    }

    /// Whether `[auth]` applies to the endpoint.
    pub fn authenticated(self) -> bool {
        matches!(self, Endpoint::Rooms | Endpoint::Agent)
    }
}

/// Runs the session for `endpoint` on an upgraded connection; `deflate` holds the
/// permessage-deflate parameters when they were negotiated.
///
/// Each endpoint's session is a different type, so the future is boxed: one allocation per
/// connection. (An HTTP/1.1 connection's task holds its session inline instead, made by
/// [`echo`], [`agent`] or [`rooms`]: src/server/http.rs.)
pub fn serve<'a>(
    endpoint: Endpoint,
    io: Stream,
    early: Bytes,
    deflate: Option<Params>,
    shard: &'a Rc<Shard>,
    entry: &'a Rc<ConnHandle>,
    identity: Option<Identity>,
) -> Pin<Box<dyn Future<Output = Summary> + 'a>> {
    match endpoint {
        // A relayed WebSocket needs its upstream: server::http starts that session itself
        // with the relay handler; there is nothing to serve without one.
        Endpoint::Proxy => Box::pin(std::future::ready(Summary::default())),
        Endpoint::Echo => Box::pin(echo(io, early, deflate, identity, shard, entry)),
        Endpoint::Agent => Box::pin(agent(io, early, deflate, identity, shard, entry)),
        Endpoint::Rooms => Box::pin(rooms(io, early, deflate, identity, shard, entry)),
    }
}

/// The session of `/ws/echo` (the arguments of [`serve`], one function per endpoint so that a
/// caller can hold the session's future unboxed).
pub fn echo<'a>(
    io: Stream,
    early: Bytes,
    deflate: Option<Params>,
    _identity: Option<Identity>,
    shard: &'a Rc<Shard>,
    entry: &'a Rc<ConnHandle>,
) -> impl Future<Output = Summary> + 'a {
    let e = Endpoint::Echo;
    session::run(
        io,
        early,
        deflate,
        Echo,
        shard.settings(e),
        entry,
        shard.traffic(e),
    )
}

/// The session of `/ws/agent`.
pub fn agent<'a>(
    io: Stream,
    early: Bytes,
    deflate: Option<Params>,
    identity: Option<Identity>,
    shard: &'a Rc<Shard>,
    entry: &'a Rc<ConnHandle>,
) -> impl Future<Output = Summary> + 'a {
    let e = Endpoint::Agent;
    let agent = crate::agent::Agent::new(
        agent_gateway(shard),
        entry,
        identity.map(|i| i.user),
        shard.global.config.max_outbound_bytes,
    );
    session::run(
        io,
        early,
        deflate,
        agent,
        shard.settings(e),
        entry,
        shard.traffic(e),
    )
}

/// The session of `/ws` (rooms).
pub fn rooms<'a>(
    io: Stream,
    early: Bytes,
    deflate: Option<Params>,
    identity: Option<Identity>,
    shard: &'a Rc<Shard>,
    entry: &'a Rc<ConnHandle>,
) -> impl Future<Output = Summary> + 'a {
    let e = Endpoint::Rooms;
    let rooms = RoomsHandler::new(
        shard.hub.clone(),
        shard.id,
        shard.rooms_config.clone(),
        entry.clone(),
        identity,
    );
    session::run(
        io,
        early,
        deflate,
        rooms,
        shard.settings(e),
        entry,
        shard.traffic(e),
    )
}

/// The shard's agent gateway, made on first use.
fn agent_gateway(shard: &Shard) -> Rc<Gateway> {
    let g = &shard.global;
    let key = std::sync::Arc::as_ptr(g) as usize;
    crate::agent::gateway(key, &g.config.agent, g.backend, shard.id)
}
