//! The `tokenvault` binary as users run it: `serve --dev`, the client verbs and `keys`, with
//! exit codes and messages; and a scan of everything the daemon wrote (logs, RocksDB files) for
//! plaintext tokens.

use crate::common;

use common::process::*;
#[test]
fn walkthrough_exit_codes_and_no_plaintext_token_anywhere() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cwd = tmp.path();
    let d = serve_dev(cwd);
    assert!(d.stdout_seen.contains("DEVELOPMENT"), "{}", d.stdout_seen);
    // Core dumps are off for the daemon process: secrets never reach a core file.
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", d.child.id())).expect("limits");
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .expect("core line");
    assert_eq!(
        core.split_whitespace().collect::<Vec<_>>()[4..6],
        ["0", "0"],
        "{core}"
    );
    // Memory is locked where the OS allows it, and a clear warning says so where it does not.
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.child.id())).expect("status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .unwrap_or_default()
    };
    let may_lock = u64::from_str_radix(&field("CapEff:"), 16).is_ok_and(|c| c & (1 << 14) != 0);
    let log = std::fs::read_to_string(&d.log).expect("log");
    if may_lock {
        assert!(log.contains("memory locked"), "{log}");
        let locked_kb: u64 = field("VmLck:")
            .trim_end_matches(" kB")
            .trim()
            .parse()
            .expect("VmLck");
        assert!(locked_kb > 0, "VmLck {locked_kb} kB");
    } else {
        assert!(log.contains("memory NOT locked"), "{log}");
    }
    let env = d.env();
    let tokens = [
        "gho_LEAKCHECK_aaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "ya29.LEAKCHECK_bbbbbbbbbbbbbbbbbbbbbbb",
        "xoxb-LEAKCHECK-cccccccccccccccccccc",
    ];
    for (i, t) in tokens.iter().enumerate() {
        let id = format!("rec-{i}");
        let mut args = seal_args(&id, "user-7");
        args.push("--trim-newline");
        let o = run(cwd, &args, &env, Some(format!("{t}\n").as_bytes()));
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        assert!(String::from_utf8_lossy(&o.stdout).contains(&format!("stored {id} version 1")));
    }
    // Sealing with an explicit public key file exported by the CLI works too.
    let o = run(cwd, &["get", "rec-0", "--info"], &env, None);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(o.stdout, tokens[0].as_bytes());
    assert!(stderr(&o).contains("kind=access_token"));

    // The ingest credential cannot read a token back.
    let ingest = d.cred("TOKENVAULT_INGEST_TOKEN");
    let o = run(
        cwd,
        &["get", "rec-1"],
        &[
            ("TOKENVAULT_WORKER_TOKEN", &ingest),
            ("TOKENVAULT_ADDR", &d.addr),
        ],
        None,
    );
    assert_exit(&o, 4, "PermissionDenied");
    assert!(o.stdout.is_empty());
    // Unknown credential, unknown record, invalid input, revoked, deleted.
    let o = run(
        cwd,
        &["get", "rec-1"],
        &[
            ("TOKENVAULT_WORKER_TOKEN", "tv_wrong"),
            ("TOKENVAULT_ADDR", &d.addr),
        ],
        None,
    );
    assert_exit(&o, 4, "Unauthenticated");
    let o = run(
        cwd,
        &["get", "rec-1"],
        &[("TOKENVAULT_ADDR", &d.addr)],
        None,
    );
    assert_exit(&o, 4, "no credential: set TOKENVAULT_WORKER_TOKEN");
    assert_exit(
        &run(cwd, &["get", "nope"], &env, None),
        3,
        "no record with id nope",
    );
    assert_exit(
        &run(cwd, &seal_args("bad id", "u"), &env, Some(b"t")),
        5,
        "record id contains a character outside",
    );
    assert_exit(
        &run(cwd, &seal_args("rec-9", "u"), &env, Some(b"")),
        5,
        "the secret is empty",
    );
    let mut trimmed = seal_args("rec-9", "u");
    trimmed.push("--trim-newline");
    assert_exit(
        &run(cwd, &trimmed, &env, Some(b"\r\n")),
        5,
        "the secret is empty",
    );
    assert_exit(
        &run(cwd, &seal_args("rec-0", "u"), &env, Some(b"dup")),
        6,
        "already exists",
    );
    assert_exit(&run(cwd, &["revoke", "rec-1"], &env, None), 0, "");
    assert_exit(
        &run(cwd, &["get", "rec-1"], &env, None),
        6,
        "record rec-1 is revoked",
    );
    assert_exit(&run(cwd, &["delete", "rec-2"], &env, None), 0, "");
    assert_exit(&run(cwd, &["get", "rec-2"], &env, None), 3, "no record");
    assert_exit(&run(cwd, &["delete", "rec-2"], &env, None), 3, "no record");
    // Offline key commands refuse while the daemon holds the store.
    assert_exit(
        &run(cwd, &["keys", "list", "--dev"], &[], None),
        6,
        "in use by another tokenvault process",
    );

    // The dev daemon serves Prometheus metrics on the port it printed.
    let (_, metrics) = scrape_metrics(&d.stdout_seen);
    for line in [
        "tokenvault_rpc_requests_total{method=\"/tokenvault.v1.Broker/GetToken\",code=\"OK\"} 1",
        "tokenvault_rpc_requests_total{method=\"/tokenvault.v1.Broker/GetToken\",code=\"NOT_FOUND\"} 2",
        "tokenvault_rpc_requests_total{method=\"/tokenvault.v1.Ingest/PutSealed\",code=\"OK\"} 3",
        "tokenvault_auth_denials_total{code=\"PERMISSION_DENIED\"} 1",
        "tokenvault_auth_denials_total{code=\"UNAUTHENTICATED\"} 1",
        "tokenvault_rsa_unwrap_duration_seconds_count 1",
        "tokenvault_active_key_version 1",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    assert!(metrics.contains("tokenvault_rocksdb_block_cache_capacity_bytes "));
    for t in tokens {
        assert!(!metrics.contains(t));
    }
    for id in ["rec-0", "user-7"] {
        assert!(!metrics.contains(id), "metrics name a record or owner");
    }

    // Secrets are stored byte for byte: trailing CR/LF stays unless --trim-newline is given,
    // which removes exactly one line ending.
    for (id, input, trim, stored) in [
        ("nl-kept", &b"tok\r\n"[..], false, &b"tok\r\n"[..]),
        ("nl-lf", b"tok\n", false, b"tok\n"),
        ("nl-trim-one", b"tok\r\n\n", true, b"tok\r\n"),
        ("nl-trim-crlf", b"tok\r\n", true, b"tok"),
        ("nl-cr-only", b"tok\r", true, b"tok\r"),
    ] {
        let mut args = seal_args(id, "u");
        if trim {
            args.push("--trim-newline");
        }
        assert_exit(&run(cwd, &args, &env, Some(input)), 0, "");
        let o = run(cwd, &["get", id], &env, None);
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
        assert_eq!(o.stdout, stored, "{id}");
        assert_exit(&run(cwd, &["delete", id], &env, None), 0, "");
    }

    let (status, log) = d.terminate();
    assert!(
        status.success(),
        "graceful shutdown on SIGTERM: {status:?}\n{log}"
    );
    assert!(log.contains("GetToken"), "the log records requests: {log}");
    let mut files = Vec::new();
    files_under(cwd, &mut files);
    assert!(
        files
            .iter()
            .any(|f| f.extension().is_some_and(|e| e == "log" || e == "sst"))
    );
    for t in tokens {
        assert!(!log.contains(t), "token in the daemon log");
        for f in &files {
            let bytes = std::fs::read(f).expect("read");
            assert!(
                !bytes.windows(t.len()).any(|w| w == t.as_bytes()),
                "plaintext token in {}",
                f.display()
            );
        }
    }

    // Restart on the same directory: the keyring and records are still there.
    let d = serve_dev(cwd);
    let o = run(cwd, &["get", "rec-0"], &d.env(), None);
    assert_eq!(o.stdout, tokens[0].as_bytes(), "{}", stderr(&o));
    let (status, _) = d.terminate();
    assert!(status.success());
}

