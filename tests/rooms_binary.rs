//! Binary rooms (PROTOCOL.md, "Binary rooms"): a Yjs-style sync through a relayed binary
//! topic.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};

use common::rooms::*;
use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

both_backends!(binary_rooms_relay_a_yjs_style_sync_byte_exact_with_recovery);

// ---- binary rooms: a Yjs-style sync through a relayed binary topic ---------------------------

/// One binary room message as delivered (docs/PROTOCOL.md, "Binary rooms").
#[derive(Debug, Clone, PartialEq)]
struct BinMsg {
    topic: String,
    /// `None`: volatile.
    seq: Option<u64>,
    payload: Vec<u8>,
}

fn parse_bin(m: &[u8]) -> BinMsg {
    let (kind, len) = (m[0], m[1] as usize);
    let topic = String::from_utf8(m[2..2 + len].to_vec()).expect("topic");
    let rest = &m[2 + len..];
    match kind {
        1 => BinMsg {
            topic,
            seq: Some(u64::from_be_bytes(rest[..8].try_into().expect("seq"))),
            payload: rest[8..].to_vec(),
        },
        2 => BinMsg {
            topic,
            seq: None,
            payload: rest.to_vec(),
        },
        k => panic!("binary message kind {k}: {m:?}"),
    }
}

impl Client {
    /// Publishes `payload` to the binary `topic` (durable, or volatile).
    async fn send_bin(&mut self, topic: &str, volatile: bool, payload: &[u8]) {
        let m = binary_publish(topic, volatile, payload);
        within("send", self.ws.send(m)).await.expect("send");
    }

    /// The next binary message; JSON messages that come first are stashed.
    async fn next_bin(&mut self) -> BinMsg {
        loop {
            let m = match tokio::time::timeout(PATIENCE, self.ws.next()).await {
                Ok(Some(Ok(m))) => m,
                other => panic!("waiting for a binary message: {other:?}"),
            };
            match m {
                Message::Binary(b) => return parse_bin(&b),
                Message::Text(t) => self
                    .stash
                    .push_back(serde_json::from_str(&t).expect("JSON")),
                _ => {}
            }
        }
    }
}

/// A toy CRDT with the shape of Yjs and its sync protocol (y-protocols): every client numbers
/// its inserts with its own clock; the state vector holds each client's highest clock; an
/// update is a list of inserts; the text orders inserts by (clock, client). Applying an update
/// twice, or out of order, changes nothing: the server only relays bytes.
#[derive(Debug, Default, Clone, PartialEq)]
struct Doc {
    me: u8,
    inserts: BTreeMap<(u8, u32), u8>,
}

/// Sync message types, as in y-protocols.
const SYNC_STEP1: u8 = 0;
const SYNC_STEP2: u8 = 1;
const UPDATE: u8 = 2;

impl Doc {
    fn new(me: u8) -> Doc {
        Doc {
            me,
            inserts: BTreeMap::new(),
        }
    }

    fn clock(&self, client: u8) -> u32 {
        self.inserts
            .range((client, 0)..=(client, u32::MAX))
            .next_back()
            .map_or(0, |((_, c), _)| *c)
    }

    /// Inserts `byte`; returns the sync `Update` message to publish.
    fn edit(&mut self, byte: u8) -> Vec<u8> {
        let clock = self.clock(self.me) + 1;
        self.inserts.insert((self.me, clock), byte);
        self.message(UPDATE, &encode_inserts([(self.me, clock, byte)]))
    }

    /// `[sender][type][body]`.
    fn message(&self, kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![self.me, kind];
        m.extend_from_slice(body);
        m
    }

    fn step1(&self) -> Vec<u8> {
        let mut sv = Vec::new();
        let clients: BTreeSet<u8> = self.inserts.keys().map(|(c, _)| *c).collect();
        for c in clients {
            sv.push(c);
            sv.extend_from_slice(&self.clock(c).to_be_bytes());
        }
        self.message(SYNC_STEP1, &sv)
    }

    /// Handles a sync message from another client; returns the answer to publish, if any.
    fn receive(&mut self, m: &[u8]) -> Option<Vec<u8>> {
        let (sender, kind, body) = (m[0], m[1], &m[2..]);
        if sender == self.me {
            return None;
        }
        match kind {
            SYNC_STEP1 => {
                let sv: HashMap<u8, u32> = body
                    .chunks(5)
                    .map(|c| (c[0], u32::from_be_bytes(c[1..5].try_into().expect("clock"))))
                    .collect();
                let missing = self
                    .inserts
                    .iter()
                    .filter(|((c, k), _)| *k > sv.get(c).copied().unwrap_or(0))
                    .map(|((c, k), b)| (*c, *k, *b));
                Some(self.message(SYNC_STEP2, &encode_inserts(missing)))
            }
            SYNC_STEP2 | UPDATE => {
                for i in body.chunks(6) {
                    let clock = u32::from_be_bytes(i[1..5].try_into().expect("clock"));
                    self.inserts.insert((i[0], clock), i[5]);
                }
                None
            }
            k => panic!("sync message type {k}"),
        }
    }

    fn text(&self) -> Vec<u8> {
        let mut v: Vec<_> = self.inserts.iter().collect();
        v.sort_by_key(|((c, k), _)| (*k, *c));
        v.into_iter().map(|(_, b)| *b).collect()
    }
}

fn encode_inserts(inserts: impl IntoIterator<Item = (u8, u32, u8)>) -> Vec<u8> {
    let mut out = Vec::new();
    for (c, k, b) in inserts {
        out.push(c);
        out.extend_from_slice(&k.to_be_bytes());
        out.push(b);
    }
    out
}

