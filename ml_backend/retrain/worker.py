"""``python -m ml_backend.retrain.worker``: an RQ worker for training jobs, configured from the environment.

The same as ``rq worker --url $REDIS_URL sam-trimap-training``, with a clear error when
``REDIS_URL`` is missing and our log format. Run one per GPU; all must share ``MODEL_DIR``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ml_backend.command_line import settings_for_command

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    from ml_backend.retrain.jobs import QUEUE_NAME

    parser = argparse.ArgumentParser(prog="python -m ml_backend.retrain.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    args = parser.parse_args(argv)
    settings = settings_for_command(worker="training worker")
    if settings is None:
        return 2
    from rq import Queue, Worker

    from ml_backend.retrain.jobs import redis_connection

    connection = redis_connection(settings.redis_url)
    worker = Worker([Queue(QUEUE_NAME, connection=connection)], connection=connection)
    logger.info("training worker on queue %s, models in %s", QUEUE_NAME, settings.model_dir)
    worker.work(burst=args.burst)
    return 0


if __name__ == "__main__":
    sys.exit(main())
