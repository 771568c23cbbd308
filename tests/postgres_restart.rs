//! Daemons ride out a restart of their database: calls fail with UNAVAILABLE while it is down
//! (never INTERNAL, never a panic), work again once it is back without restarting the daemon,
//! and nothing acknowledged is lost. A binary of its own, since it stops the shared test
//! server.

mod common;

use common::pg;
use common::*;
use tokenvault::api::SealRecord as _;
use tokenvault::api::v1;
use tokenvault::secret::Secret;
use tonic::Code;

#[tokio::test]
async fn a_database_restart_under_load_is_unavailable_then_recovers_losing_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let url = pg::database().await;
    let d = TestDaemon::start_with(pg::config_on(dir.path(), &url, "a")).await;
    d.seed("before", 20).await;
    let sealer = d.sealer().await;

    // Writers and readers keep going through the stop and the start.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for w in 0..4 {
        let (mut ingest, mut broker) = (d.ingest(INGEST).await, d.broker(WORKER).await);
        let (sealer, stop) = (sealer.clone(), std::sync::Arc::clone(&stop));
        load.spawn(async move {
            let (mut acked, mut codes) = (Vec::new(), Vec::new());
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let id = format!("w{w}-{n}");
                n += 1;
                let rec = sealer
                    .seal_record(&meta(&id, "o"), &Secret::new(id.clone().into_bytes()))
                    .expect("seal");
                match ingest
                    .put_sealed(v1::PutSealedRequest {
                        record: Some(rec),
                        expected_version: 0,
                    })
                    .await
                {
                    Ok(_) => acked.push(id),
                    Err(e) => codes.push((e.code(), e.message().to_string())),
                }
                if let Err(e) = broker
                    .get_token(v1::GetTokenRequest {
                        id: "before3".into(),
                    })
                    .await
                {
                    codes.push((e.code(), e.message().to_string()));
                }
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            (acked, codes)
        });
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    tokio::task::spawn_blocking(|| pg::pg_ctl("stop"))
        .await
        .expect("stop");
    // While it is down: UNAVAILABLE, saying why; and health says NOT_SERVING (the daemon
    // probes the database every second), so a load balancer takes the daemon out.
    let e = d.get("before1").await.expect_err("database down");
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains("database"), "{}", e.message());
    use tonic_health::pb::health_check_response::ServingStatus;
    let mut health = HealthWatch::open(d.channel().await).await;
    health.until(ServingStatus::NotServing, 10).await;
    // And over HTTP, for load balancers that check with a GET.
    let (code, _, body) = http_call(d.addr, "GET", "/v1/health", &[], Vec::new()).await;
    assert_eq!(
        (code, body.as_ref()),
        (503, &br#"{"status":"NOT_SERVING"}"#[..])
    );
    tokio::task::spawn_blocking(|| pg::pg_ctl("start"))
        .await
        .expect("start");
    health.until(ServingStatus::Serving, 30).await;
    let (code, _, body) = http_call(d.addr, "GET", "/v1/health", &[], Vec::new()).await;
    assert_eq!(
        (code, body.as_ref()),
        (200, &br#"{"status":"SERVING"}"#[..])
    );
    // The watch would hold the daemon's shutdown for its drain limit.
    drop(health);
    // Back without restarting the daemon (the pool replaces its broken connections).
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while d.get("before1").await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "never recovered");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut acked = Vec::new();
    while let Some(r) = load.join_next().await {
        let (a, codes) = r.expect("join");
        acked.extend(a);
        for (code, message) in codes {
            assert_eq!(
                code,
                Code::Unavailable,
                "only UNAVAILABLE while down: {message}"
            );
        }
    }
    assert!(
        acked.len() > 8,
        "the load ran on both sides of the restart: {}",
        acked.len()
    );
    for id in &acked {
        assert_eq!(
            d.get(id.as_str())
                .await
                .expect("acknowledged, so stored")
                .into_inner()
                .secret,
            id.as_bytes()
        );
    }
    assert_eq!(
        d.get("before19").await.expect("get").into_inner().secret,
        b"secret-19"
    );
    d.stop().await;
}
