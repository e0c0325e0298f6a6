//! The push transports of docs/TRANSPORTS.md over real connections: WebSocket
//! (`/v1/ws`: the welcome frame, flow control by acks, windows and fast-push, `get`,
//! pause, the request frames and their answers, close codes, keepalive, slow
//! readers) and Server-Sent Events (`/v1/events`: framing, heartbeats, resume,
//! errors), and the rule that binds them to long-polling: a session is one mailbox
//! whichever transport drains it, nothing acknowledged is given twice and nothing
//! unacknowledged is lost when a connection drops.
//!
//! The WebSocket client is tokio-tungstenite, so that every frame on the wire is
//! RFC 6455 as a browser would send and read it; the event streams are read with
//! the harness's [`EventStream`] as EventSource would.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use micromsg_e2e::*;
use serde_json::Value;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::{self, Message as WsMessage};

/// Upper bound for anything that must arrive: generous, so that a loaded machine
/// does not fail a test, short, so that a hang fails it in seconds.
const DUE: Duration = Duration::from_secs(5);
/// How long a test watches for something that must not arrive.
const QUIET: Duration = Duration::from_millis(300);

// ---------------------------------------------------------------------------
// A WebSocket client
// ---------------------------------------------------------------------------

/// One WebSocket connection to `/v1/ws`, speaking JSON frames.
struct Ws {
    stream: WebSocketStream<TcpStream>,
    /// Frames that arrived while [`Ws::call`] waited for its answer (messages,
    /// mostly): handed out by [`Ws::next`] first, in the order they came.
    pending: VecDeque<Value>,
    /// The last `ref` [`Ws::call`] used; each call gets a fresh one so that an answer
    /// can only match its own request.
    refs: u64,
}

/// What a WebSocket did next.
#[derive(Debug)]
enum WsNext {
    /// A text or binary frame, parsed as JSON.
    Frame(Value),
    /// A WebSocket ping (tungstenite queues the pong by itself).
    Ping,
    /// A close frame and its code (None: a close frame without one).
    Closed(Option<u16>),
    /// The connection ended without a close frame, or broke (why: shown in
    /// failure messages, through Debug only).
    Reset(#[allow(dead_code)] String),
    /// Nothing within the wait.
    Silent,
}

impl Ws {
    /// Opens `/v1/ws?<query>` on `socket`; an HTTP refusal of the upgrade comes back
    /// as `Err("<status> <body>")`.
    async fn connect_on(h: &Handler, socket: TcpStream, query: &str) -> Result<Ws, String> {
        let url = format!("ws://{}/v1/ws?{query}", h.addr());
        let handshake = tokio_tungstenite::client_async(url.as_str(), socket);
        match tokio::time::timeout(DUE, handshake).await {
            Err(_) => panic!("GET {url}: no upgrade within {DUE:?}"),
            Ok(Ok((stream, _response))) => Ok(Ws {
                stream,
                pending: VecDeque::new(),
                refs: 0,
            }),
            Ok(Err(tungstenite::Error::Http(response))) => {
                let body = response
                    .body()
                    .as_deref()
                    .map(String::from_utf8_lossy)
                    .unwrap_or_default()
                    .into_owned();
                Err(format!("{} {body}", response.status()))
            }
            Ok(Err(e)) => panic!("GET {url}: {e}"),
        }
    }

    async fn connect(h: &Handler, query: &str) -> Result<Ws, String> {
        let socket = TcpStream::connect(h.addr())
            .await
            .expect("connecting to msghandler");
        Ws::connect_on(h, socket, query).await
    }

    /// Opens `/v1/ws?<query>`; the upgrade must succeed.
    async fn open(h: &Handler, query: &str) -> Ws {
        Ws::connect(h, query)
            .await
            .unwrap_or_else(|e| panic!("GET /v1/ws?{query}: upgrade refused: {e}"))
    }

    /// Opens `/v1/ws?session=<session><more>` and reads the welcome frame, which
    /// must come first and name the session; returns it beside the connection.
    async fn welcomed(h: &Handler, session: &str, more: &str) -> (Ws, Value) {
        let mut ws = Ws::open(h, &format!("session={session}{more}")).await;
        let welcome = ws.frame().await;
        assert_eq!(welcome["op"], "welcome", "the first frame: {welcome}");
        assert_eq!(welcome["session"], json!(session), "{welcome}");
        (ws, welcome)
    }

