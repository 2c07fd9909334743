//! WebSocket upgrades through a route, as a tunnel: ringgate makes the upstream handshake
//! first and answers the client with the upstream's answer (its 101, its refusal, or 502/504
//! when it cannot be reached); after a 101 the bytes are copied both ways as they are, each
//! direction's end passed on as a half-close. Reads go through the shard's scratch buffer, so
//! an idle tunnel holds no buffer (see [`Pipe`]).
//!
//! A WebSocket asked for over HTTP/2 (RFC 8441, an extended CONNECT) reaches the upstream as
//! an HTTP/1.1 upgrade with a key of ringgate's own; the upstream's 101 becomes the stream's
//! 200. The frames are the same on both (RFC 8441 §5), so a tunnel still copies them as they
//! are.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Response, StatusCode, Version};
use http_body_util::Full;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

use super::body::Body;
use super::upstream::Lease;
use super::{balance, headers, Client, Failure, RouteState};
use crate::io::Stream;

/// Largest upstream response head, and largest refusal body passed on.
const MAX_HEAD: usize = 64 * 1024;
/// Largest read per direction, and so the most a direction holds when its writer blocks.
const COPY_BUF: usize = 16 * 1024;
/// Reads per direction and wake-up before yielding to other connections (fairness).
const READ_BUDGET: usize = 8;

/// For `mode = "websocket"`: ringgate answers the client's handshake itself (the upstream's
/// handshake is ringgate's own, with its own key and no extensions).
pub struct RelayHandshake {
    /// `Sec-WebSocket-Accept` for the client's key (none over HTTP/2: there is no key).
    pub accept_key: Option<String>,
    /// `Sec-WebSocket-Extensions` negotiated with the client (permessage-deflate at the edge).
    pub extensions: Option<String>,
}

/// An upstream connection that answered 101, waiting for the client's 101 to be written.
pub struct Upgraded {
    /// Relayed message by message (`mode = "websocket"`), else tunnelled.
    pub relay: bool,
    io: Stream,
    /// Bytes the upstream sent right after its 101.
    leftover: Bytes,
    route: Rc<RouteState>,
    _lease: Lease,
    upstream: String,
    request_id: String,
    remote: std::net::SocketAddr,
}

