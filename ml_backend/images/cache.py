"""A bounded on-disk cache of downloaded image bytes, shared by threads and processes.

Files are named by the SHA-256 of their URL and kept as a byte-bounded LRU
(:mod:`ml_backend.lru_files`: atomic writes, no lock needed).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from ml_backend import lru_files

log = logging.getLogger(__name__)

SUFFIX = ".img"


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
        lru_files.touch(path)
        return data

    def put(self, key: str, data: bytes) -> None:
        if not self.enabled or len(data) > self.max_bytes:
            return
        path = self.path_for(key)
        try:
            lru_files.write_atomically(path, data)
        except OSError as exc:
            log.warning("image cache: cannot write %s (%s)", path, exc)
            return
        self.evict()

    def evict(self) -> None:
        """Delete least recently used files until the total fits ``max_bytes``."""
        lru_files.evict(lru_files.list_files([self.directory], SUFFIX), self.max_bytes)
