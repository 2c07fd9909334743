//! Integration-test harness: runs the real `ringgate` binary on 127.0.0.1 with an ephemeral port
//! and talks to it over real sockets (tokio-tungstenite, or raw TCP for hand-made frames).
//!
//! Every test body is an `async fn(Backend)`; `both_backends!` turns it into one test per I/O
//! backend, so a single `cargo nextest run` covers io_uring and epoll.

// Each test file compiles this module separately and uses a different subset of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub mod rooms;
pub mod upstreams;

/// Generous bound for anything the server should do "promptly" (a noisy 2-core CI box).
pub const PATIENCE: Duration = Duration::from_secs(10);
/// Upper bound for a whole test body; a hang fails the test instead of stalling the run.
pub const TEST_LIMIT: Duration = Duration::from_secs(60);

/// Generates `NAME::uring` and `NAME::epoll` tests from `async fn NAME(backend: Backend)`.
#[macro_export]
macro_rules! both_backends {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            use super::common::{Backend, TEST_LIMIT};
            async fn run(backend: Backend) {
                tokio::time::timeout(TEST_LIMIT, super::$name(backend))
                    .await
                    .expect("test body timed out");
            }
            #[tokio::test]
            async fn uring() {
                run(Backend::Uring).await
            }
            #[tokio::test]
            async fn epoll() {
                run(Backend::Epoll).await
            }
        }
    )*};
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Uring,
    Epoll,
}

impl Backend {
    pub fn flag(self) -> &'static str {
        match self {
            Backend::Uring => "uring",
            Backend::Epoll => "epoll",
        }
    }

    /// How the server's log names the backend.
    pub fn log_name(self) -> &'static str {
        match self {
            Backend::Uring => "io_uring",
            Backend::Epoll => "epoll",
        }
    }
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A running `ringgate`; killed on drop.
pub struct Server {
    child: Child,
    pub addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    config: Option<TempFile>,
}

impl Server {
    /// Starts the server on `backend` with `--shards 2` and the extra `args`.
    pub fn start(backend: Backend, args: &[&str]) -> Server {
        Server::launch(backend, None, 2, args)
    }

    /// Like [`Server::start`], with `config_toml` written to a file and passed as `--config`.
    pub fn start_with_config(backend: Backend, config_toml: &str, args: &[&str]) -> Server {
        Server::launch(backend, Some(TempFile::new("toml", config_toml)), 2, args)
    }

    /// Like [`Server::start_with_config`] with `shards` shards instead of 2.
    pub fn start_sharded(
        backend: Backend,
        shards: usize,
        config_toml: &str,
        args: &[&str],
    ) -> Server {
        let config = TempFile::new("toml", config_toml);
        Server::launch(backend, Some(config), shards, args)
    }

