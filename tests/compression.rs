//! permessage-deflate (RFC 7692) against the real binary, on both io backends.
//!
//! - Interop: real clients, Python `websockets` and Node `ws`, run as scripts
//!   (`tests/interop/client.{py,js}`) against `/ws/echo` with various offers and server configs;
//!   each checks its echoes byte for byte and which echoes came back compressed, and prints the
//!   negotiated `Sec-WebSocket-Extensions`, which the tests here assert.
//! - Hand-made compressed frames over raw TCP (flate2: raw deflate, sync flush, tail stripped):
//!   compression bombs, corrupt data, RSV1 without negotiation, invalid UTF-8 after inflating,
//!   fragmented and empty compressed messages, context takeover, window bits, thresholds.
//!
//! The interop tests need `python3` with `websockets` and `node` with `ws`; when one is missing
//! they fail and say how to install it (see `interop_setup_help`).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::*;
use flate2::{Compress, Compression, FlushCompress};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

both_backends!(
    interop_default_offer,
    interop_server_no_context_takeover,
    interop_client_no_context_takeover,
    interop_window_bits,
    interop_server_window_cap,
    interop_broadcast_friendly,
    interop_takeover_both_directions,
    interop_takeover_window_bits,
    interop_compression_disabled,
    compression_bomb_closes_1009,
    inflated_size_limit_is_exact,
    corrupt_deflate_closes_1007,
    compressed_invalid_utf8_closes_1007,
    rsv1_without_negotiation_closes_1002,
    disabled_compression_sends_no_extension,
    fragmented_compressed_message,
    server_compresses_from_threshold,
    server_honours_small_window,
    client_context_takeover,
    takeover_against_the_agreement_closes_1007,
    empty_compressed_message,
    threshold_zero_compresses_everything,
    zero_length_compressed_payload,
    a_message_cut_inside_a_block_closes_1007,
);

const TAKEOVER_CONFIG: &str = "[compression]\nclient_no_context_takeover = false\n";
const BROADCAST_CONFIG: &str = "[compression]\nbroadcast_friendly = true\n";

// ---- interop: Python `websockets` and Node `ws` ----------------------------------------------

/// The versions CI installs (`.ci/run`); a developer needs the same, see [`interop_setup_help`].
const PYTHON_WEBSOCKETS: &str = "websockets==17.4";
const NODE_WS: &str = "ws@8";

fn interop_setup_help() -> String {
    format!(
        "The permessage-deflate interop tests run real clients and need:\n\
         \x20 - python3 with the `websockets` package:  python3 -m pip install '{PYTHON_WEBSOCKETS}'\n\
         \x20 - node (Node.js 18+; Debian: apt-get install nodejs npm) with the `ws` module, \
         installed from the repository root:\n\
         \x20     npm install --no-audit --no-fund --prefix target/node {NODE_WS}\n\
         \x20   (tests/interop/node_modules works too; `cargo clean` removes target/node).\n\
         .ci/run installs both. Override the interpreters with RINGGATE_PYTHON / RINGGATE_NODE."
    )
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Client {
    Python,
    Node,
}

const CLIENTS: [Client; 2] = [Client::Python, Client::Node];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The cargo target directory (CARGO_TARGET_TMPDIR is `<target>/tmp`).
fn target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .map_or_else(|| repo().join("target"), Path::to_path_buf)
}

/// Where the tests install the Python client library when the system has none.
fn python_deps() -> PathBuf {
    target_dir().join("pydeps")
}

/// Where `ws` may be installed: tests/interop/node_modules (found by Node from the script's
/// directory anyway), `target/node` (where .ci/run puts it) and any NODE_PATH already set.
fn node_path() -> std::ffi::OsString {
    let mut dirs = vec![
        repo().join("tests/interop/node_modules"),
        repo().join("target/node/node_modules"),
    ];
    // CARGO_TARGET_TMPDIR is <target dir>/tmp, which differs from target/ under CARGO_TARGET_DIR.
    if let Some(target) = Path::new(env!("CARGO_TARGET_TMPDIR")).parent() {
        dirs.push(target.join("node/node_modules"));
    }
    if let Some(existing) = std::env::var_os("NODE_PATH") {
        dirs.extend(std::env::split_paths(&existing));
    }
    std::env::join_paths(dirs).expect("NODE_PATH")
}

