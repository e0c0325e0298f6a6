//! `msgctl`, the operator's command line for a running msgserver.
//!
//! Talks to the core over its admin socket (root-only by default, separate from the
//! socket msghandler uses) in the admin role: the core's status, its sessions and
//! what waits for one (peek), deleting that (purge), ending a session (kick), the
//! dead-letter queue, and draining the core for maintenance. Every command prints
//! text, or with `--json` one JSON document on stdout; failures go to stderr with a
//! nonzero exit status.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use futures_util::{SinkExt, StreamExt};
use ipc::{
    AdminRequest, ClientFrame, CoreStatus, DeadLetterOp, FrameCodec, Hello, Request, Response,
    Role, ServerFrame, Welcome,
};
use serde_json::{Value, json};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
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
    /// Print one JSON document on stdout instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The core's version, uptime, counters, storage and whether it is draining.
    Status,
    /// Sessions, deepest queue first.
    Sessions {
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// What waits for a session (in flight first, then ready), changing nothing.
    Peek {
        session: String,
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
    /// Delete everything waiting for a session, ready and in flight, for good.
    Purge { session: String },
    /// End a session: its parked poll is answered Kicked, its messages and
    /// subscriptions go, and its requests are refused for kick_retention.
    Kick {
        session: String,
        #[arg(long, default_value = "kicked by the operator")]
        reason: String,
    },
    /// The dead-letter queue.
    #[command(subcommand, name = "dead-letters")]
    DeadLetters(DeadLetters),
    /// Stop taking new messages for maintenance; polls and acks go on, so that the
    /// queues empty. Lasts until `drain --cancel` or a restart.
    Drain {
        /// Then wait until nothing is queued or in flight, showing progress.
        #[arg(long, conflicts_with = "cancel")]
        wait: bool,
        /// With --wait: give up after this many seconds (exit status 2). Default:
        /// wait as long as it takes.
        #[arg(long, value_name = "SECONDS", requires = "wait")]
        timeout: Option<f64>,
        /// Resume taking new messages.
        #[arg(long)]
        cancel: bool,
    },
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

/// `drain --wait` ran out of time; its own exit status, so that a maintenance
/// script can tell "still busy" from "could not ask".
#[derive(Debug, thiserror::Error)]
#[error(
    "still {ready} ready and {in_flight} in flight after {waited:.1} s; the core keeps draining"
)]
struct DrainTimedOut {
    ready: u64,
    in_flight: u64,
    waited: f64,
}

