//! Helpers shared by the fuzz targets: input splitting and reference decoders written from the
//! RFCs, independently of ringgate's own code, to check it against.
//!
//! Target inputs are plain bytes with a few leading parameter bytes (documented per target), so
//! that seeds are easy to write by hand or from a script (`scripts/fuzz-seeds`).

pub mod body;
pub mod ws_ref;

/// Reads parameter bytes off the front of an input; missing bytes read as zero.
pub struct Params<'a>(pub &'a [u8]);

impl<'a> Params<'a> {
    pub fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((b, rest)) => {
                self.0 = rest;
                *b
            }
            None => 0,
        }
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    pub fn rest(self) -> &'a [u8] {
        self.0
    }
}

/// Splits `data` into chunks whose sizes come from `seed` (a small xorshift), including empty
/// chunks: a network read or an HTTP body frame can be any size, zero too.
pub fn split(data: &[u8], seed: u8) -> Vec<&[u8]> {
    let mut state = u32::from(seed).wrapping_mul(2_654_435_761) | 1;
    let mut out = Vec::new();
    let mut rest = data;
    loop {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        // Mostly small pieces, sometimes a large one, sometimes nothing.
        let n = match state % 8 {
            0 => 0,
            1 => (state >> 8) as usize % 4096,
            _ => (state >> 8) as usize % 9,
        };
        let n = n.min(rest.len());
        let (a, b) = rest.split_at(n);
        out.push(a);
        rest = b;
        if rest.is_empty() {
            out.push(rest);
            return out;
        }
    }
}
