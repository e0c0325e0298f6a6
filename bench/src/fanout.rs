//! The books of the fan-out scenario: every message published to the one channel,
//! which subscriber received which copy and when the last copy of each arrived.
//!
//! No sockets here: msgbench's publisher and subscriber tasks call into a [`Ledger`]
//! and the tests below drive one by hand. A message is known by its sequence number,
//! which the ledger hands out before the publish is sent (a copy may arrive before
//! the publish's reply does), together with the send timestamp the payload carries.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;
use tokio::time::Instant;

/// One copy as a subscriber's poll brought it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Copy {
    /// The `seq` of the payload.
    pub seq: u64,
    /// The `ts` of the payload: must be the one sent with that `seq`, else the copy
    /// comes from some other run.
    pub ts: u64,
    /// The envelope's `id`, which every recipient of one message must see alike.
    pub id: u64,
}

/// One published message.
#[derive(Clone, Copy, Debug)]
struct Sent {
    /// Unix microseconds just before the publish was sent (the payload's `ts`).
    sent_us: u64,
    /// The id the core gave it, from the publish reply or the first copy, whichever
    /// came first.
    id: Option<u64>,
    /// The publish was answered with success: every subscriber must get a copy.
    acked: bool,
    /// Subscribers that have their first copy.
    copies: u32,
    /// When the latest of those first copies arrived, Unix microseconds.
    last_us: u64,
}

struct Book {
    /// Indexed by sequence number.
    messages: Vec<Sent>,
    /// Copies (or publish replies) whose id differs from the id seen first.
    id_mismatches: u64,
}

/// What one subscriber session received. Owned by its task; handed to
/// [`Ledger::summary`] at the end.
#[derive(Default)]
pub struct Inbox {
    /// Copies received per sequence number (saturating): 0 none, 1 right, more duplicated.
    seen: Vec<u8>,
    /// Receive time − send time of each first copy.
    pub latencies_us: Vec<u32>,
    /// First copies received before the end of the timed window.
    pub in_window: u64,
    /// Copies received again.
    pub duplicated: u64,
    /// Copies of messages this run never sent (unknown `seq`, or another `ts`).
    pub foreign: u64,
}

/// Totals over a whole run.
#[derive(Debug, Default, PartialEq)]
pub struct Summary {
    /// Publishes sent, and answered with success.
    pub sent: u64,
    pub published: u64,
    /// Subscribers × acknowledged publishes.
    pub expected: u64,
    /// Distinct copies received (of any message sent, acknowledged or not).
    pub delivered: u64,
    pub delivered_in_window: u64,
    /// Expected copies that never arrived.
    pub lost: u64,
    pub duplicated: u64,
    pub foreign: u64,
    pub id_mismatches: u64,
    /// For each acknowledged message every subscriber got: from the send to the last
    /// subscriber's receipt, in microseconds, in sequence order.
    pub completion_us: Vec<u64>,
}

pub struct Ledger {
    subscribers: u32,
    /// A std mutex, not a tokio one: it is held for a few field updates per poll
    /// reply and never across an await, and only the generator's two runtime threads
    /// ever contend for it.
    book: Mutex<Book>,
    /// Woken whenever some message's last copy arrives; publishers waiting for their
    /// message check whether it was theirs.
    completed: Notify,
    /// Copies owed (subscribers × acknowledged publishes) and distinct copies
    /// received: the drain ends when the second reaches the first.
    expected: AtomicU64,
    delivered: AtomicU64,
}

impl Ledger {
    pub fn new(subscribers: usize) -> Self {
        Ledger {
            subscribers: u32::try_from(subscribers).unwrap_or(u32::MAX),
            book: Mutex::new(Book {
                messages: Vec::new(),
                id_mismatches: 0,
            }),
            completed: Notify::new(),
            expected: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
        }
    }

    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        // A panicking task cannot leave the counters half-updated in a way that
        // matters more than losing the run: keep going with what is there.
        self.book
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A new message about to be sent at `sent_us`: returns its sequence number.
    pub fn register(&self, sent_us: u64) -> u64 {
        let mut book = self.book();
        book.messages.push(Sent {
            sent_us,
            id: None,
            acked: false,
            copies: 0,
            last_us: 0,
        });
        (book.messages.len() - 1) as u64
    }

