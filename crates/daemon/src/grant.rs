//! Downscoped access grants: short-lived opaque handles that let a worker make `Proxy` calls
//! for one record (or one owner's records) with fewer methods and paths, a use count and an
//! expiry, without any access of its own and without ever seeing the token.
//!
//! Owns: [`Grant`] (what a grant allows), handle generation and hashing, the stored encoding
//! and the checks a use must pass. Must never store the handle itself: only its SHA-256 is
//! kept (a stolen store does not yield usable grants), and `Debug` never shows it.

use prost::Message as _;
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};
use thiserror::Error;
use zeroize::Zeroizing;

use crate::proxy::target::path_has_prefix;
use crate::record::{Owner, RecordId, RecordMeta};
use crate::secret::GrantHandle;

/// Longest grant lifetime, seconds.
pub const MAX_TTL_SECONDS: i64 = 86_400;
/// Prefix of every handle (recognisable in logs and secret scanners).
pub const HANDLE_PREFIX: &str = "tvg_";

/// What a grant covers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// One record.
    Record(RecordId),
    /// Every record of one owner.
    Owner(Owner),
}

/// A stored grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// What it covers.
    pub subject: Subject,
    /// Allowed methods (uppercase); empty: the provider's.
    pub methods: Vec<String>,
    /// Allowed path prefixes; empty: the provider's.
    pub path_prefixes: Vec<String>,
    /// Unix seconds.
    pub expires_at: i64,
    /// Uses left; `None`: unlimited.
    pub uses_left: Option<u32>,
    /// Only this caller may use it.
    pub audience: Option<String>,
    /// Who issued it (for the audit trail).
    pub issuer: String,
    /// The issuer's provider restriction when it issued the grant (empty: none).
    pub providers: Vec<String>,
    /// The issuer's kind restriction when it issued the grant (empty: none).
    pub kinds: Vec<String>,
}

/// Why a grant was refused. Messages never contain the handle.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum GrantError {
    /// No such grant (never issued, revoked, or expired and removed).
    #[error("unknown, revoked or expired grant")]
    Unknown,
    /// Past its expiry.
    #[error("grant {0} has expired")]
    Expired(String),
    /// No uses left.
    #[error("grant {0} has no uses left")]
    UsedUp(String),
    /// Presented by another caller than its audience.
    #[error("grant {0} was issued for another caller")]
    WrongCaller(String),
    /// The request is outside what the grant allows.
    #[error("grant {id}: {why}")]
    OutOfScope {
        /// Grant id.
        id: String,
        /// What is outside.
        why: String,
    },
    /// The issue request is invalid.
    #[error("{0}")]
    Invalid(String),
}

/// A fresh handle and its id (the hex SHA-256 under which it is stored).
pub fn new_handle() -> (GrantHandle, String) {
    use base64::Engine as _;
    let mut raw = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(&mut raw[..]);
    let handle = GrantHandle::new(format!(
        "{HANDLE_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&raw[..])
    ));
    let id = grant_id(handle.expose_secret());
    (handle, id)
}

/// The id of a handle: lowercase hex SHA-256. An id given where a handle is expected (64 hex
/// digits) is returned as is, so RevokeGrant takes either.
pub fn grant_id(handle_or_id: &str) -> String {
    let is_id = handle_or_id.len() == 64
        && handle_or_id
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if is_id {
        return handle_or_id.to_string();
    }
    hex::encode(Sha256::digest(handle_or_id.as_bytes()))
}

impl Grant {
    /// Whether the grant no longer allows anything at `now` (Unix seconds).
    pub fn is_expired_at(&self, now: i64) -> bool {
        now >= self.expires_at
    }

