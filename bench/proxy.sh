#!/usr/bin/env bash
# ringgate's proxy against nginx (Debian package, one worker) in front of the same upstreams,
# for bench/PROXY.md. The proxy under test is pinned to core 0; the upstreams and the load
# tools to core 1; the figure is the proxy's CPU time (utime+stime of the ringgate process, of
# nginx's one worker) per message or request. Targets 127.0.0.1 only; every run is bounded.
#
#   apt-get install nginx wrk curl
#   cargo build --release --workspace --bins
#   bash bench/proxy.sh [REPS] > bench/raw-proxy.log
#
# Env: BIN (default target/release), REPS (1), PARTS ("echo tunnel idle http body"; also
# "idle_tunnel": idle connections through /tunnel), IDLE_CONNS (5000), BODY_MB (1024),
# CERTS (default /tmp/ringgate-bench-certs), PORTS (9100: the base of the four ports below,
# so that two runs on one machine do not share them).
#
# Upstreams (core 1): a ringgate serving /ws/echo on :9101 (epoll, one shard), and an nginx
# serving a 13-byte response and a BODY_MB file on :9102. The proxies (core 0) listen on :9103
# (wss, the dev certificate) and :9104 (plain HTTP).
set -u
. "$(dirname "$0")/lib.sh"
BIN=${BIN:-target/release}
REPS=${1:-${REPS:-1}}
PARTS=${PARTS:-"echo tunnel idle http body"}
IDLE_CONNS=${IDLE_CONNS:-5000}
BODY_MB=${BODY_MB:-1024}
CERTS=${CERTS:-/tmp/ringgate-bench-certs}
LOAD="$BIN/ringgate-load"
WORK=$(mktemp -d /tmp/ringgate-bench-proxy.XXXXXX)
chmod 755 "$WORK" # nginx workers run as www-data
IO=${IO:-epoll}
PORTS=${PORTS:-9100}
UPWS_PORT=$((PORTS + 1)) UPHTTP_PORT=$((PORTS + 2)) WSS_PORT=$((PORTS + 3)) HTTP_PORT=$((PORTS + 4))

command -v nginx >/dev/null || { echo "needs nginx: apt-get install nginx" >&2; exit 1; }
command -v wrk >/dev/null || { echo "needs wrk: apt-get install wrk" >&2; exit 1; }
[ -f "$CERTS/ca.pem" ] || "$BIN/ringgate" dev-cert "$CERTS" >&2 || exit 1

UP_WS=; UP_HTTP=; PID=; NGX_MASTER=
cleanup() {
    for p in $UP_HTTP $NGX_MASTER; do stop_nginx "$p"; done
    for p in $PID $UP_WS; do kill -9 "$p" 2>/dev/null; done
    pkill -9 -f "$WORK/" 2>/dev/null
    [ -n "${KEEP:-}" ] || rm -rf "$WORK"
}
trap cleanup EXIT

# The upstreams, on core 1 beside the load.
taskset -c 1 "$BIN/ringgate" --host 127.0.0.1 --port $UPWS_PORT --shards 1 --io epoll \
    --admin-listen off >"$WORK/up-ws.log" 2>&1 &
UP_WS=$!
mkdir -p "$WORK/ngx"
nginx_upstream "$WORK" $UPHTTP_PORT "$BODY_MB" taskset -c 1
UP_HTTP=$NGINX
up upstream-ws $UPWS_PORT && up upstream-http $UPHTTP_PORT || exit 1

cat >"$WORK/ringgate.toml" <<EOF
admin_listen = "off"
[[listen]]
addr = "127.0.0.1:$WSS_PORT"
tls = true
[[listen]]
addr = "127.0.0.1:$HTTP_PORT"
[tls]
cert = "$CERTS/cert.pem"
key = "$CERTS/key.pem"
[limits]
max_open_connections = 19000
[[route]]
path = "/echo"
upstreams = ["ws://127.0.0.1:$UPWS_PORT/ws/echo"]
strip_prefix = true
[[route]]
path = "/tunnel"
upstreams = ["ws://127.0.0.1:$UPWS_PORT/ws/echo"]
strip_prefix = true
mode = "tunnel"
[[route]]
path_prefix = "/h/"
upstreams = ["http://127.0.0.1:$UPHTTP_PORT"]
strip_prefix = true
max_body_size = 0
EOF