#[test]
fn keys_commands_import_openssl_keys_and_refuse_bad_ones() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cwd = tmp.path();
    let fixture = |n: &str| {
        root()
            .join("keys/test")
            .join(n)
            .to_string_lossy()
            .into_owned()
    };
    assert_exit(
        &run(cwd, &["keys", "list", "--dev"], &[], None),
        3,
        "no key versions",
    );
    assert_exit(
        &run(cwd, &["keys", "list"], &[], None),
        5,
        "pass --config FILE, or --dev",
    );
    // PKCS#1 ("BEGIN RSA PRIVATE KEY") imports into an empty keyring as version 1.
    let o = run(
        cwd,
        &[
            "keys",
            "import",
            "--dev",
            "--private",
            &fixture("fixture-a.key.pkcs1.pem"),
        ],
        &[],
        None,
    );
    assert_exit(&o, 0, "");
    assert!(String::from_utf8_lossy(&o.stdout).contains("imported as active v1"));
    assert_exit(
        &run(cwd, &["keys", "init", "--dev"], &[], None),
        6,
        "already has 1 key version",
    );
    // Each refused import exits with a precise code and message, and adds no version.
    let enc = fixture("fixture-a.key.encrypted.pem");
    let no_end = cwd.join("no-end.pem");
    let full = std::fs::read_to_string(fixture("fixture-b.key.pem")).expect("fixture");
    std::fs::write(
        &no_end,
        full.trim_end()
            .trim_end_matches("-----END PRIVATE KEY-----"),
    )
    .expect("write");
    let no_end = no_end.display().to_string();
    let refused: [(&str, Option<&str>, i32, &str); 8] = [
        (&enc, Some("fixture-passphrase"), 6, "already key version 1"),
        (&enc, Some("wrong"), 5, "wrong passphrase"),
        (
            &enc,
            None,
            5,
            "error: private key is encrypted: give its passphrase with --import-passphrase-file \
             FILE or TOKENVAULT_IMPORT_PASSPHRASE",
        ),
        (
            "fixture-1024.key.pem",
            None,
            5,
            "RSA key of 1024 bits refused",
        ),
        (
            "fixture-ec.key.pem",
            None,
            5,
            "private key uses the EC (id-ecPublicKey) algorithm; tokenvault accepts RSA (2048 to 4096 bits) and X-Wing keys",
        ),
        (
            &no_end,
            None,
            5,
            "PEM block \"PRIVATE KEY\" has no -----END PRIVATE KEY----- line",
        ),
        ("fixture-b.pub.pem", None, 5, "not a PRIVATE KEY PEM file"),
        ("/nonexistent.pem", None, 5, "/nonexistent.pem"),
    ];
    for (file, pass, code, msg) in refused {
        let path = if file.starts_with('/') {
            file.to_string()
        } else {
            fixture(file)
        };
        let env: Vec<(&str, &str)> = pass
            .map(|p| ("TOKENVAULT_IMPORT_PASSPHRASE", p))
            .into_iter()
            .collect();
        assert_exit(
            &run(
                cwd,
                &["keys", "import", "--dev", "--private", &path],
                &env,
                None,
            ),
            code,
            msg,
        );
    }
    let list = run(cwd, &["keys", "list", "--dev"], &[], None);
    assert_eq!(String::from_utf8_lossy(&list.stdout).lines().count(), 1);
    // PKCS#8 from `openssl genpkey` imports as version 2; rotate makes version 3.
    assert_exit(
        &run(
            cwd,
            &[
                "keys",
                "import",
                "--dev",
                "--private",
                &fixture("fixture-b.key.pem"),
            ],
            &[],
            None,
        ),
        0,
        "",
    );
    let o = run(cwd, &["keys", "rotate", "--dev"], &[], None);
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("active v3"),
        "{}",
        stderr(&o)
    );
    let list = String::from_utf8_lossy(&run(cwd, &["keys", "list", "--dev"], &[], None).stdout)
        .into_owned();
    let states: Vec<&str> = list
        .lines()
        .map(|l| l.split_whitespace().nth(1).expect("state"))
        .collect();
    assert_eq!(states, ["decrypt-only", "decrypt-only", "active"], "{list}");

    let o = run(
        cwd,
        &["keys", "export-public", "--dev", "--version", "2"],
        &[],
        None,
    );
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        std::fs::read_to_string(fixture("fixture-b.pub.pem")).expect("pem")
    );
    assert_exit(
        &run(
            cwd,
            &["keys", "export-public", "--dev", "--version", "9"],
            &[],
            None,
        ),
        3,
        "no key version 9",
    );
    let active = run(cwd, &["keys", "export-public", "--dev"], &[], None);
    assert_eq!(
        active.stdout,
        std::fs::read(cwd.join("keys/dev/v0003.pub.pem")).expect("pub")
    );
    use std::os::unix::fs::PermissionsExt as _;
    for v in 1..=3 {
        let mode = std::fs::metadata(cwd.join(format!("keys/dev/v{v:04}.key.pem")))
            .expect("key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "v{v}");
    }
    // Offline key changes are in the audit trail, each written with its registry change and
    // chained like the daemon's own events; the refused imports left nothing.
    let d = serve_dev(cwd);
    let env = d.env();
    let o = run(cwd, &["admin", "audit", "list"], &env, None);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let list = String::from_utf8_lossy(&o.stdout).into_owned();
    let offline: Vec<&str> = list
        .lines()
        .filter(|l| l.contains("caller=keys-cli"))
        .collect();
    assert_eq!(offline.len(), 3, "{list}");
    assert!(
        offline
            .iter()
            .all(|l| l.contains("action=RotateKey outcome=ok")),
        "{list}"
    );
    let o = run(cwd, &["admin", "audit", "verify"], &env, None);
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with("audit chain intact:"),
        "{}",
        stderr(&o)
    );
    d.terminate();
}

