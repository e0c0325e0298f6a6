//! Durable, acknowledged delivery under faults: a steady publish and poll load runs
//! while msgserver or msghandler is killed (SIGKILL) or stopped (SIGTERM) and
//! started again, and the ledger of what clients were told must add up:
//!
//! * every publish answered "ok" is delivered at least once (lost = 0);
//! * nothing is delivered again after its acknowledgement was confirmed;
//! * per session, first deliveries come in publish order;
//! * with SIGTERM, exactly once: no duplicates either.
//!
//! Each test prints its counts.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use micromsg_e2e::*;

const PUBLISHERS: usize = 4;

/// How a subscriber acknowledges.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Acks {
    /// x0: asking again acknowledges the previous batch.
    NextPoll,
    /// `"auto_ack":false` polls and a `DEL` with the ids.
    ById,
}

type Key = (usize, u64);

#[derive(Debug, Default)]
struct Ledger {
    ok: HashSet<Key>,
    failed_publishes: u64,
    deliveries: u64,
    delivered: HashMap<Key, u32>,
    confirmed_acked: HashSet<Key>,
    delivered_after_ack: u64,
    order_violations: u64,
    /// Highest sequence number first-delivered, per publisher.
    high_water: HashMap<usize, u64>,
}

impl Ledger {
    fn deliver(&mut self, key: Key) {
        self.deliveries += 1;
        if self.confirmed_acked.contains(&key) {
            self.delivered_after_ack += 1;
        }
        let count = self.delivered.entry(key).or_insert(0);
        *count += 1;
        if *count == 1 {
            let high = self.high_water.entry(key.0).or_insert(0);
            if key.1 < *high {
                self.order_violations += 1;
            }
            *high = (*high).max(key.1);
        }
    }

    fn lost(&self) -> usize {
        self.ok
            .iter()
            .filter(|k| !self.delivered.contains_key(k))
            .count()
    }

    fn duplicates(&self) -> u64 {
        self.delivered.values().map(|&n| u64::from(n) - 1).sum()
    }

    fn lost_keys(&self) -> Vec<Key> {
        let mut lost: Vec<Key> = self
            .ok
            .iter()
            .filter(|k| !self.delivered.contains_key(k))
            .copied()
            .collect();
        lost.sort();
        lost.truncate(20);
        lost
    }

    /// Prints the counts and checks what every fault must leave intact: nothing
    /// answered "ok" lost, nothing delivered after a confirmed ack, first
    /// deliveries in publish order; `disturbances` faults happened under real load.
    fn assert_at_least_once(&self, what: &str, disturbances: u32) {
        self.report(what);
        assert!(disturbances >= 3, "{what}: only {disturbances} faults");
        assert!(self.ok.len() > 100, "too little load to mean anything");
        assert_eq!(self.lost(), 0, "publishes answered ok but never delivered");
        assert_eq!(
            self.delivered_after_ack, 0,
            "delivered after a confirmed ack"
        );
        assert_eq!(
            self.order_violations, 0,
            "first deliveries out of publish order"
        );
    }

    fn report(&self, what: &str) {
        println!(
            "{what}: published ok {}, publishes failed {}, deliveries {}, distinct delivered {}, \
             acks confirmed {}, duplicates {}, delivered after ack {}, order violations {}, lost {}",
            self.ok.len(),
            self.failed_publishes,
            self.deliveries,
            self.delivered.len(),
            self.confirmed_acked.len(),
            self.duplicates(),
            self.delivered_after_ack,
            self.order_violations,
            self.lost()
        );
        if self.lost() > 0 {
            println!("first lost (publisher, sequence): {:?}", self.lost_keys());
        }
    }
}

struct Load {
    addr: Mutex<SocketAddr>,
    publishing: AtomicBool,
    running: AtomicBool,
    ledger: Mutex<Ledger>,
}

impl Load {
    fn addr(&self) -> SocketAddr {
        *self.addr.lock().unwrap()
    }
}

fn key_of(message: &Value) -> Key {
    (
        message["p"].as_u64().expect("p") as usize,
        message["k"].as_u64().expect("k"),
    )
}

