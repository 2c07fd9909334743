//! What the rooms' HTTP routes share: the backends' `/api/*` ([`super::api`]) and the fallback
//! transports' `POST /publish`, `GET /presence`, `GET /history` ([`super::fallback`]). Each
//! route family writes its own response headers; the refusals, the reading of a JSON body and
//! the question to a topic's home shard are the same for both (docs/PROTOCOL.md).

use crate::io::RequestBody;
use http::StatusCode;
use http_body_util::{BodyExt, Limited};
use tokio::sync::oneshot;

use crate::rooms::proto::json_str;
use crate::rooms::{ApiAnswer, HubMsg, Reply};
use crate::server::shard::Shard;

/// A refused request: status, machine-readable code (`bad_json`, `too_large`, …), text.
pub struct Refusal(pub StatusCode, pub &'static str, pub String);

impl Refusal {
    pub fn new(status: StatusCode, code: &'static str, text: impl Into<String>) -> Self {
        Refusal(status, code, text.into())
    }

    /// A `400 Bad Request`.
    pub fn bad(code: &'static str, text: impl Into<String>) -> Self {
        Refusal::new(StatusCode::BAD_REQUEST, code, text)
    }

    /// The response body: `{"error":TEXT,"code":CODE}`.
    pub fn json(&self) -> String {
        format!(
            "{{\"error\":{},\"code\":\"{}\"}}",
            json_str(&self.2),
            self.1
        )
    }
}

/// The JSON object a POST carries, read within `handshake_timeout` and a size limit that has
/// room for the envelope around the largest allowed `data`.
pub async fn json_object(
    shard: &Shard,
    body: RequestBody,
) -> Result<serde_json::Map<String, serde_json::Value>, Refusal> {
    let cfg = &shard.global.config;
    let limit = cfg.rooms.max_data_size + cfg.rooms.max_topic_length + 4096;
    // A body trickled byte by byte must not hold the connection (slowloris on bodies).
    let read = Limited::new(body, limit).collect();
    let body = match tokio::time::timeout(cfg.handshake_timeout(), read).await {
        Err(_) => {
            return Err(Refusal::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                "the body did not arrive within handshake_timeout",
            ))
        }
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(Refusal::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("body is larger than {limit} bytes"),
            ))
        }
        Ok(Err(_)) => return Err(Refusal::bad("bad_json", "could not read the body")),
    };
    let v: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| Refusal::bad("bad_json", format!("invalid JSON: {e}")))?;
    // serde_json reads such integers as floats: refused, as on `/ws`, rather than rounded.
    if crate::json::has_wide_integer(&body) {
        return Err(Refusal::bad("bad_json", crate::json::WIDE_INTEGER));
    }
    match v {
        serde_json::Value::Object(obj) => Ok(obj),
        _ => Err(Refusal::bad("bad_json", "body must be a JSON object")),
    }
}

/// Sends `make`'s message to the topic's home shard and returns the JSON body of its answer: a
/// publish's `{"seq":N}` (or `{"volatile":true}`, `{"conflated":true}`), a presence or history
/// read. An overloaded or unavailable shard, or Redis unable to take the request, is a `503`.
pub async fn ask(
    shard: &Shard,
    topic: &str,
    make: impl FnOnce(Reply) -> HubMsg,
) -> Result<String, Refusal> {
    let (tx, rx) = oneshot::channel();
    let msg = make(Reply::Http(tx));
    shard.hub.with(|hub, now| hub.route(now, topic, msg));
    let unavailable = |code, text: String| Refusal(StatusCode::SERVICE_UNAVAILABLE, code, text);
    match rx.await {
        Ok(ApiAnswer::Published { seq }) => Ok(format!("{{\"seq\":{seq}}}")),
        Ok(ApiAnswer::Json(body)) => Ok(body),
        Ok(ApiAnswer::Overloaded) => Err(unavailable(
            "overloaded",
            "a shard this needs is behind (max_shard_backlog); retry".into(),
        )),
        Ok(ApiAnswer::Unavailable(why)) => Err(unavailable("unavailable", why)),
        Err(_) => Err(unavailable(
            "internal",
            "the topic's shard is not available".into(),
        )),
    }
}
