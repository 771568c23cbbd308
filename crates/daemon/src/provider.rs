//! Upstream provider configuration: where `Broker.Proxy` may send a record's credential, and
//! how its tokens are refreshed.
//!
//! Owns: [`ProviderPolicy`] and [`OAuthConfig`], parsed from the `[providers.NAME]` tables of
//! the config file (hot-reloadable). Must never hold a secret: the OAuth client secret is a
//! sealed record in the vault, named here only by its record id.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, Method, Uri};
use serde::Deserialize;

use crate::record::{Provider, RecordId};

/// Everything the proxy enforces for one provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderPolicy {
    /// Provider name (records name it in their metadata).
    pub name: String,
    /// Scheme and authority of the base URL.
    pub base: Uri,
    /// Path of the base URL without a trailing '/', e.g. `""` or `"/v3"`.
    pub base_path: String,
    /// Hosts the base URL, redirects and the token endpoint may name: exact, or `.suffix`.
    pub allowed_hosts: Vec<String>,
    /// Methods callers may use.
    pub allowed_methods: Vec<Method>,
    /// Path prefixes (below the base path) callers may reach.
    pub allowed_path_prefixes: Vec<String>,
    /// Special addresses (loopback, private, link-local, ...) this provider may reach anyway.
    pub allowed_networks: Vec<ipnet::IpNet>,
    /// Allow `http://` (only ever to a loopback address).
    pub allow_plain_http: bool,
    /// Header the credential is injected into.
    pub auth_header: HeaderName,
    /// Scheme before the credential (`Bearer`), or empty for the bare value.
    pub auth_scheme: String,
    /// Largest request body forwarded.
    pub max_request_bytes: usize,
    /// Largest response body returned.
    pub max_response_bytes: usize,
    /// Whole-call deadline, retries and redirects included.
    pub timeout: Duration,
    /// Retries after a connect error, 429 or 503.
    pub max_retries: u32,
    /// Longest `Retry-After` honoured; a longer one returns the response as it is.
    pub max_retry_after: Duration,
    /// Same-host redirects followed.
    pub max_redirects: u32,
    /// Concurrent upstream calls to this provider.
    pub max_concurrency: usize,
    /// Trust only this CA (PEM) instead of the bundled Mozilla roots.
    pub ca_file: Option<PathBuf>,
    /// Token refresh, if the provider's records are refreshable bundles.
    pub oauth: Option<OAuthConfig>,
    /// Revocation at the provider when a record is revoked or deleted, if it has one.
    pub revocation: Option<Revocation>,
    /// The provider's unlink callback (a user withdrew consent at the provider), if enabled.
    pub unlink_callback: Option<UnlinkCallback>,
}

/// `[providers.NAME.unlink_callback]`: `POST|GET /v1/providers/NAME/unlink` on the ingest
/// listeners, authenticated as Kakao documents its Unlink callback (`Authorization: KakaoAK
/// <the app's admin key>`, with `app_id`, `user_id` and `referrer_type`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnlinkCallback {
    /// Sealed `client_secret` record holding the app's admin key.
    pub admin_key_record: RecordId,
    /// The app id the callback must name.
    pub app_id: String,
    /// The records' owner is this prefix and the callback's `user_id`.
    pub owner_prefix: String,
    /// What happens to that owner's records of this provider.
    pub action: UnlinkAction,
    /// Addresses the callback may come from (the provider's published ones); empty: any.
    pub allowed_sources: Vec<ipnet::IpNet>,
}

/// What an unlink callback does to the records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnlinkAction {
    /// Delete them (Kakao's guidelines: delete the user's data).
    Delete,
    /// Revoke them (kept, never released again).
    Revoke,
}

/// How a record's grant is withdrawn at the provider (`[providers.NAME.revocation]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// The endpoint (must pass the provider's URL checks).
    pub endpoint: Uri,
    /// What is sent there.
    pub kind: RevocationKind,
    /// Whether `Revoke`, `Delete` and `DeleteOwner` revoke at the provider unless a request
    /// says otherwise.
    pub by_default: bool,
}

/// The provider's revocation call.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RevocationKind {
    /// RFC 7009: a form POST of `token` and `token_type_hint` (the refresh token when the
    /// record has one, else the access token) with the client authentication of `[oauth]`.
    Rfc7009,
    /// An unlink call of Kakao's kind: a POST authenticated with the user's access token
    /// (`Authorization: Bearer ...`), no body.
    Unlink,
}

