//! HTTP routes: the four x0 paths and the `/v1` API, CORS, body limits, the backend
//! key, and the mapping of core replies and errors onto HTTP answers: on the x0 paths
//! the ones the x0 client can survive (always 200 and a JSON object; see
//! ARCHITECTURE.md), on `/v1` the statuses of docs/API.md. The streaming transports
//! ([`crate::ws`], [`crate::sse`]) and the served files ([`crate::assets`]) are
//! routed here too, and so are the operator's `/healthz`, `/readyz` and
//! `/metrics` ([`crate::metrics`]).

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http_body_util::{BodyExt, Either, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use ipc::{Message, Response as CoreResponse};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug};

use crate::assets::{self, Asset};
use crate::auth::{Bindings, Grant, Tokens};
use crate::backend_key::{BackendKey, Denied};
use crate::core_link::{CoreError, CorePool, PollError};
use crate::limits::Limits;
use crate::metrics::{self, RouteKind, WorkerMetrics};
use crate::sse::{self, EventBody};
use crate::v1::{self, Route};
use crate::ws;
use crate::x0::{self, Endpoint, Operation, X0Error};

pub struct App {
    pub core: Arc<CorePool>,
    pub poll_timeout: Duration,
    pub max_body_bytes: u64,
    /// How long a request body may take to arrive once its head is in.
    pub body_read_timeout: Duration,
    pub cors: Cors,
    /// `None` disables the backend API.
    pub backend_key: Option<Arc<BackendKey>>,
    /// `auth = "token"`: every client request needs a token. `None` is `auth =
    /// "none"`, the x0 behaviour.
    pub tokens: Option<Arc<Tokens>>,
    /// Shared by every worker: a client's connections may land on any of them.
    pub limits: Arc<Limits>,
    /// Sessions this worker bound to their token's user lately.
    pub bindings: Bindings,
    /// Turns true on SIGTERM: parked polls answer at once, streams end.
    pub shutdown: watch::Receiver<bool>,
    pub streams: Streams,
    /// The HTTP connections, and the WebSocket and SSE tasks that outlive their
    /// request. Shutdown waits for them all, so that what a stream was given and
    /// nobody acknowledged is back at the core before the process exits.
    pub tasks: TaskTracker,
    /// This worker's counters (and through them the process's, for a scrape).
    pub metrics: Arc<WorkerMetrics>,
}

/// How long `/readyz` gives the core to answer a ping.
pub const READY_WITHIN: Duration = Duration::from_secs(1);

/// How long a scrape waits for the core's counters before it shows msghandler's
/// alone (with `micromsg_core_up 0`).
const SCRAPE_CORE_WITHIN: Duration = Duration::from_secs(2);

/// The streaming transports' settings (WebSocket and SSE), from the configuration.
#[derive(Debug, Clone)]
pub struct Streams {
    pub ping_interval: Duration,
    /// Also bounds how long an SSE batch may wait for hyper to take it.
    pub send_timeout: Duration,
    pub max_buffer: usize,
    pub heartbeat: Duration,
    pub default_window: u32,
    pub max_window: u32,
}

/// How long a stream's poll is parked at the core. A stream polls again at once,
/// so this only bounds how often an idle stream costs a round trip; it stays below
/// the core's default `max_poll_timeout` (120 s), which would cut it short.
pub const STREAM_POLL: Duration = Duration::from_secs(25);

/// A stream's poll that came back empty long before [`STREAM_POLL`] was superseded:
/// another poll for the same session took its place at the core (a second tab on
/// the session, a reconnect while the old connection lingers). Polling again at once
/// would supersede that one in turn, and the two would spin; each waits this long.
pub const SUPERSEDED_PAUSE: Duration = Duration::from_secs(1);

/// Whether an empty answer after `waited` means the poll was superseded.
pub fn superseded(waited: Duration) -> bool {
    waited < STREAM_POLL / 2
}

/// At most this many messages per poll of a stream: a batch is one write (one SSE
/// chunk), and a mailbox with thousands waiting should not become one huge write.
pub const STREAM_BATCH: u32 = 256;

pub struct Cors {
    any_origin: bool,
    origins: Vec<HeaderValue>,
}

impl Cors {
    pub fn new(allowed: &[String]) -> anyhow::Result<Self> {
        let any_origin = allowed.iter().any(|o| o == "*");
        let origins = allowed
            .iter()
            .filter(|o| *o != "*")
            .map(|o| HeaderValue::from_str(o).map_err(|_| anyhow::anyhow!("bad CORS origin {o:?}")))
            .collect::<anyhow::Result<_>>()?;
        Ok(Cors {
            any_origin,
            origins,
        })
    }

    /// Whether a request from `origin` may be served at all: for WebSockets, which
    /// browsers open from any page without asking CORS. No `Origin` is not a browser.
    pub fn admits(&self, origin: Option<&HeaderValue>) -> bool {
        self.any_origin || origin.is_none_or(|origin| self.origins.contains(origin))
    }

    /// Adds `Access-Control-Allow-Origin` when the request's `origin` may read the reply.
    fn allow(&self, origin: Option<&HeaderValue>, response: &mut HeaderMap) {
        if self.any_origin {
            response.insert(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            );
            return;
        }
        response.insert(header::VARY, HeaderValue::from_static("Origin"));
        if let Some(origin) = origin
            && self.origins.contains(origin)
        {
            response.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        }
    }
}

