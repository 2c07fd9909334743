//! `ringgate-load`: an end-to-end WebSocket load generator for ringgate (or any RFC 6455 echo
//! server), built to stay cheap enough to share a two-core machine with the server it measures.
//!
//! * `echo`: N connections each send a message, wait for its echo, record the round trip and
//!   repeat until the message budget (or the time limit) is spent; prints msgs/s, MB/s, latency
//!   percentiles and, with `--server-pid`, the server's CPU time per message.
//! * `idle`: opens N connections, holds them, and prints the server's RSS growth per connection.
//!
//! Payloads: `--payload pattern` (default) repeats one byte pattern; `--payload json` cycles
//! through 256 different realistic JSON messages of exactly `--size` bytes (chat lines, stats
//! updates, presence snapshots: repeated keys, varying values), sent as text.
//!
//! `--deflate` offers `permessage-deflate; client_max_window_bits`, as browsers do, and then
//! behaves like a browser: every message is compressed (RSV1) with the agreed parameters and
//! `--deflate-level` (default 6, zlib's default, which Chrome uses), with context takeover when
//! the server allows it; compressed replies are inflated and checked against what was sent.
//! When the server asked for `client_no_context_takeover` each message is compressed on its
//! own, so the 256 compressed bodies are computed once and shared by all connections (the tool
//! then only masks); otherwise each connection compresses with its own context as it sends
//! (`--deflate-independent` compresses each message on its own there too).
//!
//! One tokio current-thread runtime; the upgrade is done by hand over a raw `TcpStream`; frames
//! are written with `ringgate::ws::frame::write_masked_frame` (built once per connection and
//! reused) and replies parsed in place with `parse_header`. Only 127.0.0.1 is ever a target, and
//! every loop is bounded in count and in time.

use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::rc::Rc;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use hdrhistogram::Histogram;
use ringgate::payload::{json_message, Rng};
use ringgate::ws::frame::{parse_header, write_masked_frame, OpCode};
use ringgate::ws::handshake::accept_key;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Hard caps on the knobs, so that no invocation can run away.
const MAX_CONNECTIONS: usize = 20_000;
const MAX_SIZE: usize = 16 << 20;
const MAX_PIPELINE: usize = 1024;
const MAX_MESSAGES: u64 = 1_000_000_000;
const MAX_SECONDS: f64 = 3600.0;
/// A handshake (connect + upgrade) must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest HTTP response head accepted during the upgrade.
const MAX_HEAD: usize = 16 * 1024;
/// Distinct messages in a `--payload json` pool: 256 × 512 B is four times a 32 KiB deflate
/// window, so a context-takeover compressor never finds a whole earlier message to copy.
const JSON_POOL: usize = 256;
/// The tail a sync flush ends with, stripped from and re-appended to message bodies (RFC 7692).
const DEFLATE_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];
/// The offer browsers send.
const DEFLATE_OFFER: &str = "permessage-deflate; client_max_window_bits";

#[derive(Parser)]
#[command(
    name = "ringgate-load",
    version,
    about = "WebSocket load generator (targets 127.0.0.1 only)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Request/response echo load: send, wait for the echo, repeat.
    Echo(EchoArgs),
    /// Open many idle connections and measure the server's memory per connection.
    Idle(IdleArgs),
}

#[derive(Args)]
struct EchoArgs {
    /// ws://127.0.0.1:PORT/PATH (only 127.0.0.1 / localhost).
    #[arg(long)]
    url: String,
    #[arg(long, default_value_t = 100)]
    connections: usize,
    /// Payload bytes per message.
    #[arg(long, default_value_t = 32)]
    size: usize,
    /// Total messages to echo, over all connections.
    #[arg(long, default_value_t = 200_000)]
    messages: u64,
    /// Messages each connection keeps in flight (sent in one write).
    #[arg(long, default_value_t = 1)]
    pipeline: usize,
    /// Stop after this many seconds even if messages are left.
    #[arg(long, default_value_t = 60.0)]
    duration_limit: f64,
    /// Messages echoed before measuring starts (not counted, not timed).
    #[arg(long, default_value_t = 0)]
    warmup: u64,
    /// Send text frames (ASCII) instead of binary ones (`--payload json` is always text).
    #[arg(long)]
    text: bool,
    #[command(flatten)]
    msg: MsgArgs,
    /// Server process to measure: CPU time (utime+stime from /proc/PID/stat) over the run.
    #[arg(long)]
    server_pid: Option<u32>,
}

