//! storebench — the queue workload against candidate storage engines, so that the
//! core's engine is chosen by measurement: our append-only log
//! (`msgserver::storage::wal::Wal`) against redb, a maintained embedded B-tree store.
//!
//! The workload is a queue's: publish N messages in batches of B, one commit per
//! batch (what the journal's group commit does), then acknowledge (delete) them all
//! in batches of B, again one commit per batch. Each engine runs it with an fsync per
//! commit and without. Reported: publishes and acks per second, disk bytes per
//! message once everything is published, and the disk left once everything is
//! acknowledged, before and after each engine's own compaction.
//!
//! Not a measure of the whole server: no sockets, no broker, one thread.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use msgserver::storage::wal::Wal;
use msgserver::storage::{Record, Storage, StoredMessage};
use redb::{Database, Durability, ReadableTableMetadata, TableDefinition};

/// Compares the queue workload on the append-only log and on redb.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Messages published, then acknowledged.
    #[arg(long, default_value_t = 200_000)]
    messages: u64,
    /// Messages per commit, for publishes and acks alike.
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Bytes in each message body.
    #[arg(long, default_value_t = 100)]
    body_bytes: usize,
    /// Where the engines write (a fresh subdirectory per run, removed afterwards).
    /// Default: a temporary directory. The disk under it is what is measured.
    #[arg(long)]
    dir: Option<PathBuf>,
}

/// redb keeps the whole message under its id, as the log's `Put` does.
const MESSAGES: TableDefinition<u64, &[u8]> = TableDefinition::new("messages");

/// What one engine does with one batch; the driver times the calls.
trait Engine {
    fn publish(&mut self, batch: &[StoredMessage]) -> Result<()>;
    fn ack(&mut self, ids: &[u64]) -> Result<()>;
    /// Gives back the disk that deleted messages held, by the engine's own means.
    fn compact(&mut self) -> Result<()>;
}

struct WalEngine {
    wal: Wal,
    fsync: bool,
}

impl Engine for WalEngine {
    fn publish(&mut self, batch: &[StoredMessage]) -> Result<()> {
        // The broker hands the journal owned records; building them is the broker's
        // cost in the server too, so it stays inside the timing here.
        let records: Vec<Record> = batch.iter().cloned().map(Record::Put).collect();
        self.wal.append(&records)?;
        if self.fsync {
            self.wal.sync()?;
        }
        Ok(())
    }

    fn ack(&mut self, ids: &[u64]) -> Result<()> {
        self.wal.append(&[Record::Removed { ids: ids.to_vec() }])?;
        if self.fsync {
            self.wal.sync()?;
        }
        Ok(())
    }

    fn compact(&mut self) -> Result<()> {
        // Nothing is pending any more: the snapshot is empty.
        Ok(self.wal.compact(&[])?)
    }
}

struct RedbEngine {
    db: Database,
    durability: Durability,
    /// Encode buffer for values, reused across messages.
    value: Vec<u8>,
}

impl Engine for RedbEngine {
    fn publish(&mut self, batch: &[StoredMessage]) -> Result<()> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(self.durability);
        {
            let mut table = txn.open_table(MESSAGES)?;
            for message in batch {
                // The same encoding as the log's payload, so both pay for it.
                self.value.clear();
                bincode::serde::encode_into_std_write(
                    message,
                    &mut self.value,
                    bincode::config::standard(),
                )?;
                table.insert(message.id, self.value.as_slice())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn ack(&mut self, ids: &[u64]) -> Result<()> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(self.durability);
        {
            let mut table = txn.open_table(MESSAGES)?;
            for id in ids {
                table.remove(id)?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn compact(&mut self) -> Result<()> {
        // Compaction needs a durable commit behind it; with `Durability::None` there
        // may be none yet.
        let mut txn = self.db.begin_write()?;
        txn.set_durability(Durability::Immediate);
        txn.commit()?;
        self.db.compact()?;
        Ok(())
    }
}

impl RedbEngine {
    fn count(&self) -> Result<u64> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(MESSAGES)?.len()?)
    }
}

struct Outcome {
    engine: &'static str,
    fsync: bool,
    publish: Duration,
    ack: Duration,
    bytes_published: u64,
    bytes_acked: u64,
    bytes_compacted: u64,
}

/// Apparent size of every file under `dir`: what the engine occupies.
fn dir_bytes(dir: &Path) -> io::Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let meta = entry?.metadata()?;
        total += if meta.is_dir() { 0 } else { meta.len() };
    }
    Ok(total)
}

