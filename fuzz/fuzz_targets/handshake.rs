//! The opening handshake (`ws::handshake::accept`), token discovery (`auth::find_token`) and
//! the extension header as the server reads them from a request head.
//!
//! Input: a raw HTTP/1.x request head. It is read with httparse (the parser hyper uses) into the
//! method, version, URI and headers the server sees. Checks: `accept` says yes exactly when
//! RFC 6455 §4.2.1 (restated here) does, answers 403 only for a refused Origin, computes the
//! accept key as §4.2.2 defines it and picks a subprotocol the client offered and the endpoint
//! speaks; a token found in a subprotocol is echoed back as that very subprotocol.
#![no_main]

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Uri, Version};
use libfuzzer_sys::fuzz_target;
use ringgate::auth::find_token;
use ringgate::error::Rejection;
use ringgate::ws::deflate::{negotiate, Policy};
use ringgate::ws::handshake::{accept, OriginPolicy};
use sha1::{Digest, Sha1};

const PROTOCOLS: &[&str] = &["chat.v1", "chat.v2"];

fn tokens<'a>(h: &'a HeaderMap, name: &HeaderName) -> Vec<&'a str> {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let mut raw = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut raw);
    let Ok(httparse::Status::Complete(_)) = req.parse(data) else {
        return;
    };
    let (Some(m), Some(path), Some(v)) = (req.method, req.path, req.version) else {
        return;
    };
    let Ok(method) = Method::from_bytes(m.as_bytes()) else {
        return;
    };
    let version = if v == 1 {
        Version::HTTP_11
    } else {
        Version::HTTP_10
    };
    let mut headers = HeaderMap::new();
    for h in req.headers.iter() {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) {
            headers.append(n, v);
        }
    }
    let origins = OriginPolicy::new(&["https://app.example".to_string()]);
    let got = accept(&method, version, &headers, &origins, PROTOCOLS);

    // RFC 6455 §4.2.1, restated.
    let key = headers.get(header::SEC_WEBSOCKET_KEY);
    let origin = headers.get(header::ORIGIN);
    let well_formed = method == Method::GET
        && version == Version::HTTP_11
        && tokens(&headers, &header::UPGRADE)
            .iter()
            .any(|t| t.eq_ignore_ascii_case("websocket"))
        && tokens(&headers, &header::CONNECTION)
            .iter()
            .any(|t| t.eq_ignore_ascii_case("upgrade"))
        && headers
            .get(header::SEC_WEBSOCKET_VERSION)
            .map(HeaderValue::as_bytes)
            == Some(b"13")
        && key.is_some_and(|k| B64.decode(k.as_bytes()).is_ok_and(|d| d.len() == 16))
        && origin.is_none_or(|o| o.to_str().is_ok());
    let origin_ok = origin
        .and_then(|o| o.to_str().ok())
        .is_none_or(|o| o.eq_ignore_ascii_case("https://app.example"));
    match got {
        Ok(a) => {
            assert!(well_formed && origin_ok, "accepted {headers:?}");
            let mut h = Sha1::new();
            h.update(key.expect("checked").as_bytes());
            h.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
            assert_eq!(a.accept_key, B64.encode(h.finalize()));
            let offered = tokens(&headers, &header::SEC_WEBSOCKET_PROTOCOL);
            match a.protocol.as_deref() {
                Some(p) => assert!(PROTOCOLS.contains(&p) && offered.contains(&p), "{p}"),
                None => assert!(!offered.iter().any(|o| PROTOCOLS.contains(o))),
            }
        }
        Err(Rejection::OriginNotAllowed) => {
            assert!(well_formed && !origin_ok, "403 for {headers:?}")
        }
        Err(r) => {
            assert!(matches!(r, Rejection::BadRequest(_)), "{r:?}");
            assert!(!well_formed, "{r:?} for {headers:?}");
        }
    }

    if let Ok(uri) = path.parse::<Uri>() {
        if let Some(f) = find_token(&uri, &headers, true) {
            if let Some(p) = &f.protocol {
                assert_eq!(*p, format!("bearer.{}", f.token));
                assert!(tokens(&headers, &header::SEC_WEBSOCKET_PROTOCOL).contains(&p.as_str()));
            }
        }
    }
    let exts = headers
        .get_all(header::SEC_WEBSOCKET_EXTENSIONS)
        .iter()
        .filter_map(|v| v.to_str().ok());
    if let Some(p) = negotiate(exts, &Policy::default()) {
        assert!(p.response().starts_with("permessage-deflate"));
    }
});
