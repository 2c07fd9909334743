//! The Redis engine of the rooms (`[cluster] engine = "redis"`, docs/CLUSTER.md): what ringgate
//! stores in Redis and how, as plain types ([`Keys`] builds commands and reads their answers),
//! and the connection that carries them ([`link`]).
//!
//! Per topic Redis holds a hash (`e`: the epoch, `s`: the last seq), a list (the history,
//! `seq \n wall-ms \n message` per entry, trimmed to `history_size`) and a hash of presence
//! members (`owner:conn` → member JSON), and a channel carries, one per line then the rest:
//!
//! - `m`, epoch, seq, trace, message: a publish, in seq order. One Lua script per publish
//!   assigns the seq, appends to history and publishes, atomically: the channel's order is the
//!   seq order on every node;
//! - `v`, trace, message: a volatile publish (no seq, no history);
//! - `j` or `l`, `owner:conn`, member JSON: a presence member joined or left, published once
//!   by the script that changed the presence hash.
//!
//! Another script reads a topic's epoch, seq, history and members, creating the epoch when the
//! topic has none (so an epoch changes only when Redis really lost the topic's state). The
//! presence script heartbeats one owner (a shard of a node) in a sorted set of deadlines and
//! sweeps the owners past theirs, so a node that dies without a goodbye loses its members
//! within its `presence_ttl`. The users channel carries `u`, user, message and `d`, user, code
//! (user-directed delivery) to one shard of every node.
//!
//! Each shard holds one RESP3 connection, which carries its commands and the pub/sub messages
//! of the topics it is home to. Because both travel one connection, a `SUBSCRIBE` followed by a
//! read of the history is exact: every message the read does not cover arrives as a push after
//! the read's answer, and every push before the answer is covered by it.

pub mod config;
pub mod link;
pub mod resp;
pub mod slots;

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
    /// The hash slot of its keys (or channel): on Redis Cluster, it goes to that slot's
    /// master.
    pub slot: u16,
    /// `MOVED` and `ASK` redirections it followed (bounded by [`slots::MAX_REDIRECTS`]).
    pub redirects: u8,
}

impl Command {
    /// A command not yet redirected.
    pub fn new(tag: Option<Tag>, bytes: Vec<u8>, slot: u16) -> Command {
        Command {
            tag,
            bytes,
            slot,
            redirects: 0,
        }
    }
}

/// Names a command's answer for the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tag {
    /// A publish; the number is the hub's.
    Publish(u64),
    /// The read of a topic's state after subscribing to it.
    Sync(Arc<str>),
    /// A heartbeat (`None`) or a change to this shard's presence members in a topic
    /// ([`Keys::presence`]).
    Presence(Option<Arc<str>>),
    /// A message for the users channel: only an error matters.
    ToUsers,
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
    /// Redis ended the subscription to `channel` on its own: on Redis Cluster, its slot moved
    /// to another master. Following it again reaches the new one.
    Unsubscribed(Bytes),
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
    /// The topic's presence members, of every node.
    pub members: Vec<PresenceEntry>,
}

/// A presence member as Redis holds it: the shard that owns it (one shard of one node, see
/// [`Keys::presence`]), its connection there, and the member as JSON.
#[derive(Debug, Clone, PartialEq)]
pub struct PresenceEntry {
    pub owner: Arc<str>,
    pub conn: u64,
    pub json: Bytes,
}

/// What a topic's channel carries.
#[derive(Debug, Clone, PartialEq)]
pub enum Pushed {
    /// A message with its seq (it is in history too).
    Message {
        epoch: Arc<str>,
        seq: u64,
        trace: Option<Arc<str>>,
        msg: Bytes,
    },
    /// A volatile message: no seq, no history.
    Volatile { trace: Option<Arc<str>>, msg: Bytes },
    /// A presence member joined, announced once for the cluster.
    Join(PresenceEntry),
    /// A presence member left (or its owner stopped heartbeating), announced once.
    Leave(PresenceEntry),
}