impl Client {
    fn command(self) -> Command {
        let (var, default) = match self {
            Client::Python => ("RINGGATE_PYTHON", "python3"),
            Client::Node => ("RINGGATE_NODE", "node"),
        };
        let mut cmd = Command::new(std::env::var_os(var).unwrap_or_else(|| default.into()));
        match self {
            Client::Node => cmd.env("NODE_PATH", node_path()),
            Client::Python => {
                let mut path = vec![python_deps()];
                if let Some(existing) = std::env::var_os("PYTHONPATH") {
                    path.extend(std::env::split_paths(&existing));
                }
                cmd.env(
                    "PYTHONPATH",
                    std::env::join_paths(path).expect("PYTHONPATH"),
                )
            }
        };
        cmd.env("PYTHONDONTWRITEBYTECODE", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    fn script(self) -> PathBuf {
        repo().join(match self {
            Client::Python => "tests/interop/client.py",
            Client::Node => "tests/interop/client.js",
        })
    }

    /// Checks once per test binary that the interpreter and the library are there; panics with
    /// install instructions otherwise (a missing client is a failure, never a skip).
    fn require(self) {
        static PYTHON: OnceLock<Result<String, String>> = OnceLock::new();
        static NODE: OnceLock<Result<String, String>> = OnceLock::new();
        let (cell, probe, what) = match self {
            Client::Python => (
                &PYTHON,
                "import websockets, websockets.sync.client; print(websockets.__version__)",
                "python3 with the `websockets` package",
            ),
            Client::Node => (
                &NODE,
                "console.log(require('ws/package.json').version)",
                "node with the `ws` module",
            ),
        };
        let found = cell.get_or_init(|| {
            // Missing library: install it under the target directory once (needs pip or npm
            // and the package registry), so `cargo test` works on a machine set up for nothing
            // else; a missing interpreter still fails with the instructions below.
            let probe_ok = |c: Client| {
                let mut cmd = c.command();
                match c {
                    Client::Python => cmd.args(["-c", probe]),
                    Client::Node => cmd.args(["-e", probe]),
                };
                cmd.output().is_ok_and(|o| o.status.success())
            };
            if !probe_ok(self) {
                self.install();
            }
            let mut cmd = self.command();
            match self {
                Client::Python => cmd.args(["-c", probe]),
                Client::Node => cmd.args(["-e", probe]),
            };
            match cmd.output() {
                Ok(out) if out.status.success() => {
                    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
                }
                Ok(out) => {
                    // The error line, not the whole traceback or stack.
                    let stderr = String::from_utf8_lossy(&out.stderr);
                    let why = stderr
                        .lines()
                        .find(|l| l.contains("Error"))
                        .unwrap_or_else(|| stderr.trim());
                    Err(format!("{what} is not available: {}", why.trim()))
                }
                Err(e) => Err(format!("{what}: cannot run {:?}: {e}", cmd.get_program())),
            }
        });
        if let Err(e) = found {
            panic!("{e}\n\n{}", interop_setup_help());
        }
    }

    /// Installs the client library into the target directory; failures show in the probe
    /// that follows.
    fn install(self) {
        let mut cmd = match self {
            Client::Python => {
                let mut c = Command::new(
                    std::env::var_os("RINGGATE_PYTHON").unwrap_or_else(|| "python3".into()),
                );
                c.args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                ])
                .arg("--target")
                .arg(python_deps())
                .arg(PYTHON_WEBSOCKETS);
                c
            }
            Client::Node => {
                let mut c = Command::new("npm");
                c.args(["install", "--no-audit", "--no-fund", "--silent", "--prefix"])
                    .arg(target_dir().join("node"))
                    .arg(NODE_WS);
                c
            }
        };
        let _ = cmd.stdin(Stdio::null()).stdout(Stdio::null()).status();
    }
}

/// What a client script printed.
#[derive(Debug)]
struct Report {
    client: Client,
    args: Vec<String>,
    extensions: Option<String>,
    result: Option<String>,
    output: Output,
}

impl Report {
    fn describe(&self) -> String {
        format!(
            "{:?} client {:?} ({}):\n--- stdout\n{}--- stderr\n{}",
            self.client,
            self.args,
            self.output.status,
            String::from_utf8_lossy(&self.output.stdout),
            String::from_utf8_lossy(&self.output.stderr)
        )
    }
}

/// Runs one client script against `url` to completion (killed after 50 s, inside the test's
/// own limit, so its output still shows), without blocking the async runtime, so several can
/// run at once.
async fn run_client(client: Client, url: &str, args: &[&str]) -> Report {
    client.require();
    let mut cmd = client.command();
    cmd.arg(client.script()).arg(url).args(args);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}\n\n{}", interop_setup_help()));
    // Output is a few lines, far below a pipe's capacity: read it once the script has exited.
    let deadline = Instant::now() + Duration::from_secs(50);
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let output = child.wait_with_output().expect("collect client output");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let line = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .map(|v| v.trim().to_string())
    };
    Report {
        client,
        args: args.iter().map(|a| a.to_string()).collect(),
        extensions: line("extensions="),
        result: line("result="),
        output,
    }
}

/// Runs every (client, offer) pair at once against `server` and asserts that each one passed
/// its echo checks and negotiated `want` (the exact `Sec-WebSocket-Extensions` of the 101).
async fn interop(server: &Server, cases: &[(&[&str], &str)]) {
    for client in CLIENTS {
        client.require();
    }
    let url = server.url("/ws/echo");
    let runs = cases
        .iter()
        .flat_map(|(args, _)| CLIENTS.map(|c| run_client(c, &url, args)));
    let reports = futures_util::future::join_all(runs).await;
    let wants = cases.iter().flat_map(|(_, want)| [want; CLIENTS.len()]);
    for (report, want) in reports.iter().zip(wants) {
        if report.output.status.code() == Some(3) {
            panic!("{}\n{}", report.describe(), interop_setup_help());
        }
        assert!(
            report.output.status.success()
                && report
                    .result
                    .as_deref()
                    .is_some_and(|r| r.starts_with("ok")),
            "{}\nserver log:\n{}",
            report.describe(),
            server.log()
        );
        assert_eq!(
            report.extensions.as_deref(),
            Some(*want),
            "negotiated extension; {}",
            report.describe()
        );
    }
}

/// What browsers and both libraries offer by default (`permessage-deflate;
/// client_max_window_bits`): the default config asks the client not to keep its context.
async fn interop_default_offer(backend: Backend) {
    let server = Server::start(backend, &[]);
    interop(
        &server,
        &[(&[], "permessage-deflate; client_no_context_takeover")],
    )
    .await;
}

async fn interop_server_no_context_takeover(backend: Backend) {
    let server = Server::start(backend, &[]);
    interop(
        &server,
        &[(
            &["--server-no-context-takeover"],
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
        )],
    )
    .await;
}

/// With a server that lets clients keep their context (`client_no_context_takeover = false`),
/// a client that asks for `client_no_context_takeover` itself gets it.
async fn interop_client_no_context_takeover(backend: Backend) {
    let server = Server::start_with_config(backend, TAKEOVER_CONFIG, &[]);
    interop(
        &server,
        &[(
            &["--client-no-context-takeover"],
            "permessage-deflate; client_no_context_takeover",
        )],
    )
    .await;
}

/// Windows below 15 bits: the server compresses within 2^10 bytes, the client within 2^9. The
/// clients' zlib keeps only 2^10 bytes of earlier messages, so a server reference further back
/// across messages breaks them (within a message zlib does not check: see
/// `server_honours_small_window` for the strict check).
async fn interop_window_bits(backend: Backend) {
    let server = Server::start(backend, &[]);
    interop(
        &server,
        &[(
            &[
                "--server-max-window-bits",
                "10",
                "--client-max-window-bits",
                "9",
            ],
            "permessage-deflate; client_no_context_takeover; server_max_window_bits=10; \
             client_max_window_bits=9",
        )],
    )
    .await;
}

