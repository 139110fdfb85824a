"""Turning the values of one request into a request_logs row that always stores.

:class:`RowSanitizer` never raises on a value: whatever it is given, it
returns a row that PostgreSQL accepts. The rules, applied in this order:

1. **Secrets.** In ``parameters``, at any depth, the value of a key that looks
   secret becomes the string ``"[REDACTED]"``, whatever its type, nested
   objects included. Keys are compared after normalizing: NFKC-normalized
   (so fullwidth letters become the usual ones), case-folded, with
   everything but letters and digits removed, so ``Client-Secret``,
   ``client_secret`` and ``clientSecret`` are all ``clientsecret``. A
   normalized key is secret when

   - it is one of :data:`SECRET_KEYS` (``code``, ``token``, ``tokens``,
     ``password``, ``authorization``, ``cookie``, ``session``, ``pin``,
     ``sig``, ``signature``, ``idtokenhint``, ...), or one of the
     ``extra_secret_keys`` given to the sanitizer, normalized the same way;
   - it ends with one of :data:`SECRET_KEY_SUFFIXES` (``token``, ``secret``,
     ``accesskey``, ``assertion``, ...), so ``access_token``,
     ``github_token``, ``client_assertion`` and ``webhook_secret`` match
     but ``max_tokens`` and ``token_type`` do not;
   - it contains one of :data:`SECRET_KEY_PARTS` (``password``,
     ``passcode``, ``secret``, ``apikey``, ``privatekey``, ``credential``,
     ``tokenhash``, ...).

   ``key`` alone is not secret, and neither is a name that only ends with
   it, such as ``cache_key`` or ``sort_key``: most such keys name a lookup,
   not a credential. Pass ``extra_secret_keys`` for those that do.

   A list, tuple or deque of exactly two items whose first item is a str
   and a secret key, such as ``["Authorization", "Bearer x"]`` in a list of
   headers, is a key and value pair, and its second item is redacted.

   Free text is redacted too, in every string: values and keys at any depth
   of ``parameters``, and the ``method``, ``status`` and ``user_id``
   columns. In this order:

   - the credential after the word ``Bearer`` or ``Basic`` (any case) and
     whitespace, keeping the scheme: ``Bearer [REDACTED]``. A credential is
     at least 8 characters of the RFC 7235 token68 alphabet (letters, digits,
     ``-._~+/``, then any ``=``) with a digit, a symbol or a capital after
     its first letter, so prose such as ``basic plan`` or ``the basic
     subscription`` is kept;
   - the password of a URL with userinfo:
     ``postgresql://u:PW@h/db`` becomes ``postgresql://u:[REDACTED]@h/db``.
     When only the start of a long text is kept, a ``user:`` URL at its end
     loses the rest even without an ``@``, which may have been cut off;
   - the value of ``NAME=value``, in query strings and free text alike,
     when NAME (letters, digits, ``_``, ``.`` and ``-``; spaces or tabs may
     surround the ``=``) is a secret key by the rules above:
     ``?code=abc&state=x`` becomes ``?code=[REDACTED]&state=x`` and
     ``PASSWORD=hunter2`` becomes ``PASSWORD=[REDACTED]``. The value runs to
     whitespace, ``&`` or a quote, and a quoted value to its closing quote.
     A URL under a name that is not secret is searched for further pairs.
     ``DATABASE_URL`` is a secret key (``databaseurl``), so
     ``DATABASE_URL=postgresql://...`` loses the whole URL.

   A string is searched only when it contains ``=``, ``://``, ``bearer`` or
   ``basic`` (any case), so most strings cost a few substring checks. A
   secret written some other way, such as JSON text inside a string, a
   percent-encoded name or ``Authorization: Token x``, is stored as written.

   In every text, a token issued by this library, of any
   :class:`~mcp_authdb.store.tokens.TokenKind` (access and refresh tokens,
   authorization codes, OAuth states), becomes ``[REDACTED]`` too.

2. **Values JSON cannot hold.** ``parameters`` is stored as jsonb. A value
   that is not JSON (a str, an int, a finite float, a bool, None, a list, or
   a dict with str keys) is converted by this one rule:

   - an enum becomes its value;
   - a tuple, set, frozenset, deque or list subclass becomes an array, with a
     set sorted when its items can be compared, and any other mapping an
     object;
   - a datetime, date or time becomes its ISO 8601 string, a UUID or Decimal
     its string, and a timedelta its total seconds;
   - NaN and the infinities, float or Decimal, become the strings ``"NaN"``,
     ``"Infinity"`` and ``"-Infinity"``;
   - anything else, bytes and ints of more than :data:`MAX_INT_BITS` bits
     included, becomes a marker that names only its type, such as
     ``"[unsupported: bytes, 12 bytes]"`` or ``"[unsupported: myapp.User]"``.
     The ``repr`` or ``str`` of an unknown object is never used, because it
     may contain secrets or run arbitrary code. A conversion that raises
     gives the same marker.

   A dict key that is a number, bool or None is converted as
   :func:`json.dumps` does (``1`` to ``"1"``, ``None`` to ``"null"``), and
   any other key that is not a str becomes an unsupported marker. When two
   keys convert to the same string, the later one wins, as in jsonb. A
   container that contains itself becomes ``"[circular]"`` where it recurs,
   and one nested deeper than ``max_depth`` becomes
   ``"[nested deeper than N]"``.

3. **Text PostgreSQL cannot store.** In every string, keys and columns
   included, a NUL character becomes U+FFFD (the replacement character), a
   surrogate pair written as two code points is joined into the character it
   encodes, and a lone surrogate becomes U+FFFD.

4. **Sizes.** When ``parameters`` as compact JSON exceeds
   ``max_parameters_bytes`` (UTF-8), it is replaced by
   ``{"[truncated]": true, "original_bytes": N, "preview": "<start of the
   JSON>"}``, itself at most ``max_parameters_bytes`` long.
   ``original_bytes`` is an estimate made while the value is walked, which
   counts strings by their UTF-8 length without JSON escape characters.
   The count stops after :data:`MEASURE_NODE_LIMIT` values, and the key is
   then ``original_bytes_at_least``: each dict, list or other sized
   container whose count was stopped adds a lower bound for the items it
   did not visit from its length (four bytes an object item, one an array
   item), without visiting them. Only the part of the value that fits is
   converted, so a 10 MB string or a dict of a million keys costs about as
   much as a value of ``max_parameters_bytes``, plus measuring the length of
   the strings counted. A set too large to fit is walked in its own order
   instead of sorted.

   ``method`` (100 characters), ``status`` (50) and ``user_id`` (255) longer
   than their column are cut, ending with ``"…[cut from N chars]"`` within the
   limit. A text that redacting made longer than its column is cut the same
   way, with N its redacted length. A value that is not a str is converted
   as in rule 2 and stored as its JSON text when it is not a string. None
   is stored as NULL, except in ``method``, which is NOT NULL and stores the
   empty string.

5. **Numbers.** ``response_size`` and ``duration_ms`` are stored as integers:
   a float, Decimal or Fraction is rounded to the nearest whole number (half
   to even), and a timedelta given as ``duration_ms`` becomes milliseconds.
   A negative value, NaN, an infinity, a bool or anything else that is not a
   number is stored as NULL, because it carries no usable size or duration.
   A value above 2,147,483,647, the maximum of the integer column, is stored
   as that maximum.

6. **Time.** ``created_at`` defaults to the time of the call. An aware
   datetime is stored as the same instant. A naive one is read as the local
   time of this process, as :meth:`datetime.astimezone` does, and stored as
   that instant. Elsewhere this library rejects naive datetimes, because
   PostgreSQL would read them in the connection's TimeZone setting, which
   the caller cannot see. Here an error is worse than a guess: the request
   was served, its row must be stored, and :meth:`RowSanitizer.row` never
   raises. The guess is wrong when the caller meant UTC on a machine whose
   local time is not UTC, so pass aware datetimes. Any other value, or a
   datetime that cannot be converted to UTC, gives the time of the call.
"""

