//! Turns msgbench's JSON result lines into markdown: per scenario (the `label`), the
//! median of each figure per target and transport (a column each: `micromsg` for
//! long-polling, `micromsg ws`, `micromsg sse`), and the ratios micromsg/nchan,
//! micromsg/hello, ws/poll and sse/poll. Runs that name their `backend` (the cluster
//! scenario) get a column per backend and number of URLs, `micromsg embedded, 1
//! pair`, `micromsg redis, 3 pairs`, and ratios to the embedded one. A scenario's
//! rows follow its kind: load, idle parked polls (`idle`), fan-out (`fanout`) or
//! session churn (`churn`).

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
const TRANSPORTS: [&str; 3] = ["poll", "ws", "sse"];
/// The backend the cluster columns are compared with.
const EMBEDDED: &str = "embedded";

/// A column of a scenario's table: the runs of one target over one transport (and
/// one backend and number of pairs, when the runs name their backend).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Series {
    /// Where it goes: targets, then transports, in the order of the constants; then
    /// the embedded backend before others, then fewer pairs before more.
    rank: (usize, usize, usize, u64),
    /// The transport and, for a WebSocket in window flow, its window: `poll`, `ws`,
    /// `ws window=32`, `sse`. Runs from before transports existed are `poll`.
    transport: String,
    /// The column's header: the target, then the transport unless it is `poll`, then
    /// the backend and pairs if named.
    name: String,
    /// The backend and pairs part of the name (`redis, 3 pairs`), if any.
    cluster: Option<String>,
}

