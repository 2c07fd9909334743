//! Property tests of the byte-level cores: the frame reader does not care how its input is
//! split, permessage-deflate round-trips in every configuration a client can negotiate, the
//! outbox never loses or repeats a byte, and the token bucket keeps its rate. The fuzz targets
//! (fuzz/, docs/FUZZING.md) explore the parsers further; these run with every `cargo test`.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;
use ringgate::ratelimit::TokenBucket;
use ringgate::ws::deflate::{Deflater, InflateError, Inflater};
use ringgate::ws::frame::{write_masked_frame, OpCode};
use ringgate::ws::mailbox::{Broadcast, FrameForm};
use ringgate::ws::outbox::Outbox;
use ringgate::ws::reader::{Event, Flow, Reader};

// ---- frame reader ------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Owned {
    Text(Vec<u8>),
    Binary(Vec<u8>),
    Compressed(bool, Vec<u8>),
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<(u16, String)>),
}

fn own(e: Event<'_>) -> Owned {
    match e {
        Event::Text(t) => Owned::Text(t.to_vec()),
        Event::Binary(b) => Owned::Binary(b.to_vec()),
        Event::Compressed { text, data } => Owned::Compressed(text, data.to_vec()),
        Event::Ping(p) => Owned::Ping(p.to_vec()),
        Event::Pong(p) => Owned::Pong(p.to_vec()),
        Event::Close(c) => Owned::Close(c.map(|(c, r)| (c, r.to_string()))),
    }
}

/// Feeds `stream` cut at `cuts` the way a session does: the unconsumed rest stays at the front
/// of the buffer and the next read is appended. Returns the events and the close code of the
/// failure, if any.
fn read_in_pieces(stream: &[u8], cuts: &[usize], deflate: bool) -> (Vec<Owned>, Option<u16>) {
    let mut reader = if deflate {
        Reader::with_deflate(1 << 16)
    } else {
        Reader::new(1 << 16)
    };
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
    points.push(stream.len());
    points.sort_unstable();
    let (mut buf, mut events, mut at) = (Vec::new(), Vec::new(), 0);
    for p in points {
        buf.extend_from_slice(&stream[at..p]);
        at = p;
        let fed = reader.feed(&mut buf, |e| {
            events.push(own(e));
            Flow::Continue
        });
        match fed {
            Ok(fed) => {
                buf.drain(..fed.consumed);
            }
            Err(e) => return (events, Some(e.close_code().0)),
        }
    }
    (events, None)
}

