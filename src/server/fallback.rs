//! Room delivery for clients without a WebSocket (docs/PROTOCOL.md, "Fallback transports"):
//! `GET /sse` (Server-Sent Events), `GET /poll` (long-poll) and `POST /publish`.
//!
//! A stream or a waiting poll is a subscriber like a `/ws` connection: it is registered on the
//! shard (so a drain ends it), attached to the hub as a `RoomConn`, subscribes through the hub's
//! public API with `since`/`epoch`, and reads what the hub queues in its mailbox. Recovery,
//! ordering and the per-client byte bound (`max_outbound_bytes`, a slow consumer is cut off)
//! are therefore exactly those of `/ws`. Each event's data is the JSON object a `/ws`
//! subscriber gets.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::io::RequestBody;
use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::Full;
use hyper::body::Frame;

use super::http::Body;
use crate::auth::{self, Identity, TopicAction, ANONYMOUS};
use crate::rooms::conn::RoomConn;
use crate::rooms::proto::json_str;
use crate::rooms::HubMsg;
use crate::server::rooms_http::{ask, json_object, Refusal};
use crate::server::shard::{Registration, Shard, WsSlot};
use crate::ws::mailbox::Outgoing;
use ::metrics::{counter, gauge};

/// Comment lines that keep proxies and the browser from timing the stream out.
const SSE_HEARTBEAT: Duration = Duration::from_secs(15);
/// What `EventSource` waits before reconnecting, in milliseconds.
const SSE_RETRY_MS: u32 = 1000;
/// Default and largest `timeout` of `/poll`, in seconds.
const POLL_TIMEOUT: u64 = 25;
const POLL_TIMEOUT_MAX: u64 = 60;

use crate::metrics::{HTTP_PUBLISHES, POLL_REQUESTS, SSE_ACTIVE, SSE_EVENTS, SSE_STREAMS};

fn json(status: StatusCode, body: String) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn error_response(refusal: Refusal) -> Response<Body> {
    let status = refusal.0;
    let mut r = json(status, refusal.json());
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    r
}

/// Decodes `%XX` escapes (and nothing else: `+` stays `+`); `None` for a bad escape or bytes
/// that are not UTF-8.
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The raw (still escaped) value of `key` in a query string: topics are split on `,` before
/// decoding, so a topic may contain an escaped comma.
fn raw_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// A topic's position: the last seq seen, in which epoch.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Position {
    pub seq: u64,
    pub epoch: String,
}

/// `a:S:E,b:S:E` (each part percent-encoded; `:E` may be left out) → positions by topic.
pub fn parse_cursor(s: &str) -> Result<HashMap<String, Position>, String> {
    let mut out = HashMap::new();
    for part in s.split(',').filter(|p| !p.is_empty()) {
        let mut it = part.splitn(3, ':');
        let topic = it.next().and_then(percent_decode);
        let seq = it.next().and_then(|s| s.parse::<u64>().ok());
        let epoch = it.next().map_or(Some(String::new()), percent_decode);
        match (topic, seq, epoch) {
            (Some(t), Some(seq), Some(epoch)) if !t.is_empty() => {
                out.insert(t, Position { seq, epoch });
            }
            _ => return Err(format!("{part:?} is not topic:seq[:epoch]")),
        }
    }
    Ok(out)
}

