//! The agent gateway (`/ws/agent`, docs/PROTOCOL.md): each client request becomes an HTTP request
//! to an upstream backend, and the answer (whole, or streamed as SSE or NDJSON) comes back as
//! messages with the request's `id`.
//!
//! Shape: [`protocol`] parses and encodes messages; [`sse`], [`ndjson`] and [`chunk`] decode
//! streams; [`breaker`] and [`balance`] are plain state; [`upstream`] is the per-shard HTTP
//! client. [`Agent`] is the connection's handler: each request runs as a task on the shard
//! (`spawn_local`) that queues its replies in the connection's mailbox; `cancel`, and the
//! connection going away, abort those tasks, which drops their upstream requests.

pub mod balance;
pub mod breaker;
pub mod chunk;
pub mod config;
pub mod demo;
pub mod ndjson;
pub mod protocol;
pub mod sse;
pub mod upstream;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use bytes::Bytes;

use crate::error::UpstreamError;
use crate::io::Backend;
use crate::ws::connection::{Close, Handler, Message, ToClient};
use crate::ws::handle::ConnHandle;
use crate::ws::mailbox::Outgoing;
use config::AgentConfig;
use protocol::{Code, Id, Query, Request};
use upstream::{Gateway, Kind, Outbound, Response};

/// The upstream body is read only while less than this is queued for the client (and at most
/// a quarter of `max_outbound_bytes`), so a slow client slows the upstream instead of growing
/// memory or being cut off as a slow consumer.
const BACKPRESSURE_BYTES: usize = 256 * 1024;

thread_local! {
    /// The shard's gateway (a shard is a thread), made on first use for the server whose `key`
    /// is given (tests run several servers in one process).
    static GATEWAY: RefCell<Option<(usize, Rc<Gateway>)>> = const { RefCell::new(None) };
}

/// This shard's gateway for the server identified by `key`, made from `cfg` on first use.
pub fn gateway(key: usize, cfg: &AgentConfig, backend: Backend, shard: usize) -> Rc<Gateway> {
    GATEWAY.with(|g| {
        let mut g = g.borrow_mut();
        match g.as_ref() {
            Some((k, gw)) if *k == key => gw.clone(),
            _ => {
                let gw = Rc::new(Gateway::new(cfg, backend, shard));
                *g = Some((key, gw.clone()));
                gw
            }
        }
    })
}

/// A random number fixed at start, so request ids differ across restarts (connection ids start
/// over).
fn boot_id() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    static BOOT: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *BOOT.get_or_init(|| {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos(),
        );
        h.finish() as u32
    })
}

/// A request in flight on a connection.
struct InFlight {
    seq: u64,
    id: Option<Id>,
    task: tokio::task::AbortHandle,
}

/// What a request's task needs of its connection.
struct ClientConn {
    entry: Rc<ConnHandle>,
    limit: usize,
    connection_id: String,
    /// The authenticated user (`sub`), when `[auth]` is configured and a token was given.
    user: Option<Arc<str>>,
    in_flight: RefCell<Vec<InFlight>>,
}

impl ClientConn {
    /// Queues a reply; `false` once the connection is closing as a slow consumer.
    fn send(&self, text: String) -> bool {
        self.entry
            .send(Outgoing::Text(Bytes::from(text)), self.limit)
    }

    fn finished(&self, seq: u64) {
        self.in_flight.borrow_mut().retain(|f| f.seq != seq);
    }

    /// Waits while the client's queue is over the backpressure mark (woken by the session as
    /// it writes, see `Mailbox::wait_below`).
    async fn drained(&self) {
        let mark = BACKPRESSURE_BYTES.min(self.limit / 4);
        self.entry.mailbox.wait_below(mark).await;
    }
}

/// The `/ws/agent` handler of one connection.
pub struct Agent {
    gw: Rc<Gateway>,
    conn: Rc<ClientConn>,
    next_seq: Cell<u64>,
}

impl Agent {
    /// `limit` is the connection's `max_outbound_bytes`.
    pub fn new(
        gw: Rc<Gateway>,
        entry: &Rc<ConnHandle>,
        user: Option<Arc<str>>,
        limit: usize,
    ) -> Agent {
        Agent {
            gw,
            conn: Rc::new(ClientConn {
                entry: entry.clone(),
                limit,
                connection_id: format!("{:x}", entry.id),
                user,
                in_flight: RefCell::new(Vec::new()),
            }),
            next_seq: Cell::new(0),
        }
    }

