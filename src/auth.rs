//! Client authentication and the one authorization rule for topics.
//!
//! A JWT (docs/PROTOCOL.md) comes as the subprotocol `bearer.<token>`, in `Authorization:
//! Bearer`, or — only with `query_token = true`, since URLs end up in logs — in `?token=`.
//! Claims: `sub` (the user), `exp`, optional `nbf`, optional `channels` (topic patterns the user
//! may read: subscribe, replay, presence, history) and `publish` (patterns it may publish to); a
//! pattern is a topic name, or a prefix ending in `*`. A missing list means no restriction.
//!
//! With `[auth]` configured, a client without a token is [`Identity::anonymous`]: it may read
//! and publish only what `anonymous_channels` / `anonymous_publish` allow (nothing by default),
//! so it never gets more than a token holder with restrictions. Without `[auth]` there is no
//! identity at all and `/ws` is open (development; the start-up log says so).

use std::path::PathBuf;
use std::sync::Arc;

use http::{header, HeaderMap, Uri};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

pub use crate::error::AuthError;
use crate::error::ConfigError;

/// The `[auth]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Shared secret for HS256/HS384/HS512 tokens.
    pub jwt_secret: Option<String>,
    /// PEM public key for RS*/PS*/ES*/EdDSA tokens.
    pub jwt_public_key: Option<PathBuf>,
    /// `HS256`, `HS384`, `HS512`, `RS256`, `ES256`, `EdDSA`, …
    pub jwt_algorithm: String,
    /// Refuse WebSocket upgrades without a token (401). When false, clients without a token
    /// are `anonymous`; a token that is present must still be valid.
    pub required: bool,
    /// Expected `aud`, when set.
    pub audience: Option<String>,
    /// Expected `iss`, when set.
    pub issuer: Option<String>,
    /// Topic patterns a client without a token may read (subscribe, presence, history).
    pub anonymous_channels: Vec<String>,
    /// Topic patterns a client without a token may publish to.
    pub anonymous_publish: Vec<String>,
    /// Accept `?token=` in the URL. Off by default: URLs are logged by proxies and browsers.
    pub query_token: bool,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            jwt_secret: None,
            jwt_public_key: None,
            jwt_algorithm: "HS256".into(),
            required: false,
            audience: None,
            issuer: None,
            anonymous_channels: Vec::new(),
            anonymous_publish: Vec::new(),
            query_token: false,
        }
    }
}

impl AuthConfig {
    pub fn enabled(&self) -> bool {
        self.jwt_secret.is_some() || self.jwt_public_key.is_some()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, reason: String| Err(ConfigError::Invalid { key, reason });
        if self.jwt_secret.is_some() && self.jwt_public_key.is_some() {
            return invalid(
                "auth",
                "set `jwt_secret` or `jwt_public_key`, not both".into(),
            );
        }
        let alg: Algorithm = match self.jwt_algorithm.parse() {
            Ok(a) => a,
            Err(_) => {
                return invalid(
                    "auth.jwt_algorithm",
                    format!("{:?} is not a JWT algorithm", self.jwt_algorithm),
                )
            }
        };
        let hmac = matches!(alg, Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512);
        if self.jwt_secret.is_some() && !hmac {
            return invalid(
                "auth.jwt_algorithm",
                format!("{alg:?} needs `jwt_public_key`, not a secret"),
            );
        }
        if self.jwt_public_key.is_some() && hmac {
            return invalid(
                "auth.jwt_algorithm",
                format!("{alg:?} needs `jwt_secret`, not a public key"),
            );
        }
        if let Some(s) = &self.jwt_secret {
            if s.len() < MIN_SECRET_BYTES {
                return invalid(
                    "auth.jwt_secret",
                    format!(
                        "is {} bytes; an HMAC secret must have at least {MIN_SECRET_BYTES} \
                         (RFC 7518 §3.2)",
                        s.len()
                    ),
                );
            }
        }
        if self.required && !self.enabled() {
            return invalid(
                "auth.required",
                "needs `jwt_secret` or `jwt_public_key`".into(),
            );
        }
        Ok(())
    }
}

