//! Webhook delivery lag: records revoked at a fixed rate through `Admin.Revoke` on an
//! in-process daemon (RocksDB, fsync'd writes), each revocation's `record.revoked` event
//! delivered to a receiver on 127.0.0.1; lag = when the receiver got the event − when the
//! revocation was acknowledged. Prints the rate achieved and the lag's p50 / p99 / max.
//!
//! `cargo bench --bench webhooks [-- RATE SECONDS]` (default 1000 events/s for 10 s)

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokenvault::api::SealRecord as _;
use tokenvault::api::v1;
use tokenvault::config::{Config, CredentialEntry, Role};
use tokenvault::record::{RecordMeta, SecretKind};
use tokenvault::secret::{ApiCredential, Secret};

const ADMIN: &str = "tv_bench_admin";
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;

/// A receiver answering 204 to every POST and noting when each record's event arrived.
async fn receiver(arrivals: Arrivals) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let arrivals = Arc::clone(&arrivals);
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let arrivals = Arc::clone(&arrivals);
                        async move {
                            let body = req.into_body().collect().await.map(|b| b.to_bytes());
                            let at = Instant::now();
                            if let Ok(body) = body
                                && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body)
                                && let Some(id) = v["data"]["record_id"].as_str()
                            {
                                arrivals.lock().expect("lock").insert(id.to_string(), at);
                            }
                            Ok::<_, Infallible>(
                                Response::builder()
                                    .status(204)
                                    .body(Full::new(Bytes::new()))
                                    .expect("response"),
                            )
                        }
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this too, without it: then
    // a one-second smoke run (200 events) that must deliver everything.
    let measuring = std::env::args().any(|a| a == "--bench");
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let (default_rate, default_seconds) = if measuring { (1000, 10) } else { (200, 1) };
    let rate: u64 = args
        .first()
        .and_then(|a| a.parse().ok())
        .unwrap_or(default_rate);
    let seconds: u64 = args
        .get(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(default_seconds);
    let n = usize::try_from(rate * seconds).expect("count");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let arrivals: Arrivals = Arc::default();
        let hook = receiver(Arc::clone(&arrivals)).await;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = common::dev_config(dir.path());
        config.credentials.push(CredentialEntry::for_credential(
            "a",
            Role::Admin,
            &ApiCredential::new(ADMIN.into()),
        ));
        let file = dir.path().join("webhooks.toml");
        std::fs::write(
            &file,
            format!(
                "data_dir = \"data\"\nkey_dir = \"keys\"\n[webhooks]\npoll_ms = 20\n\
                 [webhooks.endpoints.bench]\nurl = \"http://{hook}/in\"\n\
                 allow_loopback_http = true\nsecret_records = [\"hook-secret\"]\n\
                 max_concurrency = 64\n"
            ),
        )
        .expect("write");
        config.webhooks = Config::load(&file, &HashMap::<String, String>::new())
            .expect("config")
            .webhooks;
        let channel = common::serve(&config).await;
        let (mut ingest, sealer) = common::ingest(channel.clone()).await;
        let seal = |id: &str, kind, secret: &[u8]| v1::PutSealedRequest {
            record: Some(
                sealer
                    .seal_record(
                        &RecordMeta::parse(id, "o", "github", kind, &[], 0).expect("meta"),
                        &Secret::new(secret.to_vec()),
                    )
                    .expect("seal"),
            ),
            expected_version: 0,
        };
        let mut items = vec![seal("hook-secret", SecretKind::ClientSecret, SECRET.as_bytes())];
        items.extend((0..n).map(|i| seal(&format!("r{i:07}"), SecretKind::AccessToken, b"token")));
        for chunk in items.chunks(1000) {
            ingest
                .put_sealed_batch(v1::PutSealedBatchRequest {
                    items: chunk.to_vec(),
                })
                .await
                .expect("seed");
        }
        let admin = v1::admin_client::AdminClient::with_interceptor(
            channel,
            common::Bearer::new(ADMIN).expect("credential"),
        );
        // Open loop: one revocation every 1/rate s, each on its own task, at most 256 in flight.
        let acked: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
        let slots = Arc::new(tokio::sync::Semaphore::new(256));
        let start = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1) / u32::try_from(rate).expect("rate"));
        let mut tasks = tokio::task::JoinSet::new();
        for i in 0..n {
            tick.tick().await;
            let permit = Arc::clone(&slots).acquire_owned().await.expect("slot");
            let (mut admin, acked) = (admin.clone(), Arc::clone(&acked));
            tasks.spawn(async move {
                let id = format!("r{i:07}");
                admin
                    .revoke(v1::RevokeRequest { id: id.clone(), ..Default::default()  })
                    .await
                    .expect("revoke");
                acked.lock().expect("lock").insert(id, Instant::now());
                drop(permit);
            });
        }
        while tasks.join_next().await.is_some() {}
        let revoking = start.elapsed();
        let deadline = Instant::now() + Duration::from_secs(120);
        while arrivals.lock().expect("lock").len() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let all = start.elapsed();
        let (acked, arrivals) = (
            acked.lock().expect("lock").clone(),
            arrivals.lock().expect("lock").clone(),
        );
        let mut lags: Vec<Duration> = acked
            .iter()
            .filter_map(|(id, at)| Some(arrivals.get(id)?.saturating_duration_since(*at)))
            .collect();
        lags.sort_unstable();
        #[allow(clippy::cast_precision_loss)]
        let achieved = n as f64 / revoking.as_secs_f64();
        println!(
            "webhooks: {n} revocations at {achieved:.0}/s (asked {rate}/s) over {:.1} s; {} events delivered in {:.1} s; lag p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            revoking.as_secs_f64(),
            lags.len(),
            all.as_secs_f64(),
            percentile(&lags, 0.5).as_secs_f64() * 1e3,
            percentile(&lags, 0.99).as_secs_f64() * 1e3,
            lags.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        );
        assert_eq!(lags.len(), n, "every event delivered");
    });
}