    fn spawn(&self, id: Option<Id>, out: &mut ToClient<'_>, work: Work) {
        let now = protocol::now();
        if self.conn.in_flight.borrow().len() >= self.gw.cfg.max_in_flight {
            let msg = format!(
                "too many requests in flight on this connection (at most {})",
                self.gw.cfg.max_in_flight
            );
            out.text(protocol::error(Code::RateLimited, &msg, id.as_ref(), None, now).as_bytes());
            return;
        }
        if let Work::Query(_) = &work {
            out.text(protocol::processing(id.as_ref(), now).as_bytes());
        }
        let seq = self.next_seq.get();
        self.next_seq.set(seq + 1);
        let request_id = format!("{:08x}-{}-{}", boot_id(), self.conn.connection_id, seq);
        let task = tokio::task::spawn_local(run(
            self.gw.clone(),
            self.conn.clone(),
            seq,
            id.clone(),
            request_id,
            work,
        ));
        self.conn.in_flight.borrow_mut().push(InFlight {
            seq,
            id,
            task: task.abort_handle(),
        });
    }

    /// Aborts the matching requests (all without `id`); their tasks never run again, so nothing
    /// more is queued for them.
    fn cancel(&self, id: Option<&Id>) -> usize {
        let gone: Vec<InFlight> = {
            let mut f = self.conn.in_flight.borrow_mut();
            let (gone, keep) = std::mem::take(&mut *f)
                .into_iter()
                .partition(|r| id.is_none() || r.id.as_ref() == id);
            *f = keep;
            gone
        };
        for r in &gone {
            r.task.abort();
        }
        gone.len()
    }
}

impl Drop for Agent {
    /// The client went away: every request in flight is aborted with its upstream request.
    fn drop(&mut self) {
        let n = self.cancel(None);
        if n > 0 {
            crate::metrics::agent_cancelled("disconnect", n);
        }
    }
}

/// What a request's task does.
enum Work {
    Query(Query),
    Stream(Query),
    Tool { tool_name: String, params: String },
}

impl Handler for Agent {
    fn on_open(&mut self, out: &mut ToClient<'_>) {
        let hello = if self.gw.cfg.demo_active() {
            demo::connected(&self.conn.connection_id)
        } else {
            protocol::connected(&self.conn.connection_id)
        };
        out.text(hello.as_bytes());
    }

    fn on_message(&mut self, msg: Message<'_>, out: &mut ToClient<'_>) -> Result<(), Close> {
        let Message::Text(text) = msg else {
            let e = protocol::error(
                Code::BadJson,
                "messages must be JSON text",
                None,
                None,
                protocol::now(),
            );
            out.text(e.as_bytes());
            return Ok(());
        };
        let req = match protocol::parse(text) {
            Ok(r) => r,
            Err(rejected) => {
                out.text(rejected.encode(protocol::now()).as_bytes());
                return Ok(());
            }
        };
        match req {
            Request::Ping { id } => {
                out.text(protocol::pong(id.as_ref(), protocol::now()).as_bytes())
            }
            Request::Cancel { id } => {
                let n = self.cancel(id.as_ref());
                if n > 0 {
                    crate::metrics::agent_cancelled("client", n);
                }
                out.text(protocol::cancelled(id.as_ref(), protocol::now()).as_bytes());
            }
            Request::AgentQuery(q) => self.spawn(q.id.clone(), out, Work::Query(q)),
            Request::StreamingQuery(q) => self.spawn(q.id.clone(), out, Work::Stream(q)),
            Request::ToolCall {
                id,
                tool_name,
                params,
            } => self.spawn(id, out, Work::Tool { tool_name, params }),
        }
        Ok(())
    }
}

/// The upstream body of a query: `{"query", "id", "connection_id", "session_id"?, "user"?}`.
fn query_body(q: &Query, connection_id: &str, user: Option<&str>) -> Bytes {
    let mut m = serde_json::Map::new();
    m.insert("query".into(), q.query.clone().into());
    if let Some(id) = &q.id {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(id.json()) {
            m.insert("id".into(), v);
        }
    }
    m.insert("connection_id".into(), connection_id.into());
    if let Some(s) = &q.session_id {
        m.insert("session_id".into(), s.clone().into());
    }
    if let Some(u) = user {
        m.insert("user".into(), u.into());
    }
    Bytes::from(serde_json::Value::Object(m).to_string())
}

