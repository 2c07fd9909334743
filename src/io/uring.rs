//! ringgate's io_uring driver, on the `io-uring` crate, inside the shard's tokio runtime.
//!
//! One ring per shard, owned by the shard thread. A tokio current-thread runtime runs the
//! shard's tasks as on epoll; the ring's fd is registered with it (`AsyncFd`), and one driver
//! task submits what the loop turn queued (one `io_uring_enter` per turn) and dispatches
//! completions. Why not tokio-uring: see docs/ARCHITECTURE.md ("The io_uring driver").
//!
//! - **Reads**: one multishot `RECV` per connection, armed on its first read, selecting from a
//!   provided-buffer ring shared by all connections of the shard. Completions queue buffer ids
//!   on the connection; `poll_read` copies out of them and gives each buffer back to the ring as
//!   soon as it is emptied, so an idle connection holds no read buffer. A connection that stops
//!   reading holds at most [`MAX_QUEUED`] buffers: its receive is cancelled and re-armed when
//!   it reads again (TCP flow control takes over), and what the kernel delivered in the same
//!   burst beyond that is copied to the connection's heap overflow, its buffers returned. When the ring is
//!   empty the kernel ends a receive with `ENOBUFS`; the connection waits until a buffer comes
//!   back, then re-arms. Nothing is lost: the bytes stay in the socket.
//! - **Writes**: write-behind as before. A write hands its chunks (owned `Bytes`) to the driver
//!   as one `send` (`sendmsg` for several chunks) and counts as done; a flush returns at once. The driver resubmits short
//!   writes itself and wakes the connection only if it waits (a second write, a shutdown), so a
//!   request/response costs one wake-up. An error shows at the next write or flush.
//! - **Close**: dropping the stream cancels its receive and returns its queued buffers; the fd
//!   is closed when its last operation completes, so writes already accepted still go out.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use slab::Slab;
use tokio::io::unix::AsyncFd;
use tokio::io::ReadBuf;

use crate::ws::outbox::{Outbox, MAX_IOVECS};

/// Sizes of a shard's ring and its provided buffers.
#[derive(Debug, Clone, Copy)]
pub(super) struct Config {
    /// Submission queue entries. Ops in flight do not hold SQ entries; this bounds how many
    /// new ops one loop turn queues before an early submit.
    pub entries: u32,
    /// Provided buffers (a power of two) and their size: the shard's whole read memory.
    pub buffers: u16,
    pub buffer_size: u32,
}

impl Config {
    /// 512 × 4 KiB: 2 MiB of read buffers per shard, whatever the number of connections.
    pub const DEFAULT: Config = Config {
        entries: 4096,
        buffers: 512,
        buffer_size: 4096,
    };
}

/// Buffers a connection may hold unread before its receive is paused (16 KiB): small, so
/// that connections which stop reading (backpressure) hold at most a small share of the ring.
const MAX_QUEUED: usize = 4;
/// The buffer group of the shard's provided-buffer ring.
const BGID: u16 = 0;
/// `io_uring_enter` flag: also process completions (not re-exported by the io-uring crate).
const IORING_ENTER_GETEVENTS: u32 = 1;

thread_local! {
    static DRIVER: RefCell<Option<Rc<Driver>>> = const { RefCell::new(None) };
}

fn driver() -> io::Result<Rc<Driver>> {
    DRIVER
        .with(|d| d.borrow().clone())
        .ok_or_else(|| io::Error::other("no io_uring driver on this thread"))
}

/// Checks that this kernel and process allow exactly what the driver uses: the setup flags,
/// the opcodes, a provided-buffer ring, and a multishot receive that stays armed.
pub(super) fn probe() -> Result<(), String> {
    let ring = setup(8).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOSYS) => "io_uring_setup is not available (old kernel or seccomp)".into(),
        Some(libc::EPERM) => "io_uring_setup was refused (seccomp or io_uring_disabled)".into(),
        _ => format!("io_uring_setup failed: {e}"),
    })?;
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("io_uring probe failed: {e}"))?;
    for (name, code) in [
        ("recv", opcode::RecvMulti::CODE),
        ("send", opcode::Send::CODE),
        ("sendmsg", opcode::SendMsg::CODE),
        ("async_cancel", opcode::AsyncCancel::CODE),
    ] {
        if !probe.is_supported(code) {
            return Err(format!("io_uring lacks the {name} opcode"));
        }
    }
    multishot_works(ring).map_err(|e| format!("multishot receive over a buffer ring: {e}"))
}

