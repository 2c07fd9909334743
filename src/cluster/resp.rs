//! RESP3, the Redis protocol: commands out, replies and pushes in. A plain codec: bytes in,
//! values out, no socket. Everything Redis may send is parsed; what ringgate does not use
//! (attributes, doubles, booleans, big numbers) is mapped onto the few kinds it reads.

use bytes::Bytes;

/// A value Redis sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// RESP3 null, RESP2 null bulk or array.
    Nil,
    /// An integer (booleans as 0/1).
    Int(i64),
    /// A simple, bulk or verbatim string, a double or a big number (as text).
    Str(Bytes),
    /// An error reply (`-ERR …`, blob errors).
    Error(String),
    /// An array or a set; a map as its keys and values in turn.
    Array(Vec<Value>),
    /// Out of band (pub/sub messages, subscribe confirmations).
    Push(Vec<Value>),
}

impl Value {
    pub fn as_bytes(&self) -> Option<&[u8]> {
        match self {
            Value::Str(b) => Some(b),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(i) => Some(*i),
            Value::Str(b) => std::str::from_utf8(b).ok()?.parse().ok(),
            _ => None,
        }
    }
}

/// Redis sent something that is not RESP, or over a limit: the connection is dropped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad reply from Redis: {0}")]
pub struct ProtocolError(pub &'static str);

/// Largest string accepted (Redis's own limit for a string is 512 MiB; ringgate never stores
/// more than a room message).
const MAX_BULK: usize = 64 << 20;
/// Most elements in one aggregate (a history is at most `history_size` entries).
const MAX_ITEMS: usize = 1 << 20;
/// Deepest nesting accepted (ringgate's replies nest two levels).
const MAX_DEPTH: usize = 8;

/// Appends `args` as one command (an array of bulk strings). Lengths go through `itoa`:
/// `format!` per argument was most of a publish's CPU (bench/CLUSTER.md).
pub fn command(out: &mut Vec<u8>, args: &[&[u8]]) {
    // One allocation: each argument takes at most 15 bytes of framing (`$`, its length, two
    // CRLFs).
    out.reserve(16 + args.iter().map(|a| a.len() + 15).sum::<usize>());
    let mut len = itoa::Buffer::new();
    let mut head = |out: &mut Vec<u8>, kind: u8, n: usize| {
        out.push(kind);
        out.extend_from_slice(len.format(n).as_bytes());
        out.extend_from_slice(b"\r\n");
    };
    head(out, b'*', args.len());
    for a in args {
        head(out, b'$', a.len());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Parses one value from the start of `buf`: `Ok(None)` when it is not complete yet, else the
/// value and the bytes it took.
pub fn parse(buf: &[u8]) -> Result<Option<(Value, usize)>, ProtocolError> {
    let mut pos = 0;
    Ok(value(buf, &mut pos, 0)?.map(|v| (v, pos)))
}

/// The line at `pos` (without CRLF); advances past it.
fn line<'a>(buf: &'a [u8], pos: &mut usize) -> Option<&'a [u8]> {
    let rest = buf.get(*pos..)?;
    let end = rest.windows(2).position(|w| w == b"\r\n")?;
    *pos += end + 2;
    Some(&rest[..end])
}

fn int(text: &[u8]) -> Result<i64, ProtocolError> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or(ProtocolError("bad integer"))
}

