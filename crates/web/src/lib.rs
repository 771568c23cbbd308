//! The web tier's OAuth callback, done right (docs/WEB_TIER.md): authorization requests with
//! `state`, an OpenID Connect `nonce` and PKCE (RFC 7636, `S256` only), and the checks on the
//! provider's redirect back.
//!
//! Owns: [`start`] (the authorization URL and the [`PendingAuthorization`] the web tier keeps
//! server-side until the callback), [`PendingAuthorization::complete`] (state compared in
//! constant time, expiry, the provider's `error` as a typed error, single use by consuming the
//! value) and [`pkce_challenge`].
//!
//! Must never: hold a client secret or a token (the daemon redeems the code,
//! `Ingest.ExchangeCode`); put a verifier, state, nonce or code into a `Debug` string or an
//! error; offer the `plain` method or a hex digest as a challenge. A crate of its
//! own (`tokenvault-web`, re-exported as `tokenvault::web`): no gRPC, no async runtime, no key.

#![forbid(unsafe_code)]
#![deny(rustdoc::broken_intra_doc_links)]

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore as _;
use sha2::{Digest as _, Sha256};
use thiserror::Error;
use zeroize::Zeroizing;

/// How long a pending authorization is accepted by default: the user has ten minutes to log in
/// at the provider and come back.
pub const DEFAULT_TTL_SECONDS: i64 = 600;

/// Why an authorization request could not be started, or a stored one not read back.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum WebError {
    /// A parameter is unusable; names which and why (never echoes a secret: no secret is an
    /// input here).
    #[error("{field}: {reason}")]
    Invalid {
        /// The parameter.
        field: &'static str,
        /// Why.
        reason: &'static str,
    },
    /// A stored pending authorization did not decode.
    #[error("the stored pending authorization is corrupt")]
    CorruptPending,
}

/// Why a callback was refused. Refusing changes nothing: the caller drops the pending value
/// and the user starts again.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum CallbackError {
    /// The `state` parameter is missing or differs from the one this request was sent with: a
    /// forged or crossed callback (CSRF), or a pending value of another login.
    #[error("the callback's state does not match the authorization request")]
    StateMismatch,
    /// The pending authorization is older than its time to live.
    #[error("the authorization request expired; start again")]
    Expired,
    /// The provider answered with an error (RFC 6749 section 4.1.2.1), e.g. `access_denied`
    /// when the user declined.
    #[error("the provider refused the authorization: {error}{}", description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Provider {
        /// The `error` code (RFC 6749 charset; anything else is replaced by `invalid_error`).
        error: String,
        /// `error_description`, when it is in the RFC's charset and at most 200 bytes.
        description: Option<String>,
    },
    /// No `code` in a callback that carries no error either.
    #[error("the callback has no authorization code")]
    MissingCode,
    /// The query string is not a valid callback (a parameter twice, or not URL-encoded).
    #[error("malformed callback: {0}")]
    Malformed(&'static str),
}

/// What an authorization request asks for.
#[derive(Debug, Clone)]
pub struct AuthorizeParams<'a> {
    /// The provider's authorization endpoint (`https://`; `http://` only on loopback).
    pub authorization_endpoint: &'a str,
    /// The client id registered with the provider (public; the secret stays in the vault).
    pub client_id: &'a str,
    /// The redirect URI exactly as registered with the provider (`https://`; `http://` only
    /// on loopback); the same value goes to `Ingest.ExchangeCode`.
    pub redirect_uri: &'a str,
    /// The scopes to ask for: as few as the feature needs.
    pub scopes: &'a [&'a str],
    /// OpenID Connect: adds `openid` to the scopes and sends a `nonce`, which the ID token
    /// must echo.
    pub openid: bool,
    /// Sends `prompt=login`, so the provider asks for the password again instead of reusing
    /// its session: for linking accounts and other re-authentication.
    pub prompt_login: bool,
    /// Seconds the callback is accepted; [`DEFAULT_TTL_SECONDS`] when 0.
    pub ttl_seconds: i64,
}