# nginx as the same proxy: one worker, TLS 1.3 as rustls negotiates it, streaming both ways
# (no buffering of bodies to temporary files: ringgate streams too), keep-alive upstreams.
cat >"$WORK/ngx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/ngx/nginx.pid;
error_log $WORK/ngx/error.log warn;
worker_rlimit_nofile 20000;
events { worker_connections 19000; }
http {
    access_log off;
    keepalive_requests 1000000;
    upstream h { server 127.0.0.1:$UPHTTP_PORT; keepalive 64; }
    map \$http_upgrade \$connection_upgrade { default upgrade; '' close; }
    server {
        listen 127.0.0.1:$WSS_PORT ssl reuseport backlog=4096;
        listen 127.0.0.1:$HTTP_PORT reuseport backlog=4096;
        ssl_certificate $CERTS/cert.pem;
        ssl_certificate_key $CERTS/key.pem;
        ssl_protocols TLSv1.3;
        client_max_body_size 0;
$(nginx_ws_location /echo "http://127.0.0.1:$UPWS_PORT/ws/echo")
$(nginx_ws_location /tunnel "http://127.0.0.1:$UPWS_PORT/ws/echo")
$(nginx_http_location)
    }
}
EOF

start() { # ringgate|nginx: sets PID to the process whose CPU and memory count
    if [ "$1" = ringgate ]; then
        # Access logs off on both (nginx: access_log off).
        RUST_LOG=info,access=off taskset -c 0 "$BIN/ringgate" --shards 1 --io "$IO" --config "$WORK/ringgate.toml" \
            >"$WORK/ringgate.log" 2>&1 &
        PID=$!
    else
        taskset -c 0 nginx -c "$WORK/ngx/nginx.conf" -p "$WORK/ngx" >"$WORK/ngx/out.log" 2>&1 &
        NGX_MASTER=$!
        up nginx $HTTP_PORT || return 1
        # The master listens before it forks its worker: wait for the worker.
        for _ in $(seq 50); do
            PID=$(pgrep -P "$NGX_MASTER" | head -1)
            [ -n "$PID" ] && break
            sleep 0.1
        done
        [ -n "$PID" ] || return 1
    fi
    up "$1" $WSS_PORT && up "$1" $HTTP_PORT
}
halt() {
    if [ -n "$NGX_MASTER" ]; then
        kill -QUIT "$NGX_MASTER" 2>/dev/null
        for _ in $(seq 50); do kill -0 "$NGX_MASTER" 2>/dev/null || break; sleep 0.1; done
        stop_nginx "$NGX_MASTER"; wait "$NGX_MASTER" 2>/dev/null
        NGX_MASTER=; PID=
    else
        stop
    fi
}
cpu() { # PID: utime+stime in clock ticks
    awk '{print $14 + $15}' "/proc/$1/stat"
}
hwm() { # PID: peak RSS in KiB
    awk '/VmHWM/ {print $2}' "/proc/$1/status"
}

