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
//!   rate; checks every delivery's per-topic `seq` (gaps, duplicates, reordering fail the run)
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
//! stream over one); frames
//! are written with `ringgate::ws::frame::write_masked_frame` (built once per connection and
//! reused) and replies parsed in place with `parse_header`. Only 127.0.0.1 is ever a target, and
//! every loop is bounded in count and in time.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::process::ExitCode;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
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
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
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
    /// Open and close connections (TCP, TLS, upgrade, close) and measure handshakes/s.
    Handshakes(HandshakesArgs),
    /// Rooms fan-out (`/ws`): subscribers, publishers at a rate, seq checks, latency.
    Fanout(FanoutArgs),
}

/// How `wss://` connections are made.
#[derive(Args, Clone)]
struct TlsArgs {
    /// wss://: PEM file with the CA certificate(s) to trust (`ringgate dev-cert DIR` writes
    /// DIR/ca.pem).
    #[arg(long)]
    ca: Option<PathBuf>,
    /// wss://: accept any server certificate (handshake signatures are still verified).
    #[arg(long)]
    insecure: bool,
    /// wss://: resume TLS sessions from earlier connections (default: every handshake is full).
    #[arg(long)]
    tls_resume: bool,
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
    #[command(flatten)]
    tls: TlsArgs,
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
    #[command(flatten)]
    tls: TlsArgs,
    /// Server process whose VmRSS (/proc/PID/status) is sampled.
    #[arg(long)]
    server_pid: Option<u32>,
}

#[derive(Args)]
struct HandshakesArgs {
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

#[derive(Args)]
struct FanoutArgs {
    /// ws:// or wss://127.0.0.1:PORT/ws (only 127.0.0.1 / localhost).
    #[arg(long)]
    url: String,
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
    /// Server process to measure: CPU time from the first publish to the last delivery.
    #[arg(long)]
    server_pid: Option<u32>,
    /// After the drain, keep every connection open this many seconds and report the server's
    /// VmRSS before and after (needs --server-pid): what connections keep once traffic stops.
    #[arg(long, default_value_t = 0.0)]
    hold: f64,
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
            Cmd::Handshakes(a) => handshakes(a).await,
            Cmd::Fanout(a) => fanout(a).await,
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

/// A parsed `ws://` or `wss://` URL pointing at this machine.
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    host: String,
    path: String,
    tls: Option<TlsTarget>,
}

/// How to make the TLS connection for a `wss://` target.
#[derive(Clone)]
struct TlsTarget {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

fn parse_url(url: &str, tls: &TlsArgs) -> Result<Target> {
    let (secure, rest) = if let Some(r) = url.strip_prefix("wss://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("ws://") {
        (false, r)
    } else {
        bail!("only ws:// and wss:// URLs are supported")
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => (h, p.parse::<u16>().context("bad port")?),
        None => (authority, if secure { 443 } else { 80 }),
    };
    let name = match host {
        "127.0.0.1" => ServerName::IpAddress(Ipv4Addr::LOCALHOST.into()),
        "localhost" => ServerName::try_from("localhost")?,
        other => bail!("refusing target {other:?}: only 127.0.0.1 / localhost may be loaded"),
    };
    ensure!(port != 0, "port 0 is not a target");
    let tls = if secure {
        Some(TlsTarget {
            connector: tls_connector(tls)?,
            name,
        })
    } else {
        ensure!(
            tls.ca.is_none() && !tls.insecure && !tls.tls_resume,
            "--ca, --insecure and --tls-resume need a wss:// URL"
        );
        None
    };
    Ok(Target {
        addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
        host: format!("{host}:{port}"),
        path: path.to_string(),
        tls,
    })
}

/// The rustls client (ring provider, TLS 1.2 and 1.3, ALPN `http/1.1` like browsers).
impl Target {
    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "wss"
        } else {
            "ws"
        }
    }
}

