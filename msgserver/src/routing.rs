//! Who a channel message goes to: subject patterns, the subscription index with its
//! consumer groups, and channel history. Plain data structures for the broker; no
//! I/O and no clock of their own.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use indexmap::IndexMap;
use ipc::{MessageId, Subscription};

/// The reserved channel of system events; `$` channels are the core's own.
pub const SYSTEM_CHANNEL: &str = "$sys";

/// A dot-separated pattern: `*` matches one token, a final `>` one or more.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    tokens: Vec<Token>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(String),
    One,
    Rest,
}

impl Pattern {
    pub fn parse(text: &str) -> Result<Pattern, String> {
        if text.is_empty() {
            return Err("a pattern must not be empty".into());
        }
        let parts: Vec<&str> = text.split('.').collect();
        let mut tokens = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            tokens.push(match *part {
                "" => return Err(format!("pattern {text:?} has an empty token")),
                "*" => Token::One,
                ">" if i + 1 == parts.len() => Token::Rest,
                ">" => return Err(format!("in pattern {text:?}, '>' may only come last")),
                t if t.contains(['*', '>']) => {
                    return Err(format!(
                        "in pattern {text:?}, '*' and '>' must stand alone between dots"
                    ));
                }
                t => Token::Literal(t.to_owned()),
            });
        }
        Ok(Pattern { tokens })
    }

    /// Whether the pattern names exactly one channel (no wildcard).
    pub fn is_literal(&self) -> bool {
        self.tokens.iter().all(|t| matches!(t, Token::Literal(_)))
    }

    pub fn matches(&self, name: &str) -> bool {
        // The core's own channels are reached only by naming them: a `>` subscriber
        // does not get the system events.
        if name.starts_with('$') && !matches!(self.tokens.first(), Some(Token::Literal(_))) {
            return false;
        }
        let mut parts = name.split('.');
        for token in &self.tokens {
            match token {
                Token::Rest => return parts.next().is_some_and(|p| !p.is_empty()),
                Token::One => {
                    if parts.next().is_none_or(str::is_empty) {
                        return false;
                    }
                }
                Token::Literal(literal) => {
                    if parts.next() != Some(literal.as_str()) {
                        return false;
                    }
                }
            }
        }
        parts.next().is_none()
    }
}

/// A channel name a message may be published to: a pattern without wildcards.
pub fn check_channel_name(name: &str) -> Result<(), String> {
    let pattern = Pattern::parse(name)?;
    if pattern.is_literal() {
        Ok(())
    } else {
        Err(format!(
            "channel {name:?} has a wildcard; publish to a concrete channel"
        ))
    }
}

/// One session's subscription to a pattern entry, by what sets it apart from the
/// session's others there (the channel is the entry's).
#[derive(PartialEq, Eq, Hash)]
struct MemberKey {
    session: String,
    subject: Option<String>,
    group: Option<String>,
}

impl MemberKey {
    fn of(session: &str, subscription: &Subscription) -> MemberKey {
        MemberKey {
            session: session.to_owned(),
            subject: subscription.subject.clone(),
            group: subscription.group.clone(),
        }
    }
}

/// A consumer group, keyed by subject and group name.
type GroupKey = (Option<String>, String);

#[derive(Default)]
struct Group {
    /// Round-robin position, so that the group's members take turns.
    turn: usize,
    members: usize,
}

/// Everyone subscribed with one channel pattern.
struct PatternEntry {
    pattern: Pattern,
    /// In the order they came (until one leaves: the last takes its place), with the
    /// parsed subject pattern. A map, so that one session's subscribe or unsubscribe
    /// does not scan a channel's thousands of others.
    members: IndexMap<MemberKey, Option<Pattern>>,
    groups: HashMap<GroupKey, Group>,
}

/// The subscription index. Literal patterns are found by one lookup per message,
/// wildcard patterns by walking the channel name's tokens through a tree of them, so
/// that a publish costs the same with one wildcard pattern as with one per user.
#[derive(Default)]
pub struct Subscriptions {
    by_pattern: HashMap<String, PatternEntry>,
    /// The keys of `by_pattern` that hold a wildcard.
    wildcards: PatternTree,
}

