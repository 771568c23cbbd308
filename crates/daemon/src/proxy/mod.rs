//! The upstream proxy: makes a worker's HTTP call to a provider with the record's credential
//! injected, so the worker never holds the token.
//!
//! Owns: per-provider HTTP clients ([`Upstream`]), the outbound policy (methods, path prefixes,
//! hosts, SSRF guard in [`target`] and [`connect`]), header hygiene, size caps, deadlines,
//! retries and per-provider concurrency. Knows nothing of records, keys or the store: the
//! caller hands it a credential and gets a response.
//!
//! Must never: send the credential to a host other than the provider's, follow a redirect to
//! another host, log a header value or body, or return the credential (occurrences of it in a
//! response are redacted).

pub mod connect;
pub mod target;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::client::legacy::Client;
use thiserror::Error;
use zeroize::Zeroizing;

pub use crate::provider::ProviderPolicy;
use crate::secret::Secret;
use connect::{ConnectError, Connector, Resolver};

/// The outbound policy refused a request; the reason is safe to show the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal(pub String);

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Why an upstream call failed. None of these carries the credential.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// The outbound policy refused the request.
    #[error("{0}")]
    Refused(Refusal),
    /// A malformed request (bad header, bad method).
    #[error("{0}")]
    BadRequest(String),
    /// The request body exceeds the provider's cap.
    #[error("request body of {len} bytes exceeds the provider's limit of {max}")]
    RequestTooLarge {
        /// Size given.
        len: usize,
        /// Limit.
        max: usize,
    },
    /// The upstream response exceeds the provider's cap.
    #[error("upstream response body exceeds the provider's limit of {max} bytes")]
    ResponseTooLarge {
        /// Limit.
        max: usize,
    },
    /// The whole call (retries and redirects included) ran out of time.
    #[error("upstream call timed out after {ms} ms")]
    Timeout {
        /// Deadline in milliseconds.
        ms: u128,
    },
    /// The provider's concurrency limit stayed full for the whole deadline.
    #[error("provider {0} is at its concurrency limit")]
    Busy(String),
    /// The upstream could not be reached or the exchange broke.
    #[error("upstream unavailable: {0}")]
    Unavailable(String),
    /// The stored credential cannot be sent as a header value.
    #[error("the stored credential is not a valid HTTP header value")]
    BadCredential,
}

/// A request as the worker sent it, before validation.
#[derive(Debug, Clone, Default)]
pub struct CallerRequest {
    /// HTTP method.
    pub method: String,
    /// Path and query, relative to the provider's base URL.
    pub path: String,
    /// Headers (hop-by-hop, credential and cookie headers are dropped).
    pub headers: Vec<(String, Vec<u8>)>,
    /// Body.
    pub body: Vec<u8>,
}

/// A validated request, ready to send.
#[derive(Debug, Clone)]
pub struct Prepared {
    method: Method,
    uri: Uri,
    headers: http::HeaderMap,
    body: Bytes,
}

impl Prepared {
    /// The method.
    pub fn method(&self) -> &Method {
        &self.method
    }
}

/// An upstream response, credential occurrences redacted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamResponse {
    /// HTTP status.
    pub status: u16,
    /// Headers, hop-by-hop ones removed.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Body.
    pub body: Bytes,
}

/// Replaces the credential where a response reflects it.
pub const REDACTED: &[u8] = b"[REDACTED]";

/// Hop-by-hop headers (RFC 9110 §7.6.1): never forwarded in either direction.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Caller headers that would let it smuggle or override credentials or routing.
const CALLER_FORBIDDEN: &[&str] = &[
    "host",
    "content-length",
    "authorization",
    "cookie",
    "forwarded",
];

fn stripped(name: &HeaderName, extra: &[HeaderName]) -> bool {
    let n = name.as_str();
    HOP_BY_HOP.contains(&n)
        || CALLER_FORBIDDEN.contains(&n)
        || n.starts_with("proxy-")
        || n.starts_with("x-forwarded-")
        || extra.contains(name)
}

/// Names listed in `Connection` headers are hop-by-hop too.
fn connection_listed(headers: &http::HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect()
}

