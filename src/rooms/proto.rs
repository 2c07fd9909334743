//! The `/ws` rooms protocol (docs/PROTOCOL.md): client requests parsed with simd-json into plain
//! values, and the server's messages encoded as JSON text. No I/O here.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use simd_json::prelude::*;
use simd_json::BorrowedValue;

pub use crate::error::Code;

/// A client error: the connection stays open and gets an `error` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientError {
    pub code: Code,
    pub text: String,
}

impl ClientError {
    pub fn new(code: Code, text: impl Into<String>) -> ClientError {
        ClientError {
            code,
            text: text.into(),
        }
    }
}

/// One parsed client request.
#[derive(Debug, Clone, PartialEq)]
pub enum Request<'a> {
    Subscribe {
        topic: &'a str,
        since: Option<u64>,
        epoch: Option<&'a str>,
    },
    Unsubscribe {
        topic: &'a str,
    },
    Publish {
        topic: &'a str,
        kind: &'a str,
        /// `data` re-encoded as compact JSON.
        data: String,
        /// `volatile` as given (absent: the topic's default).
        volatile: Option<bool>,
        /// The publisher's `trace` id, carried to every delivery.
        trace: Option<&'a str>,
    },
    Presence {
        topic: &'a str,
    },
    History {
        topic: &'a str,
        since: Option<u64>,
        limit: Option<u64>,
    },
    Ping,
}

