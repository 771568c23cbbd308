//! Refusals of requests that carry no valid authority: calls without a credential or with a
//! wrong one, and pushed security events that fail before or at their signature check.
//!
//! Owns: [`Refusals`], which counts each such refusal by reason (metrics) and by source
//! address (a bounded table), keeps a per-source token bucket of failures in front of every
//! unauthenticated path, and hands the counts to a job that writes them into the audit trail
//! as a few summary events per period ([`Refusals::take_summary`]).
//!
//! Why no event per refusal: an attacker who needs no credential must not be able to turn
//! each request into a durable write, an fsync or a log line, nor make the callers it shares
//! the audit writer with wait behind it. A refusal here costs a hash-table update under a
//! short lock: O(1), no I/O.
//!
//! Must never: write to the store, log, or wait on a lock that is held across I/O; hold more
//! than `unauthenticated_sources` sources; keep anything a client sent (credentials, bodies).

use std::net::IpAddr;
use std::num::NonZeroUsize;
use std::sync::Mutex;
use std::time::Duration;

use super::limits::Bucket;
use super::metrics::Metrics;
pub use crate::config::RefusalLimits;

/// Why a request was refused without an authenticated caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalReason {
    /// No `authorization` header and no client certificate.
    MissingCredential,
    /// An `authorization` header that is not `Bearer <credential>`.
    MalformedCredential,
    /// A bearer credential that matches no configured caller.
    InvalidCredential,
    /// A verified client certificate whose identities match no configured caller.
    UnknownCertificate,
    /// A pushed security event refused before its signature was checked (content type,
    /// size, encoding) or by it (signature, issuer, audience, claims).
    SecurityEventRefused,
    /// A pushed security event whose `jti` was already applied.
    SecurityEventReplayed,
    /// Refused at once because the source's failure budget was spent.
    Throttled,
    /// A provider's unlink callback refused (its source, app id or admin key).
    UnlinkCallbackRefused,
}

impl RefusalReason {
    const ALL: [Self; 8] = [
        Self::MissingCredential,
        Self::MalformedCredential,
        Self::InvalidCredential,
        Self::UnknownCertificate,
        Self::SecurityEventRefused,
        Self::SecurityEventReplayed,
        Self::Throttled,
        Self::UnlinkCallbackRefused,
    ];

    /// The metric label and the summary's field name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MissingCredential => "missing_credential",
            Self::MalformedCredential => "malformed_credential",
            Self::InvalidCredential => "invalid_credential",
            Self::UnknownCertificate => "unknown_certificate",
            Self::SecurityEventRefused => "security_event_refused",
            Self::SecurityEventReplayed => "security_event_replayed",
            Self::Throttled => "throttled",
            Self::UnlinkCallbackRefused => "unlink_callback_refused",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Where refused requests come from: an IPv4 address, or an IPv6 /64 (one host is usually
/// given a whole /64, so counting single IPv6 addresses would let one host spread its
/// failures over 2^64 buckets and churn the table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// One IPv4 address.
    V4([u8; 4]),
    /// The first 64 bits of an IPv6 address.
    V6Prefix([u8; 8]),
    /// The connection had no address (in-process transports).
    Unknown,
}

impl Source {
    /// The source of a peer address.
    pub fn of(ip: Option<IpAddr>) -> Self {
        match ip.map(|ip| ip.to_canonical()) {
            Some(IpAddr::V4(v4)) => Self::V4(v4.octets()),
            Some(IpAddr::V6(v6)) => {
                let o = v6.octets();
                let mut prefix = [0u8; 8];
                prefix.copy_from_slice(&o[..8]);
                Self::V6Prefix(prefix)
            }
            None => Self::Unknown,
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::V4(o) => write!(f, "{}", std::net::Ipv4Addr::from(*o)),
            Self::V6Prefix(p) => {
                let mut o = [0u8; 16];
                o[..8].copy_from_slice(p);
                write!(f, "{}/64", std::net::Ipv6Addr::from(o))
            }
            Self::Unknown => f.write_str("unknown"),
        }
    }
}

#[derive(Debug)]
struct SourceState {
    bucket: Bucket,
    counts: [u64; RefusalReason::ALL.len()],
    /// Times the retry hint has been doubled: once for every throttled refusal that came
    /// before the previous hint had passed ([`Refusals::escalate`]).
    doublings: u32,
    /// When the last hint given to this source ends, by the vault's monotonic clock.
    until: Duration,
}

impl SourceState {
    fn new(burst: u32, now: Duration) -> Self {
        Self {
            bucket: Bucket::full(burst, now),
            counts: [0; RefusalReason::ALL.len()],
            doublings: 0,
            until: Duration::ZERO,
        }
    }
}

/// Past this many doublings the hint is at `throttled_retry_max_seconds` whatever the base.
const MAX_DOUBLINGS: u32 = 24;

#[derive(Debug)]
struct Table {
    sources: lru::LruCache<Source, SourceState>,
    /// Counts of sources dropped from the table since the last summary.
    dropped: [u64; RefusalReason::ALL.len()],
    dropped_sources: u64,
}

/// What one source was refused for since the last summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSummary {
    /// Where the requests came from.
    pub source: String,
    /// Refusals by reason (only reasons with a count).
    pub counts: Vec<(RefusalReason, u64)>,
}

