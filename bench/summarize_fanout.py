#!/usr/bin/env python3
"""Medians (with the individual runs) from a bench/fanout.sh log.

    python3 bench/summarize_fanout.py bench/raw-fanout.log [MORE.log ...]

Also: ratios to Node, syscalls per delivery (PERF=1 logs), RSS figures (rooms_memory.sh logs).
"""
import statistics
import sys

LINES = [line for path in sys.argv[1:] for line in open(path)]
from collections import defaultdict

KEYS = ["server_us_per_delivery", "delivered_per_s", "p50_us", "p99_us", "p999_us", "other_cores"]
runs, head, checks = defaultdict(list), None, defaultdict(list)
for line in LINES:
    if line.startswith("## fanout"):
        kv = dict(x.split("=", 1) for x in line.split()[2:] if "=" in x)
        head = (kv["server"], int(kv["subscribers"]), kv["rate"])
    elif line.startswith("RESULT") and head:
        kv = dict(x.split("=", 1) for x in line.split()[1:])
        runs[head].append({k: float(kv[k]) for k in KEYS if k in kv})
        bad = sum(int(kv[k]) for k in ("gaps", "dups", "reordered", "wrong_topic", "failed_conns"))
        checks[head].append(f"{kv['delivered']}/{kv['expected']}{'' if bad == 0 else ' BAD'}")
        head = None
for (srv, subs, rate), rs in sorted(runs.items(), key=lambda x: (x[0][1], x[0][0])):
    cols = []
    for k in KEYS:
        v = [r[k] for r in rs if k in r]
        cols.append(f"{k} {statistics.median(v):.4g} [{', '.join(f'{x:.4g}' for x in v)}]")
    print(f"{srv:12} subs={subs:<6} rate={rate:<4} n={len(rs)} delivered {checks[(srv, subs, rate)]}")
    print("    " + "\n    ".join(cols))

# Ratios to Node per case (medians of server CPU per delivered message).
med = {h: statistics.median(r["server_us_per_delivery"] for r in rs) for h, rs in runs.items()}
for (srv, subs, rate), v in sorted(med.items(), key=lambda x: (x[0][1], x[0][2], x[0][0])):
    node = med.get(("node", subs, rate))
    if node and srv != "node":
        print(f"ratio {srv:14} subs={subs:<6} rate={rate:<4} {v:.3g} / node {node:.3g} us = {v / node:.3f} (1/{node / v:.1f})")

# PERF=1 logs: syscalls per delivered message, whole-run difference against --messages 1.
sysc = defaultdict(lambda: defaultdict(list))
for line in LINES:
    if line.startswith("SYSCALLS"):
        kv = dict(x.split("=", 1) for x in line.split()[1:])
        for k in ("window", "whole"):
            if kv[k]:
                sysc[(kv["server"], int(kv["subscribers"]))][(int(kv["messages"]), k)].append(int(kv[k]))
for (srv, subs), d in sorted(sysc.items()):
    msgs = sorted({m for m, _ in d})
    print(f"syscalls {srv:14} subs={subs:<6} " + "  ".join(
        f"messages={m} {k} median {statistics.median(d[(m, k)]):.0f} {d[(m, k)]}" for m in msgs for k in ("whole", "window") if (m, k) in d))
    if len(msgs) >= 2 and msgs[0] == 1:
        lo, hi = msgs[0], msgs[-1]
        n = subs * (hi - lo)
        for k in ("whole", "window"):
            if (lo, k) in d and (hi, k) in d:
                diff = statistics.median(d[(hi, k)]) - statistics.median(d[(lo, k)])
                print(f"    {k}: ({hi} msgs - {lo} msg) {diff:.0f} syscalls / {n} deliveries = {diff / n:.4f} per delivery")

# rooms_memory.sh logs: RSS figures.
mem = defaultdict(list)
for line in LINES:
    if line.startswith("MEM"):
        kv = dict(x.split("=", 1) for x in line.split()[1:] if "=" in x)
        mem[(kv["server"], kv["scenario"])].append({k: int(kv[k]) for k in ("n", "subscriptions", "fresh_kib", "ready_kib", "settled_kib")})
servers = sorted({s for s, _ in mem})
for srv in servers:
    m = {sc: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for (s, sc), rs in mem.items() if s == srv}
    for sc in ("idle", "shared", "own", "ten", "tenown"):
        if sc in m:
            r = m[sc]
            print(f"mem {srv:14} {sc:6} n={r['n']:.0f} subs={r['subscriptions']:.0f} fresh {r['fresh_kib']:.0f} ready {r['ready_kib']:.0f} settled {r['settled_kib']:.0f} KiB (runs {len(mem[(srv, sc)])})")
    for when in ("ready_kib", "settled_kib"):
        out = []
        if "idle" in m:
            n = m["idle"]["n"]
            out.append(f"per connection {(m['idle'][when] - m['idle']['fresh_kib']) / n:.2f}")
            if "shared" in m:
                out.append(f"per subscription (shared - idle) {(m['shared'][when] - m['idle'][when]) / m['shared']['subscriptions']:.3f}")
            if "ten" in m:
                out.append(f"per subscription (ten - idle) {(m['ten'][when] - m['idle'][when]) / m['ten']['subscriptions']:.3f}")
        if "ten" in m and "shared" in m:
            extra = m["ten"]["subscriptions"] - m["shared"]["subscriptions"]
            out.append(f"per further subscription of a connection (ten - shared) {(m['ten'][when] - m['shared'][when]) / extra:.3f}")
        if "own" in m and "shared" in m:
            out.append(f"per room (own - shared) {(m['own'][when] - m['shared'][when]) / (m['own']['subscriptions'] - 1):.3f}")
        if "tenown" in m and "ten" in m:
            out.append(f"per room (tenown - ten) {(m['tenown'][when] - m['ten'][when]) / (m['tenown']['subscriptions'] - 10):.3f}")
        print(f"    {when[:-4]}: KiB " + ", ".join(out))
