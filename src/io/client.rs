//! The upstream HTTP client of one shard, shared by the reverse proxy and the agent gateway:
//! base URLs, name resolution, connections over the shard's own sockets (plain or TLS, ALPN),
//! HTTP/1.1 on ringgate's own codec ([`super::h1`]), HTTP/2 on hyper's client, and one
//! endpoint's keep-alive pool. Per shard (`RefCell`): no locks.
//!
//! An HTTP/1.1 connection has no task of its own: whoever holds it drives it from its own
//! future — [`Conn::send`] writes the request head (with the first piece of the body, in one
//! vectored write) and reads the response head, [`poll_body`] reads the response body and
//! writes what is left of the request's — so an exchange costs no extra task, no wake-up of
//! another task and no hop between tasks. An idle pooled connection is driven by nobody: one
//! the upstream closed meanwhile is found closed when it is next checked out (read once, it
//! reads the end of the stream). An HTTP/2 connection is shared by many requests and keeps
//! hyper's driver task.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWrite;
use tokio::task::AbortHandle;

use super::h1::READ_SMALL;
use super::{h1, Backend, LocalExec, Stream};
use crate::error::{Phase, UpstreamError};
use crate::ws::session::read_into;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Which HTTP version to speak to an upstream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Http2 {
    /// `https://`: HTTP/2 when the server picks `h2` by ALPN, else HTTP/1.1; `http://`:
    /// HTTP/1.1.
    #[default]
    Auto,
    /// HTTP/2 without negotiation (h2c on `http://`; only `h2` offered by ALPN on `https://`).
    PriorKnowledge,
    /// HTTP/1.1 only.
    Never,
}

impl Http2 {
    fn alpn(self) -> &'static [&'static [u8]] {
        match self {
            Http2::Auto => &[b"h2", b"http/1.1"],
            Http2::PriorKnowledge => &[b"h2"],
            Http2::Never => &[b"http/1.1"],
        }
    }
}

/// A checked upstream base URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl {
    pub tls: bool,
    /// Without IPv6 brackets.
    pub host: String,
    pub port: u16,
    /// Path prefix without a trailing slash ("" for none).
    pub path: String,
    /// `host[:port]` as written, for the `Host` header / `:authority`.
    pub authority: String,
}

impl BaseUrl {
    /// `http://` or `https://`; with `websocket`, also `ws://` and `wss://` (the same as the
    /// former two: one upstream serves requests and upgrades).
    pub fn parse(s: &str, websocket: bool) -> Result<BaseUrl, String> {
        let uri: http::Uri = s.parse().map_err(|e| format!("{s:?} is not a URL: {e}"))?;
        let tls = match (uri.scheme_str(), websocket) {
            (Some("http"), _) | (Some("ws"), true) => false,
            (Some("https"), _) | (Some("wss"), true) => true,
            (_, false) => return Err(format!("{s:?}: the scheme must be http:// or https://")),
            (_, true) => {
                return Err(format!(
                    "{s:?}: the scheme must be http://, https://, ws:// or wss://"
                ))
            }
        };
        let auth = uri
            .authority()
            .ok_or_else(|| format!("{s:?} has no host"))?;
        if auth.as_str().contains('@') {
            return Err(format!(
                "{s:?}: credentials in the URL are not supported (use headers)"
            ));
        }
        if uri.query().is_some() {
            return Err(format!("{s:?}: an upstream URL cannot have a query"));
        }
        let host = auth.host().trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err(format!("{s:?} has no host"));
        }
        Ok(BaseUrl {
            tls,
            host: host.to_string(),
            port: auth.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            path: uri.path().trim_end_matches('/').to_string(),
            authority: auth.as_str().to_string(),
        })
    }

    /// `scheme://authority` (the label in metrics and logs).
    pub fn origin(&self) -> String {
        format!(
            "{}://{}",
            if self.tls { "https" } else { "http" },
            self.authority
        )
    }
}

/// Checks a configured header: its name, and its value when it is known at start.
pub fn check_header(name: &str, value: Option<&str>) -> Result<(), String> {
    http::HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{name:?} is not a header name"))?;
    match value.map(http::HeaderValue::from_str) {
        Some(Err(_)) => Err(format!("the value of {name} is not a valid header value")),
        _ => Ok(()),
    }
}

/// How a request on an upstream connection failed.
#[derive(Debug)]
pub enum Error {
    /// The upstream closed the connection before the response ended.
    Closed,
    /// The response cannot be read (malformed or oversized head, bad framing, cut short).
    Malformed(h1::Malformed),
    Io(std::io::Error),
    /// The request body failed (the client's side: gone, too large, idle).
    Body(BoxError),
    H2(hyper::Error),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Closed => f.write_str("the upstream closed the connection"),
            Error::Malformed(m) => write!(f, "the upstream sent a malformed response ({m})"),
            Error::Io(e) => write!(f, "the upstream connection failed ({e})"),
            Error::Body(e) => write!(f, "the request body failed ({e})"),
            Error::H2(e) => {
                use std::error::Error as _;
                let what = if e.is_incomplete_message() || e.is_closed() {
                    "the upstream closed the connection"
                } else if e.is_parse() || e.is_parse_status() {
                    "the upstream sent a malformed response"
                } else if e.is_canceled() {
                    "the request was cancelled"
                } else {
                    "the upstream connection failed"
                };
                match e.source() {
                    Some(s) => write!(f, "{what} ({s})"),
                    None => f.write_str(what),
                }
            }
        }
    }
}

impl std::error::Error for Error {}

/// Body bytes gathered for the upstream: while this much waits to be written, no further piece
/// of the request body is read (a slow upstream stops the reading of the client's body).
const GATHER_BYTES: usize = 256 * 1024;
/// The most pieces waiting (framing and data; one vectored write takes them all).
const GATHER_SEGS: usize = 64;

/// A piece of the request on its way out.
enum Seg {
    /// Head or chunk framing: a range of [`Tx::buf`].
    Framing(usize, usize),
    Data(Bytes),
}

/// What goes out on an HTTP/1.1 connection, on either side (a request upstream, a response to
/// a client, [`super::server_h1`]): the head, the body pieces read and their framing waiting
/// to be written (all that is ready goes in one vectored write), and the body still to be read.
pub(crate) struct Tx<B> {
    /// Head and framing bytes, which `segs` refer to (cleared when all is written).
    buf: Vec<u8>,
    /// What waits to be written, in order; the first from `pos`.
    segs: VecDeque<Seg>,
    pos: usize,
    /// Body bytes in `segs`.
    queued: usize,
    body: Option<B>,
    /// The body is to be read and sent (else the request has none).
    sending: bool,
    framing: h1::OutFraming,
    /// Written bytes the stream may still hold (TLS).
    flush: bool,
    /// Some of the request was written, or its body read from.
    started: bool,
    /// Trailers are sent (chunked only); else dropped.
    trailers: bool,
}

pub(crate) enum TxError {
    Body(BoxError),
    Io(std::io::Error),
}