impl SourceSummary {
    /// All refusals of this source.
    pub fn total(&self) -> u64 {
        self.counts.iter().map(|(_, n)| n).sum()
    }

    /// `reason=count` pairs, space-separated, for an audit event's detail.
    pub fn counts_text(&self) -> String {
        self.counts
            .iter()
            .map(|(r, n)| format!("{}={n}", r.as_str()))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// The refusals of one summary period.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// The sources with the most refusals, most first, at most [`SUMMARY_SOURCES`].
    pub top: Vec<SourceSummary>,
    /// Every other source, added up (`source` says how many).
    pub rest: Option<SourceSummary>,
}

impl Summary {
    /// Whether anything was refused.
    pub fn is_empty(&self) -> bool {
        self.top.is_empty() && self.rest.is_none()
    }

    /// All refusals of the period.
    pub fn total(&self) -> u64 {
        self.top
            .iter()
            .chain(&self.rest)
            .map(SourceSummary::total)
            .sum()
    }
}

/// Most sources named one by one in a period's summary; the rest are added up into one.
pub const SUMMARY_SOURCES: usize = 16;

/// The table of refusals without an authenticated caller.
#[derive(Debug)]
pub struct Refusals {
    limits: RefusalLimits,
    table: Mutex<Table>,
    metrics: std::sync::Arc<Metrics>,
    /// Permits for throttled refusals held back until their retry time ([`Refusals::hold`]).
    holds: tokio::sync::Semaphore,
}

/// The answer to a refusal: whether its source has spent its budget, and how long it should
/// wait before trying again if so.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Refuse with the request's own status.
    Refuse,
    /// Refuse with `RESOURCE_EXHAUSTED` / 429: the source is throttled for about this long.
    Throttle(Duration),
}

impl Refusals {
    /// An empty table.
    pub fn new(limits: RefusalLimits, metrics: std::sync::Arc<Metrics>) -> Self {
        let cap = NonZeroUsize::new(limits.sources).unwrap_or(NonZeroUsize::MIN);
        Self {
            limits,
            table: Mutex::new(Table {
                sources: lru::LruCache::new(cap),
                dropped: [0; RefusalReason::ALL.len()],
                dropped_sources: 0,
            }),
            metrics,
            holds: tokio::sync::Semaphore::new(
                limits.hold_max.min(tokio::sync::Semaphore::MAX_PERMITS),
            ),
        }
    }

