"""Whole-project SAM 3 pre-annotation in the background, written into Label Studio through its API.

:func:`run_project` is the per-project work, the same for both executors: read the project's labeling
config, list its tasks page by page, and for every task without a prediction from the current model version
(``GET /api/predictions?task=``: Label Studio 1.23's prediction list has no pages, and a whole project's
predictions, brush masks included, can weigh hundreds of MB), predict and ``POST /api/predictions {task, result,
score, model_version}``. Restarting is safe by construction: what Label Studio already holds is skipped.
At most :data:`MAX_QUEUED_PROJECTS` projects wait at once and :data:`MAX_REMEMBERED_PROJECTS` finished ones are
remembered for ``/status``; the state file holds only the waiting ones.

Two executors run it:

* :class:`ProjectPreannotationJobs` (no ``REDIS_URL``): one daemon thread of the web process works through a
  queue of projects. The projects still queued or running are kept in a small JSON file
  (``MODEL_DIR/sam3-jobs.json``) and resumed at start-up. Each task's prediction runs in
  ``JobContext.background_slot``: its SAM 3 work goes through the SAM encode gate at background priority one
  piece at a time (the image encode, then each phrase), so annotators' first clicks go first between pieces.
* :mod:`ml_backend.sam3.rq_jobs` (``REDIS_URL`` set): RQ workers (``python -m ml_backend.sam3.worker``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from ml_backend.errors import BackendError
from ml_backend.label_studio_api import api_get, api_request, iter_project_tasks

logger = logging.getLogger(__name__)

PROGRESS_STEPS = 10  # the log gets one line per tenth of a project's tasks (and one at start and at end)
MAX_QUEUED_PROJECTS = 32  # projects waiting or running at once; more is a 429
MAX_REMEMBERED_PROJECTS = 100  # finished projects kept for /status (oldest forgotten first)
MAX_REFUSED_IN_A_ROW = 5  # predictions Label Studio refused one after the other: it is down, the job stops


@dataclass
class ProjectProgress:
    project: int
    state: str = "queued"  # queued, running, done, failed
    model_version: str = ""
    total: int = 0
    written: int = 0
    skipped: int = 0  # already had a prediction from this model version
    failed: int = 0  # tasks whose image or prediction failed (logged); the rest continue
    error: str = ""
    started_at: float | None = None
    finished_at: float | None = None


@dataclass
class JobContext:
    """What a job needs from the process: Label Studio's address and token, the predictor, the version."""

    access: Callable[[], tuple[str, str]]
    predict: Callable[[dict, str, int], dict]  # (task, label_config, project) -> {result, score, model_version}
    model_version: Callable[[int], str]  # (project) -> the version its predictions are stamped with
    background_slot: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext


class JobSuperseded(Exception):
    """The project was started again elsewhere (its previous run was judged dead): this run stops quietly."""


def has_prediction(url: str, token: str, task: int, model_version: str) -> bool:
    """Whether Label Studio holds a prediction from ``model_version`` for ``task`` (one task's list only)."""
    answer = api_get(url, token, "/api/predictions", {"task": task})
    items = answer.get("results", []) if isinstance(answer, dict) else answer
    return any(isinstance(p, dict) and p.get("task") == task and p.get("model_version") == model_version
               for p in items or [])


def queue_full_error() -> BackendError:
    return BackendError(f"{MAX_QUEUED_PROJECTS} projects are already waiting for SAM 3 pre-annotation; ask again "
                        "when one has finished (see /status).", status_code=429)