from __future__ import annotations

import collections
import datetime as dt
import enum
import json
import math
import numbers
import re
import unicodedata
import uuid
from collections.abc import Callable, Iterable, Mapping
from decimal import Decimal
from typing import Any

from mcp_authdb.errors import InvalidValueError
from mcp_authdb.store.tokens import TokenKind

# Column sizes of request_logs. varchar lengths count characters, as len()
# counts a str's code points.
METHOD_MAX_LENGTH = 100
STATUS_MAX_LENGTH = 50
USER_ID_MAX_LENGTH = 255
INT4_MAX = 2**31 - 1

REDACTED = "[REDACTED]"
CIRCULAR = "[circular]"
TRUNCATED_KEY = "[truncated]"
REPLACEMENT_CHARACTER = "\ufffd"

DEFAULT_MAX_PARAMETERS_BYTES = 16 * 1024
# The truncation marker needs room for its keys and a short preview.
MIN_MAX_PARAMETERS_BYTES = 256
DEFAULT_MAX_DEPTH = 20
MAX_MAX_DEPTH = 100
# Larger ints cost a lot to convert to text, and few JSON readers take them.
MAX_INT_BITS = 1024
# How many values the walk counts beyond the part it keeps, to estimate the
# original size of cut parameters.
MEASURE_NODE_LIMIT = 10_000

SECRET_KEYS = frozenset(
    {
        "accesskeyid",
        "assertion",
        "auth",
        "authcode",
        "authorization",
        "authorizationcode",
        "awsaccesskeyid",
        "bearer",
        "code",
        "codeverifier",
        "connectionstring",
        "cookie",
        "cookies",
        "databaseurl",
        "devicecode",
        "dsn",
        "idtokenhint",
        "jwt",
        "otp",
        "pass",
        "passwd",
        "pin",
        "pwd",
        "secret",
        "session",
        "sessionid",
        "sig",
        "signature",
        "token",
        "tokens",
        "totp",
        "usercode",
    }
)
SECRET_KEY_SUFFIXES = (
    "accesskey",
    "apikey",
    "assertion",
    "authorization",
    "cookie",
    "secret",
    "sessionid",
    "token",
)
SECRET_KEY_PARTS = (
    "apikey",
    "credential",
    "passcode",
    "passphrase",
    "passwd",
    "password",
    "privatekey",
    "secret",
    "tokenhash",
)

