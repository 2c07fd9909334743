#!/usr/bin/env bash
# Profiles one server configuration under the echo load:
#   bash bench/profile.sh uring|epoll|tungstenite [OUTDIR]
# Server on core 0, load tool and perf on core 1. Writes OUTDIR/CFG.perf.data and
# OUTDIR/CFG.{self,children}.txt (perf report summaries).
set -u
CFG=$1
OUT=${2:-/tmp/bench-prof}
BIN=${BIN:-target-bench/release}
MESSAGES=${MESSAGES:-200000}
mkdir -p "$OUT"
case $CFG in
uring | epoll) taskset -c 0 "$BIN/ringgate" --host 127.0.0.1 --shards 1 --port 8003 --io "$CFG" >/tmp/prof-server.log 2>&1 & PORT=8003 ;;
tungstenite) taskset -c 0 "$BIN/examples/tungstenite_echo" --port 8004 >/tmp/prof-server.log 2>&1 & PORT=8004 ;;
*) echo "usage: $0 uring|epoll|tungstenite [OUTDIR]" >&2; exit 2 ;;
esac
PID=$!
trap 'kill -9 $PID 2>/dev/null' EXIT
sleep 0.5
# Warm up the connections' code paths before sampling.
taskset -c 1 timeout 60 "$BIN/ringgate-load" echo --url "ws://127.0.0.1:$PORT/ws/echo" \
    --connections 100 --size 32 --messages 20000 >/dev/null
taskset -c 1 perf record -e cpu-clock -F 2000 --call-graph dwarf,16384 -p "$PID" \
    -o "$OUT/$CFG.perf.data" 2>"$OUT/$CFG.perf.log" &
PERF=$!
sleep 0.5
taskset -c 1 timeout 120 "$BIN/ringgate-load" echo --url "ws://127.0.0.1:$PORT/ws/echo" \
    --connections 100 --size 32 --messages "$MESSAGES" --server-pid "$PID"
kill -INT $PERF
wait $PERF
kill $PID
perf report -i "$OUT/$CFG.perf.data" --no-children --sort symbol --stdio --percent-limit 0.7 \
    -g none 2>/dev/null >"$OUT/$CFG.self.txt"
perf report -i "$OUT/$CFG.perf.data" --children --sort symbol --stdio --percent-limit 3 \
    -g none 2>/dev/null >"$OUT/$CFG.children.txt"
echo "wrote $OUT/$CFG.{self,children}.txt"
