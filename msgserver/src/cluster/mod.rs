//! The Redis backend: several cores, on one host or many, share their sessions,
//! mailboxes and routing through one Redis, so that a message published through
//! any msghandler+msgserver pair reaches a session polling on any other.
//!
//! Redis is the state. Every routing and delivery rule runs inside Redis as one
//! atomic function of the library in `micromsg.lua` (mailboxes are streams with a
//! consumer group, whose pending-entry list is what was given and not yet
//! acknowledged); a core holds no message at all. What stays here is what must
//! stay near the connections: parked polls, which a publish wakes through a pub/sub
//! channel per core (`<prefix>:wake:<node>`), their timeouts, and what went out on
//! each handler connection, put back in line if that handler goes away.
//!
//! Failure behaviour: a call that Redis does not answer within `redis_timeout` is
//! answered [`ErrorKind::StoreUnavailable`]; the connection reconnects by itself and
//! parked polls are retried when the wake-up channel is back. Nothing answered "ok"
//! is lost as long as Redis keeps its data (`appendonly yes`, `appendfsync always`:
//! docs/CLUSTER.md).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use ipc::{
    AckSelector, AdminRequest, CoreMetrics, CoreStatus, DeadLetter, DeadLetterOp, ErrorKind,
    Message, PeekedMessage, Present, Request, Response, ServerFrame, SessionSummary, StorageStatus,
    Target,
};
use redis::Value;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

use crate::broker::{
    BrokerConfig, ConnId, DeliveryMode, OverflowPolicy, ReplyTo, acting_session, envelope_parts,
    kicked_error, object,
};
use crate::routing::{self, ChannelSettings, Pattern};
use crate::server::{Door, Event, Link, Links, ShellConfig};

/// The library, loaded into Redis by every core at connect (FUNCTION LOAD REPLACE).
const LIBRARY: &str = include_str!("micromsg.lua");

/// How often a core that cannot reach Redis tries again.
const RECONNECT_PAUSE: Duration = Duration::from_millis(500);
/// How soon a poll whose call failed is tried again.
const POLL_RETRY: Duration = Duration::from_secs(1);

/// The settings of the Redis backend (`backend = "redis"` in msgserver.toml).
#[derive(Debug, Clone)]
pub struct Settings {
    pub url: String,
    /// Every key starts with it, so that several clusters can share a Redis.
    pub prefix: String,
    /// A call Redis does not answer within this fails its request.
    pub timeout: Duration,
    /// This core's name among those sharing the prefix.
    pub node: String,
    pub broker: BrokerConfig,
}

impl Settings {
    /// The URL without a password, for logs and the operator's status.
    pub fn redacted_url(&self) -> String {
        match redis::parse_redis_url(&self.url) {
            Some(mut url) if url.password().is_some() => {
                let _ = url.set_password(Some("****"));
                url.to_string()
            }
            _ => self.url.clone(),
        }
    }

    /// The settings every core writes into Redis for the functions to read; all
    /// cores of a cluster must agree on them.
    fn shared(&self) -> Vec<(&'static str, String)> {
        let b = &self.broker;
        let ms = |d: Duration| d.as_millis().to_string();
        vec![
            (
                "mode",
                match b.delivery {
                    DeliveryMode::X0 => "x0",
                    DeliveryMode::Ack => "ack",
                }
                .into(),
            ),
            ("max_len", b.mailbox_max_len.to_string()),
            (
                "overflow",
                match b.overflow {
                    OverflowPolicy::DropOldest => "drop_oldest",
                    OverflowPolicy::Reject => "reject",
                }
                .into(),
            ),
            ("ttl_ms", b.message_ttl.map_or("0".into(), ms)),
            ("vis_ms", ms(b.visibility_timeout)),
            ("max_deliveries", b.max_deliveries.to_string()),
            ("dedup_ms", ms(b.dedup_window)),
            ("session_ms", ms(b.session_timeout)),
            ("kick_ms", ms(b.kick_retention)),
            ("max_reply_ms", ms(b.max_reply_ttl)),
            ("max_payload", b.max_payload_bytes.to_string()),
            ("idle_ms", ms(b.idle_mailbox_timeout)),
            (
                "prioritised",
                if b.channels.iter().any(|c| c.priority != 0) {
                    "1"
                } else {
                    "0"
                }
                .into(),
            ),
        ]
    }
}

/// Why a call failed, as the client hears it.
#[derive(Debug)]
struct StoreError {
    kind: ErrorKind,
    message: String,
}

impl StoreError {
    fn unavailable(message: impl Into<String>) -> Self {
        StoreError {
            kind: ErrorKind::StoreUnavailable,
            message: message.into(),
        }
    }

    fn response(&self) -> Response {
        Response::error(self.kind, self.message.clone())
    }
}

/// The shared connection to Redis, set once the first connect succeeds; the
/// manager reconnects by itself after that.
#[derive(Clone)]
struct Store {
    conn: watch::Receiver<Option<ConnectionManager>>,
    settings: Arc<Settings>,
}

impl Store {
    fn fcall(&self, function: &str) -> redis::Cmd {
        let mut cmd = redis::cmd("FCALL");
        cmd.arg(function).arg(0).arg(&self.settings.prefix);
        cmd
    }

    async fn run(&self, cmd: &redis::Cmd) -> Result<Value, StoreError> {
        // A core that has not reached Redis yet (it just started) holds the request
        // for as long as a slow Redis would, instead of refusing it at once.
        let mut first = self.conn.clone();
        let ready = first.wait_for(Option::is_some);
        let mut conn = match tokio::time::timeout(self.settings.timeout, ready).await {
            Ok(Ok(conn)) => conn.clone().expect("waited for"),
            _ => {
                return Err(StoreError::unavailable(format!(
                    "the message store (Redis at {}) is not reachable yet; retry",
                    self.settings.redacted_url()
                )));
            }
        };
        for attempt in 0..2 {
            let call = cmd.query_async::<Value>(&mut conn);
            match tokio::time::timeout(self.settings.timeout, call).await {
                Err(_) => {
                    return Err(StoreError::unavailable(format!(
                        "the message store (Redis) did not answer within {:?}; retry",
                        self.settings.timeout
                    )));
                }
                Ok(Ok(value)) => return Ok(value),
                Ok(Err(e)) if attempt == 0 && needs_setup(&e) => {
                    // Redis lost its functions or settings (restarted without
                    // persistence, or flushed): load them again and retry once.
                    warn!(error = %e, "Redis lacks micromsg's functions or settings; loading them");
                    setup(&mut conn, &self.settings).await.map_err(classify)?;
                }
                Ok(Err(e)) => return Err(classify(e)),
            }
        }
        unreachable!("the loop returns")
    }
}

fn needs_setup(e: &redis::RedisError) -> bool {
    let text = e.to_string();
    text.contains("NOINIT") || text.to_lowercase().contains("function not found")
}

fn classify(e: redis::RedisError) -> StoreError {
    let text = e.to_string();
    if text.contains("OOM") {
        // Redis is at maxmemory (noeviction): the cluster's bound on what it holds.
        return StoreError {
            kind: ErrorKind::Overloaded,
            message:
                "the message store (Redis) is full (maxmemory); nothing was stored, retry later"
                    .into(),
        };
    }
    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError) {
        // A function failed: a bug, not an outage. Logged in full, answered briefly.
        error!(error = %e, "a micromsg function failed in Redis");
    } else {
        debug!(error = %e, "Redis call failed");
    }
    StoreError::unavailable(format!("the message store (Redis) failed: {text}; retry"))
}

