//! Every type that holds a secret prints without it: the secret newtypes, private keys, the
//! keyring, the audit trail's key holder, and the gRPC response that carries a token.

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
    for (debug, secret) in cases {
        assert!(!debug.contains(&secret), "{debug} shows {secret}");
    }
    // The key's Debug identifies it by its public fingerprint only.
    assert!(format!("{key:?}").contains(&key.public_key().id().to_hex()));
}
