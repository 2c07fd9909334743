//! The `[cluster]` table: which engine carries the rooms, and how to reach Redis.

use serde::{Deserialize, Serialize};
use std::time::Duration;

use crate::error::ConfigError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Engine {
    /// Rooms live in this process only.
    Memory,
    /// Rooms span every node connected to the same Redis.
    Redis,
}

impl std::str::FromStr for Engine {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "memory" => Ok(Engine::Memory),
            "redis" => Ok(Engine::Redis),
            other => Err(format!("expected memory or redis, got {other:?}")),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    pub engine: Engine,
    /// `redis://[user[:password]@]host[:port][/db]` (`REDIS_URL`).
    pub redis_url: String,
    /// Prefix of every key and channel ringgate uses, so several deployments can share a Redis.
    pub key_prefix: String,
    /// Seconds to open a connection to Redis and say hello.
    pub connect_timeout: f64,
    /// Seconds Redis may take to answer a command before the connection is dropped and made
    /// again.
    pub command_timeout: f64,
    /// Commands awaiting Redis's answer, per shard; past it publishes fail with `unavailable`.
    pub max_pending: usize,
    /// Longest wait between reconnection attempts, in seconds (the wait doubles from 0.1 s).
    pub reconnect_max_delay: f64,
    /// `/readyz` answers 503 while a shard has no connection to Redis.
    pub ready_requires_redis: bool,
    /// Seconds after a node's last heartbeat (sent every third of it) that its presence
    /// members are removed, with a `leave` each, by another node.
    pub presence_ttl: f64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            engine: Engine::Memory,
            redis_url: "redis://127.0.0.1:6379".into(),
            key_prefix: "ringgate:".into(),
            connect_timeout: 2.0,
            command_timeout: 2.0,
            max_pending: 10_000,
            reconnect_max_delay: 5.0,
            ready_requires_redis: true,
            presence_ttl: 15.0,
        }
    }
}

/// Where and how to connect, from `redis_url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisTarget {
    /// `host:port`, resolved at each connection attempt.
    pub addr: String,
    pub user: Option<String>,
    pub password: Option<String>,
    pub db: u32,
}

impl ClusterConfig {
    pub fn is_redis(&self) -> bool {
        self.engine == Engine::Redis
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, reason: String| Err(ConfigError::Invalid { key, reason });
        for (key, v) in [
            ("cluster.connect_timeout", self.connect_timeout),
            ("cluster.command_timeout", self.command_timeout),
            ("cluster.reconnect_max_delay", self.reconnect_max_delay),
        ] {
            if !v.is_finite() || v <= 0.0 || v > 3600.0 {
                return invalid(key, format!("{v} is not a number of seconds in (0, 3600]"));
            }
        }
        // Heartbeats go out on the hub's once-a-second sweep: a shorter TTL would lapse.
        if !(2.0..=3600.0).contains(&self.presence_ttl) {
            return invalid(
                "cluster.presence_ttl",
                format!(
                    "{} is not a number of seconds in [2, 3600]",
                    self.presence_ttl
                ),
            );
        }
        if self.max_pending == 0 {
            return invalid("cluster.max_pending", "must be at least 1".into());
        }
        if let Err(reason) = self.target() {
            return invalid("cluster.redis_url", reason);
        }
        Ok(())
    }

    /// Parses `redis_url`.
    pub fn target(&self) -> Result<RedisTarget, String> {
        let url = self.redis_url.trim();
        let rest = match url.split_once("://") {
            Some(("redis", rest)) => rest,
            Some(("rediss", _)) => {
                return Err(format!(
                    "{url:?}: TLS to Redis (rediss://) is not supported yet; use redis:// on a \
                     private network or a TLS tunnel"
                ))
            }
            _ => return Err(format!("{url:?} is not a redis:// URL")),
        };
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((auth, rest)) => (Some(auth), rest),
            None => (None, rest),
        };
        let (hostport, db) = match rest.split_once('/') {
            Some((h, "")) => (h, 0),
            Some((h, db)) => (
                h,
                db.parse()
                    .map_err(|_| format!("{url:?}: database {db:?} is not a number"))?,
            ),
            None => (rest, 0),
        };
        if hostport.is_empty() {
            return Err(format!("{url:?} has no host"));
        }
        let addr = if hostport
            .rsplit_once(':')
            .is_some_and(|(_, p)| !p.contains(']'))
        {
            hostport.to_string()
        } else {
            format!("{hostport}:6379")
        };
        let (user, password) = match auth {
            None => (None, None),
            Some(a) => match a.split_once(':') {
                Some((u, p)) => ((!u.is_empty()).then(|| u.to_string()), Some(p.to_string())),
                None => (Some(a.to_string()), None),
            },
        };
        Ok(RedisTarget {
            addr,
            user,
            password,
            db,
        })
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.connect_timeout)
    }

    pub fn command_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.command_timeout)
    }

    pub fn presence_ttl(&self) -> Duration {
        Duration::from_secs_f64(self.presence_ttl)
    }

    pub fn reconnect_max_delay(&self) -> Duration {
        Duration::from_secs_f64(self.reconnect_max_delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(url: &str) -> Result<RedisTarget, String> {
        ClusterConfig {
            redis_url: url.into(),
            ..ClusterConfig::default()
        }
        .target()
    }

    #[test]
    fn urls_give_address_credentials_and_database() {
        let t = target("redis://127.0.0.1:6380").expect("valid");
        assert_eq!(
            (t.addr.as_str(), t.user, t.password, t.db),
            ("127.0.0.1:6380", None, None, 0)
        );
        let t = target("redis://:secret@localhost/3").expect("valid");
        assert_eq!(
            (t.addr.as_str(), t.user, t.password.as_deref(), t.db),
            ("localhost:6379", None, Some("secret"), 3)
        );
        let t = target("redis://app:p@ss@[::1]:7000/").expect("valid");
        assert_eq!(
            (t.addr.as_str(), t.user.as_deref(), t.password.as_deref()),
            ("[::1]:7000", Some("app"), Some("p@ss"))
        );
        assert_eq!(target("redis://[::1]").expect("valid").addr, "[::1]:6379");
    }

    #[test]
    fn bad_urls_say_why() {
        for (url, says) in [
            ("http://x", "not a redis:// URL"),
            ("rediss://x", "not supported yet"),
            ("redis://", "no host"),
            ("redis://x/db", "not a number"),
        ] {
            let e = target(url).expect_err(url);
            assert!(e.contains(says), "{url}: {e}");
        }
    }

    #[test]
    fn presence_ttl_leaves_room_for_heartbeats() {
        let with = |presence_ttl| ClusterConfig {
            presence_ttl,
            ..ClusterConfig::default()
        };
        for bad in [1.0, 0.0, -3.0, f64::NAN, 3601.0] {
            let e = with(bad).validate().expect_err("refused").to_string();
            assert!(e.contains("cluster.presence_ttl"), "{bad}: {e}");
        }
        assert!(with(2.0).validate().is_ok());
    }
}
