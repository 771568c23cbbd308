//! The HTTP/JSON adapter of `Ingest`, served next to gRPC on the same listeners, for web tiers
//! that do not speak gRPC (README, "HTTP/JSON for web tiers"): `GET /v1/public-keys`,
//! `POST /v1/records`, `POST /v1/records:batch`, `POST /v1/code-exchange`, the push
//! receiver of provider security events (RFC 8935), `POST /v1/security-events`, which the
//! event's signature authorizes rather than a credential, and `GET /v1/health`, the gRPC
//! health status for load balancers that check over HTTP (HAProxy), which needs none. On the
//! main listener only, `Broker` for workers: `POST /v1/records/{id}:token` (GetToken) and
//! `POST /v1/proxy`, behind the gRPC `Broker`'s own guard (the worker role).
//!
//! Owns: the routes and [`http_status`], the one mapping from a gRPC code to an HTTP status.
//! Bodies are the proto3 JSON mapping of the same `Ingest` messages (lowerCamelCase names,
//! proto names accepted too, 64-bit integers as strings, bytes as base64, enums by name),
//! generated with the messages (`tokenvault-proto`, pbjson), not written here.
//!
//! Must never: hold use-case logic. A handler authenticates with the very `RoleGuard` the gRPC
//! `Ingest` service uses (same credentials, caller policy, rate limit and audit of refusals),
//! decodes the body into the proto message, converts it as the gRPC adapter does, makes one
//! vault call and encodes the answer. Errors go through the same `VaultError` → gRPC code
//! mapping, then [`http_status`]; a message never echoes a value from the body.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use http::StatusCode;
use tonic::Code;

use super::auth::RoleGuard;
use super::ingest::exchanged;
use super::status::VaultError;
use crate::api::v1;
use crate::vault::{CodeExchange, SealedRecord, Vault};

/// What every handler needs.
#[derive(Clone)]
struct Http {
    vault: Arc<Vault>,
    guard: RoleGuard,
    /// The `Broker` routes' guard (the worker role), on the main listener only.
    broker: Option<RoleGuard>,
    max_body: usize,
    /// Whether the daemon serves: what its gRPC health service says for `""`.
    serving: tokio::sync::watch::Receiver<bool>,
}

