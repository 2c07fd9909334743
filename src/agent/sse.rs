//! A Server-Sent Events decoder (the WHATWG `text/event-stream` rules) fed bytes split anywhere.
//!
//! Lines end with CRLF, LF or a lone CR (a CR at the end of one read and an LF at the start of
//! the next are one line end); `:` starts a comment; `data` lines of one event are joined with
//! `\n`; a blank line dispatches the event; an event without data is not dispatched. Memory is
//! bounded: a line or event over `max` bytes is an error.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The `event:` field; empty means "message".
    pub event: String,
    pub data: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SseError {
    /// A line or an event grew over the limit.
    TooLarge,
    /// The stream was not UTF-8.
    NotUtf8,
}

#[derive(Debug)]
pub struct SseDecoder {
    /// The incomplete line carried over between reads.
    line: Vec<u8>,
    /// The last byte seen was a CR: a following LF belongs to the same line end.
    after_cr: bool,
    data: String,
    has_data: bool,
    event: String,
    max: usize,
}

impl SseDecoder {
    pub fn new(max: usize) -> SseDecoder {
        SseDecoder {
            line: Vec::new(),
            after_cr: false,
            data: String::new(),
            has_data: false,
            event: String::new(),
            max,
        }
    }

    /// Feeds the next bytes; complete events go to `out` in order.
    pub fn feed(&mut self, mut bytes: &[u8], out: &mut Vec<Event>) -> Result<(), SseError> {
        // An empty read says nothing about whether an LF follows the CR.
        if self.after_cr && !bytes.is_empty() {
            self.after_cr = false;
            if let [b'\n', rest @ ..] = bytes {
                bytes = rest;
            }
        }
        while let Some(i) = bytes.iter().position(|&b| b == b'\n' || b == b'\r') {
            let end = bytes[i];
            if self.line.is_empty() {
                self.line_done(&bytes[..i], out)?;
            } else {
                self.push_line(&bytes[..i])?;
                let line = std::mem::take(&mut self.line);
                self.line_done(&line, out)?;
                self.line = line;
                self.line.clear();
            }
            bytes = &bytes[i + 1..];
            if end == b'\r' {
                match bytes {
                    [b'\n', rest @ ..] => bytes = rest,
                    [] => self.after_cr = true,
                    _ => {}
                }
            }
        }
        self.push_line(bytes)
    }

    /// The stream ended. An event whose last line ended but which lacks the blank line is still
    /// dispatched (lenient: upstreams often omit the final blank line); a partial line is not.
    pub fn finish(&mut self, out: &mut Vec<Event>) -> Result<(), SseError> {
        if !self.line.is_empty() {
            let line = std::mem::take(&mut self.line);
            self.line_done(&line, out)?;
        }
        self.dispatch(out);
        Ok(())
    }

    fn push_line(&mut self, part: &[u8]) -> Result<(), SseError> {
        if self.line.len() + part.len() > self.max {
            return Err(SseError::TooLarge);
        }
        self.line.extend_from_slice(part);
        Ok(())
    }

    fn line_done(&mut self, line: &[u8], out: &mut Vec<Event>) -> Result<(), SseError> {
        if line.is_empty() {
            self.dispatch(out);
            return Ok(());
        }
        if line.len() > self.max {
            return Err(SseError::TooLarge);
        }
        if line[0] == b':' {
            return Ok(()); // comment (keep-alive)
        }
        let line = std::str::from_utf8(line).map_err(|_| SseError::NotUtf8)?;
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "data" => {
                if self.data.len() + value.len() + 1 > self.max {
                    return Err(SseError::TooLarge);
                }
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            "event" => {
                self.event.clear();
                self.event.push_str(value);
            }
            // `id` and `retry` matter to reconnecting browsers, not to a proxied answer.
            _ => {}
        }
        Ok(())
    }

