//! CPU per Redis operation on ringgate's hot path, for two clients: ringgate's own RESP3 link
//! (`ringgate::cluster::link`) and the `redis` crate (multiplexed connection, RESP3 pushes).
//! Both run on the shard's runtime (`ringgate::io::block_on`, epoll backend) against a real
//! redis-server, and do what a node does:
//!
//! - `publish`: `n` publishes, each one `EVALSHA` of ringgate's publish script built by
//!   `cluster::Keys`, `window` of them awaiting their answer at a time; each answer is decoded
//!   to its seq.
//! - `receive`: subscribes to one topic's channel and decodes `n` pushed messages into
//!   `cluster::Published` (what the hub fans out), then exits. `feed` (another process, not
//!   measured) publishes them once the subscriber is there.
//!
//! Prints the process's CPU time (user + system, getrusage) and the load average; run it
//! under `valgrind --tool=callgrind` for instruction counts. bench/CLUSTER.md has the commands.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::Instant;

use bytes::Bytes;
use ringgate::cluster::config::{ClusterConfig, Engine};
use ringgate::cluster::{link, Command, Event, Keys, Message, Tag};
use ringgate::io::Backend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc::UnboundedSender;

// The server's allocator, so both clients allocate as they would in ringgate.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const TOPIC: &str = "bench";
const PREFIX: &str = "rgbench:";

struct Args {
    mode: String,
    client: String,
    addr: String,
    n: u64,
    window: u64,
    size: usize,
}

fn args() -> Result<Args, String> {
    let mut a = Args {
        mode: String::new(),
        client: "ours".into(),
        addr: "127.0.0.1:6379".into(),
        n: 10_000,
        window: 32,
        size: 100,
    };
    let mut it = std::env::args().skip(1);
    a.mode = it.next().ok_or("usage: ringgate-redisbench publish|receive|feed [--client ours|redis] [--addr HOST:PORT] [--n N] [--window W] [--size BYTES]")?;
    while let Some(k) = it.next() {
        let v = it.next().ok_or(format!("{k} needs a value"))?;
        let num = || v.parse::<u64>().map_err(|e| format!("{k}: {e}"));
        match k.as_str() {
            "--client" => a.client = v.clone(),
            "--addr" => a.addr = v.clone(),
            "--n" => a.n = num()?,
            "--window" => a.window = num()?.max(1),
            "--size" => a.size = num()? as usize,
            _ => return Err(format!("unknown option {k}")),
        }
    }
    if !a.addr.starts_with("127.") {
        return Err("--addr must be on 127.0.0.0/8".into());
    }
    Ok(a)
}

fn main() {
    let a = match args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let keys = Keys::new(PREFIX, false);
    let start = Instant::now();
    let cpu0 = cpu_us();
    let run = async {
        match (a.mode.as_str(), a.client.as_str()) {
            ("publish", "ours") => publish_ours(&a, &keys).await,
            ("publish", "redis") => publish_redis(&a).await,
            ("receive", "ours") => receive_ours(&a, &keys).await,
            ("receive", "redis") => receive_redis(&a, &keys).await,
            ("feed", _) => feed(&a).await,
            _ => Err(format!("unknown mode/client {} {}", a.mode, a.client)),
        }
    };
    let done = ringgate::io::block_on(Backend::Epoll, run).map_err(|e| e.to_string());
    if let Err(e) = done.and_then(|r| r) {
        eprintln!("{e}");
        std::process::exit(1);
    }
    let cpu = cpu_us() - cpu0;
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "mode={} client={} n={} cpu_us={} cpu_us_per_op={:.2} wall_ms={} loadavg={}",
        a.mode,
        a.client,
        a.n,
        cpu,
        cpu as f64 / a.n.max(1) as f64,
        start.elapsed().as_millis(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" "),
    );
}

fn cpu_us() -> u64 {
    // SAFETY: getrusage writes the struct it is given.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let us = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
    us(u.ru_utime) + us(u.ru_stime)
}

fn config(addr: &str) -> ClusterConfig {
    ClusterConfig {
        engine: Engine::Redis,
        redis_url: format!("redis://{addr}"),
        key_prefix: PREFIX.into(),
        ..ClusterConfig::default()
    }
}

