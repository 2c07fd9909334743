//! permessage-deflate negotiation (RFC 7692 §5, §7.1): parse the client's offers, accept the
//! first one we can honour, and write the response. Pure: header text in, parameters out.

use std::fmt::Write as _;

/// What the server is willing to do, from the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    /// Largest LZ77 window the server compresses with (9..=15).
    pub server_max_window_bits: u8,
    /// Always answer `server_no_context_takeover`: every message is compressed on its own, so
    /// one compressed frame can be shared by every such connection (compress once, broadcast).
    pub server_no_context_takeover: bool,
    /// Ask clients not to use context takeover, so the server keeps no inflate state between
    /// messages (one shared inflater per shard instead of 32 KiB+ per connection).
    pub client_no_context_takeover: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            server_max_window_bits: 15,
            server_no_context_takeover: false,
            client_no_context_takeover: true,
        }
    }
}

/// The agreed parameters of one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    pub server_no_context_takeover: bool,
    pub client_no_context_takeover: bool,
    /// Window the server compresses with.
    pub server_max_window_bits: u8,
    /// Window the client promised not to exceed (15 when unconstrained).
    pub client_max_window_bits: u8,
    /// Include `server_max_window_bits` in the response.
    announce_server_bits: bool,
    /// Include `client_max_window_bits` in the response.
    announce_client_bits: bool,
}

/// One permessage-deflate offer as the client wrote it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Offer {
    server_no_context_takeover: bool,
    client_no_context_takeover: bool,
    server_max_window_bits: Option<u8>,
    /// `Some(None)`: offered without a value.
    client_max_window_bits: Option<Option<u8>>,
}

/// Picks the first acceptable permessage-deflate offer among the `Sec-WebSocket-Extensions`
/// header values; `None` declines compression (the connection proceeds without it). Offers
/// with unknown, repeated or invalid parameters are declined, as RFC 7692 §5 requires.
pub fn negotiate<'a>(
    headers: impl IntoIterator<Item = &'a str>,
    policy: &Policy,
) -> Option<Params> {
    headers
        .into_iter()
        .flat_map(split_outside_quotes(','))
        .filter_map(parse_offer)
        .find_map(|offer| accept(offer.ok()?, policy))
}

fn accept(offer: Offer, policy: &Policy) -> Option<Params> {
    let cap = policy.server_max_window_bits.clamp(9, 15);
    let server_bits = offer.server_max_window_bits.unwrap_or(15).min(cap);
    // zlib cannot produce raw deflate with an 8-bit window (it silently uses 9), which a client
    // holding us to 8 could not decode: decline such an offer rather than break it.
    if server_bits < 9 {
        return None;
    }
    let (client_bits, announce_client_bits) = match offer.client_max_window_bits {
        None => (15, false),
        Some(None) => (15, false),
        Some(Some(v)) => (v, true),
    };
    Some(Params {
        server_no_context_takeover: offer.server_no_context_takeover
            || policy.server_no_context_takeover,
        client_no_context_takeover: offer.client_no_context_takeover
            || policy.client_no_context_takeover,
        server_max_window_bits: server_bits,
        client_max_window_bits: client_bits,
        announce_server_bits: offer.server_max_window_bits.is_some() || server_bits < 15,
        announce_client_bits,
    })
}

/// `Some(Err(()))`: a permessage-deflate offer we must decline; `None`: another extension.
fn parse_offer(ext: &str) -> Option<Result<Offer, ()>> {
    let mut parts = split_outside_quotes(';')(ext);
    let name = parts.next()?.trim();
    if !name.eq_ignore_ascii_case("permessage-deflate") {
        return None;
    }
    let mut offer = Offer::default();
    let mut seen = [false; 4];
    for p in parts {
        let (key, value) = match p.split_once('=') {
            Some((k, v)) => (k.trim(), Some(unquote(v.trim()))),
            None => (p.trim(), None),
        };
        let slot = match key.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" if value.is_none() => {
                offer.server_no_context_takeover = true;
                0
            }
            "client_no_context_takeover" if value.is_none() => {
                offer.client_no_context_takeover = true;
                1
            }
            "server_max_window_bits" => match value.and_then(window_bits) {
                Some(v) => {
                    offer.server_max_window_bits = Some(v);
                    2
                }
                None => return Some(Err(())),
            },
            "client_max_window_bits" => match value {
                None => {
                    offer.client_max_window_bits = Some(None);
                    3
                }
                Some(v) => match window_bits(v) {
                    Some(v) => {
                        offer.client_max_window_bits = Some(Some(v));
                        3
                    }
                    None => return Some(Err(())),
                },
            },
            _ => return Some(Err(())),
        };
        if std::mem::replace(&mut seen[slot], true) {
            return Some(Err(()));
        }
    }
    Some(Ok(offer))
}

/// A window-bits value: 8 to 15, plain digits without leading zeros (RFC 7692 §7.1.2).
fn window_bits(v: &str) -> Option<u8> {
    if v.is_empty() || v.len() > 2 || v.starts_with('0') || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse().ok().filter(|b| (8..=15).contains(b))
}

fn unquote(v: &str) -> &str {
    v.strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(v)
}

