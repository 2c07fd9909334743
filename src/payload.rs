//! Synthetic realtime payloads, shared by the load tool and the benchmarks so that both
//! measure the same messages: chat lines, stats updates and presence snapshots as JSON, with
//! repeated keys and varying values, as real traffic has.

use std::fmt::Write as _;

/// A small deterministic generator (xorshift*): the same seed gives the same messages.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// One JSON message of exactly `size` bytes, different for every `seq`: a chat line below
/// 300 bytes, a stats update below 4 KiB, a presence snapshot above.
pub fn json_message(seq: u64, size: usize) -> Vec<u8> {
    const WORDS: [&str; 24] = [
        "ok", "see", "you", "at", "the", "standup", "deploy", "is", "green", "again", "can",
        "someone", "check", "latency", "on", "edge", "nodes", "thanks", "looks", "good", "to",
        "me", "merging", "now",
    ];
    const REGIONS: [&str; 4] = ["eu-west-1", "us-east-1", "ap-south-1", "sa-east-1"];
    const STATUS: [&str; 3] = ["online", "away", "busy"];
    const DEVICES: [&str; 3] = ["web", "ios", "android"];
    let mut r = Rng::new(seq.wrapping_add(0x5eed));
    let ts = 1_763_772_000_000 + seq * 37 + r.next_u64() % 997;
    let mut m = String::with_capacity(size + 160);
    if size < 300 {
        let _ = write!(
            m,
            r#"{{"type":"chat","room":"lobby-{}","user":"user_{}","id":{},"ts":{ts},"text":""#,
            r.next_u64() % 16,
            r.next_u64() % 10_000,
            100_000 + seq
        );
        let room = size.saturating_sub(m.len() + 2);
        let mut text = String::with_capacity(room + 16);
        while text.len() < room {
            if !text.is_empty() {
                text.push(' ');
            }
            text.push_str(WORDS[(r.next_u64() % WORDS.len() as u64) as usize]);
        }
        text.truncate(room);
        m.push_str(&text);
        m.push_str("\"}");
    } else {
        let snapshot = size >= 4096;
        let _ = write!(
            m,
            r#"{{"type":"{}","seq":{seq},"ts":{ts},"items":["#,
            if snapshot { "presence" } else { "stats" }
        );
        let mut item = String::with_capacity(160);
        let mut first = true;
        loop {
            item.clear();
            let v = r.next_u64();
            if snapshot {
                let id = 10_000 + v % 90_000;
                let _ = write!(
                    item,
                    r#"{{"id":{id},"name":"user_{id}","status":"{}","since":{},"device":"{}"}}"#,
                    STATUS[(v >> 20) as usize % 3],
                    ts / 1000 - (v >> 24) % 86_400,
                    DEVICES[(v >> 40) as usize % 3]
                );
            } else {
                let _ = write!(
                    item,
                    r#"{{"host":"edge-{:02}","region":"{}","cpu":{}.{:02},"mem":{}.{:02},"conns":{},"rps":{}.{},"p99_ms":{}.{:02},"errors":{}}}"#,
                    v % 64,
                    REGIONS[(v >> 6) as usize % 4],
                    (v >> 8) % 100,
                    (v >> 15) % 100,
                    (v >> 22) % 100,
                    (v >> 29) % 100,
                    (v >> 36) % 50_000,
                    (v >> 20) % 5_000,
                    (v >> 44) % 10,
                    (v >> 48) % 40,
                    (v >> 54) % 100,
                    u64::from((v >> 60) & 7 == 0) * ((v >> 12) % 9)
                );
            }
            let sep = usize::from(!first);
            if m.len() + sep + item.len() + 2 > size {
                break;
            }
            if !first {
                m.push(',');
            }
            m.push_str(&item);
            first = false;
        }
        m.push(']');
        while m.len() + 1 < size {
            m.push(' ');
        }
        m.push('}');
    }
    m.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_have_the_asked_size_and_are_json() {
        for size in [100, 299, 512, 1024, 4096, 16 * 1024] {
            for seq in 0..5 {
                let m = json_message(seq, size);
                assert_eq!(m.len(), size, "size {size} seq {seq}");
                assert!(
                    serde_json::from_slice::<serde_json::Value>(&m).is_ok(),
                    "size {size}"
                );
            }
        }
        assert_ne!(json_message(1, 512), json_message(2, 512));
    }
}