/// The message body a publish carries (ringgate's JSON envelope, `size` bytes of data).
fn body(size: usize) -> (String, String) {
    let head = format!("{{\"topic\":\"{TOPIC}\",\"seq\":");
    let tail = format!(",\"data\":\"{}\"}}", "x".repeat(size));
    (head, tail)
}

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Runs ringgate's link as a shard does (the hub's commands in, events out) with `first`
/// queued, until `on` says the run is done or fails, or the link goes down. `on` sees every
/// other event, with the sender for more commands.
async fn drive_link(
    a: &Args,
    first: impl IntoIterator<Item = Command>,
    on: impl Fn(Event, &UnboundedSender<Command>) -> Result<bool, String>,
) -> Result<(), String> {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    for c in first {
        let _ = tx.send(c);
    }
    let tx = RefCell::new(Some(tx));
    let failed = RefCell::new(None);
    let on_event = |e: Event| {
        let outcome = match (e, &*tx.borrow()) {
            (Event::Down(e), _) => Err(e),
            (e, Some(tx)) => on(e, tx),
            (_, None) => Ok(true),
        };
        match outcome {
            Ok(false) => {}
            // Closing the command channel ends `link::run`.
            Ok(true) => drop(tx.borrow_mut().take()),
            Err(e) => {
                failed.borrow_mut().get_or_insert(e);
                tx.borrow_mut().take();
            }
        }
    };
    link::run(Backend::Epoll, config(&a.addr), 0, rx, on_event).await;
    failed.into_inner().map_or(Ok(()), Err)
}

/// Ringgate's link: `window` publishes awaiting their answer at a time.
async fn publish_ours(a: &Args, keys: &Keys) -> Result<(), String> {
    let (head, tail) = body(a.size);
    let command = |i| {
        let bytes = keys.publish(
            TOPIC,
            &Message {
                head: head.as_bytes(),
                tail: tail.as_bytes(),
                binary: false,
                trace: None,
            },
            wall_ms(),
            100,
            60_000,
            "E",
        );
        Command::new(Some(Tag::Publish(i)), bytes, keys.slot(TOPIC))
    };
    let first = a.window.min(a.n);
    let (sent, done) = (Cell::new(first), Cell::new(0u64));
    drive_link(a, (0..first).map(&command), |e, tx| {
        let Event::Reply(_, answer) = e else {
            return Ok(false);
        };
        answer.and_then(|v| Keys::published(&v))?;
        done.set(done.get() + 1);
        if sent.get() < a.n {
            let _ = tx.send(command(sent.get()));
            sent.set(sent.get() + 1);
        }
        Ok(done.get() == a.n)
    })
    .await
}

async fn redis_client(addr: &str) -> Result<redis::Client, String> {
    redis::Client::open(format!("redis://{addr}/?protocol=3")).map_err(|e| e.to_string())
}

/// The `redis` crate: a multiplexed connection shared by `window` tasks, each publishing in
/// turn, as concurrent client requests would.
async fn publish_redis(a: &Args) -> Result<(), String> {
    let client = redis_client(&a.addr).await?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg(ringgate::cluster::SCRIPTS[0])
        .query_async(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    let key = |kind: &str| format!("{PREFIX}{{{TOPIC}}}:{kind}");
    let (ks, kh, ch) = (key("s"), key("h"), key("c"));
    let (head, tail) = body(a.size);
    let next = Rc::new(Cell::new(0u64));
    let mut tasks = Vec::new();
    for _ in 0..a.window.min(a.n) {
        let mut conn = conn.clone();
        let (next, n) = (next.clone(), a.n);
        let (sha, ks, kh, ch, head, tail) = (
            sha.clone(),
            ks.clone(),
            kh.clone(),
            ch.clone(),
            head.clone(),
            tail.clone(),
        );
        tasks.push(tokio::task::spawn_local(async move {
            while next.get() < n {
                next.set(next.get() + 1);
                let v: redis::Value = redis::cmd("EVALSHA")
                    .arg(&sha)
                    .arg(2)
                    .arg(&ks)
                    .arg(&kh)
                    .arg(&ch)
                    .arg(&head)
                    .arg(&tail)
                    .arg(wall_ms())
                    .arg(100)
                    .arg(60_000)
                    .arg("E")
                    .arg(ringgate::cluster::META_TTL_MS)
                    .arg("") // not binary
                    .arg("") // no trace
                    .arg("PUBLISH")
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| e.to_string())?;
                seq_of(&v)?;
            }
            Ok::<(), String>(())
        }));
    }
    for t in tasks {
        t.await.map_err(|e| e.to_string())??;
    }
    Ok(())
}

