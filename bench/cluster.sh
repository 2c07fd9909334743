#!/usr/bin/env bash
# Rooms fan-out in memory mode (one node) against Redis mode (two nodes sharing a Redis), on one
# machine: `ringgate-load fanout` with SUBS subscribers, split over both nodes in Redis mode,
# and one publisher on the first node. Every ringgate node runs one shard pinned to core 0;
# Redis and the load tool run on core 1. Figures: each node's CPU time from the first publish
# to the last delivery (utime+stime), publish-to-delivery latency over all subscribers, and
# Redis commands per published message (INFO commandstats). 127.0.0.1 only; every run is
# bounded (--messages, --duration-limit).
#
#   apt-get install redis-server
#   cargo build --release -p ringgate -p ringgate-load
#   bash bench/cluster.sh [REPS] > bench/raw-cluster.log
#
# Env: BIN (target/release), REPS (2), SUBS (10000), RATE (2), MESSAGES (20), SIZE (64),
# IO (epoll), REDIS_PORT (16379).
set -u
. "$(dirname "$0")/lib.sh"
BIN=${BIN:-target/release}
REPS=${1:-${REPS:-2}}
SUBS=${SUBS:-10000}
RATE=${RATE:-2}
MESSAGES=${MESSAGES:-20}
SIZE=${SIZE:-64}
IO=${IO:-epoll}
REDIS_PORT=${REDIS_PORT:-16379}
DIR=$(mktemp -d /tmp/bench-cluster.XXXXXX)
PIDS=()
trap 'for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done; rm -rf "$DIR"' EXIT

redis() { redis-cli -p "$REDIS_PORT" "$@"; }

node() { # PORT ENGINE: starts a node on core 0, sets PID
    printf '[rooms]\npublish_rate = 0\n[cluster]\nengine = "%s"\nredis_url = "redis://127.0.0.1:%s"\n' \
        "$2" "$REDIS_PORT" >"$DIR/$1.toml"
    (ulimit -n 20000; exec taskset -c 0 "$BIN/ringgate" --config "$DIR/$1.toml" --host 127.0.0.1 \
        --shards 1 --port "$1" --admin-listen off --io "$IO") >"$DIR/$1.log" 2>&1 &
    PID=$!
    PIDS+=("$PID")
    up "node $1" "$1"
}

taskset -c 1 redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$DIR" >"$DIR/redis.log" 2>&1 &
PIDS+=("$!")
until redis ping >/dev/null 2>&1; do sleep 0.1; done

load() { # URL SERVER-PID [extra args…]
    local url=$1 pid=$2
    shift 2
    (ulimit -n 20000; exec taskset -c 1 timeout 200 "$BIN/ringgate-load" fanout --url "$url" \
        --subscribers "$SUBS" --publishers 1 --rate "$RATE" --size "$SIZE" \
        --messages "$MESSAGES" --drain 20 --duration-limit 150 --server-pid "$pid" "$@" 2>&1)
}

echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null) $(uname -r) nproc=$(nproc) $(redis-server --version | cut -d' ' -f3)"
for rep in $(seq "$REPS"); do
    echo "## memory subscribers=$SUBS rate=$RATE messages=$MESSAGES rep=$rep loadavg=$(cut -d' ' -f1-3 /proc/loadavg)"
    node 18101 memory
    load "ws://127.0.0.1:18101/ws" "$PID"
    stop

    echo "## redis nodes=2 subscribers=$SUBS rate=$RATE messages=$MESSAGES rep=$rep loadavg=$(cut -d' ' -f1-3 /proc/loadavg)"
    redis flushall >/dev/null
    node 18102 redis
    A=$PID
    node 18103 redis
    B=$PID
    redis config resetstat >/dev/null
    load "ws://127.0.0.1:18102/ws" "$A" --also-server-pid "$B" \
        --subscriber-url "ws://127.0.0.1:18102/ws" --subscriber-url "ws://127.0.0.1:18103/ws"
    echo "## redis commandstats (every node, whole run: subscribes included)"
    redis info commandstats | grep -E '^cmdstat_(evalsha|subscribe|unsubscribe|publish|hello|script)'
    echo "## redis total_commands_processed $(redis info stats | grep -E '^total_commands_processed' | cut -d: -f2)"
    PID=$B; stop
    PID=$A; stop
done
