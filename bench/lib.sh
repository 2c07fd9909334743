# Shared by the bench scripts (`. "$(dirname "$0")/lib.sh"`): waiting for the server a script
# started (its pid in $PID) and stopping it. 127.0.0.1 only.

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
