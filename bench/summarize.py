#!/usr/bin/env python3
"""Summarises a bench/run.sh log: per-configuration medians and the ratios, as Markdown.

    python3 bench/summarize.py bench/raw.log
"""
import re
import statistics
import sys

CFGS = ["uring", "epoll", "tungstenite", "uws"]
KEYS = [
    ("msgs_per_s", "msgs/s", "{:.0f}"),
    ("server_us_per_msg", "server CPU µs/msg", "{:.2f}"),
    ("server_sched_us_per_msg", "(schedstat µs/msg)", "{:.2f}"),
    ("p50_us", "p50 µs", "{:.0f}"),
    ("p99_us", "p99 µs", "{:.0f}"),
    ("p999_us", "p99.9 µs", "{:.0f}"),
    ("client_cpu_s", "client CPU s", "{:.2f}"),
    ("other_cores", "other load (cores)", "{:.2f}"),
]


def parse(path):
    echo = {c: [] for c in CFGS}
    idle = []
    head = None
    with open(path) as f:
        for line in f:
            m = re.match(r"## (echo|idle) cfg=(\w+)(?: rep=(\d+))?(?: touch=(\S+))?", line)
            if m:
                head = m.groups()
                continue
            if line.startswith("RESULT") and head:
                kv = dict(p.split("=", 1) for p in line.split()[1:])
                if head[0] == "echo":
                    echo[head[1]].append({k: float(v) for k, v in kv.items()})
                else:
                    idle.append((head[1], head[3], kv))
                head = None
    return echo, idle


def main():
    echo, idle = parse(sys.argv[1])
    cfgs = [c for c in CFGS if echo[c]] or CFGS
    med = {c: {} for c in CFGS}
    name = {"uring": "ringgate io_uring", "epoll": "ringgate epoll", "uws": "uWebSockets"}
    print("| | " + " | ".join(name.get(c, c) for c in cfgs) + " |")
    print("|---" * (len(cfgs) + 1) + "|")
    for key, label, fmt in KEYS:
        row = []
        for c in cfgs:
            vals = [r[key] for r in echo[c] if key in r]
            if not vals:
                row.append("–")
                continue
            m = statistics.median(vals)
            med[c][key] = m
            runs = ", ".join(fmt.format(v) for v in vals)
            row.append(f"**{fmt.format(m)}** ({runs})")
        print(f"| {label} | " + " | ".join(row) + " |")
    print()
    print("| ratio (of medians) | msgs/s | server CPU µs/msg |")
    print("|---|---|---|")
    for a, b in [("uring", "tungstenite"), ("epoll", "tungstenite"), ("uring", "uws"),
                 ("epoll", "uws"), ("uring", "epoll")]:
        try:
            r1 = med[a]["msgs_per_s"] / med[b]["msgs_per_s"]
            r2 = med[a]["server_us_per_msg"] / med[b]["server_us_per_msg"]
            print(f"| {a} / {b} | {r1:.2f} | {r2:.2f} |")
        except (KeyError, ZeroDivisionError):
            pass
    if idle:
        print()
        print("| server | touched | connections | RSS before | RSS with conns | bytes/conn |")
        print("|---|---|---|---|---|---|")
        for cfg, touch, kv in idle:
            mib = lambda v: f"{int(v) / 2**20:.1f} MiB"
            print(
                f"| {cfg} | {touch} | {kv.get('conns')} | {mib(kv.get('rss_before', 0))} | "
                f"{mib(kv.get('rss_after', 0))} | {kv.get('bytes_per_conn')} |"
            )


if __name__ == "__main__":
    main()