async fn run(
    gw: Rc<Gateway>,
    conn: Rc<ClientConn>,
    seq: u64,
    id: Option<Id>,
    request_id: String,
    work: Work,
) {
    let cfg = &gw.cfg;
    if cfg.demo_active() {
        match &work {
            Work::Query(q) => demo::query(&conn, id.as_ref(), &q.query),
            Work::Stream(q) => demo::stream(&conn, id.as_ref(), &q.query).await,
            Work::Tool { tool_name, params } => demo::tool(&conn, id.as_ref(), tool_name, params),
        }
        conn.finished(seq);
        return;
    }
    let (kind, path, body, session_id) = match &work {
        Work::Query(q) => (
            Kind::Query,
            cfg.query_path.clone(),
            query_body(q, &conn.connection_id, conn.user.as_deref()),
            q.session_id.clone(),
        ),
        Work::Stream(q) => (
            Kind::Stream,
            cfg.stream_path.clone(),
            query_body(q, &conn.connection_id, conn.user.as_deref()),
            q.session_id.clone(),
        ),
        Work::Tool { tool_name, params } => (
            Kind::Tool,
            cfg.tool_path.replace("{tool_name}", tool_name),
            Bytes::from(params.clone()),
            None,
        ),
    };
    let req = Outbound {
        kind,
        path,
        body,
        request_id,
        connection_id: conn.connection_id.clone(),
        session_id,
    };
    let result = match gw.send(&req).await {
        Ok(mut resp) => match &work {
            Work::Query(_) => answer(&mut resp, &conn, id.as_ref(), cfg.max_response_bytes).await,
            Work::Tool { tool_name, .. } => {
                tool_result(
                    &mut resp,
                    &conn,
                    id.as_ref(),
                    tool_name,
                    cfg.max_response_bytes,
                )
                .await
            }
            Work::Stream(_) => {
                let r = stream(&mut resp, &conn, id.as_ref(), cfg.max_response_bytes).await;
                if r.is_ok() {
                    resp.drain().await;
                }
                r
            }
        },
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        tracing::debug!(request_id = %req.request_id, error = %e, "agent request failed");
        conn.send(protocol::error(
            e.code(),
            &e.to_string(),
            id.as_ref(),
            e.status(),
            protocol::now(),
        ));
    }
    conn.finished(seq);
}

/// A non-2xx answer: the error, with the status (the body is not forwarded).
fn check_status(resp: &Response) -> Result<(), UpstreamError> {
    if resp.status.is_success() {
        Ok(())
    } else {
        Err(UpstreamError::Status(resp.status.as_u16()))
    }
}

fn body_text(b: &[u8]) -> Result<&str, UpstreamError> {
    std::str::from_utf8(b).map_err(|_| UpstreamError::Protocol("the answer is not UTF-8".into()))
}

async fn answer(
    resp: &mut Response,
    conn: &ClientConn,
    id: Option<&Id>,
    limit: usize,
) -> Result<(), UpstreamError> {
    check_status(resp)?;
    let body = resp.collect(limit).await?;
    let (content, vendor) = chunk::answer(body_text(&body)?);
    conn.send(protocol::agent_response(
        &content,
        vendor.as_deref(),
        id,
        protocol::now(),
    ));
    Ok(())
}

async fn tool_result(
    resp: &mut Response,
    conn: &ClientConn,
    id: Option<&Id>,
    tool_name: &str,
    limit: usize,
) -> Result<(), UpstreamError> {
    check_status(resp)?;
    let body = resp.collect(limit).await?;
    let v: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|_| UpstreamError::Protocol("the tool answer is not JSON".into()))?;
    let result = match v.get("result") {
        Some(r) => r.to_string(),
        None => {
            return Err(UpstreamError::Protocol(
                "the tool answer has no \"result\"".into(),
            ))
        }
    };
    conn.send(protocol::tool_result(
        tool_name,
        &result,
        id,
        protocol::now(),
    ));
    Ok(())
}

/// How a streamed body is framed.
enum Framing {
    Sse(sse::SseDecoder),
    Ndjson(ndjson::NdjsonDecoder),
    /// `application/json`: one whole answer.
    Json(Vec<u8>),
    /// Anything else: the text as it comes.
    Raw(chunk::Utf8Carry),
}

