//! The `tokenvault.v1.Broker` adapter: proto → domain, one vault call, → proto.
//!
//! The secret crosses into a prost `Vec<u8>` for a `GetToken` response; prost and tonic buffers
//! are not zeroized (documented in docs/THREAT_MODEL.md). Everything before that point is.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::status::VaultError;
use super::{caller, record_id};
use crate::api::v1::{self, broker_server::Broker};
use crate::proxy::CallerRequest;
use crate::record::Owner;
use crate::secret::GrantHandle;
use crate::vault::{GrantSubject, IssueGrant, ProxyTarget, Vault};

/// The `tokenvault.v1.Broker` service.
pub struct BrokerService(pub(super) Arc<Vault>);

impl TryFrom<v1::IssueGrantRequest> for IssueGrant {
    type Error = VaultError;

    fn try_from(req: v1::IssueGrantRequest) -> Result<Self, VaultError> {
        let subject = match (req.id.is_empty(), req.owner.is_empty()) {
            (false, true) => GrantSubject::Record(record_id(req.id)?),
            (true, false) => GrantSubject::Owner(Owner::parse(req.owner).map_err(|source| {
                VaultError::Invalid {
                    what: "owner".into(),
                    source,
                }
            })?),
            _ => {
                return Err(VaultError::Grant(crate::grant::GrantError::Invalid(
                    "set exactly one of id or owner".into(),
                )));
            }
        };
        Ok(IssueGrant {
            subject,
            methods: req.methods,
            path_prefixes: req.path_prefixes,
            ttl_seconds: req.ttl_seconds,
            max_uses: req.max_uses,
            audience: (!req.audience.is_empty()).then_some(req.audience),
        })
    }
}

#[tonic::async_trait]
impl Broker for BrokerService {
    async fn get_token(
        &self,
        request: Request<v1::GetTokenRequest>,
    ) -> Result<Response<v1::GetTokenResponse>, Status> {
        let caller = caller(&request)?;
        let id = record_id(request.into_inner().id)?;
        let released = self.0.get_token(&caller, &id).await?;
        Ok(Response::new(v1::GetTokenResponse {
            info: Some((&released.record).into()),
            secret: released.secret.expose_secret().to_vec(),
        }))
    }

    async fn proxy(
        &self,
        request: Request<v1::ProxyRequest>,
    ) -> Result<Response<v1::ProxyResponse>, Status> {
        let caller = caller(&request)?;
        Ok(Response::new(
            proxy_call(&self.0, &caller, request.into_inner()).await?,
        ))
    }

    async fn issue_grant(
        &self,
        request: Request<v1::IssueGrantRequest>,
    ) -> Result<Response<v1::IssueGrantResponse>, Status> {
        let caller = caller(&request)?;
        let issue = IssueGrant::try_from(request.into_inner())?;
        let issued = self.0.issue_grant(&caller, issue).await?;
        Ok(Response::new(v1::IssueGrantResponse {
            grant: issued.handle.expose_secret().to_string(),
            grant_id: issued.grant_id,
            expires_at: issued.expires_at,
        }))
    }

    async fn revoke_grant(
        &self,
        request: Request<v1::RevokeGrantRequest>,
    ) -> Result<Response<v1::RevokeGrantResponse>, Status> {
        let caller = caller(&request)?;
        // The field takes the grant id or the handle itself: treated as a secret either way.
        let handle = GrantHandle::new(request.into_inner().grant_id);
        self.0.revoke_grant(&caller, handle).await?;
        Ok(Response::new(v1::RevokeGrantResponse {}))
    }
}

/// `Broker.Proxy` for either adapter (gRPC, and `POST /v1/proxy`): the request checked and
/// converted, one vault call, the answer as the proto message.
pub(super) async fn proxy_call(
    vault: &Arc<Vault>,
    caller: &crate::vault::Caller,
    mut req: v1::ProxyRequest,
) -> Result<v1::ProxyResponse, VaultError> {
    let grant = (!req.grant.is_empty()).then(|| GrantHandle::new(std::mem::take(&mut req.grant)));
    // Without a grant the id is required (and reported invalid when empty).
    let id = if grant.is_none() || !req.id.is_empty() {
        Some(record_id(req.id)?)
    } else {
        None
    };
    let call = CallerRequest {
        method: req.method,
        path: req.path,
        headers: req.headers.into_iter().map(|h| (h.name, h.value)).collect(),
        body: req.body,
    };
    let proxied = vault.proxy(caller, ProxyTarget { id, grant }, call).await?;
    let response = proxied.response;
    Ok(v1::ProxyResponse {
        status: u32::from(response.status),
        headers: response
            .headers
            .into_iter()
            .map(|(name, value)| v1::HttpHeader { name, value })
            .collect(),
        body: response.body.to_vec(),
        refreshed: proxied.refreshed,
    })
}