/// Sends one byte over a socket pair to a multishot receive on a one-buffer ring: it must
/// arrive in the provided buffer with the receive still armed (`IORING_CQE_F_MORE`, 6.0+).
fn multishot_works(mut ring: IoUring) -> io::Result<()> {
    let mut fds = [0; 2];
    // SAFETY: fds has room for the two descriptors socketpair writes.
    if unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_STREAM, 0, fds.as_mut_ptr()) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: socketpair just returned these two fds, owned by nothing else.
    let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let bufs = BufRing::new(&ring, 1, 64)?;
    let recv = opcode::RecvMulti::new(types::Fd(a.as_raw_fd()), BGID).build();
    // SAFETY: the fd and the buffer ring outlive the op (cancelled and reaped below).
    unsafe { ring.submission().push(&recv.user_data(1)) }.map_err(io::Error::other)?;
    ring.submit()?;
    // SAFETY: writing one byte from a valid buffer to an open socket.
    if unsafe { libc::write(b.as_raw_fd(), b"x".as_ptr().cast(), 1) } != 1 {
        return Err(io::Error::last_os_error());
    }
    ring.submit_and_wait(1)?;
    let cqe = ring
        .completion()
        .next()
        .ok_or_else(|| io::Error::other("no completion"))?;
    let ok = cqe.result() == 1
        && cqueue::more(cqe.flags())
        && cqueue::buffer_select(cqe.flags()) == Some(0);
    let cancel = opcode::AsyncCancel::new(1).build().user_data(2);
    // SAFETY: a cancel carries no buffer.
    unsafe { ring.submission().push(&cancel) }.map_err(io::Error::other)?;
    // The cancel's completion and the receive's last one.
    ring.submit_and_wait(2)?;
    ring.completion().for_each(drop);
    drop(bufs);
    if ok {
        Ok(())
    } else if cqe.result() < 0 {
        Err(io::Error::from_raw_os_error(-cqe.result()))
    } else {
        Err(io::Error::other("the receive did not stay armed"))
    }
}

/// The ring, with the setup flags chosen by measurement (docs/ARCHITECTURE.md): completions are
/// processed when the shard enters the kernel anyway (`COOP_TASKRUN`), not by interrupting it,
/// and only the shard thread submits (`SINGLE_ISSUER`).
fn setup(entries: u32) -> io::Result<IoUring> {
    IoUring::builder()
        .setup_coop_taskrun()
        .setup_taskrun_flag()
        .setup_single_issuer()
        .build(entries)
}

/// Runs `f` to completion on a current-thread tokio runtime with an io_uring driver.
pub(super) fn block_on<F: std::future::Future>(config: Config, f: F) -> io::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let driver = local.block_on(&rt, async { Driver::new(config) })?;
    DRIVER.with(|d| *d.borrow_mut() = Some(driver.clone()));
    let d = driver.clone();
    local.spawn_local(async move { poll_fn(|cx| d.poll(cx)).await });
    let out = local.block_on(&rt, f);
    // Writes count as done when handed over: let them reach the kernel before the ring goes.
    let d = driver.clone();
    local.block_on(&rt, async move {
        let _ =
            tokio::time::timeout(Duration::from_secs(2), poll_fn(|cx| d.poll_sends_done(cx))).await;
    });
    drop(local); // the remaining tasks and their streams, while the driver is reachable
    DRIVER.with(|d| d.borrow_mut().take());
    driver.shutdown();
    Ok(out)
}

/// A shard's provided-buffer ring: the entries the kernel takes buffers from and the memory
/// they point into.
struct BufRing {
    entries: *mut types::BufRingEntry,
    layout: std::alloc::Layout,
    mem: Box<[u8]>,
    size: u32,
    count: u16,
    tail: u16,
    /// Set when the kernel may still use the memory at drop (operations did not end).
    leak: bool,
}

impl BufRing {
    fn new(ring: &IoUring, count: u16, size: u32) -> io::Result<BufRing> {
        assert!(count.is_power_of_two());
        let layout = std::alloc::Layout::from_size_align(
            count as usize * std::mem::size_of::<types::BufRingEntry>(),
            4096,
        )
        .map_err(io::Error::other)?;
        // SAFETY: the layout has a non-zero size; zeroed entries are valid (an empty ring).
        let entries = unsafe { std::alloc::alloc_zeroed(layout) } as *mut types::BufRingEntry;
        if entries.is_null() {
            return Err(io::ErrorKind::OutOfMemory.into());
        }
        let mut bufs = BufRing {
            entries,
            layout,
            mem: vec![0u8; count as usize * size as usize].into_boxed_slice(),
            size,
            count,
            tail: 0,
            leak: false,
        };
        // SAFETY: the entries stay allocated (and registered) until `unregister` and drop.
        unsafe {
            ring.submitter()
                .register_buf_ring(entries as u64, count, BGID)?;
        }
        for bid in 0..count {
            bufs.push(bid);
        }
        Ok(bufs)
    }

    fn buf(&self, bid: u16, len: usize) -> &[u8] {
        let start = bid as usize * self.size as usize;
        &self.mem[start..start + len]
    }

    /// Gives buffer `bid` back to the kernel.
    fn push(&mut self, bid: u16) {
        let i = (self.tail & (self.count - 1)) as usize;
        // SAFETY: i < count; the kernel reads only entries before the published tail.
        let e = unsafe { &mut *self.entries.add(i) };
        e.set_addr(self.mem.as_ptr() as u64 + bid as u64 * self.size as u64);
        e.set_len(self.size);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail field of the ring's first entry, shared with the kernel.
        let tail = unsafe { &*(types::BufRingEntry::tail(self.entries) as *const AtomicU16) };
        tail.store(self.tail, Ordering::Release);
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        if self.leak {
            std::mem::forget(std::mem::take(&mut self.mem));
            return;
        }
        // SAFETY: allocated in `new` with this layout.
        unsafe { std::alloc::dealloc(self.entries.cast(), self.layout) }
    }
}

/// The owned parts of a `sendmsg` in flight: the kernel reads them after the submit returns.
struct SendBuf {
    chunks: Vec<Bytes>,
    iov: Vec<libc::iovec>,
    msg: libc::msghdr,
}