/// Loads the library and writes this core's settings, warning when another core
/// wrote different ones.
async fn setup(conn: &mut ConnectionManager, settings: &Settings) -> redis::RedisResult<()> {
    redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(LIBRARY)
        .query_async::<Value>(conn)
        .await?;
    let shared = settings.shared();
    let mut cmd = redis::cmd("FCALL");
    cmd.arg("mm1_init").arg(0).arg(&settings.prefix);
    for (key, value) in &shared {
        cmd.arg(*key).arg(value);
    }
    let before = items(cmd.query_async::<Value>(conn).await?);
    let before: HashMap<String, String> = before
        .chunks(2)
        .filter(|pair| pair.len() == 2)
        .map(|pair| (text(&pair[0]), text(&pair[1])))
        .collect();
    for (key, value) in &shared {
        if let Some(old) = before.get(*key)
            && old != value
        {
            warn!(
                setting = key,
                this_core = %value,
                before = %old,
                "another core of this cluster runs with a different setting; they must agree"
            );
        }
    }
    Ok(())
}

/// Says so, at every connect, when Redis is set up to lose what micromsg answered
/// "ok" for (docs/CLUSTER.md, "What Redis must be configured with"). Only a warning:
/// a managed Redis may hide INFO, and the operator may have chosen it.
async fn warn_of_loss(conn: &mut ConnectionManager) {
    let info: redis::InfoDict = match redis::cmd("INFO")
        .arg("memory")
        .arg("persistence")
        .query_async(conn)
        .await
    {
        Ok(info) => info,
        Err(e) => {
            warn!(error = %e, "cannot read Redis's INFO to check its eviction and persistence settings");
            return;
        }
    };
    if let Some(policy) = info.get::<String>("maxmemory_policy")
        && policy != "noeviction"
    {
        warn!(
            maxmemory_policy = %policy,
            "Redis evicts keys when full: accepted messages can be dropped silently; \
             set maxmemory-policy noeviction"
        );
    }
    if info.get::<u64>("maxmemory") == Some(0) {
        warn!(
            "Redis has no maxmemory: nothing bounds what the cluster holds \
             (max_sessions and max_queued_bytes do not apply to the Redis backend)"
        );
    }
    if info.get::<String>("aof_enabled").as_deref() == Some("0") {
        warn!(
            "Redis keeps no append-only file: what it holds is lost when it restarts; \
             set appendonly yes"
        );
    }
}

// Decoding what the functions return.

fn items(value: Value) -> Vec<Value> {
    match value {
        Value::Array(items) | Value::Set(items) => items,
        Value::Nil => Vec::new(),
        other => vec![other],
    }
}

fn text(value: &Value) -> String {
    match value {
        Value::BulkString(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        Value::Okay => "OK".into(),
        _ => String::new(),
    }
}

/// The text of a body: bodies are UTF-8 JSON that went in as such.
fn body(value: Value) -> String {
    match value {
        Value::BulkString(bytes) => String::from_utf8(bytes)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into()),
        other => text(&other),
    }
}

fn int(value: &Value) -> u64 {
    match value {
        Value::Int(i) => (*i).max(0) as u64,
        other => text(other).parse().unwrap_or(0),
    }
}

/// A function's answer: its status word and the rest.
fn answer(value: Value) -> (String, Vec<Value>) {
    let mut all = items(value);
    if all.is_empty() {
        return (String::new(), all);
    }
    let status = text(&all.remove(0));
    (status, all)
}

fn num(values: &[Value], i: usize) -> u64 {
    values.get(i).map_or(0, int)
}

fn full_error(ready: u64, who: &str) -> Response {
    Response::error(
        ErrorKind::MailboxFull,
        format!("the mailbox of session {who:?} holds {ready} undelivered messages, its limit"),
    )
}

fn unexpected(function: &str, status: &str) -> Response {
    error!(
        function,
        status, "unexpected answer from a micromsg function"
    );
    Response::error(
        ErrorKind::StoreUnavailable,
        format!("the message store gave an unexpected answer ({status:?}) to {function}"),
    )
}

/// What the counters learn from an answer besides the response itself.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    delivered: u64,
    acknowledged: u64,
    redelivered: u64,
    expired: u64,
    dead_lettered: u64,
}

#[derive(Debug, Default)]
struct Counters {
    published: u64,
    dropped: u64,
    tally: Tally,
    refused: [u64; ErrorKind::ALL.len()],
}

impl Counters {
    fn answered(&mut self, response: &Response) {
        match response {
            Response::Published {
                dropped, duplicate, ..
            }
            | Response::Sent {
                dropped, duplicate, ..
            } => {
                if !duplicate {
                    self.published += 1;
                }
                self.dropped += u64::from(*dropped);
            }
            Response::Acked { count } => self.tally.acknowledged += u64::from(*count),
            Response::Error(e) => self.refused[e.kind as usize] += 1,
            _ => {}
        }
    }

    fn add(&mut self, tally: Tally) {
        self.tally.delivered += tally.delivered;
        self.tally.acknowledged += tally.acknowledged;
        self.tally.redelivered += tally.redelivered;
        self.tally.expired += tally.expired;
        self.tally.dead_lettered += tally.dead_lettered;
    }
}

/// What a poll function call came back with.
enum Polled {
    Messages(Vec<Message>, Tally),
    Parked { due_ms: u64, acknowledged: u64 },
    Kicked,
    Superseded,
}

/// A poll this core holds for a handler.
struct Parked {
    session: String,
    token: String,
    deadline: Instant,
    /// When a message given out becomes due again (ack mode): poll again then.
    due: Option<Instant>,
    max: u32,
    /// A call for it is out; its outcome decides.
    in_call: bool,
    /// Woken while a call was out: call again when it comes back parked.
    woken: bool,
    /// Withdrawn (CancelPoll, superseded here, or its connection closed) while a
    /// call was out: messages it brings are handed back to Redis.
    cancelled: bool,
    /// Its last call failed (Redis unreachable): tried again shortly, and this is
    /// the answer at its deadline if Redis stays away. Held rather than answered
    /// at once, so that a client that polls again at once (x0's) does not spin.
    failed: Option<Response>,
    /// A call registered it in Redis: later calls resume it (and never acknowledge
    /// again); until then they are the first poll again, acknowledging as asked.
    registered: bool,
    ack_previous: bool,
}

/// What the tasks that talk to Redis report to the engine's loop.
enum Done {
    Reply {
        to: ReplyTo,
        response: Response,
    },
    Poll {
        to: ReplyTo,
        session: String,
        token: String,
        outcome: Result<Polled, StoreError>,
    },
}

/// What the wake-up subscription reports.
enum Wake {
    /// Poll again for this session ("w" + session).
    Session(String),
    /// A publish took these messages for the poll with this token ("m" + JSON).
    Delivered {
        token: String,
        session: String,
        messages: Vec<Message>,
    },
    /// (Re)subscribed: wake-ups may have been missed meanwhile.
    Listening,
}