/// One provider's HTTP client, policy and concurrency slots.
pub struct Upstream {
    policy: Arc<ProviderPolicy>,
    client: Client<Connector, Full<Bytes>>,
    slots: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("provider", &self.policy.name)
            .finish_non_exhaustive()
    }
}

/// Why a provider's client could not be built.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum UpstreamSetupError {
    /// The CA file could not be read.
    #[error("reading ca_file {}: {source}", path.display())]
    ReadCa {
        /// Its path.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A certificate in the CA file is not usable.
    #[error("ca_file {}: {reason}", path.display())]
    BadCa {
        /// Its path.
        path: std::path::PathBuf,
        /// The decoder's or rustls's reason.
        reason: String,
    },
    /// The CA file holds no certificate.
    #[error("ca_file {} holds no certificate", path.display())]
    EmptyCa {
        /// Its path.
        path: std::path::PathBuf,
    },
    /// The TLS library refused the configuration.
    #[error("TLS configuration: {0}")]
    Tls(#[from] rustls::Error),
    /// One provider's client, by name.
    #[error("provider {name}: {source}")]
    Provider {
        /// The provider.
        name: String,
        /// The cause.
        #[source]
        source: Box<UpstreamSetupError>,
    },
}

/// Builds the TLS configuration: the provider's CA file, or the bundled Mozilla roots.
fn tls_config(policy: &ProviderPolicy) -> Result<rustls::ClientConfig, UpstreamSetupError> {
    let roots = match &policy.ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|source| UpstreamSetupError::ReadCa {
                path: path.clone(),
                source,
            })?;
            crate::ca::roots_from_pem(&pem).map_err(|e| match e {
                crate::ca::CaError::Empty => UpstreamSetupError::EmptyCa { path: path.clone() },
                other => UpstreamSetupError::BadCa {
                    path: path.clone(),
                    reason: other.to_string(),
                },
            })?
        }
        None => crate::ca::mozilla_roots(),
    };
    Ok(crate::ca::client_builder(roots)?.with_no_client_auth())
}

impl Upstream {
    /// A client for `policy` using the system resolver.
    pub fn new(policy: ProviderPolicy) -> Result<Self, UpstreamSetupError> {
        Self::with_resolver(policy, connect::system_resolver())
    }

    /// A client for `policy` resolving names with `resolver`.
    pub fn with_resolver(
        policy: ProviderPolicy,
        resolver: Resolver,
    ) -> Result<Self, UpstreamSetupError> {
        let tls = Arc::new(tls_config(&policy)?);
        let policy = Arc::new(policy);
        let connector = Connector::new(Arc::clone(&policy), tls, resolver);
        let client = Client::builder(hyper_util::rt::TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(policy.max_concurrency)
            .build(connector);
        Ok(Self {
            slots: Arc::new(tokio::sync::Semaphore::new(policy.max_concurrency)),
            policy,
            client,
        })
    }

    /// The provider's policy.
    pub fn policy(&self) -> &ProviderPolicy {
        &self.policy
    }

    /// Validates a caller's request against the provider's policy. Runs before the credential
    /// is decrypted, so a refused request never touches it.
    pub fn prepare(&self, req: CallerRequest) -> Result<Prepared, ProxyError> {
        let p = &*self.policy;
        let method = Method::from_bytes(req.method.to_ascii_uppercase().as_bytes())
            .map_err(|_| ProxyError::BadRequest(format!("invalid method {:?}", req.method)))?;
        if !p.allowed_methods.contains(&method) {
            return Err(ProxyError::Refused(Refusal(format!(
                "method {method} is not allowed for provider {}",
                p.name
            ))));
        }
        let uri = target::join(p, &req.path).map_err(ProxyError::Refused)?;
        target::check_url(p, &uri).map_err(ProxyError::Refused)?;
        if req.body.len() > p.max_request_bytes {
            return Err(ProxyError::RequestTooLarge {
                len: req.body.len(),
                max: p.max_request_bytes,
            });
        }
        let mut headers = http::HeaderMap::new();
        for (i, (name, value)) in req.headers.into_iter().enumerate() {
            let name = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| ProxyError::BadRequest(format!("headers[{i}]: invalid name")))?;
            let value = HeaderValue::from_bytes(&value).map_err(|_| {
                ProxyError::BadRequest(format!("headers[{i}] ({name}): invalid value"))
            })?;
            headers.append(name, value);
        }
        let mut extra = connection_listed(&headers);
        extra.push(p.auth_header.clone());
        let names: Vec<HeaderName> = headers.keys().cloned().collect();
        for name in names {
            if stripped(&name, &extra) {
                headers.remove(&name);
            }
        }
        Ok(Prepared {
            method,
            uri,
            headers,
            body: Bytes::from(req.body),
        })
    }

