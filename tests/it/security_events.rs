//! Admin.SecurityEvent: signed provider security events (RISC / CAEP Security Event Tokens)
//! revoke or delete exactly the affected records, once, and are audited.

use crate::common;

use std::collections::HashMap;

use base64::Engine as _;
use common::{ADMIN, TestDaemon, WORKER, fixture_path};
use serde_json::json;
use tokenvault::api::v1;
use tokenvault::config::Config;
use tokenvault::record::{RecordMeta, SecretKind};
use tokenvault::security_event::{ACCOUNT_PURGED, TOKEN_CLAIMS_CHANGE, TOKENS_REVOKED};
use tonic::Code;

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn der(pem_file: &str) -> Vec<u8> {
    use rustls::pki_types::pem::PemObject as _;
    rustls::pki_types::PrivatePkcs8KeyDer::from_pem_file(fixture_path(pem_file))
        .expect("pkcs8 pem")
        .secret_pkcs8_der()
        .to_vec()
}

/// A compact JWS over `claims`, RS256 with `key` (PKCS#8 PEM fixture).
fn rs256(key: &str, claims: &serde_json::Value) -> String {
    rs256_header(key, &json!({"alg": "RS256", "typ": "secevent+jwt"}), claims)
}

/// Like [`rs256`] with its own JOSE header.
fn rs256_header(key: &str, header: &serde_json::Value, claims: &serde_json::Value) -> String {
    let pair = aws_lc_rs::signature::RsaKeyPair::from_pkcs8(&der(key)).expect("rsa key");
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let mut sig = vec![0; pair.public_modulus_len()];
    pair.sign(
        &aws_lc_rs::signature::RSA_PKCS1_SHA256,
        &aws_lc_rs::rand::SystemRandom::new(),
        input.as_bytes(),
        &mut sig,
    )
    .expect("sign");
    format!("{input}.{}", b64(&sig))
}

