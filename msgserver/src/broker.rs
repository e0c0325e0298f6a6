//! The broker: every routing and delivery rule of the core, as a plain state machine.
//!
//! It owns the mailboxes, the messages in flight, the parked polls, the dead-letter
//! queue and the publish keys, and nothing else: no sockets, no tasks, no clock, no
//! files. Each method takes the current time and appends what must be sent where to
//! an output vector; every change to stored state is also written to a journal of
//! [`Record`]s that the I/O shell (`server.rs`) hands to storage before it lets the
//! replies go. So every rule below is a unit test away.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use ipc::{
    AckSelector, AdminRequest, CoreStatus, DeadLetter, DeadLetterOp, ErrorKind, Message, MessageId,
    PeekedMessage, Present, Request, RequestId, Response, Send, SessionSummary, Subscription,
    Target,
};
use serde::Deserialize;

use crate::routing::{
    self, Change, ChannelSettings, History, HistoryEntry, SYSTEM_CHANNEL, Subscriptions,
};
use crate::storage::{Record, Recovered, StoredCopy, StoredMessage, StoredSubscription};

/// Identifies one IPC connection to the core for the life of the process.
pub type ConnId = u64;

/// Where a reply goes: a request id on one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReplyTo {
    pub conn: ConnId,
    pub request: RequestId,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub to: ReplyTo,
    pub response: Response,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryMode {
    /// A poll removes what it returns: x0's original behaviour.
    X0,
    /// A returned message stays in flight until it is acknowledged (by id, by
    /// cursor, by `DEL`, or by the session's next poll) and is given again after the
    /// visibility timeout otherwise.
    Ack,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverflowPolicy {
    /// Make room by discarding the oldest waiting message; the sender is told how many.
    DropOldest,
    /// Refuse the new message; the sender gets a `MailboxFull` error.
    Reject,
}

#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub delivery: DeliveryMode,
    /// Messages waiting in one mailbox, not counting those in flight.
    pub mailbox_max_len: usize,
    pub overflow: OverflowPolicy,
    pub max_payload_bytes: usize,
    /// How long an undelivered message is kept; `None` keeps it until delivered.
    pub message_ttl: Option<Duration>,
    pub visibility_timeout: Duration,
    /// An empty mailbox nobody polled or published to for this long is removed.
    pub idle_mailbox_timeout: Duration,
    /// Upper bound on the poll timeout a client may ask for.
    pub max_poll_timeout: Duration,
    /// Deliveries without an acknowledgement after which a message moves to the
    /// dead-letter queue instead of being given again; 0 never gives up.
    pub max_deliveries: u32,
    /// How long a publish key is remembered for deduplication.
    pub dedup_window: Duration,
    /// A session that sent no request (and has no poll parked) for this long has
    /// left: its subscriptions and user binding go.
    pub session_timeout: Duration,
    /// How long a kicked session's requests are refused.
    pub kick_retention: Duration,
    /// Upper bound on how long replies to a message are routed back.
    pub max_reply_ttl: Duration,
    /// Sessions (mailboxes) the broker holds at most: a request that would create
    /// one more is refused with `Overloaded`. 0: no limit.
    pub max_sessions: usize,
    /// Bytes of message bodies the broker holds at most (ready, in flight and dead
    /// letters, each copy of a fanned-out message counted): a message that would
    /// take more is refused with `Overloaded` and nothing is stored. 0: no limit.
    pub max_queued_bytes: u64,
    /// Per channel pattern; the first that matches a channel applies.
    pub channels: Vec<ChannelSettings>,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            delivery: DeliveryMode::X0,
            mailbox_max_len: 1000,
            overflow: OverflowPolicy::DropOldest,
            max_payload_bytes: 64 * 1024,
            message_ttl: Some(Duration::from_secs(3600)),
            visibility_timeout: Duration::from_secs(30),
            idle_mailbox_timeout: Duration::from_secs(300),
            max_poll_timeout: Duration::from_secs(120),
            max_deliveries: 10,
            dedup_window: Duration::from_secs(30),
            session_timeout: Duration::from_secs(60),
            kick_retention: Duration::from_secs(3600),
            max_reply_ttl: Duration::from_secs(300),
            max_sessions: 100_000,
            max_queued_bytes: 256 * 1024 * 1024,
            channels: Vec::new(),
        }
    }
}

/// The wall-clock time of one instant. Storage needs absolute expiry times and the
/// broker reads no clock, so the shell gives it this once and it does the arithmetic.
#[derive(Debug, Clone, Copy)]
pub struct ClockAnchor {
    pub instant: Instant,
    pub unix_ms: u64,
}

impl ClockAnchor {
    /// Reads both clocks; for the shell, never called inside the broker.
    pub fn now() -> Self {
        ClockAnchor {
            instant: Instant::now(),
            unix_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        }
    }

    fn unix_ms_at(&self, at: Instant) -> u64 {
        match at.checked_duration_since(self.instant) {
            Some(after) => self.unix_ms.saturating_add(after.as_millis() as u64),
            None => self
                .unix_ms
                .saturating_sub(self.instant.duration_since(at).as_millis() as u64),
        }
    }

    fn instant_at(&self, unix_ms: u64) -> Instant {
        if unix_ms >= self.unix_ms {
            self.instant + Duration::from_millis(unix_ms - self.unix_ms)
        } else {
            let before = Duration::from_millis(self.unix_ms - unix_ms);
            self.instant.checked_sub(before).unwrap_or(self.instant)
        }
    }
}

/// Counts an operator (and the tests) can read without walking the state by hand.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub mailboxes: usize,
    pub ready: usize,
    pub in_flight: usize,
    pub parked_polls: usize,
    pub pending_timers: usize,
    pub dead_letters: usize,
    pub dedup_keys: usize,
    /// Sessions present: polled, subscribed or bound within the session timeout.
    pub sessions: usize,
    pub subscriptions: usize,
    pub reply_routes: usize,
    pub kicked: usize,
    pub histories: usize,
    /// Bytes of message bodies held, the total `max_queued_bytes` bounds.
    pub queued_bytes: u64,
}

/// What the broker has done since it started, for the metrics: plain integers,
/// since only the broker's own task ever writes them, and the shell reads them
/// through [`Broker::metrics`] on the same task. Copies are counted per recipient,
/// messages once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub published: u64,
    pub delivered: u64,
    pub acknowledged: u64,
    pub redelivered: u64,
    pub expired: u64,
    pub dropped: u64,
    pub dead_lettered: u64,
    /// By `ErrorKind as usize` (see [`ErrorKind::ALL`]).
    pub refused: [u64; ErrorKind::ALL.len()],
}

impl Counters {
    /// Counts what a reply says about its request: an accepted message, or a refusal.
    fn answered(&mut self, response: &Response) {
        match response {
            Response::Published {
                duplicate: false, ..
            }
            | Response::Sent {
                duplicate: false, ..
            } => self.published += 1,
            Response::Error(e) => self.refused[e.kind as usize] += 1,
            _ => {}
        }
    }
}

/// One stored copy's share of the broker's running byte total: added when the copy
/// is made, taken back when it is dropped. Tied to the copy's life rather than to
/// the code paths that remove messages (acks, x0 deliveries, expiry, drop_oldest,
/// kicks, purges, ...), so that no path can forget it, and O(1) either way. An
/// atomic only because the broker is moved into its task; it is never contended.
struct Charge {
    bytes: u64,
    total: Arc<AtomicU64>,
}