    /// Sends `prepared` with `credential` injected, following same-host redirects and retrying
    /// as the policy allows.
    pub async fn send(
        &self,
        prepared: &Prepared,
        credential: &Secret,
    ) -> Result<UpstreamResponse, ProxyError> {
        let p = &*self.policy;
        let mut value = Zeroizing::new(Vec::with_capacity(
            p.auth_scheme.len() + 1 + credential.len(),
        ));
        if !p.auth_scheme.is_empty() {
            value.extend_from_slice(p.auth_scheme.as_bytes());
            value.push(b' ');
        }
        value.extend_from_slice(credential.expose_secret());
        let mut auth = HeaderValue::from_bytes(&value).map_err(|_| ProxyError::BadCredential)?;
        auth.set_sensitive(true);
        let mut response = self
            .execute(prepared.clone(), Some((p.auth_header.clone(), auth)), true)
            .await?;
        redact(&mut response, credential.expose_secret());
        Ok(response)
    }

    /// POSTs a form to `uri` (the token endpoint) without a caller credential; `headers` may
    /// carry client authentication. The URL passes the same host and address checks.
    pub async fn post_form(
        &self,
        uri: &Uri,
        auth: Option<HeaderValue>,
        body: Bytes,
    ) -> Result<UpstreamResponse, ProxyError> {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        if let Some(mut auth) = auth {
            auth.set_sensitive(true);
            headers.insert(header::AUTHORIZATION, auth);
        }
        self.post(uri, headers, body).await
    }

    /// POSTs `body` with `headers` to `uri` (a token endpoint, a webhook receiver) without a
    /// caller credential, following no redirect. The URL passes the same host and address
    /// checks as every call of this client.
    pub async fn post(
        &self,
        uri: &Uri,
        headers: http::HeaderMap,
        body: Bytes,
    ) -> Result<UpstreamResponse, ProxyError> {
        target::check_url(&self.policy, uri).map_err(ProxyError::Refused)?;
        let prepared = Prepared {
            method: Method::POST,
            uri: uri.clone(),
            headers,
            body,
        };
        self.execute(prepared, None, false).await
    }

    /// GETs `uri` (a security event issuer's JWKS) without a credential; the URL passes the
    /// same host and address checks.
    pub async fn get_json(&self, uri: &Uri) -> Result<UpstreamResponse, ProxyError> {
        target::check_url(&self.policy, uri).map_err(ProxyError::Refused)?;
        let mut headers = http::HeaderMap::new();
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        let prepared = Prepared {
            method: Method::GET,
            uri: uri.clone(),
            headers,
            body: Bytes::new(),
        };
        self.execute(prepared, None, false).await
    }

