//! Bad requests: on the x0 paths every one is answered HTTP 200 with the error body
//! `{"error":true,"exception_id":..,"exception":..}` (the x0 client stops polling for
//! good on anything else), except 413 for a body over the size limit; elsewhere 404.
//! After any of them the server keeps serving.

use std::time::{Duration, Instant};

use micromsg_e2e::*;

/// POSTs `body` with the x0 headers and asserts a 200 error body of `kind` that
/// carries the CORS header; returns the exception text.
async fn expect_error(h: &Handler, path: &str, body: &str, kind: &str) -> String {
    let reply = h.post(path, body).await;
    check_error_reply(&reply, &format!("POST {path} {body}"), kind)
}

fn check_error_reply(reply: &Reply, what: &str, kind: &str) -> String {
    assert_eq!(reply.status, StatusCode::OK, "{what}: {}", reply.text());
    assert!(
        reply.header("access-control-allow-origin").is_some(),
        "{what}: error reply without Access-Control-Allow-Origin"
    );
    let json = reply.json();
    assert!(json.is_object(), "{what}: {json}");
    let text = assert_error(&json, kind);
    println!("{what} -> {kind}: {text}");
    text
}

/// A normal SET and GET still work.
async fn assert_still_serving(h: &Handler) {
    let (a, b) = (session("after-a"), session("after-b"));
    h.set_ok(&a, &b, &json!({"still": "serving"})).await;
    assert_eq!(
        h.poll_messages(&b).await,
        Some(vec![json!({"still": "serving", "session_src": a})])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_that_is_not_json_gives_invalid_json_on_every_x0_path() {
    let (_core, h) = start_default();
    for path in X0_PATHS {
        for body in ["not json", r#"{"type":"SET","session_src":"#, ""] {
            expect_error(&h, path, body, "InvalidJson").await;
        }
    }
    assert_still_serving(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_session_fields_give_missing_field_naming_the_field() {
    let (_core, h) = start_default();
    let cases = [
        (
            "/set",
            json!({"session_src": "a", "payload": {}}),
            "session_dst",
        ),
        (
            "/python/MsgHandler.py",
            json!({"type": "SET", "session_src": "a", "payload": {}}),
            "session_dst",
        ),
        ("/get", json!({}), "session_src"),
        (
            "/python/MsgHandler.py",
            json!({"type": "GET"}),
            "session_src",
        ),
        ("/del", json!({"type": "DEL"}), "session_src"),
        (
            "/python/MsgHandler.py",
            json!({"type": "DEL"}),
            "session_src",
        ),
    ];
    for (path, body, field) in cases {
        let started = Instant::now();
        let text = expect_error(&h, path, &body.to_string(), "MissingField").await;
        assert!(
            text.contains(field),
            "POST {path} {body}: {text:?} does not name {field}"
        );
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "POST {path} {body}: an invalid request must not be parked"
        );
    }
    assert_still_serving(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fields_of_the_wrong_type_give_invalid_field() {
    let (_core, h) = start_default();
    let cases = [
        (
            "/set",
            json!({"session_src": 42, "session_dst": "b", "payload": {}}),
        ),
        (
            "/set",
            json!({"session_src": "a", "session_dst": ["b"], "payload": {}}),
        ),
        (
            "/set",
            json!({"session_src": "a", "session_dst": "b", "payload": "text"}),
        ),
        (
            "/set",
            json!({"session_src": "a", "session_dst": "b", "payload": [1, 2]}),
        ),
        (
            "/python/MsgHandler.py",
            json!({"type": "SET", "session_src": "a", "session_dst": "b", "payload": 7}),
        ),
        (
            "/python/MsgHandler.py",
            json!({"type": "SET", "session_src": 42, "session_dst": "b", "payload": {}}),
        ),
        ("/get", json!({"type": "GET", "session_src": 42})),
        (
            "/python/MsgHandler.py",
            json!({"type": "GET", "session_src": 42}),
        ),
        ("/del", json!({"type": "DEL", "session_src": 42})),
        (
            "/python/MsgHandler.py",
            json!({"type": "DEL", "session_src": {"a": 1}}),
        ),
    ];
    for (path, body) in cases {
        expect_error(&h, path, &body.to_string(), "InvalidField").await;
    }
    assert_still_serving(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_json_content_type_gives_unsupported_content_type_on_every_x0_path() {
    let (_core, h) = start_default();
    let bodies = [
        ("/python/MsgHandler.py", x0_get_body("a")),
        ("/get", x0_get_body("a")),
        (
            "/set",
            json!({"session_src": "a", "session_dst": "b", "payload": {}}).to_string(),
        ),
        (
            "/del",
            json!({"type": "DEL", "session_src": "a"}).to_string(),
        ),
    ];
    for (path, body) in bodies {
        let reply = h
            .request(
                Method::POST,
                path,
                &[("Content-Type", "text/plain; charset=UTF-8")],
                body.clone(),
            )
            .await;
        check_error_reply(
            &reply,
            &format!("POST {path} as text/plain"),
            "UnsupportedContentType",
        );
    }
    // Nothing was queued by the refused SET.
    assert_eq!(h.poll(&session("b")).await, json!({"messages": null}));
    assert_still_serving(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_type_gives_unknown_type() {
    let (_core, h) = start_default();
    for body in [
        json!({"type": "FOO", "session_src": "a"}),
        json!({"type": "PUBLISH", "session_src": "a", "session_dst": "b", "payload": {}}),
    ] {
        expect_error(
            &h,
            "/python/MsgHandler.py?a__=1",
            &body.to_string(),
            "UnknownType",
        )
        .await;
    }
    assert_still_serving(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_methods_on_x0_paths_give_method_not_allowed_with_200() {
    let (_core, h) = start_default();
    for path in X0_PATHS {
        for method in [Method::PUT, Method::DELETE, Method::PATCH] {
            let reply = h
                .request(method.clone(), path, X0_HEADERS, x0_get_body("a"))
                .await;
            check_error_reply(&reply, &format!("{method} {path}"), "MethodNotAllowed");
        }
    }
    assert_still_serving(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_outside_x0_give_404_not_found_error_body() {
    let (_core, h) = start_default();
    for (method, path) in [
        (Method::POST, "/nope"),
        (Method::GET, "/"),
        (Method::POST, "/python/Other.py"),
        (Method::POST, "/get/extra"),
    ] {
        let reply = h
            .request(method.clone(), path, X0_HEADERS, x0_get_body("a"))
            .await;
        assert_eq!(
            reply.status,
            StatusCode::NOT_FOUND,
            "{method} {path}: {}",
            reply.text()
        );
        assert_error(&reply.json(), "NotFound");
    }
    assert_still_serving(&h).await;
}

/// Request head announcing a 100 MB JSON body on `path`.
fn huge_head(path: &str, addr: std::net::SocketAddr) -> String {
    format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json; charset=UTF-8\r\n\
         Content-Length: 104857600\r\n\r\n{{\"session_src\":"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_content_length_gets_413_before_the_body_is_sent() {
    let (_core, h) = start_default(); // max_body_bytes default: 1 MiB
    for path in ["/set", "/python/MsgHandler.py?a__=1", "/get"] {
        let started = Instant::now();
        // Only a few bytes of the announced 100 MB follow: the reply must not wait
        // for the rest.
        let reply = h
            .raw_exchange(huge_head(path, h.addr()).as_bytes(), Duration::from_secs(5))
            .await;
        let elapsed = started.elapsed();
        assert_eq!(reply.status, 413, "POST {path}: {reply:?}");
        assert!(
            elapsed < Duration::from_secs(2),
            "POST {path}: 413 took {elapsed:?}"
        );
        let body: serde_json::Value = serde_json::from_slice(&reply.body)
            .unwrap_or_else(|e| panic!("413 body is not JSON ({e}): {reply:?}"));
        assert_error(&body, "BodyTooLarge");
    }
    assert_still_serving(&h).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_over_configured_max_body_bytes_gets_413_also_when_chunked() {
    let (_core, h) = start(
        CoreOptions::default(),
        HandlerOptions {
            max_body_bytes: Some(1024),
            ..Default::default()
        },
    );
    let payload = json!({"blob": "y".repeat(2000)});
    let body = json!({"session_src": "a", "session_dst": "b", "payload": payload}).to_string();

    // With Content-Length, sent in full by an ordinary client.
    let reply = h.post("/set", &body).await;
    assert_eq!(
        reply.status,
        StatusCode::PAYLOAD_TOO_LARGE,
        "{}",
        reply.text()
    );
    assert_error(&reply.json(), "BodyTooLarge");

    // Without Content-Length: the limit holds while reading a chunked body.
    let request = format!(
        "POST /set HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        h.addr(),
        body.len()
    );
    let reply = h
        .raw_exchange(request.as_bytes(), Duration::from_secs(5))
        .await;
    assert_eq!(reply.status, 413, "chunked: {reply:?}");

    // Under the limit is fine.
    h.set_ok("a", "b", &json!({"blob": "y".repeat(100)})).await;
    assert_eq!(
        h.poll_messages("b").await,
        Some(vec![json!({"blob": "y".repeat(100), "session_src": "a"})])
    );
}
