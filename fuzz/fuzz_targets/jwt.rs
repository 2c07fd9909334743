//! JWT verification (`auth::Verifier`).
//!
//! Input: `[mode] ++ …`.
//! - mode even: the rest is a token from a stranger; it must be refused (no key, no `alg`
//!   confusion, no `none` gets through a verifier holding an HS256 secret).
//! - mode odd: `[n, (pos_lo, pos_hi, byte, op) × n] ++ sub`: a valid token for `sub` is
//!   accepted as `sub`; the same token after `n` byte edits (op: replace, insert, delete) is
//!   refused unless the edits left it unchanged.
#![no_main]

use jsonwebtoken::{encode, EncodingKey, Header};
use libfuzzer_sys::fuzz_target;
use ringgate::auth::{AuthConfig, AuthError, Found, Verifier};
use ringgate_fuzz::Params;
use std::sync::OnceLock;

const SECRET: &str = "fuzz-secret-of-at-least-32-bytes!";

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| {
        let c = AuthConfig {
            jwt_secret: Some(SECRET.into()),
            ..AuthConfig::default()
        };
        Verifier::from_config(&c)
            .expect("valid config")
            .expect("auth enabled")
    })
}

fn identify(token: String) -> Result<String, AuthError> {
    let found = Found {
        token,
        protocol: None,
    };
    verifier()
        .identify(Some(&found))
        .map(|i| i.user.to_string())
}

fuzz_target!(|data: &[u8]| {
    let mut p = Params(data);
    if p.u8() & 1 == 0 {
        let token = String::from_utf8_lossy(p.rest()).into_owned();
        let r = identify(token.clone());
        assert!(
            matches!(r, Err(AuthError::Invalid(_))),
            "{token:?} gave {r:?}"
        );
        return;
    }
    let edits: Vec<(usize, u8, u8)> = (0..p.u8() % 8)
        .map(|_| (usize::from(p.u16()), p.u8(), p.u8()))
        .collect();
    let sub = String::from_utf8_lossy(p.rest()).into_owned();
    let claims = serde_json::json!({
        "sub": sub,
        "exp": jsonwebtoken::get_current_timestamp() + 600,
        "channels": ["a.*"],
    });
    let token = encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("encodable claims");
    assert_eq!(identify(token.clone()), Ok(sub));
    let mut t = token.clone().into_bytes();
    for (pos, byte, op) in edits {
        let at = pos % (t.len() + 1);
        match op % 3 {
            0 if at < t.len() => t[at] = byte,
            1 => t.insert(at, byte),
            _ if at < t.len() => {
                t.remove(at);
            }
            _ => {}
        }
    }
    let Ok(modified) = String::from_utf8(t) else {
        return; // tokens reach the verifier as text
    };
    if modified != token {
        let r = identify(modified.clone());
        assert!(r.is_err(), "modified token {modified:?} accepted: {r:?}");
    }
});