async fn publisher(load: Arc<Load>, p: usize) {
    let mut k = 1u64;
    while load.publishing.load(Ordering::Relaxed) {
        let body = json!({
            "session_src": format!("pub-{p}"),
            "session_dst": format!("sub-{p}"),
            "payload": {"p": p, "k": k},
        });
        match try_post(load.addr(), "/set", body.to_string()).await {
            Ok(reply) if reply["status"] == "ok" => {
                load.ledger.lock().unwrap().ok.insert((p, k));
            }
            _ => {
                load.ledger.lock().unwrap().failed_publishes += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        k += 1;
    }
}

async fn subscriber(load: Arc<Load>, p: usize, acks: Acks) {
    let session = format!("sub-{p}");
    let mut previous: Vec<Key> = Vec::new();
    while load.running.load(Ordering::Relaxed) {
        let mut body = json!({"type": "GET", "session_src": session});
        if acks == Acks::ById {
            body["auto_ack"] = json!(false);
        }
        let reply = match try_post(load.addr(), "/get", body.to_string()).await {
            Ok(reply) if reply.get("error").is_none() => reply,
            _ => {
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let batch: Vec<Key> = messages_of(&reply)
            .unwrap_or_default()
            .iter()
            .map(key_of)
            .collect();
        {
            let mut ledger = load.ledger.lock().unwrap();
            if acks == Acks::NextPoll {
                // This poll acknowledged the previous batch, except what it gave
                // again (its ack was lost with a core that died before syncing it).
                let again: HashSet<&Key> = batch.iter().collect();
                for key in previous.drain(..) {
                    if !again.contains(&key) {
                        ledger.confirmed_acked.insert(key);
                    }
                }
            }
            for key in &batch {
                ledger.deliver(*key);
            }
        }
        match acks {
            Acks::NextPoll => previous = batch,
            Acks::ById if batch.is_empty() => {}
            Acks::ById => {
                let ids = reply["ids"].clone();
                let del = json!({"type": "DEL", "session_src": session, "ids": ids});
                if let Ok(reply) = try_post(load.addr(), "/del", del.to_string()).await
                    && reply["status"] == "ok"
                {
                    load.ledger.lock().unwrap().confirmed_acked.extend(batch);
                }
            }
        }
    }
}

/// Runs the load for `duration` while `disturb` is called every `every`, then
/// drains until everything answered "ok" is delivered or `drain` has passed.
async fn run_load(
    addr: SocketAddr,
    acks: &[Acks],
    duration: Duration,
    every: Duration,
    mut disturb: impl FnMut(&Load),
) -> Arc<Load> {
    let load = Arc::new(Load {
        addr: Mutex::new(addr),
        publishing: AtomicBool::new(true),
        running: AtomicBool::new(true),
        ledger: Mutex::new(Ledger::default()),
    });
    let mut tasks = Vec::new();
    for p in 0..PUBLISHERS {
        tasks.push(tokio::spawn(publisher(load.clone(), p)));
        tasks.push(tokio::spawn(subscriber(
            load.clone(),
            p,
            acks[p % acks.len()],
        )));
    }
    let started = Instant::now();
    let mut next = started + every;
    while started.elapsed() < duration {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if Instant::now() >= next {
            tokio::task::block_in_place(|| disturb(&load));
            next = Instant::now() + every;
        }
    }
    load.publishing.store(false, Ordering::Relaxed);
    let drain = Instant::now();
    while drain.elapsed() < Duration::from_secs(20) && load.ledger.lock().unwrap().lost() > 0 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A little longer, so that a redelivery of something acknowledged would show.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    load.running.store(false, Ordering::Relaxed);
    for task in tasks {
        task.await.expect("load task");
    }
    load
}

fn durable_core(delivery: &str, fsync: &str) -> CoreOptions {
    CoreOptions {
        delivery: Some(delivery.into()),
        durable: true,
        fsync: Some(fsync.into()),
        visibility_timeout: Some(2.0),
        mailbox_max_len: Some(1_000_000),
        // Redelivery counts start again after each restart anyway; this test is
        // about loss, not poison messages.
        extra_toml: "max_deliveries = 0\n".into(),
        ..CoreOptions::default()
    }
}

fn patient_handler() -> HandlerOptions {
    HandlerOptions {
        poll_timeout: 0.5,
        // Long enough to wait out a restart, so publishes are retried, not failed.
        extra_toml: "core_wait = 5.0\n".into(),
        ..HandlerOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_msgserver_under_load_loses_nothing_answered_ok() {
    let mut core = Core::start(durable_core("ack", "always"));
    let h = Handler::start(core.socket(), patient_handler());
    let mut kills = 0;
    let load = run_load(
        h.addr(),
        &[Acks::NextPoll, Acks::ById],
        Duration::from_secs(7),
        Duration::from_millis(1500),
        |_| {
            core.restart();
            kills += 1;
        },
    )
    .await;
    let ledger = load.ledger.lock().unwrap();
    ledger.assert_at_least_once(&format!("msgserver SIGKILLed {kills} times"), kills);
    assert!(h.log().contains("connected to msgserver"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_msghandler_under_load_loses_nothing_answered_ok() {
    let core = Core::start(durable_core("ack", "always"));
    let mut handler = Handler::start(core.socket(), patient_handler());
    let mut kills = 0;
    let load = run_load(
        handler.addr(),
        &[Acks::NextPoll, Acks::ById],
        Duration::from_secs(7),
        Duration::from_millis(1500),
        |load| {
            handler.kill();
            handler = Handler::start(core.socket(), patient_handler());
            *load.addr.lock().unwrap() = handler.addr();
            kills += 1;
        },
    )
    .await;
    let ledger = load.ledger.lock().unwrap();
    ledger.assert_at_least_once(&format!("msghandler SIGKILLed {kills} times"), kills);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_of_msgserver_under_load_delivers_exactly_once() {
    // fsync never: a clean stop must persist everything by itself. x0 delivery, so
    // that nothing is in flight unacknowledged when the core stops.
    let mut core = Core::start(durable_core("x0", "never"));
    let h = Handler::start(core.socket(), patient_handler());
    let mut stops = 0;
    let load = run_load(
        h.addr(),
        &[Acks::NextPoll],
        Duration::from_secs(7),
        Duration::from_millis(1500),
        |_| {
            let status = core.terminate(Duration::from_secs(10));
            assert!(
                status.success(),
                "msgserver exited with {status} on SIGTERM"
            );
            core.restart();
            stops += 1;
        },
    )
    .await;
    let ledger = load.ledger.lock().unwrap();
    ledger.assert_at_least_once(
        &format!("msgserver stopped with SIGTERM {stops} times"),
        stops,
    );
    // A clean stop promises more: exactly once, and no publish fails.
    assert_eq!(
        ledger.failed_publishes, 0,
        "publishes failed across a clean restart"
    );
    assert_eq!(ledger.duplicates(), 0, "delivered more than once");
    assert!(core.log().contains("storage flushed"), "{}", core.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_survive_a_restart_and_ids_keep_increasing() {
    let mut core = Core::start(durable_core("ack", "always"));
    let h = Handler::start(core.socket(), patient_handler());
    let (a, b) = (session("a"), session("b"));
    let first = h.set_ok(&a, &b, &json!({"n": 1})).await;
    let second = h.set_ok(&a, &b, &json!({"n": 2})).await;
    core.restart();
    let reply = h.poll(&b).await;
    assert_eq!(
        messages_of(&reply),
        Some(vec![
            json!({"n": 1, "session_src": a}),
            json!({"n": 2, "session_src": a})
        ])
    );
    assert_eq!(reply["ids"], json!([first, second]));
    let third = h.set_ok(&a, &b, &json!({"n": 3})).await;
    assert!(third > second, "{third} after {second}");

    // The kill left the zeros preallocated ahead of the records, which the restart
    // cut; a clean stop cuts them itself.
    let status = core.terminate(Duration::from_secs(10));
    assert!(
        status.success(),
        "msgserver exited with {status} on SIGTERM"
    );
    let on_disk = dir_bytes(&core.data_dir());
    assert!(
        (1..4096).contains(&on_disk),
        "{on_disk} bytes on disk for three small messages after a clean stop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_retried_with_its_msg_id_is_stored_once_even_across_a_restart() {
    let mut core = Core::start(durable_core("x0", "always"));
    let h = Handler::start(core.socket(), patient_handler());
    let (a, b) = (session("a"), session("b"));
    let body =
        json!({"session_src": a, "session_dst": b, "payload": {"n": 1}, "msg_id": "order-17"});
    let (_, _, first) = h.post_json("/set", &body.to_string()).await;
    let id = assert_ok_with_id(&first, "first SET");
    core.restart();
    let (_, _, again) = h.post_json("/set", &body.to_string()).await;
    assert_eq!(assert_ok_with_id(&again, "retried SET"), id);
    assert_eq!(again["duplicate"], true, "{again}");
    assert_eq!(
        h.poll_messages(&b).await,
        Some(vec![json!({"n": 1, "session_src": a})])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_never_acknowledged_becomes_a_dead_letter_that_msgctl_lists_replays_and_purges() {
    let mut options = durable_core("ack", "always");
    options.visibility_timeout = Some(0.2);
    options.extra_toml = "max_deliveries = 2\n".into();
    let mut core = Core::start(options);
    let h = Handler::start(core.socket(), patient_handler());
    let (a, b) = (session("a"), session("b"));
    let poison = h.set_ok(&a, &b, &json!({"poison": true})).await;
    let other = h.set_ok(&a, &b, &json!({"poison": false})).await;
    // Taken twice and never acknowledged (auto_ack false, no DEL).
    let get = json!({"type": "GET", "session_src": b, "auto_ack": false}).to_string();
    for _ in 0..2 {
        let (_, _, reply) = h.post_json("/get", &get).await;
        assert_eq!(reply["ids"], json!([poison, other]), "{reply}");
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    let (_, _, reply) = h.post_json("/get", &get).await;
    assert_eq!(
        reply["messages"],
        Value::Null,
        "both are dead letters: {reply}"
    );

    let (status, out) = core.msgctl(&["--json", "dead-letters", "list"]);
    assert!(status.success(), "{out}");
    let listed: Value = serde_json::from_str(out.trim()).expect("msgctl --json prints JSON");
    assert_eq!(listed["total"], 2, "{listed}");
    assert_eq!(listed["letters"][0]["id"], poison);
    assert_eq!(
        listed["letters"][0]["body"],
        json!({"poison": true, "session_src": a})
    );
    assert_eq!(listed["letters"][0]["deliveries"], 2);

    // Dead letters are stored state: they survive a restart.
    core.restart();
    let (status, out) = core.msgctl(&["dead-letters", "purge", &poison.to_string()]);
    assert!(status.success() && out.contains("purged 1"), "{out}");
    let (status, out) = core.msgctl(&["dead-letters", "replay", "--all"]);
    assert!(status.success() && out.contains("replayed 1"), "{out}");
    let (_, _, reply) = h.post_json("/get", &get).await;
    assert_eq!(reply["ids"], json!([other]), "{reply}");

    let (status, out) = core.msgctl(&["dead-letters", "replay"]);
    assert!(!status.success() && out.contains("--all"), "{out}");
}

#[test]
fn msgctl_says_plainly_when_there_is_no_core() {
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(&binaries().msgctl)
        .arg("--socket")
        .arg(dir.path().join("nothing.sock"))
        .args(["dead-letters", "list"])
        .env_remove("MICROMSG_ADMIN_SOCKET")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    // --socket finds the admin socket beside it.
    let admin = dir.path().join("nothing-admin.sock");
    assert!(
        stderr.contains(&format!("no admin socket at {}", admin.display()))
            && stderr.contains("is msgserver running?"),
        "{stderr}"
    );
}

/// What the log holds, as the core counts it: the files on disk are longer by the
/// zeros preallocated ahead of the records.
async fn log_bytes(h: &Handler) -> u64 {
    let scrape = h.request(Method::GET, "/metrics", &[], "").await.text();
    scrape
        .lines()
        .find_map(|line| line.strip_prefix("micromsg_core_journal_bytes "))
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("no journal_bytes in the scrape:\n{scrape}"))
}

/// Bytes of every file in `dir`.
fn dir_bytes(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_use_tracks_what_is_pending_and_compaction_loses_nothing() {
    let mut options = durable_core("x0", "never");
    // Publish keys are stored state too; a short window lets them go before the
    // compaction, so that what is left is the one pending message.
    options.extra_toml = "compact_min_bytes = 65536\ndedup_window = 0.5\n".into();
    let mut core = Core::start(options);
    let h = Handler::start(
        core.socket(),
        patient_handler()
            .direct("reads the log's size from /metrics, which the nginx site refuses"),
    );
    let (a, b, keep) = (session("a"), session("b"), session("keep"));
    let filler = "x".repeat(500);
    h.set_ok(&a, &keep, &json!({"kept": true})).await;
    for n in 0..600 {
        h.set_ok(&a, &b, &json!({"n": n, "filler": filler})).await;
    }
    let written = log_bytes(&h).await;
    assert!(
        written > 300_000,
        "{written} bytes for 600 messages of 500 bytes"
    );
    // The publish keys expire first, so that whichever compaction runs after the
    // delivery finds only the one message pending.
    tokio::time::sleep(Duration::from_millis(700)).await;
    // Delivered in x0 mode = removed; the next compaction drops them from the disk.
    let got = h.poll_messages(&b).await.unwrap_or_default();
    assert_eq!(got.len(), 600);
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut now_bytes = log_bytes(&h).await;
    while now_bytes > 8_192 && Instant::now() < deadline {
        // Compaction is checked once a second; a little traffic wakes nothing else.
        tokio::time::sleep(Duration::from_millis(200)).await;
        now_bytes = log_bytes(&h).await;
    }
    println!("log: {written} bytes with 601 pending, {now_bytes} bytes with 1 pending");
    assert!(
        now_bytes < 8_192,
        "the log kept {now_bytes} bytes for one message"
    );
    assert!(core.log().contains("log compacted"), "{}", core.log());
    // The compacted file is the snapshot alone: nothing has been appended to it.
    assert_eq!(dir_bytes(&core.data_dir()), now_bytes);
    core.restart();
    assert_eq!(
        h.poll_messages(&keep).await,
        Some(vec![json!({"kept": true, "session_src": a})])
    );
    assert_eq!(
        h.poll_messages(&b).await,
        None,
        "delivered messages stay gone"
    );
}