/// Whether a request asks for a WebSocket upgrade.
pub fn is_websocket_upgrade<B>(req: &http::Request<B>) -> bool {
    let has = |name: HeaderName, token: &str| {
        req.headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    has(header::UPGRADE, "websocket") && has(header::CONNECTION, "upgrade")
}

/// Makes the upstream handshake for an upgrade request on `route`: the answer for the
/// client, and the upstream connection when that answer is a 101.
pub async fn handshake(
    route: Rc<RouteState>,
    parts: http::request::Parts,
    client: Client,
    relay: Option<RelayHandshake>,
) -> (Response<Body>, Option<Upgraded>) {
    let started = Instant::now();
    let request_id = headers::request_id(&parts.headers);
    let result = attempt(&route, parts, &client, &request_id, relay).await;
    let (resp, up, label) = match result {
        Ok((resp, up, label)) => (resp, up, Some(label)),
        Err((f, label)) => (super::http::error_response(&f), None, label),
    };
    let status = resp.status();
    tracing::info!(
        target: "access",
        remote = %client.remote,
        route = %route.name,
        upstream = label.as_deref().unwrap_or("-"),
        status = status.as_u16(),
        request_id = %request_id,
        duration_ms = started.elapsed().as_millis() as u64,
        "proxied upgrade"
    );
    route.metrics.requests(status).increment(1);
    (resp, up)
}

type Outcome = Result<(Response<Body>, Option<Upgraded>, String), (Failure, Option<String>)>;

async fn attempt(
    route: &Rc<RouteState>,
    parts: http::request::Parts,
    client: &Client,
    request_id: &str,
    relay: Option<RelayHandshake>,
) -> Outcome {
    let cfg = &route.cfg;
    if super::head_too_large(&parts.headers) {
        return Err((Failure::HeadTooLarge, None));
    }
    let client_host = parts.headers.get(header::HOST).cloned();
    let h2 = parts.version == Version::HTTP_2;
    let mut h = parts.headers.clone();
    headers::upstream_request(route, &mut h, client, request_id);
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    // A relay speaks its own WebSocket upstream (its own key, no extensions); a client over
    // HTTP/2 has no key to pass on.
    let own_key = (relay.is_some() || h2).then(|| {
        use base64::Engine as _;
        let id = headers::new_request_id();
        base64::engine::general_purpose::STANDARD.encode(&id.as_bytes()[..16])
    });
    if relay.is_some() {
        h.remove(header::SEC_WEBSOCKET_EXTENSIONS);
    }
    if let Some(v) = own_key.as_ref().and_then(|k| HeaderValue::from_str(k).ok()) {
        h.insert(header::SEC_WEBSOCKET_KEY, v);
    }
    let hash = route
        .hash
        .as_ref()
        .and_then(|k| balance::key(k, &h, client.remote.ip()));
    let (eject_after, eject_for, shard) = route.eject();
    let mut tried = vec![false; route.upstreams.len()];
    let mut last = Failure::NoUpstream;
    let mut label = None;
    for _ in 0..=cfg.retries {
        let Some(i) = balance::pick(route, hash, &tried) else {
            break;
        };
        tried[i] = true;
        let up = route.upstreams[i].clone();
        label = Some(up.label.clone());
        let lease = Lease::new(up.clone(), 0);
        let io = match up.connect_h1(route.backend, cfg.connect_timeout()).await {
            Ok(io) => io,
            Err(f) => {
                up.failure(eject_after, eject_for, shard);
                last = f;
                continue;
            }
        };
        let host = match (cfg.preserve_host, &client_host) {
            (true, Some(v)) => v.to_str().unwrap_or(&up.ep.url.authority).to_string(),
            _ => up.ep.url.authority.clone(),
        };
        let path = headers::upstream_path(route, &up.ep.url.path, &parts.uri);
        let head = request_head(&path, &host, &h);
        let exchange = async {
            let mut io = io;
            let broken = |e: std::io::Error| {
                Failure::Broken(format!("the upstream connection failed ({e})"))
            };
            io.write_all(&head).await.map_err(broken)?;
            io.flush().await.map_err(broken)?;
            let (resp, rest) = read_head(&mut io).await?;
            Ok::<_, Failure>((io, resp, rest))
        };
        let (mut io, resp, rest) =
            match tokio::time::timeout(cfg.response_timeout(), exchange).await {
                Ok(Ok(x)) => x,
                Ok(Err(f)) => {
                    up.failure(eject_after, eject_for, shard);
                    last = f;
                    // Nothing came back: an upgrade (a GET) is safe to send again.
                    continue;
                }
                Err(_) => {
                    up.failure(eject_after, eject_for, shard);
                    last = Failure::HeadTimeout;
                    continue;
                }
            };
        up.success();
        let (status, mut upstream_headers) = resp;
        let label = up.label.clone();
        if status == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(key) = &own_key {
                let want = crate::ws::handshake::accept_key(key.as_bytes());
                let got = upstream_headers.get(header::SEC_WEBSOCKET_ACCEPT);
                if got.is_none_or(|g| g.as_bytes() != want.as_bytes()) {
                    return Err((
                        Failure::Broken("the upstream's Sec-WebSocket-Accept is wrong".into()),
                        Some(label),
                    ));
                }
            }
            if let Some(r) = &relay {
                if upstream_headers.contains_key(header::SEC_WEBSOCKET_EXTENSIONS) {
                    return Err((
                        Failure::Broken(
                            "the upstream chose an extension it was not offered".into(),
                        ),
                        Some(label),
                    ));
                }
                let protocol = upstream_headers
                    .get(header::SEC_WEBSOCKET_PROTOCOL)
                    .cloned();
                upstream_headers = HeaderMap::new();
                if let Some(v) = r
                    .accept_key
                    .as_deref()
                    .and_then(|k| HeaderValue::from_str(k).ok())
                {
                    upstream_headers.insert(header::SEC_WEBSOCKET_ACCEPT, v);
                }
                if let Some(p) = protocol {
                    upstream_headers.insert(header::SEC_WEBSOCKET_PROTOCOL, p);
                }
                if let Some(v) = r
                    .extensions
                    .as_deref()
                    .and_then(|e| HeaderValue::from_str(e).ok())
                {
                    upstream_headers.insert(header::SEC_WEBSOCKET_EXTENSIONS, v);
                }
            }
            headers::client_response(route, &mut upstream_headers);
            let mut out = Response::new(Body::default());
            if h2 {
                // RFC 8441 §5: a 200, and no key to answer.
                upstream_headers.remove(header::SEC_WEBSOCKET_ACCEPT);
            } else {
                *out.status_mut() = status;
                upstream_headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                upstream_headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            }
            *out.headers_mut() = upstream_headers;
            let upgraded = Upgraded {
                relay: relay.is_some(),
                io,
                leftover: rest.freeze(),
                route: route.clone(),
                _lease: lease,
                upstream: label.clone(),
                request_id: request_id.to_string(),
                remote: client.remote,
            };
            return Ok((out, Some(upgraded), label));
        }
        // A refusal: passed on with its body when short (by length, or up to the close).
        let declared = upstream_headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<usize>().ok());
        let chunked = upstream_headers.contains_key(header::TRANSFER_ENCODING);
        let len = match declared {
            Some(n) if n <= MAX_HEAD => n,
            Some(_) => 0,
            None if chunked => 0,
            None => MAX_HEAD,
        };
        let mut body = rest;
        if body.len() < len {
            let more = async {
                while body.len() < len {
                    if io.read_buf(&mut body).await? == 0 {
                        break;
                    }
                }
                Ok::<_, std::io::Error>(())
            };
            let _ = tokio::time::timeout(cfg.idle_timeout(), more).await;
        }
        body.truncate(len);
        headers::client_response(route, &mut upstream_headers);
        upstream_headers.remove(header::CONTENT_LENGTH);
        let mut out = Response::new(Body::Full(Full::new(body.freeze())));
        *out.status_mut() = status;
        *out.headers_mut() = upstream_headers;
        return Ok((out, None, label));
    }
    Err((last, label))
}

