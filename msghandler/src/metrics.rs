//! `GET /metrics`: msghandler's own counters and the core's, in the Prometheus text
//! exposition format, for operators only (`metrics_allow`).
//!
//! The request path only bumps relaxed atomics that belong to its worker thread
//! (one [`WorkerMetrics`] per worker, so no cache line is shared between workers)
//! and allocates nothing. A scrape sums the workers, asks the core for its own
//! counters (`ipc::Request::Metrics`) and has `prometheus-client` write the text.

use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use hyper::StatusCode;
use ipnet::IpNet;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// The `Content-Type` of a scrape's answer.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Which part of the HTTP surface answered: few enough values that every
/// combination with a status is one fixed counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteKind {
    X0,
    V1,
    Backend,
    WebSocket,
    Events,
    Asset,
    Health,
    Metrics,
    /// Unknown paths.
    Other,
}

impl RouteKind {
    const ALL: [RouteKind; 9] = [
        RouteKind::X0,
        RouteKind::V1,
        RouteKind::Backend,
        RouteKind::WebSocket,
        RouteKind::Events,
        RouteKind::Asset,
        RouteKind::Health,
        RouteKind::Metrics,
        RouteKind::Other,
    ];

    fn label(self) -> &'static str {
        match self {
            RouteKind::X0 => "x0",
            RouteKind::V1 => "v1",
            RouteKind::Backend => "backend",
            RouteKind::WebSocket => "websocket",
            RouteKind::Events => "events",
            RouteKind::Asset => "asset",
            RouteKind::Health => "health",
            RouteKind::Metrics => "metrics",
            RouteKind::Other => "other",
        }
    }
}

/// The statuses msghandler answers with, each its own counter; anything else is
/// counted under "other".
const STATUSES: [u16; 16] = [
    101, 200, 204, 400, 401, 403, 404, 405, 408, 413, 415, 429, 500, 501, 503, 504,
];

fn status_slot(status: StatusCode) -> usize {
    STATUSES
        .iter()
        .position(|s| *s == status.as_u16())
        .unwrap_or(STATUSES.len())
}

/// Upper bounds of the IPC round-trip buckets, in microseconds: a round trip on an
/// idle machine takes tens of microseconds, one behind an fsync milliseconds.
const ROUND_TRIP_BOUNDS_US: [u64; 13] = [
    50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];

/// A latency histogram of fixed buckets, written by one worker thread.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    counts: [AtomicU64; ROUND_TRIP_BOUNDS_US.len() + 1],
    sum_us: AtomicU64,
}

impl LatencyHistogram {
    pub fn observe(&self, took: Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let bucket = ROUND_TRIP_BOUNDS_US.partition_point(|bound| *bound < us);
        self.counts[bucket].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    fn add_to(&self, total: &mut ipc::Histogram) {
        if total.counts.is_empty() {
            total.bounds_us = ROUND_TRIP_BOUNDS_US.to_vec();
            total.counts = vec![0; ROUND_TRIP_BOUNDS_US.len() + 1];
        }
        for (sum, count) in total.counts.iter_mut().zip(&self.counts) {
            *sum += count.load(Ordering::Relaxed);
        }
        total.sum_us += self.sum_us.load(Ordering::Relaxed);
    }
}

/// What the IPC client pool of one worker counts ([`crate::core_link::CorePool`]).
#[derive(Debug, Default)]
pub struct LinkMetrics {
    /// Requests answered by the core, from sending to the answer; polls, which
    /// wait by design, are not among them.
    pub round_trip: LatencyHistogram,
    /// Polls this worker has waiting at the core.
    pub parked_polls: AtomicI64,
}

/// The streams a worker holds open.
#[derive(Debug, Clone, Copy)]
pub enum Stream {
    WebSocket,
    Events,
}

/// One worker's counters. Only its own thread writes them.
#[derive(Debug)]
pub struct WorkerMetrics {
    shared: Arc<Metrics>,
    link: Arc<LinkMetrics>,
    responses: [[AtomicU64; STATUSES.len() + 1]; RouteKind::ALL.len()],
    websockets: AtomicI64,
    event_streams: AtomicI64,
}

/// Holds a stream's place in its gauge for as long as the stream is open.
pub struct OpenStream {
    gauge: Arc<WorkerMetrics>,
    stream: Stream,
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.gauge
            .stream_gauge(self.stream)
            .fetch_sub(1, Ordering::Relaxed);
    }
}

