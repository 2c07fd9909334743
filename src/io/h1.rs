//! ringgate's HTTP/1.1 codec (RFC 9112) as plain types driven by bytes, for both sides:
//!
//! - client (upstream connections): the request head written into one buffer, the response
//!   head parsed with `httparse`;
//! - server (client connections): the request head parsed with `httparse` into
//!   `http::request::Parts` with its body's framing and keep-alive, the response head written
//!   into one buffer;
//! - both: one body decoder (a length, chunked with extensions and trailers, or until close)
//!   and one body framing for what is sent ([`OutFraming`], [`chunk_size_line`],
//!   [`last_chunk`]).
//!
//! No I/O here: [`super::client`] and [`super::server_h1`] move the bytes.

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};

/// The largest response head (and trailer section) accepted: a larger one is an error (502).
pub const MAX_HEAD: usize = 64 * 1024;
/// The most header fields in a response head or trailer section.
const MAX_HEADERS: usize = 128;
/// The most bytes of chunk extensions on one chunk-size line.
const MAX_CHUNK_EXT: usize = 4096;

/// Bytes read per system call, on either side: a head and a small body fit in the first size;
/// a larger body is read in the second (hyper's `max_buf_size` for its client).
pub const READ_SMALL: usize = 8 * 1024;
pub const READ_LARGE: usize = 64 * 1024;

/// How a body we send (a request's upstream, a response to a client) is framed on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutFraming {
    /// No body.
    Empty,
    /// `Content-Length`: the bytes still to send.
    Length(u64),
    Chunked,
    /// Until the connection closes (a response of unknown length to an HTTP/1.0 client).
    Close,
}

/// Writes the request head into `out` (cleared first) and says how the body is framed. A
/// `Content-Length` in `headers` is kept (the client's body was checked against it); else an
/// empty body has none (`content-length: 0` for methods that carry one), a body of known size
/// gets one, any other is chunked. `Transfer-Encoding` is ringgate's to choose, never passed on.
pub fn encode_request(
    out: &mut Vec<u8>,
    method: &Method,
    target: &str,
    headers: &HeaderMap,
    body_len: Option<u64>,
) -> OutFraming {
    out.clear();
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let mut framing = None;
    for (name, value) in headers {
        if *name == header::TRANSFER_ENCODING {
            continue;
        }
        if *name == header::CONTENT_LENGTH {
            let n = value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse::<u64>().ok());
            match (framing, n) {
                // One valid length (repeated ones must agree, as the server side checked).
                (None, Some(n)) => framing = Some(OutFraming::Length(n)),
                (Some(OutFraming::Length(m)), Some(n)) if m == n => continue,
                _ => continue,
            }
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    let framing = match (framing, body_len) {
        (Some(OutFraming::Length(0)), _) => OutFraming::Empty,
        (Some(f), _) => f,
        (None, Some(0)) => {
            if matches!(*method, Method::POST | Method::PUT | Method::PATCH) {
                out.extend_from_slice(b"content-length: 0\r\n");
            }
            OutFraming::Empty
        }
        (None, Some(n)) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
            OutFraming::Length(n)
        }
        (None, None) => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            OutFraming::Chunked
        }
    };
    out.extend_from_slice(b"\r\n");
    framing
}

/// Writes a chunk's size line (`{hex}\r\n`) into `out`.
pub fn chunk_size_line(out: &mut Vec<u8>, n: usize) {
    let mut digits = [0u8; 16];
    let mut i = digits.len();
    let mut v = n;
    loop {
        i -= 1;
        digits[i] = b"0123456789abcdef"[v & 0xf];
        v >>= 4;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[i..]);
    out.extend_from_slice(b"\r\n");
}

