//! A connection's outbound queue: frames waiting to be written, flushed as one vectored write.
//!
//! Frames this connection builds itself (echo replies, pongs, close) are appended to one
//! growable tail buffer, so a burst of small replies becomes one contiguous write. Frames shared
//! with other connections (broadcast) are queued as handles, never copied.

use bytes::{Buf, Bytes, BytesMut};
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll};

use tokio::io::AsyncWrite;

use super::mailbox::{Broadcast, FrameForm};

use super::close::{write_close_body, CloseCode};
use super::frame::{header_len, write_frame, write_header, OpCode};

/// Vectored writes gather at most this many slices (Linux IOV_MAX is 1024).
pub const MAX_IOVECS: usize = 64;

/// A queued piece of the stream.
#[derive(Debug)]
enum Chunk {
    /// Frames this connection built (a split-off part of the tail).
    Own(Bytes),
    /// A broadcast frame shared with the shard's other connections, in form `form`,
    /// of which the first `at` bytes are written.
    Shared {
        b: Rc<Broadcast>,
        form: FrameForm,
        at: usize,
    },
}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        match self {
            Chunk::Own(b) => b,
            Chunk::Shared { b, form, at } => b
                .frame_for(*form)
                .map_or(&[][..], |f| f.get(*at..).unwrap_or_default()),
        }
    }

    fn advance(&mut self, n: usize) {
        match self {
            Chunk::Own(b) => b.advance(n),
            Chunk::Shared { at, .. } => *at += n,
        }
    }

    /// What [`bytes`](Self::bytes) returns, as a handle on the same memory.
    fn into_bytes(self) -> Bytes {
        match self {
            Chunk::Own(b) => b,
            Chunk::Shared { b, form, at } => b
                .frame_for(form)
                .map_or_else(Bytes::new, |f| f.slice(at.min(f.len())..)),
        }
    }
}

#[derive(Debug, Default)]
pub struct Outbox {
    /// Queued chunks, in order; all of them go before `tail`.
    chunks: VecDeque<Chunk>,
    tail: BytesMut,
    queued: usize,
    /// Bytes of the front chunk (or of `tail` when there are no chunks) already written.
    front_written: usize,
}

impl Outbox {
    /// Bytes waiting to be written.
    pub fn queued(&self) -> usize {
        self.queued
    }

    pub fn is_empty(&self) -> bool {
        self.queued == 0
    }

    /// Appends a whole unfragmented frame built from `payload`.
    pub fn frame(&mut self, opcode: OpCode, payload: &[u8]) {
        let len = header_len(payload.len()) + payload.len();
        self.tail.reserve(len);
        write_frame(&mut self.tail, opcode, payload);
        self.queued += len;
    }

    /// Appends a whole frame whose payload is permessage-deflate data (RSV1 set).
    pub fn compressed_frame(&mut self, opcode: OpCode, payload: &[u8]) {
        let len = header_len(payload.len()) + payload.len();
        self.tail.reserve(len);
        write_header(&mut self.tail, true, true, opcode, payload.len());
        self.tail.extend_from_slice(payload);
        self.queued += len;
    }

    /// Appends a close frame with `code` and `reason`.
    pub fn close(&mut self, code: CloseCode, reason: &str) {
        let mut body = Vec::with_capacity(125);
        write_close_body(&mut body, code, reason);
        self.frame(OpCode::Close, &body);
    }

    /// Queues a broadcast's frame in form `form` (which must be a whole frame:
    /// not [`FrameForm::OwnDeflate`]), shared with other connections.
    pub fn shared(&mut self, b: Rc<Broadcast>, form: FrameForm) {
        let Some(len) = b.frame_for(form).map(Bytes::len) else {
            debug_assert!(false, "{form:?} frames the payload itself");
            return;
        };
        if !self.tail.is_empty() {
            self.chunks
                .push_back(Chunk::Own(self.tail.split().freeze()));
        }
        self.queued += len;
        self.chunks.push_back(Chunk::Shared { b, form, at: 0 });
    }