    /// The publish of `seq` was answered with success and message id `id`.
    pub fn acknowledge(&self, seq: u64, id: u64) {
        let mut book = self.book();
        let Some(sent) = book.messages.get_mut(seq as usize) else {
            return;
        };
        sent.acked = true;
        let mismatch = !same_id(&mut sent.id, id);
        if mismatch {
            book.id_mismatches += 1;
        }
        drop(book);
        self.expected
            .fetch_add(u64::from(self.subscribers), Ordering::Relaxed);
    }

    /// Every subscriber has its copy of `seq`.
    pub fn is_complete(&self, seq: u64) -> bool {
        self.book()
            .messages
            .get(seq as usize)
            .is_some_and(|sent| sent.copies >= self.subscribers)
    }

    /// Waits until every subscriber has its copy of `seq` or `until` has come;
    /// true when complete.
    pub async fn wait_complete(&self, seq: u64, until: Instant) -> bool {
        loop {
            // Registered before the check, so a completion between the check and the
            // await still wakes this waiter.
            let notified = self.completed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.is_complete(seq) {
                return true;
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return self.is_complete(seq);
            }
        }
    }

    /// The copies one poll reply brought to `inbox`'s session at `now_us`;
    /// `in_window` when that was before the end of the timed window.
    pub fn receive(&self, inbox: &mut Inbox, copies: &[Copy], now_us: u64, in_window: bool) {
        if copies.is_empty() {
            return;
        }
        let (mut first, mut completed) = (0u64, false);
        let mut book = self.book();
        let mut mismatches = 0;
        for copy in copies {
            let Some(sent) = book
                .messages
                .get_mut(copy.seq as usize)
                .filter(|sent| sent.sent_us == copy.ts)
            else {
                inbox.foreign += 1;
                continue;
            };
            if !same_id(&mut sent.id, copy.id) {
                mismatches += 1;
            }
            let index = copy.seq as usize;
            if inbox.seen.len() <= index {
                inbox.seen.resize(index + 1, 0);
            }
            let seen = &mut inbox.seen[index];
            *seen = seen.saturating_add(1);
            if *seen > 1 {
                inbox.duplicated += 1;
                continue;
            }
            first += 1;
            sent.copies += 1;
            sent.last_us = sent.last_us.max(now_us);
            completed |= sent.copies == self.subscribers;
            let latency = now_us.saturating_sub(copy.ts);
            inbox
                .latencies_us
                .push(u32::try_from(latency).unwrap_or(u32::MAX));
            if in_window {
                inbox.in_window += 1;
            }
        }
        book.id_mismatches += mismatches;
        drop(book);
        self.delivered.fetch_add(first, Ordering::Relaxed);
        if completed {
            self.completed.notify_waiters();
        }
    }

    /// Copies owed so far (subscribers × acknowledged publishes).
    pub fn expected(&self) -> u64 {
        self.expected.load(Ordering::Relaxed)
    }

    /// Distinct copies received so far.
    pub fn delivered(&self) -> u64 {
        self.delivered.load(Ordering::Relaxed)
    }

    /// The totals, from every subscriber's inbox (a subscriber missing from
    /// `inboxes` lost everything).
    pub fn summary(&self, inboxes: &[Inbox]) -> Summary {
        let book = self.book();
        let acked: Vec<usize> = (0..book.messages.len())
            .filter(|&seq| book.messages[seq].acked)
            .collect();
        let published = acked.len() as u64;
        let absent = u64::from(self.subscribers).saturating_sub(inboxes.len() as u64);
        let mut lost = published * absent;
        for inbox in inboxes {
            lost += acked
                .iter()
                .filter(|&&seq| inbox.seen.get(seq).copied().unwrap_or(0) == 0)
                .count() as u64;
        }
        let completion_us = acked
            .iter()
            .map(|&seq| book.messages[seq])
            .filter(|sent| sent.copies >= self.subscribers)
            .map(|sent| sent.last_us.saturating_sub(sent.sent_us))
            .collect();
        Summary {
            sent: book.messages.len() as u64,
            published,
            expected: published * u64::from(self.subscribers),
            delivered: book.messages.iter().map(|s| u64::from(s.copies)).sum(),
            delivered_in_window: inboxes.iter().map(|i| i.in_window).sum(),
            lost,
            duplicated: inboxes.iter().map(|i| i.duplicated).sum(),
            foreign: inboxes.iter().map(|i| i.foreign).sum(),
            id_mismatches: book.id_mismatches,
            completion_us,
        }
    }
}