/// The seq in the publish script's answer (what `Keys::published` reads from ours).
fn seq_of(v: &redis::Value) -> Result<u64, String> {
    match v {
        redis::Value::Array(a) => match a.first() {
            Some(redis::Value::Int(s)) => u64::try_from(*s).map_err(|e| e.to_string()),
            _ => Err(format!("unexpected publish answer {v:?}")),
        },
        _ => Err(format!("unexpected publish answer {v:?}")),
    }
}

async fn receive_ours(a: &Args, keys: &Keys) -> Result<(), String> {
    let (subscribe, _) = keys.follow(TOPIC, "E", None);
    let got = Cell::new(0u64);
    let first = Command::new(None, subscribe, keys.slot(TOPIC));
    drive_link(a, [first], |e, _| {
        if let Event::Message { channel, payload } = e {
            if keys.topic_of(&channel).is_some() && Keys::pushed(&payload).is_some() {
                got.set(got.get() + 1);
            }
        }
        Ok(got.get() == a.n)
    })
    .await
}

async fn receive_redis(a: &Args, keys: &Keys) -> Result<(), String> {
    let client = redis_client(&a.addr).await?;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let cfg = redis::AsyncConnectionConfig::new().set_push_sender(tx);
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&cfg)
        .await
        .map_err(|e| e.to_string())?;
    conn.subscribe(format!("{PREFIX}{{{TOPIC}}}:c"))
        .await
        .map_err(|e| e.to_string())?;
    let mut got = 0;
    while got < a.n {
        let Some(push) = rx.recv().await else {
            return Err("connection lost".into());
        };
        if push.kind != redis::PushKind::Message {
            continue;
        }
        if let [redis::Value::BulkString(channel), redis::Value::BulkString(payload)] =
            &mut push.data.into_iter().collect::<Vec<_>>()[..]
        {
            let payload = Bytes::from(std::mem::take(payload));
            if keys.topic_of(channel).is_some() && Keys::pushed(&payload).is_some() {
                got += 1;
            }
        }
    }
    Ok(())
}

/// Publishes `n` channel messages once the channel has a subscriber (pipelined PUBLISH on a
/// plain socket; not part of any measurement).
async fn feed(a: &Args) -> Result<(), String> {
    use ringgate::cluster::resp::{self, Value};
    let mut s = tokio::net::TcpStream::connect(&a.addr)
        .await
        .map_err(|e| e.to_string())?;
    let channel = format!("{PREFIX}{{{TOPIC}}}:c");
    let (head, tail) = body(a.size);
    let mut buf = Vec::new();
    let mut chunk = vec![0; 64 * 1024];
    // Answers to `count` commands; the last one.
    let mut roundtrip = async |out: &[u8], count: usize| -> Result<Value, String> {
        s.write_all(out).await.map_err(|e| e.to_string())?;
        let mut last = Value::Nil;
        for _ in 0..count {
            loop {
                if let Some((v, used)) = resp::parse(&buf).map_err(|e| e.to_string())? {
                    buf.drain(..used);
                    last = v;
                    break;
                }
                let n = s.read(&mut chunk).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("Redis closed the connection".into());
                }
                buf.extend_from_slice(&chunk[..n]);
            }
        }
        Ok(last)
    };
    // Waiting for the subscriber: polled, as Redis has no event for it.
    for _ in 0..600 {
        let mut out = Vec::new();
        resp::command(&mut out, &[b"PUBSUB", b"NUMSUB", channel.as_bytes()]);
        let v = roundtrip(&out, 1).await?;
        if matches!(&v, Value::Array(a) if a.get(1).and_then(Value::as_int) >= Some(1)) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let mut seq = 0u64;
    while seq < a.n {
        let batch = (a.n - seq).min(1000);
        let mut out = Vec::new();
        for _ in 0..batch {
            seq += 1;
            // A publish as the script writes it: kind, epoch, seq, trace (none), message.
            let msg = format!("m\nE\n{seq}\n\n{head}{seq}{tail}");
            resp::command(&mut out, &[b"PUBLISH", channel.as_bytes(), msg.as_bytes()]);
        }
        roundtrip(&out, batch as usize).await?;
    }
    Ok(())
}
