"""AES-256-GCM encryption of stored secrets, and its key from the environment."""

from __future__ import annotations

import base64
import secrets
import stat
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mcp_authdb.errors import AuthDBError, ConfigurationError, InvalidValueError
from mcp_authdb.server.crypto import (
    ENCRYPTION_KEY_VARIABLE,
    FORMAT_VERSION,
    NONCE_BYTES,
    TAG_BYTES,
    DecryptionError,
    Encryptor,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
CONTEXT = "client-secret:client-1"
SECRET = "s3cret value ünïcode"


def test_round_trip() -> None:
    encryptor = Encryptor(KEY)

    blob = encryptor.encrypt(SECRET, context=CONTEXT)

    assert encryptor.decrypt(blob, context=CONTEXT) == SECRET


def test_layout_is_version_nonce_ciphertext_tag() -> None:
    blob = Encryptor(KEY).encrypt(SECRET, context=CONTEXT)
    plaintext = SECRET.encode("utf-8")

    assert blob[:1] == FORMAT_VERSION
    assert len(blob) == 1 + NONCE_BYTES + len(plaintext) + TAG_BYTES
    # The standard primitive opens it with the version byte and context as AAD.
    nonce = blob[1 : 1 + NONCE_BYTES]
    aad = FORMAT_VERSION + CONTEXT.encode("utf-8")
    assert AESGCM(KEY).decrypt(nonce, blob[1 + NONCE_BYTES :], aad) == plaintext


def test_each_value_gets_new_nonce() -> None:
    encryptor = Encryptor(KEY)

    blobs = {encryptor.encrypt(SECRET, context=CONTEXT) for _ in range(50)}
    nonces = {blob[1 : 1 + NONCE_BYTES] for blob in blobs}

    assert len(blobs) == 50
    assert len(nonces) == 50


def test_ciphertext_hides_plaintext() -> None:
    blob = Encryptor(KEY).encrypt("A" * 64, context=CONTEXT)

    assert b"AAAA" not in blob


def test_empty_plaintext_round_trip() -> None:
    encryptor = Encryptor(KEY)

    blob = encryptor.encrypt("", context=CONTEXT)

    assert len(blob) == 1 + NONCE_BYTES + TAG_BYTES
    assert encryptor.decrypt(blob, context=CONTEXT) == ""


def test_wrong_context_rejected() -> None:
    encryptor = Encryptor(KEY)
    blob = encryptor.encrypt(SECRET, context=CONTEXT)

    with pytest.raises(DecryptionError) as raised:
        encryptor.decrypt(blob, context="client-secret:client-2")

    assert "client-secret" in str(raised.value)
    assert "client-2" not in str(raised.value)
    assert ENCRYPTION_KEY_VARIABLE in str(raised.value)


def test_wrong_key_rejected() -> None:
    blob = Encryptor(KEY).encrypt(SECRET, context=CONTEXT)

    with pytest.raises(DecryptionError) as raised:
        Encryptor(OTHER_KEY).decrypt(blob, context=CONTEXT)

    message = str(raised.value)
    assert SECRET not in message
    assert KEY.hex() not in message
    assert OTHER_KEY.hex() not in message
    assert blob.hex() not in message


@pytest.mark.parametrize(
    "position",
    [
        pytest.param(1, id="nonce"),
        pytest.param(1 + NONCE_BYTES, id="ciphertext"),
        pytest.param(-1, id="tag"),
    ],
)
def test_changed_byte_rejected(position: int) -> None:
    encryptor = Encryptor(KEY)
    blob = bytearray(encryptor.encrypt(SECRET, context=CONTEXT))
    blob[position] ^= 0x01

    with pytest.raises(DecryptionError, match="failed authentication"):
        encryptor.decrypt(bytes(blob), context=CONTEXT)


def test_unknown_version_rejected() -> None:
    encryptor = Encryptor(KEY)
    blob = encryptor.encrypt(SECRET, context=CONTEXT)

    with pytest.raises(DecryptionError, match="format version 2"):
        encryptor.decrypt(b"\x02" + blob[1:], context=CONTEXT)
    with pytest.raises(DecryptionError, match="format version None"):
        encryptor.decrypt(b"", context=CONTEXT)


def test_cut_value_rejected() -> None:
    encryptor = Encryptor(KEY)
    blob = encryptor.encrypt("", context=CONTEXT)

    with pytest.raises(DecryptionError, match="was cut"):
        encryptor.decrypt(blob[:-1], context=CONTEXT)


def test_memoryview_accepted() -> None:
    # psycopg may return bytea as memoryview, depending on the loader.
    encryptor = Encryptor(KEY)
    blob = encryptor.encrypt(SECRET, context=CONTEXT)

    assert encryptor.decrypt(memoryview(blob), context=CONTEXT) == SECRET  # type: ignore[arg-type]


def test_decryption_error_is_project_error() -> None:
    assert issubclass(DecryptionError, AuthDBError)


def test_empty_context_rejected() -> None:
    with pytest.raises(InvalidValueError, match="context"):
        Encryptor(KEY).encrypt(SECRET, context="")


@pytest.mark.parametrize("key", [b"", bytes(16), bytes(33), "0" * 64])
def test_key_of_wrong_size_rejected(key: object) -> None:
    with pytest.raises(InvalidValueError, match="32 random bytes"):
        Encryptor(key)  # type: ignore[arg-type]


def test_repr_hides_key() -> None:
    text = repr(Encryptor(KEY))

    assert text == "Encryptor(AES-256-GCM)"


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(KEY.hex(), id="hex"),
        pytest.param(KEY.hex().upper(), id="hex-upper"),
        pytest.param(base64.b64encode(KEY).decode(), id="base64"),
        pytest.param(base64.b64encode(KEY).decode().rstrip("="), id="base64-unpadded"),
        pytest.param(base64.urlsafe_b64encode(KEY).decode(), id="base64url"),
        pytest.param(
            base64.urlsafe_b64encode(KEY).decode().rstrip("="), id="base64url-unpadded"
        ),
        pytest.param(f"  {KEY.hex()}\n", id="whitespace"),
    ],
)
def test_key_formats_from_env(text: str) -> None:
    blob = Encryptor(KEY).encrypt(SECRET, context=CONTEXT)

    encryptor = Encryptor.from_env({ENCRYPTION_KEY_VARIABLE: text}, key_file=None)

    assert encryptor.decrypt(blob, context=CONTEXT) == SECRET


