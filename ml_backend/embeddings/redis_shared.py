"""What the replicas of a backend share about embeddings through Redis (``REDIS_URL``), beside the embedding
directory they mount: who is encoding which image, and which URL holds which image.

* :class:`RedisEncodeLocks`: the image's encode lock, one per pixel key, taken by the process that encodes it
  (the engine's :meth:`~ml_backend.sam.engine.SamEngine.encode_locks` seam; without Redis, the store's ``flock``,
  which needs one host or a filesystem that honours it). A redis-py ``Lock`` (a random token, released only by its
  holder) that expires ``EXPIRY_S`` after its last renewal: the holder renews it while it encodes, so a long encode
  keeps it and a replica that dies while encoding frees it within seconds; then a waiter takes it, finds no
  embedding in the store and encodes. A waiter waits at most ``max_wait_s``, then encodes as well (logged): slow
  rather than stuck.
* :class:`RedisUrlRecords`: the URL index's records (URL -> pixel key and the validator it was seen with), so a
  URL one replica read is known to the others without downloading it; keyed by the URL's SHA-256 (bounded
  whatever the URL), expiring with the index's trust in them (``URL_KEY_TTL_S`` for http(s) images, a week for
  local files and ``data:`` URIs, which carry their own validator).

Redis unreachable: a lock is not taken (the caller encodes, logged) and a record is not found or not written;
nothing fails a click.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import threading
from collections.abc import Iterator
from typing import Any

from ml_backend.embeddings.urls import REMOTE
from ml_backend.errors import redis_errors

logger = logging.getLogger(__name__)

PREFIX = "sam-trimap:embeddings:"
EXPIRY_S = 15.0  # an encode lock outlives its holder by at most this long
POLL_S = 0.05  # a waiter asks this often whether the lock is free
RECORD_TTL_S = 7 * 24 * 3600  # URL records with a validator of their own (local files, data: URIs)
_KEY = re.compile(r"[0-9a-f]{1,128}")


class RedisEncodeLocks:
    """Encode locks in Redis, with :meth:`lock` as :meth:`~ml_backend.sam.store.EmbeddingStore.lock` has it."""

    def __init__(self, client: Any, *, max_wait_s: float, expiry_s: float = EXPIRY_S, prefix: str = PREFIX) -> None:
        self.client = client
        self.max_wait_s = max_wait_s
        self.expiry_s = expiry_s
        self.prefix = prefix

    def name(self, key: str) -> str:
        return f"{self.prefix}encoding:{key}"

    @contextlib.contextmanager
    def lock(self, key: str, *, blocking: bool = True, timeout_s: float | None = None) -> Iterator[bool]:
        """Hold ``key``'s encode lock, renewed while held; yields False when it could not be taken (held by
        another for ``timeout_s``, by default ``max_wait_s``; at once when not ``blocking``; Redis unreachable)."""
        from redis.exceptions import LockError

        lock = self.client.lock(self.name(key), timeout=self.expiry_s, sleep=POLL_S, blocking=blocking,
                                blocking_timeout=self.max_wait_s if timeout_s is None else timeout_s,
                                thread_local=False)
        try:
            acquired = bool(lock.acquire())
        except redis_errors() as exc:
            logger.warning("encode lock: Redis unreachable (%s); going on without it", exc)
            acquired = False
        if not acquired:
            yield False
            return
        done = threading.Event()
        keeper = threading.Thread(target=self._renew, args=(lock, done), name="encode-lock-renewal", daemon=True)
        keeper.start()
        try:
            yield True
        finally:
            done.set()
            keeper.join()
            try:
                lock.release()
            except LockError:
                logger.warning("encode lock of %s expired while held", key[:12])
            except redis_errors() as exc:
                logger.warning("encode lock: cannot release it in Redis (%s); it expires by itself", exc)

    def _renew(self, lock: Any, done: threading.Event) -> None:
        from redis.exceptions import LockError

        while not done.wait(self.expiry_s / 3):
            try:
                lock.reacquire()
            except (LockError, *redis_errors()) as exc:
                logger.warning("encode lock: cannot renew it (%s)", exc)
                return


class RedisUrlRecords:
    """The URL index's records in Redis, with the store's ``get_url`` / ``put_url``."""

    def __init__(self, client: Any, *, remote_ttl_s: float, prefix: str = PREFIX) -> None:
        self.client = client
        self.remote_ttl_s = remote_ttl_s
        self.prefix = prefix

    def name(self, url: str) -> str:
        return f"{self.prefix}url:{hashlib.sha256(url.encode()).hexdigest()}"

    def get_url(self, url: str) -> tuple[str, str, float] | None:
        """(pixel key, validator, time recorded) last recorded for ``url`` by any replica, or None."""
        try:
            payload = self.client.get(self.name(url))
        except redis_errors() as exc:
            logger.warning("URL index: Redis unreachable (%s)", exc)
            return None
        if payload is None:
            return None
        try:
            entry = json.loads(payload)
            key, validator, seen = entry["key"], entry["validator"], float(entry["seen"])
            if not isinstance(key, str) or not _KEY.fullmatch(key) or not isinstance(validator, str):
                raise ValueError("a malformed record")
        except (ValueError, KeyError, TypeError) as exc:
            logger.warning("URL index: a record in Redis is unreadable (%s); ignored", exc)
            return None
        return key, validator, seen

    def put_url(self, url: str, key: str, validator: str, seen: float) -> None:
        ttl_s = self.remote_ttl_s if validator == REMOTE else RECORD_TTL_S
        payload = json.dumps({"key": key, "validator": validator, "seen": seen})
        try:
            self.client.set(self.name(url), payload, px=max(1, int(ttl_s * 1000)))
        except redis_errors() as exc:
            logger.warning("URL index: cannot record a URL in Redis (%s)", exc)
