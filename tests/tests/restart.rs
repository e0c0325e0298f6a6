//! Running under systemd (README, "Running under systemd"): msghandler serves on the
//! listening socket that `systemd/msghandler.socket` holds, so that `systemctl
//! restart msghandler.service` refuses no connection and fails no request, and both
//! processes tell systemd when they are ready and when they stop. The test plays
//! systemd: it holds the socket, passes it as fd 3 (LISTEN_FDS) and listens on a
//! NOTIFY_SOCKET of its own.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use micromsg_e2e::*;
use serde_json::Value;

/// Longer than the whole test: every `{"messages":null}` a poll gets is then the
/// answer of a stopping msghandler, not of a poll timeout.
const POLL_TIMEOUT: f64 = 60.0;
const PUBLISHERS_X0: usize = 3;
const PUBLISHERS_V1: usize = 2;
const POLLERS: usize = 4;
const RESTARTS: usize = 4;
/// Steady load between restarts.
const BETWEEN_RESTARTS: Duration = Duration::from_millis(1500);

/// Counts shared by every client task.
#[derive(Default)]
struct Counts {
    requests: AtomicU64,
    /// Requests sent again on a new connection because the old process closed the
    /// keep-alive connection they were sent on without answering anything.
    retries: AtomicU64,
    null_polls: AtomicU64,
}

/// One keep-alive HTTP/1.1 connection at a time, as a browser tab keeps one. A
/// request that fails on a connection that already served one, before any byte of
/// an answer, is sent once more on a new connection (RFC 9112 9.3.1; what browsers
/// do). Anything else that is not an answer is a failure.
struct Client {
    addr: SocketAddr,
    sender: Option<SendRequest<Full<Bytes>>>,
    counts: Arc<Counts>,
}

impl Client {
    fn new(addr: SocketAddr, counts: Arc<Counts>) -> Client {
        Client {
            addr,
            sender: None,
            counts,
        }
    }

    async fn post(&mut self, path: &str, body: &Value) -> Result<Value, String> {
        self.counts.requests.fetch_add(1, Ordering::Relaxed);
        let body = Bytes::from(body.to_string());
        // A connection the server ended after its last answer (Connection: close) is
        // not a failure: a new one is opened, as after any close between requests.
        if self.sender.as_mut().is_some_and(|s| s.is_closed()) {
            self.sender = None;
        }
        let reused = self.sender.is_some();
        match self.send(path, body.clone()).await {
            Ok(answer) => Ok(answer),
            Err(Failure::NoAnswer(e)) if reused => {
                self.counts.retries.fetch_add(1, Ordering::Relaxed);
                self.send(path, body)
                    .await
                    .map_err(|f| format!("{path}: retry failed: {f:?} (first: {e})"))
            }
            Err(f) => Err(format!("{path}: {f:?}")),
        }
    }

    async fn send(&mut self, path: &str, body: Bytes) -> Result<Value, Failure> {
        if self.sender.is_none() {
            let stream = tokio::net::TcpStream::connect(self.addr)
                .await
                .map_err(|e| Failure::Connect(e.to_string()))?;
            let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| Failure::Connect(e.to_string()))?;
            tokio::spawn(conn);
            self.sender = Some(sender);
        }
        let sender = self.sender.as_mut().expect("connected above");
        let request = hyper::Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(hyper::header::HOST, self.addr.to_string())
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(body))
            .expect("a valid request");
        let exchange = async {
            let response = sender
                .send_request(request)
                .await
                .map_err(|e| Failure::NoAnswer(e.to_string()))?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| Failure::Broken(e.to_string()))?
                .to_bytes();
            if status != StatusCode::OK {
                return Err(Failure::Broken(format!("HTTP {status}: {body:?}")));
            }
            serde_json::from_slice(&body)
                .map_err(|e| Failure::Broken(format!("not JSON ({e}): {body:?}")))
        };
        let result = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .unwrap_or_else(|_| Err(Failure::Broken("no answer in time".into())));
        if result.is_err() {
            self.sender = None;
        }
        result
    }
}

#[derive(Debug)]
#[allow(dead_code)] // the fields are read through Debug, in the failure report
enum Failure {
    Connect(String),
    /// The connection ended before any answer came.
    NoAnswer(String),
    /// An answer came, but not a whole 200 JSON one.
    Broken(String),
}

/// (publisher, sequence number): what identifies a message in this test.
type MessageKey = (u64, u64);

