"""Authorization for Label Studio: legacy tokens and personal access tokens.

Label Studio 1.23 has two kinds of API key. A legacy token is sent as
``Authorization: Token <key>``. A personal access token (PAT) is a JWT *refresh*
token: it is exchanged at ``POST /api/token/refresh/`` (``{"refresh": pat}`` ->
``{"access": jwt}``) for a short-lived access token sent as ``Bearer``; we exchange
again shortly before the access token's ``exp`` and whenever Label Studio answers 401.
The exchange goes only to Label Studio's own origin, through :class:`UrlPolicy`, which
also decides which requests :meth:`LabelStudioAuth.header` is attached to.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from datetime import datetime, timezone

import requests

from ml_backend.errors import ImageFetchError
from ml_backend.security.urls import UrlPolicy, describe, failure_reason

log = logging.getLogger(__name__)

REFRESH_PATH = "/api/token/refresh/"
EXPIRY_MARGIN_S = 30.0


def jwt_claims(token: str) -> dict | None:
    """The unverified claims of a JWT, or None when ``token`` is not one.

    Hand-written (four lines) rather than depending on PyJWT: we only read ``exp`` and
    ``token_type``; Label Studio verifies the signature, not us.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except ValueError:  # bad base64, bad UTF-8 and bad JSON are all ValueErrors
        return None
    return claims if isinstance(claims, dict) else None


class LabelStudioAuth:
    """The ``Authorization`` header for one Label Studio server and one API key; thread-safe.

    Pass :meth:`header` to :meth:`UrlPolicy.send` as ``authorization``: the policy calls it only
    for requests that may carry the token.
    """

    def __init__(self, policy: UrlPolicy, token: str, session: requests.Session, *, timeout_s: float) -> None:
        self._policy = policy
        self._token = token
        self._session = session
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._access: str | None = None
        self._access_exp: float = 0.0
        claims = jwt_claims(token)
        # A JWT that is not explicitly an access token is a PAT (refresh token).
        self._kind = "legacy" if claims is None else ("access" if claims.get("token_type") == "access" else "refresh")
        self._token_exp = float(claims["exp"]) if claims and isinstance(claims.get("exp"), (int, float)) else None

    @property
    def refreshable(self) -> bool:
        return self._kind == "refresh"

    def header(self) -> dict[str, str]:
        if self._kind == "legacy":
            return {"Authorization": f"Token {self._token}"}
        if self._kind == "access":
            return {"Authorization": f"Bearer {self._token}"}
        with self._lock:
            if self._access is None or time.time() > self._access_exp - EXPIRY_MARGIN_S:
                self._exchange()
            return {"Authorization": f"Bearer {self._access}"}

    def invalidate(self) -> None:
        """Forget the access token (after a 401) so the next header() exchanges again."""
        with self._lock:
            self._access = None

    def _exchange(self) -> None:
        if self._token_exp is not None and time.time() >= self._token_exp:
            expired = datetime.fromtimestamp(self._token_exp, timezone.utc).isoformat(timespec="seconds")
            raise ImageFetchError(
                f"the Label Studio personal access token expired at {expired}: create a new one and set LABEL_STUDIO_API_KEY"
            )
        target = self._policy.api_target(REFRESH_PATH)
        url = target.url
        try:
            response = self._policy.send(
                self._session, "POST", target, json={"refresh": self._token}, timeout=self._timeout_s
            )
        except requests.RequestException as exc:
            raise ImageFetchError(
                f"cannot reach Label Studio at {url} to exchange the personal access token ({failure_reason(exc)})"
            ) from exc
        with response:
            if response.status_code != 200:
                raise ImageFetchError(
                    f"Label Studio refused the personal access token (HTTP {response.status_code} from {url}): "
                    "check LABEL_STUDIO_API_KEY"
                )
            try:
                access = response.json()["access"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ImageFetchError(f"unexpected answer from {url}: no 'access' token in it") from exc
        if not isinstance(access, str) or not access:
            raise ImageFetchError(f"unexpected answer from {url}: no 'access' token in it")
        claims = jwt_claims(access) or {}
        exp = claims.get("exp")
        # Without an exp claim, re-exchange only on 401.
        self._access_exp = float(exp) if isinstance(exp, (int, float)) else float("inf")
        self._access = access
        log.debug("exchanged personal access token at %s", describe(url))
