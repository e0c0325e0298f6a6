use serde::{Deserialize, Serialize};

/// Ties a reply to its request on one connection. Chosen by the client, unique among
/// its requests in flight on that connection.
pub type RequestId = u64;

/// Server-assigned message id. Increases monotonically, also across restarts: a
/// durable core continues after the highest id it stored, and a memory-only core
/// starts from the wall clock in microseconds (below 2^53, so exact in JavaScript).
pub type MessageId = u64;

/// What the connecting peer is: the HTTP front, on the main socket, or the operator
/// CLI, on the admin socket, which is the only place the operator's requests
/// ([`Request::DeadLetters`], [`Request::Admin`]) are served. The core refuses a role on the wrong socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Handler,
    Admin,
}

/// The first frame a client sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub magic: [u8; 4],
    pub version: u32,
    pub role: Role,
}

impl Hello {
    pub fn new(role: Role) -> Self {
        Hello {
            magic: crate::MAGIC,
            version: crate::PROTOCOL_VERSION,
            role,
        }
    }

    /// Why the server must refuse this peer, if it must.
    pub fn refusal(&self) -> Option<String> {
        if self.magic != crate::MAGIC {
            return Some("not a micromsg client (bad handshake magic)".into());
        }
        if self.version != crate::PROTOCOL_VERSION {
            return Some(format!(
                "protocol version mismatch: client speaks {}, server speaks {}",
                self.version,
                crate::PROTOCOL_VERSION
            ));
        }
        None
    }
}

/// The server's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Welcome {
    Accepted {
        version: u32,
        /// Whether the core stores messages durably. A handler then gives every
        /// publish an idempotency key, so that it can retry one whose answer a core
        /// restart swallowed; a memory-only core loses everything on a restart
        /// anyway, and the keys would only cost it memory.
        durable: bool,
    },
    Refused {
        reason: String,
    },
}

/// Every frame a client sends after the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClientFrame {
    pub id: RequestId,
    pub request: Request,
}

/// Every frame the server sends after the handshake.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerFrame {
    pub id: RequestId,
    pub response: Response,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Heartbeat; answered with [`Response::Pong`] without touching the broker.
    Ping,
    /// Queue `body` for session `dst`. Answered with [`Response::Published`].
    Publish {
        src: String,
        dst: String,
        body: String,
        /// The publisher's own id for this message. A second publish with the same
        /// `src` and key inside the core's dedup window is not stored again, so a
        /// publish whose answer was lost can be retried safely.
        key: Option<String>,
    },
    /// Long-poll for `session`: answered with [`Response::Messages`] as soon as the
    /// session has messages, or with none after `timeout_ms`.
    Poll {
        session: String,
        timeout_ms: u64,
        /// The x0 rule: asking again acknowledges everything given before (in `ack`
        /// delivery mode). A client that acknowledges by id sends `false`.
        ack_previous: bool,
        /// At most this many messages per reply (higher channel priority first);
        /// 0 gives everything ready.
        max: u32,
    },
    /// Withdraw the parked poll that was sent with request id `poll` on this same
    /// connection (its browser went away). The poll is answered with no messages.
    CancelPoll { poll: RequestId },
    /// Acknowledge messages `session` was given (the x0 `DEL`), so that they are
    /// never given again. Answered with [`Response::Acked`].
    Ack { session: String, which: AckSelector },
    /// Messages that were handed to this client for `session` but could not be passed
    /// on to the browser: the core puts them back at the head of the mailbox.
    Return {
        session: String,
        messages: Vec<Message>,
    },
    /// Operator only: the dead-letter queue. Answered with
    /// [`Response::DeadLetters`] for `List` and [`Response::Count`] otherwise.
    DeadLetters(DeadLetterOp),
    /// Route a message to a session, a user, a channel or everyone, or as a reply.
    /// Answered with [`Response::Sent`].
    Send(Box<Send>),
    /// Subscribe `session` to a channel pattern; with `since`, first give it what
    /// the channel's history holds after that id. Answered with
    /// [`Response::Subscribed`].
    Subscribe {
        session: String,
        subscription: Subscription,
        since: Option<MessageId>,
    },
    /// Drop the subscription equal to this one. Answered with [`Response::Count`]
    /// (1, or 0 when there was none).
    Unsubscribe {
        session: String,
        subscription: Subscription,
    },
    /// RPC: replies that reference message `reference` go to `session` until the
    /// registration expires. Answered with [`Response::Done`].
    AwaitReply {
        session: String,
        reference: MessageId,
        ttl_ms: u64,
    },
    /// Hold (or release) delivery to `session`; messages keep queueing meanwhile.
    /// Answered with [`Response::Done`].
    SetPaused { session: String, paused: bool },
    /// Which sessions a channel reaches. Answered with [`Response::Presence`].
    Presence { channel: String },
    /// Backend: `session` belongs to `user` (user targets reach it). `exclusive`
    /// kicks the user's other sessions. Answered with [`Response::Count`] of kicks.
    Bind {
        session: String,
        user: String,
        exclusive: bool,
    },
    /// Everything `session` was given and has not acknowledged is ready again at
    /// once (a reconnecting client whose old connection may have died with messages
    /// unread). Answered with [`Response::Count`] of messages released.
    Release { session: String },
    /// Backend: end `session`: its parked poll is answered with [`ErrorKind::Kicked`],
    /// its messages and subscriptions are dropped and its later requests refused.
    /// Answered with [`Response::Done`].
    Kick { session: String, reason: String },
    /// The core's counters and gauges, for msghandler's `/metrics`. Read-only and
    /// served to the handler role, so that the scrape needs no operator socket.
    /// Answered with [`Response::Metrics`].
    Metrics,
    /// Operator only: inspect and manage the running core (`msgctl`).
    Admin(AdminRequest),
}

