//! The WebSocket transport, `GET /v1/ws` (docs/TRANSPORTS.md): the upgrade, and one
//! task per connection that drains the session's mailbox into the socket at the pace
//! the client's flow control allows, and carries the client's requests to the core.
//!
//! hyper answers the upgrade and tungstenite frames the upgraded connection. The
//! connection holds only what it has given and not had acknowledged, and hands that
//! back to the core however it ends, so a dropped socket loses nothing and nobody
//! waits out a visibility timeout for it.

pub mod frame;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::upgrade::Upgraded;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use ipc::{AckSelector, ErrorKind, Message, MessageId};
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{self, Error as WsError, Message as WsMessage};
use tracing::{Instrument, debug, warn};

pub use frame::Flow;

use crate::auth::{self, Grant, until};
use crate::core_link::PollError;
use crate::http::{self, App, Reply, STREAM_BATCH, STREAM_POLL, Streams};
use crate::metrics::Stream;
use crate::v1::{self, Answer};
use crate::x0::{X0Error, checked_session};

/// How long the last words of a connection (an error frame, the close frame, the
/// client's close in reply) may take before the socket is simply dropped.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// A WebSocket upgrade we can answer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Upgrade {
    /// `Sec-WebSocket-Accept` for the 101.
    accept: String,
    /// What the URL asks for. A bad one is refused after the upgrade, with an error
    /// frame and 1008: a browser's WebSocket shows nothing of a refused upgrade (no
    /// status, no body), but it does show a close code and the frames before it.
    asked: Result<Asked, X0Error>,
}

/// The session and flow of a connection, from its URL, and its token's grant.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Asked {
    session: String,
    flow: Flow,
    grant: Option<Grant>,
}

/// Answers `GET /v1/ws`: the 101 that switches protocols and a task for the
/// connection, or the JSON error of why not.
pub fn upgrade(
    app: &Arc<App>,
    mut request: Request<Incoming>,
    grant: Result<Option<Grant>, X0Error>,
) -> Reply {
    let origin = request.headers().get(header::ORIGIN);
    if !app.cors.admits(origin) {
        // Browsers do not apply CORS to WebSockets: the server has to.
        let error = X0Error::new(
            "Forbidden",
            "this origin may not open a WebSocket here (cors_allowed_origins)",
        );
        return http::refusal(error, "GET, OPTIONS");
    }
    let upgrade = match check(
        request.method(),
        request.headers(),
        request.uri().query(),
        &app.streams,
    ) {
        Ok(upgrade) => upgrade,
        Err(error) => {
            let mut reply = http::refusal(error, "GET, OPTIONS");
            if reply.status() == StatusCode::BAD_REQUEST {
                // RFC 6455 4.4: say which version we speak.
                reply.headers_mut().insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
            }
            return reply;
        }
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    let Upgrade { accept, asked } = upgrade;
    // Token refusals, like a bad URL, come after the upgrade: a page cannot read
    // why a handshake failed, but it can read a close code and an error frame.
    let asked = asked.and_then(|mut asked| {
        asked.grant = grant?;
        if let Some(grant) = &asked.grant {
            grant.own(&asked.session)?;
        }
        Ok(asked)
    });
    let session = asked.as_ref().map_or("", |a| a.session.as_str());
    // Debug, quoted and escaped: a session id is the client's text, and a newline
    // or an escape sequence in it must not forge or colour a log line.
    let span = tracing::info_span!("ws", session = ?session);
    let task_app = app.clone();
    app.tasks.spawn(
        async move {
            match on_upgrade.await {
                Ok(upgraded) => {
                    let _open = task_app.metrics.open_stream(Stream::WebSocket);
                    serve(task_app, upgraded, asked).await
                }
                Err(e) => debug!(error = %e, "the WebSocket upgrade did not complete"),
            }
        }
        .instrument(span),
    );
    let mut reply = Response::new(http::Body::Left(Default::default()));
    *reply.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = reply.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
    );
    reply
}

/// Whether the request is a WebSocket upgrade we can answer (RFC 6455 4.2.1), and
/// for which session and flow.
fn check(
    method: &Method,
    headers: &HeaderMap,
    query: Option<&str>,
    streams: &Streams,
) -> Result<Upgrade, X0Error> {
    if method != Method::GET {
        return Err(X0Error::new(
            "MethodNotAllowed",
            format!("{method} is not supported here; a WebSocket opens with GET"),
        ));
    }
    let not_an_upgrade =
        |what: &str| X0Error::new("InvalidRequest", format!("not a WebSocket upgrade: {what}"));
    if !has_token(headers, header::UPGRADE, "websocket") {
        return Err(not_an_upgrade("Upgrade: websocket is missing"));
    }
    if !has_token(headers, header::CONNECTION, "upgrade") {
        return Err(not_an_upgrade("Connection: Upgrade is missing"));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return Err(not_an_upgrade("Sec-WebSocket-Version must be 13"));
    }
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .map(HeaderValue::as_bytes)
        .filter(|key| is_websocket_key(key))
        .ok_or_else(|| not_an_upgrade("Sec-WebSocket-Key is missing or not 16 bytes in base64"))?;
    Ok(Upgrade {
        accept: tungstenite::handshake::derive_accept_key(key),
        asked: asked(query.unwrap_or(""), streams),
    })
}

fn asked(query: &str, streams: &Streams) -> Result<Asked, X0Error> {
    Ok(Asked {
        session: checked_session("session", v1::query_value(query, "session"))?,
        flow: Flow::parse(
            v1::query_value(query, "flow").as_deref(),
            v1::query_parsed(query, "window")?,
            streams.default_window,
            streams.max_window,
        )?,
        grant: None,
    })
}

