//! Per-client limits: requests per second per IP and per session, and open
//! connections per IP, with the client's IP taken from `X-Forwarded-For` only when
//! the connection comes from a trusted proxy.
//!
//! One [`Limits`] is shared by every worker thread: a client's connections may land
//! on any of them. governor's keyed limiters are lock-free per key (GCRA over a
//! concurrent map), and the connection count takes a short `std` mutex only when a
//! connection opens or closes.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, InsufficientCapacity, NotUntil, Quota, RateLimiter};
use hyper::header::HeaderMap;
use ipnet::IpNet;

use crate::x0::X0Error;

/// The `rate_limit_*`, `max_connections_per_ip` and `trusted_proxies` keys.
#[derive(Debug, Clone, Default)]
pub struct LimitConfig {
    /// Requests per second, sustained; 0 turns the limit off.
    pub ip_rate: u32,
    pub ip_burst: u32,
    pub session_rate: u32,
    pub session_burst: u32,
    /// 0 turns the limit off.
    pub connections_per_ip: usize,
    /// Addresses or networks (`10.0.0.0/8`) of proxies whose `X-Forwarded-For`
    /// names the client.
    pub trusted_proxies: Vec<String>,
}

pub struct Limits {
    trusted: Vec<IpNet>,
    per_ip: Option<DefaultKeyedRateLimiter<IpAddr>>,
    per_session: Option<DefaultKeyedRateLimiter<String>>,
    connections_per_ip: usize,
    /// Open connections by peer address. Only addresses with a connection are in
    /// it, so it is as large as the number of clients connected now.
    connections: Mutex<HashMap<IpAddr, usize>>,
    /// Open connections in all, for the metrics: one atomic step per connection
    /// opened or closed, never per request.
    open: AtomicU64,
    clock: DefaultClock,
}

/// A request over its rate: when the limiter would let it through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    pub wait: Duration,
    what: &'static str,
}

impl Limited {
    pub fn error(&self) -> X0Error {
        X0Error::new(
            "RateLimited",
            format!(
                "too many requests from this {}: retry in {} ms",
                self.what,
                self.wait.as_millis().max(1)
            ),
        )
    }
}

fn quota(rate: u32, burst: u32) -> Option<Quota> {
    let rate = NonZeroU32::new(rate)?;
    let burst = NonZeroU32::new(burst).unwrap_or(rate);
    Some(Quota::per_second(rate).allow_burst(burst))
}

impl LimitConfig {
    pub fn of(config: &crate::config::HandlerConfig) -> Self {
        LimitConfig {
            ip_rate: config.rate_limit_ip,
            ip_burst: config.rate_limit_ip_burst,
            session_rate: config.rate_limit_session,
            session_burst: config.rate_limit_session_burst,
            connections_per_ip: config.max_connections_per_ip,
            trusted_proxies: config.trusted_proxies.clone(),
        }
    }
}

impl Limits {
    pub fn new(config: &LimitConfig) -> anyhow::Result<Self> {
        let trusted = crate::config::networks("trusted_proxies", &config.trusted_proxies)?;
        Ok(Limits {
            trusted,
            per_ip: quota(config.ip_rate, config.ip_burst).map(RateLimiter::keyed),
            per_session: quota(config.session_rate, config.session_burst).map(RateLimiter::keyed),
            connections_per_ip: config.connections_per_ip,
            connections: Mutex::new(HashMap::new()),
            open: AtomicU64::new(0),
            clock: DefaultClock::default(),
        })
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        self.trusted.iter().any(|net| net.contains(&ip))
    }

