#!/usr/bin/env bash
# Reproduces the flamegraphs in this folder (see README.md). Loopback only (127.0.0.1), every
# step bounded in time. Run from anywhere inside the repository, as root (perf -p needs it):
#
#   bash flamegraphs/make.sh [COMMIT]        # default HEAD
#
# 1. builds COMMIT from a clean `git archive` (not the working tree, which other people edit)
#    into $CARGO_TARGET_DIR (default /work/main/target-bench): cargo build --release --bins --examples,
#    then copies ringgate and ringgate-load to $WORK/bin (the target dir may be shared)
# 2. for each profile: server pinned to core 0, a 20,000-message warm-up, then
#    `perf record -e cpu-clock -F 999 --call-graph dwarf,16384 -p $PID -- sleep $PERF_SECS`
#    (perf on core 1) while the echo load (core 1) runs REPEAT times back to back; perf is
#    stopped with SIGINT as soon as the last load run ends (sleep $PERF_SECS is only the bound).
# 3. perf script | inferno-collapse-perf --kernel | inferno-flamegraph --minwidth 0.05 → SVG,
#    plus the folded stacks (.folded.gz), a summary (.summary.txt) and the load tool's output
#    (.load.log) next to it.
#
# Env: BUILD=0 skips step 1 (reuses the binaries in $WORK/bin), RENDER_ONLY=1 (with BUILD=0)
#      redoes only step 3 from $WORK/NAME.folded,
#      ONLY="uring-pipeline8 ..." limits the profiles, REPEAT_P8 (12), REPEAT_P1 (2),
#      OUT (this folder: where the SVGs and the other outputs go), PERF_SECS (120), WORK (/tmp/ringgate-flamegraphs, holds the source copy and perf.data),
#      QUIET_WAIT (600): before each profile, wait up to this many seconds for the machine to be
#      quiet (other processes using < MAX_BUSY cores, default 0.5, over a 3 s window), then go
#      ahead anyway; the load tool logs the other load of every run in NAME.load.log.
# Needs: perf (apt-get install -y linux-perf), inferno (cargo install inferno), taskset, python3.
set -euo pipefail

REPO=$(git -C "$(dirname "$0")" rev-parse --show-toplevel)
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-$HERE}
COMMIT=$(git -C "$REPO" rev-parse "${1:-HEAD}")
SHORT=${COMMIT:0:7}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/work/main/target-bench}
WORK=${WORK:-/tmp/ringgate-flamegraphs}
REPEAT_P8=${REPEAT_P8:-12}
REPEAT_P1=${REPEAT_P1:-2}
PERF_SECS=${PERF_SECS:-120}
ONLY=${ONLY:-"uring-pipeline8 epoll-pipeline8 uring-pipeline1"}
mkdir -p "$WORK"

if [ "${BUILD:-1}" = 1 ]; then
    rm -rf "$WORK/src" "$WORK/bin" && mkdir -p "$WORK/src" "$WORK/bin"
    git -C "$REPO" archive "$COMMIT" | tar -x -C "$WORK/src"
    # git archive stamps files with the commit time; if another checkout already built into
    # the same target dir, cargo would call that build fresh. Touch the copy to force our own.
    find "$WORK/src" -type f -exec touch {} +
    (cd "$WORK/src" && cargo build --release --bins --examples)
    # Other sessions may build into the same target dir (and relink release/ringgate to their
    # own build right after ours): take a private copy at once and check that it is ours (its
    # debug info names our source copy as the compilation directory).
    cp "$CARGO_TARGET_DIR/release/ringgate" "$CARGO_TARGET_DIR/release/ringgate-load" "$WORK/bin/"
    for b in ringgate ringgate-load; do
        grep -a -q -F "$WORK/src" "$WORK/bin/$b" ||
            { echo "$WORK/bin/$b was not built from $WORK/src (target dir shared?)" >&2; exit 1; }
    done
    echo "$COMMIT" >"$WORK/bin/commit"
elif [ ! -x "$WORK/bin/ringgate" ]; then
    echo "BUILD=0 but no binaries in $WORK/bin" >&2; exit 1
fi
BIN=$WORK/bin
# The label in the SVGs is the commit the binaries were built from.
COMMIT=$(cat "$BIN/commit")
SHORT=${COMMIT:0:7}

QUIET_WAIT=${QUIET_WAIT:-600}
MAX_BUSY=${MAX_BUSY:-0.5}

busy_cores() { # cores busy over a 3 s window, from /proc/stat (nothing of ours runs meanwhile)
    local a b
    a=$(awk '/^cpu /{print $2+$3+$4+$5+$6+$7+$8+$9, $5+$6}' /proc/stat)
    sleep 3
    b=$(awk '/^cpu /{print $2+$3+$4+$5+$6+$7+$8+$9, $5+$6}' /proc/stat)
    echo "$a $b $(nproc)" | awk '{t=$3-$1; i=$4-$2; printf "%.2f", (t>0 ? $5*(1-i/t) : 0)}'
}

