"""A backend worker's client for a tokenvault daemon (`tokenvault.v1.Broker` over gRPC).

    from tokenvault_worker import Worker

    with Worker("vault.internal:50051", credential=os.environ["TOKENVAULT_WORKER_TOKEN"],
                root_certificates=open("ca.pem", "rb").read()) as vault:
        token = vault.get_token("github:user-42")       # token.secret never prints its value
        answer = vault.proxy("github:user-42", "GET", "/user")  # the worker never sees the token

Every call has a deadline (`timeout`, default 10 s). Calls that may be repeated safely
(`get_token`, `revoke_grant`, and `proxy` with an idempotent HTTP method) are retried on
UNAVAILABLE with exponential backoff and jitter within that deadline; the others never are.
A refusal raises a `TokenvaultError` subclass carrying the gRPC code, the message and the
`google.rpc.ErrorInfo` reason and metadata when the daemon sent one.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Sequence, TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from ._pb import tokenvault_pb2 as pb
from ._pb import tokenvault_pb2_grpc as pb_grpc

__all__ = [
    "Worker",
    "Secret",
    "Token",
    "ProxyResponse",
    "Grant",
    "TokenvaultError",
    "InvalidArgument",
    "Unauthenticated",
    "PermissionDenied",
    "NotFound",
    "AlreadyExists",
    "Aborted",
    "FailedPrecondition",
    "ResourceExhausted",
    "Unavailable",
    "DeadlineExceeded",
    "DataLoss",
    "Internal",
]

T = TypeVar("T")

#: HTTP methods whose repetition is harmless: a `proxy` call with one is retried.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


class Secret:
    """A secret value (a token, a grant handle). `repr` and `str` never show it; `reveal()`
    does, for the one place that needs it."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes) -> None:
        self._value = bytes(value)

    def reveal(self) -> bytes:
        return self._value

    def reveal_text(self) -> str:
        return self._value.decode("utf-8")

    def __len__(self) -> int:
        return len(self._value)

    def __repr__(self) -> str:
        return f"Secret(<{len(self._value)} bytes>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        import hmac

        return isinstance(other, Secret) and hmac.compare_digest(self._value, other._value)

    def __hash__(self) -> int:
        return hash(len(self._value))


@dataclass(frozen=True)
class Token:
    """`GetToken`'s answer: the record's metadata and its secret."""

    record_id: str
    owner: str
    provider: str
    kind: str
    version: int
    key_version: int
    expires_at: int
    secret: Secret


@dataclass(frozen=True)
class ProxyResponse:
    """The upstream's answer to a `proxy` call (its 4xx/5xx are answers, not errors)."""

    status: int
    headers: list[tuple[str, bytes]]
    body: bytes
    refreshed: bool


@dataclass(frozen=True)
class Grant:
    """An issued grant: the handle to give a less trusted worker, and its id."""

    grant: Secret
    grant_id: str
    expires_at: int


