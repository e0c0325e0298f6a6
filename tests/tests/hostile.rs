//! Hostile input against the real processes: what a broken or malicious client can
//! send over HTTP, a WebSocket or the core's Unix socket. Every case must end in a
//! clear refusal (the right status and a JSON error body with an `exception_id`, or
//! a closed connection where HTTP leaves no other answer), and after every case:
//!
//! * a good client's publish and poll still succeed;
//! * nothing accepted is lost: a ledger message is published after each case, and
//!   all of them are delivered at the end;
//! * both processes' resident memory stays within a bound, sampled all along.
//!
//! Each test prints one line per case (`hostile: <case> -> <outcome>`), so a run
//! shows what was tried (`cargo nextest run -p micromsg-e2e --test hostile
//! --no-capture`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use micromsg_e2e::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::codec::{Decoder, Encoder};

/// Growth of resident memory over the level after start-up that fails a test.
/// The largest thing the suite sends is a body of about `max_body_bytes` (1 MiB),
/// one at a time, which the front holds at most a few times over (the body, the
/// parse, the IPC frame) and the core refuses past `max_payload_bytes` (64 KiB);
/// a 4 GiB length prefix allocated, a copy per nesting level, or buffers kept per
/// refused request would be far beyond it, while allocator slack stays well within.
const RSS_GROWTH_LIMIT_KB: u64 = 48 * 1024;
/// How long a refusal or an answer may take: generous for a loaded machine.
const DUE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------
// The arena: two processes, a good client, a ledger and a memory watch
// ---------------------------------------------------------------------------

struct Arena {
    core: Core,
    h: Handler,
    /// Sessions of this test run, so that parallel tests never share one.
    tag: String,
    /// Ledger messages published so far (their `seq`), all to be delivered.
    ledger: Vec<u64>,
    watch: RssWatch,
}

impl Arena {
    fn start(core: CoreOptions, mut handler: HandlerOptions) -> Arena {
        // Empty polls (the good client's last, the ledger's last) end quickly.
        handler.poll_timeout = 0.5;
        // These cases are aimed at msghandler's own parsers and connection handling
        // (its statuses, its timeouts, its memory); in front of it nginx would answer
        // or normalize most of them first, which tests nginx instead.
        let handler = handler.direct(
            "hostile.rs sends raw, malformed and slow requests at msghandler's own HTTP parser",
        );
        let (core, h) = start(core, handler);
        let watch = RssWatch::start(core.pid(), h.pid());
        Arena {
            core,
            h,
            tag: session("hostile"),
            ledger: Vec::new(),
            watch,
        }
    }

    fn default() -> Arena {
        Arena::start(CoreOptions::default(), HandlerOptions::default())
    }

    fn session(&self, name: &str) -> String {
        format!("{}-{name}", self.tag)
    }

    /// After a case: the good client is served, the ledger grows, memory holds.
    async fn after(&mut self, case: &str, outcome: impl std::fmt::Display) {
        let (a, b) = (self.session("good-a"), self.session("good-b"));
        let seq = self.ledger.len() as u64;
        let payload = json!({"good": seq});
        self.h.set_ok(&a, &b, &payload).await;
        let mut expected = payload.clone();
        expected["session_src"] = json!(a);
        assert_eq!(
            self.h.poll_messages(&b).await,
            Some(vec![expected]),
            "{case}: the good client's publish and poll"
        );
        let ledger = self.session("ledger");
        self.h.set_ok(&a, &ledger, &json!({"seq": seq})).await;
        self.ledger.push(seq);
        self.watch.check(case);
        assert!(self.core.is_running(), "{case}: msgserver exited");
        assert!(self.h.is_running(), "{case}: msghandler exited");
        eprintln!("hostile: {case} -> {outcome}");
    }

    /// Every ledger message, in order, exactly once.
    async fn finish(self) {
        let ledger = self.session("ledger");
        let mut seen = Vec::new();
        while let Some(messages) = self.h.poll_messages(&ledger).await {
            seen.extend(messages.iter().map(|m| m["seq"].as_u64().expect("a seq")));
        }
        assert_eq!(seen, self.ledger, "ledger messages lost or repeated");
        let (core_kb, handler_kb) = self.watch.peaks();
        eprintln!(
            "hostile: {} ledger messages delivered; peak RSS msgserver {core_kb} KiB, \
             msghandler {handler_kb} KiB (limit {RSS_GROWTH_LIMIT_KB} KiB over start)",
            seen.len()
        );
    }
}

/// Samples both processes' VmRSS every few milliseconds on a thread of its own, so
/// that a spike between two cases is seen as well as a level.
struct RssWatch {
    stop: Arc<AtomicBool>,
    peaks: Arc<[AtomicU64; 2]>,
    start_kb: [u64; 2],
    pids: [u32; 2],
}

fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

impl RssWatch {
    fn start(core: u32, handler: u32) -> RssWatch {
        let pids = [core, handler];
        let start_kb = pids.map(rss_kb);
        let stop = Arc::new(AtomicBool::new(false));
        let peaks = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        {
            let (stop, peaks) = (stop.clone(), peaks.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    for (i, pid) in pids.iter().enumerate() {
                        peaks[i].fetch_max(rss_kb(*pid), Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
        }
        RssWatch {
            stop,
            peaks,
            start_kb,
            pids,
        }
    }

    fn peaks(&self) -> (u64, u64) {
        (
            self.peaks[0].load(Ordering::Relaxed),
            self.peaks[1].load(Ordering::Relaxed),
        )
    }

    fn check(&self, case: &str) {
        for (i, name) in ["msgserver", "msghandler"].iter().enumerate() {
            let now = rss_kb(self.pids[i]);
            let peak = self.peaks[i].fetch_max(now, Ordering::Relaxed).max(now);
            assert!(
                peak <= self.start_kb[i] + RSS_GROWTH_LIMIT_KB,
                "{case}: {name} peaked at {peak} KiB of RSS, from {} KiB at start",
                self.start_kb[i]
            );
        }
    }
}

impl Drop for RssWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------
// Raw HTTP
// ---------------------------------------------------------------------------

/// What came back on a raw connection: every complete response, and whether the
/// server closed the connection.
#[derive(Debug)]
struct Raw {
    responses: Vec<RawResponse>,
    closed: bool,
}

#[derive(Debug)]
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body as JSON: panics on anything else.
    fn json(&self, what: &str) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "{what}: reply {} is not JSON ({e}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Asserts `status` and the error body of `kind`; returns the exception text.
    fn error(&self, what: &str, status: u16, kind: &str) -> String {
        assert_eq!(
            self.status,
            status,
            "{what}: {:?}",
            String::from_utf8_lossy(&self.body)
        );
        let json = self.json(what);
        assert_eq!(json["exception_id"], kind, "{what}: {json}");
        let text = assert_error(&json, kind);
        format!("{status} {kind}: {text}")
    }
}

fn parse_responses(mut buf: &[u8]) -> Vec<RawResponse> {
    let mut out = Vec::new();
    loop {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(head)) = response.parse(buf) else {
            return out;
        };
        let headers: Vec<(String, String)> = response
            .headers
            .iter()
            .map(|h| {
                (
                    h.name.to_ascii_lowercase(),
                    String::from_utf8_lossy(h.value).into_owned(),
                )
            })
            .collect();
        let len: usize = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0);
        let Some(body) = buf.get(head..head + len) else {
            return out;
        };
        out.push(RawResponse {
            status: response.code.expect("complete"),
            headers,
            body: body.to_vec(),
        });
        buf = &buf[head + len..];
    }
}

