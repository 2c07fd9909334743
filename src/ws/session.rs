//! Drives one WebSocket connection: reads into the shard's scratch buffer, parses frames in
//! place, hands messages to a [`Handler`], and flushes everything queued as one vectored write
//! per wake-up. Also heartbeats, the close handshake and lingering close.
//!
//! Memory: an idle connection holds no read buffer here (bytes are read into a per-shard
//! scratch buffer and only an incomplete frame is copied out), and its outbound buffer is freed
//! once it has been idle for a heartbeat period.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::{Instant, Sleep};

use super::close::CloseCode;
use super::deflate::{ConnDeflate, InflateError, Params, Tuning};
use super::frame::OpCode;
use super::handle::ConnHandle;
use super::mailbox::{Mailbox, Outgoing, Takes};
use super::outbox::{Outbox, WriteOutbox};
use super::reader::{Event, Flow, ReadError, Reader};
use crate::metrics::Traffic;

/// Size of the per-shard buffer every connection reads into.
const SCRATCH: usize = 64 * 1024;
/// Reads per wake-up before yielding to other connections (fairness).
const READ_BUDGET: usize = 8;
/// Stop reading from a client while this much output waits for it (echo backpressure).
const HIGH_WATER: usize = 256 * 1024;

thread_local! {
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH].into_boxed_slice());
}

/// A complete data message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    /// Valid UTF-8.
    Text(&'a [u8]),
    Binary(&'a [u8]),
}

/// A request to close the connection with this code and reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Close {
    pub code: CloseCode,
    pub reason: &'static str,
}

/// What an endpoint does with a connection's messages.
pub trait Handler {
    /// The session starts; a greeting goes to `out`.
    fn on_open(&mut self, _out: &mut Sink<'_>) {}

    /// A complete message arrived; replies go to `out`.
    fn on_message(&mut self, msg: Message<'_>, out: &mut Sink<'_>) -> Result<(), Close>;

    // ---- relay hooks (the reverse proxy's `mode = "websocket"`); the defaults do nothing ----

    /// Whether the handler takes more messages now. `Pending` stops reading from the client
    /// (backpressure); the handler wakes `cx` when it has room again.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<()> {
        Poll::Ready(())
    }

    /// Messages from elsewhere (a relay's other side) to send now; polled while the outbox is
    /// below its high-water mark. `Err` closes the connection with that code.
    fn poll_produce(&mut self, _cx: &mut Context<'_>, _out: &mut Sink<'_>) -> Result<(), Close> {
        Ok(())
    }

    /// The client sent a close frame (its code, when it had one).
    fn on_close(&mut self, _code: Option<u16>) {}
}

/// Where a handler's messages go: the connection's outbox, compressed when negotiated.
pub struct Sink<'a> {
    out: &'a mut Outbox,
    deflate: Option<&'a mut ConnDeflate>,
    traffic: &'a Traffic,
    /// The session's count of data messages sent.
    sent: &'a mut u64,
}

impl Sink<'_> {
    /// Moves what the connection's mailbox holds into the outbox, in order.
    fn take_mail(&mut self, mailbox: &Mailbox) {
        let takes = mailbox.takes();
        mailbox.drain(|item| match item {
            Outgoing::Broadcast(b) if takes == Takes::OwnDeflate => self.text(b.payload()),
            Outgoing::Broadcast(b) => {
                Traffic::add(&self.traffic.messages_out, 1);
                *self.sent += 1;
                self.out.shared(b, takes);
            }
            Outgoing::Text(t) => self.text(&t),
        });
    }

    pub fn text(&mut self, payload: &[u8]) {
        self.send(OpCode::Text, payload)
    }
    pub fn binary(&mut self, payload: &[u8]) {
        self.send(OpCode::Binary, payload)
    }
    fn send(&mut self, opcode: OpCode, payload: &[u8]) {
        Traffic::add(&self.traffic.messages_out, 1);
        *self.sent += 1;
        match self.deflate.as_deref_mut() {
            Some(d) => d.frame(self.out, opcode, payload),
            None => self.out.frame(opcode, payload),
        }
    }
}

