//! permessage-deflate negotiation (`ws::deflate::negotiate`).
//!
//! Input: `[policy] ++ Sec-WebSocket-Extensions values, one per line`. Policy bits 0–2 pick the
//! server's window cap (9 + n % 7), bit 3 `server_no_context_takeover`, bit 4
//! `client_no_context_takeover`. The offers are read by a strict RFC 7692 parser written here;
//! the answer must be a valid reply (§7.1) to the first offer that parser finds acceptable, the
//! agreed `Params` must say what the reply says, and no answer is allowed when no offer is.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringgate::ws::deflate::{negotiate, Params as Agreed, Policy};
use ringgate_fuzz::Params;

#[derive(Debug, Default, Clone, Copy, PartialEq)]
struct Ext {
    snct: bool,
    cnct: bool,
    smwb: Option<u8>,
    /// `Some(None)`: present without a value.
    cmwb: Option<Option<u8>>,
}

/// Splits on `sep` outside quoted strings.
fn split(s: &str, sep: char) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted) = (0, false);
    for (i, c) in s.char_indices() {
        if c == '"' {
            quoted = !quoted;
        } else if c == sep && !quoted {
            out.push(&s[start..i]);
            start = i + c.len_utf8();
        }
    }
    out.push(&s[start..]);
    out
}

/// RFC 7692 §7.1.2: a decimal integer without leading zeros, 8 to 15.
fn bits(v: &str) -> Option<u8> {
    let v = match v.strip_prefix('"') {
        Some(q) => q.strip_suffix('"')?,
        None => v,
    };
    if v.is_empty() || v.starts_with('0') || !v.bytes().all(|b| b.is_ascii_digit()) || v.len() > 2 {
        return None;
    }
    v.parse().ok().filter(|b| (8..=15).contains(b))
}

/// `None`: not permessage-deflate; `Some(None)`: an offer that must be declined.
fn parse_offer(e: &str) -> Option<Option<Ext>> {
    let parts = split(e, ';');
    if !parts[0].trim().eq_ignore_ascii_case("permessage-deflate") {
        return None;
    }
    let mut x = Ext::default();
    let mut seen = Vec::new();
    for p in &parts[1..] {
        let (k, v) = match p.split_once('=') {
            Some((k, v)) => (k.trim().to_ascii_lowercase(), Some(v.trim())),
            None => (p.trim().to_ascii_lowercase(), None),
        };
        if seen.contains(&k) {
            return Some(None);
        }
        match (k.as_str(), v) {
            ("server_no_context_takeover", None) => x.snct = true,
            ("client_no_context_takeover", None) => x.cnct = true,
            ("server_max_window_bits", Some(v)) => match bits(v) {
                Some(b) => x.smwb = Some(b),
                None => return Some(None),
            },
            ("client_max_window_bits", None) => x.cmwb = Some(None),
            ("client_max_window_bits", Some(v)) => match bits(v) {
                Some(b) => x.cmwb = Some(Some(b)),
                None => return Some(None),
            },
            _ => return Some(None),
        }
        seen.push(k);
    }
    // ringgate's documented choice: zlib cannot compress with an 8-bit window, so an offer that
    // holds the server to 8 is declined.
    if x.smwb == Some(8) {
        return Some(None);
    }
    Some(Some(x))
}

/// The reply, read strictly: our own output has no quotes and no odd spacing to excuse.
fn parse_reply(r: &str) -> Ext {
    let mut parts = r.split("; ");
    assert_eq!(parts.next(), Some("permessage-deflate"), "{r}");
    let mut x = Ext::default();
    let mut seen = Vec::new();
    for p in parts {
        let (k, v) = match p.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (p, None),
        };
        assert!(!seen.contains(&k), "{k} repeated in {r}");
        seen.push(k);
        match (k, v) {
            ("server_no_context_takeover", None) => x.snct = true,
            ("client_no_context_takeover", None) => x.cnct = true,
            ("server_max_window_bits", Some(v)) => x.smwb = Some(bits(v).expect(r)),
            ("client_max_window_bits", Some(v)) => x.cmwb = Some(Some(bits(v).expect(r))),
            _ => panic!("invalid parameter {p:?} in {r}"),
        }
    }
    x
}

fn check(offer: Ext, reply: Ext, agreed: &Agreed, policy: &Policy) {
    let cap = policy.server_max_window_bits.clamp(9, 15);
    // §7.1.1.1: an offered server_no_context_takeover must be in the reply.
    assert!(!offer.snct || reply.snct);
    assert!(!policy.server_no_context_takeover || reply.snct);
    assert!(!policy.client_no_context_takeover || reply.cnct);
    // §7.1.2.1: the server's window, no larger than offered, never 8, within our cap.
    if let Some(w) = offer.smwb {
        assert!(reply.smwb.is_some_and(|v| v <= w), "{offer:?} {reply:?}");
    }
    let server_bits = reply.smwb.unwrap_or(15);
    assert!((9..=cap).contains(&server_bits), "{reply:?} cap {cap}");
    // §7.1.2.2: client_max_window_bits only when offered, no larger than offered.
    match (offer.cmwb, reply.cmwb) {
        (_, None) => {}
        (None, Some(_)) => panic!("client_max_window_bits not offered: {reply:?}"),
        (Some(o), Some(v)) => assert!(v <= o.or(Some(15)), "{offer:?} {reply:?}"),
    }
    assert_eq!(agreed.server_no_context_takeover, reply.snct);
    assert_eq!(agreed.client_no_context_takeover, reply.cnct);
    assert_eq!(agreed.server_max_window_bits, server_bits);
    assert_eq!(
        agreed.client_max_window_bits,
        reply.cmwb.flatten().unwrap_or(15)
    );
}

fuzz_target!(|data: &[u8]| {
    let mut p = Params(data);
    let b = p.u8();
    let policy = Policy {
        server_max_window_bits: 9 + b % 7,
        server_no_context_takeover: b & 0x08 != 0,
        client_no_context_takeover: b & 0x10 != 0,
    };
    let Ok(text) = std::str::from_utf8(p.rest()) else {
        return; // header values reach negotiate as &str
    };
    let lines: Vec<&str> = text.split('\n').collect();
    let first = lines
        .iter()
        .flat_map(|l| split(l, ','))
        .filter_map(parse_offer)
        .find_map(|o| o);
    match (negotiate(lines.iter().copied(), &policy), first) {
        (None, None) => {}
        (Some(a), Some(offer)) => check(offer, parse_reply(&a.response()), &a, &policy),
        (Some(a), None) => panic!("accepted {:?} though no offer is acceptable", a.response()),
        (None, Some(o)) => panic!("declined the acceptable offer {o:?}"),
    }
});
