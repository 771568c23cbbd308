//! The outbox's two ends (docs/WEBHOOKS.md): the entries a change writes in its own store
//! write ([`Vault::outbox`]), and the job that delivers them ([`deliver`]).
//!
//! Delivery: one task per endpoint, so a receiver that hangs holds back only its own; one
//! daemon at a time (the `webhooks` lease on a shared store) reads each endpoint's pending
//! entries in the order they were written, sends at most one entry per
//! record per pass (so a record's events arrive in order, the next only after the previous
//! was answered), signs each with every secret of the endpoint, and writes every outcome of
//! the pass in one store write, each a compare-and-swap on the entry as read. A 2xx finishes
//! the entry; anything else is tried again with exponential backoff and jitter until
//! `max_age_hours`, then dead-lettered; 410 Gone stops the endpoint until an admin retries one
//! of its entries. At least once: a daemon killed between the answer and the write sends that
//! entry again.
//!
//! Must never: send an entry unsigned, or follow a redirect (the outbound client refuses).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};

use super::{Vault, VaultError};
use crate::audit::Draft;
use crate::proxy::Upstream;
use crate::record::{RecordId, SecretKind};
use crate::store::{Mutation, StoreError};
use crate::webhook::{
    Endpoint, Entry, Event, EventType, SigningKey, State, WebhookConfig, done_key, next_attempt,
    order, pending_key,
};

/// Entries read per endpoint and pass.
const PAGE: usize = 256;

/// How long decrypted signing secrets are kept before they are read again (so a rotated
/// secret record is picked up within this time).
const KEYS_FOR: std::time::Duration = std::time::Duration::from_secs(60);

/// The lease under which one daemon of a shared store delivers.
const LEASE: &str = "webhooks";

/// Store key under the outbox of the mark that an endpoint answered 410 Gone.
fn gone_key(endpoint: &str) -> String {
    format!("gone/{endpoint}")
}

/// An endpoint's signing keys as read at an instant.
type KeptKeys = (std::time::Instant, Arc<Vec<SigningKey>>);

/// The configured endpoints, their clients and the ordering stamp.
pub(super) struct Webhooks {
    config: WebhookConfig,
    clients: Vec<Arc<Upstream>>,
    last_stamp: AtomicU64,
    /// Each endpoint's decrypted signing keys and when they were read.
    keys: std::sync::Mutex<HashMap<String, KeptKeys>>,
    /// The `record.expired` markers this daemon has seen written (by it or another daemon),
    /// so a caller that keeps asking for an expired record costs no store write attempt each
    /// time; bounded, least recently reported dropped first (the store's marker stays the
    /// rule).
    expired_reported: std::sync::Mutex<lru::LruCache<[u8; 32], ()>>,
}

/// Most `record.expired` markers remembered in memory.
const EXPIRED_REPORTED: std::num::NonZeroUsize =
    std::num::NonZeroUsize::new(4096).expect("4096 > 0");

impl std::fmt::Debug for Webhooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhooks")
            .field("endpoints", &self.config.endpoints.len())
            .finish_non_exhaustive()
    }
}

