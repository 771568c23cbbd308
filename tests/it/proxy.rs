//! Broker.Proxy and token refresh against real HTTP servers on 127.0.0.1: an API that checks
//! the bearer token and an OAuth token endpoint with rotating, single-use refresh tokens.

use crate::common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::upstream::{CLIENT_SECRET, FakeProvider};
use common::{ADMIN, INGEST, TestDaemon, WORKER};
use tokenvault::api::SealRecord as _;
use tokenvault::api::v1;
use tokenvault::config::Config;
use tokenvault::record::{RecordMeta, SecretKind};
use tonic::Code;

pub(crate) const ACCESS: &str = "at-0-initial-access-token";
pub(crate) const REFRESH: &str = "rt-0-initial-refresh-token";

/// The `[providers]` tables for the fake provider, plus extra TOML.
pub(crate) fn providers_toml(p: &FakeProvider, extra: &str) -> String {
    let base = p.base();
    format!(
        r#"
[providers.github]
base_url = "{base}/api"
allow_plain_http = true
allowed_networks = ["127.0.0.0/8"]
allowed_methods = ["GET", "POST"]
timeout_ms = 1500
max_request_bytes = 4096
max_response_bytes = 1048576
max_retry_after_seconds = 2

[providers.github.oauth]
token_endpoint = "{base}/oauth/token"
client_id = "tv-client"
client_auth = "client_secret_basic"
client_secret_record = "github-client-secret"
refresh_skew_seconds = 60

[providers.narrow]
base_url = "{base}/api"
allow_plain_http = true
allowed_networks = ["127.0.0.0/8"]
allowed_path_prefixes = ["/me"]

[providers.iplit]
base_url = "{base}/api"
allow_plain_http = true

[providers.userinfo]
base_url = "http://user:pw@{addr}/api"
allow_plain_http = true
allowed_networks = ["127.0.0.0/8"]

[providers.localname]
base_url = "http://localhost:{port}/api"
allow_plain_http = true

[providers.metadata]
base_url = "http://169.254.169.254/latest"
allow_plain_http = true

[providers.ula]
base_url = "https://[fd00::1]/"

[providers.zoned]
base_url = "http://[fe80::1%25lo]/"
allow_plain_http = true

[providers.plainhttp]
base_url = "http://api.github.invalid/"
{extra}"#,
        addr = p.addr,
        port = p.addr.port(),
    )
}

fn write_config(dir: &Path, providers: &str) -> std::path::PathBuf {
    let path = dir.join("tokenvault.toml");
    std::fs::write(
        &path,
        format!("data_dir = \"data\"\nkey_dir = \"keys\"\n{providers}"),
    )
    .expect("write config");
    path
}

pub(crate) fn load(dir: &Path, providers: &str) -> Config {
    let path = write_config(dir, providers);
    let mut c = Config::load(&path, &HashMap::<String, String>::new()).expect("config loads");
    c.dev = true;
    c.credentials = common::credentials();
    c
}

pub(crate) fn meta(id: &str, provider: &str, kind: SecretKind, expires_at: i64) -> RecordMeta {
    RecordMeta::parse(id, "alice", provider, kind, &["repo".into()], expires_at).expect("meta")
}

pub(crate) fn bundle(access: &str, refresh: &str, expires_at: i64) -> Vec<u8> {
    format!(
        r#"{{"access_token":"{access}","refresh_token":"{refresh}","expires_at":{expires_at},"token_type":"Bearer"}}"#
    )
    .into_bytes()
}

pub(crate) struct Setup {
    pub(crate) tmp: tempfile::TempDir,
    pub(crate) provider: FakeProvider,
    pub(crate) daemon: TestDaemon,
    /// The providers part of the config file.
    pub(crate) providers: String,
    /// The vault's clock, when the test moves time.
    clock: Option<common::TestClock>,
}

async fn setup() -> Setup {
    setup_with(|_| String::new()).await
}

/// A fake provider, and a daemon configured for it plus `extra(provider)` TOML, holding the
/// OAuth client secret.
pub(crate) async fn setup_with(extra: impl Fn(&FakeProvider) -> String) -> Setup {
    let tmp = tempfile::tempdir().expect("tempdir");
    let provider = FakeProvider::start(ACCESS, REFRESH).await;
    let providers = providers_toml(&provider, &extra(&provider));
    let daemon = TestDaemon::start_with(load(tmp.path(), &providers)).await;
    put_client_secret(&daemon).await;
    Setup {
        tmp,
        provider,
        daemon,
        providers,
        clock: None,
    }
}

async fn put_client_secret(d: &TestDaemon) {
    let m = meta(
        "github-client-secret",
        "github",
        SecretKind::ClientSecret,
        0,
    );
    d.put(&m, CLIENT_SECRET.as_bytes()).await;
}

/// Stores an access token record.
pub(crate) async fn put_token(d: &TestDaemon, id: &str, provider: &str, token: &[u8]) {
    d.put(&meta(id, provider, SecretKind::AccessToken, 0), token)
        .await;
}

/// Stores a token bundle record.
pub(crate) async fn put_bundle(
    d: &TestDaemon,
    id: &str,
    provider: &str,
    tokens: (&str, &str),
    at: i64,
) {
    let m = meta(id, provider, SecretKind::TokenBundle, at);
    d.put(&m, &bundle(tokens.0, tokens.1, at)).await;
}

pub(crate) fn request(id: &str, method: &str, path: &str) -> v1::ProxyRequest {
    v1::ProxyRequest {
        id: id.into(),
        method: method.into(),
        path: path.into(),
        headers: vec![],
        body: vec![],
        grant: String::new(),
    }
}

pub(crate) async fn proxy(
    d: &TestDaemon,
    req: v1::ProxyRequest,
) -> Result<v1::ProxyResponse, tonic::Status> {
    d.broker(WORKER)
        .await
        .proxy(req)
        .await
        .map(tonic::Response::into_inner)
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

#[tokio::test]
async fn injects_the_token_and_strips_caller_credentials() {
    let s = setup().await;
    put_token(&s.daemon, "tok", "github", ACCESS.as_bytes()).await;
    let h = |n: &str, v: &str| v1::HttpHeader {
        name: n.into(),
        value: v.as_bytes().to_vec(),
    };
    let mut req = request("tok", "POST", "/upload?x=1");
    req.headers = vec![
        h("Authorization", "Bearer attacker"),
        h("Cookie", "session=1"),
        h("Proxy-Authorization", "Basic x"),
        h("Connection", "x-hop"),
        h("X-Hop", "1"),
        h("X-Forwarded-For", "6.6.6.6"),
        h("X-Request-Id", "req-7"),
    ];
    req.body = b"hello".to_vec();
    let r = proxy(&s.daemon, req).await.expect("proxied");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"{\"user\":\"octocat\",\"received\":5}");
    assert!(!r.refreshed);
    let seen = s.provider.lock().last_headers.clone();
    assert_eq!(
        header(&seen, "authorization"),
        Some(&*format!("Bearer {ACCESS}"))
    );
    assert_eq!(header(&seen, "x-request-id"), Some("req-7"));
    for stripped in ["cookie", "proxy-authorization", "x-hop", "x-forwarded-for"] {
        assert_eq!(header(&seen, stripped), None, "{stripped} was forwarded");
    }
    // The worker never receives the token, even from an endpoint that reflects it.
    let r = proxy(&s.daemon, request("tok", "GET", "/echo"))
        .await
        .expect("echo");
    let body = String::from_utf8(r.body).expect("utf8");
    assert_eq!(body, "{\"authorization\":\"Bearer [REDACTED]\"}");
    // Upstream errors are passed through as answers.
    let r = proxy(&s.daemon, request("tok", "GET", "/error"))
        .await
        .expect("500 is an answer");
    assert_eq!(r.status, 500);
    assert_eq!(r.body, b"{\"message\":\"upstream exploded\"}");
}

