//! `Broker`: hands decrypted secrets to authorized workers.
//!
//! The secret crosses into a prost `Vec<u8>` for the response; prost and tonic buffers are not
//! zeroized (documented in docs/THREAT_MODEL.md). Everything before that point is.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::status::ServiceError;
use super::{State, caller_name, caller_policy};
use crate::api::v1::{self, broker_server::Broker};
use crate::audit::Draft;
use crate::envelope::{self, DecryptError, EnvelopeRef};
use crate::keys::UnwrapperLookup as _;
use crate::keys::keyring::Keyring;
use crate::record::RecordId;
use crate::store::StoreError;

/// The `tokenvault.v1.Broker` service.
pub struct BrokerService(pub(super) Arc<State>);

#[tonic::async_trait]
impl Broker for BrokerService {
    async fn get_token(
        &self,
        request: Request<v1::GetTokenRequest>,
    ) -> Result<Response<v1::GetTokenResponse>, Status> {
        let caller = caller_name(&request);
        let policy = caller_policy(&request);
        let id =
            RecordId::parse(request.into_inner().id).map_err(|source| ServiceError::Invalid {
                what: "record id".into(),
                source,
            })?;
        let ring = self.0.keyring();
        let log_id = id.clone();
        let who = caller.clone();
        let result = self
            .0
            .blocking(move |s| {
                let mut draft = Draft::new(&who, "GetToken").record(id.as_str());
                let released = s
                    .record_token(&who, &policy, &id)
                    .and_then(|()| release(s, &id, &ring, &policy, &mut draft));
                match &released {
                    // Fail closed: no audit event, no secret.
                    Ok(_) => s.audit.append(&draft, false)?,
                    Err(e) => s.audit_outcome(draft, e),
                }
                released
            })
            .await;
        match &result {
            Ok(_) => tracing::info!(rpc = "GetToken", %caller, record = %log_id, "released"),
            Err(e) => {
                tracing::info!(rpc = "GetToken", %caller, record = %log_id, error = %e, "refused")
            }
        }
        Ok(Response::new(result?))
    }
}

/// Reads, checks and opens one record.
fn release(
    s: &State,
    id: &RecordId,
    ring: &Keyring,
    policy: &crate::config::CallerPolicy,
    draft: &mut Draft,
) -> Result<v1::GetTokenResponse, ServiceError> {
    let record = s
        .store
        .get_record(id)?
        .ok_or_else(|| StoreError::NotFound(id.to_string()))?;
    *draft = std::mem::take(draft).owner(record.meta.owner.as_str());
    policy
        .check_record(&record.meta)
        .map_err(ServiceError::PolicyDenied)?;
    if record.revoked {
        return Err(ServiceError::Revoked(id.to_string()));
    }
    if let Some(expires_at) = record
        .meta
        .expires_at
        .filter(|_| record.meta.is_expired_at(crate::unix_now()))
    {
        return Err(ServiceError::Expired {
            id: id.to_string(),
            expires_at,
        });
    }
    let secret = open(s, id, &record, ring).map_err(|source| ServiceError::Open {
        id: id.to_string(),
        source,
    })?;
    Ok(v1::GetTokenResponse {
        info: Some((&record).into()),
        secret: secret.expose_secret().to_vec(),
    })
}

/// Opens a record, through the DEK cache when it is enabled. The key lookup runs on every
/// call, so a destroyed key or the minimum decryption version applies to cached keys too.
fn open(
    s: &State,
    id: &RecordId,
    record: &crate::record::Record,
    ring: &Keyring,
) -> Result<crate::secret::Secret, DecryptError> {
    let Some(cache) = &s.dek_cache else {
        return envelope::open(&record.meta, &record.envelope, ring);
    };
    let env = EnvelopeRef::decode(&record.envelope)?;
    let unwrapper = ring.unwrapper(&env.key_id)?;
    if let Some(dek) = cache.get(id, record.version, &env.key_id) {
        return envelope::open_with_dek(&record.meta, &env, &dek);
    }
    let dek = Arc::new(unwrapper.unwrap_dek(env.wrapped_dek)?);
    let secret = envelope::open_with_dek(&record.meta, &env, &dek)?;
    // Cached only once it has opened the record, so a bad key is never reused.
    cache.put(id.clone(), record.version, env.key_id, dek);
    Ok(secret)
}
