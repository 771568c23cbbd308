//! The HTTP/JSON adapter of `Ingest`, served next to gRPC on the same listeners, for web tiers
//! that do not speak gRPC (README, "HTTP/JSON for web tiers"): `GET /v1/public-keys`,
//! `POST /v1/records`, `POST /v1/records:batch`, `POST /v1/code-exchange`, the push
//! receiver of provider security events (RFC 8935), `POST /v1/security-events`, which the
//! event's signature authorizes rather than a credential, and `GET /v1/health`, the gRPC
//! health status for load balancers that check over HTTP (HAProxy), which needs none.
//!
//! Owns: the routes, their JSON (the proto3 JSON mapping of the same messages: lowerCamelCase
//! names, proto names accepted too, 64-bit integers as strings, bytes as base64, enums by name)
//! and [`http_status`], the one mapping from a gRPC code to an HTTP status.
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
use base64::Engine as _;
use http::StatusCode;
use serde::{Deserialize, Deserializer};
use tonic::Code;

use super::auth::RoleGuard;
use super::status::VaultError;
use crate::api::v1;
use crate::vault::{CodeExchange, SealedRecord, Vault};

/// What every handler needs.
#[derive(Clone)]
struct Http {
    vault: Arc<Vault>,
    guard: RoleGuard,
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

fn ok_json(value: serde_json::Value) -> Response {
    json_response(StatusCode::OK, &value, Code::Ok)
}

fn json_response(status: StatusCode, body: &serde_json::Value, code: Code) -> Response {
    let mut response = (
        status,
        [(http::header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response();
    response.extensions_mut().insert(code);
    response
}

/// The routes, for `role_guard`'s callers (the ingest role).
pub(super) fn router(
    vault: Arc<Vault>,
    guard: RoleGuard,
    max_body: usize,
    serving: tokio::sync::watch::Receiver<bool>,
) -> Router {
    let state = Http {
        vault,
        guard,
        max_body,
        serving,
    };
    Router::new()
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
        "no such route; the HTTP routes are GET /v1/public-keys, POST /v1/records, POST /v1/records:batch, POST /v1/code-exchange, POST /v1/security-events and GET /v1/health",
    ));
    r.extensions_mut().insert(Unrouted);
    r
}

/// Authenticates like the gRPC `Ingest` service; returns the vault's caller and the body.
async fn admit(s: &Http, req: Request) -> Result<(crate::vault::Caller, bytes::Bytes), Refusal> {
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
    let caller = s
        .guard
        .admit(&parts.headers, &parts.extensions)
        .await
        .map_err(|status| before_body(&parts, error_response(&status)))?;
    let caller = crate::vault::Caller::new(caller.name, caller.policy);
    if !needs_body {
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

/// Decodes a JSON body, with a message that says where it is wrong but never echoes a value.
fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, Refusal> {
    serde_json::from_slice(bytes).map_err(|e| {
        let message = e.to_string();
        let at = format!("line {} column {}", e.line(), e.column());
        let message = if (message.contains('"') || message.contains('`'))
            && !message.starts_with("unknown field")
        {
            // serde's text would quote the offending value: a string in quotes, a number or
            // boolean in backticks. What was expected comes from our own types.
            match message
                .split_once(", expected ")
                .map(|(_, e)| e.split(" at line ").next().unwrap_or(e))
            {
                Some(expected) if !expected.contains('"') => {
                    format!("invalid JSON value at {at}: expected {expected}")
                }
                _ => format!("invalid JSON value at {at}"),
            }
        } else if message.contains(" at line ") {
            format!("invalid JSON: {message}")
        } else {
            format!("invalid JSON: {message} at {at}")
        };
        Box::new(error_response(&tonic::Status::invalid_argument(message)))
    })
}

/// A refused request's response (boxed: it is large and travels through `Result`s).
type Refusal = Box<Response>;

/// `200 {"status":"SERVING"}` or `503 {"status":"NOT_SERVING"}` (shutting down, or the
/// database does not answer), as `grpc.health.v1.Health/Check` answers for `""`. No
/// credential, no store access, no log line: it costs what a refused request costs.
async fn health(State(s): State<Http>) -> Response {
    if *s.serving.borrow() {
        ok_json(serde_json::json!({ "status": "SERVING" }))
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
    let key: v1::PublicKey = (&s.vault.active_key()).into();
    ok_json(serde_json::json!({ "active": public_key_json(&key) }))
}

fn public_key_json(k: &v1::PublicKey) -> serde_json::Value {
    let state =
        v1::KeyState::try_from(k.state).map_or("KEY_STATE_UNSPECIFIED", |s| s.as_str_name());
    serde_json::json!({
        "version": k.version,
        "fingerprint": k.fingerprint,
        "spkiPem": k.spki_pem,
        "state": state,
        "createdAt": k.created_at.to_string(),
    })
}

async fn put_record(State(s): State<Http>, req: Request) -> Response {
    let (caller, item) = match admit_json::<JsonPutSealed>(&s, req).await {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let result = async {
        let item = SealedRecord::try_from(v1::PutSealedRequest::from(item))?;
        s.vault.put_sealed(&caller, item).await
    }
    .await;
    match result {
        Ok(version) => ok_json(serde_json::json!({ "version": version.to_string() })),
        Err(e) => error_response(&tonic::Status::from(e)),
    }
}

async fn put_batch(State(s): State<Http>, req: Request) -> Response {
    let (caller, batch) = match admit_json::<JsonBatch>(&s, req).await {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let result = async {
        s.vault.check_batch_size(batch.items.len())?;
        let items = batch
            .items
            .into_iter()
            .enumerate()
            .map(|(index, item)| {
                SealedRecord::try_from(v1::PutSealedRequest::from(item))
                    .map_err(|e| e.at_item(index))
            })
            .collect::<Result<Vec<_>, _>>()?;
        s.vault.put_sealed_batch(&caller, items).await
    }
    .await;
    match result {
        Ok(versions) => ok_json(serde_json::json!({
            "versions": versions.iter().map(u64::to_string).collect::<Vec<_>>()
        })),
        Err(e) => error_response(&tonic::Status::from(e)),
    }
}

async fn exchange_code(State(s): State<Http>, req: Request) -> Response {
    let (caller, item) = match admit_json::<JsonExchange>(&s, req).await {
        Ok(v) => v,
        Err(r) => return *r,
    };
    let result = async {
        let req = CodeExchange::try_from(v1::ExchangeCodeRequest {
            meta: item.meta.map(JsonRecordMeta::into_proto),
            code: item.code.to_string(),
            code_verifier: item.code_verifier.to_string(),
            redirect_uri: item.redirect_uri,
            expected_version: item.expected_version,
        })?;
        let id = req.meta.id.to_string();
        s.vault.exchange_code(&caller, req).await.map(|e| (id, e))
    }
    .await;
    match result {
        Ok((id, e)) => ok_json(serde_json::json!({
            "id": id,
            "version": e.version.to_string(),
            "expiresAt": e.expires_at.unwrap_or(0).to_string(),
            "scopes": e.scopes,
        })),
        Err(e) => error_response(&tonic::Status::from(e)),
    }
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

/// `ExchangeCodeRequest` in the proto3 JSON mapping.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonExchange {
    meta: Option<JsonRecordMeta>,
    #[serde(default)]
    code: zeroize::Zeroizing<String>,
    #[serde(default, rename = "codeVerifier", alias = "code_verifier")]
    code_verifier: zeroize::Zeroizing<String>,
    #[serde(default, rename = "redirectUri", alias = "redirect_uri")]
    redirect_uri: String,
    #[serde(
        default,
        rename = "expectedVersion",
        alias = "expected_version",
        deserialize_with = "uint64"
    )]
    expected_version: u64,
}

/// `PutSealedRequest` in the proto3 JSON mapping.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonPutSealed {
    record: Option<JsonSealedRecord>,
    #[serde(
        default,
        rename = "expectedVersion",
        alias = "expected_version",
        deserialize_with = "uint64"
    )]
    expected_version: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonBatch {
    #[serde(default)]
    items: Vec<JsonPutSealed>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonSealedRecord {
    meta: Option<JsonRecordMeta>,
    /// base64 (standard or URL-safe, padded or not, as proto3 JSON parsers accept).
    #[serde(default, deserialize_with = "base64_bytes")]
    envelope: Vec<u8>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRecordMeta {
    #[serde(default)]
    id: String,
    #[serde(default)]
    owner: String,
    #[serde(default)]
    provider: String,
    #[serde(default, deserialize_with = "secret_kind")]
    kind: i32,
    #[serde(default)]
    scopes: Vec<String>,
    #[serde(
        default,
        rename = "expiresAt",
        alias = "expires_at",
        deserialize_with = "int64"
    )]
    expires_at: i64,
}

impl From<JsonPutSealed> for v1::PutSealedRequest {
    fn from(item: JsonPutSealed) -> Self {
        v1::PutSealedRequest {
            record: item.record.map(|r| v1::SealedRecord {
                meta: r.meta.map(JsonRecordMeta::into_proto),
                envelope: r.envelope,
            }),
            expected_version: item.expected_version,
        }
    }
}

impl JsonRecordMeta {
    fn into_proto(self) -> v1::RecordMeta {
        v1::RecordMeta {
            id: self.id,
            owner: self.owner,
            provider: self.provider,
            kind: self.kind,
            scopes: self.scopes,
            expires_at: self.expires_at,
        }
    }
}

fn base64_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let text = String::deserialize(d)?;
    decode_base64(&text).ok_or_else(|| serde::de::Error::custom("envelope: expected base64"))
}

/// Bytes as proto3 JSON writes them: standard or URL-safe base64, with or without padding.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
    let config =
        GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent);
    let standard = GeneralPurpose::new(&base64::alphabet::STANDARD, config);
    let url_safe = GeneralPurpose::new(&base64::alphabet::URL_SAFE, config);
    standard
        .decode(text)
        .ok()
        .or_else(|| url_safe.decode(text).ok())
}

