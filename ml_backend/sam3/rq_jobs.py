"""SAM 3 project jobs on RQ workers (``REDIS_URL`` set): the web side enqueues, workers run :func:`run_job`.

One job per project at a time, whichever web worker or replica asks: under a short Redis lock per project,
``start`` looks at the project's progress record and enqueues only when nothing is queued or running.
Each run has its own job id (``sam3-<project>-<hex>``), recorded as the project's owner; a worker writes
progress only while its job id is still the owner (an atomic compare-and-set), so a run judged dead and
started again cannot overwrite its successor's progress: it stops at its next write.

Progress lives under ``sam-trimap:sam3:progress:<project>`` (JSON, kept ``PROGRESS_TTL_S``): the fields of
:class:`~ml_backend.sam3.job.ProjectProgress` plus ``job_id``, ``queued_at``, ``heartbeat_at`` and
``restarts``. The worker refreshes ``heartbeat_at`` every ``HEARTBEAT_S`` from a thread, whatever one image
takes; a running record whose heartbeat is older than ``STALE_AFTER_S`` belongs to a worker that died (killed,
OOM, machine gone): ``/status`` reports it failed (``"stale": true``), and the web processes start it again
(at start-up, then every ``WATCH_S``; at most ``MAX_RESTARTS`` times in a row) as does ``/preannotate``.
RQ's own registry is no help there: a ``SimpleWorker`` does not heartbeat during a job, so RQ notices a
dead one only after the job's timeout. A queued record whose RQ job failed or vanished is reported failed
too.

A job carries Label Studio's URL and token, as training jobs do (:class:`ml_backend.retrain.spec.JobSpec`):
keep Redis private to the deployment.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any

from ml_backend.errors import BackendError
from ml_backend.sam3.job import JobSuperseded, ProjectProgress, run_project

logger = logging.getLogger(__name__)

QUEUE_NAME = "sam-trimap-sam3"
PREFIX = "sam-trimap:sam3:"
LOAD_WAIT_S = 3600.0  # a worker waits this long for SAM 3 to load (a large checkpoint converted on a slow disk)
JOB_TIMEOUT_S = 24 * 3600  # a whole project on a CPU; RQ stops the job after this
PROGRESS_TTL_S = 7 * 24 * 3600
HEARTBEAT_S = 10.0
STALE_AFTER_S = 120.0  # twelve missed heartbeats
WATCH_S = 60.0  # how often each web process looks for dead runs to restart
MAX_RESTARTS = 3  # automatic restarts of a project whose runs keep dying
LOCK_TIMEOUT_S = 10  # the per-project lock around start(): held for a read, a write and an enqueue
ACTIVE = ("queued", "running")

# KEYS[1] progress, KEYS[2] owner; ARGV[1] job id, ARGV[2] progress JSON, ARGV[3] TTL.
_WRITE_IF_OWNER = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 1
"""


def progress_key(project: int) -> str:
    return f"{PREFIX}progress:{project}"


def owner_key(project: int) -> str:
    return f"{PREFIX}owner:{project}"


def _redis_errors() -> tuple[type[BaseException], ...]:
    from redis import RedisError

    return RedisError, OSError


@contextlib.contextmanager
def _redis_unreachable() -> Iterator[None]:
    from redis.exceptions import LockError

    try:
        yield
    except LockError as exc:
        raise BackendError("Another backend process is starting this project's SAM 3 job; ask again in a few "
                           "seconds.", status_code=503) from exc
    except _redis_errors() as exc:
        raise BackendError(f"Redis (REDIS_URL) is unreachable, so the SAM 3 job cannot be queued: {exc}",
                           status_code=503) from exc