pub fn encode_cursor(positions: &BTreeMap<String, Position>) -> String {
    positions
        .iter()
        .map(|(t, p)| {
            format!(
                "{}:{}:{}",
                percent_encode(t),
                p.seq,
                percent_encode(&p.epoch)
            )
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// What a `/sse` or `/poll` request asks for.
struct Ask {
    topics: Vec<String>,
    since: HashMap<String, Position>,
    identity: Option<Identity>,
}

fn identify(shard: &Shard, uri: &Uri, headers: &HeaderMap) -> Result<Option<Identity>, Refusal> {
    let Some(verifier) = shard.global.auth.as_ref() else {
        return Ok(None);
    };
    let found = auth::find_token(uri, headers, verifier.query_token);
    verifier
        .identify(found.as_ref())
        .map(Some)
        .map_err(|e| Refusal::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string()))
}

/// Checks `topics`, `since` (or `Last-Event-ID`) and the token as `/ws` would.
fn parse_ask(shard: &Shard, uri: &Uri, headers: &HeaderMap) -> Result<Ask, Refusal> {
    let identity = identify(shard, uri, headers)?;
    let cfg = &shard.global.config.rooms;
    let query = uri.query().unwrap_or("");
    let raw = raw_param(query, "topics").unwrap_or("");
    let mut topics = Vec::new();
    for t in raw.split(',').filter(|t| !t.is_empty()) {
        let t = percent_decode(t).ok_or_else(|| {
            Refusal::bad("bad_json", format!("{t:?} is not a percent-encoded topic"))
        })?;
        if t.is_empty() {
            return Err(Refusal::bad("missing_field", "a topic is empty"));
        }
        if t.len() > cfg.max_topic_length {
            return Err(Refusal::bad(
                "too_large",
                format!("topic is longer than {} bytes", cfg.max_topic_length),
            ));
        }
        if identity
            .as_ref()
            .is_some_and(|i| !i.may(TopicAction::Subscribe, &t))
        {
            return Err(Refusal::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!("the token does not allow to subscribe to {}", json_str(&t)),
            ));
        }
        if cfg.is_binary(&t) {
            return Err(Refusal::bad(
                "bad_binary",
                format!("{} is a binary topic: use /ws", json_str(&t)),
            ));
        }
        if !topics.contains(&t) {
            topics.push(t);
        }
    }
    if topics.is_empty() {
        return Err(Refusal::bad("missing_field", "topics is required"));
    }
    if topics.len() > cfg.max_topics_per_connection {
        return Err(Refusal::bad(
            "too_large",
            format!(
                "at most {} topics per stream",
                cfg.max_topics_per_connection
            ),
        ));
    }
    // EventSource resends the last event's id on its own reconnects: it wins over the URL's.
    let last_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty());
    let since = match last_id.or(raw_param(query, "since")) {
        Some(c) => parse_cursor(c).map_err(|e| Refusal::bad("missing_field", e))?,
        None => HashMap::new(),
    };
    Ok(Ask {
        topics,
        since,
        identity,
    })
}

/// A subscriber without a WebSocket: detached from the hub (leaving its topics, with `leave`
/// events) when dropped.
struct Subscriber {
    reg: Registration,
    conn: Rc<RoomConn>,
    hub: Rc<crate::rooms::SharedHub>,
    _slot: WsSlot,
}

/// Whether a fallback subscriber is listed in presence. An SSE stream is, as a socket is. A
/// long-poll client is not: each poll is a fresh subscription, so listing it would send every
/// other subscriber a `leave` and a `join` per poll (per message, on a busy topic).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Listing {
    Presence,
    Unlisted,
}

impl Subscriber {
    fn start(
        shard: &Rc<Shard>,
        remote: SocketAddr,
        ask: &Ask,
        slot: WsSlot,
        listing: Listing,
    ) -> Subscriber {
        let reg = shard.register(remote);
        let conn = Rc::new(RoomConn {
            entry: reg.entry.clone(),
            client_id: shard.hub.client_id(reg.entry.id),
            user: ask
                .identity
                .as_ref()
                .map_or_else(|| ANONYMOUS.into(), |i| i.user.clone()),
            topics: RefCell::new(HashMap::new()),
        });
        let hub = shard.hub.clone();
        hub.with(|h, now| {
            h.attach(conn.clone());
            for t in &ask.topics {
                let pos = ask.since.get(t);
                // At seq 0 nothing was seen, so any epoch's messages are all new: a topic that
                // was dropped while nobody held it (between two polls, say) is not a loss.
                let epoch = pos
                    .filter(|p| p.seq > 0 && !p.epoch.is_empty())
                    .map(|p| p.epoch.as_str());
                let since = pos.map(|p| p.seq);
                match listing {
                    Listing::Presence => h.subscribe(now, &conn, t, since, epoch, None),
                    Listing::Unlisted => h.subscribe_unlisted(now, &conn, t, since, epoch),
                }
            }
        });
        Subscriber {
            reg,
            conn,
            hub,
            _slot: slot,
        }
    }

    /// Everything queued, as JSON texts.
    fn take(&self) -> Vec<Bytes> {
        let mut out = Vec::new();
        self.reg.entry.mailbox.drain(|item| match item {
            Outgoing::Text(t) => out.push(t),
            Outgoing::Broadcast(b) => out.push(Bytes::copy_from_slice(b.payload())),
        });
        out
    }

