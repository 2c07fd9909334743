//! The rooms HTTP API for backends (docs/PROTOCOL.md): `POST /api/publish`, `GET /api/presence`,
//! `GET /api/history`. Requests are checked here and answered by the topic's home shard.

use std::rc::Rc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::sync::oneshot;

use super::http::Body;
use crate::rooms::proto::json_str;
use crate::rooms::{ApiAnswer, HubMsg, PublishOpts, Reply};
use crate::server::shard::Shard;

/// A refused request: status, machine-readable code, text.
struct ApiError(StatusCode, &'static str, String);

type ApiResult = Result<Response<Body>, ApiError>;

/// Answers one `/api/*` request.
pub async fn serve(shard: Rc<Shard>, req: Request<Incoming>) -> Response<Body> {
    let res = match authorize(&shard, &req) {
        Err(e) => Err(e),
        Ok(()) => route(&shard, req).await,
    };
    res.unwrap_or_else(|ApiError(status, code, text)| {
        let mut r = json(
            status,
            format!("{{\"error\":{},\"code\":\"{code}\"}}", json_str(&text)),
        );
        if status == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut().insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from_static("1"),
            );
        }
        r
    })
}

async fn route(shard: &Shard, req: Request<Incoming>) -> ApiResult {
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/api/publish") => publish(shard, req).await,
        (&Method::POST, "/api/disconnect") => disconnect(shard, req).await,
        (&Method::GET, "/api/presence") => presence(shard, &req).await,
        (&Method::GET, "/api/history") => history(shard, &req).await,
        (_, "/api/publish" | "/api/presence" | "/api/history" | "/api/disconnect") => {
            Err(ApiError(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{} is not allowed here", req.method()),
            ))
        }
        _ => Err(ApiError(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such API".into(),
        )),
    }
}

fn bad(code: &'static str, text: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, code, text.into())
}

fn json(status: StatusCode, body: String) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// Compares without stopping at the first difference (no timing hint about the key).
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Every `/api/*` request shows the key when one is configured (the router serves `/api/*`
/// without a key only on the admin surface).
fn authorize(shard: &Shard, req: &Request<Incoming>) -> Result<(), ApiError> {
    let Some(key) = shard.global.config.rooms.api_key.as_deref() else {
        return Ok(());
    };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if same_secret(g.trim().as_bytes(), key.as_bytes()) => Ok(()),
        _ => Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid `Authorization: Bearer KEY` is required".into(),
        )),
    }
}

fn check_topic<'a>(shard: &Shard, topic: Option<&'a str>) -> Result<&'a str, ApiError> {
    let max = shard.global.config.rooms.max_topic_length;
    match topic {
        None | Some("") => Err(bad("missing_field", "topic is required")),
        Some(t) if t.len() > max => Err(bad(
            "too_large",
            format!("topic is longer than {max} bytes"),
        )),
        Some(t) => Ok(t),
    }
}

/// `[cluster] engine = "redis"` and Redis cannot take the request: why.
fn unavailable(why: String) -> ApiError {
    ApiError(StatusCode::SERVICE_UNAVAILABLE, "unavailable", why)
}

/// Sends `msg` to the topic's home shard and waits for its answer.
async fn ask(
    shard: &Shard,
    topic: &str,
    make: impl FnOnce(Reply) -> HubMsg,
) -> Result<ApiAnswer, ApiError> {
    let (tx, rx) = oneshot::channel();
    let msg = make(Reply::Http(tx));
    shard.hub.with(|hub, now| hub.route(now, topic, msg));
    match rx.await {
        Ok(ApiAnswer::Overloaded) => Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            "a shard this needs is behind (max_shard_backlog); retry".into(),
        )),
        Ok(ApiAnswer::Unavailable(why)) => Err(unavailable(why)),
        Ok(answer) => Ok(answer),
        Err(_) => Err(ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            "internal",
            "the topic's shard is not available".into(),
        )),
    }
}