#[tokio::test]
async fn every_ssrf_vector_is_refused_before_any_request() {
    let s = setup().await;
    for provider in [
        "github",
        "narrow",
        "iplit",
        "userinfo",
        "localname",
        "metadata",
        "ula",
        "zoned",
        "plainhttp",
    ] {
        put_token(
            &s.daemon,
            &format!("t-{provider}"),
            provider,
            ACCESS.as_bytes(),
        )
        .await;
    }
    let cases = [
        ("t-github", "GET", "/../oauth/token", "dot segment"),
        ("t-github", "GET", "/%2e%2e/oauth/token", "dot segment"),
        ("t-github", "GET", "/%252e%252e/oauth/token", "dot segment"),
        ("t-github", "GET", "/a/%2F..%2Foauth", "encoded '/'"),
        ("t-github", "GET", "/a\\..\\oauth", "forbidden character"),
        (
            "t-github",
            "GET",
            "http://evil.example/",
            "must start with '/'",
        ),
        ("t-github", "GET", "//evil.example/api/me", "network-path"),
        ("t-github", "GET", "@evil.example/me", "must start with '/'"),
        ("t-github", "DELETE", "/me", "method DELETE is not allowed"),
        (
            "t-narrow",
            "GET",
            "/echo",
            "outside the provider's allowed path prefixes",
        ),
        (
            "t-iplit",
            "GET",
            "/me",
            "IP literal host 127.0.0.1 is refused",
        ),
        ("t-userinfo", "GET", "/me", "userinfo"),
        (
            "t-metadata",
            "GET",
            "/meta-data",
            "IP literal host 169.254.169.254",
        ),
        ("t-ula", "GET", "/", "IP literal host fd00::1"),
        // A zone-scoped IPv6 literal is an IP literal, not a name for the resolver.
        (
            "t-zoned",
            "GET",
            "/",
            "IP literal host [fe80::1%25lo] is refused",
        ),
        // Percent-encoded control characters in the query, as in the path.
        (
            "t-github",
            "GET",
            "/me?x=1%0d%0aHost:%20evil",
            "query contains an encoded control character",
        ),
        (
            "t-github",
            "GET",
            "/me?x=%00",
            "query contains an encoded control character",
        ),
        (
            "t-github",
            "GET",
            "/me?x=a%0ab",
            "query contains an encoded control character",
        ),
        ("t-plainhttp", "GET", "/", "plain http is refused"),
        // DNS answers: the name resolves to loopback, which this provider does not allow.
        ("t-localname", "GET", "/me", "is loopback"),
        // Redirects: another host, userinfo, and a loop.
        (
            "t-github",
            "GET",
            "/redirect-cross",
            "redirect to another host",
        ),
        (
            "t-github",
            "GET",
            "/redirect-userinfo",
            "redirect to another host",
        ),
        ("t-github", "GET", "/redirect-loop", "more than 3 redirects"),
    ];
    for (id, method, path, why) in cases {
        let before = s.provider.hits("/api/me") + s.provider.hits("/oauth/token");
        let err = proxy(&s.daemon, request(id, method, path))
            .await
            .expect_err(path);
        assert_eq!(err.code(), Code::PermissionDenied, "{id} {path}: {err:?}");
        assert!(
            err.message().contains(why),
            "{id} {path}: {}",
            err.message()
        );
        assert!(!err.message().contains(ACCESS));
        assert_eq!(
            s.provider.hits("/api/me") + s.provider.hits("/oauth/token"),
            before,
            "{path} reached the upstream's other endpoints"
        );
    }
    // A same-host redirect is followed, with the credential.
    let r = proxy(&s.daemon, request("t-github", "GET", "/redirect-same"))
        .await
        .expect("same host");
    assert_eq!(r.status, 200);
    assert_eq!(s.provider.hits("/api/me"), 1);
}

#[tokio::test]
async fn retries_timeouts_sizes_and_bad_requests() {
    let s = setup().await;
    put_token(&s.daemon, "tok", "github", ACCESS.as_bytes()).await;
    // 429 with Retry-After: 1 is retried after a second.
    let started = Instant::now();
    let r = proxy(&s.daemon, request("tok", "GET", "/flaky"))
        .await
        .expect("retried");
    assert_eq!(r.status, 200);
    assert!(started.elapsed() >= Duration::from_millis(950));
    assert_eq!(s.provider.hits("/api/flaky"), 2);
    // A Retry-After beyond the cap is the caller's to handle: returned as is, not retried.
    let r = proxy(&s.daemon, request("tok", "GET", "/busy"))
        .await
        .expect("429 answer");
    assert_eq!(r.status, 429);
    assert!(
        r.headers
            .iter()
            .any(|h| h.name == "retry-after" && h.value == b"3600")
    );
    assert_eq!(s.provider.hits("/api/busy"), 1);
    let err = proxy(&s.daemon, request("tok", "GET", "/slow"))
        .await
        .expect_err("timeout");
    assert_eq!(err.code(), Code::DeadlineExceeded);
    assert_eq!(err.message(), "upstream call timed out after 1500 ms");
    let err = proxy(&s.daemon, request("tok", "GET", "/big"))
        .await
        .expect_err("oversize response");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(
        err.message(),
        "upstream response body exceeds the provider's limit of 1048576 bytes"
    );
    let mut big = request("tok", "POST", "/upload");
    big.body = vec![0; 4097];
    let err = proxy(&s.daemon, big).await.expect_err("oversize request");
    assert_eq!(err.code(), Code::ResourceExhausted);
    assert_eq!(s.provider.hits("/api/upload"), 0);
    let mut bad = request("tok", "GET", "/me");
    bad.headers = vec![v1::HttpHeader {
        name: "bad header".into(),
        value: b"x".to_vec(),
    }];
    let err = proxy(&s.daemon, bad).await.expect_err("bad header");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "headers[0]: invalid name");
    let mut bad = request("tok", "GET", "/me");
    bad.headers = vec![v1::HttpHeader {
        name: "x-ok".into(),
        value: b"line\r\nX-Injected: 1".to_vec(),
    }];
    let err = proxy(&s.daemon, bad).await.expect_err("header injection");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "headers[0] (x-ok): invalid value");
    let err = proxy(&s.daemon, request("tok", "G ET", "/me"))
        .await
        .expect_err("bad method");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = proxy(&s.daemon, request("no such id", "GET", "/me"))
        .await
        .expect_err("bad id");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = proxy(&s.daemon, request("missing", "GET", "/me"))
        .await
        .expect_err("missing");
    assert_eq!(err.code(), Code::NotFound);
    // A record whose provider has no configuration, and kinds that are not credentials.
    put_token(&s.daemon, "other", "gitlab", b"x-token-1234").await;
    let err = proxy(&s.daemon, request("other", "GET", "/me"))
        .await
        .expect_err("no provider");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        err.message(),
        "provider gitlab has no [providers.gitlab] configuration in the daemon"
    );
    let err = proxy(&s.daemon, request("github-client-secret", "GET", "/me"))
        .await
        .expect_err("client secret");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        err.message(),
        "record github-client-secret is a client_secret, which cannot be used as an upstream credential"
    );
    // Revoked records are not used.
    s.daemon.revoke("tok").await.expect("revoke");
    let err = proxy(&s.daemon, request("tok", "GET", "/me"))
        .await
        .expect_err("revoked");
    assert_eq!(err.code(), Code::FailedPrecondition);
    // The ingest and admin credentials cannot proxy at all.
    for cred in [INGEST, ADMIN] {
        let err = s
            .daemon
            .broker(cred)
            .await
            .proxy(request("tok", "GET", "/me"))
            .await
            .expect_err("wrong role");
        assert_eq!(err.code(), Code::PermissionDenied);
    }
    let err = s
        .daemon
        .broker("tv_not_a_credential")
        .await
        .proxy(request("tok", "GET", "/me"))
        .await
        .expect_err("unknown credential");
    assert_eq!(err.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn expiry_and_401_trigger_one_refresh_each_and_rotation_is_kept() {
    let s = setup().await;
    let soon = tokenvault::unix_now() + 30;
    put_bundle(&s.daemon, "b", "github", (ACCESS, REFRESH), soon).await;
    let r = proxy(&s.daemon, request("b", "GET", "/me"))
        .await
        .expect("proxied");
    assert_eq!((r.status, r.refreshed), (200, true));
    assert_eq!(s.provider.lock().refreshes, 1);
    let (access1, refresh1) = {
        let p = s.provider.lock();
        (p.access.clone(), p.refresh.clone())
    };
    // GetToken sees the rotated bundle and the new expiry in the record's metadata.
    let got = s.daemon.get("b").await.expect("get").into_inner();
    let text = String::from_utf8(got.secret).expect("utf8");
    assert!(
        text.contains(&access1) && text.contains(&refresh1),
        "{text}"
    );
    let info = got.info.expect("info");
    let stored = info.meta.expect("meta");
    assert!(stored.expires_at > tokenvault::unix_now() + 3000);
    assert_eq!(stored.scopes, vec!["repo".to_string(), "user".to_string()]);
    // Fresh bundle: no refresh.
    let r = proxy(&s.daemon, request("b", "GET", "/me"))
        .await
        .expect("proxied");
    assert_eq!((r.status, r.refreshed), (200, false));
    // The provider revokes the access token: one 401, one refresh, one retry.
    s.provider.lock().access = "revoked-by-provider".into();
    let r = proxy(&s.daemon, request("b", "GET", "/me"))
        .await
        .expect("proxied");
    assert_eq!((r.status, r.refreshed), (200, true));
    assert_eq!(s.provider.lock().refreshes, 2);
    // A record without a refresh configuration gets the 401 back as an answer.
    put_token(&s.daemon, "plain", "github", b"stale-token-123").await;
    let r = proxy(&s.daemon, request("plain", "GET", "/me"))
        .await
        .expect("401 answer");
    assert_eq!((r.status, r.refreshed), (401, false));
    assert_eq!(s.provider.lock().refreshes, 2);
}

#[tokio::test]
async fn fifty_concurrent_callers_cause_exactly_one_refresh() {
    let s = setup().await;
    s.provider.lock().token_delay = Duration::from_millis(300);
    let soon = tokenvault::unix_now() + 10;
    put_bundle(&s.daemon, "b", "github", (ACCESS, REFRESH), soon).await;
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        let mut client = s.daemon.broker(WORKER).await;
        tasks.spawn(async move { client.proxy(request("b", "GET", "/me")).await });
    }
    let mut ok = 0;
    let mut refreshed = 0;
    while let Some(r) = tasks.join_next().await {
        let r = r.expect("join").expect("proxied").into_inner();
        assert_eq!(r.status, 200);
        ok += 1;
        refreshed += usize::from(r.refreshed);
    }
    assert_eq!(ok, 50);
    // Only the call that refreshed says so; the others used its result.
    assert_eq!(refreshed, 1);
    let p = s.provider.lock();
    assert_eq!(p.refreshes, 1);
    assert_eq!(p.token_requests, 1);
}