fn value(buf: &[u8], pos: &mut usize, depth: usize) -> Result<Option<Value>, ProtocolError> {
    if depth > MAX_DEPTH {
        return Err(ProtocolError("nested too deep"));
    }
    let Some(&kind) = buf.get(*pos) else {
        return Ok(None);
    };
    *pos += 1;
    let Some(head) = line(buf, pos) else {
        return Ok(None);
    };
    Ok(Some(match kind {
        b'+' | b',' | b'(' => Value::Str(Bytes::copy_from_slice(head)),
        b'-' => Value::Error(String::from_utf8_lossy(head).into_owned()),
        b':' => Value::Int(int(head)?),
        b'#' => Value::Int(i64::from(head == b"t")),
        b'_' => Value::Nil,
        b'$' | b'=' | b'!' => {
            let len = int(head)?;
            if len < 0 {
                return Ok(Some(Value::Nil));
            }
            let len = usize::try_from(len).map_err(|_| ProtocolError("bad length"))?;
            if len > MAX_BULK {
                return Err(ProtocolError("string too long"));
            }
            let Some(body) = buf.get(*pos..*pos + len) else {
                return Ok(None);
            };
            if buf.get(*pos + len..*pos + len + 2).is_none() {
                return Ok(None);
            }
            if &buf[*pos + len..*pos + len + 2] != b"\r\n" {
                return Err(ProtocolError("string without CRLF"));
            }
            *pos += len + 2;
            match kind {
                b'!' => Value::Error(String::from_utf8_lossy(body).into_owned()),
                // Verbatim strings start with a 3-letter format and a colon.
                b'=' => Value::Str(Bytes::copy_from_slice(body.get(4..).unwrap_or_default())),
                _ => Value::Str(Bytes::copy_from_slice(body)),
            }
        }
        b'*' | b'~' | b'>' | b'%' | b'|' => {
            let n = int(head)?;
            if n < 0 {
                return Ok(Some(Value::Nil));
            }
            let pairs = if matches!(kind, b'%' | b'|') { 2 } else { 1 };
            let n = usize::try_from(n)
                .ok()
                .and_then(|n| n.checked_mul(pairs))
                .filter(|&n| n <= MAX_ITEMS)
                .ok_or(ProtocolError("too many elements"))?;
            let mut items = Vec::with_capacity(n.min(1024));
            for _ in 0..n {
                match value(buf, pos, depth + 1)? {
                    Some(v) => items.push(v),
                    None => return Ok(None),
                }
            }
            match kind {
                b'>' => Value::Push(items),
                // An attribute annotates the value after it: skip to that value.
                b'|' => return value(buf, pos, depth),
                _ => Value::Array(items),
            }
        }
        _ => return Err(ProtocolError("unknown type byte")),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(b: &str) -> Value {
        Value::Str(Bytes::copy_from_slice(b.as_bytes()))
    }

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut out = Vec::new();
        command(&mut out, &[b"GET", b"a\r\nb"]);
        assert_eq!(out, b"*2\r\n$3\r\nGET\r\n$4\r\na\r\nb\r\n");
    }

    #[test]
    fn every_kind_parses_and_reports_its_length() {
        let cases: &[(&str, Value)] = &[
            ("+OK\r\n", s("OK")),
            ("-ERR no\r\n", Value::Error("ERR no".into())),
            (":-7\r\n", Value::Int(-7)),
            ("#t\r\n", Value::Int(1)),
            ("_\r\n", Value::Nil),
            ("$-1\r\n", Value::Nil),
            ("$3\r\na\nb\r\n", s("a\nb")),
            ("=7\r\ntxt:abc\r\n", s("abc")),
            (
                "*2\r\n:1\r\n$1\r\nx\r\n",
                Value::Array(vec![Value::Int(1), s("x")]),
            ),
            (
                "%1\r\n+k\r\n:2\r\n",
                Value::Array(vec![s("k"), Value::Int(2)]),
            ),
            (
                ">3\r\n$7\r\nmessage\r\n$1\r\nc\r\n$2\r\nhi\r\n",
                Value::Push(vec![s("message"), s("c"), s("hi")]),
            ),
            ("|1\r\n+a\r\n+b\r\n:5\r\n", Value::Int(5)),
        ];
        for (text, want) in cases {
            let got = parse(text.as_bytes()).expect("valid");
            assert_eq!(got, Some((want.clone(), text.len())), "{text:?}");
        }
    }

    #[test]
    fn a_value_split_anywhere_waits_for_the_rest() {
        let text = b"*2\r\n$5\r\nhello\r\n>2\r\n:1\r\n:2\r\n";
        for cut in 0..text.len() {
            assert_eq!(parse(&text[..cut]), Ok(None), "cut at {cut}");
        }
        let (v, used) = parse(text).expect("valid").expect("complete");
        assert_eq!(
            v,
            Value::Array(vec![
                s("hello"),
                Value::Push(vec![Value::Int(1), Value::Int(2)])
            ])
        );
        assert_eq!(used, text.len());
    }

    #[test]
    fn garbage_and_oversized_values_are_errors() {
        for bad in [
            &b"?x\r\n"[..],
            b":abc\r\n",
            b"$3\r\nabcd\r\n",
            b"*99999999999\r\n",
            b"$99999999999\r\n",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let deep = "*1\r\n".repeat(MAX_DEPTH + 2) + ":1\r\n";
        assert!(parse(deep.as_bytes()).is_err());
    }
}
