//! The I/O shell around the broker: accepts handler connections, speaks the
//! handshake, and shuttles frames between sockets and the single broker task.
//!
//! One task owns the [`Broker`], so routing needs no locks; each connection has a
//! reader task (frames in) and a writer task (frames out). The broker never waits
//! on a connection: replies go into the connection's queue, whose size is bounded
//! by the number of requests that connection may have in flight.
//!
//! With durable storage, the records of each burst of requests go to the journal
//! thread, and the burst's replies wait until the journal reports them written as
//! the fsync policy asks: no client hears "ok" about a change that a crash could
//! still undo, and no message is delivered before it is stored.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use ipc::link::{self, LinkWriter};
use ipc::{
    AdminRequest, ClientFrame, ErrorKind, FrameCodec, Hello, Request, Response, Role, ServerFrame,
    StorageStatus, Welcome,
};
use tokio::net::UnixListener;
use tokio::net::UnixStream;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::codec::{FramedRead, FramedWrite};
use tracing::{Instrument, debug, info, info_span, trace, warn};

use crate::broker::{Broker, ConnId, Reply, ReplyTo};
use crate::config::FsyncPolicy;
use crate::journal::{Journal, Seq};
use crate::socket::{AdminPolicy, PeerPolicy};

/// Who owns the state behind the sockets. Built once per process, so the size of
/// the embedded broker inline costs nothing.
#[allow(clippy::large_enum_variant)]
pub enum Engine {
    /// The broker in this process, with its log when durable.
    Embedded {
        broker: Broker,
        journal: Option<Journal>,
    },
    /// Redis, shared with the other cores of a cluster (`backend = "redis"`).
    Redis(crate::cluster::Settings),
}

/// Settings of the shell itself (the broker has its own).
#[derive(Debug, Clone)]
pub struct ShellConfig {
    /// Who may connect to the main socket (handlers).
    pub peers: PeerPolicy,
    /// Who may connect to the admin socket (operators).
    pub admin_peers: AdminPolicy,
    /// Both paths, to tell a peer at the wrong one where to go.
    pub socket: std::path::PathBuf,
    pub admin_socket: std::path::PathBuf,
    /// Requests one connection may have unanswered; parked polls count.
    pub max_in_flight: usize,
    /// A connection that sends nothing (not even a heartbeat) for this long is dropped.
    pub heartbeat_timeout: Duration,
    pub sweep_interval: Duration,
    /// Where and how messages are stored; `None`: in memory only. Whether the
    /// core is durable is told to handlers in the handshake.
    pub storage: Option<StorageSettings>,
    /// Whether what the core accepts survives its restart (a data directory, or
    /// Redis), told to handlers in the handshake.
    pub durable: bool,
}

/// What an operator's status shows of durable storage.
#[derive(Debug, Clone)]
pub struct StorageSettings {
    pub data_dir: std::path::PathBuf,
    pub fsync: FsyncPolicy,
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest handshake frame read: a `Hello` is a dozen bytes, and a peer is
/// allowed `MAX_FRAME_LEN` only once it said who it is.
const HANDSHAKE_MAX_LEN: usize = 256;
/// How long a peer the credentials check refused gets to send its handshake, so
/// that it reads why it was refused instead of a reset connection.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);

/// Which of the core's two sockets a connection came in on. The socket, not what
/// the peer says about itself, decides what it may ask: the admin socket is
/// reachable only by operators (file mode and peer check), the main one by
/// msghandler's user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Door {
    Main,
    Admin,
}
/// How long a stopping core waits for its last replies to reach the handlers.
const FINAL_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// What connection tasks tell the broker task (or the Redis backend's engine).
pub(crate) enum Event {
    Connected {
        conn: ConnId,
        door: Door,
        replies: mpsc::UnboundedSender<ServerFrame>,
    },
    Request {
        from: ReplyTo,
        request: Request,
    },
    Closed {
        conn: ConnId,
    },
    /// Stop taking new work, answer what is parked, persist everything, stop.
    Shutdown,
}

