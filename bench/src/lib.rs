//! Benchmark tooling for micromsg (issue 3).
//!
//! This crate measures micromsg against its peers on one machine, with the load
//! generator sharing the cores:
//!
//! * `msgbench` is the load generator. It drives micromsg over the x0 long-poll
//!   protocol, nginx+nchan over nchan's long-poll protocol, or the `hello` baseline
//!   server, with P closed-loop publishers and S long-polling subscriber sessions
//!   (one persistent HTTP/1.1 connection each). For micromsg the subscribers can
//!   instead hold one WebSocket ([`websocket`]) or one event stream ([`sse`]) each,
//!   fed by the same x0 publishers. Every message carries its publisher, a sequence
//!   number, its destination and a send timestamp, so each delivery is checked
//!   (misrouted, duplicated) and timed, and what was acknowledged but never
//!   delivered is counted as lost. It reads the CPU time and memory of the server
//!   processes from `/proc`, so servers are compared by **server CPU per delivered
//!   message**, and marks a run disturbed when something else used the CPU. It can
//!   also hold thousands of idle parked long-polls to measure memory per poll, fan
//!   one channel message out to thousands of subscribers over the `/v1` API (timing
//!   until the last copy arrives, [`fanout`]), let rounds of short-lived sessions
//!   come and go to show that nothing grows with the sessions ever seen ([`churn`]),
//!   and turn a file of result lines into the markdown table of `BENCHMARKS.md`.
//! * `hello` is a bare hyper HTTP/1.1 server that answers every request at once: the
//!   upper bound of the request rate (and the floor of CPU per request) here.
//!
//! `bench/run.sh` builds everything, starts the three servers and runs the scenarios.

pub mod churn;
pub mod client;
pub mod fanout;
pub mod procfs;
pub mod report;
pub mod sse;
pub mod websocket;

use std::time::{SystemTime, UNIX_EPOCH};

/// Microseconds since the Unix epoch: the clock that message timestamps use.
pub fn unix_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Raises the soft limit on open files to the hard limit; returns the new soft limit.
pub fn raise_fd_limit() -> std::io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a stack value of the right type.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if limit.rlim_cur < limit.rlim_max {
            limit.rlim_cur = limit.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(limit.rlim_cur)
}
