//! The server side of the opening handshake (RFC 6455 §4.2): validates an upgrade request and
//! computes the answer. Pure: takes the request head, returns the headers to send or the HTTP
//! [`Rejection`] to refuse with.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use http::{header, HeaderMap, Method, Version};
use sha1::{Digest, Sha1};

use crate::error::Rejection;

const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// A valid upgrade: what goes into the 101 response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accept {
    pub accept_key: String,
    /// The subprotocol we picked from the client's offer, if any.
    pub protocol: Option<String>,
}

/// True when the request asks for a WebSocket upgrade at all (`Upgrade: websocket`).
pub fn wants_websocket(headers: &HeaderMap) -> bool {
    has_token(headers, header::UPGRADE, "websocket")
}

/// Which origins may open WebSockets. Browsers always send `Origin`; other clients usually
/// don't, and an absent Origin is not a cross-site browser request, so it is allowed.
#[derive(Debug, Clone, Default)]
pub struct OriginPolicy {
    allowed: Vec<String>,
}

impl OriginPolicy {
    pub fn new(allowed: &[String]) -> OriginPolicy {
        OriginPolicy {
            allowed: allowed.iter().map(|o| o.to_ascii_lowercase()).collect(),
        }
    }
    pub fn allows(&self, origin: Option<&str>) -> bool {
        match origin {
            None => true,
            Some(_) if self.allowed.is_empty() => true,
            Some(o) => self.allowed.iter().any(|a| a.eq_ignore_ascii_case(o)),
        }
    }
}

/// Validates the upgrade request. `protocols` are the subprotocols this endpoint speaks, in
/// order of preference among the client's offer.
pub fn accept(
    method: &Method,
    version: Version,
    headers: &HeaderMap,
    origins: &OriginPolicy,
    protocols: &[&str],
) -> Result<Accept, Rejection> {
    if method != Method::GET {
        return Err(Rejection::BadRequest("WebSocket upgrade needs GET"));
    }
    if version < Version::HTTP_11 {
        return Err(Rejection::BadRequest("WebSocket upgrade needs HTTP/1.1"));
    }
    if !wants_websocket(headers) {
        return Err(Rejection::BadRequest("missing `Upgrade: websocket`"));
    }
    if !has_token(headers, header::CONNECTION, "upgrade") {
        return Err(Rejection::BadRequest("missing `Connection: upgrade`"));
    }
    check_version(headers)?;
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .ok_or(Rejection::BadRequest("missing Sec-WebSocket-Key"))?;
    match B64.decode(key.as_bytes()) {
        Ok(raw) if raw.len() == 16 => {}
        _ => {
            return Err(Rejection::BadRequest(
                "Sec-WebSocket-Key is not 16 bytes in base64",
            ))
        }
    }
    Ok(Accept {
        accept_key: accept_key(key.as_bytes()),
        protocol: check_origin_pick_protocol(headers, origins, protocols)?,
    })
}

/// Validates a WebSocket over HTTP/2 (RFC 8441 §4): an extended CONNECT whose `:protocol` is
/// `websocket`. There is no key to answer (the stream itself is the proof) and the answer is
/// 200; version, origin and subprotocol are as for HTTP/1.1. Returns the subprotocol picked.
pub fn accept_h2(
    method: &Method,
    protocol: Option<&str>,
    headers: &HeaderMap,
    origins: &OriginPolicy,
    protocols: &[&str],
) -> Result<Option<String>, Rejection> {
    if method != Method::CONNECT {
        return Err(Rejection::BadRequest(
            "WebSocket over HTTP/2 needs an extended CONNECT",
        ));
    }
    match protocol {
        Some(p) if p.eq_ignore_ascii_case("websocket") => {}
        Some(_) => return Err(Rejection::BadRequest("`:protocol` is not `websocket`")),
        None => {
            return Err(Rejection::BadRequest(
                "extended CONNECT without `:protocol`",
            ))
        }
    }
    check_version(headers)?;
    check_origin_pick_protocol(headers, origins, protocols)
}

fn check_version(headers: &HeaderMap) -> Result<(), Rejection> {
    match headers.get(header::SEC_WEBSOCKET_VERSION) {
        Some(v) if v.as_bytes() == b"13" => Ok(()),
        Some(_) => Err(Rejection::BadRequest(
            "unsupported Sec-WebSocket-Version (want 13)",
        )),
        None => Err(Rejection::BadRequest("missing Sec-WebSocket-Version")),
    }
}

/// Refuses a browser `Origin` the policy does not allow; picks the subprotocol.
fn check_origin_pick_protocol(
    headers: &HeaderMap,
    origins: &OriginPolicy,
    protocols: &[&str],
) -> Result<Option<String>, Rejection> {
    let origin = match headers.get(header::ORIGIN) {
        Some(o) => Some(
            o.to_str()
                .map_err(|_| Rejection::BadRequest("unreadable Origin"))?,
        ),
        None => None,
    };
    if !origins.allows(origin) {
        return Err(Rejection::OriginNotAllowed);
    }
    Ok(offered_tokens(headers, header::SEC_WEBSOCKET_PROTOCOL)
        .find(|p| protocols.iter().any(|ours| ours == p))
        .map(str::to_string))
}

