"""Secret files of the embedded development server: read, or create with mode 0600.

Without a key in the environment, the embedded server keeps generated keys in
files of its data folder: the token keys (:mod:`mcp_authdb.store.tokens`) and
the encryption key of the OAuth tables (:mod:`mcp_authdb.server.crypto`).
:func:`read_secret_lines` creates such a file whole or not at all, so every
process that races to create it reads the same one. It reads only a regular
file of this user that no other user may read or change. Error messages name
the file and never contain its content.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import os
import secrets
import stat
from collections.abc import Callable
from pathlib import Path

from mcp_authdb.errors import ConfigurationError

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SecretFile:
    """A secret file, and the words its errors and log records use for it."""

    path: Path
    # The file's name in messages, such as "the token key file".
    description: str
    # The environment variable that replaces the file. Errors that setting it
    # would avoid name it.
    variable: str
    # Reading stops after this many bytes, so that a wrong path to a large file
    # fails fast.
    max_bytes: int
    # The expected content, named in the error about non-ASCII bytes, such as
    # "id:secret lines only".
    content_rule: str
    # The generated content's name in the creation log line, such as
    # "a new key k1".
    new_content_name: str
    # The prefix of the log records' action, such as "tokens.key_file".
    log_action: str
    # Advice appended to the error about a mode that lets other users read the
    # file, after "run `chmod 600 PATH`". Empty: none.
    exposed_advice: str = ""


def read_secret_lines(file: SecretFile, new_content: Callable[[], str]) -> list[str]:
    """Return the lines of ``file`` that are neither blank nor ``#`` comments.

    A missing file is first created with the text ``new_content()`` and mode
    0600, together with its missing folders (mode 0755 under root, whose
    embedded server user must enter them, and 0700 otherwise). The lines are
    stripped of surrounding whitespace. Raises :class:`ConfigurationError`
    when the file or a folder cannot be created or read, when the file is a
    symbolic link, not a regular file, owned by another user, readable or
    writable by other users, larger than ``file.max_bytes`` or not ASCII.
    """
    path = file.path
    try:
        if not os.path.lexists(path):
            _make_folder(file, path.parent)
            _create(file, new_content())
        text = _read(file)
    except OSError as exc:
        # The steps report the expected failures themselves. This covers the
        # others, such as a path too long for the system.
        raise _error(file, "could not be read or created", exc) from None
    lines = [line.strip() for line in text.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _make_folder(file: SecretFile, folder: Path) -> None:
    """Create the folder of the secret file and its parents, if missing.

    The modes are those the embedded server gives the folders it creates:
    0755 under root, whose server user must enter them, and 0700 otherwise.
    """
    if folder.is_dir():
        return
    if folder.exists():
        raise ConfigurationError(
            f"{folder}, the folder of {file.description}, is not a folder; "
            f"choose another folder with MCP_AUTHDB_DATA_DIR, or set "
            f"{file.variable}"
        )
    mode = 0o755 if os.geteuid() == 0 else 0o700
    missing = [folder, *(p for p in folder.parents if not p.exists())]
    for part in reversed(missing):
        try:
            part.mkdir(mode=mode)
        except FileExistsError:
            continue
        except OSError as exc:
            raise ConfigurationError(
                f"could not create the folder {part} for {file.description}: "
                f"{exc.strerror}; create it, choose another folder with "
                f"MCP_AUTHDB_DATA_DIR, or set {file.variable}"
            ) from None
        part.chmod(mode)


def _create(file: SecretFile, content: str) -> None:
    """Write the secret file with ``content``, unless another process is first.

    The content goes to a temporary file that only this process can have made
    (O_CREAT|O_EXCL), and that file is then hard-linked to the path. A link
    never replaces an existing file, so the first process to link wins, and
    readers never see a partly written file.
    """
    path = file.path
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(8)}")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(temporary, flags, 0o600)
    except OSError as exc:
        raise _error(file, "could not be created", exc) from None

    try:
        with os.fdopen(fd, "w", encoding="ascii") as stream:
            stream.write(content)
            stream.flush()
            os.fsync(stream.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            logger.debug(
                "another process created %s %s first",
                file.description,
                path,
                extra={"action": f"{file.log_action}.raced"},
            )
            return
        except OSError as exc:
            raise _error(file, "could not be created", exc) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()

    _sync_folder(path.parent)
    logger.info(
        "created %s %s with %s",
        file.description,
        path,
        file.new_content_name,
        extra={"action": f"{file.log_action}.created", "path": str(path)},
    )


def _sync_folder(folder: Path) -> None:
    # Makes the new link survive a crash. Errors are ignored because some file
    # systems cannot sync a folder, and the file's own data is already synced.
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _read(file: SecretFile) -> str:
    """Return the text of the secret file.

    The file's type, owner and mode are checked on the open descriptor, so
    they are those of the file that is read.
    """
    path = file.path
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigurationError(
                f"{file.description} {path} is a symbolic link; replace it with "
                f"the file itself, or set {file.variable}"
            ) from None
        raise _error(file, "could not be opened", exc) from None

    chunks: list[bytes] = []
    size = 0
    try:
        _check(file, os.fstat(fd))
        while size <= file.max_bytes:
            chunk = os.read(fd, file.max_bytes + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)

    if len(data) > file.max_bytes:
        raise ConfigurationError(
            f"{file.description} {path} is larger than {file.max_bytes} bytes, "
            "so it is not a key file; check the path"
        )
    try:
        return data.decode("ascii")
    except UnicodeDecodeError:
        raise ConfigurationError(
            f"{file.description} {path} contains non-ASCII bytes; it must "
            f"contain {file.content_rule}"
        ) from None


def _check(file: SecretFile, info: os.stat_result) -> None:
    path = file.path
    if not stat.S_ISREG(info.st_mode):
        raise ConfigurationError(
            f"{file.description} {path} is not a regular file; remove it, or "
            f"set {file.variable}"
        )
    if info.st_uid != os.geteuid():
        raise ConfigurationError(
            f"{file.description} {path} belongs to user id {info.st_uid}, not "
            f"to this user (id {os.geteuid()}); run as its owner, or, if it can "
            f"be trusted, make it yours with `chown {os.geteuid()} {path}`"
        )
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o077:
        raise ConfigurationError(
            f"{file.description} {path} has mode {mode:04o}, so other users may "
            f"read or change it; run `chmod 600 {path}`{file.exposed_advice}"
        )


def _error(file: SecretFile, failure: str, exc: OSError) -> ConfigurationError:
    return ConfigurationError(
        f"{file.description} {file.path} {failure}: {exc.strerror}; check the "
        f"folder's permissions, or set {file.variable}"
    )