/// The operator's requests besides the dead-letter queue. Served on the admin
/// socket only; none of them is a handler's business.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdminRequest {
    /// The core's counters and settings. Answered with [`Response::Status`].
    Status,
    /// The `limit` sessions with the deepest queues (ready, then in flight), and
    /// how many sessions there are in all. Answered with [`Response::Sessions`].
    Sessions { limit: u32 },
    /// What waits for `session` (in flight first, then ready, oldest first), at
    /// most `limit`, changing nothing. Answered with [`Response::Peeked`].
    Peek { session: String, limit: u32 },
    /// Delete everything waiting for `session`, ready and in flight, for good.
    /// Answered with [`Response::Count`] of messages deleted.
    Purge { session: String },
    /// As [`Request::Kick`]. Answered with [`Response::Count`] of messages dropped.
    Kick { session: String, reason: String },
    /// Start (`true`) or end (`false`) draining: while draining, new messages are
    /// refused with [`ErrorKind::Draining`] and everything else (polls, acks) works,
    /// so that queues empty. Answered with [`Response::Done`].
    Drain { draining: bool },
}

/// The answer to [`AdminRequest::Status`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoreStatus {
    /// msgserver's own version (its crate version).
    pub version: String,
    pub protocol: u32,
    pub uptime_ms: u64,
    /// Sessions present (polled, subscribed or bound within the session timeout).
    pub sessions: u64,
    /// Mailboxes held: present sessions and those still holding messages.
    pub mailboxes: u64,
    /// Messages waiting to be given.
    pub ready: u64,
    /// Messages given and not yet acknowledged (ack mode).
    pub in_flight: u64,
    /// Bytes of message bodies held (ready, in flight, dead letters), the total
    /// `max_queued_bytes` bounds; 0 there means no limit.
    pub queued_bytes: u64,
    pub max_queued_bytes: u64,
    pub parked_polls: u64,
    pub dead_letters: u64,
    pub subscriptions: u64,
    /// Distinct channel patterns subscribed to.
    pub channels: u64,
    /// Open connections from msghandler processes.
    pub handler_connections: u64,
    /// `None`: messages are kept in memory only.
    pub storage: Option<StorageStatus>,
    pub draining: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageStatus {
    pub data_dir: String,
    /// The log's size on disk.
    pub log_bytes: u64,
    /// `always`, `interval` or `never`.
    pub fsync: String,
}

/// One session in the answer to [`AdminRequest::Sessions`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSummary {
    pub session: String,
    pub ready: u64,
    pub in_flight: u64,
    pub user: Option<String>,
    /// Since the session's last own request, or the end of its last poll.
    pub last_seen_ms: u64,
    pub parked_poll: bool,
    pub paused: bool,
    pub subscriptions: u32,
}

/// One message in the answer to [`AdminRequest::Peek`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeekedMessage {
    pub id: MessageId,
    /// Since this core took it in (a restart counts from the recovery).
    pub age_ms: u64,
    /// Given to the session and not yet acknowledged (else ready).
    pub in_flight: bool,
    pub deliveries: u32,
    pub body: String,
}

/// Where a message goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Target {
    Session(String),
    /// Every session currently bound to this user.
    User(String),
    /// Every session subscribed to a pattern that matches this channel (one member
    /// per consumer group).
    Channel(String),
    /// Every current session.
    Broadcast,
}