/// The HTTP status of a gRPC code: each code the daemon answers with has its own status
/// (README's table). `ABORTED` (a stale `expectedVersion`) is 412, as a failed `If-Match` is;
/// `FAILED_PRECONDITION` (the state forbids it) is 422.
pub fn http_status(code: Code) -> StatusCode {
    match code {
        Code::Ok => StatusCode::OK,
        Code::InvalidArgument | Code::OutOfRange => StatusCode::BAD_REQUEST,
        Code::Unauthenticated => StatusCode::UNAUTHORIZED,
        Code::PermissionDenied => StatusCode::FORBIDDEN,
        Code::NotFound => StatusCode::NOT_FOUND,
        Code::AlreadyExists => StatusCode::CONFLICT,
        Code::Aborted => StatusCode::PRECONDITION_FAILED,
        Code::FailedPrecondition => StatusCode::UNPROCESSABLE_ENTITY,
        Code::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        Code::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        Code::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        Code::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        Code::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        Code::Internal | Code::Unknown | Code::DataLoss => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A refusal as HTTP: `{"code": "ALREADY_EXISTS", "message": "..."}` with its status. The
/// code also goes into the response's extensions, where the metrics layer counts it.
/// A structured detail (a stale version's `google.rpc.ErrorInfo`) is in `details`, as the
/// proto3 JSON mapping of `google.rpc.Status` writes it.
fn error_response(status: &tonic::Status) -> Response {
    use tonic_types::StatusExt as _;
    let mut body = serde_json::json!({
        "code": super::status::code_name(status.code()),
        "message": status.message(),
    });
    if let Some(info) = status.get_details_error_info() {
        body["details"] = serde_json::json!([{
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": info.reason,
            "domain": info.domain,
            "metadata": info.metadata,
        }]);
    }
    let mut response = json_response(http_status(status.code()), &body, status.code());
    if let Some(delay) = status.get_details_retry_info().and_then(|r| r.retry_delay) {
        // Retry-After counts whole seconds: a shorter wait is rounded up.
        let seconds = delay.as_secs() + u64::from(delay.subsec_nanos() > 0);
        response
            .headers_mut()
            .insert(http::header::RETRY_AFTER, http::HeaderValue::from(seconds));
    }
    response
}

/// `200` with `body`: a generated message in the proto3 JSON mapping, or a small JSON value.
fn ok_json(body: &impl serde::Serialize) -> Response {
    json_response(StatusCode::OK, body, Code::Ok)
}

fn json_response(status: StatusCode, body: &impl serde::Serialize, code: Code) -> Response {
    let (status, body, code) = match serde_json::to_string(body) {
        Ok(text) => (status, text, code),
        // Neither a JSON value nor a generated message fails to encode; if one ever did,
        // nothing of it is echoed.
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            r#"{"code":"INTERNAL","message":"the response could not be encoded"}"#.to_string(),
            Code::Internal,
        ),
    };
    let mut response = (
        status,
        [(http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response();
    response.extensions_mut().insert(code);
    response
}

/// The routes: `Ingest`'s for `guard`'s callers (the ingest role), and with `broker` (the
/// worker role's guard; the main listener only) `Broker`'s `GetToken` and `Proxy`.
pub(super) fn router(
    vault: Arc<Vault>,
    guard: RoleGuard,
    broker: Option<RoleGuard>,
    max_body: usize,
    serving: tokio::sync::watch::Receiver<bool>,
) -> Router {
    let serves_broker = broker.is_some();
    let state = Http {
        vault,
        guard,
        broker,
        max_body,
        serving,
    };
    let router = Router::new();
    let router = if serves_broker {
        router
            .route(
                "/v1/records/{*name}",
                post(record_method).fallback(method_not_allowed),
            )
            .route("/v1/proxy", post(proxy).fallback(method_not_allowed))
    } else {
        router
    };
    router
        .route("/v1/health", get(health).fallback(method_not_allowed))
        .route(
            "/v1/public-keys",
            get(public_keys).fallback(method_not_allowed),
        )
        .route("/v1/records", post(put_record).fallback(method_not_allowed))
        .route(
            "/v1/records:batch",
            post(put_batch).fallback(method_not_allowed),
        )
        .route(
            "/v1/code-exchange",
            post(exchange_code).fallback(method_not_allowed),
        )
        .route(
            "/v1/security-events",
            post(security_event_push).fallback(method_not_allowed),
        )
        .route(
            "/v1/providers/{provider}/unlink",
            post(unlink_callback)
                .get(unlink_callback)
                .fallback(method_not_allowed),
        )
        .route("/v1/{*rest}", any(not_found))
        .with_state(state)
}

/// Marks a response to a request no route took, so metrics count it under `unknown` rather
/// than its path (which the client chose).
#[derive(Debug, Clone, Copy)]
pub struct Unrouted;

async fn method_not_allowed() -> Response {
    let mut r = error_response(&tonic::Status::unimplemented(
        "this route does not take that method",
    ));
    *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
    r.extensions_mut().insert(Unrouted);
    r
}

async fn not_found() -> Response {
    let mut r = error_response(&tonic::Status::not_found(
        "no such route; the HTTP routes are GET /v1/public-keys, POST /v1/records, POST /v1/records:batch, POST /v1/code-exchange, POST /v1/security-events, GET /v1/health and, on the main listener, POST /v1/records/{id}:token and POST /v1/proxy",
    ));
    r.extensions_mut().insert(Unrouted);
    r
}

/// Authenticates like the gRPC `Ingest` service; returns the vault's caller and the body.
async fn admit(s: &Http, req: Request) -> Result<(crate::vault::Caller, bytes::Bytes), Refusal> {
    admit_as(s, &s.guard, req, true).await
}

/// Authenticates with `guard` (the gRPC service's own); returns the vault's caller and the
/// body, read up to `max_request_bytes` if the method is POST. `json_only`: a POST must say
/// `application/json`; otherwise only a body that is not empty must.
async fn admit_as(
    s: &Http,
    guard: &RoleGuard,
    req: Request,
    json_only: bool,
) -> Result<(crate::vault::Caller, bytes::Bytes), Refusal> {
    let (parts, body) = req.into_parts();
    let json = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/json"))
        });
    let needs_body = parts.method == http::Method::POST;
    let empty = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .is_some_and(|v| v.as_bytes() == b"0")
        || (!parts.headers.contains_key(http::header::CONTENT_LENGTH)
            && !parts.headers.contains_key(http::header::TRANSFER_ENCODING));
    let caller = match guard.admit(&parts.headers, &parts.extensions).await {
        Ok(caller) => caller,
        Err(refusal) => {
            // Nothing the client sent is kept while a throttled answer is held.
            drop(body);
            let status = refusal.answer().await;
            return Err(before_body(&parts, error_response(&status)));
        }
    };
    let caller = crate::vault::Caller::new(caller.name, caller.policy);
    if !needs_body || (!json_only && empty) {
        return Ok((caller, bytes::Bytes::new()));
    }
    if !json {
        return Err(before_body(
            &parts,
            error_response(&tonic::Status::invalid_argument(
                "content-type must be application/json",
            )),
        ));
    }
    let bytes = axum::body::to_bytes(body, s.max_body).await.map_err(|e| {
        let too_large = std::error::Error::source(&e)
            .is_some_and(|s| s.is::<http_body_util::LengthLimitError>())
            || e.to_string().contains("length limit");
        if too_large {
            // RESOURCE_EXHAUSTED as over gRPC, but 413, which HTTP clients know means "do
            // not retry the same body" (429 would invite a retry).
            let mut r = error_response(&tonic::Status::resource_exhausted(format!(
                "request too large: the body is over max_request_bytes ({} bytes)",
                s.max_body
            )));
            *r.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
            Box::new(r)
        } else {
            Box::new(error_response(&tonic::Status::invalid_argument(
                "the request body could not be read",
            )))
        }
    })?;
    Ok((caller, bytes))
}

/// [`admit`], then [`decode`] of the body.
async fn admit_json<T: serde::de::DeserializeOwned>(
    s: &Http,
    req: Request,
) -> Result<(crate::vault::Caller, T), Refusal> {
    let (caller, body) = admit(s, req).await?;
    Ok((caller, decode(&body)?))
}

/// A refusal answered before the request's body was read. Over HTTP/1.1 the unread body would
/// be taken for the next request, so hyper closes the connection after the response: the
/// response says so (`Connection: close`), or a client that reuses connections (Python's
/// `requests.Session`) sends its next request into a closed socket. Reading the body instead
/// would let an unauthenticated client make the daemon read up to `max_request_bytes`.
fn before_body(parts: &http::request::Parts, mut response: Response) -> Refusal {
    let has_body = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .is_some_and(|v| v.as_bytes() != b"0")
        || parts.headers.contains_key(http::header::TRANSFER_ENCODING);
    if has_body && parts.version <= http::Version::HTTP_11 {
        response.headers_mut().insert(
            http::header::CONNECTION,
            http::HeaderValue::from_static("close"),
        );
    }
    Box::new(response)
}

/// Decodes a JSON body, with a message that says where it is wrong (the field's path, line and
/// column) but never echoes a value.
fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Refusal> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut de)
        .map_err(|e| (Some(e.path().to_string()), e.into_inner()))
        .and_then(|value| de.end().map(|()| value).map_err(|e| (None, e)))
        .map_err(|(path, e)| {
            Box::new(error_response(&tonic::Status::invalid_argument(
                json_error_message(path.as_deref(), &e),
            )))
        })
}

