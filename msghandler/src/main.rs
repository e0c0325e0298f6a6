//! `msghandler`, the micromsg HTTP front.
//!
//! Speaks HTTP/1.1 to browsers (usually behind nginx) and the application backend,
//! and turns every request into one IPC request to `msgserver` over its Unix socket.
//! It holds no message state, so it can be restarted at any time without losing a
//! message. It implements the x0 `micro-msg-server` contract (see ARCHITECTURE.md),
//! the versioned `/v1` API (docs/API.md), and its WebSocket and Server-Sent Events
//! transports with the browser client that uses them (docs/TRANSPORTS.md).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use futures_util::FutureExt;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use msghandler::auth::{TokenConfig, Tokens};
use msghandler::backend_key::BackendKey;
use msghandler::config::{HandlerConfig, seconds};
use msghandler::core_link::{CorePool, PoolConfig};
use msghandler::http::{self, App, Cors, Streams};
use msghandler::limits::{LimitConfig, Limits};
use msghandler::metrics::Metrics;

// Why jemalloc: see its entry in Cargo.toml (memory per parked poll).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "micromsg HTTP front: x0-compatible long-polling, forwarded to msgserver"
)]
struct Cli {
    /// TOML configuration file (every key is documented in etc/msghandler.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// msgserver's Unix socket (overrides `socket`).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// HTTP address to listen on (overrides `listen`).
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<SocketAddr>,
    /// Seconds a long-poll is held when there is nothing to deliver (overrides
    /// `poll_timeout`).
    #[arg(long, value_name = "SECONDS")]
    poll_timeout: Option<f64>,
    /// Load and validate the configuration (file, environment and flags: values,
    /// secret files, token keys, CORS origins, trusted proxies...), print
    /// "configuration OK" and a summary, and exit without binding anything; exit
    /// nonzero with the error otherwise.
    #[arg(long)]
    check_config: bool,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("msghandler: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let (mut config, ignored_env) = HandlerConfig::load_reporting(cli.config.as_deref())?;
    if let Some(socket) = cli.socket {
        config.socket = socket;
    }
    if let Some(listen) = cli.listen {
        config.listen = listen;
    }
    if let Some(poll_timeout) = cli.poll_timeout {
        config.poll_timeout = poll_timeout;
    }
    if cli.check_config {
        tracing_subscriber::EnvFilter::try_new(&config.log)
            .with_context(|| format!("log filter {:?}", config.log))?;
        let settings = Settings::new(&config)?;
        print_summary(&config, &settings, &ignored_env);
        return Ok(());
    }
    micromsg_logging::init(&config.log, config.log_format)?;

    let (listener, origin) = listener(config.listen)?;
    let local = listener
        .local_addr()
        .context("reading the listening address")?;
    // By default one worker per two CPUs: msgserver and the kernel's network stack
    // need the rest, and fewer workers batch more IPC frames per wake-up (measured:
    // one worker instead of two cut syscalls per message from 7.3 to 5.4 here, and
    // msgserver's from 3.2 to 1.0).
    let threads = match config.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
        n => n,
    };
    let settings = Arc::new(Settings::new(&config)?);
    info!(
        listen = %local,
        from = origin,
        socket = %config.socket.display(),
        threads,
        backend_api = if settings.backend_key.is_some() { "enabled" } else { "disabled (no backend_key)" },
        auth = %config.auth,
        "msghandler listening"
    );
    if settings.tokens.is_none() {
        warn!(
            "auth = \"none\": any client may read and send as any session (the x0 behaviour). \
             For development only; set auth = \"token\" in production"
        );
    }