#[test]
fn seal_with_an_exported_public_key_file() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cwd = tmp.path();
    let d = serve_dev(cwd);
    let env = d.env();
    let pem = cwd.join("vault.pub.pem");
    std::fs::copy(cwd.join("keys/dev/v0001.pub.pem"), &pem).expect("copy");
    let mut args = seal_args("from-file", "u");
    let pem_s = pem.to_string_lossy().into_owned();
    args.extend(["--public-key", &pem_s]);
    let secret = cwd.join("secret.txt");
    std::fs::write(&secret, "token-from-file").expect("write");
    let secret_s = secret.to_string_lossy().into_owned();
    args.extend(["--secret-file", &secret_s]);
    assert_exit(&run(cwd, &args, &env, None), 0, "");
    assert_eq!(
        run(cwd, &["get", "from-file"], &env, None).stdout,
        b"token-from-file"
    );
    // A key the daemon does not know is refused with a pointer to Ingest.PublicKeys.
    let mut args = seal_args("foreign", "u");
    let foreign = root()
        .join("keys/test/fixture-b.pub.pem")
        .to_string_lossy()
        .into_owned();
    args.extend(["--public-key", &foreign]);
    assert_exit(
        &run(cwd, &args, &env, Some(b"t")),
        5,
        "sealed under unknown key",
    );
    d.terminate();
}

