//! CPU time and memory of processes, read from `/proc`.
//!
//! Processes are found by name (`/proc/<pid>/comm`, what `ps -o comm` shows); all
//! processes with that name are summed (nginx runs a master and workers).

use std::fs;

/// Clock ticks per second of the CPU times in `/proc` (`sysconf(_SC_CLK_TCK)`).
pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// The pids whose `comm` is exactly `name`, leaving out this process.
pub fn pids_named(name: &str) -> Vec<u32> {
    let own = std::process::id();
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = dir
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != own)
        .filter(|pid| {
            fs::read_to_string(format!("/proc/{pid}/comm"))
                .map(|comm| comm.trim_end() == name)
                .unwrap_or(false)
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// utime + stime of one process (all its threads), in clock ticks; `None` when it is gone.
pub fn process_ticks(pid: &str) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The name in parentheses may contain spaces; fields are counted after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Sum of utime + stime over `pids`, in ticks (a vanished process counts 0).
pub fn ticks_of(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| process_ticks(&pid.to_string()))
        .sum()
}

/// Machine-wide CPU time from the first line of `/proc/stat`, in ticks.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemTicks {
    /// user + nice + system + irq + softirq: all CPU not idle (steal aside).
    pub busy: u64,
    /// irq + softirq alone: mostly the loopback network here. Part of `busy`: with
    /// tick-based accounting a process's stime includes the interrupt work done while
    /// it was running, while /proc/stat files that time under irq/softirq.
    pub irq: u64,
    /// Time the hypervisor gave to someone else.
    pub steal: u64,
}

pub fn system_ticks() -> SystemTicks {
    let Ok(stat) = fs::read_to_string("/proc/stat") else {
        return SystemTicks::default();
    };
    let Some(line) = stat.lines().next() else {
        return SystemTicks::default();
    };
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    // user nice system idle iowait irq softirq steal guest guest_nice
    SystemTicks {
        busy: at(0) + at(1) + at(2) + at(5) + at(6),
        irq: at(5) + at(6),
        steal: at(7),
    }
}

/// Memory of a set of processes, in KiB.
#[derive(Clone, Copy, Debug, Default)]
pub struct Memory {
    /// Sum of VmRSS (shared pages count once per process that touched them).
    pub rss_kb: u64,
    /// Sum of Pss (shared pages divided between the processes sharing them).
    pub pss_kb: u64,
}

pub fn memory_of(pids: &[u32]) -> Memory {
    let mut memory = Memory::default();
    for pid in pids {
        if let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) {
            memory.rss_kb += field_kb(&status, "VmRSS:");
        }
        if let Ok(rollup) = fs::read_to_string(format!("/proc/{pid}/smaps_rollup")) {
            memory.pss_kb += field_kb(&rollup, "Pss:");
        }
    }
    memory
}

fn field_kb(text: &str, key: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The processes behind one `--watch` spec: `NAME` is every process whose comm is
/// NAME; `NAME:PID[,PID...]` is those pids plus their children named NAME (an nginx
/// master and its workers), for when other processes of that name run on the machine.
#[derive(Clone, Debug)]
pub struct Watched {
    pub name: String,
    pub pids: Vec<u32>,
}

impl Watched {
    pub fn find(spec: &str) -> Self {
        let Some((name, list)) = spec.split_once(':') else {
            return Watched {
                name: spec.to_string(),
                pids: pids_named(spec),
            };
        };
        let mut pids: Vec<u32> = list
            .split(',')
            .filter_map(|p| p.trim().parse().ok())
            .collect();
        let children: Vec<u32> = pids_named(name)
            .into_iter()
            .filter(|pid| parent_of(*pid).is_some_and(|ppid| pids.contains(&ppid)))
            .collect();
        for child in children {
            if !pids.contains(&child) {
                pids.push(child);
            }
        }
        Watched {
            name: name.to_string(),
            pids,
        }
    }
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// One reading of every clock the benchmark compares.
#[derive(Clone, Debug)]
pub struct CpuSample {
    pub watched: Vec<u64>,
    pub own: u64,
    pub system: SystemTicks,
}

pub fn cpu_sample(watched: &[Watched]) -> CpuSample {
    CpuSample {
        watched: watched.iter().map(|w| ticks_of(&w.pids)).collect(),
        own: process_ticks("self").unwrap_or(0),
        system: system_ticks(),
    }
}

/// CPU seconds between two samples.
#[derive(Clone, Debug)]
pub struct CpuDelta {
    /// Per watched name, in the order given.
    pub watched: Vec<f64>,
    pub own: f64,
    /// Busy CPU of everything else: neither watched nor this generator.
    pub other: f64,
    pub irq: f64,
    pub steal: f64,
    pub total_busy: f64,
}

impl CpuDelta {
    pub fn between(a: &CpuSample, b: &CpuSample) -> Self {
        let hz = clock_ticks();
        let secs = |x: u64, y: u64| y.saturating_sub(x) as f64 / hz;
        let watched: Vec<f64> = a
            .watched
            .iter()
            .zip(&b.watched)
            .map(|(&x, &y)| secs(x, y))
            .collect();
        let own = secs(a.own, b.own);
        let total_busy = secs(a.system.busy, b.system.busy);
        let other = (total_busy - own - watched.iter().sum::<f64>()).max(0.0);
        CpuDelta {
            watched,
            own,
            other,
            irq: secs(a.system.irq, b.system.irq),
            steal: secs(a.system.steal, b.system.steal),
            total_busy,
        }
    }
}
