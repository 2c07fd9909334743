//! HTTP/1.1 and HTTP/2 on every connection, and the hand-over to a WebSocket session on
//! upgrade.
//!
//! HTTP/1.1 is served by ringgate's own loop (src/server/http1.rs, on the codec of
//! `io::h1`). The router answers a valid upgrade with 101 and records what to run; once the
//! loop has written the 101 and returned, the socket and any bytes already read past the
//! request head go to the session, in a task of its own, which the handshake's task spawns
//! before it ends (`after_upgrade`).
//!
//! HTTP/2 (ALPN `h2`, or prior knowledge on an `h2c` listener) is served with the `h2` crate
//! (src/server/http2.rs), driven by this task; each request is a stream answered by the same
//! router. A WebSocket is an extended CONNECT (RFC 8441): the router accepts it, and once the
//! 200 is sent the stream's two halves become the session's `Stream` in a task of its own, so
//! many WebSockets share the connection, each with its own flow control.

use std::cell::Cell;
use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::Full;
use tokio::io::AsyncWriteExt;

use super::admission::{Permit, Refusal};
use super::api;
use super::endpoint::{self, Endpoint};
use super::fallback::{self, AnyBody};
use super::http2::{Answer, OnStream};
use crate::auth::{self, AuthError, Identity};
use crate::error::Rejection;
use crate::io::{RequestBody, Stream};
use crate::metrics;
use crate::server::config::Listen;
use crate::server::shard::{Control, Registration, Shard, WsSlot};
use crate::ws::deflate;
use crate::ws::handle::ConnHandle;
use crate::ws::handshake::{self, OriginPolicy};
use ::metrics::{counter, gauge};

pub type Body = Full<Bytes>;
/// What the server sends: whole bodies, or a proxied upstream's streamed through.
type ServedBody = crate::proxy::body::Body;
type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<ServedBody>, Infallible>>>>;
/// The same, or an event stream (`/sse`, src/server/fallback.rs).
pub(super) type AnyResponseFuture =
    Pin<Box<dyn Future<Output = Result<Response<AnyBody>, Infallible>>>>;

/// A proxied upgrade whose upstream answered 101: the upstream connection, the connection
/// slot, and the permessage-deflate parameters negotiated with the client (relayed mode).
type ProxiedUpgrade = (
    crate::proxy::tunnel::Upgraded,
    WsSlot,
    Option<deflate::Params>,
);

/// An accepted WebSocket handshake: what its session runs with, and its connection slot (held
/// until the session ends). Recorded by the router until its answer is written.
struct Upgrade {
    endpoint: Endpoint,
    deflate: Option<deflate::Params>,
    identity: Option<Identity>,
    _slot: WsSlot,
}

/// Serves one accepted connection until it closes: the TLS handshake when the listener is TLS
/// (bounded by `handshake_timeout`), then HTTP, then the WebSocket session on upgrade.
///
/// Everything before the upgrade (refusal, TLS handshake, h2c sniffing, HTTP/2, HTTP/1.1) runs
/// in a box that is freed when the HTTP/1.1 loop lets go; what runs after it is a task of its own
/// ([`after_upgrade`]), and this one ends. An idle WebSocket is then one task whose future
/// is its session, inline, beside the connection's registration.
pub fn serve(
    shard: Rc<Shard>,
    conn: Stream,
    remote: SocketAddr,
    listen: Listen,
) -> impl Future<Output = ()> {
    let http = Box::pin(serve_http(shard, conn, remote, listen));
    async move {
        if let Some((open, upgraded)) = http.await {
            after_upgrade(open, upgraded);
        }
    }
}

/// What an accepted connection holds for its whole life.
struct Open {
    shard: Rc<Shard>,
    reg: Registration,
    _permit: super::admission::Permit,
}

/// An HTTP/1.1 connection the HTTP/1.1 loop has let go of: the socket, the bytes read past the request
/// head, and what the router decided to run on it.
struct Upgraded {
    io: Stream,
    read_buf: Bytes,
    proxied: Option<ProxiedUpgrade>,
    upgrade: Option<Upgrade>,
}

