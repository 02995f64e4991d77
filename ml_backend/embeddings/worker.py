"""``python -m ml_backend.embeddings.worker``: an RQ worker that pre-encodes images into the shared store.

Loads SAM once (``SAM_MODEL``, ``SAM_DEVICE``: give it the GPU) and runs jobs in its own process
(RQ's ``SimpleWorker``: forking per job would reload SAM, and CUDA does not survive a fork).
Run one per GPU; all must mount the web replicas' ``EMBEDDING_STORE_DIR``.
``--with-training-worker`` also starts ``python -m ml_backend.retrain.worker`` beside it (the
compose file's GPU worker service runs both) and exits when that one does, so the container
restarts both.
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import threading

from ml_backend.command_line import settings_for_command

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ml_backend.embeddings.worker", description=__doc__.splitlines()[0])
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    parser.add_argument("--with-training-worker", action="store_true",
                        help="also run the training worker (python -m ml_backend.retrain.worker) beside this one")
    args = parser.parse_args(argv)
    settings = settings_for_command(worker="embedding worker")
    if settings is None:
        return 2
    if settings.embedding_store_mb <= 0:
        print("error: EMBEDDING_STORE_MB is 0; the embedding worker writes into the shared store", file=sys.stderr)
        return 2
    from rq import Queue, SimpleWorker

    from ml_backend.embeddings.jobs import QUEUE_NAME, load_worker_context
    from ml_backend.retrain.jobs import redis_connection

    if args.with_training_worker:
        _start_training_worker()
    context = load_worker_context(settings)
    logger.info("embedding worker on queue %s, store %s", QUEUE_NAME, context.engine.store.directory)
    connection = redis_connection(settings.redis_url)
    worker = SimpleWorker([Queue(QUEUE_NAME, connection=connection)], connection=connection)
    worker.work(burst=args.burst)
    return 0


def _start_training_worker() -> None:
    """The training worker as a child process; when it exits, so does this process (non-zero)."""
    import os

    child = subprocess.Popen([sys.executable, "-m", "ml_backend.retrain.worker"])

    def watch() -> None:
        code = child.wait()
        logger.error("the training worker exited with %s; stopping so the container restarts both", code)
        os._exit(1)

    threading.Thread(target=watch, name="training-worker-watch", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
