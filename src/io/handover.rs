//! Restarts without a lost connection: the running process hands its listening sockets to its
//! successor over a Unix socket (`handover_socket`), as nginx and Pingora do.
//!
//! Closing a SO_REUSEPORT listener resets the connections waiting in its accept queue. When the
//! new process accepts on the very same sockets instead, nothing is ever closed: the old
//! process drains (SIGTERM) and drops its copies, and every queued or new connection is
//! accepted by the new one. This needs no sysctl (`net.ipv4.tcp_migrate_req` does the same in
//! the kernel, for processes that bind their own sockets).
//!
//! The exchange: the new process connects to `handover_socket`; the old one checks that the
//! peer runs as the same user (or root), sends [`GREETING`], then its listening sockets as
//! `SCM_RIGHTS` in chunks, one `F` byte each, and closes. The new process takes the sockets
//! whose address is in its own configuration, binds more if it runs more shards, and offers
//! them in turn on the same path.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::socket::{self, ControlMessage, ControlMessageOwned, MsgFlags};

/// The first bytes of every handover; anything else on the socket is not a ringgate.
const GREETING: &[u8] = b"ringgate-handover/1\n";
/// File descriptors per message (the kernel's limit is 253).
const CHUNK: usize = 200;
/// How long the new process waits for the old one's answer.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Asks the process serving `path` for its listening sockets. `Ok(None)`: nobody serves it
/// (first start, or the old process is gone), so bind as usual.
pub fn receive(path: &Path) -> io::Result<Option<Vec<TcpListener>>> {
    let stream = match UnixStream::connect(path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    // Sockets are taken only from a process of the same user (or root), as they are given.
    same_user(&stream)?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let (data, fds) = receive_all(&stream)?;
    if !is_handover(&data, fds.len()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "the handover socket answered with something else than a ringgate handover",
        ));
    }
    fds.into_iter()
        .map(into_listener)
        .collect::<io::Result<_>>()
        .map(Some)
}

/// Reads until the peer closes: the bytes, and every descriptor that came with them.
fn receive_all(stream: &UnixStream) -> io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut data = Vec::new();
    let mut fds = Vec::new();
    loop {
        let mut buf = [0u8; 64];
        let mut iov = [IoSliceMut::new(&mut buf)];
        let mut space = nix::cmsg_space!([RawFd; CHUNK]);
        let msg = match socket::recvmsg::<()>(
            stream.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) {
            Ok(m) => m,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(e.into()),
        };
        for c in msg.cmsgs().map_err(io::Error::from)? {
            if let ControlMessageOwned::ScmRights(received) = c {
                // SAFETY: SCM_RIGHTS installed these descriptors in this process for us; each
                // is owned by nothing else.
                fds.extend(
                    received
                        .into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        if msg.flags.contains(MsgFlags::MSG_CTRUNC) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "handover: descriptors were truncated",
            ));
        }
        let n = msg.bytes;
        if n == 0 {
            return Ok((data, fds));
        }
        data.extend_from_slice(&buf[..n]);
        if data.len() > GREETING.len() + fds.len() + CHUNK {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "handover: more bytes than sockets",
            ));
        }
    }
}

/// Whether `data` is a greeting followed by one `F` per chunk of `fds` descriptors. Public for
/// the fuzz target.
pub fn is_handover(data: &[u8], fds: usize) -> bool {
    let Some(rest) = data.strip_prefix(GREETING) else {
        return false;
    };
    rest.len() == fds.div_ceil(CHUNK) && rest.iter().all(|&b| b == b'F')
}

fn into_listener(fd: OwnedFd) -> io::Result<TcpListener> {
    let sock = socket2::Socket::from(fd);
    if !sock.is_listener()? || sock.r#type()? != socket2::Type::STREAM {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "handover: a descriptor is not a listening TCP socket",
        ));
    }
    sock.set_nonblocking(true)?;
    Ok(sock.into())
}

/// Takes the inherited sockets listening on `addr` out of `inherited`.
pub fn take(inherited: &mut Vec<TcpListener>, addr: SocketAddr) -> Vec<TcpListener> {
    let (mine, rest): (Vec<_>, Vec<_>) = std::mem::take(inherited)
        .into_iter()
        .partition(|l| l.local_addr().is_ok_and(|a| a == addr));
    *inherited = rest;
    mine
}