/// What a presence script run found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PresenceAnswer {
    /// Its owner was missing from the live owners (of the topic, on a Redis Cluster): its
    /// first heartbeat, or it was swept as dead, or Redis lost its state. Its members then need
    /// writing again.
    pub missing: bool,
    /// It swept as many dead members as one run may: there may be more to sweep now.
    pub more: bool,
}

/// What the users channel carries: for every connection of a user, on every node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserMsg {
    /// A message (JSON text) for each connection.
    Message { user: Arc<str>, text: Bytes },
    /// Close each connection with `code`.
    Disconnect { user: Arc<str>, code: u16 },
}

/// A message to publish with a seq Redis assigns: `head`, the seq, `tail`. The seq is written
/// in decimal, or for a binary topic as 8 bytes big-endian (docs/PROTOCOL.md "Binary rooms").
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub head: &'a [u8],
    pub tail: &'a [u8],
    pub binary: bool,
    pub trace: Option<&'a str>,
}

/// A change to one shard's presence members of one topic ([`Keys::presence`]).
#[derive(Debug, Clone, Copy)]
pub struct PresenceChange<'a> {
    pub topic: &'a str,
    /// The members in `join` are all the shard has in the topic: any other leaves.
    pub replace: bool,
    /// Connections whose member leaves.
    pub leave: &'a [u64],
    /// Connections whose member joins, with the member as JSON.
    pub join: &'a [(u64, String)],
    /// Redis should know this shard's members of the topic already (on a Redis Cluster: the
    /// answer then tells whether they were lost).
    pub known: bool,
}

const PUBLISH: &str = r"
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[7]
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', epoch, 's', 0)
end
local seq = redis.call('HINCRBY', KEYS[1], 's', 1)
local written = seq
if ARGV[9] == 'b' then
  written = struct.pack('>I8', seq)
end
local msg = ARGV[2] .. written .. ARGV[3]
local cap = tonumber(ARGV[5])
if cap > 0 then
  redis.call('RPUSH', KEYS[2], seq .. '\n' .. ARGV[4] .. '\n' .. msg)
  redis.call('LTRIM', KEYS[2], -cap, -1)
  redis.call('PEXPIRE', KEYS[2], ARGV[6])
end
redis.call('PEXPIRE', KEYS[1], ARGV[8])
redis.call(ARGV[11], ARGV[1], 'm\n' .. epoch .. '\n' .. seq .. '\n' .. ARGV[10] .. '\n' .. msg)
return {seq, epoch}
";

/// The read of a topic's state. `ARGV[3]`/`ARGV[4]` are the epoch and seq a node's mirror
/// has seen (empty for a new mirror): Redis behind them under the same epoch lost writes that
/// were delivered (a failover to a replica that lacked them), and would hand their seqs out
/// again; the topic starts over with a new epoch instead, as when Redis lost it whole.
const SYNC: &str = r"
local m = redis.call('HMGET', KEYS[1], 'e', 's')
local members = redis.call('HGETALL', KEYS[3])
if m[1] and m[1] == ARGV[3] and tonumber(m[2]) < tonumber(ARGV[4]) then
  m[1] = false
end
if not m[1] then
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'e', ARGV[1], 's', 0)
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return {0, ARGV[1], {}, members}
end
return {tonumber(m[2]), m[1], redis.call('LRANGE', KEYS[2], 0, -1), members}
";

