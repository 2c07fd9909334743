//! What other parts of the shard send a connection: room messages, replies that arrive from
//! another shard, agent chunks. The connection's session moves them into its outbox on its next
//! turn, so a broadcast to 10,000 connections is 10,000 cheap queue pushes and wake-ups, and
//! each connection still writes everything queued for it with one vectored write.
//!
//! The queue is bounded in bytes (together with what the session has not written yet): a
//! connection over the limit is a slow consumer and is closed with 1013; it never makes the
//! sender wait or other connections miss a message.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Instant;

use bytes::Bytes;

use super::frame::{payload_offset, OpCode};

/// One item for a connection.
#[derive(Debug, Clone)]
pub enum Outgoing {
    /// A broadcast, written in the connection's [`FrameForm`]. Shared with the
    /// shard's other receivers through an `Rc`: queueing it for 10,000 connections is 10,000
    /// plain increments, where cloning `Bytes` would be 10,000 atomic ones, each waiting for
    /// the cache misses of the queue pushes before it.
    Broadcast(Rc<Broadcast>),
    /// A text message the session frames itself, compressing it with the connection's own
    /// permessage-deflate context when one was negotiated.
    Text(Bytes),
}

/// A broadcast message encoded once for all its receivers.
#[derive(Debug, Clone)]
pub struct Broadcast {
    /// The whole uncompressed text frame.
    pub frame: Bytes,
    /// The whole frame compressed without context takeover (15-bit window), when made.
    pub deflated: Option<Bytes>,
}

impl Broadcast {
    /// The message itself (the frame without its header).
    pub fn payload(&self) -> &[u8] {
        &self.frame[payload_offset(&self.frame)..]
    }

    /// Whether the message is binary (else text).
    pub fn is_binary(&self) -> bool {
        self.frame
            .first()
            .is_some_and(|b| b & 0x0f == OpCode::Binary.as_u8())
    }

    /// The frame a connection of form `t` writes (`None`: it frames the payload itself).
    pub fn frame_for(&self, t: FrameForm) -> Option<&Bytes> {
        match (t, &self.deflated) {
            (FrameForm::Plain, _) | (FrameForm::SharedDeflate, None) => Some(&self.frame),
            (FrameForm::SharedDeflate, Some(d)) => Some(d),
            (FrameForm::OwnDeflate, _) => None,
        }
    }
}

/// Which form of a broadcast's frame a connection writes, fixed when it opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FrameForm {
    /// Uncompressed frames (no permessage-deflate).
    #[default]
    Plain,
    /// permessage-deflate without server context takeover and a 15-bit window: the shared
    /// compressed frame fits as it is.
    SharedDeflate,
    /// Any other permessage-deflate: the session compresses with its own context.
    OwnDeflate,
}

/// The queue was over its limit; the item was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

#[derive(Debug, Default)]
pub struct Mailbox {
    items: RefCell<VecDeque<Outgoing>>,
    /// Bytes in `items`.
    bytes: Cell<usize>,
    /// Bytes the session holds but has not written (its outbox), as of its last turn.
    unwritten: Cell<usize>,
    frame_form: Cell<FrameForm>,
    /// Set once the limit was hit: everything after is dropped.
    overflowed: Cell<bool>,
    /// When the oldest broadcast not yet written was published: the publish-to-write latency
    /// is sampled once the backlog is written out.
    published: Cell<Option<Instant>>,
    /// Broadcasts wait here for the shard's write-delay tick (`[rooms] write_delay`): the
    /// session leaves them, even when it runs for another reason, until released.
    held: Cell<bool>,
    /// Tasks waiting for the backlog to shrink (agent streams under backpressure): woken each
    /// time the session reports what it has not written, so they never poll on a timer. Boxed
    /// when there are any: every connection has a mailbox, few ever have a waiter.
    #[allow(clippy::box_collection)]
    drain_waiters: RefCell<Option<Box<Vec<Waker>>>>,
}

impl Mailbox {
    pub fn set_frame_form(&self, t: FrameForm) {
        self.frame_form.set(t);
    }

    pub fn frame_form(&self) -> FrameForm {
        self.frame_form.get()
    }