impl Series {
    fn of(run: &Value) -> Series {
        let target = run["target"].as_str().unwrap_or("");
        let kind = run["transport"].as_str().unwrap_or("poll");
        let transport = match run["ws_window"].as_u64() {
            Some(n) if kind == "ws" => format!("ws window={n}"),
            _ => kind.to_owned(),
        };
        let rank = |list: &[&str], x: &str| list.iter().position(|t| *t == x).unwrap_or(list.len());
        let mut name = if transport == "poll" {
            target.to_owned()
        } else {
            format!("{target} {transport}")
        };
        let backend = run["backend"].as_str().unwrap_or("");
        let pairs = run["urls"].as_u64().unwrap_or(1);
        let cluster = (!backend.is_empty()).then(|| {
            format!(
                "{backend}, {pairs} pair{}",
                if pairs == 1 { "" } else { "s" }
            )
        });
        if let Some(cluster) = &cluster {
            name = format!("{name} {cluster}");
        }
        Series {
            rank: (
                rank(&TARGETS, target),
                rank(&TRANSPORTS, kind),
                usize::from(!backend.is_empty() && backend != EMBEDDED),
                pairs,
            ),
            name,
            transport,
            cluster,
        }
    }
}

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
            "Redis CPU µs per delivered msg (not in the server CPU above)",
            |v| at(v, "/backend_cpu_us_per_msg"),
            1,
            true,
            true,
        ),
        row(
            "**Redis CPU share** (% of servers + Redis)",
            |v| at(v, "/backend_cpu_share").map(|x| x * 100.0),
            1,
            false,
            true,
        ),
        row(
            "servers + Redis CPU µs per delivered msg",
            |v| at(v, "/server_and_backend_cpu_us_per_msg"),
            1,
            true,
            true,
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

fn churn_rows() -> Vec<Row> {
    let row = |title, read, decimals, sum| Row {
        title,
        read,
        decimals,
        ratio: false,
        skip_hello: false,
        sum,
    };
    vec![
        row("sessions per round", |v| at(v, "/churn"), 0, false),
        row("rounds", |v| at(v, "/rounds"), 0, false),
        row(
            "sessions/s (working time)",
            |v| at(v, "/sessions_per_s"),
            0,
            false,
        ),
        row(
            "server RSS before the first round (MiB)",
            |v| at(v, "/rss_before_kb").map(|kb| kb / 1024.0),
            1,
            false,
        ),
        row(
            "server RSS after the first round (MiB)",
            |v| at(v, "/rss_after_first_round_kb").map(|kb| kb / 1024.0),
            1,
            false,
        ),
        row(
            "server RSS after the last round (MiB)",
            |v| at(v, "/rss_after_last_round_kb").map(|kb| kb / 1024.0),
            1,
            false,
        ),
        row(
            "RSS growth per session after the first round (bytes)",
            |v| at(v, "/rss_growth_per_session_bytes"),
            1,
            false,
        ),
        row(
            "**RSS growth per session over the later half of the rounds (bytes)**",
            |v| at(v, "/rss_growth_per_session_later_half_bytes"),
            1,
            false,
        ),
        row(
            "rounds not forgotten within 60 s (sum of runs)",
            |v| {
                let rounds = v.pointer("/rounds_detail")?.as_array()?;
                Some(rounds.iter().filter(|r| r["forgotten"] != true).count() as f64)
            },
            0,
            true,
        ),
        row("lost (sum of runs)", |v| at(v, "/lost"), 0, true),
        row(
            "duplicated (sum of runs)",
            |v| at(v, "/duplicated"),
            0,
            true,
        ),
        row("misrouted (sum of runs)", |v| at(v, "/misrouted"), 0, true),
        row("errors (sum of runs)", |v| at(v, "/errors"), 0, true),
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
            if i > 0 && (digits.len() - i).is_multiple_of(3) {
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
        let mut series: Vec<Series> = of_label
            .iter()
            .map(|r| Series::of(r))
            .filter(|s| s.rank.0 < TARGETS.len())
            .collect();
        series.sort();
        series.dedup();
        let runs_of = |name: &str| -> Vec<&Value> {
            of_label
                .iter()
                .filter(|r| Series::of(r).name == name)
                .copied()
                .collect()
        };
        let _ = writeln!(
            out,
            "### {}\n",
            if label.is_empty() {
                "(no label)"
            } else {
                label
            }
        );
        let runs_note: Vec<String> = series
            .iter()
            .map(|s| format!("{} ×{}", s.name, runs_of(&s.name).len()))
            .collect();
        let _ = writeln!(out, "Runs: {} (medians).\n", runs_note.join(", "));
        let pushed: Vec<&Series> = series
            .iter()
            .filter(|s| s.name.starts_with("micromsg ") && s.transport != "poll")
            .collect();
        if !pushed.is_empty() {
            let _ = writeln!(
                out,
                "Over WebSocket and SSE a \"poll\" is one read of the socket or stream, and the \
                 HTTP requests are the publishers' alone.\n"
            );
        }
        // Ratio columns: (header, numerator, denominator), by series name.
        let has = |name: &str| series.iter().any(|s| s.name == name);
        let mut ratios: Vec<(String, String, String)> = Vec::new();
        for other in ["nchan", "hello"] {
            if has("micromsg") && has(other) {
                ratios.push((format!("micromsg/{other}"), "micromsg".into(), other.into()));
            }
        }
        let reference = format!("micromsg {EMBEDDED}, 1 pair");
        if has(&reference) {
            for s in series
                .iter()
                .filter(|s| s.cluster.is_some() && s.name != reference)
            {
                ratios.push((
                    format!("{}/embedded", s.cluster.as_deref().unwrap_or("")),
                    s.name.clone(),
                    reference.clone(),
                ));
            }
        }
        if has("micromsg") {
            for s in &pushed {
                ratios.push((
                    format!("{}/poll", s.transport),
                    s.name.clone(),
                    "micromsg".into(),
                ));
            }
        }
        let mut header = String::from("| figure |");
        let mut rule = String::from("| --- |");
        for title in series
            .iter()
            .map(|s| &s.name)
            .chain(ratios.iter().map(|r| &r.0))
        {
            let _ = write!(header, " {title} |");
            rule.push_str(" ---: |");
        }
        let _ = writeln!(out, "{header}\n{rule}");
        let rows = if kind("churn") {
            churn_rows()
        } else if kind("idle") {
            idle_rows()
        } else if kind("fanout") {
            fanout_rows()
        } else {
            load_rows()
        };
        for row in rows {
            let figure = |name: &str| -> Option<f64> {
                if row.skip_hello && name == "hello" {
                    return None;
                }
                let values: Vec<f64> = runs_of(name)
                    .into_iter()
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
            let cells: Vec<Option<f64>> = series.iter().map(|s| figure(&s.name)).collect();
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
            for (_, numerator, denominator) in &ratios {
                match (row.ratio, figure(numerator), figure(denominator)) {
                    (true, Some(n), Some(d)) if d != 0.0 => {
                        let _ = write!(line, " {:.2}× |", n / d);
                    }
                    _ => line.push_str(" – |"),
                }
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
    fn transports_get_a_column_each_and_ratios_to_long_polling() {
        let run = |transport: Option<&str>, window: Option<u64>, rate: f64, p99: f64| {
            let mut run = json!({"label": "8: S=100 P=4 over WebSocket and over SSE",
                   "target": "micromsg", "idle": 0, "rate_per_s": rate,
                   "latency_ms": {"p99": p99}, "lost": 0, "disturbed": false});
            if let Some(transport) = transport {
                run["transport"] = json!(transport);
                run["ws_window"] = json!(window);
            }
            run
        };
        let runs = vec![
            // A line from before transports existed reads as long-polling.
            run(None, None, 20000.0, 0.4),
            run(Some("poll"), None, 22000.0, 0.6),
            run(Some("ws"), None, 44000.0, 0.2),
            run(Some("sse"), None, 33000.0, 0.3),
            run(Some("ws"), Some(32), 30000.0, 0.5),
        ];
        let text = markdown(&runs);
        assert!(
            text.contains(
                "| figure | micromsg | micromsg ws | micromsg ws window=32 | micromsg sse \
                 | ws/poll | ws window=32/poll | sse/poll |"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "Runs: micromsg ×2, micromsg ws ×1, micromsg ws window=32 ×1, micromsg sse ×1"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "| delivered msg/s (hello: requests/s) | 21,000 | 44,000 | 30,000 | 33,000 \
                 | 2.10× | 1.43× | 1.57× |"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "| latency p99 ms | 0.500 | 0.200 | 0.500 | 0.300 | 0.40× | 1.00× | 0.60× |"
            ),
            "{text}"
        );
        assert!(text.contains("publishers' alone"), "{text}");
    }

    #[test]
    fn backends_and_pairs_get_a_column_each_and_ratios_to_embedded() {
        let run = |backend: &str, urls: u64, rate: f64, share: Option<f64>| {
            let mut run = json!({"label": "9: cluster", "target": "micromsg", "idle": 0,
                   "transport": "poll", "backend": backend, "urls": urls,
                   "rate_per_s": rate, "server_cpu_us_per_unit": 20.0,
                   "lost": 0, "disturbed": false});
            if let Some(share) = share {
                run["backend_cpu_share"] = json!(share);
                run["backend_cpu_us_per_msg"] = json!(share * 40.0);
            }
            run
        };
        let runs = vec![
            run("redis", 3, 6000.0, Some(0.25)),
            run("embedded", 1, 20000.0, None),
            run("redis", 1, 10000.0, Some(0.2)),
        ];
        let text = markdown(&runs);
        assert!(
            text.contains(
                "| figure | micromsg embedded, 1 pair | micromsg redis, 1 pair \
                 | micromsg redis, 3 pairs | redis, 1 pair/embedded | redis, 3 pairs/embedded |"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "| delivered msg/s (hello: requests/s) | 20,000 | 10,000 | 6000 | 0.50× | 0.30× |"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "| **Redis CPU share** (% of servers + Redis) | – | 20.0 | 25.0 | – | – |"
            ),
            "{text}"
        );
    }

    #[test]
    fn churn_runs_get_their_own_rows() {
        let run = |growth: f64, forgotten: bool| {
            json!({"label": "12: churn", "target": "micromsg", "idle": 0, "churn": 10000,
                   "rounds": 10, "rss_before_kb": 10240, "rss_after_first_round_kb": 20480,
                   "rss_after_last_round_kb": 20480, "rss_growth_per_session_bytes": growth,
                   "rss_growth_per_session_later_half_bytes": growth / 2.0,
                   "rounds_detail": [{"forgotten": true}, {"forgotten": forgotten}],
                   "lost": 0, "disturbed": false})
        };
        let text = markdown(&[run(3.0, true), run(1.0, false), run(2.0, true)]);
        assert!(text.contains("| sessions per round | 10,000 |"), "{text}");
        assert!(
            text.contains("| RSS growth per session after the first round (bytes) | 2.0 |"),
            "{text}"
        );
        assert!(
            text.contains(
                "| **RSS growth per session over the later half of the rounds (bytes)** | 1.0 |"
            ),
            "{text}"
        );
        assert!(
            text.contains("| server RSS after the first round (MiB) | 20.0 |"),
            "{text}"
        );
        assert!(
            text.contains("| rounds not forgotten within 60 s (sum of runs) | 1 |"),
            "{text}"
        );
        assert!(!text.contains("latency p90 ms"), "{text}");
    }

    #[test]
    fn thousands_separators() {
        assert_eq!(format_number(1234567.0, 0), "1,234,567");
        assert_eq!(format_number(999.4, 0), "999");
        assert_eq!(format_number(0.1234, 3), "0.123");
    }
}