    async fn execute(
        &self,
        prepared: Prepared,
        credential: Option<(HeaderName, HeaderValue)>,
        follow_redirects: bool,
    ) -> Result<UpstreamResponse, ProxyError> {
        let p = &*self.policy;
        let deadline = Instant::now() + p.timeout;
        let timeout = || ProxyError::Timeout {
            ms: p.timeout.as_millis(),
        };
        let _slot = tokio::time::timeout_at(deadline.into(), self.slots.acquire())
            .await
            .map_err(|_| ProxyError::Busy(p.name.clone()))?
            .map_err(|_| ProxyError::Busy(p.name.clone()))?;
        let work = async {
            let mut current = prepared;
            let mut redirects = 0;
            let mut retries = 0;
            loop {
                let outcome = self.once(&current, credential.as_ref()).await;
                let retry_in = match &outcome {
                    // docs/PROXY.md: a request the upstream may have received is repeated only
                    // when its method is idempotent; one that never left is always safe.
                    Err(Failed {
                        error: ProxyError::Unavailable(_),
                        maybe_sent,
                    }) if !maybe_sent || current.method.is_idempotent() => Some(backoff(retries)),
                    Ok(r) if r.status == 429 || r.status == 503 => {
                        match retry_after(&r.headers, p.max_retry_after) {
                            RetryAfter::Wait(d) => Some(d),
                            RetryAfter::None => Some(backoff(retries)),
                            RetryAfter::TooLong => None,
                        }
                    }
                    _ => None,
                };
                if let Some(wait) = retry_in
                    && retries < p.max_retries
                    && Instant::now() + wait < deadline
                {
                    retries += 1;
                    tokio::time::sleep(wait).await;
                    continue;
                }
                let response = outcome.map_err(|f| f.error)?;
                let location = matches!(response.status, 301 | 302 | 303 | 307 | 308)
                    .then(|| header_value(&response.headers, "location"))
                    .flatten();
                let (Some(location), true) = (location, follow_redirects) else {
                    return Ok(response);
                };
                if redirects >= p.max_redirects {
                    return Err(ProxyError::Refused(Refusal(format!(
                        "more than {} redirects",
                        p.max_redirects
                    ))));
                }
                redirects += 1;
                let location = String::from_utf8(location).map_err(|_| {
                    ProxyError::Refused(Refusal("redirect Location is not UTF-8".into()))
                })?;
                current.uri =
                    target::redirect(p, &current.uri, &location).map_err(ProxyError::Refused)?;
                if response.status == 303 {
                    current.method = Method::GET;
                    current.body = Bytes::new();
                }
            }
        };
        tokio::time::timeout_at(deadline.into(), work)
            .await
            .map_err(|_| timeout())?
    }

    async fn once(
        &self,
        prepared: &Prepared,
        credential: Option<&(HeaderName, HeaderValue)>,
    ) -> Result<UpstreamResponse, Failed> {
        let p = &*self.policy;
        let mut request = Request::builder()
            .method(prepared.method.clone())
            .uri(prepared.uri.clone())
            .body(Full::new(prepared.body.clone()))
            .map_err(|e| Failed::before_sending(ProxyError::BadRequest(e.to_string())))?;
        *request.headers_mut() = prepared.headers.clone();
        if let Some((name, value)) = credential {
            request.headers_mut().insert(name.clone(), value.clone());
        }
        let response =
            self.client
                .request(request)
                .await
                .map_err(|e| match find_connect_error(&e) {
                    Some(ConnectError::Refused(r)) => {
                        Failed::before_sending(ProxyError::Refused(r.clone()))
                    }
                    Some(ConnectError::Failed(m)) => {
                        Failed::before_sending(ProxyError::Unavailable(m.clone()))
                    }
                    None => Failed::maybe_sent(ProxyError::Unavailable(describe(&e))),
                })?;
        let (parts, body) = response.into_parts();
        let max = p.max_response_bytes;
        if parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
            .is_some_and(|len| len > max)
        {
            return Err(Failed::maybe_sent(ProxyError::ResponseTooLarge { max }));
        }
        let body = Limited::new(body, max)
            .collect()
            .await
            .map_err(|e| {
                Failed::maybe_sent(if e.is::<http_body_util::LengthLimitError>() {
                    ProxyError::ResponseTooLarge { max }
                } else {
                    ProxyError::Unavailable(format!("reading the response: {e}"))
                })
            })?
            .to_bytes();
        let listed = connection_listed(&parts.headers);
        let headers = parts
            .headers
            .iter()
            .filter(|(n, _)| {
                !(HOP_BY_HOP.contains(&n.as_str())
                    || n.as_str().starts_with("proxy-")
                    || listed.contains(n))
            })
            .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
            .collect();
        Ok(UpstreamResponse {
            status: parts.status.as_u16(),
            headers,
            body,
        })
    }
}

/// One attempt's failure, and whether the upstream may have received the request: only a
/// connect failure (or a refusal before connecting) proves it did not.
struct Failed {
    error: ProxyError,
    maybe_sent: bool,
}