fn es256(claims: &serde_json::Value) -> String {
    let pair = aws_lc_rs::signature::EcdsaKeyPair::from_pkcs8(
        &aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        &der("keys/test/fixture-ec.key.pem"),
    )
    .expect("ec key");
    let input = format!(
        "{}.{}",
        b64(br#"{"alg":"ES256"}"#),
        b64(claims.to_string().as_bytes())
    );
    let sig = pair
        .sign(&aws_lc_rs::rand::SystemRandom::new(), input.as_bytes())
        .expect("sign");
    format!("{input}.{}", b64(sig.as_ref()))
}

fn set(iss: &str, jti: &str, event: &str, body: serde_json::Value) -> serde_json::Value {
    json!({
        "iss": iss,
        "aud": "tokenvault",
        "iat": tokenvault::unix_now(),
        "jti": jti,
        "events": { event: body },
    })
}

fn subject(owner: &str) -> serde_json::Value {
    json!({"subject": {"format": "email", "email": owner}})
}

async fn daemon(dir: &std::path::Path) -> TestDaemon {
    daemon_with(dir, "").await
}

/// [`daemon`] with `extra` appended to its configuration file.
async fn daemon_with(dir: &std::path::Path, extra: &str) -> TestDaemon {
    std::fs::copy(
        fixture_path("keys/test/fixture-a.pub.pem"),
        dir.join("idp.pem"),
    )
    .expect("copy");
    std::fs::copy(
        fixture_path("keys/test/fixture-ec.pub.pem"),
        dir.join("ec.pem"),
    )
    .expect("copy");
    std::fs::write(
        dir.join("tokenvault.toml"),
        r#"data_dir = "data"
key_dir = "keys"
[[security_event_issuers]]
issuer = "https://idp.example"
audience = "tokenvault"
provider = "github"
public_key_file = "idp.pem"
[[security_event_issuers]]
issuer = "https://ec.example"
audience = "tokenvault"
provider = "gitlab"
public_key_file = "ec.pem"
max_age_seconds = 60
"#
        .to_string()
            + extra,
    )
    .expect("config");
    TestDaemon::start_with(load_config(dir)).await
}

/// `dir/tokenvault.toml`, as a dev daemon with the test credentials.
fn load_config(dir: &std::path::Path) -> Config {
    let mut c = Config::load(
        &dir.join("tokenvault.toml"),
        &HashMap::<String, String>::new(),
    )
    .expect("config loads");
    c.dev = true;
    c.credentials = common::credentials();
    c
}

async fn put(d: &TestDaemon, id: &str, owner: &str, provider: &str, scopes: &[&str]) {
    let scopes: Vec<String> = scopes.iter().map(|s| s.to_string()).collect();
    let meta =
        RecordMeta::parse(id, owner, provider, SecretKind::AccessToken, &scopes, 0).expect("meta");
    d.put(&meta, format!("secret-{id}").as_bytes()).await;
}

async fn send(
    d: &TestDaemon,
    cred: &str,
    token: String,
) -> Result<v1::SecurityEventResponse, tonic::Status> {
    d.admin(cred)
        .await
        .security_event(v1::SecurityEventRequest { token })
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn security_events_revoke_or_delete_exactly_the_affected_records() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = daemon(tmp.path()).await;
    let alice = "alice@example.com";
    put(&d, "a-gh-1", alice, "github", &["repo"]).await;
    put(&d, "a-gh-2", alice, "github", &["repo", "user"]).await;
    put(&d, "a-gl", alice, "gitlab", &["api"]).await;
    put(&d, "b-gh", "bob@example.com", "github", &["repo"]).await;
    put(
        &d,
        "b-gh-wide",
        "bob@example.com",
        "github",
        &["repo", "admin:org"],
    )
    .await;

    // Token revoked (RS256): alice's github records only.
    let token = rs256(
        "keys/test/fixture-a.key.pem",
        &set("https://idp.example", "e1", TOKENS_REVOKED, subject(alice)),
    );
    let r = send(&d, ADMIN, token.clone()).await.expect("applied");
    assert_eq!(
        (r.event_type.as_str(), r.revoked, r.deleted),
        (TOKENS_REVOKED, 2, 0)
    );
    for id in ["a-gh-1", "a-gh-2"] {
        assert_eq!(
            d.get(id).await.expect_err(id).code(),
            Code::FailedPrecondition
        );
    }
    for id in ["a-gl", "b-gh", "b-gh-wide"] {
        d.get(id).await.expect(id);
    }
    // Replayed: refused, nothing else happens.
    let err = send(&d, ADMIN, token).await.expect_err("replay");
    assert_eq!(err.code(), Code::AlreadyExists);
    assert!(
        err.message().contains("already applied"),
        "{}",
        err.message()
    );

    // Scope withdrawn: bob keeps only "repo"; the record holding more is revoked.
    let mut body = subject("bob@example.com");
    body["claims"] = json!({"scope": "repo"});
    let r = send(
        &d,
        ADMIN,
        rs256(
            "keys/test/fixture-a.key.pem",
            &set("https://idp.example", "e2", TOKEN_CLAIMS_CHANGE, body),
        ),
    )
    .await
    .expect("applied");
    assert_eq!((r.revoked, r.deleted), (1, 0));
    d.get("b-gh").await.expect("still granted");
    assert_eq!(
        d.get("b-gh-wide").await.expect_err("wide").code(),
        Code::FailedPrecondition
    );

    // User unlinked (ES256 issuer for gitlab): deleted.
    let r = send(
        &d,
        ADMIN,
        es256(&set(
            "https://ec.example",
            "e3",
            ACCOUNT_PURGED,
            subject(alice),
        )),
    )
    .await
    .expect("applied");
    assert_eq!((r.revoked, r.deleted), (0, 1));
    assert_eq!(
        d.get("a-gl").await.expect_err("deleted").code(),
        Code::NotFound
    );

    // Refusals change nothing.
    let forged = rs256(
        "keys/test/fixture-b.key.pem",
        &set(
            "https://idp.example",
            "f1",
            ACCOUNT_PURGED,
            subject("bob@example.com"),
        ),
    );
    let stale = {
        let mut c = set(
            "https://idp.example",
            "f2",
            ACCOUNT_PURGED,
            subject("bob@example.com"),
        );
        c["iat"] = json!(tokenvault::unix_now() - 3600);
        rs256("keys/test/fixture-a.key.pem", &c)
    };
    let wrong_aud = {
        let mut c = set(
            "https://idp.example",
            "f3",
            ACCOUNT_PURGED,
            subject("bob@example.com"),
        );
        c["aud"] = json!("someone-else");
        rs256("keys/test/fixture-a.key.pem", &c)
    };
    let unknown_issuer = rs256(
        "keys/test/fixture-a.key.pem",
        &set(
            "https://other.example",
            "f4",
            ACCOUNT_PURGED,
            subject("bob@example.com"),
        ),
    );
    // An ES256 issuer's key does not accept an RS256 token.
    let alg_swap = rs256(
        "keys/test/fixture-a.key.pem",
        &set(
            "https://ec.example",
            "f5",
            ACCOUNT_PURGED,
            subject("bob@example.com"),
        ),
    );
    for (cred, token, code, why) in [
        (
            ADMIN,
            forged,
            Code::PermissionDenied,
            "signature does not verify",
        ),
        (ADMIN, stale, Code::InvalidArgument, "iat is outside"),
        (
            ADMIN,
            wrong_aud,
            Code::InvalidArgument,
            "aud does not contain",
        ),
        (
            ADMIN,
            unknown_issuer,
            Code::PermissionDenied,
            "issuer is not configured",
        ),
        (
            ADMIN,
            alg_swap,
            Code::PermissionDenied,
            "algorithm \"RS256\" refused",
        ),
        (
            ADMIN,
            "not.a.jwt".into(),
            Code::InvalidArgument,
            "not a compact JWS",
        ),
        (
            ADMIN,
            "x".repeat(70_000),
            Code::InvalidArgument,
            "longer than 64 KiB",
        ),
        (
            WORKER,
            "anything".into(),
            Code::PermissionDenied,
            "requires role admin",
        ),
    ] {
        let err = send(&d, cred, token).await.expect_err(why);
        assert_eq!(err.code(), code, "{why}: {}", err.message());
        assert!(err.message().contains(why), "{why}: {}", err.message());
    }
    d.get("b-gh").await.expect("untouched by refused events");

    let events = d.audit_events(v1::AuditLogRequest::default()).await;
    let applied = events
        .iter()
        .filter(|e| e.action == "SecurityEvent" && e.outcome == "ok")
        .count();
    assert_eq!(applied, 3);
    assert!(
        events
            .iter()
            .any(|e| e.action == "Delete" && e.detail.starts_with("security event: account-purged"))
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| e.action == "Revoke" && e.detail.starts_with("security event"))
            .count(),
        3
    );
}

