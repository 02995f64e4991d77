"""RQ's entry point for a training job (enqueued by name): run it in a worker, record the outcome in Redis."""

from __future__ import annotations

from typing import Any

from ml_backend.retrain.coordinator import Retrainer
from ml_backend.retrain.jobs import redis_connection, remove_abandoned_work, run_and_record
from ml_backend.retrain.spec import JobSpec
from ml_backend.settings import Settings


def run_job(spec: dict[str, Any]) -> dict[str, Any]:
    job = JobSpec.from_dict(spec)
    remove_abandoned_work(Settings.from_env().model_dir)  # what jobs killed on this machine left behind
    retrainer = Retrainer.for_worker(redis_connection(job.redis_url), job)
    return run_and_record(job, retrainer.finish)
