//! The OAuth callback end to end: `tokenvault::web` starts the authorization request, a local
//! OAuth provider (a real HTTP server with PKCE) issues a code, the callback is checked, and
//! the daemon redeems the code (`Ingest.ExchangeCode`, gRPC and HTTP/JSON) with the client
//! secret it holds; the web tier never sees a token.

use crate::common;

use std::collections::HashMap;

use common::upstream::{CLIENT_SECRET, FakeProvider};
use common::*;
use tokenvault::api::SealRecord as _;
use tokenvault::api::v1;
use tokenvault::record::{RecordMeta, SecretKind};
use tonic::Code;

const REDIRECT: &str = "https://app.example/oauth/callback";

/// `[providers.github]` for the fake provider, with `client_auth` and the registered redirect.
fn providers_toml(provider: &FakeProvider, client_auth: &str) -> String {
    let base = provider.base();
    format!(
        r#"[providers.github]
base_url = "{base}/api"
allow_plain_http = true
allowed_networks = ["127.0.0.0/8"]
[providers.github.oauth]
token_endpoint = "{base}/oauth/token"
client_id = "tv-client"
client_auth = "{client_auth}"
client_secret_record = "github-client-secret"
redirect_uris = ["{REDIRECT}"]
"#
    )
}

async fn setup() -> (tempfile::TempDir, FakeProvider, TestDaemon) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let provider = FakeProvider::start("unused-access", "unused-refresh").await;
    let toml = format!(
        "data_dir = \"data\"\nkey_dir = \"keys\"\n{}",
        providers_toml(&provider, "client_secret_post")
    );
    let path = tmp.path().join("tokenvault.toml");
    std::fs::write(&path, toml).expect("config");
    let mut config = tokenvault::config::Config::load(&path, &HashMap::<String, String>::new())
        .expect("config loads");
    config.dev = true;
    config.credentials = credentials();
    let d = TestDaemon::start_with(config).await;
    let secret = RecordMeta::parse(
        "github-client-secret",
        "ops",
        "github",
        SecretKind::ClientSecret,
        &[],
        0,
    )
    .expect("meta");
    d.put(&secret, CLIENT_SECRET.as_bytes()).await;
    (tmp, provider, d)
}

/// The web tier's half: start the request, let the provider issue a code for it, check the
/// callback. Returns the code and verifier to hand to the daemon.
fn authorize(provider: &FakeProvider) -> tokenvault::web::AuthorizationCode {
    let endpoint = format!("{}/oauth/authorize", provider.base());
    let (url, pending) = tokenvault::web::start(
        &tokenvault::web::AuthorizeParams {
            authorization_endpoint: &endpoint,
            client_id: "tv-client",
            redirect_uri: REDIRECT,
            scopes: &["repo"],
            openid: false,
            prompt_login: true,
            ttl_seconds: 0,
        },
        tokenvault::unix_now(),
    )
    .expect("start");
    let query: HashMap<String, String> =
        form_urlencoded::parse(url.split_once('?').expect("query").1.as_bytes())
            .into_owned()
            .collect();
    assert_eq!(query["code_challenge_method"], "S256");
    // The user consents; the provider redirects back with a code and the state.
    let code = provider.issue_code(&query["code_challenge"], &query["redirect_uri"]);
    let callback = format!("code={code}&state={}", query["state"]);
    pending
        .complete(&callback, tokenvault::unix_now())
        .expect("callback")
}

fn request(id: &str, code: &tokenvault::web::AuthorizationCode) -> v1::ExchangeCodeRequest {
    v1::ExchangeCodeRequest {
        meta: Some(v1::RecordMeta {
            id: id.into(),
            owner: "user-42".into(),
            provider: "github".into(),
            kind: v1::SecretKind::TokenBundle as i32,
            scopes: vec!["repo".into()],
            expires_at: 0,
        }),
        code: code.expose_code().into(),
        code_verifier: code.expose_verifier().into(),
        redirect_uri: code.redirect_uri().into(),
        expected_version: 0,
    }
}

async fn exchange(
    d: &TestDaemon,
    credential: &str,
    req: v1::ExchangeCodeRequest,
) -> Result<v1::ExchangeCodeResponse, tonic::Status> {
    d.ingest(credential)
        .await
        .exchange_code(req)
        .await
        .map(tonic::Response::into_inner)
}

