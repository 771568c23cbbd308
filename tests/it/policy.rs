//! Per-caller policies: providers, owner prefixes, kinds, client IP allowlists and rate limits.

use crate::common;

use common::*;
use tokenvault::api::SealRecord as _;
use tokenvault::api::v1;
use tokenvault::config::{CallerPolicy, Config, CredentialEntry, Env, Role};
use tokenvault::record::{RecordMeta, SecretKind};
use tokenvault::secret::{ApiCredential, Secret};
use tonic::Code;

const RESTRICTED: &str = "tv_restricted_worker_credential";
const GH_INGEST: &str = "tv_github_only_ingest_credential";
const REMOTE_ADMIN: &str = "tv_remote_admin_credential";
const LOCAL_WORKER: &str = "tv_local_worker_credential";
const LIMITED: &str = "tv_rate_limited_worker_credential";

fn entry(name: &str, role: Role, cred: &str, policy: CallerPolicy) -> CredentialEntry {
    CredentialEntry {
        policy,
        ..CredentialEntry::for_credential(name, role, &ApiCredential::new(cred.into()))
    }
}

async fn start(dir: &std::path::Path) -> TestDaemon {
    TestDaemon::start_with(policy_config(dir)).await
}

/// The configuration of every daemon here: callers with restrictions of each kind.
fn policy_config(dir: &std::path::Path) -> Config {
    let mut cfg = config(dir);
    cfg.credentials.extend([
        entry(
            "restricted",
            Role::Worker,
            RESTRICTED,
            CallerPolicy {
                providers: vec!["github".into()],
                owner_prefixes: vec!["team-a/".into()],
                kinds: vec![SecretKind::AccessToken],
                ..CallerPolicy::default()
            },
        ),
        entry(
            "gh-ingest",
            Role::Ingest,
            GH_INGEST,
            CallerPolicy {
                providers: vec!["github".into()],
                ..CallerPolicy::default()
            },
        ),
        entry(
            "remote-admin",
            Role::Admin,
            REMOTE_ADMIN,
            CallerPolicy {
                allowed_ips: vec!["10.0.0.0/8".parse().expect("cidr")],
                ..CallerPolicy::default()
            },
        ),
        entry(
            "local-worker",
            Role::Worker,
            LOCAL_WORKER,
            CallerPolicy {
                allowed_ips: vec!["127.0.0.1/32".parse().expect("cidr")],
                ..CallerPolicy::default()
            },
        ),
        entry(
            "limited",
            Role::Worker,
            LIMITED,
            CallerPolicy {
                rate_per_second: Some(1),
                burst: Some(3),
                ..CallerPolicy::default()
            },
        ),
    ]);
    cfg
}

/// [`start`]'s daemon, its time on `clock`.
async fn start_on(dir: &std::path::Path, clock: &TestClock) -> TestDaemon {
    let config = policy_config(dir);
    let store = tokenvault::vault::open_store(&config).expect("store");
    TestDaemon::start_with_clock(config, store, clock).await
}

fn record(id: &str, owner: &str, provider: &str, kind: SecretKind) -> RecordMeta {
    RecordMeta::parse(id, owner, provider, kind, &[], 0).expect("valid")
}

