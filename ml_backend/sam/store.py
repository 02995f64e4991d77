"""Image embeddings on disk, shared by every worker process and every replica mounting the directory.

Layout under ``EMBEDDING_STORE_DIR``::

    <model id>/emb/<pixel key>.safetensors   features + original size (safetensors: no pickle, mmap-able)
    <model id>/urls/<sha256 of URL>.json     URL -> pixel key and the validator it was seen with
    <model id>/locks/<pixel key>.lock        flock held while one process encodes that image

The model id is derived from the encoder's weights, config, input size and dtype
(:mod:`ml_backend.sam.identity`), so a different SAM never reads another's
embeddings. Files are written to a temporary file, fsynced and renamed into place, so a
reader sees a whole file or none; a file that does not parse is deleted and treated as
missing (the caller re-encodes). Reading stamps the file's mtime; after each write the
least recently used embeddings are deleted until the whole directory fits ``max_bytes``,
their lock files with them (unless held), and the URL records pointing at deleted
embeddings once they outnumber the embeddings (:data:`URL_FILES_PER_EMBEDDING`), so
neither directory grows with every image ever seen.

Two processes never encode the same image twice: the encoder holds an exclusive
``flock`` on the key's lock file while it encodes, and re-reads the store after taking
it. ``flock`` works between processes of one host and on volumes whose filesystem
supports it (local disks, NFSv4, CephFS); on others, two replicas may occasionally
encode the same image once each, which costs time, never correctness.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ml_backend import lru_files

logger = logging.getLogger(__name__)

SUFFIX = ".safetensors"
STORE_DTYPES = ("float32", "float16")
LOCK_POLL_S = 0.05
URL_FILES_PER_EMBEDDING = 2  # URL records beyond this many per embedding (plus 64) trigger a sweep


@dataclass(frozen=True)
class StoredEmbedding:
    features: np.ndarray  # (1, h, w, C) as stored (float32 or float16)
    original_size: tuple[int, int]  # (height, width)


@dataclass(frozen=True)
class StoreUsage:
    files: int
    bytes: int
    max_bytes: int


class EmbeddingStore:
    """Embeddings of one model in ``root/<model_id>``, the whole ``root`` bounded by ``max_bytes``."""

    def __init__(self, root: Path, model_id: str, *, max_bytes: int, dtype: str = "float32") -> None:
        if dtype not in STORE_DTYPES:
            raise ValueError(f"EMBEDDING_STORE_DTYPE must be one of {', '.join(STORE_DTYPES)}, not {dtype!r}")
        self.root = Path(root)
        self.model_id = model_id
        self.max_bytes = max_bytes
        self.dtype = np.dtype(dtype)
        self.directory = self.root / model_id
        for sub in ("emb", "urls", "locks"):
            (self.directory / sub).mkdir(parents=True, exist_ok=True)

    # --- embeddings ------------------------------------------------------------
    def path_for(self, key: str) -> Path:
        _check_key(key)
        return self.directory / "emb" / (key + SUFFIX)

    def contains(self, key: str) -> bool:
        return self.path_for(key).is_file()

    def get(self, key: str) -> StoredEmbedding | None:
        """The stored embedding (now most recently used), or None when absent or unreadable."""
        from safetensors import SafetensorError
        from safetensors.numpy import load

        path = self.path_for(key)
        try:
            data = path.read_bytes()
        except OSError:  # absent, or evicted meanwhile
            return None
        try:
            tensors = load(data)
            features, size = tensors["features"], tensors["original_size"]
            if features.ndim != 4 or features.shape[0] != 1 or size.shape != (2,) or int(size.min()) < 1:
                raise ValueError(f"unexpected shapes {features.shape} / {size.shape}")
        except (SafetensorError, KeyError, ValueError, OSError) as exc:
            logger.warning("embedding store: %s is unreadable (%s); deleting it, the image will be encoded again",
                           path.name, exc)
            lru_files.unlink_quietly(path)
            return None
        lru_files.touch(path)
        return StoredEmbedding(features=features, original_size=(int(size[0]), int(size[1])))

    def put(self, key: str, features: np.ndarray, original_size: tuple[int, int]) -> None:
        """Write atomically (temp file, fsync, rename), then evict down to the budget. Never raises OSError."""
        from safetensors.numpy import save

        payload = save({
            "features": np.ascontiguousarray(features, dtype=self.dtype),
            "original_size": np.asarray(original_size, np.int64),
        }, metadata={"key": key, "model": self.model_id})
        if len(payload) > self.max_bytes:
            logger.warning("embedding of %d bytes exceeds EMBEDDING_STORE_MB; not stored", len(payload))
            return
        try:
            lru_files.write_atomically(self.path_for(key), payload, fsync=True)
        except OSError as exc:
            logger.warning("embedding store: cannot write %s (%s)", key[:12], exc)
            return
        self.evict()

    @contextlib.contextmanager
    def lock(self, key: str, *, blocking: bool = True, timeout_s: float | None = None) -> Iterator[bool]:
        """Hold the key's encode lock; yields False when it could not be taken (non-blocking or timed out)."""
        _check_key(key)
        path = self.directory / "locks" / (key + ".lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            acquired = lru_files.flock_exclusive(fd, blocking=blocking, timeout_s=timeout_s, poll_s=LOCK_POLL_S)
            try:
                yield acquired
            finally:
                if acquired:
                    fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    # --- URL index ---------------------------------------------------------------
    def _url_path(self, url: str) -> Path:
        return self.directory / "urls" / (hashlib.sha256(url.encode()).hexdigest() + ".json")

    def get_url(self, url: str) -> tuple[str, str, float] | None:
        """(pixel key, validator, time recorded) last seen for ``url``, or None."""
        try:
            entry = json.loads(self._url_path(url).read_text())
            key, validator, seen = entry["key"], entry["validator"], float(entry["seen"])
            _check_key(key)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return key, str(validator), seen

    def put_url(self, url: str, key: str, validator: str, seen: float) -> None:
        _check_key(key)
        payload = json.dumps({"key": key, "validator": validator, "seen": seen}).encode()
        try:
            lru_files.write_atomically(self._url_path(url), payload, fsync=True)
        except OSError as exc:
            logger.warning("embedding store: cannot record a URL (%s)", exc)

    # --- size ------------------------------------------------------------------
    def _embedding_files(self) -> list[tuple[int, int, Path]]:
        return lru_files.list_files(self.root.glob("*/emb"), SUFFIX)

    def evict(self) -> None:
        """Delete the least recently used embeddings (of any model) until the store fits ``max_bytes``, then
        the lock files and URL records they leave behind."""
        entries = self._embedding_files()
        lru_files.evict(entries, self.max_bytes)
        gone = [path for _, _, path in entries if not path.exists()]
        for path in gone:
            self._drop_lock(path.parent.parent / "locks" / (path.name[: -len(SUFFIX)] + ".lock"))
        if gone:
            self._sweep_urls(len(entries) - len(gone))

    @staticmethod
    def _drop_lock(path: Path) -> None:
        """Delete a lock file unless a process holds it (then the next eviction does)."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            return
        try:
            if lru_files.flock_exclusive(fd, blocking=False):
                lru_files.unlink_quietly(path)
        finally:
            os.close(fd)

    def _sweep_urls(self, embeddings: int) -> None:
        """Delete URL records whose embedding is gone, once there are more of them than embeddings warrant."""
        for directory in self.root.glob("*/urls"):
            names = [entry.path for entry in os.scandir(directory) if entry.name.endswith(".json")]
            if len(names) <= URL_FILES_PER_EMBEDDING * embeddings + 64:
                continue
            emb = directory.parent / "emb"
            for name in names:
                try:
                    key = json.loads(Path(name).read_text())["key"]
                    _check_key(key)
                    keep = (emb / (key + SUFFIX)).exists()
                except (OSError, ValueError, KeyError, TypeError):
                    keep = False
                if not keep:
                    lru_files.unlink_quietly(Path(name))

    def usage(self) -> StoreUsage:
        entries = self._embedding_files()
        return StoreUsage(files=len(entries), bytes=sum(size for _, size, _ in entries), max_bytes=self.max_bytes)


def _check_key(key: str) -> None:
    # Keys are hex digests we computed; refuse anything that could name another path.
    if not key or len(key) > 128 or not all(c in "0123456789abcdef" for c in key):
        raise ValueError(f"not an embedding key: {key[:20]!r}")
