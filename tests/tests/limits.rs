//! Back-pressure of the core, end to end: past `max_queued_bytes` or
//! `max_sessions` the core refuses with `Overloaded` (HTTP 503 on `/v1`, the error
//! body with HTTP 200 on the x0 paths) instead of growing, loses nothing it
//! accepted, and takes work again by itself once there is room.

use std::time::{Duration, Instant};

use micromsg_e2e::*;
use serde_json::Value;

fn limited_core(extra: &str) -> CoreOptions {
    CoreOptions {
        extra_toml: extra.into(),
        ..CoreOptions::default()
    }
    .embedded("max_sessions and max_queued_bytes are the embedded core's; Redis's maxmemory bounds a cluster")
}

/// An x0 SET from `src` to `dst` as the x0 client sends it; the raw reply.
async fn x0_set(h: &Handler, src: &str, dst: &str, payload: &Value) -> (StatusCode, Value) {
    let body = json!({"type": "SET", "session_src": src, "session_dst": dst, "payload": payload});
    let reply = h.post("/python/MsgHandler.py", &body.to_string()).await;
    (reply.status, reply.json())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishing_past_max_queued_bytes_is_refused_until_delivery_makes_room() {
    let (_core, h) = start(
        limited_core("max_queued_bytes = 2048\n"),
        HandlerOptions::default(),
    );
    let (a, b) = (session("a"), session("b"));
    let pad = "x".repeat(300);
    let mut accepted = Vec::new();
    let refusal = loop {
        let payload = json!({"n": accepted.len(), "pad": pad});
        let (status, reply) = x0_set(&h, &a, &b, &payload).await;
        assert_eq!(
            status,
            StatusCode::OK,
            "x0 paths always answer 200: {reply}"
        );
        if reply.get("error").is_some() {
            break reply;
        }
        assert_ok_with_id(&reply, "SET under the limit");
        accepted.push(payload);
        assert!(accepted.len() < 10, "2048 bytes cannot hold {accepted:?}");
    };
    assert_error(&refusal, "Overloaded");
    assert!(accepted.len() >= 5, "{} accepted", accepted.len());
    let refused = h
        .v1(
            "/v1/publish",
            json!({"session": a, "target": {"session": b}, "data": {"pad": pad}}),
        )
        .await;
    assert_v1_error(&refused, StatusCode::SERVICE_UNAVAILABLE, "Overloaded");

    // Delivery frees the room; everything accepted arrives, nothing refused does.
    let delivered = h.poll_messages(&b).await.expect("the accepted messages");
    let want: Vec<Value> = accepted
        .iter()
        .map(|p| {
            let mut p = p.clone();
            p["session_src"] = json!(a);
            p
        })
        .collect();
    assert_eq!(delivered, want);
    h.set_ok(&a, &b, &json!({"after": true, "pad": pad})).await;
    h.v1_ok(
        "/v1/publish",
        json!({"session": a, "target": {"session": b}, "data": {"v1": true}}),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_core_at_max_sessions_refuses_new_sessions_and_recovers_when_they_leave() {
    let (_core, h) = start(
        limited_core("max_sessions = 5\nsession_timeout = 0.3\nidle_mailbox_timeout = 0.3\n"),
        HandlerOptions::default(),
    );
    let src = session("src");
    let known: Vec<String> = (1..=5).map(|i| session(&format!("d{i}"))).collect();
    for dst in &known {
        h.set_ok(&src, dst, &json!({"to": dst})).await;
    }
    let newcomer = session("d6");
    let (status, reply) = x0_set(&h, &src, &newcomer, &json!({"n": 1})).await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_error(&reply, "Overloaded");
    let refused = h
        .v1(
            "/v1/publish",
            json!({"session": known[0], "target": {"session": newcomer}, "data": 1}),
        )
        .await;
    assert_v1_error(&refused, StatusCode::SERVICE_UNAVAILABLE, "Overloaded");

    // The sessions the core holds keep working, and lose nothing.
    h.set_ok(&src, &known[0], &json!({"again": true})).await;
    for dst in &known {
        let got = h.poll_messages(dst).await.expect("its messages");
        assert_eq!(got[0]["to"], json!(dst));
    }

    // Drained and gone quiet, they are forgotten and the newcomer gets in.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, reply) = x0_set(&h, &src, &newcomer, &json!({"n": 1})).await;
        if reply.get("error").is_none() {
            assert_ok_with_id(&reply, "SET once sessions have left");
            break;
        }
        assert_error(&reply, "Overloaded");
        assert!(Instant::now() < deadline, "still refused: {reply}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        h.poll_messages(&newcomer).await,
        Some(vec![json!({"n": 1, "session_src": src})])
    );
}
