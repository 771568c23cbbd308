//! Webhooks (docs/WEBHOOKS.md): what the vault tells the applications around it when a
//! record's state changes, signed as the Standard Webhooks specification says.
//!
//! Owns: the `[webhooks]` configuration ([`WebhookConfig`]), the event types and their JSON
//! bodies ([`Event`]), the stored outbox entry ([`Entry`]) and its keys, the retry schedule
//! ([`next_attempt`]) and the signature ([`sign`]). Does no I/O: the vault writes entries in
//! the same store write as the change they report and runs the delivery
//! (`vault::webhooks`).
//!
//! Must never: put a token, code or secret into a body or an entry (bodies carry ids,
//! provider, owner, versions and reasons), log a signing secret, or sign with anything but
//! the endpoint's own secrets.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use http::Uri;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::provider::ProviderPolicy;
use crate::record::RecordId;

/// Longest retry horizon, `max_age_hours` (30 days).
pub const MAX_AGE_HOURS: u64 = 720;

/// What one webhook is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EventType {
    /// A refresh (or code exchange) got `invalid_grant`: the owner must sign in again.
    NeedsReauth,
    /// A new bundle was stored over a record that needed re-authorization.
    Recovered,
    /// The record was revoked (an admin, or the provider's security event).
    Revoked,
    /// The record was deleted.
    Deleted,
    /// A refresh failed for a reason other than `invalid_grant`, after the retries.
    RefreshFailed,
    /// Every record of an owner was deleted.
    OwnerDeleted,
    /// A revocation at the provider was refused, or kept failing until `max_age_hours`.
    ProviderRevocationFailed,
    /// A new key version became active (security teams).
    KeyRotated,
    /// A key version was destroyed after its waiting period (security teams).
    KeyDestroyed,
    /// A record is past its expiry and cannot be refreshed (no refresh token, or not a
    /// refreshable bundle): sent once per record version, when a caller or the refresher
    /// finds it.
    Expired,
}

impl EventType {
    /// Every type, in the order docs/WEBHOOKS.md lists them.
    pub const ALL: [EventType; 10] = [
        EventType::NeedsReauth,
        EventType::Recovered,
        EventType::Revoked,
        EventType::Deleted,
        EventType::RefreshFailed,
        EventType::OwnerDeleted,
        EventType::ProviderRevocationFailed,
        EventType::KeyRotated,
        EventType::KeyDestroyed,
        EventType::Expired,
    ];

    /// The `type` field of the body.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::NeedsReauth => "record.needs_reauth",
            EventType::Recovered => "record.recovered",
            EventType::Revoked => "record.revoked",
            EventType::Deleted => "record.deleted",
            EventType::RefreshFailed => "record.refresh_failed",
            EventType::OwnerDeleted => "owner.deleted",
            EventType::ProviderRevocationFailed => "record.provider_revocation_failed",
            EventType::KeyRotated => "key.rotated",
            EventType::KeyDestroyed => "key.destroyed",
            EventType::Expired => "record.expired",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == name)
    }
}

/// One change to report: its type, the record and provider it concerns (for the endpoints'
/// filters and per-record order) and the body's `data`.
#[derive(Debug, Clone)]
pub struct Event {
    /// What happened.
    pub kind: EventType,
    /// The record, if the event is about one.
    pub record: Option<String>,
    /// The record's provider, if any (an owner's deletion spans providers).
    pub provider: Option<String>,
    /// The body's `data` object.
    pub data: serde_json::Map<String, serde_json::Value>,
}

impl Event {
    /// An event about `record`: `data` gets its id, provider, owner and `version`, the version
    /// the change leaves it at (a deleted record's: the last it had).
    pub fn about(kind: EventType, record: &crate::record::Record, version: u64) -> Self {
        let mut data = serde_json::Map::new();
        data.insert("record_id".into(), record.meta.id.as_str().into());
        data.insert("provider".into(), record.meta.provider.as_str().into());
        data.insert("owner".into(), record.meta.owner.as_str().into());
        data.insert("version".into(), version.into());
        Event {
            kind,
            record: Some(record.meta.id.to_string()),
            provider: Some(record.meta.provider.to_string()),
            data,
        }
    }

