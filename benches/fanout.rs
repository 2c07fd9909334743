//! The in-process fan-out path: one publish on a topic's home shard reaching N local
//! subscribers' queues, and each subscriber's session moving it into its outbox (everything a
//! broadcast costs before the socket write).
//!
//! * `shared/N`: ringgate's path: the frame is encoded once and every subscriber queues the same
//!   frame (a shard-local `Rc`: a plain increment, no copy, no atomic).
//! * `per_subscriber/N`: the baseline many servers use: the message is framed (header + copy)
//!   for each subscriber.
//!
//! Throughput is in deliveries (subscribers), so the figure is the cost per delivered message.
//!
//!     cargo bench --bench fanout

use std::hint::black_box;
use std::io::IoSlice;
use std::rc::Rc;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ringgate::io::Backend;
use ringgate::rooms::conn::RoomConn;
use ringgate::rooms::{HubMsg, Reply};
use ringgate::server::config::Config;
use ringgate::server::shard::{Registration, ServerState, Shard};
use ringgate::ws::frame::OpCode;
use ringgate::ws::mailbox::{FrameForm, Outgoing};
use ringgate::ws::outbox::{Outbox, MAX_IOVECS};

const SUBSCRIBERS: [usize; 2] = [1_000, 10_000];
const DATA: &str = r#"{"ts":1730000000123456789,"pad":"xxxxxxxx"}"#;

struct Setup {
    shard: Rc<Shard>,
    _regs: Vec<Registration>,
    conns: Vec<Rc<RoomConn>>,
    outboxes: Vec<Outbox>,
}

fn setup(n: usize) -> Setup {
    let mut config = Config::default();
    config.rooms.history_size = 0;
    let shard = Shard::new(
        0,
        Arc::new(ServerState::new(config, Backend::Epoll, 1)),
        None,
    );
    let mut regs = Vec::with_capacity(n);
    let mut conns = Vec::with_capacity(n);
    for i in 0..n {
        let reg = shard.register(format!("127.0.0.1:{}", 1024 + i % 60000).parse().unwrap());
        let conn = Rc::new(RoomConn {
            entry: reg.entry.clone(),
            client_id: format!("{i:x}").into(),
            user: "anonymous".into(),
            topics: Default::default(),
        });
        shard.hub.with(|hub, now| {
            hub.attach(conn.clone());
            hub.subscribe(now, &conn, "bench", None, None, None);
        });
        conns.push(conn);
        regs.push(reg);
    }
    // Take the `subscribed` replies.
    for c in &conns {
        c.entry.mailbox.drain(drop);
    }
    Setup {
        shard,
        _regs: regs,
        conns,
        outboxes: (0..n).map(|_| Outbox::default()).collect(),
    }
}

/// What a session does with its queue on its next turn, minus the write.
fn take(out: &mut Outbox, item: Outgoing) {
    match item {
        Outgoing::Broadcast(b) => out.shared(b, FrameForm::Plain),
        Outgoing::Text(t) => out.frame(OpCode::Text, &t),
    }
}

fn written(out: &mut Outbox) -> usize {
    let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
    let k = out.slices(&mut slices);
    let n: usize = slices[..k].iter().map(|s| s.len()).sum();
    out.advance(n);
    n
}

fn fanout(c: &mut Criterion) {
    let mut g = c.benchmark_group("fanout");
    for n in SUBSCRIBERS {
        g.throughput(Throughput::Elements(n as u64));
        let mut s = setup(n);
        g.bench_with_input(BenchmarkId::new("shared", n), &n, |b, _| {
            b.iter(|| {
                s.shard.hub.with(|hub, now| {
                    hub.handle(
                        now,
                        HubMsg::Publish {
                            topic: "bench".into(),
                            kind: "message".into(),
                            data: DATA.into(),
                            from: None,
                            reply: Reply::None,
                            opts: Default::default(),
                        },
                    )
                });
                let mut total = 0;
                for (c, out) in s.conns.iter().zip(s.outboxes.iter_mut()) {
                    c.entry.mailbox.drain(|item| take(out, item));
                    total += written(out);
                }
                black_box(total)
            })
        });
        let payload = ringgate::rooms::proto::room_message(
            "message",
            "bench",
            Some(1),
            DATA,
            None,
            1.7e9,
            None,
        );
        let mut outboxes: Vec<Outbox> = (0..n).map(|_| Outbox::default()).collect();
        g.bench_with_input(BenchmarkId::new("per_subscriber", n), &n, |b, _| {
            b.iter(|| {
                let mut total = 0;
                for out in outboxes.iter_mut() {
                    out.frame(OpCode::Text, payload.as_bytes());
                    total += written(out);
                }
                black_box(total)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, fanout);
criterion_main!(benches);