#[tokio::test]
async fn fifty_callers_on_three_daemons_sharing_postgres_cause_exactly_one_refresh() {
    let provider = FakeProvider::start(ACCESS, REFRESH).await;
    provider.lock().token_delay = Duration::from_millis(300);
    let providers = providers_toml(&provider, "");
    let url = common::pg::database().await;
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().expect("dir")).collect();
    let mut daemons = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        // One after another: the first creates the shared keyring.
        let config = common::pg::shared(
            load(dir.path(), &providers),
            dir.path(),
            &url,
            &format!("d{i}"),
        );
        daemons.push(TestDaemon::start_with(config).await);
    }
    put_client_secret(&daemons[0]).await;
    let soon = tokenvault::unix_now() + 10;
    put_bundle(&daemons[0], "b", "github", (ACCESS, REFRESH), soon).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..50 {
        let mut client = daemons[i % 3].broker(WORKER).await;
        tasks.spawn(async move { client.proxy(request("b", "GET", "/me")).await });
    }
    while let Some(r) = tasks.join_next().await {
        let r = r.expect("join").expect("proxied").into_inner();
        assert_eq!(r.status, 200);
    }
    {
        let p = provider.lock();
        assert_eq!(
            (p.refreshes, p.token_requests),
            (1, 1),
            "one refresh in all"
        );
    }
    // The rotated refresh token was kept: the next refresh (forced by a 401) succeeds.
    provider.lock().access = "rotated-elsewhere".into();
    let r = proxy(&daemons[2], request("b", "GET", "/me"))
        .await
        .expect("refreshed again");
    assert_eq!((r.status, r.refreshed), (200, true));
    assert_eq!(provider.lock().refreshes, 2);
    for d in daemons {
        d.stop().await;
    }
}

#[tokio::test]
async fn rotating_refresh_tokens_survive_a_restart() {
    let Setup {
        tmp,
        provider,
        daemon,
        providers,
        ..
    } = setup().await;
    let soon = tokenvault::unix_now() + 5;
    put_bundle(&daemon, "b", "github", (ACCESS, REFRESH), soon).await;
    assert!(
        proxy(&daemon, request("b", "GET", "/me"))
            .await
            .expect("first")
            .refreshed
    );
    daemon.stop().await;
    provider.lock().access = "expired-upstream".into();
    let daemon = TestDaemon::start_with(load(tmp.path(), &providers)).await;
    // The second refresh must present the rotated token (the original one is spent).
    let r = proxy(&daemon, request("b", "GET", "/me"))
        .await
        .expect("second");
    assert_eq!((r.status, r.refreshed), (200, true));
    let p = provider.lock();
    assert_eq!((p.refreshes, p.token_requests), (2, 2));
}

#[tokio::test]
async fn omitted_refresh_token_keeps_the_old_one() {
    let s = setup().await;
    s.provider.lock().omit_refresh = true;
    let soon = tokenvault::unix_now() + 5;
    put_bundle(&s.daemon, "b", "github", (ACCESS, REFRESH), soon).await;
    assert!(
        proxy(&s.daemon, request("b", "GET", "/me"))
            .await
            .expect("refreshed")
            .refreshed
    );
    let text =
        String::from_utf8(s.daemon.get("b").await.expect("get").into_inner().secret).expect("utf8");
    assert!(text.contains(REFRESH), "{text}");
}

