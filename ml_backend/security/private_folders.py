"""Folders in shared places (``/tmp``, ``/dev/shm``) that other local users can neither read, guess nor plant.

Training exports (private images) and the prompt state (annotators' prompts) are written under folders of
host-wide, world-writable places. A folder there with a fixed name could be made in advance by another user
of the host (who then reads what is written and plants images or objects) or be a symbolic link to
somewhere else. So such a folder:

* is named with a random token of this installation (:func:`installation_token`: 128 bits, made once and kept
  in ``MODEL_DIR``, readable by this user only), so its name cannot be guessed;
* is made ``0700`` and, when it already exists, is used only if it is a real folder (not a symbolic link: it
  is opened with ``O_NOFOLLOW``), owned by this user; otherwise :class:`UnsafeFolderError` names the problem;
* holds files opened with ``O_NOFOLLOW`` (:func:`open_no_follow`), so a link planted in it is never followed.

Hand-written: ``tempfile.mkdtemp`` makes a private folder, but one that other processes of the backend
(gunicorn workers, RQ workers) and its next start cannot find again.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from pathlib import Path

TOKEN_FILE = ".private-folders.token"  # under MODEL_DIR
TOKEN_BYTES = 16


class UnsafeFolderError(OSError):
    """A folder that other users of the host could read or fill; its message says what to do."""


def this_user() -> int:
    return os.geteuid()


def private_directory(path: Path, *, create: bool = True) -> Path:
    """Make ``path`` a folder only this user can enter, or check that the existing one is (``create=False``:
    only check one that exists); its parents are made as usual (they belong to the operator: ``/tmp``,
    ``/dev/shm``, ``MODEL_DIR``). Raises :class:`UnsafeFolderError` for a symbolic link, a non-folder or a
    folder of another user."""
    path = Path(path)
    if not create and not os.path.lexists(path):
        return path
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)  # never follows a link at ``path``: an existing one is FileExistsError
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if os.path.islink(path):
            raise UnsafeFolderError(f"{path} is a symbolic link, not a folder: another user of this host may have "
                                    "planted it; remove it") from exc
        if exc.errno == getattr(os, "ENOTDIR", 20) or not os.path.isdir(path):
            raise UnsafeFolderError(f"{path} exists and is not a folder; remove it") from exc
        raise
    try:
        info = os.fstat(fd)
        if info.st_uid != this_user():
            raise UnsafeFolderError(f"{path} belongs to user id {info.st_uid}, not to this user ({this_user()}): "
                                    "another user of this host may have made it to read or plant files; remove it")
        if stat.S_IMODE(info.st_mode) != 0o700:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)
    return path


def open_no_follow(path: Path, flags: int, mode: int = 0o600) -> int:
    """``os.open`` that never follows a symbolic link at ``path`` (``OSError`` ELOOP instead)."""
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)


def installation_token(model_dir: Path, *, create: bool = True) -> str | None:
    """This installation's random token (hex), kept in ``MODEL_DIR/.private-folders.token`` (mode 0600), made
    on first use (None when there is none and not ``create``). Every process sharing ``MODEL_DIR`` (gunicorn's
    master and workers, RQ workers, the next start) finds the same folders by it; no other user can read it."""
    path = Path(model_dir) / TOKEN_FILE
    for _ in range(2):
        try:
            fd = open_no_follow(path, os.O_RDONLY)
        except FileNotFoundError:
            if not create:
                return None
            _write_token(path)
            continue
        with os.fdopen(fd, "rb") as file:
            token = file.read(2 * TOKEN_BYTES + 1).decode("ascii", "replace").strip()
        if len(token) == 2 * TOKEN_BYTES and all(c in "0123456789abcdef" for c in token):
            return token
        raise UnsafeFolderError(f"{path} does not hold a token of {2 * TOKEN_BYTES} hex digits; remove it (a new "
                                "one is made)")
    raise UnsafeFolderError(f"{path} could not be made")


def _write_token(path: Path) -> None:
    """Atomically, so two processes starting at once agree: the first link wins, the other reads it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = open_no_follow(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(secrets.token_hex(TOKEN_BYTES).encode())
        with contextlib.suppress(FileExistsError):
            os.link(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
