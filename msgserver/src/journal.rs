//! The journal thread: takes the broker's records, writes them to storage and
//! syncs them by the fsync policy, off the broker's thread so that the broker keeps
//! routing while the disk works.
//!
//! Group commit falls out of the shape: while one fsync runs, the broker goes on
//! handling requests and sends their records; the thread then writes everything
//! that queued up and covers it with a single fsync. The broker holds each burst's
//! replies until the thread reports that burst done (see `server.rs`).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};
use tracing::{error, info};

use crate::config::FsyncPolicy;
use crate::storage::{Record, Storage};

/// Identifies a burst of records; bursts are numbered from 1 in the order sent.
pub type Seq = u64;

enum Command {
    Append {
        records: Vec<Record>,
        seq: Seq,
    },
    Compact {
        snapshot: Vec<Record>,
    },
    /// A clean stop: fsync now whatever the policy, close the storage, then answer.
    Close {
        done: oneshot::Sender<()>,
    },
}

/// The broker task's handle on the journal thread.
pub struct Journal {
    commands: mpsc::Sender<Command>,
    sent: Seq,
    /// The highest burst written as the policy requires (fsynced under `always`).
    pub done: watch::Receiver<Seq>,
    disk_bytes: Arc<AtomicU64>,
    compact_min_bytes: u64,
    fsyncs: Arc<FsyncTimes>,
}

/// Upper bounds of the fsync latency buckets, in microseconds: from what an NVMe
/// drive's cache flush takes to what a loaded spinning disk does.
const FSYNC_BOUNDS_US: [u64; 12] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

