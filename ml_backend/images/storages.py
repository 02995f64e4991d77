"""A Label Studio project's local storage paths, as Label Studio lists them to the backend's token.

They decide which files on this disk a task of the project may be read from (the rule:
:mod:`ml_backend.security.local_files`). Listed with ``GET /api/storages/localfiles?project=<id>``
(Label Studio 1.23.2 answers one unpaged list; a paged answer, ``{"results": [...], "next": ...}``, is
followed too) and kept per Label Studio and project for ``STORAGES_TTL_S``: a storage added in Label
Studio is seen within that time. Failures are not kept, and they refuse the read (fail closed).
"""

from __future__ import annotations

import logging
import threading
import time

import requests

from ml_backend.images.auth import LabelStudioAuth
from ml_backend.security.local_files import LocalFileRefused
from ml_backend.security.urls import Target, UrlPolicy, URLRefused, failure_reason

log = logging.getLogger(__name__)

STORAGES_PATH = "/api/storages/localfiles"
STORAGES_TTL_S = 30.0
MAX_PROJECTS = 256  # (Label Studio, project) pairs kept at once
MAX_PAGES = 20
MAX_STORAGES = 1000  # paths kept for one project
TIMEOUT_S = 10.0


class ProjectStorages:
    """Thread-safe, bounded, short-lived cache of projects' local storage paths."""

    def __init__(self, *, ttl_s: float = STORAGES_TTL_S, max_projects: int = MAX_PROJECTS) -> None:
        self._ttl_s = ttl_s
        self._max_projects = max_projects
        self._kept: dict[tuple[str, int], tuple[tuple[str, ...], float]] = {}
        self._lock = threading.Lock()

    def paths(self, policy: UrlPolicy, session: requests.Session, auth: LabelStudioAuth | None,
              project: int) -> tuple[str, ...]:
        """Project ``project``'s local storage paths (possibly none); :class:`LocalFileRefused` when Label
        Studio cannot say."""
        key = (policy.label_studio_url, project)
        now = time.monotonic()
        with self._lock:
            kept = self._kept.get(key)
            if kept is not None and now - kept[1] < self._ttl_s:
                return kept[0]
        paths = _list(policy, session, auth, project)
        with self._lock:
            self._kept.pop(key, None)
            while len(self._kept) >= self._max_projects:
                self._kept.pop(next(iter(self._kept)))  # the oldest listing
            self._kept[key] = (paths, now)
        return paths


def _list(policy: UrlPolicy, session: requests.Session, auth: LabelStudioAuth | None,
          project: int) -> tuple[str, ...]:
    cannot = f"cannot check the local storages of project {project} in Label Studio, so no local file is read"
    try:
        target = policy.api_target(STORAGES_PATH)
    except URLRefused as exc:
        raise LocalFileRefused(f"{cannot}: {exc.message}") from exc
    paths: list[str] = []
    for page in range(1, MAX_PAGES + 1):
        params = {"project": project} if page == 1 else {"project": project, "page": page}
        answer = _get(policy, session, auth, target, params, cannot, project)
        items = answer.get("results") if isinstance(answer, dict) else answer
        if not isinstance(items, list):
            raise LocalFileRefused(f"{cannot}: its answer is not a list of storages")
        for item in items:
            if not isinstance(item, dict) or item.get("project", project) != project:
                continue  # not a storage of this project: never widens what it may read
            if isinstance(item.get("path"), str) and item["path"].strip() and len(paths) < MAX_STORAGES:
                paths.append(item["path"].strip())
        if not (isinstance(answer, dict) and answer.get("next")):
            log.debug("project %d: %d local storage(s)", project, len(paths))
            return tuple(paths)
    raise LocalFileRefused(f"{cannot}: it lists more than {MAX_PAGES} pages of storages")


def _get(policy: UrlPolicy, session: requests.Session, auth: LabelStudioAuth | None, target: Target,
         params: dict, cannot: str, project: int) -> object:
    for retry in (False, True):  # one retry after refreshing a personal access token
        try:
            response = policy.send(session, "GET", target, authorization=auth.header if auth else None,
                                   params=params, timeout=(TIMEOUT_S, TIMEOUT_S))
        except requests.RequestException as exc:
            raise LocalFileRefused(f"{cannot}: Label Studio cannot be reached ({failure_reason(exc)})") from None
        except URLRefused as exc:
            raise LocalFileRefused(f"{cannot}: {exc.message}") from exc
        with response:
            status = response.status_code
            if status == 401 and auth is not None and auth.refreshable and not retry:
                auth.invalidate()
                continue
            if status in (401, 403):
                raise LocalFileRefused(f"{cannot}: Label Studio refused the backend's token (HTTP {status}); check "
                                       "LABEL_STUDIO_API_KEY, or connect the backend from the project")
            if status == 404:
                raise LocalFileRefused(f"{cannot}: Label Studio has no project {project} that the "
                                       "backend's token can see (HTTP 404)")
            if status != 200:
                raise LocalFileRefused(f"{cannot}: Label Studio answered HTTP {status}; try again once it answers")
            try:
                return response.json()
            except ValueError:
                raise LocalFileRefused(f"{cannot}: Label Studio's answer is not JSON") from None
    raise LocalFileRefused(f"{cannot}: Label Studio refused the refreshed token (HTTP 401)")