    /// Like [`Server::start_with_config`] (no file when `config_toml` is empty), with extra
    /// environment variables for the server process.
    pub fn start_with_env(
        backend: Backend,
        config_toml: &str,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Server {
        let config = (!config_toml.is_empty()).then(|| TempFile::new("toml", config_toml));
        Server::launch_env(backend, config, 2, env, args)
    }

    fn launch(backend: Backend, config: Option<TempFile>, shards: usize, args: &[&str]) -> Server {
        Server::launch_env(backend, config, shards, &[], args)
    }

    fn launch_env(
        backend: Backend,
        config: Option<TempFile>,
        shards: usize,
        env: &[(&str, &str)],
        args: &[&str],
    ) -> Server {
        let mut cmd = ringgate_command();
        cmd.envs(env.iter().copied());
        let shards = shards.to_string();
        cmd.args(["--host", "127.0.0.1", "--port", "0", "--shards", &shards])
            .args(["--io", backend.flag()]);
        if let Some(c) = &config {
            cmd.arg("--config").arg(&c.path);
        }
        let mut child = cmd
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ringgate");
        let (log, listening_rx) = drain_stderr(child.stderr.take().expect("piped stderr"));
        let listening = match listening_rx.recv_timeout(PATIENCE) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "ringgate ({backend:?}) did not report its address; log:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        let mut addr: SocketAddr = field(&listening, "addr")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| ([0, 0, 0, 0], 0).into());
        // A listener on every address is reached over loopback: test traffic stays on 127/8.
        if addr.ip().is_unspecified() {
            addr.set_ip([127, 0, 0, 1].into());
        }
        let server = Server {
            child,
            addr,
            log,
            config,
        };
        assert_ne!(server.addr.port(), 0, "no addr in {listening:?}");
        // The test must run on the backend it asked for, never on a fallback.
        let io = field(&listening, "io").unwrap_or_default();
        assert_eq!(io.trim_matches('"'), backend.log_name(), "{listening}");
        // A TLS listener is checked by the TLS tests themselves.
        if field(&listening, "tls") != Some("true") {
            server.wait_healthy();
        }
        server
    }

    fn wait_healthy(&self) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            // Once connected, wait for the answer rather than give up on a slow (loaded)
            // server: an abandoned probe would still count as an open connection for a moment,
            // against the tests of connection caps.
            if let Ok(r) = http_get_blocking_within(self.addr, "/healthz", PATIENCE) {
                if r.status == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "/healthz never answered 200; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The admin listener's address, from the start log.
    pub fn admin_addr(&self) -> SocketAddr {
        let log = self.log();
        let line = log
            .lines()
            .find(|l| l.contains("also listening") && l.contains("admin=true"))
            .unwrap_or_else(|| panic!("no admin listener in the log:\n{log}"));
        let addr: SocketAddr = field(line, "addr")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no addr in {line:?}"));
        addr
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Everything the server has logged so far (ANSI colours stripped).
    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits until the server's log has `text`: its lines are collected by a thread of their
    /// own, so a line the server wrote before an event the test saw may not be there yet.
    pub async fn wait_log(&self, text: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let log = self.log();
            if log.contains(text) {
                return log;
            }
            assert!(Instant::now() < deadline, "no {text:?} in the log:\n{log}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A tokio-tungstenite client on `/ws/echo`.
    pub async fn ws(&self) -> Ws {
        let (ws, resp) = within(
            "websocket connect",
            tokio_tungstenite::connect_async(self.url("/ws/echo")),
        )
        .await
        .expect("websocket handshake");
        assert_eq!(resp.status(), 101);
        ws
    }

    /// A raw TCP client that has completed the `/ws/echo` handshake.
    pub async fn raw_ws(&self) -> RawWs {
        RawWs::connect(self.addr).await
    }

    pub async fn tcp(&self) -> TcpStream {
        within("tcp connect", TcpStream::connect(self.addr))
            .await
            .expect("tcp connect")
    }

    /// `GET path` on a fresh connection.
    pub async fn get(&self, path: &str) -> HttpResponse {
        self.request(&format!(
            "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        ))
        .await
    }

    /// Sends a hand-written request head on a fresh connection and reads the response.
    pub async fn request(&self, raw: &str) -> HttpResponse {
        let mut s = self.tcp().await;
        s.write_all(raw.as_bytes()).await.expect("write request");
        read_response(&mut s).await
    }

    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) with our own child's pid; no memory is involved.
        let rc = unsafe { libc::kill(self.pid(), sig) };
        assert_eq!(rc, 0, "kill({sig}) failed");
    }

    /// Waits (polling, without blocking the async runtime) for the process to exit.
    pub async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "ringgate still running after {limit:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `ringgate` binary with a hermetic environment (no inherited overrides, plain logs).
pub fn ringgate_command() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringgate"));
    for var in [
        "HOST",
        "PORT",
        "WS_HEARTBEAT_INTERVAL",
        "WS_MAX_CONNECTIONS",
        "CLUSTER_ENGINE",
        "REDIS_URL",
        "AGENT_UPSTREAM",
        "MIMALLOC_ALLOW_THP",
    ] {
        cmd.env_remove(var);
    }
    // RINGGATE_TEST_LOG=debug gives more server detail in a failing test's output.
    let level = std::env::var("RINGGATE_TEST_LOG").unwrap_or_else(|_| "info".into());
    cmd.env("RUST_LOG", level).env("NO_COLOR", "1");
    cmd
}

/// Runs `cmd` to completion (killing it after [`PATIENCE`], e.g. a server that should have
/// refused to start), without blocking the async runtime.
pub async fn run_to_exit(cmd: &mut Command) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ringgate");
    let deadline = Instant::now() + PATIENCE;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut out = child.wait_with_output().expect("collect output");
    out.stderr = strip_ansi(&String::from_utf8_lossy(&out.stderr)).into_bytes();
    out
}

/// Reads the child's stderr on a thread (so the pipe never fills), keeping the lines and
/// reporting the `ringgate listening addr=... io=...` line.
fn drain_stderr(
    stderr: std::process::ChildStderr,
) -> (Arc<Mutex<Vec<String>>>, mpsc::Receiver<String>) {
    let log = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = mpsc::channel();
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            let line = strip_ansi(&line);
            if line.contains("ringgate listening") {
                let _ = tx.send(line.clone());
            }
            sink.lock().unwrap().push(line);
        }
    });
    (log, rx)
}

/// Removes ANSI escape sequences (`ESC [ ... letter`).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The value of `key=value` in a log line (the value ends at whitespace).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!("{key}="))? + key.len() + 1;
    line[start..].split_whitespace().next()
}