/// Splits on `sep` outside double quotes.
fn split_outside_quotes(sep: char) -> impl Fn(&str) -> std::vec::IntoIter<&str> {
    move |s: &str| {
        let mut out = Vec::new();
        let (mut start, mut quoted) = (0, false);
        for (i, c) in s.char_indices() {
            match c {
                '"' => quoted = !quoted,
                c if c == sep && !quoted => {
                    out.push(&s[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        out.push(&s[start..]);
        out.into_iter()
    }
}

impl Params {
    /// The `Sec-WebSocket-Extensions` response value.
    pub fn response(&self) -> String {
        let mut s = String::from("permessage-deflate");
        if self.server_no_context_takeover {
            s.push_str("; server_no_context_takeover");
        }
        if self.client_no_context_takeover {
            s.push_str("; client_no_context_takeover");
        }
        if self.announce_server_bits {
            let _ = write!(
                s,
                "; server_max_window_bits={}",
                self.server_max_window_bits
            );
        }
        if self.announce_client_bits {
            let _ = write!(
                s,
                "; client_max_window_bits={}",
                self.client_max_window_bits
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn neg(h: &str, p: &Policy) -> Option<String> {
        negotiate([h], p).map(|p| p.response())
    }

    const TAKEOVER: Policy = Policy {
        server_max_window_bits: 15,
        server_no_context_takeover: false,
        client_no_context_takeover: false,
    };

    #[test]
    fn negotiation_matrix() {
        let cases: &[(&str, Policy, Option<&str>)] = &[
            // What browsers send.
            (
                "permessage-deflate; client_max_window_bits",
                TAKEOVER,
                Some("permessage-deflate"),
            ),
            (
                "permessage-deflate; client_max_window_bits",
                Policy::default(),
                Some("permessage-deflate; client_no_context_takeover"),
            ),
            ("permessage-deflate", TAKEOVER, Some("permessage-deflate")),
            (
                "permessage-deflate; server_no_context_takeover",
                TAKEOVER,
                Some("permessage-deflate; server_no_context_takeover"),
            ),
            (
                "permessage-deflate; client_no_context_takeover",
                TAKEOVER,
                Some("permessage-deflate; client_no_context_takeover"),
            ),
            (
                "permessage-deflate; server_max_window_bits=10",
                TAKEOVER,
                Some("permessage-deflate; server_max_window_bits=10"),
            ),
            (
                "permessage-deflate; client_max_window_bits=9",
                TAKEOVER,
                Some("permessage-deflate; client_max_window_bits=9"),
            ),
            (
                "permessage-deflate; server_max_window_bits=\"12\"",
                TAKEOVER,
                Some("permessage-deflate; server_max_window_bits=12"),
            ),
            // Our cap applies even when the client did not ask.
            (
                "permessage-deflate",
                Policy {
                    server_max_window_bits: 11,
                    ..TAKEOVER
                },
                Some("permessage-deflate; server_max_window_bits=11"),
            ),
            (
                "permessage-deflate",
                Policy {
                    server_no_context_takeover: true,
                    ..TAKEOVER
                },
                Some("permessage-deflate; server_no_context_takeover"),
            ),
            // Declined: zlib cannot honour 8; bad values; unknown or repeated params.
            (
                "permessage-deflate; server_max_window_bits=8",
                TAKEOVER,
                None,
            ),
            ("permessage-deflate; server_max_window_bits", TAKEOVER, None),
            (
                "permessage-deflate; server_max_window_bits=16",
                TAKEOVER,
                None,
            ),
            (
                "permessage-deflate; client_max_window_bits=7",
                TAKEOVER,
                None,
            ),
            (
                "permessage-deflate; client_max_window_bits=0x9",
                TAKEOVER,
                None,
            ),
            // Found by fuzzing: a leading zero is not a window-bits value.
            (
                "permessage-deflate; server_max_window_bits=09",
                TAKEOVER,
                None,
            ),
            (
                "permessage-deflate; client_max_window_bits=09",
                TAKEOVER,
                None,
            ),
            ("permessage-deflate; foo", TAKEOVER, None),
            (
                "permessage-deflate; server_no_context_takeover=1",
                TAKEOVER,
                None,
            ),
            (
                "permessage-deflate; server_no_context_takeover; server_no_context_takeover",
                TAKEOVER,
                None,
            ),
            ("x-webkit-deflate-frame", TAKEOVER, None),
        ];
        for (offer, policy, want) in cases {
            assert_eq!(neg(offer, policy).as_deref(), *want, "offer {offer:?}");
        }
    }

    #[test]
    fn first_acceptable_offer_wins() {
        let h = "foo, permessage-deflate; server_max_window_bits=8, \
                 permessage-deflate; server_max_window_bits=10, permessage-deflate";
        assert_eq!(
            neg(h, &TAKEOVER).as_deref(),
            Some("permessage-deflate; server_max_window_bits=10")
        );
        // Offers may also arrive in separate header lines.
        let p = negotiate(
            ["permessage-deflate; bogus", "permessage-deflate"],
            &TAKEOVER,
        );
        assert_eq!(
            p.map(|p| p.response()).as_deref(),
            Some("permessage-deflate")
        );
    }

    #[test]
    fn agreed_parameters() {
        let p = negotiate(
            ["permessage-deflate; server_max_window_bits=12; client_max_window_bits=10"],
            &TAKEOVER,
        )
        .unwrap();
        assert_eq!(
            (p.server_max_window_bits, p.client_max_window_bits),
            (12, 10)
        );
        assert!(!p.server_no_context_takeover && !p.client_no_context_takeover);
    }
}
