//! The SSE decoder (`agent::sse::SseDecoder`).
//!
//! Input: `[max_lo, max_hi, split_seed] ++ upstream body`. Fed in arbitrary pieces (empty ones
//! included: an HTTP body frame may be empty) it must dispatch the same events and fail the same
//! way as fed whole; no event's data exceeds the limit; event names and data hold no line ends
//! other than the `\n` that joins data lines.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringgate::agent::sse::SseDecoder;
use ringgate_fuzz::body::whole_and_chunked;

fuzz_target!(|data: &[u8]| {
    let (_, max, (events, _)) = whole_and_chunked::<SseDecoder>(data);
    for e in &events {
        assert!(e.data.len() <= max, "{} > {max}", e.data.len());
        assert!(
            !e.data.contains('\r') && !e.event.contains(['\r', '\n']),
            "{e:?}"
        );
    }
});
