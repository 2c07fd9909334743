//! The I/O of a served HTTP/1.1 connection ([`super::h1`] is its protocol): the socket and its
//! read buffer, shared by the connection's loop (src/server/http1.rs) and the body of the
//! request being served ([`Body`]), which reads the socket itself when the handler polls it —
//! on the connection's task, with no channel and no task between them. One `RefCell` borrow
//! per read or write, none held while anything else is polled: the loop writes the response
//! with [`Writer`] while its body (a proxied upload's upstream, say) polls the request's.

use std::cell::RefCell;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use hyper::body::{Frame, SizeHint};
use tokio::io::AsyncWrite;

use super::{h1, Stream};
use crate::ws::session::read_into;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// A served connection's socket and what was read from it, shared by its loop and the
/// current request's body.
pub struct Conn {
    pub io: Stream,
    /// Read and not yet used: request heads and bodies.
    pub rd: BytesMut,
    /// The current request's body, still to be read (`None`: read to its end, or none).
    body: Option<h1::Decoder>,
    /// The request whose [`Body`] may read (0: none; a body kept past its response reads
    /// nothing more).
    owner: u64,
    /// The client waits for a 100 before it sends the body: sent when the body is first polled.
    expect: bool,
    /// What is left of the 100 to write.
    continue_left: &'static [u8],
    /// The loop, waiting for a body kept past its response to end or be dropped.
    waiter: Option<Waker>,
}

pub type Shared = Rc<RefCell<Conn>>;

impl Conn {
    pub fn new(io: Stream) -> Shared {
        Rc::new(RefCell::new(Conn {
            io,
            rd: BytesMut::new(),
            body: None,
            owner: 0,
            expect: false,
            continue_left: b"",
            waiter: None,
        }))
    }

    /// Reads more into `rd` (at most `want` bytes): the number read, 0 at the end of the stream.
    pub fn fill(&mut self, want: usize, cx: &mut Context<'_>) -> Poll<std::io::Result<usize>> {
        if self.rd.capacity() - self.rd.len() < want {
            self.rd.reserve(want);
        }
        read_into(&mut self.io, cx, &mut self.rd, want)
    }

    /// Request `owner`'s body begins: framed as `framing`, behind a 100 when `expect`.
    pub fn start_body(conn: &Shared, owner: u64, framing: h1::Framing, expect: bool) -> Body {
        let dec = h1::Decoder::new(framing);
        let hint = dec
            .remaining()
            .map_or_else(SizeHint::new, SizeHint::with_exact);
        let end = dec.is_done();
        let mut c = conn.borrow_mut();
        c.body = (!end).then_some(dec);
        c.owner = owner;
        c.expect = expect && !end;
        Body {
            owner,
            end,
            hint,
            conn: (!end).then(|| conn.clone()),
        }
    }

    /// The request's body is read to its end.
    pub fn body_done(&self) -> bool {
        self.body.is_none()
    }

    /// The client still waits for a 100 it was never sent: its body cannot be drained.
    pub fn awaits_continue(&self) -> bool {
        self.body.is_some() && self.expect
    }

    /// The response is sent: the request's body is no longer its handler's to read.
    pub fn end_request(&mut self) {
        self.owner = 0;
    }

