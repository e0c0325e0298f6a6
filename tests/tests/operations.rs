//! What an operator runs against: /healthz and /readyz, /metrics from both
//! processes and who may read it, `--check-config` on both binaries, and JSON logs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Why the metrics tests scrape msghandler directly in a run through nginx.
const METRICS_DIRECT: &str =
    "/metrics is for operators at msghandler's own address; the nginx site refuses it";

use micromsg_e2e::*;

/// A secret for `auth = "token"`: the operator's endpoints must not need a token.
const TOKEN_SECRET: &str = "an-hs256-secret-of-at-least-thirty-two-bytes";

async fn get(h: &Handler, path: &str) -> Reply {
    h.request(Method::GET, path, &[], "").await
}

/// Asks `path` until its status is `want` (or fails after `within`).
async fn eventually_status(h: &Handler, path: &str, want: StatusCode, within: Duration) -> Reply {
    let deadline = Instant::now() + within;
    loop {
        let reply = get(h, path).await;
        if reply.status == want || Instant::now() >= deadline {
            assert_eq!(reply.status, want, "{path}: {}", reply.text());
            return reply;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The value of the series `series` (name and labels exactly as exposed) in a
/// scrape, 0 when it is absent (a labelled counter appears once it has counted).
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse().expect("a sample value is a number"))
        })
        .unwrap_or(0.0)
}