impl Webhooks {
    /// Builds each endpoint's outbound client.
    pub(super) fn new(config: &WebhookConfig) -> Result<Self, crate::proxy::UpstreamSetupError> {
        let clients = config
            .endpoints
            .iter()
            .map(|e| Upstream::new(e.policy.clone()).map(Arc::new))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            config: config.clone(),
            clients,
            last_stamp: AtomicU64::new(0),
            keys: std::sync::Mutex::new(HashMap::new()),
            expired_reported: std::sync::Mutex::new(lru::LruCache::new(EXPIRED_REPORTED)),
        })
    }

    /// How often the outbox is read for due work.
    pub(super) fn poll(&self) -> std::time::Duration {
        self.config.poll
    }

    /// How long a failing delivery or revocation is retried.
    pub(super) fn max_age(&self) -> std::time::Duration {
        self.config.max_age
    }

    /// How many endpoints are configured.
    pub(super) fn endpoint_count(&self) -> usize {
        self.config.endpoints.len()
    }

    /// Whether any endpoint is configured (otherwise nothing is written or delivered).
    pub(super) fn enabled(&self) -> bool {
        !self.config.endpoints.is_empty()
    }

    /// A stamp above every earlier one of this process: microseconds since the epoch, raised
    /// past the last stamp, so entries written in one daemon list in the order written.
    pub(super) fn stamp(&self) -> u64 {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        let mut last = self.last_stamp.load(Ordering::Relaxed);
        loop {
            let next = now.max(last + 1);
            match self.last_stamp.compare_exchange_weak(
                last,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }
}

impl Vault {
    /// The outbox entries (key under the outbox, value) reporting `events` to every endpoint
    /// that wants them, to write in the same store write as the change itself. None when no
    /// endpoint is configured.
    pub(super) fn outbox_rows(&self, events: &[Event]) -> Vec<(String, Vec<u8>)> {
        let hooks = &self.webhooks;
        if !hooks.enabled() {
            return Vec::new();
        }
        let now = self.now();
        let mut rows = Vec::new();
        for event in events {
            let id = format!("msg_{}", hex::encode(rand::random::<[u8; 12]>()));
            let position = order(hooks.stamp(), &id);
            let body = event.body(now);
            for endpoint in hooks.config.endpoints.iter().filter(|e| e.wants(event)) {
                let entry = Entry {
                    id: id.clone(),
                    kind: event.kind.as_str().into(),
                    endpoint: endpoint.name.clone(),
                    record: event.record.clone(),
                    created_ms: now.saturating_mul(1000),
                    body: body.clone(),
                    attempts: 0,
                    next_attempt_ms: now.saturating_mul(1000),
                    last_error: None,
                    state: State::Pending,
                    finished_ms: None,
                    retried_ms: None,
                };
                rows.push((pending_key(&endpoint.name, &position), entry.encode()));
            }
        }
        rows
    }

    /// [`Vault::outbox_rows`] as mutations that create them.
    pub(super) fn outbox(&self, events: &[Event]) -> Vec<Mutation> {
        self.outbox_rows(events)
            .into_iter()
            .map(|(key, value)| Mutation::PutOutbox {
                key,
                value: Some(value),
                expected: None,
            })
            .collect()
    }

    /// The `record.recovered` events of `writes`: each that replaces a record needing
    /// re-authorization. Read before the write; the write's version check makes it exact (a
    /// record marked after this read has another version, and the write is refused).
    pub(super) fn recoveries(
        &self,
        writes: &[crate::store::RecordWrite],
    ) -> Result<Vec<Event>, VaultError> {
        if !self.webhooks.enabled() {
            return Ok(Vec::new());
        }
        let mut events = Vec::new();
        for w in writes.iter().filter(|w| w.expected_version > 0) {
            if let Some(r) = self.store.get_record(&w.meta.id)?
                && r.needs_reauth
                && r.version == w.expected_version
            {
                events.push(Event::about(EventType::Recovered, &r, r.version + 1));
            }
        }
        Ok(events)
    }

    /// Writes `record.expired` for `record` (past `expires_at`, no refresh possible) once per
    /// record version: a write-once marker goes in the same write as the entries, so the
    /// callers that keep finding the record expired add nothing. Nothing without endpoints.
    /// A failure is logged; the caller's refusal stands either way.
    pub(super) fn report_expired(&self, record: &crate::record::Record, expires_at: i64) {
        use sha2::Digest as _;
        if !self.webhooks.enabled() {
            return;
        }
        // The replay markers' write-once rule, under a key of its own domain.
        let digest: [u8; 32] = sha2::Sha256::digest(format!(
            "record.expired\0{}\0{}",
            record.meta.id, record.version
        ))
        .into();
        let reported = || {
            self.webhooks
                .expired_reported
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if reported().get(&digest).is_some() {
            return;
        }
        let mut mutations = vec![Mutation::PutReplayMarker {
            key: hex::encode(digest),
            at: self.now(),
        }];
        mutations.extend(self.outbox(&[
            Event::about(EventType::Expired, record, record.version).with("expires_at", expires_at),
        ]));
        match self.store.apply(&mutations, &[], self.now()) {
            Ok(()) | Err(StoreError::AlreadyExists(_)) => {
                reported().put(digest, ());
            }
            Err(e) => tracing::warn!(error = %e, "could not write a record.expired webhook"),
        }
    }

    /// The signing keys of `endpoint`, from its sealed records (kept for [`KEYS_FOR`]).
    fn signing_keys(&self, endpoint: &Endpoint) -> Result<Arc<Vec<SigningKey>>, VaultError> {
        let mut cache = self
            .webhooks
            .keys
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((at, keys)) = cache.get(&endpoint.name)
            && at.elapsed() < KEYS_FOR
        {
            return Ok(Arc::clone(keys));
        }
        let keys = endpoint
            .secret_records
            .iter()
            .map(|id| self.signing_key(endpoint, id))
            .collect::<Result<Vec<_>, _>>()?;
        let keys = Arc::new(keys);
        cache.insert(
            endpoint.name.clone(),
            (std::time::Instant::now(), Arc::clone(&keys)),
        );
        Ok(keys)
    }

    fn signing_key(&self, endpoint: &Endpoint, id: &RecordId) -> Result<SigningKey, VaultError> {
        let unusable = |why: &str| VaultError::WebhookSecret {
            endpoint: endpoint.name.clone(),
            record: id.to_string(),
            why: why.to_string(),
        };
        let (record, secret) = match super::refresh::read_open(self, id) {
            Ok(opened) => opened,
            Err(VaultError::Store(StoreError::NotFound(_))) => {
                return Err(unusable("no such record"));
            }
            Err(e) => return Err(e),
        };
        if record.meta.kind != SecretKind::ClientSecret || record.revoked {
            return Err(unusable("not a client_secret record, or revoked"));
        }
        SigningKey::parse(secret.expose_secret()).map_err(unusable)
    }

    /// Whether `endpoint` answered 410 Gone and no admin has retried it since.
    fn endpoint_gone(&self, endpoint: &str) -> Result<bool, VaultError> {
        Ok(self
            .store
            .get_meta(&crate::store::outbox_key(&gone_key(endpoint)))?
            .is_some())
    }
}

/// One entry chosen for this pass: its key, its bytes as read, and itself.
struct Due {
    key: String,
    read: Vec<u8>,
    entry: Entry,
}

/// What one pass over an endpoint's pending entries found.
struct Pass {
    due: Vec<Due>,
    /// Age of the oldest pending entry, milliseconds.
    oldest_ms: Option<i64>,
}

/// Reads `endpoint`'s pending entries and picks those due: in key order, at most one per
/// record and one key event (the first pending one; a later one waits while an earlier one
/// backs off).
fn due_entries(v: &Vault, endpoint: &str, now_ms: i64) -> Result<Pass, VaultError> {
    let page = v
        .store
        .outbox_page(&pending_key(endpoint, ""), None, PAGE)?;
    let mut blocked: HashSet<String> = HashSet::new();
    let mut pass = Pass {
        due: Vec::new(),
        oldest_ms: None,
    };
    for (key, read) in page {
        let entry = match Entry::decode(&read) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, key, "an outbox entry does not decode; it is left where it is");
                continue;
            }
        };
        pass.oldest_ms = Some(
            pass.oldest_ms
                .map_or(entry.created_ms, |o| o.min(entry.created_ms)),
        );
        // A record's events go one at a time, in order; so do the key events (a rotation
        // before the destruction that follows it), which name no record.
        let lane = entry
            .record
            .clone()
            .or_else(|| entry.kind.starts_with("key.").then(|| "\0keys".to_string()));
        if let Some(lane) = lane
            && !blocked.insert(lane)
        {
            continue;
        }
        if entry.next_attempt_ms > now_ms {
            continue;
        }
        pass.due.push(Due { key, read, entry });
    }
    Ok(pass)
}