/// [`serve`] up to the end of HTTP/1.1: `None` when the connection is done (refused, failed,
/// served over HTTP/2 or closed), else the upgraded connection (boxed: the task keeps a
/// pointer to it only until [`after_upgrade`] has taken it apart).
async fn serve_http(
    shard: Rc<Shard>,
    conn: Stream,
    remote: SocketAddr,
    listen: Listen,
) -> Option<(Open, Box<Upgraded>)> {
    let admission = &shard.global.admission;
    let _permit = match admission.admit(remote.ip(), std::time::Instant::now()) {
        Ok(p) => p,
        Err(refusal) => {
            turn_away(conn, refusal, listen.tls).await;
            return None;
        }
    };
    let reg = shard.register(remote);
    let acceptor = match &*shard.tls.borrow() {
        Some(a) if listen.tls => Some(a.get(listen.http2).clone()),
        _ => None,
    };
    let conn = match acceptor {
        None => conn,
        Some(acceptor) => {
            let timeout = shard.global.config.handshake_timeout();
            let handshake = tokio::time::timeout(timeout, conn.accept_tls(&acceptor));
            let (stream, result) = match handshake.await {
                Ok(Ok(tls)) => (Some(tls), "ok"),
                Ok(Err(e)) => {
                    tracing::debug!(%remote, error = %e, "TLS handshake failed");
                    (None, "error")
                }
                Err(_) => {
                    tracing::debug!(%remote, "TLS handshake timed out");
                    (None, "timeout")
                }
            };
            counter!(metrics::TLS_HANDSHAKES, "result" => result).increment(1);
            stream?
        }
    };
    let upgrade = Rc::new(Cell::new(None));
    let tunnel = Rc::new(Cell::new(None));
    let served = Rc::new(Cell::new(false));
    let sni = conn.server_name().map(str::to_owned);
    let router = Router {
        shard: shard.clone(),
        upgrade: upgrade.clone(),
        admin: listen.admin,
        remote,
        private: listen.admin
            || (!shard.global.has_admin_listener && listen.addr.ip().is_loopback()),
        served: served.clone(),
        tunnel: tunnel.clone(),
        client: crate::proxy::Client {
            remote,
            tls: listen.tls,
            sni,
        },
    };
    let (conn, h2) = if conn.alpn_protocol() == Some(b"h2") {
        (conn, true)
    } else if !listen.tls && listen.h2c {
        let timeout = shard.global.config.handshake_timeout();
        match tokio::time::timeout(timeout, super::h2c::sniff(conn)).await {
            Ok(Ok(sniffed)) => sniffed,
            _ => return None,
        }
    } else {
        (conn, false)
    };
    if h2 {
        serve_h2(conn, router, &reg).await;
        return None;
    }
    let timeout = shard.global.config.handshake_timeout();
    // Only the socket and the bytes read past the request head go on; the loop's state, the
    // router and this future's box are freed when it returns.
    let (io, read_buf) = super::http1::serve(conn, &router, &reg.entry, timeout).await?;
    let open = Open {
        shard,
        reg,
        _permit,
    };
    let upgraded = Box::new(Upgraded {
        io,
        read_buf,
        proxied: tunnel.take(),
        upgrade: upgrade.take(),
    });
    Some((open, upgraded))
}

/// What runs on an HTTP/1.1 connection once the HTTP/1.1 loop has let go of it, spawned as the
/// connection's task from here on (holding its registration and admission permit): the
/// WebSocket session, a proxied session, or the socket's shutdown.
///
/// An endpoint's session is the task's future itself, not a box the task points to: one
/// allocation per idle connection instead of three (the task, its future's box, the session's
/// box), each rounded up by the allocator, and tokio's task cell, which is aligned to 128 B,
/// filled by the session rather than by a few pointers.
fn after_upgrade(open: Open, upgraded: Box<Upgraded>) {
    let Upgraded {
        io,
        read_buf,
        proxied,
        upgrade,
    } = *upgraded;
    match (proxied, upgrade) {
        (Some(p), _) => spawn_boxed(open, Box::new((io, read_buf, p)), |shard, entry, p| {
            let (io, read_buf, p) = p;
            proxied_session(shard, entry, io, read_buf, p)
        }),
        (None, Some(ws)) => {
            let start = Box::new(Start { io, read_buf, ws });
            match start.ws.endpoint {
                Endpoint::Echo => spawn_websocket(open, start, endpoint::echo),
                Endpoint::Agent => spawn_websocket(open, start, endpoint::agent),
                Endpoint::Rooms => spawn_websocket(open, start, endpoint::rooms),
                // A proxied upgrade without its upstream: nothing to serve (as over HTTP/2).
                Endpoint::Proxy => spawn_boxed(open, start, |shard, entry, start| {
                    let Start { io, read_buf, ws } = start;
                    Box::pin(websocket(shard, entry, io, read_buf, ws, None))
                }),
            }
        }
        (None, None) => spawn_boxed(open, Box::new(io), |_, _, mut io| {
            Box::pin(async move {
                let _ = io.shutdown().await;
            })
        }),
    }
}

/// What runs on a connection after its upgrade, boxed.
type Running<'a> = Pin<Box<dyn Future<Output = ()> + 'a>>;

/// Spawns the connection's task for the boxed future `run` makes of `what` (a relay, a
/// tunnel, a shutdown). `what` stays boxed until then, so the task keeps a pointer to it, not
/// its fields, beside the future they become.
fn spawn_boxed<P: 'static>(
    open: Open,
    what: Box<P>,
    run: for<'a> fn(&'a Rc<Shard>, &'a Rc<ConnHandle>, P) -> Running<'a>,
) {
    tokio::task::spawn_local(async move {
        let open = open; // all of it, the permit too (see `spawn_websocket`)
                         // `what` is moved into a local first: a box moved out of is freed when the variable
                         // holding it goes out of scope, which for the task's capture is the task's end.
        let what = *{ what };
        let running = run(&open.shard, &open.reg.entry, what);
        running.await
    });
}