    // Thread per core: each worker has its own single-threaded runtime, its own IPC
    // connections and accepts on its own handle of the one listening socket. A
    // request, its IPC round trip and its reply never cross threads, so the hot path
    // has no cross-thread wake-ups, and one worker's frames coalesce into one write.
    let (stop, stopped) = tokio::sync::watch::channel(false);
    {
        // Rate-limit state of clients gone quiet is dropped, so that it is as large
        // as the set of recent clients, not of all clients ever seen.
        let limits = settings.limits.clone();
        std::thread::Builder::new()
            .name("limits".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(30));
                    limits.forget_idle();
                }
            })
            .context("starting the limits thread")?;
    }
    let workers = (0..threads)
        .map(|i| {
            let listener = listener
                .try_clone()
                .context("sharing the listening socket")?;
            let settings = settings.clone();
            let stopped = stopped.clone();
            std::thread::Builder::new()
                .name(format!("http-{i}"))
                .spawn(move || worker(listener, settings, stopped))
                .context("starting a worker thread")
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    drop(listener);
    // The workers accept from here on (connections that came earlier wait in the
    // backlog): systemd/msghandler.service is Type=notify.
    notify(&[sd_notify::NotifyState::Ready]);

    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the signal runtime")?
        .block_on(wait_for_signal());
    notify(&[sd_notify::NotifyState::Stopping]);
    // Parked polls answer {"messages":null} now; keep-alive connections close after
    // their current request.
    let _ = stop.send(true);
    for worker in workers {
        match worker.join() {
            Ok(result) => result?,
            Err(_) => anyhow::bail!("a worker thread panicked"),
        }
    }
    info!("msghandler stopped");
    Ok(())
}

/// The listening socket: the one systemd passed (socket activation, sd_listen_fds(3):
/// LISTEN_PID is ours and LISTEN_FDS counts the sockets from fd 3 on), else a new
/// one on `addr`. An inherited socket outlives this process, so a restart never
/// refuses a connection: what arrives meanwhile waits in its backlog for the next
/// process. Returns the socket and where it came from, for the log.
fn listener(addr: SocketAddr) -> anyhow::Result<(std::net::TcpListener, &'static str)> {
    let mut fds = sd_notify::listen_fds().context("reading LISTEN_FDS")?;
    let Some(fd) = fds.next() else {
        let listener = listen(addr).with_context(|| format!("listening on {addr}"))?;
        return Ok((listener, "listen"));
    };
    anyhow::ensure!(
        fds.len() == 0,
        "LISTEN_FDS passes {} sockets; msghandler serves on exactly one",
        fds.len() + 1
    );
    // SAFETY: LISTEN_PID names this process, so the service manager passed fd 3 to
    // us alone, and nothing else in this process has taken it over.
    let socket = unsafe { <socket2::Socket as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let is_tcp_listener = socket.r#type().is_ok_and(|t| t == socket2::Type::STREAM)
        && socket.is_listener().unwrap_or(false)
        && socket.local_addr().is_ok_and(|a| a.as_socket().is_some());
    anyhow::ensure!(
        is_tcp_listener,
        "LISTEN_FDS: fd {fd} is not a listening TCP socket (ListenStream= in msghandler.socket)"
    );
    socket
        .set_nonblocking(true)
        .context("making the inherited socket non-blocking")?;
    Ok((socket.into(), "systemd socket activation (LISTEN_FDS)"))
}

/// Tells systemd how we are (Type=notify); does nothing when NOTIFY_SOCKET is unset.
fn notify(state: &[sd_notify::NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        warn!(error = %e, "notifying systemd failed");
    }
}

/// A new listening socket. std's `TcpListener::bind` fixes the backlog at 128, which
/// drops connection attempts when many browsers (re)connect at once, and a dropped
/// SYN is retried only after a second; the kernel caps ours at `somaxconn`.
fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    // A restart must not wait for the old process's connections to leave TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// What every worker needs, read once from the configuration.
struct Settings {
    pool: PoolConfig,
    poll_timeout: std::time::Duration,
    max_body_bytes: u64,
    header_read_timeout: std::time::Duration,
    body_read_timeout: std::time::Duration,
    cors_allowed_origins: Vec<String>,
    backend_key: Option<Arc<BackendKey>>,
    tokens: Option<Arc<Tokens>>,
    limits: Arc<Limits>,
    grace: std::time::Duration,
    streams: Streams,
    metrics: Arc<Metrics>,
}

impl Settings {
    fn new(config: &HandlerConfig) -> anyhow::Result<Self> {
        // Checked here so that a bad origin stops the process before it serves.
        Cors::new(&config.cors_allowed_origins)?;
        Ok(Settings {
            pool: PoolConfig {
                socket: config.socket.clone(),
                connections: config.core_connections,
                max_in_flight: config.max_in_flight,
                heartbeat_interval: seconds("heartbeat_interval", config.heartbeat_interval)?,
                core_wait: seconds("core_wait", config.core_wait)?,
            },
            poll_timeout: seconds("poll_timeout", config.poll_timeout)?,
            max_body_bytes: config.max_body_bytes,
            header_read_timeout: positive_seconds(
                "header_read_timeout",
                config.header_read_timeout,
            )?,
            body_read_timeout: positive_seconds("body_read_timeout", config.body_read_timeout)?,
            cors_allowed_origins: config.cors_allowed_origins.clone(),
            backend_key: BackendKey::from_config(
                config.backend_key.as_ref(),
                config.backend_key_file.as_deref(),
            )?
            .map(Arc::new),
            tokens: match config.auth.as_str() {
                "none" => None,
                "token" => Some(Arc::new(Tokens::new(&TokenConfig::of(config))?)),
                other => anyhow::bail!("auth = {other:?}: expected \"none\" or \"token\""),
            },
            limits: Arc::new(Limits::new(&LimitConfig::of(config))?),
            grace: seconds("shutdown_grace", config.shutdown_grace)?,
            streams: streams(config)?,
            metrics: Metrics::new(&config.metrics_allow)?,
        })
    }
}

/// A bound that must hold: zero would close every connection before its first
/// byte, and "no bound" is what the slowloris defence is there to prevent.
fn positive_seconds(key: &str, secs: f64) -> anyhow::Result<std::time::Duration> {
    let value = seconds(key, secs)?;
    anyhow::ensure!(!value.is_zero(), "{key} must be more than 0");
    Ok(value)
}

fn streams(config: &HandlerConfig) -> anyhow::Result<Streams> {
    let streams = Streams {
        ping_interval: seconds("ws_ping_interval", config.ws_ping_interval)?,
        send_timeout: seconds("ws_send_timeout", config.ws_send_timeout)?,
        max_buffer: config.ws_max_buffer,
        heartbeat: seconds("sse_heartbeat", config.sse_heartbeat)?,
        default_window: config.ws_default_window,
        max_window: config.ws_max_window,
    };
    // Zero periods would make tokio's intervals panic, and a zero window or buffer
    // would deliver nothing.
    for (key, value) in [
        ("ws_ping_interval", streams.ping_interval),
        ("ws_send_timeout", streams.send_timeout),
        ("sse_heartbeat", streams.heartbeat),
    ] {
        anyhow::ensure!(!value.is_zero(), "{key} must be more than 0");
    }
    anyhow::ensure!(streams.max_buffer > 0, "ws_max_buffer must be more than 0");
    anyhow::ensure!(
        (1..=streams.max_window).contains(&streams.default_window),
        "ws_default_window must be 1 to ws_max_window ({})",
        streams.max_window
    );
    Ok(streams)
}

fn worker(
    listener: std::net::TcpListener,
    settings: Arc<Settings>,
    stopped: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a worker runtime")?
        .block_on(serve(listener, settings, stopped))
}

async fn serve(
    listener: std::net::TcpListener,
    settings: Arc<Settings>,
    mut stopped: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let listener = TcpListener::from_std(listener)?;
    let core = CorePool::start(settings.pool.clone());
    let tasks = TaskTracker::new();
    let app = Arc::new(App {
        core: core.clone(),
        poll_timeout: settings.poll_timeout,
        max_body_bytes: settings.max_body_bytes,
        body_read_timeout: settings.body_read_timeout,
        cors: Cors::new(&settings.cors_allowed_origins)?,
        backend_key: settings.backend_key.clone(),
        tokens: settings.tokens.clone(),
        limits: settings.limits.clone(),
        bindings: Default::default(),
        shutdown: stopped.clone(),
        streams: settings.streams.clone(),
        tasks: tasks.clone(),
        metrics: settings.metrics.worker(core.metrics().clone()),
    });

    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                // Another worker took it (the socket is shared) or the connection
                // was already reset.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped.wait_for(|stop| *stop) => break,
        };
        let _ = stream.set_nodelay(true);
        let Some(slot) = settings.limits.connect(peer.ip()) else {
            // Over max_connections_per_ip: the request still gets an answer in the
            // shape its path needs (x0 clients stop on anything but a 200), then
            // the connection closes.
            let refused = http1::Builder::new().keep_alive(false).serve_connection(
                TokioIo::new(stream),
                service_fn(|request| async move {
                    Ok::<_, std::convert::Infallible>(http::too_many_connections(&request))
                }),
            );
            tasks.spawn(async move {
                let _ = tokio::time::timeout(std::time::Duration::from_secs(10), refused).await;
            });
            continue;
        };
        let fd = std::os::fd::AsRawFd::as_raw_fd(&stream);
        let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let service = {
            let app = app.clone();
            let peer = peer.ip();
            let served = served.clone();
            let stopped = stopped.clone();
            service_fn(move |request| {
                served.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let stopped = stopped.clone();
                // `map`, not an async block around `handle`: the block would keep
                // the request it captured, and hyper holds this future for as long
                // as the request is open, a parked poll's whole wait.
                http::handle(app.clone(), peer, request).map(move |reply| {
                    let Ok(mut reply) = reply;
                    // A reply given while stopping (a parked poll's null, above all)
                    // is the connection's last: the client must not send its next
                    // request on it, which the next process could never answer.
                    if *stopped.borrow() && reply.status() != hyper::StatusCode::SWITCHING_PROTOCOLS
                    {
                        reply.headers_mut().insert(
                            hyper::header::CONNECTION,
                            hyper::header::HeaderValue::from_static("close"),
                        );
                    }
                    Ok::<_, std::convert::Infallible>(reply)
                })
            })
        };
        // With upgrades: a WebSocket takes the connection over from hyper. The
        // header timer runs whenever hyper waits for a request head, so it also
        // closes a keep-alive connection that never sends its next request; it
        // needs a timer to run at all.
        let connection = http1::Builder::new()
            .keep_alive(true)
            .timer(TokioTimer::new())
            .header_read_timeout(settings.header_read_timeout)
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades();
        let mut stopped = stopped.clone();
        // Boxed, not pinned in the task: pinning moves it out of the block's capture
        // into a second slot of the same size, and the task lives as long as the
        // connection.
        let mut connection = Box::pin(connection);
        tasks.spawn(async move {
            let _slot = slot;
            let ended = tokio::select! {
                ended = connection.as_mut() => Some(ended),
                _ = stopped.wait_for(|stop| *stop) => None,
            };
            // Stopping: finish the request in progress (an event stream ends by
            // itself), then close instead of waiting for the next one.
            let ended = match ended {
                Some(ended) => ended,
                None => match let_pending_request_in(connection.as_mut(), fd, &served).await {
                    Some(ended) => ended,
                    None => {
                        connection.as_mut().graceful_shutdown();
                        connection.await
                    }
                },
            };
            if let Err(e) = ended {
                tracing::debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }

    drop(listener);
    tasks.close();
    if tokio::time::timeout(settings.grace, tasks.wait())
        .await
        .is_err()
    {
        warn!(
            "connections still open after {:?}; closing them",
            settings.grace
        );
    }
    core.flush().await;
    Ok(())
}

/// How long a connection accepted just before a stop may take to send its first
/// request. Its client has connected and is about to write; closing now would fail
/// that request, which no client retries on a fresh connection.
const FIRST_REQUEST_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// On a stop, drives `connection` until hyper has taken in the request waiting
/// unread in its socket, if there is one (and, on a connection that has not served
/// one yet, until its first request came or [`FIRST_REQUEST_WAIT`] passed). hyper
/// counts a connection as idle until it has read a request head and closes an idle
/// one on `graceful_shutdown` at once, so a request already sent would get no
/// answer: the race of every HTTP keep-alive close, which here would hit the
/// requests in flight at each restart. Once hyper has it, the shutdown waits for
/// its reply, which says `Connection: close`. Returns the connection's end if it
/// came meanwhile.
async fn let_pending_request_in<F: std::future::Future>(
    mut connection: std::pin::Pin<&mut F>,
    fd: std::os::fd::RawFd,
    served: &std::sync::atomic::AtomicU64,
) -> Option<F::Output> {
    // Polling and not readiness: the socket is registered with tokio by hyper's
    // stream, and this runs once per connection per stop.
    const STEP: std::time::Duration = std::time::Duration::from_millis(5);
    let first_request_by = tokio::time::Instant::now() + FIRST_REQUEST_WAIT;
    let served_before = served.load(std::sync::atomic::Ordering::Relaxed);
    loop {
        let served_now = served.load(std::sync::atomic::Ordering::Relaxed);
        if served_now > served_before {
            return None;
        }
        let fresh = served_now == 0 && tokio::time::Instant::now() < first_request_by;
        if !fresh && !request_waiting(fd) {
            return None;
        }
        if let Ok(ended) = tokio::time::timeout(STEP, connection.as_mut()).await {
            return Some(ended);
        }
    }
}

/// Whether bytes the server has not read wait in the socket `fd`.
fn request_waiting(fd: std::os::fd::RawFd) -> bool {
    // SAFETY: `fd` belongs to the TCP stream inside the connection future that the
    // caller holds and has not yet completed, so it is open and stays open for this
    // call; the borrow ends before the caller polls that future again.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let mut byte = [std::mem::MaybeUninit::new(0u8)];
    // The stream is non-blocking: WouldBlock means nothing is waiting.
    socket2::SockRef::from(&fd)
        .peek(&mut byte)
        .is_ok_and(|n| n > 0)
}

/// What `--check-config` prints on success: the settings an operator most often
/// needs to confirm, not every key.
fn print_summary(config: &HandlerConfig, settings: &Settings, ignored_env: &[String]) {
    println!("configuration OK");
    println!("  listen         {}", config.listen);
    println!("  socket         {}", config.socket.display());
    println!("  auth           {}", config.auth);
    let backend = if settings.backend_key.is_some() {
        "enabled"
    } else {
        "disabled (no backend_key)"
    };
    println!("  backend API    {backend}");
    println!(
        "  cors origins   {}",
        config.cors_allowed_origins.join(", ")
    );
    println!("  metrics_allow  {}", config.metrics_allow.join(", "));
    println!(
        "  log            {:?} as {:?}",
        config.log, config.log_format
    );
    for name in ignored_env {
        println!("  ignored        {name} (not a configuration key)");
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("installing SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("installing SIGINT handler");
    tokio::select! {
        _ = term.recv() => info!("SIGTERM: stopping"),
        _ = int.recv() => info!("SIGINT: stopping"),
    }
}