/// Serves until `shutdown` turns true, then stops cleanly: parked polls are told,
/// everything pending is persisted, and the last replies are written out.
pub async fn serve(
    listener: UnixListener,
    admin_listener: UnixListener,
    engine: Engine,
    config: ShellConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let config = Arc::new(config);
    // Bounded: when the broker falls behind, connection readers stop reading and the
    // handlers feel it, instead of this queue growing.
    let (events, inbox) = mpsc::channel(4096);
    let broker_task = match engine {
        Engine::Embedded { broker, journal } => {
            tokio::spawn(run_broker(broker, journal, inbox, config.clone()))
        }
        Engine::Redis(settings) => {
            tokio::spawn(crate::cluster::run(settings, inbox, config.clone()))
        }
    };
    let (stop_connections, stopping) = watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    let mut next_conn: ConnId = 0;
    loop {
        let (accepted, door) = tokio::select! {
            accepted = listener.accept() => (accepted, Door::Main),
            accepted = admin_listener.accept() => (accepted, Door::Admin),
            _ = shutdown.changed() => break,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                warn!(error = %e, ?door, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let cred = match stream.peer_cred() {
            Ok(cred) => cred,
            Err(e) => {
                warn!(error = %e, "cannot read peer credentials; closing");
                continue;
            }
        };
        let refusal = match door {
            Door::Main => (!config.peers.allows(cred.uid(), cred.gid())).then(|| {
                format!(
                    "uid {} gid {} is not allowed on this socket (allowed_uids, allowed_gids)",
                    cred.uid(),
                    cred.gid()
                )
            }),
            Door::Admin => (!config.admin_peers.allows(cred.uid()))
                .then(|| config.admin_peers.refusal(cred.uid())),
        };
        if let Some(reason) = refusal {
            warn!(uid = cred.uid(), gid = cred.gid(), pid = ?cred.pid(), ?door, "peer not allowed; refusing");
            // Its own task: a peer that never sends its handshake holds up nobody.
            tokio::spawn(refuse(stream, reason));
            continue;
        }
        next_conn += 1;
        let span = info_span!("conn", id = next_conn, pid = ?cred.pid(), uid = cred.uid(), ?door);
        connections.spawn(
            connection(
                stream,
                door,
                next_conn,
                events.clone(),
                config.clone(),
                stopping.clone(),
            )
            .instrument(span),
        );
    }
    drop(listener);
    drop(admin_listener);
    let _ = events.send(Event::Shutdown).await;
    drop(events);
    if broker_task.await.is_err() {
        warn!("the broker task failed during shutdown");
    }
    // The broker has persisted everything and queued its last replies; the
    // connections now stop reading and write those out.
    let _ = stop_connections.send(true);
    let _ = tokio::time::timeout(FINAL_WRITE_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
}

/// One open connection as the broker task sees it.
pub(crate) struct Link {
    pub(crate) replies: mpsc::UnboundedSender<ServerFrame>,
    /// Only to count handlers apart from operators in a status.
    pub(crate) door: Door,
}

pub(crate) type Links = HashMap<ConnId, Link>;

async fn run_broker(
    mut broker: Broker,
    mut journal: Option<Journal>,
    mut inbox: mpsc::Receiver<Event>,
    config: Arc<ShellConfig>,
) {
    let mut connections: Links = HashMap::new();
    let mut out: Vec<Reply> = Vec::new();
    // Replies waiting for their burst's records to be written, oldest first.
    let mut held: VecDeque<(Seq, Vec<Reply>)> = VecDeque::new();
    let mut sent: Seq = 0;
    let mut done: Seq = 0;
    let mut done_rx = journal.as_ref().map(|j| j.done.clone());
    let mut sweep = tokio::time::interval(config.sweep_interval);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // One timer, re-armed only when the broker's next deadline changes, rather than a
    // fresh sleep per loop turn.
    let far_future = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
    let timer = tokio::time::sleep_until(far_future);
    tokio::pin!(timer);
    let mut armed: Option<Instant> = None;
    let mut stopping = false;
    let mut swept = false;
    loop {
        tokio::select! {
            event = inbox.recv(), if !stopping => {
                let Some(event) = event else { break };
                let now = Instant::now();
                let shell = Shell { config: &config, journal: journal.as_ref() };
                stopping |= apply(&mut broker, &mut connections, &shell, now, event, &mut out);
                // Take whatever else is already queued before routing replies: one
                // wake-up, one clock read, one journal write and one flush per burst.
                while !stopping && let Ok(event) = inbox.try_recv() {
                    stopping |= apply(&mut broker, &mut connections, &shell, now, event, &mut out);
                }
            }
            changed = async { done_rx.as_mut().expect("guarded").changed().await }, if done_rx.is_some() => {
                if changed.is_err() {
                    break; // the journal thread is gone: it stops the process
                }
                done = *done_rx.as_mut().expect("guarded").borrow_and_update();
            }
            () = &mut timer, if armed.is_some() => {
                armed = None;
                broker.tick(Instant::now(), &mut out);
            }
            _ = sweep.tick() => {
                broker.sweep(Instant::now(), &mut out);
                trace!(stats = ?broker.stats(), "swept");
                swept = true;
            }
        }
        if let Some(journal) = journal.as_mut() {
            sent = journal.append(broker.take_journal());
            // After the append, so that the snapshot covers every record sent.
            if std::mem::take(&mut swept)
                && journal.compaction_worth_checking()
                && journal.compaction_due(broker.stored_bytes())
            {
                journal.compact(broker.snapshot());
            }
        }
        if sent > done && !out.is_empty() {
            held.push_back((sent, std::mem::take(&mut out)));
        }
        while held.front().is_some_and(|(seq, _)| *seq <= done) {
            let (_, replies) = held.pop_front().expect("checked");
            route(&connections, replies);
        }
        route(&connections, out.drain(..));
        if stopping {
            break;
        }
        let next = broker.next_deadline();
        if next != armed {
            armed = next;
            let at = next.map_or(far_future, tokio::time::Instant::from_std);
            timer.as_mut().reset(at);
        }
    }
    // A clean stop: handlers are told first (id 0 is never a request's), so they
    // send nothing new here; parked polls are told to go elsewhere, requests still
    // queued are refused (the handlers retry them on the next core), and everything
    // is fsynced whatever the policy before the last replies go out.
    for link in connections.values() {
        let _ = link.replies.send(ServerFrame {
            id: 0,
            response: Response::error(ErrorKind::ShuttingDown, "the message server is stopping"),
        });
    }
    broker.shutdown(&mut out);
    route(&connections, out.drain(..));
    inbox.close();
    while let Some(event) = inbox.recv().await {
        if let Event::Request {
            from,
            request: request @ Request::Return { .. },
        } = event
        {
            // Messages a handler could not pass on: taken back, so the flush below
            // stores them, instead of refused and lost.
            broker.handle(Instant::now(), from, request, &mut out);
            continue;
        }
        if let Event::Request { from, .. } = event {
            route(
                &connections,
                [Reply {
                    to: from,
                    response: Response::error(
                        ErrorKind::ShuttingDown,
                        "the message server is stopping",
                    ),
                }],
            );
        }
    }
    if let Some(journal) = journal.as_mut() {
        journal.append(broker.take_journal());
        journal.close().await;
        info!("storage flushed and closed");
    }
    for (_, replies) in held.drain(..) {
        route(&connections, replies);
    }
    route(&connections, out.drain(..));
}

/// Hands replies to their connections' writers.
fn route(connections: &Links, replies: impl IntoIterator<Item = Reply>) {
    for reply in replies {
        if let Some(link) = connections.get(&reply.to.conn) {
            // A send fails only while the connection is closing; its Closed event
            // follows and releases what it parked.
            let _ = link.replies.send(ServerFrame {
                id: reply.to.request,
                response: reply.response,
            });
        }
    }
}

/// What the shell knows that the broker does not, for an operator's status.
struct Shell<'a> {
    config: &'a ShellConfig,
    journal: Option<&'a Journal>,
}

impl Shell<'_> {
    /// The broker's status with the connections and storage added.
    fn status(&self, broker: &Broker, connections: &Links, now: Instant) -> Response {
        let mut status = broker.status(now);
        status.handler_connections = connections
            .values()
            .filter(|link| link.door == Door::Main)
            .count() as u64;
        status.storage = self.config.storage.as_ref().map(|storage| StorageStatus {
            data_dir: storage.data_dir.display().to_string(),
            log_bytes: self.journal.map_or(0, Journal::disk_bytes),
            fsync: format!("{:?}", storage.fsync).to_lowercase(),
        });
        Response::Status(Box::new(status))
    }
}

/// Applies one event; returns whether it was the signal to stop.
fn apply(
    broker: &mut Broker,
    connections: &mut Links,
    shell: &Shell<'_>,
    now: Instant,
    event: Event,
    out: &mut Vec<Reply>,
) -> bool {
    match event {
        Event::Connected {
            conn,
            door,
            replies,
        } => {
            connections.insert(conn, Link { replies, door });
        }
        Event::Request {
            from,
            request: Request::Admin(AdminRequest::Status),
        } => {
            let response = shell.status(broker, connections, now);
            out.push(Reply { to: from, response });
        }
        Event::Request {
            from,
            request: Request::Metrics,
        } => {
            // Here rather than in the broker: the storage half is the journal's,
            // which the broker (sans-I/O) knows nothing about.
            let mut metrics = broker.metrics();
            metrics.storage = shell.journal.map(Journal::metrics);
            out.push(Reply {
                to: from,
                response: Response::Metrics(Box::new(metrics)),
            });
        }
        Event::Request { from, request } => broker.handle(now, from, request, out),
        Event::Closed { conn } => {
            connections.remove(&conn);
            broker.connection_closed(now, conn, out);
        }
        Event::Shutdown => return true,
    }
    false
}

/// Reads the refused peer's handshake (if it comes soon) and answers it with the
/// reason, so that the peer can say why instead of seeing a closed connection.
async fn refuse(stream: UnixStream, reason: String) {
    let Ok(socket) = link::Link::from_tokio(stream) else {
        return;
    };
    let (read_half, write_half) = socket.into_split();
    let mut reader = FramedRead::new(
        read_half,
        FrameCodec::<Hello, Welcome>::with_max_frame_len(HANDSHAKE_MAX_LEN),
    );
    let mut writer = FramedWrite::new(write_half, FrameCodec::<Hello, Welcome>::new());
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, reader.next()).await;
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, writer.send(Welcome::Refused { reason })).await;
}

