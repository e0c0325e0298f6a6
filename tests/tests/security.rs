//! Client authentication and per-client limits, against the real processes:
//! tokens (`auth = "token"`) hold a client to its own session and to the channels
//! and sessions they list, on every transport; rate and connection limits trip at
//! the configured numbers and recover.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use hyper::{Method, StatusCode};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use micromsg_e2e::*;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as WsMessage;

const SECRET: &str = "e2e-token-secret-e2e-token-secret-0123";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A token as the application's backend would sign it.
fn token(claims: Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn token_for(session: &str, more: Value) -> String {
    let mut claims = json!({"sid": session, "exp": now() + 300});
    claims
        .as_object_mut()
        .unwrap()
        .extend(more.as_object().unwrap().clone());
    token(claims)
}

fn token_handler(extra: &str) -> HandlerOptions {
    HandlerOptions {
        extra_toml: format!(
            "auth = \"token\"\ntoken_secret = {}\ntoken_leeway = 0\n{extra}",
            Value::from(SECRET)
        ),
        ..Default::default()
    }
    .with_backend_key()
}

async fn v1_as(h: &Handler, token: &str, path: &str, body: Value) -> (StatusCode, Value) {
    let auth = format!("Bearer {token}");
    h.v1_with(path, &[("Authorization", &auth)], &body).await
}

async fn x0_as(h: &Handler, token: &str, path: &str, body: Value) -> Value {
    let auth = format!("Bearer {token}");
    let headers: Vec<(&str, &str)> = X0_HEADERS
        .iter()
        .copied()
        .chain([("Authorization", auth.as_str())])
        .collect();
    let reply = h
        .request(Method::POST, path, &headers, body.to_string())
        .await;
    assert_eq!(reply.status, StatusCode::OK, "x0 {path}: {}", reply.text());
    reply.json()
}

fn assert_refused(reply: &(StatusCode, Value), status: StatusCode, kind: &str) {
    assert_eq!(reply.0, status, "{}", reply.1);
    assert_error(&reply.1, kind);
}

#[tokio::test]
async fn a_token_for_session_a_cannot_poll_acknowledge_or_send_as_b() {
    let (_core, h) = start(CoreOptions::default(), token_handler(""));
    let (a, b) = (session("a"), session("b"));
    let ta = token_for(&a, json!({"send": ["*"]}));

    let poll_b = v1_as(&h, &ta, "/v1/poll", json!({"session": b, "timeout": 0})).await;
    assert_refused(&poll_b, StatusCode::FORBIDDEN, "Forbidden");
    let ack_b = v1_as(&h, &ta, "/v1/ack", json!({"session": b})).await;
    assert_refused(&ack_b, StatusCode::FORBIDDEN, "Forbidden");
    let as_b = v1_as(
        &h,
        &ta,
        "/v1/publish",
        json!({"session": b, "target": {"session": a}, "data": 1}),
    )
    .await;
    assert_refused(&as_b, StatusCode::FORBIDDEN, "Forbidden");
    // The x0 paths answer 200 with the error, and a refused poll waits out the
    // poll timeout so that a tab does not spin on it.
    let started = std::time::Instant::now();
    let x0_poll = x0_as(&h, &ta, "/get", json!({"session_src": b})).await;
    assert_error(&x0_poll, "Forbidden");
    assert!(started.elapsed() >= Duration::from_millis(900));
    let x0_del = x0_as(&h, &ta, "/del", json!({"session_src": b})).await;
    assert_error(&x0_del, "Forbidden");

    // Its own session works on both APIs.
    let own = v1_as(&h, &ta, "/v1/poll", json!({"session": a, "timeout": 0})).await;
    assert_eq!(own.0, StatusCode::OK, "{}", own.1);
    let x0_own = x0_as(&h, &ta, "/get", json!({"session_src": a})).await;
    assert_eq!(x0_own["messages"], Value::Null, "{x0_own}");
}

#[tokio::test]
async fn a_token_publishes_subscribes_and_sends_only_where_it_allows() {
    let (_core, h) = start(CoreOptions::default(), token_handler(""));
    let (a, b, c) = (session("a"), session("b"), session("c"));
    let ta = token_for(
        &a,
        json!({"publish": ["chat.>"], "subscribe": ["chat.*"], "send": [b]}),
    );
    let tb = token_for(&b, json!({"subscribe": ["chat.>"]}));

    let sub = v1_as(
        &h,
        &tb,
        "/v1/subscribe",
        json!({"session": b, "channel": "chat.>"}),
    )
    .await;
    assert_eq!(sub.0, StatusCode::OK, "{}", sub.1);
    let wider = v1_as(
        &h,
        &ta,
        "/v1/subscribe",
        json!({"session": a, "channel": "chat.>"}),
    )
    .await;
    assert_refused(&wider, StatusCode::FORBIDDEN, "Forbidden");
    let sys = v1_as(
        &h,
        &ta,
        "/v1/subscribe",
        json!({"session": a, "channel": "$sys"}),
    )
    .await;
    assert_refused(&sys, StatusCode::FORBIDDEN, "Forbidden");
    let narrow = v1_as(
        &h,
        &ta,
        "/v1/subscribe",
        json!({"session": a, "channel": "chat.*"}),
    )
    .await;
    assert_eq!(narrow.0, StatusCode::OK, "{}", narrow.1);

    let publish = |channel: &str| json!({"session": a, "target": {"channel": channel}, "data": {"to": channel}});
    let ok = v1_as(&h, &ta, "/v1/publish", publish("chat.room1")).await;
    assert_eq!(ok.0, StatusCode::OK, "{}", ok.1);
    let outside = v1_as(&h, &ta, "/v1/publish", publish("news.today")).await;
    assert_refused(&outside, StatusCode::FORBIDDEN, "Forbidden");

    let direct = |to: &str| json!({"session": a, "target": {"session": to}, "data": {"to": to}});
    let to_b = v1_as(&h, &ta, "/v1/publish", direct(&b)).await;
    assert_eq!(to_b.0, StatusCode::OK, "{}", to_b.1);
    let to_c = v1_as(&h, &ta, "/v1/publish", direct(&c)).await;
    assert_refused(&to_c, StatusCode::FORBIDDEN, "Forbidden");
    let x0_to_c = x0_as(
        &h,
        &ta,
        "/set",
        json!({"session_src": a, "session_dst": c, "payload": {"x": 1}}),
    )
    .await;
    assert_error(&x0_to_c, "Forbidden");
    let x0_to_b = x0_as(
        &h,
        &ta,
        "/set",
        json!({"session_src": a, "session_dst": b, "payload": {"x0": 1}}),
    )
    .await;
    assert_eq!(x0_to_b["status"], "ok", "{x0_to_b}");

    // B received exactly what was allowed: the channel message, the direct one and
    // the x0 one; nothing of what was refused.
    let (status, polled) = v1_as(&h, &tb, "/v1/poll", json!({"session": b, "timeout": 1})).await;
    assert_eq!(status, StatusCode::OK, "{polled}");
    let mut data: Vec<String> = polled["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m.get("data").unwrap_or(m).to_string())
        .collect();
    if data.len() < 3 {
        let (_, more) = v1_as(&h, &tb, "/v1/poll", json!({"session": b, "timeout": 1})).await;
        data.extend(
            more["messages"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|m| m.get("data").unwrap_or(m).to_string()),
        );
    }
    data.sort();
    assert_eq!(data.len(), 3, "{data:?}");
    assert!(data.iter().any(|d| d.contains("chat.room1")), "{data:?}");
    assert!(data.iter().any(|d| d.contains(&b)), "{data:?}");
    assert!(data.iter().any(|d| d.contains("x0")), "{data:?}");
}

#[tokio::test]
async fn a_tokens_user_claim_binds_its_session_so_user_messages_reach_every_tab() {
    let (_core, h) = start(CoreOptions::default(), token_handler(""));
    let user = session("user");
    let tabs = [session("tab1"), session("tab2")];
    let tokens: Vec<String> = tabs
        .iter()
        .map(|tab| token_for(tab, json!({"sub": user})))
        .collect();
    // Any request with the token binds the session; here, an empty poll.
    for (tab, token) in tabs.iter().zip(&tokens) {
        let (status, reply) =
            v1_as(&h, token, "/v1/poll", json!({"session": tab, "timeout": 0})).await;
        assert_eq!(status, StatusCode::OK, "{reply}");
    }
    let sent = h
        .backend_ok(
            "/v1/backend/publish",
            json!({"target": {"user": user}, "data": {"hello": "user"}}),
        )
        .await;
    assert_eq!(sent["recipients"], 2, "{sent}");
    for (tab, token) in tabs.iter().zip(&tokens) {
        let (_, reply) = v1_as(&h, token, "/v1/poll", json!({"session": tab, "timeout": 2})).await;
        assert_eq!(
            reply["messages"][0]["data"],
            json!({"hello": "user"}),
            "{reply}"
        );
    }
}

#[tokio::test]
async fn missing_expired_and_tampered_tokens_are_refused_with_their_reason() {
    let (_core, h) = start(CoreOptions::default(), token_handler(""));
    let a = session("a");
    let body = json!({"session": a, "timeout": 0});

    let missing = h.v1("/v1/poll", body.clone()).await;
    assert_refused(&missing, StatusCode::UNAUTHORIZED, "Unauthorized");
    let expired = token(json!({"sid": a, "exp": now() - 5}));
    let (status, reply) = v1_as(&h, &expired, "/v1/poll", body.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(
        assert_error(&reply, "TokenExpired").contains("new one"),
        "{reply}"
    );
    let foreign = encode(
        &Header::new(Algorithm::HS256),
        &json!({"sid": a, "exp": now() + 60}),
        &EncodingKey::from_secret(b"not-the-secret-not-the-secret-not-the"),
    )
    .unwrap();
    let forged = v1_as(&h, &foreign, "/v1/poll", body.clone()).await;
    assert_refused(&forged, StatusCode::UNAUTHORIZED, "InvalidToken");
    let garbage = v1_as(&h, "abc.def.ghi", "/v1/poll", body.clone()).await;
    assert_refused(&garbage, StatusCode::UNAUTHORIZED, "InvalidToken");
    // The header says which scheme to use.
    let reply = h
        .request(Method::POST, "/v1/poll", &[], body.to_string())
        .await;
    assert_eq!(reply.header("www-authenticate").as_deref(), Some("Bearer"));
    // x0: the same refusals in a 200.
    let x0 = x0_as(
        &h,
        &expired,
        "/set",
        json!({"session_src": a, "session_dst": a, "payload": {}}),
    )
    .await;
    assert_error(&x0, "TokenExpired");

    // The backend API keeps its own key and needs no token.
    let bound = h
        .backend(
            "/v1/backend/publish",
            json!({"target": {"session": a}, "data": 1}),
        )
        .await;
    assert_eq!(bound.0, StatusCode::OK, "{}", bound.1);
    // Preflights and the served client library need none either.
    let preflight = h.request(Method::OPTIONS, "/v1/poll", &[], "").await;
    assert_eq!(preflight.status, StatusCode::NO_CONTENT);
    let library = h.request(Method::GET, "/v1/micromsg.js", &[], "").await;
    assert_eq!(library.status, StatusCode::OK);
}

async fn ws_close_of(h: &Handler, query: &str) -> (Option<Value>, Option<u16>) {
    let url = format!("ws://{}/v1/ws?{query}", h.addr());
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut last = None;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Ok(Some(Ok(WsMessage::Text(text)))) => {
                last = Some(serde_json::from_str(&text).unwrap())
            }
            Ok(Some(Ok(WsMessage::Close(frame)))) => return (last, frame.map(|f| f.code.into())),
            Ok(Some(Ok(_))) => {}
            other => panic!("no close frame: {other:?}"),
        }
    }
}

#[tokio::test]
async fn websocket_and_event_stream_take_the_token_from_the_query() {
    let (_core, h) = start(CoreOptions::default(), token_handler(""));
    let (a, b) = (session("a"), session("b"));
    let ta = token_for(&a, json!({"send": [a]}));

    let url = format!("ws://{}/v1/ws?session={a}&token={ta}", h.addr());
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let Some(Ok(WsMessage::Text(welcome))) = ws.next().await else {
        panic!("no welcome")
    };
    assert!(welcome.contains("welcome"), "{welcome}");
    drop(ws);

    let (last, code) = ws_close_of(&h, &format!("session={a}")).await;
    assert_eq!(code, Some(4401));
    assert_error_frame(&last.unwrap(), "Unauthorized");
    let (last, code) = ws_close_of(&h, &format!("session={b}&token={ta}")).await;
    assert_eq!(code, Some(4403));
    assert_error_frame(&last.unwrap(), "Forbidden");

    let mut sse = h.events(&format!("session={a}&token={ta}"), &[]).await;
    assert_eq!(sse.status, StatusCode::OK);
    let sse_b = h.events(&format!("session={b}&token={ta}"), &[]).await;
    assert_eq!(sse_b.status, StatusCode::FORBIDDEN);
    let sse_none = h.events(&format!("session={a}"), &[]).await;
    assert_eq!(sse_none.status, StatusCode::UNAUTHORIZED);

    // What comes over the authorised stream is the session's own mail.
    let sent = x0_as(
        &h,
        &ta,
        "/set",
        json!({"session_src": a, "session_dst": a, "payload": {"n": 1}}),
    )
    .await;
    assert_eq!(sent["status"], "ok", "{sent}");
    let event = sse.event(Duration::from_secs(5)).await;
    assert!(
        event.field("data").unwrap_or_default().contains("\"n\":1"),
        "{event:?}"
    );
}

#[tokio::test]
async fn an_open_websocket_and_event_stream_end_when_their_token_expires() {
    let (_core, h) = start(CoreOptions::default(), token_handler(""));
    let a = session("a");
    let short = token(json!({"sid": a, "exp": now() + 2}));
    let started = std::time::Instant::now();
    let (last, code) = ws_close_of(&h, &format!("session={a}&token={short}")).await;
    assert_eq!(code, Some(4401));
    assert_error_frame(&last.unwrap(), "TokenExpired");
    let lasted = started.elapsed();
    assert!(
        lasted >= Duration::from_millis(900) && lasted < Duration::from_secs(4),
        "{lasted:?}"
    );

    let b = session("b");
    let short = token(json!({"sid": b, "exp": now() + 2}));
    let mut sse = h.events(&format!("session={b}&token={short}"), &[]).await;
    assert_eq!(sse.status, StatusCode::OK);
    let error = sse.event(Duration::from_secs(5)).await;
    assert_eq!(error.field("event"), Some("error"), "{error:?}");
    assert!(
        error
            .field("data")
            .unwrap_or_default()
            .contains("TokenExpired"),
        "{error:?}"
    );
}

#[tokio::test]
async fn session_rate_limit_trips_at_the_configured_rate_and_recovers() {
    let (_core, h) = start(
        CoreOptions::default(),
        HandlerOptions {
            extra_toml: "rate_limit_session = 5\nrate_limit_session_burst = 5\n".into(),
            ..Default::default()
        },
    );
    let (a, b, c) = (session("a"), session("b"), session("c"));
    let send = |from: &str| json!({"session": from, "target": {"session": b}, "data": 1});
    for i in 0..5 {
        let (status, reply) = h.v1("/v1/publish", send(&a)).await;
        assert_eq!(status, StatusCode::OK, "request {i}: {reply}");
    }
    let reply = h
        .request(Method::POST, "/v1/publish", &[], send(&a).to_string())
        .await;
    assert_eq!(
        reply.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        reply.text()
    );
    assert_error(&reply.json(), "RateLimited");
    assert_eq!(reply.header("retry-after").as_deref(), Some("1"));
    // Another session has its own allowance; x0 gets the refusal in a 200.
    assert_eq!(h.v1("/v1/publish", send(&c)).await.0, StatusCode::OK);
    let x0 = h.set(&a, &b, &json!({})).await;
    assert_error(&x0, "RateLimited");
    // 5 per second: a fifth of a second later there is room for one again.
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(h.v1("/v1/publish", send(&a)).await.0, StatusCode::OK);
    // Nothing refused was stored: B has the 5 + 1 + 1 accepted, no more.
    let mut got = 0;
    while let Some(batch) = h.poll_messages(&b).await {
        got += batch.len();
    }
    assert_eq!(got, 7);
}

#[tokio::test]
async fn a_batch_over_the_session_rate_is_refused_whole_and_spends_nothing() {
    let (_core, h) = start(
        CoreOptions::default(),
        HandlerOptions {
            // A rate this low refills nothing while the test runs.
            extra_toml: "rate_limit_session = 1\nrate_limit_session_burst = 5\n".into(),
            ..Default::default()
        },
    );
    let (a, b) = (session("a"), session("b"));
    let batch = |n: usize| {
        let messages: Vec<Value> = (0..n)
            .map(|i| json!({"target": {"session": b}, "data": i}))
            .collect();
        json!({"session": a, "messages": messages})
    };
    assert_eq!(h.v1("/v1/publish_batch", batch(3)).await.0, StatusCode::OK);
    // 2 left: a batch of 3 is refused whole, and the 2 are still there after it.
    let (status, reply) = h.v1("/v1/publish_batch", batch(3)).await;
    assert_eq!(status, StatusCode::TOO_MANY_REQUESTS, "{reply}");
    assert_error(&reply, "RateLimited");
    assert_eq!(h.v1("/v1/publish_batch", batch(2)).await.0, StatusCode::OK);
    // More than the burst could never pass: not a "retry", a distinct refusal.
    let (status, reply) = h.v1("/v1/publish_batch", batch(6)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{reply}");
    assert_error(&reply, "BatchTooLarge");
    let got: Vec<Value> = h
        .v1_drain(&b, 0.2)
        .await
        .iter()
        .map(|m| m["data"].clone())
        .collect();
    assert_eq!(got, [json!(0), json!(1), json!(2), json!(0), json!(1)]);
}

async fn forwarded_poll(h: &Handler, forwarded_for: &str) -> StatusCode {
    h.request(
        Method::GET,
        "/v1/presence?channel=x",
        &[("X-Forwarded-For", forwarded_for)],
        "",
    )
    .await
    .status
}

/// The test is the proxy here: it writes X-Forwarded-For as nginx would and checks
/// that msghandler believes it only from a trusted peer.
const XFF_DIRECT: &str = "the test plays the proxy and writes X-Forwarded-For itself";

#[tokio::test]
async fn address_rate_limit_believes_x_forwarded_for_only_from_a_trusted_proxy() {
    let limits = "rate_limit_ip = 3\nrate_limit_ip_burst = 3\n";
    let (_core, proxied) = start(
        CoreOptions::default(),
        HandlerOptions {
            extra_toml: format!("{limits}trusted_proxies = [\"127.0.0.1\"]\n"),
            ..Default::default()
        }
        .direct(XFF_DIRECT),
    );
    for _ in 0..3 {
        assert_eq!(
            forwarded_poll(&proxied, "203.0.113.1").await,
            StatusCode::OK
        );
    }
    assert_eq!(
        forwarded_poll(&proxied, "203.0.113.1").await,
        StatusCode::TOO_MANY_REQUESTS
    );
    // Another client behind the same proxy; and a client that writes its own
    // X-Forwarded-For in front of the proxy's entry gains nothing.
    assert_eq!(
        forwarded_poll(&proxied, "203.0.113.2").await,
        StatusCode::OK
    );
    assert_eq!(
        forwarded_poll(&proxied, "1.2.3.4, 203.0.113.1").await,
        StatusCode::TOO_MANY_REQUESTS
    );

    let (_core2, direct) = start(
        CoreOptions::default(),
        HandlerOptions {
            extra_toml: limits.into(),
            ..Default::default()
        }
        .direct(XFF_DIRECT),
    );
    let statuses = [
        forwarded_poll(&direct, "198.51.100.1").await,
        forwarded_poll(&direct, "198.51.100.2").await,
        forwarded_poll(&direct, "198.51.100.3").await,
        forwarded_poll(&direct, "198.51.100.4").await,
    ];
    // Not from a trusted proxy: the header is ignored and all four are 127.0.0.1's.
    assert_eq!(statuses[3], StatusCode::TOO_MANY_REQUESTS, "{statuses:?}");
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(forwarded_poll(&direct, "x").await, StatusCode::OK);
}

#[tokio::test]
async fn connections_over_max_connections_per_ip_are_answered_and_closed() {
    let (_core, h) = start(
        CoreOptions::default(),
        HandlerOptions {
            extra_toml: "max_connections_per_ip = 2\n".into(),
            ..Default::default()
        }
        // Through nginx every connection comes from nginx, a trusted proxy, which
        // is not counted; and nginx pools its own upstream connections anyway.
        .direct("it counts the test's own TCP connections to msghandler"),
    );
    // Two keep-alive connections, each with one request answered: counted for sure.
    let mut held = Vec::new();
    while held.len() < 2 {
        if let Some(connection) = answered_connection(&h).await {
            held.push(connection);
        } else {
            // A connection of the harness's start-up probe may still be counted.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let v1 = eventually(&h, StatusCode::SERVICE_UNAVAILABLE).await;
    assert_error(&v1.json(), "TooManyConnections");
    let x0 = h.poll(&session("a")).await;
    assert_error(&x0, "TooManyConnections");
    drop(held);
    eventually(&h, StatusCode::OK).await;
}

/// The first answer to `GET /v1/presence` with `status`, asking for 5 s at most.
async fn eventually(h: &Handler, status: StatusCode) -> Reply {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let reply = h
            .request(Method::GET, "/v1/presence?channel=x", &[], "")
            .await;
        if reply.status == status || std::time::Instant::now() > deadline {
            assert_eq!(reply.status, status, "{}", reply.text());
            return reply;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A WebSocket error frame of `kind`.
fn assert_error_frame(frame: &Value, kind: &str) {
    assert_eq!(frame["op"], "error", "{frame}");
    assert_eq!(frame["exception_id"], kind, "{frame}");
}

/// A connection on which one request was answered 200 and that stays open (HTTP/1.1
/// keep-alive); `None` when the answer was another status.
async fn answered_connection(h: &Handler) -> Option<tokio::net::TcpStream> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(h.addr()).await.unwrap();
    stream
        .write_all(b"GET /v1/presence?channel=x HTTP/1.1\r\nHost: e2e\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.unwrap();
    (&head == b"HTTP/1.1 200").then_some(stream)
}

#[tokio::test]
async fn a_session_holds_one_parked_poll_and_a_newer_one_ends_the_older() {
    let (_core, h) = start(
        CoreOptions::default(),
        HandlerOptions {
            poll_timeout: 10.0,
            ..Default::default()
        },
    );
    let (a, b) = (session("a"), session("b"));
    let started = std::time::Instant::now();
    let older = async {
        let reply = h.poll(&a).await;
        (reply, started.elapsed())
    };
    let newer = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        h.poll(&a).await
    };
    let send = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        h.set_ok(&b, &a, &json!({"to": "newer"})).await
    };
    let ((older, answered), newer, _) = tokio::join!(older, newer, send);
    // The older poll is answered empty as soon as the newer one parks, and the
    // newer one gets the message.
    assert_eq!(older["messages"], Value::Null, "{older}");
    assert!(answered < Duration::from_millis(1500), "{answered:?}");
    assert_eq!(newer["messages"][0]["to"], "newer", "{newer}");
}

#[tokio::test]
async fn a_long_poll_ends_when_its_token_does() {
    let (_core, h) = start(CoreOptions::default(), token_handler(""));
    let a = session("a");
    let short = token(json!({"sid": a, "exp": now() + 2}));
    let started = std::time::Instant::now();
    let (status, reply) = v1_as(&h, &short, "/v1/poll", json!({"session": a, "timeout": 20})).await;
    let lasted = started.elapsed();
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(reply["messages"], json!([]), "{reply}");
    assert!(lasted < Duration::from_secs(4), "{lasted:?}");
    // The next one needs a fresh token (once the second of `exp` is over: JWT
    // times are whole seconds).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let again = v1_as(&h, &short, "/v1/poll", json!({"session": a, "timeout": 0})).await;
    assert_refused(&again, StatusCode::UNAUTHORIZED, "TokenExpired");
}