#[tokio::test]
async fn record_policies_limit_what_a_caller_may_read_and_store() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = start(dir.path()).await;
    let sealer = d.sealer().await;
    let sealed = |m: &RecordMeta| v1::PutSealedRequest {
        record: Some(
            sealer
                .seal_record(m, &Secret::new(b"s".to_vec()))
                .expect("seal"),
        ),
        expected_version: 0,
    };
    let mut gh = d.ingest(GH_INGEST).await;
    gh.put_sealed(sealed(&record(
        "ok",
        "team-a/alice",
        "github",
        SecretKind::AccessToken,
    )))
    .await
    .expect("github allowed");
    let e = gh
        .put_sealed(sealed(&record(
            "slack",
            "team-a/alice",
            "slack",
            SecretKind::AccessToken,
        )))
        .await
        .expect_err("slack");
    assert_eq!(
        (e.code(), e.message()),
        (
            Code::PermissionDenied,
            "permission denied: provider slack is outside this caller's providers"
        )
    );
    for (id, owner, provider, kind) in [
        (
            "other-team",
            "team-b/bob",
            "github",
            SecretKind::AccessToken,
        ),
        (
            "refresh",
            "team-a/alice",
            "github",
            SecretKind::RefreshToken,
        ),
        ("slack", "team-a/alice", "slack", SecretKind::AccessToken),
    ] {
        d.put(&record(id, owner, provider, kind), b"s").await;
    }

    let mut restricted = d.broker(RESTRICTED).await;
    restricted
        .get_token(v1::GetTokenRequest { id: "ok".into() })
        .await
        .expect("in policy");
    let cases = [
        (
            "other-team",
            "permission denied: the record's owner is outside this caller's owner prefixes",
        ),
        (
            "refresh",
            "permission denied: kind refresh_token is outside this caller's kinds",
        ),
        (
            "slack",
            "permission denied: provider slack is outside this caller's providers",
        ),
    ];
    for (id, msg) in cases {
        let e = restricted
            .get_token(v1::GetTokenRequest { id: id.into() })
            .await
            .expect_err(id);
        assert_eq!(
            (e.code(), e.message()),
            (Code::PermissionDenied, msg),
            "{id}"
        );
        assert!(!e.message().contains("team-b"), "owner leaked");
    }
    // An unrestricted worker still reads everything.
    d.get("refresh").await.expect("unrestricted worker");
    d.stop().await;
}

#[tokio::test]
async fn ip_allowlists_and_rate_limits() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Rate limits run on this clock: the bucket refills when the test moves it, not with sleeps.
    let clock = TestClock::new();
    let d = start_on(dir.path(), &clock).await;
    d.put(&meta("r", "o"), b"s").await;
    let e = d
        .admin(REMOTE_ADMIN)
        .await
        .stats(v1::StatsRequest {})
        .await
        .expect_err("wrong network");
    assert_eq!(
        (e.code(), e.message()),
        (
            Code::PermissionDenied,
            "client address 127.0.0.1 is not allowed for credential 'remote-admin'"
        )
    );
    d.broker(LOCAL_WORKER)
        .await
        .get_token(v1::GetTokenRequest { id: "r".into() })
        .await
        .expect("allowed network");

    let mut limited = d.broker(LIMITED).await;
    // Burst of 3, then one per second: with the clock standing still, exactly 3 of 10 calls
    // succeed.
    let mut ok = 0u64;
    let mut refused = None;
    for _ in 0..10 {
        match limited
            .get_token(v1::GetTokenRequest { id: "r".into() })
            .await
        {
            Ok(_) => ok += 1,
            Err(e) => refused = Some(e),
        }
    }
    assert_eq!(ok, 3, "the burst, and nothing more while no time passes");
    let e = refused.expect("some calls were refused");
    assert_eq!(
        (e.code(), e.message()),
        (
            Code::ResourceExhausted,
            "credential 'limited' exceeded its rate limit of 1 requests/s"
        )
    );
    // No time is known when the bucket refills for this caller: a standard client must not
    // retry on its own.
    assert_eq!(pushback(&e).as_deref(), Some("-1"));
    // Other callers are unaffected, and the bucket refills.
    d.get("r").await.expect("other worker");
    clock.advance(1);
    limited
        .get_token(v1::GetTokenRequest { id: "r".into() })
        .await
        .expect("refilled");
    // One second refilled one token: the next call waits for the clock again.
    assert_eq!(
        limited
            .get_token(v1::GetTokenRequest { id: "r".into() })
            .await
            .expect_err("one token per second")
            .code(),
        Code::ResourceExhausted
    );
    // Every refusal is in the audit trail.
    let refusals: Vec<(String, String)> = d
        .audit_events(v1::AuditLogRequest::default())
        .await
        .into_iter()
        .filter(|ev| ev.action == "auth")
        .map(|ev| (ev.caller, ev.outcome))
        .collect();
    assert!(
        refusals.contains(&("remote-admin".into(), "PermissionDenied".into())),
        "{refusals:?}"
    );
    assert!(
        refusals.contains(&("limited".into(), "ResourceExhausted".into())),
        "{refusals:?}"
    );
    d.stop().await;
}

