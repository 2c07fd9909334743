#!/usr/bin/env bash
# Runs the echo and idle-memory matrix behind bench/RESULTS.md. Server pinned to core 0, load
# tool to core 1; every run gets a fresh server; configurations are interleaved so that drifting
# background load hits each of them alike. Targets 127.0.0.1 only.
#
#   CARGO_TARGET_DIR=target-bench cargo build --release --workspace --bins --examples
#   bash bench/run.sh [REPS] > bench/raw.log
#
# Env: BIN (default target-bench/release), REPS (3), MESSAGES (200000), IDLE (1 = also run the
# idle-memory part), IDLE_CONNS (10000), ECHO_ARGS (extra echo options, e.g. "--pipeline 8"),
# CFGS (servers, default "uring epoll tungstenite"; "uws" runs uWebSockets from $UWS_BIN, built
# with ../shared/peers/uws/build.sh).
set -u
. "$(dirname "$0")/lib.sh"
BIN=${BIN:-target-bench/release}
REPS=${1:-${REPS:-3}}
MESSAGES=${MESSAGES:-200000}
IDLE=${IDLE:-1}
IDLE_CONNS=${IDLE_CONNS:-10000}
LOAD="$BIN/ringgate-load"

PID=
start() { # NAME
    case $1 in
    uring) taskset -c 0 "$BIN/ringgate" --host 127.0.0.1 --shards 1 --port 8003 --io uring >/tmp/bench-server.log 2>&1 & PORT=8003 ;;
    epoll) taskset -c 0 "$BIN/ringgate" --host 127.0.0.1 --shards 1 --port 8003 --io epoll >/tmp/bench-server.log 2>&1 & PORT=8003 ;;
    tungstenite) taskset -c 0 "$BIN/examples/tungstenite_echo" --port 8004 >/tmp/bench-server.log 2>&1 & PORT=8004 ;;
    uws) taskset -c 0 "${UWS_BIN:?set UWS_BIN}" 8005 echo >/tmp/bench-server.log 2>&1 & PORT=8005 ;;
    esac
    PID=$!
    up "$1" "$PORT"
}
trap '[ -n "$PID" ] && kill -9 "$PID" 2>/dev/null' EXIT

echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null) $(uname -r) nproc=$(nproc)"
for rep in $(seq "$REPS"); do
    for cfg in ${CFGS:-uring epoll tungstenite}; do
        start $cfg || continue
        sleep 0.3
        echo "## echo cfg=$cfg rep=$rep loadavg=$(cut -d' ' -f1-3 /proc/loadavg)"
        # shellcheck disable=SC2086
        taskset -c 1 timeout 120 "$LOAD" echo --url "ws://127.0.0.1:$PORT/ws/echo" \
            --connections 100 --size 32 --messages "$MESSAGES" --server-pid "$PID" ${ECHO_ARGS:-}
        stop
    done
done
if [ "$IDLE" = 1 ]; then
    for cfg in ${CFGS:-uring epoll tungstenite}; do
        for touch in "" "--touch"; do
            start $cfg || continue
            sleep 0.3
            echo "## idle cfg=$cfg touch=${touch:-no} loadavg=$(cut -d' ' -f1-3 /proc/loadavg)"
            taskset -c 1 timeout 200 "$LOAD" idle --url "ws://127.0.0.1:$PORT/ws/echo" \
                --connections "$IDLE_CONNS" --hold 5 --settle 2 --server-pid "$PID" $touch
            stop
        done
    done
fi
