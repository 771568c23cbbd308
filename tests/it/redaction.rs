//! Every type that holds a secret prints without it: the secret newtypes, private keys, the
//! keyring, the audit trail's key holder, and every gRPC message that carries a token, a grant
//! handle or a private key.

use tokenvault::api::v1;
use tokenvault::keys::PrivateKey;
use tokenvault::oauth::TokenBundle;
use tokenvault::secret::{ApiCredential, DataKey, Passphrase, Secret};

#[test]
fn no_secret_type_prints_its_secret() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let pem = std::fs::read_to_string(root.join("keys/test/fixture-a.key.pem")).expect("fixture");
    let key = PrivateKey::from_pem(&pem, None).expect("key");
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    let token = "gho_SECRETSECRETSECRETSECRET";
    let bundle = TokenBundle::parse(&Secret::new(
        format!(r#"{{"access_token":"{token}","refresh_token":"rt_REFRESH","expires_at":1}}"#)
            .into_bytes(),
    ))
    .expect("bundle");
    let oauth = tokenvault::provider::OAuthConfig {
        token_endpoint: "https://auth.example.com/token".parse().expect("uri"),
        client_id: "id".into(),
        client_auth: tokenvault::provider::ClientAuth::ClientSecretPost,
        client_secret_record: tokenvault::record::RecordId::parse("cs").expect("id"),
        refresh_skew_seconds: 0,
        redirect_uris: vec![],
        background: None,
    };
    let refresh_request = tokenvault::oauth::refresh_request(
        &oauth,
        "rt_REFRESH",
        &Secret::new(b"client-SECRET".to_vec()),
    )
    .expect("request");
    let cases: Vec<(String, String)> = vec![
        (
            format!("{:?}", DataKey::from_slice(&[0x5a; 32]).expect("32")),
            hex::encode([0x5a; 8]),
        ),
        (
            format!("{:?}", DataKey::from_slice(&[0x5a; 32]).expect("32")),
            "90, 90".into(),
        ),
        (
            format!("{:?}", Secret::new(token.as_bytes().to_vec())),
            "SECRETSECRET".into(),
        ),
        (
            format!("{:?}", ApiCredential::new(format!("tv_{token}"))),
            "SECRETSECRET".into(),
        ),
        (
            format!("{:?}", Passphrase::new("correct horse battery".into())),
            "horse".into(),
        ),
        (format!("{key:?}"), body[..40].to_string()),
        (format!("{bundle:?}"), "SECRETSECRET".into()),
        (format!("{bundle:?}"), "rt_REFRESH".into()),
        (format!("{refresh_request:?}"), "rt_REFRESH".into()),
        (format!("{refresh_request:?}"), "client-SECRET".into()),
        (
            format!(
                "{:?}",
                v1::GetTokenResponse {
                    info: None,
                    secret: token.as_bytes().to_vec()
                }
            ),
            "SECRETSECRET".into(),
        ),
        (
            format!(
                "{:?}",
                v1::GetTokenResponse {
                    info: None,
                    secret: token.as_bytes().to_vec()
                }
            ),
            format!("{:?}", token.as_bytes()),
        ),
    ];
    // The keyring (holding private keys) and the auditor (holding the audit HMAC key), built
    // as the daemon builds them.
    let tmp = tempfile::tempdir().expect("tempdir");
    let store = std::sync::Arc::new(tokenvault::store::MemoryStore::new());
    let dir = tokenvault::keys::keyring::KeyDir::new(tmp.path(), None);
    tokenvault::rotation::init(&*store, &dir, 1).expect("init");
    let ring = tokenvault::keys::keyring::Keyring::load(
        tokenvault::store::KeyRegistry::keys(&*store).expect("keys"),
        &dir,
    )
    .expect("keyring");
    let ring_pem = std::fs::read_to_string(tmp.path().join("v0001.key.pem")).expect("key file");
    let ring_body: String = ring_pem
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect();
    let auditor = tokenvault::audit::Auditor::open(store.clone(), tmp.path()).expect("auditor");
    let audit_key = std::fs::read(tmp.path().join(tokenvault::audit::AUDIT_KEY_FILE)).expect("key");
    let handle = "tvg_HANDLEHANDLEHANDLEHANDLEHANDLEHANDLEHANDLE";
    let mut cases = cases;
    cases.extend([
        (format!("{ring:?}"), ring_body[..40].to_string()),
        (format!("{auditor:?}"), hex::encode(&audit_key[..8])),
        (format!("{auditor:?}"), format!("{:?}", &audit_key[..4])),
        (
            format!("{:?}", tokenvault::secret::GrantHandle::new(handle.into())),
            "HANDLEHANDLE".into(),
        ),
        (
            format!(
                "{:?}",
                v1::ProxyRequest {
                    grant: handle.into(),
                    id: "r".into(),
                    method: "GET".into(),
                    path: "/user".into(),
                    headers: vec![],
                    body: b"body".to_vec(),
                }
            ),
            "HANDLEHANDLE".into(),
        ),
        (
            format!(
                "{:?}",
                v1::IssueGrantResponse {
                    grant: handle.into(),
                    grant_id: "0".repeat(64),
                    expires_at: 1,
                }
            ),
            "HANDLEHANDLE".into(),
        ),
        (
            format!(
                "{:?}",
                v1::RevokeGrantRequest {
                    grant_id: handle.into(),
                }
            ),
            "HANDLEHANDLE".into(),
        ),
        (
            format!(
                "{:?}",
                v1::RotateKeyRequest {
                    private_key_pem: pem.clone(),
                    public_key_pem: String::new(),
                    token_key_label: String::new(),
                    algorithm: String::new(),
                }
            ),
            body[..40].to_string(),
        ),
        (
            format!(
                "{:?}",
                v1::ExchangeCodeRequest {
                    code: "CODECODE-1".into(),
                    code_verifier: "VERIFIERVERIFIERVERIFIERVERIFIERVERIFIER123".into(),
                    ..Default::default()
                }
            ),
            "CODECODE".into(),
        ),
        (
            format!(
                "{:?}",
                v1::ExchangeCodeRequest {
                    code_verifier: "VERIFIERVERIFIERVERIFIERVERIFIERVERIFIER123".into(),
                    ..Default::default()
                }
            ),
            "VERIFIER".into(),
        ),
        (
            format!(
                "{:?}",
                tokenvault::vault::CodeExchange {
                    meta: tokenvault::record::RecordMeta::parse(
                        "r",
                        "o",
                        "github",
                        tokenvault::record::SecretKind::TokenBundle,
                        &[],
                        0
                    )
                    .expect("meta"),
                    code: Secret::new(b"CODECODE-2".to_vec()),
                    code_verifier: Secret::new(b"VERIFIERVERIFIER".to_vec()),
                    redirect_uri: "https://app.example/cb".into(),
                    expected_version: 0,
                }
            ),
            "CODECODE".into(),
        ),
    ]);
    // What is not secret still shows, so the redaction is not a blanket one.
    let shown = format!(
        "{:?}",
        v1::ProxyRequest {
            grant: handle.into(),
            id: "rec-7".into(),
            method: "GET".into(),
            path: "/user".into(),
            headers: vec![],
            body: vec![],
        }
    );
    assert!(shown.contains("rec-7") && shown.contains("/user") && shown.contains("[REDACTED]"));
    for (debug, secret) in cases {
        assert!(!debug.contains(&secret), "{debug} shows {secret}");
    }
    // The key's Debug identifies it by its public fingerprint only.
    assert!(format!("{key:?}").contains(&key.public_key().id().to_hex()));
}

