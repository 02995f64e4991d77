"""``python -m ml_backend.retrain.worker``: an RQ worker for training jobs, configured from the environment.

The same as ``rq worker --url $REDIS_URL sam-trimap-training``, with a clear error when
``REDIS_URL`` is missing and our log format. Run one per GPU; all must share ``MODEL_DIR``.
"""

from __future__ import annotations

import logging
import sys

from ml_backend.command_line import run_worker, settings_for_command, worker_arguments

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    from ml_backend.retrain.jobs import QUEUE_NAME, redis_connection

    args = worker_arguments("python -m ml_backend.retrain.worker", __doc__).parse_args(argv)
    settings = settings_for_command(worker="training worker")
    if settings is None:
        return 2
    logger.info("training worker on queue %s, models in %s", QUEUE_NAME, settings.model_dir)
    run_worker(QUEUE_NAME, redis_connection(settings.redis_url), burst=args.burst, fork=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
