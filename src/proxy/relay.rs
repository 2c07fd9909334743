//! `mode = "websocket"`: the client side is ringgate's own session (a [`Handler`]), the
//! upstream side a small WebSocket client on the upstream connection. Messages are relayed
//! with their opcode; close codes cross both ways. Each direction queues at most
//! [`QUEUE_LIMIT`] bytes (plus one read's worth): a full queue stops reading on the side that
//! fills it, so a slow reader on one side holds back the other.
//!
//! Per message the relay does no allocation and no system call of its own: the client's
//! messages are masked straight into one buffer of upstream frames, which goes out in one
//! write per wake-up; the upstream's frames are read into a per-shard scratch buffer (only an
//! incomplete frame is kept) and their payloads queued back to back for the client session,
//! which sends a batch as one vectored write. An idle relay holds no read buffer. The two
//! sides run on the connection's one task and never wake it for each other
//! ([`UpstreamSide::beside`]).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::io::Stream;
use crate::ws::close::CloseCode;
use crate::ws::connection::{Close, Handler, Message, ToClient};
use crate::ws::frame::{parse_header, write_masked_frame, OpCode};
use crate::ws::session::read_into;

/// Bytes queued per direction before the side filling the queue stops reading.
pub const QUEUE_LIMIT: usize = 1 << 20;
/// Size of the per-shard buffer every relay reads its upstream into.
const SCRATCH: usize = 64 * 1024;
/// Reads per wake-up before yielding to other connections (fairness).
const READ_BUDGET: usize = 8;
/// Queue capacity kept once a queue is drained; more is given back (idle relays stay small).
const KEEP: usize = 512;

thread_local! {
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH].into_boxed_slice());
}

/// Runs `f` on the shard's scratch buffer (the tunnel reads through it too).
pub(super) fn with_scratch<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    SCRATCH_BUF.with(|scratch| f(&mut scratch.borrow_mut()[..]))
}

/// Empties `v`, giving its memory back when it grew past [`KEEP`].
fn reset(v: &mut Vec<u8>) {
    if v.capacity() > KEEP {
        *v = Vec::new();
    } else {
        v.clear();
    }
}

/// Client to upstream: whole masked frames, ready to be written.
#[derive(Default)]
struct ToUpstream {
    frames: RefCell<Vec<u8>>,
    /// Masking keys a page cannot predict (RFC 6455 §10.3): a per-connection random hasher
    /// over a counter.
    keys: std::collections::hash_map::RandomState,
    count: Cell<u64>,
    /// The upstream writer has frames to take.
    consumer_due: Cell<bool>,
    /// The client session has room again.
    producer_due: Cell<bool>,
}

impl ToUpstream {
    fn mask(&self) -> [u8; 4] {
        use std::hash::{BuildHasher, Hasher};
        self.count.set(self.count.get() + 1);
        let mut h = self.keys.build_hasher();
        h.write_u64(self.count.get());
        (h.finish() as u32).to_be_bytes()
    }

    fn push(&self, opcode: OpCode, payload: &[u8]) {
        let mask = self.mask();
        write_masked_frame(&mut self.frames.borrow_mut(), true, opcode, mask, payload);
        self.consumer_due.set(true);
    }

    fn full(&self) -> bool {
        self.frames.borrow().len() >= QUEUE_LIMIT
    }

    /// Swaps the queued frames into `out` (written out, so empty); its memory is reused.
    fn take(&self, out: &mut Vec<u8>) {
        let mut frames = self.frames.borrow_mut();
        // The session stops reading only at the limit: only then is it due again.
        if frames.len() >= QUEUE_LIMIT {
            self.producer_due.set(true);
        }
        std::mem::swap(&mut *frames, out);
        reset(&mut frames);
    }
}

