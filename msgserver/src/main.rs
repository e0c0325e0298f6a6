//! `msgserver`, the micromsg core.
//!
//! Owns every session's mailbox and parked poll, and serves the HTTP front
//! (`msghandler`) over a permissioned Unix socket, and the operator (`msgctl`) over a
//! second, root-only one. It never speaks HTTP. Started as root, it binds both
//! sockets, hands the main one to `www-data` and drops to that user before serving
//! anything.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use tracing::{error, info};

use msgserver::broker::{Broker, ClockAnchor, DeliveryMode};
use msgserver::config::{Backend, FsyncPolicy, ServerConfig};
use msgserver::journal::Journal;
use msgserver::storage::wal::Wal;
use msgserver::{server, socket};

#[derive(Debug, Parser)]
#[command(
    version,
    about = "micromsg core: routing, mailboxes and delivery behind a Unix socket"
)]
struct Cli {
    /// TOML configuration file (every key is documented in etc/msgserver.toml).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Unix socket to listen on (overrides `socket`).
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Delivery mode (overrides `delivery`): x0 removes what a poll returns; ack keeps
    /// it until acknowledged and redelivers after the visibility timeout.
    #[arg(long, value_enum)]
    delivery: Option<DeliveryArg>,
    /// Keep messages durably in this directory (overrides `data_dir`); without it
    /// everything lives in memory only.
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// When stored messages reach the disk (overrides `fsync`).
    #[arg(long, value_enum)]
    fsync: Option<FsyncPolicy>,
    /// Load and validate the configuration (file, environment and flags), print
    /// "configuration OK" and a summary, and exit without binding anything; exit
    /// nonzero with the error otherwise.
    #[arg(long)]
    check_config: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum DeliveryArg {
    X0,
    Ack,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("msgserver: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let (mut config, ignored_env) = ServerConfig::load_reporting(cli.config.as_deref())?;
    if let Some(socket) = cli.socket {
        config.socket = socket;
    }
    if let Some(dir) = cli.data_dir {
        config.data_dir = Some(dir);
    }
    if let Some(fsync) = cli.fsync {
        config.fsync = fsync;
    }
    if let Some(delivery) = cli.delivery {
        config.delivery = match delivery {
            DeliveryArg::X0 => DeliveryMode::X0,
            DeliveryArg::Ack => DeliveryMode::Ack,
        };
    }
    config.validate()?;
    // Read before the drop: the admin socket admits whoever started the core.
    let started_by = nix::unistd::getuid().as_raw();
    let admin_peers = socket::AdminPolicy::for_config(&config, started_by)?;
    if cli.check_config {
        print_summary(&config, &ignored_env);
        return Ok(());
    }
    micromsg_logging::init(&config.log, config.log_format)?;

    let broker_config = config.broker()?;
    // Everything that needs root happens before the runtime starts any thread. The
    // admin socket first: once the main socket answers, both do.
    let admin_listener = socket::bind_admin(&config)?;
    let (listener, socket_gid) = socket::bind(&config)?;
    if let Some(dir) = &config.data_dir {
        socket::prepare_data_dir(&config, dir)?;
    }
    socket::drop_privileges(&config)?;
    let engine = match config.backend {
        Backend::Redis => {
            let settings = config.cluster()?;
            info!(
                url = %settings.redacted_url(),
                prefix = %settings.prefix,
                node = %settings.node,
                "backend redis: sessions and messages live in Redis, shared with the cluster's other cores"
            );
            server::Engine::Redis(settings)
        }
        Backend::Embedded => embedded(&config, broker_config)?,
    };
    let shell = server::ShellConfig {
        peers: socket::PeerPolicy::new(&config, socket_gid),
        admin_peers,
        socket: config.socket.clone(),
        admin_socket: config.admin_socket(),
        max_in_flight: config.max_in_flight.max(1),
        heartbeat_timeout: config.heartbeat_timeout()?,
        sweep_interval: Duration::from_secs(1),
        durable: config.data_dir.is_some() || config.backend == Backend::Redis,
        storage: config
            .data_dir
            .clone()
            .map(|data_dir| server::StorageSettings {
                data_dir,
                fsync: config.fsync,
            }),
    };
    info!(
        socket = %config.socket.display(),
        admin_socket = %config.admin_socket().display(),
        delivery = ?config.delivery,
        "msgserver listening"
    );

    // One thread: the broker is a single owner anyway, and keeping the connection
    // tasks on its thread spares every request two cross-thread wake-ups.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async {
        listener.set_nonblocking(true)?;
        let listener = tokio::net::UnixListener::from_std(listener)?;
        admin_listener.set_nonblocking(true)?;
        let admin_listener = tokio::net::UnixListener::from_std(admin_listener)?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            wait_for_signal().await;
            service_manager::notify(&[sd_notify::NotifyState::Stopping]);
            let _ = stop.send(true);
        });
        // Both sockets are bound and storage is recovered: from here a connection is
        // served (it waits in the backlog until the first accept). systemd starts
        // msghandler only now (Type=notify and After=msgserver.service).
        service_manager::notify(&[sd_notify::NotifyState::Ready]);
        if let Some(period) = sd_notify::watchdog_enabled() {
            tokio::spawn(service_manager::watchdog(period));
        }
        server::serve(listener, admin_listener, engine, shell, stopped).await;
        anyhow::Ok(())
    })?;
    // Best effort: after dropping privileges the directory may not be ours to write.
    for path in [config.socket.clone(), config.admin_socket()] {
        if std::fs::remove_file(&path).is_ok() {
            info!(socket = %path.display(), "socket removed");
        }
    }
    info!("msgserver stopped");
    Ok(())
}

