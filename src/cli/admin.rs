//! `tokenvault admin`: key lifecycle over the running daemon's `Admin` service.

use std::time::Duration;

use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

use super::CliError;
use super::client::{Authed, Connection, connect};
use crate::api::v1::{self, admin_client::AdminClient};
use crate::config::Role;

#[derive(Debug, Subcommand)]
pub(crate) enum AdminCommand {
    /// Create a new key version and make it active (the previous one becomes decrypt-only).
    Rotate(RotateArgs),
    /// Rewrap every data key under an older version to the active one, with progress.
    Rewrap(RewrapArgs),
    /// Retire a decrypt-only version (refused while records still use it).
    Retire(VersionArgs),
    /// Schedule the destruction of a retired version: it opens nothing from now on and its
    /// private key is erased after [keys] destroy_waiting_days (default 7); until then
    /// `cancel-destroy` restores it.
    Destroy(VersionArgs),
    /// Cancel a pending destruction: the version is retired again.
    CancelDestroy(VersionArgs),
    /// Refuse to open anything wrapped under a lower version, on every daemon, from now on
    /// (0: none; [keys] min_decrypt_version still applies if higher).
    MinDecryptVersion(VersionArgs),
    /// Approve a call held by the two-person rule ([admin] approvals_required), by its request
    /// id; the approval that completes it runs the call.
    Approve(ApproveArgs),
    /// Key versions and records per version.
    Status {
        /// One JSON object: {"keys": [...], "stats": {...}}.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Record metadata (never a secret), filtered: e.g. `--state needs-reauth` lists the
    /// records whose owners must authorize again.
    Records(RecordsArgs),
    /// Read and verify the tamper-evident audit trail.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// See and replay webhook deliveries (docs/WEBHOOKS.md).
    #[command(subcommand)]
    Webhooks(WebhooksCommand),
    /// Rotate, rewrap everything, retire and destroy every older version, then verify.
    /// Waits for the daemon and resumes if it restarts mid-way.
    EmergencyRotate(EmergencyArgs),
    /// Re-read the [providers] tables of the daemon's config file (same as SIGHUP).
    ReloadProviders(Conn),
    /// Write a store's records (metadata and envelope) and key registry (public keys) as JSON
    /// lines: no private key, no plaintext. Reads the store directly, as `store copy` does
    /// (as one consistent snapshot, even while daemons run on it).
    Export(super::store::ExportArgs),
    /// Load an export into a store (stopped daemon) with the same key registry, or an empty
    /// one served with the private keys of the exported versions. Checks the whole file before
    /// writing anything.
    Import(super::store::ImportArgs),
}

#[derive(Debug, Subcommand)]
pub(crate) enum AuditCommand {
    /// Check every hash chain event by event (constant memory); reports the first broken
    /// link. A progress line on stderr when it is a terminal.
    Verify {
        /// No progress line.
        #[arg(long)]
        quiet: bool,
        /// One JSON object per chain and line: {"instance", "events", "intact", "error"}.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        conn: Connection,
    },
    /// Apply `[audit] retention_days` now (the daemon also does every ten minutes).
    Prune(Conn),
    /// Print events, optionally only those about one record or owner, or in a time range.
    List {
        /// One JSON object per event and line (the audit sink's format).
        #[arg(long)]
        json: bool,
        /// Only events about this record id.
        #[arg(long)]
        record: Option<String>,
        /// Only events about this owner.
        #[arg(long)]
        owner: Option<String>,
        /// From this Unix time in milliseconds.
        #[arg(long, default_value_t = 0)]
        from_ms: i64,
        /// Up to this Unix time in milliseconds.
        #[arg(long, default_value_t = 0)]
        to_ms: i64,
        #[command(flatten)]
        conn: Connection,
    },
}

#[derive(Debug, Args)]
pub(crate) struct RecordsArgs {
    /// Only records of this provider.
    #[arg(long)]
    provider: Option<String>,
    /// Only records of this owner.
    #[arg(long)]
    owner: Option<String>,
    /// Only records of this kind.
    #[arg(long, value_parser = ["access_token", "refresh_token", "client_secret", "api_key", "token_bundle"])]
    kind: Option<String>,
    /// Only records in this state.
    #[arg(long, value_parser = ["revoked", "needs-reauth", "expired", "usable"])]
    state: Option<String>,
    /// Only records wrapped under this key version.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    key_version: Option<u32>,
    /// Stop after this many records (0: all).
    #[arg(long, default_value_t = 0)]
    limit: u64,
    /// One JSON object per record and line, for scripts.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    conn: Connection,
}

#[derive(Debug, Args)]
pub(crate) struct Conn {
    #[command(flatten)]
    conn: Connection,
}

#[derive(Debug, Args)]
pub(crate) struct RotateArgs {
    /// Import this RSA private key (PKCS#8, encrypted PKCS#8 or PKCS#1 PEM) instead of
    /// generating one. Sent only over TLS or to a loopback daemon.
    #[arg(long)]
    import_private: Option<std::path::PathBuf>,
    /// File with the passphrase of an encrypted key file (or set TOKENVAULT_IMPORT_PASSPHRASE).
    #[arg(long, requires = "import_private")]
    import_passphrase_file: Option<std::path::PathBuf>,
    /// Register the RSA key pair with this label in the daemon's PKCS#11 token (it must be
    /// sensitive and never extractable) instead of generating one.
    #[arg(long, conflicts_with = "import_private")]
    import_token_label: Option<String>,
    /// The algorithm of the generated key: rsa-2048, rsa-3072 or x-wing (envelope v2, sealed
    /// with HPKE; docs/ROTATION.md). Default: the active version's (X-Wing stays X-Wing; RSA keeps
    /// its size, RSA-2048 in a PKCS#11 token).
    #[arg(long, value_parser = super::keys::ALGORITHMS, conflicts_with_all = ["import_private", "import_token_label"])]
    algorithm: Option<String>,
    #[command(flatten)]
    conn: Connection,
}

#[derive(Debug, Subcommand)]
pub(crate) enum WebhooksCommand {
    /// An endpoint's pending deliveries (or, with --finished, those delivered, dead-lettered
    /// or gone), in the order their events were written.
    List {
        /// The endpoint ([webhooks.endpoints.NAME]).
        endpoint: String,
        /// Finished deliveries instead of pending ones.
        #[arg(long)]
        finished: bool,
        /// One JSON object per delivery and line (Admin.ListDeliveries' fields).
        #[arg(long)]
        json: bool,
        /// Stop after this many (0: all).
        #[arg(long, default_value_t = 0)]
        limit: u64,
        #[command(flatten)]
        conn: Connection,
    },
    /// Send a delivery again now (a finished one as a replay, same webhook-id); clears the
    /// endpoint's 410 Gone mark.
    Retry {
        /// The endpoint.
        endpoint: String,
        /// The delivery's id, as `list` prints it.
        id: String,
        #[command(flatten)]
        conn: Connection,
    },
}

#[derive(Debug, Args)]
pub(crate) struct ApproveArgs {
    /// The request id (32 hex digits) the held call printed.
    id: String,
    #[command(flatten)]
    conn: Connection,
}

#[derive(Debug, Args)]
pub(crate) struct VersionArgs {
    /// Key version.
    version: u32,
    #[command(flatten)]
    conn: Connection,
}

#[derive(Debug, Args)]
pub(crate) struct RewrapArgs {
    /// Upper bound on rewrapped records per second (0: as fast as the daemon can).
    #[arg(long, default_value_t = 0)]
    max_per_second: u32,
    /// How long to keep retrying while the daemon is unreachable, in seconds.
    #[arg(long, default_value_t = 300)]
    wait: u64,
    /// No progress bar (for logs and scripts).
    #[arg(long)]
    quiet: bool,
    #[command(flatten)]
    conn: Connection,
}

#[derive(Debug, Args)]
pub(crate) struct EmergencyArgs {
    /// The algorithm of the new version: rsa-2048, rsa-3072 or x-wing (moves every record to
    /// envelope v2; docs/ROTATION.md). Default: the active version's (as `admin rotate`).
    #[arg(long, value_parser = super::keys::ALGORITHMS)]
    algorithm: Option<String>,
    #[command(flatten)]
    rewrap: RewrapArgs,
}

async fn client(conn: &Connection) -> Result<AdminClient<Authed>, CliError> {
    Ok(AdminClient::new(connect(conn, Role::Admin).await?))
}

fn key_state(k: &v1::PublicKey) -> &'static str {
    v1::KeyState::try_from(k.state).map_or("unknown", |s| match s {
        v1::KeyState::Active => "active",
        v1::KeyState::DecryptOnly => "decrypt-only",
        v1::KeyState::Retired => "retired",
        v1::KeyState::PendingDestruction => "pending-destruction",
        v1::KeyState::Destroyed => "destroyed",
        v1::KeyState::Unspecified => "unspecified",
    })
}

