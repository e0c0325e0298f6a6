//! The broker: every routing and delivery rule of the core, as a plain state machine.
//!
//! It owns the mailboxes, the messages in flight, the parked polls, the dead-letter
//! queue and the publish keys, and nothing else: no sockets, no tasks, no clock, no
//! files. Each method takes the current time and appends what must be sent where to
//! an output vector; every change to stored state is also written to a journal of
//! [`Record`]s that the I/O shell (`server.rs`) hands to storage before it lets the
//! replies go. So every rule below is a unit test away.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant, SystemTime};

use ipc::{
    AckSelector, DeadLetter, DeadLetterOp, ErrorKind, Message, MessageId, Request, RequestId,
    Response,
};
use serde::Deserialize;

use crate::storage::{Record, Recovered, StoredMessage};

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
            Some(after) => self.unix_ms + after.as_millis() as u64,
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
}

struct Stored {
    message: Message,
    expires_at: Option<Instant>,
    /// Times it was handed out without being acknowledged (ack mode).
    deliveries: u32,
    /// The publisher's key, kept so that a snapshot can write it back.
    key: Option<String>,
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

struct Parked {
    to: ReplyTo,
    timer: TimerKey,
}

struct Mailbox {
    /// In id order, which is publish order.
    ready: VecDeque<Stored>,
    /// Only in `ack` mode: given out and not yet acknowledged.
    in_flight: BTreeMap<MessageId, InFlight>,
    /// At most one poll waits per session; a newer poll supersedes it.
    waiter: Option<Parked>,
    last_active: Instant,
}

impl Mailbox {
    fn new(now: Instant) -> Self {
        Mailbox {
            ready: VecDeque::new(),
            in_flight: BTreeMap::new(),
            waiter: None,
            last_active: now,
        }
    }

    fn is_idle(&self) -> bool {
        self.ready.is_empty() && self.in_flight.is_empty() && self.waiter.is_none()
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
    /// By id, so an operator sees the oldest first.
    dead: BTreeMap<MessageId, Dead>,
    /// Publish keys seen inside the dedup window: key → (id given, forget at).
    dedup: HashMap<String, (MessageId, Instant)>,
    journal: Journal,
}

impl Broker {
    /// A memory-only broker.
    pub fn new(config: BrokerConfig, clock: ClockAnchor) -> Self {
        Broker {
            config,
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
        }
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
        for (id, (message, dead)) in recovered.messages {
            let expires_at = message.expires_ms.map(|ms| clock.instant_at(ms));
            if message.expires_ms.is_some_and(|ms| ms <= now_ms) && !dead {
                expired.push(id);
                continue;
            }
            if let Some(key) = &message.key {
                broker.dedup.insert(key.clone(), (id, now + window));
            }
            let stored = Stored {
                message: Message {
                    id,
                    body: message.body,
                },
                expires_at,
                deliveries: 0,
                key: message.key,
            };
            if dead {
                broker.dead.insert(
                    id,
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
                    .ready
                    .push_back(stored);
            }
        }
        broker.journal.removed(expired);
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
        }
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
        let put = |session: &str, stored: &Stored| {
            Record::Put(StoredMessage {
                id: stored.message.id,
                session: session.to_owned(),
                body: stored.message.body.clone(),
                expires_ms: stored.expires_at.map(|at| self.clock.unix_ms_at(at)),
                key: stored.key.clone(),
            })
        };
        for (session, mailbox) in &self.mailboxes {
            records.extend(mailbox.ready.iter().map(|s| put(session, s)));
            records.extend(mailbox.in_flight.values().map(|f| put(session, &f.stored)));
        }
        records.extend(self.dead.values().map(|d| put(&d.session, &d.stored)));
        if !self.dead.is_empty() {
            records.push(Record::DeadLettered {
                ids: self.dead.keys().copied().collect(),
            });
        }
        records.extend(self.dedup.iter().map(|(key, (id, until))| Record::Dedup {
            key: key.clone(),
            id: *id,
            until_ms: self.clock.unix_ms_at(*until),
        }));
        records
    }

