//! corebench — the core's data structures alone, at sizes the load generator does not
//! reach: the subscription index (`msgserver::routing`), what it costs to find who a
//! channel message goes to as the number of distinct wildcard patterns grows (one
//! per user, `user.<i>.>`, as an application that gives each user a subtree would
//! subscribe) and as one channel's fan-out grows, and to subscribe and unsubscribe
//! one of many sessions; and the broker's once-a-second sweep (`Broker::sweep`) over
//! many mailboxes with messages queued, during which the single-threaded core
//! answers nothing else.
//!
//! Not a measure of the whole server: no sockets, no storage, one thread.

use std::hint::black_box;
use std::time::{Duration, Instant};

use clap::Parser;
use ipc::{Request, Subscription};
use msgserver::broker::{Broker, BrokerConfig, ClockAnchor, ReplyTo};
use msgserver::routing::Subscriptions;

/// Times the subscription index and the broker's sweep at growing sizes.
#[derive(Parser, Debug)]
#[command(version)]
struct Args {
    /// Distinct wildcard patterns, one subscriber each; one row per figure.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 100, 1_000, 10_000, 100_000])]
    patterns: Vec<usize>,
    /// Subscribers of one literal channel; one row per figure.
    #[arg(long, value_delimiter = ',', default_values_t = [1_000, 10_000])]
    fanout: Vec<usize>,
    /// Sessions that subscribe to one channel and then unsubscribe, one by one; one
    /// row per figure.
    #[arg(long, value_delimiter = ',', default_values_t = [10_000, 100_000])]
    churn: Vec<usize>,
    /// Mailboxes the sweep walks; one row per figure.
    #[arg(long, value_delimiter = ',', default_values_t = [10_000, 100_000])]
    mailboxes: Vec<usize>,
    /// Messages queued in each of them.
    #[arg(long, default_value_t = 10)]
    queued: usize,
    /// How long each row is timed.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
}

fn subscription(channel: String) -> Subscription {
    Subscription {
        channel,
        subject: None,
        group: None,
    }
}

/// Calls `route` for `seconds` and returns (calls, nanoseconds per call); every
/// call must reach exactly `expect` sessions.
fn time(
    subs: &mut Subscriptions,
    seconds: f64,
    expect: usize,
    channel: impl Fn(u64) -> String,
) -> (u64, f64) {
    let budget = Duration::from_secs_f64(seconds);
    let names: Vec<String> = (0..1024).map(channel).collect();
    let start = Instant::now();
    let mut calls = 0u64;
    // The clock is read once per 16 calls, so that it stays out of the figure for the
    // cheapest routes.
    while start.elapsed() < budget {
        for _ in 0..16 {
            let name = &names[calls as usize % names.len()];
            let got = subs.route(black_box(name), None, |_| false);
            assert_eq!(got.len(), expect, "route({name}) reached {got:?}");
            black_box(got);
            calls += 1;
        }
    }
    let ns = start.elapsed().as_nanos() as f64 / calls as f64;
    (calls, ns)
}

