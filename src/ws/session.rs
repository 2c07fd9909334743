//! Drives a [`Connection`] over a stream: reads into the shard's scratch buffer and hands
//! the bytes to the connection, moves the connection's mail into it, writes everything it
//! queued as one vectored write per wake-up, and sleeps until its next timeout. The protocol
//! itself lives in [`Connection`]; this is the I/O around it.
//!
//! Memory: an idle connection holds no read buffer (bytes are read into a per-shard scratch
//! buffer and only an incomplete frame is copied out), and its outbound buffer is freed once
//! it has been idle for a heartbeat period.

use std::cell::RefCell;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, ReadBuf};
use tokio::time::Sleep;

use super::connection::{Connection, Handler, Settings, State, Stats};
use super::deflate::Params;
use super::handle::ConnHandle;
use super::outbox::WriteOutbox;
use crate::metrics::Traffic;

/// Size of the per-shard buffer every connection reads into.
const SCRATCH: usize = 64 * 1024;
/// Reads per wake-up before yielding to other connections (fairness).
const READ_BUDGET: usize = 8;

thread_local! {
    static SCRATCH_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; SCRATCH].into_boxed_slice());
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

struct Session<'a, S, H> {
    io: S,
    conn: Connection<'a, H>,
    entry: &'a ConnHandle,
    traffic: &'a Traffic,
    /// A write may still be in flight in the backend (io_uring write-behind).
    unflushed: bool,
    /// The close timeout; heartbeats need no timer per connection (see `Shard::heartbeats`).
    timer: Option<Pin<Box<Sleep>>>,
    bytes_in: u64,
    bytes_out: u64,
    /// The connection's message counts as last added to `traffic`.
    reported: Stats,
}

/// The driver's clock: tokio's, so that tests with paused time drive the connection too.
fn now() -> Instant {
    tokio::time::Instant::now().into_std()
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
    // A tick from before the upgrade does not count.
    entry.take_heartbeat();
    let mut s = Session {
        io,
        conn: Connection::new(handler, deflate, settings, &entry.mailbox),
        entry,
        traffic,
        unflushed: false,
        timer: None,
        bytes_in: early.len() as u64,
        bytes_out: 0,
        reported: Stats::default(),
    };
    Traffic::add(&traffic.bytes_in, early.len() as u64);
    // `early` is a slice of hyper's 8 KiB read buffer and keeps all of it alive, even when
    // empty: its bytes go through the scratch buffer and it is let go before the session waits.
    if !early.is_empty() {
        SCRATCH_BUF.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            for chunk in early.chunks(SCRATCH) {
                let buf = &mut scratch[..chunk.len()];
                buf.copy_from_slice(chunk);
                s.conn.handle_input(buf, now());
            }
        });
    }
    drop(early);
    async move {
        poll_fn(|cx| s.poll(cx)).await;
        Summary {
            close_code: s.conn.close_code(),
            bytes_in: s.bytes_in,
            bytes_out: s.bytes_out,
            messages_in: s.reported.messages_in,
            messages_out: s.reported.messages_out,
        }
    }
}

