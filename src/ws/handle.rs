//! A connection as the rest of its shard sees it: the handle through which the hub, the agent
//! and the shard's tickers reach a connection (its mailbox, a close request, the heartbeat mark)
//! without owning it. The connection's task registers its waker here; everything else only
//! queues and wakes.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::num::NonZeroU64;
use std::rc::Rc;
use std::task::Waker;
use std::time::{Instant, SystemTime};

use super::close::CloseCode;
use super::connection::Close;
use super::mailbox::{Broadcast, Full, Mailbox, Outgoing};

/// One connection's line in `/ws/statistics`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ConnInfo {
    pub id: String,
    /// Seconds since the Unix epoch.
    pub connected_at: f64,
    pub message_count: u64,
    /// Seconds.
    pub uptime: f64,
    pub endpoint: &'static str,
    pub remote: String,
    /// The WebSocket is one stream of an HTTP/2 connection (RFC 8441).
    pub http2: bool,
}

/// A connection as the shard sees it: enough to ask it to close and to report on it.
#[derive(Debug)]
pub struct ConnHandle {
    pub id: u64,
    pub remote: SocketAddr,
    pub connected_at: SystemTime,
    messages: Cell<u64>,
    /// The endpoint's name, set when the connection became a WebSocket.
    endpoint: Cell<Option<&'static str>>,
    http2: Cell<bool>,
    heartbeat_due: Cell<bool>,
    /// When the client's token expires, in seconds since the Unix epoch (never 0: an `exp` of
    /// 0 is kept as 1, as long past; 8 bytes instead of an `Option<u64>`'s 16).
    expires: Cell<Option<NonZeroU64>>,
    close: Cell<Option<Close>>,
    waker: RefCell<Option<Waker>>,
    /// What other parts of the shard send this connection.
    pub mailbox: Mailbox,
}

impl ConnHandle {
    pub fn new(id: u64, remote: SocketAddr) -> ConnHandle {
        ConnHandle {
            id,
            remote,
            connected_at: SystemTime::now(),
            messages: Cell::new(0),
            endpoint: Cell::new(None),
            http2: Cell::new(false),
            heartbeat_due: Cell::new(false),
            expires: Cell::new(None),
            close: Cell::new(None),
            waker: RefCell::new(None),
            mailbox: Mailbox::default(),
        }
    }

    /// Remembers the waker of the task serving this connection (cheap when unchanged).
    pub fn register_waker(&self, w: &Waker) {
        let mut slot = self.waker.borrow_mut();
        match slot.as_ref() {
            Some(old) if old.will_wake(w) => {}
            _ => *slot = Some(w.clone()),
        }
    }

    /// Asks the connection to close; its task is woken to do it.
    pub fn request_close(&self, close: Close) {
        self.close.set(Some(close));
        self.wake();
    }

    /// Marks a heartbeat period as over; the connection pings or times out when it runs.
    pub fn mark_heartbeat(&self) {
        self.heartbeat_due.set(true);
        self.wake();
    }

    /// Queues `item` and wakes the connection; a connection over `max_outbound_bytes` is
    /// closed with 1013 instead (a slow consumer never holds up the sender).
    pub fn send(&self, item: Outgoing, limit: usize) -> bool {
        self.deliver(|m| m.push(item, limit))
    }

    /// [`send`](Self::send) for a broadcast, in this connection's frame form.
    pub fn send_broadcast(
        &self,
        b: &Rc<Broadcast>,
        published: Option<Instant>,
        limit: usize,
    ) -> bool {
        self.deliver(|m| m.push_broadcast(b, published, limit))
    }