/// Settings a session needs, taken from the config once per shard.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_message: usize,
    pub heartbeat: Option<Duration>,
    pub close_timeout: Duration,
    pub compression: Tuning,
}

/// How a session ended, for logs and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    /// The close code we sent, if a close frame was sent.
    pub close_code: Option<u16>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub messages_in: u64,
    pub messages_out: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Open,
    /// Our close frame is queued: flush it, then shut the write side down.
    Closing,
    /// Write side shut: read and discard until the peer closes or the deadline passes, so the
    /// kernel does not answer unread data with a reset that could destroy our close frame.
    Lingering,
    Done,
}

struct Session<'a, S, H> {
    io: S,
    handler: H,
    settings: &'a Settings,
    entry: &'a ConnHandle,
    traffic: &'a Traffic,
    reader: Reader,
    deflate: Option<ConnDeflate>,
    /// An incomplete frame (or frames) carried over between reads.
    pending: BytesMut,
    /// Total size of the frame at the front of `pending`, when known.
    pending_frame: usize,
    out: Outbox,
    /// A write may still be in flight in the backend (io_uring write-behind).
    unflushed: bool,
    phase: Phase,
    /// The closing deadline; heartbeats need no timer per connection (see `Shard::heartbeats`).
    timer: Option<Pin<Box<Sleep>>>,
    heard: bool,
    silent_ticks: u8,
    /// Data messages in and out as of the last heartbeat tick: memory is given back after a
    /// tick without data (pings and pongs do not count, or no live client would ever be idle).
    data_at_tick: u64,
    summary: Summary,
}

/// Runs a WebSocket session to its end. `early` holds bytes that arrived with the handshake.
///
/// A plain function returning the future, not an `async fn`: the future then holds the session
/// once, instead of the session plus the moved-from arguments (which would make every idle
/// connection's task a few hundred bytes larger).
pub fn run<'a, S, H>(
    io: S,
    early: Bytes,
    deflate: Option<Params>,
    handler: H,
    settings: &'a Settings,
    entry: &'a ConnHandle,
    traffic: &'a Traffic,
) -> impl Future<Output = Summary> + 'a
where
    S: AsyncRead + WriteOutbox + 'a,
    H: Handler + 'a,
{
    let mut s = Session {
        io,
        handler,
        settings,
        entry,
        traffic,
        reader: match deflate {
            Some(_) => Reader::with_deflate(settings.max_message),
            None => Reader::new(settings.max_message),
        },
        deflate: deflate.map(|p| ConnDeflate::new(p, settings.compression)),
        pending: BytesMut::new(),
        pending_frame: 0,
        out: Outbox::default(),
        unflushed: false,
        phase: Phase::Open,
        timer: None,
        heard: false,
        silent_ticks: 0,
        data_at_tick: 0,
        summary: Summary::default(),
    };
    // A tick from before the upgrade does not count.
    entry.take_heartbeat();
    entry.mailbox.set_takes(match &deflate {
        None => Takes::Plain,
        Some(p) if p.server_no_context_takeover && p.server_max_window_bits == 15 => {
            Takes::SharedDeflate
        }
        Some(_) => Takes::OwnDeflate,
    });
    // `early` is a slice of hyper's 8 KiB read buffer and keeps all of it alive, even when
    // empty: copy what it holds and let it go before the session starts waiting.
    s.handler.on_open(&mut Sink {
        out: &mut s.out,
        deflate: s.deflate.as_mut(),
        traffic,
        sent: &mut s.summary.messages_out,
    });
    let had_early = !early.is_empty();
    s.pending.extend_from_slice(&early);
    s.summary.bytes_in += early.len() as u64;
    Traffic::add(&traffic.bytes_in, early.len() as u64);
    drop(early);
    if had_early {
        s.process_pending();
    }
    async move {
        poll_fn(|cx| s.poll(cx)).await;
        s.summary
    }
}

