"""Prompt state in Redis, shared by every replica of the backend (``REDIS_URL``), on any host.

The files storage (:mod:`ml_backend.prompt_state.files`) is the model; what differs is only where the bytes live:

* **Keys.** ``sam-trimap:prompt:state:<sha-256 of the task key>``: bounded whatever the image URL (the task key
  already holds a URL over 2048 characters by its digest). The value is the files storage's payload -- a
  safetensors file: JSON metadata and float32 logits, no pickle -- whose metadata repeats the digest, so a value
  planted under another task's name is refused like a foreign file.
* **Held per task.** A click's read-modify-write holds ``...:prompt:hold:<digest>``, a redis-py ``Lock``: a random
  token, set only if absent, released only by the holder whose token it still is (a Lua check-and-delete), and
  expiring after ``LOCK_TIMEOUT_S`` so a replica that dies holding it stalls the task no longer than a stuck click
  does today. A waiter polls only its own task's lock, at most ``LOCK_TIMEOUT_S``, then goes on unheld with a
  warning (:func:`~ml_backend.prompt_state.locking.hold_or_go_on`); a holder whose hold expired meanwhile is
  logged when it releases.
* **Bounded.** Each write sets the value with ``PROMPT_STATE_TTL_S`` as its expiry and, in one Lua script (atomic
  for every replica), records its last click (Redis's own clock: replicas' clocks may differ) in a sorted set
  and its size in a hash, drops the entries whose time has passed, then the least recently clicked until at
  most ``PROMPT_STATE_ENTRIES`` objects of at most ``PROMPT_STATE_MB`` in all remain.
* **Never fatal.** Redis unreachable or slow: a load is no object, a write is lost, a hold goes on unheld, each
  logged; the click is answered. An unreadable value is logged, deleted and treated as no object.

Every replica must use the same Redis (database) and the same limits; one Redis database per backend
deployment (two deployments' task ids would meet).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from ml_backend.errors import redis_errors
from ml_backend.prompt_state.files import decode, encode, key_digest
from ml_backend.prompt_state.locking import Release, hold_or_go_on, unheld
from ml_backend.prompt_state.types import ObjectState, TaskKey

logger = logging.getLogger(__name__)

PREFIX = "sam-trimap:prompt:"
LOCK_POLL_S = 0.01  # a waiting click asks Redis this often whether its task's lock is free
SWEEP_BATCH = 256  # expired entries removed per write at most (the next writes remove the rest)

# KEYS: the state key prefix, the LRU sorted set, the size hash, the total-bytes counter.
# ARGV: digest, payload (empty: delete only), ttl in ms, max entries, max bytes, sweep batch.
_WRITE = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function drop(digest)
  redis.call('DEL', KEYS[1] .. digest)
  local size = redis.call('HGET', KEYS[3], digest)
  if size then redis.call('DECRBY', KEYS[4], size) end
  redis.call('HDEL', KEYS[3], digest)
  redis.call('ZREM', KEYS[2], digest)
end
local digest, payload, ttl = ARGV[1], ARGV[2], tonumber(ARGV[3])
local now = now_ms()
drop(digest)
if payload ~= '' then
  redis.call('SET', KEYS[1] .. digest, payload, 'PX', ttl)
  redis.call('ZADD', KEYS[2], now, digest)
  redis.call('HSET', KEYS[3], digest, #payload)
  redis.call('INCRBY', KEYS[4], #payload)
end
for _, old in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - ttl, 'LIMIT', 0, tonumber(ARGV[6]))) do
  drop(old)
end
while redis.call('ZCARD', KEYS[2]) > tonumber(ARGV[4])
    or tonumber(redis.call('GET', KEYS[4]) or '0') > tonumber(ARGV[5]) do
  local oldest = redis.call('ZRANGE', KEYS[2], 0, 0)[1]
  if not oldest then break end
  drop(oldest)
end
return {redis.call('ZCARD', KEYS[2]), tonumber(redis.call('GET', KEYS[4]) or '0')}
"""


class RedisStorage:
    """Objects in Redis, shared by every process and replica that connects to it (see the module's notes)."""

    def __init__(self, client: Any, *, max_bytes: int, max_entries: int, ttl_s: float, prefix: str = PREFIX) -> None:
        self.client = client
        self.max_bytes, self.max_entries, self.ttl_s = max_bytes, max_entries, ttl_s
        self.prefix = prefix
        self._write = client.register_script(_WRITE)

    def _keys(self) -> list[str]:
        return [f"{self.prefix}state:", f"{self.prefix}lru", f"{self.prefix}sizes", f"{self.prefix}bytes"]

    def _run(self, digest: str, payload: bytes) -> list[int]:
        return self._write(keys=self._keys(), args=[digest, payload, max(1, int(self.ttl_s * 1000)),
                                                    self.max_entries, self.max_bytes, SWEEP_BATCH])

    # --- locking -------------------------------------------------------------
    def hold(self, key: TaskKey) -> contextlib.AbstractContextManager[None]:
        return hold_or_go_on(key, lambda timeout_s: self._take(key, timeout_s))

    def _take(self, key: TaskKey, timeout_s: float) -> Release | None:
        from redis.exceptions import LockError

        expiry_s = max(timeout_s, 1.0)  # a dead holder's hold lasts as long as a live one is waited for
        lock = self.client.lock(f"{self.prefix}hold:{key_digest(key)}", timeout=expiry_s, sleep=LOCK_POLL_S,
                                blocking_timeout=timeout_s, thread_local=False)
        try:
            if not lock.acquire():
                return None
        except redis_errors() as exc:
            logger.warning("prompt state: Redis unreachable (%s); this click goes on unheld", exc)
            return unheld

        def release() -> None:
            try:
                lock.release()
            except LockError:
                logger.warning("prompt state of %s: the hold expired before the click ended (over %.0f s)",
                               key, expiry_s)
            except redis_errors() as exc:
                logger.warning("prompt state: cannot release a hold in Redis (%s); it expires by itself", exc)

        return release

    # --- reading -------------------------------------------------------------
    def load(self, key: TaskKey) -> ObjectState | None:
        digest = key_digest(key)
        try:
            payload = self.client.get(f"{self.prefix}state:{digest}")
        except redis_errors() as exc:
            logger.warning("prompt state: Redis unreachable (%s); starting over", exc)
            return None
        if payload is None:
            return None
        try:
            return decode(payload, key)
        except Exception as exc:  # noqa: BLE001 -- whatever the value holds, a click must not fail on it
            logger.warning("prompt state: the object of %s in Redis is unreadable (%s: %s); deleting it, the object "
                           "starts over", key, type(exc).__name__, exc)
            self.delete(key)
            return None

    # --- writing -------------------------------------------------------------
    def save(self, key: TaskKey, state: ObjectState) -> None:
        try:
            self._run(key_digest(key), encode(key, state))
        except redis_errors() as exc:
            logger.warning("prompt state: cannot write to Redis (%s); the next click on this task starts over", exc)

    def delete(self, key: TaskKey) -> None:
        try:
            self._run(key_digest(key), b"")
        except redis_errors() as exc:
            logger.warning("prompt state: cannot delete from Redis (%s); the object expires by itself", exc)

    def _usage(self) -> list[int]:
        """(objects, bytes) after dropping the expired ones; (0, 0) when Redis cannot be reached."""
        try:
            return self._run("", b"")
        except redis_errors():
            return [0, 0]

    def __len__(self) -> int:
        return int(self._usage()[0])

    @property
    def current_bytes(self) -> int:
        return int(self._usage()[1])