impl Wake {
    fn parse(payload: &[u8]) -> Option<Wake> {
        match payload.split_first()? {
            (b'w', session) => Some(Wake::Session(String::from_utf8_lossy(session).into())),
            (b'm', json) => {
                let fields: Vec<String> = serde_json::from_slice(json).ok()?;
                let mut fields = fields.into_iter();
                let (token, session) = (fields.next()?, fields.next()?);
                let mut messages = Vec::new();
                while let (Some(id), Some(body)) = (fields.next(), fields.next()) {
                    messages.push(Message {
                        id: id.parse().ok()?,
                        body,
                    });
                }
                Some(Wake::Delivered {
                    token,
                    session,
                    messages,
                })
            }
            _ => None,
        }
    }
}

/// Messages given out on one connection in ack mode, kept for the visibility
/// timeout so that they can be put back in line at once if that handler goes away.
struct GivenOut {
    at: Instant,
    session: String,
    ids: Vec<u64>,
}

struct Engine {
    store: Store,
    settings: Arc<Settings>,
    /// This process among the cluster's cores: `<node>.<start time>`, so that a
    /// core restarted under the same name is not taken for the one that died. Its
    /// polls are woken on `<prefix>:wake:<member>`, it reads mailboxes as the
    /// consumer of that name, and the other cores take that subscription for the
    /// sign that it lives.
    member: Arc<str>,
    started: Instant,
    links: Links,
    parked: HashMap<ReplyTo, Parked>,
    /// The poll parked here for each session (at most one: a newer one ends it).
    by_session: HashMap<String, ReplyTo>,
    /// Deadlines and due times, checked lazily against `parked`.
    timers: BTreeMap<(Instant, u64), ReplyTo>,
    timer_seq: u64,
    nonce: u64,
    given_out: HashMap<ConnId, VecDeque<GivenOut>>,
    counters: Counters,
    draining: bool,
    done_tx: mpsc::UnboundedSender<Done>,
    last_presence_refresh: Instant,
}

/// Runs the Redis backend in place of the broker task: takes the connections'
/// events until the shell says stop.
pub(crate) async fn run(
    settings: Settings,
    mut inbox: mpsc::Receiver<Event>,
    shell: Arc<ShellConfig>,
) {
    let settings = Arc::new(settings);
    let client = match redis::Client::open(settings.url.as_str()) {
        Ok(client) => client,
        Err(e) => {
            // Checked by config validation already; a failure here is a bug.
            error!(error = %e, "invalid redis_url");
            return;
        }
    };
    let (connected, conn) = watch::channel(None);
    let store = Store {
        conn,
        settings: settings.clone(),
    };
    let member: Arc<str> = format!(
        "{}.{}",
        settings.node,
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros())
    )
    .into();
    tokio::spawn(connect(client.clone(), settings.clone(), connected));
    let (wake_tx, mut wakes) = mpsc::unbounded_channel();
    let wake_task = tokio::spawn(listen(client, settings.clone(), member.clone(), wake_tx));

    let (done_tx, mut done) = mpsc::unbounded_channel();
    let now = Instant::now();
    let mut engine = Engine {
        store,
        settings: settings.clone(),
        member,
        started: now,
        links: HashMap::new(),
        parked: HashMap::new(),
        by_session: HashMap::new(),
        timers: BTreeMap::new(),
        timer_seq: 0,
        nonce: 0,
        given_out: HashMap::new(),
        counters: Counters::default(),
        draining: false,
        done_tx,
        last_presence_refresh: now,
    };
    let mut sweep = tokio::time::interval(shell.sweep_interval);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let far_future = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
    let timer = tokio::time::sleep_until(far_future);
    tokio::pin!(timer);
    let mut armed: Option<Instant> = None;
    loop {
        tokio::select! {
            event = inbox.recv() => {
                match event {
                    None | Some(Event::Shutdown) => break,
                    Some(event) => engine.event(event),
                }
            }
            Some(report) = done.recv() => engine.done(report),
            Some(wake) = wakes.recv() => engine.wake(wake),
            () = &mut timer, if armed.is_some() => {
                armed = None;
                engine.fire(Instant::now());
            }
            _ = sweep.tick() => engine.sweep(),
        }
        let next = engine.timers.keys().next().map(|(at, _)| *at);
        if next != armed {
            armed = next;
            timer
                .as_mut()
                .reset(next.map_or(far_future, tokio::time::Instant::from_std));
        }
    }
    wake_task.abort();
    engine.stop(&mut inbox, &mut done).await;
}

/// Connects, loads the library and settings, and keeps trying until it works.
async fn connect(
    client: redis::Client,
    settings: Arc<Settings>,
    connected: watch::Sender<Option<ConnectionManager>>,
) {
    let settings = &*settings;
    let config = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(settings.timeout))
        .set_response_timeout(Some(settings.timeout))
        .set_max_delay(Duration::from_secs(2));
    let mut failures = 0u32;
    loop {
        let attempt = async {
            let mut conn =
                ConnectionManager::new_with_config(client.clone(), config.clone()).await?;
            setup(&mut conn, settings).await?;
            warn_of_loss(&mut conn).await;
            redis::RedisResult::Ok(conn)
        };
        match tokio::time::timeout(settings.timeout * 2, attempt).await {
            Ok(Ok(conn)) => {
                info!(
                    url = %settings.redacted_url(),
                    prefix = %settings.prefix,
                    node = %settings.node,
                    "connected to Redis"
                );
                let _ = connected.send(Some(conn));
                return;
            }
            Ok(Err(e)) => note_failure(&mut failures, &e.to_string(), settings),
            Err(_) => note_failure(&mut failures, "timed out", settings),
        }
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
}

fn note_failure(failures: &mut u32, why: &str, settings: &Settings) {
    // Every attempt at first, then every 20th: an outage must not flood the log.
    if *failures < 3 || failures.is_multiple_of(20) {
        warn!(url = %settings.redacted_url(), error = why, "cannot reach Redis; retrying");
    }
    *failures += 1;
}

/// Subscribes to this core's wake-up channel and passes wake-ups on, reconnecting
/// whenever the subscription breaks.
async fn listen(
    client: redis::Client,
    settings: Arc<Settings>,
    member: Arc<str>,
    wakes: mpsc::UnboundedSender<Wake>,
) {
    let channel = format!("{}:wake:{member}", settings.prefix);
    let mut failures = 0u32;
    loop {
        let subscribed = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channel).await?;
            redis::RedisResult::Ok(pubsub)
        };
        match tokio::time::timeout(settings.timeout * 2, subscribed).await {
            Ok(Ok(pubsub)) => {
                failures = 0;
                if wakes.send(Wake::Listening).is_err() {
                    return;
                }
                let mut messages = pubsub.into_on_message();
                while let Some(message) = messages.next().await {
                    let Some(wake) = Wake::parse(message.get_payload_bytes()) else {
                        // Only our functions publish here; a stranger's message is
                        // no reason to stop listening.
                        warn!(channel = %channel, "ignored an unknown message on the wake-up channel");
                        continue;
                    };
                    if wakes.send(wake).is_err() {
                        return;
                    }
                }
                warn!("the wake-up subscription to Redis broke; resubscribing");
            }
            Ok(Err(e)) => note_failure(&mut failures, &e.to_string(), &settings),
            Err(_) => note_failure(&mut failures, "timed out", &settings),
        }
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
}

impl Engine {
    fn event(&mut self, event: Event) {
        match event {
            Event::Connected {
                conn,
                door,
                replies,
            } => {
                self.links.insert(conn, Link { replies, door });
            }
            Event::Request { from, request } => self.request(from, request),
            Event::Closed { conn } => self.closed(conn),
            Event::Shutdown => {}
        }
    }

