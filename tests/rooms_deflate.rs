//! Rooms (`/ws`) with permessage-deflate, over real sockets against the real binary with two
//! shards, on both io backends.
//!
//! The home shard of a topic encodes each published message once and, when some subscriber
//! takes it (`server_no_context_takeover` with a 15-bit window, which `broadcast_friendly`
//! answers to everyone), compresses it once: every such subscriber, on any shard, gets the same
//! bytes. Other deflate subscribers (context takeover, smaller windows) are compressed by their
//! own session. The tests check, with raw clients that see RSV1 and inflate the frames
//! themselves (flate2, raw deflate):
//!
//! - content and seq of every message for deflate and plain subscribers side by side;
//! - RSV1 on messages over the threshold, none under it;
//! - without context takeover each compressed frame inflates on its own (a fresh inflater per
//!   message), and the frame of a seq is byte for byte the same on both shards;
//! - with takeover one inflater per connection decodes everything (the context really is used),
//!   also with a 10-bit window, with large direct replies interleaved with broadcasts, with
//!   two topics homed on different shards, and across an idle pause (compressor freed);
//! - history replay (`subscribe` with `since`) to deflate subscribers;
//! - interop: the Python `websockets` client with its default offer
//!   (`tests/interop/rooms_client.py`), under both configurations.
//!
//! The interop tests need `python3` with `websockets` (installed under the target directory on
//! first use if missing, like tests/compression.rs does).

mod common;

use std::borrow::Borrow;
use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::rooms::{Client, Wire};
use common::*;
use flate2::{Decompress, FlushDecompress, Status};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

both_backends!(
    broadcast_friendly_compresses_once_for_all_shards,
    context_takeover_subscribers,
    history_replay_broadcast_friendly,
    history_replay_with_context_takeover,
    two_home_shards_interleaved,
    takeover_compressor_freed_after_silence,
    takeover_compressor_freed_when_idle,
    interop_python_broadcast_friendly,
    interop_python_context_takeover,
    compress_once_is_the_ws_default,
);

/// `broadcast_friendly`: the server answers `server_no_context_takeover` to every offer.
const BROADCAST: &str = "[compression]\nbroadcast_friendly = true\n[rooms]\npublish_rate = 0\n";
/// `compress_once` off: the server keeps its context when the client allows it.
const TAKEOVER: &str = "[rooms]\npublish_rate = 0\ncompress_once = false\n";
/// The defaults: `/ws` answers browsers' offers without server context takeover.
const DEFAULTS: &str = "[rooms]\npublish_rate = 0\n";
/// What browsers and the interop libraries offer by default.
const OFFER: &str = "permessage-deflate; client_max_window_bits";
/// The answer to [`OFFER`] under [`BROADCAST`], and on `/ws` under [`DEFAULTS`].
const SHARED_EXT: &str =
    "permessage-deflate; server_no_context_takeover; client_no_context_takeover";
/// The answer to [`OFFER`] under [`TAKEOVER`].
const TAKEOVER_EXT: &str = "permessage-deflate; client_no_context_takeover";
/// The server's default compression threshold.
const THRESHOLD: usize = 256;
/// The `type` of every published message.
const KIND: &str = "tick";
const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

// ---- messages --------------------------------------------------------------------------------

/// Every third message is small, the others big.
fn is_big(i: usize) -> bool {
    i % 3 != 2
}

/// The `data` of message `i`: ~1 KiB of JSON when big (the room message is well over the
/// threshold), a few bytes otherwise (well under).
fn data(i: usize) -> Value {
    if !is_big(i) {
        return json!({"i": i, "small": true});
    }
    const STATUS: [&str; 3] = ["online", "away", "busy"];
    let rows: Vec<Value> = (0..16)
        .map(|k| {
            json!({
                "host": format!("edge-{}", (i + k) % 7),
                "cpu": (i * 37 + k * 11) % 100,
                "mem": (i * 13 + k) % 97,
                "status": STATUS[k % 3],
            })
        })
        .collect();
    json!({"i": i, "rows": rows})
}

/// Publishes `data` to `topic` with `POST /api/publish`; returns its seq.
async fn publish(server: &Server, topic: &str, data: &Value) -> u64 {
    let body = json!({"topic": topic, "type": KIND, "data": data});
    let r = server.post("/api/publish", "", &body.to_string()).await;
    assert_eq!(r.status, 200, "{r:?}");
    let v: Value = serde_json::from_str(&r.body).unwrap_or_else(|e| panic!("{e}: {r:?}"));
    v["seq"].as_u64().unwrap_or_else(|| panic!("no seq: {r:?}"))
}

/// Publishes messages `range` (see [`data`]); returns (seq, data) of each.
async fn publish_range(
    server: &Server,
    topic: &str,
    range: std::ops::Range<usize>,
) -> Vec<(u64, Value)> {
    let mut sent = Vec::new();
    for i in range {
        let d = data(i);
        let seq = publish(server, topic, &d).await;
        if let Some((last, _)) = sent.last() {
            assert_eq!(seq, last + 1, "seqs of consecutive publishes");
        }
        sent.push((seq, d));
    }
    sent
}

// ---- raw deflate -----------------------------------------------------------------------------

