//! `fanout`: the rooms protocol (`/ws`). S subscribers on K topics, P publishers at a total
//! rate; every delivery's per-topic `seq` is checked (gaps, duplicates, reordering fail the
//! run; with `--conflated`, skipped values are expected and order and the last value are
//! checked, see `check`), and delivered msgs/s, latency from publish to delivery and server
//! CPU per delivery are reported.

mod check;
mod msg;
mod publisher;
mod subscriber;

use std::cell::{Cell, RefCell};
use std::fmt::Write as _;
use std::rc::Rc;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use clap::Args;
use hdrhistogram::Histogram;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::proc::{
    self, ensure_nofile, machine_busy_secs, machine_busy_ticks, self_cpu, ServerCpu,
};
use crate::target::{bounded, connect_timeout, Target};
use crate::tls::TlsArgs;
use crate::wire::{mask_from, FrameBuf};
use crate::{latency_histogram, seed, MAX_CONNECTIONS, MAX_MESSAGES, MAX_SECONDS};
use check::{Finals, SeqStats};
use msg::Incoming;
use publisher::{PubPlan, Publisher};
use subscriber::{subscribe, subscriber_ended};

#[derive(Args)]
pub struct FanoutArgs {
    /// ws:// or wss://127.0.0.1:PORT/ws (only 127.0.0.1 / localhost).
    #[arg(long)]
    url: String,
    /// Where subscribers connect, round robin (repeatable; several nodes of a cluster);
    /// publishers stay on --url. Default: --url.
    #[arg(long)]
    subscriber_url: Vec<String>,
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    #[arg(long, default_value_t = 1)]
    publishers: usize,
    /// Messages published per second, over all publishers.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Bytes of each message's `data` object as JSON (`{"ts":…,"pad":"…"}`, at least ~30).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Messages to publish, over all publishers.
    #[arg(long, default_value_t = 1000)]
    messages: u64,
    /// Topic name (letters, digits, `-_.:`).
    #[arg(long, default_value = "bench")]
    topic: String,
    /// Topics: with K > 1 they are T-0 … T-(K-1); subscriber i joins topic i mod K and
    /// message n goes to topic n mod K.
    #[arg(long, default_value_t = 1)]
    topics: usize,
    /// Seconds to wait for outstanding deliveries after the last publish.
    #[arg(long, default_value_t = 10.0)]
    drain: f64,
    /// The whole run (connecting, publishing, draining) stops after this many seconds.
    #[arg(long, default_value_t = 120.0)]
    duration_limit: f64,
    /// Handshakes (and subscribes) in flight at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    #[command(flatten)]
    tls: TlsArgs,
    /// `data` carries realistic JSON of about --size bytes (varied values, as
    /// `--payload json` of the echo load), instead of padding.
    #[arg(long)]
    json: bool,
    /// Subscribers offer permessage-deflate as browsers do (`permessage-deflate;
    /// client_max_window_bits`) and inflate what comes compressed.
    #[arg(long)]
    deflate: bool,
    /// Server process to measure: CPU time from the first publish to the last delivery.
    #[arg(long)]
    server_pid: Option<u32>,
    /// More server processes to measure the same way (the other nodes of a cluster).
    #[arg(long)]
    also_server_pid: Vec<u32>,
    /// After the drain, keep every connection open this many seconds and report the server's
    /// VmRSS before and after (needs --server-pid): what connections keep once traffic stops.
    #[arg(long, default_value_t = 0.0)]
    hold: f64,
    /// The topics are conflated (`[[rooms.topic]] conflate`, without `conflate_key`): a
    /// subscriber gets some of the values, not all. Skipped values are expected; seqs must
    /// still only go up, no value may be older than one already delivered from the same
    /// publisher, and every subscriber must get the last value of its topic.
    #[arg(long)]
    conflated: bool,
}

/// Counters every subscriber and publisher adds to.
struct FanStats {
    delivered: Cell<u64>,
    delivered_bytes: Cell<u64>,
    seq: SeqStats,
    wrong_topic: Cell<u64>,
    server_errors: Cell<u64>,
    first_server_error: RefCell<Option<String>>,
    /// Nanoseconds since the run's start of the latest delivery.
    last_ns: Cell<u64>,
    hist: RefCell<Histogram<u64>>,
}

impl FanStats {
    /// Checks a server message that is not a room message: an `error` is recorded loudly.
    fn other_message(&self, m: &Incoming<'_>) {
        if m.ty == "error" {
            self.server_errors.set(self.server_errors.get() + 1);
            let mut first = self.first_server_error.borrow_mut();
            if first.is_none() {
                *first = Some(format!(
                    "{} ({})",
                    m.error.as_deref().unwrap_or("?"),
                    m.code.as_deref().unwrap_or("?")
                ));
            }
        }
    }
}

