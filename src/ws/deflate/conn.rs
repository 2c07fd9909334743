//! One connection's permessage-deflate state, and the per-shard contexts it borrows.
//!
//! Memory is the point here (it is what hurts Node `ws` users): a deflate context with a 15-bit
//! window costs ~256 KiB, an inflate context ~40 KiB. A direction without context takeover needs
//! no state between messages, so it uses one context per shard (reset after every message)
//! instead of one per connection. Where takeover was agreed, the connection's own context is
//! created on its first compressed message; the compressor is dropped again when the connection
//! goes idle (the server may always start a message without back-references), the inflater must
//! stay (the client may refer to earlier messages).

use std::cell::RefCell;
use std::ops::Deref;

use super::codec::{Deflater, InflateError, Inflater};
use super::negotiate::Params;
use crate::ws::frame::{header_len, write_header, OpCode};
use crate::ws::outbox::Outbox;

/// Output buffers above this size are not kept for reuse.
const KEEP_BUF: usize = 1 << 20;

/// Per-shard contexts for directions without context takeover, and scratch buffers.
#[derive(Default)]
struct Shared {
    inflater: Option<Inflater>,
    /// Indexed by window bits - 9.
    deflaters: [Option<Deflater>; 7],
    deflater_level: u32,
    inflated: Vec<u8>,
    compressed: Vec<u8>,
}

thread_local! {
    static SHARED: RefCell<Shared> = RefCell::new(Shared::default());
}

/// Compression settings from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tuning {
    pub level: u32,
    /// Messages shorter than this go out uncompressed.
    pub threshold: usize,
}

pub struct ConnDeflate {
    params: Params,
    tuning: Tuning,
    deflater: Option<Deflater>,
    inflater: Option<Inflater>,
}

/// An inflated message, in a buffer borrowed from the shard (returned on drop).
pub struct Inflated(Vec<u8>);

impl Deref for Inflated {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Inflated {
    fn drop(&mut self) {
        if self.0.capacity() <= KEEP_BUF {
            let buf = std::mem::take(&mut self.0);
            SHARED.with(|s| s.borrow_mut().inflated = buf);
        }
    }
}

impl ConnDeflate {
    pub fn new(params: Params, tuning: Tuning) -> ConnDeflate {
        ConnDeflate {
            params,
            tuning,
            deflater: None,
            inflater: None,
        }
    }

    /// Inflates one compressed message, refusing to produce more than `limit` bytes.
    pub fn inflate(&mut self, data: &[u8], limit: usize) -> Result<Inflated, InflateError> {
        SHARED.with(|s| {
            let mut s = s.borrow_mut();
            let mut out = std::mem::take(&mut s.inflated);
            out.clear();
            let res = if self.params.client_no_context_takeover {
                s.inflater
                    .get_or_insert_with(|| Inflater::new(false))
                    .inflate(data, limit, &mut out)
            } else {
                self.inflater
                    .get_or_insert_with(|| Inflater::new(true))
                    .inflate(data, limit, &mut out)
            };
            res.map(|()| Inflated(out))
        })
    }

    /// Appends `payload` to `out` as one message frame, compressed (RSV1) when it is at least
    /// `threshold` bytes and compressing pays off.
    pub fn frame(&mut self, out: &mut Outbox, opcode: OpCode, payload: &[u8]) {
        if payload.len() < self.tuning.threshold {
            return out.frame(opcode, payload);
        }
        SHARED.with(|s| {
            let mut s = s.borrow_mut();
            let s = &mut *s;
            s.compressed.clear();
            let bits = self.params.server_max_window_bits;
            if self.params.server_no_context_takeover {
                if s.deflater_level != self.tuning.level {
                    s.deflaters = Default::default();
                    s.deflater_level = self.tuning.level;
                }
                let slot = &mut s.deflaters[usize::from(bits.clamp(9, 15) - 9)];
                slot.get_or_insert_with(|| Deflater::new(self.tuning.level, bits, false))
                    .compress(payload, &mut s.compressed);
                // Each message stands alone, so sending it plain is fine when that is smaller.
                if s.compressed.len() >= payload.len() {
                    return out.frame(opcode, payload);
                }
            } else {
                // With takeover the client's window must see everything we compressed: once
                // compressed, a message goes out compressed.
                self.deflater
                    .get_or_insert_with(|| Deflater::new(self.tuning.level, bits, true))
                    .compress(payload, &mut s.compressed);
            }
            out.compressed_frame(opcode, &s.compressed);
            if s.compressed.capacity() > KEEP_BUF {
                s.compressed = Vec::new();
            }
        })
    }

