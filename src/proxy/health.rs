//! Active health checks: an HTTP GET to each upstream of a route every `interval`, from each
//! shard; `unhealthy_threshold` failures in a row take it out, `healthy_threshold` successes
//! bring it back.

use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request};
use http_body_util::Empty;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use super::upstream::Upstream;
use super::RouteState;
use crate::io::Backend;

pub fn start(route: &Rc<RouteState>) {
    let Some(hc) = route.cfg.health_check.clone() else {
        return;
    };
    for i in 0..route.upstreams.len() {
        let weak = Rc::downgrade(route);
        let hc = hc.clone();
        tokio::task::spawn_local(async move {
            let (mut good, mut bad) = (0u32, 0u32);
            loop {
                let Some(r) = weak.upgrade().filter(|r| r.live.get()) else {
                    return;
                };
                let up = r.upstreams[i].clone();
                let (backend, name, shard) = (r.backend, r.name.clone(), r.shard);
                drop(r);
                let ok = matches!(
                    tokio::time::timeout(hc.timeout(), probe(&up, backend, &hc.path, hc.timeout()))
                        .await,
                    Ok(true)
                );
                if ok {
                    good += 1;
                    bad = 0;
                    if up.down.get() && good >= hc.healthy_threshold {
                        up.down.set(false);
                        up.success();
                        tracing::info!(route = %name, upstream = %up.label, shard, "upstream healthy again");
                    }
                } else {
                    bad += 1;
                    good = 0;
                    if !up.down.get() && bad >= hc.unhealthy_threshold {
                        up.down.set(true);
                        tracing::warn!(route = %name, upstream = %up.label, shard, "upstream failed its health check: taken out");
                    }
                }
                ::metrics::gauge!(super::UPSTREAM_HEALTHY, "route" => name, "upstream" => up.label.clone(), "shard" => shard.to_string())
                    .set(if up.down.get() { 0.0 } else { 1.0 });
                tokio::time::sleep(hc.interval()).await;
            }
        });
    }
}

/// One check: a 2xx or 3xx answer to `GET path` on a new connection.
async fn probe(up: &Upstream, backend: Backend, path: &str, timeout: Duration) -> bool {
    let Ok(io) = up.connect_h1(backend, timeout).await else {
        return false;
    };
    let Ok((mut sender, conn)) = http1::Builder::new()
        .handshake::<_, Empty<Bytes>>(TokioIo::new(io))
        .await
    else {
        return false;
    };
    let driver = tokio::task::spawn_local(async move {
        let _ = conn.await;
    });
    let full = format!("{}{}", up.ep.url.path, path);
    let mut req = Request::new(Empty::new());
    *req.uri_mut() = match full.parse() {
        Ok(u) => u,
        Err(_) => return false,
    };
    if let Ok(v) = HeaderValue::from_str(&up.ep.url.authority) {
        req.headers_mut().insert(header::HOST, v);
    }
    req.headers_mut().insert(
        header::USER_AGENT,
        HeaderValue::from_static("ringgate-health-check"),
    );
    let ok = match sender.send_request(req).await {
        Ok(resp) => resp.status().is_success() || resp.status().is_redirection(),
        Err(_) => false,
    };
    driver.abort();
    ok
}