    fn reply(&mut self, to: ReplyTo, response: Response) {
        self.counters.answered(&response);
        if let Some(link) = self.links.get(&to.conn) {
            let _ = link.replies.send(ServerFrame {
                id: to.request,
                response,
            });
        }
    }

    fn request(&mut self, from: ReplyTo, request: Request) {
        if self.draining && matches!(request, Request::Publish { .. } | Request::Send(_)) {
            let response = Response::error(
                ErrorKind::Draining,
                "the message server is draining for maintenance and takes no new messages; \
                 retry later",
            );
            self.reply(from, response);
            return;
        }
        match request {
            Request::Ping => self.reply(from, Response::Pong),
            Request::Poll {
                session,
                timeout_ms,
                ack_previous,
                max,
            } => self.poll(from, session, timeout_ms, ack_previous, max),
            Request::CancelPoll { poll } => {
                self.withdraw(
                    ReplyTo {
                        conn: from.conn,
                        request: poll,
                    },
                    true,
                );
                self.reply(from, Response::Done);
            }
            Request::Admin(AdminRequest::Drain { draining }) => {
                self.draining = draining;
                info!(draining, "drain set by an operator (this core only)");
                self.reply(from, Response::Done);
            }
            request => {
                let store = self.store.clone();
                // Only the operator's and the scrape's answers carry this core's own
                // figures: not worth building for every request.
                let local = matches!(request, Request::Metrics | Request::Admin(_))
                    .then(|| self.local_status());
                let done = self.done_tx.clone();
                tokio::spawn(async move {
                    let response = execute(&store, local, request).await;
                    let _ = done.send(Done::Reply { to: from, response });
                });
            }
        }
    }

    /// What only this core knows, for status and metrics answered by a task.
    fn local_status(&self) -> Local {
        Local {
            uptime: self.started.elapsed(),
            handler_connections: self
                .links
                .values()
                .filter(|link| link.door == Door::Main)
                .count() as u64,
            parked_polls: self.parked.len() as u64,
            draining: self.draining,
            counters: CoreMetrics {
                published: self.counters.published,
                delivered: self.counters.tally.delivered,
                acknowledged: self.counters.tally.acknowledged,
                redelivered: self.counters.tally.redelivered,
                expired: self.counters.tally.expired,
                dropped: self.counters.dropped,
                dead_lettered: self.counters.tally.dead_lettered,
                refused: ErrorKind::ALL
                    .iter()
                    .map(|kind| (*kind, self.counters.refused[*kind as usize]))
                    .filter(|(_, n)| *n > 0)
                    .collect(),
                ..CoreMetrics::default()
            },
        }
    }

    fn poll(
        &mut self,
        from: ReplyTo,
        session: String,
        timeout_ms: u64,
        ack_previous: bool,
        max: u32,
    ) {
        // A newer poll ends the older one of the same session (the functions tell
        // another core's; this one's is ended here).
        if let Some(older) = self.by_session.get(&session).copied()
            && older != from
        {
            self.withdraw(older, true);
        }
        let timeout = Duration::from_millis(timeout_ms).min(self.settings.broker.max_poll_timeout);
        self.nonce += 1;
        let token = format!("{}|{}", self.member, self.nonce);
        let deadline = Instant::now() + timeout;
        self.parked.insert(
            from,
            Parked {
                session: session.clone(),
                token: token.clone(),
                deadline,
                due: None,
                max,
                in_call: true,
                woken: false,
                cancelled: false,
                failed: None,
                registered: false,
                ack_previous,
            },
        );
        self.by_session.insert(session.clone(), from);
        self.add_timer(deadline, from);
        self.call_poll(from, session, token, timeout, ack_previous, max, false);
    }

    #[allow(clippy::too_many_arguments)]
    fn call_poll(
        &self,
        to: ReplyTo,
        session: String,
        token: String,
        timeout: Duration,
        ack_previous: bool,
        max: u32,
        resume: bool,
    ) {
        let store = self.store.clone();
        let done = self.done_tx.clone();
        tokio::spawn(async move {
            let mut cmd = store.fcall("mm1_poll");
            cmd.arg(&session)
                .arg(&token)
                .arg(timeout.as_millis() as u64)
                .arg(u8::from(ack_previous))
                .arg(max)
                .arg(u8::from(resume));
            let outcome = store.run(&cmd).await.map(polled);
            let _ = done.send(Done::Poll {
                to,
                session,
                token,
                outcome,
            });
        });
    }

    /// Polls again for a parked poll that was woken or became due.
    fn resume(&mut self, to: ReplyTo) {
        let Some(parked) = self.parked.get_mut(&to) else {
            return;
        };
        if parked.in_call {
            parked.woken = true;
            return;
        }
        parked.in_call = true;
        parked.due = None;
        let left = parked
            .deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        let (session, token, max) = (parked.session.clone(), parked.token.clone(), parked.max);
        let (resume, ack_previous) = (parked.registered, parked.ack_previous && !parked.registered);
        self.call_poll(to, session, token, left, ack_previous, max, resume);
    }

    /// Ends a parked poll without messages (`answer`: tell its handler so); one
    /// whose call is out is marked, and what that call brings goes back to Redis.
    fn withdraw(&mut self, to: ReplyTo, answer: bool) {
        let Some(parked) = self.parked.get_mut(&to) else {
            return;
        };
        if parked.in_call {
            if !parked.cancelled {
                parked.cancelled = true;
                if answer {
                    self.reply(to, Response::Messages(Vec::new()));
                }
            }
            return;
        }
        self.forget(to);
        if answer {
            self.reply(to, Response::Messages(Vec::new()));
        }
    }

    fn forget(&mut self, to: ReplyTo) -> Option<Parked> {
        let parked = self.parked.remove(&to)?;
        if self.by_session.get(&parked.session) == Some(&to) {
            self.by_session.remove(&parked.session);
        }
        Some(parked)
    }

    fn add_timer(&mut self, at: Instant, to: ReplyTo) {
        self.timer_seq += 1;
        self.timers.insert((at, self.timer_seq), to);
    }