async fn stream(
    resp: &mut Response,
    conn: &ClientConn,
    id: Option<&Id>,
    limit: usize,
) -> Result<(), UpstreamError> {
    check_status(resp)?;
    let ct = resp.content_type.as_str();
    let mut framing = if ct.starts_with("text/event-stream") {
        Framing::Sse(sse::SseDecoder::new(limit))
    } else if ct.starts_with("application/x-ndjson")
        || ct.starts_with("application/jsonl")
        || ct.starts_with("application/json-lines")
        || ct.starts_with("application/ndjson")
    {
        Framing::Ndjson(ndjson::NdjsonDecoder::new(limit))
    } else if ct.starts_with("application/json") {
        Framing::Json(Vec::new())
    } else {
        Framing::Raw(chunk::Utf8Carry::default())
    };
    if !conn.send(protocol::stream_start(id, protocol::now())) {
        return Ok(());
    }
    let mut texts: Vec<String> = Vec::new();
    let mut events: Vec<sse::Event> = Vec::new();
    loop {
        conn.drained().await;
        let piece = resp.next().await?;
        let ended = piece.is_none();
        let bytes = piece.unwrap_or_default();
        match &mut framing {
            Framing::Sse(d) => {
                let r = if ended {
                    d.finish(&mut events)
                } else {
                    d.feed(&bytes, &mut events)
                };
                r.map_err(|e| UpstreamError::Protocol(format!("bad event stream: {e:?}")))?;
                for ev in events.drain(..) {
                    if ev.data.trim() == "[DONE]" {
                        return end(conn, &texts, id);
                    }
                    if ev.event == "error" {
                        return Err(UpstreamError::Protocol(format!(
                            "the upstream sent an error event: {}",
                            ev.data
                        )));
                    }
                    if let chunk::Content::Text(t) = chunk::content(&ev.data) {
                        texts.push(t.into_owned());
                    }
                }
            }
            Framing::Ndjson(d) => {
                let mut lines = Vec::new();
                let r = if ended {
                    d.finish(&mut lines)
                } else {
                    d.feed(&bytes, &mut lines)
                };
                r.map_err(|e| UpstreamError::Protocol(format!("bad NDJSON stream: {e:?}")))?;
                for l in &lines {
                    if l.trim() == "[DONE]" {
                        return end(conn, &texts, id);
                    }
                    if let chunk::Content::Text(t) = chunk::content(l) {
                        texts.push(t.into_owned());
                    }
                }
            }
            Framing::Json(buf) => {
                if buf.len() + bytes.len() > limit {
                    return Err(UpstreamError::Protocol(format!(
                        "the answer is larger than {limit} bytes"
                    )));
                }
                buf.extend_from_slice(&bytes);
                if ended {
                    if let chunk::Content::Text(t) = chunk::content(body_text(buf)?) {
                        texts.push(t.into_owned());
                    }
                }
            }
            Framing::Raw(carry) => {
                let t = if ended {
                    carry.finish()
                } else {
                    carry.feed(&bytes)
                };
                if !t.is_empty() {
                    texts.push(t);
                }
            }
        }
        for t in texts.drain(..) {
            if !conn.send(protocol::stream_chunk(&t, id, protocol::now())) {
                return Ok(());
            }
        }
        if ended {
            return end(conn, &texts, id);
        }
    }
}

/// Sends what is left, then `stream_end`.
fn end(conn: &ClientConn, texts: &[String], id: Option<&Id>) -> Result<(), UpstreamError> {
    for t in texts {
        if !conn.send(protocol::stream_chunk(t, id, protocol::now())) {
            return Ok(());
        }
    }
    conn.send(protocol::stream_end(id, protocol::now()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_query_body_carries_identity() {
        let Request::AgentQuery(q) =
            protocol::parse(br#"{"type":"agent_query","query":"hi","id":7,"session_id":"s1"}"#)
                .unwrap()
        else {
            panic!()
        };
        let v: serde_json::Value = serde_json::from_slice(&query_body(&q, "c1", None)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"query": "hi", "id": 7, "connection_id": "c1", "session_id": "s1"})
        );
        let v: serde_json::Value =
            serde_json::from_slice(&query_body(&q, "c1", Some("user-7"))).unwrap();
        assert_eq!(v["user"], "user-7");
    }
}
