//! Browser tests: tests/browser/browser.test.mjs drives Debian's headless chromium over the
//! DevTools protocol (puppeteer-core from npm, which never downloads a browser) against the
//! real binary, once per I/O backend. Chromium is installed on first use when running as root;
//! otherwise the test fails with the command to run. Never skipped.

mod common;

use std::path::Path;
use std::process::Command;

const CHROMIUM: &str = "/usr/bin/chromium";

fn run(cmd: &mut Command) -> bool {
    cmd.status().map(|s| s.success()).unwrap_or(false)
}

fn ensure_chromium() {
    if Path::new(CHROMIUM).exists() {
        return;
    }
    // SAFETY: geteuid has no arguments and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    assert!(
        root,
        "chromium is missing: run `apt-get update && apt-get install -y chromium` as root"
    );
    let ok = run(Command::new("apt-get").args(["update", "-qq"]))
        && run(Command::new("apt-get").args(["install", "-y", "-qq", "chromium"]));
    assert!(
        ok && Path::new(CHROMIUM).exists(),
        "installing chromium failed: run `apt-get update && apt-get install -y chromium`"
    );
}

fn ensure_node_modules(dir: &Path) {
    if dir.join("node_modules/puppeteer-core").exists() {
        return;
    }
    let ok = run(Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund"])
        .current_dir(dir));
    assert!(
        ok,
        "npm ci failed in {}: node and npm are needed (apt-get install -y nodejs npm)",
        dir.display()
    );
}

#[test]
fn browser_tests() {
    ensure_chromium();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    ensure_node_modules(&dir);
    for io in ["uring", "epoll"] {
        let (ok, text) = common::output_text(
            Command::new("node")
                .args(["--test", "--test-concurrency=1", "browser.test.mjs"])
                .current_dir(&dir)
                .env("RINGGATE_BIN", env!("CARGO_BIN_EXE_ringgate"))
                .env("RINGGATE_IO", io)
                .env("CHROMIUM", CHROMIUM),
        );
        assert!(ok, "browser tests ({io}) failed:\n{text}");
        assert!(text.contains("# fail 0"), "{text}");
        println!("browser tests on {io}:\n{text}");
    }
}
