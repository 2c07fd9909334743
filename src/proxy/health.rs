//! Active health checks: an HTTP GET to each upstream of a route every `interval`, from each
//! shard, one task per upstream and shard; `unhealthy_threshold` failures in a row take it
//! out, `healthy_threshold` successes bring it back.

use std::rc::Rc;
use std::time::Duration;

use http::uri::PathAndQuery;
use tokio::io::AsyncWriteExt;

use super::tunnel::read_head;
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

/// One check: a 2xx or 3xx answer to `GET path` on a new connection, made on the checking
/// task itself (a request head written by hand, the answer's head read as for an upgrade).
async fn probe(up: &Upstream, backend: Backend, path: &str, timeout: Duration) -> bool {
    // The path goes into the request line as it is: only a valid one.
    let full = format!("{}{}", up.ep.url.path, path);
    if full.parse::<PathAndQuery>().is_err() {
        return false;
    }
    let Ok(mut io) = up.connect_h1(backend, timeout).await else {
        return false;
    };
    let head = format!(
        "GET {full} HTTP/1.1\r\nHost: {}\r\nUser-Agent: ringgate-health-check\r\n\
         Connection: close\r\n\r\n",
        up.ep.url.authority
    );
    if io.write_all(head.as_bytes()).await.is_err() || io.flush().await.is_err() {
        return false;
    }
    match read_head(&mut io).await {
        Ok(((status, _), _)) => status.is_success() || status.is_redirection(),
        Err(_) => false,
    }
}
