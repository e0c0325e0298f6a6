//! msgbench — the micromsg load generator. See the crate documentation and
//! `msgbench --help`; `bench/run.sh` shows how it is used.

#![recursion_limit = "256"]

use std::borrow::Cow;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use futures_util::{FutureExt, SinkExt, StreamExt};
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, StatusCode, Uri};
use msgbench::churn;
use msgbench::client::{Connection, Reply};
use msgbench::fanout::{self, Inbox, Ledger};
use msgbench::procfs::{self, CpuDelta, Memory, Watched};
use msgbench::sse::{Event, EventParser};
use msgbench::websocket::{self, Flow, ServerFrame, Socket};
use msgbench::{raise_fd_limit, report, unix_micros};
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::Message as WsMessage;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Target {
    /// micromsg over the x0 protocol (POST /set, POST /python/MsgHandler.py); with
    /// --fanout over the /v1 API (POST /v1/subscribe, /v1/poll, /v1/publish).
    Micromsg,
    /// nginx + nchan long-poll (POST /pub?id=, GET /sub?id= with Etag/Last-Modified).
    Nchan,
    /// The bare `hello` server: counts answered requests only.
    Hello,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Micromsg => "micromsg",
            Target::Nchan => "nchan",
            Target::Hello => "hello",
        }
    }
}

/// How the subscriber sessions of the load scenario receive their messages. The
/// publishers send with x0 `POST /set` whichever it is, so every delivery carries the
/// same payload and is checked the same way.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Transport {
    /// Long-polling: x0 `POST /python/MsgHandler.py` for micromsg (nchan and hello:
    /// their own long-poll), one keep-alive connection per session.
    Poll,
    /// One WebSocket per session, `GET /v1/ws?session=sub<j>` (micromsg only).
    Ws,
    /// One event stream per session, `GET /v1/events?session=sub<j>` (micromsg only).
    Sse,
}

impl Transport {
    fn name(self) -> &'static str {
        match self {
            Transport::Poll => "poll",
            Transport::Ws => "ws",
            Transport::Sse => "sse",
        }
    }
}

/// Load generator for micromsg, nginx+nchan and the hello baseline.
///
/// P closed-loop publishers and S long-polling subscriber sessions, one persistent
/// HTTP/1.1 connection each, for a timed window; then a drain. Or (--idle) parked
/// long-polls only, or (--fanout) one channel message at a time to N subscribers.
/// Prints a table on stderr and one JSON line on stdout; exits 1 if anything was
/// lost, duplicated or misrouted (or nothing was delivered).
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    #[arg(long, value_enum, default_value = "micromsg")]
    target: Target,
    /// Base URL of the server. Repeated (or comma-separated), the load scenario
    /// spreads its sessions over several servers sharing one backend (msghandler +
    /// msgserver pairs over Redis): subscriber j polls URL[j % n], and a message to
    /// subscriber j is published via URL[(j + 1) % n], so that with n > 1 every
    /// message crosses from one server to another (each publisher holds a connection
    /// to every URL).
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:8080")]
    url: Vec<String>,
    /// Subscriber sessions (one long-poll connection each).
    #[arg(long, default_value_t = 100)]
    subscribers: usize,
    /// Closed-loop publishers (one connection each) [default: 4; 1 with --fanout].
    #[arg(long)]
    publishers: Option<usize>,
    /// Length of the timed window, in seconds.
    #[arg(long, default_value_t = 15.0)]
    duration: f64,
    /// Size of each payload (the JSON object delivered), in bytes.
    #[arg(long, default_value_t = 100)]
    payload_bytes: usize,
    /// Send the x0 client's CORS preflight (OPTIONS) before every request.
    #[arg(long)]
    preflight: bool,
    /// Subscribers wait this long between polls (backlog scenario).
    #[arg(long, default_value_t = 0)]
    poll_pause_ms: u64,
    /// Publishers send N messages per request with `POST /v1/publish_batch`
    /// (micromsg only; subscribers then receive /v1 envelopes) instead of one x0
    /// `POST /set` per message.
    #[arg(long, default_value_t = 0, value_name = "N")]
    publish_batch: usize,
    /// Publishers wait this long after each publish (light-load scenario: the
    /// latency of a parked poll's answer when nothing queues).
    #[arg(long, default_value_t = 0)]
    publish_pause_ms: u64,
    /// How the load scenario's subscribers receive (micromsg only for ws and sse):
    /// x0 long-poll; one WebSocket per session in fast flow (the server pushes every
    /// message as it comes and counts it acknowledged once written: no acks); or one
    /// event stream per session. Publishers send with x0 POST /set either way.
    #[arg(long, value_enum, default_value = "poll")]
    transport: Transport,
    /// With --transport ws: window flow instead of fast, at most N messages given
    /// and not acknowledged; the subscriber acks ({"op":"ack","ids":[...]}) what
    /// each read of the socket brought.
    #[arg(long, value_name = "N")]
    ws_window: Option<u32>,
    /// Idle scenario: hold this many parked long-polls (distinct sessions) for
    /// --duration and report memory per poll; no publishers.
    #[arg(long, default_value_t = 0)]
    idle: usize,
    /// Fan-out scenario (micromsg only): N subscriber sessions `fan<j>` on the channel
    /// `bench.fan`, one connection each; each publisher sends one message, waits
    /// until all N have it (or 5 s), then sends the next.
    #[arg(long, default_value_t = 0, value_name = "N")]
    fanout: usize,
    /// Churn scenario (micromsg only): --rounds rounds of N new sessions each. A
    /// session opens a connection, is sent one x0 message, polls it, leaves a second
    /// poll parked for a moment and closes the connection, as a browser tab that
    /// comes and goes. After each round the run waits until the servers' /metrics
    /// say they hold no more mailboxes, parked polls and connections than before
    /// the first, then reads their memory: what grows with the sessions ever seen.
    #[arg(long, default_value_t = 0, value_name = "N")]
    churn: usize,
    /// Rounds of the churn scenario.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Process name (/proc/<pid>/comm) whose CPU and memory to measure, all processes
    /// of that name summed; NAME:PID[,PID...] takes those pids and their children of
    /// that name instead. Repeatable.
    #[arg(long = "watch", value_name = "NAME")]
    watch: Vec<String>,
    /// Like --watch, for the servers' shared backend (redis-server): its CPU and
    /// memory are reported apart from the servers' (`backend_*` in the JSON line,
    /// with its share of servers + backend), not in the server CPU per message.
    /// Load scenario only. Repeatable.
    #[arg(long = "watch-backend", value_name = "NAME")]
    watch_backend: Vec<String>,
    /// Free text naming the servers' backend (e.g. `embedded`, `redis`), copied into
    /// the JSON line; the report gives each backend and number of URLs a column.
    #[arg(long, default_value = "")]
    backend: String,
    /// After the window: seconds to wait for the messages still under way.
    #[arg(long, default_value_t = 5.0)]
    drain: f64,
    /// Print only the JSON line.
    #[arg(long)]
    json: bool,
    /// Free text copied into the JSON line (run.sh: the scenario).
    #[arg(long, default_value = "")]
    label: String,
    /// Instead of running: read JSON result lines from FILE and print the markdown
    /// table of medians and ratios.
    #[arg(long, value_name = "FILE")]
    report: Option<PathBuf>,
}

impl Args {
    fn publishers(&self) -> usize {
        self.publishers
            .unwrap_or(if self.fanout > 0 { 1 } else { 4 })
    }

    /// The WebSocket subscribers' flow control.
    fn ws_flow(&self) -> Flow {
        self.ws_window.map_or(Flow::Fast, Flow::Window)
    }

    /// Publisher connections the run opens: one per publisher and URL.
    fn publisher_connections(&self) -> usize {
        self.publishers() * self.url.len().max(1)
    }