/// Inflates one message body (RFC 7692: the sync-flush tail `00 00 ff ff` was stripped) with
/// `z`, which keeps its window for the next message.
fn inflate_with(z: &mut Decompress, body: &[u8]) -> Result<Vec<u8>, String> {
    let mut input = Vec::with_capacity(body.len() + TAIL.len());
    input.extend_from_slice(body);
    input.extend_from_slice(&TAIL);
    let mut out: Vec<u8> = Vec::with_capacity(4 * input.len() + 1024);
    let mut pos = 0;
    loop {
        let (in0, out0) = (z.total_in(), z.total_out());
        let status = z
            .decompress_vec(&input[pos..], &mut out, FlushDecompress::Sync)
            .map_err(|e| format!("inflate: {e}"))?;
        pos += (z.total_in() - in0) as usize;
        if status == Status::StreamEnd {
            return Err("the message ends the deflate stream (a BFINAL block)".into());
        }
        if pos == input.len() && out.len() < out.capacity() {
            return Ok(out);
        }
        if out.len() == out.capacity() {
            out.reserve(out.capacity());
        } else if z.total_in() == in0 && z.total_out() == out0 {
            return Err(format!("inflate stuck at {pos} of {} bytes", input.len()));
        }
    }
}

/// Inflates `body` with a fresh inflater (no context from earlier messages).
fn inflate_alone(body: &[u8], window_bits: u8) -> Result<Vec<u8>, String> {
    inflate_with(
        &mut Decompress::new_with_window_bits(false, window_bits),
        body,
    )
}

/// How a connection decodes the server's compressed messages.
enum Inflate {
    /// Nothing negotiated: RSV1 is a protocol error.
    Off,
    /// `server_no_context_takeover`: each message on its own, with a fresh inflater.
    Fresh { bits: u8 },
    /// Context takeover: one inflater for the connection's whole life, with the agreed window
    /// (a back-reference to an earlier message beyond it fails).
    Takeover(Box<Decompress>),
}

impl Inflate {
    fn for_extensions(ext: Option<&str>) -> Inflate {
        let Some(ext) = ext else {
            return Inflate::Off;
        };
        assert!(ext.starts_with("permessage-deflate"), "{ext}");
        let bits = ext
            .split(';')
            .find_map(|p| p.trim().strip_prefix("server_max_window_bits="))
            .map_or(15, |v| v.parse().expect("server_max_window_bits"));
        if ext.contains("server_no_context_takeover") {
            Inflate::Fresh { bits }
        } else {
            Inflate::Takeover(Box::new(Decompress::new_with_window_bits(false, bits)))
        }
    }
}

// ---- a raw `/ws` connection that sees RSV1 ---------------------------------------------------

/// A JSON message from the server.
#[derive(Debug, Clone)]
struct Got {
    json: Value,
    /// The text, inflated if it came compressed.
    text: Vec<u8>,
    /// RSV1.
    compressed: bool,
    /// The frame on the wire.
    frame: Vec<u8>,
}

impl Got {
    fn seq(&self) -> u64 {
        self.json["seq"].as_u64().expect("seq")
    }
}

impl Borrow<Value> for Got {
    fn borrow(&self) -> &Value {
        &self.json
    }
}

/// A `/ws` connection over plain TCP that offers permessage-deflate (or not) and decodes the
/// server's frames itself: the [`Wire`] of the shared rooms [`Client`].
struct Deflating {
    name: String,
    stream: TcpStream,
    buf: Vec<u8>,
    /// The 101's `Sec-WebSocket-Extensions`.
    extensions: Option<String>,
    inflate: Inflate,
    /// Pings received so far.
    pings: u64,
    /// Whether pings are answered (a compliant client: yes).
    answer_pings: bool,
}

impl Deflating {
    /// The next frame, and its bytes as sent (header included).
    async fn read_frame(&mut self) -> (Frame, Vec<u8>) {
        let name = self.name.clone();
        within(&format!("{name}: a frame"), async {
            loop {
                if let Some((f, used)) = parse_server_frame(&self.buf) {
                    let bytes = self.buf.drain(..used).collect();
                    return (f, bytes);
                }
                let mut chunk = vec![0u8; 64 * 1024];
                match self.stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => panic!("{name}: the connection ended"),
                    Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                }
            }
        })
        .await
    }
}

impl Wire for Deflating {
    type Msg = Got;

    async fn send_text(&mut self, text: String) {
        let f = frame(true, OP_TEXT, text.as_bytes());
        within("write", self.stream.write_all(&f))
            .await
            .expect("write");
    }