/// Wildcard patterns by their tokens, as NATS's sublist keeps subjects: a node per
/// pattern prefix, so that a name finds the patterns it matches by following its own
/// tokens (its literal, `*`, and the `>` that ends at the node), not by trying every
/// pattern.
#[derive(Default)]
struct PatternTree {
    literal: HashMap<String, PatternTree>,
    one: Option<Box<PatternTree>>,
    /// The pattern whose tokens end at this node.
    end: Option<String>,
    /// The pattern made of this node's prefix and a final `>`.
    rest: Option<String>,
}

impl PatternTree {
    fn insert(&mut self, pattern: &Pattern, key: &str) {
        let mut node = self;
        for token in &pattern.tokens {
            node = match token {
                Token::Literal(literal) => node.literal.entry(literal.clone()).or_default(),
                Token::One => node.one.get_or_insert_with(Default::default),
                Token::Rest => {
                    node.rest = Some(key.to_owned());
                    return;
                }
            };
        }
        node.end = Some(key.to_owned());
    }

    /// Takes the pattern out and the nodes it leaves empty; true when this node is
    /// empty itself.
    fn remove(&mut self, tokens: &[Token]) -> bool {
        match tokens.split_first() {
            None => self.end = None,
            Some((Token::Rest, _)) => self.rest = None,
            Some((Token::One, after)) => {
                if self.one.as_mut().is_some_and(|child| child.remove(after)) {
                    self.one = None;
                }
            }
            Some((Token::Literal(literal), after)) => {
                if self
                    .literal
                    .get_mut(literal)
                    .is_some_and(|child| child.remove(after))
                {
                    self.literal.remove(literal);
                }
            }
        }
        self.is_empty()
    }

    fn is_empty(&self) -> bool {
        self.literal.is_empty() && self.one.is_none() && self.end.is_none() && self.rest.is_none()
    }

    /// The keys of the patterns that match `name`, each once, as `Pattern::matches`
    /// decides.
    fn matching<'a>(&'a self, name: &str, out: &mut Vec<&'a str>) {
        let (first, after) = split_token(name);
        if name.starts_with('$') {
            // The core's own channels are reached only by naming their first token.
            if let Some(child) = self.literal.get(first) {
                child.walk(after, out);
            }
        } else {
            self.walk(Some(name), out);
        }
    }

    /// `name` is what is left of the channel name after this node's prefix; None
    /// when nothing is.
    fn walk<'a>(&'a self, name: Option<&str>, out: &mut Vec<&'a str>) {
        let Some(name) = name else {
            out.extend(self.end.as_deref());
            return;
        };
        let (first, after) = split_token(name);
        if let Some(child) = self.literal.get(first) {
            child.walk(after, out);
        }
        if !first.is_empty() {
            out.extend(self.rest.as_deref());
            if let Some(child) = &self.one {
                child.walk(after, out);
            }
        }
    }
}

/// The first token of a name and what follows its dot.
fn split_token(name: &str) -> (&str, Option<&str>) {
    match name.split_once('.') {
        Some((first, after)) => (first, Some(after)),
        None => (name, None),
    }
}

/// What a subscribe or unsubscribe changed, for the system events.
#[derive(Debug, PartialEq, Eq)]
pub enum Change {
    Nothing,
    /// The first subscription with this pattern.
    Created,
    /// A subscription was added to or removed from a pattern that others still use.
    Changed,
    /// The last subscription with this pattern went.
    Removed,
}

impl Subscriptions {
    /// Distinct patterns subscribed to, for the operator.
    pub fn patterns(&self) -> usize {
        self.by_pattern.len()
    }

    /// Adds the subscription unless the session already holds an equal one.
    pub fn add(&mut self, session: &str, subscription: &Subscription) -> Result<Change, String> {
        let pattern = Pattern::parse(&subscription.channel)?;
        let subject = subscription
            .subject
            .as_deref()
            .map(Pattern::parse)
            .transpose()?;
        let created = !self.by_pattern.contains_key(&subscription.channel);
        let entry = self
            .by_pattern
            .entry(subscription.channel.clone())
            .or_insert_with(|| PatternEntry {
                pattern: pattern.clone(),
                members: IndexMap::new(),
                groups: HashMap::new(),
            });
        let key = MemberKey::of(session, subscription);
        if entry.members.contains_key(&key) {
            return Ok(Change::Nothing);
        }
        if let Some(group) = &key.group {
            let group = (key.subject.clone(), group.clone());
            entry.groups.entry(group).or_default().members += 1;
        }
        entry.members.insert(key, subject);
        if created && !pattern.is_literal() {
            self.wildcards.insert(&pattern, &subscription.channel);
        }
        Ok(if created {
            Change::Created
        } else {
            Change::Changed
        })
    }

