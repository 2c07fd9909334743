//! Who may open a connection: a process-wide cap on open connections (HTTP, TLS and WebSocket
//! alike, derived from the open-file limit by default), a cap per client address, and a
//! WebSocket handshake rate per client address. An IPv6 client is counted by its /64, the
//! block one subscriber usually holds.
//!
//! Touched once per connection and once per upgrade, never per message: one mutex over a map
//! is enough. Time is passed in, so the rules are tested without clocks.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::ratelimit::TokenBucket;

/// The `[limits]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Open connections of every kind; 0 = derived from the open-file limit (see
    /// [`auto_max_open`]).
    pub max_open_connections: usize,
    /// Open connections per client address (IPv6: per /64); 0 = no cap.
    pub per_ip_connections: usize,
    /// WebSocket upgrades per second per client address; 0 = no limit.
    pub per_ip_handshake_rate: f64,
    /// Upgrades one client address may make in a burst.
    pub per_ip_handshake_burst: f64,
    /// Client networks the per-address limits skip (CIDR). Loopback by default: behind a proxy
    /// on the same host every client would share one address.
    pub exempt: Vec<String>,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_open_connections: 0,
            per_ip_connections: 1000,
            per_ip_handshake_rate: 20.0,
            per_ip_handshake_burst: 100.0,
            exempt: vec!["127.0.0.0/8".into(), "::1/128".into()],
        }
    }
}

impl LimitsConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, reason: String| Err(ConfigError::Invalid { key, reason });
        let rate = self.per_ip_handshake_rate;
        if !rate.is_finite() || rate < 0.0 {
            return invalid(
                "limits.per_ip_handshake_rate",
                format!("{rate} is not a rate (0 = unlimited)"),
            );
        }
        let burst = self.per_ip_handshake_burst;
        if rate > 0.0 && !(burst >= 1.0 && burst.is_finite()) {
            return invalid(
                "limits.per_ip_handshake_burst",
                format!("{burst} must be at least 1"),
            );
        }
        for net in &self.exempt {
            if let Err(e) = Cidr::parse(net) {
                return invalid("limits.exempt", e);
            }
        }
        Ok(())
    }
}

/// The connection cap for an open-file limit of `nofile`: a connection is one descriptor, a
/// proxied or agent one two; keep a quarter for those and 256 for everything else.
pub fn auto_max_open(nofile: u64) -> usize {
    ((nofile.saturating_sub(256) as usize) * 3 / 4).max(16)
}

/// An address block (`10.0.0.0/8`, `::1/128`, a bare address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr {
    net: u128,
    mask: u128,
    v4: bool,
}

impl Cidr {
    fn parse(s: &str) -> Result<Cidr, String> {
        let (addr, len) = match s.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (s, None),
        };
        let ip: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not an address or network"))?;
        let (bits, v4) = match ip {
            IpAddr::V4(_) => (32u32, true),
            IpAddr::V6(_) => (128, false),
        };
        let len = match len {
            None => bits,
            Some(l) => l
                .parse::<u32>()
                .ok()
                .filter(|l| *l <= bits)
                .ok_or_else(|| format!("{s:?}: prefix length must be 0..={bits}"))?,
        };
        let mask = if len == 0 { 0 } else { (!0u128) << (128 - len) };
        Ok(Cidr {
            net: to_u128(ip) & mask,
            mask,
            v4,
        })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        matches!(ip, IpAddr::V4(_)) == self.v4 && to_u128(ip) & self.mask == self.net
    }
}

/// The address left-aligned in 128 bits (IPv4 in the top 32), so prefixes work alike.
fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(v4) => u128::from(u32::from(v4)) << 96,
        IpAddr::V6(v6) => u128::from(v6),
    }
}

/// IPv4-mapped IPv6 clients count as their IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// What the per-address limits count by: an IPv4 address or an IPv6 /64.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClientKey {
    V4(u32),
    V6(u64),
}

impl ClientKey {
    fn of(ip: IpAddr) -> ClientKey {
        match ip {
            IpAddr::V4(v4) => ClientKey::V4(u32::from(v4)),
            IpAddr::V6(v6) => ClientKey::V6((u128::from(v6) >> 64) as u64),
        }
    }
}

/// A client of the HTTP endpoints, for per-client rate limits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Caller {
    User(String),
    Addr(ClientKey),
}

struct Client {
    open: usize,
    handshakes: TokenBucket,
}

/// Why a connection or an upgrade was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_open_connections` reached: 503.
    Capacity,
    /// `per_ip_connections` reached: 429.
    PerIp,
    /// `per_ip_handshake_rate` exceeded: 429.
    HandshakeRate,
}