    /// The next JSON message (pings answered unless `answer_pings` is off), inflated if it came
    /// compressed.
    async fn recv(&mut self, what: &str) -> Got {
        loop {
            let (f, bytes) = self.read_frame().await;
            match f.opcode {
                OP_PING if !self.answer_pings => {
                    self.pings += 1;
                    continue;
                }
                OP_PING => {
                    self.pings += 1;
                    let pong = frame(true, OP_PONG, &f.payload);
                    within("pong", self.stream.write_all(&pong))
                        .await
                        .expect("pong");
                    continue;
                }
                OP_PONG => continue,
                OP_TEXT => {}
                OP_CLOSE => panic!(
                    "{}: waiting for {what}: closed {:?} {:?}",
                    self.name,
                    f.payload.get(..2).map(|c| u16::from_be_bytes([c[0], c[1]])),
                    String::from_utf8_lossy(f.payload.get(2..).unwrap_or_default())
                ),
                _ => panic!("{}: expected a text message, got {f:?}", self.name),
            }
            assert!(f.fin, "{}: the server sends whole messages", self.name);
            let text = if f.rsv1 {
                let inflated = match &mut self.inflate {
                    Inflate::Off => panic!("{}: RSV1 without permessage-deflate", self.name),
                    Inflate::Fresh { bits } => inflate_alone(&f.payload, *bits),
                    Inflate::Takeover(z) => inflate_with(z, &f.payload),
                };
                inflated.unwrap_or_else(|e| {
                    panic!(
                        "{} ({:?}): compressed frame of {} bytes: {e}",
                        self.name,
                        self.extensions,
                        f.payload.len()
                    )
                })
            } else {
                f.payload.clone()
            };
            let json = serde_json::from_slice(&text).unwrap_or_else(|e| {
                panic!(
                    "{}: not JSON ({e}): {}",
                    self.name,
                    String::from_utf8_lossy(&text)
                )
            });
            return Got {
                json,
                text,
                compressed: f.rsv1,
                frame: bytes,
            };
        }
    }
}

/// The shared rooms client over a [`Deflating`] connection.
type DClient = Client<Deflating>;

impl DClient {
    /// Connects to `/ws` offering `offer` (if any) and reads the `connected` greeting.
    async fn open(server: &Server, name: &str, offer: Option<&str>) -> DClient {
        let extra = offer
            .map(|o| format!("Sec-WebSocket-Extensions: {o}\r\n"))
            .unwrap_or_default();
        let (ws, head) = RawWs::upgrade(server.tcp().await, "/ws", &extra).await;
        let extensions = head.header("sec-websocket-extensions").map(str::to_string);
        Client::greeted(Deflating {
            name: name.to_string(),
            stream: ws.stream,
            buf: ws.buf,
            inflate: Inflate::for_extensions(extensions.as_deref()),
            extensions,
            pings: 0,
            answer_pings: true,
        })
        .await
    }

    /// [`DClient::open`] until the connection lands on `shard` (the kernel spreads connections
    /// over the shards' SO_REUSEPORT listeners).
    async fn open_on(server: &Server, name: &str, offer: Option<&str>, shard: u64) -> DClient {
        for _ in 0..200 {
            let c = DClient::open(server, name, offer).await;
            if c.shard() == Some(shard) {
                return c;
            }
        }
        panic!("{name}: no connection landed on shard {shard} in 200 tries");
    }

    fn name(&self) -> &str {
        &self.ws.name
    }

    /// The 101's `Sec-WebSocket-Extensions`.
    fn extensions(&self) -> Option<&str> {
        self.ws.extensions.as_deref()
    }

    /// The compression its messages come with: RSV1 from the threshold once deflate is
    /// negotiated.
    fn expected(&self) -> Expect {
        match self.extensions() {
            Some(_) => Expect::FromThreshold,
            None => Expect::Plain,
        }
    }

    /// Stays connected for `d` without sending anything but pongs (data messages are stashed).
    async fn idle(&mut self, d: Duration) {
        let end = Instant::now() + d;
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            if let Ok(g) = tokio::time::timeout(left, self.ws.recv("a message")).await {
                self.stash.push_back(g);
            }
        }
    }

    /// Sends nothing (pongs included) until `n` more pings have come (data messages are
    /// stashed), then answers pings again.
    async fn silent_for_pings(&mut self, n: u64) {
        self.ws.answer_pings = false;
        let target = self.ws.pings + n;
        let deadline = Instant::now() + PATIENCE;
        while self.ws.pings < target {
            assert!(Instant::now() < deadline, "{}: no pings", self.name());
            let next = self.ws.recv("a message");
            if let Ok(g) = tokio::time::timeout(Duration::from_millis(50), next).await {
                self.stash.push_back(g);
            }
        }
        self.ws.answer_pings = true;
    }

    /// The next `n` published messages of any topic, in arrival order.
    async fn room_messages_any(&mut self, n: usize) -> Vec<Got> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(
                self.until("a published message", |m| m["type"] == KIND)
                    .await,
            );
        }
        out
    }

    /// The next `n` published messages of `topic`.
    async fn room_messages(&mut self, topic: &str, n: usize) -> Vec<Got> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let what = format!("a message of {topic}");
            out.push(
                self.until(&what, |m| m["type"] == KIND && m["topic"] == topic)
                    .await,
            );
        }
        out
    }
}

// ---- checks ----------------------------------------------------------------------------------

/// `got` are exactly the messages `sent`, in order.
fn check_content(who: &str, topic: &str, got: &[Got], sent: &[(u64, Value)]) {
    let seqs: Vec<u64> = got.iter().map(Got::seq).collect();
    let want: Vec<u64> = sent.iter().map(|(s, _)| *s).collect();
    assert_eq!(seqs, want, "{who}: seqs");
    for (g, (seq, data)) in got.iter().zip(sent) {
        let m = &g.json;
        assert_eq!(
            (&m["type"], &m["topic"], &m["data"]),
            (&json!(KIND), &json!(topic), data),
            "{who}: message {seq}"
        );
        assert!(m["timestamp"].is_number(), "{who}: {m}");
    }
}

/// What compression a subscriber should see.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Never RSV1.
    Plain,
    /// RSV1 exactly on the messages of the threshold or more.
    FromThreshold,
}

