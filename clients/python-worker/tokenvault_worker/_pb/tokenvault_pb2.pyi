from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class SecretKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SECRET_KIND_UNSPECIFIED: _ClassVar[SecretKind]
    SECRET_KIND_ACCESS_TOKEN: _ClassVar[SecretKind]
    SECRET_KIND_REFRESH_TOKEN: _ClassVar[SecretKind]
    SECRET_KIND_CLIENT_SECRET: _ClassVar[SecretKind]
    SECRET_KIND_API_KEY: _ClassVar[SecretKind]
    SECRET_KIND_TOKEN_BUNDLE: _ClassVar[SecretKind]

class KeyState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEY_STATE_UNSPECIFIED: _ClassVar[KeyState]
    KEY_STATE_ACTIVE: _ClassVar[KeyState]
    KEY_STATE_DECRYPT_ONLY: _ClassVar[KeyState]
    KEY_STATE_RETIRED: _ClassVar[KeyState]
    KEY_STATE_DESTROYED: _ClassVar[KeyState]
    KEY_STATE_PENDING_DESTRUCTION: _ClassVar[KeyState]

class RecordState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RECORD_STATE_UNSPECIFIED: _ClassVar[RecordState]
    RECORD_STATE_REVOKED: _ClassVar[RecordState]
    RECORD_STATE_NEEDS_REAUTH: _ClassVar[RecordState]
    RECORD_STATE_EXPIRED: _ClassVar[RecordState]
    RECORD_STATE_USABLE: _ClassVar[RecordState]
SECRET_KIND_UNSPECIFIED: SecretKind
SECRET_KIND_ACCESS_TOKEN: SecretKind
SECRET_KIND_REFRESH_TOKEN: SecretKind
SECRET_KIND_CLIENT_SECRET: SecretKind
SECRET_KIND_API_KEY: SecretKind
SECRET_KIND_TOKEN_BUNDLE: SecretKind
KEY_STATE_UNSPECIFIED: KeyState
KEY_STATE_ACTIVE: KeyState
KEY_STATE_DECRYPT_ONLY: KeyState
KEY_STATE_RETIRED: KeyState
KEY_STATE_DESTROYED: KeyState
KEY_STATE_PENDING_DESTRUCTION: KeyState
RECORD_STATE_UNSPECIFIED: RecordState
RECORD_STATE_REVOKED: RecordState
RECORD_STATE_NEEDS_REAUTH: RecordState
RECORD_STATE_EXPIRED: RecordState
RECORD_STATE_USABLE: RecordState

class RecordMeta(_message.Message):
    __slots__ = ("id", "owner", "provider", "kind", "scopes", "expires_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    owner: str
    provider: str
    kind: SecretKind
    scopes: _containers.RepeatedScalarFieldContainer[str]
    expires_at: int
    def __init__(self, id: _Optional[str] = ..., owner: _Optional[str] = ..., provider: _Optional[str] = ..., kind: _Optional[_Union[SecretKind, str]] = ..., scopes: _Optional[_Iterable[str]] = ..., expires_at: _Optional[int] = ...) -> None: ...

class SealedRecord(_message.Message):
    __slots__ = ("meta", "envelope")
    META_FIELD_NUMBER: _ClassVar[int]
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    meta: RecordMeta
    envelope: bytes
    def __init__(self, meta: _Optional[_Union[RecordMeta, _Mapping]] = ..., envelope: _Optional[bytes] = ...) -> None: ...

class PutSealedRequest(_message.Message):
    __slots__ = ("record", "expected_version")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    record: SealedRecord
    expected_version: int
    def __init__(self, record: _Optional[_Union[SealedRecord, _Mapping]] = ..., expected_version: _Optional[int] = ...) -> None: ...

class PutSealedResponse(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class PutSealedBatchRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[PutSealedRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[PutSealedRequest, _Mapping]]] = ...) -> None: ...

class PutSealedBatchResponse(_message.Message):
    __slots__ = ("versions",)
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, versions: _Optional[_Iterable[int]] = ...) -> None: ...

class PublicKeysRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PublicKey(_message.Message):
    __slots__ = ("version", "fingerprint", "spki_pem", "state", "created_at", "destroy_after", "algorithm", "public_key")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SPKI_PEM_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    DESTROY_AFTER_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    version: int
    fingerprint: str
    spki_pem: str
    state: KeyState
    created_at: int
    destroy_after: int
    algorithm: str
    public_key: bytes
    def __init__(self, version: _Optional[int] = ..., fingerprint: _Optional[str] = ..., spki_pem: _Optional[str] = ..., state: _Optional[_Union[KeyState, str]] = ..., created_at: _Optional[int] = ..., destroy_after: _Optional[int] = ..., algorithm: _Optional[str] = ..., public_key: _Optional[bytes] = ...) -> None: ...

class PublicKeysResponse(_message.Message):
    __slots__ = ("active",)
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    active: PublicKey
    def __init__(self, active: _Optional[_Union[PublicKey, _Mapping]] = ...) -> None: ...

class ExchangeCodeRequest(_message.Message):
    __slots__ = ("meta", "code", "code_verifier", "redirect_uri", "expected_version")
    META_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    CODE_VERIFIER_FIELD_NUMBER: _ClassVar[int]
    REDIRECT_URI_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    meta: RecordMeta
    code: str
    code_verifier: str
    redirect_uri: str
    expected_version: int
    def __init__(self, meta: _Optional[_Union[RecordMeta, _Mapping]] = ..., code: _Optional[str] = ..., code_verifier: _Optional[str] = ..., redirect_uri: _Optional[str] = ..., expected_version: _Optional[int] = ...) -> None: ...

class ExchangeCodeResponse(_message.Message):
    __slots__ = ("id", "version", "expires_at", "scopes")
    ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    id: str
    version: int
    expires_at: int
    scopes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, id: _Optional[str] = ..., version: _Optional[int] = ..., expires_at: _Optional[int] = ..., scopes: _Optional[_Iterable[str]] = ...) -> None: ...

class RecordInfo(_message.Message):
    __slots__ = ("meta", "created_at", "updated_at", "revoked", "version", "key_version", "needs_reauth")
    META_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    NEEDS_REAUTH_FIELD_NUMBER: _ClassVar[int]
    meta: RecordMeta
    created_at: int
    updated_at: int
    revoked: bool
    version: int
    key_version: int
    needs_reauth: bool
    def __init__(self, meta: _Optional[_Union[RecordMeta, _Mapping]] = ..., created_at: _Optional[int] = ..., updated_at: _Optional[int] = ..., revoked: _Optional[bool] = ..., version: _Optional[int] = ..., key_version: _Optional[int] = ..., needs_reauth: _Optional[bool] = ...) -> None: ...

class GetTokenRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class GetTokenResponse(_message.Message):
    __slots__ = ("info", "secret")
    INFO_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    info: RecordInfo
    secret: bytes
    def __init__(self, info: _Optional[_Union[RecordInfo, _Mapping]] = ..., secret: _Optional[bytes] = ...) -> None: ...