/// How the client authenticates at the token endpoint (RFC 6749 §2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// HTTP Basic with the URL-encoded client id and secret.
    ClientSecretBasic,
    /// `client_id` and `client_secret` in the form body.
    ClientSecretPost,
}

/// Refresh settings of one provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthConfig {
    /// The token endpoint (must pass the provider's URL checks).
    pub token_endpoint: Uri,
    /// OAuth client id.
    pub client_id: String,
    /// Client authentication method.
    pub client_auth: ClientAuth,
    /// Id of the sealed record (kind `client_secret`) holding the client secret.
    pub client_secret_record: RecordId,
    /// Refresh when the access token expires within this many seconds.
    pub refresh_skew_seconds: i64,
    /// The redirect URIs registered with the provider: `Ingest.ExchangeCode` accepts exactly
    /// these (none: it is refused for this provider).
    pub redirect_uris: Vec<String>,
    /// Background renewal, if enabled.
    pub background: Option<Background>,
}

/// The optional background refresher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Background {
    /// Seconds between scans.
    pub interval_seconds: u64,
    /// Concurrent refreshes.
    pub concurrency: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct FileProvider {
    base_url: String,
    #[serde(default)]
    allowed_hosts: Vec<String>,
    #[serde(default)]
    allowed_methods: Vec<String>,
    #[serde(default)]
    allowed_path_prefixes: Vec<String>,
    #[serde(default)]
    allowed_networks: Vec<String>,
    #[serde(default)]
    allow_plain_http: bool,
    auth_header: Option<String>,
    auth_scheme: Option<String>,
    max_request_bytes: Option<usize>,
    max_response_bytes: Option<usize>,
    timeout_ms: Option<u64>,
    max_retries: Option<u32>,
    max_retry_after_seconds: Option<u64>,
    max_redirects: Option<u32>,
    max_concurrency: Option<usize>,
    ca_file: Option<PathBuf>,
    oauth: Option<FileOAuth>,
    revocation: Option<FileRevocation>,
    unlink_callback: Option<FileUnlinkCallback>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUnlinkCallback {
    admin_key_record: String,
    app_id: String,
    #[serde(default)]
    owner_prefix: String,
    action: Option<UnlinkAction>,
    #[serde(default)]
    allowed_sources: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRevocation {
    endpoint: String,
    kind: RevocationKind,
    #[serde(default)]
    by_default: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileOAuth {
    token_endpoint: String,
    client_id: String,
    client_auth: ClientAuth,
    client_secret_record: String,
    refresh_skew_seconds: Option<i64>,
    #[serde(default)]
    redirect_uris: Vec<String>,
    #[serde(default)]
    background_refresh: bool,
    background_interval_seconds: Option<u64>,
    background_concurrency: Option<usize>,
}

/// Largest response body a provider may allow (gRPC messages are capped at 16 MiB here).
pub const MAX_RESPONSE_BYTES: usize = 16 << 20;

/// An invalid `[providers.NAME]` setting. The config loader reports it as its own error; this
/// module knows nothing of the rest of the configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ProviderError {
    /// The offending key, e.g. `providers.github.base_url`.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

/// A list of networks as configured: each a CIDR or a single address.
pub(crate) fn networks(entries: &[String]) -> Result<Vec<ipnet::IpNet>, ()> {
    entries
        .iter()
        .map(|n| {
            n.parse::<ipnet::IpNet>()
                .or_else(|_| n.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| ())
        })
        .collect()
}

fn invalid(key: &str, message: impl Into<String>) -> ProviderError {
    ProviderError {
        key: key.to_string(),
        message: message.into(),
    }
}

/// Parses every `[providers.NAME]` table; relative paths are resolved against `base`.
pub(crate) fn parse_all(
    tables: BTreeMap<String, FileProvider>,
    base: &Path,
) -> Result<BTreeMap<String, ProviderPolicy>, ProviderError> {
    tables
        .into_iter()
        .map(|(name, f)| {
            let p = parse(&name, f, base)?;
            Ok((name, p))
        })
        .collect()
}

fn parse(name: &str, f: FileProvider, base: &Path) -> Result<ProviderPolicy, ProviderError> {
    let key = |field: &str| format!("providers.{name}.{field}");
    Provider::parse(name).map_err(|e| invalid(&format!("providers.{name}"), e.to_string()))?;
    let url: Uri = f
        .base_url
        .parse()
        .map_err(|_| invalid(&key("base_url"), "not a URL"))?;
    let (Some(scheme), Some(authority)) = (url.scheme(), url.authority()) else {
        return Err(invalid(&key("base_url"), "needs a scheme and a host"));
    };
    if url.query().is_some() {
        return Err(invalid(&key("base_url"), "must not have a query"));
    }
    let base_uri = Uri::builder()
        .scheme(scheme.clone())
        .authority(authority.clone())
        .path_and_query("/")
        .build()
        .map_err(|_| invalid(&key("base_url"), "not a URL"))?;
    let base_path = url.path().trim_end_matches('/').to_string();
    let allowed_hosts = if f.allowed_hosts.is_empty() {
        vec![authority.host().to_ascii_lowercase()]
    } else {
        f.allowed_hosts
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect()
    };
    let allowed_methods = if f.allowed_methods.is_empty() {
        vec![Method::GET, Method::HEAD]
    } else {
        f.allowed_methods
            .iter()
            .map(|m| Method::from_bytes(m.to_ascii_uppercase().as_bytes()))
            .collect::<Result<_, _>>()
            .map_err(|_| invalid(&key("allowed_methods"), "not an HTTP method"))?
    };
    let allowed_path_prefixes = if f.allowed_path_prefixes.is_empty() {
        vec!["/".to_string()]
    } else {
        f.allowed_path_prefixes
    };
    if allowed_path_prefixes
        .iter()
        .any(|p| !p.starts_with('/') || p.contains(".."))
    {
        return Err(invalid(
            &key("allowed_path_prefixes"),
            "each prefix must start with '/' and contain no '..'",
        ));
    }
    let allowed_networks = networks(&f.allowed_networks)
        .map_err(|()| invalid(&key("allowed_networks"), "each entry must be an IP or CIDR"))?;
    let auth_header = HeaderName::from_bytes(
        f.auth_header
            .as_deref()
            .unwrap_or("authorization")
            .as_bytes(),
    )
    .map_err(|_| invalid(&key("auth_header"), "not a header name"))?;
    let max_response_bytes = f.max_response_bytes.unwrap_or(4 << 20);
    if max_response_bytes == 0 || max_response_bytes > MAX_RESPONSE_BYTES {
        return Err(invalid(
            &key("max_response_bytes"),
            format!("must be between 1 and {MAX_RESPONSE_BYTES}"),
        ));
    }
    let max_concurrency = f.max_concurrency.unwrap_or(64);
    let timeout_ms = f.timeout_ms.unwrap_or(10_000);
    if max_concurrency == 0 || timeout_ms == 0 {
        return Err(invalid(
            &format!("providers.{name}"),
            "max_concurrency and timeout_ms must be > 0",
        ));
    }
    let oauth = f
        .oauth
        .map(|o| {
            let token_endpoint: Uri = o
                .token_endpoint
                .parse()
                .map_err(|_| invalid(&key("oauth.token_endpoint"), "not a URL"))?;
            if token_endpoint.authority().is_none() {
                return Err(invalid(&key("oauth.token_endpoint"), "needs a host"));
            }
            let client_secret_record = RecordId::parse(o.client_secret_record)
                .map_err(|e| invalid(&key("oauth.client_secret_record"), e.to_string()))?;
            for uri in &o.redirect_uris {
                let ok = (uri.starts_with("https://")
                    || uri.starts_with("http://127.0.0.1")
                    || uri.starts_with("http://localhost")
                    || uri.starts_with("http://[::1]"))
                    && uri.len() <= 2048
                    && !uri.contains('#')
                    && !uri.bytes().any(|b| b.is_ascii_control() || b == b' ');
                if !ok {
                    return Err(invalid(
                        &key("oauth.redirect_uris"),
                        "each must be an https:// URL (http:// only on loopback) without a fragment",
                    ));
                }
            }
            let background = o.background_refresh.then(|| Background {
                interval_seconds: o.background_interval_seconds.unwrap_or(60).max(1),
                concurrency: o.background_concurrency.unwrap_or(4).max(1),
            });
            Ok(OAuthConfig {
                token_endpoint,
                client_id: o.client_id,
                client_auth: o.client_auth,
                client_secret_record,
                refresh_skew_seconds: o.refresh_skew_seconds.unwrap_or(300).max(0),
                redirect_uris: o.redirect_uris,
                background,
            })
        })
        .transpose()?;
    let revocation = f
        .revocation
        .map(|r| {
            let endpoint: Uri = r
                .endpoint
                .parse()
                .map_err(|_| invalid(&key("revocation.endpoint"), "not a URL"))?;
            // Its scheme, host and addresses pass the provider's checks when it is called,
            // as the token endpoint's do.
            if endpoint.authority().is_none() {
                return Err(invalid(&key("revocation.endpoint"), "needs a host"));
            }
            if r.kind == RevocationKind::Rfc7009 && oauth.is_none() {
                return Err(invalid(
                    &key("revocation.kind"),
                    "rfc7009 authenticates as the OAuth client: it needs [providers.NAME.oauth]",
                ));
            }
            Ok(Revocation {
                endpoint,
                kind: r.kind,
                by_default: r.by_default,
            })
        })
        .transpose()?;
    let unlink_callback = f
        .unlink_callback
        .map(|u| {
            let admin_key_record = RecordId::parse(u.admin_key_record)
                .map_err(|e| invalid(&key("unlink_callback.admin_key_record"), e.to_string()))?;
            if u.app_id.is_empty()
                || u.app_id.len() > 64
                || !u.app_id.bytes().all(|b| b.is_ascii_graphic())
            {
                return Err(invalid(
                    &key("unlink_callback.app_id"),
                    "1 to 64 printable characters",
                ));
            }
            if u.owner_prefix.len() > 64 || u.owner_prefix.bytes().any(|b| b.is_ascii_control()) {
                return Err(invalid(
                    &key("unlink_callback.owner_prefix"),
                    "up to 64 characters, no control characters",
                ));
            }
            let allowed_sources = networks(&u.allowed_sources).map_err(|()| {
                invalid(
                    &key("unlink_callback.allowed_sources"),
                    "each entry must be an IP or CIDR",
                )
            })?;
            Ok(UnlinkCallback {
                admin_key_record,
                app_id: u.app_id,
                owner_prefix: u.owner_prefix,
                action: u.action.unwrap_or(UnlinkAction::Delete),
                allowed_sources,
            })
        })
        .transpose()?;
    Ok(ProviderPolicy {
        name: name.to_string(),
        base: base_uri,
        base_path,
        allowed_hosts,
        allowed_methods,
        allowed_path_prefixes,
        allowed_networks,
        allow_plain_http: f.allow_plain_http,
        auth_header,
        auth_scheme: f.auth_scheme.unwrap_or_else(|| "Bearer".into()),
        max_request_bytes: f.max_request_bytes.unwrap_or(1 << 20),
        max_response_bytes,
        timeout: Duration::from_millis(timeout_ms),
        max_retries: f.max_retries.unwrap_or(2).min(10),
        max_retry_after: Duration::from_secs(f.max_retry_after_seconds.unwrap_or(10)),
        max_redirects: f.max_redirects.unwrap_or(3).min(10),
        max_concurrency,
        ca_file: f.ca_file.map(|p| base.join(p)),
        oauth,
        revocation,
        unlink_callback,
    })
}

impl ProviderPolicy {
    /// A permissive policy for `base_url` (unit tests and fuzzing only).
    #[cfg(any(test, fuzzing))]
    pub fn for_tests(base_url: &str) -> Self {
        let file: FileProvider =
            toml::from_str(&format!("base_url = \"{base_url}\"\n")).expect("test provider parses");
        parse("test", file, Path::new(".")).expect("test provider is valid")
    }
}

/// The outbound policy of a security event issuer's JWKS fetch (errors name `name`'s keys): the URL's host only, `GET`,
/// a 1 MiB answer within 5 s, `https://` unless `allow_plain_http` (loopback only), and no
/// special address (loopback, private, link-local, metadata) outside `allowed_networks`: the
/// same SSRF guard as a provider's.
pub fn jwks_policy(
    name: &str,
    url: &str,
    allowed_networks: &[String],
    allow_plain_http: bool,
    ca_file: Option<PathBuf>,
) -> Result<ProviderPolicy, ProviderError> {
    let file = FileProvider {
        base_url: url.to_string(),
        allowed_hosts: Vec::new(),
        allowed_methods: vec!["GET".into()],
        allowed_path_prefixes: Vec::new(),
        allowed_networks: allowed_networks.to_vec(),
        allow_plain_http,
        auth_header: None,
        auth_scheme: None,
        max_request_bytes: Some(1024),
        max_response_bytes: Some(1 << 20),
        timeout_ms: Some(5_000),
        max_retries: Some(1),
        max_retry_after_seconds: Some(1),
        max_redirects: Some(0),
        max_concurrency: Some(4),
        ca_file,
        oauth: None,
        revocation: None,
        unlink_callback: None,
    };
    if url.starts_with("http://") && !allow_plain_http {
        return Err(invalid(
            &format!("{name}.jwks_url"),
            "must be https:// (jwks_allow_plain_http is for a loopback test issuer only)",
        ));
    }
    // Reported under the issuer's own keys (`name` is e.g. `security_event_issuers[0]`).
    parse("jwks", file, Path::new(".")).map_err(|e| ProviderError {
        key: if e.key.ends_with(".allowed_networks") {
            format!("{name}.jwks_allowed_networks")
        } else {
            format!("{name}.jwks_url")
        },
        message: e.message,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_refusals() {
        let p = ProviderPolicy::for_tests("https://API.example.com/v3/");
        assert_eq!(p.base.to_string(), "https://API.example.com/");
        assert_eq!(p.base_path, "/v3");
        assert_eq!(p.allowed_hosts, vec!["api.example.com".to_string()]);
        assert_eq!(p.allowed_methods, vec![Method::GET, Method::HEAD]);
        assert_eq!(p.auth_header, http::header::AUTHORIZATION);
        assert_eq!(p.auth_scheme, "Bearer");
        for (text, msg) in [
            (
                "base_url = \"nope\"",
                "providers.x.base_url: needs a scheme and a host",
            ),
            (
                "base_url = \"https://a\"\nallowed_path_prefixes = [\"x\"]",
                "providers.x.allowed_path_prefixes",
            ),
            (
                "base_url = \"https://a\"\nallowed_networks = [\"10.0.0.0/33\"]",
                "providers.x.allowed_networks",
            ),
            (
                "base_url = \"https://a\"\nmax_response_bytes = 0",
                "providers.x.max_response_bytes",
            ),
            (
                "base_url = \"https://a\"\n[oauth]\ntoken_endpoint = \"https://a/t\"\nclient_id = \"c\"\nclient_auth = \"client_secret_jwt\"\nclient_secret_record = \"cs\"",
                "unknown variant",
            ),
            (
                "base_url = \"https://a\"\n[oauth]\ntoken_endpoint = \"https://a/t\"\nclient_id = \"c\"\nclient_auth = \"client_secret_post\"\nclient_secret_record = \"cs\"\nredirect_uris = [\"http://app.example/cb\"]",
                "providers.x.oauth.redirect_uris: each must be an https:// URL",
            ),
            (
                "base_url = \"https://a\"\n[oauth]\ntoken_endpoint = \"https://a/t\"\nclient_id = \"c\"\nclient_auth = \"client_secret_post\"\nclient_secret_record = \"cs\"\nredirect_uris = [\"https://app.example/cb#frag\"]",
                "providers.x.oauth.redirect_uris: each must be an https:// URL",
            ),
            (
                "base_url = \"https://a\"\n[revocation]\nendpoint = \"https://a/revoke\"\nkind = \"rfc7009\"",
                "providers.x.revocation.kind: rfc7009 authenticates as the OAuth client",
            ),
            (
                "base_url = \"https://a\"\n[revocation]\nendpoint = \"/revoke\"\nkind = \"unlink\"",
                "providers.x.revocation.endpoint: needs a host",
            ),
            (
                "base_url = \"https://a\"\n[revocation]\nendpoint = \"https://a/r\"\nkind = \"logout\"",
                "unknown variant",
            ),
            (
                "base_url = \"https://a\"\n[unlink_callback]\nadmin_key_record = \"bad id!\"\napp_id = \"1\"",
                "providers.x.unlink_callback.admin_key_record",
            ),
            (
                "base_url = \"https://a\"\n[unlink_callback]\nadmin_key_record = \"k\"\napp_id = \"\"",
                "providers.x.unlink_callback.app_id",
            ),
            (
                "base_url = \"https://a\"\n[unlink_callback]\nadmin_key_record = \"k\"\napp_id = \"1\"\nallowed_sources = [\"kakao\"]",
                "providers.x.unlink_callback.allowed_sources",
            ),
            (
                "base_url = \"https://a\"\n[unlink_callback]\nadmin_key_record = \"k\"\napp_id = \"1\"\naction = \"archive\"",
                "unknown variant",
            ),
        ] {
            let err = toml::from_str::<FileProvider>(text)
                .map_err(|e| e.to_string())
                .and_then(|f| parse("x", f, Path::new(".")).map_err(|e| e.to_string()))
                .expect_err(text);
            assert!(err.contains(msg), "{text}: {err}");
        }
    }
}