fn check_compression(who: &str, got: &[Got], expect: Expect) {
    for g in got {
        let big = g.text.len() >= THRESHOLD;
        let want = expect == Expect::FromThreshold && big;
        assert_eq!(
            g.compressed,
            want,
            "{who}: message {} of {} bytes ({expect:?})",
            g.seq(),
            g.text.len()
        );
        if g.compressed {
            // Compressed messages are those with data; sanity-check the sizes of the test.
            assert!(g.text.len() > 900, "{who}: {} bytes", g.text.len());
        }
    }
}

/// Every subscriber got the same text for each seq: the home shard encoded it once.
fn check_same_text(a: (&str, &[Got]), b: (&str, &[Got])) {
    for (x, y) in a.1.iter().zip(b.1) {
        assert!(
            x.text == y.text,
            "message {}: {} and {} got different texts:\n{}\n{}",
            x.seq(),
            a.0,
            b.0,
            String::from_utf8_lossy(&x.text),
            String::from_utf8_lossy(&y.text)
        );
    }
}

/// How many compressed frames of `got` fail to inflate on their own to their text, i.e. refer
/// back to earlier messages (context takeover in use).
fn refer_back(got: &[Got]) -> usize {
    got.iter()
        .filter(|g| g.compressed)
        .filter(|g| {
            let (f, _) = parse_server_frame(&g.frame).expect("a whole frame");
            inflate_alone(&f.payload, 15).ok().as_deref() != Some(&g.text[..])
        })
        .count()
}

// ---- 1. broadcast_friendly: compressed once, shared --------------------------------------------

/// `broadcast_friendly = true`: deflate subscribers on both shards, plain subscribers on both
/// shards and one with a 12-bit window (compressed by its own session, without context) all get
/// every message with the right seq and content; RSV1 exactly from the threshold; every
/// compressed frame inflates on its own; and the compressed frame of a seq is byte for byte the
/// same on both shards (one compression, shared).
async fn broadcast_friendly_compresses_once_for_all_shards(backend: Backend) {
    let server = Server::start_with_config(backend, BROADCAST, &[]);
    let topic = "deflate.shared";
    let mut shared = Vec::new();
    let mut plain = Vec::new();
    for shard in 0..2 {
        let c = DClient::open_on(&server, &format!("shared{shard}"), Some(OFFER), shard).await;
        assert_eq!(c.extensions(), Some(SHARED_EXT));
        shared.push(c);
        let c = DClient::open_on(&server, &format!("plain{shard}"), None, shard).await;
        assert_eq!(c.extensions(), None);
        plain.push(c);
    }
    let mut own = DClient::open(
        &server,
        "window12",
        Some("permessage-deflate; client_max_window_bits; server_max_window_bits=12"),
    )
    .await;
    let ext = own.extensions().map(str::to_string).expect("negotiated");
    assert!(
        ext.contains("server_no_context_takeover") && ext.contains("server_max_window_bits=12"),
        "{ext}"
    );
    for c in shared.iter_mut().chain(&mut plain).chain([&mut own]) {
        c.subscribe(topic).await;
    }

    let sent = publish_range(&server, topic, 0..24).await;
    let mut got = Vec::new();
    for c in shared.iter_mut().chain(&mut plain).chain([&mut own]) {
        let g = c.room_messages(topic, sent.len()).await;
        check_content(c.name(), topic, &g, &sent);
        check_compression(c.name(), &g, c.expected());
        got.push((c.name().to_string(), g));
    }
    let (first, rest) = got.split_first().expect("subscribers");
    for other in rest {
        check_same_text((&first.0, &first.1), (&other.0, &other.1));
    }
    // Same frames, byte for byte, on both shards; for the small ones that is the plain frame
    // the plain subscribers got too.
    let (s0, s1, p0) = (&got[0].1, &got[1].1, &got[2].1);
    assert_ne!(shared[0].shard(), shared[1].shard());
    for ((a, b), p) in s0.iter().zip(s1).zip(p0) {
        assert!(
            a.frame == b.frame,
            "message {}: the shared compressed frame differs between shards",
            a.seq()
        );
        if !a.compressed {
            assert!(
                a.frame == p.frame,
                "message {}: plain frames differ",
                a.seq()
            );
        }
    }
    // The subscribers are still in step: a ping round trip each.
    for c in shared.iter_mut().chain(&mut plain).chain([&mut own]) {
        let id = c.request(json!({"action": "ping"})).await;
        assert_eq!(c.reply(&id).await.json["type"], "pong");
    }
}

// ---- 2. context takeover ---------------------------------------------------------------------

