#!/usr/bin/env bash
# Server CPU with metrics recording on (the default) against `metrics = false`, for the echo and
# the rooms fan-out load (bench/METRICS.md). Server pinned to core 0 (--shards 1), load tool to
# core 1, a fresh server per run, on/off interleaved (the order flips every rep). Targets
# 127.0.0.1 only; every load run is bounded by `timeout`.
#
#   BIN=/tmp/ringgate-flamegraphs/bin bash bench/metrics_overhead.sh [REPS] > bench/raw-metrics-overhead.log
#   python3 bench/summarize_metrics_overhead.py bench/raw-metrics-overhead.log
#
# Env: BIN (target-bench/release; needs ringgate and ringgate-load), REPS (5),
#      CASES ("echo-epoll fanout-epoll echo-uring"), MESSAGES (400000, echo),
#      FANOUT_MESSAGES (600), RATE (500), SUBS (1000),
#      LOCK (/tmp/ringgate-bench.lock: held for one rep at a time, i.e. every case on and off,
#      about 15 s, and released between reps; empty = no lock),
#      QUIET_WAIT (300): before each rep, wait (without the lock) up to this many seconds for the
#      machine to be quiet (< MAX_BUSY cores, default 0.5, busy over 3 s), take the lock, check
#      again; if busy, release it and start over, up to TRIES (5) times, then go ahead anyway
#      (the load tool logs the other processes' CPU of every run as other_cores).
set -u
. "$(dirname "$0")/lib.sh"
BIN=${BIN:-target-bench/release}
REPS=${1:-${REPS:-5}}
CASES=${CASES:-"echo-epoll fanout-epoll echo-uring"}
MESSAGES=${MESSAGES:-400000}
FANOUT_MESSAGES=${FANOUT_MESSAGES:-600}
RATE=${RATE:-500}
SUBS=${SUBS:-1000}
LOCK=${LOCK-/tmp/ringgate-bench.lock}
QUIET_WAIT=${QUIET_WAIT:-300}
MAX_BUSY=${MAX_BUSY:-0.5}
TRIES=${TRIES:-5}

# Both configs carry the rooms section the fan-out load needs (the load tool's publisher goes
# faster than the default per-connection publish limit); they differ only in `metrics`.
for m in on off; do
    v=true; [ $m = off ] && v=false
    printf 'metrics = %s\n\n[rooms]\npublish_rate = 0\n' "$v" >/tmp/bench-metrics-$m.toml
done

busy_cores() { # cores busy over a 3 s window, from /proc/stat (nothing of ours runs meanwhile)
    local a b
    a=$(awk '/^cpu /{print $2+$3+$4+$5+$6+$7+$8+$9, $5+$6}' /proc/stat)
    sleep 3
    b=$(awk '/^cpu /{print $2+$3+$4+$5+$6+$7+$8+$9, $5+$6}' /proc/stat)
    echo "$a $b $(nproc)" | awk '{t=$3-$1; i=$4-$2; printf "%.2f", (t>0 ? $5*(1-i/t) : 0)}'
}
wait_quiet() {
    local end=$((SECONDS + QUIET_WAIT)) b
    while :; do
        b=$(busy_cores)
        if awk -v b="$b" -v m="$MAX_BUSY" 'BEGIN{exit !(b < m)}'; then echo "quiet: $b cores busy"; return; fi
        if [ $SECONDS -ge $end ]; then echo "still busy after ${QUIET_WAIT}s: $b cores busy"; return; fi
    done
}

PID=
start() { # IO METRICS
    (ulimit -n 20000; exec taskset -c 0 "$BIN/ringgate" --config "/tmp/bench-metrics-$2.toml" --host 127.0.0.1 --shards 1 --port 8003 --io "$1") >/tmp/bench-metrics-server.log 2>&1 &
    PID=$!
    up "ringgate --io $1 metrics=$2" 8003
}
trap '[ -n "$PID" ] && kill -9 "$PID" 2>/dev/null' EXIT

run() { # CASE METRICS REP
    local kind=${1%-*} io=${1#*-}
    start "$io" "$2" || return
    sleep 0.5
    # /metrics answers 200 with recording on and 404 with it off: checks the config took.
    local code
    code=$(timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/8003; printf "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n" >&3; head -1 <&3' | tr -d '\r')
    echo "## case=$1 metrics=$2 rep=$3 /metrics: $code; loadavg=$(cut -d' ' -f1-3 /proc/loadavg)"
    case $kind in
    echo)
        taskset -c 1 timeout 120 "$BIN/ringgate-load" echo --url ws://127.0.0.1:8003/ws/echo \
            --connections 100 --size 32 --messages "$MESSAGES" --pipeline 8 --server-pid "$PID" 2>&1 ;;
    fanout)
        (ulimit -n 20000; exec taskset -c 1 timeout 200 "$BIN/ringgate-load" fanout --url ws://127.0.0.1:8003/ws \
            --subscribers "$SUBS" --publishers 1 --rate "$RATE" --messages "$FANOUT_MESSAGES" --size 64 \
            --drain 20 --duration-limit 150 --server-pid "$PID" 2>&1) ;;
    esac
    echo "## exit $?"
    stop
}

echo "# $(date -u +%FT%TZ) commit $(cat "$BIN/commit" 2>/dev/null || git rev-parse --short HEAD) $(uname -r) nproc=$(nproc) ringgate sha256 $(sha256sum "$BIN/ringgate" | cut -c1-16)"
echo "# cases: $CASES; reps $REPS; echo 100 conns x 32 B x $MESSAGES msgs, pipeline 8; fanout $SUBS subs, 1 publisher, $RATE/s, $FANOUT_MESSAGES msgs, 64 B"
for rep in $(seq "$REPS"); do
    order="on off"
    [ $((rep % 2)) = 0 ] && order="off on"
    b=
    for try in $(seq "$TRIES"); do
        q=$(wait_quiet)
        [ -n "$LOCK" ] || break
        exec 9>"$LOCK"
        flock 9
        b=$(busy_cores)
        awk -v b="$b" -v m="$MAX_BUSY" 'BEGIN{exit !(b < m)}' && break
        [ "$try" = "$TRIES" ] && break
        echo "# rep $rep: $b cores busy once $LOCK was ours ($(date -u +%T)); released, waiting again"
        exec 9>&-
    done
    echo "# rep $rep: $q; under the lock: ${b:-unchecked} cores busy ($(date -u +%T))"
    for case in $CASES; do
        for m in $order; do
            run "$case" "$m" "$rep"
        done
    done
    [ -n "$LOCK" ] && exec 9>&-
    sleep 1 # let another bench take the lock
done
