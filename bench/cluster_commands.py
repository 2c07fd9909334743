#!/usr/bin/env python3
"""Redis commands per rooms operation in Redis mode, from INFO commandstats: a Redis and two
ringgate nodes (two shards each) on 127.0.0.1; SUBS subscribers of one topic split over the
nodes (each a presence join), then 100 durable and 100 volatile publishes over /api/publish.
Bounded: fixed counts, every wait has a deadline; every process started is killed at the end.

    cargo build --release
    python3 bench/cluster_commands.py            # BIN=target/release, SUBS=100

Needs redis-server and the `websockets` Python package (pip install websockets).
"""
import asyncio, json, os, subprocess, sys, tempfile, time, urllib.request

import websockets

BIN = os.environ.get("BIN", "target/release")
SUBS = int(os.environ.get("SUBS", "100"))
RP, PORTS, ADMIN = 26391, (28003, 28004), (29003, 29004)


def redis(*args):
    return subprocess.run(["redis-cli", "-p", str(RP), *args], capture_output=True, text=True).stdout


def stats():
    out = {}
    for line in redis("INFO", "commandstats").splitlines():
        if line.startswith("cmdstat_"):
            name, rest = line.split(":", 1)
            out[name[8:]] = int(rest.split(",")[0].split("=")[1])
    return out


def diff(a, b):
    return {k: b[k] - a.get(k, 0) for k in sorted(b) if b[k] != a.get(k, 0) and k not in ("info", "hlen")}


def post(port, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/publish", json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    return urllib.request.urlopen(req, timeout=10).read()


def wait(what, ok, limit=20):
    deadline = time.time() + limit
    while time.time() < deadline:
        try:
            if ok():
                return
        except Exception:
            pass
        time.sleep(0.05)
    sys.exit(f"{what}: not up within {limit} s")


async def measure():
    subs = []
    for port in PORTS:
        for _ in range(SUBS // 2):
            ws = await websockets.connect(f"ws://127.0.0.1:{port}/ws")
            await ws.recv()
            subs.append(ws)
    s0 = stats()
    for i, ws in enumerate(subs):
        await ws.send(json.dumps({"action": "subscribe", "topic": "m", "id": i}))
    for ws in subs:
        while json.loads(await asyncio.wait_for(ws.recv(), 10)).get("type") != "subscribed":
            pass
    # The joins are written after the subscribed replies: wait until Redis holds them all.
    wait("joins", lambda: int(redis("HLEN", "ringgate:p:m")) == len(subs))
    s1 = stats()
    for i in range(100):
        post(ADMIN[0], {"topic": "m", "data": i})
    s2 = stats()
    for i in range(100):
        post(ADMIN[0], {"topic": "m", "data": i, "volatile": True})
    s3 = stats()
    print(f"{len(subs)} subscribes (2 nodes, one topic):", diff(s0, s1))
    print("100 durable publishes:", diff(s1, s2))
    print("100 volatile publishes:", diff(s2, s3))
    print("(this script's own INFO and HLEN left out; heartbeats, if any fell in a step, are EVALSHA)")
    for ws in subs:
        ws.transport.close()


def main():
    procs = []
    tmp = tempfile.mkdtemp(prefix="cluster-commands.")
    try:
        procs.append(subprocess.Popen(["redis-server", "--port", str(RP), "--bind", "127.0.0.1",
                                       "--save", "", "--dir", tmp], stdout=subprocess.DEVNULL))
        wait("redis", lambda: redis("PING").strip() == "PONG")
        conf = os.path.join(tmp, "cluster.toml")
        with open(conf, "w") as f:
            f.write(f'[cluster]\nengine = "redis"\nredis_url = "redis://127.0.0.1:{RP}"\n'
                    '[rooms]\npublish_rate = 0\nrequest_rate = 0\n')
        for port, admin in zip(PORTS, ADMIN):
            procs.append(subprocess.Popen([f"{BIN}/ringgate", "--config", conf, "--port", str(port),
                                           "--admin-listen", f"127.0.0.1:{admin}", "--shards", "2"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            wait(f"node {port}", lambda: urllib.request.urlopen(
                f"http://127.0.0.1:{admin}/readyz", timeout=1).status == 200)
        print(f"# loadavg {open('/proc/loadavg').read().split()[:3]}, {redis('INFO', 'server').split('redis_version:')[1].split()[0]}")
        asyncio.run(measure())
    finally:
        for p in procs:
            p.kill()
            p.wait()


if __name__ == "__main__":
    main()
