"""What every command line (``serve``, the RQ workers) does first: read the settings, set up logging."""

from __future__ import annotations

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