/// The shortest HMAC secret accepted: as long as the SHA-256 output (RFC 7518 §3.2).
pub const MIN_SECRET_BYTES: usize = 32;

/// The `user` of a client without a token.
pub const ANONYMOUS: &str = "anonymous";

/// What a client does with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicAction {
    /// Subscribe, including the replay of history a `since` asks for.
    Subscribe,
    Publish,
    Presence,
    History,
}

impl TopicAction {
    pub fn verb(self) -> &'static str {
        match self {
            TopicAction::Subscribe => "subscribe to",
            TopicAction::Publish => "publish to",
            TopicAction::Presence => "read the presence of",
            TopicAction::History => "read the history of",
        }
    }
}

/// Who a connection is and what it may do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user: Arc<str>,
    channels: Option<Vec<String>>,
    publish: Option<Vec<String>>,
    /// `exp`, seconds since the Unix epoch; `None` for anonymous clients.
    pub expires: Option<u64>,
}

impl Identity {
    /// A client without a token, under `[auth]`.
    pub fn anonymous(c: &AuthConfig) -> Identity {
        Identity {
            user: ANONYMOUS.into(),
            channels: Some(c.anonymous_channels.clone()),
            publish: Some(c.anonymous_publish.clone()),
            expires: None,
        }
    }

    /// The one rule: reading a topic needs `channels`, publishing needs `publish`.
    pub fn may(&self, action: TopicAction, topic: &str) -> bool {
        match action {
            TopicAction::Publish => allowed(self.publish.as_deref(), topic),
            TopicAction::Subscribe | TopicAction::Presence | TopicAction::History => {
                allowed(self.channels.as_deref(), topic)
            }
        }
    }
}

fn allowed(patterns: Option<&[String]>, topic: &str) -> bool {
    let Some(patterns) = patterns else {
        return true;
    };
    patterns.iter().any(|p| match p.strip_suffix('*') {
        Some(prefix) => topic.starts_with(prefix),
        None => p == topic,
    })
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default)]
    publish: Option<Vec<String>>,
}

/// A token found in a request, and the subprotocol that carried it (to be echoed back).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub token: String,
    pub protocol: Option<String>,
}

/// Finds the token: `?token=` (only when `query` allows it), then `Authorization: Bearer`,
/// then a `bearer.<token>` subprotocol.
pub fn find_token(uri: &Uri, headers: &HeaderMap, query: bool) -> Option<Found> {
    if let Some(q) = uri.query().filter(|_| query) {
        if let Some((_, t)) = form_urlencoded::parse(q.as_bytes()).find(|(k, _)| k == "token") {
            return Some(Found {
                token: t.into_owned(),
                protocol: None,
            });
        }
    }
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if let Some(t) = bearer {
        return Some(Found {
            token: t.trim().to_owned(),
            protocol: None,
        });
    }
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .find_map(|p| {
            p.strip_prefix("bearer.").map(|t| Found {
                token: t.to_owned(),
                protocol: Some(p.to_owned()),
            })
        })
}

/// Verifies tokens with the configured key.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
    required: bool,
    anonymous: Identity,
    /// `query_token`.
    pub query_token: bool,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithms", &self.validation.algorithms)
            .field("required", &self.required)
            .finish()
    }
}