/// `broadcast_friendly = true`: the server always answers `server_no_context_takeover` and
/// compresses with per-shard contexts (one per window size), here used by connections with two
/// window sizes at once.
async fn interop_broadcast_friendly(backend: Backend) {
    let server = Server::start_with_config(backend, BROADCAST_CONFIG, &[]);
    interop(
        &server,
        &[
            (
                &[],
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover",
            ),
            (
                &["--server-max-window-bits", "12"],
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
                 server_max_window_bits=12",
            ),
        ],
    )
    .await;
}

/// `[compression] server_max_window_bits = 11` with the default offer: the server announces
/// its smaller window unasked (RFC 7692 §7.1.2.1 allows it), and the clients accept it.
async fn interop_server_window_cap(backend: Backend) {
    let config = "[compression]\nserver_max_window_bits = 11\n";
    let server = Server::start_with_config(backend, config, &[]);
    interop(
        &server,
        &[(
            &[],
            "permessage-deflate; client_no_context_takeover; server_max_window_bits=11",
        )],
    )
    .await;
}

/// `client_no_context_takeover = false`: context takeover in both directions.
async fn interop_takeover_both_directions(backend: Backend) {
    let server = Server::start_with_config(backend, TAKEOVER_CONFIG, &[]);
    interop(&server, &[(&[], "permessage-deflate")]).await;
}

/// Context takeover in both directions with small windows: the clients' inflaters keep only
/// 2^10 bytes of earlier messages, so a server reference further back would break them.
async fn interop_takeover_window_bits(backend: Backend) {
    let server = Server::start_with_config(backend, TAKEOVER_CONFIG, &[]);
    interop(
        &server,
        &[(
            &[
                "--server-max-window-bits",
                "10",
                "--client-max-window-bits",
                "9",
            ],
            "permessage-deflate; server_max_window_bits=10; client_max_window_bits=9",
        )],
    )
    .await;
}

/// `[compression] enabled = false`: the offer is declined (no header) and both clients work
/// uncompressed.
async fn interop_compression_disabled(backend: Backend) {
    let server = Server::start_with_config(backend, "[compression]\nenabled = false\n", &[]);
    interop(&server, &[(&[], "")]).await;
}

// ---- raw deflate helpers ---------------------------------------------------------------------

const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];
const RSV1: u8 = 0x40;
const FIN: u8 = 0x80;

/// A client compressor; `takeover` keeps the window from message to message.
struct ClientDeflate {
    z: Compress,
    takeover: bool,
}

impl ClientDeflate {
    fn new(takeover: bool) -> ClientDeflate {
        ClientDeflate {
            z: Compress::new(Compression::new(6), false),
            takeover,
        }
    }

    /// One message body: raw deflate, sync flush, `00 00 ff ff` stripped (RFC 7692 §7.2.1).
    fn message(&mut self, input: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(input.len() / 4 + 64);
        let base = self.z.total_in();
        // All the input, then the flush (zlib ignores a sync flush right after another one
        // when no input came in between, which an empty message would be).
        loop {
            let done = (self.z.total_in() - base) as usize;
            out.reserve(64 * 1024);
            self.z
                .compress_vec(&input[done..], &mut out, FlushCompress::None)
                .expect("deflate");
            if (self.z.total_in() - base) as usize == input.len() {
                break;
            }
        }
        loop {
            out.reserve(64 * 1024);
            self.z
                .compress_vec(&[], &mut out, FlushCompress::Sync)
                .expect("deflate");
            if out.len() < out.capacity() {
                break;
            }
        }
        assert!(out.ends_with(&TAIL), "sync flush ends in 00 00 ff ff");
        out.truncate(out.len() - TAIL.len());
        if !self.takeover {
            self.z.reset();
        }
        out
    }
}

/// Compresses one message on its own.
fn deflate(input: &[u8]) -> Vec<u8> {
    ClientDeflate::new(false).message(input)
}

// ---- an independent inflater that checks the window ------------------------------------------

/// The server's side of a connection as a client decodes it: an inflater (after zlib's
/// `puff.c`, independent of the zlib-rs the server uses) that also checks every back-reference
/// against the window the server agreed to (RFC 7692 §7.1.2.1). zlib-rs could not check that:
/// its inflater keeps a 32 KiB window whatever window bits it is given.
struct ServerStream {
    /// Everything inflated so far (with context takeover) or this message (without).
    history: Vec<u8>,
    window: usize,
    takeover: bool,
}

impl ServerStream {
    fn new(window_bits: u8, takeover: bool) -> ServerStream {
        ServerStream {
            history: Vec::new(),
            window: 1 << window_bits,
            takeover,
        }
    }

    /// Inflates one message body (the `00 00 ff ff` tail appended, RFC 7692 §7.2.2).
    fn inflate(&mut self, body: &[u8]) -> Result<Vec<u8>, String> {
        if !self.takeover {
            self.history.clear();
        }
        let start = self.history.len();
        let mut input = body.to_vec();
        input.extend_from_slice(&TAIL);
        let mut bits = Bits {
            data: &input,
            pos: 0,
            buf: 0,
            count: 0,
        };
        // Blocks until the input ends (a sync-flushed message ends on an empty stored block,
        // byte-aligned) or a final block.
        while bits.pos < input.len() {
            let last = bits.get(1)? == 1;
            match bits.get(2)? {
                0 => self.stored(&mut bits)?,
                1 => {
                    let (lit, dist) = fixed_codes();
                    self.codes(&mut bits, &lit, &dist)?
                }
                2 => {
                    let (lit, dist) = dynamic_codes(&mut bits)?;
                    self.codes(&mut bits, &lit, &dist)?
                }
                _ => return Err("reserved block type".into()),
            }
            if last {
                break;
            }
        }
        Ok(self.history[start..].to_vec())
    }

