//! Thread-per-core: one shard per core, each an OS thread pinned to its core with its own
//! single-threaded runtime and its own SO_REUSEPORT listener. The main thread only starts the
//! shards, waits for a signal and coordinates the drain.

pub mod admission;
pub mod api;
pub mod config;
pub mod endpoint;
pub mod failure;
pub mod fallback;
mod h2c;
pub mod http;
mod http1;
mod http2;
pub mod logging;
mod rooms_http;
pub mod shard;
pub mod static_files;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{mpsc as std_mpsc, Arc};
use std::time::Instant;

use tokio::sync::mpsc;

use crate::error::StartError;
use crate::io::{self, handover, listen, Backend};
use crate::server::config::{AdminListen, Config, IoMode, Listen};
use shard::{Control, ServerState, Shard};

/// A running server: its address and the handles to stop it.
pub struct Server {
    pub addr: SocketAddr,
    pub global: Arc<ServerState>,
    controls: Vec<mpsc::UnboundedSender<Control>>,
    done: std_mpsc::Receiver<usize>,
    shards: usize,
    /// Offers the listening sockets to a successor (`handover_socket`).
    handover: Option<handover::Offer>,
}

/// Picks the backend for `mode`, saying why.
pub fn choose_backend(mode: IoMode) -> Result<(Backend, String), StartError> {
    match (mode, io::probe_uring()) {
        (IoMode::Epoll, _) => Ok((Backend::Epoll, "asked for with --io epoll".into())),
        (IoMode::Uring, Ok(())) => Ok((Backend::Uring, "asked for with --io uring".into())),
        (IoMode::Uring, Err(why)) => Err(StartError::Uring(why)),
        (IoMode::Auto, Ok(())) => Ok((Backend::Uring, "io_uring is available".into())),
        (IoMode::Auto, Err(why)) => Ok((Backend::Epoll, format!("falling back: {why}"))),
    }
}

/// The cores this process may run on (its affinity mask), in order.
fn available_cores() -> Vec<core_affinity::CoreId> {
    core_affinity::get_core_ids().unwrap_or_default()
}

/// Turns transparent huge pages off for this process, unless `MIMALLOC_ALLOW_THP` is set (then
/// mimalloc does what it says). mimalloc advises its arenas for huge pages; with THP on, an
/// arena is resident in 2 MiB units (and khugepaged fills in any 2 MiB range of which a single
/// page is in use), so idle connections cost the span the allocator ever touched rather than
/// what they hold: 0.1–0.7 KB more per idle connection, varying from run to run, and 10 MB
/// more at start (bench/IDLE.md). Call it first thing: memory already in huge pages stays so.
pub fn disable_transparent_huge_pages() -> std::io::Result<()> {
    if std::env::var_os("MIMALLOC_ALLOW_THP").is_some() {
        return Ok(());
    }
    // SAFETY: PR_SET_THP_DISABLE takes an integer flag and no pointer.
    if unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Raises the soft open-file limit to the hard limit; returns the new soft limit.
pub fn raise_nofile_limit() -> std::io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(lim.rlim_cur)
}

/// The soft open-file limit now (after [`raise_nofile_limit`]); 1024 if it cannot be read.
pub fn nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    lim.rlim_cur
}

