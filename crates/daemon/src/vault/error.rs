//! The vault's one error type and its classification.
//!
//! Owns: [`VaultError`], what every use case returns, and [`ErrorKind`], the transport-neutral
//! class each error falls into (named after the canonical gRPC codes, which the HTTP table in
//! docs follows one to one). The match in [`VaultError::kind`] is exhaustive over this crate's
//! nested error enums, so a new variant fails to compile until someone classifies it.
//!
//! Must never: name a transport (tonic, HTTP), or put a secret, an owner or stored bytes into a
//! message. Adapters map [`ErrorKind`] to their status once, at the edge.

use thiserror::Error;

use crate::envelope::{DecryptError, FormatError};
use crate::keys::{KeyId, KeyState};
use crate::record::ValidationError;
use crate::store::StoreError;

/// How a failure is classified; each adapter maps a kind to exactly one of its statuses.
/// Names and meanings follow the canonical gRPC status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The input is malformed or fails validation.
    InvalidArgument,
    /// The named thing does not exist.
    NotFound,
    /// The thing to create exists already.
    AlreadyExists,
    /// The caller may not do this.
    PermissionDenied,
    /// A limit was reached (rate, size, capacity).
    ResourceExhausted,
    /// The system is not in a state that allows this.
    FailedPrecondition,
    /// A concurrent change won; retrying may succeed.
    Aborted,
    /// An upstream took too long.
    DeadlineExceeded,
    /// Retrying later may succeed.
    Unavailable,
    /// Stored data is damaged.
    DataLoss,
    /// A fault inside the vault; details go to the log only.
    Internal,
}

impl ErrorKind {
    /// The canonical name (`PermissionDenied`), as written into audit outcomes.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::InvalidArgument => "InvalidArgument",
            ErrorKind::NotFound => "NotFound",
            ErrorKind::AlreadyExists => "AlreadyExists",
            ErrorKind::PermissionDenied => "PermissionDenied",
            ErrorKind::ResourceExhausted => "ResourceExhausted",
            ErrorKind::FailedPrecondition => "FailedPrecondition",
            ErrorKind::Aborted => "Aborted",
            ErrorKind::DeadlineExceeded => "DeadlineExceeded",
            ErrorKind::Unavailable => "Unavailable",
            ErrorKind::DataLoss => "DataLoss",
            ErrorKind::Internal => "Internal",
        }
    }
}