    pub fn remove(&mut self, session: &str, subscription: &Subscription) -> Change {
        let Some(entry) = self.by_pattern.get_mut(&subscription.channel) else {
            return Change::Nothing;
        };
        let key = MemberKey::of(session, subscription);
        if entry.members.swap_remove(&key).is_none() {
            return Change::Nothing;
        }
        if let Some(group) = key.group {
            let group = (key.subject, group);
            // A group nobody is in any more has no turn to keep.
            if let Some(g) = entry.groups.get_mut(&group) {
                g.members -= 1;
                if g.members == 0 {
                    entry.groups.remove(&group);
                }
            }
        }
        if !entry.members.is_empty() {
            return Change::Changed;
        }
        if let Some(gone) = self.by_pattern.remove(&subscription.channel)
            && !gone.pattern.is_literal()
        {
            self.wildcards.remove(&gone.pattern.tokens);
        }
        Change::Removed
    }

    /// The keys of `by_pattern` whose patterns match `channel`.
    fn matching_keys(&self, channel: &str) -> Vec<&str> {
        let mut keys: Vec<&str> = Vec::new();
        if let Some((key, _)) = self.by_pattern.get_key_value(channel) {
            keys.push(key);
        }
        self.wildcards.matching(channel, &mut keys);
        keys
    }

    fn matching(&self, channel: &str) -> impl Iterator<Item = &PatternEntry> {
        self.matching_keys(channel)
            .into_iter()
            .map(|key| &self.by_pattern[key])
    }

    /// Whether any subscription matches `channel`.
    pub fn reaches(&self, channel: &str) -> bool {
        self.matching(channel).next().is_some()
    }

    /// The sessions a message on `channel` with `subject` goes to, each once: every
    /// plain subscriber whose subject pattern matches, and one member of each
    /// consumer group, taking turns and passing over paused members while an
    /// unpaused one is there.
    pub fn route(
        &mut self,
        channel: &str,
        subject: Option<&str>,
        paused: impl Fn(&str) -> bool,
    ) -> Vec<String> {
        // Owned, because the entries are changed below (their turns).
        let keys: Vec<String> = self
            .matching_keys(channel)
            .into_iter()
            .map(str::to_owned)
            .collect();
        let mut chosen: Vec<String> = Vec::new();
        for key in keys {
            let entry = self.by_pattern.get_mut(&key).expect("listed above");
            // Member indexes per group; a BTreeMap so that turns are taken in a
            // stable order.
            let mut groups: BTreeMap<GroupKey, Vec<usize>> = BTreeMap::new();
            for (i, (member, subject_pattern)) in entry.members.iter().enumerate() {
                let subject_matches = match (subject_pattern, subject) {
                    (None, _) => true,
                    (Some(p), Some(s)) => p.matches(s),
                    (Some(_), None) => false,
                };
                if !subject_matches {
                    continue;
                }
                match &member.group {
                    None => chosen.push(member.session.clone()),
                    Some(group) => groups
                        .entry((member.subject.clone(), group.clone()))
                        .or_default()
                        .push(i),
                }
            }
            let session = |i: usize| &entry.members.get_index(i).expect("listed above").0.session;
            for (group, members) in groups {
                let state = entry.groups.entry(group).or_default();
                let n = members.len();
                let pick = (0..n)
                    .map(|i| (state.turn + i) % n)
                    .find(|&i| !paused(session(members[i])))
                    .unwrap_or(state.turn % n);
                state.turn = pick + 1;
                chosen.push(session(members[pick]).clone());
            }
        }
        // A session reached by several subscriptions gets one copy.
        chosen.sort_unstable();
        chosen.dedup();
        chosen
    }

    /// Every session with a subscription whose channel pattern matches `channel`.
    pub fn present(&self, channel: &str) -> Vec<String> {
        let mut sessions: Vec<String> = self
            .matching(channel)
            .flat_map(|e| e.members.keys().map(|m| m.session.clone()))
            .collect();
        sessions.sort();
        sessions.dedup();
        sessions
    }
}

