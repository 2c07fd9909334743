//! The SSE decoder (`agent::sse::SseDecoder`).
//!
//! Input: `[max_lo, max_hi, split_seed] ++ upstream body`. Fed in arbitrary pieces (empty ones
//! included: an HTTP body frame may be empty) it must dispatch the same events and fail the same
//! way as fed whole; no event's data exceeds the limit; event names and data hold no line ends
//! other than the `\n` that joins data lines.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringgate::agent::sse::{Event, SseDecoder, SseError};
use ringgate_fuzz::{split, Params};

fn run(pieces: &[&[u8]], max: usize) -> (Vec<Event>, Option<SseError>) {
    let mut d = SseDecoder::new(max);
    let mut out = Vec::new();
    for p in pieces {
        if let Err(e) = d.feed(p, &mut out) {
            return (out, Some(e));
        }
    }
    let end = d.finish(&mut out).err();
    (out, end)
}

fuzz_target!(|data: &[u8]| {
    let mut p = Params(data);
    let max = usize::from(p.u16());
    let seed = p.u8();
    let body = p.rest();
    let whole = run(&[body], max);
    for e in &whole.0 {
        assert!(e.data.len() <= max, "{} > {max}", e.data.len());
        assert!(
            !e.data.contains('\r') && !e.event.contains(['\r', '\n']),
            "{e:?}"
        );
    }
    assert_eq!(run(&split(body, seed), max), whole);
});
