//! `echo`: request/response load. Each connection sends a message (or `--pipeline` of them in
//! one write), waits for the echoes, checks them and records the round trip, until the message
//! budget or the time limit is spent.

use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::rc::Rc;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use clap::Args;
use hdrhistogram::Histogram;
use ringgate::ws::deflate::{Deflater, InflateError, Inflater};
use ringgate::ws::frame::{write_masked_frame, OpCode};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::deflate::Pmd;
use crate::payload::{Bodies, MsgArgs, PayloadKind, Pool};
use crate::proc::{ensure_nofile, machine_busy_secs, machine_busy_ticks, self_cpu, ServerCpu};
use crate::stream::Stream;
use crate::target::{open_all, Target, Upgraded};
use crate::tls::TlsArgs;
use crate::wire::{close_frame, mask_from, FrameBuf};
use crate::{latency_histogram, seed, MAX_CONNECTIONS, MAX_MESSAGES, MAX_SECONDS, MAX_SIZE};

const MAX_PIPELINE: usize = 1024;

#[derive(Args)]
pub struct EchoArgs {
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
    #[command(flatten)]
    tls: TlsArgs,
    /// Server process to measure: CPU time (utime+stime from /proc/PID/stat) over the run.
    #[arg(long)]
    server_pid: Option<u32>,
}

/// permessage-deflate state of one load connection.
struct ConnPmd {
    pmd: Pmd,
    /// Bodies compressed on their own, shared (the server forbade client context takeover).
    shared: Option<Bodies>,
    /// Our own compressor (context takeover), when `shared` is `None`.
    deflater: Option<Deflater>,
    inflater: Inflater,
    /// Scratch for a compressed message body and an inflated reply.
    body: Vec<u8>,
    inflated: Vec<u8>,
}

