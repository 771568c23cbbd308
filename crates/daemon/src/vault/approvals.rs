//! The two-person rule (`[admin] approvals_required`): asking for a key version's destruction,
//! cancelling one, deleting an owner's records and changing the minimum decryption version take
//! effect only once that many distinct admin identities agreed; the requester is the first.
//!
//! Owns: [`ApprovalRequest`] (stored under `approval/<id>` beside the records; its creation,
//! every approval and its removal are each one write with their audit event) and the decision
//! whether a guarded call acts now or waits ([`Vault::hold`], [`Vault::approve`]).
//!
//! Must never: count one identity twice, act on an expired request, or act twice on one request
//! (the approval that completes it removes the request with a compare-and-swap before the
//! action runs, so two daemons approving at once cannot both act). Never holds back rotation,
//! rewrap or retirement: an emergency rotation needs no second person.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Caller, Vault, VaultError};
use crate::audit::Draft;
use crate::record::Owner;
use crate::store::{Mutation, StoreError, approval_key};

/// A call the two-person rule holds back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action")]
pub enum Guarded {
    /// `Admin.DestroyKey`.
    DestroyKey {
        /// The key version.
        version: u32,
    },
    /// `Admin.CancelDestroyKey`.
    CancelDestroyKey {
        /// The key version.
        version: u32,
    },
    /// `Admin.DeleteOwner`.
    DeleteOwner {
        /// The owner whose records go.
        owner: String,
        /// `revoke_at_provider` as asked (absent in requests stored before it existed).
        #[serde(default)]
        revoke_at_provider: Option<bool>,
    },
    /// `Admin.SetMinDecryptVersion`.
    SetMinDecryptVersion {
        /// The new minimum.
        version: u32,
    },
}

impl Guarded {
    /// The RPC's name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::DestroyKey { .. } => "DestroyKey",
            Self::CancelDestroyKey { .. } => "CancelDestroyKey",
            Self::DeleteOwner { .. } => "DeleteOwner",
            Self::SetMinDecryptVersion { .. } => "SetMinDecryptVersion",
        }
    }

    /// What it acts on: `v3`, or the owner (for the requester's and approvers' eyes; the audit
    /// trail keeps only the owner's HMAC).
    pub fn target(&self) -> String {
        match self {
            Self::DestroyKey { version }
            | Self::CancelDestroyKey { version }
            | Self::SetMinDecryptVersion { version } => format!("v{version}"),
            Self::DeleteOwner { owner, .. } => owner.clone(),
        }
    }

    /// The action for an audit detail: no personal identifier.
    fn audit_detail(&self) -> String {
        match self {
            Self::DeleteOwner { .. } => "DeleteOwner".into(),
            other => format!("{} {}", other.name(), other.target()),
        }
    }

    fn owner(&self) -> Option<&str> {
        match self {
            Self::DeleteOwner { owner, .. } => Some(owner),
            _ => None,
        }
    }
}

/// A guarded call waiting for approvals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalRequest {
    /// 32 lowercase hex digits.
    pub id: String,
    /// What it will do.
    #[serde(flatten)]
    pub action: Guarded,
    /// The identities that agreed, the requester first.
    pub approvals: Vec<String>,
    /// How many it needs.
    pub required: u32,
    /// When it was made, Unix seconds.
    pub created_at: i64,
    /// When it lapses unapproved, Unix seconds.
    pub expires_at: i64,
}

impl ApprovalRequest {
    /// Who asked.
    pub fn requester(&self) -> &str {
        self.approvals.first().map_or("", String::as_str)
    }

    fn encode(&self) -> Result<Vec<u8>, VaultError> {
        serde_json::to_vec(self)
            .map_err(|e| StoreError::Corrupt(format!("approval request: {e}")).into())
    }
}

/// A guarded call's answer: done, or waiting for approvals.
#[derive(Debug)]
pub enum Decision<T> {
    /// It took effect.
    Done(T),
    /// It waits: the stored request (its id goes to the other admins).
    Held(ApprovalRequest),
}

/// What an approval did.
#[derive(Debug)]
pub struct Approved {
    /// The request with this approval counted.
    pub request: ApprovalRequest,
    /// What the action did, if this approval completed it (`None`: more approvals needed).
    pub outcome: Option<String>,
}