    /// Subscriber connections the run opens.
    fn subscriber_connections(&self) -> usize {
        if self.churn > 0 {
            CHURN_WORKERS.min(self.churn)
        } else if self.idle > 0 {
            self.idle
        } else if self.fanout > 0 {
            self.fanout
        } else {
            self.subscribers
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(path) = &args.report {
        return match report::markdown_from_file(path) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("msgbench: {error:#}");
                ExitCode::from(2)
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("msgbench: {error}");
            return ExitCode::from(2);
        }
    };
    // Whatever a server does, a run ends: connecting (10 s per connection, 100 at a
    // time), the window, the drain and a margin.
    let connections = args.subscriber_connections() + args.publisher_connections();
    let limit = args.duration.max(0.0)
        + args.drain.max(0.0)
        + args.rounds as f64
            * if args.churn > 0 {
                FORGET_LIMIT.as_secs_f64() + args.churn as f64 * 0.01
            } else {
                0.0
            }
        + 10.0 * (connections as f64 / 100.0).ceil()
        + 90.0;
    let bounded = runtime
        .block_on(async { tokio::time::timeout(Duration::from_secs_f64(limit), run(args)).await });
    match bounded {
        Ok(Ok(true)) => ExitCode::SUCCESS,
        Ok(Ok(false)) => ExitCode::from(1),
        Ok(Err(error)) => {
            eprintln!("msgbench: {error:#}");
            ExitCode::from(2)
        }
        Err(_) => {
            eprintln!("msgbench: the run did not finish within {limit:.0} s; gave up");
            ExitCode::from(2)
        }
    }
}

const ORIGIN: &str = "http://localhost:8000";
/// Longest wait for a publish or a preflight reply.
const REQUEST_LIMIT: Duration = Duration::from_secs(10);
/// Longest wait for a long-poll reply (the servers hold a poll for 10 s).
const POLL_LIMIT: Duration = Duration::from_secs(30);
/// Longest wait for a WebSocket's welcome or an event stream's head, connecting
/// included.
const OPEN_LIMIT: Duration = Duration::from_secs(10);
/// The most messages msghandler takes in one `/v1/publish_batch`.
const MAX_PUBLISH_BATCH: usize = 1000;
/// The largest window msghandler allows (`ws_max_window`'s default).
const MAX_WS_WINDOW: u32 = 1024;
const JSON_UTF8: &str = "application/json; charset=UTF-8";
/// What the x0 client's preflight asks for.
const PREFLIGHT_HEADERS: &str = "cache-control,content-type,upgrade-insecure-requests";
/// A long-poll through nchan also sends these, which are not CORS-safelisted.
const NCHAN_PREFLIGHT_HEADERS: &str = "if-modified-since,if-none-match";

/// Everything the tasks share.
struct Ctx {
    target: Target,
    /// How subscribers receive (load scenario), and a WebSocket's flow control.
    transport: Transport,
    ws_flow: Flow,
    preflight: bool,
    payload_bytes: usize,
    publishers: usize,
    subscribers: usize,
    poll_pause: Duration,
    /// Messages per publish request; 0: one x0 SET each.
    publish_batch: usize,
    publish_pause: Duration,
    /// The timed window in Unix microseconds; start is u64::MAX until it begins.
    window_start_us: AtomicU64,
    window_end_us: AtomicU64,
    /// Subscribers that have sent their first poll.
    first_polls: AtomicUsize,
    /// Publishes acknowledged, deliveries received (duplicates included): ends the drain.
    acked_total: AtomicU64,
    delivered_total: AtomicU64,
}

impl Ctx {
    fn in_window(&self, now_us: u64) -> bool {
        now_us >= self.window_start_us.load(Ordering::Relaxed)
            && now_us < self.window_end_us.load(Ordering::Relaxed)
    }
}

async fn run(args: Args) -> Result<bool> {
    if args.duration <= 0.0 || !args.duration.is_finite() {
        bail!("--duration must be positive");
    }
    if args.churn > 0 {
        if args.target != Target::Micromsg {
            bail!("--churn needs --target micromsg (it reads micromsg's /metrics)");
        }
        if args.idle > 0 || args.fanout > 0 || args.url.len() > 1 {
            bail!("--churn is a scenario of its own: no --idle, --fanout or several --url");
        }
        if args.rounds < 2 {
            bail!("--rounds must be at least 2 (growth is measured from the first round on)");
        }
    }
    if args.idle == 0 && (args.subscribers == 0 || args.publishers() == 0) {
        bail!("--subscribers and --publishers must be at least 1");
    }
    if args.idle > 0 && args.fanout > 0 {
        bail!("--idle and --fanout are separate scenarios");
    }
    if args.fanout > 0 && args.target != Target::Micromsg {
        bail!("--fanout needs --target micromsg (channels are a micromsg /v1 feature)");
    }
    if args.transport != Transport::Poll {
        let transport = args.transport.name();
        if args.target != Target::Micromsg {
            bail!("--transport {transport} needs --target micromsg");
        }
        if args.idle > 0 || args.fanout > 0 {
            bail!("--transport {transport} is for the load scenario, not --idle or --fanout");
        }
        if args.preflight || args.poll_pause_ms > 0 {
            bail!("--preflight and --poll-pause-ms are for long-polling subscribers");
        }
    }
    if args.publish_batch > 0 {
        if args.target != Target::Micromsg || args.idle > 0 || args.fanout > 0 {
            bail!("--publish-batch is for the load scenario with --target micromsg");
        }
        if args.publish_batch > MAX_PUBLISH_BATCH {
            bail!("--publish-batch must be 1 to {MAX_PUBLISH_BATCH}");
        }
    }
    if let Some(n) = args.ws_window {
        if args.transport != Transport::Ws {
            bail!("--ws-window needs --transport ws");
        }
        if !(1..=MAX_WS_WINDOW).contains(&n) {
            bail!("--ws-window must be 1 to {MAX_WS_WINDOW}");
        }
    }
    if args.url.len() > 1 && (args.idle > 0 || args.fanout > 0) {
        bail!("several --url are for the load scenario, not --idle or --fanout");
    }
    if !args.watch_backend.is_empty() && (args.idle > 0 || args.fanout > 0) {
        bail!("--watch-backend is for the load scenario, not --idle or --fanout");
    }
    let mut addrs = Vec::with_capacity(args.url.len());
    for url in &args.url {
        addrs.push(resolve(url).await?);
    }
    let addr = addrs[0];
    let fd_limit = raise_fd_limit().unwrap_or(0);
    let needed = (args.subscriber_connections() + args.publisher_connections() + 64) as u64;
    if fd_limit < needed {
        eprintln!(
            "msgbench: warning: open-file limit {fd_limit} is below the {needed} this run needs"
        );
    }
    let watched: Vec<Watched> = args.watch.iter().map(|n| Watched::find(n)).collect();
    let backend: Vec<Watched> = args
        .watch_backend
        .iter()
        .map(|n| Watched::find(n))
        .collect();
    for w in watched.iter().chain(&backend) {
        if w.pids.is_empty() {
            eprintln!("msgbench: warning: no process named {:?} to watch", w.name);
        }
    }
    let ctx = Arc::new(Ctx {
        target: args.target,
        transport: args.transport,
        ws_flow: args.ws_flow(),
        preflight: args.preflight,
        payload_bytes: args.payload_bytes,
        publishers: args.publishers(),
        subscribers: args.subscribers,
        poll_pause: Duration::from_millis(args.poll_pause_ms),
        publish_batch: args.publish_batch,
        publish_pause: Duration::from_millis(args.publish_pause_ms),
        window_start_us: AtomicU64::new(u64::MAX),
        window_end_us: AtomicU64::new(u64::MAX),
        first_polls: AtomicUsize::new(0),
        acked_total: AtomicU64::new(0),
        delivered_total: AtomicU64::new(0),
    });
    let (result, ok) = if args.churn > 0 {
        run_churn(&args, addr, &watched).await?
    } else if args.idle > 0 {
        run_idle(&args, addr, &ctx, &watched).await?
    } else if args.fanout > 0 {
        run_fanout(&args, addr, &ctx, &watched).await?
    } else {
        run_load(&args, &addrs, &ctx, &watched, &backend).await?
    };
    if !args.json {
        eprint!("{}", table(&args, &result));
    }
    println!("{}", serde_json::to_string(&result)?);
    Ok(ok)
}

async fn resolve(url: &str) -> Result<SocketAddr> {
    let rest = url
        .strip_prefix("http://")
        .context("--url must start with http://")?;
    let authority = rest.split('/').next().unwrap_or(rest);
    let authority = if authority.contains(':') {
        authority.to_string()
    } else {
        format!("{authority}:80")
    };
    tokio::net::lookup_host(&authority)
        .await?
        .next()
        .with_context(|| format!("cannot resolve {authority}"))
}

/// Opens `n` HTTP connections (see [`open_many`]).
async fn connect_many(addr: SocketAddr, n: usize) -> Result<Vec<Connection>> {
    open_many(n, move |_| Connection::open(addr)).await
}

/// Opens `n` connections of any kind, the `index`-th with `open(index)`, at most 100
/// handshakes at a time: listen backlogs can be as small as 128, and a dropped SYN
/// costs a one-second retransmission.
async fn open_many<T, F, Fut>(n: usize, open: F) -> Result<Vec<T>>
where
    T: Send + 'static,
    F: Fn(usize) -> Fut,
    Fut: Future<Output = Result<T>> + Send + 'static,
{
    let gate = Arc::new(Semaphore::new(100));
    let mut set = JoinSet::new();
    for index in 0..n {
        let permit = gate.clone().acquire_owned().await?;
        let opening = open(index);
        set.spawn(async move {
            let connection = opening.await;
            drop(permit);
            (index, connection)
        });
    }
    let mut slots: Vec<Option<T>> = (0..n).map(|_| None).collect();
    while let Some(joined) = set.join_next().await {
        let (index, connection) = joined?;
        slots[index] = Some(connection?);
    }
    Ok(slots
        .into_iter()
        .map(|c| c.expect("every slot filled"))
        .collect())
}

/// Waits until `n` subscribers have sent their first poll, or `limit` has passed.
async fn await_first_polls(ctx: &Ctx, n: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    while ctx.first_polls.load(Ordering::Relaxed) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Starts the timed window now; returns when it started and when it ends.
fn open_window(ctx: &Ctx, duration: Duration) -> (Instant, Instant) {
    let start = Instant::now();
    let start_us = unix_micros();
    ctx.window_end_us
        .store(start_us + duration.as_micros() as u64, Ordering::Relaxed);
    ctx.window_start_us.store(start_us, Ordering::Relaxed);
    (start, start + duration)
}

/// After the window: waits while messages are still under way (`pending`), for at
/// most `limit`.
async fn drain_while(pending: impl Fn() -> bool, limit: Duration) {
    let deadline = Instant::now() + limit;
    while pending() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// What every task of `set` returned, in the order they ended.
async fn join_all<T: 'static>(mut set: JoinSet<T>) -> Result<Vec<T>> {
    let mut results = Vec::with_capacity(set.len());
    while let Some(joined) = set.join_next().await {
        results.push(joined?);
    }
    Ok(results)
}

// ---------------------------------------------------------------------------------
// Requests

fn payload(seq: u64, publisher: usize, dst: usize, ts: u64, size: usize) -> String {
    padded(
        format!(r#"{{"seq":{seq},"pub":{publisher},"dst":"sub{dst}","ts":{ts},"pad":""#),
        size,
    )
}

/// The fan-out scenario's payload: one message for every subscriber, so no `dst`,
/// and one sequence for all publishers, so no `pub`.
fn fan_payload(seq: u64, ts: u64, size: usize) -> String {
    padded(format!(r#"{{"seq":{seq},"ts":{ts},"pad":""#), size)
}

/// Ends `text`, a JSON object up to an open `"pad":"` string, with as many `x` as
/// make it `size` bytes (none when it is already longer: a message is never cut).
fn padded(mut text: String, size: usize) -> String {
    let pad = size.saturating_sub(text.len() + 2);
    text.extend(std::iter::repeat_n('x', pad));
    text.push_str("\"}");
    text
}

fn post(
    uri: &str,
    host: &HeaderValue,
    body: impl Into<Bytes>,
    origin: bool,
) -> Request<Full<Bytes>> {
    let mut builder = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(header::HOST, host.clone())
        .header(header::CONTENT_TYPE, JSON_UTF8);
    if origin {
        builder = builder.header(header::ORIGIN, ORIGIN);
    }
    builder.body(Full::new(body.into())).expect("valid request")
}

fn preflight_request(
    uri: &str,
    host: &HeaderValue,
    method: &str,
    headers: &str,
) -> Request<Full<Bytes>> {
    Request::builder()
        .method(Method::OPTIONS)
        .uri(uri)
        .header(header::HOST, host.clone())
        .header(header::ORIGIN, ORIGIN)
        .header(header::ACCESS_CONTROL_REQUEST_METHOD, method)
        .header(header::ACCESS_CONTROL_REQUEST_HEADERS, headers)
        .body(Full::new(Bytes::new()))
        .expect("valid request")
}

/// Sends the preflight; true when it was answered with a 2xx.
async fn send_preflight(
    connection: &mut Connection,
    uri: &str,
    method: &str,
    headers: &str,
) -> bool {
    let request = preflight_request(uri, &connection.host, method, headers);
    matches!(connection.send(request, REQUEST_LIMIT).await, Ok(reply) if reply.status.is_success())
}

#[derive(Deserialize)]
struct PublishReply<'a> {
    #[serde(borrow, default)]
    status: Option<Cow<'a, str>>,
    #[serde(default)]
    error: bool,
    #[serde(default)]
    dropped: u64,
}

#[derive(Deserialize)]
struct PollReply<'a> {
    #[serde(borrow, default)]
    messages: Option<Vec<Delivered<'a>>>,
    #[serde(default)]
    error: bool,
}

/// An x0 poll's reply when the messages were sent through `/v1`.
#[derive(Deserialize)]
struct EnvelopePollReply<'a> {
    #[serde(borrow, default)]
    messages: Option<Vec<LoadEnvelope<'a>>>,
    #[serde(default)]
    error: bool,
}

#[derive(Deserialize)]
struct LoadEnvelope<'a> {
    #[serde(borrow, default)]
    source: Option<Cow<'a, str>>,
    #[serde(borrow)]
    data: Delivered<'a>,
}

#[derive(Deserialize)]
struct Delivered<'a> {
    seq: u64,
    #[serde(rename = "pub")]
    publisher: u32,
    #[serde(borrow)]
    dst: Cow<'a, str>,
    ts: u64,
    #[serde(borrow, default)]
    session_src: Option<Cow<'a, str>>,
}

/// The start of a reply's body, for error messages.
fn excerpt(reply: &Reply) -> Cow<'_, str> {
    String::from_utf8_lossy(&reply.body[..reply.body.len().min(200)])
}

/// Keeps the first error text of each task, for the report.
fn note(slot: &mut Option<String>, text: impl FnOnce() -> String) {
    if slot.is_none() {
        *slot = Some(text());
    }
}

// ---------------------------------------------------------------------------------
// Publishers

#[derive(Default)]
struct PubStats {
    /// The publisher's number (`pub<index>`).
    index: usize,
    /// Messages sent (sequence numbers 0..sent).
    sent: u64,
    /// Sequence numbers the server acknowledged.
    acked: Vec<u32>,
    /// Messages the server said it dropped from a full mailbox.
    dropped: u64,
    errors: u64,
    requests: u64,
    cors_missing: u64,
    reconnects: u64,
    first_error: Option<String>,
}

/// Publisher `index`: closed loop over `connections`, one per URL; the message to
/// subscriber `dst` goes via `connections[(dst + 1) % len]` (subscriber `dst` polls
/// URL `dst % len`).
async fn publisher(
    ctx: Arc<Ctx>,
    index: usize,
    mut connections: Vec<Connection>,
    end: Instant,
) -> PubStats {
    let mut stats = PubStats {
        index,
        ..PubStats::default()
    };
    let (p, s) = (ctx.publishers, ctx.subscribers);
    let mut seq: u64 = 0;
    while Instant::now() < end {
        if !ctx.publish_pause.is_zero() && seq > 0 {
            tokio::time::sleep(ctx.publish_pause).await;
        }
        if ctx.publish_batch > 0 {
            publish_batch(&ctx, index, &mut connections, &mut seq, &mut stats).await;
            continue;
        }
        let dst = recipient(index, seq, p, s);
        let via = (dst + 1) % connections.len();
        let connection = &mut connections[via];
        let ts = unix_micros();
        let body = payload(seq, index, dst, ts, ctx.payload_bytes);
        let (uri, body) = match ctx.target {
            Target::Micromsg | Target::Hello => (
                Cow::Borrowed("/set"),
                format!(
                    r#"{{"session_src":"pub{index}","session_dst":"sub{dst}","payload":{body}}}"#
                ),
            ),
            Target::Nchan => (Cow::Owned(format!("/pub?id=sub{dst}")), body),
        };
        stats.sent += 1;
        if let Some(reply) = send_publish(&ctx, connection, &uri, body, &mut stats).await {
            match publish_outcome(ctx.target, &reply) {
                Ok(dropped) => {
                    stats.acked.push(seq as u32);
                    stats.dropped += dropped;
                    ctx.acked_total.fetch_add(1, Ordering::Relaxed);
                }
                Err(text) => {
                    stats.errors += 1;
                    note(&mut stats.first_error, || text);
                }
            }
        }
        seq += 1;
    }
    stats.reconnects = connections.iter().map(|c| c.reconnects).sum();
    stats
}

/// The subscriber that publisher `index`'s message `seq` goes to: publishers take
/// turns over the subscribers, so that each gets its share from every publisher.
fn recipient(index: usize, seq: u64, publishers: usize, subscribers: usize) -> usize {
    (index + seq as usize * publishers) % subscribers
}

/// Whether a reply to a cross-origin request (one the run sent preflights for)
/// lacks the header a browser needs to read it.
fn lacks_cors(ctx: &Ctx, reply: &Reply) -> bool {
    ctx.preflight
        && !reply
            .headers
            .contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN)
}

/// Sends one publish request, after its preflight when the run sends them: the
/// reply, or `None` when no reply came (counted and noted in `stats`).
async fn send_publish(
    ctx: &Ctx,
    connection: &mut Connection,
    uri: &str,
    body: String,
    stats: &mut PubStats,
) -> Option<Reply> {
    if ctx.preflight {
        stats.requests += 1;
        if !send_preflight(connection, uri, "POST", PREFLIGHT_HEADERS).await {
            stats.errors += 1;
            note(&mut stats.first_error, || "publish preflight failed".into());
        }
    }
    stats.requests += 1;
    let request = post(uri, &connection.host, body, ctx.preflight);
    match connection.send(request, REQUEST_LIMIT).await {
        Ok(reply) => {
            stats.cors_missing += u64::from(lacks_cors(ctx, &reply));
            Some(reply)
        }
        Err(error) => {
            stats.errors += 1;
            note(&mut stats.first_error, || format!("publish: {error:#}"));
            tokio::time::sleep(Duration::from_millis(10)).await;
            None
        }
    }
}

