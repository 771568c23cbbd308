//! Record identity and metadata: the validated domain types every layer shares.
//!
//! Owns: [`RecordId`], [`Owner`], [`Provider`], [`SecretKind`], [`RecordMeta`] and [`Record`],
//! and the rules (length, charset) that make them safe to use as store keys and in the
//! envelope's associated data. Values of these types are valid by construction: the only way
//! in is through the `parse`/`new` constructors, which return [`ValidationError`].
//!
//! Must never: hold a plaintext secret (the envelope in a [`Record`] is ciphertext).

use std::fmt;

use thiserror::Error;

/// Longest record id, in bytes.
pub const MAX_RECORD_ID_LEN: usize = 128;
/// Longest owner, in bytes.
pub const MAX_OWNER_LEN: usize = 256;
/// Longest provider name, in bytes.
pub const MAX_PROVIDER_LEN: usize = 64;
/// Most scopes on one record.
pub const MAX_SCOPES: usize = 64;
/// Longest single scope, in bytes.
pub const MAX_SCOPE_LEN: usize = 256;

/// A field of caller input that failed validation. The message names the field and the rule,
/// never the offending value (which might be a pasted secret).
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ValidationError {
    /// A required field was empty.
    #[error("{field} must not be empty")]
    Empty {
        /// Field name.
        field: &'static str,
    },
    /// A field was longer than allowed.
    #[error("{field} is {len} bytes, longer than the limit of {max}")]
    TooLong {
        /// Field name.
        field: &'static str,
        /// Actual length in bytes.
        len: usize,
        /// Limit in bytes.
        max: usize,
    },
    /// A field held a character outside its charset.
    #[error("{field} contains a character outside {allowed}")]
    BadCharset {
        /// Field name.
        field: &'static str,
        /// Description of the allowed charset.
        allowed: &'static str,
    },
    /// Too many scopes.
    #[error("{count} scopes exceed the limit of {max}")]
    TooManyScopes {
        /// Number given.
        count: usize,
        /// Limit.
        max: usize,
    },
    /// The secret kind was missing or unknown.
    #[error(
        "kind must be one of access_token, refresh_token, client_secret, api_key, token_bundle"
    )]
    UnknownKind,
    /// A timestamp was out of range.
    #[error("{field} must be zero (no expiry) or a positive Unix time in seconds")]
    BadTimestamp {
        /// Field name.
        field: &'static str,
    },
}

fn check(
    field: &'static str,
    value: &str,
    max: usize,
    allowed: &'static str,
    ok: impl Fn(char) -> bool,
) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(ValidationError::Empty { field });
    }
    if value.len() > max {
        return Err(ValidationError::TooLong {
            field,
            len: value.len(),
            max,
        });
    }
    if !value.chars().all(ok) {
        return Err(ValidationError::BadCharset { field, allowed });
    }
    Ok(())
}

macro_rules! string_newtype {
    ($(#[$doc:meta])* $name:ident, $field:literal, $max:expr, $allowed:literal, $ok:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(String);

        impl $name {
            /// Validates `value` and wraps it.
            pub fn parse(value: impl Into<String>) -> Result<Self, ValidationError> {
                let value = value.into();
                check($field, &value, $max, $allowed, $ok)?;
                Ok(Self(value))
            }

            /// The validated string.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

string_newtype!(
    /// A caller-chosen record id: 1-128 bytes of `[A-Za-z0-9._:@/+=-]`.
    RecordId,
    "record id",
    MAX_RECORD_ID_LEN,
    "[A-Za-z0-9._:@/+=-]",
    |c: char| c.is_ascii_alphanumeric() || "._:@/+=-".contains(c)
);

string_newtype!(
    /// A provider name, e.g. `github`: 1-64 bytes of `[a-z0-9._-]`.
    Provider,
    "provider",
    MAX_PROVIDER_LEN,
    "[a-z0-9._-]",
    |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-".contains(c)
);

string_newtype!(
    /// A scope name: 1-256 bytes of printable ASCII without spaces (RFC 6749 §3.3 scope-token).
    Scope,
    "scope",
    MAX_SCOPE_LEN,
    "printable ASCII without spaces",
    |c: char| c.is_ascii_graphic() && c != '"' && c != '\\'
);

/// The owner of a record (a user or tenant id): 1-256 bytes of printable UTF-8.
///
/// Owners are personal identifiers: `Debug` shows only their length, and logs must not
/// carry them.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner(String);

impl Owner {
    /// Validates `value` and wraps it.
    pub fn parse(value: impl Into<String>) -> Result<Self, ValidationError> {
        let value = value.into();
        check(
            "owner",
            &value,
            MAX_OWNER_LEN,
            "printable UTF-8 without control characters",
            |c| !c.is_control(),
        )?;
        Ok(Self(value))
    }

    /// The validated owner string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Owner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Owner(<{} bytes>)", self.0.len())
    }
}

impl fmt::Debug for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RecordId({:?})", self.0)
    }
}

impl fmt::Debug for Provider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Provider({:?})", self.0)
    }
}

impl fmt::Debug for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Scope({:?})", self.0)
    }
}

/// What kind of secret a record holds. Its [`SecretKind::as_str`] name is bound into the
/// envelope's associated data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SecretKind {
    /// An OAuth access token.
    AccessToken,
    /// An OAuth refresh token.
    RefreshToken,
    /// An OAuth client secret.
    ClientSecret,
    /// A static API key.
    ApiKey,
    /// An access token, refresh token, expiry and scopes held together.
    TokenBundle,
}

impl SecretKind {
    /// Every kind, in wire order.
    pub const ALL: [SecretKind; 5] = [
        SecretKind::AccessToken,
        SecretKind::RefreshToken,
        SecretKind::ClientSecret,
        SecretKind::ApiKey,
        SecretKind::TokenBundle,
    ];