impl<B> Tx<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    fn new() -> Tx<B> {
        Tx {
            buf: Vec::new(),
            segs: VecDeque::new(),
            pos: 0,
            queued: 0,
            body: None,
            sending: false,
            framing: h1::OutFraming::Empty,
            flush: false,
            started: false,
            trailers: true,
        }
    }

    /// A message whose head is `head`, its body framed as `framing`; `trailers`: the body's
    /// trailers are sent (with chunked framing).
    pub(crate) fn message(
        head: Vec<u8>,
        body: B,
        framing: h1::OutFraming,
        trailers: bool,
    ) -> Tx<B> {
        let mut tx = Tx::new();
        tx.buf = head;
        tx.start(body, framing);
        tx.trailers = trailers;
        tx
    }

    /// The head and chunk buffer back, for the next message's head (its capacity kept).
    pub(crate) fn into_buf(mut self) -> Vec<u8> {
        self.buf.clear();
        self.buf
    }

    /// The whole message is written.
    pub(crate) fn done(&self) -> bool {
        !self.sending && self.segs.is_empty() && !self.flush
    }

    /// The request head (already in `buf`) goes first.
    fn start(&mut self, body: B, framing: h1::OutFraming) {
        self.segs.clear();
        self.segs.push_back(Seg::Framing(0, self.buf.len()));
        self.pos = 0;
        self.queued = 0;
        self.started = false;
        self.framing = framing;
        self.sending = framing != h1::OutFraming::Empty;
        self.body = Some(body);
    }

    /// Framing bytes `write` appends to `buf`, after what waits (one piece with framing
    /// right before them).
    fn push_framing(&mut self, write: impl FnOnce(&mut Vec<u8>)) {
        let start = self.buf.len();
        write(&mut self.buf);
        let end = self.buf.len();
        match self.segs.back_mut() {
            Some(Seg::Framing(_, e)) if *e == start => *e = end,
            _ => self.segs.push_back(Seg::Framing(start, end)),
        }
    }

    /// Frames one piece of the body for the wire.
    fn push(&mut self, frame: Frame<Bytes>) -> Result<(), TxError> {
        let data = match frame.into_data() {
            Ok(d) => d,
            Err(frame) => {
                // Trailers: the body's last frame.
                let trailers = frame.into_trailers().ok().filter(|_| self.trailers);
                return self.finish(trailers.as_ref());
            }
        };
        if data.is_empty() {
            return Ok(());
        }
        match &mut self.framing {
            h1::OutFraming::Length(rest) if data.len() as u64 <= *rest => {
                *rest -= data.len() as u64
            }
            h1::OutFraming::Chunked => {
                let n = data.len();
                self.push_framing(|b| h1::chunk_size_line(b, n));
            }
            h1::OutFraming::Close => {}
            _ => return Err(TxError::Body("request body longer than its length".into())),
        }
        self.queued += data.len();
        self.segs.push_back(Seg::Data(data));
        if self.framing == h1::OutFraming::Chunked {
            self.push_framing(|b| b.extend_from_slice(b"\r\n"));
        }
        Ok(())
    }

    fn finish(&mut self, trailers: Option<&http::HeaderMap>) -> Result<(), TxError> {
        self.sending = false;
        self.body = None;
        match self.framing {
            h1::OutFraming::Chunked => self.push_framing(|b| h1::last_chunk(b, trailers)),
            h1::OutFraming::Length(n) if n > 0 => {
                return Err(TxError::Body("request body shorter than its length".into()))
            }
            _ => {}
        }
        Ok(())
    }

    /// Reads the pieces of the body that are ready (up to the bounds) and writes all that
    /// waits in one vectored write, until all is written or something waits: the head goes
    /// with the body's first piece when it is ready.
    pub(crate) fn poll<W: AsyncWrite + Unpin>(
        &mut self,
        io: &mut W,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), TxError>> {
        loop {
            while self.sending && self.queued < GATHER_BYTES && self.segs.len() < GATHER_SEGS {
                let Some(body) = self.body.as_mut() else {
                    break;
                };
                let frame = Pin::new(body).poll_frame(cx);
                self.started |= frame.is_ready();
                match frame {
                    Poll::Ready(Some(Ok(frame))) => self.push(frame)?,
                    Poll::Ready(Some(Err(e))) => {
                        self.sending = false;
                        self.body = None;
                        return Poll::Ready(Err(TxError::Body(e.into())));
                    }
                    Poll::Ready(None) => self.finish(None)?,
                    Poll::Pending => break,
                }
            }
            if self.segs.is_empty() {
                if self.flush {
                    ready!(Pin::new(&mut *io).poll_flush(cx)).map_err(TxError::Io)?;
                    self.flush = false;
                }
                return if self.sending {
                    Poll::Pending
                } else {
                    Poll::Ready(Ok(()))
                };
            }
            let mut slices = [std::io::IoSlice::new(&[]); GATHER_SEGS + 1];
            let mut count = 0;
            for (seg, slot) in self.segs.iter().zip(slices.iter_mut()) {
                let bytes = match seg {
                    Seg::Framing(s, e) => &self.buf[*s..*e],
                    Seg::Data(d) => &d[..],
                };
                let from = if count == 0 { self.pos } else { 0 };
                *slot = std::io::IoSlice::new(&bytes[from..]);
                count += 1;
            }
            let n = ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices[..count]))
                .map_err(TxError::Io)?;
            if n == 0 {
                return Poll::Ready(Err(TxError::Io(std::io::ErrorKind::WriteZero.into())));
            }
            self.flush = true;
            self.started = true;
            self.advance(n);
        }
    }

    /// `n` bytes were written.
    fn advance(&mut self, mut n: usize) {
        while let Some(seg) = self.segs.front() {
            let len = match seg {
                Seg::Framing(s, e) => e - s,
                Seg::Data(d) => d.len(),
            } - self.pos;
            if n < len {
                self.pos += n;
                return;
            }
            n -= len;
            self.pos = 0;
            if let Some(Seg::Data(d)) = self.segs.pop_front() {
                self.queued -= d.len();
            }
        }
        // All written: the framing buffer starts over.
        self.buf.clear();
    }
}