/// How often `drain --wait` asks; well inside the core's heartbeat timeout.
const DRAIN_POLL: Duration = Duration::from_millis(250);
/// Longest body shown in text; `--json` shows it whole.
const BODY_SHOWN: usize = 80;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("starting the async runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("msgctl: {e:#}");
            if e.is::<DrainTimedOut>() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let socket = match (cli.admin_socket, cli.socket) {
        (Some(admin), _) => admin,
        (None, Some(main)) => ipc::paths::admin_socket_beside(&main),
        (None, None) => ipc::paths::default_admin_socket_path(),
    };
    let json = cli.json;
    // Arguments are checked before anything is asked of the core.
    if let Command::DeadLetters(op) = cli.command {
        let op = match op {
            DeadLetters::List { limit } => DeadLetterOp::List { limit },
            DeadLetters::Replay(s) => DeadLetterOp::Replay { ids: s.ids()? },
            DeadLetters::Purge(s) => DeadLetterOp::Purge { ids: s.ids()? },
        };
        let mut core = Admin::connect(&socket).await?;
        return dead_letters(&mut core, op, json).await;
    }
    let mut core = Admin::connect(&socket).await?;
    match cli.command {
        Command::Status => {
            let status = core.status().await?;
            if json {
                println!("{}", serde_json::to_string(&status)?);
            } else {
                print!("{}", status_text(&status));
            }
        }
        Command::Sessions { limit } => {
            let Response::Sessions { sessions, total } =
                core.ask(AdminRequest::Sessions { limit }).await?
            else {
                bail!("unexpected reply from the core");
            };
            if json {
                println!("{}", json!({"total": total, "sessions": sessions}));
            } else {
                let rows = sessions.iter().map(|s| {
                    vec![
                        s.session.clone(),
                        s.ready.to_string(),
                        s.in_flight.to_string(),
                        s.user.clone().unwrap_or_else(|| "-".into()),
                        format!("{} ago", duration(s.last_seen_ms)),
                        yes_no(s.parked_poll).into(),
                        yes_no(s.paused).into(),
                        s.subscriptions.to_string(),
                    ]
                });
                let header = [
                    "SESSION",
                    "READY",
                    "IN-FLIGHT",
                    "USER",
                    "LAST-SEEN",
                    "POLL",
                    "PAUSED",
                    "SUBS",
                ];
                print!("{}", table(&header, rows));
                println!("{} of {total} session(s)", sessions.len());
            }
        }
        Command::Peek { session, limit } => {
            let request = AdminRequest::Peek {
                session: session.clone(),
                limit,
            };
            let Response::Peeked { messages, total } = core.ask(request).await? else {
                bail!("unexpected reply from the core");
            };
            if json {
                let messages: Vec<Value> = messages
                    .iter()
                    .map(|m| {
                        json!({
                            "id": m.id,
                            "age_ms": m.age_ms,
                            "bytes": m.body.len(),
                            "in_flight": m.in_flight,
                            "deliveries": m.deliveries,
                            "body": body_value(&m.body),
                        })
                    })
                    .collect();
                let doc = json!({"session": session, "total": total, "messages": messages});
                println!("{doc}");
            } else {
                println!("{total} message(s) waiting for {session}");
                let rows = messages.iter().map(|m| {
                    vec![
                        m.id.to_string(),
                        duration(m.age_ms),
                        m.body.len().to_string(),
                        if m.in_flight { "in flight" } else { "ready" }.into(),
                        shortened(&m.body, BODY_SHOWN),
                    ]
                });
                print!("{}", table(&["ID", "AGE", "BYTES", "STATE", "BODY"], rows));
                if (messages.len() as u64) < total {
                    println!(
                        "(the first {} shown: --limit, or the size of one reply)",
                        messages.len()
                    );
                }
            }
        }
        Command::Purge { session } => {
            let request = AdminRequest::Purge {
                session: session.clone(),
            };
            let purged = count(core.ask(request).await?)?;
            if json {
                println!("{}", json!({"session": session, "purged": purged}));
            } else {
                println!("purged {purged} message(s) waiting for {session}");
            }
        }
        Command::Kick { session, reason } => {
            let request = AdminRequest::Kick {
                session: session.clone(),
                reason,
            };
            let dropped = count(core.ask(request).await?)?;
            if json {
                println!(
                    "{}",
                    json!({"session": session, "kicked": true, "dropped": dropped})
                );
            } else {
                println!(
                    "kicked {session}: {dropped} message(s) dropped; its requests are refused \
                     for kick_retention"
                );
            }
        }
        Command::Drain {
            wait,
            timeout,
            cancel,
        } => {
            let request = AdminRequest::Drain { draining: !cancel };
            done(core.ask(request).await?)?;
            if cancel {
                if json {
                    println!("{}", json!({"draining": false}));
                } else {
                    println!("resumed: the core takes new messages again");
                }
            } else if wait {
                drain_wait(&mut core, timeout.map(Duration::from_secs_f64), json).await?;
            } else if json {
                println!("{}", json!({"draining": true}));
            } else {
                println!(
                    "draining: new messages are refused, polls and acks go on \
                     (msgctl drain --wait waits for empty queues, --cancel resumes)"
                );
            }
        }
        Command::DeadLetters(_) => unreachable!("handled above"),
    }
    Ok(())
}

async fn dead_letters(core: &mut Admin, op: DeadLetterOp, json: bool) -> anyhow::Result<()> {
    let verb = match &op {
        DeadLetterOp::List { .. } => "listed",
        DeadLetterOp::Replay { .. } => "replayed",
        DeadLetterOp::Purge { .. } => "purged",
    };
    match core.call(Request::DeadLetters(op)).await? {
        Response::DeadLetters { letters, total } => {
            if json {
                let letters: Vec<_> = letters
                    .iter()
                    .map(|l| {
                        json!({
                            "id": l.id,
                            "session": l.session,
                            "deliveries": l.deliveries,
                            "body": body_value(&l.body),
                        })
                    })
                    .collect();
                println!("{}", json!({"total": total, "letters": letters}));
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
            if json {
                println!("{}", json!({ verb: count }));
            } else {
                println!("{verb} {count} dead letter(s)");
            }
        }
        other => unexpected(other)?,
    }
    Ok(())
}

/// Asks for the status until nothing is queued or in flight. Progress goes to
/// stdout in text, to stderr with `--json` (stdout holds one document).
async fn drain_wait(core: &mut Admin, timeout: Option<Duration>, json: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut shown = None;
    loop {
        let status = core.status().await?;
        let left = (status.ready, status.in_flight);
        if left == (0, 0) {
            let waited_ms = started.elapsed().as_millis() as u64;
            if json {
                println!(
                    "{}",
                    json!({"draining": true, "drained": true, "waited_ms": waited_ms})
                );
            } else {
                println!("drained: nothing queued or in flight; new messages stay refused");
            }
            return Ok(());
        }
        if shown != Some(left) {
            let line = format!("waiting: {} ready, {} in flight", left.0, left.1);
            if json {
                eprintln!("{line}");
            } else {
                println!("{line}");
            }
            shown = Some(left);
        }
        if let Some(timeout) = timeout
            && started.elapsed() >= timeout
        {
            if json {
                println!(
                    "{}",
                    json!({"draining": true, "drained": false, "ready": left.0, "in_flight": left.1})
                );
            }
            return Err(DrainTimedOut {
                ready: left.0,
                in_flight: left.1,
                waited: started.elapsed().as_secs_f64(),
            }
            .into());
        }
        tokio::time::sleep(DRAIN_POLL).await;
    }
}

fn status_text(s: &CoreStatus) -> String {
    let limit = match s.max_queued_bytes {
        0 => "no limit".to_owned(),
        max => format!("of {}", bytes(max)),
    };
    let storage = match &s.storage {
        None => "memory only".to_owned(),
        Some(st) => format!(
            "{}, log {} on disk, fsync {}",
            st.data_dir,
            bytes(st.log_bytes),
            st.fsync
        ),
    };
    let lines = [
        (
            "version",
            format!("{} (protocol {})", s.version, s.protocol),
        ),
        ("uptime", duration(s.uptime_ms)),
        ("draining", yes_no(s.draining).to_owned()),
        (
            "sessions",
            format!("{} present, {} mailboxes", s.sessions, s.mailboxes),
        ),
        (
            "queued",
            format!(
                "{} ready, {} in flight, {} ({limit})",
                s.ready,
                s.in_flight,
                bytes(s.queued_bytes)
            ),
        ),
        ("parked polls", s.parked_polls.to_string()),
        ("dead letters", s.dead_letters.to_string()),
        (
            "subscriptions",
            format!("{} on {} channel pattern(s)", s.subscriptions, s.channels),
        ),
        (
            "handlers",
            format!("{} connection(s)", s.handler_connections),
        ),
        ("storage", storage),
    ];
    lines
        .iter()
        .map(|(key, value)| format!("{key:<14} {value}\n"))
        .collect()
}

/// Left-aligned columns, two spaces apart.
fn table(header: &[&str], rows: impl Iterator<Item = Vec<String>>) -> String {
    let rows: Vec<Vec<String>> = std::iter::once(header.iter().map(|h| h.to_string()).collect())
        .chain(rows)
        .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    let mut text = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, width)| format!("{cell:<width$}"))
            .collect();
        text.push_str(cells.join("  ").trim_end());
        text.push('\n');
    }
    text
}

