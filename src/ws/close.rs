//! Close codes (RFC 6455 §7.4) and close frame bodies.

use bytes::BufMut;

/// A WebSocket close status code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseCode(pub u16);

impl CloseCode {
    pub const NORMAL: CloseCode = CloseCode(1000);
    pub const GOING_AWAY: CloseCode = CloseCode(1001);
    pub const PROTOCOL: CloseCode = CloseCode(1002);
    pub const INVALID_DATA: CloseCode = CloseCode(1007);
    pub const POLICY: CloseCode = CloseCode(1008);
    pub const TOO_BIG: CloseCode = CloseCode(1009);
    pub const INTERNAL: CloseCode = CloseCode(1011);
    pub const TRY_AGAIN_LATER: CloseCode = CloseCode(1013);

    /// Whether a peer may send this code in a close frame: the registered codes that are not
    /// reserved for local use (1004-1006, 1015), and the application ranges 3000-4999.
    pub fn is_valid_on_wire(self) -> bool {
        matches!(self.0, 1000..=1003 | 1007..=1014 | 3000..=4999)
    }
}

/// Writes a close frame body: the code and a reason cut to fit the 125-byte control limit
/// (on a character boundary, so it stays valid UTF-8).
pub fn write_close_body(out: &mut impl BufMut, code: CloseCode, reason: &str) {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    out.put_u16(code.0);
    out.put_slice(&reason.as_bytes()[..end]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_validity() {
        for ok in [1000, 1001, 1003, 1007, 1011, 1013, 3000, 4999] {
            assert!(CloseCode(ok).is_valid_on_wire(), "{ok}");
        }
        for bad in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000] {
            assert!(!CloseCode(bad).is_valid_on_wire(), "{bad}");
        }
    }

    #[test]
    fn long_reasons_are_cut_on_a_char_boundary() {
        let reason = "é".repeat(100);
        let mut out = Vec::new();
        write_close_body(&mut out, CloseCode::NORMAL, &reason);
        assert!(out.len() <= 125);
        assert!(std::str::from_utf8(&out[2..]).is_ok());
    }
}
