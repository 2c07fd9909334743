//! The I/O backends, and the one place they differ.
//!
//! A shard runs either a tokio-uring runtime (io_uring) or a plain tokio current-thread runtime
//! (epoll). Everything above the socket sees [`Stream`](super::Stream) and [`Listener`]: the
//! backend is chosen here when a socket is accepted or connected, and nothing above `io`
//! matches on it, so hyper, the WebSocket session and rustls do not know which one they run on.
//!
//! io_uring works on owned buffers, so [`UringStream`] adapts: reads complete into a buffer it
//! owns and are copied out; a write counts as done at once ("write-behind") and goes to the
//! ring as a `writev` of owned `Bytes` when it is next polled (the flush that follows every
//! write), so all the writes a shard makes in one loop turn reach the kernel in one
//! `io_uring_enter` when the runtime parks. A session's outbox hands over its chunks as they
//! are ([`WriteOutbox`](crate::ws::outbox::WriteOutbox)); borrowed slices (`AsyncWrite`) are
//! copied.

use std::future::Future;
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::ReadBuf;

use super::Stream;
use crate::ws::outbox::{Outbox, MAX_IOVECS};

/// The backend a shard runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Uring,
    Epoll,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Uring => "io_uring",
            Backend::Epoll => "epoll",
        }
    }
}

/// Submission queue size per shard. Ops in flight in the kernel do not hold SQ entries; this
/// only bounds how many new ops one loop turn can queue before an early submit.
const URING_ENTRIES: u32 = 4096;

/// Checks that io_uring can be used here: the syscall is allowed (sysctl, seccomp, kernel
/// version) and the opcodes we submit are supported. `Err` carries the reason, for the log.
pub fn probe_uring() -> Result<(), String> {
    if let Ok(v) = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        match v.trim() {
            "0" | "" => {}
            "1" => {} // allowed for the io_uring_group only; the syscall below decides
            other => return Err(format!("kernel.io_uring_disabled = {other}")),
        }
    }
    let ring = io_uring::IoUring::new(8).map_err(|e| match e.raw_os_error() {
        Some(libc::ENOSYS) => "io_uring_setup is not available (old kernel or seccomp)".into(),
        Some(libc::EPERM) => "io_uring_setup was refused (seccomp or io_uring_disabled)".into(),
        _ => format!("io_uring_setup failed: {e}"),
    })?;
    let mut probe = io_uring::Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("io_uring probe failed: {e}"))?;
    use io_uring::opcode::*;
    for (name, code) in [
        ("accept", Accept::CODE),
        ("recv", Read::CODE),
        ("send", Write::CODE),
        ("close", Close::CODE),
    ] {
        if !probe.is_supported(code) {
            return Err(format!("io_uring lacks the {name} opcode"));
        }
    }
    Ok(())
}

/// Runs `f` to completion on a new single-threaded runtime of the given backend. Tasks are
/// spawned with `tokio::task::spawn_local` on either.
pub fn block_on<F: Future>(backend: Backend, f: F) -> io::Result<F::Output> {
    match backend {
        Backend::Uring => {
            // COOP_TASKRUN + TASKRUN_FLAG (Linux 5.19+): completions are processed when the shard
            // enters the kernel anyway, instead of by interrupting it with an IPI each time.
            let mut coop = io_uring::IoUring::builder();
            coop.setup_coop_taskrun().setup_taskrun_flag();
            let mut b = tokio_uring::builder();
            b.entries(URING_ENTRIES).uring_builder(&coop);
            let rt = match tokio_uring::Runtime::new(&b) {
                Ok(rt) => rt,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    let mut plain = tokio_uring::builder();
                    plain.entries(URING_ENTRIES);
                    tokio_uring::Runtime::new(&plain)?
                }
                Err(e) => return Err(e),
            };
            Ok(rt.block_on(f))
        }
        Backend::Epoll => {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            Ok(tokio::task::LocalSet::new().block_on(&rt, f))
        }
    }
}