#[test]
fn policies_load_from_the_config_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("t.toml");
    let hash = "ab".repeat(32);
    let base = format!(
        "data_dir = \"d\"\nkey_dir = \"k\"\n[[credentials]]\nname = \"w\"\nrole = \"worker\"\nsha256 = \"{hash}\"\n"
    );
    std::fs::write(
        &path,
        format!("{base}providers = [\"github\"]\nowner_prefixes = [\"t/\"]\nkinds = [\"api_key\"]\nallowed_ips = [\"10.0.0.0/8\", \"::1\", \"192.0.2.7\"]\nrate_per_second = 20\nburst = 40\n"),
    )
    .expect("write");
    let c = Config::load(&path, &Env).expect("loads");
    let p = &c.credentials[0].policy;
    assert_eq!(
        (
            p.providers.clone(),
            p.kinds.clone(),
            p.rate_per_second,
            p.burst
        ),
        (
            vec!["github".to_string()],
            vec![SecretKind::ApiKey],
            Some(20),
            Some(40)
        )
    );
    assert!(
        p.allows_ip("10.1.2.3".parse().expect("ip"))
            && p.allows_ip("::1".parse().expect("ip"))
            && p.allows_ip("192.0.2.7".parse().expect("ip"))
    );
    assert!(!p.allows_ip("192.0.2.8".parse().expect("ip")));
    assert!(
        p.allows_ip("::ffff:10.0.0.1".parse().expect("ip")),
        "IPv4-mapped IPv6 matches the IPv4 range"
    );
    for (extra, msg) in [
        (
            "kinds = [\"password\"]\n",
            "credentials[0].kinds: kind must be one of",
        ),
        (
            "allowed_ips = [\"10.0.0.0/33\"]\n",
            "credentials[0].allowed_ips: each entry must be an IP or CIDR",
        ),
        (
            "rate_per_second = 0\n",
            "credentials[0].rate_per_second: must be at least 1",
        ),
    ] {
        std::fs::write(&path, format!("{base}{extra}")).expect("write");
        let err = Config::load(&path, &Env).expect_err(msg).to_string();
        assert!(err.starts_with(msg), "{err}");
    }
}

#[tokio::test]
async fn credentials_rotate_without_downtime() {
    // Old and new credential of the same caller are valid together during the overlap.
    let dir = tempfile::tempdir().expect("tempdir");
    let old = "tv_worker_credential_old_generation";
    let new = "tv_worker_credential_new_generation";
    let mut cfg = config(dir.path());
    cfg.credentials.push(CredentialEntry::for_credential(
        "billing",
        Role::Worker,
        &ApiCredential::new(old.into()),
    ));
    cfg.credentials.push(CredentialEntry::for_credential(
        "billing",
        Role::Worker,
        &ApiCredential::new(new.into()),
    ));
    let d = TestDaemon::start_with(cfg).await;
    d.put(&meta("r", "o"), b"s").await;
    for cred in [old, new] {
        d.broker(cred)
            .await
            .get_token(v1::GetTokenRequest { id: "r".into() })
            .await
            .expect(cred);
    }
    d.stop().await;
    // The old one removed: only the new one works.
    let mut cfg = config(dir.path());
    cfg.credentials.push(CredentialEntry::for_credential(
        "billing",
        Role::Worker,
        &ApiCredential::new(new.into()),
    ));
    let d = TestDaemon::start_with(cfg).await;
    d.broker(new)
        .await
        .get_token(v1::GetTokenRequest { id: "r".into() })
        .await
        .expect("new");
    let e = d
        .broker(old)
        .await
        .get_token(v1::GetTokenRequest { id: "r".into() })
        .await
        .expect_err("old retired");
    assert_eq!(e.code(), Code::Unauthenticated);
    d.stop().await;
}

