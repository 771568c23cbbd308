//! `Broker`: hands decrypted secrets to authorized workers (`GetToken`), or makes their
//! upstream calls with the credential injected (`Proxy`).
//!
//! The secret crosses into a prost `Vec<u8>` for a `GetToken` response; prost and tonic buffers
//! are not zeroized (documented in docs/THREAT_MODEL.md). Everything before that point is.
//! `Proxy` validates the outbound request before the record is decrypted, so a refused
//! request never touches the credential.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::status::ServiceError;
use super::{State, caller_name, caller_policy, grants, record_id, records, refresh};
use crate::api::v1::{self, broker_server::Broker};
use crate::audit::Draft;
use crate::config::CallerPolicy;
use crate::keys::keyring::Keyring;
use crate::oauth::TokenBundle;
use crate::proxy::{self, CallerRequest};
use crate::record::{Record, RecordId, SecretKind};
use crate::secret::{GrantHandle, Secret};
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
        let id = record_id(request.into_inner().id)?;
        let result = async {
            let (mut record, mut secret, ()) = load(
                &self.0,
                &caller,
                &policy,
                &id,
                Draft::new(&caller, "GetToken"),
                None,
                |_, _, _| Ok(()),
            )
            .await?;
            if let Some((upstream, oauth)) = refresh::oauth_for(&self.0, &record) {
                let bundle =
                    TokenBundle::parse(&secret).map_err(|source| ServiceError::Refresh {
                        id: id.to_string(),
                        source,
                    })?;
                if bundle.expires_within(crate::unix_now(), oauth.refresh_skew_seconds) {
                    let (r, fresh) = refresh::refresh(&self.0, &upstream, &caller, &record).await?;
                    record = r;
                    secret = fresh.to_secret();
                }
            }
            Ok::<_, ServiceError>(v1::GetTokenResponse {
                info: Some((&record).into()),
                secret: secret.expose_secret().to_vec(),
            })
        }
        .await;
        match &result {
            Ok(_) => tracing::debug!(rpc = "GetToken", %caller, record = %id, "released"),
            Err(e) => {
                tracing::info!(rpc = "GetToken", %caller, record = %id, error = %e, "refused")
            }
        }
        Ok(Response::new(result?))
    }

    async fn proxy(
        &self,
        request: Request<v1::ProxyRequest>,
    ) -> Result<Response<v1::ProxyResponse>, Status> {
        let caller = caller_name(&request);
        let policy = caller_policy(&request);
        let mut req = request.into_inner();
        let grant =
            (!req.grant.is_empty()).then(|| GrantHandle::new(std::mem::take(&mut req.grant)));
        let id = match &grant {
            Some(handle) if req.id.is_empty() => {
                let handle = handle.clone();
                self.0
                    .blocking(move |s| grants::record_of(s, &handle))
                    .await?
            }
            _ => record_id(req.id)?,
        };
        let call = CallerRequest {
            method: req.method,
            path: req.path,
            headers: req.headers.into_iter().map(|h| (h.name, h.value)).collect(),
            body: req.body,
        };
        let result = self.proxy_call(&caller, &policy, &id, call, grant).await;
        match &result {
            Ok(r) => {
                tracing::debug!(rpc = "Proxy", %caller, record = %id, status = r.status, refreshed = r.refreshed, "proxied")
            }
            Err(e) => tracing::info!(rpc = "Proxy", %caller, record = %id, error = %e, "refused"),
        }
        Ok(Response::new(result?))
    }

    async fn issue_grant(
        &self,
        request: Request<v1::IssueGrantRequest>,
    ) -> Result<Response<v1::IssueGrantResponse>, Status> {
        let caller = caller_name(&request);
        let policy = caller_policy(&request);
        let req = request.into_inner();
        let who = caller.clone();
        let result = self
            .0
            .blocking(move |s| {
                let issued = grants::issue(s, &who, &policy, req, crate::unix_now());
                s.audit_if_refused(Draft::new(&who, "IssueGrant"), issued)
            })
            .await;
        match &result {
            Ok(g) => {
                tracing::info!(rpc = "IssueGrant", %caller, grant = %crate::grant::short(&g.grant_id), expires_at = g.expires_at, "issued")
            }
            Err(e) => tracing::info!(rpc = "IssueGrant", %caller, error = %e, "refused"),
        }
        Ok(Response::new(result?))
    }

    async fn revoke_grant(
        &self,
        request: Request<v1::RevokeGrantRequest>,
    ) -> Result<Response<v1::RevokeGrantResponse>, Status> {
        let caller = caller_name(&request);
        let policy = caller_policy(&request);
        // The field takes the grant id or the handle itself: treated as a secret either way.
        let handle = GrantHandle::new(request.into_inner().grant_id);
        let who = caller.clone();
        let result = self
            .0
            .blocking(move |s| {
                let revoked = grants::revoke(s, &who, &policy, handle.expose_secret());
                s.audit_if_refused(Draft::new(&who, "RevokeGrant"), revoked)
            })
            .await;
        if let Err(e) = &result {
            tracing::info!(rpc = "RevokeGrant", %caller, error = %e, "refused");
        }
        result?;
        Ok(Response::new(v1::RevokeGrantResponse {}))
    }
}

