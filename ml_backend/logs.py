"""Logging set-up shared by the service and the command lines."""

from __future__ import annotations

import logging


def configure_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # urllib3 logs every request line at DEBUG, query string included: presigned URLs carry their
    # signature there, so its request log stays quiet even at LOG_LEVEL=DEBUG.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.INFO)
