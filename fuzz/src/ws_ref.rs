//! A deliberately simple RFC 6455 client-frame decoder (§5.2–5.6, §7.4, §8.1; RFC 7692 §6 for
//! RSV1): whole stream in, events out, no buffering tricks. Slow and obvious on purpose: the
//! frame reader must agree with it on every input.
//!
//! Where RFC 6455 leaves the moment of failure open, this follows the reader's documented
//! choice: a header error is reported as soon as the header bytes that show it are there
//! (before the payload arrives), and invalid UTF-8 fails as soon as a fragment shows it.

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ev {
    Text(Vec<u8>),
    Binary(Vec<u8>),
    Compressed { text: bool, data: Vec<u8> },
    Ping(Vec<u8>),
    Pong(Vec<u8>),
    Close(Option<(u16, String)>),
}

/// How the connection fails, by the close code it earns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fail {
    /// 1002
    Protocol,
    /// 1007
    Utf8,
    /// 1009
    TooBig,
}

/// Close codes a peer may send (RFC 6455 §7.4.1 and the IANA registry; 1004–1006 and 1015
/// must never be on the wire).
fn close_code_ok(c: u16) -> bool {
    matches!(c, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

struct Msg {
    text: bool,
    compressed: bool,
    data: Vec<u8>,
}

pub fn decode(stream: &[u8], max: usize, deflate: bool) -> (Vec<Ev>, Option<Fail>) {
    let mut events = Vec::new();
    let fail = run(stream, max, deflate, &mut events).err();
    (events, fail)
}

fn run(stream: &[u8], max: usize, deflate: bool, events: &mut Vec<Ev>) -> Result<(), Fail> {
    let mut pos = 0usize;
    let mut msg: Option<Msg> = None;
    loop {
        let rest = &stream[pos..];
        if rest.len() < 2 {
            return Ok(());
        }
        let fin = rest[0] & 0x80 != 0;
        let rsv = (rest[0] >> 4) & 0x7;
        let op = rest[0] & 0x0f;
        if !matches!(op, 0x0 | 0x1 | 0x2 | 0x8 | 0x9 | 0xa) {
            return Err(Fail::Protocol);
        }
        let masked = rest[1] & 0x80 != 0;
        let (len, mut hl) = match rest[1] & 0x7f {
            126 => {
                if rest.len() < 4 {
                    return Ok(());
                }
                let l = u64::from(rest[2]) << 8 | u64::from(rest[3]);
                if l < 126 {
                    return Err(Fail::Protocol);
                }
                (l, 4)
            }
            127 => {
                if rest.len() < 10 {
                    return Ok(());
                }
                let l = rest[2..10].iter().fold(0u64, |a, &b| a << 8 | u64::from(b));
                if l >> 63 == 1 || l < 65536 {
                    return Err(Fail::Protocol);
                }
                (l, 10)
            }
            n => (u64::from(n), 2),
        };
        let mut key = [0u8; 4];
        if masked {
            if rest.len() < hl + 4 {
                return Ok(());
            }
            key.copy_from_slice(&rest[hl..hl + 4]);
            hl += 4;
        }
        let control = op >= 0x8;
        // Header rules.
        if !masked || rsv & 0b011 != 0 {
            return Err(Fail::Protocol);
        }
        if rsv & 0b100 != 0 && (!deflate || !matches!(op, 0x1 | 0x2)) {
            return Err(Fail::Protocol);
        }
        if control {
            if !fin || len > 125 {
                return Err(Fail::Protocol);
            }
        } else {
            match (op, &msg) {
                (0x0, None) | (0x1 | 0x2, Some(_)) => return Err(Fail::Protocol),
                _ => {}
            }
            let so_far = msg.as_ref().map_or(0, |m| m.data.len()) as u64;
            if so_far + len > max as u64 {
                return Err(Fail::TooBig);
            }
        }
        if (rest.len() as u64) < hl as u64 + len {
            return Ok(());
        }
        let len = len as usize;
        let payload: Vec<u8> = rest[hl..hl + len]
            .iter()
            .enumerate()
            .map(|(i, b)| b ^ key[i % 4])
            .collect();
        pos += hl + len;
        match op {
            0x8 => events.push(Ev::Close(match payload.len() {
                0 => None,
                1 => return Err(Fail::Protocol),
                _ => {
                    let code = u16::from(payload[0]) << 8 | u16::from(payload[1]);
                    if !close_code_ok(code) {
                        return Err(Fail::Protocol);
                    }
                    let reason =
                        String::from_utf8(payload[2..].to_vec()).map_err(|_| Fail::Utf8)?;
                    Some((code, reason))
                }
            })),
            0x9 => events.push(Ev::Ping(payload)),
            0xa => events.push(Ev::Pong(payload)),
            _ => {
                let m = msg.get_or_insert_with(|| Msg {
                    text: op == 0x1,
                    compressed: rsv != 0,
                    data: Vec::new(),
                });
                m.data.extend_from_slice(&payload);
                if m.text && !m.compressed {
                    if let Err(e) = std::str::from_utf8(&m.data) {
                        // Only a character cut at the end of a non-final fragment may wait.
                        if e.error_len().is_some() || fin {
                            return Err(Fail::Utf8);
                        }
                    }
                }
                if fin {
                    let Some(m) = msg.take() else {
                        return Err(Fail::Protocol);
                    };
                    events.push(match (m.compressed, m.text) {
                        (true, text) => Ev::Compressed { text, data: m.data },
                        (false, true) => Ev::Text(m.data),
                        (false, false) => Ev::Binary(m.data),
                    });
                }
            }
        }
    }
}
