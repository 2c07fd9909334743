//! Compressing and inflating message bodies (RFC 7692 §7.2): raw deflate, sync flush, the
//! `00 00 ff ff` tail stripped after compressing and appended before inflating.
//!
//! Backend: zlib-rs (pure Rust, zlib-compatible, faster than miniz_oxide and able to compress
//! with a window below 15 bits, which clients may ask for), through flate2 for compressing and
//! directly for inflating ([`Inflater`]).

use flate2::{Compress, Compression, FlushCompress};
use zlib_rs::{InflateFlush, Status};

const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

/// Why a compressed message could not be inflated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    /// The inflated message would be larger than the limit (close 1009).
    #[error("inflated message larger than {0} bytes")]
    TooBig(usize),
    /// Not valid deflate data (close 1007).
    #[error("invalid compressed data")]
    Corrupt,
}

/// A compression context for one direction of one connection, or shared by many when it does
/// not carry context from message to message.
pub struct Deflater {
    z: Compress,
    takeover: bool,
}

impl Deflater {
    /// `window_bits` 9..=15; `takeover`: keep the LZ77 window between messages.
    pub fn new(level: u32, window_bits: u8, takeover: bool) -> Deflater {
        Deflater {
            z: Compress::new_with_window_bits(
                Compression::new(level.min(9)),
                false,
                window_bits.clamp(9, 15),
            ),
            takeover,
        }
    }

    /// Appends the compressed body of one message to `out`.
    pub fn compress(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        out.reserve(input.len() / 2 + 16);
        let base = self.z.total_in();
        loop {
            let done = (self.z.total_in() - base) as usize;
            // Only a broken stream state fails; start over with a fresh one then.
            if self
                .z
                .compress_vec(&input[done..], out, FlushCompress::Sync)
                .is_err()
            {
                self.z.reset();
                out.truncate(start);
                continue;
            }
            let done = (self.z.total_in() - base) as usize;
            // The sync flush is complete once all input is in and output space was left over.
            if done == input.len() && out.len() < out.capacity() {
                break;
            }
            out.reserve(out.capacity().max(64));
        }
        if out[start..].ends_with(&TAIL) {
            out.truncate(out.len() - TAIL.len());
        }
        // A sync flush with no new input since the last one produces nothing (zlib's
        // Z_BUF_ERROR): an empty message right after another message with takeover. An empty
        // payload would leave the peer's inflater inside the stored block our tail starts, so
        // send the empty stored block's header byte; with the tail it is a complete block.
        if out.len() == start {
            out.push(0x00);
        }
        if !self.takeover {
            self.z.reset();
        }
    }
}

/// A decompression context; see [`Deflater`].
///
/// zlib-rs directly rather than through flate2: checking that a message ends on a block
/// boundary needs zlib's `Z_BLOCK` flush, which flate2 does not offer.
pub struct Inflater {
    z: zlib_rs::Inflate,
    takeover: bool,
}

impl Inflater {
    /// Inflates with a 15-bit window, which decodes any window the client may use.
    pub fn new(takeover: bool) -> Inflater {
        Inflater {
            z: zlib_rs::Inflate::new(false, 15),
            takeover,
        }
    }

    /// Appends the inflated message to `out`, failing as soon as it would exceed `limit` bytes:
    /// the output is grown step by step, so a compression bomb never allocates more than that.
    ///
    /// The appended tail must complete the empty stored block a sync flush ends the message
    /// with (RFC 7692 §7.2.1): a message cut inside a block, or whose tail would decode to data,
    /// is `Corrupt`, not the part that was decoded. A message that ends the deflate stream (a
    /// final block) needs no tail. An empty payload is an empty message and leaves the context
    /// as it was (zlib's sync flush produces nothing when no input came since the last one, so
    /// a client with takeover may send that).
    pub fn inflate(
        &mut self,
        input: &[u8],
        limit: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), InflateError> {
        if input.is_empty() {
            return Ok(());
        }
        let start = out.len();
        let res = self.inflate_inner(input, limit, out, start);
        out.truncate(*res.as_ref().unwrap_or(&start));
        if res.is_err() || !self.takeover {
            self.z.reset(false);
        }
        res.map(|_| ())
    }