fn tls_connector(a: &TlsArgs) -> Result<tokio_rustls::TlsConnector> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let mut cfg = match (&a.ca, a.insecure) {
        (_, true) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCert(provider)))
            .with_no_client_auth(),
        (Some(path), false) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(path)
                .with_context(|| format!("read {}", path.display()))?
            {
                let c = c.with_context(|| format!("{}: bad PEM", path.display()))?;
                roots
                    .add(c)
                    .with_context(|| format!("{}: unusable CA certificate", path.display()))?;
            }
            ensure!(
                !roots.is_empty(),
                "{}: no certificate found",
                path.display()
            );
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        (None, false) => bail!("wss:// needs --ca FILE (the CA to trust) or --insecure"),
    };
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    if !a.tls_resume {
        cfg.resumption = rustls::client::Resumption::disabled();
    }
    Ok(tokio_rustls::TlsConnector::from(Arc::new(cfg)))
}

/// `--insecure`: any certificate chain is accepted, but handshake signatures are verified as
/// usual, so the client's CPU work per handshake stays close to the verifying one.
#[derive(Debug)]
struct AnyCert(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A client connection: plain TCP or TLS over TCP.
enum Stream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(s) => s.get_ref().0,
        }
    }

    /// Writes all of `b` and flushes (rustls may hold records back until flushed).
    async fn send(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.write_all(b).await?;
        self.flush().await
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
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
    s: Stream,
    /// Bytes that came after the 101 response head.
    early: Vec<u8>,
    /// The agreed permessage-deflate parameters, if any.
    pmd: Option<Pmd>,
}

/// Connects and performs the opening handshake, offering permessage-deflate when `deflate`.
async fn connect(t: &Target, rng_seed: u64, deflate: bool) -> Result<Upgraded> {
    let tcp = TcpStream::connect(t.addr)
        .await
        .with_context(|| format!("connect {}", t.addr))?;
    tcp.set_nodelay(true)?;
    let mut s = match &t.tls {
        None => Stream::Plain(tcp),
        Some(tls) => Stream::Tls(Box::new(
            tls.connector
                .connect(tls.name.clone(), tcp)
                .await
                .context("TLS handshake")?,
        )),
    };
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
    s.send(req.as_bytes()).await?;
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
    bounded(n, concurrency, deadline, |i| {
        let (t, then) = (t.clone(), then.clone());
        async move {
            let u = connect_timeout(&t, base ^ (i as u64) << 20, deflate).await?;
            Ok(then(i, u))
        }
    })
    .await
}