/// `compress_once = false` (server context takeover): deflate subscribers on both shards and one
/// with a 10-bit window decode everything with one inflater per connection, and the context is
/// really used (later messages refer back into earlier ones); a subscriber that asked for
/// `server_no_context_takeover` (shared frames) and a plain one get the same texts. Large direct
/// replies (`history`) are requested while the broadcasts flow, so the session's compressor
/// sees both interleaved.
async fn context_takeover_subscribers(backend: Backend) {
    let server = Server::start_with_config(backend, TAKEOVER, &[]);
    let topic = "deflate.takeover";
    let mut subs = Vec::new();
    for shard in 0..2 {
        let c = DClient::open_on(&server, &format!("takeover{shard}"), Some(OFFER), shard).await;
        assert_eq!(c.extensions(), Some(TAKEOVER_EXT));
        subs.push(c);
    }
    let w10 = DClient::open(
        &server,
        "window10",
        Some("permessage-deflate; client_max_window_bits; server_max_window_bits=10"),
    )
    .await;
    assert_eq!(
        w10.extensions(),
        Some("permessage-deflate; client_no_context_takeover; server_max_window_bits=10")
    );
    subs.push(w10);
    let nctx = DClient::open(
        &server,
        "no-context",
        Some("permessage-deflate; server_no_context_takeover; client_max_window_bits"),
    )
    .await;
    assert_eq!(nctx.extensions(), Some(SHARED_EXT));
    subs.push(nctx);
    subs.push(DClient::open(&server, "plain", None).await);
    for c in &mut subs {
        c.subscribe(topic).await;
    }

    let mut sent = publish_range(&server, topic, 0..15).await;
    // Direct replies of ~15 KiB, compressed by each session, queued among the broadcasts.
    let mut history_ids = Vec::new();
    for c in &mut subs {
        let id = c
            .request(json!({"action": "history", "topic": topic, "since": 0, "limit": 100}))
            .await;
        history_ids.push(id);
    }
    sent.extend(publish_range(&server, topic, 15..30).await);

    let mut got = Vec::new();
    for (c, id) in subs.iter_mut().zip(&history_ids) {
        let g = c.room_messages(topic, sent.len()).await;
        check_content(c.name(), topic, &g, &sent);
        check_compression(c.name(), &g, c.expected());
        let h = c.reply(id).await;
        assert_eq!(h.json["type"], "history", "{}: {}", c.name(), h.json);
        let n = h.json["messages"].as_array().map_or(0, Vec::len);
        assert!(n >= 15, "{}: history of {n} messages: {}", c.name(), h.json);
        assert_eq!(
            h.compressed,
            c.extensions().is_some(),
            "{}: the {}-byte history reply",
            c.name(),
            h.text.len()
        );
        got.push((c.name().to_string(), g));
    }
    for other in &got[1..] {
        check_same_text((&got[0].0, &got[0].1), (&other.0, &other.1));
    }
    // Takeover is in use: some frames only inflate with the earlier messages' context; the
    // shared no-context frames always inflate alone.
    for (name, g) in &got[..3] {
        assert!(
            refer_back(g) > 0,
            "{name}: no frame refers to an earlier message"
        );
    }
    assert_eq!(refer_back(&got[3].1), 0, "no-context frames stand alone");
}

// ---- 4. history replay -----------------------------------------------------------------------

/// `broadcast_friendly = true`: messages published before any subscriber (plain in history)
/// and while a shared-deflate subscriber listened (compressed in history) are replayed to late
/// deflate, 12-bit-window and plain subscribers with `since`: every one correct, in order, the
/// compressed ones inflating on their own, the shared ones the very bytes the live subscriber
/// got; live messages follow without gap.
async fn history_replay_broadcast_friendly(backend: Backend) {
    let server = Server::start_with_config(backend, BROADCAST, &[]);
    let topic = "deflate.replay";
    let mut sent = publish_range(&server, topic, 0..6).await;
    let mut live = DClient::open_on(&server, "live", Some(OFFER), 0).await;
    let sub = live.subscribe(topic).await.json;
    let epoch = sub["epoch"].clone();
    assert_eq!(sub["seq"], json!(sent.last().expect("sent").0), "{sub}");
    let during = publish_range(&server, topic, 6..18).await;
    let live_got = live.room_messages(topic, during.len()).await;
    check_content("live", topic, &live_got, &during);
    check_compression("live", &live_got, Expect::FromThreshold);
    sent.extend(during);

    let mut late = [
        DClient::open_on(&server, "late-shared", Some(OFFER), 1).await,
        DClient::open(
            &server,
            "late-window12",
            Some("permessage-deflate; client_max_window_bits; server_max_window_bits=12"),
        )
        .await,
        DClient::open(&server, "late-plain", None).await,
    ];
    for (c, since) in late.iter_mut().zip([0, 3, 7]) {
        let r = c.subscribe_since(topic, since, &epoch).await.json;
        assert_eq!(r["recovered"], json!(true), "{}: {r}", c.name());
        let want: Vec<(u64, Value)> = sent.iter().filter(|(s, _)| *s > since).cloned().collect();
        let g = c.room_messages(topic, want.len()).await;
        check_content(c.name(), topic, &g, &want);
        for m in &g {
            // Replay may send what history holds (plain for messages published before any
            // shared subscriber); a compressed one must be valid, which `read` checked.
            assert!(
                !m.compressed || m.text.len() >= THRESHOLD,
                "{}: message {} of {} bytes compressed",
                c.name(),
                m.seq(),
                m.text.len()
            );
            if c.extensions().is_none() {
                assert!(!m.compressed, "{}", c.name());
            }
        }
        if c.name() == "late-shared" {
            // What was compressed for the live subscriber is replayed as it was.
            for m in &g {
                if let Some(l) = live_got.iter().find(|l| l.seq() == m.seq()) {
                    assert!(
                        m.frame == l.frame,
                        "message {}: replayed frame differs from the live one (compressed: \
                         replay {}, live {})",
                        m.seq(),
                        m.compressed,
                        l.compressed
                    );
                }
            }
        }
    }

    // Live messages after the replay reach everyone, compressed as usual.
    let after = publish_range(&server, topic, 18..24).await;
    for c in late.iter_mut().chain([&mut live]) {
        let g = c.room_messages(topic, after.len()).await;
        check_content(c.name(), topic, &g, &after);
        check_compression(c.name(), &g, c.expected());
    }
}