    /// The client's address: the peer's, or, when the peer is a trusted proxy, the
    /// last address in `X-Forwarded-For` that is not one of our proxies. Entries left
    /// of that one were written by the client itself and prove nothing.
    pub fn client_ip(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.is_trusted(peer) {
            return peer;
        }
        // From the right, without collecting: a request through a trusted proxy
        // pays for the hops it has, not for an allocation.
        let hops = headers
            .get_all("x-forwarded-for")
            .iter()
            .rev()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.rsplit(','))
            .map(str::trim);
        for hop in hops {
            match hop.parse::<IpAddr>() {
                Ok(ip) if self.is_trusted(ip) => continue,
                Ok(ip) => return ip,
                // Garbage where an address should be: the hops before it cannot be
                // trusted either, so the request counts as the proxy's own.
                Err(_) => return peer,
            }
        }
        peer
    }

    /// Counts a request of the client behind `peer` against `rate_limit_ip`. With
    /// the limit off (the default) this reads no header at all.
    pub fn check_request(&self, peer: IpAddr, headers: &HeaderMap) -> Result<(), Limited> {
        if self.per_ip.is_none() {
            return Ok(());
        }
        self.check_ip(self.client_ip(peer, headers))
    }

    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Limited> {
        self.check(self.per_ip.as_ref(), &ip, "address")
    }

    pub fn check_session(&self, session: &str) -> Result<(), Limited> {
        let Some(limiter) = &self.per_session else {
            return Ok(());
        };
        // Keyed by an owned String: one small allocation per request, only when the
        // limit is on.
        self.check(Some(limiter), &session.to_owned(), "session")
    }

    /// Counts the `messages` of one request (a batch) against `rate_limit_session`,
    /// all or none: a batch refused for the rate spends nothing of the session's
    /// allowance, so its retry is not refused for the part that went before.
    pub fn check_session_messages(&self, session: &str, messages: usize) -> Result<(), X0Error> {
        let Some(limiter) = &self.per_session else {
            return Ok(());
        };
        let Some(n) = u32::try_from(messages).ok().and_then(NonZeroU32::new) else {
            return Ok(());
        };
        match limiter.check_key_n(&session.to_owned(), n) {
            Ok(verdict) => self.verdict(verdict, "session").map_err(|l| l.error()),
            // No wait would ever let it through: saying "retry" would make a client
            // spin on it.
            Err(InsufficientCapacity(burst)) => Err(X0Error::new(
                "BatchTooLarge",
                format!(
                    "{messages} messages in one request are more than a session may \
                     send at once (rate_limit_session_burst = {burst}): send them in \
                     smaller batches"
                ),
            )),
        }
    }

    fn check<K: std::hash::Hash + Eq + Clone>(
        &self,
        limiter: Option<&DefaultKeyedRateLimiter<K>>,
        key: &K,
        what: &'static str,
    ) -> Result<(), Limited> {
        match limiter {
            None => Ok(()),
            Some(l) => self.verdict(l.check_key(key), what),
        }
    }

    fn verdict(
        &self,
        verdict: Result<(), NotUntil<<DefaultClock as Clock>::Instant>>,
        what: &'static str,
    ) -> Result<(), Limited> {
        verdict.map_err(|not_until| Limited {
            wait: not_until.wait_time_from(self.clock.now()),
            what,
        })
    }

    /// Counts a new connection from `peer`; `None` when that address already has
    /// `max_connections_per_ip`. Trusted proxies carry many clients and are not
    /// counted.
    pub fn connect(self: &Arc<Self>, peer: IpAddr) -> Option<ConnectionSlot> {
        let counted = if self.connections_per_ip == 0 || self.is_trusted(peer) {
            None
        } else {
            let mut connections = self.connections.lock().expect("not poisoned");
            let open = connections.entry(peer).or_insert(0);
            if *open >= self.connections_per_ip {
                return None;
            }
            *open += 1;
            Some(peer)
        };
        self.open.fetch_add(1, Ordering::Relaxed);
        Some(ConnectionSlot {
            limits: self.clone(),
            counted,
        })
    }

    /// Connections open now (those refused for `max_connections_per_ip` aside).
    pub fn open_connections(&self) -> u64 {
        self.open.load(Ordering::Relaxed)
    }

    /// Forgets rate-limit state that has run back to full: without it the limiters
    /// would hold every address and session ever seen.
    pub fn forget_idle(&self) {
        if let Some(l) = &self.per_ip {
            l.retain_recent();
            l.shrink_to_fit();
        }
        if let Some(l) = &self.per_session {
            l.retain_recent();
            l.shrink_to_fit();
        }
    }
}