/// A whole reply, or an event stream. An enum rather than a boxed body, so that
/// the plain replies, nearly all the traffic, cost no allocation for it.
pub type Body = Either<Full<Bytes>, EventBody>;

pub type Reply = Response<Body>;

/// Which API a path belongs to.
enum Api {
    X0(Endpoint),
    V1(Route),
    WebSocket,
    Events,
    Asset(Asset),
}

impl Api {
    fn kind(&self) -> RouteKind {
        match self {
            Api::X0(_) => RouteKind::X0,
            Api::V1(route) if route.is_backend() => RouteKind::Backend,
            Api::V1(_) => RouteKind::V1,
            Api::WebSocket => RouteKind::WebSocket,
            Api::Events => RouteKind::Events,
            Api::Asset(_) => RouteKind::Asset,
        }
    }
}

/// Answers one request from `peer` (the connection's address: a proxy's, when
/// msghandler is behind one).
pub fn handle(
    app: Arc<App>,
    peer: IpAddr,
    request: Request<Incoming>,
) -> impl Future<Output = Result<Reply, Infallible>> + Send + 'static {
    // hyper holds this future for as long as the request is open, a parked poll's
    // whole wait. So everything that needs no waiting is done here and not in the
    // future, which would keep the request for its whole life (an async fn keeps
    // its arguments), and what does wait is one box of its own.
    let Routed { kind, cors, answer } = route(&app, peer, request);
    async move {
        let mut reply = match answer {
            Answer::Ready(reply) => reply,
            Answer::Later(later) => later.await,
        };
        if let Some(origin) = cors {
            app.cors.allow(origin.as_ref(), reply.headers_mut());
        }
        Ok(counted(&app, kind, reply))
    }
}

/// A request's reply, or the future of it when it has to wait (for the body, the
/// core or a limit).
enum Answer {
    Ready(Reply),
    Later(Pin<Box<dyn Future<Output = Reply> + Send>>),
}

/// A request once routed.
struct Routed {
    /// For the metrics.
    kind: RouteKind,
    /// The request's `Origin`, to answer with CORS headers; `None` for the
    /// operator's routes and unknown paths, which get none.
    cors: Option<Option<HeaderValue>>,
    answer: Answer,
}

fn route(app: &Arc<App>, peer: IpAddr, request: Request<Incoming>) -> Routed {
    let without_cors = |kind, answer| Routed {
        kind,
        cors: None,
        answer,
    };
    let path = request.uri().path();
    // The x0 paths first: they carry nearly all the traffic.
    let api = match Endpoint::of(path) {
        Some(endpoint) => Api::X0(endpoint),
        None => match path {
            "/v1/ws" => Api::WebSocket,
            "/v1/events" => Api::Events,
            // The operator's routes: no token, no rate limit, no CORS (a browser page
            // has no business with them).
            "/healthz" => return without_cors(RouteKind::Health, Answer::Ready(healthz())),
            "/readyz" => {
                let app = app.clone();
                let ready = async move { readyz(&app).await };
                return without_cors(RouteKind::Health, Answer::Later(Box::pin(ready)));
            }
            "/metrics" => {
                let app = app.clone();
                let scraped = async move { scrape(&app, peer, &request).await };
                return without_cors(RouteKind::Metrics, Answer::Later(Box::pin(scraped)));
            }
            path => match (Route::of(path), Asset::of(path)) {
                (Some(route), _) => Api::V1(route),
                (None, Some(asset)) => Api::Asset(asset),
                (None, None) => {
                    let error = X0Error::new("NotFound", format!("no such path: {path}"));
                    let reply = json(StatusCode::NOT_FOUND, error.to_json());
                    return without_cors(RouteKind::Other, Answer::Ready(reply));
                }
            },
        },
    };
    let kind = api.kind();
    // Only this header is needed after the request is consumed (cloning a
    // HeaderValue shares its bytes).
    let origin = request.headers().get(header::ORIGIN).cloned();
    let answer = if let Err(limited) = app.limits.check_request(peer, request.headers()) {
        match api {
            Api::X0(_) => {
                let app = app.clone();
                Answer::Later(Box::pin(async move {
                    // An x0 tab asks again at once after any answer: held until the
                    // limiter would let it through, it slows to the limit.
                    let wait = limited.wait.min(app.poll_timeout);
                    hold_until(&app, tokio::time::Instant::now() + wait).await;
                    x0_reply(Err(limited.error().into()))
                }))
            }
            _ => Answer::Ready(refusal(limited.error(), "GET, POST, OPTIONS")),
        }
    } else if request.method() == Method::OPTIONS {
        Answer::Ready(preflight(request.headers()))
    } else {
        let grant = grant(app, &api, &request);
        match api {
            // `map`, not an async block: that would hold the request and the grant
            // it captured, and the future it awaits twice over.
            Api::X0(endpoint) => {
                let request = x0_request(app.clone(), endpoint, request, grant);
                Answer::Later(Box::pin(request.map(x0_reply)))
            }
            Api::V1(route) => {
                let request = v1_request(app.clone(), route, request, grant);
                Answer::Later(Box::pin(request.map(move |result| v1_reply(route, result))))
            }
            Api::WebSocket => Answer::Ready(ws::upgrade(app, request, grant)),
            Api::Events if request.method() == Method::GET => Answer::Ready(match grant {
                Ok(grant) => sse::open(app, &request, grant),
                Err(error) => refusal(error, "GET, OPTIONS"),
            }),
            Api::Events => Answer::Ready(refusal(
                X0Error::new(
                    "MethodNotAllowed",
                    format!("{} is not supported here; use GET", request.method()),
                ),
                "GET, OPTIONS",
            )),
            Api::Asset(asset) => Answer::Ready(assets::reply(asset, request.method())),
        }
    };
    Routed {
        kind,
        cors: Some(origin),
        answer,
    }
}

