//! Seal (aws-lc-rs and pure-Rust backends side by side) and open, per token: envelope v1 (RSA-2048)
//! and v2 (HPKE with X-Wing).
//!
//! `cargo bench --bench envelope`

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tokenvault::keys::PrivateKey;
use tokenvault::record::{RecordMeta, SecretKind};
use tokenvault::sealer::{Backend, Sealer};
use tokenvault::secret::Secret;

fn fixture_key(name: &str) -> PrivateKey {
    let pem = std::fs::read_to_string(format!(
        "{}/keys/test/{name}.key.pem",
        env!("CARGO_MANIFEST_DIR")
    ))
    .expect("fixture key");
    PrivateKey::from_pem(&pem, None).expect("parses")
}

fn bench(c: &mut Criterion) {
    let key = fixture_key("fixture-a");
    let pq = fixture_key("fixture-xwing");
    let meta = RecordMeta::parse(
        "github:user-42",
        "user-42",
        "github",
        SecretKind::AccessToken,
        &[],
        0,
    )
    .expect("valid");
    let secret = Secret::new(b"gho_16C7e42F292c6912E7710c838347Ae178B4a".to_vec());
    let mut g = c.benchmark_group("envelope");
    g.throughput(Throughput::Elements(1));
    for (name, backend) in [
        ("seal/aws-lc", Backend::Default),
        ("seal/rust-crypto", Backend::RustCrypto),
    ] {
        let sealer = Sealer::new(key.public_key().clone()).with_backend(backend);
        g.bench_function(name, |b| {
            b.iter(|| sealer.seal(&meta, &secret).expect("seal"))
        });
    }
    let env = Sealer::new(key.public_key().clone())
        .seal(&meta, &secret)
        .expect("seal");
    g.bench_function("open/aws-lc", |b| {
        b.iter(|| tokenvault::envelope::open(&meta, &env, &key).expect("open"))
    });
    let sealer = Sealer::new(pq.public_key().clone());
    g.bench_function("seal/x-wing", |b| {
        b.iter(|| sealer.seal(&meta, &secret).expect("seal"))
    });
    let env = sealer.seal(&meta, &secret).expect("seal");
    g.bench_function("open/x-wing", |b| {
        b.iter(|| tokenvault::envelope::open(&meta, &env, &pq).expect("open"))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