/// An accepted WebSocket on an upgraded HTTP/1.1 connection, until its task makes the
/// session: boxed, so that the task's future keeps a pointer to it and not its fields beside
/// the session they become.
struct Start {
    io: Stream,
    read_buf: Bytes,
    ws: Upgrade,
}

/// Spawns the task of a WebSocket on an upgraded HTTP/1.1 connection, the session `make`
/// returns (one of `endpoint`'s functions) inline in it.
fn spawn_websocket<M>(open: Open, start: Box<Start>, make: M)
where
    M: for<'a> AsyncFnOnce(
            Stream,
            Bytes,
            Option<deflate::Params>,
            Option<Identity>,
            &'a Rc<Shard>,
            &'a Rc<ConnHandle>,
        ) -> crate::ws::session::Summary
        + 'static,
{
    tokio::task::spawn_local(async move {
        // The whole of `open`, permit included: a field the task does not name would be left
        // out of its captures (and dropped here).
        let open = open;
        let entry = &open.reg.entry;
        // The session's arguments are taken out of their box in this block, so they are not
        // kept in the task beside the session.
        let (endpoint, slot, session) = {
            // (`*{ start }`: the box is freed here, not kept with the task's captures.)
            let Start { io, read_buf, ws } = *{ start };
            let Upgrade {
                endpoint,
                deflate,
                identity,
                _slot,
            } = ws;
            websocket_opened(entry, endpoint, identity.as_ref());
            let session = make(io, read_buf, deflate, identity, &open.shard, entry);
            (endpoint, _slot, session)
        };
        let summary = session.await;
        drop(slot);
        websocket_closed(entry, endpoint, summary);
    });
}

/// Runs a proxied upgrade whose upstream answered 101 on the client's `io` (an upgraded
/// HTTP/1.1 connection or an HTTP/2 stream): relayed through a session of ours, or tunnelled.
/// A plain function returning one boxed future per mode, so a relay's task does not carry a
/// tunnel's state (about 1.2 KB) nor a tunnel a relay's.
fn proxied_session<'a>(
    shard: &'a Rc<Shard>,
    entry: &'a Rc<ConnHandle>,
    io: Stream,
    read_buf: Bytes,
    (upstream, slot, deflate): ProxiedUpgrade,
) -> Pin<Box<dyn Future<Output = ()> + 'a>> {
    if upstream.relay {
        let s = shard.settings(Endpoint::Proxy);
        let relay = upstream.into_relay(s.max_message, s.close_timeout);
        let ws = Upgrade {
            endpoint: Endpoint::Proxy,
            deflate,
            identity: None,
            _slot: slot,
        };
        return Box::pin(websocket(shard, entry, io, read_buf, ws, Some(relay)));
    }
    // A drain ends the tunnel (its bytes are not ours to frame a close into).
    let stop = poll_fn(|cx| {
        entry.register_waker(cx.waker());
        if entry.close_requested() {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    });
    Box::pin(async move {
        crate::proxy::tunnel::run(io, read_buf, upstream, stop).await;
        drop(slot);
    })
}

/// Runs a WebSocket session on `io` (an upgraded HTTP/1.1 connection or an HTTP/2 stream) to
/// its end: metrics, statistics and the access log around the endpoint's session.
///
/// A plain function returning the future, like `session::run`: the future an idle connection's
/// task holds is the boxed session and a few references, not the arguments it was made from.
fn websocket<'a>(
    shard: &'a Rc<Shard>,
    entry: &'a Rc<ConnHandle>,
    io: Stream,
    read_buf: Bytes,
    ws: Upgrade,
    relay: Option<(
        crate::proxy::relay::Relay,
        crate::proxy::relay::UpstreamSide,
    )>,
) -> impl Future<Output = ()> + 'a {
    let Upgrade {
        endpoint,
        deflate,
        identity,
        _slot: slot,
    } = ws;
    websocket_opened(entry, endpoint, identity.as_ref());
    let session: Pin<Box<dyn Future<Output = crate::ws::session::Summary> + 'a>> = match relay {
        // A relayed WebSocket: our session on the client side (src/proxy/relay.rs).
        Some((relay, upstream)) => {
            let session = crate::ws::session::run(
                io,
                read_buf,
                deflate,
                relay,
                shard.settings(endpoint),
                entry,
                shard.traffic(endpoint),
            );
            Box::pin(upstream.beside(session))
        }
        None => endpoint::serve(endpoint, io, read_buf, deflate, shard, entry, identity),
    };
    async move {
        let _slot = slot;
        let summary = session.await;
        websocket_closed(entry, endpoint, summary);
    }
}

/// A WebSocket's start: its endpoint and token expiry on its handle, and the metrics.
fn websocket_opened(entry: &ConnHandle, endpoint: Endpoint, identity: Option<&Identity>) {
    let name = endpoint.name();
    entry.set_endpoint(name);
    if let Some(exp) = identity.and_then(|i| i.expires) {
        entry.set_expiry(exp);
    }
    counter!(metrics::CONNECTIONS_OPENED, "endpoint" => name).increment(1);
    gauge!(metrics::CONNECTIONS_ACTIVE, "endpoint" => name).increment(1.0);
}