impl Refusal {
    /// The label of `ringgate_connections_refused_total`.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Capacity => "capacity",
            Refusal::PerIp => "per_ip",
            Refusal::HandshakeRate => "handshake_rate",
        }
    }

    pub fn status(self) -> http::StatusCode {
        match self {
            Refusal::Capacity => http::StatusCode::SERVICE_UNAVAILABLE,
            Refusal::PerIp | Refusal::HandshakeRate => http::StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// Seconds a client should wait (`Retry-After`).
    pub fn retry_after(self) -> u32 {
        1
    }
}

/// The process's admission state, shared by every shard.
pub struct Admission {
    cfg: LimitsConfig,
    max_open: usize,
    exempt: Vec<Cidr>,
    open: AtomicUsize,
    clients: Mutex<HashMap<ClientKey, Client>>,
    /// Map size after the last sweep; the next sweep runs when it has doubled.
    swept_at: AtomicUsize,
}

impl std::fmt::Debug for Admission {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admission")
            .field("max_open", &self.max_open)
            .field("open", &self.open.load(Ordering::Relaxed))
            .finish()
    }
}

/// An admitted connection; gives its place back when dropped.
#[derive(Debug)]
pub struct Permit {
    admission: Arc<Admission>,
    key: Option<ClientKey>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.admission.open.fetch_sub(1, Ordering::AcqRel);
        if let Some(key) = self.key {
            let mut clients = self.admission.lock();
            if let Some(c) = clients.get_mut(&key) {
                c.open = c.open.saturating_sub(1);
            }
        }
    }
}

impl Admission {
    /// `nofile` is the process's open-file limit, for `max_open_connections = 0`.
    pub fn new(cfg: &LimitsConfig, nofile: u64) -> Admission {
        let max_open = match cfg.max_open_connections {
            0 => auto_max_open(nofile),
            n => n,
        };
        Admission {
            exempt: cfg
                .exempt
                .iter()
                .filter_map(|n| Cidr::parse(n).ok())
                .collect(),
            cfg: cfg.clone(),
            max_open,
            open: AtomicUsize::new(0),
            clients: Mutex::new(HashMap::new()),
            swept_at: AtomicUsize::new(64),
        }
    }

    pub fn max_open(&self) -> usize {
        self.max_open
    }

    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ClientKey, Client>> {
        // A panic while holding the lock leaves plain counters behind: still usable.
        self.clients.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whom a per-client HTTP limit (`POST /publish`) counts: the token's user when there is
    /// one (many users can share a NAT address), else the address; `None` for an `exempt` one.
    pub fn caller(&self, ip: IpAddr, user: Option<&str>) -> Option<Caller> {
        match user {
            Some(u) => Some(Caller::User(u.into())),
            None => self.key(ip).map(Caller::Addr),
        }
    }

    fn key(&self, ip: IpAddr) -> Option<ClientKey> {
        let ip = canonical(ip);
        (!self.exempt.iter().any(|n| n.contains(ip))).then(|| ClientKey::of(ip))
    }

    /// Admits a new connection from `ip`, or says why not.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, now: Instant) -> Result<Permit, Refusal> {
        let prev = self.open.fetch_add(1, Ordering::AcqRel);
        if prev >= self.max_open {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return Err(Refusal::Capacity);
        }
        let key = self.key(ip).filter(|_| self.cfg.per_ip_connections > 0);
        if let Some(k) = key {
            let mut clients = self.lock();
            self.sweep(&mut clients, now);
            let c = clients.entry(k).or_insert_with(|| self.client(now));
            if c.open >= self.cfg.per_ip_connections {
                drop(clients);
                self.open.fetch_sub(1, Ordering::AcqRel);
                return Err(Refusal::PerIp);
            }
            c.open += 1;
        }
        Ok(Permit {
            admission: self.clone(),
            key,
        })
    }

    /// Takes one WebSocket handshake from `ip`'s allowance.
    pub fn handshake(&self, ip: IpAddr, now: Instant) -> Result<(), Refusal> {
        if self.cfg.per_ip_handshake_rate <= 0.0 {
            return Ok(());
        }
        let Some(k) = self.key(ip) else {
            return Ok(());
        };
        let mut clients = self.lock();
        let c = clients.entry(k).or_insert_with(|| self.client(now));
        if c.handshakes.try_take(now) {
            Ok(())
        } else {
            Err(Refusal::HandshakeRate)
        }
    }

    fn client(&self, now: Instant) -> Client {
        Client {
            open: 0,
            handshakes: TokenBucket::new(
                self.cfg.per_ip_handshake_rate,
                self.cfg.per_ip_handshake_burst,
                now,
            ),
        }
    }

    /// Forgets clients with nothing open whose allowance has refilled, once the map has doubled
    /// since the last sweep (amortised: the map stays within twice the clients that matter).
    fn sweep(&self, clients: &mut HashMap<ClientKey, Client>, now: Instant) {
        if clients.len() < self.swept_at.load(Ordering::Relaxed) {
            return;
        }
        clients.retain(|_, c| c.open > 0 || !c.handshakes.is_full(now));
        self.swept_at
            .store((clients.len() * 2).max(64), Ordering::Relaxed);
    }

