//! What `/proc` says about processes and the machine: CPU seconds, resident memory, load.

use std::{collections::BTreeMap, fs, time::Instant};

use serde::{Deserialize, Serialize};

fn clock_ticks() -> f64 {
    // SAFETY: sysconf only reads a configuration value.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// User + system CPU seconds a process has used (`/proc/<pid>/stat` utime + stime).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: fields are counted after its closing ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state): utime is field 14, stime field 15.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

/// Resident memory now and its peak so far, in KiB (`VmRSS`, `VmHWM`).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Mem {
    pub rss_kib: u64,
    pub hwm_kib: u64,
}

pub fn mem(pid: u32) -> Option<Mem> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    };
    Some(Mem { rss_kib: field("VmRSS:")?, hwm_kib: field("VmHWM:")? })
}

/// Busy CPU seconds of the whole machine, all cores (`/proc/stat`, everything but idle and iowait).
pub fn machine_busy_seconds() -> f64 {
    let stat = fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(line) = stat.lines().next() else { return 0.0 };
    let v: Vec<f64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal guest guest_nice (guest is inside user)
    let busy: f64 = v.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, x)| x).sum();
    busy / clock_ticks()
}

pub fn loadavg() -> f64 {
    fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|v| v.parse().ok()))
        .unwrap_or(0.0)
}

/// CPU seconds of named processes and of the machine, at one moment.
#[derive(Clone, Debug)]
pub struct CpuSnapshot {
    at: Instant,
    procs: BTreeMap<String, f64>,
    machine: f64,
}

pub fn cpu_snapshot(procs: &[(String, u32)]) -> CpuSnapshot {
    let mut map = BTreeMap::new();
    for (name, pid) in procs {
        if let Some(s) = cpu_seconds(*pid) {
            *map.entry(name.clone()).or_insert(0.0) += s;
        }
    }
    CpuSnapshot { at: Instant::now(), procs: map, machine: machine_busy_seconds() }
}

/// CPU used between two snapshots: by each of our processes, and by everything else on the
/// machine (other people's work on a shared machine).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct CpuUse {
    pub wall_secs: f64,
    pub by_process: BTreeMap<String, f64>,
    /// Busy CPU seconds of processes that are not part of the benchmark.
    pub others_secs: f64,
    pub loadavg_end: f64,
}

impl CpuUse {
    /// Average cores used by processes outside the benchmark.
    pub fn others_cores(&self) -> f64 {
        if self.wall_secs > 0.0 { self.others_secs / self.wall_secs } else { 0.0 }
    }

    pub fn of(&self, name: &str) -> f64 {
        self.by_process.get(name).copied().unwrap_or(0.0)
    }
}

pub fn cpu_between(a: &CpuSnapshot, b: &CpuSnapshot) -> CpuUse {
    let mut by_process = BTreeMap::new();
    for (name, end) in &b.procs {
        // A process started between the snapshots counts from zero.
        let start = a.procs.get(name).copied().unwrap_or(0.0);
        by_process.insert(name.clone(), (end - start).max(0.0));
    }
    let ours: f64 = by_process.values().sum();
    CpuUse {
        wall_secs: b.at.duration_since(a.at).as_secs_f64(),
        others_secs: ((b.machine - a.machine) - ours).max(0.0),
        by_process,
        loadavg_end: loadavg(),
    }
}
