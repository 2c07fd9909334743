//! permessage-deflate from the client's side (RFC 7692): the offer, the server's answer, and
//! compressing and inflating message bodies.

use anyhow::{bail, ensure, Context as _, Result};
use flate2::{Compress, Decompress, FlushCompress, FlushDecompress, Status};

/// The tail a sync flush ends with, stripped from and re-appended to message bodies (RFC 7692).
const DEFLATE_TAIL: [u8; 4] = [0x00, 0x00, 0xff, 0xff];
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

/// Compresses one message body (sync flush, tail stripped) into `out`, replacing its contents.
pub fn deflate_message(z: &mut Compress, input: &[u8], out: &mut Vec<u8>) {
    out.clear();
    out.reserve(input.len() + 64);
    let base = z.total_in();
    loop {
        let done = (z.total_in() - base) as usize;
        z.compress_vec(&input[done..], out, FlushCompress::Sync)
            .expect("deflate stream state");
        let done = (z.total_in() - base) as usize;
        if done == input.len() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity().max(64));
    }
    if out.ends_with(&DEFLATE_TAIL) {
        out.truncate(out.len() - DEFLATE_TAIL.len());
    }
}

/// Inflates one compressed message body into `out` (replacing its contents), refusing more
/// than `limit` bytes.
pub fn inflate_message(
    z: &mut Decompress,
    input: &[u8],
    out: &mut Vec<u8>,
    limit: usize,
) -> Result<()> {
    out.clear();
    for chunk in [input, &DEFLATE_TAIL[..]] {
        let base = z.total_in();
        loop {
            if out.len() == out.capacity() {
                ensure!(out.len() <= limit, "inflated reply over {limit} bytes");
                out.reserve(out.capacity().max(4096));
            }
            let done = (z.total_in() - base) as usize;
            let before = (z.total_in(), z.total_out());
            let st = z
                .decompress_vec(&chunk[done..], out, FlushDecompress::Sync)
                .map_err(|e| anyhow::anyhow!("corrupt compressed reply: {e}"))?;
            ensure!(out.len() <= limit, "inflated reply over {limit} bytes");
            if st == Status::StreamEnd {
                // A final block: the server may end its stream; start a fresh one.
                z.reset(false);
                return Ok(());
            }
            let done = (z.total_in() - base) as usize;
            if done == chunk.len() && out.len() < out.capacity() {
                break;
            }
            ensure!(
                before != (z.total_in(), z.total_out()) || out.len() == out.capacity(),
                "inflate made no progress"
            );
        }
    }
    Ok(())
}