/// Runs `task(0..n)`, at most `concurrency` at a time, until `deadline`: the results of the
/// tasks that succeeded, how many failed, and the first error.
async fn bounded<T: 'static, F>(
    n: usize,
    concurrency: usize,
    deadline: Instant,
    task: impl Fn(usize) -> F,
) -> (Vec<T>, usize, Option<anyhow::Error>)
where
    F: std::future::Future<Output = Result<T>> + 'static,
{
    let mut set = JoinSet::new();
    let mut out = Vec::with_capacity(n);
    let (mut failed, mut first_err) = (0usize, None);
    let mut next = 0usize;
    while (next < n || !set.is_empty()) && Instant::now() < deadline {
        while next < n && set.len() < concurrency.max(1) {
            set.spawn_local(task(next));
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
    s: Stream,
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
        self.s.send(&self.wbuf).await?;
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
            self.s.send(&self.ctl).await?;
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
    let t = parse_url(&a.url, &a.tls)?;
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
    let t = parse_url(&a.url, &a.tls)?;
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

// ---------------------------------------------------------------------------------------------
// Frames from the server (handshakes, fanout)

/// A receive buffer that yields whole server frames; grows only for frames that do not fit.
struct FrameBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl FrameBuf {
    fn new(early: &[u8], cap: usize) -> FrameBuf {
        let mut buf = vec![0u8; cap.max(early.len()).max(64)];
        buf[..early.len()].copy_from_slice(early);
        FrameBuf {
            buf,
            start: 0,
            end: early.len(),
        }
    }

    /// Calls `f(opcode, fin, rsv, payload)` for every complete frame buffered, in order, until
    /// `f` returns `false`; an incomplete frame stays for the next `fill`.
    fn each(&mut self, mut f: impl FnMut(OpCode, bool, u8, &[u8]) -> Result<bool>) -> Result<bool> {
        loop {
            let Some(h) = parse_header(&self.buf[self.start..self.end])
                .map_err(|e| anyhow::anyhow!("bad frame from server: {e}"))?
            else {
                break;
            };
            ensure!(h.mask.is_none(), "server frame is masked");
            ensure!(
                h.payload_len <= MAX_SIZE as u64,
                "server frame of {} bytes",
                h.payload_len
            );
            let total = h.header_len + h.payload_len as usize;
            if self.end - self.start < total {
                if self.start + total > self.buf.len() {
                    self.buf.copy_within(self.start..self.end, 0);
                    self.end -= self.start;
                    self.start = 0;
                    if self.buf.len() < total {
                        self.buf.resize(total, 0);
                    }
                }
                break;
            }
            let body = self.start + h.header_len..self.start + total;
            self.start += total;
            if !f(h.opcode, h.fin, h.rsv, &self.buf[body])? {
                return Ok(false);
            }
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
        Ok(true)
    }

    /// Reads more bytes from `s`; a closed connection is an error.
    async fn fill(&mut self, s: &mut Stream) -> Result<()> {
        if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                let n = self.buf.len() * 2;
                self.buf.resize(n, 0);
            }
        }
        let n = s.read(&mut self.buf[self.end..]).await?;
        ensure!(n > 0, "server closed the connection");
        self.end += n;
        Ok(())
    }
}

fn mask_from(seed: u64) -> [u8; 4] {
    (Rng::new(seed).next_u64() as u32).to_le_bytes()
}

// ---------------------------------------------------------------------------------------------
// handshakes

/// One connection's life: connect (TCP, TLS, upgrade), then the close handshake (our close,
/// the server's close, then TLS close_notify and FIN). Returns the time to the 101.
async fn open_close(t: &Target, seed: u64) -> Result<Duration> {
    let t0 = Instant::now();
    let u = connect_timeout(t, seed, false).await?;
    let opened = t0.elapsed();
    let Upgraded { mut s, early, .. } = u;
    let mut f = Vec::with_capacity(8);
    write_masked_frame(
        &mut f,
        true,
        OpCode::Close,
        mask_from(seed),
        &1000u16.to_be_bytes(),
    );
    tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        s.send(&f).await?;
        let mut fb = FrameBuf::new(&early, 256);
        loop {
            let more = fb.each(|op, _, _, _| Ok(op != OpCode::Close))?;
            if !more {
                break;
            }
            ensure!(fb.buf.len() <= 64 * 1024, "no close frame in 64 KiB");
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

async fn handshakes(a: HandshakesArgs) -> Result<()> {
    let t = parse_url(&a.url, &a.tls)?;
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
    let nofile = raise_nofile();
    ensure!(
        (a.concurrency as u64) + 64 <= nofile,
        "open-file limit {nofile} is too low for {} concurrent connections",
        a.concurrency
    );
    let started = Instant::now();
    let deadline = started + Duration::from_secs_f64(a.duration_limit);
    if a.warmup > 0 {
        let (ok, failed, e) = cycles(&t, a.warmup, a.concurrency, deadline, None).await;
        if let Some(e) = e {
            eprintln!("warning: {failed} warm-up connection(s) failed; first: {e:#}");
        }
        println!("warm-up: {ok} connections");
    }
    let hist = RefCell::new(
        Histogram::new_with_bounds(1, 120_000_000_000, 3).expect("valid histogram bounds"),
    );
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
    let machine_cpu = match (machine_before, machine_busy_ticks()) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / clock_ticks_per_sec()),
        _ => None,
    };
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

// ---------------------------------------------------------------------------------------------
// fanout

/// A server message as far as the fan-out check needs it.
#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(rename = "type", borrow)]
    ty: Cow<'a, str>,
    #[serde(default, borrow)]
    topic: Option<Cow<'a, str>>,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    data: Option<Payload>,
    #[serde(default, borrow)]
    error: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    code: Option<Cow<'a, str>>,
}

/// The `data` the publishers send: `{"ts": nanos since the run's start, "pad": "…"}`.
#[derive(Deserialize)]
struct Payload {
    #[serde(default)]
    ts: Option<u64>,
}

fn parse_incoming(body: &[u8]) -> Result<Incoming<'_>> {
    serde_json::from_slice(body).map_err(|e| {
        let shown = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        anyhow::anyhow!("server sent a message that is not the expected JSON ({e}): {shown:?}")
    })
}

/// Counters every subscriber and publisher adds to.
struct FanStats {
    delivered: Cell<u64>,
    delivered_bytes: Cell<u64>,
    /// Seqs skipped and not (yet) delivered late, over all subscribers.
    gaps: Cell<u64>,
    /// Gaps too large to track seq by seq (counted, not resolvable as reordering).
    gaps_untracked: Cell<u64>,
    dups: Cell<u64>,
    reordered: Cell<u64>,
    wrong_topic: Cell<u64>,
    server_errors: Cell<u64>,
    first_server_error: RefCell<Option<String>>,
    /// Nanoseconds since the run's start of the latest delivery.
    last_ns: Cell<u64>,
    hist: RefCell<Histogram<u64>>,
}

/// Most missing seqs one subscriber tracks individually.
const MAX_MISSING: usize = 1 << 16;

struct Subscriber {
    s: Stream,
    fb: FrameBuf,
    mask: [u8; 4],
    topic: usize,
    /// The next seq expected (None: the `subscribed` reply carried no seq; the first message
    /// sets it).
    next: Option<u64>,
    missing: BTreeSet<u64>,
}

/// Builds the masked text frame of one JSON message.
fn text_frame(out: &mut Vec<u8>, mask: [u8; 4], json: &str) {
    write_masked_frame(out, true, OpCode::Text, mask, json.as_bytes());
}

/// Checks a server message that is not a room message: an `error` is recorded loudly.
fn other_message(m: &Incoming<'_>, st: &FanStats) {
    if m.ty == "error" {
        st.server_errors.set(st.server_errors.get() + 1);
        let mut first = st.first_server_error.borrow_mut();
        if first.is_none() {
            *first = Some(format!(
                "{} ({})",
                m.error.as_deref().unwrap_or("?"),
                m.code.as_deref().unwrap_or("?")
            ));
        }
    }
}

/// Connects, subscribes to `topics[topic]` and waits for the `subscribed` reply.
async fn subscribe(t: &Target, sd: u64, topics: &[String], topic: usize) -> Result<Subscriber> {
    let u = connect_timeout(t, sd, false).await?;
    let mask = mask_from(sd);
    let mut sub = Subscriber {
        s: u.s,
        fb: FrameBuf::new(&u.early, 4096),
        mask,
        topic,
        next: None,
        missing: BTreeSet::new(),
    };
    let name = &topics[topic];
    let mut f = Vec::new();
    text_frame(
        &mut f,
        mask,
        &format!(r#"{{"action":"subscribe","topic":"{name}","id":"s{sd}"}}"#),
    );
    let sub = tokio::time::timeout(HANDSHAKE_TIMEOUT, async move {
        sub.s.send(&f).await?;
        let mut pong = Vec::new();
        loop {
            let mut base = None;
            let mut err = None;
            sub.fb.each(|op, fin, _, body| {
                match op {
                    OpCode::Text if fin => {
                        let m = parse_incoming(body)?;
                        match m.ty.as_ref() {
                            "subscribed" if m.topic.as_deref() == Some(name.as_str()) => {
                                base = Some(m.seq);
                                return Ok(false);
                            }
                            "error" => {
                                err = Some(format!(
                                    "subscribe refused: {} ({})",
                                    m.error.as_deref().unwrap_or("?"),
                                    m.code.as_deref().unwrap_or("?")
                                ));
                                return Ok(false);
                            }
                            "message" => bail!("room message before the subscribe was confirmed"),
                            _ => {}
                        }
                    }
                    OpCode::Ping => write_masked_frame(&mut pong, true, OpCode::Pong, mask, body),
                    OpCode::Pong => {}
                    OpCode::Close => bail!("server closed during subscribe"),
                    op => bail!("unexpected {op:?} frame (fin={fin}) during subscribe"),
                }
                Ok(true)
            })?;
            if let Some(e) = err {
                bail!(e);
            }
            if !pong.is_empty() {
                sub.s.send(&pong).await?;
                pong.clear();
            }
            if let Some(base) = base {
                sub.next = base.map(|b| b + 1);
                return Ok(sub);
            }
            sub.fb.fill(&mut sub.s).await?;
        }
    })
    .await
    .context("subscribe timed out")??;
    Ok(sub)
}

impl Subscriber {
    /// Reads and checks deliveries until `stop` changes.
    async fn run(
        mut self,
        st: Rc<FanStats>,
        epoch: Instant,
        topics: Rc<[String]>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<()> {
        let mut pong = Vec::new();
        loop {
            let now_ns = epoch.elapsed().as_nanos() as u64;
            let topic = topics[self.topic].as_str();
            let (next, missing) = (&mut self.next, &mut self.missing);
            let mask = self.mask;
            self.fb.each(|op, fin, rsv, body| {
                match op {
                    OpCode::Text | OpCode::Binary if fin => {
                        ensure!(
                            rsv == 0,
                            "reserved bits {rsv:#b} set (no extension offered)"
                        );
                        let m = parse_incoming(body)?;
                        if m.ty != "message" {
                            other_message(&m, &st);
                            return Ok(true);
                        }
                        if m.topic.as_deref() != Some(topic) {
                            st.wrong_topic.set(st.wrong_topic.get() + 1);
                            return Ok(true);
                        }
                        let seq = m.seq.context("room message without seq")?;
                        let ts = m
                            .data
                            .and_then(|d| d.ts)
                            .context("room message without data.ts")?;
                        let fresh = match *next {
                            None => {
                                *next = Some(seq + 1);
                                true
                            }
                            Some(n) if seq == n => {
                                *next = Some(n + 1);
                                true
                            }
                            Some(n) if seq > n => {
                                let skipped = seq - n;
                                st.gaps.set(st.gaps.get() + skipped);
                                for s in n..seq {
                                    if missing.len() >= MAX_MISSING {
                                        st.gaps_untracked.set(st.gaps_untracked.get() + 1);
                                        continue;
                                    }
                                    missing.insert(s);
                                }
                                *next = Some(seq + 1);
                                true
                            }
                            Some(_) => {
                                if missing.remove(&seq) {
                                    st.reordered.set(st.reordered.get() + 1);
                                    st.gaps.set(st.gaps.get() - 1);
                                    true
                                } else {
                                    st.dups.set(st.dups.get() + 1);
                                    false
                                }
                            }
                        };
                        if fresh {
                            st.delivered.set(st.delivered.get() + 1);
                            st.delivered_bytes
                                .set(st.delivered_bytes.get() + body.len() as u64);
                            st.hist
                                .borrow_mut()
                                .saturating_record(now_ns.saturating_sub(ts).max(1));
                        }
                        st.last_ns.set(now_ns);
                    }
                    OpCode::Ping => write_masked_frame(&mut pong, true, OpCode::Pong, mask, body),
                    OpCode::Pong => {}
                    OpCode::Close => bail!("server closed the subscriber: {}", close_text(body)),
                    op => bail!("unexpected {op:?} frame (fin={fin}); fragments are not supported"),
                }
                Ok(true)
            })?;
            if !pong.is_empty() {
                self.s.send(&pong).await?;
                pong.clear();
            }
            tokio::select! {
                r = self.fb.fill(&mut self.s) => r?,
                _ = stop.changed() => return Ok(()),
            }
        }
    }
}

fn close_text(body: &[u8]) -> String {
    match body {
        [a, b, reason @ ..] => format!(
            "code {} {:?}",
            u16::from_be_bytes([*a, *b]),
            String::from_utf8_lossy(reason)
        ),
        _ => "no code".to_string(),
    }
}

/// One publisher's share of the run.
struct Publisher {
    s: Stream,
    fb: FrameBuf,
    mask: [u8; 4],
    /// This publisher's index, and how many there are: its k-th message is message
    /// `k * count + index` of the run.
    index: u64,
    count: u64,
    quota: u64,
}

/// What every publisher shares.
struct PubPlan {
    topics: Rc<[String]>,
    /// Messages sent per topic.
    sent: Rc<[Cell<u64>]>,
    size: usize,
    /// Messages per second for one publisher.
    rate: f64,
    /// Timestamps are nanoseconds since this instant.
    epoch: Instant,
    t0: Instant,
    deadline: Instant,
}

/// The JSON of one publish; `data` is padded to `size` bytes when the timestamp leaves room.
fn publish_json(out: &mut String, topic: &str, ts: u64, size: usize) {
    out.clear();
    let _ = write!(
        out,
        r#"{{"action":"publish","topic":"{topic}","data":{{"ts":{ts},"pad":""#
    );
    // `{"ts":` + digits + `,"pad":"` + pad + `"}`
    let digits = ts.checked_ilog10().unwrap_or(0) as usize + 1;
    let fixed = 6 + digits + 8 + 2;
    for _ in 0..size.saturating_sub(fixed) {
        out.push('x');
    }
    out.push_str("\"}}");
}

impl Publisher {
    async fn run(mut self, st: Rc<FanStats>, plan: Rc<PubPlan>) -> Result<u64> {
        let (mut sent, mut wbuf, mut json, mut pong) =
            (0u64, Vec::new(), String::new(), Vec::new());
        while sent < self.quota {
            let now = Instant::now();
            if now >= plan.deadline {
                break;
            }
            let due = (((now - plan.t0).as_secs_f64() * plan.rate) as u64 + 1).min(self.quota);
            if due > sent {
                wbuf.clear();
                let ts = plan.epoch.elapsed().as_nanos() as u64;
                for k in sent..due {
                    let n = k * self.count + self.index;
                    let topic = (n % plan.topics.len() as u64) as usize;
                    publish_json(&mut json, &plan.topics[topic], ts, plan.size);
                    text_frame(&mut wbuf, self.mask, &json);
                    let c = &plan.sent[topic];
                    c.set(c.get() + 1);
                }
                tokio::time::timeout_at(plan.deadline + Duration::from_secs(1), self.s.send(&wbuf))
                    .await
                    .context("publish write blocked past the time limit")??;
                sent = due;
                continue;
            }
            let at = plan.t0 + Duration::from_secs_f64(sent as f64 / plan.rate);
            tokio::select! {
                _ = tokio::time::sleep_until(at.min(plan.deadline)) => {}
                r = self.fb.fill(&mut self.s) => {
                    r?;
                    let mask = self.mask;
                    self.fb.each(|op, fin, _, body| {
                        match op {
                            OpCode::Text if fin => other_message(&parse_incoming(body)?, &st),
                            OpCode::Ping => write_masked_frame(&mut pong, true, OpCode::Pong, mask, body),
                            OpCode::Pong => {}
                            OpCode::Close => bail!("server closed the publisher: {}", close_text(body)),
                            op => bail!("unexpected {op:?} frame (fin={fin}) to a publisher"),
                        }
                        Ok(true)
                    })?;
                    if !pong.is_empty() {
                        self.s.send(&pong).await?;
                        pong.clear();
                    }
                }
            }
        }
        Ok(sent)
    }
}

/// Why a subscriber task ended: it should run until the end of the run.
fn subscriber_ended(r: Result<Result<()>, tokio::task::JoinError>) -> anyhow::Error {
    let e = match r {
        Ok(Err(e)) => e,
        Ok(Ok(())) => anyhow::anyhow!("subscriber stopped early"),
        Err(e) => anyhow::anyhow!("subscriber task failed: {e}"),
    };
    e.context("subscriber")
}

async fn fanout(a: FanoutArgs) -> Result<()> {
    let t = parse_url(&a.url, &a.tls)?;
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
    let nofile = raise_nofile();
    let conns = a.subscribers + a.publishers;
    ensure!(
        (conns as u64) + 64 <= nofile,
        "open-file limit {nofile} is too low for {conns} connections"
    );
    let topics: Rc<[String]> = if a.topics == 1 {
        vec![a.topic.clone()].into()
    } else {
        (0..a.topics).map(|k| format!("{}-{k}", a.topic)).collect()
    };
    let epoch = Instant::now();
    let deadline = epoch + Duration::from_secs_f64(a.duration_limit);

    // Subscribers: connect and subscribe, `concurrency` at a time.
    let base = seed();
    let (subs, failed, first) = bounded(a.subscribers, a.concurrency, deadline, |i| {
        let (t, topics) = (t.clone(), topics.clone());
        async move { subscribe(&t, base ^ ((i as u64) << 20), &topics, i % topics.len()).await }
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
    let p = a.publishers as u64;
    for j in 0..p {
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
            quota: a.messages / p + u64::from(j < a.messages % p),
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
        gaps: Cell::new(0),
        gaps_untracked: Cell::new(0),
        dups: Cell::new(0),
        reordered: Cell::new(0),
        wrong_topic: Cell::new(0),
        server_errors: Cell::new(0),
        first_server_error: RefCell::new(None),
        last_ns: Cell::new(0),
        hist: RefCell::new(
            Histogram::new_with_bounds(1, 600_000_000_000, 3).expect("valid histogram bounds"),
        ),
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut sub_tasks = JoinSet::new();
    for s in subs {
        sub_tasks.spawn_local(s.run(st.clone(), epoch, topics.clone(), stop_rx.clone()));
    }
    // Let the subscriber tasks start reading before the first publish.
    tokio::task::yield_now().await;

    let server_before = a.server_pid.map(ServerCpu::sample).transpose()?;
    let client_before = self_cpu();
    let machine_before = machine_busy_ticks();
    let t0 = Instant::now();
    let t0_ns = (t0 - epoch).as_nanos() as u64;
    let plan = Rc::new(PubPlan {
        topics: topics.clone(),
        sent: (0..a.topics).map(|_| Cell::new(0)).collect(),
        size: a.size,
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
    // Drain: wait for every expected delivery, bounded by --drain and the time limit.
    let drain_until = (Instant::now() + Duration::from_secs_f64(a.drain)).min(deadline);
    while st.delivered.get() < expected && Instant::now() < drain_until {
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
    let machine_cpu = match (machine_before, machine_busy_ticks()) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / clock_ticks_per_sec()),
        _ => None,
    };
    let held = match a.server_pid {
        Some(pid) if a.hold > 0.0 => {
            let drained = proc_rss(pid)?;
            tokio::time::sleep(Duration::from_secs_f64(a.hold)).await;
            Some((drained, proc_rss(pid)?))
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
    let delivered = st.delivered.get();
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
    println!(
        "delivered (each once): {delivered} of {expected} expected in {span:.3}s: {rate:.0} msgs/s \
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
         server_errors={} failed_conns={conn_failures}",
        a.subscribers,
        a.topics,
        a.publishers,
        us(0.5),
        us(0.99),
        us(0.999),
        st.gaps.get(),
        st.dups.get(),
        st.reordered.get(),
        st.wrong_topic.get(),
        st.server_errors.get()
    );
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
    if st.gaps.get() > 0 {
        problems.push(format!(
            "{} seq gap(s) (messages skipped, {} beyond tracking)",
            st.gaps.get(),
            st.gaps_untracked.get()
        ));
    }
    if st.dups.get() > 0 {
        problems.push(format!("{} duplicate deliveries", st.dups.get()));
    }
    if st.reordered.get() > 0 {
        problems.push(format!("{} deliveries out of order", st.reordered.get()));
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
    if delivered < expected {
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
    println!("OK: every subscriber got every message of its topic once, in seq order");
    Ok(())
}