/// Parses one client message in place (simd-json rewrites `buf`) and hands `f` its `id` (as
/// JSON text, to be echoed verbatim) and the request, or why it was refused. A callback, because
/// the request borrows from the parsed document.
pub fn parse<R>(
    buf: &mut [u8],
    f: impl FnOnce(Option<String>, Result<Request<'_>, ClientError>) -> R,
) -> R {
    let value = match simd_json::to_borrowed_value(buf) {
        Ok(v) => v,
        Err(_) => {
            return f(
                None,
                Err(ClientError::new(Code::BadJson, "message is not valid JSON")),
            )
        }
    };
    if !value.is_object() {
        return f(
            None,
            Err(ClientError::new(
                Code::BadJson,
                "message must be a JSON object",
            )),
        );
    }
    // Only a string or a number is an id (docs/PROTOCOL.md); anything else is not echoed.
    let id = value
        .get("id")
        .filter(|v| v.is_str() || v.is_number())
        .map(|v| v.encode());
    f(id, request(&value))
}

fn request<'v>(v: &'v BorrowedValue<'v>) -> Result<Request<'v>, ClientError> {
    let action = match v.get("action") {
        None => return Err(ClientError::new(Code::MissingField, "action is required")),
        Some(a) => a
            .as_str()
            .ok_or_else(|| ClientError::new(Code::MissingField, "action must be a string"))?,
    };
    let topic = || topic(v);
    Ok(match action {
        "subscribe" => Request::Subscribe {
            topic: topic()?,
            since: opt_u64(v, "since")?,
            epoch: opt_str(v, "epoch")?,
        },
        "unsubscribe" => Request::Unsubscribe { topic: topic()? },
        "publish" => {
            let topic = topic()?;
            let kind = opt_str(v, "type")?.unwrap_or("message");
            if kind.is_empty() {
                return Err(ClientError::new(
                    Code::MissingField,
                    "type must be a non-empty string",
                ));
            }
            let data = v
                .get("data")
                .ok_or_else(|| ClientError::new(Code::MissingField, "data is required"))?;
            let trace = opt_str(v, "trace")?;
            if trace.is_some_and(|t| t.is_empty() || t.len() > MAX_TRACE) {
                return Err(ClientError::new(
                    Code::MissingField,
                    format!("trace must be a string of 1 to {MAX_TRACE} bytes"),
                ));
            }
            Request::Publish {
                topic,
                kind,
                data: data.encode(),
                volatile: opt_bool(v, "volatile")?,
                trace,
            }
        }
        "presence" => Request::Presence { topic: topic()? },
        "history" => Request::History {
            topic: topic()?,
            since: opt_u64(v, "since")?,
            limit: opt_u64(v, "limit")?,
        },
        "ping" => Request::Ping,
        other => {
            return Err(ClientError::new(
                Code::UnknownAction,
                format!("unknown action {}", json_str(other)),
            ))
        }
    })
}

fn topic<'v>(v: &'v BorrowedValue<'v>) -> Result<&'v str, ClientError> {
    match v.get("topic") {
        None => Err(ClientError::new(Code::MissingField, "topic is required")),
        Some(t) => match t.as_str() {
            Some(s) if !s.is_empty() => Ok(s),
            _ => Err(ClientError::new(
                Code::MissingField,
                "topic must be a non-empty string",
            )),
        },
    }
}

fn opt_str<'v>(v: &'v BorrowedValue<'v>, key: &str) -> Result<Option<&'v str>, ClientError> {
    match v.get(key) {
        None => Ok(None),
        Some(x) if x.is_null() => Ok(None),
        Some(x) => x
            .as_str()
            .map(Some)
            .ok_or_else(|| ClientError::new(Code::MissingField, format!("{key} must be a string"))),
    }
}

fn opt_bool(v: &BorrowedValue<'_>, key: &str) -> Result<Option<bool>, ClientError> {
    match v.get(key) {
        None => Ok(None),
        Some(x) if x.is_null() => Ok(None),
        Some(x) => x.as_bool().map(Some).ok_or_else(|| {
            ClientError::new(Code::MissingField, format!("{key} must be a boolean"))
        }),
    }
}

/// Longest `trace` id a publisher may attach, in bytes.
pub const MAX_TRACE: usize = 128;

/// The value of the top-level field `field` of `data` (JSON text), as the key it conflates
/// by: a string's contents, any other value's JSON text; `None` when `data` is not an object
/// or lacks the field.
pub fn conflate_key(data: &str, field: &str) -> Option<Box<str>> {
    let v: serde_json::Value = serde_json::from_str(data).ok()?;
    key_in(&v, field)
}

/// [`conflate_key`] of a room message as delivered (its `data`'s `field`).
pub fn message_conflate_key(msg: &[u8], field: &str) -> Option<Box<str>> {
    let v: serde_json::Value = serde_json::from_slice(msg).ok()?;
    key_in(v.get("data")?, field)
}

fn key_in(data: &serde_json::Value, field: &str) -> Option<Box<str>> {
    match data.get(field)? {
        serde_json::Value::String(s) => Some(s.as_str().into()),
        other => Some(other.to_string().into()),
    }
}

fn opt_u64(v: &BorrowedValue<'_>, key: &str) -> Result<Option<u64>, ClientError> {
    match v.get(key) {
        None => Ok(None),
        Some(x) if x.is_null() => Ok(None),
        Some(x) => x.as_u64().map(Some).ok_or_else(|| {
            ClientError::new(
                Code::MissingField,
                format!("{key} must be a non-negative integer"),
            )
        }),
    }
}

/// Seconds since the Unix epoch with millisecond precision, as docs/PROTOCOL.md writes timestamps.
pub fn now() -> f64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    d.as_millis() as f64 / 1000.0
}

/// `s` as a JSON string literal.
pub fn json_str(s: &str) -> String {
    // Serialising a str cannot fail.
    serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into())
}

/// Builds one JSON object field by field, in order.
struct Obj(String);

impl Obj {
    fn new(kind: &str) -> Obj {
        let mut s = String::with_capacity(96);
        s.push_str("{\"type\":");
        s.push_str(&json_str(kind));
        Obj(s)
    }
    fn raw(mut self, key: &str, json: &str) -> Obj {
        let _ = write!(self.0, ",\"{key}\":{json}");
        self
    }
    fn str(self, key: &str, v: &str) -> Obj {
        let j = json_str(v);
        self.raw(key, &j)
    }
    fn num(self, key: &str, v: u64) -> Obj {
        self.raw(key, &v.to_string())
    }
    fn time(self, key: &str, t: f64) -> Obj {
        self.raw(key, &format!("{t:.3}"))
    }
    fn id(self, id: Option<&str>) -> Obj {
        match id {
            Some(id) => self.raw("id", id),
            None => self,
        }
    }
    fn done(mut self) -> String {
        self.0.push('}');
        self.0
    }
}

