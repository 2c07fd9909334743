#!/usr/bin/env bash
# Instructions the proxy executes per proxied HTTP request and per MiB of streamed body,
# counted by callgrind (repeatable on a loaded machine, unlike time): ringgate (one shard,
# epoll, access log off) in front of an nginx upstream, for bench/PROXY.md.
#
#   cargo build --release --bins
#   bash bench/proxy_callgrind.sh [BIN...] > /tmp/proxy-callgrind.log
#
# Each BIN (default target/release/ringgate) runs under valgrind; BIN `nginx` is nginx as the
# same proxy (one process, `master_process off`, keep-alive upstream pool, no buffering: the
# configuration of bench/proxy.sh), for reference. The counters are zeroed
# after a warm-up (which fills the keep-alive pool) and dumped after the measured part:
#   http: `wrk -t1 -c10 -d10s` for a 13-byte response, Ir ÷ requests;
#   health: the same for ringgate's built-in `GET /healthz` (no upstream; nginx: a `return 200`),
#     Ir ÷ requests;
#   down: a BODY_MB (64) file downloaded with curl, Ir ÷ MiB;
#   up:   the same uploaded with curl -T, Ir ÷ MiB.
# Env: BODY_MB (64), IO (epoll), KEEP (set: keep the dumps for callgrind_annotate), PORTS
# (9200: the upstream listens on PORTS+2, the proxy on PORTS+4), H2C (set: the clients speak
# HTTP/2 with prior knowledge to ringgate, `h2c = true`; ringgate only). Targets 127.0.0.1
# only; every run is bounded.
set -u
. "$(dirname "$0")/lib.sh"
BODY_MB=${BODY_MB:-64}
IO=${IO:-epoll}
PORTS=${PORTS:-9200}
UP_PORT=$((PORTS + 2)) PX_PORT=$((PORTS + 4))
[ $# -gt 0 ] || set -- target/release/ringgate
WORK=$(mktemp -d /tmp/ringgate-callgrind-proxy.XXXXXX)
chmod 755 "$WORK" # nginx workers run as www-data
UP=; PID=
cleanup() {
    [ -n "$UP" ] && stop_nginx "$UP"
    [ -n "$PID" ] && stop_nginx "$PID" # nginx as the proxy, or ringgate (no children)
    if [ -n "${KEEP:-}" ]; then echo "# dumps kept in $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

nginx_upstream "$WORK" $UP_PORT "$BODY_MB"
UP=$NGINX
up upstream $UP_PORT || exit 1
cat >"$WORK/ringgate.toml" <<EOF
admin_listen = "off"
[[listen]]
addr = "127.0.0.1:$PX_PORT"
h2c = $([ -n "${H2C:-}" ] && echo true || echo false)
[[route]]
path_prefix = "/h/"
upstreams = ["http://127.0.0.1:$UP_PORT"]
strip_prefix = true
max_body_size = 0
EOF

mkdir -p "$WORK/px"
cat >"$WORK/px/nginx.conf" <<EOF
master_process off;
daemon off;
pid $WORK/px/nginx.pid;
error_log $WORK/px/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    keepalive_requests 1000000;
    upstream h { server 127.0.0.1:$UP_PORT; keepalive 64; }
    server {
        listen 127.0.0.1:$PX_PORT;
        client_max_body_size 0;
        location = /healthz { return 200 "ok\\n"; }
$(nginx_http_location)
    }
}
EOF

# ir FILE: the total instruction count of a callgrind dump.
ir() { awk '/^(summary|totals):/ {print $2; exit}' "$1"; }
# measure N CMD...: zero, run CMD, dump (the Nth dump of the process); prints its Ir.
measure() {
    local n=$1
    shift
    callgrind_control -z "$PID" >/dev/null 2>&1
    "$@"
    callgrind_control -d "$PID" >/dev/null 2>&1
    ir "$WORK/cg.out.$PID.$n"
}

small() { wrk -t1 -c10 -d10s http://127.0.0.1:$PX_PORT/h/small >"$WORK/wrk.out"; }
health() { wrk -t1 -c10 -d10s http://127.0.0.1:$PX_PORT/healthz >"$WORK/wrk.out"; }
# The two bodies, with curl's status and byte count in curl.out (checked by the reader).
CURL_H2=${H2C:+--http2-prior-knowledge}
download() {
    timeout 300 curl $CURL_H2 -s -o /dev/null -w '%{http_code} %{size_download} down\n' \
        http://127.0.0.1:$PX_PORT/h/big >>"$WORK/curl.out"
}
upload() {
    timeout 300 curl $CURL_H2 -s -o /dev/null -w '%{http_code} %{size_upload} up\n' -T "$WORK/big" \
        -H 'Expect:' http://127.0.0.1:$PX_PORT/h/sink >>"$WORK/curl.out"
}

echo "# $(date -u +%FT%TZ) loadavg=$(cut -d' ' -f1-3 /proc/loadavg) io=$IO body_mb=$BODY_MB"
for bin in "$@"; do
    if [ "$bin" = nginx ]; then
        valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.out.%p" \
            nginx -c "$WORK/px/nginx.conf" -p "$WORK/px" >"$WORK/ringgate.log" 2>&1 &
    else
        RUST_LOG=warn,access=off valgrind --tool=callgrind --callgrind-out-file="$WORK/cg.out.%p" \
            "$bin" --shards 1 --io "$IO" --config "$WORK/ringgate.toml" >"$WORK/ringgate.log" 2>&1 &
    fi
    PID=$!
    up ringgate $PX_PORT 600 || { cat "$WORK/ringgate.log"; exit 1; }
    wrk -t1 -c10 -d3s http://127.0.0.1:$PX_PORT/h/small >/dev/null
    ir_http=$(measure 1 small)
    reqs=$(awk '/requests in/ {print $1}' "$WORK/wrk.out")
    ir_health=$(measure 2 health)
    reqs_health=$(awk '/requests in/ {print $1}' "$WORK/wrk.out")
    ir_down=$(measure 3 download)
    ir_up=$(measure 4 upload)
    sed 's/^/# curl: /' "$WORK/curl.out"
    awk -v b="$bin" -v h="$ir_http" -v r="$reqs" -v d="$ir_down" -v u="$ir_up" -v mb="$BODY_MB" \
        -v hh="$ir_health" -v rh="$reqs_health" \
        'BEGIN { printf "%s: http %.0f Ir/request (%d requests); healthz %.0f Ir/request (%d requests); download %.0f Ir/MiB; upload %.0f Ir/MiB\n", b, h / r, r, hh / rh, rh, d / mb, u / mb }'
    kill "$PID"; wait "$PID" 2>/dev/null; PID=
    rm -f "$WORK/curl.out"
done
