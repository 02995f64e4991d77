"""SAM 3 project jobs on RQ workers (``REDIS_URL`` set): the web side enqueues and reports; workers run
:func:`ml_backend.sam3.rq_job.run_job`.

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

from ml_backend.errors import BackendError, redis_errors
from ml_backend.security.jobs import FINISHED_JOB_TTL_S
from ml_backend.sam3.job import MAX_QUEUED_PROJECTS, ProjectProgress, queue_full_error

logger = logging.getLogger(__name__)

QUEUE_NAME = "sam-trimap-sam3"
PREFIX = "sam-trimap:sam3:"
JOB_TIMEOUT_S = 24 * 3600  # a whole project on a CPU; RQ stops the job after this
PROGRESS_TTL_S = 7 * 24 * 3600
HEARTBEAT_S = 10.0  # how often a worker's thread refreshes its run's heartbeat
STALE_AFTER_S = 120.0  # twelve missed heartbeats
WATCH_S = 60.0  # how often each web process looks for dead runs to restart
MAX_RESTARTS = 3  # automatic restarts of a project whose runs keep dying
LOCK_TIMEOUT_S = 10  # the per-project lock around start(): held for a read, a write and an enqueue
ACTIVE = ("queued", "running")

def progress_key(project: int) -> str:
    return f"{PREFIX}progress:{project}"


def owner_key(project: int) -> str:
    return f"{PREFIX}owner:{project}"


@contextlib.contextmanager
def _redis_unreachable() -> Iterator[None]:
    from redis.exceptions import LockError

    try:
        yield
    except LockError as exc:
        raise BackendError("Another backend process is starting this project's SAM 3 job; ask again in a few "
                           "seconds.", status_code=503) from exc
    except redis_errors() as exc:
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
            if attempt == 0 and sum((r := self._read(p)) is not None and r["state"] in ACTIVE
                                    for p in self._projects()) >= MAX_QUEUED_PROJECTS:
                raise queue_full_error()
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
            self.queue.enqueue("ml_backend.sam3.rq_job.run_job",
                               {"project": project, "job_id": job_id, "label_studio_url": url, "token": token,
                                "restarts": attempt},
                               job_id=job_id, job_timeout=JOB_TIMEOUT_S, result_ttl=FINISHED_JOB_TTL_S,
                               failure_ttl=FINISHED_JOB_TTL_S, description=f"SAM 3 pre-annotation of project {project}",
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
        except redis_errors() as exc:
            logger.warning("SAM 3 jobs not resumed: Redis (REDIS_URL) is unreachable: %s", exc)
        return resumed

    def status(self) -> dict:
        try:
            projects = {str(p): record for p in self._projects() if (record := self._read(p)) is not None}
        except redis_errors() as exc:
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