/// The response's side of an HTTP/1.1 exchange.
enum Rx {
    /// No response expected: none asked for, or the last one read to its end.
    Idle,
    /// Waiting for the head (`true`: of a `HEAD` request).
    Head(bool),
    Body(h1::Decoder),
}

/// Reads into `rd` (at most `want` bytes): the number read, 0 at the end of the stream.
fn fill(
    io: &mut Stream,
    rd: &mut BytesMut,
    want: usize,
    cx: &mut Context<'_>,
) -> Poll<std::io::Result<usize>> {
    if rd.capacity() - rd.len() < want {
        rd.reserve(want);
    }
    read_into(io, cx, rd, want)
}

/// An HTTP/1.1 connection on ringgate's own codec ([`h1`]), driven by whoever holds it: the
/// request's writes and the response's reads happen in the holder's own polls.
pub struct H1<B> {
    io: Stream,
    /// Read and not yet used: the response head, then its body.
    rd: BytesMut,
    tx: Tx<B>,
    rx: Rx,
    /// The request as given until its first byte is written or its body first read: a request
    /// that fails before then was not sent, and goes back to the caller.
    unsent: Option<http::request::Parts>,
    /// The upstream allows another request after the response.
    keep_alive: bool,
}

impl<B> H1<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    fn new(io: Stream) -> H1<B> {
        H1 {
            io,
            rd: BytesMut::new(),
            tx: Tx::new(),
            rx: Rx::Idle,
            unsent: None,
            keep_alive: true,
        }
    }

    /// Alive and ready for a request, polled once: a connection the upstream closed meanwhile
    /// reads its end here (and one that sent anything unasked is not used either).
    fn ready_now(&mut self, cx: &mut Context<'_>) -> bool {
        self.keep_alive
            && matches!(self.rx, Rx::Idle)
            && self.tx.done()
            && self.rd.is_empty()
            && fill(&mut self.io, &mut self.rd, READ_SMALL, cx).is_pending()
    }

    /// The head goes into the write buffer; the body is read as it is written.
    fn start(&mut self, req: Request<B>) {
        let (parts, body) = req.into_parts();
        let len = if body.is_end_stream() {
            Some(0)
        } else {
            body.size_hint().exact()
        };
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let framing =
            h1::encode_request(&mut self.tx.buf, &parts.method, target, &parts.headers, len);
        self.tx.start(body, framing);
        self.rx = Rx::Head(parts.method == http::Method::HEAD);
        self.unsent = Some(parts);
    }

    /// Drives the request's side. A write that fails does not end the exchange: the upstream
    /// may have answered first (and then stopped reading), which the read side finds out.
    fn drive_tx(&mut self, cx: &mut Context<'_>) -> Result<(), Error> {
        if self.tx.done() {
            return Ok(());
        }
        let r = self.tx.poll(&mut self.io, cx);
        if self.tx.started {
            self.unsent = None;
        }
        match r {
            Poll::Pending | Poll::Ready(Ok(())) => Ok(()),
            Poll::Ready(Err(TxError::Body(e))) => {
                self.keep_alive = false;
                Err(Error::Body(e))
            }
            // Nothing was sent: the request goes back to the caller.
            Poll::Ready(Err(TxError::Io(e))) if self.unsent.is_some() => Err(Error::Io(e)),
            Poll::Ready(Err(TxError::Io(e))) => {
                tracing::debug!(error = %e, "upstream stopped reading the request");
                self.keep_alive = false;
                self.tx = Tx::new();
                Ok(())
            }
        }
    }

    fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<Result<h1::Head, Error>> {
        loop {
            self.drive_tx(cx)?;
            let Rx::Head(head_request) = self.rx else {
                return Poll::Ready(Err(Error::Closed));
            };
            if !self.rd.is_empty() {
                match h1::parse_response(&self.rd, head_request) {
                    Err(m) => return Poll::Ready(Err(Error::Malformed(m))),
                    Ok(Some((head, n))) => {
                        self.rd.advance(n);
                        if head.is_interim() {
                            continue;
                        }
                        self.keep_alive &= head.keep_alive;
                        let dec = h1::Decoder::new(head.framing);
                        self.rx = if dec.is_done() {
                            Rx::Idle
                        } else {
                            Rx::Body(dec)
                        };
                        return Poll::Ready(Ok(head));
                    }
                    Ok(None) => {}
                }
            }
            match ready!(fill(&mut self.io, &mut self.rd, READ_SMALL, cx)) {
                Ok(0) => return Poll::Ready(Err(Error::Closed)),
                Ok(_) => {}
                Err(e) => return Poll::Ready(Err(Error::Io(e))),
            }
        }
    }

    /// The next frame of the response body; `None` at its end.
    fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        loop {
            if !matches!(self.rx, Rx::Body(_)) {
                return Poll::Ready(None);
            }
            if let Err(e) = self.drive_tx(cx) {
                return Poll::Ready(Some(Err(e)));
            }
            let Rx::Body(dec) = &mut self.rx else {
                return Poll::Ready(None);
            };
            let decoded = match dec.decode(&mut self.rd) {
                Ok(h1::Decoded::More) => {
                    match ready!(fill(&mut self.io, &mut self.rd, dec.read_size(), cx)) {
                        Ok(0) => {
                            self.keep_alive = false;
                            dec.at_eof()
                        }
                        Ok(_) => continue,
                        Err(e) => return Poll::Ready(Some(Err(Error::Io(e)))),
                    }
                }
                d => d,
            };
            let done = dec.is_done();
            if done {
                self.rx = Rx::Idle;
            }
            return Poll::Ready(match decoded {
                Err(m) => Some(Err(Error::Malformed(m))),
                Ok(h1::Decoded::Data(b)) => Some(Ok(Frame::data(b))),
                Ok(h1::Decoded::Trailers(t)) => Some(Ok(Frame::trailers(t))),
                Ok(h1::Decoded::End | h1::Decoded::More) => None,
            });
        }
    }

    /// The request back, when none of it was sent.
    fn take_unsent(&mut self) -> Option<Request<B>> {
        let parts = self.unsent.take()?;
        let body = self.tx.body.take()?;
        Some(Request::from_parts(parts, body))
    }
}