    /// Client addresses tracked now (for tests and statistics).
    pub fn tracked(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limits(per_ip: usize, rate: f64, burst: f64) -> LimitsConfig {
        LimitsConfig {
            max_open_connections: 100,
            per_ip_connections: per_ip,
            per_ip_handshake_rate: rate,
            per_ip_handshake_burst: burst,
            exempt: vec!["10.9.0.0/16".into()],
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn per_address_cap_leaves_other_addresses_alone() {
        let a = Arc::new(Admission::new(&limits(2, 0.0, 0.0), 0));
        let t = Instant::now();
        let p1 = a.admit(ip("192.0.2.1"), t).unwrap();
        let _p2 = a.admit(ip("192.0.2.1"), t).unwrap();
        assert_eq!(a.admit(ip("192.0.2.1"), t).unwrap_err(), Refusal::PerIp);
        assert!(a.admit(ip("192.0.2.2"), t).is_ok());
        drop(p1);
        assert!(a.admit(ip("192.0.2.1"), t).is_ok());
        // Exempt networks are not counted.
        let held: Vec<_> = (0..5)
            .map(|_| a.admit(ip("10.9.3.4"), t).unwrap())
            .collect();
        assert_eq!(held.len(), 5);
    }

    #[test]
    fn ipv6_counts_by_slash_64_and_mapped_v4_as_v4() {
        let a = Arc::new(Admission::new(&limits(1, 0.0, 0.0), 0));
        let t = Instant::now();
        let _p = a.admit(ip("2001:db8:1:2::1"), t).unwrap();
        assert_eq!(
            a.admit(ip("2001:db8:1:2:ffff::9"), t).unwrap_err(),
            Refusal::PerIp
        );
        assert!(a.admit(ip("2001:db8:1:3::1"), t).is_ok());
        let _q = a.admit(ip("192.0.2.7"), t).unwrap();
        assert_eq!(
            a.admit(ip("::ffff:192.0.2.7"), t).unwrap_err(),
            Refusal::PerIp
        );
    }

    #[test]
    fn capacity_counts_every_connection() {
        let cfg = LimitsConfig {
            max_open_connections: 3,
            ..limits(0, 0.0, 0.0)
        };
        let a = Arc::new(Admission::new(&cfg, 0));
        let t = Instant::now();
        let held: Vec<_> = (0..3)
            .map(|i| a.admit(ip(&format!("192.0.2.{i}")), t).unwrap())
            .collect();
        assert_eq!(
            a.admit(ip("198.51.100.1"), t).unwrap_err(),
            Refusal::Capacity
        );
        drop(held);
        assert_eq!(a.open(), 0);
        assert!(a.admit(ip("198.51.100.1"), t).is_ok());
    }

    #[test]
    fn handshake_rate_per_address_with_time_passed_in() {
        let a = Admission::new(&limits(0, 2.0, 2.0), 0);
        let t = Instant::now();
        assert!(a.handshake(ip("192.0.2.1"), t).is_ok());
        assert!(a.handshake(ip("192.0.2.1"), t).is_ok());
        assert_eq!(
            a.handshake(ip("192.0.2.1"), t).unwrap_err(),
            Refusal::HandshakeRate
        );
        assert!(a.handshake(ip("192.0.2.2"), t).is_ok());
        assert!(a
            .handshake(ip("192.0.2.1"), t + Duration::from_millis(500))
            .is_ok());
    }

    #[test]
    fn idle_clients_are_forgotten_but_not_while_throttled() {
        let a = Arc::new(Admission::new(&limits(10, 1.0, 1.0), 0));
        let t = Instant::now();
        let addr = |i: u32| IpAddr::V4((0xC000_0200 + i).into());
        for i in 0..200 {
            drop(a.admit(addr(i), t).unwrap());
            assert!(a.handshake(addr(i), t).is_ok());
        }
        // Sweeps ran as the map grew, but every bucket is empty at `t`: forgetting one would
        // hand its address a fresh allowance.
        assert_eq!(a.tracked(), 200);
        assert!(a.handshake(addr(7), t).is_err());
        // Later every allowance has refilled; the next sweep forgets the idle addresses.
        let later = t + Duration::from_secs(5);
        for i in 1000..1300 {
            drop(a.admit(addr(i), later).unwrap());
        }
        assert!(a.tracked() < 200, "{} tracked", a.tracked());
    }

    #[test]
    fn auto_cap_follows_the_file_limit() {
        assert_eq!(auto_max_open(20_000), 14_808);
        assert_eq!(auto_max_open(100), 16);
        assert_eq!(
            Admission::new(&LimitsConfig::default(), 1_048_576).max_open(),
            786_240
        );
    }

    #[test]
    fn config_checks_networks_and_rates() {
        assert!(LimitsConfig::default().validate().is_ok());
        for bad in ["10.0.0.0/33", "nonsense", "::1/129"] {
            let c = LimitsConfig {
                exempt: vec![bad.into()],
                ..LimitsConfig::default()
            };
            assert!(c.validate().is_err(), "{bad}");
        }
        let c = LimitsConfig {
            per_ip_handshake_rate: -1.0,
            ..LimitsConfig::default()
        };
        assert!(c.validate().is_err());
    }
}
