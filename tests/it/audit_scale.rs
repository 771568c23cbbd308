//! `tokenvault admin audit verify` on a large trail: it checks the chain event by event as the
//! daemon streams it, so its memory does not grow with the trail. Measured as the CLI
//! process's peak RSS (`/usr/bin/time -f %M`) on a small and a ten times larger trail.
//! TOKENVAULT_AUDIT_EVENTS sets the larger size (default 200,000; the README's figure is
//! from 1,000,000).

use crate::common;

use std::path::Path;
use std::sync::Arc;

use common::process::*;
use tokenvault::audit::{Auditor, Draft};
use tokenvault::store::{RocksStore, TokenStore};

/// Appends `n` events to the dev daemon's trail in `cwd` (the daemon stopped).
fn grow_trail(cwd: &Path, n: u64) {
    let store: Arc<dyn TokenStore> =
        Arc::new(RocksStore::open(&cwd.join("data"), 8 << 20).expect("store"));
    let audit = Auditor::open(Arc::clone(&store), &cwd.join("keys/dev")).expect("auditor");
    let drafts: Vec<Draft> = (0..5000)
        .map(|i| {
            Draft::new("dev-worker", "GetToken")
                .record(&format!("rec-{i}"))
                .detail("v1")
        })
        .collect();
    for _ in 0..n / 5000 {
        audit
            .append_all_with(&drafts, |appends| {
                store
                    .append_audit_batch(appends, false)
                    .map(|()| ((), true))
            })
            .expect("append");
    }
}

/// Runs `admin audit verify --json` against the dev daemon in `cwd`: (events, peak RSS in KiB).
fn verify(cwd: &Path) -> (u64, u64) {
    let d = serve_dev(cwd);
    let out = std::process::Command::new("/usr/bin/time")
        .args([
            "-f",
            "maxrss_kib=%M",
            BIN,
            "admin",
            "audit",
            "verify",
            "--json",
        ])
        .envs(d.env())
        .current_dir(cwd)
        .output()
        .expect("/usr/bin/time (scripts/bootstrap installs it)");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{err}");
    let line: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("one JSON line for the one chain");
    assert_eq!(line["intact"], true, "{line}");
    let rss = err
        .lines()
        .find_map(|l| l.strip_prefix("maxrss_kib="))
        .and_then(|v| v.trim().parse().ok())
        .expect("peak RSS");
    d.terminate();
    (line["events"].as_u64().expect("events"), rss)
}

#[test]
fn verifying_a_large_trail_takes_flat_memory() {
    let large: u64 = std::env::var("TOKENVAULT_AUDIT_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let tmp = tempfile::tempdir().expect("tempdir");
    let cwd = tmp.path();
    // Creates the dev keyring and store, then stops.
    serve_dev(cwd).terminate();
    grow_trail(cwd, large / 10);
    let (small_events, small_rss) = verify(cwd);
    grow_trail(cwd, large - large / 10);
    let started = std::time::Instant::now();
    let (large_events, large_rss) = verify(cwd);
    let elapsed = started.elapsed();
    assert!(large_events >= large && large_events > small_events * 9);
    eprintln!(
        "audit verify: {small_events} events in {small_rss} KiB peak; {large_events} events in {large_rss} KiB peak, {:.1} s with the daemon's start",
        elapsed.as_secs_f64()
    );
    // Holding the events would cost ~300 bytes each: 54 MiB more for the default sizes.
    assert!(
        large_rss < small_rss + 16 * 1024,
        "peak RSS grew from {small_rss} KiB to {large_rss} KiB with the trail"
    );
}
