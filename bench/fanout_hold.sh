#!/usr/bin/env bash
# Server CPU and memory of one fan-out burst that connections outlive (bench/FANOUT.md, "io_uring
# writes without a copy"): ringgate on core 0 (`--io IO`, `[rooms] write_delay = WD`,
# heartbeats every 5 s so idle buffers are given back), `ringgate-load fanout --hold 16` on
# core 1: 10,000 subscribers, 60 publishes of SIZE-byte data at 50/s, then every connection held
# open 16 s. Prints delivered, µs server CPU per delivery, and the server's VmRSS after the drain
# and after the hold. Loopback only; the load tool stops after 90 s.
#
#   BIN=target/release bash bench/fanout_hold.sh uring 0.2 1000
set -u
. "$(dirname "$0")/lib.sh"
BIN=${BIN:-target/release}
IO=${1:-uring}
WD=${2:-0}
SIZE=${3:-64}
PORT=${PORT:-8014}
printf '[rooms]\npublish_rate = 0\nwrite_delay = %s\n' "$WD" >/tmp/ringgate-hold.toml
ulimit -n 20000
taskset -c 0 "$BIN/ringgate" --config /tmp/ringgate-hold.toml --host 127.0.0.1 --shards 1 \
    --port "$PORT" --io "$IO" --heartbeat-interval 5 >/tmp/ringgate-hold-server.log 2>&1 &
PID=$!
trap 'kill "$PID" 2>/dev/null' EXIT
up ringgate "$PORT" || exit 1
taskset -c 1 "$BIN/ringgate-load" fanout --url "ws://127.0.0.1:$PORT/ws" --subscribers 10000 \
    --rate 50 --messages 60 --size "$SIZE" --drain 20 --duration-limit 90 --server-pid "$PID" \
    --hold 16 | grep '^RESULT' |
    grep -o 'delivered=[0-9]* \|server_us_per_delivery=[0-9.]*\|rss_drained=[0-9]*\|rss_held=[0-9]*' |
    tr '\n' ' '
echo "io=$IO write_delay=$WD size=$SIZE"
