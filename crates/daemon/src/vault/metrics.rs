//! Prometheus metrics: what operators need to see the daemon work.
//!
//! Owns: [`Metrics`] (the registry and every metric); the vault's components count into it and
//! the adapters add theirs (per-RPC counts and latency, authentication refusals). Serving it
//! over HTTP is the server's job. Labels are bounded: gRPC methods the daemon does not
//! implement are counted as `unknown`, providers are the configured ones, statuses are gRPC
//! codes in their canonical names (`PERMISSION_DENIED`). Must never: put a record id, owner,
//! credential or any secret into a label.
//!
//! The exposition is OpenMetrics 1.0 text: counters end in `_total`, each name has one unit
//! (suffix and `# UNIT`), and what is sampled at scrape time (the DEK cache, the engine, the
//! process) is built fresh for each scrape from the current values, so a counter sampled from
//! elsewhere is still exposed as a counter.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use super::Vault;

/// Labels of a gRPC call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// `/package.Service/Method`, or `unknown`.
    pub method: String,
    /// gRPC status code name.
    pub code: String,
}

/// Labels with one `method`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// `/package.Service/Method`, or `unknown`.
    pub method: String,
}

/// A single `outcome` / `reason` / `provider` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// Outcome name.
    pub outcome: String,
}

/// A single gRPC `code` label, in its canonical name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// `PERMISSION_DENIED`, ...
    pub code: String,
}

/// Upstream answers by provider and status class.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// Configured provider name.
    pub provider: String,
    /// `2xx`, `4xx`, ..., or the proxy error kind.
    pub status: String,
}

/// A configured webhook endpoint's name.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EndpointLabel {
    /// `[webhooks.endpoints.NAME]`.
    pub endpoint: String,
}

fn latency() -> Histogram {
    // 50 µs .. ~3.3 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 17))
}

/// Every metric of one daemon.
pub struct Metrics {
    registry: Registry,
    /// gRPC calls by method and status.
    pub rpc_requests: Family<RpcLabels, Counter>,
    /// gRPC call latency by method.
    pub rpc_duration: Family<MethodLabels, Histogram, fn() -> Histogram>,
    /// RSA-OAEP unwrap latency.
    pub rsa_unwrap: Histogram,
    /// Authentication and authorization refusals by gRPC status.
    pub auth_denials: Family<CodeLabel, Counter>,
    /// Denial-burst alerts raised.
    pub denial_bursts: Counter,
    /// Rate-limit refusals (`caller` or `record` bucket).
    pub rate_limited: Family<Outcome, Counter>,
    /// Refusals without an authenticated caller, by reason (never by source: unbounded).
    pub unauthenticated_refusals: Family<Outcome, Counter>,
    /// Connections the daemon closed, by why (`idle`, `cap`).
    pub connections_closed: Family<Outcome, Counter>,
    /// Requests refused because the private-key queue was full or too slow, or the commit
    /// queue full, by why (`queue_full`, `queue_wait`, `caller_gone`, `commit_queue_full`).
    pub shed: Family<Outcome, Counter>,
    /// Token refreshes by outcome.
    pub refreshes: Family<Outcome, Counter>,
    /// Upstream answers (and proxy failures) by provider.
    pub upstream: Family<UpstreamLabels, Counter>,
    /// Webhook delivery attempts by outcome (`delivered`, `failed`, `gone`), and entries
    /// dead-lettered (`dead`).
    pub webhook_deliveries: Family<Outcome, Counter>,
    /// Age in seconds of each endpoint's oldest undelivered entry at the last pass.
    pub webhook_lag: Family<EndpointLabel, Gauge>,
    /// Records rewrapped, and the total of the running or last rewrap.
    pub rewrap_done: Gauge,
    /// Records the running or last rewrap has to move.
    pub rewrap_total: Gauge,
    /// Private-key threads whose call has run `private_key_stuck_seconds` or longer.
    pub private_key_stuck: Gauge,
    /// Shed calls not yet in a log line, and when the last such line was written.
    shed_unlogged: std::sync::atomic::AtomicU64,
    shed_logged: std::sync::Mutex<Option<std::time::Instant>>,
}

