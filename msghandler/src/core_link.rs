//! The handler's side of the IPC socket: a small pool of persistent, multiplexed
//! connections to msgserver that reconnect on their own.
//!
//! Many requests share one connection, each tagged with an id; a reader task hands
//! every reply to whoever waits for that id, in whatever order replies come. A
//! supervisor per connection slot reconnects with jittered backoff whenever the core
//! goes away, so msghandler outlives any number of core restarts.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use ipc::link::{Link, LinkReader, LinkWriter};
use ipc::{
    ClientFrame, ErrorKind, FrameCodec, Hello, Message, Request, RequestId, Response, Role,
    ServerFrame, Welcome,
};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, TryAcquireError, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::codec::{FramedRead, FramedWrite};
use tracing::{debug, info, warn};

use crate::metrics::LinkMetrics;

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum CoreError {
    #[error("the message server is not reachable")]
    Unavailable,
    #[error("the connection to the message server was lost before it answered")]
    ConnectionLost,
}

/// Why a poll brought no messages back.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PollError {
    #[error(transparent)]
    Core(#[from] CoreError),
    /// The core refused the poll: the session was kicked, or the request was bad.
    #[error("{}", .0.message)]
    Refused(ipc::Error),
}

/// How long past a poll's timeout the handler still waits for the core's answer.
const POLL_MARGIN: Duration = Duration::from_millis(500);

/// How long a stopping handler waits for the core to take and answer what it sent.
const FLUSH_WAIT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub socket: PathBuf,
    pub connections: usize,
    pub max_in_flight: usize,
    pub heartbeat_interval: Duration,
    pub core_wait: Duration,
}

pub struct CorePool {
    config: PoolConfig,
    /// Each slot holds its live connection, if any. A std lock: it is held only to
    /// clone or swap an `Arc`, never across an await.
    slots: Vec<RwLock<Option<Arc<CoreConnection>>>>,
    next_slot: AtomicUsize,
    /// Woken whenever a slot (re)connects, for requests waiting out an outage.
    connected: Notify,
    key_prefix: u64,
    key_counter: AtomicU64,
    /// This pool's worker alone writes them (one pool per worker).
    metrics: Arc<LinkMetrics>,
}

impl CorePool {
    /// Creates the pool and starts connecting in the background.
    pub fn start(config: PoolConfig) -> Arc<Self> {
        let slots = (0..config.connections.max(1))
            .map(|_| RwLock::new(None))
            .collect();
        let pool = Arc::new(CorePool {
            config,
            slots,
            next_slot: AtomicUsize::new(0),
            connected: Notify::new(),
            key_prefix: fastrand::u64(..),
            key_counter: AtomicU64::new(0),
            metrics: Arc::default(),
        });
        for slot in 0..pool.slots.len() {
            tokio::spawn(supervise(pool.clone(), slot));
        }
        pool
    }

    /// Sends one request and waits for its reply. Waits up to `core_wait` for a
    /// connection if none is up; never retries a request that may have been applied.
    pub async fn request(&self, request: Request) -> Result<Response, CoreError> {
        let deadline = Instant::now() + self.config.core_wait;
        let conn = self
            .connection(deadline)
            .await
            .ok_or(CoreError::Unavailable)?;
        let sent = std::time::Instant::now();
        let reply = conn.call(request, None).await?.wait().await;
        self.metrics.round_trip.observe(sent.elapsed());
        reply
    }

    /// What this pool counts, for the metrics.
    pub fn metrics(&self) -> &Arc<LinkMetrics> {
        &self.metrics
    }

    /// Whether a core connection is up and answers a ping within `within`: what
    /// `/readyz` reports. The ping goes through the connection's reader at the
    /// core, so this says the socket and the core's task serving it are alive.
    pub async fn ping(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let answered = async {
            let conn = self.connection(deadline).await?;
            let reply = conn.call(Request::Ping, None).await.ok()?.wait().await;
            Some(matches!(reply, Ok(Response::Pong)))
        };
        matches!(
            tokio::time::timeout_at(deadline, answered).await,
            Ok(Some(true))
        )
    }

    /// Publishes an x0 SET, retried as [`Self::send_keyed`] says.
    pub async fn publish(
        &self,
        src: String,
        dst: String,
        body: String,
        key: Option<String>,
    ) -> Result<Response, CoreError> {
        self.send_keyed(key, |key| Request::Publish {
            src: src.clone(),
            dst: dst.clone(),
            body: body.clone(),
            key,
        })
        .await
    }

