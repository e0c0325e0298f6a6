//! The body of the `http_body` fuzz target (`fuzz/`), here so that the inputs kept
//! under `fuzz/regressions/http_body/` replay in the ordinary test run, without a
//! nightly toolchain, through exactly the code the fuzzer ran. Not an API.

use std::collections::HashMap;

use serde_json::value::RawValue;

use crate::v1::{self, Route};
use crate::ws::frame;
use crate::x0::{self, Endpoint, Operation, X0Error};

/// Feeds `bytes` to every parser of client input: the x0 body parser for each
/// endpoint, the `/v1` body parser for each route (and the query parser where a
/// route takes GET), and the WebSocket frame parser. Panics (the fuzzer's finding)
/// if a parser panics, a refusal is not the documented JSON error body, or an
/// accepted SET would deliver something other than a JSON object whose
/// `session_src` is the real sender.
pub fn parse_every_request(bytes: &[u8]) {
    for endpoint in [Endpoint::Any, Endpoint::Get, Endpoint::Set, Endpoint::Del] {
        match x0::parse(endpoint, bytes) {
            Ok(Operation::Set { src, body, .. }) => check_delivered(&src, &body),
            Ok(_) => {}
            Err(error) => check_refusal(&error),
        }
    }
    let query = String::from_utf8_lossy(bytes);
    for route in Route::ALL {
        if let Err(error) = v1::parse(route, bytes) {
            check_refusal(&error);
        }
        if let Err(error) = v1::parse_query(route, Some(&query)) {
            check_refusal(&error);
        }
    }
    if let Err(refused) = frame::parse(bytes, "fuzz-session", 32, 1024) {
        check_refusal(&refused.error);
        let answer = frame::error(refused.reference.as_deref(), &refused.error);
        serde_json::from_str::<&RawValue>(&answer).expect("an error frame is JSON");
    }
}

fn check_refusal(error: &X0Error) {
    assert!(!error.kind.is_empty(), "a refusal without a kind");
    let body: serde_json::Value =
        serde_json::from_str(&error.to_json()).expect("an error body is JSON");
    assert_eq!(body["error"], true);
    assert_eq!(body["exception_id"], error.kind);
}

/// What a recipient gets: one JSON object, and under last-wins parsing (what
/// JSON.parse and serde_json do) its `session_src` is the sender's.
fn check_delivered(src: &str, body: &str) {
    let object: HashMap<String, &RawValue> =
        serde_json::from_str(body).expect("a delivered message is a JSON object");
    let session_src = object.get("session_src").expect("session_src is added");
    assert_eq!(
        serde_json::from_str::<String>(session_src.get())
            .ok()
            .as_deref(),
        Some(src),
        "a sender forged session_src in {body}"
    );
}

#[cfg(test)]
mod tests {
    /// Every input kept for the fuzz target (the seeds and any crash found, fixed)
    /// still goes through, on the stable toolchain.
    #[test]
    fn every_kept_fuzz_input_parses_without_a_panic() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/regressions/http_body");
        let mut count = 0;
        for entry in std::fs::read_dir(&dir).expect("fuzz/regressions/http_body") {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            super::parse_every_request(&bytes);
            count += 1;
        }
        assert!(count > 0, "no inputs in {}", dir.display());
    }
}