/// A WebSocket's end: the metrics and the access log.
fn websocket_closed(entry: &ConnHandle, endpoint: Endpoint, summary: crate::ws::session::Summary) {
    let name = endpoint.name();
    gauge!(metrics::CONNECTIONS_ACTIVE, "endpoint" => name).decrement(1.0);
    let code = summary.close_code.map_or("none".into(), |c| c.to_string());
    // The access log: one line per closed WebSocket (target `access`, filterable with
    // RUST_LOG=access=off).
    let duration = entry.connected_at.elapsed().unwrap_or_default();
    tracing::info!(
        target: "access",
        remote = %entry.remote,
        endpoint = name,
        duration_ms = duration.as_millis() as u64,
        bytes_in = summary.bytes_in,
        bytes_out = summary.bytes_out,
        messages_in = summary.messages_in,
        messages_out = summary.messages_out,
        close_code = %code,
        "websocket closed"
    );
    counter!(metrics::CONNECTIONS_CLOSED, "endpoint" => name, "code" => code).increment(1);
}

/// Serves an HTTP/2 connection until it ends (src/server/http2.rs): each request is answered
/// by the router, a WebSocket (RFC 8441) runs as its stream's own task.
async fn serve_h2(conn: Stream, router: Router, reg: &Registration) {
    counter!(metrics::HTTP2_CONNECTIONS).increment(1);
    let shard = router.shard.clone();
    let config = &shard.global.config;
    let remote = router.remote;
    let handler: super::http2::Handler = Rc::new(move |req| {
        let accepted = Rc::new(Cell::new(None));
        let response = router.handle(req, Some(&accepted));
        Box::pin(async move {
            let Ok(response) = response.await;
            Answer {
                response,
                websocket: accepted.take(),
            }
        })
    });
    let first_request = config.handshake_timeout();
    super::http2::serve(
        conn,
        &config.http2,
        first_request,
        &reg.entry,
        remote,
        handler,
    )
    .await;
}

/// What an HTTP/2 stream becomes once the 200 to its extended CONNECT is sent.
enum H2Session {
    /// A WebSocket of one of ringgate's endpoints.
    Endpoint(Upgrade),
    /// A WebSocket through a route, whose upstream answered 101.
    Proxied(ProxiedUpgrade),
}

impl H2Session {
    /// The session on the handed-over stream, as `after_upgrade` runs an HTTP/1.1 one. (A
    /// plain function: its box is freed on return, and no local of it lives in the socket's
    /// task.)
    fn run<'a>(
        self: Box<Self>,
        shard: &'a Rc<Shard>,
        entry: &'a Rc<ConnHandle>,
        io: Stream,
    ) -> Pin<Box<dyn Future<Output = ()> + 'a>> {
        match *self {
            H2Session::Endpoint(up) => {
                Box::pin(websocket(shard, entry, io, Bytes::new(), up, None))
            }
            H2Session::Proxied(p) => proxied_session(shard, entry, io, Bytes::new(), p),
        }
    }
}

/// An accepted WebSocket over HTTP/2, to run once its 200 is sent: spawns the task that runs
/// the session on the stream as its own connection, holding its `[limits]` place.
fn h2_websocket(
    shard: Rc<Shard>,
    remote: SocketAddr,
    permit: Permit,
    session: Box<H2Session>,
) -> OnStream {
    counter!(metrics::HTTP2_WEBSOCKETS).increment(1);
    Box::new(move |io| {
        tokio::task::spawn_local(h2_websocket_task(shard, remote, permit, io, session));
    })
}

/// The task of a WebSocket over HTTP/2.
///
/// A plain function returning the task: an idle socket holds it for its whole life, so it
/// holds a few references only. The session comes boxed and runs as the one boxed future
/// `after_upgrade` makes (the handshake's results, a relay's or a tunnel's state are not part
/// of the task): 1.7 KB of heap per idle socket in a debug build, against 2.9 KB with the
/// session inline, and 1.9 KB with the unboxing done in the task (a debug build's task keeps
/// every local it had).
fn h2_websocket_task(
    shard: Rc<Shard>,
    remote: SocketAddr,
    permit: Permit,
    io: Stream,
    session: Box<H2Session>,
) -> impl Future<Output = ()> {
    let reg = shard.register(remote);
    reg.entry.set_http2();
    async move {
        let _permit = permit;
        session.run(&shard, &reg.entry, io).await
    }
}

#[derive(Clone)]
pub(super) struct Router {
    shard: Rc<Shard>,
    upgrade: Rc<Cell<Option<Upgrade>>>,
    /// Serving an admin listener: the admin surface and health only.
    admin: bool,
    /// The client's address, for the per-address handshake rate.
    remote: SocketAddr,
    /// Serving the admin surface (`/metrics`, `/ws/statistics`, `/api/*` without a key): an
    /// admin listener, or a loopback listener when there is no admin listener.
    private: bool,
    /// A request has been received on this connection.
    served: Rc<Cell<bool>>,
    /// A proxied upgrade whose upstream answered 101.
    tunnel: Rc<Cell<Option<ProxiedUpgrade>>>,
    client: crate::proxy::Client,
}

