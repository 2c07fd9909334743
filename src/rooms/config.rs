//! The `[rooms]` table: history, presence, limits, the publish API key.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoomsConfig {
    /// Serve `/ws` and the `/api/*` endpoints.
    pub enabled: bool,
    /// Messages kept per topic for `history` and recovery; 0 keeps none.
    pub history_size: usize,
    /// Seconds a message stays in history.
    pub history_ttl: f64,
    /// Bytes of history all topics together may hold (split evenly over the shards); the
    /// oldest messages go first when it is full.
    pub history_max_bytes: usize,
    /// Send `join`/`leave` events to subscribers.
    pub presence_events: bool,
    /// Topics starting with one of these never emit `join`/`leave`.
    pub presence_events_off: Vec<String>,
    /// Rooms with more members than this stop emitting `join`/`leave` (they would dwarf the
    /// room's own traffic); presence queries still work.
    pub presence_events_max_members: usize,
    /// Topics one connection may subscribe to at once.
    pub max_topics_per_connection: usize,
    /// Longest topic name, in bytes.
    pub max_topic_length: usize,
    /// Largest `data` of a publish, in bytes of JSON.
    pub max_data_size: usize,
    /// Largest WebSocket message a `/ws` client may send (1009 beyond); at most the top-level
    /// `max_message_size`.
    pub max_message_size: usize,
    /// Publishes per second one connection may make (token bucket refill rate); 0 = no limit.
    pub publish_rate: f64,
    /// Publishes one connection may make in a burst (bucket size).
    pub publish_burst: f64,
    /// Other requests (subscribe, unsubscribe, presence, history, ping) per second one
    /// connection may make; 0 = no limit.
    pub request_rate: f64,
    /// Other requests one connection may make in a burst.
    pub request_burst: f64,
    /// Bearer key every `/api/*` request needs. Unset: `/api/*` is served only on admin and
    /// loopback listeners.
    pub api_key: Option<String>,
    /// Let `POST /api/publish` send the server's own message types (`join`, `leave`, …).
    pub api_reserved_types: bool,
    /// Seconds a room message may wait before its subscribers' writes start, so that each write
    /// carries the messages of that whole window (CPU for latency at high fan-out); 0 = write
    /// on the next loop turn.
    pub write_delay: f64,
    /// Rooms messages from other shards queued for one shard before requests that would add to
    /// its queue are answered `overloaded`; bounds the memory a shard that falls behind costs.
    pub max_shard_backlog: usize,
    /// Answer a `/ws` client's permessage-deflate offer with `server_no_context_takeover`
    /// even when `[compression] broadcast_friendly` is off (RFC 7692 lets the server add it):
    /// a room message is then compressed once for every such subscriber (bench/COMPRESS_ONCE.md).
    pub compress_once: bool,
    /// `[[rooms.topic]]`: defaults per topic-name prefix (the longest matching prefix wins).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub topic: Vec<TopicRule>,
}

/// `[[rooms.topic]]`: how the topics whose names start with `prefix` are delivered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicRule {
    pub prefix: String,
    /// Publishes are volatile unless they say otherwise: delivered to current subscribers
    /// only, without seq or history.
    #[serde(default)]
    pub volatile: bool,
    /// Seconds: at most one delivery per interval (per `conflate_key` value), the latest value
    /// wins; 0 = every publish is delivered.
    #[serde(default)]
    pub conflate: f64,
    /// A top-level field of `data` whose values conflate separately (each keeps its latest).
    #[serde(default)]
    pub conflate_key: Option<String>,
    /// Overrides `[rooms] write_delay` for these topics (0: write at once).
    #[serde(default)]
    pub write_delay: Option<f64>,
    /// Messages are opaque bytes in binary frames (the binary envelope of docs/PROTOCOL.md),
    /// relayed without interpretation.
    #[serde(default)]
    pub binary: bool,
}

