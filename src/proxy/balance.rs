//! Choosing an upstream: round robin, least connections, or rendezvous hashing on a key (the
//! same key keeps its upstream while that one is available; when it is not, the key moves to
//! its next choice and only keys of the missing upstream move).

use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::time::Instant;

use http::HeaderMap;

use super::config::{Balance, HashKey};
use super::RouteState;

/// The hashing key of a request; `None` when it lacks one (then round robin).
pub fn key(k: &HashKey, headers: &HeaderMap, client: IpAddr) -> Option<u64> {
    let mut h = std::hash::DefaultHasher::new();
    match k {
        HashKey::ClientAddress => client.to_canonical().hash(&mut h),
        HashKey::Header(name) => headers.get(name)?.as_bytes().hash(&mut h),
        HashKey::Cookie(name) => cookie(headers, name)?.hash(&mut h),
    }
    Some(h.finish())
}

fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}

fn score(key: u64, label: &str) -> u64 {
    let mut h = std::hash::DefaultHasher::new();
    key.hash(&mut h);
    label.hash(&mut h);
    h.finish()
}

/// The upstream to use (index), skipping unavailable and already tried ones.
pub fn pick(route: &RouteState, hash: Option<u64>, tried: &[bool]) -> Option<usize> {
    let ups = &route.upstreams;
    let n = ups.len();
    if n == 0 {
        return None;
    }
    let now = Instant::now();
    let usable = |i: &usize| !tried[*i] && ups[*i].available(now);
    let start = route.rr.get() % n;
    let mut order = (0..n).map(|k| (start + k) % n);
    let chosen = match (route.cfg.balance, hash) {
        (Balance::Hash, Some(key)) => (0..n)
            .filter(usable)
            .max_by_key(|&i| score(key, &ups[i].label))?,
        (Balance::LeastConnections, _) => order
            .filter(usable)
            .min_by_key(|&i| ups[i].outstanding.get())?,
        _ => order.find(usable)?,
    };
    route.rr.set(chosen + 1);
    Some(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookies_are_found() {
        let mut h = HeaderMap::new();
        h.insert(http::header::COOKIE, "a=1; sid=xyz; b=2".parse().unwrap());
        assert_eq!(cookie(&h, "sid"), Some("xyz"));
        assert_eq!(cookie(&h, "c"), None);
    }

    #[test]
    fn rendezvous_moves_only_the_missing_upstreams_keys() {
        let labels = ["http://a:1", "http://b:1", "http://c:1"];
        let best = |key: u64, skip: Option<usize>| {
            (0..3)
                .filter(|i| Some(*i) != skip)
                .max_by_key(|&i| score(key, labels[i]))
                .unwrap()
        };
        for key in 0..200u64 {
            let full = best(key, None);
            let without_b = best(key, Some(1));
            if full != 1 {
                assert_eq!(full, without_b);
            }
        }
    }
}
