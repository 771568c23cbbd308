//! OAuth 2.0 refresh (RFC 6749 §6) as data: the sealed token bundle, the refresh request body
//! and the token endpoint's answer.
//!
//! Owns: [`TokenBundle`] (the plaintext of a `token_bundle` record, JSON, see
//! docs/PROXY.md), [`refresh_request`] and [`parse_token_response`]. No I/O: the daemon's
//! refresh orchestration (vault/refresh.rs) sends the request through the proxy's client.
//!
//! Must never: put a token or client secret into an error message or a `Debug` output.

use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use zeroize::Zeroizing;

use crate::provider::{ClientAuth, OAuthConfig};
use crate::secret::Secret;

/// The plaintext of a `token_bundle` record.
#[derive(Clone, Serialize, Deserialize)]
pub struct TokenBundle {
    /// The access token sent upstream.
    pub access_token: Zeroizing<String>,
    /// The refresh token, if the provider issued one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<Zeroizing<String>>,
    /// When the access token expires, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<i64>,
    /// Granted scopes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// Token type as issued (`Bearer`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_type: Option<String>,
}

impl fmt::Debug for TokenBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenBundle")
            .field("access_token", &"[REDACTED]")
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "[REDACTED]"),
            )
            .field("expires_at", &self.expires_at)
            .field("scopes", &self.scopes)
            .finish()
    }
}

/// Why a bundle or token response was not usable. Never carries token text.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum OAuthError {
    /// The record's plaintext is not a token bundle.
    #[error("the record is not a valid token bundle (JSON with a non-empty access_token)")]
    BadBundle,
    /// The bundle has no refresh token.
    #[error("the token bundle has no refresh token")]
    NoRefreshToken,
    /// The provider rejected the refresh token (RFC 6749 §5.2 `invalid_grant`).
    #[error("the provider rejected the refresh token (invalid_grant)")]
    InvalidGrant,
    /// Another OAuth error response.
    #[error("the token endpoint answered HTTP {status} with error {error:?}")]
    Endpoint {
        /// HTTP status.
        status: u16,
        /// The `error` code, if any.
        error: Option<String>,
    },
    /// A 2xx answer that is not a valid token response.
    #[error("the token endpoint's response is not a valid token response")]
    BadResponse,
}

impl TokenBundle {
    /// Parses a record's plaintext.
    pub fn parse(secret: &Secret) -> Result<Self, OAuthError> {
        let bundle: Self =
            serde_json::from_slice(secret.expose_secret()).map_err(|_| OAuthError::BadBundle)?;
        if bundle.access_token.is_empty() {
            return Err(OAuthError::BadBundle);
        }
        Ok(bundle)
    }

    /// Encodes the bundle as JSON in a zeroizing buffer.
    pub fn to_secret(&self) -> Secret {
        // Large enough that the writer never reallocates (and leaves no stray copy).
        let mut out = Zeroizing::new(Vec::with_capacity(16 * 1024));
        // Serializing strings and integers into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut *out, self);
        Secret::from(out)
    }

    /// The access token as a secret.
    pub fn access(&self) -> Secret {
        Secret::new(self.access_token.as_bytes().to_vec())
    }

    /// Whether the access token expires within `skew` seconds of `now`.
    pub fn expires_within(&self, now: i64, skew: i64) -> bool {
        self.expires_at
            .is_some_and(|at| at <= now.saturating_add(skew))
    }

    /// The bundle a code exchange issued: the response's tokens and expiry, its scopes (or
    /// `requested` when it names none).
    pub fn issued(response: TokenResponse, requested: &[String], now: i64) -> Self {
        let scopes = response
            .scope
            .as_deref()
            .map(|s| {
                s.split(' ')
                    .filter(|x| !x.is_empty())
                    .map(str::to_string)
                    .collect()
            })
            .filter(|v: &Vec<String>| !v.is_empty())
            .unwrap_or_else(|| requested.to_vec());
        TokenBundle {
            access_token: response.access_token,
            refresh_token: response.refresh_token.filter(|t| !t.is_empty()),
            expires_at: response
                .expires_in
                .filter(|e| *e > 0)
                .map(|e| now.saturating_add(e)),
            scopes,
            token_type: response.token_type,
        }
    }

    /// The bundle after a successful refresh: new access token, the new refresh token if one
    /// was issued (else the old one), new expiry and scopes (old scopes if none were named).
    pub fn refreshed(&self, response: TokenResponse, now: i64) -> Self {
        Self {
            access_token: response.access_token,
            refresh_token: response
                .refresh_token
                .or_else(|| self.refresh_token.clone()),
            expires_at: response.expires_in.map(|s| now.saturating_add(s)),
            scopes: response.scope.map_or_else(
                || self.scopes.clone(),
                |s| s.split_whitespace().map(str::to_string).collect(),
            ),
            token_type: response.token_type.or_else(|| self.token_type.clone()),
        }
    }
}

