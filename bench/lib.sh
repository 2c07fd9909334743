# Shared by the bench scripts (`. "$(dirname "$0")/lib.sh"`): waiting for the server a script
# started (its pid in $PID) and stopping it; the proxy benchmarks' nginx upstream and the
# locations of nginx as the proxy compared with ringgate. 127.0.0.1 only.

# up NAME PORT [TRIES]: waits until 127.0.0.1:PORT accepts, TRIES × 0.1 s (default 50).
up() {
    for _ in $(seq "${3:-50}"); do
        (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "server $1 did not come up" >&2
    return 1
}

# stop [TRIES]: SIGTERM to $PID, up to TRIES × 0.1 s to exit (default 50), then SIGKILL.
stop() {
    kill "$PID" 2>/dev/null
    for _ in $(seq "${1:-50}"); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$PID" 2>/dev/null
    wait "$PID" 2>/dev/null
    PID=
}

# nginx_upstream DIR PORT BODY_MB [PREFIX...]: the proxy benchmarks' HTTP upstream, nginx with
# one worker on 127.0.0.1:PORT: GET /small answers 13 bytes, GET /big the BODY_MB file DIR/big,
# POST /sink takes any body. Started in the background under PREFIX (e.g. `taskset -c 1`), its
# pid in $NGINX (stop it with stop_nginx). DIR must be readable by nginx's workers (www-data).
nginx_upstream() {
    local dir=$1 port=$2 mb=$3
    shift 3
    truncate -s "${mb}M" "$dir/big"
    mkdir -p "$dir/up"
    cat >"$dir/up/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $dir/up/nginx.pid;
error_log $dir/up/error.log warn;
events { worker_connections 20000; }
http {
    access_log off;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:$port reuseport backlog=4096;
        location = /small { return 200 "hello, proxy\n"; }
        location = /big { root $dir; }
        location = /sink { client_max_body_size 0; return 200 "ok\n"; }
    }
}
EOF
    "$@" nginx -c "$dir/up/nginx.conf" -p "$dir/up" >"$dir/up/out.log" 2>&1 &
    NGINX=$!
}

# nginx_http_location: the `/h/` location of nginx as a proxy to the upstream block `h`
# (keep-alive), streaming both ways (ringgate does not buffer bodies either). For a heredoc
# of nginx.conf: `$(nginx_http_location)`.
nginx_http_location() {
    cat <<'EOF'
        location /h/ {
            proxy_pass http://h/;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }
EOF
}

# nginx_ws_location PATH UPSTREAM: a location proxying WebSocket upgrades on PATH to the URL
# UPSTREAM (needs the `$connection_upgrade` map), idle for up to 600 s.
nginx_ws_location() {
    cat <<EOF
        location = $1 {
            proxy_pass $2;
            proxy_http_version 1.1;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection \$connection_upgrade;
            proxy_read_timeout 600s;
        }
EOF
}

# stop_nginx PID: an nginx master and its workers. A worker killed first is replaced by the
# master; a master killed first leaves its workers running (and listening): so the workers'
# pids first, then the master, then them.
stop_nginx() {
    local workers
    workers=$(pgrep -P "$1")
    kill -9 "$1" $workers 2>/dev/null
}
