//! The handover answer check (`io::handover::is_handover`): what the old process sent before
//! closing, and how many descriptors came with it.
//!
//! Input: `[n_lo, n_hi] ++ bytes received`. The answer is a handover exactly when it is the
//! greeting followed by one `F` per chunk of up to 200 descriptors (the protocol as the module
//! documents it, restated here).
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringgate::io::handover::is_handover;
use ringgate_fuzz::Params;

const GREETING: &[u8] = b"ringgate-handover/1\n";

fuzz_target!(|data: &[u8]| {
    let mut p = Params(data);
    let fds = usize::from(p.u16());
    let bytes = p.rest();
    let mut want = GREETING.to_vec();
    want.extend(std::iter::repeat_n(b'F', fds.div_ceil(200)));
    assert_eq!(is_handover(bytes, fds), bytes == want, "{fds} descriptors");
    // The well-formed answer for this count is always recognised.
    assert!(is_handover(&want, fds));
});
