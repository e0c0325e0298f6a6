//! Turns msgbench's JSON result lines into markdown: per scenario (the `label`), the
//! median of each figure per target, and the ratios micromsg/nchan and micromsg/hello.
//! A scenario's rows follow its kind: load, idle parked polls (`idle`) or fan-out
//! (`fanout`).

use std::fmt::Write;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

pub fn markdown_from_file(path: &Path) -> Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut runs = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let value: Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: not a JSON line", path.display(), n + 1))?;
        runs.push(value);
    }
    Ok(markdown(&runs))
}

const TARGETS: [&str; 3] = ["micromsg", "nchan", "hello"];

pub fn median(mut values: Vec<f64>) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    })
}

/// A row: its title, how to read the figure from one run, its decimals, and whether
/// the ratio columns mean something for it.
struct Row {
    title: &'static str,
    read: fn(&Value) -> Option<f64>,
    decimals: usize,
    ratio: bool,
    /// hello has no deliveries: leave its cell empty.
    skip_hello: bool,
    /// Summed over the runs instead of the median (correctness counters).
    sum: bool,
}

fn at(v: &Value, pointer: &str) -> Option<f64> {
    v.pointer(pointer).and_then(Value::as_f64)
}

fn load_rows() -> Vec<Row> {
    let row = |title, read, decimals, ratio, skip_hello| Row {
        title,
        read,
        decimals,
        ratio,
        skip_hello,
        sum: false,
    };
    let total = |title, read| Row {
        title,
        read,
        decimals: 0,
        ratio: false,
        skip_hello: true,
        sum: true,
    };
    vec![
        row(
            "delivered msg/s (hello: requests/s)",
            |v| at(v, "/rate_per_s"),
            0,
            true,
            false,
        ),
        row(
            "published msg/s",
            |v| at(v, "/published_per_s"),
            0,
            true,
            true,
        ),
        row(
            "**server CPU µs per delivered msg** (hello: per request)",
            |v| at(v, "/server_cpu_us_per_unit"),
            1,
            true,
            false,
        ),
        row(
            "server CPU µs per HTTP request",
            |v| at(v, "/server_cpu_us_per_request"),
            1,
            true,
            false,
        ),
        row(
            "server CPU (cores)",
            |v| at(v, "/server_cores"),
            2,
            true,
            false,
        ),
        row(
            "latency p50 ms",
            |v| at(v, "/latency_ms/p50"),
            3,
            true,
            true,
        ),
        row(
            "latency p90 ms",
            |v| at(v, "/latency_ms/p90"),
            3,
            true,
            true,
        ),
        row(
            "latency p99 ms",
            |v| at(v, "/latency_ms/p99"),
            3,
            true,
            true,
        ),
        row(
            "latency max ms",
            |v| at(v, "/latency_ms/max"),
            2,
            true,
            true,
        ),
        row(
            "messages per non-empty poll",
            |v| at(v, "/messages_per_nonempty_poll"),
            2,
            false,
            true,
        ),
        row(
            "HTTP requests/s",
            |v| at(v, "/requests_per_s"),
            0,
            true,
            false,
        ),
        row(
            "generator CPU (cores)",
            |v| at(v, "/generator_cores"),
            2,
            false,
            false,
        ),
        row(
            "server memory at end, PSS (MiB)",
            |v| sum_object(v, "/pss_kb").map(|kb| kb / 1024.0),
            1,
            true,
            false,
        ),
        row(
            "hypervisor steal (s)",
            |v| at(v, "/steal_cpu_s"),
            2,
            false,
            false,
        ),
        total("lost (sum of runs)", |v| at(v, "/lost")),
        total("duplicated (sum of runs)", |v| at(v, "/duplicated")),
        total("misrouted (sum of runs)", |v| at(v, "/misrouted")),
        Row {
            title: "errors (sum of runs)",
            read: |v| at(v, "/errors"),
            decimals: 0,
            ratio: false,
            skip_hello: false,
            sum: true,
        },
        Row {
            title: "disturbed runs",
            read: |v| {
                Some(if v["disturbed"].as_bool() == Some(true) {
                    1.0
                } else {
                    0.0
                })
            },
            decimals: 0,
            ratio: false,
            skip_hello: false,
            sum: true,
        },
    ]
}

