//! `/static/*`: the browser client and the test page, compiled into the binary so a fresh start
//! serves them without files on disk (`static = false` turns them off).
//!
//! Each answer carries an `ETag` (a hash of the bytes) and `Cache-Control: no-cache`: browsers
//! keep the file but revalidate it, and a new binary with changed assets is picked up at once.
//! A matching `If-None-Match` gets `304` without a body.

use std::sync::OnceLock;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Response, StatusCode};
use http_body_util::Full;
use sha1::{Digest, Sha1};

use super::http::Body;

struct Asset {
    name: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset {
        name: "ringgate.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../../static/ringgate.js"),
    },
    Asset {
        name: "ringgate.d.ts",
        content_type: "application/typescript; charset=utf-8",
        bytes: include_bytes!("../../static/ringgate.d.ts"),
    },
    Asset {
        name: "test_websocket.html",
        content_type: "text/html; charset=utf-8",
        bytes: include_bytes!("../../static/test_websocket.html"),
    },
    Asset {
        name: "test_websocket.js",
        content_type: "text/javascript; charset=utf-8",
        bytes: include_bytes!("../../static/test_websocket.js"),
    },
    Asset {
        name: "test_websocket.css",
        content_type: "text/css; charset=utf-8",
        bytes: include_bytes!("../../static/test_websocket.css"),
    },
];

/// One strong ETag per asset, computed on first use.
fn etags() -> &'static [String] {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    TAGS.get_or_init(|| {
        ASSETS
            .iter()
            .map(|a| {
                let d = Sha1::digest(a.bytes);
                let hex: String = d[..10].iter().map(|b| format!("{b:02x}")).collect();
                format!("\"{hex}\"")
            })
            .collect()
    })
}

/// Whether an `If-None-Match` value matches `etag` (weak comparison, RFC 9110 §13.1.2).
fn matches(if_none_match: &str, etag: &str) -> bool {
    if_none_match
        .split(',')
        .map(str::trim)
        .any(|t| t == "*" || t.strip_prefix("W/").unwrap_or(t) == etag)
}

/// Answers a request for `path` (starting with `/static/`).
pub fn serve(method: &Method, path: &str, headers: &HeaderMap) -> Response<Body> {
    let name = path.strip_prefix("/static/").unwrap_or("");
    let Some(i) = ASSETS.iter().position(|a| a.name == name) else {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    };
    if method != Method::GET && method != Method::HEAD {
        let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
        r.headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    let asset = &ASSETS[i];
    let etag = &etags()[i];
    let fresh = headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| matches(v, etag));
    let mut resp = if fresh {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        // For HEAD hyper sends the head only, with this body's length.
        Response::new(Full::new(Bytes::from_static(asset.bytes)))
    };
    let h = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if !fresh {
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(asset.content_type),
        );
    }
    resp
}

fn plain(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn if_none_match_forms() {
        let tag = "\"abc\"";
        assert!(matches("\"abc\"", tag));
        assert!(matches("W/\"abc\"", tag));
        assert!(matches("\"x\", \"abc\"", tag));
        assert!(matches("*", tag));
        assert!(!matches("\"abd\"", tag));
        assert!(!matches("abc", tag));
    }
}
