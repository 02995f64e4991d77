"""Image URL -> pixel key of its embedding, so a click skips downloading, decoding and hashing.

A URL can start pointing at other pixels (a local file replaced in place, an object
overwritten in a bucket), so each entry carries a validator taken *before* the image was
read: a local file's mtime and size (checked on every lookup: one ``stat``); a ``data:``
URI is its own content. For http(s) URLs nothing cheap is known without a request, so
their entries expire after ``ttl_s`` and the image is read again (which also refreshes
the mapping). Entries live in memory and, when there is a store, on disk for the other
processes; with ``shared`` records (Redis, :class:`~ml_backend.embeddings.redis_shared.RedisUrlRecords`) also
there, for the other replicas. A relative URL (``/data/upload/...``) is remembered under the Label Studio
origin it was read from, so two Label Studio servers' same paths never share an entry.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from ml_backend.sam.cache import ByteBoundedLRU
from ml_backend.security.urls import describe

logger = logging.getLogger(__name__)

MEMORY_ENTRIES = 100_000
LONG_URL = 1024  # longer URLs (data: URIs hold whole images) are remembered by their digest
DATA_URI = "data"
REMOTE = ""  # no validator: trust the entry for ttl_s


class UrlRecords(Protocol):
    """Where URL records outlive this process: the embedding store's files, Redis."""

    def get_url(self, url: str) -> tuple[str, str, float] | None: ...

    def put_url(self, url: str, key: str, validator: str, seen: float) -> None: ...


class UrlIndex:
    def __init__(self, local_file: Callable[[str, int | None], Path | None], *, ttl_s: float,
                 origin: Callable[[], str] = lambda: "", shared: UrlRecords | None = None) -> None:
        """``local_file(url, project)``: the file the loader reads for ``url`` for a task of ``project`` (None
        when it downloads), raising for a URL it refuses; so an entry is never found for a URL the task's
        project may not read (another project's local file embedded earlier)."""
        self._local_file = local_file
        self._origin = origin  # Label Studio's URL, which relative task URLs are read from
        self.ttl_s = ttl_s
        self.store: UrlRecords | None = None  # the engine's EmbeddingStore once SAM is loaded
        self.shared = shared  # records every replica reads and writes
        self._memory: ByteBoundedLRU[tuple[str, str, float]] = ByteBoundedLRU(MEMORY_ENTRIES, lambda entry: 1)

    def validator(self, url: str, project: int | None = None) -> str | None:
        """What must not change for the mapping to hold; None when the URL cannot be checked now or the loader
        refuses it for a task of ``project``."""
        if url.startswith("data:"):
            return DATA_URI
        try:
            path = self._local_file(url, project)
        except Exception:  # a URL the loader refuses: let the load report it
            return None
        if path is None:
            return REMOTE
        try:
            stat = path.stat()
        except OSError:
            return None
        return f"file:{stat.st_mtime_ns}:{stat.st_size}"

    def lookup(self, url: str, validator: str | None) -> str | None:
        """The pixel key last seen for ``url`` if it still holds, else None."""
        if validator is None:
            return None
        url = self._scoped(url)
        entry = self._memory.get(_memory_key(url))
        for records in (self.shared, self.store):
            if entry is None and records is not None:
                entry = records.get_url(url)
                if entry is not None:
                    self._memory.put(_memory_key(url), entry)
        if entry is None:
            return None
        key, seen_validator, seen_at = entry
        if seen_validator != validator:
            logger.info("image at %s changed since it was embedded; reading it again", describe(url))
            return None
        if validator == REMOTE and time.time() - seen_at > self.ttl_s:
            return None
        return key

    def remember(self, url: str, key: str, validator: str | None) -> None:
        if validator is None:
            return
        url = self._scoped(url)
        entry = (key, validator, time.time())
        self._memory.put(_memory_key(url), entry)
        for records in (self.store, self.shared):
            if records is not None:
                records.put_url(url, key, validator, entry[2])

    def _scoped(self, url: str) -> str:
        return f"{self._origin()}{url}" if url.startswith("/") else url


def _memory_key(url: str) -> str:
    return url if len(url) <= LONG_URL else "sha256:" + hashlib.sha256(url.encode()).hexdigest()