    /// After the response, while whoever holds the request's body (a proxied upload the
    /// upstream answered early) still reads it: `Ready` once it ended or was dropped.
    pub fn poll_body_released(conn: &Shared, cx: &mut Context<'_>) -> Poll<()> {
        // The loop's own reference is the only other one: no `Body` holds the connection.
        if conn.borrow().body_done() || Rc::strong_count(conn) == 1 {
            return Poll::Ready(());
        }
        conn.borrow_mut().waiter = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Reads and drops what is left of the request's body: `Ready(true)` once it ended
    /// within `limit` bytes, `Ready(false)` when it is longer or cannot be read.
    pub fn poll_drain(&mut self, limit: &mut usize, cx: &mut Context<'_>) -> Poll<bool> {
        loop {
            match ready!(self.poll_frame(cx)) {
                None => return Poll::Ready(true),
                Some(Err(_)) => return Poll::Ready(false),
                Some(Ok(f)) => {
                    let n = f.data_ref().map_or(0, Bytes::len);
                    if n > *limit {
                        return Poll::Ready(false);
                    }
                    *limit -= n;
                }
            }
        }
    }

    /// The next piece of the request's body.
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if std::mem::take(&mut self.expect) {
            self.continue_left = CONTINUE;
        }
        while !self.continue_left.is_empty() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, self.continue_left))?;
            if n == 0 {
                return Poll::Ready(Some(Err("the connection closed".into())));
            }
            self.continue_left = &self.continue_left[n..];
            if self.continue_left.is_empty() {
                ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            }
        }
        loop {
            let Some(dec) = self.body.as_mut() else {
                return Poll::Ready(None);
            };
            let decoded = match dec.decode(&mut self.rd) {
                Ok(h1::Decoded::More) => {
                    let want = dec.read_size();
                    match ready!(self.fill(want, cx)) {
                        Ok(0) => match self.body.as_mut().map(h1::Decoder::at_eof) {
                            Some(Err(m)) => Err(m),
                            _ => Ok(h1::Decoded::End),
                        },
                        Ok(_) => continue,
                        Err(e) => return Poll::Ready(Some(Err(e.into()))),
                    }
                }
                d => d,
            };
            if !matches!(decoded, Ok(h1::Decoded::Data(_))) || dec_done(&self.body) {
                self.body = None;
            }
            return Poll::Ready(match decoded {
                Err(m) => Some(Err(m.to_string().into())),
                Ok(h1::Decoded::Data(b)) => Some(Ok(Frame::data(b))),
                Ok(h1::Decoded::Trailers(t)) => Some(Ok(Frame::trailers(t))),
                Ok(h1::Decoded::End | h1::Decoded::More) => None,
            });
        }
    }
}

fn dec_done(d: &Option<h1::Decoder>) -> bool {
    d.as_ref().is_none_or(h1::Decoder::is_done)
}

/// The body of a request on a served HTTP/1.1 connection: read from the connection when
/// polled. Empty once its response is sent (the connection drains or closes what is left).
pub struct Body {
    owner: u64,
    end: bool,
    hint: SizeHint,
    /// `None` once ended.
    conn: Option<Shared>,
}

impl Body {
    pub fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.end {
            return Poll::Ready(None);
        }
        let Some(conn) = &self.conn else {
            return Poll::Ready(None);
        };
        let mut c = conn.borrow_mut();
        if c.owner != self.owner {
            self.end = true;
            return Poll::Ready(Some(Err("the request's response was already sent".into())));
        }
        let r = ready!(c.poll_frame(cx));
        drop(c);
        match &r {
            None | Some(Err(_)) => {
                self.end = true;
                if let Some(w) = conn.borrow_mut().waiter.take() {
                    w.wake();
                }
                self.conn = None;
            }
            Some(Ok(f)) => {
                if let (Some(d), Some(n)) = (f.data_ref(), self.hint.exact()) {
                    self.hint = SizeHint::with_exact(n.saturating_sub(d.len() as u64));
                }
            }
        }
        Poll::Ready(r)
    }

    pub fn is_end_stream(&self) -> bool {
        self.end
    }

    pub fn size_hint(&self) -> SizeHint {
        self.hint
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        let waiter = self
            .conn
            .as_ref()
            .and_then(|c| c.try_borrow_mut().ok()?.waiter.take());
        // (`self.conn` goes after this: the loop, woken, finds itself the only holder.)
        if let Some(w) = waiter {
            w.wake();
        }
    }
}

/// Writes to the shared connection, borrowing it for each write only.
pub struct Writer(pub Shared);

impl AsyncWrite for Writer {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0.borrow_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0.borrow_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0.borrow_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0.borrow_mut().io).poll_shutdown(cx)
    }
}
