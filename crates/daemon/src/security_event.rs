//! Provider security events: Security Event Tokens (RFC 8417, OpenID RISC and CAEP) that tell
//! the vault a user unlinked the app, withdrew scopes, or had tokens revoked at the provider.
//!
//! Owns: issuer configuration ([`Issuer`]), verification of the compact JWS (RS256 or ES256
//! against the issuer's configured public key; `none` and every other algorithm refused),
//! claim checks (`iss`, `aud`, `iat` freshness, `jti`) and the mapping of event types to
//! [`Action`]s. No I/O: the daemon applies the action to the store (server/admin.rs).

use std::path::Path;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::Value;
use thiserror::Error;

/// `tokens-revoked` (RISC): revoke the subject's records.
pub const TOKENS_REVOKED: &str =
    "https://schemas.openid.net/secevent/risc/event-type/tokens-revoked";
/// `session-revoked` (CAEP): revoke the subject's records.
pub const SESSION_REVOKED: &str =
    "https://schemas.openid.net/secevent/caep/event-type/session-revoked";
/// `account-disabled` (RISC): revoke the subject's records.
pub const ACCOUNT_DISABLED: &str =
    "https://schemas.openid.net/secevent/risc/event-type/account-disabled";
/// `account-purged` (RISC), i.e. the user unlinked or deleted the account: delete the
/// subject's records.
pub const ACCOUNT_PURGED: &str =
    "https://schemas.openid.net/secevent/risc/event-type/account-purged";
/// `token-claims-change` (CAEP) with `claims.scope`: scopes were withdrawn; revoke the
/// subject's records holding a scope no longer granted.
pub const TOKEN_CLAIMS_CHANGE: &str =
    "https://schemas.openid.net/secevent/caep/event-type/token-claims-change";

/// A trusted issuer of security events.
#[derive(Debug, Clone)]
pub struct Issuer {
    /// Expected `iss`.
    pub issuer: String,
    /// Required in `aud`.
    pub audience: String,
    /// Records of this provider are affected.
    pub provider: String,
    /// Verification keys: one static key, or the issuer's JWKS (fetched by the vault).
    pub key: IssuerKeys,
    /// Largest accepted age of `iat`, seconds.
    pub max_age_seconds: i64,
}

/// Where an issuer's verification keys come from.
#[derive(Debug, Clone)]
pub enum IssuerKeys {
    /// One key from a PEM file (`public_key_file`); a token's `kid` is not consulted.
    Static(VerifyingKey),
    /// The issuer's JSON Web Key Set (`jwks_url`): a token names its key by `kid`.
    Jwks(std::sync::Arc<Jwks>),
}

/// An issuer's JWKS: the URL and the keys last fetched from it, by `kid`. The vault fetches it
/// (through the SSRF-guarded client); this module only parses and looks up.
#[derive(Debug)]
pub struct Jwks {
    /// The `jwks_url`.
    pub url: http::Uri,
    /// The outbound policy its fetch goes through (that host only).
    pub policy: crate::provider::ProviderPolicy,
    keys: std::sync::RwLock<std::collections::HashMap<String, VerifyingKey>>,
}