/// How one attempt ended.
enum Answer {
    Delivered,
    Gone,
    Failed(String),
}

/// The headers Standard Webhooks names, the signature over every key.
fn signed_headers(keys: &[SigningKey], entry: &Entry, timestamp: i64) -> Option<HeaderMap> {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert("webhook-id", HeaderValue::from_str(&entry.id).ok()?);
    h.insert(
        "webhook-timestamp",
        HeaderValue::from_str(&timestamp.to_string()).ok()?,
    );
    let signature = crate::webhook::sign(keys, &entry.id, timestamp, &entry.body);
    h.insert("webhook-signature", HeaderValue::from_str(&signature).ok()?);
    Some(h)
}

async fn attempt(
    client: Arc<Upstream>,
    uri: http::Uri,
    headers: HeaderMap,
    body: String,
) -> Answer {
    match client.post(&uri, headers, Bytes::from(body)).await {
        Ok(r) if (200..300).contains(&r.status) => Answer::Delivered,
        Ok(r) if r.status == 410 => Answer::Gone,
        Ok(r) => Answer::Failed(format!("HTTP {}", r.status)),
        Err(e) => Answer::Failed(e.to_string()),
    }
}

/// The store changes recording `answer` for `due`, at `now_ms`, and the state it leaves.
fn outcome(
    config: &WebhookConfig,
    due: Due,
    answer: &Answer,
    now_ms: i64,
) -> (Vec<Mutation>, State) {
    let Due {
        key,
        read,
        mut entry,
    } = due;
    entry.attempts = entry.attempts.saturating_add(1);
    let position = key.rsplit('/').next().unwrap_or_default().to_string();
    let finish = |mut entry: Entry, state: State| {
        entry.state = state;
        entry.finished_ms = Some(now_ms);
        let changes = vec![
            Mutation::PutOutbox {
                key: key.clone(),
                value: None,
                expected: Some(read.clone()),
            },
            Mutation::PutOutbox {
                key: done_key(&entry.endpoint, &position),
                value: Some(entry.encode()),
                expected: None,
            },
        ];
        (changes, state)
    };
    match answer {
        Answer::Delivered => {
            entry.last_error = None;
            finish(entry, State::Delivered)
        }
        Answer::Gone => {
            entry.last_error = Some("HTTP 410: the endpoint is gone".into());
            finish(entry, State::Gone)
        }
        Answer::Failed(why) => {
            entry.last_error = Some(why.clone());
            // A replay an admin asked for gets its own horizon: an old event would otherwise
            // be given up on its first failure.
            let since = entry.retried_ms.unwrap_or(entry.created_ms);
            let age = u128::try_from(now_ms.saturating_sub(since)).unwrap_or(0);
            if age >= config.max_age.as_millis() {
                return finish(entry, State::Dead);
            }
            let wait = next_attempt(entry.attempts, rand::random::<f64>());
            entry.next_attempt_ms =
                now_ms.saturating_add(i64::try_from(wait.as_millis()).unwrap_or(i64::MAX));
            let changes = vec![Mutation::PutOutbox {
                key,
                value: Some(entry.encode()),
                expected: Some(read),
            }];
            (changes, State::Pending)
        }
    }
}

