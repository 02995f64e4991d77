"""Working folders that are removed after their writer died: each is held by an ``flock`` while in use.

A process killed mid-write (SIGKILL, OOM killer, a lost container) cannot clean up after itself;
the kernel releases its locks, though. So a folder whose lock can be taken is abandoned and can be
removed by anyone, while a folder still being written by a live process (another RQ worker sharing
``MODEL_DIR``) is left alone. Hand-written: ``tempfile`` has no notion of an abandoned folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_SUFFIX = ".held"


def _lock_path(folder: Path) -> Path:
    return folder.with_name(folder.name + LOCK_SUFFIX)


@contextlib.contextmanager
def held_folder(folder: Path, *, keep: bool = False) -> Iterator[Path]:
    """Create ``folder`` and hold it until the block ends; then remove it (unless ``keep`` or it was moved)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock_path(folder)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            folder.mkdir(exist_ok=False)
            yield folder
        finally:
            if not keep:
                shutil.rmtree(folder, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(lock)
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_abandoned(parent: Path) -> list[str]:
    """Remove the folders under ``parent`` whose holder is gone; the names removed."""
    if not parent.is_dir():
        return []
    removed = []
    for entry in sorted(parent.iterdir()):
        if entry.name.endswith(LOCK_SUFFIX) or not entry.is_dir():
            continue
        lock = _lock_path(entry)
        try:
            handle = open(lock, "a")
        except OSError:
            continue
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live process holds it
            try:
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock)
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    if removed:
        log.warning("removed %d abandoned folder(s) under %s: %s", len(removed), parent, ", ".join(removed))
    return removed