    fn fire(&mut self, now: Instant) {
        while let Some(entry) = self.timers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let to = entry.remove();
            let Some(parked) = self.parked.get(&to) else {
                continue;
            };
            if parked.in_call {
                continue; // its outcome decides, deadline or not
            }
            if parked.deadline <= now {
                let parked = self.forget(to).expect("checked above");
                let response = parked
                    .failed
                    .unwrap_or_else(|| Response::Messages(Vec::new()));
                self.reply(to, response);
            } else if parked.due.is_some_and(|due| due <= now) {
                self.resume(to);
            }
        }
    }

    fn wake(&mut self, wake: Wake) {
        match wake {
            Wake::Session(session) => {
                if let Some(to) = self.by_session.get(&session).copied() {
                    self.resume(to);
                }
            }
            Wake::Delivered {
                token,
                session,
                messages,
            } => self.delivered(token, session, messages),
            Wake::Listening => {
                let all: Vec<ReplyTo> = self.parked.keys().copied().collect();
                for to in all {
                    self.resume(to);
                }
            }
        }
    }

    /// Messages a publish took for one of this core's parked polls.
    fn delivered(&mut self, token: String, session: String, messages: Vec<Message>) {
        let found = self.by_session.get(&session).copied().filter(|to| {
            self.parked
                .get(to)
                .is_some_and(|p| p.token == token && !p.cancelled)
        });
        let Some(to) = found else {
            // That poll ended meanwhile (its timeout, a newer poll, its browser).
            self.hand_back(session, messages);
            return;
        };
        if !self.links.contains_key(&to.conn) {
            self.forget(to);
            self.hand_back(session, messages);
            return;
        }
        let parked = self.parked.get_mut(&to).expect("found above");
        if parked.in_call {
            // A call of its own is out too: answered now, and whatever that call
            // brings is handed back when it comes.
            parked.cancelled = true;
        } else {
            self.forget(to);
        }
        self.counters.tally.delivered += messages.len() as u64;
        if self.settings.broker.delivery == DeliveryMode::Ack {
            self.remember_given(to.conn, session, &messages);
        }
        self.reply(to, Response::Messages(messages));
    }

    fn done(&mut self, report: Done) {
        match report {
            Done::Reply { to, response } => self.reply(to, response),
            Done::Poll {
                to,
                session,
                token,
                outcome,
            } => self.polled(to, session, token, outcome),
        }
    }

    fn polled(
        &mut self,
        to: ReplyTo,
        session: String,
        token: String,
        outcome: Result<Polled, StoreError>,
    ) {
        let Some(parked) = self.parked.get_mut(&to).filter(|p| p.token == token) else {
            // Forgotten meanwhile: what it brings goes back.
            if let Ok(Polled::Messages(messages, tally)) = outcome {
                self.counters.add(Tally {
                    delivered: 0,
                    ..tally
                });
                self.hand_back(session, messages);
            }
            return;
        };
        parked.in_call = false;
        let cancelled = parked.cancelled;
        match outcome {
            Err(e) => {
                let now = Instant::now();
                if cancelled || parked.deadline <= now {
                    self.forget(to);
                    if !cancelled {
                        self.reply(to, e.response());
                    }
                    return;
                }
                parked.failed = Some(e.response());
                let retry = (now + POLL_RETRY).min(parked.deadline);
                parked.due = Some(retry);
                self.add_timer(retry, to);
            }
            Ok(Polled::Kicked) => {
                self.forget(to);
                if !cancelled {
                    self.reply(to, kicked_error(&session));
                }
            }
            Ok(Polled::Superseded) => {
                self.forget(to);
                if !cancelled {
                    self.reply(to, Response::Messages(Vec::new()));
                }
            }
            Ok(Polled::Messages(messages, tally)) => {
                self.forget(to);
                if cancelled || !self.links.contains_key(&to.conn) {
                    self.counters.add(Tally {
                        delivered: 0,
                        ..tally
                    });
                    self.hand_back(session, messages);
                    return;
                }
                self.counters.add(tally);
                if self.settings.broker.delivery == DeliveryMode::Ack && !messages.is_empty() {
                    self.remember_given(to.conn, session, &messages);
                }
                self.reply(to, Response::Messages(messages));
            }
            Ok(Polled::Parked {
                due_ms,
                acknowledged,
            }) => {
                self.counters.tally.acknowledged += acknowledged;
                let now = Instant::now();
                let parked = self.parked.get_mut(&to).expect("checked above");
                parked.registered = true;
                parked.failed = None;
                if cancelled || parked.deadline <= now {
                    self.forget(to);
                    if !cancelled {
                        self.reply(to, Response::Messages(Vec::new()));
                    }
                    return;
                }
                if std::mem::take(&mut parked.woken) {
                    self.resume(to);
                    return;
                }
                if due_ms > 0 {
                    let due = now + Duration::from_millis(due_ms);
                    parked.due = Some(due);
                    self.add_timer(due, to);
                }
            }
        }
    }

    fn remember_given(&mut self, conn: ConnId, session: String, messages: &[Message]) {
        let visibility = self.settings.broker.visibility_timeout;
        let now = Instant::now();
        let list = self.given_out.entry(conn).or_default();
        while list
            .front()
            .is_some_and(|g| now.duration_since(g.at) > visibility)
        {
            list.pop_front();
        }
        list.push_back(GivenOut {
            at: now,
            session,
            ids: messages.iter().map(|m| m.id).collect(),
        });
    }

    /// Messages a poll took that nobody will pass on: back to their mailbox.
    fn hand_back(&self, session: String, messages: Vec<Message>) {
        if messages.is_empty() {
            return;
        }
        let store = self.store.clone();
        tokio::spawn(async move {
            let mut cmd = store.fcall("mm1_return");
            cmd.arg(&session);
            for m in &messages {
                cmd.arg(m.id).arg(&m.body);
            }
            if let Err(e) = store.run(&cmd).await {
                // In ack mode they come back after the visibility timeout anyway; in
                // x0 mode this loses them, which the log must say.
                error!(session = %session, count = messages.len(), error = %e.message,
                    "could not hand messages back to Redis");
            }
        });
    }

    fn closed(&mut self, conn: ConnId) {
        self.links.remove(&conn);
        let gone: Vec<ReplyTo> = self
            .parked
            .keys()
            .filter(|to| to.conn == conn)
            .copied()
            .collect();
        for to in gone {
            self.withdraw(to, false);
        }
        // In ack mode, what went out on it is ready again at once: that handler
        // passes nothing on any more.
        if let Some(list) = self.given_out.remove(&conn) {
            let visibility = self.settings.broker.visibility_timeout;
            for given in list {
                if given.at.elapsed() <= visibility {
                    let messages = given
                        .ids
                        .into_iter()
                        .map(|id| Message {
                            id,
                            body: String::new(),
                        })
                        .collect();
                    self.hand_back(given.session, messages);
                }
            }
        }
    }

    fn sweep(&mut self) {
        // Sessions with a poll parked here are present; they are told to Redis a few
        // times per session timeout rather than every second.
        let now = Instant::now();
        let refresh = now.duration_since(self.last_presence_refresh)
            >= self.settings.broker.session_timeout / 4;
        let sessions: Vec<String> = if refresh {
            self.last_presence_refresh = now;
            self.by_session.keys().cloned().collect()
        } else {
            Vec::new()
        };
        let store = self.store.clone();
        tokio::spawn(async move {
            let mut cmd = store.fcall("mm1_sweep");
            for session in &sessions {
                cmd.arg(session);
            }
            if let Err(e) = store.run(&cmd).await {
                debug!(error = %e.message, "sweep failed");
            }
        });
    }

    /// A clean stop: handlers are told, parked polls are sent elsewhere, queued
    /// requests are refused, and messages still coming back from calls are handed
    /// back to Redis.
    async fn stop(
        mut self,
        inbox: &mut mpsc::Receiver<Event>,
        done: &mut mpsc::UnboundedReceiver<Done>,
    ) {
        let stopping =
            || Response::error(ErrorKind::ShuttingDown, "the message server is stopping");
        for link in self.links.values() {
            let _ = link.replies.send(ServerFrame {
                id: 0,
                response: stopping(),
            });
        }
        let all: Vec<ReplyTo> = self.parked.keys().copied().collect();
        for to in all {
            if self.parked.get(&to).is_some_and(|p| p.in_call) {
                self.parked.get_mut(&to).expect("listed").cancelled = true;
                self.reply(to, stopping());
            } else {
                self.forget(to);
                self.reply(to, stopping());
            }
        }
        inbox.close();
        while let Some(event) = inbox.recv().await {
            match event {
                Event::Request {
                    from,
                    request: request @ Request::Return { .. },
                } => {
                    let response = execute(&self.store, None, request).await;
                    self.reply(from, response);
                }
                Event::Request { from, .. } => self.reply(from, stopping()),
                _ => {}
            }
        }
        // Calls still out come back within the Redis timeout.
        let until = tokio::time::Instant::now() + self.settings.timeout;
        while self.parked.values().any(|p| p.in_call) {
            match tokio::time::timeout_at(until, done.recv()).await {
                Ok(Some(report)) => self.done(report),
                _ => break,
            }
        }
        // Let hand-backs started above reach Redis.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What a poll function's answer means.
fn polled(value: Value) -> Polled {
    let (status, rest) = answer(value);
    match status.as_str() {
        "kicked" => Polled::Kicked,
        "superseded" => Polled::Superseded,
        "park" => Polled::Parked {
            due_ms: num(&rest, 0),
            acknowledged: num(&rest, 1),
        },
        _ => {
            let tally = Tally {
                acknowledged: num(&rest, 0),
                expired: num(&rest, 1),
                dead_lettered: num(&rest, 2),
                redelivered: num(&rest, 3),
                delivered: 0,
            };
            let mut messages = Vec::with_capacity(rest.len().saturating_sub(4) / 2);
            let mut fields = rest.into_iter().skip(4);
            while let (Some(id), Some(b)) = (fields.next(), fields.next()) {
                messages.push(Message {
                    id: int(&id),
                    body: body(b),
                });
            }
            Polled::Messages(
                messages.clone(),
                Tally {
                    delivered: messages.len() as u64,
                    ..tally
                },
            )
        }
    }
}

/// This core's own part of a status or metrics answer.
#[derive(Clone)]
struct Local {
    uptime: Duration,
    handler_connections: u64,
    parked_polls: u64,
    draining: bool,
    counters: CoreMetrics,
}

/// Carries out a request that needs no parked state: one function call.
async fn execute(store: &Store, local: Option<Local>, request: Request) -> Response {
    let acting = acting_session(&request).map(str::to_owned);
    match carry_out(store, local, request).await {
        Ok((status, _)) if status == "kicked" => {
            let who = acting.unwrap_or_default();
            kicked_error(&who)
        }
        Ok((_, response)) => response,
        Err(e) => e.response(),
    }
}

/// The function call for a request and its answer; the status word comes back so
/// that a refusal of the acting session is answered the same way for all.
async fn carry_out(
    store: &Store,
    local: Option<Local>,
    request: Request,
) -> Result<(String, Response), StoreError> {
    // Built by the engine for the requests that need it (Metrics, Admin).
    let local = || {
        local
            .clone()
            .expect("the engine passes this core's figures")
    };
    let broker = &store.settings.broker;
    let done = |status: String, response: Response| Ok((status, response));
    match request {
        Request::Publish {
            src,
            dst,
            body,
            key,
        } => {
            if body.len() > broker.max_payload_bytes {
                return done(
                    String::new(),
                    too_large(body.len(), broker.max_payload_bytes),
                );
            }
            let mut cmd = store.fcall("mm1_publish");
            cmd.arg(&src)
                .arg(&dst)
                .arg(&body)
                .arg(key.as_deref().unwrap_or(""));
            let (status, rest) = answer(store.run(&cmd).await?);
            let response = match status.as_str() {
                "ok" => Response::Published {
                    id: num(&rest, 0),
                    dropped: num(&rest, 1) as u32,
                    duplicate: num(&rest, 2) == 1,
                },
                "kicked" => kicked_error(&text(&rest[0])),
                "full" => full_error(num(&rest, 0), &dst),
                other => unexpected("mm1_publish", other),
            };
            // A kicked recipient is not the acting session: its own error.
            done(
                if status == "kicked" {
                    String::new()
                } else {
                    status
                },
                response,
            )
        }
        Request::Send(send) => send_message(store, *send).await,
        Request::Ack { session, which } => {
            let mut cmd = store.fcall("mm1_ack");
            cmd.arg(&session);
            match &which {
                AckSelector::All => {
                    cmd.arg("all");
                }
                AckSelector::UpTo(cursor) => {
                    cmd.arg("upto").arg(*cursor);
                }
                AckSelector::Ids(ids) => {
                    cmd.arg("ids");
                    for id in ids {
                        cmd.arg(*id);
                    }
                }
            }
            let (status, rest) = answer(store.run(&cmd).await?);
            done(
                status,
                Response::Acked {
                    count: num(&rest, 0) as u32,
                },
            )
        }
        Request::Return { session, messages } => {
            if messages.is_empty() {
                return done(String::new(), Response::Done);
            }
            let mut cmd = store.fcall("mm1_return");
            cmd.arg(&session);
            for m in &messages {
                cmd.arg(m.id).arg(&m.body);
            }
            let (status, _) = answer(store.run(&cmd).await?);
            done(status, Response::Done)
        }
        Request::Release { session } => {
            let mut cmd = store.fcall("mm1_release");
            cmd.arg(&session);
            let (status, rest) = answer(store.run(&cmd).await?);
            done(status, Response::Count(num(&rest, 0)))
        }
        Request::Subscribe {
            session,
            subscription,
            since,
        } => {
            if since.is_some() && subscription.group.is_some() {
                return done(
                    String::new(),
                    Response::error(
                        ErrorKind::InvalidRequest,
                        "since cannot be combined with a group: a group's members share what comes, not what was",
                    ),
                );
            }
            let pattern = match Pattern::parse(&subscription.channel).and_then(|p| {
                subscription
                    .subject
                    .as_deref()
                    .map(Pattern::parse)
                    .transpose()
                    .map(|_| p)
            }) {
                Ok(pattern) => pattern,
                Err(e) => {
                    return done(String::new(), Response::error(ErrorKind::InvalidRequest, e));
                }
            };
            let literal_history = pattern.is_literal()
                && settings_for(broker, &subscription.channel).is_some_and(|s| s.history_len > 0);
            let mut cmd = store.fcall("mm1_subscribe");
            cmd.arg(&session)
                .arg(&subscription.channel)
                .arg(subscription.subject.as_deref().unwrap_or(""))
                .arg(subscription.group.as_deref().unwrap_or(""))
                .arg(since.map_or(String::new(), |s| s.to_string()))
                .arg(u8::from(literal_history));
            let (status, rest) = answer(store.run(&cmd).await?);
            done(
                status,
                Response::Subscribed {
                    recovered: num(&rest, 0) as u32,
                    complete: num(&rest, 1) == 1,
                },
            )
        }
        Request::Unsubscribe {
            session,
            subscription,
        } => {
            let mut cmd = store.fcall("mm1_unsubscribe");
            cmd.arg(&session)
                .arg(&subscription.channel)
                .arg(subscription.subject.as_deref().unwrap_or(""))
                .arg(subscription.group.as_deref().unwrap_or(""));
            let (status, rest) = answer(store.run(&cmd).await?);
            done(status, Response::Count(num(&rest, 0)))
        }
        Request::AwaitReply {
            session,
            reference,
            ttl_ms,
        } => {
            let mut cmd = store.fcall("mm1_await");
            cmd.arg(&session).arg(reference).arg(ttl_ms);
            let (status, _) = answer(store.run(&cmd).await?);
            done(status, Response::Done)
        }
        Request::SetPaused { session, paused } => {
            let mut cmd = store.fcall("mm1_pause");
            cmd.arg(&session).arg(u8::from(paused));
            let (status, _) = answer(store.run(&cmd).await?);
            done(status, Response::Done)
        }
        Request::Presence { channel } => {
            let mut cmd = store.fcall("mm1_presence");
            cmd.arg(&channel);
            let values = items(store.run(&cmd).await?);
            let present = values
                .chunks(2)
                .filter(|pair| pair.len() == 2)
                .map(|pair| {
                    let user = text(&pair[1]);
                    Present {
                        session: text(&pair[0]),
                        user: (!user.is_empty()).then_some(user),
                    }
                })
                .collect();
            done(String::new(), Response::Presence(present))
        }
        Request::Bind {
            session,
            user,
            exclusive,
        } => {
            let mut cmd = store.fcall("mm1_bind");
            cmd.arg(&session).arg(&user).arg(u8::from(exclusive));
            let (status, rest) = answer(store.run(&cmd).await?);
            done(status, Response::Count(num(&rest, 0)))
        }
        Request::Kick { session, reason } => {
            kick(store, &session, &reason).await?;
            done(String::new(), Response::Done)
        }
        Request::DeadLetters(op) => dead_letters(store, op).await.map(|r| (String::new(), r)),
        Request::Metrics => {
            let gauges = Gauges::read(store).await?;
            let local = local();
            let mut metrics = local.counters.clone();
            metrics.ready = gauges.ready;
            metrics.in_flight = gauges.in_flight;
            metrics.dead_letters = gauges.dead_letters;
            metrics.mailboxes = gauges.mailboxes;
            metrics.sessions = gauges.sessions;
            metrics.parked_polls = local.parked_polls;
            done(String::new(), Response::Metrics(Box::new(metrics)))
        }
        Request::Admin(admin) => admin_request(store, local(), admin)
            .await
            .map(|r| (String::new(), r)),
        // Served by the engine itself; never reaches here.
        Request::Ping | Request::Poll { .. } | Request::CancelPoll { .. } => done(
            String::new(),
            Response::error(ErrorKind::InvalidRequest, "not here"),
        ),
    }
}

fn too_large(bytes: usize, limit: usize) -> Response {
    Response::error(
        ErrorKind::PayloadTooLarge,
        format!("message of {bytes} bytes is over the limit of {limit} bytes"),
    )
}

fn settings_for<'a>(broker: &'a BrokerConfig, channel: &str) -> Option<&'a ChannelSettings> {
    broker.channels.iter().find(|s| s.pattern.matches(channel))
}