#[tokio::test]
async fn per_record_rate_limits() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cred = "tv_per_record_limited_worker";
    let mut cfg = config(dir.path());
    cfg.credentials.push(entry(
        "per-record",
        Role::Worker,
        cred,
        CallerPolicy {
            record_rate_per_second: Some(1),
            ..CallerPolicy::default()
        },
    ));
    let d = TestDaemon::start_with(cfg).await;
    d.seed("r", 2).await;
    let mut w = d.broker(cred).await;
    let t0 = std::time::Instant::now();
    let mut ok = 0u64;
    let mut refused = None;
    for _ in 0..6 {
        match w.get_token(v1::GetTokenRequest { id: "r0".into() }).await {
            Ok(_) => ok += 1,
            Err(e) => refused = Some(e),
        }
    }
    let allowed = 1 + t0.elapsed().as_secs() + 1;
    assert!(
        (1..=allowed).contains(&ok),
        "{ok} of 6 succeeded, at most {allowed} allowed"
    );
    let e = refused.expect("some reads of r0 were refused");
    assert_eq!(
        (e.code(), e.message()),
        (
            Code::ResourceExhausted,
            "credential 'per-record' exceeded its rate limit of 1 requests/s for record r0"
        )
    );
    // Another record has its own bucket; another caller is unaffected.
    w.get_token(v1::GetTokenRequest { id: "r1".into() })
        .await
        .expect("other record");
    d.get("r0").await.expect("other caller");
    d.stop().await;
}

#[tokio::test]
async fn ipv6_allowlists_and_spoofed_forwarded_headers() {
    const V6_WORKER: &str = "tv_ipv6_only_worker_credential";
    const V4_WORKER: &str = "tv_ipv4_only_worker_credential";
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path());
    cfg.credentials.extend([
        entry(
            "v6-worker",
            Role::Worker,
            V6_WORKER,
            CallerPolicy {
                allowed_ips: vec!["::1/128".parse().expect("cidr")],
                ..CallerPolicy::default()
            },
        ),
        entry(
            "v4-worker",
            Role::Worker,
            V4_WORKER,
            CallerPolicy {
                allowed_ips: vec!["10.0.0.0/8".parse().expect("cidr")],
                ..CallerPolicy::default()
            },
        ),
    ]);
    // Over IPv6 loopback.
    let d = TestDaemon::start_on(cfg, "[::1]:0").await;
    d.put(&meta("r", "o"), b"s").await;
    d.broker(V6_WORKER)
        .await
        .get_token(v1::GetTokenRequest { id: "r".into() })
        .await
        .expect("::1 is allowed");
    // A client claiming, in headers, to come from an allowed address is judged by the TCP peer:
    // X-Forwarded-For, X-Real-IP and Forwarded are never trusted (no proxy is trusted).
    let mut req = tonic::Request::new(v1::GetTokenRequest { id: "r".into() });
    for (k, v) in [
        ("x-forwarded-for", "10.1.2.3"),
        ("x-real-ip", "10.1.2.3"),
        ("forwarded", "for=10.1.2.3"),
    ] {
        req.metadata_mut().insert(k, v.parse().expect("ascii"));
    }
    let e = d
        .broker(V4_WORKER)
        .await
        .get_token(req)
        .await
        .expect_err("spoofed header ignored");
    assert_eq!(
        (e.code(), e.message()),
        (
            Code::PermissionDenied,
            "client address ::1 is not allowed for credential 'v4-worker'"
        )
    );
}

