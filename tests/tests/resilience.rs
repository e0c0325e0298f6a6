//! Processes coming and going: the core's socket and privileges, stale and live
//! sockets, a core restart under a running front, SIGTERM on the front.

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use micromsg_e2e::*;
use nix::unistd::{Group, Uid, User};

/// SET from a fresh pair of sessions and read it back.
async fn round_trip(h: &Handler, tag: &str) {
    let (a, b) = (session(&format!("{tag}-a")), session(&format!("{tag}-b")));
    h.set_ok(&a, &b, &json!({"tag": tag})).await;
    assert_eq!(
        h.poll_messages(&b).await,
        Some(vec![json!({"tag": tag, "session_src": a})]),
        "round trip {tag}"
    );
}

/// The four ids of a `Uid:`/`Gid:` line, or the list of a `Groups:` line, of
/// /proc/<pid>/status.
fn proc_status_field(pid: u32, field: &str) -> String {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("reading /proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn socket_is_mode_0770_and_as_root_owned_by_www_data_with_privileges_dropped() {
    let core = Core::start(CoreOptions::default());
    let meta = std::fs::metadata(core.socket()).expect("stat of the socket");
    assert_eq!(
        meta.mode() & 0o7777,
        0o770,
        "socket mode is {:o}",
        meta.mode() & 0o7777
    );
    if !Uid::effective().is_root() {
        println!("not root: ownership and privilege drop not checked");
        return;
    }
    let user = User::from_name("www-data")
        .unwrap()
        .expect("user www-data exists");
    let group = Group::from_name("www-data")
        .unwrap()
        .expect("group www-data exists");
    let (uid, gid) = (user.uid.as_raw(), group.gid.as_raw());
    assert_eq!(
        (uid, gid),
        (33, 33),
        "www-data is 33:33 on Debian and Ubuntu"
    );
    assert_eq!((meta.uid(), meta.gid()), (uid, gid), "socket owner:group");

    // The socket accepts connections a moment before the drop completes.
    let want_ids = format!("{uid} {uid} {uid} {uid}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while proc_status_field(core.pid(), "Uid") != want_ids && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        proc_status_field(core.pid(), "Uid"),
        want_ids,
        "real, effective, saved, fs uid"
    );
    assert_eq!(
        proc_status_field(core.pid(), "Gid"),
        format!("{gid} {gid} {gid} {gid}"),
        "real, effective, saved, fs gid"
    );
    assert_eq!(
        proc_status_field(core.pid(), "Groups"),
        gid.to_string(),
        "supplementary groups"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stale_socket_left_by_sigkill_is_removed_and_msgserver_starts() {
    let mut core = Core::start(CoreOptions::default());
    core.kill();
    assert!(
        core.socket().exists(),
        "SIGKILL leaves the socket file behind"
    );
    core.restart(); // panics with the log if the stale file stops it
    let h = Handler::start(core.socket(), HandlerOptions::default());
    round_trip(&h, "after-stale").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_msgserver_on_a_live_socket_refuses_to_start_and_the_first_keeps_working() {
    let (mut core, h) = start_default();
    round_trip(&h, "before-rival").await;
    let (status, stderr) = core.start_rival(Duration::from_secs(10));
    let status = status.expect("the second msgserver was still running after 10 s");
    assert!(
        !status.success(),
        "the second msgserver exited with {status}; stderr:\n{stderr}"
    );
    let lower = stderr.to_lowercase();
    assert!(
        lower.contains("already running") || lower.contains("in use"),
        "stderr should say the socket is in use / a server is already running:\n{stderr}"
    );
    assert!(core.is_running(), "the first msgserver died");
    assert!(core.socket().exists(), "the rival removed the live socket");
    round_trip(&h, "after-rival").await;
    // A new connection to the socket works too (not only the handler's old ones).
    let h2 = Handler::start(core.socket(), HandlerOptions::default());
    round_trip(&h2, "after-rival-new-conn").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn msghandler_survives_a_core_restart_without_being_restarted() {
    let (mut core, mut h) = start_default(); // poll timeout 1 s
    round_trip(&h, "before").await;
    let handler_pid = h.pid();

    core.kill();
    let (a, b) = (session("down-a"), session("down-b"));
    let started = Instant::now();
    let reply = h.set(&a, &b, &json!({"lost": true})).await;
    let elapsed = started.elapsed();
    assert_error(&reply, "CoreUnavailable");
    assert!(
        elapsed < Duration::from_secs(3),
        "SET with the core down took {elapsed:?}"
    );

    let started = Instant::now();
    let reply = h.poll(&b).await;
    let elapsed = started.elapsed();
    assert_error(&reply, "CoreUnavailable");
    assert!(
        elapsed < Duration::from_secs(4),
        "GET with the core down took {elapsed:?}"
    );

    core.restart();
    let restarted = Instant::now();
    let mut attempts = 0;
    loop {
        attempts += 1;
        let reply = h.set(&a, &b, &json!({"attempt": attempts})).await;
        if reply["status"] == "ok" {
            break;
        }
        assert_error(&reply, "CoreUnavailable");
        assert!(
            restarted.elapsed() < Duration::from_secs(5),
            "msghandler still reports CoreUnavailable {:?} after the core restarted",
            restarted.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "SET succeeded {:?} after the core restart (attempt {attempts})",
        restarted.elapsed()
    );
    assert_eq!(
        h.poll_messages(&b).await,
        Some(vec![json!({"attempt": attempts, "session_src": a})]),
        "exactly the SET that succeeded was queued"
    );
    round_trip(&h, "after").await;
    assert!(h.is_running(), "msghandler exited");
    assert_eq!(h.pid(), handler_pid);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_survive_a_msghandler_restart() {
    let (core, mut h) = start_default();
    let (a, b) = (session("a"), session("b"));
    h.set_ok(&a, &b, &json!({"kept": "by the core"})).await;
    h.kill();
    drop(h);
    let h = Handler::start(core.socket(), HandlerOptions::default());
    assert_eq!(
        h.poll_messages(&b).await,
        Some(vec![json!({"kept": "by the core", "session_src": a})])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_answers_parked_polls_with_null_and_exits_zero() {
    let (_core, mut h) = start(
        CoreOptions::default(),
        HandlerOptions {
            // Long, so that a null reply can only come from the shutdown.
            poll_timeout: 30.0,
            ..Default::default()
        },
    );
    let b = session("b");
    let poll = async {
        let reply = h.poll(&b).await;
        (reply, Instant::now())
    };
    let term = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        h.send_sigterm();
        Instant::now()
    };
    let ((reply, answered_at), sent_at) = tokio::join!(poll, term);
    let latency = answered_at.saturating_duration_since(sent_at);
    println!("parked poll answered {latency:?} after SIGTERM");
    assert_eq!(reply, json!({"messages": null}));
    assert!(
        latency < Duration::from_secs(2),
        "parked poll answered {latency:?} after SIGTERM"
    );

    let status = h
        .wait_exit(Duration::from_secs(6))
        .expect("msghandler still running 6 s after SIGTERM");
    println!("msghandler exited {:?} after SIGTERM", sent_at.elapsed());
    assert_eq!(status.code(), Some(0), "exit status {status}");
}