    /// An event about key version `key`: `data` gets its version, fingerprint and state.
    pub fn about_key(kind: EventType, key: &crate::keys::KeyInfo) -> Self {
        let mut data = serde_json::Map::new();
        data.insert("version".into(), key.version.into());
        data.insert("fingerprint".into(), key.id.to_string().into());
        data.insert("state".into(), key.state.to_string().into());
        Event {
            kind,
            record: None,
            provider: None,
            data,
        }
    }

    /// Adds a field to `data`.
    #[must_use]
    pub fn with(mut self, key: &str, value: impl Into<serde_json::Value>) -> Self {
        self.data.insert(key.into(), value.into());
        self
    }

    /// The body: `{"type", "timestamp", "data"}` (Standard Webhooks' recommended shape).
    pub fn body(&self, created_at: i64) -> String {
        serde_json::json!({
            "type": self.kind.as_str(),
            "timestamp": crate::rfc3339(created_at),
            "data": self.data,
        })
        .to_string()
    }
}

/// Where an entry is: waiting (pending), or done one way or another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Not delivered yet: due at `next_attempt_ms`.
    Pending,
    /// A 2xx answered.
    Delivered,
    /// Still failing at the end of the retry horizon.
    Dead,
    /// The endpoint answered 410 Gone: it wants no more events.
    Gone,
}

impl State {
    /// Its name in listings.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Delivered => "delivered",
            State::Dead => "dead",
            State::Gone => "gone",
        }
    }
}

/// One event for one endpoint, as the outbox stores it (JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The event id (`webhook-id`): the same for every endpoint, kept across retries and
    /// replays, so receivers can drop duplicates.
    pub id: String,
    /// The event type.
    #[serde(rename = "type")]
    pub kind: String,
    /// The endpoint's name.
    pub endpoint: String,
    /// The record it concerns, if any.
    pub record: Option<String>,
    /// When the event happened, Unix milliseconds.
    pub created_ms: i64,
    /// The body, exactly as signed and sent.
    pub body: String,
    /// Attempts so far.
    pub attempts: u32,
    /// When the next attempt is due, Unix milliseconds.
    pub next_attempt_ms: i64,
    /// The last attempt's outcome (an HTTP status or an error), if any.
    pub last_error: Option<String>,
    /// Where it is.
    pub state: State,
    /// When it was delivered or given up, Unix milliseconds.
    pub finished_ms: Option<i64>,
    /// When an admin last asked for it again (`Admin.RetryDelivery`), Unix milliseconds: the
    /// `max_age_hours` horizon counts from then, not from the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retried_ms: Option<i64>,
}

impl Entry {
    /// The stored form.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Reads a stored entry.
    pub fn decode(bytes: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("outbox entry: {e}"))
    }
}

/// A revocation at the provider waiting in the outbox (key [`revocation_key`]): the record as
/// it was when revoked or deleted (its sealed envelope, opened only to make the call) and the
/// retry state. Removed once the provider answered or the call was given up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationEntry {
    /// Why: `revoke`, `delete` or `delete_owner`.
    pub reason: String,
    /// The record's id, owner and provider, for the audit event and the webhook.
    pub record_id: String,
    /// Owner.
    pub owner: String,
    /// Provider.
    pub provider: String,
    /// The record as it was, in the store's own encoding (`store::encode_record`), base64:
    /// its sealed envelope, opened only to make the call.
    pub record: String,
    /// The record's version when it was taken.
    pub version: u64,
    /// When it was written, Unix milliseconds.
    pub created_ms: i64,
    /// Attempts so far.
    pub attempts: u32,
    /// When the next attempt is due, Unix milliseconds.
    pub next_attempt_ms: i64,
    /// The last failure, if any.
    pub last_error: Option<String>,
}

/// Key of a revocation waiting in the outbox: `r/<order>`.
pub fn revocation_key(order: &str) -> String {
    format!("r/{order}")
}

/// Key of a pending entry: `p/<endpoint>/<order>`, listed per endpoint in the order the
/// events were written.
pub fn pending_key(endpoint: &str, order: &str) -> String {
    format!("p/{endpoint}/{order}")
}

/// Key of a finished entry (delivered, dead or gone): `d/<endpoint>/<order>`.
pub fn done_key(endpoint: &str, order: &str) -> String {
    format!("d/{endpoint}/{order}")
}

