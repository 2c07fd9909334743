//! HTTP forwarding: one client request to one upstream (with safe retries), the response
//! streamed back.

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::Full;
use hyper::body::Body as _;

use crate::io::RequestBody;

use super::body::{Body, ClientFault, IdleTimer, Relay, ReqBody, Upload};
use super::upstream::Lease;
use super::{balance, headers, Client, Failure, RouteState};
use crate::io::client::{Conn, ResponseBody};

/// A short text answer naming the cause.
pub fn error_response(f: &Failure) -> Response<Body> {
    text(f.status(), &f.message())
}

pub fn text(status: StatusCode, body: &str) -> Response<Body> {
    let mut resp = Response::new(Body::Full(Full::new(Bytes::copy_from_slice(
        body.as_bytes(),
    ))));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Forwards `req` along `route` and answers with the upstream's response, or with the status
/// that names what failed (502, 503, 504, 413, 408).
pub async fn forward(
    route: Rc<RouteState>,
    req: Request<RequestBody>,
    client: Client,
) -> Response<Body> {
    let started = Instant::now();
    let (mut parts, body) = req.into_parts();
    let request_id = headers::request_id(&parts.headers);
    let result = exchange(&route, &mut parts, body, &client, &request_id).await;
    let (mut resp, upstream) = match result {
        Ok((resp, label)) => (resp, label),
        Err((f, label)) => {
            if f.is_upstream_fault() {
                tracing::debug!(route = %route.name, error = ?f, "proxy request failed");
            }
            (error_response(&f), label)
        }
    };
    let status = resp.status();
    route.metrics.requests(status).increment(1);
    // The line is built only when it is logged (the exchange left method and URI as they were).
    if !tracing::enabled!(target: "access", tracing::Level::INFO) {
        return resp;
    }
    let line = Access {
        remote: client.remote,
        route: route.name.clone(),
        upstream: upstream.unwrap_or_else(|| "-".into()),
        method: parts.method,
        path: parts.uri.path().to_string(),
        status: status.as_u16(),
        request_id,
        started,
        head_ms: started.elapsed().as_millis() as u64,
    };
    // A streamed answer logs when its body ends (or is abandoned); an error answer now.
    match resp.body_mut() {
        Body::Relay(r) => r.access = Some(line),
        Body::Full(_) => line.log(0, true),
    }
    resp
}

/// The access log line of one proxied request (target `access`).
pub struct Access {
    pub remote: std::net::SocketAddr,
    pub route: String,
    pub upstream: String,
    pub method: Method,
    pub path: String,
    pub status: u16,
    pub request_id: String,
    pub started: Instant,
    /// Until the response head was ready.
    pub head_ms: u64,
}

impl Access {
    pub fn log(&self, bytes_out: u64, complete: bool) {
        tracing::info!(
            target: "access",
            remote = %self.remote,
            route = %self.route,
            upstream = %self.upstream,
            method = %self.method,
            path = %self.path,
            status = self.status,
            request_id = %self.request_id,
            head_ms = self.head_ms,
            duration_ms = self.started.elapsed().as_millis() as u64,
            bytes_out,
            complete,
            "proxied"
        );
    }
}

type Attempt = Result<(Response<Body>, Option<String>), (Failure, Option<String>)>;

async fn exchange(
    route: &Rc<RouteState>,
    parts: &mut http::request::Parts,
    body: crate::io::RequestBody,
    client: &Client,
    request_id: &str,
) -> Attempt {
    let cfg = &route.cfg;
    if super::head_too_large(&parts.headers) {
        return Err((Failure::HeadTooLarge, None));
    }
    let limit = cfg.max_body_size;
    let declared = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if limit > 0 && declared.is_some_and(|n| n > limit) {
        return Err((Failure::TooLarge, None));
    }
    let deadline = cfg.total_timeout().map(|t| Instant::now() + t);
    let client_host = parts.headers.get(header::HOST).cloned();
    headers::upstream_request(route, &mut parts.headers, client, request_id);
    let hash = route
        .hash
        .as_ref()
        .and_then(|k| balance::key(k, &parts.headers, client.remote.ip()));
    let empty = body.is_end_stream();
    let fault = Rc::new(Cell::new(None));
    let mut upload = (!empty).then(|| {
        ReqBody::Stream(Box::new(Upload {
            metrics: route.metrics.clone(),
            inner: body,
            limit,
            seen: 0,
            fault: fault.clone(),
            idle: IdleTimer::new(cfg.idle_timeout()),
            counted: route.counted.clone(),
        }))
    });
    let retry_ok = idempotent(&parts.method) && empty;
    let mut tried = vec![false; route.upstreams.len()];
    let mut last = Failure::NoUpstream;
    let mut label = None;
    let (eject_after, eject_for, shard) = route.eject();
    let mut attempt = 0;
    // A pooled connection the upstream had closed meanwhile: the request was not sent, and
    // goes again on a fresh connection without counting as a retry (once).
    let mut stale_retry = true;
    loop {
        if attempt > cfg.retries {
            break;
        }
        if attempt > 0 {
            route.metrics.retries.increment(1);
        }
        attempt += 1;
        let Some(i) = balance::pick(route, hash, &tried) else {
            break;
        };
        tried[i] = true;
        let up = route.upstreams[i].clone();
        label = Some(up.label.clone());
        let mut lease = Lease::new(up.clone(), cfg.pool_size);
        let connect = remaining(deadline, cfg.connect_timeout());
        let (conn, reused) = match up
            .connection(route.backend, connect, cfg.pool_idle_timeout())
            .await
        {
            Ok(c) => c,
            Err(f) => {
                up.failure(eject_after, eject_for, shard);
                last = f;
                // Nothing was sent: another upstream may always be tried.
                continue;
            }
        };
        let body = match &upload {
            None => ReqBody::Empty,
            Some(_) => upload.take().unwrap_or(ReqBody::Empty),
        };
        let head_wait = remaining(deadline, cfg.response_timeout());
        let sent = Instant::now();
        // The headers go with the request; a copy stays only when a retry may need them: an
        // idempotent request with attempts and untried upstreams left (a request that is
        // never sent comes back with them).
        let retry_may_follow = retry_ok && attempt <= cfg.retries && tried.contains(&false);
        let headers = if retry_may_follow {
            parts.headers.clone()
        } else {
            std::mem::take(&mut parts.headers)
        };
        match send(
            route,
            parts,
            headers,
            client_host.as_ref(),
            &up,
            conn,
            body,
            head_wait,
            &mut lease,
        )
        .await
        {
            Ok(resp) => {
                up.success();
                route.metrics.latency.record(sent.elapsed().as_secs_f64());
                return Ok((respond(route, resp, lease, deadline), label));
            }
            Err((f, unsent)) => {
                let unsent_body = unsent.map(|(h, b)| {
                    if !retry_may_follow {
                        parts.headers = h;
                    }
                    b
                });
                if let Some(fault) = fault.get() {
                    lease.abort();
                    let f = match fault {
                        ClientFault::TooLarge => Failure::TooLarge,
                        ClientFault::Idle => Failure::ClientIdle,
                        ClientFault::Gone => Failure::Broken("client went away".into()),
                    };
                    return Err((f, label));
                }
                lease.abort();
                if unsent_body.is_some() && reused && stale_retry {
                    stale_retry = false;
                    attempt -= 1;
                    tried[i] = false;
                    up.ep.drop_idle();
                    upload = unsent_body.filter(|_| !empty);
                    continue;
                }
                if f.is_upstream_fault() {
                    up.failure(eject_after, eject_for, shard);
                }
                last = f;
                if let Some(b) = unsent_body {
                    upload = Some(b).filter(|_| !empty);
                    continue;
                }
                if !retry_ok {
                    break;
                }
            }
        }
    }
    Err((last, label))
}

fn remaining(deadline: Option<Instant>, d: Duration) -> Duration {
    match deadline {
        Some(t) => d.min(t.saturating_duration_since(Instant::now())),
        None => d,
    }
}

/// Sends the request on `conn` (which the lease then holds); on failure, the body when it was
/// never sent (a pooled connection the upstream had closed): it can go elsewhere.
#[allow(clippy::too_many_arguments)]
async fn send(
    route: &RouteState,
    parts: &http::request::Parts,
    headers: http::HeaderMap,
    client_host: Option<&HeaderValue>,
    up: &super::upstream::Upstream,
    conn: Conn<ReqBody>,
    body: ReqBody,
    wait: Duration,
    lease: &mut Lease,
) -> Result<Response<ResponseBody>, (Failure, Option<(http::HeaderMap, ReqBody)>)> {
    let h2 = conn.is_h2();
    let url = &up.ep.url;
    let path = headers::upstream_path(route, &url.path, &parts.uri);
    // `Host` (HTTP/1.1) or `:authority` (h2): the client's with `preserve_host`, else the
    // upstream's (its header value made once).
    let host = match (route.cfg.preserve_host, client_host) {
        (true, Some(h)) if h.to_str().is_ok() => Some(h),
        _ => up.host.as_ref(),
    };
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.headers_mut() = headers;
    let uri = if h2 {
        let scheme = if url.tls { "https" } else { "http" };
        let authority = host.and_then(|h| h.to_str().ok()).unwrap_or(&url.authority);
        format!("{scheme}://{authority}{path}")
    } else {
        path
    };
    match http::Uri::from_maybe_shared(Bytes::from(uri)) {
        Ok(u) => *req.uri_mut() = u,
        Err(_) => {
            return Err((
                Failure::Broken("cannot build the upstream URI".into()),
                None,
            ))
        }
    }
    if h2 {
        *req.version_mut() = Version::HTTP_2;
        req.headers_mut().remove(header::HOST);
    } else {
        *req.version_mut() = Version::HTTP_11;
        if let Some(v) = host {
            req.headers_mut().insert(header::HOST, v.clone());
        }
    }
    let conn = lease.held.insert(conn);
    match tokio::time::timeout(wait, conn.send(req)).await {
        Err(_) => Err((Failure::HeadTimeout, None)),
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err((e, unsent))) => Err((
            Failure::Broken(e.to_string()),
            unsent.map(|r| {
                let (p, b) = r.into_parts();
                (p.headers, b)
            }),
        )),
    }
}

fn respond(
    route: &RouteState,
    resp: Response<ResponseBody>,
    lease: Lease,
    deadline: Option<Instant>,
) -> Response<Body> {
    let (mut parts, inner) = resp.into_parts();
    headers::client_response(route, &mut parts.headers);
    parts.version = Version::HTTP_11;
    let relay = Relay {
        metrics: route.metrics.clone(),
        sent: 0,
        inner,
        lease: Some(lease),
        idle: IdleTimer::new(route.cfg.idle_timeout()),
        deadline: deadline.map(|t| Box::pin(tokio::time::sleep_until(t.into()))),
        counted: route.counted.clone(),
        eject: route.eject(),
        access: None,
        ended: false,
    };
    Response::from_parts(parts, Body::Relay(Box::new(relay)))
}