/// What is sent, and whether it is compressed.
#[derive(Args, Clone, Copy)]
struct MsgArgs {
    /// `pattern`: one repeated byte pattern; `json`: 256 different realistic JSON messages of
    /// exactly `--size` bytes, sent in turn as text.
    #[arg(long, value_enum, default_value_t = PayloadKind::Pattern)]
    payload: PayloadKind,
    /// Offer permessage-deflate (`permessage-deflate; client_max_window_bits`, like browsers);
    /// fail if the server declines. Messages are then compressed, replies inflated and checked.
    #[arg(long)]
    deflate: bool,
    /// zlib level the client compresses with (6, zlib's default, is what Chrome uses).
    #[arg(long, default_value_t = 6)]
    deflate_level: u32,
    /// Compress every message on its own even when the server allows client context takeover
    /// (RFC 7692 lets a client always do so; the server still keeps its inflate context). All
    /// servers then inflate the same bytes, and the client's bodies are computed only once.
    #[arg(long)]
    deflate_independent: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum PayloadKind {
    Pattern,
    Json,
}

#[derive(Args)]
struct IdleArgs {
    /// ws://127.0.0.1:PORT/PATH (only 127.0.0.1 / localhost).
    #[arg(long)]
    url: String,
    #[arg(long, default_value_t = 10_000)]
    connections: usize,
    /// Seconds to hold the connections open once all are up.
    #[arg(long, default_value_t = 10.0)]
    hold: f64,
    /// Seconds to wait after connecting before sampling the server's RSS.
    #[arg(long, default_value_t = 2.0)]
    settle: f64,
    /// Handshakes in flight at once.
    #[arg(long, default_value_t = 200)]
    concurrency: usize,
    /// Echo one message on each connection after the upgrade (a "used" idle connection).
    #[arg(long)]
    touch: bool,
    /// Bytes of the `--touch` message (text).
    #[arg(long, default_value_t = 32)]
    size: usize,
    #[command(flatten)]
    msg: MsgArgs,
    /// Stop connecting after this many seconds.
    #[arg(long, default_value_t = 120.0)]
    duration_limit: f64,
    /// Server process whose VmRSS (/proc/PID/status) is sampled.
    #[arg(long)]
    server_pid: Option<u32>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let local = tokio::task::LocalSet::new();
    let res = local.block_on(&rt, async {
        match cli.cmd {
            Cmd::Echo(a) => echo(a).await,
            Cmd::Idle(a) => idle(a).await,
        }
    });
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Target, handshake

/// A parsed `ws://` URL pointing at this machine.
#[derive(Debug, Clone)]
struct Target {
    addr: SocketAddr,
    host: String,
    path: String,
}

fn parse_url(url: &str) -> Result<Target> {
    let rest = url
        .strip_prefix("ws://")
        .context("only ws:// URLs are supported")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().context("bad port")?),
        None => (authority, 80),
    };
    match host {
        "127.0.0.1" | "localhost" => {}
        other => bail!("refusing target {other:?}: only 127.0.0.1 / localhost may be loaded"),
    }
    ensure!(port != 0, "port 0 is not a target");
    Ok(Target {
        addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        host: format!("127.0.0.1:{port}"),
        path: path.to_string(),
    })
}

fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// permessage-deflate parameters a server accepted (RFC 7692 §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Pmd {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_max_window_bits: u8,
    /// The window the client must stay within (15 when the server did not say).
    client_max_window_bits: u8,
}

/// Parses the server's `Sec-WebSocket-Extensions` response to our offer.
fn parse_pmd(v: &str) -> Result<Pmd> {
    ensure!(
        !v.contains(','),
        "server accepted more than one extension: {v:?}"
    );
    let mut parts = v.split(';').map(str::trim);
    let name = parts.next().unwrap_or_default();
    ensure!(
        name.eq_ignore_ascii_case("permessage-deflate"),
        "server answered with extension {name:?}"
    );
    let mut p = Pmd {
        server_no_context_takeover: false,
        client_no_context_takeover: false,
        server_max_window_bits: 15,
        client_max_window_bits: 15,
    };
    let bits = |v: Option<&str>| -> Result<u8> {
        let v = v.map(|v| v.trim().trim_matches('"')).unwrap_or_default();
        let b: u8 = v
            .parse()
            .with_context(|| format!("bad window bits {v:?}"))?;
        ensure!((8..=15).contains(&b), "window bits {b} out of range");
        Ok(b)
    };
    for param in parts.filter(|p| !p.is_empty()) {
        let (k, v) = match param.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v)),
            None => (param, None),
        };
        match k.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" => p.server_no_context_takeover = true,
            "client_no_context_takeover" => p.client_no_context_takeover = true,
            "server_max_window_bits" => p.server_max_window_bits = bits(v)?,
            "client_max_window_bits" => p.client_max_window_bits = bits(v)?,
            other => bail!("unknown permessage-deflate parameter {other:?}"),
        }
    }
    // zlib cannot compress raw deflate with an 8-bit window.
    ensure!(
        p.client_max_window_bits >= 9,
        "server limits the client to an 8-bit window, which zlib cannot produce"
    );
    Ok(p)
}

/// A connection right after its upgrade.
struct Upgraded {
    s: TcpStream,
    /// Bytes that came after the 101 response head.
    early: Vec<u8>,
    /// The agreed permessage-deflate parameters, if any.
    pmd: Option<Pmd>,
}

/// Connects and performs the opening handshake, offering permessage-deflate when `deflate`.
async fn connect(t: &Target, rng_seed: u64, deflate: bool) -> Result<Upgraded> {
    let mut s = TcpStream::connect(t.addr)
        .await
        .with_context(|| format!("connect {}", t.addr))?;
    s.set_nodelay(true)?;
    let mut rng = Rng::new(rng_seed);
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
    raw[8..].copy_from_slice(&rng.next_u64().to_le_bytes());
    let key = B64.encode(raw);
    let ext = if deflate {
        format!("Sec-WebSocket-Extensions: {DEFLATE_OFFER}\r\n")
    } else {
        String::new()
    };
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{ext}\r\n",
        t.path, t.host
    );
    s.write_all(req.as_bytes()).await?;
    let mut buf = Vec::with_capacity(512);
    let mut tmp = [0u8; 1024];
    let end = loop {
        ensure!(buf.len() <= MAX_HEAD, "response head over {MAX_HEAD} bytes");
        let n = s.read(&mut tmp).await?;
        ensure!(n > 0, "connection closed during the handshake");
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&tmp[..n]);
        if let Some(i) = find(&buf[from..], b"\r\n\r\n") {
            break from + i;
        }
    };
    let head = std::str::from_utf8(&buf[..end]).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    ensure!(
        status.starts_with("HTTP/1.1 101"),
        "upgrade refused: {status:?}"
    );
    let (mut accept, mut pmd) = (None, None);
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let k = k.trim();
        if k.eq_ignore_ascii_case("sec-websocket-accept") {
            accept = Some(v.trim());
        } else if k.eq_ignore_ascii_case("sec-websocket-extensions") {
            ensure!(deflate, "server answered an extension we did not offer");
            ensure!(pmd.is_none(), "more than one Sec-WebSocket-Extensions line");
            pmd = Some(parse_pmd(v.trim())?);
        }
    }
    let want = accept_key(key.as_bytes());
    ensure!(
        accept == Some(want.as_str()),
        "bad Sec-WebSocket-Accept {accept:?}"
    );
    ensure!(
        !deflate || pmd.is_some(),
        "server declined permessage-deflate"
    );
    Ok(Upgraded {
        s,
        early: buf[end + 4..].to_vec(),
        pmd,
    })
}

