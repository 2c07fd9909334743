#!/usr/bin/env python3
"""Redis commands per rooms operation in Redis mode, from INFO commandstats: a Redis and two
ringgate nodes (two shards each) on 127.0.0.1; SUBS subscribers of one topic split over the
nodes (each a presence join), then 100 durable and 100 volatile publishes over /api/publish.
With CLUSTER=1, a Redis Cluster of three masters instead (the counts summed over them).
Bounded: fixed counts, every wait has a deadline; every process started is killed at the end.

    cargo build --release
    python3 bench/cluster_commands.py            # BIN=target/release, SUBS=100, CLUSTER=0

Needs redis-server and the `websockets` Python package (pip install websockets).
"""
import asyncio, json, os, subprocess, sys, tempfile, time, urllib.request

import websockets

BIN = os.environ.get("BIN", "target/release")
SUBS = int(os.environ.get("SUBS", "100"))
CLUSTER = os.environ.get("CLUSTER", "0") == "1"
RP, PORTS, ADMIN = 26391, (28003, 28004), (29003, 29004)
MASTERS = (RP, RP + 1, RP + 2) if CLUSTER else (RP,)


def redis(*args, port=RP):
    cluster = ["-c"] if CLUSTER else []
    return subprocess.run(["redis-cli", *cluster, "-p", str(port), *args],
                          capture_output=True, text=True).stdout


def stats():
    out = {}
    for port in MASTERS:
        for line in redis("INFO", "commandstats", port=port).splitlines():
            if line.startswith("cmdstat_"):
                name, rest = line.split(":", 1)
                out[name[8:]] = out.get(name[8:], 0) + int(rest.split(",")[0].split("=")[1])
    return out


def diff(a, b):
    return {k: b[k] - a.get(k, 0) for k in sorted(b) if b[k] != a.get(k, 0) and k not in ("info", "hlen", "cluster|info")}


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
    wait("joins", lambda: int(redis("HLEN", "ringgate:{m}:p")) == len(subs))
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
        for port in MASTERS:
            d = os.path.join(tmp, str(port))
            os.mkdir(d)
            cluster = ["--cluster-enabled", "yes", "--cluster-port", str(port + 100)] if CLUSTER else []
            procs.append(subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                           "--save", "", "--dir", d, *cluster], stdout=subprocess.DEVNULL))
            wait("redis", lambda: redis("PING", port=port).strip() == "PONG")
        url = f"redis://127.0.0.1:{RP}"
        if CLUSTER:
            for port, (first, last) in zip(MASTERS, ((0, 5460), (5461, 10922), (10923, 16383))):
                redis("CLUSTER", "ADDSLOTSRANGE", str(first), str(last), port=port)
            for port in MASTERS[1:]:
                redis("CLUSTER", "MEET", "127.0.0.1", str(port), str(port + 100))
            wait("cluster", lambda: all("cluster_state:ok" in redis("CLUSTER", "INFO", port=p)
                                        and "cluster_known_nodes:3" in redis("CLUSTER", "INFO", port=p)
                                        for p in MASTERS))
            url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in MASTERS)
        conf = os.path.join(tmp, "cluster.toml")
        with open(conf, "w") as f:
            f.write(f'[cluster]\nengine = "redis"\nredis_url = "{url}"\n'
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
