//! `/ws/agent`: the agent gateway against real upstream HTTP servers on 127.0.0.1 (hyper, in
//! this process; HTTP/1.1 and h2c), over real sockets, on both io backends.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

both_backends!(
    agent_query_json,
    tool_call_result,
    slow_sse_stream,
    ndjson_stream,
    openai_stream,
    plain_text_stream,
    upstream_500,
    upstream_hang_times_out,
    target_down_opens_breaker,
    cancel_mid_stream,
    client_disconnect_aborts_upstream,
    two_targets_balanced,
    no_upstream_configured,
    several_requests_in_flight,
    bad_input_errors,
    integers_beyond_64_bits_are_bad_json,
    h2c_prior_knowledge,
    https_upstream_h2_by_alpn,
    backpressure_holds_the_upstream,
    python_websockets_client,
    authenticated_user_reaches_upstream,
);

// ---- a scriptable upstream ---------------------------------------------------------------

/// What the upstream does with a request.
#[derive(Clone)]
enum Reply {
    Json(u16, String),
    /// A body sent in parts, each after its delay; `hang` keeps it open afterwards.
    Stream {
        content_type: &'static str,
        parts: Vec<(u64, Vec<u8>)>,
        hang: bool,
    },
    /// Never answers.
    Hang,
}

#[derive(Debug, Clone)]
struct Seen {
    path: String,
    version: http::Version,
    headers: http::HeaderMap,
    body: Value,
}

type Script = Arc<dyn Fn(&Seen) -> Reply + Send + Sync>;

struct Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    /// Response bodies dropped before they were complete (the proxy went away).
    aborted: Arc<AtomicUsize>,
    /// Body parts handed to hyper so far.
    parts_sent: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
}

impl Upstream {
    async fn start(script: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Upstream {
        Upstream::start_tls(None, script).await
    }

    /// An `https://` upstream (ALPN h2 and http/1.1) when `tls` is given.
    async fn start_tls(
        tls: Option<tokio_rustls::TlsAcceptor>,
        script: impl Fn(&Seen) -> Reply + Send + Sync + 'static,
    ) -> Upstream {
        let script: Script = Arc::new(script);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("addr");
        let u = Upstream {
            addr,
            seen: Arc::default(),
            aborted: Arc::default(),
            parts_sent: Arc::default(),
            connections: Arc::default(),
        };
        let (seen, aborted, sent, conns) = (
            u.seen.clone(),
            u.aborted.clone(),
            u.parts_sent.clone(),
            u.connections.clone(),
        );
        tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                conns.fetch_add(1, Ordering::SeqCst);
                let (script, seen, aborted, sent, tls) = (
                    script.clone(),
                    seen.clone(),
                    aborted.clone(),
                    sent.clone(),
                    tls.clone(),
                );
                let svc = hyper::service::service_fn(move |req: http::Request<Incoming>| {
                    let (script, seen, aborted, sent) =
                        (script.clone(), seen.clone(), aborted.clone(), sent.clone());
                    async move { Ok::<_, Infallible>(serve(req, script, seen, aborted, sent).await) }
                });
                tokio::spawn(async move {
                    let builder = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    let _ = match tls {
                        None => {
                            builder
                                .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                                .await
                        }
                        Some(acceptor) => {
                            let Ok(s) = acceptor.accept(sock).await else {
                                return;
                            };
                            builder
                                .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                                .await
                        }
                    };
                });
            }
        });
        u
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    async fn wait_aborted(&self, n: usize) {
        within("the upstream to see the request aborted", async {
            while self.aborted.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
    }
}

type RespBody = BoxBody<Bytes, Infallible>;

async fn serve(
    req: http::Request<Incoming>,
    script: Script,
    seen: Arc<Mutex<Vec<Seen>>>,
    aborted: Arc<AtomicUsize>,
    sent: Arc<AtomicUsize>,
) -> http::Response<RespBody> {
    let (parts, body) = req.into_parts();
    let bytes = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let s = Seen {
        path: parts.uri.path().to_string(),
        version: parts.version,
        headers: parts.headers,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    };
    let reply = script(&s);
    seen.lock().unwrap().push(s);
    match reply {
        Reply::Json(status, body) => http::Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)).boxed())
            .unwrap(),
        Reply::Hang => {
            std::future::pending::<()>().await;
            unreachable!()
        }
        Reply::Stream {
            content_type,
            parts,
            hang,
        } => {
            let (tx, rx) = mpsc::channel::<Bytes>(1);
            tokio::spawn(async move {
                for (delay, p) in parts {
                    if delay > 0 {
                        tokio::time::sleep(Duration::from_millis(delay)).await;
                    }
                    if tx.send(Bytes::from(p)).await.is_err() {
                        return;
                    }
                    sent.fetch_add(1, Ordering::SeqCst);
                }
                if hang {
                    tx.closed().await;
                }
            });
            let body = ChanBody {
                rx,
                done: false,
                aborted,
            };
            http::Response::builder()
                .header("content-type", content_type)
                .body(body.boxed())
                .unwrap()
        }
    }
}

/// A streamed body that notes being dropped before its end.
struct ChanBody {
    rx: mpsc::Receiver<Bytes>,
    done: bool,
    aborted: Arc<AtomicUsize>,
}