/// The order part of an entry's key, and so its position: 16 hex digits of a stamp that only
/// grows within a daemon (microseconds, raised past the last one), then the event id.
pub fn order(stamp: u64, id: &str) -> String {
    format!("{stamp:016x}-{id}")
}

/// When a failed delivery is tried again: exponential from 5 s, capped at one hour, with full
/// jitter over the upper half (`random` in `[0, 1)`), so a receiver that comes back is not hit
/// by every event at once.
pub fn next_attempt(attempts: u32, random: f64) -> Duration {
    let base = 5_000u64.saturating_mul(1u64 << attempts.saturating_sub(1).min(20));
    let capped = base.min(3_600_000);
    let half = capped / 2;
    // Truncation is the intent: a jittered whole number of milliseconds.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let jitter = (half as f64 * random.clamp(0.0, 1.0)) as u64;
    Duration::from_millis(half + jitter)
}

/// A signing secret: `whsec_` and the base64 of 24 to 64 random bytes (Standard Webhooks).
pub struct SigningKey(Zeroizing<Vec<u8>>);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SigningKey(<redacted>)")
    }
}

impl SigningKey {
    /// Reads a stored secret; the message never repeats it.
    pub fn parse(secret: &[u8]) -> Result<Self, &'static str> {
        let text = std::str::from_utf8(secret).map_err(|_| "not text")?;
        let encoded = text
            .trim()
            .strip_prefix("whsec_")
            .ok_or("does not start with whsec_")?;
        let key = Zeroizing::new(
            base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|_| "not base64 after whsec_")?,
        );
        if !(24..=64).contains(&key.len()) {
            return Err("must hold 24 to 64 bytes");
        }
        Ok(Self(key))
    }
}

/// The `webhook-signature` header: `v1,<base64 HMAC-SHA256 of "id.timestamp.body">` for each
/// key, separated by spaces (several during a secret's rotation).
pub fn sign(keys: &[SigningKey], id: &str, timestamp: i64, body: &str) -> String {
    let signed = format!("{id}.{timestamp}.{body}");
    keys.iter()
        .map(|k| {
            let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &k.0);
            let tag = aws_lc_rs::hmac::sign(&key, signed.as_bytes());
            format!(
                "v1,{}",
                base64::engine::general_purpose::STANDARD.encode(tag.as_ref())
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// One configured receiver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Its name (`[webhooks.endpoints.NAME]`).
    pub name: String,
    /// Where events are POSTed.
    pub url: Uri,
    /// Sealed records (kind `client_secret`) holding its `whsec_` secrets; each signs.
    pub secret_records: Vec<RecordId>,
    /// The providers whose records' events it gets (empty: all). An owner's deletion and the
    /// key events go to every endpoint that takes their type.
    pub providers: Vec<String>,
    /// The event types it gets (empty: all).
    pub events: Vec<EventType>,
    /// The outbound client's policy: the URL's host only, no redirects, no retries (the
    /// outbox retries), bounded time and answer size, the proxy's address checks.
    pub policy: ProviderPolicy,
}

impl Endpoint {
    /// Whether `event` goes to this endpoint.
    pub fn wants(&self, event: &Event) -> bool {
        (self.events.is_empty() || self.events.contains(&event.kind))
            && (self.providers.is_empty()
                || event
                    .provider
                    .as_ref()
                    .is_none_or(|p| self.providers.contains(p)))
    }
}

/// `[webhooks]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    /// The receivers, by name.
    pub endpoints: Vec<Endpoint>,
    /// How long a failing event is retried before it is dead-lettered.
    pub max_age: Duration,
    /// How often the outbox is read for due entries.
    pub poll: Duration,
    /// Finished entries are kept this long for listing and replay, then removed.
    pub keep_done: Duration,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            max_age: Duration::from_secs(72 * 3600),
            poll: Duration::from_millis(200),
            keep_done: Duration::from_secs(7 * 24 * 3600),
        }
    }
}

/// `[webhooks]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileWebhooks {
    max_age_hours: Option<u64>,
    poll_ms: Option<u64>,
    keep_done_hours: Option<u64>,
    #[serde(default)]
    endpoints: BTreeMap<String, FileEndpoint>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEndpoint {
    url: String,
    secret_records: Vec<String>,
    #[serde(default)]
    providers: Vec<String>,
    #[serde(default)]
    events: Vec<String>,
    #[serde(default)]
    allow_loopback_http: bool,
    ca_file: Option<PathBuf>,
    timeout_ms: Option<u64>,
    max_concurrency: Option<usize>,
}

