//! Every metric name and its help text, in one place, and how they are recorded.
//!
//! Per-message counts never touch a shared cache line: a shard counts in plain `Cell`s
//! ([`Traffic`]) and publishes the deltas to the recorder once a second. Per-connection events
//! (open, close, handshake failures) go to the recorder directly; they are rare next to messages.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, Unit};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

pub const CONNECTIONS_ACTIVE: &str = "ringgate_connections_active";
pub const CONNECTIONS_OPENED: &str = "ringgate_connections_opened_total";
pub const CONNECTIONS_CLOSED: &str = "ringgate_connections_closed_total";
pub const HANDSHAKES_FAILED: &str = "ringgate_handshakes_failed_total";
pub const MESSAGES_IN: &str = "ringgate_messages_in_total";
pub const MESSAGES_OUT: &str = "ringgate_messages_out_total";
pub const BYTES_IN: &str = "ringgate_bytes_in_total";
pub const BYTES_OUT: &str = "ringgate_bytes_out_total";
pub const TLS_HANDSHAKES: &str = "ringgate_tls_handshakes_total";
pub const TLS_RELOADS: &str = "ringgate_tls_reloads_total";
pub const HTTP_REQUESTS: &str = "ringgate_http_requests_total";
pub const HTTP2_CONNECTIONS: &str = "ringgate_http2_connections_total";
pub const HTTP2_WEBSOCKETS: &str = "ringgate_http2_websockets_total";
pub const INFO: &str = "ringgate_info";
pub const SLOW_CONSUMERS: &str = "ringgate_slow_consumer_closes_total";
pub const PANICS: &str = "ringgate_panics_total";
// ---- fallback transports (/sse, /poll, POST /publish) ----
pub const SSE_STREAMS: &str = "ringgate_sse_streams_total";
pub const SSE_ACTIVE: &str = "ringgate_sse_streams_active";
pub const SSE_EVENTS: &str = "ringgate_sse_events_total";
pub const POLL_REQUESTS: &str = "ringgate_poll_requests_total";
pub const HTTP_PUBLISHES: &str = "ringgate_http_publish_total";
pub const CONNECTIONS_REFUSED: &str = "ringgate_connections_refused_total";
pub const TOKENS_EXPIRED: &str = "ringgate_token_expired_closes_total";
pub const ROOMS: &str = "ringgate_rooms";
pub const SUBSCRIPTIONS: &str = "ringgate_subscriptions";
pub const PUBLISHED: &str = "ringgate_room_messages_published_total";
pub const HUB_OVERLOADED: &str = "ringgate_room_requests_overloaded_total";
pub const HUB_BACKLOG: &str = "ringgate_shard_backlog";
pub const VOLATILE_DROPPED: &str = "ringgate_volatile_dropped_total";
pub const FANOUT: &str = "ringgate_fanout_size";
pub const PUBLISH_LATENCY: &str = "ringgate_publish_to_queue_seconds";
pub const PUBLISH_TO_WRITE: &str = "ringgate_publish_to_write_seconds";
pub const OUTBOUND_BYTES: &str = "ringgate_outbound_queue_bytes";
pub const HISTORY_BYTES: &str = "ringgate_history_bytes";
pub const REDIS_UP: &str = "ringgate_redis_up";
pub const REDIS_CONNECTS: &str = "ringgate_redis_connects_total";
pub const REDIS_COMMANDS: &str = "ringgate_redis_commands_total";
pub const REDIS_REDIRECT_LOOPS: &str = "ringgate_redis_redirect_loops_total";
pub const CLUSTER_UNAVAILABLE: &str = "ringgate_cluster_unavailable_total";
// ---- agent gateway ----
pub const AGENT_UPSTREAM_REQUESTS: &str = "ringgate_agent_upstream_requests_total";
pub const AGENT_UPSTREAM_LATENCY: &str = "ringgate_agent_upstream_latency_seconds";
pub const AGENT_UPSTREAM_TIMEOUTS: &str = "ringgate_agent_upstream_timeouts_total";
pub const AGENT_BREAKER_STATE: &str = "ringgate_agent_breaker_state";
pub const AGENT_IN_FLIGHT: &str = "ringgate_agent_requests_in_flight";
pub const AGENT_CANCELLED: &str = "ringgate_agent_requests_cancelled_total";
// ---- reverse proxy ----
pub const PROXY_REQUESTS: &str = "ringgate_proxy_requests_total";
pub const PROXY_LATENCY: &str = "ringgate_proxy_upstream_latency_seconds";
pub const PROXY_RETRIES: &str = "ringgate_proxy_retries_total";
pub const PROXY_WEBSOCKETS: &str = "ringgate_proxy_websockets_active";
pub const PROXY_BYTES_IN: &str = "ringgate_proxy_bytes_in_total";
pub const PROXY_BYTES_OUT: &str = "ringgate_proxy_bytes_out_total";
pub const PROXY_UPSTREAM_HEALTHY: &str = "ringgate_proxy_upstream_healthy";
// ---- debug builds only ----
/// Heap bytes in use, exported only where [`CountingAlloc`] is the global allocator (the
/// binary's debug builds): tests/idle_memory.rs bounds what an idle connection holds with it.
pub const DEBUG_HEAP_BYTES: &str = "ringgate_debug_heap_bytes";

