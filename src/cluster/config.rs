//! The `[cluster]` table: which engine carries the rooms, and how to reach Redis.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
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
    /// `redis://[user[:password]@]host[:port][/db]`, `rediss://…` (TLS),
    /// `redis+sentinel://[user[:password]@]host[:port][,host[:port]…]/master[/db]` or
    /// `redis+cluster://[user[:password]@]host[:port][,host[:port]…]` (Redis Cluster, its
    /// nodes to ask for the slot map); `rediss+sentinel://` and `rediss+cluster://` with TLS
    /// to every server (`REDIS_URL`).
    pub redis_url: String,
    /// PEM certificates trusted for `rediss://`, besides the public roots (`REDIS_CA_FILE`).
    pub redis_ca_file: Option<PathBuf>,
    /// The sentinels' password (`requirepass` in sentinel.conf), when they have one.
    pub sentinel_password: Option<String>,
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
            redis_ca_file: None,
            sentinel_password: None,
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
    pub endpoint: Endpoint,
    /// `rediss://`: TLS, the server's certificate checked against `host`.
    pub tls: bool,
    pub user: Option<String>,
    pub password: Option<String>,
    pub db: u32,
}

/// Which Redis to connect to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `host:port`, resolved at each connection attempt.
    Direct(String),
    /// Asks these sentinels (`host:port`, in turn) for the address of the master `name` at
    /// each connection attempt, so a failover is followed by the next reconnection.
    Sentinel {
        sentinels: Vec<String>,
        name: String,
    },
    /// A Redis Cluster: these nodes (`host:port`) are asked in turn for the slot map at each
    /// connection attempt; commands go to each slot's master.
    Cluster { seeds: Vec<String> },
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
        let target = match self.target() {
            Ok(t) => t,
            Err(reason) => return invalid("cluster.redis_url", reason),
        };
        if let Some(path) = &self.redis_ca_file {
            if !target.tls {
                return invalid(
                    "cluster.redis_ca_file",
                    "set, but redis_url is not rediss://".into(),
                );
            }
            if let Err(e) = std::fs::metadata(path) {
                return invalid("cluster.redis_ca_file", format!("{}: {e}", path.display()));
            }
        }
        Ok(())
    }

    /// Parses `redis_url`.
    pub fn target(&self) -> Result<RedisTarget, String> {
        let url = self.redis_url.trim();
        let (tls, sentinel, cluster, rest) = match url.split_once("://") {
            Some(("redis", rest)) => (false, false, false, rest),
            Some(("rediss", rest)) => (true, false, false, rest),
            Some(("redis+sentinel", rest)) => (false, true, false, rest),
            Some(("rediss+sentinel", rest)) => (true, true, false, rest),
            Some(("redis+cluster", rest)) => (false, false, true, rest),
            Some(("rediss+cluster", rest)) => (true, false, true, rest),
            _ => {
                return Err(format!(
                    "{url:?} is not a redis://, rediss://, redis+sentinel:// or \
                     redis+cluster:// URL"
                ))
            }
        };
        let (auth, rest) = match rest.rsplit_once('@') {
            Some((auth, rest)) => (Some(auth), rest),
            None => (None, rest),
        };
        let (hosts, path) = rest.split_once('/').unwrap_or((rest, ""));
        let mut path = path.split('/').filter(|p| !p.is_empty());
        // A sentinel URL names the master first: `/name[/db]`.
        let name =
            match sentinel {
                true => Some(path.next().ok_or_else(|| {
                    format!("{url:?} names no master (redis+sentinel://host/name)")
                })?),
                false => None,
            };
        let db = match path.next() {
            None => 0,
            Some(db) => db
                .parse()
                .map_err(|_| format!("{url:?}: database {db:?} is not a number"))?,
        };
        if let Some(extra) = path.next() {
            return Err(format!("{url:?}: unexpected {extra:?} after the database"));
        }
        let port = if sentinel { 26379 } else { 6379 };
        let addrs = hosts
            .split(',')
            .map(|h| with_port(h, port).ok_or_else(|| format!("{url:?} has no host")))
            .collect::<Result<Vec<_>, _>>()?;
        let endpoint = match name {
            Some(name) => Endpoint::Sentinel {
                sentinels: addrs,
                name: name.to_string(),
            },
            // Redis Cluster has database 0 only.
            None if cluster && db != 0 => {
                return Err(format!("{url:?}: Redis Cluster has no database {db}"))
            }
            None if cluster => Endpoint::Cluster { seeds: addrs },
            None => match &addrs[..] {
                [one] => Endpoint::Direct(one.clone()),
                _ => {
                    return Err(format!(
                        "{url:?}: one host only (a list of hosts is for redis+sentinel:// \
                         and redis+cluster://)"
                    ))
                }
            },
        };
        let (user, password) = match auth {
            None => (None, None),
            Some(a) => match a.split_once(':') {
                Some((u, p)) => ((!u.is_empty()).then(|| u.to_string()), Some(p.to_string())),
                None => (Some(a.to_string()), None),
            },
        };
        Ok(RedisTarget {
            endpoint,
            tls,
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

/// Names where the link connects, for the log (never the credentials).
impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Direct(addr) => f.write_str(addr),
            Endpoint::Sentinel { sentinels, name } => {
                write!(f, "master {name:?} of sentinels {}", sentinels.join(","))
            }
            Endpoint::Cluster { seeds } => write!(f, "Redis Cluster of {}", seeds.join(",")),
        }
    }
}

