"""The webhook secret on Label Studio's side: added to the webhook Label Studio registered for us.

Label Studio 1.23.2 registers ``<backend url>/webhook`` when the backend is connected and sends
its deliveries without the basic-auth credentials it uses for ``/setup`` and ``/predict``. Its
webhooks carry custom ``headers``, so after an authenticated ``/setup`` the backend (holding the
token) finds that webhook (``GET /api/webhooks/?project=``; its URL's host is the one Label Studio
called ``/setup`` on) and adds :data:`~ml_backend.security.auth.SECRET_HEADER` with the project's
own secret (:class:`~ml_backend.security.secrets.WebhookSecrets`: random, rotated by ``/setup`` once
a day) (``PATCH /api/webhooks/{id}/``). The webhook is created only after Label Studio's first
``/setup`` succeeds, so the work runs in a background thread that tries a few times; later ``/setup``
calls (Label Studio sends many) try again until the current secret is installed. A failure is
logged with what to do by hand, never raised into ``/setup``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from urllib.parse import urlsplit

import requests

from ml_backend.errors import BackendError
from ml_backend.label_studio_api import api_get
from ml_backend.security.auth import SECRET_HEADER, WEBHOOK_PATH
from ml_backend.security.secrets import MAX_PROJECTS, WebhookSecrets
from ml_backend.security.urls import UrlPolicy

logger = logging.getLogger(__name__)

RETRY_DELAYS_S = (0.5, 2.0, 5.0, 15.0)
TIMEOUT_S = 10.0


def _ours(webhook: object, backend_host: str) -> bool:
    if not isinstance(webhook, dict) or not isinstance(webhook.get("url"), str):
        return False
    parts = urlsplit(webhook["url"])
    return parts.netloc.lower() == backend_host.lower() and parts.path.rstrip("/").endswith(WEBHOOK_PATH)


class WebhookSecretInstaller:
    """Puts each project's current secret on this backend's webhook in that project."""

    def __init__(self, secrets: WebhookSecrets, access: Callable[[], tuple[str, str]],
                 retry_delays_s: Sequence[float] = RETRY_DELAYS_S) -> None:
        self.secrets = secrets
        self.access = access  # () -> (Label Studio URL, token), as known now
        self.retry_delays_s = tuple(retry_delays_s)
        self._lock = threading.Lock()
        self._done: dict[tuple[str, str], str] = {}  # (project, host) -> the secret installed there
        self._running: set[tuple[str, str]] = set()

    def ensure(self, project: str, backend_host: str) -> None:
        """Rotate the project's secret when due, and install it in the background unless done or under way
        (returns at once)."""
        key = (project, backend_host.lower())
        secret = self.secrets.current(project, rotate=True)
        with self._lock:
            if self._done.get(key) == secret or key in self._running:
                return
            self._running.add(key)
            while len(self._done) > MAX_PROJECTS:  # bounded: forget the oldest
                self._done.pop(next(iter(self._done)))
        threading.Thread(target=self._run, args=(key, secret), name=f"webhook-secret-{project}", daemon=True).start()

    def _run(self, key: tuple[str, str], secret: str) -> None:
        project, host = key
        try:
            for delay in self.retry_delays_s:
                time.sleep(delay)
                try:
                    if self.install(project, host, secret):
                        self.secrets.installed(project, secret)
                        with self._lock:
                            self._done[key] = secret
                        return
                except (BackendError, requests.RequestException) as exc:
                    logger.warning("project %s: could not add the webhook secret yet: %s", project,
                                   getattr(exc, "message", exc))
            logger.warning("project %s: found no webhook to %s%s in Label Studio to add the secret header to; "
                           "webhook deliveries will be refused (401) until it has header %s (see SECURITY.md)",
                           project, host, WEBHOOK_PATH, SECRET_HEADER)
        finally:
            with self._lock:
                self._running.discard(key)

    def install(self, project: str, backend_host: str, secret: str) -> bool:
        """One attempt: True when this backend's webhook in ``project`` carries ``secret``."""
        url, token = self.access()
        hooks = api_get(url, token, "/api/webhooks/", {"project": project})
        ours = [hook for hook in hooks if _ours(hook, backend_host)] if isinstance(hooks, list) else []
        for hook in ours:
            headers = hook.get("headers") if isinstance(hook.get("headers"), dict) else {}
            if headers.get(SECRET_HEADER) == secret:
                continue
            self._patch(url, token, hook["id"], {**headers, SECRET_HEADER: secret})
            logger.info("project %s: webhook %s now carries the backend's secret header", project, hook["id"])
        return bool(ours)

    @staticmethod
    def _patch(url: str, token: str, hook_id: object, headers: dict) -> None:
        from ml_backend.images.auth import LabelStudioAuth

        if not isinstance(hook_id, int) or isinstance(hook_id, bool):
            raise BackendError(f"Label Studio listed a webhook without a numeric id ({hook_id!r:.40}).")
        policy = UrlPolicy(url)
        target = policy.api_target(f"/api/webhooks/{hook_id}/")
        with policy.session() as session:
            auth = LabelStudioAuth(policy, token, session, timeout_s=TIMEOUT_S)
            response = policy.send(session, "PATCH", target, authorization=auth.header, json={"headers": headers},
                                   timeout=TIMEOUT_S)
        if response.status_code != 200:
            raise BackendError(f"Label Studio answered HTTP {response.status_code} to PATCH {target.url}: "
                               f"{response.text[:200]}")
