"""Per-project retraining state, shared by every thread and process that handles a project.

Two stores with one contract, :meth:`update` being an atomic read-modify-write:

* :class:`FileStateStore` (no Redis): a small JSON file in ``MODEL_DIR`` guarded by ``flock``,
  so gunicorn's threads and worker processes agree; written with fsync, and an unreadable file
  is kept aside (``retraining.json.corrupt-<time>``) with a warning instead of being overwritten;
* :class:`RedisStateStore` (``REDIS_URL`` set): one JSON value per project, updated in a
  ``WATCH``/``MULTI`` transaction, shared with the RQ workers on other machines.

``update``'s function may run more than once (Redis retries on a concurrent write): it must only
change the state it is given and return a value, never act on the outside world. Projects are
canonical integer ids (``"01"`` and ``1`` are one project).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ml_backend.errors import BackendError

logger = logging.getLogger(__name__)

T = TypeVar("T")
STATE_FILE = "retraining.json"
REDIS_PREFIX = "sam-trimap:retrain:"
KNOWN_TASKS_MAX = 1000  # annotated task ids remembered per project: only "at least two" matters
APPLIED_MAX = 500  # ids of recently applied webhook changes, so a replayed change is not counted twice
MAX_PROJECTS = 200  # projects kept in retraining.json: beyond, the idle ones finished longest ago are forgotten


class StateStoreError(BackendError):
    """The shared state cannot be read or written (Redis unreachable, MODEL_DIR not writable)."""

    status_code = 503


@contextlib.contextmanager
def _reraise(what: str, *errors: type[BaseException]) -> Iterator[None]:
    try:
        yield
    except errors as exc:
        raise StateStoreError(f"retraining state unavailable ({what}): {exc}") from exc


@dataclass
class ProjectState:
    """What the backend and the workers know about one project's training."""

    changes: int = 0  # accepted annotation changes since the last training started
    running: bool = False
    pending: bool = False  # a trigger arrived while running: one follow-up run
    job_id: str | None = None
    job_owner: str | None = None  # "host:pid:start:boot-id" of an in-process worker; None for RQ
    started_at: float | None = None
    reason: str | None = None  # why the running job was started
    last_finished_at: float | None = None
    last: dict[str, Any] | None = None  # outcome of the last finished job
    last_success: dict[str, Any] | None = None
    trainings: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # last few outcomes, newest last
    started_changes: int = 0  # changes the running job consumed (given back if it fails)
    failures: int = 0  # consecutive failed jobs (exponential back-off)
    retry: bool = False  # the last job failed: retry when the back-off allows
    # Tasks known to hold an accepted brush mask: the last export's, and those webhooks reported since.
    tasks: list[int] = field(default_factory=list)
    run_tasks: list[int] = field(default_factory=list)  # reported while the running job exports
    usable: int | None = None  # usable pairs the last export gave (None: never exported)
    applied: list[str] = field(default_factory=list)  # ids of the latest applied webhook changes

    def add_tasks(self, added: list[int], removed: list[int]) -> None:
        self.tasks = sorted((set(self.tasks) | set(added)) - set(removed))[:KNOWN_TASKS_MAX]
        if self.running:
            self.run_tasks = sorted((set(self.run_tasks) | set(added)) - set(removed))[:KNOWN_TASKS_MAX]

    def exported(self, tasks: list[int]) -> None:
        """What an export found replaces what webhooks said before it started."""
        self.tasks = sorted(set(tasks) | set(self.run_tasks))[:KNOWN_TASKS_MAX]
        self.run_tasks = []

    def mark_applied(self, change_id: str) -> None:
        self.applied = (self.applied + [change_id])[-APPLIED_MAX:]

    @classmethod
    def from_dict(cls, data: object) -> "ProjectState":
        if not isinstance(data, dict):
            return cls()
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class StateStore(Protocol):
    def get(self, project: int) -> ProjectState: ...

    def projects(self) -> list[int]: ...

    def update(self, project: int, change: Callable[[ProjectState], T]) -> T: ...


def _project_ids(keys: list[str]) -> list[int]:
    return sorted(int(k) for k in keys if k.isascii() and k.isdigit())