/// A message of the versioned API. The core wraps `data` in the delivered envelope
/// (`{"id":..,"time":..,"source":..,"target":..,"subject":..,"reference":..,"data":..}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Send {
    /// The sending session; `None` for the application's backend.
    pub src: Option<String>,
    /// `None` makes this a reply: it goes to the session awaiting replies to
    /// `reference`.
    pub target: Option<Target>,
    pub subject: Option<String>,
    /// The id of the message this one answers.
    pub reference: Option<MessageId>,
    /// JSON text, passed through untouched.
    pub data: String,
    /// How long it may wait undelivered; `None` takes the core's `message_ttl`.
    pub ttl_ms: Option<u64>,
    /// Idempotency key, as for [`Request::Publish`].
    pub key: Option<String>,
    /// Streamlined RPC: replies to this message go back to `src` for this long.
    pub expect_reply_ms: Option<u64>,
}

/// A channel pattern, an optional subject pattern and an optional consumer group.
/// Patterns are dot-separated tokens: `*` matches one token, a final `>` one or more.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Subscription {
    pub channel: String,
    pub subject: Option<String>,
    /// Sessions subscribed under one group name (and the same patterns) share the
    /// channel's messages: each goes to exactly one of them.
    pub group: Option<String>,
}

/// One session a channel reaches.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Present {
    pub session: String,
    pub user: Option<String>,
}

/// Which delivered-but-unacknowledged messages an ack covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AckSelector {
    /// Everything the session was given and has not acknowledged.
    All,
    /// Exactly these ids (others stay in flight).
    Ids(Vec<MessageId>),
    /// Every id up to and including this cursor.
    UpTo(MessageId),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeadLetterOp {
    /// The oldest `limit` dead letters, and how many there are in all.
    List { limit: u32 },
    /// Give dead letters back to their sessions (all of them when `ids` is `None`).
    Replay { ids: Option<Vec<MessageId>> },
    /// Delete dead letters for good (all of them when `ids` is `None`).
    Purge { ids: Option<Vec<MessageId>> },
}

/// A message that was delivered too often without being acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub id: MessageId,
    pub session: String,
    pub body: String,
    pub deliveries: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    pub id: MessageId,
    /// The JSON text delivered to the recipient, exactly as the front built it.
    pub body: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Pong,
    /// The message was stored; `dropped` older messages were discarded to make room
    /// (only under the drop-oldest overflow policy).
    Published {
        id: MessageId,
        dropped: u32,
        /// The key was seen before: nothing new was stored, `id` is the first one's.
        duplicate: bool,
    },
    /// The answer to a poll; empty when the poll timed out or was withdrawn.
    Messages(Vec<Message>),
    /// The answer to an ack: how many messages it released.
    Acked {
        count: u32,
    },
    /// The request was carried out and has nothing to report.
    Done,
    DeadLetters {
        letters: Vec<DeadLetter>,
        total: u64,
    },
    /// How many things an operator's request affected.
    Count(u64),
    /// The answer to [`Request::Send`]: the message's id and how many sessions it
    /// was queued for.
    Sent {
        id: MessageId,
        recipients: u32,
        /// Older messages dropped to make room, over all recipients.
        dropped: u32,
        duplicate: bool,
    },
    /// The answer to [`Request::Subscribe`]: `recovered` messages from history were
    /// queued; `complete` is false when history no longer reaches back to `since`
    /// (or the channel keeps none), so something may have been missed.
    Subscribed {
        recovered: u32,
        complete: bool,
    },
    Presence(Vec<Present>),
    /// Boxed: far larger than every other reply, and rare (one per scrape).
    Metrics(Box<CoreMetrics>),
    Error(Error),
    // The operator's answers come after Error so that the variants before them
    // keep their bincode tags: the fuzz corpus (fuzz/regressions) keeps meaning
    // what it meant.
    Status(Box<CoreStatus>),
    Sessions {
        sessions: Vec<SessionSummary>,
        /// Sessions in all, listed or not.
        total: u64,
    },
    Peeked {
        messages: Vec<PeekedMessage>,
        /// Messages waiting in all (ready and in flight), listed or not.
        total: u64,
    },
}

