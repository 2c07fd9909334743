//! Body types: the server's response body (a whole one, or an upstream's streamed through),
//! and the request body sent upstream (the client's, streamed, with the route's limits).

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::{Body as HttpBody, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::upstream::Lease;
use crate::io::client::ResponseBody;

/// An idle timeout that costs nothing while data flows: activity only records the time, and
/// the timer is armed when a wait begins. Firing early (there was activity since it was
/// armed), it is re-armed for the rest. A body that is ready whenever it is polled — a small
/// response read with its head — never touches the timer wheel.
pub struct IdleTimer {
    idle: Duration,
    last: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
    /// The waker the armed timer wakes: while it is the task's, a wait that finds the timer
    /// not yet elapsed need not poll it again (a timer-wheel registration, ~150 instructions,
    /// at every wait of a streamed body).
    waker: Option<Waker>,
}

impl IdleTimer {
    pub fn new(idle: Duration) -> IdleTimer {
        IdleTimer {
            idle,
            last: Instant::now(),
            sleep: None,
            waker: None,
        }
    }

    /// Data moved.
    pub fn touch(&mut self) {
        self.last = Instant::now();
    }

    /// Waiting: `true` once `idle` has passed since the last activity, else the task is woken
    /// when it will have.
    pub fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let due = self.last + self.idle;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(due)));
        if !sleep.is_elapsed() && self.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            return false;
        }
        self.waker = Some(cx.waker().clone());
        loop {
            if sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
            if sleep.deadline() >= due {
                return true;
            }
            sleep.as_mut().reset(due);
        }
    }
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What the HTTP server sends: built-in answers are whole, proxied ones streamed.
pub enum Body {
    Full(Full<Bytes>),
    Relay(Box<Relay>),
}

impl From<Full<Bytes>> for Body {
    fn from(f: Full<Bytes>) -> Body {
        Body::Full(f)
    }
}

impl Default for Body {
    fn default() -> Body {
        Body::Full(Full::default())
    }
}

impl HttpBody for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Body::Full(f) => Pin::new(f).poll_frame(cx).map_err(|e| match e {}),
            Body::Relay(r) => Pin::new(r.as_mut()).poll_frame(cx),
        }
    }
    fn is_end_stream(&self) -> bool {
        match self {
            Body::Full(f) => f.is_end_stream(),
            Body::Relay(r) => r.inner.is_end_stream(),
        }
    }
    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Full(f) => f.size_hint(),
            Body::Relay(r) => r.inner.size_hint(),
        }
    }
}

/// Why the client's side of an exchange failed (decides the answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientFault {
    TooLarge,
    Idle,
    Gone,
}

/// Byte counters a route keeps.
#[derive(Debug, Default)]
pub struct Bytes2 {
    pub bytes_in: Cell<u64>,
    pub bytes_out: Cell<u64>,
}

/// The body sent upstream.
pub enum ReqBody {
    Empty,
    Stream(Box<Upload>),
}

pub struct Upload {
    pub metrics: Rc<super::RouteMetrics>,
    pub inner: crate::io::RequestBody,
    /// 0: no limit.
    pub limit: u64,
    pub seen: u64,
    pub fault: Rc<Cell<Option<ClientFault>>>,
    pub idle: IdleTimer,
    pub counted: Rc<Bytes2>,
}

impl HttpBody for ReqBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let u = match self.get_mut() {
            ReqBody::Empty => return Poll::Ready(None),
            ReqBody::Stream(u) => u,
        };
        match Pin::new(&mut u.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    u.seen += d.len() as u64;
                    let c = &u.counted.bytes_in;
                    c.set(c.get() + d.len() as u64);
                    if u.limit > 0 && u.seen > u.limit {
                        u.fault.set(Some(ClientFault::TooLarge));
                        return Poll::Ready(Some(
                            Err("request body over the route's limit".into()),
                        ));
                    }
                }
                u.idle.touch();
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(e))) => {
                u.fault.set(Some(ClientFault::Gone));
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if u.idle.poll_expired(cx) {
                    u.fault.set(Some(ClientFault::Idle));
                    return Poll::Ready(Some(Err("client stopped sending the body".into())));
                }
                Poll::Pending
            }
        }
    }
    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Empty => true,
            ReqBody::Stream(u) => u.inner.is_end_stream(),
        }
    }
    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Empty => SizeHint::with_exact(0),
            ReqBody::Stream(u) => u.inner.size_hint(),
        }
    }
}

/// An upstream response body on its way to the client: each wait bounded by the idle timeout,
/// the whole by the total one. At its end the connection goes back to the pool; dropped
/// before (the client went away) it closes the upstream connection.
pub struct Relay {
    pub metrics: Rc<super::RouteMetrics>,
    /// Bytes passed so far (published when the body ends or goes).
    pub sent: u64,
    pub inner: ResponseBody,
    pub lease: Option<Lease>,
    pub idle: IdleTimer,
    pub deadline: Option<Pin<Box<Sleep>>>,
    pub counted: Rc<Bytes2>,
    pub eject: (u32, Duration, usize),
    /// Logged when the body ends or goes.
    pub access: Option<super::http::Access>,
    /// The body reached its end.
    pub ended: bool,
}

impl Relay {
    fn fail(&mut self, why: &'static str) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(mut l) = self.lease.take() {
            let (after, dur, shard) = self.eject;
            l.up.failure(after, dur, shard);
            l.abort();
        }
        Poll::Ready(Some(Err(why.into())))
    }
}

impl HttpBody for Relay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let r = self.get_mut();
        if let Some(d) = r.deadline.as_mut() {
            if d.as_mut().poll(cx).is_ready() {
                return r.fail("total timeout");
            }
        }
        // The upstream connection (HTTP/1.1) is driven here, on the client's task: it reads
        // the body this polls.
        let conn = r.lease.as_mut().and_then(|l| l.held.as_mut());
        match crate::io::client::poll_body(conn, &mut r.inner, cx) {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(d) = f.data_ref() {
                    let c = &r.counted.bytes_out;
                    c.set(c.get() + d.len() as u64);
                    r.sent += d.len() as u64;
                } else if f.is_trailers() {
                    // The last frame: hyper may not poll further, and the connection is
                    // reusable as the body is dropped.
                    r.ended = true;
                    if let Some(l) = r.lease.as_mut() {
                        l.done = true;
                    }
                }
                r.idle.touch();
                Poll::Ready(Some(Ok(f)))
            }
            Poll::Ready(Some(Err(_))) => r.fail("upstream body broken"),
            Poll::Ready(None) => {
                if let Some(mut l) = r.lease.take() {
                    l.done = true;
                }
                r.ended = true;
                Poll::Ready(None)
            }
            Poll::Pending => {
                if r.idle.poll_expired(cx) {
                    return r.fail("upstream body idle timeout");
                }
                Poll::Pending
            }
        }
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        self.metrics.bytes_in.increment(self.seen);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.metrics.bytes_out.increment(self.sent);
        if let Some(a) = self.access.take() {
            a.log(self.sent, self.ended || self.inner.is_end_stream());
        }
        // A body whose end was already seen by hyper but not polled to `None` is complete.
        if self.inner.is_end_stream() {
            if let Some(l) = self.lease.as_mut() {
                l.done = true;
            }
        }
    }
}
