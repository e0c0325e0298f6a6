//! The micromsg core as a library: the broker state machine, its storage, and the
//! I/O shell that serves them over the Unix socket. The `msgserver` binary is a thin
//! `main` over this; the benchmarks and tests use the parts directly.

pub mod broker;
pub mod cluster;
pub mod config;
pub mod journal;
pub mod routing;
pub mod server;
pub mod socket;
pub mod storage;