/// The body as JSON when it is JSON (it always is from msghandler), else as text.
fn body_value(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|_| body.into())
}

/// At most `max` characters of `text`, on one line.
fn shortened(text: &str, max: usize) -> String {
    let one_line: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() <= max {
        return one_line;
    }
    let mut cut: String = one_line.chars().take(max - 1).collect();
    cut.push('…');
    cut
}

fn duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{}.{}s", s, (ms % 1000) / 100),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86_400 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        _ => format!("{}d{:02}h", s / 86_400, (s % 86_400) / 3600),
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

fn count(response: Response) -> anyhow::Result<u64> {
    match response {
        Response::Count(n) => Ok(n),
        other => unexpected(other),
    }
}

fn done(response: Response) -> anyhow::Result<()> {
    match response {
        Response::Done => Ok(()),
        other => unexpected(other),
    }
}

fn unexpected<T>(response: Response) -> anyhow::Result<T> {
    match response {
        Response::Error(e) => bail!("{}: {}", e.kind.name(), e.message),
        other => bail!("unexpected reply from the core: {other:?}"),
    }
}

/// One admin connection; requests go one at a time.
struct Admin {
    reader: FramedRead<OwnedReadHalf, FrameCodec<ServerFrame, ClientFrame>>,
    writer: FramedWrite<OwnedWriteHalf, FrameCodec<ServerFrame, ClientFrame>>,
    next_id: u64,
}

