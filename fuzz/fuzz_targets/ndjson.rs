//! The NDJSON splitter (`agent::ndjson::NdjsonDecoder`).
//!
//! Input: `[max_lo, max_hi, split_seed] ++ upstream body`. Fed in arbitrary pieces (empty ones
//! included) it must give the same lines and the same failure as fed whole, and the lines must
//! be what splitting the body at `\n` gives: one `\r` dropped at a line's end, blank lines
//! skipped, nothing longer than the limit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringgate::agent::ndjson::{NdjsonDecoder, NdjsonError};
use ringgate_fuzz::body::whole_and_chunked;

/// The obvious reading of the whole body.
fn reference(body: &[u8], max: usize) -> (Vec<String>, Option<NdjsonError>) {
    let mut out = Vec::new();
    for line in body.split(|&b| b == b'\n') {
        if line.len() > max {
            return (out, Some(NdjsonError::TooLarge));
        }
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match std::str::from_utf8(line) {
            Ok(s) => out.push(s.to_string()),
            Err(_) => return (out, Some(NdjsonError::NotUtf8)),
        }
    }
    (out, None)
}

fuzz_target!(|data: &[u8]| {
    let (body, max, whole) = whole_and_chunked::<NdjsonDecoder>(data);
    assert_eq!(whole, reference(body, max));
});