class FileStateStore:
    """All projects in one JSON file (``MODEL_DIR/retraining.json``), locked across processes."""

    def __init__(self, model_dir: str | Path) -> None:
        self.path = Path(model_dir) / STATE_FILE
        self._thread_lock = threading.Lock()  # flock is per open file; this serialises our own threads

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._thread_lock, open(self.path.with_name(f".{STATE_FILE}.lock"), "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _read(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except ValueError as exc:  # UnicodeDecodeError included
            data = exc
        if not isinstance(data, dict):
            # Losing counters is harmless (the next trigger or START_TRAINING trains); refusing webhooks is not.
            # The file is kept for whoever wants to know what happened.
            aside = self.path.with_name(f"{STATE_FILE}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}")
            os.replace(self.path, aside)
            logger.warning("%s is unreadable (%s); kept it as %s and started the retraining state afresh",
                           self.path, data if isinstance(data, Exception) else "not a JSON object", aside.name)
            return {}
        return data

    def _write(self, data: dict[str, Any]) -> None:
        tmp = self.path.with_name(f".{STATE_FILE}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def get(self, project: int) -> ProjectState:
        if not self.path.exists():  # reading creates nothing (no MODEL_DIR until the first webhook)
            return ProjectState()
        with _reraise(str(self.path), OSError), self._locked():
            return ProjectState.from_dict(self._read().get(str(project)))

    def projects(self) -> list[int]:
        if not self.path.exists():
            return []
        with _reraise(str(self.path), OSError), self._locked():
            return _project_ids(list(self._read()))

    def update(self, project: int, change: Callable[[ProjectState], T]) -> T:
        with _reraise(str(self.path), OSError), self._locked():
            data = self._read()
            state = ProjectState.from_dict(data.get(str(project)))
            result = change(state)
            if state == ProjectState():
                data.pop(str(project), None)  # nothing worth keeping: an id that only ever got ignored events
            else:
                data[str(project)] = state.to_dict()
            _forget_idle(data, keep=str(project))
            self._write(data)
            return result


def _forget_idle(data: dict[str, Any], keep: str) -> None:
    """At most :data:`MAX_PROJECTS` projects: drop idle ones (nothing running or pending), least recent first,
    so a file fed every project id anyone sends stays small."""
    if len(data) <= MAX_PROJECTS:
        return
    idle = [(ProjectState.from_dict(value), key) for key, value in data.items() if key != keep]
    idle = [(state.last_finished_at or state.started_at or 0.0, key) for state, key in idle
            if not (state.running or state.pending)]
    for _, key in sorted(idle)[: len(data) - MAX_PROJECTS]:
        del data[key]


class RedisStateStore:
    """One JSON value per project under ``sam-trimap:retrain:<project>``."""

    def __init__(self, connection, prefix: str = REDIS_PREFIX) -> None:
        from redis import RedisError

        self.redis = connection
        self.prefix = prefix
        self._errors = (RedisError, OSError)

    def _key(self, project: int) -> str:
        return f"{self.prefix}{project}"

    def _load(self, raw: bytes | None) -> ProjectState:
        try:
            return ProjectState.from_dict(json.loads(raw) if raw else None)
        except ValueError:
            logger.error("unreadable retraining state in Redis; starting afresh")
            return ProjectState()

    def get(self, project: int) -> ProjectState:
        with _reraise("Redis", *self._errors):
            return self._load(self.redis.get(self._key(project)))

    def projects(self) -> list[int]:
        with _reraise("Redis", *self._errors):
            return _project_ids([key.decode()[len(self.prefix):] for key in self.redis.scan_iter(match=f"{self.prefix}*")])

    def update(self, project: int, change: Callable[[ProjectState], T]) -> T:
        key = self._key(project)
        outcome: list[T] = []

        def transaction(pipe) -> None:
            state = self._load(pipe.get(key))
            outcome[:] = [change(state)]
            pipe.multi()
            pipe.set(key, json.dumps(state.to_dict()))

        with _reraise("Redis", *self._errors):
            self.redis.transaction(transaction, key)
        return outcome[0]