    fn stored(&mut self, bits: &mut Bits) -> Result<(), String> {
        bits.buf = 0;
        bits.count = 0;
        let head = bits
            .data
            .get(bits.pos..bits.pos + 4)
            .ok_or("stored block header past the end")?;
        let len = u16::from_le_bytes([head[0], head[1]]);
        if len != !u16::from_le_bytes([head[2], head[3]]) {
            return Err("stored block length does not match its complement".into());
        }
        bits.pos += 4;
        let data = bits
            .data
            .get(bits.pos..bits.pos + len as usize)
            .ok_or("stored block past the end")?;
        self.history.extend_from_slice(data);
        bits.pos += len as usize;
        Ok(())
    }

    fn codes(&mut self, bits: &mut Bits, lit: &Huffman, dist: &Huffman) -> Result<(), String> {
        const LBASE: [u16; 29] = [
            3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99,
            115, 131, 163, 195, 227, 258,
        ];
        const LEXT: [u8; 29] = [
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
        ];
        const DBASE: [u16; 30] = [
            1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025,
            1537, 2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
        ];
        const DEXT: [u8; 30] = [
            0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12,
            12, 13, 13,
        ];
        loop {
            let sym = lit.decode(bits)? as usize;
            if sym < 256 {
                self.history.push(sym as u8);
                continue;
            }
            if sym == 256 {
                return Ok(());
            }
            let i = sym - 257;
            if i >= 29 {
                return Err(format!("invalid length symbol {sym}"));
            }
            let len = LBASE[i] as usize + bits.get(LEXT[i] as u32)? as usize;
            let d = dist.decode(bits)? as usize;
            if d >= 30 {
                return Err(format!("invalid distance symbol {d}"));
            }
            let distance = DBASE[d] as usize + bits.get(DEXT[d] as u32)? as usize;
            if distance > self.window {
                return Err(format!(
                    "back-reference {distance} bytes away, beyond the agreed {}-byte window",
                    self.window
                ));
            }
            if distance > self.history.len() {
                return Err(format!("back-reference {distance} before the start"));
            }
            for _ in 0..len {
                let b = self.history[self.history.len() - distance];
                self.history.push(b);
            }
        }
    }
}

/// LSB-first bit reader.
struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    buf: u32,
    count: u32,
}

impl Bits<'_> {
    fn get(&mut self, need: u32) -> Result<u32, String> {
        while self.count < need {
            let b = *self
                .data
                .get(self.pos)
                .ok_or("compressed data ends early")?;
            self.pos += 1;
            self.buf |= u32::from(b) << self.count;
            self.count += 8;
        }
        let v = self.buf & ((1u32 << need) - 1);
        self.buf >>= need;
        self.count -= need;
        Ok(v)
    }
}

/// A canonical Huffman code: how many codes of each length, symbols in code order.
struct Huffman {
    count: [u16; 16],
    symbol: Vec<u16>,
}

impl Huffman {
    fn new(lengths: &[u8]) -> Huffman {
        let mut count = [0u16; 16];
        for &l in lengths {
            count[l as usize] += 1;
        }
        let mut offs = [0u16; 16];
        for len in 1..15 {
            offs[len + 1] = offs[len] + count[len];
        }
        let mut symbol = vec![0; lengths.len()];
        for (s, &l) in lengths.iter().enumerate() {
            if l != 0 {
                symbol[offs[l as usize] as usize] = s as u16;
                offs[l as usize] += 1;
            }
        }
        count[0] = 0;
        Huffman { count, symbol }
    }

    fn decode(&self, bits: &mut Bits) -> Result<u16, String> {
        let (mut code, mut first, mut index) = (0i32, 0i32, 0i32);
        for len in 1..16 {
            code |= bits.get(1)? as i32;
            let count = i32::from(self.count[len]);
            if code - count < first {
                return Ok(self.symbol[(index + (code - first)) as usize]);
            }
            index += count;
            first = (first + count) << 1;
            code <<= 1;
        }
        Err("invalid Huffman code".into())
    }
}

fn fixed_codes() -> (Huffman, Huffman) {
    let mut lit = [8u8; 288];
    lit[144..256].fill(9);
    lit[256..280].fill(7);
    (Huffman::new(&lit), Huffman::new(&[5; 30]))
}

fn dynamic_codes(bits: &mut Bits) -> Result<(Huffman, Huffman), String> {
    const ORDER: [usize; 19] = [
        16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
    ];
    let nlen = bits.get(5)? as usize + 257;
    let ndist = bits.get(5)? as usize + 1;
    let ncode = bits.get(4)? as usize + 4;
    let mut lengths = [0u8; 320];
    for &i in &ORDER[..ncode] {
        lengths[i] = bits.get(3)? as u8;
    }
    let lencode = Huffman::new(&lengths[..19]);
    let mut i = 0;
    while i < nlen + ndist {
        let sym = lencode.decode(bits)?;
        let (value, repeat) = match sym {
            0..=15 => (sym as u8, 1),
            16 if i > 0 => (lengths[i - 1], 3 + bits.get(2)? as usize),
            17 => (0, 3 + bits.get(3)? as usize),
            18 => (0, 11 + bits.get(7)? as usize),
            _ => return Err("invalid code-length code".into()),
        };
        if i + repeat > nlen + ndist {
            return Err("too many code lengths".into());
        }
        lengths[i..i + repeat].fill(value);
        i += repeat;
    }
    Ok((
        Huffman::new(&lengths[..nlen]),
        Huffman::new(&lengths[nlen..nlen + ndist]),
    ))
}

/// The test's own inflater agrees with zlib(-rs) on stored, fixed and dynamic blocks, with and
/// without takeover.
#[test]
fn independent_inflater_matches_zlib() {
    let inputs = [
        Vec::new(),
        b"a".to_vec(),
        json_text(300, 1),
        json_text(70_000, 2),
        pseudo_random(5000, 3),
        pseudo_random(2048, 4).repeat(8),
    ];
    for takeover in [false, true] {
        let mut z = ClientDeflate::new(takeover);
        let mut ours = ServerStream::new(15, takeover);
        for input in inputs.iter().chain(&inputs) {
            let body = z.message(input);
            assert!(
                ours.inflate(&body).unwrap() == *input,
                "{} bytes",
                input.len()
            );
        }
    }
}

// ---- raw deflate helpers (continued) ---------------------------------------------------------

