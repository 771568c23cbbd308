//! A fake OAuth provider on 127.0.0.1: an API that checks the bearer token and an OAuth 2.0
//! token endpoint that issues rotating refresh tokens and rejects a reused one.
#![allow(dead_code, reason = "each test binary uses a different part")]

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

pub const CLIENT_ID: &str = "tv-client";
pub const CLIENT_SECRET: &str = "tv-client-secret-0123456789";

#[derive(Debug)]
pub struct ProviderState {
    /// The access token `/api/me` accepts.
    pub access: String,
    /// The refresh token the token endpoint accepts (one use each: rotated on success).
    pub refresh: String,
    pub generation: u32,
    /// Successful refreshes.
    pub refreshes: u32,
    /// All token endpoint requests.
    pub token_requests: u32,
    /// Headers of the last API request (lowercase names).
    pub last_headers: Vec<(String, String)>,
    /// Requests per path.
    pub hits: HashMap<String, u32>,
    /// Delay before the token endpoint answers.
    pub token_delay: Duration,
    /// Leave `refresh_token` out of token responses.
    pub omit_refresh: bool,
    /// `/api/hold` answers only once it can take a permit from here (tests add them).
    pub gate: Arc<tokio::sync::Semaphore>,
    /// Authorization codes not yet redeemed: code → (PKCE S256 challenge, redirect URI).
    pub codes: HashMap<String, (String, String)>,
    /// Codes redeemed successfully.
    pub exchanges: u32,
    /// What `/jwks` serves (a security event issuer's key set).
    pub jwks: String,
}

#[derive(Clone)]
pub struct FakeProvider {
    pub addr: SocketAddr,
    pub state: Arc<Mutex<ProviderState>>,
}

impl FakeProvider {
    pub async fn start(access: &str, refresh: &str) -> Self {
        Self::serve(access, refresh, None).await
    }

    /// Serves https with the certificate chain and key given as PEM.
    pub async fn start_tls(access: &str, refresh: &str, cert_pem: &str, key_pem: &str) -> Self {
        use rustls::pki_types::pem::PemObject as _;
        let certs = rustls::pki_types::CertificateDer::pem_slice_iter(cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("certs");
        let key =
            rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).expect("key");
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server config");
        Self::serve(
            access,
            refresh,
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))),
        )
        .await
    }

    async fn serve(access: &str, refresh: &str, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(ProviderState {
            access: access.into(),
            refresh: refresh.into(),
            generation: 0,
            refreshes: 0,
            token_requests: 0,
            last_headers: Vec::new(),
            hits: HashMap::new(),
            token_delay: Duration::ZERO,
            omit_refresh: false,
            gate: Arc::new(tokio::sync::Semaphore::new(0)),
            codes: HashMap::new(),
            exchanges: 0,
            jwks: String::new(),
        }));
        let shared = Arc::clone(&state);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let _ = stream.set_nodelay(true);
                let state = Arc::clone(&shared);
                let tls = tls.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, Infallible>(handle(addr, state, req).await) }
                    });
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        Some(acceptor) => {
                            if let Ok(stream) = acceptor.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(stream), service).await;
                            }
                        }
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                    }
                });
            }
        });
        Self { addr, state }
    }

    /// What the provider's authorization endpoint does when the user consents: issues a
    /// one-time code bound to the request's PKCE challenge and redirect URI.
    pub fn issue_code(&self, challenge: &str, redirect_uri: &str) -> String {
        let code = format!("code-{}", rand::random::<u64>());
        self.lock().codes.insert(
            code.clone(),
            (challenge.to_string(), redirect_uri.to_string()),
        );
        code
    }

    pub fn lock(&self) -> std::sync::MutexGuard<'_, ProviderState> {
        self.state.lock().expect("lock")
    }

    /// Lets `n` held `/api/hold` requests answer.
    pub fn release(&self, n: usize) {
        self.lock().gate.add_permits(n);
    }

    pub fn hits(&self, path: &str) -> u32 {
        self.lock().hits.get(path).copied().unwrap_or(0)
    }

    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn reply(status: u16, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(body.into()))
        .expect("response")
}

