//! TLS and mutual TLS on the gRPC listener: certificates made by rcgen, the daemon configured
//! from a TOML file like production, clients over real TLS on loopback.

use crate::common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;

use common::pki::{Pki, ca, leaf, tls_verdict};
use common::process::write;
use common::*;
use tokenvault::api::SealRecord as _;
use tokenvault::api::v1;
use tokenvault::config::{Config, Env};
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// A daemon with TLS and client CA `ca`, configured through a TOML file. The worker
/// `worker-1.internal` authenticates by client certificate only.
async fn tls_daemon(dir: &Path, pki: &Pki, require_client_cert: bool) -> TestDaemon {
    let (cert, key) = leaf(pki, &["localhost"], "tokenvault");
    write(dir, "server.pem", &cert, 0o644);
    write(dir, "server.key", &key, 0o600);
    write(dir, "client-ca.pem", &pki.ca_pem, 0o644);
    let hash = |c: &str| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(c.as_bytes()));
    let toml = format!(
        r#"data_dir = "data"
key_dir = "keys/dev"
[tls]
cert_file = "server.pem"
key_file = "server.key"
client_ca_file = "client-ca.pem"
require_client_cert = {require_client_cert}
[[credentials]]
name = "web-tier"
role = "ingest"
sha256 = "{}"
[[credentials]]
name = "worker-mtls"
role = "worker"
mtls_identity = "worker-1.internal"
"#,
        hash(INGEST)
    );
    write(dir, "tokenvault.toml", &toml, 0o644);
    let mut config = Config::load(&dir.join("tokenvault.toml"), &Env).expect("config");
    config.dev = true; // create the keyring on first start
    TestDaemon::start_with(config).await
}

async fn tls_channel(
    d: &TestDaemon,
    ca_pem: &str,
    client: Option<(String, String)>,
) -> Result<Channel, tonic::transport::Error> {
    common::tls_channel(d.addr, ca_pem, client).await
}

#[tokio::test]
async fn mutual_tls_identifies_workers_and_bearer_still_works_over_tls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = ca("tokenvault test CA");
    let d = tls_daemon(dir.path(), &pki, false).await;

    // The web tier: TLS without a client certificate, bearer credential.
    let channel = tls_channel(&d, &pki.ca_pem, None)
        .await
        .expect("tls connect");
    let mut ingest = v1::ingest_client::IngestClient::new(InterceptedService::new(
        channel.clone(),
        Bearer::new(INGEST),
    ));
    let pem = ingest
        .public_keys(v1::PublicKeysRequest {})
        .await
        .expect("public keys")
        .into_inner()
        .active
        .expect("active")
        .spki_pem;
    let sealer = tokenvault::Sealer::from_pem(&pem).expect("pem");
    let record = sealer
        .seal_record(
            &meta("mtls-rec", "o"),
            &tokenvault::secret::Secret::new(b"tls-secret".to_vec()),
        )
        .expect("seal");
    ingest
        .put_sealed(v1::PutSealedRequest {
            record: Some(record),
            expected_version: 0,
        })
        .await
        .expect("put over TLS");
    // Without a certificate or bearer, the Broker refuses.
    let e = v1::broker_client::BrokerClient::new(channel)
        .get_token(v1::GetTokenRequest {
            id: "mtls-rec".into(),
        })
        .await
        .expect_err("anonymous");
    assert_eq!(e.code(), Code::Unauthenticated);

    // The worker: identified by its client certificate alone.
    let worker = tls_channel(
        &d,
        &pki.ca_pem,
        Some(leaf(&pki, &["worker-1.internal"], "worker-1")),
    )
    .await
    .expect("mtls connect");
    let r = v1::broker_client::BrokerClient::new(worker.clone())
        .get_token(v1::GetTokenRequest {
            id: "mtls-rec".into(),
        })
        .await
        .expect("mTLS worker gets the token")
        .into_inner();
    assert_eq!(r.secret, b"tls-secret");
    // Its role is worker only.
    let e = v1::admin_client::AdminClient::new(worker)
        .stats(v1::StatsRequest {})
        .await
        .expect_err("not admin");
    assert_eq!(e.code(), Code::PermissionDenied);
    assert!(
        e.message()
            .contains("credential 'worker-mtls' has role worker"),
        "{}",
        e.message()
    );

    // A valid certificate for an identity nobody configured is refused.
    let stranger = tls_channel(
        &d,
        &pki.ca_pem,
        Some(leaf(&pki, &["stranger.internal"], "stranger")),
    )
    .await
    .expect("connect");
    let e = v1::broker_client::BrokerClient::new(stranger)
        .get_token(v1::GetTokenRequest {
            id: "mtls-rec".into(),
        })
        .await
        .expect_err("unknown identity");
    assert_eq!(
        (e.code(), e.message()),
        (
            Code::Unauthenticated,
            "client certificate identity is not a configured caller"
        )
    );

    // A certificate naming the right identity but issued by another CA fails the handshake:
    // the daemon refuses it with a TLS alert, while the same identity from the right CA is
    // accepted on the same path.
    let rogue = ca("rogue CA");
    assert_eq!(
        tls_verdict(
            d.addr,
            &pki.ca_pem,
            Some(leaf(&rogue, &["worker-1.internal"], "worker-1")),
            "localhost"
        )
        .await,
        Err(rustls::AlertDescription::UnknownCA)
    );
    assert_eq!(
        tls_verdict(
            d.addr,
            &pki.ca_pem,
            Some(leaf(&pki, &["worker-1.internal"], "worker-1")),
            "localhost"
        )
        .await,
        Ok(())
    );

    // Plaintext HTTP/2 to the TLS port gets nowhere: the daemon answers the HTTP/2 preface
    // with a TLS alert record (or closes), never with HTTP/2 frames.
    {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let mut tcp = tokio::net::TcpStream::connect(d.addr).await.expect("tcp");
        tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            .await
            .expect("write");
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            tcp.read_to_end(&mut answer),
        )
        .await
        .expect("the daemon closes the connection");
        assert!(
            answer.first().is_none_or(|b| *b == 0x15),
            "not a TLS alert: {answer:02x?}"
        );
    }
    d.stop().await;
}

