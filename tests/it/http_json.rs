//! The HTTP/JSON routes for web tiers: a real daemon, real HTTP/1.1 on loopback, the same
//! credentials, limits and errors as gRPC.

use crate::common;

use base64::Engine as _;
use common::*;
use tokenvault::api::SealRecord as _;
use tokenvault::api::v1;

struct Reply {
    status: u16,
    json: serde_json::Value,
}

async fn call(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    credential: Option<&str>,
    content_type: Option<&str>,
    body: Vec<u8>,
) -> Reply {
    let mut headers = Vec::new();
    if let Some(c) = credential {
        headers.push(("authorization", format!("Bearer {c}")));
    }
    if let Some(t) = content_type {
        headers.push(("content-type", t.to_string()));
    }
    let (status, content_type, bytes) = http_call(addr, method, path, &headers, body).await;
    assert_eq!(
        content_type.as_deref(),
        Some("application/json"),
        "{method} {path}"
    );
    Reply {
        status,
        json: serde_json::from_slice(&bytes).expect("a JSON body"),
    }
}

async fn post(d: &TestDaemon, path: &str, credential: &str, body: serde_json::Value) -> Reply {
    call(
        d.addr,
        "POST",
        path,
        Some(credential),
        Some("application/json"),
        body.to_string().into_bytes(),
    )
    .await
}

/// A `PutSealedRequest` in proto3 JSON, sealed for the daemon's active key.
async fn sealed(d: &TestDaemon, id: &str, secret: &str, expected: u64) -> serde_json::Value {
    let record = d
        .sealer()
        .await
        .seal_record(
            &meta(id, "o"),
            &tokenvault::secret::Secret::new(secret.as_bytes().to_vec()),
        )
        .expect("seal");
    let m = record.meta.expect("meta");
    serde_json::json!({
        "record": {
            "meta": {
                "id": m.id, "owner": m.owner, "provider": m.provider,
                "kind": "SECRET_KIND_ACCESS_TOKEN", "scopes": m.scopes,
            },
            "envelope": base64::engine::general_purpose::STANDARD.encode(&record.envelope),
        },
        "expectedVersion": expected.to_string(),
    })
}

fn assert_error(r: &Reply, status: u16, code: &str, needle: &str) {
    assert_eq!(r.status, status, "{}", r.json);
    assert_eq!(r.json["code"], code, "{}", r.json);
    let message = r.json["message"].as_str().expect("message");
    assert!(message.contains(needle), "{message:?} lacks {needle:?}");
}

#[tokio::test]
async fn a_web_tier_stores_over_http_json_and_a_worker_reads_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = TestDaemon::start(dir.path()).await;
    let keys = call(d.addr, "GET", "/v1/public-keys", Some(INGEST), None, vec![]).await;
    assert_eq!(keys.status, 200, "{}", keys.json);
    let active = &keys.json["active"];
    assert_eq!(active["state"], "KEY_STATE_ACTIVE");
    assert_eq!(active["version"], 1);
    assert_eq!(
        active["spkiPem"].as_str().expect("pem"),
        d.active_spki_pem().await
    );
    assert!(
        active["createdAt"]
            .as_str()
            .expect("int64 as a string")
            .parse::<i64>()
            .is_ok()
    );

    let r = post(
        &d,
        "/v1/records",
        INGEST,
        sealed(&d, "h1", "token-1", 0).await,
    )
    .await;
    assert_eq!(
        (r.status, r.json["version"].clone()),
        (200, "1".into()),
        "{}",
        r.json
    );
    assert_eq!(
        d.get("h1").await.expect("get").into_inner().secret,
        b"token-1"
    );
    // A new version over the current one.
    let r = post(
        &d,
        "/v1/records",
        INGEST,
        sealed(&d, "h1", "token-2", 1).await,
    )
    .await;
    assert_eq!(r.json["version"], "2", "{}", r.json);
    assert_eq!(
        d.get("h1").await.expect("get").into_inner().secret,
        b"token-2"
    );
    // A stale expected version: 412 ABORTED, the current version as a structured detail
    // (google.rpc.ErrorInfo), and nothing written.
    let r = post(
        &d,
        "/v1/records",
        INGEST,
        sealed(&d, "h1", "token-stale", 1).await,
    )
    .await;
    assert_eq!((r.status, r.json["code"].as_str()), (412, Some("ABORTED")));
    assert_eq!(
        r.json["details"],
        serde_json::json!([{
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": "STALE_VERSION",
            "domain": "tokenvault.v1",
            "metadata": { "current_version": "2", "expected_version": "1" },
        }]),
        "{}",
        r.json
    );
    assert_eq!(
        d.get("h1").await.expect("get").into_inner().secret,
        b"token-2"
    );

    let items = vec![
        sealed(&d, "b1", "s1", 0).await,
        sealed(&d, "b2", "s2", 0).await,
    ];
    let r = post(
        &d,
        "/v1/records:batch",
        INGEST,
        serde_json::json!({ "items": items }),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(r.json["versions"], serde_json::json!(["1", "1"]));
    assert_eq!(d.get("b2").await.expect("get").into_inner().secret, b"s2");
    d.stop().await;
}

