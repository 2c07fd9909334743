//! HTTP/2 connections (ALPN `h2`, or prior knowledge on an `h2c` listener), served with the
//! `h2` crate: the connection's task drives the connection; each request is a stream with a
//! task of its own that waits for its answer and sends it, within the stream's flow-control
//! window. A WebSocket (an extended CONNECT, RFC 8441) accepted with a 2xx gets the stream's
//! two halves as its [`Stream`]: the session writes its frames into the stream's `SendStream`
//! itself (src/io/http2.rs), with no task or channel of hyper's between them (bench/H2.md).
//!
//! What hyper's HTTP/2 server did around `h2` and this module does in its place: keep-alive
//! PINGs, GOAWAY on drain, dropping connection-specific headers from responses, `date` and
//! `content-length` on responses, and answering a stream the client reset with nothing more.

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use h2::server::SendResponse;
use h2::{Ping, PingPong, Reason, SendStream};
use http::{header, HeaderMap, HeaderValue, Method, Request, Response};
use hyper::body::Body as _;
use tokio::time::{sleep, Instant, Sleep};

use super::config::Http2;
use super::fallback::AnyBody;
use crate::io::{RequestBody, Stream};
use crate::ws::handle::ConnHandle;

/// What runs on an accepted WebSocket's stream once its 2xx is sent (it spawns the session's
/// task).
pub type OnStream = Box<dyn FnOnce(Stream)>;

/// The answer to one request.
pub struct Answer {
    pub response: Response<AnyBody>,
    /// For an accepted extended CONNECT: what the stream becomes.
    pub websocket: Option<OnStream>,
}

/// Answers requests: the router, for each stream.
pub type Handler =
    std::rc::Rc<dyn Fn(Request<RequestBody>) -> Pin<Box<dyn Future<Output = Answer>>>>;

/// Serves an HTTP/2 connection until it ends. A drain (`entry.close_requested()`) sends
/// GOAWAY and lets the streams in flight finish; a connection without a request within
/// `first_request` is dropped (slowloris).
pub async fn serve(
    conn: Stream,
    c: &Http2,
    first_request: Duration,
    entry: &ConnHandle,
    remote: SocketAddr,
    handler: Handler,
) {
    let mut builder = h2::server::Builder::new();
    builder
        .enable_connect_protocol()
        .max_concurrent_streams(c.max_concurrent_streams)
        .initial_window_size(c.initial_stream_window_size)
        .initial_connection_window_size(c.initial_connection_window_size)
        .max_frame_size(c.max_frame_size)
        .max_header_list_size(c.max_header_list_size)
        .max_send_buffer_size(c.max_send_buf_size)
        .max_pending_accept_reset_streams(c.max_pending_accept_reset_streams)
        .max_local_error_reset_streams(Some(c.max_local_error_reset_streams));
    let mut deadline = pin!(sleep(first_request));
    let mut handshake = builder.handshake::<_, Bytes>(conn);
    let conn = poll_fn(|cx| {
        if deadline.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Pin::new(&mut handshake).poll(cx).map(Some)
    })
    .await;
    let mut conn = match conn {
        Some(Ok(conn)) => conn,
        Some(Err(e)) => {
            tracing::debug!(%remote, error = %e, "http2 handshake failed");
            return;
        }
        None => {
            tracing::debug!(%remote, "no HTTP/2 preface within the handshake timeout");
            return;
        }
    };
    let mut keep_alive = c.keep_alive_interval().and_then(|interval| {
        let ping = conn.ping_pong()?;
        Some(KeepAlive::new(ping, interval, c.keep_alive_timeout()))
    });
    let (mut served, mut shutting_down) = (false, false);
    let res = poll_fn(|cx| {
        entry.register_waker(cx.waker());
        if !shutting_down && entry.close_requested() {
            shutting_down = true;
            conn.graceful_shutdown();
        }
        if !served && deadline.as_mut().poll(cx).is_ready() {
            tracing::debug!(%remote, "no HTTP/2 request within the handshake timeout");
            return Poll::Ready(Ok(()));
        }
        if keep_alive.as_mut().is_some_and(|k| k.timed_out(cx)) {
            tracing::debug!(%remote, "HTTP/2 keep-alive PING not answered");
            keep_alive = None;
            conn.abrupt_shutdown(Reason::NO_ERROR);
        }
        loop {
            match std::task::ready!(conn.poll_accept(cx)) {
                Some(Ok((req, respond))) => {
                    served = true;
                    tokio::task::spawn_local(stream(req, respond, handler.clone()));
                }
                Some(Err(e)) => return Poll::Ready(Err(e)),
                None => return Poll::Ready(Ok(())),
            }
        }
    })
    .await;
    if let Err(e) = res {
        tracing::debug!(%remote, error = %e, "http2 connection error");
    }
}

