"""What every command line (``serve``, the RQ workers) does first: read the settings, set up logging."""

from __future__ import annotations

import argparse
import sys

from ml_backend.logs import configure_logging
from ml_backend.settings import Settings, SettingsError


def settings_for_command(*, worker: str | None = None) -> Settings | None:
    """The settings from the environment with logging configured, or None once the reason is printed.

    ``worker`` names an RQ worker ("training worker"): it takes its jobs from Redis, so ``REDIS_URL``
    must be set. Callers exit with status 2 on None.
    """
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    if worker and not settings.redis_url:
        print(f"error: REDIS_URL is not set; the {worker} takes its jobs from Redis", file=sys.stderr)
        return None
    configure_logging(settings.log_level)
    return settings


def worker_arguments(prog: str, doc: str | None) -> argparse.ArgumentParser:
    """The arguments every RQ worker command takes (``--burst``); a worker adds its own to the parser."""
    parser = argparse.ArgumentParser(prog=prog, description=(doc or "").splitlines()[0] if doc else None)
    parser.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    return parser


def run_worker(queue_name: str, connection, *, burst: bool, fork: bool = False) -> None:
    """Take jobs from one RQ queue until stopped (with ``burst``, until it is empty).

    By default jobs run in this process (RQ's ``SimpleWorker``): a model loaded before the first job
    stays loaded, and CUDA does not survive a fork. ``fork`` runs each job in a child (RQ's ``Worker``),
    so a job's memory goes back to the system when it ends (the training worker)."""
    from rq import Queue, SimpleWorker, Worker

    worker_class = Worker if fork else SimpleWorker
    worker_class([Queue(queue_name, connection=connection)], connection=connection).work(burst=burst)