    /// Frees what an idle connection need not keep: its own compressor (the next message simply
    /// starts without back-references, which the client's inflater handles).
    pub fn shrink_idle(&mut self) {
        self.deflater = None;
    }
}

/// Compresses a broadcast message once for every connection that takes shared frames
/// (no server context takeover, 15-bit window): the whole frame (text or binary, as `opcode`)
/// with RSV1, or `None` when the message is under `threshold` or would not shrink.
pub fn shared_frame(payload: &[u8], tuning: Tuning, opcode: OpCode) -> Option<bytes::Bytes> {
    if payload.len() < tuning.threshold {
        return None;
    }
    SHARED.with(|s| {
        let mut s = s.borrow_mut();
        let s = &mut *s;
        if s.deflater_level != tuning.level {
            s.deflaters = Default::default();
            s.deflater_level = tuning.level;
        }
        s.compressed.clear();
        s.deflaters[15 - 9]
            .get_or_insert_with(|| Deflater::new(tuning.level, 15, false))
            .compress(payload, &mut s.compressed);
        if s.compressed.len() >= payload.len() {
            return None;
        }
        let mut frame =
            bytes::BytesMut::with_capacity(header_len(s.compressed.len()) + s.compressed.len());
        write_header(&mut frame, true, true, opcode, s.compressed.len());
        frame.extend_from_slice(&s.compressed);
        Some(frame.freeze())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::deflate::negotiate;
    use crate::ws::deflate::Policy;
    use crate::ws::frame::parse_header;
    use std::io::IoSlice;

    fn params(offer: &str, policy: Policy) -> Params {
        negotiate([offer], &policy).unwrap()
    }

    /// Decodes the server frames in `out` with a client-side inflater.
    fn client_read(out: &Outbox, inflater: &mut Inflater) -> Vec<(bool, Vec<u8>)> {
        let mut slices = [IoSlice::new(&[]); 64];
        let n = out.slices(&mut slices);
        let bytes: Vec<u8> = slices[..n].iter().flat_map(|s| s.iter().copied()).collect();
        let mut pos = 0;
        let mut msgs = Vec::new();
        while pos < bytes.len() {
            let h = parse_header(&bytes[pos..]).unwrap().unwrap();
            let body = &bytes[pos + h.header_len..pos + h.header_len + h.payload_len as usize];
            let compressed = h.rsv & 0b100 != 0;
            let msg = if compressed {
                let mut v = Vec::new();
                inflater.inflate(body, 1 << 20, &mut v).unwrap();
                v
            } else {
                body.to_vec()
            };
            msgs.push((compressed, msg));
            pos += h.header_len + h.payload_len as usize;
        }
        msgs
    }

    #[test]
    fn frames_round_trip_in_both_takeover_modes() {
        let tuning = Tuning {
            level: 6,
            threshold: 32,
        };
        for offer in [
            "permessage-deflate",
            "permessage-deflate; server_no_context_takeover",
            "permessage-deflate; server_max_window_bits=10",
        ] {
            let p = params(offer, Policy::default());
            let mut c = ConnDeflate::new(p, tuning);
            let mut out = Outbox::default();
            let big =
                br#"{"type":"message","topic":"room-1","data":{"text":"hello hello hello hello"}}"#;
            c.frame(&mut out, OpCode::Text, big);
            c.frame(&mut out, OpCode::Text, b"tiny");
            c.frame(&mut out, OpCode::Text, big);
            let mut client = Inflater::new(!p.server_no_context_takeover);
            let got = client_read(&out, &mut client);
            assert_eq!(got.len(), 3, "{offer}");
            assert_eq!(got[0], (true, big.to_vec()), "{offer}");
            assert_eq!(got[1], (false, b"tiny".to_vec()), "{offer}");
            assert_eq!(got[2].1, big.to_vec(), "{offer}");
        }
    }

    #[test]
    fn shrinking_an_idle_compressor_keeps_the_stream_decodable() {
        let p = params("permessage-deflate", Policy::default());
        let mut c = ConnDeflate::new(
            p,
            Tuning {
                level: 1,
                threshold: 0,
            },
        );
        let mut out = Outbox::default();
        let msg = b"the same words again and again and again";
        c.frame(&mut out, OpCode::Text, msg);
        c.shrink_idle();
        c.frame(&mut out, OpCode::Text, msg);
        let got = client_read(&out, &mut Inflater::new(true));
        assert_eq!(got.iter().filter(|(_, m)| m == msg).count(), 2);
    }

    #[test]
    fn inflate_uses_shared_or_own_context() {
        let mut d = Deflater::new(6, 15, true);
        let mut a = Vec::new();
        let mut b = Vec::new();
        d.compress(b"repeat repeat repeat", &mut a);
        d.compress(b"repeat repeat repeat", &mut b); // refers back to the first message
                                                     // Client keeps its context: the connection's own inflater follows it.
        let takeover = params(
            "permessage-deflate",
            Policy {
                client_no_context_takeover: false,
                ..Policy::default()
            },
        );
        let mut c = ConnDeflate::new(
            takeover,
            Tuning {
                level: 1,
                threshold: 0,
            },
        );
        assert_eq!(&*c.inflate(&a, 1000).unwrap(), b"repeat repeat repeat");
        assert_eq!(&*c.inflate(&b, 1000).unwrap(), b"repeat repeat repeat");
        // An empty payload is an empty message and leaves the context intact.
        assert!(c.inflate(&[], 1000).unwrap().is_empty());
        let mut again = Vec::new();
        d.compress(b"repeat repeat repeat", &mut again);
        assert_eq!(&*c.inflate(&again, 1000).unwrap(), b"repeat repeat repeat");
        assert_eq!(c.inflate(&a, 5).err(), Some(InflateError::TooBig(5)));
    }
}
