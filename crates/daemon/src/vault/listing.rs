//! `Admin.ListRecords`: record metadata by provider, owner, kind, state and key version, paged.
//!
//! Owns: the filter, the page token and the bounded scan behind a page. Reads metadata only:
//! must never open an envelope or put one (or a secret) into a result. Each call reads at
//! most [`SCAN_BUDGET`] records, so a rare filter over a large store answers in bounded time
//! with a short (even empty) page and a token to continue.

use std::sync::Arc;

use base64::Engine as _;
use sha2::{Digest as _, Sha256};

use super::{Vault, VaultError};
use crate::audit::Draft;
use crate::record::{Owner, Provider, Record, RecordId, SecretKind};
use crate::store::{StoreError, TokenStore};

/// Records read per call at most (metadata and envelope bytes from the store; a few MB).
pub const SCAN_BUDGET: usize = 10_000;
/// Page size when the request names none.
pub const DEFAULT_PAGE_SIZE: u32 = 100;
/// Largest page size a caller may ask for.
pub const MAX_PAGE_SIZE: u32 = 1000;

/// A record's state, as [`RecordFilter`] selects it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordState {
    /// Revoked.
    Revoked,
    /// Its owner must authorize again (and it is not revoked).
    NeedsReauth,
    /// `expires_at` has passed (and it is neither revoked nor needs re-authorization).
    Expired,
    /// None of the above.
    Usable,
}

impl RecordState {
    /// The state of `r` at `now` (Unix seconds).
    pub fn of(r: &Record, now: i64) -> Self {
        if r.revoked {
            RecordState::Revoked
        } else if r.needs_reauth {
            RecordState::NeedsReauth
        } else if r.meta.expires_at.is_some_and(|t| t <= now) {
            RecordState::Expired
        } else {
            RecordState::Usable
        }
    }

    fn name(self) -> &'static str {
        match self {
            RecordState::Revoked => "revoked",
            RecordState::NeedsReauth => "needs_reauth",
            RecordState::Expired => "expired",
            RecordState::Usable => "usable",
        }
    }
}

/// Which records to list; `None` matches everything.
#[derive(Debug, Clone, Default)]
pub struct RecordFilter {
    /// Only this provider's.
    pub provider: Option<Provider>,
    /// Only this owner's.
    pub owner: Option<Owner>,
    /// Only this kind.
    pub kind: Option<SecretKind>,
    /// Only records in this state.
    pub state: Option<RecordState>,
    /// Only records under this key version.
    pub key_version: Option<u32>,
}

impl RecordFilter {
    fn matches(&self, r: &Record, now: i64) -> bool {
        self.provider.as_ref().is_none_or(|p| *p == r.meta.provider)
            && self.owner.as_ref().is_none_or(|o| *o == r.meta.owner)
            && self.kind.is_none_or(|k| k == r.meta.kind)
            && self.state.is_none_or(|s| s == RecordState::of(r, now))
            && self.key_version.is_none_or(|v| v == r.key_version)
    }

    /// What a page token is bound to, so a token is refused with other filters. The owner
    /// goes in hashed: the token must not carry a personal identifier in the clear.
    fn fingerprint(&self) -> String {
        let text = format!(
            "{}\0{}\0{}\0{}\0{}",
            self.provider.as_ref().map_or("", |p| p.as_str()),
            self.owner.as_ref().map_or("", |o| o.as_str()),
            self.kind.map_or("", SecretKind::as_str),
            self.state.map_or("", RecordState::name),
            self.key_version.map_or(String::new(), |v| v.to_string()),
        );
        hex::encode(&Sha256::digest(text.as_bytes())[..8])
    }

    /// What the audit event says about the filter: no owner (it is in the event as an HMAC).
    fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(p) = &self.provider {
            parts.push(format!("provider={}", p.as_str()));
        }
        if let Some(k) = self.kind {
            parts.push(format!("kind={}", k.as_str()));
        }
        if let Some(s) = self.state {
            parts.push(format!("state={}", s.name()));
        }
        if let Some(v) = self.key_version {
            parts.push(format!("key_version={v}"));
        }
        parts.join(" ")
    }
}

/// One page of [`Vault::list_records`].
#[derive(Debug, Clone)]
pub struct RecordPage {
    /// Matching records, in id order (their envelopes are not for the caller).
    pub records: Vec<Record>,
    /// Token for the next call; `None` when the listing is complete.
    pub next_page_token: Option<String>,
}