/// A security event whose write fails part-way (here: on the second of three records) changes
/// nothing: no record revoked, no audit event of a revocation, and the event is not marked as
/// applied, so the provider's retry applies it whole.
#[tokio::test]
async fn a_security_event_that_fails_midway_changes_nothing_and_can_be_retried() {
    use common::faulty::FaultyStore;
    let tmp = tempfile::tempdir().expect("tempdir");
    let first = daemon(tmp.path()).await;
    first.stop().await;
    let config = load_config(tmp.path());
    let store = std::sync::Arc::new(FaultyStore::new(std::sync::Arc::new(
        tokenvault::store::MemoryStore::new(),
    )));
    let d = TestDaemon::start_with_store(config, store.clone()).await;
    let alice = "alice@example.com";
    for id in ["s1", "s2", "s3"] {
        put(&d, id, alice, "github", &["repo"]).await;
    }
    let token = rs256(
        "keys/test/fixture-a.key.pem",
        &set(
            "https://idp.example",
            "mid-1",
            TOKENS_REVOKED,
            subject(alice),
        ),
    );
    store.fail_record(Some("s2"));
    let err = send(&d, ADMIN, token.clone()).await.expect_err("injected");
    assert_eq!(err.code(), Code::Internal, "{err:?}");
    store.fail_record(None);
    for id in ["s1", "s2", "s3"] {
        d.get(id)
            .await
            .unwrap_or_else(|e| panic!("{id} changed: {e:?}"));
    }
    let events = d.audit_events(v1::AuditLogRequest::default()).await;
    assert!(
        !events
            .iter()
            .any(|e| e.action == "Revoke" || (e.action == "SecurityEvent" && e.outcome == "ok")),
        "{events:?}"
    );
    // Not marked applied: the retry goes through, whole.
    let r = send(&d, ADMIN, token).await.expect("retried");
    assert_eq!((r.revoked, r.deleted), (3, 0));
    for id in ["s1", "s2", "s3"] {
        assert_eq!(
            d.get(id).await.expect_err(id).code(),
            Code::FailedPrecondition
        );
    }
    d.stop().await;
}

