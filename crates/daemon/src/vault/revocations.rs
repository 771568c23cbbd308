//! Revocation at the provider (docs/WEBHOOKS.md, "Revocation at the provider"): when an admin
//! revokes or deletes records with `revoke_at_provider`, the grant is withdrawn at the provider
//! too, through the outbox, so the local change never waits for the provider.
//!
//! The change writes one [`RevocationEntry`] per revocable record in its own store write (the
//! record's sealed envelope, as it was). The delivery job (under the `webhooks` lease) opens it
//! only to make the call: RFC 7009 with the provider's client authentication, or an unlink call
//! with the user's access token. A 2xx removes the entry with an audit event; a refusal (4xx)
//! is final; anything else is retried with the webhooks' backoff until `max_age_hours`. A
//! refusal or a final failure is audited and sent as a `record.provider_revocation_failed`
//! webhook, both in the write that removes the entry.
//!
//! Must never: log or audit the token, or keep the opened token past the call.

use std::sync::Arc;

use base64::Engine as _;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue};

use super::{Vault, VaultError};
use crate::audit::Draft;
use crate::oauth::TokenBundle;
use crate::provider::{Revocation, RevocationKind};
use crate::record::{Record, SecretKind};
use crate::store::{Mutation, StoreError};
use crate::webhook::{Event, EventType, RevocationEntry, next_attempt, order, revocation_key};

/// Revocations attempted per pass.
const PER_PASS: usize = 16;

impl Vault {
    /// The outbox entries that revoke `records` at their providers, for a change made because
    /// of `reason`, when `requested` (or, unset, the provider's `by_default`) asks for it. A
    /// record whose provider has no revocation, or whose kind holds no token (an API key, a
    /// client secret), gets none; `explicit` makes that an error instead (a single record's
    /// `Revoke` or `Delete` asked for something that cannot happen).
    pub(super) fn revocation_rows(
        &self,
        records: &[Record],
        reason: &str,
        requested: Option<bool>,
        explicit: bool,
    ) -> Result<Vec<(String, Vec<u8>)>, VaultError> {
        if requested == Some(false) {
            return Ok(Vec::new());
        }
        let upstreams = self.upstreams();
        let now_ms = self.now().saturating_mul(1000);
        let mut rows = Vec::new();
        for r in records {
            let revocation = upstreams
                .get(r.meta.provider.as_str())
                .and_then(|u| u.policy().revocation.clone());
            let wanted =
                requested.unwrap_or_else(|| revocation.as_ref().is_some_and(|v| v.by_default));
            if !wanted {
                continue;
            }
            let holds_token = matches!(
                r.meta.kind,
                SecretKind::AccessToken | SecretKind::RefreshToken | SecretKind::TokenBundle
            );
            if revocation.is_none() || !holds_token {
                if explicit && requested == Some(true) {
                    return Err(VaultError::NotRevocable {
                        id: r.meta.id.to_string(),
                        why: if holds_token {
                            format!(
                                "provider {} has no [providers.{}.revocation]",
                                r.meta.provider, r.meta.provider
                            )
                        } else {
                            format!("a {} record holds no OAuth token", r.meta.kind.as_str())
                        },
                    });
                }
                continue;
            }
            let entry = RevocationEntry {
                reason: reason.into(),
                record_id: r.meta.id.to_string(),
                owner: r.meta.owner.as_str().to_string(),
                provider: r.meta.provider.to_string(),
                record: base64::engine::general_purpose::STANDARD
                    .encode(crate::store::encode_record(r)),
                version: r.version,
                created_ms: now_ms,
                attempts: 0,
                next_attempt_ms: now_ms,
                last_error: None,
            };
            let id = format!("rev_{}", hex::encode(rand::random::<[u8; 12]>()));
            let key = revocation_key(&order(self.webhooks.stamp(), &id));
            rows.push((
                key,
                serde_json::to_vec(&entry).map_err(|_| VaultError::Task)?,
            ));
        }
        Ok(rows)
    }

    /// [`Vault::revocation_rows`] as mutations that create them.
    pub(super) fn revocations(
        &self,
        records: &[Record],
        reason: &str,
        requested: Option<bool>,
    ) -> Result<Vec<Mutation>, VaultError> {
        Ok(self
            .revocation_rows(records, reason, requested, true)?
            .into_iter()
            .map(|(key, value)| Mutation::PutOutbox {
                key,
                value: Some(value),
                expected: None,
            })
            .collect())
    }
}

/// The record an entry took, to open its envelope.
fn record_of(e: &RevocationEntry) -> Result<Record, String> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(&e.record)
        .map_err(|_| "the record is not base64".to_string())?;
    crate::store::decode_record(&bytes).map_err(|e| e.to_string())
}

/// How one revocation ended.
enum Outcome {
    /// The provider answered 2xx.
    Done,
    /// Final: a 4xx, or nothing that can be sent.
    Refused(String),
    /// Worth trying again.
    Failed(String),
}

