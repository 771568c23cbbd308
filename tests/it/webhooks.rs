//! Webhooks (docs/WEBHOOKS.md) against a real receiver on 127.0.0.1 that verifies every
//! delivery with the Standard Webhooks specification's own Python library, driven by real
//! state changes: a refresh refused with `invalid_grant` by a real token endpoint, a
//! re-authorization through Ingest, revocation and deletion through Admin.

use crate::common;
use crate::proxy::{ACCESS, REFRESH, Setup, bundle, meta, proxy, put_bundle, request, setup_with};

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{ADMIN, INGEST, TestDaemon};
use tokenvault::api::SealRecord as _;
use tokenvault::api::v1;
use tokenvault::record::SecretKind;
use tonic::Code;

/// The secret the receiver knows, and an older one the vault still signs with too (a rotation
/// in progress: the receiver accepts the delivery if any signature verifies).
const NEW_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const OLD_SECRET: &str = "whsec_c2VjcmV0LW9mLXRoZS1vbGQtcmVjZWl2ZXItMDE=";

/// The receiver process; killed when dropped.
pub(crate) struct Receiver {
    child: std::process::Child,
    port: u16,
    out: PathBuf,
    control: PathBuf,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Receiver {
    /// Starts the receiver; `down` makes it answer 503 until [`Receiver::up`].
    pub(crate) fn start(dir: &Path, down: bool) -> Self {
        let python = std::env::var("TOKENVAULT_TEST_PYTHON")
            .unwrap_or_else(|_| panic!("TOKENVAULT_TEST_PYTHON is not set: run ./scripts/test"));
        let control = dir.join("receiver-control");
        std::fs::create_dir_all(&control).expect("control dir");
        if down {
            std::fs::write(control.join("down"), b"").expect("down");
        }
        let (port_file, out) = (dir.join("receiver.port"), dir.join("received.jsonl"));
        let child = std::process::Command::new(python)
            .arg(common::process::root().join("tests/it/webhook_receiver.py"))
            .arg(&port_file)
            .arg(&out)
            .arg(NEW_SECRET)
            .arg(&control)
            .spawn()
            .expect("start the receiver");
        let deadline = Instant::now() + Duration::from_secs(30);
        let port = loop {
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                break text.trim().parse().expect("port");
            }
            assert!(Instant::now() < deadline, "the receiver did not start");
            std::thread::sleep(Duration::from_millis(20));
        };
        Self {
            child,
            port,
            out,
            control,
        }
    }

    fn up(&self) {
        let _ = std::fs::remove_file(self.control.join("down"));
    }

    /// Answers 503 from now on, until [`Receiver::up`].
    fn down(&self) {
        std::fs::write(self.control.join("down"), b"").expect("down");
    }

    fn set_gone(&self, gone: bool) {
        let flag = self.control.join("gone");
        if gone {
            std::fs::write(flag, b"").expect("gone");
        } else {
            let _ = std::fs::remove_file(flag);
        }
    }