/// Inflates a compressed message; text must be UTF-8 once inflated.
fn inflate(
    deflate: &mut Option<ConnDeflate>,
    data: &[u8],
    text: bool,
    limit: usize,
) -> Result<super::deflate::Inflated, Close> {
    // The reader only reports compressed messages when deflate was negotiated.
    let Some(d) = deflate.as_mut() else {
        return Err(Close {
            code: CloseCode::PROTOCOL,
            reason: "compressed message without permessage-deflate",
        });
    };
    let plain = d.inflate(data, limit).map_err(|e| match e {
        InflateError::TooBig(_) => Close {
            code: CloseCode::TOO_BIG,
            reason: "message too big",
        },
        InflateError::Corrupt => Close {
            code: CloseCode::INVALID_DATA,
            reason: "invalid compressed data",
        },
    })?;
    if text && simdutf8::basic::from_utf8(&plain).is_err() {
        return Err(Close {
            code: CloseCode::INVALID_DATA,
            reason: "invalid UTF-8",
        });
    }
    Ok(plain)
}

impl<S: AsyncRead + WriteOutbox, H: Handler> Session<'_, S, H> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.entry.register_waker(cx.waker());
        if self.phase == Phase::Open {
            if let Some(c) = self.entry.take_close_request() {
                if c.code == CloseCode::TRY_AGAIN_LATER {
                    // A slow consumer: what it has not started to receive is dropped.
                    self.out.discard_unsent();
                    self.entry.mailbox.clear();
                }
                self.close(c.code, c.reason);
            }
        }
        if self.phase == Phase::Open {
            self.take_mail();
            self.poll_produce(cx);
            self.poll_read(cx);
        }
        if self.phase == Phase::Open {
            self.heartbeat();
        }
        // Reading stopped at the high-water mark, so no read interest is registered with the
        // socket (epoll): once the flush takes the queue below it, poll again to resume reading.
        let backpressured = self.phase == Phase::Open && self.out.queued() >= HIGH_WATER;
        if let Err(e) = self.poll_flush(cx) {
            tracing::debug!(error = %e, "write failed");
            self.phase = Phase::Done;
        }
        if backpressured && self.phase == Phase::Open && self.out.queued() < HIGH_WATER {
            cx.waker().wake_by_ref();
        }
        if let Some(published) = self.entry.mailbox.set_unwritten(self.out.queued()) {
            self.traffic.written(published);
        }
        if self.phase == Phase::Closing && self.out.is_empty() && !self.unflushed {
            match Pin::new(&mut self.io).poll_shutdown(cx) {
                Poll::Pending => {}
                Poll::Ready(_) => self.phase = Phase::Lingering,
            }
        }
        if self.phase == Phase::Lingering {
            self.poll_linger(cx);
        }
        if matches!(self.phase, Phase::Closing | Phase::Lingering) {
            if let Some(t) = self.timer.as_mut() {
                if t.as_mut().poll(cx).is_ready() {
                    self.phase = Phase::Done;
                }
            }
        }
        if self.phase == Phase::Done {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// The relay hook: what the handler's other side sent, while there is room to queue it.
    fn poll_produce(&mut self, cx: &mut Context<'_>) {
        if self.out.queued() >= HIGH_WATER {
            return;
        }
        let res = self.handler.poll_produce(
            cx,
            &mut Sink {
                out: &mut self.out,
                deflate: self.deflate.as_mut(),
                traffic: self.traffic,
                sent: &mut self.summary.messages_out,
            },
        );
        if let Err(c) = res {
            self.close(c.code, c.reason);
        }
    }

    fn take_mail(&mut self) {
        if !self.entry.mailbox.has_mail() {
            return;
        }
        Sink {
            out: &mut self.out,
            deflate: self.deflate.as_mut(),
            traffic: self.traffic,
            sent: &mut self.summary.messages_out,
        }
        .take_mail(&self.entry.mailbox);
    }

    /// Queues a close frame and starts the closing handshake.
    fn close(&mut self, code: CloseCode, reason: &str) {
        self.out.close(code, reason);
        self.begin_closing(code.0);
    }

    /// Stops reading; the queued output is flushed, then the write side shut, within
    /// `close_timeout`.
    fn begin_closing(&mut self, code: u16) {
        self.summary.close_code = Some(code);
        self.phase = Phase::Closing;
        self.pending = BytesMut::new();
        let deadline = Instant::now() + self.settings.close_timeout;
        match self.timer.as_mut() {
            Some(t) => t.as_mut().reset(deadline),
            None => self.timer = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
    }

    fn poll_read(&mut self, cx: &mut Context<'_>) {
        for _ in 0..READ_BUDGET {
            if self.phase != Phase::Open || self.out.queued() >= HIGH_WATER {
                return;
            }
            if self.handler.poll_ready(cx).is_pending() {
                return;
            }
            let got = if self.pending.is_empty() {
                self.read_scratch(cx)
            } else {
                self.read_pending(cx)
            };
            match got {
                Poll::Pending => return,
                Poll::Ready(Ok(0)) => {
                    // The peer went away without a close frame.
                    self.phase = Phase::Done;
                    return;
                }
                Poll::Ready(Ok(n)) => {
                    self.summary.bytes_in += n as u64;
                    Traffic::add(&self.traffic.bytes_in, n as u64);
                    self.heard = true;
                }
                Poll::Ready(Err(e)) => {
                    tracing::debug!(error = %e, "read failed");
                    self.phase = Phase::Done;
                    return;
                }
            }
        }
        // Budget used up with data still coming: come back after others had their turn.
        cx.waker().wake_by_ref();
    }

    /// Reads into the shard's scratch buffer and processes whole frames straight from it;
    /// only an incomplete tail is copied into `pending`.
    fn read_scratch(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        SCRATCH_BUF.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            let mut rb = ReadBuf::new(&mut scratch[..]);
            match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            let n = rb.filled().len();
            let buf = &mut scratch[..n];
            let (consumed, next) = self.process(buf);
            if self.phase == Phase::Open && consumed < n {
                self.pending.reserve(next.max(n - consumed));
                self.pending.extend_from_slice(&buf[consumed..]);
                self.pending_frame = next;
            }
            Poll::Ready(Ok(n))
        })
    }

    /// Reads more of an incomplete frame into `pending` (sized for the whole frame when its
    /// header is known), then processes what is complete.
    ///
    /// The read goes into `pending`'s spare capacity as uninitialised memory. Zero-filling the
    /// rest of the frame before every read (as `resize` would) costs O(frame²/read size): a
    /// 16 MiB frame arriving in 64 KiB reads meant ~2 GiB of memset.
    fn read_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let have = self.pending.len();
        let want = self.pending_frame.saturating_sub(have).max(4096);
        self.pending.reserve(want);
        let mut rb = ReadBuf::uninit(&mut self.pending.spare_capacity_mut()[..want]);
        let start = rb.filled().as_ptr();
        let res = Pin::new(&mut self.io).poll_read(cx, &mut rb);
        // A reader may only fill the buffer it was given (as tokio's own `read_buf` checks).
        assert_eq!(
            start,
            rb.filled().as_ptr(),
            "the reader replaced the read buffer"
        );
        let n = rb.filled().len();
        // SAFETY: `ReadBuf` guarantees that its filled part is initialised, and the assertion
        // above shows that part starts at `pending`'s spare capacity, i.e. at `have`; so the
        // bytes `have..have + n` are initialised and within the capacity reserved above.
        unsafe { self.pending.set_len(have + n) };
        match res {
            Poll::Ready(Ok(())) if n > 0 => {
                self.process_pending();
                Poll::Ready(Ok(n))
            }
            other => other.map_ok(|()| 0),
        }
    }

    fn process_pending(&mut self) {
        let mut pending = std::mem::take(&mut self.pending);
        let (consumed, next) = self.process(&mut pending);
        pending.advance(consumed);
        if self.phase == Phase::Open && !pending.is_empty() {
            self.pending = pending;
            self.pending_frame = next;
        }
    }

    /// Feeds bytes to the frame reader; returns (bytes consumed, size of the next frame if known).
    fn process(&mut self, buf: &mut [u8]) -> (usize, usize) {
        let Session {
            reader,
            deflate,
            out,
            handler,
            summary,
            entry,
            settings,
            traffic,
            ..
        } = self;
        let mut close: Option<(CloseCode, &'static str)> = None;
        let mut peer_close: Option<Option<u16>> = None;
        let mut deliver =
            |msg: Message<'_>, out: &mut Outbox, deflate: &mut Option<ConnDeflate>| {
                summary.messages_in += 1;
                entry.count_message();
                Traffic::add(&traffic.messages_in, 1);
                let mut sink = Sink {
                    out,
                    deflate: deflate.as_mut(),
                    traffic,
                    sent: &mut summary.messages_out,
                };
                let res = handler.on_message(msg, &mut sink);
                // What the handler sent through the shard (e.g. a reply from a room homed
                // here) goes out in order with what it wrote directly.
                if entry.mailbox.has_mail() {
                    sink.take_mail(&entry.mailbox);
                }
                res
            };
        let fed = reader.feed(buf, |ev| {
            let res = match ev {
                Event::Text(t) => deliver(Message::Text(t), out, deflate),
                Event::Binary(b) => deliver(Message::Binary(b), out, deflate),
                Event::Compressed { text, data } => {
                    match inflate(deflate, data, text, settings.max_message) {
                        Ok(plain) if text => deliver(Message::Text(&plain), out, deflate),
                        Ok(plain) => deliver(Message::Binary(&plain), out, deflate),
                        Err(c) => Err(c),
                    }
                }
                Event::Ping(p) => {
                    out.frame(OpCode::Pong, p);
                    Ok(())
                }
                Event::Pong(_) => Ok(()),
                Event::Close(c) => {
                    peer_close = Some(c.map(|(code, _)| code));
                    return Flow::Stop;
                }
            };
            match res {
                Ok(()) => Flow::Continue,
                Err(c) => {
                    close = Some((c.code, c.reason));
                    Flow::Stop
                }
            }
        });
        match fed {
            Ok(fed) => {
                if let Some((code, reason)) = close {
                    self.close(code, reason);
                } else if let Some(code) = peer_close {
                    self.handler.on_close(code);
                    // Echo the peer's code (RFC 6455 §5.5.1); an empty close gets an empty one.
                    match code {
                        Some(c) => self.close(CloseCode(c), ""),
                        None => {
                            self.out.frame(OpCode::Close, &[]);
                            self.begin_closing(1005);
                        }
                    }
                }
                (fed.consumed, fed.next_frame_len)
            }
            Err(e) => {
                self.fail(&e);
                (buf.len(), 0)
            }
        }
    }

    fn fail(&mut self, e: &ReadError) {
        tracing::debug!(error = %e, "failing connection");
        let reason = match e {
            ReadError::Protocol(r) => r,
            ReadError::InvalidUtf8 => "invalid UTF-8",
            ReadError::TooBig(_) => "message too big",
        };
        self.close(e.close_code(), reason);
    }

    /// Runs when the shard's heartbeat ticker has marked this connection (once per interval).
    fn heartbeat(&mut self) {
        if !self.entry.take_heartbeat() {
            return;
        }
        if std::mem::take(&mut self.heard) {
            self.silent_ticks = 0;
        } else {
            self.silent_ticks += 1;
        }
        let data = self.summary.messages_in + self.summary.messages_out;
        if std::mem::replace(&mut self.data_at_tick, data) == data {
            // No data since the last tick: give back buffer and compressor memory.
            self.out.shrink();
            self.entry.mailbox.shrink();
            if let Some(d) = self.deflate.as_mut() {
                d.shrink_idle();
            }
            if self.pending.is_empty() {
                self.pending = BytesMut::new();
            }
        }
        // Ticks are shared by the whole shard, so the first silent tick may come right after
        // the last message: three silent ticks mean at least two full intervals of silence.
        if self.silent_ticks >= 3 {
            self.close(CloseCode::GOING_AWAY, "heartbeat timeout");
        } else {
            self.out.frame(OpCode::Ping, b"");
        }
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        while !self.out.is_empty() {
            match self.io.poll_write_outbox(cx, &mut self.out) {
                Poll::Pending => return Ok(()),
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => {
                    self.summary.bytes_out += n as u64;
                    Traffic::add(&self.traffic.bytes_out, n as u64);
                    self.unflushed = true;
                }
                Poll::Ready(Err(e)) => return Err(e),
            }
        }
        if self.unflushed {
            if let Poll::Ready(r) = Pin::new(&mut self.io).poll_flush(cx) {
                self.unflushed = false;
                r?;
            }
        }
        Ok(())
    }

    fn poll_linger(&mut self, cx: &mut Context<'_>) {
        SCRATCH_BUF.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            for _ in 0..READ_BUDGET {
                let mut rb = ReadBuf::new(&mut scratch[..]);
                match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
                    Poll::Pending => return,
                    Poll::Ready(Ok(())) if !rb.filled().is_empty() => continue,
                    Poll::Ready(_) => {
                        self.phase = Phase::Done;
                        return;
                    }
                }
            }
            cx.waker().wake_by_ref();
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::frame::write_masked_frame;
    use std::rc::Rc;
    use tokio::io::AsyncWrite;

    /// A client that delivers `input` in `chunk`-byte reads, records what the server writes,
    /// and counts how many initialised bytes each read was offered.
    struct Mock {
        input: Vec<u8>,
        pos: usize,
        chunk: usize,
        written: Vec<u8>,
        offered_initialised: usize,
    }

    impl AsyncRead for Mock {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            self.offered_initialised += buf.initialized().len();
            let n = self
                .chunk
                .min(self.input.len() - self.pos)
                .min(buf.remaining());
            let pos = self.pos;
            buf.put_slice(&self.input[pos..pos + n]);
            self.pos += n;
            Poll::Ready(Ok(()))
        }
    }

    impl WriteOutbox for Mock {}

    impl AsyncWrite for Mock {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.written.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Every message back as it came.
    struct Echo;

    impl Handler for Echo {
        fn on_message(&mut self, msg: Message<'_>, out: &mut Sink<'_>) -> Result<(), Close> {
            match msg {
                Message::Text(t) => out.text(t),
                Message::Binary(b) => out.binary(b),
            }
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_large_frame_in_small_reads_is_echoed_without_quadratic_zeroing() {
        let len = 1 << 20;
        let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let mut input = Vec::new();
        write_masked_frame(&mut input, true, OpCode::Binary, [1, 2, 3, 4], &payload);
        write_masked_frame(
            &mut input,
            true,
            OpCode::Close,
            [5, 6, 7, 8],
            &1000u16.to_be_bytes(),
        );
        let mut mock = Mock {
            input,
            pos: 0,
            chunk: 4096,
            written: Vec::new(),
            offered_initialised: 0,
        };
        let entry = Rc::new(ConnHandle::new(1, "127.0.0.1:1".parse().unwrap()));
        let settings = Settings {
            max_message: 16 << 20,
            heartbeat: None,
            close_timeout: Duration::from_secs(1),
            compression: Tuning {
                level: 1,
                threshold: 256,
            },
        };
        let summary = run(
            &mut mock,
            Bytes::new(),
            None,
            Echo,
            &settings,
            &entry,
            &Traffic::default(),
        )
        .await;

        assert_eq!(summary.messages_in, 1);
        assert_eq!(summary.close_code, Some(1000));
        let mut expected = Vec::new();
        crate::ws::frame::write_frame(&mut expected, OpCode::Binary, &payload);
        crate::ws::frame::write_frame(&mut expected, OpCode::Close, &1000u16.to_be_bytes());
        assert!(
            mock.written == expected,
            "echo differs from the message sent"
        );
        // 256 reads of 4 KiB: zero-filling the rest of the frame before each one offered
        // ~128 MiB of initialised buffer; reading into spare capacity offers only the first
        // (scratch) read's 64 KiB and the linger read's.
        assert!(
            mock.offered_initialised <= 4 * SCRATCH,
            "offered {} initialised bytes for a {len}-byte frame",
            mock.offered_initialised
        );
    }
}