impl BrokerService {
    async fn proxy_call(
        &self,
        caller: &str,
        policy: &Arc<CallerPolicy>,
        id: &RecordId,
        call: CallerRequest,
        grant: Option<GrantHandle>,
    ) -> Result<v1::ProxyResponse, ServiceError> {
        let state = &self.0;
        let draft = Draft::new(caller, "Proxy");
        // With a grant, the grant decides which records; the caller's rate limits still apply.
        let policy = match &grant {
            Some(_) => &grants::grant_policy(policy),
            None => policy,
        };
        let who = caller.to_string();
        let grant_use = grant.map(|handle| grants::GrantUse {
            handle,
            method: call.method.to_ascii_uppercase(),
            path: call.path.clone(),
        });
        let grant_use = grant_use.map(Arc::new);
        let check_use = grant_use.clone();
        // The outbound request is checked against the record's provider before the record is
        // opened, in the same blocking step (and audited if refused).
        let (mut record, secret, (upstream, prepared)) = load(
            state,
            caller,
            policy,
            id,
            draft,
            grant_use,
            move |s, record, draft| {
                let meta = &record.meta;
                let upstream = s
                    .upstreams()
                    .get(meta.provider.as_str())
                    .ok_or_else(|| ServiceError::NoProvider(meta.provider.to_string()))?;
                if !matches!(
                    meta.kind,
                    SecretKind::AccessToken | SecretKind::ApiKey | SecretKind::TokenBundle
                ) {
                    return Err(ServiceError::NotACredential {
                        id: meta.id.to_string(),
                        kind: meta.kind,
                    });
                }
                let method = call.method.to_ascii_uppercase();
                match &check_use {
                    None => *draft = std::mem::take(draft).detail(method),
                    Some(g) => {
                        *draft = std::mem::take(draft).detail(format!(
                            "{method} grant {}",
                            crate::grant::short(&crate::grant::grant_id(g.handle.expose_secret()))
                        ));
                        g.check(s, &who, record)?;
                    }
                }
                // Moves the request (its body may be megabytes) instead of copying it.
                let prepared = upstream.prepare(call)?;
                Ok((upstream, prepared))
            },
        )
        .await?;
        let refreshable = refresh::oauth_for(state, &record);
        let mut refreshed = false;
        let mut token = match record.meta.kind {
            SecretKind::TokenBundle => {
                let bundle =
                    TokenBundle::parse(&secret).map_err(|source| ServiceError::Refresh {
                        id: id.to_string(),
                        source,
                    })?;
                match &refreshable {
                    Some((up, oauth))
                        if bundle.expires_within(crate::unix_now(), oauth.refresh_skew_seconds) =>
                    {
                        let (r, fresh) = refresh::refresh(state, up, caller, &record).await?;
                        record = r;
                        refreshed = true;
                        fresh.access()
                    }
                    _ => bundle.access(),
                }
            }
            _ => secret,
        };
        let provider = upstream.policy().name.clone();
        let count = |r: &Result<proxy::UpstreamResponse, proxy::ProxyError>| {
            let class = match r {
                Ok(r) => format!("{}xx", r.status / 100),
                Err(e) => proxy_error_kind(e).to_string(),
            };
            state.metrics.upstream(&provider, &class);
        };
        let sent = upstream.send(&prepared, &token).await;
        count(&sent);
        let mut response = sent?;
        // One refresh after the provider rejects the access token.
        if proxy::is_unauthorized(response.status)
            && !refreshed
            && let Some((up, _)) = &refreshable
        {
            let (_, fresh) = refresh::refresh(state, up, caller, &record).await?;
            refreshed = true;
            token = fresh.access();
            let sent = upstream.send(&prepared, &token).await;
            count(&sent);
            response = sent?;
        }
        drop(token);
        Ok(v1::ProxyResponse {
            status: u32::from(response.status),
            headers: response
                .headers
                .into_iter()
                .map(|(name, value)| v1::HttpHeader { name, value })
                .collect(),
            body: response.body.to_vec(),
            refreshed,
        })
    }
}

