//! The operator's command line against a running core (and a handler where the
//! browser's side matters): every subcommand in text and in JSON, with real
//! content, and its errors when there is no core or no permission.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::Output;
use std::time::{Duration, Instant};

use micromsg_e2e::*;
use serde_json::Value;

fn start_with_backend() -> (Core, Handler) {
    start(
        CoreOptions::default(),
        HandlerOptions::default().with_backend_key(),
    )
}

/// The JSON status's `key`, as a number.
fn status_number(core: &Core, key: &str) -> u64 {
    let status = core.msgctl_json(&["status"]);
    status[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no number {key} in {status}"))
}

/// Asks until the status's `key` is `want` (a parked poll takes a moment to reach
/// the core through the handler).
fn wait_for_status(core: &Core, key: &str, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while status_number(core, key) != want {
        assert!(
            Instant::now() < deadline,
            "status {key} never became {want}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The one line of `text` that mentions `what`.
fn line_with<'a>(text: &'a str, what: &str) -> &'a str {
    text.lines()
        .find(|l| l.contains(what))
        .unwrap_or_else(|| panic!("no line with {what:?} in:\n{text}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_numbers_move_as_messages_flow() {
    let (core, h) = start(
        CoreOptions::default().embedded("asserts the status of a memory-only core"),
        HandlerOptions::default(),
    );
    let b = session("b");
    let status = core.msgctl_json(&["status"]);
    assert_eq!(status["ready"], 0, "{status}");
    assert_eq!(status["draining"], false, "{status}");
    assert_eq!(status["storage"], Value::Null, "memory only: {status}");
    assert_eq!(status["protocol"], ipc::PROTOCOL_VERSION, "{status}");
    assert!(
        status["handler_connections"].as_u64().unwrap() >= 1,
        "{status}"
    );
    assert!(status["version"].as_str().is_some_and(|v| !v.is_empty()));

    h.set_ok("a", &b, &json!({"n": 1})).await;
    h.set_ok("a", &b, &json!({"n": 2})).await;
    let status = core.msgctl_json(&["status"]);
    assert_eq!(status["ready"], 2, "{status}");
    let bytes = status["queued_bytes"].as_u64().unwrap();
    assert!(bytes > 2 * "{\"n\":1}".len() as u64, "{status}");

    let (status, text) = core.msgctl(&["status"]);
    assert!(status.success(), "{text}");
    assert!(
        line_with(&text, "queued").contains("2 ready, 0 in flight"),
        "{text}"
    );
    assert!(
        line_with(&text, "storage").contains("memory only"),
        "{text}"
    );
    assert!(line_with(&text, "draining").contains("no"), "{text}");
    let protocol = format!("protocol {}", ipc::PROTOCOL_VERSION);
    assert!(line_with(&text, "version").contains(&protocol), "{text}");

    assert_eq!(h.poll_messages(&b).await.map(|m| m.len()), Some(2));
    let status = core.msgctl_json(&["status"]);
    assert_eq!(
        (status["ready"].clone(), status["queued_bytes"].clone()),
        (json!(0), json!(0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_of_a_durable_core_shows_its_storage() {
    let (core, h) = start(
        CoreOptions {
            durable: true,
            ..CoreOptions::default()
        },
        HandlerOptions::default(),
    );
    h.set_ok("a", &session("b"), &json!({"n": 1})).await;
    let status = core.msgctl_json(&["status"]);
    let storage = &status["storage"];
    assert_eq!(
        storage["data_dir"],
        json!(core.data_dir().display().to_string())
    );
    assert_eq!(storage["fsync"], "always", "{status}");
    assert!(storage["log_bytes"].as_u64().unwrap() > 0, "{status}");
    let (_, text) = core.msgctl(&["status"]);
    let line = line_with(&text, "storage");
    assert!(
        line.contains(&core.data_dir().display().to_string()) && line.contains("fsync always"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_lists_each_session_with_its_depth_deepest_first() {
    let (core, h) = start_default();
    let (b, c) = (session("deep"), session("shallow"));
    for n in 0..3 {
        h.set_ok("a", &b, &json!({"n": n})).await;
    }
    h.set_ok("a", &c, &json!({"n": 0})).await;

    let listed = core.msgctl_json(&["sessions"]);
    let sessions = listed["sessions"].as_array().unwrap();
    assert_eq!(sessions[0]["session"], json!(b), "{listed}");
    assert_eq!(sessions[0]["ready"], 3, "{listed}");
    assert_eq!(sessions[1]["session"], json!(c), "{listed}");
    assert_eq!(sessions[1]["ready"], 1, "{listed}");
    assert_eq!(sessions[0]["parked_poll"], false);

    let limited = core.msgctl_json(&["sessions", "--limit", "1"]);
    assert_eq!(
        limited["sessions"].as_array().unwrap().len(),
        1,
        "{limited}"
    );
    assert_eq!(limited["total"], listed["total"], "{limited}");

    let (status, text) = core.msgctl(&["sessions", "--limit", "1"]);
    assert!(status.success(), "{text}");
    assert!(text.starts_with("SESSION"), "a header first: {text}");
    let row: Vec<&str> = line_with(&text, &b).split_whitespace().collect();
    assert_eq!(&row[..3], [b.as_str(), "3", "0"], "{text}");
    assert!(!text.contains(&c), "bounded by --limit: {text}");
    assert!(
        text.contains(&format!("1 of {} session(s)", listed["total"])),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peek_shows_the_bodies_without_delivering_them() {
    let (core, h) = start_default();
    let b = session("b");
    let long = "x".repeat(300);
    let first = h.set_ok("a", &b, &json!({"text": "hello"})).await;
    h.set_ok("a", &b, &json!({"text": long})).await;

    let peeked = core.msgctl_json(&["peek", &b]);
    assert_eq!(peeked["total"], 2, "{peeked}");
    let messages = peeked["messages"].as_array().unwrap();
    assert_eq!(messages[0]["id"], first);
    assert_eq!(
        messages[0]["body"],
        json!({"text": "hello", "session_src": "a"})
    );
    assert_eq!(messages[0]["in_flight"], false);
    assert_eq!(messages[1]["body"]["text"], json!(long), "whole in JSON");
    assert!(messages[1]["bytes"].as_u64().unwrap() > 300);

    let (status, text) = core.msgctl(&["peek", &b]);
    assert!(status.success(), "{text}");
    assert!(
        text.contains(&format!("2 message(s) waiting for {b}")),
        "{text}"
    );
    assert!(
        line_with(&text, &first.to_string()).contains(r#"{"text":"hello""#),
        "{text}"
    );
    let cut = line_with(&text, "xxxx");
    assert!(
        cut.ends_with('…') && !cut.contains(&long),
        "truncated: {text}"
    );

    let limited = core.msgctl_json(&["peek", &b, "--limit", "1"]);
    assert_eq!(
        limited["messages"].as_array().unwrap().len(),
        1,
        "{limited}"
    );

    // Nothing was delivered or changed: both are still there, in order.
    let given = h.poll_messages(&b).await.unwrap();
    assert_eq!(given.len(), 2);
    assert_eq!(given[0]["text"], "hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purge_empties_a_session_for_good_and_a_poll_then_gets_nothing() {
    let (mut core, h) = start(
        CoreOptions {
            durable: true,
            ..CoreOptions::default()
        },
        HandlerOptions::default(),
    );
    let (b, c) = (session("b"), session("c"));
    h.set_ok("a", &b, &json!({"n": 1})).await;
    h.set_ok("a", &b, &json!({"n": 2})).await;
    h.set_ok("a", &c, &json!({"kept": true})).await;

    let (status, text) = core.msgctl(&["purge", &b]);
    assert!(status.success(), "{text}");
    assert!(
        text.contains(&format!("purged 2 message(s) waiting for {b}")),
        "{text}"
    );
    assert_eq!(
        core.msgctl_json(&["purge", &b]),
        json!({"session": b, "purged": 0})
    );
    assert_eq!(status_number(&core, "ready"), 1, "c keeps its own");

    // Journaled: a restart does not bring them back.
    core.restart();
    assert_eq!(h.poll_messages(&b).await, None);
    assert_eq!(h.poll_messages(&c).await.map(|m| m.len()), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kick_answers_the_parked_poll_kicked_and_refuses_the_next() {
    let (core, h) = start_default();
    let h = std::sync::Arc::new(h);
    let (b, c) = (session("b"), session("c"));
    let parked = tokio::spawn({
        let (h, b) = (h.clone(), b.clone());
        async move { h.poll(&b).await }
    });
    wait_for_status(&core, "parked_polls", 1);
    let (status, text) = core.msgctl(&["kick", &b, "--reason", "maintenance"]);
    assert!(status.success(), "{text}");
    assert!(
        text.contains(&format!("kicked {b}: 0 message(s) dropped")),
        "{text}"
    );
    // The core answers the parked poll at once (msghandler then holds a refused
    // x0 poll for its poll timeout, so that the tab does not spin).
    assert_eq!(status_number(&core, "parked_polls"), 0);
    assert_error(&parked.await.unwrap(), "Kicked");
    assert_error(&h.poll(&b).await, "Kicked");

    h.set_ok("a", &c, &json!({"n": 1})).await;
    assert_eq!(
        core.msgctl_json(&["kick", &c]),
        json!({"session": c, "kicked": true, "dropped": 1})
    );
    assert_error(&h.poll(&c).await, "Kicked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_refuses_new_messages_while_polls_empty_the_queue() {
    let (core, h) = start_with_backend();
    let b = session("b");
    h.set_ok("a", &b, &json!({"n": 1})).await;
    h.set_ok("a", &b, &json!({"n": 2})).await;

    let (status, text) = core.msgctl(&["drain"]);
    assert!(status.success() && text.contains("draining"), "{text}");
    assert_eq!(core.msgctl_json(&["status"])["draining"], true);
    // x0: the error body with HTTP 200; /v1: 503.
    let refused = h.set("a", &b, &json!({"n": 3})).await;
    assert!(
        assert_error(&refused, "Draining").contains("draining"),
        "{refused}"
    );
    let v1 = h
        .v1(
            "/v1/publish",
            json!({"session": "a", "target": {"session": b}, "data": {"n": 4}}),
        )
        .await;
    assert_v1_error(&v1, StatusCode::SERVICE_UNAVAILABLE, "Draining");

    // drain --wait returns once a poll has emptied the queue.
    let mut wait = core.msgctl_command();
    wait.args(["drain", "--wait", "--timeout", "20"]);
    let waiting = std::thread::spawn(move || wait.output().unwrap());
    std::thread::sleep(Duration::from_millis(300));
    assert!(!waiting.is_finished(), "two messages still wait");
    let given = h.poll_messages(&b).await.unwrap();
    assert_eq!(given.len(), 2, "polls go on while draining: {given:?}");
    let Output { status, stdout, .. } = waiting.join().unwrap();
    let stdout = String::from_utf8_lossy(&stdout);
    assert!(status.success(), "{stdout}");
    assert!(stdout.contains("waiting: 2 ready, 0 in flight"), "{stdout}");
    assert!(stdout.contains("drained"), "{stdout}");

    // Already empty: --json answers at once with one document.
    let drained = core.msgctl_json(&["drain", "--wait"]);
    assert_eq!(
        (drained["draining"].clone(), drained["drained"].clone()),
        (json!(true), json!(true))
    );

    assert_eq!(
        core.msgctl_json(&["drain", "--cancel"]),
        json!({"draining": false})
    );
    h.set_ok("a", &b, &json!({"n": 5})).await;
    assert_eq!(core.msgctl_json(&["status"])["draining"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_wait_gives_up_after_its_timeout_with_exit_status_2() {
    let (core, h) = start_default();
    h.set_ok("a", &session("b"), &json!({"n": 1})).await;
    let started = Instant::now();
    let (status, text) = core.msgctl(&["drain", "--wait", "--timeout", "0.5"]);
    assert_eq!(status.code(), Some(2), "{text}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(text.contains("still 1 ready and 0 in flight"), "{text}");
    // The core keeps draining until told otherwise.
    assert_eq!(core.msgctl_json(&["status"])["draining"], true);
}

#[test]
fn every_subcommand_says_plainly_when_there_is_no_core() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing-admin.sock");
    for args in [
        &["status"][..],
        &["sessions"],
        &["peek", "s"],
        &["purge", "s"],
        &["kick", "s"],
        &["drain"],
        &["--json", "status"],
    ] {
        let output = std::process::Command::new(&binaries().msgctl)
            .arg("--admin-socket")
            .arg(&missing)
            .args(args)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains(&format!("no admin socket at {}", missing.display())),
            "{args:?}: {stderr}"
        );
        assert!(output.stdout.is_empty(), "{args:?}: nothing on stdout");
    }
}

#[test]
fn admin_subcommands_refuse_a_user_without_permission() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("NOTICE: skipped: needs root to run msgctl as nobody");
        return;
    }
    let core = Core::start(CoreOptions::default());
    std::fs::set_permissions(core.dir(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
    for args in [&["status"][..], &["peek", "s"], &["purge", "s"], &["drain"]] {
        let output = core
            .msgctl_command()
            .args(args)
            .uid(nobody.uid.as_raw())
            .gid(nobody.gid.as_raw())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.contains("permission denied on") && stderr.contains("admin_uids"),
            "{args:?}: {stderr}"
        );
    }
    assert_eq!(
        core.msgctl_json(&["status"])["draining"],
        false,
        "nothing changed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_requests_are_refused_on_the_handlers_socket() {
    use futures_util::{SinkExt, StreamExt};
    use ipc::{
        AdminRequest, ClientFrame, FrameCodec, Hello, Request, Response, Role, ServerFrame, Welcome,
    };
    use tokio_util::codec::{FramedRead, FramedWrite};

    let core = Core::start(CoreOptions::default());
    // msghandler's own door: whoever can reach it (www-data) must not drain,
    // purge or peek.
    let stream = tokio::net::UnixStream::connect(core.socket())
        .await
        .unwrap();
    let (read_half, write_half) = stream.into_split();
    let mut reader = FramedRead::new(read_half, FrameCodec::<Welcome, Hello>::new());
    let mut writer = FramedWrite::new(write_half, FrameCodec::<Welcome, Hello>::new());
    writer.send(Hello::new(Role::Handler)).await.unwrap();
    let welcome = reader.next().await.unwrap().unwrap();
    assert!(matches!(welcome, Welcome::Accepted { .. }), "{welcome:?}");
    let mut reader = reader.map_decoder(|c| c.retype::<ServerFrame, ClientFrame>());
    let mut writer = writer.map_encoder(|c| c.retype::<ServerFrame, ClientFrame>());
    for (id, request) in [
        AdminRequest::Drain { draining: true },
        AdminRequest::Purge {
            session: "s".into(),
        },
        AdminRequest::Status,
    ]
    .into_iter()
    .enumerate()
    {
        let request = Request::Admin(request);
        let id = id as u64 + 1;
        writer.send(ClientFrame { id, request }).await.unwrap();
        let frame = reader.next().await.unwrap().unwrap();
        assert_eq!(frame.id, id);
        match frame.response {
            Response::Error(e) => {
                assert_eq!(e.kind, ipc::ErrorKind::InvalidRequest);
                assert!(e.message.contains("admin socket"), "{}", e.message);
            }
            other => panic!("an admin request was served on the main socket: {other:?}"),
        }
    }
    assert_eq!(core.msgctl_json(&["status"])["draining"], false);
}