/// A `[webhooks]` value that is not valid: the key and why.
#[derive(Debug)]
pub(crate) struct Invalid {
    pub(crate) key: String,
    pub(crate) message: String,
}

fn invalid(key: String, message: impl Into<String>) -> Invalid {
    Invalid {
        key,
        message: message.into(),
    }
}

/// Parses `[webhooks]`; relative paths are resolved against `base`.
pub(crate) fn parse(f: FileWebhooks, base: &Path) -> Result<WebhookConfig, Invalid> {
    let defaults = WebhookConfig::default();
    let hours = |v: Option<u64>, d: Duration, key: &str| match v {
        None => Ok(d),
        Some(h) if (1..=MAX_AGE_HOURS).contains(&h) => Ok(Duration::from_secs(h * 3600)),
        Some(_) => Err(invalid(
            format!("webhooks.{key}"),
            format!("must be between 1 and {MAX_AGE_HOURS}"),
        )),
    };
    let max_age = hours(f.max_age_hours, defaults.max_age, "max_age_hours")?;
    let keep_done = hours(f.keep_done_hours, defaults.keep_done, "keep_done_hours")?;
    let poll = match f.poll_ms {
        None => defaults.poll,
        Some(ms) if (10..=60_000).contains(&ms) => Duration::from_millis(ms),
        Some(_) => {
            return Err(invalid(
                "webhooks.poll_ms".into(),
                "must be between 10 and 60000",
            ));
        }
    };
    let endpoints = f
        .endpoints
        .into_iter()
        .map(|(name, e)| endpoint(name, e, base))
        .collect::<Result<_, _>>()?;
    Ok(WebhookConfig {
        endpoints,
        max_age,
        poll,
        keep_done,
    })
}

