//! `/ws/agent` messages (docs/PROTOCOL.md): client requests parsed into [`Request`], replies encoded
//! with `type` first and the client's `id` echoed byte for byte. No I/O.

use std::fmt::Write as _;

use serde_json::Value;

/// A client's `id`: a string or a number, kept as the JSON text it came as, so the reply carries
/// exactly the same value back.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Id(Box<str>);

impl Id {
    /// The id as JSON text (`"q1"` or `7`).
    pub fn json(&self) -> &str {
        &self.0
    }
}

pub use crate::error::Code;

/// A request from the client.
#[derive(Debug, Clone, PartialEq)]
pub enum Request {
    Ping {
        id: Option<Id>,
    },
    AgentQuery(Query),
    StreamingQuery(Query),
    ToolCall {
        id: Option<Id>,
        tool_name: String,
        /// The `params` object as JSON text (`{}` when absent).
        params: String,
    },
    /// Without `id`: every request in flight on the connection.
    Cancel {
        id: Option<Id>,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    pub id: Option<Id>,
    pub query: String,
    pub session_id: Option<String>,
}

/// A message that cannot be served: answered with an `error` reply.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejected {
    pub code: Code,
    pub error: String,
    pub id: Option<Id>,
}

impl Rejected {
    pub fn encode(&self, now: f64) -> String {
        error(self.code, &self.error, self.id.as_ref(), None, now)
    }
}

fn reject(code: Code, error: impl Into<String>, id: &Option<Id>) -> Rejected {
    Rejected {
        code,
        error: error.into(),
        id: id.clone(),
    }
}

/// Parses one text message.
pub fn parse(text: &[u8]) -> Result<Request, Rejected> {
    let v: Value = serde_json::from_slice(text).map_err(|e| Rejected {
        code: Code::BadJson,
        error: format!("invalid JSON: {e}"),
        id: None,
    })?;
    // serde_json reads such integers as floats: refused, as on `/ws`, rather than rounded.
    if crate::json::has_wide_integer(text) {
        return Err(reject(Code::BadJson, crate::json::WIDE_INTEGER, &None));
    }
    let Value::Object(mut m) = v else {
        return Err(reject(
            Code::BadJson,
            "a message must be a JSON object",
            &None,
        ));
    };
    let id = match m.get("id") {
        None | Some(Value::Null) => None,
        Some(v @ (Value::String(_) | Value::Number(_))) => Some(Id(v.to_string().into())),
        Some(_) => {
            return Err(reject(
                Code::BadJson,
                "id must be a string or a number",
                &None,
            ))
        }
    };
    let ty = match m.remove("type") {
        Some(Value::String(t)) => t,
        Some(_) => return Err(reject(Code::BadJson, "type must be a string", &id)),
        None => return Err(reject(Code::MissingField, "type is required", &id)),
    };
    match ty.as_str() {
        "ping" => Ok(Request::Ping { id }),
        "cancel" => Ok(Request::Cancel { id }),
        "agent_query" | "streaming_query" => {
            let query = match m.get_mut("query") {
                Some(Value::String(q)) if !q.trim().is_empty() => std::mem::take(q),
                Some(Value::String(_)) | None | Some(Value::Null) => {
                    return Err(reject(Code::MissingField, "Query is required", &id))
                }
                Some(_) => return Err(reject(Code::BadJson, "query must be a string", &id)),
            };
            let session_id = match m.get_mut("session_id") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) => Some(std::mem::take(s)),
                Some(_) => return Err(reject(Code::BadJson, "session_id must be a string", &id)),
            };
            let q = Query {
                id,
                query,
                session_id,
            };
            Ok(if ty == "agent_query" {
                Request::AgentQuery(q)
            } else {
                Request::StreamingQuery(q)
            })
        }
        "tool_call" => {
            let tool_name = match m.get_mut("tool_name") {
                Some(Value::String(t)) if !t.is_empty() => std::mem::take(t),
                Some(Value::String(_)) | None | Some(Value::Null) => {
                    return Err(reject(Code::MissingField, "tool_name is required", &id))
                }
                Some(_) => return Err(reject(Code::BadJson, "tool_name must be a string", &id)),
            };
            if !tool_name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
                || tool_name.starts_with('.')
            {
                return Err(reject(
                    Code::BadJson,
                    "tool_name may hold only letters, digits, '_', '-' and '.'",
                    &id,
                ));
            }
            let params = match m.get("params") {
                None | Some(Value::Null) => "{}".to_string(),
                Some(p @ Value::Object(_)) => p.to_string(),
                Some(_) => return Err(reject(Code::BadJson, "params must be an object", &id)),
            };
            Ok(Request::ToolCall {
                id,
                tool_name,
                params,
            })
        }
        other => Err(reject(
            Code::UnknownAction,
            format!("unknown type {other:?}"),
            &id,
        )),
    }
}

// ---- replies -------------------------------------------------------------------------------

