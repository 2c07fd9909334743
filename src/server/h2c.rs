//! HTTP/2 with prior knowledge on plain listeners (h2c, RFC 9113 §3.3): a connection that
//! opens with the client preface speaks HTTP/2, any other speaks HTTP/1.1.

use bytes::BytesMut;
use tokio::io::AsyncReadExt;

use crate::io::Stream;

/// What every HTTP/2 connection starts with.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads until the first bytes either are the HTTP/2 preface or cannot be; returns the stream
/// with those bytes put back, and whether it is HTTP/2. The caller bounds it with its
/// handshake timeout.
pub async fn sniff(mut conn: Stream) -> std::io::Result<(Stream, bool)> {
    let mut read = BytesMut::with_capacity(PREFACE.len());
    while read.len() < PREFACE.len() {
        // Never past the preface: what follows is hyper's to read.
        let mut limited = (&mut conn).take((PREFACE.len() - read.len()) as u64);
        if limited.read_buf(&mut read).await? == 0 {
            break;
        }
        if !PREFACE.starts_with(&read) {
            break;
        }
    }
    let h2 = read[..] == *PREFACE;
    Ok((conn.unread(read.freeze()), h2))
}

#[cfg(test)]
mod tests {
    use super::PREFACE;

    #[test]
    fn an_http1_request_line_is_not_the_preface() {
        // `PRI` is a valid HTTP/1.1 method name: only the whole preface decides.
        assert!(!PREFACE.starts_with(b"PRI / HTTP/1.1"));
        assert!(!PREFACE.starts_with(b"GET / HTTP/1.1\r\n"));
        assert!(PREFACE.starts_with(b"PRI * HTTP/2.0"));
    }
}
