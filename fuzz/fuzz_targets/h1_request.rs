//! The HTTP/1.1 server's request parsing (`io::h1::parse_request`) and the request body's
//! decoding (`io::h1::Decoder`) as the connection loop drives them.
//!
//! Input: `[seed] ++ bytes from the client`. Checks: the head parsed from the whole input is
//! the one parsed from the bytes fed in pieces (an incomplete prefix is `None` or the same
//! refusal, never a different head); a parsed head agrees with httparse on method, target,
//! version and field count; a refused head maps to 400 or 431; the body after the head decodes
//! to the same data, trailers and end (or the same failure) whole and in the pieces `seed` cuts.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use ringgate::io::h1::{parse_request, BadRequest, Decoded, Decoder};
use ringgate_fuzz::{split, Params};

/// Decodes `pieces` fed one after another: data, trailers, ended, failed.
fn decode(dec: &mut Decoder, pieces: &[&[u8]]) -> (Vec<u8>, Option<http::HeaderMap>, bool, bool) {
    let mut buf = BytesMut::new();
    let (mut data, mut trailers) = (Vec::new(), None);
    for piece in pieces {
        buf.extend_from_slice(piece);
        loop {
            match dec.decode(&mut buf) {
                Ok(Decoded::Data(b)) => data.extend_from_slice(&b),
                Ok(Decoded::Trailers(t)) => trailers = Some(t),
                Ok(Decoded::End) => return (data, trailers, true, false),
                Ok(Decoded::More) => break,
                Err(_) => return (data, trailers, false, true),
            }
        }
    }
    (data, trailers, false, false)
}

fuzz_target!(|data: &[u8]| {
    let mut p = Params(data);
    let seed = p.u8();
    let bytes = p.rest();
    let whole = parse_request(bytes);
    if let Err(bad) = &whole {
        assert!(matches!(bad.status().as_u16(), 400 | 431));
    }
    // Fed in pieces, as reads bring it: nothing decided before the bytes that decide it.
    let mut have = 0;
    for piece in split(bytes, seed) {
        have += piece.len();
        match parse_request(&bytes[..have]) {
            Ok(None) => {}
            Ok(Some((head, n))) => {
                let Ok(Some((w, wn))) = &whole else {
                    panic!("a prefix parsed where the whole did not");
                };
                assert_eq!(
                    (n, &head.parts.uri, &head.parts.method),
                    (*wn, &w.parts.uri, &w.parts.method)
                );
                break;
            }
            Err(BadRequest::TooLarge) => break,
            Err(e) => {
                assert!(matches!(whole, Err(w) if w == e), "{e:?}");
                break;
            }
        }
    }
    let Ok(Some((head, n))) = whole else { return };
    let mut slots = [httparse::EMPTY_HEADER; 128];
    let mut r = httparse::Request::new(&mut slots);
    assert_eq!(r.parse(bytes).ok(), Some(httparse::Status::Complete(n)));
    assert_eq!(r.method, Some(head.parts.method.as_str()));
    assert_eq!(
        r.version.map(|v| v == 0),
        Some(head.parts.version == http::Version::HTTP_10)
    );
    assert_eq!(r.headers.len(), head.parts.headers.len());
    let body = &bytes[n..];
    let all = decode(&mut Decoder::new(head.framing), &[body]);
    let cut = decode(
        &mut Decoder::new(head.framing),
        &split(body, seed.wrapping_add(1)),
    );
    assert_eq!(all, cut);
});