/// A file in cargo's per-test-target temp dir, removed on drop.
pub struct TempFile {
    pub path: PathBuf,
}

impl TempFile {
    pub fn new(ext: &str, contents: &str) -> TempFile {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("ringgate-{}-{n}.{ext}", std::process::id()));
        std::fs::write(&path, contents).expect("write temp file");
        TempFile { path }
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Awaits `f`, failing the test with `what` if it takes longer than [`PATIENCE`].
pub async fn within<F: std::future::Future>(what: &str, f: F) -> F::Output {
    match tokio::time::timeout(PATIENCE, f).await {
        Ok(v) => v,
        Err(_) => panic!("timed out waiting for: {what}"),
    }
}

// ---- HTTP ----------------------------------------------------------------------------------

#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses a response head: (its length, the response without body); `None` until `buf` holds
/// the whole head.
fn parse_head(buf: &[u8]) -> Option<(usize, HttpResponse)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let resp = HttpResponse {
        status,
        headers,
        body: String::new(),
    };
    Some((end, resp))
}

/// Reads one response: the head, then `Content-Length` bytes (or up to EOF without one).
pub async fn read_response(s: &mut TcpStream) -> HttpResponse {
    within("http response", async {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some((end, mut resp)) = parse_head(&buf) {
                let want = resp.header("content-length").and_then(|v| v.parse().ok());
                if let Some(body) = want.and_then(|n: usize| buf[end..].get(..n)) {
                    resp.body = String::from_utf8_lossy(body).into();
                    return resp;
                }
            }
            let n = s.read(&mut chunk).await.expect("read response");
            if n == 0 {
                let (end, mut resp) =
                    parse_head(&buf).expect("connection closed before a response head");
                resp.body = String::from_utf8_lossy(&buf[end..]).into();
                return resp;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
}

/// A blocking `GET` (for start-up, outside any async context).
pub fn http_get_blocking(addr: SocketAddr, path: &str) -> std::io::Result<HttpResponse> {
    http_get_blocking_within(addr, path, Duration::from_secs(2))
}

/// [`http_get_blocking`], waiting up to `patience` for the answer.
fn http_get_blocking_within(
    addr: SocketAddr,
    path: &str,
    patience: Duration,
) -> std::io::Result<HttpResponse> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(patience))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
    )?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let (end, mut resp) = parse_head(&buf).ok_or(std::io::ErrorKind::InvalidData)?;
    resp.body = String::from_utf8_lossy(&buf[end..]).into();
    Ok(resp)
}

/// An upgrade request for `/ws/echo` with `extra` header lines (each ending in `\r\n`).
pub fn upgrade_request(extra: &str) -> String {
    upgrade_request_for("/ws/echo", extra)
}

/// Reads until the peer closes the connection (EOF or reset), discarding the bytes.
/// Returns false if it is still open after `limit`.
pub async fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let mut buf = [0u8; 4096];
    let drain = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(limit, drain).await.is_ok()
}

// ---- tungstenite client helpers ------------------------------------------------------------

/// Sends `msg` and expects it back verbatim.
pub async fn echo(ws: &mut Ws, msg: Message) {
    within("send", ws.send(msg.clone())).await.expect("send");
    let got = next_data(ws).await;
    assert!(got == msg, "echo mismatch: sent {msg:?}, got {got:?}");
}