/// Every family that is exported from the start, at zero (the families labelled by a route or
/// an agent upstream: once per configured one).
pub const FROM_START: &[&str] = &[
    CONNECTIONS_ACTIVE,
    CONNECTIONS_OPENED,
    CONNECTIONS_CLOSED,
    HANDSHAKES_FAILED,
    CONNECTIONS_REFUSED,
    MESSAGES_IN,
    MESSAGES_OUT,
    BYTES_IN,
    BYTES_OUT,
    TLS_HANDSHAKES,
    TLS_RELOADS,
    HTTP_REQUESTS,
    HTTP2_CONNECTIONS,
    HTTP2_WEBSOCKETS,
    INFO,
    SLOW_CONSUMERS,
    TOKENS_EXPIRED,
    PANICS,
    ROOMS,
    SUBSCRIPTIONS,
    PUBLISHED,
    HUB_OVERLOADED,
    HUB_BACKLOG,
    OUTBOUND_BYTES,
    HISTORY_BYTES,
    AGENT_IN_FLIGHT,
    AGENT_CANCELLED,
    SSE_STREAMS,
    SSE_ACTIVE,
    SSE_EVENTS,
    POLL_REQUESTS,
    HTTP_PUBLISHES,
    FANOUT,
    PUBLISH_LATENCY,
    PUBLISH_TO_WRITE,
];

/// Histograms are exported as Prometheus histograms (buckets add up across shards and hosts;
/// the exporter's default summaries do not).
fn buckets(b: PrometheusBuilder) -> Result<PrometheusBuilder, BuildError> {
    const LATENCY: &[f64] = &[
        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
        0.5, 1.0, 2.5, 5.0,
    ];
    const UPSTREAM: &[f64] = &[
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ];
    const SUBSCRIBERS: &[f64] = &[1.0, 10.0, 100.0, 1_000.0, 10_000.0, 100_000.0];
    b.set_buckets_for_metric(Matcher::Full(PUBLISH_LATENCY.into()), LATENCY)?
        .set_buckets_for_metric(Matcher::Full(PUBLISH_TO_WRITE.into()), LATENCY)?
        .set_buckets_for_metric(Matcher::Full(AGENT_UPSTREAM_LATENCY.into()), UPSTREAM)?
        .set_buckets_for_metric(Matcher::Full(PROXY_LATENCY.into()), UPSTREAM)?
        .set_buckets_for_metric(Matcher::Full(FANOUT.into()), SUBSCRIBERS)
}

/// How often histogram samples are folded into their buckets.
pub const UPKEEP: Duration = Duration::from_secs(5);

