//! `Admin`: key listing, revocation, irrecoverable deletion and statistics.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::status::ServiceError;
use super::{State, caller_name};
use crate::api::v1::{self, admin_server::Admin};
use crate::record::{Owner, RecordId};
use crate::store::StoreError;

/// The `tokenvault.v1.Admin` service.
pub struct AdminService(pub(super) Arc<State>);

fn record_id(raw: String) -> Result<RecordId, ServiceError> {
    RecordId::parse(raw).map_err(|source| ServiceError::Invalid {
        what: "record id".into(),
        source,
    })
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn list_keys(
        &self,
        _request: Request<v1::ListKeysRequest>,
    ) -> Result<Response<v1::ListKeysResponse>, Status> {
        let ring = self.0.keyring();
        Ok(Response::new(v1::ListKeysResponse {
            keys: ring.infos().map(Into::into).collect(),
        }))
    }

    async fn revoke(
        &self,
        request: Request<v1::RevokeRequest>,
    ) -> Result<Response<v1::RevokeResponse>, Status> {
        let caller = caller_name(&request);
        let id = record_id(request.into_inner().id)?;
        let log_id = id.clone();
        let record = self
            .0
            .blocking(move |s| Ok(s.store.revoke(&id, crate::unix_now())?))
            .await?;
        tracing::info!(rpc = "Revoke", %caller, record = %log_id, "revoked");
        Ok(Response::new(v1::RevokeResponse {
            info: Some((&record).into()),
        }))
    }

    async fn delete(
        &self,
        request: Request<v1::DeleteRequest>,
    ) -> Result<Response<v1::DeleteResponse>, Status> {
        let caller = caller_name(&request);
        let id = record_id(request.into_inner().id)?;
        let log_id = id.clone();
        self.0
            .blocking(move |s| {
                if s.store.delete_record(&id)? {
                    Ok(())
                } else {
                    Err(StoreError::NotFound(id.to_string()).into())
                }
            })
            .await?;
        tracing::info!(rpc = "Delete", %caller, record = %log_id, "deleted");
        Ok(Response::new(v1::DeleteResponse {}))
    }

    async fn delete_owner(
        &self,
        request: Request<v1::DeleteOwnerRequest>,
    ) -> Result<Response<v1::DeleteOwnerResponse>, Status> {
        let caller = caller_name(&request);
        let owner =
            Owner::parse(request.into_inner().owner).map_err(|source| ServiceError::Invalid {
                what: "owner".into(),
                source,
            })?;
        let deleted = self
            .0
            .blocking(move |s| Ok(s.store.delete_owner(&owner)?))
            .await?;
        // The owner is a personal identifier: it is not logged.
        tracing::info!(rpc = "DeleteOwner", %caller, deleted, "deleted owner's records");
        Ok(Response::new(v1::DeleteOwnerResponse { deleted }))
    }

    async fn stats(
        &self,
        _request: Request<v1::StatsRequest>,
    ) -> Result<Response<v1::StatsResponse>, Status> {
        let stats = self.0.blocking(|s| Ok(s.store.stats()?)).await?;
        Ok(Response::new(v1::StatsResponse {
            records: stats.records,
            revoked: stats.revoked,
            records_per_key_version: stats
                .per_key_version
                .into_iter()
                .map(|(key_version, records)| v1::KeyVersionCount {
                    key_version,
                    records,
                })
                .collect(),
        }))
    }
}
