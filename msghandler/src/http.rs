//! HTTP routes: the four x0 paths, CORS, body limits and the mapping of core replies
//! and errors onto the answers the x0 client can survive (always 200 and a JSON
//! object on its paths; see ARCHITECTURE.md).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use ipc::Response as CoreResponse;
use tokio::sync::watch;
use tracing::debug;

use crate::core_link::{CoreError, CorePool};
use crate::x0::{self, Endpoint, Operation, X0Error};

pub struct App {
    pub core: Arc<CorePool>,
    pub poll_timeout: Duration,
    pub max_body_bytes: u64,
    pub cors: Cors,
    /// Turns true on SIGTERM: parked polls answer at once.
    pub shutdown: watch::Receiver<bool>,
}

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

type Reply = Response<Full<Bytes>>;

pub async fn handle(app: Arc<App>, request: Request<Incoming>) -> Result<Reply, Infallible> {
    let endpoint = match request.uri().path() {
        "/python/MsgHandler.py" => Endpoint::Any,
        "/get" => Endpoint::Get,
        "/set" => Endpoint::Set,
        "/del" => Endpoint::Del,
        _ => {
            let error = X0Error::new(
                "NotFound",
                format!("no such path: {}", request.uri().path()),
            );
            return Ok(json(StatusCode::NOT_FOUND, error.to_json()));
        }
    };
    // Only this header is needed after the request is consumed (cloning a
    // HeaderValue shares its bytes).
    let origin = request.headers().get(header::ORIGIN).cloned();
    let mut reply = if request.method() == Method::OPTIONS {
        preflight(request.headers())
    } else {
        match x0_request(&app, endpoint, request).await {
            Ok(body) => json(StatusCode::OK, body),
            Err(Refusal::TooLarge(error)) => {
                let mut reply = json(StatusCode::PAYLOAD_TOO_LARGE, error.to_json());
                // The rest of the body was never read; the connection cannot be reused.
                reply
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                reply
            }
            Err(Refusal::Error(error)) => {
                debug!(kind = error.kind, message = %error.message, "x0 request refused");
                json(StatusCode::OK, error.to_json())
            }
        }
    };
    app.cors.allow(origin.as_ref(), reply.headers_mut());
    Ok(reply)
}

enum Refusal {
    /// Over the body limit: the one x0 answer that is not a 200.
    TooLarge(X0Error),
    Error(X0Error),
}

impl From<X0Error> for Refusal {
    fn from(error: X0Error) -> Self {
        Refusal::Error(error)
    }
}

async fn x0_request(
    app: &App,
    endpoint: Endpoint,
    request: Request<Incoming>,
) -> Result<String, Refusal> {
    let operation = match *request.method() {
        Method::GET if endpoint == Endpoint::Get => query_get(request.uri().query())?,
        Method::POST => {
            check_content_type(request.headers())?;
            let body = read_body(request, app.max_body_bytes).await?;
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
    Ok(execute(app, operation).await?)
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

async fn read_body(request: Request<Incoming>, limit: u64) -> Result<Bytes, Refusal> {
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
    match Limited::new(request.into_body(), limit as usize)
        .collect()
        .await
    {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(too_large()),
        Err(e) => Err(X0Error::new(
            "BadRequest",
            format!("reading the request body failed: {e}"),
        )
        .into()),
    }
}

async fn execute(app: &App, operation: Operation) -> Result<String, X0Error> {
    match operation {
        Operation::Set {
            src,
            dst,
            body,
            key,
        } => match app.core.publish(src, dst, body, key).await {
            Ok(CoreResponse::Published {
                id,
                dropped,
                duplicate,
            }) => Ok(x0::set_reply(id, dropped, duplicate)),
            other => Err(unexpected(other)),
        },
        Operation::Del { session, which } => {
            match app.core.request(ipc::Request::Ack { session, which }).await {
                Ok(CoreResponse::Acked { .. }) => Ok(x0::OK.to_owned()),
                other => Err(unexpected(other)),
            }
        }
        Operation::Get {
            session,
            ack_previous,
        } => {
            let mut shutdown = app.shutdown.clone();
            if *shutdown.borrow_and_update() {
                return Ok(x0::NO_MESSAGES.to_owned());
            }
            tokio::select! {
                polled = app.core.poll(&session, app.poll_timeout, ack_previous) => match polled {
                    Ok(messages) => Ok(x0::messages_reply(&messages)),
                    Err(e) => Err(core_error(e)),
                },
                // Dropping the poll withdraws it at the core, so nothing is lost.
                _ = shutdown.changed() => Ok(x0::NO_MESSAGES.to_owned()),
            }
        }
    }
}

fn unexpected(reply: Result<CoreResponse, CoreError>) -> X0Error {
    match reply {
        Ok(CoreResponse::Error(e)) => X0Error::new(e.kind.name(), e.message),
        Ok(other) => X0Error::new(
            "InternalError",
            format!("unexpected reply from the core: {other:?}"),
        ),
        Err(e) => core_error(e),
    }
}

fn core_error(e: CoreError) -> X0Error {
    let hint = match e {
        CoreError::Unavailable => "; try again shortly",
        CoreError::ConnectionLost => "; the request may or may not have been carried out",
    };
    X0Error::new("CoreUnavailable", format!("{e}{hint}"))
}

fn preflight(request: &HeaderMap) -> Reply {
    let mut reply = Response::new(Full::new(Bytes::new()));
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
    let mut reply = Response::new(Full::new(Bytes::from(body)));
    *reply.status_mut() = status;
    let headers = reply.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    reply
}