/// Why a JWKS document was not usable.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("the JWKS is not usable: {0}")]
pub struct JwksError(pub &'static str);

impl Jwks {
    /// An empty set for `url`, fetched on first use through `policy`.
    pub fn new(url: http::Uri, policy: crate::provider::ProviderPolicy) -> Self {
        Self {
            url,
            policy,
            keys: std::sync::RwLock::default(),
        }
    }

    /// The key with this `kid`, if the last fetch had it.
    pub fn get(&self, kid: &str) -> Option<VerifyingKey> {
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(kid)
            .cloned()
    }

    /// Replaces the keys with those of a fetched JWKS document (RFC 7517): RSA keys of 2048 to
    /// 8192 bits and P-256 keys with a `kid`, for signing; others are skipped. Returns how many
    /// were kept; a document with none usable is an error and keeps the previous keys.
    pub fn load(&self, json: &[u8]) -> Result<usize, JwksError> {
        #[derive(Deserialize)]
        struct Set {
            keys: Vec<Value>,
        }
        let set: Set =
            serde_json::from_slice(json).map_err(|_| JwksError("not a JSON object with keys"))?;
        let b64 = |v: &Value, f: &str| -> Option<Vec<u8>> {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(v.get(f)?.as_str()?)
                .ok()
        };
        let mut keys = std::collections::HashMap::new();
        for k in &set.keys {
            let Some(kid) = k.get("kid").and_then(Value::as_str) else {
                continue;
            };
            if k.get("use")
                .and_then(Value::as_str)
                .is_some_and(|u| u != "sig")
            {
                continue;
            }
            let key = match k.get("kty").and_then(Value::as_str) {
                Some("RSA") => {
                    let (Some(n), Some(e)) = (b64(k, "n"), b64(k, "e")) else {
                        continue;
                    };
                    let Ok(public) = rsa::RsaPublicKey::new(
                        rsa::BigUint::from_bytes_be(&n),
                        rsa::BigUint::from_bytes_be(&e),
                    ) else {
                        continue;
                    };
                    use rsa::pkcs1::EncodeRsaPublicKey as _;
                    let Ok(der) = public.to_pkcs1_der() else {
                        continue;
                    };
                    VerifyingKey::Rs256(der.as_bytes().to_vec())
                }
                Some("EC") if k.get("crv").and_then(Value::as_str) == Some("P-256") => {
                    let (Some(x), Some(y)) = (b64(k, "x"), b64(k, "y")) else {
                        continue;
                    };
                    if x.len() != 32 || y.len() != 32 {
                        continue;
                    }
                    VerifyingKey::Es256([&[4u8][..], &x, &y].concat())
                }
                _ => continue,
            };
            keys.insert(kid.to_string(), key);
        }
        if keys.is_empty() {
            return Err(JwksError("no RSA or P-256 signing key with a kid"));
        }
        let n = keys.len();
        *self
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = keys;
        Ok(n)
    }
}

/// The issuer (index into `issuers`) and `kid` of a token whose issuer publishes a JWKS and
/// whose key this vault has not fetched yet: the vault fetches the set before verifying. No
/// verification happens here.
pub fn jwks_to_fetch(token: &str, issuers: &[Issuer]) -> Option<usize> {
    let mut parts = token.trim().split('.');
    let (h, p) = (parts.next()?, parts.next()?);
    let header: Value = serde_json::from_slice(&part(h, "").ok()?).ok()?;
    let claims: Value = serde_json::from_slice(&part(p, "").ok()?).ok()?;
    let iss = claims.get("iss")?.as_str()?;
    let (index, issuer) = issuers.iter().enumerate().find(|(_, i)| i.issuer == iss)?;
    let IssuerKeys::Jwks(jwks) = &issuer.key else {
        return None;
    };
    let kid = header.get("kid")?.as_str()?;
    jwks.get(kid).is_none().then_some(index)
}

/// A public key for one JWS algorithm.
#[derive(Clone, PartialEq, Eq)]
pub enum VerifyingKey {
    /// RS256: PKCS#1 RSAPublicKey DER.
    Rs256(Vec<u8>),
    /// ES256: uncompressed P-256 point.
    Es256(Vec<u8>),
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            VerifyingKey::Rs256(_) => "VerifyingKey(RS256)",
            VerifyingKey::Es256(_) => "VerifyingKey(ES256)",
        })
    }
}

/// Why an issuer's public key file could not be used.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum IssuerKeyError {
    /// The file could not be read.
    #[error("reading {}: {source}", path.display())]
    Read {
        /// Its path.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not an SPKI public key PEM.
    #[error("{}: not an SPKI public key: {reason}", path.display())]
    NotSpki {
        /// Its path.
        path: std::path::PathBuf,
        /// The decoder's reason.
        reason: String,
    },
    /// The key's algorithm is neither RSA nor P-256.
    #[error("{}: unsupported key algorithm {oid}; use RSA (RS256) or P-256 (ES256)", path.display())]
    Algorithm {
        /// Its path.
        path: std::path::PathBuf,
        /// The algorithm's OID.
        oid: String,
    },
}

