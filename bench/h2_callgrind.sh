#!/usr/bin/env bash
# Instructions the server executes per echoed message, WebSockets over HTTP/1.1 upgrades vs
# over HTTP/2 streams (RFC 8441), the same TLS, 100 sockets, counted by callgrind (repeatable
# on a loaded machine, unlike time; no kernel work), for bench/H2.md.
#
#   cargo build --release --bin ringgate --example h2_echo
#   bash bench/h2_callgrind.sh [REPS] > h2-callgrind.log
#
# Per mode, a fresh server (one shard, epoll) under valgrind for SHORT and for LONG messages
# (examples/h2_echo.rs echoes max(N/10, 1000) warm-up messages before its N); the difference
# of the two totals over the difference of the messages cancels start-up and handshakes.
# Env: BIN (target/release), EX (BIN/examples), CERTS (a directory for `ringgate dev-cert`),
# SHORT (3000), LONG (11000), MODES ("h1:100 h2:1", mode:connections), PORT (8444). Targets
# 127.0.0.1 only.
set -u
. "$(dirname "$0")/lib.sh"
BIN=${BIN:-target/release}
EX=${EX:-$BIN/examples}
REPS=${1:-${REPS:-1}}
CERTS=${CERTS:-/tmp/ringgate-bench-certs}
SHORT=${SHORT:-3000}
LONG=${LONG:-11000}
MODES=${MODES:-h1:100 h2:1}
PORT=${PORT:-8444}
WORK=$(mktemp -d /tmp/ringgate-h2-callgrind.XXXXXX)

[ -f "$CERTS/ca.pem" ] || "$BIN/ringgate" dev-cert "$CERTS" >&2 || exit 1
PID=
trap '[ -n "$PID" ] && kill -9 "$PID" 2>/dev/null; rm -rf "$WORK"' EXIT

# run MODE CONNECTIONS N: the server's total instruction count for N echoed messages.
run() {
    local out="$WORK/cg.out"
    rm -f "$out"
    valgrind --tool=callgrind --callgrind-out-file="$out" "$BIN/ringgate" --host 127.0.0.1 \
        --shards 1 --port $PORT --io epoll --tls-cert "$CERTS/cert.pem" \
        --tls-key "$CERTS/key.pem" >"$WORK/server.log" 2>&1 &
    PID=$!
    up callgrind $PORT 600 || return 1
    timeout 600 "$EX/h2_echo" --port $PORT --ca "$CERTS/ca.pem" --sockets 100 \
        --mode "$1" --connections "$2" --messages "$3" >&2 || return 1
    stop 600
    awk '/^(summary|totals):/ {print $2; exit}' "$out"
}

echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null) nproc=$(nproc)"
for rep in $(seq "$REPS"); do
    for m in $MODES; do
        mode=${m%:*} conns=${m#*:}
        echo "## mode=$mode connections=$conns rep=$rep loadavg=$(cut -d' ' -f1-3 /proc/loadavg)"
        short=$(run "$mode" "$conns" "$SHORT") || continue
        long=$(run "$mode" "$conns" "$LONG") || continue
        # Messages echoed in all, warm-up included.
        n_short=$((SHORT + (SHORT / 10 > 1000 ? SHORT / 10 : 1000)))
        n_long=$((LONG + (LONG / 10 > 1000 ? LONG / 10 : 1000)))
        echo "RESULT callgrind mode=$mode connections=$conns ir_short=$short ir_long=$long" \
            "ir_per_msg=$(( (long - short) / (n_long - n_short) ))"
    done
done
