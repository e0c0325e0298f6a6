//! How msgserver and msghandler write their logs: the `log_format` setting both
//! configuration files share, and the `tracing` subscriber for it.
//!
//! Under systemd a service's stderr is a stream into the journal, which gives every
//! line the same priority: an ERROR would be invisible to `journalctl -p err`.
//! `auto` (the default) therefore speaks journald's own protocol when stderr is
//! that stream, and writes text anywhere else.

use std::os::fd::AsFd;

use anyhow::Context;
use serde::Deserialize;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// `journald` when stderr is the journal's stream (as under systemd), else `text`.
    #[default]
    Auto,
    /// Human-readable lines on stderr, coloured on a terminal.
    Text,
    /// One JSON object per line on stderr, no colour: for log shippers.
    Json,
    /// To journald directly: levels become priorities (ERROR 3, WARN 4, INFO 5,
    /// DEBUG 6, TRACE 7) and each field a journal field (`F_SOCKET`, ...).
    Journald,
}

/// Installs the global subscriber. Fails on a filter that does not parse, so that
/// a typo in `log` stops the start instead of silencing the logs. A journal that
/// cannot be reached falls back to text on stderr, and says so there.
pub fn init(filter: &str, format: LogFormat) -> anyhow::Result<()> {
    let filter = EnvFilter::try_new(filter).with_context(|| format!("log filter {filter:?}"))?;
    let format = match format {
        LogFormat::Auto if stderr_is_the_journal() => LogFormat::Journald,
        LogFormat::Auto => LogFormat::Text,
        other => other,
    };
    let journal_failed = match format {
        LogFormat::Journald => match tracing_journald::layer() {
            Ok(journal) => {
                tracing_subscriber::registry()
                    .with(filter)
                    .with(journal)
                    .init();
                return Ok(());
            }
            Err(e) => Some(e),
        },
        _ => None,
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        // One object per line, the event's fields at the top level beside "level",
        // "target" and "timestamp", so that log shippers can index them without
        // unwrapping; never colour codes, which would end up in the values.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_ansi(false)
            .init(),
        _ => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    if let Some(e) = journal_failed {
        tracing::warn!(error = %e, "log_format = \"journald\": the journal is not reachable; logging text to stderr");
    }
    Ok(())
}

/// Whether stderr is the stream systemd connected to the journal: systemd names
/// it in `JOURNAL_STREAM` as "device:inode" (systemd.exec(5)), and a child that
/// inherited the variable but not the descriptor must not be fooled.
fn stderr_is_the_journal() -> bool {
    let Ok(named) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    match nix::sys::stat::fstat(std::io::stderr().as_fd()) {
        Ok(stat) => names_stream(&named, stat.st_dev, stat.st_ino),
        Err(_) => false,
    }
}

fn names_stream(journal_stream: &str, dev: u64, ino: u64) -> bool {
    journal_stream == format!("{dev}:{ino}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_stream_must_name_this_very_descriptor() {
        assert!(names_stream("64770:1234567", 64770, 1234567));
        assert!(!names_stream("64770:1234567", 64770, 1234568));
        assert!(!names_stream("64770:1234567", 64771, 1234567));
        assert!(!names_stream("", 0, 0));
    }

    #[test]
    fn every_format_is_spelled_in_lowercase_and_auto_is_the_default() {
        #[derive(Deserialize)]
        struct File {
            #[serde(default)]
            log_format: LogFormat,
        }
        let parse = |text: &str| -> Result<LogFormat, String> {
            let value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
            serde_json::from_value::<File>(value)
                .map(|f| f.log_format)
                .map_err(|e| e.to_string())
        };
        assert_eq!(parse("{}"), Ok(LogFormat::Auto));
        for (name, format) in [
            ("auto", LogFormat::Auto),
            ("text", LogFormat::Text),
            ("json", LogFormat::Json),
            ("journald", LogFormat::Journald),
        ] {
            assert_eq!(parse(&format!(r#"{{"log_format":"{name}"}}"#)), Ok(format));
        }
        assert!(parse(r#"{"log_format":"Journald"}"#).is_err());
    }
}