/// Upstream to client: the messages' payloads back to back, and each one's kind and length.
#[derive(Default)]
struct ToClientQueue {
    data: RefCell<Vec<u8>>,
    /// Bytes at the front of `data` already taken.
    head: Cell<usize>,
    /// Each message: whether it is text, its length.
    msgs: RefCell<VecDeque<(bool, usize)>>,
    /// The client session has messages to take.
    consumer_due: Cell<bool>,
    /// The upstream reader has room again.
    producer_due: Cell<bool>,
}

impl ToClientQueue {
    fn push(&self, text: bool, payload: &[u8]) {
        let mut data = self.data.borrow_mut();
        // Taken bytes go once they are the larger part (the queue never grows past twice its
        // limit, however the two sides interleave).
        let head = self.head.get();
        if head > 0 && head >= data.len() - head {
            data.drain(..head);
            self.head.set(0);
        }
        data.extend_from_slice(payload);
        self.msgs.borrow_mut().push_back((text, payload.len()));
        self.consumer_due.set(true);
    }

    fn bytes(&self) -> usize {
        self.data.borrow().len() - self.head.get()
    }

    fn full(&self) -> bool {
        self.bytes() >= QUEUE_LIMIT
    }

    fn is_empty(&self) -> bool {
        self.msgs.borrow().is_empty()
    }

    /// Hands up to `max` messages to `send`.
    fn take(&self, max: usize, mut send: impl FnMut(bool, &[u8])) {
        // The upstream reader stops only at the limit: only then is it due again.
        let was_full = self.full();
        let mut data = self.data.borrow_mut();
        let mut msgs = self.msgs.borrow_mut();
        let mut head = self.head.get();
        for _ in 0..max {
            let Some((text, len)) = msgs.pop_front() else {
                break;
            };
            send(text, &data[head..head + len]);
            head += len;
        }
        if msgs.is_empty() {
            head = 0;
            reset(&mut data);
        }
        self.head.set(head);
        if was_full && data.len() - head < QUEUE_LIMIT {
            self.producer_due.set(true);
        }
    }
}

#[derive(Default)]
struct Shared {
    to_up: ToUpstream,
    to_client: ToClientQueue,
    /// The client side ended: the code to send upstream.
    client_gone: Cell<Option<u16>>,
    /// The upstream side ended: its close code (1005 none, 1006 no close frame).
    upstream_gone: Cell<Option<u16>>,
}

impl Shared {
    /// Whether the client session has work the upstream side left it (taking the mark).
    fn take_client_due(&self) -> bool {
        self.to_client.consumer_due.replace(false) | self.to_up.producer_due.replace(false)
    }

