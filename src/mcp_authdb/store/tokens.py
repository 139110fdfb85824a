"""Access and refresh tokens, and the keyed hashes under which they are stored.

A token is a prefix and 43 base64url characters: ``secrets.token_urlsafe(32)``,
which encodes 256 random bits. Access tokens start with ``mcpat_`` and refresh
tokens with ``mcprt_``, so a token found in a log or a repository shows what
it is, and a refresh token presented as an access token is rejected at once.

The database never stores a token, only its HMAC-SHA-256 under a server-side
key, written ``"{key_id}:{base64url(mac)}"``. A copy of the table without the
key cannot be used to check guesses. :class:`TokenKeys` holds up to
:data:`MAX_KEYS` keys, newest first. New hashes use the newest key, and a
lookup tries every key, so a new key can be put first while sessions hashed
under the older ones keep working until they end.

The keys come from ``MCP_AUTHDB_TOKEN_KEYS``, written ``id:secret`` and
separated by commas, newest first. With the embedded development server and no
such variable, :meth:`TokenKeys.from_env` keeps a generated key in the file
``token-keys`` of the embedded data folder. Error messages name the variable or
file and the problem, and never contain a secret.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path

from mcp_authdb.db.embedded import default_data_dir
from mcp_authdb.db.secret_file import SecretFile, read_secret_lines
from mcp_authdb.db.settings import Settings
from mcp_authdb.errors import ConfigurationError, InvalidValueError

TOKEN_KEYS_VARIABLE = "MCP_AUTHDB_TOKEN_KEYS"
KEY_FILE_NAME = "token-keys"
MAX_KEYS = 4
MIN_SECRET_BYTES = 32
KEY_ID_MAX_LENGTH = 16
# Random bytes in a new token: token_urlsafe(32) gives 43 characters.
TOKEN_BYTES = 32
TOKEN_BODY_LENGTH = 43
# The shell command that prints a new key for MCP_AUTHDB_TOKEN_KEYS.
GENERATE_KEY_COMMAND = (
    "python -c \"import secrets; print('k1:' + secrets.token_urlsafe(32))\""
)
# A key file is a few lines long. Reading stops after this many bytes, so that
# a wrong path to a large file fails fast.
_KEY_FILE_MAX_BYTES = 64 * 1024

_KEY_ID = re.compile(r"[A-Za-z0-9_-]{1,16}")
_BASE64URL = re.compile(r"[A-Za-z0-9_-]*")
_TOKEN_BODY = re.compile(r"[A-Za-z0-9_-]{43}")


class TokenKind(enum.Enum):
    """The kinds of secret this library makes, each with its prefix as the value.

    Access and refresh tokens are the pair of a user session. An authorization
    code and an OAuth state are one-time values of a sign-in, stored hashed
    the same way by the OAuth layer.
    """

    ACCESS = "mcpat_"
    REFRESH = "mcprt_"
    CODE = "mcpac_"
    STATE = "mcpst_"

    @property
    def prefix(self) -> str:
        """The text every token of this kind starts with."""
        return self.value


ACCESS_TOKEN_PREFIX = TokenKind.ACCESS.prefix
REFRESH_TOKEN_PREFIX = TokenKind.REFRESH.prefix

_KINDS_BY_PREFIX = {kind.prefix: kind for kind in TokenKind}
# Every prefix has the same length, so one slice finds the kind.
_PREFIX_LENGTH = len(ACCESS_TOKEN_PREFIX)
assert all(len(kind.prefix) == _PREFIX_LENGTH for kind in TokenKind)
_TOKEN_LENGTH = _PREFIX_LENGTH + TOKEN_BODY_LENGTH


def new_token(kind: TokenKind) -> str:
    """Return a new random token of ``kind``, 256 bits from :mod:`secrets`."""
    return kind.prefix + secrets.token_urlsafe(TOKEN_BYTES)


def token_kind(token: object) -> TokenKind | None:
    """Return the kind of a well-formed token, or None for any other value.

    A well-formed token is a str made of a known prefix and exactly 43
    characters of ``A-Z a-z 0-9 - _``. Every other value gives None without
    raising: other types, str subclasses (whose methods could raise), other
    lengths, non-ASCII text, NUL characters.
    """
    if type(token) is not str or len(token) != _TOKEN_LENGTH:
        return None

    # Validation runs this on every request, so it avoids iterating the enum.
    kind = _KINDS_BY_PREFIX.get(token[:_PREFIX_LENGTH])
    if kind is None or not _TOKEN_BODY.fullmatch(token, _PREFIX_LENGTH):
        return None
    return kind


class TokenKey:
    """One HMAC key: its id, written into every hash it makes, and its secret.

    ``repr`` and ``str`` show the id only. Raises :class:`InvalidValueError`
    for an invalid id, or a secret that is not bytes of at least 32 bytes.
    """

    __slots__ = ("_keyed_hmac", "key_id", "secret")

    def __init__(self, key_id: str, secret: bytes) -> None:
        if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
            # An overlong id may be a secret passed in the wrong place.
            id_text = repr(key_id)
            if len(id_text) > KEY_ID_MAX_LENGTH + 2:
                id_text = f"a {type(key_id).__name__} of length {len(id_text) - 2}"
            raise InvalidValueError(
                f"key_id={id_text} is not a valid key id; use 1 to "
                f"{KEY_ID_MAX_LENGTH} characters of A-Z, a-z, 0-9, '_' and '-'"
            )
        if not isinstance(secret, bytes) or len(secret) < MIN_SECRET_BYTES:
            size = len(secret) if isinstance(secret, bytes) else None
            raise InvalidValueError(
                f"the secret of key {key_id!r} is {type(secret).__name__} of "
                f"length {size}; pass at least {MIN_SECRET_BYTES} random bytes, "
                "such as secrets.token_bytes(32)"
            )
        self.key_id = key_id
        self.secret = secret
        # Keying an HMAC costs as much as hashing a token, so each hash
        # copies this keyed, empty one.
        self._keyed_hmac = hmac.new(secret, digestmod=hashlib.sha256)

    def __repr__(self) -> str:
        return f"TokenKey(key_id={self.key_id!r})"

    def hash(self, token: str) -> str:
        """Return the stored form of ``token`` under this key."""
        keyed = self._keyed_hmac.copy()
        keyed.update(token.encode("ascii"))
        mac = keyed.digest()
        encoded = base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")
        return f"{self.key_id}:{encoded}"


class TokenKeys:
    """The HMAC keys of a deployment, newest first, from 1 to :data:`MAX_KEYS`.

    Build one with :meth:`from_env`, :meth:`parse` or :meth:`from_key_file`.
    ``repr`` shows the key ids only.
    """

    def __init__(self, keys: Sequence[TokenKey]) -> None:
        if not 1 <= len(keys) <= MAX_KEYS:
            raise InvalidValueError(
                f"token keys: {len(keys)} keys given; pass 1 to {MAX_KEYS} keys"
            )
        ids = [key.key_id for key in keys]
        if len(set(ids)) != len(ids):
            raise InvalidValueError(
                f"token keys: the key ids {ids!r} repeat an id; give each key "
                "its own id, because the id in a stored hash selects the key"
            )
        self.keys = tuple(keys)

    def __repr__(self) -> str:
        return f"TokenKeys(key_ids={self.key_ids!r})"

    @property
    def key_ids(self) -> tuple[str, ...]:
        """The ids of the keys, newest first."""
        return tuple(key.key_id for key in self.keys)

    @property
    def newest(self) -> TokenKey:
        """The key that hashes new tokens."""
        return self.keys[0]

    @classmethod
    def parse(cls, value: str, *, source: str = TOKEN_KEYS_VARIABLE) -> TokenKeys:
        """Parse comma-separated ``id:secret`` keys, newest first.

        A key id is 1 to 16 characters of ``A-Z a-z 0-9 _ -``. A secret is
        base64url, padding optional, of at least 32 bytes. ``source`` names
        the variable or file in error messages. Raises
        :class:`ConfigurationError` saying which entry is wrong and how, never
        showing a secret.
        """
        entries = [entry.strip() for entry in value.split(",")]
        if entries == [""]:
            raise ConfigurationError(f"{source} contains no key; {_HOW_TO_GENERATE}")
        if len(entries) > MAX_KEYS:
            raise ConfigurationError(
                f"{source} contains {len(entries)} keys, over the maximum of "
                f"{MAX_KEYS}; remove the oldest keys, which are the last ones, "
                "once the sessions hashed under them have ended"
            )

        keys: list[TokenKey] = []
        for number, entry in enumerate(entries, start=1):
            key = _parse_key(source, number, entry)
            for earlier in keys:
                _check_distinct(source, earlier, key)
            keys.append(key)
        return cls(keys)

    @classmethod
    def from_env(
        cls, settings: Settings, environ: Mapping[str, str] | None = None
    ) -> TokenKeys:
        """Load the keys for the database that ``settings`` describes.

        With ``MCP_AUTHDB_TOKEN_KEYS`` in ``environ`` (default:
        ``os.environ``), the keys come from it. Without it, and with no
        ``DATABASE_URL`` (the embedded development server), they come from
        the key file ``token-keys`` in the embedded data folder
        (``settings.data_dir``, or the default folder), which is created with
        a new key the first time. Otherwise this raises
        :class:`ConfigurationError` saying how to generate a key.
        """
        env = os.environ if environ is None else environ
        value = env.get(TOKEN_KEYS_VARIABLE)
        if value is not None:
            if not value.strip():
                # Most likely a secret that failed to render, which a fallback
                # to the key file would hide.
                raise ConfigurationError(
                    f"{TOKEN_KEYS_VARIABLE} is set but empty; {_HOW_TO_GENERATE}"
                )
            return cls.parse(value)

        if settings.database_url is None:
            data_dir = settings.data_dir or default_data_dir()
            return cls.from_key_file(data_dir.absolute() / KEY_FILE_NAME)

        raise ConfigurationError(
            f"{TOKEN_KEYS_VARIABLE} is not set, and it is required with "
            f"DATABASE_URL; {_HOW_TO_GENERATE}"
        )

    @classmethod
    def from_key_file(cls, path: Path) -> TokenKeys:
        """Read the keys from the file at ``path``, creating it if it is missing.

        A new file gets one new key, ``k1``, and mode 0600. It appears whole
        or not at all, and when several processes create it at once, all of
        them read the one that was linked first. The file contains one
        ``id:secret`` key per line, newest first, and lines starting with
        ``#`` are comments. Raises :class:`ConfigurationError` when the file
        is not a regular file, belongs to another user, is readable or
        writable by other users, or contains invalid keys.
        """
        key_file = SecretFile(
            path=path,
            description="the token key file",
            variable=TOKEN_KEYS_VARIABLE,
            max_bytes=_KEY_FILE_MAX_BYTES,
            content_rule="id:secret lines only",
            new_content_name="a new key k1",
            log_action="tokens.key_file",
            exposed_advice=(
                ", and if someone else may have read it, delete it instead to "
                "have a new key generated (this ends every session)"
            ),
        )
        keys = read_secret_lines(key_file, _new_key_file_content)
        if not keys:
            raise ConfigurationError(
                f"the token key file {path} contains no key; delete it to have a "
                f"new key generated (this ends every session), or set "
                f"{TOKEN_KEYS_VARIABLE}"
            )
        return cls.parse(",".join(keys), source=f"the key file {path}")


class TokenHasher:
    """Hashes tokens for storage and lists the hashes a lookup has to try."""

    def __init__(self, keys: TokenKeys) -> None:
        if not isinstance(keys, TokenKeys):
            raise InvalidValueError(
                f"keys is a {type(keys).__name__}, not TokenKeys; build it with "
                "TokenKeys.from_env(settings)"
            )
        self.keys = keys

    def __repr__(self) -> str:
        return f"TokenHasher({self.keys!r})"

    @classmethod
    def from_env(
        cls, settings: Settings, environ: Mapping[str, str] | None = None
    ) -> TokenHasher:
        """Build a hasher with :meth:`TokenKeys.from_env`."""
        return cls(TokenKeys.from_env(settings, environ))

    def hash(self, token: str) -> str:
        """Return the stored form of ``token`` under the newest key.

        Raises :class:`InvalidValueError`, without showing the value, unless
        ``token`` is a well-formed token.
        """
        if token_kind(token) is None:
            raise InvalidValueError(
                f"the value to hash ({type(token).__name__}) is not a token made "
                "by new_token(): a prefix and 43 base64url characters"
            )
        return self.keys.newest.hash(token)

    def newest_hash(self, token: object, kind: TokenKind | None = None) -> str | None:
        """Return the hash of ``token`` under the newest key, or None.

        None, at once and without raising, unless ``token`` is a well-formed
        token of ``kind`` (of any kind when ``kind`` is None). This is the
        first of :meth:`candidates`, for callers that may not need the rest.
        """
        found = token_kind(token)
        if found is None or (kind is not None and found is not kind):
            return None
        assert isinstance(token, str)  # token_kind() accepts only a str
        return self.keys.newest.hash(token)

    def candidates(self, token: object, kind: TokenKind | None = None) -> list[str]:
        """Return the hashes under which ``token`` may be stored, newest key first.

        The list is empty, at once and without raising, unless ``token`` is a
        well-formed token of ``kind`` (of any kind when ``kind`` is None).
        The first hash is the one :meth:`hash` gives.
        """
        found = token_kind(token)
        if found is None or (kind is not None and found is not kind):
            return []
        assert isinstance(token, str)  # token_kind() accepts only a str
        return [key.hash(token) for key in self.keys.keys]


_HOW_TO_GENERATE = (
    f"set {TOKEN_KEYS_VARIABLE} to comma-separated id:secret keys, newest "
    f"first, and generate a key with: {GENERATE_KEY_COMMAND}"
)


def _parse_key(source: str, number: int, entry: str) -> TokenKey:
    where = f"{source}, key {number}"
    if entry == "":
        raise ConfigurationError(
            f"{where} is empty; remove the extra comma or write the key as id:secret"
        )

    key_id, colon, secret_text = entry.partition(":")
    if not colon:
        raise ConfigurationError(
            f"{where} has no ':' between key id and secret; write it as "
            "id:secret, for example k1:<43 base64url characters>"
        )
    if not _KEY_ID.fullmatch(key_id):
        # An overlong id may be a secret written in the wrong place.
        id_text = repr(key_id) if len(key_id) <= KEY_ID_MAX_LENGTH else "the key id"
        raise ConfigurationError(
            f"{where}: {id_text} ({len(key_id)} characters) is not a valid key id; "
            f"use 1 to {KEY_ID_MAX_LENGTH} characters of A-Z, a-z, 0-9, '_' and "
            "'-', such as k1"
        )

    secret = _decode_secret(f"{where} ({key_id!r})", secret_text)
    return TokenKey(key_id, secret)


def _decode_secret(where: str, text: str) -> bytes:
    unpadded = text.rstrip("=")
    if len(text) - len(unpadded) > 2 or not _BASE64URL.fullmatch(unpadded):
        bad = next(
            (i for i, c in enumerate(unpadded) if not _BASE64URL.fullmatch(c)),
            len(unpadded),
        )
        raise ConfigurationError(
            f"{where}: the secret is not base64url, because of the character at "
            f"index {bad}; base64url uses A-Z, a-z, 0-9, '-' and '_'. "
            f"{_GENERATE_SECRET}"
        )
    try:
        secret = base64.urlsafe_b64decode(unpadded + "=" * (-len(unpadded) % 4))
    except (binascii.Error, ValueError):
        # Only a length of 4n+1 characters fails here.
        secret = None
    if secret is None:
        raise ConfigurationError(
            f"{where}: the secret has {len(unpadded)} base64url characters, a "
            f"length no encoding gives; it was probably cut. {_GENERATE_SECRET}"
        )
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigurationError(
            f"{where}: the secret decodes to {len(secret)} bytes, under the "
            f"minimum of {MIN_SECRET_BYTES}. {_GENERATE_SECRET}"
        )
    return secret


_GENERATE_SECRET = f"Generate a key with: {GENERATE_KEY_COMMAND}"


def _check_distinct(source: str, earlier: TokenKey, key: TokenKey) -> None:
    if key.key_id == earlier.key_id:
        raise ConfigurationError(
            f"{source}: the key id {key.key_id!r} is used twice; give each key "
            "its own id, because the id in a stored hash selects the key"
        )
    if hmac.compare_digest(key.secret, earlier.secret):
        raise ConfigurationError(
            f"{source}: the keys {earlier.key_id!r} and {key.key_id!r} have the "
            "same secret; a new key needs a new secret. "
            f"{_GENERATE_SECRET}"
        )


def _new_key_file_content() -> str:
    return (
        "# Token keys of the embedded development server, newest first, one\n"
        "# id:secret per line. Deleting this file ends every session.\n"
        f"k1:{secrets.token_urlsafe(MIN_SECRET_BYTES)}\n"
    )