impl SendBuf {
    fn new() -> Box<SendBuf> {
        Box::new(SendBuf {
            chunks: Vec::new(),
            iov: Vec::new(),
            // SAFETY: an all-zero msghdr is a valid empty one.
            msg: unsafe { std::mem::zeroed() },
        })
    }

    /// The send of the chunks (again, after a short write): a plain `SEND` for one chunk (the
    /// common case: one frame, or a shared broadcast), else a `SENDMSG` over iovecs.
    fn entry(&mut self, fd: RawFd) -> squeue::Entry {
        if let [one] = &self.chunks[..] {
            if let Ok(len) = u32::try_from(one.len()) {
                return opcode::Send::new(types::Fd(fd), one.as_ptr(), len)
                    .flags(libc::MSG_NOSIGNAL)
                    .build();
            }
        }
        self.iov.clear();
        self.iov.extend(self.chunks.iter().map(|c| libc::iovec {
            iov_base: c.as_ptr() as *mut _,
            iov_len: c.len(),
        }));
        self.msg.msg_iov = self.iov.as_mut_ptr();
        self.msg.msg_iovlen = self.iov.len() as _;
        opcode::SendMsg::new(types::Fd(fd), &self.msg)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
    }
}

enum Op {
    Recv(Rc<Conn>),
    Send(Rc<Conn>, Box<SendBuf>),
    Cancel,
}

#[derive(Debug)]
enum Recv {
    /// Not armed: on the next read that finds nothing queued.
    Off,
    Armed(u64),
    /// A cancel was submitted (too much unread, or closing); completions may still come.
    Cancelling,
    /// Ended with ENOBUFS: re-armed once a buffer is back.
    NoBufs,
    Eof,
    Failed(io::Error),
}

struct ConnState {
    recv: Recv,
    /// Received, unread: (buffer id, length); `head` bytes of the first are read. At most
    /// [`MAX_QUEUED`]; what a burst brings beyond that waits in `overflow`, after them.
    queue: VecDeque<(u16, u32)>,
    head: usize,
    overflow: BytesMut,
    reader: Option<Waker>,
    /// A `sendmsg` in flight.
    sending: bool,
    send_err: Option<io::Error>,
    writer: Option<Waker>,
    closed: bool,
}

/// A connection's half in the driver, shared with its operations in flight: the fd closes when
/// the last of them lets go.
struct Conn {
    fd: OwnedFd,
    st: RefCell<ConnState>,
}

struct Inner {
    ring: IoUring,
    ops: Slab<(u32, Op)>,
    generation: u32,
    bufs: BufRing,
    /// Connections whose receive ended for lack of buffers.
    buf_waiters: Vec<Rc<Conn>>,
    /// The driver task, woken when the loop turn queued something to submit.
    task: Option<Waker>,
    queued: bool,
    sends: usize,
    /// Emptied send records, reused by the next sends of any connection: an idle connection
    /// holds none. At most [`SPARE_SENDS`]. Boxes, because a send in flight needs its record
    /// at a fixed address (the kernel reads its `msghdr`): the box moves between this pool and
    /// the operation as it is.
    #[allow(clippy::vec_box)]
    spare: Vec<Box<SendBuf>>,
    /// Wake-ups of completions reaped early (the submission queue was full), for the driver
    /// task to deliver with the rest of its turn's.
    woken: Vec<Waker>,
    stats: Stats,
}

/// Emptied send records a driver keeps for reuse: as many as sends are usually in flight in
/// one loop turn; a burst beyond that allocates.
const SPARE_SENDS: usize = 256;

/// What the driver did, for tests: proof that a path under test was taken.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Stats {
    /// Receives ended because the buffer ring was empty.
    pub nobufs: u64,
    /// Sends the kernel took only part of (the rest resubmitted).
    pub short_writes: u64,
    /// Provided buffers out of the ring (filled, not yet read).
    pub held: usize,
    /// Buffers copied to a connection's overflow (a burst beyond its share).
    pub overflowed: u64,
    /// Times the kernel found the completion queue full (and took its slow path).
    pub cq_overflows: u64,
}

pub(super) struct Driver {
    /// The ring's fd in the runtime's epoll: readable when completions are waiting.
    fd: AsyncFd<RawFd>,
    inner: RefCell<Inner>,
}

impl Driver {
    fn new(config: Config) -> io::Result<Rc<Driver>> {
        let ring = setup(config.entries)?;
        let bufs = BufRing::new(&ring, config.buffers, config.buffer_size)?;
        // SAFETY: the ring's fd stays open as long as the AsyncFd: `fd` is dropped before
        // `inner` (field order).
        let fd = unsafe {
            AsyncFd::register_with_interest(ring.as_raw_fd(), tokio::io::Interest::READABLE)
        }
        .map_err(|e| e.into_parts().1)?;
        Ok(Rc::new(Driver {
            fd,
            inner: RefCell::new(Inner {
                ring,
                ops: Slab::new(),
                generation: 0,
                bufs,
                buf_waiters: Vec::new(),
                task: None,
                queued: false,
                sends: 0,
                spare: Vec::new(),
                woken: Vec::new(),
                stats: Stats::default(),
            }),
        }))
    }

