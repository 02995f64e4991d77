"""gunicorn settings and hooks (``--config python:ml_backend.gunicorn_hooks``, set by ``python -m ml_backend serve``).

Workers die with their master. A worker whose master was SIGKILLed (by the OOM killer, an
operator, a crashed supervisor) otherwise runs on unsupervised through its graceful shutdown:
it keeps the listening socket and holds the click in flight until that click finishes or the
graceful timeout passes, so the click hangs and the restarted master competes for the port.
With no master to report to, the orphan goes at once instead (tests/test_faults_serving.py).

When the master exits, the prompt state's folder in ``/dev/shm`` (memory) goes with it.

Large torch tensors on transparent huge pages (torch's ``THP_MEM_ALLOC_ENABLE``, set for the workers
unless the environment sets it): a click's logits upsampled to the image's size (48 MB at 4000x3000)
are too large for malloc to keep between clicks, so each click maps them afresh, and on 4 KiB pages
that is ~12 000 page faults: 25-30 ms of a worker's CPU per click on a VM, a fifth of the whole click.
On 2 MiB pages it is a few hundred; peak memory did not grow (measured: docs/answer-path.md).

Prometheus metrics of several workers (:mod:`ml_backend.metrics`): the master makes a private folder and
names it in ``PROMETHEUS_MULTIPROC_DIR`` before forking any worker (a value inherited from the environment
is replaced: files left by another run would add its counts to ours); a worker's live gauges go when it
exits, and the folder when the master does.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import signal
import sys
import tempfile

logger = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
M_ARENA_MAX = -8  # <malloc.h>
MALLOC_ARENAS = 2

# gunicorn >= 25.1 opens a control socket at one path per user ($XDG_RUNTIME_DIR or ~/.gunicorn/gunicorn.ctl):
# backends (or test servers) on one host would overwrite each other's, and nothing here uses it.
# A setting in a config module, not a flag: older gunicorn ignores unknown names here but refuses unknown flags.
control_socket_disable = True


METRICS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's variable (ml_backend.metrics.MULTIPROC_ENV)
HUGE_PAGES_ENV = "THP_MEM_ALLOC_ENABLE"  # torch's CPU allocator: madvise(MADV_HUGEPAGE) on allocations >= 2 MiB


def huge_page_tensors() -> None:
    """Have torch put this process's (and its children's) large CPU tensors on transparent huge pages,
    unless the environment says otherwise. Takes effect only before torch's first allocation: torch reads
    the variable once."""
    os.environ.setdefault(HUGE_PAGES_ENV, "1")


def on_starting(server) -> None:
    """A private folder for the workers' metrics (mode 0700), and huge-page tensors, before the first fork."""
    huge_page_tensors()
    folder = tempfile.mkdtemp(prefix="sam-trimap-metrics-")
    if os.environ.get(METRICS_DIR_ENV):
        logger.info("%s=%s replaced by the backend's own %s", METRICS_DIR_ENV, os.environ[METRICS_DIR_ENV], folder)
    os.environ[METRICS_DIR_ENV] = folder
    logger.info("workers' metrics in %s", folder)


def child_exit(server, worker) -> None:
    """Drop the exited worker's live gauges (its counters stay counted)."""
    from prometheus_client import multiprocess

    folder = os.environ.get(METRICS_DIR_ENV)
    if folder:
        multiprocess.mark_process_dead(worker.pid, folder)


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
    """Remove the prompt state's ``/dev/shm`` folder (``ml_backend.prompt_state.files``) and the metrics folder."""
    if folder := os.environ.get(METRICS_DIR_ENV):  # first: the imports below take seconds on a busy machine
        shutil.rmtree(folder, ignore_errors=True)
    from ml_backend.prompt_state.files import remove_shm_directory
    from ml_backend.settings import Settings, SettingsError

    try:
        remove_shm_directory(Settings.from_env())
    except (OSError, SettingsError) as exc:
        logger.warning("could not remove the prompt state's folder: %s", exc)