/// Whether a comma-separated header has `token` (case-insensitive), as `Connection:
/// keep-alive, Upgrade` does.
fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|value| {
        value
            .to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// 16 bytes in base64: 22 characters of the alphabet and `==`.
fn is_websocket_key(key: &[u8]) -> bool {
    key.len() == 24
        && key.ends_with(b"==")
        && key[..22]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/')
}

/// What one connection was given and has not had acknowledged, and the pace the
/// client asked for. No I/O: the connection asks it how much to poll for and tells it
/// what was written and acknowledged.
#[derive(Debug)]
struct Given {
    flow: Flow,
    /// By id, so that an ack by cursor is a split and the return to the core is in
    /// order. Counts against the window; in fast flow it holds only the batch being
    /// written.
    outstanding: BTreeMap<MessageId, Message>,
    /// For `get`.
    last: Option<Message>,
}

impl Given {
    fn new(flow: Flow) -> Self {
        Given {
            flow,
            outstanding: BTreeMap::new(),
            last: None,
        }
    }

    /// How many messages the next poll may bring (0: none until an ack makes room).
    fn room(&self) -> u32 {
        match self.flow.window() {
            None => STREAM_BATCH,
            Some(window) => {
                let free = (window as usize).saturating_sub(self.outstanding.len());
                free.min(STREAM_BATCH as usize) as u32
            }
        }
    }

    /// A batch is about to be written: it is outstanding until acknowledged (or,
    /// in fast flow, until written). A message given again (the core's visibility
    /// timeout ran out on it) takes its own place, not a second one.
    fn give(&mut self, batch: Vec<Message>) {
        if let Some(last) = batch.last() {
            self.last = Some(last.clone());
        }
        for message in batch {
            self.outstanding.insert(message.id, message);
        }
    }

    /// The batch with these ids was written. In fast flow that is its
    /// acknowledgement: the ids are returned, for the core to be told.
    fn written(&mut self, ids: Vec<MessageId>) -> Vec<MessageId> {
        if self.flow != Flow::Fast {
            return Vec::new();
        }
        for id in &ids {
            self.outstanding.remove(id);
        }
        ids
    }

    /// The client acknowledged these. "Everything" and "up to a cursor" mean what
    /// this connection gave: they come back as exact ids, since the core would also
    /// count messages it handed over that are not written yet (a poll answered
    /// meanwhile, ids out of order by priority), and those would then be lost.
    fn acked(&mut self, which: &AckSelector) -> AckSelector {
        match which {
            AckSelector::All => {
                AckSelector::Ids(std::mem::take(&mut self.outstanding).into_keys().collect())
            }
            AckSelector::Ids(ids) => {
                for id in ids {
                    self.outstanding.remove(id);
                }
                which.clone()
            }
            AckSelector::UpTo(cursor) => {
                let above = match cursor.checked_add(1) {
                    Some(above) => self.outstanding.split_off(&above),
                    None => BTreeMap::new(),
                };
                let covered = std::mem::replace(&mut self.outstanding, above);
                AckSelector::Ids(covered.into_keys().collect())
            }
        }
    }

    /// A new pace. What was written counts as acknowledged in fast flow, so switching
    /// to it acknowledges everything outstanding: those ids are returned.
    fn set_flow(&mut self, flow: Flow) -> Vec<MessageId> {
        self.flow = flow;
        if flow != Flow::Fast {
            return Vec::new();
        }
        std::mem::take(&mut self.outstanding).into_keys().collect()
    }

    /// Everything outstanding, for the core to give again.
    fn take_outstanding(&mut self) -> Vec<Message> {
        std::mem::take(&mut self.outstanding)
            .into_values()
            .collect()
    }
}

type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// A future the connection keeps across turns of its loop.
type Pending<T> = Option<Pin<Box<dyn Future<Output = T> + Send>>>;

/// Waits for `slot`'s future, or forever when there is none; the caller empties the
/// slot once it completed.
async fn wait<T>(slot: &mut Pending<T>) -> T {
    match slot {
        Some(future) => future.await,
        None => std::future::pending().await,
    }
}

/// The answer to a client request, once the core gave it.
struct Answered {
    /// The frame to write, if there is anything to say.
    frame: Option<String>,
    /// The core refused it because the session was kicked: the connection ends.
    kicked: bool,
}

/// Why a connection ends, and what it still says before it goes.
enum End {
    /// The connection broke or the client's close was answered: nothing to write.
    Gone,
    /// The client sent its close frame; tungstenite has the reply queued.
    ClosedByClient,
    Close {
        /// A frame to write before the close (the error that ends the session).
        last_words: Option<String>,
        code: u16,
        reason: &'static str,
    },
}

impl End {
    fn close(code: u16, reason: &'static str) -> End {
        End::Close {
            last_words: None,
            code,
            reason,
        }
    }

    fn slow() -> End {
        End::close(4408, "the client did not read")
    }
}

struct Connection {
    app: Arc<App>,
    socket: Socket,
    session: String,
    /// What the token allows (`auth = "token"`), checked on every frame.
    grant: Option<Grant>,
    /// When the token runs out: the connection closes (4401) and the client comes
    /// back with a fresh one.
    expires: Option<Instant>,
    given: Given,
    /// The long-poll at the core, while there is room in the window. Dropping it
    /// withdraws it; an answer already on its way is handed back by the pool.
    poll: Pending<Result<Vec<Message>, PollError>>,
    /// When the poll was asked for, to tell a superseded poll from a timed-out one.
    poll_started: Instant,
    /// Set after a superseded poll: the next one waits this long first.
    poll_pause: Option<Duration>,
    /// The client's request at the core. One at a time, in the order sent: reading
    /// stops until it is answered, which pushes back on a client that floods.
    in_core: Pending<Answered>,
    /// When anything (a frame, a pong) last came from the client.
    heard: Instant,
}

async fn serve(app: Arc<App>, upgraded: Upgraded, asked: Result<Asked, X0Error>) {
    let streams = &app.streams;
    let limit = usize::try_from(app.max_body_bytes).unwrap_or(usize::MAX);
    let config = WebSocketConfig::default()
        // Browsers send small frames (acks, the odd publish); tungstenite's default
        // 128 KiB read buffer, allocated up front, was most of a WebSocket's memory.
        .read_buffer_size(4 * 1024)
        .max_message_size(Some(limit))
        .max_frame_size(Some(limit))
        // Frames are coalesced up to this before a write, well below the bound, so
        // that a batch costs few writes and the bound holds a whole message beside.
        .write_buffer_size((streams.max_buffer / 2).min(128 * 1024))
        .max_write_buffer_size(streams.max_buffer);
    let mut socket =
        WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
    let Asked {
        session,
        flow,
        grant,
    } = match asked {
        Ok(asked) => asked,
        Err(error) => {
            debug!(kind = error.kind, message = %error.message, "WebSocket refused");
            let (code, reason) = match error.kind {
                "Unauthorized" | "InvalidToken" | "TokenExpired" => (4401, "no valid token"),
                "Forbidden" => (4403, "the token is for another session"),
                _ => (1008, "bad session, flow or window in the URL"),
            };
            let end = End::Close {
                last_words: Some(frame::error(None, &error)),
                code,
                reason,
            };
            say_goodbye(&mut socket, end).await;
            return;
        }
    };
    if let Err(error) = http::bind_user(&app, grant.as_ref()).await {
        let end = End::Close {
            last_words: Some(frame::error(None, &error)),
            code: 1011,
            reason: "the core did not take the session's user",
        };
        say_goodbye(&mut socket, end).await;
        return;
    }
    debug!(?flow, "WebSocket open");
    let mut connection = Connection {
        app,
        socket,
        session,
        expires: grant.as_ref().map(|g| Instant::now() + g.remaining()),
        grant,
        given: Given::new(flow),
        poll: None,
        poll_started: Instant::now(),
        poll_pause: None,
        in_core: None,
        heard: Instant::now(),
    };
    let end = connection.run().await;
    connection.finish(end).await;
}

impl Connection {
    async fn run(&mut self) -> End {
        let welcome = frame::welcome(&self.session, self.given.flow);
        if let Err(end) = self.write(vec![WsMessage::text(welcome)]).await {
            return end;
        }
        let period = self.app.streams.ping_interval;
        let mut ping = tokio::time::interval_at(Instant::now() + period, period);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut shutdown = self.app.shutdown.clone();
        if *shutdown.borrow_and_update() {
            return End::close(1000, "the server is stopping");
        }
        loop {
            if self.poll.is_none() {
                self.start_poll();
            }
            let step = tokio::select! {
                received = self.socket.next(), if self.in_core.is_none() => {
                    self.heard = Instant::now();
                    self.received(received).await
                }
                answered = wait(&mut self.in_core) => {
                    self.in_core = None;
                    self.answered(answered).await
                }
                polled = wait(&mut self.poll) => {
                    self.poll = None;
                    self.polled(polled).await
                }
                _ = ping.tick() => self.ping().await,
                () = until(self.expires) => Err(End::Close {
                    last_words: Some(frame::error(None, &auth::expired())),
                    code: 4401,
                    reason: "the token expired",
                }),
                _ = shutdown.changed() => Err(End::close(1000, "the server is stopping")),
            };
            if let Err(end) = step {
                return end;
            }
        }
    }

    fn start_poll(&mut self) {
        let room = self.given.room();
        if room == 0 {
            return;
        }
        let core = self.app.core.clone();
        let session = self.session.clone();
        // Never ack_previous: what this connection was given is acknowledged by the
        // client's acks (or, in fast flow, by its having been written), not by asking
        // for more.
        let pause = self.poll_pause.take();
        self.poll_started = Instant::now();
        self.poll = Some(Box::pin(async move {
            if let Some(pause) = pause {
                tokio::time::sleep(pause).await;
            }
            core.poll_for_stream(&session, STREAM_POLL, false, room)
                .await
        }));
    }

    async fn received(&mut self, received: Option<Result<WsMessage, WsError>>) -> Result<(), End> {
        let json = match received {
            None => return Err(End::Gone),
            Some(Ok(WsMessage::Text(text))) => Bytes::from(text),
            Some(Ok(WsMessage::Binary(bytes))) => bytes,
            // Pings are answered by tungstenite; a pong only shows the client is alive.
            Some(Ok(WsMessage::Ping(_) | WsMessage::Pong(_) | WsMessage::Frame(_))) => {
                return Ok(());
            }
            Some(Ok(WsMessage::Close(_))) => return Err(End::ClosedByClient),
            Some(Err(e)) => return Err(read_error(e)),
        };
        let streams = &self.app.streams;
        let request = match frame::parse(
            &json,
            &self.session,
            streams.default_window,
            streams.max_window,
        ) {
            Ok(request) => request,
            Err(refused) => {
                debug!(kind = refused.error.kind, message = %refused.error.message, "frame refused");
                let answer = frame::error(refused.reference.as_deref(), &refused.error);
                if refused.violation {
                    // The error frame says what was wrong before the close.
                    return Err(End::Close {
                        last_words: Some(answer),
                        code: 1008,
                        reason: "not a JSON object with a known op",
                    });
                }
                return self.write(vec![WsMessage::text(answer)]).await;
            }
        };
        let reference = request.reference;
        match request.op {
            frame::Op::Ping => {
                let pong = frame::done("pong", reference.as_deref());
                self.write(vec![WsMessage::text(pong)]).await
            }
            frame::Op::Get => match &self.given.last {
                Some(last) => {
                    let again = frame::message(last, true);
                    self.write(vec![WsMessage::text(again)]).await
                }
                None => Ok(()),
            },
            frame::Op::Flow(flow) => {
                let acked = self.given.set_flow(flow);
                self.acknowledge(acked);
                // A poll parked for the old window's room may bring more than the
                // new one has; the next one asks for the right number.
                self.poll = None;
                let ok = frame::done("ok", reference.as_deref());
                self.write(vec![WsMessage::text(ok)]).await
            }
            frame::Op::Core(mut operation) => {
                let allowed = match &self.grant {
                    Some(grant) => grant.permits(&operation),
                    None => Ok(()),
                }
                .and_then(|()| {
                    self.app
                        .limits
                        .check_session(&self.session)
                        .map_err(|limited| limited.error())
                });
                if let Err(error) = allowed {
                    let refused = frame::error(reference.as_deref(), &error);
                    return self.write(vec![WsMessage::text(refused)]).await;
                }
                if let v1::Operation::Request(ipc::Request::Ack { which, .. }, _) = &mut operation {
                    // Settled here at once: the client has handled them, whatever the
                    // core's answer, and their room in the window is free again.
                    *which = self.given.acked(which);
                }
                self.in_core = Some(Box::pin(carry_out(self.app.clone(), operation, reference)));
                Ok(())
            }
        }
    }

    async fn answered(&mut self, answered: Answered) -> Result<(), End> {
        if answered.kicked {
            return Err(End::Close {
                last_words: answered.frame,
                code: 4403,
                reason: "the session was kicked",
            });
        }
        match answered.frame {
            Some(frame) => self.write(vec![WsMessage::text(frame)]).await,
            None => Ok(()),
        }
    }

    async fn polled(&mut self, polled: Result<Vec<Message>, PollError>) -> Result<(), End> {
        let batch = match polled {
            Ok(batch) => batch,
            Err(PollError::Refused(e)) => {
                let kicked = e.kind == ErrorKind::Kicked;
                let error = X0Error::from(e);
                return Err(End::Close {
                    last_words: Some(frame::error(None, &error)),
                    code: if kicked { 4403 } else { 1011 },
                    reason: if kicked {
                        "the session was kicked"
                    } else {
                        "the core refused to deliver"
                    },
                });
            }
            Err(PollError::Core(e)) => {
                return Err(End::Close {
                    last_words: Some(frame::error(None, &http::core_error(e))),
                    code: 1011,
                    reason: "the message server is unreachable",
                });
            }
        };
        if batch.is_empty() {
            if http::superseded(self.poll_started.elapsed()) {
                self.poll_pause = Some(http::SUPERSEDED_PAUSE);
            }
            return Ok(());
        }
        let frames = batch
            .iter()
            .map(|m| WsMessage::text(frame::message(m, false)))
            .collect();
        let ids = batch.iter().map(|m| m.id).collect();
        // Outstanding before it is written: if the write fails, it goes back.
        self.given.give(batch);
        self.write(frames).await?;
        let acked = self.given.written(ids);
        self.acknowledge(acked);
        Ok(())
    }

    async fn ping(&mut self) -> Result<(), End> {
        if self.heard.elapsed() >= self.app.streams.ping_interval * 3 {
            return Err(End::close(4408, "nothing heard for three pings"));
        }
        if self.poll.is_none() {
            // The window is full, so no poll is parked to keep the session present at
            // the core; an empty ack is a request from it that changes nothing, so
            // that its subscriptions do not lapse while the client works through
            // what it holds.
            self.acknowledge_in_background(AckSelector::Ids(Vec::new()));
        }
        self.write(vec![WsMessage::Ping(Bytes::new())]).await
    }

    /// Tells the core these ids were acknowledged, without waiting: nothing on this
    /// connection depends on the answer.
    fn acknowledge(&self, ids: Vec<MessageId>) {
        if !ids.is_empty() {
            self.acknowledge_in_background(AckSelector::Ids(ids));
        }
    }

    fn acknowledge_in_background(&self, which: AckSelector) {
        http::acknowledge_detached(&self.app, &self.session, which);
    }

    /// Writes and flushes `messages`. A client that does not take them within the
    /// send timeout, or lets the write buffer fill, is not reading.
    async fn write(&mut self, messages: Vec<WsMessage>) -> Result<(), End> {
        let socket = &mut self.socket;
        let send = async move {
            for message in messages {
                socket.feed(message).await?;
            }
            socket.flush().await
        };
        match tokio::time::timeout(self.app.streams.send_timeout, send).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(WsError::WriteBufferFull(message))) => {
                if message.len() > self.app.streams.max_buffer / 2 {
                    warn!(
                        bytes = message.len(),
                        "a message is too large for ws_max_buffer and cannot be sent"
                    );
                }
                Err(End::slow())
            }
            Ok(Err(e)) => {
                debug!(error = %e, "WebSocket write failed");
                Err(End::Gone)
            }
            Err(_) => Err(End::slow()),
        }
    }

    /// Hands back what is outstanding, then says goodbye as `end` says.
    async fn finish(mut self, end: End) {
        self.poll = None;
        self.in_core = None;
        let outstanding = self.given.take_outstanding();
        self.app.core.give_back(&self.session, outstanding).await;
        say_goodbye(&mut self.socket, end).await;
    }
}