/// One RFC 8935 push: `(status, body)`.
async fn push(d: &TestDaemon, content_type: &str, body: String) -> (u16, serde_json::Value) {
    let (status, _, bytes) = common::http_call(
        d.addr,
        "POST",
        "/v1/security-events",
        &[("content-type", content_type.to_string())],
        body.into_bytes(),
    )
    .await;
    let json = if bytes.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("a JSON body")
    };
    (status, json)
}

#[tokio::test]
async fn security_events_pushed_over_http_are_authorized_by_their_signature() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = daemon(tmp.path()).await;
    let alice = "alice@example.com";
    put(&d, "p-gh", alice, "github", &["repo"]).await;
    put(&d, "p-other", "bob@example.com", "github", &["repo"]).await;
    const SET: &str = "application/secevent+jwt";
    let good = rs256(
        "keys/test/fixture-a.key.pem",
        &set(
            "https://idp.example",
            "push-1",
            TOKENS_REVOKED,
            subject(alice),
        ),
    );
    // Refusals first: each is 400 with the RFC 8935 error code, and changes nothing.
    // One signature character changed (in the middle, so the base64url stays canonical).
    let forged = {
        let at = good.rfind('.').expect("three parts") + 10;
        let mut t = good.clone().into_bytes();
        t[at] = if t[at] == b'A' { b'B' } else { b'A' };
        String::from_utf8(t).expect("ascii")
    };
    let stranger = rs256(
        "keys/test/fixture-b.key.pem",
        &set(
            "https://idp.example",
            "push-2",
            TOKENS_REVOKED,
            subject(alice),
        ),
    );
    let unknown_issuer = rs256(
        "keys/test/fixture-a.key.pem",
        &set(
            "https://other.example",
            "push-3",
            TOKENS_REVOKED,
            subject(alice),
        ),
    );
    let mut wrong_aud = set(
        "https://idp.example",
        "push-4",
        TOKENS_REVOKED,
        subject(alice),
    );
    wrong_aud["aud"] = "someone-else".into();
    let wrong_aud = rs256("keys/test/fixture-a.key.pem", &wrong_aud);
    let cases = [
        (SET, forged, "invalid_key"),
        (SET, stranger, "invalid_key"),
        (SET, unknown_issuer, "invalid_issuer"),
        (SET, wrong_aud, "invalid_audience"),
        (SET, "not.a.jwt".to_string(), "invalid_request"),
        (SET, "x".repeat(70 * 1024), "invalid_request"),
        ("application/json", good.clone(), "invalid_request"),
    ];
    for (content_type, body, err) in cases {
        let (status, json) = push(&d, content_type, body).await;
        assert_eq!((status, json["err"].as_str()), (400, Some(err)), "{json}");
        assert!(json["description"].as_str().is_some_and(|s| !s.is_empty()));
    }
    d.get("p-gh")
        .await
        .expect("untouched by the refused pushes");

    // The provider's push as is, no credential: applied.
    let (status, json) = push(&d, SET, good.clone()).await;
    assert_eq!(status, 202, "{json}");
    assert_eq!(
        d.get("p-gh").await.expect_err("revoked").code(),
        Code::FailedPrecondition
    );
    d.get("p-other")
        .await
        .expect("another owner's record stays");
    // Replayed: refused.
    let (status, json) = push(&d, SET, good).await;
    assert_eq!(
        (status, json["err"].as_str()),
        (400, Some("invalid_request")),
        "{json}"
    );
    assert!(
        json["description"]
            .as_str()
            .unwrap_or_default()
            .contains("already applied")
    );
    // The applied push is audited like the gRPC call, under its own caller name; the refused
    // ones (no credential authorized them) are not written one by one.
    let events = d.audit_events(v1::AuditLogRequest::default()).await;
    let pushes: Vec<(&str, &str)> = events
        .iter()
        .filter(|e| e.caller == "security-event-push")
        .map(|e| (e.action.as_str(), e.outcome.as_str()))
        .collect();
    assert_eq!(
        pushes,
        [("SecurityEvent", "ok"), ("Revoke", "ok")],
        "{events:?}"
    );
    assert!(events.iter().all(|e| e.caller != "-"), "{events:?}");
    d.stop().await;
}