/// Most often a line says calls are being shed: one per shed call would make shedding cost a
/// log write each.
const SHED_LOG_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tokenvault");
        let rpc_requests = Family::<RpcLabels, Counter>::default();
        registry.register(
            "rpc_requests",
            "gRPC calls by method and status",
            rpc_requests.clone(),
        );
        let rpc_duration =
            Family::<MethodLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency);
        registry.register_with_unit(
            "rpc_duration",
            "gRPC call latency until the response headers, by method",
            Unit::Seconds,
            rpc_duration.clone(),
        );
        let rsa_unwrap = latency();
        registry.register_with_unit(
            "rsa_unwrap_duration",
            "Data key unwrap latency (the private-key operation: RSA-OAEP, or X-Wing and HPKE for envelope v2)",
            Unit::Seconds,
            rsa_unwrap.clone(),
        );
        let auth_denials = Family::<CodeLabel, Counter>::default();
        registry.register(
            "auth_denials",
            "Refused calls by gRPC status (unauthenticated, role, IP allowlist, rate limit)",
            auth_denials.clone(),
        );
        let denial_bursts = Counter::default();
        registry.register(
            "denial_burst_alerts",
            "Callers refused repeatedly within a minute (possible stolen credential)",
            denial_bursts.clone(),
        );
        let rate_limited = Family::<Outcome, Counter>::default();
        registry.register(
            "rate_limited",
            "Rate-limit refusals by bucket (caller, record)",
            rate_limited.clone(),
        );
        let unauthenticated_refusals = Family::<Outcome, Counter>::default();
        registry.register(
            "unauthenticated_refusals",
            "Requests refused without an authenticated caller, by reason (missing, malformed or invalid credential, unknown certificate, refused or replayed security event, throttled source)",
            unauthenticated_refusals.clone(),
        );
        let connections_closed = Family::<Outcome, Counter>::default();
        registry.register(
            "connections_closed",
            "Connections the daemon closed: idle past idle_timeout_seconds, or the longest idle one at max_connections",
            connections_closed.clone(),
        );
        let shed = Family::<Outcome, Counter>::default();
        registry.register(
            "shed",
            "Requests refused at once under overload: private-key queue full, queue wait over max_queue_wait_ms, the caller gone before its turn, or the commit queue full",
            shed.clone(),
        );
        let refreshes = Family::<Outcome, Counter>::default();
        registry.register(
            "token_refreshes",
            "OAuth refreshes by outcome (refreshed, conflict, invalid_grant, failed)",
            refreshes.clone(),
        );
        let upstream = Family::<UpstreamLabels, Counter>::default();
        registry.register(
            "upstream_responses",
            "Proxy upstream answers by provider and status class, and proxy failures",
            upstream.clone(),
        );
        let webhook_deliveries = Family::<Outcome, Counter>::default();
        registry.register(
            "webhook_deliveries",
            "Webhook delivery attempts by outcome (delivered, failed, gone) and entries dead-lettered (dead)",
            webhook_deliveries.clone(),
        );
        let webhook_lag = Family::<EndpointLabel, Gauge>::default();
        registry.register_with_unit(
            "webhook_lag",
            "Age of each webhook endpoint's oldest undelivered entry at the last delivery pass",
            Unit::Seconds,
            webhook_lag.clone(),
        );
        let rewrap_done = Gauge::default();
        registry.register(
            "rewrap_records_done",
            "Records rewrapped by the running or last rewrap",
            rewrap_done.clone(),
        );
        let rewrap_total = Gauge::default();
        registry.register(
            "rewrap_records_planned",
            "Records under older key versions when the running or last rewrap started",
            rewrap_total.clone(),
        );
        let private_key_stuck = Gauge::default();
        registry.register(
            "private_key_threads_stuck",
            "Private-key threads whose call has run [limits] private_key_stuck_seconds or longer (a hung PKCS#11 token)",
            private_key_stuck.clone(),
        );
        registry.register(
            "build",
            "The running tokenvault's version",
            Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION")),
                (
                    "fips",
                    if crate::keys::FIPS_BUILD {
                        "true"
                    } else {
                        "false"
                    },
                ),
            ]),
        );
        Self {
            registry,
            rpc_requests,
            rpc_duration,
            rsa_unwrap,
            auth_denials,
            denial_bursts,
            rate_limited,
            unauthenticated_refusals,
            connections_closed,
            shed,
            refreshes,
            upstream,
            webhook_deliveries,
            webhook_lag,
            rewrap_done,
            rewrap_total,
            private_key_stuck,
            shed_unlogged: std::sync::atomic::AtomicU64::new(0),
            shed_logged: std::sync::Mutex::new(None),
        }
    }
}