    fn has_mail(&self) -> bool {
        self.reg.entry.mailbox.has_mail()
    }

    fn closing(&self) -> bool {
        self.reg.entry.close_requested()
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let id = self.conn.entry.id;
        if self.hub.try_with(|hub, now| hub.detach(now, id)).is_none() {
            tracing::error!("fallback subscriber dropped while the hub was busy");
        }
    }
}

/// The fields of a delivered message that move a cursor.
#[derive(serde::Deserialize)]
struct Seen {
    #[serde(rename = "type")]
    kind: Option<String>,
    topic: Option<String>,
    seq: Option<u64>,
    epoch: Option<String>,
}

/// Moves `cursor` past `msg`; `true` when it is a room message (not a reply or presence).
fn advance(cursor: &mut BTreeMap<String, Position>, msg: &[u8]) -> bool {
    let Ok(seen) = serde_json::from_slice::<Seen>(msg) else {
        return false;
    };
    let (Some(topic), Some(seq)) = (seen.topic, seen.seq) else {
        return false;
    };
    match seen.kind.as_deref() {
        Some("subscribed") => {
            let p = cursor.entry(topic).or_default();
            p.seq = seq;
            p.epoch = seen.epoch.unwrap_or_default();
            false
        }
        _ => {
            let p = cursor.entry(topic).or_default();
            p.seq = seq;
            true
        }
    }
}

fn admit(shard: &Shard) -> Result<WsSlot, Refusal> {
    if shard.global.is_draining() {
        return Err(Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "internal",
            "server is draining",
        ));
    }
    shard.global.try_admit_ws().ok_or_else(|| {
        Refusal::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "internal",
            "too many connections",
        )
    })
}

/// Whether `path` is served here.
pub fn handles(path: &str) -> bool {
    matches!(
        path,
        "/sse" | "/poll" | "/publish" | "/presence" | "/history"
    )
}

/// Answers `/sse`, `/poll` or `/publish` (see [`handles`]).
pub async fn serve(
    shard: Rc<Shard>,
    remote: SocketAddr,
    req: Request<RequestBody>,
) -> Response<AnyBody> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/sse") => sse(&shard, remote, &req),
        (&Method::GET, "/poll") => AnyBody::full(poll(&shard, remote, &req).await),
        (&Method::POST, "/publish") => AnyBody::full(publish(&shard, remote, req).await),
        (&Method::GET, "/presence" | "/history") => AnyBody::full(read(&shard, &req).await),
        (m, path) => {
            let mut r = error_response(Refusal::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{m} is not allowed here"),
            ));
            let allow = if path == "/publish" { "POST" } else { "GET" };
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
            AnyBody::full(r)
        }
    }
}

// ---- /sse ----------------------------------------------------------------------------------

fn sse(shard: &Rc<Shard>, remote: SocketAddr, req: &Request<RequestBody>) -> Response<AnyBody> {
    let ask = match parse_ask(shard, req.uri(), req.headers()).and_then(|a| {
        let slot = admit(shard)?;
        Ok((a, slot))
    }) {
        Ok(a) => a,
        Err(r) => return AnyBody::full(error_response(r)),
    };
    let (ask, slot) = ask;
    counter!(SSE_STREAMS).increment(1);
    gauge!(SSE_ACTIVE).increment(1.0);
    let sub = Subscriber::start(shard, remote, &ask, slot, Listing::Presence);
    let mut cursor = BTreeMap::new();
    for (t, p) in &ask.since {
        cursor.insert(t.clone(), p.clone());
    }
    let body = SseBody {
        sub,
        cursor,
        heartbeat: tokio::time::interval_at(
            tokio::time::Instant::now() + SSE_HEARTBEAT,
            SSE_HEARTBEAT,
        ),
        first: true,
        done: false,
    };
    let mut resp = Response::new(AnyBody::Sse(Box::new(body)));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // nginx and similar proxies would otherwise hold events back.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp
}

/// The event stream: the hub's deliveries as `id:`/`data:` events, heartbeat comments, and
/// the end once the client is cut off (slow consumer) or the server drains.
pub struct SseBody {
    sub: Subscriber,
    cursor: BTreeMap<String, Position>,
    heartbeat: tokio::time::Interval,
    first: bool,
    done: bool,
}

impl Drop for SseBody {
    fn drop(&mut self) {
        gauge!(SSE_ACTIVE).decrement(1.0);
    }
}

