#!/usr/bin/env python3
"""Medians (with the individual runs) from a bench/fanout.sh log.

    python3 bench/summarize_fanout.py bench/raw-fanout.log
"""
import statistics
import sys
from collections import defaultdict

KEYS = ["server_us_per_delivery", "delivered_per_s", "p50_us", "p99_us", "p999_us", "other_cores"]
runs, head, checks = defaultdict(list), None, defaultdict(list)
for line in open(sys.argv[1]):
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