    /// Returns where the output ends in `out` (which is zero-filled past that).
    fn inflate_inner(
        &mut self,
        input: &[u8],
        limit: usize,
        out: &mut Vec<u8>,
        start: usize,
    ) -> Result<usize, InflateError> {
        let mut written = start;
        let mut rest = input;
        // All of the message, and all of its output: zlib stops with room left only when it
        // needs more input.
        loop {
            if written == out.len() {
                let produced = written - start;
                if produced > limit {
                    return Err(InflateError::TooBig(limit));
                }
                // Grow geometrically, but never past one byte over the limit.
                let room = produced.clamp(4096, 1 << 20).min(limit + 1 - produced);
                out.reserve_exact(room.max(1));
                out.resize(written + room.max(1), 0);
            }
            let (status, used, made) =
                self.decompress(rest, &mut out[written..], InflateFlush::NoFlush)?;
            rest = &rest[used..];
            written += made;
            if written - start > limit {
                return Err(InflateError::TooBig(limit));
            }
            if status == Status::StreamEnd {
                // A final block ends the deflate stream: anything after it is ignored.
                self.z.reset(false);
                return Ok(written);
            }
            if rest.is_empty() && written < out.len() {
                break;
            }
            if used == 0 && made == 0 {
                return Err(InflateError::Corrupt);
            }
        }
        // Then the tail, with `Block`, which stops at a block boundary without reading on. One
        // byte more (the start of another empty stored block) tells a stop right after the
        // tail, which leaves that byte unread, from a message cut inside a block, which reads
        // it. The tail decodes to nothing in a valid message, so there is no output to wait for.
        const PROBE: [u8; 5] = [0x00, 0x00, 0xff, 0xff, 0x00];
        let (status, used, made) =
            self.decompress(&PROBE, &mut out[written..], InflateFlush::Block)?;
        match status {
            _ if made > 0 => Err(InflateError::Corrupt),
            Status::StreamEnd => {
                self.z.reset(false);
                Ok(written)
            }
            _ if used == PROBE.len() - 1 => Ok(written),
            // A final block whose end-of-block code lies in the tail (`03`, completed by the
            // tail's zero bits): `Block` stops at that block's end before it reports the end
            // of the stream, which one more call, with no input, does.
            _ if used < PROBE.len() => {
                match self.decompress(&[], &mut out[written..], InflateFlush::NoFlush)? {
                    (Status::StreamEnd, _, 0) => {
                        self.z.reset(false);
                        Ok(written)
                    }
                    _ => Err(InflateError::Corrupt),
                }
            }
            _ => Err(InflateError::Corrupt),
        }
    }

