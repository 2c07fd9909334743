#!/usr/bin/env bash
# User-space vs kernel share of the server's CPU under the echo load (1 in flight by default),
# per io backend: Δutime and Δstime of the server from /proc/PID/stat over the load tool's run
# (connection set-up included: 100 upgrades against 200,000 messages). Server pinned to core 0,
# load tool to core 1, a fresh server per run, backends interleaved. Targets 127.0.0.1 only.
#
#   cargo build --release -p ringgate -p ringgate-load
#   BIN=target/release bash bench/cpu_split.sh [REPS] > split.log
#
# Env: BIN (target/release), REPS (3), MESSAGES (200000), ECHO_ARGS (e.g. "--pipeline 8").
set -u
. "$(dirname "$0")/lib.sh"
BIN=${BIN:-target/release}
REPS=${1:-${REPS:-3}}
MESSAGES=${MESSAGES:-200000}
PID=
trap '[ -n "$PID" ] && kill -9 "$PID" 2>/dev/null' EXIT
ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }

echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null) $(uname -r) ticks/s=$(getconf CLK_TCK)"
for rep in $(seq "$REPS"); do
    for io in uring epoll; do
        taskset -c 0 "$BIN/ringgate" --host 127.0.0.1 --shards 1 --port 8003 --io "$io" >/tmp/bench-split.log 2>&1 &
        PID=$!
        up "$io" 8003 || continue
        sleep 0.3
        read -r u0 s0 < <(ticks "$PID")
        # shellcheck disable=SC2086
        taskset -c 1 timeout 120 "$BIN/ringgate-load" echo --url "ws://127.0.0.1:8003/ws/echo" \
            --connections 100 --size 32 --messages "$MESSAGES" ${ECHO_ARGS:-} >/dev/null
        read -r u1 s1 < <(ticks "$PID")
        awk -v io="$io" -v rep="$rep" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v la="$(cut -d' ' -f1-3 /proc/loadavg)" \
            'BEGIN { printf "SPLIT io=%s rep=%d user_ticks=%d kernel_ticks=%d user_share=%.1f%% loadavg=%s\n", io, rep, u, s, 100 * u / (u + s), la }'
        stop
    done
done