    /// Whether the upstream side has work the client session left it (taking the mark).
    fn take_upstream_due(&self) -> bool {
        self.to_up.consumer_due.replace(false) | self.to_client.producer_due.replace(false)
    }
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
        match msg {
            Message::Text(t) => self.shared.to_up.push(OpCode::Text, t),
            Message::Binary(b) => self.shared.to_up.push(OpCode::Binary, b),
        }
        Ok(())
    }

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<()> {
        // Polled again once the upstream writer takes the queue (`beside`).
        if self.shared.to_up.full() {
            return Poll::Pending;
        }
        Poll::Ready(())
    }

    fn poll_produce(&mut self, cx: &mut Context<'_>, out: &mut ToClient<'_>) -> Result<(), Close> {
        let q = &self.shared.to_client;
        // A bounded batch per turn; the session comes back while the outbox has room.
        q.take(64, |text, payload| {
            if text {
                out.text(payload)
            } else {
                out.binary(payload)
            }
        });
        if !q.is_empty() {
            cx.waker().wake_by_ref();
            return Ok(());
        }
        match self.shared.upstream_gone.get() {
            None => Ok(()),
            Some(code) => Err(client_close(code)),
        }
    }

    fn on_close(&mut self, code: Option<u16>) {
        self.shared.client_gone.set(Some(code.unwrap_or(1000)));
        self.shared.to_up.consumer_due.set(true);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        // The session ended without the client's close (it vanished, a drain, an error on
        // the client side): the upstream is told the client went away.
        if self.shared.client_gone.get().is_none() {
            self.shared.client_gone.set(Some(1001));
        }
        self.shared.to_up.consumer_due.set(true);
        let e = &self.ends;
        e.route.metrics.websockets.decrement(1.0);
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
/// `leftover` are bytes read past it) to run beside it on the connection's task
/// ([`UpstreamSide::beside`]), so the connection counts as open (for a drain) until the
/// upstream got its close.
pub fn start(
    io: Stream,
    leftover: Bytes,
    max_message: usize,
    close_timeout: Duration,
    ends: Ends,
) -> (Relay, UpstreamSide) {
    ends.route.metrics.websockets.increment(1.0);
    let shared = Rc::new(Shared::default());
    let mut side = Upstream {
        io,
        shared: shared.clone(),
        max_message,
        partial: BytesMut::new(),
        message: None,
        out: Vec::new(),
        written: 0,
        unflushed: false,
        close_queued: false,
    };
    let early = side.input(&leftover).err();
    let upstream = UpstreamSide {
        shared: shared.clone(),
        run: Box::pin(side.run(early, close_timeout)),
    };
    (Relay { shared, ends }, upstream)
}

/// Rounds of one side making work for the other per wake-up before yielding (fairness).
const ROUNDS: usize = 4;

/// The upstream half of a relay, to be run beside the client session.
pub struct UpstreamSide {
    shared: Rc<Shared>,
    run: Pin<Box<dyn Future<Output = ()>>>,
}

impl UpstreamSide {
    /// Runs the client `session` (whose handler is this relay's [`Relay`]) and the upstream
    /// side together to both their ends; the session's output.
    ///
    /// Both run on one task, so neither wakes the task for the other: a side that leaves work
    /// for the other (a message queued, room made, its end) marks it due, and each wake-up
    /// polls both and then the marked one again until none is. A wake-up through the task's
    /// waker (a socket, a timer) costs a scheduling round trip and a poll of both sides, and
    /// would come once per message each way.
    pub async fn beside<F: Future>(self, session: F) -> F::Output {
        let UpstreamSide { shared, mut run } = self;
        let mut session = std::pin::pin!(session);
        let (mut out, mut upstream_done) = (None, false);
        poll_fn(|cx| {
            // A wake-up through the task's waker may be for either side: both are polled.
            let (mut client_due, mut upstream_due) = (true, true);
            for _ in 0..ROUNDS {
                // A side's marks are served by the poll that follows them. The upstream side
                // goes first: its poll is the cheaper one (a plain read that would block costs
                // a readiness check, the session's a TLS read and its bookkeeping), so the
                // order that polls the session once per wake-up of either socket wins.
                if upstream_due && !upstream_done {
                    shared.take_upstream_due();
                    upstream_done = run.as_mut().poll(cx).is_ready();
                }
                client_due |= shared.take_client_due();
                if client_due && out.is_none() {
                    if let Poll::Ready(o) = session.as_mut().poll(cx) {
                        out = Some(o);
                    }
                }
                client_due = shared.take_client_due() && out.is_none();
                upstream_due = shared.take_upstream_due() && !upstream_done;
                if !client_due && !upstream_due {
                    break;
                }
            }
            if client_due || upstream_due {
                cx.waker().wake_by_ref();
            }
            match out.take() {
                Some(o) if upstream_done => Poll::Ready(o),
                o => {
                    out = o;
                    Poll::Pending
                }
            }
        })
        .await
    }
}

/// The upstream connection's side of a relay.
struct Upstream {
    io: Stream,
    shared: Rc<Shared>,
    max_message: usize,
    /// An incomplete frame, held until the rest arrives (empty, and without memory, otherwise).
    partial: BytesMut,
    /// A fragmented message being put together: whether it is text, its bytes so far.
    message: Option<(bool, Vec<u8>)>,
    /// Frames being written; `written` of them are.
    out: Vec<u8>,
    written: usize,
    /// A write may still be buffered in the stream (TLS, io_uring write-behind).
    unflushed: bool,
    /// Our close frame is in `out`: nothing more goes after it.
    close_queued: bool,
}

enum Ended {
    /// Our close frame was written (or writing failed).
    Wrote,
    /// The upstream's close frame came, with this code (1006: the connection ended).
    Read(u16),
}

impl Upstream {
    /// `early`: the code the bytes read past the upstream's 101 already ended with.
    async fn run(mut self, early: Option<u16>, close_timeout: Duration) {
        let ended = match early {
            Some(code) => Ended::Read(code),
            None => {
                poll_fn(|cx| {
                    if self.poll_write(cx).is_ready() {
                        return Poll::Ready(Ended::Wrote);
                    }
                    self.poll_read(cx).map(Ended::Read)
                })
                .await
            }
        };
        let shared = self.shared.clone();
        match ended {
            Ended::Wrote => {
                // Our close went upstream: its answer, bounded.
                let code = tokio::time::timeout(close_timeout, poll_fn(|cx| self.poll_read(cx)))
                    .await
                    .unwrap_or(1006);
                // A client still there (the write failed) is told the upstream is gone.
                if shared.upstream_gone.get().is_none() {
                    shared.upstream_gone.set(Some(code));
                    shared.to_client.consumer_due.set(true);
                }
            }
            Ended::Read(code) => {
                shared.upstream_gone.set(Some(code));
                shared.to_client.consumer_due.set(true);
                // The client session closes with the upstream's code; its end lets the writer
                // echo the close upstream.
                let _ = tokio::time::timeout(close_timeout * 2, poll_fn(|cx| self.poll_write(cx)))
                    .await;
            }
        }
        let _ = poll_fn(|cx| Pin::new(&mut self.io).poll_shutdown(cx)).await;
    }

    /// Writes the client's frames upstream, all that are queued in one write; `Ready` once our
    /// close frame is written or writing failed.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            while self.written < self.out.len() {
                match Pin::new(&mut self.io).poll_write(cx, &self.out[self.written..]) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(()),
                    Poll::Ready(Ok(n)) => {
                        self.written += n;
                        self.unflushed = true;
                    }
                }
            }
            if self.unflushed {
                match Pin::new(&mut self.io).poll_flush(cx) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(_)) => return Poll::Ready(()),
                    Poll::Ready(Ok(())) => self.unflushed = false,
                }
            }
            if self.close_queued {
                return Poll::Ready(());
            }
            self.written = 0;
            reset(&mut self.out);
            let to_up = &self.shared.to_up;
            to_up.take(&mut self.out);
            if !self.out.is_empty() {
                continue;
            }
            // Everything the client sent is upstream: its close goes last.
            let Some(code) = self.shared.client_gone.get() else {
                return Poll::Pending;
            };
            let code = match code {
                1005 | 1006 | 1015 => 1001,
                c => c,
            };
            let mask = to_up.mask();
            write_masked_frame(
                &mut self.out,
                true,
                OpCode::Close,
                mask,
                &code.to_be_bytes(),
            );
            self.close_queued = true;
        }
    }

    /// Reads upstream frames; `Ready` with the upstream's close code, or 1006 when the
    /// connection ended without one (or a code of ours for a protocol error).
    fn poll_read(&mut self, cx: &mut Context<'_>) -> Poll<u16> {
        let shared = self.shared.clone();
        let q = &shared.to_client;
        for _ in 0..READ_BUDGET {
            // Backpressure: a full queue for a client still there stops reading.
            if q.full() && shared.client_gone.get().is_none() {
                return Poll::Pending;
            }
            let got = if self.partial.is_empty() {
                self.read_scratch(cx)
            } else {
                self.read_partial(cx)
            };
            match got {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(code)) => return Poll::Ready(code),
                Poll::Ready(Ok(())) => {}
            }
        }
        // Budget used up with data still coming: come back after others had their turn.
        cx.waker().wake_by_ref();
        Poll::Pending
    }

    /// Reads into the shard's scratch buffer; whole frames are handled in place.
    fn read_scratch(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), u16>> {
        with_scratch(|scratch| {
            let mut rb = ReadBuf::new(scratch);
            match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
                Poll::Pending => Poll::Pending,
                Poll::Ready(Err(_)) => Poll::Ready(Err(1006)),
                Poll::Ready(Ok(())) if rb.filled().is_empty() => Poll::Ready(Err(1006)),
                Poll::Ready(Ok(())) => Poll::Ready(self.input(rb.filled())),
            }
        })
    }

    /// Reads the rest of an incomplete frame straight into where it is held.
    fn read_partial(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), u16>> {
        let held = self.partial.len();
        // The frame's size, once its header is here (a header is at most 14 bytes).
        let want = match parse_header(&self.partial) {
            Ok(Some(h)) => (h.header_len + h.payload_len as usize).saturating_sub(held),
            _ => 14,
        }
        .max(1);
        self.partial.reserve(want);
        match read_into(&mut self.io, cx, &mut self.partial, want) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(0) | Err(_)) => return Poll::Ready(Err(1006)),
            Poll::Ready(Ok(_)) => {}
        }
        let used = frames(
            &self.shared,
            &mut self.message,
            self.max_message,
            &self.partial,
        )?;
        self.partial.advance(used);
        if self.partial.is_empty() {
            self.partial = BytesMut::new();
        }
        Poll::Ready(Ok(()))
    }

    /// Handles the whole frames in `bytes` and keeps an incomplete one (`partial` is empty).
    fn input(&mut self, bytes: &[u8]) -> Result<(), u16> {
        let used = frames(&self.shared, &mut self.message, self.max_message, bytes)?;
        self.partial.extend_from_slice(&bytes[used..]);
        Ok(())
    }
}