    /// Reads the socket itself (not `pending`); pongs are skipped.
    async fn read(&mut self, within: Duration) -> WsNext {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let frame = match tokio::time::timeout_at(deadline, self.stream.next()).await {
                Err(_) => return WsNext::Silent,
                Ok(None) => return WsNext::Reset("the connection ended".into()),
                Ok(Some(Err(e))) => return WsNext::Reset(e.to_string()),
                Ok(Some(Ok(frame))) => frame,
            };
            let text = match frame {
                WsMessage::Text(text) => text.as_str().to_owned(),
                WsMessage::Binary(bytes) => String::from_utf8(bytes.to_vec())
                    .unwrap_or_else(|e| panic!("a binary frame that is not UTF-8: {e}")),
                WsMessage::Ping(_) => return WsNext::Ping,
                WsMessage::Pong(_) => continue,
                WsMessage::Close(close) => {
                    return WsNext::Closed(close.map(|c| u16::from(c.code)));
                }
                WsMessage::Frame(_) => unreachable!("tungstenite never reads raw frames"),
            };
            let json = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("a frame that is not JSON ({e}): {text:?}"));
            return WsNext::Frame(json);
        }
    }

    async fn next(&mut self, within: Duration) -> WsNext {
        match self.pending.pop_front() {
            Some(frame) => WsNext::Frame(frame),
            None => self.read(within).await,
        }
    }

    /// The next JSON frame (pings skipped); panics on anything else.
    async fn frame(&mut self) -> Value {
        loop {
            match self.next(DUE).await {
                WsNext::Frame(frame) => return frame,
                WsNext::Ping => continue,
                other => panic!("expected a frame, got {other:?}"),
            }
        }
    }

    /// The next frame, which must be a message; returns the whole frame.
    async fn message(&mut self) -> Value {
        let frame = self.frame().await;
        assert_eq!(frame["op"], "message", "expected a message, got {frame}");
        frame
    }

    /// The ids of the next `count` messages, each checked with [`given`].
    async fn messages(&mut self, count: usize) -> Vec<u64> {
        let mut ids = Vec::with_capacity(count);
        for _ in 0..count {
            ids.push(given(&self.message().await));
        }
        ids
    }

    /// Asserts that no frame comes within `within` (pings may) and the connection
    /// stays open.
    async fn assert_silent(&mut self, within: Duration, what: &str) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                WsNext::Silent => return,
                WsNext::Ping => continue,
                other => panic!("{what}: expected nothing, got {other:?}"),
            }
        }
    }

    /// Reads until the connection ends, up to `within`; returns how it ended (or
    /// `Silent`) and the frames read on the way.
    async fn end(&mut self, within: Duration) -> (WsNext, Vec<Value>) {
        let deadline = tokio::time::Instant::now() + within;
        let mut frames = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                WsNext::Frame(frame) => frames.push(frame),
                WsNext::Ping => continue,
                end => return (end, frames),
            }
        }
    }

    /// Asserts that the server closes the connection with `code` within [`DUE`],
    /// reading (and returning) whatever frames come first.
    async fn assert_closed_with(&mut self, code: u16, what: &str) -> Vec<Value> {
        let (end, frames) = self.end(DUE).await;
        match end {
            WsNext::Closed(Some(got)) if got == code => frames,
            other => panic!("{what}: expected close {code}, got {other:?} after {frames:?}"),
        }
    }

    async fn send(&mut self, frame: Value) {
        self.send_raw(WsMessage::text(frame.to_string())).await;
    }

    async fn send_raw(&mut self, frame: WsMessage) {
        tokio::time::timeout(DUE, self.stream.send(frame))
            .await
            .expect("sending a frame took too long")
            .expect("sending a frame");
    }

    /// Sends `request` with a fresh `ref` and returns the answer that echoes it
    /// (frames that come first are kept for [`Ws::next`]).
    async fn call(&mut self, mut request: Value) -> Value {
        self.refs += 1;
        let r = json!(format!("ref-{}", self.refs));
        request["ref"] = r.clone();
        self.send(request.clone()).await;
        loop {
            match self.read(DUE).await {
                WsNext::Frame(frame) if frame["ref"] == r && frame["op"] != "message" => {
                    return frame;
                }
                WsNext::Frame(frame) => self.pending.push_back(frame),
                WsNext::Ping => continue,
                other => panic!("{request}: expected its answer, got {other:?}"),
            }
        }
    }

    /// A call that must be answered with `op`; returns the answer.
    async fn call_ok(&mut self, request: Value, op: &str) -> Value {
        let answer = self.call(request.clone()).await;
        assert_eq!(answer["op"], op, "{request}: {answer}");
        answer
    }

    /// Acknowledges `ids` (with a ref, so the count comes back); returns the count.
    async fn ack(&mut self, ids: &[u64]) -> u64 {
        let answer = self
            .call_ok(json!({"op": "ack", "ids": ids}), "acked")
            .await;
        answer["count"]
            .as_u64()
            .unwrap_or_else(|| panic!("no count in {answer}"))
    }

    /// A close handshake started by the client, as a tab does on unload.
    async fn close(mut self) {
        let _ = tokio::time::timeout(DUE, self.stream.close(None)).await;
        let _ = self.end(DUE).await;
    }
}