impl SseBody {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        if self.done {
            return Poll::Ready(None);
        }
        self.sub.reg.entry.register_waker(cx.waker());
        let mut out = String::new();
        if self.first {
            self.first = false;
            out.push_str(&format!("retry: {SSE_RETRY_MS}\n: ringgate\n\n"));
        }
        if self.sub.has_mail() {
            let msgs = self.sub.take();
            counter!(SSE_EVENTS).increment(msgs.len() as u64);
            for m in msgs {
                advance(&mut self.cursor, &m);
                let Ok(text) = std::str::from_utf8(&m) else {
                    continue;
                };
                out.push_str("id: ");
                out.push_str(&encode_cursor(&self.cursor));
                out.push('\n');
                // JSON from the hub has no raw newlines; split anyway so no line can break
                // the framing.
                for line in text.split('\n') {
                    out.push_str("data: ");
                    out.push_str(line);
                    out.push('\n');
                }
                out.push('\n');
            }
        }
        if self.sub.closing() {
            self.done = true;
            return Poll::Ready((!out.is_empty()).then(|| Bytes::from(out)));
        }
        while self.heartbeat.poll_tick(cx).is_ready() {
            out.push_str(": heartbeat\n\n");
        }
        if out.is_empty() {
            Poll::Pending
        } else {
            Poll::Ready(Some(Bytes::from(out)))
        }
    }
}

/// A response body: what the rest of the server sends (whole, or a proxied stream), or an
/// event stream.
pub enum AnyBody {
    Served(crate::proxy::body::Body),
    Sse(Box<SseBody>),
}

impl AnyBody {
    pub fn full(r: Response<Body>) -> Response<AnyBody> {
        r.map(|b| AnyBody::Served(b.into()))
    }
}

impl hyper::body::Body for AnyBody {
    type Data = Bytes;
    type Error = crate::proxy::body::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            AnyBody::Served(b) => Pin::new(b).poll_frame(cx),
            AnyBody::Sse(s) => s.poll_next(cx).map(|o| o.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            AnyBody::Served(b) => b.is_end_stream(),
            AnyBody::Sse(s) => s.done,
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            AnyBody::Served(b) => b.size_hint(),
            AnyBody::Sse(_) => hyper::body::SizeHint::default(),
        }
    }
}

// ---- /poll ---------------------------------------------------------------------------------

async fn poll(shard: &Rc<Shard>, remote: SocketAddr, req: &Request<RequestBody>) -> Response<Body> {
    counter!(POLL_REQUESTS).increment(1);
    match poll_inner(shard, remote, req).await {
        Ok(r) => r,
        Err(e) => error_response(e),
    }
}

async fn poll_inner(
    shard: &Rc<Shard>,
    remote: SocketAddr,
    req: &Request<RequestBody>,
) -> Result<Response<Body>, Refusal> {
    let ask = parse_ask(shard, req.uri(), req.headers())?;
    let timeout = match raw_param(req.uri().query().unwrap_or(""), "timeout") {
        None => POLL_TIMEOUT,
        Some(t) => t.parse::<u64>().map_err(|_| {
            Refusal::new(
                StatusCode::BAD_REQUEST,
                "missing_field",
                "timeout must be a non-negative integer (seconds)",
            )
        })?,
    }
    .min(POLL_TIMEOUT_MAX);
    let slot = admit(shard)?;
    // Not a presence member: it subscribes anew with every poll (see `Listing`).
    let sub = Subscriber::start(shard, remote, &ask, slot, Listing::Unlisted);
    let mut cursor: BTreeMap<String, Position> = ask
        .since
        .iter()
        .map(|(t, p)| (t.clone(), p.clone()))
        .collect();
    let mut messages: Vec<Bytes> = Vec::new();
    let mut answered = 0;
    let fresh = ask.topics.iter().any(|t| !ask.since.contains_key(t));
    let now = tokio::time::Instant::now();
    let deadline = now + Duration::from_secs(timeout);
    // Every topic's `subscribed` (its position) is in the answer, even with `timeout=0`: it
    // comes from a shard of this process, so waiting for it is bounded (by this, at worst).
    let positions_by = deadline.max(now + shard.global.config.handshake_timeout());
    loop {
        let wait_until = if answered >= ask.topics.len() {
            deadline
        } else {
            positions_by
        };
        let ready = tokio::time::timeout_at(
            wait_until,
            poll_fn(|cx| {
                sub.reg.entry.register_waker(cx.waker());
                if sub.has_mail() || sub.closing() {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            }),
        )
        .await;
        let mut room = false;
        for m in sub.take() {
            if advance(&mut cursor, &m) {
                room = true;
            } else if m.starts_with(b"{\"type\":\"subscribed\"") {
                answered += 1;
                // Recovery failed for this topic: the client must know now, not after the wait.
                room |= memchr_false(&m);
            }
            messages.push(m);
        }
        // A batch: everything queued once the first room message is there (the replay comes
        // in one piece right after the `subscribed`). A topic asked without a position gets
        // its position at once, so the next poll can resume from it.
        let all_answered = answered >= ask.topics.len();
        if all_answered && (room || fresh) || ready.is_err() || sub.closing() {
            break;
        }
    }
    drop(sub);
    let mut body = String::from("{\"messages\":[");
    for (i, m) in messages.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(std::str::from_utf8(m).unwrap_or("null"));
    }
    body.push_str("],\"cursor\":");
    body.push_str(&json_str(&encode_cursor(&cursor)));
    body.push('}');
    Ok(json(StatusCode::OK, body))
}

