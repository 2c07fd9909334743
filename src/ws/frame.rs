//! RFC 6455 §5.2 frame headers: parse (client → server, masked) and encode (server → client,
//! unmasked). Pure functions over byte slices; no allocation, no I/O.

use bytes::BufMut;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpCode {
    Continuation,
    Text,
    Binary,
    Close,
    Ping,
    Pong,
}

impl OpCode {
    fn from_u8(v: u8) -> Option<OpCode> {
        Some(match v {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            _ => return None,
        })
    }
    pub fn as_u8(self) -> u8 {
        match self {
            OpCode::Continuation => 0x0,
            OpCode::Text => 0x1,
            OpCode::Binary => 0x2,
            OpCode::Close => 0x8,
            OpCode::Ping => 0x9,
            OpCode::Pong => 0xA,
        }
    }
    pub fn is_control(self) -> bool {
        matches!(self, OpCode::Close | OpCode::Ping | OpCode::Pong)
    }
}

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    /// The three reserved bits, RSV1 in the highest position (0b100).
    pub rsv: u8,
    pub opcode: OpCode,
    pub mask: Option<[u8; 4]>,
    pub payload_len: u64,
    /// Bytes the header itself occupies (2 to 14).
    pub header_len: usize,
}

/// Why a header is not acceptable; every variant is a protocol error (close 1002).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("unknown opcode {0:#x}")]
    UnknownOpcode(u8),
    #[error("payload length has the most significant bit set")]
    LengthTooLarge,
    #[error("length not minimally encoded")]
    NonMinimalLength,
}

/// Parses a header from the start of `buf`; `Ok(None)` when more bytes are needed.
#[inline]
pub fn parse_header(buf: &[u8]) -> Result<Option<Header>, HeaderError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    let opcode = OpCode::from_u8(b0 & 0x0F).ok_or(HeaderError::UnknownOpcode(b0 & 0x0F))?;
    let masked = b1 & 0x80 != 0;
    let (payload_len, mut pos) = match b1 & 0x7F {
        126 => {
            let Some(b) = buf.get(2..4) else {
                return Ok(None);
            };
            let len = u16::from_be_bytes([b[0], b[1]]) as u64;
            if len < 126 {
                return Err(HeaderError::NonMinimalLength);
            }
            (len, 4)
        }
        127 => {
            let Some(b) = buf.get(2..10) else {
                return Ok(None);
            };
            let mut raw = [0u8; 8];
            raw.copy_from_slice(b);
            let len = u64::from_be_bytes(raw);
            if len >> 63 != 0 {
                return Err(HeaderError::LengthTooLarge);
            }
            if len <= u16::MAX as u64 {
                return Err(HeaderError::NonMinimalLength);
            }
            (len, 10)
        }
        n => (n as u64, 2),
    };
    let mask = if masked {
        let Some(m) = buf.get(pos..pos + 4) else {
            return Ok(None);
        };
        pos += 4;
        Some([m[0], m[1], m[2], m[3]])
    } else {
        None
    };
    Ok(Some(Header {
        fin: b0 & 0x80 != 0,
        rsv: (b0 >> 4) & 0x07,
        opcode,
        mask,
        payload_len,
        header_len: pos,
    }))
}

/// Length of the header `write_header` produces for an unmasked payload of `len` bytes.
#[inline]
pub fn header_len(len: usize) -> usize {
    match len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    }
}

/// Where the payload starts in an unmasked server frame built by [`write_frame`].
pub fn payload_offset(frame: &[u8]) -> usize {
    match frame.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        Some(_) => 2,
        None => frame.len(),
    }
}

/// Writes an unmasked server frame header. `rsv1` marks a compressed first frame (RFC 7692).
#[inline]
pub fn write_header(out: &mut impl BufMut, fin: bool, rsv1: bool, opcode: OpCode, len: usize) {
    let b0 = (fin as u8) << 7 | (rsv1 as u8) << 6 | opcode.as_u8();
    match len {
        0..=125 => out.put_slice(&[b0, len as u8]),
        126..=65535 => {
            out.put_slice(&[b0, 126]);
            out.put_u16(len as u16);
        }
        _ => {
            out.put_slice(&[b0, 127]);
            out.put_u64(len as u64);
        }
    }
}

/// Writes a whole unmasked, unfragmented frame.
#[inline]
pub fn write_frame(out: &mut impl BufMut, opcode: OpCode, payload: &[u8]) {
    write_header(out, true, false, opcode, payload.len());
    out.put_slice(payload);
}

/// Writes a masked frame, as a client does (used by the load tool and tests).
pub fn write_masked_frame(
    out: &mut Vec<u8>,
    fin: bool,
    opcode: OpCode,
    mask: [u8; 4],
    payload: &[u8],
) {
    let start = out.len();
    write_header(out, fin, false, opcode, payload.len());
    out[start + 1] |= 0x80;
    out.extend_from_slice(&mask);
    let body = out.len();
    out.extend_from_slice(payload);
    unmask(&mut out[body..], mask);
}

/// XORs `buf` with the masking key (its own inverse). fastwebsockets' word-at-a-time
/// implementation, which the compiler vectorises.
#[inline]
pub fn unmask(buf: &mut [u8], mask: [u8; 4]) {
    fastwebsockets::unmask(buf, mask)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(fin: bool, op: OpCode, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        write_masked_frame(&mut v, fin, op, [1, 2, 3, 4], payload);
        v
    }

    #[test]
    fn round_trips_all_length_forms() {
        for len in [0usize, 1, 125, 126, 65535, 65536, 200_000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut f = masked(true, OpCode::Binary, &payload);
            let h = parse_header(&f).unwrap().unwrap();
            assert_eq!(h.payload_len, len as u64);
            assert_eq!(h.header_len, header_len(len) + 4);
            assert!(h.fin);
            let body = &mut f[h.header_len..];
            unmask(body, h.mask.unwrap());
            assert_eq!(body, &payload[..]);
        }
    }

    #[test]
    fn partial_headers_need_more() {
        let f = masked(true, OpCode::Text, &[7u8; 70_000]);
        for cut in 0..14 {
            assert_eq!(parse_header(&f[..cut]), Ok(None), "cut at {cut}");
        }
        assert!(parse_header(&f[..14]).unwrap().is_some());
    }

    #[test]
    fn rejects_bad_headers() {
        assert_eq!(
            parse_header(&[0x83, 0x80, 0, 0, 0, 0]),
            Err(HeaderError::UnknownOpcode(3))
        );
        let mut big = vec![0x82, 0xFF];
        big.extend_from_slice(&u64::MAX.to_be_bytes());
        assert_eq!(parse_header(&big), Err(HeaderError::LengthTooLarge));
        assert_eq!(
            parse_header(&[0x82, 0xFE, 0, 5]),
            Err(HeaderError::NonMinimalLength)
        );
    }

    #[test]
    fn reads_flags() {
        let h = parse_header(&[0x41 | 0x30, 0x00]).unwrap().unwrap();
        assert!(!h.fin);
        assert_eq!(h.rsv, 0b111);
        assert_eq!(h.opcode, OpCode::Text);
        assert_eq!(h.mask, None);
    }

    #[test]
    fn server_frames_are_unmasked() {
        let mut out = Vec::new();
        write_frame(&mut out, OpCode::Pong, b"hi");
        assert_eq!(out, vec![0x8A, 2, b'h', b'i']);
    }
}
