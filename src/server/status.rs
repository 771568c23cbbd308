//! The single mapping from service errors to `tonic::Status`.
//!
//! Every handler returns [`ServiceError`]; this is the only place that picks a gRPC code and
//! the message a caller sees. Messages name the field, record or key at fault and never carry
//! a secret, an owner or stored bytes. Unexpected engine errors are logged here and returned
//! as a generic `INTERNAL`.

use thiserror::Error;
use tonic::{Code, Status};

use crate::envelope::{DecryptError, FormatError};
use crate::keys::{KeyId, KeyState};
use crate::record::ValidationError;
use crate::store::StoreError;

/// Everything a handler can fail with.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ServiceError {
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
    /// An item of a batch failed.
    #[error("item {index}: {source}")]
    Item {
        /// Index in the request.
        index: usize,
        /// Cause.
        #[source]
        source: Box<ServiceError>,
    },
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
    /// The provider configuration could not be reloaded; the previous one stays in effect.
    #[error("reloading providers failed, the previous configuration stays in effect: {0}")]
    Reload(String),
}

impl ServiceError {
    /// The gRPC code this error maps to.
    pub fn code(&self) -> Code {
        match self {
            ServiceError::Invalid { .. }
            | ServiceError::Missing(_)
            | ServiceError::Envelope(_)
            | ServiceError::SecretLength { .. }
            | ServiceError::UnknownKey(_)
            | ServiceError::WrappedLength { .. }
            | ServiceError::EmptyBatch
            | ServiceError::BadKey(_) => Code::InvalidArgument,
            ServiceError::KeyNotAccepted { .. }
            | ServiceError::GraceEnded { .. }
            | ServiceError::BelowMinimum { .. }
            | ServiceError::RewrapBusy
            | ServiceError::Revoked(_)
            | ServiceError::Expired { .. } => Code::FailedPrecondition,
            ServiceError::BatchTooLarge { .. } => Code::ResourceExhausted,
            ServiceError::PolicyDenied(_) => Code::PermissionDenied,
            ServiceError::RecordRateLimited { .. } => Code::ResourceExhausted,
            // Every way a stored envelope can fail to open for its record is DATA_LOSS except the
            // key lifecycle refusals, which an operator caused on purpose. Exhaustive, so a new
            // variant must be placed here rather than falling into INTERNAL.
            ServiceError::Open { source, .. } => match source {
                DecryptError::DecryptionFailed
                | DecryptError::Format(_)
                | DecryptError::UnknownKey(_) => Code::DataLoss,
                DecryptError::KeyUnavailable { .. } | DecryptError::BelowMinimum { .. } => {
                    Code::FailedPrecondition
                }
            },
            ServiceError::Store(e) => Self::store_code(e),
            ServiceError::Rotation(e) => {
                use crate::rotation::RotationError;
                match e {
                    RotationError::UnknownVersion(_) => Code::NotFound,
                    RotationError::WrongState { .. } | RotationError::RecordsRemain { .. } => {
                        Code::FailedPrecondition
                    }
                    RotationError::Store(e) => ServiceError::store_code(e),
                    RotationError::Key(_) => Code::Internal,
                }
            }
            ServiceError::Key(crate::keys::KeyError::Duplicate(_)) => Code::AlreadyExists,
            ServiceError::Key(_) | ServiceError::Audit(_) => Code::Internal,
            ServiceError::Item { source, .. } => source.code(),
            ServiceError::Task | ServiceError::Seal(_) => Code::Internal,
            ServiceError::NeedsReauth(_)
            | ServiceError::NoProvider(_)
            | ServiceError::NoRefresh(_)
            | ServiceError::NotACredential { .. }
            | ServiceError::ClientSecret(_)
            | ServiceError::Reload(_) => Code::FailedPrecondition,
            ServiceError::Refresh { source, .. } => {
                use crate::oauth::OAuthError;
                match source {
                    OAuthError::BadBundle | OAuthError::NoRefreshToken => Code::FailedPrecondition,
                    OAuthError::InvalidGrant => Code::FailedPrecondition,
                    OAuthError::Endpoint { .. } | OAuthError::BadResponse => Code::Unavailable,
                }
            }
            ServiceError::SecurityEvent(e) => {
                use crate::security_event::SetError;
                match e {
                    SetError::Signature | SetError::UnknownIssuer | SetError::Algorithm(_) => {
                        Code::PermissionDenied
                    }
                    SetError::Malformed(_) | SetError::Claim(_) | SetError::Unsupported => {
                        Code::InvalidArgument
                    }
                }
            }
            ServiceError::Grant(e) => {
                use crate::grant::GrantError;
                match e {
                    GrantError::Invalid(_) => Code::InvalidArgument,
                    GrantError::Unknown
                    | GrantError::Expired(_)
                    | GrantError::UsedUp(_)
                    | GrantError::WrongCaller(_)
                    | GrantError::OutOfScope { .. } => Code::PermissionDenied,
                }
            }
            ServiceError::Proxy(e) => {
                use crate::proxy::ProxyError;
                match e {
                    ProxyError::Refused(_) => Code::PermissionDenied,
                    ProxyError::BadRequest(_) => Code::InvalidArgument,
                    ProxyError::RequestTooLarge { .. }
                    | ProxyError::ResponseTooLarge { .. }
                    | ProxyError::Busy(_) => Code::ResourceExhausted,
                    ProxyError::Timeout { .. } => Code::DeadlineExceeded,
                    ProxyError::BadCredential => Code::FailedPrecondition,
                    ProxyError::Unavailable(_) => Code::Unavailable,
                }
            }
        }
    }
}

