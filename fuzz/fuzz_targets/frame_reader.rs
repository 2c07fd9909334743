//! The WebSocket frame reader (`ws::reader::Reader`, `ws::frame`).
//!
//! Input: `[flags, max_lo, max_hi, split_seed] ++ client byte stream`; flags bit 0 negotiates
//! permessage-deflate. Checks: fed whole, the reader emits exactly what the reference decoder
//! (`ringgate_fuzz::ws_ref`) does and fails with the same close code; fed in arbitrary pieces the
//! way a session feeds it (keep the unconsumed rest, append the next read), it emits the same;
//! `Fed` never claims more than the buffer and announces a frame size the buffer does not hold.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringgate::ws::close::CloseCode;
use ringgate::ws::reader::{Event, Flow, Reader};
use ringgate_fuzz::ws_ref::{self, Ev, Fail};
use ringgate_fuzz::{split, Params};

fn own(e: Event<'_>) -> Ev {
    match e {
        Event::Text(t) => Ev::Text(t.to_vec()),
        Event::Binary(b) => Ev::Binary(b.to_vec()),
        Event::Compressed { text, data } => Ev::Compressed {
            text,
            data: data.to_vec(),
        },
        Event::Ping(p) => Ev::Ping(p.to_vec()),
        Event::Pong(p) => Ev::Pong(p.to_vec()),
        Event::Close(c) => Ev::Close(c.map(|(code, reason)| (code, reason.to_string()))),
    }
}

fn drive(chunks: &[&[u8]], max: usize, deflate: bool) -> (Vec<Ev>, Option<Fail>) {
    let mut reader = if deflate {
        Reader::with_deflate(max)
    } else {
        Reader::new(max)
    };
    let mut buf = Vec::new();
    let mut events = Vec::new();
    for c in chunks {
        buf.extend_from_slice(c);
        match reader.feed(&mut buf, |e| {
            events.push(own(e));
            Flow::Continue
        }) {
            Ok(fed) => {
                assert!(fed.consumed <= buf.len());
                let left = buf.len() - fed.consumed;
                assert!(
                    fed.next_frame_len == 0 || fed.next_frame_len > left,
                    "{fed:?} with {left} bytes left"
                );
                buf.drain(..fed.consumed);
            }
            Err(e) => {
                let fail = match e.close_code() {
                    CloseCode::PROTOCOL => Fail::Protocol,
                    CloseCode::INVALID_DATA => Fail::Utf8,
                    CloseCode::TOO_BIG => Fail::TooBig,
                    other => panic!("unexpected close code {other:?} for {e}"),
                };
                return (events, Some(fail));
            }
        }
    }
    (events, None)
}

fuzz_target!(|data: &[u8]| {
    let mut p = Params(data);
    let deflate = p.u8() & 1 != 0;
    let max = usize::from(p.u16());
    let seed = p.u8();
    let stream = p.rest();

    let want = ws_ref::decode(stream, max, deflate);
    let whole = drive(&[stream], max, deflate);
    assert_eq!(whole, want, "whole stream vs reference");
    let pieces = split(stream, seed);
    let chunked = drive(&pieces, max, deflate);
    assert_eq!(chunked, whole, "in pieces vs whole");
});
