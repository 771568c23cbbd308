//! `Ingest.ExchangeCode`: the daemon redeems a web tier's OAuth authorization code.
//!
//! Owns: checking the request (the caller's record policy, the provider's registered redirect
//! URIs, the code and PKCE verifier's shapes), the `authorization_code` grant at the
//! provider's token endpoint through its client (outbound policy, SSRF guard) with the client
//! secret from its sealed record, and the sealed token bundle written with its audit event in
//! one write.
//!
//! Must never: return, log or audit a token, the code, the verifier or the client secret; store
//! anything when the provider refuses the code.

use std::sync::Arc;

use super::refresh::{bundle_write, client_secret, post_token_request};
use super::{Caller, Vault, VaultError};
use crate::audit::Draft;
use crate::oauth::{self, TokenBundle};
use crate::record::{RecordMeta, SecretKind};
use crate::secret::Secret;
use crate::store::Mutation;

/// What the web tier hands over (`Ingest.ExchangeCode`).
#[derive(Debug)]
pub struct CodeExchange {
    /// The record to store (kind `token_bundle`).
    pub meta: RecordMeta,
    /// The authorization code.
    pub code: Secret,
    /// The PKCE code verifier.
    pub code_verifier: Secret,
    /// The authorization request's redirect URI.
    pub redirect_uri: String,
    /// 0 to create, else the version being replaced.
    pub expected_version: u64,
}

/// What was stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exchanged {
    /// The record's new version.
    pub version: u64,
    /// When the access token expires, if the provider said.
    pub expires_at: Option<i64>,
    /// The granted scopes.
    pub scopes: Vec<String>,
}

/// RFC 7636 §4.1: 43-128 characters of the unreserved set.
fn check_verifier(v: &[u8]) -> Result<(), VaultError> {
    if (43..=128).contains(&v.len())
        && v.iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
    {
        Ok(())
    } else {
        Err(VaultError::BadExchange(
            "code_verifier must be 43-128 characters of A-Z a-z 0-9 - . _ ~ (RFC 7636)",
        ))
    }
}

fn check_code(c: &[u8]) -> Result<(), VaultError> {
    if (1..=2048).contains(&c.len()) && c.iter().all(|b| (0x21..=0x7e).contains(b)) {
        Ok(())
    } else {
        Err(VaultError::BadExchange(
            "code must be 1-2048 printable ASCII bytes",
        ))
    }
}

impl Vault {
    /// Redeems `req.code` at the provider and stores the token bundle under `req.meta`.
    pub async fn exchange_code(
        self: &Arc<Self>,
        caller: &Caller,
        req: CodeExchange,
    ) -> Result<Exchanged, VaultError> {
        if req.meta.kind != SecretKind::TokenBundle {
            return Err(VaultError::BadExchange(
                "meta.kind must be SECRET_KIND_TOKEN_BUNDLE: the daemon stores the whole token response",
            ));
        }
        caller
            .policy
            .check_record(&req.meta)
            .map_err(VaultError::PolicyDenied)?;
        check_code(req.code.expose_secret())?;
        check_verifier(req.code_verifier.expose_secret())?;
        let provider = req.meta.provider.to_string();
        let upstream = self
            .upstreams()
            .get(&provider)
            .ok_or_else(|| VaultError::NoProvider(provider.clone()))?;
        let config = upstream
            .policy()
            .oauth
            .clone()
            .ok_or_else(|| VaultError::NoRefresh(provider.clone()))?;
        if !config.redirect_uris.contains(&req.redirect_uri) {
            return Err(VaultError::RedirectNotRegistered(provider));
        }
        // The code can be redeemed once: a write the store would refuse (the record exists,
        // or is at another version than expected) is refused before the code is spent.
        let (id, expected) = (req.meta.id.clone(), req.expected_version);
        self.blocking(move |v| {
            let actual = v.store.get_record(&id)?.map_or(0, |r| r.version);
            match crate::store::version_refusal(&id, expected, actual) {
                Some(refused) => Err(refused.into()),
                None => Ok(()),
            }
        })
        .await?;
        let secret = client_secret(self, &config).await?;
        // Both were checked to be ASCII above.
        let text = |s: &Secret| String::from_utf8_lossy(s.expose_secret()).into_owned();
        let (code, verifier) = (
            zeroize::Zeroizing::new(text(&req.code)),
            zeroize::Zeroizing::new(text(&req.code_verifier)),
        );
        let request = oauth::code_request(&config, &code, &verifier, &req.redirect_uri, &secret)
            .map_err(|source| VaultError::Exchange {
                provider: provider.clone(),
                source,
            })?;
        drop((secret, code, verifier));
        let audit = |outcome: &str| {
            let draft = Draft::new(&caller.name, "ExchangeCode")
                .record(req.meta.id.as_str())
                .owner(req.meta.owner.as_str())
                .outcome(outcome);
            self.audit_off_executor(draft, "a refused code exchange")
        };
        let response = match post_token_request(&upstream, &config, request).await {
            Ok(r) => r,
            Err(e) => {
                audit("Unavailable").await;
                return Err(VaultError::Proxy(e));
            }
        };
        let now = self.now();
        let answer = match oauth::parse_token_response(response.status, &response.body) {
            Ok(a) => a,
            Err(source) => {
                let error = VaultError::Exchange { provider, source };
                audit(error.kind().name()).await;
                return Err(error);
            }
        };
        let requested: Vec<String> = req
            .meta
            .scopes
            .iter()
            .map(|s| s.as_str().to_string())
            .collect();
        let bundle = TokenBundle::issued(answer, &requested, now);
        let s = Arc::clone(self);
        let caller_name = caller.name.clone();
        let expected_version = req.expected_version;
        let mut meta = req.meta;
        self.blocking(move |_| store(&s, &caller_name, &mut meta, &bundle, expected_version, now))
            .await
    }
}

/// Seals `bundle` under the active key and writes it with its audit event in one write.
fn store(
    s: &Vault,
    caller: &str,
    meta: &mut RecordMeta,
    bundle: &TokenBundle,
    expected_version: u64,
    now: i64,
) -> Result<Exchanged, VaultError> {
    let write = bundle_write(s, meta, bundle, expected_version)?;
    let draft = Draft::new(caller, "ExchangeCode")
        .record(meta.id.as_str())
        .owner(meta.owner.as_str())
        .outcome("ok");
    let mut mutations = s.outbox(&s.recoveries(std::slice::from_ref(&write))?);
    mutations.insert(0, Mutation::PutRecord(write));
    s.audit.append_with(&draft, |a| {
        s.store
            .apply(&mutations, std::slice::from_ref(a), now)
            .map(|()| ((), true))
            .map_err(VaultError::from)
    })?;
    s.forget_deks(Some(&meta.id));
    let version = s
        .store
        .get_record(&meta.id)?
        .map(|r| r.version)
        .ok_or(VaultError::Task)?;
    tracing::info!(record = %s.log_id(&meta.id), version, "authorization code exchanged and stored");
    Ok(Exchanged {
        version,
        expires_at: bundle.expires_at,
        scopes: bundle.scopes.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifier_and_code_shapes() {
        assert!(check_verifier(b"dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk").is_ok());
        assert!(check_verifier(&[b'a'; 42]).is_err());
        assert!(check_verifier(&[b'a'; 129]).is_err());
        assert!(check_verifier(&[b'+'; 43]).is_err());
        assert!(check_code(b"SplxlOBeZQQYbYS6WxSbIA").is_ok());
        assert!(check_code(b"").is_err());
        assert!(check_code(b"a b").is_err());
        assert!(check_code(&[b'a'; 2049]).is_err());
    }
}