fn counted(app: &App, kind: RouteKind, reply: Reply) -> Reply {
    app.metrics.responded(kind, reply.status());
    reply
}

/// `/healthz`: the process is alive and serving HTTP. Never asks the core, so
/// that a supervisor does not restart a healthy front for a core outage.
fn healthz() -> Reply {
    json(StatusCode::OK, r#"{"status":"ok"}"#.to_owned())
}

/// `/readyz`: a core connection is up and answers a ping in time, so requests
/// can be served; otherwise 503 with the `CoreUnavailable` error body.
async fn readyz(app: &App) -> Reply {
    if app.core.ping(READY_WITHIN).await {
        return json(StatusCode::OK, r#"{"status":"ok"}"#.to_owned());
    }
    let error = X0Error::new(
        "CoreUnavailable",
        format!(
            "msgserver is not reachable or did not answer within {} ms",
            READY_WITHIN.as_millis()
        ),
    );
    json(v1::status(error.kind), error.to_json())
}

/// `/metrics`, for the addresses `metrics_allow` names: msghandler's counters and,
/// when it answers in time, the core's.
async fn scrape(app: &App, peer: IpAddr, request: &Request<Incoming>) -> Reply {
    let shared = app.metrics.shared();
    let client = app.limits.client_ip(peer, request.headers());
    if !shared.allows(client) {
        let error = X0Error::new(
            "Forbidden",
            "/metrics is for operators: this address is not in metrics_allow",
        );
        return refusal(error, "GET, HEAD");
    }
    if !matches!(*request.method(), Method::GET | Method::HEAD) {
        let error = X0Error::new(
            "MethodNotAllowed",
            format!("{} is not supported here; use GET", request.method()),
        );
        return refusal(error, "GET, HEAD");
    }
    let asked = app.core.request(ipc::Request::Metrics);
    let core = match tokio::time::timeout(SCRAPE_CORE_WITHIN, asked).await {
        Ok(Ok(CoreResponse::Metrics(core))) => Some(*core),
        _ => None,
    };
    let handler = shared.handler_totals(app.limits.open_connections());
    let mut reply = Response::new(Either::Left(Full::new(Bytes::from(metrics::render(
        handler, core,
    )))));
    let headers = reply.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(metrics::CONTENT_TYPE),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    reply
}

/// Binds the token's session to the token's user (`sub`) at the core, so that
/// messages to that user reach it without the backend binding every session
/// itself. Once per session and worker every half minute (see [`Bindings`]).
pub async fn bind_user(app: &App, grant: Option<&Grant>) -> Result<(), X0Error> {
    let Some((grant, user)) = grant.and_then(|g| Some((g, g.user.as_deref()?))) else {
        return Ok(());
    };
    if !app.bindings.due(&grant.session, user) {
        return Ok(());
    }
    let bind = ipc::Request::Bind {
        session: grant.session.clone(),
        user: user.to_owned(),
        exclusive: false,
    };
    match app.core.request(bind).await {
        Ok(CoreResponse::Count(_)) => {
            app.bindings.bound(&grant.session, user);
            Ok(())
        }
        other => Err(unexpected(other)),
    }
}

/// The answer on a connection over `max_connections_per_ip`.
pub fn too_many_connections<B>(request: &Request<B>) -> Reply {
    let error = X0Error::new(
        "TooManyConnections",
        "this address has too many connections open; close some and retry",
    );
    let mut reply = match Endpoint::of(request.uri().path()) {
        Some(_) => x0_reply(Err(error.into())),
        None => refusal(error, "GET, POST, OPTIONS"),
    };
    reply
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    reply
}

/// What the request's token allows, when tokens are required: `Ok(None)` when they
/// are not (`auth = "none"`), and for the backend API and the served files, which
/// have their own key or need none.
fn grant(app: &App, api: &Api, request: &Request<Incoming>) -> Result<Option<Grant>, X0Error> {
    let Some(tokens) = &app.tokens else {
        return Ok(None);
    };
    match api {
        Api::Asset(_) => Ok(None),
        Api::V1(route) if route.is_backend() => Ok(None),
        _ => tokens
            .grant(request.headers(), request.uri().query())
            .map(Some),
    }
}

fn x0_reply(result: Result<String, Refusal>) -> Reply {
    match result {
        Ok(body) => json(StatusCode::OK, body),
        Err(Refusal::TooLarge(error)) => too_large(error),
        Err(Refusal::Unread(error)) => closing(json(StatusCode::OK, error.to_json())),
        Err(Refusal::Error(error)) => {
            debug!(kind = error.kind, message = %error.message, "x0 request refused");
            json(StatusCode::OK, error.to_json())
        }
    }
}

fn v1_reply(route: Route, result: Result<String, Refusal>) -> Reply {
    let error = match result {
        Ok(body) => return json(StatusCode::OK, body),
        Err(Refusal::TooLarge(error)) => return too_large(error),
        Err(Refusal::Unread(error)) => {
            return closing(json(v1::status(error.kind), error.to_json()));
        }
        Err(Refusal::Error(error)) => error,
    };
    debug!(?route, kind = error.kind, message = %error.message, "v1 request refused");
    let status = v1::status(error.kind);
    let mut reply = json(status, error.to_json());
    let headers = reply.headers_mut();
    match status {
        StatusCode::UNAUTHORIZED => {
            headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        StatusCode::TOO_MANY_REQUESTS => {
            headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        StatusCode::METHOD_NOT_ALLOWED => {
            headers.insert(
                header::ALLOW,
                HeaderValue::from_static(route.allowed_methods()),
            );
        }
        _ => {}
    }
    reply
}

/// A refusal outside the x0 paths and the `/v1` routes, with the status of its
/// `exception_id`; `allow` is the `Allow` header of a 405.
pub fn refusal(error: X0Error, allow: &'static str) -> Reply {
    debug!(kind = error.kind, message = %error.message, "request refused");
    let status = v1::status(error.kind);
    let mut reply = json(status, error.to_json());
    match status {
        StatusCode::METHOD_NOT_ALLOWED => {
            reply
                .headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static(allow));
        }
        StatusCode::TOO_MANY_REQUESTS => {
            reply
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        _ => {}
    }
    reply
}

fn too_large(error: X0Error) -> Reply {
    closing(json(StatusCode::PAYLOAD_TOO_LARGE, error.to_json()))
}

/// The rest of the body was never read; the connection cannot be reused.
fn closing(mut reply: Reply) -> Reply {
    reply
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    reply
}

enum Refusal {
    /// Over the body limit: the one x0 answer that is not a 200, and the one that
    /// closes the connection.
    TooLarge(X0Error),
    /// The body was not read in full (it did not arrive within
    /// `body_read_timeout`, or its framing is ambiguous): the x0 paths still answer
    /// 200, and the connection closes, so nothing after it is read as a request.
    Unread(X0Error),
    Error(X0Error),
}

impl From<X0Error> for Refusal {
    fn from(error: X0Error) -> Self {
        Refusal::Error(error)
    }
}

fn x0_request(
    app: Arc<App>,
    endpoint: Endpoint,
    request: Request<Incoming>,
    grant: Result<Option<Grant>, X0Error>,
) -> impl Future<Output = Result<String, Refusal>> + Send + 'static {
    // Reading and judging the request is over before a poll parks: boxed apart, its
    // state (the body's reader above all) is freed then instead of waiting with it.
    // Made here and not in the async block, which would keep the request and the
    // grant for as long as it lives.
    let admitted = {
        let app = app.clone();
        Box::pin(async move { x0_admit(&app, endpoint, request, grant).await })
    };
    async move {
        let app = &*app;
        let (operation, poll_timeout) = {
            let (operation, grant) = admitted.await?;
            (
                operation,
                poll_within_token(app.poll_timeout, grant.as_ref()),
            )
        };
        // The poll inline, the others boxed: this future is as large as all the
        // futures it awaits together, and only a poll waits long.
        let done = match operation {
            Operation::Get {
                session,
                ack_previous,
            } => get(app, &session, ack_previous, poll_timeout).await,
            Operation::Set {
                src,
                dst,
                body,
                key,
            } => Box::pin(set(app, src, dst, body, key)).await,
            Operation::Del { session, which } => Box::pin(del(app, session, which)).await,
        };
        Ok(done?)
    }
}

/// Reads and parses an x0 request, and lets it through the token, the session's
/// rate limit and the user binding: what to carry out, and with which grant.
async fn x0_admit(
    app: &App,
    endpoint: Endpoint,
    request: Request<Incoming>,
    grant: Result<Option<Grant>, X0Error>,
) -> Result<(Operation, Option<Grant>), Refusal> {
    let started = tokio::time::Instant::now();
    let operation = match *request.method() {
        Method::GET if endpoint == Endpoint::Get => query_get(request.uri().query())?,
        Method::POST => {
            // First: any other refusal would leave the body to hyper to drain.
            check_framing(request.headers())?;
            check_content_type(request.headers())?;
            let body = read_body(request, app.max_body_bytes, app.body_read_timeout).await?;
            x0::parse(endpoint, &body)?
        }
        ref other => {
            return Err(X0Error::new(
                "MethodNotAllowed",
                format!("{other} is not supported here; use POST (or GET /get?session_src=...)"),
            )
            .into());
        }
    };
    // Judged on the parsed request, so that a refused poll can be told from the rest.
    let permitted = grant.and_then(|g| match g {
        Some(g) => g.permits_x0(&operation).map(|()| Some(g)),
        None => Ok(None),
    });
    let grant = match permitted {
        Ok(grant) => grant,
        Err(error) => {
            if matches!(operation, Operation::Get { .. }) {
                // As for a kicked session: an x0 tab polls again at once after any
                // answer, so a refusal given at once would make it spin.
                hold_until(app, started + app.poll_timeout).await;
            }
            return Err(error.into());
        }
    };
    if let Err(limited) = app.limits.check_session(operation.caller()) {
        hold_until(app, started + limited.wait.min(app.poll_timeout)).await;
        return Err(limited.error().into());
    }
    bind_user(app, grant.as_ref()).await?;
    Ok((operation, grant))
}

/// As [`x0_request`]: admission boxed apart, and a poll's state alone inline.
fn v1_request(
    app: Arc<App>,
    route: Route,
    request: Request<Incoming>,
    grant: Result<Option<Grant>, X0Error>,
) -> impl Future<Output = Result<String, Refusal>> + Send + 'static {
    let admitted = {
        let app = app.clone();
        Box::pin(async move { v1_admit(&app, route, request, grant).await })
    };
    async move {
        let (operation, cap) = admitted.await?;
        let done = match operation {
            v1::Operation::Poll(poll) => v1_poll(&app, &poll, cap).await,
            other => Box::pin(v1_execute(&app, other, cap)).await,
        };
        Ok(done?)
    }
}

/// Reads, parses and lets through a `/v1` request: what to carry out, and the cap
/// on a poll's timeout.
async fn v1_admit(
    app: &App,
    route: Route,
    request: Request<Incoming>,
    grant: Result<Option<Grant>, X0Error>,
) -> Result<(v1::Operation, Duration), Refusal> {
    // Before the body is read: a caller without a valid token gets nothing for it.
    let grant = grant?;
    let operation = match *request.method() {
        Method::GET if route.takes_get() => v1::parse_query(route, request.uri().query())?,
        Method::POST => {
            check_framing(request.headers())?;
            // Before the body is read: a caller without the key gets nothing for it.
            if route.is_backend() {
                authorize(app.backend_key.as_deref(), request.headers())?;
            }
            check_content_type(request.headers())?;
            let body = read_body(request, app.max_body_bytes, app.body_read_timeout).await?;
            v1::parse(route, &body)?
        }
        ref other => {
            return Err(X0Error::new(
                "MethodNotAllowed",
                format!(
                    "{other} is not supported here; use {}",
                    route.allowed_methods()
                ),
            )
            .into());
        }
    };
    if let Some(grant) = &grant {
        grant.permits(&operation)?;
    }
    if let Some(session) = operation.caller() {
        // Each message of a batch counts, as it would sent alone.
        let messages = match &operation {
            v1::Operation::Batch(sends) => sends.len(),
            _ => 1,
        };
        app.limits.check_session_messages(session, messages)?;
    }
    bind_user(app, grant.as_ref()).await?;
    let cap = poll_within_token(Duration::MAX, grant.as_ref());
    Ok((operation, cap))
}

fn authorize(key: Option<&BackendKey>, headers: &HeaderMap) -> Result<(), X0Error> {
    let Some(key) = key else {
        return Err(X0Error::new(
            "Forbidden",
            "the backend API is disabled: set backend_key",
        ));
    };
    key.admits(headers.get(header::AUTHORIZATION))
        .map_err(|denied| match denied {
            Denied::Missing => X0Error::new(
                "Unauthorized",
                "a backend call needs Authorization: Bearer <backend_key>",
            ),
            Denied::Wrong => X0Error::new("Unauthorized", "the backend key is not accepted"),
        })
}

/// A poll may not outlast the token it was authorised with: it ends (empty) when
/// the token does, and the client's next request needs a fresh one, as a stream
/// is closed at its token's expiry.
fn poll_within_token(timeout: Duration, grant: Option<&Grant>) -> Duration {
    grant.map_or(timeout, |g| timeout.min(g.remaining()))
}

/// `cap` bounds a poll's timeout (see [`poll_within_token`]).
async fn v1_execute(app: &App, operation: v1::Operation, cap: Duration) -> Result<String, X0Error> {
    match operation {
        v1::Operation::Send(send) => match app.core.send(send).await {
            Ok(reply) => v1::Answer::Sent.render(reply),
            Err(e) => Err(core_error(e)),
        },
        v1::Operation::Batch(sends) => {
            let answers = app.core.send_batch(sends).await.into_iter();
            Ok(v1::batch_reply(answers.map(|reply| match reply {
                Ok(reply) => v1::Answer::Sent.render(reply),
                Err(e) => Err(core_error(e)),
            })))
        }
        v1::Operation::Poll(poll) => v1_poll(app, &poll, cap).await,
        v1::Operation::Request(request, answer) => match app.core.request(request).await {
            Ok(reply) => answer.render(reply),
            Err(e) => Err(core_error(e)),
        },
    }
}

async fn v1_poll(app: &App, poll: &v1::Poll, cap: Duration) -> Result<String, X0Error> {
    let timeout = poll.timeout.unwrap_or(app.poll_timeout).min(cap);
    match long_poll(app, &poll.session, timeout, poll.ack_previous, poll.max).await {
        Ok(messages) => Ok(v1::messages_reply(&messages)),
        Err(e) => Err(poll_error(e)),
    }
}

fn query_get(query: Option<&str>) -> Result<Operation, X0Error> {
    let session = form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .find(|(key, _)| key == "session_src")
        .map(|(_, value)| value.into_owned())
        .ok_or_else(|| {
            X0Error::new(
                "MissingField",
                "session_src is missing from the query string",
            )
        })?;
    if session.is_empty() || session.len() > x0::MAX_SESSION_LEN {
        return Err(X0Error::new(
            "InvalidField",
            "session_src is empty or too long",
        ));
    }
    Ok(Operation::Get {
        session,
        ack_previous: true,
    })
}

/// JSON only; `; charset=UTF-8` and other parameters are fine. A request with no
/// Content-Type at all is read as JSON, which is what a bare curl or a script means.
fn check_content_type(headers: &HeaderMap) -> Result<(), X0Error> {
    let Some(value) = headers.get(header::CONTENT_TYPE) else {
        return Ok(());
    };
    let essence = value
        .to_str()
        .ok()
        .and_then(|v| v.split(';').next())
        .map(str::trim)
        .unwrap_or("");
    if essence.eq_ignore_ascii_case("application/json") {
        Ok(())
    } else {
        Err(X0Error::new(
            "UnsupportedContentType",
            format!(
                "Content-Type {:?} is not supported; send application/json",
                String::from_utf8_lossy(value.as_bytes())
            ),
        ))
    }
}

/// Refuses a body that is chunked more than once (`Transfer-Encoding: chunked`
/// twice, or `chunked, chunked`). hyper decodes it once and would read what
/// follows as the next request, while a proxy in front may decode it twice or
/// refuse it: the one disagreement on where a request ends that hyper lets through
/// (it already refuses conflicting lengths, and chunked that is not last).
fn check_framing(headers: &HeaderMap) -> Result<(), Refusal> {
    let chunked = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&b| b == b','))
        .filter(|coding| coding.trim_ascii().eq_ignore_ascii_case(b"chunked"))
        .count();
    if chunked > 1 {
        return Err(Refusal::Unread(X0Error::new(
            "BadRequest",
            "Transfer-Encoding applies chunked more than once",
        )));
    }
    Ok(())
}