/// Per channel pattern (first match wins), from the core's configuration.
#[derive(Debug, Clone)]
pub struct ChannelSettings {
    pub pattern: Pattern,
    /// Messages kept for subscribers that resume; 0 keeps none.
    pub history_len: usize,
    /// And none older than this.
    pub history_age: Option<Duration>,
    /// Undelivered messages from this channel one subscriber may hold; 0: no limit
    /// but the mailbox's own. The oldest goes first.
    pub max_pending: usize,
    /// Higher is given first when a session has several messages pending.
    pub priority: i32,
}

pub struct HistoryEntry {
    pub id: MessageId,
    pub at: Instant,
    pub subject: Option<String>,
    pub body: String,
}

/// The last messages of one channel.
#[derive(Default)]
pub struct History {
    pub entries: VecDeque<HistoryEntry>,
    /// The highest id no longer kept: a client that saw less may have missed some.
    pub trimmed_to: MessageId,
}

impl History {
    pub fn push(&mut self, entry: HistoryEntry, settings: &ChannelSettings, now: Instant) {
        self.entries.push_back(entry);
        while self.entries.len() > settings.history_len {
            self.pop();
        }
        self.expire(settings, now);
    }

    pub fn expire(&mut self, settings: &ChannelSettings, now: Instant) {
        let Some(age) = settings.history_age else {
            return;
        };
        while self
            .entries
            .front()
            .is_some_and(|e| now.saturating_duration_since(e.at) > age)
        {
            self.pop();
        }
    }