/// Frames a client might send, valid or not: any opcode, FIN and RSV1 setting, payloads that
/// are text, split characters or arbitrary bytes, and a random masking key.
fn frames() -> impl Strategy<Value = Vec<u8>> {
    let op = prop_oneof![
        Just(OpCode::Continuation),
        Just(OpCode::Text),
        Just(OpCode::Binary),
        Just(OpCode::Ping),
        Just(OpCode::Pong),
        Just(OpCode::Close),
    ];
    let payload = prop_oneof![
        "[a-zé€😀 ]{0,40}".prop_map(String::into_bytes),
        proptest::collection::vec(any::<u8>(), 0..300),
        // Close bodies: a code, then a reason.
        (1000u16..5000, "[a-z]{0,10}").prop_map(|(c, r)| {
            let mut v = c.to_be_bytes().to_vec();
            v.extend_from_slice(r.as_bytes());
            v
        }),
    ];
    let frame = (any::<bool>(), any::<bool>(), op, payload, any::<[u8; 4]>());
    proptest::collection::vec(frame, 0..12).prop_map(|frames| {
        let mut out = Vec::new();
        for (fin, rsv1, op, payload, mask) in frames {
            let start = out.len();
            // Control frames are mostly well-formed, so that the stream goes on past them.
            let fin = fin || op.is_control();
            let payload = if op.is_control() {
                &payload[..payload.len().min(125)]
            } else {
                &payload[..]
            };
            write_masked_frame(&mut out, fin, op, mask, payload);
            if rsv1 {
                out[start] |= 0x40;
            }
        }
        out
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn the_reader_does_not_care_how_its_input_is_split(
        stream in frames(),
        cuts in proptest::collection::vec(any::<usize>(), 0..16),
        deflate in any::<bool>(),
    ) {
        let whole = read_in_pieces(&stream, &[], deflate);
        prop_assert_eq!(read_in_pieces(&stream, &cuts, deflate), whole.clone());
        // One byte at a time is the extreme case.
        let every: Vec<usize> = (0..stream.len()).collect();
        prop_assert_eq!(read_in_pieces(&stream, &every, deflate), whole);
    }
}

// ---- permessage-deflate --------------------------------------------------------------------

fn messages() -> impl Strategy<Value = Vec<Vec<u8>>> {
    let msg = prop_oneof![
        // Repetitive text, where back-references across messages matter.
        (0usize..40, "[a-c]{1,12}").prop_map(|(n, s)| s.repeat(n).into_bytes()),
        proptest::collection::vec(any::<u8>(), 0..2000),
        Just(Vec::new()),
    ];
    proptest::collection::vec(msg, 1..8)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Every window a client can hold the server to (9..=15; zlib cannot do 8) and both
    /// takeover settings: each message inflates to itself within a limit of its own length,
    /// and one byte less is refused as too big.
    #[test]
    fn deflate_round_trips_for_every_window_and_takeover(
        msgs in messages(),
        level in 0u32..=9,
    ) {
        for bits in 9u8..=15 {
            for takeover in [false, true] {
                let mut d = Deflater::new(level, bits, takeover);
                let mut i = Inflater::new(takeover);
                for m in &msgs {
                    let mut c = Vec::new();
                    d.compress(m, &mut c);
                    prop_assert!(!c.is_empty());
                    if !takeover && !m.is_empty() {
                        let mut short = Vec::new();
                        let r = Inflater::new(false).inflate(&c, m.len() - 1, &mut short);
                        prop_assert_eq!(r, Err(InflateError::TooBig(m.len() - 1)));
                    }
                    let mut back = Vec::new();
                    prop_assert_eq!(i.inflate(&c, m.len(), &mut back), Ok(()));
                    prop_assert!(&back == m, "bits {} takeover {}", bits, takeover);
                }
            }
        }
    }
}

// ---- outbox --------------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    Frame(Vec<u8>),
    Shared(Vec<u8>, bool),
    Close(String),
    /// A write of this share of the queued bytes (per mille).
    Write(u16),
    /// An io_uring write taking at most this many chunks.
    Take(usize),
}

fn ops() -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..200).prop_map(Op::Frame),
        (
            proptest::collection::vec(any::<u8>(), 0..300),
            any::<bool>()
        )
            .prop_map(|(b, d)| Op::Shared(b, d)),
        "[a-z]{0,20}".prop_map(Op::Close),
        (0u16..=1000).prop_map(Op::Write),
        (0usize..5).prop_map(Op::Take),
    ];
    proptest::collection::vec(op, 0..40)
}