async fn read_body(
    request: Request<Incoming>,
    limit: u64,
    timeout: Duration,
) -> Result<Bytes, Refusal> {
    let too_large = || {
        Refusal::TooLarge(X0Error::new(
            "BodyTooLarge",
            format!("the request body is over the limit of {limit} bytes"),
        ))
    };
    // Refuse from the header alone when it says enough; Limited catches bodies that
    // do not announce their size.
    let announced = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|len| len > limit) {
        return Err(too_large());
    }
    // hyper bounds only the head's arrival: without this, a body that trickles a
    // byte now and then holds its connection and buffer for ever.
    let collected = tokio::time::timeout(
        timeout,
        Limited::new(request.into_body(), limit as usize).collect(),
    )
    .await
    .map_err(|_| {
        Refusal::Unread(X0Error::new(
            "RequestTimeout",
            format!("the request body did not arrive within {timeout:?}"),
        ))
    })?;
    match collected {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(X0Error::new(
            "BadRequest",
            format!("reading the request body failed: {e}"),
        )
        .into()),
    }
}

async fn set(
    app: &App,
    src: String,
    dst: String,
    body: String,
    key: Option<String>,
) -> Result<String, X0Error> {
    match app.core.publish(src, dst, body, key).await {
        Ok(CoreResponse::Published {
            id,
            dropped,
            duplicate,
        }) => Ok(x0::set_reply(id, dropped, duplicate)),
        other => Err(unexpected(other)),
    }
}