impl Server {
    /// Binds the listeners and starts the shards.
    pub fn start(config: Config) -> Result<Server, StartError> {
        failure::install_panic_hook();
        let config_warnings = config.warnings();
        let (backend, why) = choose_backend(config.io)?;
        let cores = available_cores();
        let shards = match config.shards {
            0 => cores.len().max(1),
            n => n,
        };
        let tls = match config.tls_settings() {
            Some(t) => Some(crate::io::tls::acceptor(&t)?),
            None => None,
        };
        let auth = crate::auth::Verifier::from_config(&config.auth)?;
        // A running predecessor hands over its listening sockets (restart without loss). Every
        // check that can fail comes before: a successor that takes the sockets must start.
        let mut inherited = match &config.handover_socket {
            Some(path) => handover::receive(path)
                .map_err(StartError::io(format_args!(
                    "handover from {} failed",
                    path.display()
                )))?
                .unwrap_or_default(),
            None => Vec::new(),
        };
        // Every listener is bound once per shard; shard i gets the i-th socket of each (and
        // inherited sockets beyond the shard count go round the shards).
        let specs = config.listeners();
        let mut per_shard: Vec<Vec<(std::net::TcpListener, Listen)>> =
            (0..shards).map(|_| Vec::new()).collect();
        let mut addrs = Vec::with_capacity(specs.len());
        let mut offered = Vec::new();
        for spec in &specs {
            let mut sockets = handover::take(&mut inherited, spec.addr);
            if !sockets.is_empty() {
                tracing::info!(addr = %spec.addr, sockets = sockets.len(), "took over listening sockets");
            }
            if sockets.len() < shards {
                let addr = sockets
                    .first()
                    .map_or(Ok(spec.addr), |l| l.local_addr())
                    .map_err(StartError::io("inherited listening socket"))?;
                match listen::bind_reuseport(addr, shards - sockets.len(), config.backlog) {
                    Ok(more) => sockets.extend(more),
                    // The automatic admin listener is a convenience: a port taken by another
                    // program must not stop the server.
                    Err(e) if spec.admin && config.admin_listen == AdminListen::Auto => {
                        tracing::warn!(
                            addr = %spec.addr, error = %e,
                            "no admin listener (admin_listen = \"auto\"): the admin surface is not served"
                        );
                        continue;
                    }
                    Err(e) => {
                        return Err(StartError::io(format_args!(
                            "cannot listen on {}",
                            spec.addr
                        ))(e))
                    }
                }
            }
            let local = sockets[0]
                .local_addr()
                .map_err(StartError::io(format_args!(
                    "cannot listen on {}",
                    spec.addr
                )))?;
            addrs.push((local, *spec));
            for (i, l) in sockets.into_iter().enumerate() {
                if config.handover_socket.is_some() {
                    offered.push(
                        l.try_clone()
                            .map_err(StartError::io("cannot offer a listening socket"))?
                            .into(),
                    );
                }
                per_shard[i % shards].push((l, *spec));
            }
        }
        for l in inherited {
            tracing::warn!(
                addr = ?l.local_addr().ok(),
                "an inherited listening socket is not in this configuration: closed (connections \
                 queued on it are reset)"
            );
        }
        let handover =
            match &config.handover_socket {
                Some(path) => Some(handover::Offer::start(path, offered).map_err(
                    StartError::io(format_args!("cannot serve {}", path.display())),
                )?),
                None => None,
            };
        let (addr, first) = addrs[0];
        let first_tls = first.tls;
        let pin = config.pin_shards && !cores.is_empty();
        let mut global = ServerState::new(config, backend, shards);
        global.auth = auth;
        if global.config.metrics {
            global.metrics = crate::metrics::install(crate::metrics::UPKEEP, shards);
        }
        crate::metrics::record_info(backend.name(), shards);
        crate::agent::upstream::export_metrics(&global.config.agent, shards);
        let global = Arc::new(global);
        let (done_tx, done) = std_mpsc::channel();
        let (controls, receivers): (Vec<_>, Vec<_>) =
            (0..shards).map(|_| mpsc::unbounded_channel()).unzip();
        let _ = global.shards.set(controls.clone());
        for (id, (listeners, rx)) in per_shard.into_iter().zip(receivers).enumerate() {
            let global = global.clone();
            let done_tx = done_tx.clone();
            let core = pin.then(|| cores[id % cores.len()]);
            let tls = tls.clone();
            std::thread::Builder::new()
                .name(format!("shard-{id}"))
                .spawn(move || {
                    if let Some(core) = core {
                        if !core_affinity::set_for_current(core) {
                            tracing::warn!(shard = id, core = core.id, "could not pin shard");
                        }
                    }
                    let shard = Shard::new(id, global.clone(), tls);
                    let g = global.clone();
                    let run = async move {
                        let listeners: std::io::Result<Vec<_>> = listeners
                            .into_iter()
                            .map(|(l, spec)| Ok((io::Listener::new(backend, l)?, spec)))
                            .collect();
                        match listeners {
                            Ok(l) => failure::critical(g, id, "shard loop", shard.run(l, rx)).await,
                            Err(e) => {
                                tracing::error!(shard = id, error = %e, "listener setup failed");
                                failure::fail(&g, id, "listener setup");
                            }
                        }
                    };
                    if let Err(e) = io::block_on(backend, run) {
                        tracing::error!(shard = id, error = %e, "shard runtime failed to start");
                        failure::fail(&global, id, "runtime start");
                    }
                    let _ = done_tx.send(id);
                })
                .map_err(StartError::io("cannot start shard thread"))?;
        }
        for w in config_warnings {
            tracing::warn!("{w}");
        }
        for (a, spec) in &addrs[1..] {
            tracing::info!(addr = %a, tls = spec.tls, admin = spec.admin, "also listening");
        }
        // Before the listening line, which tools (and the tests) wait for.
        if global.config.agent.demo_active() {
            tracing::info!(
                "/ws/agent answers from the built-in demo agent: no agent upstream is configured \
                 (set [agent] upstreams, or [agent] demo = false)"
            );
        }
        tracing::info!(
            %addr, tls = first_tls, shards, io = backend.name(), why = %why, pinned = pin,
            "ringgate listening"
        );
        Ok(Server {
            addr,
            global,
            controls,
            done,
            shards,
            handover,
        })
    }

