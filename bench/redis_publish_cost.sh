#!/usr/bin/env bash
# Instructions per publish of ringgate's Redis link (bench/CLUSTER.md, "What a publish
# costs"): callgrind over 2,000 and 12,000 publishes of tools/redisbench against a real
# redis-server on 127.0.0.1, and the functions of Keys::publish inclusive.
#
#   cargo build --release -p ringgate-redisbench
#   bash bench/redis_publish_cost.sh > bench/raw-redis-publish-cost.log
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PORT=16491; DIR=$(mktemp -d)
redis-server --port $PORT --bind 127.0.0.1 --save "" --appendonly no --dir $DIR >/dev/null 2>&1 &
R=$!
trap 'kill $R; rm -rf $DIR' EXIT
until redis-cli -p $PORT ping >/dev/null 2>&1; do sleep 0.1; done
echo "## $(date -u +%FT%TZ) loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
for n in 2000 12000; do
  timeout 600 valgrind --tool=callgrind --callgrind-out-file=$DIR/cg.$n target/release/ringgate-redisbench publish --client ours --addr 127.0.0.1:$PORT --n $n >/dev/null 2>&1
  echo "n=$n Ir=$(awk '/^summary:/ {print $2}' $DIR/cg.$n)"
done
callgrind_annotate --inclusive=yes $DIR/cg.12000 2>/dev/null | grep -E "Keys::publish|Keys::slot|resp::command|Keys::key" | head -8