#[tokio::test]
async fn required_client_certificates_and_key_file_permissions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = ca("tokenvault test CA");
    let d = tls_daemon(dir.path(), &pki, true).await;
    // No certificate: refused in the handshake (TLS 1.3's certificate_required), bearer or not.
    assert_eq!(
        tls_verdict(d.addr, &pki.ca_pem, None, "localhost").await,
        Err(rustls::AlertDescription::CertificateRequired)
    );
    let with_cert = tls_channel(
        &d,
        &pki.ca_pem,
        Some(leaf(&pki, &["worker-1.internal"], "w")),
    )
    .await
    .expect("mtls");
    v1::ingest_client::IngestClient::new(InterceptedService::new(with_cert, Bearer::new(INGEST)))
        .public_keys(v1::PublicKeysRequest {})
        .await
        .expect("certificate plus bearer");
    d.stop().await;

    // A TLS key readable by others is refused at start.
    std::fs::set_permissions(
        dir.path().join("server.key"),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");
    let config = Config::load(&dir.path().join("tokenvault.toml"), &Env).expect("config");
    let err = tokenvault::server::Daemon::open(&config).expect_err("insecure key");
    assert!(
        err.to_string().contains("readable by group or others"),
        "{err}"
    );
}

#[test]
fn config_refuses_inconsistent_tls_settings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cases = [
        (
            "[tls]\ncert_file = \"c\"\nkey_file = \"k\"\nrequire_client_cert = true\n",
            "tls.require_client_cert: needs tls.client_ca_file",
        ),
        (
            "[[credentials]]\nname = \"w\"\nrole = \"worker\"\nmtls_identity = \"w.internal\"\n",
            "credentials[0]: mtls_identity needs tls.client_ca_file",
        ),
        (
            "[[credentials]]\nname = \"w\"\nrole = \"worker\"\n",
            "credentials[0]: set exactly one of sha256 or mtls_identity",
        ),
    ];
    for (extra, msg) in cases {
        let path = dir.path().join("t.toml");
        std::fs::write(&path, format!("data_dir = \"d\"\nkey_dir = \"k\"\n{extra}"))
            .expect("write");
        let err = Config::load(&path, &Env).expect_err(msg);
        assert_eq!(err.to_string(), msg);
    }
    // Non-loopback is allowed with TLS.
    let path = dir.path().join("t.toml");
    std::fs::write(&path, "listen = \"0.0.0.0:7000\"\ndata_dir = \"d\"\nkey_dir = \"k\"\n[tls]\ncert_file = \"c\"\nkey_file = \"k\"\n").expect("write");
    assert!(Config::load(&path, &Env).is_ok());
}

/// The HTTP/JSON routes over TLS to a client that offers only `http/1.1` by ALPN (Python's
/// urllib3 and Node's fetch do): the handshake succeeds and the route answers, with the
/// bearer credential as over gRPC.
#[tokio::test]
async fn http_json_over_tls_to_an_http1_only_client() {
    use http_body_util::{BodyExt as _, Empty};
    use rustls::pki_types::pem::PemObject as _;
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = ca("tokenvault test CA");
    let d = tls_daemon(dir.path(), &pki, false).await;
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_slice_iter(pki.ca_pem.as_bytes()) {
        roots.add(c.expect("ca pem")).expect("ca");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let get = |credential: &'static str| {
        let config = config.clone();
        let addr = d.addr;
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("tcp");
            let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
                .connect(
                    rustls::pki_types::ServerName::try_from("localhost").expect("name"),
                    tcp,
                )
                .await
                .expect("an http/1.1-only handshake succeeds");
            assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                    .await
                    .expect("http/1.1");
            tokio::spawn(conn);
            let response = sender
                .send_request(
                    http::Request::get("/v1/public-keys")
                        .header("host", "localhost")
                        .header("authorization", format!("Bearer {credential}"))
                        .body(Empty::<bytes::Bytes>::new())
                        .expect("request"),
                )
                .await
                .expect("response");
            let status = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes();
            let json: serde_json::Value = serde_json::from_slice(&body).expect("json");
            (status, json)
        }
    };
    let (status, json) = get(INGEST).await;
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["active"]["state"], "KEY_STATE_ACTIVE");
    let (status, json) = get("tv_not_a_credential").await;
    assert_eq!(
        (status, json["code"].as_str()),
        (401, Some("UNAUTHENTICATED"))
    );
    d.stop().await;
}
