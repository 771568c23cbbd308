//! Prometheus metrics: what operators need to see the daemon work, on a separate HTTP port.
//!
//! Owns: [`Metrics`] (the registry and every metric), the tower layer that counts and times
//! every gRPC call by method and status, and the `/metrics` HTTP endpoint. Labels are bounded:
//! gRPC methods the daemon does not implement are counted as `unknown`, providers are the
//! configured ones, statuses are gRPC codes. Must never: put a record id, owner, credential or
//! any secret into a label.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::State;

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
    pub(super) fn encode(&self, state: &State) -> String {
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

/// Counts and times every gRPC call, and gives it a request id: the caller's `x-request-id`
/// if it is a plausible id (1-64 of `[A-Za-z0-9._-]`), else a fresh random one. The id is on
/// every log line of the call (span `rpc`) and returned in the `x-request-id` response header.
#[derive(Clone, Debug)]
pub struct MetricsLayer(pub(super) Arc<Metrics>);

impl<S> tower::Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        MetricsService {
            inner,
            metrics: Arc::clone(&self.0),
        }
    }
}

/// The service [`MetricsLayer`] wraps around the gRPC routes.
#[derive(Clone, Debug)]
pub struct MetricsService<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

impl<S, B, R> tower::Service<http::Request<B>> for MetricsService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        use tracing::Instrument as _;
        let method = request.uri().path().to_string();
        let start = Instant::now();
        let request_id = request
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| {
                (1..=64).contains(&v.len())
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            })
            .map_or_else(|| format!("{:016x}", rand::random::<u64>()), str::to_string);
        let span = tracing::info_span!("rpc", request_id = %request_id);
        let future = {
            let _entered = span.enter();
            self.inner.call(request)
        };
        let metrics = Arc::clone(&self.metrics);
        Box::pin(
            async move {
                let mut result = future.await;
                if let Ok(response) = &mut result
                    && let Ok(v) = http::HeaderValue::from_str(&request_id)
                {
                    response.headers_mut().insert("x-request-id", v);
                }
                if let Ok(response) = &result {
                    // Errors are trailers-only responses (status in the headers); a success carries
                    // its status in the trailers, after this point: counted as OK.
                    let code = response
                        .headers()
                        .get("grpc-status")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<i32>().ok())
                        .map_or(tonic::Code::Ok, tonic::Code::from_i32);
                    // Unimplemented methods would let a client create labels at will.
                    let method = if code == tonic::Code::Unimplemented {
                        "unknown".to_string()
                    } else {
                        method
                    };
                    metrics
                        .rpc_requests
                        .get_or_create(&RpcLabels {
                            method: method.clone(),
                            code: format!("{code:?}"),
                        })
                        .inc();
                    metrics
                        .rpc_duration
                        .get_or_create(&MethodLabels { method })
                        .observe(start.elapsed().as_secs_f64());
                }
                result
            }
            .instrument(span),
        )
    }
}

/// Serves `GET /metrics` on `listener` until the daemon stops.
pub(super) async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<State>,
    stop: tokio_util::sync::CancellationToken,
) {
    use http_body_util::Full;
    use hyper_util::rt::TokioIo;
    let mut backoff = std::time::Duration::from_millis(10);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            () = stop.cancelled() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                backoff = std::time::Duration::from_millis(10);
                stream
            }
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning on accept.
                tracing::warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(std::time::Duration::from_secs(1));
                continue;
            }
        };
        let scrape_state = Arc::clone(&state);
        let stop_conn = stop.clone();
        // Tracked: a scrape in progress reads the store, so `serve` waits for it.
        state.tasks.spawn(async move {
            let state = scrape_state;
            let service = hyper::service::service_fn(move |req: http::Request<_>| {
                let state = Arc::clone(&state);
                async move {
                    let response =
                        if req.method() == http::Method::GET && req.uri().path() == "/metrics" {
                            let text =
                                tokio::task::spawn_blocking(move || state.metrics.encode(&state))
                                    .await
                                    .unwrap_or_default();
                            http::Response::builder()
                                .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                                .body(Full::new(bytes::Bytes::from(text)))
                        } else {
                            http::Response::builder().status(404).body(Full::new(
                                bytes::Bytes::from_static(b"not found; try /metrics\n"),
                            ))
                        };
                    Ok::<_, std::convert::Infallible>(response.unwrap_or_default())
                }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            // A scraper keeps its connection open between scrapes: on shutdown it is closed
            // once the response in progress (if any) is sent.
            tokio::select! {
                _ = conn.as_mut() => {}
                () = stop_conn.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}

/// The address a metrics listener is bound to, for the startup message.
pub fn url(addr: SocketAddr) -> String {
    format!("http://{addr}/metrics")
}