fn pending(o: &Outbox) -> Vec<u8> {
    let mut s = vec![IoSlice::new(&[]); 1024];
    let n = o.slices(&mut s);
    s[..n].iter().flat_map(|s| s.iter().copied()).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// The outbox against a plain byte queue: what it offers to write is exactly what was
    /// queued and not yet written, `queued()` counts it, and written or taken bytes are gone.
    #[test]
    fn the_outbox_never_loses_or_repeats_a_byte(ops in ops()) {
        let mut o = Outbox::default();
        let mut model: VecDeque<u8> = VecDeque::new();
        for op in ops {
            match op {
                Op::Frame(p) => {
                    let before = pending(&o).len();
                    o.frame(OpCode::Binary, &p);
                    let all = pending(&o);
                    model.extend(&all[before..]);
                    prop_assert!(all.ends_with(&p));
                }
                Op::Close(reason) => {
                    let before = pending(&o).len();
                    o.close(ringgate::ws::close::CloseCode::NORMAL, &reason);
                    model.extend(&pending(&o)[before..]);
                }
                Op::Shared(frame, deflated) => {
                    // Not a real frame: the outbox must not look inside.
                    let plain = Bytes::from(frame);
                    let defl = Bytes::from(plain.iter().rev().copied().collect::<Vec<u8>>());
                    let (form, sent) = if deflated {
                        (FrameForm::SharedDeflate, defl.clone())
                    } else {
                        (FrameForm::Plain, plain.clone())
                    };
                    o.shared(
                        Rc::new(Broadcast { frame: plain, deflated: Some(defl) }),
                        form,
                    );
                    model.extend(&sent[..]);
                }
                Op::Write(share) => {
                    let n = o.queued() * usize::from(share) / 1000;
                    o.advance(n);
                    model.drain(..n);
                }
                Op::Take(max) => {
                    let mut chunks = Vec::new();
                    let n = o.take_chunks(&mut chunks, max);
                    prop_assert!(chunks.len() <= max);
                    let taken: Vec<u8> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
                    prop_assert_eq!(taken.len(), n);
                    let want: Vec<u8> = model.drain(..n).collect();
                    prop_assert_eq!(taken, want);
                }
            }
            prop_assert_eq!(o.queued(), model.len());
            prop_assert_eq!(o.is_empty(), model.is_empty());
            prop_assert_eq!(pending(&o), model.iter().copied().collect::<Vec<u8>>());
        }
    }
}

// ---- token bucket --------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Over any stretch of time the bucket grants at most `burst + rate × elapsed` tokens, even
    /// when some callers pass an earlier instant than others did (a stale `now` refunds
    /// nothing), and after a pause long enough to refill it grants `floor(burst)` at once.
    #[test]
    fn the_token_bucket_keeps_its_rate(
        rate in 0.1f64..1000.0,
        burst in 1.0f64..50.0,
        steps in proptest::collection::vec((0u64..200_000, 1usize..20, any::<bool>()), 1..50),
    ) {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(rate, burst, t0);
        let (mut latest, mut granted) = (t0, 0usize);
        for (micros, takes, stale) in steps {
            let d = Duration::from_micros(micros);
            let now = if stale {
                latest.checked_sub(d).filter(|t| *t >= t0).unwrap_or(t0)
            } else {
                latest += d;
                latest
            };
            granted += (0..takes).filter(|_| b.try_take(now)).count();
            let allowed = burst + rate * (latest - t0).as_secs_f64();
            prop_assert!(granted as f64 <= allowed + 1e-9, "{} > {}", granted, allowed);
        }
        let refilled = latest + Duration::from_secs_f64(burst / rate + 0.001);
        let at_once = (0..100).filter(|_| b.try_take(refilled)).count();
        prop_assert_eq!(at_once, burst.floor() as usize);
    }

    #[test]
    fn a_zero_rate_is_unlimited(takes in 0usize..1000) {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(0.0, 0.0, t0);
        prop_assert!((0..takes).all(|_| b.try_take(t0)));
    }
}

/// Found by `the_token_bucket_keeps_its_rate`: a call with an instant earlier than the previous
/// one moved the refill mark back, so the next call was credited the same 100 ms again.
#[test]
fn a_stale_instant_refunds_nothing() {
    let t0 = Instant::now();
    let t1 = t0 + Duration::from_millis(100);
    let mut b = TokenBucket::new(10.0, 3.0, t0);
    let mut granted = (0..10).filter(|_| b.try_take(t0)).count();
    granted += (0..10).filter(|_| b.try_take(t1)).count();
    granted += (0..10).filter(|_| b.try_take(t0)).count();
    granted += (0..10).filter(|_| b.try_take(t1)).count();
    // The burst, plus one token for 100 ms at 10/s.
    assert_eq!(granted, 4);
}
