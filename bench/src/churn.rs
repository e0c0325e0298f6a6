//! The books of the churn scenario: what the servers hold after each round of
//! sessions that came, got a message and went, and whether any of it grows with
//! the number of sessions ever seen.
//!
//! No sockets here: msgbench reads `/metrics` and `/proc` between rounds and hands
//! the figures to these functions, which the tests below drive by hand.

/// The gauges of msghandler's `/metrics` that say what the servers still hold for
/// sessions: none of them may stay above its value before the first round.
pub const HELD: [&str; 5] = [
    "micromsg_core_mailboxes",
    "micromsg_core_sessions",
    "micromsg_core_parked_polls",
    "micromsg_handler_parked_polls",
    "micromsg_http_connections",
];

/// The value of an unlabelled series in Prometheus text, `None` when it is absent.
pub fn gauge(metrics: &str, name: &str) -> Option<f64> {
    metrics.lines().find_map(|line| {
        let rest = line.strip_prefix(name)?;
        // `name 3`, not `name_total 3` or `name{kind="x"} 3`.
        let value = rest.strip_prefix(' ')?;
        value.trim().parse().ok()
    })
}

/// The [`HELD`] gauges, in that order (`None` for one the text lacks).
pub fn held(metrics: &str) -> Vec<Option<f64>> {
    HELD.iter().map(|name| gauge(metrics, name)).collect()
}

/// Whether the servers hold nothing more than they did at `baseline`: every gauge
/// is present and at most its baseline value. The generator's own `/metrics`
/// connection is counted in both, so it cancels out.
pub fn forgotten(now: &[Option<f64>], baseline: &[Option<f64>]) -> bool {
    now.len() == baseline.len()
        && now
            .iter()
            .zip(baseline)
            .all(|(now, base)| matches!((now, base), (Some(n), Some(b)) if n <= b))
}

/// Resident memory growth per session, in bytes: from the RSS after round `from`
/// (1-based) to the RSS after the last, over the sessions of the rounds in between.
/// Near zero when nothing grows with the sessions that went. `None` unless at least
/// one round follows `from`.
pub fn growth_per_session(
    rss_after_round_kb: &[u64],
    sessions_per_round: usize,
    from: usize,
) -> Option<f64> {
    let start = *rss_after_round_kb.get(from.checked_sub(1)?)?;
    let last = *rss_after_round_kb.last()?;
    let later_rounds = rss_after_round_kb
        .len()
        .checked_sub(from)
        .filter(|n| *n > 0)?;
    let sessions = (later_rounds * sessions_per_round) as f64;
    Some((last as f64 - start as f64) * 1024.0 / sessions)
}

/// The round the later half of a run starts after: growth is also measured from
/// there, past the first rounds' one-off high-water marks (the allocator's, and a
/// hash table that grows once more when deleted entries fill it while many sessions
/// are live).
pub fn middle_round(rounds: usize) -> usize {
    rounds.div_ceil(2).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = "\
# HELP micromsg_core_mailboxes Mailboxes held.
# TYPE micromsg_core_mailboxes gauge
micromsg_core_mailboxes 12
micromsg_core_mailboxes_total 99
micromsg_core_refused_total{kind=\"MailboxFull\"} 4
micromsg_core_sessions 3
micromsg_core_parked_polls 0
micromsg_handler_parked_polls 1
micromsg_http_connections 2
";

    #[test]
    fn a_gauge_is_read_by_its_exact_name() {
        assert_eq!(gauge(METRICS, "micromsg_core_mailboxes"), Some(12.0));
        assert_eq!(gauge(METRICS, "micromsg_core_refused_total"), None);
        assert_eq!(gauge(METRICS, "micromsg_core_missing"), None);
        assert_eq!(
            held(METRICS),
            vec![Some(12.0), Some(3.0), Some(0.0), Some(1.0), Some(2.0)]
        );
    }

    #[test]
    fn forgotten_means_every_gauge_back_at_or_below_its_baseline() {
        let baseline = held(METRICS);
        assert!(forgotten(&baseline, &baseline));
        let mut lower = baseline.clone();
        lower[0] = Some(0.0);
        assert!(forgotten(&lower, &baseline));
        let mut one_more = baseline.clone();
        one_more[2] = Some(1.0);
        assert!(!forgotten(&one_more, &baseline));
        let mut missing = baseline.clone();
        missing[4] = None;
        assert!(!forgotten(&missing, &baseline));
    }

    #[test]
    fn growth_is_counted_from_a_round_over_the_later_sessions() {
        let rss = [50_000, 50_300, 50_700, 50_900, 51_024];
        // 1 MiB more after four later rounds of 1,024 sessions: 256 B per session.
        assert_eq!(growth_per_session(&rss, 1024, 1), Some(256.0));
        // From round 3: 324 KiB over two rounds.
        assert_eq!(growth_per_session(&rss, 1024, 3), Some(162.0));
        // Memory handed back counts as negative growth.
        assert_eq!(
            growth_per_session(&[50_000, 49_000], 1024, 1),
            Some(-1000.0)
        );
        assert_eq!(growth_per_session(&rss, 1024, 5), None);
        assert_eq!(growth_per_session(&rss, 1024, 0), None);
        assert_eq!(growth_per_session(&[], 1024, 1), None);
    }

    #[test]
    fn the_later_half_starts_after_the_middle_round() {
        assert_eq!(middle_round(10), 5);
        assert_eq!(middle_round(5), 3);
        assert_eq!(middle_round(2), 1);
    }
}