/// `base64(sha1(key + GUID))`.
pub fn accept_key(key: &[u8]) -> String {
    let mut h = Sha1::new();
    h.update(key);
    h.update(GUID);
    B64.encode(h.finalize())
}

/// The comma-separated tokens of every instance of a header, trimmed.
fn offered_tokens(headers: &HeaderMap, name: header::HeaderName) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    offered_tokens(headers, name).any(|t| t.eq_ignore_ascii_case(token))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;

    fn request(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn good() -> Vec<(&'static str, &'static str)> {
        vec![
            ("upgrade", "websocket"),
            ("connection", "keep-alive, Upgrade"),
            ("sec-websocket-version", "13"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
        ]
    }

    fn check(h: &HeaderMap) -> Result<Accept, Rejection> {
        accept(
            &Method::GET,
            Version::HTTP_11,
            h,
            &OriginPolicy::default(),
            &[],
        )
    }

    #[test]
    fn rfc_example_key() {
        let a = check(&request(&good())).unwrap();
        assert_eq!(a.accept_key, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(a.protocol, None);
    }

    #[test]
    fn refusals_say_why() {
        for (drop, reason) in [
            ("upgrade", "Upgrade"),
            ("connection", "Connection"),
            ("sec-websocket-version", "Version"),
            ("sec-websocket-key", "Key"),
        ] {
            let h: Vec<_> = good().into_iter().filter(|(k, _)| *k != drop).collect();
            let r = check(&request(&h)).unwrap_err();
            assert_eq!(r.status(), StatusCode::BAD_REQUEST);
            assert!(r.to_string().contains(reason), "{drop}: {r}");
        }
        let mut h = good();
        h[3].1 = "c2hvcnQ=";
        assert!(check(&request(&h))
            .unwrap_err()
            .to_string()
            .contains("16 bytes"));
        let mut h = good();
        h[2].1 = "8";
        assert!(check(&request(&h)).unwrap_err().to_string().contains("13"));
        let r = accept(
            &Method::POST,
            Version::HTTP_11,
            &request(&good()),
            &OriginPolicy::default(),
            &[],
        );
        assert!(r.unwrap_err().to_string().contains("GET"));
    }

    #[test]
    fn origin_policy() {
        let p = OriginPolicy::new(&["https://app.example".into()]);
        let mut h = good();
        h.push(("origin", "https://APP.example"));
        assert!(accept(&Method::GET, Version::HTTP_11, &request(&h), &p, &[]).is_ok());
        h.pop();
        h.push(("origin", "https://evil.example"));
        let r = accept(&Method::GET, Version::HTTP_11, &request(&h), &p, &[]).unwrap_err();
        assert_eq!(r, Rejection::OriginNotAllowed);
        h.pop();
        assert!(accept(&Method::GET, Version::HTTP_11, &request(&h), &p, &[]).is_ok());
    }

    #[test]
    fn picks_the_clients_first_supported_protocol() {
        let mut h = good();
        h.push(("sec-websocket-protocol", "mqtt, chat.v2"));
        h.push(("sec-websocket-protocol", "chat.v1"));
        let a = accept(
            &Method::GET,
            Version::HTTP_11,
            &request(&h),
            &OriginPolicy::default(),
            &["chat.v1", "chat.v2"],
        )
        .unwrap();
        assert_eq!(a.protocol.as_deref(), Some("chat.v2"));
    }

    #[test]
    fn extended_connect_over_h2() {
        let p = OriginPolicy::new(&["https://app.example".into()]);
        let h = request(&[
            ("sec-websocket-version", "13"),
            ("sec-websocket-protocol", "chat.v1"),
            ("origin", "https://app.example"),
        ]);
        let ok = accept_h2(&Method::CONNECT, Some("websocket"), &h, &p, &["chat.v1"]);
        assert_eq!(ok.unwrap().as_deref(), Some("chat.v1"));
        let r = accept_h2(&Method::GET, Some("websocket"), &h, &p, &[]).unwrap_err();
        assert!(r.to_string().contains("CONNECT"), "{r}");
        let r = accept_h2(&Method::CONNECT, None, &h, &p, &[]).unwrap_err();
        assert!(r.to_string().contains(":protocol"), "{r}");
        let r = accept_h2(&Method::CONNECT, Some("webtransport"), &h, &p, &[]).unwrap_err();
        assert!(r.to_string().contains("websocket"), "{r}");
        let old = request(&[("sec-websocket-version", "8")]);
        let r = accept_h2(&Method::CONNECT, Some("websocket"), &old, &p, &[]).unwrap_err();
        assert!(r.to_string().contains("13"), "{r}");
        let evil = request(&[
            ("sec-websocket-version", "13"),
            ("origin", "https://evil.example"),
        ]);
        let r = accept_h2(&Method::CONNECT, Some("websocket"), &evil, &p, &[]).unwrap_err();
        assert_eq!(r, Rejection::OriginNotAllowed);
    }
}
