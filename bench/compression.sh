#!/usr/bin/env bash
# The permessage-deflate matrix behind bench/COMPRESSION.md: echo (server CPU per message,
# throughput, latency) and memory per connection, ringgate (io_uring, epoll) against Node `ws`.
# Server pinned to core 0, load tool to core 1, a fresh server per run, configurations
# interleaved within each repetition. Targets 127.0.0.1 only; every run is bounded in time.
#
#   CARGO_TARGET_DIR=target-bench cargo build --release --workspace --bins
#   npm install --prefix target-bench/node ws@8
#   bash bench/compression.sh echo [REPS] > bench/raw-compression-echo.log
#   bash bench/compression.sh idle        > bench/raw-compression-idle.log
#
# Env: BIN (target-bench/release), NODE_MODULES (target-bench/node/node_modules), REPS (3),
# SECS (seconds per echo run, including connect and warm-up; default 6), WARMUP (messages,
# default 5000), SIZES ("512 4096"), PIPELINES ("1 8"), CONFIGS (echo configurations, default
# all), IDLE_CONNS (10000), IDLE_ONLY (regex: idle configurations to run), IDLE_HEARTBEAT (1: also
# the after-heartbeat runs), CLIENT_ARGS (extra echo options, e.g. --deflate-independent).
set -u
. "$(dirname "$0")/lib.sh"
MODE=${1:-echo}
REPS=${2:-${REPS:-3}}
BIN=${BIN:-target-bench/release}
NODE_MODULES=${NODE_MODULES:-target-bench/node/node_modules}
SECS=${SECS:-6}
WARMUP=${WARMUP:-5000}
SIZES=${SIZES:-512 4096}
PIPELINES=${PIPELINES:-1 8}
IDLE_CONNS=${IDLE_CONNS:-10000}
LOAD="$BIN/ringgate-load"
RG_PORT=18003
NODE_PORT=18005
TMP=$(mktemp -d)
# ringgate config with client context takeover allowed (the server keeps an inflater per
# connection).
printf '[compression]\nclient_no_context_takeover = false\n' >"$TMP/takeover.toml"
# No server context takeover: one shared compressor per shard, reset after every message.
printf '[compression]\nbroadcast_friendly = true\n' >"$TMP/bcast.toml"
# A smaller compression window.
printf '[compression]\nserver_max_window_bits = 10\n' >"$TMP/window10.toml"
# Node does not raise its own open-file limit.
ulimit -n "$(ulimit -Hn)"

PID=
start() { # CONFIG [extra ringgate flags...]
    local cfg=$1
    shift
    case $cfg in
    rg-uring*) taskset -c 0 "$BIN/ringgate" --host 127.0.0.1 --shards 1 --port $RG_PORT --io uring "$@" >"$TMP/server.log" 2>&1 & PORT=$RG_PORT ;;
    rg-epoll*) taskset -c 0 "$BIN/ringgate" --host 127.0.0.1 --shards 1 --port $RG_PORT --io epoll "$@" >"$TMP/server.log" 2>&1 & PORT=$RG_PORT ;;
    node-plain) NODE_PATH=$NODE_MODULES taskset -c 0 node examples/node_ws_echo.js --port $NODE_PORT >"$TMP/server.log" 2>&1 & PORT=$NODE_PORT ;;
    node-pmd-default) NODE_PATH=$NODE_MODULES taskset -c 0 node examples/node_ws_echo.js --port $NODE_PORT --deflate >"$TMP/server.log" 2>&1 & PORT=$NODE_PORT ;;
    node-pmd-matched) NODE_PATH=$NODE_MODULES taskset -c 0 node examples/node_ws_echo.js --port $NODE_PORT --deflate --threshold 256 --level 1 >"$TMP/server.log" 2>&1 & PORT=$NODE_PORT ;;
    *) echo "unknown config $cfg" >&2; return 1 ;;
    esac
    PID=$!
    up "$cfg" "$PORT" 100 || { cat "$TMP/server.log" >&2; return 1; }
}
trap '[ -n "$PID" ] && kill -9 "$PID" 2>/dev/null; rm -rf "$TMP"' EXIT

# Extra ringgate flags of an echo configuration.
rgflags() {
    case $1 in
    *-bcast) echo "--config $TMP/bcast.toml" ;;
    *) echo "" ;;
    esac
}

# The load tool's deflate flag for a configuration: ringgate "-plain" runs do not offer it.
offer() {
    case $1 in
    *-plain) echo "" ;;
    *) echo "--deflate" ;;
    esac
}

echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null) $(uname -r) nproc=$(nproc) node=$(node --version) ws=$(NODE_PATH=$NODE_MODULES node -p "require('ws/package.json').version")"
case $MODE in
echo)
    CONFIGS=${CONFIGS:-rg-uring-plain rg-uring-deflate rg-epoll-plain rg-epoll-deflate rg-epoll-deflate-bcast node-plain node-pmd-default node-pmd-matched}
    for rep in $(seq "$REPS"); do
        for size in $SIZES; do
            for p in $PIPELINES; do
                for cfg in $CONFIGS; do
                    # shellcheck disable=SC2046
                    start "$cfg" $(rgflags "$cfg") || continue
                    sleep 0.3
                    echo "## echo cfg=$cfg size=$size pipeline=$p rep=$rep loadavg=$(cut -d' ' -f1-3 /proc/loadavg)"
                    # shellcheck disable=SC2046,SC2086
                    taskset -c 1 timeout 60 "$LOAD" echo --url "ws://127.0.0.1:$PORT/ws/echo" \
                        --connections 100 --payload json --size "$size" --pipeline "$p" \
                        --messages 100000000 --warmup "$WARMUP" --duration-limit "$SECS" \
                        --server-pid "$PID" $(offer "$cfg") ${CLIENT_ARGS:-}
                    stop
                done
            done
        done
    done
    ;;
idle)
    # NAME:SERVER-CONFIG:EXTRA-RINGGATE-FLAGS
    for entry in \
        rg-epoll-plain:rg-epoll-plain: \
        rg-epoll-default:rg-epoll: \
        "rg-epoll-client-takeover:rg-epoll:--config $TMP/takeover.toml" \
        rg-uring-plain:rg-uring-plain: \
        rg-uring-default:rg-uring: \
        "rg-uring-client-takeover:rg-uring:--config $TMP/takeover.toml" \
        node-plain:node-plain: \
        node-pmd-default:node-pmd-default: \
        node-pmd-matched:node-pmd-matched: \
        "rg-epoll-broadcast-friendly:rg-epoll:--config $TMP/bcast.toml" \
        "rg-epoll-window10:rg-epoll:--config $TMP/window10.toml"; do
        name=${entry%%:*}
        [[ $name =~ ${IDLE_ONLY:-.} ]] || continue
        rest=${entry#*:}
        cfg=${rest%%:*}
        extra=${rest#*:}
        for touch in "" "--touch"; do
            # shellcheck disable=SC2086
            start "$cfg" $extra || continue
            sleep 0.5
            echo "## idle cfg=$name touch=${touch:-no} loadavg=$(cut -d' ' -f1-3 /proc/loadavg)"
            # shellcheck disable=SC2046,SC2086
            taskset -c 1 timeout 200 "$LOAD" idle --url "ws://127.0.0.1:$PORT/ws/echo" \
                --connections "$IDLE_CONNS" --hold 5 --settle 2 --server-pid "$PID" \
                --payload json --size 1200 $(offer "$name") $touch
            stop
        done
    done
    # Idle compressors are freed at the first heartbeat tick without traffic: heartbeat every
    # 10 s, RSS sampled 22 s after the last echo (before the 3-silent-tick timeout closes them).
    # Then again with mimalloc purging freed memory at once (MIMALLOC_PURGE_DELAY=0).
    [ "${IDLE_HEARTBEAT:-1}" = 1 ] || exit 0
    for purge in "" 0; do
        for cfg in rg-epoll rg-uring; do
            if [ -n "$purge" ]; then export MIMALLOC_PURGE_DELAY=$purge; fi
            start "$cfg" --heartbeat-interval 10 || continue
            unset MIMALLOC_PURGE_DELAY
            sleep 0.5
            echo "## idle cfg=$cfg-default-after-heartbeat${purge:+-purge$purge} touch=--touch loadavg=$(cut -d' ' -f1-3 /proc/loadavg)"
            taskset -c 1 timeout 200 "$LOAD" idle --url "ws://127.0.0.1:$PORT/ws/echo" \
                --connections "$IDLE_CONNS" --hold 22 --settle 22 --server-pid "$PID" \
                --payload json --size 1200 --deflate --touch
            stop
        done
    done
    ;;
*)
    echo "usage: $0 echo|idle [REPS]" >&2
    exit 2
    ;;
esac
