//! # tokenvault-proto
//!
//! Generated gRPC code for package `tokenvault.v1` (from the workspace's proto/ by build.rs),
//! conversions between wire types and the sealing crate's domain types, and the bearer
//! interceptor every gRPC client uses ([`client`]). Re-exported by `tokenvault` as
//! `tokenvault::api` (and `tokenvault::client`).
//!
//! Architecture invariant: proto types stop here and in `server`/`cli`; `envelope`, `keys` and
//! `store` never see them.

#![allow(
    missing_docs,
    unused_qualifications,
    missing_debug_implementations,
    reason = "generated code"
)]
#![allow(clippy::all, clippy::pedantic, reason = "generated code")]

pub mod client;

/// The `tokenvault.v1` package.
pub mod v1 {
    tonic::include_proto!("tokenvault.v1");

    /// Encoded `FileDescriptorSet` for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("tokenvault_descriptor");

    // Hand-written Debug for the messages that carry a secret (build.rs skips the derive):
    // every field but the secret, which prints as [REDACTED].
    const REDACTED: &str = "[REDACTED]";

    impl std::fmt::Debug for GetTokenResponse {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("GetTokenResponse")
                .field("info", &self.info)
                .field("secret", &REDACTED)
                .finish()
        }
    }

    impl std::fmt::Debug for ProxyRequest {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("ProxyRequest")
                .field("id", &self.id)
                .field("method", &self.method)
                .field("path", &self.path)
                .field("headers", &self.headers)
                .field("body_len", &self.body.len())
                .field("grant", &REDACTED)
                .finish()
        }
    }

    impl std::fmt::Debug for IssueGrantResponse {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("IssueGrantResponse")
                .field("grant", &REDACTED)
                .field("grant_id", &self.grant_id)
                .field("expires_at", &self.expires_at)
                .finish()
        }
    }

    impl std::fmt::Debug for RevokeGrantRequest {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            // The field may hold the handle itself.
            f.debug_struct("RevokeGrantRequest")
                .field("grant_id", &REDACTED)
                .finish()
        }
    }

    impl std::fmt::Debug for ExchangeCodeRequest {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("ExchangeCodeRequest")
                .field("meta", &self.meta)
                .field("code", &REDACTED)
                .field("code_verifier", &REDACTED)
                .field("redirect_uri", &self.redirect_uri)
                .field("expected_version", &self.expected_version)
                .finish()
        }
    }

    impl std::fmt::Debug for RotateKeyRequest {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("RotateKeyRequest")
                .field(
                    "private_key_pem",
                    &if self.private_key_pem.is_empty() {
                        ""
                    } else {
                        REDACTED
                    },
                )
                .field("public_key_pem", &self.public_key_pem)
                .finish()
        }
    }
}

use tokenvault_envelope::envelope::EncryptError;
use tokenvault_envelope::keys::{KeyInfo, KeyState};
use tokenvault_envelope::sealer::Sealer;
use tokenvault_envelope::secret::Secret;

/// The wire form of [`Sealer::seal`]: a record packaged for `Ingest.PutSealed`.
pub trait SealRecord {
    /// Seals `secret` and packages the record for `Ingest.PutSealed`.
    fn seal_record(
        &self,
        meta: &RecordMeta,
        secret: &Secret,
    ) -> Result<v1::SealedRecord, EncryptError>;
}

impl SealRecord for Sealer {
    fn seal_record(
        &self,
        meta: &RecordMeta,
        secret: &Secret,
    ) -> Result<v1::SealedRecord, EncryptError> {
        Ok(v1::SealedRecord {
            meta: Some(meta.into()),
            envelope: self.seal(meta, secret)?,
        })
    }
}
use tokenvault_envelope::record::{Record, RecordMeta, SecretKind, ValidationError};

impl From<SecretKind> for v1::SecretKind {
    fn from(k: SecretKind) -> Self {
        match k {
            SecretKind::AccessToken => v1::SecretKind::AccessToken,
            SecretKind::RefreshToken => v1::SecretKind::RefreshToken,
            SecretKind::ClientSecret => v1::SecretKind::ClientSecret,
            SecretKind::ApiKey => v1::SecretKind::ApiKey,
            SecretKind::TokenBundle => v1::SecretKind::TokenBundle,
        }
    }
}

/// The [`SecretKind`] a wire `SecretKind` value names (unspecified and unknown values refused).
pub fn secret_kind(wire: i32) -> Result<SecretKind, ValidationError> {
    match v1::SecretKind::try_from(wire) {
        Ok(v1::SecretKind::AccessToken) => Ok(SecretKind::AccessToken),
        Ok(v1::SecretKind::RefreshToken) => Ok(SecretKind::RefreshToken),
        Ok(v1::SecretKind::ClientSecret) => Ok(SecretKind::ClientSecret),
        Ok(v1::SecretKind::ApiKey) => Ok(SecretKind::ApiKey),
        Ok(v1::SecretKind::TokenBundle) => Ok(SecretKind::TokenBundle),
        Ok(v1::SecretKind::Unspecified) | Err(_) => Err(ValidationError::UnknownKind),
    }
}

impl TryFrom<&v1::RecordMeta> for RecordMeta {
    type Error = ValidationError;

    fn try_from(m: &v1::RecordMeta) -> Result<Self, ValidationError> {
        RecordMeta::parse(
            &m.id,
            &m.owner,
            &m.provider,
            secret_kind(m.kind)?,
            &m.scopes,
            m.expires_at,
        )
    }
}

impl From<&RecordMeta> for v1::RecordMeta {
    fn from(m: &RecordMeta) -> Self {
        v1::RecordMeta {
            id: m.id.to_string(),
            owner: m.owner.as_str().to_string(),
            provider: m.provider.to_string(),
            kind: v1::SecretKind::from(m.kind).into(),
            scopes: m.scopes.iter().map(|s| s.as_str().to_string()).collect(),
            expires_at: m.expires_at.unwrap_or(0),
        }
    }
}

impl From<&Record> for v1::RecordInfo {
    fn from(r: &Record) -> Self {
        v1::RecordInfo {
            meta: Some((&r.meta).into()),
            created_at: r.created_at,
            updated_at: r.updated_at,
            revoked: r.revoked,
            needs_reauth: r.needs_reauth,
            version: r.version,
            key_version: r.key_version,
        }
    }
}

impl From<KeyState> for v1::KeyState {
    fn from(s: KeyState) -> Self {
        match s {
            KeyState::Active => v1::KeyState::Active,
            KeyState::DecryptOnly => v1::KeyState::DecryptOnly,
            KeyState::Retired => v1::KeyState::Retired,
            KeyState::Destroyed => v1::KeyState::Destroyed,
        }
    }
}

impl From<&KeyInfo> for v1::PublicKey {
    fn from(k: &KeyInfo) -> Self {
        v1::PublicKey {
            version: k.version,
            fingerprint: k.id.to_hex(),
            // Pure encoding of the registered DER; no key parsing on every PublicKeys call.
            spki_pem: tokenvault_envelope::keys::spki_pem(&k.spki_der),
            state: v1::KeyState::from(k.state).into(),
            created_at: k.created_at,
        }
    }
}