#[tokio::test]
async fn bad_http_requests_get_the_grpc_code_and_its_status_and_store_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = config(dir.path());
    config.limits.max_request_bytes = 64 * 1024;
    let d = TestDaemon::start_with(config).await;
    let good = sealed(&d, "x1", "tok", 0).await;
    assert_eq!(
        post(&d, "/v1/records", INGEST, good.clone()).await.status,
        200
    );
    let before = d.stats().await.records;
    // The very same request again (a retry that does not know whether the first landed)
    // answers the stored version; another seal for the same id is a conflict.
    let repeated = post(&d, "/v1/records", INGEST, good.clone()).await;
    assert_eq!(
        (repeated.status, &repeated.json["version"]),
        (200, &"1".into())
    );
    let other_seal = sealed(&d, "x1", "tok", 0).await;

    let body = |v: &serde_json::Value| v.to_string().into_bytes();
    let json = Some("application/json");
    let mut tampered = sealed(&d, "x2", "tok", 0).await;
    tampered["record"]["meta"]["owner"] = "someone-else".into();
    let mut wrong_kind = sealed(&d, "x3", "tok", 0).await;
    wrong_kind["record"]["meta"]["kind"] = "SECRET_KIND_BOGUS".into();
    let mut not_base64 = sealed(&d, "x4", "tok", 0).await;
    not_base64["record"]["envelope"] = "***".into();
    let mut unknown_field = sealed(&d, "x5", "tok", 0).await;
    unknown_field["record"]["extra"] = 1.into();
    let mut bad_id = sealed(&d, "x6", "tok", 0).await;
    bad_id["record"]["meta"]["id"] = "has space".into();
    let batch_dup = serde_json::json!({"items": [sealed(&d, "y1", "a", 0).await, sealed(&d, "y1", "b", 0).await]});
    let batch_bad_item =
        serde_json::json!({"items": [sealed(&d, "z1", "a", 0).await, bad_id.clone()]});
    let mut personal = sealed(&d, "x7", "tok", 0).await;
    personal["expectedVersion"] = "alice@example.com".into();
    // method, path, credential, content type, body; status, code, message part.
    type Case<'a> = (
        (&'a str, &'a str, Option<&'a str>, Option<&'a str>, Vec<u8>),
        (u16, &'a str, &'a str),
    );
    let cases: Vec<Case> = vec![
        (
            ("POST", "/v1/records", None, json, body(&good)),
            (401, "UNAUTHENTICATED", "missing credential"),
        ),
        (
            ("POST", "/v1/records", Some("tv_wrong"), json, body(&good)),
            (401, "UNAUTHENTICATED", "invalid credential"),
        ),
        (
            ("POST", "/v1/records", Some(WORKER), json, body(&good)),
            (403, "PERMISSION_DENIED", "requires role ingest"),
        ),
        (
            ("GET", "/v1/public-keys", Some(ADMIN), None, vec![]),
            (403, "PERMISSION_DENIED", "requires role ingest"),
        ),
        (
            (
                "POST",
                "/v1/records",
                Some(INGEST),
                Some("text/plain"),
                body(&good),
            ),
            (
                400,
                "INVALID_ARGUMENT",
                "content-type must be application/json",
            ),
        ),
        (
            (
                "POST",
                "/v1/records",
                Some(INGEST),
                json,
                b"{not json".to_vec(),
            ),
            (400, "INVALID_ARGUMENT", "invalid JSON"),
        ),
        (
            (
                "POST",
                "/v1/records",
                Some(INGEST),
                json,
                body(&unknown_field),
            ),
            (400, "INVALID_ARGUMENT", "unknown field `extra`"),
        ),
        (
            ("POST", "/v1/records", Some(INGEST), json, body(&wrong_kind)),
            (400, "INVALID_ARGUMENT", "record.meta.kind"),
        ),
        (
            ("POST", "/v1/records", Some(INGEST), json, body(&not_base64)),
            (400, "INVALID_ARGUMENT", "record.envelope"),
        ),
        (
            ("POST", "/v1/records", Some(INGEST), json, body(&bad_id)),
            (400, "INVALID_ARGUMENT", "record metadata"),
        ),
        (
            ("POST", "/v1/records", Some(INGEST), json, b"{}".to_vec()),
            (400, "INVALID_ARGUMENT", "record is required"),
        ),
        (
            ("POST", "/v1/records", Some(INGEST), json, body(&other_seal)),
            (409, "ALREADY_EXISTS", "x1"),
        ),
        (
            (
                "POST",
                "/v1/records",
                Some(INGEST),
                json,
                body(&sealed(&d, "x1", "t", 7).await),
            ),
            (412, "ABORTED", "not the expected 7"),
        ),
        (
            (
                "POST",
                "/v1/records",
                Some(INGEST),
                json,
                vec![b' '; 70 * 1024],
            ),
            (413, "RESOURCE_EXHAUSTED", "max_request_bytes"),
        ),
        (
            (
                "POST",
                "/v1/records:batch",
                Some(INGEST),
                json,
                body(&batch_dup),
            ),
            (400, "INVALID_ARGUMENT", "twice"),
        ),
        (
            (
                "POST",
                "/v1/records:batch",
                Some(INGEST),
                json,
                body(&batch_bad_item),
            ),
            (400, "INVALID_ARGUMENT", "item 1"),
        ),
        (
            (
                "POST",
                "/v1/records:batch",
                Some(INGEST),
                json,
                b"{\"items\": []}".to_vec(),
            ),
            (400, "INVALID_ARGUMENT", "empty"),
        ),
        (
            ("GET", "/v1/records", Some(INGEST), None, vec![]),
            (405, "UNIMPLEMENTED", "does not take that method"),
        ),
        (
            ("GET", "/v1/tokens", Some(INGEST), None, vec![]),
            (404, "NOT_FOUND", "no such route"),
        ),
        (
            ("POST", "/v1/records", Some(INGEST), json, body(&personal)),
            (400, "INVALID_ARGUMENT", "expectedVersion"),
        ),
    ];
    for ((method, path, cred, ctype, payload), (status, code, needle)) in cases {
        let r = call(d.addr, method, path, cred, ctype, payload).await;
        assert_error(&r, status, code, needle);
        // Nothing of the body comes back in a message.
        assert!(
            !r.json["message"]
                .as_str()
                .unwrap_or_default()
                .contains("alice")
        );
    }
    assert_eq!(
        d.stats().await.records,
        before,
        "a refused request stored nothing"
    );
    // The tampered owner is refused when it is read, as over gRPC: Ingest cannot open the
    // envelope, so it stores it; GetToken then refuses to open it.
    let r = post(&d, "/v1/records", INGEST, tampered).await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(
        d.get("x2").await.expect_err("tampered").code(),
        tonic::Code::DataLoss
    );
    d.stop().await;
}