impl Failed {
    fn before_sending(error: ProxyError) -> Self {
        Self {
            error,
            maybe_sent: false,
        }
    }

    fn maybe_sent(error: ProxyError) -> Self {
        Self {
            error,
            maybe_sent: true,
        }
    }
}

/// The connector's own error inside hyper's error chain, if that is what failed.
fn find_connect_error<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a ConnectError> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = current {
        if let Some(c) = err.downcast_ref::<ConnectError>() {
            return Some(c);
        }
        current = err.source();
    }
    None
}

/// An error and its causes on one line.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

fn header_value(headers: &[(String, Vec<u8>)], name: &str) -> Option<Vec<u8>> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
}

/// Exponential backoff with full jitter: uniform in 0..=cap, cap 100 ms, 200 ms, 400 ms, ...
/// (capped at 6.4 s), so callers retrying together spread out.
fn backoff(retries: u32) -> Duration {
    use rand::Rng as _;
    Duration::from_millis(rand::thread_rng().gen_range(0..=backoff_cap_ms(retries)))
}

fn backoff_cap_ms(retries: u32) -> u64 {
    100u64.saturating_mul(1 << retries.min(6))
}

#[derive(Debug, PartialEq, Eq)]
enum RetryAfter {
    None,
    Wait(Duration),
    TooLong,
}

/// Parses `Retry-After` (delay seconds or an HTTP date).
fn retry_after(headers: &[(String, Vec<u8>)], cap: Duration) -> RetryAfter {
    let Some(value) = header_value(headers, "retry-after") else {
        return RetryAfter::None;
    };
    let Ok(text) = std::str::from_utf8(&value) else {
        return RetryAfter::None;
    };
    let wait = match text.trim().parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => match httpdate::parse_http_date(text.trim()) {
            Ok(when) => when
                .duration_since(std::time::SystemTime::now())
                .unwrap_or_default(),
            Err(_) => return RetryAfter::None,
        },
    };
    if wait > cap {
        RetryAfter::TooLong
    } else {
        RetryAfter::Wait(wait)
    }
}

/// Replaces every occurrence of `secret` in the response headers and body.
fn redact(response: &mut UpstreamResponse, secret: &[u8]) {
    if secret.len() < 8 {
        // Too short to search for without mangling unrelated bytes; such credentials are
        // refused at ingest time anyway for bundles, and API keys this short are not secrets.
        return;
    }
    let finder = memchr::memmem::Finder::new(secret);
    let replace = |bytes: &[u8]| -> Option<Vec<u8>> {
        finder.find(bytes)?;
        let mut out = Vec::with_capacity(bytes.len());
        let mut rest = bytes;
        while let Some(i) = finder.find(rest) {
            out.extend_from_slice(&rest[..i]);
            out.extend_from_slice(REDACTED);
            rest = &rest[i + secret.len()..];
        }
        out.extend_from_slice(rest);
        Some(out)
    };
    if let Some(body) = replace(&response.body) {
        tracing::warn!("upstream response reflected the credential; redacted");
        response.body = Bytes::from(body);
    }
    for (_, v) in &mut response.headers {
        if let Some(nv) = replace(v) {
            tracing::warn!("upstream response header reflected the credential; redacted");
            *v = nv;
        }
    }
}

/// The configured providers' clients, by name. Replaced wholesale on reload.
#[derive(Debug, Default)]
pub struct Upstreams {
    by_name: HashMap<String, Arc<Upstream>>,
}

impl Upstreams {
    /// Builds one client per provider.
    pub fn new<'a>(
        policies: impl IntoIterator<Item = &'a ProviderPolicy>,
    ) -> Result<Self, UpstreamSetupError> {
        let mut by_name = HashMap::new();
        for p in policies {
            let upstream = Upstream::new(p.clone()).map_err(|e| UpstreamSetupError::Provider {
                name: p.name.clone(),
                source: Box::new(e),
            })?;
            by_name.insert(p.name.clone(), Arc::new(upstream));
        }
        Ok(Self { by_name })
    }

    /// The client for `provider`.
    pub fn get(&self, provider: &str) -> Option<Arc<Upstream>> {
        self.by_name.get(provider).cloned()
    }

    /// Provider names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.by_name.keys().cloned().collect();
        names.sort();
        names
    }

    /// Every client.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Upstream>> {
        self.by_name.values()
    }
}

