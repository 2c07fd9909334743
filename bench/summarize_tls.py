#!/usr/bin/env python3
"""Medians (with the individual runs) and TLS/plain ratios from a bench/tls.sh log.

    python3 bench/summarize_tls.py bench/raw-tls.log
"""
import re
import statistics
import sys
from collections import defaultdict

METRICS = {
    "echo": ["server_us_per_msg", "msgs_per_s", "p50_us", "other_cores"],
    "handshakes": ["server_us_per_hs", "per_s", "client_us_per_hs", "p50_us", "other_cores"],
    "idle": ["bytes_per_conn", "conns", "failed"],
}
# The figure each ratio is taken of (lower is better for all three).
RATIO = {"echo": "server_us_per_msg", "handshakes": "server_us_per_hs", "idle": "bytes_per_conn"}


def parse(path):
    runs = defaultdict(list)
    head = None
    for line in open(path):
        line = line.strip()
        if line.startswith("## "):
            f = line[3:].split()
            kv = dict(x.split("=", 1) for x in f[1:] if "=" in x)
            kv.pop("rep", None)
            kv.pop("loadavg", None)
            head = (f[0], tuple(sorted(kv.items())))
        elif line.startswith("RESULT ") and head:
            kv = dict(x.split("=", 1) for x in line.split()[1:] if "=" in x)
            runs[head].append({k: float(v) for k, v in kv.items() if re.fullmatch(r"-?[0-9.]+", v)})
            head = None
    return runs


def fmt(v):
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def main():
    runs = parse(sys.argv[1])
    med = {}
    for (part, key), rs in sorted(runs.items()):
        cfg = " ".join(f"{k}={v}" for k, v in key)
        cols = []
        for m in METRICS[part]:
            vals = [r[m] for r in rs if m in r]
            if not vals:
                continue
            md = statistics.median(vals)
            med[(part, key, m)] = md
            cols.append(f"{m} {fmt(md)} [{', '.join(fmt(v) for v in vals)}]")
        print(f"{part:10} {cfg:28} n={len(rs)}  " + "  ".join(cols))
    print()
    for (part, key, m), v in sorted(med.items()):
        d = dict(key)
        if m != RATIO[part] or d.get("tls") != "1":
            continue
        plain = tuple(sorted({**d, "tls": "0"}.items()))
        p = med.get((part, plain, m))
        if p:
            cfg = " ".join(f"{k}={x}" for k, x in key if k != "tls")
            print(f"ratio tls/plain {part:10} {cfg:22} {m}: {fmt(v)} / {fmt(p)} = {v / p:.2f}x")


main()
