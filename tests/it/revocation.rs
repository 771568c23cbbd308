//! Revocation at the provider (docs/WEBHOOKS.md) against Authlib's RFC 7009 revocation
//! endpoint and an unlink call of Kakao's kind, both served on 127.0.0.1 by a Flask app, with
//! the records revoked or deleted through Admin and the outcomes read from the provider's
//! state, the audit trail and a webhook receiver.

use crate::common;
use crate::proxy::{Setup, meta, put_bundle, setup_with};
use crate::webhooks::{Receiver, put_secrets};

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::upstream::CLIENT_SECRET;
use common::{ADMIN, TestDaemon};
use tokenvault::api::v1;
use tokenvault::record::SecretKind;
use tonic::Code;

/// The Flask app; killed when dropped.
struct Provider {
    child: std::process::Child,
    port: u16,
    state: PathBuf,
    control: PathBuf,
}

impl Drop for Provider {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Provider {
    /// Serves revocation for these grants (access token, refresh token).
    fn start(dir: &Path, grants: &[(&str, &str)]) -> Self {
        let python = std::env::var("TOKENVAULT_TEST_PYTHON")
            .unwrap_or_else(|_| panic!("TOKENVAULT_TEST_PYTHON is not set: run ./scripts/test"));
        let control = dir.join("provider-control");
        std::fs::create_dir_all(&control).expect("control");
        let (port_file, state) = (dir.join("provider.port"), dir.join("provider.json"));
        let child = std::process::Command::new(python)
            .arg(common::process::root().join("tests/it/revocation_provider.py"))
            .arg(&port_file)
            .arg(&state)
            .arg(&control)
            .arg("tv-client")
            .arg(CLIENT_SECRET)
            .args(grants.iter().map(|(a, r)| format!("{a},{r}")))
            .spawn()
            .expect("start the provider");
        let deadline = Instant::now() + Duration::from_secs(30);
        let port = loop {
            if let Ok(text) = std::fs::read_to_string(&port_file) {
                break text.trim().parse().expect("port");
            }
            assert!(Instant::now() < deadline, "the provider did not start");
            std::thread::sleep(Duration::from_millis(20));
        };
        Self {
            child,
            port,
            state,
            control,
        }
    }