/// Writes the last chunk and the trailer section into `out`.
pub fn last_chunk(out: &mut Vec<u8>, trailers: Option<&HeaderMap>) {
    out.extend_from_slice(b"0\r\n");
    for (name, value) in trailers.into_iter().flatten() {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// Why a response cannot be read (the answer is 502).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed(pub &'static str);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

/// How a response body is framed (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Empty,
    Length(u64),
    Chunked,
    /// Until the upstream closes the connection.
    Close,
}

/// A parsed response head.
#[derive(Debug)]
pub struct Head {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: Framing,
    /// The connection may carry another request after this response.
    pub keep_alive: bool,
}

impl Head {
    /// An interim response (1xx other than 101): skipped, the final one follows.
    pub fn is_interim(&self) -> bool {
        self.status.is_informational() && self.status != StatusCode::SWITCHING_PROTOCOLS
    }
}

/// Parses a response head at the start of `buf`: `None` while incomplete, else the head and
/// its length. `head_request`: the request was `HEAD` (the response has no body whatever its
/// headers say).
pub fn parse_response(buf: &[u8], head_request: bool) -> Result<Option<(Head, usize)>, Malformed> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Response::new(&mut slots);
    let len = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => {
            return Err(Malformed("response head too large"))
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Malformed("too many response header fields"))
        }
        Err(_) => return Err(Malformed("malformed response head")),
    };
    if len > MAX_HEAD {
        return Err(Malformed("response head too large"));
    }
    let code = r.code.unwrap_or(0);
    let status = StatusCode::from_u16(code).map_err(|_| Malformed("bad status code"))?;
    let version = if r.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let headers = header_map(r.headers, 0)?;
    if status == StatusCode::SWITCHING_PROTOCOLS {
        return Err(Malformed("101 to a request that asked for no upgrade"));
    }
    let mut keep_alive = version == Version::HTTP_11;
    for v in headers.get_all(header::CONNECTION) {
        for token in v.as_bytes().split(|&b| b == b',') {
            let t = token.trim_ascii();
            if t.eq_ignore_ascii_case(b"close") {
                keep_alive = false;
            } else if t.eq_ignore_ascii_case(b"keep-alive") && version == Version::HTTP_10 {
                keep_alive = true;
            }
        }
    }
    let no_body = head_request
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = if no_body {
        Framing::Empty
    } else if headers.contains_key(header::TRANSFER_ENCODING) {
        // With a `Content-Length` too, the encoding wins and the connection is not reused
        // (RFC 9112 §6.3: a possible smuggling attempt).
        if headers.contains_key(header::CONTENT_LENGTH) {
            keep_alive = false;
        }
        let last = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .rfind(|t| !t.is_empty());
        if last.is_some_and(|t| t.eq_ignore_ascii_case(b"chunked")) {
            Framing::Chunked
        } else {
            keep_alive = false;
            Framing::Close
        }
    } else if let Some(n) = content_length(&headers)? {
        if n == 0 {
            Framing::Empty
        } else {
            Framing::Length(n)
        }
    } else {
        keep_alive = false;
        Framing::Close
    };
    Ok(Some((
        Head {
            status,
            version,
            headers,
            framing,
            keep_alive,
        },
        len,
    )))
}

/// The one `Content-Length` of a head (repeated values must agree).
fn content_length(h: &HeaderMap) -> Result<Option<u64>, Malformed> {
    let bad = Malformed("bad content-length");
    let mut found = None;
    for v in h.get_all(header::CONTENT_LENGTH) {
        for part in v.as_bytes().split(|&b| b == b',') {
            let part = part.trim_ascii();
            if part.is_empty() || part.len() > 19 || !part.iter().all(u8::is_ascii_digit) {
                return Err(bad);
            }
            let n = part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
            if found.is_some_and(|m| m != n) {
                return Err(bad);
            }
            found = Some(n);
        }
    }
    Ok(found)
}

/// Room for the fields a proxied request gains (`X-Forwarded-*`, `X-Request-Id`, ...): a map
/// that has to grow rehashes every field (measured: 1.4k instructions per proxied request).
const REQUEST_SPARE: usize = 8;

