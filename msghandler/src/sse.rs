//! Server-Sent Events, `GET /v1/events` (docs/TRANSPORTS.md): the session's messages
//! as a `text/event-stream` response that never ends by itself.
//!
//! A task per stream long-polls the core and hands each batch, as one chunk, to the
//! response body through a channel of one. That channel is how the task learns that
//! hyper took a chunk (there is room again) or that the client went away (the body,
//! and with it the receiver, was dropped). A batch is acknowledged once the stream
//! outlived it (see [`EventStream::unconfirmed`]); what the stream still holds when it
//! ends goes back to the core.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use ipc::{AckSelector, Message, MessageId};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::time::Instant;
use tracing::{Instrument, debug};

use crate::auth::{self, Grant};
use crate::http::{self, App, Reply, STREAM_BATCH, STREAM_POLL};
use crate::metrics::Stream;
use crate::v1;
use crate::x0::{X0Error, checked_session};

/// The first bytes of every stream: EventSource reconnects 2 s after a stream ends.
pub const PREAMBLE: &str = "retry: 2000\n\n";

/// Sent on an idle stream so that proxies do not take it for dead.
pub const HEARTBEAT: &str = ": heartbeat\n\n";

/// A response body fed chunk by chunk from a channel; it ends when the sender goes.
pub struct EventBody {
    chunks: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for EventBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.chunks
            .poll_recv(cx)
            .map(|chunk| chunk.map(|chunk| Ok(Frame::data(chunk))))
    }
}

/// Answers `GET /v1/events`: the stream, or a 400 before it starts (EventSource
/// gives up for good on anything but a 200 event stream, which is right for a
/// request that can never work).
pub fn open(app: &Arc<App>, request: &Request<Incoming>, grant: Option<Grant>) -> Reply {
    let query = request.uri().query().unwrap_or("");
    let header = request.headers().get("last-event-id");
    let (session, last_event_id, client_acks) = match parse(query, header) {
        Ok(parsed) => parsed,
        Err(error) => return http::refusal(error, "GET, OPTIONS"),
    };
    if let Some(Err(error)) = grant.as_ref().map(|g| g.own(&session)) {
        return http::refusal(error, "GET, OPTIONS");
    }
    let (chunks, body) = mpsc::channel(1);
    // Debug, quoted and escaped: the session id is the client's text (see ws.rs).
    let span = tracing::info_span!("sse", session = ?session);
    let open = app.metrics.open_stream(Stream::Events);
    let streamed = stream(
        app.clone(),
        Opened {
            session,
            last_event_id,
            client_acks,
            grant,
        },
        chunks,
    );
    app.tasks.spawn(
        async move {
            let _open = open;
            streamed.await
        }
        .instrument(span),
    );
    let mut reply = Response::new(http::Body::Right(EventBody { chunks: body }));
    *reply.status_mut() = StatusCode::OK;
    let headers = reply.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // nginx would otherwise buffer the stream and deliver events in lumps.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    reply
}

/// The session, the id to resume after, and whether the client acknowledges by
/// itself (`ack=client`). The header wins over the query: the browser sends it on
/// every reconnect with the id it saw last, while the query stays as the page first
/// wrote it.
fn parse(
    query: &str,
    header: Option<&HeaderValue>,
) -> Result<(String, Option<MessageId>, bool), X0Error> {
    let session = checked_session("session", v1::query_value(query, "session"))?;
    let last_event_id = match header {
        Some(value) => {
            let id = value
                .to_str()
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| X0Error::new("InvalidField", "Last-Event-ID is not a message id"))?;
            Some(id)
        }
        None => v1::query_parsed(query, "last_event_id")?,
    };
    let client_acks = match v1::query_value(query, "ack").as_deref() {
        None | Some("stream") => false,
        Some("client") => true,
        Some(other) => {
            return Err(X0Error::new(
                "InvalidField",
                format!("ack={other:?}: expected \"stream\" or \"client\""),
            ));
        }
    };
    Ok((session, last_event_id, client_acks))
}

