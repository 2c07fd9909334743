//! One shard's connection to Redis: connects (HELLO 3, AUTH, SELECT, the scripts), writes the
//! hub's commands in order, hands every answer and pub/sub message back as an [`Event`], and
//! reconnects with backoff. Thin: what the commands mean is the hub's business.
//!
//! On a Redis Cluster the link is one connection per master, and a router: it reads the slot
//! map, sends each command to its slot's master, follows `MOVED` (the slot lives elsewhere
//! now: the map is updated and the command sent there) and `ASK` (the slot is moving: this
//! command goes there once, after `ASKING`), at most [`MAX_REDIRECTS`] times per command: a
//! command still redirected then is in a loop (masters whose slot maps disagree) and is
//! answered with an error, logged once per slot. Any connection failing is the link failing: every
//! connection is dropped and the whole link made again from a fresh map, so the hub sees one
//! link, up or down, as with one Redis.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use bytes::Bytes;

use super::config::{host_of, ClusterConfig, Endpoint, RedisTarget};
use super::resp::{self, Value};
use super::slots::{self, Redirect, SlotMap, SlotSet, MAX_REDIRECTS};
use super::{Command, Event, SCRIPTS};
use crate::io::{tls, Backend, Stream};
use crate::metrics as m;

const FIRST_DELAY: Duration = Duration::from_millis(100);
/// Commands written together at most (bytes): one write per batch.
const BATCH: usize = 64 * 1024;

/// Runs until `commands` closes (the shard stopped). `on` gets every event, in order.
pub async fn run(
    backend: Backend,
    cfg: ClusterConfig,
    shard: usize,
    mut commands: mpsc::UnboundedReceiver<Command>,
    on: impl Fn(Event),
) {
    let target = match cfg.target() {
        Ok(t) => t,
        Err(e) => {
            // Validated at start: unreachable unless the config changed shape.
            tracing::error!(shard, "cluster.redis_url: {e}");
            return;
        }
    };
    let tls = target.tls.then(|| {
        let roots = tls::client_roots(cfg.redis_ca_file.as_deref(), "cluster.redis_ca_file");
        tls::client_config(&roots, &[])
    });
    let label = shard.to_string();
    let up = ::metrics::gauge!(m::REDIS_UP, "shard" => label.clone());
    let mut delay = FIRST_DELAY;
    let mut was_up = true; // the first failure is logged
    if let Endpoint::Cluster { seeds } = &target.endpoint {
        let link = ClusterLink {
            backend,
            cfg: &cfg,
            target: &target,
            seeds,
            tls: tls.as_ref(),
            shard,
            label: &label,
        };
        return link.run(commands, &on).await;
    }
    loop {
        let conn = tokio::time::timeout(
            cfg.connect_timeout(),
            connect(backend, &target, &cfg, tls.as_ref()),
        )
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "no answer from {} within connect_timeout",
                target.endpoint
            ))
        });
        let (stream, addr) = match conn {
            Ok(s) => s,
            Err(e) => {
                let mut none = VecDeque::new();
                fail(&on, &mut commands, &mut none, &e, &mut was_up, shard);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(cfg.reconnect_max_delay());
                continue;
            }
        };
        delay = FIRST_DELAY;
        was_up = true;
        tracing::info!(shard, %addr, "connected to Redis");
        ::metrics::counter!(m::REDIS_CONNECTS, "shard" => label.clone()).increment(1);
        up.set(1.0);
        on(Event::Up);
        let mut pending = VecDeque::new();
        let sent = ::metrics::counter!(m::REDIS_COMMANDS, "shard" => label.clone());
        let mut heard = |h: Heard| match h {
            Heard::Answer(c, v) => answered(&on, c, v),
            Heard::Message { channel, payload } => on(Event::Message { channel, payload }),
            Heard::Unsubscribed(channel) => on(Event::Unsubscribed(channel)),
        };
        let e = serve(stream, &cfg, &mut commands, &mut pending, &mut heard, &sent).await;
        up.set(0.0);
        match e {
            None => return,
            Some(e) => {
                let mut failed: VecDeque<Command> = pending.drain(..).map(|s| s.cmd).collect();
                fail(&on, &mut commands, &mut failed, &e, &mut was_up, shard);
            }
        }
    }
}

