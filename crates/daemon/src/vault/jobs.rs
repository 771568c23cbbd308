//! The vault's periodic jobs: the grant sweep, automatic rotation, the destruction of key
//! versions whose waiting period is over, background refresh, webhook delivery and the
//! provider reload on SIGHUP.
//!
//! Every job is tracked by the vault and stops when shutdown begins; a run that has started is
//! finished, never cancelled, since its blocking work must not outlive the vault.

use std::future::Future;
use std::sync::Arc;

use super::{Caller, Vault, grants, refresh};

/// Starts every job the configuration asks for.
pub(super) fn start(vault: &Arc<Vault>) {
    let stop = vault.stopping.clone();
    vault
        .tasks
        .spawn(sweep_grants(Arc::clone(vault), stop.clone()));
    vault
        .tasks
        .spawn(watch_private_key_threads(Arc::clone(vault), stop.clone()));
    if let Some(period) = vault.policy.auto_rotate_seconds {
        vault
            .tasks
            .spawn(auto_rotate(Arc::clone(vault), period, stop.clone()));
    }
    vault
        .tasks
        .spawn(destroy_due_keys(Arc::clone(vault), stop.clone()));
    vault
        .tasks
        .spawn(refresh::background(Arc::clone(vault), stop.clone()));
    if vault.shares_keys() {
        vault
            .tasks
            .spawn(follow_key_registry(Arc::clone(vault), stop.clone()));
        vault
            .tasks
            .spawn(hold_instance(Arc::clone(vault), stop.clone()));
    }
    if vault.shipper.is_some() {
        vault
            .tasks
            .spawn(ship_audit(Arc::clone(vault), stop.clone()));
    }
    if vault.retention_days.is_some() {
        vault
            .tasks
            .spawn(prune_audit(Arc::clone(vault), stop.clone()));
    }
    for index in 0..vault.webhooks.endpoint_count() {
        vault.tasks.spawn(super::webhooks::deliver(
            Arc::clone(vault),
            index,
            stop.clone(),
        ));
    }
    // Always: revocations at providers go through the outbox whether or not any webhook
    // endpoint is configured (and a provider may gain a revocation on reload).
    vault
        .tasks
        .spawn(super::revocations::run(Arc::clone(vault), stop.clone()));
    vault
        .tasks
        .spawn(summarize_refusals(Arc::clone(vault), stop.clone()));
    #[cfg(unix)]
    vault.tasks.spawn(reload_on_sighup(Arc::clone(vault), stop));
}

/// Writes the refusals without an authenticated caller into the audit trail every
/// `[limits] refusal_summary_seconds`, and once more at shutdown.
async fn summarize_refusals(vault: Arc<Vault>, stop: tokio_util::sync::CancellationToken) {
    let period = vault.limits.refusal_summary;
    // A full period first: a summary covers one period's refusals.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => break,
        }
        if let Err(e) = vault.blocking(|v| v.write_refusal_summary()).await {
            tracing::error!(error = %e, "writing the summary of refused requests failed");
        }
    }
    if let Err(e) = vault.blocking(|v| v.write_refusal_summary()).await {
        tracing::error!(error = %e, "writing the summary of refused requests at shutdown failed");
    }
}

/// How often new audit events are shipped to the sink: the most a shipped copy lags.
pub(super) const SHIP_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Ships the audit trail to the sink file, every [`SHIP_EVERY`].
async fn ship_audit(vault: Arc<Vault>, stop: tokio_util::sync::CancellationToken) {
    periodically(SHIP_EVERY, stop, || async {
        if let Err(e) = vault.blocking(|v| v.ship_audit()).await {
            tracing::error!(error = %e, "shipping the audit trail failed; retrying");
        }
    })
    .await;
    // What was appended during shutdown goes out too.
    if let Err(e) = vault.blocking(|v| v.ship_audit()).await {
        tracing::error!(error = %e, "shipping the audit trail at shutdown failed");
    }
}

/// Applies `[audit] retention_days` at startup and every ten minutes.
async fn prune_audit(vault: Arc<Vault>, stop: tokio_util::sync::CancellationToken) {
    periodically(std::time::Duration::from_secs(600), stop, || async {
        match vault.blocking(|v| v.prune_audit_now()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(pruned = n, "audit events past retention pruned"),
            Err(e) => tracing::error!(error = %e, "pruning the audit trail failed"),
        }
    })
    .await;
}

/// Rotates when the active key is older than `period` seconds (by the vault's clock); checks
/// once a minute (more often for periods under a minute, which only tests use).
async fn auto_rotate(vault: Arc<Vault>, period: i64, stop: tokio_util::sync::CancellationToken) {
    let every = u64::try_from(period.clamp(1, 60)).unwrap_or(60);
    periodically(std::time::Duration::from_secs(every), stop, || async {
        let due = vault.keyring().active().0.created_at.saturating_add(period) <= vault.now();
        if !due {
            return;
        }
        match vault.blocking(|v| v.rotate_now("auto-rotation")).await {
            Ok(r) => {
                tracing::info!(version = r.active.version, fingerprint = %r.active.id, "automatic rotation")
            }
            Err(e) => tracing::error!(error = %e, "automatic rotation failed"),
        }
    })
    .await;
}