/// Checks a message frame (an id, the envelope's own id the same) and returns the
/// id.
fn given(frame: &Value) -> u64 {
    assert_eq!(frame["op"], "message", "{frame}");
    let id = frame["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("a message frame without an id: {frame}"));
    assert_eq!(
        frame["message"]["id"],
        json!(id),
        "the frame's id is the envelope's: {frame}"
    );
    id
}

// ---------------------------------------------------------------------------
// Set-ups and HTTP steps
// ---------------------------------------------------------------------------

/// `ack` delivery: a message leaves the core only when it is acknowledged. The
/// visibility timeout is far beyond any test, so a prompt redelivery can only be a
/// dropped connection giving its unacknowledged messages back at once.
fn ack_core() -> CoreOptions {
    CoreOptions {
        delivery: Some("ack".into()),
        visibility_timeout: Some(60.0),
        ..Default::default()
    }
}

/// A handler with `extra_toml` (the `ws_*` and `sse_*` keys) and the backend key.
fn handler_with(extra_toml: &str) -> HandlerOptions {
    HandlerOptions {
        extra_toml: extra_toml.into(),
        ..Default::default()
    }
    .with_backend_key()
}

/// Publishes `data` to session `to` over HTTP from a sender session; returns its id.
async fn publish(h: &Handler, to: &str, data: Value) -> u64 {
    let reply = h
        .v1_ok(
            "/v1/publish",
            json!({"session": session("sender"), "target": {"session": to}, "data": data}),
        )
        .await;
    id_of(&reply)
}

/// Publishes `count` messages `{"n": i}` to `to`, one after the other; returns their
/// ids in order.
async fn queue(h: &Handler, to: &str, count: usize) -> Vec<u64> {
    let mut ids = Vec::with_capacity(count);
    for n in 0..count {
        ids.push(publish(h, to, json!({"n": n})).await);
    }
    ids
}

fn sorted(mut ids: Vec<u64>) -> Vec<u64> {
    ids.sort_unstable();
    ids
}

// ---------------------------------------------------------------------------
// Welcome and flow control
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_welcome_comes_first_with_flow_window_and_window_32_by_default() {
    let (_core, h) = start_default();
    let s = session("s");
    let (_ws, welcome) = Ws::welcomed(&h, &s, "").await;
    assert_eq!(welcome["flow"], "window", "{welcome}");
    assert_eq!(welcome["window"], 32, "{welcome}");

    for (more, flow) in [("&flow=ack", "ack"), ("&flow=fast", "fast")] {
        let (_ws, welcome) = Ws::welcomed(&h, &s, more).await;
        assert_eq!(welcome["flow"], flow, "?session=..{more}: {welcome}");
    }
    let (_ws, welcome) = Ws::welcomed(&h, &s, "&flow=window&window=5").await;
    assert_eq!(welcome["flow"], "window", "{welcome}");
    assert_eq!(welcome["window"], 5, "{welcome}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_window_above_1024_is_never_granted() {
    let (_core, h) = start_default();
    assert_window_capped(&h, &format!("session={}&window=5000", session("s")), 1024).await;
}

/// Opens `/v1/ws?<query>`, which asks for a window above `max`. Refusing is fine
/// (a 400 before the upgrade, or after it an error frame and close 1008), and so
/// is granting at most `max`; more is not.
async fn assert_window_capped(h: &Handler, query: &str, max: u64) {
    let mut ws = match Ws::connect(h, query).await {
        Err(refusal) => {
            assert!(
                refusal.starts_with("400"),
                "{query}: refused with {refusal}"
            );
            return;
        }
        Ok(ws) => ws,
    };
    match ws.next(DUE).await {
        WsNext::Frame(frame) if frame["op"] == "welcome" => {
            let window = frame["window"].as_u64().expect("a window");
            assert!(window <= max, "{query}: window {window} granted, max {max}");
        }
        WsNext::Frame(frame) if frame["op"] == "error" => {
            ws.assert_closed_with(1008, &format!("{query}: after {frame}"))
                .await;
        }
        WsNext::Closed(Some(1008)) => {}
        other => panic!("{query}: expected a welcome, an error or close 1008, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_default_window_and_ws_max_window_come_from_the_handler_config() {
    let (_core, h) = start(
        CoreOptions::default(),
        handler_with("ws_default_window = 4\nws_max_window = 8\n"),
    );
    let b = session("b");
    let ids = queue(&h, &b, 10).await;
    let (mut ws, welcome) = Ws::welcomed(&h, &b, "").await;
    assert_eq!(welcome["window"], 4, "ws_default_window: {welcome}");
    assert_eq!(ws.messages(4).await, ids[..4], "the default window's worth");
    ws.assert_silent(QUIET, "a 4-window with 4 unacknowledged")
        .await;

    assert_window_capped(&h, &format!("session={}&window=100", session("other")), 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_flow_gives_one_message_and_the_next_only_after_its_ack() {
    let (_core, h) = start_default();
    let b = session("b");
    let ids = queue(&h, &b, 5).await;
    let (mut ws, welcome) = Ws::welcomed(&h, &b, "&flow=ack").await;
    assert_eq!(welcome["flow"], "ack", "{welcome}");
    for (i, id) in ids.iter().enumerate() {
        assert_eq!(ws.messages(1).await, [*id], "message {i} in order");
        ws.assert_silent(QUIET, &format!("message {i} not yet acknowledged"))
            .await;
        // Without a ref an ack is not answered: the next frame must be the message.
        if i % 2 == 0 {
            ws.send(json!({"op": "ack", "ids": [id]})).await;
        } else {
            ws.send(json!({"op": "ack", "cursor": id})).await;
        }
    }
    ws.assert_silent(QUIET, "all five acknowledged").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn window_flow_gives_n_and_each_ack_makes_room_for_exactly_as_many_more() {
    // ack delivery, so that the counts the acks answer are the core's too.
    let (_core, h) = start(ack_core(), HandlerOptions::default());
    let b = session("b");
    let ids = queue(&h, &b, 10).await;
    let (mut ws, welcome) = Ws::welcomed(&h, &b, "&flow=window&window=3").await;
    assert_eq!(welcome["window"], 3, "{welcome}");
    assert_eq!(ws.messages(3).await, ids[..3], "a window of 3");
    ws.assert_silent(QUIET, "3 unacknowledged in a window of 3")
        .await;

    assert_eq!(ws.ack(&ids[..2]).await, 2, "acked by id");
    assert_eq!(ws.messages(2).await, ids[3..5], "room for 2");
    ws.assert_silent(QUIET, "3 unacknowledged again").await;

    // A cursor acknowledges ids[2..5]: the window is empty, room for 3.
    let answer = ws
        .call_ok(json!({"op": "ack", "cursor": ids[4]}), "acked")
        .await;
    assert_eq!(answer["count"], 3, "{answer}");
    assert_eq!(ws.messages(3).await, ids[5..8]);
    ws.assert_silent(QUIET, "3 unacknowledged again").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_op_changes_the_flow_of_an_open_connection() {
    let (_core, h) = start_default();
    let b = session("b");
    let ids = queue(&h, &b, 6).await;
    let (mut ws, _) = Ws::welcomed(&h, &b, "&flow=ack").await;
    assert_eq!(ws.messages(1).await, ids[..1]);
    ws.assert_silent(QUIET, "ack flow, one unacknowledged")
        .await;

    let answer = ws
        .call_ok(json!({"op": "flow", "mode": "window", "window": 3}), "ok")
        .await;
    assert!(answer["ref"].is_string(), "ref echoed: {answer}");
    assert_eq!(
        ws.messages(2).await,
        ids[1..3],
        "a window of 3 holds 2 more"
    );
    ws.assert_silent(QUIET, "window 3 full").await;

    ws.call_ok(json!({"op": "flow", "mode": "fast"}), "ok")
        .await;
    assert_eq!(ws.messages(3).await, ids[3..], "fast: the rest, no acks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fast_flow_pushes_everything_without_acks_and_none_is_given_again_after_reconnect() {
    let (_core, h) = start(ack_core(), HandlerOptions::default());
    let b = session("b");
    let mut ids = queue(&h, &b, 10).await;
    let (mut ws, welcome) = Ws::welcomed(&h, &b, "&flow=fast").await;
    assert_eq!(welcome["flow"], "fast", "{welcome}");
    assert_eq!(ws.messages(10).await, ids, "all ten without an ack");
    ids.push(publish(&h, &b, json!({"n": "live"})).await);
    assert_eq!(ws.messages(1).await, ids[10..], "pushed as it arrives");
    ws.close().await;

    // In ack delivery mode an unacknowledged message would come back on the next
    // connection: written to the socket counted as acknowledged.
    let (mut ws, _) = Ws::welcomed(&h, &b, "").await;
    ws.assert_silent(QUIET, "fast-pushed messages after a reconnect")
        .await;
    let fresh = publish(&h, &b, json!({"n": "fresh"})).await;
    assert_eq!(ws.messages(1).await, [fresh], "only the new one");
    ws.assert_silent(QUIET, "nothing more").await;
    assert_nothing_polled(&h, &b).await;
}

/// A long-poll for `session` finds nothing.
async fn assert_nothing_polled(h: &Handler, session: &str) {
    let polled = h
        .v1_poll_with(json!({"session": session, "timeout": 0.3, "auto_ack": false}))
        .await;
    assert!(polled.is_empty(), "{session}: a poll got {polled:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_sends_the_last_message_given_again_with_again_true() {
    let (_core, h) = start_default();
    let b = session("b");
    let (mut ws, _) = Ws::welcomed(&h, &b, "").await;
    ws.send(json!({"op": "get"})).await;
    ws.assert_silent(QUIET, "get before any message").await;

    let first = publish(&h, &b, json!({"n": 1})).await;
    let frame = ws.message().await;
    assert_eq!(given(&frame), first);
    assert_ne!(
        frame["again"], true,
        "a first delivery is not again: {frame}"
    );
    ws.send(json!({"op": "get"})).await;
    let again = ws.message().await;
    assert_eq!(again["again"], true, "{again}");
    assert_eq!(given(&again), first, "{again}");
    assert_eq!(again["message"], frame["message"], "the same message");
    ws.assert_silent(QUIET, "one get, one message").await;

    let second = publish(&h, &b, json!({"n": 2})).await;
    assert_eq!(ws.messages(1).await, [second]);
    ws.send(json!({"op": "get"})).await;
    let again = ws.message().await;
    assert_eq!((given(&again), &again["again"]), (second, &json!(true)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_over_websocket_holds_messages_until_resume() {
    let (_core, h) = start_default();
    let b = session("b");
    let (mut ws, _) = Ws::welcomed(&h, &b, "").await;
    ws.call_ok(json!({"op": "pause"}), "ok").await;
    let id = publish(&h, &b, json!({"held": true})).await;
    ws.assert_silent(Duration::from_millis(500), "a paused session")
        .await;
    ws.call_ok(json!({"op": "resume"}), "ok").await;
    assert_eq!(ws.messages(1).await, [id], "given once resumed");
}

// ---------------------------------------------------------------------------
// Requests over the WebSocket
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_subscribe_and_unsubscribe_over_websocket_answer_with_the_ref_echoed() {
    let (_core, h) = start(
        CoreOptions {
            extra_toml: "[[channels]]\npattern = \"hist.>\"\nhistory_len = 10\n".into(),
            ..Default::default()
        },
        HandlerOptions::default(),
    );
    let (a, b) = (session("a"), session("b"));
    let (mut wa, _) = Ws::welcomed(&h, &a, "").await;
    let (mut wb, _) = Ws::welcomed(&h, &b, "").await;

    // Any JSON value is a ref, and comes back as sent.
    let r = json!({"tab": [1, "two", null]});
    wb.send(json!({"op": "subscribe", "channel": "news.*", "ref": r}))
        .await;
    let answer = wb.frame().await;
    assert_eq!(answer["op"], "subscribed", "{answer}");
    assert_eq!(answer["ref"], r, "{answer}");
    assert_eq!(answer["complete"], true, "{answer}");

    let sent = wa
        .call_ok(
            json!({"op": "publish", "target": {"channel": "news.eu"}, "subject": "created", "data": {"order": 7}}),
            "published",
        )
        .await;
    assert_eq!(sent["recipients"], 1, "{sent}");
    let id = id_of(&sent);
    let frame = wb.message().await;
    assert_eq!(given(&frame), id);
    let envelope = &frame["message"];
    assert_eq!(envelope["source"], json!(a), "the connection's session");
    assert_eq!(envelope["target"], json!({"channel": "news.eu"}));
    assert_eq!(envelope["subject"], "created");
    assert_eq!(envelope["data"], json!({"order": 7}));

    let answer = wb
        .call_ok(
            json!({"op": "unsubscribe", "channel": "news.*"}),
            "unsubscribed",
        )
        .await;
    assert_eq!(answer["count"], 1, "{answer}");
    let sent = wa
        .call_ok(
            json!({"op": "publish", "target": {"channel": "news.eu"}, "data": 2}),
            "published",
        )
        .await;
    assert_eq!(sent["recipients"], 0, "{sent}");
    wb.assert_silent(QUIET, "unsubscribed").await;

    let sent = wa
        .call_ok(
            json!({"op": "publish", "target": {"session": b}, "data": "direct"}),
            "published",
        )
        .await;
    let frame = wb.message().await;
    assert_eq!(given(&frame), id_of(&sent));
    assert_eq!(frame["message"]["target"], json!({"session": b}));

    // Resume from history: what the channel kept after `since`.
    let mut kept = Vec::new();
    for n in 0..3 {
        let sent = wa
            .call_ok(
                json!({"op": "publish", "target": {"channel": "hist.a"}, "data": n}),
                "published",
            )
            .await;
        kept.push(id_of(&sent));
    }
    let answer = wb
        .call_ok(
            json!({"op": "subscribe", "channel": "hist.*", "since": kept[0]}),
            "subscribed",
        )
        .await;
    assert_eq!(
        (&answer["recovered"], &answer["complete"]),
        (&json!(2), &json!(true)),
        "{answer}"
    );
    assert_eq!(wb.messages(2).await, kept[1..], "the history after since");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_over_websocket_route_answers_back_to_the_asking_session() {
    let (_core, h) = start_default();
    let (a, b) = (session("a"), session("b"));
    let (mut wa, _) = Ws::welcomed(&h, &a, "").await;
    let (mut wb, _) = Ws::welcomed(&h, &b, "").await;

    // expect_reply on the publish itself.
    let question = wa
        .call_ok(
            json!({"op": "publish", "target": {"session": b}, "data": "q1", "expect_reply": 30}),
            "published",
        )
        .await;
    let question = id_of(&question);
    assert_eq!(wb.messages(1).await, [question]);
    let reply = wb
        .call_ok(
            json!({"op": "publish", "reference": question, "data": "a1"}),
            "published",
        )
        .await;
    assert_eq!(reply["recipients"], 1, "{reply}");
    let frame = wa.message().await;
    assert_eq!(given(&frame), id_of(&reply));
    assert_eq!(frame["message"]["reference"], json!(question));
    assert_eq!(frame["message"]["target"], json!({"session": a}));

    // A separate `replies` registration.
    let question = wa
        .call_ok(
            json!({"op": "publish", "target": {"session": b}, "data": "q2"}),
            "published",
        )
        .await;
    let question = id_of(&question);
    wa.call_ok(
        json!({"op": "replies", "reference": question, "ttl": 30}),
        "ok",
    )
    .await;
    assert_eq!(wb.messages(1).await, [question]);
    let reply = wb
        .call_ok(
            json!({"op": "publish", "reference": question, "data": "a2"}),
            "published",
        )
        .await;
    assert_eq!(wa.messages(1).await, [id_of(&reply)]);
}

/// Asserts an `error` frame of kind `kind` with a text.
fn assert_error_frame(frame: &Value, kind: &str, what: &str) {
    assert_eq!(frame["op"], "error", "{what}: {frame}");
    assert_eq!(frame["exception_id"], kind, "{what}: {frame}");
    assert!(
        frame["exception"].as_str().is_some_and(|t| !t.is_empty()),
        "{what}: an error without a text: {frame}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_websocket_requests_get_error_frames_with_the_ref_and_the_connection_stays_open() {
    let (_core, h) = start_default();
    let a = session("a");
    let (mut ws, _) = Ws::welcomed(&h, &a, "").await;
    let refused = [
        (
            json!({"op": "publish", "target": {"user": "u1"}, "data": 1}),
            "Forbidden",
        ),
        (
            json!({"op": "publish", "target": {"broadcast": true}, "data": 1}),
            "Forbidden",
        ),
        (
            json!({"op": "publish", "target": {"channel": "$sys"}, "data": 1}),
            "Forbidden",
        ),
        (
            json!({"op": "publish", "target": {"session": "b"}}),
            "MissingField",
        ),
        (
            json!({"op": "publish", "reference": 12345, "data": 1}),
            "NoRoute",
        ),
    ];
    for (request, kind) in refused {
        let answer = ws.call(request.clone()).await;
        assert_error_frame(&answer, kind, &request.to_string());
    }
    let answer = ws.call_ok(json!({"op": "ping"}), "pong").await;
    assert!(answer["ref"].is_string(), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_frames_are_read_as_json_and_unknown_keys_are_ignored() {
    let (_core, h) = start_default();
    let (mut ws, _) = Ws::welcomed(&h, &session("a"), "").await;
    let ping = json!({"op": "ping", "ref": 5, "from": "a binary-only client"});
    ws.send_raw(WsMessage::binary(ping.to_string().into_bytes()))
        .await;
    let pong = ws.frame().await;
    assert_eq!(
        (&pong["op"], &pong["ref"]),
        (&json!("pong"), &json!(5)),
        "{pong}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_that_is_not_a_json_object_with_a_known_op_closes_with_1008() {
    let (_core, h) = start_default();
    let a = session("a");
    let violations = [
        r#"{"op":"frobnicate","ref":1}"#,
        r#"{"ref":1}"#,
        "not json",
        "[1,2]",
    ];
    // Every case is tried before anything is asserted, so that a failure shows
    // them all.
    let mut outcomes = Vec::new();
    for violation in violations {
        let (mut ws, _) = Ws::welcomed(&h, &a, "").await;
        ws.send_raw(WsMessage::text(violation)).await;
        let (end, frames) = ws.end(Duration::from_secs(1)).await;
        let closed_1008 = matches!(end, WsNext::Closed(Some(1008)));
        outcomes.push((
            closed_1008,
            format!("{violation} -> {frames:?} then {end:?}"),
        ));
    }
    assert!(
        outcomes.iter().all(|(ok, _)| *ok),
        "each must close with 1008:\n{}",
        outcomes
            .iter()
            .map(|(_, outcome)| outcome.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_without_a_session_is_closed_with_1008() {
    let (_core, h) = start_default();
    let mut ws = Ws::open(&h, "flow=ack").await;
    ws.assert_closed_with(1008, "no session").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_over_max_body_bytes_closes_with_1009() {
    let (_core, h) = start(
        CoreOptions::default(),
        HandlerOptions {
            max_body_bytes: Some(1024),
            ..Default::default()
        },
    );
    let (mut ws, _) = Ws::welcomed(&h, &session("a"), "").await;
    ws.send(json!({"op": "publish", "target": {"session": "b"}, "data": "x".repeat(4096)}))
        .await;
    ws.assert_closed_with(1009, "a 4 KiB frame over max_body_bytes 1024")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kicked_websocket_gets_a_kicked_error_frame_and_close_4403() {
    let (_core, h) = start(CoreOptions::default(), handler_with(""));
    let b = session("b");
    let (mut ws, _) = Ws::welcomed(&h, &b, "").await;
    h.backend_ok(
        "/v1/backend/kick",
        json!({"session": b, "reason": "logged out"}),
    )
    .await;
    let frames = ws.assert_closed_with(4403, "kicked").await;
    let errors: Vec<&Value> = frames.iter().filter(|f| f["op"] == "error").collect();
    assert_eq!(
        errors.len(),
        1,
        "one error frame before the close: {frames:?}"
    );
    assert_error_frame(errors[0], "Kicked", "kicked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_is_closed_with_1000_when_the_handler_stops() {
    let (_core, mut h) = start_default();
    let (mut ws, _) = Ws::welcomed(&h, &session("b"), "").await;
    h.send_sigterm();
    ws.assert_closed_with(1000, "SIGTERM").await;
    assert!(h.wait_exit(DUE).is_some(), "msghandler exits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_is_closed_with_1011_when_the_core_stays_unreachable_past_core_wait() {
    let (mut core, h) = start_default(); // core_wait 1 s
    let (mut ws, _) = Ws::welcomed(&h, &session("b"), "").await;
    core.kill();
    ws.assert_closed_with(1011, "core gone").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x0_set_arrives_over_websocket_as_the_x0_payload() {
    let (_core, h) = start_default();
    let (a, b) = (session("a"), session("b"));
    let id = h.set_ok(&a, &b, &json!({"text": "hi", "n": 1})).await;
    let (mut ws, _) = Ws::welcomed(&h, &b, "").await;
    let frame = ws.message().await;
    assert_eq!(frame["id"], json!(id), "{frame}");
    assert_eq!(
        frame["message"],
        json!({"text": "hi", "n": 1, "session_src": a}),
        "exactly as a poll gives it"
    );
}

// ---------------------------------------------------------------------------
// Keepalive and slow readers
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_pings_every_ws_ping_interval_and_a_client_that_answers_stays_connected() {
    let (_core, h) = start(
        CoreOptions::default(),
        handler_with("ws_ping_interval = 0.3\n"),
    );
    let (mut ws, _) = Ws::welcomed(&h, &session("b"), "").await;
    // Reading answers each ping with a pong (tungstenite does so by itself).
    let watch = Duration::from_millis(1500);
    let deadline = tokio::time::Instant::now() + watch;
    let mut pings = 0;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match ws.next(left).await {
            WsNext::Ping => pings += 1,
            WsNext::Silent => break,
            other => panic!("an idle connection got {other:?}"),
        }
    }
    println!("{pings} pings in {watch:?} at ws_ping_interval 0.3 s");
    assert!(
        (3..=8).contains(&pings),
        "{pings} pings in {watch:?} at 0.3 s"
    );
    // Five intervals on, the answering client is still connected.
    ws.call_ok(json!({"op": "ping"}), "pong").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_sends_nothing_for_three_ping_intervals_is_disconnected() {
    let (_core, h) = start(
        CoreOptions::default(),
        handler_with("ws_ping_interval = 0.3\n"),
    );
    let (mut ws, _) = Ws::welcomed(&h, &session("b"), "").await;
    // Not reading: no pong goes out. 0.9 s is three intervals; allow as much again.
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let (end, frames) = ws.end(Duration::from_millis(500)).await;
    assert!(
        matches!(end, WsNext::Closed(_) | WsNext::Reset(_)),
        "still open after 6 intervals of silence: {end:?} after {frames:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn websocket_that_stops_reading_is_disconnected_and_loses_nothing_while_others_keep_low_latency()
 {
    // 600 x 16 KiB is 9.6 MB for the slow reader: well past what the kernel buffers
    // of one loopback connection hold (tcp_wmem tops out at 4 MiB).
    const SLOW_MESSAGES: usize = 600;
    const PAD: usize = 16 * 1024;
    // ws_send_timeout, plus slack for a loaded machine.
    const BOUND: Duration = Duration::from_millis(2500);
    // Far below ws_send_timeout: a connection that waited on the slow one would show.
    const LOW_LATENCY: Duration = Duration::from_millis(500);

    let (_core, h) = start(
        CoreOptions {
            mailbox_max_len: Some(10_000),
            ..ack_core()
        },
        // Through nginx, its buffers and a second pair of kernel socket buffers
        // hold more than the 9.6 MB sent, so msghandler's writes may never block:
        // what is tested is msghandler's reaction to its own socket filling up.
        handler_with("ws_max_buffer = 65536\nws_send_timeout = 1.0\n")
            .direct("it fills msghandler's own socket to the slow reader"),
    );
    let h = Arc::new(h);
    let (slow, fast) = (session("slow"), session("fast"));

    // The slow reader: a small receive buffer, so that the kernel holds little for
    // it, and the widest window, so that the handler has plenty to push. After the
    // welcome it reads nothing.
    let socket = TcpSocket::new_v4().expect("a socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let socket = socket.connect(h.addr()).await.expect("connecting");
    let mut slow_ws = Ws::connect_on(&h, socket, &format!("session={slow}&window=1024"))
        .await
        .expect("upgrade");
    assert_eq!(slow_ws.frame().await["op"], "welcome");

    // The other client reads all the time; each message carries when it was sent.
    let started = Instant::now();
    let (mut fast_ws, _) = Ws::welcomed(&h, &fast, "&flow=fast").await;
    let sent_total = Arc::new(AtomicUsize::new(usize::MAX));
    let reader = {
        let sent_total = Arc::clone(&sent_total);
        tokio::spawn(async move {
            let mut latencies = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(40);
            while latencies.len() < sent_total.load(Ordering::SeqCst) && Instant::now() < deadline {
                match fast_ws.next(Duration::from_millis(100)).await {
                    WsNext::Frame(frame) => {
                        let at = started.elapsed();
                        let sent = frame["message"]["data"]["sent_us"]
                            .as_u64()
                            .unwrap_or_else(|| panic!("not a timed message: {frame}"));
                        latencies.push(at.saturating_sub(Duration::from_micros(sent)));
                    }
                    WsNext::Ping | WsNext::Silent => {}
                    other => panic!("the fast reader's connection: {other:?}"),
                }
            }
            latencies
        })
    };
    let stop = Arc::new(AtomicBool::new(false));
    let ticker = {
        let (h, stop, fast) = (Arc::clone(&h), Arc::clone(&stop), fast.clone());
        tokio::spawn(async move {
            let mut sent = 0;
            while !stop.load(Ordering::SeqCst) {
                let sent_us = u64::try_from(started.elapsed().as_micros()).expect("fits");
                publish(&h, &fast, json!({"n": sent, "sent_us": sent_us})).await;
                sent += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            sent
        })
    };

    let pad = "x".repeat(PAD);
    let mut flood = Vec::with_capacity(SLOW_MESSAGES);
    for n in 0..SLOW_MESSAGES {
        flood.push(publish(&h, &slow, json!({"n": n, "pad": pad})).await);
    }
    let flooded = started.elapsed();
    tokio::time::sleep(BOUND).await;

    // By now the slow connection must be gone, and everything it held back in the
    // core: a new connection for the session gets every message, each once. Its
    // window is kept small and it acknowledges as it reads, as a healthy client.
    let mut resumed = Ws::open(&h, &format!("session={slow}&window=2")).await;
    assert_eq!(resumed.frame().await["op"], "welcome");
    let mut got = Vec::with_capacity(SLOW_MESSAGES);
    let resume_deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while got.len() < SLOW_MESSAGES {
        let left = resume_deadline.saturating_duration_since(tokio::time::Instant::now());
        match resumed.next(left).await {
            WsNext::Frame(frame) => {
                let id = given(&frame);
                resumed.send(json!({"op": "ack", "ids": [id]})).await;
                got.push(id);
            }
            WsNext::Ping => {}
            _ => break,
        }
    }
    let resumed_at = started.elapsed();

    // Only now read what reached the slow client's socket: it must end in a 4408
    // close or a reset, not go on.
    let (slow_end, slow_frames) = slow_ws.end(DUE).await;

    stop.store(true, Ordering::SeqCst);
    let sent = ticker.await.expect("the ticker");
    sent_total.store(sent, Ordering::SeqCst);
    let latencies = reader.await.expect("the fast reader");
    let max = latencies.iter().max().copied().unwrap_or_default();
    println!(
        "flood of {SLOW_MESSAGES} published by {flooded:?}; the new connection had {} by \
         {resumed_at:?}; the slow one read {} frames, then {slow_end:?}; the other client \
         got {}/{sent} messages, max latency {max:?}",
        got.len(),
        slow_frames.len(),
        latencies.len()
    );

    assert!(
        matches!(slow_end, WsNext::Closed(Some(4408)) | WsNext::Reset(_)),
        "the slow reader was not disconnected (close 4408 or reset): {slow_end:?}"
    );
    assert_eq!(
        sorted(got.clone()),
        flood,
        "a new connection gets every message the slow one did not acknowledge, once \
         ({} of {SLOW_MESSAGES})",
        got.len()
    );
    assert_eq!(latencies.len(), sent, "the other client got every message");
    assert!(
        max < LOW_LATENCY,
        "the other client waited {max:?} for a message while the slow one stalled"
    );
}

// ---------------------------------------------------------------------------
// Resume across connections and transports
// ---------------------------------------------------------------------------

/// What [`drop_with_four_unacked`] left, ids in order.
struct Dropped {
    /// Given and acknowledged before the drop.
    acked: Vec<u64>,
    /// What the acknowledge answered (the count of acknowledged messages).
    ack_count: u64,
    /// Given (written to the connection) and not acknowledged.
    written: Vec<u64>,
    /// Never given: two queued behind the full window, two published after the drop.
    rest: Vec<u64>,
}

impl Dropped {
    /// Everything not acknowledged, in id order.
    fn unacked(&self) -> Vec<u64> {
        [&self.written[..], &self.rest[..]].concat()
    }
}

/// The first half of every resume test: eight messages for `b`; a window-4
/// WebSocket is given four, acknowledges the first two (waiting for the answer), is
/// given the two the window then has room for, and drops without a close handshake,
/// as a killed tab, with four given and not acknowledged and two queued behind
/// them; then two more are published.
async fn drop_with_four_unacked(h: &Handler, b: &str) -> Dropped {
    let ids = queue(h, b, 8).await;
    let (mut ws, _) = Ws::welcomed(h, b, "&window=4").await;
    assert_eq!(ws.messages(4).await, ids[..4], "a window of 4");
    ws.assert_silent(QUIET, "window full").await;
    let ack_count = ws.ack(&ids[..2]).await;
    assert_eq!(ws.messages(2).await, ids[4..6], "room for two");
    ws.assert_silent(QUIET, "window full again").await;
    drop(ws);
    let new = queue(h, b, 2).await;
    Dropped {
        acked: ids[..2].to_vec(),
        ack_count,
        written: ids[2..6].to_vec(),
        rest: [&ids[6..], &new[..]].concat(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_websocket_gives_back_its_unacked_messages_at_once_and_a_new_one_gets_exactly_those_and_the_new()
 {
    let (_core, h) = start(ack_core(), HandlerOptions::default());
    let b = session("b");
    let dropped = drop_with_four_unacked(&h, &b).await;
    assert_eq!(dropped.ack_count, 2, "two acknowledged");
    let expected = dropped.unacked();
    let (mut ws, _) = Ws::welcomed(&h, &b, "").await;
    let got = ws.messages(expected.len()).await;
    assert_eq!(sorted(got.clone()), expected, "got {got:?}");
    ws.assert_silent(QUIET, "nothing acknowledged comes again")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_websocket_resumed_over_sse_with_last_event_id_gets_exactly_the_unacked_and_the_new()
 {
    let (_core, h) = start(ack_core(), HandlerOptions::default());
    let b = session("b");
    let dropped = drop_with_four_unacked(&h, &b).await;
    assert_eq!(dropped.ack_count, 2, "two acknowledged");
    let expected = dropped.unacked();
    // The page resumes from the last id it acknowledged.
    let last_acked = dropped.acked[1];
    let mut sse = h
        .events(
            &format!("session={b}"),
            &[("Last-Event-ID", &last_acked.to_string())],
        )
        .await;
    assert_eq!(sse.status, StatusCode::OK);
    let events = sse.events(expected.len(), DUE).await;
    for event in &events {
        assert_eq!(id_of(&event.json()), event.id(), "id: is the message id");
    }
    let got: Vec<u64> = events.iter().map(SseBlock::id).collect();
    assert_eq!(sorted(got.clone()), expected, "got {got:?}");
    sse.assert_no_event(QUIET, "nothing acknowledged comes again")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_websocket_resumed_by_long_poll_gets_exactly_the_unacked_and_the_new() {
    let (_core, h) = start(ack_core(), HandlerOptions::default());
    let b = session("b");
    let dropped = drop_with_four_unacked(&h, &b).await;
    assert_eq!(dropped.ack_count, 2, "two acknowledged");
    let got = ids_of(&h.v1_drain(&b, 0.3).await);
    assert_eq!(sorted(got.clone()), dropped.unacked(), "got {got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_x0_mode_a_dropped_websocket_still_gives_back_what_it_did_not_acknowledge() {
    // x0 delivery: the core forgets a message when it hands it over. A WebSocket
    // client acknowledges what it handled, so msghandler keeps what it gave until
    // then and gives back the rest when the connection drops: nothing is lost even
    // here, and what was written but not acknowledged comes again (the browser
    // client drops what it handled already by id).
    let (_core, h) = start_default();
    let b = session("b");
    let dropped = drop_with_four_unacked(&h, &b).await;
    let expected = dropped.unacked();
    let (mut ws, _) = Ws::welcomed(&h, &b, "").await;
    let got = ws.messages(expected.len()).await;
    assert_eq!(sorted(got.clone()), expected, "got {got:?}");
    ws.assert_silent(QUIET, "what was acknowledged").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_acknowledged_over_one_transport_is_not_redelivered_over_another() {
    let (_core, h) = start(ack_core(), HandlerOptions::default());
    let b = session("b");
    let query = format!("session={b}");

    // WebSocket: m1 given and acknowledged.
    let m1 = publish(&h, &b, json!("m1")).await;
    let (mut ws, _) = Ws::welcomed(&h, &b, "").await;
    assert_eq!(ws.messages(1).await, [m1]);
    assert_eq!(ws.ack(&[m1]).await, 1);
    ws.close().await;

    // SSE, a page's first stream: m1 does not come again, m2 does.
    let m2 = publish(&h, &b, json!("m2")).await;
    let mut sse = h.events(&query, &[]).await;
    assert_eq!(sse.event(DUE).await.id(), m2, "after m1 was acked over WS");
    sse.assert_no_event(QUIET, "m1 acked over WS").await;
    drop(sse);

    // EventSource reconnects with Last-Event-ID m2: that acknowledges m2.
    let m3 = publish(&h, &b, json!("m3")).await;
    let mut sse = h
        .events(&query, &[("Last-Event-ID", &m2.to_string())])
        .await;
    assert_eq!(sse.event(DUE).await.id(), m3, "after Last-Event-ID m2");
    sse.assert_no_event(QUIET, "m2 acked by Last-Event-ID")
        .await;
    drop(sse);

    // Long-poll: m3 (written last over SSE) acknowledged by cursor, m4 by id.
    h.v1_ok("/v1/ack", json!({"session": b, "cursor": m3}))
        .await;
    let m4 = publish(&h, &b, json!("m4")).await;
    let polled = h
        .v1_poll_with(json!({"session": b, "timeout": 1, "auto_ack": false}))
        .await;
    assert_eq!(ids_of(&polled), [m4], "after m3 was acked by cursor");
    let acked = h.v1_ok("/v1/ack", json!({"session": b, "ids": [m4]})).await;
    assert_eq!(acked["acked"], 1, "{acked}");

    // Nothing acknowledged anywhere comes again over any transport.
    let (mut ws, _) = Ws::welcomed(&h, &b, "").await;
    ws.assert_silent(QUIET, "WebSocket after everything was acked")
        .await;
    ws.close().await;
    let mut sse = h.events(&query, &[]).await;
    sse.assert_no_event(QUIET, "SSE after everything was acked")
        .await;
    drop(sse);
    assert_nothing_polled(&h, &b).await;
}

// ---------------------------------------------------------------------------
// Server-Sent Events
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_is_an_uncached_unbuffered_event_stream_that_starts_with_retry() {
    let (_core, h) = start_default();
    let mut sse = h.events(&format!("session={}", session("b")), &[]).await;
    assert_eq!(sse.status, StatusCode::OK);
    let content_type = sse.header("content-type").unwrap_or_default();
    assert!(
        content_type.starts_with("text/event-stream"),
        "Content-Type: {content_type:?}"
    );
    let cache = sse.header("cache-control").unwrap_or_default();
    assert!(cache.contains("no-store"), "Cache-Control: {cache:?}");
    if !h.via_nginx() {
        // nginx is this header's addressee and does not pass it on; that nginx does
        // not buffer is what every SSE test's timely events show.
        assert_eq!(sse.header("x-accel-buffering").as_deref(), Some("no"));
    }
    match sse.next(DUE).await {
        SseNext::Block(_) => {}
        other => panic!("expected the retry block, got {other:?}"),
    }
    assert_eq!(
        sse.first_lines.first().map(String::as_str),
        Some("retry: 2000"),
        "the first line: {:?}",
        sse.first_lines
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_event_id_is_the_message_id_and_data_the_delivered_message_on_one_line() {
    let (_core, h) = start_default();
    let (a, b) = (session("a"), session("b"));
    let first = publish(&h, &b, json!({"n": 1, "text": "line\nbreak"})).await;
    let second = publish(&h, &b, json!([1, 2])).await;
    let x0 = h.set_ok(&a, &b, &json!({"x0": true})).await;
    let mut sse = h.events(&format!("session={b}"), &[]).await;
    let events = sse.events(3, DUE).await;
    for event in &events {
        assert_eq!(event.field("event"), Some("message"), "{event:?}");
        assert_eq!(event.data_lines(), 1, "{event:?}");
    }
    let ids: Vec<u64> = events.iter().map(SseBlock::id).collect();
    assert_eq!(ids, [first, second, x0]);
    assert_eq!(id_of(&events[0].json()), first);
    assert_eq!(
        events[0].json()["data"],
        json!({"n": 1, "text": "line\nbreak"})
    );
    assert_eq!(events[1].json()["data"], json!([1, 2]));
    assert_eq!(
        events[2].json(),
        json!({"x0": true, "session_src": a}),
        "an x0 message is its payload, as a poll gives it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_sends_a_heartbeat_comment_every_sse_heartbeat() {
    let (_core, h) = start(
        CoreOptions::default(),
        handler_with("sse_heartbeat = 0.3\n"),
    );
    let mut sse = h.events(&format!("session={}", session("b")), &[]).await;
    let watch = Duration::from_millis(1500);
    let deadline = tokio::time::Instant::now() + watch;
    let mut comments = 0;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match sse.next(left).await {
            SseNext::Block(block) if block.is_comment() => comments += 1,
            SseNext::Block(block) if block.field("retry").is_some() => {}
            SseNext::Block(block) => panic!("an idle stream sent {block:?}"),
            SseNext::Ended => panic!("an idle stream ended"),
            SseNext::Silent => break,
        }
    }
    println!("{comments} heartbeat comments in {watch:?} at sse_heartbeat 0.3 s");
    assert!(
        (3..=8).contains(&comments),
        "{comments} heartbeats in {watch:?} at 0.3 s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_last_event_id_acknowledges_up_to_it_and_the_rest_comes_again() {
    let (_core, h) = start(ack_core(), HandlerOptions::default());
    let b = session("b");
    let ids = queue(&h, &b, 3).await;
    let mut sse = h.events(&format!("session={b}"), &[]).await;
    let got: Vec<u64> = sse.events(3, DUE).await.iter().map(SseBlock::id).collect();
    assert_eq!(got, ids);
    drop(sse);

    // The page saw all three but remembered the second (query form, as a page's
    // first stream): the third comes again, beside the new one.
    let m4 = publish(&h, &b, json!({"n": 3})).await;
    let mut sse = h
        .events(&format!("session={b}&last_event_id={}", ids[1]), &[])
        .await;
    let got: Vec<u64> = sse.events(2, DUE).await.iter().map(SseBlock::id).collect();
    assert_eq!(sorted(got.clone()), [ids[2], m4], "got {got:?}");
    sse.assert_no_event(QUIET, "the second and those before it are acked")
        .await;
    drop(sse);

    // EventSource's own reconnect: Last-Event-ID acknowledges everything so far.
    let mut sse = h
        .events(
            &format!("session={b}"),
            &[("Last-Event-ID", &m4.to_string())],
        )
        .await;
    sse.assert_no_event(QUIET, "everything up to Last-Event-ID acked")
        .await;
    let m5 = publish(&h, &b, json!({"n": 4})).await;
    assert_eq!(sse.event(DUE).await.id(), m5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_stream_of_a_kicked_session_ends_with_an_error_event_kicked() {
    let (_core, h) = start(CoreOptions::default(), handler_with(""));
    let b = session("b");
    let mut sse = h.events(&format!("session={b}"), &[]).await;
    assert!(
        matches!(sse.next(DUE).await, SseNext::Block(_)),
        "retry first"
    );
    h.backend_ok(
        "/v1/backend/kick",
        json!({"session": b, "reason": "logged out"}),
    )
    .await;
    let error = sse.event(DUE).await;
    assert_eq!(error.field("event"), Some("error"), "{error:?}");
    assert_error(&error.json(), "Kicked");
    loop {
        match sse.next(DUE).await {
            SseNext::Ended => break,
            SseNext::Block(block) if block.is_comment() => continue,
            other => panic!("after the error event the stream ends, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_without_a_valid_session_is_400_with_the_json_error_before_any_stream() {
    let (_core, h) = start_default();
    let missing = h.v1_get("/v1/events").await;
    assert_v1_error(&missing, StatusCode::BAD_REQUEST, "MissingField");
    let too_long = h
        .v1_get(&format!("/v1/events?session={}", "s".repeat(300)))
        .await;
    assert_v1_error(&too_long, StatusCode::BAD_REQUEST, "InvalidField");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_with_client_acks_loses_nothing_the_page_did_not_acknowledge() {
    // With ack=client the stream acknowledges nothing by itself: a page that dies
    // with events written but unread gets them again, however many batches it was.
    let (_core, h) = start(ack_core(), HandlerOptions::default());
    let b = session("b");
    let ids = queue(&h, &b, 6).await;
    let mut sse = h.events(&format!("session={b}&ack=client"), &[]).await;
    let mut seen = Vec::new();
    while seen.len() < 6 {
        seen.push(sse.event(DUE).await.id());
    }
    assert_eq!(sorted(seen), ids);
    let acked = h
        .v1_ok("/v1/ack", json!({"session": b, "ids": &ids[..2]}))
        .await;
    assert_eq!(acked["acked"], 2, "{acked}");
    drop(sse);
    // The next page first takes back what the last one may have left unread.
    h.v1_ok("/v1/release", json!({"session": b})).await;
    let polled = h
        .v1_poll_with(json!({"session": b, "timeout": 1, "auto_ack": false}))
        .await;
    assert_eq!(
        sorted(ids_of(&polled)),
        ids[2..],
        "exactly the unacknowledged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn release_gives_back_at_once_what_a_dead_page_was_handed_by_a_long_poll() {
    let (_core, h) = start(ack_core(), HandlerOptions::default());
    let b = session("b");
    let ids = queue(&h, &b, 3).await;
    let given = h
        .v1_poll_with(json!({"session": b, "timeout": 1, "auto_ack": false}))
        .await;
    assert_eq!(ids_of(&given), ids, "handed out, then the page died");
    let released = h.v1_ok("/v1/release", json!({"session": b})).await;
    assert_eq!(released["released"], 3, "{released}");
    let again = h
        .v1_poll_with(json!({"session": b, "timeout": 1, "auto_ack": false}))
        .await;
    assert_eq!(
        ids_of(&again),
        ids,
        "at once, not after the visibility timeout"
    );
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("reading /proc");
    // After the command name in parentheses: field 14 and 15 of the whole line.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_streams_on_one_session_do_not_supersede_each_other_in_a_loop() {
    // A second tab on the session, or a reconnect while the old stream lingers:
    // each stream's poll supersedes the other's at the core. Both must back off
    // instead of re-polling at once, which kept a core busy before.
    let (core, h) = start_default();
    let b = session("b");
    let query = format!("session={b}");
    let mut one = h.events(&query, &[]).await;
    let mut two = h.events(&query, &[]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (handler_before, core_before) = (cpu_ticks(h.pid()), cpu_ticks(core.pid()));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let spent = cpu_ticks(h.pid()) - handler_before + cpu_ticks(core.pid()) - core_before;
    println!("two streams on one session for 2 s: {spent} ticks of CPU in both processes");
    assert!(spent < 20, "{spent} clock ticks in 2 s: the polls spin");
    // And messages still get through, to one of them.
    let id = publish(&h, &b, json!("m")).await;
    let got = tokio::select! {
        e = one.event(DUE) => e.id(),
        e = two.event(DUE) => e.id(),
    };
    assert_eq!(got, id);
}