class ProjectPreannotationJobs:
    """A queue of projects and the one thread that works through it."""

    def __init__(self, context: JobContext, state_file: Path) -> None:
        self.context = context
        self.state_file = state_file
        self._lock = threading.Lock()
        self._queue: list[int] = []
        self._progress: dict[int, ProjectProgress] = {}
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # --- control ---------------------------------------------------------------
    def start(self, project: int) -> dict:
        """Queue ``project`` (again); a project already queued or running is not queued twice."""
        with self._lock:
            current = self._progress.get(project)
            if not (current and current.state in ("queued", "running")):
                if len(self._queue) >= MAX_QUEUED_PROJECTS:
                    raise queue_full_error()
                self._progress.pop(project, None)
                self._forget_finished_locked()
                self._progress[project] = ProjectProgress(project)
                self._queue.append(project)
                self._save_locked()
            answer = asdict(self._progress[project])
        self._ensure_thread()
        self._wake.set()
        return answer

    def resume(self) -> list[int]:
        """Queue again the projects a previous process left queued or running.

        Under gunicorn with several workers every worker starts up; only the one holding the lock file next
        to the state file resumes, so a project is not pre-annotated twice at once.
        """
        if not self._hold_resume_lock():
            return []
        try:
            pending = json.loads(self.state_file.read_text()).get("pending", [])
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            logger.warning("SAM 3 job state %s unreadable (%s); nothing resumed", self.state_file, exc)
            return []
        projects = [p for p in pending if isinstance(p, int) and not isinstance(p, bool)][:MAX_QUEUED_PROJECTS]
        for project in projects:
            logger.info("resuming SAM 3 pre-annotation of project %s", project)
            self.start(project)
        return projects

    def _hold_resume_lock(self) -> bool:
        import fcntl

        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            self._lock_file = open(self.state_file.with_suffix(".lock"), "a")  # held for the process's life
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            return False

    def status(self) -> dict:
        with self._lock:
            return {"executor": "thread", "queue": list(self._queue),
                    "projects": {str(p): asdict(progress) for p, progress in self._progress.items()}}

    def wait_idle(self, timeout_s: float) -> bool:
        """For tests and the benchmark: True once nothing is queued or running."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._queue and all(p.state not in ("queued", "running") for p in self._progress.values()):
                    return True
            time.sleep(0.05)
        return False

    # --- the worker ------------------------------------------------------------
    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._work, name="sam3-preannotate", daemon=True)
                self._thread.start()

    def _forget_finished_locked(self) -> None:
        finished = [p for p, progress in self._progress.items() if progress.state not in ("queued", "running")]
        for project in finished[: max(0, len(finished) - MAX_REMEMBERED_PROJECTS + 1)]:
            del self._progress[project]

    def _save_locked(self) -> None:
        pending = [p for p, progress in self._progress.items() if progress.state in ("queued", "running")]
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"pending": pending}))
            tmp.replace(self.state_file)
        except OSError as exc:
            logger.warning("cannot save SAM 3 job state to %s: %s", self.state_file, exc)

    def _work(self) -> None:
        while True:
            with self._lock:
                project = self._queue.pop(0) if self._queue else None
            if project is None:
                self._wake.wait()
                self._wake.clear()
                continue
            run_project(self._progress[project], self.context)
            with self._lock:
                self._save_locked()


Report = Callable[[ProjectProgress], None]


def run_project(progress: ProjectProgress, context: JobContext, report: Report = lambda progress: None) -> None:
    """Pre-annotate one project, recording the outcome in ``progress`` (``done`` or ``failed`` with the error).

    ``report`` is called whenever ``progress`` changes (the RQ executor writes it to Redis; it may raise
    :class:`JobSuperseded`, which is re-raised). Anything else one project throws is recorded, not raised,
    so the caller (a thread or an RQ worker) survives it.
    """
    project = progress.project
    progress.state, progress.started_at = "running", time.time()
    try:
        report(progress)
        _write_predictions(progress, context, report)
        progress.state = "done"
        logger.info("SAM 3 pre-annotation of project %s done in %.1f s: %d written, %d skipped, %d failed of %d",
                    project, time.time() - progress.started_at, progress.written, progress.skipped,
                    progress.failed, progress.total)
    except JobSuperseded:
        raise
    except BackendError as exc:
        progress.state, progress.error = "failed", exc.message
        logger.warning("SAM 3 pre-annotation of project %s failed: %s", project, exc.message)
    except Exception as exc:  # the executor must survive anything one project throws
        progress.state, progress.error = "failed", f"{exc.__class__.__name__}: {exc}"
        logger.exception("SAM 3 pre-annotation of project %s failed", project)
    progress.finished_at = time.time()


def _write_predictions(progress: ProjectProgress, context: JobContext, report: Report) -> None:
    url, token = context.access()
    project = progress.project
    label_config = (api_get(url, token, f"/api/projects/{project}") or {}).get("label_config")
    version = progress.model_version = context.model_version(project)
    report(progress)
    logger.info("SAM 3 pre-annotation of project %s started: model version %s", project, version)

    def total(count: int) -> None:
        progress.total = count

    logged_step = 0
    refused_in_a_row = 0
    for processed, task in enumerate(iter_project_tasks(url, token, project, on_total=total)):
        progress.total = max(progress.total, progress.written + progress.skipped + progress.failed + 1)
        if (step := processed * PROGRESS_STEPS // progress.total) > logged_step:
            logged_step = step
            logger.info("SAM 3 pre-annotation of project %s: %d of %d tasks (%d written, %d skipped, %d failed)",
                        project, processed, progress.total, progress.written, progress.skipped, progress.failed)
        if isinstance(task.get("id"), int) and has_prediction(url, token, task["id"], version):
            progress.skipped += 1
            continue
        try:
            with context.background_slot():
                prediction = context.predict(task, label_config, project)
        except BackendError as exc:
            progress.failed += 1
            logger.warning("project %s task %s: no SAM 3 prediction: %s", project, task.get("id"), exc.message)
            report(progress)
            continue
        try:
            api_request(url, token, "POST", "/api/predictions", json={
                "task": task["id"], "result": prediction["result"], "score": prediction["score"],
                "model_version": prediction["model_version"]})
        except BackendError as exc:  # that task's failure, not the project's: a later run writes it
            progress.failed += 1
            refused_in_a_row += 1
            logger.warning("project %s task %s: Label Studio did not store its SAM 3 prediction: %s", project,
                           task.get("id"), exc.message)
            report(progress)
            if refused_in_a_row >= MAX_REFUSED_IN_A_ROW:
                raise BackendError(f"Label Studio refused {refused_in_a_row} predictions in a row (the last: "
                                   f"{exc.message}); stopped, start the project again to write the rest") from exc
            continue
        refused_in_a_row = 0
        progress.written += 1
        report(progress)