class TokenvaultError(Exception):
    """A call the daemon refused or could not answer."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        reason: str = "",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message
        #: `google.rpc.ErrorInfo.reason` (e.g. `STALE_VERSION`), or "".
        self.reason = reason
        #: `google.rpc.ErrorInfo.metadata`.
        self.metadata: dict[str, str] = dict(metadata or {})


class InvalidArgument(TokenvaultError):
    pass


class Unauthenticated(TokenvaultError):
    pass


class PermissionDenied(TokenvaultError):
    pass


class NotFound(TokenvaultError):
    pass


class AlreadyExists(TokenvaultError):
    pass


class Aborted(TokenvaultError):
    pass


class FailedPrecondition(TokenvaultError):
    pass


class ResourceExhausted(TokenvaultError):
    pass


class Unavailable(TokenvaultError):
    pass


class DeadlineExceeded(TokenvaultError):
    pass


class DataLoss(TokenvaultError):
    pass


class Internal(TokenvaultError):
    pass


_BY_CODE: dict[grpc.StatusCode, type[TokenvaultError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.ALREADY_EXISTS: AlreadyExists,
    grpc.StatusCode.ABORTED: Aborted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: DeadlineExceeded,
    grpc.StatusCode.DATA_LOSS: DataLoss,
    grpc.StatusCode.INTERNAL: Internal,
}


def _error(e: grpc.RpcError) -> TokenvaultError:
    code = e.code() if isinstance(e, grpc.Call) else grpc.StatusCode.UNKNOWN
    message = e.details() if isinstance(e, grpc.Call) else str(e)
    reason, metadata = "", {}
    status = rpc_status.from_call(e) if isinstance(e, grpc.Call) else None
    for detail in status.details if status is not None else []:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            reason, metadata = info.reason, dict(info.metadata)
    return _BY_CODE.get(code, TokenvaultError)(code, message or "", reason, metadata)


class Worker:
    """A connection to one daemon (or its load balancer) as one worker identity.

    `target` is `host:port`. Over TLS give `root_certificates` (the daemon's CA, PEM; None:
    the system roots) and, for mutual TLS, `private_key` and `certificate_chain`; `insecure`
    is for a plaintext loopback daemon only. `credential` is the bearer credential (not needed
    when the client certificate identifies the worker)."""

    def __init__(
        self,
        target: str,
        *,
        credential: str | None = None,
        root_certificates: bytes | None = None,
        private_key: bytes | None = None,
        certificate_chain: bytes | None = None,
        server_name: str | None = None,
        insecure: bool = False,
        timeout: float = 10.0,
        max_attempts: int = 4,
        backoff: float = 0.1,
    ) -> None:
        if timeout <= 0 or max_attempts < 1 or backoff < 0:
            raise ValueError("timeout > 0, max_attempts >= 1 and backoff >= 0 are required")
        options: list[tuple[str, str | int]] = []
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if insecure:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            creds = grpc.ssl_channel_credentials(
                root_certificates=root_certificates,
                private_key=private_key,
                certificate_chain=certificate_chain,
            )
            self._channel = grpc.secure_channel(target, creds, options=options)
        self._stub = pb_grpc.BrokerStub(self._channel)  # type: ignore[no-untyped-call]
        self._metadata: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {credential}"),) if credential else ()
        )
        self._timeout = timeout
        self._max_attempts = max_attempts
        self._backoff = backoff

    def __repr__(self) -> str:
        return "Worker(<connection>)"

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> "Worker":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, fn: Callable[[float], T], timeout: float | None, retry: bool) -> T:
        deadline = time.monotonic() + (timeout or self._timeout)
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DeadlineExceeded(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed")
            try:
                return fn(remaining)
            except grpc.RpcError as e:
                err = _error(e)
                if not (retry and isinstance(err, Unavailable) and attempt < self._max_attempts):
                    raise err from None
            # Full jitter below an exponential cap: retries of many workers spread out.
            pause = random.uniform(0, min(2.0, self._backoff * (2 ** (attempt - 1))))
            if time.monotonic() + pause >= deadline:
                raise err
            time.sleep(pause)

    def get_token(self, record_id: str, *, timeout: float | None = None) -> Token:
        """The record's secret (a token bundle's JSON for `token_bundle` records), refreshed
        by the daemon first if it is about to expire."""
        request = pb.GetTokenRequest(id=record_id)
        r = self._call(
            lambda t: self._stub.GetToken(request, timeout=t, metadata=self._metadata),
            timeout,
            retry=True,
        )
        meta = r.info.meta
        return Token(
            record_id=meta.id,
            owner=meta.owner,
            provider=meta.provider,
            kind=pb.SecretKind.Name(meta.kind),
            version=r.info.version,
            key_version=r.info.key_version,
            expires_at=meta.expires_at,
            secret=Secret(r.secret),
        )

    def proxy(
        self,
        record_id: str,
        method: str,
        path: str,
        *,
        headers: Iterable[tuple[str, str | bytes]] = (),
        body: bytes = b"",
        grant: Secret | str | None = None,
        timeout: float | None = None,
    ) -> ProxyResponse:
        """Calls the record's provider with its credential injected by the daemon; `path` is
        relative to the provider's base URL. Retried on UNAVAILABLE only for idempotent
        methods."""
        handle = grant.reveal_text() if isinstance(grant, Secret) else (grant or "")
        request = pb.ProxyRequest(
            id=record_id,
            method=method,
            path=path,
            headers=[
                pb.HttpHeader(name=n, value=v.encode() if isinstance(v, str) else v)
                for n, v in headers
            ],
            body=body,
            grant=handle,
        )
        r = self._call(
            lambda t: self._stub.Proxy(request, timeout=t, metadata=self._metadata),
            timeout,
            retry=method.upper() in IDEMPOTENT_METHODS,
        )
        return ProxyResponse(
            status=r.status,
            headers=[(h.name, h.value) for h in r.headers],
            body=r.body,
            refreshed=r.refreshed,
        )

    def issue_grant(
        self,
        *,
        record_id: str = "",
        owner: str = "",
        methods: Sequence[str] = (),
        path_prefixes: Sequence[str] = (),
        ttl_seconds: int = 0,
        max_uses: int = 0,
        audience: str = "",
        timeout: float | None = None,
    ) -> Grant:
        """A downscoped, expiring handle for `proxy` (docs/PROXY.md); never retried (a retry
        could mint a second grant)."""
        request = pb.IssueGrantRequest(
            id=record_id,
            owner=owner,
            methods=list(methods),
            path_prefixes=list(path_prefixes),
            ttl_seconds=ttl_seconds,
            max_uses=max_uses,
            audience=audience,
        )
        r = self._call(
            lambda t: self._stub.IssueGrant(request, timeout=t, metadata=self._metadata),
            timeout,
            retry=False,
        )
        return Grant(grant=Secret(r.grant.encode()), grant_id=r.grant_id, expires_at=r.expires_at)

    def revoke_grant(self, grant: Grant | Secret | str, *, timeout: float | None = None) -> None:
        """Revokes a grant (by the grant, its handle or its id). One already revoked or
        expired raises NotFound; a repeat changes nothing, so UNAVAILABLE is retried."""
        if isinstance(grant, Grant):
            value = grant.grant_id
        elif isinstance(grant, Secret):
            value = grant.reveal_text()
        else:
            value = grant
        request = pb.RevokeGrantRequest(grant_id=value)
        self._call(
            lambda t: self._stub.RevokeGrant(request, timeout=t, metadata=self._metadata),
            timeout,
            retry=True,
        )
