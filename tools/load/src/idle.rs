//! `idle`: opens many connections, holds them, and reports the server's RSS growth per
//! connection (optionally after one echo on each, `--touch`).

use std::rc::Rc;
use std::time::Duration;

use anyhow::{ensure, Result};
use clap::Args;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::echo::EchoConn;
use crate::payload::{MsgArgs, Pool};
use crate::proc::{self, ensure_nofile};
use crate::stream::Stream;
use crate::target::{open_all, Target, HANDSHAKE_TIMEOUT};
use crate::tls::TlsArgs;
use crate::{seed, MAX_CONNECTIONS, MAX_SECONDS};

#[derive(Args)]
pub struct IdleArgs {
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
    #[command(flatten)]
    tls: TlsArgs,
    /// Server process whose VmRSS (/proc/PID/status) is sampled.
    #[arg(long)]
    server_pid: Option<u32>,
}

pub async fn run(a: IdleArgs) -> Result<()> {
    let t = Target::parse(&a.url, &a.tls)?;
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
    ensure_nofile(a.connections, "connections")?;
    a.msg.check(a.size)?;
    let rss = |pid: Option<u32>| pid.map(proc::rss).transpose();
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
    let streams: Vec<Stream> = if touch {
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
        if matches!(s.tcp().try_read(&mut probe), Ok(0)) {
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