async fn del(app: &App, session: String, which: ipc::AckSelector) -> Result<String, X0Error> {
    match app.core.request(ipc::Request::Ack { session, which }).await {
        Ok(CoreResponse::Acked { .. }) => Ok(x0::OK.to_owned()),
        other => Err(unexpected(other)),
    }
}

async fn get(
    app: &App,
    session: &str,
    ack_previous: bool,
    poll_timeout: Duration,
) -> Result<String, X0Error> {
    let started = tokio::time::Instant::now();
    match long_poll(app, session, poll_timeout, ack_previous, 0).await {
        Ok(messages) => Ok(x0::messages_reply(&messages)),
        Err(e) => {
            // The x0 client polls again at once after any answer, errors included:
            // a refusal given at once (a kicked session's) would make its tab spin,
            // so it waits out the poll first.
            hold_until(app, started + app.poll_timeout).await;
            Err(poll_error(e))
        }
    }
}

/// Acknowledges at the core without waiting for its answer: a stream's next batch
/// need not wait for it, and a lost acknowledgement only means the messages come
/// again (and are dropped by id). Tracked, so that a stopping handler sends it.
pub fn acknowledge_detached(app: &App, session: &str, which: ipc::AckSelector) {
    let core = app.core.clone();
    let ack = ipc::Request::Ack {
        session: session.to_owned(),
        which,
    };
    app.tasks.spawn(
        async move {
            if let Err(e) = core.request(ack).await {
                debug!(error = %e, "an acknowledgement did not reach the core");
            }
        }
        .in_current_span(),
    );
}