    /// Checks the subject of a request and takes one use. Returns the updated grant to store.
    /// A grant whose last use is taken is kept (with no uses left) until it expires, so a later
    /// use is told "has no uses left" rather than "unknown".
    pub fn authorize(&self, id: &str, caller: &str, now: i64) -> Result<Grant, GrantError> {
        if self.is_expired_at(now) {
            return Err(GrantError::Expired(short(id)));
        }
        if self.audience.as_deref().is_some_and(|a| a != caller) {
            return Err(GrantError::WrongCaller(short(id)));
        }
        match self.uses_left {
            Some(0) => Err(GrantError::UsedUp(short(id))),
            Some(n) => Ok(Grant {
                uses_left: Some(n - 1),
                ..self.clone()
            }),
            None => Ok(self.clone()),
        }
    }

    /// Whether the grant covers this record.
    pub fn covers(&self, id: &str, meta: &RecordMeta) -> Result<(), GrantError> {
        let ok = match &self.subject {
            Subject::Record(r) => r == &meta.id,
            Subject::Owner(o) => o == &meta.owner,
        } && (self.providers.is_empty()
            || self.providers.iter().any(|p| p == meta.provider.as_str()))
            && (self.kinds.is_empty() || self.kinds.iter().any(|k| k == meta.kind.as_str()));
        if ok {
            Ok(())
        } else {
            Err(GrantError::OutOfScope {
                id: short(id),
                why: format!("record {} is not covered", meta.id),
            })
        }
    }

    /// Whether the grant allows this method and path (relative to the provider's base).
    pub fn allows(&self, id: &str, method: &str, path: &str) -> Result<(), GrantError> {
        let method = method.to_ascii_uppercase();
        if !self.methods.is_empty() && !self.methods.contains(&method) {
            return Err(GrantError::OutOfScope {
                id: short(id),
                why: format!("method {method} is not allowed"),
            });
        }
        let path_only = path.split('?').next().unwrap_or(path);
        if !self.path_prefixes.is_empty()
            && !self
                .path_prefixes
                .iter()
                .any(|p| path_has_prefix(path_only, p))
        {
            return Err(GrantError::OutOfScope {
                id: short(id),
                why: format!("path {path_only} is outside its path prefixes"),
            });
        }
        Ok(())
    }

    /// The stored encoding.
    pub fn encode(&self) -> Vec<u8> {
        let (record, owner) = match &self.subject {
            Subject::Record(r) => (r.to_string(), String::new()),
            Subject::Owner(o) => (String::new(), o.as_str().to_string()),
        };
        StoredGrant {
            record,
            owner,
            methods: self.methods.clone(),
            path_prefixes: self.path_prefixes.clone(),
            expires_at: self.expires_at,
            limited: self.uses_left.is_some(),
            uses_left: self.uses_left.unwrap_or(0),
            audience: self.audience.clone().unwrap_or_default(),
            issuer: self.issuer.clone(),
            providers: self.providers.clone(),
            kinds: self.kinds.clone(),
        }
        .encode_to_vec()
    }

    /// Decodes a stored grant; `None` if the bytes are not one.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        let s = StoredGrant::decode(bytes).ok()?;
        let subject = if s.owner.is_empty() {
            Subject::Record(RecordId::parse(s.record).ok()?)
        } else {
            Subject::Owner(Owner::parse(s.owner).ok()?)
        };
        Some(Self {
            subject,
            methods: s.methods,
            path_prefixes: s.path_prefixes,
            expires_at: s.expires_at,
            uses_left: s.limited.then_some(s.uses_left),
            audience: (!s.audience.is_empty()).then_some(s.audience),
            issuer: s.issuer,
            providers: s.providers,
            kinds: s.kinds,
        })
    }
}

/// The first 12 hex digits of a grant id, enough to name it in messages.
pub fn short(id: &str) -> String {
    id.chars().take(12).collect()
}