fn idle_rows() -> Vec<Row> {
    let row = |title, read, decimals, ratio| Row {
        title,
        read,
        decimals,
        ratio,
        skip_hello: false,
        sum: false,
    };
    vec![
        row("parked long-polls", |v| at(v, "/parked"), 0, false),
        row(
            "**RSS per parked poll (bytes, all server processes)**",
            |v| at(v, "/rss_per_poll_bytes"),
            0,
            true,
        ),
        row(
            "PSS per parked poll (bytes, shared pages split)",
            |v| at(v, "/pss_per_poll_bytes"),
            0,
            true,
        ),
        row(
            "server RSS with all polls parked (MiB)",
            |v| sum_memory(v, "rss_parked_kb").map(|kb| kb / 1024.0),
            1,
            true,
        ),
        row(
            "server CPU s while idle",
            |v| at(v, "/server_cpu_s"),
            2,
            true,
        ),
        Row {
            title: "errors (sum of runs)",
            read: |v| at(v, "/errors"),
            decimals: 0,
            ratio: false,
            skip_hello: false,
            sum: true,
        },
    ]
}

fn fanout_rows() -> Vec<Row> {
    let row = |title, read, decimals| Row {
        title,
        read,
        decimals,
        ratio: true,
        skip_hello: true,
        sum: false,
    };
    let total = |title, read| Row {
        title,
        read,
        decimals: 0,
        ratio: false,
        skip_hello: true,
        sum: true,
    };
    vec![
        row("subscribers", |v| at(v, "/fanout"), 0),
        row("messages published", |v| at(v, "/published"), 0),
        row("copies delivered", |v| at(v, "/delivered"), 0),
        row("copies expected", |v| at(v, "/copies_expected"), 0),
        row("**deliveries/s**", |v| at(v, "/delivered_per_s"), 0),
        row(
            "fan-out completion p50 ms (publish to last copy)",
            |v| at(v, "/completion_ms/p50"),
            1,
        ),
        row(
            "fan-out completion p90 ms",
            |v| at(v, "/completion_ms/p90"),
            1,
        ),
        row(
            "fan-out completion p99 ms",
            |v| at(v, "/completion_ms/p99"),
            1,
        ),
        row(
            "fan-out completion max ms",
            |v| at(v, "/completion_ms/max"),
            1,
        ),
        row("per-copy latency p50 ms", |v| at(v, "/latency_ms/p50"), 1),
        row("per-copy latency p99 ms", |v| at(v, "/latency_ms/p99"), 1),
        row(
            "**server CPU µs per delivered copy**",
            |v| at(v, "/server_cpu_us_per_unit"),
            1,
        ),
        row("server CPU (cores)", |v| at(v, "/server_cores"), 2),
        row(
            "server RSS at end (MiB)",
            |v| sum_object(v, "/rss_kb").map(|kb| kb / 1024.0),
            1,
        ),
        row("generator CPU (cores)", |v| at(v, "/generator_cores"), 2),
        row("hypervisor steal (s)", |v| at(v, "/steal_cpu_s"), 2),
        total("lost copies (sum of runs)", |v| at(v, "/lost")),
        total("duplicated copies (sum of runs)", |v| at(v, "/duplicated")),
        total("misrouted copies (sum of runs)", |v| at(v, "/misrouted")),
        total("fan-outs not complete after 5 s (sum of runs)", |v| {
            at(v, "/timed_out")
        }),
        total("errors (sum of runs)", |v| at(v, "/errors")),
        total("disturbed runs", |v| {
            Some(if v["disturbed"].as_bool() == Some(true) {
                1.0
            } else {
                0.0
            })
        }),
    ]
}

fn sum_object(v: &Value, pointer: &str) -> Option<f64> {
    let map = v.pointer(pointer)?.as_object()?;
    Some(map.values().filter_map(Value::as_f64).sum())
}

fn sum_memory(v: &Value, key: &str) -> Option<f64> {
    let map = v.pointer("/memory")?.as_object()?;
    Some(map.values().filter_map(|m| m[key].as_f64()).sum())
}

fn format_number(x: f64, decimals: usize) -> String {
    if decimals == 0 && x.abs() >= 10_000.0 {
        // Thousands separators for big rates.
        let n = x.round() as i64;
        let digits = n.abs().to_string();
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        if n < 0 { format!("-{out}") } else { out }
    } else {
        format!("{x:.decimals$}")
    }
}