    pub fn handle(&mut self, now: Instant, from: ReplyTo, request: Request, out: &mut Vec<Reply>) {
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
            } => {
                let timeout = Duration::from_millis(timeout_ms);
                match self.poll(now, from, session, timeout, ack_previous, out) {
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
            Request::Ack { session, which } => self.ack(now, &session, &which),
            Request::Return { session, messages } => {
                self.return_messages(now, session, messages, out);
                Response::Done
            }
            Request::DeadLetters(op) => self.dead_letters(now, op, out),
        };
        out.push(Reply { to: from, response });
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
        let mailbox = self
            .mailboxes
            .entry(dst.clone())
            .or_insert_with(|| Mailbox::new(now));
        mailbox.last_active = now;
        drop_expired(mailbox, now, &mut self.journal);
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
                        dropped.push(oldest.message.id);
                    }
                }
            }
        }
        let dropped_count = dropped.len() as u32;
        self.journal.removed(dropped);
        let id = self.next_message_id;
        self.next_message_id += 1;
        let expires_at = self.config.message_ttl.map(|ttl| now + ttl);
        let clock = self.clock;
        self.journal.push(|| {
            Record::Put(StoredMessage {
                id,
                session: dst.clone(),
                body: body.clone(),
                expires_ms: expires_at.map(|at| clock.unix_ms_at(at)),
                key: key.clone(),
            })
        });
        if let Some(key) = &key {
            self.dedup
                .insert(key.clone(), (id, now + self.config.dedup_window));
        }
        mailbox.ready.push_back(Stored {
            message: Message { id, body },
            expires_at,
            deliveries: 0,
            key,
        });
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
        session: String,
        timeout: Duration,
        ack_previous: bool,
        out: &mut Vec<Reply>,
    ) -> Option<Response> {
        let mailbox = self
            .mailboxes
            .entry(session.clone())
            .or_insert_with(|| Mailbox::new(now));
        mailbox.last_active = now;
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
        drop_expired(mailbox, now, &mut self.journal);
        if !mailbox.ready.is_empty() {
            let batch = self.take_batch(now, &session, from.conn);
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
        mailbox.waiter = Some(Parked { to: from, timer });
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
        let mut ids: Vec<MessageId> = mailbox
            .in_flight
            .keys()
            .copied()
            .filter(|id| covers(*id))
            .collect();
        take_in_flight(mailbox, &mut self.timers, &ids);
        if !matches!(which, AckSelector::All) {
            mailbox.ready.retain(|s| {
                let hit = covers(s.message.id);
                if hit {
                    ids.push(s.message.id);
                }
                !hit
            });
        }
        let count = ids.len() as u32;
        self.journal.removed(ids);
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
        let mailbox = self
            .mailboxes
            .entry(session.clone())
            .or_insert_with(|| Mailbox::new(now));
        match self.config.delivery {
            DeliveryMode::Ack => {
                // Still in flight here: ready again at once instead of after the
                // visibility timeout. Ids acknowledged or redelivered since are no
                // longer in flight and are left alone. The browser never saw them, so
                // this was no delivery attempt.
                let ids: Vec<MessageId> = messages.iter().map(|m| m.id).collect();
                let mut back = take_in_flight(mailbox, &mut self.timers, &ids);
                for stored in &mut back {
                    stored.deliveries = stored.deliveries.saturating_sub(1);
                }
                self.requeue(now, &session, back, out);
            }
            DeliveryMode::X0 => {
                // The stored copies are gone; the returned ones get a fresh TTL rather
                // than being lost to a deadline they never saw.
                let expires_at = self.config.message_ttl.map(|ttl| now + ttl);
                let clock = self.clock;
                for message in messages.iter().rev() {
                    self.journal.push(|| {
                        Record::Put(StoredMessage {
                            id: message.id,
                            session: session.clone(),
                            body: message.body.clone(),
                            expires_ms: expires_at.map(|at| clock.unix_ms_at(at)),
                            key: None,
                        })
                    });
                }
                let mailbox = self.mailboxes.get_mut(&session).expect("created above");
                for message in messages.into_iter().rev() {
                    mailbox.ready.push_front(Stored {
                        message,
                        expires_at,
                        deliveries: 0,
                        key: None,
                    });
                }
                self.deliver_if_waiting(now, &session, out);
            }
        }
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
                expired.push(s.message.id);
                false
            } else {
                true
            }
        });
        let (give_up, mut again): (Vec<Stored>, Vec<Stored>) = back
            .into_iter()
            .partition(|s| max > 0 && s.deliveries >= max);
        for stored in give_up {
            dead.push(stored.message.id);
            self.dead.insert(
                stored.message.id,
                Dead {
                    session: session.to_owned(),
                    stored,
                },
            );
        }
        self.journal.removed(expired);
        if !dead.is_empty() {
            self.journal.push(|| Record::DeadLettered { ids: dead });
        }
        let Some(mailbox) = self.mailboxes.get_mut(session) else {
            return;
        };
        again.sort_by_key(|s| s.message.id);
        merge_in_order(&mut mailbox.ready, again);
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

    /// Drops expired messages and publish keys, and removes mailboxes that have been
    /// empty and unused for the idle timeout, so memory does not grow with sessions
    /// that went away.
    pub fn sweep(&mut self, now: Instant) {
        let idle = self.config.idle_mailbox_timeout;
        let journal = &mut self.journal;
        self.mailboxes.retain(|_, mailbox| {
            drop_all_expired(mailbox, now, journal);
            !(mailbox.is_idle() && now.saturating_duration_since(mailbox.last_active) >= idle)
        });
        self.dedup.retain(|_, (_, until)| *until > now);
    }

    fn dead_letters(&mut self, now: Instant, op: DeadLetterOp, out: &mut Vec<Reply>) -> Response {
        let selected = |dead: &BTreeMap<MessageId, Dead>, ids: Option<Vec<MessageId>>| match ids {
            None => dead.keys().copied().collect::<Vec<_>>(),
            Some(ids) => ids.into_iter().filter(|id| dead.contains_key(id)).collect(),
        };
        match op {
            DeadLetterOp::List { limit } => Response::DeadLetters {
                letters: self
                    .dead
                    .iter()
                    .take(limit as usize)
                    .map(|(id, d)| DeadLetter {
                        id: *id,
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
                    merge_in_order(&mut mailbox.ready, back);
                    self.deliver_if_waiting(now, &session, out);
                }
                Response::Count(count)
            }
        }
    }

    fn deliver_if_waiting(&mut self, now: Instant, session: &str, out: &mut Vec<Reply>) {
        let Some(mailbox) = self.mailboxes.get_mut(session) else {
            return;
        };
        drop_expired(mailbox, now, &mut self.journal);
        if mailbox.ready.is_empty() {
            return;
        }
        let Some(parked) = mailbox.waiter.take() else {
            return;
        };
        self.timers.remove(&parked.timer);
        self.parked.remove(&parked.to);
        let batch = self.take_batch(now, session, parked.to.conn);
        out.push(Reply {
            to: parked.to,
            response: Response::Messages(batch),
        });
    }

    /// Takes everything ready for `session`; in ack mode it stays in flight.
    fn take_batch(&mut self, now: Instant, session: &str, conn: ConnId) -> Vec<Message> {
        let mailbox = self.mailboxes.get_mut(session).expect("caller checked");
        drop_all_expired(mailbox, now, &mut self.journal);
        let taken = std::mem::take(&mut mailbox.ready);
        match self.config.delivery {
            DeliveryMode::X0 => {
                self.journal.removed(taken.iter().map(|s| s.message.id));
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

/// Drops expired messages from the head of the line: cheap enough for every
/// publish and poll, since with one TTL the oldest expire first. What expires
/// behind a younger head (a returned message got a fresh TTL) goes at the next
/// [`drop_all_expired`] or when the batch is taken.
fn drop_expired(mailbox: &mut Mailbox, now: Instant, journal: &mut Journal) {
    let mut gone = Vec::new();
    while mailbox.ready.front().is_some_and(|m| m.expired(now)) {
        gone.push(mailbox.ready.pop_front().expect("checked").message.id);
    }
    journal.removed(gone);
}

fn drop_all_expired(mailbox: &mut Mailbox, now: Instant, journal: &mut Journal) {
    let mut gone = Vec::new();
    mailbox.ready.retain(|m| {
        let expired = m.expired(now);
        if expired {
            gone.push(m.message.id);
        }
        !expired
    });
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

/// Merges `back` (sorted by id) into `ready` (sorted by id).
fn merge_in_order(ready: &mut VecDeque<Stored>, back: Vec<Stored>) {
    let Some(last_back) = back.last().map(|s| s.message.id) else {
        return;
    };
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
        h.broker.sweep(h.at(59_999));
        assert_eq!(h.broker.stats().mailboxes, 3);
        h.broker.sweep(h.at(60_000));
        // The unread message expired at 30 s, so its mailbox went idle too; the
        // session with a parked poll is in use.
        assert_eq!(h.broker.stats().mailboxes, 1);
        let (to, out) = h.poll(60_001, "parked", 0);
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
        h.broker.sweep(h.at(60_020));
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

    #[cfg(test)]
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
            ]
        }

        /// Every message the broker holds: id → (session, dead).
        fn held(broker: &Broker) -> BTreeMap<MessageId, (String, bool)> {
            let mut held = BTreeMap::new();
            for (session, mailbox) in &broker.mailboxes {
                for s in &mailbox.ready {
                    held.insert(s.message.id, (session.clone(), false));
                }
                for id in mailbox.in_flight.keys() {
                    held.insert(*id, (session.clone(), false));
                }
            }
            for (id, dead) in &broker.dead {
                held.insert(*id, (dead.session.clone(), true));
            }
            held
        }

        fn recovered_view(recovered: &Recovered) -> BTreeMap<MessageId, (String, bool)> {
            recovered
                .messages
                .iter()
                .map(|(id, (m, dead))| (*id, (m.session.clone(), *dead)))
                .collect()
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(128))]
            #[test]
            fn journal_and_snapshot_replay_to_what_the_broker_holds(
                ops in proptest::collection::vec(op(), 1..120),
                delivery_ack in any::<bool>(),
            ) {
                let config = BrokerConfig {
                    delivery: if delivery_ack { DeliveryMode::Ack } else { DeliveryMode::X0 },
                    mailbox_max_len: 4,
                    message_ttl: Some(Duration::from_secs(20)),
                    visibility_timeout: Duration::from_secs(5),
                    max_deliveries: 2,
                    dedup_window: Duration::from_secs(30),
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
                                session: name(session), timeout_ms: 0, ack_previous,
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
                        Op::Sweep => h.broker.sweep(h.t0 + Duration::from_millis(now)),
                        Op::Replay => h.broker.handle(h.t0 + Duration::from_millis(now), to, Request::DeadLetters(DeadLetterOp::Replay { ids: None }), &mut out),
                        Op::Purge => h.broker.handle(h.t0 + Duration::from_millis(now), to, Request::DeadLetters(DeadLetterOp::Purge { ids: None }), &mut out),
                    }
                    for record in h.broker.take_journal() {
                        journal.apply(record);
                    }
                    prop_assert_eq!(recovered_view(&journal), held(&h.broker));
                }
                let mut from_snapshot = Recovered::default();
                for record in h.broker.snapshot() {
                    from_snapshot.apply(record);
                }
                prop_assert_eq!(recovered_view(&from_snapshot), held(&h.broker));
                prop_assert!(from_snapshot.next_id >= journal.next_id);
                prop_assert_eq!(from_snapshot.messages, journal.messages);
            }
        }
    }
}
