"""tokenvault_worker against a real daemon over TLS with a private CA (and mutual TLS), which
the workspace's test command starts (tests/it/sdk.rs) with these records:

- `sdk-token`: an access token `sdk-secret-token` of provider github;
- `sdk-revoked`: revoked;
- the github provider pointing at a fake API whose `/api/me` needs `sdk-secret-token`.

The environment names the daemon (TOKENVAULT_TEST_TARGET, TOKENVAULT_TEST_CA), the worker's
bearer credential (TOKENVAULT_WORKER_TOKEN) and a client certificate the daemon maps to a
worker (TOKENVAULT_TEST_CLIENT_CERT, TOKENVAULT_TEST_CLIENT_KEY). The unit tests at the end
need no daemon.
"""

import os
import pathlib
import subprocess
import sys
import tempfile
import time

import grpc
import pytest

import tokenvault_worker as tv

TARGET = os.environ["TOKENVAULT_TEST_TARGET"]
CA = pathlib.Path(os.environ["TOKENVAULT_TEST_CA"]).read_bytes()
TOKEN = os.environ["TOKENVAULT_WORKER_TOKEN"]
HERE = pathlib.Path(__file__).resolve().parent.parent


def worker(**kw: object) -> tv.Worker:
    args: dict[str, object] = {"credential": TOKEN, "root_certificates": CA, "timeout": 5.0}
    args.update(kw)
    return tv.Worker(TARGET, **args)  # type: ignore[arg-type]


def test_get_token_returns_the_secret_and_never_prints_it() -> None:
    with worker() as vault:
        token = vault.get_token("sdk-token")
    assert token.secret.reveal() == b"sdk-secret-token"
    assert (token.record_id, token.provider, token.kind) == (
        "sdk-token",
        "github",
        "SECRET_KIND_ACCESS_TOKEN",
    )
    assert token.version == 1
    for shown in (repr(token), str(token), repr(token.secret), f"{token.secret}"):
        assert "sdk-secret-token" not in shown
    assert "Secret(<16 bytes>)" in repr(token)


def test_refusals_are_typed_errors_with_the_grpc_code() -> None:
    with worker() as vault:
        with pytest.raises(tv.NotFound) as e:
            vault.get_token("sdk-missing")
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(tv.FailedPrecondition):
            vault.get_token("sdk-revoked")
        with pytest.raises(tv.InvalidArgument):
            vault.get_token("bad id!")
    with worker(credential="tv_wrong_credential") as vault:
        with pytest.raises(tv.Unauthenticated) as e:
            vault.get_token("sdk-token")
        assert isinstance(e.value, tv.TokenvaultError)
        assert "tv_wrong" not in str(e.value)


def test_mutual_tls_identifies_the_worker_without_a_bearer_credential() -> None:
    cert = pathlib.Path(os.environ["TOKENVAULT_TEST_CLIENT_CERT"]).read_bytes()
    key = pathlib.Path(os.environ["TOKENVAULT_TEST_CLIENT_KEY"]).read_bytes()
    with worker(credential=None, private_key=key, certificate_chain=cert) as vault:
        assert vault.get_token("sdk-token").secret.reveal() == b"sdk-secret-token"
    with worker(credential=None) as vault:
        with pytest.raises(tv.Unauthenticated):
            vault.get_token("sdk-token")


def test_proxy_injects_the_token_and_policy_refusals_are_errors() -> None:
    with worker() as vault:
        answer = vault.proxy("sdk-token", "GET", "/me", headers=[("X-Request-Id", "sdk-1")])
        assert answer.status == 200
        assert b"octocat" in answer.body
        with pytest.raises(tv.PermissionDenied):
            vault.proxy("sdk-token", "GET", "http://elsewhere.example/")


def test_grants_proxy_until_revoked() -> None:
    with worker() as vault:
        grant = vault.issue_grant(record_id="sdk-token", methods=["GET"], ttl_seconds=60)
        assert "tvg_" not in repr(grant)
        assert vault.proxy("", "GET", "/me", grant=grant.grant).status == 200
        vault.revoke_grant(grant)
        with pytest.raises(tv.NotFound):  # gone: a second revocation changes nothing
            vault.revoke_grant(grant)
        with pytest.raises(tv.PermissionDenied):
            vault.proxy("", "GET", "/me", grant=grant.grant)


def test_an_unreachable_daemon_is_unavailable_within_the_deadline() -> None:
    started = time.monotonic()
    with tv.Worker("127.0.0.1:9", insecure=True, credential=TOKEN, timeout=2.0) as vault:
        with pytest.raises((tv.Unavailable, tv.DeadlineExceeded)):
            vault.get_token("sdk-token")
    assert time.monotonic() - started < 5


# Unit tests: no daemon.


class _Unavailable(grpc.RpcError, grpc.Call):  # type: ignore[misc]
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "down"

    def trailing_metadata(self) -> tuple[()]:
        return ()

    def initial_metadata(self) -> tuple[()]:
        return ()

    def time_remaining(self) -> None:
        return None

    def cancel(self) -> bool:
        return False

    def is_active(self) -> bool:
        return False

    def add_callback(self, callback: object) -> bool:
        return False


def _counting(fails: int) -> tuple[list[int], object]:
    calls: list[int] = []

    def fn(_timeout: float) -> str:
        calls.append(1)
        if len(calls) <= fails:
            raise _Unavailable()
        return "ok"

    return calls, fn


def test_only_idempotent_calls_are_retried_and_within_max_attempts() -> None:
    w = tv.Worker("127.0.0.1:9", insecure=True, max_attempts=3, backoff=0.001)
    calls, fn = _counting(2)
    assert w._call(fn, 1.0, retry=True) == "ok"  # type: ignore[arg-type]
    assert len(calls) == 3
    calls, fn = _counting(5)
    with pytest.raises(tv.Unavailable):
        w._call(fn, 1.0, retry=True)  # type: ignore[arg-type]
    assert len(calls) == 3
    calls, fn = _counting(1)
    with pytest.raises(tv.Unavailable):
        w._call(fn, 1.0, retry=False)  # type: ignore[arg-type]
    assert len(calls) == 1
    assert repr(w) == "Worker(<connection>)"
    w.close()


def test_the_committed_stubs_match_the_proto() -> None:
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([sys.executable, str(HERE / "generate.py"), out], check=True)
        committed = HERE / "tokenvault_worker" / "_pb"
        for name in ("tokenvault_pb2.py", "tokenvault_pb2.pyi", "tokenvault_pb2_grpc.py"):
            assert (pathlib.Path(out) / name).read_text() == (committed / name).read_text(), (
                f"{name} is stale: run python generate.py"
            )