/// Presence: a heartbeat of one owner (a shard of a node), the sweep of the owners whose
/// heartbeats stopped, and optionally a change to the owner's members of one topic. Members
/// live in a hash per topic (`owner:conn` → member JSON) and are indexed per owner
/// (`conn \n topic`), so the sweep finds a dead owner's members without a scan. Every join and
/// leave is published once, by the script that made it. One run removes at most 1,000 members
/// of dead owners (an owner is forgotten once it has none left) and says whether there may be
/// more, so a dead node with very many members is swept in runs of bounded length, one after
/// the other. Keys are named from the prefix (as [`Keys`] names them), so this script needs
/// one Redis, not a Redis Cluster.
const PRESENCE: &str = r"
local prefix, owner = ARGV[1], ARGV[2]
local nodes = prefix .. 'nodes'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local missing = redis.call('ZADD', nodes, now + tonumber(ARGV[3]), owner)
local function leave(topic, field, index, entry)
  local key = prefix .. '{' .. topic .. '}:p'
  local member = redis.call('HGET', key, field)
  if member then
    redis.call('HDEL', key, field)
    redis.call('SREM', index, entry)
    redis.call('PUBLISH', prefix .. '{' .. topic .. '}:c', 'l\n' .. field .. '\n' .. member)
  end
end
local budget = 1000
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', nodes, '-inf', now, 'LIMIT', 0, 16)) do
  if budget <= 0 then
    break
  end
  local index = prefix .. 'o:' .. dead
  local entries = redis.call('SPOP', index, budget)
  budget = budget - #entries
  for _, entry in ipairs(entries) do
    local conn, topic = string.match(entry, '^(%d+)\n(.*)$')
    if conn then
      leave(topic, dead .. ':' .. conn, index, entry)
    end
  end
  if redis.call('EXISTS', index) == 0 then
    redis.call('ZREM', nodes, dead)
  end
end
local topic = ARGV[4]
if topic ~= '' then
  local key, index, mine = prefix .. '{' .. topic .. '}:p', prefix .. 'o:' .. owner, owner .. ':'
  local gone = tonumber(ARGV[6])
  local kept = {}
  for i = 7 + gone, #ARGV, 2 do
    kept[mine .. ARGV[i]] = true
  end
  if ARGV[5] == '1' then
    for _, field in ipairs(redis.call('HKEYS', key)) do
      if string.sub(field, 1, #mine) == mine and not kept[field] then
        leave(topic, field, index, string.sub(field, #mine + 1) .. '\n' .. topic)
      end
    end
  end
  for i = 7, 6 + gone do
    leave(topic, mine .. ARGV[i], index, ARGV[i] .. '\n' .. topic)
  end
  for i = 7 + gone, #ARGV, 2 do
    local field = mine .. ARGV[i]
    if redis.call('HSET', key, field, ARGV[i + 1]) == 1 then
      redis.call('SADD', index, ARGV[i] .. '\n' .. topic)
      redis.call('PUBLISH', prefix .. '{' .. topic .. '}:c', 'j\n' .. field .. '\n' .. ARGV[i + 1])
    end
  end
end
return {missing, budget <= 0 and 1 or 0}
";

/// Presence on a Redis Cluster, where a script touches one topic's slot only: the topic's
/// members (`KEYS[1]`) and the deadlines of the owners that have members in it (`KEYS[2]`).
/// One run heartbeats one owner in one topic, sweeps the owners of the topic whose deadline
/// passed (their members leave, announced once; at most 1,000 per run, as [`PRESENCE`]) and
/// makes the owner's change. A shard runs it
/// for each topic it has members in, once every third of the TTL, so the topics of a dead
/// owner are swept by whichever live owner shares them (or by the next one to join them).
const PRESENCE_TOPIC: &str = r"
local channel, owner, verb = ARGV[1], ARGV[2], ARGV[4]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local missing = redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), owner)
local function leave(field)
  local member = redis.call('HGET', KEYS[1], field)
  if member then
    redis.call('HDEL', KEYS[1], field)
    redis.call(verb, channel, 'l\n' .. field .. '\n' .. member)
  end
end
local budget = 1000
local dead = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, 16)
if #dead > 0 then
  local gone = {}
  for _, o in ipairs(dead) do
    gone[o] = true
  end
  for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
    if budget <= 0 then
      break
    end
    local o = string.match(field, '^(.*):%d+$')
    if o and gone[o] then
      leave(field)
      budget = budget - 1
    end
  end
  if budget > 0 then
    redis.call('ZREM', KEYS[2], unpack(dead))
  end
