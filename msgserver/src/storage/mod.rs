//! Durable storage of the core's queue state, behind a small interface.
//!
//! The broker never touches a file: it emits [`Record`]s describing each change
//! (a message stored, messages removed, moved to or from the dead-letter queue),
//! the server's journal task appends them to a [`Storage`] and syncs them by the
//! configured fsync policy, and on start the storage replays them into a
//! [`Recovered`] state that the broker is rebuilt from. Delivery state (which
//! message is in flight to whom) is deliberately not stored: after a restart every
//! pending message is ready again, which is what at-least-once delivery asks for.
//! What present sessions subscribed to, who they belong to, whether they are
//! paused and which are kicked is stored, so that routing survives a restart.
//!
//! [`wal::Wal`] is the one backend today: an append-only log of CRC-checked records.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;

use ipc::MessageId;
use serde::{Deserialize, Serialize};

pub mod wal;

/// One message as it is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    pub id: MessageId,
    /// The session whose mailbox holds it.
    pub session: String,
    pub body: String,
    /// Wall-clock expiry in Unix milliseconds; `None` never expires.
    pub expires_ms: Option<u64>,
    /// The publisher's idempotency key, if it gave one.
    pub key: Option<String>,
}

/// A message of the versioned API as it is stored: one per recipient. Copies of one
/// fanned-out message share its public id (`message.id`) but each has a storage
/// `seq` of its own, which the records that follow name. Added after the log
/// format's first release as a new variant, so older logs still read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCopy {
    pub seq: MessageId,
    pub message: StoredMessage,
    /// The channel it was published to, for that channel's per-subscriber limit.
    pub channel: Option<String>,
    pub priority: i32,
}

/// A session's subscription as it is stored (the storage format's own type, so
/// that a change to the wire type cannot silently change the log's).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct StoredSubscription {
    pub channel: String,
    pub subject: Option<String>,
    pub group: Option<String>,
}

/// What a durable core remembers of a present session besides its messages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SessionState {
    pub user: Option<String>,
    pub subscriptions: BTreeSet<StoredSubscription>,
    pub paused: bool,
}

/// One change to the stored state. Records are applied in log order. `ids` in
/// records are storage ids: a [`StoredMessage`]'s id, or a [`StoredCopy`]'s `seq`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// Ids below `next_id` are never handed out again, even after everything that
    /// carried them is gone. Written at the start of every snapshot.
    Meta {
        next_id: MessageId,
    },
    /// A message was accepted.
    Put(StoredMessage),
    /// Messages are gone for good: acknowledged, deleted on delivery, expired,
    /// dropped for room, or purged from the dead-letter queue.
    Removed {
        ids: Vec<MessageId>,
    },
    /// Messages moved to the dead-letter queue after too many deliveries.
    DeadLettered {
        ids: Vec<MessageId>,
    },
    /// Dead letters given back to their mailboxes by an operator.
    Revived {
        ids: Vec<MessageId>,
    },
    /// A publish key remembered after its message is gone, so that a late retry is
    /// still recognised. Written only in snapshots; live keys ride on their `Put`.
    Dedup {
        key: String,
        id: MessageId,
        until_ms: u64,
    },
    /// A message of the versioned API was queued for one recipient.
    Copy(StoredCopy),
    /// A session subscribed.
    Subscribed {
        session: String,
        subscription: StoredSubscription,
    },
    Unsubscribed {
        session: String,
        subscription: StoredSubscription,
    },
    /// The backend bound a session to a user.
    Bound {
        session: String,
        user: String,
    },
    Paused {
        session: String,
        paused: bool,
    },
    /// A session left or was kicked: its subscriptions, binding and pause go.
    Left {
        session: String,
    },
    /// A kicked session's requests are refused until then (Unix ms).
    Kicked {
        session: String,
        until_ms: u64,
    },
}

