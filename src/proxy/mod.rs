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

/// Builds the TLS configuration: the provider's CA file, or the bundled Mozilla roots.
fn tls_config(policy: &ProviderPolicy) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    match &policy.ca_file {
        Some(path) => {
            let pem = std::fs::read(path)
                .map_err(|e| format!("reading ca_file {}: {e}", path.display()))?;
            let mut any = false;
            for cert in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|e| format!("ca_file {}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
                any = true;
            }
            if !any {
                return Err(format!("ca_file {} holds no certificate", path.display()));
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

use rustls::pki_types::pem::PemObject as _;

impl Upstream {
    /// A client for `policy` using the system resolver.
    pub fn new(policy: ProviderPolicy) -> Result<Self, String> {
        Self::with_resolver(policy, connect::system_resolver())
    }

    /// A client for `policy` resolving names with `resolver`.
    pub fn with_resolver(policy: ProviderPolicy, resolver: Resolver) -> Result<Self, String> {
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
        target::check_url(&self.policy, uri).map_err(ProxyError::Refused)?;
        let mut headers = http::HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        headers.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        let prepared = Prepared {
            method: Method::POST,
            uri: uri.clone(),
            headers,
            body,
        };
        self.execute(prepared, auth.map(|a| (header::AUTHORIZATION, a)), false)
            .await
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
                    Err(ProxyError::Unavailable(_)) => Some(backoff(retries)),
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
                let response = outcome?;
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
    ) -> Result<UpstreamResponse, ProxyError> {
        let p = &*self.policy;
        let mut request = Request::builder()
            .method(prepared.method.clone())
            .uri(prepared.uri.clone())
            .body(Full::new(prepared.body.clone()))
            .map_err(|e| ProxyError::BadRequest(e.to_string()))?;
        *request.headers_mut() = prepared.headers.clone();
        if let Some((name, value)) = credential {
            request.headers_mut().insert(name.clone(), value.clone());
        }
        let response =
            self.client
                .request(request)
                .await
                .map_err(|e| match find_connect_error(&e) {
                    Some(ConnectError::Refused(r)) => ProxyError::Refused(r.clone()),
                    Some(ConnectError::Failed(m)) => ProxyError::Unavailable(m.clone()),
                    None => ProxyError::Unavailable(describe(&e)),
                })?;
        let (parts, body) = response.into_parts();
        let max = p.max_response_bytes;
        if parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<usize>().ok())
            .is_some_and(|len| len > max)
        {
            return Err(ProxyError::ResponseTooLarge { max });
        }
        let body = Limited::new(body, max)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    ProxyError::ResponseTooLarge { max }
                } else {
                    ProxyError::Unavailable(format!("reading the response: {e}"))
                }
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

/// Exponential backoff with full jitter: up to 100 ms, 200 ms, 400 ms, ...
fn backoff(retries: u32) -> Duration {
    use rand::Rng as _;
    let cap = 100u64.saturating_mul(1 << retries.min(6));
    Duration::from_millis(rand::thread_rng().gen_range(cap / 2..=cap))
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
    pub fn new<'a>(policies: impl IntoIterator<Item = &'a ProviderPolicy>) -> Result<Self, String> {
        let mut by_name = HashMap::new();
        for p in policies {
            let upstream =
                Upstream::new(p.clone()).map_err(|e| format!("provider {}: {e}", p.name))?;
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
    fn bad_ca_files_are_refused_at_start() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let mut p = ProviderPolicy::for_tests("https://api.example.com");
        p.ca_file = Some(tmp.path().join("missing.pem"));
        let err = Upstream::new(p.clone()).expect_err("missing");
        assert!(err.starts_with("reading ca_file"), "{err}");
        let empty = tmp.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").expect("write");
        p.ca_file = Some(empty);
        let err = Upstream::new(p).expect_err("empty");
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
