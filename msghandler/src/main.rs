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
    msghandler::logging::init(&config.log, config.log_format)?;

    let listener =
        listen(config.listen).with_context(|| format!("listening on {}", config.listen))?;
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
        listen = %config.listen,
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

    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the signal runtime")?
        .block_on(wait_for_signal());
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

/// The listening socket. std's `TcpListener::bind` fixes the backlog at 128, which
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
        let service = {
            let app = app.clone();
            let peer = peer.ip();
            service_fn(move |request| http::handle(app.clone(), peer, request))
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
        tasks.spawn(async move {
            let _slot = slot;
            tokio::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => Some(ended),
                _ = stopped.wait_for(|stop| *stop) => None,
            };
            // Stopping: finish the request in progress (an event stream ends by
            // itself), then close instead of waiting for the next one.
            let ended = match ended {
                Some(ended) => ended,
                None => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
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
