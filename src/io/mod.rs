//! The I/O layer: the io_uring and epoll backends, the stream type everything above reads and
//! writes (plain or TLS), TLS set-up, listening sockets and their handover to a successor.
//! Knows no endpoint.

mod backend;
pub mod handover;
pub mod listen;
pub mod tls;

pub use backend::{block_on, probe_uring, Backend, Conn, Listener, UringStream};
