//! RocksDB store: durable single put, durable batch of 500, point get.
//!
//! `cargo bench --bench store`

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use tokenvault::record::{RecordMeta, SecretKind};
use tokenvault::store::{RecordStore, RecordWrite, RocksStore, TestHooks};

fn write(id: String) -> RecordWrite {
    RecordWrite {
        meta: RecordMeta::parse(&id, "owner-1", "github", SecretKind::AccessToken, &[], 0)
            .expect("valid"),
        envelope: vec![0xA5; 350],
        key_version: 1,
        expected_version: 0,
    }
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = RocksStore::open(dir.path(), 64 << 20).expect("open");
    let mut n = 0u64;
    let mut g = c.benchmark_group("store");
    g.throughput(Throughput::Elements(1));
    g.bench_function("put/synced", |b| {
        b.iter_batched(
            || {
                n += 1;
                write(format!("single-{n}"))
            },
            |w| store.put_records(&[w], 1).expect("put"),
            BatchSize::SmallInput,
        )
    });
    g.throughput(Throughput::Elements(500));
    g.bench_function("put_batch_500/synced", |b| {
        b.iter_batched(
            || {
                (0..500)
                    .map(|_| {
                        n += 1;
                        write(format!("batch-{n}"))
                    })
                    .collect::<Vec<_>>()
            },
            |ws| store.put_records(&ws, 1).expect("batch"),
            BatchSize::SmallInput,
        )
    });
    let id = tokenvault::record::RecordId::parse("single-1").expect("valid");
    g.throughput(Throughput::Elements(1));
    g.bench_function("get", |b| {
        b.iter(|| store.get_record(&id).expect("get").expect("present"))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