/// Passes the whole frames at the start of `buf` on; returns the bytes they took, or the code
/// the upstream side ends with.
fn frames(
    shared: &Shared,
    message: &mut Option<(bool, Vec<u8>)>,
    max_message: usize,
    buf: &[u8],
) -> Result<usize, u16> {
    let mut at = 0;
    loop {
        let rest = &buf[at..];
        let h = match parse_header(rest) {
            Ok(Some(h)) => h,
            Ok(None) => return Ok(at),
            Err(_) => return Err(1002),
        };
        if h.mask.is_some() || h.rsv != 0 {
            return Err(1002);
        }
        if h.payload_len > max_message as u64 {
            return Err(1009);
        }
        let end = h.header_len + h.payload_len as usize;
        if rest.len() < end {
            return Ok(at);
        }
        let payload = &rest[h.header_len..end];
        at += end;
        match h.opcode {
            OpCode::Ping => shared.to_up.push(OpCode::Pong, payload),
            OpCode::Pong => {}
            OpCode::Close => {
                return Err(match payload {
                    [] => 1005,
                    [_] => 1002,
                    [a, b, ..] => u16::from_be_bytes([*a, *b]),
                });
            }
            OpCode::Text | OpCode::Binary => {
                if message.is_some() {
                    return Err(1002);
                }
                let text = h.opcode == OpCode::Text;
                if h.fin {
                    deliver(shared, text, payload)?;
                } else {
                    *message = Some((text, payload.to_vec()));
                }
            }
            OpCode::Continuation => {
                let Some((_, acc)) = message.as_mut() else {
                    return Err(1002);
                };
                if acc.len() + payload.len() > max_message {
                    return Err(1009);
                }
                acc.extend_from_slice(payload);
                if h.fin {
                    if let Some((text, acc)) = message.take() {
                        deliver(shared, text, &acc)?;
                    }
                }
            }
        }
    }
}

