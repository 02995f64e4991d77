"""Who may call the backend: the exposure rule at start-up, basic auth, and the webhook secret.

Rules (SECURITY.md):

* The backend refuses to start on a non-loopback ``HOST`` unless ``BASIC_AUTH_USER``/``BASIC_AUTH_PASS``
  are set or ``ALLOW_UNAUTHENTICATED=true`` says that serving without authentication is deliberate.
* With basic auth set, every route but ``/health`` and ``/ready`` (and ``/metrics`` with ``METRICS_PUBLIC=true``)
  needs the credentials, under a per-project prefix (``/projects/<id>/...``) too. The one exception is
  ``/webhook``, which also accepts a project's webhook secret in :data:`SECRET_HEADER`, for that
  project only: Label Studio 1.23.2 sends no credentials on the deliveries of the webhook it registers
  for the backend, so the backend adds that header to its own webhook (:mod:`ml_backend.webhook_secret`;
  the secrets are random per project, :mod:`ml_backend.security.secrets`).
* Only an authenticated caller may tell the backend where Label Studio is and which token to use
  (``/setup``'s ``hostname`` and ``access_token``); without basic auth no caller is authenticated,
  so ``LABEL_STUDIO_URL``/``LABEL_STUDIO_API_KEY`` must be set.

Credentials are compared as bytes with :func:`hmac.compare_digest`; a header that is not valid
base64 of UTF-8 ``user:password`` is simply not authenticated (401), never an error.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import re
from collections.abc import Mapping
from typing import Any

from ml_backend.errors import BackendError
from ml_backend.security.limits import project_id
from ml_backend.security.secrets import WebhookSecrets
from ml_backend.settings import Settings, SettingsError

SECRET_HEADER = "X-ML-Backend-Secret"
PUBLIC_PATHS = frozenset({"/health", "/ready"})  # states only, for Label Studio and healthchecks
WEBHOOK_PATH = "/webhook"
METRICS_PATH = "/metrics"  # public only with METRICS_PUBLIC=true (a Prometheus without credentials)
# A backend URL per project (``/projects/<id>/``, so Label Studio's calls carry the project): its routes
# follow the same rules as the plain ones.
_PROJECT_PREFIX = re.compile(r"^/projects/[0-9]+(?=/)")


def is_loopback(host: str) -> bool:
    """Whether gunicorn bound to ``host`` is reachable from this machine only."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_exposure(settings: Settings) -> None:
    """Refuse to serve an unauthenticated backend beyond loopback unless told so explicitly."""
    if is_loopback(settings.host) or settings.basic_auth or settings.allow_unauthenticated:
        return
    raise SettingsError(
        f"HOST={settings.host} makes the backend reachable from other machines, and without authentication "
        "anyone who reaches it can use Label Studio's token through it. Either set BASIC_AUTH_USER and "
        "BASIC_AUTH_PASS (and choose Basic Auth with the same user and password in Label Studio's model "
        "settings), or set ALLOW_UNAUTHENTICATED=true to serve without authentication on purpose "
        "(e.g. on a private network only Label Studio can reach). HOST=127.0.0.1 serves this machine only."
    )


def _equal(given: bytes, expected: str) -> bool:
    """Constant-time comparison with ``expected`` as UTF-8 or as Latin-1 bytes.

    requests (and so Label Studio) encodes basic-auth credentials as Latin-1, curl and browsers
    as UTF-8: a non-ASCII password must work from both.
    """
    encodings = [expected.encode("utf-8")]
    try:
        encodings.append(expected.encode("latin-1"))
    except UnicodeEncodeError:
        pass
    matches = [hmac.compare_digest(given, candidate) for candidate in encodings]
    return any(matches)


def basic_credentials(header: str | None) -> tuple[bytes, bytes] | None:
    """(user, password) bytes from an ``Authorization: Basic`` header; None when absent or malformed."""
    if not header:
        return None
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip().encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        return None
    user, colon, password = decoded.partition(b":")
    return (user, password) if colon else None


def route_path(path: str) -> str:
    """The route a path reaches: ``/projects/7/webhook`` is ``/webhook``."""
    return _PROJECT_PREFIX.sub("", path, count=1)


class Authenticator:
    """Decides, per request, whether the caller proved it is Label Studio (or its operator)."""

    def __init__(self, settings: Settings, secrets: WebhookSecrets | None = None) -> None:
        self.required = settings.basic_auth
        self.public = PUBLIC_PATHS | ({METRICS_PATH} if settings.metrics_public else set())
        self._user = settings.basic_auth_user
        self._password = settings.basic_auth_pass
        self.secrets = secrets if settings.basic_auth else None

    def basic(self, headers: Mapping[str, str]) -> bool:
        """Valid basic-auth credentials."""
        if not self.required:
            return False
        credentials = basic_credentials(headers.get("Authorization"))
        return credentials is not None and _equal(credentials[0], self._user) & _equal(credentials[1], self._password)

    def secret_project(self, path: str, headers: Mapping[str, str]) -> str | None:
        """On ``/webhook`` only (plain or under a project prefix): the project whose webhook secret the
        request carries, else None."""
        if route_path(path) != WEBHOOK_PATH or self.secrets is None:
            return None
        return self.secrets.project_of(headers.get(SECRET_HEADER))

    def may_pass(self, path: str, authenticated: bool) -> bool:
        """Whether the request may reach its view."""
        return authenticated or not self.required or route_path(path) in self.public


def check_webhook_project(secret_project: str | None, payload: Mapping[str, Any]) -> None:
    """A delivery let in by a project's secret must be about that project (403 otherwise): a member who
    reads one project's secret from Label Studio's webhook API cannot start work on another project."""
    if secret_project is None:
        return
    if project_id(payload.get("project")) != secret_project:
        raise BackendError(f"This webhook secret is project {secret_project}'s; the delivery names another "
                           "project.", status_code=403)