/// The `type`s of the server's own messages: a publish may not use them (a forged `join` or
/// `subscribed` would mislead clients), except `/api/publish` with `api_reserved_types`.
pub const RESERVED_TYPES: &[&str] = &[
    "connected",
    "subscribed",
    "unsubscribed",
    "ack",
    "join",
    "leave",
    "presence",
    "history",
    "pong",
    "error",
];

pub fn is_reserved_type(kind: &str) -> bool {
    RESERVED_TYPES.contains(&kind)
}

pub fn connected(connection_id: &str) -> String {
    Obj::new("connected")
        .str("connection_id", connection_id)
        .time("timestamp", now())
        .done()
}

pub fn subscribed(
    topic: &str,
    seq: u64,
    epoch: &str,
    recovered: Option<bool>,
    id: Option<&str>,
) -> String {
    let o = Obj::new("subscribed")
        .str("topic", topic)
        .num("seq", seq)
        .str("epoch", epoch);
    let o = match recovered {
        Some(r) => o.raw("recovered", if r { "true" } else { "false" }),
        None => o,
    };
    o.id(id).done()
}

pub fn unsubscribed(topic: &str, id: Option<&str>) -> String {
    Obj::new("unsubscribed").str("topic", topic).id(id).done()
}

/// A room message as delivered; `data` is JSON text, `timestamp` seconds since the Unix epoch.
/// A volatile message (no `seq`) says `"volatile":true` in its place.
pub fn room_message(
    kind: &str,
    topic: &str,
    seq: Option<u64>,
    data: &str,
    from: Option<&str>,
    timestamp: f64,
    trace: Option<&str>,
) -> String {
    let o = Obj::new(kind).str("topic", topic);
    let o = match seq {
        Some(seq) => o.num("seq", seq),
        None => o.raw("volatile", "true"),
    };
    let o = o.raw("data", data);
    let o = match from {
        Some(f) => o.str("from", f),
        None => o,
    };
    let o = match trace {
        Some(t) => o.str("trace", t),
        None => o,
    };
    o.time("timestamp", timestamp).done()
}

/// A message for one user (every connection of the user), from `/api/publish` with `user`.
pub fn user_message(
    kind: &str,
    user: &str,
    data: &str,
    timestamp: f64,
    trace: Option<&str>,
) -> String {
    let o = Obj::new(kind).str("user", user).raw("data", data);
    let o = match trace {
        Some(t) => o.str("trace", t),
        None => o,
    };
    o.time("timestamp", timestamp).done()
}

// ---- the binary envelope (docs/PROTOCOL.md "Binary rooms") -------------------------------

/// First byte of a binary message, both ways: a message that takes a seq, or a volatile one.
pub const BINARY_DURABLE: u8 = 0x01;
pub const BINARY_VOLATILE: u8 = 0x02;

/// A client's binary publish: `kind`, topic length, topic, payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryPublish<'a> {
    pub topic: &'a str,
    pub volatile: bool,
    pub payload: &'a [u8],
}

/// Parses a client's binary message (`[kind][topic length][topic][payload]`).
pub fn parse_binary(msg: &[u8]) -> Result<BinaryPublish<'_>, ClientError> {
    let bad = |text: &str| ClientError::new(Code::BadBinary, text);
    let (&kind, rest) = msg
        .split_first()
        .ok_or_else(|| bad("empty binary message"))?;
    let volatile = match kind {
        BINARY_DURABLE => false,
        BINARY_VOLATILE => true,
        _ => {
            return Err(bad(
                "binary message kind must be 1 (publish) or 2 (volatile)",
            ))
        }
    };
    let (&len, rest) = rest
        .split_first()
        .ok_or_else(|| bad("binary message without a topic length"))?;
    let len = usize::from(len);
    if len == 0 || rest.len() < len {
        return Err(bad(
            "binary message topic length is 0 or beyond the message",
        ));
    }
    let topic = std::str::from_utf8(&rest[..len]).map_err(|_| bad("topic is not UTF-8"))?;
    Ok(BinaryPublish {
        topic,
        volatile,
        payload: &rest[len..],
    })
}

/// A binary room message as delivered: `[kind][topic length][topic][seq: u64 BE, durable
/// only][payload]`. `topic` is at most 255 bytes (binary topics are published through the
/// envelope, whose length byte bounds them).
pub fn binary_message(topic: &str, seq: Option<u64>, payload: &[u8]) -> Vec<u8> {
    let mut v = binary_head(topic, seq.is_some(), 8 + payload.len());
    if let Some(seq) = seq {
        v.extend_from_slice(&seq.to_be_bytes());
    }
    v.extend_from_slice(payload);
    v
}