end
local mine, gone = owner .. ':', tonumber(ARGV[7])
local kept = {}
for i = 8 + gone, #ARGV, 2 do
  kept[mine .. ARGV[i]] = true
end
if ARGV[6] == '1' then
  for _, field in ipairs(redis.call('HKEYS', KEYS[1])) do
    if string.sub(field, 1, #mine) == mine and not kept[field] then
      leave(field)
    end
  end
end
for i = 8, 7 + gone do
  leave(mine .. ARGV[i])
end
for i = 8 + gone, #ARGV, 2 do
  local field = mine .. ARGV[i]
  if redis.call('HSET', KEYS[1], field, ARGV[i + 1]) == 1 then
    redis.call(verb, channel, 'j\n' .. field .. '\n' .. ARGV[i + 1])
  end
end
if ARGV[5] ~= '1' then
  missing = 0
end
return {missing, budget <= 0 and 1 or 0}
";

/// The scripts the link loads on every connection (so `EVALSHA` always finds them).
pub const SCRIPTS: &[&str] = &[PUBLISH, SYNC, PRESENCE, PRESENCE_TOPIC];

/// How long a topic's epoch and seq outlive its last publish: much longer than its history,
/// so that history running out is told apart from the topic's state being lost.
pub const META_TTL_MS: u64 = 24 * 3600 * 1000;
/// [`META_TTL_MS`] as the scripts get it.
const META_TTL: &str = "86400000";

fn sha(script: &str) -> String {
    Sha1::digest(script.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Builds the commands of one deployment (its key prefix) and reads their answers.
///
/// A topic's keys and channel are `prefix{topic}:kind`: the topic is their hash tag, so on a
/// Redis Cluster they live in one slot (one master), where one script may touch them all.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
    /// Redis Cluster: sharded pub/sub (`SPUBLISH`, `SSUBSCRIBE`), each channel on its slot's
    /// master.
    sharded: bool,
    publish_sha: String,
    sync_sha: String,
    presence_sha: String,
    presence_topic_sha: String,
}

impl Keys {
    pub fn new(prefix: &str, sharded: bool) -> Keys {
        Keys {
            prefix: prefix.to_string(),
            sharded,
            publish_sha: sha(PUBLISH),
            sync_sha: sha(SYNC),
            presence_sha: sha(PRESENCE),
            presence_topic_sha: sha(PRESENCE_TOPIC),
        }
    }

    /// `prefix{topic}:kind`.
    fn key(&self, topic: &str, kind: u8) -> Vec<u8> {
        let mut key = Vec::with_capacity(self.prefix.len() + topic.len() + 4);
        key.extend_from_slice(self.prefix.as_bytes());
        key.push(b'{');
        key.extend_from_slice(topic.as_bytes());
        key.extend_from_slice(b"}:");
        key.push(kind);
        key
    }

    fn channel(&self, topic: &str) -> Vec<u8> {
        self.key(topic, b'c')
    }

    /// The hash slot of `topic`'s keys and channel.
    pub fn slot(&self, topic: &str) -> u16 {
        slots::slot(&self.channel(topic))
    }

    /// The channel of messages to users, which one shard of every node follows.
    fn users(&self) -> Vec<u8> {
        format!("{}{{users}}", self.prefix).into_bytes()
    }

    /// The hash slot of the users channel.
    pub fn users_slot(&self) -> u16 {
        slots::slot(&self.users())
    }

    fn publish_verb(&self) -> &'static [u8] {
        if self.sharded {
            b"SPUBLISH"
        } else {
            b"PUBLISH"
        }
    }

    fn subscribe_verb(&self) -> &'static [u8] {
        if self.sharded {
            b"SSUBSCRIBE"
        } else {
            b"SUBSCRIBE"
        }
    }

    /// The topic a channel carries, when it is one of ours.
    pub fn topic_of<'a>(&self, channel: &'a [u8]) -> Option<&'a str> {
        let rest = channel.strip_prefix(self.prefix.as_bytes())?;
        let topic = rest.strip_prefix(b"{")?.strip_suffix(b"}:c")?;
        std::str::from_utf8(topic).ok()
    }

    pub fn is_users(&self, channel: &[u8]) -> bool {
        channel == self.users()
    }

    /// Publishes `m`, keeping at most `cap` messages for `ttl_ms`. `epoch` is the epoch to
    /// create if the topic has none.
    pub fn publish(
        &self,
        topic: &str,
        m: &Message,
        wall_ms: u64,
        cap: usize,
        ttl_ms: u64,
        epoch: &str,
    ) -> Vec<u8> {
        let mut out = Vec::new();
        let (mut wall, mut count, mut ttl) = (
            itoa::Buffer::new(),
            itoa::Buffer::new(),
            itoa::Buffer::new(),
        );
        resp::command(
            &mut out,
            &[
                b"EVALSHA",
                self.publish_sha.as_bytes(),
                b"2",
                &self.key(topic, b's'),
                &self.key(topic, b'h'),
                &self.channel(topic),
                m.head,
                m.tail,
                wall.format(wall_ms).as_bytes(),
                count.format(cap).as_bytes(),
                ttl.format(ttl_ms.max(1)).as_bytes(),
                epoch.as_bytes(),
                META_TTL.as_bytes(),
                if m.binary { b"b" } else { b"" },
                trace_line(m.trace).as_bytes(),
                self.publish_verb(),
            ],
        );
        out
    }

    /// Publishes the volatile message `msg` (as delivered: it has no seq to add).
    pub fn publish_volatile(&self, topic: &str, msg: &[u8], trace: Option<&str>) -> Vec<u8> {
        let mut payload = format!("v\n{}\n", trace_line(trace)).into_bytes();
        payload.extend_from_slice(msg);
        let mut out = Vec::with_capacity(payload.len() + 64);
        resp::command(
            &mut out,
            &[self.publish_verb(), &self.channel(topic), &payload],
        );
        out
    }

    /// Subscribes to `topic`, then reads its state ([`Keys::snapshot`] decodes the answer).
    ///
    /// `seen` is the epoch and seq of this node's mirror of the topic, when it has one: if
    /// Redis is behind it under that epoch, the topic starts over with `epoch`.
    pub fn follow(
        &self,
        topic: &str,
        epoch: &str,
        seen: Option<(&str, u64)>,
    ) -> (Vec<u8>, Vec<u8>) {
        let mut sub = Vec::new();
        let mut seq = itoa::Buffer::new();
        let (seen_epoch, seen_seq) = match seen {
            Some((e, s)) => (e.as_bytes(), seq.format(s).as_bytes()),
            None => (&b""[..], &b"0"[..]),
        };
        resp::command(&mut sub, &[self.subscribe_verb(), &self.channel(topic)]);
        let mut read = Vec::new();
        resp::command(
            &mut read,
            &[
                b"EVALSHA",
                self.sync_sha.as_bytes(),
                b"3",
                &self.key(topic, b's'),
                &self.key(topic, b'h'),
                &self.key(topic, b'p'),
                epoch.as_bytes(),
                META_TTL.as_bytes(),
                seen_epoch,
                seen_seq,
            ],
        );
        (sub, read)
    }

    pub fn unfollow(&self, topic: &str) -> Vec<u8> {
        let mut out = Vec::new();
        let verb: &[u8] = if self.sharded {
            b"SUNSUBSCRIBE"
        } else {
            b"UNSUBSCRIBE"
        };
        resp::command(&mut out, &[verb, &self.channel(topic)]);
        out
    }

    /// A heartbeat of `owner`, which is alive for `ttl_ms` more, with `change` to its members
    /// if any. Owners whose heartbeats stopped are swept on the way: their members leave.
    /// [`Keys::presence_answer`] reads the answer.
    ///
    /// On a Redis Cluster the heartbeat is per topic (`change` with nothing to change) and
    /// sweeps that topic only ([`Keys::presence_per_topic`]).
    pub fn presence(&self, owner: &str, ttl_ms: u64, change: Option<&PresenceChange>) -> Vec<u8> {
        let ttl = ttl_ms.to_string();
        if let (true, Some(c)) = (self.sharded, change) {
            return self.presence_topic(owner, &ttl, c);
        }
        let mut args: Vec<Vec<u8>> = vec![
            b"EVALSHA".to_vec(),
            self.presence_sha.as_bytes().to_vec(),
            b"0".to_vec(),
            self.prefix.as_bytes().to_vec(),
            owner.as_bytes().to_vec(),
            ttl.into_bytes(),
        ];
        match change {
            None => args.extend([Vec::new(), b"0".to_vec(), b"0".to_vec()]),
            Some(c) => {
                args.push(c.topic.as_bytes().to_vec());
                args.push(if c.replace { b"1" } else { b"0" }.to_vec());
                args.push(c.leave.len().to_string().into_bytes());
                args.extend(c.leave.iter().map(|conn| conn.to_string().into_bytes()));
                for (conn, json) in c.join {
                    args.push(conn.to_string().into_bytes());
                    args.push(json.as_bytes().to_vec());
                }
            }
        }
        let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
        let mut out = Vec::new();
        resp::command(&mut out, &refs);
        out
    }

    /// Presence is heartbeated and swept per topic (on a Redis Cluster): [`Keys::presence`]
    /// wants a change (maybe empty) for each topic the shard has members in.
    pub fn presence_per_topic(&self) -> bool {
        self.sharded
    }

    fn presence_topic(&self, owner: &str, ttl: &str, c: &PresenceChange) -> Vec<u8> {
        let numbers: Vec<String> = std::iter::once(c.leave.len())
            .map(|n| n.to_string())
            .chain(c.leave.iter().map(u64::to_string))
            .collect();
        let joins: Vec<String> = c.join.iter().map(|(conn, _)| conn.to_string()).collect();
        let (members, deadlines, channel) = (
            self.key(c.topic, b'p'),
            self.key(c.topic, b'n'),
            self.channel(c.topic),
        );
        let mut args: Vec<&[u8]> = vec![
            b"EVALSHA",
            self.presence_topic_sha.as_bytes(),
            b"2",
            &members,
            &deadlines,
            &channel,
            owner.as_bytes(),
            ttl.as_bytes(),
            self.publish_verb(),
            if c.known { b"1" } else { b"0" },
            if c.replace { b"1" } else { b"0" },
        ];
        args.extend(numbers.iter().map(|n| n.as_bytes()));
        for ((_, json), conn) in c.join.iter().zip(&joins) {
            args.push(conn.as_bytes());
            args.push(json.as_bytes());
        }
        let mut out = Vec::new();
        resp::command(&mut out, &args);
        out
    }

    /// The presence script's answer.
    pub fn presence_answer(v: &Value) -> Result<PresenceAnswer, String> {
        match v {
            Value::Array(a) => match &a[..] {
                [Value::Int(missing), Value::Int(more)] => Ok(PresenceAnswer {
                    missing: *missing != 0,
                    more: *more != 0,
                }),
                _ => Err(format!("unexpected presence answer {v:?}")),
            },
            Value::Error(e) => Err(e.clone()),
            _ => Err(format!("unexpected presence answer {v:?}")),
        }
    }

    /// Follows the users channel.
    pub fn follow_users(&self) -> Vec<u8> {
        let mut out = Vec::new();
        resp::command(&mut out, &[self.subscribe_verb(), &self.users()]);
        out
    }

    /// Publishes `m` on the users channel.
    pub fn to_users(&self, m: &UserMsg) -> Vec<u8> {
        let payload = match m {
            UserMsg::Message { user, text } => {
                let mut p = format!("u\n{}\n", json_line(user)).into_bytes();
                p.extend_from_slice(text);
                p
            }
            UserMsg::Disconnect { user, code } => {
                format!("d\n{}\n{code}", json_line(user)).into_bytes()
            }
        };
        let mut out = Vec::new();
        resp::command(&mut out, &[self.publish_verb(), &self.users(), &payload]);
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
        let [seq, epoch, history, members] = &a[..] else {
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
        let items = |v: &Value| match v {
            Value::Array(items) => Ok(items.clone()),
            Value::Nil => Ok(Vec::new()),
            _ => Err(bad()),
        };
        let history = items(history)?
            .iter()
            .filter_map(|i| entry(i.as_bytes()?))
            .collect();
        // HGETALL: a map in RESP3 (keys and values in turn here), a flat array in RESP2.
        let members = items(members)?
            .chunks_exact(2)
            .filter_map(|kv| {
                let field = kv[0].as_bytes()?;
                presence_entry(field, Bytes::copy_from_slice(kv[1].as_bytes()?))
            })
            .collect();
        Ok(Snapshot {
            epoch: epoch.into(),
            seq,
            history,
            members,
        })
    }

    /// A topic channel's message; `None` when it is not one ringgate wrote.
    pub fn pushed(payload: &Bytes) -> Option<Pushed> {
        let (kind, rest) = split_line(payload)?;
        match &kind[..] {
            b"m" => {
                let (epoch, rest) = split_line(&rest)?;
                let (seq, rest) = split_line(&rest)?;
                let (trace, msg) = split_line(&rest)?;
                Some(Pushed::Message {
                    epoch: std::str::from_utf8(&epoch).ok()?.into(),
                    seq: std::str::from_utf8(&seq).ok()?.parse().ok()?,
                    trace: parse_trace(&trace)?,
                    msg,
                })
            }
            b"v" => {
                let (trace, msg) = split_line(&rest)?;
                Some(Pushed::Volatile {
                    trace: parse_trace(&trace)?,
                    msg,
                })
            }
            b"j" | b"l" => {
                let (field, json) = split_line(&rest)?;
                let e = presence_entry(&field, json)?;
                Some(if &kind[..] == b"j" {
                    Pushed::Join(e)
                } else {
                    Pushed::Leave(e)
                })
            }
            _ => None,
        }
    }

    /// A users channel message; `None` when it is not one ringgate wrote.
    pub fn user_msg(payload: &Bytes) -> Option<UserMsg> {
        let (kind, rest) = split_line(payload)?;
        let (user, rest) = split_line(&rest)?;
        let user: Arc<str> = serde_json::from_slice::<String>(&user).ok()?.into();
        match &kind[..] {
            b"u" => Some(UserMsg::Message { user, text: rest }),
            b"d" => Some(UserMsg::Disconnect {
                user,
                code: std::str::from_utf8(&rest).ok()?.parse().ok()?,
            }),
            _ => None,
        }
    }
}

