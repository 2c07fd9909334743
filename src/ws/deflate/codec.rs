//! Compressing and inflating message bodies (RFC 7692 §7.2): raw deflate, sync flush, the
//! `00 00 ff ff` tail stripped after compressing and appended before inflating.
//!
//! Backend: flate2 on zlib-rs (pure Rust, zlib-compatible, faster than miniz_oxide and able to
//! compress with a window below 15 bits, which clients may ask for).

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

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
pub struct Inflater {
    z: Decompress,
    takeover: bool,
}

impl Inflater {
    /// Inflates with a 15-bit window, which decodes any window the client may use.
    pub fn new(takeover: bool) -> Inflater {
        Inflater {
            z: Decompress::new_with_window_bits(false, 15),
            takeover,
        }
    }

    /// Appends the inflated message to `out`, failing as soon as it would exceed `limit` bytes:
    /// the output is grown step by step, so a compression bomb never allocates more than that.
    pub fn inflate(
        &mut self,
        input: &[u8],
        limit: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), InflateError> {
        let res = self.inflate_inner(input, limit, out);
        if res.is_err() || !self.takeover {
            self.z.reset(false);
        }
        res
    }

    fn inflate_inner(
        &mut self,
        input: &[u8],
        limit: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), InflateError> {
        let start = out.len();
        for chunk in [input, &TAIL[..]] {
            let base = self.z.total_in();
            loop {
                let done = (self.z.total_in() - base) as usize;
                let produced = out.len() - start;
                if out.len() == out.capacity() {
                    if produced > limit {
                        return Err(InflateError::TooBig(limit));
                    }
                    // Grow geometrically, but never past one byte over the limit.
                    let room = produced.clamp(4096, 1 << 20).min(limit + 1 - produced);
                    out.reserve_exact(room.max(1));
                }
                let before = (self.z.total_in(), self.z.total_out());
                let status = self
                    .z
                    .decompress_vec(&chunk[done..], out, FlushDecompress::Sync)
                    .map_err(|_| InflateError::Corrupt)?;
                if out.len() - start > limit {
                    return Err(InflateError::TooBig(limit));
                }
                let done = (self.z.total_in() - base) as usize;
                if status == Status::StreamEnd {
                    // A final block ends the deflate stream: what follows must be nothing but
                    // our appended tail.
                    self.z.reset(false);
                    return Ok(());
                }
                if done == chunk.len() && out.len() < out.capacity() {
                    break;
                }
                if before == (self.z.total_in(), self.z.total_out()) && out.len() < out.capacity() {
                    return Err(InflateError::Corrupt);
                }
            }
        }
        Ok(())
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
}