/// One pass over one endpoint: how many entries it finished or rescheduled.
async fn deliver_endpoint(vault: &Arc<Vault>, index: usize) -> Result<usize, VaultError> {
    let endpoint = vault.webhooks.config.endpoints[index].clone();
    let client = Arc::clone(&vault.webhooks.clients[index]);
    let now_ms = vault.now().saturating_mul(1000);
    let name = endpoint.name.clone();
    let (pass, gone) = vault
        .blocking(move |v| Ok((due_entries(v, &name, now_ms)?, v.endpoint_gone(&name)?)))
        .await?;
    let lag = pass
        .oldest_ms
        .map_or(0, |o| now_ms.saturating_sub(o).max(0) / 1000);
    vault
        .metrics
        .webhook_lag
        .get_or_create(&super::metrics::EndpointLabel {
            endpoint: endpoint.name.clone(),
        })
        .set(lag);
    if pass.due.is_empty() {
        return Ok(0);
    }
    let owner = vault.instance_id.clone();
    let leased = vault
        .blocking(move |v| {
            Ok(v.store
                .acquire_lease(LEASE, &owner, std::time::Duration::from_secs(30))?)
        })
        .await?;
    if leased.is_none() {
        return Ok(0);
    }
    let answers: Vec<Answer> = if gone {
        pass.due.iter().map(|_| Answer::Gone).collect()
    } else {
        let e = endpoint.clone();
        let keys = vault.blocking(move |v| v.signing_keys(&e)).await?;
        // The wall clock: the receiver checks the timestamp against its own (Standard Webhooks
        // libraries refuse five minutes off), whatever clock the vault keeps records by.
        let timestamp = crate::unix_now();
        let mut tasks = tokio::task::JoinSet::new();
        for (i, due) in pass.due.iter().enumerate() {
            let Some(headers) = signed_headers(&keys, &due.entry, timestamp) else {
                continue;
            };
            let (client, uri, body) = (
                Arc::clone(&client),
                endpoint.url.clone(),
                due.entry.body.clone(),
            );
            tasks.spawn(async move { (i, attempt(client, uri, headers, body).await) });
        }
        let mut answers: Vec<Option<Answer>> = pass.due.iter().map(|_| None).collect();
        while let Some(done) = tasks.join_next().await {
            if let Ok((i, a)) = done {
                answers[i] = Some(a);
            }
        }
        answers
            .into_iter()
            .map(|a| a.unwrap_or_else(|| Answer::Failed("not sent".into())))
            .collect()
    };
    let now_ms = vault.now().saturating_mul(1000);
    let mut mutations = Vec::new();
    let mut newly_gone = false;
    for (due, answer) in pass.due.into_iter().zip(&answers) {
        let counted = match answer {
            Answer::Delivered => "delivered",
            Answer::Gone => {
                newly_gone |= !gone;
                "gone"
            }
            Answer::Failed(_) => "failed",
        };
        super::metrics::Metrics::count(&vault.metrics.webhook_deliveries, counted);
        let (changes, state) = outcome(&vault.webhooks.config, due, answer, now_ms);
        if state == State::Dead {
            super::metrics::Metrics::count(&vault.metrics.webhook_deliveries, "dead");
        }
        mutations.extend(changes);
    }
    if newly_gone {
        mutations.push(Mutation::PutOutbox {
            key: gone_key(&endpoint.name),
            value: Some(now_ms.to_be_bytes().to_vec()),
            expected: None,
        });
        tracing::warn!(endpoint = %endpoint.name, "webhook endpoint answered 410 Gone: its events are no longer sent until an admin retries one (admin webhooks retry)");
    }
    let n = answers.len();
    vault
        .blocking(move |v| match v.store.apply(&mutations, &[], v.now()) {
            Ok(()) => Ok(()),
            // Another daemon took the lease and wrote first; it owns these entries now.
            Err(StoreError::Conflict(what)) => {
                tracing::warn!(conflict = %what, "another daemon delivered webhooks meanwhile");
                Ok(())
            }
            Err(e) => Err(e.into()),
        })
        .await?;
    Ok(n)
}