/// One `/v1/publish_batch` of `ctx.publish_batch` messages, numbered on from `seq`,
/// through the connection of the first message's recipient (with several URLs the
/// rest of the batch crosses over as well, or not).
async fn publish_batch(
    ctx: &Ctx,
    index: usize,
    connections: &mut [Connection],
    seq: &mut u64,
    stats: &mut PubStats,
) {
    let (p, s) = (ctx.publishers, ctx.subscribers);
    let first = *seq;
    let n = ctx.publish_batch as u64;
    let mut body = format!(r#"{{"session":"pub{index}","messages":["#);
    for k in first..first + n {
        let dst = recipient(index, k, p, s);
        if k > first {
            body.push(',');
        }
        let data = payload(k, index, dst, unix_micros(), ctx.payload_bytes);
        body.push_str(&format!(
            r#"{{"target":{{"session":"sub{dst}"}},"data":{data}}}"#
        ));
    }
    body.push_str("]}");
    *seq += n;
    stats.sent += n;
    let via = (recipient(index, first, p, s) + 1) % connections.len();
    let connection = &mut connections[via];
    let Some(reply) = send_publish(ctx, connection, "/v1/publish_batch", body, stats).await else {
        return;
    };
    #[derive(Deserialize)]
    struct BatchReply {
        results: Vec<BatchResult>,
    }
    #[derive(Deserialize)]
    struct BatchResult {
        #[serde(default)]
        id: Option<u64>,
        #[serde(default)]
        dropped: u64,
    }
    let describe = || format!("publish answered {}: {}", reply.status, excerpt(&reply));
    match serde_json::from_slice::<BatchReply>(&reply.body) {
        Ok(parsed) if reply.status == StatusCode::OK && parsed.results.len() == n as usize => {
            for (k, result) in (first..).zip(parsed.results) {
                if result.id.is_some() {
                    stats.acked.push(k as u32);
                    stats.dropped += result.dropped;
                    ctx.acked_total.fetch_add(1, Ordering::Relaxed);
                } else {
                    stats.errors += 1;
                    note(&mut stats.first_error, describe);
                }
            }
        }
        _ => {
            stats.errors += 1;
            note(&mut stats.first_error, describe);
        }
    }
}

/// Ok(messages dropped by the server) when the publish was accepted.
fn publish_outcome(target: Target, reply: &Reply) -> Result<u64, String> {
    let describe = || format!("publish answered {}: {}", reply.status, excerpt(reply));
    match target {
        Target::Micromsg => {
            if reply.status != StatusCode::OK {
                return Err(describe());
            }
            match serde_json::from_slice::<PublishReply>(&reply.body) {
                Ok(r) if !r.error && r.status.as_deref() == Some("ok") => Ok(r.dropped),
                _ => Err(describe()),
            }
        }
        // 201: delivered to a waiting subscriber; 202: queued.
        Target::Nchan if reply.status.is_success() => Ok(0),
        Target::Hello if reply.status == StatusCode::OK => Ok(0),
        _ => Err(describe()),
    }
}

// ---------------------------------------------------------------------------------
// Subscribers

/// One received message: 16 bytes, kept until the end of the run.
#[derive(Clone, Copy)]
struct Delivery {
    publisher: u32,
    seq: u32,
    latency_us: u32,
    in_window: bool,
}

#[derive(Default)]
struct SubStats {
    deliveries: Vec<Delivery>,
    misrouted: u64,
    wrong_sender: u64,
    errors: u64,
    /// Requests (polls and preflights) answered inside the window.
    requests_in_window: u64,
    polls_in_window: u64,
    /// Polls (WebSocket: reads of the socket; SSE: chunks of the stream) that
    /// brought at least one message, and how many messages they brought.
    polls_with_messages: u64,
    messages_in_polls: u64,
    /// Ack frames sent (WebSocket in window flow).
    acks: u64,
    cors_missing: u64,
    reconnects: u64,
    first_error: Option<String>,
}

/// Where a nchan long-poll subscriber is in its channel's queue.
#[derive(Default)]
struct NchanCursor {
    last_modified: Option<HeaderValue>,
    etag: Option<HeaderValue>,
}

async fn subscriber(
    ctx: Arc<Ctx>,
    session: String,
    mut connection: Connection,
    mut stop: watch::Receiver<bool>,
) -> SubStats {
    let mut stats = SubStats::default();
    let mut cursor = NchanCursor::default();
    let poll_body = Bytes::from(format!(
        r#"{{"session_src":"{session}","type":"GET","SessionData":{{"ID":"SYS_SESSION","Value":"{session}"}}}}"#
    ));
    let nchan_uri = format!("/sub?id={session}");
    let mut first = true;
    loop {
        let uri = match ctx.target {
            Target::Nchan => nchan_uri.clone(),
            _ => format!("/python/MsgHandler.py?a__={}", fastrand::u64(..)),
        };
        let (method, method_name, asked) = match ctx.target {
            Target::Nchan => (Method::GET, "GET", NCHAN_PREFLIGHT_HEADERS),
            _ => (Method::POST, "POST", PREFLIGHT_HEADERS),
        };
        if first {
            ctx.first_polls.fetch_add(1, Ordering::Relaxed);
            first = false;
        }
        if ctx.preflight {
            let ok = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break,
                ok = send_preflight(&mut connection, &uri, method_name, asked) => ok,
            };
            if ctx.in_window(unix_micros()) {
                stats.requests_in_window += 1;
            }
            if !ok {
                stats.errors += 1;
                note(&mut stats.first_error, || "poll preflight failed".into());
            }
        }
        let mut builder = Request::builder()
            .method(method)
            .uri(uri.parse::<Uri>().expect("valid uri"))
            .header(header::HOST, connection.host.clone());
        if ctx.preflight {
            builder = builder.header(header::ORIGIN, ORIGIN);
        }
        let request = match ctx.target {
            Target::Nchan => {
                if let Some(value) = &cursor.last_modified {
                    builder = builder.header(header::IF_MODIFIED_SINCE, value.clone());
                }
                if let Some(value) = &cursor.etag {
                    builder = builder.header(header::IF_NONE_MATCH, value.clone());
                }
                builder.body(Full::new(Bytes::new()))
            }
            _ => builder
                .header(header::CONTENT_TYPE, JSON_UTF8)
                .body(Full::new(poll_body.clone())),
        }
        .expect("valid request");
        let result = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            result = connection.send(request, POLL_LIMIT) => result,
        };
        let now_us = unix_micros();
        let in_window = ctx.in_window(now_us);
        if in_window {
            stats.requests_in_window += 1;
            stats.polls_in_window += 1;
        }
        match result {
            Ok(reply) => {
                stats.cors_missing += u64::from(lacks_cors(&ctx, &reply));
                let before = stats.deliveries.len();
                handle_poll_reply(&ctx, &session, &reply, now_us, &mut cursor, &mut stats);
                count_batch(&ctx, &mut stats, before);
            }
            Err(error) => {
                stats.errors += 1;
                note(&mut stats.first_error, || format!("poll: {error:#}"));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        if !ctx.poll_pause.is_zero() {
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break,
                _ = tokio::time::sleep(ctx.poll_pause) => {}
            }
        }
    }
    stats.reconnects = connection.reconnects;
    stats
}

fn handle_poll_reply(
    ctx: &Ctx,
    session: &str,
    reply: &Reply,
    now_us: u64,
    cursor: &mut NchanCursor,
    stats: &mut SubStats,
) {
    let bad = |stats: &mut SubStats, what: &str| {
        stats.errors += 1;
        note(&mut stats.first_error, || {
            format!("{what}: {} {}", reply.status, excerpt(reply))
        });
    };
    match ctx.target {
        Target::Micromsg | Target::Hello => {
            if reply.status != StatusCode::OK {
                return bad(stats, "poll answered");
            }
            if ctx.publish_batch > 0 {
                // /v1 messages: an x0 poll is given their envelopes.
                return match serde_json::from_slice::<EnvelopePollReply>(&reply.body) {
                    Ok(parsed) if !parsed.error => {
                        for envelope in parsed.messages.into_iter().flatten() {
                            let mut message = envelope.data;
                            message.session_src = envelope.source;
                            record(ctx, session, &message, now_us, true, stats);
                        }
                    }
                    _ => bad(stats, "poll answered"),
                };
            }
            match serde_json::from_slice::<PollReply>(&reply.body) {
                Ok(parsed) if !parsed.error => {
                    for message in parsed.messages.into_iter().flatten() {
                        record(ctx, session, &message, now_us, true, stats);
                    }
                }
                _ => bad(stats, "poll answered"),
            }
        }
        Target::Nchan => match reply.status {
            StatusCode::OK => {
                if let Some(value) = reply.headers.get(header::LAST_MODIFIED) {
                    cursor.last_modified = Some(value.clone());
                }
                if let Some(value) = reply.headers.get(header::ETAG) {
                    cursor.etag = Some(value.clone());
                }
                // One message, or several as multipart/mixed parts: every payload is
                // one JSON object on a line of its own, the rest is multipart framing.
                for line in reply.body.split(|&b| b == b'\n') {
                    let line = line.strip_suffix(b"\r").unwrap_or(line);
                    if line.first() != Some(&b'{') {
                        continue;
                    }
                    match serde_json::from_slice::<Delivered>(line) {
                        Ok(message) => record(ctx, session, &message, now_us, false, stats),
                        Err(_) => bad(stats, "unreadable nchan message"),
                    }
                }
            }
            // Long-poll timed out (408) or nothing new (304): poll again from the same place.
            StatusCode::REQUEST_TIMEOUT | StatusCode::NOT_MODIFIED => {}
            _ => bad(stats, "poll answered"),
        },
    }
}

/// The deliveries recorded since there were `before` came in one batch: one poll
/// reply, one read of a WebSocket, one chunk of an event stream.
fn count_batch(ctx: &Ctx, stats: &mut SubStats, before: usize) {
    let got = (stats.deliveries.len() - before) as u64;
    if got > 0 {
        stats.polls_with_messages += 1;
        stats.messages_in_polls += got;
        ctx.delivered_total.fetch_add(got, Ordering::Relaxed);
    }
}

/// Checks one delivered payload (`dst`, and the `session_src` msghandler adds when
/// `expect_sender`) and keeps its (publisher, seq) and latency for the summary.
fn record(
    ctx: &Ctx,
    session: &str,
    message: &Delivered,
    now_us: u64,
    expect_sender: bool,
    stats: &mut SubStats,
) {
    if message.dst != session {
        stats.misrouted += 1;
        note(&mut stats.first_error, || {
            format!("{session} was given a message for {}", message.dst)
        });
        return;
    }
    if expect_sender {
        let expected = format!("pub{}", message.publisher);
        if message.session_src.as_deref() != Some(expected.as_str()) {
            stats.wrong_sender += 1;
        }
    }
    stats.deliveries.push(Delivery {
        publisher: message.publisher,
        seq: message.seq.min(u32::MAX as u64) as u32,
        latency_us: now_us.saturating_sub(message.ts).min(u32::MAX as u64) as u32,
        in_window: now_us < ctx.window_end_us.load(Ordering::Relaxed),
    });
}

/// Session `session`'s WebSocket subscriber: reads `message` frames until stopped.
/// In window flow it acknowledges, after each read of the socket, the messages that
/// read brought (the first frame and every frame already there behind it); in fast
/// flow it sends nothing. Nothing ends a connection during a run: if one ends
/// anyway, that is an error and the session connects again.
async fn ws_subscriber(
    ctx: Arc<Ctx>,
    addr: SocketAddr,
    session: String,
    mut socket: Socket,
    mut stop: watch::Receiver<bool>,
) -> SubStats {
    let mut stats = SubStats::default();
    ctx.first_polls.fetch_add(1, Ordering::Relaxed);
    let windowed = ctx.ws_flow.window().is_some();
    let mut acks = Vec::new();
    'run: loop {
        let first = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            next = socket.next() => next,
        };
        let before = stats.deliveries.len();
        let mut next = Some(first);
        let mut ended = None;
        while let Some(item) = next.take() {
            let text = match item {
                Some(Ok(WsMessage::Text(text))) => Bytes::from(text),
                // docs/TRANSPORTS.md: binary frames carry the same JSON.
                Some(Ok(WsMessage::Binary(bytes))) => bytes,
                Some(Ok(WsMessage::Close(frame))) => {
                    ended = Some(format!("closed by the server: {frame:?}"));
                    break;
                }
                // Pings are answered by tungstenite itself.
                Some(Ok(_)) => Bytes::new(),
                Some(Err(error)) => {
                    ended = Some(error.to_string());
                    break;
                }
                None => {
                    ended = Some("the connection ended".to_owned());
                    break;
                }
            };
            if !text.is_empty()
                && let Some(id) = handle_ws_frame(&ctx, &session, &text, unix_micros(), &mut stats)
                && windowed
            {
                acks.push(id);
            }
            // What already arrived behind it is part of the same read.
            next = socket.next().now_or_never();
        }
        count_batch(&ctx, &mut stats, before);
        if !acks.is_empty() && ended.is_none() {
            stats.acks += 1;
            let frame = WsMessage::text(websocket::ack_frame(&acks));
            acks.clear();
            if let Err(error) = socket.send(frame).await {
                ended = Some(format!("sending an ack: {error}"));
            }
        }
        let Some(why) = ended else { continue };
        // Given and not acknowledged goes back to the core with the connection, and
        // comes again on the next: counted as duplicated if it had arrived.
        acks.clear();
        stats.errors += 1;
        note(&mut stats.first_error, || format!("websocket: {why}"));
        loop {
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break 'run,
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
            match websocket::connect(addr, &session, ctx.ws_flow, OPEN_LIMIT).await {
                Ok(reopened) => {
                    socket = reopened;
                    stats.reconnects += 1;
                    break;
                }
                Err(error) => {
                    stats.errors += 1;
                    note(&mut stats.first_error, || format!("websocket: {error:#}"));
                }
            }
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), socket.close(None)).await;
    stats
}

/// One frame from a subscriber's WebSocket: a message is checked and recorded as a
/// poll's would be, an `error` frame counts as an error, other answers are ignored.
/// Returns the id of a message, for the ack.
fn handle_ws_frame(
    ctx: &Ctx,
    session: &str,
    text: &[u8],
    now_us: u64,
    stats: &mut SubStats,
) -> Option<u64> {
    let describe = || String::from_utf8_lossy(&text[..text.len().min(200)]).into_owned();
    match serde_json::from_slice::<ServerFrame<Delivered>>(text) {
        Ok(frame) if frame.op == "message" => match (frame.id, frame.message) {
            (Some(id), Some(message)) => {
                record(ctx, session, &message, now_us, true, stats);
                Some(id)
            }
            _ => {
                stats.errors += 1;
                note(&mut stats.first_error, || {
                    format!("a message frame without id or message: {}", describe())
                });
                None
            }
        },
        Ok(frame) if frame.op == "error" => {
            stats.errors += 1;
            note(&mut stats.first_error, || {
                format!(
                    "websocket error frame: {} {}",
                    frame.exception_id.as_deref().unwrap_or(""),
                    frame.exception.as_deref().unwrap_or("")
                )
            });
            None
        }
        Ok(_) => None,
        Err(_) => {
            stats.errors += 1;
            note(&mut stats.first_error, || {
                format!("unreadable websocket frame: {}", describe())
            });
            None
        }
    }
}