pub fn markdown(runs: &[Value]) -> String {
    let mut labels: Vec<String> = Vec::new();
    for run in runs {
        let label = run["label"].as_str().unwrap_or("").to_string();
        if !labels.contains(&label) {
            labels.push(label);
        }
    }
    let mut out = String::new();
    for label in &labels {
        let of_label: Vec<&Value> = runs
            .iter()
            .filter(|r| r["label"].as_str().unwrap_or("") == label)
            .collect();
        let kind = |key: &str| of_label.iter().any(|r| r[key].as_u64().unwrap_or(0) > 0);
        let targets: Vec<&str> = TARGETS
            .iter()
            .copied()
            .filter(|t| of_label.iter().any(|r| r["target"] == *t))
            .collect();
        let count = |t: &str| of_label.iter().filter(|r| r["target"] == t).count();
        let _ = writeln!(
            out,
            "### {}\n",
            if label.is_empty() {
                "(no label)"
            } else {
                label
            }
        );
        let runs_note: Vec<String> = targets
            .iter()
            .map(|t| format!("{t} ×{}", count(t)))
            .collect();
        let _ = writeln!(out, "Runs: {} (medians).\n", runs_note.join(", "));
        let mut header = String::from("| figure |");
        let mut rule = String::from("| --- |");
        for t in &targets {
            let _ = write!(header, " {t} |");
            rule.push_str(" ---: |");
        }
        let has = |t: &str| targets.contains(&t);
        if has("micromsg") && has("nchan") {
            header.push_str(" micromsg/nchan |");
            rule.push_str(" ---: |");
        }
        if has("micromsg") && has("hello") {
            header.push_str(" micromsg/hello |");
            rule.push_str(" ---: |");
        }
        let _ = writeln!(out, "{header}\n{rule}");
        let rows = if kind("idle") {
            idle_rows()
        } else if kind("fanout") {
            fanout_rows()
        } else {
            load_rows()
        };
        for row in rows {
            let figure = |t: &str| -> Option<f64> {
                if row.skip_hello && t == "hello" {
                    return None;
                }
                let values: Vec<f64> = of_label
                    .iter()
                    .filter(|r| r["target"] == t)
                    .filter_map(|r| (row.read)(r))
                    .collect();
                if row.sum {
                    if values.is_empty() {
                        None
                    } else {
                        Some(values.iter().sum())
                    }
                } else {
                    median(values)
                }
            };
            let cells: Vec<Option<f64>> = targets.iter().map(|t| figure(t)).collect();
            if cells.iter().all(Option::is_none) {
                continue;
            }
            let mut line = format!("| {} |", row.title);
            for cell in &cells {
                match cell {
                    Some(x) => {
                        let _ = write!(line, " {} |", format_number(*x, row.decimals));
                    }
                    None => line.push_str(" – |"),
                }
            }
            let ratio = |other: &str| -> String {
                let m = figure("micromsg");
                let o = figure(other);
                match (row.ratio, m, o) {
                    (true, Some(m), Some(o)) if o != 0.0 => format!(" {:.2}× |", m / o),
                    _ => " – |".to_string(),
                }
            };
            if has("micromsg") && has("nchan") {
                line.push_str(&ratio("nchan"));
            }
            if has("micromsg") && has("hello") {
                line.push_str(&ratio("hello"));
            }
            let _ = writeln!(out, "{line}");
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![]), None);
    }

    #[test]
    fn table_has_medians_and_ratios() {
        let run = |target: &str, rate: f64, cpu: f64| {
            json!({"label": "1: S=100 P=4", "target": target, "idle": 0, "rate_per_s": rate,
                   "server_cpu_us_per_unit": cpu, "lost": 0, "disturbed": false})
        };
        let runs = vec![
            run("micromsg", 30000.0, 20.0),
            run("micromsg", 31000.0, 22.0),
            run("micromsg", 29000.0, 100.0),
            run("nchan", 15000.0, 50.0),
            run("hello", 60000.0, 10.0),
        ];
        let text = markdown(&runs);
        assert!(text.contains("### 1: S=100 P=4"), "{text}");
        assert!(
            text.contains(
                "| delivered msg/s (hello: requests/s) | 30,000 | 15,000 | 60,000 | 2.00× | 0.50× |"
            ),
            "{text}"
        );
        assert!(
            text.contains("| 22.0 | 50.0 | 10.0 | 0.44× | 2.20× |"),
            "{text}"
        );
    }

    #[test]
    fn fanout_runs_get_their_own_rows() {
        let run = |completion: f64, lost: u64| {
            json!({"label": "7: fan-out", "target": "micromsg", "idle": 0, "fanout": 10000,
                   "delivered_per_s": 30000.0, "completion_ms": {"p50": completion},
                   "lost": lost, "disturbed": false})
        };
        let text = markdown(&[run(300.0, 0), run(340.0, 2), run(320.0, 0)]);
        assert!(text.contains("| subscribers | 10,000 |"), "{text}");
        assert!(text.contains("| **deliveries/s** | 30,000 |"), "{text}");
        assert!(
            text.contains("| fan-out completion p50 ms (publish to last copy) | 320.0 |"),
            "{text}"
        );
        assert!(text.contains("| lost copies (sum of runs) | 2 |"), "{text}");
        assert!(!text.contains("latency p90 ms"), "{text}");
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(format_number(1234567.0, 0), "1,234,567");
        assert_eq!(format_number(999.4, 0), "999");
        assert_eq!(format_number(0.1234, 3), "0.123");
    }
}
