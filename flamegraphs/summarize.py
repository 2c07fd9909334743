#!/usr/bin/env python3
"""Summarises a folded-stack file (`inferno-collapse-perf --kernel` output) into the numbers
quoted in flamegraphs/README.md.

    python3 flamegraphs/summarize.py flamegraphs/echo-uring-pipeline8.folded.gz [TOP]

Prints: where the samples go (one bucket per sample, first matching rule wins, same rules as
bench/perf_categories.py plus a split of user space by crate), the TOP frames by self time, and
the inclusive share of a fixed list of frames (a frame counts once per stack).
Kernel frames carry the `_[k]` suffix that `--kernel` adds. The weights are cpu-clock periods
in ns (perf script reports each sample's period; inferno sums them), not sample counts.
"""
import collections
import gzip
import re
import sys

# First rule whose key occurs in any *kernel* frame of the stack wins (so the peer's loopback
# receive, which runs in softirq inside our own send, is not counted as TCP send).
KERNEL_CATS = [
    ("kernel TCP: peer RX on loopback (softirq inside our send)", ["net_rx_action"]),
    ("kernel TCP: send (own)", ["tcp_sendmsg"]),
    ("kernel TCP: recv (own)", ["tcp_recvmsg"]),
    ("io_uring: poll arming (read found the socket empty)", ["io_arm_apoll", "io_arm_poll_handler"]),
    ("epoll_wait", ["epoll_wait"]),
    ("io_uring: other (enter, submit, task_work, CQEs)",
     ["io_uring", "io_submit_sqes", "tctx_task_work", "io_issue_sqe", "io_req", "__io_"]),
]

# User-space leaves (and kernel leaves with no category above) by the leaf frame.
LEAF_CATS = [
    ("allocator (mimalloc / malloc)", re.compile(r"^(_?mi_|mi_|malloc|free|realloc|calloc|"
                                                  r"__rust_(alloc|dealloc|realloc)|_int_|cfree)")),
    ("memcpy / memmove / memset", re.compile(r"(memcpy|memmove|memset)")),
    ("libc syscall wrappers (writev, recv, epoll_wait, syscall)",
     re.compile(r"^(__GI_|__libc_|__pthread|pthread|epoll_wait$|syscall$|__vdso)")),
    # TLS (wss): ring's AES-GCM / GHASH (asm symbols ring_core_*), then rustls and tokio-rustls
    # (record layer, buffers). Checked before ringgate/tokio: their frames name tokio traits.
    ("TLS: ring (AES-GCM seal/open, GHASH)", re.compile(r"^(ring_core_|<?ring::)")),
    ("TLS: rustls + tokio-rustls (record layer, buffers)", re.compile(r"^<?(rustls::|tokio_rustls::)")),
    ("ringgate hub (rooms: routing, fan-out, delivery)", re.compile(r"^<?ringgate::hub::")),
    ("ringgate ws (session, reader, frame, outbox)", re.compile(r"ringgate::ws::")),
    ("ringgate runtime::io (UringStream / Conn adapter)", re.compile(r"ringgate::runtime")),
    ("ringgate http::serve (the session is inlined into it) / other", re.compile(r"ringgate::")),
    ("tokio-uring", re.compile(r"tokio_uring::")),
    ("tokio", re.compile(r"tokio::")),
    ("hyper", re.compile(r"hyper::")),
    ("bytes / fastwebsockets / simdutf8", re.compile(r"(bytes::|fastwebsockets|simdutf8)")),
    ("io-uring crate", re.compile(r"io_uring::")),
]