fn request_head(path: &str, host: &str, h: &HeaderMap) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    out.extend_from_slice(b"GET ");
    out.extend_from_slice(path.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\nHost: ");
    out.extend_from_slice(host.as_bytes());
    out.extend_from_slice(b"\r\n");
    for (k, v) in h {
        if k == header::HOST {
            continue;
        }
        out.extend_from_slice(k.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    out
}

pub(super) type Head = (StatusCode, HeaderMap);

/// Reads the upstream's response head: it and the bytes read past it.
pub(super) async fn read_head(io: &mut Stream) -> Result<(Head, BytesMut), Failure> {
    let mut buf = BytesMut::with_capacity(4096);
    loop {
        let n = io
            .read_buf(&mut buf)
            .await
            .map_err(|e| Failure::Broken(format!("the upstream connection failed ({e})")))?;
        if n == 0 {
            return Err(Failure::Broken(
                "the upstream closed the connection during the handshake".into(),
            ));
        }
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut slots);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let status = resp
                    .code
                    .and_then(|c| StatusCode::from_u16(c).ok())
                    .ok_or_else(|| {
                        Failure::Broken("the upstream sent a malformed response".into())
                    })?;
                let mut map = HeaderMap::new();
                for h in resp.headers.iter() {
                    if let (Ok(k), Ok(v)) = (
                        HeaderName::from_bytes(h.name.as_bytes()),
                        HeaderValue::from_bytes(h.value),
                    ) {
                        map.append(k, v);
                    }
                }
                let rest = buf.split_off(len);
                return Ok(((status, map), rest));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => {
                return Err(Failure::Broken(
                    "the upstream's response head is too large".into(),
                ))
            }
            Err(_) => {
                return Err(Failure::Broken(
                    "the upstream sent a malformed response".into(),
                ))
            }
        }
    }
}

impl Upgraded {
    /// The client session's handler for a relayed WebSocket; the upstream side runs on its
    /// own task.
    pub fn into_relay(
        self,
        max_message: usize,
        close_timeout: std::time::Duration,
    ) -> (super::relay::Relay, super::relay::UpstreamSide) {
        let Upgraded {
            io,
            leftover,
            route,
            _lease,
            upstream,
            request_id,
            remote,
            ..
        } = self;
        super::relay::start(
            io,
            leftover,
            max_message,
            close_timeout,
            super::relay::Ends {
                route,
                lease: _lease,
                upstream,
                request_id,
                remote,
                started: Instant::now(),
            },
        )
    }
}