/// Whether a `subscribed` reply says `"recovered":false`.
fn memchr_false(m: &[u8]) -> bool {
    m.windows(17).any(|w| w == b"\"recovered\":false")
}

// ---- /publish ------------------------------------------------------------------------------

async fn publish(
    shard: &Rc<Shard>,
    remote: SocketAddr,
    req: Request<RequestBody>,
) -> Response<Body> {
    match publish_inner(shard, remote, req).await {
        Ok(r) => {
            counter!(HTTP_PUBLISHES, "result" => "ok").increment(1);
            r
        }
        Err(e) => {
            counter!(HTTP_PUBLISHES, "result" => e.1).increment(1);
            error_response(e)
        }
    }
}

/// `POST /publish`: a `/ws` publish for clients without a socket, with the `/ws` token (and
/// its `publish` claim) rather than the backend API key.
async fn publish_inner(
    shard: &Rc<Shard>,
    remote: SocketAddr,
    req: Request<RequestBody>,
) -> Result<Response<Body>, Refusal> {
    let identity = identify(shard, req.uri(), req.headers())?;
    // Before the body is read: a flood costs a lookup, not a parse.
    let global = &shard.global;
    let user = identity.as_ref().map(|i| &*i.user);
    if let Some(caller) = global.admission.caller(remote.ip(), user) {
        let allowed = match global.http_publishes.lock() {
            Ok(mut limits) => limits.try_take(caller, std::time::Instant::now()),
            Err(poisoned) => poisoned
                .into_inner()
                .try_take(caller, std::time::Instant::now()),
        };
        if !allowed {
            return Err(Refusal::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "more than {} publishes per second from this client",
                    shard.global.config.rooms.publish_rate
                ),
            ));
        }
    }
    let cfg = &shard.global.config.rooms;
    let obj = json_object(shard, req.into_body()).await?;
    let topic = match obj.get("topic") {
        Some(serde_json::Value::String(t)) if !t.is_empty() => t.as_str(),
        _ => {
            return Err(Refusal::bad(
                "missing_field",
                "topic must be a non-empty string",
            ))
        }
    };
    if topic.len() > cfg.max_topic_length {
        return Err(Refusal::bad(
            "too_large",
            format!("topic is longer than {} bytes", cfg.max_topic_length),
        ));
    }
    if identity
        .as_ref()
        .is_some_and(|i| !i.may(TopicAction::Publish, topic))
    {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("the token does not allow to publish to {}", json_str(topic)),
        ));
    }
    let kind = match obj.get("type") {
        None | Some(serde_json::Value::Null) => "message",
        Some(serde_json::Value::String(s)) if !s.is_empty() => s,
        Some(_) => {
            return Err(Refusal::bad(
                "missing_field",
                "type must be a non-empty string",
            ))
        }
    };
    if shard.global.config.rooms.is_binary(topic) {
        return Err(Refusal::bad(
            "bad_binary",
            format!("{} is a binary topic: use /ws", json_str(topic)),
        ));
    }
    if crate::rooms::proto::is_reserved_type(kind) {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!("{} is a server message type", json_str(kind)),
        ));
    }
    let data = obj
        .get("data")
        .ok_or_else(|| Refusal::bad("missing_field", "data is required"))?
        .to_string();
    if data.len() > cfg.max_data_size {
        return Err(Refusal::bad(
            "too_large",
            format!("data is larger than {} bytes", cfg.max_data_size),
        ));
    }
    let from = identity.map(|i| i.user);
    let answer = ask(shard, topic, |reply| HubMsg::Publish {
        topic: topic.into(),
        kind: kind.into(),
        data: data.into(),
        from,
        reply,
        opts: Default::default(),
    })
    .await?;
    Ok(json(StatusCode::OK, answer))
}

