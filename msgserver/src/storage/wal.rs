//! The append-only log backend: segment files of CRC-checked records.
//!
//! The data directory holds segment files named `wal-<generation>.log`, the
//! generation zero-padded to 20 digits so that names sort like numbers. Exactly one
//! segment is live: the highest generation. A segment is an 8-byte magic header, a
//! snapshot of the whole state at the time the segment was made, then the records
//! appended since. Each record is framed as
//!
//! ```text
//! u32 LE payload length | u32 LE CRC-32C of the payload | payload (bincode of Record)
//! ```
//!
//! A zero length field ends the records: a payload is never empty, and the live
//! segment is preallocated ahead of its last record (see [`PREALLOCATE_BYTES`]), so
//! what follows the last record is normally zeros.
//!
//! Compaction writes the next generation under a `.tmp` name, syncs it, renames it
//! into place and syncs the directory; only then is the old segment deleted. So the
//! highest generation on disk is always a complete snapshot, and a crash can only
//! tear the records appended after it. On open a torn or corrupt tail, and the
//! preallocated zeros, are cut off at the last whole record, which is as far as a
//! crash can have written durably.
//!
//! What this is not: an index. Nothing is read back except at start; the broker
//! keeps the live state in memory and the log only has to replay to it.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{Flock, FlockArg};
use tracing::{info, warn};

use super::{Record, Recovered, Storage};

/// First bytes of every segment. The trailing digit is the format version, so a
/// future format is refused by this code instead of being misread as a torn tail.
const MAGIC: &[u8; 8] = b"uMSGwal1";

/// Length prefix and CRC in front of every payload.
const FRAME_HEADER_BYTES: usize = 8;

/// The largest payload accepted. Far above any real record (a message body is
/// limited well below this), so a bigger length field can only be a corrupt one,
/// and recovery need not trust it with an allocation.
pub const MAX_RECORD_BYTES: usize = 64 << 20;

/// While writing a snapshot, the encode buffer is written out whenever it grows past
/// this, so compacting a large state does not hold a second copy of it in memory.
const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// The live segment is extended with zeros by this much at a time, ahead of the
/// records written into it. An fdatasync after an append that grows the file must
/// also write the inode (new size, new blocks); one that overwrites blocks already
/// written need not. Zeros rather than `fallocate`, because ext4 keeps fallocated
/// space as unwritten extents, and the first write into each changes the inode
/// again. Under scenario 6's load an fsync took 440-630 µs with fallocate and
/// 300-380 µs with zeros. Big enough that the extension is rare (some 40,000
/// messages), small enough not to matter on disk.
pub const PREALLOCATE_BYTES: u64 = 8 << 20;

/// What the preallocation writes, a piece at a time.
static ZEROS: [u8; 1 << 16] = [0; 1 << 16];

/// After a call that needed a bigger buffer (one huge record, a snapshot chunk), the
/// buffer is given back rather than kept for the life of the process.
const KEEP_BUFFER_BYTES: usize = 4 << 20;

/// Why the log refused to do something. Carried inside the [`io::Error`]s that the
/// [`Storage`] interface returns, so callers can match on it with
/// `err.get_ref().and_then(|e| e.downcast_ref::<WalError>())`.
#[derive(Debug, thiserror::Error)]
pub enum WalError {
    /// The live segment does not start with our magic: someone else's file, a future
    /// format, or a damaged header. Refused rather than treated as a torn tail,
    /// because "repairing" it would silently drop every message in it.
    #[error("{}: not a micromsg log segment (bad or missing magic header); refusing to open it", path.display())]
    BadMagic { path: PathBuf },
    /// Another process (or another `Wal` in this one) has the directory open. Two
    /// writers would interleave their records and each truncate the other's.
    #[error("{}: the log is in use by another process", dir.display())]
    Locked { dir: PathBuf },
    /// A record whose encoding exceeds [`MAX_RECORD_BYTES`]. Refused at append,
    /// because recovery would take it for corruption and drop it and all after it.
    #[error("a record of {bytes} bytes exceeds the log's {MAX_RECORD_BYTES}-byte limit")]
    RecordTooLarge { bytes: usize },
    #[error("encoding a log record: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    /// An earlier write could not be undone, or a sync failed. What is on disk is then
    /// unknown (after a failed fsync Linux may already have dropped the dirty pages),
    /// so the log stops accepting records rather than acknowledge ones it may lose.
    #[error("an earlier write or sync of the log failed; restart to recover from what is on disk")]
    Failed,
}

impl From<WalError> for io::Error {
    fn from(error: WalError) -> Self {
        let kind = match error {
            WalError::BadMagic { .. } => io::ErrorKind::InvalidData,
            WalError::Locked { .. } => io::ErrorKind::WouldBlock,
            WalError::RecordTooLarge { .. } | WalError::Encode(_) => io::ErrorKind::InvalidInput,
            WalError::Failed => io::ErrorKind::Other,
        };
        io::Error::new(kind, error)
    }
}

/// The one encoding for payloads. The limit only bounds decoding: a corrupt length
/// inside a payload must not make bincode allocate gigabytes.
fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_RECORD_BYTES>()
}