    fn dispatch(&mut self, out: &mut Vec<Event>) {
        if self.has_data {
            out.push(Event {
                event: std::mem::take(&mut self.event),
                data: std::mem::take(&mut self.data),
            });
        } else {
            self.event.clear();
        }
        self.has_data = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_in_pieces(input: &[u8], piece: usize) -> Vec<Event> {
        let mut d = SseDecoder::new(1 << 16);
        let mut out = Vec::new();
        for c in input.chunks(piece.max(1)) {
            d.feed(c, &mut out).unwrap();
        }
        d.finish(&mut out).unwrap();
        out
    }

    fn data(events: &[Event]) -> Vec<&str> {
        events.iter().map(|e| e.data.as_str()).collect()
    }

    const STREAM: &[u8] = b": keep-alive comment\r\n\
        data: {\"content\":\"def \"}\r\n\r\n\
        event: delta\nid: 7\nretry: 100\ndata: line one\ndata:line two\n\n\
        data\n\n\
        \n\n\
        data: cr only\r\r\
        data: [DONE]\n\n";

    #[test]
    fn every_split_gives_the_same_events() {
        let whole = decode_in_pieces(STREAM, STREAM.len());
        assert_eq!(
            data(&whole),
            [
                "{\"content\":\"def \"}",
                "line one\nline two",
                "",
                "cr only",
                "[DONE]"
            ]
        );
        assert_eq!(whole[1].event, "delta");
        assert_eq!(whole[0].event, "");
        for piece in 1..STREAM.len() {
            assert_eq!(decode_in_pieces(STREAM, piece), whole, "pieces of {piece}");
        }
    }

    #[test]
    fn crlf_split_between_reads_is_one_line_end() {
        let mut d = SseDecoder::new(1024);
        let mut out = Vec::new();
        d.feed(b"data: a\r", &mut out).unwrap();
        d.feed(b"\ndata: b\r", &mut out).unwrap();
        d.feed(b"\n\r", &mut out).unwrap();
        d.feed(b"\n", &mut out).unwrap();
        assert_eq!(data(&out), ["a\nb"]);
    }

    /// Found by fuzzing: an empty read (an empty body frame) between a CR and its LF made
    /// the LF a blank line, dispatching the event early.
    #[test]
    fn an_empty_read_between_cr_and_lf_changes_nothing() {
        let mut d = SseDecoder::new(1024);
        let mut out = Vec::new();
        for piece in [&b"data: a\r"[..], b"", b"\ndata: b\n\n"] {
            d.feed(piece, &mut out).unwrap();
        }
        assert_eq!(data(&out), ["a\nb"]);
    }

    #[test]
    fn event_without_data_is_not_dispatched_and_resets_the_name() {
        let out = decode_in_pieces(b"event: ping\n\ndata: x\n\n", 3);
        assert_eq!(
            out,
            [Event {
                event: String::new(),
                data: "x".into()
            }]
        );
    }

    #[test]
    fn final_event_without_blank_line() {
        assert_eq!(
            data(&decode_in_pieces(b"data: a\n\ndata: last\n", 4)),
            ["a", "last"]
        );
        // A partial last line (no line end at all) still counts at the end of the stream.
        assert_eq!(data(&decode_in_pieces(b"data: tail", 4)), ["tail"]);
    }

    #[test]
    fn limits() {
        let mut d = SseDecoder::new(8);
        let mut out = Vec::new();
        assert_eq!(
            d.feed(b"data: 0123456789", &mut out),
            Err(SseError::TooLarge)
        );
        // Each line fits; the event's joined data does not.
        let mut d = SseDecoder::new(12);
        d.feed(b"data: 123456\n", &mut out).unwrap();
        assert_eq!(d.feed(b"data: 123456\n", &mut out), Err(SseError::TooLarge));
        let mut d = SseDecoder::new(100);
        assert_eq!(d.feed(b"data: \xff\n", &mut out), Err(SseError::NotUtf8));
    }

    #[test]
    fn multibyte_text_split_inside_a_character() {
        let s = "data: 你好，世界\n\n".as_bytes();
        for piece in 1..s.len() {
            assert_eq!(data(&decode_in_pieces(s, piece)), ["你好，世界"]);
        }
    }
}
