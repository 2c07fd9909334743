#!/usr/bin/env bash
# WebSockets over HTTP/2 (RFC 8441) vs over HTTP/1.1 upgrades, same TLS, for bench/H2.md:
# server CPU per echoed message with 100 sockets, and server memory per idle socket. Server
# pinned to core 0 (one shard), client (examples/h2_echo.rs) to core 1; a fresh server per
# run; modes interleaved within each repetition. Targets 127.0.0.1 only.
#
#   cargo build --release --bin ringgate --example h2_echo
#   bash bench/h2.sh [REPS] > h2.log
#
# Env: BIN (target/release), EX (target/release/examples), IO (uring), CERTS (a directory for
# `ringgate dev-cert`, default /tmp/ringgate-bench-certs), MESSAGES (200000), SOCKETS (100).
set -u
. "$(dirname "$0")/lib.sh"
BIN=${BIN:-target/release}
EX=${EX:-$BIN/examples}
IO=${IO:-uring}
REPS=${1:-${REPS:-3}}
CERTS=${CERTS:-/tmp/ringgate-bench-certs}
MESSAGES=${MESSAGES:-200000}
SOCKETS=${SOCKETS:-100}
PORT=8443

[ -f "$CERTS/ca.pem" ] || "$BIN/ringgate" dev-cert "$CERTS" >&2 || exit 1

PID=
start() {
    taskset -c 0 "$BIN/ringgate" --host 127.0.0.1 --shards 1 --port $PORT --io "$IO" \
        --tls-cert "$CERTS/cert.pem" --tls-key "$CERTS/key.pem" >/tmp/bench-h2-server.log 2>&1 &
    PID=$!
    up "$IO" "$PORT"
}
trap '[ -n "$PID" ] && kill -9 "$PID" 2>/dev/null' EXIT
client() { # ARGS...
    taskset -c 1 timeout 300 "$EX/h2_echo" --port $PORT --ca "$CERTS/ca.pem" \
        --sockets "$SOCKETS" --server-pid "$PID" "$@"
}

echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null) $(uname -r) nproc=$(nproc) io=$IO"
for rep in $(seq "$REPS"); do
    # echo: h1 = one TLS connection per socket; h2 = all sockets on one connection, and one
    # connection per socket (the same TLS work as h1, HTTP/2 framing on top).
    for mode in "h1" "h2 1" "h2 $SOCKETS"; do
        set -- $mode
        start || continue
        echo "## echo mode=$1 connections=${2:-$SOCKETS} rep=$rep loadavg=$(cut -d' ' -f1-3 /proc/loadavg)"
        client --mode "$1" --connections "${2:-1}" --messages "$MESSAGES"
        stop
    done
    for mode in "h1" "h2 1"; do
        set -- $mode
        start || continue
        echo "## idle mode=$1 rep=$rep loadavg=$(cut -d' ' -f1-3 /proc/loadavg)"
        client --mode "$1" --connections "${2:-1}" --idle
        stop
    done
done