# Tokens issued by this library: the prefix of a TokenKind and the 43
# characters of secrets.token_urlsafe(32). Shorter tails match too, for cut
# tokens.
_TOKEN_PREFIXES = tuple(kind.prefix for kind in TokenKind)
_LIBRARY_TOKEN = re.compile(
    "(?:" + "|".join(map(re.escape, _TOKEN_PREFIXES)) + ")[A-Za-z0-9_-]{8,}"
)
# Free-text secrets. The credential after an authorization scheme runs to
# whitespace, a quote, an angle bracket, a comma or a semicolon.
# A credential is at least 8 characters of the token68 alphabet of RFC 7235
# with a digit, a symbol or an inner capital, so that prose such as "basic
# plan" or "the basic subscription" keeps its next word.
_AUTH_SCHEME = re.compile(
    r"\b((?i:bearer|basic))(\s+)"
    r"(?=[A-Za-z0-9\-._~+/]*(?:[0-9\-._~+/]|[A-Za-z][A-Z]))"
    r"[A-Za-z0-9\-._~+/]{8,}=*(?![A-Za-z0-9\-._~+/=])"
)
# The password of scheme://user:password@host runs to the last @ before the
# path, query, fragment or whitespace. In the start of a cut text it may also
# run to the end, because the @ may have been cut off. The scheme is not
# checked, so a malformed one hides nothing.
_URL_PASSWORD = re.compile(r"(://[^\s/?#@:]*:)[^\s/?#]+(?=@)")
_URL_PASSWORD_IN_CUT_TEXT = re.compile(r"(://[^\s/?#@:]*:)[^\s/?#]+(?=@|\Z)")
# The NAME of NAME=value, matched in the reversed text from the character
# before the =, so each = costs one anchored match however long the text.
_REVERSED_PAIR_NAME = re.compile(r"[ \t]*([\w.-]+)")
# The value of NAME=value. A quoted value runs to its closing quote, or to
# the end of the text when it has none. Any other value runs to whitespace,
# & or a quote, and does not start with =, so "token == x" is a comparison.
_PAIR_VALUE = re.compile(r"[ \t]*(\"[^\"]*\"?|'[^']*'?|[^\s&\"'=][^\s&\"']*)")
# Lower bounds of the JSON bytes of one item that was not visited: "":0 in
# an object, and one digit in an array (commas not counted).
_MIN_OBJECT_ITEM_BYTES = 4
_MIN_ARRAY_ITEM_BYTES = 1
# The decimal digits of a MAX_INT_BITS-bit int.
_MAX_INT_DIGITS = int(MAX_INT_BITS * math.log10(2)) + 1
_LONG_DIGITS = re.compile(f"[0-9]{{{_MAX_INT_DIGITS},}}")
_NOT_ALPHANUMERIC = re.compile(r"[\W_]+")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
# The secret-key decisions are cached per normalized key; the cache is
# emptied when it reaches this size, so odd keys cannot grow it forever.
_KEY_CACHE_LIMIT = 10_000
# Column texts found plain are remembered the same way, because most calls
# repeat a few methods, statuses and user ids.
_PLAIN_TEXT_CACHE_LIMIT = 10_000

_ENCODER = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), allow_nan=False, check_circular=False
)

# A copy row: user_id, method, parameters (UTF-8 JSON), response_size,
# duration_ms, status, created_at.
CopyRow = tuple[
    str | None, str, bytes | None, int | None, int | None, str | None, dt.datetime
]


def _require_whole_number(name: str, value: object, low: int, high: int) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or not low <= value <= high
    ):
        raise InvalidValueError(
            f"{name}={value!r} is invalid; pass a whole number from {low} to {high}"
        )


def normalize_key(key: str) -> str:
    """Return ``key`` NFKC-normalized and case-folded, with only letters and digits.

    NFKC turns compatibility characters, such as fullwidth letters, into the
    usual ones, so a fullwidth PASSWORD becomes ``password``.
    """
    folded = key.casefold()
    if not folded.isascii():
        # Case folding can undo NFKC, so it is applied again afterwards.
        folded = unicodedata.normalize("NFKC", key).casefold()
        folded = unicodedata.normalize("NFKC", folded)
    return _NOT_ALPHANUMERIC.sub("", folded)


def clean_text(text: str) -> str:
    """Return ``text`` with what PostgreSQL text cannot store repaired.

    NUL becomes U+FFFD, a surrogate pair written as two code points becomes
    the character it encodes, a lone surrogate becomes U+FFFD, and a token
    issued by this library becomes ``[REDACTED]``. Returns a plain str even
    for a subclass.
    """
    if type(text) is str and _is_plain_text(text):
        return text  # The common case, checked first for speed.
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = _repair_surrogates(text)
    if "\x00" in text:
        text = text.replace("\x00", REPLACEMENT_CHARACTER)
    if _contains_token_prefix(text):
        text = _LIBRARY_TOKEN.sub(REDACTED, text)
    return str.__str__(text)