/// A string on one line of a channel message (JSON-quoted: it may hold a newline).
fn json_line(s: &str) -> String {
    serde_json::Value::from(s).to_string()
}

/// A trace on its line: empty when there is none.
fn trace_line(trace: Option<&str>) -> String {
    trace.map(json_line).unwrap_or_default()
}

/// `Some(None)` for an empty line, `None` for one that is not a JSON string.
fn parse_trace(line: &[u8]) -> Option<Option<Arc<str>>> {
    if line.is_empty() {
        return Some(None);
    }
    let s: String = serde_json::from_slice(line).ok()?;
    Some(Some(s.into()))
}

/// `owner:conn` and the member's JSON.
fn presence_entry(field: &[u8], json: Bytes) -> Option<PresenceEntry> {
    let field = std::str::from_utf8(field).ok()?;
    let (owner, conn) = field.rsplit_once(':')?;
    Some(PresenceEntry {
        owner: owner.into(),
        conn: conn.parse().ok()?,
        json,
    })
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
        let k = Keys::new("rg:", false);
        for topic in ["a:b", "", "}x{", "{t}"] {
            assert_eq!(k.topic_of(&k.channel(topic)), Some(topic));
        }
        assert_eq!(k.topic_of(b"rg:{a}:h"), None);
        assert_eq!(k.topic_of(b"other:{a}:c"), None);
        assert_eq!(k.topic_of(&k.users()), None);
        assert_eq!(META_TTL.parse(), Ok(META_TTL_MS));
    }

    #[test]
    fn a_topic_s_keys_and_channel_share_its_slot() {
        let k = Keys::new("rg:", true);
        for topic in ["news", "a:b", "x}y"] {
            let slot = k.slot(topic);
            for kind in [b's', b'h', b'p', b'c'] {
                assert_eq!(slots::slot(&k.key(topic, kind)), slot, "{topic}");
            }
        }
        assert_ne!(k.slot("news"), k.slot("sport"));
        let (sub, _) = k.follow("news", "E", None);
        assert!(sub.windows(10).any(|w| w == b"SSUBSCRIBE"));
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
            Value::Array(vec![s("ab12:7"), s("{}"), s("no-conn"), s("{}")]),
        ]);
        let snap = Keys::snapshot(&v).expect("snapshot");
        assert_eq!((snap.seq, &*snap.epoch), (3, "ep"));
        let seqs: Vec<_> = snap.history.iter().map(|e| (e.seq, e.wall_ms)).collect();
        assert_eq!(seqs, [(2, 1700), (3, 1701)]);
        assert_eq!(&snap.history[0].msg[..], b"{\"a\":\n1}");
        let owners: Vec<_> = snap.members.iter().map(|m| (&*m.owner, m.conn)).collect();
        assert_eq!(owners, [("ab12", 7)]);
        assert!(Keys::snapshot(&Value::Error("NOSCRIPT".into())).is_err());
        assert_eq!(
            Keys::published(&Value::Array(vec![Value::Int(9), s("e")])),
            Ok(9)
        );
        let pushed = |p: &'static [u8]| Keys::pushed(&Bytes::from_static(p));
        assert_eq!(
            pushed(b"m\nep\n12\n\"t\\n1\"\n{\"x\":\n1}"),
            Some(Pushed::Message {
                epoch: "ep".into(),
                seq: 12,
                trace: Some("t\n1".into()),
                msg: Bytes::from_static(b"{\"x\":\n1}"),
            })
        );
        assert_eq!(
            pushed(b"v\n\n\x02\x01tx"),
            Some(Pushed::Volatile {
                trace: None,
                msg: Bytes::from_static(b"\x02\x01tx"),
            })
        );
        assert!(matches!(pushed(b"l\nab:3\n{}"), Some(Pushed::Leave(e)) if e.conn == 3));
        for foreign in [
            &b"hello"[..],
            b"m\nep\nx\n\n{}",
            b"m\nep\n1\nnot-json\n{}",
            b"j\nab\n{}",
            b"x\n1",
        ] {
            assert_eq!(Keys::pushed(&Bytes::copy_from_slice(foreign)), None);
        }
    }

    #[test]
    fn user_messages_round_trip_through_the_users_channel() {
        let k = Keys::new("rg:", false);
        for m in [
            UserMsg::Message {
                user: "a\nb".into(),
                text: Bytes::from_static(b"{\"type\":\"x\"}"),
            },
            UserMsg::Disconnect {
                user: "u".into(),
                code: 4001,
            },
        ] {
            let cmd = k.to_users(&m);
            // The payload is the command's last argument.
            let (v, _) = resp::parse(&cmd).expect("RESP").expect("complete");
            let Value::Array(args) = v else {
                panic!("{v:?}")
            };
            let payload = Bytes::copy_from_slice(args[2].as_bytes().expect("payload"));
            assert!(k.is_users(args[1].as_bytes().expect("channel")));
            assert_eq!(Keys::user_msg(&payload), Some(m));
        }
        assert_eq!(Keys::user_msg(&Bytes::from_static(b"d\n\"u\"\nx")), None);
        assert_eq!(Keys::user_msg(&Bytes::from_static(b"u\nu\n{}")), None);
    }
}