impl Body for ChanBody {
    type Data = Bytes;
    type Error = Infallible;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(b)) => Poll::Ready(Some(Ok(Frame::data(b)))),
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl Drop for ChanBody {
    fn drop(&mut self) {
        if !self.done {
            self.aborted.fetch_add(1, Ordering::SeqCst);
        }
    }
}

fn sse(events: &[&str], delay: u64) -> Reply {
    Reply::Stream {
        content_type: "text/event-stream",
        parts: events
            .iter()
            .map(|e| (delay, e.as_bytes().to_vec()))
            .collect(),
        hang: false,
    }
}

/// An endless SSE stream: `{"content":"c<i>"}` every `delay` ms.
fn endless_sse(delay: u64) -> Reply {
    Reply::Stream {
        content_type: "text/event-stream",
        parts: (0..10_000)
            .map(|i| {
                (
                    delay,
                    format!("data: {{\"content\":\"c{i}\"}}\n\n").into_bytes(),
                )
            })
            .collect(),
        hang: true,
    }
}

// ---- the client side -----------------------------------------------------------------------

async fn agent_ws(server: &Server) -> Ws {
    let (mut ws, resp) = within(
        "websocket connect",
        tokio_tungstenite::connect_async(server.url("/ws/agent")),
    )
    .await
    .expect("websocket handshake");
    assert_eq!(resp.status(), 101);
    let hello = recv(&mut ws).await;
    assert_eq!(hello["type"], "connected", "{hello}");
    assert_eq!(hello["message"], "Connected to Agent WebSocket");
    assert!(hello["connection_id"]
        .as_str()
        .is_some_and(|s| !s.is_empty()));
    ws
}

async fn send(ws: &mut Ws, v: Value) {
    within("send", ws.send(Message::text(v.to_string())))
        .await
        .expect("send");
}