    /// Fills `out` with the slices to write next; returns how many.
    pub fn slices<'a>(&'a self, out: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        let parts = self.chunks.iter().map(Chunk::bytes);
        for c in parts.chain(std::iter::once(&self.tail[..])) {
            if n == out.len() {
                break;
            }
            if !c.is_empty() {
                out[n] = IoSlice::new(c);
                n += 1;
            }
        }
        n
    }

    /// Calls `f` with the slices to write next. Most flushes have a chunk or two: they get a
    /// small array instead of initialising `MAX_IOVECS` slices each time.
    pub fn with_slices<R>(&self, f: impl FnOnce(&[IoSlice<'_>]) -> R) -> R {
        if self.chunks.len() < 4 {
            let mut s = [IoSlice::new(&[]); 4];
            let k = self.slices(&mut s);
            f(&s[..k])
        } else {
            let mut s = [IoSlice::new(&[]); MAX_IOVECS];
            let k = self.slices(&mut s);
            f(&s[..k])
        }
    }

    /// Drops `n` written bytes from the front.
    pub fn advance(&mut self, mut n: usize) {
        self.queued -= n;
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                self.tail.advance(n);
                break;
            };
            let len = front.bytes().len();
            if n < len {
                front.advance(n);
                self.front_written += n;
                break;
            }
            n -= len;
            self.chunks.pop_front();
            self.front_written = 0;
        }
        if self.chunks.is_empty() {
            self.front_written += n;
        }
        if self.queued == 0 {
            self.tail.clear();
            self.front_written = 0;
        }
    }

    /// Moves the chunks to write next (at most `max`, the tail last) into `into`, as if
    /// written: an io_uring write takes them along instead of copying their bytes. Returns
    /// their length.
    pub fn take_chunks(&mut self, into: &mut Vec<Bytes>, max: usize) -> usize {
        let mut n = 0;
        while into.len() < max {
            let Some(c) = self.chunks.pop_front() else {
                break;
            };
            let b = c.into_bytes();
            if !b.is_empty() {
                n += b.len();
                into.push(b);
            }
        }
        if self.chunks.is_empty() && into.len() < max && !self.tail.is_empty() {
            let t = self.tail.split().freeze();
            n += t.len();
            into.push(t);
        }
        self.queued -= n;
        self.front_written = 0;
        n
    }

    /// Takes up to `max` bytes from the front as a handle on the same memory, as if written:
    /// an HTTP/2 stream sends them as a DATA frame within its flow-control window. Empty when
    /// nothing is queued.
    pub fn take_front(&mut self, max: usize) -> Bytes {
        while let Some(c) = self.chunks.front() {
            let b = match c {
                Chunk::Own(b) => b.clone(),
                Chunk::Shared { b, form, at } => b
                    .frame_for(*form)
                    .map_or_else(Bytes::new, |f| f.slice((*at).min(f.len())..)),
            };
            if b.is_empty() {
                self.chunks.pop_front();
                self.front_written = 0;
                continue;
            }
            let b = b.slice(..b.len().min(max));
            self.advance(b.len());
            return b;
        }
        let n = self.tail.len().min(max);
        let t = self.tail.split_to(n).freeze();
        self.queued -= n;
        self.front_written = if self.queued == 0 {
            0
        } else {
            self.front_written + n
        };
        t
    }

    /// Drops every frame not yet started, keeping the rest of a partly written one so the
    /// stream stays well-formed (a slow consumer's backlog before its close frame).
    pub fn discard_unsent(&mut self) {
        if self.front_written == 0 {
            self.chunks.clear();
            self.tail.clear();
            self.queued = 0;
            return;
        }
        if self.chunks.is_empty() {
            // A partly written tail may hold several frames; their boundaries are not kept,
            // so all of it goes (it is small: replies this connection built itself).
            return;
        }
        self.chunks.truncate(1);
        self.tail.clear();
        self.queued = self.chunks[0].bytes().len();
    }

    /// Frees buffer memory held while empty (called when a connection goes idle).
    pub fn shrink(&mut self) {
        if self.queued == 0 {
            self.tail = BytesMut::new();
            self.chunks = VecDeque::new();
        }
    }
}

/// Where a session writes its outbox. The default hands the outbox's slices to one vectored
/// write; io_uring overrides it to take the chunks themselves along (its writes complete later,
/// so borrowed slices would have to be copied).
pub trait WriteOutbox: AsyncWrite + Unpin {
    /// Writes from the front of `out` and drops what was written from it; returns how much.
    fn poll_write_outbox(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Outbox,
    ) -> Poll<io::Result<usize>> {
        write_slices(self, cx, out)
    }
}

impl<S: WriteOutbox + ?Sized> WriteOutbox for &mut S {
    fn poll_write_outbox(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Outbox,
    ) -> Poll<io::Result<usize>> {
        (**self).poll_write_outbox(cx, out)
    }
}

