"""Where a URL goes, and whether it may carry Label Studio's token.

The backend holds a Label Studio API key, often an administrator's. Every HTTP request it
makes (task images, the personal-access-token exchange, the REST calls behind exports and
warm-up) is classified, prepared and sent through :class:`UrlPolicy`; nothing else decides.

Rules:

1. **One parser.** URLs are parsed with urllib3's ``parse_url``, the parser requests and
   urllib3 use to choose the host they connect to, so what is checked is what is connected
   to. Refused before anything else: a backslash, whitespace or a control character anywhere,
   user info (``user@``, ``user:password@``), a non-ASCII host (write IDNs as ``xn--``), a
   percent sign in the host (IPv6 zone ids), a numeric host that is not a plain dotted quad
   (``2130706433``, ``0x7f.1``, ``0177.0.0.1``, ``127.1``), a scheme other than http/https,
   and URLs over ``MAX_URL_CHARS``. (``data:``, ``file:`` and bare paths never reach the
   network: :mod:`ml_backend.images.sources` reads them; cloud URIs become a resolve URL.)
2. **The token goes only to Label Studio's origin**, the scheme, host and port of
   ``LABEL_STUDIO_URL`` (or ``/setup``'s hostname) exactly as written (``127.0.0.1`` and
   ``localhost`` are different origins), and **only for the paths that serve task media**,
   checked after decoding percent-escapes, with ``.``/``..`` segments, double encoding and
   backslashes refused (below ``LABEL_STUDIO_URL``'s own path when it has one):
   ``/data/upload/<file>``, ``/data/local-files/?d=<path>``,
   ``/storage-data/uploaded/?filepath=<path>``, and ``/tasks/<id>/resolve/?fileuri=...``,
   ``/projects/<id>/resolve/?fileuri=...`` with their older ``/presign/`` aliases. An image URL
   naming another Label Studio path (``/api/...``, ``/user/...``) is refused without a request.
   The backend's own REST calls (:meth:`UrlPolicy.api_target`) take ``/api/`` paths built by
   code, never from a task, and go only to Label Studio's origin.
3. **Other hosts** must be listed in ``ALLOWED_HOSTS`` (``host`` or ``*.domain``) to be named
   by a task. A listed host may be on a private network (listing it trusts its DNS). It never
   gets the token.
4. **Redirects** are never followed by the HTTP client; each hop is re-checked by
   :meth:`UrlPolicy.redirect_target`: Label Studio media -> Label Studio media (with the
   token); Label Studio's resolve/presign endpoint -> any host (the presigned cloud URL it
   chose), without the token; such a presigned hop -> its own origin; any hop -> a listed host,
   without the token. Everything else is refused, including a hop into Label Studio from
   another origin.
5. **Addresses.** A connection to a host that is neither Label Studio's origin nor listed must
   reach a public address. The check is made on the socket's peer address right after it
   connects (``getpeername``), so DNS that answers differently between a check and the
   connection (rebinding) cannot pass. Not public: loopback, RFC 1918, carrier-grade NAT,
   link-local, unique- and site-local, multicast, unspecified, reserved, documentation and
   benchmarking ranges, and IPv6 forms embedding such an IPv4 address (IPv4-mapped, 6to4,
   Teredo, NAT64).
6. **Sending.** Sessions ignore proxies and ``.netrc`` from the environment and keep no
   cookies; the prepared request is re-parsed just before it is sent (its origin and path must
   still be the checked ones) and the token is attached only then.
7. **Messages.** URLs in errors and logs go through :func:`describe`: no user info, no query
   string except the ``d=``/``fileuri=``/``filepath=`` of Label Studio's media forms
   (presigned URLs carry their signature in the query), no control characters.
"""

from __future__ import annotations

import http.cookiejar
import ipaddress
import re
import unicodedata
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urljoin, urlsplit, urlunsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import LocationParseError, NameResolutionError, NewConnectionError
from urllib3.util import Url, parse_url

from ml_backend.errors import ImageFetchError

__all__ = [
    "LABEL_STUDIO_API", "LABEL_STUDIO_MEDIA", "LISTED_HOST", "MAX_URL_CHARS", "PRESIGNED", "Origin", "Target",
    "URLRefused", "UrlPolicy", "check_characters", "clean_path", "describe", "failure_reason", "host_allowed",
    "is_public_address", "literal_address", "parse_http_url", "parse_label_studio_url",
]