/// A call the two-person rule holds: what the other admins need.
fn print_held(r: &v1::ApprovalRequest) {
    println!(
        "held for approval: {} {} needs {} distinct admins ({} so far: {})",
        r.action,
        r.target,
        r.required,
        r.approvals.len(),
        r.approvals.join(", ")
    );
    println!(
        "another admin runs `tokenvault admin approve {}` before {}",
        r.id,
        tokenvault_daemon::rfc3339(r.expires_at)
    );
}

fn describe(k: &v1::PublicKey) -> String {
    let line = format!(
        "v{}  {:<12}  {}  {}",
        k.version,
        key_state(k),
        k.fingerprint,
        k.algorithm
    );
    if k.destroy_after == 0 {
        line
    } else {
        format!(
            "{line}  destroyed after {}",
            tokenvault_daemon::rfc3339(k.destroy_after)
        )
    }
}

/// Runs one rewrap to completion, reconnecting (and so resuming) while the daemon is away.
async fn rewrap(args: &RewrapArgs) -> Result<v1::RewrapProgress, CliError> {
    let bar = if args.quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(0)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "rewrap to v{msg} [{bar:40}] {pos}/{len} records  {per_sec}  ETA {eta}",
        )
        .expect("static template")
        .progress_chars("=> "),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.wait);
    let mut done_before = 0;
    loop {
        let attempt = async {
            let mut c = client(&args.conn).await?;
            let mut stream = c
                .rewrap(v1::RewrapRequest {
                    max_records_per_second: args.max_per_second,
                })
                .await?
                .into_inner();
            let mut last = None;
            while let Some(p) = stream.message().await? {
                bar.set_message(p.target_version.to_string());
                bar.set_length(done_before + p.total);
                bar.set_position(done_before + p.rewrapped + p.failed);
                last = Some(p);
            }
            last.ok_or_else(|| CliError::Internal("rewrap stream ended without a report".into()))
        };
        match attempt.await {
            Ok(p) if p.done => {
                bar.finish();
                return Ok(p);
            }
            Ok(_) => return Err(CliError::Internal("rewrap stream ended early".into())),
            Err(CliError::Unavailable(msg)) if tokio::time::Instant::now() < deadline => {
                // The daemon went away (killed, restarted): wait and resume from its cursor.
                bar.suspend(|| eprintln!("daemon unavailable ({msg}); retrying"));
                done_before = bar.position();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Builds `RotateKey`: generate in the daemon, or import a key read (and decrypted) here.
fn rotate_request(a: &RotateArgs) -> Result<v1::RotateKeyRequest, CliError> {
    if let Some(label) = &a.import_token_label {
        return Ok(v1::RotateKeyRequest {
            token_key_label: label.clone(),
            ..Default::default()
        });
    }
    let Some(path) = &a.import_private else {
        return Ok(v1::RotateKeyRequest {
            algorithm: a.algorithm.clone().unwrap_or_default(),
            ..Default::default()
        });
    };
    if !a.conn.is_confidential() {
        return Err(CliError::Input(format!(
            "refusing to send a private key in plaintext to {}; use https:// or a loopback daemon",
            a.conn.addr()
        )));
    }
    let key = super::keys::read_import_key(path, a.import_passphrase_file.as_deref())?;
    Ok(v1::RotateKeyRequest {
        private_key_pem: key.to_pkcs8_pem(None)?.to_string(),
        public_key_pem: key.public_key().to_pem(),
        token_key_label: String::new(),
        algorithm: String::new(),
    })
}

async fn status(conn: &Connection) -> Result<(Vec<v1::PublicKey>, v1::StatsResponse), CliError> {
    let mut c = client(conn).await?;
    let keys = c.list_keys(v1::ListKeysRequest {}).await?.into_inner().keys;
    let stats = c.stats(v1::StatsRequest {}).await?.into_inner();
    Ok((keys, stats))
}

fn status_json(keys: &[v1::PublicKey], stats: &v1::StatsResponse) -> serde_json::Value {
    serde_json::json!({
        "keys": keys.iter().map(|k| serde_json::json!({
            "version": k.version,
            "state": key_state(k),
            "fingerprint": k.fingerprint,
            "created_at": k.created_at,
        })).collect::<Vec<_>>(),
        "stats": {
            "records": stats.records,
            "revoked": stats.revoked,
            "needs_reauth": stats.needs_reauth,
            "records_per_key_version": stats.records_per_key_version.iter()
                .map(|c| serde_json::json!({"key_version": c.key_version, "records": c.records}))
                .collect::<Vec<_>>(),
            "dek_cache_hits": stats.dek_cache_hits,
            "dek_cache_misses": stats.dek_cache_misses,
            "dek_cache_entries": stats.dek_cache_entries,
            "fips": stats.fips,
        },
    })
}

fn print_status(keys: &[v1::PublicKey], stats: &v1::StatsResponse) {
    println!("key versions:");
    for k in keys {
        println!("  {}", describe(k));
    }
    println!(
        "records: {} (revoked {}, needing re-authorization {})",
        stats.records, stats.revoked, stats.needs_reauth
    );
    println!("records per key version:");
    for c in &stats.records_per_key_version {
        println!("  v{}: {}", c.key_version, c.records);
    }
    println!(
        "cryptography: {}",
        if stats.fips {
            "aws-lc FIPS 140-3 module"
        } else {
            "aws-lc (not the FIPS module)"
        }
    );
}

pub(crate) async fn run(cmd: AdminCommand) -> Result<(), CliError> {
    match cmd {
        AdminCommand::Rotate(a) => {
            let request = rotate_request(&a)?;
            let r = client(&a.conn)
                .await?
                .rotate_key(request)
                .await?
                .into_inner();
            if let Some(k) = &r.active {
                println!("active    {}", describe(k));
            }
            if let Some(k) = &r.previous {
                println!("previous  {}", describe(k));
            }
        }
        AdminCommand::Rewrap(a) => {
            let p = rewrap(&a).await?;
            println!(
                "rewrapped {} record(s) to v{} in {:.1}s ({} skipped, {} conflicts, {} failed)",
                p.rewrapped, p.target_version, p.elapsed_seconds, p.skipped, p.conflicts, p.failed
            );
            if p.failed > 0 {
                return Err(CliError::Precondition(format!(
                    "{} record(s) could not be opened and were left under their old key; see the daemon log",
                    p.failed
                )));
            }
        }
        AdminCommand::Retire(a) => {
            let r = client(&a.conn)
                .await?
                .retire_key(v1::RetireKeyRequest { version: a.version })
                .await?;
            println!(
                "{}",
                r.into_inner()
                    .key
                    .as_ref()
                    .map_or_else(String::new, describe)
            );
        }
        AdminCommand::Destroy(a) => {
            let r = client(&a.conn)
                .await?
                .destroy_key(v1::DestroyKeyRequest { version: a.version })
                .await?
                .into_inner();
            if let Some(held) = &r.approval {
                print_held(held);
                return Ok(());
            }
            let key = r.key.unwrap_or_default();
            println!("{}", describe(&key));
            if key.destroy_after != 0 {
                println!(
                    "destruction of v{v} scheduled for {}; until then `tokenvault admin cancel-destroy {v}` restores it",
                    tokenvault_daemon::rfc3339(key.destroy_after),
                    v = key.version
                );
            } else {
                println!("private key erased: {}", r.private_key_erased);
            }
        }
        AdminCommand::CancelDestroy(a) => {
            let r = client(&a.conn)
                .await?
                .cancel_destroy_key(v1::CancelDestroyKeyRequest { version: a.version })
                .await?
                .into_inner();
            match &r.approval {
                Some(held) => print_held(held),
                None => println!("{}", describe(&r.key.unwrap_or_default())),
            }
        }
        AdminCommand::MinDecryptVersion(a) => {
            let r = client(&a.conn)
                .await?
                .set_min_decrypt_version(v1::SetMinDecryptVersionRequest { version: a.version })
                .await?
                .into_inner();
            match &r.approval {
                Some(held) => print_held(held),
                None => println!("minimum decryption version: v{}", r.minimum),
            }
        }
        AdminCommand::Approve(a) => {
            let r = client(&a.conn)
                .await?
                .approve(v1::ApproveRequest { id: a.id })
                .await?
                .into_inner();
            let req = r.request.unwrap_or_default();
            if r.executed {
                println!(
                    "approved request {} ({} {}): {}",
                    req.id, req.action, req.target, r.outcome
                );
            } else {
                print_held(&req);
            }
        }
        AdminCommand::Status { json, conn } => {
            let (keys, stats) = status(&conn).await?;
            if json {
                println!("{}", status_json(&keys, &stats));
            } else {
                print_status(&keys, &stats);
            }
        }
        AdminCommand::Records(a) => records(a).await?,
        AdminCommand::Webhooks(WebhooksCommand::List {
            endpoint,
            finished,
            json,
            limit,
            conn,
        }) => {
            let mut c = client(&conn).await?;
            let mut request = v1::ListDeliveriesRequest {
                endpoint,
                finished,
                page_token: String::new(),
                page_size: 1000,
            };
            let mut printed = 0u64;
            'pages: loop {
                let page = c.list_deliveries(request.clone()).await?.into_inner();
                for d in &page.deliveries {
                    if limit != 0 && printed == limit {
                        break 'pages;
                    }
                    println!("{}", delivery_line(d, json));
                    printed += 1;
                }
                if page.next_page_token.is_empty() {
                    break;
                }
                request.page_token = page.next_page_token;
            }
        }
        AdminCommand::Webhooks(WebhooksCommand::Retry { endpoint, id, conn }) => {
            let d = client(&conn)
                .await?
                .retry_delivery(v1::RetryDeliveryRequest { endpoint, id })
                .await?
                .into_inner()
                .delivery
                .unwrap_or_default();
            println!("pending again: {}", delivery_line(&d, false));
        }
        AdminCommand::Export(_) | AdminCommand::Import(_) => {
            return Err(CliError::Internal(
                "export and import run outside the runtime".into(),
            ));
        }
        AdminCommand::EmergencyRotate(a) => emergency(a).await?,
        AdminCommand::ReloadProviders(a) => {
            let r = client(&a.conn)
                .await?
                .reload_providers(v1::ReloadProvidersRequest {})
                .await?
                .into_inner();
            println!("providers: {}", r.providers.join(", "));
        }
        AdminCommand::Audit(AuditCommand::Verify { quiet, json, conn }) => {
            verify_audit(&conn, quiet, json).await?;
        }
        AdminCommand::Audit(AuditCommand::Prune(a)) => {
            let r = client(&a.conn)
                .await?
                .prune_audit(v1::PruneAuditRequest {})
                .await?
                .into_inner();
            println!("pruned {} audit event(s)", r.pruned);
        }
        AdminCommand::Audit(AuditCommand::List {
            json,
            record,
            owner,
            from_ms,
            to_ms,
            conn,
        }) => {
            let req = v1::AuditLogRequest {
                from_time_ms: from_ms,
                to_time_ms: to_ms,
                record_id: record.unwrap_or_default(),
                owner: owner.unwrap_or_default(),
                instance: String::new(),
            };
            let mut stream = client(&conn).await?.audit_log(req).await?.into_inner();
            while let Some(e) = stream.message().await? {
                if json {
                    println!("{}", crate::audit::sink::line(&e.instance, e.seq, &e.raw));
                    continue;
                }
                let text = format!(
                    "{}{} {} caller={} action={} outcome={} record={} owner={} {}",
                    if e.instance.is_empty() {
                        String::new()
                    } else {
                        format!("{}/", e.instance)
                    },
                    e.seq,
                    e.time_ms,
                    e.caller,
                    e.action,
                    e.outcome,
                    if e.record_hmac.is_empty() {
                        "-"
                    } else {
                        &e.record_hmac[..16]
                    },
                    if e.owner_hmac.is_empty() {
                        "-"
                    } else {
                        &e.owner_hmac[..16]
                    },
                    e.detail
                );
                println!("{text}");
            }
        }
    }
    Ok(())
}

fn state_name(r: &v1::RecordInfo, now: i64) -> &'static str {
    let expires_at = r.meta.as_ref().map_or(0, |m| m.expires_at);
    if r.revoked {
        "revoked"
    } else if r.needs_reauth {
        "needs-reauth"
    } else if expires_at != 0 && expires_at <= now {
        "expired"
    } else {
        "usable"
    }
}

/// Record metadata as `admin records --json` prints it: one object per line.
pub(crate) fn record_json(r: &v1::RecordInfo, now: i64) -> serde_json::Value {
    let m = r.meta.clone().unwrap_or_default();
    serde_json::json!({
        "id": m.id,
        "owner": m.owner,
        "provider": m.provider,
        "kind": crate::api::secret_kind(m.kind).map_or("unspecified", |k| k.as_str()),
        "scopes": m.scopes,
        "expires_at": m.expires_at,
        "created_at": r.created_at,
        "updated_at": r.updated_at,
        "version": r.version,
        "key_version": r.key_version,
        "revoked": r.revoked,
        "needs_reauth": r.needs_reauth,
        "state": state_name(r, now),
    })
}

/// One delivery as `admin webhooks` prints it: JSON with every field, or one line without
/// the body.
fn delivery_line(d: &v1::Delivery, json: bool) -> String {
    if json {
        return serde_json::json!({
            "id": d.id,
            "event_id": d.event_id,
            "type": d.r#type,
            "endpoint": d.endpoint,
            "record_id": d.record_id,
            "state": d.state,
            "attempts": d.attempts,
            "created_at": d.created_at,
            "next_attempt_at": d.next_attempt_at,
            "finished_at": d.finished_at,
            "last_error": d.last_error,
            "body": d.body,
        })
        .to_string();
    }
    format!(
        "{}  {} state={} attempts={} record={} created_at={} next_attempt_at={} finished_at={} last_error={:?}",
        d.id,
        d.r#type,
        d.state,
        d.attempts,
        d.record_id,
        d.created_at,
        d.next_attempt_at,
        d.finished_at,
        d.last_error
    )
}

async fn records(a: RecordsArgs) -> Result<(), CliError> {
    let kind = match &a.kind {
        Some(k) => crate::record::SecretKind::parse(k)
            .map(|k| v1::SecretKind::from(k) as i32)
            .map_err(|e| CliError::Input(e.to_string()))?,
        None => 0,
    };
    let state = match a.state.as_deref() {
        Some("revoked") => v1::RecordState::Revoked,
        Some("needs-reauth") => v1::RecordState::NeedsReauth,
        Some("expired") => v1::RecordState::Expired,
        Some("usable") => v1::RecordState::Usable,
        _ => v1::RecordState::Unspecified,
    };
    let mut c = client(&a.conn).await?;
    let mut request = v1::ListRecordsRequest {
        provider: a.provider.clone().unwrap_or_default(),
        owner: a.owner.clone().unwrap_or_default(),
        kind,
        state: state as i32,
        key_version: a.key_version.unwrap_or(0),
        page_size: 1000,
        page_token: String::new(),
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    let mut printed = 0u64;
    loop {
        let page = c.list_records(request.clone()).await?.into_inner();
        for r in &page.records {
            if a.limit != 0 && printed == a.limit {
                return Ok(());
            }
            let line = if a.json {
                record_json(r, now).to_string()
            } else {
                let m = r.meta.clone().unwrap_or_default();
                format!(
                    "{}  provider={} kind={} state={} version={} key_version={} expires_at={} owner={}",
                    m.id,
                    m.provider,
                    crate::api::secret_kind(m.kind).map_or("unspecified", |k| k.as_str()),
                    state_name(r, now),
                    r.version,
                    r.key_version,
                    m.expires_at,
                    m.owner
                )
            };
            println!("{line}");
            printed += 1;
        }
        if page.next_page_token.is_empty() {
            return Ok(());
        }
        request.page_token = page.next_page_token;
    }
}

/// Verifies every chain the daemon streams, one after another, in constant memory, and reports
/// each one: a broken chain does not stop the check of the others. Fails (exit 6) if any is
/// broken, naming each broken chain's first bad link.
async fn verify_audit(conn: &Connection, quiet: bool, json: bool) -> Result<(), CliError> {
    use crate::audit::{ChainError, ChainVerifier, Checkpoint};
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new_spinner()
    };
    bar.set_style(
        ProgressStyle::with_template("verifying audit chain{msg}: {pos} events  {per_sec}")
            .expect("static template"),
    );
    let mut stream = client(conn)
        .await?
        .audit_log(v1::AuditLogRequest::default())
        .await?
        .into_inner();
    let mut broken: Vec<String> = Vec::new();
    let mut chains = 0usize;
    // Ends one chain's check: prints its line and keeps a broken one's first bad link.
    let mut report = |instance: &str, result: Result<u64, ChainError>| {
        chains += 1;
        if json {
            let line = serde_json::json!({
                "instance": instance,
                "events": result.as_ref().ok(),
                "intact": result.is_ok(),
                "error": result.as_ref().err().map(ToString::to_string),
            });
            bar.suspend(|| println!("{line}"));
        }
        let name = if instance.is_empty() {
            String::new()
        } else {
            format!(" of instance {instance}")
        };
        match result {
            Ok(n) => {
                if !json {
                    bar.suspend(|| println!("audit chain{name} intact: {n} event(s)"));
                }
            }
            Err(e) => {
                let line = if instance.is_empty() {
                    e.to_string()
                } else {
                    format!("chain{name}: {e}")
                };
                if !json {
                    bar.suspend(|| println!("{line}"));
                }
                broken.push(line);
            }
        }
    };
    // The chain being checked; once broken, its remaining events are only counted.
    let mut current: Option<(String, Result<ChainVerifier, ChainError>)> = None;
    while let Some(e) = stream.message().await? {
        if current.as_ref().is_none_or(|(i, _)| *i != e.instance) {
            if let Some((instance, state)) = current.take() {
                report(&instance, state.and_then(ChainVerifier::finish));
            }
            let checkpoint = (e.checkpoint_seq != 0).then(|| Checkpoint {
                seq: e.checkpoint_seq,
                hash: e.checkpoint_hash.as_slice().try_into().unwrap_or([0; 32]),
            });
            bar.set_message(if e.instance.is_empty() {
                String::new()
            } else {
                format!(" {}", e.instance)
            });
            current = Some((e.instance.clone(), Ok(ChainVerifier::new(checkpoint))));
        }
        if let Some((_, state)) = current.as_mut()
            && let Ok(verifier) = state
            && let Err(err) = verifier.push(e.seq, &e.raw)
        {
            *state = Err(err);
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let (instance, state) =
        current.unwrap_or_else(|| (String::new(), Ok(ChainVerifier::new(None))));
    report(&instance, state.and_then(ChainVerifier::finish));
    match broken.as_slice() {
        [] => Ok(()),
        [one] => Err(CliError::Precondition(one.clone())),
        several => Err(CliError::Precondition(format!(
            "{} of {chains} audit chains broken: {}",
            several.len(),
            several.join("; ")
        ))),
    }
}

async fn emergency(e: EmergencyArgs) -> Result<(), CliError> {
    let a = e.rewrap;
    let rotated = client(&a.conn)
        .await?
        .rotate_key(v1::RotateKeyRequest {
            algorithm: e.algorithm.unwrap_or_default(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let active = rotated
        .active
        .ok_or_else(|| CliError::Internal("no active key in reply".into()))?;
    println!("1/4 rotated: {}", describe(&active));
    let p = rewrap(&a).await?;
    println!(
        "2/4 rewrapped {} record(s) to v{} in {:.1}s",
        p.rewrapped, p.target_version, p.elapsed_seconds
    );
    if p.failed > 0 {
        return Err(CliError::Precondition(format!(
            "{} record(s) could not be opened; old keys kept so they are not lost; see the daemon log",
            p.failed
        )));
    }
    let mut c = client(&a.conn).await?;
    let keys = c.list_keys(v1::ListKeysRequest {}).await?.into_inner().keys;
    for k in keys.iter().filter(|k| k.version != active.version) {
        if k.state == v1::KeyState::DecryptOnly as i32 {
            c.retire_key(v1::RetireKeyRequest { version: k.version })
                .await?;
            println!("3/4 retired v{}", k.version);
        }
        // Idempotent: a version pending destruction keeps its date, a destroyed one is
        // checked again for leftover key material.
        let answer = c
            .destroy_key(v1::DestroyKeyRequest { version: k.version })
            .await?
            .into_inner();
        // The two-person rule never holds the rotation back: the version is retired and
        // opens nothing; only its destruction waits for a second admin.
        if let Some(held) = &answer.approval {
            println!(
                "4/4 v{} opens nothing; its destruction waits for approval: `tokenvault admin approve {}`",
                k.version, held.id
            );
            continue;
        }
        let r = answer.key.unwrap_or_default();
        if r.destroy_after != 0 {
            println!(
                "4/4 v{} opens nothing; its destruction is scheduled for {}",
                k.version,
                tokenvault_daemon::rfc3339(r.destroy_after)
            );
        } else {
            println!("4/4 v{} is {}", k.version, key_state(&r));
        }
    }
    // Verification report.
    let (keys, stats) = status(&a.conn).await?;
    println!("\nverification report");
    print_status(&keys, &stats);
    let stray: u64 = stats
        .records_per_key_version
        .iter()
        .filter(|c| c.key_version != active.version)
        .map(|c| c.records)
        .sum();
    // Every older version must open nothing: retired (its destruction awaiting approval),
    // pending destruction or destroyed.
    let old_alive: Vec<u32> = keys
        .iter()
        .filter(|k| {
            k.version != active.version
                && (k.state == v1::KeyState::Active as i32
                    || k.state == v1::KeyState::DecryptOnly as i32)
        })
        .map(|k| k.version)
        .collect();
    if stray == 0 && old_alive.is_empty() {
        println!(
            "VERIFIED: all {} record(s) are wrapped under v{} ({}, envelope v{}); every older version opens nothing (destroyed, or destroyed after [keys] destroy_waiting_days once asked and approved)",
            stats.records,
            active.version,
            active.algorithm,
            tokenvault_daemon::keys::Algorithm::parse(&active.algorithm)
                .map_or(1, |a| a.scheme().format_version())
        );
        Ok(())
    } else {
        Err(CliError::Internal(format!(
            "VERIFICATION FAILED: {stray} record(s) under older versions; versions that still open envelopes: {old_alive:?}"
        )))
    }
}