async fn connect_timeout(t: &Target, rng_seed: u64, deflate: bool) -> Result<Upgraded> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, connect(t, rng_seed, deflate))
        .await
        .context("handshake timed out")?
}

/// Opens `n` connections, at most `concurrency` handshakes at a time, until `deadline`.
/// Each is handed to `then` (e.g. to build per-connection state); failures are counted.
async fn open_all<T: 'static>(
    t: &Target,
    n: usize,
    concurrency: usize,
    deadline: Instant,
    deflate: bool,
    then: impl Fn(usize, Upgraded) -> T + 'static,
) -> (Vec<T>, usize, Option<anyhow::Error>) {
    let then = Rc::new(then);
    let base = seed();
    let mut set = JoinSet::new();
    let mut out = Vec::with_capacity(n);
    let (mut failed, mut first_err) = (0usize, None);
    let mut next = 0usize;
    while (next < n || !set.is_empty()) && Instant::now() < deadline {
        while next < n && set.len() < concurrency.max(1) {
            let (t, then, i) = (t.clone(), then.clone(), next);
            set.spawn_local(async move {
                let r = connect_timeout(&t, base ^ (i as u64) << 20, deflate).await;
                r.map(|u| then(i, u))
            });
            next += 1;
        }
        match tokio::time::timeout_at(deadline, set.join_next()).await {
            Ok(Some(Ok(Ok(v)))) => out.push(v),
            Ok(Some(Ok(Err(e)))) => {
                failed += 1;
                first_err.get_or_insert(e);
            }
            Ok(Some(Err(e))) => {
                failed += 1;
                first_err.get_or_insert(anyhow::anyhow!("task failed: {e}"));
            }
            Ok(None) | Err(_) => break,
        }
    }
    set.abort_all();
    (out, failed, first_err)
}

// ---------------------------------------------------------------------------------------------
// /proc sampling

/// utime + stime of a process (all its threads), in clock ticks.
fn proc_cpu_ticks(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    // Fields after the parenthesised command name start at field 3 (state); utime and stime
    // are fields 14 and 15.
    let after = &s[s.rfind(')').context("malformed stat")? + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    ensure!(f.len() > 13, "short stat line");
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Nanoseconds on CPU summed over the process's threads (/proc/PID/task/*/schedstat), a
/// finer-grained cross-check of the tick counts; `None` when schedstat is unavailable.
fn proc_sched_ns(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .take(4096)
    {
        let p = e.ok()?.path().join("schedstat");
        let s = std::fs::read_to_string(p).ok()?;
        total += s.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// Busy CPU time of the whole machine (all cores, /proc/stat), in clock ticks: used to tell
/// how much of the run's CPU went to processes other than the server and this tool.
fn machine_busy_ticks() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal
    (v.len() >= 8).then(|| v[0] + v[1] + v[2] + v[5] + v[6] + v[7])
}

/// VmRSS of a process, in bytes.
fn proc_rss(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let line = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS line")?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .context("malformed VmRSS")?
        .parse()?;
    Ok(kb * 1024)
}

/// This process's user+system CPU time.
fn self_cpu() -> Duration {
    // SAFETY: getrusage only writes the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Raises the soft open-file limit to the hard limit; returns the soft limit now in force.
fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur;
            }
        }
    }
    lim.rlim_cur
}

struct ServerCpu {
    pid: u32,
    ticks: u64,
    sched_ns: Option<u64>,
}

impl ServerCpu {
    fn sample(pid: u32) -> Result<ServerCpu> {
        Ok(ServerCpu {
            pid,
            ticks: proc_cpu_ticks(pid)?,
            sched_ns: proc_sched_ns(pid),
        })
    }
    /// (seconds from utime+stime, seconds from schedstat) since `self`.
    fn since(&self) -> Result<(f64, Option<f64>)> {
        let now = ServerCpu::sample(self.pid)?;
        let ticks = now.ticks.saturating_sub(self.ticks) as f64 / clock_ticks_per_sec();
        let sched = match (self.sched_ns, now.sched_ns) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / 1e9),
            _ => None,
        };
        Ok((ticks, sched))
    }
}

// ---------------------------------------------------------------------------------------------
// Payloads

/// Compressed message bodies, one per pool message.
type Bodies = Rc<[Vec<u8>]>;

/// The messages the connections send, in turn.
struct Pool {
    msgs: Vec<Vec<u8>>,
    opcode: OpCode,
    level: u32,
    /// Compress messages on their own even where context takeover is allowed.
    independent: bool,
    /// Bodies compressed on their own (no context takeover), per client window bits; computed
    /// once and shared by every connection that may not use context takeover.
    compressed: RefCell<Vec<(u8, Bodies)>>,
}

