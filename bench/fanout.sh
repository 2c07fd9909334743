#!/usr/bin/env bash
# Fan-out baselines for ringgate's rooms endpoint: `ringgate-load fanout` against the Node `ws`
# broadcast server (examples/node_ws_broadcast.js) and the tokio-tungstenite one
# (examples/tungstenite_broadcast.rs). Server pinned to core 0, load tool to core 1, a fresh
# server per run, configurations interleaved. Targets 127.0.0.1 only.
#
#   npm install --prefix target/node ws@8
#   CARGO_TARGET_DIR=/work/target-load cargo build --release --workspace --bins --examples
#   BIN=/work/target-load/release bash bench/fanout.sh [REPS] > bench/raw-fanout.log
#
# Env: BIN, REPS (3), SERVERS ("node tungstenite"; add "ringgate" once /ws rooms exists: it is
# started with --shards 1 --io $IO on port 8003), CASES ("SUBS:RATE:MESSAGES ...", default
# "1000:20:200 10000:2:20": 20,000 deliveries/s for 10 s), SIZE (64), DRAIN (20 s), LIMIT (150 s, the load tool's --duration-limit).
# SERVERS may also name "ringgate-epoll" and "ringgate-uring" (ringgate with that --io) to
# interleave both backends in one session; a suffix "-wdSECONDS" sets `[rooms] write_delay`
# (e.g. "ringgate-epoll-wd0.2").
#
# PERF=1: count the server's syscalls (`perf stat -e raw_syscalls:sys_enter -p PID`, all
# threads) twice per run: "whole" from just after the server is up until 2 s after the load tool
# exits (setup and teardown included: subtract a run with --messages 1), and "window" from the
# load tool's `up:` line to its `delivered` line (perf attaches a few ms late, so it can miss the
# first publishes: a lower bound). Lines `SYSCALLS server=… window=N whole=N`. Run it separately
# from the CPU runs (perf's tracepoint adds a little server CPU).
# STRACE=1: `strace -c -f -p PID` from the `up:` line until 2 s after the load tool exits
# (slows the server a lot: use the counts, not the times; raise DRAIN); its table goes to the log.
set -u
. "$(dirname "$0")/lib.sh"
BIN=${BIN:-target/release}
REPS=${1:-${REPS:-3}}
SERVERS=${SERVERS:-"node tungstenite"}
CASES=${CASES:-"1000:20:200 10000:2:20"}
SIZE=${SIZE:-64}
IO=${IO:-epoll}
DRAIN=${DRAIN:-20}  # seconds the load tool waits for deliveries after the last publish
LIMIT=${LIMIT:-150} # the load tool's --duration-limit
NODE_MODULES=${NODE_MODULES:-target/node/node_modules}

PID=
start() { # NAME
    case $1 in
    node) (ulimit -n 20000; NODE_PATH=$NODE_MODULES exec taskset -c 0 node examples/node_ws_broadcast.js --port 8006) >/tmp/bench-fanout-server.log 2>&1 & PORT=8006 ;;
    tungstenite) (ulimit -n 20000; exec taskset -c 0 "$BIN/examples/tungstenite_broadcast" --port 8007) >/tmp/bench-fanout-server.log 2>&1 & PORT=8007 ;;
    ringgate*)
        local io=$IO wd=0
        case ${1%-wd*} in ringgate-epoll) io=epoll ;; ringgate-uring) io=uring ;; esac
        case $1 in *-wd*) wd=${1##*-wd} ;; esac
        # The load tool's publishers go faster than the default per-connection publish limit.
        printf '[rooms]\npublish_rate = 0\nwrite_delay = %s\n' "$wd" >/tmp/bench-fanout-ringgate.toml
        (ulimit -n 20000; exec taskset -c 0 "$BIN/ringgate" --config /tmp/bench-fanout-ringgate.toml --host 127.0.0.1 --shards 1 --port 8003 --io "$io") >/tmp/bench-fanout-server.log 2>&1 & PORT=8003 ;;
    esac
    PID=$!
    up "$1" "$PORT"
}
trap '[ -n "$PID" ] && kill -9 "$PID" 2>/dev/null' EXIT

echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null) $(uname -r) nproc=$(nproc) node $(node --version)"
for rep in $(seq "$REPS"); do
    for case in $CASES; do
        IFS=: read -r subs rate msgs <<<"$case"
        for srv in $SERVERS; do
            start "$srv" || continue
            sleep 0.5
            echo "## fanout server=$srv subscribers=$subs rate=$rate messages=$msgs rep=$rep loadavg=$(cut -d' ' -f1-3 /proc/loadavg)"
            WHOLE=
            if [ -n "${PERF:-}" ]; then
                perf stat -e raw_syscalls:sys_enter -x, -o /tmp/bench-fanout-perf-whole -p "$PID" &
                WHOLE=$!
                sleep 0.5
            fi
            rm -f /tmp/bench-fanout-aux.pid
            (ulimit -n 20000; exec taskset -c 1 timeout $((LIMIT + 50)) "$BIN/ringgate-load" fanout --url "ws://127.0.0.1:$PORT/ws" \
                --subscribers "$subs" --publishers 1 --rate "$rate" --size "$SIZE" \
                --messages "$msgs" --drain "$DRAIN" --duration-limit "$LIMIT" --server-pid "$PID" 2>&1
             echo "## exit $?") | while IFS= read -r line; do
                printf '%s\n' "$line"
                case $line in
                up:*)
                    if [ -n "${PERF:-}" ]; then
                        perf stat -e raw_syscalls:sys_enter -x, -o /tmp/bench-fanout-perf-window -p "$PID" &
                        echo $! >/tmp/bench-fanout-aux.pid
                    elif [ -n "${STRACE:-}" ]; then
                        strace -c -f -p "$PID" -o /tmp/bench-fanout-strace &
                        echo $! >/tmp/bench-fanout-aux.pid
                    fi ;;
                delivered*)
                    if [ -n "${PERF:-}" ] && [ -s /tmp/bench-fanout-aux.pid ]; then
                        kill -INT "$(cat /tmp/bench-fanout-aux.pid)"
                    fi ;;
                esac
            done
            sleep 2
            if [ -n "${PERF:-}" ]; then
                kill -INT "$WHOLE"; wait "$WHOLE"
                sleep 0.2
                count() { awk -F, '/raw_syscalls/ {print $1}' "$1" 2>/dev/null; }
                echo "SYSCALLS server=$srv subscribers=$subs messages=$msgs window=$(count /tmp/bench-fanout-perf-window) whole=$(count /tmp/bench-fanout-perf-whole)"
                rm -f /tmp/bench-fanout-perf-window /tmp/bench-fanout-perf-whole
            elif [ -n "${STRACE:-}" ] && [ -s /tmp/bench-fanout-aux.pid ]; then
                kill -INT "$(cat /tmp/bench-fanout-aux.pid)"
                for _ in $(seq 50); do kill -0 "$(cat /tmp/bench-fanout-aux.pid)" 2>/dev/null || break; sleep 0.1; done
                echo "## strace -c -f server=$srv subscribers=$subs messages=$msgs"
                cat /tmp/bench-fanout-strace
                rm -f /tmp/bench-fanout-strace
            fi
            stop
        done
    done
done
