#!/usr/bin/env python3
"""Tables for bench/COMPRESSION.md from the logs of bench/compression.sh.

    python3 bench/summarize_compression.py bench/raw-compression-echo.log [more logs...]
    python3 bench/summarize_compression.py bench/raw-compression-idle.log
    python3 bench/summarize_compression.py --criterion bench/raw-deflate-criterion.txt

Medians over repetitions, individual runs in brackets; ratios are ratios of medians.
"""
import re
import statistics
import sys
from collections import defaultdict

HEAD = re.compile(r"^## (echo|idle) (.*)$")


def kv(line):
    return dict(p.split("=", 1) for p in line.split() if "=" in p)


def parse(paths):
    echo, idle = defaultdict(list), []
    for path in paths:
        cur = None
        for line in open(path):
            m = HEAD.match(line)
            if m:
                cur = (m.group(1), kv(m.group(2)))
                continue
            if line.startswith("RESULT") and cur:
                r = kv(line[len("RESULT"):])
                kind, h = cur
                if kind == "echo":
                    echo[(h["cfg"], int(h["size"]), int(h["pipeline"]))].append(r)
                else:
                    idle.append((h["cfg"], h["touch"], r))
                cur = None
    return echo, idle


def med(runs, key):
    vals = [float(r[key]) for r in runs if key in r]
    return statistics.median(vals) if vals else None


def fmt(v, nd=2):
    if v is None:
        return "–"
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{nd}f}"


CFGS = ["rg-uring-plain", "rg-uring-deflate", "rg-epoll-plain", "rg-epoll-deflate",
        "rg-epoll-deflate-bcast", "node-plain", "node-pmd-default", "node-pmd-matched"]
RATIOS = [
    ("ringgate uring: deflate / plain", "rg-uring-deflate", "rg-uring-plain"),
    ("ringgate epoll: deflate / plain", "rg-epoll-deflate", "rg-epoll-plain"),
    ("epoll broadcast_friendly / epoll deflate", "rg-epoll-deflate-bcast", "rg-epoll-deflate"),
    ("Node ws matched: deflate / plain", "node-pmd-matched", "node-plain"),
    ("Node ws default: deflate / plain", "node-pmd-default", "node-plain"),
    ("uring deflate / Node ws matched", "rg-uring-deflate", "node-pmd-matched"),
    ("epoll deflate / Node ws matched", "rg-epoll-deflate", "node-pmd-matched"),
    ("uring deflate / Node ws default", "rg-uring-deflate", "node-pmd-default"),
    ("epoll deflate / Node ws default", "rg-epoll-deflate", "node-pmd-default"),
    ("epoll plain / Node plain", "rg-epoll-plain", "node-plain"),
]


def echo_tables(echo):
    keys = sorted({(s, p) for (_, s, p) in echo})
    for size, p in keys:
        cfgs = [c for c in CFGS if (c, size, p) in echo]
        print(f"\n### {size} B JSON, pipeline {p}\n")
        print("| | " + " | ".join(cfgs) + " |")
        print("|---" * (len(cfgs) + 1) + "|")
        rows = [
            ("server CPU µs/msg", "server_us_per_msg", 2, True),
            ("msgs/s", "msgs_per_s", 0, True),
            ("latency p50 µs", "p50_us", 0, False),
            ("latency p99 µs", "p99_us", 0, False),
            ("client→server bytes (of plain)", "sent_ratio", 3, False),
            ("server→client bytes (of plain)", "recv_ratio", 3, False),
            ("other load (cores)", "other_cores", 2, False),
        ]
        for label, key, nd, show_runs in rows:
            cells = []
            for c in cfgs:
                runs = echo[(c, size, p)]
                m = med(runs, key)
                if key.endswith("_ratio") and m is None:
                    m = 1.0
                cell = fmt(m, nd)
                if key in ("server_us_per_msg", "msgs_per_s"):
                    cell = f"**{cell}**"
                if show_runs and len(runs) > 1:
                    cell += " (" + ", ".join(fmt(float(r[key]), nd) for r in runs) + ")"
                if key == "other_cores":
                    vals = [float(r[key]) for r in runs]
                    cell = f"{min(vals):.2f}–{max(vals):.2f}"
                cells.append(cell)
            print(f"| {label} | " + " | ".join(cells) + " |")
        print("\n| ratio (of medians) | server CPU µs/msg | msgs/s |")
        print("|---|---|---|")
        for label, a, b in RATIOS:
            if (a, size, p) in echo and (b, size, p) in echo:
                ra, rb = echo[(a, size, p)], echo[(b, size, p)]
                cpu = med(ra, "server_us_per_msg") / med(rb, "server_us_per_msg")
                rate = med(ra, "msgs_per_s") / med(rb, "msgs_per_s")
                print(f"| {label} | **{cpu:.2f}** | {rate:.2f} |")


def idle_table(idle):
    print("\n| server | connections | touched | deflate negotiated | compressed echoes | RSS before MiB"
          " | RSS with conns MiB | **bytes / connection** | closed by server |")
    print("|---|---|---|---|---|---|---|---|---|")
    for cfg, touch, r in idle:
        before = int(r["rss_before"]) / 2**20
        after = int(r["rss_after"]) / 2**20
        print(f"| {cfg} | {r['conns']} | {touch} | {r.get('deflate', '?')} | "
              f"{r.get('compressed_echoes', '?')} | {before:.1f} | {after:.1f} | "
              f"**{int(r['bytes_per_conn']):,}** | {r['closed_by_server']} |")


CRIT = re.compile(
    r"^((?:deflate|inflate)/\S+)\s*\n?\s*time:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]\s*\n"
    r"\s*thrpt:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]", re.M)
UNIT_US = {"ns": 1e-3, "µs": 1.0, "ms": 1e3, "s": 1e6}
UNIT_MIB = {"KiB/s": 1 / 1024, "MiB/s": 1.0, "GiB/s": 1024.0}
MSGS = {"100B": 256, "1KiB": 256, "16KiB": 16}  # messages per iteration (benches/deflate.rs)


def criterion_tables(path):
    txt = open(path).read()
    res = {m.group(1): (float(m.group(2)) * UNIT_US[m.group(3)],
                        float(m.group(4)) * UNIT_MIB[m.group(5)]) for m in CRIT.finditer(txt)}
    for op in ("deflate", "inflate"):
        print(f"\n{op}: MiB/s of plain JSON (median) and µs per message\n")
        print("| size | level | context | zlib-rs MiB/s | zlib-rs µs/msg | miniz_oxide MiB/s"
              " | miniz_oxide µs/msg | zlib-rs speed-up |")
        print("|---|---|---|---|---|---|---|---|")
        for size in MSGS:
            for lvl in ("L1", "L6"):
                for mode in ("takeover", "no_takeover"):
                    a = res.get(f"{op}/zlib-rs/{size}/{lvl}/{mode}")
                    b = res.get(f"{op}/miniz_oxide/{size}/{lvl}/{mode}")
                    if not a or not b:
                        continue
                    n = MSGS[size]
                    print(f"| {size} | {lvl[1:]} | {mode} | {a[1]:.1f} | {a[0] / n:.2f} | "
                          f"{b[1]:.1f} | {b[0] / n:.2f} | **{a[1] / b[1]:.1f}×** |")


def main():
    if sys.argv[1:2] == ["--criterion"]:
        for path in sys.argv[2:]:
            criterion_tables(path)
        return
    echo, idle = parse(sys.argv[1:])
    if echo:
        echo_tables(echo)
    if idle:
        idle_table(idle)


if __name__ == "__main__":
    main()