/// One `message` event per message. A body is one JSON value, on one line as the
/// core builds envelopes; an x0 payload keeps the sender's whitespace, and a line
/// break in it becomes a second `data:` line, which EventSource joins back with a
/// newline (JSON whitespace either way).
pub fn events(messages: &[Message]) -> String {
    let bytes: usize = messages.iter().map(|m| m.body.len() + 48).sum();
    let mut out = String::with_capacity(bytes);
    let mut digits = itoa::Buffer::new();
    for message in messages {
        out.push_str("id: ");
        out.push_str(digits.format(message.id));
        out.push_str("\nevent: message\n");
        push_data(&mut out, &message.body);
        out.push('\n');
    }
    out
}

/// The event that ends a stream the core refused, with the JSON error body.
pub fn error_event(error: &X0Error) -> String {
    let mut out = String::from("event: error\n");
    push_data(&mut out, &error.to_json());
    out.push('\n');
    out
}

/// `data: ` lines for `text`, split where it has line breaks (`\r\n`, `\n` or `\r`,
/// all of which end a line in an event stream).
fn push_data(out: &mut String, text: &str) {
    let mut rest = text;
    loop {
        out.push_str("data: ");
        match rest.find(['\r', '\n']) {
            None => {
                out.push_str(rest);
                out.push('\n');
                return;
            }
            Some(at) => {
                out.push_str(&rest[..at]);
                out.push('\n');
                let skip = if rest[at..].starts_with("\r\n") { 2 } else { 1 };
                rest = &rest[at + skip..];
            }
        }
    }
}

/// What a stream was opened for.
struct Opened {
    session: String,
    last_event_id: Option<MessageId>,
    client_acks: bool,
    /// What its token allows, when tokens are required.
    grant: Option<Grant>,
}

async fn stream(app: Arc<App>, opened: Opened, chunks: mpsc::Sender<Bytes>) {
    let Opened {
        session,
        last_event_id,
        client_acks,
        grant,
    } = opened;
    // The stream ends when the token does; EventSource then reconnects, and the
    // client comes back with a fresh token.
    let expires = grant.as_ref().map(|g| Instant::now() + g.remaining());
    debug!(?last_event_id, "event stream open");
    if chunks
        .send(Bytes::from_static(PREAMBLE.as_bytes()))
        .await
        .is_err()
    {
        return;
    }
    if let Err(error) = http::bind_user(&app, grant.as_ref()).await {
        say_last(&app, &chunks, &error).await;
        return;
    }
    if let Some(id) = last_event_id
        && let Err(error) = acknowledge_up_to(&app, &session, id).await
    {
        say_last(&app, &chunks, &error).await;
        return;
    }
    let mut stream = EventStream {
        app,
        session,
        unconfirmed: Vec::new(),
        client_acks,
        expires,
    };
    stream.run(&chunks).await;
    // Whatever was written last and not yet confirmed goes back: the next
    // connection's Last-Event-ID acknowledges what of it arrived, and the rest comes
    // again at once.
    let EventStream {
        app,
        session,
        unconfirmed,
        ..
    } = stream;
    app.core.give_back(&session, unconfirmed).await;
}

/// One event stream's state.
struct EventStream {
    app: Arc<App>,
    session: String,
    /// The batch written last. An event stream has no way back, so a batch counts
    /// as acknowledged once it was written and the stream then lived on: when the
    /// next batch is taken, or the next heartbeat, whichever comes first. Until then
    /// it is the client's only if the stream lasts; if it ends first, it goes back.
    /// (Acknowledged at once instead, a batch written into a connection that had
    /// just died would be lost in `ack` delivery mode; never acknowledged, it would
    /// come again on this same stream after the core's visibility timeout.)
    unconfirmed: Vec<Message>,
    /// `ack=client`: the client acknowledges what it handled (`POST /v1/ack`), so
    /// the stream acknowledges nothing: written is not read, and a page that dies
    /// with several batches unread would otherwise lose all but the last.
    client_acks: bool,
    expires: Option<Instant>,
}