/// Installs the Prometheus recorder (once per process) and describes every metric.
///
/// Histogram samples are queued until upkeep folds them into buckets; without it they would
/// pile up for as long as nobody scrapes `/metrics` (a sample per write under fan-out). A
/// small thread runs it every `upkeep`, off the shards.
pub fn install(upkeep: Duration, shards: usize) -> Option<PrometheusHandle> {
    let handle = buckets(PrometheusBuilder::new())
        .ok()?
        .install_recorder()
        .ok()?;
    let h = handle.clone();
    std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || loop {
            std::thread::sleep(upkeep);
            h.run_upkeep();
        })
        .ok()?;
    describe_gauge!(
        CONNECTIONS_ACTIVE,
        "Open WebSocket connections, by endpoint."
    );
    describe_counter!(
        CONNECTIONS_OPENED,
        "WebSocket connections accepted, by endpoint."
    );
    describe_counter!(
        CONNECTIONS_CLOSED,
        "WebSocket connections closed, by endpoint and the close code sent (none: the peer vanished)."
    );
    describe_counter!(
        HANDSHAKES_FAILED,
        "Refused WebSocket upgrades, by reason (bad_request, origin, capacity, draining)."
    );
    describe_counter!(MESSAGES_IN, "Data messages received, by endpoint.");
    describe_gauge!(
        REDIS_UP,
        "1 while the shard is connected to Redis ([cluster] engine = \"redis\")."
    );
    describe_counter!(REDIS_CONNECTS, "Connections made to Redis, by shard.");
    describe_counter!(REDIS_COMMANDS, "Commands sent to Redis, by shard.");
    describe_counter!(
        REDIS_REDIRECT_LOOPS,
        "Commands failed after following MAX_REDIRECTS MOVED/ASK redirections (an inconsistent Redis Cluster slot map), by shard."
    );
    describe_counter!(
        CLUSTER_UNAVAILABLE,
        "Rooms requests answered `unavailable` because Redis was down or too slow."
    );
    describe_counter!(MESSAGES_OUT, "Data messages sent, by endpoint.");
    describe_counter!(
        BYTES_IN,
        Unit::Bytes,
        "Bytes read from WebSocket clients, by endpoint."
    );
    describe_counter!(
        BYTES_OUT,
        Unit::Bytes,
        "Bytes written to WebSocket clients, by endpoint."
    );
    describe_counter!(
        TLS_HANDSHAKES,
        "TLS handshakes, by result (ok, error, timeout)."
    );
    describe_counter!(
        TLS_RELOADS,
        "TLS certificate reloads, by result (ok, error)."
    );
    describe_counter!(
        HTTP_REQUESTS,
        "Plain HTTP requests answered, by status code."
    );
    describe_counter!(
        HTTP2_CONNECTIONS,
        "Connections served with HTTP/2 (ALPN h2 or h2c prior knowledge)."
    );
    describe_counter!(
        HTTP2_WEBSOCKETS,
        "WebSockets opened over HTTP/2 streams (RFC 8441 extended CONNECT)."
    );
    describe_gauge!(INFO, "Build and runtime information (always 1).");
    describe_counter!(
        SLOW_CONSUMERS,
        "Connections closed with 1013 because their outbound queue went over max_outbound_bytes."
    );
    describe_counter!(SSE_STREAMS, "Server-sent event streams opened (/sse).");
    describe_gauge!(SSE_ACTIVE, "Open server-sent event streams.");
    describe_counter!(SSE_EVENTS, "Room messages sent as server-sent events.");
    describe_counter!(POLL_REQUESTS, "Long-poll requests answered (/poll).");
    describe_counter!(
        HTTP_PUBLISHES,
        "POST /publish requests, by result (ok or the error code)."
    );
    describe_counter!(
        PANICS,
        "Panics caught, by thread; one in a shard's own machinery ends the process (exit 70)."
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections or upgrades refused by [limits], by reason (capacity, per_ip, handshake_rate)."
    );
    describe_counter!(
        TOKENS_EXPIRED,
        "Sessions closed with 1008 because their token's exp passed."
    );
    describe_gauge!(ROOMS, "Rooms (topics) with state, by home shard.");
    describe_gauge!(
        SUBSCRIPTIONS,
        "Topic subscriptions of this shard's connections, by shard."
    );
    describe_counter!(
        PUBLISHED,
        "Room messages published (delivered to subscribers; volatile ones without a seq)."
    );
    describe_counter!(
        VOLATILE_DROPPED,
        "Volatile room messages not queued for a subscriber already over half its max_outbound_bytes."
    );
    describe_counter!(
        HUB_OVERLOADED,
        "Room requests (publish, presence, history) answered `overloaded`: a shard they need was over `max_shard_backlog`."
    );
    describe_gauge!(
        HUB_BACKLOG,
        "Rooms messages from other shards queued for this shard, not yet handled."
    );
    describe_histogram!(
        FANOUT,
        "Subscribers one room message was queued for, per shard and message."
    );
    describe_histogram!(
        PUBLISH_LATENCY,
        Unit::Seconds,
        "From a publish reaching the room's home shard to the message sitting in every subscriber queue of a shard."
    );
    describe_histogram!(
        PUBLISH_TO_WRITE,
        Unit::Seconds,
        "From a publish reaching the room's home shard to a subscriber's socket write that cleared its backlog, for its oldest message; sampled: one cleared backlog in 16 per shard."
    );
    describe_gauge!(
        OUTBOUND_BYTES,
        Unit::Bytes,
        "Bytes queued for WebSocket clients and not yet written, sampled per shard once a second."
    );
    describe_gauge!(
        HISTORY_BYTES,
        Unit::Bytes,
        "Bytes of room history held, by home shard."
    );
    // ---- agent gateway ----
    describe_counter!(
        AGENT_UPSTREAM_REQUESTS,
        "Agent gateway upstream requests, by target, kind (agent_query, streaming_query, tool_call) and status (the HTTP status, error, timeout, circuit_open)."
    );
    describe_histogram!(
        AGENT_UPSTREAM_LATENCY,
        Unit::Seconds,
        "Agent gateway: from sending an upstream request to its response head, by target and kind."
    );
    describe_counter!(
        AGENT_UPSTREAM_TIMEOUTS,
        "Agent gateway upstream timeouts, by target and phase (connect, first_byte, idle)."
    );
    describe_gauge!(
        AGENT_BREAKER_STATE,
        "Agent gateway circuit breaker per target and shard, as of its last request: 0 closed, 1 half-open, 2 open."
    );
    describe_gauge!(
        AGENT_IN_FLIGHT,
        "Agent gateway upstream requests in flight."
    );
    describe_counter!(
        AGENT_CANCELLED,
        "Agent gateway requests cancelled, by reason (client: a cancel message, disconnect)."
    );
    // ---- reverse proxy ----
    describe_counter!(
        PROXY_REQUESTS,
        "Requests and upgrades proxied, by route and status class (1xx-5xx) of the answer sent."
    );
    describe_histogram!(
        PROXY_LATENCY,
        Unit::Seconds,
        "Proxy: from sending a request upstream to its response head, by route."
    );
    describe_counter!(
        PROXY_RETRIES,
        "Proxy requests sent again to another upstream, by route."
    );
    describe_gauge!(
        PROXY_WEBSOCKETS,
        "Proxied WebSocket connections open, by route."
    );
    describe_counter!(
        PROXY_BYTES_IN,
        Unit::Bytes,
        "Proxy: body and tunnel bytes from clients to upstreams, by route."
    );
    describe_counter!(
        PROXY_BYTES_OUT,
        Unit::Bytes,
        "Proxy: body and tunnel bytes from upstreams to clients, by route."
    );
    describe_gauge!(
        PROXY_UPSTREAM_HEALTHY,
        "Proxy upstream health per route, upstream and shard, from the active health checks: 1 in service, 0 taken out."
    );
    export_from_start(shards);
    Some(handle)
}