/// Sleeps until `deadline`, or until the handler starts stopping.
async fn hold_until(app: &App, deadline: tokio::time::Instant) {
    let mut shutdown = app.shutdown.clone();
    if *shutdown.borrow_and_update() {
        return;
    }
    tokio::select! {
        () = tokio::time::sleep_until(deadline) => {}
        _ = shutdown.changed() => {}
    }
}

/// A long-poll that answers with no messages at once when the handler is stopping.
async fn long_poll(
    app: &App,
    session: &str,
    timeout: Duration,
    ack_previous: bool,
    max: u32,
) -> Result<Vec<Message>, PollError> {
    let mut shutdown = app.shutdown.clone();
    if *shutdown.borrow_and_update() {
        return Ok(Vec::new());
    }
    tokio::select! {
        polled = app.core.poll(session, timeout, ack_previous, max) => polled,
        // Dropping the poll withdraws it at the core, so nothing is lost.
        _ = shutdown.changed() => Ok(Vec::new()),
    }
}

/// A refused poll keeps the core's name for the refusal (`Kicked`): the x0 paths
/// show it in a 200, `/v1` with its status.
pub fn poll_error(e: PollError) -> X0Error {
    match e {
        PollError::Core(e) => core_error(e),
        PollError::Refused(e) => e.into(),
    }
}

fn unexpected(reply: Result<CoreResponse, CoreError>) -> X0Error {
    match reply {
        Ok(CoreResponse::Error(e)) => e.into(),
        Ok(other) => X0Error::new(
            "InternalError",
            format!("unexpected reply from the core: {other:?}"),
        ),
        Err(e) => core_error(e),
    }
}

