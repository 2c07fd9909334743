//! `handshakes`: opens and closes connections (TCP, TLS for `wss://`, upgrade, close
//! handshake), C at a time, and reports handshakes/s and the server's CPU per handshake.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use clap::Args;
use hdrhistogram::Histogram;
use ringgate::ws::frame::OpCode;
use tokio::io::AsyncWriteExt;
use tokio::time::Instant;

use crate::proc::{ensure_nofile, machine_busy_secs, machine_busy_ticks, self_cpu, ServerCpu};
use crate::target::{bounded, connect_timeout, Target, Upgraded, HANDSHAKE_TIMEOUT};
use crate::tls::TlsArgs;
use crate::wire::{close_frame, mask_from, FrameBuf};
use crate::{latency_histogram, seed, MAX_CONNECTIONS, MAX_SECONDS};

#[derive(Args)]
pub struct HandshakesArgs {
    /// ws:// or wss://127.0.0.1:PORT/PATH (only 127.0.0.1 / localhost).
    #[arg(long)]
    url: String,
    /// Connections opened and closed in the measured phase.
    #[arg(long, default_value_t = 5000)]
    connections: usize,
    /// Connections in flight at once.
    #[arg(long, default_value_t = 50)]
    concurrency: usize,
    /// Connections opened and closed before measuring starts.
    #[arg(long, default_value_t = 200)]
    warmup: usize,
    /// Stop after this many seconds even if connections are left.
    #[arg(long, default_value_t = 60.0)]
    duration_limit: f64,
    #[command(flatten)]
    tls: TlsArgs,
    /// Server process to measure: CPU time over the measured phase.
    #[arg(long)]
    server_pid: Option<u32>,
}

/// One connection's life: connect (TCP, TLS, upgrade), then the close handshake (our close,
/// the server's close, then TLS close_notify and FIN). Returns the time to the 101.
async fn open_close(t: &Target, seed: u64) -> Result<Duration> {
    let t0 = Instant::now();
    let u = connect_timeout(t, seed, false).await?;
    let opened = t0.elapsed();
    let Upgraded { mut s, early, .. } = u;
    let f = close_frame(mask_from(seed));
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        s.send(&f).await?;
        let mut fb = FrameBuf::new(&early, 256);
        loop {
            let more = fb.each(|op, _, _, _| Ok(op != OpCode::Close))?;
            if !more {
                break;
            }
            ensure!(fb.capacity() <= 64 * 1024, "no close frame in 64 KiB");
            fb.fill(&mut s).await?;
        }
        let _ = s.shutdown().await;
        Ok::<_, anyhow::Error>(())
    })
    .await
    .context("close handshake timed out")??;
    Ok(opened)
}

/// Runs `n` open/close cycles, `c` at a time, until `deadline`; returns (ok, failed, first error).
async fn cycles(
    t: &Target,
    n: usize,
    c: usize,
    deadline: Instant,
    hist: Option<&RefCell<Histogram<u64>>>,
) -> (u64, u64, Option<anyhow::Error>) {
    let base = seed();
    let (lats, failed, first) = bounded(n, c, deadline, |i| {
        let t = t.clone();
        async move { open_close(&t, base ^ ((i as u64) << 20)).await }
    })
    .await;
    if let Some(h) = hist {
        let mut h = h.borrow_mut();
        for lat in &lats {
            h.saturating_record(lat.as_nanos().max(1) as u64);
        }
    }
    (lats.len() as u64, failed as u64, first)
}

pub async fn run(a: HandshakesArgs) -> Result<()> {
    let t = Target::parse(&a.url, &a.tls)?;
    ensure!(
        (1..=200_000).contains(&a.connections) && a.warmup <= 200_000,
        "--connections must be 1..=200000 (and --warmup at most that)"
    );
    ensure!(
        (1..=MAX_CONNECTIONS).contains(&a.concurrency),
        "--concurrency must be 1..={MAX_CONNECTIONS}"
    );
    ensure!(
        a.duration_limit > 0.0 && a.duration_limit <= MAX_SECONDS,
        "--duration-limit must be in (0, {MAX_SECONDS}]"
    );
    ensure_nofile(a.concurrency, "concurrent connections")?;
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(a.duration_limit);
    if a.warmup > 0 {
        let (ok, failed, e) = cycles(&t, a.warmup, a.concurrency, deadline, None).await;
        if let Some(e) = e {
            eprintln!("warning: {failed} warm-up connection(s) failed; first: {e:#}");
        }
        println!("warm-up: {ok} connections");
    }
    let hist = RefCell::new(latency_histogram(120));
    let server_before = a.server_pid.map(ServerCpu::sample).transpose()?;
    let client_before = self_cpu();
    let machine_before = machine_busy_ticks();
    let t0 = Instant::now();
    let (ok, failed, e) = cycles(&t, a.connections, a.concurrency, deadline, Some(&hist)).await;
    let elapsed = t0.elapsed().as_secs_f64();
    let client_cpu = (self_cpu() - client_before).as_secs_f64();
    let server = match &server_before {
        Some(b) => Some(b.since()?),
        None => None,
    };
    let machine_cpu = machine_busy_secs(machine_before);
    if let Some(e) = &e {
        eprintln!("warning: {failed} connection(s) failed; first: {e:#}");
    }
    let hist = hist.borrow();
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let rate = ok as f64 / elapsed;
    println!(
        "handshakes ({}://, {}): {ok} of {} in {elapsed:.3}s, {failed} failed, {} at a time",
        t.scheme(),
        if t.tls.is_some() && a.tls.tls_resume {
            "resumption allowed"
        } else if t.tls.is_some() {
            "full TLS handshakes"
        } else {
            "plain"
        },
        a.connections,
        a.concurrency
    );
    println!("rate: {rate:.0} connections/s (open + upgrade + close)");
    println!(
        "time to 101 (us): p50 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}",
        us(0.5),
        us(0.99),
        us(0.999),
        hist.max() as f64 / 1000.0
    );
    println!(
        "client cpu: {client_cpu:.3}s ({:.0}% of one core), {:.1} us/handshake",
        100.0 * client_cpu / elapsed,
        1e6 * client_cpu / ok.max(1) as f64
    );
    let mut kv = format!(
        "RESULT handshakes={ok} failed={failed} secs={elapsed:.3} per_s={rate:.0} tls={} \
         p50_us={:.0} p99_us={:.0} client_us_per_hs={:.1}",
        u8::from(t.tls.is_some()),
        us(0.5),
        us(0.99),
        1e6 * client_cpu / ok.max(1) as f64
    );
    if let (Some((secs, sched)), Some(pid)) = (server, a.server_pid) {
        let per = 1e6 * secs / ok.max(1) as f64;
        println!(
            "server cpu (pid {pid}): {secs:.3}s ({:.0}% of one core), {per:.1} us/handshake \
             ({:.0} handshakes/s per core)",
            100.0 * secs / elapsed,
            1e6 / per.max(1e-9)
        );
        let _ = write!(kv, " server_cpu_s={secs:.3} server_us_per_hs={per:.2}");
        if let Some(sched) = sched {
            let _ = write!(
                kv,
                " server_sched_us_per_hs={:.2}",
                1e6 * sched / ok.max(1) as f64
            );
        }
    }
    if let Some(m) = machine_cpu {
        let server_s = server.map_or(0.0, |(s, _)| s);
        let others = (m - server_s - client_cpu).max(0.0);
        let _ = write!(kv, " other_cores={:.2}", others / elapsed);
    }
    println!("{kv}");
    ensure!(ok > 0, "no connection completed");
    Ok(())
}
