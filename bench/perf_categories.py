#!/usr/bin/env python3
"""Buckets the samples of a `perf script -F comm,ip,sym,dso` dump by where the time goes.

    perf script -i uring.perf.data -F comm,ip,sym,dso > uring.txt
    python3 bench/perf_categories.py uring.txt [US_PER_MSG]

A sample goes to the first category whose kernel functions appear anywhere in its stack (so the
loopback delivery to the peer, which runs inside our own send, is not counted as "TCP send");
samples with no such kernel frame go by their leaf. With US_PER_MSG, shares are also shown as
microseconds per message.
"""
import collections
import sys

CATS = [
    ("peer RX on loopback (softirq run inside our send)", ["net_rx_action"]),
    ("TCP send (own)", ["tcp_sendmsg"]),
    ("TCP recv (own)", ["tcp_recvmsg"]),
    ("io_uring poll arming (read found no data)", ["io_arm_apoll", "io_arm_poll_handler"]),
    ("epoll_wait", ["epoll_wait"]),
    ("io_uring other (enter, submit, task_work, CQEs)",
     ["io_uring", "io_submit_sqes", "tctx_task_work", "io_issue_sqe", "io_req", "__io_"]),
]


def category(frames):
    kernel = [sym for _, sym, dso in frames if "kernel" in dso]
    for name, keys in CATS:
        if any(k in s for s in kernel for k in keys):
            return name
    if not frames:
        return "unknown"
    _, leaf, dso = frames[0]
    if "kernel" in dso:
        return "kernel other (syscall entry/exit, IRQ return, scheduler)"
    if any(k in leaf for k in ("mi_", "malloc", "free", "_int_", "realloc")):
        return "allocator"
    if "libc" in dso:
        return "libc (syscall wrappers, memcpy)"
    return "user code (runtime, session, framing)"


def samples(path):
    cur = None
    for line in open(path, errors="replace"):
        if not line.strip():
            continue
        if not line[0].isspace():
            if cur is not None:
                yield cur
            cur = []
            continue
        parts = line.strip().split(None, 1)
        if len(parts) < 2:
            continue
        rest, dso = parts[1], ""
        if rest.endswith(")") and " (" in rest:
            i = rest.rfind(" (")
            rest, dso = rest[:i], rest[i + 2:-1]
        cur.append((parts[0], rest, dso))
    if cur:
        yield cur


def main():
    path = sys.argv[1]
    us = float(sys.argv[2]) if len(sys.argv) > 2 else None
    all_samples = list(samples(path))
    n = len(all_samples) or 1
    counts = collections.Counter(category(s) for s in all_samples)
    ipi = sum(any("reschedule_ipi" in f[1] for f in s) for s in all_samples)
    tw = sum(any("task_work_run" in f[1] for f in s) for s in all_samples)
    print(f"{path}: {len(all_samples)} samples")
    for name, c in counts.most_common():
        extra = f"  {us * c / n:5.2f} us/msg" if us else ""
        print(f"  {100 * c / n:5.1f}%{extra}  {name}")
    print(f"  cross-cut: under a reschedule IPI {100 * ipi / n:.1f}%, "
          f"under task_work_run {100 * tw / n:.1f}%")


if __name__ == "__main__":
    main()
