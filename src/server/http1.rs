//! HTTP/1.1 on a client connection, served on ringgate's own codec: [`crate::io::h1`] parses
//! the request heads and writes the response heads, [`crate::io::server_h1`] holds the socket,
//! which the request's body reads when its handler polls it. This loop reads a head, runs the
//! router's future and writes its response, on the connection's task: no dispatcher, no
//! channel for the body, one header-read timer per connection (re-armed for each head).
//!
//! Requests are answered in order; a pipelined request waits in the read buffer until the
//! response before it is written. After a response, what its handler left of the request's
//! body is read and dropped (up to [`DRAIN_LIMIT`]) or the connection closes.

use std::future::poll_fn;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::{header, HeaderMap, Method, Request, StatusCode, Version};

use super::http::Router;
use crate::io::client::{Tx, TxError};
use crate::io::h1::READ_SMALL;
use crate::io::server_h1::{Conn, Shared, Writer};
use crate::io::{h1, RequestBody, Stream};
use crate::proxy::body::IdleTimer;
use crate::ws::handle::ConnHandle;

/// The most of an unread request body read and dropped to keep the connection.
const DRAIN_LIMIT: usize = 64 * 1024;

/// How waiting for a request head ended other than with one.
enum NoHead {
    /// The client closed the connection between requests, or a drain closes it while idle.
    Closed,
    /// The header-read timeout passed, or the socket failed.
    Failed,
    Bad(h1::BadRequest),
}

/// Serves HTTP/1.1 on `io` until the connection ends: `None` when it failed (the socket is
/// dropped), else the socket and the bytes read past the last request head — for the session
/// when the router answered an upgrade (101, or a 2xx to CONNECT), else to be shut down.
pub(super) async fn serve(
    io: Stream,
    router: &Router,
    entry: &ConnHandle,
    header_timeout: Duration,
) -> Option<(Stream, Bytes)> {
    let conn = Conn::new(io);
    let mut timer = HeadTimer::new(header_timeout);
    let mut head_buf = Vec::new();
    let mut request = 0u64;
    loop {
        let head = poll_fn(|cx| next_head(&conn, &mut timer, entry, router.served(), cx)).await;
        let head = match head {
            Ok(h) => h,
            Err(NoHead::Closed) => return into_parts(conn),
            Err(NoHead::Failed) => return None,
            Err(NoHead::Bad(bad)) => {
                tracing::debug!(remote = %router.remote(), error = ?bad, "bad request head");
                let _ = answer_bad(&conn, bad, head_buf).await;
                return into_parts(conn);
            }
        };
        request += 1;
        let h1::RequestHead {
            parts,
            framing,
            keep_alive,
            expect_continue,
        } = head;
        let head_request = parts.method == Method::HEAD;
        let connect = parts.method == Method::CONNECT;
        let version = parts.version;
        let trailers = accepts_trailers(&parts.headers);
        let body = Conn::start_body(&conn, request, framing, expect_continue);
        let req = Request::from_parts(parts, RequestBody::Http1(body));

        let mut answer = router.handle(req, None);
        let resp = poll_fn(|cx| match answer.as_mut().poll(cx) {
            Poll::Ready(Ok(r)) => Poll::Ready(Some(r)),
            Poll::Pending if client_gone(&conn, cx) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        })
        .await;
        drop(answer);
        // The client went away before its answer: nothing more to do.
        let resp = resp?;

        let (parts, body) = resp.into_parts();
        let upgrade = parts.status == StatusCode::SWITCHING_PROTOCOLS
            || (connect && parts.status.is_success());
        let keep_alive = keep_alive
            && !entry.close_requested()
            && !conn.borrow().awaits_continue()
            && !says_close(&parts.headers);
        let meta = h1::ResponseMeta {
            head_request,
            version,
            keep_alive,
            body_len: hyper::body::Body::size_hint(&body).exact(),
        };
        let mut framing = h1::OutFraming::Empty;
        h1::date_now(|date| {
            framing = h1::encode_response(&mut head_buf, parts.status, &parts.headers, meta, date)
        });
        let keep_alive = keep_alive && framing != h1::OutFraming::Close;
        if upgrade {
            framing = h1::OutFraming::Empty;
        }
        let mut tx = Tx::message(head_buf, body, framing, trailers);
        let mut out = Writer(conn.clone());
        let sent = poll_fn(|cx| match tx.poll(&mut out, cx) {
            Poll::Ready(r) => Poll::Ready(Some(r)),
            Poll::Pending if client_gone(&conn, cx) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        })
        .await;
        drop(out);
        match sent {
            Some(Ok(())) => {}
            Some(Err(TxError::Io(e))) => {
                tracing::debug!(remote = %router.remote(), error = %e, "writing a response failed");
                return None;
            }
            Some(Err(TxError::Body(e))) => {
                // The head is out: the client learns of the failure by the connection's end.
                tracing::debug!(remote = %router.remote(), error = %e, "response body failed");
                return None;
            }
            None => return None,
        }
        head_buf = tx.into_buf();
        poll_fn(|cx| Conn::poll_body_released(&conn, cx)).await;
        conn.borrow_mut().end_request();
        if upgrade || !keep_alive {
            return into_parts(conn);
        }
        let mut limit = DRAIN_LIMIT;
        let drained = poll_fn(|cx| {
            let r = conn.borrow_mut().poll_drain(&mut limit, cx);
            if r.is_pending() && timer.expired(cx) {
                return Poll::Ready(false);
            }
            r
        })
        .await;
        timer.disarm();
        if !drained {
            return into_parts(conn);
        }
    }
}

