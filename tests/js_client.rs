//! Runs the unit tests of the browser client (static/ringgate.js) under Node's test runner
//! (`node --test tests/js/`, Node 20+, no npm packages), and the client in Node against the
//! real binary.

mod common;

use std::process::Command;

use common::{output_text, unix_in, Backend, Server};

/// `node` with `args`, from the repository root.
fn node(args: &[&str]) -> Command {
    let mut cmd = Command::new("node");
    cmd.args(args).current_dir(env!("CARGO_MANIFEST_DIR"));
    cmd
}

#[test]
fn ringgate_js_unit_tests() {
    let (ok, text) = output_text(&mut node(&["--test", "tests/js/"]));
    assert!(
        ok,
        "node --test tests/js/ failed (needs nodejs 20+):\n{text}"
    );
    assert!(text.contains("# fail 0"), "{text}");
}

/// The client in Node 20 against the real binary (both backends).
#[test]
fn ringgate_js_in_node_against_the_server() {
    for backend in [Backend::Uring, Backend::Epoll] {
        let server = Server::start(backend, &[]);
        let (ok, text) = output_text(
            node(&["--experimental-websocket", "tests/js_live/node_client.mjs"])
                .env("RINGGATE_WS", server.url("/ws")),
        );
        assert!(ok, "{backend:?}:\n{text}");
        assert!(text.contains("4 passed, 0 failed"), "{text}");
    }
}

/// The client on SSE under `[auth]` without `query_token`: the token goes as a header.
#[test]
fn ringgate_js_sse_with_a_header_token() {
    let secret = "js-client-secret-of-at-least-32-bytes";
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &serde_json::json!({"sub": "ann", "exp": unix_in(600), "channels": ["news"], "publish": ["news"]}),
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("token");
    let config = format!("[auth]\njwt_secret = \"{secret}\"\nrequired = true\n");
    for backend in [Backend::Uring, Backend::Epoll] {
        let server = Server::start_with_config(backend, &config, &[]);
        let (ok, text) = output_text(
            node(&["tests/js_live/sse_auth.mjs"])
                .env("RINGGATE_WS", server.url("/ws"))
                .env("RINGGATE_TOKEN", &token),
        );
        assert!(ok, "{backend:?}:\n{text}");
        assert!(text.contains("3 passed, 0 failed"), "{text}");
    }
}
