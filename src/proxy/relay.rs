//! `mode = "websocket"`: the client side is ringgate's own session (a [`Handler`]), the
//! upstream side a small WebSocket client on the upstream connection. Messages are relayed
//! with their opcode; close codes cross both ways. Each direction queues at most
//! [`QUEUE_LIMIT`] bytes (plus the message that crossed it): a full queue stops reading on the
//! side that fills it, so a slow reader on one side holds back the other.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::io::Stream;
use crate::ws::close::CloseCode;
use crate::ws::connection::{Close, Handler, Message, ToClient};
use crate::ws::frame::{parse_header, write_masked_frame, OpCode};

/// Bytes queued per direction before the side filling the queue stops reading.
pub const QUEUE_LIMIT: usize = 1 << 20;

#[derive(Debug, Clone)]
enum Msg {
    Text(Bytes),
    Binary(Bytes),
}

impl Msg {
    fn len(&self) -> usize {
        match self {
            Msg::Text(b) | Msg::Binary(b) => b.len(),
        }
    }
}

/// One direction's queue.
#[derive(Default)]
struct Queue {
    msgs: RefCell<VecDeque<Msg>>,
    bytes: Cell<usize>,
    /// The consumer, waiting for a message.
    consumer: RefCell<Option<Waker>>,
    /// The producer, waiting for room.
    producer: RefCell<Option<Waker>>,
}

impl Queue {
    fn push(&self, m: Msg) {
        self.bytes.set(self.bytes.get() + m.len());
        self.msgs.borrow_mut().push_back(m);
        wake(&self.consumer);
    }
    fn pop(&self) -> Option<Msg> {
        let m = self.msgs.borrow_mut().pop_front()?;
        self.bytes.set(self.bytes.get() - m.len());
        if self.bytes.get() < QUEUE_LIMIT {
            wake(&self.producer);
        }
        Some(m)
    }
    fn full(&self) -> bool {
        self.bytes.get() >= QUEUE_LIMIT
    }
}

fn wake(w: &RefCell<Option<Waker>>) {
    if let Some(w) = w.borrow_mut().take() {
        w.wake();
    }
}

fn park(slot: &RefCell<Option<Waker>>, cx: &Context<'_>) {
    *slot.borrow_mut() = Some(cx.waker().clone());
}

#[derive(Default)]
struct Shared {
    to_up: Queue,
    to_client: Queue,
    /// The client side ended: the code to send upstream.
    client_gone: Cell<Option<u16>>,
    /// The upstream side ended: its close code (1005 none, 1006 no close frame).
    upstream_gone: Cell<Option<u16>>,
    /// Pongs owed to the upstream.
    pongs: RefCell<Vec<Bytes>>,
}

/// What the relay keeps for its metrics and access log line.
pub struct Ends {
    pub route: Rc<super::RouteState>,
    pub lease: super::upstream::Lease,
    pub upstream: String,
    pub request_id: String,
    pub remote: std::net::SocketAddr,
    pub started: std::time::Instant,
}

/// The client session's handler.
pub struct Relay {
    shared: Rc<Shared>,
    ends: Ends,
}

impl Handler for Relay {
    fn on_message(&mut self, msg: Message<'_>, _out: &mut ToClient<'_>) -> Result<(), Close> {
        let m = match msg {
            Message::Text(t) => Msg::Text(Bytes::copy_from_slice(t)),
            Message::Binary(b) => Msg::Binary(Bytes::copy_from_slice(b)),
        };
        self.shared.to_up.push(m);
        Ok(())
    }

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.shared.to_up.full() {
            park(&self.shared.to_up.producer, cx);
            return Poll::Pending;
        }
        Poll::Ready(())
    }

    fn poll_produce(&mut self, cx: &mut Context<'_>, out: &mut ToClient<'_>) -> Result<(), Close> {
        let q = &self.shared.to_client;
        // A bounded batch per turn; the session comes back while the outbox has room.
        for _ in 0..64 {
            match q.pop() {
                Some(Msg::Text(t)) => out.text(&t),
                Some(Msg::Binary(b)) => out.binary(&b),
                None => break,
            }
        }
        if !q.msgs.borrow().is_empty() {
            cx.waker().wake_by_ref();
            return Ok(());
        }
        park(&q.consumer, cx);
        match self.shared.upstream_gone.get() {
            None => Ok(()),
            Some(code) => Err(client_close(code)),
        }
    }

    fn on_close(&mut self, code: Option<u16>) {
        self.shared.client_gone.set(Some(code.unwrap_or(1000)));
        wake(&self.shared.to_up.consumer);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // The session ended without the client's close (it vanished, a drain, an error on
        // the client side): the upstream is told the client went away.
        if self.shared.client_gone.get().is_none() {
            self.shared.client_gone.set(Some(1001));
        }
        wake(&self.shared.to_up.consumer);
        let e = &self.ends;
        ::metrics::gauge!(super::WEBSOCKETS, "route" => e.route.name.clone()).decrement(1.0);
        tracing::info!(
            target: "access",
            remote = %e.remote,
            route = %e.route.name,
            upstream = %e.upstream,
            request_id = %e.request_id,
            client_close = self.shared.client_gone.get().unwrap_or(0),
            upstream_close = self.shared.upstream_gone.get().unwrap_or(0),
            duration_ms = e.started.elapsed().as_millis() as u64,
            "relay closed"
        );
    }
}