/// Default config (context takeover): a replay of 30 messages to takeover subscribers (one
/// with a 10-bit window) decodes with one inflater per connection, and so do the live messages
/// after it.
async fn history_replay_with_context_takeover(backend: Backend) {
    let server = Server::start_with_config(backend, TAKEOVER, &[]);
    let topic = "deflate.replay.takeover";
    let mut observer = DClient::open(&server, "observer", None).await;
    let epoch = observer.subscribe(topic).await.json["epoch"].clone();
    let sent = publish_range(&server, topic, 0..30).await;
    observer.room_messages(topic, sent.len()).await;

    let mut late = Vec::new();
    for shard in 0..2 {
        let c = DClient::open_on(&server, &format!("late{shard}"), Some(OFFER), shard).await;
        assert_eq!(c.extensions(), Some(TAKEOVER_EXT));
        late.push(c);
    }
    late.push(
        DClient::open(
            &server,
            "late-window10",
            Some("permessage-deflate; client_max_window_bits; server_max_window_bits=10"),
        )
        .await,
    );
    for (c, since) in late.iter_mut().zip([0, 10, 0]) {
        let r = c.subscribe_since(topic, since, &epoch).await.json;
        assert_eq!(r["recovered"], json!(true), "{}: {r}", c.name());
        let want: Vec<(u64, Value)> = sent.iter().filter(|(s, _)| *s > since).cloned().collect();
        let g = c.room_messages(topic, want.len()).await;
        check_content(c.name(), topic, &g, &want);
        check_compression(c.name(), &g, Expect::FromThreshold);
        assert!(
            refer_back(&g) > 0,
            "{}: takeover unused in the replay",
            c.name()
        );
    }
    let after = publish_range(&server, topic, 30..40).await;
    for c in &mut late {
        let g = c.room_messages(topic, after.len()).await;
        check_content(c.name(), topic, &g, &after);
        check_compression(c.name(), &g, Expect::FromThreshold);
    }
}

// ---- more: two home shards, idle compressor ---------------------------------------------------

/// The shard `ringgate` homes `topic` on with 2 shards (a std `DefaultHasher` of the name, as
/// src/hub does).
fn home_of(topic: &str) -> u64 {
    let mut h = DefaultHasher::new();
    topic.hash(&mut h);
    h.finish() % 2
}

/// A topic name starting with `prefix` homed on `shard`.
fn topic_on(prefix: &str, shard: u64) -> String {
    (0..)
        .map(|n| format!("{prefix}.{n}"))
        .find(|t| home_of(t) == shard)
        .expect("a topic")
}

/// Default config: takeover subscribers on both shards and a shared-frame one subscribe to two
/// topics homed on different shards, published to concurrently, so each connection's session
/// compresses messages from two home shards, interleaved arbitrarily, with one context: every
/// message of both topics decodes, in seq order per topic.
async fn two_home_shards_interleaved(backend: Backend) {
    let server = Server::start_with_config(backend, TAKEOVER, &[]);
    let (a, b) = (topic_on("mix.a", 0), topic_on("mix.b", 1));
    let mut subs = vec![
        DClient::open_on(&server, "takeover0", Some(OFFER), 0).await,
        DClient::open_on(&server, "takeover1", Some(OFFER), 1).await,
        DClient::open(
            &server,
            "no-context",
            Some("permessage-deflate; server_no_context_takeover"),
        )
        .await,
    ];
    for c in &mut subs {
        c.subscribe(&a).await;
        c.subscribe(&b).await;
    }
    let (sent_a, sent_b) = tokio::join!(
        publish_range(&server, &a, 0..30),
        publish_range(&server, &b, 100..130)
    );
    for c in &mut subs {
        // Read everything in arrival order (each inflated in that order), then split by topic.
        let all = c.room_messages_any(sent_a.len() + sent_b.len()).await;
        let of = |t: &str| -> Vec<Got> {
            all.iter()
                .filter(|g| g.json["topic"] == t)
                .cloned()
                .collect()
        };
        let (got_a, got_b) = (of(&a), of(&b));
        check_content(c.name(), &a, &got_a, &sent_a);
        check_content(c.name(), &b, &got_b, &sent_b);
        check_compression(c.name(), &all, Expect::FromThreshold);
    }
}

/// Publishes 9 messages to a takeover subscriber, leaves it idle with `pause`, publishes 9
/// more: everything decodes with the connection's one inflater. Returns whether the first
/// message after the pause referred back to the messages before it (the compressor was kept).
async fn kept_compressor_over_a_pause(
    backend: Backend,
    pause: impl AsyncFnOnce(&mut DClient),
) -> bool {
    let server = Server::start_with_config(backend, TAKEOVER, &["--heartbeat-interval", "1"]);
    let topic = "deflate.idle";
    let mut c = DClient::open(&server, "takeover", Some(OFFER)).await;
    assert_eq!(c.extensions(), Some(TAKEOVER_EXT));
    c.subscribe(topic).await;
    let before = publish_range(&server, topic, 0..9).await;
    let g = c.room_messages(topic, before.len()).await;
    check_content(c.name(), topic, &g, &before);
    check_compression(c.name(), &g, Expect::FromThreshold);
    assert!(refer_back(&g) > 0, "takeover unused");
    pause(&mut c).await;
    let after = publish_range(&server, topic, 9..18).await;
    let g = c.room_messages(topic, after.len()).await;
    check_content(c.name(), topic, &g, &after);
    check_compression(c.name(), &g, Expect::FromThreshold);
    assert!(g[0].compressed);
    // Still in step (and still open).
    let id = c.request(json!({"action": "ping"})).await;
    assert_eq!(c.reply(&id).await.json["type"], "pong");
    refer_back(std::slice::from_ref(&g[0])) > 0
}