#[test]
fn the_database_settings_print_without_the_password() {
    let dir = tempfile::tempdir().expect("tempdir");
    let password = "db-PASSWORD-1234567890";
    std::fs::write(dir.path().join("db-password"), format!("{password}\n")).expect("file");
    let path = dir.path().join("tokenvault.toml");
    std::fs::write(
        &path,
        "data_dir = \"d\"\nkey_dir = \"k\"\n[store]\n\
         url = \"postgres://tv@127.0.0.1:5432/vault\"\npassword_file = \"db-password\"\n\
         instance = \"a\"\n",
    )
    .expect("config");
    let config = tokenvault::config::Config::load(
        &path,
        &std::collections::HashMap::<String, String>::new(),
    )
    .expect("loads");
    let tokenvault::config::StoreConfig::Postgres(pg) = &config.store else {
        panic!("a [store] database");
    };
    // The file's newline is not part of the password.
    assert_eq!(
        pg.password.as_ref().map(Passphrase::expose_secret),
        Some(password)
    );
    for printed in [
        format!("{config:?}"),
        format!("{pg:?}"),
        format!("{:?}", pg.connection),
    ] {
        assert!(!printed.contains(password), "{printed}");
    }
    assert!(format!("{pg:?}").contains("[REDACTED]"));
}