    /// Holds a throttled refusal back for `wait`, its retry hint, before it is answered. A
    /// client that retries as soon as it is answered (a closed-loop flood) is then paced by its
    /// own concurrency instead of by the daemon's CPU; a client that honours the hint loses
    /// nothing. Costs a timer, no thread; at most `hold_max` are held at once, and past that
    /// the refusal is answered at once, so holding never grows without bound.
    pub async fn hold(&self, wait: Duration) {
        let Ok(_permit) = self.holds.try_acquire() else {
            return;
        };
        tokio::time::sleep(wait).await;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How long a throttled source waits for its next failure to be allowed, before any
    /// doubling.
    fn retry_after(&self) -> Duration {
        Duration::from_millis(1000 / u64::from(self.limits.per_second.max(1)))
            .max(Duration::from_millis(100))
            .min(self.limits.retry_max)
    }

    /// The retry hint for a throttled refusal of `state` at `now`, which is also how long the
    /// answer is held back. A source whose throttled request arrives before its previous hint
    /// has passed has more requests in flight than one at a time, or ignores the hint: the
    /// hint doubles, up to `throttled_retry_max_seconds`. One that waited its hint starts again
    /// at the base. So a closed-loop flood of N concurrent requests is paced at about N per
    /// `throttled_retry_max_seconds` instead of N per base hint, while a single client that
    /// honours the hint (or retries once its held answer comes) never sees more than the base.
    fn escalate(&self, state: &mut SourceState, now: Duration) -> Duration {
        state.doublings = if now < state.until {
            (state.doublings + 1).min(MAX_DOUBLINGS)
        } else {
            0
        };
        let wait = self
            .retry_after()
            .saturating_mul(1 << state.doublings)
            .min(self.limits.retry_max);
        state.until = now + wait;
        wait
    }

    /// Whether `source` has spent its budget already, without charging it (for paths whose
    /// check itself costs something, like a security event's signature).
    pub fn throttled(&self, source: Source, now: Duration) -> Option<Duration> {
        let mut table = self.lock();
        let state = table.sources.get_mut(&source)?;
        if state
            .bucket
            .peek(self.limits.per_second, self.limits.burst, now)
            >= 1.0
        {
            return None;
        }
        state.counts[RefusalReason::Throttled.index()] += 1;
        let wait = self.escalate(state, now);
        drop(table);
        self.count(RefusalReason::Throttled);
        Some(wait)
    }

    /// Counts a refusal of `source` for `reason` and charges its budget, at `now` by the
    /// vault's monotonic clock.
    pub fn refuse(&self, source: Source, reason: RefusalReason, now: Duration) -> Verdict {
        let limits = self.limits;
        let mut table = self.lock();
        if !table.sources.contains(&source) {
            let fresh = SourceState::new(limits.burst, now);
            // The least recently refused source makes room; its counts are kept for the
            // summary.
            if let Some((_, old)) = table.sources.push(source, fresh) {
                for (d, n) in table.dropped.iter_mut().zip(old.counts) {
                    *d += n;
                }
                table.dropped_sources += 1;
            }
        }
        let verdict = match table.sources.get_mut(&source) {
            Some(state) => {
                if state.bucket.take(limits.per_second, limits.burst, now) {
                    state.counts[reason.index()] += 1;
                    Verdict::Refuse
                } else {
                    state.counts[RefusalReason::Throttled.index()] += 1;
                    Verdict::Throttle(self.escalate(state, now))
                }
            }
            // Not reached: the source was just inserted.
            None => Verdict::Refuse,
        };
        drop(table);
        self.count(match verdict {
            Verdict::Refuse => reason,
            Verdict::Throttle(_) => RefusalReason::Throttled,
        });
        verdict
    }

    fn count(&self, reason: RefusalReason) {
        Metrics::count(&self.metrics.unauthenticated_refusals, reason.as_str());
    }

    /// The refusals since the last call, and resets the counts (the buckets stay).
    pub fn take_summary(&self) -> Summary {
        let mut table = self.lock();
        let mut all: Vec<SourceSummary> = Vec::new();
        for (source, state) in table.sources.iter_mut() {
            let counts = std::mem::take(&mut state.counts);
            let summary = summarize(source.to_string(), counts);
            if summary.total() > 0 {
                all.push(summary);
            }
        }
        let dropped = std::mem::take(&mut table.dropped);
        let dropped_sources = std::mem::take(&mut table.dropped_sources);
        drop(table);
        all.sort_by(|a, b| b.total().cmp(&a.total()).then(a.source.cmp(&b.source)));
        let mut rest_counts = dropped;
        let mut rest_sources = dropped_sources;
        for s in all.iter().skip(SUMMARY_SOURCES) {
            for (r, n) in &s.counts {
                rest_counts[r.index()] += n;
            }
            rest_sources += 1;
        }
        all.truncate(SUMMARY_SOURCES);
        let rest = summarize(format!("{rest_sources} other sources"), rest_counts);
        Summary {
            top: all,
            rest: (rest.total() > 0).then_some(rest),
        }
    }
}

fn summarize(source: String, counts: [u64; RefusalReason::ALL.len()]) -> SourceSummary {
    SourceSummary {
        source,
        counts: RefusalReason::ALL
            .iter()
            .zip(counts)
            .filter(|(_, n)| *n > 0)
            .map(|(r, n)| (*r, n))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(per_second: u32, burst: u32, sources: usize) -> Refusals {
        Refusals::new(
            RefusalLimits {
                per_second,
                burst,
                sources,
                hold_max: 0,
                retry_max: Duration::from_secs(10),
            },
            std::sync::Arc::default(),
        )
    }

    /// The monotonic time the checks run at, unless they move it.
    const T0: Duration = Duration::from_secs(1000);

    fn ip(s: &str) -> Source {
        Source::of(Some(s.parse().expect("ip")))
    }

    #[test]
    fn a_source_is_throttled_after_its_burst_and_others_are_not() {
        let r = table(1, 3, 10);
        let a = ip("192.0.2.1");
        for _ in 0..3 {
            assert_eq!(
                r.refuse(a, RefusalReason::InvalidCredential, T0),
                Verdict::Refuse
            );
        }
        assert!(matches!(
            r.refuse(a, RefusalReason::InvalidCredential, T0),
            Verdict::Throttle(d) if d >= Duration::from_millis(100)
        ));
        assert!(r.throttled(a, T0).is_some());
        assert_eq!(r.throttled(ip("192.0.2.2"), T0), None);
        assert_eq!(
            r.refuse(ip("192.0.2.2"), RefusalReason::MissingCredential, T0),
            Verdict::Refuse
        );
        let s = r.take_summary();
        assert_eq!(s.top.len(), 2);
        assert_eq!(s.top[0].source, "192.0.2.1");
        assert_eq!(
            s.top[0].counts,
            vec![
                (RefusalReason::InvalidCredential, 3),
                (RefusalReason::Throttled, 2)
            ]
        );
        assert_eq!(s.top[0].counts_text(), "invalid_credential=3 throttled=2");
        assert_eq!(s.rest, None);
        assert_eq!(s.total(), 6);
        // Counts start again; the bucket does not refill by taking a summary.
        assert!(r.take_summary().is_empty());
        assert!(r.throttled(a, T0).is_some());
        // It refills with time (1 per second), read from the clock passed in, not slept for.
        let later = T0 + Duration::from_millis(1001);
        assert_eq!(r.throttled(a, later), None);
        assert_eq!(
            r.refuse(a, RefusalReason::InvalidCredential, later),
            Verdict::Refuse
        );
        assert!(r.throttled(a, later).is_some());
    }

    #[test]
    fn a_source_that_comes_back_before_its_hint_waits_twice_as_long_up_to_the_max() {
        let r = table(10, 1, 10);
        let (a, b) = (ip("192.0.2.1"), ip("192.0.2.2"));
        let at = |ms: u64| T0 + Duration::from_millis(ms);
        let throttle = |s, now| match r.refuse(s, RefusalReason::InvalidCredential, now) {
            Verdict::Throttle(d) => d,
            Verdict::Refuse => panic!("not throttled at {now:?}"),
        };
        // The burst of one, then a flood of concurrent requests within the same instant: each
        // arrives before the previous hint has passed, so the hint doubles up to the max.
        assert_eq!(
            r.refuse(a, RefusalReason::InvalidCredential, T0),
            Verdict::Refuse
        );
        let hints: Vec<u64> = (0..10)
            .map(|_| u64::try_from(throttle(a, T0).as_millis()).expect("ms"))
            .collect();
        assert_eq!(
            hints,
            [100, 200, 400, 800, 1600, 3200, 6400, 10_000, 10_000, 10_000]
        );
        // The peek of a pushed event's path escalates the same way.
        assert_eq!(r.throttled(a, at(1)), Some(Duration::from_secs(10)));
        // Another source is not affected.
        assert_eq!(
            r.refuse(b, RefusalReason::InvalidCredential, T0),
            Verdict::Refuse
        );
        assert_eq!(throttle(b, at(1)), Duration::from_millis(100));
        // A source that waited its whole hint starts again at the base (its bucket refilled
        // by one in the meantime, so the first request is an ordinary refusal).
        let later = 10_001 + 1;
        assert_eq!(
            r.refuse(a, RefusalReason::InvalidCredential, at(later)),
            Verdict::Refuse
        );
        assert_eq!(throttle(a, at(later)), Duration::from_millis(100));
        // One at a time, each after its hint: never more than the base.
        for i in 1..5 {
            let now = at(later + 101 * i);
            assert_eq!(r.throttled(a, now), None, "the bucket refilled by one");
            assert_eq!(
                r.refuse(a, RefusalReason::InvalidCredential, now),
                Verdict::Refuse
            );
            assert_eq!(
                throttle(a, now + Duration::from_millis(1)),
                Duration::from_millis(100)
            );
        }
    }

    #[test]
    fn ipv6_hosts_are_counted_per_64_and_mapped_v4_as_v4() {
        assert_eq!(ip("2001:db8:1:2::1"), ip("2001:db8:1:2:ffff::9"));
        assert_ne!(ip("2001:db8:1:2::1"), ip("2001:db8:1:3::1"));
        assert_eq!(ip("::ffff:192.0.2.7"), ip("192.0.2.7"));
        assert_eq!(ip("2001:db8:1:2::1").to_string(), "2001:db8:1:2::/64");
        assert_eq!(Source::of(None).to_string(), "unknown");
    }

    #[test]
    fn the_table_is_bounded_and_the_summary_names_few_sources() {
        let r = table(100, 100, 50);
        for i in 0..200u32 {
            let source = Source::V4(i.to_be_bytes());
            for _ in 0..=(i % 3) {
                r.refuse(source, RefusalReason::MissingCredential, T0);
            }
        }
        assert_eq!(r.lock().sources.len(), 50);
        let s = r.take_summary();
        assert_eq!(s.top.len(), SUMMARY_SOURCES);
        assert!(s.top.iter().all(|t| t.total() == 3));
        let rest = s.rest.expect("the rest are added up");
        // Every refusal is in the summary exactly once, whether its source was dropped or not.
        let all: u64 = (0..200u64).map(|i| i % 3 + 1).sum();
        assert_eq!(
            s.top.iter().map(SourceSummary::total).sum::<u64>() + rest.total(),
            all
        );
        assert_eq!(
            rest.source,
            format!("{} other sources", 200 - SUMMARY_SOURCES)
        );
    }
}
