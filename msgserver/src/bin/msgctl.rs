//! `msgctl`, the operator's command line for a running msgserver.
//!
//! Talks to the core over its admin socket (root-only by default, separate from the
//! socket msghandler uses) in the admin role. Today it manages the
//! dead-letter queue: messages delivered `max_deliveries` times without an
//! acknowledgement, which an operator lists, gives back to their sessions, or
//! deletes.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use ipc::{
    ClientFrame, DeadLetterOp, FrameCodec, Hello, Request, Response, Role, ServerFrame, Welcome,
};
use tokio::net::UnixStream;
use tokio_util::codec::{FramedRead, FramedWrite};

#[derive(Debug, Parser)]
#[command(version, about = "Operate a running micromsg core")]
struct Cli {
    /// The core's admin socket (msgserver's `admin_socket`). Default: beside
    /// `--socket`, e.g. msgserver-admin.sock next to msgserver.sock.
    #[arg(long, value_name = "PATH", env = "MICROMSG_ADMIN_SOCKET")]
    admin_socket: Option<PathBuf>,
    /// The core's main socket, only to find the admin socket beside it (default:
    /// the same default path msgserver uses). msgctl never connects to it.
    #[arg(long, value_name = "PATH", env = "MICROMSG_SOCKET")]
    socket: Option<PathBuf>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The dead-letter queue.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLetters),
}

#[derive(Debug, Subcommand)]
enum DeadLetters {
    /// Show the oldest dead letters.
    List {
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Give dead letters back to their sessions' mailboxes.
    Replay(Selection),
    /// Delete dead letters for good.
    Purge(Selection),
}

#[derive(Debug, clap::Args)]
struct Selection {
    /// Message ids.
    ids: Vec<u64>,
    /// Every dead letter.
    #[arg(long, conflicts_with = "ids")]
    all: bool,
}

impl Selection {
    fn ids(self) -> anyhow::Result<Option<Vec<u64>>> {
        match (self.all, self.ids.is_empty()) {
            (true, _) => Ok(None),
            (false, false) => Ok(Some(self.ids)),
            (false, true) => bail!("name the message ids, or --all"),
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("starting the async runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("msgctl: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let socket = match (cli.admin_socket, cli.socket) {
        (Some(admin), _) => admin,
        (None, Some(main)) => ipc::paths::admin_socket_beside(&main),
        (None, None) => ipc::paths::default_admin_socket_path(),
    };
    let request = match cli.command {
        Command::DeadLetters(DeadLetters::List { limit }) => DeadLetterOp::List { limit },
        Command::DeadLetters(DeadLetters::Replay(s)) => DeadLetterOp::Replay { ids: s.ids()? },
        Command::DeadLetters(DeadLetters::Purge(s)) => DeadLetterOp::Purge { ids: s.ids()? },
    };
    let verb = match &request {
        DeadLetterOp::List { .. } => "listed",
        DeadLetterOp::Replay { .. } => "replayed",
        DeadLetterOp::Purge { .. } => "purged",
    };
    match call(&socket, Request::DeadLetters(request)).await? {
        Response::DeadLetters { letters, total } => {
            if cli.json {
                let letters: Vec<_> = letters
                    .iter()
                    .map(|l| {
                        serde_json::json!({
                            "id": l.id,
                            "session": l.session,
                            "deliveries": l.deliveries,
                            "body": serde_json::from_str::<serde_json::Value>(&l.body)
                                .unwrap_or_else(|_| l.body.clone().into()),
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({"total": total, "letters": letters})
                );
            } else {
                println!("{total} dead letter(s)");
                for l in letters {
                    println!(
                        "{}\t{}\t{} deliveries\t{}",
                        l.id, l.session, l.deliveries, l.body
                    );
                }
            }
        }
        Response::Count(count) => {
            if cli.json {
                println!("{}", serde_json::json!({ verb: count }));
            } else {
                println!("{verb} {count} dead letter(s)");
            }
        }
        Response::Error(e) => bail!("{}: {}", e.kind.name(), e.message),
        other => bail!("unexpected reply from the core: {other:?}"),
    }
    Ok(())
}

async fn call(socket: &std::path::Path, request: Request) -> anyhow::Result<Response> {
    let shown = socket.display();
    let stream = match UnixStream::connect(socket).await {
        Ok(stream) => stream,
        Err(e) => {
            return Err(match e.kind() {
                std::io::ErrorKind::NotFound => anyhow::anyhow!(
                    "no admin socket at {shown}: is msgserver running? (--admin-socket or \
                     MICROMSG_ADMIN_SOCKET set the path; --socket finds it beside the main socket)"
                ),
                std::io::ErrorKind::PermissionDenied => anyhow::anyhow!(
                    "permission denied on {shown}: msgctl must run as root or as a uid in \
                     admin_uids (or as the user who started msgserver)"
                ),
                std::io::ErrorKind::ConnectionRefused => anyhow::anyhow!(
                    "nothing answers on {shown}: msgserver is not running (the file is left \
                     from one that stopped)"
                ),
                _ => anyhow::Error::new(e).context(format!("connecting to {shown}")),
            });
        }
    };
    let (read_half, write_half) = stream.into_split();
    let mut reader = FramedRead::new(read_half, FrameCodec::<Welcome, Hello>::new());
    let mut writer = FramedWrite::new(write_half, FrameCodec::<Welcome, Hello>::new());
    let closed = || {
        format!(
            "msgserver closed the connection on {shown}: is this uid allowed on the admin \
             socket (root, the uid that started msgserver, admin_uids)?"
        )
    };
    // A core that closes at once (an older one refusing the peer) fails the write.
    writer
        .send(Hello::new(Role::Admin))
        .await
        .with_context(closed)?;
    let welcome = tokio::time::timeout(Duration::from_secs(5), reader.next())
        .await
        .context("no answer from msgserver within 5 s")?
        .with_context(closed)?
        .with_context(closed)?;
    if let Welcome::Refused { reason } = welcome {
        bail!("msgserver refused the connection: {reason}");
    }
    let mut reader = reader.map_decoder(|c| c.retype::<ServerFrame, ClientFrame>());
    let mut writer = writer.map_encoder(|c| c.retype::<ServerFrame, ClientFrame>());
    writer.send(ClientFrame { id: 1, request }).await?;
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(30), reader.next())
            .await
            .context("no answer from msgserver within 30 s")?
            .context("msgserver closed the connection before answering")??;
        if frame.id == 1 {
            return Ok(frame.response);
        }
    }
}
