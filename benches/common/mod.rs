//! Shared by the gRPC-level benches: an in-process daemon on loopback with one token stored,
//! and a worker client for it.
#![allow(dead_code, reason = "each bench uses a different part")]

use std::collections::HashMap;

use tokenvault::api::SealRecord as _;
use tokenvault::api::v1;
use tokenvault::config::{Config, CredentialEntry, Role};
use tokenvault::record::{RecordMeta, SecretKind};
use tokenvault::secret::{ApiCredential, Secret};
use tokenvault::server::Daemon;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

pub const WORKER: &str = "tv_bench_worker";
pub const INGEST: &str = "tv_bench_ingest";

/// A worker client.
pub type Broker = v1::broker_client::BrokerClient<InterceptedService<Channel, Bearer>>;

pub use tokenvault::client::Bearer;

/// The dev profile in `dir` with a worker and an ingest credential.
pub fn dev_config(dir: &std::path::Path) -> Config {
    let creds = vec![
        CredentialEntry::for_credential("w", Role::Worker, &ApiCredential::new(WORKER.into())),
        CredentialEntry::for_credential("i", Role::Ingest, &ApiCredential::new(INGEST.into())),
    ];
    Config::dev(
        dir,
        "127.0.0.1:0".parse().expect("addr"),
        creds,
        &HashMap::<String, String>::new(),
    )
    .expect("config")
}

/// Serves `config` on loopback; returns a channel to it.
pub async fn serve(config: &Config) -> Channel {
    let daemon = Daemon::open(config).expect("daemon");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(daemon.serve(listener, std::future::pending()));
    Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect")
}

/// An ingest client on `channel`, and a sealer for the daemon's active key.
pub async fn ingest(channel: Channel) -> (Ingest, tokenvault::Sealer) {
    let mut ingest = v1::ingest_client::IngestClient::with_interceptor(
        channel,
        Bearer::new(INGEST).expect("credential"),
    );
    let pem = ingest
        .public_keys(v1::PublicKeysRequest {})
        .await
        .expect("keys")
        .into_inner()
        .active
        .expect("active")
        .spki_pem;
    (ingest, tokenvault::Sealer::from_pem(&pem).expect("pem"))
}

/// An ingest client.
pub type Ingest = v1::ingest_client::IngestClient<InterceptedService<Channel, Bearer>>;

/// Serves `config` on loopback, stores `token` as access-token record `bench` of provider
/// `github`, and returns a worker client.
pub async fn start(config: &Config, token: &[u8]) -> Broker {
    let channel = serve(config).await;
    let (mut ingest, sealer) = ingest(channel.clone()).await;
    let meta =
        RecordMeta::parse("bench", "o", "github", SecretKind::AccessToken, &[], 0).expect("valid");
    let record = sealer
        .seal_record(&meta, &Secret::new(token.to_vec()))
        .expect("seal");
    ingest
        .put_sealed(v1::PutSealedRequest {
            record: Some(record),
            expected_version: 0,
        })
        .await
        .expect("put");
    v1::broker_client::BrokerClient::with_interceptor(
        channel,
        Bearer::new(WORKER).expect("credential"),
    )
}