/// A connection a request holds.
pub enum Conn<B: Body + 'static> {
    /// Boxed: it moves in and out of the pool, and holds its buffers.
    H1(Box<H1<B>>),
    /// Shared by the endpoint's requests; hyper's task drives it.
    H2(http2::SendRequest<B>, AbortHandle),
}

/// A response body, read with [`poll_body`] from the connection that carried it.
pub enum ResponseBody {
    /// Read from the HTTP/1.1 connection; `end`: its last frame was read.
    H1 {
        end: bool,
        hint: SizeHint,
    },
    H2(Incoming),
}

impl ResponseBody {
    pub fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::H1 { end, .. } => *end,
            ResponseBody::H2(b) => b.is_end_stream(),
        }
    }

    pub fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::H1 { hint, .. } => *hint,
            ResponseBody::H2(b) => b.size_hint(),
        }
    }
}

impl<B> Conn<B>
where
    B: Body<Data = Bytes> + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    pub fn is_h2(&self) -> bool {
        matches!(self, Conn::H2(..))
    }

    /// Sends `req` and waits for the response head (an HTTP/1.1 request is written meanwhile).
    /// On failure, the request when none of it was sent (the connection had closed): it may go
    /// on another connection.
    pub async fn send(
        &mut self,
        req: Request<B>,
    ) -> Result<Response<ResponseBody>, (Error, Option<Request<B>>)> {
        match self {
            Conn::H2(s, _) => match s.send_request(req).await {
                Ok(resp) => Ok(resp.map(ResponseBody::H2)),
                Err(e) => Err((Error::H2(e), None)),
            },
            Conn::H1(h) => {
                h.start(req);
                match poll_fn(|cx| h.poll_head(cx)).await {
                    Ok(head) => {
                        let body = match &h.rx {
                            Rx::Body(dec) => ResponseBody::H1 {
                                end: false,
                                hint: dec
                                    .remaining()
                                    .map_or_else(SizeHint::new, SizeHint::with_exact),
                            },
                            _ => ResponseBody::H1 {
                                end: true,
                                hint: SizeHint::with_exact(0),
                            },
                        };
                        let mut resp = Response::new(body);
                        *resp.status_mut() = head.status;
                        *resp.version_mut() = head.version;
                        *resp.headers_mut() = head.headers;
                        Ok(resp)
                    }
                    Err(e) => {
                        h.keep_alive = false;
                        Err((e, h.take_unsent()))
                    }
                }
            }
        }
    }
}

