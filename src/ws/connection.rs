//! One WebSocket connection's protocol logic (RFC 6455), without I/O: bytes and time go in,
//! complete messages go to the endpoint's [`Handler`], and the frames to send collect in an
//! [`Outbox`] that the driver writes ([`super::session`] drives a connection over a stream).
//!
//! The connection answers pings, runs the close handshake and its timeout, pings on heartbeat
//! ticks and gives up on a silent peer, inflates and deflates messages (permessage-deflate),
//! and fails the connection with the right close code on bad input (1002, 1007, 1009).
//!
//! Input is unmasked and handed to the handler where it lies: the driver reads into a buffer
//! of its own (a per-shard scratch buffer), and only an incomplete frame at the end is copied
//! into the connection, so an idle connection holds no read buffer.

use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};

use super::close::CloseCode;
use super::deflate::{ConnDeflate, InflateError, Inflated, Params, Tuning};
use super::frame::OpCode;
use super::mailbox::{FrameForm, Mailbox, Outgoing};
use super::outbox::Outbox;
use super::reader::{Event, Flow, ReadError, Reader};

/// Stop taking input from a client while this much output waits for it (echo backpressure).
pub const HIGH_WATER: usize = 256 * 1024;
/// The smallest read into a held incomplete frame.
const MIN_READ: usize = 4096;
/// The most room made for an incomplete frame beyond what it holds: a header that announces a
/// large frame reserves nothing until the bytes arrive (room then grows at most twofold per
/// read), so clients cannot make the server commit memory with headers alone.
const MAX_AHEAD: usize = 64 * 1024;

/// Room to make for the rest of a `frame`-byte frame of which `held` bytes are here.
fn room_for(held: usize, frame: usize) -> usize {
    frame.saturating_sub(held).min(held.max(MAX_AHEAD))
}

/// A complete data message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message<'a> {
    /// Valid UTF-8.
    Text(&'a [u8]),
    Binary(&'a [u8]),
}

/// A request to close the connection with this code and reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Close {
    pub code: CloseCode,
    pub reason: &'static str,
}

/// What an endpoint does with a connection's messages.
pub trait Handler {
    /// The connection opens; a greeting goes to `out`.
    fn on_open(&mut self, _out: &mut ToClient<'_>) {}

    /// A complete message arrived; replies go to `out`. An `Err` closes the connection.
    fn on_message(&mut self, msg: Message<'_>, out: &mut ToClient<'_>) -> Result<(), Close>;

    /// Whether the handler takes more messages now. `Pending` stops reading from the client
    /// (TCP flow control then holds the client back) until the handler wakes `cx`'s waker and
    /// answers `Ready`: a handler forwarding to a slow upstream stops its input this way.
    ///
    /// Asked before each read, so the messages of a read already made (at most one read
    /// buffer's worth) are still delivered after a `Pending`. Pings and closes from the client
    /// wait with its input, and so does the heartbeat (a client that is not read is not
    /// silent); mail and output go on.
    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<()> {
        Poll::Ready(())
    }

    /// Messages from elsewhere (a relay's other side) to send now. Polled every turn while the
    /// output is under [`HIGH_WATER`]; the handler wakes `cx` when it has more. An `Err` closes
    /// the connection with that code.
    fn poll_produce(
        &mut self,
        _cx: &mut Context<'_>,
        _out: &mut ToClient<'_>,
    ) -> Result<(), Close> {
        Ok(())
    }

    /// The client sent a close frame (with its code, when it had one).
    fn on_close(&mut self, _code: Option<u16>) {}
}

/// Where a handler's messages go: the connection's outbox, compressed when negotiated.
pub struct ToClient<'a> {
    out: &'a mut Outbox,
    deflate: Option<&'a mut ConnDeflate>,
    /// The connection's count of data messages sent.
    sent: &'a mut u64,
}

impl ToClient<'_> {
    pub fn text(&mut self, payload: &[u8]) {
        self.send(OpCode::Text, payload)
    }

    pub fn binary(&mut self, payload: &[u8]) {
        self.send(OpCode::Binary, payload)
    }

    fn send(&mut self, opcode: OpCode, payload: &[u8]) {
        *self.sent += 1;
        match self.deflate.as_deref_mut() {
            Some(d) => d.frame(self.out, opcode, payload),
            None => self.out.frame(opcode, payload),
        }
    }

    /// Moves what `mailbox` holds into the outbox, in order.
    fn take_mail(&mut self, mailbox: &Mailbox) {
        let form = mailbox.frame_form();
        mailbox.drain(|item| match item {
            Outgoing::Broadcast(b) if form == FrameForm::OwnDeflate => {
                let opcode = if b.is_binary() {
                    OpCode::Binary
                } else {
                    OpCode::Text
                };
                self.send(opcode, b.payload())
            }
            Outgoing::Broadcast(b) => {
                *self.sent += 1;
                self.out.shared(b, form);
            }
            Outgoing::Text(t) => self.text(&t),
        });
    }
}

