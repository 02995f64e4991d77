"""Training jobs: what one job does, and the two ways to run it.

* :class:`InProcessExecutor` (default, needs nothing installed): a daemon thread in the backend.
* :class:`RQExecutor` (``REDIS_URL`` set): the job goes to an RQ queue on Redis and any number
  of workers (``python -m ml_backend.retrain.worker``, or ``rq worker --url $REDIS_URL
  sam-trimap-training``; GPU machines sharing ``MODEL_DIR``) run :func:`run_job`. The job
  carries Label Studio's URL and token, so Redis must be private to the deployment.

A job exports the project's accepted annotations, fine-tunes from the store's current version
(from scratch when there is none) and lets ``training`` promote by its rule. It records its
outcome in the shared state itself; a job killed before it can (worker OOM-killed, machine
lost) is noticed by the backend's reconciliation through :meth:`Executor.lost`. Nothing a job
does touches the current version before the store's atomic promotion, so a failed or killed
job leaves the current version serving.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

from ml_backend.errors import BackendError

logger = logging.getLogger(__name__)

QUEUE_NAME = "sam-trimap-training"
RESULT_TTL_S = 7 * 24 * 3600


class TrainingJobError(BackendError):
    """A job that cannot train (nothing to train on, Label Studio unknown)."""

    status_code = 409


@dataclass(frozen=True)
class JobSpec:
    """Everything a job needs, decided by the backend when it starts the job (JSON-able for RQ)."""

    job_id: str
    project: str
    reason: str
    model_dir: str
    label_studio_url: str
    token: str
    epochs: int
    image_size: int
    batch_size: int
    promotion_margin: float
    boundary_width: int
    ground_truth_only: bool
    foreground_labels: tuple[str, ...]
    background_labels: tuple[str, ...]
    boundary_labels: tuple[str, ...]
    redis_url: str = ""
    timeout_s: int = 6 * 3600

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "JobSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        for key in ("foreground_labels", "background_labels", "boundary_labels"):
            values[key] = tuple(values.get(key, ()))
        return cls(**values)


def execute_training(spec: JobSpec) -> dict[str, Any]:
    """Export, fit, promote; returns the outcome. Raises on failure (the caller records it)."""
    from ml_backend.export import ExportOptions, export_from_label_studio
    from ml_backend.images import ImageLoader
    from ml_backend.settings import Settings
    from ml_backend.trimaps import LabelRoles

    settings = Settings.from_env()  # this process's image cache and download limits
    options = ExportOptions(LabelRoles(spec.foreground_labels, spec.background_labels, spec.boundary_labels),
                            spec.boundary_width, spec.ground_truth_only)
    loader = ImageLoader(settings)
    try:
        with tempfile.TemporaryDirectory(prefix=f"retrain-project-{spec.project}-") as data_dir:
            report = export_from_label_studio(data_dir, url=spec.label_studio_url, token=spec.token,
                                              project=int(spec.project), loader=loader, options=options)
            if not report.written:
                raise TrainingJobError(
                    f"project {spec.project} has no accepted brush annotation to train on "
                    f"({report.not_accepted} without an accepted annotation, {len(report.skipped)} skipped)")
            from training.fit import fit  # deferred: Keras loads only in a job that trains

            logger.info("project %s: training on %d pair(s)", spec.project, len(report.written))
            # "current": fine-tune the current version, from scratch when there is none.
            fitted = fit(data_dir, spec.model_dir, from_version="current", epochs=spec.epochs,
                         image_size=spec.image_size, batch_size=spec.batch_size,
                         promotion_margin=spec.promotion_margin, verbose=2)
    finally:
        loader.close()
    return {"status": "succeeded", "version": fitted.version_id, "promoted": fitted.promoted,
            "val_foreground_iou": fitted.val_foreground_iou, "parent": fitted.parent,
            "baseline_val_foreground_iou": fitted.baseline_val_foreground_iou, "train_count": fitted.train_count,
            "val_count": fitted.val_count, "skipped_count": fitted.skipped_count, "export": report.summary()}


def _failure(exc: BaseException) -> dict[str, Any]:
    message = exc.message if isinstance(exc, BackendError) else f"{exc.__class__.__name__}: {exc}"
    return {"status": "failed", "error": message}


def run_and_record(spec: JobSpec, retrainer) -> dict[str, Any]:
    """Run the job and record its outcome in the shared state (also on failure); re-raises failures."""
    started = time.monotonic()
    logger.info("training job %s for project %s started (%s)", spec.job_id, spec.project, spec.reason)
    try:
        outcome = execute_training(spec)
    except BaseException as exc:  # recorded whatever it was (timeouts and shutdowns too), then re-raised
        outcome = _failure(exc)
        outcome["duration_s"] = round(time.monotonic() - started, 1)
        logger.error("training job %s for project %s failed: %s", spec.job_id, spec.project, outcome["error"],
                     exc_info=not isinstance(exc, BackendError))
        retrainer.finish(spec.project, spec.job_id, outcome)
        raise
    outcome["duration_s"] = round(time.monotonic() - started, 1)
    logger.info("training job %s for project %s finished: %s", spec.job_id, spec.project, outcome)
    retrainer.finish(spec.project, spec.job_id, outcome)
    return outcome


def owner_id() -> str:
    return f"{os.getpid()}@{socket.gethostname()}"


class Executor(Protocol):
    owner: str | None  # what the state records as the job's owner (None: the queue knows)

    def submit(self, spec: JobSpec, retrainer) -> None: ...

    def lost(self, job_id: str, owner: str | None) -> str | None:
        """Why a job the state calls running can no longer finish, or None while it may."""


class InProcessExecutor:
    """One daemon thread per job in this process."""

    def __init__(self) -> None:
        self.owner = owner_id()
        self._threads: dict[str, threading.Thread] = {}
        self._ended: set[str] = set()
        self._lock = threading.Lock()

    def submit(self, spec: JobSpec, retrainer) -> None:
        def work() -> None:
            try:
                run_and_record(spec, retrainer)
            except BaseException:  # already logged and recorded by run_and_record
                pass
            finally:
                with self._lock:
                    self._threads.pop(spec.job_id, None)
                    self._ended.add(spec.job_id)

        thread = threading.Thread(target=work, name=f"training-{spec.project}", daemon=True)
        with self._lock:
            self._threads[spec.job_id] = thread
        thread.start()

    def lost(self, job_id: str, owner: str | None) -> str | None:
        if owner == self.owner:
            with self._lock:
                ended = job_id in self._ended
            return "the training thread ended without recording its outcome" if ended else None
        pid, _, host = (owner or "").partition("@")
        if host != socket.gethostname() or not pid.isdigit():
            return None  # another machine's process: cannot tell (use Redis and RQ across machines)
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return f"the backend process that ran it (pid {pid}) ended before the job finished"
        except PermissionError:
            pass
        return None

    def join(self, timeout_s: float | None = None) -> None:
        """Wait for this process's running jobs (tests, shutdown)."""
        with self._lock:
            threads = list(self._threads.values())
        for thread in threads:
            thread.join(timeout_s)