impl<S: AsyncRead + WriteOutbox, H: Handler> Session<'_, S, H> {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.entry.register_waker(cx.waker());
        if self.conn.state() == State::Open {
            if let Some(c) = self.entry.take_close_request() {
                self.conn.close(c, now());
            }
            self.conn.handle_mail();
            self.conn.handle_produce(cx, now());
            let held = self.poll_read(cx);
            // While the handler holds the input back, the client is not silent, only unheard:
            // its heartbeat tick waits (the mark stays) until reading resumes.
            if !held && self.entry.take_heartbeat() {
                self.conn.handle_heartbeat(now());
            }
        }
        // Reading stopped at the high-water mark, so no read interest is registered with the
        // socket (epoll): once the flush takes the queue below it, poll again to resume reading.
        let stalled = self.conn.state() == State::Open && !self.conn.wants_input();
        if let Err(e) = self.poll_flush(cx) {
            tracing::debug!(error = %e, "write failed");
            self.conn.handle_transport_closed();
        }
        if stalled && self.conn.wants_input() {
            cx.waker().wake_by_ref();
        }
        if let Some(published) = self
            .entry
            .mailbox
            .set_unwritten(self.conn.outbox().queued())
        {
            self.traffic.written(published);
        }
        if self.conn.wants_write_shutdown() && !self.unflushed {
            // A failed shutdown ends the writing too: lingering then sees the error.
            if Pin::new(&mut self.io).poll_shutdown(cx).is_ready() {
                self.conn.handle_write_shutdown();
            }
        }
        if self.conn.state() == State::Lingering {
            self.poll_linger(cx);
        }
        self.poll_timer(cx);
        self.report();
        if self.conn.is_closed() {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Adds the messages counted since the last turn to the shard's metrics.
    fn report(&mut self) {
        let now = self.conn.stats();
        let new_in = now.messages_in - self.reported.messages_in;
        Traffic::add(&self.traffic.messages_in, new_in);
        Traffic::add(
            &self.traffic.messages_out,
            now.messages_out - self.reported.messages_out,
        );
        self.entry.count_messages(new_in);
        self.reported = now;
    }

    fn poll_timer(&mut self, cx: &mut Context<'_>) {
        let Some(deadline) = self.conn.poll_timeout() else {
            return;
        };
        let deadline = tokio::time::Instant::from_std(deadline);
        let timer = match &mut self.timer {
            Some(t) => {
                if t.deadline() != deadline {
                    t.as_mut().reset(deadline);
                }
                t
            }
            None => self
                .timer
                .insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        if timer.as_mut().poll(cx).is_ready() {
            self.conn.handle_timeout(now());
        }
    }

    /// Reads and hands the input to the connection; returns whether the handler holds the
    /// input back ([`Handler::poll_ready`]).
    fn poll_read(&mut self, cx: &mut Context<'_>) -> bool {
        for _ in 0..READ_BUDGET {
            if !self.conn.wants_input() {
                return false;
            }
            if self.conn.handler_mut().poll_ready(cx).is_pending() {
                return true;
            }
            let got = match self.conn.input_buffer() {
                None => self.read_scratch(cx),
                // The rest of an incomplete frame goes straight where the frame is held.
                Some((buf, want)) => {
                    let got = read_into(&mut self.io, cx, buf, want);
                    if matches!(got, Poll::Ready(Ok(n)) if n > 0) {
                        self.conn.handle_buffered_input(now());
                    }
                    got
                }
            };
            match got {
                Poll::Pending => return false,
                Poll::Ready(Ok(0)) => {
                    // The peer went away without a close frame.
                    self.conn.handle_transport_closed();
                    return false;
                }
                Poll::Ready(Ok(n)) => {
                    self.bytes_in += n as u64;
                    Traffic::add(&self.traffic.bytes_in, n as u64);
                }
                Poll::Ready(Err(e)) => {
                    tracing::debug!(error = %e, "read failed");
                    self.conn.handle_transport_closed();
                    return false;
                }
            }
        }
        // Budget used up with data still coming: come back after others had their turn.
        cx.waker().wake_by_ref();
        false
    }

    /// Reads into the shard's scratch buffer and hands what came to the connection, which
    /// handles whole frames in place.
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
            if n > 0 {
                self.conn.handle_input(&mut scratch[..n], now());
            }
            Poll::Ready(Ok(n))
        })
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        let out = self.conn.outbox();
        while !out.is_empty() {
            match self.io.poll_write_outbox(cx, out) {
                Poll::Pending => return Ok(()),
                Poll::Ready(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                Poll::Ready(Ok(n)) => {
                    self.bytes_out += n as u64;
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

    /// Reads and discards until the peer closes (see [`State::Lingering`]).
    fn poll_linger(&mut self, cx: &mut Context<'_>) {
        SCRATCH_BUF.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            for _ in 0..READ_BUDGET {
                let mut rb = ReadBuf::new(&mut scratch[..]);
                match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
                    Poll::Pending => return,
                    Poll::Ready(Ok(())) if !rb.filled().is_empty() => continue,
                    Poll::Ready(_) => {
                        self.conn.handle_transport_closed();
                        return;
                    }
                }
            }
            cx.waker().wake_by_ref();
        })
    }
}