#[tokio::test]
async fn a_code_is_redeemed_by_the_daemon_and_the_web_tier_never_sees_a_token() {
    let (_tmp, provider, d) = setup().await;
    let code = authorize(&provider);
    let before = tokenvault::unix_now();
    let stored = exchange(&d, INGEST, request("github:user-42", &code))
        .await
        .expect("exchanged");
    assert_eq!(stored.id, "github:user-42");
    assert_eq!(stored.version, 1);
    assert_eq!(stored.scopes, vec!["repo", "user"]);
    assert!(stored.expires_at >= before + 3600, "{}", stored.expires_at);
    // The answer carries no token (the message has no field for one); the worker reads the
    // bundle the provider issued.
    let issued = provider.lock().access.clone();
    let got = d.get("github:user-42").await.expect("get").into_inner();
    let bundle: serde_json::Value = serde_json::from_slice(&got.secret).expect("bundle JSON");
    assert_eq!(bundle["access_token"], issued.as_str());
    assert!(
        bundle["refresh_token"]
            .as_str()
            .is_some_and(|r| r.starts_with("rt-"))
    );
    let info = got.info.expect("info");
    assert_eq!(
        info.meta.expect("meta").kind,
        v1::SecretKind::TokenBundle as i32
    );
    assert_eq!(provider.lock().exchanges, 1);

    // The same code again: the provider refuses it, nothing is stored.
    let replay = exchange(&d, INGEST, request("github:user-43", &code))
        .await
        .expect_err("replayed");
    assert_eq!(replay.code(), Code::FailedPrecondition, "{replay:?}");
    assert!(
        replay.message().starts_with(
            "exchanging the authorization code at provider github: the provider rejected the \
             authorization code (invalid_grant)"
        ),
        "{}",
        replay.message()
    );
    assert!(
        !replay.message().contains("refresh token"),
        "{}",
        replay.message()
    );
    assert_eq!(
        d.get("github:user-43").await.expect_err("absent").code(),
        Code::NotFound
    );

    // A write the store would refuse is refused before the code is spent: the code stays
    // redeemable at the provider (a create over the stored record, a stale version).
    let unspent = authorize(&provider);
    let before = provider.lock().exchanges;
    let taken = exchange(&d, INGEST, request("github:user-42", &unspent))
        .await
        .expect_err("exists");
    assert_eq!(taken.code(), Code::AlreadyExists, "{taken:?}");
    let mut stale = request("github:user-42", &unspent);
    stale.expected_version = 5;
    let stale = exchange(&d, INGEST, stale).await.expect_err("stale");
    assert_eq!(stale.code(), Code::Aborted, "{stale:?}");
    assert_eq!(
        stale.message(),
        "record github:user-42 is at version 1, not the expected 5"
    );
    assert_eq!(
        provider.lock().exchanges,
        before,
        "the code was not redeemed"
    );

    // Re-authorization replaces the record at its version, over HTTP/JSON this time, with the
    // code the refused requests left unspent.
    let again = unspent;
    let body = serde_json::json!({
        "meta": {"id": "github:user-42", "owner": "user-42", "provider": "github", "scopes": ["repo"]},
        "code": again.expose_code(),
        "codeVerifier": again.expose_verifier(),
        "redirectUri": again.redirect_uri(),
        "expectedVersion": "1",
    });
    let (status, _, body) = http_call(
        d.addr,
        "POST",
        "/v1/code-exchange",
        &[
            ("authorization", format!("Bearer {INGEST}")),
            ("content-type", "application/json".into()),
        ],
        body.to_string().into_bytes(),
    )
    .await;
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(json["version"], "2", "{json}");
    assert!(
        !String::from_utf8_lossy(&body).contains("at-"),
        "no token in the answer"
    );
    d.stop().await;
}