/// A message body that inflates to `size` zero bytes (a multiple of 1 MiB), about 1000 times
/// smaller. Built from one compressed MiB repeated: a sync flush ends on a byte boundary with
/// non-final blocks only, so copies of it concatenate into a valid stream (and compressing the
/// whole size would take seconds in a debug build).
fn bomb(size: usize) -> Vec<u8> {
    assert_eq!(size % (1 << 20), 0);
    let mut one = deflate(&vec![0u8; 1 << 20]);
    one.extend_from_slice(&TAIL);
    let mut body = one.repeat(size >> 20);
    body.truncate(body.len() - TAIL.len());
    body
}

/// A compressible JSON-ish text of exactly `len` bytes.
fn json_text(len: usize, seed: usize) -> Vec<u8> {
    let mut s = String::new();
    let mut i = seed;
    while s.len() < len {
        s.push_str(&format!(
            r#"{{"type":"stats","seq":{i},"cpu":{},"host":"edge-{}"}},"#,
            i * 37 % 100,
            i % 7
        ));
        i += 1;
    }
    s.truncate(len);
    s.into_bytes()
}

/// Peak resident set of a process, in bytes.
fn vm_hwm(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/PID/status");
    kb * 1024
}

// ---- a raw client that sees RSV1 -------------------------------------------------------------

/// A message the server sent, inflated if it was compressed.
#[derive(Debug)]
struct Msg {
    opcode: u8,
    compressed: bool,
    data: Vec<u8>,
}

/// A WebSocket client over plain TCP that offers permessage-deflate (or not) and sends
/// hand-made frames.
struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// The 101's `Sec-WebSocket-Extensions`.
    extensions: Option<String>,
    /// The server's compressed messages, decoded with the window it agreed to.
    inflater: ServerStream,
}

impl Conn {
    /// Connects to `/ws/echo`, offering `offer` as `Sec-WebSocket-Extensions` if given.
    async fn open(server: &Server, offer: Option<&str>) -> Conn {
        let extra = offer
            .map(|o| format!("Sec-WebSocket-Extensions: {o}\r\n"))
            .unwrap_or_default();
        let (ws, head) = RawWs::upgrade(server.tcp().await, "/ws/echo", &extra).await;
        let extensions = head.header("sec-websocket-extensions").map(str::to_string);
        let ext = extensions.as_deref().unwrap_or_default();
        let server_takeover = !ext.contains("server_no_context_takeover");
        let window_bits = ext
            .split(';')
            .find_map(|p| p.trim().strip_prefix("server_max_window_bits="))
            .map_or(15, |v| v.parse().expect("server_max_window_bits"));
        Conn {
            stream: ws.stream,
            buf: ws.buf,
            extensions,
            inflater: ServerStream::new(window_bits, server_takeover),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        within("write", self.stream.write_all(bytes))
            .await
            .expect("write");
    }

    /// Sends one masked frame with `first_byte` (FIN/RSV/opcode) as given.
    async fn send_frame(&mut self, first_byte: u8, payload: &[u8]) {
        self.send(&encode_frame(
            first_byte,
            Some([0x12, 0x34, 0x56, 0x78]),
            payload,
        ))
        .await;
    }

    /// Sends `data` as one compressed message (RSV1, FIN).
    async fn send_compressed(&mut self, opcode: u8, body: &[u8]) {
        self.send_frame(FIN | RSV1 | opcode, body).await;
    }

    /// Reads one frame; `None` at EOF (or reset).
    async fn read_frame(&mut self) -> Option<Frame> {
        within("a frame", async {
            loop {
                if let Some((f, used)) = parse_server_frame(&self.buf) {
                    self.buf.drain(..used);
                    return Some(f);
                }
                let mut chunk = vec![0u8; 64 * 1024];
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => {
                        assert!(self.buf.is_empty(), "stream ended inside a frame");
                        return None;
                    }
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
    }

    /// The next data message (pings and pongs skipped), inflated when compressed.
    async fn read_message(&mut self) -> Msg {
        loop {
            let f = self.read_frame().await.expect("connection ended");
            match f.opcode {
                OP_PING | OP_PONG => continue,
                OP_TEXT | OP_BINARY => {}
                OP_CLOSE => panic!(
                    "expected a data message, got close {:?} {:?}",
                    f.payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]])),
                    String::from_utf8_lossy(f.payload.get(2..).unwrap_or_default())
                ),
                _ => panic!("expected a data message, got {f:?}"),
            }
            assert!(f.fin, "the server sends whole messages");
            let data = if f.rsv1 {
                self.inflater
                    .inflate(&f.payload)
                    .unwrap_or_else(|e| panic!("the server's compressed message: {e}"))
            } else {
                f.payload
            };
            return Msg {
                opcode: f.opcode,
                compressed: f.rsv1,
                data,
            };
        }
    }

    /// Sends `data` compressed by `deflater` and expects it back; returns whether the echo
    /// came compressed.
    async fn echo_with(&mut self, deflater: &mut ClientDeflate, opcode: u8, data: &[u8]) -> bool {
        let body = deflater.message(data);
        self.send_compressed(opcode, &body).await;
        let m = self.read_message().await;
        assert_eq!(m.opcode, opcode);
        assert!(
            m.data == data,
            "echo differs: sent {} bytes, got {}",
            data.len(),
            m.data.len()
        );
        m.compressed
    }

    /// [`Conn::echo_with`] with a fresh context per message.
    async fn echo(&mut self, opcode: u8, data: &[u8]) -> bool {
        self.echo_with(&mut ClientDeflate::new(false), opcode, data)
            .await
    }

    /// Sends `data` uncompressed and expects it back; returns whether the echo came compressed.
    async fn echo_plain(&mut self, opcode: u8, data: &[u8]) -> bool {
        self.send_frame(FIN | opcode, data).await;
        let m = self.read_message().await;
        assert_eq!(m.opcode, opcode);
        assert!(m.data == data, "echo differs");
        m.compressed
    }