/// Reads at most `want` bytes into `buf`'s spare capacity (reserved by the caller) and
/// extends `buf` by what was read. The memory is offered uninitialised: zero-filling it first
/// would cost as much as the read again.
pub fn read_into<S: AsyncRead + Unpin>(
    io: &mut S,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
    want: usize,
) -> Poll<io::Result<usize>> {
    let have = buf.len();
    let want = want.min(buf.capacity() - have);
    let mut rb = ReadBuf::uninit(&mut buf.spare_capacity_mut()[..want]);
    let start = rb.filled().as_ptr();
    let res = Pin::new(io).poll_read(cx, &mut rb);
    // A reader may only fill the buffer it was given (as tokio's own `read_buf` checks).
    assert_eq!(
        start,
        rb.filled().as_ptr(),
        "the reader replaced the read buffer"
    );
    let n = rb.filled().len();
    // SAFETY: `ReadBuf` guarantees that its filled part is initialised, and the assertion
    // above shows that part starts at `buf`'s spare capacity, i.e. at `have`; so the bytes
    // `have..have + n` are initialised and within `buf`'s capacity.
    unsafe { buf.set_len(have + n) };
    res.map_ok(|()| n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::connection::{Close, Message, ToClient};
    use crate::ws::deflate::Tuning;
    use crate::ws::frame::{write_masked_frame, OpCode};
    use std::cell::Cell;
    use std::rc::Rc;
    use std::task::Waker;
    use std::time::Duration;
    use tokio::io::AsyncWrite;

    /// A client that delivers `input` in `chunk`-byte reads, records what the server writes,
    /// and counts how many initialised bytes each read was offered.
    struct Mock {
        input: Vec<u8>,
        pos: usize,
        chunk: usize,
        written: Vec<u8>,
        offered_initialised: usize,
        /// Reads made, seen from outside while the session holds the stream.
        reads: Rc<Cell<usize>>,
    }

    impl Mock {
        fn new(input: Vec<u8>, chunk: usize) -> Mock {
            Mock {
                input,
                pos: 0,
                chunk,
                written: Vec::new(),
                offered_initialised: 0,
                reads: Rc::default(),
            }
        }
    }

    impl AsyncRead for Mock {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            self.offered_initialised += buf.initialized().len();
            self.reads.set(self.reads.get() + 1);
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
        fn on_message(&mut self, msg: Message<'_>, out: &mut ToClient<'_>) -> Result<(), Close> {
            match msg {
                Message::Text(t) => out.text(t),
                Message::Binary(b) => out.binary(b),
            }
            Ok(())
        }
    }

    fn settings() -> Settings {
        Settings {
            max_message: 16 << 20,
            heartbeat: None,
            close_timeout: Duration::from_secs(1),
            compression: Tuning {
                level: 1,
                threshold: 256,
            },
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
        let mut mock = Mock::new(input, 4096);
        let entry = Rc::new(ConnHandle::new(1, "127.0.0.1:1".parse().unwrap()));
        let settings = settings();
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

    /// Takes messages only while its gate is open; wakes the session when it opens.
    struct Gated {
        open: Rc<Cell<bool>>,
        waker: Rc<RefCell<Option<Waker>>>,
        got: Rc<Cell<usize>>,
    }

    impl Handler for Gated {
        fn on_message(&mut self, _: Message<'_>, _: &mut ToClient<'_>) -> Result<(), Close> {
            self.got.set(self.got.get() + 1);
            Ok(())
        }

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<()> {
            if self.open.get() {
                return Poll::Ready(());
            }
            *self.waker.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        }
    }

    /// Counts wake-ups.
    struct Wakes(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Wakes {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_handler_that_is_not_ready_stops_reading_until_it_wakes_the_session() {
        let mut input = Vec::new();
        for m in [&b"one"[..], b"two", b"three"] {
            write_masked_frame(&mut input, true, OpCode::Text, [1, 2, 3, 4], m);
        }
        let mut mock = Mock::new(input, 64);
        let reads = mock.reads.clone();
        let (open, waker, got) = (Rc::new(Cell::new(false)), Rc::default(), Rc::default());
        let handler = Gated {
            open: open.clone(),
            waker: Rc::clone(&waker),
            got: Rc::clone(&got),
        };
        let entry = ConnHandle::new(1, "127.0.0.1:1".parse().unwrap());
        let (settings, traffic) = (settings(), Traffic::default());
        let session = run(
            &mut mock,
            Bytes::new(),
            None,
            handler,
            &settings,
            &entry,
            &traffic,
        );
        let mut session = std::pin::pin!(session);
        let wakes = std::sync::Arc::new(Wakes(Default::default()));
        let session_waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&session_waker);

        let wakes_now = || wakes.0.load(std::sync::atomic::Ordering::SeqCst);
        assert!(session.as_mut().poll(&mut cx).is_pending());
        assert_eq!(
            reads.get(),
            0,
            "nothing is read while the handler is not ready"
        );
        assert_eq!(got.get(), 0);
        assert_eq!(wakes_now(), 0, "no busy polling");
        // A client that is not read is not silent: heartbeat ticks do not time it out.
        for tick in 1..=4 {
            entry.mark_heartbeat();
            assert_eq!(wakes_now(), tick);
            assert!(session.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(reads.get(), 0);

        open.set(true);
        waker
            .borrow_mut()
            .take()
            .expect("the handler kept the waker")
            .wake();
        assert_eq!(wakes_now(), 5);
        // The client's input ends without a close frame: the session ends once it is read.
        let Poll::Ready(summary) = session.as_mut().poll(&mut cx) else {
            panic!("the session did not end with its input");
        };
        assert_eq!(got.get(), 3);
        assert_eq!(summary.close_code, None, "no heartbeat timeout");
        assert_eq!(summary.messages_in, 3);
    }
}