/// Payload bytes sent and received, before and after compression.
#[derive(Default, Clone, Copy)]
pub struct Wire {
    sent_plain: u64,
    sent_wire: u64,
    recv_plain: u64,
    recv_wire: u64,
    pub recv_compressed: u64,
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
pub struct EchoConn {
    pub s: Stream,
    pool: Rc<Pool>,
    /// Index (into the pool) of the next message to send, and of the next echo expected.
    next_send: usize,
    next_echo: usize,
    /// Frames of the current round.
    wbuf: Vec<u8>,
    deflate: Option<ConnPmd>,
    /// Replies not yet parsed.
    fb: FrameBuf,
    /// Pongs (answers to server pings) waiting to be written.
    ctl: Vec<u8>,
    mask: [u8; 4],
    pub wire: Wire,
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
    pub fn new(u: Upgraded, pool: Rc<Pool>, p: usize, rng_seed: u64, first: usize) -> Self {
        let mask = mask_from(rng_seed);
        let largest = pool.largest();
        let deflate = u.pmd.map(|pmd| {
            let bits = pmd.client_max_window_bits;
            let (shared, deflater) = if pmd.client_no_context_takeover || pool.independent {
                (Some(pool.compressed(bits)), None)
            } else {
                (None, Some(Deflater::new(pool.level, bits, true)))
            };
            ConnPmd {
                pmd,
                shared,
                deflater,
                inflater: Inflater::new(!pmd.server_no_context_takeover),
                body: Vec::new(),
                inflated: Vec::with_capacity(largest + 1),
            }
        });
        // Room for a whole pipeline of echoes, and at least 64 KiB for small messages.
        let fb = FrameBuf::new(&u.early, (p * (largest + 14)).max(64 * 1024));
        let first = first % pool.msgs.len();
        EchoConn {
            s: u.s,
            pool,
            next_send: first,
            next_echo: first,
            wbuf: Vec::with_capacity(p * (largest + 14)),
            deflate,
            fb,
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
                    d.body.clear();
                    z.compress(msg, &mut d.body);
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

    /// Sends `k` messages in one write and waits for their `k` echoes, reporting each echo's
    /// latency (from just before the write to the read that completed it) to `record`.
    pub async fn round(&mut self, k: usize, mut record: impl FnMut(Duration)) -> Result<()> {
        self.wbuf.clear();
        for _ in 0..k {
            self.push_next();
        }
        let sent = Instant::now();
        self.s.send(&self.wbuf).await?;
        let (mut got, mut recorded) = (0, 0);
        loop {
            self.fb.each(|op, fin, rsv, body| {
                match op {
                    OpCode::Text | OpCode::Binary if fin => {
                        ensure!(got < k, "more echoes than messages sent");
                        let want = &self.pool.msgs[self.next_echo];
                        self.next_echo = (self.next_echo + 1) % self.pool.msgs.len();
                        check_echo(want, self.deflate.as_mut(), &mut self.wire, rsv, body)?;
                        got += 1;
                    }
                    OpCode::Ping => {
                        write_masked_frame(&mut self.ctl, true, OpCode::Pong, self.mask, body)
                    }
                    OpCode::Pong => {}
                    OpCode::Close => bail!("server sent close"),
                    op => bail!("unexpected {op:?} frame (fin={fin})"),
                }
                Ok(true)
            })?;
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
            self.fb.fill(&mut self.s).await?;
        }
        if !self.ctl.is_empty() {
            self.s.send(&self.ctl).await?;
            self.ctl.clear();
        }
        Ok(())
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

/// Checks one data message from the server against `want`, the next echo expected.
fn check_echo(
    want: &[u8],
    deflate: Option<&mut ConnPmd>,
    wire: &mut Wire,
    rsv: u8,
    body: &[u8],
) -> Result<()> {
    wire.recv_msgs += 1;
    wire.recv_wire += body.len() as u64;
    wire.recv_plain += want.len() as u64;
    if rsv & 0b100 == 0 {
        ensure!(rsv == 0, "reserved bits {rsv:#b} set");
        ensure!(body == want, "echo differs from what was sent");
        return Ok(());
    }
    ensure!(rsv == 0b100, "reserved bits {rsv:#b} set");
    let d = deflate.context("compressed frame without permessage-deflate")?;
    d.inflated.clear();
    d.inflater
        .inflate(body, MAX_SIZE, &mut d.inflated)
        .map_err(|e| match e {
            InflateError::TooBig(limit) => anyhow::anyhow!("inflated reply over {limit} bytes"),
            InflateError::Corrupt => anyhow::anyhow!("corrupt compressed reply"),
        })?;
    ensure!(
        d.inflated == want,
        "inflated echo differs from what was sent"
    );
    wire.recv_compressed += 1;
    Ok(())
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

pub async fn run(a: EchoArgs) -> Result<()> {
    let t = Target::parse(&a.url, &a.tls)?;
    ensure!(
        (1..=MAX_CONNECTIONS).contains(&a.connections),
        "--connections must be 1..={MAX_CONNECTIONS}"
    );
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
    ensure_nofile(a.connections, "connections")?;
    a.msg.check(a.size)?;
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
        "connected {} of {} in {:.2}s to {}://{}{}",
        conns.len(),
        a.connections,
        connect_time.as_secs_f64(),
        t.scheme(),
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
        hist: Some(RefCell::new(latency_histogram(120))),
        done: Cell::new(0),
    });
    let n_conns = conns.len();
    let (alive, f, e) = run_phase(conns, phase.clone(), p).await;
    let elapsed = t0.elapsed().as_secs_f64();
    let client_cpu = (self_cpu() - client_before).as_secs_f64();
    let machine_cpu = machine_busy_secs(machine_before);
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
            let f = close_frame(c.mask);
            let _ = tokio::time::timeout(Duration::from_millis(500), c.s.send(&f)).await;
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
         p50_us={:.1} p99_us={:.1} p999_us={:.1} client_cpu_s={client_cpu:.3} failed={failed_total} \
         tls={}",
        us(0.5),
        us(0.99),
        us(0.999),
        u8::from(t.tls.is_some())
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