impl Charge {
    fn new(total: &Arc<AtomicU64>, body: &str) -> Self {
        let bytes = body.len() as u64;
        total.fetch_add(bytes, Ordering::Relaxed);
        Charge {
            bytes,
            total: total.clone(),
        }
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.total.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

struct Stored {
    message: Message,
    /// Storage identity: the id itself for an x0 message; for a message of the
    /// versioned API a number of its own per recipient, since copies of one
    /// fanned-out message share their id.
    seq: MessageId,
    /// The channel it came from, for that channel's per-subscriber limit.
    channel: Option<Arc<str>>,
    priority: i32,
    expires_at: Option<Instant>,
    /// Times it was handed out without being acknowledged (ack mode).
    deliveries: u32,
    /// The client may hold it from an earlier delivery (a visibility timeout, a
    /// restart, or a handler giving back what it wrote but saw no ack for put it
    /// back in line): only then may a cursor acknowledge it while it waits. Never
    /// given, a cursor past it (priorities, resumed history) must not make it vanish.
    given_before: bool,
    /// The publisher's key, kept so that a snapshot can write it back.
    key: Option<String>,
    /// When this process took it in, for the age an operator peeks at. Not stored:
    /// after a restart it counts from the recovery, which is worth less than a
    /// change of the log format.
    queued_at: Instant,
    /// Its body's bytes in the broker's total, for as long as it exists.
    #[expect(dead_code, reason = "held only for its Drop")]
    charge: Charge,
}

impl Stored {
    fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

struct InFlight {
    stored: Stored,
    /// The visibility timer of the batch it went out in.
    timer: TimerKey,
    /// The connection it went out on: if that handler dies, nobody will pass it on.
    conn: ConnId,
}

/// What an accepted message leaves behind besides its copies.
struct Memo {
    history: Option<(String, HistoryEntry, ChannelSettings)>,
    reply_route: Option<(String, Instant)>,
    key: Option<String>,
}

/// Bodies' bytes one peek answers with at most: half a frame, leaving the rest
/// for the other fields of each message.
const PEEK_MAX_BYTES: usize = ipc::MAX_FRAME_LEN / 2;

/// A generous bound on a [`SessionSummary`]'s encoding besides its strings.
const SUMMARY_OVERHEAD: usize = 64;

/// Longest time-to-live a message may ask for: about ten years.
const MAX_TTL_MS: u64 = 10 * 365 * 24 * 3600 * 1000;

/// A poll as the broker takes it.
struct Poll {
    session: String,
    timeout: Duration,
    ack_previous: bool,
    /// Most messages to give; 0 for all.
    max: usize,
}

struct Parked {
    to: ReplyTo,
    timer: TimerKey,
    /// Most messages its reply may carry; 0 for all.
    max: usize,
}

struct Mailbox {
    /// In id order, which is publish order.
    ready: VecDeque<Stored>,
    /// Only in `ack` mode: given out and not yet acknowledged.
    in_flight: BTreeMap<MessageId, InFlight>,
    /// At most one poll waits per session; a newer poll supersedes it.
    waiter: Option<Parked>,
    /// Last publish to, poll of or request from the session: an idle mailbox is
    /// forgotten after the idle timeout.
    last_active: Instant,
    /// Last request from the session itself, or end of its last poll.
    last_seen: Instant,
    /// The session is present (counts for broadcasts and presence) until it has been
    /// silent for the session timeout.
    joined: bool,
    /// Bound by the backend; user targets reach the session through it.
    user: Option<String>,
    /// Delivery is held: polls park and get nothing until resumed.
    paused: bool,
    /// Its entries in the broker's subscription index, to drop them when it leaves.
    subscriptions: Vec<Subscription>,
    /// No message in `ready` expires before this (None: none of them expires), so
    /// that the sweep passes over a mailbox with nothing due without reading its
    /// messages. Lowered as messages come; recomputed when expired ones are dropped.
    soonest_expiry: Option<Instant>,
}

impl Mailbox {
    fn new(now: Instant) -> Self {
        Mailbox {
            ready: VecDeque::new(),
            in_flight: BTreeMap::new(),
            waiter: None,
            last_active: now,
            last_seen: now,
            joined: false,
            user: None,
            paused: false,
            subscriptions: Vec::new(),
            soonest_expiry: None,
        }
    }

    /// Queues `stored` after everything in `ready`.
    fn push(&mut self, stored: Stored) {
        self.note_expiry(stored.expires_at);
        self.ready.push_back(stored);
    }

    fn note_expiry(&mut self, at: Option<Instant>) {
        if let Some(at) = at {
            self.soonest_expiry = Some(self.soonest_expiry.map_or(at, |t| t.min(at)));
        }
    }

    fn is_idle(&self) -> bool {
        self.ready.is_empty()
            && self.in_flight.is_empty()
            && self.waiter.is_none()
            && !self.joined
            && !self.paused
    }

    fn holds(&self, id: MessageId) -> bool {
        self.in_flight.contains_key(&id) || self.ready.iter().any(|s| s.message.id == id)
    }
}

/// A message that went to the dead-letter queue, with the mailbox it came from.
struct Dead {
    session: String,
    stored: Stored,
}

/// The sequence number makes keys unique when two timers share an instant.
type TimerKey = (Instant, u64);

enum Timer {
    PollTimeout {
        session: String,
    },
    Visibility {
        session: String,
        ids: Vec<MessageId>,
    },
}

/// Changes to stored state not yet taken by the shell. A memory-only broker keeps
/// none, so that mode pays nothing for durability.
struct Journal {
    durable: bool,
    records: Vec<Record>,
}

impl Journal {
    fn push(&mut self, record: impl FnOnce() -> Record) {
        if self.durable {
            self.records.push(record());
        }
    }

    fn removed(&mut self, ids: impl IntoIterator<Item = MessageId>) {
        if self.durable {
            let ids: Vec<MessageId> = ids.into_iter().collect();
            if !ids.is_empty() {
                self.records.push(Record::Removed { ids });
            }
        }
    }
}

pub struct Broker {
    config: BrokerConfig,
    clock: ClockAnchor,
    mailboxes: HashMap<String, Mailbox>,
    /// Parked polls by where their reply goes, so that a cancel or a dropped
    /// connection finds its session without scanning every mailbox.
    parked: HashMap<ReplyTo, String>,
    /// Ordered by deadline: the next one to fire is the first entry.
    timers: BTreeMap<TimerKey, Timer>,
    timer_seq: u64,
    next_message_id: MessageId,
    /// By storage id, so an operator sees the oldest first.
    dead: BTreeMap<MessageId, Dead>,
    /// Publish keys seen inside the dedup window: key → (id given, forget at).
    dedup: HashMap<String, (MessageId, Instant)>,
    journal: Journal,
    subscriptions: Subscriptions,
    /// Each user's bound sessions (sorted: fan-out order is stable).
    users: HashMap<String, BTreeSet<String>>,
    /// Kicked sessions and until when their requests are refused.
    kicked: HashMap<String, Instant>,
    /// RPC: replies referencing a message id go to this session until then.
    reply_routes: HashMap<MessageId, (String, Instant)>,
    /// Channels whose settings keep history, by channel name.
    histories: HashMap<String, History>,
    /// The highest id trimmed from a history that was since forgotten for being
    /// empty: resuming from before it cannot be known complete.
    forgotten_history: MessageId,
    /// From the configuration, once: whether `$sys` keeps history (events are then
    /// published with nobody subscribed) and whether any channel has a priority
    /// (batches are then sorted).
    system_history: bool,
    prioritised: bool,
    /// Bytes of every stored copy's body, kept by their [`Charge`]s.
    queued_bytes: Arc<AtomicU64>,
    counters: Counters,
    /// An operator is draining the core: new messages are refused. Not stored: a
    /// drain is for one maintenance of one process, and a restart (the usual end
    /// of a maintenance) should not leave a core refusing work.
    draining: bool,
}

impl Broker {
    /// A memory-only broker.
    pub fn new(config: BrokerConfig, clock: ClockAnchor) -> Self {
        Broker {
            clock,
            mailboxes: HashMap::new(),
            parked: HashMap::new(),
            timers: BTreeMap::new(),
            timer_seq: 0,
            // Wall-clock microseconds: ids keep increasing across restarts even
            // though nothing is stored, so a client's cursor never acks a newer message.
            next_message_id: clock.unix_ms.saturating_mul(1000).max(1),
            dead: BTreeMap::new(),
            dedup: HashMap::new(),
            journal: Journal {
                durable: false,
                records: Vec::new(),
            },
            subscriptions: Subscriptions::default(),
            users: HashMap::new(),
            kicked: HashMap::new(),
            reply_routes: HashMap::new(),
            histories: HashMap::new(),
            forgotten_history: 0,
            system_history: config
                .channels
                .iter()
                .any(|s| s.history_len > 0 && s.pattern.matches(SYSTEM_CHANNEL)),
            prioritised: config.channels.iter().any(|s| s.priority != 0),
            queued_bytes: Arc::new(AtomicU64::new(0)),
            counters: Counters::default(),
            draining: false,
            config,
        }
        .with_history_from_now()
    }

    /// History starts empty: nothing before the first id this broker gives can be
    /// vouched for on resume (after a restart, what the old process kept is gone).
    fn with_history_from_now(mut self) -> Self {
        self.forgotten_history = self.next_message_id.saturating_sub(1);
        self
    }

    /// A durable broker rebuilt from what storage recovered. Everything that was in
    /// flight is ready again; what expired while the core was down is dropped.
    pub fn restore(
        config: BrokerConfig,
        clock: ClockAnchor,
        recovered: Recovered,
        now: Instant,
    ) -> Self {
        let mut broker = Broker::new(config, clock);
        broker.journal.durable = true;
        broker.next_message_id = broker.next_message_id.max(recovered.next_id);
        let window = broker.config.dedup_window;
        let now_ms = clock.unix_ms_at(now);
        let mut expired = Vec::new();
        let mut routing = recovered.routing;
        for (seq, (message, dead)) in recovered.messages {
            let id = message.id;
            let expires_at = message.expires_ms.map(|ms| clock.instant_at(ms));
            if message.expires_ms.is_some_and(|ms| ms <= now_ms) && !dead {
                expired.push(seq);
                continue;
            }
            if let Some(key) = &message.key {
                broker.dedup.insert(key.clone(), (id, now + window));
            }
            let (channel, priority) = routing.remove(&seq).unwrap_or((None, 0));
            // Counted like any other, even past max_queued_bytes: it was accepted.
            let charge = Charge::new(&broker.queued_bytes, &message.body);
            let stored = Stored {
                message: Message {
                    id,
                    body: message.body,
                },
                seq,
                channel: channel.map(Arc::from),
                priority,
                expires_at,
                deliveries: 0,
                given_before: true,
                key: message.key,
                queued_at: now,
                charge,
            };
            if dead {
                broker.dead.insert(
                    seq,
                    Dead {
                        session: message.session,
                        stored,
                    },
                );
            } else {
                broker
                    .mailboxes
                    .entry(message.session)
                    .or_insert_with(|| Mailbox::new(now))
                    .push(stored);
            }
        }
        broker.journal.removed(expired);
        // Storage order is queueing order; a copy recovered from channel history
        // carries an older id than what was queued before it.
        for mailbox in broker.mailboxes.values_mut() {
            mailbox
                .ready
                .make_contiguous()
                .sort_by_key(|s| s.message.id);
        }
        for (session, state) in recovered.sessions {
            let mailbox = mailbox_of(&mut broker.mailboxes, &session, now);
            // Present again; one that does not come back leaves after the timeout.
            mailbox.joined = true;
            mailbox.paused = state.paused;
            mailbox.user = state.user.clone();
            if let Some(user) = state.user {
                broker
                    .users
                    .entry(user)
                    .or_default()
                    .insert(session.clone());
            }
            for stored in state.subscriptions {
                let subscription = Subscription {
                    channel: stored.channel,
                    subject: stored.subject,
                    group: stored.group,
                };
                if broker.subscriptions.add(&session, &subscription).is_ok() {
                    let mailbox = broker.mailboxes.get_mut(&session).expect("created above");
                    mailbox.subscriptions.push(subscription);
                }
            }
        }
        for (session, until_ms) in recovered.kicked {
            if until_ms > now_ms {
                broker.kicked.insert(session, clock.instant_at(until_ms));
            }
        }
        broker = broker.with_history_from_now();
        for (key, (id, until_ms)) in recovered.dedup {
            if until_ms > now_ms {
                broker
                    .dedup
                    .entry(key)
                    .or_insert((id, clock.instant_at(until_ms)));
            }
        }
        broker
    }

    pub fn stats(&self) -> Stats {
        Stats {
            mailboxes: self.mailboxes.len(),
            ready: self.mailboxes.values().map(|m| m.ready.len()).sum(),
            in_flight: self.mailboxes.values().map(|m| m.in_flight.len()).sum(),
            parked_polls: self.parked.len(),
            pending_timers: self.timers.len(),
            dead_letters: self.dead.len(),
            dedup_keys: self.dedup.len(),
            sessions: self.mailboxes.values().filter(|m| m.joined).count(),
            subscriptions: self.mailboxes.values().map(|m| m.subscriptions.len()).sum(),
            reply_routes: self.reply_routes.len(),
            kicked: self.kicked.len(),
            histories: self.histories.len(),
            queued_bytes: self.queued_bytes(),
        }
    }

    /// The counters since start and the current state, for a metrics scrape. Walks
    /// every mailbox (as [`Broker::stats`] does): once per scrape, not per message.
    /// Storage is the shell's to add.
    pub fn metrics(&self) -> ipc::CoreMetrics {
        let c = &self.counters;
        let stats = self.stats();
        ipc::CoreMetrics {
            published: c.published,
            delivered: c.delivered,
            acknowledged: c.acknowledged,
            redelivered: c.redelivered,
            expired: c.expired,
            dropped: c.dropped,
            dead_lettered: c.dead_lettered,
            refused: ErrorKind::ALL
                .iter()
                .map(|kind| (*kind, c.refused[*kind as usize]))
                .collect(),
            ready: stats.ready as u64,
            in_flight: stats.in_flight as u64,
            dead_letters: stats.dead_letters as u64,
            mailboxes: stats.mailboxes as u64,
            sessions: stats.sessions as u64,
            parked_polls: stats.parked_polls as u64,
            queued_bytes: stats.queued_bytes,
            storage: None,
        }
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    /// The running total `max_queued_bytes` bounds; O(1).
    pub fn queued_bytes(&self) -> u64 {
        self.queued_bytes.load(Ordering::Relaxed)
    }

    /// The refusal of a message that would take `needed` more bytes, if it would
    /// go over `max_queued_bytes`.
    fn over_queued_bytes(&self, needed: u64) -> Option<Response> {
        let max = self.config.max_queued_bytes;
        let held = self.queued_bytes();
        (max > 0 && held.saturating_add(needed) > max).then(|| {
            Response::error(
                ErrorKind::Overloaded,
                format!(
                    "the core holds {held} bytes of undelivered messages and this one needs \
                     {needed} more, over max_queued_bytes ({max}); nothing was stored, retry \
                     once messages are delivered"
                ),
            )
        })
    }

    /// The refusal of a request that would create a session beyond `max_sessions`,
    /// if it would. Sessions the core holds keep working; giving messages back
    /// (`Return`) is never refused, since that would lose them.
    fn over_max_sessions(&self, request: &Request) -> Option<Response> {
        let max = self.config.max_sessions;
        if max == 0 || self.mailboxes.len() < max || matches!(request, Request::Return { .. }) {
            return None;
        }
        // The sessions the request would give a mailbox: an x0 publish's source
        // gets none, a message of the versioned API touches its source.
        let creates = match request {
            Request::Publish { dst, .. } => [Some(dst.as_str()), None],
            Request::Send(send) => [
                send.src.as_deref(),
                match &send.target {
                    Some(Target::Session(session)) => Some(session.as_str()),
                    _ => None,
                },
            ],
            other => [acting_session(other), None],
        };
        let new = creates
            .into_iter()
            .flatten()
            .find(|session| !self.mailboxes.contains_key(*session))?;
        Some(Response::error(
            ErrorKind::Overloaded,
            format!(
                "the core holds {} sessions, its max_sessions; session {new:?} cannot be \
                 started until some go away",
                self.mailboxes.len()
            ),
        ))
    }

    /// About what a snapshot of everything stored takes on disk. Walks every
    /// message: for the compaction check, which runs only once the log is large.
    pub fn stored_bytes(&self) -> u64 {
        // Record framing, id, expiry and the bincode lengths.
        const OVERHEAD: usize = 32;
        let size = |session: &str, s: &Stored| {
            (OVERHEAD
                + session.len()
                + s.message.body.len()
                + s.key.as_ref().map_or(0, String::len)) as u64
        };
        let mut total = 0;
        for (session, mailbox) in &self.mailboxes {
            total += mailbox.ready.iter().map(|s| size(session, s)).sum::<u64>();
            total += mailbox
                .in_flight
                .values()
                .map(|f| size(session, &f.stored))
                .sum::<u64>();
        }
        total += self
            .dead
            .values()
            .map(|d| size(&d.session, &d.stored))
            .sum::<u64>();
        total
            + self
                .dedup
                .keys()
                .map(|k| (OVERHEAD + k.len()) as u64)
                .sum::<u64>()
    }

    /// When [`Broker::tick`] next has work to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.keys().next().map(|(at, _)| *at)
    }

    /// The records written since the last call.
    pub fn take_journal(&mut self) -> Vec<Record> {
        std::mem::take(&mut self.journal.records)
    }

    /// The whole stored state as records, for compaction: replaying them gives the
    /// state the journal has described so far.
    pub fn snapshot(&self) -> Vec<Record> {
        let mut records = vec![Record::Meta {
            next_id: self.next_message_id,
        }];
        let put = |session: &str, stored: &Stored| record_of(self.clock, session, stored);
        for (session, mailbox) in &self.mailboxes {
            records.extend(mailbox.ready.iter().map(|s| put(session, s)));
            records.extend(mailbox.in_flight.values().map(|f| put(session, &f.stored)));
        }
        records.extend(self.dead.values().map(|d| put(&d.session, &d.stored)));
        if !self.dead.is_empty() {
            records.push(Record::DeadLettered {
                ids: self.dead.values().map(|d| d.stored.seq).collect(),
            });
        }
        // Kicks first: state a session holds now is newer than any kick of it (a
        // kick clears it), and replaying a kick clears the state.
        records.extend(self.kicked.iter().map(|(session, until)| Record::Kicked {
            session: session.clone(),
            until_ms: self.clock.unix_ms_at(*until),
        }));
        for (session, mailbox) in &self.mailboxes {
            records.extend(session_records(session, mailbox));
        }
        records.extend(self.dedup.iter().map(|(key, (id, until))| Record::Dedup {
            key: key.clone(),
            id: *id,
            until_ms: self.clock.unix_ms_at(*until),
        }));
        records
    }

    pub fn handle(&mut self, now: Instant, from: ReplyTo, request: Request, out: &mut Vec<Reply>) {
        if let Some(session) = acting_session(&request)
            && self.is_kicked(now, session)
        {
            let response = kicked_error(session);
            self.counters.answered(&response);
            out.push(Reply { to: from, response });
            return;
        }
        if self.draining && matches!(request, Request::Publish { .. } | Request::Send(_)) {
            let response = Response::error(
                ErrorKind::Draining,
                "the message server is draining for maintenance and takes no new messages; \
                 retry later",
            );
            out.push(Reply { to: from, response });
            return;
        }
        if let Some(response) = self.over_max_sessions(&request) {
            self.counters.answered(&response);
            out.push(Reply { to: from, response });
            return;
        }
        let response = match request {
            Request::Ping => Response::Pong,
            Request::Publish {
                src,
                dst,
                body,
                key,
            } => self.publish(now, &src, dst, body, key, out),
            Request::Poll {
                session,
                timeout_ms,
                ack_previous,
                max,
            } => {
                let poll = Poll {
                    session,
                    timeout: Duration::from_millis(timeout_ms),
                    ack_previous,
                    max: max as usize,
                };
                match self.poll(now, from, poll, out) {
                    Some(response) => response,
                    None => return, // parked: answered later
                }
            }
            Request::CancelPoll { poll } => {
                self.cancel(
                    ReplyTo {
                        conn: from.conn,
                        request: poll,
                    },
                    out,
                );
                Response::Done
            }
            Request::Ack { session, which } => {
                self.touch(now, &session, out);
                self.ack(now, &session, &which)
            }
            Request::Return { session, messages } => {
                self.return_messages(now, session, messages, out);
                Response::Done
            }
            Request::DeadLetters(op) => self.dead_letters(now, op, out),
            Request::Send(send) => self.send(now, *send, out),
            Request::Subscribe {
                session,
                subscription,
                since,
            } => self.subscribe(now, &session, subscription, since, out),
            Request::Unsubscribe {
                session,
                subscription,
            } => self.unsubscribe(now, &session, &subscription, out),
            Request::AwaitReply {
                session,
                reference,
                ttl_ms,
            } => {
                self.touch(now, &session, out);
                let ttl = Duration::from_millis(ttl_ms).min(self.config.max_reply_ttl);
                self.reply_routes.insert(reference, (session, now + ttl));
                Response::Done
            }
            Request::SetPaused { session, paused } => {
                self.touch(now, &session, out);
                self.mailboxes.get_mut(&session).expect("touched").paused = paused;
                self.journal.push(|| Record::Paused {
                    session: session.clone(),
                    paused,
                });
                if !paused {
                    self.deliver_if_waiting(now, &session, out);
                }
                Response::Done
            }
            Request::Presence { channel } => {
                let present = self
                    .subscriptions
                    .present(&channel)
                    .into_iter()
                    .map(|session| Present {
                        user: self.mailboxes.get(&session).and_then(|m| m.user.clone()),
                        session,
                    })
                    .collect();
                Response::Presence(present)
            }
            Request::Bind {
                session,
                user,
                exclusive,
            } => self.bind(now, session, user, exclusive, out),
            Request::Kick { session, reason } => {
                self.kick(now, &session, &reason, out);
                Response::Done
            }
            Request::Admin(request) => self.admin(now, request, out),
            Request::Release { session } => {
                self.touch(now, &session, out);
                let mailbox = self.mailboxes.get_mut(&session).expect("touched");
                let ids: Vec<MessageId> = mailbox.in_flight.keys().copied().collect();
                Response::Count(self.give_back(now, &session, &ids, out) as u64)
            }
            Request::Metrics => Response::Metrics(Box::new(self.metrics())),
        };
        self.counters.answered(&response);
        out.push(Reply { to: from, response });
    }

    fn is_kicked(&self, now: Instant, session: &str) -> bool {
        // On the hot path of every request: skip hashing while nobody is kicked.
        !self.kicked.is_empty() && self.kicked.get(session).is_some_and(|until| *until > now)
    }

    fn next_id(&mut self) -> MessageId {
        let id = self.next_message_id;
        self.next_message_id += 1;
        id
    }

    /// A request from `session` itself: it is present (joined) from now on, until
    /// it has been silent for the session timeout.
    fn touch(&mut self, now: Instant, session: &str, out: &mut Vec<Reply>) {
        let mailbox = mailbox_of(&mut self.mailboxes, session, now);
        mailbox.last_active = now;
        mailbox.last_seen = now;
        if !mailbox.joined {
            mailbox.joined = true;
            let user = mailbox.user.clone();
            let data = || session_event(session, user.as_deref(), None);
            self.emit(now, "session.joined", data, out);
        }
    }

    /// A system event on the reserved channel, for whoever subscribed to it.
    fn emit(
        &mut self,
        now: Instant,
        subject: &str,
        data: impl FnOnce() -> String,
        out: &mut Vec<Reply>,
    ) {
        // The usual case: nobody listens and nothing keeps history, so no id, no
        // envelope, not even the event's JSON.
        if !self.system_history && !self.subscriptions.reaches(SYSTEM_CHANNEL) {
            return;
        }
        let data = data();
        let send = Send {
            src: None,
            target: Some(Target::Channel(SYSTEM_CHANNEL.to_owned())),
            subject: Some(subject.to_owned()),
            reference: None,
            data,
            ttl_ms: None,
            key: None,
            expect_reply_ms: None,
        };
        let _ = self.route_message(now, send, out);
    }

    /// A message of the versioned API from a handler.
    fn send(&mut self, now: Instant, send: Send, out: &mut Vec<Reply>) -> Response {
        if let Some(Target::Channel(channel)) = &send.target {
            if channel.starts_with('$') {
                return Response::error(
                    ErrorKind::InvalidRequest,
                    format!("channel {channel:?} is reserved for the core"),
                );
            }
            if let Err(e) = routing::check_channel_name(channel) {
                return Response::error(ErrorKind::InvalidRequest, e);
            }
        }
        if let Some(src) = &send.src {
            self.touch(now, src, out);
        }
        self.route_message(now, send, out)
    }

    fn route_message(&mut self, now: Instant, send: Send, out: &mut Vec<Reply>) -> Response {
        // Scoped by sender (the backend has none), as for x0 publishes.
        let key = send
            .key
            .as_ref()
            .map(|key| format!("{}\u{0}{key}", send.src.as_deref().unwrap_or("")));
        if let Some(key) = &key
            && let Some(&(id, until)) = self.dedup.get(key)
            && until > now
        {
            return Response::Sent {
                id,
                recipients: 0,
                dropped: 0,
                duplicate: true,
            };
        }
        let mut channel = None;
        let (recipients, target_json) = match &send.target {
            Some(Target::Session(session)) => {
                if self.is_kicked(now, session) {
                    return kicked_error(session);
                }
                (vec![session.clone()], object("session", session))
            }
            Some(Target::User(user)) => (
                self.users
                    .get(user)
                    .map(|s| s.iter().cloned().collect())
                    .unwrap_or_default(),
                object("user", user),
            ),
            Some(Target::Broadcast) => {
                let mut everyone: Vec<String> = self
                    .mailboxes
                    .iter()
                    .filter(|(_, m)| m.joined)
                    .map(|(s, _)| s.clone())
                    .collect();
                everyone.sort_unstable();
                (everyone, r#"{"broadcast":true}"#.to_owned())
            }
            Some(Target::Channel(name)) => {
                let mailboxes = &self.mailboxes;
                let subject = send.subject.as_deref();
                let recipients = self.subscriptions.route(name, subject, |s| {
                    mailboxes.get(s).is_some_and(|m| m.paused)
                });
                channel = Some(name.clone());
                (recipients, object("channel", name))
            }
            None => {
                let Some(reference) = send.reference else {
                    return Response::error(
                        ErrorKind::InvalidRequest,
                        "a message without a target is a reply and needs a reference",
                    );
                };
                match self.reply_routes.get(&reference) {
                    Some((session, until)) if *until > now && !self.is_kicked(now, session) => {
                        (vec![session.clone()], object("session", session))
                    }
                    _ => {
                        return Response::error(
                            ErrorKind::NoRoute,
                            format!(
                                "no session awaits replies to message {reference} (never asked for, or expired)"
                            ),
                        );
                    }
                }
            }
        };
        let id = self.next_id();
        let body = envelope(id, self.clock.unix_ms_at(now), &send, &target_json);
        if body.len() > self.config.max_payload_bytes {
            return Response::error(
                ErrorKind::PayloadTooLarge,
                format!(
                    "message of {} bytes is over the limit of {} bytes",
                    body.len(),
                    self.config.max_payload_bytes
                ),
            );
        }
        // Every copy counts; refused whole, so that no recipient gets a message
        // others were refused.
        if let Some(refusal) =
            self.over_queued_bytes((body.len() as u64).saturating_mul(recipients.len() as u64))
        {
            return refusal;
        }
        let settings = channel
            .as_deref()
            .and_then(|c| self.config.channels.iter().find(|s| s.pattern.matches(c)))
            .cloned();
        // Remembered only once the message is accepted: a refused one must not be
        // resumed from history, answered, or taken for a duplicate when retried.
        let memo = Memo {
            history: match (&channel, &settings) {
                (Some(name), Some(settings)) if settings.history_len > 0 => Some((
                    name.clone(),
                    HistoryEntry {
                        id,
                        at: now,
                        subject: send.subject.clone(),
                        body: body.clone(),
                    },
                    settings.clone(),
                )),
                _ => None,
            },
            reply_route: match (send.expect_reply_ms, &send.src) {
                (Some(ms), Some(src)) => {
                    let ttl = Duration::from_millis(ms).min(self.config.max_reply_ttl);
                    Some((src.clone(), now + ttl))
                }
                _ => None,
            },
            key: key.clone(),
        };
        // Capped so that no expiry overflows (a decade is "never" for a mailbox).
        let ttl = send
            .ttl_ms
            .map(|ms| Duration::from_millis(ms.min(MAX_TTL_MS)))
            .or(self.config.message_ttl);
        let expires_at = ttl.map(|ttl| now + ttl);
        let channel: Option<Arc<str>> = channel.map(Arc::from);
        let priority = settings.as_ref().map_or(0, |s| s.priority);
        let max_pending = settings.as_ref().map_or(0, |s| s.max_pending);
        if recipients.len() == 1 {
            // One recipient, the usual case: the response can carry its refusal.
            let charge = Charge::new(&self.queued_bytes, &body);
            let stored = Stored {
                message: Message { id, body },
                seq: id,
                channel,
                priority,
                expires_at,
                deliveries: 0,
                given_before: false,
                key,
                queued_at: now,
                charge,
            };
            return match self.enqueue(now, &recipients[0], stored, max_pending, out) {
                Ok(dropped) => {
                    self.remember(now, id, memo);
                    Response::Sent {
                        id,
                        recipients: 1,
                        dropped,
                        duplicate: false,
                    }
                }
                Err(refusal) => refusal,
            };
        }
        self.remember(now, id, memo);
        let mut queued = 0;
        let mut dropped = 0;
        for (i, session) in recipients.iter().enumerate() {
            let seq = if i == 0 { id } else { self.next_id() };
            let stored = Stored {
                message: Message {
                    id,
                    body: body.clone(),
                },
                seq,
                channel: channel.clone(),
                priority,
                expires_at,
                deliveries: 0,
                given_before: false,
                key: key.clone(),
                queued_at: now,
                charge: Charge::new(&self.queued_bytes, &body),
            };
            match self.enqueue(now, session, stored, max_pending, out) {
                Ok(n) => {
                    queued += 1;
                    dropped += n;
                }
                // A full mailbox under the reject policy refuses its own copy only.
                Err(_) => dropped += 1,
            }
        }
        Response::Sent {
            id,
            recipients: queued,
            dropped,
            duplicate: false,
        }
    }

    fn remember(&mut self, now: Instant, id: MessageId, memo: Memo) {
        if let Some((name, entry, settings)) = memo.history {
            self.histories
                .entry(name)
                .or_default()
                .push(entry, &settings, now);
        }
        if let Some(route) = memo.reply_route {
            self.reply_routes.insert(id, route);
        }
        if let Some(key) = memo.key {
            self.dedup.insert(key, (id, now + self.config.dedup_window));
        }
    }

    /// Queues one copy for `session`, making room as the limits say; returns how
    /// many older messages were dropped, or the refusal under the reject policy.
    fn enqueue(
        &mut self,
        now: Instant,
        session: &str,
        stored: Stored,
        max_pending: usize,
        out: &mut Vec<Reply>,
    ) -> Result<u32, Response> {
        let mailbox = mailbox_of(&mut self.mailboxes, session, now);
        mailbox.last_active = now;
        drop_expired(mailbox, now, &mut self.journal, &mut self.counters);
        let mut dropped = Vec::new();
        // Counting is a scan, so only when the mailbox holds enough to be over.
        if max_pending > 0 && stored.channel.is_some() && mailbox.ready.len() >= max_pending {
            let same = |s: &Stored| s.channel == stored.channel;
            if mailbox.ready.iter().filter(|s| same(s)).count() >= max_pending
                && let Some(oldest) = mailbox.ready.iter().position(same)
            {
                dropped.push(mailbox.ready.remove(oldest).expect("found").seq);
            }
        }
        if mailbox.ready.len() >= self.config.mailbox_max_len {
            match self.config.overflow {
                OverflowPolicy::Reject => {
                    self.journal.removed(dropped);
                    return Err(Response::error(
                        ErrorKind::MailboxFull,
                        format!(
                            "the mailbox of session {session:?} holds {} undelivered messages, its limit",
                            mailbox.ready.len()
                        ),
                    ));
                }
                OverflowPolicy::DropOldest => {
                    while mailbox.ready.len() >= self.config.mailbox_max_len.max(1) {
                        dropped.push(mailbox.ready.pop_front().expect("over the limit").seq);
                    }
                }
            }
        }
        let count = dropped.len() as u32;
        self.counters.dropped += u64::from(count);
        self.journal.removed(dropped);
        let clock = self.clock;
        self.journal.push(|| copy_record(clock, session, &stored));
        if mailbox
            .ready
            .back()
            .is_none_or(|last| last.message.id < stored.message.id)
        {
            mailbox.push(stored);
        } else {
            merge_in_order(mailbox, vec![stored]);
        }
        self.deliver_if_waiting(now, session, out);
        Ok(count)
    }

    fn subscribe(
        &mut self,
        now: Instant,
        session: &str,
        subscription: Subscription,
        since: Option<MessageId>,
        out: &mut Vec<Reply>,
    ) -> Response {
        if since.is_some() && subscription.group.is_some() {
            return Response::error(
                ErrorKind::InvalidRequest,
                "since cannot be combined with a group: a group's members share what comes, not what was",
            );
        }
        let change = match self.subscriptions.add(session, &subscription) {
            Ok(change) => change,
            Err(e) => return Response::error(ErrorKind::InvalidRequest, e),
        };
        self.touch(now, session, out);
        if change != Change::Nothing {
            let mailbox = self.mailboxes.get_mut(session).expect("touched");
            mailbox.subscriptions.push(subscription.clone());
            self.journal.push(|| Record::Subscribed {
                session: session.to_owned(),
                subscription: stored_subscription(&subscription),
            });
        }
        if change == Change::Created && !subscription.channel.starts_with('$') {
            self.emit(
                now,
                "channel.created",
                || object("channel", &subscription.channel),
                out,
            );
        }
        let Some(since) = since else {
            return Response::Subscribed {
                recovered: 0,
                complete: true,
            };
        };
        self.resume(now, session, &subscription, since, out)
    }

    /// Queues what the history of channels matching the subscription holds after
    /// `since`, leaving out what the session holds already.
    fn resume(
        &mut self,
        now: Instant,
        session: &str,
        subscription: &Subscription,
        since: MessageId,
        out: &mut Vec<Reply>,
    ) -> Response {
        let pattern = routing::Pattern::parse(&subscription.channel).expect("added above");
        let subject = subscription
            .subject
            .as_deref()
            .map(|s| routing::Pattern::parse(s).expect("added above"));
        let mut complete = since >= self.forgotten_history;
        if pattern.is_literal() {
            complete &= self
                .config
                .channels
                .iter()
                .find(|s| s.pattern.matches(&subscription.channel))
                .is_some_and(|s| s.history_len > 0);
        }
        let mut found = Vec::new();
        for (name, history) in &mut self.histories {
            if !pattern.matches(name) {
                continue;
            }
            let settings = self
                .config
                .channels
                .iter()
                .find(|s| s.pattern.matches(name));
            if let Some(settings) = settings {
                history.expire(settings, now);
            }
            complete &= history.trimmed_to <= since;
            for entry in history.entries.iter().filter(|e| e.id > since) {
                let subject_ok = match (&subject, &entry.subject) {
                    (None, _) => true,
                    (Some(p), Some(s)) => p.matches(s),
                    (Some(_), None) => false,
                };
                if subject_ok {
                    let settings = settings.expect("a history exists only under settings");
                    found.push((
                        entry.id,
                        entry.body.clone(),
                        name.clone(),
                        settings.priority,
                    ));
                }
            }
        }
        let mailbox = self.mailboxes.get(session).expect("touched");
        found.retain(|(id, ..)| !mailbox.holds(*id));
        found.sort_by_key(|(id, ..)| *id);
        // Copies like any publish: the oldest that fit max_queued_bytes are given,
        // and the client hears that something may be missing.
        let mut room = match self.config.max_queued_bytes {
            0 => u64::MAX,
            max => max.saturating_sub(self.queued_bytes()),
        };
        let before = found.len();
        found.retain(|(_, body, ..)| {
            let fits = body.len() as u64 <= room;
            if fits {
                room -= body.len() as u64;
            } else {
                room = 0; // none newer either: what is given stays a prefix
            }
            fits
        });
        complete &= found.len() == before;
        let recovered = found.len() as u32;
        let expires_at = self.config.message_ttl.map(|ttl| now + ttl);
        let mut back = Vec::with_capacity(found.len());
        for (id, body, channel, priority) in found {
            let charge = Charge::new(&self.queued_bytes, &body);
            let stored = Stored {
                message: Message { id, body },
                seq: self.next_id(),
                channel: Some(Arc::from(channel)),
                priority,
                expires_at,
                deliveries: 0,
                given_before: false,
                key: None,
                queued_at: now,
                charge,
            };
            let clock = self.clock;
            self.journal.push(|| copy_record(clock, session, &stored));
            back.push(stored);
        }
        let mailbox = self.mailboxes.get_mut(session).expect("touched");
        merge_in_order(mailbox, back);
        self.deliver_if_waiting(now, session, out);
        Response::Subscribed {
            recovered,
            complete,
        }
    }

    fn unsubscribe(
        &mut self,
        now: Instant,
        session: &str,
        subscription: &Subscription,
        out: &mut Vec<Reply>,
    ) -> Response {
        self.touch(now, session, out);
        let change = self.subscriptions.remove(session, subscription);
        if change == Change::Nothing {
            return Response::Count(0);
        }
        let mailbox = self.mailboxes.get_mut(session).expect("touched");
        mailbox.subscriptions.retain(|s| s != subscription);
        self.journal.push(|| Record::Unsubscribed {
            session: session.to_owned(),
            subscription: stored_subscription(subscription),
        });
        if change == Change::Removed && !subscription.channel.starts_with('$') {
            self.emit(
                now,
                "channel.removed",
                || object("channel", &subscription.channel),
                out,
            );
        }
        Response::Count(1)
    }

    fn bind(
        &mut self,
        now: Instant,
        session: String,
        user: String,
        exclusive: bool,
        out: &mut Vec<Reply>,
    ) -> Response {
        let mailbox = self
            .mailboxes
            .entry(session.clone())
            .or_insert_with(|| Mailbox::new(now));
        let previous = mailbox.user.replace(user.clone());
        if let Some(previous) = &previous
            && *previous != user
        {
            self.unbind_user(previous, &session);
        }
        self.users
            .entry(user.clone())
            .or_default()
            .insert(session.clone());
        // msghandler binds a token's session again every half minute: the same
        // binding again is not worth a record.
        if previous.as_ref() != Some(&user) {
            self.journal.push(|| Record::Bound {
                session: session.clone(),
                user: user.clone(),
            });
        }
        self.touch(now, &session, out);
        let mut kicked = 0;
        if exclusive {
            let others: Vec<String> = self.users[&user]
                .iter()
                .filter(|s| **s != session)
                .cloned()
                .collect();
            for other in others {
                self.kick(now, &other, "another session of this user took over", out);
                kicked += 1;
            }
        }
        Response::Count(kicked)
    }

    fn unbind_user(&mut self, user: &str, session: &str) {
        if let Some(sessions) = self.users.get_mut(user) {
            sessions.remove(session);
            if sessions.is_empty() {
                self.users.remove(user);
            }
        }
    }

    /// Ends a session for good: its poll is told, its messages and subscriptions
    /// go, and its requests are refused for the kick retention.
    /// Returns how many messages it dropped.
    fn kick(&mut self, now: Instant, session: &str, reason: &str, out: &mut Vec<Reply>) -> usize {
        let until = now + self.config.kick_retention;
        let mut dropped = 0;
        self.kicked.insert(session.to_owned(), until);
        let clock = self.clock;
        let user = self.mailboxes.get(session).and_then(|m| m.user.clone());
        self.leave(now, session, false, out);
        if let Some(mut mailbox) = self.mailboxes.remove(session) {
            if let Some(parked) = mailbox.waiter.take() {
                self.timers.remove(&parked.timer);
                self.parked.remove(&parked.to);
                out.push(Reply {
                    to: parked.to,
                    response: kicked_error(session),
                });
            }
            let ids: Vec<MessageId> = mailbox.in_flight.keys().copied().collect();
            let in_flight = take_in_flight(&mut mailbox, &mut self.timers, &ids);
            dropped = in_flight.len() + mailbox.ready.len();
            self.journal.removed(
                in_flight
                    .iter()
                    .chain(mailbox.ready.iter())
                    .map(|s| s.seq)
                    .collect::<Vec<_>>(),
            );
        }
        // After the Left that leave() wrote, so that a replay ends kicked.
        self.journal.push(|| Record::Kicked {
            session: session.to_owned(),
            until_ms: clock.unix_ms_at(until),
        });
        let data = || session_event(session, user.as_deref(), Some(reason));
        self.emit(now, "session.kicked", data, out);
        dropped
    }

    /// The session is no longer present: its subscriptions and user binding go
    /// (its messages stay until they expire or it comes back).
    fn leave(&mut self, now: Instant, session: &str, announce: bool, out: &mut Vec<Reply>) {
        let Some(mailbox) = self.mailboxes.get_mut(session) else {
            return;
        };
        let was_joined = std::mem::take(&mut mailbox.joined);
        let had_state =
            mailbox.paused || mailbox.user.is_some() || !mailbox.subscriptions.is_empty();
        mailbox.paused = false;
        let subscriptions = std::mem::take(&mut mailbox.subscriptions);
        let user = mailbox.user.take();
        if had_state {
            self.journal.push(|| Record::Left {
                session: session.to_owned(),
            });
        }
        if let Some(user) = &user {
            self.unbind_user(user, session);
        }
        for subscription in subscriptions {
            if self.subscriptions.remove(session, &subscription) == Change::Removed
                && !subscription.channel.starts_with('$')
            {
                self.emit(
                    now,
                    "channel.removed",
                    || object("channel", &subscription.channel),
                    out,
                );
            }
        }
        if was_joined && announce {
            let data = || session_event(session, user.as_deref(), None);
            self.emit(now, "session.left", data, out);
        }
    }

    fn publish(
        &mut self,
        now: Instant,
        src: &str,
        dst: String,
        body: String,
        key: Option<String>,
        out: &mut Vec<Reply>,
    ) -> Response {
        if body.len() > self.config.max_payload_bytes {
            return Response::error(
                ErrorKind::PayloadTooLarge,
                format!(
                    "message of {} bytes is over the limit of {} bytes",
                    body.len(),
                    self.config.max_payload_bytes
                ),
            );
        }
        // Scoped by sender, so that two clients choosing the same id do not collide.
        let key = key.map(|key| format!("{src}\u{0}{key}"));
        if let Some(key) = &key
            && let Some(&(id, until)) = self.dedup.get(key)
            && until > now
        {
            return Response::Published {
                id,
                dropped: 0,
                duplicate: true,
            };
        }
        if self.is_kicked(now, &dst) {
            return kicked_error(&dst);
        }
        // Checked before drop_oldest could make room in a full mailbox: simpler, and
        // under pressure refusing is as right as dropping.
        if let Some(refusal) = self.over_queued_bytes(body.len() as u64) {
            return refusal;
        }
        let mailbox = self
            .mailboxes
            .entry(dst.clone())
            .or_insert_with(|| Mailbox::new(now));
        mailbox.last_active = now;
        drop_expired(mailbox, now, &mut self.journal, &mut self.counters);
        let mut dropped = Vec::new();
        if mailbox.ready.len() >= self.config.mailbox_max_len {
            match self.config.overflow {
                OverflowPolicy::Reject => {
                    return Response::error(
                        ErrorKind::MailboxFull,
                        format!(
                            "the mailbox of session {dst:?} holds {} undelivered messages, its limit",
                            mailbox.ready.len()
                        ),
                    );
                }
                OverflowPolicy::DropOldest => {
                    while mailbox.ready.len() >= self.config.mailbox_max_len.max(1) {
                        let oldest = mailbox.ready.pop_front().expect("over the limit");
                        dropped.push(oldest.seq);
                    }
                }
            }
        }
        let dropped_count = dropped.len() as u32;
        self.counters.dropped += u64::from(dropped_count);
        self.journal.removed(dropped);
        let id = self.next_message_id;
        self.next_message_id += 1;
        let expires_at = self.config.message_ttl.map(|ttl| now + ttl);
        if let Some(key) = &key {
            self.dedup
                .insert(key.clone(), (id, now + self.config.dedup_window));
        }
        let charge = Charge::new(&self.queued_bytes, &body);
        let stored = Stored {
            message: Message { id, body },
            seq: id,
            channel: None,
            priority: 0,
            expires_at,
            deliveries: 0,
            given_before: false,
            key,
            queued_at: now,
            charge,
        };
        let clock = self.clock;
        self.journal.push(|| record_of(clock, &dst, &stored));
        mailbox.push(stored);
        self.deliver_if_waiting(now, &dst, out);
        Response::Published {
            id,
            dropped: dropped_count,
            duplicate: false,
        }
    }

    /// Answers at once when there is something to give, else parks the poll and
    /// returns `None`.
    fn poll(
        &mut self,
        now: Instant,
        from: ReplyTo,
        poll: Poll,
        out: &mut Vec<Reply>,
    ) -> Option<Response> {
        let Poll {
            session,
            timeout,
            ack_previous,
            max,
        } = poll;
        self.touch(now, &session, out);
        let mailbox = self.mailboxes.get_mut(&session).expect("touched");
        if ack_previous && !mailbox.in_flight.is_empty() {
            self.ack(now, &session, &AckSelector::All);
        }
        let mailbox = self.mailboxes.get_mut(&session).expect("created above");
        if let Some(old) = mailbox.waiter.take() {
            self.timers.remove(&old.timer);
            self.parked.remove(&old.to);
            out.push(Reply {
                to: old.to,
                response: Response::Messages(Vec::new()),
            });
        }
        drop_expired(mailbox, now, &mut self.journal, &mut self.counters);
        if !mailbox.ready.is_empty() && !mailbox.paused {
            let batch = self.take_batch(now, &session, from.conn, max);
            return Some(Response::Messages(batch));
        }
        let timeout = timeout.min(self.config.max_poll_timeout);
        if timeout.is_zero() {
            return Some(Response::Messages(Vec::new()));
        }
        let timer = self.add_timer(
            now + timeout,
            Timer::PollTimeout {
                session: session.clone(),
            },
        );
        let mailbox = self.mailboxes.get_mut(&session).expect("created above");
        mailbox.waiter = Some(Parked {
            to: from,
            timer,
            max,
        });
        self.parked.insert(from, session);
        None
    }

    /// Acknowledges what `which` selects. By id or cursor it also covers messages
    /// that are ready again rather than in flight: the client holds them from an
    /// earlier delivery (one that a core restart or a visibility timeout put back in
    /// line), and an acknowledgement the client was told succeeded must stick.
    fn ack(&mut self, now: Instant, session: &str, which: &AckSelector) -> Response {
        let Some(mailbox) = self.mailboxes.get_mut(session) else {
            return Response::Acked { count: 0 };
        };
        mailbox.last_active = now;
        let selected: HashSet<MessageId> = match which {
            AckSelector::Ids(ids) => ids.iter().copied().collect(),
            _ => HashSet::new(),
        };
        let covers = |id: MessageId| match which {
            AckSelector::All => true,
            AckSelector::Ids(_) => selected.contains(&id),
            AckSelector::UpTo(cursor) => id <= *cursor,
        };
        let ids: Vec<MessageId> = mailbox
            .in_flight
            .keys()
            .copied()
            .filter(|id| covers(*id))
            .collect();
        let mut seqs: Vec<MessageId> = take_in_flight(mailbox, &mut self.timers, &ids)
            .iter()
            .map(|s| s.seq)
            .collect();
        if !matches!(which, AckSelector::All) {
            let by_cursor = matches!(which, AckSelector::UpTo(_));
            mailbox.ready.retain(|s| {
                let hit = covers(s.message.id) && (s.given_before || !by_cursor);
                if hit {
                    seqs.push(s.seq);
                }
                !hit
            });
        }
        let count = seqs.len() as u32;
        self.counters.acknowledged += u64::from(count);
        self.journal.removed(seqs);
        Response::Acked { count }
    }

    fn cancel(&mut self, poll: ReplyTo, out: &mut Vec<Reply>) {
        let Some(session) = self.parked.remove(&poll) else {
            return; // already answered: its reply is on the way
        };
        if let Some(mailbox) = self.mailboxes.get_mut(&session)
            && let Some(parked) = mailbox.waiter.take()
        {
            self.timers.remove(&parked.timer);
        }
        out.push(Reply {
            to: poll,
            response: Response::Messages(Vec::new()),
        });
    }

    fn return_messages(
        &mut self,
        now: Instant,
        session: String,
        messages: Vec<Message>,
        out: &mut Vec<Reply>,
    ) {
        if messages.is_empty() {
            return;
        }
        mailbox_of(&mut self.mailboxes, &session, now);
        match self.config.delivery {
            DeliveryMode::Ack => {
                // Still in flight here: ready again at once instead of after the
                // visibility timeout. Ids acknowledged or redelivered since are no
                // longer in flight and are left alone. The browser never saw them, so
                // this was no delivery attempt.
                let ids: Vec<MessageId> = messages.iter().map(|m| m.id).collect();
                self.give_back(now, &session, &ids, out);
            }
            DeliveryMode::X0 => {
                // The stored copies are gone; the returned ones get a fresh TTL rather
                // than being lost to a deadline they never saw.
                // Each gets a storage id of its own: the id it carries may be shared
                // with copies still stored for other sessions.
                let expires_at = self.config.message_ttl.map(|ttl| now + ttl);
                let clock = self.clock;
                let mut back = Vec::with_capacity(messages.len());
                for message in messages {
                    // Never refused for max_queued_bytes: they were accepted once,
                    // and refusing them now would lose them.
                    let charge = Charge::new(&self.queued_bytes, &message.body);
                    let stored = Stored {
                        message,
                        seq: self.next_id(),
                        channel: None,
                        priority: 0,
                        expires_at,
                        deliveries: 0,
                        given_before: false,
                        key: None,
                        queued_at: now,
                        charge,
                    };
                    self.journal.push(|| copy_record(clock, &session, &stored));
                    back.push(stored);
                }
                back.sort_by_key(|s| s.message.id);
                let mailbox = self.mailboxes.get_mut(&session).expect("created above");
                merge_in_order(mailbox, back);
                self.deliver_if_waiting(now, &session, out);
            }
        }
    }

    /// Messages in flight that the client may not have read are ready again at once;
    /// no delivery attempt is counted. Returns how many there were.
    fn give_back(
        &mut self,
        now: Instant,
        session: &str,
        ids: &[MessageId],
        out: &mut Vec<Reply>,
    ) -> usize {
        let Some(mailbox) = self.mailboxes.get_mut(session) else {
            return 0;
        };
        let mut back = take_in_flight(mailbox, &mut self.timers, ids);
        for stored in &mut back {
            stored.deliveries = stored.deliveries.saturating_sub(1);
        }
        let count = back.len();
        self.requeue(now, session, back, out);
        count
    }

    /// Puts messages that went out unacknowledged back in line, in id order, or into
    /// the dead-letter queue once they have been given out too often.
    fn requeue(
        &mut self,
        now: Instant,
        session: &str,
        mut back: Vec<Stored>,
        out: &mut Vec<Reply>,
    ) {
        if back.is_empty() {
            return;
        }
        let max = self.config.max_deliveries;
        let mut dead = Vec::new();
        let mut expired = Vec::new();
        back.retain_mut(|s| {
            if s.expired(now) {
                expired.push(s.seq);
                false
            } else {
                true
            }
        });
        let (give_up, mut again): (Vec<Stored>, Vec<Stored>) = back
            .into_iter()
            .partition(|s| max > 0 && s.deliveries >= max);
        for stored in give_up {
            dead.push(stored.seq);
            self.dead.insert(
                stored.seq,
                Dead {
                    session: session.to_owned(),
                    stored,
                },
            );
        }
        self.counters.expired += expired.len() as u64;
        self.counters.dead_lettered += dead.len() as u64;
        self.counters.redelivered += again.len() as u64;
        self.journal.removed(expired);
        if !dead.is_empty() {
            self.journal.push(|| Record::DeadLettered { ids: dead });
        }
        let Some(mailbox) = self.mailboxes.get_mut(session) else {
            return;
        };
        again.sort_by_key(|s| s.message.id);
        merge_in_order(mailbox, again);
        self.deliver_if_waiting(now, session, out);
    }

    /// Releases every poll parked by a connection that went away, and in ack mode
    /// puts what went out on it back in line: that handler will pass nothing on.
    pub fn connection_closed(&mut self, now: Instant, conn: ConnId, out: &mut Vec<Reply>) {
        let gone: Vec<ReplyTo> = self
            .parked
            .keys()
            .filter(|to| to.conn == conn)
            .copied()
            .collect();
        for to in gone {
            let session = self.parked.remove(&to).expect("listed above");
            if let Some(mailbox) = self.mailboxes.get_mut(&session)
                && let Some(parked) = mailbox.waiter.take()
            {
                self.timers.remove(&parked.timer);
            }
        }
        if self.config.delivery != DeliveryMode::Ack {
            return;
        }
        let mut orphaned = Vec::new();
        for (session, mailbox) in &mut self.mailboxes {
            let ids: Vec<MessageId> = mailbox
                .in_flight
                .iter()
                .filter(|(_, f)| f.conn == conn)
                .map(|(id, _)| *id)
                .collect();
            if !ids.is_empty() {
                let back = take_in_flight(mailbox, &mut self.timers, &ids);
                orphaned.push((session.clone(), back));
            }
        }
        for (session, back) in orphaned {
            self.requeue(now, &session, back, out);
        }
    }

    /// Answers every parked poll with `ShuttingDown`, so that handlers re-issue them
    /// to the next core instead of waiting out their timeouts.
    pub fn shutdown(&mut self, out: &mut Vec<Reply>) {
        for (to, session) in self.parked.drain() {
            if let Some(mailbox) = self.mailboxes.get_mut(&session)
                && let Some(parked) = mailbox.waiter.take()
            {
                self.timers.remove(&parked.timer);
            }
            out.push(Reply {
                to,
                response: Response::error(
                    ErrorKind::ShuttingDown,
                    "the message server is stopping",
                ),
            });
        }
    }

    /// Fires every timer that is due at `now`.
    pub fn tick(&mut self, now: Instant, out: &mut Vec<Reply>) {
        while let Some(entry) = self.timers.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let key = *entry.key();
            match entry.remove() {
                Timer::PollTimeout { session } => {
                    let Some(mailbox) = self.mailboxes.get_mut(&session) else {
                        continue;
                    };
                    if let Some(parked) = mailbox.waiter.take_if(|p| p.timer == key) {
                        // The client polls again at once; until then it is still here.
                        mailbox.last_seen = now;
                        self.parked.remove(&parked.to);
                        out.push(Reply {
                            to: parked.to,
                            response: Response::Messages(Vec::new()),
                        });
                    }
                }
                Timer::Visibility { session, ids } => {
                    let Some(mailbox) = self.mailboxes.get_mut(&session) else {
                        continue;
                    };
                    let mut back = Vec::new();
                    for id in ids {
                        if mailbox.in_flight.get(&id).is_some_and(|f| f.timer == key) {
                            back.push(mailbox.in_flight.remove(&id).expect("checked").stored);
                        }
                    }
                    self.requeue(now, &session, back, out);
                }
            }
        }
    }

    /// Drops expired messages and publish keys, ends the presence of sessions that
    /// went silent, and removes mailboxes that have been empty and unused for the
    /// idle timeout, so memory does not grow with sessions that went away.
    pub fn sweep(&mut self, now: Instant, out: &mut Vec<Reply>) {
        let silent = self.config.session_timeout;
        let gone: Vec<String> = self
            .mailboxes
            .iter()
            .filter(|(_, m)| {
                m.joined
                    && m.waiter.is_none()
                    && now.saturating_duration_since(m.last_seen) >= silent
            })
            .map(|(s, _)| s.clone())
            .collect();
        for session in gone {
            self.leave(now, &session, true, out);
        }
        self.kicked.retain(|_, until| *until > now);
        self.reply_routes.retain(|_, (_, until)| *until > now);
        let channels = &self.config.channels;
        let mut forgotten = self.forgotten_history;
        self.histories.retain(|name, history| {
            if let Some(settings) = channels.iter().find(|s| s.pattern.matches(name)) {
                history.expire(settings, now);
            }
            let keep = !history.entries.is_empty();
            if !keep {
                forgotten = forgotten.max(history.trimmed_to);
            }
            keep
        });
        self.forgotten_history = forgotten;
        let idle = self.config.idle_mailbox_timeout;
        let journal = &mut self.journal;
        let counters = &mut self.counters;
        self.mailboxes.retain(|_, mailbox| {
            drop_all_expired(mailbox, now, journal, counters);
            !(mailbox.is_idle() && now.saturating_duration_since(mailbox.last_active) >= idle)
        });
        self.dedup.retain(|_, (_, until)| *until > now);
        shrink_when_sparse(&mut self.mailboxes);
        shrink_when_sparse(&mut self.parked);
    }

    fn dead_letters(&mut self, now: Instant, op: DeadLetterOp, out: &mut Vec<Reply>) -> Response {
        // The operator names messages by id; copies of one fanned-out message share
        // it, so one id may select several dead letters (by storage id).
        let selected = |dead: &BTreeMap<MessageId, Dead>, ids: Option<Vec<MessageId>>| match ids {
            None => dead.keys().copied().collect::<Vec<_>>(),
            Some(ids) => {
                let ids: HashSet<MessageId> = ids.into_iter().collect();
                dead.iter()
                    .filter(|(_, d)| ids.contains(&d.stored.message.id))
                    .map(|(seq, _)| *seq)
                    .collect()
            }
        };
        match op {
            DeadLetterOp::List { limit } => Response::DeadLetters {
                letters: self
                    .dead
                    .iter()
                    .take(limit as usize)
                    .map(|(_, d)| DeadLetter {
                        id: d.stored.message.id,
                        session: d.session.clone(),
                        body: d.stored.message.body.clone(),
                        deliveries: d.stored.deliveries,
                    })
                    .collect(),
                total: self.dead.len() as u64,
            },
            DeadLetterOp::Purge { ids } => {
                let ids = selected(&self.dead, ids);
                for id in &ids {
                    self.dead.remove(id);
                }
                let count = ids.len() as u64;
                self.journal.removed(ids);
                Response::Count(count)
            }
            DeadLetterOp::Replay { ids } => {
                let ids = selected(&self.dead, ids);
                let count = ids.len() as u64;
                let mut by_session: HashMap<String, Vec<Stored>> = HashMap::new();
                for id in &ids {
                    let mut dead = self.dead.remove(id).expect("selected");
                    dead.stored.deliveries = 0;
                    by_session
                        .entry(dead.session)
                        .or_default()
                        .push(dead.stored);
                }
                if !ids.is_empty() {
                    self.journal.push(|| Record::Revived { ids });
                }
                for (session, mut back) in by_session {
                    let mailbox = self
                        .mailboxes
                        .entry(session.clone())
                        .or_insert_with(|| Mailbox::new(now));
                    back.sort_by_key(|s| s.message.id);
                    merge_in_order(mailbox, back);
                    self.deliver_if_waiting(now, &session, out);
                }
                Response::Count(count)
            }
        }
    }

    fn admin(&mut self, now: Instant, request: AdminRequest, out: &mut Vec<Reply>) -> Response {
        match request {
            AdminRequest::Status => Response::Status(Box::new(self.status(now))),
            AdminRequest::Sessions { limit } => self.sessions(now, limit as usize),
            AdminRequest::Peek { session, limit } => self.peek(now, &session, limit as usize),
            AdminRequest::Purge { session } => Response::Count(self.purge(&session) as u64),
            AdminRequest::Kick { session, reason } => {
                Response::Count(self.kick(now, &session, &reason, out) as u64)
            }
            AdminRequest::Drain { draining } => {
                self.draining = draining;
                Response::Done
            }
        }
    }

    /// What the broker knows of the core's state; the shell adds what it knows
    /// (connections, storage).
    pub fn status(&self, now: Instant) -> CoreStatus {
        let stats = self.stats();
        CoreStatus {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            protocol: ipc::PROTOCOL_VERSION,
            uptime_ms: now
                .saturating_duration_since(self.clock.instant)
                .as_millis() as u64,
            sessions: stats.sessions as u64,
            mailboxes: stats.mailboxes as u64,
            ready: stats.ready as u64,
            in_flight: stats.in_flight as u64,
            queued_bytes: stats.queued_bytes,
            max_queued_bytes: self.config.max_queued_bytes,
            parked_polls: stats.parked_polls as u64,
            dead_letters: stats.dead_letters as u64,
            subscriptions: stats.subscriptions as u64,
            channels: self.subscriptions.patterns() as u64,
            handler_connections: 0,
            storage: None,
            draining: self.draining,
        }
    }

    /// The `limit` sessions with the deepest queues. A partial selection, so that a
    /// core with many sessions answers in one pass and a reply of `limit` lines.
    fn sessions(&self, now: Instant, limit: usize) -> Response {
        // Deepest ready queue first, then most in flight, then by name so that the
        // order is stable between two calls.
        let order = |a: &(&String, &Mailbox), b: &(&String, &Mailbox)| {
            (b.1.ready.len(), b.1.in_flight.len(), a.0).cmp(&(
                a.1.ready.len(),
                a.1.in_flight.len(),
                b.0,
            ))
        };
        let mut all: Vec<(&String, &Mailbox)> = self.mailboxes.iter().collect();
        let total = all.len() as u64;
        if limit < all.len() {
            if limit > 0 {
                all.select_nth_unstable_by(limit - 1, order);
            }
            all.truncate(limit);
        }
        all.sort_unstable_by(order);
        // As for a peek: a reply over the frame limit would reach nobody.
        let mut room = PEEK_MAX_BYTES;
        let sessions = all
            .into_iter()
            .take_while(|(session, mailbox)| {
                let size =
                    SUMMARY_OVERHEAD + session.len() + mailbox.user.as_ref().map_or(0, String::len);
                let fits = size <= room;
                room = room.saturating_sub(size);
                fits
            })
            .map(|(session, mailbox)| SessionSummary {
                session: session.clone(),
                ready: mailbox.ready.len() as u64,
                in_flight: mailbox.in_flight.len() as u64,
                user: mailbox.user.clone(),
                last_seen_ms: now.saturating_duration_since(mailbox.last_seen).as_millis() as u64,
                parked_poll: mailbox.waiter.is_some(),
                paused: mailbox.paused,
                subscriptions: mailbox.subscriptions.len() as u32,
            })
            .collect();
        Response::Sessions { sessions, total }
    }

    /// What waits for `session`, in flight first (given earlier), then ready, each
    /// oldest first. Reads only: nothing is delivered, touched or journaled, and
    /// an unknown session is not created.
    fn peek(&self, now: Instant, session: &str, limit: usize) -> Response {
        let Some(mailbox) = self.mailboxes.get(session) else {
            return Response::Peeked {
                messages: Vec::new(),
                total: 0,
            };
        };
        let peeked = |stored: &Stored, in_flight: bool| PeekedMessage {
            id: stored.message.id,
            age_ms: now.saturating_duration_since(stored.queued_at).as_millis() as u64,
            in_flight,
            deliveries: stored.deliveries,
            body: stored.message.body.clone(),
        };
        // Bounded by bytes as well: a reply over the frame limit would be dropped
        // with the connection, and the operator would see nothing at all.
        let mut room = PEEK_MAX_BYTES;
        let messages = mailbox
            .in_flight
            .values()
            .map(|f| (&f.stored, true))
            .chain(mailbox.ready.iter().map(|s| (s, false)))
            .take(limit)
            .take_while(|(stored, _)| {
                let fits = stored.message.body.len() <= room;
                room = room.saturating_sub(stored.message.body.len());
                fits
            })
            .map(|(stored, in_flight)| peeked(stored, in_flight))
            .collect();
        Response::Peeked {
            messages,
            total: (mailbox.in_flight.len() + mailbox.ready.len()) as u64,
        }
    }

    /// Deletes everything waiting for `session`, ready and in flight, as acks
    /// would: journaled as removed, so a restart does not bring it back. The
    /// session itself (subscriptions, binding, a parked poll) stays.
    fn purge(&mut self, session: &str) -> usize {
        let Some(mailbox) = self.mailboxes.get_mut(session) else {
            return 0;
        };
        let ids: Vec<MessageId> = mailbox.in_flight.keys().copied().collect();
        let in_flight = take_in_flight(mailbox, &mut self.timers, &ids);
        let ready = std::mem::take(&mut mailbox.ready);
        let seqs: Vec<MessageId> = in_flight
            .iter()
            .chain(ready.iter())
            .map(|s| s.seq)
            .collect();
        let count = seqs.len();
        self.journal.removed(seqs);
        count
    }

    fn deliver_if_waiting(&mut self, now: Instant, session: &str, out: &mut Vec<Reply>) {
        let Some(mailbox) = self.mailboxes.get_mut(session) else {
            return;
        };
        drop_expired(mailbox, now, &mut self.journal, &mut self.counters);
        if mailbox.ready.is_empty() || mailbox.paused {
            return;
        }
        let Some(parked) = mailbox.waiter.take() else {
            return;
        };
        mailbox.last_seen = now;
        self.timers.remove(&parked.timer);
        self.parked.remove(&parked.to);
        let batch = self.take_batch(now, session, parked.to.conn, parked.max);
        out.push(Reply {
            to: parked.to,
            response: Response::Messages(batch),
        });
    }

    /// Takes what is ready for `session` (at most `max`, 0 for all; higher channel
    /// priority first, then oldest first); in ack mode it stays in flight.
    fn take_batch(
        &mut self,
        now: Instant,
        session: &str,
        conn: ConnId,
        max: usize,
    ) -> Vec<Message> {
        let mailbox = self.mailboxes.get_mut(session).expect("caller checked");
        drop_all_expired(mailbox, now, &mut self.journal, &mut self.counters);
        // Only when some channel has a priority is there anything to sort: the x0
        // poll does not scan its batch for one.
        let prioritised = self.prioritised && mailbox.ready.iter().any(|s| s.priority != 0);
        let taken: Vec<Stored> = if !prioritised && (max == 0 || mailbox.ready.len() <= max) {
            std::mem::take(&mut mailbox.ready).into()
        } else {
            let mut all: Vec<Stored> = std::mem::take(&mut mailbox.ready).into();
            // Stable: publish order within one priority.
            all.sort_by_key(|s| std::cmp::Reverse(s.priority));
            if max > 0 && all.len() > max {
                let mut rest = all.split_off(max);
                rest.sort_by_key(|s| s.message.id);
                mailbox.ready = rest.into();
            }
            all
        };
        self.counters.delivered += taken.len() as u64;
        match self.config.delivery {
            DeliveryMode::X0 => {
                self.journal.removed(taken.iter().map(|s| s.seq));
                taken.into_iter().map(|s| s.message).collect()
            }
            DeliveryMode::Ack if taken.is_empty() => Vec::new(),
            DeliveryMode::Ack => {
                let batch: Vec<Message> = taken.iter().map(|s| s.message.clone()).collect();
                let timer = self.add_timer(
                    now + self.config.visibility_timeout,
                    Timer::Visibility {
                        session: session.to_owned(),
                        ids: batch.iter().map(|m| m.id).collect(),
                    },
                );
                let mailbox = self.mailboxes.get_mut(session).expect("caller checked");
                for mut stored in taken {
                    stored.deliveries += 1;
                    stored.given_before = true;
                    mailbox.in_flight.insert(
                        stored.message.id,
                        InFlight {
                            stored,
                            timer,
                            conn,
                        },
                    );
                }
                batch
            }
        }
    }

    fn add_timer(&mut self, at: Instant, timer: Timer) -> TimerKey {
        self.timer_seq += 1;
        let key = (at, self.timer_seq);
        self.timers.insert(key, timer);
        key
    }
}

/// The mailbox of `session`, created if it has none.
fn mailbox_of<'a>(
    mailboxes: &'a mut HashMap<String, Mailbox>,
    session: &str,
    now: Instant,
) -> &'a mut Mailbox {
    if !mailboxes.contains_key(session) {
        mailboxes.insert(session.to_owned(), Mailbox::new(now));
    }
    mailboxes.get_mut(session).expect("inserted above")
}

fn stored_subscription(subscription: &Subscription) -> StoredSubscription {
    StoredSubscription {
        channel: subscription.channel.clone(),
        subject: subscription.subject.clone(),
        group: subscription.group.clone(),
    }
}

/// What a snapshot writes for a session's presence state.
fn session_records(session: &str, mailbox: &Mailbox) -> Vec<Record> {
    let mut records = Vec::new();
    if let Some(user) = &mailbox.user {
        records.push(Record::Bound {
            session: session.to_owned(),
            user: user.clone(),
        });
    }
    records.extend(
        mailbox
            .subscriptions
            .iter()
            .map(|subscription| Record::Subscribed {
                session: session.to_owned(),
                subscription: stored_subscription(subscription),
            }),
    );
    if mailbox.paused {
        records.push(Record::Paused {
            session: session.to_owned(),
            paused: true,
        });
    }
    records
}

/// The session a request acts as, for the kicked check.
pub(crate) fn acting_session(request: &Request) -> Option<&str> {
    match request {
        Request::Poll { session, .. }
        | Request::Ack { session, .. }
        | Request::Return { session, .. }
        | Request::Subscribe { session, .. }
        | Request::Unsubscribe { session, .. }
        | Request::AwaitReply { session, .. }
        | Request::SetPaused { session, .. }
        | Request::Bind { session, .. }
        | Request::Release { session } => Some(session),
        Request::Publish { src, .. } => Some(src),
        Request::Send(send) => send.src.as_deref(),
        Request::Ping
        | Request::CancelPoll { .. }
        | Request::DeadLetters(_)
        | Request::Presence { .. }
        | Request::Kick { .. }
        | Request::Metrics
        | Request::Admin(_) => None,
    }
}

pub(crate) fn kicked_error(session: &str) -> Response {
    Response::error(
        ErrorKind::Kicked,
        format!("session {session:?} was kicked; start a new session"),
    )
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("strings serialize")
}

/// `{"<key>":"<value>"}`.
pub(crate) fn object(key: &str, value: &str) -> String {
    format!("{{\"{key}\":{}}}", json_string(value))
}

fn session_event(session: &str, user: Option<&str>, reason: Option<&str>) -> String {
    let user = user.map_or_else(|| "null".to_owned(), json_string);
    match reason {
        None => format!(r#"{{"session":{},"user":{user}}}"#, json_string(session)),
        Some(reason) => format!(
            r#"{{"session":{},"user":{user},"reason":{}}}"#,
            json_string(session),
            json_string(reason)
        ),
    }
}

/// The delivered form of a message of the versioned API. `data` is spliced in as
/// the sender wrote it; the handler has checked that it is JSON.
fn envelope(id: MessageId, time_ms: u64, send: &Send, target_json: &str) -> String {
    let (head, tail) = envelope_parts(send);
    format!(r#"{{"id":{id},"time":{time_ms}{head}{target_json}{tail}"#)
}

/// An envelope but for its id, time and target, which the Redis backend fills in
/// inside Redis: what goes between the time and the target, and what follows it.
pub(crate) fn envelope_parts(send: &Send) -> (String, String) {
    let mut head = String::with_capacity(32);
    head.push_str(r#","source":"#);
    match &send.src {
        Some(src) => head.push_str(&json_string(src)),
        None => head.push_str("null"),
    }
    head.push_str(r#","target":"#);
    let mut out = String::with_capacity(send.data.len() + 64);
    if let Some(subject) = &send.subject {
        out.push_str(r#","subject":"#);
        out.push_str(&json_string(subject));
    }
    if let Some(reference) = send.reference {
        out.push_str(&format!(r#","reference":{reference}"#));
    }
    if let Some(ttl_ms) = send.ttl_ms {
        // Seconds, as the client gave them.
        out.push_str(&format!(r#","ttl":{}"#, ttl_ms as f64 / 1000.0));
    }
    out.push_str(r#","data":"#);
    out.push_str(&send.data);
    out.push('}');
    (head, out)
}

/// How a message is stored: x0 messages as before, the rest with their storage id
/// and routing.
fn record_of(clock: ClockAnchor, session: &str, stored: &Stored) -> Record {
    if stored.seq == stored.message.id && stored.channel.is_none() && stored.priority == 0 {
        Record::Put(stored_message(clock, session, stored))
    } else {
        copy_record(clock, session, stored)
    }
}

fn copy_record(clock: ClockAnchor, session: &str, stored: &Stored) -> Record {
    Record::Copy(StoredCopy {
        seq: stored.seq,
        message: stored_message(clock, session, stored),
        channel: stored.channel.as_deref().map(str::to_owned),
        priority: stored.priority,
    })
}

fn stored_message(clock: ClockAnchor, session: &str, stored: &Stored) -> StoredMessage {
    StoredMessage {
        id: stored.message.id,
        session: session.to_owned(),
        body: stored.message.body.clone(),
        expires_ms: stored.expires_at.map(|at| clock.unix_ms_at(at)),
        key: stored.key.clone(),
    }
}

/// Drops expired messages from the head of the line: cheap enough for every
/// publish and poll, since with one TTL the oldest expire first. What expires
/// behind a younger head (a returned message got a fresh TTL) goes at the next
/// [`drop_all_expired`] or when the batch is taken.
fn drop_expired(
    mailbox: &mut Mailbox,
    now: Instant,
    journal: &mut Journal,
    counters: &mut Counters,
) {
    let mut gone = Vec::new();
    while mailbox.ready.front().is_some_and(|m| m.expired(now)) {
        gone.push(mailbox.ready.pop_front().expect("checked").seq);
    }
    counters.expired += gone.len() as u64;
    journal.removed(gone);
}

/// A hash map's table never shrinks by itself, and the slots of removed entries
/// count against its room until it is rebuilt, so that sessions that come and go
/// make it grow once more even when no more of them are present than before (in
/// scenario 12 of BENCHMARKS.md, by 3.5 MB after 80,000 sessions). Once it is
/// mostly empty it is rebuilt for what it holds.
fn shrink_when_sparse<K: Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>) {
    if map.capacity() > 4 * map.len().max(256) {
        map.shrink_to(2 * map.len());
    }
}

fn drop_all_expired(
    mailbox: &mut Mailbox,
    now: Instant,
    journal: &mut Journal,
    counters: &mut Counters,
) {
    if mailbox.soonest_expiry.is_none_or(|at| at > now) {
        return;
    }
    let mut gone = Vec::new();
    let mut soonest = None;
    mailbox.ready.retain(|m| {
        let expired = m.expired(now);
        if expired {
            gone.push(m.seq);
        } else if let Some(at) = m.expires_at {
            soonest = Some(soonest.map_or(at, |t: Instant| t.min(at)));
        }
        !expired
    });
    mailbox.soonest_expiry = soonest;
    counters.expired += gone.len() as u64;
    journal.removed(gone);
}

/// Takes `ids` (those still in flight) out of flight, and cancels each visibility
/// timer no message in flight refers to any more.
fn take_in_flight(
    mailbox: &mut Mailbox,
    timers: &mut BTreeMap<TimerKey, Timer>,
    ids: &[MessageId],
) -> Vec<Stored> {
    let taken: Vec<InFlight> = ids
        .iter()
        .filter_map(|id| mailbox.in_flight.remove(id))
        .collect();
    for f in &taken {
        if !mailbox.in_flight.values().any(|g| g.timer == f.timer) {
            timers.remove(&f.timer);
        }
    }
    taken.into_iter().map(|f| f.stored).collect()
}

/// Merges `back` (sorted by id) into the mailbox's `ready` (sorted by id).
fn merge_in_order(mailbox: &mut Mailbox, back: Vec<Stored>) {
    let Some(last_back) = back.last().map(|s| s.message.id) else {
        return;
    };
    for stored in &back {
        mailbox.note_expiry(stored.expires_at);
    }
    let ready = &mut mailbox.ready;
    if ready
        .front()
        .is_none_or(|first| first.message.id > last_back)
    {
        // The usual case: what went out is older than anything still waiting.
        for stored in back.into_iter().rev() {
            ready.push_front(stored);
        }
        return;
    }
    let waiting: Vec<Stored> = ready.drain(..).collect();
    let mut a = waiting.into_iter().peekable();
    let mut b = back.into_iter().peekable();
    loop {
        let take_a = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => x.message.id < y.message.id,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        ready.push_back(if take_a { a.next() } else { b.next() }.expect("peeked"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONN: ConnId = 1;

    struct Harness {
        broker: Broker,
        t0: Instant,
        next_request: RequestId,
    }

    impl Harness {
        fn new(config: BrokerConfig) -> Self {
            let t0 = Instant::now();
            Harness {
                broker: Broker::new(
                    config,
                    ClockAnchor {
                        instant: t0,
                        unix_ms: 0,
                    },
                ),
                t0,
                next_request: 1,
            }
        }

        /// A durable broker whose journal the test can read back.
        fn durable(config: BrokerConfig) -> Self {
            let mut h = Harness::new(config);
            h.broker.journal.durable = true;
            h
        }

        fn at(&self, ms: u64) -> Instant {
            self.t0 + Duration::from_millis(ms)
        }

        /// Sends `request` at `ms` and returns its id and every reply it caused.
        fn send(&mut self, ms: u64, request: Request) -> (ReplyTo, Vec<Reply>) {
            let to = ReplyTo {
                conn: CONN,
                request: self.next_request,
            };
            self.next_request += 1;
            let mut out = Vec::new();
            self.broker.handle(self.at(ms), to, request, &mut out);
            (to, out)
        }

        fn publish(&mut self, ms: u64, dst: &str, body: &str) -> Response {
            let (to, out) = self.send(
                ms,
                Request::Publish {
                    src: "sender".into(),
                    dst: dst.into(),
                    body: body.into(),
                    key: None,
                },
            );
            reply_for(&out, to).expect("publish is answered at once")
        }

        fn poll(&mut self, ms: u64, session: &str, timeout_ms: u64) -> (ReplyTo, Vec<Reply>) {
            self.send(
                ms,
                Request::Poll {
                    session: session.into(),
                    timeout_ms,
                    ack_previous: true,
                    max: 0,
                },
            )
        }

        fn tick(&mut self, ms: u64) -> Vec<Reply> {
            let mut out = Vec::new();
            self.broker.tick(self.at(ms), &mut out);
            out
        }
    }

    fn reply_for(out: &[Reply], to: ReplyTo) -> Option<Response> {
        out.iter().find(|r| r.to == to).map(|r| r.response.clone())
    }

    fn bodies(response: &Response) -> Vec<&str> {
        match response {
            Response::Messages(batch) => batch.iter().map(|m| m.body.as_str()).collect(),
            other => panic!("expected messages, got {other:?}"),
        }
    }

    fn ack_mode() -> BrokerConfig {
        BrokerConfig {
            delivery: DeliveryMode::Ack,
            visibility_timeout: Duration::from_secs(5),
            ..BrokerConfig::default()
        }
    }

    #[test]
    fn messages_reach_only_their_session_in_order() {
        let mut h = Harness::new(BrokerConfig::default());
        h.publish(0, "b", "1");
        h.publish(0, "c", "other");
        h.publish(0, "b", "2");
        let (to, out) = h.poll(1, "b", 10_000);
        assert_eq!(bodies(&reply_for(&out, to).unwrap()), ["1", "2"]);
        let (to, out) = h.poll(2, "c", 10_000);
        assert_eq!(bodies(&reply_for(&out, to).unwrap()), ["other"]);
    }

    #[test]
    fn message_ids_increase_monotonically() {
        let mut h = Harness::new(BrokerConfig::default());
        let ids: Vec<MessageId> = (0..3)
            .map(|_| match h.publish(0, "b", "x") {
                Response::Published { id, .. } => id,
                other => panic!("{other:?}"),
            })
            .collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    }

    #[test]
    fn x0_mode_poll_removes_what_it_returns() {
        let mut h = Harness::new(BrokerConfig::default());
        h.publish(0, "b", "once");
        let (to, out) = h.poll(1, "b", 0);
        assert_eq!(bodies(&reply_for(&out, to).unwrap()), ["once"]);
        let (to, out) = h.poll(2, "b", 0);
        assert!(bodies(&reply_for(&out, to).unwrap()).is_empty());
    }

    #[test]
    fn parked_poll_is_answered_by_the_next_publish() {
        let mut h = Harness::new(BrokerConfig::default());
        let (poll, out) = h.poll(0, "b", 10_000);
        assert!(out.is_empty(), "nothing to give yet: {out:?}");
        assert_eq!(h.broker.stats().parked_polls, 1);
        let (_, out) = h.send(
            5,
            Request::Publish {
                src: "a".into(),
                dst: "b".into(),
                body: "hi".into(),
                key: None,
            },
        );
        assert_eq!(bodies(&reply_for(&out, poll).unwrap()), ["hi"]);
        assert_eq!(h.broker.stats().parked_polls, 0);
        assert_eq!(h.broker.stats().pending_timers, 0);
    }

    #[test]
    fn parked_poll_times_out_with_no_messages() {
        let mut h = Harness::new(BrokerConfig::default());
        let (poll, _) = h.poll(0, "b", 1_000);
        assert_eq!(h.broker.next_deadline(), Some(h.at(1_000)));
        assert!(h.tick(999).is_empty());
        let out = h.tick(1_000);
        assert_eq!(reply_for(&out, poll), Some(Response::Messages(vec![])));
        assert_eq!(h.broker.stats().parked_polls, 0);
    }

    #[test]
    fn poll_timeout_is_capped_by_config() {
        let mut h = Harness::new(BrokerConfig {
            max_poll_timeout: Duration::from_secs(2),
            ..BrokerConfig::default()
        });
        h.poll(0, "b", 3_600_000);
        assert_eq!(h.broker.next_deadline(), Some(h.at(2_000)));
    }

    #[test]
    fn newer_poll_supersedes_the_parked_one() {
        let mut h = Harness::new(BrokerConfig::default());
        let (first, _) = h.poll(0, "b", 10_000);
        let (second, out) = h.poll(1, "b", 10_000);
        assert_eq!(reply_for(&out, first), Some(Response::Messages(vec![])));
        assert_eq!(reply_for(&out, second), None);
        h.publish(2, "b", "m");
        assert_eq!(h.broker.stats().parked_polls, 0);
    }

    #[test]
    fn cancelled_poll_is_answered_empty_and_keeps_later_messages() {
        let mut h = Harness::new(BrokerConfig::default());
        let (poll, _) = h.poll(0, "b", 10_000);
        let (cancel, out) = h.send(1, Request::CancelPoll { poll: poll.request });
        assert_eq!(reply_for(&out, poll), Some(Response::Messages(vec![])));
        assert_eq!(reply_for(&out, cancel), Some(Response::Done));
        h.publish(2, "b", "kept");
        let (to, out) = h.poll(3, "b", 0);
        assert_eq!(bodies(&reply_for(&out, to).unwrap()), ["kept"]);
    }

    #[test]
    fn closed_connection_releases_its_polls_but_not_the_messages() {
        let mut h = Harness::new(BrokerConfig::default());
        h.poll(0, "b", 10_000);
        h.broker.connection_closed(h.at(0), CONN, &mut Vec::new());
        assert_eq!(h.broker.stats().parked_polls, 0);
        assert_eq!(h.broker.stats().pending_timers, 0);
        let (_, out) = h.send(
            1,
            Request::Publish {
                src: "a".into(),
                dst: "b".into(),
                body: "kept".into(),
                key: None,
            },
        );
        assert_eq!(out.len(), 1, "only the publish is answered: {out:?}");
        let (to, out) = h.poll(2, "b", 0);
        assert_eq!(bodies(&reply_for(&out, to).unwrap()), ["kept"]);
    }

    #[test]
    fn returned_messages_go_back_to_the_head_in_x0_mode() {
        let mut h = Harness::new(BrokerConfig::default());
        h.publish(0, "b", "1");
        h.publish(0, "b", "2");
        let (to, out) = h.poll(1, "b", 0);
        let Some(Response::Messages(batch)) = reply_for(&out, to) else {
            panic!()
        };
        h.publish(2, "b", "3");
        h.send(
            3,
            Request::Return {
                session: "b".into(),
                messages: batch,
            },
        );
        let (to, out) = h.poll(4, "b", 0);
        assert_eq!(bodies(&reply_for(&out, to).unwrap()), ["1", "2", "3"]);
    }

    #[test]
    fn ack_mode_next_poll_acknowledges_the_batch() {
        let mut h = Harness::new(ack_mode());
        h.publish(0, "b", "1");
        let (to, out) = h.poll(1, "b", 0);
        assert_eq!(bodies(&reply_for(&out, to).unwrap()), ["1"]);
        let (to, out) = h.poll(2, "b", 0);
        assert!(bodies(&reply_for(&out, to).unwrap()).is_empty());
        assert!(h.tick(60_000).is_empty(), "nothing left to redeliver");
    }

    #[test]
    fn unacked_batch_is_redelivered_after_visibility_timeout() {
        let mut h = Harness::new(ack_mode());
        h.publish(0, "b", "1");
        h.publish(0, "b", "2");
        let (to, out) = h.poll(1, "b", 0);
        assert_eq!(bodies(&reply_for(&out, to).unwrap()), ["1", "2"]);
        h.publish(2, "b", "3");
        assert!(h.tick(5_000).is_empty());
        h.tick(5_001);
        // The tab that got the batch never came back: the batch is ready again,
        // ahead of what arrived after it.
        let (to, out) = h.poll(5_002, "b", 0);
        assert_eq!(bodies(&reply_for(&out, to).unwrap()), ["1", "2", "3"]);
    }

    #[test]
    fn counters_follow_each_message_through_publish_delivery_redelivery_and_ack() {
        let mut h = Harness::new(ack_mode());
        h.publish(0, "b", "1");
        h.publish(0, "b", "2");
        let (to, out) = h.poll(1, "b", 0);
        assert_eq!(bodies(&reply_for(&out, to).unwrap()).len(), 2);
        h.tick(5_001);
        // The next poll acknowledges nothing (the batch went back in line) and gets
        // both again; the one after it acknowledges them.
        h.poll(5_002, "b", 0);
        h.poll(5_003, "b", 0);
        let c = *h.broker.counters();
        assert_eq!(
            (c.published, c.delivered, c.redelivered, c.acknowledged),
            (2, 4, 2, 2)
        );
        let metrics = h.broker.metrics();
        assert_eq!((metrics.ready, metrics.in_flight), (0, 0));
    }

    #[test]
    fn refusals_and_drops_are_counted_by_kind() {
        let mut h = Harness::new(BrokerConfig {
            mailbox_max_len: 1,
            max_payload_bytes: 4,
            ..BrokerConfig::default()
        });
        h.publish(0, "b", "1");
        h.publish(0, "b", "2"); // drops "1"
        h.publish(0, "b", "too long");
        let c = *h.broker.counters();
        assert_eq!((c.published, c.dropped), (2, 1));
        assert_eq!(c.refused[ErrorKind::PayloadTooLarge as usize], 1);
        let refused = h.broker.metrics().refused;
        assert!(refused.contains(&(ErrorKind::PayloadTooLarge, 1)));
        assert!(refused.contains(&(ErrorKind::MailboxFull, 0)));
    }

    #[test]
    fn expired_messages_are_counted_when_dropped() {
        let mut h = Harness::new(BrokerConfig {
            message_ttl: Some(Duration::from_secs(1)),
            ..BrokerConfig::default()
        });
        h.publish(0, "b", "1");
        let (to, out) = h.poll(2_000, "b", 0);
        assert!(bodies(&reply_for(&out, to).unwrap()).is_empty());
        assert_eq!(h.broker.counters().expired, 1);
        assert_eq!(h.broker.counters().delivered, 0);
    }

    #[test]
    fn error_kinds_index_the_refusal_table_in_declaration_order() {
        for (i, kind) in ErrorKind::ALL.iter().enumerate() {
            assert_eq!(*kind as usize, i, "{kind:?}");
        }
    }

    #[test]
    fn ack_by_del_stops_redelivery() {
        let mut h = Harness::new(ack_mode());
        h.publish(0, "b", "1");
        h.poll(1, "b", 0);
        let (to, out) = h.send(
            2,
            Request::Ack {
                session: "b".into(),
                which: AckSelector::All,
            },
        );
        assert_eq!(reply_for(&out, to), Some(Response::Acked { count: 1 }));
        assert!(h.tick(60_000).is_empty());
        let (to, out) = h.poll(60_001, "b", 0);
        assert!(bodies(&reply_for(&out, to).unwrap()).is_empty());
    }

    #[test]
    fn ack_in_x0_mode_acknowledges_nothing() {
        let mut h = Harness::new(BrokerConfig::default());
        h.publish(0, "b", "1");
        let (to, out) = h.send(
            1,
            Request::Ack {
                session: "b".into(),
                which: AckSelector::All,
            },
        );
        assert_eq!(reply_for(&out, to), Some(Response::Acked { count: 0 }));
        let (to, out) = h.poll(2, "b", 0);
        assert_eq!(bodies(&reply_for(&out, to).unwrap()), ["1"]);
    }

    #[test]
    fn returned_batch_in_ack_mode_is_ready_again_at_once() {
        let mut h = Harness::new(ack_mode());
        h.publish(0, "b", "1");
        let (to, out) = h.poll(1, "b", 0);
        let Some(Response::Messages(batch)) = reply_for(&out, to) else {
            panic!()
        };
        h.send(
            2,
            Request::Return {
                session: "b".into(),
                messages: batch,
            },
        );
        assert_eq!(h.broker.stats().pending_timers, 0);
        // Not through the poll-acks rule: that would acknowledge an in-flight batch,
        // and there is none now.
        let (to, out) = h.poll(3, "b", 0);
        assert_eq!(bodies(&reply_for(&out, to).unwrap()), ["1"]);
    }

    #[test]
    fn full_mailbox_rejects_under_reject_policy() {
        let mut h = Harness::new(BrokerConfig {
            mailbox_max_len: 2,
            overflow: OverflowPolicy::Reject,
            ..BrokerConfig::default()
        });
        assert!(matches!(
            h.publish(0, "b", "1"),
            Response::Published { dropped: 0, .. }
        ));
        assert!(matches!(
            h.publish(0, "b", "2"),
            Response::Published { dropped: 0, .. }
        ));
        match h.publish(0, "b", "3") {
            Response::Error(e) => {
                assert_eq!(e.kind, ErrorKind::MailboxFull);
                assert!(e.message.contains("limit"), "{}", e.message);
            }
            other => panic!("{other:?}"),
        }
        let (to, out) = h.poll(1, "b", 0);
        assert_eq!(bodies(&reply_for(&out, to).unwrap()), ["1", "2"]);
    }

    #[test]
    fn full_mailbox_drops_oldest_and_says_so() {
        let mut h = Harness::new(BrokerConfig {
            mailbox_max_len: 2,
            overflow: OverflowPolicy::DropOldest,
            ..BrokerConfig::default()
        });
        h.publish(0, "b", "1");
        h.publish(0, "b", "2");
        assert!(matches!(
            h.publish(0, "b", "3"),
            Response::Published { dropped: 1, .. }
        ));
        let (to, out) = h.poll(1, "b", 0);
        assert_eq!(bodies(&reply_for(&out, to).unwrap()), ["2", "3"]);
    }

    #[test]
    fn oversized_payload_is_refused_and_not_stored() {
        let mut h = Harness::new(BrokerConfig {
            max_payload_bytes: 4,
            ..BrokerConfig::default()
        });
        match h.publish(0, "b", "12345") {
            Response::Error(e) => assert_eq!(e.kind, ErrorKind::PayloadTooLarge),
            other => panic!("{other:?}"),
        }
        let (to, out) = h.poll(1, "b", 0);
        assert!(bodies(&reply_for(&out, to).unwrap()).is_empty());
    }

    #[test]
    fn expired_messages_are_not_delivered() {
        let mut h = Harness::new(BrokerConfig {
            message_ttl: Some(Duration::from_secs(1)),
            ..BrokerConfig::default()
        });
        h.publish(0, "b", "stale");
        h.publish(900, "b", "fresh");
        let (to, out) = h.poll(1_000, "b", 0);
        assert_eq!(bodies(&reply_for(&out, to).unwrap()), ["fresh"]);
    }

    #[test]
    fn idle_empty_mailboxes_are_removed_but_busy_ones_stay() {
        let mut h = Harness::new(BrokerConfig {
            idle_mailbox_timeout: Duration::from_secs(60),
            message_ttl: Some(Duration::from_secs(30)),
            ..BrokerConfig::default()
        });
        h.poll(0, "polled-once", 0);
        h.publish(0, "never-read", "x");
        h.poll(0, "parked", 3_600_000);
        h.broker.sweep(h.at(59_999), &mut Vec::new());
        assert_eq!(h.broker.stats().mailboxes, 3);
        h.broker.sweep(h.at(60_000), &mut Vec::new());
        // The unread message expired at 30 s, so its mailbox went idle too; the
        // session with a parked poll is in use.
        assert_eq!(h.broker.stats().mailboxes, 1);
        let (to, out) = h.poll(60_001, "parked", 0);
        assert!(reply_for(&out, to).is_some());
    }

    #[test]
    fn the_mailbox_table_is_rebuilt_small_once_its_sessions_are_gone() {
        let mut h = Harness::new(BrokerConfig {
            idle_mailbox_timeout: Duration::from_secs(1),
            session_timeout: Duration::from_secs(1),
            ..BrokerConfig::default()
        });
        for k in 0..5000 {
            h.poll(0, &format!("s{k}"), 0);
        }
        let full = h.broker.mailboxes.capacity();
        assert!(full >= 5000, "{full}");
        h.poll(500, "stays", 0);
        h.broker.sweep(h.at(1_000), &mut Vec::new());
        assert_eq!(h.broker.stats().mailboxes, 1);
        assert!(
            h.broker.mailboxes.capacity() < full / 4,
            "{} of {full}",
            h.broker.mailboxes.capacity()
        );
        // The one left is still served.
        let (to, out) = h.poll(1_001, "stays", 0);
        assert!(reply_for(&out, to).is_some());
    }

    fn ids(response: &Response) -> Vec<MessageId> {
        match response {
            Response::Messages(batch) => batch.iter().map(|m| m.id).collect(),
            other => panic!("expected messages, got {other:?}"),
        }
    }

    fn poll_explicit(h: &mut Harness, ms: u64, session: &str) -> Vec<MessageId> {
        let (to, out) = h.send(
            ms,
            Request::Poll {
                session: session.into(),
                timeout_ms: 0,
                ack_previous: false,
                max: 0,
            },
        );
        ids(&reply_for(&out, to).unwrap())
    }

    fn ack(h: &mut Harness, ms: u64, session: &str, which: AckSelector) -> u32 {
        let (to, out) = h.send(
            ms,
            Request::Ack {
                session: session.into(),
                which,
            },
        );
        match reply_for(&out, to) {
            Some(Response::Acked { count }) => count,
            other => panic!("{other:?}"),
        }
    }

    fn publish_keyed(h: &mut Harness, ms: u64, src: &str, key: &str, body: &str) -> Response {
        let (to, out) = h.send(
            ms,
            Request::Publish {
                src: src.into(),
                dst: "b".into(),
                body: body.into(),
                key: Some(key.into()),
            },
        );
        reply_for(&out, to).unwrap()
    }

    /// Replays the journal written so far, as recovery would.
    fn replay(h: &mut Harness) -> Recovered {
        let records = h.broker.take_journal();
        let mut recovered = Recovered::default();
        for record in records {
            recovered.apply(record);
        }
        recovered
    }

    #[test]
    fn ack_by_ids_leaves_the_others_in_flight_until_redelivery() {
        let mut h = Harness::new(ack_mode());
        for body in ["1", "2", "3"] {
            h.publish(0, "b", body);
        }
        let given = poll_explicit(&mut h, 1, "b");
        assert_eq!(given.len(), 3);
        assert_eq!(
            ack(&mut h, 2, "b", AckSelector::Ids(vec![given[0], given[2]])),
            2
        );
        // A poll that does not acknowledge leaves the unacked one in flight.
        assert!(poll_explicit(&mut h, 3, "b").is_empty());
        h.tick(5_001);
        assert_eq!(poll_explicit(&mut h, 5_002, "b"), [given[1]]);
    }

    #[test]
    fn ack_by_cursor_covers_every_id_up_to_it() {
        let mut h = Harness::new(ack_mode());
        for body in ["1", "2", "3"] {
            h.publish(0, "b", body);
        }
        let given = poll_explicit(&mut h, 1, "b");
        assert_eq!(ack(&mut h, 2, "b", AckSelector::UpTo(given[1])), 2);
        h.publish(2, "b", "4");
        assert_eq!(
            ack(&mut h, 2, "b", AckSelector::UpTo(given[1])),
            0,
            "acks are idempotent"
        );
        h.tick(5_001);
        let again = poll_explicit(&mut h, 5_002, "b");
        assert_eq!(again[0], given[2]);
        assert_eq!(
            again.len(),
            2,
            "the one published after the ack is not covered"
        );
    }

    #[test]
    fn ack_by_id_covers_a_message_that_is_ready_again_after_a_restart() {
        let mut h = Harness::new(ack_mode());
        h.publish(0, "b", "1");
        let given = poll_explicit(&mut h, 1, "b");
        // As after a restart or a visibility timeout: the client holds it, but the
        // core has it back in line.
        h.tick(5_001);
        assert_eq!(h.broker.stats().ready, 1);
        assert_eq!(ack(&mut h, 5_002, "b", AckSelector::Ids(given.clone())), 1);
        assert!(poll_explicit(&mut h, 5_003, "b").is_empty());
    }

    #[test]
    fn message_given_out_max_deliveries_times_moves_to_dead_letters() {
        let mut h = Harness::new(BrokerConfig {
            max_deliveries: 2,
            ..ack_mode()
        });
        h.publish(0, "b", "poison");
        h.publish(0, "b", "fine");
        assert_eq!(poll_explicit(&mut h, 1, "b").len(), 2);
        h.tick(5_001);
        let again = poll_explicit(&mut h, 5_002, "b");
        assert_eq!(again.len(), 2);
        ack(&mut h, 5_003, "b", AckSelector::Ids(vec![again[1]]));
        h.tick(10_003);
        assert!(
            poll_explicit(&mut h, 10_004, "b").is_empty(),
            "nothing left to give"
        );
        assert_eq!(h.broker.stats().dead_letters, 1);
        let (to, out) = h.send(
            10_005,
            Request::DeadLetters(DeadLetterOp::List { limit: 10 }),
        );
        match reply_for(&out, to).unwrap() {
            Response::DeadLetters { letters, total } => {
                assert_eq!(total, 1);
                assert_eq!(letters[0].body, "poison");
                assert_eq!(letters[0].session, "b");
                assert_eq!(letters[0].deliveries, 2);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn replayed_dead_letter_is_delivered_again_and_purged_one_is_gone() {
        let mut h = Harness::new(BrokerConfig {
            max_deliveries: 1,
            ..ack_mode()
        });
        h.publish(0, "b", "x");
        h.publish(0, "b", "y");
        poll_explicit(&mut h, 1, "b");
        h.tick(5_001);
        assert_eq!(h.broker.stats().dead_letters, 2);
        let (to, out) = h.send(
            5_002,
            Request::DeadLetters(DeadLetterOp::Purge { ids: Some(vec![2]) }),
        );
        assert_eq!(reply_for(&out, to), Some(Response::Count(1)));
        // A parked poll is answered by the replay at once.
        let (poll, _) = h.poll(5_003, "b", 10_000);
        let (to, out) = h.send(
            5_004,
            Request::DeadLetters(DeadLetterOp::Replay { ids: None }),
        );
        assert_eq!(reply_for(&out, to), Some(Response::Count(1)));
        assert_eq!(bodies(&reply_for(&out, poll).unwrap()), ["x"]);
        assert_eq!(h.broker.stats().dead_letters, 0);
    }

    #[test]
    fn dead_letter_requests_answer_even_when_empty() {
        let mut h = Harness::new(ack_mode());
        let (to, out) = h.send(
            0,
            Request::DeadLetters(DeadLetterOp::Replay {
                ids: Some(vec![42]),
            }),
        );
        assert_eq!(reply_for(&out, to), Some(Response::Count(0)));
    }

    #[test]
    fn publish_retried_with_the_same_key_is_stored_once() {
        let mut h = Harness::new(BrokerConfig {
            dedup_window: Duration::from_secs(60),
            ..BrokerConfig::default()
        });
        let first = publish_keyed(&mut h, 0, "a", "k1", "once");
        let Response::Published {
            id,
            duplicate: false,
            ..
        } = first
        else {
            panic!("{first:?}")
        };
        assert_eq!(
            publish_keyed(&mut h, 10, "a", "k1", "once"),
            Response::Published {
                id,
                dropped: 0,
                duplicate: true
            }
        );
        // Another sender may use the same key for its own message.
        assert!(matches!(
            publish_keyed(&mut h, 20, "c", "k1", "other"),
            Response::Published {
                duplicate: false,
                ..
            }
        ));
        let (to, out) = h.poll(30, "b", 0);
        assert_eq!(bodies(&reply_for(&out, to).unwrap()), ["once", "other"]);
        // Still a duplicate after delivery, inside the window.
        assert!(matches!(
            publish_keyed(&mut h, 40, "a", "k1", "once"),
            Response::Published {
                duplicate: true,
                ..
            }
        ));
        h.broker.sweep(h.at(60_020), &mut Vec::new());
        assert_eq!(h.broker.stats().dedup_keys, 0);
        assert!(matches!(
            publish_keyed(&mut h, 60_021, "a", "k1", "once"),
            Response::Published {
                duplicate: false,
                ..
            }
        ));
    }

    #[test]
    fn closed_connection_puts_what_went_out_on_it_back_in_line() {
        let mut h = Harness::new(ack_mode());
        h.publish(0, "b", "1");
        let (to, out) = h.poll(1, "b", 0);
        assert_eq!(bodies(&reply_for(&out, to).unwrap()), ["1"]);
        h.broker.connection_closed(h.at(2), CONN, &mut Vec::new());
        assert_eq!(h.broker.stats().in_flight, 0);
        assert_eq!(h.broker.stats().pending_timers, 0);
        // The browser's next poll (through another handler) gets it again at once,
        // without waiting for the visibility timeout.
        let (to, out) = h.poll(3, "b", 0);
        assert_eq!(bodies(&reply_for(&out, to).unwrap()), ["1"]);
    }

    #[test]
    fn shutdown_tells_parked_polls_to_go_elsewhere() {
        let mut h = Harness::new(BrokerConfig::default());
        let (poll, _) = h.poll(0, "b", 10_000);
        let mut out = Vec::new();
        h.broker.shutdown(&mut out);
        match reply_for(&out, poll) {
            Some(Response::Error(e)) => assert_eq!(e.kind, ErrorKind::ShuttingDown),
            other => panic!("{other:?}"),
        }
        assert_eq!(h.broker.stats().parked_polls, 0);
        assert_eq!(h.broker.stats().pending_timers, 0);
    }

    #[test]
    fn memory_only_ids_start_from_the_wall_clock() {
        let t0 = Instant::now();
        let mut broker = Broker::new(
            BrokerConfig::default(),
            ClockAnchor {
                instant: t0,
                unix_ms: 1_700_000_000_000,
            },
        );
        let mut out = Vec::new();
        let to = ReplyTo {
            conn: 1,
            request: 1,
        };
        broker.handle(
            t0,
            to,
            Request::Publish {
                src: "a".into(),
                dst: "b".into(),
                body: "x".into(),
                key: None,
            },
            &mut out,
        );
        let Some(Response::Published { id, .. }) = reply_for(&out, to) else {
            panic!("{out:?}")
        };
        assert_eq!(id, 1_700_000_000_000_000);
        assert!(id < 1 << 53, "exact as a JavaScript number");
    }

    #[test]
    fn memory_only_broker_journals_nothing() {
        let mut h = Harness::new(BrokerConfig::default());
        h.publish(0, "b", "x");
        h.poll(1, "b", 0);
        let records = h.broker.take_journal();
        assert!(records.is_empty(), "{records:?}");
    }

    #[test]
    fn restore_gives_back_what_was_pending_with_in_flight_ready_again() {
        let mut h = Harness::durable(ack_mode());
        h.publish(0, "b", "acked");
        h.publish(0, "b", "in flight");
        h.publish(0, "c", "ready");
        let given = poll_explicit(&mut h, 1, "b");
        ack(&mut h, 2, "b", AckSelector::Ids(vec![given[0]]));
        let recovered = replay(&mut h);
        let mut restored = Harness {
            broker: Broker::restore(
                ack_mode(),
                ClockAnchor {
                    instant: h.t0,
                    unix_ms: 0,
                },
                recovered,
                h.at(3),
            ),
            t0: h.t0,
            next_request: 1,
        };
        let (to, out) = restored.poll(4, "b", 0);
        assert_eq!(bodies(&reply_for(&out, to).unwrap()), ["in flight"]);
        let (to, out) = restored.poll(4, "c", 0);
        assert_eq!(bodies(&reply_for(&out, to).unwrap()), ["ready"]);
        // Ids continue after the highest stored one.
        assert!(matches!(
            restored.publish(5, "b", "new"),
            Response::Published { id: 4, .. }
        ));
    }

    #[test]
    fn restore_drops_what_expired_while_down_and_keeps_publish_keys() {
        let config = BrokerConfig {
            message_ttl: Some(Duration::from_secs(10)),
            ..BrokerConfig::default()
        };
        let mut h = Harness::durable(config.clone());
        h.publish(0, "b", "stale");
        publish_keyed(&mut h, 5_000, "a", "k", "fresh");
        let recovered = replay(&mut h);
        let t = h.at(12_000);
        let mut restored = Harness {
            broker: Broker::restore(
                config,
                ClockAnchor {
                    instant: t,
                    unix_ms: 12_000,
                },
                recovered,
                t,
            ),
            t0: h.t0,
            next_request: 1,
        };
        assert!(matches!(
            publish_keyed(&mut restored, 12_001, "a", "k", "fresh"),
            Response::Published {
                duplicate: true,
                ..
            }
        ));
        let (to, out) = restored.poll(12_002, "b", 0);
        assert_eq!(bodies(&reply_for(&out, to).unwrap()), ["fresh"]);
    }

    #[test]
    fn dead_letters_survive_a_restore_and_stay_dead() {
        let mut h = Harness::durable(BrokerConfig {
            max_deliveries: 1,
            ..ack_mode()
        });
        h.publish(0, "b", "x");
        poll_explicit(&mut h, 1, "b");
        h.tick(5_001);
        let recovered = replay(&mut h);
        let broker = Broker::restore(
            ack_mode(),
            ClockAnchor {
                instant: h.at(0),
                unix_ms: 0,
            },
            recovered,
            h.at(6_000),
        );
        assert_eq!(broker.stats().dead_letters, 1);
        assert_eq!(broker.stats().ready, 0);
    }

    /// The routing rules of the versioned API.
    mod routing_rules {
        use super::*;
        use serde_json::{Value, json};

        fn ask(h: &mut Harness, ms: u64, request: Request) -> Response {
            let (to, out) = h.send(ms, request);
            reply_for(&out, to).expect("answered at once")
        }

        fn message(src: Option<&str>, target: Option<Target>, data: &str) -> Send {
            Send {
                src: src.map(Into::into),
                target,
                subject: None,
                reference: None,
                data: data.into(),
                ttl_ms: None,
                key: None,
                expect_reply_ms: None,
            }
        }

        fn send(h: &mut Harness, ms: u64, send: Send) -> Response {
            ask(h, ms, Request::Send(Box::new(send)))
        }

        /// The kind of error a response is, if it is one.
        fn refusal(response: &Response) -> Option<ErrorKind> {
            match response {
                Response::Error(e) => Some(e.kind),
                _ => None,
            }
        }

        fn recipients(response: &Response) -> u32 {
            match response {
                Response::Sent { recipients, .. } => *recipients,
                other => panic!("expected Sent, got {other:?}"),
            }
        }

        fn to_user(h: &mut Harness, ms: u64, user: &str, data: &str) -> Response {
            send(h, ms, message(None, Some(Target::User(user.into())), data))
        }

        fn sent_id(response: &Response) -> MessageId {
            match response {
                Response::Sent { id, .. } => *id,
                other => panic!("expected Sent, got {other:?}"),
            }
        }

        fn to_channel(
            h: &mut Harness,
            ms: u64,
            channel: &str,
            subject: Option<&str>,
            data: &str,
        ) -> Response {
            let mut m = message(Some("pub"), Some(Target::Channel(channel.into())), data);
            m.subject = subject.map(Into::into);
            send(h, ms, m)
        }

        fn sub(channel: &str, subject: Option<&str>, group: Option<&str>) -> Subscription {
            Subscription {
                channel: channel.into(),
                subject: subject.map(Into::into),
                group: group.map(Into::into),
            }
        }

        fn subscribe(
            h: &mut Harness,
            ms: u64,
            session: &str,
            s: Subscription,
            since: Option<MessageId>,
        ) -> Response {
            ask(
                h,
                ms,
                Request::Subscribe {
                    session: session.into(),
                    subscription: s,
                    since,
                },
            )
        }

        /// The envelopes a poll at `ms` gives `session` at once.
        fn envelopes(h: &mut Harness, ms: u64, session: &str) -> Vec<Value> {
            let (to, out) = h.poll(ms, session, 0);
            match reply_for(&out, to).unwrap() {
                Response::Messages(batch) => batch
                    .iter()
                    .map(|m| serde_json::from_str(&m.body).expect("an envelope is JSON"))
                    .collect(),
                other => panic!("expected messages, got {other:?}"),
            }
        }

        fn data(h: &mut Harness, ms: u64, session: &str) -> Vec<Value> {
            envelopes(h, ms, session)
                .into_iter()
                .map(|e| e["data"].clone())
                .collect()
        }

        fn bind(h: &mut Harness, ms: u64, session: &str, user: &str, exclusive: bool) -> Response {
            ask(
                h,
                ms,
                Request::Bind {
                    session: session.into(),
                    user: user.into(),
                    exclusive,
                },
            )
        }

        fn send_with_ttl(h: &mut Harness, ms: u64, to: &str, data: &str, ttl_ms: Option<u64>) {
            let mut m = message(Some("a"), Some(Target::Session(to.into())), data);
            m.ttl_ms = ttl_ms;
            sent_id(&send(h, ms, m));
        }

        fn sweep(h: &mut Harness, ms: u64) -> (u64, usize) {
            let mut out = Vec::new();
            h.broker.sweep(h.at(ms), &mut out);
            let ready = h.broker.mailboxes.get("b").map_or(0, |m| m.ready.len());
            (h.broker.counters().expired, ready)
        }

        #[test]
        fn the_sweep_drops_each_message_when_its_own_ttl_is_due() {
            let mut h = Harness::new(BrokerConfig::default());
            send_with_ttl(&mut h, 0, "b", "1", None);
            send_with_ttl(&mut h, 0, "b", "2", Some(5_000));
            // Behind a message that lives longer.
            send_with_ttl(&mut h, 0, "b", "3", Some(1_000));
            assert_eq!(sweep(&mut h, 500), (0, 3));
            assert_eq!(sweep(&mut h, 1_500), (1, 2));
            assert_eq!(sweep(&mut h, 6_000), (2, 1));
            // Nothing left that expires; then one comes that does.
            send_with_ttl(&mut h, 7_000, "b", "4", Some(1_000));
            assert_eq!(sweep(&mut h, 7_500), (2, 2));
            assert_eq!(sweep(&mut h, 8_500), (3, 1));
        }

        #[test]
        fn a_redelivered_message_expires_in_the_sweep_as_it_would_have_before() {
            let mut h = Harness::new(ack_mode());
            send_with_ttl(&mut h, 0, "b", "long", Some(20_000));
            h.poll(1, "b", 0);
            // Expires while the first is in flight: the sweep sees nothing else due.
            send_with_ttl(&mut h, 10, "b", "short", Some(100));
            assert_eq!(sweep(&mut h, 200), (1, 0));
            h.tick(5_100);
            assert_eq!(
                sweep(&mut h, 5_200),
                (1, 1),
                "back after the visibility timeout"
            );
            assert_eq!(sweep(&mut h, 21_000), (2, 0));
        }

        #[test]
        fn envelope_carries_id_time_source_target_subject_reference_ttl_and_raw_data() {
            let mut h = Harness::new(BrokerConfig::default());
            let mut m = message(
                Some("a"),
                Some(Target::Session("b".into())),
                r#"{"n":1.50}"#,
            );
            m.subject = Some("greeting".into());
            m.reference = Some(7);
            m.ttl_ms = Some(1500);
            let id = sent_id(&send(&mut h, 3, m));
            let (to, out) = h.poll(4, "b", 0);
            let Response::Messages(batch) = reply_for(&out, to).unwrap() else {
                panic!()
            };
            assert_eq!(
                batch[0].body,
                format!(
                    r#"{{"id":{id},"time":3,"source":"a","target":{{"session":"b"}},"subject":"greeting","reference":7,"ttl":1.5,"data":{{"n":1.50}}}}"#
                )
            );
        }

        #[test]
        fn user_target_reaches_every_session_bound_to_that_user_only() {
            let mut h = Harness::new(BrokerConfig::default());
            for tab in ["t1", "t2", "t3"] {
                bind(&mut h, 0, tab, "u1", false);
            }
            bind(&mut h, 0, "other", "u2", false);
            let r = to_user(&mut h, 1, "u1", "1");
            assert_eq!(recipients(&r), 3, "{r:?}");
            let id = sent_id(&r);
            for tab in ["t1", "t2", "t3"] {
                let got = envelopes(&mut h, 2, tab);
                assert_eq!(got.len(), 1, "{tab}");
                assert_eq!(got[0]["id"], json!(id), "every copy has the message's id");
                assert_eq!(got[0]["source"], Value::Null);
                assert_eq!(got[0]["target"], json!({"user":"u1"}));
            }
            assert!(envelopes(&mut h, 2, "other").is_empty());
            // Binding again moves the session to the other user.
            bind(&mut h, 3, "t3", "u2", false);
            let r = to_user(&mut h, 4, "u1", "2");
            assert_eq!(recipients(&r), 2, "{r:?}");
        }

        #[test]
        fn broadcast_reaches_every_present_session_once() {
            let mut h = Harness::new(BrokerConfig::default());
            for i in 0..100 {
                h.poll(0, &format!("s{i}"), 0);
            }
            // Only a target, never present: not part of "everyone".
            h.publish(0, "target-only", "x");
            let r = send(&mut h, 1, message(None, Some(Target::Broadcast), "\"all\""));
            assert!(
                matches!(
                    r,
                    Response::Sent {
                        recipients: 100,
                        ..
                    }
                ),
                "{r:?}"
            );
            for i in 0..100 {
                assert_eq!(data(&mut h, 2, &format!("s{i}")), [json!("all")]);
            }
            assert_eq!(
                bodies(
                    &reply_for(
                        &h.poll(3, "target-only", 0).1,
                        ReplyTo {
                            conn: CONN,
                            request: h.next_request - 1
                        }
                    )
                    .unwrap()
                ),
                ["x"]
            );
        }

        #[test]
        fn channel_patterns_and_subject_patterns_select_subscribers() {
            let mut h = Harness::new(BrokerConfig::default());
            subscribe(
                &mut h,
                0,
                "eu-created",
                sub("orders.*", Some("created"), None),
                None,
            );
            subscribe(&mut h, 0, "all-orders", sub("orders.>", None, None), None);
            subscribe(&mut h, 0, "exact", sub("orders.eu", None, None), None);
            to_channel(&mut h, 1, "orders.eu", Some("created"), "1");
            to_channel(&mut h, 1, "orders.eu", Some("deleted"), "2");
            to_channel(&mut h, 1, "orders.eu.x", Some("created"), "3");
            to_channel(&mut h, 1, "other.eu", Some("created"), "4");
            to_channel(&mut h, 1, "orders.us", None, "5");
            assert_eq!(data(&mut h, 2, "eu-created"), [json!(1)]);
            assert_eq!(
                data(&mut h, 2, "all-orders"),
                [json!(1), json!(2), json!(3), json!(5)]
            );
            assert_eq!(data(&mut h, 2, "exact"), [json!(1), json!(2)]);
        }

        #[test]
        fn a_session_matched_by_two_subscriptions_gets_one_copy() {
            let mut h = Harness::new(BrokerConfig::default());
            subscribe(&mut h, 0, "s", sub("news.*", None, None), None);
            subscribe(&mut h, 0, "s", sub("news.sport", None, None), None);
            let r = to_channel(&mut h, 1, "news.sport", None, "1");
            assert_eq!(recipients(&r), 1, "{r:?}");
            assert_eq!(data(&mut h, 2, "s"), [json!(1)]);
        }

        #[test]
        fn consumer_group_shares_messages_one_member_each_in_turn() {
            let mut h = Harness::new(BrokerConfig::default());
            for w in ["w1", "w2", "w3"] {
                subscribe(&mut h, 0, w, sub("jobs", None, Some("workers")), None);
            }
            subscribe(&mut h, 0, "auditor", sub("jobs", None, None), None);
            for n in 0..300 {
                let r = to_channel(&mut h, 1, "jobs", None, &n.to_string());
                assert_eq!(recipients(&r), 2, "{r:?}");
            }
            let mut seen = HashSet::new();
            for w in ["w1", "w2", "w3"] {
                let got = data(&mut h, 2, w);
                assert_eq!(got.len(), 100, "{w}: a fair share");
                for n in got {
                    assert!(seen.insert(n.as_u64().unwrap()), "given twice");
                }
            }
            assert_eq!(seen.len(), 300);
            assert_eq!(
                data(&mut h, 2, "auditor").len(),
                300,
                "a plain subscriber sees all"
            );
        }

        #[test]
        fn paused_group_member_is_passed_over() {
            let mut h = Harness::new(BrokerConfig::default());
            for w in ["w1", "w2"] {
                subscribe(&mut h, 0, w, sub("jobs", None, Some("g")), None);
            }
            ask(
                &mut h,
                0,
                Request::SetPaused {
                    session: "w1".into(),
                    paused: true,
                },
            );
            for n in 0..4 {
                to_channel(&mut h, 1, "jobs", None, &n.to_string());
            }
            assert_eq!(data(&mut h, 2, "w2").len(), 4);
        }

        #[test]
        fn reply_goes_to_the_session_awaiting_it_and_nowhere_else() {
            let mut h = Harness::new(BrokerConfig::default());
            subscribe(&mut h, 0, "worker", sub("rpc.add", None, None), None);
            let request = to_channel(&mut h, 1, "rpc.add", None, "[1,2]");
            let id = sent_id(&request);
            ask(
                &mut h,
                1,
                Request::AwaitReply {
                    session: "pub".into(),
                    reference: id,
                    ttl_ms: 1_000,
                },
            );
            let got = envelopes(&mut h, 2, "worker");
            assert_eq!(got[0]["id"], json!(id));
            let mut reply = message(Some("worker"), None, "3");
            reply.reference = Some(id);
            let r = send(&mut h, 3, reply.clone());
            assert_eq!(recipients(&r), 1, "{r:?}");
            let got = envelopes(&mut h, 4, "pub");
            assert_eq!(got.len(), 1);
            assert_eq!(got[0]["reference"], json!(id));
            assert_eq!(got[0]["data"], json!(3));
            assert!(envelopes(&mut h, 4, "worker").is_empty());
            // After the registration expires, a reply has nowhere to go.
            let r = send(&mut h, 1_001, reply);
            assert_eq!(refusal(&r), Some(ErrorKind::NoRoute), "{r:?}");
        }

        #[test]
        fn expect_reply_registers_the_reply_route_with_the_request() {
            let mut h = Harness::new(BrokerConfig::default());
            let mut request = message(Some("client"), Some(Target::Session("server".into())), "{}");
            request.expect_reply_ms = Some(5_000);
            let id = sent_id(&send(&mut h, 0, request));
            let mut reply = message(Some("server"), None, "\"done\"");
            reply.reference = Some(id);
            send(&mut h, 1, reply);
            assert_eq!(data(&mut h, 2, "client"), [json!("done")]);
            let mut stray = message(Some("server"), None, "0");
            stray.reference = Some(id + 1000);
            assert!(matches!(
                send(&mut h, 2, stray),
                Response::Error(ipc::Error {
                    kind: ErrorKind::NoRoute,
                    ..
                })
            ));
        }

        fn with_history(len: usize, age_s: u64) -> BrokerConfig {
            BrokerConfig {
                channels: vec![ChannelSettings {
                    pattern: routing::Pattern::parse("news.>").unwrap(),
                    history_len: len,
                    history_age: (age_s > 0).then(|| Duration::from_secs(age_s)),
                    max_pending: 0,
                    priority: 0,
                }],
                ..BrokerConfig::default()
            }
        }

        #[test]
        fn resubscribing_since_the_last_seen_id_gives_exactly_what_was_missed() {
            let mut h = Harness::new(with_history(100, 0));
            let s = sub("news.eu", None, None);
            subscribe(&mut h, 0, "reader", s.clone(), None);
            to_channel(&mut h, 1, "news.eu", None, "1");
            to_channel(&mut h, 1, "news.eu", None, "2");
            let seen = envelopes(&mut h, 2, "reader");
            let last = seen.last().unwrap()["id"].as_u64().unwrap();
            ask(
                &mut h,
                3,
                Request::Unsubscribe {
                    session: "reader".into(),
                    subscription: s.clone(),
                },
            );
            for n in 3..=5 {
                to_channel(&mut h, 4, "news.eu", None, &n.to_string());
            }
            let r = subscribe(&mut h, 5, "reader", s, Some(last));
            assert_eq!(
                r,
                Response::Subscribed {
                    recovered: 3,
                    complete: true
                }
            );
            assert_eq!(data(&mut h, 6, "reader"), [json!(3), json!(4), json!(5)]);
        }

        #[test]
        fn resume_skips_what_the_session_still_holds() {
            let mut h = Harness::new(with_history(100, 0));
            let s = sub("news.eu", None, None);
            subscribe(&mut h, 0, "reader", s.clone(), None);
            let first = sent_id(&to_channel(&mut h, 1, "news.eu", None, "1"));
            to_channel(&mut h, 1, "news.eu", None, "2");
            // Still subscribed and nothing polled: resuming adds no second copy.
            let r = subscribe(&mut h, 2, "reader", s, Some(first - 1));
            assert_eq!(
                r,
                Response::Subscribed {
                    recovered: 0,
                    complete: true
                }
            );
            assert_eq!(data(&mut h, 3, "reader"), [json!(1), json!(2)]);
        }

        #[test]
        fn resume_says_incomplete_when_history_no_longer_reaches_back() {
            let mut h = Harness::new(with_history(2, 0));
            let first = sent_id(&to_channel(&mut h, 0, "news.eu", None, "1"));
            for n in 2..=4 {
                to_channel(&mut h, 0, "news.eu", None, &n.to_string());
            }
            let r = subscribe(&mut h, 1, "late", sub("news.eu", None, None), Some(first));
            assert_eq!(
                r,
                Response::Subscribed {
                    recovered: 2,
                    complete: false
                }
            );
            assert_eq!(data(&mut h, 2, "late"), [json!(3), json!(4)]);
            // A channel without history cannot vouch for anything.
            let r = subscribe(&mut h, 3, "late", sub("plain", None, None), Some(first));
            assert_eq!(
                r,
                Response::Subscribed {
                    recovered: 0,
                    complete: false
                }
            );
        }

        #[test]
        fn history_older_than_its_age_is_not_given() {
            let mut h = Harness::new(with_history(100, 10));
            to_channel(&mut h, 0, "news.eu", None, "\"old\"");
            to_channel(&mut h, 9_000, "news.eu", None, "\"new\"");
            let r = subscribe(&mut h, 10_500, "late", sub("news.eu", None, None), Some(0));
            assert_eq!(
                r,
                Response::Subscribed {
                    recovered: 1,
                    complete: false
                }
            );
            assert_eq!(data(&mut h, 10_600, "late"), [json!("new")]);
        }

        #[test]
        fn kicked_session_poll_ends_and_its_requests_are_refused() {
            let mut h = Harness::new(BrokerConfig::default());
            bind(&mut h, 0, "s", "u", false);
            subscribe(&mut h, 0, "s", sub("c", None, None), None);
            h.publish(0, "s", "queued");
            h.poll(0, "s", 0);
            let (parked, _) = h.poll(1, "s", 10_000);
            let (_, out) = h.send(
                2,
                Request::Kick {
                    session: "s".into(),
                    reason: "bye".into(),
                },
            );
            let ended = reply_for(&out, parked).expect("the parked poll is answered");
            assert_eq!(refusal(&ended), Some(ErrorKind::Kicked), "{ended:?}");
            let (to, out) = h.poll(3, "s", 0);
            assert_eq!(
                reply_for(&out, to).as_ref().and_then(refusal),
                Some(ErrorKind::Kicked)
            );
            assert_eq!(refusal(&h.publish(3, "s", "more")), Some(ErrorKind::Kicked));
            // Gone from channels and its user.
            let r = to_channel(&mut h, 3, "c", None, "1");
            assert_eq!(recipients(&r), 0, "{r:?}");
            let r = to_user(&mut h, 3, "u", "1");
            assert_eq!(recipients(&r), 0, "{r:?}");
            // Refused only for the retention.
            let later = 3 + BrokerConfig::default().kick_retention.as_millis() as u64;
            h.broker.sweep(h.at(later), &mut Vec::new());
            assert!(envelopes(&mut h, later, "s").is_empty());
        }

        #[test]
        fn release_makes_everything_in_flight_ready_again_at_once() {
            let mut h = Harness::new(ack_mode());
            h.publish(0, "s", "1");
            h.publish(0, "s", "2");
            assert_eq!(poll_explicit(&mut h, 1, "s").len(), 2);
            assert!(poll_explicit(&mut h, 2, "s").is_empty(), "in flight");
            let released = ask(
                &mut h,
                3,
                Request::Release {
                    session: "s".into(),
                },
            );
            assert_eq!(released, Response::Count(2));
            let (to, out) = h.poll(4, "s", 0);
            assert_eq!(bodies(&reply_for(&out, to).unwrap()), ["1", "2"]);
        }

        #[test]
        fn exclusive_bind_kicks_the_users_other_sessions() {
            let mut h = Harness::new(BrokerConfig::default());
            bind(&mut h, 0, "old1", "u", false);
            bind(&mut h, 0, "old2", "u", false);
            assert_eq!(bind(&mut h, 1, "new", "u", true), Response::Count(2));
            let (to, out) = h.poll(2, "old1", 0);
            assert_eq!(
                reply_for(&out, to).as_ref().and_then(refusal),
                Some(ErrorKind::Kicked)
            );
            let r = to_user(&mut h, 3, "u", "1");
            assert_eq!(recipients(&r), 1, "{r:?}");
        }

        #[test]
        fn paused_session_receives_nothing_until_resumed() {
            let mut h = Harness::new(BrokerConfig::default());
            ask(
                &mut h,
                0,
                Request::SetPaused {
                    session: "s".into(),
                    paused: true,
                },
            );
            h.publish(1, "s", "1");
            h.publish(1, "s", "2");
            let (to, out) = h.poll(2, "s", 0);
            assert_eq!(reply_for(&out, to), Some(Response::Messages(Vec::new())));
            let (parked, out) = h.poll(3, "s", 10_000);
            assert_eq!(reply_for(&out, parked), None, "parks while paused");
            h.publish(4, "s", "3");
            let (_, out) = h.send(
                5,
                Request::SetPaused {
                    session: "s".into(),
                    paused: false,
                },
            );
            assert_eq!(
                bodies(&reply_for(&out, parked).expect("resume delivers")),
                ["1", "2", "3"]
            );
        }

        fn prioritised() -> BrokerConfig {
            let settings = |pattern: &str, priority, max_pending| ChannelSettings {
                pattern: routing::Pattern::parse(pattern).unwrap(),
                history_len: 0,
                history_age: None,
                max_pending,
                priority,
            };
            BrokerConfig {
                channels: vec![settings("alerts", 5, 0), settings("chatter", 0, 2)],
                ..BrokerConfig::default()
            }
        }

        #[test]
        fn higher_priority_channel_is_given_first_and_max_caps_the_batch() {
            let mut h = Harness::new(prioritised());
            subscribe(&mut h, 0, "s", sub("alerts", None, None), None);
            subscribe(&mut h, 0, "s", sub("chatter", None, None), None);
            to_channel(&mut h, 1, "chatter", None, "\"c1\"");
            to_channel(&mut h, 1, "alerts", None, "\"a1\"");
            to_channel(&mut h, 1, "chatter", None, "\"c2\"");
            to_channel(&mut h, 1, "alerts", None, "\"a2\"");
            let take = |h: &mut Harness, max| {
                let (to, out) = h.send(
                    2,
                    Request::Poll {
                        session: "s".into(),
                        timeout_ms: 0,
                        ack_previous: true,
                        max,
                    },
                );
                let Response::Messages(batch) = reply_for(&out, to).unwrap() else {
                    panic!()
                };
                batch
                    .iter()
                    .map(|m| serde_json::from_str::<Value>(&m.body).unwrap()["data"].clone())
                    .collect::<Vec<_>>()
            };
            assert_eq!(take(&mut h, 1), [json!("a1")]);
            assert_eq!(take(&mut h, 0), [json!("a2"), json!("c1"), json!("c2")]);
        }

        #[test]
        fn max_pending_drops_the_oldest_of_that_channel_only() {
            let mut h = Harness::new(prioritised());
            subscribe(&mut h, 0, "s", sub("chatter", None, None), None);
            h.publish(0, "s", "\"x0\"");
            for n in 1..=3 {
                let r = to_channel(&mut h, 1, "chatter", None, &n.to_string());
                let dropped = if n == 3 { 1 } else { 0 };
                assert!(
                    matches!(r, Response::Sent { dropped: d, .. } if d == dropped),
                    "{r:?}"
                );
            }
            let (to, out) = h.poll(2, "s", 0);
            let got = bodies(&reply_for(&out, to).unwrap())
                .iter()
                .map(|b| b.to_string())
                .collect::<Vec<_>>();
            assert_eq!(got.len(), 3);
            assert_eq!(got[0], "\"x0\"", "other messages stay");
            assert!(
                got[1].ends_with(r#""data":2}"#) && got[2].ends_with(r#""data":3}"#),
                "{got:?}"
            );
        }

        #[test]
        fn a_send_refused_for_a_full_mailbox_is_not_taken_for_a_duplicate_when_retried() {
            let mut h = Harness::new(BrokerConfig {
                mailbox_max_len: 1,
                overflow: OverflowPolicy::Reject,
                ..BrokerConfig::default()
            });
            let keyed = |key: &str| {
                let mut m = message(Some("a"), Some(Target::Session("b".into())), "1");
                m.key = Some(key.into());
                m
            };
            sent_id(&send(&mut h, 0, keyed("k1")));
            let refused = send(&mut h, 1, keyed("k2"));
            assert_eq!(refusal(&refused), Some(ErrorKind::MailboxFull));
            assert_eq!(data(&mut h, 2, "b").len(), 1);
            let retried = send(&mut h, 3, keyed("k2"));
            assert!(
                matches!(
                    retried,
                    Response::Sent {
                        recipients: 1,
                        duplicate: false,
                        ..
                    }
                ),
                "{retried:?}"
            );
            assert_eq!(data(&mut h, 4, "b").len(), 1, "delivered this time");
        }

        #[test]
        fn a_cursor_past_a_message_never_given_does_not_acknowledge_it() {
            let mut h = Harness::new(BrokerConfig {
                delivery: DeliveryMode::Ack,
                ..prioritised()
            });
            subscribe(&mut h, 0, "s", sub("chatter", None, None), None);
            subscribe(&mut h, 0, "s", sub("alerts", None, None), None);
            let low = sent_id(&to_channel(&mut h, 1, "chatter", None, "1"));
            let high = sent_id(&to_channel(&mut h, 1, "alerts", None, "2"));
            let (to, out) = h.send(
                2,
                Request::Poll {
                    session: "s".into(),
                    timeout_ms: 0,
                    ack_previous: false,
                    max: 1,
                },
            );
            assert_eq!(ids(&reply_for(&out, to).unwrap()), [high], "priority first");
            let acked = ask(
                &mut h,
                3,
                Request::Ack {
                    session: "s".into(),
                    which: AckSelector::UpTo(high),
                },
            );
            assert_eq!(
                acked,
                Response::Acked { count: 1 },
                "not the one never given"
            );
            assert_eq!(poll_explicit(&mut h, 4, "s"), [low]);
        }

        #[test]
        fn silent_session_leaves_its_channels_and_user_and_says_so() {
            let mut h = Harness::new(BrokerConfig::default());
            subscribe(
                &mut h,
                0,
                "watcher",
                sub("$sys", Some("session.*"), None),
                None,
            );
            bind(&mut h, 0, "s", "u", false);
            subscribe(&mut h, 0, "s", sub("c", None, None), None);
            let joined = envelopes(&mut h, 1, "watcher");
            assert_eq!(
                joined.len(),
                2,
                "the watcher's own arrival comes first: {joined:?}"
            );
            assert_eq!(joined[1]["subject"], json!("session.joined"));
            assert_eq!(joined[1]["data"], json!({"session":"s","user":"u"}));
            // The watcher keeps polling; "s" goes silent.
            let timeout = BrokerConfig::default().session_timeout.as_millis() as u64;
            h.poll(timeout, "watcher", 0);
            h.broker.sweep(h.at(timeout + 1), &mut Vec::new());
            let left = envelopes(&mut h, timeout + 2, "watcher");
            assert_eq!(left.len(), 1, "{left:?}");
            assert_eq!(left[0]["subject"], json!("session.left"));
            assert_eq!(left[0]["data"], json!({"session":"s","user":"u"}));
            let r = to_channel(&mut h, timeout + 3, "c", None, "1");
            assert_eq!(recipients(&r), 0, "{r:?}");
            let r = to_user(&mut h, timeout + 3, "u", "1");
            assert_eq!(recipients(&r), 0, "{r:?}");
        }

        #[test]
        fn system_events_announce_channels_and_kicks() {
            let mut h = Harness::new(BrokerConfig::default());
            subscribe(&mut h, 0, "watcher", sub("$sys", None, None), None);
            envelopes(&mut h, 0, "watcher");
            let s = sub("room.1", None, None);
            subscribe(&mut h, 1, "a", s.clone(), None);
            ask(
                &mut h,
                2,
                Request::Unsubscribe {
                    session: "a".into(),
                    subscription: s,
                },
            );
            ask(
                &mut h,
                3,
                Request::Kick {
                    session: "a".into(),
                    reason: "spam".into(),
                },
            );
            let events: Vec<(Value, Value)> = envelopes(&mut h, 4, "watcher")
                .into_iter()
                .map(|e| (e["subject"].clone(), e["data"].clone()))
                .collect();
            assert_eq!(
                events,
                [
                    (json!("session.joined"), json!({"session":"a","user":null})),
                    (json!("channel.created"), json!({"channel":"room.1"})),
                    (json!("channel.removed"), json!({"channel":"room.1"})),
                    (
                        json!("session.kicked"),
                        json!({"session":"a","user":null,"reason":"spam"})
                    ),
                ]
            );
        }

        #[test]
        fn presence_lists_subscribed_sessions_with_their_users() {
            let mut h = Harness::new(BrokerConfig::default());
            bind(&mut h, 0, "b", "ub", false);
            subscribe(&mut h, 0, "b", sub("room.*", None, None), None);
            subscribe(&mut h, 0, "a", sub("room.1", None, None), None);
            subscribe(&mut h, 0, "c", sub("room.2", None, None), None);
            let r = ask(
                &mut h,
                1,
                Request::Presence {
                    channel: "room.1".into(),
                },
            );
            assert_eq!(
                r,
                Response::Presence(vec![
                    Present {
                        session: "a".into(),
                        user: None
                    },
                    Present {
                        session: "b".into(),
                        user: Some("ub".into())
                    },
                ])
            );
        }

        #[test]
        fn clients_cannot_publish_to_core_channels_or_wildcards() {
            let mut h = Harness::new(BrokerConfig::default());
            for bad in ["$sys", "orders.*", "a..b"] {
                let r = to_channel(&mut h, 0, bad, None, "1");
                assert_eq!(refusal(&r), Some(ErrorKind::InvalidRequest), "{bad}: {r:?}");
            }
            let r = subscribe(&mut h, 0, "s", sub("a.>.b", None, None), None);
            assert_eq!(refusal(&r), Some(ErrorKind::InvalidRequest), "{r:?}");
        }

        #[test]
        fn subscriptions_bindings_pauses_and_kicks_survive_a_restore() {
            let mut h = Harness::durable(BrokerConfig::default());
            subscribe(&mut h, 0, "reader", sub("news", None, None), None);
            bind(&mut h, 0, "reader", "u", false);
            ask(
                &mut h,
                0,
                Request::SetPaused {
                    session: "paused".into(),
                    paused: true,
                },
            );
            ask(
                &mut h,
                0,
                Request::Kick {
                    session: "bad".into(),
                    reason: String::new(),
                },
            );
            let recovered = replay(&mut h);
            let mut r = Harness {
                broker: Broker::restore(
                    BrokerConfig::default(),
                    ClockAnchor {
                        instant: h.t0,
                        unix_ms: 0,
                    },
                    recovered,
                    h.at(10),
                ),
                t0: h.t0,
                next_request: 1,
            };
            let sent = to_channel(&mut r, 11, "news", None, "1");
            assert!(
                matches!(sent, Response::Sent { recipients: 1, .. }),
                "{sent:?}"
            );
            let sent = to_user(&mut r, 11, "u", "2");
            assert!(
                matches!(sent, Response::Sent { recipients: 1, .. }),
                "{sent:?}"
            );
            assert_eq!(data(&mut r, 12, "reader"), [json!(1), json!(2)]);
            r.publish(12, "paused", "x");
            let (to, out) = r.poll(13, "paused", 0);
            assert_eq!(
                reply_for(&out, to),
                Some(Response::Messages(Vec::new())),
                "still paused"
            );
            assert_eq!(refusal(&r.publish(13, "bad", "x")), Some(ErrorKind::Kicked));
        }

        #[test]
        fn fanned_out_copies_are_stored_apart_and_acked_apart() {
            let mut h = Harness::durable(ack_mode());
            for s in ["a", "b"] {
                subscribe(&mut h, 0, s, sub("c", None, None), None);
            }
            let id = sent_id(&to_channel(&mut h, 1, "c", None, "1"));
            let given = poll_explicit(&mut h, 2, "a");
            assert_eq!(given, [id]);
            ack(&mut h, 3, "a", AckSelector::Ids(vec![id]));
            let recovered = replay(&mut h);
            assert_eq!(recovered.messages.len(), 1, "b's copy only");
            let (_, (copy, _)) = recovered.messages.iter().next().unwrap();
            assert_eq!((copy.id, copy.session.as_str()), (id, "b"));
            let mut restored = Harness {
                broker: Broker::restore(
                    ack_mode(),
                    ClockAnchor {
                        instant: h.t0,
                        unix_ms: 0,
                    },
                    recovered,
                    h.at(4),
                ),
                t0: h.t0,
                next_request: 1,
            };
            assert_eq!(poll_explicit(&mut restored, 5, "b"), [id]);
            assert!(poll_explicit(&mut restored, 5, "a").is_empty());
        }
    }

    #[cfg(test)]
    /// Back-pressure: what the core holds in all is bounded, refusals store nothing,
    /// and room comes back by itself.
    mod limits {
        use super::*;

        fn limited(max_queued_bytes: u64, max_sessions: usize) -> BrokerConfig {
            BrokerConfig {
                max_queued_bytes,
                max_sessions,
                ..BrokerConfig::default()
            }
        }

        fn overloaded(response: &Response) -> bool {
            matches!(response, Response::Error(e) if e.kind == ErrorKind::Overloaded)
        }

        fn published(response: &Response) -> bool {
            matches!(response, Response::Published { .. })
        }

        /// The bytes the broker holds, counted by walking everything.
        fn walked(broker: &Broker) -> u64 {
            let mailboxes = broker.mailboxes.values().map(|m| {
                m.ready.iter().map(|s| s.message.body.len()).sum::<usize>()
                    + m.in_flight
                        .values()
                        .map(|f| f.stored.message.body.len())
                        .sum::<usize>()
            });
            let dead = broker.dead.values().map(|d| d.stored.message.body.len());
            (mailboxes.sum::<usize>() + dead.sum::<usize>()) as u64
        }

        fn channel_send(data: &str) -> Request {
            Request::Send(Box::new(Send {
                src: None,
                target: Some(Target::Channel("c".into())),
                subject: None,
                reference: None,
                data: data.into(),
                ttl_ms: None,
                key: None,
                expect_reply_ms: None,
            }))
        }

        fn subscribe(
            h: &mut Harness,
            ms: u64,
            session: &str,
            since: Option<MessageId>,
        ) -> Response {
            let (to, out) = h.send(
                ms,
                Request::Subscribe {
                    session: session.into(),
                    subscription: Subscription {
                        channel: "c".into(),
                        subject: None,
                        group: None,
                    },
                    since,
                },
            );
            reply_for(&out, to).unwrap()
        }

        #[test]
        fn publish_over_max_queued_bytes_is_refused_and_nothing_is_stored() {
            let mut h = Harness::new(limited(10, 0));
            assert!(published(&h.publish(0, "b", "12345")));
            let refused = h.publish(1, "b", "123456");
            assert!(overloaded(&refused), "{refused:?}");
            assert_eq!(h.broker.stats().ready, 1);
            assert_eq!(h.broker.queued_bytes(), 5);
            // Up to the limit exactly is still room.
            assert!(published(&h.publish(2, "b", "12345")));
            assert_eq!(h.broker.queued_bytes(), 10);
        }

        #[test]
        fn x0_delivery_frees_room_and_publishing_works_again() {
            let mut h = Harness::new(limited(4, 0));
            assert!(published(&h.publish(0, "b", "1234")));
            assert!(overloaded(&h.publish(1, "b", "5")));
            let (to, out) = h.poll(2, "b", 0);
            assert_eq!(bodies(&reply_for(&out, to).unwrap()), ["1234"]);
            assert_eq!(h.broker.queued_bytes(), 0);
            assert!(published(&h.publish(3, "b", "5")));
        }

        #[test]
        fn in_flight_messages_count_until_acknowledged() {
            let mut h = Harness::new(BrokerConfig {
                max_queued_bytes: 4,
                ..ack_mode()
            });
            h.publish(0, "b", "1234");
            h.poll(1, "b", 0);
            assert_eq!(h.broker.stats().in_flight, 1);
            assert!(overloaded(&h.publish(2, "b", "5")), "in flight still held");
            h.send(
                3,
                Request::Ack {
                    session: "b".into(),
                    which: AckSelector::All,
                },
            );
            assert_eq!(h.broker.queued_bytes(), 0);
            assert!(published(&h.publish(4, "b", "5")));
        }

        #[test]
        fn expired_and_dropped_messages_give_their_bytes_back() {
            let mut h = Harness::new(BrokerConfig {
                max_queued_bytes: 100,
                mailbox_max_len: 2,
                message_ttl: Some(Duration::from_secs(10)),
                ..BrokerConfig::default()
            });
            for body in ["aaa", "bbb", "ccc"] {
                assert!(published(&h.publish(0, "b", body)));
            }
            assert_eq!(h.broker.queued_bytes(), 6, "the oldest was dropped");
            h.broker.sweep(h.at(10_000), &mut Vec::new());
            assert_eq!(h.broker.queued_bytes(), 0, "expired");
        }

        #[test]
        fn dead_letters_count_until_purged_and_replay_keeps_them_counted() {
            let mut h = Harness::new(BrokerConfig {
                max_queued_bytes: 4,
                max_deliveries: 1,
                ..ack_mode()
            });
            h.publish(0, "b", "1234");
            h.poll(1, "b", 0);
            h.tick(5_001); // visibility timeout: given once, so dead
            assert_eq!(h.broker.stats().dead_letters, 1);
            assert!(overloaded(&h.publish(5_002, "b", "5")));
            h.send(
                5_003,
                Request::DeadLetters(DeadLetterOp::Replay { ids: None }),
            );
            assert_eq!(h.broker.queued_bytes(), 4);
            h.poll(5_004, "b", 0);
            h.tick(10_005);
            h.send(
                10_006,
                Request::DeadLetters(DeadLetterOp::Purge { ids: None }),
            );
            assert_eq!(h.broker.queued_bytes(), 0);
            assert!(published(&h.publish(10_007, "b", "5")));
        }

        #[test]
        fn fan_out_counts_every_copy_and_is_refused_whole() {
            let mut h = Harness::new(limited(1000, 0));
            for session in ["s1", "s2", "s3"] {
                subscribe(&mut h, 0, session, None);
            }
            let (to, out) = h.send(1, channel_send("1"));
            assert!(matches!(
                reply_for(&out, to),
                Some(Response::Sent { recipients: 3, .. })
            ));
            let copy = h.broker.queued_bytes() / 3;
            assert_eq!(h.broker.queued_bytes(), walked(&h.broker));
            // Room for two more copies but not three: none is stored.
            h.broker.config.max_queued_bytes = 5 * copy;
            let (to, out) = h.send(2, channel_send("2"));
            assert!(overloaded(&reply_for(&out, to).unwrap()));
            assert_eq!(h.broker.stats().ready, 3);
            assert_eq!(h.broker.queued_bytes(), 3 * copy);
        }

        #[test]
        fn resume_gives_what_fits_and_says_it_is_incomplete() {
            let mut h = Harness::new(BrokerConfig {
                channels: vec![ChannelSettings {
                    pattern: routing::Pattern::parse("c").unwrap(),
                    history_len: 10,
                    history_age: None,
                    max_pending: 0,
                    priority: 0,
                }],
                ..limited(0, 0)
            });
            subscribe(&mut h, 0, "s1", None);
            for data in ["1", "2", "3"] {
                h.send(1, channel_send(data));
            }
            let copy = h.broker.queued_bytes() / 3;
            h.broker.config.max_queued_bytes = 5 * copy;
            let resumed = subscribe(&mut h, 2, "s2", Some(0));
            assert_eq!(
                resumed,
                Response::Subscribed {
                    recovered: 2,
                    complete: false
                }
            );
            assert_eq!(h.broker.queued_bytes(), 5 * copy);
        }

        #[test]
        fn returned_messages_are_taken_back_even_over_the_limit() {
            let mut h = Harness::new(limited(4, 0));
            h.publish(0, "b", "1234");
            let (to, out) = h.poll(1, "b", 0);
            let Some(Response::Messages(batch)) = reply_for(&out, to) else {
                panic!()
            };
            h.publish(2, "b", "5678");
            h.send(
                3,
                Request::Return {
                    session: "b".into(),
                    messages: batch,
                },
            );
            assert_eq!(h.broker.queued_bytes(), 8, "nothing accepted is lost");
            let (to, out) = h.poll(4, "b", 0);
            assert_eq!(bodies(&reply_for(&out, to).unwrap()), ["1234", "5678"]);
        }

        #[test]
        fn restore_counts_what_it_recovers() {
            let mut h = Harness::durable(limited(100, 0));
            h.publish(0, "b", "1234");
            h.publish(0, "c", "56");
            let recovered = replay(&mut h);
            let clock = h.broker.clock;
            let broker = Broker::restore(limited(100, 0), clock, recovered, h.at(1));
            assert_eq!(broker.queued_bytes(), 6);
            assert_eq!(broker.queued_bytes(), walked(&broker));
        }

        #[test]
        fn a_new_session_beyond_max_sessions_is_refused_while_known_ones_keep_working() {
            let mut h = Harness::new(BrokerConfig {
                idle_mailbox_timeout: Duration::from_secs(1),
                session_timeout: Duration::from_secs(1),
                ..limited(0, 2)
            });
            assert!(published(&h.publish(0, "a", "1")));
            assert!(published(&h.publish(0, "b", "1")));
            assert!(overloaded(&h.publish(1, "c", "1")));
            let (to, out) = h.poll(1, "c", 0);
            assert!(overloaded(&reply_for(&out, to).unwrap()));
            assert_eq!(h.broker.stats().mailboxes, 2);
            assert!(published(&h.publish(2, "a", "2")));
            let (to, out) = h.poll(3, "b", 0);
            assert_eq!(bodies(&reply_for(&out, to).unwrap()), ["1"]);
            // b is empty and goes quiet: once it is forgotten there is room again.
            h.broker.sweep(h.at(1_500), &mut Vec::new());
            h.broker.sweep(h.at(3_000), &mut Vec::new());
            assert_eq!(h.broker.stats().mailboxes, 1);
            assert!(published(&h.publish(3_001, "c", "1")));
        }
    }

    mod admin {
        use super::*;

        fn ask(h: &mut Harness, ms: u64, request: AdminRequest) -> Response {
            let (to, out) = h.send(ms, Request::Admin(request));
            reply_for(&out, to).expect("answered at once")
        }

        fn peek(h: &mut Harness, ms: u64, session: &str) -> (Vec<PeekedMessage>, u64) {
            let request = AdminRequest::Peek {
                session: session.into(),
                limit: 100,
            };
            match ask(h, ms, request) {
                Response::Peeked { messages, total } => (messages, total),
                other => panic!("{other:?}"),
            }
        }

        fn count(response: Response) -> u64 {
            match response {
                Response::Count(n) => n,
                other => panic!("expected a count, got {other:?}"),
            }
        }

        fn refusal(response: &Response) -> Option<ErrorKind> {
            match response {
                Response::Error(e) => Some(e.kind),
                _ => None,
            }
        }

        fn poll_one(h: &mut Harness, ms: u64, session: &str) -> Vec<MessageId> {
            let (to, out) = h.send(
                ms,
                Request::Poll {
                    session: session.into(),
                    timeout_ms: 0,
                    ack_previous: false,
                    max: 1,
                },
            );
            ids(&reply_for(&out, to).unwrap())
        }

        fn send_to(session: &str) -> Request {
            Request::Send(Box::new(Send {
                src: None,
                target: Some(Target::Session(session.into())),
                subject: None,
                reference: None,
                data: "{}".into(),
                ttl_ms: None,
                key: None,
                expect_reply_ms: None,
            }))
        }

        #[test]
        fn peek_shows_what_waits_in_flight_first_and_changes_nothing() {
            let mut h = Harness::durable(ack_mode());
            h.publish(0, "b", "first");
            h.publish(100, "b", "second");
            let given = poll_one(&mut h, 200, "b");
            h.broker.take_journal();
            let before = h.broker.stats();

            let (messages, total) = peek(&mut h, 1_000, "b");
            assert_eq!(total, 2);
            let seen: Vec<_> = messages
                .iter()
                .map(|m| (m.body.as_str(), m.in_flight, m.age_ms, m.deliveries))
                .collect();
            assert_eq!(seen, [("first", true, 1_000, 1), ("second", false, 900, 0)]);
            assert_eq!(messages[0].id, given[0]);

            assert_eq!(h.broker.stats(), before);
            assert!(h.broker.take_journal().is_empty());
            // Not even the session's activity: a peek is not the session's request.
            let (sessions, _) = match ask(&mut h, 1_000, AdminRequest::Sessions { limit: 1 }) {
                Response::Sessions { sessions, total } => (sessions, total),
                other => panic!("{other:?}"),
            };
            assert_eq!(sessions[0].last_seen_ms, 800);
            assert_eq!(
                poll_explicit(&mut h, 1_001, "b").len(),
                1,
                "second is still there"
            );
        }

        #[test]
        fn peek_of_an_unknown_session_creates_no_mailbox() {
            let mut h = Harness::new(BrokerConfig::default());
            assert_eq!(peek(&mut h, 0, "nobody"), (Vec::new(), 0));
            assert_eq!(h.broker.stats().mailboxes, 0);
        }

        #[test]
        fn peek_is_bounded_by_its_limit_but_tells_the_total() {
            let mut h = Harness::new(BrokerConfig::default());
            for i in 0..5 {
                h.publish(0, "b", &i.to_string());
            }
            let request = AdminRequest::Peek {
                session: "b".into(),
                limit: 2,
            };
            match ask(&mut h, 1, request) {
                Response::Peeked { messages, total } => {
                    assert_eq!(messages.len(), 2);
                    assert_eq!(total, 5);
                }
                other => panic!("{other:?}"),
            }
        }

        #[test]
        fn peek_answers_within_one_frame_however_large_the_mailbox() {
            let mut h = Harness::new(BrokerConfig {
                max_payload_bytes: 1 << 20,
                max_queued_bytes: 0,
                ..BrokerConfig::default()
            });
            let big = "x".repeat(1 << 20);
            for _ in 0..20 {
                assert!(matches!(
                    h.publish(0, "b", &big),
                    Response::Published { .. }
                ));
            }
            let request = AdminRequest::Peek {
                session: "b".into(),
                limit: 1000,
            };
            let (to, out) = h.send(1, Request::Admin(request));
            let response = reply_for(&out, to).unwrap();
            let Response::Peeked { messages, total } = &response else {
                panic!("{response:?}");
            };
            assert_eq!(*total, 20);
            assert_eq!(messages.len(), PEEK_MAX_BYTES / big.len());
            assert_fits_one_frame(&response);
        }

        /// The reply can be sent: it encodes within the frame limit.
        fn assert_fits_one_frame(response: &Response) {
            let frame = ipc::ServerFrame {
                id: 1,
                response: response.clone(),
            };
            let mut buf = tokio_util::bytes::BytesMut::new();
            let encoded = tokio_util::codec::Encoder::encode(
                &mut ipc::FrameCodec::<ipc::ClientFrame, ipc::ServerFrame>::new(),
                frame,
                &mut buf,
            );
            assert!(encoded.is_ok(), "{encoded:?}");
        }

        #[test]
        fn purge_deletes_ready_and_in_flight_and_frees_their_bytes() {
            let mut h = Harness::new(ack_mode());
            h.publish(0, "b", "given");
            h.publish(0, "b", "ready");
            h.publish(0, "c", "other");
            poll_one(&mut h, 1, "b");
            assert_eq!(h.broker.stats().pending_timers, 1, "a visibility timer");

            let purged = count(ask(
                &mut h,
                2,
                AdminRequest::Purge {
                    session: "b".into(),
                },
            ));
            assert_eq!(purged, 2);
            let stats = h.broker.stats();
            assert_eq!((stats.ready, stats.in_flight), (1, 0), "c keeps its own");
            assert_eq!(h.broker.queued_bytes(), "other".len() as u64);
            assert_eq!(stats.pending_timers, 0, "nothing left to redeliver");
            assert!(h.tick(60_000).is_empty());
            assert!(poll_explicit(&mut h, 60_001, "b").is_empty());
        }

        #[test]
        fn purge_is_journaled_so_a_restart_does_not_bring_it_back() {
            let mut h = Harness::durable(ack_mode());
            h.publish(0, "b", "given");
            h.publish(0, "b", "ready");
            h.publish(0, "c", "kept");
            poll_one(&mut h, 1, "b");
            count(ask(
                &mut h,
                2,
                AdminRequest::Purge {
                    session: "b".into(),
                },
            ));
            let recovered = replay(&mut h);
            let mut restored = Harness {
                broker: Broker::restore(ack_mode(), h.broker.clock, recovered, h.at(3)),
                t0: h.t0,
                next_request: 1,
            };
            assert!(poll_explicit(&mut restored, 4, "b").is_empty());
            assert_eq!(poll_explicit(&mut restored, 4, "c").len(), 1);
        }

        #[test]
        fn purge_keeps_the_session_and_its_parked_poll() {
            let mut h = Harness::new(BrokerConfig::default());
            let (poll, _) = h.poll(0, "b", 10_000);
            assert_eq!(
                count(ask(
                    &mut h,
                    1,
                    AdminRequest::Purge {
                        session: "b".into()
                    }
                )),
                0
            );
            let (_, out) = h.send(
                2,
                Request::Publish {
                    src: "a".into(),
                    dst: "b".into(),
                    body: "after".into(),
                    key: None,
                },
            );
            assert_eq!(bodies(&reply_for(&out, poll).unwrap()), ["after"]);
        }

        #[test]
        fn sessions_are_listed_deepest_queue_first_and_bounded_by_the_limit() {
            let mut h = Harness::new(ack_mode());
            for (session, depth) in [("a", 1), ("b", 3), ("c", 0), ("d", 2), ("e", 2)] {
                h.poll(0, session, 0);
                for _ in 0..depth {
                    h.publish(0, session, "x");
                }
            }
            // In flight breaks the tie between d and e.
            poll_one(&mut h, 1, "e");
            h.publish(1, "e", "x");
            h.poll(2, "c", 10_000);
            h.send(
                2,
                Request::SetPaused {
                    session: "a".into(),
                    paused: true,
                },
            );
            let response = ask(&mut h, 5, AdminRequest::Sessions { limit: 3 });
            let Response::Sessions { sessions, total } = response else {
                panic!("{response:?}");
            };
            assert_eq!(total, 5);
            let listed: Vec<_> = sessions
                .iter()
                .map(|s| (s.session.as_str(), s.ready, s.in_flight))
                .collect();
            assert_eq!(listed, [("b", 3, 0), ("e", 2, 1), ("d", 2, 0)]);

            let response = ask(&mut h, 5, AdminRequest::Sessions { limit: 100 });
            let Response::Sessions { sessions, .. } = response else {
                panic!("{response:?}");
            };
            let a = sessions.iter().find(|s| s.session == "a").unwrap();
            let c = sessions.iter().find(|s| s.session == "c").unwrap();
            assert!(a.paused && !a.parked_poll);
            assert!(c.parked_poll && !c.paused);
            assert_eq!((a.last_seen_ms, c.last_seen_ms), (3, 3));
            assert_eq!(sessions.last().unwrap().session, "c", "the empty one last");
        }

        #[test]
        fn sessions_answer_within_one_frame_whatever_the_limit() {
            let mut h = Harness::new(BrokerConfig {
                max_sessions: 0,
                ..BrokerConfig::default()
            });
            let long = "s".repeat(4096);
            // 5000 of them would take about 20 MiB, over the 16 MiB frame limit.
            for i in 0..5000 {
                h.poll(0, &format!("{long}{i}"), 0);
            }
            let (to, out) = h.send(
                1,
                Request::Admin(AdminRequest::Sessions { limit: u32::MAX }),
            );
            let response = reply_for(&out, to).unwrap();
            let Response::Sessions { sessions, total } = &response else {
                panic!("{response:?}");
            };
            assert_eq!(*total, 5000);
            assert!(sessions.len() < 5000 && !sessions.is_empty());
            assert_fits_one_frame(&response);
        }

        #[test]
        fn draining_refuses_new_messages_but_polls_and_acks_go_on() {
            let mut h = Harness::new(ack_mode());
            h.publish(0, "b", "1");
            h.publish(0, "b", "2");
            assert_eq!(
                ask(&mut h, 1, AdminRequest::Drain { draining: true }),
                Response::Done
            );
            assert_eq!(refusal(&h.publish(2, "b", "3")), Some(ErrorKind::Draining));
            let (to, out) = h.send(2, send_to("b"));
            assert_eq!(
                refusal(&reply_for(&out, to).unwrap()),
                Some(ErrorKind::Draining)
            );
            assert_eq!(h.broker.stats().ready, 2, "nothing new was stored");

            let given = poll_explicit(&mut h, 3, "b");
            assert_eq!(given.len(), 2);
            assert_eq!(ack(&mut h, 4, "b", AckSelector::Ids(given)), 2);
            let status = h.broker.status(h.at(5));
            assert!(status.draining);
            assert_eq!((status.ready, status.in_flight), (0, 0));

            ask(&mut h, 6, AdminRequest::Drain { draining: false });
            assert!(matches!(h.publish(7, "b", "4"), Response::Published { .. }));
        }

        #[test]
        fn admin_kick_answers_the_parked_poll_kicked_and_counts_what_it_dropped() {
            let mut h = Harness::new(BrokerConfig::default());
            let (poll, _) = h.poll(0, "b", 10_000);
            h.publish(0, "c", "1");
            h.publish(0, "c", "2");
            let request = |session: &str| AdminRequest::Kick {
                session: session.into(),
                reason: "maintenance".into(),
            };
            let (to, out) = h.send(1, Request::Admin(request("b")));
            assert_eq!(reply_for(&out, to), Some(Response::Count(0)));
            assert_eq!(
                refusal(&reply_for(&out, poll).unwrap()),
                Some(ErrorKind::Kicked)
            );
            assert_eq!(count(ask(&mut h, 2, request("c"))), 2);
            assert_eq!(h.broker.queued_bytes(), 0);
            let (to, out) = h.poll(3, "c", 0);
            assert_eq!(
                refusal(&reply_for(&out, to).unwrap()),
                Some(ErrorKind::Kicked)
            );
        }

        #[test]
        fn status_counts_move_as_messages_flow() {
            let mut h = Harness::new(ack_mode());
            let status = h.broker.status(h.at(1_500));
            assert_eq!(status.uptime_ms, 1_500);
            assert_eq!(
                (status.ready, status.queued_bytes, status.draining),
                (0, 0, false)
            );
            h.publish(2_000, "b", "12345");
            h.publish(2_000, "b", "678");
            let status = h.broker.status(h.at(2_000));
            assert_eq!(
                (status.ready, status.in_flight, status.queued_bytes),
                (2, 0, 8)
            );
            poll_one(&mut h, 2_001, "b");
            h.poll(2_001, "c", 10_000);
            h.send(
                2_001,
                Request::Subscribe {
                    session: "c".into(),
                    subscription: Subscription {
                        channel: "news".into(),
                        subject: None,
                        group: None,
                    },
                    since: None,
                },
            );
            let status = h.broker.status(h.at(2_002));
            assert_eq!((status.ready, status.in_flight), (1, 1));
            assert_eq!((status.parked_polls, status.sessions), (1, 2));
            assert_eq!((status.subscriptions, status.channels), (1, 1));
            assert_eq!(status.version, env!("CARGO_PKG_VERSION"));
        }
    }

    mod model {
        //! Whatever the broker does, replaying its journal gives exactly the messages
        //! it still holds, and so does replaying a snapshot of it.
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Publish { session: u8, key: Option<u8> },
            Poll { session: u8, ack_previous: bool },
            AckIds { session: u8, pick: u8 },
            AckUpTo { session: u8, pick: u8 },
            Return { session: u8 },
            Close,
            Advance { ms: u32 },
            Sweep,
            Replay,
            Purge,
            Subscribe { session: u8, resume: bool },
            Fanout { key: Option<u8> },
            Kick { session: u8 },
            Bind { session: u8, user: u8 },
            Pause { session: u8, paused: bool },
            PurgeSession { session: u8 },
            Drain { draining: bool },
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                4 => (0..3u8, proptest::option::of(0..4u8)).prop_map(|(session, key)| Op::Publish { session, key }),
                3 => (0..3u8, any::<bool>()).prop_map(|(session, ack_previous)| Op::Poll { session, ack_previous }),
                1 => (0..3u8, any::<u8>()).prop_map(|(session, pick)| Op::AckIds { session, pick }),
                1 => (0..3u8, any::<u8>()).prop_map(|(session, pick)| Op::AckUpTo { session, pick }),
                1 => (0..3u8).prop_map(|session| Op::Return { session }),
                1 => Just(Op::Close),
                2 => (0..8_000u32).prop_map(|ms| Op::Advance { ms }),
                1 => Just(Op::Sweep),
                1 => Just(Op::Replay),
                1 => Just(Op::Purge),
                1 => (0..3u8, any::<bool>()).prop_map(|(session, resume)| Op::Subscribe { session, resume }),
                3 => proptest::option::of(0..4u8).prop_map(|key| Op::Fanout { key }),
                1 => (0..3u8).prop_map(|session| Op::Kick { session }),
                1 => (0..3u8, 0..2u8).prop_map(|(session, user)| Op::Bind { session, user }),
                1 => (0..3u8, any::<bool>()).prop_map(|(session, paused)| Op::Pause { session, paused }),
                1 => (0..3u8).prop_map(|session| Op::PurgeSession { session }),
                1 => any::<bool>().prop_map(|draining| Op::Drain { draining }),
            ]
        }

        /// Every message the broker holds: storage id → (session, id, dead).
        fn held(broker: &Broker) -> BTreeMap<MessageId, (String, MessageId, bool)> {
            let mut held = BTreeMap::new();
            for (session, mailbox) in &broker.mailboxes {
                for s in &mailbox.ready {
                    held.insert(s.seq, (session.clone(), s.message.id, false));
                }
                for f in mailbox.in_flight.values() {
                    held.insert(f.stored.seq, (session.clone(), f.stored.message.id, false));
                }
            }
            for (seq, dead) in &broker.dead {
                held.insert(*seq, (dead.session.clone(), dead.stored.message.id, true));
            }
            held
        }

        /// The bodies' bytes of every message held, walked: what the running total
        /// `max_queued_bytes` bounds must always equal.
        fn bytes_held(broker: &Broker) -> u64 {
            let mut total = 0;
            for mailbox in broker.mailboxes.values() {
                total += mailbox
                    .ready
                    .iter()
                    .map(|s| s.message.body.len())
                    .sum::<usize>();
                total += mailbox
                    .in_flight
                    .values()
                    .map(|f| f.stored.message.body.len())
                    .sum::<usize>();
            }
            total += broker
                .dead
                .values()
                .map(|d| d.stored.message.body.len())
                .sum::<usize>();
            total as u64
        }

        /// Presence state the broker holds, as storage records it.
        fn held_sessions(broker: &Broker) -> BTreeMap<String, crate::storage::SessionState> {
            broker
                .mailboxes
                .iter()
                .map(|(session, m)| {
                    let state = crate::storage::SessionState {
                        user: m.user.clone(),
                        subscriptions: m.subscriptions.iter().map(stored_subscription).collect(),
                        paused: m.paused,
                    };
                    (session.clone(), state)
                })
                .filter(|(_, state)| *state != Default::default())
                .collect()
        }

        fn recovered_sessions(
            recovered: &Recovered,
        ) -> BTreeMap<String, crate::storage::SessionState> {
            recovered
                .sessions
                .iter()
                .filter(|(_, state)| **state != Default::default())
                .map(|(s, state)| (s.clone(), state.clone()))
                .collect()
        }

        fn recovered_view(recovered: &Recovered) -> BTreeMap<MessageId, (String, MessageId, bool)> {
            recovered
                .messages
                .iter()
                .map(|(seq, (m, dead))| (*seq, (m.session.clone(), m.id, *dead)))
                .collect()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(128))]
            #[test]
            fn journal_and_snapshot_replay_to_what_the_broker_holds(
                ops in proptest::collection::vec(op(), 1..120),
                delivery_ack in any::<bool>(),
                limited in any::<bool>(),
            ) {
                let config = BrokerConfig {
                    delivery: if delivery_ack { DeliveryMode::Ack } else { DeliveryMode::X0 },
                    mailbox_max_len: 4,
                    message_ttl: Some(Duration::from_secs(20)),
                    visibility_timeout: Duration::from_secs(5),
                    max_deliveries: 2,
                    dedup_window: Duration::from_secs(30),
                    kick_retention: Duration::from_secs(1),
                    // Tight enough that refusals happen: they must leave no record.
                    max_queued_bytes: if limited { 300 } else { 0 },
                    max_sessions: if limited { 2 } else { 0 },
                    channels: vec![ChannelSettings {
                        pattern: routing::Pattern::parse("c").unwrap(),
                        history_len: 3,
                        history_age: None,
                        max_pending: 2,
                        priority: 1,
                    }],
                    ..BrokerConfig::default()
                };
                let mut h = Harness::durable(config);
                let mut now = 0u64;
                let mut conn = CONN;
                let mut last_batch: HashMap<u8, Vec<Message>> = HashMap::new();
                let mut journal = Recovered::default();
                for op in ops {
                    let mut out = Vec::new();
                    let name = |s: u8| format!("s{s}");
                    let to = ReplyTo { conn, request: h.next_request };
                    h.next_request += 1;
                    match op {
                        Op::Publish { session, key } => h.broker.handle(h.t0 + Duration::from_millis(now), to, Request::Publish {
                            src: "p".into(), dst: name(session), body: format!("m{now}"), key: key.map(|k| k.to_string()),
                        }, &mut out),
                        Op::Poll { session, ack_previous } => {
                            h.broker.handle(h.t0 + Duration::from_millis(now), to, Request::Poll {
                                session: name(session), timeout_ms: 0, ack_previous, max: 0,
                            }, &mut out);
                            if let Some(Response::Messages(batch)) = reply_for(&out, to) {
                                last_batch.insert(session, batch);
                            }
                        }
                        Op::AckIds { session, pick } => {
                            let ids: Vec<MessageId> = last_batch.get(&session).into_iter().flatten()
                                .enumerate().filter(|(i, _)| pick & (1 << (i % 8)) != 0).map(|(_, m)| m.id).collect();
                            h.broker.handle(h.t0 + Duration::from_millis(now), to, Request::Ack { session: name(session), which: AckSelector::Ids(ids) }, &mut out);
                        }
                        Op::AckUpTo { session, pick } => {
                            let batch = last_batch.get(&session).cloned().unwrap_or_default();
                            let cursor = batch.get(pick as usize % batch.len().max(1)).map_or(0, |m| m.id);
                            h.broker.handle(h.t0 + Duration::from_millis(now), to, Request::Ack { session: name(session), which: AckSelector::UpTo(cursor) }, &mut out);
                        }
                        Op::Return { session } => {
                            if let Some(batch) = last_batch.remove(&session) {
                                h.broker.handle(h.t0 + Duration::from_millis(now), to, Request::Return { session: name(session), messages: batch }, &mut out);
                            }
                        }
                        Op::Close => {
                            h.broker.connection_closed(h.t0 + Duration::from_millis(now), conn, &mut out);
                            conn += 1;
                        }
                        Op::Advance { ms } => {
                            now += u64::from(ms);
                            h.broker.tick(h.t0 + Duration::from_millis(now), &mut out);
                        }
                        Op::Sweep => h.broker.sweep(h.t0 + Duration::from_millis(now), &mut Vec::new()),
                        Op::Replay => h.broker.handle(h.t0 + Duration::from_millis(now), to, Request::DeadLetters(DeadLetterOp::Replay { ids: None }), &mut out),
                        Op::Purge => h.broker.handle(h.t0 + Duration::from_millis(now), to, Request::DeadLetters(DeadLetterOp::Purge { ids: None }), &mut out),
                        Op::Subscribe { session, resume } => h.broker.handle(h.t0 + Duration::from_millis(now), to, Request::Subscribe {
                            session: name(session),
                            subscription: Subscription { channel: "c".into(), subject: None, group: None },
                            since: resume.then_some(0),
                        }, &mut out),
                        Op::Fanout { key } => h.broker.handle(h.t0 + Duration::from_millis(now), to, Request::Send(Box::new(Send {
                            src: Some("p".into()),
                            target: Some(Target::Channel("c".into())),
                            subject: None,
                            reference: None,
                            data: format!("{now}"),
                            ttl_ms: None,
                            key: key.map(|k| k.to_string()),
                            expect_reply_ms: None,
                        })), &mut out),
                        Op::Kick { session } => h.broker.handle(h.t0 + Duration::from_millis(now), to, Request::Kick { session: name(session), reason: String::new() }, &mut out),
                        Op::Bind { session, user } => h.broker.handle(h.t0 + Duration::from_millis(now), to, Request::Bind { session: name(session), user: format!("u{user}"), exclusive: user == 1 }, &mut out),
                        Op::Pause { session, paused } => h.broker.handle(h.t0 + Duration::from_millis(now), to, Request::SetPaused { session: name(session), paused }, &mut out),
                        Op::PurgeSession { session } => h.broker.handle(h.t0 + Duration::from_millis(now), to, Request::Admin(AdminRequest::Purge { session: name(session) }), &mut out),
                        Op::Drain { draining } => h.broker.handle(h.t0 + Duration::from_millis(now), to, Request::Admin(AdminRequest::Drain { draining }), &mut out),
                    }
                    for record in h.broker.take_journal() {
                        journal.apply(record);
                    }
                    prop_assert_eq!(recovered_view(&journal), held(&h.broker));
                    prop_assert_eq!(recovered_sessions(&journal), held_sessions(&h.broker));
                    prop_assert_eq!(h.broker.queued_bytes(), bytes_held(&h.broker));
                }
                let mut from_snapshot = Recovered::default();
                for record in h.broker.snapshot() {
                    from_snapshot.apply(record);
                }
                prop_assert_eq!(recovered_view(&from_snapshot), held(&h.broker));
                prop_assert!(from_snapshot.next_id >= journal.next_id);
                prop_assert_eq!(&from_snapshot.messages, &journal.messages);
                prop_assert_eq!(&from_snapshot.routing, &journal.routing);
                prop_assert_eq!(recovered_sessions(&from_snapshot), held_sessions(&h.broker));
            }
        }
    }
}
