#!/usr/bin/env bash
# The TLS matrix behind bench/TLS.md: wss vs ws echo, handshakes/s, idle memory per connection,
# on both io backends. Server pinned to core 0 (one shard), load tool to core 1; a fresh server
# per run; configurations interleaved within each repetition. Targets 127.0.0.1 only.
#
#   CARGO_TARGET_DIR=/work/target-load cargo build --release --workspace --bins
#   BIN=/work/target-load/release bash bench/tls.sh [REPS] > bench/raw-tls.log
#
# Env: BIN (default target/release), REPS (3), PARTS ("echo handshakes idle"), CERTS (a
# directory for `ringgate dev-cert`, default /tmp/ringgate-bench-certs), IDLE_CONNS (10000),
# HS_CONNS (5000 connections per handshake run, 50 at a time).
set -u
. "$(dirname "$0")/lib.sh"
BIN=${BIN:-target/release}
REPS=${1:-${REPS:-3}}
PARTS=${PARTS:-"echo handshakes idle"}
CERTS=${CERTS:-/tmp/ringgate-bench-certs}
IDLE_CONNS=${IDLE_CONNS:-10000}
HS_CONNS=${HS_CONNS:-5000}
LOAD="$BIN/ringgate-load"
PORT=8003

[ -f "$CERTS/ca.pem" ] || "$BIN/ringgate" dev-cert "$CERTS" >&2 || exit 1

PID=
start() { # IO TLS(0|1)
    local tls=()
    [ "$2" = 1 ] && tls=(--tls-cert "$CERTS/cert.pem" --tls-key "$CERTS/key.pem")
    taskset -c 0 "$BIN/ringgate" --host 127.0.0.1 --shards 1 --port $PORT --io "$1" "${tls[@]}" \
        >/tmp/bench-tls-server.log 2>&1 &
    PID=$!
    up "$1" "$PORT" || { echo "(tls=$2)" >&2; return 1; }
}
trap '[ -n "$PID" ] && kill -9 "$PID" 2>/dev/null' EXIT
url() { # TLS PATH
    if [ "$1" = 1 ]; then echo "wss://127.0.0.1:$PORT$2 --ca $CERTS/ca.pem"; else echo "ws://127.0.0.1:$PORT$2"; fi
}

echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null) $(uname -r) nproc=$(nproc)"
for rep in $(seq "$REPS"); do
    for part in $PARTS; do
        for io in uring epoll; do
            for tls in 0 1; do
                case $part in
                echo)
                    for p in 1 8; do
                        start $io $tls || continue
                        sleep 0.3
                        msgs=200000
                        [ $p = 8 ] && msgs=400000
                        echo "## echo io=$io tls=$tls pipeline=$p rep=$rep loadavg=$(cut -d' ' -f1-3 /proc/loadavg)"
                        # shellcheck disable=SC2046
                        taskset -c 1 timeout 120 "$LOAD" echo --url $(url $tls /ws/echo) \
                            --connections 100 --size 32 --messages $msgs --pipeline $p \
                            --server-pid "$PID"
                        stop
                    done
                    ;;
                handshakes)
                    start $io $tls || continue
                    sleep 0.3
                    echo "## handshakes io=$io tls=$tls rep=$rep loadavg=$(cut -d' ' -f1-3 /proc/loadavg)"
                    # shellcheck disable=SC2046
                    taskset -c 1 timeout 120 "$LOAD" handshakes --url $(url $tls /ws/echo) \
                        --connections "$HS_CONNS" --concurrency 50 --warmup 200 --server-pid "$PID"
                    stop
                    ;;
                idle)
                    start $io $tls || continue
                    sleep 0.3
                    echo "## idle io=$io tls=$tls rep=$rep loadavg=$(cut -d' ' -f1-3 /proc/loadavg)"
                    # shellcheck disable=SC2046
                    taskset -c 1 timeout 200 "$LOAD" idle --url $(url $tls /ws/echo) \
                        --connections "$IDLE_CONNS" --hold 5 --settle 2 --server-pid "$PID"
                    stop
                    ;;
                esac
            done
        done
    done
done
