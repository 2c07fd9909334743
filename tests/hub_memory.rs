//! No leak in the rooms: a million subscribe/unsubscribe cycles (each on a fresh topic, with a
//! publish in between so history and presence are used) leave the heap where it was; and no
//! amplification: presence churn in a watched room and history requests that are never read
//! cost at most the readers' outbound bound. Measured with a counting allocator around the
//! system one, in process, without sockets: the hub's state is plain data driven by its public
//! API, as the shards drive it.

use std::rc::Rc;
use std::sync::Arc;

use ringgate::io::Backend;
use ringgate::rooms::conn::RoomConn;
use ringgate::rooms::{HubMsg, Now, Reply};
use ringgate::server::config::Config;
use ringgate::server::shard::{ServerState, Shard};

mod counting;

/// The allocator's count is process-wide: the tests of this file take turns.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// A million in release (`cargo test --release --test hub_memory`, which CI runs); fewer in the
/// debug suite, where a cycle is ten times slower.
const CYCLES: usize = if cfg!(debug_assertions) {
    50_000
} else {
    1_000_000
};

const WARMUP: usize = 200_000;

#[test]
fn a_million_subscribe_unsubscribe_cycles_leave_no_state_behind() {
    let _turn = serial();
    let mut config = Config::default();
    // History is kept (so the room outlives its last subscriber until the TTL sweep).
    config.rooms.history_size = 4;
    let shard = Shard::new(
        0,
        Arc::new(ServerState::new(config, Backend::Epoll, 1)),
        None,
    );
    let reg = shard.register("127.0.0.1:9".parse().unwrap());
    let conn = Rc::new(RoomConn {
        entry: reg.entry.clone(),
        client_id: "c".into(),
        user: "anonymous".into(),
        topics: Default::default(),
    });
    shard.hub.with(|hub, _| hub.attach(conn.clone()));
    // The shard's once-a-second sweep, run with a clock far enough ahead that all history has
    // expired.
    let sweep_later = || {
        shard.hub.with(|hub, now| {
            let later = std::time::Duration::from_secs(3600);
            hub.sweep(Now {
                at: now.at + later,
                wall: now.wall + later.as_secs_f64(),
            })
        })
    };

    let cycle = |i: usize| {
        let topic = format!("topic-{}", i % 50_000);
        shard.hub.with(|hub, now| {
            hub.subscribe(now, &conn, &topic, None, None, Some(i.to_string()));
            hub.handle(
                now,
                HubMsg::Publish {
                    topic: topic.as_str().into(),
                    kind: "message".into(),
                    data: "{\"n\":1}".into(),
                    from: None,
                    reply: Reply::None,
                    opts: Default::default(),
                },
            );
            assert!(hub.unsubscribe(now, &conn, &topic));
        });
        conn.entry.mailbox.drain(drop);
        if i % 10_000 == 9_999 {
            sweep_later();
        }
    };

    // Warm up: let the connection's maps and queues reach their working size. The hub's
    // per-topic tables are freed by the sweep once empty: otherwise tombstones double the
    // rooms table (+3.7 MB) after a number of passes that depends on its random hash keys,
    // sometimes only inside the measured cycles.
    for i in 0..WARMUP {
        cycle(i);
    }
    sweep_later();
    conn.entry.mailbox.shrink();
    let before = counting::live();

    for i in 0..CYCLES {
        cycle(i);
        if i % 200_000 == 199_999 {
            println!("after {} cycles: {} B", i + 1, counting::live() - before);
        }
    }
    sweep_later();
    conn.entry.mailbox.shrink();
    let after = counting::live();

    assert_eq!(
        shard.hub.with(|hub, _| hub.counts()),
        (0, 0),
        "rooms or subscriptions left"
    );
    assert!(conn.topics.borrow().is_empty());
    let grown = after - before;
    // Every table is back at its size at `before`; anything per cycle would be megabytes.
    assert!(
        grown < 64 * 1024,
        "heap grew by {grown} bytes over {CYCLES} cycles"
    );
    println!("heap before {before} B, after {after} B, grown {grown} B over {CYCLES} cycles");
}

/// Presence churn and history amplification: a room with a subscriber that never reads sees
/// 20,000 members join and leave (each a presence event for it), and a client that never
/// reads asks 2,000 times for a 100-message history (~25 KB an answer). What the heap keeps
/// is bounded by the two readers' `max_outbound_bytes` (64 KiB here, so that a leak of a few
/// dozen bytes per event would show), not by the events or the requests: over the bound a
/// reader is a slow consumer and gets nothing more.
#[test]
fn presence_churn_and_history_requests_cost_at_most_the_readers_bound() {
    let _turn = serial();
    let mut config = Config::default();
    config.rooms.history_size = 100;
    config.max_outbound_bytes = 64 * 1024;
    let bound = config.max_outbound_bytes;
    let shard = Shard::new(
        0,
        Arc::new(ServerState::new(config, Backend::Epoll, 1)),
        None,
    );
    let new_conn = |name: &str| {
        let reg = shard.register("127.0.0.1:9".parse().unwrap());
        let conn = Rc::new(RoomConn {
            entry: reg.entry.clone(),
            client_id: name.into(),
            user: "anonymous".into(),
            topics: Default::default(),
        });
        shard.hub.with(|hub, _| hub.attach(conn.clone()));
        (reg, conn)
    };
    let (_w, watcher) = new_conn("watcher");
    let (_r, reader) = new_conn("reader");
    let big = format!("\"{}\"", "x".repeat(200));
    shard.hub.with(|hub, now| {
        hub.subscribe(now, &watcher, "busy", None, None, None);
        for _ in 0..100 {
            hub.handle(
                now,
                HubMsg::Publish {
                    topic: "busy".into(),
                    kind: "message".into(),
                    data: big.clone().into(),
                    from: None,
                    reply: Reply::None,
                    opts: Default::default(),
                },
            );
        }
    });
    let churn = |from: usize, to: usize| {
        for i in from..to {
            let (reg, member) = new_conn(&format!("m{i}"));
            shard.hub.with(|hub, now| {
                hub.subscribe(now, &member, "busy", None, None, None);
                assert!(hub.unsubscribe(now, &member, "busy"));
                hub.detach(now, member.entry.id);
            });
            member.entry.mailbox.drain(drop);
            drop(reg);
        }
    };
    let ask_history = |n: usize| {
        for _ in 0..n {
            shard.hub.with(|hub, now| {
                hub.route(
                    now,
                    "busy",
                    HubMsg::History {
                        topic: "busy".into(),
                        since: 0,
                        limit: 100,
                        reply: Reply::Conn {
                            to: ringgate::rooms::ConnRef {
                                shard: 0,
                                conn: reader.entry.id,
                            },
                            id: None,
                        },
                    },
                )
            });
        }
    };
    // Warm up the maps, then measure.
    churn(0, 1_000);
    let before = counting::live();
    churn(1_000, 21_000);
    ask_history(2_000);
    shard.hub.with(|hub, now| hub.sweep(now));
    let grown = (counting::live() - before).max(0) as usize;
    println!("heap grown {grown} B (bound {bound} B per reader)");
    // Both readers hit the bound: slow consumers, cut off (and closed with 1013 by their
    // sessions), their queues dropped.
    for c in [&watcher, &reader] {
        assert!(
            c.entry.mailbox.overflowed(),
            "{} was not cut off",
            c.client_id
        );
        assert!(c.entry.mailbox.backlog() <= bound);
    }
    assert!(
        grown < 2 * bound + (1 << 20),
        "heap grew by {grown} bytes (bound {bound} per reader)"
    );
}
