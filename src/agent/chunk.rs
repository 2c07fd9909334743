//! What text a stream chunk carries: JSON with `content` gives that; an OpenAI-style chunk gives
//! `choices[0].delta.content` (or `choices[0].message.content` / `choices[0].text` for whole
//! answers); any other text is the content itself. Also the text of raw (unframed) bodies,
//! which may split a UTF-8 character across reads.

use std::borrow::Cow;

use serde::Deserialize;

#[derive(Deserialize)]
struct Chunk<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    choices: Option<Vec<Choice<'a>>>,
    #[serde(borrow, default)]
    vendor: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Choice<'a> {
    #[serde(borrow, default)]
    delta: Option<Inner<'a>>,
    #[serde(borrow, default)]
    message: Option<Inner<'a>>,
    #[serde(borrow, default)]
    text: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct Inner<'a> {
    #[serde(borrow, default)]
    content: Option<Cow<'a, str>>,
}

/// What one chunk gives the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Content<'a> {
    Text(Cow<'a, str>),
    /// A chunk without text (an OpenAI role or finish chunk, empty content): nothing to send.
    Nothing,
}

/// The content of one chunk (an SSE event's data or an NDJSON line).
pub fn content(data: &str) -> Content<'_> {
    let t = data.trim_start();
    if t.starts_with('{') {
        if let Ok(c) = serde_json::from_str::<Chunk>(data) {
            if let Some(s) = c.content {
                return text(s);
            }
            if let Some(first) = c.choices.as_ref().and_then(|v| v.first()) {
                let s = first
                    .delta
                    .as_ref()
                    .and_then(|d| d.content.clone())
                    .or_else(|| first.message.as_ref().and_then(|m| m.content.clone()))
                    .or_else(|| first.text.clone());
                return match s {
                    Some(s) => text(s),
                    None => Content::Nothing,
                };
            }
        }
    } else if t.starts_with('"') {
        if let Ok(s) = serde_json::from_str::<Cow<str>>(data) {
            return text(s);
        }
    }
    if data.is_empty() {
        Content::Nothing
    } else {
        Content::Text(Cow::Borrowed(data))
    }
}

fn text(s: Cow<'_, str>) -> Content<'_> {
    if s.is_empty() {
        Content::Nothing
    } else {
        Content::Text(s)
    }
}

/// A whole (non-streamed) answer: its content and vendor.
pub fn answer(body: &str) -> (String, Option<String>) {
    let vendor = serde_json::from_str::<Chunk>(body)
        .ok()
        .and_then(|c| c.vendor.map(Cow::into_owned));
    let content = match content(body) {
        Content::Text(t) => t.into_owned(),
        Content::Nothing => String::new(),
    };
    (content, vendor)
}

/// Turns a raw body's bytes into text, carrying an incomplete UTF-8 character over to the next
/// read. Invalid bytes become U+FFFD.
#[derive(Debug, Default)]
pub struct Utf8Carry {
    carry: Vec<u8>,
}

impl Utf8Carry {
    pub fn feed(&mut self, bytes: &[u8]) -> String {
        let mut buf = std::mem::take(&mut self.carry);
        buf.extend_from_slice(bytes);
        // How many bytes at the end may start an incomplete character.
        let keep = match std::str::from_utf8(&buf) {
            Ok(_) => 0,
            Err(e) if e.error_len().is_none() => buf.len() - e.valid_up_to(),
            Err(_) => {
                // Invalid in the middle: check only the tail for an incomplete character.
                let tail_start = buf.len().saturating_sub(3);
                (tail_start..buf.len())
                    .find(|&i| {
                        std::str::from_utf8(&buf[i..])
                            .is_err_and(|e| e.error_len().is_none() && e.valid_up_to() == 0)
                    })
                    .map_or(0, |i| buf.len() - i)
            }
        };
        self.carry = buf.split_off(buf.len() - keep);
        String::from_utf8_lossy(&buf).into_owned()
    }

    pub fn finish(&mut self) -> String {
        String::from_utf8_lossy(&std::mem::take(&mut self.carry)).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> Content<'_> {
        Content::Text(Cow::Borrowed(s))
    }

    #[test]
    fn content_rules() {
        assert_eq!(
            content(r#"{"content":"def quick_sort("}"#),
            t("def quick_sort(")
        );
        assert_eq!(content(r#"{"content":"a\nb"}"#), t("a\nb"));
        assert_eq!(
            content(
                r#"{"id":"x","object":"chat.completion.chunk","choices":[{"index":0,"delta":{"content":"Hel"},"finish_reason":null}]}"#
            ),
            t("Hel")
        );
        assert_eq!(
            content(r#"{"choices":[{"delta":{"role":"assistant"}}]}"#),
            Content::Nothing
        );
        assert_eq!(
            content(r#"{"choices":[{"delta":{},"finish_reason":"stop"}]}"#),
            Content::Nothing
        );
        assert_eq!(
            content(r#"{"choices":[{"message":{"content":"whole"}}]}"#),
            t("whole")
        );
        assert_eq!(content(r#"{"content":""}"#), Content::Nothing);
        assert_eq!(content("plain words"), t("plain words"));
        assert_eq!(content(r#""quoted""#), t("quoted"));
        // JSON without a known field, or broken JSON, is text as it is.
        assert_eq!(content(r#"{"other":1}"#), t(r#"{"other":1}"#));
        assert_eq!(content(r#"{"content":5}"#), t(r#"{"content":5}"#));
        assert_eq!(content("{broken"), t("{broken"));
        assert_eq!(content(""), Content::Nothing);
    }

    #[test]
    fn whole_answers() {
        assert_eq!(
            answer(r#"{"content":"hi","vendor":"openai"}"#),
            ("hi".to_string(), Some("openai".to_string()))
        );
        assert_eq!(answer("just text"), ("just text".to_string(), None));
    }

    #[test]
    fn utf8_carried_across_reads() {
        let s = "añ你🎉z".as_bytes();
        for split in 0..=s.len() {
            let mut c = Utf8Carry::default();
            let mut out = c.feed(&s[..split]);
            out += &c.feed(&s[split..]);
            out += &c.finish();
            assert_eq!(out, "añ你🎉z", "split at {split}");
        }
        let mut c = Utf8Carry::default();
        assert_eq!(c.feed(b"a\xffb\xe4\xbd"), "a\u{fffd}b");
        assert_eq!(c.feed(b"\xa0"), "你");
    }
}
