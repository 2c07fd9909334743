//! One shard's connection to Redis: connects (HELLO 3, AUTH, SELECT, the scripts), writes the
//! hub's commands in order, hands every answer and pub/sub message back as an [`Event`], and
//! reconnects with backoff. Thin: what the commands mean is the hub's business.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::config::{ClusterConfig, RedisTarget};
use super::resp::{self, Value};
use super::{Command, Event, Tag, SCRIPTS};
use crate::io::{Backend, Stream};
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
    let label = shard.to_string();
    let up = ::metrics::gauge!(m::REDIS_UP, "shard" => label.clone());
    let mut delay = FIRST_DELAY;
    let mut was_up = true; // the first failure is logged
    loop {
        let timeout = cfg.connect_timeout();
        let conn = tokio::time::timeout(timeout, connect(backend, &target, timeout))
            .await
            .unwrap_or_else(|_| {
                Err(format!(
                    "no answer from {} within connect_timeout",
                    target.addr
                ))
            });
        let stream = match conn {
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
        tracing::info!(shard, addr = %target.addr, "connected to Redis");
        ::metrics::counter!(m::REDIS_CONNECTS, "shard" => label.clone()).increment(1);
        up.set(1.0);
        on(Event::Up);
        let mut pending = VecDeque::new();
        let sent = ::metrics::counter!(m::REDIS_COMMANDS, "shard" => label.clone());
        let e = serve(stream, &cfg, &mut commands, &mut pending, &on, &sent).await;
        up.set(0.0);
        match e {
            None => return,
            Some(e) => fail(&on, &mut commands, &mut pending, &e, &mut was_up, shard),
        }
    }
}

/// Answers every sent and queued command with `why`, then says the link is down.
fn fail(
    on: &impl Fn(Event),
    commands: &mut mpsc::UnboundedReceiver<Command>,
    pending: &mut VecDeque<(Tag, Instant)>,
    why: &str,
    was_up: &mut bool,
    shard: usize,
) {
    if std::mem::take(was_up) {
        tracing::warn!(shard, "Redis unavailable: {why}; retrying with backoff");
    }
    for (tag, _) in pending.drain(..) {
        on(Event::Reply(tag, Err(why.to_string())));
    }
    while let Ok(c) = commands.try_recv() {
        if let Some(tag) = c.tag {
            on(Event::Reply(tag, Err(why.to_string())));
        }
    }
    on(Event::Down(why.to_string()));
}

/// Opens the connection and says hello: RESP3 (for pushes and replies on one connection),
/// credentials, the database, the scripts.
async fn connect(backend: Backend, t: &RedisTarget, timeout: Duration) -> Result<Stream, String> {
    let addrs: Vec<SocketAddr> = match t.addr.parse() {
        Ok(a) => vec![a],
        Err(_) => tokio::net::lookup_host(&t.addr)
            .await
            .map_err(|e| format!("resolving {}: {e}", t.addr))?
            .collect(),
    };
    let mut stream = crate::io::connect(backend, &addrs, None, timeout)
        .await
        .map_err(|e| format!("connecting to {}: {e}", t.addr))?;
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
    let mut expected = 1;
    if t.db != 0 {
        resp::command(&mut hello, &[b"SELECT", db.as_bytes()]);
        expected += 1;
    }
    for s in SCRIPTS {
        resp::command(&mut hello, &[b"SCRIPT", b"LOAD", s.as_bytes()]);
        expected += 1;
    }
    // A flush too: the io_uring stream writes on flush.
    let wrote = match stream.write_all(&hello).await {
        Ok(()) => stream.flush().await,
        Err(e) => Err(e),
    };
    wrote.map_err(|e| format!("writing to {}: {e}", t.addr))?;
    let mut buf = Vec::new();
    let mut chunk = vec![0; 4096];
    while expected > 0 {
        match resp::parse(&buf).map_err(|e| e.to_string())? {
            Some((Value::Error(e), _)) => {
                return Err(format!("Redis at {} refused the hello: {e}", t.addr))
            }
            Some((_, used)) => {
                buf.drain(..used);
                expected -= 1;
            }
            None => {
                let n = stream
                    .read(&mut chunk)
                    .await
                    .map_err(|e| format!("reading from {}: {e}", t.addr))?;
                if n == 0 {
                    return Err(format!("{} closed the connection", t.addr));
                }
                buf.extend_from_slice(&chunk[..n]);
            }
        }
    }
    Ok(stream)
}

/// Carries commands and answers until the connection fails (`Some(why)`) or `commands`
/// closes (`None`).
async fn serve(
    mut stream: Stream,
    cfg: &ClusterConfig,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    pending: &mut VecDeque<(Tag, Instant)>,
    on: &impl Fn(Event),
    sent: &::metrics::Counter,
) -> Option<String> {
    let timeout = cfg.command_timeout();
    let mut input: Vec<u8> = Vec::new();
    let mut chunk = vec![0; 64 * 1024];
    let mut out = Vec::new();
    loop {
        let deadline = pending.front().map(|(_, at)| *at + timeout);
        tokio::select! {
            c = commands.recv() => {
                let c = c?;
                let now = Instant::now();
                let mut next = Some(c);
                while let Some(c) = next.take() {
                    sent.increment(1);
                    out.extend_from_slice(&c.bytes);
                    if let Some(tag) = c.tag {
                        pending.push_back((tag, now));
                    }
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
                            if let Err(e) = answer(v, pending, on) {
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

/// One value from Redis: a push, or the answer to the oldest command.
fn answer(
    v: Value,
    pending: &mut VecDeque<(Tag, Instant)>,
    on: &impl Fn(Event),
) -> Result<(), String> {
    if let Value::Push(items) = v {
        // `message channel payload`; subscribe confirmations and others are not news.
        if let [Value::Str(kind), Value::Str(channel), Value::Str(payload)] = &items[..] {
            if &kind[..] == b"message" {
                on(Event::Message {
                    channel: channel.clone(),
                    payload: payload.clone(),
                });
            }
        }
        return Ok(());
    }
    let Some((tag, _)) = pending.pop_front() else {
        return Err(format!("an answer to no command: {v:?}"));
    };
    on(Event::Reply(tag, Ok(v)));
    Ok(())
}