def test_base64_alphabets_give_same_key() -> None:
    # This key's base64 contains both '+' and '/', which base64url writes as
    # '-' and '_'.
    key = bytes([0xFB, 0xFF, 0xBF] * 10 + [0, 1])
    standard = base64.b64encode(key).decode()
    assert "+" in standard
    assert "/" in standard
    blob = Encryptor(key).encrypt(SECRET, context=CONTEXT)

    for text in (standard, base64.urlsafe_b64encode(key).decode()):
        encryptor = Encryptor.from_env({ENCRYPTION_KEY_VARIABLE: text}, key_file=None)
        assert encryptor.decrypt(blob, context=CONTEXT) == SECRET


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        pytest.param(KEY.hex()[:-2], "has 62 hex digits", id="hex-short"),
        pytest.param(
            base64.b64encode(bytes(range(48))).decode(),
            "decodes to 48 bytes",
            id="base64-long",
        ),
        pytest.param("zz" * 32, "decodes to 48 bytes", id="non-hex-letters"),
        pytest.param("key with spaces and !", "neither 64 hex digits", id="garbage"),
        pytest.param("g" * 41, "neither 64 hex digits", id="impossible-length"),
    ],
)
def test_invalid_key_names_variable_not_value(text: str, problem: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        Encryptor.from_env({ENCRYPTION_KEY_VARIABLE: text}, key_file=None)

    message = str(raised.value)
    assert ENCRYPTION_KEY_VARIABLE in message
    assert problem in message
    assert text.strip() not in message
    assert "secrets.token_hex(32)" in message


@pytest.mark.parametrize("environ", [{}, {ENCRYPTION_KEY_VARIABLE: ""}])
def test_missing_key_without_file(environ: dict[str, str]) -> None:
    with pytest.raises(ConfigurationError) as raised:
        Encryptor.from_env(environ, key_file=None)

    message = str(raised.value)
    assert f"{ENCRYPTION_KEY_VARIABLE} is not set" in message
    assert 'python -c "import secrets; print(secrets.token_hex(32))"' in message


def test_key_file_created_then_reused(tmp_path: Path) -> None:
    path = tmp_path / "data" / "encryption-key"

    first = Encryptor.from_env({}, key_file=path)
    blob = first.encrypt(SECRET, context=CONTEXT)
    second = Encryptor.from_env({}, key_file=path)

    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert second.decrypt(blob, context=CONTEXT) == SECRET
    assert [p.name for p in path.parent.iterdir()] == ["encryption-key"]


def test_variable_wins_over_key_file(tmp_path: Path) -> None:
    path = tmp_path / "encryption-key"
    blob = Encryptor(KEY).encrypt(SECRET, context=CONTEXT)

    encryptor = Encryptor.from_env({ENCRYPTION_KEY_VARIABLE: KEY.hex()}, key_file=path)

    assert encryptor.decrypt(blob, context=CONTEXT) == SECRET
    assert not path.exists()


def test_key_file_written_by_hand(tmp_path: Path) -> None:
    path = tmp_path / "encryption-key"
    path.write_text(f"# a comment\n\n{base64.b64encode(KEY).decode()}\n")
    path.chmod(0o600)
    blob = Encryptor(KEY).encrypt(SECRET, context=CONTEXT)

    encryptor = Encryptor.from_env({}, key_file=path)

    assert encryptor.decrypt(blob, context=CONTEXT) == SECRET


def test_concurrent_key_file_creation_agrees(tmp_path: Path) -> None:
    path = tmp_path / "encryption-key"
    barrier = threading.Barrier(8)
    encryptors: list[Encryptor] = []
    lock = threading.Lock()

    def load() -> None:
        barrier.wait()
        encryptor = Encryptor.from_env({}, key_file=path)
        with lock:
            encryptors.append(encryptor)

    threads = [threading.Thread(target=load) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    blob = Encryptor.from_env({}, key_file=path).encrypt(SECRET, context=CONTEXT)
    assert len(encryptors) == 8
    for encryptor in encryptors:
        assert encryptor.decrypt(blob, context=CONTEXT) == SECRET
    assert [p.name for p in tmp_path.iterdir()] == ["encryption-key"]


def test_readable_key_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "encryption-key"
    path.write_text(KEY.hex() + "\n")
    path.chmod(0o644)

    with pytest.raises(ConfigurationError) as raised:
        Encryptor.from_env({}, key_file=path)

    assert "mode 0644" in str(raised.value)
    assert f"chmod 600 {path}" in str(raised.value)
    assert KEY.hex() not in str(raised.value)


def test_symlinked_key_file_rejected(tmp_path: Path) -> None:
    target = tmp_path / "real-key"
    target.write_text(KEY.hex() + "\n")
    target.chmod(0o600)
    path = tmp_path / "encryption-key"
    path.symlink_to(target)

    with pytest.raises(ConfigurationError, match="symbolic link"):
        Encryptor.from_env({}, key_file=path)


def test_dangling_symlink_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    path = tmp_path / "encryption-key"
    path.symlink_to(target)

    with pytest.raises(ConfigurationError, match="symbolic link"):
        Encryptor.from_env({}, key_file=path)

    assert not target.exists()


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        pytest.param("# only a comment\n", "contains 0 key lines", id="no-key"),
        pytest.param(f"{KEY.hex()}\n{KEY.hex()}\n", "contains 2 key lines", id="two"),
        pytest.param("abc!\n", "neither 64 hex digits", id="invalid"),
    ],
)
def test_bad_key_file_rejected(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "encryption-key"
    path.write_text(content)
    path.chmod(0o600)

    with pytest.raises(ConfigurationError) as raised:
        Encryptor.from_env({}, key_file=path)

    assert problem in str(raised.value)
    assert str(path) in str(raised.value)


def test_large_file_rejected(tmp_path: Path) -> None:
    path = tmp_path / "encryption-key"
    path.write_bytes(secrets.token_hex(4096).encode())
    path.chmod(0o600)

    with pytest.raises(ConfigurationError, match="larger than 4096 bytes"):
        Encryptor.from_env({}, key_file=path)


def test_uncreatable_key_file_reported(tmp_path: Path) -> None:
    # A regular file where the folder should be fails even for root.
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")

    with pytest.raises(ConfigurationError) as raised:
        Encryptor.from_env({}, key_file=blocker / "encryption-key")

    assert "is not a folder" in str(raised.value)
    assert ENCRYPTION_KEY_VARIABLE in str(raised.value)


def test_derived_keys_are_stable_and_separate() -> None:
    first = Encryptor(b"a" * 32)
    same = Encryptor(b"a" * 32)
    other = Encryptor(b"b" * 32)

    key = first.derive_key("development identity provider")

    assert len(key) == 32
    assert key == same.derive_key("development identity provider")
    assert key != first.derive_key("another purpose")
    assert key != other.derive_key("development identity provider")
    assert key != b"a" * 32