    fn pop(&mut self) {
        if let Some(gone) = self.entries.pop_front() {
            self.trimmed_to = self.trimmed_to.max(gone.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sub(channel: &str, subject: Option<&str>, group: Option<&str>) -> Subscription {
        Subscription {
            channel: channel.into(),
            subject: subject.map(Into::into),
            group: group.map(Into::into),
        }
    }

    #[test]
    fn star_matches_one_token_and_a_final_gt_the_rest() {
        let p = |s| Pattern::parse(s).unwrap();
        assert!(p("orders.*").matches("orders.eu"));
        assert!(!p("orders.*").matches("orders"));
        assert!(!p("orders.*").matches("orders.eu.1"));
        assert!(p("orders.>").matches("orders.eu.1"));
        assert!(p("orders.>").matches("orders.eu"));
        assert!(!p("orders.>").matches("orders"));
        assert!(p("*").matches("anything"));
        assert!(!p("*").matches("a.b"));
        assert!(p(">").matches("a.b.c"));
        assert!(p("a.*.c").matches("a.b.c"));
        assert!(!p("a.*.c").matches("a.b.d"));
        assert!(p("exact").matches("exact"));
        assert!(!p("exact").matches("exact.more"));
        assert!(!p(">").matches("$sys"), "system channels only by name");
        assert!(p("$sys").matches("$sys"));
    }

    #[test]
    fn malformed_patterns_and_wildcard_channel_names_are_refused() {
        for bad in ["", "a..b", "a.>.b", "a*", "or*ders.x", ".a", "a."] {
            assert!(Pattern::parse(bad).is_err(), "{bad:?}");
        }
        assert!(check_channel_name("orders.eu").is_ok());
        assert!(check_channel_name("orders.*").is_err());
    }

    #[test]
    fn every_matching_subscriber_gets_one_copy_even_with_overlapping_patterns() {
        let mut subs = Subscriptions::default();
        subs.add("a", &sub("orders.eu", None, None)).unwrap();
        subs.add("a", &sub("orders.*", None, None)).unwrap();
        subs.add("b", &sub("orders.>", None, None)).unwrap();
        subs.add("c", &sub("other", None, None)).unwrap();
        let mut got = subs.route("orders.eu", None, |_| false);
        got.sort();
        assert_eq!(got, ["a", "b"]);
    }

    #[test]
    fn subject_pattern_filters_and_a_subjectless_message_matches_no_subject_pattern() {
        let mut subs = Subscriptions::default();
        subs.add("a", &sub("orders", Some("created"), None))
            .unwrap();
        subs.add("b", &sub("orders", Some("order.*"), None))
            .unwrap();
        subs.add("c", &sub("orders", None, None)).unwrap();
        assert_eq!(subs.route("orders", Some("created"), |_| false), ["a", "c"]);
        assert_eq!(subs.route("orders", Some("order.x"), |_| false), ["b", "c"]);
        assert_eq!(subs.route("orders", None, |_| false), ["c"]);
    }

    #[test]
    fn consumer_group_members_take_turns_and_paused_ones_are_passed_over() {
        let mut subs = Subscriptions::default();
        for s in ["w1", "w2", "w3"] {
            subs.add(s, &sub("jobs", None, Some("workers"))).unwrap();
        }
        let picks: Vec<String> = (0..6)
            .map(|_| subs.route("jobs", None, |_| false).remove(0))
            .collect();
        assert_eq!(picks, ["w1", "w2", "w3", "w1", "w2", "w3"]);
        let picks: Vec<String> = (0..4)
            .map(|_| subs.route("jobs", None, |s| s == "w2").remove(0))
            .collect();
        assert!(!picks.contains(&"w2".to_owned()), "{picks:?}");
        // All paused: still delivered to one of them, to wait in its mailbox.
        assert_eq!(subs.route("jobs", None, |_| true).len(), 1);
    }

    #[test]
    fn adding_twice_is_one_subscription_and_the_last_removal_says_so() {
        let mut subs = Subscriptions::default();
        let s = sub("c.*", None, None);
        assert_eq!(subs.add("a", &s).unwrap(), Change::Created);
        assert_eq!(subs.add("a", &s).unwrap(), Change::Nothing);
        assert_eq!(subs.add("b", &s).unwrap(), Change::Changed);
        assert_eq!(subs.present("c.x"), ["a", "b"]);
        assert_eq!(subs.remove("a", &s), Change::Changed);
        assert_eq!(subs.remove("a", &s), Change::Nothing);
        assert_eq!(subs.remove("b", &s), Change::Removed);
        assert!(subs.route("c.x", None, |_| false).is_empty());
        assert!(subs.wildcards.is_empty());
    }

    /// Patterns and names over a few tokens, so that they collide often: `$s` for the
    /// core's own channels, and the wildcards wherever a pattern may have them.
    fn arb_pattern() -> impl Strategy<Value = String> {
        let token = prop::sample::select(vec!["a", "b", "$s", "*"]);
        (prop::collection::vec(token, 1..4), any::<bool>()).prop_map(|(tokens, rest)| {
            let mut tokens = tokens.join(".");
            if rest {
                tokens.push_str(".>");
            }
            tokens
        })
    }

    /// Empty tokens too ("a..b", "a."): publishers' names are checked before they
    /// get here, but the tree must still agree with `Pattern::matches` on them.
    fn arb_name() -> impl Strategy<Value = String> {
        prop::collection::vec(prop::sample::select(vec!["a", "b", "c", "$s", ""]), 1..5)
            .prop_map(|tokens| tokens.join("."))
    }

    proptest! {
        /// The tree finds what trying every pattern finds, also after removals, and
        /// is empty once every pattern has gone.
        #[test]
        fn the_pattern_tree_matches_as_every_pattern_would(
            patterns in prop::collection::vec(arb_pattern(), 1..24),
            names in prop::collection::vec(arb_name(), 1..24),
            removed in prop::collection::vec(any::<bool>(), 24),
        ) {
            let mut subs = Subscriptions::default();
            for (i, p) in patterns.iter().enumerate() {
                subs.add(&format!("s{i}"), &sub(p, None, None)).unwrap();
            }
            let check = |subs: &Subscriptions, live: &[(usize, &String)]| {
                for name in &names {
                    let mut expected: Vec<String> = live
                        .iter()
                        .filter(|(_, p)| Pattern::parse(p).unwrap().matches(name))
                        .map(|(i, _)| format!("s{i}"))
                        .collect();
                    expected.sort();
                    prop_assert_eq!(subs.present(name), expected, "{}", name);
                }
                Ok(())
            };
            let all: Vec<(usize, &String)> = patterns.iter().enumerate().collect();
            check(&subs, &all)?;
            for (i, p) in patterns.iter().enumerate().filter(|(i, _)| removed[*i]) {
                subs.remove(&format!("s{i}"), &sub(p, None, None));
            }
            let live: Vec<(usize, &String)> =
                all.iter().copied().filter(|(i, _)| !removed[*i]).collect();
            check(&subs, &live)?;
            for (i, p) in &live {
                subs.remove(&format!("s{i}"), &sub(p, None, None));
            }
            prop_assert!(subs.wildcards.is_empty());
            prop_assert_eq!(subs.patterns(), 0);
        }
    }

    #[test]
    fn a_group_member_that_leaves_gives_its_turns_to_the_others() {
        let mut subs = Subscriptions::default();
        let workers = sub("jobs", None, Some("workers"));
        for s in ["w1", "w2", "w3"] {
            subs.add(s, &workers).unwrap();
        }
        subs.add("watcher", &sub("jobs", None, None)).unwrap();
        assert_eq!(subs.remove("w2", &workers), Change::Changed);
        let mut picks: Vec<String> = (0..4)
            .flat_map(|_| subs.route("jobs", None, |_| false))
            .filter(|s| s != "watcher")
            .collect();
        picks.sort();
        assert_eq!(picks, ["w1", "w1", "w3", "w3"]);
        subs.remove("w1", &workers);
        subs.remove("w3", &workers);
        let entry = &subs.by_pattern["jobs"];
        assert!(
            entry.groups.is_empty(),
            "a group nobody is in keeps no turn"
        );
        assert_eq!(subs.route("jobs", None, |_| false), ["watcher"]);
    }

    proptest! {
        /// Subscribes and unsubscribes in any order leave what a plain set of them
        /// would hold, and each group counts exactly its members.
        #[test]
        fn the_index_holds_what_was_subscribed_and_not_since_removed(
            ops in prop::collection::vec(
                (any::<bool>(), 0..4usize, prop::sample::select(vec!["c", "c.*", ">"]),
                 prop::option::of(prop::sample::select(vec!["x", "x.*"])),
                 prop::option::of(prop::sample::select(vec!["g", "h"]))),
                1..64,
            ),
        ) {
            let mut subs = Subscriptions::default();
            let mut model: std::collections::HashSet<(String, Subscription)> = Default::default();
            for (add, session, channel, subject, group) in ops {
                let session = format!("s{session}");
                let subscription = sub(channel, subject, group);
                if add {
                    subs.add(&session, &subscription).unwrap();
                    model.insert((session, subscription));
                } else {
                    subs.remove(&session, &subscription);
                    model.remove(&(session, subscription));
                }
            }
            for (channel, entry) in &subs.by_pattern {
                let mut counts: HashMap<GroupKey, usize> = HashMap::new();
                let mut expected = 0;
                for (session, subscription) in model.iter().filter(|(_, s)| &s.channel == channel) {
                    expected += 1;
                    prop_assert!(entry.members.contains_key(&MemberKey::of(session, subscription)));
                    if let Some(group) = &subscription.group {
                        *counts.entry((subscription.subject.clone(), group.clone())).or_default() += 1;
                    }
                }
                prop_assert_eq!(entry.members.len(), expected);
                let held: HashMap<GroupKey, usize> =
                    entry.groups.iter().map(|(k, g)| (k.clone(), g.members)).collect();
                prop_assert_eq!(held, counts);
            }
            let members: usize = subs.by_pattern.values().map(|e| e.members.len()).sum();
            prop_assert_eq!(members, model.len());
        }
    }

    #[test]
    fn history_keeps_the_last_n_and_remembers_what_it_dropped() {
        let settings = ChannelSettings {
            pattern: Pattern::parse(">").unwrap(),
            history_len: 2,
            history_age: Some(Duration::from_secs(10)),
            max_pending: 0,
            priority: 0,
        };
        let t0 = Instant::now();
        let mut h = History::default();
        for id in 1..=3 {
            let entry = HistoryEntry {
                id,
                at: t0,
                subject: None,
                body: String::new(),
            };
            h.push(entry, &settings, t0);
        }
        assert_eq!(h.entries.iter().map(|e| e.id).collect::<Vec<_>>(), [2, 3]);
        assert_eq!(h.trimmed_to, 1);
        h.expire(&settings, t0 + Duration::from_secs(11));
        assert!(h.entries.is_empty());
        assert_eq!(h.trimmed_to, 3);
    }
}