impl Verifier {
    /// `None` when authentication is off.
    pub fn from_config(c: &AuthConfig) -> Result<Option<Verifier>, ConfigError> {
        if !c.enabled() {
            return Ok(None);
        }
        let alg: Algorithm = c.jwt_algorithm.parse().map_err(|_| ConfigError::Invalid {
            key: "auth.jwt_algorithm",
            reason: format!("unknown {:?}", c.jwt_algorithm),
        })?;
        let key = match (&c.jwt_secret, &c.jwt_public_key) {
            (Some(s), _) => DecodingKey::from_secret(s.as_bytes()),
            (None, Some(path)) => {
                let invalid = |reason: String| ConfigError::Invalid {
                    key: "auth.jwt_public_key",
                    reason,
                };
                let pem = std::fs::read(path)
                    .map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?;
                let key = match alg {
                    Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(&pem),
                    Algorithm::EdDSA => DecodingKey::from_ed_pem(&pem),
                    _ => DecodingKey::from_rsa_pem(&pem),
                };
                key.map_err(|e| {
                    invalid(format!(
                        "{} is not a {alg:?} public key: {e}",
                        path.display()
                    ))
                })?
            }
            (None, None) => return Ok(None),
        };
        let mut validation = Validation::new(alg);
        validation.set_required_spec_claims(&["exp", "sub"]);
        validation.validate_nbf = true;
        match &c.audience {
            Some(a) => validation.set_audience(&[a]),
            None => validation.validate_aud = false,
        }
        if let Some(i) = &c.issuer {
            validation.set_issuer(&[i]);
        }
        Ok(Some(Verifier {
            key,
            validation,
            required: c.required,
            anonymous: Identity::anonymous(c),
            query_token: c.query_token,
        }))
    }