/// Serves `path` for a successor: hands it the sockets until [`Offer::withdraw`].
pub struct Offer {
    path: PathBuf,
    /// The socket file this process created (so it never removes a successor's).
    ino: (u64, u64),
    sockets: Arc<Mutex<Option<Vec<OwnedFd>>>>,
}

impl Offer {
    /// Binds `path` (replacing a stale file) and answers every connection on a thread of its own.
    pub fn start(path: &Path, sockets: Vec<OwnedFd>) -> io::Result<Offer> {
        let listener = bind_private(path)?;
        let meta = std::fs::metadata(path)?;
        let sockets = Arc::new(Mutex::new(Some(sockets)));
        let shared = sockets.clone();
        std::thread::Builder::new()
            .name("handover".into())
            .spawn(move || serve(listener, shared))?;
        Ok(Offer {
            path: path.to_owned(),
            ino: (meta.dev(), meta.ino()),
            sockets,
        })
    }

    /// Stops offering (the process drains): drops this copy of the sockets, so that only the
    /// shards' own copies keep them open, and removes the socket file unless a successor has
    /// replaced it.
    pub fn withdraw(&self) {
        if let Ok(mut s) = self.sockets.lock() {
            *s = None;
        }
        if std::fs::metadata(&self.path).is_ok_and(|m| (m.dev(), m.ino()) == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Binds a Unix socket at `path` that only this user can connect to, with no moment in which it
/// is reachable with wider permissions: the socket is bound inside a fresh directory of mode
/// 0700, given mode 0600, and renamed into place (atomically replacing a stale file).
fn bind_private(path: &Path) -> io::Result<UnixListener> {
    use std::os::unix::fs::DirBuilderExt;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "handover_socket names no file")
    })?;
    let mut private = parent.to_path_buf();
    private.push(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let staged = private.join("s");
    let bound = UnixListener::bind(&staged).and_then(|l| {
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&staged, path)?;
        Ok(l)
    });
    let _ = std::fs::remove_dir_all(&private);
    bound
}

fn serve(listener: UnixListener, sockets: Arc<Mutex<Option<Vec<OwnedFd>>>>) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        if let Err(e) = same_user(&stream) {
            tracing::warn!(error = %e, "handover refused");
            continue;
        }
        let Ok(guard) = sockets.lock() else { return };
        let Some(fds) = guard.as_ref() else {
            tracing::info!("handover asked for while draining: nothing to hand over");
            continue;
        };
        match send(&stream, fds) {
            Ok(()) => tracing::info!(
                sockets = fds.len(),
                "handed the listening sockets to a new process; it now accepts on them too \
                 (SIGTERM this one to drain it)"
            ),
            Err(e) => tracing::warn!(error = %e, "handover failed"),
        }
    }
}

/// Only a process of the same user (or root) gets the sockets.
fn same_user(stream: &UnixStream) -> io::Result<()> {
    let peer =
        socket::getsockopt(stream, socket::sockopt::PeerCredentials).map_err(io::Error::from)?;
    let me = nix::unistd::geteuid().as_raw();
    if peer.uid() == me || peer.uid() == 0 {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("peer uid {} is not {me}", peer.uid()),
        ))
    }
}