/// What the core counts, as of the moment it answered [`Request::Metrics`].
/// Counters only grow while the core runs (they start from zero at each start);
/// gauges are the current state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoreMetrics {
    /// Messages accepted, one per publish or send (not per recipient).
    pub published: u64,
    /// Message copies handed to a poll (each redelivery counts again).
    pub delivered: u64,
    /// Copies acknowledged in ack mode (by a DEL, ids, a cursor or the next poll).
    pub acknowledged: u64,
    /// Copies put back in line after their visibility timeout or a lost handler.
    pub redelivered: u64,
    /// Copies dropped for their time-to-live.
    pub expired: u64,
    /// Copies dropped to make room (drop_oldest, a channel's max_pending).
    pub dropped: u64,
    /// Copies moved to the dead-letter queue after max_deliveries.
    pub dead_lettered: u64,
    /// Requests refused, by the kind of refusal.
    pub refused: Vec<(ErrorKind, u64)>,
    /// Copies waiting to be delivered.
    pub ready: u64,
    /// Copies given out and not yet acknowledged (ack mode).
    pub in_flight: u64,
    pub dead_letters: u64,
    pub mailboxes: u64,
    /// Sessions present (polled, subscribed or bound within the session timeout).
    pub sessions: u64,
    pub parked_polls: u64,
    /// Bytes of message bodies held, the total `max_queued_bytes` bounds.
    pub queued_bytes: u64,
    /// Durable storage, when the core has a data directory.
    pub storage: Option<StorageMetrics>,
}

/// The journal's side of [`CoreMetrics`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StorageMetrics {
    /// Bytes of the log on disk.
    pub journal_bytes: u64,
    /// How long each fsync took.
    pub fsync: Histogram,
}

/// A latency histogram: `counts[i]` observations took at most `bounds_us[i]`
/// microseconds (not cumulative; the last count is above every bound). Integer
/// microseconds rather than float seconds, so that every reply type stays `Eq`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Histogram {
    pub bounds_us: Vec<u64>,
    /// One longer than `bounds_us`.
    pub counts: Vec<u64>,
    pub sum_us: u64,
}

impl Histogram {
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// `(upper bound in seconds, count in that bucket)` pairs ending with `+Inf`,
    /// the shape Prometheus encoders take (they add the counts up).
    pub fn buckets_seconds(&self) -> Vec<(f64, u64)> {
        self.counts
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let bound = self
                    .bounds_us
                    .get(i)
                    .map_or(f64::INFINITY, |us| *us as f64 / 1e6);
                (bound, *n)
            })
            .collect()
    }
}

/// A refusal the client is meant to pass on to its own caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Error {
    pub kind: ErrorKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorKind {
    /// The recipient's mailbox is at its limit and the policy is to reject.
    MailboxFull,
    /// The message body is over the configured maximum payload size.
    PayloadTooLarge,
    /// The request was well-formed on the wire but cannot be carried out as asked.
    InvalidRequest,
    /// The core is stopping: the request was not carried out. Retry once a core is
    /// back (a publish with its key, so that it cannot be stored twice).
    ShuttingDown,
    /// The session was kicked by the backend; it must start a new one.
    Kicked,
    /// A reply whose reference no session awaits (never asked for, or expired).
    NoRoute,
    /// The core holds as many sessions or as many message bytes as it is configured
    /// to (`max_sessions`, `max_queued_bytes`): nothing was stored. Retry later;
    /// room comes back as messages are delivered and sessions go away.
    Overloaded,
    /// An operator is draining the core for maintenance (`msgctl drain`): it takes
    /// no new messages, while polls and acks go on so that its queues empty. Retry
    /// later; draining ends when the operator resumes or the core restarts.
    Draining,
    /// The core's shared store (the Redis backend) did not answer within
    /// `redis_timeout`: nothing was carried out, or a publish may have been stored
    /// (retry it with its key). Retry later; the core reconnects by itself.
    StoreUnavailable,
}

impl ErrorKind {
    /// Every kind, for tables indexed by kind (`kind as usize`).
    pub const ALL: [ErrorKind; 9] = [
        ErrorKind::MailboxFull,
        ErrorKind::PayloadTooLarge,
        ErrorKind::InvalidRequest,
        ErrorKind::ShuttingDown,
        ErrorKind::Kicked,
        ErrorKind::NoRoute,
        ErrorKind::Overloaded,
        ErrorKind::Draining,
        ErrorKind::StoreUnavailable,
    ];

    /// The stable name shown to clients (`exception_id` in x0 error bodies).
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::MailboxFull => "MailboxFull",
            ErrorKind::PayloadTooLarge => "PayloadTooLarge",
            ErrorKind::InvalidRequest => "InvalidRequest",
            ErrorKind::ShuttingDown => "ShuttingDown",
            ErrorKind::Kicked => "Kicked",
            ErrorKind::NoRoute => "NoRoute",
            ErrorKind::Overloaded => "Overloaded",
            ErrorKind::Draining => "Draining",
            ErrorKind::StoreUnavailable => "StoreUnavailable",
        }
    }
}

impl Response {
    pub fn error(kind: ErrorKind, message: impl Into<String>) -> Self {
        Response::Error(Error {
            kind,
            message: message.into(),
        })
    }
}