/// A connection's settings, taken from the config once per shard.
#[derive(Debug, Clone)]
pub struct Settings {
    pub max_message: usize,
    /// The period of the shard's heartbeat ticks (`None`: no heartbeats).
    pub heartbeat: Option<Duration>,
    pub close_timeout: Duration,
    pub compression: Tuning,
}

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Messages flow both ways.
    Open,
    /// Our close frame is queued and input is no longer read. Once the outbox is written the
    /// driver shuts the write side down ([`Connection::handle_write_shutdown`]).
    Closing,
    /// Write side shut: the driver reads and discards until the peer closes or the close
    /// timeout passes, so the kernel does not answer unread data with a reset that could
    /// destroy our close frame.
    Lingering,
    /// Over: the driver drops the connection.
    Closed,
}

/// Data messages counted so far (for metrics; pings, pongs and closes do not count).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub messages_in: u64,
    pub messages_out: u64,
}

/// Liveness, from the shard's heartbeat ticks.
#[derive(Debug, Default)]
struct Heartbeat {
    /// Input arrived since the last tick.
    heard: bool,
    silent_ticks: u8,
    /// Data messages in and out as of the last tick: memory is given back after a tick
    /// without data (pings and pongs do not count, or no live client would ever be idle).
    data_at_tick: u64,
}

/// One WebSocket connection's protocol state; see the module documentation.
pub struct Connection<'a, H> {
    handler: H,
    settings: &'a Settings,
    /// What the rest of the shard sends this connection.
    mailbox: &'a Mailbox,
    reader: Reader,
    /// Boxed: a plain connection does not carry a compressor's size.
    deflate: Option<Box<ConnDeflate>>,
    /// An incomplete frame (or frames) carried over between reads.
    partial: BytesMut,
    /// Total size of the frame at the front of `partial`, when known.
    partial_frame: usize,
    out: Outbox,
    state: State,
    /// When a closing connection is given up.
    close_deadline: Option<Instant>,
    /// The close code we sent.
    close_code: Option<u16>,
    heartbeat: Heartbeat,
    stats: Stats,
}

impl<'a, H: Handler> Connection<'a, H> {
    /// Opens a connection with the permessage-deflate parameters `deflate`, if negotiated; the
    /// handler's greeting is queued at once.
    pub fn new(
        handler: H,
        deflate: Option<Params>,
        settings: &'a Settings,
        mailbox: &'a Mailbox,
    ) -> Self {
        mailbox.set_frame_form(match &deflate {
            None => FrameForm::Plain,
            Some(p) if p.server_no_context_takeover && p.server_max_window_bits == 15 => {
                FrameForm::SharedDeflate
            }
            Some(_) => FrameForm::OwnDeflate,
        });
        let mut c = Connection {
            handler,
            settings,
            mailbox,
            reader: match deflate {
                Some(_) => Reader::with_deflate(settings.max_message),
                None => Reader::new(settings.max_message),
            },
            deflate: deflate.map(|p| Box::new(ConnDeflate::new(p, settings.compression))),
            partial: BytesMut::new(),
            partial_frame: 0,
            out: Outbox::default(),
            state: State::Open,
            close_deadline: None,
            close_code: None,
            heartbeat: Heartbeat::default(),
            stats: Stats::default(),
        };
        c.handler.on_open(&mut ToClient {
            out: &mut c.out,
            deflate: c.deflate.as_deref_mut(),
            sent: &mut c.stats.messages_out,
        });
        c
    }

