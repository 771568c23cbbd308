//! The `tokenvault.v1.Admin` adapter: proto → domain, one vault call, → proto.

use std::pin::Pin;
use std::sync::Arc;

use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::{Stream, StreamExt as _};
use tonic::{Request, Response, Status};

use super::status::VaultError;
use super::{caller, record_id};
use crate::api::v1::{self, admin_server::Admin};
use crate::record::{Owner, Provider};
use crate::rotation::RewrapProgress;
use crate::vault::approvals::{ApprovalRequest, Decision};
use crate::vault::listing::{RecordFilter, RecordState};
use crate::vault::{AuditEntry, AuditFilter, KeyImport, Vault};

fn progress(p: &RewrapProgress) -> v1::RewrapProgress {
    v1::RewrapProgress {
        target_version: p.target_version,
        total: p.total,
        rewrapped: p.rewrapped,
        skipped: p.skipped,
        conflicts: p.conflicts,
        failed: p.failed,
        done: p.done,
        elapsed_seconds: p.elapsed.as_secs_f64(),
    }
}

impl From<AuditEntry> for v1::AuditEvent {
    fn from(entry: AuditEntry) -> Self {
        let e = entry.event;
        v1::AuditEvent {
            seq: entry.seq,
            time_ms: e.time_ms,
            caller: e.caller,
            action: e.action,
            record_hmac: e.record_hmac,
            owner_hmac: e.owner_hmac,
            outcome: e.outcome,
            detail: e.detail,
            prev_hash: e.prev_hash,
            hash: e.hash,
            raw: entry.raw,
            instance: entry.chain,
            checkpoint_seq: entry.checkpoint.map_or(0, |c| c.seq),
            checkpoint_hash: entry
                .checkpoint
                .map(|c| c.hash.to_vec())
                .unwrap_or_default(),
        }
    }
}

impl TryFrom<v1::AuditLogRequest> for AuditFilter {
    type Error = VaultError;

    fn try_from(req: v1::AuditLogRequest) -> Result<Self, VaultError> {
        if !req.instance.is_empty() {
            crate::record::check_instance(&req.instance).map_err(|source| VaultError::Invalid {
                what: "instance".into(),
                source,
            })?;
        }
        Ok(AuditFilter {
            record_id: (!req.record_id.is_empty()).then_some(req.record_id),
            owner: (!req.owner.is_empty()).then_some(req.owner),
            from_time_ms: (req.from_time_ms != 0).then_some(req.from_time_ms),
            to_time_ms: (req.to_time_ms != 0).then_some(req.to_time_ms),
            instance: (!req.instance.is_empty()).then_some(req.instance),
        })
    }
}

impl TryFrom<&v1::ListRecordsRequest> for RecordFilter {
    type Error = VaultError;

    fn try_from(req: &v1::ListRecordsRequest) -> Result<Self, VaultError> {
        let invalid = |what: &str| {
            let what = what.to_string();
            move |source| VaultError::Invalid { what, source }
        };
        let state = match v1::RecordState::try_from(req.state) {
            Ok(v1::RecordState::Unspecified) => None,
            Ok(v1::RecordState::Revoked) => Some(RecordState::Revoked),
            Ok(v1::RecordState::NeedsReauth) => Some(RecordState::NeedsReauth),
            Ok(v1::RecordState::Expired) => Some(RecordState::Expired),
            Ok(v1::RecordState::Usable) => Some(RecordState::Usable),
            Err(_) => {
                return Err(VaultError::Argument {
                    what: "state",
                    why: format!("{} is not a RecordState", req.state),
                });
            }
        };
        Ok(RecordFilter {
            provider: (!req.provider.is_empty())
                .then(|| Provider::parse(&req.provider))
                .transpose()
                .map_err(invalid("provider"))?,
            owner: (!req.owner.is_empty())
                .then(|| Owner::parse(req.owner.clone()))
                .transpose()
                .map_err(invalid("owner"))?,
            kind: (req.kind != 0)
                .then(|| crate::api::secret_kind(req.kind))
                .transpose()
                .map_err(invalid("kind"))?,
            state,
            key_version: (req.key_version != 0).then_some(req.key_version),
        })
    }
}