#[tokio::test]
async fn an_address_that_keeps_pushing_refused_events_is_throttled_before_its_body_is_read() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = daemon_with(tmp.path(), "[limits]\nunauthenticated_per_second = 1\nunauthenticated_burst = 3\nrefusal_summary_seconds = 3600\n").await;
    const SET: &str = "application/secevent+jwt";
    for _ in 0..3 {
        let (status, json) = push(&d, SET, "garbage".into()).await;
        assert_eq!(
            (status, json["err"].as_str()),
            (400, Some("invalid_request"))
        );
    }
    // The fourth: 429 with Retry-After, held back for that long (a client that pushes again
    // at once is paced by its own concurrency), and the connection is closed since its body
    // was not read.
    let started = std::time::Instant::now();
    let (status, headers, body) = common::http_call_with_headers(
        d.addr,
        "POST",
        "/v1/security-events",
        &[("content-type", SET.to_string())],
        b"garbage".to_vec(),
    )
    .await;
    assert_eq!(status, 429, "{body:?}");
    assert!(started.elapsed() >= std::time::Duration::from_secs(1));
    assert_eq!(
        headers.get("retry-after").map(|v| v.as_bytes()),
        Some(&b"1"[..])
    );
    assert_eq!(
        headers.get("connection").map(|v| v.as_bytes()),
        Some(&b"close"[..])
    );
    let json: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(json["code"], "RESOURCE_EXHAUSTED");
    // None of it was audited one by one.
    let events = d.audit_events(v1::AuditLogRequest::default()).await;
    assert!(
        events
            .iter()
            .all(|e| e.caller != "security-event-push" && e.caller != "-"),
        "{events:?}"
    );
    d.stop().await;
}

/// A JWK of an RSA public key fixture.
fn rsa_jwk(pub_pem: &str, kid: &str) -> serde_json::Value {
    use rsa::pkcs8::DecodePublicKey as _;
    use rsa::traits::PublicKeyParts as _;
    let pem = std::fs::read_to_string(fixture_path(pub_pem)).expect("pem");
    let key = rsa::RsaPublicKey::from_public_key_pem(&pem).expect("rsa");
    json!({"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256",
           "n": b64(&key.n().to_bytes_be()), "e": b64(&key.e().to_bytes_be())})
}

/// An RS256 SET whose header names `kid`.
fn rs256_kid(key: &str, kid: &str, claims: &serde_json::Value) -> String {
    rs256_header(
        key,
        &json!({"alg": "RS256", "typ": "secevent+jwt", "kid": kid}),
        claims,
    )
}