#[test]
fn serve_needs_a_config_or_dev_and_help_reads_well() {
    let tmp = tempfile::tempdir().expect("tempdir");
    assert_exit(
        &run(tmp.path(), &["serve"], &[], None),
        5,
        "pass --config FILE, or --dev",
    );
    assert_exit(
        &run(
            tmp.path(),
            &["serve", "--dev", "--listen", "0.0.0.0:0"],
            &[],
            None,
        ),
        5,
        "loopback",
    );
    let cfg = tmp.path().join("bad.toml");
    std::fs::write(&cfg, "data_dir = 1\n").expect("write");
    assert_exit(
        &run(
            tmp.path(),
            &["serve", "--config", &cfg.to_string_lossy()],
            &[],
            None,
        ),
        5,
        "bad.toml",
    );
    let help = run(tmp.path(), &["--help"], &[], None);
    let text = String::from_utf8_lossy(&help.stdout);
    for verb in ["serve", "keys", "seal", "get", "revoke", "delete"] {
        assert!(text.contains(verb), "{text}");
    }
    let keys_help =
        String::from_utf8_lossy(&run(tmp.path(), &["keys", "--help"], &[], None).stdout)
            .into_owned();
    for verb in ["init", "rotate", "list", "export-public", "import"] {
        assert!(keys_help.contains(verb), "{keys_help}");
    }
    // --version says whether the cryptography is aws-lc's FIPS module (a `fips` build).
    let version =
        String::from_utf8_lossy(&run(tmp.path(), &["--version"], &[], None).stdout).into_owned();
    assert!(
        version.starts_with(&format!("tokenvault {}", env!("CARGO_PKG_VERSION"))),
        "{version}"
    );
    assert_eq!(
        version.contains("FIPS 140-3"),
        cfg!(feature = "fips"),
        "{version}"
    );
}

