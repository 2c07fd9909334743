//! Baseline for the fan-out benchmark (`ringgate-load fanout`): a minimal tokio-tungstenite
//! broadcast server speaking the same subset of the rooms protocol as
//! `examples/node_ws_broadcast.js` (subscribe → subscribed with the topic's last seq; publish →
//! `{"type","topic","seq","data","timestamp"}` to every subscriber, per-topic seq; ping → pong),
//! written the way a typical Rust user would: current-thread tokio, one task per connection
//! reading, one writer task per connection fed by an unbounded channel, the message serialised
//! once per publish. With tungstenite 0.24 a text `Message` owns its `String`, so each
//! subscriber gets a clone of the serialised text (newer tungstenite shares it as `Bytes`).
//! The writer feeds everything queued and flushes once, so a burst is one write.
//!
//!     cargo run --release --example tungstenite_broadcast -- --port 8007
//!
//! Listens on 127.0.0.1 only; any path is accepted. No history, presence, auth or limits.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::rc::Rc;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

type Tx = mpsc::UnboundedSender<Message>;

#[derive(Default)]
struct Topic {
    seq: u64,
    subs: HashMap<u64, Tx>,
}

type Topics = Rc<RefCell<HashMap<String, Topic>>>;

fn port_from_args() -> u16 {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == "--port") {
        Some(i) => args
            .get(i + 1)
            .and_then(|p| p.parse().ok())
            .expect("--port needs a number"),
        None => 8007,
    }
}

fn now() -> f64 {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    ms as f64 / 1000.0
}

fn main() -> std::io::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let port = port_from_args();
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
        eprintln!("tungstenite broadcast (rooms subset) listening on 127.0.0.1:{port}");
        let topics: Topics = Rc::default();
        let mut next_id = 0u64;
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    next_id += 1;
                    tokio::task::spawn_local(serve(stream, next_id, topics.clone()));
                }
                Err(e) => {
                    // e.g. EMFILE: back off briefly instead of spinning.
                    eprintln!("accept failed: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            }
        }
    })
}

async fn serve(stream: TcpStream, id: u64, topics: Topics) {
    let _ = stream.set_nodelay(true);
    let Ok(ws) = tokio_tungstenite::accept_async(stream).await else {
        return;
    };
    let (mut sink, mut source) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    let writer = tokio::task::spawn_local(async move {
        while let Some(m) = rx.recv().await {
            if sink.feed(m).await.is_err() {
                return;
            }
            while let Ok(m) = rx.try_recv() {
                if sink.feed(m).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });
    let mut mine = HashSet::new();
    while let Some(Ok(msg)) = source.next().await {
        if let Message::Text(text) = msg {
            handle(&text, id, &tx, &topics, &mut mine);
        }
    }
    let mut all = topics.borrow_mut();
    for name in mine {
        if let Some(t) = all.get_mut(&name) {
            t.subs.remove(&id);
        }
    }
    drop(all);
    drop(tx);
    writer.abort();
}

fn reply(tx: &Tx, mut v: Value, id: Option<&Value>) {
    if let (Some(id), Some(o)) = (id, v.as_object_mut()) {
        o.insert("id".into(), id.clone());
    }
    let _ = tx.send(Message::Text(v.to_string()));
}

fn handle(text: &str, id: u64, tx: &Tx, topics: &Topics, mine: &mut HashSet<String>) {
    let Ok(m) = serde_json::from_str::<Value>(text) else {
        return reply(
            tx,
            json!({"type": "error", "error": "invalid JSON", "code": "bad_json"}),
            None,
        );
    };
    let rid = m.get("id");
    let topic = m.get("topic").and_then(Value::as_str);
    let action = m.get("action").and_then(Value::as_str).unwrap_or("");
    let missing =
        || json!({"type": "error", "error": "topic is required", "code": "missing_field"});
    match (action, topic) {
        ("subscribe", Some(name)) => {
            let mut all = topics.borrow_mut();
            let t = all.entry(name.to_string()).or_default();
            t.subs.insert(id, tx.clone());
            mine.insert(name.to_string());
            reply(
                tx,
                json!({"type": "subscribed", "topic": name, "seq": t.seq}),
                rid,
            );
        }
        ("unsubscribe", Some(name)) => {
            if let Some(t) = topics.borrow_mut().get_mut(name) {
                t.subs.remove(&id);
            }
            mine.remove(name);
            reply(tx, json!({"type": "unsubscribed", "topic": name}), rid);
        }
        ("publish", Some(name)) => {
            let mut all = topics.borrow_mut();
            let t = all.entry(name.to_string()).or_default();
            t.seq += 1;
            let ty = m.get("type").and_then(Value::as_str).unwrap_or("message");
            // Serialised once per publish.
            let out = json!({
                "type": ty,
                "topic": name,
                "seq": t.seq,
                "data": m.get("data").cloned().unwrap_or(Value::Null),
                "timestamp": now(),
            })
            .to_string();
            for sub in t.subs.values() {
                let _ = sub.send(Message::Text(out.clone()));
            }
            if rid.is_some() {
                reply(tx, json!({"type": "ack", "seq": t.seq}), rid);
            }
        }
        ("subscribe" | "unsubscribe" | "publish", None) => reply(tx, missing(), rid),
        ("ping", _) => reply(tx, json!({"type": "pong", "timestamp": now()}), rid),
        _ => reply(
            tx,
            json!({"type": "error", "error": format!("unknown action {action:?}"), "code": "unknown_action"}),
            rid,
        ),
    }
}