/// How long fsyncs took, written by the journal thread and read by the broker task
/// at a scrape. Atomics because two threads share it; the journal thread is the
/// only writer, once per fsync, so they are never contended.
#[derive(Default)]
struct FsyncTimes {
    counts: [AtomicU64; FSYNC_BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl FsyncTimes {
    fn observe(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let bucket = FSYNC_BOUNDS_US.partition_point(|bound| *bound < us);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    fn histogram(&self) -> ipc::Histogram {
        ipc::Histogram {
            bounds_us: FSYNC_BOUNDS_US.to_vec(),
            counts: self
                .counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }
}

impl Journal {
    pub fn start(
        mut storage: Box<dyn Storage>,
        policy: FsyncPolicy,
        interval: Duration,
        compact_min_bytes: u64,
    ) -> Journal {
        let (commands, inbox) = mpsc::channel::<Command>();
        let (done_tx, done) = watch::channel(0);
        let disk_bytes = Arc::new(AtomicU64::new(storage.disk_bytes()));
        let disk = disk_bytes.clone();
        let fsyncs = Arc::new(FsyncTimes::default());
        let timed = fsyncs.clone();
        std::thread::Builder::new()
            .name("journal".into())
            .spawn(move || {
                let shared = Shared {
                    disk_bytes: &disk,
                    fsyncs: &timed,
                };
                match run(&mut *storage, policy, interval, &inbox, &done_tx, shared) {
                    Ok(closing) => {
                        // Dropped before the answer, so that the process does not
                        // exit while the backend is still tidying up its files.
                        drop(storage);
                        if let Some(done) = closing {
                            let _ = done.send(());
                        }
                    }
                    Err(e) => {
                        // Fail-stop: replies that waited for this write were never
                        // sent, so nothing a client was told is stored is lost; a
                        // restart recovers from what did reach the disk.
                        error!(error = %e, "storage failed; stopping the core");
                        std::process::exit(1);
                    }
                }
            })
            .expect("spawning the journal thread");
        Journal {
            commands,
            sent: 0,
            done,
            disk_bytes,
            compact_min_bytes,
            fsyncs,
        }
    }

    /// The log's size and the fsync latencies so far, for a metrics scrape.
    pub fn metrics(&self) -> ipc::StorageMetrics {
        ipc::StorageMetrics {
            journal_bytes: self.disk_bytes.load(Ordering::Relaxed),
            fsync: self.fsyncs.histogram(),
        }
    }

    /// Sends one burst, if it has records; returns the sequence number of the last
    /// burst sent, which replies produced so far must wait for.
    pub fn append(&mut self, records: Vec<Record>) -> Seq {
        if !records.is_empty() {
            self.sent += 1;
            let _ = self.commands.send(Command::Append {
                records,
                seq: self.sent,
            });
        }
        self.sent
    }

    /// The log's size on disk as of the last write.
    pub fn disk_bytes(&self) -> u64 {
        self.disk_bytes.load(Ordering::Relaxed)
    }

    /// Whether the log is big enough that a compaction may pay; only then is it
    /// worth asking the broker how much is still pending.
    pub fn compaction_worth_checking(&self) -> bool {
        self.disk_bytes.load(Ordering::Relaxed) >= self.compact_min_bytes
    }

    /// Whether the log holds more than twice what a snapshot of the `pending` bytes
    /// would take, so that rewriting it pays.
    pub fn compaction_due(&self, pending: u64) -> bool {
        self.disk_bytes.load(Ordering::Relaxed) > 2 * pending
    }

    pub fn compact(&mut self, snapshot: Vec<Record>) {
        // Stops a second trigger before this one has run.
        self.disk_bytes.store(0, Ordering::Relaxed);
        let _ = self.commands.send(Command::Compact { snapshot });
    }

    /// Fsyncs everything sent so far, whatever the policy, and closes the storage;
    /// nothing sent after this is written.
    pub async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self.commands.send(Command::Close { done }).is_ok() {
            let _ = closed.await;
        }
    }
}

/// What the journal thread reports to the broker task besides `done`.
struct Shared<'a> {
    disk_bytes: &'a AtomicU64,
    fsyncs: &'a FsyncTimes,
}

/// Serves the broker's commands until it is gone or asks to close; returns who
/// waits for the close, if anyone.
fn run(
    storage: &mut dyn Storage,
    policy: FsyncPolicy,
    interval: Duration,
    inbox: &mpsc::Receiver<Command>,
    done: &watch::Sender<Seq>,
    shared: Shared<'_>,
) -> std::io::Result<Option<oneshot::Sender<()>>> {
    let mut last_sync = Instant::now();
    let mut unsynced = false;
    loop {
        let first = match policy {
            FsyncPolicy::Interval if unsynced => {
                let wait = interval.saturating_sub(last_sync.elapsed());
                match inbox.recv_timeout(wait) {
                    Ok(command) => Some(command),
                    Err(mpsc::RecvTimeoutError::Timeout) => None,
                    Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            _ => match inbox.recv() {
                Ok(command) => Some(command),
                Err(_) => break,
            },
        };
        let mut highest = None;
        let mut closing = None;
        // Everything queued behind the first command joins this group.
        for command in first
            .into_iter()
            .chain(std::iter::from_fn(|| inbox.try_recv().ok()))
        {
            match command {
                Command::Append { records, seq } => {
                    storage.append(&records)?;
                    highest = Some(seq);
                    unsynced = true;
                }
                Command::Compact { snapshot } => {
                    let before = storage.disk_bytes();
                    storage.compact(&snapshot)?;
                    let after = storage.disk_bytes();
                    info!(before, after, records = snapshot.len(), "log compacted");
                }
                Command::Close { done } => closing = Some(done),
            }
        }
        let sync_now = match policy {
            FsyncPolicy::Always => unsynced,
            FsyncPolicy::Interval => unsynced && last_sync.elapsed() >= interval,
            FsyncPolicy::Never => false,
        } || (closing.is_some() && unsynced);
        if sync_now {
            let started = Instant::now();
            storage.sync()?;
            last_sync = Instant::now();
            shared.fsyncs.observe(last_sync - started);
            unsynced = false;
        }
        shared
            .disk_bytes
            .store(storage.disk_bytes(), Ordering::Relaxed);
        if let Some(seq) = highest {
            done.send_replace(seq);
        }
        if closing.is_some() {
            return Ok(closing);
        }
    }
    if unsynced {
        storage.sync()?;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_fsync_lands_in_the_first_bucket_whose_bound_it_does_not_exceed() {
        let times = FsyncTimes::default();
        times.observe(Duration::from_micros(100));
        times.observe(Duration::from_micros(101));
        times.observe(Duration::from_secs(5));
        let h = times.histogram();
        assert_eq!(h.counts.len(), h.bounds_us.len() + 1);
        assert_eq!((h.counts[0], h.counts[1]), (1, 1));
        assert_eq!(*h.counts.last().unwrap(), 1);
        assert_eq!(h.count(), 3);
        assert_eq!(h.sum_us, 5_000_201);
        let buckets = h.buckets_seconds();
        assert_eq!(buckets[0], (0.0001, 1));
        assert_eq!(*buckets.last().unwrap(), (f64::INFINITY, 1));
    }
}
