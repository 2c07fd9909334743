//! The server side of TLS on rustls' unbuffered API: records are decrypted from, and encrypted
//! into, buffers of the shard (one pair per thread), so an idle connection holds no TLS buffer.
//!
//! rustls' buffered `ServerConnection` keeps a receive buffer of at least 4 KiB for the
//! connection's life once it has read, and queues outgoing records in buffers of its own. Here
//! a connection owns only what is in transit between two calls: the start of a record not yet
//! complete, plaintext its reader had no room for, and TLS bytes the socket did not take. Each
//! is empty (no allocation) while the connection is idle.
//!
//! Reading: the carried partial record and what the socket has go into the shard's input
//! buffer, rustls decrypts the complete records, the plaintext goes to the caller's buffer and
//! what did not fit to the connection's own, and the incomplete tail is carried. Writing: the
//! plaintext is sealed into the shard's output buffer and written from there; only what the
//! socket does not take (epoll, a full socket buffer) is copied into the connection.

use std::cell::RefCell;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::Stream;
use crate::ws::outbox::Outbox;

/// The shard's input buffer: what one read takes from the socket, plus the carried start of a
/// record. A handshake message may span records up to rustls' own limit of 64 KiB.
const INPUT: usize = 80 * 1024;
/// Plaintext sealed per write: four full records.
const MAX_WRITE: usize = 4 * 16 * 1024;
/// Room for the records' headers, tags and padding around `MAX_WRITE` bytes.
const SEAL_OVERHEAD: usize = 4 * 256;
/// The least a read asks the socket for, however small the caller's buffer: a full record.
const MIN_READ: usize = 16 * 1024 + 256;

struct WriteScratch {
    /// Vectored writes are gathered here, so that they become as few records as one write.
    plain: Box<[u8]>,
    tls: Box<[u8]>,
}

thread_local! {
    static INPUT_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; INPUT].into_boxed_slice());
    static WRITE_BUF: RefCell<WriteScratch> = RefCell::new(WriteScratch {
        plain: vec![0; MAX_WRITE].into_boxed_slice(),
        tls: vec![0; MAX_WRITE + SEAL_OVERHEAD].into_boxed_slice(),
    });
}

/// An accepted TLS connection (see the module docs).
pub(super) struct ServerTls {
    io: Stream,
    conn: UnbufferedServerConnection,
    /// The start of a record not complete yet (rustls' discard rule: bytes it has not told us
    /// to discard are passed again, with what follows them).
    incoming: Vec<u8>,
    /// Plaintext decrypted that the reader had no room for; `plain_at` bytes of it are read.
    plain: Vec<u8>,
    plain_at: usize,
    /// TLS bytes the socket has not taken yet; they go before anything sealed later.
    outgoing: Vec<u8>,
    out_at: usize,
    server_name: Option<Box<str>>,
    /// The peer sent close_notify: the end of the stream.
    read_closed: bool,
    close_notify_sent: bool,
}

/// Where a run of the connection stopped.
enum Stop {
    /// It needs more input (or, after the handshake, it is idle and may write: `sealed` holds
    /// what was sealed into the output given).
    Idle { sealed: usize },
    /// Both sides sent close_notify.
    Closed,
}

/// What to seal when the connection can write.
enum Seal<'a> {
    Nothing,
    Data(&'a [u8], &'a mut [u8]),
    CloseNotify(&'a mut [u8]),
}

