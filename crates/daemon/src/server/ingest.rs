//! The `tokenvault.v1.Ingest` adapter: proto → [`SealedRecord`], one vault call, → proto.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::caller;
use super::status::VaultError;
use crate::api::v1::{self, ingest_server::Ingest};
use crate::record::RecordMeta;
use crate::vault::{CodeExchange, Exchanged, SealedRecord, Vault};

/// The `tokenvault.v1.Ingest` service.
pub struct IngestService(pub(super) Arc<Vault>);

impl std::fmt::Debug for IngestService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IngestService")
    }
}

impl TryFrom<v1::PutSealedRequest> for SealedRecord {
    type Error = VaultError;

    fn try_from(item: v1::PutSealedRequest) -> Result<Self, VaultError> {
        let record = item.record.ok_or(VaultError::Missing("record"))?;
        let meta = record
            .meta
            .as_ref()
            .ok_or(VaultError::Missing("record.meta"))?;
        let meta = RecordMeta::try_from(meta).map_err(|source| VaultError::Invalid {
            what: "record metadata".into(),
            source,
        })?;
        Ok(SealedRecord {
            meta,
            envelope: record.envelope,
            expected_version: item.expected_version,
        })
    }
}

impl TryFrom<v1::ExchangeCodeRequest> for CodeExchange {
    type Error = VaultError;

    fn try_from(req: v1::ExchangeCodeRequest) -> Result<Self, VaultError> {
        let mut meta = req.meta.ok_or(VaultError::Missing("meta"))?;
        if meta.kind == v1::SecretKind::Unspecified as i32 {
            meta.kind = v1::SecretKind::TokenBundle as i32;
        }
        let meta = RecordMeta::try_from(&meta).map_err(|source| VaultError::Invalid {
            what: "record metadata".into(),
            source,
        })?;
        Ok(CodeExchange {
            meta,
            code: crate::secret::Secret::new(req.code.into_bytes()),
            code_verifier: crate::secret::Secret::new(req.code_verifier.into_bytes()),
            redirect_uri: req.redirect_uri,
            expected_version: req.expected_version,
        })
    }
}

/// The answer to an exchange that stored record `id`.
pub(super) fn exchanged(id: &str, e: Exchanged) -> v1::ExchangeCodeResponse {
    v1::ExchangeCodeResponse {
        id: id.to_string(),
        version: e.version,
        expires_at: e.expires_at.unwrap_or(0),
        scopes: e.scopes,
    }
}

/// Runs Ingest's validation of one encoded `PutSealedRequest` against `ring`, as the fuzzer
/// does: it must return (accept or refuse) for any input, never panic.
#[cfg(fuzzing)]
pub fn fuzz_check_item(ring: &crate::keys::keyring::Keyring, bytes: &[u8]) -> bool {
    use prost::Message as _;
    let Ok(item) = v1::PutSealedRequest::decode(bytes) else {
        return false;
    };
    let Ok(item) = SealedRecord::try_from(item) else {
        return false;
    };
    let policy = crate::config::CallerPolicy::default();
    crate::vault::ingest::check_item(
        ring,
        &crate::config::KeyPolicy::standard(),
        &policy,
        0,
        &item,
    )
    .is_ok()
}

#[tonic::async_trait]
impl Ingest for IngestService {
    async fn put_sealed(
        &self,
        request: Request<v1::PutSealedRequest>,
    ) -> Result<Response<v1::PutSealedResponse>, Status> {
        let caller = caller(&request)?;
        let item = SealedRecord::try_from(request.into_inner())?;
        let version = self.0.put_sealed(&caller, item).await?;
        Ok(Response::new(v1::PutSealedResponse { version }))
    }

    async fn put_sealed_batch(
        &self,
        request: Request<v1::PutSealedBatchRequest>,
    ) -> Result<Response<v1::PutSealedBatchResponse>, Status> {
        let caller = caller(&request)?;
        let items = request.into_inner().items;
        self.0.check_batch_size(items.len())?;
        let items = items
            .into_iter()
            .enumerate()
            .map(|(index, item)| SealedRecord::try_from(item).map_err(|e| e.at_item(index)))
            .collect::<Result<Vec<_>, _>>()?;
        let versions = self.0.put_sealed_batch(&caller, items).await?;
        Ok(Response::new(v1::PutSealedBatchResponse { versions }))
    }

    async fn exchange_code(
        &self,
        request: Request<v1::ExchangeCodeRequest>,
    ) -> Result<Response<v1::ExchangeCodeResponse>, Status> {
        let caller = caller(&request)?;
        let req = CodeExchange::try_from(request.into_inner())?;
        let id = req.meta.id.to_string();
        let done = self.0.exchange_code(&caller, req).await?;
        Ok(Response::new(exchanged(id.as_str(), done)))
    }

    async fn public_keys(
        &self,
        _request: Request<v1::PublicKeysRequest>,
    ) -> Result<Response<v1::PublicKeysResponse>, Status> {
        Ok(Response::new(v1::PublicKeysResponse {
            active: Some((&self.0.active_key()).into()),
        }))
    }
}