/// A listening socket on one shard. Both backends accept on readiness (epoll) and wrap the new
/// socket for their own I/O: accepts are per connection, not per message, and an io_uring
/// accept in flight would keep the socket busy in the kernel after a drain (stealing a
/// connection from a successor that took the socket over, see `handover`).
pub struct Listener {
    inner: tokio::io::unix::AsyncFd<std::net::TcpListener>,
    backend: Backend,
}

impl Listener {
    /// Wraps a bound, listening, non-blocking std listener for the current shard's backend.
    pub fn new(backend: Backend, l: std::net::TcpListener) -> io::Result<Listener> {
        // SAFETY: the AsyncFd owns the listener, so its fd stays open and the same for the
        // AsyncFd's whole life.
        let inner = unsafe {
            tokio::io::unix::AsyncFd::register_with_interest(l, tokio::io::Interest::READABLE)
        }
        .map_err(|e| e.into_parts().1)?;
        Ok(Listener { inner, backend })
    }

    /// The next connection, plain: a TLS listener's caller runs [`Stream::accept_tls`].
    pub async fn accept(&self) -> io::Result<(Stream, SocketAddr)> {
        let (s, addr) = loop {
            let mut ready = self.inner.readable().await?;
            match ready.try_io(|l| l.get_ref().accept()) {
                Ok(accepted) => break accepted?,
                Err(_would_block) => continue,
            }
        };
        s.set_nodelay(true)?;
        let stream = match self.backend {
            Backend::Epoll => {
                s.set_nonblocking(true)?;
                Stream::tcp(tokio::net::TcpStream::from_std(s)?)
            }
            // io_uring needs no O_NONBLOCK: it polls a socket that is not ready itself.
            Backend::Uring => {
                Stream::uring(UringStream::new(tokio_uring::net::TcpStream::from_std(s)))
            }
        };
        Ok((stream, addr))
    }
}

/// Opens an outgoing TCP connection on `backend`, with `TCP_NODELAY`.
pub(super) async fn connect_tcp(backend: Backend, addr: SocketAddr) -> io::Result<Stream> {
    Ok(match backend {
        Backend::Epoll => {
            let s = tokio::net::TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            Stream::tcp(s)
        }
        Backend::Uring => {
            let s = tokio_uring::net::TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            Stream::uring(UringStream::new(s))
        }
    })
}

type OpFuture = Pin<Box<dyn Future<Output = (io::Result<usize>, Vec<u8>)>>>;
type WriteFuture = Pin<Box<dyn Future<Output = (io::Result<usize>, Vec<Bytes>)>>>;

/// Smallest and largest read buffer. A connection starts small (idle connections are cheap)
/// and grows while reads fill the buffer, shrinking again when they don't.
const READ_MIN: usize = 512;
const READ_MAX: usize = 64 * 1024;

enum ReadState {
    Idle(Vec<u8>),
    InFlight(OpFuture),
    /// Completed read whose bytes `[pos..]` have not been handed out yet.
    Filled(Vec<u8>, usize),
}

enum WriteState {
    /// No write in flight; the (empty) list is reused for the next one.
    Idle(Vec<Bytes>),
    /// A `writev` of these chunks in flight: they are the write's buffers until it completes.
    InFlight(WriteFuture),
}

/// A tokio-uring socket adapted to `AsyncRead`/`AsyncWrite` (see the module docs).
pub(super) struct UringStream {
    sock: Rc<tokio_uring::net::TcpStream>,
    read: ReadState,
    read_size: usize,
    write: WriteState,
}

impl UringStream {
    fn new(sock: tokio_uring::net::TcpStream) -> UringStream {
        UringStream {
            sock: Rc::new(sock),
            read: ReadState::Idle(Vec::new()),
            read_size: READ_MIN,
            write: WriteState::Idle(Vec::new()),
        }
    }