/// Everything a use case of the vault can fail with.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum VaultError {
    /// Caller input failed validation.
    #[error("invalid {what}: {source}")]
    Invalid {
        /// What was being validated.
        what: String,
        /// Why.
        #[source]
        source: ValidationError,
    },
    /// A required message field was absent.
    #[error("{0} is required")]
    Missing(&'static str),
    /// An approval under the two-person rule was refused.
    #[error(transparent)]
    Approval(#[from] super::approvals::ApprovalError),
    /// A request field outside what the call accepts (a page size, a page token).
    #[error("invalid {what}: {why}")]
    Argument {
        /// The field.
        what: &'static str,
        /// What is wrong with it (never its value).
        why: String,
    },
    /// A malformed envelope.
    #[error("malformed envelope: {0}")]
    Envelope(#[from] FormatError),
    /// The sealed secret is outside the documented 1..=max bytes.
    #[error("the sealed secret is {len} bytes; a secret must be 1 to {max} bytes")]
    SecretLength {
        /// Length of the sealed secret.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// Envelope sealed under a key the daemon does not know.
    #[error("envelope is sealed under unknown key {0}; seal with the key from Ingest.PublicKeys")]
    UnknownKey(KeyId),
    /// Envelope sealed under a key no longer accepted.
    #[error(
        "envelope is sealed under key version {version}, which is {state}; seal with the key from Ingest.PublicKeys"
    )]
    KeyNotAccepted {
        /// Version.
        version: u32,
        /// State.
        state: KeyState,
    },
    /// Envelope sealed under a decrypt-only version whose ingest grace period has ended.
    #[error(
        "envelope is sealed under key version {version}, decrypt-only since {since} (Unix seconds); its ingest grace period of {grace_seconds} s has ended; seal with the key from Ingest.PublicKeys"
    )]
    GraceEnded {
        /// Version.
        version: u32,
        /// When it stopped being active.
        since: i64,
        /// Configured grace.
        grace_seconds: i64,
    },
    /// Envelope sealed under a version below the minimum decryption version.
    #[error(
        "envelope is sealed under key version {version}, below the minimum decryption version {minimum}"
    )]
    BelowMinimum {
        /// Version.
        version: u32,
        /// Minimum.
        minimum: u32,
    },
    /// A key lifecycle operation was refused.
    #[error(transparent)]
    Rotation(#[from] crate::rotation::RotationError),
    /// A key could not be created or loaded.
    #[error("key operation failed: {0}")]
    Key(#[from] crate::keys::KeyError),
    /// The audit trail could not record the action, so it was not performed.
    #[error(transparent)]
    Audit(#[from] crate::audit::AuditError),
    /// The caller's policy does not cover this record.
    #[error("permission denied: {0}")]
    PolicyDenied(#[from] crate::config::PolicyDenial),
    /// The caller exceeded its per-record rate limit.
    #[error("credential '{caller}' exceeded its rate limit of {rate} requests/s for record {id}")]
    RecordRateLimited {
        /// Caller name.
        caller: String,
        /// Configured rate.
        rate: u32,
        /// Record id.
        id: String,
    },
    /// The daemon is overloaded: the request could not start on a private-key thread within
    /// `[limits] max_queue_wait_ms` and was refused rather than queued.
    #[error("overloaded: {reason}; retry in {retry_ms} ms")]
    Overloaded {
        /// Why (queue full, waited too long).
        reason: String,
        /// How long the caller should wait before retrying.
        retry_ms: u64,
    },
    /// A key supplied for import was refused.
    #[error("invalid key: {0}")]
    BadKey(String),
    /// A rewrap is already running.
    #[error("a rewrap is already running; wait for it to finish")]
    RewrapBusy,
    /// The wrapped DEK length does not match the named key.
    #[error("wrapped data key is {actual} bytes but key version {version} needs {expected}")]
    WrappedLength {
        /// Version.
        version: u32,
        /// Expected length.
        expected: usize,
        /// Actual length.
        actual: usize,
    },
    /// An envelope of another format than its key's: v2 (HPKE) naming an RSA version, or v1
    /// (RSA-OAEP) naming an X-Wing one.
    #[error(
        "the envelope is {envelope} but key version {version} is {key}; seal with the key \
         Ingest.PublicKeys returns, in the format its algorithm names (docs/ENVELOPE.md)"
    )]
    WrongFormat {
        /// The version the envelope names.
        version: u32,
        /// The envelope's scheme.
        envelope: crate::keys::Scheme,
        /// The key's.
        key: crate::keys::Scheme,
    },
    /// Too many items in a batch.
    #[error("batch of {count} records exceeds the limit of {max}")]
    BatchTooLarge {
        /// Items given.
        count: usize,
        /// Limit.
        max: usize,
    },
    /// A batch with no items.
    #[error("batch is empty")]
    EmptyBatch,
    /// The record is revoked.
    #[error("record {0} is revoked")]
    Revoked(String),
    /// The record has expired.
    #[error("record {id} expired at {expires_at} (Unix seconds)")]
    Expired {
        /// Record id.
        id: String,
        /// Expiry.
        expires_at: i64,
    },
    /// The stored envelope did not open.
    #[error("record {id}: {source}")]
    Open {
        /// Record id.
        id: String,
        /// Cause.
        #[source]
        source: DecryptError,
    },
    /// A store failure.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The audit sink could not be written.
    #[error(transparent)]
    Sink(#[from] crate::audit::sink::SinkError),
    /// `Admin.PruneAudit` on a daemon without `[audit] retention_days`.
    #[error("no [audit] retention_days is configured: the trail is kept forever")]
    RetentionOff,
    /// An item of a batch failed.
    #[error("item {index}: {source}")]
    Item {
        /// Index in the request.
        index: usize,
        /// Cause.
        #[source]
        source: Box<VaultError>,
    },
    /// The daemon is shutting down; a long read stopped before its end.
    #[error("the daemon is shutting down; read the rest after it restarts")]
    ShuttingDown,
    /// A blocking task panicked or was cancelled.
    #[error("worker task failed")]
    Task,
    /// The provider rejected the record's refresh token; its owner must authorize again.
    #[error(
        "record {0} needs re-authorization: the provider rejected its refresh token (invalid_grant)"
    )]
    NeedsReauth(String),
    /// The record's provider has no `[providers.NAME]` configuration.
    #[error("provider {0} has no [providers.{0}] configuration in the daemon")]
    NoProvider(String),
    /// The record's provider has no OAuth refresh configuration.
    #[error("provider {0} has no [providers.{0}.oauth] configuration; cannot refresh")]
    NoRefresh(String),
    /// The record's kind cannot be sent upstream as a credential.
    #[error("record {id} is a {kind}, which cannot be used as an upstream credential")]
    NotACredential {
        /// Record id.
        id: String,
        /// Its kind.
        kind: crate::record::SecretKind,
    },
    /// The configured client secret record is missing, revoked or of the wrong kind.
    #[error("client secret record {0} is not a usable client_secret record")]
    ClientSecret(String),
    /// No such webhook endpoint, delivery of it, or grant (the message names which).
    #[error("{0}")]
    NoSuch(String),
    /// A revocation at the provider was asked for a record that cannot have one.
    #[error("record {id} cannot be revoked at its provider: {why}")]
    NotRevocable {
        /// Record id.
        id: String,
        /// Why not.
        why: String,
    },
    /// A webhook endpoint's signing secret cannot be used (its message never shows it).
    #[error("webhook endpoint {endpoint}: secret record {record}: {why}")]
    WebhookSecret {
        /// `[webhooks.endpoints.NAME]`.
        endpoint: String,
        /// The record named in `secret_records`.
        record: String,
        /// What is wrong with it.
        why: String,
    },
    /// A refresh could not be performed.
    #[error("refreshing record {id}: {source}")]
    Refresh {
        /// Record id.
        id: String,
        /// Cause.
        #[source]
        source: crate::oauth::OAuthError,
    },
    /// The upstream call failed or was refused.
    #[error(transparent)]
    Proxy(#[from] crate::proxy::ProxyError),
    /// A refreshed bundle could not be sealed.
    #[error("sealing: {0}")]
    Seal(#[from] crate::envelope::EncryptError),
    /// A security event token was refused.
    #[error("security event refused: {0}")]
    SecurityEvent(#[from] crate::security_event::SetError),
    /// A grant was refused.
    #[error(transparent)]
    Grant(#[from] crate::grant::GrantError),
    /// A code exchange request is malformed; says which field.
    #[error("{0}")]
    BadExchange(&'static str),
    /// The redirect URI is not one the provider's configuration registers.
    #[error(
        "redirect_uri is not one of providers.{0}.oauth.redirect_uris (it must match a registered URI exactly)"
    )]
    RedirectNotRegistered(String),
    /// The provider refused or failed the code exchange; nothing was stored.
    #[error(
        "exchanging the authorization code at provider {provider}: {}",
        exchange_cause(source)
    )]
    Exchange {
        /// Provider name.
        provider: String,
        /// Cause.
        #[source]
        source: crate::oauth::OAuthError,
    },
    /// The provider configuration could not be reloaded; the previous one stays in effect.
    #[error("reloading providers failed, the previous configuration stays in effect: {0}")]
    Reload(String),
}

impl VaultError {
    /// This error as the refusal of item `index` of a batch.
    pub fn at_item(self, index: usize) -> Self {
        VaultError::Item {
            index,
            source: Box::new(self),
        }
    }

    /// The kind of failure: the one classification every adapter maps from (gRPC code, HTTP
    /// status, exit code).
    pub fn kind(&self) -> ErrorKind {
        match self {
            VaultError::Invalid { .. }
            | VaultError::Missing(_)
            | VaultError::Argument { .. }
            | VaultError::Envelope(_)
            | VaultError::SecretLength { .. }
            | VaultError::UnknownKey(_)
            | VaultError::WrappedLength { .. }
            | VaultError::WrongFormat { .. }
            | VaultError::EmptyBatch
            | VaultError::BadKey(_) => ErrorKind::InvalidArgument,
            VaultError::KeyNotAccepted { .. }
            | VaultError::GraceEnded { .. }
            | VaultError::BelowMinimum { .. }
            | VaultError::RewrapBusy
            | VaultError::Revoked(_)
            | VaultError::Expired { .. } => ErrorKind::FailedPrecondition,
            VaultError::BatchTooLarge { .. } => ErrorKind::ResourceExhausted,
            VaultError::PolicyDenied(_) => ErrorKind::PermissionDenied,
            VaultError::Approval(e) => {
                use super::approvals::ApprovalError;
                match e {
                    ApprovalError::BadId => ErrorKind::InvalidArgument,
                    ApprovalError::AlreadyApproved { .. } => ErrorKind::PermissionDenied,
                    ApprovalError::Expired { .. } => ErrorKind::FailedPrecondition,
                }
            }
            VaultError::RecordRateLimited { .. } | VaultError::Overloaded { .. } => {
                ErrorKind::ResourceExhausted
            }
            // Every way a stored envelope can fail to open for its record is DATA_LOSS except the
            // key lifecycle refusals, which an operator caused on purpose. Exhaustive, so a new
            // variant must be placed here rather than falling into INTERNAL.
            VaultError::Open { source, .. } => match source {
                DecryptError::DecryptionFailed
                | DecryptError::Format(_)
                | DecryptError::UnknownKey(_)
                | DecryptError::SchemeMismatch { .. } => ErrorKind::DataLoss,
                DecryptError::KeyUnavailable { .. } | DecryptError::BelowMinimum { .. } => {
                    ErrorKind::FailedPrecondition
                }
                DecryptError::KeyUnreachable => ErrorKind::Unavailable,
            },
            VaultError::Store(e) => Self::store_kind(e),
            VaultError::Rotation(e) => {
                use crate::rotation::RotationError;
                match e {
                    RotationError::UnknownVersion(_) => ErrorKind::NotFound,
                    RotationError::WrongState { .. }
                    | RotationError::RecordsRemain { .. }
                    | RotationError::DestructionDue { .. }
                    | RotationError::NotDue { .. } => ErrorKind::FailedPrecondition,
                    RotationError::Store(e) => VaultError::store_kind(e),
                    RotationError::Key(e) => Self::key_kind(e),
                }
            }
            VaultError::Key(e) => Self::key_kind(e),
            // Fail closed either way; a database that is down is worth retrying, anything else
            // is the daemon's fault.
            VaultError::Audit(crate::audit::AuditError::Store(StoreError::Unavailable(_))) => {
                ErrorKind::Unavailable
            }
            VaultError::Audit(_) => ErrorKind::Internal,
            VaultError::Item { source, .. } => source.kind(),
            VaultError::Task | VaultError::Seal(_) | VaultError::Sink(_) => ErrorKind::Internal,
            VaultError::ShuttingDown => ErrorKind::Unavailable,
            VaultError::NoSuch(_) => ErrorKind::NotFound,
            VaultError::NeedsReauth(_)
            | VaultError::NoProvider(_)
            | VaultError::NoRefresh(_)
            | VaultError::NotACredential { .. }
            | VaultError::ClientSecret(_)
            | VaultError::WebhookSecret { .. }
            | VaultError::NotRevocable { .. }
            | VaultError::Reload(_)
            | VaultError::RetentionOff => ErrorKind::FailedPrecondition,
            VaultError::BadExchange(_) | VaultError::RedirectNotRegistered(_) => {
                ErrorKind::InvalidArgument
            }
            VaultError::Exchange { source, .. } => {
                use crate::oauth::OAuthError;
                match source {
                    // The code is spent, expired, or not for this client, redirect or verifier.
                    OAuthError::InvalidGrant => ErrorKind::FailedPrecondition,
                    OAuthError::BadBundle | OAuthError::NoRefreshToken => {
                        ErrorKind::FailedPrecondition
                    }
                    OAuthError::Endpoint { .. } | OAuthError::BadResponse => ErrorKind::Unavailable,
                }
            }
            VaultError::Refresh { source, .. } => {
                use crate::oauth::OAuthError;
                match source {
                    OAuthError::BadBundle | OAuthError::NoRefreshToken => {
                        ErrorKind::FailedPrecondition
                    }
                    OAuthError::InvalidGrant => ErrorKind::FailedPrecondition,
                    OAuthError::Endpoint { .. } | OAuthError::BadResponse => ErrorKind::Unavailable,
                }
            }
            VaultError::SecurityEvent(e) => {
                use crate::security_event::SetError;
                match e {
                    SetError::Signature
                    | SetError::UnknownIssuer
                    | SetError::UnknownKid
                    | SetError::Algorithm(_) => ErrorKind::PermissionDenied,
                    SetError::Malformed(_) | SetError::Claim(_) | SetError::Unsupported => {
                        ErrorKind::InvalidArgument
                    }
                }
            }
            VaultError::Grant(e) => {
                use crate::grant::GrantError;
                match e {
                    GrantError::Invalid(_) => ErrorKind::InvalidArgument,
                    GrantError::Unknown
                    | GrantError::Expired(_)
                    | GrantError::UsedUp(_)
                    | GrantError::WrongCaller(_)
                    | GrantError::OutOfScope { .. } => ErrorKind::PermissionDenied,
                }
            }
            VaultError::Proxy(e) => {
                use crate::proxy::ProxyError;
                match e {
                    ProxyError::Refused(_) => ErrorKind::PermissionDenied,
                    ProxyError::BadRequest(_) => ErrorKind::InvalidArgument,
                    ProxyError::RequestTooLarge { .. }
                    | ProxyError::ResponseTooLarge { .. }
                    | ProxyError::Busy(_) => ErrorKind::ResourceExhausted,
                    ProxyError::Timeout { .. } => ErrorKind::DeadlineExceeded,
                    ProxyError::BadCredential => ErrorKind::FailedPrecondition,
                    ProxyError::Unavailable(_) => ErrorKind::Unavailable,
                }
            }
        }
    }
}

/// A replace that named another version than the stored one: what a caller needs to retry
/// (`ABORTED` carries it as a structured detail, so nobody parses the message).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaleVersion {
    /// Record id.
    pub id: String,
    /// The version the caller named.
    pub expected: u64,
    /// The version stored now (0: the record does not exist).
    pub current: u64,
    /// The batch item at fault, for a batch.
    pub index: Option<usize>,
}