/// The JSON object a POST carries, read within `handshake_timeout` and its size limit.
async fn body_object(
    shard: &Shard,
    req: Request<Incoming>,
) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    let cfg = &shard.global.config.rooms;
    // Room for the envelope around the largest allowed `data`.
    let limit = cfg.max_data_size + cfg.max_topic_length + 4096;
    // A body trickled byte by byte must not hold the connection (slowloris on bodies).
    let read = Limited::new(req.into_body(), limit).collect();
    let body = match tokio::time::timeout(shard.global.config.handshake_timeout(), read).await {
        Err(_) => {
            return Err(ApiError(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                "the body did not arrive within handshake_timeout".into(),
            ))
        }
        Ok(Ok(b)) => b.to_bytes(),
        Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(ApiError(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("body is larger than {limit} bytes"),
            ))
        }
        Ok(Err(_)) => return Err(bad("bad_json", "could not read the body")),
    };
    let v: serde_json::Value =
        serde_json::from_slice(&body).map_err(|e| bad("bad_json", format!("invalid JSON: {e}")))?;
    // serde_json reads such integers as floats: refused, as on `/ws`, rather than rounded.
    if crate::json::has_wide_integer(&body) {
        return Err(bad("bad_json", crate::json::WIDE_INTEGER));
    }
    match v {
        serde_json::Value::Object(obj) => Ok(obj),
        _ => Err(bad("bad_json", "body must be a JSON object")),
    }
}

/// A user id as `/api/publish` and `/api/disconnect` take it: the `sub` of the user's tokens.
fn user_of(obj: &serde_json::Map<String, serde_json::Value>) -> Result<Option<&str>, ApiError> {
    match obj.get("user") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(u)) if !u.is_empty() && u.len() <= MAX_USER => Ok(Some(u)),
        Some(_) => Err(bad(
            "missing_field",
            format!("user must be a string of 1 to {MAX_USER} bytes"),
        )),
    }
}

/// Longest user id accepted, in bytes.
const MAX_USER: usize = 256;

/// Whom a `POST /api/publish` is for.
#[derive(Clone, Copy)]
enum To<'a> {
    /// The topic's subscribers.
    Topic(&'a str),
    /// Every connection of the user (the `sub` of its token), on every shard.
    User(&'a str),
}

async fn publish(shard: &Shard, req: Request<Incoming>) -> ApiResult {
    let cfg = &shard.global.config.rooms;
    let obj = body_object(shard, req).await?;
    let topic = match obj.get("topic") {
        None => None,
        Some(t) => Some(
            t.as_str()
                .ok_or_else(|| bad("missing_field", "topic must be a string"))?,
        ),
    };
    let to = match (topic, user_of(&obj)?) {
        (Some(_), Some(_)) => return Err(bad("bad_request", "give topic or user, not both")),
        (_, Some(user)) => To::User(user),
        (topic, None) => To::Topic(check_topic(shard, topic)?),
    };
    let kind = match obj.get("type") {
        None | Some(serde_json::Value::Null) => "message",
        Some(serde_json::Value::String(s)) if !s.is_empty() => s,
        Some(_) => return Err(bad("missing_field", "type must be a non-empty string")),
    };
    if let To::Topic(topic) = to {
        if cfg.is_binary(topic) {
            return Err(bad(
                "bad_binary",
                format!("{} is a binary topic: publish over /ws", json_str(topic)),
            ));
        }
    }
    if crate::rooms::proto::is_reserved_type(kind) && !cfg.api_reserved_types {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "{} is a server message type (see rooms.api_reserved_types)",
                json_str(kind)
            ),
        ));
    }
    let data = obj
        .get("data")
        .ok_or_else(|| bad("missing_field", "data is required"))?
        .to_string();
    if data.len() > cfg.max_data_size {
        return Err(bad(
            "too_large",
            format!("data is larger than {} bytes", cfg.max_data_size),
        ));
    }
    let volatile = match obj.get("volatile") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Bool(b)) => Some(*b),
        Some(_) => return Err(bad("missing_field", "volatile must be a boolean")),
    };
    let max = crate::rooms::proto::MAX_TRACE;
    let trace = match obj.get("trace") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) if !s.is_empty() && s.len() <= max => Some(s.as_str()),
        Some(_) => {
            return Err(bad(
                "missing_field",
                format!("trace must be a string of 1 to {max} bytes"),
            ))
        }
    };
    let topic = match to {
        To::Topic(topic) => topic,
        To::User(user) => {
            if volatile == Some(false) {
                return Err(bad("bad_request", "messages to a user are always volatile"));
            }
            shard
                .hub
                .with(|hub, now| hub.publish_to_user(now, user, kind, &data, trace))
                .map_err(unavailable)?;
            return Ok(json(
                StatusCode::OK,
                format!("{{\"user\":{}}}", json_str(user)),
            ));
        }
    };
    let opts = PublishOpts {
        volatile,
        trace: trace.map(Into::into),
    };
    let answer = ask(shard, topic, |reply| HubMsg::Publish {
        topic: topic.into(),
        kind: kind.into(),
        data: data.into(),
        from: None,
        reply,
        opts,
    })
    .await?;
    match answer {
        ApiAnswer::Published { seq } => Ok(json(StatusCode::OK, format!("{{\"seq\":{seq}}}"))),
        // Volatile, or held by conflation: `{"volatile":true}` / `{"conflated":true}`.
        ApiAnswer::Json(body) => Ok(json(StatusCode::OK, body)),
        // `ask` answers these as errors already.
        ApiAnswer::Overloaded | ApiAnswer::Unavailable(_) => Err(ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "unexpected answer".into(),
        )),
    }
}