/// What the web tier keeps server-side (in the user's session, keyed by nothing the browser
/// controls) between redirecting to the provider and the callback. Holds the PKCE verifier:
/// never send it to the browser. Single use: [`PendingAuthorization::complete`] consumes it;
/// delete the stored copy when the callback arrives, whatever the outcome.
pub struct PendingAuthorization {
    state: Zeroizing<String>,
    nonce: Option<Zeroizing<String>>,
    verifier: Zeroizing<String>,
    redirect_uri: String,
    expires_at: i64,
}

impl std::fmt::Debug for PendingAuthorization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PendingAuthorization")
            .field("state", &"[REDACTED]")
            .field("nonce", &self.nonce.as_ref().map(|_| "[REDACTED]"))
            .field("verifier", &"[REDACTED]")
            .field("redirect_uri", &self.redirect_uri)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// A checked callback: what `Ingest.ExchangeCode` needs, the code and the verifier.
pub struct AuthorizationCode {
    code: Zeroizing<String>,
    verifier: Zeroizing<String>,
    redirect_uri: String,
    nonce: Option<Zeroizing<String>>,
}

impl std::fmt::Debug for AuthorizationCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorizationCode")
            .field("code", &"[REDACTED]")
            .field("verifier", &"[REDACTED]")
            .field("redirect_uri", &self.redirect_uri)
            .finish_non_exhaustive()
    }
}

impl AuthorizationCode {
    /// The authorization code, to hand to the daemon (`Ingest.ExchangeCode`) at once.
    pub fn expose_code(&self) -> &str {
        &self.code
    }

    /// The PKCE code verifier that goes with it.
    pub fn expose_verifier(&self) -> &str {
        &self.verifier
    }

    /// The redirect URI the request named (the token request must repeat it).
    pub fn redirect_uri(&self) -> &str {
        &self.redirect_uri
    }

    /// The nonce the ID token must carry (OpenID Connect requests only).
    pub fn nonce(&self) -> Option<&str> {
        self.nonce.as_deref().map(String::as_str)
    }
}

/// The PKCE `code_challenge` of `verifier` for method `S256` (RFC 7636 section 4.2):
/// BASE64URL-without-padding of the 32-byte SHA-256 of the ASCII verifier. Not a hex string:
/// a provider compares the base64url form, so a hex digest fails every exchange (or, with
/// `plain`, sends the secret in the clear).
pub fn pkce_challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// 32 random bytes as base64url: 43 characters of the unreserved set, as RFC 7636 asks of a
/// verifier and as good a `state` and `nonce` as any.
fn random_token() -> Zeroizing<String> {
    let mut bytes = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng.fill_bytes(&mut bytes[..]);
    Zeroizing::new(URL_SAFE_NO_PAD.encode(&bytes[..]))
}

/// An absolute `https://` URL (`http://` on loopback only), without a fragment or control
/// characters.
///
/// Checked by hand rather than parsed with the `url` crate, on purpose: its WHATWG parser is a
/// browser's, lenient where this must be strict (it reads `https:///path` as the host `path`
/// and silently drops tabs and newlines), and it normalises (a trailing `/`, a lower-case
/// host, a default port removed). The `redirect_uri` sent here must be byte for byte the one
/// registered at the provider and sent again when the daemon redeems the code (RFC 6749
/// section 4.1.3), so it is passed through exactly as given. The `oauth2` crate was not taken
/// either: it would bring an HTTP client and token types to a helper that never redeems a code.
fn check_url(field: &'static str, url: &str) -> Result<(), WebError> {
    let invalid = |reason| Err(WebError::Invalid { field, reason });
    if url.len() > 2048 {
        return invalid("longer than 2048 bytes");
    }
    if url.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return invalid("contains a space or a control character");
    }
    if url.contains('#') {
        return invalid("must not have a fragment");
    }
    let rest = if let Some(rest) = url.strip_prefix("https://") {
        rest
    } else if let Some(rest) = url.strip_prefix("http://") {
        let host = rest.split(['/', '?']).next().unwrap_or_default();
        let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
        let name = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or_default(),
            None => host.split(':').next().unwrap_or_default(),
        };
        let loopback = name == "localhost"
            || name
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if !loopback {
            return invalid("must use https:// (http:// only on loopback)");
        }
        rest
    } else {
        return invalid("must be an absolute https:// URL");
    };
    if rest.split(['/', '?']).next().unwrap_or_default().is_empty() {
        return invalid("names no host");
    }
    Ok(())
}