impl EventStream {
    async fn run(&mut self, chunks: &mpsc::Sender<Bytes>) {
        let app = self.app.clone();
        let session = self.session.clone();
        let mut shutdown = app.shutdown.clone();
        let period = app.streams.heartbeat;
        let mut heartbeat = tokio::time::interval_at(Instant::now() + period, period);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut next_pause = None;
        loop {
            if *shutdown.borrow_and_update() {
                return;
            }
            // Never ack_previous: what was given before is acknowledged by id, as
            // `unconfirmed` says, and what earlier connections were given only by
            // the Last-Event-ID.
            let started = Instant::now();
            let pause: Option<std::time::Duration> = next_pause.take();
            let core = app.core.clone();
            let poll = async {
                if let Some(pause) = pause {
                    tokio::time::sleep(pause).await;
                }
                core.poll_for_stream(&session, STREAM_POLL, false, STREAM_BATCH)
                    .await
            };
            tokio::pin!(poll);
            // Dropping the poll (the client left, the handler stops) withdraws it;
            // an answer already on its way is handed back by the pool.
            let polled = loop {
                tokio::select! {
                    polled = &mut poll => break polled,
                    _ = heartbeat.tick() => {
                        match chunks.try_send(Bytes::from_static(HEARTBEAT.as_bytes())) {
                            Ok(()) => self.confirm(),
                            // A batch is still waiting to be taken: it stays
                            // unconfirmed, and is as good as a heartbeat.
                            Err(TrySendError::Full(_)) => {}
                            Err(TrySendError::Closed(_)) => return,
                        }
                    }
                    () = chunks.closed() => {
                        debug!("the client went away");
                        return;
                    }
                    () = auth::until(self.expires) => {
                        say_last(&app, chunks, &auth::expired()).await;
                        return;
                    }
                    _ = shutdown.changed() => return,
                }
            };
            let batch = match polled {
                Ok(batch) if batch.is_empty() => {
                    if http::superseded(started.elapsed()) {
                        next_pause = Some(http::SUPERSEDED_PAUSE);
                    }
                    continue;
                }
                Ok(batch) => batch,
                Err(e) => {
                    say_last(&app, chunks, &http::poll_error(e)).await;
                    return;
                }
            };
            let chunk = Bytes::from(events(&batch));
            // Into the channel, and then until hyper took it (there is room again):
            // a batch still in the channel when the client goes was not written.
            let taken = tokio::time::timeout(app.streams.send_timeout, async {
                chunks.send(chunk).await.ok()?;
                chunks.reserve().await.ok().map(drop)
            })
            .await;
            if !matches!(taken, Ok(Some(()))) {
                debug!(count = batch.len(), "the client did not take a batch");
                self.unconfirmed.extend(batch);
                return;
            }
            self.confirm();
            self.unconfirmed = batch;
            heartbeat.reset();
        }
    }

    /// The stream outlived its last batch: that batch is acknowledged.
    fn confirm(&mut self) {
        if self.client_acks {
            self.unconfirmed.clear();
        }
        if self.unconfirmed.is_empty() {
            return;
        }
        let which = AckSelector::Ids(self.unconfirmed.drain(..).map(|m| m.id).collect());
        http::acknowledge_detached(&self.app, &self.session, which);
    }
}

/// Resuming: what the client saw is acknowledged before anything is given.
async fn acknowledge_up_to(app: &App, session: &str, id: MessageId) -> Result<(), X0Error> {
    let ack = ipc::Request::Ack {
        session: session.to_owned(),
        which: AckSelector::UpTo(id),
    };
    match app.core.request(ack).await {
        Ok(ipc::Response::Acked { .. }) => Ok(()),
        Ok(ipc::Response::Error(e)) => Err(e.into()),
        Ok(other) => Err(X0Error::new(
            "InternalError",
            format!("unexpected reply from the core: {other:?}"),
        )),
        Err(e) => Err(http::core_error(e)),
    }
}