async fn send_message(store: &Store, send: ipc::Send) -> Result<(String, Response), StoreError> {
    let broker = &store.settings.broker;
    let refuse = |message: String| {
        Ok((
            String::new(),
            Response::error(ErrorKind::InvalidRequest, message),
        ))
    };
    let (kind, target, target_json, channel) = match &send.target {
        Some(Target::Session(s)) => ("s", s.clone(), object("session", s), None),
        Some(Target::User(u)) => ("u", u.clone(), object("user", u), None),
        Some(Target::Broadcast) => ("b", String::new(), r#"{"broadcast":true}"#.to_owned(), None),
        Some(Target::Channel(c)) => {
            if c.starts_with('$') {
                return refuse(format!("channel {c:?} is reserved for the core"));
            }
            if let Err(e) = routing::check_channel_name(c) {
                return refuse(e);
            }
            ("c", c.clone(), object("channel", c), Some(c.as_str()))
        }
        None => {
            if send.reference.is_none() {
                return refuse(
                    "a message without a target is a reply and needs a reference".into(),
                );
            }
            ("r", String::new(), String::new(), None)
        }
    };
    let settings = channel.and_then(|c| settings_for(broker, c));
    let (head, tail) = envelope_parts(&send);
    let mut cmd = store.fcall("mm1_send");
    cmd.arg(send.src.as_deref().unwrap_or(""))
        .arg(kind)
        .arg(&target)
        .arg(send.subject.as_deref().unwrap_or(""))
        .arg(send.reference.map_or(String::new(), |r| r.to_string()))
        .arg(&head)
        .arg(&target_json)
        .arg(&tail)
        .arg(send.ttl_ms.map_or(String::new(), |t| t.to_string()))
        .arg(send.key.as_deref().unwrap_or(""))
        .arg(send.expect_reply_ms.unwrap_or(0))
        .arg(settings.map_or(0, |s| s.max_pending))
        .arg(settings.map_or(0, |s| s.priority))
        .arg(settings.map_or(0, |s| s.history_len))
        .arg(
            settings
                .and_then(|s| s.history_age)
                .map_or(0, |a| a.as_millis() as u64),
        );
    let (status, rest) = answer(store.run(&cmd).await?);
    let response = match status.as_str() {
        "ok" => Response::Sent {
            id: num(&rest, 0),
            recipients: num(&rest, 1) as u32,
            dropped: num(&rest, 2) as u32,
            duplicate: num(&rest, 3) == 1,
        },
        "kicked" => kicked_error(&text(&rest[0])),
        "noroute" => Response::error(
            ErrorKind::NoRoute,
            format!(
                "no session awaits replies to message {} (never asked for, or expired)",
                send.reference.unwrap_or(0)
            ),
        ),
        "full" => full_error(num(&rest, 0), &target),
        "toolarge" => too_large(num(&rest, 0) as usize, broker.max_payload_bytes),
        other => unexpected("mm1_send", other),
    };
    // The function names whom it refused; the answer is built here already.
    Ok((String::new(), response))
}

async fn kick(store: &Store, session: &str, reason: &str) -> Result<u64, StoreError> {
    let mut cmd = store.fcall("mm1_kick");
    cmd.arg(session).arg(reason);
    Ok(items(store.run(&cmd).await?).first().map_or(0, int))
}

async fn dead_letters(store: &Store, op: DeadLetterOp) -> Result<Response, StoreError> {
    let mut cmd = store.fcall("mm1_dead");
    let ids = |cmd: &mut redis::Cmd, ids: Option<Vec<u64>>| {
        for id in ids.unwrap_or_default() {
            cmd.arg(id);
        }
    };
    match op {
        DeadLetterOp::List { limit } => {
            cmd.arg("list").arg(limit);
            let values = items(store.run(&cmd).await?);
            let total = values.first().map_or(0, int);
            let letters = values[1.min(values.len())..]
                .chunks(4)
                .filter(|c| c.len() == 4)
                .map(|c| DeadLetter {
                    id: int(&c[0]),
                    session: text(&c[1]),
                    body: text(&c[2]),
                    deliveries: int(&c[3]) as u32,
                })
                .collect();
            Ok(Response::DeadLetters { letters, total })
        }
        DeadLetterOp::Replay { ids: selected } => {
            cmd.arg("replay");
            ids(&mut cmd, selected);
            Ok(Response::Count(
                items(store.run(&cmd).await?).first().map_or(0, int),
            ))
        }
        DeadLetterOp::Purge { ids: selected } => {
            cmd.arg("purge");
            ids(&mut cmd, selected);
            Ok(Response::Count(
                items(store.run(&cmd).await?).first().map_or(0, int),
            ))
        }
    }
}

/// The cluster's gauges, counted in Redis (a walk over every mailbox: for scrapes
/// and operators, not for the hot path), a slice per call so that Redis serves the
/// hot path between them.
struct Gauges {
    sessions: u64,
    mailboxes: u64,
    ready: u64,
    in_flight: u64,
    dead_letters: u64,
    subscriptions: u64,
    channels: u64,
}

impl Gauges {
    /// Mailboxes and patterns visited per call: about 2 ms of Redis's time.
    const SLICE: u32 = 1000;

    async fn read(store: &Store) -> Result<Gauges, StoreError> {
        let mut g = Gauges {
            sessions: 0,
            mailboxes: 0,
            ready: 0,
            in_flight: 0,
            dead_letters: 0,
            subscriptions: 0,
            channels: 0,
        };
        let (mut mailboxes, mut patterns) = ("0".to_owned(), "0".to_owned());
        loop {
            let mut cmd = store.fcall("mm1_tally");
            cmd.arg(&mailboxes).arg(&patterns).arg(Self::SLICE);
            let v = items(store.run(&cmd).await?);
            let walked = |cursor: Option<&Value>| match cursor.map(text).as_deref() {
                Some("0" | "done") | None => "done".to_owned(),
                Some(next) => next.to_owned(),
            };
            mailboxes = walked(v.first());
            patterns = walked(v.get(1));
            g.mailboxes += num(&v, 2);
            g.ready += num(&v, 3);
            g.in_flight += num(&v, 4);
            g.channels += num(&v, 5);
            g.subscriptions += num(&v, 6);
            g.sessions = num(&v, 7);
            g.dead_letters = num(&v, 8);
            if mailboxes == "done" && patterns == "done" {
                return Ok(g);
            }
        }
    }
}

async fn admin_request(
    store: &Store,
    local: Local,
    request: AdminRequest,
) -> Result<Response, StoreError> {
    let settings = &store.settings;
    match request {
        AdminRequest::Status => {
            let g = Gauges::read(store).await?;
            Ok(Response::Status(Box::new(CoreStatus {
                version: env!("CARGO_PKG_VERSION").to_owned(),
                protocol: ipc::PROTOCOL_VERSION,
                uptime_ms: local.uptime.as_millis() as u64,
                sessions: g.sessions,
                mailboxes: g.mailboxes,
                ready: g.ready,
                in_flight: g.in_flight,
                queued_bytes: 0,
                max_queued_bytes: 0,
                parked_polls: local.parked_polls,
                dead_letters: g.dead_letters,
                subscriptions: g.subscriptions,
                channels: g.channels,
                handler_connections: local.handler_connections,
                storage: Some(StorageStatus {
                    data_dir: format!(
                        "redis {} prefix {} node {}",
                        settings.redacted_url(),
                        settings.prefix,
                        settings.node
                    ),
                    log_bytes: 0,
                    fsync: "redis".into(),
                }),
                draining: local.draining,
            })))
        }
        AdminRequest::Sessions { limit } => {
            let mut cmd = store.fcall("mm1_sessions");
            cmd.arg(limit);
            let values = items(store.run(&cmd).await?);
            let total = values.first().map_or(0, int);
            let sessions = values[1.min(values.len())..]
                .chunks(7)
                .filter(|c| c.len() == 7)
                .map(|c| {
                    let user = text(&c[3]);
                    SessionSummary {
                        session: text(&c[0]),
                        ready: int(&c[1]),
                        in_flight: int(&c[2]),
                        user: (!user.is_empty()).then_some(user),
                        last_seen_ms: match &c[4] {
                            Value::Int(i) if *i >= 0 => *i as u64,
                            _ => 0,
                        },
                        parked_poll: false,
                        paused: int(&c[5]) == 1,
                        subscriptions: int(&c[6]) as u32,
                    }
                })
                .collect();
            Ok(Response::Sessions { sessions, total })
        }
        AdminRequest::Peek { session, limit } => {
            let mut cmd = store.fcall("mm1_peek");
            cmd.arg(&session).arg(limit);
            let values = items(store.run(&cmd).await?);
            let total = values.first().map_or(0, int);
            let messages = values[1.min(values.len())..]
                .chunks(5)
                .filter(|c| c.len() == 5)
                .map(|c| PeekedMessage {
                    id: int(&c[0]),
                    age_ms: int(&c[1]),
                    in_flight: int(&c[2]) == 1,
                    deliveries: int(&c[3]) as u32,
                    body: text(&c[4]),
                })
                .collect();
            Ok(Response::Peeked { messages, total })
        }
        AdminRequest::Purge { session } => {
            let mut cmd = store.fcall("mm1_purge");
            cmd.arg(&session);
            Ok(Response::Count(
                items(store.run(&cmd).await?).first().map_or(0, int),
            ))
        }
        AdminRequest::Kick { session, reason } => {
            Ok(Response::Count(kick(store, &session, &reason).await?))
        }
        // Answered by the engine.
        AdminRequest::Drain { .. } => Ok(Response::Done),
    }
}

/// Replies for tests of the decoding: kept beside the decoders.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn poll_answers_decode_into_messages_and_counts() {
        let value = Value::Array(vec![
            Value::BulkString(b"msgs".to_vec()),
            Value::Int(2),
            Value::Int(1),
            Value::Int(0),
            Value::Int(3),
            Value::BulkString(b"1796175406252957".to_vec()),
            Value::BulkString(br#"{"x":1}"#.to_vec()),
        ]);
        let Polled::Messages(messages, tally) = polled(value) else {
            panic!("not messages");
        };
        assert_eq!(
            messages,
            vec![Message {
                id: 1_796_175_406_252_957,
                body: r#"{"x":1}"#.into()
            }]
        );
        assert_eq!(
            (
                tally.acknowledged,
                tally.expired,
                tally.redelivered,
                tally.delivered
            ),
            (2, 1, 3, 1)
        );
        let parked = Value::Array(vec![
            Value::BulkString(b"park".to_vec()),
            Value::Int(250),
            Value::Int(0),
        ]);
        assert!(matches!(polled(parked), Polled::Parked { due_ms: 250, .. }));
    }

    #[test]
    fn wake_up_messages_decode_into_a_wake_or_a_delivery() {
        assert!(matches!(Wake::parse(b"wtab-1"), Some(Wake::Session(s)) if s == "tab-1"));
        // What the functions publish: cjson's escapes (\" \u00e9 \/), ids as strings.
        let payload =
            br#"m["a.1796175406252000|7","tab \"1\"","1796175406252957","{\"x\":\"\u00e9\/\"}"]"#;
        let Some(Wake::Delivered {
            token,
            session,
            messages,
        }) = Wake::parse(payload)
        else {
            panic!("not a delivery");
        };
        assert_eq!(token, "a.1796175406252000|7");
        assert_eq!(session, r#"tab "1""#);
        assert_eq!(
            messages,
            vec![Message {
                id: 1_796_175_406_252_957,
                body: "{\"x\":\"\u{e9}/\"}".into()
            }]
        );
        assert!(Wake::parse(b"").is_none());
        assert!(Wake::parse(b"m[not json").is_none());
        assert!(Wake::parse(b"xsomething").is_none());
    }

    #[test]
    fn redacted_url_hides_the_password_only() {
        let settings = Settings {
            url: "redis://user:secret@127.0.0.1:6379/0".into(),
            prefix: "micromsg".into(),
            timeout: Duration::from_secs(1),
            node: "a".into(),
            broker: BrokerConfig::default(),
        };
        let shown = settings.redacted_url();
        assert!(!shown.contains("secret"), "{shown}");
        assert!(
            shown.contains("user") && shown.contains("127.0.0.1:6379"),
            "{shown}"
        );
    }
}