impl WorkerMetrics {
    pub fn responded(&self, route: RouteKind, status: StatusCode) {
        self.responses[route as usize][status_slot(status)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn open_stream(self: &Arc<Self>, stream: Stream) -> OpenStream {
        self.stream_gauge(stream).fetch_add(1, Ordering::Relaxed);
        OpenStream {
            gauge: self.clone(),
            stream,
        }
    }

    fn stream_gauge(&self, stream: Stream) -> &AtomicI64 {
        match stream {
            Stream::WebSocket => &self.websockets,
            Stream::Events => &self.event_streams,
        }
    }

    /// The process-wide half: who may scrape, and every worker's counters.
    pub fn shared(&self) -> &Metrics {
        &self.shared
    }
}

/// Process-wide: the scrape's access rule and the workers to sum.
#[derive(Debug)]
pub struct Metrics {
    allow: Vec<IpNet>,
    /// Registered once per worker at its start; `Weak`, since each worker's
    /// counters point back here.
    workers: Mutex<Vec<Weak<WorkerMetrics>>>,
}

impl Metrics {
    /// `allow` holds addresses or networks (`metrics_allow`).
    pub fn new(allow: &[String]) -> anyhow::Result<Arc<Self>> {
        let allow = crate::config::networks("metrics_allow", allow)?;
        Ok(Arc::new(Metrics {
            allow,
            workers: Mutex::new(Vec::new()),
        }))
    }

    /// A worker's counters, registered for the scrapes. `link` is its IPC pool's.
    pub fn worker(self: &Arc<Self>, link: Arc<LinkMetrics>) -> Arc<WorkerMetrics> {
        let worker = Arc::new(WorkerMetrics {
            shared: self.clone(),
            link,
            responses: Default::default(),
            websockets: AtomicI64::new(0),
            event_streams: AtomicI64::new(0),
        });
        let mut workers = self.workers.lock().expect("not poisoned");
        workers.retain(|w| w.strong_count() > 0);
        workers.push(Arc::downgrade(&worker));
        worker
    }

    /// Whether `client` may scrape. Judged on the client address after trusted
    /// proxies, so that a proxy that forwards `/metrics` by mistake does not make
    /// every client look like loopback.
    pub fn allows(&self, client: IpAddr) -> bool {
        let client = match client {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(client, IpAddr::V4),
            v4 => v4,
        };
        self.allow.iter().any(|net| net.contains(&client))
    }

    /// Every worker's counters added up.
    pub fn handler_totals(&self, open_connections: u64) -> HandlerTotals {
        let mut totals = HandlerTotals {
            responses: Vec::new(),
            round_trip: ipc::Histogram::default(),
            open_connections,
            websockets: 0,
            event_streams: 0,
            parked_polls: 0,
        };
        let mut responses = [[0u64; STATUSES.len() + 1]; RouteKind::ALL.len()];
        let workers: Vec<_> = self
            .workers
            .lock()
            .expect("not poisoned")
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for worker in workers {
            for (sums, counts) in responses.iter_mut().zip(&worker.responses) {
                for (sum, count) in sums.iter_mut().zip(counts) {
                    *sum += count.load(Ordering::Relaxed);
                }
            }
            worker.link.round_trip.add_to(&mut totals.round_trip);
            totals.websockets += worker.websockets.load(Ordering::Relaxed);
            totals.event_streams += worker.event_streams.load(Ordering::Relaxed);
            totals.parked_polls += worker.link.parked_polls.load(Ordering::Relaxed);
        }
        for (route, counts) in RouteKind::ALL.iter().zip(responses) {
            for (slot, count) in counts.into_iter().enumerate() {
                if count > 0 {
                    let status = STATUSES.get(slot).map_or("other".into(), u16::to_string);
                    totals.responses.push((route.label(), status, count));
                }
            }
        }
        totals
    }
}

/// msghandler's side of a scrape, summed over the workers.
#[derive(Debug, Clone)]
pub struct HandlerTotals {
    /// `(route kind, status, count)`, only those that happened.
    pub responses: Vec<(&'static str, String, u64)>,
    pub round_trip: ipc::Histogram,
    pub open_connections: u64,
    pub websockets: i64,
    pub event_streams: i64,
    pub parked_polls: i64,
}

/// Everything one scrape shows; `core` is `None` when the core did not answer.
#[derive(Debug)]
struct Scrape {
    handler: HandlerTotals,
    core: Option<ipc::CoreMetrics>,
}

/// The exposition text of a scrape.
pub fn render(handler: HandlerTotals, core: Option<ipc::CoreMetrics>) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scrape { handler, core }));
    let mut text = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut text, &registry)
        .expect("writing to a String cannot fail");
    text
}

fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, v: u64) -> std::fmt::Result {
    e.encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&v, None)
}

fn gauge<V: prometheus_client::encoding::EncodeGaugeValue>(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: V,
) -> std::fmt::Result {
    e.encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&v)
}

fn histogram(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    h: &ipc::Histogram,
) -> std::fmt::Result {
    e.encode_descriptor(name, help, None, MetricType::Histogram)?
        .encode_histogram::<NoLabelSet>(
            h.sum_us as f64 / 1e6,
            h.count(),
            &h.buckets_seconds(),
            None,
        )
}

impl Collector for Scrape {
    fn encode(&self, mut e: DescriptorEncoder) -> std::fmt::Result {
        let h = &self.handler;
        let mut responses = e.encode_descriptor(
            "micromsg_http_responses",
            "HTTP responses msghandler sent, by route kind and status.",
            None,
            MetricType::Counter,
        )?;
        for (route, status, count) in &h.responses {
            let labels = [("route", *route), ("status", status.as_str())];
            responses
                .encode_family(&labels)?
                .encode_counter::<NoLabelSet, _, u64>(count, None)?;
        }
        histogram(
            &mut e,
            "micromsg_ipc_round_trip_seconds",
            "Time from sending a request to msgserver to its answer (polls excluded).",
            &h.round_trip,
        )?;
        gauge(
            &mut e,
            "micromsg_http_connections",
            "Open HTTP connections (WebSockets and event streams included).",
            h.open_connections,
        )?;
        gauge(
            &mut e,
            "micromsg_websockets",
            "Open WebSockets.",
            h.websockets,
        )?;
        gauge(
            &mut e,
            "micromsg_sse_streams",
            "Open Server-Sent Events streams.",
            h.event_streams,
        )?;
        gauge(
            &mut e,
            "micromsg_handler_parked_polls",
            "Polls msghandler has waiting at msgserver.",
            h.parked_polls,
        )?;
        gauge(
            &mut e,
            "micromsg_core_up",
            "1 when msgserver answered this scrape, else 0 (and no micromsg_core_* series).",
            u64::from(self.core.is_some()),
        )?;
        let Some(c) = &self.core else {
            return Ok(());
        };
        for (name, help, value) in [
            (
                "micromsg_core_published",
                "Messages accepted (once per message, not per recipient).",
                c.published,
            ),
            (
                "micromsg_core_delivered",
                "Message copies handed to a poll, redeliveries included.",
                c.delivered,
            ),
            (
                "micromsg_core_acknowledged",
                "Message copies acknowledged (ack delivery mode).",
                c.acknowledged,
            ),
            (
                "micromsg_core_redelivered",
                "Message copies put back in line to be given again.",
                c.redelivered,
            ),
            (
                "micromsg_core_expired",
                "Message copies dropped for their time-to-live.",
                c.expired,
            ),
            (
                "micromsg_core_dropped",
                "Message copies dropped to make room (drop_oldest, max_pending).",
                c.dropped,
            ),
            (
                "micromsg_core_dead_lettered",
                "Message copies moved to the dead-letter queue.",
                c.dead_lettered,
            ),
        ] {
            counter(&mut e, name, help, value)?;
        }
        let mut refused = e.encode_descriptor(
            "micromsg_core_refused",
            "Requests msgserver refused, by kind.",
            None,
            MetricType::Counter,
        )?;
        for (kind, count) in &c.refused {
            let labels = [("kind", kind.name())];
            refused
                .encode_family(&labels)?
                .encode_counter::<NoLabelSet, _, u64>(count, None)?;
        }
        let mut depth = e.encode_descriptor(
            "micromsg_core_queue_depth",
            "Message copies held: ready to deliver, in flight (given, not acknowledged), dead letters.",
            None,
            MetricType::Gauge,
        )?;
        for (state, value) in [
            ("ready", c.ready),
            ("in_flight", c.in_flight),
            ("dead", c.dead_letters),
        ] {
            depth
                .encode_family(&[("state", state)])?
                .encode_gauge(&value)?;
        }
        for (name, help, value) in [
            ("micromsg_core_sessions", "Sessions present.", c.sessions),
            (
                "micromsg_core_mailboxes",
                "Mailboxes held, present sessions or not.",
                c.mailboxes,
            ),
            (
                "micromsg_core_parked_polls",
                "Polls parked at msgserver, from every handler.",
                c.parked_polls,
            ),
            (
                "micromsg_core_queued_bytes",
                "Bytes of message bodies held (what max_queued_bytes bounds).",
                c.queued_bytes,
            ),
        ] {
            gauge(&mut e, name, help, value)?;
        }
        if let Some(storage) = &c.storage {
            gauge(
                &mut e,
                "micromsg_core_journal_bytes",
                "Bytes of msgserver's log on disk.",
                storage.journal_bytes,
            )?;
            histogram(
                &mut e,
                "micromsg_core_fsync_seconds",
                "Time each fsync of msgserver's log took.",
                &storage.fsync,
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_allow_takes_addresses_and_networks_and_nothing_else() {
        let metrics =
            Metrics::new(&["127.0.0.1".into(), "10.0.0.0/8".into(), "::1".into()]).unwrap();
        assert!(metrics.allows("127.0.0.1".parse().unwrap()));
        assert!(metrics.allows("10.9.8.7".parse().unwrap()));
        assert!(metrics.allows("::1".parse().unwrap()));
        assert!(metrics.allows("::ffff:10.1.1.1".parse().unwrap()));
        assert!(!metrics.allows("192.168.1.1".parse().unwrap()));
        let err = Metrics::new(&["localhost".into()]).unwrap_err();
        assert!(err.to_string().contains("\"localhost\""), "{err}");
    }

    #[test]
    fn a_scrape_sums_the_workers_and_shows_the_core_when_it_answered() {
        let metrics = Metrics::new(&[]).unwrap();
        let a = metrics.worker(Arc::default());
        let b = metrics.worker(Arc::default());
        a.responded(RouteKind::X0, StatusCode::OK);
        b.responded(RouteKind::X0, StatusCode::OK);
        b.responded(RouteKind::V1, StatusCode::IM_A_TEAPOT);
        a.link.round_trip.observe(Duration::from_micros(70));
        let _ws = b.open_stream(Stream::WebSocket);
        {
            let _gone = a.open_stream(Stream::Events);
        }
        let text = render(metrics.handler_totals(3), None);
        for line in [
            "micromsg_http_responses_total{route=\"x0\",status=\"200\"} 2",
            "micromsg_http_responses_total{route=\"v1\",status=\"other\"} 1",
            "micromsg_ipc_round_trip_seconds_bucket{le=\"0.0001\"} 1",
            "micromsg_ipc_round_trip_seconds_count 1",
            "micromsg_http_connections 3",
            "micromsg_websockets 1",
            "micromsg_sse_streams 0",
            "micromsg_core_up 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
        assert!(!text.contains("micromsg_core_published"));
        let core = ipc::CoreMetrics {
            published: 5,
            refused: vec![(ipc::ErrorKind::MailboxFull, 2)],
            ready: 4,
            storage: Some(ipc::StorageMetrics {
                journal_bytes: 99,
                fsync: ipc::Histogram {
                    bounds_us: vec![1000],
                    counts: vec![1, 1],
                    sum_us: 3000,
                },
            }),
            ..Default::default()
        };
        let text = render(metrics.handler_totals(0), Some(core));
        for line in [
            "micromsg_core_up 1",
            "micromsg_core_published_total 5",
            "micromsg_core_refused_total{kind=\"MailboxFull\"} 2",
            "micromsg_core_queue_depth{state=\"ready\"} 4",
            "micromsg_core_journal_bytes 99",
            "micromsg_core_fsync_seconds_bucket{le=\"0.001\"} 1",
            "micromsg_core_fsync_seconds_bucket{le=\"+Inf\"} 2",
            "micromsg_core_fsync_seconds_sum 0.003",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
    }
}