/// Where an accepted WebSocket over HTTP/2 goes until its 200 is sent: each stream's own.
type H2Accepted = Cell<Option<OnStream>>;

impl Router {
    /// A request has been received on this connection.
    pub(super) fn served(&self) -> bool {
        self.served.get()
    }

    pub(super) fn remote(&self) -> SocketAddr {
        self.remote
    }

    /// Answers a request of either version; `h2` is where an HTTP/2 stream's accepted
    /// WebSocket goes.
    pub(super) fn handle(
        &self,
        mut req: Request<RequestBody>,
        h2: Option<&Rc<H2Accepted>>,
    ) -> AnyResponseFuture {
        self.served.set(true);
        // HTTP/2 carries the host in `:authority`; routes, forwarding headers and
        // `preserve_host` read `Host`, as they do for HTTP/1.1.
        if req.version() == Version::HTTP_2 && !req.headers().contains_key(header::HOST) {
            if let Some(host) = req.uri().authority().and_then(|a| a.as_str().parse().ok()) {
                req.headers_mut().insert(header::HOST, host);
            }
        }
        if !self.admin {
            let proxy = self.shard.proxy.borrow().clone();
            if let Some(route) = proxy.find(&req, self.client.sni.as_deref()) {
                let answer = self.proxy(route, req, h2);
                return Box::pin(async move { answer.await.map(|r| r.map(AnyBody::Served)) });
            }
        }
        // A 2xx to a CONNECT opens a tunnel (the connection is handed over): only the WebSocket
        // endpoints take one.
        if req.method() == Method::CONNECT
            && !matches!(req.uri().path(), "/ws" | "/ws/agent" | "/ws/echo")
        {
            counter!(metrics::HTTP_REQUESTS, "status" => "405").increment(1);
            let resp = text(
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT opens WebSockets only\n",
            );
            return Box::pin(std::future::ready(Ok(
                resp.map(|b| AnyBody::Served(b.into()))
            )));
        }
        // `/sse`, `/poll`, `/publish`, `/presence`, `/history` (src/server/fallback.rs): rooms
        // without a WebSocket; a `[[route]]` on the same path wins.
        let rooms = self.shard.global.config.rooms.enabled;
        if !self.admin && rooms && fallback::handles(req.uri().path()) {
            let (shard, remote) = (self.shard.clone(), self.remote);
            return Box::pin(async move {
                let resp = fallback::serve(shard, remote, req).await;
                counter!(metrics::HTTP_REQUESTS, "status" => resp.status().as_str().to_string())
                    .increment(1);
                Ok(resp)
            });
        }
        let answer = self.call_full(req, h2);
        Box::pin(async move { answer.await.map(|r| r.map(AnyBody::Served)) })
    }
}

impl Router {
    fn call_full(&self, req: Request<RequestBody>, h2: Option<&Rc<H2Accepted>>) -> ResponseFuture {
        if req.method() == Method::GET && req.uri().path() == "/ws/statistics" && self.private {
            return Box::pin(statistics(self.shard.global.clone()));
        }
        let config = &self.shard.global.config;
        // `/api/*` is protected by its key; without one, only the admin surface serves it.
        if req.uri().path().starts_with("/api/")
            && config.rooms.enabled
            && (self.private || config.rooms.api_key.is_some())
        {
            let shard = self.shard.clone();
            return Box::pin(async move {
                let resp = api::serve(shard, req).await;
                counter!(metrics::HTTP_REQUESTS, "status" => resp.status().as_str().to_string())
                    .increment(1);
                Ok(resp.map(Into::into))
            });
        }
        // RFC 8441: the stream becomes the WebSocket once its 200 is sent. Each such
        // WebSocket counts as a connection under `[limits]`, as it would on its own socket.
        let admitted = h2.filter(|_| is_extended_connect(&req)).map(|accepted| {
            let admission = &self.shard.global.admission;
            let permit = admission.admit(self.remote.ip(), std::time::Instant::now());
            (permit, accepted)
        });
        let (resp, h2_stream) = match admitted {
            Some((Err(refusal), _)) => (refused(refusal), None),
            Some((Ok(permit), accepted)) => (self.route_any(&req), Some((permit, accepted))),
            None => (self.route_any(&req), None),
        };
        // (Taken at once: the streams of an HTTP/2 connection share the router.)
        let websocket = h2_stream.and_then(|s| Some((s, self.upgrade.take()?)));
        match websocket {
            Some(((permit, accepted), up)) => {
                let session = Box::new(H2Session::Endpoint(up));
                let (shard, remote) = (self.shard.clone(), self.remote);
                accepted.set(Some(h2_websocket(shard, remote, permit, session)));
            }
            None if resp.status() != StatusCode::SWITCHING_PROTOCOLS => {
                counter!(metrics::HTTP_REQUESTS, "status" => resp.status().as_str().to_string())
                    .increment(1);
            }
            None => {}
        }
        Box::pin(std::future::ready(Ok(resp.map(Into::into))))
    }
}