/// The `tokenvault.v1.Admin` service.
pub struct AdminService(pub(super) Arc<Vault>);

impl AdminService {
    /// The registry entry of `version` as this daemon holds it.
    fn key(&self, version: u32) -> Option<v1::PublicKey> {
        self.0
            .keys()
            .iter()
            .find(|k| k.version == version)
            .map(Into::into)
    }
}

/// A held call on the wire.
fn approval(r: &ApprovalRequest) -> v1::ApprovalRequest {
    v1::ApprovalRequest {
        id: r.id.clone(),
        action: r.action.name().into(),
        target: r.action.target(),
        approvals: r.approvals.clone(),
        required: r.required,
        expires_at: r.expires_at,
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    type RewrapStream = Pin<Box<dyn Stream<Item = Result<v1::RewrapProgress, Status>> + Send>>;
    type AuditLogStream = Pin<Box<dyn Stream<Item = Result<v1::AuditEvent, Status>> + Send>>;

    async fn audit_log(
        &self,
        request: Request<v1::AuditLogRequest>,
    ) -> Result<Response<Self::AuditLogStream>, Status> {
        let events = self
            .0
            .audit_log(AuditFilter::try_from(request.into_inner())?);
        Ok(Response::new(Box::pin(
            ReceiverStream::new(events).map(|e| e.map(Into::into).map_err(Status::from)),
        )))
    }

    async fn rotate_key(
        &self,
        request: Request<v1::RotateKeyRequest>,
    ) -> Result<Response<v1::RotateKeyResponse>, Status> {
        let caller = caller(&request)?;
        let mut req = request.into_inner();
        // The PEM leaves the prost message at once, into memory that is zeroized on drop.
        let private_pem = zeroize::Zeroizing::new(std::mem::take(&mut req.private_key_pem));
        let import = match (private_pem.is_empty(), req.token_key_label.is_empty()) {
            (true, true) => None,
            (false, true) => Some(KeyImport::Pem {
                private_pem,
                public_pem: (!req.public_key_pem.is_empty()).then_some(req.public_key_pem),
            }),
            (true, false) => Some(KeyImport::TokenLabel(req.token_key_label)),
            (false, false) => {
                return Err(VaultError::Argument {
                    what: "token_key_label",
                    why: "give either private_key_pem or token_key_label, not both".into(),
                }
                .into());
            }
        };
        let algorithm =
            match req.algorithm.as_str() {
                "" => None,
                name => Some(crate::keys::Algorithm::parse(name).ok_or_else(|| {
                    VaultError::Argument {
                        what: "algorithm",
                        why: format!(
                            "not an algorithm a key is generated with; one of {}",
                            crate::keys::Algorithm::GENERATED
                                .iter()
                                .map(|(n, _)| *n)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    }
                })?),
            };
        let rotated = self.0.rotate(&caller, import, algorithm).await?;
        Ok(Response::new(v1::RotateKeyResponse {
            active: Some((&rotated.active).into()),
            previous: rotated.previous.as_ref().map(Into::into),
        }))
    }

    async fn rewrap(
        &self,
        request: Request<v1::RewrapRequest>,
    ) -> Result<Response<Self::RewrapStream>, Status> {
        let caller = caller(&request)?;
        let max = request.into_inner().max_records_per_second;
        let updates = self.0.rewrap(&caller, (max > 0).then_some(max)).await?;
        Ok(Response::new(Box::pin(
            ReceiverStream::new(updates).map(|p| p.map(|p| progress(&p)).map_err(Status::from)),
        )))
    }

    async fn retire_key(
        &self,
        request: Request<v1::RetireKeyRequest>,
    ) -> Result<Response<v1::RetireKeyResponse>, Status> {
        let caller = caller(&request)?;
        let info = self
            .0
            .retire_key(&caller, request.into_inner().version)
            .await?;
        Ok(Response::new(v1::RetireKeyResponse {
            key: Some((&info).into()),
        }))
    }

    async fn destroy_key(
        &self,
        request: Request<v1::DestroyKeyRequest>,
    ) -> Result<Response<v1::DestroyKeyResponse>, Status> {
        let caller = caller(&request)?;
        let version = request.into_inner().version;
        Ok(Response::new(
            match self.0.destroy_key(&caller, version).await? {
                Decision::Done((info, erased)) => v1::DestroyKeyResponse {
                    key: Some((&info).into()),
                    private_key_erased: erased,
                    approval: None,
                },
                Decision::Held(request) => v1::DestroyKeyResponse {
                    key: self.key(version),
                    private_key_erased: false,
                    approval: Some(approval(&request)),
                },
            },
        ))
    }

    async fn cancel_destroy_key(
        &self,
        request: Request<v1::CancelDestroyKeyRequest>,
    ) -> Result<Response<v1::CancelDestroyKeyResponse>, Status> {
        let caller = caller(&request)?;
        let version = request.into_inner().version;
        Ok(Response::new(
            match self.0.cancel_destroy_key(&caller, version).await? {
                Decision::Done(info) => v1::CancelDestroyKeyResponse {
                    key: Some((&info).into()),
                    approval: None,
                },
                Decision::Held(request) => v1::CancelDestroyKeyResponse {
                    key: self.key(version),
                    approval: Some(approval(&request)),
                },
            },
        ))
    }

    async fn set_min_decrypt_version(
        &self,
        request: Request<v1::SetMinDecryptVersionRequest>,
    ) -> Result<Response<v1::SetMinDecryptVersionResponse>, Status> {
        let caller = caller(&request)?;
        let version = request.into_inner().version;
        Ok(Response::new(
            match self.0.set_min_decrypt_version(&caller, version).await? {
                Decision::Done(minimum) => v1::SetMinDecryptVersionResponse {
                    minimum,
                    approval: None,
                },
                Decision::Held(request) => v1::SetMinDecryptVersionResponse {
                    minimum: self.0.min_version_in_force(),
                    approval: Some(approval(&request)),
                },
            },
        ))
    }

    async fn approve(
        &self,
        request: Request<v1::ApproveRequest>,
    ) -> Result<Response<v1::ApproveResponse>, Status> {
        let caller = caller(&request)?;
        let approved = self.0.approve(&caller, request.into_inner().id).await?;
        Ok(Response::new(v1::ApproveResponse {
            request: Some(approval(&approved.request)),
            executed: approved.outcome.is_some(),
            outcome: approved.outcome.unwrap_or_default(),
        }))
    }

    async fn list_keys(
        &self,
        _request: Request<v1::ListKeysRequest>,
    ) -> Result<Response<v1::ListKeysResponse>, Status> {
        Ok(Response::new(v1::ListKeysResponse {
            keys: self.0.keys().iter().map(Into::into).collect(),
        }))
    }

    async fn revoke(
        &self,
        request: Request<v1::RevokeRequest>,
    ) -> Result<Response<v1::RevokeResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let id = record_id(req.id)?;
        let record = self.0.revoke(&caller, id, req.revoke_at_provider).await?;
        Ok(Response::new(v1::RevokeResponse {
            info: Some((&record).into()),
        }))
    }

    async fn delete(
        &self,
        request: Request<v1::DeleteRequest>,
    ) -> Result<Response<v1::DeleteResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let id = record_id(req.id)?;
        self.0.delete(&caller, id, req.revoke_at_provider).await?;
        Ok(Response::new(v1::DeleteResponse {}))
    }

    async fn delete_owner(
        &self,
        request: Request<v1::DeleteOwnerRequest>,
    ) -> Result<Response<v1::DeleteOwnerResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let owner = Owner::parse(req.owner).map_err(|source| VaultError::Invalid {
            what: "owner".into(),
            source,
        })?;
        Ok(Response::new(
            match self
                .0
                .delete_owner(&caller, owner, req.revoke_at_provider)
                .await?
            {
                Decision::Done(deleted) => v1::DeleteOwnerResponse {
                    deleted,
                    approval: None,
                },
                Decision::Held(request) => v1::DeleteOwnerResponse {
                    deleted: 0,
                    approval: Some(approval(&request)),
                },
            },
        ))
    }

    async fn stats(
        &self,
        _request: Request<v1::StatsRequest>,
    ) -> Result<Response<v1::StatsResponse>, Status> {
        let stats = self.0.stats().await?;
        Ok(Response::new(v1::StatsResponse {
            records: stats.store.records,
            revoked: stats.store.revoked,
            needs_reauth: stats.store.needs_reauth,
            fips: crate::keys::FIPS_BUILD,
            dek_cache_hits: stats.cache.hits,
            dek_cache_misses: stats.cache.misses,
            dek_cache_entries: stats.cache.entries,
            records_per_key_version: stats
                .store
                .per_key_version
                .into_iter()
                .map(|(key_version, records)| v1::KeyVersionCount {
                    key_version,
                    records,
                })
                .collect(),
        }))
    }

    async fn list_records(
        &self,
        request: Request<v1::ListRecordsRequest>,
    ) -> Result<Response<v1::ListRecordsResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let filter = RecordFilter::try_from(&req)?;
        let page = self
            .0
            .list_records(&caller, filter, req.page_size, &req.page_token)
            .await?;
        Ok(Response::new(v1::ListRecordsResponse {
            records: page.records.iter().map(Into::into).collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn list_deliveries(
        &self,
        request: Request<v1::ListDeliveriesRequest>,
    ) -> Result<Response<v1::ListDeliveriesResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let page = self
            .0
            .list_deliveries(
                &caller,
                &req.endpoint,
                req.finished,
                req.page_size,
                &req.page_token,
            )
            .await?;
        Ok(Response::new(v1::ListDeliveriesResponse {
            deliveries: page
                .deliveries
                .into_iter()
                .map(|(id, e)| delivery(id, e))
                .collect(),
            next_page_token: page.next_page_token.unwrap_or_default(),
        }))
    }

    async fn retry_delivery(
        &self,
        request: Request<v1::RetryDeliveryRequest>,
    ) -> Result<Response<v1::RetryDeliveryResponse>, Status> {
        let caller = caller(&request)?;
        let req = request.into_inner();
        let (id, entry) = self
            .0
            .retry_delivery(&caller, &req.endpoint, &req.id)
            .await?;
        Ok(Response::new(v1::RetryDeliveryResponse {
            delivery: Some(delivery(id, entry)),
        }))
    }

    async fn prune_audit(
        &self,
        request: Request<v1::PruneAuditRequest>,
    ) -> Result<Response<v1::PruneAuditResponse>, Status> {
        let caller = caller(&request)?;
        let pruned = self.0.prune_audit(&caller).await?;
        Ok(Response::new(v1::PruneAuditResponse { pruned }))
    }

    async fn security_event(
        &self,
        request: Request<v1::SecurityEventRequest>,
    ) -> Result<Response<v1::SecurityEventResponse>, Status> {
        let caller = caller(&request)?;
        let applied = self
            .0
            .security_event(&caller, request.into_inner().token)
            .await?;
        Ok(Response::new(v1::SecurityEventResponse {
            event_type: applied.event_type,
            revoked: applied.revoked,
            deleted: applied.deleted,
        }))
    }

    async fn reload_providers(
        &self,
        request: Request<v1::ReloadProvidersRequest>,
    ) -> Result<Response<v1::ReloadProvidersResponse>, Status> {
        let caller = caller(&request)?;
        let providers = self.0.reload_providers(&caller).await?;
        Ok(Response::new(v1::ReloadProvidersResponse { providers }))
    }
}

/// A stored webhook delivery as `Admin` lists it.
fn delivery(id: String, e: crate::webhook::Entry) -> v1::Delivery {
    v1::Delivery {
        id,
        event_id: e.id,
        r#type: e.kind,
        endpoint: e.endpoint,
        record_id: e.record.unwrap_or_default(),
        state: e.state.as_str().into(),
        attempts: e.attempts,
        created_at: e.created_ms / 1000,
        next_attempt_at: if e.state == crate::webhook::State::Pending {
            e.next_attempt_ms / 1000
        } else {
            0
        },
        finished_at: e.finished_ms.map_or(0, |ms| ms / 1000),
        last_error: e.last_error.unwrap_or_default(),
        body: e.body,
    }
}