/// The refusal summaries in the audit trail: `(detail)` of each `unauthenticated-refusals`
/// event.
async fn refusal_summaries(d: &TestDaemon) -> Vec<String> {
    d.audit_events(v1::AuditLogRequest::default())
        .await
        .into_iter()
        .filter(|e| e.action == "unauthenticated-refusals")
        .map(|e| {
            assert_eq!((e.caller.as_str(), e.outcome.as_str()), ("-", "summary"));
            e.detail
        })
        .collect()
}

/// Adds up `reason=count` over every summary of `source`.
fn summed(summaries: &[String], source: &str, reason: &str) -> u64 {
    summaries
        .iter()
        .filter_map(|d| d.strip_prefix(&format!("source {source} in ")))
        .flat_map(|d| d.split(' '))
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, _)| *k == reason)
        .map(|(_, v)| v.parse::<u64>().expect("a count"))
        .sum()
}

#[tokio::test]
async fn calls_without_a_valid_credential_write_nothing_are_throttled_and_summarized() {
    use tonic_types::StatusExt as _;
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(tmp.path());
    cfg.limits.refusals.per_second = 1;
    cfg.limits.refusals.burst = 5;
    // Long enough that no summary is written while the calls below are made.
    cfg.limits.refusal_summary = std::time::Duration::from_secs(3600);
    let d = TestDaemon::start_with(cfg).await;
    let before = d.audit_events(v1::AuditLogRequest::default()).await;

    let get = |cred: Option<&'static str>, header: Option<&'static str>| {
        let d = &d;
        async move {
            let mut req = tonic::Request::new(v1::GetTokenRequest { id: "r".into() });
            if let Some(h) = header {
                req.metadata_mut()
                    .insert("authorization", h.parse().expect("ascii"));
            }
            match cred {
                Some(c) => d.broker(c).await.get_token(req).await,
                None => {
                    v1::broker_client::BrokerClient::new(d.channel().await)
                        .get_token(req)
                        .await
                }
            }
        }
    };
    // Within the address's budget of 5 failures: each refused as what it is.
    for (header, message) in [
        (None, "missing credential"),
        (None, "missing credential"),
        (Some("Basic dXNlcjpwYXNz"), "malformed authorization header"),
        (Some("Bearer tv_wrong_1"), "invalid credential"),
        (Some("Bearer tv_wrong_2"), "invalid credential"),
    ] {
        let e = get(None, header).await.expect_err("refused");
        assert_eq!(e.code(), Code::Unauthenticated, "{header:?}");
        assert!(e.message().starts_with(message), "{}", e.message());
    }
    // Past it: refused with a retry hint, without telling whether it would match, and held
    // back for that long before it is answered.
    let started = std::time::Instant::now();
    let e = get(None, Some("Bearer tv_wrong_3"))
        .await
        .expect_err("throttled");
    let held = started.elapsed();
    assert_eq!(e.code(), Code::ResourceExhausted);
    assert!(
        e.message()
            .starts_with("too many refused requests from this address"),
        "{}",
        e.message()
    );
    let delay = e
        .get_details_retry_info()
        .and_then(|r| r.retry_delay)
        .expect("RetryInfo");
    assert!(
        delay >= std::time::Duration::from_millis(100)
            && delay <= std::time::Duration::from_secs(1),
        "{delay:?}"
    );
    assert!(
        held >= delay,
        "answered after {held:?}, before its retry time {delay:?}"
    );
    // The same time as gRPC's standard retry pushback, for clients that retry on their
    // service config alone.
    assert_eq!(
        pushback(&e),
        Some(delay.as_millis().to_string()),
        "{:?}",
        e.metadata()
    );
    // A configured caller from the same address is served all the same.
    assert_eq!(
        get(Some(WORKER), None)
            .await
            .expect_err("no such record")
            .code(),
        Code::NotFound
    );

    // Nothing of the refusals reached the audit trail: only the worker's call (and the
    // audit reads themselves, which are not refusals) came after `before`.
    let after = d.audit_events(v1::AuditLogRequest::default()).await;
    let new: Vec<(String, String)> = after[before.len()..]
        .iter()
        .map(|e| (e.caller.clone(), e.action.clone()))
        .collect();
    assert!(
        new.iter().all(|(caller, _)| caller != "-"),
        "refusals without a credential were written one by one: {new:?}"
    );
    assert!(
        new.contains(&("worker-1".into(), "GetToken".into())),
        "{new:?}"
    );
    assert!(refusal_summaries(&d).await.is_empty());

    // At shutdown the period's refusals are written as one summary per address.
    d.stop().await;
    // The same store, opened again.
    let d = TestDaemon::start(tmp.path()).await;
    let summaries = refusal_summaries(&d).await;
    assert_eq!(summaries.len(), 1, "{summaries:?}");
    assert_eq!(
        summaries[0],
        "source 127.0.0.1 in 3600s: missing_credential=2 malformed_credential=1 invalid_credential=2 throttled=1"
    );
    d.stop().await;
}