/// A command's answer, for the hub: tagged ones are its business; an untagged one can only
/// be an error worth a log line (a refused subscribe).
fn answered(on: &impl Fn(Event), c: Command, v: Value) {
    match (c.tag, v) {
        (Some(tag), v) => on(Event::Reply(tag, Ok(v))),
        (None, Value::Error(e)) => tracing::warn!("Redis refused a subscription change: {e}"),
        (None, _) => {}
    }
}

/// Answers every sent and queued command with `why`, then says the link is down.
fn fail(
    on: &impl Fn(Event),
    commands: &mut mpsc::UnboundedReceiver<Command>,
    pending: &mut VecDeque<Command>,
    why: &str,
    was_up: &mut bool,
    shard: usize,
) {
    if std::mem::take(was_up) {
        tracing::warn!(shard, "Redis unavailable: {why}; retrying with backoff");
    }
    for tag in pending.drain(..).filter_map(|c| c.tag) {
        on(Event::Reply(tag, Err(why.to_string())));
    }
    while let Ok(c) = commands.try_recv() {
        if let Some(tag) = c.tag {
            on(Event::Reply(tag, Err(why.to_string())));
        }
    }
    on(Event::Down(why.to_string()));
}

/// Finds Redis (asking the sentinels, with Sentinel), opens the connection and says hello:
/// RESP3 (for pushes and replies on one connection), credentials, the database, the scripts;
/// with Sentinel, checks that the server is still the master. Returns the stream and the
/// address it reached.
async fn connect(
    backend: Backend,
    t: &RedisTarget,
    cfg: &ClusterConfig,
    tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<(Stream, String), String> {
    let timeout = cfg.connect_timeout();
    let addr = match &t.endpoint {
        Endpoint::Direct(addr) => addr.clone(),
        Endpoint::Sentinel { sentinels, name } => {
            master_addr(backend, sentinels, name, cfg, tls, timeout).await?
        }
        Endpoint::Cluster { .. } => return Err("a cluster has no one address".into()),
    };
    let sentinel = matches!(t.endpoint, Endpoint::Sentinel { .. });
    let mut stream = open(backend, &addr, tls, timeout).await?;
    let (mut hello, mut count) = hello(t);
    if sentinel {
        resp::command(&mut hello, &[b"ROLE"]);
        count += 1;
    }
    let answers = exchange(&mut stream, &hello, count, &addr, "the hello").await?;
    if sentinel {
        // Between a failover and the sentinels' next answer, the address may be a replica's.
        let role = match answers.last() {
            Some(Value::Array(a)) => a.first().and_then(Value::as_bytes),
            _ => None,
        };
        if role != Some(b"master") {
            return Err(format!(
                "{addr}, named by the sentinels, is not a master (yet)"
            ));
        }
    }
    Ok((stream, addr))
}

/// The hello of every connection, and how many answers it gets: RESP3 (for pushes and
/// replies on one connection), credentials, the database, the scripts.
fn hello(t: &RedisTarget) -> (Vec<u8>, usize) {
    let mut hello = Vec::new();
    let mut args: Vec<&[u8]> = vec![b"HELLO", b"3"];
    if let Some(p) = &t.password {
        args.extend([
            &b"AUTH"[..],
            t.user.as_deref().unwrap_or("default").as_bytes(),
            p.as_bytes(),
        ]);
    }
    resp::command(&mut hello, &args);
    let db = t.db.to_string();
    let mut count = 1;
    if t.db != 0 {
        resp::command(&mut hello, &[b"SELECT", db.as_bytes()]);
        count += 1;
    }
    for s in SCRIPTS {
        resp::command(&mut hello, &[b"SCRIPT", b"LOAD", s.as_bytes()]);
        count += 1;
    }
    (hello, count)
}

/// A connection to `addr` (`host:port`, resolved now), with TLS when `tls` is set.
async fn open(
    backend: Backend,
    addr: &str,
    tls: Option<&Arc<rustls::ClientConfig>>,
    timeout: Duration,
) -> Result<Stream, String> {
    let addrs: Vec<SocketAddr> = match addr.parse() {
        Ok(a) => vec![a],
        Err(_) => tokio::net::lookup_host(addr)
            .await
            .map_err(|e| format!("resolving {addr}: {e}"))?
            .collect(),
    };
    let tls = tls.map(|c| (c, host_of(addr)));
    crate::io::connect(backend, &addrs, tls, timeout)
        .await
        .map_err(|e| format!("connecting to {addr}: {e}"))
}

/// Writes `commands` and reads the answers to the `count` of them; an error answer fails,
/// naming `what` was refused.
async fn exchange(
    stream: &mut Stream,
    commands: &[u8],
    count: usize,
    addr: &str,
    what: &str,
) -> Result<Vec<Value>, String> {
    // A flush too: the io_uring stream writes on flush.
    let wrote = match stream.write_all(commands).await {
        Ok(()) => stream.flush().await,
        Err(e) => Err(e),
    };
    wrote.map_err(|e| format!("writing to {addr}: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = vec![0; 4096];
    let mut answers = Vec::with_capacity(count);
    while answers.len() < count {
        match resp::parse(&buf).map_err(|e| e.to_string())? {
            Some((Value::Error(e), _)) => return Err(format!("{addr} refused {what}: {e}")),
            Some((v, used)) => {
                buf.drain(..used);
                answers.push(v);
            }
            None => {
                let n = stream
                    .read(&mut chunk)
                    .await
                    .map_err(|e| format!("reading from {addr}: {e}"))?;
                if n == 0 {
                    return Err(format!("{addr} closed the connection"));
                }
                buf.extend_from_slice(&chunk[..n]);
            }
        }
    }
    Ok(answers)
}

/// The master's address, from the first sentinel that knows it (over TLS with
/// `rediss+sentinel://`, as to the master).
async fn master_addr(
    backend: Backend,
    sentinels: &[String],
    name: &str,
    cfg: &ClusterConfig,
    tls: Option<&Arc<rustls::ClientConfig>>,
    timeout: Duration,
) -> Result<String, String> {
    let mut why = Vec::new();
    for sentinel in sentinels {
        match ask_sentinel(backend, sentinel, name, cfg, tls, timeout).await {
            Ok(addr) => return Ok(addr),
            Err(e) => why.push(e),
        }
    }
    Err(format!(
        "no sentinel named the master {name:?}: {}",
        why.join("; ")
    ))
}

async fn ask_sentinel(
    backend: Backend,
    sentinel: &str,
    name: &str,
    cfg: &ClusterConfig,
    tls: Option<&Arc<rustls::ClientConfig>>,
    timeout: Duration,
) -> Result<String, String> {
    let mut stream = open(backend, sentinel, tls, timeout).await?;
    let mut ask = Vec::new();
    let mut count = 1;
    if let Some(p) = &cfg.sentinel_password {
        resp::command(&mut ask, &[b"AUTH", p.as_bytes()]);
        count += 1;
    }
    resp::command(
        &mut ask,
        &[b"SENTINEL", b"GET-MASTER-ADDR-BY-NAME", name.as_bytes()],
    );
    let answers = exchange(
        &mut stream,
        &ask,
        count,
        sentinel,
        "SENTINEL GET-MASTER-ADDR-BY-NAME",
    )
    .await?;
    master_named(answers.last(), sentinel, name)
}

/// The master's `host:port` from a sentinel's answer to `GET-MASTER-ADDR-BY-NAME`: `[ip,
/// port]`, or nil when it does not know the master; anything else is named in the error.
fn master_named(answer: Option<&Value>, sentinel: &str, name: &str) -> Result<String, String> {
    let a = match answer {
        Some(Value::Array(a)) => a,
        Some(Value::Nil) | None => {
            return Err(format!("{sentinel} does not know the master {name:?}"))
        }
        Some(other) => return Err(format!("{sentinel} answered {other:?}")),
    };
    match &a[..] {
        [Value::Str(ip), port] => match (std::str::from_utf8(ip), port.as_int()) {
            (Ok(ip), Some(port)) if ip.contains(':') => Ok(format!("[{ip}]:{port}")),
            (Ok(ip), Some(port)) => Ok(format!("{ip}:{port}")),
            _ => Err(format!("{sentinel} answered {a:?}")),
        },
        _ => Err(format!("{sentinel} answered {a:?}")),
    }
}

/// A command written, awaiting its answer (an untagged one: the confirmation of a
/// subscription change, or the `+OK` of an `ASKING`).
struct Sent {
    cmd: Command,
    at: Instant,
}

/// What one connection heard from Redis.
enum Heard {
    /// The answer to `Command`.
    Answer(Command, Value),
    Message {
        channel: Bytes,
        payload: Bytes,
    },
    /// Redis ended the subscription to the channel on its own (its slot moved).
    Unsubscribed(Bytes),
}

/// Carries commands and answers until the connection fails (`Some(why)`) or `commands`
/// closes (`None`).
async fn serve(
    mut stream: Stream,
    cfg: &ClusterConfig,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    pending: &mut VecDeque<Sent>,
    heard: &mut impl FnMut(Heard),
    sent: &::metrics::Counter,
) -> Option<String> {
    let timeout = cfg.command_timeout();
    let mut input: Vec<u8> = Vec::new();
    let mut chunk = vec![0; 64 * 1024];
    let mut out = Vec::new();
    loop {
        let deadline = pending.front().map(|s| s.at + timeout);
        tokio::select! {
            c = commands.recv() => {
                let c = c?;
                let now = Instant::now();
                let mut next = Some(c);
                while let Some(cmd) = next.take() {
                    sent.increment(1);
                    out.extend_from_slice(&cmd.bytes);
                    pending.push_back(Sent { cmd, at: now });
                    if out.len() < BATCH {
                        next = commands.try_recv().ok();
                    }
                }
                let wrote = match stream.write_all(&out).await {
                    Ok(()) => stream.flush().await,
                    Err(e) => Err(e),
                };
                if let Err(e) = wrote {
                    return Some(format!("writing to Redis: {e}"));
                }
                out.clear();
            }
            n = stream.read(&mut chunk) => {
                match n {
                    Ok(0) => return Some("Redis closed the connection".into()),
                    Err(e) => return Some(format!("reading from Redis: {e}")),
                    Ok(n) => input.extend_from_slice(&chunk[..n]),
                }
                let mut used = 0;
                loop {
                    match resp::parse(&input[used..]) {
                        Err(e) => return Some(e.to_string()),
                        Ok(None) => break,
                        Ok(Some((v, n))) => {
                            used += n;
                            if let Err(e) = answer(v, pending, heard) {
                                return Some(e);
                            }
                        }
                    }
                }
                input.drain(..used);
            }
            _ = sleep_until(deadline) => {
                return Some(format!("no answer within command_timeout ({:?})", timeout));
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// One value from Redis: a push, or the answer to the oldest command. A subscription change
/// is answered by a push naming its channel; one that no command asked for is Redis ending
/// the subscription on its own.
fn answer(
    v: Value,
    pending: &mut VecDeque<Sent>,
    heard: &mut impl FnMut(Heard),
) -> Result<(), String> {
    let items = match v {
        Value::Push(items) => items,
        v => {
            let Some(s) = pending.pop_front() else {
                return Err(format!("an answer to no command: {v:?}"));
            };
            heard(Heard::Answer(s.cmd, v));
            return Ok(());
        }
    };
    let [Value::Str(kind), Value::Str(channel), rest] = &items[..] else {
        return Ok(());
    };
    match &kind[..] {
        b"message" | b"smessage" => {
            if let Value::Str(payload) = rest {
                heard(Heard::Message {
                    channel: channel.clone(),
                    payload: payload.clone(),
                });
            }
        }
        b"subscribe" | b"ssubscribe" | b"unsubscribe" | b"sunsubscribe" => {
            let asked = pending.front().is_some_and(|s| {
                s.cmd.tag.is_none() && channel_of(&s.cmd.bytes).as_ref() == Some(channel)
            });
            if asked {
                pending.pop_front();
            } else if kind.starts_with(b"sun") || kind.starts_with(b"un") {
                heard(Heard::Unsubscribed(channel.clone()));
            }
        }
        _ => {}
    }
    Ok(())
}

/// The channel a (un)subscribe command names (its second argument).
fn channel_of(command: &[u8]) -> Option<Bytes> {
    match resp::parse(command) {
        Ok(Some((Value::Array(args), _))) => match args.into_iter().nth(1) {
            Some(Value::Str(c)) => Some(c),
            _ => None,
        },
        _ => None,
    }
}

/// Hands `c` to master `i`'s connection; one that has ended gives it back, to be failed with
/// the rest when the link is made again.
fn send(
    to: &[mpsc::UnboundedSender<Command>],
    i: usize,
    c: Command,
) -> Result<(), (String, Vec<Command>)> {
    match to.get(i) {
        Some(tx) => tx
            .send(c)
            .map_err(|e| ("a master's connection ended".to_string(), vec![e.0])),
        None => Err(("a master missing from the map".to_string(), vec![c])),
    }
}

/// The link to a Redis Cluster (see the module's documentation).
struct ClusterLink<'a> {
    backend: Backend,
    cfg: &'a ClusterConfig,
    target: &'a RedisTarget,
    seeds: &'a [String],
    tls: Option<&'a Arc<rustls::ClientConfig>>,
    shard: usize,
    label: &'a str,
}

/// What a master's connection task tells the router: what it heard, or that it ended (why,
/// and the commands it had not been answered).
enum FromMaster {
    Heard(Heard),
    Ended(String, Vec<Command>),
}

impl ClusterLink<'_> {
    async fn run(&self, mut commands: mpsc::UnboundedReceiver<Command>, on: &impl Fn(Event)) {
        let up = ::metrics::gauge!(m::REDIS_UP, "shard" => self.label.to_string());
        let sent = ::metrics::counter!(m::REDIS_COMMANDS, "shard" => self.label.to_string());
        let mut delay = FIRST_DELAY;
        let mut was_up = true;
        // Slots whose redirect loop was logged: once each for the life of the link.
        let mut looped = SlotSet::default();
        loop {
            let made = tokio::time::timeout(self.cfg.connect_timeout(), self.connect())
                .await
                .unwrap_or_else(|_| {
                    Err(format!(
                        "no answer from {} within connect_timeout",
                        self.target.endpoint
                    ))
                });
            let (mut map, streams) = match made {
                Ok(made) => made,
                Err(e) => {
                    let mut none = VecDeque::new();
                    fail(on, &mut commands, &mut none, &e, &mut was_up, self.shard);
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(self.cfg.reconnect_max_delay());
                    continue;
                }
            };
            delay = FIRST_DELAY;
            was_up = true;
            tracing::info!(
                shard = self.shard,
                masters = %map.masters().join(","),
                "connected to the Redis Cluster"
            );
            ::metrics::counter!(m::REDIS_CONNECTS, "shard" => self.label.to_string()).increment(1);
            let (events, mut heard) = mpsc::unbounded_channel();
            let mut to: Vec<mpsc::UnboundedSender<Command>> = Vec::new();
            for (i, stream) in streams.into_iter().enumerate() {
                let (tx, mut rx) = mpsc::unbounded_channel();
                to.push(tx);
                let (events, cfg, sent) = (events.clone(), self.cfg.clone(), sent.clone());
                tokio::task::spawn_local(async move {
                    let mut pending = VecDeque::new();
                    let mut tell = |h| {
                        let _ = events.send((i, FromMaster::Heard(h)));
                    };
                    let why = serve(stream, &cfg, &mut rx, &mut pending, &mut tell, &sent)
                        .await
                        .unwrap_or_else(|| "the link was made again".into());
                    let left = pending.into_iter().map(|s| s.cmd).collect();
                    let _ = events.send((i, FromMaster::Ended(why, left)));
                });
            }
            drop(events);
            up.set(1.0);
            on(Event::Up);
            let why = loop {
                tokio::select! {
                    c = commands.recv() => match c {
                        Some(c) => {
                            if let Err(why) = send(&to, map.master(c.slot), c) {
                                break why;
                            }
                        }
                        None => return,
                    },
                    e = heard.recv() => match e {
                        Some((_, FromMaster::Heard(h))) => {
                            if let Err(why) = self.heard(h, &mut map, &to, &mut looped, on) {
                                break why;
                            }
                        }
                        Some((i, FromMaster::Ended(why, left))) => {
                            let master = map.masters().get(i).cloned().unwrap_or_default();
                            break (format!("{master}: {why}"), left);
                        }
                        None => break ("every master's connection ended".into(), Vec::new()),
                    },
                }
            };
            // Every connection goes: what they heard before is delivered, then what they
            // were not answered fails.
            let (why, mut left) = why;
            drop(to);
            while let Some((_, e)) = heard.recv().await {
                match e {
                    FromMaster::Heard(Heard::Answer(c, v)) => answered(on, c, v),
                    FromMaster::Heard(_) => {}
                    FromMaster::Ended(_, more) => left.extend(more),
                }
            }
            up.set(0.0);
            let mut left: VecDeque<Command> = left.into();
            fail(on, &mut commands, &mut left, &why, &mut was_up, self.shard);
        }
    }

    /// What a master's connection heard: redirections are followed here, the rest goes to
    /// the hub. An error ends the link (with the commands not answered).
    fn heard(
        &self,
        h: Heard,
        map: &mut SlotMap,
        to: &[mpsc::UnboundedSender<Command>],
        looped: &mut SlotSet,
        on: &impl Fn(Event),
    ) -> Result<(), (String, Vec<Command>)> {
        let (mut c, v) = match h {
            Heard::Answer(c, v) => (c, v),
            Heard::Message { channel, payload } => {
                on(Event::Message { channel, payload });
                return Ok(());
            }
            Heard::Unsubscribed(channel) => {
                on(Event::Unsubscribed(channel));
                return Ok(());
            }
        };
        let redirect = match &v {
            Value::Error(e) => slots::redirect(e),
            _ => None,
        };
        if let Some(Redirect::Moved { slot, .. } | Redirect::Ask { slot, .. }) = redirect {
            if c.redirects >= MAX_REDIRECTS {
                self.redirect_loop(c, slot, &v, looped, on);
                return Ok(());
            }
            c.redirects += 1;
        }
        match redirect {
            None => answered(on, c, v),
            Some(Redirect::Moved { slot, addr }) => {
                let before = map.master(slot);
                if !map.moved(slot, &addr) {
                    return Err((
                        format!("slot {slot} moved to {addr}, a new master"),
                        vec![c],
                    ));
                }
                if map.master(slot) != before {
                    tracing::info!(shard = self.shard, slot, %addr, "slot moved to another master");
                }
                send(to, map.master(slot), c)?;
            }
            Some(Redirect::Ask { slot, addr }) => {
                let Some(master) = map.index_of(&addr) else {
                    return Err((
                        format!("slot {slot} is moving to {addr}, a new master"),
                        vec![c],
                    ));
                };
                let mut asking = Vec::new();
                resp::command(&mut asking, &[b"ASKING"]);
                let asking = Command::new(None, asking, slot);
                send(to, master, asking)?;
                send(to, master, c)?;
            }
        }
        Ok(())
    }

    /// `c` was redirected [`MAX_REDIRECTS`] times and is redirected again (`answer`): it fails
    /// with a defined error instead of circling; the link stays up for the other slots.
    fn redirect_loop(
        &self,
        c: Command,
        slot: u16,
        answer: &Value,
        looped: &mut SlotSet,
        on: &impl Fn(Event),
    ) {
        ::metrics::counter!(m::REDIS_REDIRECT_LOOPS, "shard" => self.label.to_string())
            .increment(1);
        let said = match answer {
            Value::Error(e) => e.as_str(),
            _ => "",
        };
        let why = format!(
            "slot {slot}: still redirected after {MAX_REDIRECTS} redirections (last: {said}); \
             the cluster's masters disagree on who serves it"
        );
        if looped.insert(slot) {
            tracing::warn!(
                shard = self.shard,
                slot,
                "Redis Cluster redirect loop: {why}"
            );
        }
        if let Some(tag) = c.tag {
            on(Event::Reply(tag, Err(why)));
        }
    }

    /// The slot map, from the first seed that answers, and a connection to every master.
    async fn connect(&self) -> Result<(SlotMap, Vec<Stream>), String> {
        let timeout = self.cfg.connect_timeout();
        let mut why = Vec::new();
        let mut map = None;
        for seed in self.seeds {
            match self.slot_map(seed, timeout).await {
                Ok(m) => {
                    map = Some(m);
                    break;
                }
                Err(e) => why.push(e),
            }
        }
        let map =
            map.ok_or_else(|| format!("no cluster node gave the slot map: {}", why.join("; ")))?;
        let mut streams = Vec::with_capacity(map.masters().len());
        for master in map.masters() {
            let mut stream = open(self.backend, master, self.tls, timeout).await?;
            let (hello, count) = hello(self.target);
            exchange(&mut stream, &hello, count, master, "the hello").await?;
            streams.push(stream);
        }
        Ok((map, streams))
    }

    async fn slot_map(&self, node: &str, timeout: Duration) -> Result<SlotMap, String> {
        let mut stream = open(self.backend, node, self.tls, timeout).await?;
        let (mut ask, count) = hello(self.target);
        resp::command(&mut ask, &[b"CLUSTER", b"SLOTS"]);
        let answers = exchange(&mut stream, &ask, count + 1, node, "CLUSTER SLOTS").await?;
        let answer = answers.last().ok_or("no answer")?;
        SlotMap::from_slots(answer, node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::Tag;

    fn s(x: &str) -> Value {
        Value::Str(Bytes::copy_from_slice(x.as_bytes()))
    }

    fn sent(tag: Option<Tag>, args: &[&[u8]]) -> Sent {
        let mut bytes = Vec::new();
        resp::command(&mut bytes, args);
        Sent {
            cmd: Command::new(tag, bytes, 0),
            at: Instant::now(),
        }
    }

    fn push(items: &[&str]) -> Value {
        Value::Push(items.iter().map(|i| s(i)).collect())
    }

    #[test]
    fn confirmations_answer_their_command_and_an_unasked_unsubscribe_is_news() {
        let mut pending: VecDeque<Sent> = [
            sent(None, &[b"SSUBSCRIBE", b"c1"]),
            sent(Some(Tag::Sync("t".into())), &[b"EVALSHA", b"x"]),
        ]
        .into();
        let mut heard = Vec::new();
        let mut hear = |h: Heard| {
            heard.push(match h {
                Heard::Answer(c, v) => format!("answer {:?} {v:?}", c.tag),
                Heard::Message { channel, payload } => format!("message {channel:?} {payload:?}"),
                Heard::Unsubscribed(c) => format!("unsubscribed {c:?}"),
            })
        };
        // Another channel's confirmation is not this command's: Redis ended that one.
        answer(push(&["sunsubscribe", "c0", "0"]), &mut pending, &mut hear).expect("ok");
        answer(push(&["ssubscribe", "c1", "1"]), &mut pending, &mut hear).expect("ok");
        answer(push(&["smessage", "c1", "hi"]), &mut pending, &mut hear).expect("ok");
        answer(Value::Int(7), &mut pending, &mut hear).expect("ok");
        // With the read answered, an unsubscribe nobody asked for is news too.
        answer(push(&["sunsubscribe", "c1", "0"]), &mut pending, &mut hear).expect("ok");
        assert!(answer(Value::Int(8), &mut pending, &mut hear).is_err());
        assert_eq!(
            heard,
            [
                "unsubscribed b\"c0\"",
                "message b\"c1\" b\"hi\"",
                "answer Some(Sync(\"t\")) Int(7)",
                "unsubscribed b\"c1\"",
            ]
        );
    }

    #[test]
    fn a_sentinels_answer_gives_the_master_or_says_what_was_wrong() {
        let named = |v: Value| master_named(Some(&v), "s:1", "main");
        let ok = named(Value::Array(vec![s("10.0.0.7"), s("6380")]));
        assert_eq!(ok.as_deref(), Ok("10.0.0.7:6380"));
        let ok = named(Value::Array(vec![s("::1"), Value::Int(7000)]));
        assert_eq!(ok.as_deref(), Ok("[::1]:7000"));
        let unknown = named(Value::Nil).expect_err("nil");
        assert!(
            unknown.contains("does not know the master \"main\""),
            "{unknown}"
        );
        for bad in [
            Value::Array(vec![s("10.0.0.7")]),
            Value::Array(vec![s("10.0.0.7"), s("port")]),
            Value::Array(vec![Value::Int(1), s("6379")]),
            Value::Array(vec![Value::Str(Bytes::from_static(b"\xff")), s("1")]),
            s("OK"),
        ] {
            let e = named(bad.clone()).expect_err("bad answer");
            assert!(e.starts_with("s:1 answered"), "{bad:?}: {e}");
        }
    }
}
