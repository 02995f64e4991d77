"""``python -m ml_backend.sam3.worker``: an RQ worker that pre-annotates whole projects (queue ``sam-trimap-sam3``).

The web process enqueues a project when ``/preannotate`` (or ``TASKS_CREATED`` with ``SAM3_ON_IMPORT``)
asks and ``REDIS_URL`` is set; this worker runs :func:`ml_backend.sam3.job.run_project` on it, the same
loop as the web process's thread, and writes the predictions into Label Studio through its API with the
URL and token the job carries. It loads SAM 3 once, before taking jobs, and runs them in its own process
(RQ's ``SimpleWorker``: forking per job would reload SAM 3, and CUDA does not survive a fork). Give it the
same ``PREANNOTATE``, ``SAM3_*`` and ``MODEL_DIR`` as the web process: they decide the predictions and
their model version.
"""

from __future__ import annotations

import logging
import sys

from ml_backend.command_line import run_worker, settings_for_command, worker_arguments

logger = logging.getLogger(__name__)

LOAD_WAIT_S = 3600.0  # a worker waits this long for SAM 3 to load (a large checkpoint converted on a slow disk)


def build_runtime(settings):
    """This worker's runtime, SAM 3 loaded (raises the loader's error), serving the backend's predictions."""
    from ml_backend.backend import serve_project_jobs
    from ml_backend.runtime import Runtime

    runtime = Runtime(settings)
    serve_project_jobs(runtime)
    if runtime.sam3 is not None:
        runtime.sam3.start_loading()
        runtime.sam3.engine(LOAD_WAIT_S)  # raises the loader's error
    if runtime.concepts is None and settings.trimap_sam_refine:
        runtime.start_loading_sam()  # PREANNOTATE=trimap refines its masks with SAM
    return runtime


def main(argv: list[str] | None = None) -> int:
    args = worker_arguments("python -m ml_backend.sam3.worker", __doc__).parse_args(argv)
    settings = settings_for_command(worker="SAM 3 worker")
    if settings is None:
        return 2
    from ml_backend.errors import BackendError
    from ml_backend.retrain.jobs import redis_connection
    from ml_backend.sam3.rq_job import install_runtime
    from ml_backend.sam3.rq_jobs import QUEUE_NAME

    try:
        install_runtime(build_runtime(settings))
    except BackendError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    logger.info("SAM 3 worker on queue %s (PREANNOTATE=%s, SAM3_MODEL=%s)", QUEUE_NAME, settings.preannotate,
                settings.sam3_model)
    run_worker(QUEUE_NAME, redis_connection(settings.redis_url), burst=args.burst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