/// A binary room message up to its seq (durable) or payload (volatile), with room for `more`
/// bytes: for a seq assigned elsewhere (Redis), the message is this, the seq, the payload.
pub fn binary_head(topic: &str, durable: bool, more: usize) -> Vec<u8> {
    let topic = &topic.as_bytes()[..topic.len().min(255)];
    let mut v = Vec::with_capacity(2 + topic.len() + more);
    v.push(if durable {
        BINARY_DURABLE
    } else {
        BINARY_VOLATILE
    });
    v.push(topic.len() as u8);
    v.extend_from_slice(topic);
    v
}

/// The answer to a publish that got no `seq`: volatile, or held by conflation.
pub fn ack_unsequenced(id: &str, conflated: bool) -> String {
    let what = if conflated { "conflated" } else { "volatile" };
    Obj::new("ack").raw("id", id).raw(what, "true").done()
}

/// [`room_message`] cut where the seq goes, for a seq assigned elsewhere (Redis): the message
/// is `head`, the seq in decimal, `tail`.
pub fn room_message_around_seq(
    kind: &str,
    topic: &str,
    data: &str,
    from: Option<&str>,
    timestamp: f64,
    trace: Option<&str>,
) -> (String, String) {
    let mut head = Obj::new(kind).str("topic", topic).0;
    head.push_str(",\"seq\":");
    let tail = Obj(String::new()).raw("data", data);
    let tail = match from {
        Some(f) => tail.str("from", f),
        None => tail,
    };
    let tail = match trace {
        Some(t) => tail.str("trace", t),
        None => tail,
    };
    (head, tail.time("timestamp", timestamp).done())
}

pub fn ack(id: &str, seq: u64) -> String {
    Obj::new("ack").raw("id", id).num("seq", seq).done()
}

/// `join` or `leave`.
pub fn presence_event(kind: &str, topic: &str, client_id: &str, user: &str) -> String {
    Obj::new(kind)
        .str("topic", topic)
        .str("client_id", client_id)
        .str("user", user)
        .done()
}

/// One presence member as JSON.
pub fn member(client_id: &str, user: &str, joined_at: f64) -> String {
    format!(
        "{{\"client_id\":{},\"user\":{},\"joined_at\":{joined_at:.3}}}",
        json_str(client_id),
        json_str(user)
    )
}

/// `members` is a JSON array.
pub fn presence(topic: &str, members: &str, id: Option<&str>) -> String {
    Obj::new("presence")
        .str("topic", topic)
        .raw("members", members)
        .id(id)
        .done()
}

/// `messages` is a JSON array of room messages.
pub fn history(topic: &str, epoch: &str, messages: &str, id: Option<&str>) -> String {
    Obj::new("history")
        .str("topic", topic)
        .str("epoch", epoch)
        .raw("messages", messages)
        .id(id)
        .done()
}

pub fn pong(id: Option<&str>) -> String {
    Obj::new("pong").time("timestamp", now()).id(id).done()
}

