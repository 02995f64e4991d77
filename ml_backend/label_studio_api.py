"""Read-only calls to Label Studio's REST API (exports, project configs, task lists).

Every call goes through :class:`~ml_backend.security.urls.UrlPolicy`: only to Label Studio's
own origin, only ``/api/`` paths built here, never following a redirect.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import requests

from ml_backend.errors import BackendError
from ml_backend.security.urls import UrlPolicy, URLRefused, failure_reason

CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 600.0  # Label Studio builds a large project's export while we wait
TASK_PAGE_SIZE = 100


@dataclass
class LabelStudioAccess:
    """Where Label Studio is and the token to reach it: from the settings, else from ``/setup``."""

    url: str = ""
    token: str = ""


class LabelStudioAPIError(BackendError):
    """Label Studio could not be reached or refused a request."""

    status_code = 502


def visible_project(url: str, token: str, project: int) -> dict:
    """Project ``project`` as Label Studio shows it to ``token``; a 404 naming it when Label Studio has no such
    project or the token cannot see it (nothing is queued for a project Label Studio does not vouch for)."""
    try:
        answer = api_get(url, token, f"/api/projects/{project}")
    except LabelStudioAPIError as exc:
        if "HTTP 404" in exc.message or "HTTP 403" in exc.message:
            raise BackendError(f"Label Studio has no project {project} that the backend's token can see.",
                               status_code=404) from exc
        raise
    if not isinstance(answer, dict) or answer.get("id") != project:
        raise BackendError(f"Label Studio's answer for project {project} is not that project.", status_code=502)
    return answer


def api_get(url: str, token: str, path: str, params: dict | None = None) -> Any:
    """GET ``path`` from Label Studio with a legacy token or a personal access token; the JSON answer."""
    return api_request(url, token, "GET", path, params=params)


def api_request(url: str, token: str, method: str, path: str, *, params: dict | None = None,
                json: Any = None) -> Any:
    """``method`` ``path`` (an ``/api/`` path) on Label Studio at ``url`` with ``token``; the JSON answer
    (None for an empty one). Any answer but 2xx, including a redirect, is a LabelStudioAPIError."""
    from ml_backend.images.auth import LabelStudioAuth

    if not url or not token:
        raise LabelStudioAPIError("Label Studio's URL and API token are unknown: set LABEL_STUDIO_URL and "
                                  "LABEL_STUDIO_API_KEY, or connect the backend from the project so /setup tells it.")
    try:
        policy = UrlPolicy(url)
        target = policy.api_target(path)
    except URLRefused as exc:
        raise LabelStudioAPIError(exc.message) from exc
    with policy.session() as session:
        try:
            auth = LabelStudioAuth(policy, token, session, timeout_s=CONNECT_TIMEOUT_S)
            response = policy.send(session, method, target, authorization=auth.header, params=params, json=json,
                                   timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S))
        except requests.RequestException as exc:
            raise LabelStudioAPIError(f"cannot reach Label Studio at {target.url}: {failure_reason(exc)}") from exc
        except BackendError as exc:
            raise LabelStudioAPIError(f"cannot reach Label Studio at {target.url}: {exc.message}") from exc
    if not 200 <= response.status_code < 300:
        raise LabelStudioAPIError(
            f"Label Studio answered HTTP {response.status_code} for {method} {target.url}: {response.text[:200]}")
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError as exc:
        raise LabelStudioAPIError(f"Label Studio's answer from {target.url} is not JSON") from exc


def iter_project_tasks(url: str, token: str, project: int, *, limit: int | None = None,
                       on_total: Callable[[int], None] | None = None) -> Iterator[dict]:
    """The project's tasks, page by page (one page in memory at a time), at most ``limit`` of them;
    ``on_total`` hears the count Label Studio announces."""
    page, served = 1, 0
    while limit is None or served < limit:
        answer = api_get(url, token, "/api/tasks", {"project": project, "page": page, "page_size": TASK_PAGE_SIZE})
        tasks = answer.get("tasks", []) if isinstance(answer, dict) else answer
        if not isinstance(tasks, list) or not tasks:
            return
        if on_total is not None and isinstance(answer, dict) and isinstance(answer.get("total"), int):
            on_total(answer["total"])
        for task in tasks:
            if limit is not None and served >= limit:
                return
            served += 1
            yield task
        total = answer.get("total") if isinstance(answer, dict) else None
        # Asking past the last page answers 404, so stop on a short page or at the announced total.
        if len(tasks) < TASK_PAGE_SIZE or (isinstance(total, int) and page * TASK_PAGE_SIZE >= total):
            return
        page += 1
