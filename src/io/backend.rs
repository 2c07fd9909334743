//! The I/O backends, and the one place they differ.
//!
//! A shard runs a tokio current-thread runtime on either backend; on io_uring it also owns a
//! ring and its driver ([`uring`](super::uring)). Everything above the socket sees
//! [`Stream`](super::Stream) and [`Listener`]: the backend is chosen here when a socket is
//! accepted or connected, and nothing above `io` matches on it, so hyper, the WebSocket session
//! and rustls do not know which one they run on.

use std::future::Future;
use std::io;
use std::net::SocketAddr;

pub(super) use super::uring::UringStream;
use super::{uring, Stream};

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

/// Checks that io_uring can be used here: the syscall is allowed (sysctl, seccomp, kernel
/// version) and the opcodes and features the driver uses work. `Err` carries the reason, for
/// the log.
pub fn probe_uring() -> Result<(), String> {
    if let Ok(v) = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        match v.trim() {
            "0" | "" => {}
            "1" => {} // allowed for the io_uring_group only; the syscall decides
            other => return Err(format!("kernel.io_uring_disabled = {other}")),
        }
    }
    uring::probe()
}

/// Runs `f` to completion on a new single-threaded runtime of the given backend. Tasks are
/// spawned with `tokio::task::spawn_local` on either.
pub fn block_on<F: Future>(backend: Backend, f: F) -> io::Result<F::Output> {
    match backend {
        Backend::Uring => uring::block_on(uring::Config::DEFAULT, f),
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
            Backend::Uring => Stream::uring(UringStream::new(s)?),
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
        // Connected on readiness (once per connection), then handed to the ring.
        Backend::Uring => {
            let s = tokio::net::TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            Stream::uring(UringStream::new(s.into_std()?)?)
        }
    })
}