/// The close the client gets for the upstream's: its own code where that may be sent, 1000
/// for an empty close, 1011 for a connection lost without one.
fn client_close(code: u16) -> Close {
    match code {
        1005 => Close {
            code: CloseCode(1000),
            reason: "",
        },
        1006 => Close {
            code: CloseCode(1011),
            reason: "upstream connection lost",
        },
        c if (1000..=4999).contains(&c) && !matches!(c, 1004 | 1015) => Close {
            code: CloseCode(c),
            reason: "",
        },
        _ => Close {
            code: CloseCode(1002),
            reason: "upstream sent an invalid close code",
        },
    }
}

/// The handler for the client session, and the upstream side on `io` (after its 101;
/// `leftover` are bytes read past it) to run beside it on the connection's task, so the
/// connection counts as open (for a drain) until the upstream got its close.
pub fn start(
    io: Stream,
    leftover: Bytes,
    max_message: usize,
    close_timeout: Duration,
    ends: Ends,
) -> (Relay, UpstreamSide) {
    ::metrics::gauge!(super::WEBSOCKETS, "route" => ends.route.name.clone()).increment(1.0);
    let shared = Rc::new(Shared::default());
    let side = Box::pin(upstream(
        io,
        leftover,
        shared.clone(),
        max_message,
        close_timeout,
    ));
    (Relay { shared, ends }, side)
}

/// The upstream half of a relay, to be awaited beside the client session.
pub type UpstreamSide = std::pin::Pin<Box<dyn std::future::Future<Output = ()>>>;

async fn upstream(
    io: Stream,
    leftover: Bytes,
    shared: Rc<Shared>,
    max_message: usize,
    close_timeout: Duration,
) {
    let (mut rd, mut wr) = tokio::io::split(io);
    {
        let reader = read_upstream(&mut rd, leftover, &shared, max_message);
        let writer = write_upstream(&mut wr, &shared);
        tokio::pin!(reader, writer);
        tokio::select! {
            () = &mut writer => {
                // Our close went upstream: its answer, bounded.
                let _ = tokio::time::timeout(close_timeout, &mut reader).await;
            }
            code = &mut reader => {
                shared.upstream_gone.set(Some(code));
                wake(&shared.to_client.consumer);
                // The client session closes with the upstream's code; its end lets the writer
                // echo the close upstream.
                let _ = tokio::time::timeout(close_timeout * 2, &mut writer).await;
            }
        }
    }
    let _ = wr.shutdown().await;
}

/// Reads upstream frames until its close (its code) or the connection's end (1006).
async fn read_upstream(
    rd: &mut tokio::io::ReadHalf<Stream>,
    leftover: Bytes,
    shared: &Shared,
    max_message: usize,
) -> u16 {
    let mut buf = BytesMut::from(&leftover[..]);
    let mut message: Option<(bool, BytesMut)> = None;
    loop {
        // Whole frames in the buffer first.
        loop {
            let h = match parse_header(&buf) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(_) => return 1002,
            };
            if h.mask.is_some() || h.rsv != 0 {
                return 1002;
            }
            let len = h.payload_len as usize;
            if h.payload_len > max_message as u64 {
                return 1009;
            }
            if buf.len() < h.header_len + len {
                buf.reserve(h.header_len + len - buf.len());
                break;
            }
            buf.advance(h.header_len);
            let payload = buf.split_to(len).freeze();
            match h.opcode {
                OpCode::Ping => {
                    shared.pongs.borrow_mut().push(payload);
                    wake(&shared.to_up.consumer);
                }
                OpCode::Pong => {}
                OpCode::Close => {
                    return match payload.len() {
                        0 => 1005,
                        1 => 1002,
                        _ => u16::from_be_bytes([payload[0], payload[1]]),
                    };
                }
                OpCode::Text | OpCode::Binary => {
                    if message.is_some() {
                        return 1002;
                    }
                    let text = h.opcode == OpCode::Text;
                    if h.fin {
                        if !deliver(shared, text, payload).await {
                            return 1007;
                        }
                    } else {
                        message = Some((text, BytesMut::from(&payload[..])));
                    }
                }
                OpCode::Continuation => {
                    let Some((text, mut acc)) = message.take() else {
                        return 1002;
                    };
                    if acc.len() + payload.len() > max_message {
                        return 1009;
                    }
                    acc.extend_from_slice(&payload);
                    if h.fin {
                        if !deliver(shared, text, acc.freeze()).await {
                            return 1007;
                        }
                    } else {
                        message = Some((text, acc));
                    }
                }
            }
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) | Err(_) => return 1006,
            Ok(_) => {}
        }
    }
}