MAX_URL_CHARS = 8192
DEFAULT_PORTS = {"http": 80, "https": 443}
USER_AGENT = "sam-trimap-backend (Label Studio ML backend)"

# Routes a request may take (Target.route).
LABEL_STUDIO_MEDIA = "Label Studio media"
LABEL_STUDIO_API = "Label Studio API"
LISTED_HOST = "ALLOWED_HOSTS"
PRESIGNED = "presigned URL from Label Studio"

# Label Studio 1.23's media routes (data_import/urls.py, io_storages/urls.py), below its base path:
# (path pattern, query parameter that must be present, is a storage resolve/presign endpoint).
_MEDIA_ROUTES: tuple[tuple[re.Pattern[str], str | None, bool], ...] = (
    (re.compile(r"/data/upload/[^/].*", re.DOTALL), None, False),
    (re.compile(r"/data/local-files/?"), "d", False),
    (re.compile(r"/storage-data/uploaded/?"), "filepath", False),
    (re.compile(r"/(?:tasks|projects)/[0-9]+/(?:resolve|presign)/?"), "fileuri", True),
)
# describe() keeps these query parameters of Label Studio's media forms; nothing else.
_KEPT_PARAMS = {"local-files": "d", "uploaded": "filepath", "resolve": "fileuri", "presign": "fileuri"}
_DATA_HEADER = re.compile(r"data:[A-Za-z0-9.+/;=-]*", re.IGNORECASE)
_SCHEME_AUTHORITY = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://([^/?#]*)")
_HOST_NAME = re.compile(r"[a-z0-9_-][a-z0-9._-]*")
_NUMERIC_LABEL = re.compile(r"[0-9]+|0x[0-9a-f]*")
_NAT64 = (ipaddress.IPv6Network("64:ff9b::/96"), ipaddress.IPv6Network("64:ff9b:1::/48"))
# Special-purpose ranges that Python 3.11's is_global still calls global.
_SPECIAL_IPV4 = (ipaddress.IPv4Network("192.0.0.0/24"), ipaddress.IPv4Network("192.88.99.0/24"))
_REFUSED_CATEGORIES = {"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"}


class URLRefused(ImageFetchError):
    """A URL the backend will not request, or not with the token; the message says why."""


@dataclass(frozen=True)
class Origin:
    """Where a connection goes: scheme, lower-case host (IPv6 without brackets), port."""

    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, parsed: Url) -> Origin:
        scheme = parsed.scheme or ""
        return cls(scheme, (parsed.host or "").strip("[]").lower(), parsed.port or DEFAULT_PORTS.get(scheme, 0))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@dataclass(frozen=True)
class Target:
    """A checked request target: the URL to send, where it connects, and which rule admitted it.

    Only ``label_studio`` targets (media paths, or the backend's own API calls) get the token.
    """

    url: str
    origin: Origin
    route: str
    presign_endpoint: bool = False  # Label Studio's resolve/presign: may redirect to a cloud host
    local_file: str | None = None  # the d= of a local-files URL: the loader may read it from disk

    @property
    def label_studio(self) -> bool:
        return self.route in (LABEL_STUDIO_MEDIA, LABEL_STUDIO_API)


@dataclass(frozen=True)
class _Media:
    presign: bool
    local_file: str | None


# --- parsing -------------------------------------------------------------------------------


