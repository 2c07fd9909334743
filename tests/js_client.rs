//! Runs the unit tests of the browser client (static/ringgate.js) under Node's test runner:
//! `node --test tests/js/` (Node 20+, no npm packages).

use std::process::Command;

#[test]
fn ringgate_js_unit_tests() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let out = Command::new("node")
        .args(["--test", "tests/js/"])
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run node ({e}); install it: apt-get install -y nodejs"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "node --test tests/js/ failed:\n{text}"
    );
    assert!(text.contains("# fail 0"), "{text}");
}

mod common;

use common::{Backend, Server};

/// The client in Node 20 against the real binary (both backends).
#[test]
fn ringgate_js_in_node_against_the_server() {
    for backend in [Backend::Uring, Backend::Epoll] {
        let server = Server::start(backend, &[]);
        let out = Command::new("node")
            .args(["--experimental-websocket", "tests/js_live/node_client.mjs"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("RINGGATE_WS", server.url("/ws"))
            .output()
            .expect("run node");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{backend:?}:\n{text}");
        assert!(text.contains("4 passed, 0 failed"), "{text}");
    }
}

/// The client on SSE under `[auth]` without `query_token`: the token goes as a header.
#[test]
fn ringgate_js_sse_with_a_header_token() {
    let secret = "js-client-secret-of-at-least-32-bytes";
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 600;
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"sub": "ann", "exp": exp, "channels": ["news"], "publish": ["news"]}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("token");
    let config = format!("[auth]\njwt_secret = \"{secret}\"\nrequired = true\n");
    for backend in [Backend::Uring, Backend::Epoll] {
        let server = Server::start_with_config(backend, &config, &[]);
        let out = Command::new("node")
            .args(["tests/js_live/sse_auth.mjs"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("RINGGATE_WS", server.url("/ws"))
            .env("RINGGATE_TOKEN", &token)
            .output()
            .expect("run node");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{backend:?}:\n{text}");
        assert!(text.contains("3 passed, 0 failed"), "{text}");
    }
}