/// Removes finished entries older than `keep_done_hours`, oldest first.
fn sweep_done(v: &Vault, endpoint: &str, now_ms: i64) -> Result<usize, VaultError> {
    let keep = i64::try_from(v.webhooks.config.keep_done.as_millis()).unwrap_or(i64::MAX);
    let page = v.store.outbox_page(&done_key(endpoint, ""), None, PAGE)?;
    let mutations: Vec<Mutation> = page
        .into_iter()
        .take_while(|(_, read)| {
            Entry::decode(read)
                .is_ok_and(|e| now_ms.saturating_sub(e.finished_ms.unwrap_or(e.created_ms)) > keep)
        })
        .map(|(key, read)| Mutation::PutOutbox {
            key,
            value: None,
            expected: Some(read),
        })
        .collect();
    let n = mutations.len();
    if n > 0 {
        v.store.apply(&mutations, &[], v.now())?;
    }
    Ok(n)
}

/// Delivers endpoint `index`'s due entries every `poll` until `stop`, and sweeps its old
/// finished entries every minute. One task per endpoint: a receiver that hangs until the
/// timeout holds back only its own deliveries.
pub(super) async fn deliver(
    vault: Arc<Vault>,
    index: usize,
    stop: tokio_util::sync::CancellationToken,
) {
    let poll = vault.webhooks.config.poll;
    let name = vault.webhooks.config.endpoints[index].name.clone();
    let mut last_sweep: Option<std::time::Instant> = None;
    loop {
        let mut pause = poll;
        match deliver_endpoint(&vault, index).await {
            // More may be due at once (the next event of a record just answered).
            Ok(n) if n > 0 => pause = std::time::Duration::ZERO,
            Ok(_) => {}
            Err(e) => {
                // A missing or bad secret, or the store: said once per 30 s, not per poll.
                tracing::error!(endpoint = %name, error = %e, "webhook delivery failed; trying again in 30 s");
                pause = std::time::Duration::from_secs(30);
            }
        }
        if last_sweep.is_none_or(|t| t.elapsed() >= std::time::Duration::from_secs(60)) {
            last_sweep = Some(std::time::Instant::now());
            let endpoint = name.clone();
            let swept = vault
                .blocking(move |v| sweep_done(v, &endpoint, v.now().saturating_mul(1000)))
                .await;
            if let Err(e) = swept {
                tracing::warn!(endpoint = %name, error = %e, "removing old finished webhook entries failed");
            }
        }
        if stop.is_cancelled() {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// One page of an endpoint's deliveries ([`Vault::list_deliveries`]).
#[derive(Debug)]
pub struct DeliveryPage {
    /// Each delivery's id within the endpoint and its entry.
    pub deliveries: Vec<(String, Entry)>,
    /// The id to continue after, if there may be more.
    pub next_page_token: Option<String>,
}

/// A delivery id as [`order`] makes them: refused otherwise before it reaches a store key.
fn check_delivery_id(what: &'static str, id: &str) -> Result<(), VaultError> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(VaultError::Argument {
            what,
            why: "not a delivery id (up to 64 letters, digits, '-' and '_')".into(),
        })
    }
}

