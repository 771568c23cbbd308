"""Seal secrets for a tokenvault daemon and store them over its HTTP/JSON ingest routes.

Written from docs/ENVELOPE.md and the README's "HTTP/JSON for web tiers" alone, with the
``cryptography`` package and the standard library. The web tier holds the vault's public key
only: it can seal and store, never read back. An RSA key gives envelope v1; an X-Wing key
(``algorithm`` ``x-wing``) gives envelope v2, its data key sealed with ``cryptography``'s HPKE
(version 47 or later).

    client = Client("https://vault.internal:50052", credential, ca_file="vault-ca.pem")
    key = client.public_key()
    envelope = seal(key["spkiPem"], "github:user-42", "user-42", "github", "access_token", token)
    version = client.put_sealed("github:user-42", "user-42", "github", "access_token", envelope)

``https://`` is required unless the daemon is on loopback (``http://127.0.0.1:…``,
``http://[::1]:…``, ``http://localhost:…``): the credential and the envelopes would otherwise
cross the network in the clear. Refusals raise :class:`TokenvaultError`; a daemon that cannot
be reached raises :class:`VaultUnreachable`, a subclass.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import os
import ssl
import struct
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Union

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = ["KINDS", "seal", "Client", "TokenvaultError", "VaultUnreachable", "__version__"]

__version__ = "0.1.0"

#: The kind strings bound in the associated data, and their ``SecretKind`` names on the wire.
KINDS: Dict[str, str] = {
    "access_token": "SECRET_KIND_ACCESS_TOKEN",
    "refresh_token": "SECRET_KIND_REFRESH_TOKEN",
    "client_secret": "SECRET_KIND_CLIENT_SECRET",
    "api_key": "SECRET_KIND_API_KEY",
    "token_bundle": "SECRET_KIND_TOKEN_BUNDLE",
}
_LABEL = b"tokenvault/v1/dek"
_MAGIC = b"TVE\x01"
_MAGIC_V2 = b"TVE\x02"
#: The SubjectPublicKeyInfo of an X-Wing key is these 24 bytes (``id-XWing``, no parameters,
#: the BIT STRING header), then the 1,216-byte encapsulation key.
_XWING_SPKI_PREFIX = bytes.fromhex("308204d4300d060b2b0601040183e62d81c87a038204c100")
_KEM_XWING = 0x647A
_HPKE_INFO_LABEL = b"tokenvault/v2/dek"


def _lp(text: str) -> bytes:
    b = text.encode("utf-8")
    return struct.pack(">I", len(b)) + b


def seal(
    spki_pem: str,
    record_id: str,
    owner: str,
    provider: str,
    kind: str,
    secret: Union[bytes, bytearray],
    *,
    _dek: Optional[bytes] = None,
    _nonce: Optional[bytes] = None,
) -> bytes:
    """Returns the envelope (bytes) of ``secret`` for the record's identity.

    ``spki_pem`` is the active public key's ``spkiPem`` (``GET /v1/public-keys``). ``_dek`` and
    ``_nonce`` exist for known-answer tests only; never pass them otherwise.
    """
    if kind not in KINDS:
        raise ValueError("unknown kind %r; one of %s" % (kind, ", ".join(KINDS)))
    if not isinstance(secret, (bytes, bytearray)) or not 1 <= len(secret) <= 65536:
        raise ValueError("a secret is 1 to 65536 bytes")
    der = _pem_der(spki_pem)
    if der is not None and len(der) == len(_XWING_SPKI_PREFIX) + 1216 and der.startswith(_XWING_SPKI_PREFIX):
        return _seal_v2(der, record_id, owner, provider, kind, bytes(secret), _dek, _nonce)
    pk = serialization.load_pem_public_key(spki_pem.encode("ascii"))
    if not isinstance(pk, rsa.RSAPublicKey) or not 2048 <= pk.key_size <= 4096:
        raise ValueError("the vault's key is RSA, 2048 to 4096 bits, or X-Wing")
    spki_der = pk.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    dek = _dek if _dek is not None else os.urandom(32)
    nonce = _nonce if _nonce is not None else os.urandom(12)
    aad = _MAGIC + _lp(record_id) + _lp(owner) + _lp(provider) + _lp(kind)
    ct_and_tag = AESGCM(dek).encrypt(nonce, bytes(secret), aad)
    wrapped = pk.encrypt(
        dek,
        padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=_LABEL),
    )
    return (
        _MAGIC
        + hashlib.sha256(spki_der).digest()
        + struct.pack(">H", len(wrapped))
        + wrapped
        + nonce
        + ct_and_tag
    )


def _pem_der(pem: str) -> Optional[bytes]:
    """The DER of a ``PUBLIC KEY`` PEM block, or None."""
    lines = [line.strip() for line in pem.strip().splitlines()]
    if len(lines) < 3 or lines[0] != "-----BEGIN PUBLIC KEY-----" or lines[-1] != "-----END PUBLIC KEY-----":
        return None
    try:
        return base64.b64decode("".join(lines[1:-1]), validate=True)
    except ValueError:
        return None


def _seal_v2(
    spki_der: bytes,
    record_id: str,
    owner: str,
    provider: str,
    kind: str,
    secret: bytes,
    dek: Optional[bytes],
    nonce: Optional[bytes],
) -> bytes:
    """Envelope v2: v1's token ciphertext (its associated data keeps the version byte 01), the
    data key sealed with HPKE base mode (X-Wing, HKDF-SHA256, AES-256-GCM) to the X-Wing key."""
    try:
        from cryptography.hazmat.primitives import hpke
        from cryptography.hazmat.primitives.asymmetric import mlkem, x25519
    except ImportError:
        raise ValueError("sealing to an X-Wing key needs cryptography 47 or later (HPKE with X-Wing)") from None
    raw = spki_der[len(_XWING_SPKI_PREFIX):]
    public_key = hpke.MLKEM768X25519PublicKey(
        mlkem.MLKEM768PublicKey.from_public_bytes(raw[:1184]),
        x25519.X25519PublicKey.from_public_bytes(raw[1184:]),
    )
    fingerprint = hashlib.sha256(spki_der).digest()
    dek = dek if dek is not None else os.urandom(32)
    nonce = nonce if nonce is not None else os.urandom(12)
    aad = _MAGIC + _lp(record_id) + _lp(owner) + _lp(provider) + _lp(kind)
    token = AESGCM(dek).encrypt(nonce, secret, aad)
    suite = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    info = _HPKE_INFO_LABEL + struct.pack(">H", _KEM_XWING) + fingerprint
    # enc (1,120 bytes) followed by the sealed data key (48 bytes).
    enc_and_sealed = suite.encrypt(dek, public_key, info)
    return (
        _MAGIC_V2
        + struct.pack(">H", _KEM_XWING)
        + fingerprint
        + struct.pack(">H", len(enc_and_sealed) - 48)
        + enc_and_sealed
        + nonce
        + token
    )


class TokenvaultError(Exception):
    """A refusal: ``code`` is the gRPC code name (``ALREADY_EXISTS``), ``status`` the HTTP one."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__("%s (HTTP %d): %s" % (code, status, message))
        self.status = status
        self.code = code
        self.message = message