fn main() {
    let args = Args::parse();
    println!("| subscriptions | publish to | sessions reached | routes timed | ns per route |");
    println!("|---|---|---:|---:|---:|");
    for &n in &args.patterns {
        let mut subs = Subscriptions::default();
        for i in 0..n {
            subs.add(&format!("u{i}"), &subscription(format!("user.{i}.>")))
                .expect("valid pattern");
        }
        let modulo = n as u64;
        let (calls, ns) = time(&mut subs, args.seconds, 1, |k| {
            format!("user.{}.inbox", (k * 7919) % modulo)
        });
        println!("| {n} distinct `user.<i>.>` | `user.<j>.inbox` | 1 | {calls} | {ns:.0} |");
        println!(
            "{{\"bench\":\"corebench\",\"case\":\"wildcards\",\"subscriptions\":{n},\"reached\":1,\"calls\":{calls},\"ns_per_route\":{ns:.1}}}"
        );
    }
    for &n in &args.fanout {
        let mut subs = Subscriptions::default();
        for i in 0..n {
            subs.add(&format!("fan{i}"), &subscription("bench.fan".into()))
                .expect("valid pattern");
        }
        let (calls, ns) = time(&mut subs, args.seconds, n, |_| "bench.fan".into());
        println!(
            "| {n} on `bench.fan` | `bench.fan` | {n} | {calls} | {ns:.0} ({:.1} per session) |",
            ns / n as f64
        );
        println!(
            "{{\"bench\":\"corebench\",\"case\":\"fanout\",\"subscriptions\":{n},\"reached\":{n},\"calls\":{calls},\"ns_per_route\":{ns:.1}}}"
        );
    }
    println!();
    println!("| sessions on one channel | µs per subscribe | µs per unsubscribe |");
    println!("|---:|---:|---:|");
    for &n in &args.churn {
        let mut subs = Subscriptions::default();
        let channel = subscription("bench.news".into());
        let start = Instant::now();
        for i in 0..n {
            subs.add(&format!("s{i}"), &channel).expect("valid pattern");
        }
        let add = start.elapsed().as_secs_f64() * 1e6 / n as f64;
        let start = Instant::now();
        for i in 0..n {
            subs.remove(&format!("s{i}"), &channel);
        }
        let remove = start.elapsed().as_secs_f64() * 1e6 / n as f64;
        assert_eq!(subs.patterns(), 0, "every subscription went");
        println!("| {n} | {add:.2} | {remove:.2} |");
        println!(
            "{{\"bench\":\"corebench\",\"case\":\"churn\",\"subscriptions\":{n},\"us_per_add\":{add:.3},\"us_per_remove\":{remove:.3}}}"
        );
    }
    println!();
    println!("| mailboxes | queued in each | message TTL | sweep ms (median of 5) |");
    println!("|---:|---:|---|---:|");
    for &n in &args.mailboxes {
        for ttl in [None, Some(Duration::from_secs(3600))] {
            let ms = sweep_ms(n, args.queued, ttl);
            let shown = ttl.map_or("none".to_owned(), |t| format!("{} s", t.as_secs()));
            println!("| {n} | {} | {shown} | {ms:.2} |", args.queued);
            println!(
                "{{\"bench\":\"corebench\",\"case\":\"sweep\",\"mailboxes\":{n},\"queued\":{},\"ttl_s\":{},\"sweep_ms\":{ms:.3}}}",
                args.queued,
                ttl.map_or(0, |t| t.as_secs())
            );
        }
    }
}

/// A broker with `queued` x0 messages for each of `mailboxes` sessions, none of them
/// due to expire; the median time of five sweeps, in milliseconds.
fn sweep_ms(mailboxes: usize, queued: usize, ttl: Option<Duration>) -> f64 {
    let clock = ClockAnchor::now();
    let now = clock.instant;
    let mut broker = Broker::new(
        BrokerConfig {
            message_ttl: ttl,
            ..BrokerConfig::default()
        },
        clock,
    );
    let mut out = Vec::new();
    let mut request = 0;
    for i in 0..mailboxes {
        for _ in 0..queued {
            request += 1;
            let publish = Request::Publish {
                src: "bench".into(),
                dst: format!("s{i}"),
                body: r#"{"pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#
                    .into(),
                key: None,
            };
            broker.handle(now, ReplyTo { conn: 1, request }, publish, &mut out);
            out.clear();
        }
    }
    assert_eq!(
        broker.stats().ready,
        mailboxes * queued,
        "everything queued"
    );
    let mut times: Vec<f64> = (1..=5)
        .map(|s| {
            let start = Instant::now();
            broker.sweep(now + Duration::from_millis(s), &mut out);
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    assert_eq!(
        broker.stats().ready,
        mailboxes * queued,
        "the sweep drops nothing"
    );
    times.sort_by(f64::total_cmp);
    times[2]
}