/// Records `id` as the message's id if it has none yet; false when it had another.
fn same_id(known: &mut Option<u64>, id: u64) -> bool {
    match *known {
        None => {
            *known = Some(id);
            true
        }
        Some(first) => first == id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn copy(seq: u64, ts: u64, id: u64) -> Copy {
        Copy { seq, ts, id }
    }

    #[test]
    fn a_message_is_complete_when_every_subscriber_has_a_copy() {
        let ledger = Ledger::new(2);
        let (mut a, mut b) = (Inbox::default(), Inbox::default());
        let seq = ledger.register(1_000);
        ledger.acknowledge(seq, 77);
        ledger.receive(&mut a, &[copy(seq, 1_000, 77)], 1_400, true);
        assert!(!ledger.is_complete(seq));
        // A second copy to the same subscriber does not stand in for the other one.
        ledger.receive(&mut a, &[copy(seq, 1_000, 77)], 1_500, true);
        assert!(!ledger.is_complete(seq));
        ledger.receive(&mut b, &[copy(seq, 1_000, 77)], 1_900, false);
        assert!(ledger.is_complete(seq));
        assert_eq!((ledger.expected(), ledger.delivered()), (2, 2));

        let summary = ledger.summary(&[a, b]);
        assert_eq!(
            summary,
            Summary {
                sent: 1,
                published: 1,
                expected: 2,
                delivered: 2,
                delivered_in_window: 1,
                lost: 0,
                duplicated: 1,
                foreign: 0,
                id_mismatches: 0,
                completion_us: vec![900],
            }
        );
    }

    #[test]
    fn a_copy_may_arrive_before_the_publish_reply() {
        let ledger = Ledger::new(1);
        let mut inbox = Inbox::default();
        let seq = ledger.register(10);
        ledger.receive(&mut inbox, &[copy(seq, 10, 5)], 20, true);
        ledger.acknowledge(seq, 5);
        let summary = ledger.summary(&[inbox]);
        assert_eq!((summary.lost, summary.id_mismatches), (0, 0));
        assert_eq!(summary.completion_us, vec![10]);
    }

    #[test]
    fn missing_copies_of_acknowledged_messages_are_lost() {
        let ledger = Ledger::new(3);
        let mut inboxes: Vec<Inbox> = (0..2).map(|_| Inbox::default()).collect();
        let acked = ledger.register(1);
        ledger.acknowledge(acked, 1);
        // Refused by the server: nobody owes a copy, though one arriving still counts.
        let refused = ledger.register(2);
        ledger.receive(
            &mut inboxes[0],
            &[copy(acked, 1, 1), copy(refused, 2, 2)],
            5,
            true,
        );
        let summary = ledger.summary(&inboxes);
        // Subscriber 1 missed it, and subscriber 2 has no inbox at all.
        assert_eq!(
            (
                summary.published,
                summary.expected,
                summary.delivered,
                summary.lost
            ),
            (1, 3, 2, 2)
        );
        assert!(summary.completion_us.is_empty());
    }

    #[test]
    fn copies_from_another_run_and_differing_ids_are_caught() {
        let ledger = Ledger::new(2);
        let (mut a, mut b) = (Inbox::default(), Inbox::default());
        let seq = ledger.register(100);
        ledger.acknowledge(seq, 9);
        // Same seq, other timestamp: left over from an earlier run. Unknown seq too.
        ledger.receive(&mut a, &[copy(seq, 99, 9), copy(7, 100, 9)], 150, true);
        assert_eq!((a.foreign, ledger.delivered()), (2, 0));
        ledger.receive(&mut a, &[copy(seq, 100, 9)], 150, true);
        ledger.receive(&mut b, &[copy(seq, 100, 10)], 160, true);
        let summary = ledger.summary(&[a, b]);
        assert_eq!(
            (summary.foreign, summary.id_mismatches, summary.lost),
            (2, 1, 0)
        );
    }

    #[tokio::test]
    async fn a_waiting_publisher_wakes_when_the_last_copy_arrives() {
        let ledger = Arc::new(Ledger::new(1));
        let seq = ledger.register(1);
        let waiter = {
            let ledger = ledger.clone();
            tokio::spawn(async move {
                ledger
                    .wait_complete(seq, Instant::now() + Duration::from_secs(5))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        ledger.receive(&mut Inbox::default(), &[copy(seq, 1, 1)], 2, true);
        assert!(waiter.await.unwrap());
        let other = ledger.register(3);
        let gave_up = Instant::now() + Duration::from_millis(10);
        assert!(!ledger.wait_complete(other, gave_up).await);
    }
}