class RQProjectJobs:
    """The web side: start, resume and report project jobs that RQ workers run."""

    def __init__(self, connection, access: Callable[[], tuple[str, str]], *, queue_name: str = QUEUE_NAME,
                 stale_after_s: float = STALE_AFTER_S, clock: Callable[[], float] = time.time) -> None:
        from rq import Queue

        self.connection = connection
        self.access = access
        self.queue = Queue(queue_name, connection=connection)
        self.stale_after_s = stale_after_s
        self.clock = clock
        self._watch: threading.Thread | None = None

    # --- control ---------------------------------------------------------------
    def start(self, project: int) -> dict:
        """Enqueue ``project`` unless it is already queued or running (alive); its progress record."""
        return self._start(project, attempt=0)

    def _start(self, project: int, attempt: int) -> dict:
        with _redis_unreachable(), self.connection.lock(f"{PREFIX}lock:{project}", timeout=LOCK_TIMEOUT_S,
                                                        blocking_timeout=LOCK_TIMEOUT_S / 2):
            current = self._read(project)
            if current is not None and current["state"] in ACTIVE:
                return current
            return self._enqueue(project, attempt)

    def _enqueue(self, project: int, attempt: int) -> dict:
        url, token = self.access()
        job_id = f"sam3-{project}-{uuid.uuid4().hex[:12]}"
        record = {**asdict(ProjectProgress(project)), "job_id": job_id, "queued_at": self.clock(),
                  "heartbeat_at": None, "restarts": attempt}
        # One transaction: nobody sees the record without its job, and no worker takes the job before it owns
        # the project. By name: the web process never imports what the worker runs.
        with self.connection.pipeline() as pipe:
            pipe.multi()  # (RQ starts one itself when given a pipeline, unless it is already one)
            pipe.set(owner_key(project), job_id, ex=PROGRESS_TTL_S)
            pipe.set(progress_key(project), json.dumps(record), ex=PROGRESS_TTL_S)
            self.queue.enqueue("ml_backend.sam3.rq_jobs.run_job",
                               {"project": project, "job_id": job_id, "label_studio_url": url, "token": token,
                                "restarts": attempt},
                               job_id=job_id, job_timeout=JOB_TIMEOUT_S, result_ttl=PROGRESS_TTL_S,
                               failure_ttl=PROGRESS_TTL_S, description=f"SAM 3 pre-annotation of project {project}",
                               pipeline=pipe)
            pipe.execute()
        logger.info("SAM 3 pre-annotation of project %s queued on %s as %s", project, self.queue.name, job_id)
        return record

    def resume(self, watch_s: float | None = WATCH_S) -> list[int]:
        """Start again the projects whose run died (its worker was killed or lost) before it finished; then
        keep doing so every ``watch_s`` seconds in a daemon thread (None: once), so a worker restarted while
        the backend stays up does not leave its project failed.

        A project is restarted this way at most ``MAX_RESTARTS`` times in a row (a run that kills its worker
        every time, say an image too large for its memory, stays failed); ``POST /preannotate`` starts it
        afresh. Every web worker does this; the per-project lock lets only one enqueue.
        """
        resumed = self._resume_dead()
        if watch_s is not None and self._watch is None:
            self._watch = threading.Thread(target=self._watch_loop, args=(watch_s,), name="sam3-jobs-watch",
                                           daemon=True)
            self._watch.start()
        return resumed

    def _watch_loop(self, interval_s: float) -> None:
        while True:
            time.sleep(interval_s)
            self._resume_dead()

    def _resume_dead(self) -> list[int]:
        resumed = []
        try:
            for project in self._projects():
                record = self._read(project, judge=False)
                if record is None or record["state"] not in ACTIVE:
                    continue
                judged = self._judged(record)
                if judged["state"] in ACTIVE:
                    continue
                restarts = int(record.get("restarts") or 0) + 1
                if restarts > MAX_RESTARTS:
                    continue
                logger.warning("restarting SAM 3 pre-annotation of project %s (restart %d of at most %d): %s",
                               project, restarts, MAX_RESTARTS, judged.get("error"))
                self._start(project, restarts)
                resumed.append(project)
        except BackendError as exc:
            logger.warning("SAM 3 jobs not resumed: %s", exc.message)
        except _redis_errors() as exc:
            logger.warning("SAM 3 jobs not resumed: Redis (REDIS_URL) is unreachable: %s", exc)
        return resumed

    def status(self) -> dict:
        try:
            projects = {str(p): record for p in self._projects() if (record := self._read(p)) is not None}
        except _redis_errors() as exc:
            return {"executor": "rq", "queue_name": self.queue.name,
                    "error": f"Redis (REDIS_URL) is unreachable: {exc}", "queue": [], "projects": {}}
        queued = sorted((r.get("queued_at") or 0, int(p)) for p, r in projects.items() if r["state"] == "queued")
        return {"executor": "rq", "queue_name": self.queue.name, "queue": [p for _, p in queued],
                "projects": projects}

    # --- reading and judging progress -------------------------------------------
    def _projects(self) -> list[int]:
        prefix = progress_key(0)[:-1]
        keys = (key.decode() for key in self.connection.scan_iter(match=f"{prefix}*"))
        return sorted(int(rest) for key in keys if (rest := key[len(prefix):]).isdigit())

    def _read(self, project: int, *, judge: bool = True) -> dict | None:
        raw = self.connection.get(progress_key(project))
        if raw is None:
            return None
        try:
            record = json.loads(raw)
            if not isinstance(record, dict) or not isinstance(record.get("state"), str):
                raise ValueError("not a progress record")
        except ValueError:
            logger.error("unreadable SAM 3 progress of project %s in Redis; treated as absent", project)
            return None
        return self._judged(record) if judge else record

    def _judged(self, record: dict) -> dict:
        """``record`` as it really stands: a run whose worker died is failed, not queued or running forever."""
        state = record["state"]
        if state == "running":
            beat = record.get("heartbeat_at") or record.get("started_at") or 0
            age = self.clock() - beat
            if age > self.stale_after_s:
                return {**record, "state": "failed", "stale": True,
                        "error": f"no progress from its SAM 3 worker for {age:.0f} s: the worker stopped or died "
                                 f"(the backend queues the project again within {WATCH_S:.0f} s, at most "
                                 f"{MAX_RESTARTS} times in a row; POST /preannotate does at once)"}
        elif state == "queued":
            if (reason := self._queued_job_lost(record.get("job_id") or "")) is not None:
                return {**record, "state": "failed", "stale": True, "error": reason}
        return record

    def _queued_job_lost(self, job_id: str) -> str | None:
        """Why a queued job can no longer run (failed, stopped, vanished from Redis), or None while it can."""
        from rq.exceptions import NoSuchJobError
        from rq.job import Job, JobStatus

        try:
            job = Job.fetch(job_id, connection=self.connection)
        except NoSuchJobError:
            return "its RQ job vanished from Redis before a worker took it"
        status = job.get_status(refresh=False)
        if status not in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
            return None
        result = job.latest_result()
        detail = (result.exc_string or "").strip().splitlines()[-1:] if result is not None else []
        return f"its RQ job {status.value} before it reported progress" + (f": {detail[0]}" if detail else "")


