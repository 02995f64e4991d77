"""Which files on this disk a task's image may be read from: only files Label Studio would serve the task's project.

Label Studio 1.23.2 serves ``/data/local-files/?d=<path>`` (``io_storages/localfiles/views.py``) as
``LOCAL_FILES_DOCUMENT_ROOT`` joined with ``normpath(d)`` stripped of leading slashes (``safe_join``: never
outside the root), and only when the file's folder is a local *import* storage's ``path`` or lies below it
(``/data/ds`` does not cover ``/data/ds-private``), for a storage of a project the requesting user may see.

The backend reads such files straight from disk, with a token that usually sees every project. So for a task
of project P the rule is narrower than "anything under the root": the file must lie inside one of **P's own**
local storages, as Label Studio lists them (``GET /api/storages/localfiles?project=P``). Both sides are
compared after resolving symbolic links and ``..`` (``realpath``) with whole path components
(``commonpath``): a link inside a storage that points out of it, a ``..`` and a name sharing a storage's
prefix are all refused (stricter than Label Studio, which compares the unresolved strings). A project with no
local storage may read no file from this disk.

The same rule covers the backend's own disk forms (``file:`` URLs and bare absolute paths) for a task of a
project: Label Studio serves neither, and a task must not reach a file through them that ``d=`` may not.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable
from pathlib import Path

from ml_backend.errors import ImageFetchError

__all__ = ["LocalFileRefused", "label_studio_local_path", "project_file"]

ADD_STORAGE = ("add a Local Files storage whose path holds the file to the project in Label Studio "
               "(project Settings > Cloud Storage > Add Source Storage; it need not be synced)")


class LocalFileRefused(ImageFetchError):
    """A disk read the task's project may not make (or that cannot be checked now); the message says why."""

    status_code = 403


def label_studio_local_path(d: str, document_root: str) -> str:
    """The path Label Studio reads for ``/data/local-files/?d=<d>`` (not yet checked: see :func:`project_file`)."""
    return os.path.join(document_root, posixpath.normpath(d).lstrip("/"))


def project_file(path: str, *, document_root: str, storages: Iterable[str], project: int, what: str) -> Path:
    """``path`` resolved, when it lies inside ``document_root`` and inside one of ``storages`` (project
    ``project``'s local storage paths, as Label Studio lists them); :class:`LocalFileRefused` otherwise.

    ``what`` names the image in messages (a described URL).
    """
    try:
        root = os.path.realpath(document_root)
        real = os.path.realpath(path)
        folders = [os.path.realpath(folder) for folder in storages if isinstance(folder, str) and os.path.isabs(folder)]
    except (OSError, ValueError) as exc:  # NUL bytes, unreadable components
        raise LocalFileRefused(f"{what}: unusable local path ({exc})") from exc
    if not _inside(real, root):
        raise LocalFileRefused(f"{what}: path is outside LOCAL_FILES_DOCUMENT_ROOT; refused")
    if not folders:
        raise LocalFileRefused(f"{what}: project {project} has no local storage in Label Studio, so its tasks may "
                               f"read no file from the backend's disk; {ADD_STORAGE}")
    if not any(_inside(real, folder) for folder in folders):
        raise LocalFileRefused(f"{what}: the file is not inside any local storage of project {project} (Label Studio "
                               f"serves a project's local files only from its own storages); {ADD_STORAGE}")
    return Path(real)


def _inside(path: str, folder: str) -> bool:
    """``path`` lies strictly below ``folder`` (both resolved and absolute), by whole path components."""
    return path != folder and os.path.commonpath([path, folder]) == folder
