//! On-disk encoding of records and key registry entries, independent of the engine.
//!
//! Values are protobuf messages (prost derive, no .proto file: these are private to the store,
//! not part of the API). Fields are only ever added, so older stores stay readable. Owner index
//! keys are `owner ‖ 0x00 ‖ record id`; owners cannot contain NUL, so prefixes never collide.

use prost::Message;

use super::StoreError;
use crate::keys::{KeyId, KeyInfo, KeyState};
use crate::record::{Owner, Provider, Record, RecordId, RecordMeta, Scope, SecretKind};

/// Version of this schema, kept in the metadata column family.
pub(crate) const SCHEMA_VERSION: u32 = 1;

#[derive(Clone, PartialEq, Message)]
struct StoredRecord {
    #[prost(string, tag = "1")]
    id: String,
    #[prost(string, tag = "2")]
    owner: String,
    #[prost(string, tag = "3")]
    provider: String,
    #[prost(string, tag = "4")]
    kind: String,
    #[prost(string, repeated, tag = "5")]
    scopes: Vec<String>,
    #[prost(int64, tag = "6")]
    expires_at: i64,
    #[prost(int64, tag = "7")]
    created_at: i64,
    #[prost(int64, tag = "8")]
    updated_at: i64,
    #[prost(bool, tag = "9")]
    revoked: bool,
    #[prost(uint64, tag = "10")]
    version: u64,
    #[prost(uint32, tag = "11")]
    key_version: u32,
    #[prost(bytes = "vec", tag = "12")]
    envelope: Vec<u8>,
    #[prost(bool, tag = "13")]
    needs_reauth: bool,
}

#[derive(Clone, PartialEq, Message)]
struct StoredKey {
    #[prost(uint32, tag = "1")]
    version: u32,
    #[prost(bytes = "vec", tag = "2")]
    fingerprint: Vec<u8>,
    #[prost(string, tag = "3")]
    state: String,
    #[prost(int64, tag = "4")]
    created_at: i64,
    #[prost(int64, tag = "5")]
    updated_at: i64,
    #[prost(bytes = "vec", tag = "6")]
    spki_der: Vec<u8>,
    /// When a pending destruction is due (Unix seconds); 0: none.
    #[prost(int64, tag = "7")]
    destroy_after: i64,
}

/// A record in the stored form every engine writes (protobuf `StoredRecord`).
pub fn encode_record(r: &Record) -> Vec<u8> {
    StoredRecord {
        id: r.meta.id.to_string(),
        owner: r.meta.owner.as_str().to_string(),
        provider: r.meta.provider.to_string(),
        kind: r.meta.kind.as_str().to_string(),
        scopes: r
            .meta
            .scopes
            .iter()
            .map(|s| s.as_str().to_string())
            .collect(),
        expires_at: r.meta.expires_at.unwrap_or(0),
        created_at: r.created_at,
        updated_at: r.updated_at,
        revoked: r.revoked,
        version: r.version,
        key_version: r.key_version,
        envelope: r.envelope.clone(),
        needs_reauth: r.needs_reauth,
    }
    .encode_to_vec()
}

/// Reads [`encode_record`]'s form; `Corrupt` if the bytes are not a valid record.
pub fn decode_record(bytes: &[u8]) -> Result<Record, StoreError> {
    let corrupt = |e: &dyn std::fmt::Display| StoreError::Corrupt(format!("record: {e}"));
    let s = StoredRecord::decode(bytes).map_err(|e| corrupt(&e))?;
    Ok(Record {
        meta: RecordMeta {
            id: RecordId::parse(s.id).map_err(|e| corrupt(&e))?,
            owner: Owner::parse(s.owner).map_err(|e| corrupt(&e))?,
            provider: Provider::parse(s.provider).map_err(|e| corrupt(&e))?,
            kind: SecretKind::parse(&s.kind).map_err(|e| corrupt(&e))?,
            scopes: s
                .scopes
                .into_iter()
                .map(Scope::parse)
                .collect::<Result<_, _>>()
                .map_err(|e| corrupt(&e))?,
            expires_at: (s.expires_at != 0).then_some(s.expires_at),
        },
        envelope: s.envelope,
        key_version: s.key_version,
        created_at: s.created_at,
        updated_at: s.updated_at,
        revoked: s.revoked,
        needs_reauth: s.needs_reauth,
        version: s.version,
    })
}

pub(crate) fn encode_key(k: &KeyInfo) -> Vec<u8> {
    StoredKey {
        version: k.version,
        fingerprint: k.id.0.to_vec(),
        state: k.state.as_str().to_string(),
        created_at: k.created_at,
        updated_at: k.updated_at,
        spki_der: k.spki_der.clone(),
        destroy_after: k.destroy_after.unwrap_or(0),
    }
    .encode_to_vec()
}

pub(crate) fn decode_key(bytes: &[u8]) -> Result<KeyInfo, StoreError> {
    let corrupt = |what: &str| StoreError::Corrupt(format!("key registry: {what}"));
    let s = StoredKey::decode(bytes).map_err(|_| corrupt("undecodable entry"))?;
    let state = [
        KeyState::Active,
        KeyState::DecryptOnly,
        KeyState::Retired,
        KeyState::PendingDestruction,
        KeyState::Destroyed,
    ]
    .into_iter()
    .find(|st| st.as_str() == s.state)
    .ok_or_else(|| corrupt("unknown state"))?;
    Ok(KeyInfo {
        version: s.version,
        id: KeyId(
            s.fingerprint
                .try_into()
                .map_err(|_| corrupt("bad fingerprint"))?,
        ),
        state,
        created_at: s.created_at,
        updated_at: s.updated_at,
        spki_der: s.spki_der,
        destroy_after: (s.destroy_after != 0).then_some(s.destroy_after),
    })
}

/// Key of a key registry entry: the version, big-endian so iteration is in version order.
pub(crate) fn key_key(version: u32) -> [u8; 4] {
    version.to_be_bytes()
}

/// Key of a key-version index entry: the version (big-endian), then the record id, so the
/// records under one version are one prefix.
pub(crate) fn key_version_key(version: u32, id: &RecordId) -> Vec<u8> {
    let mut k = version.to_be_bytes().to_vec();
    k.extend_from_slice(id.as_str().as_bytes());
    k
}

/// Key of an owner index entry.
pub(crate) fn owner_key(owner: &Owner, id: &RecordId) -> Vec<u8> {
    let mut k = owner_prefix(owner);
    k.extend_from_slice(id.as_str().as_bytes());
    k
}

/// Prefix of all owner index entries of `owner`.
pub(crate) fn owner_prefix(owner: &Owner) -> Vec<u8> {
    let mut k = Vec::with_capacity(owner.as_str().len() + 1);
    k.extend_from_slice(owner.as_str().as_bytes());
    k.push(0);
    k
}
