//! Agent client messages (`agent::protocol::parse`).
//!
//! Input: one client text message. Checks: a refusal carries a documented parsing code
//! (`bad_json`, `missing_field`, `unknown_action`) and its reply is JSON echoing the id; an
//! accepted request, written back as JSON, parses to the same request; the replies that echo
//! the id (`pong`, `stream_end`, `error`) are JSON whose `id` is the client's value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringgate::agent::protocol::{self, Code, Id, Request};
use serde_json::{json, Map, Value};

fn id_value(id: Option<&Id>) -> Option<Value> {
    id.map(|i| serde_json::from_str(i.json()).unwrap_or_else(|e| panic!("id {}: {e}", i.json())))
}

/// The request as a client would write it.
fn write(r: &Request) -> String {
    let mut m = Map::new();
    let id = match r {
        Request::Ping { id } => {
            m.insert("type".into(), json!("ping"));
            id
        }
        Request::Cancel { id } => {
            m.insert("type".into(), json!("cancel"));
            id
        }
        Request::AgentQuery(q) | Request::StreamingQuery(q) => {
            let ty = if matches!(r, Request::AgentQuery(_)) {
                "agent_query"
            } else {
                "streaming_query"
            };
            m.insert("type".into(), json!(ty));
            m.insert("query".into(), json!(q.query));
            if let Some(s) = &q.session_id {
                m.insert("session_id".into(), json!(s));
            }
            &q.id
        }
        Request::ToolCall {
            id,
            tool_name,
            params,
        } => {
            m.insert("type".into(), json!("tool_call"));
            m.insert("tool_name".into(), json!(tool_name));
            let p: Value = serde_json::from_str(params).unwrap_or_else(|e| panic!("{e}: {params}"));
            assert!(p.is_object(), "{params}");
            m.insert("params".into(), p);
            id
        }
    };
    // The id goes back as the text the server kept, not through serde_json: its float parsing
    // is not correctly rounded by default, so a long decimal id could come back as another
    // number than the one the server parsed.
    let mut text = Value::Object(m).to_string();
    if let Some(id) = id {
        text.pop();
        text.push_str(",\"id\":");
        text.push_str(id.json());
        text.push('}');
    }
    text
}

fn check_reply(reply: &str, id: Option<&Id>) {
    let v: Value = serde_json::from_str(reply).unwrap_or_else(|e| panic!("{e}: {reply}"));
    if let Some(want) = id_value(id) {
        assert_eq!(v["id"], want, "{reply}");
    }
}

fuzz_target!(|data: &[u8]| {
    match protocol::parse(data) {
        Err(rej) => {
            assert!(
                matches!(
                    rej.code,
                    Code::BadJson | Code::MissingField | Code::UnknownAction
                ),
                "{rej:?}"
            );
            check_reply(&rej.encode(1.0), rej.id.as_ref());
        }
        Ok(r) => {
            let text = write(&r);
            assert_eq!(protocol::parse(text.as_bytes()), Ok(r.clone()), "{text}");
            let id = match &r {
                Request::Ping { id } | Request::Cancel { id } | Request::ToolCall { id, .. } => id,
                Request::AgentQuery(q) | Request::StreamingQuery(q) => &q.id,
            };
            check_reply(&protocol::pong(id.as_ref(), 1.0), id.as_ref());
            check_reply(&protocol::stream_end(id.as_ref(), 1.0), id.as_ref());
            check_reply(
                &protocol::error(Code::UpstreamError, "x", id.as_ref(), Some(502), 1.0),
                id.as_ref(),
            );
        }
    }
});
