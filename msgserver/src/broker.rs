//! The broker: every routing and delivery rule of the core, as a plain state machine.
//!
//! It owns the mailboxes and the parked polls, and nothing else: no sockets, no
//! tasks, no clock. Each method takes the current time and appends what must be sent
//! where to an output vector; the I/O shell around it (`server.rs`) feeds it requests
//! and timer ticks and routes the replies. So every rule below is a unit test away.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use ipc::{ErrorKind, Message, MessageId, Request, RequestId, Response};
use serde::Deserialize;

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
    /// A returned batch stays in flight until the session's next poll or an ack, and
    /// is given again after the visibility timeout otherwise.
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
    /// Messages waiting in one mailbox, not counting a batch in flight.
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
        }
    }
}

/// Counts an operator (and the tests) can read without walking the state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    pub mailboxes: usize,
    pub parked_polls: usize,
    pub pending_timers: usize,
}

struct Stored {
    message: Message,
    expires_at: Option<Instant>,
}

impl Stored {
    fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| at <= now)
    }
}

struct InFlight {
    batch: Vec<Stored>,
    timer: TimerKey,
}

struct Parked {
    to: ReplyTo,
    timer: TimerKey,
}

struct Mailbox {
    ready: VecDeque<Stored>,
    /// Only in `ack` mode: the batch last given and not yet acknowledged.
    in_flight: Option<InFlight>,
    /// At most one poll waits per session; a newer poll supersedes it.
    waiter: Option<Parked>,
    last_active: Instant,
}

impl Mailbox {
    fn new(now: Instant) -> Self {
        Mailbox {
            ready: VecDeque::new(),
            in_flight: None,
            waiter: None,
            last_active: now,
        }
    }

    fn drop_expired(&mut self, now: Instant) {
        self.ready.retain(|m| !m.expired(now));
    }

    fn is_idle(&self) -> bool {
        self.ready.is_empty() && self.in_flight.is_none() && self.waiter.is_none()
    }
}

/// The sequence number makes keys unique when two timers share an instant.
type TimerKey = (Instant, u64);

enum Timer {
    PollTimeout { session: String },
    Visibility { session: String },
}

pub struct Broker {
    config: BrokerConfig,
    mailboxes: HashMap<String, Mailbox>,
    /// Parked polls by where their reply goes, so that a cancel or a dropped
    /// connection finds its session without scanning every mailbox.
    parked: HashMap<ReplyTo, String>,
    /// Ordered by deadline: the next one to fire is the first entry.
    timers: BTreeMap<TimerKey, Timer>,
    timer_seq: u64,
    next_message_id: MessageId,
}

impl Broker {
    pub fn new(config: BrokerConfig) -> Self {
        Broker {
            config,
            mailboxes: HashMap::new(),
            parked: HashMap::new(),
            timers: BTreeMap::new(),
            timer_seq: 0,
            next_message_id: 1,
        }
    }

    pub fn stats(&self) -> Stats {
        Stats {
            mailboxes: self.mailboxes.len(),
            parked_polls: self.parked.len(),
            pending_timers: self.timers.len(),
        }
    }