impl Pool {
    fn new(kind: PayloadKind, size: usize, text: bool, m: &MsgArgs) -> Pool {
        let (msgs, text) = match kind {
            PayloadKind::Json => (
                (0..JSON_POOL as u64)
                    .map(|i| json_message(i, size))
                    .collect(),
                true,
            ),
            PayloadKind::Pattern => {
                let one = (0..size)
                    .map(|i| {
                        if text {
                            b'a' + (i % 26) as u8
                        } else {
                            (i * 31 + 7) as u8
                        }
                    })
                    .collect();
                (vec![one], text)
            }
        };
        Pool {
            msgs,
            opcode: if text { OpCode::Text } else { OpCode::Binary },
            level: m.deflate_level.min(9),
            independent: m.deflate_independent,
            compressed: RefCell::new(Vec::new()),
        }
    }

    fn compressed(&self, bits: u8) -> Bodies {
        let mut c = self.compressed.borrow_mut();
        if let Some((_, v)) = c.iter().find(|(b, _)| *b == bits) {
            return v.clone();
        }
        let mut z = Compress::new_with_window_bits(Compression::new(self.level), false, bits);
        let v: Bodies = self
            .msgs
            .iter()
            .map(|m| {
                let mut out = Vec::new();
                deflate_message(&mut z, m, &mut out);
                z.reset();
                out
            })
            .collect();
        c.push((bits, v.clone()));
        v
    }
}

/// Compresses one message body (sync flush, tail stripped) into `out`, replacing its contents.
fn deflate_message(z: &mut Compress, input: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(input.len() + 64);
    let base = z.total_in();
    loop {
        let done = (z.total_in() - base) as usize;
        z.compress_vec(&input[done..], out, FlushCompress::Sync)
            .expect("deflate stream state");
        let done = (z.total_in() - base) as usize;
        if done == input.len() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity().max(64));
    }
    if out.ends_with(&DEFLATE_TAIL) {
        out.truncate(out.len() - DEFLATE_TAIL.len());
    }
}