/// The next frame of `body`, the response to a request on `conn`: an HTTP/1.1 body is read
/// from the connection (which writes what is left of the request meanwhile).
pub fn poll_body<B>(
    conn: Option<&mut Conn<B>>,
    body: &mut ResponseBody,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, Error>>>
where
    B: Body<Data = Bytes> + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    match body {
        ResponseBody::H2(b) => Pin::new(b).poll_frame(cx).map_err(Error::H2),
        ResponseBody::H1 { end: true, .. } => Poll::Ready(None),
        ResponseBody::H1 { end, hint } => {
            let Some(Conn::H1(h)) = conn else {
                return Poll::Ready(Some(Err(Error::Closed)));
            };
            let r = ready!(h.poll_frame(cx));
            *end = matches!(h.rx, Rx::Idle);
            if let (Some(Ok(f)), Some(n)) = (&r, hint.exact()) {
                let len = f.data_ref().map_or(0, |d| d.len() as u64);
                *hint = SizeHint::with_exact(n.saturating_sub(len));
            }
            Poll::Ready(r)
        }
    }
}

/// One upstream as one shard sees it: its addresses, its TLS settings, its idle HTTP/1.1
/// connections and its shared HTTP/2 one.
pub struct Endpoint<B: Body + 'static> {
    pub url: BaseUrl,
    http2: Http2,
    /// HTTP/2 PING interval (`None`: no pings).
    h2_keep_alive: Option<Duration>,
    addrs: RefCell<Option<Vec<SocketAddr>>>,
    /// For requests (ALPN per `http2`).
    tls: Option<Arc<rustls::ClientConfig>>,
    /// For upgrades and health checks: HTTP/1.1 only.
    tls_h1: Option<Arc<rustls::ClientConfig>>,
    idle: RefCell<Vec<(Box<H1<B>>, Instant)>>,
    h2: RefCell<Option<(http2::SendRequest<B>, AbortHandle)>>,
}

