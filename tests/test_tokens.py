"""Tokens and their keyed hashes: formats, key parsing, the key file."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import shlex
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from mcp_authdb.db.settings import Settings
from mcp_authdb.errors import ConfigurationError, InvalidValueError
from mcp_authdb.store import tokens
from mcp_authdb.store.tokens import (
    ACCESS_TOKEN_PREFIX,
    GENERATE_KEY_COMMAND,
    KEY_FILE_NAME,
    MAX_KEYS,
    REFRESH_TOKEN_PREFIX,
    TOKEN_KEYS_VARIABLE,
    TokenHasher,
    TokenKey,
    TokenKeys,
    TokenKind,
    new_token,
    token_kind,
)

SECRET_1 = "a" * 43
SECRET_2 = "b" * 43
EXTERNAL = Settings(database_url="postgresql:///postgres?host=/var/run/postgresql")


def embedded(data_dir: Path) -> Settings:
    return Settings(database_url=None, data_dir=data_dir)


def mac_of(secret: str, token: str) -> str:
    key = base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))
    digest = hmac.new(key, token.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


# Tokens ------------------------------------------------------------------


def test_new_token_format() -> None:
    access = new_token(TokenKind.ACCESS)
    refresh = new_token(TokenKind.REFRESH)

    assert access.startswith("mcpat_")
    assert refresh.startswith("mcprt_")
    assert len(access) == len(refresh) == 49
    assert token_kind(access) is TokenKind.ACCESS
    assert token_kind(refresh) is TokenKind.REFRESH
    assert ACCESS_TOKEN_PREFIX == "mcpat_"
    assert REFRESH_TOKEN_PREFIX == "mcprt_"


@pytest.mark.parametrize(
    ("kind", "prefix"), [(TokenKind.CODE, "mcpac_"), (TokenKind.STATE, "mcpst_")]
)
def test_codes_and_states_hash_like_tokens(kind: TokenKind, prefix: str) -> None:
    value = new_token(kind)
    hasher = TokenHasher(TokenKeys.parse(f"k2:{'b' * 43},k1:{'a' * 43}"))

    assert value.startswith(prefix)
    assert len(value) == 49
    assert token_kind(value) is kind
    assert hasher.candidates(value, kind)[0] == hasher.hash(value)
    assert len(hasher.candidates(value, kind)) == 2
    assert hasher.candidates(value, TokenKind.ACCESS) == []


def test_new_tokens_are_distinct() -> None:
    tokens_made = {new_token(TokenKind.ACCESS) for _ in range(1000)}

    assert len(tokens_made) == 1000


class LooksLikeToken:
    """An object whose str() is a valid token; it is still not a token."""

    def __str__(self) -> str:
        return "mcpat_" + "A" * 43


VALID = "mcpat_" + "A" * 43
SHARED_PREFIX = "mcpat_" + "A" * 5000

NOT_TOKENS: list[Any] = [
    None,
    42,
    4.2,
    True,
    b"mcpat_" + b"A" * 43,
    bytearray(b"mcpat_" + b"A" * 43),
    ["mcpat_" + "A" * 43],
    {"token": VALID},
    LooksLikeToken(),
    "",
    "mcpat_",
    "x" * 10240,
    "mcpat_" + "A" * 10240,
    SHARED_PREFIX + "x",
    SHARED_PREFIX + "y",
    VALID + "A",
    VALID[:-1],
    VALID + "\n",
    " " + VALID[1:],
    "MCPAT_" + "A" * 43,
    "mcpxx_" + "A" * 43,
    "mcpat_" + "\N{LATIN SMALL LETTER E WITH ACUTE}" * 43,
    "mcpat_" + "\x00" * 43,
    "mcpat_" + "A" * 21 + "\x00" + "A" * 21,
    "mcpat_" + "A" * 42 + "+",
    "mcpat_" + "A" * 42 + "/",
    "mcpat_" + "A" * 41 + "==",
    "mcpat_" + "\ud800" * 43,
    "mcpat_" + "\uff21" * 43,
]


@pytest.mark.parametrize("value", NOT_TOKENS, ids=range(len(NOT_TOKENS)))
def test_token_kind_rejects_non_tokens(value: Any) -> None:
    assert token_kind(value) is None


@pytest.mark.parametrize("value", NOT_TOKENS, ids=range(len(NOT_TOKENS)))
def test_candidates_empty_for_non_tokens(value: Any) -> None:
    hasher = TokenHasher(TokenKeys.parse(f"k1:{SECRET_1}"))

    assert hasher.candidates(value) == []
    assert hasher.candidates(value, TokenKind.ACCESS) == []
    assert hasher.candidates(value, TokenKind.REFRESH) == []


# Hashing -----------------------------------------------------------------


def test_hash_is_keyed_hmac_sha256() -> None:
    hasher = TokenHasher(TokenKeys.parse(f"k1:{SECRET_1}"))
    token = new_token(TokenKind.ACCESS)

    stored = hasher.hash(token)

    assert stored == f"k1:{mac_of(SECRET_1, token)}"
    assert len(stored) == len("k1:") + 43
    assert token[6:] not in stored


def test_hash_uses_newest_key() -> None:
    hasher = TokenHasher(TokenKeys.parse(f"new:{SECRET_2}, old:{SECRET_1}"))
    token = new_token(TokenKind.REFRESH)

    assert hasher.hash(token) == f"new:{mac_of(SECRET_2, token)}"


def test_candidates_cover_every_key_newest_first() -> None:
    hasher = TokenHasher(TokenKeys.parse(f"k2:{SECRET_2},k1:{SECRET_1}"))
    token = new_token(TokenKind.ACCESS)

    candidates = hasher.candidates(token)

    assert candidates == [
        f"k2:{mac_of(SECRET_2, token)}",
        f"k1:{mac_of(SECRET_1, token)}",
    ]
    assert candidates[0] == hasher.hash(token)


def test_candidates_check_kind() -> None:
    hasher = TokenHasher(TokenKeys.parse(f"k1:{SECRET_1}"))
    access = new_token(TokenKind.ACCESS)
    refresh = new_token(TokenKind.REFRESH)

    assert hasher.candidates(access, TokenKind.ACCESS) != []
    assert hasher.candidates(access, TokenKind.REFRESH) == []
    assert hasher.candidates(refresh, TokenKind.ACCESS) == []
    assert hasher.candidates(refresh, TokenKind.REFRESH) != []


def test_different_keys_give_different_hashes() -> None:
    token = new_token(TokenKind.ACCESS)
    first = TokenHasher(TokenKeys.parse(f"k1:{SECRET_1}")).hash(token)
    second = TokenHasher(TokenKeys.parse(f"k1:{SECRET_2}")).hash(token)

    assert first != second


@pytest.mark.parametrize("value", ["", "secret-value", 42, None, "mcpat_short"])
def test_hash_rejects_non_tokens(value: Any) -> None:
    hasher = TokenHasher(TokenKeys.parse(f"k1:{SECRET_1}"))

    with pytest.raises(InvalidValueError) as raised:
        hasher.hash(value)

    assert "not a token" in str(raised.value)
    assert "secret-value" not in str(raised.value)


def test_hasher_requires_token_keys() -> None:
    with pytest.raises(InvalidValueError, match="not TokenKeys"):
        TokenHasher(f"k1:{SECRET_1}")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("key_id", "secret", "words"),
    [
        ("k:1", b"x" * 32, ["key_id='k:1'", "not a valid key id"]),
        ("", b"x" * 32, ["key_id=''"]),
        ("k" * 17, b"x" * 32, ["a str of length 17", "not a valid key id"]),
        ("k1", b"x" * 31, ["'k1'", "length 31", "at least 32"]),
        ("k1", "x" * 43, ["'k1'", "str", "at least 32"]),
    ],
)
def test_token_key_rejects_bad_values(
    key_id: str, secret: Any, words: list[str]
) -> None:
    with pytest.raises(InvalidValueError) as raised:
        TokenKey(key_id, secret)

    for word in words:
        assert word in str(raised.value)
    assert "xxxx" not in str(raised.value)


def test_token_keys_rejects_bad_lists() -> None:
    key = TokenKey("k1", b"x" * 32)

    with pytest.raises(InvalidValueError, match="0 keys given"):
        TokenKeys([])
    with pytest.raises(InvalidValueError, match="5 keys given"):
        TokenKeys([TokenKey(f"k{i}", b"x" * 32) for i in range(5)])
    with pytest.raises(InvalidValueError, match="repeat an id"):
        TokenKeys([key, TokenKey("k1", b"y" * 32)])


def test_repr_hides_secrets() -> None:
    keys = TokenKeys.parse(f"k2:{SECRET_2},k1:{SECRET_1}")
    hasher = TokenHasher(keys)

    for text in (repr(keys), str(keys), repr(hasher), repr(keys.keys[0])):
        assert SECRET_1 not in text
        assert SECRET_2 not in text
        assert "k2" in text


# Parsing MCP_AUTHDB_TOKEN_KEYS ---------------------------------------------


def test_parse_keys_newest_first() -> None:
    keys = TokenKeys.parse(f" k3:{SECRET_1} ,k-2_b:{SECRET_2}=")

    assert keys.key_ids == ("k3", "k-2_b")
    assert keys.newest.key_id == "k3"
    assert keys.keys[0].secret == base64.urlsafe_b64decode(SECRET_1 + "=")


def test_parse_accepts_padding_and_generated_key() -> None:
    generated = subprocess.run(
        [sys.executable, *shlex.split(GENERATE_KEY_COMMAND)[1:]],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()

    keys = TokenKeys.parse(generated)
    padded = TokenKeys.parse(generated + "=")

    assert keys.key_ids == ("k1",)
    assert len(keys.newest.secret) == 32
    assert padded.newest.secret == keys.newest.secret


def test_parse_accepts_max_keys() -> None:
    value = ",".join(f"k{i}:{chr(ord('a') + i) * 43}" for i in range(MAX_KEYS))

    assert len(TokenKeys.parse(value).keys) == MAX_KEYS


SECRET_IN_ERROR = "Zz9" * 20  # 60 base64url characters, 45 bytes

# (value, words the message must contain)
BAD_KEYS: list[tuple[str, list[str]]] = [
    ("", ["MCP_AUTHDB_TOKEN_KEYS", "no key", "secrets.token_urlsafe(32)"]),
    ("  ", ["no key"]),
    (f"k1:{SECRET_1},", ["key 2", "empty", "comma"]),
    (f",k1:{SECRET_1}", ["key 1", "empty"]),
    (SECRET_IN_ERROR, ["key 1", "no ':'", "id:secret"]),
    (f"{SECRET_IN_ERROR}:{SECRET_1}", ["key 1", "not a valid key id", "60"]),
    (f"k 1:{SECRET_IN_ERROR}", ["key 1", "'k 1'", "not a valid key id"]),
    (f":{SECRET_IN_ERROR}", ["key 1", "not a valid key id", "0 characters"]),
    (f"k1:{SECRET_IN_ERROR[:-1]}+", ["'k1'", "not base64url", "index 59"]),
    (f"k1:{SECRET_IN_ERROR[:10]}={SECRET_IN_ERROR}", ["not base64url", "index 10"]),
    (f"k1:{SECRET_IN_ERROR}===", ["not base64url"]),
    (f"k1:{SECRET_IN_ERROR[:41]}", ["41 base64url characters", "cut"]),
    (f"k1:{SECRET_IN_ERROR[:22]}", ["16 bytes", "minimum of 32"]),
    ("k1:", ["0 bytes", "minimum of 32"]),
    (
        f"k1:{SECRET_IN_ERROR[:-1]}\N{LATIN SMALL LETTER E WITH ACUTE}",
        ["not base64url", "index 59"],
    ),
    (f"k1:{SECRET_IN_ERROR},k1:{SECRET_1}", ["'k1'", "used twice"]),
    (f"k1:{SECRET_IN_ERROR},k2:{SECRET_IN_ERROR}", ["'k1'", "'k2'", "same secret"]),
    (
        ",".join(f"k{i}:{SECRET_IN_ERROR}" for i in range(MAX_KEYS + 1)),
        ["5 keys", "maximum of 4", "oldest"],
    ),
]


@pytest.mark.parametrize(
    ("value", "words"), BAD_KEYS, ids=[str(i) for i in range(len(BAD_KEYS))]
)
def test_parse_errors_name_problem_not_secret(value: str, words: list[str]) -> None:
    with pytest.raises(ConfigurationError) as raised:
        TokenKeys.parse(value)
    message = str(raised.value)

    for word in words:
        assert word in message
    assert TOKEN_KEYS_VARIABLE in message
    # No piece of a secret of 8 characters or more appears.
    for start in range(len(SECRET_IN_ERROR) - 8):
        assert SECRET_IN_ERROR[start : start + 8] not in message
    assert raised.value.__cause__ is None
    assert raised.value.__context__ is None


# TokenKeys.from_env --------------------------------------------------------


def test_from_env_uses_variable(tmp_path: Path) -> None:
    environ = {TOKEN_KEYS_VARIABLE: f"k9:{SECRET_1}"}

    external = TokenKeys.from_env(EXTERNAL, environ)
    local = TokenKeys.from_env(embedded(tmp_path), environ)

    assert external.key_ids == ("k9",)
    assert local.key_ids == ("k9",)
    assert not (tmp_path / KEY_FILE_NAME).exists()


def test_from_env_rejects_empty_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="set but empty"):
        TokenKeys.from_env(embedded(tmp_path), {TOKEN_KEYS_VARIABLE: " "})

    assert not (tmp_path / KEY_FILE_NAME).exists()


def test_from_env_requires_variable_with_database_url() -> None:
    with pytest.raises(ConfigurationError) as raised:
        TokenKeys.from_env(EXTERNAL, {})
    message = str(raised.value)

    assert TOKEN_KEYS_VARIABLE in message
    assert "not set" in message
    assert "DATABASE_URL" in message
    assert GENERATE_KEY_COMMAND in message


def test_from_env_creates_key_file_for_embedded(tmp_path: Path) -> None:
    settings = embedded(tmp_path)

    first = TokenKeys.from_env(settings, {})
    second = TokenKeys.from_env(settings, {})
    path = tmp_path / KEY_FILE_NAME
    info = path.stat()

    assert first.key_ids == ("k1",)
    assert len(first.newest.secret) == 32
    assert second.newest.secret == first.newest.secret
    assert stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_uid == os.geteuid()
    assert sorted(p.name for p in tmp_path.iterdir()) == [KEY_FILE_NAME]


def test_from_env_default_data_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokens, "default_data_dir", lambda: tmp_path / "default")

    keys = TokenKeys.from_env(Settings(database_url=None), {})

    assert keys.key_ids == ("k1",)
    assert (tmp_path / "default" / KEY_FILE_NAME).is_file()


def test_key_file_creates_missing_folders(tmp_path: Path) -> None:
    data_dir = tmp_path / "a" / "b"

    TokenKeys.from_env(embedded(data_dir), {})

    expected = 0o755 if os.geteuid() == 0 else 0o700
    assert stat.S_IMODE(data_dir.stat().st_mode) == expected
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == expected


def test_key_file_keeps_keys_added_by_hand(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE_NAME
    TokenKeys.from_key_file(path)
    old = path.read_text().strip().splitlines()[-1]
    path.write_text(f"# rotated\nk2:{SECRET_2}\n\n{old}\n")

    keys = TokenKeys.from_key_file(path)

    assert keys.key_ids == ("k2", "k1")


def test_key_file_with_open_mode_rejected(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE_NAME
    TokenKeys.from_key_file(path)
    secret = path.read_text().strip().splitlines()[-1]
    path.chmod(0o640)

    with pytest.raises(ConfigurationError) as raised:
        TokenKeys.from_key_file(path)
    message = str(raised.value)

    assert "mode 0640" in message
    assert f"chmod 600 {path}" in message
    assert secret not in message


def test_key_file_of_other_user_rejected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / KEY_FILE_NAME
    TokenKeys.from_key_file(path)
    owner = path.stat().st_uid
    # The process pretends to be another user, so the file's owner differs.
    monkeypatch.setattr(os, "geteuid", lambda: owner + 1)

    with pytest.raises(ConfigurationError) as raised:
        TokenKeys.from_key_file(path)
    message = str(raised.value)

    assert f"belongs to user id {owner}" in message
    assert "chown" in message


def test_key_file_symlink_rejected(tmp_path: Path) -> None:
    real = tmp_path / "real-keys"
    real.write_text(f"k1:{SECRET_1}\n")
    real.chmod(0o600)
    link = tmp_path / KEY_FILE_NAME
    link.symlink_to(real)

    with pytest.raises(ConfigurationError, match="symbolic link"):
        TokenKeys.from_key_file(link)


def test_key_file_dangling_symlink_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    link = tmp_path / KEY_FILE_NAME
    link.symlink_to(target)

    with pytest.raises(ConfigurationError, match="symbolic link"):
        TokenKeys.from_key_file(link)

    assert not target.exists()


def test_key_file_folder_rejected(tmp_path: Path) -> None:
    (tmp_path / KEY_FILE_NAME).mkdir(mode=0o700)

    with pytest.raises(ConfigurationError, match="not a regular file"):
        TokenKeys.from_key_file(tmp_path / KEY_FILE_NAME)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"", ["contains no key", "delete it"]),
        (b"# only a comment\n\n", ["contains no key"]),
        ("k1:\N{LATIN SMALL LETTER E WITH ACUTE}".encode(), ["non-ASCII"]),
        (b"k1:shortish\n", ["the key file", "6 bytes", "minimum of 32"]),
        (b"k" * (64 * 1024 + 1), ["larger than 65536 bytes"]),
    ],
)
def test_key_file_content_errors(
    tmp_path: Path, content: bytes, words: list[str]
) -> None:
    path = tmp_path / KEY_FILE_NAME
    path.write_bytes(content)
    path.chmod(0o600)

    with pytest.raises(ConfigurationError) as raised:
        TokenKeys.from_key_file(path)

    for word in words:
        assert word in str(raised.value)


def test_key_file_unwritable_folder_error(tmp_path: Path) -> None:
    file_in_the_way = tmp_path / "not-a-folder"
    file_in_the_way.write_text("")

    with pytest.raises(ConfigurationError) as raised:
        TokenKeys.from_key_file(file_in_the_way / KEY_FILE_NAME)

    assert "is not a folder" in str(raised.value)
    assert TOKEN_KEYS_VARIABLE in str(raised.value)


def test_key_file_name_too_long_error(tmp_path: Path) -> None:
    path = tmp_path / ("x" * 300) / KEY_FILE_NAME

    with pytest.raises(ConfigurationError) as raised:
        TokenKeys.from_key_file(path)

    assert "File name too long" in str(raised.value)
    assert TOKEN_KEYS_VARIABLE in str(raised.value)


_CREATE_KEYS = textwrap.dedent(
    """
    import hashlib, sys, time
    from pathlib import Path
    from mcp_authdb.store.tokens import TokenKeys

    start = float(sys.argv[2])
    time.sleep(max(0.0, start - time.time()))
    keys = TokenKeys.from_key_file(Path(sys.argv[1]))
    print(hashlib.sha256(keys.newest.secret).hexdigest())
    """
)


def test_key_file_race_between_processes(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE_NAME
    # Every process sleeps until the same instant, then creates the file.
    start = time.time() + 1.5
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _CREATE_KEYS, str(path), str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(8)
    ]
    outputs = [process.communicate(timeout=60) for process in processes]

    for process, (_, stderr) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, stderr
    fingerprints = {stdout.strip() for stdout, _ in outputs}
    expected = hashlib.sha256(TokenKeys.from_key_file(path).newest.secret)
    assert fingerprints == {expected.hexdigest()}
    assert sorted(p.name for p in tmp_path.iterdir()) == [KEY_FILE_NAME]


def test_key_file_race_between_threads(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE_NAME
    barrier = threading.Barrier(16)
    secrets: list[bytes] = []

    def load() -> None:
        barrier.wait()
        secrets.append(TokenKeys.from_key_file(path).newest.secret)

    threads = [threading.Thread(target=load) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)

    assert len(secrets) == 16
    assert len(set(secrets)) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [KEY_FILE_NAME]


class _HostileStr(str):
    def startswith(self, *args: object, **kwargs: object) -> bool:
        raise RuntimeError("a str subclass ran its own method")

    def __len__(self) -> int:
        raise RuntimeError("a str subclass ran its own method")


def test_str_subclass_is_not_a_token() -> None:
    token = _HostileStr(new_token(TokenKind.ACCESS))

    assert token_kind(token) is None
    assert TokenHasher(TokenKeys.parse("k1:" + "t" * 43)).candidates(token) == []
