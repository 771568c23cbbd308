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

mod common;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::{BodyExt as _, Full};
use tokenvault::api::v1;
use tokenvault::config::{Config, DekCacheConfig};

const TOKEN: &str = "gho_bench_token_value_0123456789";

/// Starts a daemon for `provider`, stores the token, returns a worker client.
async fn daemon(
    dir: &std::path::Path,
    provider: &upstream::FakeProvider,
    cache: bool,
) -> common::Broker {
    let mut config = common::dev_config(dir);
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
    common::start(&config, TOKEN.as_bytes()).await
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