    /// One call into zlib: (status, bytes consumed, bytes written).
    fn decompress(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        flush: InflateFlush,
    ) -> Result<(Status, usize, usize), InflateError> {
        let (in0, out0) = (self.z.total_in(), self.z.total_out());
        let status = self
            .z
            .decompress(input, output, flush)
            .map_err(|_| InflateError::Corrupt)?;
        let used = (self.z.total_in() - in0) as usize;
        Ok((status, used, (self.z.total_out() - out0) as usize))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(i: usize) -> Vec<u8> {
        format!(
            r#"{{"type":"stats_update","topic":"stats","seq":{i},"data":{{"cpu":45.2,"mem":71.9,"host":"edge-{}"}}}}"#,
            i % 7
        )
        .into_bytes()
    }

    #[test]
    fn a_final_block_may_end_in_the_tail() {
        // BFINAL, fixed Huffman, then 5 of the end-of-block code's 7 zero bits: the tail's
        // first byte completes it, and the stream ends there (found by the inflate target).
        for takeover in [false, true] {
            let mut out = Vec::new();
            assert_eq!(
                Inflater::new(takeover).inflate(&[0x03], 325, &mut out),
                Ok(())
            );
            assert!(out.is_empty());
        }
    }

    #[test]
    fn round_trip_with_and_without_takeover() {
        for takeover in [true, false] {
            for bits in [9, 12, 15] {
                let mut d = Deflater::new(6, bits, takeover);
                let mut i = Inflater::new(takeover);
                for n in 0..50 {
                    let msg = json(n);
                    let mut c = Vec::new();
                    d.compress(&msg, &mut c);
                    assert!(!c.ends_with(&TAIL));
                    let mut back = Vec::new();
                    i.inflate(&c, 1 << 20, &mut back).unwrap();
                    assert_eq!(back, msg, "takeover={takeover} bits={bits} n={n}");
                }
            }
        }
    }

    #[test]
    fn takeover_compresses_repeats_better() {
        let (mut with, mut without) = (Deflater::new(6, 15, true), Deflater::new(6, 15, false));
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..2 {
            a.clear();
            b.clear();
            with.compress(&json(1), &mut a);
            without.compress(&json(1), &mut b);
        }
        assert!(a.len() < b.len() / 2, "{} vs {}", a.len(), b.len());
    }

    #[test]
    fn empty_and_large_messages() {
        let mut d = Deflater::new(1, 15, false);
        let mut i = Inflater::new(false);
        for msg in [
            Vec::new(),
            vec![b'x'; 1 << 20],
            (0..200_000u32).map(|v| (v * 7919) as u8).collect(),
        ] {
            let mut c = Vec::new();
            d.compress(&msg, &mut c);
            let mut back = Vec::new();
            i.inflate(&c, 8 << 20, &mut back).unwrap();
            assert_eq!(back.len(), msg.len());
            assert!(back == msg);
        }
    }

    #[test]
    fn empty_messages_keep_a_takeover_stream_in_step() {
        let mut d = Deflater::new(1, 15, true);
        let mut i = Inflater::new(true);
        for msg in [&b"hello hello hello"[..], b"", b"", b"hello again", b""] {
            let mut c = Vec::new();
            d.compress(msg, &mut c);
            assert!(!c.is_empty(), "{msg:?}");
            let mut back = Vec::new();
            i.inflate(&c, 1000, &mut back).unwrap();
            assert_eq!(back, msg);
        }
    }

    #[test]
    fn bombs_stop_at_the_limit() {
        let mut d = Deflater::new(1, 15, false);
        let mut c = Vec::new();
        d.compress(&vec![0u8; 16 << 20], &mut c);
        assert!(c.len() < 1 << 20, "{}", c.len());
        let mut out = Vec::new();
        let err = Inflater::new(false).inflate(&c, 1 << 20, &mut out);
        assert_eq!(err, Err(InflateError::TooBig(1 << 20)));
        assert!(
            out.capacity() <= (1 << 20) + 1,
            "allocated {}",
            out.capacity()
        );
    }

    #[test]
    fn garbage_is_corrupt_and_the_context_recovers() {
        let mut i = Inflater::new(true);
        let mut out = Vec::new();
        assert_eq!(
            i.inflate(&[0xff, 0xff, 0xff, 0x01], 1000, &mut out),
            Err(InflateError::Corrupt)
        );
        let mut c = Vec::new();
        Deflater::new(6, 15, false).compress(b"hello", &mut c);
        out.clear();
        i.inflate(&c, 1000, &mut out).unwrap();
        assert_eq!(out, b"hello");
    }

    #[test]
    fn a_message_cut_inside_a_block_is_corrupt() {
        let msg = json(3).repeat(20);
        let mut c = Vec::new();
        Deflater::new(6, 15, false).compress(&msg, &mut c);
        for takeover in [false, true] {
            let mut i = Inflater::new(takeover);
            for cut in 1..c.len() {
                let mut out = Vec::new();
                let got = i.inflate(&c[..cut], 1 << 20, &mut out);
                assert_eq!(
                    got,
                    Err(InflateError::Corrupt),
                    "cut at {cut} of {}",
                    c.len()
                );
                assert!(out.is_empty());
            }
            // A failure resets the context: the whole message still inflates.
            let mut out = Vec::new();
            i.inflate(&c, 1 << 20, &mut out).unwrap();
            assert_eq!(out, msg);
        }
    }

    #[test]
    fn the_tail_must_decode_to_nothing() {
        // A stored block of 5 bytes cut after 1: the tail would be copied as data.
        let cut = [0x00, 0x05, 0x00, 0xfa, 0xff, b'a'];
        assert_eq!(
            Inflater::new(false).inflate(&cut, 100, &mut Vec::new()),
            Err(InflateError::Corrupt)
        );
        // The same message ended with a final block needs no tail.
        let whole = [0x01, 0x01, 0x00, 0xfe, 0xff, b'a'];
        let mut out = Vec::new();
        Inflater::new(true).inflate(&whole, 100, &mut out).unwrap();
        assert_eq!(out, b"a");
    }

    #[test]
    fn an_empty_payload_leaves_a_takeover_stream_alone() {
        let mut d = Deflater::new(6, 15, true);
        let mut i = Inflater::new(true);
        for msg in [&b"hello hello"[..], b"hello hello again"] {
            let mut c = Vec::new();
            d.compress(msg, &mut c);
            let mut out = Vec::new();
            i.inflate(&[], 100, &mut out).unwrap();
            assert!(out.is_empty());
            i.inflate(&c, 100, &mut out).unwrap();
            assert_eq!(out, msg);
        }
    }
}