impl VerifyingKey {
    /// Reads an SPKI PEM file holding an RSA (2048+ bits) or P-256 public key.
    pub fn from_pem_file(path: &Path) -> Result<Self, IssuerKeyError> {
        use spki::der::DecodePem as _;
        let pem = std::fs::read_to_string(path).map_err(|source| IssuerKeyError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let info = spki::SubjectPublicKeyInfoOwned::from_pem(pem.as_bytes()).map_err(|e| {
            IssuerKeyError::NotSpki {
                path: path.to_path_buf(),
                reason: e.to_string(),
            }
        })?;
        let bits = info.subject_public_key.raw_bytes().to_vec();
        const RSA: &str = "1.2.840.113549.1.1.1";
        const EC: &str = "1.2.840.10045.2.1";
        const P256: &str = "1.2.840.10045.3.1.7";
        match info.algorithm.oid.to_string().as_str() {
            RSA => Ok(VerifyingKey::Rs256(bits)),
            EC if info
                .algorithm
                .parameters
                .as_ref()
                .and_then(|p| p.decode_as::<spki::ObjectIdentifier>().ok())
                .is_some_and(|c| c.to_string() == P256) =>
            {
                Ok(VerifyingKey::Es256(bits))
            }
            other => Err(IssuerKeyError::Algorithm {
                path: path.to_path_buf(),
                oid: other.to_string(),
            }),
        }
    }

    fn verify(&self, alg: &str, message: &[u8], signature: &[u8]) -> Result<(), SetError> {
        use aws_lc_rs::signature::{
            ECDSA_P256_SHA256_FIXED, RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey,
        };
        let result = match (self, alg) {
            (VerifyingKey::Rs256(k), "RS256") => {
                UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, k).verify(message, signature)
            }
            (VerifyingKey::Es256(k), "ES256") => {
                UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, k).verify(message, signature)
            }
            _ => return Err(SetError::Algorithm(alg.to_string())),
        };
        result.map_err(|_| SetError::Signature)
    }
}

/// What the vault does about an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Revoke the subject's records of the issuer's provider.
    Revoke,
    /// Delete them.
    Delete,
    /// Revoke those holding a scope outside this set.
    RevokeScopesOutside(Vec<String>),
}

/// A verified event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// Index of the issuer in the configured list.
    pub issuer: usize,
    /// The event type URI.
    pub event_type: String,
    /// The token's `jti` (replay protection).
    pub jti: String,
    /// The subject as a record owner.
    pub owner: String,
    /// What to do.
    pub action: Action,
}

/// Why a token was refused. Messages never echo token contents beyond claim names.
#[derive(Debug, Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum SetError {
    /// Not three base64url parts of JSON.
    #[error("not a compact JWS security event token: {0}")]
    Malformed(&'static str),
    /// `alg` is not the issuer key's algorithm.
    #[error("algorithm {0:?} refused; the issuer's key needs RS256 or ES256 as configured")]
    Algorithm(String),
    /// Signature did not verify.
    #[error("signature does not verify with the issuer's configured key")]
    Signature,
    /// The token's `kid` is not in the issuer's JWKS (after a refetch).
    #[error("kid is not in the issuer's JWKS")]
    UnknownKid,
    /// `iss` is not a configured issuer.
    #[error("issuer is not configured in [[security_event_issuers]]")]
    UnknownIssuer,
    /// A claim check failed.
    #[error("claim {0}")]
    Claim(String),
    /// No supported event in `events`.
    #[error(
        "no supported event type; supported: tokens-revoked, session-revoked, account-disabled, account-purged, token-claims-change (scope)"
    )]
    Unsupported,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    typ: Option<String>,
    kid: Option<String>,
}

