"""gunicorn settings and hooks (``--config python:ml_backend.gunicorn_hooks``, set by ``python -m ml_backend serve``).

Workers die with their master. A worker whose master was SIGKILLed (by the OOM killer, an
operator, a crashed supervisor) otherwise runs on unsupervised through its graceful shutdown:
it keeps the listening socket and holds the click in flight until that click finishes or the
graceful timeout passes, so the click hangs and the restarted master competes for the port.
With no master to report to, the orphan goes at once instead (tests/test_faults_serving.py).

When the master exits, the prompt state's folder in ``/dev/shm`` (memory) goes with it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
M_ARENA_MAX = -8  # <malloc.h>
MALLOC_ARENAS = 2

# gunicorn >= 25.1 opens a control socket at one path per user ($XDG_RUNTIME_DIR or ~/.gunicorn/gunicorn.ctl):
# backends (or test servers) on one host would overwrite each other's, and nothing here uses it.
# A setting in a config module, not a flag: older gunicorn ignores unknown names here but refuses unknown flags.
control_socket_disable = True


def post_fork(server, worker) -> None:
    """Ask the kernel to SIGKILL this worker when its master dies, and cap glibc's malloc arenas (Linux;
    elsewhere a no-op).

    The arenas: each of a worker's request threads otherwise gets its own malloc arena, and every arena
    keeps the pages of the images and masks its thread freed (megabytes per click), so a worker serving
    eight annotators grows by gigabytes that no cache setting accounts for. ``MALLOC_ARENA_MAX`` in the
    environment, when set, wins.
    """
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if "MALLOC_ARENA_MAX" not in os.environ and hasattr(libc, "mallopt"):
        libc.mallopt(M_ARENA_MAX, MALLOC_ARENAS)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        logger.warning("could not tie worker %d to its master (errno %d)", os.getpid(), ctypes.get_errno())
        return
    if os.getppid() != server.pid:  # the master died between fork and prctl
        os._exit(1)


def on_exit(server) -> None:
    """Remove the prompt state's ``/dev/shm`` folder (``ml_backend.prompt_state.files``)."""
    from ml_backend.prompt_state.files import remove_shm_directory
    from ml_backend.settings import Settings, SettingsError

    try:
        remove_shm_directory(Settings.from_env())
    except (OSError, SettingsError) as exc:
        logger.warning("could not remove the prompt state's folder: %s", exc)
