//! No leak in the rooms: a million subscribe/unsubscribe cycles (each on a fresh topic, with a
//! publish in between so history and presence are used) leave the heap where it was. Measured
//! with a counting allocator around the system one, in process, without sockets: the hub's
//! state is plain data driven by its public API, as the shards drive it.

use std::rc::Rc;
use std::sync::Arc;

use ringgate::io::Backend;
use ringgate::rooms::conn::RoomConn;
use ringgate::rooms::{HubMsg, Now, Reply};
use ringgate::server::config::Config;
use ringgate::server::shard::{ServerState, Shard};

mod counting;

/// A million in release (`cargo test --release --test hub_memory`, which CI runs); fewer in the
/// debug suite, where a cycle is ten times slower.
const CYCLES: usize = if cfg!(debug_assertions) {
    50_000
} else {
    1_000_000
};

#[test]
fn a_million_subscribe_unsubscribe_cycles_leave_no_state_behind() {
    let mut config = Config::default();
    // History is kept (so the room outlives its last subscriber until the TTL sweep).
    config.rooms.history_size = 4;
    let shard = Shard::new(0, Arc::new(ServerState::new(config, Backend::Epoll)), None);
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

    // Warm up: let maps and queues reach their working size (hash tables settle on their
    // capacity within a few passes over the 50,000 topics).
    for i in 0..200_000 {
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
    // Hash maps keep their capacity; anything per cycle would be megabytes by now.
    assert!(
        grown < 64 * 1024,
        "heap grew by {grown} bytes over {CYCLES} cycles"
    );
    println!("heap before {before} B, after {after} B, grown {grown} B over {CYCLES} cycles");
}
