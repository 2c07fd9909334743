//! The two sides of an HTTP/2 stream served with the `h2` crate (src/server/http2.rs): the byte
//! stream a WebSocket over RFC 8441 reads and writes ([`H2Stream`], one of [`Stream`]'s
//! kinds), and a request's body ([`RequestBody`], the same type whether it is read from an
//! HTTP/1.1 connection ([`super::server_h1`]) or by `h2` from a stream).
//!
//! Writes go straight into the stream's `SendStream`, within the capacity its flow-control
//! window grants (a client that does not read stops only its own stream); the connection's
//! task, which owns the socket, encodes and writes them. Reads take the `RecvStream`'s DATA
//! and give the window back as the session consumes it.
//!
//! [`Stream`]: super::Stream

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use hyper::body::{Frame, SizeHint};
use tokio::io::ReadBuf;

use crate::ws::outbox::Outbox;

/// A WebSocket's stream on an HTTP/2 connection, after its 200.
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received DATA not yet read.
    read: Bytes,
    /// The end of our side was sent.
    ended: bool,
}

impl H2Stream {
    pub fn new(send: SendStream<Bytes>, recv: RecvStream) -> H2Stream {
        H2Stream {
            send,
            recv,
            read: Bytes::new(),
            ended: false,
        }
    }

    pub(super) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.read.is_empty() {
            match ready!(self.recv.poll_data(cx)) {
                None => return Poll::Ready(Ok(())),
                Some(Ok(data)) => self.read = data,
                // The client ended or cancelled the stream: the end of it.
                Some(Err(e)) if matches!(e.reason(), Some(Reason::NO_ERROR | Reason::CANCEL)) => {
                    return Poll::Ready(Ok(()))
                }
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
            }
        }
        let n = self.read.len().min(buf.remaining());
        buf.put_slice(&self.read[..n]);
        self.read.advance(n);
        if self.read.is_empty() {
            // An empty slice would still hold the connection's read buffer it came from.
            self.read = Bytes::new();
        }
        // The window opens again as the session takes the bytes, not when they arrive.
        let _ = self.recv.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }

    /// Waits until the stream may send something, asking for `want` bytes of window; returns
    /// how many it may send now.
    fn poll_capacity(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        if self.ended {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        loop {
            let cap = self.send.capacity();
            if cap > 0 {
                return Poll::Ready(Ok(cap));
            }
            self.send.reserve_capacity(want);
            match ready!(self.send.poll_capacity(cx)) {
                Some(Ok(_)) => {}
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            }
        }
    }

    fn send(&mut self, data: Bytes) -> io::Result<()> {
        self.send.send_data(data, false).map_err(io_error)
    }

    pub(super) fn poll_write_vectored(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if len == 0 {
            return Poll::Ready(Ok(0));
        }
        let cap = ready!(self.poll_capacity(cx, len))?.min(len);
        let mut data = BytesMut::with_capacity(cap);
        for b in bufs {
            let take = b.len().min(cap - data.len());
            data.extend_from_slice(&b[..take]);
        }
        self.send(data.freeze())?;
        Poll::Ready(Ok(cap))
    }

    /// The outbox's chunks go into DATA frames as they are, without a copy.
    pub(super) fn poll_write_outbox(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Outbox,
    ) -> Poll<io::Result<usize>> {
        if out.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let cap = ready!(self.poll_capacity(cx, out.queued()))?;
        let mut sent = 0;
        while sent < cap && !out.is_empty() {
            let chunk = out.take_front(cap - sent);
            sent += chunk.len();
            self.send(chunk)?;
        }
        Poll::Ready(Ok(sent))
    }

    /// What was sent is the connection task's to write: nothing waits here.
    pub(super) fn poll_flush(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    /// Ends our side of the stream (END_STREAM after what was sent).
    pub(super) fn poll_shutdown(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.ended {
            self.ended = true;
            self.send.send_data(Bytes::new(), true).map_err(io_error)?;
        }
        Poll::Ready(Ok(()))
    }
}

fn io_error(e: h2::Error) -> io::Error {
    if e.is_io() {
        if let Some(e) = e.into_io() {
            return e;
        }
        return io::ErrorKind::BrokenPipe.into();
    }
    io::Error::other(e)
}

/// A request's body as the server reads it: from its HTTP/1.1 connection or an HTTP/2 stream.
pub enum RequestBody {
    /// A CONNECT's: its stream is the tunnel's.
    Empty,
    /// Read from the connection when polled ([`super::server_h1`]).
    Http1(super::server_h1::Body),
    /// With the length its `content-length` declared (h2 holds the stream to it).
    Http2(RecvStream, Option<u64>),
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl hyper::body::Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Empty => Poll::Ready(None),
            RequestBody::Http1(b) => b.poll_frame(cx),
            RequestBody::Http2(recv, _) => {
                if let Some(data) = ready!(recv.poll_data(cx)) {
                    let data = data?;
                    // The body's reader holds what it took: the window opens at once, as
                    // hyper's HTTP/2 server does.
                    let _ = recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                match ready!(recv.poll_trailers(cx)) {
                    Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
                    Ok(None) => Poll::Ready(None),
                    Err(e) => Poll::Ready(Some(Err(e.into()))),
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Empty => true,
            RequestBody::Http1(b) => b.is_end_stream(),
            RequestBody::Http2(recv, _) => recv.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Empty => SizeHint::with_exact(0),
            RequestBody::Http1(b) => b.size_hint(),
            RequestBody::Http2(_, Some(len)) => SizeHint::with_exact(*len),
            RequestBody::Http2(_, None) => SizeHint::default(),
        }
    }
}