/// [`WriteOutbox`]'s default: one vectored write of the outbox's slices.
pub fn write_slices<S: AsyncWrite + Unpin + ?Sized>(
    io: &mut S,
    cx: &mut Context<'_>,
    out: &mut Outbox,
) -> Poll<io::Result<usize>> {
    let n = ready!(out.with_slices(|s| Pin::new(&mut *io).poll_write_vectored(cx, s)))?;
    out.advance(n);
    Poll::Ready(Ok(n))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A broadcast whose plain frame is `f` (not a real frame: the outbox does not look).
    fn shared(f: &'static [u8]) -> Rc<Broadcast> {
        Rc::new(Broadcast {
            frame: Bytes::from_static(f),
            deflated: None,
        })
    }

    fn written(o: &Outbox) -> Vec<u8> {
        let mut s = [IoSlice::new(&[]); MAX_IOVECS];
        let n = o.slices(&mut s);
        s[..n].iter().flat_map(|s| s.iter().copied()).collect()
    }

    #[test]
    fn keeps_order_across_local_and_shared_frames() {
        let mut o = Outbox::default();
        o.frame(OpCode::Text, b"a");
        o.shared(shared(b"SHARED"), FrameForm::Plain);
        o.frame(OpCode::Text, b"b");
        assert_eq!(written(&o), b"\x81\x01aSHARED\x81\x01b");
        assert_eq!(o.queued(), 12);
        o.advance(6);
        assert_eq!(written(&o), b"RED\x81\x01b");
        o.advance(6);
        assert!(o.is_empty());
        assert!(written(&o).is_empty());
    }

    #[test]
    fn a_shared_frame_goes_out_in_the_connections_frame_form() {
        let b = Rc::new(Broadcast {
            frame: Bytes::from_static(b"PLAIN"),
            deflated: Some(Bytes::from_static(b"DEFL")),
        });
        let mut o = Outbox::default();
        o.shared(b.clone(), FrameForm::SharedDeflate);
        o.shared(b.clone(), FrameForm::Plain);
        assert_eq!(o.queued(), 9);
        assert_eq!(written(&o), b"DEFLPLAIN");
        o.advance(6);
        assert_eq!(written(&o), b"AIN");
        assert_eq!(
            Rc::strong_count(&b),
            2,
            "the written chunk let go of the frame"
        );
    }

    #[test]
    fn discarding_keeps_a_partly_written_frame_whole() {
        let mut o = Outbox::default();
        o.shared(shared(b"FIRST"), FrameForm::Plain);
        o.shared(shared(b"SECOND"), FrameForm::Plain);
        o.frame(OpCode::Text, b"c");
        o.advance(2);
        o.discard_unsent();
        assert_eq!(written(&o), b"RST");
        o.close(CloseCode::TRY_AGAIN_LATER, "");
        assert_eq!(written(&o), b"RST\x88\x02\x03\xf5");

        let mut o = Outbox::default();
        o.shared(shared(b"FIRST"), FrameForm::Plain);
        o.advance(5);
        o.shared(shared(b"SECOND"), FrameForm::Plain);
        o.discard_unsent();
        assert!(o.is_empty());
    }

    #[test]
    fn taking_chunks_hands_over_the_shared_bytes_in_order() {
        let frame = Bytes::from_static(b"SHARED");
        let b = Rc::new(Broadcast {
            frame: frame.clone(),
            deflated: None,
        });
        let mut o = Outbox::default();
        o.frame(OpCode::Text, b"a");
        o.shared(b.clone(), FrameForm::Plain);
        o.frame(OpCode::Text, b"b");
        o.advance(4); // "\x81\x01a" and "S": a short write went before
        let mut chunks = Vec::new();
        assert_eq!(o.take_chunks(&mut chunks, MAX_IOVECS), 8);
        let got: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
        assert_eq!(got, b"HARED\x81\x01b");
        assert_eq!(
            chunks[0].as_ptr(),
            frame[1..].as_ptr(),
            "the shared frame is not copied"
        );
        assert!(o.is_empty());
        assert_eq!(
            Rc::strong_count(&b),
            1,
            "the outbox let go of the broadcast"
        );
        // At most `max` chunks: the rest stays queued, in order.
        o.shared(shared(b"ONE"), FrameForm::Plain);
        o.shared(shared(b"TWO"), FrameForm::Plain);
        o.frame(OpCode::Text, b"c");
        let mut chunks = Vec::new();
        assert_eq!(o.take_chunks(&mut chunks, 1), 3);
        assert_eq!(&chunks[0][..], b"ONE");
        assert_eq!(o.queued(), 6);
        assert_eq!(written(&o), b"TWO\x81\x01c");
    }

    #[test]
    fn take_front_hands_out_the_front_within_a_limit_without_copying() {
        let mut o = Outbox::default();
        o.frame(OpCode::Text, b"a");
        let b = shared(b"SHARED");
        o.shared(b.clone(), FrameForm::Plain);
        o.frame(OpCode::Text, b"bc");
        // The built frame went into a chunk of its own when the shared one was queued.
        assert_eq!(&o.take_front(2)[..], b"\x81\x01");
        assert_eq!(&o.take_front(100)[..], b"a");
        let part = o.take_front(4);
        assert_eq!(&part[..], b"SHAR");
        let frame = b.frame_for(FrameForm::Plain).unwrap();
        assert_eq!(part.as_ptr(), frame.as_ptr(), "the broadcast was copied");
        assert_eq!(o.queued(), 6);
        assert_eq!(written(&o), b"ED\x81\x02bc");
        assert_eq!(&o.take_front(100)[..], b"ED");
        // The tail, in two parts.
        assert_eq!(&o.take_front(1)[..], b"\x81");
        assert_eq!(&o.take_front(100)[..], b"\x02bc");
        assert!(o.is_empty());
        assert!(o.take_front(100).is_empty());
        // The tail is used again once empty.
        o.frame(OpCode::Text, b"d");
        assert_eq!(written(&o), b"\x81\x01d");
    }

    #[test]
    fn close_frame_body() {
        let mut o = Outbox::default();
        o.close(CloseCode::GOING_AWAY, "bye");
        assert_eq!(written(&o), b"\x88\x05\x03\xe9bye");
    }
}