    /// When [`Broker::tick`] next has work to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.timers.keys().next().map(|(at, _)| *at)
    }

    pub fn handle(&mut self, now: Instant, from: ReplyTo, request: Request, out: &mut Vec<Reply>) {
        let response = match request {
            Request::Ping => Response::Pong,
            Request::Publish { src: _, dst, body } => self.publish(now, dst, body, out),
            Request::Poll {
                session,
                timeout_ms,
            } => match self.poll(now, from, session, Duration::from_millis(timeout_ms), out) {
                Some(response) => response,
                None => return, // parked: answered later
            },
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
            Request::Ack { session } => self.ack(now, &session),
            Request::Return { session, messages } => {
                self.return_messages(now, session, messages, out);
                Response::Done
            }
        };
        out.push(Reply { to: from, response });
    }

    fn publish(
        &mut self,
        now: Instant,
        dst: String,
        body: String,
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
        let mailbox = self
            .mailboxes
            .entry(dst.clone())
            .or_insert_with(|| Mailbox::new(now));
        mailbox.last_active = now;
        mailbox.drop_expired(now);
        let mut dropped = 0;
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
                        mailbox.ready.pop_front();
                        dropped += 1;
                    }
                }
            }
        }
        let id = self.next_message_id;
        self.next_message_id += 1;
        mailbox.ready.push_back(Stored {
            message: Message { id, body },
            expires_at: self.config.message_ttl.map(|ttl| now + ttl),
        });
        self.deliver_if_waiting(now, &dst, out);
        Response::Published { id, dropped }
    }

    /// Answers at once when there is something to give, else parks the poll and
    /// returns `None`.
    fn poll(
        &mut self,
        now: Instant,
        from: ReplyTo,
        session: String,
        timeout: Duration,
        out: &mut Vec<Reply>,
    ) -> Option<Response> {
        let mailbox = self
            .mailboxes
            .entry(session.clone())
            .or_insert_with(|| Mailbox::new(now));
        mailbox.last_active = now;
        // The x0 rule for ack mode: asking again acknowledges what was given last.
        if let Some(acked) = mailbox.in_flight.take() {
            self.timers.remove(&acked.timer);
        }
        if let Some(old) = mailbox.waiter.take() {
            self.timers.remove(&old.timer);
            self.parked.remove(&old.to);
            out.push(Reply {
                to: old.to,
                response: Response::Messages(Vec::new()),
            });
        }
        mailbox.drop_expired(now);
        if !mailbox.ready.is_empty() {
            let batch = self.take_batch(now, &session);
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

    fn ack(&mut self, now: Instant, session: &str) -> Response {
        let Some(mailbox) = self.mailboxes.get_mut(session) else {
            return Response::Acked { count: 0 };
        };
        mailbox.last_active = now;
        match mailbox.in_flight.take() {
            Some(acked) => {
                self.timers.remove(&acked.timer);
                Response::Acked {
                    count: acked.batch.len() as u32,
                }
            }
            None => Response::Acked { count: 0 },
        }
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
                // The batch is still in flight here; hand it back at once instead of
                // waiting for the visibility timeout. A batch that was acknowledged or
                // redelivered since is not this one and is left alone.
                let same_batch = mailbox.in_flight.as_ref().is_some_and(|f| {
                    f.batch
                        .iter()
                        .map(|s| s.message.id)
                        .eq(messages.iter().map(|m| m.id))
                });
                if same_batch {
                    let returned = mailbox.in_flight.take().expect("checked above");
                    self.timers.remove(&returned.timer);
                    for stored in returned.batch.into_iter().rev() {
                        mailbox.ready.push_front(stored);
                    }
                }
            }
            DeliveryMode::X0 => {
                // The stored copies are gone; the returned ones get a fresh TTL rather
                // than being lost to a deadline they never saw.
                let expires_at = self.config.message_ttl.map(|ttl| now + ttl);
                for message in messages.into_iter().rev() {
                    mailbox.ready.push_front(Stored {
                        message,
                        expires_at,
                    });
                }
            }
        }
        self.deliver_if_waiting(now, &session, out);
    }

    /// Releases every poll parked by a connection that went away. Their messages
    /// stay in the mailboxes for the next poll.
    pub fn connection_closed(&mut self, conn: ConnId) {
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
                Timer::Visibility { session } => {
                    let Some(mailbox) = self.mailboxes.get_mut(&session) else {
                        continue;
                    };
                    if let Some(unacked) = mailbox.in_flight.take_if(|f| f.timer == key) {
                        for stored in unacked.batch.into_iter().rev() {
                            mailbox.ready.push_front(stored);
                        }
                        self.deliver_if_waiting(now, &session, out);
                    }
                }
            }
        }
    }

    /// Drops expired messages and removes mailboxes that have been empty and unused
    /// for the idle timeout, so memory does not grow with sessions that went away.
    pub fn sweep(&mut self, now: Instant) {
        let idle = self.config.idle_mailbox_timeout;
        self.mailboxes.retain(|_, mailbox| {
            mailbox.drop_expired(now);
            !(mailbox.is_idle() && now.saturating_duration_since(mailbox.last_active) >= idle)
        });
    }

    fn deliver_if_waiting(&mut self, now: Instant, session: &str, out: &mut Vec<Reply>) {
        let Some(mailbox) = self.mailboxes.get_mut(session) else {
            return;
        };
        mailbox.drop_expired(now);
        if mailbox.ready.is_empty() || mailbox.in_flight.is_some() {
            return;
        }
        let Some(parked) = mailbox.waiter.take() else {
            return;
        };
        self.timers.remove(&parked.timer);
        self.parked.remove(&parked.to);
        let batch = self.take_batch(now, session);
        out.push(Reply {
            to: parked.to,
            response: Response::Messages(batch),
        });
    }

    /// Takes everything ready for `session`; in ack mode a copy stays in flight.
    fn take_batch(&mut self, now: Instant, session: &str) -> Vec<Message> {
        let mailbox = self.mailboxes.get_mut(session).expect("caller checked");
        let taken: Vec<Stored> = mailbox
            .ready
            .drain(..)
            .filter(|m| !m.expired(now))
            .collect();
        match self.config.delivery {
            DeliveryMode::X0 => taken.into_iter().map(|s| s.message).collect(),
            DeliveryMode::Ack if taken.is_empty() => Vec::new(),
            DeliveryMode::Ack => {
                let batch = taken.iter().map(|s| s.message.clone()).collect();
                let timer = self.add_timer(
                    now + self.config.visibility_timeout,
                    Timer::Visibility {
                        session: session.to_owned(),
                    },
                );
                let mailbox = self.mailboxes.get_mut(session).expect("caller checked");
                mailbox.in_flight = Some(InFlight {
                    batch: taken,
                    timer,
                });
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
            Harness {
                broker: Broker::new(config),
                t0: Instant::now(),
                next_request: 1,
            }
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
        h.broker.connection_closed(CONN);
        assert_eq!(h.broker.stats().parked_polls, 0);
        assert_eq!(h.broker.stats().pending_timers, 0);
        let (_, out) = h.send(
            1,
            Request::Publish {
                src: "a".into(),
                dst: "b".into(),
                body: "kept".into(),
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
}
