//! What the shipped nginx site (etc/nginx/micromsg.conf) adds in front of
//! msghandler. These run only through nginx (`MICROMSG_E2E_VIA_NGINX=1`, as CI's
//! second run does); the rest of the suite checks that nginx changes nothing else.

use micromsg_e2e::*;

/// A core and a handler behind nginx, or None (with the reason printed) in a
/// direct run.
fn start_behind_nginx() -> Option<(Core, Handler)> {
    if !via_nginx() {
        println!("skipped: only meaningful through nginx (MICROMSG_E2E_VIA_NGINX=1)");
        return None;
    }
    Some(start_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_refused_by_nginx_and_paths_msghandler_does_not_serve_are_404_json() {
    let Some((_core, h)) = start_behind_nginx() else {
        return;
    };
    let metrics = h.request(Method::GET, "/metrics", &[], "").await;
    assert_eq!(metrics.status, StatusCode::FORBIDDEN, "{}", metrics.text());
    assert_error(&metrics.json(), "Forbidden");
    for path in ["/", "/metricsx", "/v2/poll", "/python/Other.py", "/set/"] {
        let reply = h.request(Method::GET, path, &[], "").await;
        assert_eq!(reply.status, StatusCode::NOT_FOUND, "GET {path}");
        assert_error(&reply.json(), "NotFound");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_msghandler_is_down_x0_paths_answer_200_and_v1_503_with_a_json_error() {
    let Some((_core, mut h)) = start_behind_nginx() else {
        return;
    };
    h.kill();
    // An x0 page stops polling for good on anything but a 200 with JSON.
    for path in X0_PATHS {
        let (status, _, reply) = h.post_json(path, &x0_get_body("b")).await;
        assert_eq!(status, StatusCode::OK, "POST {path}: {reply}");
        assert_error(&reply, "CoreUnavailable");
    }
    let down = h
        .v1("/v1/poll", json!({"session": "b", "timeout": 1}))
        .await;
    assert_v1_error(&down, StatusCode::SERVICE_UNAVAILABLE, "CoreUnavailable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_msghandler_is_down_a_cross_origin_page_can_read_nginxs_json_error() {
    let Some((_core, mut h)) = start_behind_nginx() else {
        return;
    };
    h.kill();
    let origin = "https://app.example.org";
    // The x0 client's preflight passes, so its POST is sent and its answer read.
    let preflight = h
        .request(
            Method::OPTIONS,
            "/set",
            &[
                ("Origin", origin),
                ("Access-Control-Request-Method", "POST"),
                ("Access-Control-Request-Headers", "content-type"),
            ],
            "",
        )
        .await;
    assert_eq!(preflight.status, StatusCode::OK);
    assert_eq!(
        preflight.header("access-control-allow-origin").as_deref(),
        Some(origin)
    );
    assert!(
        preflight
            .header("access-control-allow-methods")
            .is_some_and(|m| m.contains("POST")),
        "{:?}",
        preflight.headers
    );
    assert_eq!(
        preflight.header("access-control-allow-headers").as_deref(),
        Some("content-type")
    );
    let x0 = h
        .request(
            Method::POST,
            "/set",
            &[("Origin", origin)],
            x0_get_body("b"),
        )
        .await;
    assert_eq!(x0.status, StatusCode::OK);
    assert_eq!(
        x0.header("access-control-allow-origin").as_deref(),
        Some(origin)
    );
    assert_error(&x0.json(), "CoreUnavailable");
    let v1 = h
        .request(
            Method::POST,
            "/v1/poll",
            &[("Origin", origin)],
            json!({"session": "b", "timeout": 1}).to_string(),
        )
        .await;
    assert_eq!(v1.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        v1.header("access-control-allow-origin").as_deref(),
        Some(origin)
    );
    // Without an Origin (not a browser) nothing is added.
    let plain = h.request(Method::POST, "/set", &[], x0_get_body("b")).await;
    assert_eq!(plain.header("access-control-allow-origin"), None);
}
