//! The operator path with the `tokenvault` binary as operators run it: records needing
//! re-authorization listed (`--json`), the audit trail verified and listed, the metrics parsed
//! by the Prometheus Python client's OpenMetrics parser, an export taken while the daemon runs
//! and imported into another vault that serves it, refused imports that change nothing, and
//! systemd's readiness, watchdog and stopping notifications.

use crate::common;

use std::path::Path;
use std::process::Command;

use common::process::*;

fn python() -> String {
    std::env::var("TOKENVAULT_TEST_PYTHON").unwrap_or_else(|_| {
        panic!(
            "TOKENVAULT_TEST_PYTHON is not set: run ./scripts/test, or set it to the \
             interpreter `scripts/pyenv` prints"
        )
    })
}

fn json_lines(out: &std::process::Output) -> Vec<serde_json::Value> {
    assert!(out.status.success(), "{}", stderr(out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

fn seal(cwd: &Path, env: &[(&str, &str)], id: &str, secret: &[u8]) {
    assert_exit(
        &run(cwd, &seal_args(id, "user-1"), env, Some(secret)),
        0,
        "",
    );
}

/// The exposition as the Prometheus Python client's strict OpenMetrics parser reads it:
/// `{name: (type, unit, [(sample name, labels, value)])}`.
fn parse_metrics(body: &str) -> serde_json::Value {
    let program = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for f in text_string_to_metric_families(sys.stdin.read()):
    out[f.name] = [f.type, f.unit, [[s.name, s.labels, s.value] for s in f.samples]]
print(json.dumps(out))
"#;
    let mut child = Command::new(python())
        .args(["-c", program])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python");
    std::io::Write::write_all(&mut child.stdin.take().expect("stdin"), body.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("python");
    assert!(
        out.status.success(),
        "the OpenMetrics parser refused the exposition: {}\n{body}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

#[test]
fn records_audit_metrics_export_and_import_as_an_operator_runs_them() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cwd = tmp.path().join("a");
    std::fs::create_dir_all(&cwd).expect("dir");
    let d = serve_dev(&cwd);
    let env = d.env();
    for (id, secret) in [
        ("ops-1", "tok-one"),
        ("ops-2", "tok-two"),
        ("ops-3", "tok-three"),
    ] {
        seal(&cwd, &env, id, secret.as_bytes());
    }
    assert_exit(&run(&cwd, &["get", "nope"], &env, None), 3, "no record");

    // Records, as JSON lines.
    let records = json_lines(&run(&cwd, &["admin", "records", "--json"], &env, None));
    assert_eq!(records.len(), 3);
    assert_eq!(records[0]["id"], "ops-1");
    assert_eq!(records[0]["state"], "usable");
    assert_eq!(records[0]["kind"], "access_token");
    assert!(records[0].get("envelope").is_none());
    assert!(
        json_lines(&run(
            &cwd,
            &["admin", "records", "--state", "needs-reauth", "--json"],
            &env,
            None
        ))
        .is_empty()
    );
    let text = run(&cwd, &["admin", "records", "--limit", "2"], &env, None);
    assert_eq!(String::from_utf8_lossy(&text.stdout).lines().count(), 2);
    assert_exit(
        &run(
            &cwd,
            &["admin", "records", "--provider", "Bad Provider"],
            &env,
            None,
        ),
        5,
        "invalid provider",
    );
    assert_exit(
        &run(
            &cwd,
            &["admin", "records", "--key-version", "0"],
            &env,
            None,
        ),
        2,
        "--key-version",
    );
    assert_exit(
        &run(
            &cwd,
            &["admin", "records", "--state", "sleeping"],
            &env,
            None,
        ),
        2,
        "possible values",
    );
    let worker_only: Vec<(&str, &str)> = env
        .iter()
        .filter(|(k, _)| *k != "TOKENVAULT_ADMIN_TOKEN")
        .copied()
        .collect();
    assert_exit(
        &run(&cwd, &["admin", "records"], &worker_only, None),
        4,
        "TOKENVAULT_ADMIN_TOKEN",
    );
    let mut wrong = worker_only.clone();
    wrong.push((
        "TOKENVAULT_ADMIN_TOKEN",
        "tv_not_the_admin_credential_0123456789ab",
    ));
    assert_exit(
        &run(&cwd, &["admin", "records"], &wrong, None),
        4,
        "Unauthenticated",
    );
    // A stale version: the CLI names the current one (from the structured detail).
    let mut stale = seal_args("ops-1", "user-1");
    stale.extend(["--expected-version", "7"]);
    assert_exit(
        &run(&cwd, &stale, &env, Some(b"x")),
        6,
        "current version 1; pass --expected-version 1",
    );

    // The audit trail, verified and listed as JSON lines.
    let verified = json_lines(&run(
        &cwd,
        &["admin", "audit", "verify", "--json"],
        &env,
        None,
    ));
    assert_eq!(verified.len(), 1);
    assert_eq!(verified[0]["intact"], true);
    assert!(verified[0]["events"].as_u64().expect("events") >= 4);
    let events = json_lines(&run(
        &cwd,
        &["admin", "audit", "list", "--json"],
        &env,
        None,
    ));
    assert!(
        events
            .iter()
            .any(|e| e["action"] == "GetToken" && e["outcome"] == "NotFound")
    );
    assert!(
        events
            .iter()
            .all(|e| e["hash"].as_str().map(str::len) == Some(64))
    );
    assert_exit(
        &run(&cwd, &["admin", "audit", "prune"], &env, None),
        6,
        "no [audit] retention_days",
    );

    // Metrics: OpenMetrics a real parser accepts, with the conventions scrapers expect.
    let (content_type, body) = scrape_metrics(&d.stdout_seen);
    assert_eq!(
        content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let m = parse_metrics(&body);
    let family = |name: &str| {
        m.get(name).unwrap_or_else(|| {
            let names: Vec<_> = m.as_object().expect("object").keys().collect();
            panic!("{name} not in {names:?}")
        })
    };
    for (name, kind) in [
        ("tokenvault_rpc_requests", "counter"),
        ("tokenvault_rpc_duration_seconds", "histogram"),
        ("tokenvault_auth_denials", "counter"),
        ("tokenvault_dek_cache_hits", "counter"),
        ("tokenvault_dek_cache_misses", "counter"),
        ("tokenvault_dek_cache_entries", "gauge"),
        ("tokenvault_rocksdb_block_cache_capacity_bytes", "gauge"),
        ("tokenvault_rocksdb_estimated_records", "gauge"),
        ("tokenvault_active_key_version", "gauge"),
        ("tokenvault_build", "info"),
        ("process_cpu_seconds", "counter"),
        ("process_resident_memory_bytes", "gauge"),
        ("process_open_fds", "gauge"),
        ("process_max_fds", "gauge"),
        ("process_start_time_seconds", "gauge"),
    ] {
        assert_eq!(family(name)[0], kind, "{name}");
    }
    assert_eq!(
        family("tokenvault_rocksdb_block_cache_capacity_bytes")[1],
        "bytes"
    );
    let samples = family("tokenvault_rpc_requests")[2]
        .as_array()
        .expect("samples")
        .clone();
    let codes: std::collections::BTreeSet<String> = samples
        .iter()
        .map(|s| s[1]["code"].as_str().expect("code").to_string())
        .collect();
    assert!(codes.contains("OK") && codes.contains("NOT_FOUND") && codes.contains("ABORTED"));
    assert!(
        samples
            .iter()
            .all(|s| s[0] == "tokenvault_rpc_requests_total")
    );
    let build = &family("tokenvault_build")[2][0];
    assert_eq!(build[0], "tokenvault_build_info");
    assert_eq!(build[1]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        build[1]["fips"],
        if cfg!(feature = "fips") {
            "true"
        } else {
            "false"
        }
    );
    assert!(
        family("process_resident_memory_bytes")[2][0][2]
            .as_f64()
            .expect("rss")
            > 1e6
    );
    assert_eq!(
        family("tokenvault_auth_denials")[2][0][1]["code"],
        "UNAUTHENTICATED"
    );
    assert!(!body.contains("tok-one") && !body.contains("ops-1"));

    // An export while the daemon runs: JSON lines, no private key, no plaintext.
    let export = tmp.path().join("export.jsonl");
    let export_s = export.to_str().expect("utf-8");
    let from = format!("rocksdb:{}", cwd.join("data").display());
    let out = run(
        &cwd,
        &["admin", "export", "--from", &from, "--out", export_s],
        &[],
        None,
    );
    assert_exit(&out, 0, "");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("exported"),
        "{out:?}"
    );
    let text = std::fs::read_to_string(&export).expect("export");
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    assert_eq!(lines[0]["format"], "tokenvault-export");
    assert_eq!(lines[1]["type"], "key");
    assert!(
        lines[1]["spki_pem"]
            .as_str()
            .expect("pem")
            .contains("BEGIN PUBLIC KEY")
    );
    assert_eq!(lines.iter().filter(|l| l["type"] == "record").count(), 3);
    assert_eq!(lines.last().expect("end")["type"], "end");
    for needle in ["PRIVATE KEY", "tok-one", "tok-two"] {
        assert!(!text.contains(needle), "the export holds {needle}");
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&export).expect("meta").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    assert_exit(
        &run(
            &cwd,
            &["admin", "export", "--from", &from, "--out", export_s],
            &[],
            None,
        ),
        5,
        "File exists",
    );
    assert_exit(
        &run(
            &cwd,
            &["admin", "export", "--from", "mysql://x", "--out", "/tmp/x"],
            &[],
            None,
        ),
        5,
        "must be rocksdb:PATH or postgres://",
    );
    let (status, _) = d.terminate();
    assert!(status.success());

    // Refused imports into an empty vault: each names its line and writes nothing.
    let other = tmp.path().join("b");
    std::fs::create_dir_all(other.join("keys")).expect("dir");
    copy_dir(&cwd.join("keys"), &other.join("keys"));
    let to = format!("rocksdb:{}", other.join("data").display());
    let bad = tmp.path().join("bad.jsonl");
    let bad_s = bad.to_str().expect("utf-8");
    let all: Vec<&str> = text.lines().collect();
    let flip_envelope = {
        let mut record: serde_json::Value = serde_json::from_str(all[2]).expect("record");
        let env = record["envelope"].as_str().expect("envelope").to_string();
        let mut bytes = base64_decode(&env);
        let n = bytes.len() - 3;
        bytes[n] ^= 1;
        record["envelope"] = base64_encode(&bytes).into();
        record.to_string()
    };
    for (content, needle) in [
        (
            all[..all.len() - 1].join("\n") + "\n",
            "line 6: the file ends without its \"end\" line",
        ),
        (format!("{}\n", all[..3].join("\n")), "truncated"),
        (
            [&[all[0], all[1], flip_envelope.as_str()][..], &all[3..]]
                .concat()
                .join("\n")
                + "\n",
            "altered",
        ),
        (
            [&[all[0], all[1], all[3], all[2]][..], &all[4..]]
                .concat()
                .join("\n")
                + "\n",
            "out of id order",
        ),
        (
            "{\"format\":\"other\"}\n".to_string(),
            "line 1: not a tokenvault export",
        ),
        ("not json\n".to_string(), "line 1: not JSON"),
        (
            text.replacen("\"version\":1}", "\"version\":9}", 1),
            "export format version 9",
        ),
        (
            text.replacen("\"key_version\":1", "\"key_version\":4", 1),
            "key_version 4 is not in the export's keys",
        ),
        ("x".repeat(2 << 20), "longer than 1 MiB"),
    ] {
        std::fs::write(&bad, content).expect("write");
        eprintln!("import case: {needle}");
        assert_exit(
            &run(
                &other,
                &["admin", "import", "--in", bad_s, "--to", &to],
                &[],
                None,
            ),
            5,
            needle,
        );
    }
    assert_exit(
        &run(
            &other,
            &["admin", "import", "--in", "/no/such/file", "--to", &to],
            &[],
            None,
        ),
        5,
        "--in /no/such/file",
    );
    // The good one goes in whole; twice is refused.
    let out = run(
        &other,
        &["admin", "import", "--in", export_s, "--to", &to],
        &[],
        None,
    );
    assert_exit(&out, 0, "");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("imported into rocksdb:"),
        "{out:?}"
    );
    assert_exit(
        &run(
            &other,
            &["admin", "import", "--in", export_s, "--to", &to],
            &[],
            None,
        ),
        6,
        "already holds record ops-1",
    );
    // The other vault serves the imported records with the same private keys.
    let d2 = serve_dev(&other);
    let env2 = d2.env();
    let got = run(&other, &["get", "ops-2"], &env2, None);
    assert_exit(&got, 0, "");
    assert_eq!(got.stdout, b"tok-two");
    assert_eq!(
        json_lines(&run(&other, &["admin", "records", "--json"], &env2, None)).len(),
        3
    );
    d2.terminate();

    // A vault with another key registry refuses the export.
    let third = tmp.path().join("c");
    std::fs::create_dir_all(&third).expect("dir");
    serve_dev(&third).terminate();
    let to3 = format!("rocksdb:{}", third.join("data").display());
    assert_exit(
        &run(
            &third,
            &["admin", "import", "--in", export_s, "--to", &to3],
            &[],
            None,
        ),
        6,
        "key version 1: the target's key registry holds another key",
    );
}

fn copy_dir(from: &Path, to: &Path) {
    for e in std::fs::read_dir(from).expect("read_dir") {
        let e = e.expect("entry");
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            std::fs::create_dir_all(&target).expect("dir");
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).expect("copy");
        }
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(s)
        .expect("base64")
}

fn base64_encode(b: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(b)
}

#[test]
fn systemd_hears_ready_watchdog_and_stopping() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cwd = tmp.path();
    let socket_path = cwd.join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).expect("bind");
    socket
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    let notify = socket_path.to_str().expect("utf-8");
    let d = serve_dev_with(
        cwd,
        "127.0.0.1:0",
        &[("NOTIFY_SOCKET", notify), ("WATCHDOG_USEC", "200000")],
    );
    let mut buf = [0u8; 256];
    let mut next = || {
        let n = socket.recv(&mut buf).expect("a notification within 10 s");
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    assert_eq!(next(), "READY=1");
    // Pings at half the interval while the daemon runs.
    assert_eq!(next(), "WATCHDOG=1");
    assert_eq!(next(), "WATCHDOG=1");
    let pid = d.child.id();
    let (status, _) = d.terminate();
    assert!(status.success());
    let mut seen = Vec::new();
    while let Ok(n) = socket.recv(&mut buf) {
        seen.push(String::from_utf8_lossy(&buf[..n]).to_string());
        if seen.last().is_some_and(|s| s == "STOPPING=1") {
            break;
        }
    }
    assert!(
        seen.iter().any(|s| s == "STOPPING=1"),
        "{seen:?} from {pid}"
    );
    // A WATCHDOG_PID naming another process: no pings for this one (READY still).
    let cwd2 = tmp.path().join("two");
    std::fs::create_dir_all(&cwd2).expect("dir");
    let d = serve_dev_with(
        &cwd2,
        "127.0.0.1:0",
        &[
            ("NOTIFY_SOCKET", notify),
            ("WATCHDOG_USEC", "100000"),
            ("WATCHDOG_PID", "1"),
        ],
    );
    let mut seen = Vec::new();
    socket
        .set_read_timeout(Some(std::time::Duration::from_millis(600)))
        .expect("timeout");
    while let Ok(n) = socket.recv(&mut buf) {
        seen.push(String::from_utf8_lossy(&buf[..n]).to_string());
    }
    assert_eq!(seen, ["READY=1"]);
    d.terminate();
}

/// CPU time the process has used, in seconds (utime + stime from /proc).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("stat")
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15; fields[0] is field 3. Clock ticks are 100/s.
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    ticks as f64 / 100.0
}

#[test]
fn accept_loops_back_off_when_out_of_file_descriptors() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cwd = tmp.path();
    // Few file descriptors, so a few dozen connections use them up.
    let mut command = Command::new("prlimit");
    command
        .args([
            "--nofile=96:96",
            BIN,
            "serve",
            "--dev",
            "--listen",
            "127.0.0.1:0",
        ])
        .current_dir(cwd);
    let (mut child, addr, seen) = spawn_command(cwd, command);
    let metrics = seen
        .lines()
        .find_map(|l| l.strip_prefix("metrics: http://"))
        .and_then(|u| u.strip_suffix("/metrics"))
        .expect("metrics address")
        .to_string();
    // Connections the daemon must accept until it cannot: the rest wait in the backlog and
    // every accept fails with EMFILE, on the gRPC and on the metrics listener.
    let mut held = Vec::new();
    for _ in 0..120 {
        held.push(std::net::TcpStream::connect(&addr).expect("connect gRPC"));
        held.push(std::net::TcpStream::connect(&metrics).expect("connect metrics"));
    }
    let log = cwd.join("daemon.log");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("accepting a connection failed; backing off")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no accept failure logged"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // While accept fails, the loops wait (10 ms doubling to 1 s) instead of spinning, which
    // would burn a core: two seconds of it use a small fraction of a second of CPU.
    let pid = child.id();
    let before = cpu_seconds(pid);
    std::thread::sleep(std::time::Duration::from_secs(2));
    let used = cpu_seconds(pid) - before;
    assert!(
        used < 0.5,
        "the daemon used {used:.2} s of CPU in 2 s while out of descriptors"
    );
    // Once descriptors are free again it serves.
    drop(held);
    let env: Vec<(String, String)> = std::fs::read_to_string(cwd.join("data/dev-credentials.env"))
        .expect("creds")
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    // The file names the address the daemon is listening on: sourcing it is all a client needs.
    // (Only the address is shown on failure: the file's other lines are credentials.)
    let recorded: Vec<&String> = env
        .iter()
        .filter(|(k, _)| k == "TOKENVAULT_ADDR")
        .map(|(_, v)| v)
        .collect();
    assert_eq!(recorded, [&format!("http://{addr}")]);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_exit(
        &run(cwd, &["get", "nope"], &env, None),
        3,
        "no record with id nope",
    );
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    assert!(child.wait().expect("wait").success());
}