# Kernel frames, matched as substrings (kernel versions rename the syscall wrappers).
INCLUSIVE = [
    "net_rx_action", "tcp_sendmsg", "tcp_recvmsg", "tcp_v4_rcv", "sys_io_uring_enter",
    "io_submit_sqes", "tctx_task_work", "io_arm_apoll", "io_arm_poll_handler", "sys_epoll_wait",
    "sys_sendmsg", "sys_sendto", "sys_recvfrom", "sys_read", "sys_readv", "sys_write",
    "vfs_writev", "reschedule_ipi", "task_work_run",
]
INCLUSIVE_RE = [
    ("ringgate Session::poll (a whole session turn)", re.compile(r"ringgate::ws::session::Session<S,H>::poll$")),
    ("  Session::poll_read / read_scratch (incl. the read syscall on epoll)", re.compile(r"Session<S,H>::read_scratch$")),
    ("  Session::process (Reader::feed, handler, outbox)", re.compile(r"Session<S,H>::process$")),
    ("    ringgate::ws::reader::Reader::feed", re.compile(r"ringgate::ws::reader::Reader::feed$")),
    ("    ringgate::ws::frame::unmask", re.compile(r"ringgate::ws::frame::unmask$")),
    ("    ringgate::ws::outbox::Outbox::*", re.compile(r"ringgate::ws::outbox::")),
    ("  Session::poll_flush (incl. the writev syscall on epoll)", re.compile(r"Session<S,H>::poll_flush$")),
    ("ringgate UringStream::poll_read (+ closure)", re.compile(r"UringStream::poll_read")),
    ("ringgate UringStream write side (submit_write, poll_write_*)", re.compile(r"UringStream::(submit_write|poll_write)")),
    ("tokio_uring Handle::flush (io_uring_enter: submit + inline issue)", re.compile(r"tokio_uring::runtime::driver::handle::Handle::flush$")),
    ("tokio_uring Driver::dispatch_completions (CQEs)", re.compile(r"Driver::dispatch_completions$")),
    ("mio Poll::poll (epoll_wait)", re.compile(r"^mio::poll::Poll::poll$")),
    ("hyper (any frame)", re.compile(r"hyper::")),
    ("alloc::boxed::Box<T>::new", re.compile(r"^alloc::boxed::Box<T>::new$")),
    ("allocator (mimalloc, any frame)", re.compile(r"(MiMalloc|^_?mi_)")),
]
# Printed only when non-zero (rooms and TLS frames; not in every profile).
INCLUSIVE_OPT = [
    ("rooms: Hub::handle (a publish: route, fan-out to every local subscriber)", re.compile(r"^ringgate::hub::Hub::handle$")),
    ("  ConnEntry::deliver (queue + wake, per subscriber)", re.compile(r"ConnEntry::deliver$")),
    ("    Mailbox::push_broadcast", re.compile(r"Mailbox::push_broadcast$")),
    ("    ConnEntry::wake (tokio task wake)", re.compile(r"ConnEntry::wake$")),
    ("  Session::take_mail (mailbox -> outbox)", re.compile(r"Session<S,H>::take_mail$")),
    ("  ConnEntry::register_waker", re.compile(r"ConnEntry::register_waker$")),
    ("tokio task wake (waker::wake_by_ref, any)", re.compile(r"^tokio::runtime::task::waker::wake_by_ref$")),
    ("tokio ScheduledIo::poll_readiness (readiness check, no syscall)", re.compile(r"ScheduledIo::poll_readiness$")),
    ("metrics recording (ringgate::metrics, metrics / metrics_exporter_prometheus crates)", re.compile(r"^<?(metrics(_exporter_prometheus|_util)?|ringgate::metrics)::")),
    ("ringgate Shard::publish_metrics (once a second)", re.compile(r"publish_metrics$")),
    ("TLS read: tokio-rustls poll_fill_buf (recv + decrypt)", re.compile(r"^<tokio_rustls::server::TlsStream<IO> as tokio::io::async_buf_read::AsyncBufRead>::poll_fill_buf$")),
    ("TLS write: tokio-rustls poll_write_vectored (encrypt + writev)", re.compile(r"^<tokio_rustls::(common::Stream<IO,C>|server::TlsStream<IO>) as tokio::io::async_write::AsyncWrite>::poll_write_vectored$")),
    ("  rustls RecordLayer::decrypt_incoming", re.compile(r"RecordLayer::decrypt_incoming$")),
    ("  rustls encrypt (CommonState::send_appdata_encrypt)", re.compile(r"send_appdata_encrypt$")),
    ("  ring AES-GCM + GHASH (any ring frame)", re.compile(r"^(ring_core_|<?ring::)")),
    ("  rustls ChunkVecBuffer::write_to (records -> writev)", re.compile(r"ChunkVecBuffer::write_to$")),
]


