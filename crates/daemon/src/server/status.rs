//! The single mapping from vault errors to `tonic::Status`.
//!
//! Every handler returns [`VaultError`]; this is the only place that picks a gRPC code, from
//! the error's [`ErrorKind`] (one to one). Messages are the error's own: they name the field,
//! record or key at fault and never carry a secret, an owner or stored bytes. Internal errors
//! are logged here and answered with a generic `INTERNAL`.

use tonic::{Code, Status};

pub use crate::vault::{ErrorKind, VaultError};

/// `google.rpc.ErrorInfo.reason` of an `ABORTED` for a stale `expected_version`; its metadata
/// holds `current_version`, `expected_version` and, in a batch, `item` (docs/WEB_TIER.md).
pub const STALE_VERSION: &str = "STALE_VERSION";
/// `google.rpc.ErrorInfo.domain` of tokenvault's structured error details.
pub const ERROR_DOMAIN: &str = "tokenvault.v1";

/// The metadata key of gRPC's standard retry pushback (gRFC A6): a client whose service config
/// retries `RESOURCE_EXHAUSTED` waits this many milliseconds before its next attempt, and does
/// not retry at all when the value is negative. grpc-core (Python, C++, Ruby), grpc-java,
/// grpc-go and Node.js's grpc-js read it; `google.rpc.RetryInfo` says the same to clients that
/// read error details.
pub const RETRY_PUSHBACK: &str = "grpc-retry-pushback-ms";

/// Every `RESOURCE_EXHAUSTED` the daemon answers. With `wait` (overload, a throttled
/// address): a `google.rpc.RetryInfo` and a [`RETRY_PUSHBACK`] of that time. Without (a request
/// over a size limit, which no retry gets past; a credential or record over the rate its policy
/// gives it, which the caller is to slow down for): a [`RETRY_PUSHBACK`] of -1, "do not retry
/// on your own".
pub fn exhausted(message: String, wait: Option<std::time::Duration>) -> Status {
    use tonic_types::StatusExt as _;
    let (mut status, pushback) = match wait {
        Some(wait) => (
            Status::with_error_details(
                Code::ResourceExhausted,
                message,
                tonic_types::ErrorDetails::with_retry_info(Some(wait)),
            ),
            tonic::metadata::MetadataValue::from(
                u64::try_from(wait.as_millis()).unwrap_or(u64::MAX),
            ),
        ),
        None => (
            Status::new(Code::ResourceExhausted, message),
            tonic::metadata::MetadataValue::from(-1i64),
        ),
    };
    status.metadata_mut().insert(RETRY_PUSHBACK, pushback);
    status
}

/// The gRPC code of an error kind.
pub fn code(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::PermissionDenied => Code::PermissionDenied,
        ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::Aborted => Code::Aborted,
        ErrorKind::DeadlineExceeded => Code::DeadlineExceeded,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::DataLoss => Code::DataLoss,
        ErrorKind::Internal => Code::Internal,
    }
}

/// The canonical name of a code (`PERMISSION_DENIED`), as grpc-go and OpenTelemetry write it:
/// the JSON error body's `code` and the metrics' `code` label.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

impl From<VaultError> for Status {
    fn from(e: VaultError) -> Self {
        let code = code(e.kind());
        if code == Code::Internal {
            // Engine and task errors may carry paths or internals: log them, answer generically.
            tracing::error!(error = %e, "internal error");
            return Status::internal("internal error; see the daemon log");
        }
        if code == Code::ResourceExhausted {
            let wait = match &e {
                VaultError::Overloaded { retry_ms, .. } => {
                    Some(std::time::Duration::from_millis(*retry_ms))
                }
                _ => None,
            };
            return exhausted(e.to_string(), wait);
        }
        match e.stale_version() {
            Some(stale) => {
                use tonic_types::StatusExt as _;
                let mut metadata = std::collections::HashMap::from([
                    ("current_version".to_string(), stale.current.to_string()),
                    ("expected_version".to_string(), stale.expected.to_string()),
                ]);
                if let Some(i) = stale.index {
                    metadata.insert("item".into(), i.to_string());
                }
                Status::with_error_details(
                    code,
                    e.to_string(),
                    tonic_types::ErrorDetails::with_error_info(
                        STALE_VERSION,
                        ERROR_DOMAIN,
                        metadata,
                    ),
                )
            }
            None => Status::new(code, e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{DecryptError, FormatError};
    use crate::keys::KeyId;
    use crate::store::StoreError;

    #[test]
    fn every_kind_maps_to_the_grpc_code_of_its_name() {
        // Audit outcomes are written with the kind's name; they stay the gRPC code names.
        for kind in [
            ErrorKind::InvalidArgument,
            ErrorKind::NotFound,
            ErrorKind::AlreadyExists,
            ErrorKind::PermissionDenied,
            ErrorKind::ResourceExhausted,
            ErrorKind::FailedPrecondition,
            ErrorKind::Aborted,
            ErrorKind::DeadlineExceeded,
            ErrorKind::Unavailable,
            ErrorKind::DataLoss,
            ErrorKind::Internal,
        ] {
            assert_eq!(format!("{:?}", code(kind)), kind.name());
        }
    }

    #[test]
    fn codes_and_messages() {
        let s = Status::from(VaultError::Store(StoreError::VersionMismatch {
            id: "r".into(),
            expected: 1,
            actual: 2,
        }));
        assert_eq!(s.code(), Code::Aborted);
        assert_eq!(s.message(), "record r is at version 2, not the expected 1");
        let s = Status::from(VaultError::Item {
            index: 3,
            source: Box::new(VaultError::Envelope(FormatError::UnknownVersion(9))),
        });
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(
            s.message(),
            "item 3: malformed envelope: unknown envelope format version 9"
        );
        let s = Status::from(VaultError::Store(StoreError::Engine(
            "/secret/path: IO".into(),
        )));
        assert_eq!(s.code(), Code::Internal);
        assert!(!s.message().contains("/secret/path"));
        let s = Status::from(VaultError::Open {
            id: "r".into(),
            source: DecryptError::DecryptionFailed,
        });
        assert_eq!(s.code(), Code::DataLoss);
        // A stored envelope naming a fingerprint no key has (its key id bytes were altered)
        // is damaged data for that record, not an internal fault.
        let s = Status::from(VaultError::Open {
            id: "r".into(),
            source: DecryptError::UnknownKey(KeyId([7; 32])),
        });
        assert_eq!(s.code(), Code::DataLoss);
        assert!(s.message().contains("unknown key"), "{}", s.message());
    }
}
