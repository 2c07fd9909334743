//! The server under load: its URL, connecting (TCP, TLS) and the opening handshake, and
//! opening many connections at a bounded concurrency.

use std::net::{Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _, Result};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ringgate::payload::Rng;
use ringgate::ws::handshake::accept_key;
use rustls::pki_types::ServerName;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::deflate::{parse_pmd, Pmd, DEFLATE_OFFER};
use crate::seed;
use crate::stream::Stream;
use crate::tls::TlsArgs;

/// A handshake (connect + upgrade) must finish within this.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest HTTP response head accepted during the upgrade.
const MAX_HEAD: usize = 16 * 1024;

/// A parsed `ws://` or `wss://` URL pointing at this machine.
#[derive(Clone)]
pub struct Target {
    pub addr: SocketAddr,
    host: String,
    pub path: String,
    pub tls: Option<TlsTarget>,
}

/// How to make the TLS connection for a `wss://` target.
#[derive(Clone)]
pub struct TlsTarget {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

impl Target {
    /// Parses `url`; only 127.0.0.1 and localhost are accepted.
    pub fn parse(url: &str, tls: &TlsArgs) -> Result<Target> {
        let (secure, rest) = if let Some(r) = url.strip_prefix("wss://") {
            (true, r)
        } else if let Some(r) = url.strip_prefix("ws://") {
            (false, r)
        } else {
            bail!("only ws:// and wss:// URLs are supported")
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse::<u16>().context("bad port")?),
            None => (authority, if secure { 443 } else { 80 }),
        };
        let name = match host {
            "127.0.0.1" => ServerName::IpAddress(Ipv4Addr::LOCALHOST.into()),
            "localhost" => ServerName::try_from("localhost")?,
            other => bail!("refusing target {other:?}: only 127.0.0.1 / localhost may be loaded"),
        };
        ensure!(port != 0, "port 0 is not a target");
        let tls = if secure {
            Some(TlsTarget {
                connector: crate::tls::connector(tls)?,
                name,
            })
        } else {
            ensure!(
                !tls.any(),
                "--ca, --insecure and --tls-resume need a wss:// URL"
            );
            None
        };
        Ok(Target {
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            host: format!("{host}:{port}"),
            path: path.to_string(),
            tls,
        })
    }

    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "wss"
        } else {
            "ws"
        }
    }
}

/// A connection right after its upgrade.
pub struct Upgraded {
    pub s: Stream,
    /// Bytes that came after the 101 response head.
    pub early: Vec<u8>,
    /// The agreed permessage-deflate parameters, if any.
    pub pmd: Option<Pmd>,
}

/// Connects and performs the opening handshake, offering permessage-deflate when `deflate`.
async fn connect(t: &Target, rng_seed: u64, deflate: bool) -> Result<Upgraded> {
    let tcp = TcpStream::connect(t.addr)
        .await
        .with_context(|| format!("connect {}", t.addr))?;
    tcp.set_nodelay(true)?;
    let mut s = match &t.tls {
        None => Stream::Plain(tcp),
        Some(tls) => Stream::Tls(Box::new(
            tls.connector
                .connect(tls.name.clone(), tcp)
                .await
                .context("TLS handshake")?,
        )),
    };
    let mut rng = Rng::new(rng_seed);
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
    raw[8..].copy_from_slice(&rng.next_u64().to_le_bytes());
    let key = B64.encode(raw);
    let ext = if deflate {
        format!("Sec-WebSocket-Extensions: {DEFLATE_OFFER}\r\n")
    } else {
        String::new()
    };
    let req = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{ext}\r\n",
        t.path, t.host
    );
    s.send(req.as_bytes()).await?;
    let mut buf = Vec::with_capacity(512);
    let mut tmp = [0u8; 1024];
    let end = loop {
        ensure!(buf.len() <= MAX_HEAD, "response head over {MAX_HEAD} bytes");
        let n = s.read(&mut tmp).await?;
        ensure!(n > 0, "connection closed during the handshake");
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&tmp[..n]);
        if let Some(i) = buf[from..].windows(4).position(|w| w == b"\r\n\r\n") {
            break from + i;
        }
    };
    let head = std::str::from_utf8(&buf[..end]).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or_default();
    ensure!(
        status.starts_with("HTTP/1.1 101"),
        "upgrade refused: {status:?}"
    );
    let (mut accept, mut pmd) = (None, None);
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let k = k.trim();
        if k.eq_ignore_ascii_case("sec-websocket-accept") {
            accept = Some(v.trim());
        } else if k.eq_ignore_ascii_case("sec-websocket-extensions") {
            ensure!(deflate, "server answered an extension we did not offer");
            ensure!(pmd.is_none(), "more than one Sec-WebSocket-Extensions line");
            pmd = Some(parse_pmd(v.trim())?);
        }
    }
    let want = accept_key(key.as_bytes());
    ensure!(
        accept == Some(want.as_str()),
        "bad Sec-WebSocket-Accept {accept:?}"
    );
    ensure!(
        !deflate || pmd.is_some(),
        "server declined permessage-deflate"
    );
    Ok(Upgraded {
        s,
        early: buf[end + 4..].to_vec(),
        pmd,
    })
}

/// [`connect`] bounded by [`HANDSHAKE_TIMEOUT`].
pub async fn connect_timeout(t: &Target, rng_seed: u64, deflate: bool) -> Result<Upgraded> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, connect(t, rng_seed, deflate))
        .await
        .context("handshake timed out")?
}

/// Opens `n` connections, at most `concurrency` handshakes at a time, until `deadline`.
/// Each is handed to `then` (e.g. to build per-connection state); failures are counted.
pub async fn open_all<T: 'static>(
    t: &Target,
    n: usize,
    concurrency: usize,
    deadline: Instant,
    deflate: bool,
    then: impl Fn(usize, Upgraded) -> T + 'static,
) -> (Vec<T>, usize, Option<anyhow::Error>) {
    let then = Rc::new(then);
    let base = seed();
    bounded(n, concurrency, deadline, |i| {
        let (t, then) = (t.clone(), then.clone());
        async move {
            let u = connect_timeout(&t, base ^ (i as u64) << 20, deflate).await?;
            Ok(then(i, u))
        }
    })
    .await
}

/// Runs `task(0..n)`, at most `concurrency` at a time, until `deadline`: the results of the
/// tasks that succeeded, how many failed, and the first error.
pub async fn bounded<T: 'static, F>(
    n: usize,
    concurrency: usize,
    deadline: Instant,
    task: impl Fn(usize) -> F,
) -> (Vec<T>, usize, Option<anyhow::Error>)
where
    F: std::future::Future<Output = Result<T>> + 'static,
{
    let mut set = JoinSet::new();
    let mut out = Vec::with_capacity(n);
    let (mut failed, mut first_err) = (0usize, None);
    let mut next = 0usize;
    while (next < n || !set.is_empty()) && Instant::now() < deadline {
        while next < n && set.len() < concurrency.max(1) {
            set.spawn_local(task(next));
            next += 1;
        }
        match tokio::time::timeout_at(deadline, set.join_next()).await {
            Ok(Some(Ok(Ok(v)))) => out.push(v),
            Ok(Some(Ok(Err(e)))) => {
                failed += 1;
                first_err.get_or_insert(e);
            }
            Ok(Some(Err(e))) => {
                failed += 1;
                first_err.get_or_insert(anyhow::anyhow!("task failed: {e}"));
            }
            Ok(None) | Err(_) => break,
        }
    }
    set.abort_all();
    (out, failed, first_err)
}