#[test]
fn acknowledged_writes_survive_sigkill() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cwd = tmp.path();
    let mut d = serve_dev(cwd);
    let env = d.env();
    for i in 0..20 {
        let o = run(
            cwd,
            &seal_args(&format!("k{i}"), "u"),
            &env,
            Some(format!("token-{i}").as_bytes()),
        );
        assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    }
    // No graceful shutdown: the process dies right after the last acknowledgement.
    d.child.kill().expect("SIGKILL");
    d.child.wait().expect("reaped");
    let d = serve_dev(cwd);
    for i in 0..20 {
        let o = run(cwd, &["get", &format!("k{i}")], &d.env(), None);
        assert_eq!(
            o.stdout,
            format!("token-{i}").as_bytes(),
            "k{i}: {}",
            stderr(&o)
        );
    }
    d.terminate();
}

#[test]
fn a_burst_of_refusals_raises_an_alert_in_the_log() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cwd = tmp.path();
    let d = serve_dev(cwd);
    // A stolen ingest credential probing the Broker.
    let ingest = d.cred("TOKENVAULT_INGEST_TOKEN");
    let env = [
        ("TOKENVAULT_WORKER_TOKEN", ingest.as_str()),
        ("TOKENVAULT_ADDR", d.addr.as_str()),
    ];
    for _ in 0..10 {
        assert_exit(
            &run(cwd, &["get", "anything"], &env, None),
            4,
            "PermissionDenied",
        );
    }
    let (_, log) = d.terminate();
    let alert = log
        .lines()
        .find(|l| l.contains("denial_burst"))
        .unwrap_or_else(|| panic!("no alert in:\n{log}"));
    assert!(
        alert.contains("dev-ingest") && alert.contains("denials=10"),
        "{alert}"
    );
    assert!(
        !log.contains(&ingest),
        "the credential itself is never logged"
    );
}

#[test]
fn calls_with_a_wrong_credential_log_one_summary_line_not_one_each() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cwd = tmp.path();
    let d = serve_dev(cwd);
    let wrong = "tv_not_a_configured_credential_0000";
    let env = [
        ("TOKENVAULT_WORKER_TOKEN", wrong),
        ("TOKENVAULT_ADDR", d.addr.as_str()),
    ];
    for _ in 0..12 {
        assert_exit(
            &run(cwd, &["get", "anything"], &env, None),
            4,
            "Unauthenticated",
        );
    }
    let (_, log) = d.terminate();
    // Nothing per refusal; the summary written at shutdown says how many there were.
    let refusal_lines: Vec<&str> = log
        .lines()
        .filter(|l| {
            l.contains("authentication")
                || l.contains("refused")
                || l.contains("invalid credential")
        })
        .collect();
    assert_eq!(refusal_lines.len(), 1, "{log}");
    assert!(
        refusal_lines[0].contains("refused=12")
            && refusal_lines[0].contains("top_source=127.0.0.1"),
        "{}",
        refusal_lines[0]
    );
    assert!(
        !log.contains(wrong),
        "the credential itself is never logged"
    );
}

