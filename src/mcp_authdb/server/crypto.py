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
import errno
import logging
import os
import re
import secrets
import stat
from collections.abc import Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from mcp_authdb.errors import AuthDBError, ConfigurationError, InvalidValueError

logger = logging.getLogger(__name__)

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

    __slots__ = ("_aead",)

    def __init__(self, key: bytes) -> None:
        if not isinstance(key, bytes) or len(key) != KEY_BYTES:
            size = len(key) if isinstance(key, bytes) else None
            raise InvalidValueError(
                f"the encryption key is {type(key).__name__} of length {size}; "
                f"pass {KEY_BYTES} random bytes, such as secrets.token_bytes(32)"
            )
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "Encryptor(AES-256-GCM)"

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
                f"{ENCRYPTION_KEY_VARIABLE} is not set; " + _HOW_TO_GENERATE
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
    if not path.exists() and not path.is_symlink():
        _create_key_file(path)
    return parse_key(_read_key_file(path), f"the encryption key file {path}")


def _create_key_file(path: Path) -> None:
    """Write a key file with a new key, unless another process is first.

    The key goes to a temporary file that only this process can have made
    (O_CREAT|O_EXCL), which is then hard-linked to ``path``. A link never
    replaces an existing file, so the first process to link wins, and readers
    never see a partly written file.
    """
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise _key_file_error(path, "could not be created", exc) from None

    content = (
        "# AES-256-GCM key of the embedded development server's OAuth tables.\n"
        "# Deleting this file makes every stored client secret and upstream\n"
        "# token unreadable.\n"
        f"{secrets.token_hex(KEY_BYTES)}\n"
    )
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(temporary, flags, 0o600)
    except OSError as exc:
        raise _key_file_error(path, "could not be created", exc) from None

    try:
        with os.fdopen(fd, "w", encoding="ascii") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            logger.debug(
                "another process created the encryption key file %s first",
                path,
                extra={"action": "crypto.key_file.raced"},
            )
            return
        except OSError as exc:
            raise _key_file_error(path, "could not be created", exc) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()

    logger.info(
        "created the encryption key file %s with a new key",
        path,
        extra={"action": "crypto.key_file.created", "path": str(path)},
    )


def _read_key_file(path: Path) -> str:
    """Return the key line of the key file, checked on the open descriptor."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigurationError(
                f"the encryption key file {path} is a symbolic link; replace it "
                f"with the file itself, or set {ENCRYPTION_KEY_VARIABLE}"
            ) from None
        raise _key_file_error(path, "could not be opened", exc) from None

    try:
        _check_key_file(path, os.fstat(fd))
        data = os.read(fd, _KEY_FILE_MAX_BYTES + 1)
    finally:
        os.close(fd)

    if len(data) > _KEY_FILE_MAX_BYTES:
        raise ConfigurationError(
            f"the encryption key file {path} is larger than {_KEY_FILE_MAX_BYTES} "
            "bytes, so it is not a key file; check the path"
        )
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigurationError(
            f"the encryption key file {path} contains non-ASCII bytes; it must "
            "contain one key line and comments"
        ) from None

    lines = [line.strip() for line in text.splitlines()]
    keys = [line for line in lines if line and not line.startswith("#")]
    if len(keys) != 1:
        raise ConfigurationError(
            f"the encryption key file {path} contains {len(keys)} key lines, "
            f"expected 1; restore the file, or set {ENCRYPTION_KEY_VARIABLE}"
        )
    return keys[0]


def _check_key_file(path: Path, info: os.stat_result) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise ConfigurationError(
            f"the encryption key file {path} is not a regular file; remove it, "
            f"or set {ENCRYPTION_KEY_VARIABLE}"
        )
    if info.st_uid != os.geteuid():
        raise ConfigurationError(
            f"the encryption key file {path} belongs to user id {info.st_uid}, "
            f"not to this user (id {os.geteuid()}); run as its owner, or, if it "
            f"can be trusted, make it yours with `chown {os.geteuid()} {path}`"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise ConfigurationError(
            f"the encryption key file {path} has mode {mode:04o}, so other users "
            f"may read or change it; run `chmod 600 {path}`"
        )


def _key_file_error(path: Path, failure: str, exc: OSError) -> ConfigurationError:
    return ConfigurationError(
        f"the encryption key file {path} {failure}: {exc.strerror}; check the "
        f"folder's permissions, or set {ENCRYPTION_KEY_VARIABLE}"
    )
