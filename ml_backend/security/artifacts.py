"""Which files under ``MODEL_DIR`` the dashboard may send: a version's plots, named by an allowlist.

A request names a project (an int, from the route), a version id and a file name. The version id must
look like the ids :meth:`training.store.ModelStore.new_version_id` makes (letters, digits and dashes:
no ``/``, no ``..``, no leading dot), the name must be one of :data:`ARTIFACTS`, and the resolved path
(symbolic links followed) must still lie inside that project's ``versions`` folder. Anything else is
"no such file" (404), whatever the reason, so a probe learns nothing about the disk.
"""

from __future__ import annotations

import re
from pathlib import Path

from ml_backend.errors import BackendError

ARTIFACTS = {"curves.png": "training curves", "predictions.png": "validation overlays"}
_VERSION_ID = re.compile(r"^[0-9A-Za-z][0-9A-Za-z-]{0,63}$")


class ArtifactNotFound(BackendError):
    status_code = 404


def version_artifact(store_root: Path, version: str, name: str) -> Path:
    """The file ``name`` of ``version`` in the store at ``store_root``; :class:`ArtifactNotFound` otherwise."""
    missing = ArtifactNotFound(f"No {name[:40]!r} for version {version[:64]!r} here.")
    if name not in ARTIFACTS or not _VERSION_ID.fullmatch(version):
        raise missing
    versions = (store_root / "versions").resolve()
    try:
        path = (versions / version / name).resolve(strict=True)
    except (OSError, RuntimeError):  # absent, or a link loop
        raise missing from None
    if not path.is_relative_to(versions) or not path.is_file():
        raise missing
    return path