/// Why a peer in `role` may not use `door`, if it may not.
fn misplaced_role(door: Door, role: Role, config: &ShellConfig) -> Option<String> {
    match (door, role) {
        (Door::Main, Role::Handler) | (Door::Admin, Role::Admin) => None,
        (Door::Main, Role::Admin) => Some(format!(
            "the admin role is served on the admin socket {}, not on the main socket {}",
            config.admin_socket.display(),
            config.socket.display()
        )),
        (Door::Admin, Role::Handler) => Some(format!(
            "handlers connect to the main socket {}, not to the admin socket {}",
            config.socket.display(),
            config.admin_socket.display()
        )),
    }
}

/// The operator's requests: served on the admin socket and only there.
fn is_operator_request(request: &Request) -> bool {
    matches!(request, Request::DeadLetters(_) | Request::Admin(_))
}

/// Why `request` is refused on `door`, if it is.
fn misplaced_request(door: Door, request: &Request, config: &ShellConfig) -> Option<String> {
    match (door, is_operator_request(request)) {
        (Door::Main, true) => Some(format!(
            "operator requests are served on the admin socket {} only",
            config.admin_socket.display()
        )),
        (Door::Admin, false) => Some(format!(
            "the admin socket serves operator requests only; handlers use {}",
            config.socket.display()
        )),
        _ => None,
    }
}

