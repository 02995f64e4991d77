"""The webhook secrets: random, one per project, stored privately under ``MODEL_DIR``, rotated by ``/setup``.

A webhook secret is readable back from Label Studio's webhook API by any member of the project's
organisation, so it must prove nothing beyond "a delivery for this project": it is never derived
from the basic-auth password (an HMAC of it let a member brute-force the password offline), and a
secret of one project never opens another's webhook (:meth:`WebhookSecrets.project_of`).

Stored in ``MODEL_DIR/webhook-secrets.json`` (mode 0600, written atomically under an ``flock`` on
a sibling lock file, so every worker process agrees): per project the current secret, the
previous one (still accepted until the current one is on Label Studio's webhook, so no delivery
is refused while rotating) and when the current one was made. An authenticated ``/setup`` rotates
a secret older than :data:`ROTATE_AFTER_S`; at most :data:`MAX_PROJECTS` projects are kept (the
least recently made go first).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from ml_backend.security.limits import project_id

FILE_NAME = "webhook-secrets.json"
ROTATE_AFTER_S = 24 * 3600.0
MAX_PROJECTS = 1000
SECRET_BYTES = 32


class WebhookSecrets:
    """The per-project webhook secrets of one installation (one ``MODEL_DIR``)."""

    def __init__(self, model_dir: Path, *, rotate_after_s: float = ROTATE_AFTER_S,
                 max_projects: int = MAX_PROJECTS) -> None:
        self.path = Path(model_dir) / FILE_NAME
        self.rotate_after_s = rotate_after_s
        self.max_projects = max_projects
        self._thread_lock = threading.Lock()
        self._cache: tuple[tuple[int, int], dict] | None = None

    # --- reading ------------------------------------------------------------------------
    def _read(self) -> dict:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return {}
        key = (stat.st_mtime_ns, stat.st_size)
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
            with os.fdopen(fd, "rb") as handle:
                data = json.loads(handle.read(1 << 20))
        except (OSError, ValueError):
            return {}
        projects = data.get("projects") if isinstance(data, dict) else None
        projects = projects if isinstance(projects, dict) else {}
        self._cache = (key, projects)
        return projects

    def project_of(self, given: str | None) -> str | None:
        """The project whose current or previous secret is ``given`` (constant-time per secret), else None."""
        if not given:
            return None
        try:
            given_bytes = given.encode("latin-1")
        except UnicodeEncodeError:
            return None
        found = None
        for project, entry in self._read().items():
            for name in ("secret", "previous"):
                value = entry.get(name) if isinstance(entry, dict) else None
                if isinstance(value, str) and hmac.compare_digest(given_bytes, value.encode("ascii")):
                    found = project
        return found

    # --- writing ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict]:
        """The projects, to change in place; written back atomically (0600) under the lock."""
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = self.path.with_suffix(".lock")
        with self._thread_lock:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                self._cache = None
                projects = dict(self._read())
                yield projects
                if len(projects) > self.max_projects:
                    oldest = sorted(projects, key=lambda p: projects[p].get("created", 0))
                    for project in oldest[: len(projects) - self.max_projects]:
                        del projects[project]
                temp = self.path.with_name(f".{FILE_NAME}.{os.getpid()}.tmp")
                out = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
                with os.fdopen(out, "w") as handle:
                    json.dump({"projects": projects}, handle)
                os.replace(temp, self.path)
                self._cache = None
            finally:
                os.close(fd)

    def current(self, project: object, *, rotate: bool = False) -> str:
        """``project``'s secret, made when missing; with ``rotate``, a new one when it is older than
        ``rotate_after_s`` (the old one stays accepted until :meth:`installed`)."""
        key = project_id(project)
        if key is None:
            raise ValueError(f"not a project id: {project!r:.40}")
        entry = self._read().get(key)
        if isinstance(entry, dict) and isinstance(entry.get("secret"), str) and not (
                rotate and time.time() - entry.get("created", 0) > self.rotate_after_s):
            return entry["secret"]
        with self._locked() as projects:
            entry = projects.get(key) if isinstance(projects.get(key), dict) else {}
            fresh = not isinstance(entry.get("secret"), str) or (
                rotate and time.time() - entry.get("created", 0) > self.rotate_after_s)
            if fresh:
                projects[key] = {"secret": secrets.token_hex(SECRET_BYTES), "previous": entry.get("secret"),
                                 "created": time.time()}
            return projects[key]["secret"]

    def installed(self, project: object, secret: str) -> None:
        """``secret`` is now on the project's webhook: the previous one is no longer accepted."""
        key = project_id(project)
        entry = self._read().get(key or "")
        if not isinstance(entry, dict) or entry.get("secret") != secret or entry.get("previous") is None:
            return
        with self._locked() as projects:
            entry = projects.get(key)
            if isinstance(entry, dict) and entry.get("secret") == secret:
                entry["previous"] = None