impl Router {
    /// A request a `[[route]]` takes: forwarded; a WebSocket (an HTTP/1.1 upgrade or an
    /// HTTP/2 extended CONNECT) relayed through a session of ours (`mode = "websocket"`, the
    /// default) or tunnelled (`mode = "tunnel"`).
    fn proxy(
        &self,
        route: Rc<crate::proxy::RouteState>,
        req: Request<RequestBody>,
        h2_accepted: Option<&Rc<H2Accepted>>,
    ) -> ResponseFuture {
        use crate::proxy::{http::error_response, tunnel, Failure};
        let client = self.client.clone();
        let h2 = h2_accepted.is_some() && is_extended_connect(&req);
        if !h2 && !tunnel::is_websocket_upgrade(&req) {
            return Box::pin(
                async move { Ok(crate::proxy::http::forward(route, req, client).await) },
            );
        }
        let global = self.shard.global.clone();
        if global.is_draining() {
            counter!(metrics::HANDSHAKES_FAILED, "reason" => "draining").increment(1);
            return Box::pin(std::future::ready(Ok(error_response(&Failure::Draining))));
        }
        // `[limits]`: the per-address handshake rate applies to proxied upgrades too, and a
        // WebSocket over HTTP/2 counts as a connection.
        let now = std::time::Instant::now();
        let admitted = global
            .admission
            .handshake(self.remote.ip(), now)
            .and_then(|()| {
                h2.then(|| global.admission.admit(self.remote.ip(), now))
                    .transpose()
            });
        let permit = match admitted {
            Ok(permit) => permit,
            Err(r) => return Box::pin(std::future::ready(Ok(refused(r).map(Into::into)))),
        };
        let Some(slot) = global.try_admit_ws() else {
            counter!(metrics::HANDSHAKES_FAILED, "reason" => "capacity").increment(1);
            let resp = text(StatusCode::SERVICE_UNAVAILABLE, "too many connections\n");
            return Box::pin(std::future::ready(Ok(resp.map(Into::into))));
        };
        let relayed = route.cfg.mode != Some(crate::proxy::config::Mode::Tunnel);
        // The client's handshake is checked here when our session answers it, and always over
        // HTTP/2 (the upstream sees an upgrade of ours, not the client's CONNECT). The origin
        // is the upstream's to judge.
        let any_origin = OriginPolicy::new(&[]);
        let (m, hd) = (req.method(), req.headers());
        let checked = if h2 {
            let protocol = req.extensions().get::<h2::ext::Protocol>();
            handshake::accept_h2(m, protocol.map(|p| p.as_str()), hd, &any_origin, &[])
                .map(|_| None)
        } else if relayed {
            handshake::accept(m, req.version(), hd, &any_origin, &[]).map(|a| Some(a.accept_key))
        } else {
            Ok(None)
        };
        let accept_key = match checked {
            Ok(k) => k,
            Err(r) => return Box::pin(std::future::ready(Ok(refuse(r).map(Into::into)))),
        };
        let (relay, deflate) = if relayed {
            let deflate = self.negotiate_deflate(&req, Endpoint::Proxy);
            let relay = tunnel::RelayHandshake {
                accept_key,
                extensions: deflate.as_ref().map(|p| p.response()),
            };
            (Some(relay), deflate)
        } else {
            (None, None)
        };
        // Over HTTP/2 the stream becomes the session's once the 200 is sent.
        let h2_stream = permit.zip(h2_accepted.cloned());
        let (cell, shard, remote) = (self.tunnel.clone(), self.shard.clone(), self.remote);
        let (parts, _body) = req.into_parts();
        Box::pin(async move {
            let (resp, upgraded) = tunnel::handshake(route, parts, client, relay).await;
            match (upgraded, h2_stream) {
                (Some(u), Some((permit, accepted))) => {
                    let session = Box::new(H2Session::Proxied((u, slot, deflate)));
                    accepted.set(Some(h2_websocket(shard, remote, permit, session)));
                }
                (Some(u), None) => cell.set(Some((u, slot, deflate))),
                (None, _) => {}
            }
            Ok(resp)
        })
    }
}

impl Router {
    /// The answer of the admin surface or the public routes, by listener.
    fn route_any(&self, req: &Request<RequestBody>) -> Response<Body> {
        if self.admin {
            self.route_admin(req)
        } else {
            self.route(req)
        }
    }

