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

import argparse
import logging
import sys

from ml_backend.command_line import settings_for_command

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ml_backend.sam3.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    args = parser.parse_args(argv)
    settings = settings_for_command(worker="SAM 3 worker")
    if settings is None:
        return 2
    from rq import Queue, SimpleWorker

    from ml_backend.errors import BackendError
    from ml_backend.retrain.jobs import redis_connection
    from ml_backend.sam3.rq_job import load_runtime
    from ml_backend.sam3.rq_jobs import QUEUE_NAME

    try:
        load_runtime(settings)
    except BackendError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    logger.info("SAM 3 worker on queue %s (PREANNOTATE=%s, SAM3_MODEL=%s)", QUEUE_NAME, settings.preannotate,
                settings.sam3_model)
    connection = redis_connection(settings.redis_url)
    worker = SimpleWorker([Queue(QUEUE_NAME, connection=connection)], connection=connection)
    worker.work(burst=args.burst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
