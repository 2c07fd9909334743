//! One shard: its listener, its connections, its drain. Everything here is owned by the shard's
//! thread (`Rc`, `Cell`): no locks. The process-wide [`ServerState`] holds only what must be shared,
//! touched once per connection, never per message.

use std::cell::{Cell, RefCell};
use std::future::poll_fn;
use std::hash::BuildHasher;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Poll, Waker};
use std::time::{Instant, SystemTime};

use slab::Slab;
use tokio::sync::{mpsc, Notify};

use super::endpoint::Endpoint;
use super::failure::critical;
use super::io::{Backend, Listener};
use crate::metrics::Traffic;
use crate::server::config::Config;
use crate::ws::connection::Settings;
use crate::ws::handle::{ConnHandle, ConnInfo, GOING_AWAY};

/// State shared by all shards.
#[derive(Debug)]
pub struct ServerState {
    pub config: Config,
    pub backend: Backend,
    /// Set when a drain starts: `/readyz` answers 503 from then on.
    pub draining: AtomicBool,
    /// Open WebSocket connections, for `max_connections`.
    pub ws_active: AtomicUsize,
    pub ws_total: AtomicU64,
    /// Every shard's control channel, for gathering from all of them (statistics).
    pub shards: std::sync::OnceLock<Vec<mpsc::UnboundedSender<Control>>>,
    /// Renders `/metrics`; `None` when another recorder was installed first (embedding).
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Verifies client tokens; `None` when `[auth]` is off.
    pub auth: Option<crate::auth::Verifier>,
    /// A shard failed: `/readyz` answers 503 until the process exits.
    pub failed: AtomicBool,
    /// Some listener is an admin listener (then only those serve the admin surface).
    pub has_admin_listener: bool,
    /// Connection caps and handshake rates.
    pub admission: Arc<super::admission::Admission>,
    /// `POST /publish` per client at `[rooms] publish_rate` (a socket's limit, for callers
    /// without one); process-wide, as a client's requests land on any shard.
    pub http_publishes: std::sync::Mutex<crate::ratelimit::KeyedBuckets<super::admission::Caller>>,
    /// Rooms messages queued for each shard by the others and not yet handled: the bound of
    /// the cross-shard channels (`[rooms] max_shard_backlog`).
    pub hub_backlog: Box<[Backlog]>,
    /// Shards without a connection to Redis (`[cluster] engine = "redis"`). Every shard
    /// counts from the start, so a shard whose link has not run yet is not taken for ready.
    pub redis_down: AtomicUsize,
}

/// One shard's inbound rooms backlog, alone on its cache line: every shard writes it, and the
/// counters of different shards must not contend with each other.
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct Backlog(pub AtomicUsize);

impl std::ops::Deref for Backlog {
    type Target = AtomicUsize;
    fn deref(&self) -> &AtomicUsize {
        &self.0
    }
}

impl ServerState {
    pub fn new(config: Config, backend: Backend, shards: usize) -> ServerState {
        ServerState {
            hub_backlog: (0..shards).map(|_| Backlog::default()).collect(),
            has_admin_listener: config.has_admin_listener(),
            failed: AtomicBool::new(false),
            // Every shard counts as down until its link is up: none is ready before it started.
            redis_down: AtomicUsize::new(if config.cluster.is_redis() { shards } else { 0 }),
            admission: Arc::new(super::admission::Admission::new(
                &config.limits,
                super::nofile_limit(),
            )),
            http_publishes: std::sync::Mutex::new(crate::ratelimit::KeyedBuckets::new(
                config.rooms.publish_rate,
                config.rooms.publish_burst,
            )),
            config,
            backend,
            metrics: None,
            auth: None,
            shards: std::sync::OnceLock::new(),
            draining: AtomicBool::new(false),
            ws_active: AtomicUsize::new(0),
            ws_total: AtomicU64::new(0),
        }
    }