    /// Whether the limit was hit: the connection is a slow consumer and gets nothing more.
    pub fn overflowed(&self) -> bool {
        self.overflowed.get()
    }

    /// Bytes waiting for this connection, queued here or in its session.
    pub fn backlog(&self) -> usize {
        self.bytes.get() + self.unwritten.get()
    }

    /// Records what the session has not written yet. Returns when the oldest broadcast it
    /// held was published, once everything queued is written (for the publish-to-write latency).
    pub fn set_unwritten(&self, n: usize) -> Option<Instant> {
        self.unwritten.set(n);
        let cleared = if n == 0 && self.bytes.get() == 0 {
            self.published.take()
        } else {
            None
        };
        let waiters = self.drain_waiters.borrow_mut().take();
        for w in waiters.into_iter().flat_map(|w| *w) {
            w.wake();
        }
        cleared
    }

    /// Resolves once the backlog is at most `mark` bytes (or the queue overflowed: the
    /// connection is closing). The session wakes waiters after each turn.
    pub fn wait_below(&self, mark: usize) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.backlog() <= mark || self.overflowed.get() {
                return Poll::Ready(());
            }
            let mut waiters = self.drain_waiters.borrow_mut();
            let waiters = waiters.get_or_insert_with(Box::default);
            if !waiters.iter().any(|w| w.will_wake(cx.waker())) {
                waiters.push(cx.waker().clone());
            }
            Poll::Pending
        })
    }

    pub fn is_empty(&self) -> bool {
        self.items.borrow().is_empty()
    }

    /// Whether the session should take what is queued now (something is, and it is not held).
    pub fn has_mail(&self) -> bool {
        !self.held.get() && !self.is_empty()
    }

    /// Keeps what is queued from the session until [`release`](Self::release).
    pub fn hold(&self) {
        self.held.set(true);
    }

    /// Ends a hold; `true` if there was one (the session must then be woken).
    pub fn release(&self) -> bool {
        self.held.replace(false)
    }

    /// Queues `item` unless that would take the backlog over `limit`. `Ok(true)`: the queue
    /// was empty, so the session must be woken; otherwise a wake-up is already pending (the
    /// session empties the whole queue each time it runs), and waking a task that is already
    /// scheduled would only cost an atomic on its header per delivery.
    pub fn push(&self, item: Outgoing, limit: usize) -> Result<bool, Full> {
        let len = match &item {
            Outgoing::Broadcast(b) => b.frame_for(self.frame_form.get()).unwrap_or(&b.frame).len(),
            Outgoing::Text(t) => t.len(),
        };
        if self.overflowed.get() || self.backlog() + len > limit {
            self.overflowed.set(true);
            self.items.borrow_mut().clear();
            self.bytes.set(0);
            return Err(Full);
        }
        self.bytes.set(self.bytes.get() + len);
        let mut items = self.items.borrow_mut();
        items.push_back(item);
        Ok(items.len() == 1)
    }

    /// Queues a broadcast (written in this connection's frame form); `published` is when it
    /// was published (none for a replay from history).
    pub fn push_broadcast(
        &self,
        b: &Rc<Broadcast>,
        published: Option<Instant>,
        limit: usize,
    ) -> Result<bool, Full> {
        let first = self.push(Outgoing::Broadcast(b.clone()), limit)?;
        if self.published.get().is_none() {
            self.published.set(published);
        }
        Ok(first)
    }

    /// Hands every queued item to `f`, in order.
    pub fn drain(&self, mut f: impl FnMut(Outgoing)) {
        let mut items = self.items.borrow_mut();
        self.bytes.set(0);
        for item in items.drain(..) {
            f(item);
        }
    }

    /// Frees the queue's memory once it is empty (idle connections).
    pub fn shrink(&self) {
        let mut items = self.items.borrow_mut();
        if items.is_empty() {
            *items = VecDeque::new();
        }
    }

    /// Drops everything queued (the connection is closing).
    pub fn clear(&self) {
        self.items.borrow_mut().clear();
        self.bytes.set(0);
        self.published.set(None);
        self.held.set(false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::frame::{write_frame, OpCode};

    fn broadcast(payload: &[u8]) -> Rc<Broadcast> {
        let mut f = Vec::new();
        write_frame(&mut f, OpCode::Text, payload);
        Rc::new(Broadcast {
            frame: Bytes::from(f),
            deflated: Some(Bytes::from_static(b"DEFLATED")),
        })
    }

    fn drained(m: &Mailbox) -> Vec<Outgoing> {
        let mut v = Vec::new();
        m.drain(|o| v.push(o));
        v
    }

    #[test]
    fn each_connection_gets_its_frame_form() {
        let b = broadcast(b"hello");
        assert_eq!(
            b.frame_for(FrameForm::Plain).map(|f| &f[..]),
            Some(&b"\x81\x05hello"[..])
        );
        assert_eq!(
            b.frame_for(FrameForm::SharedDeflate).map(|f| &f[..]),
            Some(&b"DEFLATED"[..])
        );
        assert_eq!(b.frame_for(FrameForm::OwnDeflate), None);
        assert_eq!(b.payload(), b"hello");
        // The queue counts the bytes of the form the connection writes.
        let m = Mailbox::default();
        m.set_frame_form(FrameForm::SharedDeflate);
        m.push_broadcast(&b, None, 1000).unwrap();
        assert_eq!(m.backlog(), 8);
        let got = drained(&m);
        assert!(matches!(&got[0], Outgoing::Broadcast(x) if Rc::ptr_eq(x, &b)));
        assert_eq!(m.backlog(), 0);
    }

    #[test]
    fn waiters_wake_when_the_session_reports_progress() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        use std::sync::Arc;
        use std::task::{Context, Wake};
        struct Count(AtomicUsize);
        impl Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);
        let m = Mailbox::default();
        m.set_unwritten(100);
        let mut wait = std::pin::pin!(m.wait_below(50));
        assert!(wait.as_mut().poll(&mut cx).is_pending());
        assert!(wait.as_mut().poll(&mut cx).is_pending());
        m.set_unwritten(80); // progress, still above: woken once, waits again
        assert_eq!(count.0.load(Ordering::SeqCst), 1);
        assert!(wait.as_mut().poll(&mut cx).is_pending());
        m.set_unwritten(10);
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
        assert!(wait.as_mut().poll(&mut cx).is_ready());
    }

    #[test]
    fn only_the_first_item_since_the_session_emptied_the_queue_asks_for_a_wake_up() {
        let m = Mailbox::default();
        let text = || Outgoing::Text(Bytes::from_static(b"x"));
        assert_eq!(m.push(text(), 100), Ok(true));
        assert_eq!(m.push(text(), 100), Ok(false));
        assert_eq!(m.push_broadcast(&broadcast(b"y"), None, 100), Ok(false));
        assert_eq!(drained(&m).len(), 3);
        assert_eq!(m.push_broadcast(&broadcast(b"y"), None, 100), Ok(true));
        m.clear();
        assert_eq!(m.push(text(), 100), Ok(true));
    }

    #[test]
    fn held_mail_waits_for_its_release() {
        let m = Mailbox::default();
        assert!(!m.has_mail());
        assert_eq!(m.push_broadcast(&broadcast(b"a"), None, 100), Ok(true));
        m.hold();
        assert!(!m.has_mail(), "held: the session leaves it");
        assert_eq!(m.push_broadcast(&broadcast(b"b"), None, 100), Ok(false));
        assert!(!m.has_mail());
        assert!(m.release());
        assert!(!m.release(), "released once");
        assert!(m.has_mail());
        assert_eq!(drained(&m).len(), 2);
        m.hold();
        m.clear();
        assert!(!m.release(), "clear ends a hold");
    }

    #[test]
    fn over_the_limit_drops_everything_from_then_on() {
        let m = Mailbox::default();
        m.push(Outgoing::Text(Bytes::from_static(b"0123456789")), 25)
            .unwrap();
        m.set_unwritten(10);
        assert_eq!(m.backlog(), 20);
        assert_eq!(
            m.push(Outgoing::Text(Bytes::from_static(b"0123456789")), 25),
            Err(Full)
        );
        // Overflow is sticky: a slow consumer gets nothing more, even when it catches up.
        m.set_unwritten(0);
        assert_eq!(
            m.push(Outgoing::Text(Bytes::from_static(b"x")), 25),
            Err(Full)
        );
        assert!(drained(&m).is_empty());
    }
}
