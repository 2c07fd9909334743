//! The Redis engine of the rooms (`[cluster] engine = "redis"`, docs/CLUSTER.md): what ringgate
//! stores in Redis and how, as plain types ([`Keys`] builds commands and reads their answers),
//! and the connection that carries them ([`link`]).
//!
//! Per topic Redis holds a hash (`e`: the epoch, `s`: the last seq) and a list (the history,
//! `seq \n wall-ms \n message` per entry, trimmed to `history_size`), and a channel carries
//! `epoch \n seq \n message` for every publish. One Lua script per publish assigns the seq,
//! appends to history and publishes, atomically: the channel's order is the seq order on every
//! node. Another script reads a topic's epoch, seq and history, creating the epoch when the
//! topic has none (so an epoch changes only when Redis really lost the topic's state).
//!
//! Each shard holds one RESP3 connection, which carries its commands and the pub/sub messages
//! of the topics it is home to. Because both travel one connection, a `SUBSCRIBE` followed by a
//! read of the history is exact: every message the read does not cover arrives as a push after
//! the read's answer, and every push before the answer is covered by it.

pub mod config;
pub mod link;
pub mod resp;

use std::sync::Arc;

use bytes::Bytes;
use sha1::{Digest, Sha1};

pub use resp::Value;

/// What the hub asks of Redis.
#[derive(Debug)]
pub struct Command {
    /// Who gets the answer; `None` for commands answered by a push (`SUBSCRIBE`,
    /// `UNSUBSCRIBE`).
    pub tag: Option<Tag>,
    /// The command, RESP-encoded.
    pub bytes: Vec<u8>,
}

/// Names a command's answer for the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tag {
    /// A publish; the number is the hub's.
    Publish(u64),
    /// The read of a topic's state after subscribing to it.
    Sync(Arc<str>),
}

/// What the link tells the hub.
#[derive(Debug)]
pub enum Event {
    /// Connected (again): nothing is subscribed on the new connection.
    Up,
    /// The connection is gone, or could not be made; every command sent or queued before was
    /// answered with an error first.
    Down(String),
    /// The answer to a tagged command: Redis's value, or why there is none.
    Reply(Tag, Result<Value, String>),
    /// A pub/sub message.
    Message { channel: Bytes, payload: Bytes },
}

/// Seq, epoch and write time (ms since the Unix epoch) of one history entry, and the message.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub seq: u64,
    pub wall_ms: u64,
    pub msg: Bytes,
}

/// A topic's state in Redis.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub epoch: Arc<str>,
    pub seq: u64,
    /// Oldest first.
    pub history: Vec<Entry>,
}

/// A message from a topic's channel.
#[derive(Debug, Clone, PartialEq)]
pub struct Published {
    pub epoch: Arc<str>,
    pub seq: u64,
    pub msg: Bytes,
}

const PUBLISH: &str = r"
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[7]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 's', 0)
end
local seq = redis.call('HINCRBY', KEYS[1], 's', 1)
local msg = ARGV[2] .. seq .. ARGV[3]
local cap = tonumber(ARGV[5])
if cap > 0 then
  redis.call('RPUSH', KEYS[2], seq .. '\n' .. ARGV[4] .. '\n' .. msg)
  redis.call('LTRIM', KEYS[2], -cap, -1)
  redis.call('PEXPIRE', KEYS[2], ARGV[6])
end
redis.call('PEXPIRE', KEYS[1], ARGV[8])
redis.call('PUBLISH', ARGV[1], epoch .. '\n' .. seq .. '\n' .. msg)
return {seq, epoch}
";

const SYNC: &str = r"
local m = redis.call('HMGET', KEYS[1], 'e', 's')
if not m[1] then
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', ARGV[1], 's', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {0, ARGV[1], {}}
end
return {tonumber(m[2]), m[1], redis.call('LRANGE', KEYS[2], 0, -1)}
";