/// The state a log replays to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovered {
    pub next_id: MessageId,
    /// Every message not yet removed, by storage id (so in the order they were
    /// queued), with whether it sits in the dead-letter queue. The message's `id` is
    /// its public id, which differs from the storage id for copies.
    pub messages: BTreeMap<MessageId, (StoredMessage, bool)>,
    /// Channel and priority of the copies among `messages`, by storage id.
    pub routing: HashMap<MessageId, (Option<String>, i32)>,
    /// Present sessions' subscriptions, bindings and pauses.
    pub sessions: BTreeMap<String, SessionState>,
    /// Kicked sessions: refused until (Unix ms).
    pub kicked: HashMap<String, u64>,
    /// Publish keys of messages already removed: key → (id, remembered until ms).
    pub dedup: HashMap<String, (MessageId, u64)>,
}

impl Recovered {
    /// Applies one record. Records about unknown ids are ignored: a removal can
    /// follow a compaction that already left the message out.
    pub fn apply(&mut self, record: Record) {
        match record {
            Record::Meta { next_id } => self.next_id = self.next_id.max(next_id),
            Record::Put(message) => {
                self.next_id = self.next_id.max(message.id + 1);
                self.messages.insert(message.id, (message, false));
            }
            Record::Removed { ids } => {
                for id in ids {
                    self.messages.remove(&id);
                    self.routing.remove(&id);
                }
            }
            Record::DeadLettered { ids } => {
                for id in ids {
                    if let Some((_, dead)) = self.messages.get_mut(&id) {
                        *dead = true;
                    }
                }
            }
            Record::Revived { ids } => {
                for id in ids {
                    if let Some((_, dead)) = self.messages.get_mut(&id) {
                        *dead = false;
                    }
                }
            }
            Record::Dedup { key, id, until_ms } => {
                self.next_id = self.next_id.max(id + 1);
                self.dedup.insert(key, (id, until_ms));
            }
            Record::Copy(copy) => {
                self.next_id = self.next_id.max(copy.seq + 1).max(copy.message.id + 1);
                if copy.channel.is_some() || copy.priority != 0 {
                    self.routing.insert(copy.seq, (copy.channel, copy.priority));
                }
                self.messages.insert(copy.seq, (copy.message, false));
            }
            Record::Subscribed {
                session,
                subscription,
            } => {
                self.sessions
                    .entry(session)
                    .or_default()
                    .subscriptions
                    .insert(subscription);
            }
            Record::Unsubscribed {
                session,
                subscription,
            } => {
                if let Some(state) = self.sessions.get_mut(&session) {
                    state.subscriptions.remove(&subscription);
                }
                self.forget_if_empty(&session);
            }
            Record::Bound { session, user } => {
                self.sessions.entry(session).or_default().user = Some(user);
            }
            Record::Paused { session, paused } => {
                self.sessions.entry(session.clone()).or_default().paused = paused;
                self.forget_if_empty(&session);
            }
            Record::Left { session } => {
                self.sessions.remove(&session);
            }
            Record::Kicked { session, until_ms } => {
                self.sessions.remove(&session);
                self.kicked.insert(session, until_ms);
            }
        }
    }
}

impl Recovered {
    /// A session with nothing left to remember is not one to bring back: a broker
    /// writes no `Left` for a session whose state it had already cleared.
    fn forget_if_empty(&mut self, session: &str) {
        if self
            .sessions
            .get(session)
            .is_some_and(|state| *state == SessionState::default())
        {
            self.sessions.remove(session);
        }
    }
}

/// What the journal task needs from a backend. Calls come from one thread.
pub trait Storage: Send + 'static {
    /// Appends records after everything appended before; durable only after `sync`.
    fn append(&mut self, records: &[Record]) -> io::Result<()>;
    /// Makes everything appended so far durable (fdatasync or the backend's commit).
    fn sync(&mut self) -> io::Result<()>;
    /// Replaces everything stored with `snapshot`, the whole live state at this
    /// point of the record stream, so that disk use tracks what is still pending.
    /// Durable when it returns; a crash midway leaves the old state intact.
    fn compact(&mut self, snapshot: &[Record]) -> io::Result<()>;
    /// Bytes of records the backend holds on disk now, not counting space it has
    /// reserved ahead of them: what compaction weighs against the pending state.
    fn disk_bytes(&self) -> u64;
}