pub async fn run(a: FanoutArgs) -> Result<()> {
    let t = Target::parse(&a.url, &a.tls)?;
    let sub_targets = match a.subscriber_url.is_empty() {
        true => vec![t.clone()],
        false => a
            .subscriber_url
            .iter()
            .map(|u| Target::parse(u, &a.tls))
            .collect::<Result<Vec<_>>>()?,
    };
    ensure!(
        a.subscribers >= 1 && a.publishers >= 1,
        "--subscribers and --publishers must be at least 1"
    );
    ensure!(
        a.subscribers + a.publishers <= MAX_CONNECTIONS,
        "at most {MAX_CONNECTIONS} connections in all"
    );
    ensure!(
        (1..=a.subscribers).contains(&a.topics),
        "--topics must be 1..=--subscribers"
    );
    ensure!(
        !a.topic.is_empty()
            && a.topic.len() <= 100
            && a.topic
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b)),
        "--topic: 1-100 letters, digits or -_.:"
    );
    ensure!(
        a.rate > 0.0 && a.rate <= 10_000_000.0,
        "--rate must be in (0, 10000000]"
    );
    ensure!(a.size <= 1 << 20, "--size must be at most 1 MiB");
    ensure!(
        (1..=MAX_MESSAGES).contains(&a.messages),
        "--messages must be 1..={MAX_MESSAGES}"
    );
    for (name, v) in [("--drain", a.drain), ("--duration-limit", a.duration_limit)] {
        ensure!(
            v > 0.0 && v <= MAX_SECONDS,
            "{name} must be in (0, {MAX_SECONDS}]"
        );
    }
    ensure!(
        (0.0..=MAX_SECONDS).contains(&a.hold),
        "--hold must be in [0, {MAX_SECONDS}]"
    );
    ensure!(
        a.hold == 0.0 || a.server_pid.is_some(),
        "--hold reports the server's memory: give --server-pid"
    );
    ensure_nofile(a.subscribers + a.publishers, "connections")?;
    let topics: Rc<[String]> = if a.topics == 1 {
        vec![a.topic.clone()].into()
    } else {
        (0..a.topics).map(|k| format!("{}-{k}", a.topic)).collect()
    };
    let epoch = Instant::now();
    let deadline = epoch + Duration::from_secs_f64(a.duration_limit);

    let p = a.publishers as u64;
    let quotas: Vec<u64> = (0..p)
        .map(|j| a.messages / p + u64::from(j < a.messages % p))
        .collect();
    let finals = a.conflated.then(|| Rc::new(Finals::new(&quotas, a.topics)));

    // Subscribers: connect and subscribe, `concurrency` at a time.
    let base = seed();
    let (subs, failed, first) = bounded(a.subscribers, a.concurrency, deadline, |i| {
        let (t, topics) = (sub_targets[i % sub_targets.len()].clone(), topics.clone());
        let finals = finals.clone();
        async move {
            let sd = base ^ ((i as u64) << 20);
            subscribe(&t, sd, &topics, i % topics.len(), a.deflate, finals).await
        }
    })
    .await;
    if let Some(e) = first {
        bail!("{failed} subscriber(s) could not subscribe; first: {e:#}");
    }
    ensure!(
        subs.len() == a.subscribers,
        "only {} of {} subscribers were up before the time limit",
        subs.len(),
        a.subscribers
    );
    let mut subs_per_topic = vec![0u64; a.topics];
    for s in &subs {
        subs_per_topic[s.topic] += 1;
    }
    // Publishers.
    let mut pubs = Vec::with_capacity(a.publishers);
    for (j, &quota) in (0..p).zip(&quotas) {
        let sd = base ^ ((a.subscribers as u64 + j) << 20) ^ 1;
        let u = connect_timeout(&t, sd, false)
            .await
            .with_context(|| format!("publisher {j}"))?;
        pubs.push(Publisher {
            s: u.s,
            fb: FrameBuf::new(&u.early, 4096),
            mask: mask_from(sd),
            index: j,
            count: p,
            quota,
        });
    }
    println!(
        "up: {} subscribers on {} topic(s), {} publisher(s) in {:.2}s ({}://{}{})",
        subs.len(),
        a.topics,
        pubs.len(),
        epoch.elapsed().as_secs_f64(),
        t.scheme(),
        t.addr,
        t.path
    );

    let st = Rc::new(FanStats {
        delivered: Cell::new(0),
        delivered_bytes: Cell::new(0),
        seq: SeqStats::default(),
        wrong_topic: Cell::new(0),
        server_errors: Cell::new(0),
        first_server_error: RefCell::new(None),
        last_ns: Cell::new(0),
        hist: RefCell::new(latency_histogram(600)),
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut sub_tasks = JoinSet::new();
    for s in subs {
        sub_tasks.spawn_local(s.run(st.clone(), epoch, topics.clone(), stop_rx.clone()));
    }
    // Let the subscriber tasks start reading before the first publish.
    tokio::task::yield_now().await;

    let server_before = a.server_pid.map(ServerCpu::sample).transpose()?;
    let others_before = a
        .also_server_pid
        .iter()
        .map(|&p| ServerCpu::sample(p))
        .collect::<Result<Vec<_>>>()?;
    let client_before = self_cpu();
    let machine_before = machine_busy_ticks();
    let t0 = Instant::now();
    let t0_ns = (t0 - epoch).as_nanos() as u64;
    let plan = Rc::new(PubPlan {
        topics: topics.clone(),
        sent: (0..a.topics).map(|_| Cell::new(0)).collect(),
        size: a.size,
        realistic: a.json,
        rate: a.rate / p as f64,
        epoch,
        t0,
        deadline,
    });
    let mut pub_tasks = JoinSet::new();
    for pb in pubs {
        pub_tasks.spawn_local(pb.run(st.clone(), plan.clone()));
    }
    let (mut published, mut conn_failures, mut first_err) = (0u64, 0usize, None::<anyhow::Error>);
    // Subscribers that fail while publishers run are noticed here too.
    loop {
        tokio::select! {
            r = pub_tasks.join_next() => match r {
                None => break,
                Some(Ok(Ok(n))) => published += n,
                Some(Ok(Err(e))) => {
                    conn_failures += 1;
                    first_err.get_or_insert(e.context("publisher"));
                }
                Some(Err(e)) => {
                    conn_failures += 1;
                    first_err.get_or_insert(anyhow::anyhow!("publisher task failed: {e}"));
                }
            },
            Some(r) = sub_tasks.join_next() => {
                conn_failures += 1;
                first_err.get_or_insert(subscriber_ended(r));
            }
        }
    }
    let publish_secs = t0.elapsed().as_secs_f64();
    let expected: u64 = plan
        .sent
        .iter()
        .zip(&subs_per_topic)
        .map(|(c, n)| c.get() * n)
        .sum();
    // Drain: wait for every expected delivery (conflated: for every subscriber's last value),
    // bounded by --drain and the time limit.
    let waiting = || match a.conflated {
        false => st.delivered.get() < expected,
        true => st.seq.at_final.get() < a.subscribers as u64,
    };
    let drain_until = (Instant::now() + Duration::from_secs_f64(a.drain)).min(deadline);
    while waiting() && Instant::now() < drain_until {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(5)) => {}
            Some(r) = sub_tasks.join_next() => {
                conn_failures += 1;
                first_err.get_or_insert(subscriber_ended(r));
            }
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let client_cpu = (self_cpu() - client_before).as_secs_f64();
    let server = match &server_before {
        Some(b) => Some(b.since()?),
        None => None,
    };
    let others = others_before
        .iter()
        .map(|b| b.since())
        .collect::<Result<Vec<_>>>()?;
    let machine_cpu = machine_busy_secs(machine_before);
    let held = match a.server_pid {
        Some(pid) if a.hold > 0.0 => {
            let drained = proc::rss(pid)?;
            tokio::time::sleep(Duration::from_secs_f64(a.hold)).await;
            Some((drained, proc::rss(pid)?))
        }
        _ => None,
    };
    let _ = stop_tx.send(true);
    while let Ok(Some(r)) =
        tokio::time::timeout(Duration::from_secs(5), sub_tasks.join_next()).await
    {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                conn_failures += 1;
                first_err.get_or_insert(e.context("subscriber"));
            }
            Err(e) => {
                conn_failures += 1;
                first_err.get_or_insert(anyhow::anyhow!("subscriber task failed: {e}"));
            }
        }
    }
    sub_tasks.abort_all();

    // Report.
    let (delivered, sq) = (st.delivered.get(), &st.seq);
    let span = (st.last_ns.get().saturating_sub(t0_ns) as f64 / 1e9).max(1e-9);
    let rate = delivered as f64 / span;
    let hist = st.hist.borrow();
    let us = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "published: {published} of {} in {publish_secs:.3}s ({:.0}/s asked, {:.0}/s achieved), \
         data {} B",
        a.messages,
        a.rate,
        published as f64 / publish_secs.max(1e-9),
        a.size
    );
    let of = match a.conflated {
        false => "expected",
        true => "published values (conflated)",
    };
    println!(
        "delivered (each once): {delivered} of {expected} {of} in {span:.3}s: {rate:.0} msgs/s \
         (avg frame payload {:.0} B)",
        st.delivered_bytes.get() as f64 / delivered.max(1) as f64
    );
    println!(
        "latency publish->delivery (us): p50 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}",
        us(0.5),
        us(0.99),
        us(0.999),
        hist.max() as f64 / 1000.0
    );
    println!(
        "client cpu: {client_cpu:.3}s ({:.0}% of one core over {elapsed:.2}s)",
        100.0 * client_cpu / elapsed
    );
    let mut kv = format!(
        "RESULT subscribers={} topics={} publishers={} published={published} \
         expected={expected} delivered={delivered} secs={span:.3} delivered_per_s={rate:.0} \
         p50_us={:.0} p99_us={:.0} p999_us={:.0} gaps={} dups={} reordered={} wrong_topic={} \
         server_errors={} failed_conns={conn_failures} wire_bytes_per_delivery={:.0}",
        a.subscribers,
        a.topics,
        a.publishers,
        us(0.5),
        us(0.99),
        us(0.999),
        sq.gaps.get(),
        sq.dups.get(),
        sq.reordered.get(),
        st.wrong_topic.get(),
        st.server_errors.get(),
        st.delivered_bytes.get() as f64 / delivered.max(1) as f64
    );
    if a.conflated {
        let _ = write!(
            kv,
            " conflated=1 stale={} at_last_value={}",
            sq.stale.get(),
            sq.at_final.get()
        );
    }
    if let (Some((secs, _)), Some(pid)) = (server, a.server_pid) {
        let per = 1e6 * secs / delivered.max(1) as f64;
        println!(
            "server cpu (pid {pid}): {secs:.3}s ({:.0}% of one core), {per:.3} us/delivered msg",
            100.0 * secs / elapsed
        );
        let _ = write!(
            kv,
            " server_cpu_s={secs:.3} server_us_per_delivery={per:.4}"
        );
    }
    for (&pid, (secs, _)) in a.also_server_pid.iter().zip(&others) {
        let per = 1e6 * secs / delivered.max(1) as f64;
        println!(
            "server cpu (pid {pid}): {secs:.3}s ({:.0}% of one core), {per:.3} us per delivered msg of all",
            100.0 * secs / elapsed
        );
        let _ = write!(kv, " server_{pid}_cpu_s={secs:.3}");
    }
    if let Some(m) = machine_cpu {
        let server_s = server.map_or(0.0, |(s, _)| s);
        let _ = write!(
            kv,
            " other_cores={:.2}",
            (m - server_s - client_cpu).max(0.0) / elapsed
        );
    }
    if let Some((drained, end)) = held {
        println!(
            "server rss: {drained} B after the drain, {end} B after holding every connection \
             open {:.0} s",
            a.hold
        );
        let _ = write!(kv, " rss_drained={drained} rss_held={end}");
    }
    println!("{kv}");

    // Correctness: loud, and the exit status says it.
    let mut problems = Vec::new();
    if let Some(e) = &first_err {
        problems.push(format!(
            "{conn_failures} connection(s) failed; first: {e:#}"
        ));
    }
    if sq.gaps.get() > 0 && !a.conflated {
        problems.push(format!(
            "{} seq gap(s) (messages skipped, {} beyond tracking)",
            sq.gaps.get(),
            sq.gaps_untracked.get()
        ));
    }
    if sq.dups.get() > 0 {
        problems.push(format!("{} duplicate deliveries", sq.dups.get()));
    }
    if sq.reordered.get() > 0 {
        problems.push(format!("{} deliveries out of order", sq.reordered.get()));
    }
    if sq.stale.get() > 0 {
        problems.push(format!(
            "{} value(s) older than one already delivered from the same publisher",
            sq.stale.get()
        ));
    }
    if st.wrong_topic.get() > 0 {
        problems.push(format!(
            "{} deliveries for a topic not subscribed",
            st.wrong_topic.get()
        ));
    }
    if st.server_errors.get() > 0 {
        problems.push(format!(
            "{} error message(s) from the server; first: {}",
            st.server_errors.get(),
            st.first_server_error.borrow().as_deref().unwrap_or("?")
        ));
    }
    if a.conflated && sq.at_final.get() < a.subscribers as u64 {
        problems.push(format!(
            "{} of {} subscribers did not end on the last value of their topic",
            a.subscribers as u64 - sq.at_final.get(),
            a.subscribers
        ));
    }
    if delivered < expected && !a.conflated {
        problems.push(format!(
            "{} of {expected} expected deliveries missing after the drain",
            expected - delivered
        ));
    }
    if published < a.messages {
        problems.push(format!(
            "only {published} of {} messages published before the time limit",
            a.messages
        ));
    }
    if !problems.is_empty() {
        for p in &problems {
            eprintln!("FAIL: {p}");
        }
        bail!("fan-out check failed ({} problem(s))", problems.len());
    }
    match a.conflated {
        false => println!("OK: every subscriber got every message of its topic once, in seq order"),
        true => println!(
            "OK: every subscriber got values of its topic once, in seq order, none older than \
             one before it, ending on the topic's last value"
        ),
    }
    Ok(())
}
