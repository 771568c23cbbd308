//! The latency `Broker.Proxy` adds over calling the same loopback upstream directly.
//!
//! Three sequential measurements against one fake provider on 127.0.0.1 (the test suite's):
//! `direct` (a keep-alive HTTP/1.1 client with the token in hand, what a worker holding the
//! token would do), `through_daemon` (gRPC → auth → RocksDB read → RSA-OAEP unwrap → AES-GCM
//! → upstream call → response) and `through_daemon_dek_cache` (same with the DEK cache on, so
//! no RSA operation). Added latency = through_daemon − direct.
//!
//! `cargo bench --bench proxy`

#[path = "../tests/common/upstream.rs"]
mod upstream;

use std::collections::HashMap;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::{BodyExt as _, Full};
use tokenvault::api::v1;
use tokenvault::config::{Config, CredentialEntry, DekCacheConfig, Role};
use tokenvault::record::{RecordMeta, SecretKind};
use tokenvault::secret::{ApiCredential, Secret};
use tokenvault::server::Daemon;
use tonic::metadata::MetadataValue;

const WORKER: &str = "tv_bench_worker";
const INGEST: &str = "tv_bench_ingest";
const TOKEN: &str = "gho_bench_token_value_0123456789";

type Broker = v1::broker_client::BrokerClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
>;

#[derive(Clone)]
struct Bearer(MetadataValue<tonic::metadata::Ascii>);

impl Bearer {
    fn new(cred: &str) -> Self {
        Self(format!("Bearer {cred}").parse().expect("ascii"))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        r.metadata_mut().insert("authorization", self.0.clone());
        Ok(r)
    }
}

/// Starts a daemon for `provider`, stores the token, returns a worker client.
async fn daemon(dir: &std::path::Path, provider: &upstream::FakeProvider, cache: bool) -> Broker {
    let creds = vec![
        CredentialEntry::for_credential("w", Role::Worker, &ApiCredential::new(WORKER.into())),
        CredentialEntry::for_credential("i", Role::Ingest, &ApiCredential::new(INGEST.into())),
    ];
    let mut config = Config::dev(
        dir,
        "127.0.0.1:0".parse().expect("addr"),
        creds,
        &HashMap::<String, String>::new(),
    )
    .expect("config");
    let providers = dir.join("providers.toml");
    std::fs::write(
        &providers,
        format!(
            "[providers.github]\nbase_url = \"{}/api\"\nallow_plain_http = true\n\
             allowed_networks = [\"127.0.0.0/8\"]\n",
            provider.base()
        ),
    )
    .expect("write");
    config.providers = Config::load_providers(&providers).expect("providers");
    if cache {
        config.dek_cache = Some(DekCacheConfig {
            max_entries: 100,
            ttl_seconds: 3600,
        });
    }
    let daemon = Daemon::open(&config).expect("daemon");
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
    let mut ingest =
        v1::ingest_client::IngestClient::with_interceptor(channel.clone(), Bearer::new(INGEST));
    let pem = ingest
        .public_keys(v1::PublicKeysRequest {})
        .await
        .expect("keys")
        .into_inner()
        .active
        .expect("active")
        .spki_pem;
    let sealer = tokenvault::Sealer::from_pem(&pem).expect("pem");
    let meta =
        RecordMeta::parse("bench", "o", "github", SecretKind::AccessToken, &[], 0).expect("valid");
    let record = sealer
        .seal_record(&meta, &Secret::new(TOKEN.as_bytes().to_vec()))
        .expect("seal");
    ingest
        .put_sealed(v1::PutSealedRequest {
            record: Some(record),
            expected_version: 0,
        })
        .await
        .expect("put");
    v1::broker_client::BrokerClient::with_interceptor(channel, Bearer::new(WORKER))
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let provider = rt.block_on(upstream::FakeProvider::start(TOKEN, "rt"));
    let dirs = [
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    ];
    let uncached = rt.block_on(daemon(dirs[0].path(), &provider, false));
    let cached = rt.block_on(daemon(dirs[1].path(), &provider, true));
    let direct = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let url: http::Uri = format!("{}/api/me", provider.base()).parse().expect("uri");

    let mut group = c.benchmark_group("proxy");
    group.bench_function("direct", |b| {
        b.to_async(&rt).iter(|| {
            let (client, url) = (direct.clone(), url.clone());
            async move {
                let req = http::Request::get(url)
                    .header("authorization", format!("Bearer {TOKEN}"))
                    .body(Full::new(Bytes::new()))
                    .expect("request");
                let resp = client.request(req).await.expect("direct");
                assert_eq!(resp.status(), 200);
                resp.into_body().collect().await.expect("body");
            }
        })
    });
    for (name, client) in [
        ("through_daemon", &uncached),
        ("through_daemon_dek_cache", &cached),
    ] {
        group.bench_function(name, |b| {
            b.to_async(&rt).iter(|| {
                let mut client = client.clone();
                async move {
                    let r = client
                        .proxy(v1::ProxyRequest {
                            id: "bench".into(),
                            method: "GET".into(),
                            path: "/me".into(),
                            headers: vec![],
                            body: vec![],
                            grant: String::new(),
                        })
                        .await
                        .expect("proxy")
                        .into_inner();
                    assert_eq!(r.status, 200);
                }
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
