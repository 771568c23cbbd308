//! Serving metrics: the tower layer that counts and times every gRPC call by method and status,
//! and the `/metrics` HTTP endpoint over the vault's [`Metrics`].
//!
//! Must never: put a record id, owner, credential or any secret into a label.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use crate::vault::Vault;
pub use crate::vault::metrics::{MethodLabels, Metrics, RpcLabels};

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
                    // The HTTP/JSON routes put their code in the extensions.
                    let code = response
                        .extensions()
                        .get::<tonic::Code>()
                        .copied()
                        .unwrap_or_else(|| {
                            response
                                .headers()
                                .get("grpc-status")
                                .and_then(|v| v.to_str().ok())
                                .and_then(|v| v.parse::<i32>().ok())
                                .map_or(tonic::Code::Ok, tonic::Code::from_i32)
                        });
                    // Unimplemented methods and unknown routes would let a client create
                    // labels at will.
                    let unrouted = response
                        .extensions()
                        .get::<super::http_json::Unrouted>()
                        .is_some();
                    // A route whose path holds a value (a record id) names its template.
                    let route = response
                        .extensions()
                        .get::<super::http_json::Route>()
                        .map(|r| r.0.to_string());
                    let method = if code == tonic::Code::Unimplemented || unrouted {
                        "unknown".to_string()
                    } else {
                        route.unwrap_or(method)
                    };
                    metrics
                        .rpc_requests
                        .get_or_create(&RpcLabels {
                            method: method.clone(),
                            code: super::status::code_name(code).to_string(),
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
    state: Arc<Vault>,
    stop: tokio_util::sync::CancellationToken,
    conns: Arc<super::conn::Connections>,
) {
    use http_body_util::Full;
    use hyper_util::rt::TokioIo;
    loop {
        let stream = tokio::select! {
            s = super::tls::accept(&listener, "metrics") => conns.admit(s),
            () = stop.cancelled() => return,
        };
        let scrape_state = Arc::clone(&state);
        let stop_conn = stop.clone();
        // Tracked: a scrape in progress reads the store, so `serve` waits for it.
        state.spawn(async move {
            let state = scrape_state;
            let service = hyper::service::service_fn(move |req: http::Request<_>| {
                let state = Arc::clone(&state);
                async move {
                    let response =
                        if req.method() == http::Method::GET && req.uri().path() == "/metrics" {
                            let text =
                                tokio::task::spawn_blocking(move || state.metrics().encode(&state))
                                    .await
                                    .unwrap_or_default();
                            http::Response::builder()
                                .header(
                                    "content-type",
                                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                                )
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