impl TopicRule {
    /// A rule for `prefix` that changes nothing (every key at its default).
    pub fn for_prefix(prefix: &str) -> TopicRule {
        TopicRule {
            prefix: prefix.into(),
            volatile: false,
            conflate: 0.0,
            conflate_key: None,
            write_delay: None,
            binary: false,
        }
    }

    /// The conflation interval, when these topics conflate.
    pub fn conflate(&self) -> Option<Duration> {
        (self.conflate > 0.0).then(|| Duration::from_secs_f64(self.conflate))
    }
}

impl Default for RoomsConfig {
    fn default() -> Self {
        RoomsConfig {
            enabled: true,
            history_size: 100,
            history_ttl: 300.0,
            history_max_bytes: 64 << 20,
            presence_events: true,
            presence_events_off: Vec::new(),
            presence_events_max_members: 1000,
            max_topics_per_connection: 100,
            max_topic_length: 128,
            max_data_size: 64 * 1024,
            max_message_size: 128 * 1024,
            publish_rate: 50.0,
            publish_burst: 100.0,
            request_rate: 20.0,
            request_burst: 200.0,
            api_key: None,
            api_reserved_types: false,
            write_delay: 0.0,
            max_shard_backlog: 65_536,
            compress_once: true,
            topic: Vec::new(),
        }
    }
}

/// Longer than this is an outage, not a delay.
const MAX_WRITE_DELAY: f64 = 1.0;
/// Longest binary topic name: the envelope gives it one length byte.
pub const MAX_BINARY_TOPIC: usize = 255;
/// A longer conflation interval is a polling period, not a throttle.
const MAX_CONFLATE: f64 = 60.0;

