//! The worker SDKs in clients/: their own test suites run against a real daemon over TLS with
//! a private CA and with mutual TLS, with a fake provider behind `Proxy`.

use crate::common;

use std::path::Path;

use common::pki::{ca, leaf};
use common::process::{root, write};
use common::upstream::FakeProvider;
use common::*;
use tokenvault::api::SealRecord as _;
use tokenvault::api::v1;
use tokenvault::config::{Config, Env};
use tokenvault::record::{RecordMeta, SecretKind};
use tonic::service::interceptor::InterceptedService;

const TOKEN: &str = "sdk-secret-token";

/// A TLS daemon (server certificate for `localhost`, client certificates optional) with the
/// SDK suites' records, a worker identified by bearer credential and one by the client
/// certificate `sdk-worker.internal`; returns the daemon and the CA and client files.
async fn sdk_daemon(dir: &Path, provider: &FakeProvider) -> (TestDaemon, [std::path::PathBuf; 3]) {
    let pki = ca("sdk test CA");
    let (cert, key) = leaf(&pki, &["localhost"], "tokenvault");
    write(dir, "server.pem", &cert, 0o644);
    write(dir, "server.key", &key, 0o600);
    write(dir, "ca.pem", &pki.ca_pem, 0o644);
    let (client_cert, client_key) = leaf(&pki, &["sdk-worker.internal"], "sdk-worker.internal");
    write(dir, "client.pem", &client_cert, 0o644);
    write(dir, "client.key", &client_key, 0o600);
    let hash = |c: &str| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(c.as_bytes()));
    let toml = format!(
        r#"data_dir = "data"
key_dir = "keys"
[tls]
cert_file = "server.pem"
key_file = "server.key"
client_ca_file = "ca.pem"
require_client_cert = false
[[credentials]]
name = "web-tier"
role = "ingest"
sha256 = "{}"
[[credentials]]
name = "worker-1"
role = "worker"
sha256 = "{}"
issue_grants = true
[[credentials]]
name = "sdk-mtls-worker"
role = "worker"
mtls_identity = "sdk-worker.internal"
[[credentials]]
name = "secteam"
role = "admin"
sha256 = "{}"
{}"#,
        hash(INGEST),
        hash(WORKER),
        hash(ADMIN),
        crate::proxy::providers_toml(provider, "")
    );
    write(dir, "tokenvault.toml", &toml, 0o644);
    let mut config = Config::load(&dir.join("tokenvault.toml"), &Env).expect("config");
    config.dev = true;
    let d = TestDaemon::start_with(config).await;
    let channel = tls_channel(d.addr, &pki.ca_pem, None)
        .await
        .expect("connect");
    let (mut ingest, sealer) = ingest_over(channel.clone()).await;
    for id in ["sdk-token", "sdk-revoked"] {
        let meta =
            RecordMeta::parse(id, "o", "github", SecretKind::AccessToken, &[], 0).expect("meta");
        let record = sealer
            .seal_record(&meta, &tokenvault::secret::Secret::new(TOKEN.into()))
            .expect("seal");
        ingest
            .put_sealed(v1::PutSealedRequest {
                record: Some(record),
                expected_version: 0,
            })
            .await
            .expect("put");
    }
    v1::admin_client::AdminClient::new(InterceptedService::new(channel, Bearer::new(ADMIN)))
        .revoke(v1::RevokeRequest {
            id: "sdk-revoked".into(),
            ..Default::default()
        })
        .await
        .expect("revoke");
    (
        d,
        [
            dir.join("ca.pem"),
            dir.join("client.pem"),
            dir.join("client.key"),
        ],
    )
}

/// Runs `program args` in `dir` against the daemon; it must pass with nothing skipped.
fn run_suite(
    d: &TestDaemon,
    files: &[std::path::PathBuf; 3],
    program: &str,
    args: &[&str],
    dir: &Path,
) {
    let target = format!("localhost:{}", d.addr.port());
    process::run_suite(
        program,
        args,
        dir,
        &[
            ("TOKENVAULT_TEST_TARGET", target.as_ref()),
            ("TOKENVAULT_TEST_CA", files[0].as_os_str()),
            ("TOKENVAULT_TEST_CLIENT_CERT", files[1].as_os_str()),
            ("TOKENVAULT_TEST_CLIENT_KEY", files[2].as_os_str()),
            ("TOKENVAULT_WORKER_TOKEN", WORKER.as_ref()),
        ],
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_worker_sdk_passes_its_suite_over_tls_and_mutual_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let provider = FakeProvider::start(TOKEN, "sdk-refresh").await;
    let (d, files) = sdk_daemon(dir.path(), &provider).await;
    let python = std::env::var("TOKENVAULT_TEST_PYTHON")
        .unwrap_or_else(|_| panic!("TOKENVAULT_TEST_PYTHON is not set: run ./scripts/test"));
    let sdk = root().join("clients/python-worker");
    let d = std::sync::Arc::new(d);
    let (d2, files2) = (std::sync::Arc::clone(&d), files.clone());
    tokio::task::spawn_blocking(move || {
        run_suite(
            &d2,
            &files2,
            &python,
            &["-m", "mypy", "--strict", "tokenvault_worker"],
            &sdk,
        );
        run_suite(
            &d2,
            &files2,
            &python,
            &[
                "-m",
                "pytest",
                "-q",
                "-rs",
                "-p",
                "no:cacheprovider",
                "tests",
            ],
            &sdk,
        );
    })
    .await
    .expect("python suites");
    // The refusals the suite provoked reached the daemon as such.
    assert!(provider.lock().hits.values().sum::<u32>() >= 2);
    std::sync::Arc::try_unwrap(d)
        .unwrap_or_else(|_| panic!("daemon still shared"))
        .stop()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_worker_sdk_passes_its_suite_over_tls_and_mutual_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let provider = FakeProvider::start(TOKEN, "sdk-refresh").await;
    let (d, files) = sdk_daemon(dir.path(), &provider).await;
    let sdk = root().join("clients/node-worker");
    let d = std::sync::Arc::new(d);
    let d2 = std::sync::Arc::clone(&d);
    tokio::task::spawn_blocking(move || {
        // The dependencies pinned in package-lock.json, the declarations checked by
        // TypeScript, then the suite.
        run_suite(
            &d2,
            &files,
            "npm",
            &["ci", "--no-audit", "--no-fund", "--loglevel=error"],
            &sdk,
        );
        run_suite(
            &d2,
            &files,
            "node",
            &["node_modules/typescript/bin/tsc", "--noEmit", "-p", "."],
            &sdk,
        );
        run_suite(
            &d2,
            &files,
            "node",
            &["--test", "test/worker.test.js"],
            &sdk,
        );
    })
    .await
    .expect("node suites");
    std::sync::Arc::try_unwrap(d)
        .unwrap_or_else(|_| panic!("daemon still shared"))
        .stop()
        .await;
}
