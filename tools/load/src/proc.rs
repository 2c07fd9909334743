//! CPU time and memory of the server, this process and the machine (Linux /proc, getrusage),
//! and the open-file limit.

use std::time::Duration;

use anyhow::{ensure, Context as _, Result};

/// utime + stime of a process (all its threads), in clock ticks.
fn cpu_ticks(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    // Fields after the parenthesised command name start at field 3 (state); utime and stime
    // are fields 14 and 15.
    let after = &s[s.rfind(')').context("malformed stat")? + 1..];
    let f: Vec<&str> = after.split_whitespace().collect();
    ensure!(f.len() > 13, "short stat line");
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

pub fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Nanoseconds on CPU summed over the process's threads (/proc/PID/task/*/schedstat), a
/// finer-grained cross-check of the tick counts; `None` when schedstat is unavailable.
fn sched_ns(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))
        .ok()?
        .take(4096)
    {
        let p = e.ok()?.path().join("schedstat");
        let s = std::fs::read_to_string(p).ok()?;
        total += s.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// Busy CPU time of the whole machine (all cores, /proc/stat), in clock ticks: used to tell
/// how much of the run's CPU went to processes other than the server and this tool.
pub fn machine_busy_ticks() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal
    (v.len() >= 8).then(|| v[0] + v[1] + v[2] + v[5] + v[6] + v[7])
}

/// Seconds of machine busy time between two [`machine_busy_ticks`] samples.
pub fn machine_busy_secs(before: Option<u64>) -> Option<f64> {
    match (before, machine_busy_ticks()) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / clock_ticks_per_sec()),
        _ => None,
    }
}

/// VmRSS of a process, in bytes.
pub fn rss(pid: u32) -> Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    let line = s
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS line")?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .context("malformed VmRSS")?
        .parse()?;
    Ok(kb * 1024)
}

/// This process's user+system CPU time.
pub fn self_cpu() -> Duration {
    // SAFETY: getrusage only writes the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Raises the soft open-file limit to the hard limit; returns the soft limit now in force.
fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read/write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let want = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur;
            }
        }
    }
    lim.rlim_cur
}

/// Raises the open-file limit and fails unless it leaves room for `conns` connections (and
/// 64 other descriptors); `what` names them in the error.
pub fn ensure_nofile(conns: usize, what: &str) -> Result<()> {
    let nofile = raise_nofile();
    ensure!(
        (conns as u64) + 64 <= nofile,
        "open-file limit {nofile} is too low for {conns} {what}"
    );
    Ok(())
}

/// A sample of a server process's CPU time.
pub struct ServerCpu {
    pid: u32,
    ticks: u64,
    sched_ns: Option<u64>,
}

impl ServerCpu {
    pub fn sample(pid: u32) -> Result<ServerCpu> {
        Ok(ServerCpu {
            pid,
            ticks: cpu_ticks(pid)?,
            sched_ns: sched_ns(pid),
        })
    }
    /// (seconds from utime+stime, seconds from schedstat) since `self`.
    pub fn since(&self) -> Result<(f64, Option<f64>)> {
        let now = ServerCpu::sample(self.pid)?;
        let ticks = now.ticks.saturating_sub(self.ticks) as f64 / clock_ticks_per_sec();
        let sched = match (self.sched_ns, now.sched_ns) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / 1e9),
            _ => None,
        };
        Ok((ticks, sched))
    }
}