    fn route(&self, req: &Request<RequestBody>) -> Response<Body> {
        let global = &self.shard.global;
        match (req.method(), req.uri().path()) {
            (_, "/ws/echo") if global.config.echo => self.upgrade(req, Endpoint::Echo),
            (_, "/ws/agent") => self.upgrade(req, Endpoint::Agent),
            (_, "/ws") if global.config.rooms.enabled => self.upgrade(req, Endpoint::Rooms),
            (&Method::GET | &Method::HEAD, "/healthz")
            | (&Method::GET | &Method::HEAD, "/readyz") => self.health(req),
            (&Method::GET, "/metrics") if self.private => self.metrics(),
            (m, p) if p.starts_with("/static/") && global.config.static_files => {
                super::static_files::serve(m, p, req.headers())
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    fn route_admin(&self, req: &Request<RequestBody>) -> Response<Body> {
        match (req.method(), req.uri().path()) {
            (&Method::GET | &Method::HEAD, "/healthz" | "/readyz") => self.health(req),
            (&Method::GET, "/metrics") => self.metrics(),
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }

    fn health(&self, req: &Request<RequestBody>) -> Response<Body> {
        let global = &self.shard.global;
        if req.uri().path() == "/readyz" && global.failed.load(std::sync::atomic::Ordering::Acquire)
        {
            text(StatusCode::SERVICE_UNAVAILABLE, "a shard failed\n")
        } else if req.uri().path() == "/readyz" && global.is_draining() {
            text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
        } else if req.uri().path() == "/readyz"
            && global.config.cluster.ready_requires_redis
            && global.redis_down.load(std::sync::atomic::Ordering::Acquire) > 0
        {
            text(StatusCode::SERVICE_UNAVAILABLE, "redis unavailable\n")
        } else if req.uri().path() == "/readyz" {
            text(StatusCode::OK, "ready\n")
        } else {
            text(StatusCode::OK, "ok\n")
        }
    }

    fn metrics(&self) -> Response<Body> {
        match &self.shard.global.metrics {
            Some(h) => {
                metrics::record_heap();
                let mut resp = Response::new(Full::new(Bytes::from(h.render())));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                resp
            }
            None => text(StatusCode::NOT_FOUND, "metrics are not enabled\n"),
        }
    }

    fn upgrade(&self, req: &Request<RequestBody>, endpoint: Endpoint) -> Response<Body> {
        let global = &self.shard.global;
        let origins = OriginPolicy::new(&global.config.allowed_origins);
        let h2 = req.version() == Version::HTTP_2;
        // The built-in endpoints speak no subprotocol (a `bearer.` token is not one).
        let accepted = if h2 {
            let protocol = req.extensions().get::<h2::ext::Protocol>();
            handshake::accept_h2(
                req.method(),
                protocol.map(|p| p.as_str()),
                req.headers(),
                &origins,
                &[],
            )
            .map(|protocol| (None, protocol))
        } else {
            handshake::accept(req.method(), req.version(), req.headers(), &origins, &[])
                .map(|a| (Some(a.accept_key), a.protocol))
        };
        let (accept_key, protocol) = match accepted {
            Ok(a) => a,
            Err(r) => return refuse(r),
        };
        let now = std::time::Instant::now();
        if let Err(refusal) = global.admission.handshake(self.remote.ip(), now) {
            return refused(refusal);
        }
        let (identity, token_protocol) = match self.authenticate(req, endpoint) {
            Ok(found) => found,
            Err(e) => return refuse(e.into()),
        };
        if global.is_draining() {
            return refuse(Rejection::Draining);
        }
        let Some(slot) = global.try_admit_ws() else {
            return refuse(Rejection::AtCapacity);
        };
        let mut resp = Response::new(Body::default());
        let h = resp.headers_mut();
        // HTTP/2 (RFC 8441 §5): 200, and no Upgrade, Connection or key to answer.
        if let Some(key) = accept_key {
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            if let Ok(v) = HeaderValue::from_str(&key) {
                h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
            }
            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        }
        let h = resp.headers_mut();
        // A token sent as the `bearer.<token>` subprotocol is echoed: browsers fail the
        // connection when none of the subprotocols they offered comes back.
        let protocol = protocol.or(token_protocol);
        if let Some(p) = protocol.and_then(|p| HeaderValue::from_str(&p).ok()) {
            h.insert(header::SEC_WEBSOCKET_PROTOCOL, p);
        }
        let deflate = self.negotiate_deflate(req, endpoint);
        if let Some(p) = &deflate {
            if let Ok(v) = HeaderValue::from_str(&p.response()) {
                h.insert(header::SEC_WEBSOCKET_EXTENSIONS, v);
            }
        }
        self.upgrade.set(Some(Upgrade {
            endpoint,
            deflate,
            identity,
            _slot: slot,
        }));
        resp
    }
}

impl Router {
    /// The client's identity when `[auth]` applies, and the subprotocol that carried its token.
    fn authenticate(
        &self,
        req: &Request<RequestBody>,
        endpoint: Endpoint,
    ) -> Result<(Option<Identity>, Option<String>), AuthError> {
        let Some(verifier) = self.shard.global.auth.as_ref() else {
            return Ok((None, None));
        };
        if !endpoint.authenticated() {
            return Ok((None, None));
        }
        let found = auth::find_token(req.uri(), req.headers(), verifier.query_token);
        let identity = verifier.identify(found.as_ref())?;
        Ok((Some(identity), found.and_then(|f| f.protocol)))
    }

    /// permessage-deflate parameters for this upgrade, when enabled and offered.
    fn negotiate_deflate(
        &self,
        req: &Request<RequestBody>,
        endpoint: Endpoint,
    ) -> Option<deflate::Params> {
        let config = &self.shard.global.config;
        let c = &config.compression;
        if !c.enabled {
            return None;
        }
        // Rooms broadcast: without context takeover a room message is compressed once for
        // every subscriber instead of once per subscriber (bench/COMPRESS_ONCE.md).
        let compress_once = endpoint == Endpoint::Rooms && config.rooms.compress_once;
        let policy = deflate::Policy {
            server_max_window_bits: c.server_max_window_bits,
            server_no_context_takeover: c.broadcast_friendly || compress_once,
            client_no_context_takeover: c.client_no_context_takeover,
        };
        let offers = req
            .headers()
            .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
            .iter()
            .filter_map(|v| v.to_str().ok());
        deflate::negotiate(offers, &policy)
    }
}

/// An HTTP/2 extended CONNECT (RFC 8441): a WebSocket asked for over an HTTP/2 stream.
fn is_extended_connect<B>(req: &Request<B>) -> bool {
    req.method() == Method::CONNECT && req.extensions().get::<h2::ext::Protocol>().is_some()
}

/// Answers a connection that was not admitted, as cheaply as possible: plain HTTP gets a fixed
/// response (no request parsing) with `Retry-After`; a TLS connection is closed, since an
/// answer would cost a handshake.
async fn turn_away(mut conn: Stream, refusal: Refusal, tls: bool) {
    counter!(metrics::CONNECTIONS_REFUSED, "reason" => refusal.reason()).increment(1);
    if tls {
        return;
    }
    let status = refusal.status();
    let body = refusal_text(refusal);
    let resp = format!(
        "HTTP/1.1 {} {}\r\nRetry-After: {}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        refusal.retry_after(),
        body.len()
    );
    // Bounded: a client that does not read must not hold the task.
    let write = async {
        conn.write_all(resp.as_bytes()).await?;
        conn.shutdown().await
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), write).await;
}

/// `GET /ws/statistics`: every shard reports its connections by message; the answer is their
/// sum (docs/PROTOCOL.md). Each shard lists at most `STATS_LIST_LIMIT` connections.
async fn statistics(
    global: std::sync::Arc<crate::server::shard::ServerState>,
) -> Result<Response<ServedBody>, Infallible> {
    let mut replies = Vec::new();
    for shard in global.shards.get().into_iter().flatten() {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if shard.send(Control::Stats(tx)).is_ok() {
            replies.push(rx);
        }
    }
    let (mut active, mut messages, mut truncated) = (0, 0, false);
    let mut connections = Vec::new();
    let mut routes = Vec::new();
    for rx in replies {
        // A shard that is gone (draining) simply does not count.
        if let Ok(s) = rx.await {
            active += s.active;
            messages += s.messages;
            truncated |= s.truncated;
            connections.extend(s.connections);
            routes.push(s.routes);
        }
    }
    let mut body = serde_json::json!({
        "active_connections": active,
        "total_connections": global.ws_total.load(std::sync::atomic::Ordering::Relaxed),
        "total_messages": messages,
        "connections": connections,
    });
    if truncated {
        body["truncated"] = serde_json::Value::Bool(true);
    }
    if !routes.is_empty() {
        body["routes"] = crate::proxy::RouteStats::merge(routes);
    }
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    counter!(metrics::HTTP_REQUESTS, "status" => "200").increment(1);
    Ok(resp.map(Into::into))
}

/// An upgrade `[limits]` refused (the handshake rate, or a WebSocket over HTTP/2 over the
/// connection caps), counted by reason, with `Retry-After`.
fn refused(refusal: Refusal) -> Response<Body> {
    counter!(metrics::HANDSHAKES_FAILED, "reason" => refusal.reason()).increment(1);
    counter!(metrics::CONNECTIONS_REFUSED, "reason" => refusal.reason()).increment(1);
    let mut resp = text(refusal.status(), refusal_text(refusal));
    resp.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from(refusal.retry_after()),
    );
    resp
}

fn refusal_text(refusal: Refusal) -> &'static str {
    match refusal {
        Refusal::Capacity => "server at capacity\n",
        Refusal::PerIp => "too many connections from this address\n",
        Refusal::HandshakeRate => "too many handshakes from this address\n",
    }
}

/// A refused upgrade, counted by reason.
fn refuse(r: Rejection) -> Response<Body> {
    counter!(metrics::HANDSHAKES_FAILED, "reason" => r.metric_reason()).increment(1);
    let mut resp = text(r.status(), &format!("{r}\n"));
    if let Some((name, value)) = r.header() {
        resp.headers_mut().insert(name, value);
    }
    resp
}

fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::copy_from_slice(body.as_bytes())));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
