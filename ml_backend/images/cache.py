"""A bounded on-disk cache of downloaded image bytes, shared by threads and processes.

Files are named by the SHA-256 of their URL, written to a temporary file and renamed
into place (readers never see half a file), and stamped with the time of last use;
after each write the least recently used files are deleted until the directory fits
its budget. No lock is needed: every race (two writers, a reader meeting an eviction,
two evictors) ends in a complete file or a cache miss.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

SUFFIX = ".img"
TEMP_PREFIX = ".tmp-"
STALE_TEMP_S = 3600  # a temp file this old was left by a crashed writer


class DownloadCache:
    """``get``/``put`` bytes by URL in ``directory``, at most ``max_bytes`` in total (0 disables)."""

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.enabled = max_bytes > 0
        if self.enabled:
            try:
                self.directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                log.warning("image cache disabled: cannot create %s (%s)", self.directory, exc)
                self.enabled = False

    def path_for(self, key: str) -> Path:
        return self.directory / (hashlib.sha256(key.encode()).hexdigest() + SUFFIX)

    def get(self, key: str) -> bytes | None:
        if not self.enabled:
            return None
        path = self.path_for(key)
        try:
            data = path.read_bytes()
        except OSError:  # absent, or evicted by another process meanwhile
            return None
        try:
            _touch(path)
        except OSError:
            pass
        return data

    def put(self, key: str, data: bytes) -> None:
        if not self.enabled or len(data) > self.max_bytes:
            return
        path = self.path_for(key)
        try:
            fd, temp = tempfile.mkstemp(dir=self.directory, prefix=TEMP_PREFIX)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                os.replace(temp, path)
            except BaseException:
                _unlink(Path(temp))
                raise
            _touch(path)
        except OSError as exc:
            log.warning("image cache: cannot write %s (%s)", path, exc)
            return
        self.evict()

    def evict(self) -> None:
        """Delete least recently used files until the total fits ``max_bytes``."""
        entries: list[tuple[int, int, Path]] = []
        now = time.time()
        try:
            with os.scandir(self.directory) as it:
                for entry in it:
                    try:
                        stat = entry.stat()
                    except OSError:
                        continue
                    if entry.name.startswith(TEMP_PREFIX):
                        if now - stat.st_mtime > STALE_TEMP_S:
                            _unlink(Path(entry.path))
                    elif entry.name.endswith(SUFFIX):
                        entries.append((stat.st_mtime_ns, stat.st_size, Path(entry.path)))
        except OSError as exc:
            log.warning("image cache: cannot list %s (%s)", self.directory, exc)
            return
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            _unlink(path)
            total -= size


def _touch(path: Path) -> None:
    # Explicit nanosecond stamps: filesystem clocks can give two quick writes the same mtime.
    now = time.time_ns()
    os.utime(path, ns=(now, now))


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass
