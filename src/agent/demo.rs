//! The built-in demo agent: answers `/ws/agent` requests while no upstream is configured
//! (`[agent] demo`, on by default), so a fresh start works end to end. It runs as the same
//! per-request task a real upstream request does, so `cancel`, `max_in_flight` and the
//! connection going away behave exactly as with an upstream.

use std::time::Duration;

use super::protocol::{self, Code, Id};
use super::ClientConn;

/// The `vendor` of demo answers.
pub const VENDOR: &str = "ringgate-demo";

/// Pause between streamed words: slow enough to watch (and to cancel), fast enough for tests.
const WORD_PAUSE: Duration = Duration::from_millis(40);

/// The `connected` message while the demo agent answers.
pub fn connected(connection_id: &str) -> String {
    let id = serde_json::to_string(connection_id).unwrap_or_else(|_| "\"\"".into());
    format!(
        "{{\"type\":\"connected\",\"connection_id\":{id},\"message\":\"Connected to Agent WebSocket (demo agent: no upstream is configured)\",\"demo\":true}}"
    )
}

/// The canned answer to `query`.
fn answer(query: &str) -> String {
    let q: String = query.split_whitespace().collect::<Vec<_>>().join(" ");
    let q = truncate(&q, 200);
    format!(
        "This is the ringgate demo agent. No agent upstream is configured, so this answer \
         is canned: you asked \"{q}\". Set [agent] upstreams (or AGENT_UPSTREAM) to reach a \
         real agent; the calculator tool works here too."
    )
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// `agent_query`: the whole answer at once.
pub(super) fn query(conn: &ClientConn, id: Option<&Id>, query: &str) {
    conn.send(protocol::agent_response(
        &answer(query),
        Some(VENDOR),
        id,
        protocol::now(),
    ));
}

/// `streaming_query`: the answer word by word (each chunk keeps its trailing space, so the
/// chunks concatenate to the answer).
pub(super) async fn stream(conn: &ClientConn, id: Option<&Id>, query: &str) {
    if !conn.send(protocol::stream_start(id, protocol::now())) {
        return;
    }
    let text = answer(query);
    for word in text.split_inclusive(' ') {
        tokio::time::sleep(WORD_PAUSE).await;
        conn.drained().await;
        if !conn.send(protocol::stream_chunk(word, id, protocol::now())) {
            return;
        }
    }
    conn.send(protocol::stream_end(id, protocol::now()));
}

/// `tool_call`: only `calculator` with `{"expression": "…"}`.
pub(super) fn tool(conn: &ClientConn, id: Option<&Id>, tool_name: &str, params: &str) {
    let now = protocol::now();
    let reply = match tool_name {
        "calculator" => match calculator(params) {
            Ok(v) => protocol::tool_result(tool_name, &v, id, now),
            Err(e) => protocol::error(
                Code::UpstreamError,
                &format!("calculator: {e}"),
                id,
                None,
                now,
            ),
        },
        _ => protocol::error(
            Code::UpstreamError,
            &format!("the demo agent has no tool {tool_name:?} (it has: calculator)"),
            id,
            None,
            now,
        ),
    };
    conn.send(reply);
}

/// `params` (a JSON object) → the result as JSON text.
fn calculator(params: &str) -> Result<String, String> {
    let v: serde_json::Value =
        serde_json::from_str(params).map_err(|_| "params are not JSON".to_string())?;
    let Some(expr) = v.get("expression").and_then(|e| e.as_str()) else {
        return Err("params need a string \"expression\"".into());
    };
    let x = calc::eval(expr)?;
    Ok(calc::to_json(x))
}

/// Arithmetic on numbers: `+ - * / %`, `^` (power, right-associative), unary minus and
/// parentheses. A small recursive-descent parser with bounded input, not an evaluator of
/// anything else.
pub mod calc {
    const MAX_LEN: usize = 256;
    const MAX_DEPTH: usize = 32;

    pub fn eval(src: &str) -> Result<f64, String> {
        if src.len() > MAX_LEN {
            return Err(format!("the expression is longer than {MAX_LEN} bytes"));
        }
        let mut p = Parser {
            s: src.as_bytes(),
            i: 0,
            depth: 0,
        };
        p.skip_ws();
        if p.i == p.s.len() {
            return Err("the expression is empty".into());
        }
        let v = p.expr()?;
        p.skip_ws();
        if p.i != p.s.len() {
            return Err(format!("unexpected {:?} at {}", p.s[p.i] as char, p.i));
        }
        if !v.is_finite() {
            return Err("the result is not a finite number".into());
        }
        Ok(v)
    }

    /// Whole numbers within the exactly representable range print as integers.
    pub fn to_json(x: f64) -> String {
        if x.fract() == 0.0 && x.abs() < 9_007_199_254_740_992.0 {
            format!("{}", x as i64)
        } else {
            serde_json::Number::from_f64(x).map_or_else(|| "null".into(), |n| n.to_string())
        }
    }

    struct Parser<'a> {
        s: &'a [u8],
        i: usize,
        depth: usize,
    }

    impl Parser<'_> {
        fn skip_ws(&mut self) {
            while self.i < self.s.len() && self.s[self.i].is_ascii_whitespace() {
                self.i += 1;
            }
        }

        fn peek(&mut self) -> Option<u8> {
            self.skip_ws();
            self.s.get(self.i).copied()
        }

        fn expr(&mut self) -> Result<f64, String> {
            let mut v = self.term()?;
            while let Some(op @ (b'+' | b'-')) = self.peek() {
                self.i += 1;
                let r = self.term()?;
                v = if op == b'+' { v + r } else { v - r };
            }
            Ok(v)
        }

        fn term(&mut self) -> Result<f64, String> {
            let mut v = self.power()?;
            while let Some(op @ (b'*' | b'/' | b'%')) = self.peek() {
                self.i += 1;
                let r = self.power()?;
                if op != b'*' && r == 0.0 {
                    return Err("division by zero".into());
                }
                v = match op {
                    b'*' => v * r,
                    b'/' => v / r,
                    _ => v % r,
                };
            }
            Ok(v)
        }

        fn power(&mut self) -> Result<f64, String> {
            let base = self.unary()?;
            if self.peek() == Some(b'^') {
                self.i += 1;
                let exp = self.nested(Self::power)?;
                return Ok(base.powf(exp));
            }
            Ok(base)
        }

        fn unary(&mut self) -> Result<f64, String> {
            match self.peek() {
                Some(b'-') => {
                    self.i += 1;
                    Ok(-self.nested(Self::unary)?)
                }
                Some(b'+') => {
                    self.i += 1;
                    self.nested(Self::unary)
                }
                _ => self.atom(),
            }
        }

        fn nested(&mut self, f: fn(&mut Self) -> Result<f64, String>) -> Result<f64, String> {
            self.depth += 1;
            if self.depth > MAX_DEPTH {
                return Err(format!("nested deeper than {MAX_DEPTH}"));
            }
            let v = f(self);
            self.depth -= 1;
            v
        }

        fn atom(&mut self) -> Result<f64, String> {
            match self.peek() {
                Some(b'(') => {
                    self.i += 1;
                    let v = self.nested(Self::expr)?;
                    if self.peek() != Some(b')') {
                        return Err(format!("missing ')' at {}", self.i));
                    }
                    self.i += 1;
                    Ok(v)
                }
                Some(c) if c.is_ascii_digit() || c == b'.' => self.number(),
                Some(c) => Err(format!("unexpected {:?} at {}", c as char, self.i)),
                None => Err("the expression ends too early".into()),
            }
        }

        fn number(&mut self) -> Result<f64, String> {
            let start = self.i;
            while self.i < self.s.len()
                && (self.s[self.i].is_ascii_digit() || self.s[self.i] == b'.')
            {
                self.i += 1;
            }
            // Only digits and dots were taken: valid UTF-8.
            let text = std::str::from_utf8(&self.s[start..self.i]).unwrap_or("");
            text.parse::<f64>()
                .map_err(|_| format!("{text:?} is not a number"))
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn arithmetic() {
            for (src, want) in [
                ("123 + 456", 579.0),
                ("2 + 3 * 4", 14.0),
                ("(2 + 3) * 4", 20.0),
                ("2 ^ 3 ^ 2", 512.0),
                ("-2 ^ 2", 4.0),
                ("10 / 4", 2.5),
                ("10 % 4", 2.0),
                ("--3", 3.0),
                (" 1.5*2 ", 3.0),
                ("8 - 2 - 1", 5.0),
            ] {
                assert_eq!(eval(src), Ok(want), "{src}");
            }
            assert_eq!(to_json(579.0), "579");
            assert_eq!(to_json(2.5), "2.5");
        }

        #[test]
        fn refusals() {
            for bad in [
                "", "   ", "1 +", "(1", "1)", "1 / 0", "5 % 0", "1..2", "abs(1)", "1; drop",
                "9 ^ 999", "é",
            ] {
                assert!(eval(bad).is_err(), "{bad}");
            }
            assert!(eval(&"(".repeat(40)).unwrap_err().contains("nested"));
            assert!(eval(&"-".repeat(40)).unwrap_err().contains("nested"));
            assert!(eval(&"1+".repeat(200)).unwrap_err().contains("longer"));
        }
    }
}