    /// Expects close frame `code`, then the end of the connection.
    async fn expect_closed_with(&mut self, code: u16) {
        loop {
            let f = self.read_frame().await;
            match f {
                Some(f) if f.opcode == OP_CLOSE => {
                    assert!(f.payload.len() >= 2, "close frame without a code");
                    let got = u16::from_be_bytes([f.payload[0], f.payload[1]]);
                    assert_eq!(
                        got,
                        code,
                        "close code (reason {:?})",
                        String::from_utf8_lossy(&f.payload[2..])
                    );
                    break;
                }
                Some(f) if matches!(f.opcode, OP_PING | OP_PONG) => {}
                other => panic!("expected close {code}, got {other:?}"),
            }
        }
        assert!(
            closed_within(&mut self.stream, PATIENCE).await,
            "connection still open after close {code}"
        );
    }
}

const OFFER: &str = "permessage-deflate; client_max_window_bits";

// ---- hand-made frames ------------------------------------------------------------------------

/// A message that inflates to far more than `max_message_size` closes 1009, without the server
/// ever holding the inflated size; other clients (plain and compressed, probably one on the
/// same shard and so sharing its inflater) keep working.
async fn compression_bomb_closes_1009(backend: Backend) {
    const LIMIT: usize = 100_000;
    const BOMB: usize = 64 << 20;
    let server = Server::start_with_config(backend, &format!("max_message_size = {LIMIT}\n"), &[]);
    let mut plain = server.ws().await;
    echo(&mut plain, Message::text("before")).await;
    let mut others = Vec::new();
    for i in 0..4 {
        let mut c = Conn::open(&server, Some(OFFER)).await;
        assert!(c.echo(OP_TEXT, &json_text(2000, i)).await);
        others.push(c);
    }

    let bomb = bomb(BOMB);
    assert!(
        bomb.len() < LIMIT,
        "the bomb itself must pass the frame-size check"
    );
    let hwm_before = vm_hwm(server.pid());
    let mut attacker = Conn::open(&server, Some(OFFER)).await;
    attacker.send_compressed(OP_BINARY, &bomb).await;
    attacker.expect_closed_with(1009).await;
    let grown = vm_hwm(server.pid()).saturating_sub(hwm_before);
    assert!(
        grown < (BOMB / 4) as u64,
        "the server's peak RSS grew by {grown} bytes inflating a {BOMB}-byte bomb"
    );

    for (i, c) in others.iter_mut().enumerate() {
        assert!(c.echo(OP_TEXT, &json_text(3000, i + 10)).await);
    }
    echo(&mut plain, Message::text("after")).await;
    let mut fresh = Conn::open(&server, Some(OFFER)).await;
    assert!(fresh.echo(OP_BINARY, &json_text(5000, 99)).await);
}

/// The limit applies to the inflated size, exactly: `max_message_size` bytes pass, one more
/// closes 1009.
async fn inflated_size_limit_is_exact(backend: Backend) {
    const LIMIT: usize = 100_000;
    let server = Server::start_with_config(backend, &format!("max_message_size = {LIMIT}\n"), &[]);
    let mut c = Conn::open(&server, Some(OFFER)).await;
    assert!(c.echo(OP_TEXT, &json_text(LIMIT, 1)).await);
    c.send_compressed(OP_TEXT, &deflate(&json_text(LIMIT + 1, 1)))
        .await;
    c.expect_closed_with(1009).await;
}

/// Data that is not deflate closes 1007 (text and binary alike); the connection's shard still
/// inflates for everyone else.
async fn corrupt_deflate_closes_1007(backend: Backend) {
    let server = Server::start(backend, &[]);
    let mut good = Vec::new();
    for i in 0..4 {
        good.push(Conn::open(&server, Some(OFFER)).await);
        assert!(good[i].echo(OP_TEXT, &json_text(1000, i)).await);
    }
    let cases: [(u8, &[u8]); 3] = [
        // BFINAL=1, BTYPE=11: a reserved block type.
        (OP_TEXT, &[0x07, 0x00]),
        // A stored block whose LEN and NLEN disagree.
        (
            OP_BINARY,
            &[0x00, 0x05, 0x00, 0x00, 0x00, b'h', b'e', b'l', b'l', b'o'],
        ),
        // A valid message with its middle overwritten.
        (OP_BINARY, &{
            let mut d = deflate(&json_text(4000, 3));
            let mid = d.len() / 2;
            d[mid..mid + 16].fill(0xff);
            d
        }),
    ];
    for (opcode, body) in cases {
        let mut c = Conn::open(&server, Some(OFFER)).await;
        c.send_compressed(opcode, body).await;
        c.expect_closed_with(1007).await;
    }
    for (i, c) in good.iter_mut().enumerate() {
        assert!(c.echo(OP_BINARY, &json_text(1500, i + 7)).await);
    }
}

/// Text must be UTF-8 once inflated (1007); the same bytes as binary are fine.
async fn compressed_invalid_utf8_closes_1007(backend: Backend) {
    let server = Server::start(backend, &[]);
    let mut bad = b"{\"text\":\"".to_vec();
    bad.extend_from_slice(&[0xC3, 0x28, 0xFF, 0xFE]);
    bad.extend_from_slice(&json_text(600, 0));

    let mut c = Conn::open(&server, Some(OFFER)).await;
    // Valid multi-byte UTF-8 passes...
    assert!(
        c.echo(OP_TEXT, "héllo wörld €𝄞 ".repeat(40).as_bytes())
            .await
    );
    // ...invalid bytes as binary too...
    assert!(c.echo(OP_BINARY, &bad).await);
    // ...but not as text.
    c.send_compressed(OP_TEXT, &deflate(&bad)).await;
    c.expect_closed_with(1007).await;

    // A truncated code point at the very end of the message is invalid too.
    let mut c = Conn::open(&server, Some(OFFER)).await;
    let mut cut = "€".repeat(200).into_bytes();
    cut.pop();
    c.send_compressed(OP_TEXT, &deflate(&cut)).await;
    c.expect_closed_with(1007).await;
}