async fn recv(ws: &mut Ws) -> Value {
    loop {
        match within("a message from ringgate", ws.next()).await {
            Some(Ok(Message::Text(t))) => {
                return serde_json::from_str(&t).unwrap_or_else(|e| panic!("{e}: {t}"))
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("expected a text message, got {other:?}"),
        }
    }
}

/// Receives messages until one with `type` == `ty` (for `id`), returning all of them.
async fn recv_until(ws: &mut Ws, ty: &str, id: &Value) -> Vec<Value> {
    let mut got = Vec::new();
    loop {
        let m = recv(ws).await;
        let done = m["type"] == ty && &m["id"] == id;
        got.push(m);
        if done {
            return got;
        }
    }
}

/// The `stream_chunk` contents among `msgs` for `id`.
fn chunks(msgs: &[Value], id: &Value) -> Vec<String> {
    msgs.iter()
        .filter(|m| m["type"] == "stream_chunk" && &m["id"] == id)
        .map(|m| m["content"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn start(backend: Backend, urls: &[&str]) -> Server {
    let mut args = vec![];
    for u in urls {
        args.extend(["--agent-upstream", u]);
    }
    Server::start(backend, &args)
}

async fn stream_query(ws: &mut Ws, id: &str) -> Vec<Value> {
    send(
        ws,
        json!({"type": "streaming_query", "query": "q", "id": id}),
    )
    .await;
    let msgs = recv_until(ws, "stream_end", &json!(id)).await;
    assert_eq!(msgs[0]["type"], "stream_start", "{msgs:?}");
    assert_eq!(msgs[0]["id"], id);
    msgs
}

// ---- tests ---------------------------------------------------------------------------------

async fn agent_query_json(backend: Backend) {
    let up = Upstream::start(|_| {
        Reply::Json(
            200,
            r#"{"content":"hello from upstream","vendor":"test-llm"}"#.into(),
        )
    })
    .await;
    let server = Server::start_with_env(
        backend,
        "[agent]\nheaders = { Authorization = { env = \"TEST_AGENT_KEY\", prefix = \"Bearer \" }, \"X-Tenant\" = \"acme\" }\n",
        &[("TEST_AGENT_KEY", "s3cret-key"), ("AGENT_UPSTREAM", &up.url())],
        &[],
    );
    let mut ws = agent_ws(&server).await;
    send(
        &mut ws,
        json!({"type": "agent_query", "query": "who are you", "id": "q1", "session_id": "sess-9"}),
    )
    .await;
    let status = recv(&mut ws).await;
    assert_eq!(
        (
            status["type"].as_str(),
            status["status"].as_str(),
            status["id"].as_str()
        ),
        (Some("status"), Some("processing"), Some("q1"))
    );
    assert!(status["timestamp"].as_f64().is_some());
    let r = recv(&mut ws).await;
    assert_eq!(r["type"], "agent_response", "{r}");
    assert_eq!(r["content"], "hello from upstream");
    assert_eq!(r["vendor"], "test-llm");
    assert_eq!(r["id"], "q1");
    // A numeric id comes back as a number.
    send(
        &mut ws,
        json!({"type": "agent_query", "query": "again", "id": 42}),
    )
    .await;
    let msgs = recv_until(&mut ws, "agent_response", &json!(42)).await;
    assert_eq!(msgs.len(), 2);

    let seen = up.seen();
    assert_eq!(seen.len(), 2);
    let s = &seen[0];
    assert_eq!(s.path, "/agent/query");
    assert_eq!(s.body["query"], "who are you");
    assert_eq!(s.body["id"], "q1");
    assert_eq!(s.body["session_id"], "sess-9");
    assert!(s.body["connection_id"]
        .as_str()
        .is_some_and(|c| !c.is_empty()));
    assert_eq!(seen[1].body["id"], 42);
    assert_eq!(s.headers["authorization"], "Bearer s3cret-key");
    assert_eq!(s.headers["x-tenant"], "acme");
    let rid0 = s.headers["x-request-id"].to_str().unwrap().to_string();
    let rid1 = seen[1].headers["x-request-id"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(!rid0.is_empty() && rid0 != rid1, "{rid0} {rid1}");
    // The secret never reaches the log.
    assert!(!server.log().contains("s3cret-key"));
}

async fn tool_call_result(backend: Backend) {
    let up = Upstream::start(|s| {
        assert_eq!(s.body["expression"], "123 + 456");
        Reply::Json(200, r#"{"result": 579}"#.into())
    })
    .await;
    let server = start(backend, &[&up.url()]);
    let mut ws = agent_ws(&server).await;
    send(
        &mut ws,
        json!({"type": "tool_call", "tool_name": "calculator", "params": {"expression": "123 + 456"}, "id": "t1"}),
    )
    .await;
    let r = recv(&mut ws).await;
    assert_eq!(r["type"], "tool_result", "{r}");
    assert_eq!(r["tool_name"], "calculator");
    assert_eq!(r["result"], 579);
    assert_eq!(r["id"], "t1");
    assert_eq!(up.seen()[0].path, "/tools/calculator");
}

/// An SSE stream with comments, CRLF, multi-line data and events split across writes.
async fn slow_sse_stream(backend: Backend) {
    let up = Upstream::start(|_| {
        sse(
            &[
                ": keep-alive\r\n\r\n",
                "data: {\"content\":\"def quick_sort(\"}\r\n\r\n",
                "data: {\"content\":",
                "\"arr):\"}\n\n",
                "data: line one\ndata: line two\n\n",
                "event: message\r\nid: 4\r\ndata: 你好\r",
                "\n\r\n",
                "data: [DONE]\n\n",
                "data: {\"content\":\"after done\"}\n\n",
            ],
            40,
        )
    })
    .await;
    let server = start(backend, &[&up.url()]);
    let mut ws = agent_ws(&server).await;
    let msgs = stream_query(&mut ws, "s1").await;
    assert_eq!(
        chunks(&msgs, &json!("s1")),
        ["def quick_sort(", "arr):", "line one\nline two", "你好"]
    );
    assert_eq!(up.seen()[0].path, "/agent/stream");
    for m in &msgs {
        assert!(m["timestamp"].as_f64().is_some(), "{m}");
    }
}

async fn ndjson_stream(backend: Backend) {
    let up = Upstream::start(|_| Reply::Stream {
        content_type: "application/x-ndjson",
        parts: vec![
            (10, b"{\"content\":\"a\"}\n{\"cont".to_vec()),
            (30, b"ent\":\"b\"}\r\n\n".to_vec()),
            (30, b"plain line\n{\"content\":\"c\"}".to_vec()),
        ],
        hang: false,
    })
    .await;
    let server = start(backend, &[&up.url()]);
    let mut ws = agent_ws(&server).await;
    let msgs = stream_query(&mut ws, "n1").await;
    assert_eq!(chunks(&msgs, &json!("n1")), ["a", "b", "plain line", "c"]);
}

async fn openai_stream(backend: Backend) {
    let up = Upstream::start(|_| {
        let chunk = |delta: &str| {
            format!(
                "data: {{\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{delta},\"finish_reason\":null}}]}}\n\n"
            )
        };
        let events = [
            chunk("{\"role\":\"assistant\",\"content\":\"\"}"),
            chunk("{\"content\":\"Hel\"}"),
            chunk("{\"content\":\"lo\"}"),
            "data: {\"id\":\"chatcmpl-1\",\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"stop\"}]}\n\n".into(),
            "data: [DONE]\n\n".into(),
        ];
        let refs: Vec<&str> = events.iter().map(String::as_str).collect();
        sse(&refs, 5)
    })
    .await;
    let server = start(backend, &[&up.url()]);
    let mut ws = agent_ws(&server).await;
    let msgs = stream_query(&mut ws, "o1").await;
    assert_eq!(chunks(&msgs, &json!("o1")), ["Hel", "lo"]);
    // The body's end after [DONE] is read too, so the connection is reused.
    let msgs = stream_query(&mut ws, "o2").await;
    assert_eq!(chunks(&msgs, &json!("o2")), ["Hel", "lo"]);
    assert_eq!(up.connections.load(Ordering::SeqCst), 1);
}

/// A body that is neither SSE nor NDJSON is passed through as text, even when a read splits a
/// character.
async fn plain_text_stream(backend: Backend) {
    let up = Upstream::start(|_| Reply::Stream {
        content_type: "text/plain; charset=utf-8",
        parts: vec![(10, b"hi \xe4\xbd".to_vec()), (30, b"\xa0 there".to_vec())],
        hang: false,
    })
    .await;
    let server = start(backend, &[&up.url()]);
    let mut ws = agent_ws(&server).await;
    let msgs = stream_query(&mut ws, "p1").await;
    assert_eq!(chunks(&msgs, &json!("p1")).concat(), "hi 你 there");
}

async fn upstream_500(backend: Backend) {
    let up = Upstream::start(|_| Reply::Json(500, r#"{"error":"boom"}"#.into())).await;
    let server = start(backend, &[&up.url()]);
    let mut ws = agent_ws(&server).await;
    send(
        &mut ws,
        json!({"type": "agent_query", "query": "x", "id": "e1"}),
    )
    .await;
    let msgs = recv_until(&mut ws, "error", &json!("e1")).await;
    let e = msgs.last().unwrap();
    assert_eq!(e["code"], "upstream_error", "{e}");
    assert_eq!(e["status"], 500);
    send(
        &mut ws,
        json!({"type": "streaming_query", "query": "x", "id": "e2"}),
    )
    .await;
    let e = recv(&mut ws).await;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str()),
        (Some("error"), Some("upstream_error"))
    );
    assert_eq!(e["id"], "e2");
    let metrics = server.get("/metrics").await.body;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("ringgate_agent_upstream_requests_total")
                && l.contains("status=\"500\"")),
        "{metrics}"
    );
}

/// No response head within first_byte_timeout, and a stream that stops mid-way for longer than
/// idle_timeout: both end in `upstream_timeout`.
async fn upstream_hang_times_out(backend: Backend) {
    let up = Upstream::start(|s| {
        if s.path == "/agent/query" {
            Reply::Hang
        } else {
            Reply::Stream {
                content_type: "text/event-stream",
                parts: vec![(0, b"data: first\n\n".to_vec())],
                hang: true,
            }
        }
    })
    .await;
    let server = Server::start_with_config(
        backend,
        &format!(
            "[agent]\nupstreams = [\"{}\"]\nfirst_byte_timeout = 0.5\nidle_timeout = 0.5\n",
            up.url()
        ),
        &[],
    );
    let mut ws = agent_ws(&server).await;
    send(
        &mut ws,
        json!({"type": "agent_query", "query": "x", "id": "h1"}),
    )
    .await;
    let msgs = recv_until(&mut ws, "error", &json!("h1")).await;
    assert_eq!(msgs.last().unwrap()["code"], "upstream_timeout");
    send(
        &mut ws,
        json!({"type": "streaming_query", "query": "x", "id": "h2"}),
    )
    .await;
    let msgs = recv_until(&mut ws, "error", &json!("h2")).await;
    assert_eq!(chunks(&msgs, &json!("h2")), ["first"]);
    assert_eq!(msgs.last().unwrap()["code"], "upstream_timeout");
    assert!(!msgs.iter().any(|m| m["type"] == "stream_end"));
    // The timed-out requests were dropped: the upstream saw the stream go away.
    up.wait_aborted(1).await;
    let metrics = server.get("/metrics").await.body;
    for phase in ["first_byte", "idle"] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("ringgate_agent_upstream_timeouts_total")
                    && l.contains(&format!("phase=\"{phase}\""))),
            "{phase}: {metrics}"
        );
    }
}

/// A target that accepts and drops connections: after `failure_threshold` failures its breaker
/// opens and requests fail fast without reaching it; after `open_seconds` one probe goes through.
async fn target_down_opens_breaker(backend: Backend) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            drop(s);
        }
    });
    let server = Server::start_with_config(
        backend,
        &format!(
            "[agent]\nupstreams = [\"http://{addr}\"]\nfailure_threshold = 2\nopen_seconds = 1.0\n"
        ),
        &[],
    );
    let mut ws = agent_ws(&server).await;
    let mut errors = Vec::new();
    for i in 0..4 {
        let id = json!(i);
        send(
            &mut ws,
            json!({"type": "agent_query", "query": "x", "id": i}),
        )
        .await;
        let msgs = recv_until(&mut ws, "error", &id).await;
        errors.push(msgs.last().unwrap().clone());
    }
    for e in &errors {
        assert_eq!(e["code"], "upstream_error", "{e}");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 2, "{errors:?}");
    for e in &errors[2..] {
        assert!(e["error"].as_str().unwrap().contains("circuit open"), "{e}");
    }
    let metrics = server.get("/metrics").await.body;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("ringgate_agent_breaker_state")
                && l.contains(&addr.to_string())
                && l.ends_with(" 2")),
        "{metrics}"
    );
    // Half-open after open_seconds: one probe reaches the target (and fails again). The breaker
    // runs on the server process's clock, which a test cannot pause: wait past it for real
    // (the breaker's timing itself is unit-tested with time passed in, agent::breaker).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    send(
        &mut ws,
        json!({"type": "agent_query", "query": "x", "id": "probe"}),
    )
    .await;
    recv_until(&mut ws, "error", &json!("probe")).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 3);

    // Nothing listening at all: a clear error, not a hang.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let server = start(backend, &[&format!("http://{dead}")]);
    let mut ws = agent_ws(&server).await;
    send(
        &mut ws,
        json!({"type": "streaming_query", "query": "x", "id": "d"}),
    )
    .await;
    let e = recv(&mut ws).await;
    assert_eq!(e["code"], "upstream_error", "{e}");
    assert!(e["error"].as_str().unwrap().contains("cannot reach"), "{e}");
}

