"""The order in which a process pre-encodes images: opened task first, its look-ahead, then the project.

Per project, tasks are kept in Label Studio's order. When a project connects, all its tasks
are queued, unlabeled ones first; ``TASKS_CREATED`` appends new ones. When an annotator opens
a task (Label Studio's automatic ``/predict`` for it, or the first click), that task and the
next ``lookahead`` tasks of the project jump to the front. One worker thread (or, for RQ,
several that each wait for one queued job) takes jobs in that order and calls ``encode``;
a job that raises is recorded as failed and the next one starts.

What it holds is bounded: a base64 ``data:`` URI is kept without the whitespace it may be padded with,
the URLs held total at most ``max_url_chars`` characters (a task beyond is not queued: its first click
encodes it), at most ``max_entries`` tasks are known across projects (finished projects are forgotten
first, then new tasks are not queued), and a finished task keeps only its state, not its URL.

Interactive clicks never wait for this queue: they encode on their own, and a background
encode starts only when no interactive one runs (:class:`~ml_backend.embeddings.priority.EncodePriority`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from ml_backend.security import limits
from ml_backend.security.urls import describe

logger = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED = "queued", "running", "done", "failed"
MAX_ENTRIES = 50_000  # tasks known across projects (each ~300 bytes with its URL; finished ones ~150)
MAX_URL_CHARS_HELD = 64 << 20  # characters of queued tasks' URLs (data: URIs) held at once
Ident = int | str  # a task id, or the image URL (its hash past 2048 characters) for tasks given without one


@dataclass(frozen=True)
class EncodeJob:
    project: int
    ident: Ident
    task_id: int | None
    url: str
    urgent: bool  # opened or looked ahead: worth holding in memory too


@dataclass(frozen=True)
class TaskImage:
    """One task as the scheduler needs it."""

    task_id: int | None
    url: str
    labeled: bool = False

    @property
    def ident(self) -> Ident:
        return self.task_id if self.task_id is not None else limits.url_key(self.url)


@dataclass
class _Project:
    order: list[Ident] = field(default_factory=list)  # Label Studio's order
    urls: dict[Ident, str] = field(default_factory=dict)
    task_ids: dict[Ident, int | None] = field(default_factory=dict)
    state: dict[Ident, str] = field(default_factory=dict)
    last_error: str = ""
    finished: int = 0  # done + failed, for progress lines
    started_at: float = field(default_factory=time.monotonic)

    def counts(self) -> dict[str, int]:
        counts = {QUEUED: 0, RUNNING: 0, DONE: 0, FAILED: 0}
        for state in self.state.values():
            counts[state] += 1
        return counts


def _compact(task: TaskImage) -> TaskImage:
    """``task`` with its URL as kept (:func:`~ml_backend.security.limits.compact_url`)."""
    url = limits.compact_url(task.url)
    return task if url is task.url else TaskImage(task.task_id, url, task.labeled)


def project_id(value: object) -> int | None:
    """Label Studio's project id from ``3``, ``"3"`` or ``"3.1732800000"`` (what /setup and /predict send),
    by the one rule for project ids (:func:`ml_backend.security.limits.project_id`); 0 is none."""
    key = limits.project_id(value)
    return int(key) if key is not None and key != "0" else None


class PreEncodeScheduler:
    """Queues images of projects and feeds them, most wanted first, to ``encode``.

    ``encode(job)`` returns ``"encoded"`` or ``"ready"`` (already in the store) and raises
    on failure. ``threads`` jobs run at once (1 for local encoding; more when each only
    waits for an RQ worker).
    """

    def __init__(self, encode: Callable[[EncodeJob], str], *, lookahead: int = 3, log_every: int = 10,
                 threads: int = 1, max_entries: int = MAX_ENTRIES, max_url_chars: int = MAX_URL_CHARS_HELD) -> None:
        self._encode = encode
        self.max_entries = max_entries
        self.max_url_chars = max_url_chars
        self._url_chars = 0  # characters of the URLs held now
        self.lookahead = lookahead
        self.log_every = max(1, log_every)
        self._threads = threads
        self._projects: dict[int, _Project] = {}
        self._urgent: deque[tuple[int, Ident]] = deque()
        self._normal: deque[tuple[int, Ident]] = deque()
        self._cond = threading.Condition()
        self._workers: list[threading.Thread] = []
        self._stopped = False

    # --- what to encode ------------------------------------------------------
    def add_project(self, project: int, tasks: Iterable[TaskImage]) -> int:
        """Queue a project's tasks (Label Studio's order), unlabeled ones first; the number newly queued."""
        tasks = [_compact(t) for t in tasks]
        ordered = [t for t in tasks if not t.labeled] + [t for t in tasks if t.labeled]
        with self._cond:
            entry = self._projects.setdefault(project, _Project())
            self._make_room(keep=project, wanted=len(tasks))
            room = self.max_entries - self.held()
            refused = 0
            for task in tasks:
                if task.ident in entry.urls or (entry.state.get(task.ident) is None and room > 0):
                    if self._url_room(entry, task):
                        room -= task.ident not in entry.state
                        self._know(entry, task)
                    else:
                        refused += 1
            added = 0
            for task in ordered:
                if entry.state.get(task.ident) is None and task.ident in entry.urls:
                    entry.state[task.ident] = QUEUED
                    self._normal.append((project, task.ident))
                    added += 1
            self._wake()
        logger.info("pre-encoding project %d: %d image(s) queued", project, added)
        if refused:
            logger.info("pre-encoding project %d: %d task(s) not queued: their image URLs (data: URIs) would hold "
                        "more than %d characters; their first click encodes them", project, refused,
                        self.max_url_chars)
        return added

    def add_tasks(self, project: int, tasks: Iterable[TaskImage]) -> int:
        """New tasks (``TASKS_CREATED``): appended to the project's order and queue."""
        return self.add_project(project, tasks)

    def opened(self, project: int, task: TaskImage) -> None:
        """An annotator opened ``task``: it and the next ``lookahead`` tasks go to the front."""
        task = _compact(task)
        with self._cond:
            entry = self._projects.setdefault(project, _Project())
            if not self._url_room(entry, task):
                return
            self._know(entry, task)
            position = entry.order.index(task.ident)
            wanted = entry.order[position : position + 1 + self.lookahead]
            jump: list[tuple[int, Ident]] = []
            for ident in wanted:
                state = entry.state.get(ident)
                if state is None and ident in entry.urls:
                    entry.state[ident] = state = QUEUED
                    self._normal.append((project, ident))
                if state == QUEUED:
                    jump.append((project, ident))
            rest = [item for item in self._urgent if item not in jump]
            self._urgent = deque(jump + rest)
            if jump:
                self._wake()

    def held(self) -> int:
        """Tasks known across projects (call with the lock held)."""
        return sum(len(entry.order) for entry in self._projects.values())

    def _make_room(self, keep: int, wanted: int) -> None:
        """Forget whole finished projects, oldest first, until ``wanted`` more tasks fit ``max_entries``
        (call with the lock held)."""
        for project in sorted(self._projects, key=lambda p: self._projects[p].started_at):
            if self.held() + wanted <= self.max_entries:
                return
            counts = self._projects[project].counts()
            if project != keep and counts[QUEUED] + counts[RUNNING] == 0:
                del self._projects[project]

    def is_known(self, project: int) -> bool:
        with self._cond:
            return project in self._projects

    # --- progress ------------------------------------------------------------
    def status(self) -> dict[str, dict]:
        with self._cond:
            return {str(project): {"total": len(entry.state), **entry.counts(),
                                   **({"last_error": entry.last_error} if entry.last_error else {})}
                    for project, entry in self._projects.items()}

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until nothing is queued or running (tests, benchmarks); False on timeout."""
        with self._cond:
            return self._cond.wait_for(
                lambda: all(s in (DONE, FAILED) for e in self._projects.values() for s in e.state.values()),
                timeout=timeout_s)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    # --- the worker ----------------------------------------------------------
    def _url_room(self, entry: _Project, task: TaskImage) -> bool:
        """Whether holding ``task``'s URL keeps the URLs held within ``max_url_chars`` (lock held)."""
        held = len(entry.urls.get(task.ident, ""))
        return self._url_chars - held + len(task.url) <= self.max_url_chars

    def _know(self, entry: _Project, task: TaskImage) -> None:
        if task.ident not in entry.urls and task.ident not in entry.state:
            entry.order.append(task.ident)
        if entry.state.get(task.ident) in (DONE, FAILED):
            return  # finished: its URL is not kept again
        self._url_chars += len(task.url) - len(entry.urls.get(task.ident, ""))
        entry.urls[task.ident] = task.url
        entry.task_ids[task.ident] = task.task_id

    def _wake(self) -> None:
        self._cond.notify_all()
        self._workers = [w for w in self._workers if w.is_alive()]
        while len(self._workers) < self._threads and not self._stopped:
            worker = threading.Thread(target=self._run, name=f"preencode-{len(self._workers)}", daemon=True)
            self._workers.append(worker)
            worker.start()

    def _next(self) -> EncodeJob | None:
        """The most wanted queued job, marked running; None when stopped."""
        with self._cond:
            while not self._stopped:
                for source, urgent in ((self._urgent, True), (self._normal, False)):
                    while source:
                        project, ident = source.popleft()
                        entry = self._projects.get(project)
                        if entry is not None and entry.state.get(ident) == QUEUED:
                            entry.state[ident] = RUNNING
                            return EncodeJob(project, ident, entry.task_ids.get(ident), entry.urls[ident], urgent)
                self._cond.wait()
            return None

    def _run(self) -> None:
        while (job := self._next()) is not None:
            try:
                self._encode(job)
                outcome, error = DONE, ""
            except Exception as exc:  # one bad image must not stop the rest
                message = getattr(exc, "message", None) or f"{exc.__class__.__name__}: {exc}"
                outcome, error = FAILED, str(message)
                logger.warning("pre-encoding project %d, task %s failed: %s", job.project,
                               job.task_id if job.task_id is not None else describe(job.url), error)
            self._finish(job, outcome, error)

    def _finish(self, job: EncodeJob, outcome: str, error: str) -> None:
        with self._cond:
            entry = self._projects[job.project]
            entry.state[job.ident] = outcome
            self._url_chars -= len(entry.urls.pop(job.ident, ""))  # finished: only its state is kept
            entry.task_ids.pop(job.ident, None)
            if error:
                entry.last_error = error
            entry.finished += 1
            counts = entry.counts()
            self._cond.notify_all()
        remaining = counts[QUEUED] + counts[RUNNING]
        if entry.finished % self.log_every == 0 or remaining == 0:
            elapsed = time.monotonic() - entry.started_at
            logger.info("pre-encoding project %d: %d/%d done, %d failed, %d to go (%.1f s per image)",
                        job.project, counts[DONE], len(entry.state), counts[FAILED], remaining,
                        elapsed / max(1, entry.finished))