impl Admin {
    async fn connect(socket: &Path) -> anyhow::Result<Admin> {
        let shown = socket.display();
        let stream = match UnixStream::connect(socket).await {
            Ok(stream) => stream,
            Err(e) => {
                return Err(match e.kind() {
                    std::io::ErrorKind::NotFound => anyhow::anyhow!(
                        "no admin socket at {shown}: is msgserver running? (--admin-socket or \
                         MICROMSG_ADMIN_SOCKET set the path; --socket finds it beside the main \
                         socket)"
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
        Ok(Admin {
            reader: reader.map_decoder(|c| c.retype::<ServerFrame, ClientFrame>()),
            writer: writer.map_encoder(|c| c.retype::<ServerFrame, ClientFrame>()),
            next_id: 1,
        })
    }

    async fn call(&mut self, request: Request) -> anyhow::Result<Response> {
        let id = self.next_id;
        self.next_id += 1;
        self.writer.send(ClientFrame { id, request }).await?;
        loop {
            let frame = tokio::time::timeout(Duration::from_secs(30), self.reader.next())
                .await
                .context("no answer from msgserver within 30 s")?
                .context("msgserver closed the connection before answering")??;
            if frame.id == id {
                return Ok(frame.response);
            }
            // Id 0 is the core's own word: it is stopping.
            if let Response::Error(e) = frame.response
                && frame.id == 0
            {
                bail!("{}: {}", e.kind.name(), e.message);
            }
        }
    }

    async fn ask(&mut self, request: AdminRequest) -> anyhow::Result<Response> {
        match self.call(Request::Admin(request)).await? {
            Response::Error(e) => bail!("{}: {}", e.kind.name(), e.message),
            response => Ok(response),
        }
    }

    async fn status(&mut self) -> anyhow::Result<CoreStatus> {
        match self.ask(AdminRequest::Status).await? {
            Response::Status(status) => Ok(*status),
            other => unexpected(other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_bodies_are_cut_on_a_character_boundary_to_one_line() {
        assert_eq!(shortened("{\"a\":\n1}", 80), "{\"a\": 1}");
        let long = "é".repeat(100);
        let cut = shortened(&long, 10);
        assert_eq!(cut.chars().count(), 10);
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn durations_and_sizes_read_at_a_glance() {
        assert_eq!(duration(1_250), "1.2s");
        assert_eq!(duration(125_000), "2m05s");
        assert_eq!(duration(3_725_000), "1h02m");
        assert_eq!(duration(90_000_000), "1d01h");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(268_435_456), "256.0 MiB");
    }

    #[test]
    fn columns_line_up_under_their_header() {
        let rows = [vec!["long-session".to_owned(), "3".to_owned()]].into_iter();
        assert_eq!(
            table(&["SESSION", "READY"], rows),
            "SESSION       READY\nlong-session  3\n"
        );
    }
}
