#!/usr/bin/env bash
# Memory per connection, per subscription and per room on the `/ws` rooms endpoint, from the
# server's RSS (VmRSS in /proc/PID/status). For each server and scenario a fresh server (pinned
# to core 0) gets N WebSocket connections from one Python `websockets` client (core 1):
#
#   idle    N connections, no subscription
#   shared  each subscribed to one shared topic          (N subscriptions, 1 room)
#   own     each subscribed to its own topic             (N subscriptions, N rooms)
#   ten     each subscribed to the same 10 topics        (10 N subscriptions, 10 rooms)
#   tenown  each subscribed to 10 topics of its own      (10 N subscriptions, 10 N rooms)
#
# RSS is read before the first connection ("fresh"), once every reply has arrived ("ready"),
# and again after SETTLE seconds ("settled": ringgate gives idle buffers back after a tick
# without traffic; heartbeat_interval is 5 s here so that happens during the wait). ringgate
# also reports its own `ringgate_rooms` / `ringgate_subscriptions` gauges as a check.
# presence_events = false: with events on, the first 1000 members of the shared topic would each
# send a join to all the others (~500k messages the client must read); the member lists are
# kept either way. No publishes: history rings are not part of these figures.
#
#   BIN=target/release bash bench/rooms_memory.sh [REPS] > bench/raw-fanout-memory.log
#
# Env: BIN, REPS (1), N (10000), SERVERS ("ringgate-epoll ringgate-uring node"),
# SCENARIOS ("idle shared own ten"; "tenown" as well for a sharper per-room figure), SETTLE (12), NODE_MODULES. Targets 127.0.0.1 only.
set -u
. "$(dirname "$0")/lib.sh"
BIN=${BIN:-target/release}
REPS=${1:-${REPS:-1}}
N=${N:-10000}
SERVERS=${SERVERS:-"ringgate-epoll ringgate-uring node"}
SCENARIOS=${SCENARIOS:-"idle shared own ten"}
SETTLE=${SETTLE:-12}
NODE_MODULES=${NODE_MODULES:-target/node/node_modules}

DRIVER=/tmp/bench-rooms-memory-driver.py
cat >"$DRIVER" <<'EOF'
# Opens N connections to URL, subscribes each per SCENARIO, waits for every reply, prints
# "READY", then holds the connections until stdin closes.
import asyncio, json, sys
from websockets.asyncio.client import connect

url, n, scenario = sys.argv[1], int(sys.argv[2]), sys.argv[3]

def topics_for(i):
    return {"idle": [], "shared": ["shared"], "own": [f"own-{i}"],
            "ten": [f"ten-{k}" for k in range(10)],
            "tenown": [f"own-{i}-{k}" for k in range(10)]}[scenario]

async def one(i, conns, sem):
    async with sem:
        ws = await connect(url, compression=None, max_queue=None, open_timeout=60,
                           ping_interval=None, close_timeout=1)
        want = topics_for(i)
        for k, t in enumerate(want):
            await ws.send(json.dumps({"action": "subscribe", "topic": t, "id": k}))
        got = 0
        while got < len(want):
            m = json.loads(await ws.recv())
            if m.get("type") == "subscribed":
                got += 1
            elif m.get("type") == "error":
                raise RuntimeError(f"conn {i}: {m}")
        conns.append(ws)

async def main():
    conns, sem = [], asyncio.Semaphore(200)
    await asyncio.gather(*(one(i, conns, sem) for i in range(n)))
    print(f"READY connections={len(conns)} subscriptions={len(conns) * len(topics_for(0))}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for ws in conns:
        ws.transport.abort()

asyncio.run(main())
EOF

PID=
start() { # NAME
    case $1 in
    node) (ulimit -n 20000; NODE_PATH=$NODE_MODULES exec taskset -c 0 node examples/node_ws_broadcast.js --port 8006) >/tmp/bench-rooms-memory-server.log 2>&1 & PORT=8006 ;;
    ringgate-epoll | ringgate-uring)
        printf '[rooms]\npublish_rate = 0\npresence_events = false\n' >/tmp/bench-rooms-memory.toml
        (ulimit -n 20000; exec taskset -c 0 "$BIN/ringgate" --config /tmp/bench-rooms-memory.toml --host 127.0.0.1 --shards 1 --port 8003 --io "${1#ringgate-}" --heartbeat-interval 5) >/tmp/bench-rooms-memory-server.log 2>&1 & PORT=8003 ;;
    esac
    PID=$!
    up "$1" "$PORT"
}
rss() { awk '/^VmRSS/ {print $2}' "/proc/$PID/status"; }
gauges() { # ringgate's own counts
    [ "$PORT" = 8003 ] || { echo "- "; return; }
    exec 3<>/dev/tcp/127.0.0.1/8003
    printf 'GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n' >&3
    timeout 5 cat <&3 | awk '/^ringgate_(rooms|subscriptions|connections_active)[{ ]/ {printf "%s=%s ", $1, $2}'
    exec 3<&-
}
trap '[ -n "$PID" ] && kill -9 "$PID" 2>/dev/null; rm -f /tmp/bench-rooms-memory.fifo' EXIT

echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null) $(uname -r) nproc=$(nproc) node $(node --version) python websockets $(python3 -c 'import websockets; print(websockets.__version__)')"
for rep in $(seq "$REPS"); do
    for sc in $SCENARIOS; do
        for srv in $SERVERS; do
            start "$srv" || continue
            sleep 1
            fresh=$(rss)
            rm -f /tmp/bench-rooms-memory.fifo; mkfifo /tmp/bench-rooms-memory.fifo
            # The driver holds its connections until the fifo's writer (fd 4) closes.
            (ulimit -n 20000; exec taskset -c 1 timeout 300 python3 "$DRIVER" "ws://127.0.0.1:$PORT/ws" "$N" "$sc" </tmp/bench-rooms-memory.fifo) >/tmp/bench-rooms-memory-driver.out 2>&1 &
            DPID=$!
            exec 4>/tmp/bench-rooms-memory.fifo
            ok=
            for _ in $(seq 600); do
                grep -q '^READY' /tmp/bench-rooms-memory-driver.out && { ok=1; break; }
                kill -0 "$DPID" 2>/dev/null || break
                sleep 0.5
            done
            if [ -z "$ok" ]; then
                echo "## driver failed: server=$srv scenario=$sc"; cat /tmp/bench-rooms-memory-driver.out
                exec 4>&-; wait "$DPID"; stop 100; continue
            fi
            sleep 1
            ready=$(rss)
            sleep "$SETTLE"
            settled=$(rss)
            echo "MEM server=$srv scenario=$sc rep=$rep n=$N $(grep '^READY' /tmp/bench-rooms-memory-driver.out | cut -d' ' -f2-) fresh_kib=$fresh ready_kib=$ready settled_kib=$settled $(gauges)loadavg=$(cut -d' ' -f1 /proc/loadavg)"
            exec 4>&-
            wait "$DPID"
            stop 100
        done
    done
done
