"""Training jobs: what one job does, and the two ways to run it.

* :class:`InProcessExecutor` (default, needs nothing installed): a bounded queue in the backend
  process, ``RETRAIN_CONCURRENCY`` fits at a time (one by default), each stopped after
  ``RETRAIN_JOB_TIMEOUT_S``.
* :class:`RQExecutor` (``REDIS_URL`` set): the job goes to an RQ queue on Redis and any number
  of workers (``python -m ml_backend.retrain.worker``, or ``rq worker --url $REDIS_URL
  sam-trimap-training``; GPU machines sharing ``MODEL_DIR``) run
  :func:`ml_backend.retrain.rq_job.run_job`. The job carries Label Studio's URL and token, so
  Redis must be private to the deployment.

A job exports the project's accepted annotations into a held working folder, fine-tunes from the
store's current version (from the base model or from scratch when there is none), lets
``training`` promote by its rule and prunes old versions. It reports its outcome through the
``record`` function it is given; a job killed before it can (worker OOM-killed, backend
restarted) is noticed by the coordinator's reconciliation through :meth:`Executor.lost`, and
the folders it left are removed by :func:`remove_abandoned_work`. Nothing a job does touches the
current version before the store's atomic promotion, so a failed or killed job leaves it serving.

This module never imports the coordinator (it receives ``record``), so the two do not import
each other.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from ml_backend.errors import BackendError
from ml_backend.security.jobs import FINISHED_JOB_TTL_S, job_access
from ml_backend.retrain.spec import MIN_USABLE_PAIRS, QUEUE_NAME, JobSpec, NotEnoughData, TrainingJobError
from ml_backend.security.private_folders import installation_token, private_directory

logger = logging.getLogger(__name__)

RESULT_TTL_S = FINISHED_JOB_TTL_S  # the job carries the token
WORK_ROOT_NAME = "sam-trimap-retrain"  # under the temporary folder: exported images and trimaps of running jobs

Record = Callable[[int, str, dict[str, Any]], Any]  # (project, job id, outcome)


def work_root(model_dir: str | Path, *, create: bool = True) -> Path | None:
    """Where running jobs export the project's images: a folder of the temporary folder that only this user can
    enter (0700, this user's, not a link), named with the installation's random token kept in ``MODEL_DIR``, so
    other users of the host can neither read the images nor plant some that would train the next model
    (:mod:`ml_backend.security.private_folders`; raises ``UnsafeFolderError`` for a planted one). Without
    ``create``: None when the installation has no token yet (no job ever ran)."""
    token = installation_token(Path(model_dir), create=create)
    if token is None:
        return None
    return private_directory(Path(tempfile.gettempdir()) / f"{WORK_ROOT_NAME}-{token}", create=create)


def remove_abandoned_work(model_dir: str | Path) -> list[str]:
    """Remove what killed jobs left: export folders under the temporary folder, staging folders in the store."""
    from training.store import ModelStore
    from training.workdirs import remove_abandoned

    try:
        root = work_root(model_dir, create=False)  # a backend start makes nothing in /tmp
        removed = remove_abandoned(root) if root is not None else []
    except OSError as exc:
        logger.warning("cannot look for abandoned training exports: %s", exc)
        removed = []
    root = Path(model_dir)
    stores = [root, *sorted((root / "projects").glob("*"))] if root.is_dir() else []
    for store in stores:
        removed += ModelStore(store).remove_abandoned_staging()
    return removed


class JobCancelled(TrainingJobError):
    """The job was stopped from outside (its timeout passed)."""


def _cancel_callback(cancel: threading.Event):
    import keras

    class StopWhenCancelled(keras.callbacks.Callback):
        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            if cancel.is_set():
                raise JobCancelled("the training job was stopped: it ran past RETRAIN_JOB_TIMEOUT_S")

    return StopWhenCancelled()


def execute_training(spec: JobSpec, cancel: threading.Event | None = None) -> dict[str, Any]:
    """Export, fit, promote, prune; returns the outcome. Raises on failure (the caller records it)."""
    from training.workdirs import held_folder

    from ml_backend.export import ExportOptions, export_from_label_studio
    from ml_backend.images import ImageLoader
    from ml_backend.settings import Settings
    from ml_backend.trimaps import LabelRoles

    cancel = cancel or threading.Event()
    settings = Settings.from_env()  # this process's image cache and download limits
    options = ExportOptions(LabelRoles(spec.foreground_labels, spec.background_labels, spec.boundary_labels),
                            spec.boundary_width, spec.ground_truth_only, max_pixels=settings.max_image_pixels)
    loader = ImageLoader(settings)
    url, token = job_access(settings.label_studio_url, settings.label_studio_api_key, spec.label_studio_url, spec.token)
    try:
        with held_folder(work_root(settings.model_dir) / f"project-{spec.project}-{spec.job_id}") as data_dir:
            report = export_from_label_studio(data_dir, url=url, token=token,
                                              project=spec.project, loader=loader, options=options)
            usable = len(report.written)
            tasks = _task_ids(report.written)
            if usable < MIN_USABLE_PAIRS:
                raise NotEnoughData(
                    f"project {spec.project} has {usable} task(s) with an accepted brush annotation; training needs "
                    f"at least {MIN_USABLE_PAIRS} (one to train on, one to validate) "
                    f"({report.not_accepted} without an accepted annotation, {len(report.skipped)} skipped)", usable, tasks)
            if cancel.is_set():
                raise JobCancelled("the training job was stopped before fitting")
            from training.fit import fit  # deferred: Keras loads only in a job that trains
            from training.store import ModelStore

            logger.info("project %s: training on %d pair(s)", spec.project, usable)
            # "current": fine-tune the current version, else the base model, else from scratch.
            fitted = fit(data_dir, spec.model_dir, from_version="current", base_model=spec.base_model or None,
                         epochs=spec.epochs, image_size=spec.image_size, batch_size=spec.batch_size,
                         promotion_margin=spec.promotion_margin, verbose=2, callbacks=[_cancel_callback(cancel)],
                         compare_max_train=spec.compare_max_train)
            pruned = ModelStore(spec.model_dir).prune(spec.keep_versions)
    finally:
        loader.close()
    return {"status": "succeeded", "version": fitted.version_id, "promoted": fitted.promoted,
            "val_foreground_iou": fitted.val_foreground_iou, "parent": fitted.parent, "base_model": fitted.base_model,
            "baseline_val_foreground_iou": fitted.baseline_val_foreground_iou, "train_count": fitted.train_count,
            "val_count": fitted.val_count, "skipped_count": fitted.skipped_count, "export": report.summary(),
            "usable": usable, "tasks": tasks, "pruned": pruned, "promotion": fitted.promotion_reason,
            "start": fitted.start, "start_choice": fitted.start_choice}


def _task_ids(stems: list[str]) -> list[int]:
    """Task ids from the export's stems (``task-<id>``)."""
    return sorted(int(s[5:]) for s in stems if s.startswith("task-") and s[5:].isascii() and s[5:].isdigit())


def _failure(exc: BaseException) -> dict[str, Any]:
    message = exc.message if isinstance(exc, BackendError) else f"{exc.__class__.__name__}: {exc}"
    if isinstance(exc, NotEnoughData):
        return {"status": "not_enough_data", "error": message, "usable": exc.usable, "tasks": exc.tasks}
    return {"status": "failed", "error": message}


def run_and_record(spec: JobSpec, record: Record, cancel: threading.Event | None = None) -> dict[str, Any]:
    """Run the job and record its outcome (also on failure); re-raises failures."""
    started = time.monotonic()
    logger.info("training job %s for project %s started (%s)", spec.job_id, spec.project, spec.reason)
    try:
        outcome = execute_training(spec, cancel=cancel)
    except BaseException as exc:  # recorded whatever it was (timeouts and shutdowns too), then re-raised
        outcome = _failure(exc)
        outcome["duration_s"] = round(time.monotonic() - started, 1)
        logger.error("training job %s for project %s ended without a version: %s", spec.job_id, spec.project,
                     outcome["error"], exc_info=not isinstance(exc, BackendError))
        record(spec.project, spec.job_id, outcome)
        raise
    outcome["duration_s"] = round(time.monotonic() - started, 1)
    logger.info("training job %s for project %s finished: %s", spec.job_id, spec.project, outcome)
    record(spec.project, spec.job_id, outcome)
    return outcome


# --- who runs a job: identity of this process start ---------------------------------------------

_boot: tuple[int, str] | None = None


def _start_ticks(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, /proc), to tell a reused pid from the original;
    None when there is no such process or it has ended and awaits reaping (a zombie: a killed worker whose
    parent died with it lingers so in a container whose init does not reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
    if fields[0] in ("Z", "X"):  # field 3 of proc(5): zombie or dead
        return None
    return fields[19]  # field 22: start time


def owner_id() -> str:
    """``host:pid:start-ticks:boot-id`` of this process start (a fresh boot id after a fork or restart)."""
    global _boot
    pid = os.getpid()
    if _boot is None or _boot[0] != pid:
        _boot = (pid, uuid.uuid4().hex[:12])
    return f"{socket.gethostname()}:{pid}:{_start_ticks(pid) or '-'}:{_boot[1]}"


def owner_gone(owner: str | None) -> str | None:
    """Why the process that ``owner`` names cannot be running any more, or None if it may be."""
    parts = (owner or "").split(":")
    if len(parts) != 4 or not parts[1].isdigit():
        return f"its owner {owner!r} is not a process this backend knows (state of an older version)"
    host, pid, ticks = parts[0], int(parts[1]), parts[2]
    if host != socket.gethostname():
        return None  # another machine's process: cannot tell (use Redis and RQ across machines)
    if pid == os.getpid():
        return None if owner == owner_id() else "the backend restarted before the job finished"
    now_ticks = _start_ticks(pid)
    if now_ticks is None:
        return f"the backend process that ran it (pid {pid}) ended before the job finished"
    if ticks != "-" and now_ticks != ticks:
        return f"the backend process that ran it (pid {pid}) ended before the job finished (pid reused)"
    return None


class Executor(Protocol):
    owner: str | None  # what the state records as the job's owner (None: the queue knows)

    def submit(self, spec: JobSpec, record: Record) -> None: ...

    def lost(self, job_id: str, owner: str | None) -> str | None:
        """Why a job the state calls running can no longer finish, or None while it may."""


class QueueFull(TrainingJobError):
    status_code = 503


class InProcessExecutor:
    """Jobs on threads of this process, at most ``concurrency`` fitting at once and ``queue_max`` waiting.

    A thread cannot be killed, so the timeout is cooperative: :meth:`lost` reports the job as
    timed out (the coordinator records the failure at once) and sets its cancel flag, which
    stops the fit at its next batch without publishing anything.
    """

    def __init__(self, *, concurrency: int = 1, queue_max: int = 16, timeout_s: float = 6 * 3600,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.owner = owner_id()
        self.concurrency = max(1, concurrency)
        self.queue_max = queue_max
        self.timeout_s = timeout_s
        self.clock = clock
        self._slots = threading.BoundedSemaphore(self.concurrency)
        self._threads: dict[str, threading.Thread] = {}
        self._started: dict[str, float] = {}  # job id -> when it got a slot
        self._cancel: dict[str, threading.Event] = {}
        self._ended: set[str] = set()
        self._lock = threading.Lock()

    def submit(self, spec: JobSpec, record: Record) -> None:
        cancel = threading.Event()

        def work() -> None:
            try:
                with self._slots:
                    with self._lock:
                        self._started[spec.job_id] = self.clock()
                    if not cancel.is_set():
                        run_and_record(spec, record, cancel)
            except BaseException:  # already logged and recorded by run_and_record
                pass
            finally:
                with self._lock:
                    self._threads.pop(spec.job_id, None)
                    self._started.pop(spec.job_id, None)
                    self._cancel.pop(spec.job_id, None)
                    self._ended.add(spec.job_id)

        with self._lock:
            if len(self._threads) >= self.concurrency + self.queue_max:
                raise QueueFull(f"{len(self._threads)} training jobs are already running or waiting in this process "
                                f"(RETRAIN_CONCURRENCY={self.concurrency}, RETRAIN_QUEUE_MAX={self.queue_max})")
            thread = threading.Thread(target=work, name=f"training-{spec.project}", daemon=True)
            self._threads[spec.job_id] = thread
            self._cancel[spec.job_id] = cancel
        thread.start()

    def lost(self, job_id: str, owner: str | None) -> str | None:
        if owner != self.owner:
            return owner_gone(owner)
        with self._lock:
            if job_id in self._ended:
                return "the training thread ended without recording its outcome"
            if job_id not in self._threads:
                return None  # recorded as started an instant before this process submits it
            started = self._started.get(job_id)
            if started is not None and self.clock() - started > self.timeout_s:
                self._cancel[job_id].set()
                return f"timed out after {self.timeout_s:g} s (RETRAIN_JOB_TIMEOUT_S)"
        return None

    def waiting(self, job_id: str) -> bool:
        """Whether this process holds ``job_id`` in its queue, waiting for a training slot."""
        with self._lock:
            return job_id in self._threads and job_id not in self._started

    def join(self, timeout_s: float | None = None) -> None:
        """Wait for this process's running jobs (tests, shutdown)."""
        with self._lock:
            threads = list(self._threads.values())
        for thread in threads:
            thread.join(timeout_s)


def redis_connection(url: str, *, fail_fast: bool = False):
    """A client for ``url``; ``fail_fast`` (the backend's webhook path) bounds connecting and each command
    well inside the one second Label Studio waits for a webhook.

    RQ workers need the defaults: their blocking dequeue waits longer than any short socket timeout.
    """
    from redis import Redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    if fail_fast:  # redis-py retries three times with backoff by default: seconds when Redis is down
        return Redis.from_url(url, socket_connect_timeout=0.25, socket_timeout=0.5, retry=Retry(NoBackoff(), 0))
    return Redis.from_url(url)


class RQExecutor:
    """Jobs on an RQ queue; workers run :func:`ml_backend.retrain.rq_job.run_job`."""

    owner = None

    def __init__(self, connection, *, queue_name: str = QUEUE_NAME) -> None:
        from rq import Queue

        self.connection = connection
        self.queue = Queue(queue_name, connection=connection)

    def submit(self, spec: JobSpec, record: Record) -> None:
        # By name: the entry point imports the coordinator, which this module must not.
        self.queue.enqueue("ml_backend.retrain.rq_job.run_job", spec.to_dict(), job_id=spec.job_id,
                           job_timeout=spec.timeout_s, result_ttl=RESULT_TTL_S, failure_ttl=RESULT_TTL_S,
                           description=f"train trimap model for project {spec.project} ({spec.reason})")

    def lost(self, job_id: str, owner: str | None) -> str | None:
        from rq.exceptions import NoSuchJobError
        from rq.job import Job, JobStatus
        from rq.registry import StartedJobRegistry

        # Moves jobs of workers that died without a word (no heartbeat) to the failed registry.
        StartedJobRegistry(queue=self.queue).cleanup()
        try:
            job = Job.fetch(job_id, connection=self.connection)
        except NoSuchJobError:
            return "the job vanished from Redis"
        status = job.get_status(refresh=True)
        if status not in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
            return None
        result = job.latest_result()
        detail = (result.exc_string or "").strip().splitlines()[-1:] if result is not None else []
        return f"the RQ job {status.value}" + (f": {detail[0]}" if detail else "")