#[tokio::test]
async fn invalid_grant_marks_the_record_for_reauthorization() {
    let s = setup().await;
    let soon = tokenvault::unix_now() + 5;
    put_bundle(
        &s.daemon,
        "b",
        "github",
        (ACCESS, "rt-revoked-by-user"),
        soon,
    )
    .await;
    let err = proxy(&s.daemon, request("b", "GET", "/me"))
        .await
        .expect_err("invalid_grant");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        err.message(),
        "record b needs re-authorization: the provider rejected its refresh token (invalid_grant)"
    );
    assert!(!err.message().contains("rt-revoked"));
    // No retry loop: later calls fail fast without contacting the provider.
    let err = s.daemon.get("b").await.expect_err("get");
    assert_eq!(err.code(), Code::FailedPrecondition);
    let err = proxy(&s.daemon, request("b", "GET", "/me"))
        .await
        .expect_err("still needs re-authorization");
    assert_eq!(
        (err.code(), err.message()),
        (
            Code::FailedPrecondition,
            "record b needs re-authorization: the provider rejected its refresh token (invalid_grant)"
        )
    );
    assert_eq!(s.provider.lock().token_requests, 1);
    let mut admin = s.daemon.admin(ADMIN).await;
    let stats = admin
        .stats(v1::StatsRequest {})
        .await
        .expect("stats")
        .into_inner();
    assert_eq!(stats.needs_reauth, 1);
    let events = s.daemon.audit_events(v1::AuditLogRequest::default()).await;
    assert!(
        events
            .iter()
            .any(|e| e.action == "Refresh" && e.outcome.starts_with("invalid_grant")),
        "{events:?}"
    );
    // The web tier stores a re-authorized bundle over the marked version (created at 1,
    // marked at 2): usable again.
    let record = s
        .daemon
        .sealer()
        .await
        .seal_record(
            &meta(
                "b",
                "github",
                SecretKind::TokenBundle,
                tokenvault::unix_now() + 3600,
            ),
            &tokenvault::secret::Secret::new(bundle(
                ACCESS,
                REFRESH,
                tokenvault::unix_now() + 3600,
            )),
        )
        .expect("seal");
    s.daemon
        .ingest(INGEST)
        .await
        .put_sealed(v1::PutSealedRequest {
            record: Some(record),
            expected_version: 2,
        })
        .await
        .expect("re-authorized");
    let r = proxy(&s.daemon, request("b", "GET", "/me"))
        .await
        .expect("usable again");
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn providers_reload_without_restart_and_a_bad_reload_changes_nothing() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let provider = FakeProvider::start(ACCESS, REFRESH).await;
    let daemon = TestDaemon::start_with(load(tmp.path(), "")).await;
    put_token(&daemon, "tok", "github", ACCESS.as_bytes()).await;
    let err = proxy(&daemon, request("tok", "GET", "/me"))
        .await
        .expect_err("not configured yet");
    assert_eq!(err.code(), Code::FailedPrecondition);
    write_config(tmp.path(), &providers_toml(&provider, ""));
    let mut admin = daemon.admin(ADMIN).await;
    let names = admin
        .reload_providers(v1::ReloadProvidersRequest {})
        .await
        .expect("reload")
        .into_inner()
        .providers;
    assert!(names.contains(&"github".to_string()), "{names:?}");
    assert_eq!(
        proxy(&daemon, request("tok", "GET", "/me"))
            .await
            .expect("configured")
            .status,
        200
    );
    write_config(tmp.path(), "[providers.github]\nbase_url = \"not a url\"\n");
    let err = admin
        .reload_providers(v1::ReloadProvidersRequest {})
        .await
        .expect_err("bad config");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("providers.github.base_url"),
        "{}",
        err.message()
    );
    assert_eq!(
        proxy(&daemon, request("tok", "GET", "/me"))
            .await
            .expect("old providers stay")
            .status,
        200
    );
    // A failed reload leaves the rest of the daemon as it was: the record is still served.
    let got = daemon
        .broker(WORKER)
        .await
        .get_token(v1::GetTokenRequest { id: "tok".into() })
        .await
        .expect("GetToken after a failed reload")
        .into_inner();
    assert_eq!(got.secret, ACCESS.as_bytes());
    let err = daemon
        .admin(WORKER)
        .await
        .reload_providers(v1::ReloadProvidersRequest {})
        .await
        .expect_err("worker");
    assert_eq!(err.code(), Code::PermissionDenied);
}