async fn cancel_mid_stream(backend: Backend) {
    let up = Upstream::start(|_| endless_sse(30)).await;
    let server = start(backend, &[&up.url()]);
    let mut ws = agent_ws(&server).await;
    send(
        &mut ws,
        json!({"type": "streaming_query", "query": "q", "id": "c1"}),
    )
    .await;
    let start = recv(&mut ws).await;
    assert_eq!(start["type"], "stream_start");
    for _ in 0..2 {
        assert_eq!(recv(&mut ws).await["type"], "stream_chunk");
    }
    send(&mut ws, json!({"type": "cancel", "id": "c1"})).await;
    recv_until(&mut ws, "cancelled", &json!("c1")).await;
    up.wait_aborted(1).await;
    // Nothing for c1 after `cancelled`: wait well past several of the upstream's chunk periods
    // (it streams on its own clock, in this process but outside the test's paused time), then
    // use a ping as a barrier.
    tokio::time::sleep(Duration::from_millis(300)).await;
    send(&mut ws, json!({"type": "ping", "id": "barrier"})).await;
    let after = recv_until(&mut ws, "pong", &json!("barrier")).await;
    assert_eq!(after.len(), 1, "messages after cancelled: {after:?}");

    // cancel without id ends every request of the connection.
    for id in ["a", "b"] {
        send(
            &mut ws,
            json!({"type": "streaming_query", "query": "q", "id": id}),
        )
        .await;
    }
    let mut started = 0;
    while started < 2 {
        if recv(&mut ws).await["type"] == "stream_start" {
            started += 1;
        }
    }
    send(&mut ws, json!({"type": "cancel"})).await;
    recv_until(&mut ws, "cancelled", &Value::Null).await;
    up.wait_aborted(3).await;
    // As above: several chunk periods of the upstream, then the barrier.
    tokio::time::sleep(Duration::from_millis(300)).await;
    send(&mut ws, json!({"type": "ping", "id": "barrier2"})).await;
    let after = recv_until(&mut ws, "pong", &json!("barrier2")).await;
    assert_eq!(after.len(), 1, "messages after cancelled: {after:?}");
}

