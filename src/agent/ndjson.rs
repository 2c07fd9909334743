//! A newline-delimited JSON (`application/x-ndjson`, JSON Lines) splitter fed bytes split
//! anywhere: one item per line, `\r\n` or `\n`, blank lines skipped, a last line without a
//! newline still counts. Lines are not parsed here (see `chunk`). Memory is bounded by `max`.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NdjsonError {
    TooLarge,
    NotUtf8,
}

#[derive(Debug)]
pub struct NdjsonDecoder {
    line: Vec<u8>,
    max: usize,
}

impl NdjsonDecoder {
    pub fn new(max: usize) -> NdjsonDecoder {
        NdjsonDecoder {
            line: Vec::new(),
            max,
        }
    }

    pub fn feed(&mut self, mut bytes: &[u8], out: &mut Vec<String>) -> Result<(), NdjsonError> {
        while let Some(i) = bytes.iter().position(|&b| b == b'\n') {
            self.push(&bytes[..i])?;
            self.emit(out)?;
            bytes = &bytes[i + 1..];
        }
        self.push(bytes)
    }

    pub fn finish(&mut self, out: &mut Vec<String>) -> Result<(), NdjsonError> {
        self.emit(out)
    }

    fn push(&mut self, part: &[u8]) -> Result<(), NdjsonError> {
        if self.line.len() + part.len() > self.max {
            return Err(NdjsonError::TooLarge);
        }
        self.line.extend_from_slice(part);
        Ok(())
    }

    fn emit(&mut self, out: &mut Vec<String>) -> Result<(), NdjsonError> {
        let mut line = &self.line[..];
        if let [rest @ .., b'\r'] = line {
            line = rest;
        }
        if !line.iter().all(u8::is_ascii_whitespace) {
            let s = std::str::from_utf8(line).map_err(|_| NdjsonError::NotUtf8)?;
            out.push(s.to_string());
        }
        self.line.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INPUT: &[u8] =
        b"{\"content\":\"a\"}\n\r\n\n{\"content\":\"b\\n\"}\r\n  \n{\"content\":\"\xc3\xa9\"}";

    #[test]
    fn every_split_gives_the_same_lines() {
        for piece in 1..=INPUT.len() {
            let mut d = NdjsonDecoder::new(1024);
            let mut out = Vec::new();
            for c in INPUT.chunks(piece) {
                d.feed(c, &mut out).unwrap();
            }
            d.finish(&mut out).unwrap();
            assert_eq!(
                out,
                [
                    "{\"content\":\"a\"}",
                    "{\"content\":\"b\\n\"}",
                    "{\"content\":\"é\"}"
                ],
                "pieces of {piece}"
            );
        }
    }

    #[test]
    fn limits() {
        let mut d = NdjsonDecoder::new(4);
        let mut out = Vec::new();
        assert_eq!(d.feed(b"12345", &mut out), Err(NdjsonError::TooLarge));
        let mut d = NdjsonDecoder::new(40);
        assert_eq!(d.feed(b"\xff\n", &mut out), Err(NdjsonError::NotUtf8));
    }
}
