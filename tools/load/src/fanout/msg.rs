//! The rooms protocol as the fan-out load speaks it: the JSON it sends and reads.

use std::borrow::Cow;
use std::fmt::Write as _;

use anyhow::Result;
use ringgate::ws::frame::{write_masked_frame, OpCode};
use serde::Deserialize;

/// A server message as far as the fan-out check needs it.
#[derive(Deserialize)]
pub struct Incoming<'a> {
    #[serde(rename = "type", borrow)]
    pub ty: Cow<'a, str>,
    #[serde(default, borrow)]
    pub topic: Option<Cow<'a, str>>,
    #[serde(default)]
    pub seq: Option<u64>,
    #[serde(default)]
    pub data: Option<Payload>,
    #[serde(default, borrow)]
    pub error: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub code: Option<Cow<'a, str>>,
}

/// The `data` the publishers send: `{"ts": nanos since the run's start, "n": the message's
/// number in the run, "pad": "…"}`.
#[derive(Deserialize)]
pub struct Payload {
    #[serde(default)]
    pub ts: Option<u64>,
    #[serde(default)]
    pub n: Option<u64>,
}

pub fn parse_incoming(body: &[u8]) -> Result<Incoming<'_>> {
    serde_json::from_slice(body).map_err(|e| {
        let shown = String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned();
        anyhow::anyhow!("server sent a message that is not the expected JSON ({e}): {shown:?}")
    })
}

/// Builds the masked text frame of one JSON message.
pub fn text_frame(out: &mut Vec<u8>, mask: [u8; 4], json: &str) {
    write_masked_frame(out, true, OpCode::Text, mask, json.as_bytes());
}

/// The JSON of message `n` of the run; `data` is padded to `size` bytes when the timestamp and
/// the number leave room. With `realistic`, `data` is `{"ts":…,"n":…,"m":…}` with `m` a
/// realistic JSON message of about `size` bytes (`ringgate::payload::json_message`: varied
/// values, as `--payload json` sends), instead of a run of `x` that compresses unrealistically
/// well.
pub fn publish_json(out: &mut String, topic: &str, ts: u64, n: u64, size: usize, realistic: bool) {
    out.clear();
    if realistic {
        let m = ringgate::payload::json_message(n, size.saturating_sub(30).max(64));
        let _ = write!(
            out,
            r#"{{"action":"publish","topic":"{topic}","data":{{"ts":{ts},"n":{n},"m":{}}}}}"#,
            String::from_utf8_lossy(&m)
        );
        return;
    }
    let _ = write!(
        out,
        r#"{{"action":"publish","topic":"{topic}","data":{{"ts":{ts},"n":{n},"pad":""#
    );
    // `{"ts":` + digits + `,"n":` + digits + `,"pad":"` + pad + `"}`
    let digits = |v: u64| v.checked_ilog10().unwrap_or(0) as usize + 1;
    let fixed = 6 + digits(ts) + 5 + digits(n) + 8 + 2;
    for _ in 0..size.saturating_sub(fixed) {
        out.push('x');
    }
    out.push_str("\"}}");
}

/// A close frame's code and reason, for error messages.
pub fn close_text(body: &[u8]) -> String {
    match body {
        [a, b, reason @ ..] => format!(
            "code {} {:?}",
            u16::from_be_bytes([*a, *b]),
            String::from_utf8_lossy(reason)
        ),
        _ => "no code".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_data_is_size_bytes_and_carries_ts_and_n() {
        let mut out = String::new();
        // (ts, n, size, the data's length): too small a size leaves the data unpadded.
        for (ts, n, size, len) in [
            (1, 0, 64, 64),
            (123_456_789, 98_765, 200, 200),
            (7, 3, 10, 23),
        ] {
            publish_json(&mut out, "t", ts, n, size, false);
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            let data = v["data"].to_string();
            assert_eq!(data.len(), len, "{data}");
            let p: Payload = serde_json::from_str(&data).unwrap();
            assert_eq!((p.ts, p.n), (Some(ts), Some(n)));
        }
    }
}