/// Opens session `session`'s event stream on `connection`, resuming after
/// `last_event_id` when there is one (as EventSource does on reconnect); returns its
/// body once the head said 200 `text/event-stream`.
async fn open_events(
    connection: &mut Connection,
    session: &str,
    last_event_id: Option<&str>,
) -> Result<Incoming> {
    let mut builder = Request::builder()
        .method(Method::GET)
        .uri(format!("/v1/events?session={session}"))
        .header(header::HOST, connection.host.clone())
        .header(header::ACCEPT, "text/event-stream");
    if let Some(id) = last_event_id {
        builder = builder.header("last-event-id", id);
    }
    let request = builder.body(Full::new(Bytes::new()))?;
    let response = connection.open_stream(request, OPEN_LIMIT).await?;
    let is_stream = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if response.status() == StatusCode::OK && is_stream {
        return Ok(response.into_body());
    }
    let status = response.status();
    let body = tokio::time::timeout(REQUEST_LIMIT, response.into_body().collect())
        .await
        .ok()
        .and_then(Result::ok)
        .map(|body| body.to_bytes())
        .unwrap_or_default();
    bail!(
        "GET /v1/events?session={session} answered {status}: {}",
        String::from_utf8_lossy(&body[..body.len().min(200)])
    )
}

/// Session `session`'s SSE subscriber: reads the event stream until stopped, each
/// chunk as it comes. Nothing ends a stream during a run: if one ends anyway, that
/// is an error and the session opens it again with `Last-Event-ID`, as EventSource
/// would.
async fn sse_subscriber(
    ctx: Arc<Ctx>,
    session: String,
    mut connection: Connection,
    mut body: Incoming,
    mut stop: watch::Receiver<bool>,
) -> SubStats {
    let mut stats = SubStats::default();
    ctx.first_polls.fetch_add(1, Ordering::Relaxed);
    let mut parser = EventParser::default();
    let mut events = Vec::new();
    'run: loop {
        let frame = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            frame = body.frame() => frame,
        };
        let why = match frame {
            Some(Ok(frame)) => {
                if let Some(chunk) = frame.data_ref() {
                    let now_us = unix_micros();
                    parser.feed(chunk, &mut events);
                    let before = stats.deliveries.len();
                    for event in events.drain(..) {
                        handle_event(&ctx, &session, &event, now_us, &mut stats);
                    }
                    count_batch(&ctx, &mut stats, before);
                }
                continue;
            }
            Some(Err(error)) => format!("event stream: {error}"),
            None => "the event stream ended".to_owned(),
        };
        stats.errors += 1;
        note(&mut stats.first_error, || why);
        parser.restart();
        loop {
            tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break 'run,
                _ = tokio::time::sleep(Duration::from_millis(10)) => {}
            }
            match open_events(&mut connection, &session, parser.last_event_id()).await {
                Ok(reopened) => {
                    body = reopened;
                    stats.reconnects += 1;
                    break;
                }
                Err(error) => {
                    stats.errors += 1;
                    note(&mut stats.first_error, || format!("{error:#}"));
                }
            }
        }
    }
    stats
}

/// One event of a subscriber's stream: a `message` is checked and recorded as a
/// poll's would be; an `error` event (the last of a stream the server refused)
/// counts as an error.
fn handle_event(ctx: &Ctx, session: &str, event: &Event, now_us: u64, stats: &mut SubStats) {
    match event.kind.as_str() {
        "message" => match serde_json::from_str::<Delivered>(&event.data) {
            Ok(message) => record(ctx, session, &message, now_us, true, stats),
            Err(_) => {
                stats.errors += 1;
                note(&mut stats.first_error, || {
                    format!("unreadable event (id {:?}): {:.200}", event.id, event.data)
                });
            }
        },
        "error" => {
            stats.errors += 1;
            note(&mut stats.first_error, || {
                format!("the event stream ended with an error: {:.200}", event.data)
            });
        }
        _ => {}
    }
}

// ---------------------------------------------------------------------------------
// The load scenario

async fn run_load(
    args: &Args,
    addrs: &[SocketAddr],
    ctx: &Arc<Ctx>,
    watched: &[Watched],
    backend: &[Watched],
) -> Result<(Value, bool)> {
    let s = args.subscribers;
    let p = args.publishers();
    let n = addrs.len();
    let connections = SubscriberConnections::open(ctx, addrs, s).await?;
    // Publisher i's connection to URL u is the (i * n + u)-th.
    let mut opened = open_many(p * n, |k| Connection::open(addrs[k % n]))
        .await?
        .into_iter();
    let pub_connections: Vec<Vec<Connection>> =
        (0..p).map(|_| opened.by_ref().take(n).collect()).collect();
    let (stop_tx, stop_rx) = watch::channel(false);
    let subscribers = connections.spawn(ctx, addrs, &stop_rx);
    // Every subscriber's first poll parked before the window starts.
    await_first_polls(ctx, s, Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // The backend is sampled with the servers, so that its CPU does not count as
    // other processes' (which would mark the run disturbed), then split off.
    let all: Vec<Watched> = watched.iter().chain(backend).cloned().collect();
    let (start, end) = open_window(ctx, Duration::from_secs_f64(args.duration));
    let cpu_before = procfs::cpu_sample(&all);

    let mut publishers = JoinSet::new();
    for (i, connections) in pub_connections.into_iter().enumerate() {
        publishers.spawn(publisher(ctx.clone(), i, connections, end));
    }
    tokio::time::sleep_until(end.into()).await;
    let cpu_after = procfs::cpu_sample(&all);
    let window = start.elapsed().as_secs_f64();
    let mut memory = memory_now(&all);
    let backend_memory = memory.split_off(watched.len());
    let mut cpu = CpuDelta::between(&cpu_before, &cpu_after);
    let backend_cpu = cpu.watched.split_off(watched.len());

    let pub_stats = join_all(publishers).await?;
    let drained = if ctx.target == Target::Hello {
        0.0
    } else {
        let pending = || {
            ctx.delivered_total.load(Ordering::Relaxed) < ctx.acked_total.load(Ordering::Relaxed)
        };
        let drain_start = Instant::now();
        drain_while(pending, Duration::from_secs_f64(args.drain.max(0.0))).await;
        drain_start.elapsed().as_secs_f64()
    };
    let _ = stop_tx.send(true);
    let sub_stats = join_all(subscribers).await?;
    let (mut result, ok) = summarize_load(
        args, ctx, watched, window, drained, &cpu, &memory, pub_stats, sub_stats,
    );
    if !backend.is_empty() {
        add_backend_usage(&mut result, backend, &backend_cpu, &backend_memory, window);
    }
    Ok((result, ok))
}

/// Adds the backend's CPU and memory (`cpu` over the `window`, `memory` at its end)
/// to a load run's JSON line: per delivered message and as a share of the servers'
/// and the backend's CPU together.
fn add_backend_usage(
    result: &mut Value,
    backend: &[Watched],
    cpu: &[f64],
    memory: &[Memory],
    window: f64,
) {
    let backend_cpu: f64 = cpu.iter().sum();
    let server_cpu = result["server_cpu_s"].as_f64().unwrap_or(0.0);
    let delivered = result["delivered_in_window"].as_u64().unwrap_or(0);
    let per_msg = |cpu: f64| {
        if delivered > 0 {
            cpu * 1e6 / delivered as f64
        } else {
            0.0
        }
    };
    let both = server_cpu + backend_cpu;
    let usage = json!({
        "backend_cpu_s": by_name(backend, cpu, |s| json!(round(*s, 3))),
        "backend_cpu_total_s": round(backend_cpu, 3),
        "backend_cores": round(backend_cpu / window, 3),
        "backend_cpu_us_per_msg": round(per_msg(backend_cpu), 2),
        "backend_cpu_share": round(if both > 0.0 { backend_cpu / both } else { 0.0 }, 4),
        "server_and_backend_cpu_us_per_msg": round(per_msg(both), 2),
        "backend_rss_kb": by_name(backend, memory, |m| json!(m.rss_kb)),
        "backend_pss_kb": by_name(backend, memory, |m| json!(m.pss_kb)),
    });
    if let (Some(result), Value::Object(usage)) = (result.as_object_mut(), usage) {
        result.extend(usage);
    }
}

/// The subscribers' connections of the load scenario, opened (and for a WebSocket
/// welcomed, for an event stream answered) before any publisher connects.
enum SubscriberConnections {
    Poll(Vec<Connection>),
    Ws(Vec<Socket>),
    Sse(Vec<(Connection, Incoming)>),
}

impl SubscriberConnections {
    /// One per session `sub<j>`, j < `n`, for `ctx`'s transport, to `addrs[j % len]`.
    async fn open(ctx: &Ctx, addrs: &[SocketAddr], n: usize) -> Result<Self> {
        let addr_of = |j: usize| addrs[j % addrs.len()];
        Ok(match ctx.transport {
            Transport::Poll => {
                SubscriberConnections::Poll(open_many(n, |j| Connection::open(addr_of(j))).await?)
            }
            Transport::Ws => {
                let flow = ctx.ws_flow;
                SubscriberConnections::Ws(
                    open_many(n, move |j| {
                        let addr = addr_of(j);
                        async move {
                            websocket::connect(addr, &format!("sub{j}"), flow, OPEN_LIMIT).await
                        }
                    })
                    .await?,
                )
            }
            Transport::Sse => SubscriberConnections::Sse(
                open_many(n, move |j| {
                    let addr = addr_of(j);
                    async move {
                        let mut connection = Connection::open(addr).await?;
                        let body = open_events(&mut connection, &format!("sub{j}"), None).await?;
                        Ok((connection, body))
                    }
                })
                .await?,
            ),
        })
    }

    /// Starts a subscriber task on each.
    fn spawn(
        self,
        ctx: &Arc<Ctx>,
        addrs: &[SocketAddr],
        stop: &watch::Receiver<bool>,
    ) -> JoinSet<SubStats> {
        let mut set = JoinSet::new();
        let session = |j: usize| format!("sub{j}");
        match self {
            SubscriberConnections::Poll(connections) => {
                for (j, connection) in connections.into_iter().enumerate() {
                    set.spawn(subscriber(
                        ctx.clone(),
                        session(j),
                        connection,
                        stop.clone(),
                    ));
                }
            }
            SubscriberConnections::Ws(sockets) => {
                for (j, socket) in sockets.into_iter().enumerate() {
                    set.spawn(ws_subscriber(
                        ctx.clone(),
                        addrs[j % addrs.len()],
                        session(j),
                        socket,
                        stop.clone(),
                    ));
                }
            }
            SubscriberConnections::Sse(streams) => {
                for (j, (connection, body)) in streams.into_iter().enumerate() {
                    set.spawn(sse_subscriber(
                        ctx.clone(),
                        session(j),
                        connection,
                        body,
                        stop.clone(),
                    ));
                }
            }
        }
        set
    }
}

#[allow(clippy::too_many_arguments)]
fn summarize_load(
    args: &Args,
    ctx: &Ctx,
    watched: &[Watched],
    window: f64,
    drained: f64,
    cpu: &CpuDelta,
    memory: &[Memory],
    pubs: Vec<PubStats>,
    subs: Vec<SubStats>,
) -> (Value, bool) {
    // seen[publisher][seq]: how many times that message was delivered.
    let mut seen: Vec<Vec<u8>> = vec![Vec::new(); args.publishers()];
    for stats in &pubs {
        seen[stats.index] = vec![0u8; stats.sent as usize];
    }
    let mut histogram = micros_histogram();
    let (mut unique, mut duplicated, mut unknown, mut in_window) = (0u64, 0u64, 0u64, 0u64);
    for sub in &subs {
        for d in &sub.deliveries {
            let Some(slot) = seen
                .get_mut(d.publisher as usize)
                .and_then(|v| v.get_mut(d.seq as usize))
            else {
                unknown += 1;
                continue;
            };
            if *slot == 0 {
                unique += 1;
                if d.in_window {
                    in_window += 1;
                }
                let _ = histogram.record(u64::from(d.latency_us).max(1));
            } else {
                duplicated += 1;
            }
            *slot = slot.saturating_add(1);
        }
    }
    // Lost: acknowledged, never delivered.
    let mut lost = 0u64;
    let mut acked = 0u64;
    for stats in &pubs {
        acked += stats.acked.len() as u64;
        if ctx.target == Target::Hello {
            // hello delivers nothing; its replies are only counted.
            continue;
        }
        for &seq in &stats.acked {
            if seen[stats.index][seq as usize] == 0 {
                lost += 1;
            }
        }
    }
    let sum = |f: fn(&SubStats) -> u64| subs.iter().map(f).sum::<u64>();
    let psum = |f: fn(&PubStats) -> u64| pubs.iter().map(f).sum::<u64>();
    let misrouted = sum(|s| s.misrouted) + unknown;
    let wrong_sender = sum(|s| s.wrong_sender);
    let errors = sum(|s| s.errors) + psum(|s| s.errors);
    let requests = sum(|s| s.requests_in_window) + psum(|s| s.requests);
    let polls = sum(|s| s.polls_in_window);
    let polls_with = sum(|s| s.polls_with_messages);
    let msgs_in_polls = sum(|s| s.messages_in_polls);
    let first_errors: Vec<String> = subs
        .iter()
        .filter_map(|s| s.first_error.clone())
        .chain(pubs.iter().filter_map(|s| s.first_error.clone()))
        .take(5)
        .collect();

    let server_cpu: f64 = cpu.watched.iter().sum();
    let is_hello = ctx.target == Target::Hello;
    let delivered_per_s = in_window as f64 / window;
    let requests_per_s = requests as f64 / window;
    let per_unit = if is_hello { requests } else { in_window };
    let cpu_us_per_unit = if per_unit > 0 {
        server_cpu * 1e6 / per_unit as f64
    } else {
        0.0
    };
    let latency = quantiles_ms(&histogram);
    let ok = lost == 0 && duplicated == 0 && misrouted == 0 && wrong_sender == 0;
    let ok = ok && (is_hello || unique > 0);
    let ws = ctx.transport == Transport::Ws;
    let mut result = json!({
        "label": args.label,
        "target": ctx.target.name(),
        "transport": ctx.transport.name(),
        "ws_flow": if ws { Some(ctx.ws_flow.name()) } else { None },
        "ws_window": if ws { ctx.ws_flow.window() } else { None },
        "url": args.url.join(","),
        "urls": args.url.len(),
        "backend": args.backend,
        "subscribers": args.subscribers,
        "publishers": args.publishers(),
        "duration_s": round(window, 3),
        "payload_bytes": args.payload_bytes,
        "preflight": args.preflight,
        "poll_pause_ms": args.poll_pause_ms,
        "publish_batch": args.publish_batch,
        "publish_pause_ms": args.publish_pause_ms,
        "idle": 0,
        "published": acked,
        "published_per_s": round(acked as f64 / window, 1),
        "delivered": unique,
        "delivered_in_window": in_window,
        "delivered_per_s": round(delivered_per_s, 1),
        "requests_in_window": requests,
        "requests_per_s": round(requests_per_s, 1),
        "rate_per_s": round(if is_hello { requests_per_s } else { delivered_per_s }, 1),
        "polls_in_window": polls,
        "acks_sent": sum(|s| s.acks),
        "messages_per_nonempty_poll": round(if polls_with > 0 { msgs_in_polls as f64 / polls_with as f64 } else { 0.0 }, 3),
        "latency_ms": latency,
        "lost": lost,
        "duplicated": duplicated,
        "misrouted": misrouted,
        "wrong_sender": wrong_sender,
        "dropped_by_server": psum(|s| s.dropped),
        "errors": errors,
        "cors_missing": sum(|s| s.cors_missing) + psum(|s| s.cors_missing),
        "reconnects": sum(|s| s.reconnects) + psum(|s| s.reconnects),
        "first_errors": first_errors,
        "drain_s": round(drained, 3),
        "cpu_per": if is_hello { "request" } else { "delivered message" },
        "server_cpu_us_per_msg": round(if is_hello { 0.0 } else { cpu_us_per_unit }, 2),
        "server_cpu_us_per_request": round(if requests > 0 { server_cpu * 1e6 / requests as f64 } else { 0.0 }, 2),
        "server_cpu_us_per_unit": round(cpu_us_per_unit, 2),
        "ok": ok,
    });
    add_usage(&mut result, watched, cpu, window, memory);
    (result, ok)
}

/// Adds the CPU and memory figures of a run with load (`cpu` over the `window` of
/// that many seconds, `memory` at its end) to its JSON line.
fn add_usage(
    result: &mut Value,
    watched: &[Watched],
    cpu: &CpuDelta,
    window: f64,
    memory: &[Memory],
) {
    let server_cpu: f64 = cpu.watched.iter().sum();
    let disturbed_by = disturbances(cpu, window);
    let usage = json!({
        "cpu_s": by_name(watched, &cpu.watched, |s| json!(round(*s, 3))),
        "server_cpu_s": round(server_cpu, 3),
        "server_cores": round(server_cpu / window, 3),
        "generator_cpu_s": round(cpu.own, 3),
        "generator_cores": round(cpu.own / window, 3),
        "other_cpu_s": round(cpu.other, 3),
        "irq_cpu_s": round(cpu.irq, 3),
        "steal_cpu_s": round(cpu.steal, 3),
        "total_busy_cpu_s": round(cpu.total_busy, 3),
        "disturbed": !disturbed_by.is_empty(),
        "disturbed_by": disturbed_by,
        "rss_kb": by_name(watched, memory, |m| json!(m.rss_kb)),
        "pss_kb": by_name(watched, memory, |m| json!(m.pss_kb)),
    });
    if let (Some(result), Value::Object(usage)) = (result.as_object_mut(), usage) {
        result.extend(usage);
    }
}

/// Memory of each watched process set, in the order of `watched`.
fn memory_now(watched: &[Watched]) -> Vec<Memory> {
    watched.iter().map(|w| procfs::memory_of(&w.pids)).collect()
}

/// One figure per watched process name: `values` are in the order of `watched`.
fn by_name<T>(
    watched: &[Watched],
    values: &[T],
    figure: impl Fn(&T) -> Value,
) -> serde_json::Map<String, Value> {
    watched
        .iter()
        .zip(values)
        .map(|(w, v)| (w.name.clone(), figure(v)))
        .collect()
}

/// A histogram of microseconds, from 1 µs to an hour, 3 significant digits.
fn micros_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid bounds")
}

