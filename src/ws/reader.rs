//! Turns client bytes into WebSocket messages, enforcing RFC 6455 strictly: masking, reserved
//! bits, opcodes, control-frame rules, fragmentation order, UTF-8 (also across fragments) and the
//! message size limit. Pure state machine: bytes in (unmasked in place), events out; no I/O.
//!
//! With permessage-deflate negotiated, RSV1 marks the first frame of a compressed message;
//! such messages come out as [`Event::Compressed`] for the caller to inflate (and, for text,
//! to validate after inflating).

use super::close::CloseCode;
use super::frame::{parse_header, unmask, Header, OpCode};

/// One thing the peer said.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A complete text message; the bytes are valid UTF-8.
    Text(&'a [u8]),
    Binary(&'a [u8]),
    /// A complete permessage-deflate message, still compressed (without the sync-flush tail).
    Compressed {
        text: bool,
        data: &'a [u8],
    },
    Ping(&'a [u8]),
    Pong(&'a [u8]),
    /// A close frame: the code and reason, or `None` when it carried no body.
    Close(Option<(u16, &'a str)>),
}

/// Why the connection must be failed, with the close code to send.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadError {
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("invalid UTF-8 in a text message or close reason")]
    InvalidUtf8,
    #[error("message larger than {0} bytes")]
    TooBig(usize),
}

impl ReadError {
    pub fn close_code(&self) -> CloseCode {
        match self {
            ReadError::Protocol(_) => CloseCode::PROTOCOL,
            ReadError::InvalidUtf8 => CloseCode::INVALID_DATA,
            ReadError::TooBig(_) => CloseCode::TOO_BIG,
        }
    }
}

/// What `Reader::feed` did with the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fed {
    /// Bytes of whole frames consumed from the front of the buffer.
    pub consumed: usize,
    /// Total size of the incomplete frame at `consumed`, once its header is known (0 otherwise),
    /// so the caller can reserve exactly that much instead of growing step by step.
    pub next_frame_len: usize,
}

/// The callback's answer: keep going, or stop after this event (e.g. after a close).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Continue,
    Stop,
}

/// A fragmented message being reassembled.
#[derive(Debug)]
struct Partial {
    text: bool,
    compressed: bool,
    data: Vec<u8>,
    /// Prefix of `data` already known to be valid UTF-8 (text only).
    utf8_checked: usize,
}

#[derive(Debug)]
pub struct Reader {
    max_message: usize,
    /// permessage-deflate was negotiated: RSV1 may start a data message.
    deflate: bool,
    partial: Option<Partial>,
}

impl Reader {
    pub fn new(max_message: usize) -> Reader {
        Reader {
            max_message,
            deflate: false,
            partial: None,
        }
    }

    /// A reader for a connection with permessage-deflate negotiated.
    pub fn with_deflate(max_message: usize) -> Reader {
        Reader {
            deflate: true,
            ..Reader::new(max_message)
        }
    }

    /// Consumes the complete frames at the front of `buf` (unmasking them in place) and reports
    /// each message or control frame to `on`. Stops early when `on` says so.
    pub fn feed(
        &mut self,
        buf: &mut [u8],
        mut on: impl FnMut(Event<'_>) -> Flow,
    ) -> Result<Fed, ReadError> {
        let mut pos = 0;
        loop {
            let rest = &mut buf[pos..];
            let Some(h) =
                parse_header(rest).map_err(|_| ReadError::Protocol("bad frame header"))?
            else {
                return Ok(Fed {
                    consumed: pos,
                    next_frame_len: 0,
                });
            };
            self.check_header(&h)?;
            let total = h.header_len as u64 + h.payload_len;
            if (rest.len() as u64) < total {
                return Ok(Fed {
                    consumed: pos,
                    next_frame_len: total as usize, // bounded by check_header's size limit
                });
            }
            let total = total as usize;
            let payload = &mut rest[h.header_len..total];
            if let Some(mask) = h.mask {
                unmask(payload, mask);
            }
            pos += total;
            if self.on_frame(&h, payload, &mut on)? == Flow::Stop {
                return Ok(Fed {
                    consumed: pos,
                    next_frame_len: 0,
                });
            }
        }
    }

    fn check_header(&self, h: &Header) -> Result<(), ReadError> {
        if h.mask.is_none() {
            return Err(ReadError::Protocol("client frame not masked"));
        }
        if h.rsv & 0b011 != 0 {
            return Err(ReadError::Protocol("reserved bits set"));
        }
        if h.rsv & 0b100 != 0 {
            // RSV1 is permessage-deflate's "compressed" bit: first frame of a data message only.
            if !self.deflate {
                return Err(ReadError::Protocol("reserved bits set"));
            }
            if !matches!(h.opcode, OpCode::Text | OpCode::Binary) {
                return Err(ReadError::Protocol(
                    "RSV1 on a control or continuation frame",
                ));
            }
        }
        if h.opcode.is_control() {
            if !h.fin {
                return Err(ReadError::Protocol("fragmented control frame"));
            }
            if h.payload_len > 125 {
                return Err(ReadError::Protocol("control frame over 125 bytes"));
            }
            return Ok(());
        }
        match (h.opcode, &self.partial) {
            (OpCode::Continuation, None) => {
                return Err(ReadError::Protocol("continuation without a message"))
            }
            (OpCode::Text | OpCode::Binary, Some(_)) => {
                return Err(ReadError::Protocol("new message inside a fragmented one"))
            }
            _ => {}
        }
        let so_far = self.partial.as_ref().map_or(0, |p| p.data.len()) as u64;
        if so_far + h.payload_len > self.max_message as u64 {
            return Err(ReadError::TooBig(self.max_message));
        }
        Ok(())
    }

    fn on_frame(
        &mut self,
        h: &Header,
        payload: &[u8],
        on: &mut impl FnMut(Event<'_>) -> Flow,
    ) -> Result<Flow, ReadError> {
        match h.opcode {
            OpCode::Ping => Ok(on(Event::Ping(payload))),
            OpCode::Pong => Ok(on(Event::Pong(payload))),
            OpCode::Close => Ok(on(Event::Close(parse_close(payload)?))),
            OpCode::Text | OpCode::Binary if h.fin && h.rsv != 0 => Ok(on(Event::Compressed {
                text: h.opcode == OpCode::Text,
                data: payload,
            })),
            OpCode::Text | OpCode::Binary if h.fin => {
                let text = h.opcode == OpCode::Text;
                if text && simdutf8::basic::from_utf8(payload).is_err() {
                    return Err(ReadError::InvalidUtf8);
                }
                Ok(on(if text {
                    Event::Text(payload)
                } else {
                    Event::Binary(payload)
                }))
            }
            OpCode::Text | OpCode::Binary => {
                let mut p = Partial {
                    text: h.opcode == OpCode::Text,
                    compressed: h.rsv != 0,
                    data: payload.to_vec(),
                    utf8_checked: 0,
                };
                p.check_utf8(false)?;
                self.partial = Some(p);
                Ok(Flow::Continue)
            }
            OpCode::Continuation => {
                let Some(p) = self.partial.as_mut() else {
                    return Err(ReadError::Protocol("continuation without a message"));
                };
                p.data.extend_from_slice(payload);
                p.check_utf8(h.fin)?;
                if !h.fin {
                    return Ok(Flow::Continue);
                }
                let Some(p) = self.partial.take() else {
                    return Err(ReadError::Protocol("continuation without a message"));
                };
                Ok(on(if p.compressed {
                    Event::Compressed {
                        text: p.text,
                        data: &p.data,
                    }
                } else if p.text {
                    Event::Text(&p.data)
                } else {
                    Event::Binary(&p.data)
                }))
            }
        }
    }
}

impl Partial {
    /// Validates the bytes added since the last check; an incomplete code point at the end is
    /// fine until the final fragment, an invalid one fails at once (fail fast, RFC 6455 §8.1).
    fn check_utf8(&mut self, last: bool) -> Result<(), ReadError> {
        if !self.text || self.compressed {
            return Ok(());
        }
        match simdutf8::compat::from_utf8(&self.data[self.utf8_checked..]) {
            Ok(_) => self.utf8_checked = self.data.len(),
            Err(e) if e.error_len().is_none() && !last => self.utf8_checked += e.valid_up_to(),
            Err(_) => return Err(ReadError::InvalidUtf8),
        }
        Ok(())
    }
}

fn parse_close(payload: &[u8]) -> Result<Option<(u16, &str)>, ReadError> {
    match payload {
        [] => Ok(None),
        [_] => Err(ReadError::Protocol("close frame with a one-byte body")),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            if !CloseCode(code).is_valid_on_wire() {
                return Err(ReadError::Protocol("invalid close code"));
            }
            let reason = simdutf8::basic::from_utf8(reason).map_err(|_| ReadError::InvalidUtf8)?;
            Ok(Some((code, reason)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::frame::write_masked_frame;
    use super::*;

    #[derive(Debug, PartialEq)]
    enum Owned {
        Text(String),
        Binary(Vec<u8>),
        Ping(Vec<u8>),
        Pong(Vec<u8>),
        Compressed(bool, Vec<u8>),
        Close(Option<(u16, String)>),
    }

    fn frame(fin: bool, op: OpCode, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        write_masked_frame(&mut v, fin, op, [9, 8, 7, 6], payload);
        v
    }

    fn run(reader: &mut Reader, bytes: &[u8]) -> (Result<Fed, ReadError>, Vec<Owned>) {
        let mut buf = bytes.to_vec();
        let mut got = Vec::new();
        let r = reader.feed(&mut buf, |e| {
            got.push(match e {
                Event::Text(t) => Owned::Text(String::from_utf8(t.to_vec()).unwrap()),
                Event::Binary(b) => Owned::Binary(b.to_vec()),
                Event::Ping(b) => Owned::Ping(b.to_vec()),
                Event::Pong(b) => Owned::Pong(b.to_vec()),
                Event::Compressed { text, data } => Owned::Compressed(text, data.to_vec()),
                Event::Close(c) => Owned::Close(c.map(|(c, r)| (c, r.to_string()))),
            });
            Flow::Continue
        });
        (r, got)
    }

    fn events(bytes: &[u8]) -> Result<Vec<Owned>, ReadError> {
        let (r, got) = run(&mut Reader::new(1 << 20), bytes);
        r.map(|_| got)
    }

    #[test]
    fn single_frames() {
        let mut b = frame(true, OpCode::Text, "héllo".as_bytes());
        b.extend(frame(true, OpCode::Binary, &[0, 255]));
        b.extend(frame(true, OpCode::Ping, b"p"));
        b.extend(frame(true, OpCode::Pong, b""));
        assert_eq!(
            events(&b).unwrap(),
            vec![
                Owned::Text("héllo".into()),
                Owned::Binary(vec![0, 255]),
                Owned::Ping(b"p".to_vec()),
                Owned::Pong(vec![])
            ]
        );
    }

    #[test]
    fn fragments_with_control_in_between() {
        let mut b = frame(false, OpCode::Text, b"ab");
        b.extend(frame(true, OpCode::Ping, b"x"));
        b.extend(frame(false, OpCode::Continuation, b"cd"));
        b.extend(frame(true, OpCode::Continuation, b"e"));
        assert_eq!(
            events(&b).unwrap(),
            vec![Owned::Ping(b"x".to_vec()), Owned::Text("abcde".into())]
        );
    }

    #[test]
    fn partial_frames_are_left_for_later() {
        let b = frame(true, OpCode::Binary, &[1u8; 300]);
        let mut r = Reader::new(1 << 20);
        let (fed, got) = run(&mut r, &b[..100]);
        assert_eq!(
            fed.unwrap(),
            Fed {
                consumed: 0,
                next_frame_len: b.len()
            }
        );
        assert!(got.is_empty());
        let (fed, got) = run(&mut r, &b);
        assert_eq!(fed.unwrap().consumed, b.len());
        assert_eq!(got.len(), 1);
    }

    #[test]
    fn utf8_split_across_fragments_is_fine() {
        let s = "€".as_bytes(); // three bytes
        let mut b = frame(false, OpCode::Text, &s[..1]);
        b.extend(frame(false, OpCode::Continuation, &s[1..2]));
        b.extend(frame(true, OpCode::Continuation, &s[2..]));
        assert_eq!(events(&b).unwrap(), vec![Owned::Text("€".into())]);
    }

    #[test]
    fn invalid_utf8_fails_fast_in_a_fragment() {
        let mut r = Reader::new(1 << 20);
        let mut b = frame(false, OpCode::Text, b"ok");
        b.extend(frame(false, OpCode::Continuation, &[0xC0, 0xAF]));
        assert_eq!(run(&mut r, &b).0, Err(ReadError::InvalidUtf8));
        // Incomplete at the end of the last fragment is invalid too.
        let mut b = frame(false, OpCode::Text, b"ok");
        b.extend(frame(true, OpCode::Continuation, &[0xE2, 0x82]));
        assert_eq!(events(&b), Err(ReadError::InvalidUtf8));
        assert_eq!(
            events(&frame(true, OpCode::Text, &[0xFF])),
            Err(ReadError::InvalidUtf8)
        );
    }

    #[test]
    fn protocol_violations() {
        let cases: Vec<Vec<u8>> = vec![
            frame(true, OpCode::Continuation, b"x"),
            {
                let mut b = frame(false, OpCode::Text, b"a");
                b.extend(frame(true, OpCode::Binary, b"b"));
                b
            },
            frame(false, OpCode::Ping, b""),
            frame(true, OpCode::Ping, &[0u8; 126]),
            {
                let mut b = frame(true, OpCode::Text, b"a");
                b[0] |= 0x40; // RSV1 without an extension
                b
            },
            vec![0x81, 0x01, b'a'], // unmasked
            frame(true, OpCode::Close, &[3]),
            frame(true, OpCode::Close, &1005u16.to_be_bytes()),
            frame(true, OpCode::Close, &999u16.to_be_bytes()),
        ];
        for (i, c) in cases.iter().enumerate() {
            let err = events(c).unwrap_err();
            assert_eq!(err.close_code(), CloseCode::PROTOCOL, "case {i}: {err}");
        }
    }

    #[test]
    fn close_frames() {
        assert_eq!(
            events(&frame(true, OpCode::Close, b"")).unwrap(),
            vec![Owned::Close(None)]
        );
        let mut body = 4000u16.to_be_bytes().to_vec();
        body.extend_from_slice(b"bye");
        assert_eq!(
            events(&frame(true, OpCode::Close, &body)).unwrap(),
            vec![Owned::Close(Some((4000, "bye".into())))]
        );
        let mut bad = 1000u16.to_be_bytes().to_vec();
        bad.push(0xFF);
        assert_eq!(
            events(&frame(true, OpCode::Close, &bad)),
            Err(ReadError::InvalidUtf8)
        );
    }

    #[test]
    fn size_limit_counts_the_whole_message() {
        let mut r = Reader::new(200);
        // One frame over the limit is refused from its header alone.
        let (res, _) = run(&mut r, &frame(true, OpCode::Binary, &[0u8; 201])[..10]);
        assert_eq!(res, Err(ReadError::TooBig(200)));
        let mut r = Reader::new(200);
        let mut b = frame(false, OpCode::Binary, &[0u8; 150]);
        b.extend(frame(true, OpCode::Continuation, &[0u8; 51]));
        assert_eq!(run(&mut r, &b).0, Err(ReadError::TooBig(200)));
    }

    fn rsv1(mut f: Vec<u8>) -> Vec<u8> {
        f[0] |= 0x40;
        f
    }

    #[test]
    fn compressed_messages_with_deflate() {
        let mut r = Reader::with_deflate(1 << 20);
        // Compressed bytes need not be UTF-8: validation happens after inflating.
        let mut b = rsv1(frame(true, OpCode::Text, &[0xFF, 0x00]));
        b.extend(rsv1(frame(false, OpCode::Binary, b"ab")));
        b.extend(frame(true, OpCode::Ping, b""));
        b.extend(frame(true, OpCode::Continuation, &[0xC0]));
        b.extend(frame(true, OpCode::Text, b"plain"));
        let (res, got) = run(&mut r, &b);
        res.unwrap();
        assert_eq!(
            got,
            vec![
                Owned::Compressed(true, vec![0xFF, 0x00]),
                Owned::Ping(vec![]),
                Owned::Compressed(false, vec![b'a', b'b', 0xC0]),
                Owned::Text("plain".into()),
            ]
        );
    }

    #[test]
    fn rsv1_misuse_is_a_protocol_error() {
        for b in [
            rsv1(frame(true, OpCode::Ping, b"")),
            {
                let mut b = frame(false, OpCode::Text, b"a");
                b.extend(rsv1(frame(true, OpCode::Continuation, b"b")));
                b
            },
            {
                let mut f = frame(true, OpCode::Text, b"a");
                f[0] |= 0x20; // RSV2 is never ours
                f
            },
        ] {
            let (res, _) = run(&mut Reader::with_deflate(1 << 20), &b);
            assert_eq!(res.unwrap_err().close_code(), CloseCode::PROTOCOL);
        }
        // Without negotiation RSV1 is just a reserved bit.
        let (res, _) = run(
            &mut Reader::new(1 << 20),
            &rsv1(frame(true, OpCode::Text, b"a")),
        );
        assert_eq!(res.unwrap_err().close_code(), CloseCode::PROTOCOL);
    }

    #[test]
    fn stop_leaves_the_rest() {
        let mut b = frame(true, OpCode::Close, b"");
        let first = b.len();
        b.extend(frame(true, OpCode::Text, b"after"));
        let mut buf = b.clone();
        let fed = Reader::new(100).feed(&mut buf, |_| Flow::Stop).unwrap();
        assert_eq!(fed.consumed, first);
    }
}
