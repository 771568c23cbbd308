//! `tokenvault admin` against a real daemon process: rewrap of 10,000 records survives the
//! daemon being SIGKILLed mid-run, and `emergency-rotate` ends with a verification report.

use crate::common;

use std::path::Path;

use common::process::*;

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn status_counts(cwd: &Path, env: &[(&str, &str)]) -> String {
    let o = run(cwd, &["admin", "status"], env, None);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    stdout(&o)
}

#[test]
fn rewrap_of_10000_records_survives_sigkill_of_the_daemon() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cwd = tmp.path();
    // A fixed port, so the rewrap reconnects to the restarted daemon. Another test's listener
    // may take a free port between its pick and the daemon's bind: pick again then.
    let (listen, mut d) = (0..5)
        .find_map(|_| {
            let listen = format!("127.0.0.1:{}", free_port());
            std::panic::catch_unwind(|| serve_dev_on(cwd, &listen))
                .ok()
                .map(|d| (listen, d))
        })
        .expect("a daemon on a free port");
    seed_records(&d, 10_000);
    let env: Vec<(String, String)> = d
        .env()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let o = run(cwd, &["admin", "rotate"], &env_ref, None);
    assert!(
        stdout(&o).starts_with("active    v2"),
        "{}{}",
        stdout(&o),
        stderr(&o)
    );

    // Rate-limited so the kill lands mid-run.
    let mut rewrap = cmd(cwd);
    rewrap
        .args([
            "admin",
            "rewrap",
            "--quiet",
            "--max-per-second",
            "2000",
            "--wait",
            "120",
        ])
        .envs(env_ref.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let rewrap = rewrap.spawn().expect("spawn rewrap");
    // Kill it once the run is seen under way (some records on v2), not after a fixed time.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let status = status_counts(cwd, &env_ref);
        let moved = status
            .lines()
            .find_map(|l| l.trim().strip_prefix("v2: "))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0);
        if moved > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no progress: {status}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    d.child.kill().expect("SIGKILL the daemon");
    d.child.wait().expect("reap");
    let mid = {
        // The store is readable offline: some, not all, records moved.
        let store = tokenvault::store::RocksStore::open(&cwd.join("data"), 1 << 20).expect("open");
        tokenvault::store::RecordStore::stats(&store)
            .expect("stats")
            .per_key_version
    };
    assert!(
        mid.iter().any(|(v, n)| *v == 2 && *n > 0) && mid.iter().any(|(v, n)| *v == 1 && *n > 0),
        "killed mid-run: {mid:?}"
    );
    assert_eq!(
        mid.iter().map(|(_, n)| n).sum::<u64>(),
        10_000,
        "no record lost: {mid:?}"
    );

    // Same address: the waiting CLI reconnects and the run resumes from the stored cursor.
    let d = serve_dev_on(cwd, &listen);
    let out = rewrap.wait_with_output().expect("rewrap finishes");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stdout(&out).contains("to v2"), "{}", stdout(&out));
    assert!(
        stderr(&out).contains("daemon unavailable"),
        "the CLI says it waited: {}",
        stderr(&out)
    );
    let status = status_counts(cwd, &env_ref);
    assert!(
        status.contains("records per key version:\n  v2: 10000\n"),
        "{status}"
    );
    for i in [0, 4321, 9999] {
        let o = run(cwd, &["get", &format!("rec-{i:05}")], &env_ref, None);
        assert_eq!(o.stdout, format!("tok-{i}").as_bytes(), "{}", stderr(&o));
    }
    d.terminate();
}