/// One open connection of an address, given back when dropped.
pub struct ConnectionSlot {
    limits: Arc<Limits>,
    /// Set when the connection counts toward its address's limit.
    counted: Option<IpAddr>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let limits = &self.limits;
        limits.open.fetch_sub(1, Ordering::Relaxed);
        if let Some(peer) = self.counted.take() {
            let mut connections = limits.connections.lock().expect("not poisoned");
            if let Some(open) = connections.get_mut(&peer) {
                *open -= 1;
                if *open == 0 {
                    connections.remove(&peer);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(config: LimitConfig) -> Arc<Limits> {
        Arc::new(Limits::new(&config).unwrap())
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn forwarded(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", value.parse().unwrap());
        headers
    }

    #[test]
    fn forwarded_for_counts_only_from_a_trusted_proxy() {
        let l = limits(LimitConfig {
            trusted_proxies: vec!["127.0.0.1".into(), "10.0.0.0/8".into()],
            ..Default::default()
        });
        let h = forwarded("6.6.6.6, 203.0.113.7, 10.1.2.3");
        // From the proxy: the last hop that is not ours; the client-written 6.6.6.6
        // is ignored.
        assert_eq!(l.client_ip(ip("127.0.0.1"), &h), ip("203.0.113.7"));
        // Straight from a client: its header means nothing.
        assert_eq!(l.client_ip(ip("198.51.100.1"), &h), ip("198.51.100.1"));
        assert_eq!(
            l.client_ip(ip("127.0.0.1"), &HeaderMap::new()),
            ip("127.0.0.1")
        );
        assert_eq!(
            l.client_ip(ip("127.0.0.1"), &forwarded("junk")),
            ip("127.0.0.1")
        );
        assert!(
            Limits::new(&LimitConfig {
                trusted_proxies: vec!["nginx".into()],
                ..Default::default()
            })
            .is_err()
        );
    }

    #[test]
    fn a_rate_limit_trips_after_the_burst_and_recovers() {
        let l = limits(LimitConfig {
            session_rate: 20,
            session_burst: 5,
            ..Default::default()
        });
        for _ in 0..5 {
            assert!(l.check_session("A").is_ok());
        }
        let limited = l.check_session("A").unwrap_err();
        assert!(limited.wait > Duration::ZERO && limited.wait <= Duration::from_millis(50));
        assert_eq!(limited.error().kind, "RateLimited");
        // Other sessions are not affected.
        assert!(l.check_session("B").is_ok());
        std::thread::sleep(Duration::from_millis(60));
        assert!(l.check_session("A").is_ok());
        // Off when the rate is 0.
        assert!(l.check_ip(ip("127.0.0.1")).is_ok());
    }

    #[test]
    fn a_batch_counts_all_its_messages_or_none() {
        let l = limits(LimitConfig {
            session_rate: 1,
            session_burst: 10,
            ..Default::default()
        });
        l.check_session_messages("A", 6).unwrap();
        // 4 left: a batch of 5 is refused and spends nothing, so 4 still pass.
        assert_eq!(
            l.check_session_messages("A", 5).unwrap_err().kind,
            "RateLimited"
        );
        l.check_session_messages("A", 4).unwrap();
        assert!(l.check_session("A").is_err());
        // More than the burst never passes, whatever the wait: a distinct refusal.
        let too_big = l.check_session_messages("B", 11).unwrap_err();
        assert_eq!(too_big.kind, "BatchTooLarge");
        assert!(too_big.message.contains("= 10"), "{}", too_big.message);
        l.check_session_messages("B", 10).unwrap();
        // Off when the rate is 0.
        let off = limits(LimitConfig::default());
        off.check_session_messages("A", 1000).unwrap();
    }

    #[test]
    fn connections_per_ip_are_counted_and_given_back() {
        let l = limits(LimitConfig {
            connections_per_ip: 2,
            trusted_proxies: vec!["127.0.0.1".into()],
            ..Default::default()
        });
        let a = l.connect(ip("192.0.2.1")).unwrap();
        let _b = l.connect(ip("192.0.2.1")).unwrap();
        assert!(l.connect(ip("192.0.2.1")).is_none());
        assert!(l.connect(ip("192.0.2.2")).is_some());
        drop(a);
        assert!(l.connect(ip("192.0.2.1")).is_some());
        // A trusted proxy is never refused.
        let proxied: Vec<_> = (0..5).map(|_| l.connect(ip("127.0.0.1"))).collect();
        assert!(proxied.iter().all(Option::is_some));
        drop(proxied);
        drop(_b);
        assert!(l.connections.lock().unwrap().is_empty());
    }
}