def parse_http_url(url: str) -> Url:
    """``url`` parsed by urllib3 (as requests will connect), after every rule-1 refusal.

    Raises:
        URLRefused: naming the URL (via :func:`describe`) and the reason.
    """
    if not isinstance(url, str):
        raise URLRefused(f"not a URL: {type(url).__name__}")
    if len(url) > MAX_URL_CHARS:
        raise URLRefused(f"{describe(url)}: URL longer than {MAX_URL_CHARS:,} characters; refused")
    check_characters(url)
    match = _SCHEME_AUTHORITY.match(url)
    if match is None or match.group(1).lower() not in DEFAULT_PORTS:
        raise URLRefused(
            f"{describe(url)}: unsupported URL (only absolute http(s) URLs are requested; an image may also be "
            "a data: URI, a file: URL or a Label Studio path)"
        )
    authority = match.group(2)
    if not authority.isascii():
        raise URLRefused(f"{describe(url)}: non-ASCII host name; write it in its xn-- (punycode) form")
    try:
        parsed = parse_url(url)
    except (LocationParseError, ValueError) as exc:
        # from None: the parser's message quotes the whole URL, query string included
        raise URLRefused(f"{describe(url)}: malformed URL ({type(exc).__name__})") from None
    if "@" in authority or parsed.auth is not None:
        raise URLRefused(f"{describe(url)}: user info (user@ or user:password@) in a URL is refused")
    if not parsed.host:
        raise URLRefused(f"{describe(url)}: no host in the URL")
    _check_host(parsed.host, url)
    if parsed.port == 0:
        raise URLRefused(f"{describe(url)}: port 0 is not a port")
    return parsed


def check_characters(url: str) -> None:
    """Refuse backslashes, whitespace and control/format/unassigned characters anywhere in ``url``.

    Parsers disagree on all of them (a backslash ends the authority for browsers and
    ``urlsplit`` but not for urllib3; ``urlsplit`` silently drops tabs and newlines).
    """
    for char in url:
        if char == "\\":
            raise URLRefused(f"{describe(url)}: backslash in a URL is refused (use / or %5C)")
        if char.isspace() or unicodedata.category(char) in _REFUSED_CATEGORIES:
            raise URLRefused(f"{describe(url)}: whitespace or control character in a URL is refused (escape it)")


def _check_host(host: str, url: str) -> None:
    if host.startswith("["):
        if "%" in host:
            raise URLRefused(f"{describe(url)}: IPv6 zone ids are refused")
        return  # parse_url has validated the address
    if "%" in host or not _HOST_NAME.fullmatch(host):
        raise URLRefused(f"{describe(url)}: host {host!r} is not a plain host name or address")
    labels = host.rstrip(".").split(".")
    if all(_NUMERIC_LABEL.fullmatch(label) for label in labels):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise URLRefused(
                f"{describe(url)}: numeric host {host!r} is not a dotted-quad IPv4 address "
                "(decimal, octal, hex and short forms are refused)"
            ) from None


def _raw_path_query(url: str) -> tuple[str, str]:
    """The path and query exactly as written (no dot-segment removal, no decoding)."""
    match = _SCHEME_AUTHORITY.match(url)
    rest = url[match.end() :] if match else url
    rest = rest.split("#", 1)[0]
    path, _, query = rest.partition("?")
    return path, query


def clean_path(raw_path: str) -> str | None:
    """The percent-decoded path, or None when it holds a ``.``/``..`` segment (plain or
    escaped), double encoding, a backslash, a control character or invalid UTF-8."""
    try:
        decoded = unquote(raw_path, errors="strict")
    except UnicodeDecodeError:
        return None
    if unquote(decoded) != decoded or "\\" in decoded or not decoded.isprintable():
        return None
    if any(segment in (".", "..") for segment in decoded.split("/")):
        return None
    return decoded


# --- addresses and hosts -------------------------------------------------------------------


