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
OK_V2 = sorted(p for p in VECTORS.glob("v2-ok-*.txt"))


def reseal(path):
    """The vector, its envelope, its DEK, and the envelope sealed again with its DEK and nonce."""
    v = vector(path)
    pem = (KEYS / ("%s.pub.pem" % v["sealed_with"])).read_text()
    dek, nonce = bytes.fromhex(v["dek"]), bytes.fromhex(v["nonce"])
    got = seal(pem, v["id"], v["owner"], v["provider"], v["kind"], bytes.fromhex(v["plaintext"]),
               _dek=dek, _nonce=nonce)
    return v, bytes.fromhex(v["envelope"]), dek, got


def _xwing_private_key(name):
    """The fixture's X-Wing private key for cryptography's HPKE: its 32-byte seed expanded with
    SHAKE256 into ML-KEM-768's 64-byte seed and X25519's key, as the X-Wing draft does."""
    import base64
    import hashlib

    from cryptography.hazmat.primitives import hpke
    from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

    lines = (KEYS / ("%s.key.pem" % name)).read_text().strip().splitlines()
    seed = base64.b64decode("".join(lines[1:-1]))[-32:]
    expanded = hashlib.shake_256(seed).digest(96)
    return hpke.MLKEM768X25519PrivateKey(
        mlkem.MLKEM768PrivateKey.from_seed_bytes(expanded[:64]),
        x25519.X25519PrivateKey.from_private_bytes(expanded[64:]),
    )


def _open_v2_dek(envelope, key_name):
    from cryptography.hazmat.primitives import hpke

    suite = hpke.Suite(hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM)
    info = b"tokenvault/v2/dek" + envelope[4:6] + envelope[6:38]
    n = int.from_bytes(envelope[38:40], "big")
    return suite.decrypt(envelope[40:40 + n + 48], _xwing_private_key(key_name), info)


@pytest.mark.parametrize("path", OK_V2, ids=[p.stem for p in OK_V2])
def test_sealing_to_an_x_wing_key_gives_the_v2_layout_around_the_vector_s_ciphertext(path):
    v, expected, dek, got = reseal(path)
    # Header (KEM id, fingerprint, enc length) and the token part byte for byte; HPKE's
    # encapsulation is randomized (cryptography takes no encapsulation seed), so enc and the
    # sealed data key differ, and open to the same data key.
    assert len(got) == len(expected)
    assert got[:40] == expected[:40]
    assert got[40 + 1120 + 48:] == expected[40 + 1120 + 48:]
    assert _open_v2_dek(got, v["sealed_with"]) == dek
    assert _open_v2_dek(expected, v["sealed_with"]) == dek


@pytest.mark.parametrize("path", OK, ids=[p.stem for p in OK])
def test_resealing_a_vector_with_its_dek_and_nonce_gives_its_bytes(path):
    v, expected, dek, got = reseal(path)
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
    with pytest.raises(ValueError, match="RSA, 2048 to 4096 bits, or X-Wing"):
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
# The harness runs the daemon part twice: with an RSA key, then after rotating to X-Wing.
PREFIX = os.environ.get("TOKENVAULT_TEST_PREFIX", "py-")
ALGORITHM = os.environ.get("TOKENVAULT_TEST_ALGORITHM", "rsa-2048")


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
    assert key["algorithm"] == ALGORITHM
    for path in OK:
        v = vector(path)
        envelope = seal(key["spkiPem"], PREFIX + path.stem, v["owner"], v["provider"], v["kind"],
                        bytes.fromhex(v["plaintext"]))
        assert envelope[3] == (2 if ALGORITHM == "x-wing" else 1)
        assert client.put_sealed(PREFIX + path.stem, v["owner"], v["provider"], v["kind"],
                                 envelope, scopes=["read"]) == 1
    items = [dict(record_id="%sbatch-%d" % (PREFIX, i), owner="o", provider="github", kind="api_key",
                  envelope=seal(key["spkiPem"], "%sbatch-%d" % (PREFIX, i), "o", "github", "api_key",
                                b"batch-%d" % i)) for i in range(3)]
    assert client.put_sealed_batch(items) == [1, 1, 1]


@needs_daemon
def test_refusals_carry_the_grpc_code_and_http_status():
    client = Client(URL, os.environ["TOKENVAULT_INGEST_TOKEN"], ca_file=CA)
    pem = client.public_key()["spkiPem"]
    dup = PREFIX + "dup"
    envelope = seal(pem, dup, "o", "github", "access_token", b"t")
    client.put_sealed(dup, "o", "github", "access_token", envelope)
    # The very same write again (a blind retry) answers the stored version; a new seal of the
    # same id is a conflict.
    assert client.put_sealed(dup, "o", "github", "access_token", envelope) == 1
    other = seal(pem, dup, "o", "github", "access_token", b"t")
    with pytest.raises(TokenvaultError) as e:
        client.put_sealed(dup, "o", "github", "access_token", other)
    assert (e.value.status, e.value.code) == (409, "ALREADY_EXISTS")
    with pytest.raises(TokenvaultError) as e:
        client.put_sealed(dup, "o", "github", "access_token", envelope, expected_version=9)
    assert (e.value.status, e.value.code) == (412, "ABORTED")
    with pytest.raises(TokenvaultError) as e:
        Client(URL, "tv_wrong", ca_file=CA).public_key()
    assert (e.value.status, e.value.code) == (401, "UNAUTHENTICATED")
