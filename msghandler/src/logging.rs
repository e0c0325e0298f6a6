//! The process's log output: `tracing` to stderr, filtered by the `log` key, as
//! text for a terminal or as JSON for journald (`log_format`).

use anyhow::Context;
use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. Fails on a filter that does not parse, so that
/// a typo in `log` stops the start instead of silencing the logs.
pub fn init(filter: &str, format: LogFormat) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(filter).with_context(|| format!("log filter {filter:?}"))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // One object per line, the event's fields at the top level beside "level",
        // "target" and "timestamp", so that journald and log shippers can index them
        // without unwrapping; never colour codes, which would end up in the values.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_ansi(false)
            .init(),
    }
    Ok(())
}