    pub(super) fn poll_read(
        &mut self,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            match &mut self.read {
                ReadState::Filled(buf, pos) => {
                    let n = (buf.len() - *pos).min(out.remaining());
                    out.put_slice(&buf[*pos..*pos + n]);
                    *pos += n;
                    if *pos == buf.len() {
                        let buf = std::mem::take(buf);
                        self.read = ReadState::Idle(buf);
                    }
                    return Poll::Ready(Ok(()));
                }
                ReadState::Idle(buf) => {
                    let mut buf = std::mem::take(buf);
                    buf.clear();
                    if buf.capacity() < self.read_size || buf.capacity() > 2 * self.read_size {
                        buf = Vec::with_capacity(self.read_size);
                    }
                    let sock = self.sock.clone();
                    self.read = ReadState::InFlight(Box::pin(async move { sock.read(buf).await }));
                }
                ReadState::InFlight(op) => {
                    let (res, buf) = ready!(op.as_mut().poll(cx));
                    match res {
                        Ok(n) if n > 0 => {
                            if n == buf.capacity() {
                                self.read_size = (self.read_size * 4).min(READ_MAX);
                            } else if n < buf.capacity() / 8 {
                                self.read_size = (self.read_size / 2).max(READ_MIN);
                            }
                            self.read = ReadState::Filled(buf, 0);
                        }
                        Ok(_) => {
                            self.read = ReadState::Idle(buf);
                            return Poll::Ready(Ok(())); // end of stream
                        }
                        Err(e) => {
                            self.read = ReadState::Idle(buf);
                            return Poll::Ready(Err(e));
                        }
                    }
                }
            }
        }
    }

    /// Drives the write in flight, if any, to completion (resubmitting short writes).
    fn poll_write_done(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let WriteState::InFlight(op) = &mut self.write {
            let (res, mut chunks) = ready!(op.as_mut().poll(cx));
            match res {
                Ok(0) => {
                    self.write = WriteState::Idle(Vec::new());
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                Ok(n) => {
                    consume(&mut chunks, n);
                    if chunks.is_empty() {
                        self.write = WriteState::Idle(chunks);
                    } else {
                        self.submit(chunks);
                    }
                }
                Err(e) => {
                    self.write = WriteState::Idle(Vec::new());
                    return Poll::Ready(Err(e));
                }
            }
        }
        Poll::Ready(Ok(()))
    }

    fn submit(&mut self, chunks: Vec<Bytes>) {
        let sock = self.sock.clone();
        self.write = WriteState::InFlight(Box::pin(async move { sock.writev(chunks).await }));
    }

    /// Once the previous write is done, submits the chunks `fill` adds (returning their
    /// length) as one `writev`. The write completes later (write-behind): its bytes count as
    /// written now, an error shows at the next write or flush.
    fn start_write(
        &mut self,
        cx: &mut Context<'_>,
        fill: impl FnOnce(&mut Vec<Bytes>) -> usize,
    ) -> Poll<io::Result<usize>> {
        ready!(self.poll_write_done(cx))?;
        let WriteState::Idle(chunks) = &mut self.write else {
            unreachable!("poll_write_done leaves the writer idle")
        };
        let mut chunks = std::mem::take(chunks);
        chunks.clear();
        let n = fill(&mut chunks);
        if n == 0 {
            self.write = WriteState::Idle(chunks);
        } else {
            self.submit(chunks);
        }
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

    pub(super) fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_write_done(cx)
    }

    pub(super) fn poll_shutdown(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        ready!(self.poll_write_done(cx))?;
        Poll::Ready(self.sock.shutdown(Shutdown::Write))
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
        // A read in flight holds a reference to the socket in the kernel, so closing the fd
        // would neither end it nor send FIN. Shutting the socket down completes it at once.
        if matches!(self.read, ReadState::InFlight(_)) {
            let _ = self.sock.shutdown(Shutdown::Both);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