fn header_map(fields: &[httparse::Header<'_>], spare: usize) -> Result<HeaderMap, Malformed> {
    let mut map = HeaderMap::with_capacity(fields.len() + spare);
    for f in fields {
        let name =
            HeaderName::from_bytes(f.name.as_bytes()).map_err(|_| Malformed("bad header name"))?;
        let value = HeaderValue::from_bytes(f.value).map_err(|_| Malformed("bad header value"))?;
        map.append(name, value);
    }
    Ok(map)
}

/// Why a request head is refused: the answer, after which the connection closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadRequest {
    /// Over [`MAX_HEAD`] or [`MAX_HEADERS`]: 431.
    TooLarge,
    /// 400, with what was wrong.
    Malformed(&'static str),
}

impl BadRequest {
    pub fn status(self) -> StatusCode {
        match self {
            BadRequest::TooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            BadRequest::Malformed(_) => StatusCode::BAD_REQUEST,
        }
    }
}

/// A parsed request head.
#[derive(Debug)]
pub struct RequestHead {
    pub parts: http::request::Parts,
    /// `Empty`, `Length` or `Chunked`: a request body is never read until close.
    pub framing: Framing,
    /// The client allows another request on the connection after this one.
    pub keep_alive: bool,
    /// `Expect: 100-continue` (HTTP/1.1): the client waits for a 100 before the body.
    pub expect_continue: bool,
}

/// Parses a request head at the start of `buf`: `None` while incomplete, else the head and
/// its length. Empty lines before the request line are skipped (RFC 9112 §2.2).
pub fn parse_request(buf: &[u8]) -> Result<Option<(RequestHead, usize)>, BadRequest> {
    let bad = |what| Err(BadRequest::Malformed(what));
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut r = httparse::Request::new(&mut slots);
    let len = match r.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() > MAX_HEAD => return Err(BadRequest::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(BadRequest::TooLarge),
        Err(httparse::Error::HeaderName | httparse::Error::HeaderValue) => {
            return bad("bad header field")
        }
        Err(_) => return bad("bad request line"),
    };
    if len > MAX_HEAD {
        return Err(BadRequest::TooLarge);
    }
    let (Some(method), Some(path), Some(v)) = (r.method, r.path, r.version) else {
        return bad("bad request line");
    };
    let method =
        Method::from_bytes(method.as_bytes()).map_err(|_| BadRequest::Malformed("bad method"))?;
    let uri = http::Uri::try_from(path).map_err(|_| BadRequest::Malformed("bad request target"))?;
    let version = if v == 0 {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let headers = header_map(r.headers, REQUEST_SPARE)
        .map_err(|_| BadRequest::Malformed("bad header field"))?;
    let mut keep_alive = version == Version::HTTP_11;
    for v in headers.get_all(header::CONNECTION) {
        for token in v.as_bytes().split(|&b| b == b',') {
            let t = token.trim_ascii();
            if t.eq_ignore_ascii_case(b"close") {
                keep_alive = false;
            } else if t.eq_ignore_ascii_case(b"keep-alive") && version == Version::HTTP_10 {
                keep_alive = true;
            }
        }
    }
    let framing = if headers.contains_key(header::TRANSFER_ENCODING) {
        // Both would let two readers disagree on where the body ends (request smuggling,
        // RFC 9112 §6.3), and a request body must end in `chunked` to be delimited at all.
        if headers.contains_key(header::CONTENT_LENGTH) {
            return bad("both content-length and transfer-encoding");
        }
        if version == Version::HTTP_10 {
            return bad("transfer-encoding in an HTTP/1.0 request");
        }
        let last = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b','))
            .map(<[u8]>::trim_ascii)
            .rfind(|t| !t.is_empty());
        if !last.is_some_and(|t| t.eq_ignore_ascii_case(b"chunked")) {
            return bad("transfer-encoding does not end in chunked");
        }
        Framing::Chunked
    } else {
        match content_length(&headers).map_err(|_| BadRequest::Malformed("bad content-length"))? {
            None | Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
        }
    };
    let expect_continue = version == Version::HTTP_11
        && headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts.version = version;
    parts.headers = headers;
    Ok(Some((
        RequestHead {
            parts,
            framing,
            keep_alive,
            expect_continue,
        },
        len,
    )))
}

/// What a response head says besides its fields.
#[derive(Debug, Clone, Copy)]
pub struct ResponseMeta {
    /// The request was `HEAD`: no body whatever the headers say.
    pub head_request: bool,
    /// The client's version: an HTTP/1.0 client gets an HTTP/1.0 response.
    pub version: Version,
    /// The connection stays open after this response.
    pub keep_alive: bool,
    /// The body's exact length, when known.
    pub body_len: Option<u64>,
}