/// Every family with zero values for its known label values, so that a fresh node already
/// exports what dashboards and `absent()` alerts look for. Histograms are registered without a
/// sample: the exporter renders a registered histogram with a zero count.
fn export_from_start(shards: usize) {
    const ENDPOINTS: [&str; 4] = ["echo", "agent", "rooms", "proxy"];
    for e in ENDPOINTS {
        gauge!(CONNECTIONS_ACTIVE, "endpoint" => e).set(0.0);
        for name in [
            CONNECTIONS_OPENED,
            MESSAGES_IN,
            MESSAGES_OUT,
            BYTES_IN,
            BYTES_OUT,
        ] {
            counter!(name, "endpoint" => e).absolute(0);
        }
        counter!(CONNECTIONS_CLOSED, "endpoint" => e, "code" => "1000").absolute(0);
    }
    for reason in [
        "bad_request",
        "origin",
        "auth",
        "capacity",
        "draining",
        "handshake_rate",
    ] {
        counter!(HANDSHAKES_FAILED, "reason" => reason).absolute(0);
    }
    for reason in ["capacity", "per_ip", "handshake_rate"] {
        counter!(CONNECTIONS_REFUSED, "reason" => reason).absolute(0);
    }
    for result in ["ok", "error", "timeout"] {
        counter!(TLS_HANDSHAKES, "result" => result).absolute(0);
    }
    for result in ["ok", "error"] {
        counter!(TLS_RELOADS, "result" => result).absolute(0);
    }
    counter!(HTTP_REQUESTS, "status" => "200").absolute(0);
    for name in [
        SLOW_CONSUMERS,
        TOKENS_EXPIRED,
        PUBLISHED,
        HUB_OVERLOADED,
        HTTP2_CONNECTIONS,
        HTTP2_WEBSOCKETS,
    ] {
        counter!(name).absolute(0);
    }
    for shard in 0..shards {
        counter!(PANICS, "thread" => format!("shard-{shard}")).absolute(0);
        let shard = shard.to_string();
        for name in [
            ROOMS,
            SUBSCRIPTIONS,
            HISTORY_BYTES,
            OUTBOUND_BYTES,
            HUB_BACKLOG,
        ] {
            gauge!(name, "shard" => shard.clone()).set(0.0);
        }
    }
    for name in [FANOUT, PUBLISH_LATENCY, PUBLISH_TO_WRITE] {
        let _registered = metrics::histogram!(name);
    }
    gauge!(AGENT_IN_FLIGHT).set(0.0);
    counter!(SSE_STREAMS).absolute(0);
    gauge!(SSE_ACTIVE).set(0.0);
    counter!(SSE_EVENTS).absolute(0);
    counter!(POLL_REQUESTS).absolute(0);
    counter!(HTTP_PUBLISHES, "result" => "ok").absolute(0);
    for reason in ["client", "disconnect"] {
        counter!(AGENT_CANCELLED, "reason" => reason).absolute(0);
    }
}

