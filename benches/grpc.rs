//! `Broker.GetToken` end to end: tonic client → loopback → auth → RocksDB read → RSA-OAEP
//! unwrap (aws-lc-rs) → AES-GCM open → response. Sequential (one request in flight) and with
//! 64 in flight, the latter reported per request.
//!
//! `cargo bench --bench grpc`

mod common;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tokenvault::api::v1;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let config = common::dev_config(dir.path());
    let broker = rt.block_on(common::start(&config, b"gho_bench_token_value"));

    let mut g = c.benchmark_group("grpc");
    g.throughput(Throughput::Elements(1));
    g.bench_function("get_token/sequential", |b| {
        b.to_async(&rt).iter(|| {
            let mut client = broker.clone();
            async move {
                client
                    .get_token(v1::GetTokenRequest { id: "bench".into() })
                    .await
                    .expect("get")
            }
        })
    });
    g.throughput(Throughput::Elements(64));
    g.bench_function("get_token/64_in_flight", |b| {
        b.to_async(&rt).iter(|| {
            let broker = broker.clone();
            async move {
                let tasks: Vec<_> = (0..64)
                    .map(|_| {
                        let mut client = broker.clone();
                        tokio::spawn(async move {
                            client
                                .get_token(v1::GetTokenRequest { id: "bench".into() })
                                .await
                                .expect("get")
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.expect("join");
                }
            }
        })
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