/// A 1 s heartbeat and a subscriber that sends nothing, not even pongs, for two pings (at least
/// one silent heartbeat tick, not enough to be closed): the server frees its compressor
/// (README "Compression"), so the next message starts without back-references, and the
/// client's inflater, which kept its window, decodes it and what follows.
async fn takeover_compressor_freed_after_silence(backend: Backend) {
    let kept =
        kept_compressor_over_a_pause(backend, async |c: &mut DClient| c.silent_for_pings(2).await)
            .await;
    assert!(
        !kept,
        "the compressor was kept over a silent heartbeat period"
    );
}

/// The same with a compliant client: idle for 3.5 heartbeat periods, it sends nothing but the
/// pongs to the server's heartbeat pings. README "Compression": the compressor (~368 KiB with
/// takeover) is "freed after a heartbeat period without traffic"; pongs keep the connection
/// alive but are not data (`handle_heartbeat` in src/ws/connection.rs counts data messages), so
/// a client that answers pings, as every browser and library does, is idle too.
async fn takeover_compressor_freed_when_idle(backend: Backend) {
    let kept = kept_compressor_over_a_pause(backend, async |c: &mut DClient| {
        c.idle(Duration::from_millis(3500)).await
    })
    .await;
    assert!(
        !kept,
        "the first message after 3.5 s idle (pongs only) refers back: the compressor was kept"
    );
}

// ---- 3. interop: Python `websockets` ---------------------------------------------------------

/// The version CI installs (`.ci/run`), as in tests/compression.rs.
const PYTHON_WEBSOCKETS: &str = "websockets==17.4";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Where the tests install the Python client library when the system has none (shared with
/// tests/compression.rs).
fn python_deps() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR"))
        .parent()
        .map_or_else(|| repo().join("target"), Path::to_path_buf)
        .join("pydeps")
}

fn python() -> std::process::Command {
    let mut cmd = std::process::Command::new(
        std::env::var_os("RINGGATE_PYTHON").unwrap_or_else(|| "python3".into()),
    );
    let mut path = vec![python_deps()];
    if let Some(existing) = std::env::var_os("PYTHONPATH") {
        path.extend(std::env::split_paths(&existing));
    }
    cmd.env(
        "PYTHONPATH",
        std::env::join_paths(path).expect("PYTHONPATH"),
    )
    .env("PYTHONDONTWRITEBYTECODE", "1")
    .stdin(Stdio::null());
    cmd
}

/// Checks once that python3 with `websockets` is there, installing the library under the
/// target directory if needed; panics with instructions otherwise (never a skip).
fn require_python() {
    static FOUND: OnceLock<Result<(), String>> = OnceLock::new();
    let found = FOUND.get_or_init(|| {
        let probe = || {
            python()
                .args(["-c", "import websockets.sync.client"])
                .output()
        };
        if !probe().is_ok_and(|o| o.status.success()) {
            let _ = python()
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                ])
                .arg("--target")
                .arg(python_deps())
                .arg(PYTHON_WEBSOCKETS)
                .stdout(Stdio::null())
                .status();
        }
        match probe() {
            Ok(o) if o.status.success() => Ok(()),
            Ok(o) => Err(String::from_utf8_lossy(&o.stderr).into_owned()),
            Err(e) => Err(format!("cannot run python3: {e}")),
        }
    });
    if let Err(e) = found {
        panic!(
            "the rooms interop test needs python3 with `websockets`: {e}\n\
             install it with: python3 -m pip install '{PYTHON_WEBSOCKETS}' \
             (override the interpreter with RINGGATE_PYTHON)"
        );
    }
}

/// A running `tests/interop/rooms_client.py`, its stdout read line by line.
struct PyClient {
    child: tokio::process::Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
    /// Every line so far, for failure messages.
    out: Vec<String>,
}