fn endpoint(name: String, f: FileEndpoint, base: &Path) -> Result<Endpoint, Invalid> {
    let key = |field: &str| format!("webhooks.endpoints.{name}.{field}");
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(invalid(
            format!("webhooks.endpoints.{name}"),
            "the name must be 1 to 64 letters, digits, '-' or '_'",
        ));
    }
    let url: Uri = f
        .url
        .parse()
        .map_err(|_| invalid(key("url"), "not a URL"))?;
    let (Some(scheme), Some(authority)) = (url.scheme_str(), url.authority()) else {
        return Err(invalid(key("url"), "needs a scheme and a host"));
    };
    if !authority
        .as_str()
        .rsplit('@')
        .nth(1)
        .is_none_or(str::is_empty)
    {
        return Err(invalid(key("url"), "must not carry user information"));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    match scheme {
        "https" => {}
        "http" if f.allow_loopback_http && loopback => {}
        "http" => {
            return Err(invalid(
                key("url"),
                "must be https:// (http:// only to a loopback address with allow_loopback_http = true)",
            ));
        }
        _ => return Err(invalid(key("url"), "must be https://")),
    }
    if f.allow_loopback_http && !loopback {
        return Err(invalid(
            key("allow_loopback_http"),
            "only for a URL whose host is a loopback address",
        ));
    }
    if f.secret_records.is_empty() {
        return Err(invalid(
            key("secret_records"),
            "name at least one sealed record holding a whsec_ secret",
        ));
    }
    let secret_records = f
        .secret_records
        .into_iter()
        .map(RecordId::parse)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(key("secret_records"), e.to_string()))?;
    let events = f
        .events
        .iter()
        .map(|e| {
            EventType::parse(e).ok_or_else(|| {
                invalid(
                    key("events"),
                    format!(
                        "unknown event type {e:?}; known: {}",
                        EventType::ALL.map(EventType::as_str).join(", ")
                    ),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let timeout_ms = f.timeout_ms.unwrap_or(10_000);
    if !(100..=60_000).contains(&timeout_ms) {
        return Err(invalid(key("timeout_ms"), "must be between 100 and 60000"));
    }
    let max_concurrency = f.max_concurrency.unwrap_or(8);
    if !(1..=256).contains(&max_concurrency) {
        return Err(invalid(key("max_concurrency"), "must be between 1 and 256"));
    }
    let policy = ProviderPolicy {
        name: format!("webhook {name}"),
        base: url.clone(),
        base_path: String::new(),
        allowed_hosts: vec![host.to_ascii_lowercase()],
        allowed_methods: vec![http::Method::POST],
        allowed_path_prefixes: vec!["/".into()],
        // The address checks of the proxy apply: a name that resolves to a private or special
        // address is refused, except loopback when the operator allowed it explicitly.
        allowed_networks: if loopback && f.allow_loopback_http {
            vec![
                "127.0.0.0/8"
                    .parse()
                    .map_err(|_| invalid(key("url"), "?"))?,
                "::1/128".parse().map_err(|_| invalid(key("url"), "?"))?,
            ]
        } else {
            Vec::new()
        },
        allow_plain_http: f.allow_loopback_http,
        auth_header: http::header::AUTHORIZATION,
        auth_scheme: String::new(),
        max_request_bytes: 1 << 20,
        max_response_bytes: 64 << 10,
        timeout: Duration::from_millis(timeout_ms),
        max_retries: 0,
        max_retry_after: Duration::ZERO,
        max_redirects: 0,
        max_concurrency,
        ca_file: f.ca_file.map(|p| base.join(p)),
        oauth: None,
        revocation: None,
        unlink_callback: None,
    };
    Ok(Endpoint {
        name,
        url,
        secret_records,
        providers: f.providers,
        events,
        policy,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(toml_text: &str) -> Result<WebhookConfig, String> {
        let f: FileWebhooks = toml::from_str(toml_text).map_err(|e| e.to_string())?;
        parse(f, Path::new("/etc/tokenvault")).map_err(|e| format!("{}: {}", e.key, e.message))
    }

    #[test]
    fn the_signature_is_standard_webhooks_known_answer() {
        // The specification's example (standard-webhooks, spec and libraries' tests): this
        // secret, id, timestamp and body sign to this value.
        let key = SigningKey::parse(b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("secret");
        let body = r#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&[key], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        let two = [
            SigningKey::parse(b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("secret"),
            SigningKey::parse(b"whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA").expect("secret"),
        ];
        let both = sign(&two, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body);
        let parts: Vec<&str> = both.split(' ').collect();
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0], "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
        assert_ne!(parts[0], parts[1]);
    }

    #[test]
    fn secrets_are_checked_and_never_shown() {
        for (bad, why) in [
            (&b"MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"[..], "whsec_"),
            (b"whsec_!!!", "base64"),
            (b"whsec_AAAA", "24 to 64"),
            (b"\xff", "text"),
        ] {
            let e = SigningKey::parse(bad).expect_err("refused");
            assert!(e.contains(why), "{e}");
        }
        let key = SigningKey::parse(b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").expect("secret");
        assert_eq!(format!("{key:?}"), "SigningKey(<redacted>)");
    }

    #[test]
    fn retries_back_off_exponentially_with_jitter_and_a_cap() {
        assert_eq!(next_attempt(1, 0.0), Duration::from_millis(2_500));
        assert_eq!(next_attempt(1, 1.0), Duration::from_millis(5_000));
        assert_eq!(next_attempt(2, 0.0), Duration::from_millis(5_000));
        assert_eq!(next_attempt(3, 1.0), Duration::from_millis(20_000));
        assert_eq!(next_attempt(40, 1.0), Duration::from_secs(3_600));
        assert_eq!(next_attempt(40, 0.0), Duration::from_secs(1_800));
    }

    #[test]
    fn endpoints_filter_by_type_and_provider() {
        let c = parsed(
            r#"
            [endpoints.all]
            url = "https://hooks.example/in"
            secret_records = ["whsec-1"]
            [endpoints.github-reauth]
            url = "https://hooks.example/gh"
            secret_records = ["whsec-1", "whsec-2"]
            providers = ["github"]
            events = ["record.needs_reauth", "owner.deleted"]
            "#,
        )
        .expect("config");
        let (all, gh) = (&c.endpoints[0], &c.endpoints[1]);
        assert_eq!(gh.secret_records.len(), 2);
        let event = |kind, provider: Option<&str>| Event {
            kind,
            record: None,
            provider: provider.map(str::to_string),
            data: serde_json::Map::new(),
        };
        assert!(all.wants(&event(EventType::Revoked, Some("google"))));
        assert!(gh.wants(&event(EventType::NeedsReauth, Some("github"))));
        assert!(!gh.wants(&event(EventType::NeedsReauth, Some("google"))));
        assert!(!gh.wants(&event(EventType::Revoked, Some("github"))));
        assert!(gh.wants(&event(EventType::OwnerDeleted, None)));
        assert_eq!(c.max_age, Duration::from_secs(72 * 3600));
    }

    #[test]
    fn bad_values_name_their_key() {
        let endpoint = |extra: &str| {
            format!(
                "[endpoints.e]\nurl = \"https://hooks.example/in\"\nsecret_records = [\"s\"]\n{extra}"
            )
        };
        for (text, key) in [
            ("max_age_hours = 0".to_string(), "webhooks.max_age_hours"),
            ("max_age_hours = 721".to_string(), "webhooks.max_age_hours"),
            ("poll_ms = 5".to_string(), "webhooks.poll_ms"),
            (
                "[endpoints.e]\nurl = \"http://hooks.example/in\"\nsecret_records = [\"s\"]".into(),
                "webhooks.endpoints.e.url",
            ),
            (
                "[endpoints.e]\nurl = \"http://127.0.0.1:9/in\"\nsecret_records = [\"s\"]".into(),
                "webhooks.endpoints.e.url",
            ),
            (
                "[endpoints.e]\nurl = \"https://hooks.example/in\"\nsecret_records = [\"s\"]\nallow_loopback_http = true".into(),
                "webhooks.endpoints.e.allow_loopback_http",
            ),
            (
                "[endpoints.e]\nurl = \"https://u:p@hooks.example/in\"\nsecret_records = [\"s\"]".into(),
                "webhooks.endpoints.e.url",
            ),
            (
                "[endpoints.e]\nurl = \"https://hooks.example/in\"\nsecret_records = []".into(),
                "webhooks.endpoints.e.secret_records",
            ),
            (
                "[endpoints.e]\nurl = \"https://hooks.example/in\"\nsecret_records = [\"bad id!\"]"
                    .into(),
                "webhooks.endpoints.e.secret_records",
            ),
            (endpoint("events = [\"record.exploded\"]"), "webhooks.endpoints.e.events"),
            (endpoint("timeout_ms = 0"), "webhooks.endpoints.e.timeout_ms"),
            (endpoint("max_concurrency = 0"), "webhooks.endpoints.e.max_concurrency"),
            (
                "[endpoints.\"a b\"]\nurl = \"https://hooks.example/in\"\nsecret_records = [\"s\"]"
                    .into(),
                "webhooks.endpoints.a b",
            ),
        ] {
            let e = parsed(&text).expect_err(&text);
            assert!(e.starts_with(&format!("{key}:")), "{text}: {e}");
        }
        let loopback = parsed(
            "[endpoints.e]\nurl = \"http://127.0.0.1:9/in\"\nsecret_records = [\"s\"]\nallow_loopback_http = true",
        )
        .expect("loopback allowed explicitly");
        assert!(loopback.endpoints[0].policy.allow_plain_http);
        assert!(parsed("unknown = 1").is_err());
    }

    #[test]
    fn entries_round_trip_and_bodies_carry_no_secret_fields() {
        let e = Event {
            kind: EventType::Revoked,
            record: Some("r".into()),
            provider: Some("github".into()),
            data: serde_json::Map::new(),
        }
        .with("reason", "admin");
        let body = e.body(1_700_000_000);
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["type"], "record.revoked");
        assert_eq!(v["timestamp"], "2023-11-14T22:13:20Z");
        assert_eq!(v["data"]["reason"], "admin");
        let entry = Entry {
            id: "msg_1".into(),
            kind: "record.revoked".into(),
            endpoint: "e".into(),
            record: Some("r".into()),
            created_ms: 1,
            body,
            attempts: 0,
            next_attempt_ms: 1,
            last_error: None,
            state: State::Pending,
            finished_ms: None,
            retried_ms: None,
        };
        assert_eq!(Entry::decode(&entry.encode()), Ok(entry));
        assert!(Entry::decode(b"{").is_err());
        assert!(order(1, "msg_a") < order(2, "msg_a"));
        assert!(order(0xffff, "msg_z") < order(0x1_0000, "msg_a"));
    }
}