    pub fn state(&self) -> State {
        self.state
    }

    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// The close code we sent once closing began (1005: we echoed a close without a code).
    pub fn close_code(&self) -> Option<u16> {
        self.close_code
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    pub fn handler_mut(&mut self) -> &mut H {
        &mut self.handler
    }

    /// What waits to be written: the driver writes from its front.
    pub fn outbox(&mut self) -> &mut Outbox {
        &mut self.out
    }

    /// Whether the driver should read input now: the connection is open and its output is
    /// under [`HIGH_WATER`] (a client that does not read what it is sent is not read either).
    pub fn wants_input(&self) -> bool {
        self.state == State::Open && self.out.queued() < HIGH_WATER
    }

    /// Takes bytes read into a buffer of the driver's: whole frames are handled where they
    /// lie (unmasked in place), an incomplete one at the end is copied to wait for the rest.
    pub fn handle_input(&mut self, bytes: &mut [u8], now: Instant) {
        if self.state != State::Open {
            return;
        }
        if !self.partial.is_empty() {
            self.partial.extend_from_slice(bytes);
            return self.handle_buffered_input(now);
        }
        self.heartbeat.heard = true;
        let (consumed, next) = self.process(bytes, now);
        if self.state == State::Open && consumed < bytes.len() {
            let tail = bytes.len() - consumed;
            self.partial.reserve(tail + room_for(tail, next));
            self.partial.extend_from_slice(&bytes[consumed..]);
            self.partial_frame = next;
        }
    }

    /// The incomplete frame held between reads, with room reserved for the rest of it, and how
    /// many bytes to read into its spare capacity; the driver reads straight into it (no copy
    /// through its own buffer), then calls [`handle_buffered_input`](Self::handle_buffered_input).
    /// `None`: no frame is incomplete, read into the driver's buffer and call
    /// [`handle_input`](Self::handle_input).
    ///
    /// Reading into spare capacity, not a zero-filled tail: zero-filling the rest of the frame
    /// before every read costs O(frame²/read size), ~2 GiB of memset for a 16 MiB frame
    /// arriving in 64 KiB reads.
    pub fn input_buffer(&mut self) -> Option<(&mut BytesMut, usize)> {
        if self.partial.is_empty() {
            return None;
        }
        let want = room_for(self.partial.len(), self.partial_frame).max(MIN_READ);
        self.partial.reserve(want);
        Some((&mut self.partial, want))
    }

    /// Handles what the driver appended to [`input_buffer`](Self::input_buffer).
    pub fn handle_buffered_input(&mut self, now: Instant) {
        if self.state != State::Open {
            return;
        }
        self.heartbeat.heard = true;
        let mut partial = std::mem::take(&mut self.partial);
        let (consumed, next) = self.process(&mut partial, now);
        partial.advance(consumed);
        if self.state == State::Open && !partial.is_empty() {
            self.partial = partial;
            self.partial_frame = next;
        }
    }

    /// Lets the handler queue what it has from elsewhere ([`Handler::poll_produce`]), while
    /// the output has room.
    pub fn handle_produce(&mut self, cx: &mut Context<'_>, now: Instant) {
        if self.state != State::Open || self.out.queued() >= HIGH_WATER {
            return;
        }
        let res = self.handler.poll_produce(
            cx,
            &mut ToClient {
                out: &mut self.out,
                deflate: self.deflate.as_deref_mut(),
                sent: &mut self.stats.messages_out,
            },
        );
        if let Err(c) = res {
            self.close(c, now);
        }
    }

    /// Moves what the rest of the shard sent into the outbox (unless a write delay holds it).
    pub fn handle_mail(&mut self) {
        if self.state != State::Open || !self.mailbox.has_mail() {
            return;
        }
        ToClient {
            out: &mut self.out,
            deflate: self.deflate.as_deref_mut(),
            sent: &mut self.stats.messages_out,
        }
        .take_mail(self.mailbox);
    }

    /// A heartbeat period is over (the shard's ticker marked the connection): pings, gives back
    /// idle memory, and closes with 1001 when the peer stayed silent.
    pub fn handle_heartbeat(&mut self, now: Instant) {
        if self.state != State::Open {
            return;
        }
        let hb = &mut self.heartbeat;
        if std::mem::take(&mut hb.heard) {
            hb.silent_ticks = 0;
        } else {
            hb.silent_ticks += 1;
        }
        let data = self.stats.messages_in + self.stats.messages_out;
        if std::mem::replace(&mut hb.data_at_tick, data) == data {
            // No data since the last tick: give back buffer and compressor memory.
            self.out.shrink();
            self.mailbox.shrink();
            if let Some(d) = self.deflate.as_mut() {
                d.shrink_idle();
            }
            if self.partial.is_empty() {
                self.partial = BytesMut::new();
            }
        }
        // Ticks are shared by the whole shard, so the first silent tick may come right after
        // the last input: three silent ticks mean at least two full periods of silence.
        if self.heartbeat.silent_ticks >= 3 {
            self.send_close(CloseCode::GOING_AWAY, "heartbeat timeout", now);
        } else {
            self.out.frame(OpCode::Ping, b"");
        }
    }

    /// Starts the close handshake (a request from the shard: shutdown, slow consumer).
    pub fn close(&mut self, close: Close, now: Instant) {
        if self.state != State::Open {
            return;
        }
        if close.code == CloseCode::TRY_AGAIN_LATER {
            // A slow consumer: what it has not started to receive is dropped.
            self.out.discard_unsent();
            self.mailbox.clear();
        }
        self.send_close(close.code, close.reason, now);
    }

    /// Whether the write side should be shut now: closing, and everything queued is taken.
    pub fn wants_write_shutdown(&self) -> bool {
        self.state == State::Closing && self.out.is_empty()
    }

    /// The driver shut the write side down (after our close frame).
    pub fn handle_write_shutdown(&mut self) {
        if self.state == State::Closing {
            self.state = State::Lingering;
        }
    }

    /// The transport is gone: the peer closed it (without a close frame, when open) or it
    /// failed.
    pub fn handle_transport_closed(&mut self) {
        self.state = State::Closed;
    }

    /// When [`handle_timeout`](Self::handle_timeout) is due next: the close timeout, while
    /// closing.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.close_deadline
            .filter(|_| matches!(self.state, State::Closing | State::Lingering))
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if self.poll_timeout().is_some_and(|t| t <= now) {
            self.state = State::Closed;
        }
    }

