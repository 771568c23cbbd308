//! Rewrap throughput on all cores: per record one RSA-OAEP private operation (unwrap under the
//! old key), one public operation (wrap under the new key), an AES-GCM check and a share of a
//! durable RocksDB batch write. Compare with `openssl speed -multi 2 rsa2048` (sign/s and
//! verify/s are the raw private and public operation rates).
//!
//! `cargo bench --bench rewrap`

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tokenvault::keys::PrivateKey;
use tokenvault::keys::keyring::{KeyDir, Keyring};
use tokenvault::record::{RecordMeta, SecretKind};
use tokenvault::rotation::{RewrapOptions, rewrap_all};
use tokenvault::secret::Secret;
use tokenvault::store::{RecordWrite, RocksStore, prelude::*};

const RECORDS: usize = 2000;

fn bench(c: &mut Criterion) {
    let keys_dir = tempfile::tempdir().expect("tempdir");
    let kd = KeyDir::new(keys_dir.path(), None);
    let registry = tokenvault::store::MemoryStore::new();
    tokenvault::rotation::init(&registry, &kd, 1).expect("v1");
    let v1 = Keyring::load(registry.keys().expect("keys"), &kd).expect("ring");
    tokenvault::rotation::add_version(&registry, &kd, PrivateKey::generate().expect("gen"), 2)
        .expect("v2");
    let infos = registry.keys().expect("keys");
    let ring = Keyring::load(infos.clone(), &kd).expect("ring");
    assert_eq!(ring.active().0.version, 2);
    let old = v1.active().1.clone();
    let envelopes: Vec<(RecordMeta, Vec<u8>)> = (0..RECORDS)
        .map(|i| {
            let meta = RecordMeta::parse(
                &format!("rec-{i:06}"),
                "o",
                "github",
                SecretKind::AccessToken,
                &[],
                0,
            )
            .expect("valid");
            let env = tokenvault::envelope::seal(
                &meta,
                &Secret::new(b"gho_token_value_xxxxxxxx".to_vec()),
                &old,
            )
            .expect("seal");
            (meta, env)
        })
        .collect();

    let mut g = c.benchmark_group("rewrap");
    g.throughput(Throughput::Elements(RECORDS as u64));
    g.sample_size(10);
    g.bench_function("rocksdb/all_cores", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dir = tempfile::tempdir().expect("tempdir");
                let store = RocksStore::open(dir.path(), 64 << 20).expect("open");
                store.put_keys_unaudited(&infos).expect("registry");
                let writes: Vec<_> = envelopes
                    .iter()
                    .map(|(m, e)| RecordWrite {
                        meta: m.clone(),
                        envelope: e.clone(),
                        key_version: 1,
                        expected_version: 0,
                    })
                    .collect();
                store.put_records(&writes, 1).expect("seed");
                let start = Instant::now();
                let p = rewrap_all(
                    &store,
                    &ring,
                    RewrapOptions::full_speed(),
                    || 3,
                    |_| std::ops::ControlFlow::Continue(()),
                )
                .expect("rewrap");
                total += start.elapsed();
                assert_eq!(p.rewrapped, RECORDS as u64);
            }
            total
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