/// p50, p90, p99 and max of a histogram of microseconds, in milliseconds (null when
/// it is empty).
fn quantiles_ms(histogram: &Histogram<u64>) -> Value {
    if histogram.is_empty() {
        return Value::Null;
    }
    let q = |p: f64| histogram.value_at_quantile(p) as f64 / 1000.0;
    json!({"p50": q(0.50), "p90": q(0.90), "p99": q(0.99), "max": histogram.max() as f64 / 1000.0})
}

/// Why a run does not show what this machine can do: other processes used more than
/// 10% of a core, or the hypervisor took more than 10% of a core away (steal).
fn disturbances(cpu: &CpuDelta, window: f64) -> Vec<&'static str> {
    let mut why = Vec::new();
    if cpu.other / window > 0.10 {
        why.push("other processes");
    }
    if cpu.steal / window > 0.10 {
        why.push("hypervisor steal");
    }
    why
}

fn round(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (x * f).round() / f
}

// ---------------------------------------------------------------------------------
// The idle scenario

async fn run_idle(
    args: &Args,
    addr: SocketAddr,
    ctx: &Arc<Ctx>,
    watched: &[Watched],
) -> Result<(Value, bool)> {
    let n = args.idle;
    let memory_before = memory_now(watched);
    let opening = Instant::now();
    let connections = connect_many(addr, n).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut polls = JoinSet::new();
    for (k, connection) in connections.into_iter().enumerate() {
        polls.spawn(subscriber(
            ctx.clone(),
            format!("idle{k}"),
            connection,
            stop_rx.clone(),
        ));
    }
    await_first_polls(ctx, n, Duration::from_secs(60)).await;
    // Let the last requests reach the server and park.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let opened_in = opening.elapsed().as_secs_f64();
    let memory_parked = memory_now(watched);

    let (start, end) = open_window(ctx, Duration::from_secs_f64(args.duration));
    let cpu_before = procfs::cpu_sample(watched);
    tokio::time::sleep_until(end.into()).await;
    let cpu_after = procfs::cpu_sample(watched);
    let window = start.elapsed().as_secs_f64();
    let memory_end = memory_now(watched);
    let _ = stop_tx.send(true);
    let stats = join_all(polls).await?;
    let cpu = CpuDelta::between(&cpu_before, &cpu_after);

    let per_poll = |after: u64, before: u64| (after as f64 - before as f64) * 1024.0 / n as f64;
    let mut per_name = serde_json::Map::new();
    let (mut rss_total, mut pss_total) = (0.0, 0.0);
    for (i, w) in watched.iter().enumerate() {
        let rss = per_poll(memory_parked[i].rss_kb, memory_before[i].rss_kb);
        let pss = per_poll(memory_parked[i].pss_kb, memory_before[i].pss_kb);
        rss_total += rss;
        pss_total += pss;
        per_name.insert(
            w.name.clone(),
            json!({
                "rss_before_kb": memory_before[i].rss_kb,
                "rss_parked_kb": memory_parked[i].rss_kb,
                "rss_end_kb": memory_end[i].rss_kb,
                "pss_before_kb": memory_before[i].pss_kb,
                "pss_parked_kb": memory_parked[i].pss_kb,
                "pss_end_kb": memory_end[i].pss_kb,
                "rss_per_poll_bytes": round(rss, 1),
                "pss_per_poll_bytes": round(pss, 1),
            }),
        );
    }
    let errors: u64 = stats.iter().map(|s| s.errors).sum();
    let answered: u64 = stats.iter().map(|s| s.polls_in_window).sum();
    let first_errors: Vec<String> = stats
        .iter()
        .filter_map(|s| s.first_error.clone())
        .take(5)
        .collect();
    let server_cpu: f64 = cpu.watched.iter().sum();
    let cpu_by_name = by_name(watched, &cpu.watched, |s| json!(round(*s, 3)));
    let parked = ctx.first_polls.load(Ordering::Relaxed);
    let result = json!({
        "label": args.label,
        "target": ctx.target.name(),
        "url": args.url.join(","),
        "idle": n,
        "parked": parked,
        "opened_in_s": round(opened_in, 3),
        "duration_s": round(window, 3),
        "rss_per_poll_bytes": round(rss_total, 1),
        "pss_per_poll_bytes": round(pss_total, 1),
        "memory": per_name,
        "polls_answered_in_window": answered,
        "errors": errors,
        "first_errors": first_errors,
        "cpu_s": cpu_by_name,
        "server_cpu_s": round(server_cpu, 3),
        "generator_cpu_s": round(cpu.own, 3),
        "other_cpu_s": round(cpu.other, 3),
        "irq_cpu_s": round(cpu.irq, 3),
        "disturbed": !disturbances(&cpu, window).is_empty(),
        "disturbed_by": disturbances(&cpu, window),
        "ok": parked == n,
    });
    Ok((result, true))
}

// ---------------------------------------------------------------------------------
// The churn scenario: sessions that come, get a message and go

/// Connections working through a churn round at once, each one session at a time.
const CHURN_WORKERS: usize = 100;
/// How long a churn session's last poll stays parked before its connection closes.
const CHURN_PARK: Duration = Duration::from_millis(20);
/// Longest wait for the servers to forget a round's sessions: the idle mailbox
/// timeout the script sets, a sweep, and a poll timeout for a handler that only
/// notices a closed connection when it answers.
const FORGET_LIMIT: Duration = Duration::from_secs(60);
/// The session every churn message is sent from.
const CHURN_SENDER: &str = "churnpub";

#[derive(Default)]
struct ChurnStats {
    sessions: u64,
    /// Sent and answered "ok".
    acked: u64,
    /// Acknowledged messages that came back from the session's poll.
    delivered: u64,
    /// Messages the session's poll returned that were not its own, or came twice.
    misrouted: u64,
    duplicated: u64,
    errors: u64,
    first_error: Option<String>,
}

impl ChurnStats {
    fn add(&mut self, other: ChurnStats) {
        self.sessions += other.sessions;
        self.acked += other.acked;
        self.delivered += other.delivered;
        self.misrouted += other.misrouted;
        self.duplicated += other.duplicated;
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }
}

async fn run_churn(args: &Args, addr: SocketAddr, watched: &[Watched]) -> Result<(Value, bool)> {
    let (n, rounds) = (args.churn, args.rounds);
    let workers = CHURN_WORKERS.min(n);
    // One connection for /metrics all along, so that it is in every count alike.
    let mut metrics = Connection::open(addr).await?;
    let baseline = churn::held(&fetch_metrics(&mut metrics).await?);
    let memory_before = memory_now(watched);
    let cpu_before = procfs::cpu_sample(watched);
    let started = Instant::now();
    let mut total = ChurnStats::default();
    let mut per_round = Vec::with_capacity(rounds);
    let mut rss_after = Vec::with_capacity(rounds);
    let mut all_forgotten = true;
    let mut working_s = 0.0;
    for index in 0..rounds {
        let round_started = Instant::now();
        let mut set = JoinSet::new();
        for w in 0..workers {
            let payload_bytes = args.payload_bytes;
            set.spawn(async move {
                let mut stats = ChurnStats::default();
                for k in (w..n).step_by(workers) {
                    churn_session(addr, index, k, payload_bytes, &mut stats).await;
                }
                stats
            });
        }
        for stats in join_all(set).await? {
            total.add(stats);
        }
        let worked_s = round_started.elapsed().as_secs_f64();
        working_s += worked_s;
        let memory_worked = memory_now(watched);
        let held_worked = churn::held(&fetch_metrics(&mut metrics).await?);
        // Then wait for the servers to forget them.
        let forgetting = Instant::now();
        let mut held = held_worked.clone();
        while !churn::forgotten(&held, &baseline) && forgetting.elapsed() < FORGET_LIMIT {
            tokio::time::sleep(Duration::from_millis(250)).await;
            held = churn::held(&fetch_metrics(&mut metrics).await?);
        }
        let forgot = churn::forgotten(&held, &baseline);
        all_forgotten &= forgot;
        let memory_after = memory_now(watched);
        rss_after.push(memory_after.iter().map(|m| m.rss_kb).sum::<u64>());
        let by_process: serde_json::Map<String, Value> = watched
            .iter()
            .enumerate()
            .map(|(i, w)| {
                (
                    w.name.clone(),
                    json!({
                        "rss_worked_kb": memory_worked[i].rss_kb,
                        "rss_after_kb": memory_after[i].rss_kb,
                    }),
                )
            })
            .collect();
        per_round.push(json!({
            "round": index + 1,
            "worked_s": round(worked_s, 3),
            "held_worked": held_gauges(&held_worked),
            "held_after": held_gauges(&held),
            "forgotten": forgot,
            "forgotten_in_s": round(forgetting.elapsed().as_secs_f64(), 2),
            "rss_after_kb": rss_after[index],
            "memory": by_process,
        }));
    }
    let cpu_after = procfs::cpu_sample(watched);
    let cpu = CpuDelta::between(&cpu_before, &cpu_after);
    let elapsed = started.elapsed().as_secs_f64();
    let lost = total.acked.saturating_sub(total.delivered);
    let growth = churn::growth_per_session(&rss_after, n, 1).unwrap_or(0.0);
    let middle = churn::middle_round(rounds);
    let growth_later = churn::growth_per_session(&rss_after, n, middle).unwrap_or(0.0);
    let server_cpu: f64 = cpu.watched.iter().sum();
    let memory_before_kb: u64 = memory_before.iter().map(|m| m.rss_kb).sum();
    let ok = all_forgotten
        && total.errors == 0
        && lost == 0
        && total.misrouted == 0
        && total.duplicated == 0
        && total.acked == total.sessions;
    let result = json!({
        "label": args.label,
        "target": Target::Micromsg.name(),
        "url": args.url.join(","),
        "idle": 0,
        "churn": n,
        "rounds": rounds,
        "sessions": total.sessions,
        "published": total.acked,
        "delivered": total.delivered,
        "lost": lost,
        "misrouted": total.misrouted,
        "duplicated": total.duplicated,
        "errors": total.errors,
        "first_errors": total.first_error.into_iter().collect::<Vec<_>>(),
        "forgotten": all_forgotten,
        "held_before": held_gauges(&baseline),
        "rss_before_kb": memory_before_kb,
        "rss_after_first_round_kb": rss_after.first(),
        "rss_after_last_round_kb": rss_after.last(),
        "rss_growth_per_session_bytes": round(growth, 1),
        "rss_after_middle_round_kb": rss_after.get(middle - 1),
        "middle_round": middle,
        "rss_growth_per_session_later_half_bytes": round(growth_later, 1),
        "rounds_detail": per_round,
        "duration_s": round(elapsed, 3),
        "sessions_per_s": round(total.sessions as f64 / working_s, 1),
        "cpu_s": by_name(watched, &cpu.watched, |s| json!(round(*s, 3))),
        "server_cpu_s": round(server_cpu, 3),
        "generator_cpu_s": round(cpu.own, 3),
        "other_cpu_s": round(cpu.other, 3),
        "irq_cpu_s": round(cpu.irq, 3),
        "disturbed": !disturbances(&cpu, elapsed).is_empty(),
        "disturbed_by": disturbances(&cpu, elapsed),
        "ok": ok,
    });
    Ok((result, ok))
}