fn key_of(message: &Value) -> MessageKey {
    // A /v1 publish reaches an x0 poll as its envelope, with the payload in "data".
    let payload = message.get("data").unwrap_or(message);
    match (payload["pub"].as_u64(), payload["seq"].as_u64()) {
        (Some(p), Some(s)) => (p, s),
        _ => panic!("a message this test did not send: {message}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarting_msghandler_on_its_socket_fails_no_request_and_loses_no_message() {
    let core = Core::start(CoreOptions::default());
    let mut handler = ActivatedHandler::start(
        core.socket(),
        HandlerOptions {
            poll_timeout: POLL_TIMEOUT,
            ..Default::default()
        },
    );
    assert!(
        handler
            .log()
            .contains(r#"from="systemd socket activation (LISTEN_FDS)""#),
        "msghandler does not say it serves on the inherited socket; log:\n{}",
        handler.log()
    );
    let addr = handler.addr();
    let counts = Arc::new(Counts::default());
    let stop = Arc::new(AtomicBool::new(false));

    let mut pollers = Vec::new();
    for j in 0..POLLERS {
        let (counts, stop) = (counts.clone(), stop.clone());
        pollers.push(tokio::spawn(async move {
            let session = format!("sub-{j}");
            let mut client = Client::new(addr, counts.clone());
            let mut received: Vec<MessageKey> = Vec::new();
            let mut nulls = 0u64;
            let mut delivered_after_null = true;
            let mut failures = Vec::new();
            // Polls go on after the publishers stopped, until they said what they
            // sent and all of it came.
            while !stop.load(Ordering::Relaxed) {
                let body = serde_json::json!({"type": "GET", "session_src": session});
                match client.post("/python/MsgHandler.py", &body).await {
                    Ok(answer) => match messages_of(&answer) {
                        Some(messages) => {
                            received.extend(messages.iter().map(key_of));
                            delivered_after_null = true;
                        }
                        None => {
                            assert_eq!(answer, serde_json::json!({"messages": null}));
                            counts.null_polls.fetch_add(1, Ordering::Relaxed);
                            nulls += 1;
                            delivered_after_null = false;
                        }
                    },
                    Err(e) => failures.push(e),
                }
            }
            (session, received, nulls, delivered_after_null, failures)
        }));
    }

    let publishing = Arc::new(AtomicBool::new(true));
    let mut publishers = Vec::new();
    for i in 0..(PUBLISHERS_X0 + PUBLISHERS_V1) {
        let (counts, publishing) = (counts.clone(), publishing.clone());
        publishers.push(tokio::spawn(async move {
            let v1 = i >= PUBLISHERS_X0;
            let mut client = Client::new(addr, counts);
            let mut accepted: Vec<(String, MessageKey)> = Vec::new();
            let mut failures = Vec::new();
            let mut seq = 0u64;
            while publishing.load(Ordering::Relaxed) {
                seq += 1;
                let dst = format!("sub-{}", (i + seq as usize) % POLLERS);
                let payload = serde_json::json!({"pub": i, "seq": seq});
                let result = if v1 {
                    let body = serde_json::json!({
                        "session": format!("pub-{i}"),
                        "target": {"session": dst},
                        "data": payload,
                    });
                    client.post("/v1/publish", &body).await.and_then(|answer| {
                        answer["id"]
                            .as_u64()
                            .map(|_| ())
                            .ok_or_else(|| format!("/v1/publish: {answer}"))
                    })
                } else {
                    let body = serde_json::json!({
                        "type": "SET",
                        "session_src": format!("pub-{i}"),
                        "session_dst": dst,
                        "payload": payload,
                    });
                    client
                        .post("/python/MsgHandler.py", &body)
                        .await
                        .and_then(|answer| {
                            (answer["status"] == "ok")
                                .then_some(())
                                .ok_or_else(|| format!("SET: {answer}"))
                        })
                };
                match result {
                    Ok(()) => accepted.push((dst, (i as u64, seq))),
                    Err(e) => failures.push(e),
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            (accepted, failures)
        }));
    }

    // Mid-load, restart msghandler the way systemd does, a few times.
    let mut gaps = Vec::new();
    for _ in 0..RESTARTS {
        tokio::time::sleep(BETWEEN_RESTARTS).await;
        gaps.push(tokio::task::block_in_place(|| {
            handler.restart(Duration::from_secs(10))
        }));
    }
    tokio::time::sleep(BETWEEN_RESTARTS).await;
    publishing.store(false, Ordering::Relaxed);

    let mut failures = Vec::new();
    let mut expected: BTreeMap<String, BTreeSet<MessageKey>> = BTreeMap::new();
    for publisher in publishers {
        let (accepted, failed) = publisher.await.expect("a publisher panicked");
        failures.extend(failed);
        for (dst, key) in accepted {
            expected.entry(dst).or_default().insert(key);
        }
    }
    let accepted: usize = expected.values().map(BTreeSet::len).sum();

    // Everything accepted arrives within a few seconds of the last publish; then a
    // SET to each poller ends its last poll so that the pollers stop.
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let mut waker = Client::new(addr, counts.clone());
    for j in 0..POLLERS {
        let body = serde_json::json!({
            "session_src": "waker", "session_dst": format!("sub-{j}"),
            "payload": {"pub": 999, "seq": 0},
        });
        waker.post("/set", &body).await.expect("waking a poller");
    }

    let mut delivered = 0;
    for poller in pollers {
        let (session, received, nulls, delivered_after_null, failed) =
            poller.await.expect("a poller panicked");
        failures.extend(failed);
        let mut seen = BTreeSet::new();
        for key in received.into_iter().filter(|(p, _)| *p != 999) {
            assert!(seen.insert(key), "{session} was given {key:?} twice");
        }
        let want = expected.remove(&session).unwrap_or_default();
        let lost: Vec<_> = want.difference(&seen).collect();
        assert!(lost.is_empty(), "{session} never got {lost:?}");
        let unexpected: Vec<_> = seen.difference(&want).collect();
        assert!(unexpected.is_empty(), "{session} got unsent {unexpected:?}");
        assert!(
            nulls > 0,
            "{session}: no parked poll was answered {{\"messages\":null}} by a stopping msghandler"
        );
        assert!(
            delivered_after_null,
            "{session}: nothing came after its last null answer: it was not polled again into the new process"
        );
        delivered += seen.len();
    }

    let log = handler.log();
    eprintln!(
        "restarts: {RESTARTS} (no process accepting for {:?}); requests: {}; retried on a \
         new connection: {}; parked polls answered null: {}; messages accepted: {accepted}, \
         delivered once: {delivered}; failures: {}",
        gaps,
        counts.requests.load(Ordering::Relaxed),
        counts.retries.load(Ordering::Relaxed),
        counts.null_polls.load(Ordering::Relaxed),
        failures.len()
    );
    assert!(failures.is_empty(), "failed requests: {failures:#?}");
    // About one null per poller per restart: its parked poll. A re-poll that the
    // old process accepted in the instant before it stopped accepting is answered
    // null too (harmless: the poller asks again, into the new process), so a few
    // more are possible; a client bounced back and forth would show hundreds.
    let nulls = counts.null_polls.load(Ordering::Relaxed);
    assert!(
        nulls <= 3 * (RESTARTS * POLLERS) as u64,
        "{nulls} null answers for {RESTARTS} restarts of {POLLERS} pollers"
    );
    assert_eq!(accepted, delivered);
    assert!(
        accepted > 100,
        "too little load to prove anything: {accepted}"
    );
    assert_eq!(
        log.matches("msghandler stopped").count(),
        RESTARTS,
        "every old process stops cleanly"
    );
}

#[test]
fn msghandler_binds_listen_when_no_socket_is_passed() {
    let (_core, handler) = start_default();
    assert!(
        handler.log().contains(r#"from="listen""#),
        "log:\n{}",
        handler.log()
    );
}

#[test]
fn msgserver_tells_systemd_ready_then_watchdog_then_stopping() {
    let mut core = Core::start(CoreOptions {
        durable: true,
        ..Default::default()
    });
    core.terminate(Duration::from_secs(10));
    let notify = NotifySocket::bind();
    let mut child = core
        .command("msgserver under a service manager")
        .env("NOTIFY_SOCKET", notify.path())
        // 200 ms: pings every 100 ms.
        .env("WATCHDOG_USEC", "200000")
        .spawn()
        .expect("spawning msgserver");
    let ready = notify.wait_for("READY=1", Duration::from_secs(10));
    let running = std::os::unix::net::UnixStream::connect(core.socket()).is_ok();
    let watchdog = notify.wait_for("WATCHDOG=1", Duration::from_secs(2));
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let stopping = notify.wait_for("STOPPING=1", Duration::from_secs(10));
    let status = wait_timeout(&mut child, Duration::from_secs(10));
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let log = core.log();
    let this_start = log
        .rsplit("msgserver under a service manager")
        .next()
        .unwrap_or_default();
    assert!(ready.is_some(), "no READY=1; log:\n{log}");
    assert!(running, "READY=1 came before the socket accepted");
    assert!(
        this_start.contains("storage recovered"),
        "READY=1 before storage was recovered; log:\n{log}"
    );
    assert!(watchdog.is_some(), "no WATCHDOG=1 with WATCHDOG_USEC set");
    assert!(stopping.is_some(), "no STOPPING=1 on SIGTERM");
    assert!(status.is_some_and(|s| s.success()), "exit: {status:?}");
}
