//! A `/ws` connection: parses client requests, enforces the per-connection limits, and turns
//! requests into hub calls. Replies to client errors go straight to the connection; everything
//! the home shard answers arrives through the connection's mailbox.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use super::config::RoomsConfig;
use super::proto::{self, ClientError, Code, Request};
use super::room::Member;
use super::{ConnRef, HubMsg, Payload, PublishOpts, Reply, SharedHub};
use crate::auth::{Identity, TopicAction, ANONYMOUS};
use crate::ratelimit::TokenBucket;
use crate::ws::connection::{Close, Handler, Message, ToClient};
use crate::ws::handle::ConnHandle;
use crate::ws::mailbox::FrameForm;

/// A subscription's state on the subscriber's shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sub {
    /// Asked the home shard (request number `n`); not on the delivery list yet. Only the
    /// answer to that request activates it: an answer to an earlier subscribe, given up with
    /// an unsubscribe since, must not (its replay would be the wrong one).
    Pending(u64),
    /// On the delivery list under this key.
    Active(usize),
}

/// What the hub knows of a `/ws` connection.
pub struct RoomConn {
    pub entry: Rc<ConnHandle>,
    pub client_id: Arc<str>,
    pub user: Arc<str>,
    pub topics: RefCell<HashMap<Arc<str>, Sub>>,
}

impl RoomConn {
    /// The connection as a presence member joining at `wall` (seconds since the Unix epoch).
    pub fn member(&self, wall: f64) -> Member {
        Member {
            client_id: self.client_id.clone(),
            user: self.user.clone(),
            joined_at: wall,
            listed: true,
        }
    }

    pub fn shared_deflate(&self) -> bool {
        self.entry.mailbox.frame_form() == FrameForm::SharedDeflate
    }

    /// Who published: the user when authenticated, else the connection.
    fn from(&self) -> Arc<str> {
        if &*self.user == ANONYMOUS {
            self.client_id.clone()
        } else {
            self.user.clone()
        }
    }
}