/// Inflates one compressed message body into `out` (replacing its contents), refusing more
/// than `limit` bytes.
fn inflate_message(
    z: &mut Decompress,
    input: &[u8],
    out: &mut Vec<u8>,
    limit: usize,
) -> Result<()> {
    out.clear();
    for chunk in [input, &DEFLATE_TAIL[..]] {
        let base = z.total_in();
        loop {
            if out.len() == out.capacity() {
                ensure!(out.len() <= limit, "inflated reply over {limit} bytes");
                out.reserve(out.capacity().max(4096));
            }
            let done = (z.total_in() - base) as usize;
            let before = (z.total_in(), z.total_out());
            let st = z
                .decompress_vec(&chunk[done..], out, FlushDecompress::Sync)
                .map_err(|e| anyhow::anyhow!("corrupt compressed reply: {e}"))?;
            ensure!(out.len() <= limit, "inflated reply over {limit} bytes");
            if st == Status::StreamEnd {
                // A final block: the server may end its stream; start a fresh one.
                z.reset(false);
                return Ok(());
            }
            let done = (z.total_in() - base) as usize;
            if done == chunk.len() && out.len() < out.capacity() {
                break;
            }
            ensure!(
                before != (z.total_in(), z.total_out()) || out.len() == out.capacity(),
                "inflate made no progress"
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// echo

/// permessage-deflate state of one load connection.
struct ConnPmd {
    pmd: Pmd,
    /// Bodies compressed on their own, shared (the server forbade client context takeover).
    shared: Option<Bodies>,
    /// Our own compressor (context takeover), when `shared` is `None`.
    deflater: Option<Compress>,
    inflater: Decompress,
    /// Scratch for a compressed message body and an inflated reply.
    body: Vec<u8>,
    inflated: Vec<u8>,
}

/// Payload bytes sent and received, before and after compression.
#[derive(Default, Clone, Copy)]
struct Wire {
    sent_plain: u64,
    sent_wire: u64,
    recv_plain: u64,
    recv_wire: u64,
    recv_compressed: u64,
    recv_msgs: u64,
}

impl Wire {
    fn add(&mut self, o: &Wire) {
        self.sent_plain += o.sent_plain;
        self.sent_wire += o.sent_wire;
        self.recv_plain += o.recv_plain;
        self.recv_wire += o.recv_wire;
        self.recv_compressed += o.recv_compressed;
        self.recv_msgs += o.recv_msgs;
    }
}

/// One connection's state for the echo load; every buffer is allocated once.
struct EchoConn {
    s: TcpStream,
    pool: Rc<Pool>,
    /// Index (into the pool) of the next message to send, and of the next echo expected.
    next_send: usize,
    next_echo: usize,
    /// Frames of the current round.
    wbuf: Vec<u8>,
    deflate: Option<ConnPmd>,
    /// Receive buffer: bytes `[start..end]` are unparsed.
    rbuf: Vec<u8>,
    start: usize,
    end: usize,
    /// Pongs (answers to server pings) waiting to be written.
    ctl: Vec<u8>,
    mask: [u8; 4],
    wire: Wire,
}

/// What one phase of the run shares between its connections.
struct Phase {
    /// Messages not yet claimed by a connection.
    left: Cell<u64>,
    deadline: Instant,
    hist: Option<RefCell<Histogram<u64>>>,
    done: Cell<u64>,
}

impl EchoConn {
    fn new(u: Upgraded, pool: Rc<Pool>, p: usize, rng_seed: u64, first: usize) -> Self {
        let mut rng = Rng::new(rng_seed);
        let mask = (rng.next_u64() as u32).to_le_bytes();
        let largest = pool.msgs.iter().map(Vec::len).max().unwrap_or(0);
        let deflate = u.pmd.map(|pmd| {
            let bits = pmd.client_max_window_bits;
            let (shared, deflater) = if pmd.client_no_context_takeover || pool.independent {
                (Some(pool.compressed(bits)), None)
            } else {
                let level = Compression::new(pool.level);
                (
                    None,
                    Some(Compress::new_with_window_bits(level, false, bits)),
                )
            };
            ConnPmd {
                pmd,
                shared,
                deflater,
                inflater: Decompress::new_with_window_bits(false, 15),
                body: Vec::new(),
                inflated: Vec::with_capacity(largest + 1),
            }
        });
        // Room for a whole pipeline of echoes, and at least 64 KiB for small messages.
        let cap = (p * (largest + 14)).max(64 * 1024).max(u.early.len());
        let mut rbuf = vec![0u8; cap];
        rbuf[..u.early.len()].copy_from_slice(&u.early);
        let first = first % pool.msgs.len();
        EchoConn {
            s: u.s,
            pool,
            next_send: first,
            next_echo: first,
            wbuf: Vec::with_capacity(p * (largest + 14)),
            deflate,
            end: u.early.len(),
            rbuf,
            start: 0,
            ctl: Vec::new(),
            mask,
            wire: Wire::default(),
        }
    }

    /// Appends the next message's masked frame to `wbuf`.
    fn push_next(&mut self) {
        let i = self.next_send;
        self.next_send = (i + 1) % self.pool.msgs.len();
        let msg = &self.pool.msgs[i];
        let start = self.wbuf.len();
        let compressed = self.deflate.is_some();
        let body: &[u8] = match self.deflate.as_mut() {
            None => msg,
            Some(d) => match (&d.shared, d.deflater.as_mut()) {
                (Some(shared), _) => &shared[i],
                (None, Some(z)) => {
                    deflate_message(z, msg, &mut d.body);
                    &d.body
                }
                (None, None) => unreachable!("a compressed connection has a compressor"),
            },
        };
        write_masked_frame(&mut self.wbuf, true, self.pool.opcode, self.mask, body);
        self.wire.sent_plain += msg.len() as u64;
        self.wire.sent_wire += body.len() as u64;
        if compressed {
            self.wbuf[start] |= 0x40; // RSV1: compressed
        }
    }

    /// Checks one data message from the server against the next echo expected.
    fn check_echo(&mut self, rsv: u8, body_at: usize, len: usize) -> Result<()> {
        let body = &self.rbuf[body_at..body_at + len];
        let want = &self.pool.msgs[self.next_echo];
        self.next_echo = (self.next_echo + 1) % self.pool.msgs.len();
        self.wire.recv_msgs += 1;
        self.wire.recv_wire += len as u64;
        self.wire.recv_plain += want.len() as u64;
        if rsv & 0b100 == 0 {
            ensure!(rsv == 0, "reserved bits {rsv:#b} set");
            ensure!(*body == **want, "echo differs from what was sent");
            return Ok(());
        }
        ensure!(rsv == 0b100, "reserved bits {rsv:#b} set");
        let d = self
            .deflate
            .as_mut()
            .context("compressed frame without permessage-deflate")?;
        inflate_message(&mut d.inflater, body, &mut d.inflated, MAX_SIZE)?;
        if d.pmd.server_no_context_takeover {
            d.inflater.reset(false);
        }
        ensure!(
            d.inflated == *want,
            "inflated echo differs from what was sent"
        );
        self.wire.recv_compressed += 1;
        Ok(())
    }

    /// Sends `k` messages in one write and waits for their `k` echoes, reporting each echo's
    /// latency (from just before the write to the read that completed it) to `record`.
    async fn round(&mut self, k: usize, mut record: impl FnMut(Duration)) -> Result<()> {
        self.wbuf.clear();
        for _ in 0..k {
            self.push_next();
        }
        let sent = Instant::now();
        self.s.write_all(&self.wbuf).await?;
        let (mut got, mut recorded) = (0, 0);
        loop {
            // Parse every complete frame in the buffer.
            while let Some(h) = parse_header(&self.rbuf[self.start..self.end])
                .map_err(|e| anyhow::anyhow!("bad frame from server: {e}"))?
            {
                ensure!(
                    h.payload_len <= MAX_SIZE as u64,
                    "server frame of {} bytes",
                    h.payload_len
                );
                let total = h.header_len + h.payload_len as usize;
                if self.end - self.start < total {
                    if self.start + total > self.rbuf.len() {
                        self.make_room(total);
                    }
                    break;
                }
                let (body_at, len) = (self.start + h.header_len, h.payload_len as usize);
                ensure!(h.mask.is_none(), "server frame is masked");
                match h.opcode {
                    OpCode::Text | OpCode::Binary if h.fin => {
                        ensure!(got < k, "more echoes than messages sent");
                        self.check_echo(h.rsv, body_at, len)?;
                        got += 1;
                    }
                    OpCode::Ping => {
                        let body = &self.rbuf[body_at..body_at + len];
                        write_masked_frame(&mut self.ctl, true, OpCode::Pong, self.mask, body)
                    }
                    OpCode::Pong => {}
                    OpCode::Close => bail!("server sent close"),
                    op => bail!("unexpected {op:?} frame (fin={})", h.fin),
                }
                self.start += total;
            }
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            }
            if got > recorded {
                let lat = sent.elapsed();
                for _ in recorded..got {
                    record(lat);
                }
                recorded = got;
            }
            if got == k {
                break;
            }
            if self.end == self.rbuf.len() {
                let need = if self.start == 0 {
                    2 * self.end
                } else {
                    self.end
                };
                self.make_room(need);
            }
            let n = self.s.read(&mut self.rbuf[self.end..]).await?;
            ensure!(n > 0, "server closed the connection");
            self.end += n;
        }
        if !self.ctl.is_empty() {
            self.s.write_all(&self.ctl).await?;
            self.ctl.clear();
        }
        Ok(())
    }

    /// Moves the unparsed bytes to the front and grows the buffer to hold `need` bytes.
    fn make_room(&mut self, need: usize) {
        self.rbuf.copy_within(self.start..self.end, 0);
        self.end -= self.start;
        self.start = 0;
        if self.rbuf.len() < need {
            self.rbuf.resize(need, 0);
        }
    }

    /// Runs rounds until the phase's budget or deadline is spent.
    async fn run(&mut self, phase: &Phase, p: usize) -> Result<()> {
        while Instant::now() < phase.deadline {
            let k = phase.left.get().min(p as u64);
            if k == 0 {
                break;
            }
            phase.left.set(phase.left.get() - k);
            let mut n = 0u64;
            self.round(k as usize, |lat| {
                n += 1;
                if let Some(h) = &phase.hist {
                    h.borrow_mut()
                        .saturating_record(lat.as_nanos().max(1) as u64);
                }
            })
            .await?;
            phase.done.set(phase.done.get() + n);
        }
        Ok(())
    }
}

/// Runs one phase over all connections; returns the connections still usable and the number of
/// connections that failed.
async fn run_phase(
    conns: Vec<EchoConn>,
    phase: Rc<Phase>,
    p: usize,
) -> (Vec<EchoConn>, usize, Option<anyhow::Error>) {
    let mut set = JoinSet::new();
    for mut c in conns {
        let phase = phase.clone();
        set.spawn_local(async move {
            // The time limit bounds the whole phase even if the server stops answering.
            let r =
                tokio::time::timeout_at(phase.deadline + Duration::from_secs(1), c.run(&phase, p))
                    .await;
            match r {
                Ok(Ok(())) => Ok(c),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(anyhow::anyhow!("no answer before the time limit")),
            }
        });
    }
    let mut alive = Vec::new();
    let (mut failed, mut first) = (0, None);
    while let Some(r) = set.join_next().await {
        match r {
            Ok(Ok(c)) => alive.push(c),
            Ok(Err(e)) => {
                failed += 1;
                first.get_or_insert(e);
            }
            Err(e) => {
                failed += 1;
                first.get_or_insert(anyhow::anyhow!("task failed: {e}"));
            }
        }
    }
    (alive, failed, first)
}

async fn echo(a: EchoArgs) -> Result<()> {
    let t = parse_url(&a.url)?;
    ensure!(
        (1..=MAX_CONNECTIONS).contains(&a.connections),
        "--connections must be 1..={MAX_CONNECTIONS}"
    );
    ensure!(a.size <= MAX_SIZE, "--size must be at most {MAX_SIZE}");
    ensure!(
        (1..=MAX_PIPELINE).contains(&a.pipeline),
        "--pipeline must be 1..={MAX_PIPELINE}"
    );
    ensure!(
        a.messages <= MAX_MESSAGES && a.warmup <= MAX_MESSAGES,
        "at most {MAX_MESSAGES} messages"
    );
    ensure!(
        a.duration_limit > 0.0 && a.duration_limit <= MAX_SECONDS,
        "--duration-limit must be in (0, {MAX_SECONDS}]"
    );
    let nofile = raise_nofile();
    ensure!(
        (a.connections as u64) + 64 <= nofile,
        "open-file limit {nofile} is too low for {} connections",
        a.connections
    );
    check_msg_args(&a.msg, a.size)?;
    let started = Instant::now();
    let limit = Duration::from_secs_f64(a.duration_limit);
    let pool = Rc::new(Pool::new(a.msg.payload, a.size, a.text, &a.msg));

    // Connect.
    let p = a.pipeline;
    let pl = pool.clone();
    let base = seed();
    let (conns, failed, err) = open_all(
        &t,
        a.connections,
        256,
        started + limit,
        a.msg.deflate,
        move |i, u| EchoConn::new(u, pl.clone(), p, base.wrapping_add(i as u64), i * 37),
    )
    .await;
    if let Some(e) = err {
        eprintln!("warning: {failed} connection(s) failed; first: {e:#}");
    }
    ensure!(!conns.is_empty(), "no connection could be opened");
    let connect_time = started.elapsed();
    println!(
        "connected {} of {} in {:.2}s to {}{}",
        conns.len(),
        a.connections,
        connect_time.as_secs_f64(),
        t.addr,
        t.path
    );
    if let Some(d) = conns[0].deflate.as_ref() {
        println!(
            "permessage-deflate: {:?}; client level {}, {}",
            d.pmd,
            pool.level,
            if d.shared.is_some() {
                "each message compressed on its own"
            } else {
                "client context takeover"
            }
        );
    }

    // Warm-up.
    let mut conns = conns;
    let mut failed_total = failed;
    if a.warmup > 0 {
        let phase = Rc::new(Phase {
            left: Cell::new(a.warmup),
            deadline: started + limit,
            hist: None,
            done: Cell::new(0),
        });
        let (alive, f, e) = run_phase(conns, phase.clone(), p).await;
        if let Some(e) = e {
            eprintln!("warning: {f} connection(s) failed in the warm-up; first: {e:#}");
        }
        failed_total += f;
        conns = alive;
        ensure!(!conns.is_empty(), "every connection failed in the warm-up");
        println!("warm-up: {} messages", phase.done.get());
        for c in &mut conns {
            c.wire = Wire::default();
        }
    }

    // Measured run.
    let server_before = a.server_pid.map(ServerCpu::sample).transpose()?;
    let client_before = self_cpu();
    let machine_before = machine_busy_ticks();
    let t0 = Instant::now();
    let deadline = (started + limit)
        .max(t0 + Duration::from_millis(100))
        .min(t0 + limit);
    let phase = Rc::new(Phase {
        left: Cell::new(a.messages),
        deadline,
        hist: Some(RefCell::new(
            Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("valid histogram bounds"),
        )),
        done: Cell::new(0),
    });
    let n_conns = conns.len();
    let (alive, f, e) = run_phase(conns, phase.clone(), p).await;
    let elapsed = t0.elapsed().as_secs_f64();
    let client_cpu = (self_cpu() - client_before).as_secs_f64();
    let machine_cpu = match (machine_before, machine_busy_ticks()) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / clock_ticks_per_sec()),
        _ => None,
    };
    let server = match (&server_before, a.server_pid) {
        (Some(b), Some(_)) => Some(b.since()?),
        _ => None,
    };
    if let Some(e) = e {
        eprintln!("warning: {f} connection(s) failed during the run; first: {e:#}");
    }
    failed_total += f;
    let mut wire = Wire::default();
    for c in &alive {
        wire.add(&c.wire);
    }

    // Close politely (best effort, bounded).
    let mut closing = JoinSet::new();
    for mut c in alive {
        closing.spawn_local(async move {
            let mut f = Vec::with_capacity(8);
            write_masked_frame(&mut f, true, OpCode::Close, c.mask, &1000u16.to_be_bytes());
            let _ = tokio::time::timeout(Duration::from_millis(500), c.s.write_all(&f)).await;
        });
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while closing.join_next().await.is_some() {}
    })
    .await;

    // Report.
    let done = phase.done.get();
    let hist = phase
        .hist
        .as_ref()
        .expect("measured phase has a histogram")
        .borrow();
    let rate = done as f64 / elapsed;
    let mbps = rate * a.size as f64 / 1e6;
    let kind = match (a.msg.payload, pool.opcode) {
        (PayloadKind::Json, _) => "json",
        (_, OpCode::Text) => "text",
        _ => "binary",
    };
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "messages: {done} of {} in {elapsed:.3}s over {n_conns} connections (pipeline {p}, {} B {kind}{})",
        a.messages,
        a.size,
        if a.msg.deflate { ", permessage-deflate" } else { "" }
    );
    if done < a.messages {
        let _ = writeln!(out, "note: stopped early (time limit or failures)");
    }
    let _ = writeln!(
        out,
        "throughput: {rate:.0} msgs/s, {mbps:.2} MB/s payload each way"
    );
    let _ = writeln!(
        out,
        "latency (us): p50 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}  mean {:.1}",
        us(0.5),
        us(0.99),
        us(0.999),
        hist.max() as f64 / 1000.0,
        hist.mean() / 1000.0
    );
    let _ = writeln!(
        out,
        "client cpu: {client_cpu:.3}s ({:.0}% of one core), {:.2} us/msg",
        100.0 * client_cpu / elapsed,
        1e6 * client_cpu / done.max(1) as f64
    );
    let mut kv = format!(
        "RESULT msgs={done} secs={elapsed:.3} msgs_per_s={rate:.0} mb_per_s={mbps:.3} \
         p50_us={:.1} p99_us={:.1} p999_us={:.1} client_cpu_s={client_cpu:.3} failed={failed_total}",
        us(0.5),
        us(0.99),
        us(0.999)
    );
    if let (Some((secs, sched)), Some(pid)) = (server, a.server_pid) {
        let per = 1e6 * secs / done.max(1) as f64;
        let _ = writeln!(
            out,
            "server cpu (pid {pid}): {secs:.3}s ({:.0}% of one core), {per:.2} us/msg",
            100.0 * secs / elapsed
        );
        let _ = write!(kv, " server_cpu_s={secs:.3} server_us_per_msg={per:.3}");
        if let Some(sched) = sched {
            let per_s = 1e6 * sched / done.max(1) as f64;
            let _ = writeln!(
                out,
                "server cpu (schedstat): {sched:.3}s, {per_s:.2} us/msg"
            );
            let _ = write!(kv, " server_sched_us_per_msg={per_s:.3}");
        }
    }
    if a.msg.deflate {
        let pct = |w: u64, p: u64| 100.0 * w as f64 / p.max(1) as f64;
        let _ = writeln!(
            out,
            "deflate (measured phase, connections still open): sent {:.1}% of plain bytes; \
             received {:.1}%, {} of {} replies compressed",
            pct(wire.sent_wire, wire.sent_plain),
            pct(wire.recv_wire, wire.recv_plain),
            wire.recv_compressed,
            wire.recv_msgs
        );
        let _ = write!(
            kv,
            " deflate=1 sent_ratio={:.4} recv_ratio={:.4} recv_compressed={}",
            wire.sent_wire as f64 / wire.sent_plain.max(1) as f64,
            wire.recv_wire as f64 / wire.recv_plain.max(1) as f64,
            wire.recv_compressed
        );
    }
    if let Some(m) = machine_cpu {
        let server_s = server.map_or(0.0, |(s, _)| s);
        let others = (m - server_s - client_cpu).max(0.0);
        let _ = writeln!(
            out,
            "machine busy: {:.2} cores; processes other than server and client: {:.2} cores",
            m / elapsed,
            others / elapsed
        );
        let _ = write!(kv, " other_cores={:.2}", others / elapsed);
    }
    print!("{out}");
    println!("{kv}");
    ensure!(done > 0, "no message was echoed");
    Ok(())
}