pub fn error(e: &ClientError, id: Option<&str>) -> String {
    Obj::new("error")
        .str("error", &e.text)
        .str("code", e.code.as_str())
        .id(id)
        .done()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_cut_around_its_seq_is_the_same_message() {
        for (from, trace) in [(None, None), (Some("u\"1"), Some("t\n"))] {
            let (head, tail) =
                room_message_around_seq("m", "a\"b", "{\"x\":[1]}", from, 1.5, trace);
            assert_eq!(
                format!("{head}42{tail}"),
                room_message("m", "a\"b", Some(42), "{\"x\":[1]}", from, 1.5, trace)
            );
        }
    }

    fn parse_str(s: &str) -> (Option<String>, Result<String, (Code, String)>) {
        let mut buf = s.as_bytes().to_vec();
        parse(&mut buf, |id, r| {
            (
                id,
                r.map(|r| format!("{r:?}")).map_err(|e| (e.code, e.text)),
            )
        })
    }

    fn code(s: &str) -> Code {
        parse_str(s).1.expect_err(s).0
    }

    #[test]
    fn parses_every_action() {
        let (id, r) =
            parse_str(r#"{"action":"subscribe","topic":"stats","since":42,"epoch":"e1","id":1}"#);
        assert_eq!(id.as_deref(), Some("1"));
        assert_eq!(
            r.unwrap(),
            r#"Subscribe { topic: "stats", since: Some(42), epoch: Some("e1") }"#
        );
        let (id, r) = parse_str(
            r#"{"action":"publish","topic":"t","type":"stats_update","data":{"cpu": 45.2, "s":"a\"b"},"id":"x"}"#,
        );
        assert_eq!(id.as_deref(), Some(r#""x""#));
        let r = r.unwrap();
        assert!(r.contains(r#"kind: "stats_update""#), "{r}");
        assert!(
            r.contains(r#"data: "{\"cpu\":45.2,\"s\":\"a\\\"b\"}""#),
            "{r}"
        );
        assert!(parse_str(r#"{"action":"publish","topic":"t","data":1}"#)
            .1
            .unwrap()
            .contains(r#"kind: "message""#));
        assert!(parse_str(r#"{"action":"unsubscribe","topic":"t"}"#)
            .1
            .is_ok());
        assert!(parse_str(r#"{"action":"presence","topic":"t"}"#).1.is_ok());
        assert_eq!(
            parse_str(r#"{"action":"history","topic":"t","since":40,"limit":100}"#)
                .1
                .unwrap(),
            r#"History { topic: "t", since: Some(40), limit: Some(100) }"#
        );
        assert_eq!(parse_str(r#"{"action":"ping"}"#).1.unwrap(), "Ping");
    }

    #[test]
    fn every_malformed_input_gets_its_code() {
        assert_eq!(code("not json"), Code::BadJson);
        assert_eq!(code("[1,2]"), Code::BadJson);
        assert_eq!(code("\"x\""), Code::BadJson);
        assert_eq!(code(r#"{"topic":"t"}"#), Code::MissingField);
        assert_eq!(code(r#"{"action":5}"#), Code::MissingField);
        assert_eq!(code(r#"{"action":"dance"}"#), Code::UnknownAction);
        assert_eq!(code(r#"{"action":"subscribe"}"#), Code::MissingField);
        assert_eq!(
            code(r#"{"action":"subscribe","topic":""}"#),
            Code::MissingField
        );
        assert_eq!(
            code(r#"{"action":"subscribe","topic":7}"#),
            Code::MissingField
        );
        assert_eq!(
            code(r#"{"action":"subscribe","topic":"t","since":-1}"#),
            Code::MissingField
        );
        assert_eq!(
            code(r#"{"action":"subscribe","topic":"t","since":"3"}"#),
            Code::MissingField
        );
        assert_eq!(
            code(r#"{"action":"publish","topic":"t"}"#),
            Code::MissingField
        );
        assert_eq!(
            code(r#"{"action":"publish","topic":"t","type":3,"data":1}"#),
            Code::MissingField
        );
        assert_eq!(
            code(r#"{"action":"publish","topic":"t","data":1,"volatile":"yes"}"#),
            Code::MissingField
        );
        assert_eq!(
            code(r#"{"action":"publish","topic":"t","data":1,"trace":""}"#),
            Code::MissingField
        );
        let long = format!(
            r#"{{"action":"publish","topic":"t","data":1,"trace":"{}"}}"#,
            "x".repeat(MAX_TRACE + 1)
        );
        assert_eq!(code(&long), Code::MissingField);
    }

    #[test]
    fn volatile_and_trace_as_written() {
        let r = parse_str(
            r#"{"action": "publish", "topic": "chat.1", "data": {"typing": true}, "volatile": true}"#,
        )
        .1
        .unwrap();
        assert!(
            r.contains("volatile: Some(true)") && r.contains("trace: None"),
            "{r}"
        );
        let r = parse_str(r#"{"action":"publish","topic":"t","data":1,"trace":"abc"}"#)
            .1
            .unwrap();
        assert!(
            r.contains("volatile: None") && r.contains(r#"trace: Some("abc")"#),
            "{r}"
        );
    }

    #[test]
    fn binary_envelope_round_trip_and_every_malformed_one() {
        let mut m = vec![BINARY_DURABLE, 5];
        m.extend_from_slice(b"doc.1\x00\xff\x80");
        let p = parse_binary(&m).expect("valid");
        assert_eq!(
            (p.topic, p.volatile, p.payload),
            ("doc.1", false, &b"\x00\xff\x80"[..])
        );
        let p = parse_binary(&[BINARY_VOLATILE, 1, b't']).expect("valid, empty payload");
        assert!(p.volatile && p.payload.is_empty());
        for bad in [
            &[][..],
            &[3, 1, b't'][..],
            &[1][..],
            &[1, 0, b't'][..],
            &[1, 4, b't'][..],
            &[1, 1, 0xff][..],
        ] {
            assert_eq!(
                parse_binary(bad).map_err(|e| e.code),
                Err(Code::BadBinary),
                "{bad:?}"
            );
        }
        let out = binary_message("doc.1", Some(258), b"\x00\x01");
        assert_eq!(
            out,
            b"\x01\x05doc.1\x00\x00\x00\x00\x00\x00\x01\x02\x00\x01"
        );
        assert_eq!(binary_message("t", None, b"x"), b"\x02\x01tx");
    }

    #[test]
    fn conflate_keys() {
        assert_eq!(
            conflate_key(r#"{"pair":"eur","p":1}"#, "pair").as_deref(),
            Some("eur")
        );
        assert_eq!(conflate_key(r#"{"id":7}"#, "id").as_deref(), Some("7"));
        assert_eq!(conflate_key(r#"{"id":7}"#, "pair"), None);
        assert_eq!(conflate_key("[1]", "pair"), None);
        assert_eq!(conflate_key("not json", "pair"), None);
        let msg = room_message("m", "fx", Some(3), r#"{"pair":"eur"}"#, None, 1.0, None);
        assert_eq!(
            message_conflate_key(msg.as_bytes(), "pair").as_deref(),
            Some("eur")
        );
        assert_eq!(message_conflate_key(b"\x01\x01t", "pair"), None);
    }

    #[test]
    fn id_is_echoed_even_when_the_request_is_refused() {
        let (id, r) = parse_str(r#"{"action":"nope","id":"abc"}"#);
        assert_eq!(id.as_deref(), Some(r#""abc""#));
        assert!(r.is_err());
        // Objects are not ids.
        assert_eq!(parse_str(r#"{"action":"ping","id":{"a":1}}"#).0, None);
    }

    #[test]
    fn server_messages_are_valid_json() {
        let msgs = [
            connected("c1"),
            subscribed("t\"x", 5, "e1", Some(true), Some("1")),
            subscribed("t", 5, "e1", None, None),
            room_message(
                "stats_update",
                "t",
                Some(58),
                r#"{"cpu":45.2}"#,
                Some("user-7"),
                now(),
                Some("req-\"1"),
            ),
            room_message("typing", "t", None, "true", None, now(), None),
            ack_unsequenced("1", true),
            user_message("notice", "u\"1", "{}", now(), Some("t")),
            ack("\"a\"", 3),
            presence_event("join", "t", "c1", "u"),
            presence("t", &format!("[{}]", member("c1", "u", 1.5)), None),
            history("t", "e1", "[]", Some("2")),
            pong(None),
            error(&ClientError::new(Code::BadJson, "bad \"thing\""), Some("3")),
        ];
        for m in msgs {
            let v: serde_json::Value = serde_json::from_str(&m).expect(&m);
            assert!(v["type"].is_string(), "{m}");
        }
        let v: serde_json::Value = serde_json::from_str(&room_message(
            "m",
            "t",
            Some(58),
            r#"{"cpu":45.2}"#,
            None,
            now(),
            None,
        ))
        .unwrap();
        assert_eq!(v["seq"], 58);
        assert_eq!(v["data"]["cpu"], 45.2);
        assert!(v.get("from").is_none() && v.get("volatile").is_none());
        let v: serde_json::Value =
            serde_json::from_str(&room_message("m", "t", None, "1", None, now(), Some("x")))
                .unwrap();
        assert_eq!((&v["volatile"], &v["trace"]), (&true.into(), &"x".into()));
        assert!(v.get("seq").is_none());
        assert!(v["timestamp"].as_f64().unwrap() > 1.7e9);
    }
}