def is_public_address(address: str) -> bool:
    """True for a globally routable unicast address; False for everything rule 5 lists, and for
    text that is not an address."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = [ip.ipv4_mapped, ip.sixtofour, ip.teredo[1] if ip.teredo else None]
        if any(ip in network for network in _NAT64):
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if any(inner is not None and not is_public_address(str(inner)) for inner in embedded):
            return False
        if ip.is_site_local:
            return False
    elif any(ip in network for network in _SPECIAL_IPV4):
        return False
    return ip.is_global and not (
        ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved or ip.is_unspecified
    )


def literal_address(host: str) -> str | None:
    """``host`` when it is an IP address literal (IPv6 with or without brackets), else None."""
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


def host_allowed(host: str, patterns: Iterable[str]) -> bool:
    """True when ``host`` equals a pattern or matches a ``*.domain`` pattern (any depth below it)."""
    host = host.lower().strip("[]").rstrip(".")
    for pattern in patterns:
        pattern = pattern.lower().strip("[]").rstrip(".")
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]):
                return True
        elif host == pattern:
            return True
    return False


def parse_label_studio_url(url: str) -> tuple[Origin, str]:
    """Label Studio's origin and base path (``""`` or ``/prefix``) from ``LABEL_STUDIO_URL`` or
    ``/setup``'s hostname: an http(s) URL with no user info, query or fragment.

    Raises:
        URLRefused: "the Label Studio URL ...: <reason>".
    """
    try:
        parsed = parse_http_url(url)
    except URLRefused as exc:
        raise URLRefused(f"the Label Studio URL {exc.message}") from exc
    path, query = _raw_path_query(url)
    if query or "#" in url:
        raise URLRefused(f"the Label Studio URL {describe(url)} must not hold a query string or a fragment")
    base = clean_path(path)
    if base is None:
        raise URLRefused(f"the Label Studio URL {describe(url)} has an unusable path")
    return Origin.of(parsed), base.rstrip("/")


# --- messages ------------------------------------------------------------------------------


def describe(url: object, *, limit: int = 160) -> str:
    """A short, secret-free name for ``url`` in messages and logs (rule 7); never raises."""
    if not isinstance(url, str):
        return f"<{type(url).__name__}>"
    text = "".join(char if char.isprintable() else char.encode("unicode_escape").decode() for char in url[:4096])
    if text[:5].lower() == "data:":  # the media type and parameters only, never the payload
        return _DATA_HEADER.match(text).group(0)[:limit] + ",..."
    text = re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*:)?//[^/?#]*@", lambda m: (m.group(1) or "") + "//***@", text)
    try:
        parts = urlsplit(text)
        query = _kept_query(parts.path, parts.query)
        text = urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))
    except ValueError:  # e.g. a broken IPv6 literal: keep what precedes any query
        text = text.split("?", 1)[0].split("#", 1)[0]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def failure_reason(exc: BaseException) -> str:
    """Why a request failed, in words that quote no URL (requests' own messages quote the whole
    URL, presigned query included)."""
    causes: list[object] = [exc]
    for cause in causes:  # grows while iterated: requests wraps urllib3's errors two or three deep
        if len(causes) > 16:
            break
        causes.extend(arg for arg in getattr(cause, "args", ()) if isinstance(arg, BaseException))
        causes.extend(c for c in (getattr(cause, "reason", None), getattr(cause, "__cause__", None)) if c is not None)
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS error (certificate or handshake)"
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if any(isinstance(cause, NameResolutionError) for cause in causes):
        return "host name not found"
    if any(isinstance(cause, NewConnectionError) for cause in causes):
        return "connection refused or host unreachable"
    if isinstance(exc, requests.ConnectionError):
        return "connection failed or closed early"
    return type(exc).__name__


def _kept_query(path: str, query: str) -> str:
    if not query:
        return ""
    last = path.rstrip("/").rsplit("/", 1)[-1].lower()
    param = _KEPT_PARAMS.get(last)
    kept = [pair for pair in query.split("&") if param and pair.split("=", 1)[0] == param]
    if len(kept) == len(query.split("&")):
        return "&".join(kept)
    return "&".join([*kept, "..."])


# --- the policy ----------------------------------------------------------------------------


class UrlPolicy:
    """The rules for one Label Studio URL and one ``ALLOWED_HOSTS`` list (see the module docstring).

    ``label_studio_url`` may be empty (unknown): then nothing carries a token and Label
    Studio paths are refused with a message saying how to set it.
    """

    def __init__(self, label_studio_url: str = "", allowed_hosts: Iterable[str] = ()) -> None:
        self.allowed_hosts = tuple(host.lower() for host in allowed_hosts if host)
        self.label_studio_url = label_studio_url.strip().rstrip("/")
        self.label_studio: Origin | None = None
        self._base_path = ""
        if self.label_studio_url:
            self.label_studio, self._base_path = parse_label_studio_url(self.label_studio_url)

    # --- classification ---

    def absolute(self, url: str) -> str:
        """``url`` with a Label Studio-relative path (``/data/...``) prefixed by Label Studio's URL."""
        if url.startswith("/") and not url.startswith("//"):
            if not self.label_studio_url:
                raise URLRefused(
                    f"{describe(url)}: a Label Studio path, but the Label Studio URL is unknown: set LABEL_STUDIO_URL "
                    "(or connect the backend from Label Studio, whose /setup call provides it)"
                )
            return self.label_studio_url + url
        return url

    def image_target(self, url: str) -> Target:
        """Where a task's image URL (absolute, or relative to Label Studio) may be fetched from.

        Raises:
            URLRefused: for everything rules 1-3 refuse.
        """
        absolute = self.absolute(url)
        origin = Origin.of(parse_http_url(absolute))
        if origin == self.label_studio:
            media = self._media(*_raw_path_query(absolute))
            if media is None:
                raise URLRefused(
                    f"{describe(url)}: not one of Label Studio's media paths (/data/upload/..., "
                    "/data/local-files/?d=..., /storage-data/uploaded/?filepath=..., /tasks/<id>/resolve/?fileuri=...); "
                    "the backend fetches no other Label Studio page"
                )
            return Target(absolute, origin, LABEL_STUDIO_MEDIA, media.presign, media.local_file)
        if self.listed(origin.host):
            return Target(absolute, origin, LISTED_HOST)
        raise URLRefused(
            f"{describe(url)}: host {origin.host!r} is neither Label Studio's "
            f"({self.label_studio or 'LABEL_STUDIO_URL unset'}) nor in ALLOWED_HOSTS; refused"
        )

    def redirect_target(self, current: Target, location: str) -> Target:
        """The next hop when ``current`` answers a redirect to ``location`` (rule 4).

        Raises:
            URLRefused: "redirect to <target> refused: <reason>".
        """
        if not isinstance(location, str) or not location:
            raise URLRefused("redirect without a Location")
        try:
            check_characters(location)
            absolute = urljoin(current.url, location)
            origin = Origin.of(parse_http_url(absolute))
        except URLRefused as exc:
            raise URLRefused(f"redirect refused: {exc.message}") from exc
        except ValueError:  # urljoin on a malformed IPv6 literal
            raise URLRefused(f"redirect to {describe(location)} refused: malformed URL") from None
        what = f"redirect to {describe(absolute)} refused"
        if origin == self.label_studio:
            if current.route != LABEL_STUDIO_MEDIA:
                raise URLRefused(f"{what}: only Label Studio may redirect into Label Studio")
            media = self._media(*_raw_path_query(absolute))
            if media is None:
                raise URLRefused(f"{what}: not a Label Studio media path")
            return Target(absolute, origin, LABEL_STUDIO_MEDIA, media.presign, media.local_file)
        if self.listed(origin.host):
            return Target(absolute, origin, LISTED_HOST)
        if current.presign_endpoint or (current.route == PRESIGNED and origin == current.origin):
            literal = literal_address(origin.host)
            if literal is not None and not is_public_address(literal):
                raise URLRefused(f"{what}: {literal} is not a public address (list it in ALLOWED_HOSTS to allow it)")
            return Target(absolute, origin, PRESIGNED)
        raise URLRefused(f"{what}: host {origin.host!r} is not in ALLOWED_HOSTS")

    def api_target(self, path: str) -> Target:
        """Label Studio's REST endpoint ``path`` (``/api/...``, built by code; query via ``params``)."""
        if self.label_studio is None:
            raise URLRefused(
                "Label Studio's URL is unknown: set LABEL_STUDIO_URL, or connect the backend from the project "
                "so /setup tells it"
            )
        if not path.startswith("/api/") or "?" in path or "#" in path or clean_path(path) is None:
            raise URLRefused(f"{describe(path)}: not a Label Studio API path")
        absolute = self.label_studio_url + path
        return Target(absolute, Origin.of(parse_http_url(absolute)), LABEL_STUDIO_API)

    def relative_local_file(self, url: str) -> str | None:
        """The ``d=`` of a local-files URL relative to Label Studio (``/data/local-files/?d=...``), which
        the loader may read from disk with no request and no Label Studio URL; None for anything else."""
        if not url.startswith("/") or url.startswith("//"):
            return None
        media = self._media(*_raw_path_query(url), relative=True)
        return media.local_file if media is not None else None

    def listed(self, host: str) -> bool:
        return host_allowed(host, self.allowed_hosts)

    def _media(self, raw_path: str, query: str, *, relative: bool = False) -> _Media | None:
        path = clean_path(raw_path)
        if path is None:
            return None
        if self._base_path and not relative:
            if not path.startswith(self._base_path + "/"):
                return None
            path = path[len(self._base_path) :]
        for pattern, param, presign in _MEDIA_ROUTES:
            if pattern.fullmatch(path):
                if param is None:
                    return _Media(presign, None)
                values = parse_qs(query).get(param)
                if not values or not values[0]:
                    return None
                return _Media(presign, values[0] if param == "d" else None)
        return None

    # --- connecting and sending ---

    def check_peer(self, scheme: str, host: str, port: int | None, address: str) -> None:
        """Rule 5, for a socket just connected to ``address`` for ``scheme://host:port``."""
        origin = Origin(scheme, host.strip("[]").lower(), port or DEFAULT_PORTS.get(scheme, 0))
        if origin == self.label_studio or self.listed(origin.host):
            return
        if not is_public_address(address):
            raise URLRefused(
                f"{origin.host} resolved to {address}, which is not a public address; refused "
                "(list the host in ALLOWED_HOSTS if the backend is meant to reach it)"
            )

    def session(self) -> requests.Session:
        """A session for this policy's requests: peer addresses checked on every connection,
        no proxies or .netrc from the environment, no cookies."""
        session = requests.Session()
        session.trust_env = False
        session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        session.headers["User-Agent"] = USER_AGENT
        adapter = _PeerCheckingAdapter(self.check_peer)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        return session

    def send(
        self,
        session: requests.Session,
        method: str,
        target: Target,
        *,
        authorization: Callable[[], Mapping[str, str]] | None = None,
        timeout: float | tuple[float, float],
        stream: bool = False,
        params: Mapping[str, Any] | None = None,
        json: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> requests.Response:
        """Send one request to ``target`` without following redirects (rule 6).

        ``authorization`` (e.g. ``LabelStudioAuth.header``) is called, and its header attached,
        only for Label Studio targets, after the prepared URL has been checked again; ``headers``
        (e.g. a conditional GET's validators) never carry one.
        """
        prepared = session.prepare_request(requests.Request(method, target.url, params=params, json=json,
                                                            headers=dict(headers or {})))
        self._recheck(prepared.url or "", target)
        prepared.headers.pop("Authorization", None)
        if authorization is not None and target.label_studio:
            prepared.headers.update(authorization())
        return session.send(prepared, stream=stream, timeout=timeout, allow_redirects=False)

    def _recheck(self, prepared_url: str, target: Target) -> None:
        parsed = parse_http_url(prepared_url)
        if Origin.of(parsed) != target.origin:
            raise URLRefused("the prepared request goes to another origin than the one checked; refused")
        if target.route == LABEL_STUDIO_MEDIA and self._media(*_raw_path_query(prepared_url)) is None:
            raise URLRefused("the prepared request is not a Label Studio media path; refused")
        if target.route == LABEL_STUDIO_API and clean_path(_raw_path_query(prepared_url)[0]) is None:
            raise URLRefused("the prepared request has an unusable path; refused")


class _PeerCheckingAdapter(HTTPAdapter):
    """An HTTPAdapter whose connections call ``check_peer`` right after connecting (before TLS)."""

    def __init__(self, check_peer: Callable[[str, str, int | None, str], None]) -> None:
        self._check_peer = check_peer  # init_poolmanager, called by HTTPAdapter.__init__, needs it
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _checked_pool(HTTPConnectionPool, HTTPConnection, "http", self._check_peer),
            "https": _checked_pool(HTTPSConnectionPool, HTTPSConnection, "https", self._check_peer),
        }


def _checked_pool(pool: type, connection: type, scheme: str, check_peer: Callable[..., None]) -> type:
    def _new_conn(self: Any) -> Any:
        sock = connection._new_conn(self)
        try:
            check_peer(scheme, self.host, self.port, sock.getpeername()[0])
        except BaseException:
            sock.close()
            raise
        return sock

    checked = type(f"PeerChecked{connection.__name__}", (connection,), {"_new_conn": _new_conn})
    return type(f"PeerChecked{pool.__name__}", (pool,), {"ConnectionCls": checked})