/// A proto3 JSON integer: a number, or a string holding one.
#[derive(Deserialize)]
#[serde(untagged)]
enum JsonInt {
    Number(serde_json::Number),
    Text(String),
}

fn integer<'de, D: Deserializer<'de>, T: std::str::FromStr>(
    d: D,
    what: &'static str,
) -> Result<T, D::Error> {
    let text = match JsonInt::deserialize(d)? {
        JsonInt::Number(n) => n.to_string(),
        JsonInt::Text(t) => t,
    };
    text.parse::<T>()
        .map_err(|_| serde::de::Error::custom(format!("expected {what}")))
}

fn uint64<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    integer(
        d,
        "an unsigned 64-bit integer (a number or a string of digits)",
    )
}

fn int64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    integer(d, "a 64-bit integer (a number or a string of digits)")
}

/// A `SecretKind` by name (`SECRET_KIND_ACCESS_TOKEN`) or number.
fn secret_kind<'de, D: Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Kind {
        Number(i32),
        Name(String),
    }
    match Kind::deserialize(d)? {
        Kind::Number(n) => Ok(n),
        Kind::Name(name) => v1::SecretKind::from_str_name(&name)
            .map(|k| k as i32)
            .ok_or_else(|| {
                serde::de::Error::custom(
                    "kind: expected a SecretKind name such as SECRET_KIND_ACCESS_TOKEN",
                )
            }),
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

    #[test]
    fn proto3_json_integers_and_bytes_are_read_as_parsers_write_them() {
        let item: JsonPutSealed = serde_json::from_str(
            r#"{"record": {"meta": {"id": "a", "owner": "o", "provider": "p",
                "kind": "SECRET_KIND_REFRESH_TOKEN", "expires_at": "17"},
                "envelope": "AQID"}, "expectedVersion": 3}"#,
        )
        .expect("decode");
        let req = v1::PutSealedRequest::from(item);
        assert_eq!(req.expected_version, 3);
        let rec = req.record.expect("record");
        assert_eq!(rec.envelope, vec![1, 2, 3]);
        let meta = rec.meta.expect("meta");
        assert_eq!(meta.kind, v1::SecretKind::RefreshToken as i32);
        assert_eq!(meta.expires_at, 17);
        assert_eq!(decode_base64("_-8"), Some(vec![0xff, 0xef]));
        assert_eq!(decode_base64("/+8="), Some(vec![0xff, 0xef]));
        assert_eq!(decode_base64("!!"), None);
    }

    #[test]
    fn json_errors_say_where_without_the_value() {
        let r = *decode::<JsonPutSealed>(br#"{"record": {"meta": {"owner": 5}}}"#)
            .err()
            .expect("refused");
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        let r = *decode::<JsonPutSealed>(br#"{"expectedVersion": "alice@example.com"}"#)
            .err()
            .expect("refused");
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    }

    #[test]
    fn json_errors_echo_no_number_or_boolean_either() {
        let message = |body: &[u8]| -> String {
            let r = *decode::<JsonPutSealed>(body).err().expect("refused");
            assert_eq!(r.status(), StatusCode::BAD_REQUEST);
            let bytes = tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("runtime")
                .block_on(axum::body::to_bytes(r.into_body(), 1 << 16))
                .expect("body");
            let json: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
            json["message"].as_str().expect("message").to_string()
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