def _is_plain_text(text: str) -> bool:
    """Tell whether :func:`clean_text` surely leaves ``text`` as it is."""
    return text.isascii() and "\x00" not in text and "mcp" not in text


def _contains_token_prefix(text: str) -> bool:
    """Tell whether ``text`` contains the prefix of a library token."""
    return any(prefix in text for prefix in _TOKEN_PREFIXES)


def _may_contain_secret(text: str) -> bool:
    """Tell whether a free-text secret rule may match in ``text``."""
    if "=" in text or "://" in text:
        return True
    lowered = text.lower()
    return "bearer" in lowered or "basic" in lowered


def _repair_surrogates(text: str) -> str:
    # Encoding to UTF-16 with surrogatepass turns each code point into its
    # UTF-16 units, so a high and low surrogate written as two code points
    # decode as the one character they encode. Lone ones stay surrogates.
    joined = text.encode("utf-16-le", "surrogatepass").decode(
        "utf-16-le", "surrogatepass"
    )
    return _SURROGATE.sub(REPLACEMENT_CHARACTER, joined)


def cut_text(text: str, max_length: int) -> str:
    """Return ``text``, or its start and a cut marker within ``max_length``."""
    if len(text) <= max_length:
        return text
    marker = f"…[cut from {len(text)} chars]"
    return text[: max_length - len(marker)] + marker


def utf8_length(text: str) -> int:
    """Return the UTF-8 size of ``text`` in bytes, lone surrogates as 3 bytes."""
    if text.isascii():
        return len(text)
    return len(text.encode("utf-8", "surrogatepass"))


def type_name(value: object) -> str:
    """Return the qualified name of the type of ``value``, without builtins."""
    kind = type(value)
    if kind.__module__ == "builtins":
        return kind.__qualname__
    return f"{kind.__module__}.{kind.__qualname__}"


def unsupported(value: object) -> str:
    """Return the marker for a value that JSON cannot hold, naming its type."""
    if isinstance(value, memoryview):
        return f"[unsupported: memoryview, {value.nbytes} bytes]"
    if isinstance(value, bytes | bytearray):
        return f"[unsupported: {type_name(value)}, {len(value)} bytes]"
    if isinstance(value, int):
        return f"[unsupported: int of {value.bit_length()} bits]"
    return f"[unsupported: {type_name(value)}]"


def _non_finite(value: float) -> str:
    if value != value:
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


