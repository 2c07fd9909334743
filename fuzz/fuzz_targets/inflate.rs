//! permessage-deflate bodies (`ws::deflate::{Inflater, Deflater}`).
//!
//! Input: `[mode, a, b] ++ data`.
//! - mode even: `data` is a client's compressed message; `limit = u16(a, b)`. The inflater must
//!   agree with miniz_oxide (a different implementation) on the same bytes plus the sync-flush
//!   tail: the same output when it fits the limit, `TooBig` when miniz produces more than the
//!   limit, `Corrupt` when miniz rejects the data or the message does not end on a block
//!   boundary (cut inside a block); and never hand back more than `limit` bytes.
//! - mode odd: `data` is a sequence of messages (split at 0xFF bytes) compressed with the
//!   level, window and takeover setting taken from `a` and `b`; each must inflate back to
//!   itself with a limit of exactly its length, fail with `TooBig` one byte below it, and,
//!   without takeover, miniz_oxide must decode each message alone too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use miniz_oxide::inflate::core::{decompress, inflate_flags, DecompressorOxide};
use miniz_oxide::inflate::TINFLStatus;
use ringgate::ws::deflate::{Deflater, InflateError, Inflater};
use ringgate_fuzz::Params;

const TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];

#[derive(Debug, PartialEq)]
enum Ref {
    Ok(Vec<u8>),
    /// More than the limit.
    TooBig,
    /// Invalid, with what came out before the error.
    Corrupt(Vec<u8>),
}

/// miniz_oxide's reading of `input` + tail, into a buffer one byte larger than `limit`. A
/// message is whole when the tail, decoding to nothing, ends exactly one block (the empty
/// stored block of a sync flush), or when the message ends the deflate stream.
fn reference(input: &[u8], limit: usize) -> Ref {
    if input.is_empty() {
        return Ref::Ok(Vec::new()); // an empty payload is an empty message (`Inflater::inflate`)
    }
    let mut out = vec![0u8; limit + 1];
    let mut r = DecompressorOxide::new();
    let flags = inflate_flags::TINFL_FLAG_USING_NON_WRAPPING_OUTPUT_BUF
        | inflate_flags::TINFL_FLAG_HAS_MORE_INPUT
        | inflate_flags::TINFL_FLAG_STOP_ON_BLOCK_BOUNDARY;
    let mut written = 0;
    let mut rest = input;
    // The message: through every block boundary, until it needs more input.
    let status = loop {
        let (status, used, made) = decompress(&mut r, rest, &mut out, written, flags);
        rest = &rest[used..];
        written += made;
        if status != TINFLStatus::BlockBoundary {
            break status;
        }
    };
    let status = match status {
        TINFLStatus::NeedsMoreInput => {
            let (status, used, made) = decompress(&mut r, &TAIL, &mut out, written, flags);
            let whole = made == 0 && (status == TINFLStatus::Done || used == TAIL.len());
            match status {
                TINFLStatus::BlockBoundary | TINFLStatus::Done if whole => TINFLStatus::Done,
                TINFLStatus::HasMoreOutput => status,
                _ => {
                    written += made;
                    TINFLStatus::Failed
                }
            }
        }
        other => other,
    };
    out.truncate(written);
    match status {
        TINFLStatus::Done if written <= limit => Ref::Ok(out),
        TINFLStatus::Done | TINFLStatus::HasMoreOutput => Ref::TooBig,
        _ => Ref::Corrupt(out),
    }
}

fn differential(data: &[u8], limit: usize) {
    let mut out = Vec::new();
    let got = Inflater::new(false).inflate(data, limit, &mut out);
    assert!(
        out.capacity() <= limit.max(4096) + 1,
        "allocated {} for a limit of {limit}",
        out.capacity()
    );
    match (reference(data, limit), got) {
        (Ref::Ok(want), Ok(())) => assert_eq!(out, want),
        (Ref::TooBig, Err(InflateError::TooBig(l))) => assert_eq!(l, limit),
        (Ref::Corrupt(_), Err(InflateError::Corrupt)) => {}
        // Past the limit before the error: either refusal is right.
        (Ref::Corrupt(before), Err(InflateError::TooBig(_))) if before.len() > limit => {}
        // Past the limit only with the tail's output: a cut message as well (ringgate reads the
        // tail apart, and output from it means the message ended inside a block).
        (Ref::TooBig, Err(InflateError::Corrupt)) => {}
        (want, got) => panic!("miniz_oxide: {want:?}, ringgate: {got:?} (limit {limit})"),
    }
}

fn round_trip(messages: &[u8], level: u32, bits: u8, takeover: bool) {
    let mut d = Deflater::new(level, bits, takeover);
    let mut i = Inflater::new(takeover);
    for msg in messages.split(|&b| b == 0xff) {
        let mut c = Vec::new();
        d.compress(msg, &mut c);
        assert!(
            !c.is_empty(),
            "an empty payload would break the peer's stream"
        );
        let mut back = Vec::new();
        i.inflate(&c, msg.len(), &mut back)
            .unwrap_or_else(|e| panic!("{e} for {} bytes", msg.len()));
        assert_eq!(back, msg);
        if !takeover {
            assert_eq!(
                reference(&c, msg.len()),
                Ref::Ok(msg.to_vec()),
                "miniz_oxide"
            );
            if !msg.is_empty() {
                let mut short = Vec::new();
                let r = Inflater::new(false).inflate(&c, msg.len() - 1, &mut short);
                assert_eq!(r, Err(InflateError::TooBig(msg.len() - 1)));
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut p = Params(data);
    let mode = p.u8();
    let (a, b) = (p.u8(), p.u8());
    let rest = p.rest();
    if mode & 1 == 0 {
        differential(rest, usize::from(u16::from_le_bytes([a, b])));
    } else {
        round_trip(rest, u32::from(a % 10), 9 + b % 7, b & 0x80 != 0);
    }
});