#[tokio::test]
async fn issuer_keys_come_from_its_jwks_by_kid_refetched_once_on_an_unknown_kid() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let idp = common::upstream::FakeProvider::start("a", "r").await;
    idp.lock().jwks = json!({"keys": [rsa_jwk("keys/test/fixture-a.pub.pem", "k1")]}).to_string();
    std::fs::write(
        tmp.path().join("tokenvault.toml"),
        format!(
            r#"data_dir = "data"
key_dir = "keys"
[[security_event_issuers]]
issuer = "https://jwks.example"
audience = "tokenvault"
provider = "github"
jwks_url = "{}/jwks"
jwks_allow_plain_http = true
jwks_allowed_networks = ["127.0.0.0/8"]
[[security_event_issuers]]
issuer = "https://metadata.example"
audience = "tokenvault"
provider = "github"
jwks_url = "http://169.254.169.254/jwks"
jwks_allow_plain_http = true
"#,
            idp.base()
        ),
    )
    .expect("config");
    let c = load_config(tmp.path());
    // The vault's clock, moved past the refetch interval instead of sleeping.
    let clock = common::TestClock::new();
    let store = tokenvault::vault::open_store(&c).expect("store");
    let d = TestDaemon::start_with_clock(c, store, &clock).await;
    for id in ["j1", "j2", "j3"] {
        put(&d, id, &format!("{id}@example.com"), "github", &["repo"]).await;
    }
    let event =
        |jti: &str, owner: &str| set("https://jwks.example", jti, TOKENS_REVOKED, subject(owner));
    // First use: the set is fetched, k1 verifies.
    let t = rs256_kid(
        "keys/test/fixture-a.key.pem",
        "k1",
        &event("j-1", "j1@example.com"),
    );
    assert_eq!(send(&d, ADMIN, t).await.expect("applied").revoked, 1);
    assert_eq!(idp.hits("/jwks"), 1);
    // A known kid does not fetch again.
    let t = rs256_kid(
        "keys/test/fixture-a.key.pem",
        "k1",
        &event("j-2", "nobody@example.com"),
    );
    send(&d, ADMIN, t).await.expect("applied");
    assert_eq!(idp.hits("/jwks"), 1);
    // The issuer rotates to k2: the unknown kid triggers one refetch (the last fetch being
    // more than the refetch interval ago), and it verifies.
    clock.advance(31);
    idp.lock().jwks = json!({"keys": [rsa_jwk("keys/test/fixture-b.pub.pem", "k2")]}).to_string();
    let t = rs256_kid(
        "keys/test/fixture-b.key.pem",
        "k2",
        &event("j-3", "j2@example.com"),
    );
    assert_eq!(send(&d, ADMIN, t).await.expect("applied").revoked, 1);
    assert_eq!(idp.hits("/jwks"), 2);
    // Made-up kids right after: refused, and no fetch within the refetch interval.
    for kid in ["k9", "k10", "k11"] {
        let t = rs256_kid(
            "keys/test/fixture-b.key.pem",
            kid,
            &event(kid, "j3@example.com"),
        );
        let err = send(&d, ADMIN, t).await.expect_err("unknown kid");
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(
            err.message().contains("kid is not in the issuer's JWKS"),
            "{}",
            err.message()
        );
    }
    assert_eq!(idp.hits("/jwks"), 2);
    // A token signed by the old key under the new kid: the signature fails.
    let t = rs256_kid(
        "keys/test/fixture-a.key.pem",
        "k2",
        &event("j-4", "j3@example.com"),
    );
    assert_eq!(
        send(&d, ADMIN, t).await.expect_err("bad sig").code(),
        Code::PermissionDenied
    );
    d.get("j3").await.expect("untouched");
    // A JWKS on a metadata address is never fetched: the SSRF guard refuses it, the token too.
    let t = rs256_kid(
        "keys/test/fixture-a.key.pem",
        "k1",
        &set(
            "https://metadata.example",
            "m-1",
            TOKENS_REVOKED,
            subject("j3@example.com"),
        ),
    );
    assert_eq!(
        send(&d, ADMIN, t).await.expect_err("no keys").code(),
        Code::PermissionDenied
    );
    d.get("j3").await.expect("untouched");
    d.stop().await;
}

#[tokio::test]
async fn a_jwks_behind_a_private_ca_is_fetched_with_its_ca_file_and_only_with_it() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let pki = common::pki::ca("issuer test CA");
    let (cert, key) = common::pki::leaf(&pki, &["localhost"], "localhost");
    let idp = common::upstream::FakeProvider::start_tls("a", "r", &cert, &key).await;
    idp.lock().jwks = json!({"keys": [rsa_jwk("keys/test/fixture-a.pub.pem", "k1")]}).to_string();
    std::fs::write(tmp.path().join("idp-ca.pem"), &pki.ca_pem).expect("ca");
    let port = idp.addr.port();
    std::fs::write(
        tmp.path().join("tokenvault.toml"),
        format!(
            r#"data_dir = "data"
key_dir = "keys"
[[security_event_issuers]]
issuer = "https://private.example"
audience = "tokenvault"
provider = "github"
jwks_url = "https://localhost:{port}/jwks"
jwks_allowed_networks = ["127.0.0.0/8", "::1/128"]
jwks_ca_file = "idp-ca.pem"
[[security_event_issuers]]
issuer = "https://public-roots.example"
audience = "tokenvault"
provider = "github"
jwks_url = "https://localhost:{port}/jwks"
jwks_allowed_networks = ["127.0.0.0/8", "::1/128"]
"#
        ),
    )
    .expect("config");
    let c = load_config(tmp.path());
    let d = TestDaemon::start_with(c).await;
    put(&d, "p1", "p1@example.com", "github", &["repo"]).await;
    let signed = |issuer: &str, jti: &str| {
        rs256_kid(
            "keys/test/fixture-a.key.pem",
            "k1",
            &set(issuer, jti, TOKENS_REVOKED, subject("p1@example.com")),
        )
    };
    // The issuer trusted through the bundled public roots only: the private CA's certificate
    // is refused, no key is had, the token is refused and changes nothing.
    let err = send(&d, ADMIN, signed("https://public-roots.example", "x-1"))
        .await
        .expect_err("untrusted JWKS host");
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    d.get("p1").await.expect("untouched");
    // With its CA file: fetched over TLS and verified.
    assert_eq!(
        send(&d, ADMIN, signed("https://private.example", "x-2"))
            .await
            .expect("applied")
            .revoked,
        1
    );
    assert_eq!(
        idp.hits("/jwks"),
        1,
        "one fetch, by the issuer with the CA file"
    );
    d.stop().await;
}