    /// Takes a WebSocket slot, or `None` when `max_connections` are open.
    pub fn try_admit_ws(self: &Arc<Self>) -> Option<WsSlot> {
        let max = self.config.max_connections;
        let prev = self.ws_active.fetch_add(1, Ordering::AcqRel);
        if max != 0 && prev >= max {
            self.ws_active.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        self.ws_total.fetch_add(1, Ordering::Relaxed);
        Some(WsSlot(self.clone()))
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }
}

/// An admitted WebSocket connection; frees its slot when dropped.
#[derive(Debug)]
pub struct WsSlot(Arc<ServerState>);

impl Drop for WsSlot {
    fn drop(&mut self) {
        self.0.ws_active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What the main thread tells a shard.
pub enum Control {
    /// Stop accepting, close every connection with 1001, finish when all are gone.
    Drain,
    /// Use this TLS configuration for handshakes from now on.
    Tls(tokio_rustls::TlsAcceptor),
    /// Report this shard's connections (for `/ws/statistics`).
    Stats(tokio::sync::oneshot::Sender<ShardStats>),
    /// Rooms traffic from another shard.
    Hub(crate::rooms::HubMsg),
    /// Use this route table for new requests from now on.
    Routes(Arc<Vec<crate::proxy::config::Route>>),
}

/// One shard's part of `/ws/statistics`.
#[derive(Debug, Default)]
pub struct ShardStats {
    pub active: usize,
    /// Messages received since start, including on closed connections.
    pub messages: u64,
    /// At most [`STATS_LIST_LIMIT`] WebSocket connections.
    pub connections: Vec<ConnInfo>,
    pub truncated: bool,
    /// The proxy's routes as this shard sees them.
    pub routes: Vec<crate::proxy::RouteStats>,
}

/// How many connections one shard lists in `/ws/statistics`.
pub const STATS_LIST_LIMIT: usize = 1000;

/// A shard's own state.
pub struct Shard {
    pub id: usize,
    pub global: Arc<ServerState>,
    /// Session settings per endpoint (`Endpoint as usize`): they differ in `max_message`.
    settings: [Settings; Endpoint::ALL.len()],
    /// Message and byte counts per endpoint (`Endpoint as usize`), published once a second.
    traffic: [Traffic; Endpoint::ALL.len()],
    /// The TLS acceptor new connections use, when the listener is TLS.
    pub tls: RefCell<Option<crate::io::tls::Acceptors>>,
    conns: RefCell<Slab<Rc<ConnHandle>>>,
    draining: Cell<bool>,
    /// Wakes the drain when the last connection leaves.
    drained: RefCell<Option<Waker>>,
    /// Messages received on connections that have closed.
    closed_messages: Cell<u64>,
    next_id: Cell<u64>,
    /// Rooms homed here and this shard's subscribers.
    pub hub: Rc<crate::rooms::SharedHub>,
    /// `[rooms]`, shared by this shard's `/ws` connections.
    pub rooms_config: Rc<crate::rooms::config::RoomsConfig>,
    /// The reverse proxy's route table as this shard runs it.
    pub proxy: RefCell<Rc<crate::proxy::Proxy>>,
}

impl Shard {
    pub fn new(
        id: usize,
        global: Arc<ServerState>,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> Rc<Shard> {
        let c = &global.config;
        let settings = Settings {
            max_message: c.max_message_size,
            heartbeat: c.heartbeat(),
            close_timeout: c.close_timeout(),
            compression: crate::ws::deflate::Tuning {
                level: c.compression.level,
                threshold: c.compression.threshold,
            },
        };
        // Epochs must differ from every earlier run's: seeded from the clock and the process's
        // random hash keys.
        let epoch_seed = std::collections::hash_map::RandomState::new().hash_one((
            id,
            SystemTime::now(),
            std::process::id(),
        ));
        let mut hub = crate::rooms::Hub::new(
            id,
            global.shards.get().map_or(1, |s| s.len()),
            c.rooms.clone(),
            settings.compression,
            c.max_outbound_bytes,
            epoch_seed,
        );
        if c.cluster.is_redis() {
            hub = hub.with_redis(&c.cluster);
        }
        let with_max = |max_message: usize| Settings {
            max_message,
            ..settings.clone()
        };
        let settings = Endpoint::ALL.map(|e| match e {
            Endpoint::Echo => with_max(c.max_message_size),
            Endpoint::Rooms => with_max(c.rooms.max_message_size.min(c.max_message_size)),
            Endpoint::Agent => with_max(c.agent.max_message_size.min(c.max_message_size)),
            // A relayed WebSocket carries the upstream service's messages: the top-level limit.
            Endpoint::Proxy => with_max(c.max_message_size),
        });
        let proxy = crate::proxy::Proxy::new(&c.route, c.builtin_paths(), global.backend, id);
        Rc::new(Shard {
            id,
            hub: Rc::new(crate::rooms::SharedHub::new(hub)),
            rooms_config: Rc::new(c.rooms.clone()),
            proxy: RefCell::new(Rc::new(proxy)),
            settings,
            global,
            tls: RefCell::new(tls.map(Into::into)),
            traffic: Default::default(),
            conns: RefCell::new(Slab::new()),
            draining: Cell::new(false),
            drained: RefCell::new(None),
            closed_messages: Cell::new(0),
            next_id: Cell::new(0),
        })
    }

    /// Registers a new connection; it is removed when the returned guard drops.
    pub fn register(self: &Rc<Self>, remote: SocketAddr) -> Registration {
        let n = self.next_id.get();
        self.next_id.set(n + 1);
        let entry = Rc::new(ConnHandle::new((self.id as u64) << 48 | n, remote));
        if self.draining.get() {
            entry.request_close(GOING_AWAY);
        }
        let key = self.conns.borrow_mut().insert(entry.clone());
        Registration {
            shard: self.clone(),
            key,
            entry,
        }
    }

    pub fn settings(&self, endpoint: Endpoint) -> &Settings {
        &self.settings[endpoint as usize]
    }

    pub fn traffic(&self, endpoint: Endpoint) -> &Traffic {
        &self.traffic[endpoint as usize]
    }

    /// Closes the sessions whose token has expired.
    fn expire_tokens(&self) {
        let now = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        let mut closed = 0u64;
        for (_, e) in self.conns.borrow().iter() {
            closed += u64::from(e.check_expiry(now));
        }
        if closed > 0 {
            metrics::counter!(crate::metrics::TOKENS_EXPIRED).increment(closed);
        }
    }

    fn publish_metrics(&self) {
        for e in Endpoint::ALL {
            self.traffic(e).publish(e.name());
        }
        let queued: usize = self
            .conns
            .borrow()
            .iter()
            .map(|(_, e)| e.mailbox.backlog())
            .sum();
        metrics::gauge!(crate::metrics::OUTBOUND_BYTES, "shard" => self.id.to_string())
            .set(queued as f64);
        if let Some(backlog) = self.global.hub_backlog.get(self.id) {
            metrics::gauge!(crate::metrics::HUB_BACKLOG, "shard" => self.id.to_string())
                .set(backlog.load(Ordering::Relaxed) as f64);
        }
    }

    /// This shard's part of `/ws/statistics`.
    pub fn stats(&self) -> ShardStats {
        let now = SystemTime::now();
        let conns = self.conns.borrow();
        let mut s = ShardStats {
            messages: self.closed_messages.get(),
            routes: self.proxy.borrow().stats(),
            ..ShardStats::default()
        };
        for (_, e) in conns.iter() {
            s.messages += e.messages();
            let Some(info) = e.info(now) else { continue };
            s.active += 1;
            if s.connections.len() < STATS_LIST_LIMIT {
                s.connections.push(info);
            } else {
                s.truncated = true;
            }
        }
        s
    }

    pub fn connection_count(&self) -> usize {
        self.conns.borrow().len()
    }

    /// Serves until told to drain, then until every connection has closed.
    pub async fn run(
        self: Rc<Self>,
        listeners: Vec<(Listener, crate::server::config::Listen)>,
        mut control: mpsc::UnboundedReceiver<Control>,
    ) {
        let mut accepting = Vec::new();
        let listeners: Vec<_> = listeners
            .into_iter()
            .map(|(l, spec)| {
                let l = Rc::new(l);
                accepting.push(tokio::task::spawn_local(critical(
                    self.global.clone(),
                    self.id,
                    "accept loop",
                    accept_loop(self.clone(), l.clone(), spec),
                )));
                l
            })
            .collect();
        let redis = self.global.config.cluster.is_redis().then(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::task::spawn_local(redis_link(self.clone(), rx));
            tx
        });
        let links = Rc::new(HubLinks {
            global: self.global.clone(),
            peers: self.global.shards.get().cloned().unwrap_or_default(),
            redis,
            deadline: Cell::new(None),
            changed: Notify::new(),
        });
        let flushing = links.clone();
        self.hub.set_flush(Box::new(move |hub| flushing.flush(hub)));
        let (g, id) = (&self.global, self.id);
        tokio::task::spawn_local(critical(
            g.clone(),
            id,
            "metrics ticker",
            publish_metrics(self.clone()),
        ));
        self.proxy.borrow().start();
        if let Some(period) = self.global.config.heartbeat() {
            tokio::task::spawn_local(critical(
                g.clone(),
                id,
                "heartbeat ticker",
                heartbeats(self.clone(), period),
            ));
        }
        if self.global.config.rooms.uses_timer() {
            tokio::task::spawn_local(critical(
                g.clone(),
                id,
                "write-delay ticker",
                delayed_writes(self.clone(), links),
            ));
        }
        // A closed control channel means the main thread is gone: drain too.
        loop {
            match control.recv().await {
                Some(Control::Tls(acceptor)) => {
                    *self.tls.borrow_mut() = Some(acceptor.into());
                    tracing::info!(shard = self.id, "TLS certificate reloaded");
                }
                Some(Control::Stats(reply)) => {
                    crate::error::inject_panic("shard-loop");
                    let _ = reply.send(self.stats());
                }
                Some(Control::Hub(msg)) => {
                    if let Some(queued) = self.global.hub_backlog.get(self.id) {
                        queued.fetch_sub(1, Ordering::Relaxed);
                    }
                    super::failure::inject_stall(&msg);
                    self.hub.with(|hub, now| hub.handle(now, msg))
                }
                Some(Control::Routes(routes)) => {
                    let c = &self.global.config;
                    let new = crate::proxy::Proxy::new(
                        &routes,
                        c.builtin_paths(),
                        self.global.backend,
                        self.id,
                    );
                    new.start();
                    let old = self.proxy.replace(Rc::new(new));
                    old.retire();
                }
                Some(Control::Drain) | None => break,
            }
        }
        self.draining.set(true);
        // Stop accepting and close this process's copy of the listeners. Never shutdown(2)
        // them: a successor may accept on the same sockets (handover).
        for a in accepting {
            a.abort();
            let _ = a.await;
        }
        drop(listeners);
        let entries: Vec<_> = self.conns.borrow().iter().map(|(_, e)| e.clone()).collect();
        for e in entries {
            e.request_close(GOING_AWAY);
        }
        poll_fn(|cx| {
            if self.conns.borrow().is_empty() {
                return Poll::Ready(());
            }
            *self.drained.borrow_mut() = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
        self.publish_metrics();
        tracing::debug!(shard = self.id, "drained");
    }
}

/// Keeps a connection in its shard's registry while alive.
pub struct Registration {
    shard: Rc<Shard>,
    key: usize,
    pub entry: Rc<ConnHandle>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut conns = self.shard.conns.borrow_mut();
        conns.remove(self.key);
        let closed = &self.shard.closed_messages;
        closed.set(closed.get() + self.entry.messages());
        if conns.is_empty() {
            if let Some(w) = self.shard.drained.borrow_mut().take() {
                w.wake();
            }
        }
    }
}

/// Publishes the shard's counters once a second (see `crate::metrics`).
async fn publish_metrics(shard: Rc<Shard>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !shard.draining.get() {
        tick.tick().await;
        shard.publish_metrics();
        if shard.global.auth.is_some() {
            shard.expire_tokens();
        }
        shard.hub.with(|hub, now| hub.sweep(now));
    }
}

/// Where this shard's hub outputs go: the shards' control channels, and the deadline of the
/// write-delay task.
struct HubLinks {
    global: Arc<ServerState>,
    peers: Vec<mpsc::UnboundedSender<Control>>,
    /// This shard's connection to Redis, with `[cluster] engine = "redis"`. Unbounded as a
    /// channel, bounded by the hub (`max_pending`).
    redis: Option<mpsc::UnboundedSender<crate::cluster::Command>>,
    /// The hub's [`poll_timeout`](crate::rooms::Hub::poll_timeout) as last seen.
    deadline: Cell<Option<Instant>>,
    changed: Notify,
}

impl HubLinks {
    /// Sends what the hub produced, in order (each pair of shards stays FIFO), and tells the
    /// write-delay task when its deadline changed.
    ///
    /// Each message sent counts in its receiver's backlog; a receiver at `max_shard_backlog`
    /// is marked congested in this hub (which then refuses requests that would add to it)
    /// until its backlog is down to half, with hysteresis so the mark does not flap.
    fn flush(&self, hub: &mut crate::rooms::Hub) {
        let backlog = &self.global.hub_backlog;
        let limit = self.global.config.rooms.max_shard_backlog;
        if hub.any_congested() {
            hub.recheck_congested(|s| {
                backlog
                    .get(s)
                    .is_none_or(|q| q.load(Ordering::Relaxed) <= limit / 2)
            });
        }
        while let Some((to, msg)) = hub.poll_transmit() {
            match (self.peers.get(to), backlog.get(to)) {
                (Some(tx), Some(queued)) => {
                    // Counted before the send: the receiver's decrement can never come first.
                    let now_queued = queued.fetch_add(1, Ordering::Relaxed) + 1;
                    if tx.send(Control::Hub(msg)).is_err() {
                        queued.fetch_sub(1, Ordering::Relaxed);
                        tracing::debug!(shard = to, "hub message to a stopped shard dropped");
                    } else if now_queued >= limit {
                        hub.set_congested(to, true);
                    }
                }
                _ => tracing::error!(shard = to, "hub message to an unknown shard"),
            }
        }
        while let Some(c) = hub.poll_cluster() {
            if let Some(tx) = &self.redis {
                // Fails only once the link has stopped with the shard.
                let _ = tx.send(c);
            }
        }
        let due = hub.poll_timeout();
        if due != self.deadline.get() {
            self.deadline.set(due);
            self.changed.notify_one();
        }
    }
}

/// The shard's connection to Redis: its events go to the hub, its state to `/readyz`.
async fn redis_link(shard: Rc<Shard>, commands: mpsc::UnboundedReceiver<crate::cluster::Command>) {
    let global = shard.global.clone();
    // Counted as down from the start (`ServerState::new`).
    let down = Cell::new(true);
    // `/readyz` is never ahead of the hub: down before the hub hears of it, up after.
    let on = |event: crate::cluster::Event| {
        use crate::cluster::Event;
        let up = matches!(event, Event::Up);
        if matches!(event, Event::Down(_)) && !down.replace(true) {
            global.redis_down.fetch_add(1, Ordering::AcqRel);
        }
        shard.hub.with(|hub, now| hub.handle_cluster(now, event));
        if up && down.replace(false) {
            global.redis_down.fetch_sub(1, Ordering::AcqRel);
        }
    };
    let cfg = global.config.cluster.clone();
    crate::cluster::link::run(global.backend, cfg, shard.id, commands, on).await;
}

/// `write_delay` and conflation: sleeps until the hub's deadline, then lets it release the
/// connections holding room messages and end its conflation windows. One timer per shard, and
/// none while nothing waits. A deadline only moves earlier until it is handled: the sleep
/// starts again when it does.
async fn delayed_writes(shard: Rc<Shard>, links: Rc<HubLinks>) {
    loop {
        match links.deadline.get() {
            None => links.changed.notified().await,
            Some(due) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(due.into()) => {
                        shard.hub.with(|hub, now| hub.handle_timeout(now));
                    }
                    _ = links.changed.notified() => {}
                }
            }
        }
    }
}

/// One ticker per shard marks every connection once per heartbeat period, instead of a timer
/// per connection: idle connections cost no timer memory and no wake-ups in between.
async fn heartbeats(shard: Rc<Shard>, period: std::time::Duration) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if shard.draining.get() {
            return;
        }
        for (_, e) in shard.conns.borrow().iter() {
            e.mark_heartbeat();
        }
    }
}

async fn accept_loop(
    shard: Rc<Shard>,
    listener: Rc<Listener>,
    spec: crate::server::config::Listen,
) {
    loop {
        match listener.accept().await {
            Ok((conn, remote)) => {
                tokio::task::spawn_local(crate::server::http::serve(
                    shard.clone(),
                    conn,
                    remote,
                    spec,
                ));
            }
            Err(_) if shard.draining.get() => return,
            Err(e) => {
                // EMFILE/ENFILE/ENOBUFS: back off instead of spinning; others are per-connection.
                tracing::warn!(shard = shard.id, error = %e, "accept failed");
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
                ) {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    }
}
