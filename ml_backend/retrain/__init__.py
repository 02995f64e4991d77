"""Periodic retraining of the trimap model from accepted Label Studio annotations.

``policy`` (when to train), ``state`` (shared per-project state), ``spec`` (what a job is
given), ``jobs`` (what a job does, in-process or RQ), ``coordinator`` (the :class:`Retrainer`
the backend holds), ``rq_job`` (RQ's entry point), ``worker`` (the RQ worker command). Each job
trains on its own project's accepted annotations in its own store (``MODEL_DIR/projects/<id>``),
fine-tuning that store's current version, or the base model for a project's first version.
"""

from __future__ import annotations

from collections.abc import Callable

from ml_backend.retrain.coordinator import Retrainer
from ml_backend.retrain.policy import TrainingPolicy
from ml_backend.retrain.spec import QUEUE_NAME, JobSpec
from ml_backend.settings import Settings

__all__ = ["QUEUE_NAME", "JobSpec", "Retrainer", "TrainingPolicy", "build_retrainer", "spec_factory"]


def spec_factory(settings: Settings, access: Callable[[], tuple[str, str]]) -> Callable[[int, str, str], JobSpec]:
    """Job specs from the settings and Label Studio's (url, token) as known when the job starts."""

    from training.layout import project_store_dir

    from ml_backend.preannotation import resolve_base_model

    def make(project: int, job_id: str, reason: str) -> JobSpec:
        url, token = access()
        base = resolve_base_model(settings.model_dir, settings.base_model)  # what a first training starts from
        return JobSpec(
            job_id=job_id, project=project, reason=reason,
            model_dir=str(project_store_dir(settings.model_dir, project).resolve()),
            label_studio_url=url, token=token, epochs=settings.retrain_epochs,
            image_size=settings.retrain_image_size, batch_size=settings.retrain_batch_size,
            promotion_margin=settings.promotion_margin, boundary_width=settings.boundary_width,
            ground_truth_only=settings.retrain_ground_truth_only, foreground_labels=settings.foreground_labels,
            background_labels=settings.background_labels, boundary_labels=settings.boundary_labels,
            redis_url=settings.redis_url, timeout_s=settings.retrain_job_timeout_s,
            keep_versions=settings.keep_versions, base_model=str(base.resolve()) if base else "",
            compare_max_train=settings.retrain_compare_max_train,
        )

    return make


def build_retrainer(settings: Settings, access: Callable[[], tuple[str, str]], **kwargs) -> Retrainer:
    """RQ on Redis when ``REDIS_URL`` is set, else the in-process worker with state in ``MODEL_DIR``.

    Removes what jobs killed on this machine left behind (export and staging folders) first.
    """
    from ml_backend.retrain.jobs import InProcessExecutor, RQExecutor, redis_connection, remove_abandoned_work
    from ml_backend.retrain.state import FileStateStore, RedisStateStore

    remove_abandoned_work(settings.model_dir)
    if settings.redis_url:
        connection = redis_connection(settings.redis_url, fail_fast=True)
        store, executor = RedisStateStore(connection), RQExecutor(connection)
    else:
        store = FileStateStore(settings.model_dir)
        executor = InProcessExecutor(concurrency=settings.retrain_concurrency, queue_max=settings.retrain_queue_max,
                                     timeout_s=settings.retrain_job_timeout_s)
    return Retrainer(store, executor, spec_factory(settings, access), policy=TrainingPolicy.from_settings(settings),
                     ground_truth_only=settings.retrain_ground_truth_only, **kwargs)