/// The token to withdraw and its RFC 7009 hint: the refresh token when the record has one
/// (revoking it withdraws the grant), else the access token; an unlink call needs the access
/// token.
fn token_of(
    record: &Record,
    secret: &crate::secret::Secret,
    kind: RevocationKind,
) -> Result<(zeroize::Zeroizing<String>, &'static str), String> {
    let text = |b: &[u8]| {
        std::str::from_utf8(b)
            .map(|t| zeroize::Zeroizing::new(t.to_string()))
            .map_err(|_| "the token is not text".to_string())
    };
    match (record.meta.kind, kind) {
        (SecretKind::TokenBundle, _) => {
            let bundle = TokenBundle::parse(secret).map_err(|e| e.to_string())?;
            match (&bundle.refresh_token, kind) {
                (Some(rt), RevocationKind::Rfc7009) => Ok((rt.clone(), "refresh_token")),
                _ => Ok((bundle.access_token.clone(), "access_token")),
            }
        }
        (SecretKind::AccessToken, _) => Ok((text(secret.expose_secret())?, "access_token")),
        (SecretKind::RefreshToken, RevocationKind::Rfc7009) => {
            Ok((text(secret.expose_secret())?, "refresh_token"))
        }
        (SecretKind::RefreshToken, RevocationKind::Unlink) => {
            Err("an unlink call needs an access token; this record holds a refresh token".into())
        }
        (other, _) => Err(format!("a {} record holds no OAuth token", other.as_str())),
    }
}

/// Makes one entry's call.
async fn call(vault: &Arc<Vault>, entry: &RevocationEntry) -> Outcome {
    let upstream = vault.upstreams().get(&entry.provider);
    let Some((upstream, revocation)) = upstream.and_then(|u| {
        let r = u.policy().revocation.clone()?;
        Some((u, r))
    }) else {
        return Outcome::Refused(format!(
            "provider {} has no revocation configured any more",
            entry.provider
        ));
    };
    let record = match record_of(entry) {
        Ok(r) => r,
        Err(e) => return Outcome::Refused(format!("the stored entry is unusable: {e}")),
    };
    let opened = {
        let record = record.clone();
        // The general blocking pool, not the private-key pool: that one serves GetToken and
        // Proxy only (docs/ARCHITECTURE.md); a revocation is rare background work.
        vault
            .blocking(move |v| {
                super::records::open(v, &record.meta.id, &record, &v.keyring()).map_err(|source| {
                    VaultError::Open {
                        id: record.meta.id.to_string(),
                        source,
                    }
                })
            })
            .await
    };
    let secret = match opened {
        Ok(s) => s,
        Err(e) => return Outcome::Refused(format!("the record does not open: {e}")),
    };
    let (token, hint) = match token_of(&record, &secret, revocation.kind) {
        Ok(t) => t,
        Err(e) => return Outcome::Refused(e),
    };
    drop(secret);
    let answer = send(vault, &upstream, &revocation, &token, hint).await;
    drop(token);
    match answer {
        Ok(status) if (200..300).contains(&status) => Outcome::Done,
        Ok(status) if (400..500).contains(&status) && status != 408 && status != 429 => {
            Outcome::Refused(format!("the provider answered HTTP {status}"))
        }
        Ok(status) => Outcome::Failed(format!("the provider answered HTTP {status}")),
        Err(e) => Outcome::Failed(e),
    }
}

/// Sends the call; the provider's HTTP status, or why nothing was answered.
async fn send(
    vault: &Arc<Vault>,
    upstream: &crate::proxy::Upstream,
    revocation: &Revocation,
    token: &str,
    hint: &str,
) -> Result<u16, String> {
    let answer = match revocation.kind {
        RevocationKind::Rfc7009 => {
            let oauth = upstream
                .policy()
                .oauth
                .clone()
                .ok_or_else(|| "rfc7009 needs [oauth]".to_string())?;
            let client_secret = super::refresh::client_secret(vault, &oauth)
                .await
                .map_err(|e| e.to_string())?;
            let request = crate::oauth::revocation_request(&oauth, token, hint, &client_secret)
                .map_err(|e| e.to_string())?;
            drop(client_secret);
            let auth = request.authorization.as_ref().and_then(|a| {
                let mut v = HeaderValue::from_str(a).ok()?;
                v.set_sensitive(true);
                Some(v)
            });
            upstream
                .post_form(
                    &revocation.endpoint,
                    auth,
                    Bytes::copy_from_slice(&request.body),
                )
                .await
        }
        RevocationKind::Unlink => {
            let mut headers = HeaderMap::new();
            let mut bearer = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| "the access token is not a header value".to_string())?;
            bearer.set_sensitive(true);
            headers.insert(http::header::AUTHORIZATION, bearer);
            upstream
                .post(&revocation.endpoint, headers, Bytes::new())
                .await
        }
    };
    answer.map(|r| r.status).map_err(|e| e.to_string())
}