thread_local! {
    /// simd-json parses in place: requests are copied here first.
    static PARSE_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// The `/ws` endpoint's session handler.
pub struct RoomsHandler {
    hub: Rc<SharedHub>,
    shard: usize,
    cfg: Rc<RoomsConfig>,
    conn: Rc<RoomConn>,
    publishes: TokenBucket,
    /// Every other request.
    requests: TokenBucket,
    /// Permissions from the token, or an anonymous client's; `None` when `[auth]` is off (no
    /// restriction).
    identity: Option<Identity>,
}

impl RoomsHandler {
    pub fn new(
        hub: Rc<SharedHub>,
        shard: usize,
        cfg: Rc<RoomsConfig>,
        entry: Rc<ConnHandle>,
        identity: Option<Identity>,
    ) -> RoomsHandler {
        let now = Instant::now();
        let publishes = TokenBucket::new(cfg.publish_rate, cfg.publish_burst, now);
        let requests = TokenBucket::new(cfg.request_rate, cfg.request_burst, now);
        let conn = Rc::new(RoomConn {
            client_id: hub.client_id(entry.id),
            user: identity
                .as_ref()
                .map_or_else(|| ANONYMOUS.into(), |i| i.user.clone()),
            entry,
            topics: RefCell::new(HashMap::new()),
        });
        RoomsHandler {
            hub,
            shard,
            cfg,
            conn,
            publishes,
            requests,
            identity,
        }
    }

    fn me(&self) -> ConnRef {
        ConnRef {
            shard: self.shard,
            conn: self.conn.entry.id,
        }
    }

    /// The checks every request passes, in one place: topic length, the one authorization
    /// rule of `auth`, and the connection's rate limits.
    fn admit(&mut self, req: &Request<'_>) -> Result<(), ClientError> {
        let publish = matches!(req, Request::Publish { .. });
        self.check(req.topic(), req.topic_action(), publish)
    }

    /// [`admit`](Self::admit) for the parts of a request: the topic it names, what it does
    /// with it (for authorization), and whether it is a publish (which rate limit).
    fn check(
        &mut self,
        topic: Option<&str>,
        action: Option<(TopicAction, &str)>,
        publish: bool,
    ) -> Result<(), ClientError> {
        let cfg = &self.cfg;
        if let Some(topic) = topic {
            if topic.len() > cfg.max_topic_length {
                return Err(ClientError::new(
                    Code::TooLarge,
                    format!("topic is longer than {} bytes", cfg.max_topic_length),
                ));
            }
        }
        if let Some((action, topic)) = action {
            if let Some(identity) = &self.identity {
                if !identity.may(action, topic) {
                    return Err(ClientError::new(
                        Code::Forbidden,
                        format!(
                            "not allowed to {} {}",
                            action.verb(),
                            proto::json_str(topic)
                        ),
                    ));
                }
            }
        }
        let now = Instant::now();
        let (bucket, rate, what) = if publish {
            (&mut self.publishes, cfg.publish_rate, "publishes")
        } else {
            (&mut self.requests, cfg.request_rate, "requests")
        };
        if !bucket.try_take(now) {
            return Err(ClientError::new(
                Code::RateLimited,
                format!("more than {rate} {what} per second"),
            ));
        }
        Ok(())
    }

    fn request(
        &mut self,
        id: Option<String>,
        req: Request<'_>,
        out: &mut ToClient<'_>,
    ) -> Result<(), ClientError> {
        self.admit(&req)?;
        let cfg = &self.cfg;
        let hub = &self.hub;
        match req {
            Request::Subscribe {
                topic,
                since,
                epoch,
            } => {
                let topics = self.conn.topics.borrow().len();
                if topics >= cfg.max_topics_per_connection && !self.subscribed(topic) {
                    return Err(ClientError::new(
                        Code::TooLarge,
                        format!(
                            "a connection may subscribe to at most {} topics",
                            cfg.max_topics_per_connection
                        ),
                    ));
                }
                hub.with(|hub, now| hub.subscribe(now, &self.conn, topic, since, epoch, id));
            }
            Request::Unsubscribe { topic } => {
                if !hub.with(|hub, now| hub.unsubscribe(now, &self.conn, topic)) {
                    return Err(ClientError::new(
                        Code::NotSubscribed,
                        format!("not subscribed to {}", proto::json_str(topic)),
                    ));
                }
                if id.is_some() {
                    out.text(proto::unsubscribed(topic, id.as_deref()).as_bytes());
                }
            }
            Request::Publish {
                topic,
                kind,
                data,
                volatile,
                trace,
            } => {
                if data.len() > cfg.max_data_size {
                    return Err(ClientError::new(
                        Code::TooLarge,
                        format!("data is larger than {} bytes", cfg.max_data_size),
                    ));
                }
                if cfg.is_binary(topic) {
                    return Err(ClientError::new(
                        Code::BadBinary,
                        format!(
                            "{} is a binary topic: publish binary messages",
                            proto::json_str(topic)
                        ),
                    ));
                }
                if proto::is_reserved_type(kind) {
                    return Err(ClientError::new(
                        Code::Forbidden,
                        format!("{} is a server message type", proto::json_str(kind)),
                    ));
                }
                let reply = Reply::Conn { to: self.me(), id };
                let msg = HubMsg::Publish {
                    topic: topic.into(),
                    kind: kind.into(),
                    data: data.into(),
                    from: Some(self.conn.from()),
                    reply,
                    opts: PublishOpts {
                        volatile,
                        trace: trace.map(Into::into),
                    },
                };
                hub.with(|hub, now| hub.route(now, topic, msg));
            }
            Request::Presence { topic } => {
                let msg = HubMsg::Presence {
                    topic: topic.into(),
                    reply: Reply::Conn { to: self.me(), id },
                };
                hub.with(|hub, now| hub.route(now, topic, msg));
            }
            Request::History {
                topic,
                since,
                limit,
            } => {
                let max = cfg.history_size;
                let limit = limit.map_or(max, |l| (l as usize).min(max));
                let msg = HubMsg::History {
                    topic: topic.into(),
                    since: since.unwrap_or(0),
                    limit,
                    reply: Reply::Conn { to: self.me(), id },
                };
                hub.with(|hub, now| hub.route(now, topic, msg));
            }
            Request::Ping => out.text(proto::pong(id.as_deref()).as_bytes()),
        }
        Ok(())
    }

    /// A binary message: a publish to a binary topic in the binary envelope, relayed as it is.
    fn binary(&mut self, msg: &[u8]) -> Result<(), ClientError> {
        if !self.cfg.topic.iter().any(|r| r.binary) {
            return Err(ClientError::new(
                Code::BadJson,
                "messages are JSON text frames",
            ));
        }
        let p = proto::parse_binary(msg)?;
        let topic = p.topic;
        self.check(Some(topic), Some((TopicAction::Publish, topic)), true)?;
        if !self.cfg.is_binary(topic) {
            return Err(ClientError::new(
                Code::BadBinary,
                format!(
                    "{} is not a binary topic: messages are JSON text frames",
                    proto::json_str(topic)
                ),
            ));
        }
        if p.payload.len() > self.cfg.max_data_size {
            return Err(ClientError::new(
                Code::TooLarge,
                format!("payload is larger than {} bytes", self.cfg.max_data_size),
            ));
        }
        let msg = HubMsg::Publish {
            topic: topic.into(),
            kind: "message".into(),
            data: Payload::Binary(Bytes::copy_from_slice(p.payload)),
            from: Some(self.conn.from()),
            reply: Reply::None,
            opts: PublishOpts {
                volatile: Some(p.volatile),
                trace: None,
            },
        };
        self.hub.with(|hub, now| hub.route(now, topic, msg));
        Ok(())
    }

    fn subscribed(&self, topic: &str) -> bool {
        self.conn.topics.borrow().contains_key(topic)
    }
}

impl Handler for RoomsHandler {
    fn on_open(&mut self, out: &mut ToClient<'_>) {
        out.text(proto::connected(&self.conn.client_id).as_bytes());
        self.hub.with(|hub, _| hub.attach(self.conn.clone()));
    }

    fn on_message(&mut self, msg: Message<'_>, out: &mut ToClient<'_>) -> Result<(), Close> {
        let text = match msg {
            Message::Text(text) => text,
            Message::Binary(bin) => {
                if let Err(e) = self.binary(bin) {
                    out.text(proto::error(&e, None).as_bytes());
                }
                return Ok(());
            }
        };
        PARSE_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            buf.clear();
            buf.extend_from_slice(text);
            proto::parse(&mut buf, |id, req| {
                let res = req.and_then(|r| self.request(id.clone(), r, out));
                if let Err(e) = res {
                    out.text(proto::error(&e, id.as_deref()).as_bytes());
                }
            });
            if buf.capacity() > 1 << 20 {
                *buf = Vec::new();
            }
        });
        Ok(())
    }
}