async fn scrape(h: &Handler) -> String {
    let reply = get(h, "/metrics").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert!(
        reply
            .header("content-type")
            .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "{:?}",
        reply.header("content-type")
    );
    reply.text()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_the_core_while_healthz_never_asks_it_and_neither_needs_a_token() {
    let mut core = Core::start(CoreOptions::default());
    let h = Handler::start(
        core.socket(),
        HandlerOptions {
            extra_toml: format!("auth = \"token\"\ntoken_secret = \"{TOKEN_SECRET}\"\n"),
            ..HandlerOptions::default()
        },
    );
    // Token mode is on: a client path without a token is refused...
    let refused = h.post("/get", &x0_get_body("S")).await;
    assert_eq!(refused.status, StatusCode::OK);
    assert_ne!(refused.json()["error"], json!(null), "{}", refused.text());
    // ...and the operator's are not.
    let health = get(&h, "/healthz").await;
    assert_eq!(
        (health.status, health.json()),
        (StatusCode::OK, json!({"status": "ok"}))
    );
    eventually_status(&h, "/readyz", StatusCode::OK, Duration::from_secs(5)).await;
    // Scraped at msghandler itself; the nginx site refuses it (tests/tests/nginx.rs).
    let metrics = if h.via_nginx() {
        StatusCode::FORBIDDEN
    } else {
        StatusCode::OK
    };
    assert_eq!(get(&h, "/metrics").await.status, metrics);

    core.terminate(Duration::from_secs(10));
    let down = eventually_status(
        &h,
        "/readyz",
        StatusCode::SERVICE_UNAVAILABLE,
        Duration::from_secs(5),
    )
    .await;
    assert_error(&down.json(), "CoreUnavailable");
    assert_eq!(get(&h, "/healthz").await.status, StatusCode::OK);
    // A scrape still answers, with msghandler's side only.
    if !h.via_nginx() {
        let text = scrape(&h).await;
        assert_eq!(sample(&text, "micromsg_core_up"), 0.0, "{text}");
    }

    core.restart();
    eventually_status(&h, "/readyz", StatusCode::OK, Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_by_what_flowed_through_both_processes() {
    let (_core, h) = start(
        CoreOptions {
            delivery: Some("ack".into()),
            durable: true,
            fsync: Some("always".into()),
            ..CoreOptions::default()
        },
        HandlerOptions::default().direct(METRICS_DIRECT),
    );
    let before = scrape(&h).await;
    assert_eq!(sample(&before, "micromsg_core_up"), 1.0, "{before}");
    let (a, b) = (session("ops-a"), session("ops-b"));
    for n in 0..3 {
        h.set_ok(&a, &b, &json!({"n": n})).await;
    }
    assert_eq!(h.poll_messages(&b).await.map(|m| m.len()), Some(3));
    h.del_ok(&b).await;
    let missing = get(&h, "/nope").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    let after = scrape(&h).await;

    let moved = |series: &str| sample(&after, series) - sample(&before, series);
    assert_eq!(moved("micromsg_core_published_total"), 3.0, "{after}");
    assert_eq!(moved("micromsg_core_delivered_total"), 3.0, "{after}");
    assert_eq!(moved("micromsg_core_acknowledged_total"), 3.0, "{after}");
    assert_eq!(moved("micromsg_core_redelivered_total"), 0.0, "{after}");
    assert_eq!(
        sample(&after, "micromsg_core_queue_depth{state=\"ready\"}"),
        0.0
    );
    assert_eq!(
        sample(&after, "micromsg_core_queue_depth{state=\"in_flight\"}"),
        0.0
    );
    // Three SETs, one GET, one DEL; the first scrape is counted too.
    assert_eq!(
        moved("micromsg_http_responses_total{route=\"x0\",status=\"200\"}"),
        5.0,
        "{after}"
    );
    assert_eq!(
        moved("micromsg_http_responses_total{route=\"other\",status=\"404\"}"),
        1.0
    );
    assert_eq!(
        moved("micromsg_http_responses_total{route=\"metrics\",status=\"200\"}"),
        1.0
    );
    // Every SET and the DEL was a round trip (the poll is not one).
    assert!(
        moved("micromsg_ipc_round_trip_seconds_count") >= 4.0,
        "{after}"
    );
    // Durable with fsync = "always": every SET waited for an fsync.
    assert!(moved("micromsg_core_fsync_seconds_count") >= 1.0, "{after}");
    assert!(
        sample(&after, "micromsg_core_journal_bytes") > 0.0,
        "{after}"
    );
    assert!(
        sample(&after, "micromsg_http_connections") >= 1.0,
        "{after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_refused_to_an_address_metrics_allow_does_not_name() {
    let (_core, h) = start(
        CoreOptions::default(),
        HandlerOptions {
            extra_toml: "metrics_allow = [\"10.0.0.0/8\"]\n".into(),
            ..HandlerOptions::default()
        }
        .direct(METRICS_DIRECT),
    );
    let refused = get(&h, "/metrics").await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN, "{}", refused.text());
    assert_error(&refused.json(), "Forbidden");
    assert!(!refused.text().contains("micromsg_"));
    assert_eq!(get(&h, "/healthz").await.status, StatusCode::OK);
}

fn example(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../etc")
        .join(name)
}

/// Runs `bin --config <file> --check-config` with no `MICROMSG_*` variable from
/// the environment but `env`; returns (success, stdout, stderr).
fn check_config(bin: &Path, file: &Path, env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(bin);
    cmd.arg("--config")
        .arg(file)
        .arg("--check-config")
        .stdin(Stdio::null());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("MICROMSG_") {
            cmd.env_remove(key);
        }
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().expect("running --check-config");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_config_passes_the_examples_and_fails_naming_what_is_wrong() {
    let bins = binaries();
    let dir = tempfile::tempdir().unwrap();
    for (bin, file) in [
        (&bins.msgserver, "msgserver.toml"),
        (&bins.msghandler, "msghandler.toml"),
    ] {
        // Unrelated variables with the prefix are left alone, and said so.
        let (ok, out, err) = check_config(bin, &example(file), &[("MICROMSG_BIN_DIR", "/x")]);
        assert!(ok, "{file}: {err}");
        assert!(out.starts_with("configuration OK"), "{out}");
        assert!(out.contains("MICROMSG_BIN_DIR"), "{out}");

        let typo = dir.path().join(format!("typo-{file}"));
        std::fs::write(&typo, "poll_timout = 3\n").unwrap();
        let (ok, out, err) = check_config(bin, &typo, &[]);
        assert!(!ok, "{file}: {out}");
        assert!(err.contains("unknown key `poll_timout`"), "{file}: {err}");
        assert!(!out.contains("configuration OK"));
    }
    let server_bad = [
        "socket_mode = \"0999\"\n",
        "admin_socket_mode = \"0777\"\n",
        "delivery = \"sometimes\"\n",
        "log = \"info,=[\"\n",
        "[[channels]]\npattern = \"a..b\"\n",
    ];
    let handler_bad = [
        "cors_allowed_origins = [\"https://ok.example\", \"bad\\norigin\"]\n",
        "trusted_proxies = [\"not-an-address\"]\n",
        "metrics_allow = [\"localhost\"]\n",
        "backend_key_file = \"/nonexistent/backend.key\"\n",
        "auth = \"token\"\n",
        "auth = \"token\"\ntoken_algorithm = \"EdDSA\"\ntoken_public_key_file = \"/nonexistent.pem\"\n",
        "log_format = \"yaml\"\n",
        "ws_ping_interval = 0\n",
    ];
    for (bin, cases) in [
        (&bins.msgserver, &server_bad[..]),
        (&bins.msghandler, &handler_bad[..]),
    ] {
        for (i, case) in cases.iter().enumerate() {
            let file = dir.path().join(format!("bad-{i}.toml"));
            std::fs::write(&file, case).unwrap();
            let (ok, out, err) = check_config(bin, &file, &[]);
            assert!(!ok, "{} accepted {case:?}: {out}", bin.display());
            assert!(!err.is_empty(), "{case:?}: no error shown");
        }
    }
    // An environment override is checked like the file.
    let (ok, _, err) = check_config(
        &bins.msgserver,
        &example("msgserver.toml"),
        &[("MICROMSG_VISIBILITY_TIMEOUT", "-5")],
    );
    assert!(!ok && err.contains("visibility_timeout"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_are_one_object_per_line_without_colour() {
    let json_logs = "log_format = \"json\"\n".to_owned();
    let (core, h) = start(
        CoreOptions {
            extra_toml: json_logs.clone(),
            ..CoreOptions::default()
        },
        HandlerOptions {
            extra_toml: json_logs,
            ..HandlerOptions::default()
        },
    );
    let (a, b) = (session("log-a"), session("log-b"));
    h.set_ok(&a, &b, &json!({"x": 1})).await;
    assert!(h.poll_messages(&b).await.is_some());
    for (who, log) in [("msgserver", core.log()), ("msghandler", h.log())] {
        // The harness writes a "===== banner =====" line before each start.
        let lines: Vec<&str> = log
            .lines()
            .filter(|l| !l.starts_with("=====") && !l.is_empty())
            .collect();
        assert!(!lines.is_empty(), "{who} logged nothing");
        for line in lines {
            assert!(!line.contains('\u{1b}'), "{who}: colour codes in {line:?}");
            let object: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{who}: not JSON ({e}): {line:?}"));
            assert!(object["level"].is_string(), "{who}: {line}");
            assert!(object["timestamp"].is_string(), "{who}: {line}");
        }
    }
}
