//! `ringgate-load`: an end-to-end WebSocket load generator for ringgate (or any RFC 6455 echo
//! server), built to stay cheap enough to share a two-core machine with the server it measures.
//!
//! * `echo`: N connections each send a message, wait for its echo, record the round trip and
//!   repeat until the message budget (or the time limit) is spent; prints msgs/s, MB/s, latency
//!   percentiles and, with `--server-pid`, the server's CPU time per message.
//! * `idle`: opens N connections, holds them, and prints the server's RSS growth per connection.
//! * `handshakes`: opens and closes N connections (TCP, TLS for `wss://`, upgrade, close
//!   handshake), C at a time; prints handshakes/s and the server's CPU time per handshake.
//! * `fanout`: the rooms protocol (`/ws`): S subscribers on K topics, P publishers at a total
//!   rate; checks every delivery's per-topic `seq` (gaps, duplicates, reordering fail the run;
//!   with `--conflated`, for conflated topics, skipped values are expected and order, values
//!   never older than earlier ones and the arrival of each topic's last value are checked)
//!   and prints delivered msgs/s, latency from publish to delivery and server CPU per delivery.
//!
//! `wss://` URLs go through rustls (ring provider) with `--ca FILE` (the CA to trust, e.g. the
//! `ca.pem` of `ringgate dev-cert DIR`) or `--insecure` (any certificate; handshake signatures
//! are still verified, so the client does the same crypto work). Without `--tls-resume` every
//! connection does a full handshake.
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
//! One tokio current-thread runtime; the upgrade is done by hand over a `TcpStream` (or a rustls
//! stream over one); frames are written with `ringgate::ws::frame::write_masked_frame` (built
//! once per connection and reused) and replies parsed in place with `parse_header`. Only
//! 127.0.0.1 is ever a target, and every loop is bounded in count and in time.
//!
//! Modules: `target` (URL, TCP/TLS connect, upgrade), `tls` (client config), `stream`
//! (plain or TLS stream), `wire` (reading server frames), `deflate` (permessage-deflate),
//! `payload` (what echo and idle send), `proc` (CPU and memory from /proc), and one module per
//! workload.

mod deflate;
mod echo;
mod fanout;
mod handshakes;
mod idle;
mod payload;
mod proc;
mod stream;
mod target;
mod tls;
mod wire;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Hard caps on the knobs, so that no invocation can run away.
const MAX_CONNECTIONS: usize = 20_000;
const MAX_SIZE: usize = 16 << 20;
const MAX_MESSAGES: u64 = 1_000_000_000;
const MAX_SECONDS: f64 = 3600.0;

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
    Echo(echo::EchoArgs),
    /// Open many idle connections and measure the server's memory per connection.
    Idle(idle::IdleArgs),
    /// Open and close connections (TCP, TLS, upgrade, close) and measure handshakes/s.
    Handshakes(handshakes::HandshakesArgs),
    /// Rooms fan-out (`/ws`): subscribers, publishers at a rate, seq checks, latency.
    Fanout(fanout::FanoutArgs),
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
            Cmd::Echo(a) => echo::run(a).await,
            Cmd::Idle(a) => idle::run(a).await,
            Cmd::Handshakes(a) => handshakes::run(a).await,
            Cmd::Fanout(a) => fanout::run(a).await,
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

/// A latency histogram in nanoseconds, from 1 ns up to `max_secs`, 3 significant digits.
fn latency_histogram(max_secs: u64) -> Histogram<u64> {
    Histogram::new_with_bounds(1, max_secs * 1_000_000_000, 3).expect("valid histogram bounds")
}

/// A seed that differs from run to run (for masks and handshake keys).
fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64)
}