/// A successful token endpoint answer (RFC 6749 §5.1).
#[derive(Deserialize)]
pub struct TokenResponse {
    access_token: Zeroizing<String>,
    #[serde(default)]
    token_type: Option<String>,
    #[serde(default, deserialize_with = "number_or_string")]
    expires_in: Option<i64>,
    #[serde(default)]
    refresh_token: Option<Zeroizing<String>>,
    #[serde(default)]
    scope: Option<String>,
}

impl fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenResponse")
            .field("expires_in", &self.expires_in)
            .finish_non_exhaustive()
    }
}

/// Some providers send `expires_in` as a string.
fn number_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        I(i64),
        S(String),
    }
    Ok(match Option::<N>::deserialize(d)? {
        Some(N::I(i)) => Some(i),
        Some(N::S(s)) => s.parse().ok(),
        None => None,
    })
}

#[derive(Deserialize)]
struct ErrorResponse {
    error: Option<String>,
}

/// Interprets the token endpoint's answer.
pub fn parse_token_response(status: u16, body: &[u8]) -> Result<TokenResponse, OAuthError> {
    if (200..300).contains(&status) {
        let response: TokenResponse =
            serde_json::from_slice(body).map_err(|_| OAuthError::BadResponse)?;
        if response.access_token.is_empty() {
            return Err(OAuthError::BadResponse);
        }
        return Ok(response);
    }
    let error = serde_json::from_slice::<ErrorResponse>(body)
        .ok()
        .and_then(|e| e.error)
        // Only the registered code's shape is repeated, never free text.
        .filter(|e| e.len() <= 64 && e.bytes().all(|b| b.is_ascii_graphic()));
    if error.as_deref() == Some("invalid_grant") {
        return Err(OAuthError::InvalidGrant);
    }
    Err(OAuthError::Endpoint { status, error })
}

/// The form body and optional `Authorization` value of a refresh request.
pub struct RefreshRequest {
    /// `application/x-www-form-urlencoded` body.
    pub body: Zeroizing<Vec<u8>>,
    /// `Basic …` for `client_secret_basic`.
    pub authorization: Option<Zeroizing<String>>,
}

impl fmt::Debug for RefreshRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RefreshRequest([REDACTED])")
    }
}

/// Builds the `refresh_token` grant request (RFC 6749 §6) with the configured client
/// authentication (§2.3.1: id and secret are form-urlencoded before Basic encoding).
pub fn refresh_request(
    config: &OAuthConfig,
    refresh_token: &str,
    client_secret: &Secret,
) -> Result<RefreshRequest, OAuthError> {
    token_request(
        config,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
        ],
        client_secret,
    )
}

/// Builds the `authorization_code` grant request (RFC 6749 §4.1.3) with the PKCE verifier
/// (RFC 7636 §4.5) and the configured client authentication.
pub fn code_request(
    config: &OAuthConfig,
    code: &str,
    code_verifier: &str,
    redirect_uri: &str,
    client_secret: &Secret,
) -> Result<RefreshRequest, OAuthError> {
    token_request(
        config,
        &[
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", redirect_uri),
            ("code_verifier", code_verifier),
        ],
        client_secret,
    )
}

/// Builds a token revocation request (RFC 7009 §2.1): `token` and its `token_type_hint`
/// (`refresh_token` or `access_token`), with the client authentication of the token endpoint.
pub fn revocation_request(
    config: &OAuthConfig,
    token: &str,
    hint: &str,
    client_secret: &Secret,
) -> Result<RefreshRequest, OAuthError> {
    token_request(
        config,
        &[("token", token), ("token_type_hint", hint)],
        client_secret,
    )
}

