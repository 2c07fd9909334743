//! Config files (`server::config::Config::from_toml`, `validate`).
//!
//! Input: TOML text. Parsing and validating never panic; a config that validates renders
//! (`to_toml`, what `check-config` prints) to TOML that parses back to the same config, and its
//! derived settings (listeners, TLS, timeouts) can be computed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringgate::server::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return; // read_to_string refuses non-UTF-8 before parsing
    };
    let Ok(cfg) = Config::from_toml(text) else {
        return;
    };
    if cfg.validate().is_err() {
        return;
    }
    let rendered = cfg.to_toml();
    let back = Config::from_toml(&rendered).unwrap_or_else(|e| panic!("{e}\n{rendered}"));
    assert_eq!(back, cfg, "{rendered}");
    let _ = (
        cfg.listeners(),
        cfg.tls_settings(),
        cfg.has_admin_listener(),
    );
    let _ = (
        cfg.heartbeat(),
        cfg.handshake_timeout(),
        cfg.drain_timeout(),
        cfg.close_timeout(),
    );
});