class RowSanitizer:
    """The sanitizing rules of the module docstring, with their limits.

    ``max_parameters_bytes`` caps the UTF-8 size of the parameters' JSON,
    ``max_depth`` the nesting of containers, and ``extra_secret_keys`` adds
    keys to :data:`SECRET_KEYS` (normalized with :func:`normalize_key`).
    Thread-safe: it keeps only caches of secret-key decisions and of column
    texts that need no change. Raises
    :class:`InvalidValueError` for a limit out of range.
    """

    def __init__(
        self,
        *,
        max_parameters_bytes: int = DEFAULT_MAX_PARAMETERS_BYTES,
        max_depth: int = DEFAULT_MAX_DEPTH,
        extra_secret_keys: Iterable[str] = (),
    ) -> None:
        _require_whole_number(
            "max_parameters_bytes",
            max_parameters_bytes,
            MIN_MAX_PARAMETERS_BYTES,
            2**28,
        )
        _require_whole_number("max_depth", max_depth, 1, MAX_MAX_DEPTH)
        if isinstance(extra_secret_keys, str) or not all(
            isinstance(key, str) for key in extra_secret_keys
        ):
            raise InvalidValueError(
                "extra_secret_keys must be a list of key names, such as "
                "['x_signature'], not a single string or other values"
            )
        self.max_parameters_bytes = max_parameters_bytes
        self.max_depth = max_depth
        self.extra_secret_keys = frozenset(normalize_key(k) for k in extra_secret_keys)
        self._secret_keys = SECRET_KEYS | self.extra_secret_keys
        self._key_cache: dict[str, bool] = {}
        self._plain_texts: set[str] = set()
        self.depth_marker = f"[nested deeper than {max_depth}]"

    def row(
        self,
        method: object,
        *,
        user_id: object,
        parameters: object,
        response_size: object,
        duration_ms: object,
        status: object,
        created_at: object,
        now: dt.datetime,
    ) -> CopyRow:
        """Return the copy row for one request; ``now`` is the time of the call."""
        method_text = self.column_text(method, METHOD_MAX_LENGTH)
        return (
            self.column_text(user_id, USER_ID_MAX_LENGTH),
            "" if method_text is None else method_text,
            self.parameters_json(parameters),
            whole_number(response_size),
            whole_number(duration_ms, timedelta_unit_ms=True),
            self.column_text(status, STATUS_MAX_LENGTH),
            now if created_at is None else timestamp(created_at, now),
        )

    def is_secret_key(self, key: str) -> bool:
        """Tell whether the value under ``key`` is redacted (rule 1)."""
        decision = self._key_cache.get(key)
        if decision is None:
            normalized = normalize_key(key)
            decision = (
                normalized in self._secret_keys
                or normalized.endswith(SECRET_KEY_SUFFIXES)
                or any(part in normalized for part in SECRET_KEY_PARTS)
            )
            if len(self._key_cache) >= _KEY_CACHE_LIMIT:
                self._key_cache.clear()
            self._key_cache[key] = decision
        return decision

    def clean(self, text: str, *, cut: bool = False) -> str:
        """Repair ``text`` with :func:`clean_text` and redact its free-text secrets.

        Pass ``cut=True`` when ``text`` is the start of a longer text whose
        rest is not stored, so a URL password may run to its end.
        """
        if type(text) is str and _is_plain_text(text) and not _may_contain_secret(text):
            return text  # The common case, checked first for speed.
        text = clean_text(text)
        if _may_contain_secret(text):
            text = self._redact_free_text(text, cut=cut)
        return text

    def _redact_free_text(self, text: str, *, cut: bool) -> str:
        # The scheme rule comes first, so "Authorization=Bearer x" loses the
        # credential after the space too.
        lowered = text.lower()
        if "bearer" in lowered or "basic" in lowered:
            text = _AUTH_SCHEME.sub(r"\1\2" + REDACTED, text)
        if "://" in text:
            url_password = _URL_PASSWORD_IN_CUT_TEXT if cut else _URL_PASSWORD
            text = url_password.sub(r"\1" + REDACTED, text)
        if "=" in text:
            text = self._redact_pairs(text)
        return text

    def _redact_pairs(self, text: str) -> str:
        """Return ``text`` with the value of each secret NAME=value redacted."""
        equals = text.find("=")
        if equals < 0:
            return text
        reversed_text = text[::-1]
        pieces: list[str] = []
        kept_from = 0
        while equals >= 0:
            # The character before the = is at len(text) - equals in the
            # reversed text.
            name = _REVERSED_PAIR_NAME.match(reversed_text, len(text) - equals)
            value = None
            if name is not None and self.is_secret_key(name.group(1)[::-1]):
                value = _PAIR_VALUE.match(text, equals + 1)
            replacement = None if value is None else _redacted_value(value.group(1))
            if value is None or replacement is None:
                # The value may contain further pairs, as a URL in a query does.
                equals = text.find("=", equals + 1)
                continue
            pieces.append(text[kept_from : value.start(1)])
            pieces.append(replacement)
            kept_from = value.end()
            equals = text.find("=", kept_from)
        if not pieces:
            return text
        pieces.append(text[kept_from:])
        return "".join(pieces)

    def column_text(self, value: object, max_length: int) -> str | None:
        """Return ``value`` as text for a varchar column, or None for NULL."""
        if value is None:
            return None
        if type(value) is str and len(value) <= max_length:
            # The common case, checked first for speed.
            if value in self._plain_texts:
                return value
            if _is_plain_text(value) and not _may_contain_secret(value):
                if len(self._plain_texts) >= _PLAIN_TEXT_CACHE_LIMIT:
                    self._plain_texts.clear()
                self._plain_texts.add(value)
                return value
        if isinstance(value, str):
            if len(value) <= max_length:
                # A redacted text can be longer than the original.
                return cut_text(self.clean(value), max_length)
            # Only the part that is kept gets cleaned; the marker gives the
            # original length.
            marker = f"…[cut from {len(value)} chars]"
            keep = max_length - len(marker)
            return self.clean(value[:keep], cut=True)[:keep] + marker
        # Four bytes per character is the most UTF-8 needs, so this budget
        # always keeps enough to fill the column.
        walk = _Walk(self, budget=4 * max_length)
        try:
            converted = walk.build(value, 0)
        except Exception:
            converted = unsupported(value)
        if not isinstance(converted, str):
            converted = _ENCODER.encode(converted)
        return cut_text(converted, max_length)

    def parameters_json(self, value: object) -> bytes | None:
        """Return the parameters as UTF-8 JSON within the size limit, or None."""
        if value is None:
            return None
        if type(value) is dict or type(value) is list:
            data = self._plain_json(value)
            if data is not None:
                return data
        walk = _Walk(self, budget=self.max_parameters_bytes)
        try:
            tree = walk.build(value, 0)
        except Exception:
            # A dict changed by another thread while it was walked, or a
            # recursion limit reached by a deep caller.
            return _ENCODER.encode(unsupported(value)).encode("utf-8")
        if not walk.over:
            data = _ENCODER.encode(tree).encode("utf-8")
            if len(data) <= self.max_parameters_bytes:
                return data
            walk.size = len(data)
        return self._truncated(tree, walk)

    def _plain_json(self, value: dict[Any, Any] | list[Any]) -> bytes | None:
        """Return the JSON of ``value`` if no rule changes it, else None.

        Most parameters are parsed JSON with no secret key. For them, a walk
        over the keys and containers, the C encoder and a few substring
        searches in its output are much faster than :class:`_Walk`. Any doubt
        returns None, which sends the value through the full walk, and so
        does a value too large for the limit.
        """
        if self._plain_size(value, 0, self.max_parameters_bytes) < 0:
            return None
        try:
            text = _ENCODER.encode(value)
            # Lone surrogates, also those of a pair written as two code
            # points, make this raise.
            data = text.encode("utf-8")
        except (ValueError, TypeError, RecursionError):
            # A value JSON cannot hold, NaN or an infinity, a circular
            # reference, or a key that is not a str, number, bool or None.
            return None
        if len(data) > self.max_parameters_bytes:
            return None
        # The encoder escapes NUL as \u0000. A long run of digits may be an
        # int over MAX_INT_BITS bits.
        if "\\u0000" in text or _contains_token_prefix(text):
            return None
        # JSON escapes never touch the characters of the free-text markers,
        # so a string that may contain a secret leaves its marker here too.
        if _may_contain_secret(text) and not self._free_text_is_clean(value):
            return None
        if len(text) >= _MAX_INT_DIGITS and _LONG_DIGITS.search(text):
            return None
        return data

    def _plain_size(
        self, container: dict[Any, Any] | list[Any], depth: int, budget: int
    ) -> int:
        """Return a lower bound of the JSON size of ``container``, or -1 when a
        rule may change it or the bound exceeds ``budget``.

        A rule may change it when a key is secret or a str subclass, or when a
        container is not an exact dict or list within ``max_depth``. Other
        types are left to the encoder, which writes str, int, float, bool,
        None and their subclasses as the rules do, and raises on the rest.
        The bound counts characters for bytes, so a huge value is caught
        here, before the encoder copies it.
        """
        if depth >= self.max_depth:
            return -1
        size = 2
        if type(container) is dict:
            # Each item takes at least five bytes: "":0 and a comma.
            if 5 * len(container) > budget:
                return -1
            cache = self._key_cache
            for key in container:
                if type(key) is str:
                    secret = cache.get(key)
                    if secret is None:
                        secret = self.is_secret_key(key)
                    if secret:
                        return -1
                    size += len(key) + 4
                elif isinstance(key, str):
                    # The encoder would write a str subclass unchecked.
                    return -1
                else:
                    size += 4
                if size > budget:
                    return -1
            items: Iterable[object] = container.values()
        else:
            # Each item takes at least two bytes: a digit and a comma.
            if 2 * len(container) > budget:
                return -1
            if len(container) == 2 and self._is_secret_pair(container):
                return -1
            items = container
        for item in items:
            kind = type(item)
            if kind is str:
                size += len(item) + 3  # type: ignore[arg-type]
            elif kind is dict or kind is list:
                inner = self._plain_size(item, depth + 1, budget - size)  # type: ignore[arg-type]
                if inner < 0:
                    return -1
                size += inner + 1
            elif isinstance(item, dict | list | tuple):
                return -1
            else:
                size += 2
            if size > budget:
                return -1
        return size

    def _free_text_is_clean(self, value: dict[Any, Any] | list[Any]) -> bool:
        """Tell whether no free-text rule changes a string in ``value``.

        ``value`` has passed :meth:`_plain_size`, so its containers are exact
        dicts and lists, and its keys are exact strs or not strs at all.
        """
        pending: list[dict[Any, Any] | list[Any]] = [value]
        while pending:
            container = pending.pop()
            items: Iterable[object]
            if type(container) is dict:
                for key in container:
                    if type(key) is str and not self._text_is_clean(key):
                        return False
                items = container.values()
            else:
                items = container
            for item in items:
                if type(item) is dict or type(item) is list:
                    pending.append(item)
                elif isinstance(item, str) and not self._text_is_clean(item):
                    return False
        return True

    def _text_is_clean(self, text: str) -> bool:
        if not _may_contain_secret(text):
            return True
        return self._redact_free_text(text, cut=False) == text

    def _is_secret_pair(self, items: Any) -> bool:
        """Tell whether ``items``, a list, tuple or deque of two, is a key and value."""
        first = items[0]
        return isinstance(first, str) and self.is_secret_key(first)

    def _truncated(self, partial: object, walk: _Walk) -> bytes:
        """Return the truncation marker, with as long a preview as fits."""
        size_key = "original_bytes_at_least" if walk.stopped else "original_bytes"
        preview = _ENCODER.encode(partial)

        def marker(keep: int) -> bytes:
            value = {
                TRUNCATED_KEY: True,
                size_key: walk.size,
                "preview": preview[:keep],
            }
            return _ENCODER.encode(value).encode("utf-8")

        # The preview is escaped again inside the marker, and its characters
        # take one to four bytes, so the longest fitting cut is searched for.
        low, high = 0, len(preview)
        while low < high:
            middle = (low + high + 1) // 2
            if len(marker(middle)) <= self.max_parameters_bytes:
                low = middle
            else:
                high = middle - 1
        return marker(low)


