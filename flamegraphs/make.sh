#!/usr/bin/env bash
# Reproduces the flamegraphs in this folder (see README.md). Loopback only (127.0.0.1), every
# step bounded in time. Run from anywhere inside the repository, as root (perf -p needs it):
#
#   bash flamegraphs/make.sh [COMMIT]        # default HEAD
#
# 1. builds COMMIT from a clean `git archive` (not the working tree, which other people edit)
#    into $CARGO_TARGET_DIR (default /work/main/target-bench): cargo build --release --workspace
#    --bins --examples (--workspace: the load tool is its own package, tools/load),
#    then copies ringgate and ringgate-load to $WORK/bin (the target dir may be shared)
# 2. for each profile: server pinned to core 0, a 20,000-message warm-up, then
#    `perf record -e cpu-clock -F 999 --call-graph dwarf,16384 -p $PID -- sleep $PERF_SECS`
#    (perf on core 1) while the echo load (core 1) runs REPEAT times back to back; perf is
#    stopped with SIGINT as soon as the last load run ends (sleep $PERF_SECS is only the bound).
# 3. perf script | inferno-collapse-perf --kernel | inferno-flamegraph --minwidth 0.05 → SVG,
#    plus the folded stacks (.folded.gz), a summary (.summary.txt) and the load tool's output
#    (.load.log) next to it.
# fanout-epoll and wss-epoll differ in step 2: perf is attached for the whole series but starts
# disabled and records only the load tool's measured phase (`perf record -D -1 --control
# fifo:…`, enabled when the tool prints `up:` / `connected`), so that the connection set-up
# (10,000 WebSocket upgrades; 100 TLS handshakes per run) stays out of the graph:
#    fanout-epoll: `[rooms] publish_rate = 0`, ulimit -n 20000, a 20-message warm-up, then
#      REPEAT_FANOUT × `ringgate-load fanout` with FANOUT_SUBS subscribers, 1 publisher,
#      FANOUT_RATE/s, FANOUT_MESSAGES × 64 B; perf records from `up:` for
#      FANOUT_MESSAGES / FANOUT_RATE seconds (the publishing phase, not the drain and teardown).
#    wss-epoll: `ringgate dev-cert $WORK/cert`, the server with --tls-cert/--tls-key, the echo
#      load of epoll-pipeline8 over wss:// (--ca), REPEAT_WSS times; perf records from
#      `connected` to the tool's `messages:` line.
#
# Env: BUILD=0 skips step 1 (reuses the binaries in $WORK/bin), RENDER_ONLY=1 (with BUILD=0)
#      redoes only step 3 from $WORK/NAME.folded,
#      ONLY="uring-pipeline8 ..." limits the profiles, REPEAT_P8 (12), REPEAT_P1 (2),
#      REPEAT_FANOUT (3), FANOUT_SUBS (10000), FANOUT_RATE (50), FANOUT_MESSAGES (200), REPEAT_WSS (12),
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
REPEAT_FANOUT=${REPEAT_FANOUT:-3}
FANOUT_SUBS=${FANOUT_SUBS:-10000}
FANOUT_RATE=${FANOUT_RATE:-50}
FANOUT_MESSAGES=${FANOUT_MESSAGES:-200}
REPEAT_WSS=${REPEAT_WSS:-12}
ONLY=${ONLY:-"uring-pipeline8 epoll-pipeline8 uring-pipeline1 fanout-epoll wss-epoll"}
mkdir -p "$WORK"

if [ "${BUILD:-1}" = 1 ]; then
    rm -rf "$WORK/src" "$WORK/bin" && mkdir -p "$WORK/src" "$WORK/bin"
    git -C "$REPO" archive "$COMMIT" | tar -x -C "$WORK/src"
    # git archive stamps files with the commit time; if another checkout already built into
    # the same target dir, cargo would call that build fresh. Touch the copy to force our own.
    find "$WORK/src" -type f -exec touch {} +
    (cd "$WORK/src" && cargo build --release --workspace --bins --examples)
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
    local io=$1 pipe=$2 rep=$3
    render_named "echo-$1-pipeline$2" \
        "ringgate echo, --io $io, --pipeline $pipe (server CPU, cpu-clock 999 Hz)" \
        "commit $SHORT; 100 conns x 32 B, $rep x 400,000 msgs; server on core 0, loopback; kernel frames _[k]"
}

# ---- fanout-epoll, wss-epoll: perf records only the load tool's measured phase ----

fanout_load() { # MESSAGES
    (ulimit -n 20000; exec taskset -c 1 timeout 200 "$BIN/ringgate-load" fanout --url ws://127.0.0.1:8003/ws \
        --subscribers "$FANOUT_SUBS" --publishers 1 --rate "$FANOUT_RATE" --messages "$1" --size 64 \
        --drain 20 --duration-limit 150 --server-pid "$PID")
}

wss_load() { # MESSAGES
    taskset -c 1 timeout 120 "$BIN/ringgate-load" echo --url wss://127.0.0.1:8003/ws/echo \
        --ca "$WORK/cert/ca.pem" --connections 100 --size 32 --messages "$1" --pipeline 8 \
        --server-pid "$PID"
}

