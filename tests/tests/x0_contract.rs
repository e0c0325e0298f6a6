//! The x0 `micro-msg-server` HTTP contract (ARCHITECTURE.md, "HTTP contract: x0
//! compatibility"): both path spellings, the query string ignored, the x0 form
//! button, payloads passed through untouched, and CORS.

use micromsg_e2e::*;

/// Every x0 reply is a 200 with a JSON object body.
fn assert_set_ok(status: StatusCode, reply: &serde_json::Value, what: &str) {
    assert_eq!(status, StatusCode::OK, "{what}: {reply}");
    assert_ok_with_id(reply, what);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_on_msghandler_py_is_read_on_get_and_set_on_set_is_read_on_msghandler_py() {
    let (_core, h) = start_default();
    let (a, b) = (session("a"), session("b"));

    // x0 today: /python/MsgHandler.py with a cache-busting query, type in the body.
    let body = json!({
        "type": "SET", "session_src": a, "session_dst": b, "payload": {"n": 1},
        "SessionData": {"ID": "SYS_SESSION", "Value": a}
    });
    let (status, _, reply) = h
        .post_json("/python/MsgHandler.py?a__=8348238", &body.to_string())
        .await;
    assert_set_ok(status, &reply, "SET on /python/MsgHandler.py");
    let (status, _, reply) = h.post_json("/get?a__=12345", &x0_get_body(&b)).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        reply["messages"],
        json!([{"n": 1, "session_src": a}]),
        "GET on /get"
    );

    // Newer documentation: /set without a type, read back on the old path.
    let body = json!({"session_src": a, "session_dst": b, "payload": {"n": 2}});
    let (status, _, reply) = h.post_json("/set?a__=99", &body.to_string()).await;
    assert_set_ok(status, &reply, "SET on /set without type");
    let (status, _, reply) = h
        .post_json("/python/MsgHandler.py?a__=4711", &x0_get_body(&b))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        reply["messages"],
        json!([{"n": 2, "session_src": a}]),
        "GET on /python/MsgHandler.py"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn del_answers_ok_on_del_and_on_msghandler_py() {
    let (_core, h) = start_default();
    let s = session("s");
    let body = json!({"type": "DEL", "session_src": s}).to_string();
    for path in ["/del", "/del?a__=1", "/python/MsgHandler.py?a__=2"] {
        let (status, _, reply) = h.post_json(path, &body).await;
        assert_eq!(status, StatusCode::OK, "DEL on {path}: {reply}");
        assert_eq!(
            reply,
            json!({"messages": null, "status": "ok"}),
            "DEL on {path}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_get_on_get_path_polls_the_session_in_the_query_string() {
    let (_core, h) = start_default();
    let (a, b) = (session("a"), session("b"));
    h.set_ok(&a, &b, &json!({"hello": "query"})).await;
    let path = format!("/get?session_src={b}&a__=12345");
    let reply = h.request(Method::GET, &path, &[], "").await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    assert_eq!(
        reply.json()["messages"],
        json!([{"hello": "query", "session_src": a}])
    );
    // Nothing left: the same request now waits out the poll timeout.
    let reply = h.request(Method::GET, &path, &[], "").await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json(), json!({"messages": null}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_data_value_stands_in_for_a_missing_session_src() {
    let (_core, h) = start_default();
    let (a, b) = (session("a"), session("b"));
    let set = json!({
        "type": "SET", "session_dst": b, "payload": {"k": "v"},
        "SessionData": {"ID": "SYS_SESSION", "Value": a}
    });
    let (status, _, reply) = h.post_json("/python/MsgHandler.py", &set.to_string()).await;
    assert_set_ok(status, &reply, "SET with SessionData only");
    let get = json!({"type": "GET", "SessionData": {"ID": "SYS_SESSION", "Value": b}});
    let (status, _, reply) = h.post_json("/python/MsgHandler.py", &get.to_string()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(reply["messages"], json!([{"k": "v", "session_src": a}]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivered_object_is_payload_plus_session_src_and_the_sender_cannot_forge_it() {
    let (_core, h) = start_default();
    let (a, b) = (session("a"), session("b"));
    h.set_ok(&a, &b, &json!({"session_src": "forged", "x": 1}))
        .await;
    let messages = h.poll_messages(&b).await.expect("a message for b");
    assert_eq!(messages, vec![json!({"session_src": a, "x": 1})]);
}

/// A payload whose text a parse-and-reserialize would change: big integers beyond
/// u64 and i64, a float beyond f64 precision, a trailing zero, escapes, unicode,
/// keys out of alphabetical order, nesting and empty containers.
const TRICKY_OBJECT: &str = concat!(
    r#"{"zeta":"first key, last letter","text":"h\u00e9llo ✓ 日本 \"q\" \\ \/","#,
    r#""nested":{"list":[1,2.50,{"b":null,"t":true,"f":false}],"empty":{},"none":[]},"#,
    r#""big":12345678901234567890,"bigger":123456789012345678901234567890,"#,
    r#""neg":-98765432109876543210,"float":0.1000000000000000055511151231257827,"#,
    r#""alpha":"last"}"#
);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x0_form_button_is_delivered_as_set_data_with_the_payload_byte_for_byte() {
    let (_core, h) = start_default();
    let (src, dst) = (session("form-src"), session("form-dst"));
    // What the x0 example's "Send Data" button posts, extra keys and all.
    let body = format!(
        concat!(
            r#"{{"RequestData":{{"FormlistSelectDstUser":{{"DstUserSession":"{dst}","UserID":"u-17"}},"#,
            r#""FormlistExchangeData":{data}}},"#,
            r#""SessionData":{{"ID":"SYS_SESSION","Value":"{src}"}},"ServiceData":{{"Name":"x0"}}}}"#
        ),
        dst = dst,
        src = src,
        data = TRICKY_OBJECT
    );
    let (status, _, reply) = h.post_json("/python/MsgHandler.py?a__=31337", &body).await;
    assert_set_ok(status, &reply, "form button SET");

    let reply = h.post("/get", &x0_get_body(&dst)).await;
    assert_eq!(reply.status, StatusCode::OK, "{}", reply.text());
    let text = reply.text();
    let top = raw_members(&text);
    let messages = raw_elements(&top["messages"]);
    assert_eq!(messages.len(), 1, "one message expected: {text}");
    let message = raw_members(&messages[0]);
    let parsed: serde_json::Value = serde_json::from_str(&messages[0]).unwrap();
    assert_eq!(parsed["msg-type"], "net-message", "{text}");
    assert_eq!(parsed["method-id"], "set-data", "{text}");
    assert_eq!(parsed["dst-object"], "FormlistExchangeData", "{text}");
    assert_eq!(parsed["session_src"], json!(src), "{text}");
    assert_eq!(
        message.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "dst-object",
            "method-id",
            "msg-type",
            "payload",
            "session_src"
        ],
        "exactly these keys: {text}"
    );
    assert_eq!(
        message["payload"], TRICKY_OBJECT,
        "FormlistExchangeData must pass through byte for byte"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_payload_values_pass_through_byte_for_byte() {
    let (_core, h) = start_default();
    let (a, b) = (session("a"), session("b"));
    let body = format!(r#"{{"session_src":"{a}","session_dst":"{b}","payload":{TRICKY_OBJECT}}}"#);
    let (status, _, reply) = h.post_json("/set", &body).await;
    assert_set_ok(status, &reply, "SET of the tricky payload");

    let reply = h.post("/get", &x0_get_body(&b)).await;
    let text = reply.text();
    let messages = raw_elements(&raw_members(&text)["messages"]);
    assert_eq!(messages.len(), 1, "{text}");
    let delivered = raw_members(&messages[0]);
    let sent = raw_members(TRICKY_OBJECT);
    for (key, raw) in &sent {
        assert_eq!(
            delivered.get(key),
            Some(raw),
            "payload member {key:?} changed: {text}"
        );
    }
    assert_eq!(
        delivered.get("session_src"),
        Some(&format!("\"{a}\"")),
        "{text}"
    );
    assert_eq!(
        delivered.len(),
        sent.len() + 1,
        "nothing else added: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflight_answers_204_and_echoes_the_headers_x0_asks_for() {
    let (_core, h) = start_default();
    let asked = "cache-control,content-type,upgrade-insecure-requests";
    for path in X0_PATHS {
        let uri = format!("{path}?a__=8348238");
        let reply = h
            .request(
                Method::OPTIONS,
                &uri,
                &[
                    ("Origin", "http://x0.example:8080"),
                    ("Access-Control-Request-Method", "POST"),
                    ("Access-Control-Request-Headers", asked),
                ],
                "",
            )
            .await;
        assert_eq!(
            reply.status,
            StatusCode::NO_CONTENT,
            "OPTIONS {uri}: {:?}",
            reply
        );
        let origin = reply
            .header("access-control-allow-origin")
            .unwrap_or_else(|| panic!("OPTIONS {uri}: no Access-Control-Allow-Origin"));
        assert!(
            origin == "*" || origin == "http://x0.example:8080",
            "OPTIONS {uri}: Access-Control-Allow-Origin {origin:?}"
        );
        let methods = reply
            .header("access-control-allow-methods")
            .unwrap_or_else(|| panic!("OPTIONS {uri}: no Access-Control-Allow-Methods"));
        assert!(
            methods
                .split(',')
                .any(|m| m.trim().eq_ignore_ascii_case("POST")),
            "OPTIONS {uri}: methods {methods:?} lack POST"
        );
        let headers = reply
            .header("access-control-allow-headers")
            .unwrap_or_else(|| panic!("OPTIONS {uri}: no Access-Control-Allow-Headers"))
            .to_ascii_lowercase();
        let allowed: Vec<&str> = headers.split(',').map(str::trim).collect();
        for want in asked.split(',') {
            assert!(
                allowed.contains(&want) || allowed.contains(&"*"),
                "OPTIONS {uri}: Access-Control-Allow-Headers {headers:?} lacks {want}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_replies_carry_access_control_allow_origin() {
    let (_core, h) = start_default();
    let (a, b) = (session("a"), session("b"));
    let mut headers = X0_HEADERS.to_vec();
    headers.push(("Origin", "http://x0.example:8080"));
    let set = json!({"type": "SET", "session_src": a, "session_dst": b, "payload": {}});
    let get = x0_get_body(&b);
    for (path, body) in [
        ("/python/MsgHandler.py?a__=1", set.to_string()),
        ("/python/MsgHandler.py?a__=2", get.clone()),
        ("/get?a__=3", get),
    ] {
        let reply = h.request(Method::POST, path, &headers, body).await;
        assert_eq!(
            reply.status,
            StatusCode::OK,
            "POST {path}: {}",
            reply.text()
        );
        assert!(
            reply.header("access-control-allow-origin").is_some(),
            "POST {path}: no Access-Control-Allow-Origin in {:?}",
            reply.headers
        );
    }
}