/// `POST /api/disconnect`: closes every connection of a user, on every shard, with a code.
async fn disconnect(shard: &Shard, req: Request<Incoming>) -> ApiResult {
    let obj = body_object(shard, req).await?;
    let user = user_of(&obj)?.ok_or_else(|| bad("missing_field", "user is required"))?;
    let code = match obj.get("code") {
        None | Some(serde_json::Value::Null) => 1000,
        Some(c) => match c.as_u64() {
            Some(c @ (1000 | 1008 | 3000..=4999)) => c as u16,
            _ => return Err(bad("bad_request", "code must be 1000, 1008 or 3000-4999")),
        },
    };
    shard
        .hub
        .with(|hub, now| hub.disconnect_user(now, user, code))
        .map_err(unavailable)?;
    Ok(json(
        StatusCode::OK,
        format!("{{\"user\":{},\"code\":{code}}}", json_str(user)),
    ))
}

/// The query parameters of `req`, decoded.
fn query(req: &Request<Incoming>) -> Vec<(String, String)> {
    form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

fn param<'a>(q: &'a [(String, String)], key: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn number(q: &[(String, String)], key: &str) -> Result<Option<u64>, ApiError> {
    param(q, key)
        .map(|v| {
            v.parse().map_err(|_| {
                bad(
                    "missing_field",
                    format!("{key} must be a non-negative integer"),
                )
            })
        })
        .transpose()
}

async fn presence(shard: &Shard, req: &Request<Incoming>) -> ApiResult {
    let q = query(req);
    let topic = check_topic(shard, param(&q, "topic"))?;
    match ask(shard, topic, |reply| HubMsg::Presence {
        topic: topic.into(),
        reply,
    })
    .await?
    {
        ApiAnswer::Json(body) => Ok(json(StatusCode::OK, body)),
        ApiAnswer::Published { .. } | ApiAnswer::Overloaded | ApiAnswer::Unavailable(_) => {
            Err(ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "unexpected answer".into(),
            ))
        }
    }
}

async fn history(shard: &Shard, req: &Request<Incoming>) -> ApiResult {
    let q = query(req);
    let topic = check_topic(shard, param(&q, "topic"))?;
    let since = number(&q, "since")?.unwrap_or(0);
    let max = shard.global.config.rooms.history_size;
    let limit = number(&q, "limit")?.map_or(max, |l| (l as usize).min(max));
    match ask(shard, topic, |reply| HubMsg::History {
        topic: topic.into(),
        since,
        limit,
        reply,
    })
    .await?
    {
        ApiAnswer::Json(body) => Ok(json(StatusCode::OK, body)),
        ApiAnswer::Published { .. } | ApiAnswer::Overloaded | ApiAnswer::Unavailable(_) => {
            Err(ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "unexpected answer".into(),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::same_secret;

    #[test]
    fn secret_comparison() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
        assert!(!same_secret(b"", b"a"));
    }
}