impl VaultError {
    /// The stale version behind this error, if a version check refused the write.
    pub fn stale_version(&self) -> Option<StaleVersion> {
        match self {
            VaultError::Store(StoreError::VersionMismatch {
                id,
                expected,
                actual,
            }) => Some(StaleVersion {
                id: id.clone(),
                expected: *expected,
                current: *actual,
                index: None,
            }),
            VaultError::Item { index, source } => source.stale_version().map(|s| StaleVersion {
                index: Some(*index),
                ..s
            }),
            _ => None,
        }
    }

    /// A key that is already registered is the caller's doing; every other key failure at
    /// run time (file I/O, generation) is the daemon's.
    fn key_kind(e: &crate::keys::KeyError) -> ErrorKind {
        match e.cause() {
            crate::keys::KeyError::Duplicate(_) => ErrorKind::AlreadyExists,
            // A concurrent rotation on another daemon won: retrying rotates again.
            crate::keys::KeyError::VersionTaken(_) => ErrorKind::Aborted,
            crate::keys::KeyError::TokenUnavailable(_) => ErrorKind::Unavailable,
            // The token refused (no key with that label, an extractable key): its state.
            crate::keys::KeyError::Token(_) => ErrorKind::FailedPrecondition,
            // A build that cannot hold the requested key: the deployment's choice.
            crate::keys::KeyError::NotInFipsBuild => ErrorKind::FailedPrecondition,
            _ => ErrorKind::Internal,
        }
    }