/// Queues a message for the client; 1007 for text that is not UTF-8.
fn deliver(shared: &Shared, text: bool, payload: &[u8]) -> Result<(), u16> {
    if text && simdutf8::basic::from_utf8(payload).is_err() {
        return Err(1007);
    }
    shared.to_client.push(text, payload);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    #[test]
    fn upstream_close_codes_map_to_sendable_ones() {
        assert_eq!(client_close(4001).code, CloseCode(4001));
        assert_eq!(client_close(1000).code, CloseCode(1000));
        assert_eq!(client_close(1005).code, CloseCode(1000));
        assert_eq!(client_close(1006).code, CloseCode(1011));
        assert_eq!(client_close(1015).code, CloseCode(1002));
        assert_eq!(client_close(999).code, CloseCode(1002));
    }

    /// Counts wake-ups.
    struct Wakes(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn the_two_sides_hand_work_over_without_waking_the_task() {
        let shared = Rc::new(Shared::default());
        // The upstream side: takes the client's frames and answers each batch with a message.
        let (s, taken) = (shared.clone(), Rc::new(Cell::new(0)));
        let t = taken.clone();
        let run = Box::pin(poll_fn(move |_| {
            let mut out = Vec::new();
            s.to_up.take(&mut out);
            if !out.is_empty() {
                t.set(t.get() + 1);
                s.to_client.push(true, b"answer");
            }
            Poll::<()>::Pending
        }));
        let side = UpstreamSide {
            shared: shared.clone(),
            run,
        };
        // The client session: sends one message, then waits for the answer.
        let s = shared.clone();
        let session = poll_fn(move |_| {
            if s.to_up.count.get() == 0 {
                s.to_up.push(OpCode::Text, b"question");
            }
            let mut got = None;
            s.to_client.take(1, |_, p| got = Some(p.to_vec()));
            match got {
                Some(p) => Poll::Ready(p),
                None => Poll::Pending,
            }
        });
        let wakes = std::sync::Arc::new(Wakes(Default::default()));
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut both = std::pin::pin!(side.beside(session));
        // One poll: the question goes upstream, the answer comes back to the session, and
        // the session ends; the upstream side (still running) keeps the whole pending.
        assert!(both.as_mut().poll(&mut cx).is_pending());
        assert_eq!(taken.get(), 1);
        assert!(shared.to_client.is_empty(), "the session took the answer");
        assert_eq!(wakes.0.load(std::sync::atomic::Ordering::SeqCst), 0);
    }

    #[test]
    fn a_queue_marks_its_producer_due_below_the_limit() {
        let q = ToClientQueue::default();
        q.push(false, &vec![0; QUEUE_LIMIT]);
        assert!(q.full());
        let mut got = Vec::new();
        q.take(1, |text, p| got.push((text, p.len())));
        assert_eq!(got, [(false, QUEUE_LIMIT)]);
        assert!(!q.full());
        assert!(q.producer_due.get(), "the upstream reader is marked due");
        assert_eq!(q.bytes(), 0);
        assert_eq!(
            q.data.borrow().capacity(),
            0,
            "a drained queue holds no memory"
        );
    }

    #[test]
    fn a_queue_taken_in_part_reclaims_the_taken_bytes() {
        let q = ToClientQueue::default();
        for i in 0..4u8 {
            q.push(i % 2 == 0, &[i; 100]);
        }
        let mut got = Vec::new();
        q.take(3, |text, p| got.push((text, p.to_vec())));
        assert_eq!(got.len(), 3);
        assert_eq!(got[1], (false, vec![1; 100]));
        // Taken bytes go before new ones are added once they are the larger part.
        q.push(false, &[4; 100]);
        assert_eq!(q.data.borrow().len(), 200);
        got.clear();
        q.take(64, |text, p| got.push((text, p.to_vec())));
        assert_eq!(got, [(false, vec![3; 100]), (false, vec![4; 100])]);
        assert!(q.is_empty());
    }
}
