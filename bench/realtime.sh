#!/usr/bin/env bash
# Rooms fan-out costs of two `/ws` choices (bench/COMPRESS_ONCE.md, bench/CONFLATION.md):
#
#   compress   `[rooms] compress_once` on (the default) against off, with subscribers that offer
#              permessage-deflate as browsers do (`ringgate-load fanout --deflate`), and plain
#              subscribers as the reference: server CPU per delivery and bytes per delivery on
#              the wire, JSON `data` of SIZES bytes.
#   conflate   a ticker topic at RATE updates/s to SUBS subscribers with `[[rooms.topic]]
#              conflate = 0.1`, against the same topic unconflated: deliveries per second and
#              server CPU per delivery. The conflated run passes `--conflated` to the load tool:
#              skipped values are expected there, while seq order, no value older than an
#              earlier one, and every subscriber ending on the last value are checked (the
#              drain ends once they all have it).
#
# Server pinned to core 0 with one shard, the load tool to core 1, a fresh server per run,
# configurations interleaved, 127.0.0.1 only; every run is bounded by --messages and
# --duration-limit.
#
#   cargo build --release -p ringgate -p ringgate-load --bins
#   bash bench/realtime.sh compress [REPS] > bench/raw-compress-once.log
#   bash bench/realtime.sh conflate [REPS] > bench/raw-conflation.log
#
# Env: BIN (target/release), IO (epoll), SIZES ("256 1024 4096"), CSUBS (1000), CRATE (20),
# CMSGS (200), SUBS (10000), RATE (1000), MSGS (3000), USUBS (1000), URATE (100), UMSGS (500).
set -u
. "$(dirname "$0")/lib.sh"
BIN=${BIN:-target/release}
IO=${IO:-epoll}
WHAT=${1:?compress or conflate}
REPS=${2:-3}
PORT=18013
PID=
trap '[ -n "$PID" ] && kill -9 "$PID" 2>/dev/null' EXIT

start() { # CONFIG-TEXT
    printf '%b' "$1" >/tmp/bench-realtime.toml
    (ulimit -n 20000; exec taskset -c 0 "$BIN/ringgate" --config /tmp/bench-realtime.toml --host 127.0.0.1 \
        --shards 1 --port "$PORT" --io "$IO") >/tmp/bench-realtime-server.log 2>&1 &
    PID=$!
    up ringgate "$PORT"
}

run() { # NAME CONFIG SUBS RATE MSGS DRAIN [LOAD ARGS...]
    local name=$1 config=$2 subs=$3 rate=$4 msgs=$5 drain=$6
    shift 6
    start "$config" || return
    sleep 0.5
    echo "## $WHAT case=$name subscribers=$subs rate=$rate messages=$msgs loadavg=$(cut -d' ' -f1-3 /proc/loadavg)"
    (ulimit -n 20000; exec taskset -c 1 timeout 200 "$BIN/ringgate-load" fanout --url "ws://127.0.0.1:$PORT/ws" \
        --subscribers "$subs" --publishers 1 --rate "$rate" --messages "$msgs" --drain "$drain" \
        --duration-limit 150 --server-pid "$PID" "$@" 2>&1) | grep -E '^(RESULT|server cpu|delivered|OK|FAIL|Error|error)'
    stop
}

echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null) $(uname -r) nproc=$(nproc) io=$IO"
BASE='[rooms]\npublish_rate = 0\nhistory_size = 0\n'
for rep in $(seq "$REPS"); do
    case $WHAT in
    compress)
        for size in ${SIZES:-256 1024 4096}; do
            for c in once takeover plain; do
                case $c in
                once) cfg="${BASE}compress_once = true\n" flag=--deflate ;;
                takeover) cfg="${BASE}compress_once = false\n" flag=--deflate ;;
                plain) cfg=$BASE flag= ;;
                esac
                run "$c-$size" "$cfg" "${CSUBS:-1000}" "${CRATE:-20}" "${CMSGS:-200}" 10 --size "$size" --json $flag
            done
        done ;;
    conflate)
        TICKER='[[rooms.topic]]\nprefix = "ticker."\nconflate = 0.1\n'
        # Conflated: the issue's ticker, 1,000 updates/s to 10,000 subscribers.
        run conflated "${BASE}${TICKER}" "${SUBS:-10000}" "${RATE:-1000}" "${MSGS:-3000}" 10 \
            --topic ticker.btc --size 64 --conflated
        # Unconflated at a rate one core can deliver (the same updates at full rate would be
        # 10,000,000 deliveries/s): the cost per delivery without conflation.
        run unconflated "$BASE" "${USUBS:-1000}" "${URATE:-100}" "${UMSGS:-500}" 10 \
            --topic ticker.btc --size 64 ;;
    esac
done
