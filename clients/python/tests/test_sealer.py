"""The Python sealer against the shared vectors and, when the harness gives one, a daemon.

``tests/sealers.rs`` runs this with a daemon and reads the stored records back with
``tokenvault get``; alone, ``pytest clients/python`` runs the known-answer part only.
"""

import os
import pathlib

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

import tokenvault_sealer
from tokenvault_sealer import KINDS, Client, TokenvaultError, VaultUnreachable, seal

ROOT = pathlib.Path(__file__).resolve().parents[3]
VECTORS = ROOT / "tests" / "vectors"
KEYS = ROOT / "keys" / "test"


def vector(path):
    fields = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition(": ")
            fields[key] = value
    return fields


OK = sorted(p for p in VECTORS.glob("ok-*.txt"))


@pytest.mark.parametrize("path", OK, ids=[p.stem for p in OK])
def test_resealing_a_vector_with_its_dek_and_nonce_gives_its_bytes(path):
    v = vector(path)
    pem = (KEYS / ("%s.pub.pem" % v["sealed_with"])).read_text()
    expected = bytes.fromhex(v["envelope"])
    dek, nonce = bytes.fromhex(v["dek"]), bytes.fromhex(v["nonce"])
    got = seal(pem, v["id"], v["owner"], v["provider"], v["kind"], bytes.fromhex(v["plaintext"]),
               _dek=dek, _nonce=nonce)
    n = int.from_bytes(expected[36:38], "big")
    assert len(got) == len(expected)
    # Magic, version, fingerprint and length; then nonce, ciphertext and tag: byte for byte.
    assert got[:38] == expected[:38]
    assert got[38 + n:] == expected[38 + n:]
    # RSA-OAEP is randomized, so the wrapped DEK differs; it unwraps to the same DEK.
    private = serialization.load_pem_private_key(
        (KEYS / ("%s.key.pem" % v["sealed_with"])).read_bytes(), password=None)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(),
                        label=b"tokenvault/v1/dek")
    assert private.decrypt(got[38:38 + n], oaep) == dek


def test_bad_input_is_refused_before_anything_is_sealed():
    pem = (KEYS / "fixture-a.pub.pem").read_text()
    with pytest.raises(ValueError, match="unknown kind"):
        seal(pem, "a", "o", "p", "password", b"x")
    for secret in (b"", b"x" * 65537, "text"):
        with pytest.raises(ValueError, match="1 to 65536 bytes"):
            seal(pem, "a", "o", "p", "access_token", secret)
    with pytest.raises(ValueError, match="RSA, 2048 to 4096"):
        seal((KEYS / "fixture-ec.pub.pem").read_text(), "a", "o", "p", "access_token", b"x")
    with pytest.raises(ValueError):
        Client("ftp://x", "c")
    assert "c-secret" not in repr(Client("http://127.0.0.1:1", "c-secret"))


def test_plain_http_is_refused_off_loopback():
    for url in ("http://vault.example:50051", "http://10.0.0.5:50051", "http://[2001:db8::1]:1",
                "http://127.0.0.1.example.com:1"):
        with pytest.raises(ValueError, match="must be https://"):
            Client(url, "c")
    for url in ("http://127.0.0.1:1", "http://127.0.0.2:1", "http://[::1]:1",
                "http://localhost:1", "https://vault.example:50051"):
        Client(url, "c")


def test_an_unreachable_daemon_raises_the_package_s_own_error_without_the_credential():
    # Port 1 on loopback: nothing listens there, the connection is refused at once.
    with pytest.raises(VaultUnreachable) as e:
        Client("http://127.0.0.1:1", "c-secret-credential", timeout=5).public_key()
    assert isinstance(e.value, TokenvaultError)
    assert (e.value.status, e.value.code) == (0, "UNAVAILABLE")
    assert "c-secret-credential" not in str(e.value)


def test_the_version_is_the_package_s():
    pyproject = (pathlib.Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert 'version = "%s"' % tokenvault_sealer.__version__ in pyproject


URL = os.environ.get("TOKENVAULT_TEST_URL")
# The harness's daemon serves TLS with a certificate from this private CA.
CA = os.environ.get("TOKENVAULT_TEST_CA")
needs_daemon = pytest.mark.skipif(URL is None, reason="run by tests/sealers.rs with a daemon")


@needs_daemon
def test_the_daemon_s_private_ca_is_needed_and_enough():
    assert URL.startswith("https://")
    with pytest.raises(VaultUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
        Client(URL, os.environ["TOKENVAULT_INGEST_TOKEN"]).public_key()
    assert Client(URL, os.environ["TOKENVAULT_INGEST_TOKEN"], ca_file=CA).public_key()["version"] >= 1


@needs_daemon
def test_vectors_are_stored_over_http_json_for_the_harness_to_read_back():
    client = Client(URL, os.environ["TOKENVAULT_INGEST_TOKEN"], ca_file=CA)
    key = client.public_key()
    assert key["state"] == "KEY_STATE_ACTIVE"
    for path in OK:
        v = vector(path)
        envelope = seal(key["spkiPem"], "py-" + path.stem, v["owner"], v["provider"], v["kind"],
                        bytes.fromhex(v["plaintext"]))
        assert client.put_sealed("py-" + path.stem, v["owner"], v["provider"], v["kind"],
                                 envelope, scopes=["read"]) == 1
    items = [dict(record_id="py-batch-%d" % i, owner="o", provider="github", kind="api_key",
                  envelope=seal(key["spkiPem"], "py-batch-%d" % i, "o", "github", "api_key",
                                b"batch-%d" % i)) for i in range(3)]
    assert client.put_sealed_batch(items) == [1, 1, 1]


@needs_daemon
def test_refusals_carry_the_grpc_code_and_http_status():
    client = Client(URL, os.environ["TOKENVAULT_INGEST_TOKEN"], ca_file=CA)
    pem = client.public_key()["spkiPem"]
    envelope = seal(pem, "py-dup", "o", "github", "access_token", b"t")
    client.put_sealed("py-dup", "o", "github", "access_token", envelope)
    # The very same write again (a blind retry) answers the stored version; a new seal of the
    # same id is a conflict.
    assert client.put_sealed("py-dup", "o", "github", "access_token", envelope) == 1
    other = seal(pem, "py-dup", "o", "github", "access_token", b"t")
    with pytest.raises(TokenvaultError) as e:
        client.put_sealed("py-dup", "o", "github", "access_token", other)
    assert (e.value.status, e.value.code) == (409, "ALREADY_EXISTS")
    with pytest.raises(TokenvaultError) as e:
        client.put_sealed("py-dup", "o", "github", "access_token", envelope, expected_version=9)
    assert (e.value.status, e.value.code) == (412, "ABORTED")
    with pytest.raises(TokenvaultError) as e:
        Client(URL, "tv_wrong", ca_file=CA).public_key()
    assert (e.value.status, e.value.code) == (401, "UNAUTHENTICATED")