/// What a refused body is told. serde's own text can quote the offending value (a string in
/// quotes, a number or boolean in backticks) and a decoder's custom text can carry part of it
/// (base64's "Invalid symbol 42, offset 7"): such text is cut to what was expected, which comes
/// from the message types, not from the body.
fn json_error_message(path: Option<&str>, e: &serde_json::Error) -> String {
    let at = format!("line {} column {}", e.line(), e.column());
    let text = e.to_string();
    let text = text.split(" at line ").next().unwrap_or(&text);
    if e.is_syntax() || e.is_eof() {
        return format!("invalid JSON: {text} at {at}");
    }
    let place = match path {
        Some(p) if p != "." && !p.is_empty() => format!("{p} ({at})"),
        _ => at,
    };
    let echoes = text.contains(['"', '`']) || text.contains(|c: char| c.is_ascii_digit());
    if text.starts_with("unknown field") || !echoes {
        return format!("invalid JSON value at {place}: {text}");
    }
    match text.split_once(", expected ") {
        Some((_, expected)) if !expected.contains('"') => {
            format!("invalid JSON value at {place}: expected {expected}")
        }
        _ => format!("invalid JSON value at {place}"),
    }
}

/// A refused request's response (boxed: it is large and travels through `Result`s).
type Refusal = Box<Response>;