/// Says what `end` says (last words, the close frame, or the reply to the client's
/// close) within [`CLOSE_WAIT`]; then the socket is dropped either way.
async fn say_goodbye(socket: &mut Socket, end: End) {
    let goodbye = async move {
        match end {
            End::Gone => return Ok(()),
            End::ClosedByClient => socket.flush().await?,
            End::Close {
                last_words,
                code,
                reason,
            } => {
                debug!(code, reason, "closing the WebSocket");
                if let Some(words) = last_words {
                    socket.feed(WsMessage::text(words)).await?;
                }
                let close = CloseFrame {
                    code: CloseCode::from(code),
                    reason: reason.into(),
                };
                socket.close(Some(close)).await?;
            }
        }
        // The client's close frame completes the handshake; anything before it is
        // not read any more.
        while let Some(Ok(_)) = socket.next().await {}
        Ok::<(), WsError>(())
    };
    let _ = tokio::time::timeout(CLOSE_WAIT, goodbye).await;
    debug!("WebSocket closed");
}

/// The close for a frame that could not be read.
fn read_error(e: WsError) -> End {
    match e {
        WsError::Capacity(_) => End::close(1009, "frame over max_body_bytes"),
        WsError::Utf8(_) => End::close(1007, "text frame that is not UTF-8"),
        WsError::Protocol(e) => {
            debug!(error = %e, "WebSocket protocol violation");
            End::close(1002, "protocol violation")
        }
        e => {
            debug!(error = %e, "WebSocket read failed");
            End::Gone
        }
    }
}