    /// Routes a `/v1` message, retried as [`Self::send_keyed`] says.
    pub async fn send(&self, mut send: ipc::Send) -> Result<Response, CoreError> {
        let key = send.key.take();
        self.send_keyed(key, |key| send_request(&send, key)).await
    }

    /// Routes several `/v1` messages, pipelined on one connection: the core takes
    /// them in the order given, and the whole batch costs about one round trip. Each
    /// message gets its own answer, as if sent alone; one that has to be retried (its
    /// connection was lost under a key, or a stopping core refused it) is retried on
    /// its own, after the rest, as [`Self::send_keyed`] retries.
    pub async fn send_batch(&self, sends: Vec<ipc::Send>) -> Vec<Result<Response, CoreError>> {
        let deadline = Instant::now() + self.config.core_wait;
        let Some(conn) = self.connection(deadline).await else {
            return sends.iter().map(|_| Err(CoreError::Unavailable)).collect();
        };
        let mut replies = Vec::with_capacity(sends.len());
        let mut keyed = Vec::with_capacity(sends.len());
        // In chunks the in-flight bound can hold at once, taken as one permit, so that
        // a batch can neither wait on its own permits nor be overtaken inside a chunk.
        let chunk_len = self.config.max_in_flight.clamp(1, sends.len().max(1));
        let mut sends = sends.into_iter().peekable();
        while sends.peek().is_some() {
            let chunk: Vec<_> = sends.by_ref().take(chunk_len).collect();
            let sent = std::time::Instant::now();
            let permits = conn
                .in_flight
                .clone()
                .acquire_many_owned(chunk.len() as u32)
                .await;
            let mut calls = Vec::with_capacity(chunk.len());
            for mut send in chunk {
                let mut key = send.key.take();
                if key.is_none() && conn.durable {
                    key = Some(self.next_key());
                }
                let call = match &permits {
                    Ok(_) => conn.enqueue(send_request(&send, key.clone())),
                    Err(_) => Err(CoreError::ConnectionLost),
                };
                calls.push(call);
                keyed.push((key, send));
            }
            for call in calls {
                replies.push(match call {
                    Ok(reply) => reply.await.map_err(|_| CoreError::ConnectionLost),
                    Err(e) => Err(e),
                });
            }
            self.metrics.round_trip.observe(sent.elapsed());
        }
        let mut answers = Vec::with_capacity(replies.len());
        for (reply, (key, send)) in replies.into_iter().zip(keyed) {
            answers.push(if should_retry(&reply, key.is_some()) {
                self.send_keyed(key, |key| send_request(&send, key)).await
            } else {
                finished(reply)
            });
        }
        answers
    }