/// The broker of this process, restored from its log when durable.
fn embedded(
    config: &ServerConfig,
    broker_config: msgserver::broker::BrokerConfig,
) -> anyhow::Result<server::Engine> {
    let clock = ClockAnchor::now();
    let (broker, journal) = match &config.data_dir {
        None => {
            info!("no data_dir: messages are kept in memory only");
            (Broker::new(broker_config, clock), None)
        }
        Some(dir) => {
            let started = std::time::Instant::now();
            let (wal, recovered) =
                Wal::open(dir).with_context(|| format!("opening storage in {}", dir.display()))?;
            let broker = Broker::restore(broker_config, clock, recovered, clock.instant);
            let stats = broker.stats();
            info!(
                dir = %dir.display(),
                fsync = ?config.fsync,
                ready = stats.ready,
                dead_letters = stats.dead_letters,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "storage recovered"
            );
            let journal = Journal::start(
                Box::new(wal),
                config.fsync,
                config.fsync_interval()?,
                config.compact_min_bytes,
            );
            (broker, Some(journal))
        }
    };
    Ok(server::Engine::Embedded { broker, journal })
}

/// What `--check-config` prints on success: the settings an operator most often
/// needs to confirm, not every key.
fn print_summary(config: &ServerConfig, ignored_env: &[String]) {
    println!("configuration OK");
    println!("  socket        {}", config.socket.display());
    println!("  admin_socket  {}", config.admin_socket().display());
    println!("  delivery      {:?}", config.delivery);
    match (config.backend, &config.data_dir) {
        (Backend::Redis, _) => println!(
            "  backend       redis {} prefix {}",
            config.redis_url, config.redis_prefix
        ),
        (_, Some(dir)) => println!(
            "  data_dir      {} (fsync {:?})",
            dir.display(),
            config.fsync
        ),
        (_, None) => println!("  data_dir      none: messages are kept in memory only"),
    }
    println!(
        "  channels      {} [[channels]] tables",
        config.channels.len()
    );
    println!(
        "  log           {:?} as {:?}",
        config.log, config.log_format
    );
    for name in ignored_env {
        println!("  ignored       {name} (not a configuration key)");
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

/// systemd's side of systemd/msgserver.service (Type=notify, WatchdogSec=). Outside
/// systemd NOTIFY_SOCKET is unset and every call does nothing.
mod service_manager {
    use tracing::warn;

    pub fn notify(state: &[sd_notify::NotifyState]) {
        // A failed notification is no reason to stop serving: at worst systemd times
        // the start out and restarts us, which is what it is for.
        if let Err(e) = sd_notify::notify(state) {
            warn!(error = %e, "notifying systemd failed");
        }
    }

    /// Pings at half the watchdog period, as sd_watchdog_enabled(3) advises. The
    /// task runs on the broker's one runtime thread, so a broker stuck in a loop
    /// stops the pings and systemd restarts the core.
    pub async fn watchdog(period: std::time::Duration) {
        let mut tick = tokio::time::interval(period / 2);
        loop {
            tick.tick().await;
            notify(&[sd_notify::NotifyState::Watchdog]);
        }
    }
}