/// Queues a message for the client, waiting for room first (backpressure on the upstream);
/// `false` for text that is not UTF-8.
async fn deliver(shared: &Shared, text: bool, payload: Bytes) -> bool {
    let q = &shared.to_client;
    poll_fn(|cx| {
        if q.full() && shared.client_gone.get().is_none() {
            park(&q.producer, cx);
            Poll::Pending
        } else {
            Poll::Ready(())
        }
    })
    .await;
    if text {
        if simdutf8::basic::from_utf8(&payload).is_err() {
            return false;
        }
        q.push(Msg::Text(payload));
    } else {
        q.push(Msg::Binary(payload));
    }
    true
}

enum Next {
    Data(Msg),
    Pong(Bytes),
    Close(u16),
}

/// Writes the client's messages upstream (masked), then the close.
async fn write_upstream(wr: &mut tokio::io::WriteHalf<Stream>, shared: &Shared) {
    use std::hash::{BuildHasher, Hasher};
    let mut frame = Vec::new();
    // Masking keys a page cannot predict (RFC 6455 §10.3): a per-connection random hasher
    // over a counter.
    let keys = std::collections::hash_map::RandomState::new();
    let mut n: u64 = 0;
    loop {
        let next = poll_fn(|cx| {
            if let Some(p) = shared.pongs.borrow_mut().pop() {
                return Poll::Ready(Next::Pong(p));
            }
            if let Some(m) = shared.to_up.pop() {
                return Poll::Ready(Next::Data(m));
            }
            if let Some(code) = shared.client_gone.get() {
                return Poll::Ready(Next::Close(code));
            }
            park(&shared.to_up.consumer, cx);
            Poll::Pending
        })
        .await;
        frame.clear();
        n += 1;
        let mut h = keys.build_hasher();
        h.write_u64(n);
        let mask = (h.finish() as u32).to_be_bytes();
        let close = matches!(next, Next::Close(_));
        match next {
            Next::Data(Msg::Text(t)) => {
                write_masked_frame(&mut frame, true, OpCode::Text, mask, &t)
            }
            Next::Data(Msg::Binary(b)) => {
                write_masked_frame(&mut frame, true, OpCode::Binary, mask, &b)
            }
            Next::Pong(p) => write_masked_frame(&mut frame, true, OpCode::Pong, mask, &p),
            Next::Close(code) => {
                let code = match code {
                    1005 | 1006 | 1015 => 1001,
                    c => c,
                };
                write_masked_frame(&mut frame, true, OpCode::Close, mask, &code.to_be_bytes())
            }
        }
        if wr.write_all(&frame).await.is_err() || wr.flush().await.is_err() {
            return;
        }
        if close {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_close_codes_map_to_sendable_ones() {
        assert_eq!(client_close(4001).code, CloseCode(4001));
        assert_eq!(client_close(1000).code, CloseCode(1000));
        assert_eq!(client_close(1005).code, CloseCode(1000));
        assert_eq!(client_close(1006).code, CloseCode(1011));
        assert_eq!(client_close(1015).code, CloseCode(1002));
        assert_eq!(client_close(999).code, CloseCode(1002));
    }

    #[test]
    fn a_queue_wakes_its_producer_below_the_limit() {
        let q = Queue::default();
        q.push(Msg::Binary(Bytes::from(vec![0; QUEUE_LIMIT])));
        assert!(q.full());
        assert!(q.pop().is_some());
        assert!(!q.full());
        assert_eq!(q.bytes.get(), 0);
    }
}