    fn store_kind(e: &StoreError) -> ErrorKind {
        match e {
            StoreError::NotFound(_) => ErrorKind::NotFound,
            StoreError::AlreadyExists(_) => ErrorKind::AlreadyExists,
            StoreError::VersionMismatch { .. } => ErrorKind::Aborted,
            StoreError::DuplicateInBatch(_) => ErrorKind::InvalidArgument,
            StoreError::KeyNotAccepted { .. } | StoreError::KeyInUse { .. } => {
                ErrorKind::FailedPrecondition
            }
            // A compare-and-swap lost to a concurrent writer: the caller may retry.
            StoreError::Conflict(_) => ErrorKind::Aborted,
            // The database is down or restarting: the caller may retry, nothing was written.
            StoreError::Unavailable(_) => ErrorKind::Unavailable,
            StoreError::SchemaTooNew { .. } => ErrorKind::FailedPrecondition,
            StoreError::Corrupt(_)
            | StoreError::Engine(_)
            | StoreError::Locked(_)
            | StoreError::Unaudited => ErrorKind::Internal,
        }
    }
}

/// Why a code exchange failed, in the exchange's own words: `invalid_grant` there is about the
/// code, not a refresh token.
fn exchange_cause(source: &crate::oauth::OAuthError) -> String {
    match source {
        crate::oauth::OAuthError::InvalidGrant => "the provider rejected the authorization code \
             (invalid_grant): it is expired or already used, or the redirect URI or code \
             verifier does not match the authorization request"
            .to_string(),
        other => other.to_string(),
    }
}
