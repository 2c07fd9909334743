//! The rooms HTTP API for backends (docs/PROTOCOL.md): `POST /api/publish`, `GET /api/presence`,
//! `GET /api/history`. Requests are checked here and answered by the topic's home shard.

use std::rc::Rc;

use crate::io::RequestBody;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;

use super::http::Body;
use crate::rooms::proto::json_str;
use crate::rooms::{HubMsg, PublishOpts};
use crate::server::rooms_http::{ask, json_object, Refusal};
use crate::server::shard::Shard;

type ApiResult = Result<Response<Body>, Refusal>;

/// Answers one `/api/*` request.
pub async fn serve(shard: Rc<Shard>, req: Request<RequestBody>) -> Response<Body> {
    let res = match authorize(&shard, &req) {
        Err(e) => Err(e),
        Ok(()) => route(&shard, req).await,
    };
    res.unwrap_or_else(|refusal| {
        let mut r = json(refusal.0, refusal.json());
        if refusal.0 == StatusCode::SERVICE_UNAVAILABLE {
            r.headers_mut().insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from_static("1"),
            );
        }
        r
    })
}

async fn route(shard: &Shard, req: Request<RequestBody>) -> ApiResult {
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/api/publish") => publish(shard, req).await,
        (&Method::POST, "/api/disconnect") => disconnect(shard, req).await,
        (&Method::GET, "/api/presence") => presence(shard, &req).await,
        (&Method::GET, "/api/history") => history(shard, &req).await,
        (_, "/api/publish" | "/api/presence" | "/api/history" | "/api/disconnect") => {
            Err(Refusal::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{} is not allowed here", req.method()),
            ))
        }
        _ => Err(Refusal::new(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such API",
        )),
    }
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
fn authorize(shard: &Shard, req: &Request<RequestBody>) -> Result<(), Refusal> {
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
        _ => Err(Refusal::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid `Authorization: Bearer KEY` is required",
        )),
    }
}

fn check_topic<'a>(shard: &Shard, topic: Option<&'a str>) -> Result<&'a str, Refusal> {
    let max = shard.global.config.rooms.max_topic_length;
    match topic {
        None | Some("") => Err(Refusal::bad("missing_field", "topic is required")),
        Some(t) if t.len() > max => Err(Refusal::bad(
            "too_large",
            format!("topic is longer than {max} bytes"),
        )),
        Some(t) => Ok(t),
    }
}

/// `[cluster] engine = "redis"` and Redis cannot take the request: why.
fn unavailable(why: String) -> Refusal {
    Refusal::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", why)
}

/// A user id as `/api/publish` and `/api/disconnect` take it: the `sub` of the user's tokens.
fn user_of(obj: &serde_json::Map<String, serde_json::Value>) -> Result<Option<&str>, Refusal> {
    match obj.get("user") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(u)) if !u.is_empty() && u.len() <= MAX_USER => Ok(Some(u)),
        Some(_) => Err(Refusal::bad(
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

async fn publish(shard: &Shard, req: Request<RequestBody>) -> ApiResult {
    let cfg = &shard.global.config.rooms;
    let obj = json_object(shard, req.into_body()).await?;
    let topic = match obj.get("topic") {
        None => None,
        Some(t) => Some(
            t.as_str()
                .ok_or_else(|| Refusal::bad("missing_field", "topic must be a string"))?,
        ),
    };
    let to = match (topic, user_of(&obj)?) {
        (Some(_), Some(_)) => {
            return Err(Refusal::bad("bad_request", "give topic or user, not both"))
        }
        (_, Some(user)) => To::User(user),
        (topic, None) => To::Topic(check_topic(shard, topic)?),
    };
    let kind = match obj.get("type") {
        None | Some(serde_json::Value::Null) => "message",
        Some(serde_json::Value::String(s)) if !s.is_empty() => s,
        Some(_) => {
            return Err(Refusal::bad(
                "missing_field",
                "type must be a non-empty string",
            ))
        }
    };
    if let To::Topic(topic) = to {
        if cfg.is_binary(topic) {
            return Err(Refusal::bad(
                "bad_binary",
                format!("{} is a binary topic: publish over /ws", json_str(topic)),
            ));
        }
    }
    if crate::rooms::proto::is_reserved_type(kind) && !cfg.api_reserved_types {
        return Err(Refusal::new(
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
        .ok_or_else(|| Refusal::bad("missing_field", "data is required"))?
        .to_string();
    if data.len() > cfg.max_data_size {
        return Err(Refusal::bad(
            "too_large",
            format!("data is larger than {} bytes", cfg.max_data_size),
        ));
    }
    let volatile = match obj.get("volatile") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Bool(b)) => Some(*b),
        Some(_) => return Err(Refusal::bad("missing_field", "volatile must be a boolean")),
    };
    let max = crate::rooms::proto::MAX_TRACE;
    let trace = match obj.get("trace") {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) if !s.is_empty() && s.len() <= max => Some(s.as_str()),
        Some(_) => {
            return Err(Refusal::bad(
                "missing_field",
                format!("trace must be a string of 1 to {max} bytes"),
            ))
        }
    };
    let topic = match to {
        To::Topic(topic) => topic,
        To::User(user) => {
            if volatile == Some(false) {
                return Err(Refusal::bad(
                    "bad_request",
                    "messages to a user are always volatile",
                ));
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
    Ok(json(StatusCode::OK, answer))
}

/// `POST /api/disconnect`: closes every connection of a user, on every shard, with a code.
async fn disconnect(shard: &Shard, req: Request<RequestBody>) -> ApiResult {
    let obj = json_object(shard, req.into_body()).await?;
    let user = user_of(&obj)?.ok_or_else(|| Refusal::bad("missing_field", "user is required"))?;
    let code = match obj.get("code") {
        None | Some(serde_json::Value::Null) => 1000,
        Some(c) => match c.as_u64() {
            Some(c @ (1000 | 1008 | 3000..=4999)) => c as u16,
            _ => {
                return Err(Refusal::bad(
                    "bad_request",
                    "code must be 1000, 1008 or 3000-4999",
                ))
            }
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
fn query(req: &Request<RequestBody>) -> Vec<(String, String)> {
    form_urlencoded::parse(req.uri().query().unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

fn param<'a>(q: &'a [(String, String)], key: &str) -> Option<&'a str> {
    q.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

fn number(q: &[(String, String)], key: &str) -> Result<Option<u64>, Refusal> {
    param(q, key)
        .map(|v| {
            v.parse().map_err(|_| {
                Refusal::bad(
                    "missing_field",
                    format!("{key} must be a non-negative integer"),
                )
            })
        })
        .transpose()
}

async fn presence(shard: &Shard, req: &Request<RequestBody>) -> ApiResult {
    let q = query(req);
    let topic = check_topic(shard, param(&q, "topic"))?;
    let answer = ask(shard, topic, |reply| HubMsg::Presence {
        topic: topic.into(),
        reply,
    })
    .await?;
    Ok(json(StatusCode::OK, answer))
}

async fn history(shard: &Shard, req: &Request<RequestBody>) -> ApiResult {
    let q = query(req);
    let topic = check_topic(shard, param(&q, "topic"))?;
    let since = number(&q, "since")?.unwrap_or(0);
    let max = shard.global.config.rooms.history_size;
    let limit = number(&q, "limit")?.map_or(max, |l| (l as usize).min(max));
    let answer = ask(shard, topic, |reply| HubMsg::History {
        topic: topic.into(),
        since,
        limit,
        reply,
    })
    .await?;
    Ok(json(StatusCode::OK, answer))
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
