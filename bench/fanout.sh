#!/usr/bin/env bash
# Fan-out baselines for ringgate's rooms endpoint: `ringgate-load fanout` against the Node `ws`
# broadcast server (examples/node_ws_broadcast.js) and the tokio-tungstenite one
# (examples/tungstenite_broadcast.rs). Server pinned to core 0, load tool to core 1, a fresh
# server per run, configurations interleaved. Targets 127.0.0.1 only.
#
#   npm install --prefix target/node ws@8
#   CARGO_TARGET_DIR=/work/target-load cargo build --release --bins --examples
#   BIN=/work/target-load/release bash bench/fanout.sh [REPS] > bench/raw-fanout.log
#
# Env: BIN, REPS (3), SERVERS ("node tungstenite"; add "ringgate" once /ws rooms exists: it is
# started with --shards 1 --io $IO on port 8003), CASES ("SUBS:RATE:MESSAGES ...", default
# "1000:20:200 10000:2:20": 20,000 deliveries/s for 10 s), SIZE (64).
set -u
BIN=${BIN:-target/release}
REPS=${1:-${REPS:-3}}
SERVERS=${SERVERS:-"node tungstenite"}
CASES=${CASES:-"1000:20:200 10000:2:20"}
SIZE=${SIZE:-64}
IO=${IO:-epoll}
NODE_MODULES=${NODE_MODULES:-target/node/node_modules}

PID=
start() { # NAME
    case $1 in
    node) (ulimit -n 20000; NODE_PATH=$NODE_MODULES exec taskset -c 0 node examples/node_ws_broadcast.js --port 8006) >/tmp/bench-fanout-server.log 2>&1 & PORT=8006 ;;
    tungstenite) (ulimit -n 20000; exec taskset -c 0 "$BIN/examples/tungstenite_broadcast" --port 8007) >/tmp/bench-fanout-server.log 2>&1 & PORT=8007 ;;
    ringgate) taskset -c 0 "$BIN/ringgate" --host 127.0.0.1 --shards 1 --port 8003 --io "$IO" >/tmp/bench-fanout-server.log 2>&1 & PORT=8003 ;;
    esac
    PID=$!
    for _ in $(seq 50); do
        (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "server $1 did not come up" >&2
    return 1
}
stop() {
    kill "$PID" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$PID" 2>/dev/null
    wait "$PID" 2>/dev/null
    PID=
}
trap '[ -n "$PID" ] && kill -9 "$PID" 2>/dev/null' EXIT

echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null) $(uname -r) nproc=$(nproc) node $(node --version)"
for rep in $(seq "$REPS"); do
    for case in $CASES; do
        IFS=: read -r subs rate msgs <<<"$case"
        for srv in $SERVERS; do
            start "$srv" || continue
            sleep 0.5
            echo "## fanout server=$srv subscribers=$subs rate=$rate rep=$rep loadavg=$(cut -d' ' -f1-3 /proc/loadavg)"
            taskset -c 1 timeout 200 "$BIN/ringgate-load" fanout --url "ws://127.0.0.1:$PORT/ws" \
                --subscribers "$subs" --publishers 1 --rate "$rate" --size "$SIZE" \
                --messages "$msgs" --drain 20 --duration-limit 150 --server-pid "$PID"
            echo "## exit $?"
            stop
        done
    done
done
