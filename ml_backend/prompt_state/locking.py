"""Holding one task's object while a click reads, decodes and writes it: per task, never across tasks.

Both storages hold a task the same way (:func:`hold_or_go_on`): a click waits for another click on *its own*
task at most ``LOCK_TIMEOUT_S``, then goes on unheld with a warning (a stuck click must not stall the task
for ever). Locks are per task key, never shared stripes, so a click never waits for a click on another task;
and the backend holds a task only around the plan, the decode and the write, never while an image is
downloaded or encoded.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterator

from ml_backend.prompt_state.types import TaskKey

logger = logging.getLogger(__name__)

LOCK_TIMEOUT_S = 30.0  # a click waits this long for another click on its task, then goes on unheld

Release = Callable[[], None]


def unheld() -> None:
    """The release of a lock a storage could not take at all (it logged why): the click goes on unheld."""


@contextlib.contextmanager
def hold_or_go_on(key: TaskKey, take: Callable[[float], Release | None]) -> Iterator[None]:
    """Run the block holding ``key``'s lock. ``take(timeout_s)`` returns the function that releases it, or None
    when another click on the task held it for ``timeout_s``: then the block runs unheld, with a warning."""
    timeout_s = LOCK_TIMEOUT_S
    release = take(timeout_s)
    if release is None:
        logger.warning("prompt state of %s: another click held it for %.0f s; going on without it", key, timeout_s)
    try:
        yield
    finally:
        if release is not None:
            release()


class TaskLocks:
    """One ``threading.Lock`` per task key, made when a click first asks for it and dropped when no click
    holds or waits for it (so there are never more than the clicks in flight)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[TaskKey, tuple[threading.Lock, int]] = {}

    def __len__(self) -> int:
        return len(self._locks)

    def take(self, key: TaskKey, timeout_s: float) -> Release | None:
        with self._guard:
            lock, users = self._locks.get(key) or (threading.Lock(), 0)
            self._locks[key] = (lock, users + 1)
        if not lock.acquire(timeout=timeout_s):
            self._leave(key)
            return None

        def release() -> None:
            lock.release()
            self._leave(key)

        return release

    def _leave(self, key: TaskKey) -> None:
        with self._guard:
            lock, users = self._locks[key]
            if users > 1:
                self._locks[key] = (lock, users - 1)
            else:
                del self._locks[key]