    /// The identity for a request: [`Identity::anonymous`] without a token, where allowed.
    pub fn identify(&self, found: Option<&Found>) -> Result<Identity, AuthError> {
        let Some(found) = found else {
            return if self.required {
                Err(AuthError::Missing)
            } else {
                Ok(self.anonymous.clone())
            };
        };
        let data = jsonwebtoken::decode::<Claims>(&found.token, &self.key, &self.validation)
            .map_err(|e| AuthError::Invalid(e.to_string()))?;
        let c = data.claims;
        Ok(Identity {
            user: c.sub.into(),
            channels: c.channels,
            publish: c.publish,
            expires: Some(c.exp),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    const SECRET: &str = "a-test-secret-of-32-bytes-or-more";

    fn token(secret: &str, claims: serde_json::Value) -> String {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn verifier(required: bool) -> Verifier {
        let c = AuthConfig {
            jwt_secret: Some(SECRET.into()),
            required,
            ..AuthConfig::default()
        };
        Verifier::from_config(&c).unwrap().unwrap()
    }

    fn exp() -> u64 {
        jsonwebtoken::get_current_timestamp() + 600
    }

    fn found(t: String) -> Found {
        Found {
            token: t,
            protocol: None,
        }
    }

    #[test]
    fn valid_tokens_give_an_identity_with_its_permissions() {
        let v = verifier(false);
        let t = token(
            SECRET,
            serde_json::json!({"sub": "user-7", "exp": exp(), "channels": ["news.*", "chat"], "publish": ["chat"]}),
        );
        let id = v.identify(Some(&found(t))).unwrap();
        assert_eq!(&*id.user, "user-7");
        assert_eq!(id.expires, Some(exp()));
        use TopicAction::*;
        for read in [Subscribe, Presence, History] {
            assert!(id.may(read, "news.eu") && id.may(read, "chat"));
            assert!(!id.may(read, "chatter") && !id.may(read, "sports"));
        }
        assert!(id.may(Publish, "chat") && !id.may(Publish, "news.eu"));
        let open = token(SECRET, serde_json::json!({"sub": "u", "exp": exp()}));
        let id = v.identify(Some(&found(open))).unwrap();
        assert!(id.may(Subscribe, "anything") && id.may(Publish, "anything"));
    }

    #[test]
    fn anonymous_clients_get_only_what_the_config_grants() {
        let v = verifier(false);
        let anon = v.identify(None).unwrap();
        assert_eq!(&*anon.user, ANONYMOUS);
        for a in [
            TopicAction::Subscribe,
            TopicAction::Publish,
            TopicAction::Presence,
            TopicAction::History,
        ] {
            assert!(!anon.may(a, "chat"), "{a:?}");
        }
        let c = AuthConfig {
            jwt_secret: Some(SECRET.into()),
            anonymous_channels: vec!["public.*".into()],
            ..AuthConfig::default()
        };
        let anon = Verifier::from_config(&c)
            .unwrap()
            .unwrap()
            .identify(None)
            .unwrap();
        assert!(anon.may(TopicAction::Subscribe, "public.news"));
        assert!(anon.may(TopicAction::History, "public.news"));
        assert!(!anon.may(TopicAction::Publish, "public.news"));
        assert!(!anon.may(TopicAction::Subscribe, "private"));
    }

    #[test]
    fn not_before_is_checked() {
        let v = verifier(false);
        let later = jsonwebtoken::get_current_timestamp() + 3600;
        let t = token(
            SECRET,
            serde_json::json!({"sub": "u", "exp": exp() + 7200, "nbf": later}),
        );
        assert!(matches!(
            v.identify(Some(&found(t))),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn bad_tokens_are_refused() {
        let v = verifier(false);
        let wrong_key = token("other", serde_json::json!({"sub": "u", "exp": exp()}));
        assert!(matches!(
            v.identify(Some(&found(wrong_key))),
            Err(AuthError::Invalid(_))
        ));
        let expired = token(SECRET, serde_json::json!({"sub": "u", "exp": 1000}));
        assert!(matches!(
            v.identify(Some(&found(expired))),
            Err(AuthError::Invalid(_))
        ));
        let no_sub = token(SECRET, serde_json::json!({"exp": exp()}));
        assert!(matches!(
            v.identify(Some(&found(no_sub))),
            Err(AuthError::Invalid(_))
        ));
        assert!(matches!(
            v.identify(Some(&found("garbage".into()))),
            Err(AuthError::Invalid(_))
        ));
        assert!(v.identify(None).is_ok());
        assert_eq!(verifier(true).identify(None), Err(AuthError::Missing));
    }

    #[test]
    fn token_sources_in_order() {
        let uri: Uri = "/ws?a=1&token=abc".parse().unwrap();
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, "Bearer xyz".parse().unwrap());
        assert_eq!(find_token(&uri, &h, true).unwrap().token, "abc");
        // Without `query_token` the URL is not looked at.
        assert_eq!(find_token(&uri, &h, false).unwrap().token, "xyz");
        assert_eq!(find_token(&uri, &HeaderMap::new(), false), None);
        let plain: Uri = "/ws".parse().unwrap();
        assert_eq!(find_token(&plain, &h, true).unwrap().token, "xyz");
        let mut h = HeaderMap::new();
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            "chat, bearer.tok.en.x".parse().unwrap(),
        );
        let f = find_token(&plain, &h, true).unwrap();
        assert_eq!(f.token, "tok.en.x");
        assert_eq!(f.protocol.as_deref(), Some("bearer.tok.en.x"));
        assert_eq!(find_token(&plain, &HeaderMap::new(), true), None);
    }

    #[test]
    fn config_validation() {
        assert!(AuthConfig::default().validate().is_ok());
        let both = AuthConfig {
            jwt_secret: Some(SECRET.into()),
            jwt_public_key: Some("k.pem".into()),
            ..AuthConfig::default()
        };
        assert!(both.validate().is_err());
        let mismatch = AuthConfig {
            jwt_secret: Some(SECRET.into()),
            jwt_algorithm: "RS256".into(),
            ..AuthConfig::default()
        };
        assert!(mismatch.validate().is_err());
        let short = AuthConfig {
            jwt_secret: Some("x".repeat(MIN_SECRET_BYTES - 1)),
            ..AuthConfig::default()
        };
        assert!(matches!(
            short.validate(),
            Err(ConfigError::Invalid {
                key: "auth.jwt_secret",
                ..
            })
        ));
        let long_enough = AuthConfig {
            jwt_secret: Some("x".repeat(MIN_SECRET_BYTES)),
            ..AuthConfig::default()
        };
        assert!(long_enough.validate().is_ok());
        let required_without_key = AuthConfig {
            required: true,
            ..AuthConfig::default()
        };
        assert!(required_without_key.validate().is_err());
    }
}