async fn connection(
    stream: UnixStream,
    door: Door,
    conn: ConnId,
    events: mpsc::Sender<Event>,
    config: Arc<ShellConfig>,
    mut stopping: watch::Receiver<bool>,
) {
    let socket = match link::Link::from_tokio(stream) {
        Ok(socket) => socket,
        Err(e) => {
            warn!(error = %e, "cannot take over the accepted socket; closing");
            return;
        }
    };
    let (read_half, write_half) = socket.into_split();
    let mut reader = FramedRead::new(
        read_half,
        FrameCodec::<Hello, Welcome>::with_max_frame_len(HANDSHAKE_MAX_LEN),
    );
    let mut writer = FramedWrite::new(write_half, FrameCodec::<Hello, Welcome>::new());

    let hello = match tokio::time::timeout(HANDSHAKE_TIMEOUT, reader.next()).await {
        Ok(Some(Ok(hello))) => hello,
        Ok(Some(Err(e))) => {
            let reason = format!("malformed handshake: {e}");
            warn!(%reason, "refusing peer");
            let _ = writer.send(Welcome::Refused { reason }).await;
            return;
        }
        Ok(None) => return,
        Err(_) => {
            warn!("no handshake within {HANDSHAKE_TIMEOUT:?}; closing");
            return;
        }
    };
    if let Some(reason) = hello
        .refusal()
        .or_else(|| misplaced_role(door, hello.role, &config))
    {
        warn!(%reason, "refusing peer");
        let _ = writer.send(Welcome::Refused { reason }).await;
        return;
    }
    if writer
        .send(Welcome::Accepted {
            version: ipc::PROTOCOL_VERSION,
            durable: config.durable,
        })
        .await
        .is_err()
    {
        return;
    }
    info!(role = ?hello.role, "peer connected");

    let mut reader = reader.map_decoder(|c| {
        let mut c = c.retype::<ClientFrame, ServerFrame>();
        c.set_max_frame_len(ipc::MAX_FRAME_LEN);
        c
    });
    let writer = writer.map_encoder(|c| c.retype::<ClientFrame, ServerFrame>());
    let (replies, outbox) = mpsc::unbounded_channel();
    if events
        .send(Event::Connected {
            conn,
            door,
            replies: replies.clone(),
        })
        .await
        .is_err()
    {
        return;
    }
    let permits = Arc::new(Semaphore::new(config.max_in_flight));
    let write_task = tokio::spawn(write_frames(writer, outbox, permits.clone()));

    loop {
        let next = tokio::select! {
            next = tokio::time::timeout(config.heartbeat_timeout, reader.next()) => next,
            _ = stopping.changed() => break,
        };
        let frame = match next {
            Ok(Some(Ok(frame))) => frame,
            Ok(Some(Err(e))) => {
                warn!(error = %e, "dropping connection after a bad frame");
                break;
            }
            Ok(None) => break,
            Err(_) => {
                warn!(
                    "no frame or heartbeat for {:?}; dropping a hung peer",
                    config.heartbeat_timeout
                );
                break;
            }
        };
        if frame.request == Request::Ping {
            // Answered here so that a heartbeat measures the connection, not the
            // broker's queue, and never waits for an in-flight slot.
            let _ = replies.send(ServerFrame {
                id: frame.id,
                response: Response::Pong,
            });
            continue;
        }
        let Ok(permit) = permits.acquire().await else {
            break;
        };
        permit.forget(); // given back by the writer once the reply is out
        if let Some(reason) = misplaced_request(door, &frame.request, &config) {
            // Also a reply the writer counts, hence after taking its permit.
            let _ = replies.send(ServerFrame {
                id: frame.id,
                response: Response::error(ErrorKind::InvalidRequest, reason),
            });
            continue;
        }
        let from = ReplyTo {
            conn,
            request: frame.id,
        };
        let event = Event::Request {
            from,
            request: frame.request,
        };
        if events.send(event).await.is_err() {
            break;
        }
    }
    let _ = events.send(Event::Closed { conn }).await;
    drop(replies);
    // Whatever is queued still goes out: a stopping core routes its last replies
    // (x0 mode has already deleted what they carry) just before this loop ends,
    // and may end it by closing the event channel before the stop signal comes.
    // The writer ends once the broker drops its sender, or fails on a peer that is
    // gone; a peer that stopped reading gets a bound.
    let mut write_task = write_task;
    if tokio::time::timeout(FINAL_WRITE_TIMEOUT, &mut write_task)
        .await
        .is_err()
    {
        write_task.abort();
    }
    info!("peer disconnected");
}