/// Writes a response head into `out` (appended) and says how the body is framed: a
/// `Content-Length` in `headers` is kept, else one from the body's known length, else chunked
/// (HTTP/1.1) or until close (HTTP/1.0). No body and no framing for `HEAD`, 1xx, 204 and 304;
/// none either for a 2xx to CONNECT (the caller hands the connection over). `date` is the
/// `Date` value, added when `headers` has none. `Transfer-Encoding` and `Connection` are ours
/// to write. [`OutFraming::Close`] means the connection ends after the body (the head says
/// so).
pub fn encode_response(
    out: &mut Vec<u8>,
    status: StatusCode,
    headers: &HeaderMap,
    meta: ResponseMeta,
    date: &[u8],
) -> OutFraming {
    out.extend_from_slice(if meta.version == Version::HTTP_10 {
        b"HTTP/1.0 "
    } else {
        b"HTTP/1.1 "
    });
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
    let mut framing = None;
    let mut upgrade = false;
    for (name, value) in headers {
        if *name == header::TRANSFER_ENCODING {
            continue;
        }
        if *name == header::CONNECTION {
            // `Upgrade` goes out with a 101; keep-alive is written below.
            upgrade |= status == StatusCode::SWITCHING_PROTOCOLS;
            if !upgrade {
                continue;
            }
        }
        if *name == header::CONTENT_LENGTH {
            let n = value.to_str().ok().and_then(|v| v.trim().parse().ok());
            match (framing, n) {
                (None, Some(n)) => framing = Some(OutFraming::Length(n)),
                _ => continue,
            }
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if !headers.contains_key(header::DATE) {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(date);
        out.extend_from_slice(b"\r\n");
    }
    let no_body = status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED;
    let framing = match (no_body, framing, meta.body_len) {
        (true, ..) => OutFraming::Empty,
        (false, Some(f), _) => f,
        (false, None, Some(n)) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
            OutFraming::Length(n)
        }
        (false, None, None) if meta.head_request => OutFraming::Empty,
        (false, None, None) if meta.version == Version::HTTP_10 => OutFraming::Close,
        (false, None, None) => {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
            OutFraming::Chunked
        }
    };
    // A body delimited by the close ends the connection (the answer to a `HEAD` says what a
    // `GET` would get).
    let keep_alive = meta.keep_alive && framing != OutFraming::Close;
    if !upgrade {
        match (keep_alive, meta.version) {
            (false, Version::HTTP_11) => out.extend_from_slice(b"connection: close\r\n"),
            (true, Version::HTTP_10) => out.extend_from_slice(b"connection: keep-alive\r\n"),
            _ => {}
        }
    }
    out.extend_from_slice(b"\r\n");
    match framing {
        _ if meta.head_request => OutFraming::Empty,
        OutFraming::Length(0) => OutFraming::Empty,
        f => f,
    }
}

/// The `Date` value for now (RFC 9110 §5.6.7), made at most once a second per thread.
pub fn date_now(out: impl FnOnce(&[u8])) {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static DATE: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [0; 29])) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, text)| {
        if *at != secs {
            let s = httpdate::fmt_http_date(now);
            if s.len() == text.len() {
                text.copy_from_slice(s.as_bytes());
                *at = secs;
            }
        }
        out(&text[..]);
    })
}

/// What the body decoder found in the buffer.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    Data(Bytes),
    Trailers(HeaderMap),
    /// The body ended.
    End,
    /// More bytes are needed.
    More,
}

/// A response body's decoder: takes bytes off the front of the read buffer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decoder(State);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Bytes left of a `Content-Length` body.
    Length(u64),
    /// Reading a chunk-size line: the size so far and whether a digit was seen.
    Size(u64, bool),
    /// In the chunk extensions (ignored), with their length so far.
    Ext(u64, usize),
    /// After the size line's CR.
    SizeLf(u64),
    Data(u64),
    DataCr,
    DataLf,
    Trailers,
    Close,
    Done,
}

impl Decoder {
    pub fn new(f: Framing) -> Decoder {
        Decoder(match f {
            Framing::Empty | Framing::Length(0) => State::Done,
            Framing::Length(n) => State::Length(n),
            Framing::Chunked => State::Size(0, false),
            Framing::Close => State::Close,
        })
    }

    /// The body ended: the response is complete.
    pub fn is_done(&self) -> bool {
        self.0 == State::Done
    }

    /// How much to read next for this body: what is left of a small `Content-Length` body
    /// fits in [`READ_SMALL`], anything else is read in [`READ_LARGE`] pieces.
    pub fn read_size(&self) -> usize {
        match self.remaining() {
            Some(n) if n <= READ_SMALL as u64 => READ_SMALL,
            _ => READ_LARGE,
        }
    }

    /// Bytes left of a `Content-Length` body.
    pub fn remaining(&self) -> Option<u64> {
        match self.0 {
            State::Length(n) => Some(n),
            State::Done => Some(0),
            _ => None,
        }
    }

