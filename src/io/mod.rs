//! The I/O layer: the io_uring and epoll backends, [`Stream`] (the one connection type
//! everything above reads and writes: plain or TLS, accepted or connected, on either backend),
//! [`connect`] for upstream connections, TLS set-up, listening sockets and their handover to a
//! successor. Knows no endpoint. The backend is chosen here and nowhere above: see
//! [`backend`](self::backend) and [`stream`](self::stream).

mod backend;
pub mod client;
pub mod h1;
pub mod handover;
mod http2;
pub mod listen;
pub mod server_h1;
mod server_tls;
mod stream;
pub mod tls;
mod uring;

/// Runs hyper's background tasks (the upstream HTTP/2 client's connections) on the current
/// shard: they need not be `Send`, and a shard never hands work to another thread.
#[derive(Debug, Clone, Copy)]
pub struct LocalExec;

impl<F: std::future::Future + 'static> hyper::rt::Executor<F> for LocalExec {
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

pub use backend::{block_on, probe_uring, Backend, Listener};
pub use http2::RequestBody;
pub use stream::{connect, Stream};