#[tokio::test]
async fn background_refresher_renews_bundles_before_they_expire() {
    let Setup {
        tmp: _tmp,
        provider,
        daemon,
        ..
    } = setup_with(|p| {
        let base = p.base();
        format!(
            r#"
[providers.bg]
base_url = "{base}/api"
allow_plain_http = true
allowed_networks = ["127.0.0.0/8"]

[providers.bg.oauth]
token_endpoint = "{base}/oauth/token"
client_id = "tv-client"
client_auth = "client_secret_post"
client_secret_record = "github-client-secret"
refresh_skew_seconds = 60
background_refresh = true
background_interval_seconds = 1
"#
        )
    })
    .await;
    let soon = tokenvault::unix_now() + 30;
    put_bundle(&daemon, "due", "bg", (ACCESS, REFRESH), soon).await;
    let later = tokenvault::unix_now() + 86_400;
    put_bundle(&daemon, "not-due", "bg", ("other", "rt-other"), later).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while provider.lock().refreshes == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let another whole scan pass (the one that refreshed may still be finishing, so two from
    // now): the renewed bundle is no longer due, the other never was.
    let mut scans = daemon.vault.background_scans();
    let target = *scans.borrow() + 2;
    tokio::time::timeout(Duration::from_secs(10), scans.wait_for(|n| *n >= target))
        .await
        .expect("two more scans within 10 s")
        .expect("the vault is running");
    let counts = {
        let p = provider.lock();
        (p.refreshes, p.token_requests)
    };
    assert_eq!(counts, (1, 1));
    let got = daemon.get("due").await.expect("get").into_inner();
    assert!(got.info.expect("info").meta.expect("meta").expires_at > later - 86_400 + 3000);
}

#[tokio::test]
async fn https_upstreams_are_verified_against_the_configured_ca() {
    let pki = common::pki::ca("upstream test CA");
    let (cert, key) = common::pki::leaf(&pki, &["localhost"], "localhost");
    let provider = FakeProvider::start_tls(ACCESS, REFRESH, &cert, &key).await;
    let tmp = tempfile::tempdir().expect("tempdir");
    std::fs::write(tmp.path().join("upstream-ca.pem"), &pki.ca_pem).expect("ca");
    let other = common::pki::ca("some other CA");
    std::fs::write(tmp.path().join("other-ca.pem"), &other.ca_pem).expect("ca");
    let port = provider.addr.port();
    let toml = format!(
        r#"
[providers.github]
base_url = "https://localhost:{port}/api"
allowed_networks = ["127.0.0.0/8", "::1/128"]
ca_file = "upstream-ca.pem"

[providers.wrongca]
base_url = "https://localhost:{port}/api"
allowed_networks = ["127.0.0.0/8", "::1/128"]
ca_file = "other-ca.pem"
"#
    );
    let daemon = TestDaemon::start_with(load(tmp.path(), &toml)).await;
    put_token(&daemon, "tok", "github", ACCESS.as_bytes()).await;
    put_token(&daemon, "tok2", "wrongca", ACCESS.as_bytes()).await;
    let r = proxy(&daemon, request("tok", "GET", "/me"))
        .await
        .expect("https");
    assert_eq!(r.status, 200);
    let err = proxy(&daemon, request("tok2", "GET", "/me"))
        .await
        .expect_err("untrusted certificate");
    assert_eq!(err.code(), Code::Unavailable);
    assert!(
        err.message().contains("TLS with localhost"),
        "{}",
        err.message()
    );
    assert_eq!(provider.hits("/api/me"), 1);
}

#[tokio::test]
async fn a_slow_provider_cannot_starve_another() {
    let s = setup_with(|p| {
        let base = p.base();
        format!(
            r#"
[providers.slowp]
base_url = "{base}/api"
allow_plain_http = true
allowed_networks = ["127.0.0.0/8"]
max_concurrency = 2
timeout_ms = 20000
"#
        )
    })
    .await;
    put_token(&s.daemon, "slow", "slowp", ACCESS.as_bytes()).await;
    put_token(&s.daemon, "fast", "github", ACCESS.as_bytes()).await;
    // Four calls to a provider that holds every request until the test releases it: two fill
    // its slots, two queue behind them.
    let mut slow = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let mut client = s.daemon.broker(WORKER).await;
        slow.spawn(async move { client.proxy(request("slow", "GET", "/hold")).await });
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while s.provider.hits("/api/hold") < 2 {
        assert!(Instant::now() < deadline, "the slow calls never arrived");
        tokio::task::yield_now().await;
    }
    // Meanwhile the other provider answers, while all four slow calls are still waiting.
    let r = proxy(&s.daemon, request("fast", "GET", "/me"))
        .await
        .expect("fast");
    assert_eq!(r.status, 200);
    assert_eq!(slow.len(), 4);
    assert!(
        slow.try_join_next().is_none(),
        "a slow call finished while held"
    );
    // Only two reached the provider: the slow provider's concurrency limit holds.
    assert_eq!(s.provider.hits("/api/hold"), 2);
    s.provider.release(4);
    while let Some(r) = slow.join_next().await {
        assert_eq!(
            r.expect("join").expect("slow call").into_inner().status,
            200
        );
    }
    assert_eq!(s.provider.hits("/api/hold"), 4);
}

#[tokio::test]
async fn cli_proxy_and_reload_providers() {
    use common::process::{assert_exit, run};
    let s = setup().await;
    put_token(&s.daemon, "tok", "github", ACCESS.as_bytes()).await;
    let addr = format!("http://{}", s.daemon.addr);
    let cwd = s.tmp.path().to_path_buf();
    let env = [
        ("TOKENVAULT_WORKER_TOKEN", WORKER),
        ("TOKENVAULT_ADMIN_TOKEN", ADMIN),
        ("TOKENVAULT_ADDR", addr.as_str()),
    ];
    let cli = move |args: Vec<&'static str>, env: Vec<(&'static str, String)>| {
        let cwd = cwd.clone();
        tokio::task::spawn_blocking(move || {
            let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
            run(&cwd, &args, &env, Some(b"posted body"))
        })
    };
    let env: Vec<(&'static str, String)> = env.iter().map(|(k, v)| (*k, v.to_string())).collect();
    let o = cli(
        vec![
            "proxy",
            "tok",
            "GET",
            "/me",
            "-H",
            "Accept: application/json",
        ],
        env.clone(),
    )
    .await
    .expect("join");
    assert_exit(&o, 0, "HTTP 200");
    assert_eq!(o.stdout, b"{\"user\":\"octocat\",\"received\":0}");
    let o = cli(
        vec!["proxy", "tok", "POST", "/upload", "--body-file", "-"],
        env.clone(),
    )
    .await
    .expect("join");
    assert_exit(&o, 0, "HTTP 200");
    assert_eq!(o.stdout, b"{\"user\":\"octocat\",\"received\":11}");
    let o = cli(vec!["proxy", "tok", "GET", "/error", "--fail"], env.clone())
        .await
        .expect("join");
    assert_exit(&o, 6, "upstream answered HTTP 500");
    let o = cli(
        vec!["proxy", "tok", "GET", "/me", "-H", "no colon"],
        env.clone(),
    )
    .await
    .expect("join");
    assert_exit(&o, 5, "is not \"Name: value\"");
    let o = cli(vec!["proxy", "tok", "GET", "/../oauth/token"], env.clone())
        .await
        .expect("join");
    assert_exit(&o, 4, "dot segment");
    let o = cli(
        vec![
            "proxy",
            "tok",
            "POST",
            "/upload",
            "--body-file",
            "/nonexistent/body",
        ],
        env.clone(),
    )
    .await
    .expect("join");
    assert_exit(&o, 5, "reading /nonexistent/body");
    let o = cli(
        vec![
            "proxy",
            "-",
            "GET",
            "/me",
            "--grant-file",
            "/nonexistent/grant",
        ],
        env.clone(),
    )
    .await
    .expect("join");
    assert_exit(&o, 5, "reading /nonexistent/grant");
    let o = cli(vec!["admin", "reload-providers"], env.clone())
        .await
        .expect("join");
    assert_exit(&o, 0, "");
    let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(stdout.starts_with("providers: github, iplit,"), "{stdout}");
    let worker_only: Vec<(&'static str, String)> = env
        .iter()
        .filter(|(k, _)| *k != "TOKENVAULT_ADMIN_TOKEN")
        .cloned()
        .collect();
    let o = cli(vec!["admin", "reload-providers"], worker_only)
        .await
        .expect("join");
    assert_exit(&o, 4, "no credential");
}

/// docs/PROXY.md's configuration examples load as written.
#[test]
fn the_documented_provider_configuration_loads() {
    let doc = std::fs::read_to_string(common::fixture_path("docs/PROXY.md")).expect("doc");
    let blocks: Vec<&str> = doc
        .split("```toml\n")
        .skip(1)
        .map(|b| b.split("```").next().expect("closed block"))
        .collect();
    assert_eq!(blocks.len(), 4);
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = write_config(tmp.path(), &blocks.concat());
    let providers = Config::load_providers(&path).expect("documented config loads");
    let github = &providers["github"];
    let revocation = github.revocation.as_ref().expect("revocation");
    assert_eq!(
        (revocation.kind, revocation.by_default),
        (tokenvault::provider::RevocationKind::Rfc7009, false)
    );
    let kakao = &providers["kakao"];
    let unlink = kakao.revocation.as_ref().expect("kakao revocation");
    assert_eq!(
        (unlink.kind, unlink.by_default),
        (tokenvault::provider::RevocationKind::Unlink, true)
    );
    let callback = kakao.unlink_callback.as_ref().expect("unlink callback");
    assert_eq!(
        (callback.app_id.as_str(), callback.owner_prefix.as_str()),
        ("123456", "kakao:")
    );
    assert_eq!(github.base.to_string(), "https://api.github.com/");
    assert_eq!(github.allowed_path_prefixes, vec!["/user", "/repos/"]);
    assert_eq!(github.max_response_bytes, 4_194_304);
    let oauth = github.oauth.as_ref().expect("oauth");
    assert_eq!(oauth.client_secret_record.as_str(), "github-client-secret");
    assert_eq!(oauth.refresh_skew_seconds, 300);
    assert!(oauth.background.is_none());
}

#[tokio::test]
async fn sighup_reloads_the_providers() {
    // Installed first, so a SIGHUP can never take the default action (terminating the tests).
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .expect("signal handler");
    let tmp = tempfile::tempdir().expect("tempdir");
    let provider = FakeProvider::start(ACCESS, REFRESH).await;
    let daemon = TestDaemon::start_with(load(tmp.path(), "")).await;
    put_token(&daemon, "tok", "github", ACCESS.as_bytes()).await;
    write_config(tmp.path(), &providers_toml(&provider, ""));
    let deadline = Instant::now() + Duration::from_secs(10);
    let reloaded = loop {
        rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::HUP)
            .expect("SIGHUP");
        let _ = hup.recv().await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        match proxy(&daemon, request("tok", "GET", "/me")).await {
            Ok(r) => break r,
            Err(e) if Instant::now() < deadline => assert_eq!(e.code(), Code::FailedPrecondition),
            Err(e) => panic!("providers not reloaded: {e:?}"),
        }
    };
    assert_eq!(reloaded.status, 200);
    let events = daemon.audit_events(v1::AuditLogRequest::default()).await;
    assert!(
        events
            .iter()
            .any(|e| e.action == "ReloadProviders" && e.caller == "SIGHUP"),
        "{events:?}"
    );
}

const ISSUER: &str = "tv_test_issuer_credential_0123456789abcdef";
const HOLDER: &str = "tv_test_holder_credential_0123456789abcdef";
const TENANT_ISSUER: &str = "tv_test_tenant_issuer_credential_0123456789";

/// A daemon with two extra workers: `issuer` (may issue grants, github records only) and
/// `holder` (no records of its own).
async fn grants_setup() -> Setup {
    let tmp = tempfile::tempdir().expect("tempdir");
    let provider = FakeProvider::start(ACCESS, REFRESH).await;
    let providers = providers_toml(&provider, "");
    let config = grants_config(tmp.path(), &providers);
    let store = tokenvault::store::RocksStore::open(&config.data_dir, 8 << 20).expect("store");
    let clock = common::TestClock::new();
    let daemon = TestDaemon::start_with_clock(config, std::sync::Arc::new(store), &clock).await;
    put_token(&daemon, "tok", "github", ACCESS.as_bytes()).await;
    put_token(&daemon, "lab", "narrow", ACCESS.as_bytes()).await;
    Setup {
        tmp,
        provider,
        daemon,
        providers,
        clock: Some(clock),
    }
}

/// The config of [`grants_setup`]: an issuer for github records, an issuer limited to owners
/// under tenant-7/, and a holder with no access of its own.
fn grants_config(base: &Path, providers: &str) -> Config {
    use tokenvault::config::{CallerPolicy, CredentialEntry, Role};
    use tokenvault::secret::ApiCredential;
    let mut config = load(base, providers);
    let worker = |name: &str, cred: &str, policy: CallerPolicy| {
        let mut e =
            CredentialEntry::for_credential(name, Role::Worker, &ApiCredential::new(cred.into()));
        e.policy = policy;
        e
    };
    config.credentials.push(worker(
        "issuer",
        ISSUER,
        CallerPolicy {
            issue_grants: true,
            providers: vec!["github".into()],
            ..Default::default()
        },
    ));
    config.credentials.push(worker(
        "tenant-issuer",
        TENANT_ISSUER,
        CallerPolicy {
            issue_grants: true,
            owner_prefixes: vec!["tenant-7/".into()],
            ..Default::default()
        },
    ));
    config.credentials.push(worker(
        "holder",
        HOLDER,
        CallerPolicy {
            providers: vec!["none".into()],
            ..Default::default()
        },
    ));
    config
}

#[tokio::test]
async fn expired_grants_are_deleted_even_if_never_presented() {
    use tokenvault::store::{MemoryStore, prelude::*};
    let tmp = tempfile::tempdir().expect("tempdir");
    let provider = FakeProvider::start(ACCESS, REFRESH).await;
    let providers = providers_toml(&provider, "");
    let store = std::sync::Arc::new(MemoryStore::new());
    let grants = |store: &MemoryStore| -> Vec<String> {
        store
            .grant_page(None, 100)
            .expect("grants")
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    };
    let clock = common::TestClock::new();
    let d =
        TestDaemon::start_with_clock(grants_config(tmp.path(), &providers), store.clone(), &clock)
            .await;
    put_token(&d, "tok", "github", ACCESS.as_bytes()).await;
    let short = issue(&d, grant_request("tok", 1, 0)).await.expect("issued");
    let long = issue(&d, grant_request("tok", 600, 0))
        .await
        .expect("issued");
    let (short_key, long_key) = (short.grant_id.clone(), long.grant_id.clone());
    let mut both = vec![short_key.clone(), long_key.clone()];
    both.sort();
    assert_eq!(grants(&store), both);
    d.stop().await;
    // The short grant expires without ever being presented; the next start sweeps it.
    clock.advance(2);
    let d =
        TestDaemon::start_with_clock(grants_config(tmp.path(), &providers), store.clone(), &clock)
            .await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while grants(&store).contains(&short_key) {
        assert!(Instant::now() < deadline, "expired grant still stored");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(grants(&store), vec![long_key], "the live grant is kept");
    // And it still works.
    let r = with_grant(&d, HOLDER, &long.grant, "", "GET", "/me")
        .await
        .expect("live grant");
    assert_eq!(r.status, 200);
    d.stop().await;
}

fn grant_request(id: &str, ttl: i64, max_uses: u32) -> v1::IssueGrantRequest {
    v1::IssueGrantRequest {
        id: id.into(),
        owner: String::new(),
        methods: vec!["GET".into()],
        path_prefixes: vec!["/me".into()],
        ttl_seconds: ttl,
        max_uses,
        audience: "holder".into(),
    }
}

async fn issue(
    d: &TestDaemon,
    req: v1::IssueGrantRequest,
) -> Result<v1::IssueGrantResponse, tonic::Status> {
    d.broker(ISSUER)
        .await
        .issue_grant(req)
        .await
        .map(tonic::Response::into_inner)
}

async fn with_grant(
    d: &TestDaemon,
    cred: &str,
    grant: &str,
    id: &str,
    method: &str,
    path: &str,
) -> Result<v1::ProxyResponse, tonic::Status> {
    let mut req = request(id, method, path);
    req.grant = grant.into();
    d.broker(cred)
        .await
        .proxy(req)
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn grants_are_narrow_counted_expiring_and_revocable() {
    let s = grants_setup().await;
    let d = &s.daemon;
    let g = issue(d, grant_request("tok", 60, 2)).await.expect("issued");
    assert!(g.grant.starts_with("tvg_") && g.grant.len() == 47);
    assert_eq!(g.grant_id.len(), 64);
    // The holder has no access of its own...
    assert_eq!(
        proxy_as(d, HOLDER, request("tok", "GET", "/me"))
            .await
            .expect_err("own")
            .code(),
        Code::PermissionDenied
    );
    // ...and a grant never allows GetToken.
    assert_eq!(
        d.broker(HOLDER)
            .await
            .get_token(v1::GetTokenRequest { id: "tok".into() })
            .await
            .expect_err("get")
            .code(),
        Code::PermissionDenied
    );
    // Within scope: allowed, and the worker never sees the token.
    let r = with_grant(d, HOLDER, &g.grant, "", "GET", "/me")
        .await
        .expect("granted");
    assert_eq!(r.status, 200);
    // Outside scope: refused without using up the grant.
    for (cred, method, path, why) in [
        (HOLDER, "POST", "/me", "method POST is not allowed"),
        (
            HOLDER,
            "GET",
            "/echo",
            "path /echo is outside its path prefixes",
        ),
        (WORKER, "GET", "/me", "was issued for another caller"),
    ] {
        let err = with_grant(d, cred, &g.grant, "", method, path)
            .await
            .expect_err(why);
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(err.message().contains(why), "{}", err.message());
        assert!(!err.message().contains(&g.grant));
    }
    let err = with_grant(d, HOLDER, &g.grant, "lab", "GET", "/me")
        .await
        .expect_err("other record");
    assert!(
        err.message().contains("record lab is not covered"),
        "{}",
        err.message()
    );
    // The second (last) use, then nothing.
    with_grant(d, HOLDER, &g.grant, "tok", "GET", "/me")
        .await
        .expect("second use");
    // The third use of a two-use grant is told so, with or without the record id, and the
    // provider sees no third call.
    for id in ["", "tok"] {
        let err = with_grant(d, HOLDER, &g.grant, id, "GET", "/me")
            .await
            .expect_err("used up");
        assert_eq!(err.code(), Code::PermissionDenied);
        assert_eq!(
            err.message(),
            format!("grant {} has no uses left", &g.grant_id[..12])
        );
    }
    assert_eq!(s.provider.hits("/api/me"), 2);
    // Expiry.
    let short = issue(d, grant_request("tok", 2, 0)).await.expect("issued");
    let clock = s.clock.as_ref().expect("grants_setup has a clock");
    // Valid until its expiry second, expired from it on.
    clock.advance(1);
    with_grant(d, HOLDER, &short.grant, "", "GET", "/me")
        .await
        .expect("valid before its expiry");
    clock.advance(1);
    let err = with_grant(d, HOLDER, &short.grant, "", "GET", "/me")
        .await
        .expect_err("expired");
    assert!(err.message().contains("has expired"), "{}", err.message());
    // Revocation, by id.
    let r = issue(d, grant_request("tok", 60, 0)).await.expect("issued");
    d.broker(ISSUER)
        .await
        .revoke_grant(v1::RevokeGrantRequest {
            grant_id: r.grant_id.clone(),
        })
        .await
        .expect("revoked");
    let err = with_grant(d, HOLDER, &r.grant, "", "GET", "/me")
        .await
        .expect_err("revoked");
    assert_eq!(err.message(), "unknown, revoked or expired grant");
    let err = d
        .broker(ISSUER)
        .await
        .revoke_grant(v1::RevokeGrantRequest {
            grant_id: r.grant_id.clone(),
        })
        .await
        .expect_err("again");
    assert_eq!(err.code(), Code::NotFound);
    assert_eq!(
        err.message(),
        format!(
            "no grant {}: never issued, already revoked, or expired",
            &r.grant_id[..12]
        )
    );
    // Only callers with issue_grants may revoke.
    let live = issue(d, grant_request("tok", 60, 0)).await.expect("issued");
    let err = d
        .broker(HOLDER)
        .await
        .revoke_grant(v1::RevokeGrantRequest {
            grant_id: live.grant_id.clone(),
        })
        .await
        .expect_err("holder");
    assert_eq!(err.code(), Code::PermissionDenied);
    let events = d.audit_events(v1::AuditLogRequest::default()).await;
    for action in ["IssueGrant", "RevokeGrant"] {
        assert!(events.iter().any(|e| e.action == action), "{action}");
    }
    assert!(
        events
            .iter()
            .any(|e| e.action == "Proxy" && e.caller == "holder" && e.detail.contains("grant"))
    );
    // Only the handle's hash is stored.
    let Setup { tmp, daemon, .. } = s;
    daemon.stop().await;
    let mut files = Vec::new();
    common::process::files_under(&tmp.path().join("data"), &mut files);
    let contains = |needle: &[u8]| {
        files.iter().any(|f| {
            std::fs::read(f)
                .map(|b| b.windows(needle.len()).any(|w| w == needle))
                .unwrap_or(false)
        })
    };
    assert!(
        contains(live.grant_id.as_bytes()),
        "the scan finds stored grant ids"
    );
    assert!(!contains(live.grant.as_bytes()), "a grant handle is stored");
}

#[tokio::test]
async fn issuing_is_refused_outside_the_issuers_own_access() {
    let s = grants_setup().await;
    let d = &s.daemon;
    let err = d
        .broker(HOLDER)
        .await
        .issue_grant(grant_request("tok", 60, 1))
        .await
        .expect_err("no issue_grants");
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(err.message().contains("may not issue"), "{}", err.message());
    for (req, code, why) in [
        (
            grant_request("lab", 60, 1),
            Code::PermissionDenied,
            "provider narrow is outside",
        ),
        (grant_request("missing", 60, 1), Code::NotFound, "missing"),
        (
            grant_request("tok", 0, 1),
            Code::InvalidArgument,
            "ttl_seconds must be between 1 and 86400",
        ),
        (
            grant_request("tok", 86_401, 1),
            Code::InvalidArgument,
            "ttl_seconds",
        ),
        (
            v1::IssueGrantRequest {
                owner: "alice".into(),
                ..grant_request("tok", 60, 1)
            },
            Code::InvalidArgument,
            "set exactly one of id or owner",
        ),
        (
            v1::IssueGrantRequest {
                path_prefixes: vec!["/../x".into()],
                ..grant_request("tok", 60, 1)
            },
            Code::InvalidArgument,
            "must start with '/' and contain no '..'",
        ),
        (
            v1::IssueGrantRequest {
                methods: vec!["G ET".into()],
                ..grant_request("tok", 60, 1)
            },
            Code::InvalidArgument,
            "invalid method",
        ),
        (
            grant_request("tok\nx", 60, 1),
            Code::InvalidArgument,
            "invalid record id",
        ),
        (
            v1::IssueGrantRequest {
                owner: "alice\u{7}".into(),
                ..grant_request("", 60, 1)
            },
            Code::InvalidArgument,
            "invalid owner",
        ),
        (
            v1::IssueGrantRequest {
                owner: "o".repeat(257),
                ..grant_request("", 60, 1)
            },
            Code::InvalidArgument,
            "invalid owner",
        ),
    ] {
        let err = issue(d, req).await.expect_err(why);
        assert_eq!(
            (err.code(), err.message().contains(why)),
            (code, true),
            "{}",
            err.message()
        );
    }
    // An issuer limited to some owners can grant neither another owner nor their records.
    let mut tenant = d.broker(TENANT_ISSUER).await;
    for req in [
        v1::IssueGrantRequest {
            id: String::new(),
            owner: "alice".into(),
            ..grant_request("", 60, 0)
        },
        grant_request("tok", 60, 0),
    ] {
        let err = tenant
            .issue_grant(req)
            .await
            .expect_err("outside owner prefixes");
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(
            err.message().contains("owner prefixes"),
            "{}",
            err.message()
        );
    }
    // An owner grant: the caller names the record; the issuer's provider limit still applies.
    let g = issue(
        d,
        v1::IssueGrantRequest {
            id: String::new(),
            owner: "alice".into(),
            ..grant_request("", 60, 0)
        },
    )
    .await
    .expect("owner grant");
    assert_eq!(
        with_grant(d, HOLDER, &g.grant, "tok", "GET", "/me")
            .await
            .expect("tok")
            .status,
        200
    );
    let err = with_grant(d, HOLDER, &g.grant, "", "GET", "/me")
        .await
        .expect_err("no id");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = with_grant(d, HOLDER, &g.grant, "lab", "GET", "/me")
        .await
        .expect_err("other provider");
    assert_eq!(err.code(), Code::PermissionDenied);
    let err = with_grant(d, HOLDER, "tvg_forged", "tok", "GET", "/me")
        .await
        .expect_err("forged");
    assert_eq!(err.message(), "unknown, revoked or expired grant");
}

async fn proxy_as(
    d: &TestDaemon,
    cred: &str,
    req: v1::ProxyRequest,
) -> Result<v1::ProxyResponse, tonic::Status> {
    d.broker(cred)
        .await
        .proxy(req)
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn reload_needs_a_config_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = TestDaemon::start(tmp.path()).await;
    let err = d
        .admin(ADMIN)
        .await
        .reload_providers(v1::ReloadProvidersRequest {})
        .await
        .expect_err("dev daemon");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert_eq!(
        err.message(),
        "reloading providers failed, the previous configuration stays in effect: the daemon was started without a config file"
    );
}

/// IssueGrant and RevokeGrant write the grant and their audit event together: when the grant
/// cannot be written, no audit event claims it was issued (or revoked), and nothing changed.
#[tokio::test]
async fn grant_changes_and_their_audit_events_are_one_write() {
    use common::faulty::FaultyStore;
    let tmp = tempfile::tempdir().expect("tempdir");
    let provider = FakeProvider::start(ACCESS, REFRESH).await;
    let providers = providers_toml(&provider, "");
    let store = std::sync::Arc::new(FaultyStore::new(std::sync::Arc::new(
        tokenvault::store::MemoryStore::new(),
    )));
    let clock = common::TestClock::new();
    let d =
        TestDaemon::start_with_clock(grants_config(tmp.path(), &providers), store.clone(), &clock)
            .await;
    put_token(&d, "tok", "github", ACCESS.as_bytes()).await;
    let ok_events = |action: &'static str| {
        let d = &d;
        async move {
            d.audit_events(v1::AuditLogRequest::default())
                .await
                .into_iter()
                .filter(|e| e.action == action && e.outcome == "ok")
                .count()
        }
    };
    store.fail_grants(true);
    let err = issue(&d, grant_request("tok", 60, 2))
        .await
        .expect_err("injected");
    assert_eq!(err.code(), Code::Internal);
    assert_eq!(ok_events("IssueGrant").await, 0);
    assert!(
        tokenvault::store::MetaStore::grant_page(&*store, None, 10)
            .expect("grants")
            .is_empty()
    );
    store.fail_grants(false);
    let g = issue(&d, grant_request("tok", 60, 2))
        .await
        .expect("issued");
    assert_eq!(ok_events("IssueGrant").await, 1);
    store.fail_grants(true);
    let err = d
        .broker(ISSUER)
        .await
        .revoke_grant(v1::RevokeGrantRequest {
            grant_id: g.grant_id.clone(),
        })
        .await
        .expect_err("injected");
    assert_eq!(err.code(), Code::Internal);
    assert_eq!(ok_events("RevokeGrant").await, 0);
    // A use that cannot be recorded is refused before the upstream sees anything.
    let err = with_grant(&d, HOLDER, &g.grant, "", "GET", "/me")
        .await
        .expect_err("use not recorded");
    assert_eq!(err.code(), Code::Internal);
    assert_eq!(provider.hits("/api/me"), 0);
    store.fail_grants(false);
    // Both uses are still there.
    for _ in 0..2 {
        with_grant(&d, HOLDER, &g.grant, "", "GET", "/me")
            .await
            .expect("use");
    }
    assert_eq!(provider.hits("/api/me"), 2);
    d.stop().await;
}

/// docs/PROXY.md: a use is spent once the call is attempted. With 20 calls at once on a grant
/// of 5 uses, exactly 5 reach the upstream, the rest are told the grant has no uses left, and
/// the audit trail holds exactly 5 successful Proxy uses.
#[tokio::test]
async fn a_counted_grant_serves_exactly_its_uses_under_concurrency() {
    let s = grants_setup().await;
    let d = &s.daemon;
    let g = issue(d, grant_request("tok", 60, 5)).await.expect("issued");
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let mut broker = d.broker(HOLDER).await;
        let mut req = request("", "GET", "/me");
        req.grant = g.grant.clone();
        tasks.spawn(async move { broker.proxy(req).await.map(tonic::Response::into_inner) });
    }
    let results = tasks.join_all().await;
    let ok = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(ok, 5, "{results:?}");
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(r.code(), Code::PermissionDenied);
        assert!(r.message().ends_with("has no uses left"), "{}", r.message());
    }
    assert_eq!(s.provider.hits("/api/me"), 5);
    let uses = d
        .audit_events(v1::AuditLogRequest::default())
        .await
        .into_iter()
        .filter(|e| e.action == "Proxy" && e.outcome == "ok")
        .count();
    assert_eq!(uses, 5);
    s.daemon.stop().await;
}