/// `200 {"status":"SERVING"}` or `503 {"status":"NOT_SERVING"}` (shutting down, or the
/// database does not answer), as `grpc.health.v1.Health/Check` answers for `""`. No
/// credential, no store access, no log line: it costs what a refused request costs.
async fn health(State(s): State<Http>) -> Response {
    if *s.serving.borrow() {
        ok_json(&serde_json::json!({ "status": "SERVING" }))
    } else {
        json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &serde_json::json!({ "status": "NOT_SERVING" }),
            Code::Unavailable,
        )
    }
}

async fn public_keys(State(s): State<Http>, req: Request) -> Response {
    if let Err(r) = admit(&s, req).await {
        return *r;
    }
    ok_json(&v1::PublicKeysResponse {
        active: Some((&s.vault.active_key()).into()),
    })
}

async fn put_record(State(s): State<Http>, req: Request) -> Response {
    let (caller, item) = match admit_json::<v1::PutSealedRequest>(&s, req).await {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let result = async {
        let item = SealedRecord::try_from(item)?;
        s.vault.put_sealed(&caller, item).await
    }
    .await;
    match result {
        Ok(version) => ok_json(&v1::PutSealedResponse { version }),
        Err(e) => error_response(&tonic::Status::from(e)),
    }
}

async fn put_batch(State(s): State<Http>, req: Request) -> Response {
    let (caller, batch) = match admit_json::<v1::PutSealedBatchRequest>(&s, req).await {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let result = async {
        s.vault.check_batch_size(batch.items.len())?;
        let items = batch
            .items
            .into_iter()
            .enumerate()
            .map(|(index, item)| SealedRecord::try_from(item).map_err(|e| e.at_item(index)))
            .collect::<Result<Vec<_>, _>>()?;
        s.vault.put_sealed_batch(&caller, items).await
    }
    .await;
    match result {
        Ok(versions) => ok_json(&v1::PutSealedBatchResponse { versions }),
        Err(e) => error_response(&tonic::Status::from(e)),
    }
}

async fn exchange_code(State(s): State<Http>, req: Request) -> Response {
    let (caller, item) = match admit_json::<v1::ExchangeCodeRequest>(&s, req).await {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let result = async {
        let req = CodeExchange::try_from(item)?;
        let id = req.meta.id.to_string();
        s.vault.exchange_code(&caller, req).await.map(|e| (id, e))
    }
    .await;
    match result {
        Ok((id, e)) => ok_json(&exchanged(&id, e)),
        Err(e) => error_response(&tonic::Status::from(e)),
    }
}

/// The route a response answered, for the metrics' `method` label in place of the path (which
/// holds a record id: never a label).
#[derive(Debug, Clone, Copy)]
pub struct Route(pub &'static str);

/// `POST /v1/records/{id}:token`: `Broker.GetToken` for the worker role. The body is empty or
/// `{}`. Answers `{"info": RecordInfo, "secret": base64}` with `Cache-Control: no-store`.
/// Any other `/v1/records/...` name is 404.
async fn record_method(
    State(s): State<Http>,
    axum::extract::Path(name): axum::extract::Path<String>,
    req: Request,
) -> Response {
    const ROUTE: Route = Route("/v1/records/{id}:token");
    let Some(id) = name.strip_suffix(":token").map(str::to_string) else {
        return not_found().await;
    };
    let Some(guard) = s.broker.clone() else {
        return not_found().await;
    };
    let mut response = async {
        let (caller, body) = admit_as(&s, &guard, req, false).await?;
        if !body.is_empty() {
            decode::<NoFields>(&body)?;
        }
        let result = async {
            let id = super::record_id(id)?;
            s.vault.get_token(&caller, &id).await
        }
        .await;
        Ok::<_, Refusal>(match result {
            Ok(released) => {
                let secret = zeroize::Zeroizing::new(base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD,
                    released.secret.expose_secret(),
                ));
                let info = v1::RecordInfo::from(&released.record);
                let mut r = ok_json(&serde_json::json!({ "info": info, "secret": *secret }));
                r.headers_mut().insert(
                    http::header::CACHE_CONTROL,
                    http::HeaderValue::from_static("no-store"),
                );
                r
            }
            Err(e) => error_response(&tonic::Status::from(e)),
        })
    }
    .await
    .unwrap_or_else(|r| *r);
    response.extensions_mut().insert(ROUTE);
    response
}

/// A JSON body that must be an object without fields (`{}`).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct NoFields {}

/// `ProxyRequest` as `POST /v1/proxy` reads it (the proto3 JSON mapping: lowerCamelCase or
/// proto names, bytes as base64). Written here rather than generated: the generated mapping
/// would also serialize the grant handle.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonProxyRequest {
    #[serde(default)]
    id: String,
    #[serde(default)]
    method: String,
    #[serde(default)]
    path: String,
    #[serde(default)]
    headers: Vec<v1::HttpHeader>,
    #[serde(default, with = "base64_bytes")]
    body: Vec<u8>,
    #[serde(default)]
    grant: zeroize::Zeroizing<String>,
}

/// proto3 JSON `bytes`: standard or URL-safe base64, padded or not.
mod base64_bytes {
    use base64::Engine as _;

    pub(super) fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(d)?;
        let text = text.trim_end_matches('=');
        base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(text)
            .or_else(|_| base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(text))
            .map_err(|_| serde::de::Error::custom("expected base64"))
    }
}

/// `POST /v1/proxy`: `Broker.Proxy` for the worker role; the body is the `ProxyRequest`, the
/// answer the `ProxyResponse` (the upstream's status, headers and base64 body).
async fn proxy(State(s): State<Http>, req: Request) -> Response {
    const ROUTE: Route = Route("/v1/proxy");
    let Some(guard) = s.broker.clone() else {
        return not_found().await;
    };
    let mut response = async {
        let (caller, body) = admit_as(&s, &guard, req, true).await?;
        let mut r: JsonProxyRequest = decode(&body)?;
        let request = v1::ProxyRequest {
            id: r.id,
            method: r.method,
            path: r.path,
            headers: r.headers,
            body: r.body,
            grant: std::mem::take(&mut *r.grant),
        };
        Ok::<_, Refusal>(
            match super::broker::proxy_call(&s.vault, &caller, request).await {
                Ok(answer) => ok_json(&answer),
                Err(e) => error_response(&tonic::Status::from(e)),
            },
        )
    }
    .await
    .unwrap_or_else(|r| *r);
    response.extensions_mut().insert(ROUTE);
    response
}

/// Largest unlink callback body read (three short form fields).
const MAX_UNLINK_BYTES: usize = 4096;

/// `GET|POST /v1/providers/{provider}/unlink`: a provider's unlink callback (Kakao's kind; the
/// parameters in the query or an `application/x-www-form-urlencoded` body). No credential of
/// ours: the provider's admin key authorizes. Every refusal but a replay counts against its
/// address as an unauthenticated refusal (no write, no log line), and an address past its
/// budget gets 429 before anything is read. 200 `{"revoked", "deleted"}` when applied.
async fn unlink_callback(
    State(s): State<Http>,
    axum::extract::Path(provider): axum::extract::Path<String>,
    req: Request,
) -> Response {
    use crate::vault::refusals::{RefusalReason, Source};
    use crate::vault::{UnlinkCall, UnlinkRefused};
    const ROUTE: Route = Route("/v1/providers/{provider}/unlink");
    let (parts, body) = req.into_parts();
    let refusals = s.vault.refusals();
    let ip = super::auth::remote_ip(&parts.extensions);
    let source = Source::of(ip);
    let mut response = async {
        if let Some(wait) = refusals.throttled(source, s.vault.monotonic_now()) {
            drop(body);
            refusals.hold(wait).await;
            return *before_body(&parts, error_response(&super::auth::throttled(wait)));
        }
        let refused = |status: tonic::Status| {
            refusals.refuse(
                source,
                RefusalReason::UnlinkCallbackRefused,
                s.vault.monotonic_now(),
            );
            error_response(&status)
        };
        let params = if parts.method == http::Method::POST {
            match axum::body::to_bytes(body, MAX_UNLINK_BYTES).await {
                Ok(b) => b.to_vec(),
                Err(_) => {
                    return refused(tonic::Status::invalid_argument(
                        "the body is not a readable form of at most 4 KiB",
                    ));
                }
            }
        } else {
            parts.uri.query().unwrap_or_default().as_bytes().to_vec()
        };
        let mut call = UnlinkCall {
            provider,
            authorization: parts
                .headers
                .get(http::header::AUTHORIZATION)
                .map(|v| crate::secret::Secret::new(v.as_bytes().to_vec())),
            source: ip,
            app_id: String::new(),
            user_id: String::new(),
            referrer: String::new(),
        };
        for (k, v) in form_urlencoded::parse(&params) {
            match &*k {
                "app_id" => call.app_id = v.into_owned(),
                "user_id" => call.user_id = v.into_owned(),
                "referrer_type" => call.referrer = v.into_owned(),
                _ => {}
            }
        }
        match s.vault.unlink_callback(call).await {
            Ok(Ok(outcome)) => ok_json(&serde_json::json!({
                "revoked": outcome.revoked,
                "deleted": outcome.deleted,
            })),
            Ok(Err(UnlinkRefused::NoCallback)) => refused(tonic::Status::not_found(
                "no such provider, or it has no unlink callback",
            )),
            Ok(Err(UnlinkRefused::Source)) => refused(tonic::Status::permission_denied(
                "this address may not send this provider's unlink callbacks",
            )),
            Ok(Err(UnlinkRefused::Credential)) => refused(tonic::Status::unauthenticated(
                "the app id or admin key does not match",
            )),
            Ok(Err(UnlinkRefused::Malformed(why))) => refused(tonic::Status::invalid_argument(why)),
            Ok(Err(UnlinkRefused::Replayed)) => error_response(&tonic::Status::already_exists(
                "this user's unlink callback was applied within the last minute",
            )),
            Err(e) => error_response(&tonic::Status::from(e)),
        }
    }
    .await;
    response.extensions_mut().insert(ROUTE);
    response
}

/// Largest Security Event Token accepted, as over gRPC.
const MAX_SET_BYTES: usize = 64 * 1024;

/// An RFC 8935 §2.3 error: 400 with `{"err": ..., "description": ...}`.
fn set_error(err: &str, description: &str, code: Code) -> Response {
    json_response(
        StatusCode::BAD_REQUEST,
        &serde_json::json!({ "err": err, "description": description }),
        code,
    )
}

/// RFC 8935 push delivery: the provider (or a web tier or load balancer forwarding its push
/// as is) posts one SET as `application/secevent+jwt`. No credential: the issuer's signature
/// authorizes, and the same verification and replay marker as `Admin.SecurityEvent` apply. An
/// applied event is audited with its change; a refused push is not (it is unauthenticated):
/// it is counted and summarized ([`crate::vault::refusals`]), and an address that keeps
/// sending refused pushes gets 429 with `Retry-After` before its body is read. 202 when
/// applied; 400 with an RFC 8935 `err` code otherwise.
async fn security_event_push(State(s): State<Http>, req: Request) -> Response {
    use crate::vault::refusals::{RefusalReason, Source};
    let (parts, body) = req.into_parts();
    // No credential authorizes a push, so every refusal counts against its address, and an
    // address past its budget is refused before anything is read or verified.
    let refusals = s.vault.refusals();
    let source = Source::of(super::auth::remote_ip(&parts.extensions));
    if let Some(wait) = refusals.throttled(source, s.vault.monotonic_now()) {
        // Nothing the client sent is kept while the answer is held.
        drop(body);
        refusals.hold(wait).await;
        return *before_body(&parts, error_response(&super::auth::throttled(wait)));
    }
    let refused = |reason, err, description: &str, code| {
        refusals.refuse(source, reason, s.vault.monotonic_now());
        set_error(err, description, code)
    };
    let set_type = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| t.trim().eq_ignore_ascii_case("application/secevent+jwt"));
    if !set_type {
        return *before_body(
            &parts,
            refused(
                RefusalReason::SecurityEventRefused,
                "invalid_request",
                "Content-Type must be application/secevent+jwt",
                Code::InvalidArgument,
            ),
        );
    }
    let Ok(bytes) = axum::body::to_bytes(body, MAX_SET_BYTES).await else {
        return refused(
            RefusalReason::SecurityEventRefused,
            "invalid_request",
            "the body is not a readable SET of at most 64 KiB",
            Code::InvalidArgument,
        );
    };
    let Ok(token) = String::from_utf8(bytes.to_vec()) else {
        return refused(
            RefusalReason::SecurityEventRefused,
            "invalid_request",
            "the SET is not UTF-8",
            Code::InvalidArgument,
        );
    };
    match s.vault.security_event_push(token.trim().to_string()).await {
        Ok(_) => {
            let mut r = StatusCode::ACCEPTED.into_response();
            r.extensions_mut().insert(Code::Ok);
            r
        }
        Err(e) => {
            use crate::security_event::SetError;
            let (err, code, reason) = match &e {
                VaultError::SecurityEvent(
                    SetError::Signature | SetError::Algorithm(_) | SetError::UnknownKid,
                ) => (
                    "invalid_key",
                    Code::PermissionDenied,
                    RefusalReason::SecurityEventRefused,
                ),
                VaultError::SecurityEvent(SetError::UnknownIssuer) => (
                    "invalid_issuer",
                    Code::PermissionDenied,
                    RefusalReason::SecurityEventRefused,
                ),
                VaultError::SecurityEvent(SetError::Claim(c)) if c.starts_with("aud ") => (
                    "invalid_audience",
                    Code::PermissionDenied,
                    RefusalReason::SecurityEventRefused,
                ),
                VaultError::SecurityEvent(_) => (
                    "invalid_request",
                    Code::InvalidArgument,
                    RefusalReason::SecurityEventRefused,
                ),
                // A replayed jti: refused, as over gRPC.
                VaultError::Store(crate::store::StoreError::AlreadyExists(_)) => (
                    "invalid_request",
                    Code::AlreadyExists,
                    RefusalReason::SecurityEventReplayed,
                ),
                _ => return error_response(&tonic::Status::from(e)),
            };
            refused(reason, err, &e.to_string(), code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_its_own_status_except_the_internal_ones() {
        use std::collections::HashMap;
        let answered = [
            Code::InvalidArgument,
            Code::Unauthenticated,
            Code::PermissionDenied,
            Code::NotFound,
            Code::AlreadyExists,
            Code::Aborted,
            Code::FailedPrecondition,
            Code::ResourceExhausted,
            Code::Unimplemented,
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Internal,
        ];
        let mut seen = HashMap::new();
        for c in answered {
            assert!(
                seen.insert(http_status(c), c).is_none(),
                "{c:?} shares {} with {:?}",
                http_status(c),
                seen[&http_status(c)]
            );
            assert_eq!(
                crate::server::status::code_name(c)
                    .replace('_', "")
                    .to_ascii_lowercase(),
                format!("{c:?}").to_ascii_lowercase()
            );
        }
    }

    /// The request bodies, read by the generated proto3 JSON decoders as other parsers write
    /// them.
    #[test]
    fn proto3_json_is_read_as_parsers_write_it() {
        let body = |kind: &str, envelope: &str| {
            format!(
                r#"{{"record": {{"meta": {{"id": "a", "owner": "o", "provider": "p",
                    "kind": {kind}, "expires_at": "17"}}, "envelope": "{envelope}"}},
                    "expectedVersion": 3}}"#
            )
        };
        // Standard and URL-safe base64, padded or not, and a slash escaped as PHP's
        // json_encode writes it by default.
        for (envelope, bytes) in [
            ("AQID", vec![1, 2, 3]),
            ("_-8", vec![0xff, 0xef]),
            ("/+8=", vec![0xff, 0xef]),
            (r"\/+8", vec![0xff, 0xef]),
        ] {
            let req = decode::<v1::PutSealedRequest>(
                body("\"SECRET_KIND_REFRESH_TOKEN\"", envelope).as_bytes(),
            )
            .unwrap_or_else(|_| panic!("{envelope} is read"));
            assert_eq!(req.expected_version, 3);
            let rec = req.record.expect("record");
            assert_eq!(rec.envelope, bytes, "{envelope}");
            let meta = rec.meta.expect("meta");
            assert_eq!(meta.kind, v1::SecretKind::RefreshToken as i32);
            assert_eq!(meta.expires_at, 17);
        }
        // An enum by number, as proto3 JSON allows.
        let req = decode::<v1::PutSealedRequest>(body("2", "AQID").as_bytes())
            .unwrap_or_else(|_| panic!("a kind by number is read"));
        assert_eq!(
            req.record.and_then(|r| r.meta).map(|m| m.kind),
            Some(v1::SecretKind::RefreshToken as i32)
        );
        // What is not the message is refused: bad base64, a field it does not have.
        for bad in [
            body("2", "!!"),
            r#"{"record": {}, "expectedVersion": 1, "extra": 1}"#.to_string(),
            r#"{"items": []}"#.to_string(),
        ] {
            assert!(
                decode::<v1::PutSealedRequest>(bad.as_bytes()).is_err(),
                "{bad} is refused"
            );
        }
    }

    /// The responses are proto3 JSON with every field present, defaults included: what
    /// docs/WEB_TIER.md shows, and what clients written from it read.
    #[test]
    fn responses_are_proto3_json_with_every_field() {
        fn json(m: &impl serde::Serialize) -> serde_json::Value {
            serde_json::to_value(m).expect("encode")
        }
        assert_eq!(
            json(&v1::PutSealedResponse { version: 3 }),
            serde_json::json!({ "version": "3" })
        );
        assert_eq!(
            json(&v1::PutSealedBatchResponse {
                versions: vec![1, u64::MAX]
            }),
            serde_json::json!({ "versions": ["1", "18446744073709551615"] })
        );
        assert_eq!(
            json(&v1::ExchangeCodeResponse {
                id: "a".into(),
                version: 1,
                expires_at: 0,
                scopes: vec![],
            }),
            serde_json::json!({ "id": "a", "version": "1", "expiresAt": "0", "scopes": [] })
        );
        assert_eq!(
            json(&v1::PublicKeysResponse {
                active: Some(v1::PublicKey {
                    version: 2,
                    fingerprint: "ab".into(),
                    spki_pem: "PEM".into(),
                    state: v1::KeyState::Active as i32,
                    created_at: 5,
                    destroy_after: 0,
                    algorithm: "x-wing".into(),
                    public_key: vec![0xfb, 0xff],
                }),
            }),
            serde_json::json!({ "active": {
                "version": 2, "fingerprint": "ab", "spkiPem": "PEM",
                "state": "KEY_STATE_ACTIVE", "createdAt": "5", "destroyAfter": "0",
                "algorithm": "x-wing", "publicKey": "+/8=",
            } })
        );
    }

    /// The message of a refused body.
    fn refusal(body: &[u8]) -> String {
        let r = *decode::<v1::PutSealedBatchRequest>(body).expect_err("refused");
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let bytes = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
            .block_on(axum::body::to_bytes(r.into_body(), 1 << 16))
            .expect("body");
        let json: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        json["message"].as_str().expect("message").to_string()
    }

    #[test]
    fn json_errors_say_where_without_the_value() {
        for (body, place, said, value) in [
            (
                &br#"{"items": [{}, {"record": {"meta": {"owner": 5}}}]}"#[..],
                "items[1].record.meta.owner (line 1 column 46)",
                "expected a string",
                "5}",
            ),
            (
                br#"{"items": [{"expectedVersion": "alice@example.com"}]}"#,
                "items[0].expectedVersion",
                "invalid digit",
                "alice",
            ),
            (
                br#"{"items": [{"record": {"envelope": "AQ*D"}}]}"#,
                "items[0].record.envelope",
                "",
                "AQ",
            ),
            (
                br#"{"items": [{"record": {"meta": {"kind": "SECRET_KIND_BOGUS"}}}]}"#,
                "items[0].record.meta.kind",
                "expected one of `SECRET_KIND_UNSPECIFIED`",
                "BOGUS",
            ),
            (
                br#"{"items": [], "extra": 31337}"#,
                "extra",
                "unknown field `extra`",
                "31337",
            ),
            (
                br#"{"items": []} xyzzy"#,
                "",
                "trailing characters",
                "xyzzy",
            ),
            (
                br#"{"items": [nope]}"#,
                "",
                "expected ident at line 1 column 13",
                "nope",
            ),
        ] {
            let m = refusal(body);
            assert!(m.starts_with("invalid JSON"), "{m}");
            assert!(m.contains(place) && m.contains(said), "{m}");
            assert!(!m.contains(value), "{m} echoes {value}");
        }
    }

    #[test]
    fn json_errors_echo_no_number_or_boolean_either() {
        let message = |body: &[u8]| -> String {
            let items = format!(r#"{{"items": [{}]}}"#, String::from_utf8_lossy(body));
            refusal(items.as_bytes())
        };
        for (body, value) in [
            (
                &br#"{"record": {"meta": {"owner": 987654321}}}"#[..],
                "987654321",
            ),
            (br#"{"record": {"meta": {"owner": true}}}"#, "true"),
            (br#"{"record": {"meta": {"owner": -4.5e3}}}"#, "4500"),
            (br#"{"record": {"envelope": 31337}}"#, "31337"),
            (br#"{"expectedVersion": false}"#, "false"),
        ] {
            let m = message(body);
            assert!(m.starts_with("invalid JSON"), "{m}");
            assert!(!m.contains(value) && !m.contains('`'), "{m}");
        }
        // What was expected is still said: it comes from the message types, not the body.
        assert!(
            message(br#"{"record": {"meta": {"owner": 987654321}}}"#)
                .ends_with("expected a string"),
        );
    }
}
