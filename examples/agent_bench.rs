//! Agent gateway overhead: latency added per chunk and chunks/s, through ringgate's `/ws/agent`
//! versus reading the same SSE upstream directly. See bench/AGENT.md and bench/agent/run.sh.
//!
//! ```sh
//! agent_bench upstream --port 18104 --chunks 100 --interval-ms 50
//! agent_bench client --url http://127.0.0.1:18104 --streams 1000            # direct
//! agent_bench client --url ws://127.0.0.1:18103/ws/agent --streams 1000     # through ringgate
//! ```
//!
//! Each chunk carries the upstream's send time (µs since the Unix epoch, same host clock); the
//! client records receive time minus send time for every chunk. All streams start together;
//! with a pause between chunks, each stream's first chunk waits a different part of the pause,
//! so chunks arrive spread out rather than in bursts of one per stream.

use std::convert::Infallible;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Frame;
use ringgate::agent::chunk::{content, Content};
use ringgate::agent::sse::SseDecoder;
use tokio::net::{TcpListener, TcpStream};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// An SSE upstream on 127.0.0.1: POST /agent/stream streams `chunks` events.
    Upstream {
        #[arg(long, default_value_t = 18104)]
        port: u16,
        #[arg(long, default_value_t = 100)]
        chunks: usize,
        /// Pause between chunks of one stream (0: as fast as the connection takes them).
        #[arg(long, default_value_t = 50)]
        interval_ms: u64,
    },
    /// Runs `streams` concurrent streaming queries against ws://…/ws/agent or http://upstream.
    Client {
        #[arg(long)]
        url: String,
        #[arg(long, default_value_t = 1000)]
        streams: usize,
    },
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    match cli.cmd {
        Cmd::Upstream {
            port,
            chunks,
            interval_ms,
        } => local.block_on(&rt, upstream(port, chunks, interval_ms)),
        Cmd::Client { url, streams } => local.block_on(&rt, client(url, streams)),
    }
}

async fn upstream(port: u16, chunks: usize, interval_ms: u64) -> anyhow::Result<()> {
    let listener = TcpListener::bind(("127.0.0.1", port)).await?;
    eprintln!("upstream on 127.0.0.1:{port}: {chunks} chunks every {interval_ms} ms");
    let mut n = 0u64;
    loop {
        let (sock, _) = listener.accept().await?;
        sock.set_nodelay(true)?;
        // Streams start at spread-out phases of the interval, as independent answers would,
        // instead of all emitting their chunks in the same instant.
        n += 1;
        let phase = Duration::from_micros((n * 7919 * 1000) % (interval_ms * 1000).max(1));
        tokio::task::spawn_local(async move {
            let svc = hyper::service::service_fn(move |_req| async move {
                let body = futures_util::stream::unfold(0usize, move |i| async move {
                    if i == 0 && interval_ms > 0 {
                        tokio::time::sleep(phase).await;
                    }
                    if i > chunks {
                        return None;
                    }
                    if i == chunks {
                        let done = Bytes::from_static(b"data: [DONE]\n\n");
                        return Some((Ok::<_, Infallible>(Frame::data(done)), i + 1));
                    }
                    if interval_ms > 0 && i > 0 {
                        tokio::time::sleep(Duration::from_millis(interval_ms)).await;
                    }
                    let ev = format!("data: {{\"content\":\"{}\"}}\n\n", now_us());
                    Some((Ok(Frame::data(Bytes::from(ev))), i + 1))
                });
                let resp = http::Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(StreamBody::new(body))
                    .map_err(|_| unreachable_err())?;
                Ok::<_, Infallible>(resp)
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(sock), svc)
                .await;
        });
    }
}

fn unreachable_err() -> Infallible {
    panic!("a response with a literal header cannot fail to build")
}

/// One stream's latencies (µs) and chunk count.
type Lat = Vec<u64>;

async fn client(url: String, streams: usize) -> anyhow::Result<()> {
    let go = Rc::new(tokio::sync::Notify::new());
    let ready = Rc::new(std::cell::Cell::new(0usize));
    let mut tasks = Vec::new();
    for i in 0..streams {
        let (url, go, ready) = (url.clone(), go.clone(), ready.clone());
        tasks.push(tokio::task::spawn_local(async move {
            let r = if url.starts_with("ws") {
                ws_stream(&url, i, &go, &ready).await
            } else {
                direct_stream(&url, &go, &ready).await
            };
            r.map_err(|e| anyhow::anyhow!("stream {i}: {e}"))
        }));
    }
    while ready.get() < streams {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let start = Instant::now();
    go.notify_waiters();
    let mut hist = Histogram::<u64>::new(3)?;
    let mut total = 0u64;
    let mut failed = 0;
    for t in tasks {
        match t.await? {
            Ok(lat) => {
                total += lat.len() as u64;
                for l in lat {
                    hist.record(l.max(1))?;
                }
            }
            Err(e) => {
                failed += 1;
                eprintln!("{e}");
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    println!(
        "url={url} streams={streams} failed={failed} chunks={total} secs={secs:.2} chunks_per_s={:.0} p50_us={} p90_us={} p99_us={} max_us={}",
        total as f64 / secs,
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.9),
        hist.value_at_quantile(0.99),
        hist.max()
    );
    Ok(())
}

fn latency_of(text: &str, lat: &mut Lat) {
    if let Ok(sent) = text.parse::<u64>() {
        lat.push(now_us().saturating_sub(sent));
    }
}

async fn ws_stream(
    url: &str,
    i: usize,
    go: &tokio::sync::Notify,
    ready: &std::cell::Cell<usize>,
) -> anyhow::Result<Lat> {
    use tokio_tungstenite::tungstenite::Message;
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    ws.next().await; // connected
    let notified = go.notified();
    ready.set(ready.get() + 1);
    notified.await;
    let q = format!(r#"{{"type":"streaming_query","query":"bench","id":{i}}}"#);
    ws.send(Message::text(q)).await?;
    let mut lat = Vec::new();
    while let Some(m) = ws.next().await {
        let Message::Text(t) = m? else { continue };
        let v: serde_json::Value = serde_json::from_str(&t)?;
        match v["type"].as_str() {
            Some("stream_chunk") => latency_of(v["content"].as_str().unwrap_or(""), &mut lat),
            Some("stream_end") => return Ok(lat),
            Some("error") => anyhow::bail!("{t}"),
            _ => {}
        }
    }
    anyhow::bail!("connection closed before stream_end")
}

async fn direct_stream(
    url: &str,
    go: &tokio::sync::Notify,
    ready: &std::cell::Cell<usize>,
) -> anyhow::Result<Lat> {
    let authority = url.trim_start_matches("http://").trim_end_matches('/');
    let sock = TcpStream::connect(authority).await?;
    sock.set_nodelay(true)?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(sock)).await?;
    tokio::task::spawn_local(conn);
    let notified = go.notified();
    ready.set(ready.get() + 1);
    notified.await;
    let req = http::Request::post("/agent/stream")
        .header("host", authority)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(br#"{"query":"bench"}"#)))?;
    let mut body = send.send_request(req).await?.into_body();
    let mut dec = SseDecoder::new(1 << 20);
    let mut events = Vec::new();
    let mut lat = Vec::new();
    while let Some(f) = body.frame().await {
        let Ok(data) = f?.into_data() else { continue };
        dec.feed(&data, &mut events)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        for ev in events.drain(..) {
            if ev.data == "[DONE]" {
                return Ok(lat);
            }
            if let Content::Text(t) = content(&ev.data) {
                latency_of(&t, &mut lat);
            }
        }
    }
    Ok(lat)
}