// ---- agent gateway ----
/// An agent upstream's families at zero, before its first request: requests (status `200`),
/// latency and timeouts by kind and phase. The breaker gauge is published by each shard.
pub fn export_agent_target(target: &str, kinds: &[&'static str], phases: &[&'static str]) {
    for &kind in kinds {
        counter!(AGENT_UPSTREAM_REQUESTS, "target" => target.to_string(), "kind" => kind, "status" => "200")
            .increment(0);
        let _registered = metrics::histogram!(AGENT_UPSTREAM_LATENCY, "target" => target.to_string(), "kind" => kind);
    }
    for &phase in phases {
        counter!(AGENT_UPSTREAM_TIMEOUTS, "target" => target.to_string(), "phase" => phase)
            .increment(0);
    }
}

pub fn agent_request(target: &str, kind: &'static str, status: &str) {
    counter!(AGENT_UPSTREAM_REQUESTS, "target" => target.to_string(), "kind" => kind, "status" => status.to_string())
        .increment(1);
}

pub fn agent_latency(target: &str, kind: &'static str, d: std::time::Duration) {
    metrics::histogram!(AGENT_UPSTREAM_LATENCY, "target" => target.to_string(), "kind" => kind)
        .record(d.as_secs_f64());
}

pub fn agent_timeout(target: &str, phase: &'static str) {
    counter!(AGENT_UPSTREAM_TIMEOUTS, "target" => target.to_string(), "phase" => phase)
        .increment(1);
}