/// Why an approval was refused.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalError {
    /// Not 32 lowercase hex digits.
    #[error("invalid approval request id: 32 lowercase hex digits expected")]
    BadId,
    /// The identity agreed already (as requester or approver).
    #[error(
        "{who} already agreed to approval request {id}: another admin identity must approve it"
    )]
    AlreadyApproved {
        /// The identity.
        who: String,
        /// The request.
        id: String,
    },
    /// The request lapsed.
    #[error("approval request {id} expired at {}; request it again", crate::rfc3339(*at))]
    Expired {
        /// The request.
        id: String,
        /// When.
        at: i64,
    },
}

fn valid_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Deletes every approval request that lapsed unapproved by `now`, a page at a time; returns
/// how many. An expired request can no longer be approved, but would otherwise stay in the
/// store for good. Its lapse needs no event of its own: the request's audit event gave its
/// expiry. A request that does not decode is left for an operator to look at (it cannot be
/// approved either).
pub(super) fn sweep_expired(s: &Vault, now: i64) -> Result<u64, VaultError> {
    const PAGE: usize = 1000;
    let prefix = approval_key("");
    let mut after = prefix.clone();
    let mut deleted = 0u64;
    loop {
        let page = s.store.meta_page(Some(&after), PAGE)?;
        let mut last_page = page.len() < PAGE;
        let mut expired = Vec::new();
        for (key, value) in page {
            let Some(id) = key.strip_prefix(&prefix) else {
                // Past the requests: metadata is listed in key order.
                last_page = true;
                break;
            };
            let lapsed = serde_json::from_slice::<ApprovalRequest>(&value)
                .is_ok_and(|r| now >= r.expires_at);
            if lapsed {
                expired.push(Mutation::PutApproval {
                    id: id.to_string(),
                    request: None,
                    expected: Some(value),
                });
            }
            after = key;
        }
        if !expired.is_empty() {
            // Another daemon sweeping at once makes the batch a conflict: its sweep removed them.
            match s.store.apply(&expired, &[], now) {
                Ok(()) => deleted += expired.len() as u64,
                Err(StoreError::Conflict(_)) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if last_page {
            return Ok(deleted);
        }
    }
}

impl Vault {
    /// Under the two-person rule, stores `action` by `caller` as a request waiting for
    /// approvals (with its audit event, one write) and returns it; `None` when one admin
    /// suffices (`approvals_required = 1`), and the caller acts at once. Blocking.
    pub(super) fn hold(
        &self,
        caller: &str,
        action: Guarded,
    ) -> Result<Option<ApprovalRequest>, VaultError> {
        let required = self.approvals.approvals_required;
        if required <= 1 {
            return Ok(None);
        }
        let now = self.now();
        let id = {
            use rand::RngCore as _;
            let mut bytes = [0u8; 16];
            rand::rngs::OsRng.fill_bytes(&mut bytes);
            hex::encode(bytes)
        };
        let request = ApprovalRequest {
            id: id.clone(),
            action,
            approvals: vec![caller.to_string()],
            required,
            created_at: now,
            expires_at: now.saturating_add(self.approvals.approval_ttl_seconds),
        };
        let mut draft = Draft::new(caller, "RequestApproval").detail(format!(
            "{} request {id}: 1 of {required} approvals, expires {}",
            request.action.audit_detail(),
            crate::rfc3339(request.expires_at)
        ));
        if let Some(owner) = request.action.owner() {
            draft = draft.owner(owner);
        }
        let put = Mutation::PutApproval {
            id,
            request: Some(request.encode()?),
            expected: None,
        };
        self.audited(draft, |a| {
            self.store.apply(&[put], std::slice::from_ref(a), now)?;
            Ok(((), true))
        })?;
        Ok(Some(request))
    }

    /// `Admin.Approve`: counts `caller`'s approval of request `id`; the approval that reaches
    /// `approvals_required` removes the request and runs the action, with the approver as its
    /// caller. Refused: an unknown or already completed request (NOT_FOUND), an expired one
    /// (FAILED_PRECONDITION), an identity that agreed already, the requester included
    /// (PERMISSION_DENIED). Every approval and refusal is audited.
    pub async fn approve(
        self: &Arc<Self>,
        caller: &Caller,
        id: String,
    ) -> Result<Approved, VaultError> {
        let who = caller.name.clone();
        let (request, complete) = self
            .blocking(move |v| {
                let draft = Draft::new(&who, "Approve").detail(format!("request {id}"));
                if !valid_id(&id) {
                    return v.audit_if_refused(draft, Err(ApprovalError::BadId.into()));
                }
                let counted = v.count_approval(&who, &id);
                v.audit_if_refused(draft, counted)
            })
            .await?;
        let outcome = if complete {
            let by = format!(
                "{} (approving request {} of {})",
                caller.name,
                request.id,
                request.requester()
            );
            let actor = Caller::new(by, Arc::clone(&caller.policy));
            Some(self.act(&actor, &request.action).await?)
        } else {
            None
        };
        tracing::info!(rpc = "Approve", caller = %caller.name, request = %request.id, action = request.action.name(), complete, "approved");
        Ok(Approved { request, outcome })
    }

    /// Reads request `id`, checks `who` may approve it and writes the approval (or, when it
    /// completes the request, the request's removal) with its audit event. Blocking.
    fn count_approval(&self, who: &str, id: &str) -> Result<(ApprovalRequest, bool), VaultError> {
        let now = self.now();
        let read = self
            .store
            .get_meta(&approval_key(id))?
            .ok_or_else(|| StoreError::NotFound(format!("approval request {id}")))?;
        let mut request: ApprovalRequest = serde_json::from_slice(&read)
            .map_err(|e| StoreError::Corrupt(format!("approval request {id}: {e}")))?;
        if now >= request.expires_at {
            return Err(ApprovalError::Expired {
                id: id.to_string(),
                at: request.expires_at,
            }
            .into());
        }
        if request.approvals.iter().any(|a| a == who) {
            return Err(ApprovalError::AlreadyApproved {
                who: who.to_string(),
                id: id.to_string(),
            }
            .into());
        }
        request.approvals.push(who.to_string());
        let count = request.approvals.len();
        let complete = u32::try_from(count).unwrap_or(u32::MAX) >= request.required;
        let mut draft = Draft::new(who, "Approve").detail(format!(
            "{} request {id}: {count} of {} approvals{}",
            request.action.audit_detail(),
            request.required,
            if complete { ", acting" } else { "" }
        ));
        if let Some(owner) = request.action.owner() {
            draft = draft.owner(owner);
        }
        let put = Mutation::PutApproval {
            id: id.to_string(),
            request: if complete {
                None
            } else {
                Some(request.encode()?)
            },
            expected: Some(read),
        };
        self.audited(draft, |a| {
            self.store.apply(&[put], std::slice::from_ref(a), now)?;
            Ok(((), true))
        })?;
        Ok((request, complete))
    }

    /// Runs an approved action: what it did, for the approver.
    async fn act(self: &Arc<Self>, actor: &Caller, action: &Guarded) -> Result<String, VaultError> {
        Ok(match action {
            Guarded::DestroyKey { version } => {
                let (info, _) = self.destroy_key_now(actor, *version).await?;
                match info.destroy_after {
                    Some(at) => format!(
                        "v{version} is pending destruction until {}",
                        crate::rfc3339(at)
                    ),
                    None => format!("v{version} is {}", info.state),
                }
            }
            Guarded::CancelDestroyKey { version } => {
                let info = self.cancel_destroy_key_now(actor, *version).await?;
                format!("v{version} is {}", info.state)
            }
            Guarded::DeleteOwner {
                owner,
                revoke_at_provider,
            } => {
                let owner = Owner::parse(owner.clone()).map_err(|source| VaultError::Invalid {
                    what: "owner".into(),
                    source,
                })?;
                let deleted = self
                    .delete_owner_now(actor, owner, *revoke_at_provider)
                    .await?;
                format!("{deleted} record(s) deleted")
            }
            Guarded::SetMinDecryptVersion { version } => {
                let minimum = self.set_min_decrypt_version_now(actor, *version).await?;
                format!("the minimum decryption version is v{minimum}")
            }
        })
    }
}