/// Starts an authorization request: returns the URL to redirect the browser to and the
/// pending value to keep server-side. `now` is Unix seconds.
pub fn start(
    params: &AuthorizeParams<'_>,
    now: i64,
) -> Result<(String, PendingAuthorization), WebError> {
    check_url("authorization_endpoint", params.authorization_endpoint)?;
    check_url("redirect_uri", params.redirect_uri)?;
    if params.client_id.is_empty()
        || params.client_id.len() > 256
        || params.client_id.bytes().any(|b| b.is_ascii_control())
    {
        return Err(WebError::Invalid {
            field: "client_id",
            reason: "must be 1-256 bytes without control characters",
        });
    }
    // RFC 6749 section 3.3: scope tokens are %x21 / %x23-5B / %x5D-7E.
    let scope_ok = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b == 0x21 || (0x23..=0x5b).contains(&b) || (0x5d..=0x7e).contains(&b))
    };
    if params.scopes.len() > 64 || !params.scopes.iter().all(|s| scope_ok(s)) {
        return Err(WebError::Invalid {
            field: "scopes",
            reason: "at most 64 scope tokens of printable ASCII without spaces, quotes or backslashes",
        });
    }
    let ttl = match params.ttl_seconds {
        0 => DEFAULT_TTL_SECONDS,
        t if (1..=86_400).contains(&t) => t,
        _ => {
            return Err(WebError::Invalid {
                field: "ttl_seconds",
                reason: "must be 1 to 86400",
            });
        }
    };
    let mut scopes: Vec<&str> = params.scopes.to_vec();
    if params.openid && !scopes.contains(&"openid") {
        scopes.insert(0, "openid");
    }
    let pending = PendingAuthorization {
        state: random_token(),
        nonce: params.openid.then(random_token),
        verifier: random_token(),
        redirect_uri: params.redirect_uri.to_string(),
        expires_at: now.saturating_add(ttl),
    };
    let challenge = pkce_challenge(&pending.verifier);
    let mut query = form_urlencoded::Serializer::new(String::new());
    query
        .append_pair("response_type", "code")
        .append_pair("client_id", params.client_id)
        .append_pair("redirect_uri", params.redirect_uri);
    if !scopes.is_empty() {
        query.append_pair("scope", &scopes.join(" "));
    }
    query
        .append_pair("state", &pending.state)
        .append_pair("code_challenge", &challenge)
        .append_pair("code_challenge_method", "S256");
    if let Some(nonce) = &pending.nonce {
        query.append_pair("nonce", nonce);
    }
    if params.prompt_login {
        query.append_pair("prompt", "login");
    }
    let separator = if params.authorization_endpoint.contains('?') {
        '&'
    } else {
        '?'
    };
    let url = format!(
        "{}{separator}{}",
        params.authorization_endpoint,
        query.finish()
    );
    Ok((url, pending))
}

/// Prefix of [`PendingAuthorization::to_stored`]'s encoding, so a future format is told apart.
const STORED_PREFIX: &str = "tvpa1";

impl PendingAuthorization {
    /// The `state` sent with the request (to find the pending value if the web tier keeps
    /// several per session; compare nothing with it yourself, [`Self::complete`] does).
    pub fn state(&self) -> &str {
        &self.state
    }

    /// The nonce the ID token must carry (OpenID Connect requests only).
    pub fn nonce(&self) -> Option<&str> {
        self.nonce.as_deref().map(String::as_str)
    }

