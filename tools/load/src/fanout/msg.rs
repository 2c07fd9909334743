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

/// The `data` the publishers send: `{"ts": nanos since the run's start, "pad": "…"}`.
#[derive(Deserialize)]
pub struct Payload {
    #[serde(default)]
    pub ts: Option<u64>,
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

/// The JSON of one publish; `data` is padded to `size` bytes when the timestamp leaves room.
/// With `realistic` (the message's number), `data` is `{"ts":…,"m":…}` with `m` a realistic
/// JSON message of about `size` bytes (`ringgate::payload::json_message`: varied values, as
/// `--payload json` sends), instead of a run of `x` that compresses unrealistically well.
pub fn publish_json(out: &mut String, topic: &str, ts: u64, size: usize, realistic: Option<u64>) {
    out.clear();
    if let Some(n) = realistic {
        let m = ringgate::payload::json_message(n, size.saturating_sub(30).max(64));
        let _ = write!(
            out,
            r#"{{"action":"publish","topic":"{topic}","data":{{"ts":{ts},"m":{}}}}}"#,
            String::from_utf8_lossy(&m)
        );
        return;
    }
    let _ = write!(
        out,
        r#"{{"action":"publish","topic":"{topic}","data":{{"ts":{ts},"pad":""#
    );
    // `{"ts":` + digits + `,"pad":"` + pad + `"}`
    let digits = ts.checked_ilog10().unwrap_or(0) as usize + 1;
    let fixed = 6 + digits + 8 + 2;
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