    /// The canonical name used in the envelope's associated data and on the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            SecretKind::AccessToken => "access_token",
            SecretKind::RefreshToken => "refresh_token",
            SecretKind::ClientSecret => "client_secret",
            SecretKind::ApiKey => "api_key",
            SecretKind::TokenBundle => "token_bundle",
        }
    }

    /// Parses a canonical name.
    pub fn parse(name: &str) -> Result<Self, ValidationError> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == name)
            .ok_or(ValidationError::UnknownKind)
    }
}

impl fmt::Display for SecretKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The caller-supplied description of a record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordMeta {
    /// Record id (store key).
    pub id: RecordId,
    /// Owner of the secret.
    pub owner: Owner,
    /// Upstream provider.
    pub provider: Provider,
    /// Kind of secret.
    pub kind: SecretKind,
    /// Granted scopes (not bound into the envelope).
    pub scopes: Vec<Scope>,
    /// Expiry in Unix seconds, if any (not bound into the envelope).
    pub expires_at: Option<i64>,
}

impl RecordMeta {
    /// Builds metadata from raw parts, validating every field.
    pub fn parse(
        id: &str,
        owner: &str,
        provider: &str,
        kind: SecretKind,
        scopes: &[String],
        expires_at: i64,
    ) -> Result<Self, ValidationError> {
        if scopes.len() > MAX_SCOPES {
            return Err(ValidationError::TooManyScopes {
                count: scopes.len(),
                max: MAX_SCOPES,
            });
        }
        if expires_at < 0 {
            return Err(ValidationError::BadTimestamp {
                field: "expires_at",
            });
        }
        Ok(Self {
            id: RecordId::parse(id)?,
            owner: Owner::parse(owner)?,
            provider: Provider::parse(provider)?,
            kind,
            scopes: scopes
                .iter()
                .map(|s| Scope::parse(s.as_str()))
                .collect::<Result<_, _>>()?,
            expires_at: (expires_at != 0).then_some(expires_at),
        })
    }

    /// Whether the record has expired at `now` (Unix seconds).
    pub fn is_expired_at(&self, now: i64) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }
}

/// A stored record: metadata, bookkeeping and the sealed envelope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Caller-supplied metadata.
    pub meta: RecordMeta,
    /// The sealed envelope (ciphertext only).
    pub envelope: Vec<u8>,
    /// Key version whose public key wrapped the data key.
    pub key_version: u32,
    /// Creation time, Unix seconds.
    pub created_at: i64,
    /// Last update time, Unix seconds.
    pub updated_at: i64,
    /// Whether the record has been revoked.
    pub revoked: bool,
    /// Whether the provider rejected the record's refresh token (`invalid_grant`): the owner
    /// must authorize again, and the next write of the record clears it.
    pub needs_reauth: bool,
    /// Version counter, 1 on creation, incremented by every write.
    pub version: u64,
}

/// Checks a daemon instance name (`[store] instance`, the name of its audit chain): 1-64 of
/// `A-Z a-z 0-9 . _ -`.
pub fn check_instance(name: &str) -> Result<(), ValidationError> {
    const FIELD: &str = "instance";
    if name.is_empty() {
        return Err(ValidationError::Empty { field: FIELD });
    }
    if name.len() > 64 {
        return Err(ValidationError::TooLong {
            field: FIELD,
            len: name.len(),
            max: 64,
        });
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(ValidationError::BadCharset {
            field: FIELD,
            allowed: "A-Z a-z 0-9 . _ -",
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_ids_follow_length_and_charset() {
        assert!(RecordId::parse("github:user-42/primary").is_ok());
        assert_eq!(
            RecordId::parse(""),
            Err(ValidationError::Empty { field: "record id" })
        );
        assert!(matches!(
            RecordId::parse("a".repeat(129)),
            Err(ValidationError::TooLong { .. })
        ));
        assert!(RecordId::parse("a".repeat(128)).is_ok());
        for bad in ["with space", "nul\0", "tab\t", "ünïcode", "semi;colon"] {
            assert!(
                matches!(
                    RecordId::parse(bad),
                    Err(ValidationError::BadCharset { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn owners_reject_control_characters_and_debug_hides_them() {
        assert!(Owner::parse("alice@example.com").is_ok());
        assert!(Owner::parse("user\0x").is_err());
        assert!(Owner::parse("line\nbreak").is_err());
        let owner = Owner::parse("alice@example.com").expect("valid");
        assert!(!format!("{owner:?}").contains("alice"));
    }

    #[test]
    fn kinds_round_trip_through_their_names() {
        for kind in SecretKind::ALL {
            assert_eq!(SecretKind::parse(kind.as_str()), Ok(kind));
        }
        assert_eq!(
            SecretKind::parse("password"),
            Err(ValidationError::UnknownKind)
        );
    }

    #[test]
    fn meta_validation_checks_scopes_and_expiry() {
        let scopes: Vec<String> = (0..65).map(|i| format!("s{i}")).collect();
        assert!(matches!(
            RecordMeta::parse("r", "o", "p", SecretKind::ApiKey, &scopes, 0),
            Err(ValidationError::TooManyScopes { count: 65, .. })
        ));
        assert!(RecordMeta::parse("r", "o", "p", SecretKind::ApiKey, &[], -1).is_err());
        assert!(RecordMeta::parse("r", "o", "p", SecretKind::ApiKey, &["a b".into()], 0).is_err());
        let meta = RecordMeta::parse("r", "o", "p", SecretKind::ApiKey, &["repo".into()], 100)
            .expect("valid");
        assert!(meta.is_expired_at(100));
        assert!(!meta.is_expired_at(99));
    }
}