/// Appends one framed record (length, CRC, payload) to `out`. On error `out` is left
/// as it was.
pub fn encode_record(record: &Record, out: &mut Vec<u8>) -> Result<(), WalError> {
    let start = out.len();
    out.extend_from_slice(&[0; FRAME_HEADER_BYTES]);
    if let Err(error) = bincode::serde::encode_into_std_write(record, out, bincode_config()) {
        out.truncate(start);
        return Err(error.into());
    }
    let payload = &out[start + FRAME_HEADER_BYTES..];
    if payload.len() > MAX_RECORD_BYTES {
        let bytes = payload.len();
        out.truncate(start);
        return Err(WalError::RecordTooLarge { bytes });
    }
    let crc = crc32c::crc32c(payload);
    // Fits: checked against MAX_RECORD_BYTES just above.
    let len = payload.len() as u32;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// The log: one live segment file, appended to by the journal task.
pub struct Wal {
    /// The data directory, where segment names are made.
    dir: PathBuf,
    /// The data directory, open. Held under an exclusive flock for the life of the
    /// log (see [`WalError::Locked`]), and synced after every rename, so that a new
    /// segment's name is as durable as its contents before the old segment goes.
    dir_handle: Flock<File>,
    /// Generation of the live segment; compaction writes `generation + 1`.
    generation: u64,
    /// The live segment. Each `append` is one positioned write on it, from `buf`, at
    /// `len`.
    file: File,
    /// The end of the last whole record written to the live segment, synced or not.
    /// Kept here so `disk_bytes` costs nothing and a failed write can be cut back to
    /// it.
    len: u64,
    /// Size of the live segment file: `len` and the preallocated zeros after it.
    allocated: u64,
    /// Encode buffer, reused so that an append does not allocate.
    buf: Vec<u8>,
    /// Set once the file is in a state we cannot vouch for; see [`WalError::Failed`].
    failed: bool,
}

impl Wal {
    /// Opens the log in `dir` (created if missing) and replays it.
    ///
    /// A torn or corrupt tail of the live segment is truncated at the last whole
    /// record, with a warning; so are the preallocated zeros, without one. A live
    /// segment without our magic header is an error. Older segments and leftover
    /// `.tmp` files from an interrupted compaction are deleted once the live segment
    /// has been read.
    pub fn open(dir: &Path) -> io::Result<(Wal, Recovered)> {
        DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        let dir_handle = lock_dir(dir)?;
        let listing = Listing::scan(dir)?;
        let mut recovered = Recovered::default();
        let mut buf = Vec::new();

        let (generation, file, len) = match listing.segments.last() {
            Some(&generation) => {
                let path = segment_path(dir, generation);
                let file = OpenOptions::new().read(true).write(true).open(&path)?;
                let len = replay(&path, &file, &mut recovered)?;
                (generation, file, len)
            }
            None => {
                let generation = 1;
                let (file, len) = write_tmp_segment(dir, generation, &[], &mut buf)?;
                fs::rename(tmp_path(dir, generation), segment_path(dir, generation))?;
                dir_handle.sync_all()?;
                info!(dir = %dir.display(), "started a new log");
                (generation, file, len)
            }
        };

        // Only now, with the live segment read, drop what it supersedes: were it
        // unreadable, an operator would want everything left as it was.
        for &old in listing.segments.iter().filter(|&&g| g != generation) {
            remove_if_present(&segment_path(dir, old))?;
        }
        for tmp in &listing.tmps {
            remove_if_present(tmp)?;
        }

        let wal = Wal {
            dir: dir.to_path_buf(),
            dir_handle,
            generation,
            file,
            len,
            allocated: len,
            buf,
            failed: false,
        };
        Ok((wal, recovered))
    }

    fn check_usable(&self) -> io::Result<()> {
        if self.failed {
            return Err(WalError::Failed.into());
        }
        Ok(())
    }

    /// Cuts the file back to the last whole record after a failed write. A partial
    /// frame left in the middle would make recovery stop there and drop everything
    /// appended after it; if even the cut fails, the log refuses further writes.
    fn undo_partial_write(&mut self) {
        match self.file.set_len(self.len) {
            Ok(()) => self.allocated = self.len,
            Err(_) => self.failed = true,
        }
    }

    /// Makes the live segment at least `end` long, with zeros, in whole chunks of
    /// [`PREALLOCATE_BYTES`]. A failure is not an error: the write that follows
    /// grows the file itself, and reports a full disk if that is the cause. Zeros
    /// written so far stay; they read as the end of the records.
    fn preallocate(&mut self, end: u64) {
        if end <= self.allocated {
            return;
        }
        let target = end.div_ceil(PREALLOCATE_BYTES) * PREALLOCATE_BYTES;
        while self.allocated < target {
            let piece = (target - self.allocated).min(ZEROS.len() as u64) as usize;
            if self
                .file
                .write_all_at(&ZEROS[..piece], self.allocated)
                .is_err()
            {
                return;
            }
            self.allocated += piece as u64;
        }
    }

    /// Drops the log as a crash would: the preallocated zeros stay in the file.
    #[cfg(test)]
    fn crash(mut self) {
        self.allocated = self.len;
    }

    fn trim_buffer(&mut self) {
        self.buf.clear();
        if self.buf.capacity() > KEEP_BUFFER_BYTES {
            self.buf = Vec::new();
        }
    }
}

impl Storage for Wal {
    fn append(&mut self, records: &[Record]) -> io::Result<()> {
        self.check_usable()?;
        self.buf.clear();
        for record in records {
            // Nothing is written yet, so an unencodable record fails the whole call
            // cleanly.
            encode_record(record, &mut self.buf)?;
        }
        self.preallocate(self.len + self.buf.len() as u64);
        let result = self.file.write_all_at(&self.buf, self.len);
        match result {
            Ok(()) => {
                self.len += self.buf.len() as u64;
                self.allocated = self.allocated.max(self.len);
            }
            Err(_) => self.undo_partial_write(),
        }
        self.trim_buffer();
        result
    }

    fn sync(&mut self) -> io::Result<()> {
        self.check_usable()?;
        // Appends go straight to the file (no userspace buffer to flush), so this is
        // only the fdatasync.
        self.file.sync_data().inspect_err(|_| self.failed = true)
    }

    fn compact(&mut self, snapshot: &[Record]) -> io::Result<()> {
        self.check_usable()?;
        let next = self.generation + 1;
        let tmp = tmp_path(&self.dir, next);
        let written = write_tmp_segment(&self.dir, next, snapshot, &mut self.buf);
        self.trim_buffer();
        let (file, len) = written?;
        if let Err(error) = fs::rename(&tmp, segment_path(&self.dir, next)) {
            let _ = fs::remove_file(&tmp);
            return Err(error);
        }

        // The new segment is now the highest generation, so it is what the next open
        // replays: nothing may be appended to the old one from here on.
        let old = segment_path(&self.dir, self.generation);
        self.file = file;
        self.len = len;
        self.allocated = len;
        self.generation = next;
        if let Err(error) = self.dir_handle.sync_all() {
            // The rename may not be durable: after a crash the old segment could come
            // back as the live one, without whatever we append to the new one.
            self.failed = true;
            return Err(error);
        }
        if let Err(error) = fs::remove_file(&old) {
            // Harmless: the next open deletes every segment below the live one.
            warn!(segment = %old.display(), %error, "could not delete the compacted log segment");
        }
        Ok(())
    }

    fn disk_bytes(&self) -> u64 {
        self.len
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        // A clean close leaves the file as long as its records, for anyone who looks
        // at it; after a crash the next open cuts the zeros instead.
        if self.allocated > self.len {
            let _ = self.file.set_len(self.len);
        }
    }
}

fn segment_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("wal-{generation:020}.log"))
}