#[tokio::test]
async fn bad_exchanges_are_refused_precisely_and_store_nothing() {
    let (_tmp, provider, d) = setup().await;
    let code = authorize(&provider);
    let base = request("r1", &code);
    let with = |f: &dyn Fn(&mut v1::ExchangeCodeRequest)| {
        let mut r = base.clone();
        f(&mut r);
        r
    };
    let cases: Vec<(v1::ExchangeCodeRequest, &str, Code, &str)> = vec![
        (
            with(&|r| r.redirect_uri = "https://evil.example/cb".into()),
            INGEST,
            Code::InvalidArgument,
            "not one of providers.github.oauth.redirect_uris",
        ),
        (
            with(&|r| r.code_verifier = "short".into()),
            INGEST,
            Code::InvalidArgument,
            "code_verifier must be 43-128",
        ),
        (
            with(&|r| r.code = String::new()),
            INGEST,
            Code::InvalidArgument,
            "code must be 1-2048",
        ),
        (
            with(&|r| r.code = "a b".into()),
            INGEST,
            Code::InvalidArgument,
            "code must be 1-2048",
        ),
        (
            with(&|r| r.meta.as_mut().expect("meta").kind = v1::SecretKind::AccessToken as i32),
            INGEST,
            Code::InvalidArgument,
            "SECRET_KIND_TOKEN_BUNDLE",
        ),
        (
            with(&|r| r.meta = None),
            INGEST,
            Code::InvalidArgument,
            "meta is required",
        ),
        (
            with(&|r| r.meta.as_mut().expect("meta").provider = "gitlab".into()),
            INGEST,
            Code::FailedPrecondition,
            "no [providers.gitlab]",
        ),
        (
            base.clone(),
            WORKER,
            Code::PermissionDenied,
            "requires role ingest",
        ),
        // A verifier of the right shape that is not this request's: the provider refuses.
        (
            with(&|r| r.code_verifier = "x".repeat(43)),
            INGEST,
            Code::FailedPrecondition,
            "invalid_grant",
        ),
    ];
    for (req, credential, code_want, needle) in cases {
        let err = exchange(&d, credential, req).await.expect_err(needle);
        assert_eq!(err.code(), code_want, "{needle}: {err:?}");
        assert!(
            err.message().contains(needle),
            "{:?} lacks {needle:?}",
            err.message()
        );
        assert!(
            !err.message().contains(code.expose_code()),
            "the code leaked"
        );
        assert!(!err.message().contains(CLIENT_SECRET), "the secret leaked");
    }
    // Only the one client secret record is stored; the provider's code was spent by the bad
    // verifier (the provider's rule), so nothing else happened.
    assert_eq!(d.stats().await.records, 1);
    assert_eq!(provider.lock().exchanges, 0);
    // The refused exchange that reached the provider is in the audit trail, with no code.
    let events = d.audit_events(v1::AuditLogRequest::default()).await;
    assert!(
        events
            .iter()
            .any(|e| e.action == "ExchangeCode" && e.outcome == "FailedPrecondition"),
        "{events:?}"
    );
    d.stop().await;
}

/// A fenced block of docs/WEB_TIER.md.
fn web_tier_block(lang: &str) -> String {
    let doc = std::fs::read_to_string(fixture_path("docs/WEB_TIER.md")).expect("WEB_TIER.md");
    let fence = format!("```{lang}");
    let mut lines = doc.lines().skip_while(|l| l.trim_end() != fence);
    lines.next().expect("the block");
    lines
        .take_while(|l| l.trim_end() != "```")
        .collect::<Vec<_>>()
        .join("\n")
        + "\n"
}

