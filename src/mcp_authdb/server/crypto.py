"""Encryption of the secrets that the OAuth tables store: AES-256-GCM.

A stored value is ``b"\\x01" + nonce + ciphertext + tag``: a format version
byte, a 96-bit random nonce, and the GCM output with its 128-bit tag. Each
value is bound to a *context*, a string naming its purpose and owner such as
``"client-secret:" + client_id``, which is authenticated as associated data
(AAD) together with the version byte. A value copied into another row, or
read with another key, fails to decrypt instead of yielding the wrong secret.

With a 96-bit random nonce per value, one key should encrypt well under 2**32
values (NIST SP 800-38D, section 8.3), far above what an OAuth server writes.

The key comes from ``DB_ENCRYPTION_KEY``. With the embedded development
server, which passes a key file, a missing variable means the key is read from
that file, or generated into it on first use. Error messages name the
variable or file and never contain the key or a decrypted value.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import re
import secrets
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mcp_authdb.db.secret_file import SecretFile, read_secret_lines
from mcp_authdb.errors import AuthDBError, ConfigurationError, InvalidValueError

ENCRYPTION_KEY_VARIABLE = "DB_ENCRYPTION_KEY"
KEY_BYTES = 32
NONCE_BYTES = 12
TAG_BYTES = 16
FORMAT_VERSION = b"\x01"
# The shell command that prints a new key for DB_ENCRYPTION_KEY.
GENERATE_KEY_COMMAND = 'python -c "import secrets; print(secrets.token_hex(32))"'
# A key file is one key and a comment. Reading stops after this many bytes, so
# that a wrong path to a large file fails fast.
_KEY_FILE_MAX_BYTES = 4096

_HEX_KEY = re.compile(r"[0-9A-Fa-f]{64}")
_HEX_DIGITS = re.compile(r"[0-9A-Fa-f]+")
# Lengths of 32 bytes in base64, unpadded and padded.
_BASE64_KEY_LENGTHS = (43, 44)
_BASE64_KEY = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")
_HOW_TO_GENERATE = (
    f"set {ENCRYPTION_KEY_VARIABLE} to 32 random bytes written as 64 hex digits "
    f"or base64, for example the output of: {GENERATE_KEY_COMMAND}"
)


class DecryptionError(AuthDBError):
    """A stored value could not be decrypted.

    The key, the context or the format version differs from those it was
    encrypted with, or the value was changed. The message names the context
    and the cause, never the key or any part of the value.
    """


class Encryptor:
    """AES-256-GCM with a 96-bit random nonce per value.

    Build one with :meth:`from_env`, or pass 32 key bytes. ``repr`` does not
    show the key. Raises :class:`InvalidValueError` for a key that is not 32
    bytes.
    """

    __slots__ = ("_aead", "_derivation_key")

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            size = len(key) if isinstance(key, bytes) else None
            raise InvalidValueError(
                f"the encryption key is {type(key).__name__} of length {size}; "
                f"pass {KEY_BYTES} random bytes, such as secrets.token_bytes(32)"
            )
        self._aead = AESGCM(key)
        # Derived keys come from a key of their own, so no HMAC output is
        # ever made with the cipher's key itself.
        self._derivation_key = hmac.digest(key, b"mcp-authdb key derivation", "sha256")

    def __repr__(self) -> str:
        return "Encryptor(AES-256-GCM)"

    def derive_key(self, purpose: str) -> bytes:
        """Return a 32-byte key for ``purpose``, the same for the same key.

        Parts of the server that need a stable secret of their own, such as
        the development identity provider's signing key, derive it here, so
        that it survives restarts without a file of its own.
        """
        return hmac.digest(self._derivation_key, purpose.encode(), "sha256")

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str], *, key_file: Path | None
    ) -> Encryptor:
        """Build an encryptor from ``DB_ENCRYPTION_KEY`` in ``environ``.

        The variable contains 32 bytes as 64 hex digits, or as base64 in the
        standard or URL-safe alphabet with or without padding. Surrounding
        whitespace is ignored. When the variable is unset or empty and
        ``key_file`` is given, the key is read from that file, which is
        created with a new key and mode 0600 if missing. Raises
        :class:`ConfigurationError` naming the variable or the file, without
        its value, when the key is missing or invalid.
        """
        text = environ.get(ENCRYPTION_KEY_VARIABLE, "").strip()
        if text:
            return cls(parse_key(text, ENCRYPTION_KEY_VARIABLE))

        if key_file is None:
            raise ConfigurationError(
                f"{ENCRYPTION_KEY_VARIABLE} is not set, and it is required with "
                "DATABASE_URL outside --dev; " + _HOW_TO_GENERATE
            )
        return cls(_load_key_file(key_file))

    def encrypt(self, plaintext: str, *, context: str) -> bytes:
        """Encrypt ``plaintext`` (UTF-8) bound to ``context``.

        Returns the version byte, a new random nonce and the ciphertext with
        its tag. Decrypting needs the same key and the same context.
        """
        nonce = secrets.token_bytes(NONCE_BYTES)
        sealed = self._aead.encrypt(
            nonce, plaintext.encode("utf-8"), _associated_data(context)
        )
        return FORMAT_VERSION + nonce + sealed

    def decrypt(self, blob: bytes, *, context: str) -> str:
        """Return the plaintext that :meth:`encrypt` sealed with ``context``.

        Raises :class:`DecryptionError` when ``blob`` has an unknown format
        version or is too short, or when the key, the context or any byte
        differs from those at encryption.
        """
        blob = bytes(blob)
        if blob[:1] != FORMAT_VERSION:
            version = blob[0] if blob else None
            raise DecryptionError(
                f"the encrypted value for {_describe(context)} has format version "
                f"{version}, but this version of mcp-authdb reads only version "
                f"{FORMAT_VERSION[0]}"
            )
        if len(blob) < 1 + NONCE_BYTES + TAG_BYTES:
            raise DecryptionError(
                f"the encrypted value for {_describe(context)} is {len(blob)} "
                f"bytes long, shorter than the {1 + NONCE_BYTES + TAG_BYTES} "
                "bytes of an empty value, so it was cut"
            )

        nonce = blob[1 : 1 + NONCE_BYTES]
        try:
            plaintext = self._aead.decrypt(
                nonce, blob[1 + NONCE_BYTES :], _associated_data(context)
            )
        except InvalidTag:
            raise DecryptionError(
                f"the encrypted value for {_describe(context)} failed "
                "authentication: it was encrypted with another key or for "
                f"another context, or changed since; check that "
                f"{ENCRYPTION_KEY_VARIABLE} is the key it was written with"
            ) from None
        return plaintext.decode("utf-8")


def parse_key(text: str, source: str) -> bytes:
    """Decode a 32-byte key written as 64 hex digits or as base64.

    Base64 may use the standard or the URL-safe alphabet, with or without
    padding. ``source`` names the variable or file in the error. Raises
    :class:`ConfigurationError`, which never contains ``text``.
    """
    if _HEX_KEY.fullmatch(text):
        return bytes.fromhex(text)
    if _HEX_DIGITS.fullmatch(text) and len(text) not in _BASE64_KEY_LENGTHS:
        raise ConfigurationError(
            f"{source} has {len(text)} hex digits, but a key has exactly "
            f"{2 * KEY_BYTES}; {_HOW_TO_GENERATE}"
        )

    key: bytes | None = None
    if _BASE64_KEY.fullmatch(text):
        unpadded = text.rstrip("=")
        standard = unpadded.replace("-", "+").replace("_", "/")
        with contextlib.suppress(binascii.Error, ValueError):
            key = base64.b64decode(standard + "=" * (-len(standard) % 4), validate=True)
    if key is None:
        raise ConfigurationError(
            f"{source} is neither 64 hex digits nor base64 ({len(text)} "
            f"characters); {_HOW_TO_GENERATE}"
        )
    if len(key) != KEY_BYTES:
        raise ConfigurationError(
            f"{source} decodes to {len(key)} bytes, but AES-256 needs exactly "
            f"{KEY_BYTES}; {_HOW_TO_GENERATE}"
        )
    return key


def _associated_data(context: str) -> bytes:
    if not isinstance(context, str) or not context:
        raise InvalidValueError(
            "context must be a non-empty str naming the value's purpose and "
            "owner, such as 'client-secret:' + client_id"
        )
    return FORMAT_VERSION + context.encode("utf-8")


def _describe(context: str) -> str:
    # The context's purpose only: its owner part may be a user id.
    purpose = context.partition(":")[0]
    return f"context {purpose!r}"


def _load_key_file(path: Path) -> bytes:
    """Read the key of ``path``, creating the file with a new key if missing."""
    key_file = SecretFile(
        path=path,
        description="the encryption key file",
        variable=ENCRYPTION_KEY_VARIABLE,
        max_bytes=_KEY_FILE_MAX_BYTES,
        content_rule="one key line and comments",
        new_content_name="a new key",
        log_action="crypto.key_file",
    )
    keys = read_secret_lines(key_file, _new_key_file_content)
    if len(keys) != 1:
        raise ConfigurationError(
            f"the encryption key file {path} contains {len(keys)} key lines, "
            f"expected 1; restore the file, or set {ENCRYPTION_KEY_VARIABLE}"
        )
    return parse_key(keys[0], f"the encryption key file {path}")


def _new_key_file_content() -> str:
    return (
        "# AES-256-GCM key of the embedded development server's OAuth tables.\n"
        "# Deleting this file makes every stored client secret and upstream\n"
        "# token unreadable.\n"
        f"{secrets.token_hex(KEY_BYTES)}\n"
    )
