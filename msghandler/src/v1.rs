//! The versioned HTTP API of docs/API.md (`/v1/...`): which paths exist, what their
//! bodies and queries ask of the core, and how the core's answers and refusals are
//! shown. Pure functions over bytes, no I/O, like [`crate::x0`]; errors use the x0
//! error body, with the status [`status`] gives their `exception_id`.

use std::str::FromStr;
use std::time::Duration;

use hyper::StatusCode;
use ipc::{AckSelector, Message, MessageId, Response, Subscription, Target};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

use crate::x0::{self, X0Error, checked_session, describe_parse_error};

/// Every `/v1` path. The backend's take the backend key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Publish,
    PublishBatch,
    Poll,
    Ack,
    Subscribe,
    Unsubscribe,
    Replies,
    Pause,
    Resume,
    Release,
    Presence,
    BackendPublish,
    BackendPublishBatch,
    BackendBind,
    BackendKick,
}

impl Route {
    /// Every route, for what must cover them all (the fuzz target, tests).
    pub const ALL: [Route; 15] = [
        Route::Publish,
        Route::PublishBatch,
        Route::Poll,
        Route::Ack,
        Route::Subscribe,
        Route::Unsubscribe,
        Route::Replies,
        Route::Pause,
        Route::Resume,
        Route::Release,
        Route::Presence,
        Route::BackendPublish,
        Route::BackendPublishBatch,
        Route::BackendBind,
        Route::BackendKick,
    ];

    pub fn of(path: &str) -> Option<Route> {
        Some(match path.strip_prefix("/v1/")? {
            "publish" => Route::Publish,
            "publish_batch" => Route::PublishBatch,
            "poll" => Route::Poll,
            "ack" => Route::Ack,
            "subscribe" => Route::Subscribe,
            "unsubscribe" => Route::Unsubscribe,
            "replies" => Route::Replies,
            "pause" => Route::Pause,
            "release" => Route::Release,
            "resume" => Route::Resume,
            "presence" => Route::Presence,
            "backend/publish" => Route::BackendPublish,
            "backend/publish_batch" => Route::BackendPublishBatch,
            "backend/bind" => Route::BackendBind,
            "backend/kick" => Route::BackendKick,
            _ => return None,
        })
    }

    pub fn is_backend(self) -> bool {
        matches!(
            self,
            Route::BackendPublish
                | Route::BackendPublishBatch
                | Route::BackendBind
                | Route::BackendKick
        )
    }

    /// Whether `GET` with a query string works as well as `POST` with a body: the
    /// reads a browser may want to make without a preflight.
    pub fn takes_get(self) -> bool {
        matches!(self, Route::Poll | Route::Presence)
    }

    /// The `Allow` header of a 405.
    pub fn allowed_methods(self) -> &'static str {
        if self.takes_get() {
            "GET, POST, OPTIONS"
        } else {
            "POST, OPTIONS"
        }
    }
}

/// What a `/v1` request asks for, once understood.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Operation {
    /// A message to route; retried under its key like an x0 SET.
    Send(ipc::Send),
    /// Messages from one sender (every `src` the same), routed in order, each
    /// answered as if sent alone.
    Batch(Vec<ipc::Send>),
    Poll(Poll),
    /// Any other request: sent once, its answer shown as [`Answer`] says.
    Request(ipc::Request, Answer),
}