class HttpHeader(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: bytes
    def __init__(self, name: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...

class ProxyRequest(_message.Message):
    __slots__ = ("id", "method", "path", "headers", "body", "grant")
    ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    GRANT_FIELD_NUMBER: _ClassVar[int]
    id: str
    method: str
    path: str
    headers: _containers.RepeatedCompositeFieldContainer[HttpHeader]
    body: bytes
    grant: str
    def __init__(self, id: _Optional[str] = ..., method: _Optional[str] = ..., path: _Optional[str] = ..., headers: _Optional[_Iterable[_Union[HttpHeader, _Mapping]]] = ..., body: _Optional[bytes] = ..., grant: _Optional[str] = ...) -> None: ...

class ProxyResponse(_message.Message):
    __slots__ = ("status", "headers", "body", "refreshed")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    REFRESHED_FIELD_NUMBER: _ClassVar[int]
    status: int
    headers: _containers.RepeatedCompositeFieldContainer[HttpHeader]
    body: bytes
    refreshed: bool
    def __init__(self, status: _Optional[int] = ..., headers: _Optional[_Iterable[_Union[HttpHeader, _Mapping]]] = ..., body: _Optional[bytes] = ..., refreshed: _Optional[bool] = ...) -> None: ...

class IssueGrantRequest(_message.Message):
    __slots__ = ("id", "owner", "methods", "path_prefixes", "ttl_seconds", "max_uses", "audience")
    ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    METHODS_FIELD_NUMBER: _ClassVar[int]
    PATH_PREFIXES_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_USES_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    id: str
    owner: str
    methods: _containers.RepeatedScalarFieldContainer[str]
    path_prefixes: _containers.RepeatedScalarFieldContainer[str]
    ttl_seconds: int
    max_uses: int
    audience: str
    def __init__(self, id: _Optional[str] = ..., owner: _Optional[str] = ..., methods: _Optional[_Iterable[str]] = ..., path_prefixes: _Optional[_Iterable[str]] = ..., ttl_seconds: _Optional[int] = ..., max_uses: _Optional[int] = ..., audience: _Optional[str] = ...) -> None: ...

class IssueGrantResponse(_message.Message):
    __slots__ = ("grant", "grant_id", "expires_at")
    GRANT_FIELD_NUMBER: _ClassVar[int]
    GRANT_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    grant: str
    grant_id: str
    expires_at: int
    def __init__(self, grant: _Optional[str] = ..., grant_id: _Optional[str] = ..., expires_at: _Optional[int] = ...) -> None: ...

class RevokeGrantRequest(_message.Message):
    __slots__ = ("grant_id",)
    GRANT_ID_FIELD_NUMBER: _ClassVar[int]
    grant_id: str
    def __init__(self, grant_id: _Optional[str] = ...) -> None: ...

class RevokeGrantResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[PublicKey]
    def __init__(self, keys: _Optional[_Iterable[_Union[PublicKey, _Mapping]]] = ...) -> None: ...

class RevokeRequest(_message.Message):
    __slots__ = ("id", "revoke_at_provider")
    ID_FIELD_NUMBER: _ClassVar[int]
    REVOKE_AT_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    id: str
    revoke_at_provider: bool
    def __init__(self, id: _Optional[str] = ..., revoke_at_provider: _Optional[bool] = ...) -> None: ...

class RevokeResponse(_message.Message):
    __slots__ = ("info",)
    INFO_FIELD_NUMBER: _ClassVar[int]
    info: RecordInfo
    def __init__(self, info: _Optional[_Union[RecordInfo, _Mapping]] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("id", "revoke_at_provider")
    ID_FIELD_NUMBER: _ClassVar[int]
    REVOKE_AT_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    id: str
    revoke_at_provider: bool
    def __init__(self, id: _Optional[str] = ..., revoke_at_provider: _Optional[bool] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeleteOwnerRequest(_message.Message):
    __slots__ = ("owner", "revoke_at_provider")
    OWNER_FIELD_NUMBER: _ClassVar[int]
    REVOKE_AT_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    owner: str
    revoke_at_provider: bool
    def __init__(self, owner: _Optional[str] = ..., revoke_at_provider: _Optional[bool] = ...) -> None: ...

class DeleteOwnerResponse(_message.Message):
    __slots__ = ("deleted", "approval")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_FIELD_NUMBER: _ClassVar[int]
    deleted: int
    approval: ApprovalRequest
    def __init__(self, deleted: _Optional[int] = ..., approval: _Optional[_Union[ApprovalRequest, _Mapping]] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KeyVersionCount(_message.Message):
    __slots__ = ("key_version", "records")
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    key_version: int
    records: int
    def __init__(self, key_version: _Optional[int] = ..., records: _Optional[int] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("records", "revoked", "records_per_key_version", "dek_cache_hits", "dek_cache_misses", "dek_cache_entries", "needs_reauth", "fips")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    RECORDS_PER_KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEK_CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    DEK_CACHE_MISSES_FIELD_NUMBER: _ClassVar[int]
    DEK_CACHE_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    NEEDS_REAUTH_FIELD_NUMBER: _ClassVar[int]
    FIPS_FIELD_NUMBER: _ClassVar[int]
    records: int
    revoked: int
    records_per_key_version: _containers.RepeatedCompositeFieldContainer[KeyVersionCount]
    dek_cache_hits: int
    dek_cache_misses: int
    dek_cache_entries: int
    needs_reauth: int
    fips: bool
    def __init__(self, records: _Optional[int] = ..., revoked: _Optional[int] = ..., records_per_key_version: _Optional[_Iterable[_Union[KeyVersionCount, _Mapping]]] = ..., dek_cache_hits: _Optional[int] = ..., dek_cache_misses: _Optional[int] = ..., dek_cache_entries: _Optional[int] = ..., needs_reauth: _Optional[int] = ..., fips: _Optional[bool] = ...) -> None: ...

class ListRecordsRequest(_message.Message):
    __slots__ = ("provider", "owner", "kind", "state", "key_version", "page_size", "page_token")
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    KEY_VERSION_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    provider: str
    owner: str
    kind: SecretKind
    state: RecordState
    key_version: int
    page_size: int
    page_token: str
    def __init__(self, provider: _Optional[str] = ..., owner: _Optional[str] = ..., kind: _Optional[_Union[SecretKind, str]] = ..., state: _Optional[_Union[RecordState, str]] = ..., key_version: _Optional[int] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListRecordsResponse(_message.Message):
    __slots__ = ("records", "next_page_token")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedCompositeFieldContainer[RecordInfo]
    next_page_token: str
    def __init__(self, records: _Optional[_Iterable[_Union[RecordInfo, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class SecurityEventRequest(_message.Message):
    __slots__ = ("token",)
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    token: str
    def __init__(self, token: _Optional[str] = ...) -> None: ...

class SecurityEventResponse(_message.Message):
    __slots__ = ("event_type", "revoked", "deleted")
    EVENT_TYPE_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    DELETED_FIELD_NUMBER: _ClassVar[int]
    event_type: str
    revoked: int
    deleted: int
    def __init__(self, event_type: _Optional[str] = ..., revoked: _Optional[int] = ..., deleted: _Optional[int] = ...) -> None: ...

class ReloadProvidersRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadProvidersResponse(_message.Message):
    __slots__ = ("providers",)
    PROVIDERS_FIELD_NUMBER: _ClassVar[int]
    providers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, providers: _Optional[_Iterable[str]] = ...) -> None: ...

class RotateKeyRequest(_message.Message):
    __slots__ = ("private_key_pem", "public_key_pem", "token_key_label", "algorithm")
    PRIVATE_KEY_PEM_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_PEM_FIELD_NUMBER: _ClassVar[int]
    TOKEN_KEY_LABEL_FIELD_NUMBER: _ClassVar[int]
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    private_key_pem: str
    public_key_pem: str
    token_key_label: str
    algorithm: str
    def __init__(self, private_key_pem: _Optional[str] = ..., public_key_pem: _Optional[str] = ..., token_key_label: _Optional[str] = ..., algorithm: _Optional[str] = ...) -> None: ...

class RotateKeyResponse(_message.Message):
    __slots__ = ("active", "previous")
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    active: PublicKey
    previous: PublicKey
    def __init__(self, active: _Optional[_Union[PublicKey, _Mapping]] = ..., previous: _Optional[_Union[PublicKey, _Mapping]] = ...) -> None: ...

class RewrapRequest(_message.Message):
    __slots__ = ("max_records_per_second",)
    MAX_RECORDS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    max_records_per_second: int
    def __init__(self, max_records_per_second: _Optional[int] = ...) -> None: ...

class RewrapProgress(_message.Message):
    __slots__ = ("target_version", "total", "rewrapped", "skipped", "conflicts", "failed", "done", "elapsed_seconds")
    TARGET_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    REWRAPPED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    CONFLICTS_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    target_version: int
    total: int
    rewrapped: int
    skipped: int
    conflicts: int
    failed: int
    done: bool
    elapsed_seconds: float
    def __init__(self, target_version: _Optional[int] = ..., total: _Optional[int] = ..., rewrapped: _Optional[int] = ..., skipped: _Optional[int] = ..., conflicts: _Optional[int] = ..., failed: _Optional[int] = ..., done: _Optional[bool] = ..., elapsed_seconds: _Optional[float] = ...) -> None: ...

class RetireKeyRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class RetireKeyResponse(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: PublicKey
    def __init__(self, key: _Optional[_Union[PublicKey, _Mapping]] = ...) -> None: ...

class DestroyKeyRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class DestroyKeyResponse(_message.Message):
    __slots__ = ("key", "private_key_erased", "approval")
    KEY_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_KEY_ERASED_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_FIELD_NUMBER: _ClassVar[int]
    key: PublicKey
    private_key_erased: bool
    approval: ApprovalRequest
    def __init__(self, key: _Optional[_Union[PublicKey, _Mapping]] = ..., private_key_erased: _Optional[bool] = ..., approval: _Optional[_Union[ApprovalRequest, _Mapping]] = ...) -> None: ...

class ApprovalRequest(_message.Message):
    __slots__ = ("id", "action", "target", "approvals", "required", "expires_at")
    ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    APPROVALS_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    id: str
    action: str
    target: str
    approvals: _containers.RepeatedScalarFieldContainer[str]
    required: int
    expires_at: int
    def __init__(self, id: _Optional[str] = ..., action: _Optional[str] = ..., target: _Optional[str] = ..., approvals: _Optional[_Iterable[str]] = ..., required: _Optional[int] = ..., expires_at: _Optional[int] = ...) -> None: ...

class ApproveRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class SetMinDecryptVersionRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class SetMinDecryptVersionResponse(_message.Message):
    __slots__ = ("minimum", "approval")
    MINIMUM_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_FIELD_NUMBER: _ClassVar[int]
    minimum: int
    approval: ApprovalRequest
    def __init__(self, minimum: _Optional[int] = ..., approval: _Optional[_Union[ApprovalRequest, _Mapping]] = ...) -> None: ...

class ApproveResponse(_message.Message):
    __slots__ = ("request", "executed", "outcome")
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    EXECUTED_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    request: ApprovalRequest
    executed: bool
    outcome: str
    def __init__(self, request: _Optional[_Union[ApprovalRequest, _Mapping]] = ..., executed: _Optional[bool] = ..., outcome: _Optional[str] = ...) -> None: ...

class CancelDestroyKeyRequest(_message.Message):
    __slots__ = ("version",)
    VERSION_FIELD_NUMBER: _ClassVar[int]
    version: int
    def __init__(self, version: _Optional[int] = ...) -> None: ...

class CancelDestroyKeyResponse(_message.Message):
    __slots__ = ("key", "approval")
    KEY_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_FIELD_NUMBER: _ClassVar[int]
    key: PublicKey
    approval: ApprovalRequest
    def __init__(self, key: _Optional[_Union[PublicKey, _Mapping]] = ..., approval: _Optional[_Union[ApprovalRequest, _Mapping]] = ...) -> None: ...

class AuditLogRequest(_message.Message):
    __slots__ = ("from_time_ms", "to_time_ms", "record_id", "owner", "instance")
    FROM_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    TO_TIME_MS_FIELD_NUMBER: _ClassVar[int]
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    from_time_ms: int
    to_time_ms: int
    record_id: str
    owner: str
    instance: str
    def __init__(self, from_time_ms: _Optional[int] = ..., to_time_ms: _Optional[int] = ..., record_id: _Optional[str] = ..., owner: _Optional[str] = ..., instance: _Optional[str] = ...) -> None: ...

class AuditEvent(_message.Message):
    __slots__ = ("seq", "time_ms", "caller", "action", "record_hmac", "owner_hmac", "outcome", "detail", "prev_hash", "hash", "raw", "instance", "checkpoint_seq", "checkpoint_hash")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_MS_FIELD_NUMBER: _ClassVar[int]
    CALLER_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    RECORD_HMAC_FIELD_NUMBER: _ClassVar[int]
    OWNER_HMAC_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    PREV_HASH_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_SEQ_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_HASH_FIELD_NUMBER: _ClassVar[int]
    seq: int
    time_ms: int
    caller: str
    action: str
    record_hmac: str
    owner_hmac: str
    outcome: str
    detail: str
    prev_hash: bytes
    hash: bytes
    raw: bytes
    instance: str
    checkpoint_seq: int
    checkpoint_hash: bytes
    def __init__(self, seq: _Optional[int] = ..., time_ms: _Optional[int] = ..., caller: _Optional[str] = ..., action: _Optional[str] = ..., record_hmac: _Optional[str] = ..., owner_hmac: _Optional[str] = ..., outcome: _Optional[str] = ..., detail: _Optional[str] = ..., prev_hash: _Optional[bytes] = ..., hash: _Optional[bytes] = ..., raw: _Optional[bytes] = ..., instance: _Optional[str] = ..., checkpoint_seq: _Optional[int] = ..., checkpoint_hash: _Optional[bytes] = ...) -> None: ...

class PruneAuditRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PruneAuditResponse(_message.Message):
    __slots__ = ("pruned",)
    PRUNED_FIELD_NUMBER: _ClassVar[int]
    pruned: int
    def __init__(self, pruned: _Optional[int] = ...) -> None: ...

class ListDeliveriesRequest(_message.Message):
    __slots__ = ("endpoint", "finished", "page_token", "page_size")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    finished: bool
    page_token: str
    page_size: int
    def __init__(self, endpoint: _Optional[str] = ..., finished: _Optional[bool] = ..., page_token: _Optional[str] = ..., page_size: _Optional[int] = ...) -> None: ...

class Delivery(_message.Message):
    __slots__ = ("id", "event_id", "type", "endpoint", "record_id", "state", "attempts", "created_at", "next_attempt_at", "finished_at", "last_error", "body")
    ID_FIELD_NUMBER: _ClassVar[int]
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    RECORD_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    NEXT_ATTEMPT_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    id: str
    event_id: str
    type: str
    endpoint: str
    record_id: str
    state: str
    attempts: int
    created_at: int
    next_attempt_at: int
    finished_at: int
    last_error: str
    body: str
    def __init__(self, id: _Optional[str] = ..., event_id: _Optional[str] = ..., type: _Optional[str] = ..., endpoint: _Optional[str] = ..., record_id: _Optional[str] = ..., state: _Optional[str] = ..., attempts: _Optional[int] = ..., created_at: _Optional[int] = ..., next_attempt_at: _Optional[int] = ..., finished_at: _Optional[int] = ..., last_error: _Optional[str] = ..., body: _Optional[str] = ...) -> None: ...

class ListDeliveriesResponse(_message.Message):
    __slots__ = ("deliveries", "next_page_token")
    DELIVERIES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    deliveries: _containers.RepeatedCompositeFieldContainer[Delivery]
    next_page_token: str
    def __init__(self, deliveries: _Optional[_Iterable[_Union[Delivery, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RetryDeliveryRequest(_message.Message):
    __slots__ = ("endpoint", "id")
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    endpoint: str
    id: str
    def __init__(self, endpoint: _Optional[str] = ..., id: _Optional[str] = ...) -> None: ...

class RetryDeliveryResponse(_message.Message):
    __slots__ = ("delivery",)
    DELIVERY_FIELD_NUMBER: _ClassVar[int]
    delivery: Delivery
    def __init__(self, delivery: _Optional[_Union[Delivery, _Mapping]] = ...) -> None: ...
