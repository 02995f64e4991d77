"""``python -m ml_backend.embeddings.worker``: an RQ worker that pre-encodes images into the shared store.

Loads SAM once (``SAM_MODEL``, ``SAM_DEVICE``: give it the GPU) and runs jobs in its own process
(RQ's ``SimpleWorker``: forking per job would reload SAM, and CUDA does not survive a fork).
Run one per GPU; all must mount the web replicas' ``EMBEDDING_STORE_DIR``.
``--with-training-worker`` also starts ``python -m ml_backend.retrain.worker`` beside it, and
``--with-sam3-worker`` ``python -m ml_backend.sam3.worker`` when ``PREANNOTATE`` is ``sam3`` or
``both`` (the compose file's GPU worker service runs all three); when one of them exits, so does
this process, so the container restarts them all.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading

from ml_backend.command_line import run_worker, settings_for_command, worker_arguments

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    parser = worker_arguments("python -m ml_backend.embeddings.worker", __doc__)
    parser.add_argument("--with-training-worker", action="store_true",
                        help="also run the training worker (python -m ml_backend.retrain.worker) beside this one")
    parser.add_argument("--with-sam3-worker", action="store_true",
                        help="also run the SAM 3 project worker (python -m ml_backend.sam3.worker) beside this one "
                             "when PREANNOTATE is sam3 or both")
    args = parser.parse_args(argv)
    settings = settings_for_command(worker="embedding worker")
    if settings is None:
        return 2
    if settings.embedding_store_mb <= 0:
        print("error: EMBEDDING_STORE_MB is 0; the embedding worker writes into the shared store", file=sys.stderr)
        return 2
    from ml_backend.embeddings.jobs import QUEUE_NAME, load_worker_context
    from ml_backend.retrain.jobs import redis_connection

    if args.with_training_worker:
        _start_child("ml_backend.retrain.worker", "training worker")
    if args.with_sam3_worker:
        if settings.preannotate == "trimap":
            logger.info("PREANNOTATE=trimap: no SAM 3 worker started")
        else:
            _start_child("ml_backend.sam3.worker", "SAM 3 worker")
    context = load_worker_context(settings)
    logger.info("embedding worker on queue %s, store %s", QUEUE_NAME, context.engine.store.directory)
    run_worker(QUEUE_NAME, redis_connection(settings.redis_url), burst=args.burst)
    return 0


def _start_child(module: str, name: str) -> None:
    """``python -m <module>`` as a child process; when it exits, so does this process (non-zero)."""
    import os

    child = subprocess.Popen([sys.executable, "-m", module])

    def watch() -> None:
        code = child.wait()
        logger.error("the %s exited with %s; stopping so the container restarts all workers", name, code)
        os._exit(1)

    threading.Thread(target=watch, name=f"{module}-watch", daemon=True).start()


if __name__ == "__main__":
    sys.exit(main())