    /// Sends a message built by `request` around its idempotency key, retrying on
    /// the next core within `core_wait` when the core went away before answering. A
    /// retry is safe only under a key: the client's, or for a durable core one made
    /// here (a memory-only core that restarted has lost the first copy anyway, so it
    /// gets none and no retry after a lost connection). A message refused with
    /// `ShuttingDown` was not carried out and is always retried.
    async fn send_keyed(
        &self,
        mut key: Option<String>,
        request: impl Fn(Option<String>) -> Request,
    ) -> Result<Response, CoreError> {
        let deadline = Instant::now() + self.config.core_wait;
        loop {
            let conn = self
                .connection(deadline)
                .await
                .ok_or(CoreError::Unavailable)?;
            if key.is_none() && conn.durable {
                key = Some(self.next_key());
            }
            let sent = std::time::Instant::now();
            let reply = match conn.call(request(key.clone()), None).await {
                Ok(call) => call.wait().await,
                Err(e) => Err(e),
            };
            self.metrics.round_trip.observe(sent.elapsed());
            if !should_retry(&reply, key.is_some()) || Instant::now() >= deadline {
                return finished(reply);
            }
            debug!(?key, "retrying a message on the next core");
            // Let the supervisor notice the dead connection before picking again.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A key unique to this handler process: a random prefix chosen at start and a
    /// counter. Short, since the core remembers it for its dedup window.
    fn next_key(&self) -> String {
        let n = self.key_counter.fetch_add(1, Ordering::Relaxed);
        format!("~{:x}.{n:x}", self.key_prefix)
    }

    /// Long-polls `session` for up to `timeout`, for at most `max` messages (0: all
    /// ready). A poll has no side effect until it is answered, so when a connection
    /// drops mid-poll it is re-issued on the next one: the browser sees one
    /// uninterrupted poll across a core restart. A refusal (a kicked session, a bad
    /// request) is the caller's to pass on.
    pub async fn poll(
        &self,
        session: &str,
        timeout: Duration,
        ack_previous: bool,
        max: u32,
    ) -> Result<Vec<Message>, PollError> {
        self.poll_waiting(session, timeout, ack_previous, max, timeout)
            .await
    }

    /// As [`Self::poll`], but when no core is reachable for `core_wait` it fails with
    /// [`CoreError::Unavailable`] instead of waiting out the whole poll. For the
    /// streams, whose polls are long and whose clients are better told (and sent
    /// to reconnect) than held on a dead core; an HTTP long-poll is answered empty
    /// at its timeout either way.
    pub async fn poll_for_stream(
        &self,
        session: &str,
        timeout: Duration,
        ack_previous: bool,
        max: u32,
    ) -> Result<Vec<Message>, PollError> {
        let wait = self.config.core_wait;
        self.poll_waiting(session, timeout, ack_previous, max, wait)
            .await
    }

    /// The poll, waiting at most `wait` at a time for a core connection.
    async fn poll_waiting(
        &self,
        session: &str,
        timeout: Duration,
        ack_previous: bool,
        max: u32,
        wait: Duration,
    ) -> Result<Vec<Message>, PollError> {
        let deadline = Instant::now() + timeout;
        let _parked = Parked::count(&self.metrics);
        loop {
            let connect_by = deadline.min(Instant::now() + wait);
            let Some(conn) = self.connection(connect_by).await else {
                return Err(CoreError::Unavailable.into());
            };
            // As `call` does, but the request is made once the permit is there: a
            // future that held it while waiting for the permit would be the
            // largest state of this one, which a parked poll holds for its wait.
            let _permit = match conn.permit().await {
                Ok(permit) => permit,
                Err(CoreError::ConnectionLost) => continue,
                Err(e) => return Err(e.into()),
            };
            let remaining = deadline.saturating_duration_since(Instant::now());
            let request = Request::Poll {
                session: session.to_owned(),
                timeout_ms: remaining.as_millis() as u64,
                ack_previous,
                max,
            };
            let (id, reply) = match conn.register(request, Some(session)) {
                Ok(registered) => registered,
                Err(CoreError::ConnectionLost) => continue,
                Err(e) => return Err(e.into()),
            };
            let mut guard = CancelOnDrop {
                conn: &conn,
                poll: id,
                session,
                reply,
                armed: true,
            };
            // A core that does not answer in time (hung, or its answer stuck behind
            // a full socket) must not hold the browser past the poll's own timeout;
            // the margin lets a punctual core's empty answer win the race, so that
            // an ordinary timeout costs no CancelPoll.
            let waited = tokio::time::timeout_at(deadline + POLL_MARGIN, &mut guard.reply).await;
            let Ok(reply) = waited.map(|r| r.map_err(|_| CoreError::ConnectionLost)) else {
                debug!(
                    session,
                    "the core did not answer a poll in time; withdrawing it"
                );
                return Ok(Vec::new());
            };
            guard.armed = false;
            match reply {
                Ok(Response::Messages(messages)) => return Ok(messages),
                // The core is stopping: park again on the next one.
                Ok(Response::Error(e)) if e.kind == ErrorKind::ShuttingDown => {
                    // Boxed: rare, and a timer is as large as the parked state.
                    Box::pin(tokio::time::sleep(Duration::from_millis(10))).await;
                    continue;
                }
                Ok(Response::Error(e)) => return Err(PollError::Refused(e)),
                Ok(other) => {
                    warn!(?other, "unexpected reply to a poll");
                    return Ok(Vec::new());
                }
                Err(CoreError::ConnectionLost) if Instant::now() < deadline => continue,
                Err(CoreError::ConnectionLost) => return Ok(Vec::new()),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Hands messages that were given for `session` but never reached its client
    /// back to the core, which gives them again at once (in `ack` delivery mode
    /// instead of after the visibility timeout; in `x0` mode instead of never).
    pub async fn give_back(&self, session: &str, mut messages: Vec<Message>) {
        // What a stream holds can be far more than one frame may carry (a window of
        // 1024 large messages), so it goes back in parts.
        const PART_BYTES: usize = ipc::MAX_FRAME_LEN / 4;
        while !messages.is_empty() {
            let mut bytes = 0;
            let part_len = messages
                .iter()
                .take_while(|m| {
                    bytes += m.body.len() + 64;
                    bytes <= PART_BYTES
                })
                .count()
                .max(1);
            let rest = messages.split_off(part_len);
            self.give_back_part(session, messages).await;
            messages = rest;
        }
    }

    async fn give_back_part(&self, session: &str, messages: Vec<Message>) {
        let count = messages.len();
        let request = Request::Return {
            session: session.to_owned(),
            messages,
        };
        match self.request(request).await {
            Ok(Response::Done) => debug!(session, count, "gave unacknowledged messages back"),
            // A kicked session's messages are gone anyway.
            Ok(Response::Error(e)) => {
                debug!(session, count, error = %e.message, "the core refused them back");
            }
            Ok(other) => warn!(?other, "unexpected reply to a return"),
            Err(e) => warn!(
                session,
                count,
                error = %e,
                "could not give messages back; they come again after the core's visibility timeout, or not at all in x0 delivery mode"
            ),
        }
    }

    /// For a stop: sends what each live connection has queued (the withdrawals of
    /// the polls answered null), waits for the core's answer to every poll still
    /// open, and sends the hand-backs those answers caused. A poll withdrawn while
    /// the core's answer with messages was already on its way gets them all the
    /// same; handed back, they wait in the core for the next process instead of
    /// being lost with this one. Bounded by [`FLUSH_WAIT`] in all.
    pub async fn flush(&self) {
        let deadline = Instant::now() + FLUSH_WAIT;
        let live: Vec<_> = self
            .slots
            .iter()
            .filter_map(|s| s.read().unwrap().clone())
            .collect();
        for conn in live {
            conn.written(deadline).await;
            conn.polls_answered(deadline).await;
            conn.written(deadline).await;
        }
    }

    /// A live connection, waiting for one until `deadline` if none is up.
    async fn connection(&self, deadline: Instant) -> Option<Arc<CoreConnection>> {
        if let Some(conn) = self.pick() {
            return Some(conn);
        }
        // Waiting for a connection is rare; boxed, its state does not swell the
        // future of every request, a parked poll's above all, for its whole life.
        Box::pin(self.connection_awaited(deadline)).await
    }

    async fn connection_awaited(&self, deadline: Instant) -> Option<Arc<CoreConnection>> {
        loop {
            // Registered before looking, so a connect in between is not missed.
            let notified = self.connected.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(conn) = self.pick() {
                return Some(conn);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    fn pick(&self) -> Option<Arc<CoreConnection>> {
        let n = self.slots.len();
        let start = self.next_slot.fetch_add(1, Ordering::Relaxed);
        (0..n).find_map(|i| self.slots[(start + i) % n].read().unwrap().clone())
    }
}

/// The request for a `/v1` message (its key taken out) under `key`.
fn send_request(send: &ipc::Send, key: Option<String>) -> Request {
    Request::Send(Box::new(ipc::Send {
        key,
        ..send.clone()
    }))
}

/// Whether a message's answer says it was not carried out and may be sent again:
/// its connection went away under a key, or a stopping core refused it.
fn should_retry(reply: &Result<Response, CoreError>, keyed: bool) -> bool {
    match reply {
        Err(CoreError::ConnectionLost) => keyed,
        Ok(Response::Error(e)) => e.kind == ErrorKind::ShuttingDown,
        _ => false,
    }
}

/// A message's last answer as its caller sees it: a core that stopped under it is one
/// that was not there.
fn finished(reply: Result<Response, CoreError>) -> Result<Response, CoreError> {
    match reply {
        Ok(Response::Error(e)) if e.kind == ErrorKind::ShuttingDown => Err(CoreError::Unavailable),
        other => other,
    }
}

/// Holds a poll's place in the parked-polls gauge while it waits, however the
/// wait ends (an answer, a timeout, or the HTTP request going away).
struct Parked<'a>(&'a LinkMetrics);

impl<'a> Parked<'a> {
    fn count(metrics: &'a LinkMetrics) -> Self {
        metrics.parked_polls.fetch_add(1, Ordering::Relaxed);
        Parked(metrics)
    }
}

impl Drop for Parked<'_> {
    fn drop(&mut self) {
        self.0.parked_polls.fetch_sub(1, Ordering::Relaxed);
    }
}

enum Outgoing {
    Frame(ClientFrame),
    Flush(oneshot::Sender<()>),
}

struct Pending {
    reply: oneshot::Sender<Response>,
    /// Set for polls: messages whose browser went away are handed back to the core.
    poll_session: Option<String>,
}

struct CoreConnection {
    /// The core stores messages durably (said in its handshake).
    durable: bool,
    outbox: mpsc::UnboundedSender<Outgoing>,
    /// Waiting callers by request id. A std lock: held for one map operation.
    pending: Mutex<HashMap<RequestId, Pending>>,
    next_id: AtomicU64,
    /// Bounds unanswered requests (parked polls included) so a slow core pushes
    /// back on the HTTP side instead of this map growing without limit.
    in_flight: Arc<Semaphore>,
}

/// A request on the wire; `wait` yields its reply.
struct Call {
    reply: oneshot::Receiver<Response>,
    _permit: OwnedSemaphorePermit,
}

impl Call {
    async fn wait(self) -> Result<Response, CoreError> {
        self.reply.await.map_err(|_| CoreError::ConnectionLost)
    }
}

/// Withdraws a parked poll whose HTTP request went away (browser closed the tab,
/// handler shutting down) so the core does not hand it messages nobody will read.
struct CancelOnDrop<'a> {
    conn: &'a CoreConnection,
    poll: RequestId,
    session: &'a str,
    reply: oneshot::Receiver<Response>,
    armed: bool,
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        if self.armed {
            // Closed first: an answer not yet here is then refused and handed back
            // by dispatch; one already here is handed back now.
            self.reply.close();
            match self.reply.try_recv() {
                Ok(Response::Messages(messages)) if !messages.is_empty() => {
                    self.conn.send_unanswered(Request::Return {
                        session: self.session.to_owned(),
                        messages,
                    });
                }
                Ok(_) => {}
                Err(_) => self
                    .conn
                    .send_unanswered(Request::CancelPoll { poll: self.poll }),
            }
        }
    }
}

impl CoreConnection {
    async fn call(&self, request: Request, poll_session: Option<&str>) -> Result<Call, CoreError> {
        let permit = self.permit().await?;
        let (_, reply) = self.register(request, poll_session)?;
        Ok(Call {
            reply,
            _permit: permit,
        })
    }

    /// A permit for one more request in flight, at once while `max_in_flight` is
    /// not reached. Waiting for one is boxed, as in [`CorePool::connection`].
    async fn permit(&self) -> Result<OwnedSemaphorePermit, CoreError> {
        match self.in_flight.clone().try_acquire_owned() {
            Ok(permit) => Ok(permit),
            Err(TryAcquireError::Closed) => Err(CoreError::ConnectionLost),
            Err(TryAcquireError::NoPermits) => Box::pin(self.in_flight.clone().acquire_owned())
                .await
                .map_err(|_| CoreError::ConnectionLost),
        }
    }

    /// Queues a request whose in-flight permit the caller holds.
    fn enqueue(&self, request: Request) -> Result<oneshot::Receiver<Response>, CoreError> {
        self.register(request, None).map(|(_, reply)| reply)
    }

    fn register(
        &self,
        request: Request,
        poll_session: Option<&str>,
    ) -> Result<(RequestId, oneshot::Receiver<Response>), CoreError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(
            id,
            Pending {
                reply: tx,
                poll_session: poll_session.map(str::to_owned),
            },
        );
        if self
            .outbox
            .send(Outgoing::Frame(ClientFrame { id, request }))
            .is_err()
        {
            self.pending.lock().unwrap().remove(&id);
            return Err(CoreError::ConnectionLost);
        }
        Ok((id, rx))
    }

    /// Waits until everything queued so far is written to the socket, or `deadline`.
    async fn written(&self, deadline: Instant) {
        let (done, flushed) = oneshot::channel();
        if self.outbox.send(Outgoing::Flush(done)).is_ok() {
            let _ = tokio::time::timeout_at(deadline, flushed).await;
        }
    }

    /// Waits until the core has answered every poll sent on this connection (or
    /// the connection is gone), or `deadline`. Only a stop waits for this, so a
    /// short sleep between looks is simpler than a notification on every answer.
    async fn polls_answered(&self, deadline: Instant) {
        let open = || {
            let pending = self.pending.lock().unwrap();
            pending.values().any(|p| p.poll_session.is_some())
        };
        while open() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Fire-and-forget: the core's reply is read and dropped.
    fn send_unanswered(&self, request: Request) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let _ = self
            .outbox
            .send(Outgoing::Frame(ClientFrame { id, request }));
    }

    fn dispatch(&self, frame: ServerFrame) {
        let Some(pending) = self.pending.lock().unwrap().remove(&frame.id) else {
            return; // a heartbeat or fire-and-forget reply
        };
        let Err(response) = pending.reply.send(frame.response) else {
            return;
        };
        // Nobody waits any more: the HTTP request was dropped while the answer was on
        // its way. Messages in it would be lost, so they go back to the core.
        if let (Response::Messages(messages), Some(session)) = (response, pending.poll_session)
            && !messages.is_empty()
        {
            debug!(%session, count = messages.len(), "returning undeliverable messages");
            self.send_unanswered(Request::Return { session, messages });
        }
    }
}

async fn supervise(pool: Arc<CorePool>, slot: usize) {
    const MIN_BACKOFF: Duration = Duration::from_millis(50);
    const MAX_BACKOFF: Duration = Duration::from_secs(1);
    let mut backoff = MIN_BACKOFF;
    let mut failing = false;
    loop {
        match connect(&pool.config).await {
            Ok((reader, writer, durable)) => {
                if failing || slot == 0 {
                    info!(slot, socket = %pool.config.socket.display(), "connected to msgserver");
                }
                failing = false;
                backoff = MIN_BACKOFF;
                run_connection(&pool, slot, reader, writer, durable).await;
                warn!(slot, "connection to msgserver lost; reconnecting");
            }
            Err(e) => {
                if !failing {
                    warn!(slot, socket = %pool.config.socket.display(), error = %e, "cannot reach msgserver; retrying");
                    failing = true;
                }
            }
        }
        let jitter = backoff.mul_f64(fastrand::f64() * 0.5);
        tokio::time::sleep(backoff + jitter).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

type Reader = FramedRead<LinkReader, FrameCodec<ServerFrame, ClientFrame>>;
type Writer = FramedWrite<LinkWriter, FrameCodec<ServerFrame, ClientFrame>>;

/// A connection after the handshake, and whether its core is durable.
async fn connect(config: &PoolConfig) -> anyhow::Result<(Reader, Writer, bool)> {
    let (read_half, write_half) = Link::connect(&config.socket).await?.into_split();
    let mut reader = FramedRead::new(read_half, FrameCodec::<Welcome, Hello>::new());
    let mut writer = FramedWrite::new(write_half, FrameCodec::<Welcome, Hello>::new());
    writer.send(Hello::new(Role::Handler)).await?;
    let welcome = tokio::time::timeout(Duration::from_secs(5), reader.next())
        .await
        .map_err(|_| anyhow::anyhow!("no handshake reply within 5 s"))?
        .ok_or_else(|| anyhow::anyhow!("the core closed the connection during the handshake"))??;
    match welcome {
        Welcome::Accepted { durable, .. } => Ok((
            reader.map_decoder(FrameCodec::retype),
            writer.map_encoder(FrameCodec::retype),
            durable,
        )),
        Welcome::Refused { reason } => Err(anyhow::anyhow!("the core refused us: {reason}")),
    }
}

async fn run_connection(
    pool: &CorePool,
    slot: usize,
    mut reader: Reader,
    writer: Writer,
    durable: bool,
) {
    let (outbox, queued) = mpsc::unbounded_channel();
    let conn = Arc::new(CoreConnection {
        durable,
        outbox,
        pending: Mutex::new(HashMap::new()),
        // 0 is the heartbeat's id.
        next_id: AtomicU64::new(1),
        in_flight: Arc::new(Semaphore::new(pool.config.max_in_flight.max(1))),
    });
    let write_task = tokio::spawn(write_frames(writer, queued));
    *pool.slots[slot].write().unwrap() = Some(conn.clone());
    pool.connected.notify_waiters();

    let interval = pool.config.heartbeat_interval;
    let mut heartbeat = tokio::time::interval(interval);
    let silence_limit = interval * 3;
    let mut last_heard = Instant::now();
    loop {
        tokio::select! {
            frame = reader.next() => match frame {
                Some(Ok(frame)) => {
                    last_heard = Instant::now();
                    if frame.id == 0 && matches!(&frame.response, Response::Error(e) if e.kind == ErrorKind::ShuttingDown) {
                        // The core is stopping: send nothing new here, but keep reading
                        // the replies it still owes.
                        info!(slot, "msgserver is stopping");
                        *pool.slots[slot].write().unwrap() = None;
                        continue;
                    }
                    conn.dispatch(frame);
                }
                Some(Err(e)) => {
                    warn!(slot, error = %e, "bad frame from msgserver");
                    break;
                }
                None => break,
            },
            _ = heartbeat.tick() => {
                if last_heard.elapsed() > silence_limit {
                    warn!(slot, "msgserver missed three heartbeats; dropping the connection");
                    break;
                }
                let ping = ClientFrame { id: 0, request: Request::Ping };
                if conn.outbox.send(Outgoing::Frame(ping)).is_err() {
                    break;
                }
            }
        }
    }
    *pool.slots[slot].write().unwrap() = None;
    // Closing the semaphore fails callers that wait for a slot on this connection;
    // clearing the map fails those waiting for a reply. Polls among them re-issue.
    conn.in_flight.close();
    conn.pending.lock().unwrap().clear();
    write_task.abort();
}

async fn write_frames(mut writer: Writer, mut queued: mpsc::UnboundedReceiver<Outgoing>) {
    while let Some(first) = queued.recv().await {
        let mut next = Some(first);
        let mut flushed = Vec::new();
        // Write everything queued, then flush once.
        while let Some(item) = next.take().or_else(|| queued.try_recv().ok()) {
            match item {
                Outgoing::Frame(frame) => {
                    if let Err(e) = writer.feed(frame).await {
                        debug!(error = %e, "write to msgserver failed");
                        return;
                    }
                }
                Outgoing::Flush(done) => flushed.push(done),
            }
        }
        if let Err(e) = writer.flush().await {
            debug!(error = %e, "flush to msgserver failed");
            return;
        }
        for done in flushed {
            let _ = done.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::harness::{self, Asked};
    use ipc::Request as CoreRequest;

    /// Answers a poll with one message, 200 ms after it came: long enough for the
    /// test to withdraw the poll first, so the answer crosses the withdrawal.
    fn late_answer(request: &CoreRequest) -> Option<(u64, Response)> {
        match request {
            CoreRequest::Poll { .. } => Some((
                200,
                Response::Messages(vec![Message {
                    id: 7,
                    body: r#"{"late":true}"#.into(),
                }]),
            )),
            _ => Some((0, Response::Done)),
        }
    }

    #[test]
    fn a_stop_hands_back_what_a_withdrawn_poll_was_given_before_the_process_ends() {
        // The core on a runtime of its own, so that it outlives the handler's.
        let core_runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let (socket, asked): (_, Asked) =
            core_runtime.block_on(async { harness::fake_core_delayed(late_answer) });

        let handler_runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        handler_runtime.block_on(async {
            let pool = CorePool::start(PoolConfig {
                socket: socket.0.clone(),
                connections: 1,
                max_in_flight: 16,
                heartbeat_interval: Duration::from_secs(5),
                core_wait: Duration::from_secs(5),
            });
            let polling = pool.clone();
            let poll =
                tokio::spawn(
                    async move { polling.poll("tab", Duration::from_secs(10), true, 0).await },
                );
            harness::asked_for(&asked, |r| matches!(r, CoreRequest::Poll { .. })).await;
            // What a stop does to a parked poll: its HTTP request is answered null
            // and the poll dropped, then the pool is flushed and the process ends.
            poll.abort();
            let _ = poll.await;
            pool.flush().await;
        });
        // The process ends here: nothing of the handler runs any more.
        drop(handler_runtime);

        core_runtime.block_on(async {
            let ids = harness::given_back(&asked, "tab", 1).await;
            assert_eq!(ids, [7], "the message the withdrawn poll was given is lost");
        });
    }
}
