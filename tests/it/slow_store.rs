//! A store whose every write takes 200 ms (a slow or distant database) stalls only what must
//! wait for a write. Health checks and refusals of callers without a credential never touch
//! the store, so they answer at once; nothing the daemon runs on its async executor waits for
//! the store. A `GetToken` answered from the DEK cache still waits for its own audit event to
//! be written (the event is durable before the token leaves, by design): at most the write in
//! flight when it arrived and the one that carries its event, never a queue of writes. A store
//! whose reads are awaited (PostgreSQL's) has them counted against `[limits] max_queued`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::common;

use common::faulty::{Awaited, FaultyStore};
use common::*;
use tokenvault::api::SealRecord as _;
use tokenvault::api::v1;
use tokenvault::config::DekCacheConfig;
use tonic::Code;

const DELAY: Duration = Duration::from_millis(200);

/// A daemon of `cfg` with the DEK cache on, over a [`FaultyStore`] on a `MemoryStore`, with
/// records r0 and r1 stored and r0's data key cached.
async fn cached(mut cfg: tokenvault::config::Config) -> (TestDaemon, Arc<FaultyStore>) {
    cfg.dek_cache = Some(DekCacheConfig {
        max_entries: 100,
        ttl_seconds: 3600,
    });
    let store = Arc::new(FaultyStore::new(Arc::new(
        tokenvault::store::MemoryStore::new(),
    )));
    let d = TestDaemon::start_with_store(cfg, store.clone()).await;
    d.seed("r", 2).await;
    d.get("r0")
        .await
        .expect("a first GetToken fills the DEK cache");
    (d, store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_store_delays_only_the_calls_that_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (d, store) = cached(config(dir.path())).await;

    store.delay_writes(DELAY);
    // Four writers keep the store's write path busy throughout.
    let stop = Arc::new(AtomicBool::new(false));
    let sealer = d.sealer().await;
    let mut writers = tokio::task::JoinSet::new();
    for w in 0..4 {
        let (mut ingest, sealer, stop) = (d.ingest(INGEST).await, sealer.clone(), stop.clone());
        writers.spawn(async move {
            let mut stored = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("w{w}-{stored}");
                let record = sealer
                    .seal_record(
                        &meta(&id, "o"),
                        &tokenvault::secret::Secret::new(b"s".to_vec()),
                    )
                    .expect("seal");
                ingest
                    .put_sealed(v1::PutSealedRequest {
                        record: Some(record),
                        expected_version: 0,
                    })
                    .await
                    .expect("a write is slow, not refused");
                stored += 1;
            }
            stored
        });
    }
    store.a_write_is_delayed().await;

    let mut health = tonic_health::pb::health_client::HealthClient::new(d.channel().await);
    let mut anonymous = v1::broker_client::BrokerClient::new(d.channel().await);
    let (mut health_ms, mut refused_ms) = (Vec::new(), Vec::new());
    for _ in 0..10 {
        let t = Instant::now();
        let status = health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .expect("health")
            .into_inner()
            .status;
        health_ms.push(t.elapsed());
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
        let t = Instant::now();
        let e = anonymous
            .get_token(v1::GetTokenRequest { id: "r0".into() })
            .await
            .expect_err("no credential");
        refused_ms.push(t.elapsed());
        assert_eq!(e.code(), Code::Unauthenticated);
    }
    let t = Instant::now();
    let got = d.get("r0").await.expect("a cached GetToken is served");
    let cached = t.elapsed();
    assert_eq!(got.into_inner().secret, b"secret-0");
    stop.store(true, Ordering::Relaxed);
    while let Some(stored) = writers.join_next().await {
        assert!(stored.expect("writer") > 0, "every writer stored something");
    }
    store.delay_writes(Duration::ZERO);
    d.stop().await;

    // Neither waited for a write: each well under one delayed write, most under 50 ms (the
    // bound is loose for a machine that runs other tests meanwhile).
    for (what, times) in [("health", &mut health_ms), ("refusal", &mut refused_ms)] {
        times.sort();
        assert!(
            times.iter().all(|t| *t < DELAY / 2)
                && times[times.len() / 2] < Duration::from_millis(50),
            "{what} took {times:?} while every write took {DELAY:?}"
        );
    }
    println!("health {health_ms:?}; refusals {refused_ms:?}; cached GetToken {cached:?}");
    // Its own audit write (the event is durable before the token leaves, so it cannot be
    // faster than one write), and at most the write in flight before it: a change waiting
    // for the order takes the queued reads into its own write.
    assert!(
        cached >= DELAY,
        "a cached GetToken answered in {cached:?}, before its audit event could be written"
    );
    assert!(
        cached < DELAY * 3,
        "a cached GetToken took {cached:?} while every write took {DELAY:?}"
    );
}

/// A `GetToken` of `id` by the worker, on a task of its own.
async fn get_in_a_task(
    d: &TestDaemon,
    id: &str,
) -> tokio::task::JoinHandle<Result<tonic::Response<v1::GetTokenResponse>, tonic::Status>> {
    let mut broker = d.broker(WORKER).await;
    let id = id.to_string();
    tokio::spawn(async move { broker.get_token(v1::GetTokenRequest { id }).await })
}

/// A record read awaited on the executor (as on PostgreSQL, for a call whose data key is
/// cached) counts against `[limits] max_queued`: past it, a call reads on the store pool and is
/// answered while the awaited read still waits. A call whose key is not cached never awaits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_awaited_on_the_executor_are_bounded_by_max_queued() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.limits.max_queued = 1;
    let (d, store) = cached(cfg).await;

    store.awaited_reads(Awaited::Held);
    let first = get_in_a_task(&d, "r0").await;
    store.an_awaited_read_is_held().await;
    // Bounded waits, so that a call held by mistake fails the test instead of hanging it.
    let answered = |id: &'static str| {
        let d = &d;
        async move {
            tokio::time::timeout(Duration::from_secs(20), d.get(id))
                .await
                .expect("answered while the awaited read is held")
        }
    };
    let second = answered("r0")
        .await
        .expect("past the bound: the store pool");
    assert_eq!(second.into_inner().secret, b"secret-0");
    let uncached = answered("r1").await.expect("no cached key: the store pool");
    assert_eq!(uncached.into_inner().secret, b"secret-1");
    assert!(!first.is_finished(), "the awaited read is still held");

    store.awaited_reads(Awaited::Answered);
    let first = first.await.expect("task").expect("answered once let go");
    assert_eq!(first.into_inner().secret, b"secret-0");
    // Its place was given back: the next call awaits its read again (and is answered at once).
    store.awaited_reads(Awaited::Held);
    let third = get_in_a_task(&d, "r0").await;
    tokio::time::timeout(Duration::from_secs(20), store.an_awaited_read_is_held())
        .await
        .expect("the next call awaits its read");
    store.awaited_reads(Awaited::Answered);
    third.await.expect("task").expect("answered");
    d.stop().await;
}