async fn binary_rooms_relay_a_yjs_style_sync_byte_exact_with_recovery(backend: Backend) {
    let server = start(
        backend,
        "[rooms]\npublish_rate = 0\n[[rooms.topic]]\nprefix = \"doc.\"\nbinary = true\n",
    );
    let topic = "doc.1";
    let (mut a, mut b, mut c) = (Doc::new(1), Doc::new(2), Doc::new(3));
    let mut ca = Client::connect(&server).await;
    ca.subscribe(topic).await;
    // A edits alone: bytes that are no valid UTF-8 and every edge value.
    let mut sent = Vec::new();
    for byte in [0x00, 0xff, b'h', 0x80, b'i'] {
        let u = a.edit(byte);
        ca.send_bin(topic, false, &u).await;
        sent.push(u);
    }
    for (i, u) in sent.iter().enumerate() {
        let m = ca.next_bin().await;
        assert_eq!(
            m,
            BinMsg {
                topic: topic.into(),
                seq: Some(i as u64 + 1),
                payload: u.clone()
            }
        );
    }

    // B recovers everything from history, byte for byte, in order.
    let mut cb = Client::connect(&server).await;
    let r = cb
        .subscribe_with(json!({"action": "subscribe", "topic": topic, "since": 0}))
        .await;
    assert_eq!(
        (&r["recovered"], &r["seq"]),
        (&json!(true), &json!(5)),
        "{r}"
    );
    let epoch = r["epoch"].clone();
    for (i, u) in sent.iter().enumerate() {
        let m = cb.next_bin().await;
        assert_eq!((m.seq, &m.payload), (Some(i as u64 + 1), u), "replay {i}");
        assert_eq!(b.receive(&m.payload), None);
    }
    assert_eq!(b.text(), a.text());

    // C joins without history and syncs with a step 1 that A answers (both volatile).
    let mut cc = Client::connect(&server).await;
    cc.subscribe(topic).await;
    cc.send_bin(topic, true, &c.step1()).await;
    let step1 = ca.next_bin().await;
    assert_eq!(step1.seq, None, "volatile: {step1:?}");
    let step2 = a.receive(&step1.payload).expect("A answers step 1");
    ca.send_bin(topic, true, &step2).await;
    loop {
        let m = cc.next_bin().await;
        if m.payload[1] == SYNC_STEP2 {
            c.receive(&m.payload);
            break;
        }
    }
    assert_eq!(c.text(), a.text());
    // B's copy of the step 1 and step 2 change nothing for it.
    for _ in 0..2 {
        let m = cb.next_bin().await;
        assert_eq!(m.seq, None);
        b.receive(&m.payload);
    }
    assert_eq!(b.text(), a.text());

    // B edits; everyone converges.
    for byte in [b'!', 0x01] {
        let u = b.edit(byte);
        cb.send_bin(topic, false, &u).await;
    }
    let mut last = 0;
    for (client, doc) in [(&mut ca, &mut a), (&mut cb, &mut b), (&mut cc, &mut c)] {
        let mut got = 0;
        while got < 2 {
            // Volatile sync messages still queued (a client's own echo) are skipped.
            let m = client.next_bin().await;
            if let Some(seq) = m.seq {
                last = seq;
                got += 1;
                doc.receive(&m.payload);
            }
        }
    }
    assert_eq!(last, 7);
    assert_eq!((a.text(), c.text()), (b.text(), b.text()));

    // B goes away, A edits, B comes back with since/epoch: exactly the missed updates.
    drop(cb);
    let mut missed = Vec::new();
    for byte in [b'x', 0xfe, b'y'] {
        let u = a.edit(byte);
        ca.send_bin(topic, false, &u).await;
        missed.push(u);
    }
    let mut cb = Client::connect(&server).await;
    let r = cb.subscribe_since(topic, last, &epoch).await;
    assert_eq!(r["recovered"], true, "{r}");
    for (i, u) in missed.iter().enumerate() {
        let m = cb.next_bin().await;
        assert_eq!((m.seq, &m.payload), (Some(last + 1 + i as u64), u));
        b.receive(&m.payload);
    }
    assert_eq!(b.text(), a.text());
    // Inserts ordered by (clock, client): A's 1..8 interleaved with B's 1..2.
    assert_eq!(
        b.text(),
        [0x00, b'!', 0xff, 0x01, b'h', 0x80, b'i', b'x', 0xfe, b'y']
    );

    // Wrong ways in: each has its error, the connection stays open.
    let id = cb.fresh_id();
    let e = cb
        .call(json!({"action": "publish", "topic": topic, "data": 1}), id)
        .await;
    assert_eq!(e["code"], "bad_binary", "{e}");
    for bad in [&[][..], &[9, 1, b't'][..], &[1, 200, b't'][..]] {
        within("send", cb.ws.send(Message::binary(bad.to_vec())))
            .await
            .expect("send");
        let e = cb.until("an error", |m| m["type"] == "error").await;
        assert_eq!(e["code"], "bad_binary", "{bad:?}: {e}");
    }
    cb.send_bin("chat", false, b"x").await;
    let e = cb.until("an error", |m| m["type"] == "error").await;
    assert_eq!(e["code"], "bad_binary", "{e}");
    let r = api_publish(&server, "", &json!({"topic": topic, "data": 1})).await;
    assert_eq!(r.status, 400, "{r:?}");
    // The JSON history of a binary topic lists none (replay is by `subscribe` with `since`).
    let id = cb.fresh_id();
    let h = cb
        .call(json!({"action": "history", "topic": topic}), id)
        .await;
    assert_eq!(h["messages"], json!([]), "{h}");
    cb.ping().await;
}