    fn state(&self) -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(&self.state).expect("state")).expect("json")
    }

    fn set(&self, flag: &str, on: bool) {
        let path = self.control.join(flag);
        if on {
            std::fs::write(path, b"").expect("flag");
        } else {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Waits until `done` holds for the provider's state.
    async fn until(&self, what: &str, done: impl Fn(&serde_json::Value) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let state = self.state();
            if done(&state) {
                return;
            }
            assert!(Instant::now() < deadline, "{what}: {state}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The `[providers]` additions: RFC 7009 for github, and a `kakao` provider whose unlink
    /// call is the default.
    fn toml(&self) -> String {
        format!(
            r#"
[providers.github.revocation]
endpoint = "http://127.0.0.1:{port}/oauth/revoke"
kind = "rfc7009"

[providers.kakao]
base_url = "http://127.0.0.1:{port}/v2"
allow_plain_http = true
allowed_networks = ["127.0.0.0/8"]
[providers.kakao.revocation]
endpoint = "http://127.0.0.1:{port}/v1/user/unlink"
kind = "unlink"
by_default = true
"#,
            port = self.port
        )
    }
}

fn has(list: &serde_json::Value, token: &str) -> bool {
    list.as_array()
        .is_some_and(|l| l.iter().any(|t| t.as_str() == Some(token)))
}

async fn audited(d: &TestDaemon, outcome_prefix: &str) -> usize {
    d.audit_events(v1::AuditLogRequest::default())
        .await
        .iter()
        .filter(|e| e.action == "RevokeAtProvider" && e.outcome.starts_with(outcome_prefix))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grants_are_revoked_at_the_provider_retried_refused_and_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    let grants = [
        ("at-b", "rt-b"),
        ("at-c", "rt-c"),
        ("at-e", "rt-e"),
        ("at-k", "-"),
        ("at-k2", "-"),
    ];
    let provider = Provider::start(dir.path(), &grants);
    let receiver = Receiver::start(dir.path(), false);
    let extra = provider.toml() + &receiver.toml("");
    let Setup {
        tmp: _tmp,
        provider: _upstream,
        daemon: d,
        ..
    } = setup_with(|_| extra.clone()).await;
    put_secrets(&d).await;
    let far = tokenvault::unix_now() + 3600;
    for (id, (at, rt)) in [("b", grants[0]), ("c", grants[1]), ("e", grants[2])] {
        put_bundle(&d, id, "github", (at, rt), far).await;
    }
    for (id, token) in [("k", "at-k"), ("k2", "at-k2")] {
        d.put(
            &meta(id, "kakao", SecretKind::AccessToken, 0),
            token.as_bytes(),
        )
        .await;
    }
    let mut admin = d.admin(ADMIN).await;

    // RFC 7009: the refresh token (which withdraws the grant), with client_secret_basic.
    admin
        .delete(v1::DeleteRequest {
            id: "b".into(),
            revoke_at_provider: Some(true),
        })
        .await
        .expect("delete");
    assert_eq!(
        d.get("b").await.expect_err("deleted at once").code(),
        Code::NotFound
    );
    provider
        .until("rt-b revoked", |s| has(&s["revoked"], "rt-b"))
        .await;

    // A provider that is down: retried until it answers.
    provider.set("down", true);
    let calls = provider.state()["calls"].as_u64().expect("calls");
    admin
        .revoke(v1::RevokeRequest {
            id: "c".into(),
            revoke_at_provider: Some(true),
        })
        .await
        .expect("revoke");
    // One whole attempt failed: the first call and the provider client's two retries.
    provider
        .until("an attempt while down", |s| {
            s["calls"].as_u64() >= Some(calls + 3)
        })
        .await;
    assert!(!has(&provider.state()["revoked"], "rt-c"));
    provider.set("down", false);
    provider
        .until("rt-c revoked once the provider is back", |s| {
            has(&s["revoked"], "rt-c")
        })
        .await;

    // A refusal is final: audited, and a webhook.
    provider.set("refuse", true);
    admin
        .delete(v1::DeleteRequest {
            id: "e".into(),
            revoke_at_provider: Some(true),
        })
        .await
        .expect("delete");
    receiver
        .until("record.provider_revocation_failed", |l| {
            l.iter()
                .any(|l| l["event"]["type"] == "record.provider_revocation_failed")
        })
        .await;
    provider.set("refuse", false);
    let failed = receiver
        .delivered()
        .into_iter()
        .find(|l| l["event"]["type"] == "record.provider_revocation_failed")
        .expect("event");
    assert_eq!(failed["event"]["data"]["record_id"], "e");
    assert_eq!(
        failed["event"]["data"]["reason"],
        "the provider answered HTTP 401"
    );
    assert!(!has(&provider.state()["revoked"], "rt-e"));

    // Kakao's unlink is the provider's default; a request can say no.
    let calls = provider.state()["calls"].as_u64().expect("calls");
    admin
        .delete(v1::DeleteRequest {
            id: "k2".into(),
            revoke_at_provider: Some(false),
        })
        .await
        .expect("delete without");
    admin
        .delete(v1::DeleteRequest {
            id: "k".into(),
            revoke_at_provider: None,
        })
        .await
        .expect("delete by default");
    provider
        .until("at-k unlinked", |s| has(&s["unlinked"], "at-k"))
        .await;
    let state = provider.state();
    assert!(!has(&state["unlinked"], "at-k2"), "{state}");
    assert_eq!(state["calls"].as_u64(), Some(calls + 1), "{state}");

    // Asked where it cannot happen: refused, nothing changed.
    d.put(&meta("n", "narrow", SecretKind::AccessToken, 0), b"at-n")
        .await;
    d.put(&meta("key", "github", SecretKind::ApiKey, 0), b"k")
        .await;
    for id in ["n", "key"] {
        let e = admin
            .revoke(v1::RevokeRequest {
                id: id.into(),
                revoke_at_provider: Some(true),
            })
            .await
            .expect_err("not revocable");
        assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
        assert!(
            e.message().contains("cannot be revoked at its provider"),
            "{e:?}"
        );
        assert!(d.get(id).await.is_ok(), "{id} is unchanged");
    }

    // The CLI asks the same and gets the refusal as its exit code.
    let addr = format!("http://{}", d.addr);
    let o = tokio::task::spawn_blocking(move || {
        let cwd = tempfile::tempdir().expect("cwd");
        common::process::run(
            cwd.path(),
            &["revoke", "n", "--revoke-at-provider"],
            &[
                ("TOKENVAULT_ADMIN_TOKEN", ADMIN),
                ("TOKENVAULT_ADDR", &addr),
            ],
            None,
        )
    })
    .await
    .expect("join");
    common::process::assert_exit(&o, 6, "cannot be revoked at its provider");
    assert!(d.get("n").await.is_ok(), "n is unchanged");

    // Each outcome is in the audit trail; no token is, nor in any webhook body.
    assert_eq!(audited(&d, "ok").await, 3);
    assert_eq!(
        audited(&d, "refused: the provider answered HTTP 401").await,
        1
    );
    let events = d.audit_events(v1::AuditLogRequest::default()).await;
    let bodies: Vec<String> = receiver
        .delivered()
        .iter()
        .map(|l| l["raw"].as_str().unwrap_or_default().to_string())
        .collect();
    for (at, rt) in grants {
        for token in [at, rt].into_iter().filter(|t| *t != "-") {
            assert!(
                !events
                    .iter()
                    .any(|e| e.detail.contains(token) || e.outcome.contains(token)),
                "{token} in the audit trail"
            );
            assert!(
                !bodies.iter().any(|b| b.contains(token)),
                "{token} in a webhook"
            );
        }
    }
    d.stop().await;
}

/// An unlink callback to the daemon: `(status, JSON answer)`.
async fn unlink(
    d: &TestDaemon,
    method: &str,
    path: &str,
    key: Option<&str>,
    form: &str,
) -> (u16, serde_json::Value) {
    let mut headers = Vec::new();
    if let Some(k) = key {
        headers.push(("authorization", format!("KakaoAK {k}")));
    }
    let (path, body) = if method == "GET" {
        (format!("{path}?{form}"), Vec::new())
    } else {
        headers.push((
            "content-type",
            "application/x-www-form-urlencoded".to_string(),
        ));
        (path.to_string(), form.as_bytes().to_vec())
    };
    let (status, _, bytes) = common::http_call(d.addr, method, &path, &headers, body).await;
    (status, serde_json::from_slice(&bytes).expect("JSON"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_providers_unlink_callback_deletes_that_users_records_and_forgeries_change_nothing() {
    const KEY: &str = "kakao-admin-key-0123456789";
    let extra = r#"
[providers.kakao]
base_url = "http://127.0.0.1:9/v2"
allow_plain_http = true
[providers.kakao.unlink_callback]
admin_key_record = "kakao-admin-key"
app_id = "1234"
owner_prefix = "kakao:"

[providers.kakaoprod]
base_url = "http://127.0.0.1:9/v2"
allow_plain_http = true
[providers.kakaoprod.unlink_callback]
admin_key_record = "kakao-admin-key"
app_id = "1234"
allowed_sources = ["10.0.0.0/8"]
"#;
    let Setup {
        tmp: _tmp,
        provider: _upstream,
        daemon: d,
        ..
    } = setup_with(|_| extra.to_string()).await;
    let record = |id: &str, owner: &str, provider: &str| {
        tokenvault::record::RecordMeta::parse(id, owner, provider, SecretKind::AccessToken, &[], 0)
            .expect("meta")
    };
    d.put(
        &meta("kakao-admin-key", "kakao", SecretKind::ClientSecret, 0),
        KEY.as_bytes(),
    )
    .await;
    for (id, owner, provider) in [
        ("k1", "kakao:42", "kakao"),
        ("k2", "kakao:42", "kakao"),
        ("g1", "kakao:42", "github"),
        ("k3", "kakao:43", "kakao"),
    ] {
        d.put(&record(id, owner, provider), b"at").await;
    }
    let path = "/v1/providers/kakao/unlink";
    let form = "app_id=1234&user_id=42&referrer_type=UNLINK_FROM_APPS";
    let trail = d.audit_events(v1::AuditLogRequest::default()).await.len();
    // Forgeries: refused, nothing written (not even an audit event).
    for (method, path, key, form, status) in [
        ("POST", path, Some("wrong-key"), form, 401),
        ("POST", path, None, form, 401),
        ("POST", path, Some(KEY), "app_id=9999&user_id=42", 401),
        ("POST", "/v1/providers/github/unlink", Some(KEY), form, 404),
        (
            "POST",
            "/v1/providers/kakaoprod/unlink",
            Some(KEY),
            form,
            403,
        ),
        ("POST", path, Some(KEY), "app_id=1234", 400),
    ] {
        let (got, answer) = unlink(&d, method, path, key, form).await;
        assert_eq!(got, status, "{path} {key:?} {form}: {answer}");
        assert!(!answer.to_string().contains(KEY), "{answer}");
    }
    assert_eq!(
        d.audit_events(v1::AuditLogRequest::default()).await.len(),
        trail,
        "a refused callback writes nothing"
    );
    for id in ["k1", "k2", "g1", "k3"] {
        assert!(d.get(id).await.is_ok(), "{id} untouched");
    }
    // The provider's own call: that user's records of that provider, in one audited write.
    let minute = tokenvault::unix_now() / 60;
    let (status, answer) = unlink(&d, "POST", path, Some(KEY), form).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer, serde_json::json!({"revoked": 0, "deleted": 2}));
    for id in ["k1", "k2"] {
        assert_eq!(d.get(id).await.expect_err("deleted").code(), Code::NotFound);
    }
    assert!(d.get("g1").await.is_ok(), "another provider's record stays");
    assert!(d.get("k3").await.is_ok(), "another user's record stays");
    // A replay within the minute is refused and changes nothing. The daemon reads the wall
    // clock, so a run that crossed a minute's end sees the later minute's answer instead: the
    // call is applied again and finds nothing left to do.
    let (status, answer) = unlink(&d, "POST", path, Some(KEY), form).await;
    let refused = (status, answer["code"].as_str()) == (409, Some("ALREADY_EXISTS"));
    let crossed = tokenvault::unix_now() / 60 != minute;
    let applied_again =
        crossed && (status, &answer) == (200, &serde_json::json!({"revoked": 0, "deleted": 0}));
    assert!(refused || applied_again, "{status} {answer}");
    // Kakao may also call with GET and the parameters in the query.
    let (status, answer) = unlink(
        &d,
        "GET",
        path,
        Some(KEY),
        "app_id=1234&user_id=43&referrer_type=UNLINK_FROM_ADMIN",
    )
    .await;
    assert_eq!((status, answer["deleted"].as_u64()), (200, Some(1)));
    let events = d.audit_events(v1::AuditLogRequest::default()).await;
    let callbacks: Vec<&v1::AuditEvent> = events
        .iter()
        .filter(|e| e.action == "UnlinkCallback")
        .collect();
    assert_eq!(
        callbacks.len(),
        2 + usize::from(applied_again),
        "{events:?}"
    );
    assert_eq!(callbacks[0].caller, "unlink-callback:kakao");
    assert!(
        callbacks[0].detail.contains("UNLINK_FROM_APPS"),
        "{callbacks:?}"
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| e.action == "Delete" && e.caller == "unlink-callback:kakao")
            .count(),
        3
    );
    assert!(!events.iter().any(|e| e.detail.contains(KEY)));
    d.stop().await;
}