    /// Every request so far, in the order answered.
    fn lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.out)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("receiver line"))
            .collect()
    }

    /// The verified deliveries so far.
    pub(crate) fn delivered(&self) -> Vec<serde_json::Value> {
        self.lines()
            .into_iter()
            .filter(|l| l["answer"] == 204)
            .collect()
    }

    /// Waits until `done` holds for the requests so far.
    pub(crate) async fn until(&self, what: &str, done: impl Fn(&[serde_json::Value]) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let lines = self.lines();
            if done(&lines) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {lines:#?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The `[webhooks]` tables for an endpoint `app` pointing at this receiver.
    pub(crate) fn toml(&self, extra: &str) -> String {
        format!(
            r#"
[webhooks]
poll_ms = 20
[webhooks.endpoints.app]
url = "http://127.0.0.1:{port}/hooks"
allow_loopback_http = true
secret_records = ["hook-secret-new", "hook-secret-old"]
timeout_ms = 2000
{extra}"#,
            port = self.port
        )
    }
}

/// Stores the two signing secrets as sealed `client_secret` records.
pub(crate) async fn put_secrets(d: &TestDaemon) {
    for (id, secret) in [
        ("hook-secret-new", NEW_SECRET),
        ("hook-secret-old", OLD_SECRET),
    ] {
        d.put(
            &meta(id, "github", SecretKind::ClientSecret, 0),
            secret.as_bytes(),
        )
        .await;
    }
}

async fn deliveries(d: &TestDaemon, finished: bool) -> Vec<v1::Delivery> {
    d.admin(ADMIN)
        .await
        .list_deliveries(v1::ListDeliveriesRequest {
            endpoint: "app".into(),
            finished,
            page_token: String::new(),
            page_size: 0,
        })
        .await
        .expect("list deliveries")
        .into_inner()
        .deliveries
}

/// Re-authorizes record `id` over `version` through Ingest (what the web tier does when the
/// owner signs in again).
async fn reauthorize(d: &TestDaemon, id: &str, version: u64) {
    let at = tokenvault::unix_now() + 3600;
    let record = d
        .sealer()
        .await
        .seal_record(
            &meta(id, "github", SecretKind::TokenBundle, at),
            &tokenvault::secret::Secret::new(bundle(ACCESS, REFRESH, at)),
        )
        .expect("seal");
    d.ingest(INGEST)
        .await
        .put_sealed(v1::PutSealedRequest {
            record: Some(record),
            expected_version: version,
        })
        .await
        .expect("re-authorized");
}

/// Stores a usable bundle `id` of alice at github.
async fn put_live(d: &TestDaemon, id: &str) {
    let at = tokenvault::unix_now() + 3600;
    put_bundle(d, id, "github", (ACCESS, REFRESH), at).await;
}

/// A receiver (answering 503 while `down`) and a daemon whose endpoint `app` points at it.
async fn hooked(down: bool) -> (tempfile::TempDir, Receiver, Setup) {
    let dir = tempfile::tempdir().expect("tempdir");
    let receiver = Receiver::start(dir.path(), down);
    let toml = receiver.toml("");
    let setup = setup_with(|_| toml.clone()).await;
    (dir, receiver, setup)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_a_verifying_receiver_in_order_once_it_is_back_and_can_be_replayed() {
    let (_dir, receiver, s) = hooked(true).await;
    let d = &s.daemon;
    put_secrets(d).await;
    // record.needs_reauth: the provider refuses the refresh token.
    let soon = tokenvault::unix_now() + 5;
    put_bundle(d, "b", "github", (ACCESS, "rt-revoked-by-user"), soon).await;
    let err = proxy(d, request("b", "GET", "/me"))
        .await
        .expect_err("invalid_grant");
    assert_eq!(err.code(), Code::FailedPrecondition);
    // record.recovered, then record.revoked and record.deleted of the same record.
    reauthorize(d, "b", 2).await;
    let mut admin = d.admin(ADMIN).await;
    admin
        .revoke(v1::RevokeRequest {
            id: "b".into(),
            ..Default::default()
        })
        .await
        .expect("revoke");
    admin
        .delete(v1::DeleteRequest {
            id: "b".into(),
            ..Default::default()
        })
        .await
        .expect("delete");
    // owner.deleted, even of an owner without records left (the application asked for it).
    admin
        .delete_owner(v1::DeleteOwnerRequest {
            owner: "nobody-here".into(),
            ..Default::default()
        })
        .await
        .expect("delete owner");
    // Nothing is lost while the receiver is down: the first event is retried, the record's
    // later ones wait behind it.
    receiver
        .until("an attempt answered 503", |l| {
            l.iter().any(|l| l["answer"] == 503)
        })
        .await;
    // The receiver logs its answer before the daemon has recorded the failed attempt: wait for
    // the daemon's record of it.
    let deadline = Instant::now() + Duration::from_secs(60);
    let pending = loop {
        let pending = deliveries(d, false).await;
        if pending.first().is_some_and(|p| p.attempts >= 1) {
            break pending;
        }
        assert!(
            Instant::now() < deadline,
            "no attempt recorded: {pending:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let types: Vec<&str> = pending.iter().map(|p| p.r#type.as_str()).collect();
    assert_eq!(
        types,
        [
            "record.needs_reauth",
            "record.recovered",
            "record.revoked",
            "record.deleted",
            "owner.deleted"
        ]
    );
    assert!(pending.iter().all(|p| p.state == "pending"));
    assert!(
        pending[1..4].iter().all(|p| p.attempts == 0),
        "a record's later events wait for the first: {pending:?}"
    );
    assert!(pending[0].attempts >= 1 && pending[0].last_error == "HTTP 503");
    receiver.up();
    receiver
        .until("every event delivered", |l| {
            l.iter().filter(|l| l["answer"] == 204).count() == 5
        })
        .await;
    let got = receiver.delivered();
    let of_b: Vec<&str> = got
        .iter()
        .filter(|l| l["event"]["data"]["record_id"] == "b")
        .map(|l| l["event"]["type"].as_str().expect("type"))
        .collect();
    assert_eq!(
        of_b,
        [
            "record.needs_reauth",
            "record.recovered",
            "record.revoked",
            "record.deleted"
        ],
        "one record's events arrive in the order they happened"
    );
    let versions: Vec<u64> = got
        .iter()
        .filter(|l| l["event"]["data"]["record_id"] == "b")
        .map(|l| l["event"]["data"]["version"].as_u64().expect("version"))
        .collect();
    assert_eq!(versions, [2, 3, 4, 4]);
    for l in &got {
        assert_eq!(l["signatures"], 2, "signed with both secrets: {l}");
        assert_eq!(l["binds_body_and_time"], true, "{l}");
        let raw = l["raw"].as_str().expect("raw");
        for secret in [
            ACCESS,
            REFRESH,
            "rt-revoked-by-user",
            NEW_SECRET,
            OLD_SECRET,
            "whsec_",
        ] {
            assert!(!raw.contains(secret), "{raw}");
        }
    }
    let needs = &got
        .iter()
        .find(|l| l["event"]["type"] == "record.needs_reauth")
        .expect("record.needs_reauth")["event"];
    assert_eq!(needs["data"]["provider"], "github");
    assert_eq!(needs["data"]["owner"], "alice");
    assert_eq!(needs["data"]["reason"], "invalid_grant");
    let owner = got
        .iter()
        .find(|l| l["event"]["type"] == "owner.deleted")
        .expect("owner.deleted");
    assert_eq!(owner["event"]["data"]["owner"], "nobody-here");
    // docs/WEBHOOKS.md's Node.js verification accepts the same deliveries.
    let node = common::process::root().join("tests/it/webhook-node");
    let out = receiver.out.clone();
    let verified = tokio::task::spawn_blocking(move || {
        let install = std::process::Command::new("npm")
            .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(&node)
            .status()
            .expect("npm");
        assert!(install.success(), "npm ci");
        std::process::Command::new("node")
            .arg("verify.mjs")
            .arg(&out)
            .arg(NEW_SECRET)
            .current_dir(&node)
            .output()
            .expect("node")
    })
    .await
    .expect("node check");
    assert_eq!(
        String::from_utf8_lossy(&verified.stdout).trim(),
        "verified 5",
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );
    // Every delivery finished, none left pending.
    let done = deliveries(d, true).await;
    assert_eq!(done.len(), 5);
    assert!(
        done.iter()
            .all(|x| x.state == "delivered" && x.finished_at > 0)
    );
    assert!(deliveries(d, false).await.is_empty());
    // A replay: the same event (webhook-id and body), signed afresh.
    let first = &done[0];
    let replayed = admin
        .retry_delivery(v1::RetryDeliveryRequest {
            endpoint: "app".into(),
            id: first.id.clone(),
        })
        .await
        .expect("retry")
        .into_inner()
        .delivery
        .expect("delivery");
    assert_eq!(replayed.state, "pending");
    receiver
        .until("the replay", |l| {
            l.iter().filter(|l| l["answer"] == 204).count() == 6
        })
        .await;
    let again = receiver.delivered().pop().expect("replayed");
    assert_eq!(again["id"], first.event_id.as_str());
    assert_eq!(again["raw"], first.body.as_str());
    // The replay is in the audit trail.
    let events = d.audit_events(v1::AuditLogRequest::default()).await;
    assert!(
        events
            .iter()
            .any(|e| e.action == "RetryDelivery" && e.outcome == "ok"),
        "{events:?}"
    );
    s.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_410_stops_the_endpoint_until_an_admin_retries_and_bad_admin_input_changes_nothing() {
    let (_dir, receiver, s) = hooked(false).await;
    let d = &s.daemon;
    receiver.set_gone(true);
    put_secrets(d).await;
    let mut admin = d.admin(ADMIN).await;
    put_live(d, "one").await;
    put_live(d, "two").await;
    admin
        .revoke(v1::RevokeRequest {
            id: "one".into(),
            ..Default::default()
        })
        .await
        .expect("revoke");
    receiver
        .until("the 410", |l| l.iter().any(|l| l["answer"] == 410))
        .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while deliveries(d, true).await.is_empty() {
        assert!(Instant::now() < deadline, "the 410 was not recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The next event is finished as gone without being sent.
    admin
        .revoke(v1::RevokeRequest {
            id: "two".into(),
            ..Default::default()
        })
        .await
        .expect("revoke");
    while deliveries(d, true).await.len() < 2 {
        assert!(Instant::now() < deadline, "the second was not finished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let done = deliveries(d, true).await;
    assert!(done.iter().all(|x| x.state == "gone"), "{done:?}");
    assert_eq!(done[1].attempts, 1);
    assert_eq!(
        receiver.lines().len(),
        1,
        "nothing more is sent to an endpoint that answered 410"
    );
    // An admin retries the second: the endpoint is used again.
    receiver.set_gone(false);
    admin
        .retry_delivery(v1::RetryDeliveryRequest {
            endpoint: "app".into(),
            id: done[1].id.clone(),
        })
        .await
        .expect("retry");
    receiver
        .until("the retried event", |l| {
            l.iter().any(|l| l["answer"] == 204)
        })
        .await;
    let got = receiver.delivered();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0]["event"]["data"]["record_id"], "two");
    // Bad input: a precise status, nothing changed.
    for (endpoint, id, code) in [
        ("nope", "x", Code::NotFound),
        ("app", "", Code::InvalidArgument),
        ("app", "../p/app/x", Code::InvalidArgument),
        ("app", &"a".repeat(65), Code::InvalidArgument),
        ("app", "0000000000000000-msg_absent", Code::NotFound),
    ] {
        let e = admin
            .retry_delivery(v1::RetryDeliveryRequest {
                endpoint: endpoint.into(),
                id: id.into(),
            })
            .await
            .expect_err("refused");
        assert_eq!(e.code(), code, "{endpoint} {id}: {e:?}");
    }
    for (endpoint, size, token, code) in [
        ("nope", 0, "", Code::NotFound),
        ("app", 1001, "", Code::InvalidArgument),
        ("app", 0, "a/b", Code::InvalidArgument),
    ] {
        let e = admin
            .list_deliveries(v1::ListDeliveriesRequest {
                endpoint: endpoint.into(),
                finished: true,
                page_token: token.into(),
                page_size: size,
            })
            .await
            .expect_err("refused");
        assert_eq!(e.code(), code, "{endpoint} {size} {token}: {e:?}");
    }
    assert_eq!(deliveries(d, false).await.len(), 0);
    assert_eq!(deliveries(d, true).await.len(), 2);
    // The same through the CLI: one JSON object per delivery; refusals as exit codes.
    let addr = format!("http://{}", d.addr);
    let cli = |args: &'static [&'static str]| {
        let addr = addr.clone();
        tokio::task::spawn_blocking(move || {
            let cwd = tempfile::tempdir().expect("cwd");
            common::process::run(
                cwd.path(),
                args,
                &[
                    ("TOKENVAULT_ADMIN_TOKEN", ADMIN),
                    ("TOKENVAULT_ADDR", &addr),
                ],
                None,
            )
        })
    };
    let o = cli(&["admin", "webhooks", "list", "app", "--finished", "--json"])
        .await
        .expect("join");
    common::process::assert_exit(&o, 0, "");
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["state"], "delivered");
    assert_eq!(lines[1]["type"], "record.revoked");
    let o = cli(&["admin", "webhooks", "list", "nope"])
        .await
        .expect("join");
    common::process::assert_exit(&o, 3, "webhook endpoint");
    let o = cli(&["admin", "webhooks", "retry", "app", "../x"])
        .await
        .expect("join");
    common::process::assert_exit(&o, 5, "not a delivery id");
    // A worker cannot list or replay deliveries.
    let e = d
        .admin(common::WORKER)
        .await
        .list_deliveries(v1::ListDeliveriesRequest {
            endpoint: "app".into(),
            ..Default::default()
        })
        .await
        .expect_err("worker");
    assert_eq!(e.code(), Code::PermissionDenied);
    s.daemon.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_secret_sends_nothing_and_no_endpoint_writes_nothing() {
    let (_dir, receiver, s) = hooked(false).await;
    let d = &s.daemon;
    // The secret records are missing: the event waits, nothing unsigned is sent.
    put_live(d, "one").await;
    d.revoke("one").await.expect("revoke");
    let pending = deliveries(d, false).await;
    assert_eq!(pending.len(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(receiver.lines().is_empty(), "nothing is sent unsigned");
    assert_eq!(deliveries(d, false).await[0].attempts, 0);
    s.daemon.stop().await;
    // Without [webhooks], a change writes no outbox entry at all.
    let Setup {
        tmp: _tmp2,
        provider: _provider2,
        daemon: plain,
        ..
    } = setup_with(|_| String::new()).await;
    put_live(&plain, "one").await;
    let mut admin = plain.admin(ADMIN).await;
    admin
        .revoke(v1::RevokeRequest {
            id: "one".into(),
            ..Default::default()
        })
        .await
        .expect("revoke");
    let e = admin
        .list_deliveries(v1::ListDeliveriesRequest {
            endpoint: "app".into(),
            ..Default::default()
        })
        .await
        .expect_err("no endpoint");
    assert_eq!(e.code(), Code::NotFound);
    plain.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_daemons_on_one_database_deliver_each_event_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let receiver = Receiver::start(dir.path(), false);
    let toml = receiver.toml("");
    let url = common::pg::database().await;
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().expect("dir")).collect();
    let mut daemons = Vec::new();
    for (i, d) in dirs.iter().enumerate() {
        // One after another: the first creates the shared keyring.
        let config = common::pg::shared(
            crate::proxy::load(d.path(), &toml),
            d.path(),
            &url,
            &format!("d{i}"),
        );
        daemons.push(TestDaemon::start_with(config).await);
    }
    put_secrets(&daemons[0]).await;
    const N: usize = 20;
    for i in 0..N {
        put_live(&daemons[0], &format!("r{i}")).await;
    }
    for i in 0..N {
        daemons[i % 2]
            .revoke(format!("r{i}"))
            .await
            .expect("revoke");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (done, pending) = (
            deliveries(&daemons[1], true).await.len(),
            deliveries(&daemons[0], false).await.len(),
        );
        if done == N && pending == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{done} finished, {pending} pending"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every delivery is recorded finished after its answer: the receiver saw each event once.
    let got = receiver.delivered();
    let ids: std::collections::HashSet<&str> =
        got.iter().map(|l| l["id"].as_str().expect("id")).collect();
    assert_eq!((got.len(), ids.len()), (N, N), "{got:#?}");
    assert_eq!(receiver.lines().len(), N, "nothing sent twice or refused");
    for d in daemons {
        d.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_when_the_daemon_is_killed() {
    use common::process;
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let receiver = Receiver::start(dir, true);
    std::fs::write(
        dir.join("tokenvault.toml"),
        format!(
            r#"listen = "127.0.0.1:0"
data_dir = "data"
key_dir = "keys"
lock_memory = false
[[credentials]]
name = "ingest"
role = "ingest"
sha256 = "{}"
[[credentials]]
name = "admin"
role = "admin"
sha256 = "{}"
{}"#,
            process::sha256_hex(INGEST),
            process::sha256_hex(ADMIN),
            receiver.toml("")
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
    let serve = || process::spawn_daemon(dir, &["serve", "--config", "tokenvault.toml"], &[]);
    let (mut child, addr, _) = serve();
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect");
    // The signing secrets, and records to revoke, through Ingest.
    let (mut ingest, sealer) = common::ingest_over(channel.clone()).await;
    let put = |id: &str, kind: SecretKind, secret: &[u8]| {
        let record = sealer
            .seal_record(
                &meta(id, "github", kind, 0),
                &tokenvault::secret::Secret::new(secret.to_vec()),
            )
            .expect("seal");
        v1::PutSealedRequest {
            record: Some(record),
            expected_version: 0,
        }
    };
    let mut items = vec![
        put(
            "hook-secret-new",
            SecretKind::ClientSecret,
            NEW_SECRET.as_bytes(),
        ),
        put(
            "hook-secret-old",
            SecretKind::ClientSecret,
            OLD_SECRET.as_bytes(),
        ),
    ];
    const N: usize = 10;
    items.extend((0..N).map(|i| put(&format!("k{i}"), SecretKind::AccessToken, b"token")));
    ingest
        .put_sealed_batch(v1::PutSealedBatchRequest { items })
        .await
        .expect("stored");
    let mut admin = v1::admin_client::AdminClient::new(
        tonic::service::interceptor::InterceptedService::new(channel, common::Bearer::new(ADMIN)),
    );
    for i in 0..N {
        admin
            .revoke(v1::RevokeRequest {
                id: format!("k{i}"),
                ..Default::default()
            })
            .await
            .expect("revoke");
    }
    // Acknowledged, not delivered (the receiver is down), then kill -9.
    receiver.until("a first attempt", |l| !l.is_empty()).await;
    child.kill().expect("kill -9");
    child.wait().expect("reaped");
    assert!(receiver.delivered().is_empty());
    receiver.up();
    let (mut child, _, _) = serve();
    receiver
        .until("every event after the restart", |l| {
            l.iter().filter(|l| l["answer"] == 204).count() >= N
        })
        .await;
    let got = receiver.delivered();
    let mut revoked: Vec<&str> = got
        .iter()
        .map(|l| l["event"]["data"]["record_id"].as_str().expect("record"))
        .collect();
    revoked.sort_unstable();
    revoked.dedup();
    assert_eq!(revoked.len(), N, "{got:#?}");
    child.kill().expect("kill");
    child.wait().expect("reaped");
}

/// docs/WEBHOOKS.md's configuration loads as written.
#[test]
fn the_documented_webhook_configuration_loads() {
    let doc = std::fs::read_to_string(common::fixture_path("docs/WEBHOOKS.md")).expect("doc");
    let block = doc
        .split("```toml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("a toml block");
    let tmp = tempfile::tempdir().expect("tempdir");
    let path = tmp.path().join("tokenvault.toml");
    std::fs::write(
        &path,
        format!("data_dir = \"data\"\nkey_dir = \"keys\"\n{block}"),
    )
    .expect("write");
    let config = tokenvault::config::Config::load(&path, &tokenvault::config::Env)
        .expect("documented config loads");
    let w = &config.webhooks;
    assert_eq!(w.max_age, Duration::from_secs(72 * 3600));
    assert_eq!(w.endpoints.len(), 1);
    assert_eq!(w.endpoints[0].name, "app");
    assert_eq!(
        w.endpoints[0].secret_records[0].as_str(),
        "app-webhook-secret"
    );
}

/// A receiver that is up, and a daemon on RocksDB in `dir` delivering to it, reading time from
/// the returned clock, with the endpoint's signing secrets stored.
async fn clocked(dir: &Path) -> (Receiver, TestDaemon, common::TestClock) {
    let receiver = Receiver::start(dir, false);
    let cfg = crate::proxy::load(dir, &receiver.toml(""));
    let store = tokenvault::store::RocksStore::open(&cfg.data_dir, 8 << 20).expect("store");
    let clock = common::TestClock::new();
    let d = TestDaemon::start_with_clock(cfg, std::sync::Arc::new(store), &clock).await;
    put_secrets(&d).await;
    (receiver, d, clock)
}

/// A delivery an admin asks for again is retried for `max_age_hours` from that moment: a
/// replay of an event older than that is not given up on its first failure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_of_an_old_event_is_retried_not_given_up_at_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (receiver, d, clock) = clocked(dir.path()).await;
    let mut admin = d.admin(ADMIN).await;
    admin
        .rotate_key(v1::RotateKeyRequest::default())
        .await
        .expect("rotate");
    receiver
        .until("key.rotated", |l| l.iter().any(|l| l["answer"] == 204))
        .await;
    let done = deliveries(&d, true).await;
    assert_eq!(done.len(), 1);
    // Four days later (past the 72 h horizon), with the receiver down, it is asked for again.
    receiver.down();
    clock.advance(4 * 24 * 3600);
    admin
        .retry_delivery(v1::RetryDeliveryRequest {
            endpoint: "app".into(),
            id: done[0].id.clone(),
        })
        .await
        .expect("retry");
    // Its first attempt fails: it stays pending, to be tried again.
    let deadline = Instant::now() + Duration::from_secs(30);
    let pending = loop {
        let pending = deliveries(&d, false).await;
        if pending
            .first()
            .is_some_and(|p| p.attempts > done[0].attempts)
        {
            break pending;
        }
        let finished = deliveries(&d, true).await;
        assert!(
            finished.iter().all(|f| f.state == "delivered"),
            "given up: {finished:?}"
        );
        assert!(Instant::now() < deadline, "no attempt: {pending:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(pending.len(), 1, "{pending:?}");
    assert_eq!(pending[0].state, "pending");
    assert!(
        pending[0].last_error.contains("503"),
        "{}",
        pending[0].last_error
    );
    assert!(deliveries(&d, true).await.is_empty());
    // Once the receiver is back, it is delivered again.
    receiver.up();
    clock.advance(3600);
    receiver
        .until("the replay", |l| {
            l.iter().filter(|l| l["answer"] == 204).count() == 2
        })
        .await;
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_and_a_destruction_are_webhooks_for_security_teams() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (receiver, d, clock) = clocked(dir.path()).await;
    let mut admin = d.admin(ADMIN).await;
    let rotated = admin
        .rotate_key(v1::RotateKeyRequest::default())
        .await
        .expect("rotate")
        .into_inner();
    let v2 = rotated.active.expect("active");
    // Everything moved to version 2, then version 1 retired and destroyed once due.
    d.rewrap().await;
    admin
        .retire_key(v1::RetireKeyRequest { version: 1 })
        .await
        .expect("retire");
    admin
        .destroy_key(v1::DestroyKeyRequest { version: 1 })
        .await
        .expect("destroy");
    clock.advance(8 * 24 * 3600);
    assert_eq!(d.destroy_due().await.len(), 1);
    receiver
        .until("key.rotated and key.destroyed", |l| {
            l.iter().filter(|l| l["answer"] == 204).count() == 2
        })
        .await;
    let got = receiver.delivered();
    let kinds: Vec<&str> = got
        .iter()
        .map(|l| l["event"]["type"].as_str().expect("type"))
        .collect();
    assert_eq!(kinds, ["key.rotated", "key.destroyed"]);
    assert_eq!(got[0]["event"]["data"]["version"], 2);
    assert_eq!(
        got[0]["event"]["data"]["fingerprint"],
        v2.fingerprint.as_str()
    );
    assert_eq!(got[0]["event"]["data"]["state"], "active");
    assert_eq!(got[1]["event"]["data"]["version"], 1);
    assert_eq!(got[1]["event"]["data"]["state"], "destroyed");
    // A repeated erase of a destroyed version sends nothing more.
    admin
        .destroy_key(v1::DestroyKeyRequest { version: 1 })
        .await
        .expect("destroy again");
    assert_eq!(deliveries(&d, false).await.len(), 0);
    assert_eq!(deliveries(&d, true).await.len(), 2);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_record_is_reported_once_per_version() {
    let (_dir, receiver, s) = hooked(false).await;
    let d = &s.daemon;
    put_secrets(d).await;
    let past = tokenvault::unix_now() - 60;
    // An access token past its expiry, and a bundle past it with no refresh token.
    d.put(
        &meta("old", "github", SecretKind::AccessToken, past),
        b"at-old",
    )
    .await;
    let bundle = format!(r#"{{"access_token":"at-nb","expires_at":{past},"token_type":"Bearer"}}"#);
    d.put(
        &meta("nb", "github", SecretKind::TokenBundle, past),
        bundle.as_bytes(),
    )
    .await;
    for id in ["old", "old", "nb", "nb"] {
        let e = d.get(id).await.expect_err("expired");
        assert_eq!(e.code(), Code::FailedPrecondition, "{id}: {e:?}");
    }
    receiver
        .until("two record.expired", |l| {
            l.iter().filter(|l| l["answer"] == 204).count() >= 2
        })
        .await;
    // Asked again: nothing more is written.
    let _ = d.get("old").await;
    let _ = d.get("nb").await;
    assert!(deliveries(d, false).await.is_empty());
    let done = deliveries(d, true).await;
    assert_eq!(done.len(), 2, "{done:?}");
    let mut ids: Vec<String> = receiver
        .delivered()
        .iter()
        .map(|l| {
            assert_eq!(l["event"]["type"], "record.expired");
            assert_eq!(l["event"]["data"]["expires_at"], past);
            l["event"]["data"]["record_id"]
                .as_str()
                .expect("id")
                .to_string()
        })
        .collect();
    ids.sort();
    assert_eq!(ids, ["nb", "old"]);
    s.daemon.stop().await;
}
