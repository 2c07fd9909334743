#!/usr/bin/env bash
# Instructions the proxy executes per relayed WebSocket message, counted by callgrind
# (repeatable on a loaded machine, unlike time), for bench/PROXY.md: ringgate (one shard,
# access log off) under callgrind in front of a ringgate `/ws/echo` upstream, wss from the
# client (the dev certificate), ws to the upstream.
#
#   cargo build --release --bin ringgate && cargo build --release -p ringgate-load
#   bash bench/proxy_ws_callgrind.sh [BIN...] > /tmp/proxy-ws-callgrind.log
#
# Each BIN (default target/release/ringgate) runs under valgrind; each part is two runs of
# `ringgate-load echo` (100 connections, 32 B, 1,000 warm-up messages), one with BASE
# messages and one with BASE + MSGS, counters zeroed before and dumped after each:
#   relay1, relay8: `/echo` (mode = "websocket"), 1 and 8 messages in flight;
#   tunnel1, tunnel8: `/tunnel` (mode = "tunnel"), the same.
# (PARTS picks some of them: PARTS="relay1 tunnel1".)
# The figure is (Ir of the longer run − Ir of the shorter) ÷ MSGS: what a message costs,
# without the TLS handshakes and connection set-up both runs have (user space only: the
# kernel's share is not counted).
# Env: MSGS (20000), IO (epoll), LOAD (target/release/ringgate-load), UPSTREAM (the first
# BIN), KEEP (set: keep the dumps for callgrind_annotate), PORTS (9210: the upstream listens on
# PORTS + 1, the proxy on PORTS + 3). Targets 127.0.0.1 only; every run is bounded.
set -u
. "$(dirname "$0")/lib.sh"
MSGS=${MSGS:-20000}
BASE=${BASE:-2000}
IO=${IO:-epoll}
LOAD=${LOAD:-target/release/ringgate-load}
[ $# -gt 0 ] || set -- target/release/ringgate
UPSTREAM=${UPSTREAM:-$1}
PORTS=${PORTS:-9210}
UP_PORT=$((PORTS + 1)) PROXY_PORT=$((PORTS + 3))
WORK=$(mktemp -d /tmp/ringgate-callgrind-proxy-ws.XXXXXX)
UP=; PID=
cleanup() {
    for p in $PID $UP; do kill -9 "$p" 2>/dev/null; done
    if [ -n "${KEEP:-}" ]; then echo "# dumps kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

"$UPSTREAM" dev-cert "$WORK/certs" >/dev/null 2>&1 || exit 1
"$UPSTREAM" --host 127.0.0.1 --port $UP_PORT --shards 1 --io epoll --admin-listen off \
    >"$WORK/up.log" 2>&1 &
UP=$!
up upstream $UP_PORT || exit 1
cat >"$WORK/ringgate.toml" <<CONF
admin_listen = "off"
[[listen]]
addr = "127.0.0.1:$PROXY_PORT"
tls = true
[tls]
cert = "$WORK/certs/cert.pem"
key = "$WORK/certs/key.pem"
[[route]]
path = "/echo"
upstreams = ["ws://127.0.0.1:$UP_PORT/ws/echo"]
strip_prefix = true
[[route]]
path = "/tunnel"
upstreams = ["ws://127.0.0.1:$UP_PORT/ws/echo"]
strip_prefix = true
mode = "tunnel"
CONF

ir() { awk '/^(summary|totals):/ {print $2; exit}' "$1"; }
# run N PATH INFLIGHT MESSAGES: one measured load (the Nth dump); prints its Ir.
run() {
    callgrind_control -z "$PID" >/dev/null 2>&1
    timeout 600 "$LOAD" echo --url "wss://127.0.0.1:$PROXY_PORT/$2" --ca "$WORK/certs/ca.pem" \
        --connections 100 --size 32 --messages "$4" --pipeline "$3" --warmup 1000 \
        --duration-limit 500 >"$WORK/load.out" 2>&1 || { cat "$WORK/load.out" >&2; return 1; }
    callgrind_control -d "$PID" >/dev/null 2>&1
    ir "$WORK/cg.out.$PID.$1"
}

echo "# $(date -u +%FT%TZ) loadavg=$(cut -d' ' -f1-3 /proc/loadavg) io=$IO msgs=$MSGS"
for bin in "$@"; do
    RUST_LOG=warn,access=off valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.out.%p" \
        "$bin" --shards 1 --io "$IO" --config "$WORK/ringgate.toml" >"$WORK/ringgate.log" 2>&1 &
    PID=$!
    up ringgate $PROXY_PORT 600 || { cat "$WORK/ringgate.log"; exit 1; }
    n=0
    line="$bin:"
    for part in ${PARTS:-relay1 relay8 tunnel1 tunnel8}; do
        path=echo
        case $part in tunnel*) path=tunnel ;; esac
        inflight=${part: -1}
        a=$(run $((n + 1)) "$path" "$inflight" "$BASE") || exit 1
        b=$(run $((n + 2)) "$path" "$inflight" $((BASE + MSGS))) || exit 1
        n=$((n + 2))
        line="$line $part $(awk -v a="$a" -v b="$b" -v m="$MSGS" 'BEGIN { printf "%.0f", (b - a) / m }') Ir/msg;"
    done
    echo "$line"
    kill "$PID"; wait "$PID" 2>/dev/null; PID=
done