impl Operation {
    /// The session the request acts for, when it names one: the key of per-session
    /// limits, and what a token must be for.
    pub fn caller(&self) -> Option<&str> {
        use ipc::Request as R;
        match self {
            Operation::Send(send) => send.src.as_deref(),
            Operation::Batch(sends) => sends.first().and_then(|send| send.src.as_deref()),
            Operation::Poll(poll) => Some(&poll.session),
            Operation::Request(request, _) => match request {
                R::Ack { session, .. }
                | R::Subscribe { session, .. }
                | R::Unsubscribe { session, .. }
                | R::AwaitReply { session, .. }
                | R::SetPaused { session, .. }
                | R::Release { session }
                | R::Bind { session, .. }
                | R::Kick { session, .. } => Some(session),
                _ => None,
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Poll {
    pub session: String,
    /// `None` takes msghandler's `poll_timeout`.
    pub timeout: Option<Duration>,
    /// 0 gives everything ready.
    pub max: u32,
    pub ack_previous: bool,
}

/// Which core answer a request expects, and what the client is shown for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    Sent,
    Acked,
    Subscribed,
    Unsubscribed,
    Released,
    Done,
    Bound,
    /// The channel is repeated in the reply, as the client asked for it.
    Presence {
        channel: String,
    },
}

/// Longest duration accepted in seconds (about 136 years): far beyond any cap the
/// core applies, and small enough that milliseconds and deadlines cannot overflow.
const MAX_SECONDS: f64 = u32::MAX as f64;

/// Understands the JSON body of a `POST` to `route`.
pub fn parse(route: Route, json: &[u8]) -> Result<Operation, X0Error> {
    parse_for(route, json, None)
}

/// As [`parse`], for a caller whose session is known before its JSON is read (a
/// WebSocket's, from its URL): `session` stands in for whatever the JSON names, on
/// the client routes, which are the ones that name the caller. So an HTTP body and a
/// WebSocket frame go through one parser per operation and are refused alike.
pub fn parse_for(route: Route, json: &[u8], session: Option<&str>) -> Result<Operation, X0Error> {
    match route {
        Route::Publish => publish(own(body(json)?, session), Sender::Client),
        Route::BackendPublish => publish(body(json)?, Sender::Backend),
        Route::PublishBatch => batch(own(body(json)?, session), Sender::Client),
        Route::BackendPublishBatch => batch(body(json)?, Sender::Backend),
        Route::Poll => poll(own(body(json)?, session)),
        Route::Ack => ack(own(body(json)?, session)),
        Route::Subscribe => subscribe(own(body(json)?, session)),
        Route::Unsubscribe => unsubscribe(own(body(json)?, session)),
        Route::Replies => replies(own(body(json)?, session)),
        Route::Pause => set_paused(own(body(json)?, session), true),
        Route::Resume => set_paused(own(body(json)?, session), false),
        Route::Release => release(own(body(json)?, session)),
        Route::Presence => presence(body::<PresenceBody>(json)?.channel),
        Route::BackendBind => bind(body(json)?),
        Route::BackendKick => kick(body(json)?),
    }
}

/// A body whose `session` is the caller's own.
trait CallerSession {
    fn session(&mut self) -> &mut Option<String>;
}

macro_rules! caller_session {
    ($($body:ty),*) => {$(
        impl CallerSession for $body {
            fn session(&mut self) -> &mut Option<String> {
                &mut self.session
            }
        }
    )*};
}

caller_session!(
    PublishBody<'_>,
    BatchBody<'_>,
    PollBody,
    AckBody,
    SubscriptionBody,
    RepliesBody,
    SessionBody
);

fn own<T: CallerSession>(mut body: T, session: Option<&str>) -> T {
    if let Some(session) = session {
        *body.session() = Some(session.to_owned());
    }
    body
}

/// Understands the query string of a `GET` (only where [`Route::takes_get`]).
pub fn parse_query(route: Route, query: Option<&str>) -> Result<Operation, X0Error> {
    let query = query.unwrap_or("");
    match route {
        Route::Poll => poll(PollBody {
            session: query_value(query, "session"),
            timeout: query_parsed(query, "timeout")?,
            max: query_parsed(query, "max")?,
            auto_ack: query_parsed(query, "auto_ack")?,
        }),
        Route::Presence => presence(query_value(query, "channel")),
        other => Err(X0Error::new(
            "MethodNotAllowed",
            format!("GET is not supported here; use {}", other.allowed_methods()),
        )),
    }
}

fn body<'a, T: Deserialize<'a>>(json: &'a [u8]) -> Result<T, X0Error> {
    x0::require_object(json)?;
    // The plain parser for the common case; the path-tracking one only to word an error.
    serde_json::from_slice(json).map_err(|_| describe_parse_error::<T>(json))
}

/// The first value of `key`; like x0's `GET /get`, later repeats are ignored.
pub fn query_value(query: &str, key: &str) -> Option<String> {
    form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

pub fn query_parsed<T: FromStr>(query: &str, key: &str) -> Result<Option<T>, X0Error> {
    query_value(query, key)
        .map(|value| {
            value.parse().map_err(|_| {
                X0Error::new(
                    "InvalidField",
                    format!("{key}={value:?} in the query string is not valid"),
                )
            })
        })
        .transpose()
}

/// Who is publishing: a browser, which may reach only sessions and channels, or the
/// application's backend, which may reach anyone and need not name a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sender {
    Client,
    Backend,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PublishBody<'a> {
    session: Option<String>,
    target: Option<TargetBody>,
    subject: Option<String>,
    reference: Option<MessageId>,
    ttl: Option<f64>,
    msg_id: Option<String>,
    expect_reply: Option<f64>,
    #[serde(borrow, deserialize_with = "present_raw")]
    data: Option<&'a RawValue>,
}

/// `data` as its raw text whatever it is, `null` included: a plain `Option` would
/// read `"data":null` as a missing `data`.
fn present_raw<'de, D: Deserializer<'de>>(de: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(de).map(Some)
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct TargetBody {
    session: Option<String>,
    user: Option<String>,
    channel: Option<String>,
    broadcast: Option<bool>,
}

fn publish(body: PublishBody, sender: Sender) -> Result<Operation, X0Error> {
    let src = match sender {
        Sender::Client => Some(checked_session("session", body.session)?),
        Sender::Backend => optional_id("session", body.session)?,
    };
    let target = body.target.map(|t| target(t, sender)).transpose()?;
    if target.is_none() && body.reference.is_none() {
        return Err(X0Error::new(
            "MissingField",
            "reference is missing: a message without target is a reply to the message it references",
        ));
    }
    if body.expect_reply.is_some() && src.is_none() {
        return Err(X0Error::new(
            "MissingField",
            "session is missing: expect_reply sends the replies to it",
        ));
    }
    let data = body
        .data
        .ok_or_else(|| X0Error::new("MissingField", "data is missing"))?;
    Ok(Operation::Send(ipc::Send {
        src,
        target,
        subject: optional_id("subject", body.subject)?,
        reference: body.reference,
        data: data.get().to_owned(),
        ttl_ms: body.ttl.map(|s| millis("ttl", s)).transpose()?,
        key: optional_id("msg_id", body.msg_id)?,
        expect_reply_ms: body
            .expect_reply
            .map(|s| millis("expect_reply", s))
            .transpose()?,
    }))
}

/// Most messages one batch may carry.
pub const MAX_BATCH: usize = 1000;

/// A batch: one sender, its messages shaped as `/v1/publish` bodies.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct BatchBody<'a> {
    session: Option<String>,
    #[serde(borrow)]
    messages: Option<Vec<PublishBody<'a>>>,
}

/// A batch is refused whole, nothing sent, when any of its messages would be
/// refused alone: the error names the first such message by its index.
fn batch(body: BatchBody, sender: Sender) -> Result<Operation, X0Error> {
    let messages = body
        .messages
        .ok_or_else(|| X0Error::new("MissingField", "messages is missing"))?;
    if messages.is_empty() || messages.len() > MAX_BATCH {
        return Err(X0Error::new(
            "InvalidField",
            format!(
                "messages must hold 1 to {MAX_BATCH} messages, not {}",
                messages.len()
            ),
        ));
    }
    if sender == Sender::Client {
        checked_session("session", body.session.clone())?;
    }
    let mut sends = Vec::with_capacity(messages.len());
    for (index, mut message) in messages.into_iter().enumerate() {
        if message.session.is_some() {
            return Err(X0Error::new(
                "InvalidField",
                format!("messages[{index}].session: a batch names its sender once, at the top"),
            ));
        }
        message.session.clone_from(&body.session);
        match publish(message, sender) {
            Ok(Operation::Send(send)) => sends.push(send),
            Ok(_) => unreachable!("publish gives a Send"),
            Err(e) => {
                return Err(X0Error::new(
                    e.kind,
                    format!("messages[{index}]: {}", e.message),
                ));
            }
        }
    }
    Ok(Operation::Batch(sends))
}

/// The reply to a batch: one entry per message, in order, each what `/v1/publish`
/// would have answered for it alone (a refusal with its `status` added).
pub fn batch_reply(answers: impl Iterator<Item = Result<String, X0Error>>) -> String {
    let mut out = String::from(r#"{"results":["#);
    for (i, answer) in answers.enumerate() {
        if i > 0 {
            out.push(',');
        }
        match answer {
            Ok(sent) => out.push_str(&sent),
            Err(e) => {
                // The error body, one key longer: its closing brace comes after it.
                let body = e.to_json();
                out.push_str(&body[..body.len() - 1]);
                out.push_str(&format!(r#","status":{}}}"#, status(e.kind).as_u16()));
            }
        }
    }
    out.push_str("]}");
    out
}

fn target(body: TargetBody, sender: Sender) -> Result<Target, X0Error> {
    let target = match (body.session, body.user, body.channel, body.broadcast) {
        (Some(session), None, None, None) => {
            Target::Session(checked_session("target.session", Some(session))?)
        }
        (None, Some(user), None, None) => Target::User(checked_session("target.user", Some(user))?),
        (None, None, Some(channel), None) => {
            let channel = checked_session("target.channel", Some(channel))?;
            if channel.starts_with('$') {
                return Err(X0Error::new(
                    "Forbidden",
                    format!("channel {channel:?}: names starting with $ are reserved for the core"),
                ));
            }
            Target::Channel(channel)
        }
        (None, None, None, Some(true)) => Target::Broadcast,
        (None, None, None, Some(false)) => {
            return Err(X0Error::new(
                "InvalidField",
                "target.broadcast must be true",
            ));
        }
        _ => {
            return Err(X0Error::new(
                "InvalidField",
                "target must have exactly one of session, user, channel or broadcast",
            ));
        }
    };
    let reserved = match target {
        Target::User(_) => Some("users"),
        Target::Broadcast => Some("every session"),
        _ => None,
    };
    match reserved {
        Some(whom) if sender == Sender::Client => Err(X0Error::new(
            "Forbidden",
            format!("only the backend may send to {whom} (POST /v1/backend/publish)"),
        )),
        _ => Ok(target),
    }
}

fn optional_id(field: &str, value: Option<String>) -> Result<Option<String>, X0Error> {
    value.map(|v| checked_session(field, Some(v))).transpose()
}

/// Seconds (fractions allowed) as whole milliseconds, to the nearest one.
fn millis(field: &str, seconds: f64) -> Result<u64, X0Error> {
    // NaN is possible from a query string ("timeout=NaN").
    if seconds.is_nan() || seconds < 0.0 {
        return Err(X0Error::new(
            "InvalidField",
            format!("{field} must be a number of seconds, 0 or more"),
        ));
    }
    Ok((seconds.min(MAX_SECONDS) * 1000.0).round() as u64)
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PollBody {
    session: Option<String>,
    timeout: Option<f64>,
    max: Option<u32>,
    auto_ack: Option<bool>,
}

fn poll(body: PollBody) -> Result<Operation, X0Error> {
    Ok(Operation::Poll(Poll {
        session: checked_session("session", body.session)?,
        timeout: body
            .timeout
            .map(|s| millis("timeout", s).map(Duration::from_millis))
            .transpose()?,
        max: body.max.unwrap_or(0),
        ack_previous: body.auto_ack.unwrap_or(true),
    }))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct AckBody {
    session: Option<String>,
    ids: Option<Vec<MessageId>>,
    cursor: Option<MessageId>,
}

fn ack(body: AckBody) -> Result<Operation, X0Error> {
    let session = checked_session("session", body.session)?;
    let which = match (body.ids, body.cursor) {
        (Some(_), Some(_)) => {
            return Err(X0Error::new("InvalidField", "give ids or cursor, not both"));
        }
        (Some(ids), None) => AckSelector::Ids(ids),
        (None, Some(cursor)) => AckSelector::UpTo(cursor),
        (None, None) => AckSelector::All,
    };
    Ok(Operation::Request(
        ipc::Request::Ack { session, which },
        Answer::Acked,
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct SubscriptionBody {
    session: Option<String>,
    channel: Option<String>,
    subject: Option<String>,
    group: Option<String>,
    since: Option<MessageId>,
}

/// The session and its subscription. Channel patterns are the core's to judge (a
/// bad one is its `InvalidRequest`); `$` channels may be subscribed to, which is
/// how `$sys` is read.
fn subscription(body: SubscriptionBody) -> Result<(String, Subscription), X0Error> {
    Ok((
        checked_session("session", body.session)?,
        Subscription {
            channel: checked_session("channel", body.channel)?,
            subject: optional_id("subject", body.subject)?,
            group: optional_id("group", body.group)?,
        },
    ))
}

fn subscribe(body: SubscriptionBody) -> Result<Operation, X0Error> {
    let since = body.since;
    let (session, subscription) = subscription(body)?;
    Ok(Operation::Request(
        ipc::Request::Subscribe {
            session,
            subscription,
            since,
        },
        Answer::Subscribed,
    ))
}

fn unsubscribe(body: SubscriptionBody) -> Result<Operation, X0Error> {
    let (session, subscription) = subscription(body)?;
    Ok(Operation::Request(
        ipc::Request::Unsubscribe {
            session,
            subscription,
        },
        Answer::Unsubscribed,
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RepliesBody {
    session: Option<String>,
    reference: Option<MessageId>,
    ttl: Option<f64>,
}

fn replies(body: RepliesBody) -> Result<Operation, X0Error> {
    let session = checked_session("session", body.session)?;
    let reference = body
        .reference
        .ok_or_else(|| X0Error::new("MissingField", "reference is missing"))?;
    let ttl = body.ttl.ok_or_else(|| {
        X0Error::new(
            "MissingField",
            "ttl is missing: how many seconds replies go to this session",
        )
    })?;
    Ok(Operation::Request(
        ipc::Request::AwaitReply {
            session,
            reference,
            ttl_ms: millis("ttl", ttl)?,
        },
        Answer::Done,
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct SessionBody {
    session: Option<String>,
}

fn set_paused(body: SessionBody, paused: bool) -> Result<Operation, X0Error> {
    Ok(Operation::Request(
        ipc::Request::SetPaused {
            session: checked_session("session", body.session)?,
            paused,
        },
        Answer::Done,
    ))
}

fn release(body: SessionBody) -> Result<Operation, X0Error> {
    Ok(Operation::Request(
        ipc::Request::Release {
            session: checked_session("session", body.session)?,
        },
        Answer::Released,
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct PresenceBody {
    channel: Option<String>,
}

fn presence(channel: Option<String>) -> Result<Operation, X0Error> {
    let channel = checked_session("channel", channel)?;
    Ok(Operation::Request(
        ipc::Request::Presence {
            channel: channel.clone(),
        },
        Answer::Presence { channel },
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct BindBody {
    session: Option<String>,
    user: Option<String>,
    exclusive: Option<bool>,
}

fn bind(body: BindBody) -> Result<Operation, X0Error> {
    Ok(Operation::Request(
        ipc::Request::Bind {
            session: checked_session("session", body.session)?,
            user: checked_session("user", body.user)?,
            exclusive: body.exclusive.unwrap_or(false),
        },
        Answer::Bound,
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct KickBody {
    session: Option<String>,
    reason: Option<String>,
}

fn kick(body: KickBody) -> Result<Operation, X0Error> {
    Ok(Operation::Request(
        ipc::Request::Kick {
            session: checked_session("session", body.session)?,
            reason: body.reason.unwrap_or_default(),
        },
        Answer::Done,
    ))
}

pub const OK: &str = r#"{"status":"ok"}"#;
pub const NO_MESSAGES: &str = r#"{"messages":[],"ids":[]}"#;

impl Answer {
    /// The reply body for the core's answer, or the refusal to show instead.
    pub fn render(self, response: Response) -> Result<String, X0Error> {
        match (self, response) {
            (_, Response::Error(e)) => Err(e.into()),
            (
                Answer::Sent,
                Response::Sent {
                    id,
                    recipients,
                    dropped,
                    duplicate,
                },
            ) => Ok(sent_reply(id, recipients, dropped, duplicate)),
            (Answer::Acked, Response::Acked { count }) => Ok(format!(r#"{{"acked":{count}}}"#)),
            (
                Answer::Subscribed,
                Response::Subscribed {
                    recovered,
                    complete,
                },
            ) => Ok(format!(
                r#"{{"subscribed":true,"recovered":{recovered},"complete":{complete}}}"#
            )),
            (Answer::Unsubscribed, Response::Count(n)) => Ok(format!(r#"{{"unsubscribed":{n}}}"#)),
            (Answer::Released, Response::Count(n)) => Ok(format!(r#"{{"released":{n}}}"#)),
            (Answer::Bound, Response::Count(kicked)) => {
                Ok(format!(r#"{{"status":"ok","kicked":{kicked}}}"#))
            }
            (Answer::Done, Response::Done) => Ok(OK.to_owned()),
            (Answer::Presence { channel }, Response::Presence(present)) => {
                Ok(presence_reply(&channel, present))
            }
            (_, other) => Err(X0Error::new(
                "InternalError",
                format!("unexpected reply from the core: {other:?}"),
            )),
        }
    }
}

fn sent_reply(id: MessageId, recipients: u32, dropped: u32, duplicate: bool) -> String {
    let mut out = format!(r#"{{"id":{id},"recipients":{recipients}"#);
    x0::close_publish_reply(&mut out, dropped, duplicate);
    out
}

fn presence_reply(channel: &str, mut present: Vec<ipc::Present>) -> String {
    // The HTTP shape is spelt out here rather than taken from the ipc type's serde
    // names, which are free to change with the wire.
    #[derive(Serialize)]
    struct Member<'a> {
        session: &'a str,
        user: Option<&'a str>,
    }
    #[derive(Serialize)]
    struct Reply<'a> {
        channel: &'a str,
        sessions: Vec<Member<'a>>,
    }
    present.sort_unstable_by(|a, b| a.session.cmp(&b.session));
    let sessions = present
        .iter()
        .map(|p| Member {
            session: &p.session,
            user: p.user.as_deref(),
        })
        .collect();
    serde_json::to_string(&Reply { channel, sessions }).expect("strings serialize")
}

/// `{"messages":[...],"ids":[...],"cursor":N}`, bodies inserted as they are (each is
/// one envelope, or an x0 payload sent through `/set`). The cursor is the highest
/// id, which need not be the last: higher channel priorities come first.
pub fn messages_reply(messages: &[Message]) -> String {
    let Some(cursor) = messages.iter().map(|m| m.id).max() else {
        return NO_MESSAGES.to_owned();
    };
    let mut out = x0::open_batch(messages);
    out.push_str(r#","cursor":"#);
    out.push_str(itoa::Buffer::new().format(cursor));
    out.push('}');
    out
}

/// The HTTP status of a refusal, from its `exception_id` (docs/API.md, "Errors"), so
/// that a name and its status cannot disagree.
pub fn status(kind: &str) -> StatusCode {
    match kind {
        "InvalidJson" | "MissingField" | "InvalidField" | "InvalidRequest" | "BadRequest" => {
            StatusCode::BAD_REQUEST
        }
        "Unauthorized" | "InvalidToken" | "TokenExpired" => StatusCode::UNAUTHORIZED,
        "Forbidden" | "Kicked" => StatusCode::FORBIDDEN,
        "NotFound" | "NoRoute" => StatusCode::NOT_FOUND,
        "MethodNotAllowed" => StatusCode::METHOD_NOT_ALLOWED,
        "RequestTimeout" => StatusCode::REQUEST_TIMEOUT,
        "BodyTooLarge" | "PayloadTooLarge" | "BatchTooLarge" => StatusCode::PAYLOAD_TOO_LARGE,
        "UnsupportedContentType" => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "MailboxFull" | "RateLimited" => StatusCode::TOO_MANY_REQUESTS,
        "CoreUnavailable" | "ShuttingDown" | "TooManyConnections" | "Overloaded" | "Draining"
        | "StoreUnavailable" => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipc::{ErrorKind, Present};

    fn send(route: Route, json: &str) -> ipc::Send {
        match parse(route, json.as_bytes()).unwrap() {
            Operation::Send(send) => send,
            other => panic!("{other:?}"),
        }
    }

    fn refusal(route: Route, json: &str) -> (&'static str, StatusCode) {
        let error = parse(route, json.as_bytes()).unwrap_err();
        (error.kind, status(error.kind))
    }

    fn request(route: Route, json: &str) -> (ipc::Request, Answer) {
        match parse(route, json.as_bytes()).unwrap() {
            Operation::Request(request, answer) => (request, answer),
            other => panic!("{other:?}"),
        }
    }

    fn poll_of(operation: Operation) -> Poll {
        match operation {
            Operation::Poll(poll) => poll,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn every_documented_path_is_routed_and_nothing_else() {
        assert_eq!(Route::of("/v1/publish"), Some(Route::Publish));
        assert_eq!(Route::of("/v1/backend/kick"), Some(Route::BackendKick));
        assert_eq!(Route::of("/v1/presence"), Some(Route::Presence));
        for path in [
            "/v1/",
            "/v1/publish/",
            "/v1/backend",
            "/v2/publish",
            "/publish",
        ] {
            assert_eq!(Route::of(path), None, "{path}");
        }
        assert!(Route::BackendBind.is_backend() && !Route::Publish.is_backend());
        assert!(Route::Poll.takes_get() && !Route::Ack.takes_get());
    }

    #[test]
    fn a_client_publishes_to_a_session_or_a_channel() {
        let s = send(
            Route::Publish,
            r#"{"session":"A","target":{"session":"B"},"data":1,"extra":"ignored"}"#,
        );
        assert_eq!(s.src.as_deref(), Some("A"));
        assert_eq!(s.target, Some(Target::Session("B".into())));
        let s = send(
            Route::Publish,
            r#"{"session":"A","target":{"channel":"orders.eu"},"subject":"created","data":{},"msg_id":"A-17"}"#,
        );
        assert_eq!(s.target, Some(Target::Channel("orders.eu".into())));
        assert_eq!(s.subject.as_deref(), Some("created"));
        assert_eq!(s.key.as_deref(), Some("A-17"));
    }

    #[test]
    fn users_broadcast_and_dollar_channels_are_forbidden_to_clients() {
        for target in [
            r#"{"user":"u1"}"#,
            r#"{"broadcast":true}"#,
            r#"{"channel":"$sys"}"#,
        ] {
            let json = format!(r#"{{"session":"A","target":{target},"data":1}}"#);
            assert_eq!(
                refusal(Route::Publish, &json),
                ("Forbidden", StatusCode::FORBIDDEN),
                "{target}"
            );
        }
    }

    #[test]
    fn the_backend_may_target_anyone_but_dollar_channels_without_a_session() {
        let s = send(
            Route::BackendPublish,
            r#"{"target":{"user":"u1"},"data":1}"#,
        );
        assert_eq!((s.src, s.target), (None, Some(Target::User("u1".into()))));
        let s = send(
            Route::BackendPublish,
            r#"{"session":"S","target":{"broadcast":true},"data":1}"#,
        );
        assert_eq!(
            (s.src.as_deref(), s.target),
            (Some("S"), Some(Target::Broadcast))
        );
        assert_eq!(
            refusal(
                Route::BackendPublish,
                r#"{"target":{"channel":"$sys"},"data":1}"#
            ),
            ("Forbidden", StatusCode::FORBIDDEN)
        );
        // Replies go back to a session: the backend has none unless it names one.
        assert_eq!(
            refusal(
                Route::BackendPublish,
                r#"{"target":{"user":"u"},"data":1,"expect_reply":5}"#
            )
            .0,
            "MissingField"
        );
    }

    #[test]
    fn a_target_names_exactly_one_kind_of_recipient() {
        for target in [
            "{}",
            r#"{"session":"B","channel":"c"}"#,
            r#"{"broadcast":false}"#,
            r#""B""#,
        ] {
            let json = format!(r#"{{"session":"A","target":{target},"data":1}}"#);
            assert_eq!(
                refusal(Route::BackendPublish, &json).0,
                "InvalidField",
                "{target}"
            );
        }
    }

    #[test]
    fn a_message_without_target_is_a_reply_and_needs_a_reference() {
        let s = send(
            Route::Publish,
            r#"{"session":"A","reference":17,"data":"ok"}"#,
        );
        assert_eq!((s.target, s.reference), (None, Some(17)));
        assert_eq!(
            refusal(Route::Publish, r#"{"session":"A","data":"ok"}"#),
            ("MissingField", StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            refusal(
                Route::Publish,
                r#"{"session":"A","target":null,"data":"ok"}"#
            )
            .0,
            "MissingField"
        );
    }

    #[test]
    fn data_passes_through_as_raw_text_and_is_required() {
        let data = r#"{"big":12345678901234567890,"f":1.50,"s":"\u00fc","k" : [1, 2]}"#;
        let json = format!(r#"{{"session":"A","target":{{"session":"B"}},"data":  {data}  }}"#);
        assert_eq!(send(Route::Publish, &json).data, data);
        let s = send(
            Route::Publish,
            r#"{"session":"A","target":{"session":"B"},"data":null}"#,
        );
        assert_eq!(s.data, "null");
        assert_eq!(
            refusal(
                Route::Publish,
                r#"{"session":"A","target":{"session":"B"}}"#
            )
            .0,
            "MissingField"
        );
    }

    #[test]
    fn seconds_become_milliseconds() {
        let s = send(
            Route::Publish,
            r#"{"session":"A","target":{"session":"B"},"data":1,"ttl":30,"expect_reply":0.25}"#,
        );
        assert_eq!((s.ttl_ms, s.expect_reply_ms), (Some(30_000), Some(250)));
        let s = send(
            Route::Publish,
            r#"{"session":"A","target":{"session":"B"},"data":1}"#,
        );
        assert_eq!((s.ttl_ms, s.expect_reply_ms, s.key), (None, None, None));
        assert_eq!(
            refusal(
                Route::Publish,
                r#"{"session":"A","target":{"session":"B"},"data":1,"ttl":-1}"#
            )
            .0,
            "InvalidField"
        );
        assert_eq!(
            refusal(
                Route::Publish,
                r#"{"session":"A","target":{"session":"B"},"data":1,"ttl":"30"}"#
            )
            .0,
            "InvalidField"
        );
    }

    #[test]
    fn ids_are_one_to_256_bytes() {
        let long = "x".repeat(257);
        let exact = "x".repeat(256);
        assert_eq!(
            refusal(Route::Publish, r#"{"target":{"session":"B"},"data":1}"#).0,
            "MissingField"
        );
        for json in [
            r#"{"session":"","target":{"session":"B"},"data":1}"#.to_owned(),
            format!(r#"{{"session":"{long}","target":{{"session":"B"}},"data":1}}"#),
            format!(r#"{{"session":"A","target":{{"channel":"{long}"}},"data":1}}"#),
            format!(r#"{{"session":"A","target":{{"session":"B"}},"data":1,"msg_id":"{long}"}}"#),
            r#"{"session":"A","target":{"session":"B"},"data":1,"subject":""}"#.to_owned(),
            r#"{"session":7,"target":{"session":"B"},"data":1}"#.to_owned(),
        ] {
            assert_eq!(refusal(Route::Publish, &json).0, "InvalidField", "{json}");
        }
        let json = format!(r#"{{"session":"{exact}","target":{{"user":"{exact}"}},"data":1}}"#);
        assert_eq!(send(Route::BackendPublish, &json).src, Some(exact));
        assert_eq!(
            refusal(Route::BackendBind, r#"{"session":"S","user":""}"#).0,
            "InvalidField"
        );
    }

    #[test]
    fn bodies_that_are_not_json_objects_are_refused() {
        assert_eq!(
            refusal(Route::Poll, "{not json"),
            ("InvalidJson", StatusCode::BAD_REQUEST)
        );
        assert_eq!(refusal(Route::Pause, "").0, "InvalidJson");
        assert_eq!(refusal(Route::Pause, "[1]").0, "InvalidField");
    }

    #[test]
    fn a_json_array_is_not_a_request_even_when_its_elements_fit_the_fields() {
        assert_eq!(
            refusal(Route::Pause, r#"["a"]"#),
            ("InvalidField", StatusCode::BAD_REQUEST)
        );
        assert_eq!(refusal(Route::Poll, r#"["a",1,10,true]"#).0, "InvalidField");
    }

    #[test]
    fn poll_takes_its_parameters_from_a_body_or_a_query() {
        let p = poll_of(parse(Route::Poll, br#"{"session":"B"}"#).unwrap());
        assert_eq!(
            p,
            Poll {
                session: "B".into(),
                timeout: None,
                max: 0,
                ack_previous: true,
            }
        );
        let p = poll_of(
            parse(
                Route::Poll,
                br#"{"session":"B","timeout":2.5,"max":100,"auto_ack":false}"#,
            )
            .unwrap(),
        );
        assert_eq!(p.timeout, Some(Duration::from_millis(2500)));
        assert_eq!((p.max, p.ack_previous), (100, false));
        let q = poll_of(
            parse_query(
                Route::Poll,
                Some("session=B&timeout=2.5&max=100&auto_ack=false&a__=123"),
            )
            .unwrap(),
        );
        assert_eq!(q, p);
        let q = poll_of(parse_query(Route::Poll, Some("session=a%20b&timeout=0")).unwrap());
        assert_eq!(
            (q.session.as_str(), q.timeout),
            ("a b", Some(Duration::ZERO))
        );
    }

    #[test]
    fn bad_poll_parameters_are_refused() {
        for query in [
            "timeout=1",
            "session=",
            "session=B&timeout=-1",
            "session=B&timeout=NaN",
            "session=B&timeout=soon",
            "session=B&max=-1",
            "session=B&auto_ack=yes",
        ] {
            let error = parse_query(Route::Poll, Some(query)).unwrap_err();
            assert_eq!(status(error.kind), StatusCode::BAD_REQUEST, "{query}");
        }
        assert_eq!(
            refusal(Route::Poll, r#"{"session":"B","max":1.5}"#).0,
            "InvalidField"
        );
        assert_eq!(
            parse_query(Route::Ack, None).unwrap_err().kind,
            "MethodNotAllowed"
        );
        // A huge timeout is the core's to cap; it must not overflow here.
        let p = poll_of(parse(Route::Poll, br#"{"session":"B","timeout":1e300}"#).unwrap());
        assert_eq!(
            p.timeout,
            Some(Duration::from_millis(u32::MAX as u64 * 1000))
        );
    }

    #[test]
    fn acks_select_ids_a_cursor_or_everything() {
        let which = |json: &str| match request(Route::Ack, json).0 {
            ipc::Request::Ack { which, .. } => which,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            which(r#"{"session":"B","ids":[17,18]}"#),
            AckSelector::Ids(vec![17, 18])
        );
        assert_eq!(
            which(r#"{"session":"B","cursor":18}"#),
            AckSelector::UpTo(18)
        );
        assert_eq!(which(r#"{"session":"B"}"#), AckSelector::All);
        assert_eq!(
            refusal(Route::Ack, r#"{"session":"B","ids":[1],"cursor":2}"#).0,
            "InvalidField"
        );
    }

    #[test]
    fn sys_may_be_subscribed_to_and_unsubscribe_ignores_since() {
        let (req, answer) = request(
            Route::Subscribe,
            r#"{"session":"B","channel":"$sys","subject":"session.*","since":4}"#,
        );
        assert_eq!(answer, Answer::Subscribed);
        assert_eq!(
            req,
            ipc::Request::Subscribe {
                session: "B".into(),
                subscription: Subscription {
                    channel: "$sys".into(),
                    subject: Some("session.*".into()),
                    group: None,
                },
                since: Some(4),
            }
        );
        let (req, answer) = request(
            Route::Unsubscribe,
            r#"{"session":"B","channel":"orders.*","group":"workers","since":4}"#,
        );
        assert_eq!(answer, Answer::Unsubscribed);
        assert!(matches!(req, ipc::Request::Unsubscribe { subscription, .. }
            if subscription.group.as_deref() == Some("workers")));
        assert_eq!(
            refusal(Route::Subscribe, r#"{"session":"B"}"#).0,
            "MissingField"
        );
    }

    #[test]
    fn the_other_requests_map_one_to_one() {
        assert_eq!(
            request(Route::Replies, r#"{"session":"A","reference":17,"ttl":30}"#).0,
            ipc::Request::AwaitReply {
                session: "A".into(),
                reference: 17,
                ttl_ms: 30_000,
            }
        );
        assert_eq!(
            refusal(Route::Replies, r#"{"session":"A","reference":17}"#).0,
            "MissingField"
        );
        assert_eq!(
            request(Route::Resume, r#"{"session":"B"}"#).0,
            ipc::Request::SetPaused {
                session: "B".into(),
                paused: false,
            }
        );
        assert_eq!(
            request(Route::BackendBind, r#"{"session":"S","user":"u1"}"#),
            (
                ipc::Request::Bind {
                    session: "S".into(),
                    user: "u1".into(),
                    exclusive: false,
                },
                Answer::Bound
            )
        );
        assert_eq!(
            request(Route::BackendKick, r#"{"session":"S"}"#).0,
            ipc::Request::Kick {
                session: "S".into(),
                reason: String::new(),
            }
        );
        let presence = match parse_query(Route::Presence, Some("channel=orders.eu")).unwrap() {
            Operation::Request(request, answer) => (request, answer),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            presence,
            request(Route::Presence, r#"{"channel":"orders.eu"}"#)
        );
    }

    #[test]
    fn core_answers_render_as_documented() {
        let sent = |dropped, duplicate| {
            Answer::Sent
                .render(Response::Sent {
                    id: 17,
                    recipients: 3,
                    dropped,
                    duplicate,
                })
                .unwrap()
        };
        assert_eq!(sent(0, false), r#"{"id":17,"recipients":3}"#);
        assert_eq!(
            sent(2, true),
            r#"{"id":17,"recipients":3,"dropped":2,"duplicate":true}"#
        );
        assert_eq!(
            Answer::Subscribed
                .render(Response::Subscribed {
                    recovered: 3,
                    complete: false,
                })
                .unwrap(),
            r#"{"subscribed":true,"recovered":3,"complete":false}"#
        );
        assert_eq!(
            Answer::Unsubscribed.render(Response::Count(1)).unwrap(),
            r#"{"unsubscribed":1}"#
        );
        assert_eq!(
            Answer::Acked.render(Response::Acked { count: 2 }).unwrap(),
            r#"{"acked":2}"#
        );
        assert_eq!(
            Answer::Bound.render(Response::Count(0)).unwrap(),
            r#"{"status":"ok","kicked":0}"#
        );
        assert_eq!(
            Answer::Done.render(Response::Done).unwrap(),
            r#"{"status":"ok"}"#
        );
        let present = vec![
            Present {
                session: "D".into(),
                user: None,
            },
            Present {
                session: "B".into(),
                user: Some("u1".into()),
            },
        ];
        assert_eq!(
            Answer::Presence {
                channel: "C".into()
            }
            .render(Response::Presence(present))
            .unwrap(),
            r#"{"channel":"C","sessions":[{"session":"B","user":"u1"},{"session":"D","user":null}]}"#
        );
        let mismatch = Answer::Done.render(Response::Count(1)).unwrap_err();
        assert_eq!(status(mismatch.kind), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn core_refusals_keep_their_name_and_get_a_fitting_status() {
        for (kind, want) in [
            (ErrorKind::MailboxFull, StatusCode::TOO_MANY_REQUESTS),
            (ErrorKind::PayloadTooLarge, StatusCode::PAYLOAD_TOO_LARGE),
            (ErrorKind::InvalidRequest, StatusCode::BAD_REQUEST),
            (ErrorKind::ShuttingDown, StatusCode::SERVICE_UNAVAILABLE),
            (ErrorKind::Kicked, StatusCode::FORBIDDEN),
            (ErrorKind::NoRoute, StatusCode::NOT_FOUND),
            (ErrorKind::Overloaded, StatusCode::SERVICE_UNAVAILABLE),
            (ErrorKind::Draining, StatusCode::SERVICE_UNAVAILABLE),
            (ErrorKind::StoreUnavailable, StatusCode::SERVICE_UNAVAILABLE),
        ] {
            let error = Answer::Sent
                .render(Response::error(kind, "why"))
                .unwrap_err();
            assert_eq!((error.kind, error.message.as_str()), (kind.name(), "why"));
            assert_eq!(status(error.kind), want, "{kind:?}");
        }
        for (kind, want) in [
            ("CoreUnavailable", 503),
            ("Unauthorized", 401),
            ("Forbidden", 403),
            ("NotFound", 404),
            ("MethodNotAllowed", 405),
            ("BodyTooLarge", 413),
            ("UnsupportedContentType", 415),
            ("InvalidJson", 400),
        ] {
            assert_eq!(status(kind).as_u16(), want, "{kind}");
        }
    }

    #[test]
    fn poll_replies_carry_raw_bodies_ids_and_the_highest_id_as_cursor() {
        assert_eq!(messages_reply(&[]), r#"{"messages":[],"ids":[]}"#);
        let batch = [
            Message {
                id: 19,
                body: r#"{"id":19,"data":{"n":1.50}}"#.into(),
            },
            Message {
                id: 18,
                body: r#"{"k":"x0 payload"}"#.into(),
            },
        ];
        assert_eq!(
            messages_reply(&batch),
            r#"{"messages":[{"id":19,"data":{"n":1.50}},{"k":"x0 payload"}],"ids":[19,18],"cursor":19}"#
        );
    }
}