fn label(outcome: &str) -> Outcome {
    Outcome {
        outcome: outcome.to_string(),
    }
}

impl Metrics {
    /// Counts one of `family`'s outcomes.
    pub fn count(family: &Family<Outcome, Counter>, outcome: &str) {
        family.get_or_create(&label(outcome)).inc();
    }

    /// Counts a call shed under overload (`outcome` says why), and says in the log that calls
    /// are being shed: at once for the first, then at most once per [`SHED_LOG_EVERY`] with how
    /// many since the last line. The calls themselves are not logged one by one.
    pub fn shed(&self, outcome: &str) {
        use std::sync::atomic::Ordering;
        Self::count(&self.shed, outcome);
        self.shed_unlogged.fetch_add(1, Ordering::Relaxed);
        // Whoever holds the lock is deciding already; the others only count.
        let Ok(mut last) = self.shed_logged.try_lock() else {
            return;
        };
        let now = std::time::Instant::now();
        if last.is_none_or(|t| now.duration_since(t) >= SHED_LOG_EVERY) {
            let since = last.map_or(0, |t| now.duration_since(t).as_secs());
            *last = Some(now);
            let shed = self.shed_unlogged.swap(0, Ordering::Relaxed);
            tracing::warn!(
                shed,
                since_seconds = since,
                "overloaded: calls shed (refused with RESOURCE_EXHAUSTED, or dropped as their caller had gone) since the last such line; tokenvault_shed_total counts them by why"
            );
        }
    }

    /// Counts an upstream answer or failure.
    pub fn upstream(&self, provider: &str, status: &str) {
        self.upstream
            .get_or_create(&UpstreamLabels {
                provider: provider.to_string(),
                status: status.to_string(),
            })
            .inc();
    }

    /// The counted metrics (none of the sampled ones) as OpenMetrics text.
    #[cfg(test)]
    pub(crate) fn encode_for_test(&self) -> String {
        let mut out = String::new();
        let _ = encode_registry(&mut out, &self.registry);
        out
    }

    /// Encodes every metric as OpenMetrics text, with the sampled ones read from `state` now.
    pub fn encode(&self, state: &Vault) -> String {
        let mut sampled = Registry::with_prefix("tokenvault");
        let cache = state
            .dek_cache
            .as_ref()
            .map(|c| c.stats())
            .unwrap_or_default();
        sampled.register(
            "dek_cache_hits",
            "Data keys served from the DEK cache (0 when the cache is off)",
            ConstCounter::new(cache.hits),
        );
        sampled.register(
            "dek_cache_misses",
            "Data key lookups the DEK cache could not serve",
            ConstCounter::new(cache.misses),
        );
        sampled.register(
            "dek_cache_entries",
            "Data keys held in the DEK cache",
            gauge(cache.entries),
        );
        sampled.register(
            "active_key_version",
            "Version of the active key",
            gauge(u64::from(state.keyring().active().0.version)),
        );
        for (name, value) in state.store.engine_stats() {
            let help = format!("Storage engine figure {name}");
            match name.strip_suffix("_bytes") {
                Some(stem) => sampled.register_with_unit(stem, help, Unit::Bytes, gauge(value)),
                None => sampled.register(name, help, gauge(value)),
            }
        }
        let mut process = Registry::default();
        process::register(&mut process);
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode_registry(&mut out, &self.registry)
            .and_then(|()| encode_registry(&mut out, &sampled))
            .and_then(|()| encode_registry(&mut out, &process))
            .and_then(|()| encode_eof(&mut out));
        out
    }
}