fn part(b64: &str, what: &'static str) -> Result<Vec<u8>, SetError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(b64)
        .map_err(|_| SetError::Malformed(what))
}

/// Verifies `token` against `issuers` at time `now` (Unix seconds).
pub fn verify(token: &str, issuers: &[Issuer], now: i64) -> Result<Verified, SetError> {
    if token.len() > 64 * 1024 {
        return Err(SetError::Malformed("longer than 64 KiB"));
    }
    let mut parts = token.trim().split('.');
    let (Some(h), Some(p), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(SetError::Malformed("expected three dot-separated parts"));
    };
    let header: Header = serde_json::from_slice(&part(h, "header is not base64url")?)
        .map_err(|_| SetError::Malformed("header is not JSON with alg"))?;
    if header.typ.as_deref().is_some_and(|t| {
        !t.eq_ignore_ascii_case("secevent+jwt")
            && !t.eq_ignore_ascii_case("application/secevent+jwt")
    }) {
        return Err(SetError::Malformed("typ is not secevent+jwt"));
    }
    let payload_bytes = part(p, "payload is not base64url")?;
    let claims: Value = serde_json::from_slice(&payload_bytes)
        .map_err(|_| SetError::Malformed("payload is not JSON"))?;
    // Identify the issuer first (unverified), then verify with its key only.
    let iss = claims
        .get("iss")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let (index, issuer) = issuers
        .iter()
        .enumerate()
        .find(|(_, i)| i.issuer == iss)
        .ok_or(SetError::UnknownIssuer)?;
    let signature = part(sig, "signature is not base64url")?;
    let signing_input = &token.trim()[..h.len() + 1 + p.len()];
    let key = match &issuer.key {
        IssuerKeys::Static(k) => k.clone(),
        IssuerKeys::Jwks(jwks) => {
            let kid = header.kid.as_deref().ok_or(SetError::Malformed(
                "header has no kid; the issuer publishes a JWKS",
            ))?;
            jwks.get(kid).ok_or(SetError::UnknownKid)?
        }
    };
    key.verify(&header.alg, signing_input.as_bytes(), &signature)?;
    let aud_ok = match claims.get("aud") {
        Some(Value::String(a)) => *a == issuer.audience,
        Some(Value::Array(a)) => a.iter().any(|v| v.as_str() == Some(&issuer.audience)),
        _ => false,
    };
    if !aud_ok {
        return Err(SetError::Claim(format!(
            "aud does not contain {:?}",
            issuer.audience
        )));
    }
    let iat = claims
        .get("iat")
        .and_then(Value::as_i64)
        .ok_or_else(|| SetError::Claim("iat is missing".into()))?;
    if iat > now + 60 || now - iat > issuer.max_age_seconds {
        return Err(SetError::Claim(format!(
            "iat is outside the accepted window of {} s",
            issuer.max_age_seconds
        )));
    }
    let jti = claims
        .get("jti")
        .and_then(Value::as_str)
        .filter(|j| !j.is_empty() && j.len() <= 256)
        .ok_or_else(|| SetError::Claim("jti is missing".into()))?
        .to_string();
    let events = claims
        .get("events")
        .and_then(Value::as_object)
        .ok_or_else(|| SetError::Claim("events is missing".into()))?;
    for (event_type, body) in events {
        let action = match event_type.as_str() {
            TOKENS_REVOKED | SESSION_REVOKED | ACCOUNT_DISABLED => Action::Revoke,
            ACCOUNT_PURGED => Action::Delete,
            TOKEN_CLAIMS_CHANGE => match body
                .get("claims")
                .and_then(|c| c.get("scope"))
                .and_then(Value::as_str)
            {
                Some(scope) => Action::RevokeScopesOutside(
                    scope.split_whitespace().map(str::to_string).collect(),
                ),
                None => continue,
            },
            _ => continue,
        };
        let subject = body
            .get("subject")
            .or_else(|| claims.get("sub_id"))
            .ok_or_else(|| SetError::Claim("subject is missing".into()))?;
        let owner = subject_owner(subject)
            .ok_or_else(|| SetError::Claim("subject has no supported format".into()))?;
        return Ok(Verified {
            issuer: index,
            event_type: event_type.clone(),
            jti,
            owner,
            action,
        });
    }
    Err(SetError::Unsupported)
}

