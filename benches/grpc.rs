//! `Broker.GetToken` end to end: tonic client → loopback → auth → RocksDB read → RSA-OAEP
//! unwrap (aws-lc-rs) → AES-GCM open → response. Sequential (one request in flight) and with
//! 64 in flight, the latter reported per request.
//!
//! `cargo bench --bench grpc`

use std::collections::HashMap;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tokenvault::api::v1;
use tokenvault::config::{Config, CredentialEntry, Role};
use tokenvault::record::{RecordMeta, SecretKind};
use tokenvault::secret::{ApiCredential, Secret};
use tokenvault::server::Daemon;
use tonic::metadata::MetadataValue;

const WORKER: &str = "tv_bench_worker";
const INGEST: &str = "tv_bench_ingest";

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let creds = vec![
        CredentialEntry::for_credential("w", Role::Worker, &ApiCredential::new(WORKER.into())),
        CredentialEntry::for_credential("i", Role::Ingest, &ApiCredential::new(INGEST.into())),
    ];
    let config = Config::dev(
        dir.path(),
        "127.0.0.1:0".parse().expect("addr"),
        creds,
        &HashMap::<String, String>::new(),
    )
    .expect("config");
    let daemon = Daemon::open(&config).expect("daemon");
    let (addr, channel) = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(daemon.serve(listener, std::future::pending()));
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        (addr, channel)
    });
    let auth = |cred: &str| {
        let v: MetadataValue<_> = format!("Bearer {cred}").parse().expect("ascii");
        move |mut r: tonic::Request<()>| {
            r.metadata_mut().insert("authorization", v.clone());
            Ok(r)
        }
    };
    let broker = v1::broker_client::BrokerClient::with_interceptor(channel.clone(), auth(WORKER));
    rt.block_on(async {
        let mut ingest =
            v1::ingest_client::IngestClient::with_interceptor(channel.clone(), auth(INGEST));
        let pem = ingest
            .public_keys(v1::PublicKeysRequest {})
            .await
            .expect("keys")
            .into_inner()
            .active
            .expect("active")
            .spki_pem;
        let sealer = tokenvault::Sealer::from_pem(&pem).expect("pem");
        let meta = RecordMeta::parse("bench", "o", "github", SecretKind::AccessToken, &[], 0)
            .expect("valid");
        let record = sealer
            .seal_record(&meta, &Secret::new(b"gho_bench_token_value".to_vec()))
            .expect("seal");
        ingest
            .put_sealed(v1::PutSealedRequest {
                record: Some(record),
                expected_version: 0,
            })
            .await
            .expect("put");
    });
    let _ = addr;

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