/// Sends a client's request to the core and words the answer as a frame.
async fn carry_out(app: Arc<App>, operation: v1::Operation, reference: Option<String>) -> Answered {
    let reference = reference.as_deref();
    let (answer, reply) = match operation {
        v1::Operation::Send(send) => (Answer::Sent, app.core.send(send).await),
        v1::Operation::Request(request, answer) => (answer, app.core.request(request).await),
        // frame::parse has no op for these: messages come by themselves here, and a
        // socket sends one message per frame.
        v1::Operation::Poll(_) | v1::Operation::Batch(_) => {
            let error = X0Error::new("UnknownType", "not an op on a WebSocket");
            return Answered {
                frame: Some(frame::error(reference, &error)),
                kicked: false,
            };
        }
    };
    match reply {
        Ok(response) => {
            let kicked =
                matches!(&response, ipc::Response::Error(e) if e.kind == ErrorKind::Kicked);
            Answered {
                frame: frame::answer(reference, &answer, response),
                kicked,
            }
        }
        Err(e) => Answered {
            frame: Some(frame::error(reference, &http::core_error(e))),
            kicked: false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::streams;

    fn upgrade_headers() -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, HeaderValue::from_static("WebSocket"));
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        headers.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        headers.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        headers
    }

    fn message(id: MessageId) -> Message {
        Message {
            id,
            body: format!(r#"{{"id":{id}}}"#),
        }
    }

    #[test]
    fn an_upgrade_is_accepted_with_the_rfc_6455_accept_key() {
        let upgrade = check(
            &Method::GET,
            &upgrade_headers(),
            Some("session=a%20b&flow=window&window=5"),
            &streams(),
        )
        .unwrap();
        // The example of RFC 6455 1.3.
        assert_eq!(upgrade.accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert_eq!(
            upgrade.asked,
            Ok(Asked {
                session: "a b".into(),
                flow: Flow::Window(5),
                grant: None,
            })
        );
        let flow = |query| asked(query, &streams()).unwrap().flow;
        assert_eq!(flow("session=S"), Flow::Window(32));
        assert_eq!(flow("session=S&flow=fast"), Flow::Fast);
        assert_eq!(flow("session=S&flow=ack&window=9"), Flow::Ack);
    }

    #[test]
    fn a_bad_session_flow_or_window_is_refused_after_the_upgrade() {
        let kind = |query: &str| {
            let upgrade = check(&Method::GET, &upgrade_headers(), Some(query), &streams());
            upgrade.unwrap().asked.unwrap_err().kind
        };
        assert_eq!(kind(""), "MissingField");
        assert_eq!(kind("session="), "InvalidField");
        assert_eq!(
            kind(&format!("session={}", "x".repeat(257))),
            "InvalidField"
        );
        for query in [
            "session=S&flow=turbo",
            "session=S&window=0",
            "session=S&window=1025",
            "session=S&window=x",
        ] {
            assert_eq!(kind(query), "InvalidField", "{query}");
        }
    }

    #[test]
    fn requests_that_are_not_upgrades_are_refused_with_their_reason() {
        let kind = |method: Method, edit: &dyn Fn(&mut HeaderMap), query: &str| {
            let mut headers = upgrade_headers();
            edit(&mut headers);
            check(&method, &headers, Some(query), &streams())
                .map(|_| ())
                .unwrap_err()
                .kind
        };
        let keep = |_: &mut HeaderMap| {};
        assert_eq!(kind(Method::POST, &keep, "session=S"), "MethodNotAllowed");
        assert_eq!(
            kind(
                Method::GET,
                &|h| {
                    h.remove(header::UPGRADE);
                },
                "session=S"
            ),
            "InvalidRequest"
        );
        assert_eq!(
            kind(
                Method::GET,
                &|h| {
                    h.insert(header::CONNECTION, HeaderValue::from_static("close"));
                },
                "session=S"
            ),
            "InvalidRequest"
        );
        assert_eq!(
            kind(
                Method::GET,
                &|h| {
                    h.insert(header::SEC_WEBSOCKET_VERSION, HeaderValue::from_static("8"));
                },
                "session=S"
            ),
            "InvalidRequest"
        );
        for key in [
            "",
            "short==",
            "dGhlIHNhbXBsZSBub25jZQ",
            "dGhlIHNhbXBsZSBub25j!Q==",
        ] {
            assert_eq!(
                kind(
                    Method::GET,
                    &|h| {
                        h.insert(
                            header::SEC_WEBSOCKET_KEY,
                            HeaderValue::from_str(key).unwrap(),
                        );
                    },
                    "session=S"
                ),
                "InvalidRequest",
                "{key:?}"
            );
        }
    }

    #[test]
    fn the_window_has_room_for_what_is_not_yet_acknowledged() {
        let mut given = Given::new(Flow::Window(3));
        assert_eq!(given.room(), 3);
        given.give(vec![message(1), message(2)]);
        assert_eq!(given.room(), 1);
        assert_eq!(given.written(vec![1, 2]), Vec::<MessageId>::new());
        given.give(vec![message(3)]);
        assert_eq!(given.room(), 0);
        given.acked(&AckSelector::Ids(vec![2, 99]));
        assert_eq!(given.room(), 1);
        given.acked(&AckSelector::UpTo(1));
        assert_eq!(given.room(), 2);
        assert_eq!(given.take_outstanding(), vec![message(3)]);
        assert_eq!(given.last, Some(message(3)));
    }

    #[test]
    fn everything_and_a_cursor_acknowledge_only_what_this_connection_gave() {
        let mut given = Given::new(Flow::Window(8));
        given.give(vec![message(1), message(4), message(7)]);
        // The core may hold 5 and 6 for this session too (a poll answered, not yet
        // written): they must not be acknowledged by a cursor or "everything".
        assert_eq!(
            given.acked(&AckSelector::UpTo(6)),
            AckSelector::Ids(vec![1, 4])
        );
        assert_eq!(given.acked(&AckSelector::All), AckSelector::Ids(vec![7]));
        assert_eq!(given.room(), 8);
        // Exact ids are the client's to name, earlier connections' included.
        assert_eq!(
            given.acked(&AckSelector::Ids(vec![2])),
            AckSelector::Ids(vec![2])
        );
    }

    #[test]
    fn ack_flow_gives_one_message_at_a_time() {
        let mut given = Given::new(Flow::Ack);
        assert_eq!(given.room(), 1);
        given.give(vec![message(5)]);
        assert_eq!(given.room(), 0);
        given.acked(&AckSelector::All);
        assert_eq!(given.room(), 1);
    }

    #[test]
    fn a_message_given_again_does_not_take_a_second_place() {
        let mut given = Given::new(Flow::Window(2));
        given.give(vec![message(1)]);
        given.give(vec![message(1)]);
        assert_eq!(given.room(), 1);
    }

    #[test]
    fn fast_flow_counts_what_was_written_as_acknowledged() {
        let mut given = Given::new(Flow::Fast);
        assert_eq!(given.room(), STREAM_BATCH);
        given.give(vec![message(1), message(2)]);
        // Until written, a batch would go back to the core.
        assert_eq!(given.outstanding.len(), 2);
        assert_eq!(given.written(vec![1, 2]), vec![1, 2]);
        assert!(given.take_outstanding().is_empty());
        assert_eq!(given.last, Some(message(2)));
    }

    #[test]
    fn switching_to_fast_flow_acknowledges_what_is_outstanding() {
        let mut given = Given::new(Flow::Window(8));
        given.give(vec![message(1), message(2)]);
        assert_eq!(given.set_flow(Flow::Window(1)), Vec::<MessageId>::new());
        assert_eq!(given.room(), 0);
        assert_eq!(given.set_flow(Flow::Fast), vec![1, 2]);
        assert_eq!(given.room(), STREAM_BATCH);
    }

    #[test]
    fn an_ack_up_to_the_highest_id_clears_everything() {
        let mut given = Given::new(Flow::Window(8));
        given.give(vec![message(u64::MAX), message(7)]);
        given.acked(&AckSelector::UpTo(u64::MAX));
        assert!(given.take_outstanding().is_empty());
    }
}

#[cfg(test)]
mod socket_tests {
    //! Real WebSocket clients against the handler, in front of a scripted core.

    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

    use ipc::{Request as CoreRequest, Response as CoreResponse};
    use serde_json::json;
    use tokio::net::TcpStream;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

    use super::*;
    use crate::harness::{
        Handler, asked_for, fake_core, given_back, handler, handler_with, streams,
    };

    type Client = WebSocketStream<TcpStream>;

    fn message(id: MessageId) -> Message {
        Message {
            id,
            body: format!(r#"{{"id":{id}}}"#),
        }
    }

    async fn connect(h: &Handler, query: &str) -> Client {
        let tcp = TcpStream::connect(h.addr).await.unwrap();
        let url = format!("ws://{}/v1/ws?{query}", h.addr);
        let (client, response) = tokio_tungstenite::client_async(url, tcp).await.unwrap();
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        client
    }

    /// The next JSON frame; pings are skipped.
    async fn next(client: &mut Client) -> serde_json::Value {
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(5), client.next())
                .await
                .expect("a frame within 5 s")
                .expect("the connection is open")
                .unwrap();
            match frame {
                WsMessage::Text(text) => return serde_json::from_str(&text).unwrap(),
                WsMessage::Ping(_) | WsMessage::Pong(_) => continue,
                other => panic!("not a JSON frame: {other:?}"),
            }
        }
    }

    /// The close code the server ends with, skipping frames before it.
    async fn close_code(client: &mut Client) -> u16 {
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(5), client.next())
                .await
                .expect("a close within 5 s");
            match frame {
                Some(Ok(WsMessage::Close(Some(close)))) => return u16::from(close.code),
                Some(Ok(WsMessage::Close(None))) => return 1005,
                Some(Ok(_)) => continue,
                other => panic!("no close frame: {other:?}"),
            }
        }
    }

    async fn say(client: &mut Client, frame: &str) {
        client.send(WsMessage::text(frame)).await.unwrap();
    }

    fn polls(asked: &[CoreRequest]) -> Vec<(u32, bool)> {
        asked
            .iter()
            .filter_map(|r| match r {
                CoreRequest::Poll {
                    max, ack_previous, ..
                } => Some((*max, *ack_previous)),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn a_window_of_messages_is_given_and_what_was_not_acked_goes_back_at_the_end() {
        let (socket, asked) = fake_core(|request| match request {
            CoreRequest::Poll { .. } => {
                static POLLS: AtomicUsize = AtomicUsize::new(0);
                match POLLS.fetch_add(1, Ordering::Relaxed) {
                    0 => Some(CoreResponse::Messages(vec![message(17), message(18)])),
                    _ => None,
                }
            }
            CoreRequest::Ack { .. } => Some(CoreResponse::Acked { count: 1 }),
            CoreRequest::Return { .. } => Some(CoreResponse::Done),
            _ => None,
        });
        let h = handler(socket.0.clone(), None).await;
        let mut client = connect(&h, "session=S&window=2").await;
        assert_eq!(
            next(&mut client).await,
            json!({"op":"welcome","session":"S","flow":"window","window":2})
        );
        assert_eq!(
            next(&mut client).await,
            json!({"op":"message","id":17,"message":{"id":17}})
        );
        assert_eq!(next(&mut client).await["id"], 18);
        say(&mut client, r#"{"op":"ack","ids":[17],"ref":"a"}"#).await;
        assert_eq!(
            next(&mut client).await,
            json!({"op":"acked","ref":"a","count":1})
        );
        say(&mut client, r#"{"op":"get"}"#).await;
        assert_eq!(
            next(&mut client).await,
            json!({"op":"message","id":18,"message":{"id":18},"again":true})
        );
        // The ack made room for one more.
        asked_for(&asked, |r| matches!(r, CoreRequest::Poll { max: 1, .. })).await;
        client.close(None).await.unwrap();
        let back = asked_for(&asked, |r| matches!(r, CoreRequest::Return { .. })).await;
        assert_eq!(
            back,
            CoreRequest::Return {
                session: "S".into(),
                messages: vec![message(18)],
            }
        );
        let asked = asked.lock().unwrap();
        assert_eq!(polls(&asked), [(2, false), (1, false)]);
        assert!(asked.contains(&CoreRequest::Ack {
            session: "S".into(),
            which: AckSelector::Ids(vec![17]),
        }));
    }

    #[tokio::test]
    async fn requests_are_answered_by_ref_and_a_refused_one_does_not_end_the_connection() {
        let (socket, asked) = fake_core(|request| match request {
            CoreRequest::Send(_) => Some(CoreResponse::Sent {
                id: 5,
                recipients: 1,
                dropped: 0,
                duplicate: false,
            }),
            CoreRequest::Subscribe { .. } => Some(CoreResponse::Subscribed {
                recovered: 0,
                complete: true,
            }),
            _ => None,
        });
        let h = handler(socket.0.clone(), None).await;
        let mut client = connect(&h, "session=A").await;
        next(&mut client).await;
        say(
            &mut client,
            r#"{"op":"publish","ref":1,"target":{"user":"u"},"data":1}"#,
        )
        .await;
        let refused = next(&mut client).await;
        assert_eq!(
            (&refused["ref"], &refused["exception_id"]),
            (&json!(1), &json!("Forbidden"))
        );
        say(
            &mut client,
            r#"{"op":"publish","ref":[1,"x"],"target":{"session":"B"},"data":{"n":1.50}}"#,
        )
        .await;
        assert_eq!(
            next(&mut client).await,
            json!({"op":"published","ref":[1,"x"],"id":5,"recipients":1})
        );
        client
            .send(WsMessage::binary(
                &br#"{"op":"subscribe","channel":"news.>","ref":2}"#[..],
            ))
            .await
            .unwrap();
        assert_eq!(
            next(&mut client).await,
            json!({"op":"subscribed","ref":2,"recovered":0,"complete":true})
        );
        say(&mut client, r#"{"op":"ping","ref":3}"#).await;
        assert_eq!(next(&mut client).await, json!({"op":"pong","ref":3}));
        let CoreRequest::Send(send) =
            asked_for(&asked, |r| matches!(r, CoreRequest::Send(_))).await
        else {
            unreachable!()
        };
        assert_eq!(
            (send.src.as_deref(), send.data.as_str()),
            (Some("A"), r#"{"n":1.50}"#)
        );
    }

    #[tokio::test]
    async fn a_frame_that_is_not_a_request_is_answered_and_closes_with_1008() {
        let (socket, _) = fake_core(|_| None);
        let h = handler(socket.0.clone(), None).await;
        for (frame, kind) in [
            ("{not json", "InvalidJson"),
            ("[1,2]", "InvalidField"),
            (r#"{"ref":1}"#, "MissingField"),
            (r#"{"op":"dance","ref":1}"#, "UnknownType"),
        ] {
            let mut client = connect(&h, "session=A").await;
            next(&mut client).await;
            say(&mut client, frame).await;
            assert_eq!(next(&mut client).await["exception_id"], kind, "{frame}");
            assert_eq!(close_code(&mut client).await, 1008, "{frame}");
        }
    }

    #[tokio::test]
    async fn a_bad_url_is_refused_with_an_error_frame_and_1008() {
        let (socket, asked) = fake_core(|_| None);
        let h = handler(socket.0.clone(), None).await;
        let mut client = connect(&h, "flow=ack").await;
        assert_eq!(
            next(&mut client).await,
            json!({"op":"error","exception_id":"MissingField","exception":"session is missing"})
        );
        assert_eq!(close_code(&mut client).await, 1008);
        let mut client = connect(&h, "session=S&window=5000").await;
        assert_eq!(next(&mut client).await["exception_id"], "InvalidField");
        assert_eq!(close_code(&mut client).await, 1008);
        assert!(asked.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn fast_flow_acknowledges_what_it_wrote_and_gives_nothing_back() {
        let (socket, asked) = fake_core(|request| match request {
            CoreRequest::Poll { .. } => {
                static POLLS: AtomicUsize = AtomicUsize::new(0);
                match POLLS.fetch_add(1, Ordering::Relaxed) {
                    0 => Some(CoreResponse::Messages(vec![message(1), message(2)])),
                    _ => None,
                }
            }
            CoreRequest::Ack { .. } => Some(CoreResponse::Acked { count: 2 }),
            _ => None,
        });
        let h = handler(socket.0.clone(), None).await;
        let mut client = connect(&h, "session=F&flow=fast").await;
        assert_eq!(
            next(&mut client).await,
            json!({"op":"welcome","session":"F","flow":"fast"})
        );
        assert_eq!(next(&mut client).await["id"], 1);
        assert_eq!(next(&mut client).await["id"], 2);
        asked_for(&asked, |r| {
            matches!(r, CoreRequest::Ack { which: AckSelector::Ids(ids), .. } if ids == &[1, 2])
        })
        .await;
        client.close(None).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let asked = asked.lock().unwrap();
        assert!(
            !asked
                .iter()
                .any(|r| matches!(r, CoreRequest::Return { .. })),
            "{asked:?}"
        );
        assert_eq!(polls(&asked)[0], (STREAM_BATCH, false));
    }

    #[tokio::test]
    async fn a_kicked_session_hears_why_and_is_closed_with_4403() {
        let (socket, _) = fake_core(|request| match request {
            CoreRequest::Poll { .. } => {
                Some(CoreResponse::error(ErrorKind::Kicked, "kicked: logged out"))
            }
            _ => None,
        });
        let h = handler(socket.0.clone(), None).await;
        let mut client = connect(&h, "session=K").await;
        next(&mut client).await;
        assert_eq!(
            next(&mut client).await,
            json!({"op":"error","exception_id":"Kicked","exception":"kicked: logged out"})
        );
        assert_eq!(close_code(&mut client).await, 4403);
    }

    #[tokio::test]
    async fn a_frame_over_max_body_bytes_closes_with_1009() {
        let (socket, _) = fake_core(|_| None);
        let h = handler(socket.0.clone(), None).await;
        let mut client = connect(&h, "session=A").await;
        next(&mut client).await;
        // The harness allows 1024 bytes.
        let big = format!(r#"{{"op":"ping","pad":"{}"}}"#, "x".repeat(2000));
        say(&mut client, &big).await;
        assert_eq!(close_code(&mut client).await, 1009);
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_is_dropped_and_its_messages_go_back() {
        let (socket, asked) = fake_core(|request| match request {
            // An endless supply of 64 KiB messages, 8 MiB a batch.
            CoreRequest::Poll { .. } => {
                static NEXT: AtomicU64 = AtomicU64::new(1);
                let batch = (0..128)
                    .map(|_| {
                        let id = NEXT.fetch_add(1, Ordering::Relaxed);
                        Message {
                            id,
                            body: format!(r#"{{"id":{id},"pad":"{}"}}"#, "x".repeat(64 * 1024)),
                        }
                    })
                    .collect();
                Some(CoreResponse::Messages(batch))
            }
            CoreRequest::Ack { .. } => Some(CoreResponse::Acked { count: 0 }),
            CoreRequest::Return { .. } => Some(CoreResponse::Done),
            _ => None,
        });
        let streams = Streams {
            send_timeout: Duration::from_millis(300),
            ..streams()
        };
        let h = handler_with(socket.0.clone(), None, streams).await;
        // Connected, and then never read from again.
        let _client = connect(&h, "session=Slow&flow=fast").await;
        // The batch that could not be written, and (large as it is) in parts.
        assert_eq!(given_back(&asked, "Slow", 128).await.len(), 128);
        let parts = asked
            .lock()
            .unwrap()
            .iter()
            .filter(|r| matches!(r, CoreRequest::Return { .. }))
            .count();
        assert!(parts > 1, "{parts} parts");
    }

    #[tokio::test]
    async fn a_stopping_handler_closes_with_1000_and_gives_back_what_is_outstanding() {
        let (socket, asked) = fake_core(|request| match request {
            CoreRequest::Poll { .. } => {
                static POLLS: AtomicUsize = AtomicUsize::new(0);
                match POLLS.fetch_add(1, Ordering::Relaxed) {
                    0 => Some(CoreResponse::Messages(vec![message(7)])),
                    _ => None,
                }
            }
            CoreRequest::Return { .. } => Some(CoreResponse::Done),
            _ => None,
        });
        let h = handler(socket.0.clone(), None).await;
        let mut client = connect(&h, "session=S&flow=ack").await;
        assert_eq!(next(&mut client).await["window"], 1);
        assert_eq!(next(&mut client).await["id"], 7);
        h.stop.send(true).unwrap();
        assert_eq!(close_code(&mut client).await, u16::from(CloseCode::Normal));
        let back = asked_for(&asked, |r| matches!(r, CoreRequest::Return { .. })).await;
        assert!(matches!(back, CoreRequest::Return { messages, .. } if messages == [message(7)]));
        h.tasks.close();
        tokio::time::timeout(Duration::from_secs(2), h.tasks.wait())
            .await
            .expect("the connection task ends");
    }

    #[tokio::test]
    async fn a_plain_get_is_refused_with_the_version_we_speak() {
        let h = handler(crate::harness::no_core(), None).await;
        let plain = h.call("GET", "/v1/ws?session=S", &[], "").await;
        assert_eq!(plain.refusal(), (400, "InvalidRequest"));
        assert!(
            plain.head.contains("sec-websocket-version: 13"),
            "{}",
            plain.head
        );
        let post = h.call("POST", "/v1/ws?session=S", &[], "").await;
        assert_eq!(post.refusal(), (405, "MethodNotAllowed"));
        assert!(post.head.contains("allow: get, options"), "{}", post.head);
    }
}

#[cfg(test)]
mod poll_answer_tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use ipc::{Request as CoreRequest, Response as CoreResponse};
    use tokio::net::TcpSocket;

    use super::*;
    use crate::harness::{asked_for, fake_core_delayed, handler_with, streams};

    fn message(id: MessageId) -> Message {
        Message {
            id,
            body: format!(r#"{{"id":{id}}}"#),
        }
    }

    fn returned(asked: &crate::harness::Asked) -> Vec<MessageId> {
        asked
            .lock()
            .unwrap()
            .iter()
            .filter_map(|r| match r {
                CoreRequest::Return { messages, .. } => {
                    Some(messages.iter().map(|m| m.id).collect::<Vec<_>>())
                }
                _ => None,
            })
            .flatten()
            .collect()
    }

    /// A poll the core answered while the connection was stuck writing to a slow
    /// client is dropped with the connection: its messages must go back, not vanish.
    #[tokio::test]
    async fn a_poll_answered_while_a_write_blocks_is_given_back_when_the_connection_ends() {
        let (socket, asked) = fake_core_delayed(|request| match request {
            CoreRequest::Poll { .. } => {
                static POLLS: AtomicUsize = AtomicUsize::new(0);
                match POLLS.fetch_add(1, Ordering::Relaxed) {
                    0 => Some((
                        0,
                        CoreResponse::Messages(vec![Message {
                            id: 1,
                            body: format!(r#"{{"pad":"{}"}}"#, "x".repeat(900 * 1024)),
                        }]),
                    )),
                    1 => Some((300, CoreResponse::Messages(vec![message(2)]))),
                    _ => None,
                }
            }
            CoreRequest::Return { .. } => Some((0, CoreResponse::Done)),
            CoreRequest::Ack { .. } => Some((0, CoreResponse::Acked { count: 0 })),
            _ => None,
        });
        let streams = Streams {
            send_timeout: Duration::from_secs(2),
            ..streams()
        };
        let h = handler_with(socket.0.clone(), None, streams).await;
        let tcp = TcpSocket::new_v4().unwrap();
        tcp.set_recv_buffer_size(4096).unwrap();
        let tcp = tcp.connect(h.addr).await.unwrap();
        let url = format!("ws://{}/v1/ws?session=S", h.addr);
        let (mut client, _) = tokio_tungstenite::client_async(url, tcp).await.unwrap();
        // welcome, then message 1 (read in full)
        for _ in 0..2 {
            client.next().await.unwrap().unwrap();
        }
        // The second poll is parked at the core (answered 300 ms later).
        for _ in 0..500 {
            if asked
                .lock()
                .unwrap()
                .iter()
                .filter(|r| matches!(r, CoreRequest::Poll { .. }))
                .count()
                >= 2
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        // Now stop reading and ask for the large last message again and again:
        // the server's write blocks until send_timeout.
        for _ in 0..20 {
            client
                .send(WsMessage::text(r#"{"op":"get"}"#))
                .await
                .unwrap();
        }
        asked_for(&asked, |r| matches!(r, CoreRequest::Return { .. })).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let back = returned(&asked);
        assert!(
            back.contains(&2),
            "message 2 was handed over by the core, never written, never given back: returned {back:?}"
        );
    }
}