def load(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            stack, _, n = line.rpartition(" ")
            yield stack.split(";"), int(n)


def category(frames):
    kernel = [f for f in frames if f.endswith("_[k]")]
    for name, keys in KERNEL_CATS:
        if any(k in f for f in kernel for k in keys):
            return name
    leaf = frames[-1]
    if leaf.endswith("_[k]"):
        return "kernel other (syscall entry/exit, IRQ return, scheduler)"
    # The leaf is often an inlined core/alloc helper (RefCell borrow, mem::replace, Box::new):
    # charge it to the nearest caller that names a crate. Allocator and memcpy leaves stay.
    for name, rx in LEAF_CATS[:3]:
        if rx.search(leaf):
            return name
    for f in reversed(frames):
        for name, rx in LEAF_CATS[3:]:
            if rx.search(f):
                return name
    return "other user space (std, libc, unresolved)"


def entry(frames):
    """How the sample got into the kernel: the user-space caller of the first kernel frame, and
    the syscall (first frame with `sys_`), or `(return to user: task_work)` when the sample is in
    task_work run on the way out of a syscall; "(user space)" when the leaf is not a kernel frame."""
    if not frames[-1].endswith("_[k]"):
        return "(user space)"
    i = next(i for i, f in enumerate(frames) if f.endswith("_[k]"))
    caller = frames[i - 1] if i else "?"
    kernel = frames[i:]
    sysf = next((f for f in kernel if "sys_" in f), None)
    if sysf is None:
        sysf = "(return to user: task_work)" if any("task_work_run" in f for f in kernel) \
            else kernel[0]
    return f"{caller[:60]} -> {sysf}"


def main():
    path = sys.argv[1]
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 25
    cats, selfs, incl = collections.Counter(), collections.Counter(), collections.Counter()
    threads, entries = collections.Counter(), collections.Counter()
    total = 0
    for frames, n in load(path):
        total += n
        threads[frames[0]] += n
        frames = frames[1:] or frames
        cats[category(frames)] += n
        selfs[frames[-1]] += n
        kernel = [f for f in frames if f.endswith("_[k]")]
        for k in INCLUSIVE:
            if any(k in f for f in kernel):
                incl[k] += n
        entries[entry(frames)] += n
        for name, rx in INCLUSIVE_RE + INCLUSIVE_OPT:
            if any(rx.search(f) for f in frames):
                incl[name] += n
    pct = lambda c: 100.0 * c / (total or 1)
    # cpu-clock samples carry their period (ns) as the weight: at -F 999 one sample ~ 1.001 ms.
    print(f"{path}: {total / 1e6:.0f} ms of server CPU (~{total / 1001001:.0f} samples); threads: "
          + ", ".join(f"{t} {pct(c):.1f}%" for t, c in threads.most_common()))
    print("\nwhere the samples go (each sample once):")
    for name, c in cats.most_common():
        print(f"  {pct(c):5.1f}%  {name}")
    print(f"\ntop {top} frames by self time:")
    for name, c in selfs.most_common(top):
        print(f"  {pct(c):5.1f}%  {name[:150]}")
    print("\nhow the time entered the kernel (syscall, or first kernel frame):")
    for name, c in entries.most_common(8):
        print(f"  {pct(c):5.1f}%  {name}")
    print("\ninclusive (share of samples with this frame anywhere on the stack):")
    for name in INCLUSIVE + [n for n, _ in INCLUSIVE_RE]:
        print(f"  {pct(incl[name]):5.1f}%  {name}")
    for name, _ in INCLUSIVE_OPT:
        if incl[name]:
            print(f"  {pct(incl[name]):5.1f}%  {name}")


if __name__ == "__main__":
    main()