/// Whether `status` means the credential was rejected (a refresh may help).
pub fn is_unauthorized(status: u16) -> bool {
    status == StatusCode::UNAUTHORIZED.as_u16()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_parses_seconds_dates_and_caps() {
        let h = |v: &str| vec![("retry-after".to_string(), v.as_bytes().to_vec())];
        let cap = Duration::from_secs(5);
        assert_eq!(
            retry_after(&h("2"), cap),
            RetryAfter::Wait(Duration::from_secs(2))
        );
        assert_eq!(retry_after(&h("60"), cap), RetryAfter::TooLong);
        assert_eq!(retry_after(&h("soon"), cap), RetryAfter::None);
        assert_eq!(retry_after(&[], cap), RetryAfter::None);
        let past = httpdate::fmt_http_date(std::time::SystemTime::UNIX_EPOCH);
        assert_eq!(
            retry_after(&h(&past), cap),
            RetryAfter::Wait(Duration::ZERO)
        );
    }

    #[test]
    fn backoff_is_full_jitter_below_the_cap() {
        for retries in 0..8 {
            let cap = Duration::from_millis(backoff_cap_ms(retries));
            let waits: Vec<Duration> = (0..200).map(|_| backoff(retries)).collect();
            assert!(waits.iter().all(|w| *w <= cap), "{retries}");
            // Full jitter draws from the whole range, not only its upper half (the chance of
            // 200 draws all landing in one half is 2^-200).
            assert!(waits.iter().any(|w| *w < cap / 2), "{retries}: {waits:?}");
        }
        assert_eq!(backoff_cap_ms(0), 100);
        assert_eq!(backoff_cap_ms(2), 400);
        assert_eq!(backoff_cap_ms(20), 6400);
    }

    /// An upstream on loopback that reads each request and closes the connection without
    /// answering: the request may have been processed. Returns its address and a counter of
    /// requests received.
    async fn upstream_that_hangs_up() -> (std::net::SocketAddr, Arc<std::sync::atomic::AtomicU32>) {
        use tokio::io::AsyncReadExt as _;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counter = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((mut sock, _)) = listener.accept().await {
                let counter = Arc::clone(&counter);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match sock.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    drop(sock);
                });
            }
        });
        (addr, seen)
    }

    fn loopback_policy(addr: std::net::SocketAddr) -> ProviderPolicy {
        let mut p = ProviderPolicy::for_tests(&format!("http://{addr}"));
        p.allow_plain_http = true;
        p.allowed_networks = vec!["127.0.0.0/8".parse().expect("net")];
        p.allowed_methods = vec![Method::GET, Method::POST, Method::PUT];
        p.max_retries = 2;
        p.timeout = Duration::from_secs(10);
        p
    }

    #[tokio::test]
    async fn a_request_that_may_have_arrived_is_repeated_only_if_idempotent() {
        let (addr, seen) = upstream_that_hangs_up().await;
        let up = Upstream::new(loopback_policy(addr)).expect("upstream");
        let cred = Secret::new(b"credential-abcdefgh".to_vec());
        for (method, attempts) in [("POST", 1), ("GET", 3), ("PUT", 3)] {
            seen.store(0, std::sync::atomic::Ordering::SeqCst);
            let prepared = up
                .prepare(CallerRequest {
                    method: method.into(),
                    path: "/x".into(),
                    ..Default::default()
                })
                .expect("valid");
            let err = up.send(&prepared, &cred).await.expect_err(method);
            assert!(matches!(err, ProxyError::Unavailable(_)), "{method}: {err}");
            assert_eq!(
                seen.load(std::sync::atomic::Ordering::SeqCst),
                attempts,
                "{method}"
            );
        }
        // The token endpoint's POST is not repeated either.
        seen.store(0, std::sync::atomic::Ordering::SeqCst);
        let uri: Uri = format!("http://{addr}/token").parse().expect("uri");
        let err = up
            .post_form(&uri, None, Bytes::from_static(b"grant_type=refresh_token"))
            .await
            .expect_err("hung up");
        assert!(matches!(err, ProxyError::Unavailable(_)), "{err}");
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_connect_error_is_retried_for_any_method() {
        // A port that was just free: every connect is refused, so the request never left and
        // even a POST is repeated. Each attempt resolves the name once: count those.
        let addr = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let lookups = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let counter = Arc::clone(&lookups);
        let resolver: Resolver = Arc::new(move |_, _| {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Box::pin(async move { Ok(vec![addr]) })
        });
        let mut policy = loopback_policy(addr);
        policy.base = format!("http://upstream.test:{}/", addr.port())
            .parse()
            .expect("uri");
        policy.allowed_hosts = vec!["upstream.test".into()];
        let up = Upstream::with_resolver(policy, resolver).expect("upstream");
        let prepared = up
            .prepare(CallerRequest {
                method: "POST".into(),
                path: "/x".into(),
                ..Default::default()
            })
            .expect("valid");
        let err = up
            .send(&prepared, &Secret::new(b"credential-abcdefgh".to_vec()))
            .await
            .expect_err("refused");
        assert!(matches!(err, ProxyError::Unavailable(_)), "{err}");
        assert_eq!(lookups.load(std::sync::atomic::Ordering::SeqCst), 3);
    }

    #[test]
    fn bad_ca_files_are_refused_at_start() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut p = ProviderPolicy::for_tests("https://api.example.com");
        p.ca_file = Some(tmp.path().join("missing.pem"));
        let err = Upstream::new(p.clone()).expect_err("missing").to_string();
        assert!(err.starts_with("reading ca_file"), "{err}");
        let empty = tmp.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        p.ca_file = Some(empty);
        let err = Upstream::new(p).expect_err("empty").to_string();
        assert!(err.ends_with("holds no certificate"), "{err}");
    }

    #[test]
    fn redacts_reflected_credentials() {
        let mut r = UpstreamResponse {
            status: 200,
            headers: vec![("x-echo".into(), b"Bearer tok_abcdefgh".to_vec())],
            body: Bytes::from_static(
                b"{\"auth\":\"Bearer tok_abcdefgh\",\"again\":\"tok_abcdefgh\"}",
            ),
        };
        redact(&mut r, b"tok_abcdefgh");
        assert_eq!(
            &r.body[..],
            b"{\"auth\":\"Bearer [REDACTED]\",\"again\":\"[REDACTED]\"}"
        );
        assert_eq!(r.headers[0].1, b"Bearer [REDACTED]");
    }

    #[test]
    fn prepare_strips_credential_and_hop_by_hop_headers() {
        let up = Upstream::new(ProviderPolicy::for_tests("https://api.example.com")).expect("up");
        let h = |n: &str, v: &str| (n.to_string(), v.as_bytes().to_vec());
        let prepared = up
            .prepare(CallerRequest {
                method: "get".into(),
                path: "/user".into(),
                headers: vec![
                    h("Authorization", "Bearer mine"),
                    h("Cookie", "s=1"),
                    h("Proxy-Authorization", "x"),
                    h("Connection", "close, x-hop"),
                    h("X-Hop", "1"),
                    h("Host", "evil.example"),
                    h("Transfer-Encoding", "chunked"),
                    h("X-Forwarded-For", "1.2.3.4"),
                    h("Accept", "application/json"),
                ],
                body: vec![],
            })
            .expect("valid");
        let names: Vec<&str> = prepared.headers.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, vec!["accept"]);
        assert_eq!(prepared.method, Method::GET);
        let err = up
            .prepare(CallerRequest {
                method: "DELETE".into(),
                path: "/user".into(),
                ..Default::default()
            })
            .expect_err("method");
        assert!(err.to_string().contains("method DELETE is not allowed"));
        let err = up
            .prepare(CallerRequest {
                method: "GET".into(),
                path: "/user".into(),
                headers: vec![("bad header".into(), b"x".to_vec())],
                body: vec![],
            })
            .expect_err("header");
        assert_eq!(err.to_string(), "headers[0]: invalid name");
    }
}