    /// The driver task: submits what was queued, dispatches completions, sleeps until the ring
    /// has completions or something new is queued.
    fn poll(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.inner.borrow_mut().task = Some(cx.waker().clone());
        loop {
            self.submit_and_reap();
            match self.fd.poll_read_ready(cx) {
                Poll::Ready(Ok(mut guard)) => guard.clear_ready(),
                Poll::Ready(Err(e)) => {
                    tracing::error!("io_uring driver: {e}");
                    return Poll::Ready(());
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn poll_sends_done(&self, cx: &mut Context<'_>) -> Poll<()> {
        let _ = self.poll(cx);
        if self.inner.borrow().sends == 0 {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    fn submit_and_reap(&self) {
        let mut wake = Vec::new();
        {
            let mut g = self.inner.borrow_mut();
            let inner = &mut *g;
            inner.queued = false;
            inner.enter();
            while inner.reap(&mut wake) {
                // Completions may have queued resubmissions (short writes, cancels).
                if inner.queued {
                    inner.queued = false;
                    inner.enter();
                }
            }
            wake.append(&mut inner.woken);
        }
        for w in wake {
            w.wake();
        }
    }

    /// Queues an operation for the driver task to submit with the rest of this loop turn's.
    fn push(&self, op: Op, sqe: squeue::Entry) -> u64 {
        let mut g = self.inner.borrow_mut();
        if !g.queued {
            if let Some(t) = &g.task {
                t.wake_by_ref();
            }
        }
        g.push(op, sqe)
    }

    /// Ends every operation and waits (bounded) for the kernel to let go of their buffers; if
    /// it does not, the buffers are leaked rather than freed under it.
    fn shutdown(self: Rc<Self>) {
        let mut inner = self.inner.borrow_mut();
        let keys: Vec<u64> = inner
            .ops
            .iter()
            .filter(|(_, (_, op))| !matches!(op, Op::Cancel))
            .map(|(k, (g, _))| user_data(k, *g))
            .collect();
        for ud in keys {
            inner.push(Op::Cancel, opcode::AsyncCancel::new(ud).build());
        }
        for _ in 0..100 {
            if inner.ops.is_empty() {
                break;
            }
            let ts = types::Timespec::new().nsec(10_000_000);
            let args = types::SubmitArgs::new().timespec(&ts);
            let _ = inner.ring.submitter().submit_with_args(1, &args);
            let done: Vec<cqueue::Entry> = inner.ring.completion().collect();
            for cqe in done {
                let key = (cqe.user_data() & 0xffff_ffff) as usize;
                if !cqueue::more(cqe.flags()) && inner.ops.contains(key) {
                    inner.ops.remove(key);
                }
            }
        }
        if !inner.ops.is_empty() {
            std::mem::forget(std::mem::take(&mut inner.ops));
            inner.bufs.leak = true;
        }
    }
}

/// This thread's driver's figures, and how many operations it has in flight.
#[cfg(test)]
pub(super) fn stats() -> (Stats, usize) {
    let d = driver().expect("an io_uring shard");
    let inner = d.inner.borrow();
    (inner.stats, inner.ops.len())
}

fn user_data(key: usize, generation: u32) -> u64 {
    (generation as u64) << 32 | key as u64
}

impl Inner {
    /// Keeps an emptied send record for the next send, up to [`SPARE_SENDS`].
    fn give_back(&mut self, mut buf: Box<SendBuf>) {
        if self.spare.len() < SPARE_SENDS {
            buf.chunks.clear();
            self.spare.push(buf);
        }
    }

    fn push(&mut self, op: Op, sqe: squeue::Entry) -> u64 {
        self.generation = self.generation.wrapping_add(1);
        let key = self.ops.insert((self.generation, op));
        let ud = user_data(key, self.generation);
        if matches!(self.ops[key].1, Op::Send(..)) {
            self.sends += 1;
        }
        let sqe = sqe.user_data(ud);
        // SAFETY: every buffer the entry points at is owned by its op in `ops` (or by the
        // shard's buffer ring) until its last completion.
        while unsafe { self.ring.submission().push(&sqe) }.is_err() {
            // The queue is full: submit what is there, and reap what completed, so that a loop
            // turn queueing more sends than the completion queue holds (a broadcast to 10,000)
            // does not overflow it into the kernel's slow path, and its send records are reused.
            self.enter();
            let mut wake = std::mem::take(&mut self.woken);
            self.reap(&mut wake);
            self.woken.append(&mut wake);
        }
        self.queued = true;
        ud
    }

    /// One `io_uring_enter`: submits the queue and, with GETEVENTS, runs the completion work
    /// the kernel deferred to us (`COOP_TASKRUN`).
    fn enter(&mut self) {
        let submitter = self.ring.submitter();
        let mut sq = unsafe { self.ring.submission_shared() };
        sq.sync();
        let n = sq.len();
        let overflow = sq.cq_overflow();
        let taskrun = sq.taskrun() || overflow;
        drop(sq);
        self.stats.cq_overflows += u64::from(overflow);
        if n == 0 && !taskrun {
            return;
        }
        // SAFETY: no argument is passed.
        let r =
            unsafe { submitter.enter::<libc::sigset_t>(n as u32, 0, IORING_ENTER_GETEVENTS, None) };
        if let Err(e) = r {
            match e.raw_os_error() {
                // Completions must be reaped first; the caller loops.
                Some(libc::EBUSY) | Some(libc::EAGAIN) | Some(libc::EINTR) => {}
                _ => tracing::error!("io_uring_enter: {e}"),
            }
        }
    }

    /// Processes the completions waiting in the queue; false when there were none.
    fn reap(&mut self, wake: &mut Vec<Waker>) -> bool {
        let mut cq = self.ring.completion();
        cq.sync();
        let batch: Vec<cqueue::Entry> = cq.collect();
        let any = !batch.is_empty();
        for cqe in batch {
            self.complete(cqe, wake);
        }
        any
    }

    fn complete(&mut self, cqe: cqueue::Entry, wake: &mut Vec<Waker>) {
        let ud = cqe.user_data();
        let key = (ud & 0xffff_ffff) as usize;
        match self.ops.get(key) {
            Some((g, _)) if *g == (ud >> 32) as u32 => {}
            _ => return,
        }
        let more = cqueue::more(cqe.flags());
        let res = cqe.result();
        match &self.ops[key].1 {
            Op::Cancel => {
                self.ops.remove(key);
            }
            Op::Recv(conn) => {
                let conn = conn.clone();
                if !more {
                    self.ops.remove(key);
                }
                self.received(&conn, ud, res, cqe.flags(), more, wake);
            }
            Op::Send(..) => {
                let Op::Send(conn, mut buf) = self.ops.remove(key).1 else {
                    unreachable!()
                };
                self.sends -= 1;
                let mut st = conn.st.borrow_mut();
                match res {
                    n if n > 0 => {
                        consume(&mut buf.chunks, n as usize);
                        if !buf.chunks.is_empty() {
                            self.stats.short_writes += 1;
                            // A short write: the rest goes at once, nobody woken.
                            let sqe = buf.entry(conn.fd.as_raw_fd());
                            drop(st);
                            self.push(Op::Send(conn.clone(), buf), sqe);
                            return;
                        }
                        self.give_back(buf);
                    }
                    0 => st.send_err = Some(io::ErrorKind::WriteZero.into()),
                    e => st.send_err = Some(io::Error::from_raw_os_error(-e)),
                }
                st.sending = false;
                wake.extend(st.writer.take());
            }
        }
    }

    fn received(
        &mut self,
        conn: &Rc<Conn>,
        ud: u64,
        res: i32,
        flags: u32,
        more: bool,
        wake: &mut Vec<Waker>,
    ) {
        let mut st = conn.st.borrow_mut();
        let mut returned = false;
        if res > 0 {
            let Some(bid) = cqueue::buffer_select(flags) else {
                st.recv = Recv::Failed(io::Error::other("receive without a buffer"));
                return;
            };
            self.stats.held += 1;
            if st.closed {
                self.bufs.push(bid);
                self.stats.held -= 1;
            } else {
                if st.queue.len() < MAX_QUEUED && st.overflow.is_empty() {
                    st.queue.push_back((bid, res as u32));
                } else {
                    // Over its share of the ring: a burst the kernel delivered before the pause
                    // below took effect. The bytes move to the heap, the buffer goes back.
                    st.overflow
                        .extend_from_slice(self.bufs.buf(bid, res as usize));
                    self.bufs.push(bid);
                    self.stats.held -= 1;
                    self.stats.overflowed += 1;
                    returned = true;
                }
                // Unread data piles up (the queue is full, or bytes went to the overflow: a
                // receive re-armed while the overflow was still being read puts every new
                // buffer there and never fills the queue): pause until the reader catches up.
                let piling = st.queue.len() >= MAX_QUEUED || !st.overflow.is_empty();
                if piling && more && matches!(st.recv, Recv::Armed(_)) {
                    st.recv = Recv::Cancelling;
                    drop(st);
                    self.push(Op::Cancel, opcode::AsyncCancel::new(ud).build());
                    st = conn.st.borrow_mut();
                }
            }
            if !more && !matches!(st.recv, Recv::Eof | Recv::Failed(_)) {
                st.recv = Recv::Off;
            }
        } else if res == 0 {
            st.recv = Recv::Eof;
        } else if res == -libc::ENOBUFS {
            self.stats.nobufs += 1;
            if self.stats.held < self.bufs.count as usize {
                // Buffers came back since the kernel ran out (a burst moved to a heap
                // overflow): the next read re-arms at once.
                st.recv = Recv::Off;
            } else {
                st.recv = Recv::NoBufs;
                if !st.closed {
                    self.buf_waiters.push(conn.clone());
                }
            }
        } else if res == -libc::ECANCELED {
            st.recv = Recv::Off;
        } else {
            st.recv = Recv::Failed(io::Error::from_raw_os_error(-res));
        }
        if !st.closed {
            wake.extend(st.reader.take());
        }
        drop(st);
        if returned {
            self.wake_buf_waiters(wake);
        }
    }

    /// After buffers came back: lets the connections that ran out try again.
    fn wake_buf_waiters(&mut self, wake: &mut Vec<Waker>) {
        for conn in self.buf_waiters.drain(..) {
            let mut st = conn.st.borrow_mut();
            if matches!(st.recv, Recv::NoBufs) {
                st.recv = Recv::Off;
                wake.extend(st.reader.take());
            }
        }
    }
}

/// A connected TCP socket on the shard's ring, as `AsyncRead`/`AsyncWrite` (see the module docs).
pub(crate) struct UringStream {
    conn: Rc<Conn>,
    driver: Rc<Driver>,
}

impl UringStream {
    pub(super) fn new(s: std::net::TcpStream) -> io::Result<UringStream> {
        Ok(UringStream {
            conn: Rc::new(Conn {
                fd: s.into(),
                st: RefCell::new(ConnState {
                    recv: Recv::Off,
                    queue: VecDeque::new(),
                    overflow: BytesMut::new(),
                    head: 0,
                    reader: None,
                    sending: false,
                    send_err: None,
                    writer: None,
                    closed: false,
                }),
            }),
            driver: driver()?,
        })
    }

    pub(super) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut st = self.conn.st.borrow_mut();
        if !st.queue.is_empty() || !st.overflow.is_empty() {
            let mut inner = self.driver.inner.borrow_mut();
            let mut freed = false;
            while out.remaining() > 0 {
                let Some(&(bid, len)) = st.queue.front() else {
                    break;
                };
                let data = &inner.bufs.buf(bid, len as usize)[st.head..];
                let n = data.len().min(out.remaining());
                out.put_slice(&data[..n]);
                st.head += n;
                if st.head == len as usize {
                    // Consumed: back to the ring at once.
                    st.queue.pop_front();
                    st.head = 0;
                    inner.bufs.push(bid);
                    inner.stats.held -= 1;
                    freed = true;
                }
            }
            if st.queue.is_empty() && !st.overflow.is_empty() && out.remaining() > 0 {
                let n = st.overflow.len().min(out.remaining());
                out.put_slice(&st.overflow[..n]);
                st.overflow.advance(n);
                if st.overflow.is_empty() {
                    st.overflow = BytesMut::new(); // give the memory back
                }
            }
            drop(st);
            if freed && !inner.buf_waiters.is_empty() {
                let mut wake = Vec::new();
                inner.wake_buf_waiters(&mut wake);
                drop(inner);
                wake.into_iter().for_each(Waker::wake);
            }
            return Poll::Ready(Ok(()));
        }
        match &st.recv {
            Recv::Eof => return Poll::Ready(Ok(())),
            Recv::Failed(e) => {
                let e = io::Error::new(e.kind(), e.to_string());
                return Poll::Ready(Err(e));
            }
            Recv::Off => {
                let sqe = opcode::RecvMulti::new(types::Fd(self.conn.fd.as_raw_fd()), BGID).build();
                let ud = self.driver.push(Op::Recv(self.conn.clone()), sqe);
                st.recv = Recv::Armed(ud);
            }
            Recv::Armed(_) | Recv::Cancelling | Recv::NoBufs => {}
        }
        st.reader = Some(cx.waker().clone());
        Poll::Pending
    }

    /// Once the previous send is done, hands the chunks `fill` adds (returning their length)
    /// to the driver as one send. The bytes count as written now.
    fn start_write(
        &mut self,
        cx: &mut Context<'_>,
        fill: impl FnOnce(&mut Vec<Bytes>) -> usize,
    ) -> Poll<io::Result<usize>> {
        let mut st = self.conn.st.borrow_mut();
        if let Some(e) = st.send_err.take() {
            return Poll::Ready(Err(e));
        }
        if st.sending {
            st.writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        drop(st);
        let spare = self.driver.inner.borrow_mut().spare.pop();
        let mut buf = spare.unwrap_or_else(SendBuf::new);
        let n = fill(&mut buf.chunks);
        if n == 0 {
            self.driver.inner.borrow_mut().give_back(buf);
            return Poll::Ready(Ok(0));
        }
        self.conn.st.borrow_mut().sending = true;
        let sqe = buf.entry(self.conn.fd.as_raw_fd());
        self.driver.push(Op::Send(self.conn.clone(), buf), sqe);
        Poll::Ready(Ok(n))
    }

    /// Borrowed bytes (HTTP, TLS records) are copied: the kernel reads them after we return.
    pub(super) fn poll_write_vectored(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.start_write(cx, |chunks| {
            let n = bufs.iter().map(|b| b.len()).sum();
            if n > 0 {
                let mut copy = BytesMut::with_capacity(n);
                for b in bufs {
                    copy.extend_from_slice(b);
                }
                chunks.push(copy.freeze());
            }
            n
        })
    }

    /// An outbox's chunks go to the kernel as they are: a broadcast frame shared by 10,000
    /// connections is never copied per connection.
    pub(super) fn poll_write_outbox(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut Outbox,
    ) -> Poll<io::Result<usize>> {
        self.start_write(cx, |chunks| out.take_chunks(chunks, MAX_IOVECS))
    }

    /// The send is on its way (submitted with this loop turn): only an earlier failure shows.
    pub(super) fn poll_flush(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.conn.st.borrow_mut().send_err.take() {
            Some(e) => Poll::Ready(Err(e)),
            None => Poll::Ready(Ok(())),
        }
    }

    /// Waits for the send in flight, then shuts the write side (FIN after the data).
    pub(super) fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut st = self.conn.st.borrow_mut();
        if st.sending {
            st.writer = Some(cx.waker().clone());
            return Poll::Pending;
        }
        if let Some(e) = st.send_err.take() {
            return Poll::Ready(Err(e));
        }
        // SAFETY: shutdown on the connection's own open fd.
        if unsafe { libc::shutdown(self.conn.fd.as_raw_fd(), libc::SHUT_WR) } < 0 {
            return Poll::Ready(Err(io::Error::last_os_error()));
        }
        Poll::Ready(Ok(()))
    }
}

/// Drops the first `n` bytes of `chunks` (what a short write took).
fn consume(chunks: &mut Vec<Bytes>, mut n: usize) {
    let mut done = 0;
    for c in chunks.iter_mut() {
        if n < c.len() {
            c.advance(n);
            break;
        }
        n -= c.len();
        done += 1;
    }
    chunks.drain(..done);
}

impl Drop for UringStream {
    fn drop(&mut self) {
        let mut st = self.conn.st.borrow_mut();
        st.closed = true;
        st.reader = None;
        st.writer = None;
        let queued: Vec<u16> = st.queue.drain(..).map(|(bid, _)| bid).collect();
        let armed = match st.recv {
            Recv::Armed(ud) => {
                st.recv = Recv::Cancelling;
                Some(ud)
            }
            _ => None,
        };
        drop(st);
        let Ok(mut inner) = self.driver.inner.try_borrow_mut() else {
            return; // dropped from inside the driver: it is shutting down
        };
        if matches!(self.conn.st.borrow().recv, Recv::NoBufs) {
            // Its fd closes now rather than at the next buffer's return.
            inner.buf_waiters.retain(|c| !Rc::ptr_eq(c, &self.conn));
        }
        let mut wake = Vec::new();
        if !queued.is_empty() {
            inner.stats.held -= queued.len();
            queued.into_iter().for_each(|bid| inner.bufs.push(bid));
            inner.wake_buf_waiters(&mut wake);
        }
        drop(inner);
        if let Some(ud) = armed {
            // The fd closes (and FIN goes out) once the receive's last completion is in.
            self.driver
                .push(Op::Cancel, opcode::AsyncCancel::new(ud).build());
        }
        for w in wake {
            w.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ws::frame::OpCode;
    use std::future::Future;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const SMALL: Config = Config {
        entries: 64,
        buffers: 4,
        buffer_size: 64,
    };

    fn run<F: Future>(config: Config, f: F) -> F::Output {
        block_on(config, f).unwrap()
    }

    /// A server socket on the ring and the client end (a plain tokio socket); with `small`,
    /// the server's send buffer and the client's receive buffer are set to that size.
    async fn pair(small: Option<u32>) -> (UringStream, tokio::net::TcpStream) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr: SocketAddr = l.local_addr().unwrap();
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        if let Some(n) = small {
            sock.set_recv_buffer_size(n).unwrap();
        }
        let client = sock.connect(addr).await.unwrap();
        let (server, _) = l.accept().unwrap();
        if let Some(n) = small {
            socket2::SockRef::from(&server)
                .set_send_buffer_size(n as usize)
                .unwrap();
        }
        (UringStream::new(server).unwrap(), client)
    }

    async fn read_some(s: &mut UringStream, buf: &mut [u8]) -> usize {
        let mut rb = ReadBuf::new(buf);
        poll_fn(|cx| s.poll_read(cx, &mut rb)).await.unwrap();
        rb.filled().len()
    }

    /// Waits (bounded) until the driver has no operation in flight.
    async fn settled() {
        for _ in 0..1000 {
            if stats().1 == 0 {
                return;
            }
            tokio::task::yield_now().await;
        }
        panic!("operations still in flight: {:?}", stats());
    }

    fn pattern(conn: usize, i: usize) -> u8 {
        (conn * 31 + i * 7 % 251) as u8
    }

    #[test]
    fn more_readers_than_buffers_wait_and_lose_nothing() {
        const CONNS: usize = 12;
        const LEN: usize = 20_000;
        run(SMALL, async {
            let mut readers = Vec::new();
            let mut clients = Vec::new();
            for c in 0..CONNS {
                let (mut server, mut client) = pair(None).await;
                clients.push(tokio::task::spawn_local(async move {
                    let data: Vec<u8> = (0..LEN).map(|i| pattern(c, i)).collect();
                    client.write_all(&data).await.unwrap();
                    client.shutdown().await.unwrap();
                    client
                }));
                readers.push(tokio::task::spawn_local(async move {
                    let mut got = Vec::new();
                    // Reads smaller than a buffer, with a yield between: buffers stay queued.
                    let mut buf = [0u8; 50];
                    loop {
                        let n = read_some(&mut server, &mut buf).await;
                        if n == 0 {
                            break;
                        }
                        got.extend_from_slice(&buf[..n]);
                        tokio::task::yield_now().await;
                    }
                    got
                }));
            }
            for (c, r) in readers.into_iter().enumerate() {
                let got = r.await.unwrap();
                assert_eq!(got.len(), LEN, "connection {c}");
                let bad = got
                    .iter()
                    .enumerate()
                    .position(|(i, &b)| b != pattern(c, i));
                assert_eq!(bad, None, "connection {c}: wrong byte");
            }
            for c in clients {
                drop(c.await.unwrap());
            }
            let (st, _) = stats();
            assert!(st.nobufs > 0, "the ring never ran out: {st:?}");
            assert_eq!(st.held, 0, "{st:?}");
        });
    }

    #[test]
    fn a_turn_with_more_sends_than_the_queues_hold_overflows_nothing() {
        const CONNS: usize = 200;
        // 8 submission and 16 completion entries for 200 sends queued in one loop turn.
        let tiny = Config {
            entries: 8,
            ..SMALL
        };
        run(tiny, async {
            let mut pairs = Vec::new();
            for _ in 0..CONNS {
                pairs.push(pair(None).await);
            }
            settled().await;
            poll_fn(|cx| {
                for (c, (server, _)) in pairs.iter_mut().enumerate() {
                    let byte = [pattern(c, 0)];
                    let sent = server.poll_write_vectored(cx, &[io::IoSlice::new(&byte)]);
                    assert!(
                        matches!(sent, Poll::Ready(Ok(1))),
                        "connection {c}: {sent:?}"
                    );
                }
                Poll::Ready(())
            })
            .await;
            for (c, (_, client)) in pairs.iter_mut().enumerate() {
                let mut b = [0u8; 1];
                client.read_exact(&mut b).await.unwrap();
                assert_eq!(b[0], pattern(c, 0), "connection {c}");
            }
            settled().await;
            let (st, _) = stats();
            assert_eq!(st.cq_overflows, 0, "{st:?}");
        });
    }

    #[test]
    fn large_frames_go_out_whole_across_short_writes() {
        run(Config::DEFAULT, async {
            // Small socket buffers: the kernel takes only part of each large send.
            let (mut server, mut client) = pair(Some(4096)).await;
            let sizes = [300_000, 10, 1_000_000, 70_000, 125];
            let mut chunks = Vec::new();
            let mut expected: Vec<u8> = Vec::new();
            for (i, &n) in sizes.iter().enumerate() {
                let mut out = Outbox::default();
                out.frame(
                    OpCode::Binary,
                    &(0..n).map(|j| pattern(i, j)).collect::<Vec<u8>>(),
                );
                out.take_chunks(&mut chunks, MAX_IOVECS);
                expected.extend(chunks.last().unwrap().iter());
            }
            let reader = tokio::task::spawn_local(async move {
                let mut got = Vec::new();
                client.read_to_end(&mut got).await.unwrap();
                got
            });
            // Two writes, the second waiting for the first's short sends to finish.
            let (a, b) = chunks.split_at(2);
            for part in [a, b] {
                let want: usize = part.iter().map(|c| c.len()).sum();
                let n = poll_fn(|cx| {
                    server.start_write(cx, |c| {
                        c.extend(part.iter().cloned());
                        want
                    })
                })
                .await
                .unwrap();
                assert_eq!(n, want);
            }
            poll_fn(|cx| server.poll_shutdown(cx)).await.unwrap();
            let got = reader.await.unwrap();
            assert_eq!(got.len(), expected.len());
            assert!(got == expected, "the frames arrived altered");
            assert!(
                stats().0.short_writes > 0,
                "no short write happened: {:?}",
                stats()
            );
        });
    }

    #[test]
    fn a_reader_that_stops_holds_few_buffers_and_loses_nothing() {
        const LEN: usize = 200_000;
        let config = Config {
            entries: 64,
            buffers: 64,
            buffer_size: 1024,
        };
        run(config, async {
            let (mut server, mut client) = pair(None).await;
            let data: Vec<u8> = (0..LEN).map(|i| pattern(1, i)).collect();
            let sent = data.clone();
            let writer = tokio::task::spawn_local(async move {
                client.write_all(&sent).await.unwrap();
                client.shutdown().await.unwrap();
                client
            });
            // One read arms the receive; then nothing is read until it has paused itself.
            let mut got = vec![0u8; 1];
            assert_eq!(read_some(&mut server, &mut got).await, 1);
            for _ in 0..10_000 {
                if matches!(server.conn.st.borrow().recv, Recv::Off) && stats().1 == 0 {
                    break;
                }
                tokio::task::yield_now().await;
            }
            let state = format!("{:?} {:?}", server.conn.st.borrow().recv, stats());
            assert!(matches!(server.conn.st.borrow().recv, Recv::Off), "{state}");
            let (st, _) = stats();
            assert!(
                st.held <= MAX_QUEUED,
                "{st:?}: too many buffers held by one reader"
            );
            assert!(
                st.overflowed > 0,
                "{st:?}: the burst never went past the reader's share"
            );
            let mut buf = [0u8; 4096];
            loop {
                let n = read_some(&mut server, &mut buf).await;
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            assert!(got == data, "the stream arrived altered");
            drop(writer.await.unwrap());
            assert_eq!(stats().0.held, 0);
        });
    }

    #[test]
    fn dropping_a_stream_with_its_receive_armed_closes_it() {
        run(SMALL, async {
            let (mut server, mut client) = pair(None).await;
            client.write_all(b"abc").await.unwrap();
            // One byte read: the receive stays armed and a buffer is queued, partly read.
            let mut one = [0u8; 1];
            assert_eq!(read_some(&mut server, &mut one).await, 1);
            assert_eq!(&one, b"a");
            assert!(matches!(server.conn.st.borrow().recv, Recv::Armed(_)));
            assert_eq!(stats().0.held, 1);
            drop(server);
            // The receive is cancelled, the fd closed: the client sees the end of the stream.
            let mut rest = Vec::new();
            client.read_to_end(&mut rest).await.unwrap();
            assert!(rest.is_empty());
            settled().await;
            assert_eq!(stats().0.held, 0);
        });
    }

    #[test]
    fn a_short_write_leaves_the_rest_in_order() {
        let mut chunks = vec![
            Bytes::from_static(b"abc"),
            Bytes::from_static(b"de"),
            Bytes::from_static(b"fgh"),
        ];
        consume(&mut chunks, 4);
        assert_eq!(chunks, [&b"e"[..], &b"fgh"[..]]);
        consume(&mut chunks, 1);
        assert_eq!(chunks, [&b"fgh"[..]]);
        consume(&mut chunks, 3);
        assert!(chunks.is_empty());
    }
}