    /// [`send_broadcast`](Self::send_broadcast) for `[rooms] write_delay`: queued and held, no
    /// wake-up. `true` when the queue was empty: the caller owes the connection a
    /// [`release_held`](Self::release_held).
    pub fn queue_broadcast(
        &self,
        b: &Rc<Broadcast>,
        published: Option<Instant>,
        limit: usize,
    ) -> bool {
        match self.mailbox.push_broadcast(b, published, limit) {
            Ok(first) => {
                if first {
                    self.mailbox.hold();
                }
                first
            }
            Err(Full) => {
                self.slow_consumer();
                false
            }
        }
    }

    /// Ends a write-delay hold on what this connection has queued, and wakes it to write.
    pub fn release_held(&self) {
        if self.mailbox.release() {
            self.wake();
        }
    }

    fn deliver(&self, push: impl FnOnce(&Mailbox) -> Result<bool, Full>) -> bool {
        match push(&self.mailbox) {
            Ok(first) => {
                // Anything sent directly (a reply) goes out now, with what was held.
                let held = self.mailbox.release();
                if first || held {
                    self.wake();
                }
                true
            }
            Err(Full) => {
                self.slow_consumer();
                false
            }
        }
    }

    fn slow_consumer(&self) {
        if self.close.get().is_none() {
            metrics::counter!(crate::metrics::SLOW_CONSUMERS).increment(1);
            self.request_close(SLOW_CONSUMER);
        }
    }

    /// Closes the connection once `exp` (Unix seconds) has passed; see [`Self::check_expiry`].
    pub fn set_expiry(&self, exp: u64) {
        self.expires
            .set(Some(NonZeroU64::new(exp).unwrap_or(NonZeroU64::MIN)));
    }

    /// Asks the connection to close (1008) when its token expired before `now` (Unix seconds).
    /// The shard calls this once a second, so a session ends within a second or two of `exp`.
    pub fn check_expiry(&self, now: u64) -> bool {
        match self.expires.get() {
            Some(exp) if exp.get() <= now && self.close.get().is_none() => {
                self.expires.set(None);
                self.request_close(TOKEN_EXPIRED);
                true
            }
            _ => false,
        }
    }

    pub fn take_heartbeat(&self) -> bool {
        self.heartbeat_due.replace(false)
    }

    fn wake(&self) {
        if let Some(w) = self.waker.borrow().as_ref() {
            w.wake_by_ref();
        }
    }

    pub fn take_close_request(&self) -> Option<Close> {
        self.close.take()
    }

    pub fn close_requested(&self) -> bool {
        let c = self.close.get();
        c.is_some()
    }

    /// Adds `n` messages received to the connection's count.
    pub fn count_messages(&self, n: u64) {
        self.messages.set(self.messages.get() + n);
    }

    pub fn messages(&self) -> u64 {
        self.messages.get()
    }

    pub fn set_endpoint(&self, name: &'static str) {
        self.endpoint.set(Some(name));
    }

    /// Marks the connection as a stream of an HTTP/2 connection (for `/ws/statistics`).
    pub fn set_http2(&self) {
        self.http2.set(true);
    }

    pub fn info(&self, now: SystemTime) -> Option<ConnInfo> {
        let endpoint = self.endpoint.get()?;
        let since = |t: SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Some(ConnInfo {
            id: format!("{:x}", self.id),
            connected_at: (since(self.connected_at).as_millis() as f64) / 1000.0,
            message_count: self.messages.get(),
            uptime: now
                .duration_since(self.connected_at)
                .unwrap_or_default()
                .as_secs_f64(),
            endpoint,
            remote: self.remote.to_string(),
            http2: self.http2.get(),
        })
    }
}

/// The close for a connection whose outbound queue went over its limit.
pub const SLOW_CONSUMER: Close = Close {
    code: CloseCode::TRY_AGAIN_LATER,
    reason: "slow consumer: outbound queue full",
};

/// The close for a session whose token expired.
pub const TOKEN_EXPIRED: Close = Close {
    code: CloseCode::POLICY,
    reason: "token expired",
};

pub const GOING_AWAY: Close = Close {
    code: CloseCode::GOING_AWAY,
    reason: "server shutting down",
};