/// docs/PROXY.md: a grant's use is spent when the call is attempted, so a call the upstream
/// fails still counts; a call refused before that (here: a method the grant does not allow)
/// spends nothing.
#[tokio::test]
async fn a_grant_use_is_spent_when_the_call_is_attempted() {
    let s = grants_setup().await;
    let d = &s.daemon;
    let mut req = grant_request("tok", 60, 1);
    req.path_prefixes = vec!["/error".into()];
    let g = issue(d, req).await.expect("issued");
    let refused = with_grant(d, HOLDER, &g.grant, "", "POST", "/error")
        .await
        .expect_err("method");
    assert_eq!(refused.code(), Code::PermissionDenied);
    let r = with_grant(d, HOLDER, &g.grant, "", "GET", "/error")
        .await
        .expect("attempted");
    assert_eq!(r.status, 500);
    assert_eq!(s.provider.hits("/api/error"), 1);
    let err = with_grant(d, HOLDER, &g.grant, "", "GET", "/error")
        .await
        .expect_err("spent");
    assert!(
        err.message().ends_with("has no uses left"),
        "{}",
        err.message()
    );
    assert_eq!(s.provider.hits("/api/error"), 1);
    s.daemon.stop().await;
}

/// Proxy with the private key in a PKCS#11 token: the token opens the record, the upstream
/// sees the injected token, the worker never does.
#[tokio::test]
async fn proxies_with_the_key_in_a_pkcs11_token() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let provider = FakeProvider::start(ACCESS, REFRESH).await;
    let providers = providers_toml(&provider, "");
    let mut config = load(tmp.path(), &providers);
    config.key_backend = tokenvault::config::KeyBackend::Pkcs11(common::token::token_config());
    let d = TestDaemon::start_with(config).await;
    put_client_secret(&d).await;
    put_token(&d, "tok", "github", ACCESS.as_bytes()).await;
    let mut req = request("tok", "POST", "/upload");
    req.body = b"hello".to_vec();
    let r = proxy(&d, req).await.expect("proxied");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, b"{\"user\":\"octocat\",\"received\":5}");
    let seen = provider.lock().last_headers.clone();
    assert_eq!(
        header(&seen, "authorization"),
        Some(&*format!("Bearer {ACCESS}"))
    );
    let v1 = common::token::fingerprint(&d, 1).await;
    d.stop().await;
    common::token::token()
        .destroy(&common::token::id_bytes(&v1))
        .expect("clean up");
}