/// `host:port`, with `port` when `hostport` has none; `None` when there is no host.
fn with_port(hostport: &str, port: u16) -> Option<String> {
    if hostport.is_empty() || hostport.starts_with(':') {
        return None;
    }
    Some(
        match hostport
            .rsplit_once(':')
            .is_some_and(|(_, p)| !p.contains(']'))
        {
            true => hostport.to_string(),
            false => format!("{hostport}:{port}"),
        },
    )
}

/// The host of `host:port`, without the brackets of an IPv6 address: the name a TLS
/// certificate is checked against.
pub fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
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

    fn direct(t: &RedisTarget) -> &str {
        match &t.endpoint {
            Endpoint::Direct(a) => a,
            other => panic!("not direct: {other:?}"),
        }
    }

    #[test]
    fn urls_give_address_credentials_and_database() {
        let t = target("redis://127.0.0.1:6380").expect("valid");
        assert_eq!(
            (
                direct(&t),
                t.tls,
                t.user.as_deref(),
                t.password.as_deref(),
                t.db
            ),
            ("127.0.0.1:6380", false, None, None, 0)
        );
        let t = target("redis://:secret@localhost/3").expect("valid");
        assert_eq!(
            (direct(&t), t.user.as_deref(), t.password.as_deref(), t.db),
            ("localhost:6379", None, Some("secret"), 3)
        );
        let t = target("rediss://app:p@ss@[::1]:7000/").expect("valid");
        assert_eq!(
            (direct(&t), t.tls, t.user.as_deref(), t.password.as_deref()),
            ("[::1]:7000", true, Some("app"), Some("p@ss"))
        );
        assert_eq!(
            direct(&target("redis://[::1]").expect("valid")),
            "[::1]:6379"
        );
        assert_eq!(
            (host_of("[::1]:7000"), host_of("db.local:6379")),
            ("::1", "db.local")
        );
    }

    #[test]
    fn sentinel_urls_list_the_sentinels_then_name_the_master() {
        let t = target("redis+sentinel://:pw@10.0.0.1,10.0.0.2:5000/main/2").expect("valid");
        assert_eq!(
            t.endpoint,
            Endpoint::Sentinel {
                sentinels: vec!["10.0.0.1:26379".into(), "10.0.0.2:5000".into()],
                name: "main".into()
            }
        );
        assert_eq!((t.password.as_deref(), t.db, t.tls), (Some("pw"), 2, false));
        let t = target("rediss+sentinel://10.0.0.1/main").expect("valid");
        assert!(t.tls, "TLS to the sentinels and the master");
    }

    #[test]
    fn cluster_urls_list_the_nodes_to_ask_for_the_slot_map() {
        let t = target("rediss+cluster://app:pw@10.0.0.1:7000,10.0.0.2,[::1]:7002/").expect("ok");
        assert_eq!(
            t.endpoint,
            Endpoint::Cluster {
                seeds: vec![
                    "10.0.0.1:7000".into(),
                    "10.0.0.2:6379".into(),
                    "[::1]:7002".into()
                ]
            }
        );
        assert_eq!(
            (t.tls, t.user.as_deref(), t.password.as_deref()),
            (true, Some("app"), Some("pw"))
        );
        let t = target("redis+cluster://h1:7000").expect("one seed is enough");
        assert!(!t.tls);
        let e = target("redis+cluster://h1,h2/1").expect_err("database");
        assert!(e.contains("no database 1"), "{e}");
    }

    #[test]
    fn bad_urls_say_why() {
        for (url, says) in [
            ("http://x", "not a redis://"),
            ("redis://", "no host"),
            ("redis://a,,b", "no host"),
            ("redis://x/db", "not a number"),
            ("redis://x/1/2", "unexpected"),
            ("redis://a,b", "one host only"),
            ("redis+sentinel://a:26379", "names no master"),
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

    #[test]
    fn a_ca_file_needs_tls_and_must_exist() {
        let c = |url: &str, ca: &str| ClusterConfig {
            engine: Engine::Redis,
            redis_url: url.into(),
            redis_ca_file: Some(ca.into()),
            ..ClusterConfig::default()
        };
        let e = c("redis://x", "/").validate().expect_err("plain");
        assert!(e.to_string().contains("not rediss://"), "{e}");
        let e = c("rediss://x", "/no/such/ca.pem")
            .validate()
            .expect_err("missing");
        assert!(e.to_string().contains("/no/such/ca.pem"), "{e}");
        assert!(c("rediss://x", "/").validate().is_ok());
    }
}
