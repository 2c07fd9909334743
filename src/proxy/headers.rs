//! Header rewriting: hop-by-hop removal (RFC 9110 §7.6.1), `X-Forwarded-*` and `Forwarded`
//! (RFC 7239), `X-Request-Id`, and the route's own set/remove rules.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use super::{Client, RouteState};

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const FORWARDED: HeaderName = HeaderName::from_static("forwarded");

const KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
const PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// The hop-by-hop headers (RFC 9110 §7.6.1, with `Keep-Alive` and `Proxy-Connection` of
/// older peers), in the order of [`hop_by_hop`].
static HOP_BY_HOP: [HeaderName; 6] = [
    header::CONNECTION,
    KEEP_ALIVE,
    PROXY_CONNECTION,
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Which hop-by-hop header `name` is (lowercase, as header names are): a `match` on the
/// string, which compiles to a switch on the length and one comparison.
fn hop_by_hop(name: &str) -> Option<usize> {
    match name {
        "connection" => Some(0),
        "keep-alive" => Some(1),
        "proxy-connection" => Some(2),
        "te" => Some(3),
        "transfer-encoding" => Some(4),
        "upgrade" => Some(5),
        _ => None,
    }
}

/// Removes the hop-by-hop headers and those `Connection` names.
pub fn strip_hop_by_hop(h: &mut HeaderMap) {
    strip(h);
}

/// [`strip_hop_by_hop`], saying whether a `TE` header asked for trailers (one pass over the
/// names finds the hop-by-hop ones present: most messages have none, or only `Connection`,
/// and an absent name then costs no lookup).
fn strip(h: &mut HeaderMap) -> bool {
    let mut present = [false; 6];
    for name in h.keys() {
        if let Some(i) = hop_by_hop(name.as_str()) {
            present[i] = true;
        }
    }
    if present == [false; 6] {
        return false;
    }
    if present[0] {
        // `close` and the hop-by-hop names themselves (`keep-alive`, `upgrade`: the usual
        // tokens) are no other header to find.
        let listed: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| {
                !t.is_empty()
                    && !t.eq_ignore_ascii_case("close")
                    && !HOP_BY_HOP
                        .iter()
                        .any(|n| t.eq_ignore_ascii_case(n.as_str()))
            })
            .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
            .collect();
        for n in listed {
            h.remove(n);
        }
    }
    let trailers = present[3]
        && h.get_all(header::TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        h.remove(name);
    }
    trailers
}

/// A new request id: 128 random bits in hex, from the thread's wyrand generator (`fastrand`,
/// seeded at random per thread). An id must be unique, not secret; a fresh `RandomState` and
/// two SipHash rounds per id cost several times as much.
pub fn new_request_id() -> String {
    let v = fastrand::u128(..);
    // Digits into an array, then one string: `format!`, or pushing char by char, costs
    // several times as many instructions here.
    let mut hex = [0u8; 32];
    for (i, d) in hex.iter_mut().enumerate() {
        *d = b"0123456789abcdef"[(v >> (124 - 4 * i)) as usize & 0xf];
    }
    // ASCII hex digits: always UTF-8.
    String::from_utf8(hex.to_vec()).unwrap_or_default()
}

/// The request id the client sent (when sane), or a new one.
pub fn request_id(h: &HeaderMap) -> String {
    h.get(X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 200)
        .map_or_else(new_request_id, str::to_owned)
}

fn is_trusted(route: &RouteState, ip: IpAddr) -> bool {
    route.trusted.iter().any(|c| c.contains(ip))
}

/// Rewrites a client's request headers for the upstream: hop-by-hop out, forwarding
/// headers in (appended to when the client is a trusted proxy, replaced otherwise), the
/// request id, the route's rules. `Host` is left to the caller.
pub fn upstream_request(route: &RouteState, h: &mut HeaderMap, client: &Client, request_id: &str) {
    // `TE: trailers` is hop-by-hop but says the same for the next hop: without it an upstream
    // may drop the trailers the client asked for.
    if strip(h) {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    h.remove(header::EXPECT);
    let ip = client.remote.ip().to_canonical();
    let trusted = is_trusted(route, ip);
    let proto = if client.tls { "https" } else { "http" };
    let host = h.get(header::HOST).filter(|v| v.to_str().is_ok()).cloned();
    let ip_text = ip_text(ip);
    // The `Forwarded` element first: it borrows the address text, which `X-Forwarded-For`
    // then takes without a copy (the headers still go in in the same order).
    let mut elem = String::with_capacity(64);
    elem.push_str("for=");
    match ip {
        IpAddr::V4(_) => elem.push_str(&ip_text),
        IpAddr::V6(_) => elem.extend(["\"[", &ip_text, "]\""]),
    }
    elem.extend([";proto=", proto]);
    if let Some(host) = host.as_ref().and_then(|v| v.to_str().ok()) {
        elem.push_str(";host=\"");
        if host.contains(['"', '\\']) {
            elem.extend(host.chars().filter(|c| !matches!(c, '"' | '\\')));
        } else {
            elem.push_str(host);
        }
        elem.push('"');
    }
    let xff = match h.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if trusted => [prev, ", ", &ip_text].concat(),
        _ => ip_text,
    };
    set(h, X_FORWARDED_FOR, xff);
    if !(trusted && h.contains_key(X_FORWARDED_PROTO)) {
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    }
    if !(trusted && h.contains_key(X_FORWARDED_HOST)) {
        match &host {
            Some(host) => {
                h.insert(X_FORWARDED_HOST, host.clone());
            }
            None => {
                h.remove(X_FORWARDED_HOST);
            }
        }
    }
    let forwarded = match h.get(FORWARDED).and_then(|v| v.to_str().ok()) {
        Some(prev) if trusted => [prev, ", ", &elem].concat(),
        _ => elem,
    };
    set(h, FORWARDED, forwarded);
    // A sane id of the client's is already there.
    if h.get(X_REQUEST_ID).map(HeaderValue::as_bytes) != Some(request_id.as_bytes()) {
        set(h, X_REQUEST_ID, request_id.to_owned());
    }
    for n in &route.req_remove {
        h.remove(n);
    }
    for (n, v) in &route.req_set {
        h.insert(n.clone(), v.clone());
    }
}