    /// Queues a close frame and starts the closing handshake.
    fn send_close(&mut self, code: CloseCode, reason: &str, now: Instant) {
        self.out.close(code, reason);
        self.begin_closing(code.0, now);
    }

    /// Stops reading; the outbox is written and the write side shut within `close_timeout`.
    fn begin_closing(&mut self, code: u16, now: Instant) {
        self.close_code = Some(code);
        self.state = State::Closing;
        self.close_deadline = Some(now + self.settings.close_timeout);
        self.partial = BytesMut::new();
    }

    /// Feeds bytes to the frame reader; returns (bytes consumed, size of the next frame if
    /// known).
    fn process(&mut self, buf: &mut [u8], now: Instant) -> (usize, usize) {
        let Connection {
            reader,
            deflate,
            out,
            handler,
            stats,
            mailbox,
            settings,
            ..
        } = self;
        let mut close: Option<Close> = None;
        let mut peer_close: Option<Option<u16>> = None;
        let mut deliver =
            |msg: Message<'_>, out: &mut Outbox, deflate: &mut Option<Box<ConnDeflate>>| {
                stats.messages_in += 1;
                let mut sink = ToClient {
                    out,
                    deflate: deflate.as_deref_mut(),
                    sent: &mut stats.messages_out,
                };
                let res = handler.on_message(msg, &mut sink);
                // What the handler sent through the shard (e.g. a reply from a room homed
                // here) goes out in order with what it wrote directly.
                if mailbox.has_mail() {
                    sink.take_mail(mailbox);
                }
                res
            };
        let fed = reader.feed(buf, |ev| {
            let res = match ev {
                Event::Text(t) => deliver(Message::Text(t), out, deflate),
                Event::Binary(b) => deliver(Message::Binary(b), out, deflate),
                Event::Compressed { text, data } => {
                    match inflate(deflate, data, text, settings.max_message) {
                        Ok(plain) if text => deliver(Message::Text(&plain), out, deflate),
                        Ok(plain) => deliver(Message::Binary(&plain), out, deflate),
                        Err(c) => Err(c),
                    }
                }
                Event::Ping(p) => {
                    out.frame(OpCode::Pong, p);
                    Ok(())
                }
                Event::Pong(_) => Ok(()),
                Event::Close(c) => {
                    peer_close = Some(c.map(|(code, _)| code));
                    return Flow::Stop;
                }
            };
            match res {
                Ok(()) => Flow::Continue,
                Err(c) => {
                    close = Some(c);
                    Flow::Stop
                }
            }
        });
        match fed {
            Ok(fed) => {
                if let Some(c) = close {
                    self.send_close(c.code, c.reason, now);
                } else if let Some(code) = peer_close {
                    self.handler.on_close(code);
                    // Echo the peer's code (RFC 6455 §5.5.1); an empty close gets an empty one.
                    match code {
                        Some(c) => self.send_close(CloseCode(c), "", now),
                        None => {
                            self.out.frame(OpCode::Close, &[]);
                            self.begin_closing(1005, now);
                        }
                    }
                }
                (fed.consumed, fed.next_frame_len)
            }
            Err(e) => {
                tracing::debug!(error = %e, "failing connection");
                let reason = match e {
                    ReadError::Protocol(r) => r,
                    ReadError::InvalidUtf8 => "invalid UTF-8",
                    ReadError::TooBig(_) => "message too big",
                };
                self.send_close(e.close_code(), reason, now);
                (buf.len(), 0)
            }
        }
    }
}