async fn handle(
    addr: SocketAddr,
    state: Arc<Mutex<ProviderState>>,
    req: Request<hyper::body::Incoming>,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let headers: Vec<(String, String)> = req
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let auth = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let (hits, expected) = {
        let mut s = state.lock().expect("lock");
        let hits = {
            let h = s.hits.entry(path.clone()).or_default();
            *h += 1;
            *h
        };
        if path.starts_with("/api/") {
            s.last_headers = headers;
        }
        (hits, format!("Bearer {}", s.access))
    };
    if path == "/oauth/token" {
        return token(&state, &auth, &body).await;
    }
    if path == "/jwks" {
        let jwks = state.lock().expect("lock").jwks.clone();
        return reply(200, jwks);
    }
    let authorized = auth == expected;
    match path.as_str() {
        "/api/me" | "/api/upload" if authorized => reply(
            200,
            format!("{{\"user\":\"octocat\",\"received\":{}}}", body.len()),
        ),
        "/api/me" | "/api/upload" => reply(401, "{\"message\":\"Bad credentials\"}"),
        "/api/echo" => reply(200, format!("{{\"authorization\":\"{auth}\"}}")),
        "/api/redirect-same" => redirect("/api/me".into()),
        "/api/redirect-cross" => redirect(format!("http://localhost:{}/api/me", addr.port())),
        "/api/redirect-userinfo" => redirect(format!("http://x@{addr}/api/me")),
        "/api/redirect-loop" => redirect("/api/redirect-loop".into()),
        "/api/flaky" if hits == 1 => Response::builder()
            .status(429)
            .header("retry-after", "1")
            .body(Full::new(Bytes::new()))
            .expect("response"),
        "/api/flaky" => reply(200, "{\"ok\":true}"),
        "/api/busy" => Response::builder()
            .status(429)
            .header("retry-after", "3600")
            .body(Full::new(Bytes::from_static(
                b"{\"message\":\"slow down\"}",
            )))
            .expect("response"),
        "/api/error" => reply(500, "{\"message\":\"upstream exploded\"}"),
        "/api/slow" => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            reply(200, "{}")
        }
        "/api/hold" => {
            let gate = Arc::clone(&state.lock().expect("lock").gate);
            if let Ok(permit) = gate.acquire().await {
                permit.forget();
            }
            reply(200, "{}")
        }
        "/api/wait" => {
            tokio::time::sleep(Duration::from_millis(600)).await;
            reply(200, "{}")
        }
        "/api/big" => reply(200, vec![b'x'; 2 << 20]),
        _ => reply(404, "{\"message\":\"Not Found\"}"),
    }
}

/// The `authorization_code` grant (RFC 6749 §4.1.3) with PKCE (RFC 7636 §4.6): the code is
/// spent on first use, whatever the outcome; the redirect URI and the verifier must match.
fn code_grant(
    state: &Arc<Mutex<ProviderState>>,
    form: &HashMap<String, String>,
) -> Response<Full<Bytes>> {
    use base64::Engine as _;
    use sha2::Digest as _;
    let invalid = || reply(400, "{\"error\":\"invalid_grant\"}");
    let mut s = state.lock().expect("lock");
    let Some((challenge, redirect)) = form.get("code").and_then(|c| s.codes.remove(c)) else {
        return invalid();
    };
    let verifier = form.get("code_verifier").cloned().unwrap_or_default();
    let computed = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(sha2::Sha256::digest(verifier.as_bytes()));
    if form.get("redirect_uri") != Some(&redirect) || computed != challenge {
        return invalid();
    }
    s.exchanges += 1;
    s.generation += 1;
    s.access = format!("at-{}-{}", s.generation, rand::random::<u32>());
    s.refresh = format!("rt-{}-{}", s.generation, rand::random::<u32>());
    reply(
        200,
        format!(
            "{{\"access_token\":\"{}\",\"token_type\":\"Bearer\",\"expires_in\":3600,\"scope\":\"repo user\",\"refresh_token\":\"{}\"}}",
            s.access, s.refresh
        ),
    )
}

fn redirect(location: String) -> Response<Full<Bytes>> {
    Response::builder()
        .status(302)
        .header("location", location)
        .body(Full::new(Bytes::new()))
        .expect("response")
}

async fn token(
    state: &Arc<Mutex<ProviderState>>,
    auth: &str,
    body: &[u8],
) -> Response<Full<Bytes>> {
    use base64::Engine as _;
    let delay = {
        let mut s = state.lock().expect("lock");
        s.token_requests += 1;
        s.token_delay
    };
    tokio::time::sleep(delay).await;
    let form: HashMap<String, String> = form_urlencoded::parse(body).into_owned().collect();
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{CLIENT_ID}:{CLIENT_SECRET}"))
    );
    let client_ok = auth == basic
        || (form.get("client_id").map(String::as_str) == Some(CLIENT_ID)
            && form.get("client_secret").map(String::as_str) == Some(CLIENT_SECRET));
    if !client_ok {
        return reply(401, "{\"error\":\"invalid_client\"}");
    }
    if form.get("grant_type").map(String::as_str) == Some("authorization_code") {
        return code_grant(state, &form);
    }
    if form.get("grant_type").map(String::as_str) != Some("refresh_token") {
        return reply(400, "{\"error\":\"unsupported_grant_type\"}");
    }
    let mut s = state.lock().expect("lock");
    if form.get("refresh_token") != Some(&s.refresh) {
        return reply(
            400,
            "{\"error\":\"invalid_grant\",\"error_description\":\"refresh token reused or revoked\"}",
        );
    }
    s.generation += 1;
    s.refreshes += 1;
    s.access = format!("at-{}-{}", s.generation, rand::random::<u32>());
    let refresh = if s.omit_refresh {
        String::new()
    } else {
        s.refresh = format!("rt-{}-{}", s.generation, rand::random::<u32>());
        format!(",\"refresh_token\":\"{}\"", s.refresh)
    };
    reply(
        200,
        format!(
            "{{\"access_token\":\"{}\",\"token_type\":\"Bearer\",\"expires_in\":3600,\"scope\":\"repo user\"{refresh}}}",
            s.access
        ),
    )
}
