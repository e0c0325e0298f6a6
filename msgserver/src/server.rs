//! The I/O shell around the broker: accepts handler connections, speaks the
//! handshake, and shuttles frames between sockets and the single broker task.
//!
//! One task owns the [`Broker`], so routing needs no locks; each connection has a
//! reader task (frames in) and a writer task (frames out). The broker never waits
//! on a connection: replies go into the connection's queue, whose size is bounded
//! by the number of requests that connection may have in flight.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use ipc::{ClientFrame, FrameCodec, Hello, Request, Response, ServerFrame, Welcome};
use tokio::net::UnixListener;
use tokio::net::UnixStream;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::codec::{FramedRead, FramedWrite};
use tracing::{Instrument, debug, info, info_span, trace, warn};

use crate::broker::{Broker, ConnId, Reply, ReplyTo};
use crate::socket::PeerPolicy;

/// Settings of the shell itself (the broker has its own).
#[derive(Debug, Clone)]
pub struct ShellConfig {
    pub peers: PeerPolicy,
    /// Requests one connection may have unanswered; parked polls count.
    pub max_in_flight: usize,
    /// A connection that sends nothing (not even a heartbeat) for this long is dropped.
    pub heartbeat_timeout: Duration,
    pub sweep_interval: Duration,
}

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// What connection tasks tell the broker task.
enum Event {
    Connected {
        conn: ConnId,
        replies: mpsc::UnboundedSender<ServerFrame>,
    },
    Request {
        from: ReplyTo,
        request: Request,
    },
    Closed {
        conn: ConnId,
    },
}

/// Serves until `shutdown` turns true.
pub async fn serve(
    listener: UnixListener,
    broker: Broker,
    config: ShellConfig,
    mut shutdown: watch::Receiver<bool>,
) {
    let config = Arc::new(config);
    // Bounded: when the broker falls behind, connection readers stop reading and the
    // handlers feel it, instead of this queue growing.
    let (events, inbox) = mpsc::channel(4096);
    let broker_task = tokio::spawn(run_broker(broker, inbox, config.sweep_interval));
    let mut next_conn: ConnId = 0;
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let cred = match stream.peer_cred() {
            Ok(cred) => cred,
            Err(e) => {
                warn!(error = %e, "cannot read peer credentials; closing");
                continue;
            }
        };
        if !config.peers.allows(cred.uid(), cred.gid()) {
            warn!(uid = cred.uid(), gid = cred.gid(), pid = ?cred.pid(), "peer not allowed; closing");
            continue;
        }
        next_conn += 1;
        let span = info_span!("conn", id = next_conn, pid = ?cred.pid(), uid = cred.uid());
        tokio::spawn(
            connection(stream, next_conn, events.clone(), config.clone()).instrument(span),
        );
    }
    drop(events);
    broker_task.abort();
}

async fn run_broker(
    mut broker: Broker,
    mut inbox: mpsc::Receiver<Event>,
    sweep_interval: Duration,
) {
    let mut connections: HashMap<ConnId, mpsc::UnboundedSender<ServerFrame>> = HashMap::new();
    let mut out: Vec<Reply> = Vec::new();
    let mut sweep = tokio::time::interval(sweep_interval);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // One timer, re-armed only when the broker's next deadline changes, rather than a
    // fresh sleep per loop turn.
    let far_future = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
    let timer = tokio::time::sleep_until(far_future);
    tokio::pin!(timer);
    let mut armed: Option<Instant> = None;
    loop {
        tokio::select! {
            event = inbox.recv() => {
                let Some(event) = event else { break };
                let now = Instant::now();
                apply(&mut broker, &mut connections, now, event, &mut out);
                // Take whatever else is already queued before routing replies: one
                // wake-up, one clock read and one flush per burst.
                while let Ok(event) = inbox.try_recv() {
                    apply(&mut broker, &mut connections, now, event, &mut out);
                }
            }
            () = &mut timer, if armed.is_some() => {
                armed = None;
                broker.tick(Instant::now(), &mut out);
            }
            _ = sweep.tick() => {
                broker.sweep(Instant::now());
                trace!(stats = ?broker.stats(), "swept");
            }
        }
        for reply in out.drain(..) {
            if let Some(conn) = connections.get(&reply.to.conn) {
                // A send fails only while the connection is closing; its Closed event
                // follows and releases what it parked.
                let _ = conn.send(ServerFrame {
                    id: reply.to.request,
                    response: reply.response,
                });
            }
        }
        let next = broker.next_deadline();
        if next != armed {
            armed = next;
            let at = next.map_or(far_future, tokio::time::Instant::from_std);
            timer.as_mut().reset(at);
        }
    }
}

fn apply(
    broker: &mut Broker,
    connections: &mut HashMap<ConnId, mpsc::UnboundedSender<ServerFrame>>,
    now: Instant,
    event: Event,
    out: &mut Vec<Reply>,
) {
    match event {
        Event::Connected { conn, replies } => {
            connections.insert(conn, replies);
        }
        Event::Request { from, request } => broker.handle(now, from, request, out),
        Event::Closed { conn } => {
            connections.remove(&conn);
            broker.connection_closed(conn);
        }
    }
}

async fn connection(
    stream: UnixStream,
    conn: ConnId,
    events: mpsc::Sender<Event>,
    config: Arc<ShellConfig>,
) {
    let (read_half, write_half) = stream.into_split();
    let mut reader = FramedRead::new(read_half, FrameCodec::<Hello, Welcome>::new());
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
    if let Some(reason) = hello.refusal() {
        warn!(%reason, "refusing peer");
        let _ = writer.send(Welcome::Refused { reason }).await;
        return;
    }
    if writer
        .send(Welcome::Accepted {
            version: ipc::PROTOCOL_VERSION,
        })
        .await
        .is_err()
    {
        return;
    }
    info!(role = ?hello.role, "peer connected");

    let mut reader = reader.map_decoder(|c| c.retype::<ClientFrame, ServerFrame>());
    let writer = writer.map_encoder(|c| c.retype::<ClientFrame, ServerFrame>());
    let (replies, outbox) = mpsc::unbounded_channel();
    if events
        .send(Event::Connected {
            conn,
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
        let frame = match tokio::time::timeout(config.heartbeat_timeout, reader.next()).await {
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
    write_task.abort();
    info!("peer disconnected");
}

async fn write_frames(
    mut writer: FramedWrite<tokio::net::unix::OwnedWriteHalf, FrameCodec<ClientFrame, ServerFrame>>,
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