/// Reads, checks and opens one record for `caller`, auditing `draft` before the secret is
/// released (fail closed: no audit event, no secret). `check` runs after the caller's policy
/// and before the record is opened; its refusal is audited like any other. With a grant, its
/// use is spent only once everything passed, in the same write as the audit event. A
/// refreshable token bundle past its expiry is returned (the caller refreshes it); anything
/// else past expiry is refused.
async fn load<T: Send + 'static>(
    state: &Arc<State>,
    caller: &str,
    policy: &Arc<CallerPolicy>,
    id: &RecordId,
    draft: Draft,
    grant: Option<Arc<grants::GrantUse>>,
    check: impl FnOnce(&State, &Record, &mut Draft) -> Result<T, ServiceError> + Send + 'static,
) -> Result<(Record, Secret, T), ServiceError> {
    let ring = state.keyring();
    let (who, policy, id) = (caller.to_string(), Arc::clone(policy), id.clone());
    let draft = draft.record(id.as_str());
    state
        .cpu_bound(move |s| {
            let mut draft = draft;
            let released = s
                .record_token(&who, &policy, &id)
                .and_then(|()| release(s, &id, &ring, &policy, &mut draft, check))
                .and_then(|released| {
                    match &grant {
                        Some(g) => g.spend(s, &who, &released.0, &draft)?,
                        None => s.audit.append(&draft, false)?,
                    }
                    Ok(released)
                });
            if let Err(e) = &released
                && !matches!(e, ServiceError::Audit(_))
            {
                s.audit_outcome(draft, e);
            }
            released
        })
        .await
}

/// Reads, checks and opens one record.
fn release<T>(
    s: &State,
    id: &RecordId,
    ring: &Keyring,
    policy: &CallerPolicy,
    draft: &mut Draft,
    check: impl FnOnce(&State, &Record, &mut Draft) -> Result<T, ServiceError>,
) -> Result<(Record, Secret, T), ServiceError> {
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
    if record.needs_reauth {
        return Err(ServiceError::NeedsReauth(id.to_string()));
    }
    let checked = check(s, &record, draft)?;
    let refreshable = refresh::oauth_for(s, &record).is_some();
    if let Some(expires_at) = record
        .meta
        .expires_at
        .filter(|_| !refreshable && record.meta.is_expired_at(crate::unix_now()))
    {
        return Err(ServiceError::Expired {
            id: id.to_string(),
            expires_at,
        });
    }
    let secret = records::open(s, id, &record, ring).map_err(|source| ServiceError::Open {
        id: id.to_string(),
        source,
    })?;
    Ok((record, secret, checked))
}

/// A bounded label for a proxy failure.
fn proxy_error_kind(e: &proxy::ProxyError) -> &'static str {
    use proxy::ProxyError;
    match e {
        ProxyError::Refused(_) => "refused",
        ProxyError::Timeout { .. } => "timeout",
        ProxyError::ResponseTooLarge { .. } => "too_large",
        ProxyError::Busy(_) => "busy",
        ProxyError::Unavailable(_) => "unavailable",
        _ => "error",
    }
}
