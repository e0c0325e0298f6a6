//! Delivery rules: who gets what, in which order, how often, how fast; the long-poll
//! timeout; ack mode; mailbox and payload limits; many polls on one IPC connection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use micromsg_e2e::*;

/// Polls `session` until `count` messages arrived or a poll comes back empty.
async fn collect(h: &Handler, session: &str, count: usize) -> Vec<serde_json::Value> {
    let mut all = Vec::new();
    while all.len() < count {
        match h.poll_messages(session).await {
            Some(batch) => {
                assert!(!batch.is_empty(), "a batch is never an empty array");
                all.extend(batch);
            }
            None => break,
        }
    }
    all
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_is_delivered_to_its_destination_only_in_order_and_exactly_once() {
    let (_core, h) = start_default();
    let (a, b, c) = (session("a"), session("b"), session("c"));
    for seq in 0..20 {
        h.set_ok(
            &a,
            &b,
            &json!({"seq": seq, "text": format!("message {seq}")}),
        )
        .await;
    }
    let (for_c, for_b) = tokio::join!(h.poll(&c), collect(&h, &b, 20));
    assert_eq!(for_c, json!({"messages": null}), "c was sent nothing");
    let expected: Vec<_> = (0..20)
        .map(|seq| json!({"seq": seq, "text": format!("message {seq}"), "session_src": a}))
        .collect();
    assert_eq!(for_b, expected, "all 20, in order, from a");
    assert_eq!(
        h.poll(&b).await,
        json!({"messages": null}),
        "delivered exactly once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_poll_wakes_within_milliseconds_of_a_set() {
    let (_core, h) = start(
        CoreOptions::default(),
        HandlerOptions {
            poll_timeout: 5.0,
            ..Default::default()
        },
    );
    let (a, b) = (session("a"), session("b"));
    let poll = async {
        let reply = h.poll(&b).await;
        (reply, Instant::now())
    };
    let set = async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        h.set_ok(&a, &b, &json!({"wake": "up"})).await;
        Instant::now()
    };
    let ((reply, polled_at), set_at) = tokio::join!(poll, set);
    assert_eq!(reply["messages"], json!([{"wake": "up", "session_src": a}]));
    let latency = polled_at.saturating_duration_since(set_at);
    println!("parked poll answered {latency:?} after the SET reply");
    assert!(
        latency < Duration::from_millis(50),
        "poll woke {latency:?} after the SET"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poll_with_nothing_to_deliver_returns_null_at_the_poll_timeout() {
    let (_core, h) = start_default(); // poll timeout 1 s
    let started = Instant::now();
    let reply = h.poll(&session("lonely")).await;
    let elapsed = started.elapsed();
    assert_eq!(reply, json!({"messages": null}));
    assert!(
        (Duration::from_millis(900)..=Duration::from_secs(3)).contains(&elapsed),
        "a 1 s poll took {elapsed:?}"
    );
}

fn ack_mode() -> CoreOptions {
    CoreOptions {
        delivery: Some("ack".into()),
        visibility_timeout: Some(1.0),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_mode_unacked_batch_is_redelivered_after_visibility_timeout() {
    let (_core, h) = start(ack_mode(), HandlerOptions::default());
    let (a, b) = (session("a"), session("b"));
    h.set_ok(&a, &b, &json!({"n": 1})).await;
    let first = h.poll_messages(&b).await;
    assert_eq!(first, Some(vec![json!({"n": 1, "session_src": a})]));
    // Neither a GET nor a DEL within the visibility timeout: the tab "died".
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        h.poll_messages(&b).await,
        first,
        "the unacked batch is given again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_mode_batch_acknowledged_by_del_is_not_redelivered() {
    let (_core, h) = start(ack_mode(), HandlerOptions::default());
    let (a, b) = (session("a"), session("b"));
    h.set_ok(&a, &b, &json!({"n": 1})).await;
    assert_eq!(
        h.poll_messages(&b).await,
        Some(vec![json!({"n": 1, "session_src": a})])
    );
    h.del_ok(&b).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(h.poll(&b).await, json!({"messages": null}), "acked by DEL");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ack_mode_batch_acknowledged_by_the_next_get_is_not_redelivered() {
    let (_core, h) = start(ack_mode(), HandlerOptions::default());
    let (a, b) = (session("a"), session("b"));
    h.set_ok(&a, &b, &json!({"n": 1})).await;
    assert_eq!(
        h.poll_messages(&b).await,
        Some(vec![json!({"n": 1, "session_src": a})])
    );
    // This poll acknowledges the batch and then parks across the visibility
    // timeout: a redelivery would wake it.
    assert_eq!(
        h.poll(&b).await,
        json!({"messages": null}),
        "acked by the next GET"
    );
    assert_eq!(h.poll(&b).await, json!({"messages": null}), "still acked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_mailbox_with_reject_refuses_the_third_set_with_mailbox_full() {
    let (_core, h) = start(
        CoreOptions {
            mailbox_max_len: Some(2),
            overflow: Some("reject".into()),
            ..Default::default()
        },
        HandlerOptions::default(),
    );
    let (a, b) = (session("a"), session("b"));
    h.set_ok(&a, &b, &json!({"n": 1})).await;
    h.set_ok(&a, &b, &json!({"n": 2})).await;
    let reply = h.set(&a, &b, &json!({"n": 3})).await;
    assert_error(&reply, "MailboxFull");
    assert_eq!(
        h.poll_messages(&b).await,
        Some(vec![
            json!({"n": 1, "session_src": a}),
            json!({"n": 2, "session_src": a})
        ]),
        "the refused message was not queued"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_mailbox_with_drop_oldest_reports_dropped_and_keeps_the_newest() {
    let (_core, h) = start(
        CoreOptions {
            mailbox_max_len: Some(2),
            overflow: Some("drop_oldest".into()),
            ..Default::default()
        },
        HandlerOptions::default(),
    );
    let (a, b) = (session("a"), session("b"));
    h.set_ok(&a, &b, &json!({"n": 1})).await; // no "dropped" key while nothing is dropped
    h.set_ok(&a, &b, &json!({"n": 2})).await;
    let reply = h.set(&a, &b, &json!({"n": 3})).await;
    assert_ok_with_id(&reply, "SET over the limit");
    assert_eq!(reply["dropped"], 1, "{reply}");
    assert_eq!(
        h.poll_messages(&b).await,
        Some(vec![
            json!({"n": 2, "session_src": a}),
            json!({"n": 3, "session_src": a})
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payload_over_max_payload_bytes_is_refused_with_payload_too_large() {
    let (_core, h) = start(
        CoreOptions {
            max_payload_bytes: Some(256),
            ..Default::default()
        },
        HandlerOptions::default(),
    );
    let (a, b) = (session("a"), session("b"));
    let reply = h.set(&a, &b, &json!({"blob": "x".repeat(1000)})).await;
    assert_error(&reply, "PayloadTooLarge");
    h.set_ok(&a, &b, &json!({"small": true})).await;
    assert_eq!(
        h.poll_messages(&b).await,
        Some(vec![json!({"small": true, "session_src": a})]),
        "only the small message was queued"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_parked_polls_on_one_ipc_connection_each_get_their_own_message() {
    const N: usize = 50;
    let (_core, h) = start(
        CoreOptions::default(),
        HandlerOptions {
            poll_timeout: 10.0,
            core_connections: Some(1),
            // One worker thread, so exactly one IPC connection carries all of it.
            extra_toml: "threads = 1\n".into(),
            ..Default::default()
        },
    );
    let h = Arc::new(h);
    let sender = session("sender");
    let mut polls = tokio::task::JoinSet::new();
    for i in 0..N {
        let h = Arc::clone(&h);
        polls.spawn(async move {
            let me = session(&format!("p{i}"));
            (i, h.poll(&me).await)
        });
    }
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert!(
        polls.try_join_next().is_none(),
        "a poll returned before anything was sent"
    );
    // Newest-parked first, so replies come back in another order than asked.
    let started = Instant::now();
    let mut sets = tokio::task::JoinSet::new();
    for i in (0..N).rev() {
        let h = Arc::clone(&h);
        let sender = sender.clone();
        sets.spawn(async move {
            let dst = session(&format!("p{i}"));
            h.set_ok(&sender, &dst, &json!({"for": i})).await;
        });
    }
    sets.join_all().await;
    let mut seen = [false; N];
    while let Some(joined) = polls.join_next().await {
        let (i, reply) = joined.expect("poll task panicked");
        assert_eq!(
            reply["messages"],
            json!([{"for": i, "session_src": sender}]),
            "poll of session p{i}"
        );
        seen[i] = true;
    }
    assert!(seen.iter().all(|s| *s));
    println!("{N} SETs and {N} poll replies in {:?}", started.elapsed());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the {N} parked polls were answered only after {:?}",
        started.elapsed()
    );
}