#[tokio::test]
async fn refusals_are_summarized_every_period() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(tmp.path());
    cfg.limits.refusal_summary = std::time::Duration::from_secs(1);
    let d = TestDaemon::start_with(cfg).await;
    for _ in 0..3 {
        d.broker("tv_not_a_credential")
            .await
            .get_token(v1::GetTokenRequest { id: "r".into() })
            .await
            .expect_err("refused");
    }
    // Written by the periodic job while the daemon runs: wait for it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let summaries = refusal_summaries(&d).await;
        if summed(&summaries, "127.0.0.1", "invalid_credential") == 3 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no summary of 3 refusals within 20 s: {summaries:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    d.stop().await;
}

/// Throttled refusals are held back until their retry time, at most `throttled_hold_max` at
/// once: past that they are answered at once, so holding them costs a bounded number of timers.
/// Requests that arrive before the address's last hint has passed double the hint, up to
/// `throttled_retry_max_seconds`.
#[tokio::test]
async fn throttled_refusals_are_held_back_at_most_hold_max_at_once() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(tmp.path());
    cfg.limits.refusals.per_second = 1;
    cfg.limits.refusals.burst = 1;
    cfg.limits.refusals.hold_max = 2;
    cfg.limits.refusals.retry_max = std::time::Duration::from_secs(2);
    let d = TestDaemon::start_with(cfg).await;
    let channel = d.channel().await;
    let call = || {
        let mut client = v1::broker_client::BrokerClient::new(channel.clone());
        async move {
            let started = std::time::Instant::now();
            let e = client
                .get_token(v1::GetTokenRequest { id: "r".into() })
                .await
                .expect_err("no credential");
            let hint =
                tonic_types::StatusExt::get_details_retry_info(&e).and_then(|r| r.retry_delay);
            (e.code(), started.elapsed(), hint)
        }
    };
    // The budget of one failure, then four at once past it.
    assert_eq!(call().await.0, Code::Unauthenticated);
    let mut calls = tokio::task::JoinSet::new();
    for _ in 0..4 {
        calls.spawn(call());
    }
    let answers = calls.join_all().await;
    assert!(
        answers
            .iter()
            .all(|(c, _, _)| *c == Code::ResourceExhausted),
        "{answers:?}"
    );
    // The retry time is 1 s at one failure a second; the three that came while an earlier
    // hint was running got it doubled, to the 2 s maximum.
    let mut hints: Vec<_> = answers.iter().map(|(_, _, h)| *h).collect();
    hints.sort();
    let s = std::time::Duration::from_secs;
    assert_eq!(hints, [Some(s(1)), Some(s(2)), Some(s(2)), Some(s(2))]);
    // Two were held for their hint, two were answered at once.
    let held = answers
        .iter()
        .filter(|(_, t, h)| h.is_some_and(|h| *t >= h))
        .count();
    let at_once = answers.iter().filter(|(_, t, _)| *t < s(1)).count();
    assert_eq!((held, at_once), (2, 2), "{answers:?}");
    d.stop().await;
}
