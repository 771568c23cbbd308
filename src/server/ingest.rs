//! `Ingest`: write-only storage of sealed envelopes, and the active public key.
//!
//! Validates structure and metadata without any private key: envelope layout, a known key
//! fingerprint in an accepted state, and a wrapped-key length matching that key. It cannot
//! check the AES-GCM binding (that needs the data key); a mis-bound envelope fails later, at
//! `GetToken`, with `DATA_LOSS`, and harms no other record.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::status::ServiceError;
use super::{State, caller_name, caller_policy};
use crate::api::v1::{self, ingest_server::Ingest};
use crate::config::KeyPolicy;
use crate::envelope::{EnvelopeRef, MAX_SECRET_LEN};
use crate::keys::KeyState;
use crate::keys::keyring::Keyring;
use crate::record::RecordMeta;
use crate::store::RecordWrite;

/// The `tokenvault.v1.Ingest` service.
pub struct IngestService(pub(super) Arc<State>);

impl std::fmt::Debug for IngestService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("IngestService")
    }
}

/// Runs Ingest's validation of one encoded `PutSealedRequest` against `ring`, as the fuzzer
/// does: it must return (accept or refuse) for any input, never panic.
#[cfg(fuzzing)]
pub fn fuzz_check_item(ring: &Keyring, bytes: &[u8]) -> bool {
    use prost::Message as _;
    let Ok(item) = v1::PutSealedRequest::decode(bytes) else {
        return false;
    };
    let policy = crate::config::CallerPolicy::default();
    check_item(ring, &KeyPolicy::standard(), &policy, 0, item).is_ok()
}

fn check_item(
    ring: &Keyring,
    policy: &KeyPolicy,
    caller: &crate::config::CallerPolicy,
    now: i64,
    item: v1::PutSealedRequest,
) -> Result<RecordWrite, ServiceError> {
    let record = item.record.ok_or(ServiceError::Missing("record"))?;
    let meta = record
        .meta
        .as_ref()
        .ok_or(ServiceError::Missing("record.meta"))?;
    let meta = RecordMeta::try_from(meta).map_err(|source| ServiceError::Invalid {
        what: "record metadata".into(),
        source,
    })?;
    caller
        .check_record(&meta)
        .map_err(ServiceError::PolicyDenied)?;
    let env = EnvelopeRef::decode(&record.envelope)?;
    let (info, public) = ring
        .public(&env.key_id)
        .ok_or(ServiceError::UnknownKey(env.key_id))?;
    if !info.state.accepts_envelopes() {
        return Err(ServiceError::KeyNotAccepted {
            version: info.version,
            state: info.state,
        });
    }
    if info.version < ring.min_version() {
        return Err(ServiceError::BelowMinimum {
            version: info.version,
            minimum: ring.min_version(),
        });
    }
    // Web tiers pick up a rotated key at their own pace, within the grace period.
    if info.state == KeyState::DecryptOnly
        && now.saturating_sub(info.updated_at) > policy.ingest_grace_seconds
    {
        return Err(ServiceError::GraceEnded {
            version: info.version,
            since: info.updated_at,
            grace_seconds: policy.ingest_grace_seconds,
        });
    }
    if env.wrapped_dek.len() != public.wrapped_len() {
        return Err(ServiceError::WrappedLength {
            version: info.version,
            expected: public.wrapped_len(),
            actual: env.wrapped_dek.len(),
        });
    }
    // Every sealer meets the documented secret size (docs/ENVELOPE.md), not only ours.
    let secret_len = env.secret_len();
    if !(1..=MAX_SECRET_LEN).contains(&secret_len) {
        return Err(ServiceError::SecretLength {
            len: secret_len,
            max: MAX_SECRET_LEN,
        });
    }
    Ok(RecordWrite {
        meta,
        key_version: info.version,
        envelope: record.envelope,
        expected_version: item.expected_version,
    })
}

#[tonic::async_trait]
impl Ingest for IngestService {
    async fn put_sealed(
        &self,
        request: Request<v1::PutSealedRequest>,
    ) -> Result<Response<v1::PutSealedResponse>, Status> {
        let caller = caller_name(&request);
        let caller_policy = caller_policy(&request);
        let write = check_item(
            &self.0.keyring(),
            &self.0.policy,
            &caller_policy,
            crate::unix_now(),
            request.into_inner(),
        )?;
        let id = write.meta.id.clone();
        let versions = self
            .0
            .commit
            .submit(vec![write])
            .await
            .map_err(ServiceError::from)?;
        tracing::debug!(rpc = "PutSealed", %caller, record = %id, version = versions[0], "stored");
        Ok(Response::new(v1::PutSealedResponse {
            version: versions[0],
        }))
    }

    async fn put_sealed_batch(
        &self,
        request: Request<v1::PutSealedBatchRequest>,
    ) -> Result<Response<v1::PutSealedBatchResponse>, Status> {
        let caller = caller_name(&request);
        let caller_policy = caller_policy(&request);
        let items = request.into_inner().items;
        let max = self.0.limits.max_batch;
        if items.is_empty() {
            return Err(ServiceError::EmptyBatch.into());
        }
        if items.len() > max {
            return Err(ServiceError::BatchTooLarge {
                count: items.len(),
                max,
            }
            .into());
        }
        let ring = self.0.keyring();
        let now = crate::unix_now();
        let writes = items
            .into_iter()
            .enumerate()
            .map(|(index, item)| {
                check_item(&ring, &self.0.policy, &caller_policy, now, item).map_err(|e| {
                    ServiceError::Item {
                        index,
                        source: Box::new(e),
                    }
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let count = writes.len();
        let versions = self
            .0
            .commit
            .submit(writes)
            .await
            .map_err(ServiceError::from)?;
        tracing::debug!(rpc = "PutSealedBatch", %caller, records = count, "stored");
        Ok(Response::new(v1::PutSealedBatchResponse { versions }))
    }

    async fn public_keys(
        &self,
        _request: Request<v1::PublicKeysRequest>,
    ) -> Result<Response<v1::PublicKeysResponse>, Status> {
        let ring = self.0.keyring();
        let (info, _) = ring.active();
        Ok(Response::new(v1::PublicKeysResponse {
            active: Some(info.into()),
        }))
    }
}