/// `GET /metrics` from the address the dev daemon printed (`metrics: http://…/metrics`).
#[test]
fn json_logs_carry_request_ids_and_no_secrets() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cwd = tmp.path();
    // Successful calls log at debug (a line per call would cost more than the call itself).
    let d = serve_dev_with(
        cwd,
        "127.0.0.1:0",
        &[
            ("TOKENVAULT_LOG_FORMAT", "json"),
            ("TOKENVAULT_LOG", "info,tokenvault=debug"),
        ],
    );
    let env = d.env();
    let token = "gho_JSONLOGCHECK_dddddddddddddddddddddd";
    let o = run(
        cwd,
        &seal_args("j-1", "user-9"),
        &env,
        Some(token.as_bytes()),
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_exit(&run(cwd, &["get", "j-1"], &env, None), 0, "");
    assert_exit(&run(cwd, &["get", "nope"], &env, None), 3, "no record");
    let (status, log) = d.terminate();
    assert!(status.success(), "{log}");
    assert!(!log.contains(token));
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let released: Vec<&serde_json::Value> =
        lines.iter().filter(|l| l["rpc"] == "GetToken").collect();
    assert_eq!(released.len(), 2, "{log}");
    let ids: Vec<&str> = released
        .iter()
        .map(|l| {
            l["span"]["request_id"]
                .as_str()
                .expect("request id on the line")
        })
        .collect();
    assert_ne!(ids[0], ids[1], "each call has its own id");
    assert!(ids.iter().all(|id| id.len() == 16));
}