fn send(stream: &UnixStream, fds: &[OwnedFd]) -> io::Result<()> {
    use std::io::Write as _;
    stream.set_write_timeout(Some(TIMEOUT))?;
    (&*stream).write_all(GREETING)?;
    for chunk in fds.chunks(CHUNK) {
        let raw: Vec<RawFd> = chunk.iter().map(|f| f.as_raw_fd()).collect();
        socket::sendmsg::<()>(
            stream.as_raw_fd(),
            &[IoSlice::new(b"F")],
            &[ControlMessage::ScmRights(&raw)],
            MsgFlags::empty(),
            None,
        )
        .map_err(io::Error::from)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::listen::bind_reuseport;
    use std::io::{Read, Write};

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("ringgate-{name}-{}.sock", std::process::id()))
    }

    #[test]
    fn greeting_and_one_marker_per_chunk() {
        let with = |markers: &str| [GREETING, markers.as_bytes()].concat();
        assert!(is_handover(&with(""), 0));
        assert!(is_handover(&with("F"), 1));
        assert!(is_handover(&with("F"), CHUNK));
        assert!(is_handover(&with("FF"), CHUNK + 1));
        assert!(!is_handover(&with("F"), CHUNK + 1));
        assert!(!is_handover(&with("FF"), 3));
        assert!(!is_handover(&with("X"), 3));
        assert!(!is_handover(b"HTTP/1.1 400\r\n", 0));
    }

    #[test]
    fn the_socket_is_private_from_the_start_and_replaces_a_stale_file() {
        let path = temp_path("private");
        std::fs::write(&path, b"stale").unwrap();
        let listener = bind_private(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert!(std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()));
        // No staging directory is left behind.
        let parent = path.parent().unwrap();
        let leftover = std::fs::read_dir(parent)
            .unwrap()
            .filter_map(Result::ok)
            .any(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(&format!(".{}", path.file_name().unwrap().to_string_lossy()))
            });
        assert!(!leftover);
        // Our own user may connect and passes the credentials check both ways.
        let client = UnixStream::connect(&path).unwrap();
        let (server_side, _) = listener.accept().unwrap();
        same_user(&client).unwrap();
        same_user(&server_side).unwrap();
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn nobody_serving_the_path_means_bind_as_usual() {
        let path = temp_path("nobody");
        let _ = std::fs::remove_file(&path);
        assert!(receive(&path).unwrap().is_none());
        // A stale socket file of a process that is gone: connection refused.
        drop(UnixListener::bind(&path).unwrap());
        assert!(receive(&path).unwrap().is_none());
        let _ = std::fs::remove_file(&path);
    }

    /// The successor gets the very same sockets: a connection queued before the handover is
    /// accepted by the successor after the offering side dropped its copies.
    #[test]
    fn the_successor_accepts_on_the_same_sockets() {
        let path = temp_path("same");
        let bound = bind_reuseport("127.0.0.1:0".parse().unwrap(), 3, 64).unwrap();
        let addr = bound[0].local_addr().unwrap();
        let copies = bound
            .iter()
            .map(|l| l.try_clone().unwrap().into())
            .collect();
        let offer = Offer::start(&path, copies).unwrap();

        let mut got = receive(&path).unwrap().expect("an answer");
        assert_eq!(got.len(), 3);
        let mine = take(&mut got, addr);
        assert_eq!(mine.len(), 3);
        assert!(got.is_empty());
        assert!(take(&mut vec![], addr).is_empty());

        // Queue a connection, then close every original: only the successor's copies remain.
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        client.write_all(b"ping").unwrap();
        offer.withdraw();
        drop(bound);
        assert!(!path.exists(), "withdraw removes the socket file");
        let accepted = (0..400).find_map(|_| {
            let s = mine.iter().find_map(|l| l.accept().ok().map(|(s, _)| s));
            if s.is_none() {
                std::thread::sleep(Duration::from_millis(5));
            }
            s
        });
        let mut s = accepted.expect("the queued connection survives the handover");
        s.set_nonblocking(false).unwrap();
        let mut buf = [0u8; 4];
        s.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
    }

    #[test]
    fn a_withdrawn_offer_hands_over_nothing_and_keeps_a_successors_file() {
        let path = temp_path("withdrawn");
        let bound = bind_reuseport("127.0.0.1:0".parse().unwrap(), 1, 16).unwrap();
        let copies = bound
            .iter()
            .map(|l| l.try_clone().unwrap().into())
            .collect();
        let offer = Offer::start(&path, copies).unwrap();
        // A successor's offer replaces the file; the old one's withdraw must leave it alone.
        let successor = Offer::start(&path, Vec::new()).unwrap();
        offer.withdraw();
        assert!(path.exists());
        let got = receive(&path).unwrap().expect("the successor answers");
        assert!(got.is_empty());
        successor.withdraw();
        assert!(!path.exists());
    }
}