/// The [`churn::HELD`] gauges by name, for the JSON line.
fn held_gauges(held: &[Option<f64>]) -> Value {
    churn::HELD
        .iter()
        .zip(held)
        .map(|(name, value)| (name.to_string(), json!(value)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

async fn fetch_metrics(connection: &mut Connection) -> Result<String> {
    let request = Request::builder()
        .method(Method::GET)
        .uri("/metrics")
        .header(header::HOST, connection.host.clone())
        .body(Full::new(Bytes::new()))
        .expect("valid request");
    let reply = connection.send(request, REQUEST_LIMIT).await?;
    if reply.status != StatusCode::OK {
        bail!(
            "GET /metrics answered {}: {}",
            reply.status,
            excerpt(&reply)
        );
    }
    Ok(String::from_utf8_lossy(&reply.body).into_owned())
}

/// One short-lived session `churn<round>-<k>` on a connection of its own: sent one
/// message, polls it, leaves a poll parked and goes away.
async fn churn_session(
    addr: SocketAddr,
    round: usize,
    k: usize,
    payload_bytes: usize,
    stats: &mut ChurnStats,
) {
    stats.sessions += 1;
    let fail = |stats: &mut ChurnStats, text: String| {
        stats.errors += 1;
        note(&mut stats.first_error, || text);
    };
    let mut connection = match Connection::open(addr).await {
        Ok(connection) => connection,
        Err(error) => return fail(stats, format!("connect: {error:#}")),
    };
    let session = format!("churn{round}-{k}");
    let body = padded(
        format!(r#"{{"round":{round},"k":{k},"pad":""#),
        payload_bytes,
    );
    let set =
        format!(r#"{{"session_src":"{CHURN_SENDER}","session_dst":"{session}","payload":{body}}}"#);
    let request = post("/set", &connection.host, set, false);
    match connection.send(request, REQUEST_LIMIT).await {
        Ok(reply) => match publish_outcome(Target::Micromsg, &reply) {
            Ok(_) => stats.acked += 1,
            Err(text) => fail(stats, text),
        },
        Err(error) => fail(stats, format!("publish: {error:#}")),
    }
    let host = connection.host.clone();
    let poll = || {
        post(
            &format!("/python/MsgHandler.py?a__={}", fastrand::u64(..)),
            &host,
            format!(
                r#"{{"session_src":"{session}","type":"GET","SessionData":{{"ID":"SYS_SESSION","Value":"{session}"}}}}"#
            ),
            false,
        )
    };
    let request = poll();
    match connection.send(request, POLL_LIMIT).await {
        Ok(reply) => {
            let (own, other) = churn_messages(&reply, round, k);
            match own {
                0 => fail(
                    stats,
                    format!("poll of {session} came back without its message"),
                ),
                1 => stats.delivered += 1,
                _ => {
                    stats.delivered += 1;
                    stats.duplicated += own - 1;
                }
            }
            stats.misrouted += other;
        }
        Err(error) => fail(stats, format!("poll: {error:#}")),
    }
    // The tab goes away while its next poll waits: nothing is left for it, so an
    // answer within the moment is a message that was given twice or went astray.
    let request = poll();
    if let Ok(Ok(reply)) =
        tokio::time::timeout(CHURN_PARK, connection.send(request, POLL_LIMIT)).await
    {
        let (own, other) = churn_messages(&reply, round, k);
        stats.duplicated += own;
        stats.misrouted += other;
    }
    connection.close();
}

/// How many of the messages in an x0 poll reply are session (round, k)'s own, and
/// how many are not.
fn churn_messages(reply: &Reply, round: usize, k: usize) -> (u64, u64) {
    let Ok(value) = serde_json::from_slice::<Value>(&reply.body) else {
        return (0, 0);
    };
    let Some(messages) = value["messages"].as_array() else {
        return (0, 0);
    };
    let own = messages
        .iter()
        .filter(|m| {
            m["round"].as_u64() == Some(round as u64)
                && m["k"].as_u64() == Some(k as u64)
                && m["session_src"].as_str() == Some(CHURN_SENDER)
        })
        .count() as u64;
    (own, messages.len() as u64 - own)
}

// ---------------------------------------------------------------------------------
// The fan-out scenario: one channel message to every subscriber (micromsg /v1)

/// The channel every fan-out subscriber is subscribed to.
const FAN_CHANNEL: &str = "bench.fan";
/// The session every fan-out publisher sends as.
const FAN_PUBLISHER: &str = "fanpub";
/// How long a publisher waits for the last copy of its message before it sends the
/// next one anyway.
const FAN_WAIT: Duration = Duration::from_secs(5);

#[derive(Deserialize)]
struct SentReply {
    id: u64,
    recipients: u64,
    #[serde(default)]
    dropped: u64,
}

#[derive(Deserialize)]
struct FanPollReply<'a> {
    #[serde(borrow, default)]
    messages: Option<Vec<Envelope<'a>>>,
    #[serde(default)]
    ids: Vec<u64>,
    #[serde(default)]
    error: bool,
}

/// The /v1 envelope, as far as it is checked.
#[derive(Deserialize)]
struct Envelope<'a> {
    id: u64,
    #[serde(borrow, default)]
    source: Option<Cow<'a, str>>,
    #[serde(borrow)]
    target: EnvelopeTarget<'a>,
    data: FanData,
}

#[derive(Deserialize)]
struct EnvelopeTarget<'a> {
    #[serde(borrow, default)]
    channel: Option<Cow<'a, str>>,
}

/// The payload the publisher sent (`pad` is left unread).
#[derive(Deserialize)]
struct FanData {
    seq: u64,
    ts: u64,
}

/// What one fan-out publisher saw (the ledger counts what it sent and had accepted).
#[derive(Default)]
struct FanPubStats {
    /// Publishes whose reply counted other than one recipient per subscriber.
    short_of_recipients: u64,
    dropped: u64,
    /// Messages whose last copy had not arrived FAN_WAIT after the publish.
    timed_out: u64,
    errors: u64,
    reconnects: u64,
    first_error: Option<String>,
}

#[derive(Default)]
struct FanSubStats {
    inbox: Inbox,
    subscribed: bool,
    /// Copies whose envelope names another target than the channel.
    misrouted: u64,
    wrong_sender: u64,
    errors: u64,
    polls_in_window: u64,
    polls_with_messages: u64,
    messages_in_polls: u64,
    reconnects: u64,
    first_error: Option<String>,
}

/// Publishes one message at a time to the channel and waits until every subscriber
/// has it (or FAN_WAIT has passed) before the next, until `end`.
async fn fan_publisher(
    ctx: Arc<Ctx>,
    ledger: Arc<Ledger>,
    subscribers: usize,
    mut connection: Connection,
    end: Instant,
) -> FanPubStats {
    let mut stats = FanPubStats::default();
    while Instant::now() < end {
        let ts = unix_micros();
        let seq = ledger.register(ts);
        let data = fan_payload(seq, ts, ctx.payload_bytes);
        let body = format!(
            r#"{{"session":"{FAN_PUBLISHER}","target":{{"channel":"{FAN_CHANNEL}"}},"data":{data}}}"#
        );
        let give_up = Instant::now() + FAN_WAIT;
        let request = post("/v1/publish", &connection.host, body, false);
        let sent = match connection.send(request, REQUEST_LIMIT).await {
            Ok(reply) => sent_outcome(&reply),
            Err(error) => Err(format!("publish: {error:#}")),
        };
        match sent {
            Ok(sent) => {
                ledger.acknowledge(seq, sent.id);
                stats.dropped += sent.dropped;
                if sent.recipients != subscribers as u64 {
                    stats.short_of_recipients += 1;
                    note(&mut stats.first_error, || {
                        format!(
                            "publish reached {} recipients, not {subscribers}",
                            sent.recipients
                        )
                    });
                }
            }
            Err(text) => {
                stats.errors += 1;
                note(&mut stats.first_error, || text);
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        }
        // The window's end cuts the wait short; that is no time-out.
        let complete = ledger.wait_complete(seq, give_up.min(end).into()).await;
        if !complete && give_up <= end {
            stats.timed_out += 1;
        }
    }
    stats.reconnects = connection.reconnects;
    stats
}

/// The publish reply when it is a success.
fn sent_outcome(reply: &Reply) -> Result<SentReply, String> {
    let parsed = if reply.status == StatusCode::OK {
        serde_json::from_slice::<SentReply>(&reply.body).ok()
    } else {
        None
    };
    parsed.ok_or_else(|| format!("publish answered {}: {}", reply.status, excerpt(reply)))
}

/// Subscribes session `fan<j>` to the channel, then long-polls until stopped.
async fn fan_subscriber(
    ctx: Arc<Ctx>,
    ledger: Arc<Ledger>,
    session: String,
    mut connection: Connection,
    mut stop: watch::Receiver<bool>,
) -> FanSubStats {
    let mut stats = FanSubStats::default();
    let subscribe = format!(r#"{{"session":"{session}","channel":"{FAN_CHANNEL}"}}"#);
    for _attempt in 0..3 {
        let request = post("/v1/subscribe", &connection.host, subscribe.clone(), false);
        match connection.send(request, REQUEST_LIMIT).await {
            Ok(reply) if subscribed(&reply) => {
                stats.subscribed = true;
                break;
            }
            Ok(reply) => note(&mut stats.first_error, || {
                format!("subscribe answered {}: {}", reply.status, excerpt(&reply))
            }),
            Err(error) => note(&mut stats.first_error, || format!("subscribe: {error:#}")),
        }
        stats.errors += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Counted whether or not the subscription took: the run waits for every
    // subscriber, and one that failed loses every copy in the report.
    ctx.first_polls.fetch_add(1, Ordering::Relaxed);
    let poll = Bytes::from(format!(r#"{{"session":"{session}","timeout":10}}"#));
    loop {
        let request = post("/v1/poll", &connection.host, poll.clone(), false);
        let result = tokio::select! {
            biased;
            _ = stop.wait_for(|s| *s) => break,
            result = connection.send(request, POLL_LIMIT) => result,
        };
        let now_us = unix_micros();
        if ctx.in_window(now_us) {
            stats.polls_in_window += 1;
        }
        match result {
            Ok(reply) => handle_fan_reply(&ctx, &ledger, &reply, now_us, &mut stats),
            Err(error) => {
                stats.errors += 1;
                note(&mut stats.first_error, || format!("poll: {error:#}"));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
    stats.reconnects = connection.reconnects;
    stats
}

/// The subscribe reply says `"subscribed":true`.
fn subscribed(reply: &Reply) -> bool {
    #[derive(Deserialize)]
    struct Subscribed {
        subscribed: bool,
    }
    reply.status == StatusCode::OK
        && serde_json::from_slice::<Subscribed>(&reply.body).is_ok_and(|r| r.subscribed)
}

fn handle_fan_reply(
    ctx: &Ctx,
    ledger: &Ledger,
    reply: &Reply,
    now_us: u64,
    stats: &mut FanSubStats,
) {
    let parsed = if reply.status == StatusCode::OK {
        serde_json::from_slice::<FanPollReply>(&reply.body)
            .ok()
            .filter(|parsed| !parsed.error)
    } else {
        None
    };
    let Some(parsed) = parsed else {
        stats.errors += 1;
        note(&mut stats.first_error, || {
            format!("poll answered {}: {}", reply.status, excerpt(reply))
        });
        return;
    };
    let messages = parsed.messages.unwrap_or_default();
    if !messages.iter().map(|m| m.id).eq(parsed.ids.iter().copied()) {
        stats.errors += 1;
        note(&mut stats.first_error, || {
            format!(
                "poll reply's ids do not match its messages: {}",
                excerpt(reply)
            )
        });
    }
    let mut copies = Vec::with_capacity(messages.len());
    for message in &messages {
        if message.target.channel.as_deref() != Some(FAN_CHANNEL) {
            stats.misrouted += 1;
            note(&mut stats.first_error, || {
                format!("a copy not for {FAN_CHANNEL}: {}", excerpt(reply))
            });
            continue;
        }
        if message.source.as_deref() != Some(FAN_PUBLISHER) {
            stats.wrong_sender += 1;
        }
        copies.push(fanout::Copy {
            seq: message.data.seq,
            ts: message.data.ts,
            id: message.id,
        });
    }
    if !messages.is_empty() {
        stats.polls_with_messages += 1;
        stats.messages_in_polls += messages.len() as u64;
    }
    let in_window = now_us < ctx.window_end_us.load(Ordering::Relaxed);
    ledger.receive(&mut stats.inbox, &copies, now_us, in_window);
}

async fn run_fanout(
    args: &Args,
    addr: SocketAddr,
    ctx: &Arc<Ctx>,
    watched: &[Watched],
) -> Result<(Value, bool)> {
    let n = args.fanout;
    let ledger = Arc::new(Ledger::new(n));
    let opening = Instant::now();
    let sub_connections = connect_many(addr, n).await?;
    let pub_connections = connect_many(addr, args.publishers()).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut subscribers = JoinSet::new();
    for (j, connection) in sub_connections.into_iter().enumerate() {
        subscribers.spawn(fan_subscriber(
            ctx.clone(),
            ledger.clone(),
            format!("fan{j}"),
            connection,
            stop_rx.clone(),
        ));
    }
    // Every subscription in place and (nearly) every first poll parked before the
    // first message; thousands of polls take a moment to reach the server.
    await_first_polls(ctx, n, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let opened_in = opening.elapsed().as_secs_f64();

    let (start, end) = open_window(ctx, Duration::from_secs_f64(args.duration));
    let cpu_before = procfs::cpu_sample(watched);
    let mut publishers = JoinSet::new();
    for connection in pub_connections {
        publishers.spawn(fan_publisher(
            ctx.clone(),
            ledger.clone(),
            n,
            connection,
            end,
        ));
    }
    tokio::time::sleep_until(end.into()).await;
    let cpu_after = procfs::cpu_sample(watched);
    let window = start.elapsed().as_secs_f64();
    let memory = memory_now(watched);
    let pub_stats = join_all(publishers).await?;
    drain_while(
        || ledger.delivered() < ledger.expected(),
        Duration::from_secs_f64(args.drain.max(0.0)),
    )
    .await;
    // Counted from the window's end: the last publisher may end well after it (its
    // publish answered late, or the busy runtime slow to finish its task), and the
    // copies of that message arrive meanwhile.
    let drained = end.elapsed().as_secs_f64();
    let _ = stop_tx.send(true);
    let sub_stats = join_all(subscribers).await?;
    let measured = Measured {
        opened_in,
        window,
        drained,
        cpu: CpuDelta::between(&cpu_before, &cpu_after),
        memory,
    };
    Ok(summarize_fanout(
        args, ctx, watched, &measured, &ledger, pub_stats, sub_stats,
    ))
}

/// The clocks and gauges of a fan-out run, read around its window.
struct Measured {
    /// Seconds from the first connection to the window's start.
    opened_in: f64,
    window: f64,
    /// Seconds from the window's end until every copy owed arrived (or the drain
    /// gave up).
    drained: f64,
    cpu: CpuDelta,
    /// At the window's end.
    memory: Vec<Memory>,
}

fn summarize_fanout(
    args: &Args,
    ctx: &Ctx,
    watched: &[Watched],
    measured: &Measured,
    ledger: &Ledger,
    pub_stats: Vec<FanPubStats>,
    mut sub_stats: Vec<FanSubStats>,
) -> (Value, bool) {
    let (window, cpu) = (measured.window, &measured.cpu);
    let n = args.fanout;
    let inboxes: Vec<Inbox> = sub_stats
        .iter_mut()
        .map(|s| std::mem::take(&mut s.inbox))
        .collect();
    let books = ledger.summary(&inboxes);
    let mut completion = micros_histogram();
    for &us in &books.completion_us {
        let _ = completion.record(us.max(1));
    }
    let mut latency = micros_histogram();
    for inbox in &inboxes {
        for &us in &inbox.latencies_us {
            let _ = latency.record(u64::from(us).max(1));
        }
    }
    let sum = |f: fn(&FanSubStats) -> u64| sub_stats.iter().map(f).sum::<u64>();
    let psum = |f: fn(&FanPubStats) -> u64| pub_stats.iter().map(f).sum::<u64>();
    let subscribed = sub_stats.iter().filter(|s| s.subscribed).count();
    let misrouted = sum(|s| s.misrouted) + books.foreign;
    let wrong_sender = sum(|s| s.wrong_sender);
    let polls_with = sum(|s| s.polls_with_messages);
    let first_errors: Vec<String> = sub_stats
        .iter()
        .filter_map(|s| s.first_error.clone())
        .chain(pub_stats.iter().filter_map(|s| s.first_error.clone()))
        .take(5)
        .collect();
    let server_cpu: f64 = cpu.watched.iter().sum();
    let in_window = books.delivered_in_window;
    let ok = books.lost == 0
        && books.duplicated == 0
        && misrouted == 0
        && wrong_sender == 0
        && books.id_mismatches == 0
        && books.delivered > 0
        && subscribed == n;
    let mut result = json!({
        "label": args.label,
        "target": ctx.target.name(),
        "url": args.url.join(","),
        "fanout": n,
        "subscribed": subscribed,
        "publishers": args.publishers(),
        "idle": 0,
        "channel": FAN_CHANNEL,
        "payload_bytes": args.payload_bytes,
        "opened_in_s": round(measured.opened_in, 3),
        "duration_s": round(window, 3),
        "sent": books.sent,
        "published": books.published,
        "published_per_s": round(books.published as f64 / window, 2),
        "short_of_recipients": psum(|s| s.short_of_recipients),
        "timed_out": psum(|s| s.timed_out),
        "copies_expected": books.expected,
        "delivered": books.delivered,
        "delivered_in_window": in_window,
        "delivered_per_s": round(in_window as f64 / window, 1),
        "rate_per_s": round(in_window as f64 / window, 1),
        "completed": books.completion_us.len(),
        "completion_ms": quantiles_ms(&completion),
        "latency_ms": quantiles_ms(&latency),
        "polls_in_window": sum(|s| s.polls_in_window),
        "messages_per_nonempty_poll": round(if polls_with > 0 { sum(|s| s.messages_in_polls) as f64 / polls_with as f64 } else { 0.0 }, 3),
        "lost": books.lost,
        "duplicated": books.duplicated,
        "misrouted": misrouted,
        "wrong_sender": wrong_sender,
        "id_mismatches": books.id_mismatches,
        "dropped_by_server": psum(|s| s.dropped),
        "errors": sum(|s| s.errors) + psum(|s| s.errors),
        "reconnects": sum(|s| s.reconnects) + psum(|s| s.reconnects),
        "first_errors": first_errors,
        "drain_s": round(measured.drained, 3),
        "cpu_per": "delivered copy",
        "server_cpu_us_per_unit": round(if in_window > 0 { server_cpu * 1e6 / in_window as f64 } else { 0.0 }, 2),
        "ok": ok,
    });
    add_usage(&mut result, watched, cpu, window, &measured.memory);
    (result, ok)
}

// ---------------------------------------------------------------------------------
// The human-readable table

fn table(args: &Args, r: &Value) -> String {
    use std::fmt::Write;
    let f = |key: &str| r.get(key).and_then(Value::as_f64).unwrap_or(0.0);
    let u = |key: &str| r.get(key).and_then(Value::as_u64).unwrap_or(0);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "── msgbench: {} {}{}",
        r["target"].as_str().unwrap_or(""),
        args.url.join(" "),
        if args.label.is_empty() {
            String::new()
        } else {
            format!("  [{}]", args.label)
        }
    );
    if args.churn > 0 {
        let _ = writeln!(
            out,
            "  churn             {} rounds of {} sessions ({} in all, {:.0}/s), payload {} B",
            args.rounds,
            args.churn,
            u("sessions"),
            f("sessions_per_s"),
            args.payload_bytes
        );
        for round in r["rounds_detail"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "  round {:<11} worked {:.1} s, forgotten {} in {:.1} s, RSS after {} KiB",
                round["round"],
                round["worked_s"].as_f64().unwrap_or(0.0),
                if round["forgotten"].as_bool() == Some(true) {
                    "yes"
                } else {
                    "NO"
                },
                round["forgotten_in_s"].as_f64().unwrap_or(0.0),
                round["rss_after_kb"]
            );
        }
        let _ = writeln!(
            out,
            "  RSS               {} KiB before, {} after round 1, {} after round {}, {} after the last",
            u("rss_before_kb"),
            u("rss_after_first_round_kb"),
            u("rss_after_middle_round_kb"),
            u("middle_round"),
            u("rss_after_last_round_kb"),
        );
        let _ = writeln!(
            out,
            "  growth            {:.1} B per session after round 1, {:.1} B after round {}",
            f("rss_growth_per_session_bytes"),
            f("rss_growth_per_session_later_half_bytes"),
            u("middle_round")
        );
        let _ = writeln!(
            out,
            "  messages          published {}  delivered {}  lost {}  duplicated {}  misrouted {}  errors {}",
            u("published"),
            u("delivered"),
            u("lost"),
            u("duplicated"),
            u("misrouted"),
            u("errors")
        );
        cpu_line(&mut out, r);
    } else if args.idle > 0 {
        let _ = writeln!(
            out,
            "  parked polls      {} of {} (opened in {:.1} s), held {:.1} s",
            u("parked"),
            args.idle,
            f("opened_in_s"),
            f("duration_s")
        );
        if let Some(memory) = r["memory"].as_object() {
            for (name, m) in memory {
                let _ = writeln!(
                    out,
                    "  {name:<17} RSS {} -> {} KiB ({:.0} B/poll), PSS {:.0} B/poll",
                    m["rss_before_kb"],
                    m["rss_parked_kb"],
                    m["rss_per_poll_bytes"].as_f64().unwrap_or(0.0),
                    m["pss_per_poll_bytes"].as_f64().unwrap_or(0.0)
                );
            }
        }
        let _ = writeln!(
            out,
            "  per parked poll   RSS {:.0} B, PSS {:.0} B (all watched processes)",
            f("rss_per_poll_bytes"),
            f("pss_per_poll_bytes")
        );
        cpu_line(&mut out, r);
        let _ = writeln!(out, "  errors            {}", u("errors"));
    } else if args.fanout > 0 {
        let ms = |key: &str, q: &str| r[key].get(q).and_then(Value::as_f64).unwrap_or(0.0);
        let _ = writeln!(
            out,
            "  fan-out           {} subscribers of {} ({} subscribed, opened in {:.1} s), P={} payload {} B, window {:.2} s, drain {:.2} s",
            args.fanout,
            FAN_CHANNEL,
            u("subscribed"),
            f("opened_in_s"),
            args.publishers(),
            args.payload_bytes,
            f("duration_s"),
            f("drain_s")
        );
        let _ = writeln!(
            out,
            "  published         {:>10}  {:>10.2}/s  ({} timed out after {} s, {} short of recipients)",
            u("published"),
            f("published_per_s"),
            u("timed_out"),
            FAN_WAIT.as_secs(),
            u("short_of_recipients")
        );
        let _ = writeln!(
            out,
            "  copies            {:>10} delivered of {} expected; {:.0}/s in the window ({:.2} per non-empty poll)",
            u("delivered"),
            u("copies_expected"),
            f("delivered_per_s"),
            f("messages_per_nonempty_poll")
        );
        let _ = writeln!(
            out,
            "  completion ms     p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}  ({} messages complete)",
            ms("completion_ms", "p50"),
            ms("completion_ms", "p90"),
            ms("completion_ms", "p99"),
            ms("completion_ms", "max"),
            u("completed")
        );
        let _ = writeln!(
            out,
            "  per-copy ms       p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}",
            ms("latency_ms", "p50"),
            ms("latency_ms", "p90"),
            ms("latency_ms", "p99"),
            ms("latency_ms", "max")
        );
        let _ = writeln!(
            out,
            "  lost {}  duplicated {}  misrouted {}  wrong sender {}  id mismatches {}  dropped by server {}  errors {}  reconnects {}",
            u("lost"),
            u("duplicated"),
            u("misrouted"),
            u("wrong_sender"),
            u("id_mismatches"),
            u("dropped_by_server"),
            u("errors"),
            u("reconnects")
        );
        usage_lines(&mut out, r);
    } else {
        let transport = match (args.transport, args.ws_flow()) {
            (Transport::Ws, Flow::Window(n)) => format!(", over ws (window {n}, acked)"),
            (Transport::Ws, Flow::Fast) => ", over ws (fast flow, no acks)".to_owned(),
            (Transport::Sse, _) => ", over sse".to_owned(),
            (Transport::Poll, _) => String::new(),
        };
        let _ = writeln!(
            out,
            "  load              S={} P={} payload {} B{transport}{}{}, window {:.2} s, drain {:.2} s",
            args.subscribers,
            args.publishers(),
            args.payload_bytes,
            if args.preflight { ", preflight" } else { "" },
            if args.poll_pause_ms > 0 {
                format!(", poll pause {} ms", args.poll_pause_ms)
            } else {
                String::new()
            } + &if args.publish_batch > 0 {
                format!(", {} messages per publish", args.publish_batch)
            } else {
                String::new()
            } + &if args.publish_pause_ms > 0 {
                format!(", publish pause {} ms", args.publish_pause_ms)
            } else {
                String::new()
            },
            f("duration_s"),
            f("drain_s")
        );
        let _ = writeln!(
            out,
            "  published         {:>10}  {:>10.0}/s",
            u("published"),
            f("published_per_s")
        );
        let _ = writeln!(
            out,
            "  delivered         {:>10}  {:>10.0}/s in the window",
            u("delivered"),
            f("delivered_per_s")
        );
        let _ = writeln!(
            out,
            "  requests          {:>10}  {:>10.0}/s  ({:.2} messages per non-empty {}){}",
            u("requests_in_window"),
            f("requests_per_s"),
            f("messages_per_nonempty_poll"),
            if args.transport == Transport::Poll {
                "poll"
            } else {
                "read"
            },
            if u("acks_sent") > 0 {
                format!(", {} ack frames", u("acks_sent"))
            } else {
                String::new()
            }
        );
        if let Some(l) = r["latency_ms"].as_object() {
            let g = |k: &str| l.get(k).and_then(Value::as_f64).unwrap_or(0.0);
            let _ = writeln!(
                out,
                "  latency ms        p50 {:.3}  p90 {:.3}  p99 {:.3}  max {:.3}",
                g("p50"),
                g("p90"),
                g("p99"),
                g("max")
            );
        }
        let _ = writeln!(
            out,
            "  lost {}  duplicated {}  misrouted {}  wrong sender {}  dropped by server {}  errors {}  reconnects {}",
            u("lost"),
            u("duplicated"),
            u("misrouted"),
            u("wrong_sender"),
            u("dropped_by_server"),
            u("errors"),
            u("reconnects")
        );
        usage_lines(&mut out, r);
    }
    if let Some(errors) = r["first_errors"].as_array() {
        for e in errors.iter().take(3) {
            let _ = writeln!(out, "  first error: {}", e.as_str().unwrap_or(""));
        }
    }
    out
}

/// The CPU of the watched processes, the generator's and the rest of the machine's.
fn cpu_line(out: &mut String, r: &Value) {
    use std::fmt::Write;
    let f = |key: &str| r.get(key).and_then(Value::as_f64).unwrap_or(0.0);
    let _ = writeln!(
        out,
        "  cpu s             {}  generator {:.2}  other {:.2}",
        by_process(&r["cpu_s"], 1.0),
        f("generator_cpu_s"),
        f("other_cpu_s")
    );
}

/// The CPU and memory lines of a run with load (the figures of [`add_usage`]).
fn usage_lines(out: &mut String, r: &Value) {
    use std::fmt::Write;
    let f = |key: &str| r.get(key).and_then(Value::as_f64).unwrap_or(0.0);
    let _ = writeln!(
        out,
        "  server cpu s      {}  = {:.2} s ({:.2} cores) -> {:.1} µs per {}",
        by_process(&r["cpu_s"], 1.0),
        f("server_cpu_s"),
        f("server_cores"),
        f("server_cpu_us_per_unit"),
        r["cpu_per"].as_str().unwrap_or("")
    );
    let _ = writeln!(
        out,
        "  generator cpu     {:.2} s ({:.2} cores)  other {:.2} s  irq {:.2} s  steal {:.2} s{}",
        f("generator_cpu_s"),
        f("generator_cores"),
        f("other_cpu_s"),
        f("irq_cpu_s"),
        f("steal_cpu_s"),
        if r["disturbed"].as_bool() == Some(true) {
            format!("  DISTURBED ({})", r["disturbed_by"])
        } else {
            String::new()
        }
    );
    let _ = writeln!(
        out,
        "  rss MiB           {}",
        by_process(&r["rss_kb"], 1.0 / 1024.0)
    );
    if r.get("backend_cpu_s").is_some() {
        let _ = writeln!(
            out,
            "  backend cpu s     {}  ({:.2} cores) -> {:.1} µs per delivered message, {:.1}% of servers + backend; rss MiB {}",
            by_process(&r["backend_cpu_s"], 1.0),
            f("backend_cores"),
            f("backend_cpu_us_per_msg"),
            f("backend_cpu_share") * 100.0,
            by_process(&r["backend_rss_kb"], 1.0 / 1024.0)
        );
    }
}

/// `name figure` for each process of a `{name: figure}` object, figures × `scale`.
fn by_process(map: &Value, scale: f64) -> String {
    map.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| format!("{k} {:.2}", v.as_f64().unwrap_or(0.0) * scale))
                .collect::<Vec<_>>()
                .join("  ")
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(target: Target) -> Ctx {
        Ctx {
            target,
            transport: Transport::Poll,
            ws_flow: Flow::Fast,
            preflight: false,
            payload_bytes: 100,
            publishers: 4,
            subscribers: 100,
            poll_pause: Duration::ZERO,
            publish_batch: 0,
            publish_pause: Duration::ZERO,
            window_start_us: AtomicU64::new(0),
            window_end_us: AtomicU64::new(u64::MAX),
            first_polls: AtomicUsize::new(0),
            acked_total: AtomicU64::new(0),
            delivered_total: AtomicU64::new(0),
        }
    }

    fn reply(status: StatusCode, headers: &[(&'static str, &'static str)], body: &str) -> Reply {
        let mut map = hyper::HeaderMap::new();
        for (k, v) in headers {
            map.insert(*k, HeaderValue::from_static(v));
        }
        Reply {
            status,
            headers: map,
            body: Bytes::from(body.to_string()),
        }
    }

    #[test]
    fn payload_has_the_requested_size_and_reads_back() {
        for size in [100, 150, 1000] {
            let text = payload(123_456, 3, 42, 1_700_000_000_000_000, size);
            assert_eq!(text.len(), size, "{text}");
            let parsed: Delivered = serde_json::from_str(&text).unwrap();
            assert_eq!(
                (parsed.seq, parsed.publisher, parsed.dst.as_ref()),
                (123_456, 3, "sub42")
            );
        }
        // Too small to pad: the message is never cut.
        assert!(payload(1, 0, 0, 1, 10).ends_with(r#""pad":""}"#));
    }

    #[test]
    fn fan_payload_has_the_requested_size_and_reads_back() {
        let text = fan_payload(12, 1_700_000_000_000_000, 100);
        assert_eq!(text.len(), 100, "{text}");
        let parsed: FanData = serde_json::from_str(&text).unwrap();
        assert_eq!((parsed.seq, parsed.ts), (12, 1_700_000_000_000_000));
    }

    #[test]
    fn fan_poll_reply_is_checked_per_envelope() {
        let c = ctx(Target::Micromsg);
        let ledger = Ledger::new(1);
        let seq = ledger.register(10);
        ledger.acknowledge(seq, 41);
        let mut stats = FanSubStats::default();
        let body = r#"{"messages":[
            {"id":41,"time":1,"source":"fanpub","target":{"channel":"bench.fan"},"data":{"seq":0,"ts":10,"pad":"x"}},
            {"id":42,"time":1,"source":"fanpub","target":{"session":"fan0"},"data":{"seq":1,"ts":10}},
            {"id":41,"time":1,"source":null,"target":{"channel":"bench.fan"},"data":{"seq":0,"ts":10}}],
            "ids":[41,42,41],"cursor":42}"#;
        handle_fan_reply(
            &c,
            &ledger,
            &reply(StatusCode::OK, &[], body),
            1010,
            &mut stats,
        );
        assert_eq!(
            (stats.misrouted, stats.wrong_sender, stats.errors),
            (1, 1, 0)
        );
        assert_eq!(stats.inbox.latencies_us, vec![1000]);
        assert_eq!(stats.inbox.duplicated, 1);
        assert!(ledger.is_complete(seq));

        // ids out of step with the messages, an error reply, an empty poll.
        let body = r#"{"messages":[],"ids":[7]}"#;
        handle_fan_reply(
            &c,
            &ledger,
            &reply(StatusCode::OK, &[], body),
            0,
            &mut stats,
        );
        let error = r#"{"error":true,"exception_id":"Kicked","exception":"x"}"#;
        handle_fan_reply(
            &c,
            &ledger,
            &reply(StatusCode::FORBIDDEN, &[], error),
            0,
            &mut stats,
        );
        let empty = r#"{"messages":[],"ids":[]}"#;
        handle_fan_reply(
            &c,
            &ledger,
            &reply(StatusCode::OK, &[], empty),
            0,
            &mut stats,
        );
        assert_eq!((stats.errors, stats.polls_with_messages), (2, 1));
    }

    #[test]
    fn fan_publish_replies() {
        let ok = reply(StatusCode::OK, &[], r#"{"id":17,"recipients":3}"#);
        let sent = sent_outcome(&ok).unwrap();
        assert_eq!((sent.id, sent.recipients, sent.dropped), (17, 3, 0));
        let refused = reply(
            StatusCode::SERVICE_UNAVAILABLE,
            &[],
            r#"{"error":true,"exception_id":"CoreUnavailable","exception":"x"}"#,
        );
        assert!(sent_outcome(&refused).is_err());
    }

    #[test]
    fn micromsg_batch_is_checked_per_message() {
        let c = ctx(Target::Micromsg);
        let mut cursor = NchanCursor::default();
        let mut stats = SubStats::default();
        let body = r#"{"messages":[
            {"seq":0,"pub":1,"dst":"sub5","ts":10,"pad":"x","session_src":"pub1"},
            {"seq":1,"pub":1,"dst":"sub6","ts":10,"pad":"x","session_src":"pub1"},
            {"seq":2,"pub":2,"dst":"sub5","ts":10,"pad":"x","session_src":"pub1"}]}"#;
        handle_poll_reply(
            &c,
            "sub5",
            &reply(StatusCode::OK, &[], body),
            1010,
            &mut cursor,
            &mut stats,
        );
        assert_eq!(stats.deliveries.len(), 2);
        assert_eq!(stats.deliveries[0].latency_us, 1000);
        assert_eq!(stats.misrouted, 1);
        assert_eq!(stats.wrong_sender, 1);
        assert_eq!(stats.errors, 0);

        let error = r#"{"error":true,"exception_id":"CoreUnavailable","exception":"x"}"#;
        handle_poll_reply(
            &c,
            "sub5",
            &reply(StatusCode::OK, &[], error),
            0,
            &mut cursor,
            &mut stats,
        );
        assert_eq!(stats.errors, 1);
        handle_poll_reply(
            &c,
            "sub5",
            &reply(StatusCode::OK, &[], r#"{"messages":null}"#),
            0,
            &mut cursor,
            &mut stats,
        );
        assert_eq!((stats.errors, stats.deliveries.len()), (1, 2));
    }

    #[test]
    fn websocket_frames_are_checked_as_poll_replies_are() {
        let c = ctx(Target::Micromsg);
        let mut stats = SubStats::default();
        let frame = |id: u64, dst: &str, src: &str| {
            format!(
                r#"{{"op":"message","id":{id},"message":{{"seq":{id},"pub":1,"dst":"{dst}","ts":10,"pad":"x","session_src":"{src}"}}}}"#
            )
        };
        let mut handle =
            |text: &str| handle_ws_frame(&c, "sub5", text.as_bytes(), 1010, &mut stats);
        assert_eq!(handle(&frame(17, "sub5", "pub1")), Some(17));
        // Misrouted and wrong sender: still acknowledged, so that the window moves.
        assert_eq!(handle(&frame(18, "sub6", "pub1")), Some(18));
        assert_eq!(handle(&frame(19, "sub5", "pub2")), Some(19));
        assert_eq!(handle(r#"{"op":"acked","ref":1,"count":2}"#), None);
        assert_eq!(
            handle(r#"{"op":"error","exception_id":"MailboxFull","exception":"x"}"#),
            None
        );
        assert_eq!(handle(r#"{"op":"message","message":{"seq":1}}"#), None);
        assert_eq!(handle("not json"), None);
        assert_eq!(stats.deliveries.len(), 2);
        assert_eq!(stats.deliveries[0].latency_us, 1000);
        assert_eq!(
            (stats.misrouted, stats.wrong_sender, stats.errors),
            (1, 1, 3)
        );
        assert!(stats.first_error.unwrap().contains("sub6"));
    }

    #[test]
    fn events_are_checked_as_poll_replies_are() {
        let c = ctx(Target::Micromsg);
        let mut stats = SubStats::default();
        let mut parser = EventParser::default();
        let mut events = Vec::new();
        parser.feed(
            b"retry: 2000\n\nid: 4\nevent: message\ndata: {\"seq\":3,\"pub\":0,\"dst\":\"sub2\",\"ts\":5,\"session_src\":\"pub0\"}\n\n\
              : heartbeat\n\nid: 5\nevent: message\ndata: {\"seq\":4}\n\n\
              event: error\ndata: {\"error\":true,\"exception_id\":\"Kicked\"}\n\n",
            &mut events,
        );
        let before = stats.deliveries.len();
        for event in &events {
            handle_event(&c, "sub2", event, 25, &mut stats);
        }
        count_batch(&c, &mut stats, before);
        assert_eq!(stats.deliveries.len(), 1);
        assert_eq!(
            (stats.deliveries[0].seq, stats.deliveries[0].latency_us),
            (3, 20)
        );
        assert_eq!(stats.errors, 2);
        assert_eq!((stats.polls_with_messages, stats.messages_in_polls), (1, 1));
        assert_eq!(c.delivered_total.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn nchan_multipart_reply_and_cursor() {
        let c = ctx(Target::Nchan);
        let mut cursor = NchanCursor::default();
        let mut stats = SubStats::default();
        let body = "--B\r\nContent-Type: application/json\r\n\r\n{\"seq\":0,\"pub\":0,\"dst\":\"sub0\",\"ts\":1}\r\n\
                    --B\r\nContent-Type: application/json\r\n\r\n{\"seq\":4,\"pub\":0,\"dst\":\"sub0\",\"ts\":1}\r\n--B--\r\n";
        let headers = [
            ("content-type", "multipart/mixed; boundary=B"),
            ("last-modified", "Sun, 22 Nov 2026 05:53:20 GMT"),
            ("etag", "2"),
        ];
        handle_poll_reply(
            &c,
            "sub0",
            &reply(StatusCode::OK, &headers, body),
            5,
            &mut cursor,
            &mut stats,
        );
        assert_eq!(stats.deliveries.len(), 2);
        assert_eq!(stats.deliveries[1].seq, 4);
        assert_eq!(cursor.etag.as_ref().unwrap(), "2");
        assert!(cursor.last_modified.is_some());
        // A timed-out long-poll keeps the cursor and is no error.
        handle_poll_reply(
            &c,
            "sub0",
            &reply(StatusCode::REQUEST_TIMEOUT, &[], ""),
            5,
            &mut cursor,
            &mut stats,
        );
        assert_eq!(
            (stats.errors, cursor.etag.as_ref().unwrap().as_bytes()),
            (0, &b"2"[..])
        );
    }

    #[test]
    fn publish_replies() {
        let ok = reply(StatusCode::OK, &[], r#"{"messages":null,"status":"ok"}"#);
        assert_eq!(publish_outcome(Target::Micromsg, &ok), Ok(0));
        let dropped = reply(
            StatusCode::OK,
            &[],
            r#"{"messages":null,"status":"ok","dropped":2}"#,
        );
        assert_eq!(publish_outcome(Target::Micromsg, &dropped), Ok(2));
        let error = reply(
            StatusCode::OK,
            &[],
            r#"{"error":true,"exception_id":"MailboxFull","exception":"x"}"#,
        );
        assert!(publish_outcome(Target::Micromsg, &error).is_err());
        assert_eq!(
            publish_outcome(Target::Nchan, &reply(StatusCode::ACCEPTED, &[], "queued")),
            Ok(0)
        );
        assert!(publish_outcome(Target::Nchan, &reply(StatusCode::FORBIDDEN, &[], "")).is_err());
    }
}
