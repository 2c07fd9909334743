#!/usr/bin/env bash
# Writes and CPU of one shard under `[rooms] write_delay` (bench/FANOUT.md, "Write delay"): the
# server on core 0 (`--io IO`, `write_delay = WD`), `ringgate-load fanout` on core 1 with 10,000
# subscribers and 300 publishes at 50/s; over 4 s of the publishing phase, counts io_uring
# completions and writev/io_uring_enter/epoll_wait calls (perf tracepoints) and the server's
# utime+stime ticks. Loopback only, bounded (the load tool stops after 60 s). Needs root (perf).
#
#   BIN=target/release bash bench/write_delay_counts.sh uring 0.2
set -u
. "$(dirname "$0")/lib.sh"
BIN=${BIN:-target/release}
IO=${1:-uring}
WD=${2:-0.2}
PORT=${PORT:-8013}
printf '[rooms]\npublish_rate = 0\nwrite_delay = %s\n' "$WD" >/tmp/ringgate-wd-counts.toml
ulimit -n 20000
taskset -c 0 "$BIN/ringgate" --config /tmp/ringgate-wd-counts.toml --host 127.0.0.1 --shards 1 \
    --port "$PORT" --io "$IO" >/tmp/ringgate-wd-counts-server.log 2>&1 &
PID=$!
trap 'kill "$PID" 2>/dev/null' EXIT
up ringgate "$PORT" || exit 1
taskset -c 1 "$BIN/ringgate-load" fanout --url "ws://127.0.0.1:$PORT/ws" --subscribers 10000 \
    --rate 50 --messages 300 --drain 20 --duration-limit 60 >/tmp/ringgate-wd-counts-load.log 2>&1 &
LP=$!
for _ in $(seq 100); do grep -q '^up:' /tmp/ringgate-wd-counts-load.log && break; sleep 0.2; done
ticks() { awk '{print $14 + $15}' "/proc/$PID/stat"; }
t0=$(ticks)
perf stat -e 'io_uring:io_uring_complete,syscalls:sys_enter_writev,syscalls:sys_enter_io_uring_enter,syscalls:sys_enter_epoll_wait' \
    -p "$PID" -- sleep 4 2>&1 | grep -E 'io_uring|sys_enter'
t1=$(ticks)
echo "io=$IO write_delay=$WD server CPU over the 4 s: $((t1 - t0)) ticks"
wait "$LP"
grep -o 'delivered=[0-9]* \|p50_us=[0-9]*' /tmp/ringgate-wd-counts-load.log