fn check_msg_args(m: &MsgArgs, size: usize) -> Result<()> {
    ensure!(size <= MAX_SIZE, "--size must be at most {MAX_SIZE}");
    ensure!(m.deflate_level <= 9, "--deflate-level must be 0..=9");
    if m.payload == PayloadKind::Json {
        ensure!(size >= 64, "--payload json needs --size of at least 64");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// idle

async fn idle(a: IdleArgs) -> Result<()> {
    let t = parse_url(&a.url)?;
    ensure!(
        (1..=MAX_CONNECTIONS).contains(&a.connections),
        "--connections must be 1..={MAX_CONNECTIONS}"
    );
    for (name, v) in [
        ("--hold", a.hold),
        ("--settle", a.settle),
        ("--duration-limit", a.duration_limit),
    ] {
        ensure!(
            (0.0..=MAX_SECONDS).contains(&v),
            "{name} must be in [0, {MAX_SECONDS}]"
        );
    }
    let nofile = raise_nofile();
    ensure!(
        (a.connections as u64) + 64 <= nofile,
        "open-file limit {nofile} is too low for {} connections",
        a.connections
    );
    check_msg_args(&a.msg, a.size)?;
    let rss = |pid: Option<u32>| pid.map(proc_rss).transpose();
    let before = rss(a.server_pid)?;
    let started = Instant::now();
    let touch = a.touch;
    let base = seed();
    let (streams, failed, err) = open_all(
        &t,
        a.connections,
        a.concurrency,
        started + Duration::from_secs_f64(a.duration_limit),
        a.msg.deflate,
        move |i, u| (u, base.wrapping_add(i as u64), i),
    )
    .await;
    if let Some(e) = err {
        eprintln!("warning: {failed} connection(s) failed; first: {e:#}");
    }
    let negotiated = streams.iter().filter(|(u, _, _)| u.pmd.is_some()).count();
    let mut compressed_echoes = 0;
    let streams: Vec<TcpStream> = if touch {
        // One echo on each connection, a few hundred at a time.
        let pool = Rc::new(Pool::new(a.msg.payload, a.size, true, &a.msg));
        let mut kept = Vec::with_capacity(streams.len());
        let mut it = streams.into_iter();
        let deadline = Instant::now() + Duration::from_secs_f64(a.duration_limit);
        loop {
            let batch: Vec<_> = it.by_ref().take(a.concurrency.max(1)).collect();
            if batch.is_empty() || Instant::now() >= deadline {
                break;
            }
            let mut set = JoinSet::new();
            for (u, sd, i) in batch {
                let pool = pool.clone();
                set.spawn_local(async move {
                    let mut c = EchoConn::new(u, pool, 1, sd, i);
                    let r = tokio::time::timeout(HANDSHAKE_TIMEOUT, c.round(1, |_| {})).await;
                    match r {
                        Ok(Ok(())) => Some((c.s, c.wire.recv_compressed)),
                        _ => None,
                    }
                });
            }
            while let Some(r) = set.join_next().await {
                if let Ok(Some((s, z))) = r {
                    kept.push(s);
                    compressed_echoes += z;
                }
            }
        }
        kept
    } else {
        streams.into_iter().map(|(u, _, _)| u.s).collect()
    };
    let connect_secs = started.elapsed().as_secs_f64();
    let n = streams.len();
    println!(
        "open: {n} of {} connections in {connect_secs:.2}s ({} touched, {negotiated} with \
         permessage-deflate, {compressed_echoes} compressed echoes)",
        a.connections,
        if touch { n } else { 0 }
    );
    tokio::time::sleep(Duration::from_secs_f64(a.settle)).await;
    let after = rss(a.server_pid)?;
    let rest = Duration::from_secs_f64(a.hold).saturating_sub(Duration::from_secs_f64(a.settle));
    tokio::time::sleep(rest).await;
    let end = rss(a.server_pid)?;
    // Did the server close any of them meanwhile? (A non-blocking read sees EOF.)
    let mut closed = 0;
    let mut probe = [0u8; 256];
    for s in &streams {
        if matches!(s.try_read(&mut probe), Ok(0)) {
            closed += 1;
        }
    }
    drop(streams);
    if let (Some(b), Some(af), Some(e), Some(pid)) = (before, after, end, a.server_pid) {
        let mib = |v: u64| v as f64 / (1024.0 * 1024.0);
        let per = (af as f64 - b as f64) / n.max(1) as f64;
        println!(
            "server rss (pid {pid}): before {:.1} MiB, with {n} connections {:.1} MiB, after hold {:.1} MiB",
            mib(b),
            mib(af),
            mib(e)
        );
        println!("per connection: {per:.0} bytes");
        println!(
            "RESULT conns={n} rss_before={b} rss_after={af} rss_end={e} bytes_per_conn={per:.0} \
             closed_by_server={closed} failed={failed} deflate={negotiated} \
             compressed_echoes={compressed_echoes}"
        );
    } else {
        println!(
            "RESULT conns={n} closed_by_server={closed} failed={failed} deflate={negotiated} \
             compressed_echoes={compressed_echoes}"
        );
    }
    Ok(())
}
