//! The optional DEK cache: hits skip the RSA unwrap; every change to a record or the keyring
//! makes cached keys unusable; entries expire.

use crate::common;

use common::*;
use tokenvault::api::SealRecord as _;
use tokenvault::api::v1;
use tokenvault::config::DekCacheConfig;
use tonic::Code;

async fn cache_stats(d: &TestDaemon) -> (u64, u64, u64) {
    let s = d
        .admin(ADMIN)
        .await
        .stats(v1::StatsRequest {})
        .await
        .expect("stats")
        .into_inner();
    (s.dek_cache_hits, s.dek_cache_misses, s.dek_cache_entries)
}

#[tokio::test]
async fn cached_keys_are_used_then_invalidated_and_expire() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.dek_cache = Some(DekCacheConfig {
        max_entries: 100,
        ttl_seconds: 2,
    });
    let store = tokenvault::store::RocksStore::open(&cfg.data_dir, 8 << 20).expect("store");
    let clock = TestClock::new();
    let d = TestDaemon::start_with_clock(cfg, std::sync::Arc::new(store), &clock).await;
    d.seed("r", 3).await;
    for _ in 0..3 {
        assert_eq!(
            d.get("r0").await.expect("get").into_inner().secret,
            b"secret-0"
        );
    }
    assert_eq!(cache_stats(&d).await, (2, 1, 1));

    // Revoke: the key is dropped and the record refused.
    d.revoke("r0").await.expect("revoke");
    assert_eq!(cache_stats(&d).await.2, 0);
    assert_eq!(
        d.get("r0").await.expect_err("revoked").code(),
        Code::FailedPrecondition
    );

    // A replaced record (new version) never uses the old cached key.
    d.get("r1").await.expect("get");
    let sealer = d.sealer().await;
    let rec = sealer
        .seal_record(
            &meta("r1", "o"),
            &tokenvault::secret::Secret::new(b"replaced".to_vec()),
        )
        .expect("seal");
    d.ingest(INGEST)
        .await
        .put_sealed(v1::PutSealedRequest {
            record: Some(rec),
            expected_version: 1,
        })
        .await
        .expect("replace");
    assert_eq!(
        d.get("r1").await.expect("get").into_inner().secret,
        b"replaced"
    );

    // Rotation clears the cache; records still open under the decrypt-only key.
    d.admin(ADMIN)
        .await
        .rotate_key(v1::RotateKeyRequest::default())
        .await
        .expect("rotate");
    assert_eq!(cache_stats(&d).await.2, 0);
    let (hits, misses, _) = cache_stats(&d).await;
    d.get("r2").await.expect("get");
    d.get("r2").await.expect("get");
    assert_eq!(cache_stats(&d).await, (hits + 1, misses + 1, 1));

    // Entries expire after their ttl (the vault's clock moves; nothing sleeps).
    clock.advance(2);
    d.get("r2").await.expect("get");
    assert_eq!(
        cache_stats(&d).await.1,
        misses + 2,
        "expired entry is a miss"
    );

    // Rewrap, retire, destroy: the cache never serves a key the keyring no longer allows.
    d.rewrap().await;
    let mut admin = d.admin(ADMIN).await;
    admin
        .retire_key(v1::RetireKeyRequest { version: 1 })
        .await
        .expect("retire");
    admin
        .destroy_key(v1::DestroyKeyRequest { version: 1 })
        .await
        .expect("destroy");
    assert_eq!(
        d.get("r2").await.expect("get under v2").into_inner().secret,
        b"secret-2"
    );
    clock.advance(7 * 86_400);
    assert_eq!(d.destroy_due().await.len(), 1, "v1 destroyed when due");
    assert_eq!(
        d.get("r2").await.expect("get under v2").into_inner().secret,
        b"secret-2"
    );
    d.stop().await;
}

#[tokio::test]
async fn the_cache_is_off_by_default() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = TestDaemon::start(dir.path()).await;
    d.seed("r", 1).await;
    d.get("r0").await.expect("get");
    d.get("r0").await.expect("get");
    assert_eq!(cache_stats(&d).await, (0, 0, 0));
    d.stop().await;
}

#[test]
fn cache_settings_load_from_the_config_file() {
    use tokenvault::config::{Config, Env};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("t.toml");
    let base = "data_dir = \"d\"\nkey_dir = \"k\"\n";
    std::fs::write(
        &path,
        format!("{base}[dek_cache]\nenabled = true\nmax_entries = 5\nttl_seconds = 9\n"),
    )
    .expect("write");
    let c = Config::load(&path, &Env).expect("loads");
    assert_eq!(
        c.dek_cache,
        Some(DekCacheConfig {
            max_entries: 5,
            ttl_seconds: 9
        })
    );
    std::fs::write(
        &path,
        format!("{base}[dek_cache]\nenabled = false\nmax_entries = 5\n"),
    )
    .expect("write");
    assert_eq!(Config::load(&path, &Env).expect("loads").dek_cache, None);
    std::fs::write(
        &path,
        format!("{base}[dek_cache]\nenabled = true\nttl_seconds = 0\n"),
    )
    .expect("write");
    let e = Config::load(&path, &Env).expect_err("zero ttl").to_string();
    assert_eq!(e, "dek_cache: max_entries and ttl_seconds must be > 0");
}