/// One request's stream: its answer, then its body or the WebSocket it becomes.
async fn stream(req: Request<h2::RecvStream>, mut respond: SendResponse<Bytes>, handler: Handler) {
    let (parts, recv) = req.into_parts();
    // A CONNECT's stream is the tunnel's (RFC 9113 §8.5, RFC 8441): it carries no body.
    let (body, tunnel) = if parts.method == Method::CONNECT {
        (RequestBody::Empty, Some(recv))
    } else {
        let length = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse().ok());
        (RequestBody::Http2(recv, length), None)
    };
    let mut answer = handler(Request::from_parts(parts, body));
    // A client that resets the stream before the answer is ready gets nothing more.
    let answer = poll_fn(|cx| {
        if respond.poll_reset(cx).is_ready() {
            return Poll::Ready(None);
        }
        answer.as_mut().poll(cx).map(Some)
    })
    .await;
    let Some(Answer {
        response,
        websocket,
    }) = answer
    else {
        return;
    };
    // The stream keeps the waker it was last polled with: this task's, whose memory would stay
    // with every idle WebSocket until its first write (1.2 KB each, by tests/http2.rs).
    let _ = respond.poll_reset(&mut Context::from_waker(std::task::Waker::noop()));
    let (mut head, body) = response.into_parts();
    strip_connection_headers(&mut head.headers);
    if let Ok(date) = HeaderValue::from_str(&httpdate::fmt_http_date(std::time::SystemTime::now()))
    {
        head.headers.entry(header::DATE).or_insert(date);
    }
    if let (Some(on_stream), Some(recv)) = (websocket, tunnel) {
        if head.status.is_success() {
            head.headers.remove(header::CONTENT_LENGTH);
            match respond.send_response(Response::from_parts(head, ()), false) {
                Ok(send) => on_stream(Stream::h2(send, recv)),
                Err(e) => tracing::debug!(error = %e, "HTTP/2 stream gone before its 200"),
            }
            return;
        }
    }
    let end = body.is_end_stream();
    if !end {
        if let Some(len) = body.size_hint().exact() {
            head.headers
                .entry(header::CONTENT_LENGTH)
                .or_insert_with(|| HeaderValue::from(len));
        }
    }
    match respond.send_response(Response::from_parts(head, ()), end) {
        Ok(send) if !end => pipe(body, send).await,
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "HTTP/2 response not sent"),
    }
}

/// Sends `body` on the stream as its DATA (and trailers), within the stream's window, ending
/// the stream on the last piece when the body knows it is the last; stops when the client
/// resets the stream (an event stream it no longer wants).
async fn pipe(body: AnyBody, mut send: SendStream<Bytes>) {
    let mut body = pin!(body);
    let mut pending = Bytes::new();
    poll_fn(|cx| loop {
        if send.poll_reset(cx).is_ready() {
            return Poll::Ready(());
        }
        if !pending.is_empty() {
            if send.capacity() == 0 {
                send.reserve_capacity(pending.len());
                match send.poll_capacity(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Some(Ok(_))) => continue,
                    Poll::Ready(_) => return Poll::Ready(()),
                }
            }
            let n = send.capacity().min(pending.len());
            let chunk = pending.split_to(n);
            // The body's last piece carries END_STREAM: no empty DATA frame after it.
            let last = pending.is_empty() && body.is_end_stream();
            if send.send_data(chunk, last).is_err() || last {
                return Poll::Ready(());
            }
            continue;
        }
        match std::task::ready!(body.as_mut().poll_frame(cx)) {
            None => {
                let _ = send.send_data(Bytes::new(), true);
                return Poll::Ready(());
            }
            Some(Err(e)) => {
                tracing::debug!(error = %e, "HTTP/2 response body failed");
                send.send_reset(Reason::INTERNAL_ERROR);
                return Poll::Ready(());
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(mut data) => pending = data.copy_to_bytes(data.remaining()),
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        let _ = send.send_trailers(trailers);
                        return Poll::Ready(());
                    }
                }
            },
        }
    })
    .await
}

/// Headers that name a hop on HTTP/1.1 and are malformed in HTTP/2 (RFC 9113 §8.2.2), and
/// those a `Connection` header names.
fn strip_connection_headers(headers: &mut HeaderMap) {
    if let Some(named) = headers.remove(header::CONNECTION) {
        if let Ok(named) = named.to_str() {
            for name in named.split(',') {
                headers.remove(name.trim());
            }
        }
    }
    for name in [
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::TE,
        header::HeaderName::from_static("keep-alive"),
        header::HeaderName::from_static("proxy-connection"),
    ] {
        headers.remove(name);
    }
}

/// PINGs every `interval`, whatever the connection does; an answer not back within `timeout`
/// ends the connection.
struct KeepAlive {
    ping: PingPong,
    interval: Duration,
    timeout: Duration,
    timer: Pin<Box<Sleep>>,
    waiting: bool,
}

impl KeepAlive {
    fn new(ping: PingPong, interval: Duration, timeout: Duration) -> KeepAlive {
        KeepAlive {
            ping,
            interval,
            timeout,
            timer: Box::pin(sleep(interval)),
            waiting: false,
        }
    }

    fn timed_out(&mut self, cx: &mut Context<'_>) -> bool {
        loop {
            if self.waiting {
                match self.ping.poll_pong(cx) {
                    Poll::Ready(Ok(_)) => {
                        self.waiting = false;
                        self.timer.as_mut().reset(Instant::now() + self.interval);
                    }
                    // The connection is ending: `poll_accept` says how.
                    Poll::Ready(Err(_)) => return false,
                    Poll::Pending => {}
                }
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return false;
            }
            if self.waiting {
                return true;
            }
            if self.ping.send_ping(Ping::opaque()).is_err() {
                return false;
            }
            self.waiting = true;
            self.timer.as_mut().reset(Instant::now() + self.timeout);
        }
    }
}