class _Walk:
    """One conversion of a value by rules 1 to 3, with an optional size budget.

    ``size`` counts the compact JSON of what was walked, strings by their
    UTF-8 length. Once it exceeds ``budget``, ``over`` is set and the rest is
    only counted, up to :data:`MEASURE_NODE_LIMIT` values (then ``stopped``).
    After that, each container whose walk was stopped adds a lower bound for
    the items it did not visit, from its ``len()``.
    """

    __slots__ = (
        "active",
        "budget",
        "clean",
        "nodes",
        "over",
        "sanitizer",
        "size",
        "stopped",
    )

    def __init__(self, sanitizer: RowSanitizer, budget: int | None) -> None:
        self.sanitizer = sanitizer
        self.clean = sanitizer.clean
        self.budget = budget
        self.size = 0
        self.over = False
        self.stopped = False
        self.nodes = 0
        self.active: set[int] = set()

    def build(self, value: object, depth: int) -> Any:
        """Return ``value`` converted; once over budget, count it instead."""
        if self.over:
            self.measure(value, depth)
            return None
        kind = type(value)
        if kind is str:
            return self.string(value)  # type: ignore[arg-type]
        if kind is dict:
            return self.mapping(value, value.items(), depth)  # type: ignore[attr-defined]
        if kind is list or kind is tuple:
            return self.sequence(value, value, depth)  # type: ignore[arg-type]
        if kind is int:
            return self.integer(value)  # type: ignore[arg-type]
        if value is None:
            self.add(4)
            return None
        if kind is bool:
            self.add(5)
            return value
        if kind is float:
            return self.real(value)  # type: ignore[arg-type]
        try:
            return self.convert(value, depth)
        except Exception:
            return self.string(unsupported(value))

    def add(self, size: int) -> None:
        self.size += size
        if self.budget is not None and self.size > self.budget:
            self.over = True

    def string(self, text: str) -> str:
        budget = self.budget
        if budget is not None and len(text) > budget - self.size:
            # It cannot fit, so only the part that may go into the preview is
            # cleaned, and the rest is only counted.
            prefix = self.clean(text[: max(0, budget - self.size)], cut=True)
            self.size += utf8_length(text) + 2
            self.over = True
            return prefix
        text = self.clean(text)
        self.add(utf8_length(text) + 2)
        return text

    def integer(self, value: int) -> int | str:
        if value.bit_length() > MAX_INT_BITS:
            return self.string(unsupported(value))
        # A lower bound of the digits: log10(2) is just over 0.3.
        self.add(1 + value.bit_length() * 3 // 10)
        return value

    def real(self, value: float) -> float | str:
        if not math.isfinite(value):
            return self.string(_non_finite(value))
        self.add(len(repr(value)))
        return value

    def key(self, key: object) -> str:
        if type(key) is str:
            return self.string(key)
        if isinstance(key, str):
            return self.string(str.__str__(key))
        if key is None or isinstance(key, bool | int | float):
            # json.dumps writes such keys this way.
            text = _ENCODER.encode(key)
            return self.string(text)
        return self.string(unsupported(key))

    def enter(self, container: object, depth: int) -> str | None:
        """Return a marker instead of walking ``container``, or None to walk it."""
        if depth >= self.sanitizer.max_depth:
            return self.string(self.sanitizer.depth_marker)
        if id(container) in self.active:
            return self.string(CIRCULAR)
        self.active.add(id(container))
        return None

    def mapping(
        self, container: object, items: Iterable[tuple[object, object]], depth: int
    ) -> dict[str, Any] | str:
        marker = self.enter(container, depth)
        if marker is not None:
            return marker
        result: dict[str, Any] = {}
        is_secret = self.sanitizer.is_secret_key
        visited = 0
        try:
            self.add(2)
            for key, item in items:
                if self.over:
                    if self.stopped:
                        self.count_rest(container, visited, _MIN_OBJECT_ITEM_BYTES)
                        break
                    visited += 1
                    self.measure(key, depth + 1)
                    self.measure(item, depth + 1)
                    self.size += 2
                    continue
                visited += 1
                name = self.key(key)
                self.add(2)
                if is_secret(name):
                    result[name] = self.string(REDACTED)
                else:
                    result[name] = self.build(item, depth + 1)
        finally:
            self.active.discard(id(container))
        return result

    def sequence(
        self, container: object, items: Iterable[object], depth: int
    ) -> list[Any] | str:
        marker = self.enter(container, depth)
        if marker is not None:
            return marker
        result: list[Any] = []
        secret_pair = (
            isinstance(container, list | tuple | collections.deque)
            and len(container) == 2
            and self.sanitizer._is_secret_pair(container)
        )
        visited = 0
        try:
            self.add(2)
            for item in items:
                if self.over:
                    if self.stopped:
                        self.count_rest(container, visited, _MIN_ARRAY_ITEM_BYTES)
                        break
                    visited += 1
                    self.measure(item, depth + 1)
                    self.size += 1
                    continue
                if secret_pair and visited == 1:
                    item = REDACTED
                visited += 1
                result.append(self.build(item, depth + 1))
                self.add(1)
        finally:
            self.active.discard(id(container))
        return result

    def convert(self, value: object, depth: int) -> Any:
        """Apply rule 2 to a value of a type that is not JSON."""
        if isinstance(value, enum.Enum):
            return self.build(value.value, depth)
        if isinstance(value, str):
            return self.string(str.__str__(value))
        if isinstance(value, int):
            return self.integer(int(value))
        if isinstance(value, float):
            return self.real(float(value))
        if isinstance(value, Mapping):
            return self.mapping(value, value.items(), depth)
        if isinstance(value, set | frozenset):
            # Sorting a set that cannot fit anyway would cost more than
            # walking the part that fits.
            if self.budget is not None and 2 * len(value) > self.budget:
                return self.sequence(value, value, depth)
            return self.sequence(value, _sorted_if_possible(value), depth)
        if isinstance(value, list | tuple | collections.deque):
            return self.sequence(value, value, depth)
        text = _standard_text(value)
        if text is not None:
            return self.string(text)
        if isinstance(value, dt.timedelta):
            return self.real(value.total_seconds())
        if isinstance(value, Decimal):
            return self.string(
                str(value) if value.is_finite() else _decimal_word(value)
            )
        return self.string(unsupported(value))

    def measure(self, value: object, depth: int) -> None:
        """Count the JSON size of ``value`` without converting it."""
        if self.stopped:
            return
        self.nodes += 1
        if self.nodes > MEASURE_NODE_LIMIT:
            self.stopped = True
            return
        if isinstance(value, str):
            self.size += utf8_length(value) + 2
        elif isinstance(value, bool) or value is None:
            self.size += 5
        elif isinstance(value, int):
            self.size += 1 + min(value.bit_length(), MAX_INT_BITS) * 3 // 10
        elif isinstance(value, float):
            self.size += len(repr(value))
        elif depth >= self.sanitizer.max_depth:
            self.size += len(self.sanitizer.depth_marker) + 2
        elif isinstance(value, Mapping):
            self._measure_items(value, value.items(), depth)
        elif isinstance(value, list | tuple | set | frozenset | collections.deque):
            self.size += 2
            for visited, item in enumerate(value):
                if self.stopped:
                    self.count_rest(value, visited, _MIN_ARRAY_ITEM_BYTES)
                    break
                self.measure(item, depth + 1)
                self.size += 1
        else:
            self.size += len(type_name(value)) + 18

    def _measure_items(
        self, container: object, items: Iterable[tuple[object, object]], depth: int
    ) -> None:
        self.size += 2
        visited = 0
        try:
            for key, item in items:
                if self.stopped:
                    self.count_rest(container, visited, _MIN_OBJECT_ITEM_BYTES)
                    break
                visited += 1
                self.measure(key, depth + 1)
                self.measure(item, depth + 1)
                self.size += 2
        except Exception:
            pass

    def count_rest(self, container: object, visited: int, item_bytes: int) -> None:
        """Add ``item_bytes`` for each item of ``container`` after the ``visited``."""
        try:
            rest = len(container) - visited  # type: ignore[arg-type]
        except Exception:
            return  # A container without a usable length adds nothing.
        if rest > 0:
            self.size += rest * item_bytes


def _redacted_value(written: str) -> str | None:
    """Return what replaces the value ``written`` of a secret pair, or None."""
    quote = written[0]
    if quote not in "\"'":
        return REDACTED
    if len(written) >= 2 and written.endswith(quote):
        if len(written) == 2:
            return None  # An empty quoted value hides nothing.
        return quote + REDACTED + quote
    # A quote left open runs to the end of the text.
    return quote + REDACTED


def _sorted_if_possible(items: Iterable[object]) -> list[object]:
    values = list(items)
    try:
        return sorted(values)  # type: ignore[type-var]
    except TypeError:
        return values


_STANDARD_TEXT: tuple[tuple[type, Callable[[Any], str]], ...] = (
    (dt.datetime, dt.datetime.isoformat),
    (dt.date, dt.date.isoformat),
    (dt.time, dt.time.isoformat),
    (uuid.UUID, str),
)


def _standard_text(value: object) -> str | None:
    for kind, to_text in _STANDARD_TEXT:
        if isinstance(value, kind):
            return to_text(value)
    return None


def _decimal_word(value: Decimal) -> str:
    if value.is_nan():
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def whole_number(value: object, *, timedelta_unit_ms: bool = False) -> int | None:
    """Return ``value`` as an integer for an int4 column >= 0, or None (rule 5)."""
    if type(value) is int:
        # The common case, checked first for speed.
        return None if value < 0 else min(value, INT4_MAX)
    if value is None or isinstance(value, bool):
        return None
    if timedelta_unit_ms and isinstance(value, dt.timedelta):
        value = value / dt.timedelta(milliseconds=1)
    number: int
    if isinstance(value, int):
        number = int(value)
    elif isinstance(value, float | Decimal | numbers.Real):
        try:
            # A Real's __round__ may return its own type, not an int.
            number = int(round(value))  # noqa: RUF046
        except (ValueError, OverflowError, TypeError, ArithmeticError):
            # NaN or an infinity.
            return None
    else:
        return None
    if number < 0:
        return None
    return min(number, INT4_MAX)


def timestamp(value: object, now: dt.datetime) -> dt.datetime:
    """Return ``value`` as an aware UTC datetime, or ``now`` (rule 6)."""
    if isinstance(value, dt.datetime):
        try:
            return value.astimezone(dt.UTC)
        except (OverflowError, ValueError, OSError):
            return now
    return now
