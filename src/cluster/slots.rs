//! Redis Cluster's key space, as plain types: the hash slot of a key (CRC16 of its hash tag),
//! which master serves each slot (from `CLUSTER SLOTS`), and the redirections a master answers
//! for a slot it does not serve (`MOVED`, `ASK`).

use super::resp::Value;

/// Slots in a Redis Cluster.
pub const SLOTS: u16 = 16384;

const CRC16: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_XMODEM);

/// The slot of `key`: CRC16 of its hash tag (what is between the first `{` and the next `}`,
/// when not empty), else of the whole key.
pub fn slot(key: &[u8]) -> u16 {
    let tag = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    CRC16.checksum(tag.unwrap_or(key)) % SLOTS
}

/// Which master serves each slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotMap {
    /// `host:port` of each master.
    masters: Vec<String>,
    /// Per slot, the index of its master in `masters`.
    owners: Vec<usize>,
}

impl SlotMap {
    /// The map from an answer to `CLUSTER SLOTS` (`[start, end, [host, port, …], replicas…]`
    /// per range) asked of `asked` (`host:port`; an empty host in the answer means its host).
    /// Every slot must be served: a cluster that is not whole is not used.
    pub fn from_slots(answer: &Value, asked: &str) -> Result<SlotMap, String> {
        let bad = || format!("{asked} answered CLUSTER SLOTS with {answer:?}");
        let Value::Array(ranges) = answer else {
            return Err(match answer {
                Value::Error(e) => format!("{asked} refused CLUSTER SLOTS: {e}"),
                _ => bad(),
            });
        };
        let mut masters: Vec<String> = Vec::new();
        let mut owners = vec![usize::MAX; usize::from(SLOTS)];
        for range in ranges {
            let Value::Array(r) = range else {
                return Err(bad());
            };
            let [start, end, Value::Array(master), ..] = &r[..] else {
                return Err(bad());
            };
            let (Some(start), Some(end)) = (start.as_int(), end.as_int()) else {
                return Err(bad());
            };
            let (Some(host), Some(port)) = (
                master.first().and_then(Value::as_bytes),
                master.get(1).and_then(Value::as_int),
            ) else {
                return Err(bad());
            };
            let host = std::str::from_utf8(host).map_err(|_| bad())?;
            let host = match host {
                "" => super::config::host_of(asked),
                h => h,
            };
            let addr = match host.contains(':') {
                true => format!("[{host}]:{port}"),
                false => format!("{host}:{port}"),
            };
            let index = match masters.iter().position(|m| *m == addr) {
                Some(i) => i,
                None => {
                    masters.push(addr);
                    masters.len() - 1
                }
            };
            let range = usize::try_from(start)
                .ok()
                .zip(usize::try_from(end).ok())
                .filter(|(s, e)| s <= e && *e < usize::from(SLOTS))
                .ok_or_else(bad)?;
            owners[range.0..=range.1].fill(index);
        }
        if let Some(unserved) = owners.iter().position(|&o| o == usize::MAX) {
            return Err(format!(
                "{asked}: slot {unserved} has no master (the cluster is not whole)"
            ));
        }
        Ok(SlotMap { masters, owners })
    }

    /// The masters, each once; [`SlotMap::master`] indexes into them.
    pub fn masters(&self) -> &[String] {
        &self.masters
    }

    /// The index of the master serving `slot`.
    pub fn master(&self, slot: u16) -> usize {
        self.owners[usize::from(slot % SLOTS)]
    }

    /// `slot` is now served by `addr` (a `MOVED`); false when `addr` is not one of the
    /// masters (the map must then be read again).
    pub fn moved(&mut self, slot: u16, addr: &str) -> bool {
        match self.masters.iter().position(|m| m == addr) {
            Some(i) => {
                self.owners[usize::from(slot % SLOTS)] = i;
                true
            }
            None => false,
        }
    }

    /// The index of the master at `addr`.
    pub fn index_of(&self, addr: &str) -> Option<usize> {
        self.masters.iter().position(|m| m == addr)
    }
}

/// Redirections one command may follow, as redis-cli and redis-rs bound theirs. A command
/// redirected more often is in a loop (masters whose slot maps disagree, each naming the
/// other as the slot's owner) and fails rather than circling for ever.
pub const MAX_REDIRECTS: u8 = 5;

/// A set of slots, a bit each.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotSet(Vec<u64>);

impl Default for SlotSet {
    fn default() -> Self {
        SlotSet(vec![0; usize::from(SLOTS) / 64])
    }
}

impl SlotSet {
    /// Adds `slot`; true when it was not in the set yet.
    pub fn insert(&mut self, slot: u16) -> bool {
        let (word, bit) = (usize::from(slot % SLOTS) / 64, slot % 64);
        let fresh = self.0[word] & (1 << bit) == 0;
        self.0[word] |= 1 << bit;
        fresh
    }
}

