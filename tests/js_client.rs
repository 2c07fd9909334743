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