fn tls_error(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

/// Appends the handshake record `e` holds to `out`.
fn encode(
    e: &mut rustls::unbuffered::EncodeTlsData<'_, rustls::server::ServerConnectionData>,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let at = out.len();
    let mut need = 512;
    loop {
        out.resize(at + need, 0);
        match e.encode(&mut out[at..]) {
            Ok(n) => {
                out.truncate(at + n);
                return Ok(());
            }
            Err(EncodeError::InsufficientSize(s)) if s.required_size > need => {
                need = s.required_size
            }
            Err(e) => {
                out.truncate(at);
                return Err(tls_error(e));
            }
        }
    }
}

impl ServerTls {
    /// Runs the server side of a TLS handshake on `io` with `config`; the caller bounds it
    /// with its handshake timeout.
    pub(super) async fn accept(io: Stream, config: Arc<rustls::ServerConfig>) -> io::Result<Self> {
        let conn = UnbufferedServerConnection::new(config).map_err(tls_error)?;
        let mut tls = ServerTls {
            io,
            conn,
            incoming: Vec::new(),
            plain: Vec::new(),
            plain_at: 0,
            outgoing: Vec::new(),
            out_at: 0,
            server_name: None,
            read_closed: false,
            close_notify_sent: false,
        };
        std::future::poll_fn(|cx| tls.poll_handshake(cx)).await?;
        Ok(tls)
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.poll_send_outgoing(cx))?;
            if !self.conn.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            if self.read_closed {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "tls handshake eof",
                )));
            }
            // Application data that came with the client's last flight is kept for the reader.
            ready!(self.poll_receive(cx, None))?;
        }
    }

    /// Bytes of buffer the connection holds (capacity): none while idle.
    #[cfg(test)]
    pub(super) fn held(&self) -> usize {
        self.incoming.capacity() + self.plain.capacity() + self.outgoing.capacity()
    }

    pub(super) fn alpn_protocol(&self) -> Option<&[u8]> {
        self.conn.alpn_protocol()
    }

    pub(super) fn server_name(&self) -> Option<&str> {
        self.server_name.as_deref()
    }

    /// Runs the connection over `input` until it needs more input or may write, sealing
    /// `seal` then. Plaintext goes to `sink`; handshake records to `outgoing`. Returns the
    /// bytes of `input` that are done with (the rest is to be passed again) and where it
    /// stopped.
    #[allow(clippy::too_many_arguments)]
    fn run(
        conn: &mut UnbufferedServerConnection,
        outgoing: &mut Vec<u8>,
        server_name: &mut Option<Box<str>>,
        read_closed: &mut bool,
        input: &mut [u8],
        sink: &mut dyn FnMut(&[u8]),
        mut seal: Seal<'_>,
    ) -> io::Result<(usize, Stop)> {
        let mut done = 0;
        loop {
            let handshaking = conn.is_handshaking();
            if handshaking {
                // Nothing recorded outside this connection's calls counts.
                super::tls::take_server_name();
            }
            let status = conn.process_tls_records(&mut input[done..]);
            if handshaking {
                // The certificate resolver ran inside that call if the ClientHello was in it.
                if let Some(name) = super::tls::take_server_name() {
                    *server_name = Some(name);
                }
            }
            let mut discard = status.discard;
            let state = match status.state {
                Ok(s) => s,
                Err(e) => return Err(tls_error(e)),
            };
            let stop = match state {
                ConnectionState::ReadTraffic(mut r) => {
                    while let Some(record) = r.next_record() {
                        let record = record.map_err(tls_error)?;
                        discard += record.discard;
                        sink(record.payload);
                    }
                    None
                }
                ConnectionState::EncodeTlsData(mut e) => {
                    encode(&mut e, outgoing)?;
                    None
                }
                // The records are in `outgoing`, which is sent before anything sealed later.
                ConnectionState::TransmitTlsData(t) => {
                    t.done();
                    None
                }
                ConnectionState::PeerClosed => {
                    *read_closed = true;
                    None
                }
                ConnectionState::Closed => Some(Stop::Closed),
                ConnectionState::BlockedHandshake => Some(Stop::Idle { sealed: 0 }),
                ConnectionState::WriteTraffic(mut w) => {
                    let sealed = match std::mem::replace(&mut seal, Seal::Nothing) {
                        Seal::Nothing => Ok(0),
                        Seal::Data(plain, out) => w.encrypt(plain, out),
                        Seal::CloseNotify(out) => w.queue_close_notify(out),
                    };
                    let sealed = sealed.map_err(|e| match e {
                        EncryptError::InsufficientSize(_) => io::Error::other(e.to_string()),
                        e => tls_error(e),
                    })?;
                    Some(Stop::Idle { sealed })
                }
                // Early data is not enabled; nothing else is known.
                _ => return Err(tls_error("unexpected TLS state")),
            };
            done += discard;
            if let Some(stop) = stop {
                return Ok((done, stop));
            }
        }
    }

    /// Reads once from the socket and runs the connection over what came (with the carried
    /// partial record). Plaintext goes to `out` and, past its room, to `self.plain`. Ready
    /// once something was read (or the stream ended); the caller checks what came of it.
    fn poll_receive(
        &mut self,
        cx: &mut Context<'_>,
        mut out: Option<&mut ReadBuf<'_>>,
    ) -> Poll<io::Result<()>> {
        let room = out.as_ref().map_or(0, |o| o.remaining());
        with_input(|buf| {
            let carry = self.incoming.len();
            if carry >= buf.len() {
                return Poll::Ready(Err(tls_error("TLS message too large")));
            }
            buf[..carry].copy_from_slice(&self.incoming);
            let want = room.max(MIN_READ).min(buf.len() - carry);
            let mut rb = ReadBuf::new(&mut buf[carry..carry + want]);
            ready!(Pin::new(&mut self.io).poll_read(cx, &mut rb))?;
            let n = rb.filled().len();
            if n == 0 {
                // The socket ended without close_notify: a truncation, not an end.
                self.read_closed = true;
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed connection without sending TLS close_notify",
                )));
            }
            let ServerTls {
                conn,
                outgoing,
                server_name,
                read_closed,
                plain,
                ..
            } = self;
            let mut sink = |data: &[u8]| {
                let mut data = data;
                if let Some(o) = out.as_deref_mut() {
                    let n = data.len().min(o.remaining());
                    o.put_slice(&data[..n]);
                    data = &data[n..];
                }
                plain.extend_from_slice(data);
            };
            let input = &mut buf[..carry + n];
            let (done, stop) = Self::run(
                conn,
                outgoing,
                server_name,
                read_closed,
                input,
                &mut sink,
                Seal::Nothing,
            )?;
            if matches!(stop, Stop::Closed) {
                *read_closed = true;
            }
            // After close_notify nothing more is read.
            let rest = if *read_closed {
                &[][..]
            } else {
                &input[done..]
            };
            if rest.is_empty() {
                self.incoming = Vec::new();
            } else {
                self.incoming.clear();
                self.incoming.extend_from_slice(rest);
            }
            Poll::Ready(Ok(()))
        })
    }

    /// Writes what the socket has not taken yet; Ready when nothing is left.
    fn poll_send_outgoing(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_at < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.outgoing[self.out_at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_at += n;
        }
        if self.outgoing.capacity() > 0 {
            self.outgoing = Vec::new();
            self.out_at = 0;
        }
        Poll::Ready(Ok(()))
    }

    /// Seals `plain` (or a close_notify) into the shard's output buffer and writes it; what
    /// the socket does not take is kept for the next call. Returns the plaintext taken.
    fn poll_seal(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
        close_notify: bool,
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_send_outgoing(cx))?;
        with_write(|scratch| {
            let WriteScratch { plain, tls } = scratch;
            // One slice is sealed where it is; several are gathered first.
            let data: &[u8] = match bufs {
                [one] => &one[..one.len().min(MAX_WRITE)],
                _ => {
                    let mut n = 0;
                    for b in bufs {
                        let take = b.len().min(MAX_WRITE - n);
                        plain[n..n + take].copy_from_slice(&b[..take]);
                        n += take;
                    }
                    &plain[..n]
                }
            };
            if data.is_empty() && !close_notify {
                return Poll::Ready(Ok(0));
            }
            let seal = if close_notify {
                Seal::CloseNotify(&mut tls[..])
            } else {
                Seal::Data(data, &mut tls[..])
            };
            let taken = data.len();
            let ServerTls {
                conn,
                outgoing,
                server_name,
                read_closed,
                plain: unread,
                incoming,
                ..
            } = self;
            // Passed the carried partial record, as rustls requires; anything it decrypts
            // now (nothing, usually) waits for the reader.
            let mut sink = |d: &[u8]| unread.extend_from_slice(d);
            let (done, stop) = Self::run(
                conn,
                outgoing,
                server_name,
                read_closed,
                incoming,
                &mut sink,
                seal,
            )?;
            incoming.drain(..done);
            let sealed = match stop {
                Stop::Idle { sealed } => sealed,
                Stop::Closed => {
                    return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
                }
            };
            if close_notify {
                self.close_notify_sent = true;
            }
            // Records rustls queued just now (a key update) go first.
            let mut at = 0;
            if self.outgoing.is_empty() {
                while at < sealed {
                    match Pin::new(&mut self.io).poll_write(cx, &tls[at..sealed]) {
                        Poll::Ready(Ok(0)) => {
                            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()))
                        }
                        Poll::Ready(Ok(n)) => at += n,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => break,
                    }
                }
            }
            self.outgoing.extend_from_slice(&tls[at..sealed]);
            Poll::Ready(Ok(taken))
        })
    }

    pub(super) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        // Records rustls queued while reading (a key update's answer) go out as soon as
        // possible; a socket that cannot take them now does not hold up reading.
        if let Poll::Ready(Err(e)) = self.poll_send_outgoing(cx) {
            return Poll::Ready(Err(e));
        }
        loop {
            if self.plain_at < self.plain.len() {
                let n = (self.plain.len() - self.plain_at).min(out.remaining());
                out.put_slice(&self.plain[self.plain_at..self.plain_at + n]);
                self.plain_at += n;
                if self.plain_at == self.plain.len() {
                    self.plain = Vec::new();
                    self.plain_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if self.read_closed || out.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            let before = out.filled().len();
            ready!(self.poll_receive(cx, Some(out)))?;
            let _ = self.poll_send_outgoing(cx)?;
            if out.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
        }
    }

    pub(super) fn poll_write_vectored(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.poll_seal(cx, bufs, false)
    }

    /// The outbox's chunks, gathered into as few records as one write.
    pub(super) fn poll_write_outbox(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Outbox,
    ) -> Poll<io::Result<usize>> {
        let n = ready!(out.with_slices(|s| self.poll_seal(cx, s, false)))?;
        out.advance(n);
        Poll::Ready(Ok(n))
    }

    pub(super) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_send_outgoing(cx))?;
        Pin::new(&mut self.io).poll_flush(cx)
    }

    /// Sends close_notify (once), then shuts the socket's write side.
    pub(super) fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.close_notify_sent {
            ready!(self.poll_seal(cx, &[], true))?;
        }
        ready!(self.poll_send_outgoing(cx))?;
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Runs `f` with the shard's input buffer (a buffer of its own if that one is in use, which
/// no path does: the socket below a TLS stream is never TLS).
fn with_input<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    INPUT_BUF.with(|b| match b.try_borrow_mut() {
        Ok(mut b) => f(&mut b),
        Err(_) => f(&mut vec![0; INPUT]),
    })
}

fn with_write<R>(f: impl FnOnce(&mut WriteScratch) -> R) -> R {
    WRITE_BUF.with(|b| match b.try_borrow_mut() {
        Ok(mut b) => f(&mut b),
        Err(_) => f(&mut WriteScratch {
            plain: vec![0; MAX_WRITE].into_boxed_slice(),
            tls: vec![0; MAX_WRITE + SEAL_OVERHEAD].into_boxed_slice(),
        }),
    })
}