impl ServiceError {
    fn store_code(e: &StoreError) -> Code {
        match e {
            StoreError::NotFound(_) => Code::NotFound,
            StoreError::AlreadyExists(_) => Code::AlreadyExists,
            StoreError::VersionMismatch { .. } => Code::Aborted,
            StoreError::DuplicateInBatch(_) => Code::InvalidArgument,
            StoreError::KeyNotAccepted { .. } | StoreError::KeyInUse { .. } => {
                Code::FailedPrecondition
            }
            // A compare-and-swap lost to a concurrent writer: the caller may retry.
            StoreError::Conflict(_) => Code::Aborted,
            StoreError::Corrupt(_) | StoreError::Engine(_) | StoreError::Locked(_) => {
                Code::Internal
            }
        }
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        let code = e.code();
        if code == Code::Internal {
            // Engine and task errors may carry paths or internals: log them, answer generically.
            tracing::error!(error = %e, "internal error");
            return Status::internal("internal error; see the daemon log");
        }
        Status::new(code, e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_messages() {
        let s = Status::from(ServiceError::Store(StoreError::VersionMismatch {
            id: "r".into(),
            expected: 1,
            actual: 2,
        }));
        assert_eq!(s.code(), Code::Aborted);
        assert_eq!(s.message(), "record r is at version 2, not the expected 1");
        let s = Status::from(ServiceError::Item {
            index: 3,
            source: Box::new(ServiceError::Envelope(FormatError::UnknownVersion(9))),
        });
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(
            s.message(),
            "item 3: malformed envelope: unknown envelope format version 9"
        );
        let s = Status::from(ServiceError::Store(StoreError::Engine(
            "/secret/path: IO".into(),
        )));
        assert_eq!(s.code(), Code::Internal);
        assert!(!s.message().contains("/secret/path"));
        let s = Status::from(ServiceError::Open {
            id: "r".into(),
            source: DecryptError::DecryptionFailed,
        });
        assert_eq!(s.code(), Code::DataLoss);
        // A stored envelope naming a fingerprint no key has (its key id bytes were altered)
        // is damaged data for that record, not an internal fault.
        let s = Status::from(ServiceError::Open {
            id: "r".into(),
            source: DecryptError::UnknownKey(KeyId([7; 32])),
        });
        assert_eq!(s.code(), Code::DataLoss);
        assert!(s.message().contains("unknown key"), "{}", s.message());
    }
}
