//! The single mapping from vault errors to `tonic::Status`.
//!
//! Every handler returns [`VaultError`]; this is the only place that picks a gRPC code, from
//! the error's [`ErrorKind`] (one to one). Messages are the error's own: they name the field,
//! record or key at fault and never carry a secret, an owner or stored bytes. Internal errors
//! are logged here and answered with a generic `INTERNAL`.

use tonic::{Code, Status};

pub use crate::vault::{ErrorKind, VaultError};

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

impl From<VaultError> for Status {
    fn from(e: VaultError) -> Self {
        let code = code(e.kind());
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