impl Vault {
    /// The configured endpoint `name`, or `NotFound`.
    fn endpoint(&self, name: &str) -> Result<Endpoint, VaultError> {
        self.webhooks
            .config
            .endpoints
            .iter()
            .find(|e| e.name == name)
            .cloned()
            .ok_or_else(|| VaultError::NoSuch(format!("no webhook endpoint {name:?}")))
    }

    /// `Admin.ListDeliveries`: a page of `endpoint`'s pending or finished deliveries, audited
    /// (bodies name owners).
    pub async fn list_deliveries(
        self: &Arc<Self>,
        caller: &super::Caller,
        endpoint: &str,
        finished: bool,
        page_size: u32,
        page_token: &str,
    ) -> Result<DeliveryPage, VaultError> {
        let endpoint = self.endpoint(endpoint)?;
        let page_size = super::listing::page_size_of(page_size)?;
        if !page_token.is_empty() {
            check_delivery_id("page_token", page_token)?;
        }
        let (who, token) = (caller.name.clone(), page_token.to_string());
        self.blocking(move |v| {
            let key = |position: &str| {
                if finished {
                    done_key(&endpoint.name, position)
                } else {
                    pending_key(&endpoint.name, position)
                }
            };
            let prefix = key("");
            let after = (!token.is_empty()).then(|| key(&token));
            let page = v
                .store
                .outbox_page(&prefix, after.as_deref(), page_size as usize)?;
            let full = page.len() == page_size as usize;
            let deliveries = page
                .into_iter()
                .map(|(k, bytes)| {
                    let id = k.strip_prefix(&prefix).unwrap_or(&k).to_string();
                    Entry::decode(&bytes)
                        .map(|e| (id, e))
                        .map_err(|e| VaultError::from(StoreError::Corrupt(e)))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let draft = Draft::new(&who, "ListDeliveries").detail(format!(
                "endpoint={} {} deliveries={}",
                endpoint.name,
                if finished { "finished" } else { "pending" },
                deliveries.len()
            ));
            v.audit.append(&draft, false)?;
            Ok(DeliveryPage {
                next_page_token: full
                    .then(|| deliveries.last().map(|(id, _)| id.clone()))
                    .flatten(),
                deliveries,
            })
        })
        .await
    }

    /// `Admin.RetryDelivery`: makes a delivery pending and due now (a finished one is sent
    /// again, as a replay), and clears the endpoint's 410 Gone mark; audited in the same write.
    pub async fn retry_delivery(
        self: &Arc<Self>,
        caller: &super::Caller,
        endpoint: &str,
        id: &str,
    ) -> Result<(String, Entry), VaultError> {
        let endpoint = self.endpoint(endpoint)?;
        check_delivery_id("id", id)?;
        let (who, id) = (caller.name.clone(), id.to_string());
        self.blocking(move |v| {
            let draft = Draft::new(&who, "RetryDelivery")
                .detail(format!("endpoint={} delivery={id}", endpoint.name));
            v.audited(draft, |a| {
                let pending = pending_key(&endpoint.name, &id);
                let done = done_key(&endpoint.name, &id);
                let read = |key: &str| v.store.get_meta(&crate::store::outbox_key(key));
                let (from, bytes) = match (read(&pending)?, read(&done)?) {
                    (Some(b), _) => (pending.clone(), b),
                    (None, Some(b)) => (done, b),
                    (None, None) => {
                        return Err(VaultError::NoSuch(format!(
                            "no delivery {id} of webhook endpoint {}",
                            endpoint.name
                        )));
                    }
                };
                let mut entry = Entry::decode(&bytes).map_err(StoreError::Corrupt)?;
                entry.state = State::Pending;
                entry.finished_ms = None;
                entry.next_attempt_ms = v.now().saturating_mul(1000);
                entry.retried_ms = Some(entry.next_attempt_ms);
                let mut mutations = Vec::new();
                if from != pending {
                    mutations.push(Mutation::PutOutbox {
                        key: from,
                        value: None,
                        expected: Some(bytes.clone()),
                    });
                    mutations.push(Mutation::PutOutbox {
                        key: pending.clone(),
                        value: Some(entry.encode()),
                        expected: None,
                    });
                } else {
                    mutations.push(Mutation::PutOutbox {
                        key: pending.clone(),
                        value: Some(entry.encode()),
                        expected: Some(bytes),
                    });
                }
                let gone = gone_key(&endpoint.name);
                if let Some(mark) = read(&gone)? {
                    mutations.push(Mutation::PutOutbox {
                        key: gone,
                        value: None,
                        expected: Some(mark),
                    });
                }
                v.store
                    .apply(&mutations, std::slice::from_ref(a), v.now())?;
                Ok(((id.clone(), entry), true))
            })
        })
        .await
    }
}