fn gauge(v: u64) -> ConstGauge {
    ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX))
}

/// Field `n` (numbered as in proc(5), from 1) of a `/proc/PID/stat` line, as a number. The
/// command name (field 2) may hold spaces and parentheses, so fields are counted from its
/// closing parenthesis; `n` must be 3 or more.
pub(crate) fn stat_field(stat: &str, n: usize) -> Option<u64> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(n.checked_sub(3)?)?.parse().ok()
}

/// utime + stime (fields 14 and 15) of a `/proc/PID/stat` line, in clock ticks.
pub fn cpu_ticks(stat: &str) -> Option<u64> {
    Some(stat_field(stat, 14)? + stat_field(stat, 15)?)
}

/// The standard `process_*` metrics (names of the Prometheus client libraries' process
/// collector), read from `/proc/self`. Hand-written: prometheus-client has no process
/// collector, and these five values are a few lines of procfs; a value that cannot be read is
/// left out rather than reported as 0.
mod process {
    use prometheus_client::metrics::counter::ConstCounter;
    use prometheus_client::registry::{Registry, Unit};

    use super::{cpu_ticks, stat_field};

    pub(super) fn register(r: &mut Registry) {
        let ticks = rustix::param::clock_ticks_per_second() as f64;
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        if let Some(cpu) = cpu_ticks(&stat) {
            r.register_with_unit(
                "process_cpu",
                "Total user and system CPU time spent",
                Unit::Seconds,
                ConstCounter::new(cpu as f64 / ticks),
            );
        }
        // starttime is field 22 of stat(5).
        let field = |n: usize| stat_field(&stat, n);
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<u64>().ok())
        });
        if let (Some(start), Some(boot)) = (field(22), boot) {
            r.register_with_unit(
                "process_start_time",
                "Start time of the process since the Unix epoch",
                Unit::Seconds,
                super::gauge(boot + start / ticks as u64),
            );
        }
        let page = rustix::param::page_size() as u64;
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
        let mut statm = statm.split_whitespace().map(|v| v.parse::<u64>().ok());
        if let (Some(Some(virt)), Some(Some(rss))) = (statm.next(), statm.next()) {
            r.register_with_unit(
                "process_virtual_memory",
                "Virtual memory size",
                Unit::Bytes,
                super::gauge(virt * page),
            );
            r.register_with_unit(
                "process_resident_memory",
                "Resident memory size",
                Unit::Bytes,
                super::gauge(rss * page),
            );
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            r.register(
                "process_open_fds",
                "Number of open file descriptors",
                super::gauge(dir.count() as u64),
            );
        }
        let max = std::fs::read_to_string("/proc/self/limits")
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix("Max open files")?
                        .split_whitespace()
                        .next()?
                        .parse::<u64>()
                        .ok()
                })
            });
        if let Some(max) = max {
            r.register(
                "process_max_fds",
                "Maximum number of open file descriptors",
                super::gauge(max),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shed_calls_are_counted_one_by_one_and_logged_once_per_period() {
        #[derive(Clone, Default)]
        struct Lines(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
        impl std::io::Write for Lines {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().expect("lock").extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let m = Metrics::default();
        tracing::subscriber::with_default(subscriber, || {
            for _ in 0..1000 {
                m.shed("queue_full");
            }
            m.shed("queue_wait");
        });
        let text = m.encode_for_test();
        assert!(
            text.contains(r#"tokenvault_shed_total{outcome="queue_full"} 1000"#)
                && text.contains(r#"tokenvault_shed_total{outcome="queue_wait"} 1"#),
            "{text}"
        );
        let log = String::from_utf8(lines.0.lock().expect("lock").clone()).expect("utf-8");
        // The first shed call says so at once; the next 1,000 wait for the next line.
        assert_eq!(log.lines().count(), 1, "{log}");
        assert!(
            log.contains("overloaded: calls shed") && log.contains("shed=1 "),
            "{log}"
        );
        assert_eq!(
            m.shed_unlogged.load(std::sync::atomic::Ordering::Relaxed),
            1000
        );
    }
}