pub fn core_error(e: CoreError) -> X0Error {
    let hint = match e {
        CoreError::Unavailable => "; try again shortly",
        CoreError::ConnectionLost => "; the request may or may not have been carried out",
    };
    X0Error::new("CoreUnavailable", format!("{e}{hint}"))
}

fn preflight(request: &HeaderMap) -> Reply {
    let mut reply = Response::new(Either::Left(Full::new(Bytes::new())));
    *reply.status_mut() = StatusCode::NO_CONTENT;
    let headers = reply.headers_mut();
    headers.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, OPTIONS"),
    );
    if let Some(asked) = request.get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
        headers.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, asked.clone());
    }
    // x0's random query string defeats the browser's preflight cache anyway, but
    // clients without it get to skip the round trip.
    headers.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    reply
}

fn json(status: StatusCode, body: String) -> Reply {
    let mut reply = Response::new(Either::Left(Full::new(Bytes::from(body))));
    *reply.status_mut() = status;
    let headers = reply.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    reply
}

#[cfg(test)]
mod tests {
    //! The HTTP answers themselves, over a real socket, against no core at all or a
    //! scripted stand-in for one on a Unix socket.

    use ipc::{ErrorKind, Request as CoreRequest};

    use super::*;
    use crate::harness::{fake_core, handler, no_core};