/// Seconds since the Unix epoch with millisecond precision.
pub fn now() -> f64 {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_millis() as f64) / 1000.0
}

/// Builds `{"type":"…", …, "id":…, "timestamp":…}`.
struct Reply(String);

impl Reply {
    fn new(ty: &str) -> Reply {
        let mut s = String::with_capacity(96);
        s.push_str("{\"type\":\"");
        s.push_str(ty);
        s.push('"');
        Reply(s)
    }
    fn str(mut self, key: &str, v: &str) -> Reply {
        let _ = write!(self.0, ",\"{key}\":");
        push_json_str(&mut self.0, v);
        self
    }
    fn raw(mut self, key: &str, json: &str) -> Reply {
        let _ = write!(self.0, ",\"{key}\":{json}");
        self
    }
    fn id(self, id: Option<&Id>) -> Reply {
        match id {
            Some(id) => self.raw("id", id.json()),
            None => self,
        }
    }
    fn end(mut self, now: f64) -> String {
        let _ = write!(self.0, ",\"timestamp\":{now:.3}}}");
        self.0
    }
}

fn push_json_str(out: &mut String, s: &str) {
    // serde_json's escaping; writing to a String cannot fail.
    if let Ok(q) = serde_json::to_string(s) {
        out.push_str(&q);
    }
}

pub fn connected(connection_id: &str) -> String {
    let mut s = String::from("{\"type\":\"connected\",\"connection_id\":");
    push_json_str(&mut s, connection_id);
    s.push_str(",\"message\":\"Connected to Agent WebSocket\"}");
    s
}

pub fn pong(id: Option<&Id>, now: f64) -> String {
    Reply::new("pong").id(id).end(now)
}

pub fn processing(id: Option<&Id>, now: f64) -> String {
    Reply::new("status")
        .str("status", "processing")
        .id(id)
        .end(now)
}

pub fn agent_response(content: &str, vendor: Option<&str>, id: Option<&Id>, now: f64) -> String {
    let r = Reply::new("agent_response").str("content", content);
    let r = match vendor {
        Some(v) => r.str("vendor", v),
        None => r,
    };
    r.id(id).end(now)
}

pub fn stream_start(id: Option<&Id>, now: f64) -> String {
    Reply::new("stream_start").id(id).end(now)
}

pub fn stream_chunk(content: &str, id: Option<&Id>, now: f64) -> String {
    Reply::new("stream_chunk")
        .str("content", content)
        .id(id)
        .end(now)
}

pub fn stream_end(id: Option<&Id>, now: f64) -> String {
    Reply::new("stream_end").id(id).end(now)
}

/// `result` is JSON text.
pub fn tool_result(tool_name: &str, result: &str, id: Option<&Id>, now: f64) -> String {
    Reply::new("tool_result")
        .str("tool_name", tool_name)
        .raw("result", result)
        .id(id)
        .end(now)
}

pub fn cancelled(id: Option<&Id>, now: f64) -> String {
    Reply::new("cancelled").id(id).end(now)
}