/// Writes the error event that ends the stream, if the client still takes it.
async fn say_last(app: &App, chunks: &mpsc::Sender<Bytes>, error: &X0Error) {
    debug!(kind = error.kind, message = %error.message, "event stream ends with an error");
    let event = Bytes::from(error_event(error));
    let _ = tokio::time::timeout(app.streams.send_timeout, chunks.send(event)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_message_is_an_event_with_its_id() {
        let batch = [
            Message {
                id: 17,
                body: r#"{"id":17,"data":{"n":1.50}}"#.into(),
            },
            Message {
                id: 18,
                body: r#"{"k":"x0"}"#.into(),
            },
        ];
        assert_eq!(
            events(&batch),
            "id: 17\nevent: message\ndata: {\"id\":17,\"data\":{\"n\":1.50}}\n\n\
             id: 18\nevent: message\ndata: {\"k\":\"x0\"}\n\n"
        );
        assert_eq!(events(&[]), "");
    }

    #[test]
    fn a_body_with_line_breaks_spans_several_data_lines() {
        let batch = [Message {
            id: 1,
            body: "{\"a\":1,\n \"b\":2,\r\n \"c\":\"x\\ny\"\r}".into(),
        }];
        assert_eq!(
            events(&batch),
            "id: 1\nevent: message\ndata: {\"a\":1,\ndata:  \"b\":2,\ndata:  \"c\":\"x\\ny\"\ndata: }\n\n"
        );
    }

    #[test]
    fn an_error_event_carries_the_json_error_body() {
        let event = error_event(&X0Error::new("Kicked", "kicked: bye"));
        assert_eq!(
            event,
            "event: error\ndata: {\"error\":true,\"exception_id\":\"Kicked\",\"exception\":\"kicked: bye\"}\n\n"
        );
        assert_eq!(PREAMBLE, "retry: 2000\n\n");
        assert_eq!(HEARTBEAT, ": heartbeat\n\n");
    }

    #[test]
    fn the_resume_id_comes_from_the_header_before_the_query() {
        assert_eq!(parse("session=B", None).unwrap(), ("B".into(), None, false));
        assert_eq!(
            parse("session=B&last_event_id=17", None).unwrap(),
            ("B".into(), Some(17), false)
        );
        let header = HeaderValue::from_static(" 18 ");
        assert_eq!(
            parse("session=B&last_event_id=17", Some(&header)).unwrap(),
            ("B".into(), Some(18), false)
        );
        assert_eq!(
            parse("session=B&ack=client", None).unwrap(),
            ("B".into(), None, true)
        );
        assert_eq!(
            parse("session=B&ack=sometimes", None).unwrap_err().kind,
            "InvalidField"
        );
        assert_eq!(parse("", None).unwrap_err().kind, "MissingField");
        assert_eq!(parse("session=", None).unwrap_err().kind, "InvalidField");
        assert_eq!(
            parse("session=B&last_event_id=x", None).unwrap_err().kind,
            "InvalidField"
        );
        let bad = HeaderValue::from_static("abc");
        assert_eq!(
            parse("session=B", Some(&bad)).unwrap_err().kind,
            "InvalidField"
        );
    }
}

#[cfg(test)]
mod socket_tests {
    //! Event streams read off a real socket, in front of a scripted core.

    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use ipc::{ErrorKind, Request as CoreRequest, Response as CoreResponse};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;
    use crate::harness::{
        asked_for, fake_core, given_back, handler, handler_with, read_until, streams,
    };
    use crate::http::Streams;

    fn message(id: MessageId) -> Message {
        Message {
            id,
            body: format!(r#"{{"id":{id}}}"#),
        }
    }

    async fn open_stream(addr: std::net::SocketAddr, target: &str, headers: &str) -> TcpStream {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {target} HTTP/1.1\r\nHost: test\r\n{headers}\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        stream
    }

    fn return_or_ack(request: &CoreRequest) -> bool {
        matches!(
            request,
            CoreRequest::Return { .. } | CoreRequest::Ack { .. }
        )
    }

    #[tokio::test]
    async fn a_stream_resumes_after_the_last_event_id_and_holds_its_last_batch_until_it_outlives_it()
     {
        let (socket, asked) = fake_core(|request| match request {
            CoreRequest::Ack { .. } => Some(CoreResponse::Acked { count: 1 }),
            CoreRequest::Return { .. } => Some(CoreResponse::Done),
            CoreRequest::Poll { .. } => {
                static POLLS: AtomicUsize = AtomicUsize::new(0);
                match POLLS.fetch_add(1, Ordering::Relaxed) {
                    0 => Some(CoreResponse::Messages(vec![message(17)])),
                    1 => Some(CoreResponse::Messages(vec![message(18), message(19)])),
                    _ => None,
                }
            }
            _ => None,
        });
        let h = handler(socket.0.clone(), None).await;
        let mut stream = open_stream(
            h.addr,
            "/v1/events?session=B&last_event_id=3",
            "Last-Event-ID: 16\r\n",
        )
        .await;
        let mut seen = String::new();
        read_until(&mut stream, &mut seen, "id: 19\n").await;
        let head = seen.to_ascii_lowercase();
        for header in [
            "content-type: text/event-stream",
            "cache-control: no-store",
            "x-accel-buffering: no",
            "access-control-allow-origin: *",
            "transfer-encoding: chunked",
        ] {
            assert!(head.contains(header), "{header} in {seen}");
        }
        let retry = seen.find("retry: 2000\n\n").unwrap();
        let first = seen
            .find("id: 17\nevent: message\ndata: {\"id\":17}\n\n")
            .unwrap();
        let second = seen
            .find("id: 18\nevent: message\ndata: {\"id\":18}\n\nid: 19\nevent: message\ndata: {\"id\":19}\n\n")
            .unwrap();
        assert!(retry < first && first < second, "{seen}");
        // The first batch is acknowledged once the second was taken.
        let ids = |which| CoreRequest::Ack {
            session: "B".into(),
            which,
        };
        asked_for(&asked, |r| *r == ids(AckSelector::Ids(vec![17]))).await;
        drop(stream);
        // The second was written last: the stream ended before it outlived it.
        let back = asked_for(&asked, |r| matches!(r, CoreRequest::Return { .. })).await;
        assert_eq!(
            back,
            CoreRequest::Return {
                session: "B".into(),
                messages: vec![message(18), message(19)],
            }
        );
        let asked = asked.lock().unwrap();
        assert_eq!(asked[0], ids(AckSelector::UpTo(16)));
        let polls: Vec<bool> = asked
            .iter()
            .filter_map(|r| match r {
                CoreRequest::Poll { ack_previous, .. } => Some(*ack_previous),
                _ => None,
            })
            .collect();
        assert_eq!(polls, [false, false, false]);
        assert_eq!(asked.iter().filter(|r| return_or_ack(r)).count(), 3);
    }

    #[tokio::test]
    async fn a_refused_stream_ends_with_an_error_event() {
        let (socket, _) = fake_core(|request| match request {
            CoreRequest::Poll { .. } => Some(CoreResponse::error(ErrorKind::Kicked, "kicked: bye")),
            _ => None,
        });
        let h = handler(socket.0.clone(), None).await;
        let mut stream = open_stream(h.addr, "/v1/events?session=K", "Connection: close\r\n").await;
        let mut seen = String::new();
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut seen))
            .await
            .expect("the stream ends")
            .unwrap();
        assert!(
            seen.contains("event: error\ndata: {\"error\":true,\"exception_id\":\"Kicked\",\"exception\":\"kicked: bye\"}\n\n"),
            "{seen}"
        );
        assert!(seen.ends_with("0\r\n\r\n"), "{seen}");
    }

    #[tokio::test]
    async fn a_heartbeat_confirms_the_last_batch_and_a_client_that_leaves_withdraws_its_poll() {
        let (socket, asked) = fake_core(|request| match request {
            CoreRequest::Ack { .. } => Some(CoreResponse::Acked { count: 1 }),
            CoreRequest::Poll { .. } => {
                static POLLS: AtomicUsize = AtomicUsize::new(0);
                match POLLS.fetch_add(1, Ordering::Relaxed) {
                    0 => Some(CoreResponse::Messages(vec![message(5)])),
                    _ => None,
                }
            }
            _ => None,
        });
        let streams = Streams {
            heartbeat: Duration::from_millis(100),
            ..streams()
        };
        let h = handler_with(socket.0.clone(), None, streams).await;
        let mut stream = open_stream(h.addr, "/v1/events?session=I", "").await;
        let mut seen = String::new();
        read_until(&mut stream, &mut seen, ": heartbeat\n\n").await;
        assert!(seen.contains("id: 5\n"), "{seen}");
        asked_for(
            &asked,
            |r| matches!(r, CoreRequest::Ack { which: AckSelector::Ids(ids), .. } if ids == &[5]),
        )
        .await;
        drop(stream);
        asked_for(&asked, |r| matches!(r, CoreRequest::CancelPoll { .. })).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let asked = asked.lock().unwrap();
        assert!(
            !asked
                .iter()
                .any(|r| matches!(r, CoreRequest::Return { .. })),
            "{asked:?}"
        );
    }

    #[tokio::test]
    async fn a_batch_the_client_did_not_take_goes_back() {
        let (socket, asked) = fake_core(|request| match request {
            // Far more than the socket buffers hold: the client never reads.
            CoreRequest::Poll { .. } => {
                static POLLS: AtomicUsize = AtomicUsize::new(0);
                let n = POLLS.fetch_add(1, Ordering::Relaxed) as u64;
                let batch = (0..128)
                    .map(|i| Message {
                        id: n * 1000 + i,
                        body: format!(r#"{{"pad":"{}"}}"#, "x".repeat(64 * 1024)),
                    })
                    .collect();
                Some(CoreResponse::Messages(batch))
            }
            CoreRequest::Return { .. } => Some(CoreResponse::Done),
            _ => None,
        });
        let streams = Streams {
            send_timeout: Duration::from_millis(300),
            ..streams()
        };
        let h = handler_with(socket.0.clone(), None, streams).await;
        let _stream = open_stream(h.addr, "/v1/events?session=Slow", "").await;
        // The batch written (never confirmed: no heartbeat came through) and the one
        // that waited in vain to be taken.
        let mut back = given_back(&asked, "Slow", 256).await;
        back.sort_unstable();
        let expected: Vec<MessageId> = (0..128).chain(1000..1128).collect();
        assert_eq!(back, expected);
    }

    #[tokio::test]
    async fn a_stopping_handler_ends_the_stream_and_a_bad_request_never_starts_one() {
        let (socket, _) = fake_core(|_| None);
        let h = handler(socket.0.clone(), None).await;
        let mut stream = open_stream(h.addr, "/v1/events?session=S", "").await;
        let mut seen = String::new();
        read_until(&mut stream, &mut seen, "retry: 2000\n\n").await;
        h.stop.send(true).unwrap();
        read_until(&mut stream, &mut seen, "0\r\n\r\n").await;
        assert!(!seen.contains("event: error"), "{seen}");

        let missing = h.call("GET", "/v1/events", &[], "").await;
        assert_eq!(missing.refusal(), (400, "MissingField"));
        let bad = h
            .call("GET", "/v1/events?session=S", &["Last-Event-ID: x"], "")
            .await;
        assert_eq!(bad.refusal(), (400, "InvalidField"));
        let post = h.call("POST", "/v1/events?session=S", &[], "").await;
        assert_eq!(post.refusal(), (405, "MethodNotAllowed"));
    }
}