    /// The next piece of the body from the front of `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, Malformed> {
        loop {
            match self.0 {
                State::Done => return Ok(Decoded::End),
                State::Length(n) | State::Data(n) => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(buf.len());
                    let rest = n - take as u64;
                    self.0 = match (self.0, rest) {
                        (State::Length(_), 0) => State::Done,
                        (State::Length(_), r) => State::Length(r),
                        (_, 0) => State::DataCr,
                        (_, r) => State::Data(r),
                    };
                    return Ok(Decoded::Data(buf.split_to(take).freeze()));
                }
                State::Close => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    return Ok(Decoded::Data(buf.split().freeze()));
                }
                State::Trailers => return self.trailers(buf),
                _ => {
                    let Some(&b) = buf.first() else {
                        return Ok(Decoded::More);
                    };
                    buf.advance(1);
                    self.0 = self.framing_byte(b)?;
                }
            }
        }
    }

    /// One byte of chunk framing (size line, the CRLF after the data).
    fn framing_byte(&self, b: u8) -> Result<State, Malformed> {
        let bad = |what| Err(Malformed(what));
        Ok(match (self.0, b) {
            (State::Size(n, _), b) if b.is_ascii_hexdigit() => {
                if n >> 60 != 0 {
                    return bad("chunk size too large");
                }
                let d = match b {
                    b'0'..=b'9' => b - b'0',
                    _ => (b | 0x20) - b'a' + 10,
                };
                State::Size(n << 4 | u64::from(d), true)
            }
            (State::Size(n, true), b';' | b' ' | b'\t') => State::Ext(n, 0),
            (State::Size(n, true), b'\r') | (State::Ext(n, _), b'\r') => State::SizeLf(n),
            (State::Size(..), _) => return bad("bad chunk size"),
            (State::Ext(n, len), b) if b != b'\n' && len < MAX_CHUNK_EXT => State::Ext(n, len + 1),
            (State::Ext(..), _) => return bad("bad chunk extension"),
            (State::SizeLf(0), b'\n') => State::Trailers,
            (State::SizeLf(n), b'\n') => State::Data(n),
            (State::DataCr, b'\r') => State::DataLf,
            (State::DataLf, b'\n') => State::Size(0, false),
            _ => return bad("bad chunk framing"),
        })
    }

    /// The trailer section after the last chunk, up to its empty line.
    fn trailers(&mut self, buf: &mut BytesMut) -> Result<Decoded, Malformed> {
        if buf.starts_with(b"\r\n") {
            buf.advance(2);
            self.0 = State::Done;
            return Ok(Decoded::End);
        }
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            if buf.len() > MAX_HEAD {
                return Err(Malformed("trailer section too large"));
            }
            return Ok(Decoded::More);
        };
        // (The same bound whether the section arrived whole or in pieces.)
        if end + 4 > MAX_HEAD {
            return Err(Malformed("trailer section too large"));
        }
        let section = buf.split_to(end + 4);
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let fields = match httparse::parse_headers(&section, &mut slots) {
            Ok(httparse::Status::Complete((_, fields))) => fields,
            _ => return Err(Malformed("malformed trailer section")),
        };
        self.0 = State::Done;
        Ok(Decoded::Trailers(header_map(fields, 0)?))
    }

    /// The connection reached its end: the end of a body read until close, else a body cut
    /// short.
    pub fn at_eof(&mut self) -> Result<Decoded, Malformed> {
        match self.0 {
            State::Close | State::Done => {
                self.0 = State::Done;
                Ok(Decoded::End)
            }
            _ => Err(Malformed("the connection closed mid-body")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(s: &str, head_request: bool) -> Result<Option<(Head, usize)>, Malformed> {
        parse_response(s.as_bytes(), head_request)
    }

    /// Decodes `wire` fed in pieces of `step` bytes: the data, the trailers, and whether it ended.
    fn decode_in_steps(f: Framing, wire: &[u8], step: usize) -> (Vec<u8>, Option<HeaderMap>, bool) {
        let mut d = Decoder::new(f);
        let mut buf = BytesMut::new();
        let (mut data, mut trailers, mut ended) = (Vec::new(), None, false);
        for piece in wire.chunks(step) {
            buf.extend_from_slice(piece);
            loop {
                match d.decode(&mut buf).expect("valid framing") {
                    Decoded::Data(b) => data.extend_from_slice(&b),
                    Decoded::Trailers(t) => trailers = Some(t),
                    Decoded::End => {
                        ended = true;
                        break;
                    }
                    Decoded::More => break,
                }
            }
        }
        (data, trailers, ended)
    }

    #[test]
    fn request_head_and_framing() {
        let mut out = Vec::new();
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("up"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        let f = encode_request(&mut out, &Method::GET, "/a?b", &h, Some(0));
        assert_eq!(f, OutFraming::Empty);
        assert_eq!(out, b"GET /a?b HTTP/1.1\r\nhost: up\r\n\r\n");
        let f = encode_request(&mut out, &Method::POST, "/", &HeaderMap::new(), Some(0));
        assert_eq!(
            (f, &out[..]),
            (
                OutFraming::Empty,
                &b"POST / HTTP/1.1\r\ncontent-length: 0\r\n\r\n"[..]
            )
        );
        let f = encode_request(&mut out, &Method::PUT, "/", &HeaderMap::new(), Some(300));
        assert_eq!(f, OutFraming::Length(300));
        assert!(out.ends_with(b"content-length: 300\r\n\r\n"));
        let f = encode_request(&mut out, &Method::POST, "/", &HeaderMap::new(), None);
        assert_eq!(f, OutFraming::Chunked);
        assert!(out.ends_with(b"transfer-encoding: chunked\r\n\r\n"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from_static("12"));
        let f = encode_request(&mut out, &Method::POST, "/", &h, None);
        assert_eq!(f, OutFraming::Length(12));
        assert_eq!(
            out,
            b"POST / HTTP/1.1\r\nhost: up\r\ncontent-length: 12\r\n\r\n"
        );
    }

    #[test]
    fn chunk_lines() {
        let mut out = Vec::new();
        chunk_size_line(&mut out, 0x1a2f);
        chunk_size_line(&mut out, 0);
        assert_eq!(out, b"1a2f\r\n0\r\n");
        out.clear();
        let mut t = HeaderMap::new();
        t.insert("x-sum", HeaderValue::from_static("9"));
        last_chunk(&mut out, Some(&t));
        assert_eq!(out, b"0\r\nx-sum: 9\r\n\r\n");
    }

    fn req(s: &str) -> Result<Option<(RequestHead, usize)>, BadRequest> {
        parse_request(s.as_bytes())
    }

    #[test]
    fn request_heads() {
        let wire = "\r\nPOST /a?b HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc";
        let (h, n) = req(wire).unwrap().unwrap();
        assert_eq!(&wire[n..], "abc");
        assert_eq!(
            (h.parts.method, h.parts.uri.to_string()),
            (Method::POST, "/a?b".into())
        );
        assert_eq!(
            (h.framing, h.keep_alive, h.expect_continue),
            (Framing::Length(3), true, false)
        );
        let (h, _) = req("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert_eq!(
            (h.parts.version, h.keep_alive, h.framing),
            (Version::HTTP_10, false, Framing::Empty)
        );
        let (h, _) = req("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.keep_alive);
        let (h, _) = req("GET / HTTP/1.1\r\nConnection: upgrade, close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        let (h, _) = req(
            "PUT / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\nExpect: 100-Continue\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!((h.framing, h.expect_continue), (Framing::Chunked, true));
        let (h, _) = req("CONNECT example.com:443 HTTP/1.1\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            h.parts.uri.authority().map(|a| a.as_str()),
            Some("example.com:443")
        );
        assert!(req("GET / HTTP/1.1\r\nHost: t\r\n").unwrap().is_none());
    }

    #[test]
    fn bad_request_heads() {
        for s in [
            "GET\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: v\r\n\r\n",
            "GET / HTTP/3.0\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: 1, 2\r\n\r\n",
            "POST / HTTP/1.1\r\nContent-Length: +1\r\n\r\n",
        ] {
            assert!(matches!(req(s), Err(BadRequest::Malformed(_))), "{s:?}");
        }
        let long = format!("GET / HTTP/1.1\r\nx: {}", "a".repeat(MAX_HEAD));
        assert_eq!(req(&long).err(), Some(BadRequest::TooLarge));
        let many: String = (0..=MAX_HEADERS).map(|i| format!("h{i}: v\r\n")).collect();
        assert_eq!(
            req(&format!("GET / HTTP/1.1\r\n{many}\r\n")).err(),
            Some(BadRequest::TooLarge)
        );
        assert_eq!(
            BadRequest::TooLarge.status(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        );
    }

    fn resp(status: u16, h: &HeaderMap, meta: ResponseMeta) -> (String, OutFraming) {
        let mut out = Vec::new();
        let status = StatusCode::from_u16(status).unwrap();
        let f = encode_response(&mut out, status, h, meta, b"Thu, 01 Jan 1970 00:00:00 GMT");
        (String::from_utf8(out).unwrap(), f)
    }

    #[test]
    fn response_heads_and_framing() {
        let meta = ResponseMeta {
            head_request: false,
            version: Version::HTTP_11,
            keep_alive: true,
            body_len: Some(3),
        };
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        h.insert(header::CONNECTION, HeaderValue::from_static("keep-alive"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        let (s, f) = resp(200, &h, meta);
        assert_eq!(
            s,
            "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ndate: Thu, 01 Jan 1970 00:00:00 GMT\r\ncontent-length: 3\r\n\r\n"
        );
        assert_eq!(f, OutFraming::Length(3));
        let unknown = ResponseMeta {
            body_len: None,
            ..meta
        };
        let (s, f) = resp(200, &HeaderMap::new(), unknown);
        assert!(s.ends_with("transfer-encoding: chunked\r\n\r\n"), "{s}");
        assert_eq!(f, OutFraming::Chunked);
        let old = ResponseMeta {
            version: Version::HTTP_10,
            ..unknown
        };
        let (s, f) = resp(200, &HeaderMap::new(), old);
        assert!(
            s.starts_with("HTTP/1.0 200 OK\r\n") && !s.contains("keep-alive"),
            "{s}"
        );
        assert_eq!(f, OutFraming::Close);
        let (s, _) = resp(
            200,
            &HeaderMap::new(),
            ResponseMeta {
                version: Version::HTTP_10,
                ..meta
            },
        );
        assert!(s.contains("connection: keep-alive\r\n"), "{s}");
        let (s, f) = resp(
            200,
            &HeaderMap::new(),
            ResponseMeta {
                keep_alive: false,
                ..meta
            },
        );
        assert!(s.contains("connection: close\r\n"), "{s}");
        assert_eq!(f, OutFraming::Length(3));
        let (s, f) = resp(
            200,
            &HeaderMap::new(),
            ResponseMeta {
                head_request: true,
                ..meta
            },
        );
        assert!(s.contains("content-length: 3\r\n"), "{s}");
        assert_eq!(f, OutFraming::Empty);
        for code in [204, 304, 101] {
            let (s, f) = resp(code, &HeaderMap::new(), unknown);
            assert!(
                !s.contains("content-length") && !s.contains("transfer-encoding"),
                "{s}"
            );
            assert_eq!(f, OutFraming::Empty);
        }
        let mut up = HeaderMap::new();
        up.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        up.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        let (s, _) = resp(101, &up, meta);
        assert!(s.contains("connection: Upgrade\r\n"), "{s}");
        let mut dated = HeaderMap::new();
        dated.insert(header::DATE, HeaderValue::from_static("x"));
        dated.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        let (s, f) = resp(200, &dated, unknown);
        assert_eq!(s.matches("date").count(), 1, "{s}");
        assert_eq!(f, OutFraming::Empty);
    }

    #[test]
    fn response_heads() {
        let (h, n) = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", false)
            .unwrap()
            .unwrap();
        assert_eq!(
            (h.status, h.framing, h.keep_alive, n),
            (StatusCode::OK, Framing::Length(5), true, 38)
        );
        let (h, _) = head("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Empty);
        for s in ["204 No Content", "304 Not Modified", "100 Continue"] {
            let (h, _) = head(&format!("HTTP/1.1 {s}\r\nContent-Length: 5\r\n\r\n"), false)
                .unwrap()
                .unwrap();
            assert_eq!(h.framing, Framing::Empty, "{s}");
        }
        let (h, _) = head("HTTP/1.1 100 Continue\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert!(h.is_interim());
        let (h, _) = head(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Chunked, true));
        let (h, _) = head(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Chunked, false));
        let (h, _) = head("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Close, false));
        let (h, _) = head("HTTP/1.1 200 OK\r\n\r\n", false).unwrap().unwrap();
        assert_eq!((h.framing, h.keep_alive), (Framing::Close, false));
        let (h, _) = head(
            "HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert!(!h.keep_alive);
        let (h, _) = head("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        let (h, _) = head(
            "HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 1\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert!(h.keep_alive);
        let (h, _) = head("HTTP/1.1 200 OK\r\nContent-Length: 7, 7\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Length(7));
        assert!(head("HTTP/1.1 200 OK\r\nContent-Le", false)
            .unwrap()
            .is_none());
    }

    #[test]
    fn bad_response_heads() {
        for s in [
            "HTTP/1.1 200 OK\r\nContent-Length: 7\r\nContent-Length: 8\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "HTTX/1.1 200 OK\r\n\r\n",
            "HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n",
            "HTTP/1.1 101 Switching Protocols\r\n\r\n",
        ] {
            assert!(head(s, false).is_err(), "{s:?}");
        }
        let long = format!("HTTP/1.1 200 OK\r\nx: {}", "a".repeat(MAX_HEAD));
        assert_eq!(
            head(&long, false).err(),
            Some(Malformed("response head too large"))
        );
        let many: String = (0..=MAX_HEADERS).map(|i| format!("h{i}: v\r\n")).collect();
        assert!(head(&format!("HTTP/1.1 200 OK\r\n{many}\r\n"), false).is_err());
    }

    #[test]
    fn bodies_split_at_every_byte() {
        let chunked = b"5;name=\"v\";x\r\nhello\r\n1A\r\nabcdefghijklmnopqrstuvwxyz\r\n0;last\r\nx-sum: 31\r\nx-b: 2\r\n\r\n";
        let want: Vec<u8> = [&b"hello"[..], b"abcdefghijklmnopqrstuvwxyz"].concat();
        for step in 1..=chunked.len() {
            let (data, trailers, ended) = decode_in_steps(Framing::Chunked, chunked, step);
            assert_eq!(data, want, "step {step}");
            let t = trailers.expect("trailers");
            assert_eq!(
                (t.get("x-sum").unwrap(), t.len()),
                (&HeaderValue::from_static("31"), 2)
            );
            assert!(ended);
        }
        let plain = b"0\r\n\r\n";
        for step in 1..=plain.len() {
            assert_eq!(
                decode_in_steps(Framing::Chunked, plain, step),
                (vec![], None, true)
            );
        }
        for step in 1..=10 {
            let (data, _, ended) = decode_in_steps(Framing::Length(10), b"0123456789", step);
            assert_eq!((data, ended), (b"0123456789".to_vec(), true));
        }
    }

    #[test]
    fn length_body_leaves_the_next_bytes() {
        let mut d = Decoder::new(Framing::Length(3));
        let mut buf = BytesMut::from(&b"abcHTTP"[..]);
        assert_eq!(
            d.decode(&mut buf).unwrap(),
            Decoded::Data(Bytes::from_static(b"abc"))
        );
        assert!(d.is_done());
        assert_eq!(d.decode(&mut buf).unwrap(), Decoded::End);
        assert_eq!(&buf[..], b"HTTP");
    }

    #[test]
    fn bad_chunk_framing() {
        for wire in [
            &b"x\r\n"[..],
            b";ext\r\n",
            b"5\r\nhelloX\r\n",
            b"5\nhello",
            b"fffffffffffffffff\r\n",
            b"0\r\nbad trailer\r\n\r\n",
        ] {
            let mut d = Decoder::new(Framing::Chunked);
            let mut buf = BytesMut::from(wire);
            let r = (0..10).try_for_each(|_| d.decode(&mut buf).map(|_| ()));
            assert!(r.is_err(), "{wire:?}");
        }
        let mut d = Decoder::new(Framing::Chunked);
        let mut buf = BytesMut::from(&format!("1;{}\r\n", "e".repeat(MAX_CHUNK_EXT + 1))[..]);
        assert!(d.decode(&mut buf).is_err());
    }

    #[test]
    fn eof_ends_only_a_body_read_until_close() {
        let mut d = Decoder::new(Framing::Close);
        let mut buf = BytesMut::from(&b"abc"[..]);
        assert_eq!(
            d.decode(&mut buf).unwrap(),
            Decoded::Data(Bytes::from_static(b"abc"))
        );
        assert_eq!(d.decode(&mut buf).unwrap(), Decoded::More);
        assert_eq!(d.at_eof(), Ok(Decoded::End));
        for f in [Framing::Length(4), Framing::Chunked] {
            assert!(Decoder::new(f).at_eof().is_err());
        }
    }
}