/// An `error` reply; `status` is the upstream's HTTP status, when it answered with one.
pub fn error(code: Code, msg: &str, id: Option<&Id>, status: Option<u16>, now: f64) -> String {
    let r = Reply::new("error")
        .str("error", msg)
        .str("code", code.as_str());
    let r = match status {
        Some(s) => r.raw("status", &s.to_string()),
        None => r,
    };
    r.id(id).end(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(s: &str) -> Value {
        serde_json::from_str(s).unwrap()
    }

    /// Found by the `agent_proto` fuzz target: a decimal id echoed back must parse to itself
    /// (the default serde_json float parse is not correctly rounded).
    #[test]
    fn a_decimal_id_is_echoed_as_the_same_number() {
        for sent in [
            "1.518546744073709551615",
            "1.5185467440737095",
            "0.1",
            "1e300",
        ] {
            let msg = format!("{{\"type\":\"ping\",\"id\":{sent}}}");
            let Ok(Request::Ping { id: Some(id) }) = parse(msg.as_bytes()) else {
                panic!("{msg}")
            };
            let again = format!("{{\"type\":\"ping\",\"id\":{}}}", id.json());
            assert_eq!(
                parse(again.as_bytes()),
                Ok(Request::Ping {
                    id: Some(id.clone())
                }),
                "{sent} → {}",
                id.json()
            );
            assert_eq!(id.json().parse::<f64>().ok(), sent.parse::<f64>().ok());
        }
    }

    #[test]
    fn integers_beyond_64_bits_are_refused() {
        for wide in [
            "18446744073709551616",
            "-9223372036854775809",
            "1000000000000000000000",
        ] {
            for msg in [
                format!(r#"{{"type":"ping","id":{wide}}}"#),
                format!(r#"{{"type":"tool_call","tool_name":"t","params":{{"a":[1,{wide}]}}}}"#),
            ] {
                let e = parse(msg.as_bytes()).unwrap_err();
                assert_eq!((e.code, e.id), (Code::BadJson, None), "{msg}");
            }
        }
        for fits in [
            r#"{"type":"ping","id":18446744073709551615}"#,
            r#"{"type":"ping","id":-9223372036854775808}"#,
            r#"{"type":"ping","id":1e300,"n":100000000000000000000.0}"#,
            r#"{"type":"ping","id":"18446744073709551616","x":"\"-99999999999999999999"}"#,
        ] {
            assert!(parse(fits.as_bytes()).is_ok(), "{fits}");
        }
    }

    #[test]
    fn requests() {
        assert_eq!(
            parse(br#"{"type":"ping"}"#).unwrap(),
            Request::Ping { id: None }
        );
        let Request::StreamingQuery(q) =
            parse(br#"{"type":"streaming_query","query":"hi","id":"q2","session_id":"s"}"#)
                .unwrap()
        else {
            panic!()
        };
        assert_eq!(q.query, "hi");
        assert_eq!(q.id.unwrap().json(), "\"q2\"");
        assert_eq!(q.session_id.as_deref(), Some("s"));
        let Request::ToolCall {
            tool_name,
            params,
            id,
        } = parse(br#"{"type":"tool_call","tool_name":"calculator","params":{"expression":"1+2"},"id":7}"#)
            .unwrap()
        else {
            panic!()
        };
        assert_eq!(tool_name, "calculator");
        assert_eq!(json(&params), json(r#"{"expression":"1+2"}"#));
        assert_eq!(id.unwrap().json(), "7");
        assert_eq!(
            parse(br#"{"type":"cancel"}"#).unwrap(),
            Request::Cancel { id: None }
        );
    }

    #[test]
    fn bad_input() {
        let e = parse(b"{nope").unwrap_err();
        assert_eq!(e.code, Code::BadJson);
        let e = parse(br#"[1]"#).unwrap_err();
        assert_eq!(e.code, Code::BadJson);
        let e = parse(br#"{"type":"agent_query","id":"a"}"#).unwrap_err();
        assert_eq!(
            (e.code, e.error.as_str()),
            (Code::MissingField, "Query is required")
        );
        assert_eq!(e.id.unwrap().json(), "\"a\"");
        let e = parse(br#"{"type":"agent_query","query":"  "}"#).unwrap_err();
        assert_eq!(e.code, Code::MissingField);
        let e = parse(br#"{"type":"agent_query","query":5}"#).unwrap_err();
        assert_eq!(e.code, Code::BadJson);
        let e = parse(br#"{"type":"dance","id":1}"#).unwrap_err();
        assert_eq!(e.code, Code::UnknownAction);
        assert!(e.error.contains("dance"));
        let e = parse(br#"{"query":"x"}"#).unwrap_err();
        assert_eq!(e.code, Code::MissingField);
        let e = parse(br#"{"type":"ping","id":{}}"#).unwrap_err();
        assert_eq!(e.code, Code::BadJson);
        let e = parse(br#"{"type":"tool_call","tool_name":"../x"}"#).unwrap_err();
        assert_eq!(e.code, Code::BadJson);
        let e = parse(br#"{"type":"tool_call"}"#).unwrap_err();
        assert_eq!(e.code, Code::MissingField);
        let e = parse(br#"{"type":"tool_call","tool_name":"x","params":[1]}"#).unwrap_err();
        assert_eq!(e.code, Code::BadJson);
    }

    #[test]
    fn replies_are_json_with_type_first() {
        let id = parse(br#"{"type":"ping","id":"q\"1"}"#).unwrap();
        let Request::Ping { id } = id else { panic!() };
        let s = stream_chunk("def quick_sort(\n", id.as_ref(), 1730000000.123);
        assert!(s.starts_with(r#"{"type":"stream_chunk""#), "{s}");
        assert_eq!(
            json(&s),
            json(
                r#"{"type":"stream_chunk","content":"def quick_sort(\n","id":"q\"1","timestamp":1730000000.123}"#
            )
        );
        let e = error(
            Code::UpstreamError,
            "upstream answered 500",
            None,
            Some(500),
            1.0,
        );
        assert_eq!(
            json(&e),
            json(
                r#"{"type":"error","error":"upstream answered 500","code":"upstream_error","status":500,"timestamp":1.0}"#
            )
        );
        assert_eq!(
            json(&tool_result("calc", "579", None, 2.5))["result"],
            json("579")
        );
        assert_eq!(
            json(&connected("ab"))["message"],
            "Connected to Agent WebSocket"
        );
        assert_eq!(json(&processing(None, 1.0))["status"], "processing");
        let r = json(&agent_response("hi", Some("openai"), None, 1.0));
        assert_eq!(
            (r["content"].as_str(), r["vendor"].as_str()),
            (Some("hi"), Some("openai"))
        );
    }
}
