//! The `[rooms]` table: history, presence, limits, the publish API key.

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
        }
    }
}

/// Longer than this is an outage, not a delay.
const MAX_WRITE_DELAY: f64 = 1.0;

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
        Ok(())
    }

    /// How long room messages wait for their writes, when they wait at all.
    pub fn write_delay(&self) -> Option<std::time::Duration> {
        (self.write_delay > 0.0).then(|| std::time::Duration::from_secs_f64(self.write_delay))
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
}