impl<B> Endpoint<B>
where
    B: Body<Data = Bytes> + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    pub fn new(
        url: BaseUrl,
        http2: Http2,
        roots: &Arc<rustls::RootCertStore>,
        h2_keep_alive: Option<Duration>,
    ) -> Endpoint<B> {
        let tls = url
            .tls
            .then(|| super::tls::client_config(roots, http2.alpn()));
        let tls_h1 = url
            .tls
            .then(|| super::tls::client_config(roots, Http2::Never.alpn()));
        Endpoint {
            url,
            http2,
            h2_keep_alive,
            addrs: RefCell::new(None),
            tls,
            tls_h1,
            idle: RefCell::new(Vec::new()),
            h2: RefCell::new(None),
        }
    }

    /// Resolves the name (once; again after a failed connect).
    pub async fn resolve(&self) -> Result<Vec<SocketAddr>, UpstreamError> {
        if let Some(a) = self.addrs.borrow().as_ref() {
            return Ok(a.clone());
        }
        let u = &self.url;
        let a: Vec<SocketAddr> = match u.host.parse::<std::net::IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, u.port)],
            Err(_) => tokio::net::lookup_host((u.host.as_str(), u.port))
                .await
                .map_err(|e| UpstreamError::Connect(format!("{}: {e}", u.host)))?
                .collect(),
        };
        if a.is_empty() {
            return Err(UpstreamError::Connect(format!("{}: no address", u.host)));
        }
        *self.addrs.borrow_mut() = Some(a.clone());
        Ok(a)
    }

    /// A new socket to the upstream (TLS when `https`/`wss`), bounded by `timeout`: `true`
    /// when HTTP/2 is to be spoken on it (ALPN chose it, or prior knowledge).
    pub async fn connect_io(
        &self,
        backend: Backend,
        h1_only: bool,
        timeout: Duration,
    ) -> Result<(Stream, bool), UpstreamError> {
        let addrs = self.resolve().await?;
        let tls = if h1_only { &self.tls_h1 } else { &self.tls };
        let host = self.url.host.as_str();
        let io = super::connect(backend, &addrs, tls.as_ref().map(|c| (c, host)), timeout)
            .await
            .inspect_err(|_| {
                // Resolve again next time (the name may point elsewhere now).
                self.addrs.borrow_mut().take();
            })?;
        let h2 = match tls {
            None => !h1_only && self.http2 == Http2::PriorKnowledge,
            Some(_) => io.alpn_protocol() == Some(b"h2"),
        };
        Ok((io, h2))
    }

    /// A connection for one request: the shared HTTP/2 one, an idle pooled HTTP/1.1 one kept
    /// less than `pool_idle`, or a new one (bounded by `connect`). `true` when reused.
    pub async fn connection(
        &self,
        backend: Backend,
        connect: Duration,
        pool_idle: Duration,
    ) -> Result<(Conn<B>, bool), UpstreamError> {
        let h2 = self.h2.borrow().clone();
        if let Some((s, driver)) = h2 {
            // Ready unless the connection is gone or at its stream limit; a new one then.
            let mut s = s;
            let ready = async { s.ready().await.is_ok() && !s.is_closed() };
            if matches!(tokio::time::timeout(connect, ready).await, Ok(true)) {
                return Ok((Conn::H2(s, driver), true));
            }
            self.h2.borrow_mut().take();
        }
        let now = Instant::now();
        loop {
            let Some((mut h, since)) = self.idle.borrow_mut().pop() else {
                break;
            };
            if now.duration_since(since) >= pool_idle {
                continue;
            }
            // Polled once (no timer): a connection the upstream closed meanwhile reads its
            // end here; one not ready at once is not waited for.
            if poll_fn(|cx| Poll::Ready(h.ready_now(cx))).await {
                return Ok((Conn::H1(h), true));
            }
        }
        let opened = tokio::time::timeout(connect, self.open(backend, connect)).await;
        opened
            .unwrap_or(Err(UpstreamError::Timeout(Phase::Connect)))
            .inspect_err(|_| {
                self.addrs.borrow_mut().take();
            })
            .map(|c| (c, false))
    }

    async fn open(&self, backend: Backend, connect: Duration) -> Result<Conn<B>, UpstreamError> {
        let (io, h2) = self.connect_io(backend, false, connect).await?;
        if h2 {
            let io = TokioIo::new(io);
            let broken = |e: hyper::Error| UpstreamError::Connect(format!("handshake: {e}"));
            let mut b = http2::Builder::new(LocalExec);
            b.timer(TokioTimer::new());
            if let Some(every) = self.h2_keep_alive {
                b.keep_alive_interval(every);
            }
            let (sender, conn) = b.handshake(io).await.map_err(broken)?;
            let driver = tokio::task::spawn_local(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "upstream h2 connection ended");
                }
            })
            .abort_handle();
            *self.h2.borrow_mut() = Some((sender.clone(), driver.clone()));
            Ok(Conn::H2(sender, driver))
        } else {
            Ok(Conn::H1(Box::new(H1::new(io))))
        }
    }

    /// Takes back a connection whose exchange finished: an HTTP/1.1 one is kept while fewer
    /// than `pool_size` are idle, else closed.
    pub fn release(&self, c: Conn<B>, pool_size: usize) {
        let Conn::H1(mut h) = c else {
            return;
        };
        // Pooled only when the response was read to its end and both sides allow another
        // request on the connection.
        if !matches!(h.rx, Rx::Idle) || !h.keep_alive {
            return;
        }
        if !h.tx.done() {
            // The upstream answered before the request body was all sent: the upload goes on
            // (the client is still sending it) on a task of its own, then the connection closes.
            tokio::task::spawn_local(async move {
                let _ = poll_fn(|cx| h.tx.poll(&mut h.io, cx)).await;
            });
            return;
        }
        if !h.rd.is_empty() {
            // Bytes past the response: nothing the next request could be sure of.
            return;
        }
        if h.rd.capacity() > READ_SMALL {
            // A large body's read buffer is not kept while idle.
            h.rd = BytesMut::new();
        }
        let mut idle = self.idle.borrow_mut();
        if idle.len() < pool_size {
            idle.push((h, Instant::now()));
        }
    }

    /// Gives up a connection whose exchange failed: an HTTP/1.1 one closes (the upstream sees
    /// the request go away), the shared HTTP/2 one only when it is broken.
    pub fn discard(&self, c: Conn<B>) {
        if !c.is_h2() {
            return;
        }
        let broken = self
            .h2
            .borrow()
            .as_ref()
            .is_some_and(|(s, _)| s.is_closed());
        if broken {
            if let Some((_, d)) = self.h2.borrow_mut().take() {
                d.abort();
            }
        }
    }

    /// Closes the idle pooled connections (one turned out closed by the upstream: the others
    /// likely are too).
    pub fn drop_idle(&self) {
        self.idle.borrow_mut().clear();
    }

    /// Closes every pooled connection (the configuration was replaced).
    pub fn close_all(&self) {
        self.drop_idle();
        if let Some((_, d)) = self.h2.borrow_mut().take() {
            d.abort();
        }
    }
}