#[test]
fn bench_drives_every_operation_and_reports_json() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let cwd = tmp.path();
    let d = serve_dev(cwd);
    let mut env = d.env();
    env.retain(|(k, _)| *k != "TOKENVAULT_ADMIN_TOKEN");
    let o = bench(
        cwd,
        &[
            "--duration",
            "1",
            "--concurrency",
            "4",
            "--records",
            "20",
            "--mix",
            "get=2,put=1,batch=1",
            "--batch-size",
            "10",
            "--presealed",
            "50",
            "--json",
            "--daemon-pid",
            &d.child.id().to_string(),
        ],
        &env,
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    // CPU per operation of both processes over the timed second: the daemon did real work.
    let cpu = &report["cpu"];
    assert!(
        cpu["daemon_seconds"].as_f64().expect("daemon cpu") > 0.0,
        "{cpu}"
    );
    assert!(
        cpu["daemon_us_per_op"].as_f64().expect("per op") > 0.0,
        "{cpu}"
    );
    assert!(cpu["load_generator_us_per_op"].as_f64().is_some(), "{cpu}");
    let ops = report["operations"].as_array().expect("operations");
    let names: Vec<&str> = ops.iter().filter_map(|o| o["operation"].as_str()).collect();
    assert_eq!(names, ["get", "put", "batch"]);
    for op in ops {
        assert!(op["count"].as_u64().expect("count") > 0, "{op}");
        assert_eq!(op["errors"], 0, "{op}");
        assert!(op["p50_us"].as_u64() <= op["p99_us"].as_u64(), "{op}");
    }
    // Batches carry up to --batch-size records (one may be short when the pre-sealed pool ends).
    let (items, calls) = (
        ops[2]["items"].as_u64().expect("items"),
        ops[2]["count"].as_u64().expect("count"),
    );
    assert!(
        items > calls * 9 && items <= calls * 10,
        "{items} records in {calls} batches"
    );
    // The first 50 records were sealed before the clock started; every one written after them
    // was sealed during the run, and the report says so.
    let written = ops[1]["items"].as_u64().expect("put items") + items;
    assert!(written > 50, "{written} records written");
    assert_eq!(report["sealed"]["presealed"], 50, "{report}");
    assert_eq!(
        report["sealed"]["during_run"].as_u64(),
        Some(written - 50),
        "{report}"
    );
    // Rewrap needs the admin credential: refused without it, then timed with it.
    assert_exit(
        &bench(cwd, &["--mix", "rewrap", "--records", "30"], &env),
        4,
        "no credential",
    );
    let o = bench(
        cwd,
        &["--mix", "rewrap", "--records", "30", "--json"],
        &d.env(),
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let report: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
    let rewrap = &report["operations"][0];
    assert!(rewrap["items"].as_u64().expect("items") >= 30, "{rewrap}");
    assert_eq!(rewrap["errors"], 0);
    assert_exit(
        &bench(cwd, &["--mix", "delete=1"], &d.env()),
        5,
        "unknown operation",
    );
    // A pid that is not running is refused before anything is seeded.
    let status = || run(cwd, &["admin", "status"], &d.env(), None).stdout;
    let before = status();
    let text = String::from_utf8_lossy(&before).into_owned();
    assert!(text.contains("records"), "{text}");
    // Admin.Stats says which cryptographic module the daemon runs on.
    assert!(text.contains("cryptography: aws-lc"), "{text}");
    assert_eq!(
        text.contains("FIPS 140-3"),
        cfg!(feature = "fips"),
        "{text}"
    );
    assert_exit(
        &bench(
            cwd,
            &["--mix", "put=1", "--daemon-pid", "999999999"],
            &d.env(),
        ),
        6,
        "reading /proc/999999999/stat",
    );
    // A malformed or oversized --presealed is refused before anything is seeded or sealed.
    assert_exit(
        &bench(cwd, &["--mix", "put=1", "--presealed", "lots"], &d.env()),
        2,
        "invalid value 'lots' for '--presealed <RECORDS>'",
    );
    assert_exit(
        &bench(
            cwd,
            &["--mix", "put=1", "--presealed", "10000001"],
            &d.env(),
        ),
        2,
        "10000001 is not in 0..=10000000",
    );
    assert_eq!(status(), before, "no record was seeded");
    let (status, log) = d.terminate();
    assert!(status.success(), "{log}");
}

/// The load generator is a binary of its own: the daemon's binary neither offers it nor
/// carries its code (a message only the load generator has is not in it).
#[test]
fn the_daemons_binary_carries_no_load_generator() {
    let tmp = tempfile::tempdir().expect("tempdir");
    assert_exit(
        &run(tmp.path(), &["bench", "--mix", "get"], &[], None),
        2,
        "unrecognized subcommand 'bench'",
    );
    let needle: &[u8] = b"the bench's HTTP client has no TLS";
    let carries = |path: &str| {
        std::fs::read(path)
            .expect("binary")
            .windows(needle.len())
            .any(|w| w == needle)
    };
    assert!(carries(BENCH), "the needle is the load generator's");
    assert!(!carries(BIN), "tokenvault carries the load generator");
}

#[test]
fn a_reader_that_goes_away_ends_the_output_quietly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let init = run(dir.path(), &["keys", "init", "--dev"], &[], None);
    assert!(init.status.success(), "{}", stderr(&init));
    let mut child = cmd(dir.path())
        .args(["keys", "list", "--dev"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    // The reader is gone before anything is written (opening the store takes far longer).
    drop(child.stdout.take());
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(141), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
}

#[test]
fn shell_completions_and_the_manual_page_cover_every_verb() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cwd = dir.path();
    for (shell, marker) in [
        ("bash", "_tokenvault()"),
        ("zsh", "#compdef tokenvault"),
        ("fish", "complete -c tokenvault"),
    ] {
        let out = run(cwd, &["completions", shell], &[], None);
        assert_exit(&out, 0, "");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(script.contains(marker), "{shell}: {marker}");
        for verb in [
            "serve",
            "records",
            "export",
            "import",
            "prune",
            "completions",
        ] {
            assert!(script.contains(verb), "{shell} completes {verb}");
        }
    }
    let man = run(cwd, &["man"], &[], None);
    assert_exit(&man, 0, "");
    let page = String::from_utf8_lossy(&man.stdout);
    assert!(
        page.starts_with(".ie") && page.contains(".TH tokenvault 1"),
        "{page}"
    );
    assert!(page.contains("admin") && page.contains("store"));
    assert_exit(
        &run(cwd, &["completions", "tcsh"], &[], None),
        2,
        "invalid value 'tcsh'",
    );
    assert_exit(&run(cwd, &["completions"], &[], None), 2, "<SHELL>");
}
