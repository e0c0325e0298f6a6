//! The library half of `msghandler`: every module of the HTTP front, so that the
//! binary (`main.rs`), the fuzz targets and benchmarks can reach the request
//! parsers and the routes. Nothing here is a stable API for other crates.

pub mod assets;
pub mod auth;
pub mod backend_key;
pub mod config;
pub mod core_link;
pub mod fuzzing;
#[cfg(test)]
mod harness;
pub mod http;
pub mod limits;
pub mod metrics;
pub mod sse;
pub mod v1;
pub mod ws;
pub mod x0;
