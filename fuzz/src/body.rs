//! The chunking harness of the upstream body decoders (SSE, NDJSON): an HTTP body arrives in
//! frames of any size, empty ones too, and the decoded result must not depend on where they cut.

use std::fmt::Debug;

use ringgate::agent::ndjson::{NdjsonDecoder, NdjsonError};
use ringgate::agent::sse::{Event, SseDecoder, SseError};

use crate::{split, Params};

/// A decoder fed an upstream body piece by piece.
pub trait BodyDecoder {
    type Item: Debug + PartialEq;
    type Error: Debug + PartialEq;
    fn with_limit(max: usize) -> Self;
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<Self::Item>) -> Result<(), Self::Error>;
    fn finish(&mut self, out: &mut Vec<Self::Item>) -> Result<(), Self::Error>;
}

/// What a decoder gave: its items, and the error it stopped on, if any.
pub type Decoded<D> = (
    Vec<<D as BodyDecoder>::Item>,
    Option<<D as BodyDecoder>::Error>,
);

/// Feeds `pieces` in order, then finishes, stopping at the first error.
pub fn decode<D: BodyDecoder>(pieces: &[&[u8]], max: usize) -> Decoded<D> {
    let mut d = D::with_limit(max);
    let mut out = Vec::new();
    for p in pieces {
        if let Err(e) = d.feed(p, &mut out) {
            return (out, Some(e));
        }
    }
    let end = d.finish(&mut out).err();
    (out, end)
}

/// Reads a target input `[max_lo, max_hi, split_seed] ++ body`, decodes the body whole and in
/// the pieces the seed gives, and asserts both agree. Returns the body, the limit and the result.
pub fn whole_and_chunked<D: BodyDecoder>(data: &[u8]) -> (&[u8], usize, Decoded<D>) {
    let mut p = Params(data);
    let max = usize::from(p.u16());
    let seed = p.u8();
    let body = p.rest();
    let whole = decode::<D>(&[body], max);
    assert_eq!(decode::<D>(&split(body, seed), max), whole);
    (body, max, whole)
}

impl BodyDecoder for SseDecoder {
    type Item = Event;
    type Error = SseError;
    fn with_limit(max: usize) -> Self {
        SseDecoder::new(max)
    }
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<Event>) -> Result<(), SseError> {
        SseDecoder::feed(self, bytes, out)
    }
    fn finish(&mut self, out: &mut Vec<Event>) -> Result<(), SseError> {
        SseDecoder::finish(self, out)
    }
}

impl BodyDecoder for NdjsonDecoder {
    type Item = String;
    type Error = NdjsonError;
    fn with_limit(max: usize) -> Self {
        NdjsonDecoder::new(max)
    }
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<String>) -> Result<(), NdjsonError> {
        NdjsonDecoder::feed(self, bytes, out)
    }
    fn finish(&mut self, out: &mut Vec<String>) -> Result<(), NdjsonError> {
        NdjsonDecoder::finish(self, out)
    }
}