/// Copies bytes both ways until both directions ended (or `stop` resolves: a drain). `early`
/// are bytes the client sent right after its request head.
pub async fn run<C, F>(mut client: C, early: Bytes, up: Upgraded, stop: F)
where
    C: AsyncRead + AsyncWrite + Unpin,
    F: std::future::Future<Output = ()>,
{
    let started = Instant::now();
    let Upgraded {
        relay: _,
        mut io,
        leftover,
        route,
        _lease,
        upstream,
        request_id,
        remote,
    } = up;
    let g = route.metrics.websockets.clone();
    g.increment(1.0);
    // The bytes read past both heads are copied out, so the buffers they were read into
    // (hyper's, the upstream handshake's) go now rather than live as long as the tunnel.
    let mut to_up = Pipe::starting_with(&early);
    let mut to_client = Pipe::starting_with(&leftover);
    drop((early, leftover));
    let copy = poll_fn(|cx| {
        let a = to_up.poll_copy(cx, &mut client, &mut io);
        let b = to_client.poll_copy(cx, &mut io, &mut client);
        match (a, b) {
            (Poll::Ready(Err(e)), _) | (_, Poll::Ready(Err(e))) => Poll::Ready(Err(e)),
            (Poll::Ready(Ok(())), Poll::Ready(Ok(()))) => Poll::Ready(Ok(())),
            _ => Poll::Pending,
        }
    });
    let ended = tokio::select! {
        r = copy => if r.is_ok() { "closed" } else { "error" },
        () = stop => "drain",
    };
    let (to_up, to_client) = (to_up.bytes, to_client.bytes);
    g.decrement(1.0);
    let c = &route.counted;
    c.bytes_in.set(c.bytes_in.get() + to_up);
    c.bytes_out.set(c.bytes_out.get() + to_client);
    route.metrics.bytes_in.increment(to_up);
    route.metrics.bytes_out.increment(to_client);
    tracing::info!(
        target: "access",
        %remote,
        route = %route.name,
        upstream = %upstream,
        request_id = %request_id,
        bytes_in = to_up,
        bytes_out = to_client,
        duration_ms = started.elapsed().as_millis() as u64,
        ended,
        "tunnel closed"
    );
}

/// One direction of a tunnel. Bytes are read into the shard's scratch buffer and written on
/// from there; only what the writer does not take at once is kept (at most one read), so an
/// idle direction holds no buffer.
#[derive(Default)]
struct Pipe {
    /// Read but not yet written: the writer would block.
    pending: Vec<u8>,
    /// Bytes of `pending` written.
    at: usize,
    /// A write may still be buffered in the writer (TLS, io_uring write-behind).
    unflushed: bool,
    /// The reader ended: the writer's half is shut down once `pending` is out.
    eof: bool,
    /// The writer's half is shut down: this direction is over.
    done: bool,
    /// Bytes read.
    bytes: u64,
}

impl Pipe {
    /// A direction that first writes `first` (bytes read before the tunnel started).
    fn starting_with(first: &[u8]) -> Pipe {
        Pipe {
            pending: first.to_vec(),
            bytes: first.len() as u64,
            ..Pipe::default()
        }
    }

    /// Copies from `from` to `to`; `Ready(Ok)` once `from` ended and `to` is shut down.
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut W,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        for _ in 0..READ_BUDGET {
            if self.done {
                return Poll::Ready(Ok(()));
            }
            while self.at < self.pending.len() {
                let n = ready!(Pin::new(&mut *to).poll_write(cx, &self.pending[self.at..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.at += n;
                self.unflushed = true;
            }
            if !self.pending.is_empty() {
                self.pending = Vec::new();
                self.at = 0;
            }
            if self.unflushed {
                ready!(Pin::new(&mut *to).poll_flush(cx))?;
                self.unflushed = false;
            }
            if self.eof {
                ready!(Pin::new(&mut *to).poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            ready!(self.poll_read_through(cx, from, to))?;
        }
        // Budget used up with data still coming: come back after others had their turn.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// One read into the scratch buffer, written on at once; what the writer leaves is kept.
    fn poll_read_through<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        from: &mut R,
        to: &mut W,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        super::relay::with_scratch(|scratch| {
            let buf = &mut scratch[..COPY_BUF];
            let mut rb = ReadBuf::new(buf);
            ready!(Pin::new(&mut *from).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                self.eof = true;
                return Poll::Ready(Ok(()));
            }
            self.bytes += n as u64;
            let mut at = 0;
            while at < n {
                match Pin::new(&mut *to).poll_write(cx, &buf[at..n]) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Poll::Ready(Ok(k)) => {
                        at += k;
                        self.unflushed = true;
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        self.pending.extend_from_slice(&buf[at..n]);
                        break;
                    }
                }
            }
            Poll::Ready(Ok(()))
        })
    }
}
