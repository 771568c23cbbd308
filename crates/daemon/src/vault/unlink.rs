//! A provider's unlink callback (Kakao's kind): the provider says a user withdrew consent, and
//! that owner's records of the provider are deleted (or revoked) in one audited write, with
//! their webhook events (docs/PROXY.md, "Unlink callbacks").
//!
//! The call carries no credential of ours: it is authenticated as the provider documents it
//! (`Authorization: KakaoAK <the app's admin key>` and the app id), optionally only from the
//! provider's published addresses. Checks run cheapest first, so a forgery costs a string
//! comparison; the admin key is decrypted once and kept for a minute. A refusal is the
//! adapter's to count (an unauthenticated refusal: no write, no log line).
//!
//! Must never: log or audit the admin key; act on a call whose key or app id do not match.

use std::sync::Arc;

use subtle::ConstantTimeEq as _;

use super::admin::{OwnerAction, SecurityEventOutcome, apply_owner_action};
use super::{Vault, VaultError};
use crate::provider::{UnlinkAction, UnlinkCallback};
use crate::record::{Owner, SecretKind};
use crate::secret::Secret;

/// How long a decrypted admin key is kept.
const KEY_FOR: std::time::Duration = std::time::Duration::from_secs(60);

/// An unlink callback as received.
#[derive(Debug)]
pub struct UnlinkCall {
    /// The provider named by the route.
    pub provider: String,
    /// The `Authorization` header, if any.
    pub authorization: Option<Secret>,
    /// The caller's address.
    pub source: Option<std::net::IpAddr>,
    /// `app_id`.
    pub app_id: String,
    /// `user_id`.
    pub user_id: String,
    /// `referrer_type` (why the user unlinked), audited as given if it is a short name.
    pub referrer: String,
}

/// Why an unlink callback was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum UnlinkRefused {
    /// The provider has no unlink callback.
    NoCallback,
    /// From an address outside `allowed_sources`.
    Source,
    /// A wrong or missing admin key, or another app id.
    Credential,
    /// `user_id` missing or not an owner.
    Malformed(&'static str),
    /// The same user's callback was applied within the last minute.
    Replayed,
}

/// The admin keys read, by provider.
pub(super) type AdminKeys =
    std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, Arc<Secret>)>>;

impl Vault {
    /// Applies an unlink callback: `Ok(Err(..))` for a refusal (nothing written), `Err` when
    /// the vault failed.
    pub async fn unlink_callback(
        self: &Arc<Self>,
        call: UnlinkCall,
    ) -> Result<Result<SecurityEventOutcome, UnlinkRefused>, VaultError> {
        let Some(config) = self
            .upstreams()
            .get(&call.provider)
            .and_then(|u| u.policy().unlink_callback.clone())
        else {
            return Ok(Err(UnlinkRefused::NoCallback));
        };
        if !config.allowed_sources.is_empty()
            && !call
                .source
                .is_some_and(|ip| config.allowed_sources.iter().any(|n| n.contains(&ip)))
        {
            return Ok(Err(UnlinkRefused::Source));
        }
        let presented = call
            .authorization
            .as_ref()
            .and_then(|a| a.expose_secret().strip_prefix(b"KakaoAK "))
            .map(<[u8]>::to_vec)
            .map(Secret::new);
        let (Some(presented), true) = (presented, call.app_id == config.app_id) else {
            return Ok(Err(UnlinkRefused::Credential));
        };
        let provider = call.provider.clone();
        let cfg = config.clone();
        let key = self.blocking(move |v| v.admin_key(&provider, &cfg)).await?;
        if !bool::from(presented.expose_secret().ct_eq(key.expose_secret())) {
            return Ok(Err(UnlinkRefused::Credential));
        }
        if call.user_id.is_empty() {
            return Ok(Err(UnlinkRefused::Malformed("user_id is missing")));
        }
        let Ok(owner) = Owner::parse(format!("{}{}", config.owner_prefix, call.user_id)) else {
            return Ok(Err(UnlinkRefused::Malformed(
                "user_id does not make an owner",
            )));
        };
        let referrer = if !call.referrer.is_empty()
            && call.referrer.len() <= 32
            && call
                .referrer
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b == b'_')
        {
            call.referrer.clone()
        } else {
            "-".into()
        };
        self.blocking(move |v| {
            use sha2::Digest as _;
            let now = v.now();
            // One callback per user and minute: a replay (or the provider's own retry) within
            // it is refused; a later one finds nothing left to do.
            let marker = hex::encode(sha2::Sha256::digest(format!(
                "unlink\0{}\0{}\0{}",
                call.provider,
                call.user_id,
                now / 60
            )));
            let what = match config.action {
                UnlinkAction::Delete => crate::security_event::Action::Delete,
                UnlinkAction::Revoke => crate::security_event::Action::Revoke,
            };
            let caller = format!("unlink-callback:{}", call.provider);
            let applied = apply_owner_action(
                v,
                &OwnerAction {
                    caller: &caller,
                    action: "UnlinkCallback",
                    reason: "unlink_callback",
                    detail: format!(
                        "{} app {} referrer {referrer}",
                        call.provider, config.app_id
                    ),
                    provider: &call.provider,
                    owner: &owner,
                    what: &what,
                    marker: &marker,
                    replayed: "this user's unlink callback was applied within the last minute"
                        .into(),
                },
                now,
            );
            match applied {
                Ok(outcome) => Ok(Ok(outcome)),
                Err(VaultError::Store(crate::store::StoreError::AlreadyExists(_))) => {
                    Ok(Err(UnlinkRefused::Replayed))
                }
                Err(e) => Err(e),
            }
        })
        .await
    }

    /// The provider's admin key from its sealed record, kept for [`KEY_FOR`].
    fn admin_key(
        &self,
        provider: &str,
        config: &UnlinkCallback,
    ) -> Result<Arc<Secret>, VaultError> {
        let mut keys = self
            .unlink_keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, key)) = keys.get(provider)
            && at.elapsed() < KEY_FOR
        {
            return Ok(Arc::clone(key));
        }
        let (record, secret) = super::refresh::read_open(self, &config.admin_key_record)?;
        if record.meta.kind != SecretKind::ClientSecret || record.revoked {
            return Err(VaultError::ClientSecret(
                config.admin_key_record.to_string(),
            ));
        }
        let key = Arc::new(secret);
        keys.insert(
            provider.to_string(),
            (std::time::Instant::now(), Arc::clone(&key)),
        );
        Ok(key)
    }
}