/// RSV1 means nothing on a connection that did not negotiate permessage-deflate: 1002.
async fn rsv1_without_negotiation_closes_1002(backend: Backend) {
    let server = Server::start(backend, &[]);
    let mut c = Conn::open(&server, None).await;
    assert_eq!(c.extensions, None, "no offer, no extension");
    assert!(!c.echo_plain(OP_TEXT, &json_text(2000, 0)).await);
    c.send_compressed(OP_TEXT, &deflate(b"hello hello hello"))
        .await;
    c.expect_closed_with(1002).await;

    // An offer the server must decline (unknown parameter) leaves RSV1 reserved as well.
    let mut c = Conn::open(&server, Some("permessage-deflate; bogus_param")).await;
    assert_eq!(c.extensions, None);
    c.send_compressed(OP_BINARY, &deflate(b"hello hello hello"))
        .await;
    c.expect_closed_with(1002).await;
}

/// `[compression] enabled = false`: an offer gets no `Sec-WebSocket-Extensions`, echoes are
/// plain, and RSV1 is a protocol error.
async fn disabled_compression_sends_no_extension(backend: Backend) {
    let server = Server::start_with_config(backend, "[compression]\nenabled = false\n", &[]);
    let mut c = Conn::open(
        &server,
        Some("permessage-deflate; client_max_window_bits, permessage-deflate"),
    )
    .await;
    assert_eq!(c.extensions, None);
    assert!(!c.echo_plain(OP_TEXT, &json_text(5000, 0)).await);
    c.send_compressed(OP_TEXT, &deflate(&json_text(500, 0)))
        .await;
    c.expect_closed_with(1002).await;
}

/// One compressed message in three frames (RSV1 on the first only), a ping between them;
/// RSV1 on a continuation frame is a protocol error.
async fn fragmented_compressed_message(backend: Backend) {
    let server = Server::start(backend, &[]);
    let mut c = Conn::open(&server, Some(OFFER)).await;
    let text = json_text(6000, 5);
    let body = deflate(&text);
    let (a, rest) = body.split_at(body.len() / 3);
    let (b, z) = rest.split_at(rest.len() / 2);
    c.send_frame(RSV1 | OP_TEXT, a).await;
    c.send_frame(FIN | OP_PING, b"between").await;
    c.send_frame(OP_CONT, b).await;
    c.send_frame(FIN | OP_CONT, z).await;
    let pong = c.read_frame().await.expect("pong");
    assert_eq!(
        (pong.opcode, pong.payload.as_slice()),
        (OP_PONG, &b"between"[..])
    );
    let m = c.read_message().await;
    assert_eq!(m.opcode, OP_TEXT);
    assert!(m.data == text, "reassembled message differs");

    let (a, z) = body.split_at(body.len() / 2);
    c.send_frame(RSV1 | OP_TEXT, a).await;
    c.send_frame(FIN | RSV1 | OP_CONT, z).await;
    c.expect_closed_with(1002).await;
}

/// The server compresses messages from `threshold` (256) bytes up, not below.
async fn server_compresses_from_threshold(backend: Backend) {
    let server = Server::start(backend, &[]);
    let mut c = Conn::open(&server, Some(OFFER)).await;
    assert_eq!(
        c.extensions.as_deref(),
        Some("permessage-deflate; client_no_context_takeover")
    );
    assert!(
        !c.echo(OP_TEXT, &json_text(255, 0)).await,
        "255 bytes: plain"
    );
    assert!(
        c.echo(OP_TEXT, &json_text(256, 0)).await,
        "256 bytes: compressed"
    );
    assert!(!c.echo_plain(OP_BINARY, &[7; 10]).await, "10 bytes: plain");
    assert!(
        c.echo_plain(OP_BINARY, &[7; 10_000]).await,
        "10 kB: compressed"
    );
}

/// `server_max_window_bits=9`: every back-reference in the compressed replies, with and
/// without context takeover, stays within 512 bytes (checked by [`ServerStream`]), although
/// the messages repeat 2 KiB apart, which a compressor with a larger window would use.
async fn server_honours_small_window(backend: Backend) {
    let far_repeats = pseudo_random(2048, 1).repeat(16);
    // The check has teeth: a 15-bit-window stream of the same message fails it.
    let check = ServerStream::new(9, false).inflate(&deflate(&far_repeats));
    assert!(
        check.as_ref().is_err_and(|e| e.contains("window")),
        "{check:?}"
    );
    assert!(
        ServerStream::new(15, false)
            .inflate(&deflate(&far_repeats))
            .unwrap()
            == far_repeats
    );

    for config in ["", TAKEOVER_CONFIG, BROADCAST_CONFIG] {
        let server = Server::start_with_config(backend, config, &[]);
        let offer = "permessage-deflate; server_max_window_bits=9";
        let mut c = Conn::open(&server, Some(offer)).await;
        let ext = c.extensions.clone().expect("negotiated");
        assert!(
            ext.contains("server_max_window_bits=9"),
            "{config:?}: {ext}"
        );
        for i in 0..3 {
            // Takeover or not, the echo of a compressible message is compressed.
            assert!(c.echo(OP_TEXT, &json_text(20_000, i)).await, "{config:?}");
            c.echo(OP_BINARY, &far_repeats).await;
        }
    }
}

/// `client_no_context_takeover = false`: the client compresses every message with the same
/// context (later messages refer back into earlier ones) and the server follows; the server's
/// replies use takeover too (a short repeat compresses to a few bytes).
async fn client_context_takeover(backend: Backend) {
    let server = Server::start_with_config(backend, TAKEOVER_CONFIG, &[]);
    let mut c = Conn::open(&server, Some(OFFER)).await;
    assert_eq!(c.extensions.as_deref(), Some("permessage-deflate"));
    let mut d = ClientDeflate::new(true);
    let msg = json_text(3000, 42);
    let mut replies = Vec::new();
    for n in 0..2 {
        let body = d.message(&msg);
        if n == 1 {
            assert!(
                body.len() * 10 < deflate(&msg).len(),
                "the client's repeat refers back ({} bytes)",
                body.len()
            );
        }
        c.send_compressed(OP_TEXT, &body).await;
        let f = c.read_frame().await.expect("echo");
        assert!(f.rsv1 && f.opcode == OP_TEXT, "{f:?}");
        assert!(c.inflater.inflate(&f.payload).unwrap() == msg);
        replies.push(f.payload.len());
    }
    assert!(
        replies[1] * 3 < replies[0],
        "the server's repeat refers back too: {replies:?} bytes"
    );
    // Uncompressed messages in between do not disturb either context.
    assert!(!c.echo_plain(OP_TEXT, b"small").await);
    for i in 0..20 {
        let m = json_text(500 + i * 97, i % 3);
        assert!(c.echo_with(&mut d, OP_BINARY, &m).await);
    }
}

