//! Fetching security event issuers' JSON Web Key Sets (`jwks_url`).
//!
//! Owns: one client per JWKS (its own outbound policy: that host only, the SSRF guard) and
//! the rule for when to fetch: when a token names a `kid` the vault has not got, at most once
//! per [`MIN_REFETCH`] per issuer, so tokens with made-up `kid`s cannot make the daemon
//! hammer the issuer. A failed fetch keeps the keys already loaded.
//!
//! Must never: verify anything itself (security_event.rs does), or follow a redirect off the
//! configured host.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::proxy::Upstream;
use crate::security_event::{Issuer, IssuerKeys, Jwks};

/// The shortest time between two fetches of one issuer's JWKS, seconds (by the vault's clock).
pub(super) const MIN_REFETCH: i64 = 30;

/// The fetchers, by issuer index.
pub(super) struct JwksFetchers {
    by_issuer: HashMap<usize, (Arc<Jwks>, Arc<Upstream>)>,
    last: Mutex<HashMap<usize, i64>>,
}

impl JwksFetchers {
    pub(super) fn new(issuers: &[Issuer]) -> Result<Self, crate::proxy::UpstreamSetupError> {
        let mut by_issuer = HashMap::new();
        for (i, issuer) in issuers.iter().enumerate() {
            if let IssuerKeys::Jwks(jwks) = &issuer.key {
                let upstream = Arc::new(Upstream::new(jwks.policy.clone())?);
                by_issuer.insert(i, (Arc::clone(jwks), upstream));
            }
        }
        Ok(Self {
            by_issuer,
            last: Mutex::default(),
        })
    }

    /// Fetches issuer `index`'s JWKS unless it was fetched within [`MIN_REFETCH`] of `now`
    /// (Unix seconds); whether new keys were loaded.
    pub(super) async fn refresh(&self, index: usize, issuer: &str, now: i64) -> bool {
        let Some((jwks, upstream)) = self.by_issuer.get(&index) else {
            return false;
        };
        {
            let mut last = self
                .last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if last
                .get(&index)
                .is_some_and(|t| now.saturating_sub(*t) < MIN_REFETCH)
            {
                return false;
            }
            last.insert(index, now);
        }
        match upstream.get_json(&jwks.url).await {
            Ok(r) if r.status == 200 => match jwks.load(&r.body) {
                Ok(n) => {
                    tracing::info!(issuer, keys = n, "fetched the issuer's JWKS");
                    true
                }
                Err(e) => {
                    tracing::warn!(issuer, error = %e, "the issuer's JWKS was refused; keeping the keys already loaded");
                    false
                }
            },
            Ok(r) => {
                tracing::warn!(
                    issuer,
                    status = r.status,
                    "fetching the issuer's JWKS failed"
                );
                false
            }
            Err(e) => {
                tracing::warn!(issuer, error = %e, "fetching the issuer's JWKS failed");
                false
            }
        }
    }
}