/// The record owner a subject identifier names (RFC 9493 formats `opaque`, `email`,
/// `iss_sub`; the RISC legacy `subject_type` spelling too).
fn subject_owner(subject: &Value) -> Option<String> {
    let format = subject
        .get("format")
        .or_else(|| subject.get("subject_type"))
        .and_then(Value::as_str)?;
    let field = match format {
        "opaque" => "id",
        "email" => "email",
        "iss_sub" | "iss-sub" => "sub",
        _ => return None,
    };
    subject
        .get(field)
        .and_then(Value::as_str)
        .map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::KeyPair as _;

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    fn es256() -> (aws_lc_rs::signature::EcdsaKeyPair, Issuer) {
        use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("key");
        let issuer = Issuer {
            issuer: "https://idp.example".into(),
            audience: "tokenvault".into(),
            provider: "github".into(),
            key: IssuerKeys::Static(VerifyingKey::Es256(pair.public_key().as_ref().to_vec())),
            max_age_seconds: 300,
        };
        (pair, issuer)
    }

    fn policy() -> crate::provider::ProviderPolicy {
        crate::provider::jwks_policy("t", "https://idp.example/jwks", &[], false, None)
            .expect("policy")
    }

    #[test]
    fn a_jwks_keeps_usable_signing_keys_by_kid_and_refuses_a_useless_one() {
        let (pair, _) = es256();
        let point = pair.public_key().as_ref();
        let ec = serde_json::json!({"kty": "EC", "crv": "P-256", "kid": "e1",
            "x": b64(&point[1..33]), "y": b64(&point[33..65])});
        let jwks = Jwks::new("https://idp.example/jwks".parse().expect("uri"), policy());
        let doc = serde_json::json!({"keys": [
            ec,
            {"kty": "EC", "crv": "P-384", "kid": "p384", "x": "AA", "y": "AA"},
            {"kty": "RSA", "kid": "enc", "use": "enc", "n": "AQAB", "e": "AQAB"},
            {"kty": "oct", "kid": "hmac", "k": "c2VjcmV0"},
            {"kty": "EC", "crv": "P-256", "x": b64(&point[1..33]), "y": b64(&point[33..65])},
        ]});
        assert_eq!(jwks.load(doc.to_string().as_bytes()), Ok(1));
        assert_eq!(jwks.get("e1"), Some(VerifyingKey::Es256(point.to_vec())));
        for missing in ["p384", "enc", "hmac"] {
            assert_eq!(jwks.get(missing), None, "{missing}");
        }
        // A document with nothing usable keeps what was loaded.
        for bad in [
            &b"not json"[..],
            br#"{"keys": []}"#,
            br#"{"keys": [{"kty": "oct", "kid": "x"}]}"#,
        ] {
            assert!(jwks.load(bad).is_err());
        }
        assert!(jwks.get("e1").is_some());
    }

    fn sign(pair: &aws_lc_rs::signature::EcdsaKeyPair, header: &str, claims: &Value) -> String {
        let input = format!(
            "{}.{}",
            b64(header.as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = pair
            .sign(&aws_lc_rs::rand::SystemRandom::new(), input.as_bytes())
            .expect("sign");
        format!("{input}.{}", b64(sig.as_ref()))
    }

    fn claims(events: Value) -> Value {
        serde_json::json!({"iss": "https://idp.example", "aud": ["tokenvault"], "iat": 1000, "jti": "j1", "events": events})
    }

    #[test]
    fn verifies_and_maps_events() {
        let (pair, issuer) = es256();
        let h = r#"{"alg":"ES256","typ":"secevent+jwt"}"#;
        let subject = serde_json::json!({"format": "email", "email": "alice@example.com"});
        for (event, body, action) in [
            (
                TOKENS_REVOKED,
                serde_json::json!({"subject": subject}),
                Action::Revoke,
            ),
            (
                ACCOUNT_PURGED,
                serde_json::json!({"subject": subject}),
                Action::Delete,
            ),
            (
                TOKEN_CLAIMS_CHANGE,
                serde_json::json!({"subject": subject, "claims": {"scope": "repo read:user"}}),
                Action::RevokeScopesOutside(vec!["repo".into(), "read:user".into()]),
            ),
        ] {
            let token = sign(&pair, h, &claims(serde_json::json!({ event: body })));
            let v = verify(&token, std::slice::from_ref(&issuer), 1010).expect(event);
            assert_eq!(v.owner, "alice@example.com");
            assert_eq!(v.action, action);
            assert_eq!(v.jti, "j1");
        }
    }

    #[test]
    fn refuses_forgeries_and_bad_claims() {
        let (pair, issuer) = es256();
        let issuers = std::slice::from_ref(&issuer);
        let h = r#"{"alg":"ES256"}"#;
        let ev =
            serde_json::json!({ TOKENS_REVOKED: {"subject": {"format": "opaque", "id": "u1"}} });
        let good = sign(&pair, h, &claims(ev.clone()));
        assert!(verify(&good, issuers, 1000).is_ok());
        // Tampered payload, alg none, wrong alg, other key.
        let mut parts: Vec<String> = good.split('.').map(str::to_string).collect();
        let mut evil = claims(ev.clone());
        evil["events"][TOKENS_REVOKED]["subject"]["id"] = "victim".into();
        parts[1] = b64(evil.to_string().as_bytes());
        assert_eq!(
            verify(&parts.join("."), issuers, 1000),
            Err(SetError::Signature)
        );
        let none = format!(
            "{}.{}.",
            b64(br#"{"alg":"none"}"#),
            b64(claims(ev.clone()).to_string().as_bytes())
        );
        assert!(matches!(
            verify(&none, issuers, 1000),
            Err(SetError::Algorithm(_)) | Err(SetError::Malformed(_))
        ));
        let rs = sign(&pair, r#"{"alg":"RS256"}"#, &claims(ev.clone()));
        assert_eq!(
            verify(&rs, issuers, 1000),
            Err(SetError::Algorithm("RS256".into()))
        );
        let (other, _) = es256();
        assert_eq!(
            verify(&sign(&other, h, &claims(ev.clone())), issuers, 1000),
            Err(SetError::Signature)
        );
        // Claims.
        let with = |k: &str, v: Value| {
            let mut c = claims(ev.clone());
            c[k] = v;
            sign(&pair, h, &c)
        };
        assert_eq!(
            verify(&with("iss", "https://evil".into()), issuers, 1000),
            Err(SetError::UnknownIssuer)
        );
        assert!(matches!(
            verify(&with("aud", "other".into()), issuers, 1000),
            Err(SetError::Claim(_))
        ));
        assert!(
            matches!(verify(&good, issuers, 2000), Err(SetError::Claim(_))),
            "stale iat"
        );
        assert!(matches!(
            verify(&with("jti", "".into()), issuers, 1000),
            Err(SetError::Claim(_))
        ));
        let unsupported = sign(
            &pair,
            h,
            &claims(serde_json::json!({"https://example/other": {}})),
        );
        assert_eq!(
            verify(&unsupported, issuers, 1000),
            Err(SetError::Unsupported)
        );
        assert!(matches!(
            verify("a.b", issuers, 1000),
            Err(SetError::Malformed(_))
        ));
        let typ = sign(&pair, r#"{"alg":"ES256","typ":"JWT"}"#, &claims(ev));
        assert!(matches!(
            verify(&typ, issuers, 1000),
            Err(SetError::Malformed(_))
        ));
    }
}