/// The next text/binary message (pings and pongs are skipped).
pub async fn next_data(ws: &mut Ws) -> Message {
    loop {
        let m = within("message", ws.next())
            .await
            .expect("stream ended")
            .expect("websocket error");
        if matches!(m, Message::Text(_) | Message::Binary(_) | Message::Close(_)) {
            return m;
        }
    }
}

/// Reads until a close frame arrives and returns its code.
pub async fn expect_close(ws: &mut Ws) -> CloseCode {
    loop {
        match within("close frame", ws.next()).await {
            Some(Ok(Message::Close(Some(f)))) => return f.code,
            Some(Ok(Message::Close(None))) => panic!("close frame without a code"),
            Some(Ok(_)) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

// ---- raw WebSocket frames ------------------------------------------------------------------

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// Encodes a client frame: `first_byte` is FIN/RSV/opcode as sent, the payload is masked
/// unless `mask` is `None` (for protocol-violation tests).
pub fn encode_frame(first_byte: u8, mask: Option<[u8; 4]>, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![first_byte];
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= 0xFFFF => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    match mask {
        Some(m) => {
            out.extend_from_slice(&m);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// A masked client frame.
pub fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let fin = if fin { 0x80 } else { 0 };
    encode_frame(fin | opcode, Some([0x37, 0xfa, 0x21, 0x3d]), payload)
}

/// A close frame body: code then reason.
pub fn close_body(code: u16, reason: &str) -> Vec<u8> {
    let mut b = code.to_be_bytes().to_vec();
    b.extend_from_slice(reason.as_bytes());
    b
}

/// A frame from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub fin: bool,
    /// Compressed (permessage-deflate).
    pub rsv1: bool,
    pub opcode: u8,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The code of a close frame.
    pub fn close_code(&self) -> Option<u16> {
        (self.opcode == OP_CLOSE && self.payload.len() >= 2)
            .then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

/// A WebSocket client over plain TCP, for frames tungstenite refuses to send.
pub struct RawWs {
    pub stream: TcpStream,
    /// Bytes read past what was parsed so far.
    pub buf: Vec<u8>,
}

impl RawWs {
    /// Connects and completes the `/ws/echo` handshake.
    pub async fn connect(addr: SocketAddr) -> RawWs {
        let stream = within("tcp connect", TcpStream::connect(addr))
            .await
            .expect("tcp connect");
        RawWs::handshake(stream, "/ws/echo").await
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        within("write", self.stream.write_all(bytes))
            .await
            .expect("write");
    }

    /// Reads one frame; `None` on EOF (or reset) at a frame boundary.
    pub async fn read_frame(&mut self) -> Option<Frame> {
        within("a frame", async {
            loop {
                if let Some((frame, used)) = parse_server_frame(&self.buf) {
                    self.buf.drain(..used);
                    return Some(frame);
                }
                let mut chunk = [0u8; 16 * 1024];
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

    /// Reads frames until a close frame (skipping pings); returns its code.
    pub async fn expect_close(&mut self) -> u16 {
        loop {
            match self.read_frame().await {
                Some(f) if f.opcode == OP_CLOSE => {
                    return f.close_code().expect("close frame without a code")
                }
                Some(f) if f.opcode == OP_PING => {}
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    }

    /// Expects the server to close the TCP connection.
    pub async fn expect_eof(&mut self) {
        assert!(
            closed_within(&mut self.stream, PATIENCE).await,
            "connection still open"
        );
    }

    /// Expects close frame `code` and then the end of the connection.
    pub async fn expect_closed_with(&mut self, code: u16) {
        assert_eq!(self.expect_close().await, code);
        self.expect_eof().await;
    }
}

/// Parses one unmasked server frame from the front of `buf`: (frame, bytes used).
pub fn parse_server_frame(buf: &[u8]) -> Option<(Frame, usize)> {
    let (&b0, &b1) = (buf.first()?, buf.get(1)?);
    assert_eq!(b1 & 0x80, 0, "server frames must not be masked");
    assert_eq!(b0 & 0x30, 0, "RSV2/RSV3 set by the server: {b0:#04x}");
    let (len, mut pos) = match b1 & 0x7F {
        126 => (
            u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize,
            4,
        ),
        127 => (
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
            10,
        ),
        n => (n as usize, 2),
    };
    let payload = buf.get(pos..pos + len)?.to_vec();
    pos += len;
    let frame = Frame {
        fin: b0 & 0x80 != 0,
        rsv1: b0 & 0x40 != 0,
        opcode: b0 & 0x0F,
        payload,
    };
    Some((frame, pos))
}

/// Deterministic pseudo-random bytes (xorshift), so failures reproduce.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

// ---- additions for the rooms tests (`/ws`, `/api/*`) -----------------------------------------

/// The HS256 secret of [`user_token`]: `[auth] jwt_secret` of servers that take its tokens.
pub const JWT_SECRET: &str = "rooms-test-secret-of-at-least-32-bytes";

/// A token for user `sub` (its `sub` claim), valid for ten minutes.
pub fn user_token(sub: &str) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 600;
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"sub": sub, "exp": exp}),
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("token")
}

/// A binary publish to `topic` in the binary envelope (docs/PROTOCOL.md "Binary rooms").
pub fn binary_publish(topic: &str, volatile: bool, payload: &[u8]) -> Message {
    let mut m = vec![if volatile { 2 } else { 1 }, topic.len() as u8];
    m.extend_from_slice(topic.as_bytes());
    m.extend_from_slice(payload);
    Message::binary(m)
}

impl Server {
    /// A tokio-tungstenite client on `path` (e.g. `/ws`).
    pub async fn ws_path(&self, path: &str) -> Ws {
        let (ws, resp) = within(
            "websocket connect",
            tokio_tungstenite::connect_async(self.url(path)),
        )
        .await
        .expect("websocket handshake");
        assert_eq!(resp.status(), 101);
        ws
    }

    /// A tokio-tungstenite client on `/ws` with `token` as the `bearer.` subprotocol.
    pub async fn ws_with_token(&self, token: &str) -> Ws {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = self.url("/ws").into_client_request().expect("request");
        req.headers_mut().insert(
            "sec-websocket-protocol",
            format!("bearer.{token}").parse().expect("header value"),
        );
        let (ws, _) = within("connect", tokio_tungstenite::connect_async(req))
            .await
            .expect("websocket handshake");
        ws
    }

    /// `POST path` with a JSON `body` and `extra` header lines (each ending in `\r\n`) on a
    /// fresh connection.
    pub async fn post(&self, path: &str, extra: &str, body: &str) -> HttpResponse {
        self.request(&format!(
            "POST {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n{extra}\r\n{body}",
            body.len()
        ))
        .await
    }
}

/// An upgrade request for `path` with `extra` header lines (each ending in `\r\n`).
pub fn upgrade_request_for(path: &str, extra: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
}

impl RawWs {
    /// Completes the handshake for `path` on an already connected `stream` (e.g. one with a
    /// small receive buffer).
    pub async fn handshake(stream: TcpStream, path: &str) -> RawWs {
        RawWs::upgrade(stream, path, "").await.0
    }

    /// Sends an upgrade for `path` with `extra` header lines (each ending in `\r\n`) on
    /// `stream` and expects a 101: the connection and the 101's head.
    pub async fn upgrade(mut stream: TcpStream, path: &str, extra: &str) -> (RawWs, HttpResponse) {
        stream
            .write_all(upgrade_request_for(path, extra).as_bytes())
            .await
            .expect("write handshake");
        let mut buf = Vec::new();
        let mut chunk = [0u8; 1024];
        let (end, head) = within("101 response", async {
            loop {
                if let Some(head) = parse_head(&buf) {
                    return head;
                }
                let n = stream.read(&mut chunk).await.expect("read handshake");
                assert!(n > 0, "closed during the handshake");
                buf.extend_from_slice(&chunk[..n]);
            }
        })
        .await;
        assert_eq!(head.status, 101, "handshake refused: {head:?}");
        buf.drain(..end);
        (RawWs { stream, buf }, head)
    }
}

// ---- additions for the proxy tests ------------------------------------------------------------

impl Server {
    /// The config file the server was started with (rewrite it, then SIGHUP).
    pub fn config_path(&self) -> Option<&std::path::Path> {
        self.config.as_ref().map(|c| c.path.as_path())
    }
}

/// Seconds since the Unix epoch, `secs` from now (a token's `exp`).
pub fn unix_in(secs: u64) -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
        + secs
}

/// Runs `cmd` to its end: whether it succeeded, and its stdout and stderr together.
pub fn output_text(cmd: &mut Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A directory with a fresh dev CA and certificate from `ringgate dev-cert`.
pub struct CertDir(pub PathBuf);

impl CertDir {
    pub async fn new() -> CertDir {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("certs-{}-{n}", std::process::id()));
        let out = run_to_exit(ringgate_command().arg("dev-cert").arg(&dir)).await;
        assert!(out.status.success(), "dev-cert failed: {out:?}");
        CertDir(dir)
    }
    pub fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for CertDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---- Redis ---------------------------------------------------------------------------------

/// A real `redis-server` on 127.0.0.1, on a free port, with its own directory; killed on drop.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    /// With an append-only file: a restart keeps the data (a clean stop or a kill alike).
    persistent: bool,
    /// More `redis-server` arguments (`--requirepass`, …).
    args: Vec<String>,
}

impl Redis {
    /// Starts `redis-server` (installed with apt-get on first use when running as root).
    pub fn start(persistent: bool) -> Redis {
        // A free port can be taken again before redis-server binds it (as the source port of
        // any outgoing connection of the parallel tests): then another one.
        let mut r = Redis::unstarted(free_port(), persistent, &[]);
        for _ in 0..3 {
            if r.try_spawn() {
                return r;
            }
            r.kill();
            r.port = free_port();
        }
        panic!("redis-server did not start on three free ports");
    }

    /// [`Redis::start`] on `port`.
    pub fn start_on(port: u16, persistent: bool) -> Redis {
        Redis::start_with(port, persistent, &[])
    }

    /// [`Redis::start_on`] with more `redis-server` arguments.
    pub fn start_with(port: u16, persistent: bool, args: &[&str]) -> Redis {
        let mut r = Redis::unstarted(port, persistent, args);
        r.spawn();
        r
    }

    fn unstarted(port: u16, persistent: bool, args: &[&str]) -> Redis {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
            "redis-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("redis dir");
        Redis {
            child: None,
            port,
            dir,
            persistent,
            args: args.iter().map(|a| a.to_string()).collect(),
        }
    }

    /// A port nothing listens on (for "Redis is down" tests).
    pub fn unused_port() -> u16 {
        free_port()
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        assert!(
            self.try_spawn(),
            "redis-server did not answer PING on port {}",
            self.port
        );
    }

    /// Starts redis-server; false when it exits (its port was taken) or does not answer.
    fn try_spawn(&mut self) -> bool {
        let port = self.port.to_string();
        let aof = if self.persistent { "yes" } else { "no" };
        let child = Command::new(redis_server())
            .args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", aof, "--appendfsync", "always"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(self.dir.join("redis.log"))
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
        let deadline = Instant::now() + PATIENCE;
        // Without the password PING answers -NOAUTH: up all the same.
        while !self
            .command(&["PING"])
            .is_some_and(|r| r == "+PONG" || r.starts_with("-NOAUTH"))
        {
            let exited = self
                .child
                .as_mut()
                .is_some_and(|c| c.try_wait().is_ok_and(|s| s.is_some()));
            if exited || Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Answered by this server, not by another process that holds the port.
        !self
            .child
            .as_mut()
            .is_some_and(|c| c.try_wait().is_ok_and(|s| s.is_some()))
    }

    /// Kills the server (SIGKILL): without an append-only file its data is gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port and directory.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// The server's log (replication, failover), for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }

    /// Runs one command (inline form); the first line of the answer, or `None` when the
    /// server is not reachable.
    pub fn command(&self, args: &[&str]) -> Option<String> {
        redis_command(self.port, args)
    }
}

/// One command (inline form) to the server on `port`: the first line of the answer (the whole
/// text of a bulk string, such as `INFO`'s), or `None` when the server is not reachable.
pub fn redis_command(port: u16, args: &[&str]) -> Option<String> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(PATIENCE)).ok()?;
    s.write_all(format!("{}\r\n", args.join(" ")).as_bytes())
        .ok()?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let line = line.trim_end();
    match line.strip_prefix('$').and_then(|n| n.parse::<usize>().ok()) {
        Some(len) => {
            let mut body = vec![0; len];
            r.read_exact(&mut body).ok()?;
            Some(String::from_utf8_lossy(&body).into_owned())
        }
        None => Some(line.to_string()),
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A real Redis Cluster of three masters (no replicas) on 127.0.0.1: three `redis-server
/// --cluster-enabled yes`, the slots split in three ranges (`CLUSTER ADDSLOTSRANGE`) and met
/// (`CLUSTER MEET`); ready once every node says `cluster_state:ok`. Killed on drop.
pub struct RedisCluster {
    pub masters: Vec<Redis>,
    /// Each master's node id, in the order of `masters`.
    pub ids: Vec<String>,
}

/// The first slot of each master's range in a [`RedisCluster`].
pub const CLUSTER_RANGES: [(u16, u16); 3] = [(0, 5460), (5461, 10922), (10923, 16383)];

impl RedisCluster {
    pub fn start() -> RedisCluster {
        let masters: Vec<Redis> = CLUSTER_RANGES
            .iter()
            .map(|_| {
                let bus = free_port().to_string();
                let args = [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                    "--cluster-port",
                    &bus,
                ];
                Redis::start_with(free_port(), false, &args)
            })
            .collect();
        for (m, (first, last)) in masters.iter().zip(CLUSTER_RANGES) {
            let (first, last) = (first.to_string(), last.to_string());
            let ok = m.command(&["CLUSTER", "ADDSLOTSRANGE", &first, &last]);
            assert_eq!(ok.as_deref(), Some("+OK"), "ADDSLOTSRANGE");
        }
        let ids: Vec<String> = masters
            .iter()
            .map(|m| m.command(&["CLUSTER", "MYID"]).expect("CLUSTER MYID"))
            .collect();
        for other in &masters[1..] {
            let bus = other
                .args
                .iter()
                .skip_while(|a| *a != "--cluster-port")
                .nth(1)
                .cloned()
                .expect("bus port");
            let port = other.port.to_string();
            let ok = masters[0].command(&["CLUSTER", "MEET", "127.0.0.1", &port, &bus]);
            assert_eq!(ok.as_deref(), Some("+OK"), "MEET");
        }
        let cluster = RedisCluster { masters, ids };
        cluster.wait_ok();
        cluster
    }

    /// Polls every master until it says `cluster_state:ok` and knows every master.
    pub fn wait_ok(&self) {
        let deadline = Instant::now() + PATIENCE;
        let ok = |m: &Redis| {
            m.command(&["CLUSTER", "INFO"]).is_some_and(|info| {
                info.contains("cluster_state:ok") && info.contains("cluster_known_nodes:3")
            })
        };
        while !self.masters.iter().all(ok) {
            assert!(
                Instant::now() < deadline,
                "the Redis Cluster did not become ok"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `redis+cluster://` naming every master.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .masters
            .iter()
            .map(|m| format!("127.0.0.1:{}", m.port))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    /// The index of the master serving `slot` (as started).
    pub fn master_of(slot: u16) -> usize {
        CLUSTER_RANGES
            .iter()
            .position(|(first, last)| (*first..=*last).contains(&slot))
            .expect("a slot")
    }

    /// The hash slot of `key`, as Redis computes it.
    pub fn slot(&self, key: &str) -> u16 {
        let answer = self.masters[0].command(&["CLUSTER", "KEYSLOT", key]);
        answer
            .as_deref()
            .and_then(|a| a.strip_prefix(':'))
            .and_then(|n| n.parse().ok())
            .expect("CLUSTER KEYSLOT")
    }

    /// Moves `slot` and its `keys` from master `from` to master `to`, as `redis-cli --cluster
    /// reshard` does: importing and migrating, `MIGRATE`, then every master told the new
    /// owner.
    pub fn move_slot(&self, slot: u16, keys: &[&str], from: usize, to: usize) {
        let (s, src, dst) = (slot.to_string(), &self.masters[from], &self.masters[to]);
        let ok = |r: Option<String>, what: &str| {
            assert!(
                r.as_deref().is_some_and(|r| r == "+OK" || r == "+NOKEY"),
                "{what}: {r:?}"
            )
        };
        ok(
            dst.command(&["CLUSTER", "SETSLOT", &s, "IMPORTING", &self.ids[from]]),
            "IMPORTING",
        );
        ok(
            src.command(&["CLUSTER", "SETSLOT", &s, "MIGRATING", &self.ids[to]]),
            "MIGRATING",
        );
        let port = dst.port.to_string();
        let mut migrate = vec!["MIGRATE", "127.0.0.1", &port, "\"\"", "0", "5000", "KEYS"];
        migrate.extend_from_slice(keys);
        ok(src.command(&migrate), "MIGRATE");
        for m in [dst, src].into_iter().chain(&self.masters) {
            ok(
                m.command(&["CLUSTER", "SETSLOT", &s, "NODE", &self.ids[to]]),
                "SETSLOT NODE",
            );
        }
    }
}

impl RedisCluster {
    /// Makes masters `a` and `b` each name the other as `slot`'s owner (`CLUSTER SETSLOT
    /// NODE` on both, while the slot holds no key): neither claims it, gossip leaves both
    /// views alone, and a command for the slot is answered `MOVED` by each towards the other.
    pub fn redirect_loop(&self, slot: u16, a: usize, b: usize) {
        let s = slot.to_string();
        for (on, to) in [(a, b), (b, a)] {
            let r = self.masters[on].command(&["CLUSTER", "SETSLOT", &s, "NODE", &self.ids[to]]);
            assert_eq!(r.as_deref(), Some("+OK"), "SETSLOT NODE");
        }
    }
}

/// A real Redis Sentinel (`redis-server CONF --sentinel`) on 127.0.0.1 watching the master
/// `name` at `master_port` (quorum 1, down after 500 ms), with the more lines `more` of
/// sentinel.conf; killed on drop.
pub struct Sentinel {
    child: Child,
    pub port: u16,
    dir: PathBuf,
}

impl Sentinel {
    pub fn start(name: &str, master_port: u16, more: &str) -> Sentinel {
        let port = free_port();
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("sentinel-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("sentinel dir");
        // Sentinel rewrites its config file: it must be its own, writable.
        let conf = dir.join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nlogfile {}\n\
                 sentinel monitor {name} 127.0.0.1 {master_port} 1\n\
                 sentinel down-after-milliseconds {name} 500\n\
                 sentinel failover-timeout {name} 5000\n{more}\n",
                dir.display(),
                dir.join("sentinel.log").display()
            ),
        )
        .expect("sentinel.conf");
        let child = Command::new(redis_server())
            .arg(&conf)
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server --sentinel");
        let s = Sentinel { child, port, dir };
        let deadline = Instant::now() + PATIENCE;
        // Without the password PING answers -NOAUTH: up all the same.
        while !redis_command(port, &["PING"])
            .is_some_and(|r| r == "+PONG" || r.starts_with("-NOAUTH"))
        {
            assert!(
                Instant::now() < deadline,
                "the sentinel did not answer PING"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        s
    }

    /// One command to the sentinel, as [`redis_command`].
    pub fn command(&self, args: &[&str]) -> Option<String> {
        redis_command(self.port, args)
    }

    /// The sentinel's log (its view of the master: down, failovers, switches), for failure
    /// messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sentinel.log")).unwrap_or_default()
    }
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A port free now and never handed out before in this process: tests running at once must
/// not start two servers on one port (the second would fail to bind, and its test would talk
/// to the first).
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
        let port = l.local_addr().expect("local addr").port();
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// `redis-server`, installed from the Debian packages on first use when running as root.
fn redis_server() -> &'static str {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    let found = || {
        Command::new("redis-server")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    INSTALL.call_once(|| {
        // SAFETY: geteuid has no preconditions.
        if !found() && unsafe { libc::geteuid() } == 0 {
            let _ = Command::new("apt-get")
                .args(["install", "-y", "redis-server"])
                .env("DEBIAN_FRONTEND", "noninteractive")
                .status();
        }
    });
    assert!(
        found(),
        "these tests need redis-server: apt-get install redis-server"
    );
    "redis-server"
}