async fn write_frames(
    mut writer: FramedWrite<LinkWriter, FrameCodec<ClientFrame, ServerFrame>>,
    mut outbox: mpsc::UnboundedReceiver<ServerFrame>,
    permits: Arc<Semaphore>,
) {
    while let Some(frame) = outbox.recv().await {
        let mut answered = 0;
        let mut batch = Some(frame);
        // Write everything queued, then flush once.
        while let Some(frame) = batch.take().or_else(|| outbox.try_recv().ok()) {
            if frame.response != Response::Pong {
                answered += 1;
            }
            if let Err(e) = writer.feed(frame).await {
                debug!(error = %e, "write failed");
                return;
            }
        }
        if let Err(e) = writer.flush().await {
            debug!(error = %e, "flush failed");
            return;
        }
        permits.add_permits(answered);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shell() -> ShellConfig {
        ShellConfig {
            peers: PeerPolicy::new(&crate::config::ServerConfig::default(), 0),
            admin_peers: AdminPolicy::new(0, &[]),
            socket: "/run/m/core.sock".into(),
            admin_socket: "/run/m/core-admin.sock".into(),
            max_in_flight: 1,
            heartbeat_timeout: Duration::from_secs(1),
            sweep_interval: Duration::from_secs(1),
            storage: None,
            durable: false,
        }
    }

    #[test]
    fn each_role_is_accepted_on_its_own_socket_only_and_told_where_to_go() {
        let config = shell();
        assert_eq!(misplaced_role(Door::Main, Role::Handler, &config), None);
        assert_eq!(misplaced_role(Door::Admin, Role::Admin, &config), None);
        let admin_on_main = misplaced_role(Door::Main, Role::Admin, &config).unwrap();
        assert!(
            admin_on_main.contains("/run/m/core-admin.sock"),
            "{admin_on_main}"
        );
        let handler_on_admin = misplaced_role(Door::Admin, Role::Handler, &config).unwrap();
        assert!(
            handler_on_admin.contains("main socket /run/m/core.sock"),
            "{handler_on_admin}"
        );
    }

    #[test]
    fn operator_requests_are_served_on_the_admin_socket_only() {
        let config = shell();
        let operator = Request::DeadLetters(ipc::DeadLetterOp::List { limit: 1 });
        let handler = Request::Presence {
            channel: "c".into(),
        };
        assert_eq!(misplaced_request(Door::Admin, &operator, &config), None);
        assert_eq!(misplaced_request(Door::Main, &handler, &config), None);
        let refused = misplaced_request(Door::Main, &operator, &config).unwrap();
        assert!(
            refused.contains("admin socket /run/m/core-admin.sock"),
            "{refused}"
        );
        assert!(misplaced_request(Door::Admin, &handler, &config).is_some());
        let admin = Request::Admin(AdminRequest::Drain { draining: true });
        assert_eq!(misplaced_request(Door::Admin, &admin, &config), None);
        assert!(misplaced_request(Door::Main, &admin, &config).is_some());
    }
}
