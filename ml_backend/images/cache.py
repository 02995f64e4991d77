"""A bounded on-disk cache of downloaded image bytes, shared by threads and processes.

Files are named by the SHA-256 of their URL and kept as a byte-bounded LRU
(:mod:`ml_backend.lru_files`: atomic writes, no lock needed). A file starts with a short header:
when the bytes were last known current and the validators the server gave (``ETag``,
``Last-Modified``), so that after ``URL_KEY_TTL_S`` the loader asks the server whether the image
changed (a conditional GET) instead of serving a picture replaced at the same URL for ever.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from ml_backend import lru_files

log = logging.getLogger(__name__)

SUFFIX = ".img"
MAGIC = b"sam-download-1\n"  # files without it (older versions) are treated as stale, with no validators
MAX_HEADER_BYTES = 4096
MAX_VALIDATOR_CHARS = 512


@dataclass(frozen=True)
class CachedDownload:
    """Bytes of one URL, when they were last known current (``time.time()``) and the server's validators."""

    data: bytes
    checked_at: float = 0.0
    etag: str = ""
    last_modified: str = ""

    def age_s(self) -> float:
        return time.time() - self.checked_at

    def conditional_headers(self) -> dict[str, str]:
        """What asks the server for the bytes only if they changed (empty: it gave no validator)."""
        headers = {}
        if self.etag:
            headers["If-None-Match"] = self.etag
        if self.last_modified:
            headers["If-Modified-Since"] = self.last_modified
        return headers


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

    def get(self, key: str) -> CachedDownload | None:
        if not self.enabled:
            return None
        path = self.path_for(key)
        try:
            payload = path.read_bytes()
        except OSError:  # absent, or evicted by another process meanwhile
            return None
        lru_files.touch(path)
        return _parse(payload)

    def put(self, key: str, data: bytes, *, etag: str = "", last_modified: str = "") -> None:
        """Keep ``data`` as current now, with the validators the server sent along (if any)."""
        if not self.enabled or len(data) > self.max_bytes:
            return
        path = self.path_for(key)
        meta = {"checked_at": time.time(), "etag": etag[:MAX_VALIDATOR_CHARS],
                "last_modified": last_modified[:MAX_VALIDATOR_CHARS]}
        try:
            lru_files.write_atomically(path, MAGIC + json.dumps(meta).encode() + b"\n" + data)
        except OSError as exc:
            log.warning("image cache: cannot write %s (%s)", path, exc)
            return
        self.evict()

    def confirm(self, key: str, cached: CachedDownload) -> None:
        """The server said ``cached`` is still current (HTTP 304): known current from now on."""
        self.put(key, cached.data, etag=cached.etag, last_modified=cached.last_modified)

    def evict(self) -> None:
        """Delete least recently used files until the total fits ``max_bytes``."""
        lru_files.evict(lru_files.list_files([self.directory], SUFFIX), self.max_bytes)


def _parse(payload: bytes) -> CachedDownload:
    if not payload.startswith(MAGIC):
        return CachedDownload(payload)  # an older cache file: stale, so it is downloaded again
    end = payload.find(b"\n", len(MAGIC), len(MAGIC) + MAX_HEADER_BYTES)
    try:
        meta = json.loads(payload[len(MAGIC):end]) if end >= 0 else None
        checked_at, etag, modified = float(meta["checked_at"]), str(meta["etag"]), str(meta["last_modified"])
    except (ValueError, TypeError, KeyError):
        return CachedDownload(b"")  # unreadable header: stale, with nothing to serve on a 304
    return CachedDownload(payload[end + 1:], checked_at, etag, modified)