impl RoomsConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, reason: String| Err(ConfigError::Invalid { key, reason });
        if !self.history_ttl.is_finite() || self.history_ttl <= 0.0 {
            return invalid(
                "rooms.history_ttl",
                format!("{} is not a positive number of seconds", self.history_ttl),
            );
        }
        if !self.publish_rate.is_finite() || self.publish_rate < 0.0 {
            return invalid(
                "rooms.publish_rate",
                format!("{} is not a rate (0 = unlimited)", self.publish_rate),
            );
        }
        if self.publish_rate > 0.0 && !(self.publish_burst >= 1.0 && self.publish_burst.is_finite())
        {
            return invalid(
                "rooms.publish_burst",
                format!("{} must be at least 1", self.publish_burst),
            );
        }
        if !self.request_rate.is_finite() || self.request_rate < 0.0 {
            return invalid(
                "rooms.request_rate",
                format!("{} is not a rate (0 = unlimited)", self.request_rate),
            );
        }
        if self.request_rate > 0.0 && !(self.request_burst >= 1.0 && self.request_burst.is_finite())
        {
            return invalid(
                "rooms.request_burst",
                format!("{} must be at least 1", self.request_burst),
            );
        }
        if self.max_topic_length == 0 || self.max_topics_per_connection == 0 {
            return invalid(
                "rooms.max_topic_length",
                "topic limits must be above 0".into(),
            );
        }
        if !(0.0..=MAX_WRITE_DELAY).contains(&self.write_delay) {
            return invalid(
                "rooms.write_delay",
                format!(
                    "{} is not between 0 and {MAX_WRITE_DELAY} seconds",
                    self.write_delay
                ),
            );
        }
        let envelope = self.max_data_size + self.max_topic_length + 1024;
        if self.max_message_size < envelope {
            return invalid(
                "rooms.max_message_size",
                format!(
                    "{} cannot carry a publish of max_data_size ({}); at least {envelope}",
                    self.max_message_size, self.max_data_size
                ),
            );
        }
        if self.max_shard_backlog < 2 {
            return invalid(
                "rooms.max_shard_backlog",
                format!("{} is too small; at least 2", self.max_shard_backlog),
            );
        }
        if self.api_key.as_deref() == Some("") {
            return invalid("rooms.api_key", "must not be empty".into());
        }
        for (i, rule) in self.topic.iter().enumerate() {
            let at = |what: String| format!("[[rooms.topic]] {} ({i}): {what}", rule.prefix);
            if self.topic[..i].iter().any(|r| r.prefix == rule.prefix) {
                return invalid("rooms.topic.prefix", at("the prefix is repeated".into()));
            }
            if !(0.0..=MAX_CONFLATE).contains(&rule.conflate) {
                return invalid(
                    "rooms.topic.conflate",
                    at(format!(
                        "{} is not between 0 and {MAX_CONFLATE} seconds",
                        rule.conflate
                    )),
                );
            }
            if rule.conflate_key.as_deref() == Some("") {
                return invalid("rooms.topic.conflate_key", at("must not be empty".into()));
            }
            if rule.conflate_key.is_some() && rule.binary {
                return invalid(
                    "rooms.topic.conflate_key",
                    at("a binary topic has no fields to key by".into()),
                );
            }
            if rule.binary && rule.prefix.len() > MAX_BINARY_TOPIC {
                return invalid(
                    "rooms.topic.prefix",
                    at(format!(
                        "a binary topic is at most {MAX_BINARY_TOPIC} bytes"
                    )),
                );
            }
            if rule.conflate_key.is_some() && rule.conflate == 0.0 {
                return invalid(
                    "rooms.topic.conflate_key",
                    at("needs conflate above 0".into()),
                );
            }
            if let Some(wd) = rule.write_delay {
                if !(0.0..=MAX_WRITE_DELAY).contains(&wd) {
                    return invalid(
                        "rooms.topic.write_delay",
                        at(format!(
                            "{wd} is not between 0 and {MAX_WRITE_DELAY} seconds"
                        )),
                    );
                }
            }
        }
        Ok(())
    }

    /// How long room messages wait for their writes, when they wait at all.
    pub fn write_delay(&self) -> Option<Duration> {
        (self.write_delay > 0.0).then(|| Duration::from_secs_f64(self.write_delay))
    }

    /// The `[[rooms.topic]]` rule for `topic`: the one with the longest matching prefix.
    pub fn rule_for(&self, topic: &str) -> Option<&TopicRule> {
        self.topic
            .iter()
            .filter(|r| topic.starts_with(r.prefix.as_str()))
            .max_by_key(|r| r.prefix.len())
    }

    /// How long `topic`'s messages wait for their writes: its rule's `write_delay`, else
    /// `[rooms] write_delay`.
    pub fn write_delay_for(&self, topic: &str) -> Option<Duration> {
        match self.rule_for(topic).and_then(|r| r.write_delay) {
            Some(wd) => (wd > 0.0).then(|| Duration::from_secs_f64(wd)),
            None => self.write_delay(),
        }
    }

    /// Whether `topic` is binary (`[[rooms.topic]] binary`).
    pub fn is_binary(&self, topic: &str) -> bool {
        self.rule_for(topic).is_some_and(|r| r.binary)
    }

    /// Whether the shards need the hub's timer (a write delay or conflation anywhere).
    pub fn uses_timer(&self) -> bool {
        self.write_delay > 0.0
            || self
                .topic
                .iter()
                .any(|r| r.conflate > 0.0 || r.write_delay.is_some_and(|wd| wd > 0.0))
    }

    /// Whether `topic` emits `join`/`leave` with `members` members.
    pub fn presence_events_for(&self, topic: &str, members: usize) -> bool {
        self.presence_events
            && members <= self.presence_events_max_members
            && !self
                .presence_events_off
                .iter()
                .any(|p| topic.starts_with(p.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presence_event_switches() {
        let r = RoomsConfig {
            presence_events_off: vec!["ticker.".into()],
            presence_events_max_members: 2,
            ..RoomsConfig::default()
        };
        assert!(r.presence_events_for("chat", 2));
        assert!(!r.presence_events_for("chat", 3));
        assert!(!r.presence_events_for("ticker.btc", 1));
        let off = RoomsConfig {
            presence_events: false,
            ..RoomsConfig::default()
        };
        assert!(!off.presence_events_for("chat", 1));
    }

    #[test]
    fn validation() {
        assert!(RoomsConfig::default().validate().is_ok());
        let bad = RoomsConfig {
            history_ttl: 0.0,
            ..RoomsConfig::default()
        };
        assert!(bad.validate().is_err());
        let bad = RoomsConfig {
            publish_burst: 0.5,
            ..RoomsConfig::default()
        };
        assert!(bad.validate().is_err());
        for wd in [-0.1, 1.5, f64::NAN] {
            let bad = RoomsConfig {
                write_delay: wd,
                ..RoomsConfig::default()
            };
            assert!(bad.validate().is_err(), "{wd}");
        }
        let ok = RoomsConfig {
            write_delay: 0.2,
            ..RoomsConfig::default()
        };
        assert!(ok.validate().is_ok());
        assert_eq!(
            ok.write_delay(),
            Some(std::time::Duration::from_millis(200))
        );
        assert_eq!(RoomsConfig::default().write_delay(), None);
    }

    fn rule(prefix: &str) -> TopicRule {
        TopicRule::for_prefix(prefix)
    }

    #[test]
    fn topic_rules_as_written_and_the_longest_prefix_wins() {
        let toml = r#"
            write_delay = 0.05
            [[topic]]
            prefix = "ticker."
            conflate = 0.1     # seconds
            volatile = true
            [[topic]]
            prefix = "ticker.fx."
            conflate = 0.5
            conflate_key = "pair"
            [[topic]]
            prefix = "chat."
            write_delay = 0
        "#;
        let r: RoomsConfig = toml::from_str(toml).expect("parses");
        assert!(r.validate().is_ok());
        let t = r.rule_for("ticker.btc").expect("rule");
        assert!(t.volatile);
        assert_eq!(t.conflate(), Some(Duration::from_millis(100)));
        let fx = r.rule_for("ticker.fx.eur").expect("rule");
        assert_eq!(fx.conflate_key.as_deref(), Some("pair"));
        assert!(!fx.volatile, "rules do not inherit from shorter prefixes");
        assert!(r.rule_for("other").is_none());
        // Chat is instant, the rest takes the global delay.
        assert_eq!(r.write_delay_for("chat.1"), None);
        assert_eq!(
            r.write_delay_for("ticker.btc"),
            Some(Duration::from_millis(50))
        );
        assert!(r.uses_timer());
        assert!(!RoomsConfig::default().uses_timer());
    }

    #[test]
    fn topic_rules_survive_check_config_output() {
        let c = RoomsConfig {
            topic: vec![
                TopicRule {
                    conflate: 0.1,
                    conflate_key: Some("k".into()),
                    ..rule("a.")
                },
                TopicRule {
                    write_delay: Some(0.0),
                    volatile: true,
                    ..rule("b.")
                },
            ],
            ..RoomsConfig::default()
        };
        let text = toml::to_string(&c).expect("serialises");
        assert_eq!(toml::from_str::<RoomsConfig>(&text).expect(&text), c);
    }

    #[test]
    fn bad_topic_rules_name_their_key() {
        let bad = |f: fn(&mut TopicRule)| {
            let mut t = rule("x.");
            f(&mut t);
            let c = RoomsConfig {
                topic: vec![t],
                ..RoomsConfig::default()
            };
            match c.validate() {
                Err(ConfigError::Invalid { key, .. }) => key,
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(bad(|t| t.conflate = -1.0), "rooms.topic.conflate");
        assert_eq!(bad(|t| t.conflate = f64::NAN), "rooms.topic.conflate");
        assert_eq!(
            bad(|t| t.conflate_key = Some("k".into())),
            "rooms.topic.conflate_key"
        );
        assert_eq!(
            bad(|t| t.write_delay = Some(2.0)),
            "rooms.topic.write_delay"
        );
        let twice = RoomsConfig {
            topic: vec![rule("a"), rule("a")],
            ..RoomsConfig::default()
        };
        assert!(twice.validate().is_err());
    }
}