#[test]
fn emergency_rotate_ends_with_a_verification_report() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cwd = tmp.path();
    let d = serve_dev(cwd);
    seed_records(&d, 500);
    let env = d.env();
    // A second, older version left decrypt-only by an earlier routine rotation.
    run(cwd, &["admin", "rotate"], &env, None);
    let o = run(cwd, &["admin", "emergency-rotate", "--quiet"], &env, None);
    let out = stdout(&o);
    assert_eq!(o.status.code(), Some(0), "{out}{}", stderr(&o));
    assert!(out.contains("1/4 rotated: v3"), "{out}");
    assert!(
        out.contains("VERIFIED: all 500 record(s) are wrapped under v3"),
        "{out}"
    );
    // Both older versions open nothing and wait out the destruction period (erased when due,
    // which lifecycle::rotate_rewrap_retire_destroy checks on the vault's clock).
    assert!(
        out.contains("v1  pending-destruction") && out.contains("v2  pending-destruction"),
        "{out}"
    );
    assert!(
        out.contains("4/4 v2 opens nothing; its destruction is scheduled for "),
        "{out}"
    );
    assert_eq!(
        run(cwd, &["get", "rec-00042"], &env, None).stdout,
        b"tok-42"
    );
    // Refusals carry precise exit codes.
    assert_exit(
        &run(cwd, &["admin", "retire", "3"], &env, None),
        6,
        "key version 3 is active",
    );
    assert_exit(
        &run(cwd, &["admin", "destroy", "7"], &env, None),
        3,
        "no key version 7",
    );
    let worker_only = [
        ("TOKENVAULT_ADMIN_TOKEN", d.cred("TOKENVAULT_WORKER_TOKEN")),
        ("TOKENVAULT_ADDR", d.addr.clone()),
    ];
    let worker_only: Vec<(&str, &str)> =
        worker_only.iter().map(|(k, v)| (*k, v.as_str())).collect();
    assert_exit(
        &run(cwd, &["admin", "rotate"], &worker_only, None),
        4,
        "PermissionDenied",
    );

    // Importing a key through the Admin API: decrypted locally, sent only to loopback or TLS.
    let enc = root()
        .join("keys/test/fixture-a.key.encrypted.pem")
        .to_string_lossy()
        .into_owned();
    let mut with_pass = env.clone();
    with_pass.push(("TOKENVAULT_IMPORT_PASSPHRASE", "fixture-passphrase"));
    let o = run(
        cwd,
        &["admin", "rotate", "--import-private", &enc],
        &with_pass,
        None,
    );
    assert!(
        stdout(&o).starts_with("active    v4"),
        "{}{}",
        stdout(&o),
        stderr(&o)
    );
    let remote = [
        ("TOKENVAULT_ADDR", "http://192.0.2.10:50051"),
        ("TOKENVAULT_ADMIN_TOKEN", "x"),
        ("TOKENVAULT_IMPORT_PASSPHRASE", "fixture-passphrase"),
    ];
    assert_exit(
        &run(
            cwd,
            &["admin", "rotate", "--import-private", &enc],
            &remote,
            None,
        ),
        5,
        "refusing to send a private key in plaintext",
    );

    let o = run(cwd, &["admin", "audit", "verify"], &env, None);
    assert!(
        stdout(&o).starts_with("audit chain intact:"),
        "{}{}",
        stdout(&o),
        stderr(&o)
    );
    let o = run(
        cwd,
        &["admin", "audit", "list", "--record", "rec-00042"],
        &env,
        None,
    );
    assert!(
        stdout(&o).contains("action=GetToken outcome=ok"),
        "{}",
        stdout(&o)
    );
    let addr = d.addr.clone();
    let creds = d.creds.clone();
    d.terminate();

    // Tamper with one stored event while the daemon is down; `audit verify` names it. Beside
    // it, an intact copy of the chain as another instance's (as `store copy` brings them from
    // a shared database) and a copy with one event removed: every chain is checked and
    // reported, a broken one does not stop the check of the others.
    let intact_events = {
        use tokenvault::store::prelude::*;
        let store = tokenvault::store::RocksStore::open(&cwd.join("data"), 1 << 20).expect("open");
        let intact = store.audit_events(1, 1_000_000).expect("events");
        let mut copies = tokenvault::store::Import::default();
        for (seq, raw) in &intact {
            copies.audit.push(("b-intact".into(), *seq, raw.clone()));
            if *seq != 3 {
                copies.audit.push(("c-gap".into(), *seq, raw.clone()));
            }
        }
        store.import(&copies).expect("import other chains");
        let (seq, mut raw) = tokenvault::store::AuditLog::audit_events(&store, 2, 1)
            .expect("events")
            .remove(0);
        let n = raw.len() - 40;
        raw[n] ^= 0x01;
        tokenvault::store::TestHooks::dangerous_overwrite_audit(&store, seq, &raw).expect("tamper");
        intact.len()
    };
    let d = serve_dev_on(cwd, addr.trim_start_matches("http://"));
    let mut env: Vec<(&str, &str)> = creds
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    env.push(("TOKENVAULT_ADDR", addr.as_str()));
    let o = run(cwd, &["admin", "audit", "verify"], &env, None);
    assert_exit(
        &o,
        6,
        "2 of 3 audit chains broken: audit chain broken at event 2",
    );
    assert!(
        stderr(&o).contains("chain of instance c-gap: audit chain broken at event 3: missing"),
        "{}",
        stderr(&o)
    );
    assert!(
        stdout(&o).contains(&format!(
            "audit chain of instance b-intact intact: {} event(s)",
            intact_events
        )),
        "{}",
        stdout(&o)
    );
    let o = run(cwd, &["admin", "audit", "verify", "--json"], &env, None);
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> = stdout(&o)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    let intact: Vec<(&str, bool)> = lines
        .iter()
        .map(|l| {
            (
                l["instance"].as_str().expect("instance"),
                l["intact"].as_bool().expect("intact"),
            )
        })
        .collect();
    assert_eq!(
        intact,
        [("", false), ("b-intact", true), ("c-gap", false)],
        "{lines:?}"
    );
    d.terminate();
}