/// The scripts the link loads on every connection (so `EVALSHA` always finds them).
pub const SCRIPTS: &[&str] = &[PUBLISH, SYNC];

/// How long a topic's epoch and seq outlive its last publish: much longer than its history,
/// so that history running out is told apart from the topic's state being lost.
pub const META_TTL_MS: u64 = 24 * 3600 * 1000;

fn sha(script: &str) -> String {
    Sha1::digest(script.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Builds the commands of one deployment (its key prefix) and reads their answers.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    publish_sha: String,
    sync_sha: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_string(),
            publish_sha: sha(PUBLISH),
            sync_sha: sha(SYNC),
        }
    }

    fn key(&self, kind: &str, topic: &str) -> Vec<u8> {
        format!("{}{kind}:{topic}", self.prefix).into_bytes()
    }

    fn channel(&self, topic: &str) -> Vec<u8> {
        self.key("c", topic)
    }

    /// The topic a channel carries, when it is one of ours.
    pub fn topic_of<'a>(&self, channel: &'a [u8]) -> Option<&'a str> {
        let rest = channel.strip_prefix(self.prefix.as_bytes())?;
        std::str::from_utf8(rest.strip_prefix(b"c:")?).ok()
    }

    /// Publishes the message `head` + seq + `tail` (the seq is assigned by Redis), keeping at
    /// most `cap` messages for `ttl_ms`. `epoch` is the epoch to create if the topic has none.
    #[allow(clippy::too_many_arguments)]
    pub fn publish(
        &self,
        topic: &str,
        head: &str,
        tail: &str,
        wall_ms: u64,
        cap: usize,
        ttl_ms: u64,
        epoch: &str,
    ) -> Vec<u8> {
        let mut out = Vec::with_capacity(head.len() + tail.len() + 160);
        resp::command(
            &mut out,
            &[
                b"EVALSHA",
                self.publish_sha.as_bytes(),
                b"2",
                &self.key("s", topic),
                &self.key("h", topic),
                &self.channel(topic),
                head.as_bytes(),
                tail.as_bytes(),
                wall_ms.to_string().as_bytes(),
                cap.to_string().as_bytes(),
                ttl_ms.max(1).to_string().as_bytes(),
                epoch.as_bytes(),
                META_TTL_MS.to_string().as_bytes(),
            ],
        );
        out
    }

    /// Subscribes to `topic`, then reads its state ([`Keys::snapshot`] decodes the answer).
    pub fn follow(&self, topic: &str, epoch: &str) -> (Vec<u8>, Vec<u8>) {
        let mut sub = Vec::new();
        resp::command(&mut sub, &[b"SUBSCRIBE", &self.channel(topic)]);
        let mut read = Vec::new();
        resp::command(
            &mut read,
            &[
                b"EVALSHA",
                self.sync_sha.as_bytes(),
                b"2",
                &self.key("s", topic),
                &self.key("h", topic),
                epoch.as_bytes(),
                META_TTL_MS.to_string().as_bytes(),
            ],
        );
        (sub, read)
    }

    pub fn unfollow(&self, topic: &str) -> Vec<u8> {
        let mut out = Vec::new();
        resp::command(&mut out, &[b"UNSUBSCRIBE", &self.channel(topic)]);
        out
    }

    /// The publish script's answer: the seq.
    pub fn published(v: &Value) -> Result<u64, String> {
        match v {
            Value::Array(a) => a
                .first()
                .and_then(Value::as_int)
                .and_then(|s| u64::try_from(s).ok())
                .ok_or_else(|| format!("unexpected publish answer {v:?}")),
            Value::Error(e) => Err(e.clone()),
            _ => Err(format!("unexpected publish answer {v:?}")),
        }
    }

    /// The read script's answer.
    pub fn snapshot(v: &Value) -> Result<Snapshot, String> {
        let bad = || format!("unexpected read answer {v:?}");
        let Value::Array(a) = v else {
            return Err(match v {
                Value::Error(e) => e.clone(),
                _ => bad(),
            });
        };
        let [seq, epoch, history] = &a[..] else {
            return Err(bad());
        };
        let seq = seq
            .as_int()
            .and_then(|s| u64::try_from(s).ok())
            .ok_or_else(bad)?;
        let epoch = epoch
            .as_bytes()
            .and_then(|e| std::str::from_utf8(e).ok())
            .ok_or_else(bad)?;
        let history = match history {
            Value::Array(items) => items.iter().filter_map(|i| entry(i.as_bytes()?)).collect(),
            Value::Nil => Vec::new(),
            _ => return Err(bad()),
        };
        Ok(Snapshot {
            epoch: epoch.into(),
            seq,
            history,
        })
    }

    /// A channel message; `None` when it is not one ringgate wrote.
    pub fn message(payload: &Bytes) -> Option<Published> {
        let (epoch, rest) = split_line(payload)?;
        let (seq, msg) = split_line(&rest)?;
        Some(Published {
            epoch: std::str::from_utf8(&epoch).ok()?.into(),
            seq: std::str::from_utf8(&seq).ok()?.parse().ok()?,
            msg,
        })
    }
}