/// Under the default config the client agreed to `client_no_context_takeover`; a client that
/// keeps its context anyway sends back-references the server cannot resolve: 1007, not garbage.
async fn takeover_against_the_agreement_closes_1007(backend: Backend) {
    let server = Server::start(backend, &[]);
    let mut c = Conn::open(&server, Some(OFFER)).await;
    assert_eq!(
        c.extensions.as_deref(),
        Some("permessage-deflate; client_no_context_takeover")
    );
    let mut d = ClientDeflate::new(true);
    let msg = json_text(3000, 1);
    assert!(c.echo_with(&mut d, OP_TEXT, &msg).await);
    let repeat = d.message(&msg);
    c.send_compressed(OP_TEXT, &repeat).await;
    c.expect_closed_with(1007).await;
}

/// An empty compressed message, the single `00` byte zlib produces (an empty stored block once
/// the tail is appended, RFC 7692 §7.2.3.6), on a connection with context takeover both ways;
/// the messages around it inflate.
async fn empty_compressed_message(backend: Backend) {
    let server = Server::start_with_config(backend, TAKEOVER_CONFIG, &[]);
    let mut c = Conn::open(&server, Some(OFFER)).await;
    let mut d = ClientDeflate::new(true);
    let msg = json_text(1000, 3);
    assert!(c.echo_with(&mut d, OP_TEXT, &msg).await);
    assert_eq!(d.message(b""), [0x00]);
    c.send_compressed(OP_TEXT, &[0x00]).await;
    let m = c.read_message().await;
    assert_eq!((m.opcode, m.data.as_slice()), (OP_TEXT, &b""[..]));
    assert!(c.echo_with(&mut d, OP_TEXT, &msg).await);
}

/// A zero-length compressed payload (RSV1, length 0) on a connection with client context
/// takeover (zlib's sync flush produces nothing when no input came since the last one). With
/// the tail appended it would be `00 00 ff ff`, the start of a stored block whose length bytes
/// are cut off: the server takes it for an empty message without feeding its inflater, so the
/// client's stream goes on in step.
async fn zero_length_compressed_payload(backend: Backend) {
    let server = Server::start_with_config(backend, TAKEOVER_CONFIG, &[]);
    let mut c = Conn::open(&server, Some(OFFER)).await;
    assert_eq!(c.extensions.as_deref(), Some("permessage-deflate"));
    let mut d = ClientDeflate::new(true);
    let msg = json_text(1000, 3);
    assert!(c.echo_with(&mut d, OP_TEXT, &msg).await);
    c.send_compressed(OP_BINARY, &[]).await;
    let f = c.read_frame().await.expect("a reply to the empty payload");
    assert_eq!((f.opcode, f.payload.as_slice()), (OP_BINARY, &b""[..]));
    assert!(c.echo_with(&mut d, OP_TEXT, &msg).await);
}

/// A compressed message cut inside a deflate block (its last block not finished when the
/// message ends) closes 1007 rather than delivering what was decoded of it: cut inside a
/// Huffman block, before the sync flush's empty stored block, and inside a stored block (the
/// tail would be copied as data); with and without context takeover.
async fn a_message_cut_inside_a_block_closes_1007(backend: Backend) {
    for config in ["", TAKEOVER_CONFIG] {
        let server = Server::start_with_config(backend, config, &[]);
        let whole = deflate(&json_text(4000, 3));
        let cases: [(&str, &[u8]); 4] = [
            ("half a Huffman block", &whole[..whole.len() / 2]),
            ("all but two bytes", &whole[..whole.len() - 2]),
            // Without the byte holding the sync flush's empty stored block header.
            ("all but the last byte", &whole[..whole.len() - 1]),
            (
                "a stored block of 5 bytes cut after 1",
                &[0x00, 0x05, 0x00, 0xfa, 0xff, b'a'],
            ),
        ];
        for (what, body) in cases {
            let mut c = Conn::open(&server, Some(OFFER)).await;
            // The same connection inflated a whole message just before.
            assert!(c.echo(OP_TEXT, &json_text(1000, 1)).await, "{what}");
            c.send_compressed(OP_TEXT, body).await;
            c.expect_closed_with(1007).await;
        }
        let mut c = Conn::open(&server, Some(OFFER)).await;
        c.send_compressed(OP_TEXT, &whole).await;
        let m = c.read_message().await;
        assert_eq!(
            (m.opcode, m.data),
            (OP_TEXT, json_text(4000, 3)),
            "{config:?}"
        );
    }
}

/// `threshold = 0`: every message is compressed, the empty one included (an empty payload
/// would not inflate: it must be at least the `00` of an empty stored block), with the server's
/// context kept across them.
async fn threshold_zero_compresses_everything(backend: Backend) {
    let server = Server::start_with_config(backend, "[compression]\nthreshold = 0\n", &[]);
    let mut c = Conn::open(&server, Some(OFFER)).await;
    assert_eq!(
        c.extensions.as_deref(),
        Some("permessage-deflate; client_no_context_takeover")
    );
    for (i, msg) in [
        json_text(500, 0),
        Vec::new(),
        b"x".to_vec(),
        Vec::new(),
        json_text(500, 0),
    ]
    .iter()
    .enumerate()
    {
        c.send_frame(FIN | OP_BINARY, msg).await;
        let f = c.read_frame().await.expect("echo");
        assert!(f.rsv1 && f.opcode == OP_BINARY, "message {i}: {f:?}");
        let got = c.inflater.inflate(&f.payload).unwrap_or_else(|e| {
            panic!(
                "message {i} ({} bytes, payload {:?}): {e}",
                msg.len(),
                f.payload
            )
        });
        assert!(got == *msg, "message {i}");
    }
}
