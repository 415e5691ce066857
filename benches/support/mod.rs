//! What the benches on real processes share: the strait binary to measure, a pinned
//! launcher, `/proc` readings, and small helpers for settings and medians. Included by
//! `xds.rs`, `istiod.rs`, `crypto.rs` and `hbone.rs` as a module (`mod support;`), beside `tests/common`;
//! each uses a part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::common::{self, TempDir};

pub fn strait_bin() -> PathBuf {
    std::env::var_os("STRAIT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(common::strait_bin()))
}

pub fn proc_status_kib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// user + system CPU of the whole process (exited threads included), seconds.
pub fn cpu_secs(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    Some(ticks as f64 / hz as f64)
}

/// Running (not exited, not a zombie).
pub fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| s.rfind(')').and_then(|i| s[i + 2..].chars().next()))
        .is_some_and(|state| state != 'Z' && state != 'X')
}

/// VmRSS once it stops moving: sampled every 250 ms until two samples in a row are
/// within 1 % (at most `within`).
pub async fn settled_rss(pid: u32, within: Duration) -> Option<f64> {
    let deadline = Instant::now() + within;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut last = proc_status_kib(pid, "VmRSS:")?;
    let mut steady = 0;
    while Instant::now() < deadline && steady < 2 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = proc_status_kib(pid, "VmRSS:")?;
        if (now - last).abs() <= last * 0.01 {
            steady += 1;
        } else {
            steady = 0;
        }
        last = now;
    }
    Some(last)
}

pub fn median(v: &[f64]) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => None,
        n if n % 2 == 1 => Some(v[n / 2]),
        n => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

pub fn on_path(name: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path)
            .map(|d| d.join(name))
            .any(|p| p.is_file())
    })
}

pub fn pin_self_to(cpu: usize) {
    // SAFETY: `set` is a plain bitmask on our stack, initialised by CPU_ZERO before use;
    // sched_setaffinity only reads it. Pid 0 is the calling thread, and the threads and
    // processes it starts after this inherit the mask.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            eprintln!("note: cannot pin the bench to CPU {cpu}");
        }
    }
}

/// `#!/bin/sh` + `exec taskset -c <cpu> <real> "$@"`, written as `name` in `dir`: run
/// directly or through `ip netns exec` (which execs too), the process keeps one PID from
/// `spawn` to the proxy itself, so the PID a launcher reports is the proxy's.
pub fn pinned_wrapper(dir: &TempDir, name: &str, real: &Path, cpu: usize) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let quoted = real.display().to_string().replace('\'', r"'\''");
    let path = dir.write(
        name,
        &format!("#!/bin/sh\nexec taskset -c {cpu} '{quoted}' \"$@\"\n"),
    );
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod wrapper");
    path
}

/// Nanoseconds of CPU all the process's threads have run, from the scheduler's own
/// accounting (`/proc/PID/task/*/schedstat`, finer than the ticks of `/proc/PID/stat`).
pub fn cpu_ns(pid: Option<u32>) -> Option<u64> {
    let tasks = std::fs::read_dir(format!("/proc/{}/task", pid?)).ok()?;
    let mut total = 0;
    for task in tasks.flatten() {
        let stat = std::fs::read_to_string(task.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// A process's CPU and the clock at the start of a scenario.
pub struct CpuProbe {
    pid: Option<u32>,
    cpu: Option<u64>,
    start: Instant,
}

impl CpuProbe {
    pub fn start(pid: Option<u32>) -> CpuProbe {
        CpuProbe {
            pid,
            cpu: cpu_ns(pid),
            start: Instant::now(),
        }
    }

    /// µs of the process's CPU per unit of work, for a scenario that did `rate` units per
    /// second since the start: the cost per core, whatever bounded the rate.
    pub fn per_unit(&self, rate: f64) -> Option<f64> {
        let spent = cpu_ns(self.pid)?.checked_sub(self.cpu?)?;
        let units = rate * self.start.elapsed().as_secs_f64();
        (units > 0.0).then(|| spent as f64 / 1000.0 / units)
    }
}

impl CpuProbe {
    /// The share of one core the process used since the start (1.0: a whole core).
    pub fn share(&self) -> Option<f64> {
        let spent = cpu_ns(self.pid)?.checked_sub(self.cpu?)?;
        Some(spent as f64 / 1e9 / self.start.elapsed().as_secs_f64())
    }
}

/// Busy and total jiffies of each CPU, from `/proc/stat` (busy: all but idle and iowait).
fn cpu_jiffies() -> Vec<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let f: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            let total: u64 = f.iter().take(8).sum();
            let idle = f.get(3).copied().unwrap_or(0) + f.get(4).copied().unwrap_or(0);
            (total - idle, total)
        })
        .collect()
}

/// How busy each CPU was, whoever ran on it, over a scenario.
pub struct CoreProbe(Vec<(u64, u64)>);

impl CoreProbe {
    pub fn start() -> CoreProbe {
        CoreProbe(cpu_jiffies())
    }

    /// The busy share of CPU `cpu` since the start.
    pub fn busy(&self, cpu: usize) -> Option<f64> {
        let (b0, t0) = *self.0.get(cpu)?;
        let (b1, t1) = *cpu_jiffies().get(cpu)?;
        let total = t1.checked_sub(t0)?;
        (total > 0).then(|| (b1 - b0) as f64 / total as f64)
    }
}
