//! permessage-deflate from the client's side (RFC 7692): the offer and the server's answer.
//! Message bodies are compressed and inflated with the server's own codec
//! (`ringgate::ws::deflate::{Deflater, Inflater}`).

use anyhow::{bail, ensure, Context as _, Result};

/// The offer browsers send.
pub const DEFLATE_OFFER: &str = "permessage-deflate; client_max_window_bits";

/// permessage-deflate parameters a server accepted (RFC 7692 §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pmd {
    pub server_no_context_takeover: bool,
    pub client_no_context_takeover: bool,
    pub server_max_window_bits: u8,
    /// The window the client must stay within (15 when the server did not say).
    pub client_max_window_bits: u8,
}

/// Parses the server's `Sec-WebSocket-Extensions` response to our offer.
pub fn parse_pmd(v: &str) -> Result<Pmd> {
    ensure!(
        !v.contains(','),
        "server accepted more than one extension: {v:?}"
    );
    let mut parts = v.split(';').map(str::trim);
    let name = parts.next().unwrap_or_default();
    ensure!(
        name.eq_ignore_ascii_case("permessage-deflate"),
        "server answered with extension {name:?}"
    );
    let mut p = Pmd {
        server_no_context_takeover: false,
        client_no_context_takeover: false,
        server_max_window_bits: 15,
        client_max_window_bits: 15,
    };
    let bits = |v: Option<&str>| -> Result<u8> {
        let v = v.map(|v| v.trim().trim_matches('"')).unwrap_or_default();
        let b: u8 = v
            .parse()
            .with_context(|| format!("bad window bits {v:?}"))?;
        ensure!((8..=15).contains(&b), "window bits {b} out of range");
        Ok(b)
    };
    for param in parts.filter(|p| !p.is_empty()) {
        let (k, v) = match param.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v)),
            None => (param, None),
        };
        match k.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" => p.server_no_context_takeover = true,
            "client_no_context_takeover" => p.client_no_context_takeover = true,
            "server_max_window_bits" => p.server_max_window_bits = bits(v)?,
            "client_max_window_bits" => p.client_max_window_bits = bits(v)?,
            other => bail!("unknown permessage-deflate parameter {other:?}"),
        }
    }
    // zlib cannot compress raw deflate with an 8-bit window.
    ensure!(
        p.client_max_window_bits >= 9,
        "server limits the client to an 8-bit window, which zlib cannot produce"
    );
    Ok(p)
}