async fn client_disconnect_aborts_upstream(backend: Backend) {
    let up = Upstream::start(|_| endless_sse(20)).await;
    let server = start(backend, &[&up.url()]);
    let mut ws = agent_ws(&server).await;
    for id in ["x", "y"] {
        send(
            &mut ws,
            json!({"type": "streaming_query", "query": "q", "id": id}),
        )
        .await;
    }
    let mut chunks = 0;
    while chunks < 4 {
        if recv(&mut ws).await["type"] == "stream_chunk" {
            chunks += 1;
        }
    }
    drop(ws);
    up.wait_aborted(2).await;
}

async fn two_targets_balanced(backend: Backend) {
    let a = Upstream::start(|_| Reply::Json(200, r#"{"content":"a"}"#.into())).await;
    let b = Upstream::start(|_| Reply::Json(200, r#"{"content":"b"}"#.into())).await;
    let server = start(backend, &[&a.url(), &b.url()]);
    let mut ws = agent_ws(&server).await;
    let mut answers = Vec::new();
    for i in 0..6 {
        send(
            &mut ws,
            json!({"type": "agent_query", "query": "x", "id": i}),
        )
        .await;
        let msgs = recv_until(&mut ws, "agent_response", &json!(i)).await;
        answers.push(
            msgs.last().unwrap()["content"]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!((a.seen().len(), b.seen().len()), (3, 3), "{answers:?}");
    assert_ne!(
        answers[0], answers[1],
        "round robin alternates: {answers:?}"
    );
    // Sequential requests reuse pooled connections.
    assert!(a.connections.load(Ordering::SeqCst) <= 2);

    // One target down: requests go to the other one (nothing was sent to the dead one, so a
    // connect failure is retried on the next target).
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let server = Server::start_with_config(
        backend,
        &format!(
            "[agent]\nbalance = \"least_outstanding\"\nupstreams = [\"{dead}\", \"{}\"]\n",
            a.url()
        ),
        &[],
    );
    let mut ws = agent_ws(&server).await;
    for i in 0..4 {
        send(
            &mut ws,
            json!({"type": "agent_query", "query": "x", "id": i}),
        )
        .await;
        let msgs = recv_until(&mut ws, "agent_response", &json!(i)).await;
        assert_eq!(msgs.last().unwrap()["content"], "a");
    }
}

async fn no_upstream_configured(backend: Backend) {
    let server = Server::start_with_config(backend, "[agent]\ndemo = false\n", &[]);
    let mut ws = agent_ws(&server).await;
    for ty in ["agent_query", "streaming_query"] {
        send(&mut ws, json!({"type": ty, "query": "x", "id": ty})).await;
        let msgs = recv_until(&mut ws, "error", &json!(ty)).await;
        let e = msgs.last().unwrap();
        assert_eq!(e["code"], "upstream_error");
        assert!(
            e["error"]
                .as_str()
                .unwrap()
                .contains("no agent upstream is configured"),
            "{e}"
        );
    }
}

async fn several_requests_in_flight(backend: Backend) {
    let up = Upstream::start(|s| {
        let q = s.body["query"].as_str().unwrap_or_default().to_string();
        if s.path == "/agent/query" {
            return Reply::Json(200, json!({"content": format!("answer {q}")}).to_string());
        }
        let events: Vec<String> = (0..5)
            .map(|i| format!("data: {{\"content\":\"{q}{i}\"}}\n\n"))
            .collect();
        Reply::Stream {
            content_type: "text/event-stream",
            parts: events.into_iter().map(|e| (15, e.into_bytes())).collect(),
            hang: false,
        }
    })
    .await;
    let server = start(backend, &[&up.url()]);
    let mut ws = agent_ws(&server).await;
    for id in ["s1", "s2", "s3"] {
        send(
            &mut ws,
            json!({"type": "streaming_query", "query": id, "id": id}),
        )
        .await;
    }
    send(
        &mut ws,
        json!({"type": "agent_query", "query": "q", "id": "q"}),
    )
    .await;
    let mut msgs = Vec::new();
    let mut ended = 0;
    let mut answered = false;
    while ended < 3 || !answered {
        let m = recv(&mut ws).await;
        ended += (m["type"] == "stream_end") as usize;
        answered |= m["type"] == "agent_response";
        msgs.push(m);
    }
    for id in ["s1", "s2", "s3"] {
        let want: Vec<String> = (0..5).map(|i| format!("{id}{i}")).collect();
        assert_eq!(chunks(&msgs, &json!(id)), want);
    }
    let r = msgs.iter().find(|m| m["type"] == "agent_response").unwrap();
    assert_eq!(
        (r["id"].as_str(), r["content"].as_str()),
        (Some("q"), Some("answer q"))
    );
    // The streams interleaved rather than running one after another.
    let order: Vec<&str> = msgs
        .iter()
        .filter(|m| m["type"] == "stream_chunk")
        .filter_map(|m| m["id"].as_str())
        .collect();
    assert_ne!(order[..5], ["s1"; 5], "{order:?}");
}

/// An integer beyond 64 bits anywhere in a message is refused (not rounded to a float and
/// passed on); the largest and smallest 64-bit integers reach the upstream exactly.
async fn integers_beyond_64_bits_are_bad_json(backend: Backend) {
    let up = Upstream::start(|s| Reply::Json(200, format!(r#"{{"result": {}}}"#, s.body))).await;
    let server = start(backend, &[&up.url()]);
    let mut ws = agent_ws(&server).await;
    for text in [
        r#"{"type":"tool_call","tool_name":"echo","params":{"n":18446744073709551616},"id":"a"}"#,
        r#"{"type":"tool_call","tool_name":"echo","params":{"n":[-9223372036854775809]},"id":"b"}"#,
        r#"{"type":"ping","id":100000000000000000000}"#,
    ] {
        within("send", ws.send(Message::text(text))).await.unwrap();
        let e = recv(&mut ws).await;
        assert_eq!(
            (&e["type"], &e["code"]),
            (&json!("error"), &json!("bad_json")),
            "{text}: {e}"
        );
        assert!(e.get("id").is_none(), "{text}: {e}");
    }
    let edge = r#"{"type":"tool_call","tool_name":"echo","params":{"max":18446744073709551615,"min":-9223372036854775808},"id":18446744073709551615}"#;
    within("send", ws.send(Message::text(edge))).await.unwrap();
    let r = recv(&mut ws).await;
    assert_eq!(r["type"], "tool_result", "{r}");
    assert_eq!(r["id"], json!(u64::MAX), "{r}");
    assert_eq!(
        r["result"],
        json!({"max": u64::MAX, "min": i64::MIN}),
        "{r}"
    );
    assert_eq!(
        up.seen().len(),
        1,
        "only the message within 64 bits reached the upstream"
    );
}

async fn bad_input_errors(backend: Backend) {
    let server = Server::start(backend, &["--agent-upstream", "http://127.0.0.1:9"]);
    let mut ws = agent_ws(&server).await;
    let cases = [
        (
            r#"{"type":"agent_query","id":"m"}"#,
            "missing_field",
            json!("m"),
        ),
        (
            r#"{"type":"streaming_query","query":"","id":1}"#,
            "missing_field",
            json!(1),
        ),
        (
            r#"{"type":"tool_call","id":"t"}"#,
            "missing_field",
            json!("t"),
        ),
        (
            r#"{"type":"teleport","id":"u"}"#,
            "unknown_action",
            json!("u"),
        ),
        (r#"{"query":"no type"}"#, "missing_field", Value::Null),
        (r#"{not json"#, "bad_json", Value::Null),
        (r#"[1,2]"#, "bad_json", Value::Null),
    ];
    for (text, code, id) in cases {
        within("send", ws.send(Message::text(text))).await.unwrap();
        let e = recv(&mut ws).await;
        assert_eq!(e["type"], "error", "{text}: {e}");
        assert_eq!(e["code"], code, "{text}: {e}");
        assert_eq!(e["id"], id, "{text}: {e}");
    }
    let e = {
        within(
            "send",
            ws.send(Message::text(r#"{"type":"agent_query","id":"m"}"#)),
        )
        .await
        .unwrap();
        recv(&mut ws).await
    };
    assert_eq!(e["error"], "Query is required");
    within("send", ws.send(Message::binary(vec![1, 2, 3])))
        .await
        .unwrap();
    assert_eq!(recv(&mut ws).await["code"], "bad_json");
    send(&mut ws, json!({"type": "ping", "id": "p"})).await;
    let p = recv(&mut ws).await;
    assert_eq!(
        (p["type"].as_str(), p["id"].as_str()),
        (Some("pong"), Some("p"))
    );
    assert!(p["timestamp"].as_f64().is_some());
    // The connection is still open and well after all that.
    send(&mut ws, json!({"type": "cancel", "id": "nothing"})).await;
    assert_eq!(recv(&mut ws).await["type"], "cancelled");
}

async fn h2c_prior_knowledge(backend: Backend) {
    let up = Upstream::start(|s| {
        if s.path == "/agent/query" {
            Reply::Json(200, r#"{"content":"over h2"}"#.into())
        } else {
            endless_sse(20)
        }
    })
    .await;
    let server = Server::start_with_config(
        backend,
        &format!(
            "[[agent.upstreams]]\nurl = \"{}\"\nhttp2 = \"prior_knowledge\"\n",
            up.url()
        ),
        &[],
    );
    let mut ws = agent_ws(&server).await;
    send(
        &mut ws,
        json!({"type": "agent_query", "query": "x", "id": 1}),
    )
    .await;
    let msgs = recv_until(&mut ws, "agent_response", &json!(1)).await;
    assert_eq!(msgs.last().unwrap()["content"], "over h2");
    assert_eq!(up.seen()[0].version, http::Version::HTTP_2);
    // Cancel resets only the stream; the shared connection keeps serving.
    send(
        &mut ws,
        json!({"type": "streaming_query", "query": "x", "id": "s"}),
    )
    .await;
    assert_eq!(recv(&mut ws).await["type"], "stream_start");
    assert_eq!(recv(&mut ws).await["type"], "stream_chunk");
    send(&mut ws, json!({"type": "cancel", "id": "s"})).await;
    recv_until(&mut ws, "cancelled", &json!("s")).await;
    up.wait_aborted(1).await;
    send(
        &mut ws,
        json!({"type": "agent_query", "query": "x", "id": 2}),
    )
    .await;
    recv_until(&mut ws, "agent_response", &json!(2)).await;
    assert_eq!(up.connections.load(Ordering::SeqCst), 1);
}

/// `https://` upstreams: the CA from `agent.ca_file`; h2 when the server picks it by ALPN,
/// HTTP/1.1 over TLS with `http2 = "never"`; an untrusted certificate is an upstream_error.
async fn https_upstream_h2_by_alpn(backend: Backend) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let dev = ringgate::io::tls::dev_cert().expect("dev cert");
    let chain: Vec<CertificateDer> = CertificateDer::pem_slice_iter(dev.cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(dev.key_pem.as_bytes()).unwrap();
    let mut cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let up = Upstream::start_tls(Some(acceptor), |_| {
        Reply::Json(200, r#"{"content":"over tls"}"#.into())
    })
    .await;
    let ca = TempFile::new("pem", &dev.ca_pem);
    let url = format!("https://127.0.0.1:{}", up.addr.port());
    let server = Server::start_with_config(
        backend,
        &format!(
            "[agent]\nca_file = \"{}\"\nupstreams = [\"{url}\", {{ url = \"{url}/h1\", http2 = \"never\" }}]\n",
            ca.path.display()
        ),
        &[],
    );
    let mut ws = agent_ws(&server).await;
    for i in 0..2 {
        send(
            &mut ws,
            json!({"type": "agent_query", "query": "x", "id": i}),
        )
        .await;
        let msgs = recv_until(&mut ws, "agent_response", &json!(i)).await;
        assert_eq!(msgs.last().unwrap()["content"], "over tls");
    }
    let mut seen: Vec<(String, http::Version)> =
        up.seen().into_iter().map(|s| (s.path, s.version)).collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            ("/agent/query".to_string(), http::Version::HTTP_2),
            ("/h1/agent/query".to_string(), http::Version::HTTP_11),
        ]
    );

    // Without the CA the certificate is not trusted.
    let server = start(backend, &[&url]);
    let mut ws = agent_ws(&server).await;
    send(
        &mut ws,
        json!({"type": "agent_query", "query": "x", "id": "u"}),
    )
    .await;
    let e = recv_until(&mut ws, "error", &json!("u"))
        .await
        .pop()
        .unwrap();
    assert_eq!(e["code"], "upstream_error");
    assert!(e["error"].as_str().unwrap().contains("TLS"), "{e}");
}

/// A fast upstream and a client that does not read: the upstream body is read only as fast as
/// the client drains, so the connection is not closed as a slow consumer (1013) and every byte
/// arrives once the client reads.
async fn backpressure_holds_the_upstream(backend: Backend) {
    const PARTS: usize = 2000;
    let piece = "x".repeat(16 * 1024);
    let up = Upstream::start(move |_| Reply::Stream {
        content_type: "application/x-ndjson",
        parts: (0..PARTS)
            .map(|_| (0, format!("{{\"content\":\"{piece}\"}}\n").into_bytes()))
            .collect(),
        hang: false,
    })
    .await;
    // The smallest outbound limit: without backpressure a few chunks would overflow it.
    let server = Server::start_with_config(
        backend,
        &format!(
            "max_outbound_bytes = 65536\n[agent]\nupstreams = [\"{}\"]\n",
            up.url()
        ),
        &[],
    );
    let mut ws = agent_ws(&server).await;
    send(
        &mut ws,
        json!({"type": "streaming_query", "query": "big", "id": "b"}),
    )
    .await;
    // Not reading: the upstream must stall well before it has sent all 32 MiB.
    let stalled = AtomicBool::new(false);
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = up.parts_sent.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        if up.parts_sent.load(Ordering::SeqCst) == before && before < PARTS {
            stalled.store(true, Ordering::SeqCst);
            break;
        }
    }
    assert!(
        stalled.load(Ordering::SeqCst),
        "the upstream was never held back"
    );
    let mut n = 0;
    loop {
        let m = recv(&mut ws).await;
        match m["type"].as_str() {
            Some("stream_chunk") => n += 1,
            Some("stream_end") => break,
            Some("stream_start") => {}
            _ => panic!("{m}"),
        }
    }
    assert_eq!(n, PARTS);
}

/// The original product's Python client (shared/seeds): `websockets.connect`, read the
/// welcome, send a `streaming_query` without `id`, print chunks until `stream_end`.
async fn python_websockets_client(backend: Backend) {
    let up = Upstream::start(|s| match s.path.as_str() {
        "/agent/query" => Reply::Json(200, r#"{"content":"我是助手","vendor":"openai"}"#.into()),
        "/tools/calculator" => Reply::Json(200, r#"{"result":579}"#.into()),
        _ => sse(
            &[
                "data: {\"content\":\"def quick_sort(\"}\n\n",
                "data: {\"content\":\"arr):\"}\n\n",
                "data: [DONE]\n\n",
            ],
            20,
        ),
    })
    .await;
    let server = start(backend, &[&up.url()]);
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/interop/agent_client.py");
    let mut cmd = python_command();
    cmd.arg(script).arg(server.url("/ws/agent"));
    let out = run_to_exit(&mut cmd).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "python client failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("{e}: {stdout}"));
    assert_eq!(report["welcome"]["type"], "connected");
    assert_eq!(report["streamed"], "def quick_sort(arr):");
    assert_eq!(report["response"]["content"], "我是助手");
    assert_eq!(report["response"]["vendor"], "openai");
    assert_eq!(report["tool"]["result"], 579);
    assert_eq!(report["pong"]["type"], "pong");
    assert_eq!(report["cancelled"]["type"], "cancelled");
    assert!(stdout.contains("✓ Stream completed"), "{stdout}");
}

/// python3 with `websockets` (installed by .ci/run; else into the target dir, like the
/// compression interop tests).
fn python_command() -> std::process::Command {
    let target = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(|| std::path::PathBuf::from("target"));
    let deps = target.join("pydeps");
    let python = std::env::var_os("RINGGATE_PYTHON").unwrap_or_else(|| "python3".into());
    let mut cmd = std::process::Command::new(&python);
    cmd.env("PYTHONPATH", &deps)
        .env("PYTHONDONTWRITEBYTECODE", "1");
    let has = std::process::Command::new(&python)
        .env("PYTHONPATH", &deps)
        .args(["-c", "import websockets.asyncio.client"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has {
        let _ = std::process::Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "--target",
            ])
            .arg(&deps)
            .arg("websockets==17.4")
            .status();
    }
    cmd
}

/// With `[auth]`, `/ws/agent` takes a JWT like `/ws`; the token's `sub` goes upstream as `user`.
async fn authenticated_user_reaches_upstream(backend: Backend) {
    let up = Upstream::start(|_| Reply::Json(200, r#"{"content":"ok"}"#.into())).await;
    let server = Server::start_with_config(
        backend,
        &format!(
            "[auth]\njwt_secret = \"agent-test-secret-of-32-bytes-at-least\"\nrequired = true\nquery_token = true\n[agent]\nupstreams = [\"{}\"]\n",
            up.url()
        ),
        &[],
    );
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &json!({"sub": "user-7", "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(b"agent-test-secret-of-32-bytes-at-least"),
    )
    .unwrap();
    // Without a token the upgrade is refused.
    let refused = server.request(&upgrade_request_for("/ws/agent", "")).await;
    assert_eq!(refused.status, 401);
    let (mut ws, _) = within(
        "websocket connect",
        tokio_tungstenite::connect_async(server.url(&format!("/ws/agent?token={token}"))),
    )
    .await
    .expect("handshake with a token");
    assert_eq!(recv(&mut ws).await["type"], "connected");
    send(
        &mut ws,
        json!({"type": "agent_query", "query": "x", "id": 1}),
    )
    .await;
    recv_until(&mut ws, "agent_response", &json!(1)).await;
    assert_eq!(up.seen()[0].body["user"], "user-7");
}