    #[tokio::test]
    async fn v1_refusals_get_their_documented_status_while_x0_stays_200() {
        let h = handler(no_core(), None).await;
        let bad = h.post("/v1/publish", "{bad").await;
        assert_eq!(bad.refusal(), (400, "InvalidJson"));
        assert!(
            bad.head.contains("access-control-allow-origin: *"),
            "{}",
            bad.head
        );
        let to_user = r#"{"session":"A","target":{"user":"u"},"data":1}"#;
        assert_eq!(
            h.post("/v1/publish", to_user).await.refusal(),
            (403, "Forbidden")
        );
        let fine = r#"{"session":"A","target":{"session":"B"},"data":1}"#;
        assert_eq!(
            h.post("/v1/publish", fine).await.refusal(),
            (503, "CoreUnavailable")
        );
        let put = h.call("PUT", "/v1/ack", &[], "{}").await;
        assert_eq!(put.refusal(), (405, "MethodNotAllowed"));
        assert!(put.head.contains("allow: post, options"), "{}", put.head);
        let get = h.call("GET", "/v1/presence?channel=c", &[], "").await;
        assert_eq!(get.refusal(), (503, "CoreUnavailable"));
        let text = h
            .call("POST", "/v1/ack", &["Content-Type: text/plain"], "{}")
            .await;
        assert_eq!(text.refusal(), (415, "UnsupportedContentType"));
        let charset = h
            .call(
                "POST",
                "/v1/ack",
                &["Content-Type: application/json; charset=UTF-8"],
                "{}",
            )
            .await;
        assert_eq!(charset.refusal(), (400, "MissingField"));
        assert_eq!(h.post("/v1/nope", "{}").await.refusal(), (404, "NotFound"));
        let big = format!(r#"{{"session":"{}"}}"#, "x".repeat(2000));
        let big = h.post("/v1/poll", &big).await;
        assert_eq!(big.refusal(), (413, "BodyTooLarge"));
        assert!(big.head.contains("connection: close"));
        let poll = h.call("GET", "/v1/poll?session=B&timeout=0", &[], "").await;
        assert_eq!(poll.refusal(), (503, "CoreUnavailable"));
        // The x0 paths are untouched: a refusal is still a 200.
        assert_eq!(h.post("/get", "{bad").await.refusal(), (200, "InvalidJson"));
        let preflight = h
            .call(
                "OPTIONS",
                "/v1/publish",
                &["Access-Control-Request-Headers: content-type"],
                "",
            )
            .await;
        assert_eq!(preflight.status, 204);
        assert!(
            preflight
                .head
                .contains("access-control-allow-methods: get, post, options")
        );
        assert!(
            preflight
                .head
                .contains("access-control-allow-headers: content-type")
        );
    }

    #[tokio::test]
    async fn backend_calls_need_the_configured_key() {
        let disabled = handler(no_core(), None).await;
        let refused = disabled
            .post("/v1/backend/kick", r#"{"session":"S"}"#)
            .await;
        assert_eq!(refused.refusal(), (403, "Forbidden"));
        assert_eq!(
            refused.body["exception"],
            "the backend API is disabled: set backend_key"
        );

        let h = handler(no_core(), Some("s3cret")).await;
        let missing = h.post("/v1/backend/kick", r#"{"session":"S"}"#).await;
        assert_eq!(missing.refusal(), (401, "Unauthorized"));
        assert!(missing.head.contains("www-authenticate: bearer"));
        let wrong = h
            .call(
                "POST",
                "/v1/backend/bind",
                &["Authorization: Bearer nope"],
                "{}",
            )
            .await;
        assert_eq!(wrong.refusal(), (401, "Unauthorized"));
        // The right key gets as far as reading the body.
        let right = h
            .call(
                "POST",
                "/v1/backend/bind",
                &["Authorization: Bearer s3cret"],
                "{}",
            )
            .await;
        assert_eq!(right.refusal(), (400, "MissingField"));
        // Client paths take no key.
        let client = r#"{"session":"A","target":{"session":"B"},"data":1}"#;
        assert_eq!(
            h.post("/v1/publish", client).await.refusal(),
            (503, "CoreUnavailable")
        );
    }

    #[tokio::test]
    async fn a_kicked_session_hears_it_on_both_apis() {
        let (socket, asked) = fake_core(|request| match request {
            CoreRequest::Poll { .. } => {
                Some(CoreResponse::error(ErrorKind::Kicked, "kicked: logged out"))
            }
            _ => None,
        });
        let h = handler(socket.0.clone(), None).await;
        let v1 = h.post("/v1/poll", r#"{"session":"S","max":100}"#).await;
        assert_eq!(v1.refusal(), (403, "Kicked"));
        let x0 = h.post("/get", r#"{"session_src":"S"}"#).await;
        assert_eq!(x0.refusal(), (200, "Kicked"));
        assert_eq!(x0.body["exception"], "kicked: logged out");
        let maxes: Vec<u32> = asked
            .lock()
            .unwrap()
            .iter()
            .filter_map(|r| match r {
                CoreRequest::Poll { max, .. } => Some(*max),
                _ => None,
            })
            .collect();
        assert_eq!(maxes, [100, 0]);
    }

    #[tokio::test]
    async fn a_silent_core_does_not_hold_a_poll_past_its_timeout() {
        let (socket, asked) = fake_core(|_| None);
        let h = handler(socket.0.clone(), None).await;
        let started = std::time::Instant::now();
        let poll = h.post("/v1/poll", r#"{"session":"S","timeout":0.1}"#).await;
        assert_eq!(
            (poll.status, poll.body),
            (200, serde_json::json!({"messages":[],"ids":[]}))
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        // The abandoned poll is withdrawn at the core.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            asked
                .lock()
                .unwrap()
                .iter()
                .any(|r| matches!(r, CoreRequest::CancelPoll { .. }))
        );
    }

    #[tokio::test]
    async fn a_stopping_handler_answers_v1_polls_at_once() {
        let (socket, _) = fake_core(|_| None);
        let h = handler(socket.0.clone(), None).await;
        h.stop.send(true).unwrap();
        let poll = h
            .call("GET", "/v1/poll?session=S&timeout=30", &[], "")
            .await;
        assert_eq!(
            (poll.status, poll.body),
            (200, serde_json::json!({"messages":[],"ids":[]}))
        );
    }

    #[tokio::test]
    async fn a_publish_reaches_the_core_as_a_keyed_send_with_raw_data() {
        let (socket, asked) = fake_core(|request| match request {
            CoreRequest::Send(_) => Some(CoreResponse::Sent {
                id: 17,
                recipients: 3,
                dropped: 0,
                duplicate: false,
            }),
            CoreRequest::Poll { .. } => Some(CoreResponse::Messages(vec![Message {
                id: 17,
                body: r#"{"id":17,"data":1.50}"#.into(),
            }])),
            _ => None,
        });
        let h = handler(socket.0.clone(), None).await;
        let body = r#"{"session":"A","target":{"channel":"c"},"data":{"n":1.50},"ttl":1.5}"#;
        let sent = h.post("/v1/publish", body).await;
        assert_eq!(
            (sent.status, sent.body),
            (200, serde_json::json!({"id":17,"recipients":3}))
        );
        let CoreRequest::Send(send) = asked.lock().unwrap()[0].clone() else {
            panic!("not a send")
        };
        assert_eq!(
            (send.data.as_str(), send.ttl_ms),
            (r#"{"n":1.50}"#, Some(1500))
        );
        // A durable core gets a key made here, so that a retry cannot store it twice.
        assert!(send.key.is_some_and(|k| k.starts_with('~')));
        let poll = h.post("/v1/poll", r#"{"session":"B"}"#).await;
        assert_eq!(
            (poll.status, poll.body),
            (
                200,
                serde_json::json!({"messages":[{"id":17,"data":1.50}],"ids":[17],"cursor":17})
            )
        );
    }

    #[tokio::test]
    async fn the_client_and_the_demo_are_served_as_files() {
        let h = handler(no_core(), None).await;
        let script = h.call("GET", "/v1/micromsg.js", &[], "").await;
        assert_eq!(script.status, 200);
        assert!(
            script
                .head
                .contains("content-type: text/javascript; charset=utf-8")
        );
        assert!(script.head.contains("cache-control: public, max-age=300"));
        assert!(script.text.contains("globalThis.MicroMsg = MicroMsg;"));
        let module = h.call("GET", "/v1/micromsg.mjs?v=2", &[], "").await;
        assert!(module.text.starts_with(&script.text));
        assert!(
            module
                .text
                .ends_with("export default MicroMsg;\nexport { MicroMsg };\n")
        );
        let demo = h.call("GET", "/demo", &[], "").await;
        assert_eq!(demo.status, 200);
        assert!(demo.head.contains("content-type: text/html; charset=utf-8"));
        assert!(demo.text.contains("/v1/micromsg.js"));
        let head = h.call("HEAD", "/v1/micromsg.js", &[], "").await;
        assert_eq!((head.status, head.text.as_str()), (200, ""));
    }

    #[test]
    fn websockets_from_origins_cors_does_not_allow_are_not_admitted() {
        let cors = Cors::new(&["https://app.example".to_owned()]).unwrap();
        assert!(cors.admits(None));
        assert!(cors.admits(Some(&HeaderValue::from_static("https://app.example"))));
        assert!(!cors.admits(Some(&HeaderValue::from_static("https://evil.example"))));
        let any = Cors::new(&["*".to_owned()]).unwrap();
        assert!(any.admits(Some(&HeaderValue::from_static("https://evil.example"))));
    }
}