/// A master's answer that the command belongs elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redirect {
    /// The slot lives at `addr` now: from now on, send it there.
    Moved { slot: u16, addr: String },
    /// The slot is moving to `addr`: this command only goes there, after `ASKING`.
    Ask { slot: u16, addr: String },
}

/// The redirection in an error answer (`MOVED 3999 127.0.0.1:6381`), if it is one.
pub fn redirect(error: &str) -> Option<Redirect> {
    let mut words = error.split(' ');
    let kind = words.next()?;
    let slot = words.next()?.parse::<u16>().ok().filter(|s| *s < SLOTS)?;
    let addr = words.next()?.to_string();
    if addr.is_empty() || words.next().is_some() {
        return None;
    }
    match kind {
        "MOVED" => Some(Redirect::Moved { slot, addr }),
        "ASK" => Some(Redirect::Ask { slot, addr }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn s(x: &str) -> Value {
        Value::Str(Bytes::copy_from_slice(x.as_bytes()))
    }

    #[test]
    fn slots_are_redis_s_crc16_of_the_hash_tag() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(slot(b"123456789"), 12739);
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        assert_eq!(slot(b"ringgate:{news}:s"), slot(b"x{news}:h"));
        // An empty tag does not count: the whole key is hashed.
        assert_eq!(slot(b"{}foo"), CRC16.checksum(b"{}foo") % SLOTS);
        assert_eq!(slot(b"foo{bar"), CRC16.checksum(b"foo{bar") % SLOTS);
        assert_eq!(slot(b"{a}}b"), slot(b"a"));
    }

    fn range(start: i64, end: i64, host: &str, port: i64) -> Value {
        Value::Array(vec![
            Value::Int(start),
            Value::Int(end),
            Value::Array(vec![s(host), Value::Int(port), s("id")]),
            Value::Array(vec![s("10.0.0.9"), Value::Int(1), s("replica")]),
        ])
    }

    #[test]
    fn the_map_names_each_slot_s_master_and_follows_moved() {
        let answer = Value::Array(vec![
            range(0, 5460, "127.0.0.1", 7000),
            range(5461, 10922, "", 7001),
            range(10923, 16383, "::1", 7002),
        ]);
        let mut map = SlotMap::from_slots(&answer, "seed.local:7000").expect("whole");
        assert_eq!(
            map.masters(),
            ["127.0.0.1:7000", "seed.local:7001", "[::1]:7002"]
        );
        assert_eq!(
            (map.master(0), map.master(5461), map.master(16383)),
            (0, 1, 2)
        );
        assert!(map.moved(5461, "[::1]:7002"));
        assert_eq!(map.master(5461), 2);
        assert!(!map.moved(1, "10.1.1.1:1"), "an unknown master");
        assert_eq!(map.index_of("seed.local:7001"), Some(1));
    }

    #[test]
    fn a_partial_or_malformed_map_is_refused_with_the_reason() {
        let partial = Value::Array(vec![range(0, 100, "h", 1)]);
        let e = SlotMap::from_slots(&partial, "a:1").expect_err("partial");
        assert!(e.contains("slot 101 has no master"), "{e}");
        for bad in [
            s("OK"),
            Value::Array(vec![s("x")]),
            Value::Array(vec![range(5, 1, "h", 1)]),
            Value::Array(vec![range(0, 16384, "h", 1)]),
            Value::Array(vec![Value::Array(vec![Value::Int(0), Value::Int(1)])]),
        ] {
            assert!(SlotMap::from_slots(&bad, "a:1").is_err(), "{bad:?}");
        }
        let e = SlotMap::from_slots(&Value::Error("ERR no cluster".into()), "a:1");
        assert!(e.expect_err("refused").contains("refused"));
    }

    #[test]
    fn a_slot_set_says_once_that_a_slot_is_new() {
        let mut set = SlotSet::default();
        for slot in [0, 63, 64, SLOTS - 1] {
            assert!(set.insert(slot), "{slot}");
            assert!(!set.insert(slot), "{slot}");
        }
        assert!(set.insert(1));
    }

    #[test]
    fn redirections_are_read_and_other_errors_are_not() {
        assert_eq!(
            redirect("MOVED 3999 127.0.0.1:6381"),
            Some(Redirect::Moved {
                slot: 3999,
                addr: "127.0.0.1:6381".into()
            })
        );
        assert_eq!(
            redirect("ASK 1 [::1]:7000"),
            Some(Redirect::Ask {
                slot: 1,
                addr: "[::1]:7000".into()
            })
        );
        for other in [
            "ERR unknown",
            "MOVED x a:1",
            "MOVED 16384 a:1",
            "MOVED 1",
            "ASK 1 a:1 extra",
            "TRYAGAIN Multiple keys request during rehashing of slot",
        ] {
            assert_eq!(redirect(other), None, "{other}");
        }
    }
}