    /// When the callback stops being accepted, Unix seconds.
    pub fn expires_at(&self) -> i64 {
        self.expires_at
    }

    /// The value as text, for a server-side session store (it holds the verifier: never put
    /// it in a cookie the browser can read, or in a log).
    pub fn to_stored(&self) -> Zeroizing<String> {
        Zeroizing::new(format!(
            "{STORED_PREFIX}\n{}\n{}\n{}\n{}\n{}",
            self.state.as_str(),
            self.nonce.as_deref().map_or("-", String::as_str),
            self.verifier.as_str(),
            self.expires_at,
            self.redirect_uri
        ))
    }

    /// Reads back what [`Self::to_stored`] wrote.
    pub fn from_stored(text: &str) -> Result<Self, WebError> {
        let mut fields = text.split('\n');
        let mut next = || fields.next().ok_or(WebError::CorruptPending);
        if next()? != STORED_PREFIX {
            return Err(WebError::CorruptPending);
        }
        let token = |s: &str| -> Result<Zeroizing<String>, WebError> {
            if s.len() == 43
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                Ok(Zeroizing::new(s.to_string()))
            } else {
                Err(WebError::CorruptPending)
            }
        };
        let state = token(next()?)?;
        let nonce = match next()? {
            "-" => None,
            n => Some(token(n)?),
        };
        let verifier = token(next()?)?;
        let expires_at = next()?
            .parse::<i64>()
            .map_err(|_| WebError::CorruptPending)?;
        let redirect_uri = next()?.to_string();
        check_url("redirect_uri", &redirect_uri).map_err(|_| WebError::CorruptPending)?;
        if fields.next().is_some() {
            return Err(WebError::CorruptPending);
        }
        Ok(Self {
            state,
            nonce,
            verifier,
            redirect_uri,
            expires_at,
        })
    }

    /// Checks the provider's redirect back, given its query string (without the `?`), and
    /// returns the code to exchange. The state is checked first, so an error response that
    /// does not carry this request's state is refused as a forgery rather than believed.
    pub fn complete(self, query: &str, now: i64) -> Result<AuthorizationCode, CallbackError> {
        if query.len() > 8192 {
            return Err(CallbackError::Malformed("longer than 8192 bytes"));
        }
        let mut state = None;
        let mut code = None;
        let mut error = None;
        let mut description = None;
        for (name, value) in form_urlencoded::parse(query.as_bytes()) {
            let slot = match name.as_ref() {
                "state" => &mut state,
                "code" => &mut code,
                "error" => &mut error,
                "error_description" => &mut description,
                _ => continue,
            };
            if slot.is_some() {
                return Err(CallbackError::Malformed("a parameter appears twice"));
            }
            *slot = Some(Zeroizing::new(value.into_owned()));
        }
        let given = state.ok_or(CallbackError::StateMismatch)?;
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            given.as_bytes(),
            self.state.as_bytes(),
        )) {
            return Err(CallbackError::StateMismatch);
        }
        if now > self.expires_at {
            return Err(CallbackError::Expired);
        }
        if let Some(error) = error {
            // RFC 6749 section 4.1.2.1: error is %x20-21 / %x23-5B / %x5D-7E; anything else
            // is not shown (it would be the attacker's text in our logs).
            let allowed = |s: &str, max: usize| {
                s.len() <= max
                    && s.bytes().all(|b| {
                        (0x20..=0x21).contains(&b)
                            || (0x23..=0x5b).contains(&b)
                            || (0x5d..=0x7e).contains(&b)
                    })
            };
            return Err(CallbackError::Provider {
                error: if allowed(&error, 64) && !error.is_empty() {
                    error.to_string()
                } else {
                    "invalid_error".into()
                },
                description: description
                    .filter(|d| allowed(d, 200))
                    .map(|d| d.to_string()),
            });
        }
        let code = code
            .filter(|c| !c.is_empty())
            .ok_or(CallbackError::MissingCode)?;
        if code.len() > 2048 {
            return Err(CallbackError::Malformed("code longer than 2048 bytes"));
        }
        Ok(AuthorizationCode {
            code,
            verifier: self.verifier,
            redirect_uri: self.redirect_uri,
            nonce: self.nonce,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params() -> AuthorizeParams<'static> {
        AuthorizeParams {
            authorization_endpoint: "https://provider.example/oauth/authorize",
            client_id: "client-1",
            redirect_uri: "https://app.example/callback",
            scopes: &["profile", "talk_message"],
            openid: false,
            prompt_login: false,
            ttl_seconds: 0,
        }
    }

    fn query_of(url: &str) -> std::collections::BTreeMap<String, String> {
        let (_, q) = url.split_once('?').expect("query");
        let mut out = std::collections::BTreeMap::new();
        for (k, v) in form_urlencoded::parse(q.as_bytes()) {
            assert!(out.insert(k.into_owned(), v.into_owned()).is_none());
        }
        out
    }

    #[test]
    fn rfc_7636_appendix_b_vector() {
        assert_eq!(
            pkce_challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
    }

    #[test]
    fn the_request_carries_state_and_an_s256_challenge_of_the_kept_verifier() {
        let (url, pending) = start(&params(), 1000).expect("start");
        assert!(url.starts_with("https://provider.example/oauth/authorize?"));
        let q = query_of(&url);
        assert_eq!(q["response_type"], "code");
        assert_eq!(q["client_id"], "client-1");
        assert_eq!(q["redirect_uri"], "https://app.example/callback");
        assert_eq!(q["scope"], "profile talk_message");
        assert_eq!(q["code_challenge_method"], "S256");
        assert_eq!(q["state"], pending.state());
        assert_eq!(q["code_challenge"], pkce_challenge(&pending.verifier));
        assert!(!q.contains_key("nonce") && !q.contains_key("prompt"));
        // The verifier never leaves: not in the URL.
        assert!(!url.contains(pending.verifier.as_str()));
        // 43 unreserved characters, 256 random bits, different every time.
        assert_eq!(pending.verifier.len(), 43);
        assert_eq!(pending.state().len(), 43);
        let (_, other) = start(&params(), 1000).expect("start");
        assert_ne!(other.state(), pending.state());
        assert_ne!(other.verifier.as_str(), pending.verifier.as_str());
        assert_eq!(pending.expires_at(), 1000 + DEFAULT_TTL_SECONDS);
    }

    #[test]
    fn openid_adds_a_nonce_and_prompt_login_asks_again() {
        let p = AuthorizeParams {
            openid: true,
            prompt_login: true,
            authorization_endpoint: "https://provider.example/authorize?tenant=7",
            ..params()
        };
        let (url, pending) = start(&p, 0).expect("start");
        let q = query_of(&url);
        assert_eq!(q["tenant"], "7");
        assert_eq!(q["scope"], "openid profile talk_message");
        assert_eq!(Some(q["nonce"].as_str()), pending.nonce());
        assert_eq!(q["prompt"], "login");
    }

    #[test]
    fn the_callback_is_checked_state_first_then_expiry_then_errors() {
        let callback =
            |pending: PendingAuthorization, query: String, now| pending.complete(&query, now);
        let (_, p) = start(&params(), 1000).expect("start");
        let state = p.state().to_string();
        let stored = p.to_stored();
        let again = || PendingAuthorization::from_stored(&stored).expect("stored");
        let code = callback(again(), format!("code=abc%2B1&state={state}"), 1001).expect("ok");
        assert_eq!(code.expose_code(), "abc+1");
        assert_eq!(code.expose_verifier(), p.verifier.as_str());
        assert_eq!(code.redirect_uri(), "https://app.example/callback");
        let refusals = [
            (
                format!("code=abc&state={state}x"),
                1001,
                CallbackError::StateMismatch,
            ),
            ("code=abc".to_string(), 1001, CallbackError::StateMismatch),
            // An error without this request's state is not believed.
            (
                "error=access_denied".to_string(),
                1001,
                CallbackError::StateMismatch,
            ),
            (
                format!("code=abc&state={state}"),
                1000 + 601,
                CallbackError::Expired,
            ),
            (
                format!("error=access_denied&error_description=User+said+no&state={state}"),
                1001,
                CallbackError::Provider {
                    error: "access_denied".into(),
                    description: Some("User said no".into()),
                },
            ),
            (
                format!("error=%0Aevil&error_description=%22q%22&state={state}"),
                1001,
                CallbackError::Provider {
                    error: "invalid_error".into(),
                    description: None,
                },
            ),
            (format!("state={state}"), 1001, CallbackError::MissingCode),
            (
                format!("code=&state={state}"),
                1001,
                CallbackError::MissingCode,
            ),
            (
                format!("code=a&code=b&state={state}"),
                1001,
                CallbackError::Malformed("a parameter appears twice"),
            ),
        ];
        for (query, now, want) in refusals {
            let got = callback(again(), query.clone(), now).expect_err(&query);
            assert_eq!(got, want, "{query}");
            // No secret in the message.
            assert!(!got.to_string().contains(&state), "{got}");
        }
    }

    #[test]
    fn bad_parameters_are_refused_with_their_name() {
        let cases: [(AuthorizeParams<'static>, &str); 7] = [
            (
                AuthorizeParams {
                    redirect_uri: "http://app.example/cb",
                    ..params()
                },
                "redirect_uri: must use https://",
            ),
            (
                AuthorizeParams {
                    redirect_uri: "https://app.example/cb#x",
                    ..params()
                },
                "redirect_uri: must not have a fragment",
            ),
            (
                AuthorizeParams {
                    authorization_endpoint: "ftp://x",
                    ..params()
                },
                "authorization_endpoint: must be an absolute https:// URL",
            ),
            (
                AuthorizeParams {
                    authorization_endpoint: "https:///path",
                    ..params()
                },
                "authorization_endpoint: names no host",
            ),
            (
                AuthorizeParams {
                    client_id: "",
                    ..params()
                },
                "client_id",
            ),
            (
                AuthorizeParams {
                    scopes: &["a b"],
                    ..params()
                },
                "scopes",
            ),
            (
                AuthorizeParams {
                    ttl_seconds: -5,
                    ..params()
                },
                "ttl_seconds",
            ),
        ];
        for (p, want) in cases {
            let err = start(&p, 0).expect_err(want);
            assert!(err.to_string().starts_with(want), "{err}");
        }
        // Loopback may use http (development).
        let local = AuthorizeParams {
            redirect_uri: "http://127.0.0.1:8080/cb",
            authorization_endpoint: "http://localhost:9000/authorize",
            ..params()
        };
        assert!(start(&local, 0).is_ok());
    }

    #[test]
    fn secrets_stay_out_of_debug_and_stored_values_are_checked() {
        let (_, p) = start(
            &AuthorizeParams {
                openid: true,
                ..params()
            },
            0,
        )
        .expect("start");
        let debug = format!("{p:?}");
        for secret in [p.state(), p.nonce().expect("nonce"), p.verifier.as_str()] {
            assert!(!debug.contains(secret), "{debug}");
        }
        let stored = p.to_stored();
        let back = PendingAuthorization::from_stored(&stored).expect("round trip");
        assert_eq!(back.to_stored(), stored);
        let code = back
            .complete(&format!("code=c0de&state={}", p.state()), 1)
            .expect("code");
        assert!(!format!("{code:?}").contains("c0de"));
        for bad in [
            "",
            "tvpa0\na",
            &stored.replace(p.state(), "short"),
            &format!("{}\nextra", stored.as_str()),
            &stored.replace("https://app.example/callback", "http://evil.example/"),
        ] {
            assert_eq!(
                PendingAuthorization::from_stored(bad).map(|_| ()),
                Err(WebError::CorruptPending)
            );
        }
    }
}
