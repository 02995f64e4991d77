"""RQ's entry point for a SAM 3 project job (enqueued by name by :mod:`ml_backend.sam3.rq_jobs`): run the
project in this worker process, writing its progress and heartbeat to Redis while the run owns the project."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from dataclasses import asdict
from typing import Any

from ml_backend.errors import BackendError
from ml_backend.label_studio_api import LabelStudioAccess
from ml_backend.sam3.job import JobSuperseded, ProjectProgress, run_project
from ml_backend.sam3.rq_jobs import HEARTBEAT_S, PROGRESS_TTL_S, owner_key, progress_key, redis_errors
from ml_backend.security.jobs import job_access

logger = logging.getLogger(__name__)

# KEYS[1] progress, KEYS[2] owner; ARGV[1] job id, ARGV[2] progress JSON, ARGV[3] TTL.
_WRITE_IF_OWNER = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 1
"""


class ProgressWriter:
    """Writes one run's progress while the run still owns its project; a thread keeps the heartbeat fresh."""

    def __init__(self, connection, job_id: str, progress: ProjectProgress, *, kept: dict | None = None,
                 heartbeat_s: float = HEARTBEAT_S) -> None:
        self.connection = connection
        self.job_id = job_id
        self.kept = kept or {}  # fields of the web side's record the worker keeps (queued_at, restarts)
        self.progress = progress
        self.heartbeat_s = heartbeat_s
        self._script = connection.register_script(_WRITE_IF_OWNER)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._superseded = False

    def write(self, progress: ProjectProgress | None = None) -> None:
        """Write this run's progress (``progress``, when given, is that same object: this is the ``report`` of
        :func:`run_project`); raises :class:`JobSuperseded` once another run owns the project."""
        with self._lock:
            if self._superseded:
                raise JobSuperseded(f"project {self.progress.project} was started again elsewhere")
            record = {**self.kept, **asdict(self.progress), "job_id": self.job_id, "heartbeat_at": time.time()}
            keys = [progress_key(self.progress.project), owner_key(self.progress.project)]
            if not self._script(keys=keys, args=[self.job_id, json.dumps(record), PROGRESS_TTL_S]):
                self._superseded = True
                raise JobSuperseded(f"project {self.progress.project} was started again elsewhere")

    def __enter__(self) -> ProgressWriter:
        threading.Thread(target=self._beat, name=f"sam3-heartbeat-{self.progress.project}", daemon=True).start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.write()
            except JobSuperseded:
                return
            except redis_errors() as exc:  # the next beat tries again; the job itself goes on
                logger.warning("SAM 3 progress of project %s not written: %s", self.progress.project, exc)


_runtime = None  # this worker process's runtime, installed by ``python -m ml_backend.sam3.worker``


def install_runtime(runtime) -> None:
    """Hand this process's runtime (SAM 3 loaded) to the jobs: the same predictor the web process's thread uses.

    Held here, not in the ``__main__`` of ``python -m ml_backend.sam3.worker``, so the jobs find it; built by
    that command (:func:`ml_backend.sam3.worker.build_runtime`), since a runtime sits above this module."""
    global _runtime
    _runtime = runtime


def worker_context(label_studio_url: str, token: str):
    """The job context for one job: this worker's own Label Studio when it has one, else the job's with the
    job's token only (:func:`ml_backend.security.jobs.job_access`)."""
    runtime = _runtime
    if runtime is None:
        raise BackendError("No runtime in this process: run SAM 3 jobs with python -m ml_backend.sam3.worker.")
    runtime.access = LabelStudioAccess(*job_access(runtime.settings.label_studio_url,
                                                   runtime.settings.label_studio_api_key, label_studio_url, token))
    return runtime.sam3_wiring.job_context()


def run_job(spec: dict[str, Any]) -> dict:
    """RQ's entry point (enqueued by name): pre-annotate one project in this worker; its final progress."""
    from rq import get_current_job

    job = get_current_job()
    project, job_id = int(spec["project"]), str(spec["job_id"])
    progress = ProjectProgress(project)
    kept = {"queued_at": job.enqueued_at.timestamp() if job.enqueued_at else None,
            "restarts": int(spec.get("restarts") or 0)}
    writer = ProgressWriter(job.connection, job_id, progress, kept=kept)
    context = worker_context(spec.get("label_studio_url") or "", spec.get("token") or "")
    try:
        with writer:
            run_project(progress, context, writer.write)
            writer.write()
    except JobSuperseded:
        logger.warning("SAM 3 pre-annotation of project %s (%s) stopped: the project was started again elsewhere",
                       project, job_id)
        return {**asdict(progress), "superseded": True}
    except BaseException as exc:  # stopped from outside (RQ's timeout, a shutdown): record it, then let RQ see it
        progress.state, progress.error = "failed", f"stopped: {exc.__class__.__name__}: {exc}"
        progress.finished_at = time.time()
        with contextlib.suppress(Exception):
            writer.write()
        raise
    logger.info("SAM 3 pre-annotation of project %s %s: %s written, %s skipped, %s failed of %s", project,
                progress.state, progress.written, progress.skipped, progress.failed, progress.total)
    return asdict(progress)