def redis_connection(url: str, *, fail_fast: bool = False):
    """A client for ``url``; ``fail_fast`` (the backend's webhook path) bounds connecting and each command.

    RQ workers need the defaults: their blocking dequeue waits longer than any short socket timeout.
    """
    from redis import Redis

    if fail_fast:
        return Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=2.0)
    return Redis.from_url(url)


class RQExecutor:
    """Jobs on an RQ queue; workers run :func:`run_job`."""

    owner = None

    def __init__(self, connection, *, queue_name: str = QUEUE_NAME) -> None:
        from rq import Queue

        self.connection = connection
        self.queue = Queue(queue_name, connection=connection)

    def submit(self, spec: JobSpec, retrainer) -> None:
        self.queue.enqueue(run_job, spec.to_dict(), job_id=spec.job_id, job_timeout=spec.timeout_s,
                           result_ttl=RESULT_TTL_S, failure_ttl=RESULT_TTL_S,
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


def run_job(spec: dict[str, Any]) -> dict[str, Any]:
    """RQ's entry point: run one job in a worker and record the outcome in Redis."""
    from ml_backend.retrain.coordinator import Retrainer

    job = JobSpec.from_dict(spec)
    connection = redis_connection(job.redis_url)
    retrainer = Retrainer.for_worker(connection, job)
    return run_and_record(job, retrainer)