pub fn agent_breaker(target: &str, shard: usize, state: f64) {
    gauge!(AGENT_BREAKER_STATE, "target" => target.to_string(), "shard" => shard.to_string())
        .set(state);
}

pub fn agent_in_flight(delta: f64) {
    gauge!(AGENT_IN_FLIGHT).increment(delta);
}

pub fn agent_cancelled(reason: &'static str, n: usize) {
    counter!(AGENT_CANCELLED, "reason" => reason).increment(n as u64);
}

/// Records the static information gauge.
pub fn record_info(io: &'static str, shards: usize) {
    gauge!(INFO, "version" => env!("CARGO_PKG_VERSION"), "io" => io, "shards" => shards.to_string())
        .set(1.0);
}

/// A shard's message and byte counts for one endpoint, published by [`Traffic::publish`].
#[derive(Debug, Default)]
pub struct Traffic {
    pub messages_in: Cell<u64>,
    pub messages_out: Cell<u64>,
    pub bytes_in: Cell<u64>,
    pub bytes_out: Cell<u64>,
    /// Cleared backlogs, for sampling the publish-to-write latency.
    cleared: Cell<u32>,
}

/// One cleared backlog in this many gives a publish-to-write sample. Under low fan-out every
/// delivery clears a backlog, and a sample (clock read, recorder lookup, queue push: ~300 ns)
/// would be ~4 % of the delivery's cost.
const PUBLISH_TO_WRITE_SAMPLING: u32 = 16;

impl Traffic {
    #[inline]
    pub fn add(cell: &Cell<u64>, n: u64) {
        cell.set(cell.get() + n);
    }

    /// A connection wrote everything it held; its oldest broadcast was published at
    /// `published`. Sampled, see [`PUBLISH_TO_WRITE_SAMPLING`].
    #[inline]
    pub fn written(&self, published: std::time::Instant) {
        let n = self.cleared.get().wrapping_add(1);
        self.cleared.set(n);
        if n % PUBLISH_TO_WRITE_SAMPLING == 1 {
            metrics::histogram!(PUBLISH_TO_WRITE).record(published.elapsed().as_secs_f64());
        }
    }

    /// Moves the counts gathered since the last call to the recorder.
    pub fn publish(&self, endpoint: &'static str) {
        for (name, cell) in [
            (MESSAGES_IN, &self.messages_in),
            (MESSAGES_OUT, &self.messages_out),
            (BYTES_IN, &self.bytes_in),
            (BYTES_OUT, &self.bytes_out),
        ] {
            let n = cell.take();
            if n > 0 {
                counter!(name, "endpoint" => endpoint).increment(n);
            }
        }
    }
}

/// The allocator `A`, counting the bytes it has handed out and not yet taken back (one relaxed
/// atomic add per call: the binary installs it in debug builds only).
pub struct CountingAlloc<A>(pub A);

static HEAP_LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards every call to `A` unchanged and only counts sizes.
unsafe impl<A: GlobalAlloc> GlobalAlloc for CountingAlloc<A> {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        HEAP_LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        self.0.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        HEAP_LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        self.0.alloc_zeroed(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        HEAP_LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        self.0.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        HEAP_LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        self.0.realloc(p, l, new)
    }
}

/// Sets [`DEBUG_HEAP_BYTES`] to the heap in use, when a [`CountingAlloc`] counts it.
pub fn record_heap() {
    let live = HEAP_LIVE.load(Ordering::Relaxed);
    if live > 0 {
        gauge!(DEBUG_HEAP_BYTES).set(live as f64);
    }
}