impl Drop for RoomsHandler {
    fn drop(&mut self) {
        // The connection is gone, cleanly or not: leave every topic exactly once.
        let id = self.conn.entry.id;
        if self.hub.try_with(|hub, now| hub.detach(now, id)).is_none() {
            tracing::error!("rooms connection dropped while the hub was busy");
        }
    }
}

impl Request<'_> {
    /// The topic the request names, if any.
    pub fn topic(&self) -> Option<&str> {
        match self {
            Request::Subscribe { topic, .. }
            | Request::Unsubscribe { topic }
            | Request::Publish { topic, .. }
            | Request::Presence { topic }
            | Request::History { topic, .. } => Some(topic),
            Request::Ping => None,
        }
    }

    /// The topic the request names and what it does with it, for authorization.
    /// Unsubscribing needs no permission: it only gives one up.
    pub fn topic_action(&self) -> Option<(TopicAction, &str)> {
        match self {
            Request::Subscribe { topic, .. } => Some((TopicAction::Subscribe, topic)),
            Request::Publish { topic, .. } => Some((TopicAction::Publish, topic)),
            Request::Presence { topic } => Some((TopicAction::Presence, topic)),
            Request::History { topic, .. } => Some((TopicAction::History, topic)),
            Request::Unsubscribe { .. } | Request::Ping => None,
        }
    }
}
