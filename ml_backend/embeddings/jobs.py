"""Pre-encoding on RQ workers (``PREENCODE_EXECUTOR=rq``): the web process orders the images, RQ
workers (``python -m ml_backend.embeddings.worker``, GPU machines mounting the same
``EMBEDDING_STORE_DIR``) encode them into the shared store, so web replicas only decode.

A job carries the image URL, its task id and Label Studio's URL and token (keep Redis private
to the deployment). The worker loads SAM once and keeps it (an RQ ``SimpleWorker``: no fork
per job). Its model id must equal the web's: same ``SAM_MODEL`` and precision on both, or the
web finds nothing under its own id and encodes itself.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from ml_backend.embeddings.scheduler import EncodeJob, project_id
from ml_backend.errors import BackendError
from ml_backend.security.jobs import FINISHED_JOB_TTL_S, job_access

logger = logging.getLogger(__name__)

QUEUE_NAME = "sam-embeddings"
JOB_TIMEOUT_S = 900
RESULT_TTL_S = FINISHED_JOB_TTL_S  # the job carries the token
POLL_S = 0.2
IN_FLIGHT = 4  # jobs one web process keeps queued on Redis at once (the rest wait, in order, in its scheduler)


class EmbeddingJobError(BackendError):
    status_code = 502


@dataclass
class WorkerContext:
    """What an embedding worker process holds: settings, the image loader, SAM with its store, the URL index."""

    settings: Any
    images: Any
    engine: Any
    url_index: Any


_context: WorkerContext | None = None


def load_worker_context(settings=None) -> WorkerContext:
    """Load SAM and the store once per worker process."""
    global _context
    if _context is None:
        from ml_backend.embeddings.urls import UrlIndex
        from ml_backend.images import ImageLoader
        from ml_backend.sam.loading import load_engine
        from ml_backend.settings import Settings

        settings = settings or Settings.from_env()
        engine = load_engine(settings)
        if engine.store is None:
            raise EmbeddingJobError("an embedding worker needs EMBEDDING_STORE_DIR (and EMBEDDING_STORE_MB > 0)")
        images = ImageLoader(settings)
        # With this worker's own Label Studio access; a worker without one finds no entry and loads the image.
        url_index = UrlIndex(lambda url, project: images.local_file(url, project=project),
                             ttl_s=settings.url_key_ttl_s, origin=lambda: settings.label_studio_url)
        url_index.store = engine.store
        if settings.redis_url:  # the web replicas' encode locks and URL records, so none encodes what this does
            from ml_backend.embeddings.redis_shared import RedisEncodeLocks, RedisUrlRecords
            from ml_backend.retrain.jobs import redis_connection

            redis = redis_connection(settings.redis_url, fail_fast=True)
            engine.encode_locks = RedisEncodeLocks(redis, max_wait_s=JOB_TIMEOUT_S)
            url_index.shared = RedisUrlRecords(redis, remote_ttl_s=settings.url_key_ttl_s)
        _context = WorkerContext(settings, images, engine, url_index)
    return _context


def encode_image(spec: dict[str, Any]) -> str:
    """The RQ job: make one image's embedding ready in the shared store; "ready" or "encoded"."""
    context = load_worker_context()
    url, task_id = spec["url"], spec.get("task_id")
    project = project_id(spec.get("project"))  # its local files: only from its local storages
    validator = context.url_index.validator(url, project)
    key = context.url_index.lookup(url, validator)
    if key is not None and context.engine.store.contains(key):
        return "ready"
    ls_url, token = job_access(context.settings.label_studio_url, context.settings.label_studio_api_key,
                               spec.get("label_studio_url"), spec.get("token"))
    image = context.images.load(url, label_studio_url=ls_url or None, token=token or None, task_id=task_id,
                                project=project)
    encodes = context.engine.images_encoded
    embedding = context.engine.embed(image)
    context.url_index.remember(url, embedding.key, validator)
    outcome = "encoded" if context.engine.images_encoded > encodes else "ready"
    logger.info("project %s task %s: %s (%s)", spec.get("project"), task_id, outcome, embedding.key[:12])
    return outcome


class RQEncoder:
    """The web side: ``encode(job)`` for the scheduler, submitting to RQ and waiting for the outcome."""

    def __init__(self, redis_url: str, access) -> None:
        from rq import Queue

        from ml_backend.retrain.jobs import redis_connection

        self.queue = Queue(QUEUE_NAME, connection=redis_connection(redis_url))
        self._access = access  # () -> (Label Studio URL, token)

    def __call__(self, job: EncodeJob) -> str:
        from rq.job import JobStatus

        url, token = self._access()
        spec = {"project": job.project, "task_id": job.task_id, "url": job.url, "label_studio_url": url,
                "token": token}
        queued = self.queue.enqueue(encode_image, spec, job_timeout=JOB_TIMEOUT_S, result_ttl=RESULT_TTL_S,
                                    failure_ttl=RESULT_TTL_S, at_front=job.urgent)
        deadline = time.monotonic() + JOB_TIMEOUT_S * 4  # queued behind other replicas' jobs too
        while time.monotonic() < deadline:
            state = queued.get_status(refresh=True)
            if state == JobStatus.FINISHED:
                return str(queued.return_value())
            if state in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
                result = queued.latest_result()
                lines = ((result.exc_string if result is not None else None) or "").strip().splitlines()
                raise EmbeddingJobError(f"embedding job {queued.id} {state}: {lines[-1] if lines else 'no details'}")
            time.sleep(POLL_S)
        raise EmbeddingJobError(f"embedding job {queued.id} did not finish in time")