#[tokio::test]
async fn a_refusal_before_the_body_is_read_closes_the_connection_and_says_so() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = TestDaemon::start(tmp.path()).await;
    let body = serde_json::to_vec(&sealed(&d, "c1", "t", 0).await).expect("json");
    // Refused before the body is read: wrong credential, wrong content type.
    for (credential, content_type, status) in [
        ("tv_wrong", "application/json", 401),
        (INGEST, "text/plain", 400),
    ] {
        let (got, headers, _) = http_call_with_headers(
            d.addr,
            "POST",
            "/v1/records",
            &[
                ("authorization", format!("Bearer {credential}")),
                ("content-type", content_type.to_string()),
            ],
            body.clone(),
        )
        .await;
        assert_eq!(got, status);
        assert_eq!(
            headers.get("connection").map(|v| v.as_bytes()),
            Some(&b"close"[..]),
            "{status}"
        );
    }
    // A request whose body was read keeps its connection.
    let (got, headers, _) = http_call_with_headers(
        d.addr,
        "POST",
        "/v1/records",
        &[
            ("authorization", format!("Bearer {INGEST}")),
            ("content-type", "application/json".to_string()),
        ],
        body,
    )
    .await;
    assert_eq!(got, 200);
    assert_eq!(headers.get("connection"), None);
    d.stop().await;
}