class VaultUnreachable(TokenvaultError):
    """The daemon could not be reached or did not answer (``code`` ``UNAVAILABLE``, ``status``
    0): refused connection, TLS failure, timeout. Nothing is known to have been written; a write
    retried with the same envelope is answered with the version it stored, if it did."""

    def __init__(self, message: str) -> None:
        super().__init__(0, "UNAVAILABLE", message)


def _is_loopback(host: Optional[str]) -> bool:
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Client:
    """The daemon's HTTP/JSON ingest routes, with an ingest credential."""

    def __init__(
        self,
        base_url: str,
        credential: str,
        ca_file: Optional[str] = None,
        timeout: float = 10.0,
    ) -> None:
        self._base = base_url.rstrip("/")
        self._credential = credential
        self._timeout = timeout
        self._context: Optional[ssl.SSLContext] = None
        url = urllib.parse.urlsplit(self._base)
        if url.scheme == "https":
            self._context = ssl.create_default_context(cafile=ca_file)
        elif url.scheme == "http":
            if not _is_loopback(url.hostname):
                raise ValueError(
                    "base_url must be https:// unless the daemon is on loopback "
                    "(http://127.0.0.1, http://[::1] or http://localhost)"
                )
        else:
            raise ValueError("base_url must be https:// (or http:// on loopback)")

    def __repr__(self) -> str:
        return "Client(%r, credential=[REDACTED])" % self._base

    def _call(self, method: str, path: str, body: Optional[Mapping[str, Any]] = None) -> Any:
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(self._base + path, data=data, method=method)
        request.add_header("Authorization", "Bearer " + self._credential)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(request, timeout=self._timeout, context=self._context) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            try:
                err = json.loads(e.read())
                raise TokenvaultError(e.code, err["code"], err["message"]) from None
            except (ValueError, KeyError, TypeError):
                raise TokenvaultError(e.code, "UNKNOWN", "HTTP %d without a JSON error" % e.code) from None
        except (urllib.error.URLError, OSError) as e:
            # Refused connections, TLS failures and timeouts; the credential is not in the text.
            reason = getattr(e, "reason", e)
            raise VaultUnreachable("cannot reach %s: %s" % (self._base, reason)) from None

    def public_key(self) -> Dict[str, Any]:
        """The active key: ``version``, ``fingerprint``, ``spkiPem``, ``state``, ``createdAt``,
        ``algorithm`` (``rsa-2048``, ``rsa-3072``, ``rsa-4096`` or ``x-wing``) and ``publicKey``
        (base64). :func:`seal` takes ``spkiPem`` whatever the algorithm."""
        active: Dict[str, Any] = self._call("GET", "/v1/public-keys")["active"]
        return active

    @staticmethod
    def _item(
        record_id: str,
        owner: str,
        provider: str,
        kind: str,
        envelope: bytes,
        scopes: Iterable[str] = (),
        expires_at: int = 0,
        expected_version: int = 0,
    ) -> Dict[str, Any]:
        return {
            "record": {
                "meta": {
                    "id": record_id,
                    "owner": owner,
                    "provider": provider,
                    "kind": KINDS[kind],
                    "scopes": list(scopes),
                    "expiresAt": str(int(expires_at)),
                },
                "envelope": base64.b64encode(envelope).decode("ascii"),
            },
            "expectedVersion": str(int(expected_version)),
        }

    def put_sealed(
        self,
        record_id: str,
        owner: str,
        provider: str,
        kind: str,
        envelope: bytes,
        scopes: Iterable[str] = (),
        expires_at: int = 0,
        expected_version: int = 0,
    ) -> int:
        """Stores one sealed record; returns its new version. ``expected_version`` 0 creates."""
        body = self._item(record_id, owner, provider, kind, envelope, scopes, expires_at, expected_version)
        return int(self._call("POST", "/v1/records", body)["version"])

    def exchange_code(
        self,
        record_id: str,
        owner: str,
        provider: str,
        code: str,
        code_verifier: str,
        redirect_uri: str,
        scopes: Iterable[str] = (),
        expected_version: int = 0,
    ) -> Dict[str, Any]:
        """Has the daemon redeem an OAuth authorization code and store the token bundle.

        Returns ``{"id", "version", "expiresAt", "scopes"}``, never a token: the web tier does not
        see the tokens, and the client secret stays in the vault.
        """
        body = {
            "meta": {"id": record_id, "owner": owner, "provider": provider, "scopes": list(scopes)},
            "code": code,
            "codeVerifier": code_verifier,
            "redirectUri": redirect_uri,
            "expectedVersion": str(int(expected_version)),
        }
        answer: Dict[str, Any] = self._call("POST", "/v1/code-exchange", body)
        return answer

    def put_sealed_batch(self, items: Sequence[Mapping[str, Any]]) -> List[int]:
        """Stores several records atomically; ``items`` are dicts of ``put_sealed``'s arguments."""
        body = {"items": [self._item(**item) for item in items]}
        return [int(v) for v in self._call("POST", "/v1/records:batch", body)["versions"]]