impl PyClient {
    fn spawn(url: &str, topic: &str, count: usize) -> PyClient {
        require_python();
        let mut cmd = tokio::process::Command::from(python());
        cmd.arg(repo().join("tests/interop/rooms_client.py"))
            .args([url, topic, &count.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let mut child = cmd.spawn().expect("spawn rooms_client.py");
        let stdout = child.stdout.take().expect("piped stdout");
        PyClient {
            child,
            lines: BufReader::new(stdout).lines(),
            out: Vec::new(),
        }
    }

    /// The next stdout line; `None` at EOF.
    async fn line(&mut self) -> Option<String> {
        let line = tokio::time::timeout(2 * PATIENCE, self.lines.next_line())
            .await
            .unwrap_or_else(|_| panic!("python client silent for 20 s; so far:\n{:#?}", self.out))
            .expect("read python stdout");
        if let Some(l) = &line {
            self.out.push(l.clone());
        }
        line
    }

    /// Reads lines until one starting with `prefix`; returns the rest of it.
    async fn expect_line(&mut self, prefix: &str) -> String {
        loop {
            match self.line().await {
                Some(l) => {
                    if let Some(rest) = l.strip_prefix(prefix) {
                        return rest.to_string();
                    }
                    if l.starts_with("result=FAIL") {
                        panic!("{}", self.failure(&format!("waiting for {prefix:?}")).await);
                    }
                }
                None => panic!(
                    "{}",
                    self.failure(&format!("ended before {prefix:?}")).await
                ),
            }
        }
    }

    /// Stops the client and describes its output, for a panic.
    async fn failure(&mut self, what: &str) -> String {
        let _ = self.child.start_kill();
        let _ = within("python exit", self.child.wait()).await;
        let mut err = String::new();
        if let Some(mut s) = self.child.stderr.take() {
            let _ = s.read_to_string(&mut err).await;
        }
        format!(
            "python rooms client {what}; stdout:\n{}\nstderr:\n{err}",
            self.out.join("\n")
        )
    }
}

/// A `message seq=N compressed=C size=S data=D` line: (seq, compressed, size, data).
fn parse_message_line(rest: &str) -> (u64, bool, usize, Value) {
    let mut seq = None;
    let mut compressed = None;
    let mut size = None;
    let (head, data) = rest.split_once(" data=").expect("data=");
    for part in head.split_whitespace() {
        match part.split_once('=') {
            Some(("seq", v)) => seq = v.parse().ok(),
            Some(("compressed", v)) => compressed = Some(v == "1"),
            Some(("size", v)) => size = v.parse().ok(),
            _ => {}
        }
    }
    (
        seq.expect("seq="),
        compressed.expect("compressed="),
        size.expect("size="),
        serde_json::from_str(data).expect("data= is JSON"),
    )
}

/// Two Python `websockets` clients (default compression offer) subscribe; 30 messages are
/// published; each client must report every one with the right seq and data, compressed
/// exactly when over the threshold, and `extensions` must be `want_ext`.
async fn interop_python(server: &Server, topic: &str, want_ext: &str) {
    let url = server.url("/ws");
    let mut clients: Vec<PyClient> = (0..2).map(|_| PyClient::spawn(&url, topic, 30)).collect();
    let mut start = Vec::new();
    for c in &mut clients {
        let ext = c.expect_line("extensions=").await;
        assert_eq!(ext, want_ext, "python client: negotiated extension");
        let sub = c.expect_line("subscribed seq=").await;
        let seq: u64 = sub
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .expect("subscribed seq");
        start.push(seq);
    }
    let sent = publish_range(server, topic, 0..30).await;
    for (c, start) in clients.iter_mut().zip(start) {
        let want: Vec<&(u64, Value)> = sent.iter().filter(|(s, _)| *s > start).collect();
        for (seq, data) in want {
            let line = c.expect_line("message ").await;
            let (got_seq, compressed, size, got_data) = parse_message_line(&line);
            assert_eq!((got_seq, &got_data), (*seq, data), "python client: {line}");
            assert_eq!(
                compressed,
                size >= THRESHOLD,
                "python client: compression of a {size}-byte message: {line}"
            );
        }
        let result = c.expect_line("result=").await;
        assert!(
            result.starts_with("ok"),
            "python client: result={result}; output:\n{}",
            c.out.join("\n")
        );
        let status = within("python exit", c.child.wait())
            .await
            .expect("wait python");
        assert!(status.success(), "python client exited {status}");
    }
}

async fn interop_python_broadcast_friendly(backend: Backend) {
    let server = Server::start_with_config(backend, BROADCAST, &[]);
    interop_python(&server, "interop.shared", SHARED_EXT).await;
}

async fn interop_python_context_takeover(backend: Backend) {
    let server = Server::start_with_config(backend, TAKEOVER, &[]);
    interop_python(&server, "interop.takeover", TAKEOVER_EXT).await;
}

// ---- compress_once: the /ws default ------------------------------------------------------------

/// With the defaults, a browser's offer on `/ws` is answered with `server_no_context_takeover`
/// (the shared compressed frame: byte-identical for every subscriber), while `/ws/echo` keeps
/// server context takeover.
async fn compress_once_is_the_ws_default(backend: Backend) {
    let server = Server::start_with_config(backend, DEFAULTS, &[]);
    let topic = "deflate.default";
    let mut subs = Vec::new();
    for name in ["browser1", "browser2"] {
        let mut c = DClient::open(&server, name, Some(OFFER)).await;
        assert_eq!(c.extensions(), Some(SHARED_EXT), "{name}");
        c.subscribe(topic).await;
        subs.push(c);
    }
    let (_, head) = RawWs::upgrade(
        server.tcp().await,
        "/ws/echo",
        &format!("Sec-WebSocket-Extensions: {OFFER}\r\n"),
    )
    .await;
    assert_eq!(head.header("sec-websocket-extensions"), Some(TAKEOVER_EXT));

    let sent = publish_range(&server, topic, 0..9).await;
    let mut got = Vec::new();
    for c in &mut subs {
        let g = c.room_messages(topic, sent.len()).await;
        check_content(c.name(), topic, &g, &sent);
        check_compression(c.name(), &g, Expect::FromThreshold);
        got.push(g);
    }
    for (a, b) in got[0].iter().zip(&got[1]) {
        assert_eq!(a.frame, b.frame, "seq {}: one shared frame", a.seq());
    }
}