#[derive(Clone, PartialEq, prost::Message)]
struct StoredGrant {
    #[prost(string, tag = "1")]
    record: String,
    #[prost(string, tag = "2")]
    owner: String,
    #[prost(string, repeated, tag = "3")]
    methods: Vec<String>,
    #[prost(string, repeated, tag = "4")]
    path_prefixes: Vec<String>,
    #[prost(int64, tag = "5")]
    expires_at: i64,
    #[prost(bool, tag = "6")]
    limited: bool,
    #[prost(uint32, tag = "7")]
    uses_left: u32,
    #[prost(string, tag = "8")]
    audience: String,
    #[prost(string, tag = "9")]
    issuer: String,
    #[prost(string, repeated, tag = "10")]
    providers: Vec<String>,
    #[prost(string, repeated, tag = "11")]
    kinds: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::SecretKind;

    fn grant() -> Grant {
        Grant {
            subject: Subject::Record(RecordId::parse("r1").expect("id")),
            methods: vec!["GET".into()],
            path_prefixes: vec!["/user".into()],
            expires_at: 100,
            uses_left: Some(2),
            audience: Some("worker-1".into()),
            issuer: "issuer".into(),
            providers: vec!["github".into()],
            kinds: vec![],
        }
    }

    #[test]
    fn handles_are_random_and_only_their_hash_names_them() {
        let (a, id_a) = new_handle();
        let (b, id_b) = new_handle();
        assert_ne!(a, b);
        let a = a.expose_secret();
        assert!(a.starts_with(HANDLE_PREFIX) && a.len() == 4 + 43);
        assert_eq!(grant_id(a), id_a);
        assert_eq!(grant_id(&id_a), id_a);
        assert_ne!(id_a, id_b);
        assert!(!id_a.contains(&a[4..]));
    }

    #[test]
    fn uses_expiry_audience_and_scope() {
        let g = grant();
        let once = g.authorize("id", "worker-1", 50).expect("ok");
        assert_eq!(once.uses_left, Some(1));
        let spent = once.authorize("id", "worker-1", 50).expect("last use");
        assert_eq!(spent.uses_left, Some(0));
        assert_eq!(
            spent.authorize("id", "worker-1", 50),
            Err(GrantError::UsedUp("id".into()))
        );
        assert_eq!(
            Grant {
                uses_left: Some(0),
                ..g.clone()
            }
            .authorize("id", "worker-1", 50),
            Err(GrantError::UsedUp("id".into()))
        );
        assert_eq!(
            g.authorize("id", "worker-1", 100),
            Err(GrantError::Expired("id".into()))
        );
        assert_eq!(
            g.authorize("id", "worker-2", 50),
            Err(GrantError::WrongCaller("id".into()))
        );
        assert!(g.allows("id", "get", "/user/repos?x=1").is_ok());
        assert!(g.allows("id", "POST", "/user").is_err());
        assert!(g.allows("id", "GET", "/users").is_err());
        let meta = |id: &str, owner: &str| {
            RecordMeta::parse(id, owner, "github", SecretKind::AccessToken, &[], 0).expect("meta")
        };
        assert!(g.covers("id", &meta("r1", "a")).is_ok());
        assert!(g.covers("id", &meta("r2", "a")).is_err());
        let other_provider =
            RecordMeta::parse("r1", "a", "gitlab", SecretKind::AccessToken, &[], 0).expect("meta");
        assert!(g.covers("id", &other_provider).is_err());
        let by_owner = Grant {
            subject: Subject::Owner(Owner::parse("a").expect("owner")),
            ..g.clone()
        };
        assert!(by_owner.covers("id", &meta("r2", "a")).is_ok());
        assert!(by_owner.covers("id", &meta("r2", "b")).is_err());
        assert_eq!(Grant::decode(&g.encode()), Some(g.clone()));
        assert_eq!(Grant::decode(&by_owner.encode()), Some(by_owner));
        let unlimited = Grant {
            uses_left: None,
            audience: None,
            ..g
        };
        assert_eq!(Grant::decode(&unlimited.encode()), Some(unlimited));
    }
}