fn tmp_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("wal-{generation:020}.log.tmp"))
}

/// The log's files found in the data directory. Files with other names are left
/// alone: they are not ours to delete.
struct Listing {
    /// Generations of complete segments, ascending.
    segments: Vec<u64>,
    /// Segments an interrupted compaction was writing.
    tmps: Vec<PathBuf>,
}

impl Listing {
    fn scan(dir: &Path) -> io::Result<Listing> {
        let mut listing = Listing {
            segments: Vec::new(),
            tmps: Vec::new(),
        };
        for entry in fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(generation) = name.strip_suffix(".log").and_then(parse_generation) {
                listing.segments.push(generation);
            } else if name
                .strip_suffix(".log.tmp")
                .and_then(parse_generation)
                .is_some()
            {
                listing.tmps.push(entry.path());
            }
        }
        listing.segments.sort_unstable();
        Ok(listing)
    }
}

/// `wal-00000000000000000042` → 42.
fn parse_generation(stem: &str) -> Option<u64> {
    let digits = stem.strip_prefix("wal-")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Writes `snapshot` as the segment of `generation` under its `.tmp` name and syncs
/// it. Returns the file and its length; on error the tmp file is removed.
fn write_tmp_segment(
    dir: &Path,
    generation: u64,
    snapshot: &[Record],
    buf: &mut Vec<u8>,
) -> io::Result<(File, u64)> {
    let tmp = tmp_path(dir, generation);
    let written = (|| {
        // Messages are users' data: readable by this user only.
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        buf.clear();
        buf.extend_from_slice(MAGIC);
        let mut len = 0u64;
        for record in snapshot {
            encode_record(record, buf)?;
            if buf.len() >= SNAPSHOT_CHUNK_BYTES {
                file.write_all(buf)?;
                len += buf.len() as u64;
                buf.clear();
            }
        }
        file.write_all(buf)?;
        len += buf.len() as u64;
        buf.clear();
        file.sync_data()?;
        Ok((file, len))
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// Opens `dir` and takes the exclusive lock on it, without waiting.
fn lock_dir(dir: &Path) -> io::Result<Flock<File>> {
    let handle = File::open(dir)?;
    Flock::lock(handle, FlockArg::LockExclusiveNonblock).map_err(|(_, errno)| {
        if errno == Errno::EWOULDBLOCK {
            WalError::Locked {
                dir: dir.to_path_buf(),
            }
            .into()
        } else {
            io::Error::from(errno)
        }
    })
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => Err(error),
        _ => Ok(()),
    }
}

/// Replays the segment at `path` into `state` and returns the end of its last whole
/// record, having truncated the file there if anything followed it: damage, which
/// is warned about, or the preallocated zeros, which are not.
fn replay(path: &Path, file: &File, state: &mut Recovered) -> io::Result<u64> {
    let file_len = file.metadata()?.len();
    let mut reader = BufReader::with_capacity(1 << 16, file);

    let mut magic = [0u8; MAGIC.len()];
    if read_up_to(&mut reader, &mut magic)? < MAGIC.len() || &magic != MAGIC {
        return Err(WalError::BadMagic {
            path: path.to_path_buf(),
        }
        .into());
    }

    let mut end = MAGIC.len() as u64;
    let mut records = 0u64;
    let mut payload = Vec::new();
    let damage = loop {
        if end == file_len {
            break None;
        }
        let mut header = [0u8; FRAME_HEADER_BYTES];
        if read_up_to(&mut reader, &mut header)? < FRAME_HEADER_BYTES {
            break Some("short record header");
        }
        let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
        if len == 0 && crc == 0 {
            // The preallocated zeros. Whatever may lie beyond them was never synced
            // (fdatasync makes everything before it durable), so it goes as well.
            break None;
        }
        if len > MAX_RECORD_BYTES {
            break Some("record length beyond the limit");
        }
        // Checked before reading, so a corrupt length never sizes an allocation.
        if end + (FRAME_HEADER_BYTES + len) as u64 > file_len {
            break Some("short record payload");
        }
        payload.clear();
        (&mut reader).take(len as u64).read_to_end(&mut payload)?;
        if payload.len() < len {
            break Some("short record payload");
        }
        if crc32c::crc32c(&payload) != crc {
            break Some("checksum mismatch");
        }
        match bincode::serde::decode_from_slice::<Record, _>(&payload, bincode_config()) {
            Ok((record, used)) if used == len => state.apply(record),
            _ => break Some("undecodable record"),
        }
        end += (FRAME_HEADER_BYTES + len) as u64;
        records += 1;
    };

    if let Some(reason) = damage {
        warn!(
            segment = %path.display(),
            offset = end,
            dropped_bytes = file_len - end,
            reason,
            "the log ends in a torn or corrupt record; truncating it to the last whole record"
        );
    }
    if end < file_len {
        // Also when only zeros follow: an append must never land in front of
        // leftovers that a later replay could take for records.
        file.set_len(end)?;
        file.sync_all()?;
    }
    info!(segment = %path.display(), records, bytes = end, "replayed the log");
    Ok(end)
}

/// Fills `buf` as far as the reader goes; returns how much was read. Unlike
/// `read_exact`, tells a clean end (0) from a torn one (short).
fn read_up_to(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) => return Err(error),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use ipc::MessageId;
    use proptest::prelude::*;
    use proptest::sample::Index;

    use super::*;
    use crate::storage::{StoredCopy, StoredMessage};

    fn message(id: MessageId, session: &str, body: &str, key: Option<&str>) -> StoredMessage {
        StoredMessage {
            id,
            session: session.to_owned(),
            body: body.to_owned(),
            expires_ms: (id > 2).then_some(1_700_000_000_000 + id),
            key: key.map(str::to_owned),
        }
    }

    fn put(id: MessageId) -> Record {
        Record::Put(message(id, "s1", &format!("body {id}"), None))
    }

    fn replayed(records: &[Record]) -> Recovered {
        let mut state = Recovered::default();
        for record in records {
            state.apply(record.clone());
        }
        state
    }

    fn framed_len(record: &Record) -> u64 {
        let mut out = Vec::new();
        encode_record(record, &mut out).unwrap();
        out.len() as u64
    }

    /// Names of the files in `dir`, sorted.
    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    fn live_segment(dir: &Path) -> PathBuf {
        let listing = Listing::scan(dir).unwrap();
        segment_path(dir, *listing.segments.last().unwrap())
    }

    fn wal_error(error: &io::Error) -> Option<&WalError> {
        error.get_ref().and_then(|e| e.downcast_ref::<WalError>())
    }

    #[test]
    fn fresh_directory_recovers_empty_state() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        let (wal, recovered) = Wal::open(&dir).unwrap();
        assert_eq!(recovered, Recovered::default());
        assert_eq!(wal.disk_bytes(), MAGIC.len() as u64);
        assert_eq!(files(&dir), ["wal-00000000000000000001.log"]);
        drop(wal);
        let (_, recovered) = Wal::open(&dir).unwrap();
        assert_eq!(recovered, Recovered::default());
    }

    #[test]
    fn every_record_kind_survives_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let records = vec![
            Record::Meta { next_id: 5 },
            Record::Put(message(5, "alice", "hello", Some("k1"))),
            Record::Put(message(6, "bob", "", None)),
            Record::Put(message(7, "alice", "ünïcødé €", Some("k2"))),
            Record::Put(message(8, "bob", "doomed", None)),
            Record::Removed { ids: vec![6, 99] },
            Record::DeadLettered { ids: vec![7, 8] },
            Record::Revived { ids: vec![8] },
            Record::Dedup {
                key: "k0".into(),
                id: 3,
                until_ms: 42,
            },
            // Two copies of one fanned-out message, under their own storage ids.
            Record::Copy(StoredCopy {
                seq: 9,
                message: message(9, "carol", "fan", None),
                channel: Some("news".into()),
                priority: 2,
            }),
            Record::Copy(StoredCopy {
                seq: 10,
                message: message(9, "dave", "fan", None),
                channel: Some("news".into()),
                priority: 2,
            }),
            Record::Removed { ids: vec![9] },
        ];
        let (mut wal, _) = Wal::open(tmp.path()).unwrap();
        wal.append(&records[..3]).unwrap();
        wal.append(&records[3..]).unwrap();
        wal.sync().unwrap();
        let written = wal.disk_bytes();
        drop(wal);

        let (wal, recovered) = Wal::open(tmp.path()).unwrap();
        let expected = replayed(&records);
        assert_eq!(recovered, expected);
        assert_eq!(recovered.next_id, 11);
        assert_eq!(recovered.messages.len(), 4);
        assert_eq!(
            recovered.messages[&10].0.id, 9,
            "a copy keeps the shared id"
        );
        assert_eq!(recovered.routing[&10], (Some("news".into()), 2));
        assert!(!recovered.routing.contains_key(&9), "removed with its copy");
        assert!(recovered.messages[&7].1, "7 is dead");
        assert!(!recovered.messages[&8].1, "8 was revived");
        assert_eq!(recovered.dedup["k0"], (3, 42));
        assert_eq!(wal.disk_bytes(), written);
    }

    #[test]
    fn appends_without_sync_are_replayed_after_a_clean_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(tmp.path()).unwrap();
        wal.append(&[put(1)]).unwrap();
        wal.append(&[]).unwrap();
        drop(wal);
        let (_, recovered) = Wal::open(tmp.path()).unwrap();
        assert_eq!(recovered, replayed(&[put(1)]));
    }

    #[test]
    fn torn_tail_is_truncated_keeping_earlier_records_and_appends_continue() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(tmp.path()).unwrap();
        wal.append(&[put(1), put(2)]).unwrap();
        let intact = wal.disk_bytes();
        wal.append(&[put(3)]).unwrap();
        let full = wal.disk_bytes();
        drop(wal);

        // Cut mid-payload, and on another copy mid-header: both are torn writes.
        for cut in [full - 3, intact + 5] {
            let file = OpenOptions::new()
                .write(true)
                .open(live_segment(tmp.path()))
                .unwrap();
            file.set_len(cut).unwrap();
            drop(file);

            let (mut wal, recovered) = Wal::open(tmp.path()).unwrap();
            assert_eq!(recovered, replayed(&[put(1), put(2)]));
            assert_eq!(wal.disk_bytes(), intact);
            assert_eq!(
                fs::metadata(live_segment(tmp.path())).unwrap().len(),
                intact
            );

            wal.append(&[put(3)]).unwrap();
            wal.sync().unwrap();
            drop(wal);
            let (_, recovered) = Wal::open(tmp.path()).unwrap();
            assert_eq!(recovered, replayed(&[put(1), put(2), put(3)]));
        }
    }

    #[test]
    fn the_file_is_preallocated_and_a_crash_leaves_zeros_that_open_cuts() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(tmp.path()).unwrap();
        wal.append(&[put(1), put(2)]).unwrap();
        wal.sync().unwrap();
        let written = wal.disk_bytes();
        let path = live_segment(tmp.path());
        assert_eq!(fs::metadata(&path).unwrap().len(), PREALLOCATE_BYTES);
        wal.crash();
        assert_eq!(fs::metadata(&path).unwrap().len(), PREALLOCATE_BYTES);

        let (mut wal, recovered) = Wal::open(tmp.path()).unwrap();
        assert_eq!(recovered, replayed(&[put(1), put(2)]));
        assert_eq!(wal.disk_bytes(), written);
        assert_eq!(fs::metadata(&path).unwrap().len(), written);

        // Appends continue after the last record, not after the zeros; a clean close
        // gives the zeros back.
        wal.append(&[put(3)]).unwrap();
        drop(wal);
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            written + framed_len(&put(3))
        );
        let (_, recovered) = Wal::open(tmp.path()).unwrap();
        assert_eq!(recovered, replayed(&[put(1), put(2), put(3)]));
    }

    #[test]
    fn records_beyond_a_zeroed_record_are_not_replayed_once_appends_overwrite_it() {
        // A crash before the fsync can persist a later block without an earlier
        // one. Replay stops at the hole; were the unsynced record behind it kept,
        // an append of the same length would make it whole again.
        let tmp = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(tmp.path()).unwrap();
        wal.append(&[put(3)]).unwrap();
        let intact = wal.disk_bytes();
        wal.append(&[put(4), put(5)]).unwrap();
        wal.crash();
        let path = live_segment(tmp.path());
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_all_at(&vec![0; framed_len(&put(4)) as usize], intact)
            .unwrap();
        drop(file);

        let (mut wal, recovered) = Wal::open(tmp.path()).unwrap();
        assert_eq!(recovered, replayed(&[put(3)]));
        assert_eq!(fs::metadata(&path).unwrap().len(), intact);
        wal.append(&[put(6)]).unwrap();
        assert_eq!(framed_len(&put(6)), framed_len(&put(4)));
        wal.crash();
        let (_, recovered) = Wal::open(tmp.path()).unwrap();
        assert_eq!(recovered, replayed(&[put(3), put(6)]));
    }

    #[test]
    fn corrupt_record_is_dropped_with_the_records_after_it_and_no_others() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(tmp.path()).unwrap();
        wal.append(&[put(1), put(2)]).unwrap();
        let intact = wal.disk_bytes();
        wal.append(&[put(3), put(4)]).unwrap();
        drop(wal);

        // A byte in the payload of record 3.
        let path = live_segment(tmp.path());
        let mut bytes = fs::read(&path).unwrap();
        bytes[intact as usize + FRAME_HEADER_BYTES + 2] ^= 0x40;
        fs::write(&path, &bytes).unwrap();

        let (wal, recovered) = Wal::open(tmp.path()).unwrap();
        assert_eq!(recovered, replayed(&[put(1), put(2)]));
        assert_eq!(wal.disk_bytes(), intact);
    }

    /// Writes one record, appends `garbage` after it as a crash or a bad disk
    /// would, and checks that recovery keeps the record and cuts the garbage.
    fn garbage_after_a_record_is_cut(garbage: &[u8]) {
        let tmp = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(tmp.path()).unwrap();
        wal.append(&[put(1)]).unwrap();
        let intact = wal.disk_bytes();
        drop(wal);

        let path = live_segment(tmp.path());
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(garbage).unwrap();
        drop(file);

        let (wal, recovered) = Wal::open(tmp.path()).unwrap();
        assert_eq!(recovered, replayed(&[put(1)]));
        assert_eq!(wal.disk_bytes(), intact);
    }

    #[test]
    fn absurd_record_length_is_treated_as_corruption() {
        let mut frame = u32::MAX.to_le_bytes().to_vec();
        frame.extend_from_slice(&[0; 12]);
        garbage_after_a_record_is_cut(&frame);
    }

    #[test]
    fn valid_checksum_over_an_undecodable_payload_is_treated_as_corruption() {
        // An enum tag no Record has, correctly framed.
        let payload = [0xffu8, 0xff, 0xff];
        let mut frame = (payload.len() as u32).to_le_bytes().to_vec();
        frame.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
        frame.extend_from_slice(&payload);
        garbage_after_a_record_is_cut(&frame);
    }

    #[test]
    fn bad_magic_is_an_error_and_leaves_the_files_alone() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(tmp.path()).unwrap();
        wal.append(&[put(1)]).unwrap();
        drop(wal);
        let path = live_segment(tmp.path());
        let mut bytes = fs::read(&path).unwrap();
        bytes[0] = b'X';
        fs::write(&path, &bytes).unwrap();
        fs::write(tmp_path(tmp.path(), 2), b"half a compaction").unwrap();
        let before = files(tmp.path());

        let error = Wal::open(tmp.path()).err().expect("open must fail");
        assert_eq!(error.kind(), io::ErrorKind::InvalidData);
        assert!(matches!(wal_error(&error), Some(WalError::BadMagic { .. })));
        assert!(error.to_string().contains("wal-00000000000000000001.log"));
        assert_eq!(files(tmp.path()), before);
        assert_eq!(fs::read(&path).unwrap(), bytes, "not truncated");
    }

    #[test]
    fn empty_segment_file_is_an_error_not_an_empty_log() {
        let tmp = tempfile::tempdir().unwrap();
        fs::write(segment_path(tmp.path(), 7), b"").unwrap();
        let error = Wal::open(tmp.path()).err().expect("open must fail");
        assert!(matches!(wal_error(&error), Some(WalError::BadMagic { .. })));
    }

    #[test]
    fn a_directory_is_opened_by_one_log_at_a_time() {
        let tmp = tempfile::tempdir().unwrap();
        let (wal, _) = Wal::open(tmp.path()).unwrap();
        let error = Wal::open(tmp.path()).err().expect("second open must fail");
        assert!(matches!(wal_error(&error), Some(WalError::Locked { .. })));
        drop(wal);
        Wal::open(tmp.path()).expect("free again once the first is dropped");
    }

    #[test]
    fn compaction_shrinks_the_segment_and_recovers_the_same_state() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(tmp.path()).unwrap();
        let mut records: Vec<Record> = (1..=100).map(put).collect();
        records.push(Record::Removed {
            ids: (1..=90).collect(),
        });
        records.push(Record::DeadLettered { ids: vec![95] });
        wal.append(&records).unwrap();
        let before = wal.disk_bytes();
        let state = replayed(&records);

        let mut snapshot = vec![Record::Meta {
            next_id: state.next_id,
        }];
        snapshot.extend(state.messages.values().map(|(m, _)| Record::Put(m.clone())));
        snapshot.push(Record::DeadLettered { ids: vec![95] });
        wal.compact(&snapshot).unwrap();
        assert!(
            wal.disk_bytes() < before / 5,
            "{} vs {before}",
            wal.disk_bytes()
        );
        assert_eq!(files(tmp.path()), ["wal-00000000000000000002.log"]);
        assert_eq!(
            fs::metadata(live_segment(tmp.path())).unwrap().len(),
            wal.disk_bytes()
        );

        // Records after the compaction land in the new segment.
        wal.append(&[Record::Removed { ids: vec![91] }]).unwrap();
        wal.sync().unwrap();
        drop(wal);
        let (_, recovered) = Wal::open(tmp.path()).unwrap();
        let mut expected = state;
        expected.apply(Record::Removed { ids: vec![91] });
        assert_eq!(recovered, expected);
    }

    #[test]
    fn compaction_to_an_empty_snapshot_keeps_only_the_header() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(tmp.path()).unwrap();
        wal.append(&[put(1), Record::Removed { ids: vec![1] }])
            .unwrap();
        wal.compact(&[]).unwrap();
        assert_eq!(wal.disk_bytes(), MAGIC.len() as u64);
        drop(wal);
        let (_, recovered) = Wal::open(tmp.path()).unwrap();
        assert_eq!(recovered, Recovered::default());
    }

    #[test]
    fn leftover_tmp_from_a_crashed_compaction_is_ignored_and_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(tmp.path()).unwrap();
        wal.append(&[put(1), put(2)]).unwrap();
        drop(wal);
        // A compaction that died halfway: a snapshot with only part of the state.
        let mut half = MAGIC.to_vec();
        encode_record(&Record::Meta { next_id: 1 }, &mut half).unwrap();
        fs::write(tmp_path(tmp.path(), 2), &half).unwrap();

        let (_, recovered) = Wal::open(tmp.path()).unwrap();
        assert_eq!(recovered, replayed(&[put(1), put(2)]));
        assert_eq!(files(tmp.path()), ["wal-00000000000000000001.log"]);
    }

    #[test]
    fn older_segment_is_removed_and_the_newest_one_is_replayed() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(tmp.path()).unwrap();
        wal.append(&[put(1), put(2)]).unwrap();
        drop(wal);
        // A crash between the rename of generation 2 and the deletion of 1.
        let old = fs::read(segment_path(tmp.path(), 1)).unwrap();
        let (mut wal, _) = Wal::open(tmp.path()).unwrap();
        wal.compact(&[put(2)]).unwrap();
        drop(wal);
        fs::write(segment_path(tmp.path(), 1), old).unwrap();
        fs::write(tmp.path().join("unrelated.txt"), b"not ours").unwrap();

        let (_, recovered) = Wal::open(tmp.path()).unwrap();
        assert_eq!(recovered, replayed(&[put(2)]));
        assert_eq!(
            files(tmp.path()),
            ["unrelated.txt", "wal-00000000000000000002.log"]
        );
    }

    #[test]
    fn oversized_record_is_refused_and_the_log_stays_usable() {
        let tmp = tempfile::tempdir().unwrap();
        let (mut wal, _) = Wal::open(tmp.path()).unwrap();
        wal.append(&[put(1)]).unwrap();
        let huge = Record::Put(message(2, "s", &"x".repeat(MAX_RECORD_BYTES), None));
        let error = wal.append(&[put(2), huge]).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        assert!(matches!(
            wal_error(&error),
            Some(WalError::RecordTooLarge { .. })
        ));
        assert_eq!(wal.disk_bytes(), framed_len(&put(1)) + MAGIC.len() as u64);

        wal.append(&[put(3)]).unwrap();
        drop(wal);
        let (_, recovered) = Wal::open(tmp.path()).unwrap();
        assert_eq!(recovered, replayed(&[put(1), put(3)]));
    }

    // ---- Crash model ----------------------------------------------------------

    #[derive(Debug, Clone)]
    struct PutSpec {
        session: u8,
        body: String,
        expires_ms: Option<u64>,
        key: Option<u8>,
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Several puts in one append call, as group commit does.
        Puts(Vec<PutSpec>),
        Remove(Vec<Index>),
        DeadLetter(Vec<Index>),
        Revive(Vec<Index>),
        Compact,
        Sync,
    }

    #[derive(Debug, Clone)]
    enum Crash {
        /// Stop with nothing torn: the preallocated zeros follow the last record.
        Stop,
        /// Cut the live segment at a byte offset past its header.
        Truncate(Index),
        /// XOR a nonzero mask into one byte past the header.
        Flip(Index, u8),
    }

    fn put_spec() -> impl Strategy<Value = PutSpec> {
        (
            0u8..4,
            "[ -~é€]{0,200}",
            proptest::option::of(any::<u64>()),
            proptest::option::of(0u8..6),
        )
            .prop_map(|(session, body, expires_ms, key)| PutSpec {
                session,
                body,
                expires_ms,
                key,
            })
    }

    fn op() -> impl Strategy<Value = Op> {
        let picks = || proptest::collection::vec(any::<Index>(), 1..4);
        prop_oneof![
            8 => proptest::collection::vec(put_spec(), 1..4).prop_map(Op::Puts),
            5 => picks().prop_map(Op::Remove),
            2 => picks().prop_map(Op::DeadLetter),
            2 => picks().prop_map(Op::Revive),
            1 => Just(Op::Compact),
            1 => Just(Op::Sync),
        ]
    }

    fn crash() -> impl Strategy<Value = Crash> {
        prop_oneof![
            Just(Crash::Stop),
            any::<Index>().prop_map(Crash::Truncate),
            (any::<Index>(), 1u8..=255).prop_map(|(at, mask)| Crash::Flip(at, mask)),
        ]
    }

    /// Drives a Wal and a model side by side, remembering after every record where
    /// it ends in the live segment and what state the log replays to up to there.
    struct Journal {
        wal: Wal,
        model: Recovered,
        /// Keys of removed messages, which a snapshot carries as `Dedup` records.
        remembered: BTreeMap<String, (MessageId, u64)>,
        /// (end offset in the live segment, state after replaying up to it).
        checkpoints: Vec<(u64, Recovered)>,
    }

    impl Journal {
        fn new(wal: Wal) -> Journal {
            Journal {
                wal,
                model: Recovered::default(),
                remembered: BTreeMap::new(),
                checkpoints: vec![(MAGIC.len() as u64, Recovered::default())],
            }
        }

        fn end(&self) -> u64 {
            self.checkpoints.last().unwrap().0
        }

        fn note(&mut self, records: &[Record]) {
            for record in records {
                let end = self.end() + framed_len(record);
                self.model.apply(record.clone());
                self.checkpoints.push((end, self.model.clone()));
            }
            assert_eq!(self.wal.disk_bytes(), self.end());
        }

        fn write(&mut self, records: Vec<Record>) {
            self.wal.append(&records).unwrap();
            self.note(&records);
        }

        fn pick(&self, picks: &[Index]) -> Vec<MessageId> {
            let live: Vec<MessageId> = self.model.messages.keys().copied().collect();
            if live.is_empty() {
                return Vec::new();
            }
            let mut ids: Vec<MessageId> = picks.iter().map(|ix| *ix.get(&live)).collect();
            ids.sort_unstable();
            ids.dedup();
            ids
        }

        fn snapshot(&self) -> Vec<Record> {
            let mut snapshot = vec![Record::Meta {
                next_id: self.model.next_id,
            }];
            snapshot.extend(
                self.model
                    .messages
                    .values()
                    .map(|(m, _)| Record::Put(m.clone())),
            );
            let dead: Vec<MessageId> = self
                .model
                .messages
                .iter()
                .filter(|(_, (_, dead))| *dead)
                .map(|(&id, _)| id)
                .collect();
            if !dead.is_empty() {
                snapshot.push(Record::DeadLettered { ids: dead });
            }
            snapshot.extend(
                self.remembered
                    .iter()
                    .map(|(key, &(id, until_ms))| Record::Dedup {
                        key: key.clone(),
                        id,
                        until_ms,
                    }),
            );
            snapshot
        }

        fn run(&mut self, op: Op) {
            match op {
                Op::Puts(specs) => {
                    let mut next = self.model.next_id.max(1);
                    let records = specs
                        .into_iter()
                        .map(|spec| {
                            let id = next;
                            next += 1;
                            Record::Put(StoredMessage {
                                id,
                                session: format!("session-{}", spec.session),
                                body: spec.body,
                                expires_ms: spec.expires_ms,
                                key: spec.key.map(|k| format!("key-{k}")),
                            })
                        })
                        .collect();
                    self.write(records);
                }
                Op::Remove(picks) => {
                    let ids = self.pick(&picks);
                    if ids.is_empty() {
                        return;
                    }
                    for id in &ids {
                        if let Some(key) = &self.model.messages[id].0.key {
                            self.remembered.insert(key.clone(), (*id, id * 1000));
                        }
                    }
                    self.write(vec![Record::Removed { ids }]);
                }
                Op::DeadLetter(picks) => {
                    let ids = self.pick(&picks);
                    if !ids.is_empty() {
                        self.write(vec![Record::DeadLettered { ids }]);
                    }
                }
                Op::Revive(picks) => {
                    let ids = self.pick(&picks);
                    if !ids.is_empty() {
                        self.write(vec![Record::Revived { ids }]);
                    }
                }
                Op::Compact => {
                    let snapshot = self.snapshot();
                    self.wal.compact(&snapshot).unwrap();
                    let before = std::mem::take(&mut self.model);
                    self.checkpoints = vec![(MAGIC.len() as u64, Recovered::default())];
                    self.note(&snapshot);
                    // The snapshot must say what the log said, or the test is wrong.
                    assert_eq!(self.model.next_id, before.next_id);
                    assert_eq!(self.model.messages, before.messages);
                }
                Op::Sync => self.wal.sync().unwrap(),
            }
        }
    }

    /// The last checkpoint that lies entirely before `offset`.
    fn expected_at(checkpoints: &[(u64, Recovered)], offset: u64) -> (u64, Recovered) {
        checkpoints
            .iter()
            .rev()
            .find(|(end, _)| *end <= offset)
            .cloned()
            .expect("the header checkpoint is at the start")
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

        #[test]
        fn recovery_after_any_torn_or_corrupt_tail_gives_the_state_of_the_last_whole_record(
            ops in proptest::collection::vec(op(), 0..200),
            crash in crash(),
        ) {
            let tmp = tempfile::tempdir().unwrap();
            let (wal, _) = Wal::open(tmp.path()).unwrap();
            let mut journal = Journal::new(wal);
            for op in ops {
                journal.run(op);
            }
            let end = journal.end();
            let generation = journal.wal.generation;
            let Journal { wal, checkpoints, .. } = journal;
            wal.crash();

            let path = segment_path(tmp.path(), generation);
            prop_assert!(fs::metadata(&path).unwrap().len() >= end);
            let header = MAGIC.len() as u64;
            let (kept, expected) = match crash {
                Crash::Stop => expected_at(&checkpoints, end),
                Crash::Truncate(at) => {
                    let cut = header + at.index((end - header + 1) as usize) as u64;
                    OpenOptions::new().write(true).open(&path).unwrap().set_len(cut).unwrap();
                    expected_at(&checkpoints, cut)
                }
                Crash::Flip(_, _) if end == header => expected_at(&checkpoints, end),
                Crash::Flip(at, mask) => {
                    let pos = header + at.index((end - header) as usize) as u64;
                    let file = OpenOptions::new().read(true).write(true).open(&path).unwrap();
                    let mut byte = [0u8];
                    file.read_exact_at(&mut byte, pos).unwrap();
                    file.write_all_at(&[byte[0] ^ mask], pos).unwrap();
                    expected_at(&checkpoints, pos)
                }
            };

            let (mut wal, recovered) = Wal::open(tmp.path()).unwrap();
            prop_assert_eq!(&recovered, &expected);
            prop_assert_eq!(wal.disk_bytes(), kept);
            prop_assert_eq!(fs::metadata(&path).unwrap().len(), kept);
            prop_assert_eq!(files(tmp.path()).len(), 1);

            // The repaired log takes appends as any other.
            let id = recovered.next_id.max(1);
            wal.append(&[put(id)]).unwrap();
            wal.sync().unwrap();
            drop(wal);
            let (_, again) = Wal::open(tmp.path()).unwrap();
            let mut expected = expected;
            expected.apply(put(id));
            prop_assert_eq!(again, expected);
        }
    }
}
