//! Routing beyond sessions, through the `/v1` HTTP API (docs/API.md): user targets,
//! broadcast, channel patterns and subject filters, consumer groups, RPC replies,
//! history resume, pause/resume, presence, the backend API and its key, kicks,
//! system events and per-channel settings.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::future::join_all;
use micromsg_e2e::*;
use serde_json::Value;

/// A core with `extra_toml` appended (config keys, `[[channels]]` tables) and a
/// handler with the backend API enabled.
fn start_v1(extra_toml: &str) -> (Core, Handler) {
    start(
        CoreOptions {
            extra_toml: extra_toml.into(),
            ..Default::default()
        },
        HandlerOptions::default().with_backend_key(),
    )
}

fn unix_millis() -> u64 {
    let since = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970");
    u64::try_from(since.as_millis()).expect("milliseconds fit in u64")
}

// ---------------------------------------------------------------------------
// Envelopes and polls
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envelope_carries_id_time_source_target_subject_reference_ttl_and_data_as_sent() {
    let (_core, h) = start_v1("");
    let (a, b) = (session("a"), session("b"));
    // Number forms and escapes that a parse-and-reserialize would change.
    let data = r#"{"z":1.50,"a":"caf\u00e9","n":[1e3,-0.0,12345678901234567890]}"#;
    let body = format!(
        r#"{{"session":"{a}","target":{{"session":"{b}"}},"subject":"greeting","reference":17,"ttl":30,"data":{data}}}"#
    );
    let before = unix_millis();
    let reply = h
        .request(
            Method::POST,
            "/v1/publish",
            &[("Content-Type", "application/json")],
            body,
        )
        .await;
    let after = unix_millis();
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let sent = reply.json();
    assert_eq!(recipients(&sent), 1, "{sent}");
    let id = id_of(&sent);
    assert!(id < 1 << 53, "ids stay exact in JavaScript: {id}");

    let reply = h
        .request(
            Method::POST,
            "/v1/poll",
            &[("Content-Type", "application/json")],
            json!({"session": b, "timeout": 1}).to_string(),
        )
        .await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let members = raw_members(&reply.text());
    let messages = raw_elements(&members["messages"]);
    assert_eq!(messages.len(), 1, "{}", reply.text());
    let raw = raw_members(&messages[0]);
    assert_eq!(raw["data"], data, "data is passed through byte for byte");
    let keys: Vec<&str> = raw.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        [
            "data",
            "id",
            "reference",
            "source",
            "subject",
            "target",
            "time",
            "ttl"
        ],
        "envelope keys (sorted)"
    );
    let envelope: Value = serde_json::from_str(&messages[0]).expect("an envelope is JSON");
    assert_eq!(id_of(&envelope), id, "the id the publish answered");
    assert_eq!(envelope["source"], json!(a));
    assert_eq!(envelope["target"], json!({"session": b}));
    assert_eq!(envelope["subject"], "greeting");
    assert_eq!(envelope["reference"], 17);
    assert_eq!(envelope["ttl"], 30);
    let time = envelope["time"]
        .as_u64()
        .expect("time is Unix milliseconds");
    // A few milliseconds of slack: the core may derive wall time from its own
    // monotonic clock, rounded its own way.
    let window = before.saturating_sub(50)..=after + 50;
    assert!(
        window.contains(&time),
        "time {time} is when the core accepted it ({before}..={after})"
    );
    let reply = reply.json();
    assert_eq!(reply["ids"], json!([id]));
    assert_eq!(reply["cursor"], json!(id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timed_out_poll_answers_empty_messages_and_ids_after_its_timeout() {
    let (_core, h) = start_v1("");
    let lonely = session("lonely");
    let started = Instant::now();
    let reply = h
        .v1_ok("/v1/poll", json!({"session": lonely, "timeout": 0.3}))
        .await;
    let elapsed = started.elapsed();
    assert_eq!(reply, json!({"messages": [], "ids": []}));
    assert!(
        (Duration::from_millis(250)..Duration::from_secs(2)).contains(&elapsed),
        "a 0.3 s poll took {elapsed:?}"
    );
    // The GET form, with its query string.
    let started = Instant::now();
    let (status, reply) = h
        .v1_get(&format!("/v1/poll?session={lonely}&timeout=0.3&max=10"))
        .await;
    assert_eq!(status, StatusCode::OK, "{reply}");
    assert_eq!(reply, json!({"messages": [], "ids": []}));
    assert!(started.elapsed() >= Duration::from_millis(250));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_repeated_with_the_same_msg_id_is_stored_once() {
    let (_core, h) = start_v1("");
    let (a, b) = (session("a"), session("b"));
    let body = json!({"session": a, "target": {"session": b}, "msg_id": "a-1", "data": {"n": 1}});
    let first = h.v1_ok("/v1/publish", body.clone()).await;
    let second = h.v1_ok("/v1/publish", body).await;
    assert_eq!(second["duplicate"], true, "{second}");
    assert_eq!(id_of(&second), id_of(&first), "the first message's id");
    assert_eq!(ids_of(&h.v1_drain(&b, 0.2).await), vec![id_of(&first)]);
}

/// `messages` from `session` in one `/v1/publish_batch`, which must answer 200 with
/// a result for each; returns the reply and its results.
async fn publish_batch(h: &Handler, session: &str, messages: Vec<Value>) -> (Value, Vec<Value>) {
    let count = messages.len();
    let reply = h
        .v1_ok(
            "/v1/publish_batch",
            json!({"session": session, "messages": messages}),
        )
        .await;
    let results = reply["results"].as_array().expect("results").clone();
    assert_eq!(results.len(), count, "one result per message: {reply}");
    (reply, results)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_is_routed_in_order_and_each_message_is_answered_as_if_sent_alone() {
    let (_core, h) = start_v1("");
    let (a, b, c) = (session("a"), session("b"), session("c"));
    let mut messages: Vec<Value> = (0..50)
        .map(|n| json!({"target": {"session": if n % 2 == 0 { &b } else { &c }}, "data": {"n": n}}))
        .collect();
    // One the core refuses (a reply nobody awaits), one repeated under its msg_id.
    messages.insert(10, json!({"reference": 12345, "data": {"n": "orphan"}}));
    messages.push(json!({"target": {"session": b}, "msg_id": "k", "data": {"n": 50}}));
    messages.push(json!({"target": {"session": b}, "msg_id": "k", "data": {"n": 51}}));
    let (reply, results) = publish_batch(&h, &a, messages).await;
    assert_eq!(results[10]["exception_id"], "NoRoute", "{reply}");
    assert_eq!(results[10]["status"], 404, "{reply}");
    let sent: Vec<&Value> = results
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 10)
        .map(|(_, r)| r)
        .collect();
    assert!(sent[..51].iter().all(|r| recipients(r) == 1), "{reply}");
    let ids: Vec<u64> = sent.iter().map(|r| id_of(r)).collect();
    assert!(
        ids[..51].windows(2).all(|w| w[0] < w[1]),
        "ids in batch order: {ids:?}"
    );
    assert_eq!(results[52]["duplicate"], true, "{reply}");
    assert_eq!(ids[51], ids[50], "the repeat is the first message");

    let to_b = h.v1_drain(&b, 0.2).await;
    let evens: Vec<u64> = (0..50).step_by(2).chain([50]).collect();
    assert_eq!(
        numbers(&to_b, "n"),
        evens,
        "in order, the repeat stored once"
    );
    assert!(to_b.iter().all(|e| e["source"] == json!(a)), "{to_b:?}");
    let odds: Vec<u64> = (1..50).step_by(2).collect();
    assert_eq!(numbers(&h.v1_drain(&c, 0.2).await, "n"), odds);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_larger_than_the_in_flight_bound_goes_through_in_order() {
    let (_core, h) = start(
        CoreOptions::default(),
        HandlerOptions {
            extra_toml: "max_in_flight = 8\n".into(),
            core_connections: Some(2),
            ..Default::default()
        },
    );
    let (a, b) = (session("a"), session("b"));
    let messages: Vec<Value> = (0..1000)
        .map(|n| json!({"target": {"session": b}, "data": {"n": n}}))
        .collect();
    let (reply, results) = publish_batch(&h, &a, messages).await;
    assert!(results.iter().all(|r| recipients(r) == 1), "{reply}");
    let expected: Vec<u64> = (0..1000).collect();
    assert_eq!(numbers(&h.v1_drain(&b, 0.2).await, "n"), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_with_a_message_that_would_be_refused_alone_is_refused_whole() {
    let (_core, h) = start_v1("");
    let (a, b) = (session("a"), session("b"));
    let ok = |n: u64| json!({"target": {"session": b}, "data": {"n": n}});
    let refusals = [
        (
            json!({"session": a, "messages": [ok(0), {"target": {"session": b}}]}),
            StatusCode::BAD_REQUEST,
            "MissingField",
            "messages[1]",
        ),
        (
            json!({"session": a, "messages": [ok(0), {"session": b, "target": {"session": b}, "data": 1}]}),
            StatusCode::BAD_REQUEST,
            "InvalidField",
            "messages[1].session",
        ),
        (
            json!({"session": a, "messages": [ok(0), {"target": {"user": "u1"}, "data": 1}]}),
            StatusCode::FORBIDDEN,
            "Forbidden",
            "messages[1]",
        ),
        (
            json!({"messages": [ok(0)]}),
            StatusCode::BAD_REQUEST,
            "MissingField",
            "session",
        ),
        (
            json!({"session": a, "messages": []}),
            StatusCode::BAD_REQUEST,
            "InvalidField",
            "1 to 1000",
        ),
        (
            json!({"session": a, "messages": vec![ok(0); 1001]}),
            StatusCode::BAD_REQUEST,
            "InvalidField",
            "not 1001",
        ),
        (
            json!({"session": a, "messages": {"n": 1}}),
            StatusCode::BAD_REQUEST,
            "InvalidField",
            "messages",
        ),
    ];
    for (body, status, kind, words) in refusals {
        let text = assert_v1_error(&h.v1("/v1/publish_batch", body.clone()).await, status, kind);
        assert!(text.contains(words), "{body}: {text}");
    }
    // The backend's batch needs the key and no session; it may reach users.
    let body = json!({"messages": [ok(7), {"target": {"user": "u1"}, "data": 1}]});
    assert_v1_error(
        &h.v1("/v1/backend/publish_batch", body.clone()).await,
        StatusCode::UNAUTHORIZED,
        "Unauthorized",
    );
    let reply = h.backend_ok("/v1/backend/publish_batch", body).await;
    assert_eq!(recipients(&reply["results"][0]), 1, "{reply}");
    assert_eq!(
        recipients(&reply["results"][1]),
        0,
        "nobody is user u1: {reply}"
    );
    let delivered = h.v1_drain(&b, 0.2).await;
    assert_eq!(
        numbers(&delivered, "n"),
        vec![7],
        "nothing of the refused batches"
    );
    assert_eq!(delivered[0]["source"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x0_and_v1_share_one_mailbox_each_message_in_the_form_it_was_sent() {
    let (_core, h) = start_v1("");
    let (a, b) = (session("a"), session("b"));
    let x0_id = h.set_ok(&a, &b, &json!({"via": "x0"})).await;
    let v1_id = id_of(&publish(&h, &a, json!({"session": b}), json!({"via": "v1"})).await);
    // A v1 poll drains both: the x0 message as its x0 payload, the v1 one as an
    // envelope; `ids` covers both.
    let reply = h
        .v1_ok("/v1/poll", json!({"session": b, "timeout": 1}))
        .await;
    assert_eq!(reply["ids"], json!([x0_id, v1_id]), "{reply}");
    assert_eq!(reply["messages"][0], json!({"via": "x0", "session_src": a}));
    assert_eq!(id_of(&reply["messages"][1]), v1_id);
    assert_eq!(reply["messages"][1]["data"], json!({"via": "v1"}));
    // And an x0 poll is given a v1 message as its envelope.
    let v1_id = id_of(&publish(&h, &a, json!({"session": b}), json!({"via": "v1"})).await);
    let messages = h.poll_messages(&b).await.expect("the v1 message");
    assert_eq!(messages.len(), 1, "{messages:?}");
    assert_eq!(id_of(&messages[0]), v1_id);
    assert_eq!(messages[0]["source"], json!(a));
    assert_eq!(messages[0]["data"], json!({"via": "v1"}));
}

// ---------------------------------------------------------------------------
// Users and broadcast
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn user_target_reaches_every_tab_of_that_user_only() {
    let (_core, h) = start_v1("");
    let tabs: Vec<String> = (1..=3).map(|i| session(&format!("u1-tab{i}"))).collect();
    let other = session("u2-tab");
    for tab in &tabs {
        bind(&h, tab, "u1").await;
    }
    bind(&h, &other, "u2").await;

    let sent = h
        .backend_ok(
            "/v1/backend/publish",
            json!({"target": {"user": "u1"}, "subject": "notice", "data": {"text": "hi u1"}}),
        )
        .await;
    assert_eq!(recipients(&sent), 3, "{sent}");
    let id = id_of(&sent);

    let (got, for_other) = tokio::join!(
        join_all(tabs.iter().map(|tab| h.v1_poll(tab, 1.0))),
        h.v1_poll(&other, 0.5)
    );
    for (tab, envelopes) in tabs.iter().zip(&got) {
        assert_eq!(ids_of(envelopes), vec![id], "{tab}: one copy, same id");
        let e = &envelopes[0];
        assert_eq!(e["source"], Value::Null, "sent by the backend");
        assert_eq!(e["target"], json!({"user": "u1"}));
        assert_eq!(e["subject"], "notice");
        assert_eq!(e["data"], json!({"text": "hi u1"}));
    }
    assert_nothing("u2's tab", &for_other);
    let again = join_all(tabs.iter().map(|tab| h.v1_poll(tab, 0.2))).await;
    for (tab, envelopes) in tabs.iter().zip(&again) {
        assert_nothing(&format!("{tab} (second poll)"), envelopes);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binding_a_session_again_moves_it_to_the_new_user() {
    let (_core, h) = start_v1("");
    let (stays, moves) = (session("stays"), session("moves"));
    bind(&h, &stays, "u1").await;
    bind(&h, &moves, "u1").await;
    bind(&h, &moves, "u2").await;
    let to_u1 = backend_publish(&h, json!({"user": "u1"}), json!({"for": "u1"})).await;
    let to_u2 = backend_publish(&h, json!({"user": "u2"}), json!({"for": "u2"})).await;
    assert_eq!(recipients(&to_u1), 1, "{to_u1}");
    assert_eq!(recipients(&to_u2), 1, "{to_u2}");
    let (for_stays, for_moves) = tokio::join!(h.v1_drain(&stays, 0.2), h.v1_drain(&moves, 0.2));
    assert_eq!(data_of(&for_stays), [json!({"for": "u1"})]);
    assert_eq!(data_of(&for_moves), [json!({"for": "u2"})]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_reaches_every_current_session_exactly_once() {
    const N: usize = 100;
    let (_core, h) = start_v1("");
    let sessions: Vec<String> = (0..N).map(|i| session(&format!("b{i:03}"))).collect();
    // A session is current once it has polled or been bound: half of each.
    let (polled, bound) = sessions.split_at(N / 2);
    for first in join_all(polled.iter().map(|s| h.v1_poll(s, 0.0))).await {
        assert_nothing("a first poll", &first);
    }
    for (i, s) in bound.iter().enumerate() {
        bind(&h, s, &format!("user{i}")).await;
    }

    let started = Instant::now();
    let sent = backend_publish(&h, json!({"broadcast": true}), json!({"all": "hands"})).await;
    let id = id_of(&sent);
    let got = join_all(sessions.iter().map(|s| h.v1_poll(s, 1.0))).await;
    println!(
        "broadcast queued for {} sessions; all {N} polls answered {:?} after the publish",
        recipients(&sent),
        started.elapsed()
    );
    assert!(recipients(&sent) >= N as u64, "{sent}");
    for (s, envelopes) in sessions.iter().zip(&got) {
        assert_eq!(ids_of(envelopes), vec![id], "{s}");
        assert_eq!(envelopes[0]["target"], json!({"broadcast": true}), "{s}");
        assert_eq!(envelopes[0]["data"], json!({"all": "hands"}), "{s}");
    }
    let again = join_all(sessions.iter().map(|s| h.v1_poll(s, 0.2))).await;
    for (s, envelopes) in sessions.iter().zip(&again) {
        assert_nothing(&format!("{s} (second poll)"), envelopes);
    }
}

// ---------------------------------------------------------------------------
// Channels
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channel_patterns_and_subject_filters_select_what_each_subscriber_gets() {
    let (_core, h) = start_v1("");
    let subscribers = [
        (
            session("created"),
            json!({"channel": "orders.*", "subject": "created"}),
        ),
        (session("all-orders"), json!({"channel": "orders.>"})),
        (
            session("every-created"),
            json!({"channel": ">", "subject": "created"}),
        ),
        (
            session("eu-any-subject"),
            json!({"channel": "*.eu", "subject": ">"}),
        ),
    ];
    for (s, subscription) in &subscribers {
        subscribe(&h, s, subscription.clone()).await;
    }
    // Subscribing twice with the same keys is one subscription.
    subscribe(&h, &subscribers[0].0, subscribers[0].1.clone()).await;

    // (channel, subject, which subscribers must get it)
    let cases: &[(&str, Option<&str>, &[usize])] = &[
        ("orders.eu", Some("created"), &[0, 1, 2, 3]),
        ("orders.eu", Some("deleted"), &[1, 3]),
        ("orders.eu.x", Some("created"), &[1, 2]),
        ("other.eu", Some("created"), &[2, 3]),
        ("orders", Some("created"), &[2]),
        // Without a subject, no subject pattern matches.
        ("orders.eu", None, &[1]),
        ("other.eu", Some("deleted"), &[3]),
        ("misc", None, &[]),
    ];
    let publisher = session("publisher");
    for (case, (channel, subject, to)) in cases.iter().enumerate() {
        let mut body =
            json!({"session": publisher, "target": {"channel": channel}, "data": {"case": case}});
        if let Some(subject) = subject {
            body["subject"] = json!(subject);
        }
        let sent = h.v1_ok("/v1/publish", body).await;
        assert_eq!(
            recipients(&sent),
            to.len() as u64,
            "{channel}/{subject:?}: {sent}"
        );
    }

    let got = join_all(subscribers.iter().map(|(s, _)| h.v1_drain(s, 0.3))).await;
    for (i, ((s, subscription), envelopes)) in subscribers.iter().zip(&got).enumerate() {
        let expected: Vec<u64> = (0..cases.len() as u64)
            .filter(|&case| cases[case as usize].2.contains(&i))
            .collect();
        assert_eq!(
            numbers(envelopes, "case"),
            expected,
            "{s} subscribed with {subscription}"
        );
        for e in envelopes {
            let (channel, subject, _) = cases[e["data"]["case"].as_u64().unwrap() as usize];
            assert_eq!(e["target"], json!({"channel": channel}), "{e}");
            assert_eq!(e["source"], json!(publisher), "{e}");
            assert_eq!(e.get("subject").and_then(Value::as_str), subject, "{e}");
        }
    }
}

/// Every pattern of up to three tokens over `a`, `b` and `*`, with and without a
/// final `>`: enough wildcard patterns that a core looks a name's candidates up
/// instead of trying each pattern (the Redis backend does so when they are fewer).
fn every_short_pattern() -> Vec<String> {
    let mut prefixes = vec![String::new()];
    let mut patterns = vec![">".to_owned()];
    for _ in 0..3 {
        prefixes = prefixes
            .iter()
            .flat_map(|p| ["a", "b", "*"].map(|t| format!("{p}{t}.")))
            .collect();
        for p in &prefixes {
            patterns.push(p.trim_end_matches('.').to_owned());
            patterns.push(format!("{p}>"));
        }
    }
    patterns
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_on_every_short_channel_name_lists_exactly_the_matching_patterns() {
    let (_core, h) = start_v1("");
    let patterns = every_short_pattern();
    let sessions: Vec<String> = (0..patterns.len())
        .map(|i| session(&format!("pat{i}")))
        .collect();
    for (s, p) in sessions.iter().zip(&patterns) {
        subscribe(&h, s, json!({"channel": p})).await;
    }
    let mut names = vec![String::new()];
    let mut all = Vec::new();
    for _ in 0..4 {
        names = names
            .iter()
            .flat_map(|n| ["a", "b", "c"].map(|t| format!("{n}{t}.")))
            .collect();
        all.extend(names.iter().map(|n| n.trim_end_matches('.').to_owned()));
    }
    // The core's own channels: no `*` or `>` in first place reaches them.
    all.extend(["$sys".to_owned(), "$sys.a".to_owned()]);
    for name in &all {
        let reply = h.v1_ok("/v1/presence", json!({"channel": name})).await;
        let mut got: Vec<&str> = reply["sessions"]
            .as_array()
            .unwrap_or_else(|| panic!("presence of {name}: {reply}"))
            .iter()
            .map(|s| s["session"].as_str().expect("a session name"))
            .collect();
        got.sort_unstable();
        let mut expected: Vec<&str> = sessions
            .iter()
            .zip(&patterns)
            .filter(|(_, p)| {
                msgserver::routing::Pattern::parse(p)
                    .expect("a valid pattern")
                    .matches(name)
            })
            .map(|(s, _)| s.as_str())
            .collect();
        expected.sort_unstable();
        assert_eq!(got, expected, "who is present on {name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_group_of_three_shares_300_messages_fairly_none_lost_none_doubled() {
    const N: usize = 300;
    let (_core, h) = start_v1("");
    let members: Vec<String> = (1..=3).map(|i| session(&format!("worker{i}"))).collect();
    for m in &members {
        subscribe(&h, m, json!({"channel": "jobs", "group": "workers"})).await;
    }
    // A plain subscriber beside the group still gets every message.
    let auditor = session("auditor");
    subscribe(&h, &auditor, json!({"channel": "jobs"})).await;

    let producer = session("producer");
    let started = Instant::now();
    for job in 0..N {
        let sent = publish(
            &h,
            &producer,
            json!({"channel": "jobs"}),
            json!({"job": job}),
        )
        .await;
        assert_eq!(
            recipients(&sent),
            2,
            "one group member and the auditor: {sent}"
        );
    }
    println!("{N} publishes in {:?}", started.elapsed());

    let (got, audited) = tokio::join!(
        join_all(members.iter().map(|m| h.v1_drain(m, 0.3))),
        h.v1_drain(&auditor, 0.3)
    );
    assert_eq!(
        numbers(&audited, "job"),
        (0..N as u64).collect::<Vec<_>>(),
        "the auditor got all, in order"
    );
    assert_shared_out(&members, &got, N, 90..=110);
}

// ---------------------------------------------------------------------------
// RPC
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_by_reference_reach_only_the_session_that_awaits_them() {
    let (_core, h) = start_v1("");
    let (requester, bystander) = (session("requester"), session("bystander"));
    let responders = [session("responder1"), session("responder2")];
    for r in &responders {
        subscribe(&h, r, json!({"channel": "rpc.sum"})).await;
    }
    assert_nothing("bystander", &h.v1_poll(&bystander, 0.0).await);

    let sent = h
        .v1_ok(
            "/v1/publish",
            json!({"session": requester, "target": {"channel": "rpc.sum"}, "subject": "request", "data": {"a": 2, "b": 3}}),
        )
        .await;
    assert_eq!(recipients(&sent), 2, "{sent}");
    let request = id_of(&sent);
    let awaiting = h
        .v1_ok(
            "/v1/replies",
            json!({"session": requester, "reference": request, "ttl": 5}),
        )
        .await;
    assert_eq!(awaiting, json!({"status": "ok"}));

    for (i, r) in responders.iter().enumerate() {
        let got = h.v1_poll(r, 1.0).await;
        assert_eq!(ids_of(&got), vec![request], "{r} got the request");
        assert_eq!(got[0]["source"], json!(requester));
        // A reply: no target, only the reference.
        let replied = h
            .v1_ok(
                "/v1/publish",
                json!({"session": r, "reference": request, "data": {"sum": 5, "by": i}}),
            )
            .await;
        assert_eq!(recipients(&replied), 1, "{replied}");
    }

    let answers = h.v1_drain(&requester, 0.3).await;
    assert_eq!(
        data_of(&answers),
        vec![json!({"sum": 5, "by": 0}), json!({"sum": 5, "by": 1})],
        "both replies, in order"
    );
    for (answer, r) in answers.iter().zip(&responders) {
        assert_eq!(answer["reference"], json!(request), "{answer}");
        assert_eq!(answer["source"], json!(r), "{answer}");
        assert_eq!(answer["target"], json!({"session": requester}), "{answer}");
    }
    let (r1, r2, by) = tokio::join!(
        h.v1_poll(&responders[0], 0.3),
        h.v1_poll(&responders[1], 0.3),
        h.v1_poll(&bystander, 0.3)
    );
    assert_nothing("responder1", &r1);
    assert_nothing("responder2", &r2);
    assert_nothing("the bystander", &by);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_reply_sends_replies_back_to_the_requester_without_a_replies_call() {
    let (_core, h) = start_v1("");
    let (requester, responder, bystander) = (
        session("requester"),
        session("responder"),
        session("bystander"),
    );
    assert_nothing("bystander", &h.v1_poll(&bystander, 0.0).await);
    let sent = h
        .v1_ok(
            "/v1/publish",
            json!({"session": requester, "target": {"session": responder}, "subject": "lookup",
                   "expect_reply": 5, "data": {"key": "k1"}}),
        )
        .await;
    let request = id_of(&sent);

    let got = h.v1_poll(&responder, 1.0).await;
    assert_eq!(ids_of(&got), vec![request]);
    assert_eq!(got[0]["source"], json!(requester));
    assert_eq!(got[0]["subject"], "lookup");
    let replied = h
        .v1_ok(
            "/v1/publish",
            json!({"session": responder, "reference": request, "subject": "lookup.result", "data": {"value": 42}}),
        )
        .await;
    assert_eq!(recipients(&replied), 1, "{replied}");

    let (answers, for_responder, for_bystander) = tokio::join!(
        h.v1_drain(&requester, 0.3),
        h.v1_poll(&responder, 0.3),
        h.v1_poll(&bystander, 0.3)
    );
    assert_eq!(answers.len(), 1, "{answers:?}");
    let answer = &answers[0];
    assert_eq!(id_of(answer), id_of(&replied));
    assert_eq!(answer["reference"], json!(request));
    assert_eq!(answer["source"], json!(responder));
    assert_eq!(answer["target"], json!({"session": requester}));
    assert_eq!(answer["subject"], "lookup.result");
    assert_eq!(answer["data"], json!({"value": 42}));
    assert_nothing("the responder", &for_responder);
    assert_nothing("the bystander", &for_bystander);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reply_to_a_reference_nobody_awaits_is_refused_with_no_route() {
    let (_core, h) = start_v1("max_reply_ttl = 1\n");
    let (requester, responder) = (session("requester"), session("responder"));
    let reply_to = |reference: u64| {
        h.v1(
            "/v1/publish",
            json!({"session": responder, "reference": reference, "data": {"late": true}}),
        )
    };

    // Never asked for.
    assert_v1_error(&reply_to(12345).await, StatusCode::NOT_FOUND, "NoRoute");
    // A message sent without expect_reply awaits nothing.
    let plain = id_of(
        &publish(
            &h,
            &requester,
            json!({"session": responder}),
            json!({"q": 1}),
        )
        .await,
    );
    assert_v1_error(&reply_to(plain).await, StatusCode::NOT_FOUND, "NoRoute");

    // Expired: expect_reply of 1 s, and a /v1/replies of 60 s capped by max_reply_ttl.
    let short = id_of(
        &h.v1_ok(
            "/v1/publish",
            json!({"session": requester, "target": {"session": responder}, "expect_reply": 1, "data": {"q": 2}}),
        )
        .await,
    );
    let capped = id_of(
        &publish(
            &h,
            &requester,
            json!({"session": responder}),
            json!({"q": 3}),
        )
        .await,
    );
    h.v1_ok(
        "/v1/replies",
        json!({"session": requester, "reference": capped, "ttl": 60}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1400)).await;
    assert_v1_error(&reply_to(short).await, StatusCode::NOT_FOUND, "NoRoute");
    assert_v1_error(&reply_to(capped).await, StatusCode::NOT_FOUND, "NoRoute");
    assert_nothing(
        "the requester (no reply was routed)",
        &h.v1_poll(&requester, 0.2).await,
    );
}

// ---------------------------------------------------------------------------
// History and resume
// ---------------------------------------------------------------------------

const NEWS_HISTORY: &str = r#"
[[channels]]
pattern = "news.>"
history_len = 100
history_secs = 600
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubscribing_with_since_recovers_exactly_the_missed_messages_in_order() {
    let (_core, h) = start_v1(NEWS_HISTORY);
    let reader = session("reader");
    let channel = json!({"channel": "news.sport"});
    subscribe(&h, &reader, channel.clone()).await;
    publish_numbered(&h, "news.sport", 0..5).await;
    let seen = h.v1_drain(&reader, 0.3).await;
    assert_eq!(numbers(&seen, "n"), [0, 1, 2, 3, 4]);
    let last_seen = *ids_of(&seen).last().unwrap();

    // The tab goes away.
    assert_eq!(unsubscribe(&h, &reader, channel.clone()).await, 1);
    let missed = publish_numbered(&h, "news.sport", 5..10).await;
    for sent in &missed {
        assert_eq!(recipients(sent), 0, "nobody subscribed: {sent}");
    }

    let mut resume = channel.clone();
    resume["since"] = json!(last_seen);
    let reply = subscribe(&h, &reader, resume).await;
    assert_eq!(
        reply,
        json!({"subscribed": true, "recovered": 5, "complete": true})
    );
    // Live again: the next message follows the recovered ones.
    publish_numbered(&h, "news.sport", 10..11).await;
    let recovered = h.v1_drain(&reader, 0.3).await;
    assert_eq!(numbers(&recovered, "n"), [5, 6, 7, 8, 9, 10]);
    let missed_ids: Vec<u64> = missed.iter().map(id_of).collect();
    assert_eq!(
        ids_of(&recovered)[..5],
        missed_ids[..],
        "the ids the publishes answered"
    );
    for e in &recovered {
        assert_eq!(e["target"], json!({"channel": "news.sport"}), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_back_after_session_timeout_recovers_what_it_missed_with_since() {
    let (_core, h) = start_v1(&format!("session_timeout = 1\n{NEWS_HISTORY}"));
    let reader = session("reader");
    let channel = json!({"channel": "news.world"});
    subscribe(&h, &reader, channel.clone()).await;
    publish_numbered(&h, "news.world", 0..3).await;
    let seen = h.v1_drain(&reader, 0.2).await;
    assert_eq!(numbers(&seen, "n"), [0, 1, 2]);
    let last_seen = *ids_of(&seen).last().unwrap();

    // No request from the reader from here on. Presence, which names no session,
    // shows when the core has noticed that it left (at its next sweep).
    let went_silent = Instant::now();
    loop {
        let reply = h
            .v1_ok("/v1/presence", json!({"channel": "news.world"}))
            .await;
        if reply["sessions"] == json!([]) {
            break;
        }
        assert_eq!(
            reply["sessions"],
            json!([{"session": reader, "user": null}])
        );
        assert!(
            went_silent.elapsed() < Duration::from_secs(5),
            "the reader is still present 5 s into a 1 s session_timeout"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "the reader left {:?} after its last request",
        went_silent.elapsed()
    );
    assert!(
        went_silent.elapsed() >= Duration::from_millis(900),
        "the reader left before its session_timeout"
    );
    let missed = publish_numbered(&h, "news.world", 3..7).await;
    for sent in &missed {
        assert_eq!(
            recipients(sent),
            0,
            "the reader's subscription went with it: {sent}"
        );
    }

    let mut resume = channel.clone();
    resume["since"] = json!(last_seen);
    let reply = subscribe(&h, &reader, resume).await;
    assert_eq!(
        reply,
        json!({"subscribed": true, "recovered": 4, "complete": true})
    );
    let recovered = h.v1_drain(&reader, 0.3).await;
    assert_eq!(
        numbers(&recovered, "n"),
        [3, 4, 5, 6],
        "exactly the missed ones, in order"
    );
    assert_eq!(
        ids_of(&recovered),
        missed.iter().map(id_of).collect::<Vec<_>>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubscribing_past_the_history_window_recovers_what_is_left_and_says_incomplete() {
    let (_core, h) = start_v1(
        r#"
[[channels]]
pattern = "ticker.>"
history_len = 3
history_secs = 0
"#,
    );
    let reader = session("reader");
    let channel = json!({"channel": "ticker.eur"});
    subscribe(&h, &reader, channel.clone()).await;
    publish_numbered(&h, "ticker.eur", 0..1).await;
    let seen = h.v1_drain(&reader, 0.2).await;
    assert_eq!(numbers(&seen, "n"), [0]);
    assert_eq!(unsubscribe(&h, &reader, channel.clone()).await, 1);

    let missed = publish_numbered(&h, "ticker.eur", 1..11).await;
    let mut resume = channel.clone();
    resume["since"] = json!(id_of(&seen[0]));
    let reply = subscribe(&h, &reader, resume).await;
    assert_eq!(
        reply,
        json!({"subscribed": true, "recovered": 3, "complete": false}),
        "history_len 3 no longer reaches back to the last id seen"
    );
    let recovered = h.v1_drain(&reader, 0.2).await;
    assert_eq!(numbers(&recovered, "n"), [8, 9, 10], "the last three");

    // Up to date: since the newest id, nothing is missing.
    assert_eq!(unsubscribe(&h, &reader, channel.clone()).await, 1);
    let mut resume = channel.clone();
    resume["since"] = json!(id_of(missed.last().unwrap()));
    let reply = subscribe(&h, &reader, resume).await;
    assert_eq!(
        reply,
        json!({"subscribed": true, "recovered": 0, "complete": true})
    );

    // A channel that keeps no history can never say complete.
    let reply = subscribe(
        &h,
        &reader,
        json!({"channel": "plain.room", "since": id_of(&seen[0])}),
    )
    .await;
    assert_eq!(
        reply,
        json!({"subscribed": true, "recovered": 0, "complete": false})
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_older_than_history_secs_is_not_recovered() {
    let (_core, h) = start_v1(
        r#"
[[channels]]
pattern = "flash.>"
history_len = 100
history_secs = 1
"#,
    );
    let reader = session("reader");
    let channel = json!({"channel": "flash.sale"});
    subscribe(&h, &reader, channel.clone()).await;
    publish_numbered(&h, "flash.sale", 0..1).await;
    let seen = h.v1_drain(&reader, 0.2).await;
    assert_eq!(numbers(&seen, "n"), [0]);
    assert_eq!(unsubscribe(&h, &reader, channel.clone()).await, 1);
    publish_numbered(&h, "flash.sale", 1..3).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let mut resume = channel.clone();
    resume["since"] = json!(id_of(&seen[0]));
    let reply = subscribe(&h, &reader, resume).await;
    assert_eq!(
        reply,
        json!({"subscribed": true, "recovered": 0, "complete": false}),
        "both missed messages aged out"
    );
    assert_nothing("the reader", &h.v1_poll(&reader, 0.2).await);
}

// ---------------------------------------------------------------------------
// Kick
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kicked_session_parked_poll_ends_with_kicked_and_its_later_requests_are_refused() {
    let (_core, h) = start(
        CoreOptions {
            extra_toml: "kick_retention = 60\n".into(),
            ..Default::default()
        },
        // Long enough that a poll ended by the kick is told apart from one that
        // timed out; short because on the x0 paths a refused poll is answered only
        // when its timeout is up (so that the x0 client does not spin).
        HandlerOptions {
            poll_timeout: 2.0,
            ..Default::default()
        }
        .with_backend_key(),
    );
    let (v1_tab, x0_tab, other) = (session("v1-tab"), session("x0-tab"), session("other"));
    subscribe(&h, &v1_tab, json!({"channel": "room"})).await;
    bind(&h, &v1_tab, "u1").await;

    let v1_poll = async {
        let reply = h
            .v1("/v1/poll", json!({"session": v1_tab, "timeout": 2}))
            .await;
        (reply, Instant::now())
    };
    let x0_poll = async {
        let (status, _, reply) = h.post_json("/get", &x0_get_body(&x0_tab)).await;
        ((status, reply), Instant::now())
    };
    let kicks = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let at = Instant::now();
        kick(&h, &v1_tab, "logged out").await;
        kick(&h, &x0_tab, "logged out").await;
        at
    };
    let ((v1_reply, v1_done), (x0_reply, x0_done), kicked_at) =
        tokio::join!(v1_poll, x0_poll, kicks);
    println!(
        "parked polls ended {:?} (v1) and {:?} (x0) after the kicks",
        v1_done.saturating_duration_since(kicked_at),
        x0_done.saturating_duration_since(kicked_at)
    );
    assert_v1_error(&v1_reply, StatusCode::FORBIDDEN, "Kicked");
    assert_v1_error(&x0_reply, StatusCode::OK, "Kicked");
    assert!(
        v1_done.saturating_duration_since(kicked_at) < Duration::from_secs(1),
        "the parked v1 poll ended only at its timeout"
    );
    assert!(
        x0_done.saturating_duration_since(kicked_at) > Duration::from_millis(1200),
        "the x0 refusal waits out the poll, or the x0 client would poll again at once"
    );

    // Every later request of a kicked session is refused: on /v1 at once.
    let asked = Instant::now();
    let later_poll = h
        .v1("/v1/poll", json!({"session": v1_tab, "timeout": 2}))
        .await;
    assert_v1_error(&later_poll, StatusCode::FORBIDDEN, "Kicked");
    assert!(asked.elapsed() < Duration::from_secs(1), "refused at once");
    let refused = [
        h.v1("/v1/poll", json!({"session": v1_tab, "timeout": 0}))
            .await,
        h.v1(
            "/v1/publish",
            json!({"session": v1_tab, "target": {"session": other}, "data": {}}),
        )
        .await,
        h.v1(
            "/v1/subscribe",
            json!({"session": v1_tab, "channel": "room"}),
        )
        .await,
        h.v1("/v1/pause", json!({"session": v1_tab})).await,
    ];
    for reply in &refused {
        assert_v1_error(reply, StatusCode::FORBIDDEN, "Kicked");
    }
    let asked = Instant::now();
    let (status, _, reply) = h.post_json("/get", &x0_get_body(&x0_tab)).await;
    assert_v1_error(&(status, reply), StatusCode::OK, "Kicked");
    let held = asked.elapsed();
    println!("a kicked x0 tab's later poll was answered after {held:?}");
    assert!(
        held > Duration::from_millis(1800),
        "the x0 tab would spin: {held:?}"
    );
    let set = json!({"session_src": x0_tab, "session_dst": other, "payload": {"x": 1}});
    let (status, _, reply) = h.post_json("/set", &set.to_string()).await;
    assert_v1_error(&(status, reply), StatusCode::OK, "Kicked");

    // Its subscription and user binding went with it; others are unaffected.
    let to_room = publish(&h, &other, json!({"channel": "room"}), json!({"n": 1})).await;
    assert_eq!(recipients(&to_room), 0, "{to_room}");
    let to_user = backend_publish(&h, json!({"user": "u1"}), json!({"n": 2})).await;
    assert_eq!(recipients(&to_user), 0, "{to_user}");
    assert_nothing(
        "other (the kicked x0 tab's SET was refused)",
        &h.v1_poll(&other, 0.2).await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kicked_session_id_is_usable_again_after_kick_retention_with_nothing_left_queued() {
    let (_core, h) = start_v1("kick_retention = 1\n");
    let (tab, other) = (session("tab"), session("other"));
    publish(&h, &other, json!({"session": tab}), json!({"queued": true})).await;
    kick(&h, &tab, "reset").await;
    assert_v1_error(
        &h.v1("/v1/poll", json!({"session": tab, "timeout": 0}))
            .await,
        StatusCode::FORBIDDEN,
        "Kicked",
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_nothing(
        "the tab after kick_retention (its queue was dropped)",
        &h.v1_poll(&tab, 0.2).await,
    );
    publish(&h, &other, json!({"session": tab}), json!({"fresh": true})).await;
    assert_eq!(
        data_of(&h.v1_poll(&tab, 1.0).await),
        [json!({"fresh": true})]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusive_bind_kicks_the_users_other_sessions() {
    let (_core, h) = start_v1("kick_retention = 60\n");
    let (old1, old2, new, stranger) = (
        session("old1"),
        session("old2"),
        session("new"),
        session("stranger"),
    );
    bind(&h, &old1, "u1").await;
    bind(&h, &old2, "u1").await;
    bind(&h, &stranger, "u2").await;
    let reply = h
        .backend_ok(
            "/v1/backend/bind",
            json!({"session": new, "user": "u1", "exclusive": true}),
        )
        .await;
    assert_eq!(reply, json!({"status": "ok", "kicked": 2}));
    for old in [&old1, &old2] {
        assert_v1_error(
            &h.v1("/v1/poll", json!({"session": old, "timeout": 0}))
                .await,
            StatusCode::FORBIDDEN,
            "Kicked",
        );
    }
    let sent = backend_publish(&h, json!({"user": "u1"}), json!({"only": "new"})).await;
    assert_eq!(recipients(&sent), 1, "{sent}");
    assert_eq!(ids_of(&h.v1_poll(&new, 1.0).await), vec![id_of(&sent)]);
    assert_nothing("u2's session", &h.v1_poll(&stranger, 0.2).await);
}

// ---------------------------------------------------------------------------
// Pause and resume
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_session_is_given_nothing_until_resumed_then_everything_in_order() {
    let (_core, h) = start_v1("");
    let (tab, sender) = (session("tab"), session("sender"));
    let paused = h.v1_ok("/v1/pause", json!({"session": tab})).await;
    assert_eq!(paused, json!({"status": "ok"}));
    for n in 0..3 {
        let sent = publish(&h, &sender, json!({"session": tab}), json!({"n": n})).await;
        assert_eq!(recipients(&sent), 1, "queued while paused: {sent}");
    }
    let started = Instant::now();
    assert_nothing("a paused session", &h.v1_poll(&tab, 0.3).await);
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "the paused poll waited its timeout"
    );
    let resumed = h.v1_ok("/v1/resume", json!({"session": tab})).await;
    assert_eq!(resumed, json!({"status": "ok"}));
    assert_eq!(numbers(&h.v1_drain(&tab, 0.2).await, "n"), [0, 1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_wakes_the_parked_poll_of_a_paused_session() {
    let (_core, h) = start_v1("");
    let (tab, sender) = (session("tab"), session("sender"));
    h.v1_ok("/v1/pause", json!({"session": tab})).await;
    for n in 0..2 {
        publish(&h, &sender, json!({"session": tab}), json!({"n": n})).await;
    }
    let poll_started = Instant::now();
    let poll = async {
        let got = h.v1_poll(&tab, 5.0).await;
        (got, Instant::now())
    };
    let resume = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let at = Instant::now();
        h.v1_ok("/v1/resume", json!({"session": tab})).await;
        at
    };
    let ((got, polled_at), resumed_at) = tokio::join!(poll, resume);
    let latency = polled_at.saturating_duration_since(resumed_at);
    println!("parked poll answered {latency:?} after the resume");
    assert_eq!(numbers(&got, "n"), [0, 1]);
    assert!(
        polled_at - poll_started >= Duration::from_millis(250),
        "answered before the resume: the poll never parked, so nothing was woken"
    );
    assert!(
        latency < Duration::from_millis(500),
        "the parked poll was answered only {latency:?} after the resume"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paused_group_member_is_skipped_while_the_others_take_its_turns() {
    let (_core, h) = start_v1("");
    let (asleep, awake, producer) = (session("asleep"), session("awake"), session("producer"));
    for m in [&asleep, &awake] {
        subscribe(&h, m, json!({"channel": "jobs", "group": "workers"})).await;
    }
    h.v1_ok("/v1/pause", json!({"session": asleep})).await;
    for job in 0..10 {
        let sent = publish(
            &h,
            &producer,
            json!({"channel": "jobs"}),
            json!({"job": job}),
        )
        .await;
        assert_eq!(recipients(&sent), 1, "{sent}");
    }
    assert_eq!(
        numbers(&h.v1_drain(&awake, 0.2).await, "job"),
        (0..10).collect::<Vec<_>>()
    );
    h.v1_ok("/v1/resume", json!({"session": asleep})).await;
    assert_nothing(
        "the member paused meanwhile",
        &h.v1_poll(&asleep, 0.3).await,
    );
}

// ---------------------------------------------------------------------------
// Who may send what
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_api_refuses_a_missing_or_wrong_key_and_accepts_the_right_one() {
    let (_core, h) = start_v1("");
    let tab = session("tab");
    assert_nothing("tab", &h.v1_poll(&tab, 0.0).await);
    let calls = [
        (
            "/v1/backend/publish",
            json!({"target": {"session": tab}, "data": {"forged": true}}),
        ),
        ("/v1/backend/bind", json!({"session": tab, "user": "u1"})),
        (
            "/v1/backend/kick",
            json!({"session": tab, "reason": "forged"}),
        ),
    ];
    let wrong_keys: &[&[(&str, &str)]] = &[
        &[],
        &[("Authorization", "Bearer not-the-key")],
        &[("Authorization", BACKEND_KEY)],
        &[("Authorization", "Basic ZTJlOmUyZQ==")],
        &[("Authorization", "Bearer ")],
    ];
    for (path, body) in &calls {
        for headers in wrong_keys {
            let reply = h.v1_with(path, headers, body).await;
            assert_v1_error(&reply, StatusCode::UNAUTHORIZED, "Unauthorized");
        }
    }
    // None of them had an effect: the tab is neither kicked, bound nor sent to.
    let to_user = backend_publish(&h, json!({"user": "u1"}), json!({})).await;
    assert_eq!(recipients(&to_user), 0, "the forged bind was refused");
    assert_nothing("tab", &h.v1_poll(&tab, 0.2).await);

    let sent = backend_publish(&h, json!({"session": tab}), json!({"real": true})).await;
    assert_eq!(recipients(&sent), 1, "{sent}");
    let got = h.v1_poll(&tab, 1.0).await;
    assert_eq!(data_of(&got), [json!({"real": true})]);
    assert_eq!(got[0]["source"], Value::Null);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_api_is_forbidden_when_no_key_is_configured() {
    let (_core, h) = start_default();
    let body = json!({"target": {"broadcast": true}, "data": {}});
    for headers in [&[][..], &[("Authorization", "Bearer anything")][..]] {
        let reply = h.v1_with("/v1/backend/publish", headers, &body).await;
        assert_v1_error(&reply, StatusCode::FORBIDDEN, "Forbidden");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_may_not_publish_to_users_everyone_or_reserved_channels() {
    let (_core, h) = start_v1("");
    let (client, tab, sys_reader) = (session("client"), session("tab"), session("sys-reader"));
    bind(&h, &tab, "u1").await;
    subscribe(
        &h,
        &sys_reader,
        json!({"channel": "$sys", "subject": "forged"}),
    )
    .await;
    for target in [
        json!({"user": "u1"}),
        json!({"broadcast": true}),
        json!({"channel": "$sys"}),
    ] {
        let reply = h
            .v1(
                "/v1/publish",
                json!({"session": client, "target": target, "subject": "forged", "data": {}}),
            )
            .await;
        assert_v1_error(&reply, StatusCode::FORBIDDEN, "Forbidden");
    }
    // `$` channels are the core's alone, even for the backend.
    let reply = h
        .backend(
            "/v1/backend/publish",
            json!({"target": {"channel": "$sys"}, "subject": "forged", "data": {}}),
        )
        .await;
    assert_v1_error(&reply, StatusCode::FORBIDDEN, "Forbidden");
    let (for_tab, for_sys_reader) = tokio::join!(h.v1_poll(&tab, 0.3), h.v1_poll(&sys_reader, 0.3));
    assert_nothing("u1's tab", &for_tab);
    assert_nothing("the $sys reader", &for_sys_reader);
}

// ---------------------------------------------------------------------------
// System events
// ---------------------------------------------------------------------------

/// The `$sys` events in `envelopes` whose `data.<key>` is `value`, checked for the
/// envelope every system event has.
fn sys_events_about(envelopes: &[Value], key: &str, value: &str) -> Vec<(String, Value)> {
    envelopes
        .iter()
        .filter(|e| e["data"][key] == value)
        .map(|e| {
            assert_eq!(e["source"], Value::Null, "{e}");
            assert_eq!(e["target"], json!({"channel": "$sys"}), "{e}");
            let subject = e["subject"].as_str().unwrap_or_else(|| panic!("{e}"));
            (subject.to_owned(), e["data"].clone())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sys_subscriber_sees_session_joined_and_session_kicked() {
    let (_core, h) = start_v1("");
    let (watcher, newcomer) = (session("watcher"), session("newcomer"));
    subscribe(
        &h,
        &watcher,
        json!({"channel": "$sys", "subject": "session.*"}),
    )
    .await;

    assert_nothing("newcomer", &h.v1_poll(&newcomer, 0.0).await);
    bind(&h, &newcomer, "u7").await; // already joined: no second event
    kick(&h, &newcomer, "logged out").await;

    let events = h.v1_drain(&watcher, 0.3).await;
    for e in &events {
        let subject = e["subject"].as_str().unwrap_or_default();
        assert!(
            subject.starts_with("session."),
            "the subject filter let {e} through"
        );
    }
    assert_eq!(
        sys_events_about(&events, "session", &newcomer),
        [
            (
                "session.joined".to_owned(),
                json!({"session": newcomer, "user": null})
            ),
            (
                "session.kicked".to_owned(),
                json!({"session": newcomer, "user": "u7", "reason": "logged out"})
            ),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sys_subscriber_sees_session_left_after_session_timeout() {
    let (_core, h) = start_v1("session_timeout = 1\n");
    let (watcher, leaver) = (session("watcher"), session("leaver"));
    subscribe(
        &h,
        &watcher,
        json!({"channel": "$sys", "subject": "session.left"}),
    )
    .await;
    bind(&h, &leaver, "u9").await;
    let last_request = Instant::now();

    // The watcher's own polls keep it present.
    let deadline = last_request + Duration::from_secs(5);
    let mut left = Vec::new();
    while left.is_empty() && Instant::now() < deadline {
        let events = h.v1_poll(&watcher, 0.5).await;
        left = sys_events_about(&events, "session", &leaver);
    }
    let after = last_request.elapsed();
    println!("session.left came {after:?} after the session's last request");
    assert_eq!(
        left,
        [(
            "session.left".to_owned(),
            json!({"session": leaver, "user": "u9"})
        )],
        "no session.left within 5 s of a 1 s session_timeout"
    );
    assert!(
        after >= Duration::from_millis(900),
        "left after {after:?}, before its session_timeout"
    );
    let to_user = backend_publish(&h, json!({"user": "u9"}), json!({})).await;
    assert_eq!(recipients(&to_user), 0, "the binding went: {to_user}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sys_subscriber_sees_channel_created_and_removed_once_per_pattern() {
    let (_core, h) = start_v1("");
    let (watcher, first, second) = (session("watcher"), session("first"), session("second"));
    subscribe(
        &h,
        &watcher,
        json!({"channel": "$sys", "subject": "channel.*"}),
    )
    .await;
    let chat = json!({"channel": "chat.*"});
    subscribe(&h, &first, chat.clone()).await;
    subscribe(&h, &second, chat.clone()).await; // not the first: no event
    assert_eq!(unsubscribe(&h, &first, chat.clone()).await, 1); // not the last
    assert_eq!(unsubscribe(&h, &second, chat.clone()).await, 1);

    let events = h.v1_drain(&watcher, 0.3).await;
    assert_eq!(
        sys_events_about(&events, "channel", "chat.*"),
        [
            ("channel.created".to_owned(), json!({"channel": "chat.*"})),
            ("channel.removed".to_owned(), json!({"channel": "chat.*"})),
        ]
    );
}

// ---------------------------------------------------------------------------
// Presence
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_lists_the_sessions_a_channel_reaches_with_their_users_sorted() {
    let (_core, h) = start_v1("");
    let (a, b, c, d) = (session("a"), session("b"), session("c"), session("d"));
    bind(&h, &d, "u4").await;
    subscribe(&h, &d, json!({"channel": "chat.*"})).await;
    subscribe(&h, &b, json!({"channel": "chat.room1"})).await;
    subscribe(&h, &a, json!({"channel": "chat.room1", "group": "bots"})).await;
    subscribe(&h, &c, json!({"channel": "other"})).await;

    let expected = json!({"channel": "chat.room1", "sessions": [
        {"session": a, "user": null},
        {"session": b, "user": null},
        {"session": d, "user": "u4"},
    ]});
    let (status, by_get) = h.v1_get("/v1/presence?channel=chat.room1").await;
    assert_eq!(status, StatusCode::OK, "{by_get}");
    assert_eq!(by_get, expected);
    let by_post = h
        .v1_ok("/v1/presence", json!({"channel": "chat.room1"}))
        .await;
    assert_eq!(by_post, expected);

    assert_eq!(
        unsubscribe(&h, &b, json!({"channel": "chat.room1"})).await,
        1
    );
    let reply = h
        .v1_ok("/v1/presence", json!({"channel": "chat.room1"}))
        .await;
    assert_eq!(
        reply["sessions"],
        json!([{"session": a, "user": null}, {"session": d, "user": "u4"}])
    );
    let reply = h
        .v1_ok("/v1/presence", json!({"channel": "nobody.here"}))
        .await;
    assert_eq!(reply, json!({"channel": "nobody.here", "sessions": []}));
}

// ---------------------------------------------------------------------------
// Channel settings
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn higher_priority_channel_is_given_first_when_several_are_pending() {
    let (_core, h) = start_v1(
        r#"
[[channels]]
pattern = "alerts.>"
priority = 10

[[channels]]
pattern = "chatter.>"
priority = 1
"#,
    );
    let tab = session("tab");
    subscribe(&h, &tab, json!({"channel": "alerts.>"})).await;
    subscribe(&h, &tab, json!({"channel": "chatter.>"})).await;
    // The low-priority ones are older.
    publish_numbered(&h, "chatter.lobby", 0..3).await;
    publish_numbered(&h, "alerts.fire", 0..3).await;

    let mut order = Vec::new();
    for _ in 0..6 {
        let got = h
            .v1_poll_with(json!({"session": tab, "timeout": 1, "max": 1}))
            .await;
        assert_eq!(got.len(), 1, "max 1: {got:?}");
        let channel = got[0]["target"]["channel"].as_str().unwrap().to_owned();
        order.push((channel, got[0]["data"]["n"].as_u64().unwrap()));
    }
    let expected: Vec<(String, u64)> = ["alerts.fire", "chatter.lobby"]
        .into_iter()
        .flat_map(|c| (0..3).map(move |n| (c.to_owned(), n)))
        .collect();
    assert_eq!(order, expected, "priority first, then oldest first");
    assert_nothing("tab", &h.v1_poll(&tab, 0.2).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_pending_drops_the_oldest_messages_of_that_channel_only() {
    let (_core, h) = start_v1(
        r#"
[[channels]]
pattern = "ticks.>"
max_pending = 3
"#,
    );
    let (tab, friend) = (session("tab"), session("friend"));
    subscribe(&h, &tab, json!({"channel": "ticks.>"})).await;
    publish(
        &h,
        &friend,
        json!({"session": tab}),
        json!({"direct": "before"}),
    )
    .await;
    for sent in publish_numbered(&h, "ticks.eurusd", 0..6).await {
        println!("tick publish: {sent}");
    }
    publish(
        &h,
        &friend,
        json!({"session": tab}),
        json!({"direct": "after"}),
    )
    .await;

    let got = h.v1_drain(&tab, 0.2).await;
    assert_eq!(
        data_of(&got),
        [
            json!({"direct": "before"}),
            json!({"n": 3}),
            json!({"n": 4}),
            json!({"n": 5}),
            json!({"direct": "after"}),
        ],
        "the three newest ticks, and every direct message"
    );
}
