"""Prompt state in this process's memory (the default with one worker process)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable

from ml_backend.prompt_state.locking import TaskLocks, hold_or_go_on
from ml_backend.prompt_state.types import ObjectState, TaskKey


class MemoryStorage:
    """Objects in this process's memory; thread-safe."""

    def __init__(self, *, max_bytes: int, max_entries: int, ttl_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.max_bytes, self.max_entries, self.ttl_s = max_bytes, max_entries, ttl_s
        self._clock = clock
        self._lock = threading.Lock()
        self._task_locks = TaskLocks()
        self._objects: OrderedDict[TaskKey, tuple[ObjectState, float]] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._objects)

    @property
    def current_bytes(self) -> int:
        return self._bytes

    def hold(self, key: TaskKey) -> contextlib.AbstractContextManager[None]:
        return hold_or_go_on(key, lambda timeout_s: self._task_locks.take(key, timeout_s))

    def load(self, key: TaskKey) -> ObjectState | None:
        with self._lock:
            self._expire()
            entry = self._objects.get(key)
            if entry is None:
                return None
            self._objects.move_to_end(key)
            return entry[0]

    def save(self, key: TaskKey, state: ObjectState) -> None:
        with self._lock:
            self._drop(key)
            self._objects[key] = (state, self._clock() + self.ttl_s)
            self._bytes += state.nbytes
            while self._objects and (len(self._objects) > self.max_entries or self._bytes > self.max_bytes):
                self._drop(next(iter(self._objects)))

    def delete(self, key: TaskKey) -> None:
        with self._lock:
            self._drop(key)

    def _drop(self, key: TaskKey) -> None:
        entry = self._objects.pop(key, None)
        if entry is not None:
            self._bytes -= entry[0].nbytes

    def _expire(self) -> None:
        now = self._clock()
        for key in [k for k, (_, expires) in self._objects.items() if expires <= now]:
            self._drop(key)