/// Writes `request` and reads until the server closes the connection or `wait`
/// passes (a connection still open then is reported as not closed).
async fn raw(h: &Handler, request: &[u8], wait: Duration) -> Raw {
    let mut stream = TcpStream::connect(h.addr()).await.expect("connecting");
    // The server may close before it has read everything (a refused head).
    let _ = stream.write_all(request).await;
    let (buf, closed) = read_until_closed(&mut stream, wait).await;
    Raw {
        responses: parse_responses(&buf),
        closed,
    }
}

async fn read_until_closed(stream: &mut TcpStream, wait: Duration) -> (Vec<u8>, bool) {
    let deadline = tokio::time::Instant::now() + wait;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => return (buf, false),
            Ok(Ok(0)) | Ok(Err(_)) => return (buf, true),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A complete POST with `Connection: close`, Content-Length and `content_type`.
fn post(path: &str, content_type: Option<&str>, body: &[u8]) -> Vec<u8> {
    let mut head = format!("POST {path} HTTP/1.1\r\nHost: e2e\r\nConnection: close\r\n");
    if let Some(ct) = content_type {
        head.push_str(&format!("Content-Type: {ct}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

const JSON: Option<&str> = Some("application/json");

/// POSTs `body` as JSON and returns the one response, which must come.
async fn call(h: &Handler, path: &str, body: &[u8]) -> RawResponse {
    call_as(h, path, JSON, body).await
}

async fn call_as(h: &Handler, path: &str, content_type: Option<&str>, body: &[u8]) -> RawResponse {
    let mut raw = raw(h, &post(path, content_type, body), DUE).await;
    assert_eq!(
        raw.responses.len(),
        1,
        "POST {path}: expected one response, got {raw:?}"
    );
    raw.responses.remove(0)
}

/// The status an x0 path gives a refusal (always 200) or a v1 route (`v1`).
fn status_on(path: &str, v1: u16) -> u16 {
    if path.starts_with("/v1/") { v1 } else { 200 }
}

fn deep(levels: usize, open: &str, close: &str, inner: &str) -> String {
    let mut s = String::with_capacity(levels * (open.len() + close.len()) + inner.len());
    for _ in 0..levels {
        s.push_str(open);
    }
    s.push_str(inner);
    for _ in 0..levels {
        s.push_str(close);
    }
    s
}

/// A SET body from `a` to `dst` with `payload` spliced in as raw text.
fn set_body(src: &str, dst: &str, payload: &str) -> Vec<u8> {
    format!(
        r#"{{"session_src":{},"session_dst":{},"payload":{payload}}}"#,
        Value::from(src),
        Value::from(dst)
    )
    .into_bytes()
}

/// Polls `session` on the x0 API and returns the raw reply body.
async fn poll_raw(h: &Handler, session: &str) -> String {
    let reply = call(h, "/get", x0_get_body(session).as_bytes()).await;
    assert_eq!(reply.status, 200);
    String::from_utf8(reply.body).expect("a poll reply is UTF-8")
}

// ---------------------------------------------------------------------------
// JSON bodies
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_truncated_and_non_json_bodies_get_a_json_error_on_every_path() {
    let mut arena = Arena::default();
    let valid = String::from_utf8(set_body("a", "b", r#"{"k":[1,"two",{"3":null}]}"#)).unwrap();
    let v1_valid = r#"{"session":"a","target":{"session":"b"},"data":{"k":[1,"two"]}}"#;
    let mut cases: Vec<(&str, String, Vec<u8>, &str)> = Vec::new();
    for path in X0_PATHS.iter().copied().chain(["/v1/publish", "/v1/poll"]) {
        let whole = if path.starts_with("/v1/") {
            v1_valid
        } else {
            &valid
        };
        // Cut at every few bytes: each prefix is invalid JSON.
        for cut in (1..whole.len()).step_by(7) {
            cases.push((
                path,
                format!("truncated at {cut}"),
                whole.as_bytes()[..cut].to_vec(),
                "InvalidJson",
            ));
        }
        for (name, body, kind) in [
            ("not JSON", &b"not json"[..], "InvalidJson"),
            ("empty", b"", "InvalidJson"),
            ("only whitespace", b" \r\n\t", "InvalidJson"),
            ("trailing garbage", b"{}}", "InvalidJson"),
            ("two objects", b"{} {}", "InvalidJson"),
            ("a JSON string", b"\"GET\"", "InvalidField"),
            ("a JSON number", b"42", "InvalidField"),
            ("null", b"null", "InvalidField"),
            ("a UTF-8 byte order mark", b"\xef\xbb\xbf{}", "InvalidJson"),
        ] {
            cases.push((path, name.to_owned(), body.to_vec(), kind));
        }
        // With the key this API reads, so that the bad byte is not in an ignored
        // value (serde skips those without looking inside their strings).
        let key = if path.starts_with("/v1/") {
            &b"session"[..]
        } else {
            b"session_src"
        };
        for (name, value) in [
            ("invalid UTF-8 in a string", &b"a\xff"[..]),
            ("a truncated UTF-8 sequence", b"\xc3"),
            ("overlong UTF-8 (a slash as 0xC0 0xAF)", b"\xc0\xaf"),
            ("a UTF-8 encoded surrogate", b"\xed\xa0\x80"),
            ("a raw NUL in a string", b"a\x00"),
            ("a raw newline in a string", b"a\nb"),
        ] {
            let mut body = b"{\"type\":\"GET\",\"".to_vec();
            body.extend_from_slice(key);
            body.extend_from_slice(b"\":\"");
            body.extend_from_slice(value);
            body.extend_from_slice(b"\"}");
            cases.push((path, name.to_owned(), body, "InvalidJson"));
        }
        cases.push((
            path,
            "invalid UTF-8 in a key".into(),
            b"{\"sess\xc3\x28ion\":\"a\",\"type\":\"GET\"}".to_vec(),
            "InvalidJson",
        ));
    }
    // serde reads a JSON array as a struct's fields in order: this one was stored
    // as a SET for "b" before bodies had to be objects.
    let arrays: [(&str, &[u8]); 3] = [
        ("/set", br#"["SET","arr-a","arr-b",{"x":1}]"#),
        ("/python/MsgHandler.py", br#"["GET","arr-b"]"#),
        ("/v1/pause", br#"["arr-b"]"#),
    ];
    for (path, body) in arrays {
        cases.push((
            path,
            "a JSON array whose elements fit the fields".into(),
            body.to_vec(),
            "InvalidField",
        ));
    }
    let mut last_case = String::new();
    for (i, (path, name, body, kind)) in cases.iter().enumerate() {
        let what = format!("POST {path} {name}");
        let reply = call(&arena.h, path, body).await;
        let outcome = reply.error(&what, status_on(path, 400), kind);
        // The full round of good-client checks after every tenth case keeps the
        // run short; the last one always gets it.
        if i % 10 == 9 || i + 1 == cases.len() {
            arena.after(&what, &outcome).await;
        } else {
            eprintln!("hostile: {what} -> {outcome}");
        }
        last_case = what;
    }
    assert!(!last_case.is_empty());
    assert_eq!(
        poll_raw(&arena.h, "arr-b").await,
        r#"{"messages":null}"#,
        "the array SET must not have been stored"
    );
    arena
        .after("array SET was not stored", "nothing for arr-b")
        .await;

    // Escaped NUL and a lone surrogate are valid JSON: the session and payload
    // are taken, and the payload arrives exactly as sent.
    let nul = arena.session("nul\u{0}");
    let body = set_body("a", &nul, r#"{"s":"\ud800 and \u0000"}"#);
    let reply = call(&arena.h, "/set", &body).await;
    assert_eq!(reply.json("escaped NUL")["status"], "ok");
    let got = poll_raw(&arena.h, &nul).await;
    assert!(
        got.contains(r#"{"s":"\ud800 and \u0000","session_src":"a"}"#),
        "{got}"
    );
    arena
        .after(
            "escaped NUL in a session, lone surrogate in a payload",
            "stored and delivered byte for byte",
        )
        .await;
    arena.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deep_nesting_huge_numbers_and_huge_strings_are_refused_or_passed_through() {
    let mut arena = Arena::default();
    let levels = 100_000;
    let arrays = deep(levels, "[", "]", "");
    let objects = deep(levels, r#"{"a":"#, "}", "1");
    let v1_target = r#""target":{"session":"deep-b"}"#;
    // (what, path, body, expected status on that path, kind)
    let cases: Vec<(&str, &str, String, u16, &str)> = vec![
        (
            "100,000 nested arrays as the payload",
            "/set",
            format!(r#"{{"session_src":"a","session_dst":"b","payload":{arrays}}}"#),
            200,
            "InvalidField",
        ),
        (
            "100,000 nested objects as the payload (core refuses the size)",
            "/set",
            format!(r#"{{"session_src":"a","session_dst":"b","payload":{{"x":{objects}}}}}"#),
            200,
            "PayloadTooLarge",
        ),
        (
            "100,000 nested arrays as the whole body",
            "/get",
            arrays.clone(),
            200,
            "InvalidField",
        ),
        (
            "100,000 nested arrays as session_src",
            "/get",
            format!(r#"{{"session_src":{arrays}}}"#),
            200,
            "InvalidField",
        ),
        (
            "100,000 nested objects under SessionData (unknown keys, so no session)",
            "/python/MsgHandler.py",
            format!(r#"{{"type":"GET","SessionData":{objects}}}"#),
            200,
            "MissingField",
        ),
        (
            "100,000 nested arrays as v1 data (core refuses the size)",
            "/v1/publish",
            format!(r#"{{"session":"a",{v1_target},"data":{arrays}}}"#),
            413,
            "PayloadTooLarge",
        ),
        (
            "100,000 nested objects under the v1 target (unknown keys, so no target)",
            "/v1/publish",
            format!(r#"{{"session":"a","target":{objects},"data":{{}}}}"#),
            400,
            "InvalidField",
        ),
        (
            "100,000 nested arrays as v1 ack ids",
            "/v1/ack",
            format!(r#"{{"session":"a","ids":{arrays}}}"#),
            400,
            "InvalidField",
        ),
        (
            "1e999999 as a v1 poll timeout",
            "/v1/poll",
            r#"{"session":"a","timeout":1e999999}"#.into(),
            400,
            "InvalidJson",
        ),
        (
            "a 100,000-digit integer as a v1 poll timeout",
            "/v1/poll",
            format!(r#"{{"session":"a","timeout":{}}}"#, "9".repeat(100_000)),
            400,
            "InvalidJson",
        ),
        (
            "a 100,000-digit integer as an ack id",
            "/v1/ack",
            format!(r#"{{"session":"a","ids":[{}]}}"#, "9".repeat(100_000)),
            400,
            "InvalidJson",
        ),
        (
            "a 100,000-digit integer as the DEL cursor",
            "/del",
            format!(r#"{{"session_src":"a","cursor":{}}}"#, "9".repeat(100_000)),
            200,
            "InvalidJson",
        ),
        (
            "-1 as an ack id",
            "/v1/ack",
            r#"{"session":"a","ids":[-1]}"#.into(),
            400,
            "InvalidField",
        ),
    ];
    for (what, path, body, status, kind) in &cases {
        let reply = call(&arena.h, path, body.as_bytes()).await;
        let outcome = reply.error(&format!("POST {path} {what}"), *status, kind);
        arena.after(what, outcome).await;
    }

    // Unknown keys are skipped without recursing, however deep: the request is
    // carried out.
    let dst = arena.session("deep-unknown");
    let body = format!(
        r#"{{"zzz":{arrays},"session_src":"a","session_dst":"{dst}","payload":{{"ok":1}}}}"#
    );
    let reply = call(&arena.h, "/set", body.as_bytes()).await;
    assert_eq!(reply.json("deep unknown key")["status"], "ok");
    assert!(
        poll_raw(&arena.h, &dst)
            .await
            .contains(r#"{"ok":1,"session_src":"a"}"#)
    );
    arena
        .after(
            "100,000 nested arrays under an unknown key",
            "ignored, SET stored",
        )
        .await;

    // Within the core's size limit, deep payloads and huge numbers are data: they
    // pass through byte for byte (msghandler never builds a tree of a payload).
    let deep_payload = format!(r#"{{"a":{}}}"#, deep(30_000, "[", "]", ""));
    let big_int = format!(r#"{{"n":{}}}"#, "7".repeat(60_000));
    for (i, (what, payload)) in [
        ("30,000 nested arrays in a payload", deep_payload.as_str()),
        ("a 60,000-digit integer in a payload", big_int.as_str()),
        (
            "1e999999 in a payload",
            r#"{"n":1e999999,"m":-0.0e-999999}"#,
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let dst = arena.session("deep-x0");
        let reply = call(&arena.h, "/set", &set_body("a", &dst, payload)).await;
        assert_eq!(reply.json(what)["status"], "ok", "{what}");
        let got = poll_raw(&arena.h, &dst).await;
        let delivered = format!(r#"{},"session_src":"a"}}"#, &payload[..payload.len() - 1]);
        assert!(got.contains(&delivered), "{what}: not delivered as sent");
        // The same on /v1 and over a WebSocket (a session each: what the socket
        // was given and did not acknowledge goes back to the core when it closes).
        let v1_dst = arena.session(&format!("deep-v1-{i}"));
        let body =
            format!(r#"{{"session":"a","target":{{"session":"{v1_dst}"}},"data":{payload}}}"#);
        let reply = call(&arena.h, "/v1/publish", body.as_bytes()).await;
        assert_eq!(reply.status, 200, "{what} on /v1");
        let mut ws = ws_open(&arena.h, &v1_dst).await;
        let text = ws_text(&mut ws).await;
        assert!(
            text.contains(&format!(r#""data":{payload}"#)),
            "{what}: not delivered as sent over the WebSocket"
        );
        arena
            .after(what, "delivered byte for byte on x0, /v1 and the WebSocket")
            .await;
    }

    // Huge strings: just under the body limit reaches the core (which refuses
    // it by its own size limit), just over is 413 unread, and so is a Content-Length
    // that announces gigabytes or a chunked body that never stops growing.
    let limit = 1024 * 1024;
    let envelope = set_body("a", "b", r#"{"s":""}"#).len();
    let near = set_body(
        "a",
        "b",
        &format!(r#"{{"s":"{}"}}"#, "x".repeat(limit - envelope)),
    );
    assert_eq!(near.len(), limit);
    let reply = call(&arena.h, "/set", &near).await;
    let outcome = reply.error("a body of exactly max_body_bytes", 200, "PayloadTooLarge");
    arena
        .after("a body of exactly max_body_bytes", outcome)
        .await;
    let over = set_body(
        "a",
        "b",
        &format!(r#"{{"s":"{}"}}"#, "x".repeat(limit - envelope + 1)),
    );
    for path in ["/set", "/v1/publish"] {
        let reply = call(&arena.h, path, &over).await;
        let outcome = reply.error("one byte over max_body_bytes", 413, "BodyTooLarge");
        arena
            .after(
                &format!("POST {path} one byte over max_body_bytes"),
                outcome,
            )
            .await;
    }
    let announced = b"POST /set HTTP/1.1\r\nHost: e2e\r\nContent-Type: application/json\r\n\
        Content-Length: 10000000000\r\n\r\n{\"session_src\":";
    let got = raw(&arena.h, announced, DUE).await;
    let outcome = got.responses[0].error("Content-Length of 10 GB", 413, "BodyTooLarge");
    assert!(got.closed, "the unread body's connection must close");
    arena.after("Content-Length of 10 GB", outcome).await;
    let mut chunked =
        b"POST /v1/publish HTTP/1.1\r\nHost: e2e\r\nContent-Type: application/json\r\n\
        Transfer-Encoding: chunked\r\n\r\n"
            .to_vec();
    for _ in 0..20 {
        chunked.extend_from_slice(format!("{:x}\r\n", 64 * 1024).as_bytes());
        chunked.extend_from_slice(&[b' '; 64 * 1024]);
        chunked.extend_from_slice(b"\r\n");
    }
    let got = raw(&arena.h, &chunked, DUE).await;
    let outcome = got.responses[0].error("a chunked body past max_body_bytes", 413, "BodyTooLarge");
    arena
        .after("a chunked body past max_body_bytes", outcome)
        .await;
    arena.finish().await;
}

// ---------------------------------------------------------------------------
// WebSocket frames
// ---------------------------------------------------------------------------

type Ws = tokio_tungstenite::WebSocketStream<TcpStream>;
use tokio_tungstenite::tungstenite::Message as WsMessage;

async fn ws_open(h: &Handler, session: &str) -> Ws {
    let url = format!("ws://{}/v1/ws?session={session}", h.addr());
    let socket = TcpStream::connect(h.addr()).await.expect("connecting");
    let (mut ws, _) = tokio::time::timeout(DUE, tokio_tungstenite::client_async(url, socket))
        .await
        .expect("no upgrade in time")
        .expect("the upgrade");
    let welcome = ws_text(&mut ws).await;
    assert!(welcome.contains(r#""op":"welcome""#), "{welcome}");
    ws
}

/// The next text frame; panics on anything else.
async fn ws_text(ws: &mut Ws) -> String {
    loop {
        match tokio::time::timeout(DUE, ws.next()).await {
            Ok(Some(Ok(WsMessage::Text(text)))) => return text.as_str().to_owned(),
            Ok(Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_)))) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Text frames until the close; returns them and the close code (None when the
/// connection ended without a close frame).
async fn ws_until_close(ws: &mut Ws) -> (Vec<String>, Option<u16>) {
    let mut frames = Vec::new();
    loop {
        match tokio::time::timeout(DUE, ws.next()).await {
            Ok(Some(Ok(WsMessage::Text(text)))) => frames.push(text.as_str().to_owned()),
            Ok(Some(Ok(WsMessage::Close(close)))) => {
                return (frames, close.map(|c| u16::from(c.code)));
            }
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_))) | Ok(None) => return (frames, None),
            Err(_) => panic!("the WebSocket did not close within {DUE:?}: {frames:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_websocket_frames_are_refused_and_the_connection_ends_cleanly() {
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    let mut arena = Arena::default();
    let arrays = deep(100_000, "[", "]", "");
    let session = arena.session("ws");
    // Refused requests: an error frame, and the connection stays open (a ping is
    // still answered on it).
    for (what, frame, kind) in [
        (
            "100,000 nested arrays as publish data",
            format!(r#"{{"op":"publish","ref":1,"target":{{"session":"x"}},"data":{arrays}}}"#),
            "PayloadTooLarge",
        ),
        (
            "100,000 nested objects under a target",
            format!(
                r#"{{"op":"publish","ref":1,"target":{},"data":{{}}}}"#,
                deep(100_000, r#"{"a":"#, "}", "1")
            ),
            "InvalidField",
        ),
        (
            "a 100,000-digit ack id",
            format!(r#"{{"op":"ack","ref":1,"ids":[{}]}}"#, "9".repeat(100_000)),
            "InvalidJson",
        ),
        (
            "a key given twice",
            r#"{"op":"publish","ref":1,"target":{"session":"x"},"target":{"session":"y"},"data":{}}"#
                .into(),
            "InvalidField",
        ),
    ] {
        let mut ws = ws_open(&arena.h, &session).await;
        ws.send(WsMessage::text(frame)).await.expect("sending");
        let answer = ws_text(&mut ws).await;
        assert!(
            answer.contains(r#""op":"error""#) && answer.contains(kind),
            "{what}: {answer}"
        );
        ws.send(WsMessage::text(r#"{"op":"ping","ref":"p"}"#))
            .await
            .expect("sending");
        assert!(ws_text(&mut ws).await.contains("pong"), "{what}: no pong");
        arena.after(&format!("WebSocket {what}"), format!("error frame {kind}, still open")).await;
    }
    // Not requests at all: the error frame, then the close.
    let bad_utf8 = Frame::message(
        b"{\"op\":\"ping\",\"x\":\"\xff\"}".to_vec(),
        OpCode::Data(Data::Text),
        true,
    );
    let cases: Vec<(&str, WsMessage, u16)> = vec![
        (
            "100,000 nested arrays as the frame",
            WsMessage::text(arrays.clone()),
            1008,
        ),
        (
            "a JSON array that fits the envelope",
            WsMessage::text(r#"["ping"]"#),
            1008,
        ),
        (
            "garbage bytes in a binary frame",
            WsMessage::binary(vec![0xff, 0x00, 0x9c]),
            1008,
        ),
        (
            "invalid UTF-8 in a text frame",
            WsMessage::Frame(bad_utf8),
            1007,
        ),
        (
            "a frame over max_body_bytes",
            WsMessage::text(format!(
                r#"{{"op":"ping","x":"{}"}}"#,
                "x".repeat(1024 * 1024)
            )),
            1009,
        ),
    ];
    for (what, message, code) in cases {
        let mut ws = ws_open(&arena.h, &session).await;
        // A frame the server refuses to read may reset the socket under the send.
        let _ = ws.send(message).await;
        let (frames, closed) = ws_until_close(&mut ws).await;
        assert_eq!(closed, Some(code), "{what}: {frames:?}");
        arena
            .after(&format!("WebSocket {what}"), format!("closed {code}"))
            .await;
    }
    arena.finish().await;
}

// ---------------------------------------------------------------------------
// Session ids, content types, duplicate keys
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_ids_are_opaque_text_of_bounded_length() {
    let mut arena = Arena::start(
        CoreOptions {
            durable: true,
            ..CoreOptions::default()
        },
        HandlerOptions::default(),
    );
    let files_before = data_files(&arena.core);
    // Taken as they are: a session id is a key, never a path, so these reach
    // exactly that session and nothing named like their last segment.
    for id in [
        "../x",
        "a/b",
        "/etc/passwd",
        "..\\..\\x",
        "%2e%2e%2fx",
        "line\nbreak\r\nLog-Injection: 1",
        "\u{1b}[31mred\u{1b}[0m\t\u{7}",
        "\u{202e}txet",
        " ",
    ] {
        let session = format!("{id}{}", arena.tag);
        let body = set_body("a", &session, r#"{"k":1}"#);
        let reply = call(&arena.h, "/set", &body).await;
        assert_eq!(reply.json(id)["status"], "ok", "SET to {id:?}");
        let got = poll_raw(&arena.h, &session).await;
        assert!(
            got.contains(r#"{"k":1,"session_src":"a"}"#),
            "{id:?}: {got}"
        );
        let (status, reply) = arena
            .h
            .v1(
                "/v1/publish",
                json!({"session": session, "target": {"session": session}, "data": {"v1": true}}),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "v1 publish as {id:?}: {reply}");
        let got = arena.h.v1_drain(&session, 0.2).await;
        assert_eq!(data_of(&got), vec![json!({"v1": true})], "{id:?}");
        assert!(poll_raw(&arena.h, "x").await.contains("null"));
        arena
            .after(&format!("session id {id:?}"), "accepted as an opaque key")
            .await;
    }
    let query = "/get?session_src=..%2Fx%0D%0A";
    let got = raw(
        &arena.h,
        format!("GET {query} HTTP/1.1\r\nHost: e2e\r\nConnection: close\r\n\r\n").as_bytes(),
        DUE,
    )
    .await;
    assert_eq!(got.responses[0].json(query)["messages"], Value::Null);
    arena
        .after("GET /get?session_src=../x CRLF", "an empty poll")
        .await;

    for (len, ok) in [(256, true), (257, false), (10_000, false)] {
        let session = "s".repeat(len);
        for path in ["/set", "/python/MsgHandler.py"] {
            let mut body =
                json!({"type": "SET", "session_src": session, "session_dst": "b", "payload": {}});
            let reply = call(&arena.h, path, body.to_string().as_bytes()).await;
            let outcome = if ok {
                assert_eq!(reply.json("256")["status"], "ok");
                "accepted".to_owned()
            } else {
                reply.error(&format!("{len}-byte session_src"), 200, "InvalidField")
            };
            body["session_src"] = json!("a");
            body["session_dst"] = json!(session);
            let reply = call(&arena.h, path, body.to_string().as_bytes()).await;
            if !ok {
                reply.error(&format!("{len}-byte session_dst"), 200, "InvalidField");
            }
            arena
                .after(&format!("POST {path} {len}-byte session ids"), outcome)
                .await;
        }
        let (status, reply) = arena
            .h
            .v1("/v1/poll", json!({"session": session, "timeout": 0}))
            .await;
        if ok {
            assert_eq!(status, StatusCode::OK, "{reply}");
        } else {
            assert_v1_error(&(status, reply), StatusCode::BAD_REQUEST, "InvalidField");
        }
        let query = format!("/get?session_src={session}");
        let got = raw(
            &arena.h,
            format!("GET {query} HTTP/1.1\r\nHost: e2e\r\nConnection: close\r\n\r\n").as_bytes(),
            DUE,
        )
        .await;
        if !ok {
            got.responses[0].error("long query session", 200, "InvalidField");
        }
        arena
            .after(
                &format!("/v1/poll and GET /get with a {len}-byte session"),
                if ok { "accepted" } else { "InvalidField" },
            )
            .await;
    }
    // The journal stays one set of files in the data directory, whatever the ids.
    assert_eq!(
        data_files(&arena.core),
        files_before,
        "files in the data dir"
    );
    arena.finish().await;
}

/// The names of the entries of the core's data directory.
fn data_files(core: &Core) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(core.data_dir())
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_types_are_checked_and_duplicate_keys_refused() {
    let mut arena = Arena::default();
    let body = set_body("a", &arena.session("ct"), r#"{"k":1}"#);
    for (ct, accepted) in [
        (Some("text/plain"), false),
        (Some("application/x-www-form-urlencoded"), false),
        (Some("multipart/form-data; boundary=x"), false),
        (Some("application/jsonp"), false),
        (Some("text/html; application/json"), false),
        (Some(""), false),
        (None, true),
        (Some("APPLICATION/JSON; charset=utf-8"), true),
        (Some("application/json;charset=UTF-8;x=y"), true),
    ] {
        for path in ["/set", "/v1/poll"] {
            let this = if path == "/set" {
                body.clone()
            } else {
                br#"{"session":"ct","timeout":0}"#.to_vec()
            };
            let reply = call_as(&arena.h, path, ct, &this).await;
            let outcome = if accepted {
                assert_eq!(reply.status, 200, "{ct:?}");
                assert!(reply.json("accepted").get("error").is_none(), "{ct:?}");
                "accepted".to_owned()
            } else {
                reply.error(
                    &format!("{ct:?}"),
                    status_on(path, 415),
                    "UnsupportedContentType",
                )
            };
            arena
                .after(&format!("POST {path} Content-Type {ct:?}"), outcome)
                .await;
        }
    }
    let raw_two_types = b"POST /set HTTP/1.1\r\nHost: e2e\r\nConnection: close\r\n\
        Content-Type: text/plain\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}";
    let got = raw(&arena.h, raw_two_types, DUE).await;
    let outcome = got.responses[0].error("two Content-Types", 200, "UnsupportedContentType");
    arena
        .after("two Content-Type headers (text/plain first)", outcome)
        .await;

    // A key given twice is refused, naming the key (parsers disagree on which one
    // would win), on both APIs and inside nested objects.
    for (path, body, key) in [
        (
            "/set",
            r#"{"session_src":"a","session_dst":"b","session_dst":"c","payload":{}}"#,
            "session_dst",
        ),
        (
            "/python/MsgHandler.py",
            r#"{"type":"GET","type":"SET","session_src":"a"}"#,
            "type",
        ),
        (
            "/get",
            r#"{"SessionData":{"Value":"a","Value":"b"}}"#,
            "Value",
        ),
        (
            "/v1/publish",
            r#"{"session":"a","target":{"session":"b","session":"c"},"data":{}}"#,
            "session",
        ),
        (
            "/v1/poll",
            r#"{"session":"a","timeout":0,"timeout":100}"#,
            "timeout",
        ),
    ] {
        let reply = call(&arena.h, path, body.as_bytes()).await;
        let outcome = reply.error(body, status_on(path, 400), "InvalidField");
        assert!(
            outcome.contains("duplicate field") && outcome.contains(key),
            "{outcome}"
        );
        arena
            .after(&format!("POST {path} with {key} twice"), outcome)
            .await;
    }
    // Keys inside a payload are the sender's data and pass through; a forged
    // session_src is replaced even when spelled with an escape, and where a
    // second one survives as text the real sender's comes last, which is the one
    // JSON.parse (and serde_json) keeps.
    let dst = arena.session("dup-payload");
    for payload in [
        r#"{"k":1,"k":2}"#,
        r#"{"session_src":"forged","session_src":"forged2"}"#,
        r#"{"session\u005fsrc":"forged"}"#,
    ] {
        let reply = call(&arena.h, "/set", &set_body("real", &dst, payload)).await;
        assert_eq!(reply.json(payload)["status"], "ok");
        let got = poll_raw(&arena.h, &dst).await;
        let parsed: Value = serde_json::from_str(&got).unwrap();
        assert_eq!(
            parsed["messages"][0]["session_src"], "real",
            "{payload}: {got}"
        );
        arena
            .after(
                &format!("payload {payload}"),
                "passed through, session_src is the real sender's",
            )
            .await;
    }
    arena.finish().await;
}

// ---------------------------------------------------------------------------
// Request smuggling
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smuggling_attempts_never_carry_out_a_hidden_request() {
    let mut arena = Arena::default();
    let canary = arena.session("canary");
    // The request each attempt tries to hide; it must never be carried out.
    let hidden_body = set_body("smuggler", &canary, r#"{"smuggled":true}"#);
    let hidden = post("/set", JSON, &hidden_body);
    let hidden_len = hidden.len();
    let hidden = String::from_utf8(hidden).unwrap();
    let head = "POST /set HTTP/1.1\r\nHost: e2e\r\nContent-Type: application/json\r\n";
    // (what, bytes, status of the first response (None: only a close), one response only)
    let cases: Vec<(&str, String, Option<u16>)> = vec![
        (
            "Content-Length and Transfer-Encoding: chunked (CL.TE)",
            format!(
                "{head}Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{hidden}"
            ),
            Some(200),
        ),
        (
            "Transfer-Encoding: chunked and a Content-Length covering the hidden request (TE.CL)",
            format!(
                "{head}Transfer-Encoding: chunked\r\nContent-Length: {}\r\n\r\n{:x}\r\n{hidden}\r\n0\r\n\r\n",
                hidden_len + 8,
                hidden_len
            ),
            Some(200),
        ),
        (
            "two different Content-Lengths",
            format!("{head}Content-Length: 0\r\nContent-Length: {hidden_len}\r\n\r\n{hidden}"),
            Some(400),
        ),
        (
            "a Content-Length list",
            format!("{head}Content-Length: 0, {hidden_len}\r\n\r\n{hidden}"),
            Some(400),
        ),
        (
            "a signed Content-Length",
            format!("{head}Content-Length: +0\r\n\r\n{hidden}"),
            Some(400),
        ),
        (
            // hyper decodes it once; found by this suite, refused by msghandler.
            "Transfer-Encoding: chunked twice",
            format!(
                "{head}Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{hidden}"
            ),
            Some(200),
        ),
        (
            "Transfer-Encoding: chunked, chunked",
            format!(
                "{head}Transfer-Encoding: chunked, CHUNKED\r\nContent-Type: text/plain\r\n\r\n0\r\n\r\n{hidden}"
            ),
            Some(200),
        ),
        (
            "Transfer-Encoding: gzip (not chunked last)",
            format!("{head}Transfer-Encoding: gzip\r\n\r\n{hidden}"),
            Some(400),
        ),
        (
            "Transfer-Encoding: chunked, identity",
            format!("{head}Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{hidden}"),
            Some(400),
        ),
        (
            "Transfer-Encoding with a space before the colon",
            format!("{head}Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n{hidden}"),
            Some(400),
        ),
        (
            "a chunk size that is not hex",
            format!("{head}Transfer-Encoding: chunked\r\n\r\nzz\r\n{hidden}\r\n0\r\n\r\n"),
            Some(200),
        ),
        (
            "a chunk size beyond 64 bits",
            format!(
                "{head}Transfer-Encoding: chunked\r\n\r\n1{}\r\n{hidden}\r\n0\r\n\r\n",
                "0".repeat(20)
            ),
            Some(200),
        ),
        (
            "a negative chunk size",
            format!("{head}Transfer-Encoding: chunked\r\n\r\n-5\r\n{hidden}\r\n0\r\n\r\n"),
            Some(200),
        ),
        (
            "a chunk shorter than its size, then the hidden request",
            format!("{head}Transfer-Encoding: chunked\r\n\r\n2\r\n{{}}x\r\n{hidden}"),
            Some(200),
        ),
        (
            "an obs-fold header continuation",
            format!(
                "{head}X-Note: a\r\n Transfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n{hidden}"
            ),
            Some(400),
        ),
        (
            "a header line without a colon",
            format!("{head}Content-Length 0\r\n\r\n{hidden}"),
            Some(400),
        ),
        (
            // (A bare LF ends a header line for hyper as for nginx: no disagreement.)
            "a bare CR inside a header value",
            format!("{head}X-Note: a\rContent-Length: 0\r\n\r\n{hidden}"),
            Some(400),
        ),
        (
            "a malformed request line, then a pipelined request",
            format!("POST /set HTTP/1.1 extra\r\nHost: e2e\r\n\r\n{hidden}"),
            Some(400),
        ),
        (
            "an invalid Content-Length, then a pipelined request",
            format!("{head}Content-Length: abc\r\n\r\n{hidden}"),
            Some(400),
        ),
        (
            "a NUL in a header value",
            format!("{head}X-Note: a\0b\r\nContent-Length: 0\r\n\r\n{hidden}"),
            Some(400),
        ),
        (
            "a header block of 1 MiB",
            format!(
                "{head}X-Big: {}\r\nContent-Length: 0\r\n\r\n{hidden}",
                "a".repeat(1024 * 1024)
            ),
            Some(431),
        ),
        (
            "200 headers",
            format!(
                "{head}{}Content-Length: 0\r\n\r\n{hidden}",
                "X-A: 1\r\n".repeat(200)
            ),
            Some(431),
        ),
    ];
    for (what, bytes, first) in &cases {
        let started = Instant::now();
        let got = raw(&arena.h, bytes.as_bytes(), DUE).await;
        let took = started.elapsed();
        assert!(got.closed, "{what}: the connection must close: {got:?}");
        assert!(
            got.responses.len() <= 1,
            "{what}: a second response means a second request: {got:?}"
        );
        let outcome = match (first, got.responses.first()) {
            (Some(status), Some(reply)) => {
                assert_eq!(reply.status, *status, "{what}: {reply:?}");
                // hyper refuses a head it cannot parse itself, with an empty body:
                // the route (and so the API) is not known yet.
                if reply.status == 200 {
                    let json = reply.json(what);
                    assert_eq!(json["error"], true, "{what}: {json}");
                    format!("200 {} and closed", json["exception_id"])
                } else {
                    format!("{} from hyper and closed", reply.status)
                }
            }
            (None, None) => "closed".to_owned(),
            (want, got) => panic!("{what}: expected {want:?}, got {got:?}"),
        };
        assert_eq!(
            poll_raw(&arena.h, &canary).await,
            r#"{"messages":null}"#,
            "{what}: the hidden request was carried out"
        );
        arena.after(what, format!("{outcome} in {took:?}")).await;
    }
    // The same refusals on /v1 carry a v1 status.
    let v1 = "POST /v1/publish HTTP/1.1\r\nHost: e2e\r\nContent-Type: application/json\r\n\
        Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n";
    let got = raw(&arena.h, v1.as_bytes(), DUE).await;
    let outcome = got.responses[0].error("/v1 bad chunk", 400, "BadRequest");
    arena
        .after(
            "POST /v1/publish with a chunk size that is not hex",
            outcome,
        )
        .await;
    arena.finish().await;
}

// ---------------------------------------------------------------------------
// Slow clients
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_heads_idle_connections_and_trickling_bodies_are_cut_off() {
    let timeout = Duration::from_secs(1);
    let mut arena = Arena::start(
        CoreOptions::default(),
        HandlerOptions {
            extra_toml: "header_read_timeout = 1.0\nbody_read_timeout = 1.0\n".into(),
            ..HandlerOptions::default()
        },
    );
    let addr = arena.h.addr();
    // Slowloris: one byte of the head a second. Several at once, and the good
    // client is served meanwhile.
    let dribblers: Vec<_> = (0..4)
        .map(|_| {
            tokio::spawn(async move {
                // The clock starts before the connect: msghandler's starts at its
                // accept, which a clock started after the connect returns can miss by
                // a few microseconds (seen once in CI as 999.94 ms).
                let started = Instant::now();
                let mut stream = TcpStream::connect(addr).await.unwrap();
                let head = b"POST /get HTTP/1.1\r\nHost: e2e\r\n\r\n";
                let mut sent = 0;
                for byte in head {
                    if stream.write_all(&[*byte]).await.is_err() {
                        break;
                    }
                    sent += 1;
                    let mut probe = [0u8; 256];
                    match tokio::time::timeout(Duration::from_secs(1), stream.read(&mut probe))
                        .await
                    {
                        Ok(Ok(0)) | Ok(Err(_)) => break,
                        Ok(Ok(_)) => panic!("an answer to a head never completed"),
                        Err(_) => {}
                    }
                }
                (started.elapsed(), sent)
            })
        })
        .collect();
    let (a, b) = (arena.session("meanwhile-a"), arena.session("meanwhile-b"));
    arena.h.set_ok(&a, &b, &json!({"meanwhile": 1})).await;
    assert!(arena.h.poll_messages(&b).await.is_some());
    for dribbler in dribblers {
        let (took, sent) = dribbler.await.unwrap();
        assert!(
            took >= timeout && took < timeout * 3 + Duration::from_secs(1),
            "closed after {took:?}"
        );
        assert!(sent < 5, "{sent} bytes were taken one a second");
    }
    arena
        .after(
            "4 heads dribbled one byte a second",
            "each closed after header_read_timeout (1 s)",
        )
        .await;

    // A keep-alive connection that never sends its next request is closed too.
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let get = format!(
        "GET /get?session_src={} HTTP/1.1\r\nHost: e2e\r\n\r\n",
        arena.session("idle")
    );
    stream.write_all(get.as_bytes()).await.unwrap();
    let started = Instant::now();
    let (buf, closed) = read_until_closed(&mut stream, Duration::from_secs(5)).await;
    assert_eq!(parse_responses(&buf).len(), 1, "the poll is answered first");
    assert!(closed, "an idle keep-alive connection stayed open");
    let took = started.elapsed();
    assert!(took < Duration::from_secs(4), "closed after {took:?}");
    arena
        .after(
            "an idle keep-alive connection",
            format!("closed {took:?} after its request (poll 0.5 s + 1 s idle)"),
        )
        .await;

    // A long-poll held past header_read_timeout is not cut: the timer runs only
    // while a head is awaited.
    let (status, reply) = arena
        .h
        .v1(
            "/v1/poll",
            json!({"session": arena.session("long"), "timeout": 2.0}),
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    arena
        .after(
            "a 2 s long-poll with a 1 s header timeout",
            "answered after 2 s",
        )
        .await;

    // Bodies that trickle or never come: refused once body_read_timeout passes,
    // and the connection closed (its body was never read in full).
    for (path, status) in [("/set", 200), ("/v1/publish", 408)] {
        for trickle in [false, true] {
            let stream = TcpStream::connect(addr).await.unwrap();
            let (mut read, mut write) = stream.into_split();
            let head = format!(
                "POST {path} HTTP/1.1\r\nHost: e2e\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{"
            );
            write.write_all(head.as_bytes()).await.unwrap();
            let started = Instant::now();
            let trickler = tokio::spawn(async move {
                for _ in 0..50 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    if trickle && write.write_all(b" ").await.is_err() {
                        return;
                    }
                }
            });
            let mut buf = Vec::new();
            let closed = tokio::time::timeout(Duration::from_secs(5), read.read_to_end(&mut buf))
                .await
                .is_ok();
            trickler.abort();
            let took = started.elapsed();
            let replies = parse_responses(&buf);
            let what = if trickle {
                format!("POST {path} whose body trickles a byte per 100 ms")
            } else {
                format!("POST {path} whose body never comes")
            };
            assert_eq!(replies.len(), 1, "{what}: {buf:?}");
            let outcome = replies[0].error(&what, status, "RequestTimeout");
            assert_eq!(replies[0].header("connection"), Some("close"), "{what}");
            assert!(closed, "{what}: the connection stayed open");
            assert!(took >= timeout && took < timeout * 3, "{what}: {took:?}");
            arena
                .after(&what, format!("{outcome}, closed after {took:?}"))
                .await;
        }
    }
    arena.finish().await;
}

// ---------------------------------------------------------------------------
// The core's Unix socket
// ---------------------------------------------------------------------------

/// Connects to the core's socket, writes `bytes` and reports whether the core
/// closed the connection within `DUE` (and what it said first, if anything).
async fn core_garbage(core: &Core, prelude: &[u8], bytes: &[u8]) -> (bool, Vec<u8>) {
    let mut stream = tokio::net::UnixStream::connect(core.socket())
        .await
        .expect("connecting to the core");
    stream.write_all(prelude).await.expect("writing");
    if !prelude.is_empty() {
        // The welcome, before the garbage.
        let mut welcome = [0u8; 256];
        let n = tokio::time::timeout(DUE, stream.read(&mut welcome))
            .await
            .expect("no welcome")
            .expect("reading the welcome");
        let mut buf = BytesMut::from(&welcome[..n]);
        let welcome = ipc::FrameCodec::<ipc::Welcome, ipc::Hello>::new()
            .decode(&mut buf)
            .expect("a welcome frame")
            .expect("a whole welcome frame");
        assert!(
            matches!(welcome, ipc::Welcome::Accepted { .. }),
            "{welcome:?}"
        );
    }
    let _ = stream.write_all(bytes).await;
    let deadline = tokio::time::Instant::now() + DUE;
    let mut said = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Err(_) => return (false, said),
            Ok(Ok(0)) | Ok(Err(_)) => return (true, said),
            Ok(Ok(n)) => said.extend_from_slice(&chunk[..n]),
        }
    }
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

fn hello(hello: ipc::Hello) -> Vec<u8> {
    let mut buf = BytesMut::new();
    ipc::FrameCodec::<ipc::Welcome, ipc::Hello>::new()
        .encode(hello, &mut buf)
        .expect("encoding a hello");
    buf.to_vec()
}

/// Deterministic noise (xorshift), so that a failure can be replayed.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_core_socket_drops_only_that_connection() {
    let mut arena = Arena::default();
    let handshake = hello(ipc::Hello::new(ipc::Role::Handler));
    let garbage_body = noise(7, 1000);
    let mut wrong_magic = ipc::Hello::new(ipc::Role::Handler);
    wrong_magic.magic = *b"HTTP";
    let mut wrong_version = ipc::Hello::new(ipc::Role::Handler);
    wrong_version.version += 1;
    // (what, handshake first, bytes, the core must answer something before closing)
    let cases: Vec<(&str, bool, Vec<u8>, bool)> = vec![
        ("64 KiB of random bytes", false, noise(1, 64 * 1024), true),
        (
            "an HTTP request",
            false,
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            true,
        ),
        ("a length prefix of 0xFFFFFFFF", false, vec![0xff; 4], true),
        (
            // Within MAX_FRAME_LEN, but no handshake is that long: refused at once
            // rather than buffered while the stranger sends it.
            "a length prefix of 1 MiB before the handshake",
            false,
            {
                let mut b = (1u32 << 20).to_be_bytes().to_vec();
                b.extend_from_slice(&noise(3, 1024));
                b
            },
            true,
        ),
        (
            "a length prefix of 0xFFFFFFFF after the handshake",
            true,
            vec![0xff; 4],
            false,
        ),
        (
            "a length prefix of 0x7FFFFFFF and 1 KiB",
            true,
            {
                let mut b = 0x7fff_ffff_u32.to_be_bytes().to_vec();
                b.extend_from_slice(&noise(2, 1024));
                b
            },
            false,
        ),
        (
            "a valid length with garbage bincode",
            false,
            frame(&garbage_body),
            true,
        ),
        (
            "a valid length with garbage bincode after the handshake",
            true,
            frame(&garbage_body),
            false,
        ),
        (
            "a frame of length 0 after the handshake",
            true,
            frame(&[]),
            false,
        ),
        (
            "a handshake with the wrong magic",
            false,
            hello(wrong_magic),
            true,
        ),
        (
            "a handshake of another protocol version",
            false,
            hello(wrong_version),
            true,
        ),
        (
            "a request claiming a 2^62-byte string after the handshake",
            true,
            frame(&[0x01, 0x01, 0xfd, 0, 0, 0, 0, 0, 0, 0, 0x40]),
            false,
        ),
        (
            "a second handshake instead of a request",
            true,
            handshake.clone(),
            false,
        ),
        (
            "random bytes after the handshake",
            true,
            noise(3, 4096),
            false,
        ),
    ];
    for (what, handshaken, bytes, answers) in cases {
        let prelude = if handshaken {
            handshake.clone()
        } else {
            Vec::new()
        };
        let (closed, said) = core_garbage(&arena.core, &prelude, &bytes).await;
        assert!(closed, "{what}: the core kept the connection open");
        if answers {
            let mut buf = BytesMut::from(&said[..]);
            let welcome = ipc::FrameCodec::<ipc::Welcome, ipc::Hello>::new()
                .decode(&mut buf)
                .unwrap_or_else(|e| panic!("{what}: not a welcome frame: {e}"))
                .unwrap_or_else(|| panic!("{what}: no refusal before the close"));
            let ipc::Welcome::Refused { reason } = welcome else {
                panic!("{what}: {welcome:?}");
            };
            arena
                .after(
                    &format!("core socket: {what}"),
                    format!("refused ({reason}), closed"),
                )
                .await;
        } else {
            arena
                .after(&format!("core socket: {what}"), "connection dropped")
                .await;
        }
    }
    arena.finish().await;
}
