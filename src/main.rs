//! The `ringgate` binary: `serve` (the default), `check-config`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use ringgate::server::config::{AdminListen, Config, IoMode, LogFormat, Overrides};
use ringgate::server::{disable_transparent_huge_pages, raise_nofile_limit, Server};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

// mimalloc, unless built with `--features system-alloc`: heap profilers (bench/IDLE.md) and
// AddressSanitizer (docs/FUZZING.md) see only what goes through malloc, and mimalloc takes its
// memory from mmap.
#[cfg(not(feature = "system-alloc"))]
use mimalloc::MiMalloc as Alloc;
#[cfg(feature = "system-alloc")]
use std::alloc::System as Alloc;

#[cfg(not(debug_assertions))]
#[global_allocator]
static GLOBAL: Alloc = Alloc;

/// Debug builds count the heap for `/metrics` (tests/idle_memory.rs).
#[cfg(debug_assertions)]
#[global_allocator]
static GLOBAL: ringgate::metrics::CountingAlloc<Alloc> = ringgate::metrics::CountingAlloc(Alloc);

#[derive(Parser)]
#[command(
    name = "ringgate",
    version,
    about = "Thread-per-core edge proxy for realtime traffic"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve (the default when no command is given).
    Serve(Box<ServeArgs>),
    /// Print the effective configuration of FILE (with environment applied), or what is wrong.
    CheckConfig { file: PathBuf },
    /// Write a development CA and a localhost certificate signed by it (ca.pem, cert.pem,
    /// key.pem) into DIR; serve them with --tls-cert DIR/cert.pem --tls-key DIR/key.pem.
    DevCert {
        #[arg(default_value = "ringgate-dev-cert")]
        dir: PathBuf,
    },
}

#[derive(Args, Default)]
struct ServeArgs {
    /// TOML config file; without one the embedded defaults apply.
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[arg(long)]
    host: Option<std::net::IpAddr>,
    #[arg(long)]
    port: Option<u16>,
    /// Number of shards (threads); default: one per available core.
    #[arg(long)]
    shards: Option<usize>,
    /// I/O backend: auto (io_uring, else epoll), uring, epoll.
    #[arg(long)]
    io: Option<IoMode>,
    /// Seconds between server pings; 0 turns heartbeats off.
    #[arg(long)]
    heartbeat_interval: Option<f64>,
    /// Maximum WebSocket connections (0 = unlimited).
    #[arg(long)]
    max_connections: Option<usize>,
    /// Seconds a graceful shutdown waits for connections to close.
    #[arg(long)]
    drain_timeout: Option<f64>,
    /// Seconds a new connection has to send its request head.
    #[arg(long)]
    handshake_timeout: Option<f64>,
    #[arg(long, value_parser = parse_log_format)]
    log_format: Option<LogFormat>,
    /// Serve TLS with this PEM certificate chain (with --tls-key).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key for --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Serve TLS with a localhost certificate generated at start (development).
    #[arg(long, conflicts_with = "tls_cert")]
    tls_self_signed: bool,
    /// Unix socket on which to take the listening sockets from a running ringgate, and then
    /// offer them to the next one (restart without a reset connection).
    #[arg(long, value_name = "PATH")]
    handover_socket: Option<PathBuf>,
    /// The admin listener (/metrics, /ws/statistics, /api/*): an address, `auto` or `off`.
    #[arg(long, value_name = "ADDR")]
    admin_listen: Option<AdminListen>,
    /// Agent gateway upstream base URL (repeatable; replaces [agent] upstreams and
    /// AGENT_UPSTREAM).
    #[arg(long = "agent-upstream", value_name = "URL")]
    agent_upstream: Vec<String>,
}

fn parse_log_format(s: &str) -> Result<LogFormat, String> {
    match s {
        "text" => Ok(LogFormat::Text),
        "json" => Ok(LogFormat::Json),
        _ => Err(format!("expected text or json, got {s:?}")),
    }
}

impl ServeArgs {
    fn overrides(&self) -> Overrides {
        Overrides {
            host: self.host,
            port: self.port,
            shards: self.shards,
            io: self.io,
            heartbeat_interval: self.heartbeat_interval,
            max_connections: self.max_connections,
            drain_timeout: self.drain_timeout,
            handshake_timeout: self.handshake_timeout,
            log_format: self.log_format,
            tls_cert: self.tls_cert.clone(),
            handover_socket: self.handover_socket.clone(),
            admin_listen: self.admin_listen,
            tls_key: self.tls_key.clone(),
            tls_self_signed: self.tls_self_signed,
            agent_upstreams: self.agent_upstream.clone(),
        }
    }
}

fn env(key: &str) -> Option<String> {
    std::env::var(key).ok()
}

fn main() -> ExitCode {
    if let Err(e) = disable_transparent_huge_pages() {
        eprintln!("warning: transparent huge pages stay on: {e}");
    }
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::CheckConfig { file }) => {
            match Config::load(Some(&file), env, &Overrides::default()) {
                Ok(c) => {
                    for w in c.warnings() {
                        eprintln!("warning: {w}");
                    }
                    print!("{}", c.to_toml());
                    for line in c.route_report() {
                        println!("{line}");
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Some(Cmd::DevCert { dir }) => match write_dev_cert(&dir) {
            Ok(()) => {
                println!(
                    "wrote {0}/ca.pem, {0}/cert.pem, {0}/key.pem\nserve: ringgate --tls-cert {0}/cert.pem --tls-key {0}/key.pem\ntrust {0}/ca.pem in the client",
                    dir.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Some(Cmd::Serve(args)) => serve(&args),
        None => serve(&cli.serve),
    }
}

fn write_dev_cert(dir: &std::path::Path) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let d = ringgate::io::tls::dev_cert()?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    for (name, pem) in [
        ("ca.pem", &d.ca_pem),
        ("cert.pem", &d.cert_pem),
        ("key.pem", &d.key_pem),
    ] {
        let path = dir.join(name);
        std::fs::write(&path, pem).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

fn serve(args: &ServeArgs) -> ExitCode {
    let config = match Config::load(args.config.as_deref(), env, &args.overrides()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    ringgate::server::logging::init(config.log_format);
    match raise_nofile_limit() {
        Ok(n) => tracing::debug!(nofile = n, "open-file limit"),
        Err(e) => tracing::warn!(error = %e, "could not raise the open-file limit"),
    }
    let mut signals = match Signals::new([SIGTERM, SIGINT, SIGHUP]) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot install signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let server = match Server::start(config) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e:#}");
            return ExitCode::FAILURE;
        }
    };
    // SIGHUP reloads the TLS certificate and the route table; SIGTERM or SIGINT drains.
    let sig = loop {
        match signals.forever().next() {
            Some(SIGHUP) => {
                server.reload_tls();
                match Config::load(args.config.as_deref(), env, &args.overrides()) {
                    Ok(c) => server.reload_routes(c.route),
                    Err(e) => {
                        tracing::error!(error = %e, "SIGHUP: config not reloaded; keeping the current route table")
                    }
                }
            }
            Some(sig) => break sig,
            None => break SIGTERM,
        }
    };
    tracing::info!(signal = sig, "draining");
    // A second signal during the drain ends the process at once.
    std::thread::spawn(move || {
        if signals.forever().any(|s| s != SIGHUP) {
            tracing::warn!("second signal: exiting without waiting for the drain");
            std::process::exit(1);
        }
    });
    if !server.drain() {
        tracing::warn!("drain timeout reached with connections still open");
    }
    ExitCode::SUCCESS
}