/// Inflates a compressed message; text must be UTF-8 once inflated.
fn inflate(
    deflate: &mut Option<Box<ConnDeflate>>,
    data: &[u8],
    text: bool,
    limit: usize,
) -> Result<Inflated, Close> {
    // The reader only reports compressed messages when deflate was negotiated.
    let Some(d) = deflate.as_mut() else {
        return Err(Close {
            code: CloseCode::PROTOCOL,
            reason: "compressed message without permessage-deflate",
        });
    };
    let plain = d.inflate(data, limit).map_err(|e| match e {
        InflateError::TooBig(_) => Close {
            code: CloseCode::TOO_BIG,
            reason: "message too big",
        },
        InflateError::Corrupt => Close {
            code: CloseCode::INVALID_DATA,
            reason: "invalid compressed data",
        },
    })?;
    if text && simdutf8::basic::from_utf8(&plain).is_err() {
        return Err(Close {
            code: CloseCode::INVALID_DATA,
            reason: "invalid UTF-8",
        });
    }
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::deflate::{negotiate, Deflater, Inflater, Policy};
    use crate::ws::frame::{parse_header, write_masked_frame};
    use crate::ws::mailbox::Outgoing;
    use bytes::Bytes;

    /// Records every message and sends it back.
    #[derive(Default)]
    struct Echo {
        got: Vec<(bool, Vec<u8>)>,
    }

    impl Handler for Echo {
        fn on_message(&mut self, msg: Message<'_>, out: &mut ToClient<'_>) -> Result<(), Close> {
            match msg {
                Message::Text(t) => {
                    self.got.push((true, t.to_vec()));
                    out.text(t)
                }
                Message::Binary(b) => {
                    self.got.push((false, b.to_vec()));
                    out.binary(b)
                }
            }
            Ok(())
        }
    }

    fn settings(max_message: usize) -> Settings {
        Settings {
            max_message,
            heartbeat: Some(Duration::from_secs(30)),
            close_timeout: Duration::from_secs(1),
            compression: Tuning {
                level: 1,
                threshold: 0,
            },
        }
    }

    fn frame(fin: bool, op: OpCode, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        write_masked_frame(&mut v, fin, op, [0x37, 0xfa, 0x21, 0x3d], payload);
        v
    }

    fn close_body(code: u16, reason: &str) -> Vec<u8> {
        let mut b = code.to_be_bytes().to_vec();
        b.extend_from_slice(reason.as_bytes());
        b
    }

    /// Feeds `bytes` in reads of `chunk` bytes, the way the session does: into a buffer of
    /// its own, or straight into the held incomplete frame.
    fn feed(c: &mut Connection<'_, Echo>, bytes: &[u8], chunk: usize, now: Instant) {
        let mut rest = bytes;
        while !rest.is_empty() && c.wants_input() {
            match c.input_buffer() {
                Some((buf, want)) => {
                    let n = want.min(chunk).min(rest.len());
                    buf.extend_from_slice(&rest[..n]);
                    rest = &rest[n..];
                    c.handle_buffered_input(now);
                }
                None => {
                    let n = chunk.min(rest.len());
                    let mut scratch = rest[..n].to_vec();
                    rest = &rest[n..];
                    c.handle_input(&mut scratch, now);
                }
            }
        }
    }

    /// Takes what the connection queued, as (first header byte, payload) per frame.
    fn sent(c: &mut Connection<'_, Echo>) -> Vec<(u8, Vec<u8>)> {
        let out = c.outbox();
        let bytes: Vec<u8> = out.with_slices(|s| s.iter().flat_map(|s| s.to_vec()).collect());
        out.advance(bytes.len());
        let mut frames = Vec::new();
        let mut pos = 0;
        while pos < bytes.len() {
            let h = parse_header(&bytes[pos..]).unwrap().unwrap();
            let end = pos + h.header_len + h.payload_len as usize;
            frames.push((bytes[pos], bytes[pos + h.header_len..end].to_vec()));
            pos = end;
        }
        frames
    }

    const TEXT: u8 = 0x81;
    const BINARY: u8 = 0x82;
    const CLOSE: u8 = 0x88;
    const PING: u8 = 0x89;
    const PONG: u8 = 0x8a;

    #[test]
    fn fragments_with_control_frames_in_between_make_one_message() {
        let (s, m, t0) = (settings(1 << 20), Mailbox::default(), Instant::now());
        let mut input = frame(false, OpCode::Text, b"ab");
        input.extend(frame(true, OpCode::Ping, b"x"));
        input.extend(frame(false, OpCode::Continuation, b"cd"));
        input.extend(frame(true, OpCode::Pong, b"y"));
        input.extend(frame(true, OpCode::Continuation, b"e"));
        input.extend(frame(true, OpCode::Binary, &[0, 1, 2]));
        for chunk in [1, 3, 7, input.len()] {
            let mut c = Connection::new(Echo::default(), None, &s, &m);
            feed(&mut c, &input, chunk, t0);
            assert_eq!(
                c.handler_mut().got,
                vec![(true, b"abcde".to_vec()), (false, vec![0, 1, 2])],
                "reads of {chunk}"
            );
            assert_eq!(
                sent(&mut c),
                vec![
                    (PONG, b"x".to_vec()),
                    (TEXT, b"abcde".to_vec()),
                    (BINARY, vec![0, 1, 2])
                ],
                "reads of {chunk}"
            );
            assert_eq!(c.stats().messages_in, 2);
            assert_eq!(c.stats().messages_out, 2);
            assert!(
                c.input_buffer().is_none(),
                "nothing held once all is handled"
            );
        }
    }

    #[test]
    fn a_ping_gets_a_pong_with_its_payload() {
        let (s, m, t0) = (settings(1 << 20), Mailbox::default(), Instant::now());
        let mut c = Connection::new(Echo::default(), None, &s, &m);
        feed(&mut c, &frame(true, OpCode::Ping, b"are you there"), 64, t0);
        assert_eq!(sent(&mut c), vec![(PONG, b"are you there".to_vec())]);
        assert_eq!(
            c.stats(),
            Stats::default(),
            "control frames are not messages"
        );
        assert_eq!(c.state(), State::Open);
    }

    #[test]
    fn a_client_close_is_echoed_and_the_connection_closes() {
        let (s, m, t0) = (settings(1 << 20), Mailbox::default(), Instant::now());
        let mut c = Connection::new(Echo::default(), None, &s, &m);
        let mut input = frame(true, OpCode::Close, &close_body(4000, "bye"));
        input.extend(frame(true, OpCode::Text, b"after the close"));
        feed(&mut c, &input, 64, t0);
        assert_eq!(c.state(), State::Closing);
        assert_eq!(c.close_code(), Some(4000));
        assert!(
            c.handler_mut().got.is_empty(),
            "nothing is read after a close"
        );
        assert!(!c.wants_input());
        assert!(
            !c.wants_write_shutdown(),
            "the close frame is not written yet"
        );
        assert_eq!(sent(&mut c), vec![(CLOSE, 4000u16.to_be_bytes().to_vec())]);
        assert!(c.wants_write_shutdown());
        c.handle_write_shutdown();
        assert_eq!(c.state(), State::Lingering);
        assert_eq!(c.poll_timeout(), Some(t0 + s.close_timeout));
        c.handle_transport_closed();
        assert!(c.is_closed());

        // An empty close gets an empty one.
        let mut c = Connection::new(Echo::default(), None, &s, &m);
        feed(&mut c, &frame(true, OpCode::Close, b""), 64, t0);
        assert_eq!(sent(&mut c), vec![(CLOSE, vec![])]);
        assert_eq!(c.close_code(), Some(1005));
    }

    #[test]
    fn a_server_close_waits_for_the_peer_until_the_close_timeout() {
        let (s, m, t0) = (settings(1 << 20), Mailbox::default(), Instant::now());
        let mut c = Connection::new(Echo::default(), None, &s, &m);
        assert_eq!(c.poll_timeout(), None, "an open connection has no timer");
        let t1 = t0 + Duration::from_secs(5);
        c.close(
            Close {
                code: CloseCode::GOING_AWAY,
                reason: "server shutting down",
            },
            t1,
        );
        assert_eq!(c.state(), State::Closing);
        assert_eq!(
            sent(&mut c),
            vec![(CLOSE, close_body(1001, "server shutting down"))]
        );
        c.handle_write_shutdown();
        let deadline = t1 + s.close_timeout;
        assert_eq!(c.poll_timeout(), Some(deadline));
        c.handle_timeout(deadline - Duration::from_millis(1));
        assert_eq!(c.state(), State::Lingering);
        c.handle_timeout(deadline);
        assert!(c.is_closed());
        assert_eq!(c.close_code(), Some(1001));
    }

    #[test]
    fn a_slow_consumer_close_drops_what_was_not_started() {
        let (s, m, t0) = (settings(1 << 20), Mailbox::default(), Instant::now());
        let mut c = Connection::new(Echo::default(), None, &s, &m);
        feed(&mut c, &frame(true, OpCode::Text, b"unsent reply"), 64, t0);
        m.push(Outgoing::Text(Bytes::from_static(b"queued")), 1 << 20)
            .unwrap();
        c.close(crate::ws::handle::SLOW_CONSUMER, t0);
        assert!(m.is_empty());
        assert_eq!(
            sent(&mut c),
            vec![(
                CLOSE,
                close_body(1013, "slow consumer: outbound queue full")
            )]
        );
    }

    #[test]
    fn a_silent_peer_is_closed_after_two_heartbeat_periods() {
        let (s, m, t0) = (settings(1 << 20), Mailbox::default(), Instant::now());
        let period = s.heartbeat.unwrap();
        let mut c = Connection::new(Echo::default(), None, &s, &m);
        feed(&mut c, &frame(true, OpCode::Pong, b""), 64, t0);
        // The first tick may come right after the last input: it does not count as silence.
        for tick in 1..=3 {
            c.handle_heartbeat(t0 + period * tick);
            assert_eq!(sent(&mut c), vec![(PING, vec![])], "tick {tick}");
        }
        c.handle_heartbeat(t0 + period * 4);
        assert_eq!(c.state(), State::Closing);
        assert_eq!(
            sent(&mut c),
            vec![(CLOSE, close_body(1001, "heartbeat timeout"))]
        );
        assert_eq!(c.poll_timeout(), Some(t0 + period * 4 + s.close_timeout));

        // Any input in between keeps the connection open.
        let mut c = Connection::new(Echo::default(), None, &s, &m);
        for tick in 1..=10 {
            c.handle_heartbeat(t0 + period * tick);
            feed(
                &mut c,
                &frame(true, OpCode::Pong, b""),
                64,
                t0 + period * tick,
            );
        }
        assert_eq!(c.state(), State::Open);
    }

    #[test]
    fn an_oversized_message_is_refused_from_its_header_with_1009() {
        let (s, m, t0) = (settings(200), Mailbox::default(), Instant::now());
        let mut c = Connection::new(Echo::default(), None, &s, &m);
        let big = frame(true, OpCode::Binary, &[7; 1000]);
        let mut header = big[..8].to_vec();
        c.handle_input(&mut header, t0);
        assert_eq!(c.state(), State::Closing);
        assert_eq!(
            sent(&mut c),
            vec![(CLOSE, close_body(1009, "message too big"))]
        );
        assert!(c.input_buffer().is_none(), "no room was made for the frame");

        // Fragments count together.
        let mut c = Connection::new(Echo::default(), None, &s, &m);
        let mut input = frame(false, OpCode::Binary, &[1; 150]);
        input.extend(frame(true, OpCode::Continuation, &[2; 51]));
        feed(&mut c, &input, 1000, t0);
        assert_eq!(c.close_code(), Some(1009));
        assert!(c.handler_mut().got.is_empty());
    }

    #[test]
    fn a_large_frame_gets_room_only_as_its_bytes_arrive() {
        let (s, m, t0) = (settings(16 << 20), Mailbox::default(), Instant::now());
        let mut c = Connection::new(Echo::default(), None, &s, &m);
        let payload = vec![9u8; 8 << 20];
        let whole = frame(true, OpCode::Binary, &payload);
        // The header and a few bytes announce 8 MiB: far less is reserved.
        let mut start = whole[..100].to_vec();
        c.handle_input(&mut start, t0);
        let (buf, want) = c.input_buffer().expect("an incomplete frame is held");
        assert!(
            buf.capacity() <= 2 * MAX_AHEAD,
            "{} reserved",
            buf.capacity()
        );
        assert!(want <= MAX_AHEAD);
        // Fed in 64 KiB reads, the message still arrives whole.
        let mut c = Connection::new(Echo::default(), None, &s, &m);
        feed(&mut c, &whole, 64 * 1024, t0);
        assert_eq!(c.handler_mut().got, vec![(false, payload)]);
    }

    #[test]
    fn invalid_utf8_across_fragments_fails_with_1007() {
        let (s, m, t0) = (settings(1 << 20), Mailbox::default(), Instant::now());
        let euro = "€".as_bytes();
        // Split inside a code point: fine.
        let mut c = Connection::new(Echo::default(), None, &s, &m);
        let mut input = frame(false, OpCode::Text, &euro[..2]);
        input.extend(frame(true, OpCode::Continuation, &euro[2..]));
        feed(&mut c, &input, 5, t0);
        assert_eq!(c.handler_mut().got, vec![(true, euro.to_vec())]);

        // A code point that can no longer be completed fails before the last fragment.
        let mut c = Connection::new(Echo::default(), None, &s, &m);
        let mut input = frame(false, OpCode::Text, &euro[..2]);
        input.extend(frame(false, OpCode::Continuation, b"("));
        feed(&mut c, &input, 5, t0);
        assert_eq!(c.state(), State::Closing);
        assert_eq!(
            sent(&mut c),
            vec![(CLOSE, close_body(1007, "invalid UTF-8"))]
        );
        assert!(c.handler_mut().got.is_empty());
    }

    #[test]
    fn a_protocol_violation_fails_with_1002() {
        let (s, m, t0) = (settings(1 << 20), Mailbox::default(), Instant::now());
        let mut c = Connection::new(Echo::default(), None, &s, &m);
        let mut unmasked = vec![0x81, 0x01, b'a'];
        c.handle_input(&mut unmasked, t0);
        assert_eq!(
            sent(&mut c),
            vec![(CLOSE, close_body(1002, "client frame not masked"))]
        );
    }

    #[test]
    fn deflate_messages_are_inflated_and_replies_deflated() {
        let (s, m, t0) = (settings(1 << 20), Mailbox::default(), Instant::now());
        let params = negotiate(["permessage-deflate"], &Policy::default()).unwrap();
        let mut c = Connection::new(Echo::default(), Some(params), &s, &m);
        assert_eq!(m.frame_form(), FrameForm::OwnDeflate);
        let text = b"compressible compressible compressible compressible";
        let mut client = Deflater::new(6, 15, !params.client_no_context_takeover);
        let mut input = Vec::new();
        for _ in 0..2 {
            let mut z = Vec::new();
            client.compress(text, &mut z);
            let mut f = frame(true, OpCode::Text, &z);
            f[0] |= 0x40; // RSV1: compressed
            input.extend(f);
        }
        feed(&mut c, &input, 9, t0);
        assert_eq!(c.handler_mut().got, vec![(true, text.to_vec()); 2]);
        let mut inflater = Inflater::new(!params.server_no_context_takeover);
        for (first, z) in sent(&mut c) {
            assert_eq!(first, TEXT | 0x40, "the reply is compressed");
            let mut plain = Vec::new();
            inflater.inflate(&z, 1 << 20, &mut plain).unwrap();
            assert_eq!(plain, text);
        }

        // Data that does not inflate is invalid data.
        let mut f = frame(true, OpCode::Binary, &[0xff; 16]);
        f[0] |= 0x40;
        feed(&mut c, &f, 64, t0);
        assert_eq!(
            sent(&mut c),
            vec![(CLOSE, close_body(1007, "invalid compressed data"))]
        );
    }

    #[test]
    fn broadcasts_keep_their_opcode_when_compressed_with_the_connections_own_context() {
        let (s, m, _) = (settings(1 << 20), Mailbox::default(), Instant::now());
        let params = negotiate(["permessage-deflate"], &Policy::default()).unwrap();
        let mut c = Connection::new(Echo::default(), Some(params), &s, &m);
        let payload = vec![0xfe; 512];
        for opcode in [OpCode::Binary, OpCode::Text] {
            let mut f = Vec::new();
            crate::ws::frame::write_frame(&mut f, opcode, &payload);
            let b = std::rc::Rc::new(crate::ws::mailbox::Broadcast {
                frame: Bytes::from(f),
                deflated: None,
            });
            m.push_broadcast(&b, None, 1 << 20).unwrap();
        }
        c.handle_mail();
        let mut inflater = Inflater::new(!params.server_no_context_takeover);
        let got: Vec<(u8, Vec<u8>)> = sent(&mut c)
            .into_iter()
            .map(|(first, z)| {
                let mut plain = Vec::new();
                inflater.inflate(&z, 1 << 20, &mut plain).unwrap();
                (first, plain)
            })
            .collect();
        assert_eq!(
            got,
            [(BINARY | 0x40, payload.clone()), (TEXT | 0x40, payload)]
        );
    }

    #[test]
    fn mail_goes_out_in_order_with_replies() {
        let (s, m, t0) = (settings(1 << 20), Mailbox::default(), Instant::now());
        let mut c = Connection::new(Echo::default(), None, &s, &m);
        m.push(Outgoing::Text(Bytes::from_static(b"first")), 1 << 20)
            .unwrap();
        c.handle_mail();
        feed(&mut c, &frame(true, OpCode::Text, b"second"), 64, t0);
        m.push(Outgoing::Text(Bytes::from_static(b"third")), 1 << 20)
            .unwrap();
        m.hold();
        c.handle_mail();
        assert_eq!(
            sent(&mut c),
            vec![(TEXT, b"first".to_vec()), (TEXT, b"second".to_vec())],
            "held mail waits"
        );
        m.release();
        c.handle_mail();
        assert_eq!(sent(&mut c), vec![(TEXT, b"third".to_vec())]);
        assert_eq!(c.stats().messages_out, 3);
    }

    #[test]
    fn input_stops_while_output_is_over_the_high_water_mark() {
        let (s, m, t0) = (settings(1 << 20), Mailbox::default(), Instant::now());
        let mut c = Connection::new(Echo::default(), None, &s, &m);
        feed(
            &mut c,
            &frame(true, OpCode::Binary, &vec![0; HIGH_WATER]),
            1 << 16,
            t0,
        );
        assert!(!c.wants_input());
        sent(&mut c);
        assert!(c.wants_input());
    }
}
