#!/usr/bin/env python3
"""Medians (with the individual runs) and on/off ratios from a bench/metrics_overhead.sh log.

    python3 bench/summarize_metrics_overhead.py [--max-other CORES] bench/raw-metrics-overhead.log [MORE.log ...]

--max-other: leave out runs during which other processes used more than CORES cores (the load
tool's other_cores): the fan-out figure depends on how far subscribers fall behind (frames per
writev), so it moves a lot when something else takes CPU.

Server CPU per message: echo from schedstat (ns, `server_sched_us_per_msg`) and from
utime+stime ticks (`server_us_per_msg`, 10 ms resolution); fan-out from ticks
(`server_us_per_delivery`, the only figure the tool prints for it). Runs whose load tool failed
or lost messages are listed and left out.
"""
import statistics
import sys
from collections import defaultdict

KEYS = {
    "echo": ["server_sched_us_per_msg", "server_us_per_msg", "msgs_per_s", "other_cores"],
    "fanout": ["server_us_per_delivery", "delivered_per_s", "p50_us", "other_cores"],
}
args = sys.argv[1:]
max_other = None
if args and args[0] == "--max-other":
    max_other, args = float(args[1]), args[2:]
runs, head, bad, busy = defaultdict(list), None, [], 0
pairs = defaultdict(dict)  # (case, session, rep) -> {metrics: value}: on and off run back to back
session = 0
for path in args:
    for line in open(path):
        if line.startswith("# 20"):
            session += 1
        if line.startswith("## case="):
            kv = dict(x.split("=", 1) for x in line.split()[1:] if "=" in x)
            head = (kv["case"], kv["metrics"].rstrip(";"), kv["rep"])
            if ("200" in line) != (kv["metrics"] == "on"):
                bad.append(f"{head}: /metrics answer does not match: {line.strip()}")
        elif line.startswith("RESULT") and head:
            kv = dict(x.split("=", 1) for x in line.split()[1:])
            if kv.get("failed", "0") != "0" or kv.get("delivered", "0") != kv.get("expected", "0") \
                    or any(kv.get(k, "0") != "0" for k in ("gaps", "dups", "reordered", "failed_conns")):
                bad.append(f"{head}: {line.strip()}")
            elif max_other is not None and float(kv.get("other_cores", 0)) > max_other:
                busy += 1
            else:
                r = {k: float(v) for k, v in kv.items() if k in sum(KEYS.values(), [])}
                runs[head[:2]].append(r)
                pairs[(head[0], session, head[2])][head[1]] = r
            head = None

if max_other is not None:
    print(f"runs with other_cores > {max_other} left out: {busy}\n")
med = {}
for (case, m), rs in sorted(runs.items()):
    kind = case.split("-")[0]
    print(f"{case:13} metrics={m:3} n={len(rs)}")
    for k in KEYS[kind]:
        v = [r[k] for r in rs if k in r]
        if v:
            med[(case, m, k)] = statistics.median(v)
            print(f"    {k:24} median {statistics.median(v):.4g}  [{', '.join(f'{x:.4g}' for x in v)}]")
print()
for case in sorted({c for c, _ in runs}):
    kind = case.split("-")[0]
    for k in KEYS[kind][:2 if kind == "echo" else 1]:
        on, off = med.get((case, "on", k)), med.get((case, "off", k))
        if on and off:
            print(f"ratio on/off {case:13} {k:24} {on:.4g} / {off:.4g} = {on / off:.3f}")
print("\nper-rep ratios on/off (the two runs of a rep are back to back; reps where both count):")
for case in sorted({c for c, _ in runs}):
    kind = case.split("-")[0]
    k = KEYS[kind][0]
    rs = [p["on"][k] / p["off"][k] for (c, _, _), p in sorted(pairs.items()) if c == case and len(p) == 2]
    if rs:
        print(f"  {case:13} {k:24} n={len(rs)} median {statistics.median(rs):.3f}  [{', '.join(f'{x:.3f}' for x in rs)}]")
for b in bad:
    print("left out:", b)
