#!/usr/bin/env bash
# A/B of two ringgate builds on the same machine, interleaved: echo (100 connections x 32 B,
# 1 and 8 in flight, both backends, 3 reps) and rooms fan-out (10,000 subscribers x 100/s x
# 64 B, epoll, 2 reps). Server pinned to core 0 (--shards 1), load on core 1; 127.0.0.1 only.
#
#   BASE=/path/to/old/ringgate NEW=target/release/ringgate LOAD=target/release/ringgate-load \
#     bash bench/ab.sh > /tmp/ab.log
set -u
BASE=${BASE:?path to the base ringgate binary}
NEW=${NEW:-target/release/ringgate}
LOAD=${LOAD:-target/release/ringgate-load}
printf '[rooms]\npublish_rate = 0\n' > /tmp/bench-ab-rooms.toml
up() { for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$1/healthz" && return 0; sleep 0.05; done; return 1; }
echo "# $(date -u +%FT%TZ) loadavg=$(cut -d' ' -f1-3 /proc/loadavg)"
for rep in 1 2 3; do
  for io in epoll uring; do
    for pipe in 1 8; do
      for v in base new; do
        bin=$BASE; [ $v = new ] && bin=$NEW
        (ulimit -n 20000; exec taskset -c 0 "$bin" --host 127.0.0.1 --port 8123 --shards 1 --io $io) >/tmp/bench-ab-server.log 2>&1 &
        pid=$!; up 8123 || { echo "no server $v"; kill -9 $pid; continue; }
        r=$(taskset -c 1 timeout 120 "$LOAD" echo --url ws://127.0.0.1:8123/ws/echo --connections 100 --size 32 --messages 200000 --pipeline $pipe --server-pid $pid 2>&1 | grep -i 'server' | tr '\n' ' ')
        echo "echo io=$io pipeline=$pipe v=$v rep=$rep :: $r"
        kill -TERM $pid; wait $pid 2>/dev/null
      done
    done
  done
done
for rep in 1 2; do
  for v in base new; do
    bin=$BASE; [ $v = new ] && bin=$NEW
    (ulimit -n 20000; exec taskset -c 0 "$bin" --config /tmp/bench-ab-rooms.toml --host 127.0.0.1 --port 8124 --shards 1 --io epoll) >/tmp/bench-ab-server.log 2>&1 &
    pid=$!; up 8124 || { echo "no server $v"; kill -9 $pid; continue; }
    r=$( (ulimit -n 20000; taskset -c 1 timeout 170 "$LOAD" fanout --url ws://127.0.0.1:8124/ws --subscribers 10000 --rate 100 --messages 1000 --size 64 --drain 20 --duration-limit 150 --server-pid $pid) 2>&1 | grep -iE 'server|delivered' | tr '\n' ' ')
    echo "fanout 10000x100/s io=epoll v=$v rep=$rep :: $r"
    kill -TERM $pid; wait $pid 2>/dev/null
  done
done