/// The socket and what was read past the last head, when nothing else holds the connection
/// (a request body kept by its handler past the response would).
fn into_parts(conn: Shared) -> Option<(Stream, Bytes)> {
    let conn = std::rc::Rc::try_unwrap(conn).ok()?.into_inner();
    Some((conn.io, conn.rd.freeze()))
}

/// Polls for the next request head: parsed from what was read, or read for, under the
/// header-read timeout. A drain closes a connection idle between requests once it has served
/// one (a connection accepted just before the drain gets its first request answered).
fn next_head(
    conn: &Shared,
    timer: &mut HeadTimer,
    entry: &ConnHandle,
    served: bool,
    cx: &mut Context<'_>,
) -> Poll<Result<h1::RequestHead, NoHead>> {
    entry.register_waker(cx.waker());
    let mut c = conn.borrow_mut();
    if entry.close_requested() && served && c.rd.is_empty() {
        return Poll::Ready(Err(NoHead::Closed));
    }
    loop {
        if !c.rd.is_empty() {
            match h1::parse_request(&c.rd) {
                Ok(Some((head, n))) => {
                    c.rd.advance(n);
                    timer.disarm();
                    return Poll::Ready(Ok(head));
                }
                Ok(None) => {}
                Err(bad) => return Poll::Ready(Err(NoHead::Bad(bad))),
            }
        }
        match c.fill(READ_SMALL, cx) {
            Poll::Ready(Ok(0)) if c.rd.is_empty() => return Poll::Ready(Err(NoHead::Closed)),
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return Poll::Ready(Err(NoHead::Failed)),
            Poll::Ready(Ok(_)) => {}
            Poll::Pending => break,
        }
    }
    if timer.expired(cx) {
        tracing::debug!("request head not read in time");
        return Poll::Ready(Err(NoHead::Failed));
    }
    Poll::Pending
}

/// While the answer is on its way and the request's body is read: whether the client closed
/// the connection (or it failed). Reads what the client pipelines meanwhile, up to a head's
/// worth.
fn client_gone(conn: &Shared, cx: &mut Context<'_>) -> bool {
    let mut c = conn.borrow_mut();
    while c.body_done() && c.rd.len() <= h1::MAX_HEAD {
        match c.fill(READ_SMALL, cx) {
            Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => return true,
            Poll::Ready(Ok(_)) => {}
            Poll::Pending => break,
        }
    }
    false
}

/// Answers a request head that cannot be served, with its status and an empty body.
async fn answer_bad(conn: &Shared, bad: h1::BadRequest, mut out: Vec<u8>) -> std::io::Result<()> {
    let meta = h1::ResponseMeta {
        head_request: false,
        version: Version::HTTP_11,
        keep_alive: false,
        body_len: Some(0),
    };
    h1::date_now(|date| {
        h1::encode_response(&mut out, bad.status(), &HeaderMap::new(), meta, date);
    });
    let mut w = Writer(conn.clone());
    tokio::io::AsyncWriteExt::write_all(&mut w, &out).await?;
    tokio::io::AsyncWriteExt::flush(&mut w).await
}

/// `TE: trailers`: the client takes trailer fields in a chunked response.
fn accepts_trailers(h: &HeaderMap) -> bool {
    h.get_all(header::TE).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"trailers"))
    })
}

/// The handler's response asks for the connection to close.
fn says_close(h: &HeaderMap) -> bool {
    h.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"))
    })
}

/// The connection's one header-read timer: the time a wait for a head (or a drain) began is
/// recorded, and the one timer is armed when the wait finds nothing to read; firing early (a
/// later wait began since it was armed), it is re-armed for the rest. A head already read
/// costs no timer, and keep-alive requests do not touch the timer wheel each.
struct HeadTimer {
    timer: IdleTimer,
    waiting: bool,
}

impl HeadTimer {
    fn new(timeout: Duration) -> HeadTimer {
        HeadTimer {
            timer: IdleTimer::new(timeout),
            waiting: false,
        }
    }

    /// The wait ended (a head was read, the drain ended).
    fn disarm(&mut self) {
        self.waiting = false;
    }

    /// Waiting, with nothing to read: whether the time is up since this wait began.
    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        if !self.waiting {
            self.waiting = true;
            self.timer.touch();
        }
        self.timer.poll_expired(cx)
    }
}
