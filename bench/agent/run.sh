#!/usr/bin/env bash
# Agent gateway overhead (bench/AGENT.md): 1,000 concurrent SSE streams read directly from the
# upstream, then through ringgate's /ws/agent (one shard, io_uring and epoll). ringgate is
# pinned to core 1; the upstream and the client share core 0. 127.0.0.1 only.
#
#   CARGO_TARGET_DIR=target-bench cargo build --release --bin ringgate --example agent_bench
#   bash bench/agent/run.sh [REPS]
#
# Env: BIN (target-bench/release), STREAMS (1000), CHUNKS (100), INTERVAL_MS (50; 0 = as fast
# as possible), RG_PORT (18103), UP_PORT (18104).
set -u
BIN=${BIN:-target-bench/release}
REPS=${1:-3}
STREAMS=${STREAMS:-1000}
CHUNKS=${CHUNKS:-100}
INTERVAL_MS=${INTERVAL_MS:-50}
RG_PORT=${RG_PORT:-18103}
UP_PORT=${UP_PORT:-18104}
ulimit -n 65536 2>/dev/null || true

wait_port() {
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "nothing on port $1" >&2
    return 1
}

taskset -c 0 "$BIN/examples/agent_bench" upstream --port "$UP_PORT" --chunks "$CHUNKS" \
    --interval-ms "$INTERVAL_MS" 2>/dev/null &
UP=$!
trap 'kill $UP 2>/dev/null' EXIT
wait_port "$UP_PORT"
echo "# streams=$STREAMS chunks=$CHUNKS interval_ms=$INTERVAL_MS $(date -u +%FT%TZ)"
for rep in $(seq "$REPS"); do
    echo -n "direct   rep=$rep "
    taskset -c 0 "$BIN/examples/agent_bench" client --url "http://127.0.0.1:$UP_PORT" --streams "$STREAMS"
    for io in uring epoll; do
        taskset -c 1 "$BIN/ringgate" --host 127.0.0.1 --port "$RG_PORT" --shards 1 --io "$io" \
            --agent-upstream "http://127.0.0.1:$UP_PORT" >/tmp/agent-bench-ringgate.log 2>&1 &
        RG=$!
        wait_port "$RG_PORT"
        echo -n "ringgate-$io rep=$rep "
        taskset -c 0 "$BIN/examples/agent_bench" client --url "ws://127.0.0.1:$RG_PORT/ws/agent" --streams "$STREAMS" | tr -d '\n'
        # ringgate's CPU time for the whole run (utime + stime, in clock ticks).
        read -r -a st < "/proc/$RG/stat"
        echo " ringgate_cpu_s=$(( (st[13] + st[14]) * 100 / $(getconf CLK_TCK) ))e-2"
        kill "$RG"
        wait "$RG" 2>/dev/null
    done
done
