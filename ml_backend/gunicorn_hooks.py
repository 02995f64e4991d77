"""gunicorn server hooks (``--config python:ml_backend.gunicorn_hooks``, set by ``python -m ml_backend serve``).

A worker whose master was SIGKILLed (by the OOM killer, an operator, a crashed supervisor)
would otherwise finish its graceful shutdown first: it keeps the listening socket for up to
the graceful timeout while a click downloads or encodes, so the restarted master cannot bind
the port and gives up. Nothing supervises an orphaned worker, so it goes at once instead.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def post_fork(server, worker) -> None:
    """Ask the kernel to SIGKILL this worker when its master dies (Linux; elsewhere a no-op)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        logger.warning("could not tie worker %d to its master (errno %d)", os.getpid(), ctypes.get_errno())
        return
    if os.getppid() != server.pid:  # the master died between fork and prctl
        os._exit(1)
