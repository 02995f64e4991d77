"""Which ``Host`` a request may name: the defence against DNS rebinding.

A web page whose name rebinds to 127.0.0.1 can send same-origin requests to a backend on
loopback (JSON included: for the browser it is the page's own origin), and without basic auth
nothing else stops them. Such requests always carry the page's name in ``Host``. So every
request, before any work, must name a host the backend is really reached by:

* loopback names (``localhost``, ``127.0.0.1``, ``::1``, any 127/8 address);
* ``HOST`` itself (when it is not a wildcard such as ``0.0.0.0``);
* any IP literal: a page can only make a browser send ``Host: 10.0.0.5`` by being served from
  10.0.0.5 itself, so an address is never a rebinding;
* the names in ``BACKEND_HOSTNAMES`` (a reverse proxy's public name, compose's service name).

Hand-written (a few lines) because Flask's ``TRUSTED_HOSTS`` cannot say "any IP literal" and
answers with an HTML 400; ports are not compared (rebinding keeps the port).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable
from typing import Any

from ml_backend.settings import Settings

logger = logging.getLogger(__name__)

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def host_name(header: str | None) -> str:
    """The host of a ``Host`` header without its port, lower-case, IPv6 brackets removed ("" if absent)."""
    value = (header or "").strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else ""
    name = value.rsplit(":", 1)[0] if value.count(":") == 1 else value
    return name.rstrip(".")


def _is_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class HostPolicy:
    """Decides whether a request's ``Host`` names this backend."""

    def __init__(self, settings: Settings) -> None:
        names = set(LOOPBACK_NAMES) | {host_name(n) for n in settings.backend_hostnames}
        own = host_name(settings.host)
        if own and not _is_address(own):
            names.add(own)
        self.names = frozenset(names)

    def allowed(self, header: str | None) -> bool:
        name = host_name(header)
        return bool(name) and (name in self.names or _is_address(name))

    @staticmethod
    def refusal(header: str | None) -> str:
        shown = (header or "")[:80]
        return (f"Host {shown!r} is not a name this backend is served under (a DNS-rebinding page?). "
                "Call it by its address or a loopback name, or add the name to BACKEND_HOSTNAMES "
                "(e.g. the reverse proxy's or the compose service's name).")


def before_request(policy: HostPolicy) -> Callable[[], Any]:
    """A Flask ``before_request`` hook: 421 JSON for a foreign ``Host``, before auth and routing."""
    from flask import jsonify, request

    def guard() -> Any:
        header = request.headers.get("Host")
        if policy.allowed(header):
            return None
        logger.warning("%s %s refused: Host %r is not this backend's", request.method, request.path,
                       (header or "")[:80])
        return jsonify({"error": policy.refusal(header), "status": 421}), 421

    return guard
