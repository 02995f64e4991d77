"""Files used as a byte-bounded LRU on disk, shared by threads and processes without a lock.

A file is written to a temporary name and renamed into place (readers never see half a file)
and stamped with its time of last use; eviction deletes the least recently used until the
folder fits its budget. Every race (two writers, a reader meeting an eviction, two evictors)
ends in a complete file or a miss. Used by the image download cache and the embedding store.
"""

from __future__ import annotations

import fcntl
import logging
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

TEMP_PREFIX = ".tmp-"
STALE_TEMP_S = 3600  # a temporary file this old was left by a crashed writer


def write_atomically(path: Path, payload: bytes, *, fsync: bool = False) -> None:
    """Write ``payload`` to ``path`` through a temporary file in the same folder, then mark it used."""
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=TEMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(payload)
            if fsync:
                out.flush()
                os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        unlink_quietly(Path(temp))
        raise
    touch(path)


def touch(path: Path) -> None:
    """Mark ``path`` as just used (explicit nanosecond stamps: two quick writes can otherwise share an mtime)."""
    now = time.time_ns()
    try:
        os.utime(path, ns=(now, now))
    except OSError:
        pass


def unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def list_files(folders: Iterable[Path], suffix: str) -> list[tuple[int, int, Path]]:
    """(last use in ns, size, path) of the ``suffix`` files in ``folders``; stale temporary files are deleted."""
    entries: list[tuple[int, int, Path]] = []
    now = time.time()
    for folder in folders:
        try:
            with os.scandir(folder) as it:
                for entry in it:
                    try:
                        stat = entry.stat()
                    except OSError:
                        continue
                    if entry.name.startswith(TEMP_PREFIX):
                        if now - stat.st_mtime > STALE_TEMP_S:
                            unlink_quietly(Path(entry.path))
                    elif entry.name.endswith(suffix):
                        entries.append((stat.st_mtime_ns, stat.st_size, Path(entry.path)))
        except OSError as exc:
            logger.warning("cannot list %s (%s)", folder, exc)
    return entries


def evict(entries: list[tuple[int, int, Path]], max_bytes: int) -> None:
    """Delete the least recently used of ``entries`` (from :func:`list_files`) until they fit ``max_bytes``."""
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries):
        if total <= max_bytes:
            break
        unlink_quietly(path)
        total -= size


def flock_exclusive(fd: int, *, timeout_s: float | None = None, blocking: bool = True, poll_s: float = 0.05) -> bool:
    """Take an exclusive ``flock`` on ``fd``: True once held, False when ``timeout_s`` passed (or at once
    when not ``blocking``). Blocking with no timeout waits in the kernel; with one it polls every ``poll_s``."""
    if blocking and timeout_s is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return True
    deadline = time.monotonic() + (timeout_s or 0.0)
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if not blocking or time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)