fn bad_token() -> VaultError {
    VaultError::Argument {
        what: "page_token",
        why: "not a next_page_token of a ListRecords call with these filters".into(),
    }
}

/// The token continuing after `id` under `filter`: base64url of `fingerprint:id` (opaque to
/// callers; the id is not a secret to an admin who listed it).
fn token(filter: &RecordFilter, id: &RecordId) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(format!(
        "{}:{}",
        filter.fingerprint(),
        id.as_str()
    ))
}

fn parse_token(filter: &RecordFilter, token: &str) -> Result<Option<RecordId>, VaultError> {
    if token.is_empty() {
        return Ok(None);
    }
    if token.len() > 512 {
        return Err(bad_token());
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .map_err(|_| bad_token())?;
    let text = String::from_utf8(bytes).map_err(|_| bad_token())?;
    let (fingerprint, id) = text.split_once(':').ok_or_else(bad_token)?;
    if fingerprint != filter.fingerprint() {
        return Err(bad_token());
    }
    RecordId::parse(id).map(Some).map_err(|_| bad_token())
}

/// Reads one page: up to `page_size` matches among at most [`SCAN_BUDGET`] records after
/// `after`. Returns the matches and the last record id read if the listing may go on.
fn scan(
    store: &dyn TokenStore,
    filter: &RecordFilter,
    page_size: usize,
    after: Option<RecordId>,
    now: i64,
) -> Result<(Vec<Record>, Option<RecordId>), StoreError> {
    let mut out = Vec::new();
    let mut scanned = 0;
    if let Some(owner) = &filter.owner {
        // The owner index narrows the walk to the owner's records.
        let mut ids = store.owner_record_ids(owner)?;
        ids.sort();
        let mut last_read = None;
        for id in ids
            .into_iter()
            .filter(|id| after.as_ref().is_none_or(|a| id > a))
        {
            if out.len() == page_size || scanned == SCAN_BUDGET {
                return Ok((out, last_read));
            }
            scanned += 1;
            if let Some(r) = store.get_record(&id)?
                && filter.matches(&r, now)
            {
                out.push(r);
            }
            last_read = Some(id);
        }
        return Ok((out, None));
    }
    let mut cursor = after;
    loop {
        let want = (SCAN_BUDGET - scanned).min(500);
        let page = store.scan_records(cursor.as_ref(), want)?;
        let full = page.len() == want;
        for r in page {
            scanned += 1;
            cursor = Some(r.meta.id.clone());
            if filter.matches(&r, now) {
                out.push(r);
                if out.len() == page_size {
                    return Ok((out, cursor));
                }
            }
        }
        if !full {
            return Ok((out, None));
        }
        if scanned >= SCAN_BUDGET {
            return Ok((out, cursor));
        }
    }
}

impl Vault {
    /// One page of record metadata matching `filter`; audited (the filter without the owner,
    /// which the event holds as its HMAC).
    pub async fn list_records(
        self: &Arc<Self>,
        caller: &super::Caller,
        filter: RecordFilter,
        page_size: u32,
        page_token: &str,
    ) -> Result<RecordPage, VaultError> {
        let page_size = page_size_of(page_size)?;
        let after = parse_token(&filter, page_token)?;
        let who = caller.name.clone();
        self.blocking(move |v| {
            let (records, next) = scan(&*v.store, &filter, page_size as usize, after, v.now())?;
            let mut draft = Draft::new(&who, "ListRecords").detail(
                format!("{} records={}", filter.describe(), records.len())
                    .trim_start()
                    .to_string(),
            );
            if let Some(owner) = &filter.owner {
                draft = draft.owner(owner.as_str());
            }
            // Metadata leaves only once its reading is in the trail.
            v.audit.append(&draft, false)?;
            Ok(RecordPage {
                records,
                next_page_token: next.map(|id| token(&filter, &id)),
            })
        })
        .await
    }
}

/// A listing's `page_size` as asked: 0 is [`DEFAULT_PAGE_SIZE`], above [`MAX_PAGE_SIZE`] is
/// refused.
pub(super) fn page_size_of(asked: u32) -> Result<u32, VaultError> {
    match asked {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n <= MAX_PAGE_SIZE => Ok(n),
        n => Err(VaultError::Argument {
            what: "page_size",
            why: format!("{n} is more than the maximum of {MAX_PAGE_SIZE}"),
        }),
    }
}