# --- the worker side ----------------------------------------------------------------------------------

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
            except _redis_errors() as exc:  # the next beat tries again; the job itself goes on
                logger.warning("SAM 3 progress of project %s not written: %s", self.progress.project, exc)


_runtime = None


def load_runtime(settings=None):
    """This worker process's runtime (SAM 3 loaded), built once: the same predictor the web process's thread uses.

    Held here, not in the ``__main__`` of ``python -m ml_backend.sam3.worker``, so the jobs find it."""
    global _runtime
    if _runtime is None:
        from ml_backend.runtime import Runtime
        from ml_backend.settings import Settings

        settings = settings or Settings.from_env()
        runtime = Runtime(settings)
        if runtime.sam3 is not None:
            runtime.sam3.start_loading()
            runtime.sam3.engine(LOAD_WAIT_S)  # raises the loader's error
        if runtime.concepts is None and settings.trimap_sam_refine:
            runtime.start_loading_sam()  # PREANNOTATE=trimap refines its masks with SAM
        _runtime = runtime
    return _runtime


def worker_context(label_studio_url: str, token: str):
    """The job context for one job: Label Studio's URL and token as the web process knew them."""
    from ml_backend.runtime import LabelStudioAccess

    runtime = load_runtime()
    runtime.access = LabelStudioAccess(label_studio_url or runtime.settings.label_studio_url,
                                       token or runtime.settings.label_studio_api_key)
    return runtime.job_context()


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