/// Rewrites an upstream's response headers for the client.
pub fn client_response(route: &RouteState, h: &mut HeaderMap) {
    strip_hop_by_hop(h);
    for n in &route.resp_remove {
        h.remove(n);
    }
    for (n, v) in &route.resp_set {
        h.insert(n.clone(), v.clone());
    }
}

/// Inserts `v`, whose allocation becomes the value (no copy).
fn set(h: &mut HeaderMap, name: HeaderName, v: String) {
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(v)) {
        h.insert(name, v);
    }
}

/// An address as text: `Display` for IPv6, digits written directly for IPv4 (`Display` goes
/// through the formatter's padding machinery, on every proxied request).
fn ip_text(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let mut s = String::with_capacity(15);
            let mut digits = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    s.push('.');
                }
                s.push_str(digits.format(octet));
            }
            s
        }
        IpAddr::V6(v6) => v6.to_string(),
    }
}

/// The upstream path: the upstream URL's own path, then the request path (with the route's
/// prefix removed when `strip_prefix`), then the query.
pub fn upstream_path(route: &RouteState, base: &str, uri: &http::Uri) -> String {
    let strip = route.cfg.strip_prefix.then_some(route.prefix.as_str());
    join_path(base, strip, uri.path(), uri.query())
}

/// `base` + (`path` less `strip`) + `?query`, joined by one `/`. A prefix's own trailing `/`
/// stays with the request (`/app/` under `/app/` to `/v1` is `/v1/`, a directory as asked),
/// and a request for exactly a slash-less prefix reaches `base` as it is (`/app` under `/app`
/// to `/v1` is `/v1`): what nginx's `proxy_pass` with a URI part does.
fn join_path(base: &str, strip: Option<&str>, path: &str, query: Option<&str>) -> String {
    let strip = strip.map(|p| p.strip_suffix('/').unwrap_or(p));
    let rest = strip.and_then(|p| path.strip_prefix(p)).unwrap_or(path);
    let mut out = String::with_capacity(base.len() + rest.len() + 2);
    out.push_str(base);
    if rest.is_empty() {
        if out.is_empty() {
            out.push('/');
        }
    } else {
        match (out.ends_with('/'), rest.starts_with('/')) {
            (true, true) => out.push_str(&rest[1..]),
            (false, false) => {
                out.push('/');
                out.push_str(rest);
            }
            _ => out.push_str(rest),
        }
    }
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_listed_go() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, "keep-alive, x-secret".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert(header::TE, "trailers".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));

        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            "Keep-Alive, close, X-Other".parse().unwrap(),
        );
        h.insert(header::UPGRADE, "h2c".parse().unwrap());
        h.insert("x-other", "1".parse().unwrap());
        h.insert(header::CONTENT_LENGTH, "0".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::CONTENT_LENGTH));
    }

    #[test]
    fn hop_by_hop_names_and_their_indices_agree() {
        for (i, n) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop(n.as_str()), Some(i));
        }
        assert_eq!(hop_by_hop("content-length"), None);
    }

    #[test]
    fn ip_texts() {
        for ip in [
            "127.0.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "10.20.3.40",
            "::1",
            "2001:db8::7",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(ip_text(ip), ip.to_string());
        }
    }

    #[test]
    fn upstream_paths() {
        let j = |base, strip, path, q| join_path(base, strip, path, q);
        assert_eq!(j("", None, "/app/x", None), "/app/x");
        assert_eq!(j("", Some("/app/"), "/app/x", Some("a=1")), "/x?a=1");
        assert_eq!(j("", Some("/app/"), "/app/", None), "/");
        assert_eq!(j("/v1", Some("/app/"), "/app/x", None), "/v1/x");
        assert_eq!(j("/v1", Some("/app/"), "/app/", None), "/v1/");
        assert_eq!(j("/v1", Some("/app"), "/apple", None), "/v1/le");
        assert_eq!(j("/v1", Some("/app"), "/app", Some("q")), "/v1?q");
        assert_eq!(j("/v1", Some("/app"), "/app/", None), "/v1/");
        assert_eq!(j("/v1/", Some("/app/"), "/app/x", None), "/v1/x");
        assert_eq!(j("/v1", None, "/app/x", None), "/v1/app/x");
    }

    #[test]
    fn request_ids() {
        let a = new_request_id();
        assert_eq!(a.len(), 32);
        assert!(a
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(a, new_request_id());
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, "abc".parse().unwrap());
        assert_eq!(request_id(&h), "abc");
    }
}