/// A token endpoint request: `pairs`, then the client's authentication.
fn token_request(
    config: &OAuthConfig,
    pairs: &[(&str, &str)],
    client_secret: &Secret,
) -> Result<RefreshRequest, OAuthError> {
    let secret =
        std::str::from_utf8(client_secret.expose_secret()).map_err(|_| OAuthError::BadBundle)?;
    let mut form = form_urlencoded::Serializer::new(String::with_capacity(4096));
    for (k, v) in pairs {
        form.append_pair(k, v);
    }
    let authorization = match config.client_auth {
        ClientAuth::ClientSecretPost => {
            form.append_pair("client_id", &config.client_id);
            form.append_pair("client_secret", secret);
            None
        }
        ClientAuth::ClientSecretBasic => {
            use base64::Engine as _;
            let enc =
                |s: &str| -> String { form_urlencoded::byte_serialize(s.as_bytes()).collect() };
            let pair = Zeroizing::new(format!("{}:{}", enc(&config.client_id), enc(secret)));
            Some(Zeroizing::new(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(pair.as_bytes())
            )))
        }
    };
    let body = Zeroizing::new(form.finish().into_bytes());
    Ok(RefreshRequest {
        body,
        authorization,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(auth: ClientAuth) -> OAuthConfig {
        OAuthConfig {
            token_endpoint: "https://auth.example.com/token".parse().expect("uri"),
            client_id: "client id".into(),
            client_auth: auth,
            client_secret_record: crate::record::RecordId::parse("cs").expect("id"),
            refresh_skew_seconds: 60,
            redirect_uris: vec![],
            background: None,
        }
    }

    #[test]
    fn refresh_request_known_answers() {
        let secret = Secret::new(b"s3cr&t".to_vec());
        let r =
            refresh_request(&config(ClientAuth::ClientSecretPost), "rt/1+2", &secret).expect("ok");
        assert_eq!(
            std::str::from_utf8(&r.body).expect("utf8"),
            "grant_type=refresh_token&refresh_token=rt%2F1%2B2&client_id=client+id&client_secret=s3cr%26t"
        );
        assert!(r.authorization.is_none());
        let r = refresh_request(&config(ClientAuth::ClientSecretBasic), "rt", &secret).expect("ok");
        assert_eq!(
            std::str::from_utf8(&r.body).expect("utf8"),
            "grant_type=refresh_token&refresh_token=rt"
        );
        // base64("client+id:s3cr%26t")
        assert_eq!(
            r.authorization.as_deref().map(String::as_str),
            Some("Basic Y2xpZW50K2lkOnMzY3IlMjZ0")
        );
        assert!(!format!("{r:?}").contains("s3cr"));
    }

    #[test]
    fn token_responses() {
        let ok = parse_token_response(
            200,
            br#"{"access_token":"at2","token_type":"Bearer","expires_in":"3600","scope":"a b"}"#,
        )
        .expect("ok");
        let old = TokenBundle {
            access_token: Zeroizing::new("at1".into()),
            refresh_token: Some(Zeroizing::new("rt1".into())),
            expires_at: Some(10),
            scopes: vec!["a".into()],
            token_type: None,
        };
        let new = old.refreshed(ok, 1000);
        assert_eq!(new.access_token.as_str(), "at2");
        assert_eq!(
            new.refresh_token.as_deref().map(String::as_str),
            Some("rt1")
        );
        assert_eq!(new.expires_at, Some(4600));
        assert_eq!(new.scopes, vec!["a".to_string(), "b".to_string()]);
        assert!(new.expires_within(4000, 600));
        assert!(!new.expires_within(3000, 600));
        let debug = format!("{new:?}");
        assert!(!debug.contains("at2") && !debug.contains("rt1"), "{debug}");
        assert_eq!(
            parse_token_response(
                400,
                br#"{"error":"invalid_grant","error_description":"reused"}"#
            )
            .map(|_| ()),
            Err(OAuthError::InvalidGrant)
        );
        assert_eq!(
            parse_token_response(401, br#"{"error":"invalid_client"}"#).map(|_| ()),
            Err(OAuthError::Endpoint {
                status: 401,
                error: Some("invalid_client".into())
            })
        );
        assert_eq!(
            parse_token_response(200, b"{}").map(|_| ()),
            Err(OAuthError::BadResponse)
        );
        assert_eq!(
            parse_token_response(502, b"<html>").map(|_| ()),
            Err(OAuthError::Endpoint {
                status: 502,
                error: None
            })
        );
    }

    #[test]
    fn bundles_round_trip_and_refuse_garbage() {
        let b = TokenBundle::parse(&Secret::new(
            br#"{"access_token":"a","refresh_token":"r","expires_at":5,"extra":1}"#.to_vec(),
        ))
        .expect("ok");
        let again = TokenBundle::parse(&b.to_secret()).expect("round trip");
        assert_eq!(
            again.refresh_token.as_deref().map(String::as_str),
            Some("r")
        );
        assert_eq!(again.expires_at, Some(5));
        for bad in [
            &b"not json"[..],
            br#"{"access_token":""}"#,
            br#"{"refresh_token":"r"}"#,
        ] {
            assert_eq!(
                TokenBundle::parse(&Secret::new(bad.to_vec())).map(|_| ()),
                Err(OAuthError::BadBundle)
            );
        }
    }
}