gate() { # KIND: passes the load tool's output through; turns perf on (fd 7) for the measured phase
    local line
    while IFS= read -r line; do
        printf '%s\n' "$line"
        case $1:$line in
        fanout:up:*)
            echo enable >&7
            (sleep "$(awk -v m="$FANOUT_MESSAGES" -v r="$FANOUT_RATE" 'BEGIN{print m / r}')"
             echo disable >&7) & ;;
        wss:connected*) echo enable >&7 ;;
        wss:messages:*) echo disable >&7 ;;
        esac
    done
}

gated() { # NAME KIND REPEAT SERVER-ARGS...: like profile, perf gated by the load tool's output
    local name=$1 kind=$2 rep=$3 quiet; shift 3
    local data=$WORK/$name.perf.data log=$OUT/$name.load.log ctl=$WORK/$name.perf.ctl
    local msgs=$FANOUT_MESSAGES
    [ "$kind" = wss ] && msgs=400000
    quiet=$(wait_quiet)
    echo "$name: $quiet"
    (ulimit -n 20000; exec taskset -c 0 "$BIN/ringgate" --host 127.0.0.1 --shards 1 --port 8003 "$@") \
        >"$WORK/$name.server.log" 2>&1 &
    PID=$!
    for _ in $(seq 50); do
        (exec 3<>/dev/tcp/127.0.0.1/8003) 2>/dev/null && break
        sleep 0.1
    done
    {
        echo "# $(date -u +%FT%TZ) commit $SHORT kernel $(uname -r) nproc=$(nproc) loadavg=$(cut -d' ' -f1-3 /proc/loadavg); $quiet"
        echo "# server: ulimit -n 20000; taskset -c 0 $BIN/ringgate --host 127.0.0.1 --shards 1 --port 8003 $*"
        echo "## warm-up (not profiled)"
        if [ "$kind" = wss ]; then wss_load 20000; else fanout_load 20; fi
    } >"$log" 2>&1
    rm -f "$ctl" && mkfifo "$ctl"
    exec 7<>"$ctl" # read-write: never blocks, and perf's reads never see EOF
    taskset -c 1 perf record -e cpu-clock -F 999 --call-graph dwarf,16384 -D -1 --control "fifo:$ctl" \
        -p "$PID" -o "$data" -- sleep "$PERF_SECS" 2>"$WORK/$name.perf.log" &
    PERF=$!
    sleep 1 # let perf attach before the load starts
    for i in $(seq "$rep"); do
        echo "## profiled run $i/$rep loadavg=$(cut -d' ' -f1-3 /proc/loadavg)" >>"$log"
        "${kind}_load" "$msgs" 2>&1 | gate "$kind" >>"$log"
        sleep 0.2
        echo disable >&7 # in case the run failed before its measured phase ended
    done
    kill -INT "$PERF" 2>/dev/null || true
    wait "$PERF" || true
    PERF=
    exec 7>&-
    rm -f "$ctl"
    kill "$PID"
    wait "$PID" 2>/dev/null || true
    PID=
    grep -v '^Events \(en\|dis\)abled$' "$WORK/$name.perf.log" >>"$log" || true
    perf script -i "$data" 2>/dev/null | inferno-collapse-perf --kernel >"$WORK/$name.folded"
    render_"$kind" "$rep"
}

render_fanout() { # REPEAT
    render_named fanout-epoll \
        "ringgate rooms fan-out, --io epoll (server CPU, cpu-clock 999 Hz)" \
        "commit $SHORT; $FANOUT_SUBS subscribers, 1 publisher, $FANOUT_RATE/s x 64 B, $1 x $FANOUT_MESSAGES msgs (publishing phase only); server on core 0, loopback; kernel frames _[k]"
}

render_wss() { # REPEAT
    render_named wss-epoll \
        "ringgate echo over TLS (wss), --io epoll, --pipeline 8 (server CPU, cpu-clock 999 Hz)" \
        "commit $SHORT; 100 conns x 32 B, $1 x 400,000 msgs (handshakes not profiled); server on core 0, loopback; kernel frames _[k]"
}

render_named() { # NAME TITLE SUBTITLE: $WORK/NAME.folded -> NAME.svg, NAME.folded.gz, NAME.summary.txt
    local name=$1
    inferno-flamegraph --minwidth 0.05 --colors hot --countname ns --title "$2" --subtitle "$3" \
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
    fanout-epoll)
        if [ $STEP = render ]; then render_fanout "$REPEAT_FANOUT"; else
            printf '[rooms]\npublish_rate = 0\n' >"$WORK/fanout.toml"
            gated fanout-epoll fanout "$REPEAT_FANOUT" --io epoll --config "$WORK/fanout.toml"
        fi ;;
    wss-epoll)
        if [ $STEP = render ]; then render_wss "$REPEAT_WSS"; else
            [ -s "$WORK/cert/cert.pem" ] || "$BIN/ringgate" dev-cert "$WORK/cert" >/dev/null
            gated wss-epoll wss "$REPEAT_WSS" --io epoll \
                --tls-cert "$WORK/cert/cert.pem" --tls-key "$WORK/cert/key.pem"
        fi ;;
    *) echo "unknown profile $p" >&2; exit 2 ;;
    esac
done