/// Runs a documented callback handler: the program prints the authorization URL, the test
/// (as the user and the provider) answers with the redirect's query on stdin, the program
/// prints what the daemon stored. Returns that line.
fn run_handler(provider: &FakeProvider, mut cmd: std::process::Command) -> serde_json::Value {
    use std::io::{BufRead as _, Write as _};
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the handler");
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut url = String::new();
    out.read_line(&mut url).expect("the authorization URL");
    let query: HashMap<String, String> =
        form_urlencoded::parse(url.trim().split_once('?').map_or("", |(_, q)| q).as_bytes())
            .into_owned()
            .collect();
    assert_eq!(
        query.get("code_challenge_method").map(String::as_str),
        Some("S256"),
        "{url}"
    );
    assert_eq!(query.get("prompt").map(String::as_str), Some("login"));
    let code = provider.issue_code(&query["code_challenge"], &query["redirect_uri"]);
    let mut stdin = child.stdin.take().expect("stdin");
    writeln!(stdin, "code={code}&state={}", query["state"]).expect("write");
    drop(stdin);
    let mut result = String::new();
    out.read_line(&mut result).expect("the result");
    let status = child.wait_with_output().expect("wait");
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    serde_json::from_str(&result).unwrap_or_else(|_| panic!("not JSON: {result:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_python_and_node_callback_handlers_work_against_a_daemon() {
    let (tmp, provider, d) = setup().await;
    let url = format!("http://{}", d.addr);
    let python = std::env::var("TOKENVAULT_TEST_PYTHON")
        .unwrap_or_else(|_| panic!("TOKENVAULT_TEST_PYTHON is not set: run ./scripts/test"));
    let py = tmp.path().join("handler.py");
    std::fs::write(
        &py,
        web_tier_block("python")
            + r#"
import json, sys
from tokenvault_sealer import TokenvaultError
assert pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk") == "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
session = {}
print(start_login(session), flush=True)
query = sys.stdin.readline().strip()
forged = {"pending": dict(session["pending"])}
try:
    on_callback(forged, "u1", "code=x&state=forged")
    raise SystemExit("a forged state was accepted")
except PermissionError:
    pass
verifier = session["pending"]["verifier"]
stored = on_callback(session, "py-user", query)
code = urllib.parse.parse_qs(query)["code"][0]
try:
    vault.exchange_code("github:replay", "u", "github", code, verifier, REDIRECT_URI)
    raise SystemExit("a replayed code was accepted")
except TokenvaultError as e:
    assert e.code == "FAILED_PRECONDITION", e
print(json.dumps(stored), flush=True)
"#,
    )
    .expect("write");
    let provider_py = provider.clone();
    let (addr_py, py_path) = (url.clone(), py.clone());
    let stored = tokio::task::spawn_blocking(move || {
        let mut cmd = std::process::Command::new(&python);
        cmd.arg(&py_path)
            .env("PYTHONPATH", process::root().join("clients/python"))
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .env("TOKENVAULT_ADDR", addr_py)
            .env("TOKENVAULT_INGEST_TOKEN", INGEST);
        run_handler(&provider_py, cmd)
    })
    .await
    .expect("python");
    assert_eq!(stored["id"], "github:py-user", "{stored}");
    assert_eq!(stored["version"], "1");

    // Node.js: `require('tokenvault-sealer')` resolves to clients/node.
    let modules = tmp.path().join("node_modules");
    std::fs::create_dir_all(&modules).expect("node_modules");
    std::os::unix::fs::symlink(
        process::root().join("clients/node"),
        modules.join("tokenvault-sealer"),
    )
    .expect("link");
    let js = tmp.path().join("handler.js");
    std::fs::write(
        &js,
        web_tier_block("js")
            + r#"
const assert = require('node:assert');
const readline = require('node:readline');
(async () => {
  assert.strictEqual(pkceChallenge('dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk'), 'E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM');
  const session = {};
  console.log(startLogin(session));
  const rl = readline.createInterface({ input: process.stdin });
  const query = (await rl[Symbol.asyncIterator]().next()).value.trim();
  rl.close();
  await assert.rejects(onCallback({ pending: { ...session.pending } }, 'u1', 'code=x&state=forged'), /state mismatch/);
  const verifier = session.pending.verifier;
  const stored = await onCallback(session, 'node-user', query);
  const code = new URLSearchParams(query).get('code');
  await assert.rejects(vault.exchangeCode({ id: 'github:replay', owner: 'u', provider: 'github', code, codeVerifier: verifier, redirectUri: REDIRECT_URI }), (e) => e.code === 'FAILED_PRECONDITION');
  console.log(JSON.stringify(stored));
})().catch((e) => { console.error(e); process.exit(1); });
"#,
    )
    .expect("write");
    let provider_js = provider.clone();
    let stored = tokio::task::spawn_blocking(move || {
        let mut cmd = std::process::Command::new("node");
        cmd.arg(&js)
            .env("TOKENVAULT_ADDR", url)
            .env("TOKENVAULT_INGEST_TOKEN", INGEST);
        run_handler(&provider_js, cmd)
    })
    .await
    .expect("node");
    assert_eq!(stored["id"], "github:node-user", "{stored}");
    assert_eq!(stored["version"], "1");

    // Both bundles are in the vault, as the provider issued them.
    for id in ["github:py-user", "github:node-user"] {
        let got = d.get(id).await.expect("get").into_inner();
        let bundle: serde_json::Value = serde_json::from_slice(&got.secret).expect("bundle");
        assert!(
            bundle["access_token"]
                .as_str()
                .is_some_and(|a| a.starts_with("at-"))
        );
    }
    assert_eq!(provider.lock().exchanges, 2);
    d.stop().await;
}

/// The daemon as its own process with debug logging: a code exchange, a replayed one and a
/// read; its log file holds none of the code, verifier, state, client secret or tokens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_secret_reaches_the_daemon_log_in_a_code_exchange() {
    use sha2::Digest as _;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let provider = FakeProvider::start("unused-access", "unused-refresh").await;
    let hash = |c: &str| hex::encode(sha2::Sha256::digest(c.as_bytes()));
    std::fs::write(
        dir.join("tokenvault.toml"),
        format!(
            r#"listen = "127.0.0.1:0"
data_dir = "data"
key_dir = "keys"
lock_memory = false
log = "debug"
[[credentials]]
name = "ingest"
role = "ingest"
sha256 = "{}"
[[credentials]]
name = "worker"
role = "worker"
sha256 = "{}"
{}"#,
            hash(INGEST),
            hash(WORKER),
            providers_toml(&provider, "client_secret_basic")
        ),
    )
    .expect("config");
    let init = process::run(
        dir,
        &["keys", "init", "--config", "tokenvault.toml"],
        &[],
        None,
    );
    assert!(init.status.success(), "{}", process::stderr(&init));
    let (mut child, addr, _) =
        process::spawn_daemon(dir, &["serve", "--config", "tokenvault.toml"], &[]);
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    let authed = |cred: &str| {
        tonic::service::interceptor::InterceptedService::new(channel.clone(), Bearer::new(cred))
    };
    let mut ingest = v1::ingest_client::IngestClient::new(authed(INGEST));
    let pem = ingest
        .public_keys(v1::PublicKeysRequest {})
        .await
        .expect("keys")
        .into_inner()
        .active
        .expect("active")
        .spki_pem;
    let sealer = tokenvault::Sealer::from_pem(&pem).expect("sealer");
    let secret_meta = RecordMeta::parse(
        "github-client-secret",
        "ops",
        "github",
        SecretKind::ClientSecret,
        &[],
        0,
    )
    .expect("meta");
    let record = sealer
        .seal_record(
            &secret_meta,
            &tokenvault::secret::Secret::new(CLIENT_SECRET.as_bytes().to_vec()),
        )
        .expect("seal");
    ingest
        .put_sealed(v1::PutSealedRequest {
            record: Some(record),
            expected_version: 0,
        })
        .await
        .expect("client secret stored");
    let code = authorize(&provider);
    ingest
        .exchange_code(request("github:logged", &code))
        .await
        .expect("exchanged");
    let replay = ingest
        .exchange_code(request("github:logged-2", &code))
        .await
        .expect_err("replayed");
    assert_eq!(replay.code(), Code::FailedPrecondition);
    let (access, refresh) = {
        let s = provider.lock();
        (s.access.clone(), s.refresh.clone())
    };
    let got = v1::broker_client::BrokerClient::new(authed(WORKER))
        .get_token(v1::GetTokenRequest {
            id: "github:logged".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert!(String::from_utf8_lossy(&got.secret).contains(&access));
    child.kill().expect("stop");
    child.wait().expect("reap");
    let log = std::fs::read_to_string(dir.join("daemon.log")).expect("log");
    assert!(log.contains("authorization code exchanged"), "{log}");
    for (what, secret) in [
        ("code", code.expose_code()),
        ("verifier", code.expose_verifier()),
        ("client secret", CLIENT_SECRET),
        ("access token", access.as_str()),
        ("refresh token", refresh.as_str()),
    ] {
        assert!(!log.contains(secret), "the {what} is in the daemon log");
    }
}