echo "# $(date -u +%FT%TZ) commit $(git rev-parse --short HEAD 2>/dev/null) $(uname -r) nproc=$(nproc) io=$IO $(nginx -v 2>&1)"
for rep in $(seq "$REPS"); do
    for part in $PARTS; do
        for p in ringgate nginx; do
            start $p || { halt; continue; }
            sleep 0.3
            case $part in
            echo | tunnel)
                # /echo: ringgate relays message by message (mode = "websocket"); /tunnel:
                # it copies bytes (mode = "tunnel"). nginx copies bytes on both.
                for inflight in 1 8; do
                    msgs=100000
                    [ "$inflight" = 8 ] && msgs=200000
                    echo "## $part proxy=$p pipeline=$inflight rep=$rep loadavg=$(cut -d' ' -f1-3 /proc/loadavg)"
                    taskset -c 1 timeout 120 "$LOAD" echo --url "wss://127.0.0.1:$WSS_PORT/$part" \
                        --ca "$CERTS/ca.pem" --connections 100 --size 32 --messages $msgs \
                        --pipeline "$inflight" --warmup 2000 --server-pid "$PID"
                done
                ;;
            idle | idle_tunnel)
                # idle: the relay (/echo); idle_tunnel: /tunnel. Each on a fresh proxy.
                path=echo
                [ $part = idle_tunnel ] && path=tunnel
                echo "## $part proxy=$p path=/$path conns=$IDLE_CONNS rep=$rep loadavg=$(cut -d' ' -f1-3 /proc/loadavg)"
                taskset -c 1 timeout 200 "$LOAD" idle --url "wss://127.0.0.1:$WSS_PORT/$path" \
                    --ca "$CERTS/ca.pem" --connections "$IDLE_CONNS" --hold 3 --settle 2 \
                    --server-pid "$PID"
                ;;
            http)
                echo "## http proxy=$p rep=$rep loadavg=$(cut -d' ' -f1-3 /proc/loadavg)"
                # Warm the upstream pool, then measure.
                taskset -c 1 wrk -t1 -c50 -d2s http://127.0.0.1:$HTTP_PORT/h/small >/dev/null
                c0=$(cpu "$PID")
                taskset -c 1 wrk -t1 -c50 -d10s --latency http://127.0.0.1:$HTTP_PORT/h/small \
                    | tee "$WORK/wrk.out" | grep -E "Requests/sec|99%|Non-2xx|Socket errors"
                c1=$(cpu "$PID")
                reqs=$(awk '/requests in/ {print $1}' "$WORK/wrk.out")
                tck=$(getconf CLK_TCK)
                awk -v r="$reqs" -v c=$((c1 - c0)) -v t="$tck" \
                    'BEGIN { s = c / t; printf "proxy_cpu_s=%.2f requests=%d req_per_core_s=%.0f\n", s, r, r / s }'
                ;;
            body)
                for dir in down up; do
                    echo "## body proxy=$p dir=$dir mb=$BODY_MB rep=$rep loadavg=$(cut -d' ' -f1-3 /proc/loadavg)"
                    rss0=$(awk '/VmRSS/ {print $2}' "/proc/$PID/status")
                    c0=$(cpu "$PID")
                    if [ $dir = down ]; then
                        out=$(taskset -c 1 timeout 300 curl -s -o /dev/null \
                            -w '%{http_code} %{size_download} %{time_total}' http://127.0.0.1:$HTTP_PORT/h/big)
                    else
                        out=$(taskset -c 1 timeout 300 curl -s -o /dev/null -T "$WORK/big" \
                            -H 'Expect:' -w '%{http_code} %{size_upload} %{time_total}' \
                            http://127.0.0.1:$HTTP_PORT/h/sink)
                    fi
                    c1=$(cpu "$PID")
                    rss1=$(awk '/VmRSS/ {print $2}' "/proc/$PID/status")
                    echo "$out" | awk -v c=$((c1 - c0)) -v t="$(getconf CLK_TCK)" -v r0="$rss0" -v r1="$rss1" -v h="$(hwm "$PID")" \
                        '{ printf "status=%s bytes=%s seconds=%.2f MBps=%.0f proxy_cpu_s=%.2f rss_before_kib=%s rss_after_kib=%s hwm_kib=%s\n", $1, $2, $3, $2 / $3 / 1048576, c / t, r0, r1, h }'
                done
                ;;
            esac
            halt
        done
    done
done