/// How often key versions whose destruction is due are destroyed: the most a destruction lags
/// its date.
pub(super) const DESTROY_DUE_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Destroys the key versions whose waiting period is over (at start, then every
/// [`DESTROY_DUE_EVERY`]); on a shared store one daemon at a time does it.
async fn destroy_due_keys(vault: Arc<Vault>, stop: tokio_util::sync::CancellationToken) {
    periodically(DESTROY_DUE_EVERY, stop, || async {
        match vault.blocking(Vault::destroy_due_keys).await {
            Ok(done) => {
                for k in done {
                    tracing::info!(version = k.version, fingerprint = %k.id, "key version destroyed: its waiting period is over");
                }
            }
            Err(e) => tracing::error!(error = %e, "destroying key versions that are due failed; retrying"),
        }
    })
    .await;
}

/// How often a daemon sharing its store re-reads the key registry: the bound on how long it may
/// still use a version another daemon retired or destroyed (docs/THREAT_MODEL.md).
pub(super) const KEY_REGISTRY_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// Follows key lifecycle changes made by other daemons on the shared store; the registry read
/// is also the probe behind the health service's view of the database.
async fn follow_key_registry(vault: Arc<Vault>, stop: tokio_util::sync::CancellationToken) {
    periodically(KEY_REGISTRY_POLL, stop, || async {
        let synced = vault.blocking(Vault::sync_keyring).await.map(|_| ());
        vault.probed_store(&synced);
        // An unreachable database is logged once, by the probe, not every second.
        if let Err(e) = synced
            && !matches!(
                e,
                super::VaultError::Store(crate::store::StoreError::Unavailable(_))
            )
        {
            tracing::warn!(error = %e, "reading the shared key registry failed");
        }
    })
    .await;
}

/// Checks every second whether the private-key threads are all held by calls that do not
/// return ([`Vault::private_keys_available`]).
async fn watch_private_key_threads(vault: Arc<Vault>, stop: tokio_util::sync::CancellationToken) {
    periodically(std::time::Duration::from_secs(1), stop, || async {
        vault.check_private_key_threads();
    })
    .await;
}

/// Renews this daemon's claim on its instance name.
async fn hold_instance(vault: Arc<Vault>, stop: tokio_util::sync::CancellationToken) {
    periodically(super::INSTANCE_LEASE / 3, stop, || async {
        let renewed = vault
            .blocking(|v| {
                let name = v.instance_lease();
                Ok(v.store
                    .acquire_lease(&name, &v.instance_id, super::INSTANCE_LEASE)?)
            })
            .await;
        match renewed {
            Ok(Some(_)) => {}
            Ok(None) => tracing::error!(
                "another daemon took this daemon's instance name (this one stalled past its lease); its audit appends will conflict"
            ),
            Err(e) => tracing::warn!(error = %e, "renewing the instance lease failed"),
        }
    })
    .await;
}

/// Deletes expired grants and lapsed approval requests at startup and every
/// [`grants::SWEEP_EVERY`].
async fn sweep_grants(vault: Arc<Vault>, stop: tokio_util::sync::CancellationToken) {
    periodically(grants::SWEEP_EVERY, stop, || async {
        match vault.blocking(|v| grants::sweep_expired(v, v.now())).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "expired grants deleted"),
            Err(e) => tracing::error!(error = %e, "sweeping expired grants failed"),
        }
        match vault
            .blocking(|v| super::approvals::sweep_expired(v, v.now()))
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(deleted = n, "lapsed approval requests deleted"),
            Err(e) => tracing::error!(error = %e, "sweeping lapsed approval requests failed"),
        }
    })
    .await;
}

/// Runs `job` now and then every `period` until `stop` is cancelled. A run that has started is
/// finished, never cancelled: its blocking work must not outlive the vault.
async fn periodically<F: Future<Output = ()>>(
    period: std::time::Duration,
    stop: tokio_util::sync::CancellationToken,
    mut job: impl FnMut() -> F,
) {
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = tick.tick() => job().await,
            () = stop.cancelled() => return,
        }
    }
}

/// Reloads the providers on every SIGHUP, until shutdown.
#[cfg(unix)]
async fn reload_on_sighup(vault: Arc<Vault>, stop: tokio_util::sync::CancellationToken) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; use Admin.ReloadProviders");
        return;
    };
    loop {
        tokio::select! {
            got = hup.recv() => {
                if got.is_none() {
                    return;
                }
                // Errors are logged and audited inside.
                let _ = vault.reload_providers(&Caller::internal("SIGHUP")).await;
            }
            () = stop.cancelled() => return,
        }
    }
}