// ---- /presence, /history -------------------------------------------------------------------

/// `GET /presence?topic=T`, `GET /history?topic=T&since=S&limit=L`: the `/ws` requests with the
/// client's token (the `/api/*` versions are for backends).
async fn read(shard: &Rc<Shard>, req: &Request<RequestBody>) -> Response<Body> {
    match read_inner(shard, req).await {
        Ok(r) => r,
        Err(e) => error_response(e),
    }
}

async fn read_inner(
    shard: &Rc<Shard>,
    req: &Request<RequestBody>,
) -> Result<Response<Body>, Refusal> {
    let identity = identify(shard, req.uri(), req.headers())?;
    let cfg = &shard.global.config.rooms;
    let q: Vec<(String, String)> =
        form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let param = |k: &str| q.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str());
    let number = |k: &str| -> Result<Option<u64>, Refusal> {
        param(k)
            .map(|v| {
                v.parse().map_err(|_| {
                    Refusal::bad(
                        "missing_field",
                        format!("{k} must be a non-negative integer"),
                    )
                })
            })
            .transpose()
    };
    let topic = match param("topic") {
        None | Some("") => return Err(Refusal::bad("missing_field", "topic is required")),
        Some(t) if t.len() > cfg.max_topic_length => {
            return Err(Refusal::bad(
                "too_large",
                format!("topic is longer than {} bytes", cfg.max_topic_length),
            ))
        }
        Some(t) => t,
    };
    let history = req.uri().path() == "/history";
    let action = if history {
        TopicAction::History
    } else {
        TopicAction::Presence
    };
    if identity.as_ref().is_some_and(|i| !i.may(action, topic)) {
        return Err(Refusal::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "the token does not allow to {} {}",
                action.verb(),
                json_str(topic)
            ),
        ));
    }
    let answer = if history {
        let since = number("since")?.unwrap_or(0);
        let max = cfg.history_size;
        let limit = number("limit")?.map_or(max, |l| (l as usize).min(max));
        ask(shard, topic, |reply| HubMsg::History {
            topic: topic.into(),
            since,
            limit,
            reply,
        })
        .await?
    } else {
        ask(shard, topic, |reply| HubMsg::Presence {
            topic: topic.into(),
            reply,
        })
        .await?
    };
    Ok(json(StatusCode::OK, answer))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip() {
        let c = parse_cursor("a:3:E1,b%2Cc:7,x%3Ay:0:e%3A2").unwrap();
        assert_eq!(
            c["a"],
            Position {
                seq: 3,
                epoch: "E1".into()
            }
        );
        assert_eq!(c["b,c"].seq, 7);
        assert_eq!(c["x:y"].epoch, "e:2");
        let sorted: BTreeMap<_, _> = c.into_iter().collect();
        let again = parse_cursor(&encode_cursor(&sorted)).unwrap();
        assert_eq!(again.len(), 3);
        assert_eq!(again["x:y"].epoch, "e:2");
        for bad in ["a", "a:x", ":1", "a:1:%zz", "%ff:1"] {
            assert!(parse_cursor(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn advance_moves_per_topic() {
        let mut c = BTreeMap::new();
        assert!(!advance(
            &mut c,
            br#"{"type":"subscribed","topic":"a","seq":2,"epoch":"E"}"#
        ));
        assert!(advance(
            &mut c,
            br#"{"type":"message","topic":"a","seq":3,"data":1}"#
        ));
        assert!(!advance(
            &mut c,
            br#"{"type":"join","topic":"a","client_id":"1"}"#
        ));
        assert_eq!(
            c["a"],
            Position {
                seq: 3,
                epoch: "E".into()
            }
        );
        assert!(!advance(&mut c, b"not json"));
    }
}