/// `POST /v1/proxy` with a JSON body: `(status, JSON answer)`.
async fn http_proxy(d: &TestDaemon, credential: &str, body: &str) -> (u16, serde_json::Value) {
    let (status, _, bytes) = common::http_call(
        d.addr,
        "POST",
        "/v1/proxy",
        &[
            ("authorization", format!("Bearer {credential}")),
            ("content-type", "application/json".into()),
        ],
        body.as_bytes().to_vec(),
    )
    .await;
    (
        status,
        serde_json::from_slice(&bytes).expect("a JSON answer"),
    )
}

#[tokio::test]
async fn workers_proxy_over_http_json_with_the_same_policy_and_refusals() {
    use base64::Engine as _;
    let s = setup().await;
    put_token(&s.daemon, "tok", "github", ACCESS.as_bytes()).await;
    let b64 = |b: &[u8]| base64::engine::general_purpose::STANDARD.encode(b);
    let (status, answer) = http_proxy(
        &s.daemon,
        WORKER,
        &serde_json::json!({
            "id": "tok", "method": "POST", "path": "/upload?x=1",
            "headers": [{"name": "X-Request-Id", "value": b64(b"req-8")},
                        {"name": "Authorization", "value": b64(b"Bearer attacker")}],
            "body": b64(b"hello"),
        })
        .to_string(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["status"], 200);
    assert_eq!(answer["refreshed"], false);
    let body = base64::engine::general_purpose::STANDARD
        .decode(answer["body"].as_str().expect("body"))
        .expect("base64");
    assert_eq!(body, b"{\"user\":\"octocat\",\"received\":5}");
    let seen = s.provider.lock().last_headers.clone();
    assert_eq!(
        header(&seen, "authorization"),
        Some(&*format!("Bearer {ACCESS}"))
    );
    assert_eq!(header(&seen, "x-request-id"), Some("req-8"));
    // A reflected credential is redacted here too.
    let (_, echoed) = http_proxy(
        &s.daemon,
        WORKER,
        r#"{"id":"tok","method":"GET","path":"/echo"}"#,
    )
    .await;
    let echoed = base64::engine::general_purpose::STANDARD
        .decode(echoed["body"].as_str().expect("body"))
        .expect("base64");
    assert_eq!(echoed, b"{\"authorization\":\"Bearer [REDACTED]\"}");
    // Refusals: the outbound policy, the caller's role, malformed JSON, unknown fields, bytes
    // that are not base64; nothing reached the provider for any of them.
    let hits = || s.provider.lock().hits.values().sum::<u32>();
    let before = hits();
    for (credential, body, status, code) in [
        (
            WORKER,
            r#"{"id":"tok","method":"DELETE","path":"/me"}"#,
            403,
            "PERMISSION_DENIED",
        ),
        (
            WORKER,
            r#"{"id":"tok","method":"GET","path":"http://evil/"}"#,
            403,
            "PERMISSION_DENIED",
        ),
        (
            INGEST,
            r#"{"id":"tok","method":"GET","path":"/me"}"#,
            403,
            "PERMISSION_DENIED",
        ),
        (
            ADMIN,
            r#"{"id":"tok","method":"GET","path":"/me"}"#,
            403,
            "PERMISSION_DENIED",
        ),
        (
            "tv_wrong",
            r#"{"id":"tok","method":"GET","path":"/me"}"#,
            401,
            "UNAUTHENTICATED",
        ),
        (
            WORKER,
            r#"{"id":"tok","method":"GET""#,
            400,
            "INVALID_ARGUMENT",
        ),
        (
            WORKER,
            r#"{"id":"tok","method":"GET","path":"/me","x":1}"#,
            400,
            "INVALID_ARGUMENT",
        ),
        (
            WORKER,
            r#"{"id":"tok","method":"GET","path":"/me","body":"%%%"}"#,
            400,
            "INVALID_ARGUMENT",
        ),
        (
            WORKER,
            r#"{"id":"","method":"GET","path":"/me"}"#,
            400,
            "INVALID_ARGUMENT",
        ),
        (
            WORKER,
            r#"{"id":"missing","method":"GET","path":"/me"}"#,
            404,
            "NOT_FOUND",
        ),
        (
            WORKER,
            r#"{"grant":"tvg_not_a_grant","method":"GET","path":"/me"}"#,
            403,
            "PERMISSION_DENIED",
        ),
    ] {
        let (got, answer) = http_proxy(&s.daemon, credential, body).await;
        assert_eq!(
            (got, answer["code"].as_str()),
            (status, Some(code)),
            "{body}: {answer}"
        );
        let message = answer["message"].as_str().unwrap_or_default();
        assert!(
            !message.contains("%%%") && !message.contains("tvg_not"),
            "{message}"
        );
    }
    assert_eq!(hits(), before);
}
