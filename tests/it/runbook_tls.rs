//! docs/ROTATION.md's routine and emergency procedures, run with the `tokenvault` CLI against a
//! daemon configured like deploy/tokenvault.toml: TLS on both listeners, a passphrase-protected
//! keyring, the web tier on its own ingest port with a bearer credential, and the security
//! team's admin and a worker admitted by client certificate only. Then every way the TLS setup
//! can be wrong on the client side, each refused with a clear message and its exit code.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Child;

use common::pki::{ca, expired_leaf, leaf};
use common::process::*;
use common::{INGEST, WORKER};

/// Environment variables for one CLI run.
type EnvVars = Vec<(&'static str, String)>;

const PASSPHRASE: &str = "correct horse battery staple";

/// deploy/tokenvault.toml with loopback addresses and temp paths, and a second worker whose
/// rate limit is 1 call a second (to see the rate-limit exit code).
fn production_config(dir: &Path) -> PathBuf {
    let toml = format!(
        r#"listen = "127.0.0.1:0"
ingest_listen = "127.0.0.1:0"
data_dir = "data"
key_dir = "keys"
block_cache_mb = 16
log = "info"
log_format = "json"
lock_memory = true
shutdown_grace_seconds = 1

[limits]
max_request_bytes = 4194304
max_batch = 1000

[keys]
ingest_grace_seconds = 86400
auto_rotate_days = 90

[audit]
retention_days = 400
sink_file = "audit.jsonl"
sink_max_mb = 100
sink_keep_files = 10

[tls]
cert_file = "server.pem"
key_file = "server.key"
client_ca_file = "clients-ca.pem"
require_client_cert = false

[[credentials]]
name = "web-tier"
role = "ingest"
sha256 = "{ingest}"
allowed_ips = ["127.0.0.0/8"]
rate_per_second = 500
burst = 1000

[[credentials]]
name = "billing-worker"
role = "worker"
mtls_identity = "billing-worker.internal"
providers = ["github"]
kinds = ["access_token", "token_bundle"]
allowed_ips = ["127.0.0.0/8"]
rate_per_second = 200
record_rate_per_second = 20

[[credentials]]
name = "slow-worker"
role = "worker"
sha256 = "{worker}"
rate_per_second = 1
burst = 1

[[credentials]]
name = "security-team"
role = "admin"
mtls_identity = "secteam.internal"
allowed_ips = ["127.0.0.0/8"]

[providers.github]
base_url = "https://api.github.com"
allowed_methods = ["GET", "POST", "PATCH"]
allowed_path_prefixes = ["/user", "/repos/"]
timeout_ms = 10000
max_concurrency = 64
"#,
        ingest = sha256_hex(INGEST),
        worker = sha256_hex(WORKER),
    );
    let path = dir.join("tokenvault.toml");
    write(dir, "tokenvault.toml", &toml, 0o640);
    path
}

struct Daemon {
    child: Child,
    main: String,
    ingest: String,
}

impl Daemon {
    fn start(dir: &Path, env: &[(&str, &str)]) -> Self {
        let (child, main, seen) = spawn_daemon(dir, &["serve", "--config", "tokenvault.toml"], env);
        let ingest = seen
            .lines()
            .find_map(|l| l.trim().strip_prefix("ingest only: listening on "))
            .expect("ingest listener")
            .to_string();
        Self {
            child,
            main: format!("https://{main}"),
            ingest: format!("https://{ingest}"),
        }
    }

    fn stop(mut self) {
        let pid = self.child.id().to_string();
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .expect("kill");
        assert!(self.child.wait().expect("wait").success());
    }
}

fn env_of<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    v.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

fn out(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn ok(o: &std::process::Output) -> String {
    assert_eq!(o.status.code(), Some(0), "{}{}", out(o), stderr(o));
    out(o)
}

#[test]
fn the_runbook_runs_over_mutual_tls_and_bad_tls_setups_are_refused() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path();
    let pki = ca("tokenvault deployment CA");
    let (server_cert, server_key) = leaf(&pki, &["tokenvault.internal"], "tokenvault.internal");
    write(dir, "server.pem", &server_cert, 0o644);
    write(dir, "server.key", &server_key, 0o600);
    let ca_file = write(dir, "ca.pem", &pki.ca_pem, 0o644);
    write(dir, "clients-ca.pem", &pki.ca_pem, 0o644);
    let (c, k) = leaf(&pki, &["secteam.internal"], "secteam.internal");
    let admin_cert = write(dir, "secteam.pem", &c, 0o644);
    let admin_key = write(dir, "secteam.key", &k, 0o600);
    let (c, k) = leaf(
        &pki,
        &["billing-worker.internal"],
        "billing-worker.internal",
    );
    let worker_cert = write(dir, "worker.pem", &c, 0o644);
    let worker_key = write(dir, "worker.key", &k, 0o600);
    production_config(dir);
    let passfile = write(dir, "key-passphrase", PASSPHRASE, 0o600);

    // deploy/README.md step 2: the first key version, offline, with the passphrase file.
    let pass_env = [("TOKENVAULT_KEY_PASSPHRASE_FILE", passfile.as_str())];
    ok(&run(
        dir,
        &["keys", "init", "--config", "tokenvault.toml"],
        &pass_env,
        None,
    ));
    let key_pem = std::fs::read_to_string(dir.join("keys/v0001.key.pem")).expect("key file");
    assert!(key_pem.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----"));
    let d = Daemon::start(dir, &pass_env);

    let tls = |addr: &str| -> Vec<(&'static str, String)> {
        vec![
            ("TOKENVAULT_ADDR", addr.to_string()),
            ("TOKENVAULT_CA_FILE", ca_file.clone()),
            ("TOKENVAULT_SERVER_NAME", "tokenvault.internal".to_string()),
        ]
    };
    let as_refs = |v: &[(&'static str, String)]| -> Vec<(&'static str, String)> { v.to_vec() };

    let mut web = tls(&d.ingest);
    web.push(("TOKENVAULT_INGEST_TOKEN", INGEST.to_string()));
    let mut admin = tls(&d.main);
    admin.push(("TOKENVAULT_CLIENT_CERT", admin_cert.clone()));
    admin.push(("TOKENVAULT_CLIENT_KEY", admin_key.clone()));
    let mut worker = tls(&d.main);
    worker.push(("TOKENVAULT_CLIENT_CERT", worker_cert.clone()));
    worker.push(("TOKENVAULT_CLIENT_KEY", worker_key.clone()));

    // The web tier seals through the ingest port, over TLS with its bearer credential.
    for i in 0..20 {
        let o = run(
            dir,
            &[
                "seal",
                "--id",
                &format!("gh:{i:02}"),
                "--owner",
                "u",
                "--provider",
                "github",
                "--kind",
                "access_token",
            ],
            &env_of(&web),
            Some(format!("gho_runbook_{i:02}").as_bytes()),
        );
        ok(&o);
    }

    // Routine rotation (docs/ROTATION.md), the admin authenticated by certificate only.
    let admin_env = env_of(&admin);
    assert!(ok(&run(dir, &["admin", "rotate"], &admin_env, None)).starts_with("active    v2"));
    ok(&run(dir, &["admin", "rewrap", "--quiet"], &admin_env, None));
    let status = ok(&run(dir, &["admin", "status"], &admin_env, None));
    assert!(
        status.contains("records per key version:\n  v2: 20\n"),
        "{status}"
    );
    ok(&run(dir, &["admin", "retire", "1"], &admin_env, None));
    let destroy = ok(&run(dir, &["admin", "destroy", "1"], &admin_env, None));
    assert!(
        destroy.starts_with("v1  pending-destruction")
            && destroy.contains("destruction of v1 scheduled for "),
        "{destroy}"
    );
    assert!(
        dir.join("keys/v0001.key.pem").exists(),
        "erased only when the waiting period is over"
    );
    let cancelled = ok(&run(
        dir,
        &["admin", "cancel-destroy", "1"],
        &admin_env,
        None,
    ));
    assert!(cancelled.starts_with("v1  retired"), "{cancelled}");
    ok(&run(dir, &["admin", "destroy", "1"], &admin_env, None));
    // The worker, by certificate, still reads every record.
    let o = run(dir, &["get", "gh:07"], &env_of(&worker), None);
    assert_eq!(o.stdout, b"gho_runbook_07", "{}", stderr(&o));

    // Emergency rotation.
    let report = ok(&run(
        dir,
        &["admin", "emergency-rotate", "--quiet"],
        &admin_env,
        None,
    ));
    assert!(
        report.contains("VERIFIED: all 20 record(s) are wrapped under v3"),
        "{report}"
    );
    assert!(report.contains("v2  pending-destruction"), "{report}");
    let o = run(dir, &["get", "gh:19"], &env_of(&worker), None);
    assert_eq!(o.stdout, b"gho_runbook_19", "{}", stderr(&o));
    let verify = ok(&run(dir, &["admin", "audit", "verify"], &admin_env, None));
    assert!(verify.starts_with("audit chain intact:"), "{verify}");
    let list = ok(&run(
        dir,
        &["admin", "audit", "list", "--record", "gh:19"],
        &admin_env,
        None,
    ));
    assert!(
        list.contains("caller=billing-worker action=GetToken outcome=ok"),
        "{list}"
    );

    // Everything that can be wrong on the client side: exit code and message.
    let other = ca("some other CA");
    let other_ca = write(dir, "other-ca.pem", &other.ca_pem, 0o644);
    let (c, k) = expired_leaf(&pki, &["secteam.internal"], "secteam.internal");
    let expired_cert = write(dir, "expired.pem", &c, 0o644);
    let expired_key = write(dir, "expired.key", &k, 0o600);
    let (c, k) = leaf(&other, &["secteam.internal"], "secteam.internal");
    let foreign_cert = write(dir, "foreign.pem", &c, 0o644);
    let foreign_key = write(dir, "foreign.key", &k, 0o600);
    let loose_key = write(
        dir,
        "loose.key",
        &std::fs::read_to_string(&admin_key).expect("key"),
        0o644,
    );
    let with = |base: &Vec<(&'static str, String)>, changes: &[(&'static str, &str)]| {
        let mut v = as_refs(base);
        for (k, val) in changes {
            v.retain(|(name, _)| name != k);
            if !val.is_empty() {
                v.push((k, val.to_string()));
            }
        }
        v
    };
    let cases: Vec<(EnvVars, i32, &str)> = vec![
        // No certificate and no bearer credential.
        (
            with(
                &admin,
                &[
                    ("TOKENVAULT_CLIENT_CERT", ""),
                    ("TOKENVAULT_CLIENT_KEY", ""),
                ],
            ),
            4,
            "no credential: set TOKENVAULT_ADMIN_TOKEN",
        ),
        // An expired client certificate, and one signed by another CA: the daemon refuses it.
        (
            with(
                &admin,
                &[
                    ("TOKENVAULT_CLIENT_CERT", &expired_cert),
                    ("TOKENVAULT_CLIENT_KEY", &expired_key),
                ],
            ),
            4,
            "the daemon refused the TLS connection",
        ),
        (
            with(
                &admin,
                &[
                    ("TOKENVAULT_CLIENT_CERT", &foreign_cert),
                    ("TOKENVAULT_CLIENT_KEY", &foreign_key),
                ],
            ),
            4,
            "the daemon refused the TLS connection",
        ),
        // A certificate and a key that do not belong together.
        (
            with(&admin, &[("TOKENVAULT_CLIENT_KEY", &foreign_key)]),
            5,
            "do --client-cert and --client-key belong together",
        ),
        // The daemon's certificate, checked against the wrong CA, or for the wrong name.
        (
            with(&admin, &[("TOKENVAULT_CA_FILE", &other_ca)]),
            4,
            "the daemon's TLS certificate was not accepted",
        ),
        (
            with(&admin, &[("TOKENVAULT_SERVER_NAME", "")]),
            4,
            "the daemon's TLS certificate was not accepted",
        ),
        // A CA file or client key that does not exist.
        (
            with(&admin, &[("TOKENVAULT_CA_FILE", "/nonexistent/ca.pem")]),
            5,
            "--ca-file /nonexistent/ca.pem",
        ),
        (
            with(
                &admin,
                &[("TOKENVAULT_CLIENT_KEY", "/nonexistent/client.key")],
            ),
            5,
            "--client-key /nonexistent/client.key",
        ),
        // A client key others can read.
        (
            with(&admin, &[("TOKENVAULT_CLIENT_KEY", &loose_key)]),
            5,
            "is readable by group or others (mode 644); chmod 600 it",
        ),
        // TLS options with a plaintext address.
        (
            with(
                &admin,
                &[("TOKENVAULT_ADDR", &d.main.replace("https://", "http://"))],
            ),
            5,
            "need an https:// address",
        ),
        // The worker's certificate is not an admin.
        (
            with(
                &admin,
                &[
                    ("TOKENVAULT_CLIENT_CERT", &worker_cert),
                    ("TOKENVAULT_CLIENT_KEY", &worker_key),
                ],
            ),
            4,
            "PermissionDenied",
        ),
    ];
    for (env, code, needle) in &cases {
        let o = run(dir, &["admin", "status"], &env_of(env), None);
        assert_exit(&o, *code, needle);
        assert!(o.stdout.is_empty(), "{}", out(&o));
    }
    // A rate-limited call has its own exit code, distinct from invalid input.
    let mut slow = tls(&d.main);
    slow.push(("TOKENVAULT_WORKER_TOKEN", WORKER.to_string()));
    let runs: Vec<std::process::Output> = (0..3)
        .map(|_| run(dir, &["get", "gh:01"], &env_of(&slow), None))
        .collect();
    let limited = runs
        .iter()
        .find(|o| o.status.code() == Some(8))
        .unwrap_or_else(|| {
            panic!(
                "no call was rate limited: {:?}",
                runs.iter().map(|o| o.status.code()).collect::<Vec<_>>()
            )
        });
    assert_exit(limited, 8, "ResourceExhausted");
    assert!(
        stderr(limited).contains("rate limit"),
        "{}",
        stderr(limited)
    );
    // Nothing refused changed anything: still 20 records, all under v3.
    let status = ok(&run(dir, &["admin", "status"], &admin_env, None));
    assert!(
        status.contains("records per key version:\n  v3: 20\n"),
        "{status}"
    );
    d.stop();
    let log = std::fs::read_to_string(dir.join("daemon.log")).expect("log");
    assert!(!log.contains("gho_runbook_"), "a token reached the log");
    assert!(!log.contains(PASSPHRASE));
}