    /// Rebuilds the TLS acceptor from the configured files and hands it to every shard. A broken
    /// new certificate keeps the old one in service (the reason is logged).
    pub fn reload_tls(&self) {
        let Some(settings) = self.global.config.tls_settings() else {
            tracing::info!("SIGHUP: no TLS configured, nothing to reload");
            return;
        };
        match crate::io::tls::acceptor(&settings) {
            Ok(acceptor) => {
                metrics::counter!(crate::metrics::TLS_RELOADS, "result" => "ok").increment(1);
                for c in &self.controls {
                    let _ = c.send(Control::Tls(acceptor.clone()));
                }
            }
            Err(e) => {
                metrics::counter!(crate::metrics::TLS_RELOADS, "result" => "error").increment(1);
                tracing::error!(error = %e, "TLS reload failed; keeping the current certificate")
            }
        }
    }

    /// Hands a new route table to every shard: new requests use it, requests in flight finish
    /// on the old one.
    pub fn reload_routes(&self, routes: Vec<crate::proxy::config::Route>) {
        let routes = Arc::new(routes);
        for c in &self.controls {
            let _ = c.send(Control::Routes(routes.clone()));
        }
        tracing::info!(routes = routes.len(), "route table reloaded");
    }

    /// Drains: `/readyz` turns 503, shards stop accepting and close their connections with
    /// 1001. Returns true when every shard finished before the drain timeout.
    pub fn drain(self) -> bool {
        let started = Instant::now();
        self.global.draining.store(true, Ordering::Release);
        // A successor that took the sockets keeps them open; without one, this copy must go
        // for the listeners to close.
        if let Some(h) = &self.handover {
            h.withdraw();
        }
        // Closing a SO_REUSEPORT listener resets the connections in its accept queue unless
        // the kernel may move them to another listener of the group (a new ringgate started
        // on the same port for a restart) or a successor took the sockets over.
        if self.handover.is_none()
            && std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req")
                .is_ok_and(|v| v.trim() == "0")
        {
            tracing::info!(
                "net.ipv4.tcp_migrate_req is 0: connections still queued on this process's \
                 listeners are reset rather than handed to a new process on the same port \
                 (set it to 1 for restarts without loss, see tuning/sysctl.conf)"
            );
        }
        for c in &self.controls {
            let _ = c.send(Control::Drain);
        }
        let deadline = started + self.global.config.drain_timeout();
        let mut left = self.shards;
        while left > 0 {
            let wait = deadline.saturating_duration_since(Instant::now());
            match self.done.recv_timeout(wait) {
                Ok(_) => left -= 1,
                Err(_) => break,
            }
        }
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            shards_left = left,
            "drain finished"
        );
        left == 0
    }
}