wait_quiet() {
    local end=$((SECONDS + QUIET_WAIT)) b
    while :; do
        b=$(busy_cores)
        if awk -v b="$b" -v m="$MAX_BUSY" 'BEGIN{exit !(b < m)}'; then
            echo "machine quiet: $b cores busy"; return 0
        fi
        if [ $SECONDS -ge $end ]; then
            echo "machine still busy after ${QUIET_WAIT}s ($b cores); profiling anyway"; return 0
        fi
    done
}

PID= PERF=
cleanup() {
    [ -n "$PERF" ] && kill -INT "$PERF" 2>/dev/null || true
    [ -n "$PID" ] && kill -9 "$PID" 2>/dev/null || true
}
trap cleanup EXIT

load() { # PIPELINE MESSAGES
    taskset -c 1 timeout 120 "$BIN/ringgate-load" echo --url ws://127.0.0.1:8003/ws/echo \
        --connections 100 --size 32 --messages "$2" --pipeline "$1" --server-pid "$PID"
}

profile() { # IO PIPELINE REPEAT
    local io=$1 pipe=$2 rep=$3 name="echo-$1-pipeline$2"
    local data=$WORK/$name.perf.data log=$OUT/$name.load.log quiet
    quiet=$(wait_quiet)
    echo "$name: $quiet"
    taskset -c 0 "$BIN/ringgate" --host 127.0.0.1 --shards 1 --port 8003 --io "$io" \
        >"$WORK/$name.server.log" 2>&1 &
    PID=$!
    for _ in $(seq 50); do
        (exec 3<>/dev/tcp/127.0.0.1/8003) 2>/dev/null && break
        sleep 0.1
    done
    {
        echo "# $(date -u +%FT%TZ) commit $SHORT kernel $(uname -r) nproc=$(nproc) loadavg=$(cut -d' ' -f1-3 /proc/loadavg); $quiet"
        echo "# server: taskset -c 0 $BIN/ringgate --host 127.0.0.1 --shards 1 --port 8003 --io $io"
        echo "## warm-up (not profiled)"
        load "$pipe" 20000
    } >"$log"
    taskset -c 1 perf record -e cpu-clock -F 999 --call-graph dwarf,16384 -p "$PID" \
        -o "$data" -- sleep "$PERF_SECS" 2>"$WORK/$name.perf.log" &
    PERF=$!
    sleep 1 # let perf attach before the load starts
    for i in $(seq "$rep"); do
        echo "## profiled run $i/$rep loadavg=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$log"
        load "$pipe" 400000 >>"$log"
    done
    kill -INT "$PERF" 2>/dev/null || true
    wait "$PERF" || true
    PERF=
    kill "$PID"
    wait "$PID" 2>/dev/null || true
    PID=
    cat "$WORK/$name.perf.log" >>"$log"
    perf script -i "$data" 2>/dev/null | inferno-collapse-perf --kernel >"$WORK/$name.folded"
    render "$io" "$pipe" "$rep"
}

render() { # IO PIPELINE REPEAT: $WORK/NAME.folded -> NAME.svg, NAME.folded.gz, NAME.summary.txt
    local io=$1 pipe=$2 rep=$3 name="echo-$1-pipeline$2"
    inferno-flamegraph --minwidth 0.05 --colors hot --countname ns \
        --title "ringgate echo, --io $io, --pipeline $pipe (server CPU, cpu-clock 999 Hz)" \
        --subtitle "commit $SHORT; 100 conns x 32 B, $rep x 400,000 msgs; server on core 0, loopback; kernel frames _[k]" \
        <"$WORK/$name.folded" >"$OUT/$name.svg"
    gzip -9 -c "$WORK/$name.folded" >"$OUT/$name.folded.gz"
    python3 "$HERE/summarize.py" "$WORK/$name.folded" >"$OUT/$name.summary.txt"
    echo "wrote $OUT/$name.svg ($(du -k "$OUT/$name.svg" | cut -f1) KiB)"
}

STEP=profile
[ "${RENDER_ONLY:-0}" = 1 ] && STEP=render
for p in $ONLY; do
    case $p in
    uring-pipeline8) $STEP uring 8 "$REPEAT_P8" ;;
    epoll-pipeline8) $STEP epoll 8 "$REPEAT_P8" ;;
    uring-pipeline1) $STEP uring 1 "$REPEAT_P1" ;;
    epoll-pipeline1) $STEP epoll 1 "$REPEAT_P1" ;;
    *) echo "unknown profile $p" >&2; exit 2 ;;
    esac
done