fn run(
    name: &'static str,
    fsync: bool,
    dir: &Path,
    engine: &mut dyn Engine,
    messages: &[StoredMessage],
    batch: usize,
) -> Result<Outcome> {
    let started = Instant::now();
    for chunk in messages.chunks(batch) {
        engine.publish(chunk)?;
    }
    let publish = started.elapsed();
    let bytes_published = dir_bytes(dir)?;

    let ids: Vec<u64> = messages.iter().map(|m| m.id).collect();
    let started = Instant::now();
    for chunk in ids.chunks(batch) {
        engine.ack(chunk)?;
    }
    let ack = started.elapsed();
    let bytes_acked = dir_bytes(dir)?;

    engine.compact()?;
    let bytes_compacted = dir_bytes(dir)?;
    Ok(Outcome {
        engine: name,
        fsync,
        publish,
        ack,
        bytes_published,
        bytes_acked,
        bytes_compacted,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.batch > 0, "--batch must be at least 1");
    let scratch;
    let root = match &args.dir {
        Some(dir) => {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            dir.clone()
        }
        None => {
            scratch = tempfile::tempdir()?;
            scratch.path().to_path_buf()
        }
    };

    let body = "x".repeat(args.body_bytes);
    let messages: Vec<StoredMessage> = (1..=args.messages)
        .map(|id| StoredMessage {
            id,
            session: format!("session-{}", id % 1000),
            body: body.clone(),
            expires_ms: None,
            key: None,
        })
        .collect();

    println!(
        "storebench: {} messages of {} body bytes, {} per commit, in {}",
        args.messages,
        args.body_bytes,
        args.batch,
        root.display()
    );
    let mut outcomes = Vec::new();
    for fsync in [true, false] {
        let dir = root.join(format!("wal-fsync-{fsync}"));
        let (wal, _) = Wal::open(&dir)?;
        let mut engine = WalEngine { wal, fsync };
        outcomes.push(run("wal", fsync, &dir, &mut engine, &messages, args.batch)?);
        drop(engine);
        fs::remove_dir_all(&dir)?;

        let dir = root.join(format!("redb-fsync-{fsync}"));
        fs::create_dir_all(&dir)?;
        let db = Database::create(dir.join("queue.redb"))?;
        let mut engine = RedbEngine {
            db,
            // redb on Linux fsyncs on every durable commit (`Eventual` included), so
            // `None`, which defers the commit to a later durable one, is its only
            // mode without an fsync per commit.
            durability: if fsync {
                Durability::Immediate
            } else {
                Durability::None
            },
            value: Vec::new(),
        };
        outcomes.push(run(
            "redb",
            fsync,
            &dir,
            &mut engine,
            &messages,
            args.batch,
        )?);
        anyhow::ensure!(engine.count()? == 0, "redb still holds messages");
        drop(engine);
        fs::remove_dir_all(&dir)?;
    }

    let n = args.messages.max(1) as f64;
    println!();
    println!(
        "| engine | fsync per commit | publishes/s | acks/s | disk bytes/msg after publishes | disk bytes after acks | after compaction |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    for o in &outcomes {
        println!(
            "| {} | {} | {:.0} | {:.0} | {:.1} | {} | {} |",
            o.engine,
            if o.fsync { "yes" } else { "no" },
            n / o.publish.as_secs_f64(),
            n / o.ack.as_secs_f64(),
            o.bytes_published as f64 / n,
            o.bytes_acked,
            o.bytes_compacted,
        );
    }
    Ok(())
}
