//! Prometheus metrics: what operators need to see the daemon work.
//!
//! Owns: [`Metrics`] (the registry and every metric); the vault's components count into it and
//! the adapters add theirs (per-RPC counts and latency, authentication refusals). Serving it
//! over HTTP is the server's job. Labels are bounded: gRPC methods the daemon does not
//! implement are counted as `unknown`, providers are the configured ones, statuses are gRPC
//! codes. Must never: put a record id, owner, credential or any secret into a label.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

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

/// Upstream answers by provider and status class.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabels {
    /// Configured provider name.
    pub provider: String,
    /// `2xx`, `4xx`, ..., or the proxy error kind.
    pub status: String,
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
    pub auth_denials: Family<Outcome, Counter>,
    /// Denial-burst alerts raised.
    pub denial_bursts: Counter,
    /// Rate-limit refusals (`caller` or `record` bucket).
    pub rate_limited: Family<Outcome, Counter>,
    /// Token refreshes by outcome.
    pub refreshes: Family<Outcome, Counter>,
    /// Upstream answers (and proxy failures) by provider.
    pub upstream: Family<UpstreamLabels, Counter>,
    /// Records rewrapped, and the total of the running or last rewrap.
    pub rewrap_done: Gauge,
    /// Records the running or last rewrap has to move.
    pub rewrap_total: Gauge,
    dek_cache: Family<Outcome, Gauge>,
    engine: Family<Outcome, Gauge>,
    active_key_version: Gauge,
}

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
        registry.register(
            "rpc_duration_seconds",
            "gRPC call latency until the response headers, by method",
            rpc_duration.clone(),
        );
        let rsa_unwrap = latency();
        registry.register(
            "rsa_unwrap_duration_seconds",
            "RSA-OAEP data key unwrap latency (private-key operation)",
            rsa_unwrap.clone(),
        );
        let auth_denials = Family::<Outcome, Counter>::default();
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
        let dek_cache = Family::<Outcome, Gauge>::default();
        registry.register(
            "dek_cache",
            "DEK cache counters (hits, misses, entries); zero when the cache is off",
            dek_cache.clone(),
        );
        let engine = Family::<Outcome, Gauge>::default();
        registry.register(
            "rocksdb",
            "RocksDB properties (estimated keys, block cache usage and capacity, live SST bytes, memtable bytes)",
            engine.clone(),
        );
        let active_key_version = Gauge::default();
        registry.register(
            "active_key_version",
            "Version of the active key",
            active_key_version.clone(),
        );
        Self {
            registry,
            rpc_requests,
            rpc_duration,
            rsa_unwrap,
            auth_denials,
            denial_bursts,
            rate_limited,
            refreshes,
            upstream,
            rewrap_done,
            rewrap_total,
            dek_cache,
            engine,
            active_key_version,
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

    /// Counts an upstream answer or failure.
    pub fn upstream(&self, provider: &str, status: &str) {
        self.upstream
            .get_or_create(&UpstreamLabels {
                provider: provider.to_string(),
                status: status.to_string(),
            })
            .inc();
    }

    /// Encodes every metric, refreshing the sampled ones from `state` first.
    pub fn encode(&self, state: &Vault) -> String {
        let cache = state
            .dek_cache
            .as_ref()
            .map(|c| c.stats())
            .unwrap_or_default();
        let set = |name: &str, v: u64| {
            self.dek_cache
                .get_or_create(&label(name))
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        set("hits", cache.hits);
        set("misses", cache.misses);
        set("entries", cache.entries);
        for (name, value) in state.store.engine_stats() {
            self.engine
                .get_or_create(&label(&name))
                .set(i64::try_from(value).unwrap_or(i64::MAX));
        }
        self.active_key_version
            .set(i64::from(state.keyring().active().0.version));
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