/// One pass over the revocations that are due: how many were attempted.
pub(super) async fn pass(vault: &Arc<Vault>) -> Result<usize, VaultError> {
    let now_ms = vault.now().saturating_mul(1000);
    let due: Vec<(String, Vec<u8>, RevocationEntry)> = vault
        .blocking(move |v| {
            let page = v.store.outbox_page(&revocation_key(""), None, 256)?;
            Ok(page
                .into_iter()
                .filter_map(|(key, read)| {
                    let e: RevocationEntry = serde_json::from_slice(&read).ok()?;
                    (e.next_attempt_ms <= now_ms).then_some((key, read, e))
                })
                .take(PER_PASS)
                .collect())
        })
        .await?;
    if due.is_empty() {
        return Ok(0);
    }
    let owner = vault.instance_id.clone();
    let leased = vault
        .blocking(move |v| {
            Ok(v.store
                .acquire_lease("webhooks", &owner, std::time::Duration::from_secs(30))?)
        })
        .await?;
    if leased.is_none() {
        return Ok(0);
    }
    let n = due.len();
    for (key, read, mut entry) in due {
        let outcome = call(vault, &entry).await;
        // The record id is personal data: the log names the provider and the outcome only.
        let provider = entry.provider.clone();
        match &outcome {
            Outcome::Done => tracing::info!(%provider, "a grant was revoked at its provider"),
            Outcome::Refused(why) | Outcome::Failed(why) => {
                tracing::warn!(%provider, reason = %why, "a revocation at the provider did not succeed");
            }
        }
        vault
            .blocking(move |v| {
                let now_ms = v.now().saturating_mul(1000);
                entry.attempts = entry.attempts.saturating_add(1);
                let remove = Mutation::PutOutbox {
                    key: key.clone(),
                    value: None,
                    expected: Some(read.clone()),
                };
                let draft = |outcome: &str| {
                    Draft::new("revoke-at-provider", "RevokeAtProvider")
                        .record(&entry.record_id)
                        .owner(&entry.owner)
                        .outcome(outcome)
                        .detail(format!(
                            "provider {}, after {}",
                            entry.provider, entry.reason
                        ))
                };
                let failed_event = |why: &str| {
                    let mut data = serde_json::Map::new();
                    data.insert("record_id".into(), entry.record_id.clone().into());
                    data.insert("provider".into(), entry.provider.clone().into());
                    data.insert("owner".into(), entry.owner.clone().into());
                    data.insert("version".into(), entry.version.into());
                    data.insert("reason".into(), why.into());
                    Event {
                        kind: EventType::ProviderRevocationFailed,
                        record: Some(entry.record_id.clone()),
                        provider: Some(entry.provider.clone()),
                        data,
                    }
                };
                let (mutations, draft) = match &outcome {
                    Outcome::Done => (vec![remove], Some(draft("ok"))),
                    Outcome::Refused(why) => {
                        let mut m = vec![remove];
                        m.extend(v.outbox(&[failed_event(why)]));
                        (m, Some(draft(&format!("refused: {why}"))))
                    }
                    Outcome::Failed(why) => {
                        let age = now_ms.saturating_sub(entry.created_ms);
                        let horizon =
                            i64::try_from(v.webhooks.max_age().as_millis()).unwrap_or(i64::MAX);
                        if age >= horizon {
                            let mut m = vec![remove];
                            m.extend(v.outbox(&[failed_event(why)]));
                            (m, Some(draft(&format!("failed: {why}"))))
                        } else {
                            entry.last_error = Some(why.clone());
                            let wait = next_attempt(entry.attempts, rand::random::<f64>());
                            entry.next_attempt_ms = now_ms.saturating_add(
                                i64::try_from(wait.as_millis()).unwrap_or(i64::MAX),
                            );
                            let update = Mutation::PutOutbox {
                                key: key.clone(),
                                value: Some(
                                    serde_json::to_vec(&entry).map_err(|_| VaultError::Task)?,
                                ),
                                expected: Some(read.clone()),
                            };
                            (vec![update], None)
                        }
                    }
                };
                let written = match draft {
                    Some(draft) => v.audit.append_with(&draft, |a| {
                        v.store
                            .apply(&mutations, std::slice::from_ref(a), v.now())
                            .map(|()| ((), true))
                            .map_err(VaultError::from)
                    }),
                    None => v
                        .store
                        .apply(&mutations, &[], v.now())
                        .map_err(VaultError::from),
                };
                match written {
                    Ok(()) => Ok(()),
                    // Another daemon took the lease and recorded this entry first.
                    Err(VaultError::Store(StoreError::Conflict(_))) => Ok(()),
                    Err(e) => Err(e),
                }
            })
            .await?;
    }
    Ok(n)
}

/// Makes the revocations that are due every `[webhooks] poll_ms` until `stop`: a task of its
/// own, so a provider that hangs holds back no webhook, and always running (a provider may
/// gain a revocation on reload).
pub(super) async fn run(vault: Arc<Vault>, stop: tokio_util::sync::CancellationToken) {
    let poll = vault.webhooks.poll();
    loop {
        let pause = match pass(&vault).await {
            Ok(n) if n > 0 => std::time::Duration::ZERO,
            Ok(_) => poll,
            Err(e) => {
                tracing::error!(error = %e, "revocations at providers failed; trying again in 30 s");
                std::time::Duration::from_secs(30)
            }
        };
        if stop.is_cancelled() {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = stop.cancelled() => return,
        }
    }
}