#[tokio::test]
async fn a_worker_reads_a_token_over_http_and_every_refusal_has_its_status() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (d, metrics) = TestDaemon::start_with_metrics(config(dir.path())).await;
    d.put(&meta("app/user:42", "o"), b"the-token").await;
    d.put(&meta("gone", "o"), b"s").await;
    d.revoke("gone").await.expect("revoke");
    let addr = d.addr;
    let token = |path: &'static str,
                 credential: Option<&'static str>,
                 ctype: Option<&'static str>,
                 body: &'static [u8]| {
        call(addr, "POST", path, credential, ctype, body.to_vec())
    };
    // The id percent-encoded or not; an empty body or `{}`.
    for (path, ctype, body) in [
        ("/v1/records/app%2Fuser%3A42:token", None, &b""[..]),
        (
            "/v1/records/app/user:42:token",
            Some("application/json"),
            b"{}",
        ),
    ] {
        let (status, headers, bytes) = http_call_with_headers(
            d.addr,
            "POST",
            path,
            &[("authorization", format!("Bearer {WORKER}"))]
                .into_iter()
                .chain(ctype.map(|t| ("content-type", t.to_string())))
                .collect::<Vec<_>>(),
            body.to_vec(),
        )
        .await;
        assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&bytes));
        assert_eq!(headers["cache-control"], "no-store");
        let json: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        let secret = base64::engine::general_purpose::STANDARD
            .decode(json["secret"].as_str().expect("secret"))
            .expect("base64");
        assert_eq!(secret, b"the-token");
        assert_eq!(json["info"]["meta"]["id"], "app/user:42");
        assert_eq!(json["info"]["version"], "1");
    }
    // Refusals: each its gRPC code and HTTP status.
    assert_error(
        &token("/v1/records/app/user:42:token", None, None, b"").await,
        401,
        "UNAUTHENTICATED",
        "credential",
    );
    for cred in [INGEST, ADMIN] {
        assert_error(
            &token("/v1/records/app/user:42:token", Some(cred), None, b"").await,
            403,
            "PERMISSION_DENIED",
            "",
        );
    }
    assert_error(
        &token("/v1/records/nope:token", Some(WORKER), None, b"").await,
        404,
        "NOT_FOUND",
        "",
    );
    assert_error(
        &token("/v1/records/gone:token", Some(WORKER), None, b"").await,
        422,
        "FAILED_PRECONDITION",
        "revoked",
    );
    assert_error(
        &token("/v1/records/bad%20id:token", Some(WORKER), None, b"").await,
        400,
        "INVALID_ARGUMENT",
        "record id",
    );
    assert_error(
        &token("/v1/records/app/user:42:secret", Some(WORKER), None, b"").await,
        404,
        "NOT_FOUND",
        "no such route",
    );
    assert_error(
        &token(
            "/v1/records/app/user:42:token",
            Some(WORKER),
            Some("application/json"),
            br#"{"id": "other"}"#,
        )
        .await,
        400,
        "INVALID_ARGUMENT",
        "unknown field",
    );
    assert_error(
        &token(
            "/v1/records/app/user:42:token",
            Some(WORKER),
            Some("text/plain"),
            b"x",
        )
        .await,
        400,
        "INVALID_ARGUMENT",
        "content-type",
    );
    let r = call(
        d.addr,
        "GET",
        "/v1/records/app/user:42:token",
        Some(WORKER),
        None,
        Vec::new(),
    )
    .await;
    assert_eq!(r.status, 405);
    // Audited as over gRPC: each release, and the refusals of a configured caller.
    let events = d.audit_events(v1::AuditLogRequest::default()).await;
    let released = events
        .iter()
        .filter(|e| e.action == "GetToken" && e.outcome == "ok")
        .count();
    assert_eq!(released, 2, "{events:?}");
    // Metrics name the route, never the record id in its path.
    let (_, _, text) = http_call(metrics, "GET", "/metrics", &[], Vec::new()).await;
    let text = String::from_utf8(text.to_vec()).expect("utf8");
    assert!(
        text.contains(r#"method="/v1/records/{id}:token",code="OK""#),
        "{text}"
    );
    assert!(
        !text.contains("user:42") && !text.contains("user%3A42"),
        "{text}"
    );
    d.stop().await;
}