/// `seq \n wall-ms \n message`.
fn entry(b: &[u8]) -> Option<Entry> {
    let b = Bytes::copy_from_slice(b);
    let (seq, rest) = split_line(&b)?;
    let (wall, msg) = split_line(&rest)?;
    Some(Entry {
        seq: std::str::from_utf8(&seq).ok()?.parse().ok()?,
        wall_ms: std::str::from_utf8(&wall).ok()?.parse().ok()?,
        msg,
    })
}

/// The bytes before the first `\n` and those after it.
fn split_line(b: &Bytes) -> Option<(Bytes, Bytes)> {
    let i = b.iter().position(|&c| c == b'\n')?;
    Some((b.slice(..i), b.slice(i + 1..)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(x: &str) -> Value {
        Value::Str(Bytes::copy_from_slice(x.as_bytes()))
    }

    #[test]
    fn channels_name_their_topic_and_nothing_else() {
        let k = Keys::new("rg:");
        assert_eq!(k.topic_of(&k.channel("a:b")), Some("a:b"));
        assert_eq!(k.topic_of(b"rg:h:a"), None);
        assert_eq!(k.topic_of(b"other:c:a"), None);
    }

    #[test]
    fn answers_decode_and_foreign_messages_are_refused() {
        let v = Value::Array(vec![
            Value::Int(3),
            s("ep"),
            Value::Array(vec![
                s("2\n1700\n{\"a\":\n1}"),
                s("garbage"),
                s("3\n1701\n{}"),
            ]),
        ]);
        let snap = Keys::snapshot(&v).expect("snapshot");
        assert_eq!((snap.seq, &*snap.epoch), (3, "ep"));
        let seqs: Vec<_> = snap.history.iter().map(|e| (e.seq, e.wall_ms)).collect();
        assert_eq!(seqs, [(2, 1700), (3, 1701)]);
        assert_eq!(&snap.history[0].msg[..], b"{\"a\":\n1}");
        assert!(Keys::snapshot(&Value::Error("NOSCRIPT".into())).is_err());
        assert_eq!(
            Keys::published(&Value::Array(vec![Value::Int(9), s("e")])),
            Ok(9)
        );
        let m = Keys::message(&Bytes::from_static(b"ep\n12\n{\"x\":1}")).expect("ours");
        assert_eq!(
            (&*m.epoch, m.seq, &m.msg[..]),
            ("ep", 12, &b"{\"x\":1}"[..])
        );
        assert_eq!(Keys::message(&Bytes::from_static(b"hello")), None);
        assert_eq!(Keys::message(&Bytes::from_static(b"ep\nx\n{}")), None);
    }
}
