#!/usr/bin/env bash
# CPU per Redis operation of the cluster hot path for two clients (bench/CLUSTER.md, "Which
# Redis client"): ringgate's link against the `redis` crate, one EVALSHA per publish and one
# pushed message per delivery, against a real redis-server on 127.0.0.1.
#
#   cargo build --release -p ringgate-redisbench
#   bash bench/redis_client.sh > bench/raw-redis-client.log
#
# Instructions per operation come from callgrind (two runs of different length, so start-up
# cancels out: (Ir(N2) - Ir(N1)) / (N2 - N1)); CPU time per operation from getrusage over a
# longer native run, with the load average next to it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN=target/release/ringgate-redisbench
N1=${N1:-2000}
N2=${N2:-12000}
NATIVE=${NATIVE:-100000}
PORT=${PORT:-16479}
ADDR=127.0.0.1:$PORT
DIR=$(mktemp -d)
# A subscriber slowed down by valgrind must not be cut off for its output buffer.
redis-server --port "$PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$DIR" \
    --client-output-buffer-limit "pubsub 0 0 0" >"$DIR/redis.log" 2>&1 &
REDIS=$!
trap 'kill $REDIS; wait $REDIS 2>/dev/null; rm -rf "$DIR"' EXIT
until redis-cli -p "$PORT" ping >/dev/null 2>&1; do sleep 0.1; done
echo "## $(date -u +%FT%TZ) $(redis-server --version | cut -d' ' -f3) loadavg $(cut -d' ' -f1-3 /proc/loadavg)"

# One run of `mode client n`; the feeder publishes for `receive`.
run() {
    local mode=$1 client=$2 n=$3; shift 3
    if [ "$mode" = receive ]; then
        timeout 600 "$BIN" feed --addr "$ADDR" --n "$n" &
        local feeder=$!
        timeout 600 "$@" "$BIN" receive --client "$client" --addr "$ADDR" --n "$n"
        wait $feeder
    else
        timeout 600 "$@" "$BIN" "$mode" --client "$client" --addr "$ADDR" --n "$n"
    fi
}

# Total instructions of one run under callgrind.
instructions() {
    local out=$DIR/cg.out
    run "$1" "$2" "$3" valgrind --tool=callgrind --callgrind-out-file="$out" >/dev/null 2>&1
    awk '/^summary:/ {print $2}' "$out"
}

for mode in publish receive; do
    for client in ours redis; do
        a=$(instructions $mode $client "$N1")
        b=$(instructions $mode $client "$N2")
        echo "callgrind mode=$mode client=$client instructions_per_op=$(( (b - a) / (N2 - N1) )) (N $N1 -> $N2)"
        echo "native $(run $mode $client "$NATIVE")"
    done
done