/// docs/SECURITY_EVENTS.md's configuration block loads as written, and with its commented
/// options uncommented (the files it names put in place).
#[test]
fn the_documented_issuer_configuration_loads() {
    let doc = std::fs::read_to_string(fixture_path("docs/SECURITY_EVENTS.md")).expect("doc");
    let block: String = doc
        .lines()
        .skip_while(|l| l.trim() != "```toml")
        .skip(1)
        .take_while(|l| l.trim() != "```")
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        block.contains("jwks_ca_file"),
        "the block documents jwks_ca_file"
    );
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::copy(
        fixture_path("keys/test/fixture-a.pub.pem"),
        tmp.path().join("google-set.pem"),
    )
    .expect("key");
    std::fs::write(
        tmp.path().join("issuer-ca.pem"),
        common::pki::ca("doc CA").ca_pem,
    )
    .expect("ca");
    let uncommented: String = block
        .lines()
        .map(|l| l.strip_prefix("# ").unwrap_or(l))
        .map(|l| format!("{l}\n"))
        .collect();
    for text in [block, uncommented] {
        std::fs::write(
            tmp.path().join("t.toml"),
            format!("data_dir = \"d\"\nkey_dir = \"k\"\n{text}"),
        )
        .expect("write");
        let c = Config::load(
            &tmp.path().join("t.toml"),
            &HashMap::<String, String>::new(),
        )
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(c.security_event_issuers.len(), 2);
    }
}

#[test]
fn issuer_key_settings_are_checked_at_load() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let load = |issuer: &str| {
        std::fs::write(
            tmp.path().join("t.toml"),
            format!(
                "data_dir = \"d\"\nkey_dir = \"k\"\n[[security_event_issuers]]\nissuer = \"i\"\naudience = \"a\"\nprovider = \"p\"\n{issuer}"
            ),
        )
        .expect("write");
        Config::load(
            &tmp.path().join("t.toml"),
            &HashMap::<String, String>::new(),
        )
        .expect_err(issuer)
        .to_string()
    };
    std::fs::copy(
        fixture_path("keys/test/fixture-a.pub.pem"),
        tmp.path().join("k.pem"),
    )
    .expect("copy");
    let e = load("public_key_file = \"k.pem\"\njwks_url = \"https://idp.example/jwks\"\n");
    assert!(
        e.contains("set exactly one of public_key_file and jwks_url"),
        "{e}"
    );
    let e = load("");
    assert!(
        e.contains("set exactly one of public_key_file and jwks_url"),
        "{e}"
    );
    let e = load("jwks_url = \"http://idp.example/jwks\"\n");
    assert!(e.contains("jwks_url"), "{e}");
    let e = load(
        "jwks_url = \"https://idp.example/jwks\"\njwks_allowed_networks = [\"10.0.0.0/33\"]\n",
    );
    assert!(e.contains("allowed_networks"), "{e}");
    let e = load("jwks_url = \"https://idp.example/jwks\"\njwks_ca_file = \"missing.pem\"\n");
    assert!(e.contains("jwks_ca_file"), "{e}");
    std::fs::write(tmp.path().join("not-a-ca.pem"), "not PEM").expect("write");
    let e = load("jwks_url = \"https://idp.example/jwks\"\njwks_ca_file = \"not-a-ca.pem\"\n");
    assert!(e.contains("jwks_ca_file"), "{e}");
}
