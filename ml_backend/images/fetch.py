"""Image bytes from wherever Label Studio keeps them, under size and time limits.

Sources, in the order they are recognised:

* ``data:`` URIs (base64 or percent-encoded);
* ``file:`` URLs and bare absolute paths, only inside ``LOCAL_FILES_DOCUMENT_ROOT``;
* raw cloud URIs (``s3://``, ``gs://``, ``azure-blob://``) given with a task id, turned into
  Label Studio's ``/tasks/<id>/presign/?fileuri=...``;
* everything else is an http(s) URL, absolute or relative to Label Studio, and goes through
  :class:`~ml_backend.security.urls.UrlPolicy`, which alone decides whether it may be
  requested, whether it carries the API key (only Label Studio's media paths on its own
  origin do) and where each redirect may go. A Label Studio local-files URL
  (``/data/local-files/?d=...``) is read straight from disk when the document root is set
  and holds the file.

For a task of a project (``project=``), every read from this disk (``d=``, ``file:``, bare paths) must
also lie inside one of that project's local storages in Label Studio
(:mod:`ml_backend.security.local_files`); a refused ``d=`` is not fetched over HTTP instead (the
backend's token usually sees more projects than the task's), and neither is one that cannot be
checked because Label Studio does not answer.

Redirects are followed here, one hop at a time (at most ``MAX_REDIRECTS``), each re-checked
by the policy. Downloads over HTTP are cached on disk under the checked URL; only what the
policy admitted is ever fetched, so only media is cached. A cached download older than
``URL_KEY_TTL_S`` is asked for again, conditionally (``If-None-Match``/``If-Modified-Since``) when the
server gave an ``ETag`` or ``Last-Modified``: a picture replaced at the same URL is read anew.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import requests

from ml_backend.errors import ImageFetchError
from ml_backend.images.auth import LabelStudioAuth
from ml_backend.images.cache import CachedDownload, DownloadCache
from ml_backend.images.decode import decode_image
from ml_backend.images.sources import (
    CLOUD_SCHEMES,
    LABEL_STUDIO_PREFIXES,
    cloud_presign_path,
    contained_path,
    decode_data_uri,
    file_url_path,
)
from ml_backend.images.storages import ProjectStorages
from ml_backend.security.local_files import label_studio_local_path, project_file
from ml_backend.security.urls import Target, UrlPolicy, URLRefused, describe, failure_reason
from ml_backend.settings import Settings

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
CONNECT_TIMEOUT_S = 10.0
CHUNK_BYTES = 64 * 1024
MAX_ROUTES = 16  # Label Studio URLs (and API keys) remembered at once
_REDIRECTS = {301, 302, 303, 307, 308}
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")


@dataclass(frozen=True)
class _Route:
    """The URL policy for one Label Studio URL and the session that enforces it."""

    policy: UrlPolicy
    session: requests.Session


class ImageLoader:
    """Loads task images for the backend; one per process, safe to share between threads."""

    def __init__(self, settings: Settings, *, cache: DownloadCache | None = None) -> None:
        self._settings = settings
        self._storages = ProjectStorages()  # projects' local storage paths, listed by Label Studio
        self._max_bytes = settings.max_download_bytes
        self._timeout_s = settings.download_timeout_s
        self._cache = (
            cache
            if cache is not None
            else DownloadCache(settings.image_cache_dir, settings.image_cache_mb * 1024 * 1024)
        )
        self._routes: dict[str, _Route] = {}
        self._auths: dict[tuple[str, str], LabelStudioAuth] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            for route in self._routes.values():
                route.session.close()
            self._routes.clear()
            self._auths.clear()

    def load(
        self, url: str, *, label_studio_url: str | None = None, token: str | None = None, task_id: int | None = None,
        project: int | None = None,
    ) -> np.ndarray:
        """The image at ``url`` as an (H, W, 3) uint8 RGB array; see :func:`decode_image`.

        ``label_studio_url`` and ``token`` override LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY
        (e.g. with what Label Studio sent to ``/setup``); ``task_id`` is needed only for
        raw cloud URIs; ``project``, the task's project, limits reads from this disk to its local
        storages (None: a caller outside any task, limited to LOCAL_FILES_DOCUMENT_ROOT).
        Raises ImageFetchError or InvalidImageError, nothing else.
        """
        data = self.fetch_bytes(url, label_studio_url=label_studio_url, token=token, task_id=task_id,
                                project=project)
        return decode_image(
            data,
            max_pixels=self._settings.max_image_pixels,
            max_bytes=self._settings.max_image_bytes,
            source=describe(url),
        )

    def fetch_bytes(
        self, url: str, *, label_studio_url: str | None = None, token: str | None = None, task_id: int | None = None,
        project: int | None = None,
    ) -> bytes:
        """The raw bytes at ``url`` (same arguments and errors as :meth:`load`)."""
        if not isinstance(url, str) or not url.strip():
            raise ImageFetchError(f"no image URL in the task (got {describe(url) if url else url!r})")
        url = url.strip()
        if url[:5].lower() == "data:":
            return decode_data_uri(url, max_bytes=self._max_bytes)
        ls_url = (label_studio_url or self._settings.label_studio_url).strip().rstrip("/")
        source = self._locate(url, ls_url, task_id, project, token)
        if isinstance(source, Path):
            return self._read_file(source, url)
        route, target = source
        cached = self._cache.get(target.url)
        if cached is not None and cached.age_s() < self._settings.url_key_ttl_s:
            log.debug("image cache hit for %s", describe(target.url))
            return cached.data
        auth = self._auth(route, ls_url, token)
        # Older than URL_KEY_TTL_S: asked again, only if changed when the server gave validators.
        downloaded = self._download(route, target, auth, url, cached if cached is not None and cached.data else None)
        if downloaded is None:  # 304 Not Modified: the cached bytes are still the image
            log.debug("image at %s unchanged since it was cached", describe(target.url))
            self._cache.confirm(target.url, cached)
            return cached.data
        data, etag, last_modified = downloaded
        self._cache.put(target.url, data, etag=etag, last_modified=last_modified)
        return data

    def local_file(self, url: str, *, label_studio_url: str | None = None, token: str | None = None,
                   project: int | None = None) -> Path | None:
        """The file on this disk that :meth:`fetch_bytes` reads for ``url`` (the same decisions), or None
        when it downloads or decodes a ``data:`` URI. Used to notice a file replaced at the same URL.
        Raises ImageFetchError for a URL the loader refuses (for ``project``: see :meth:`load`)."""
        url = url.strip()
        if url[:5].lower() == "data:" or _scheme(url) in CLOUD_SCHEMES:
            return None
        ls_url = (label_studio_url or self._settings.label_studio_url).strip().rstrip("/")
        source = self._locate(url, ls_url, None, project, token)
        return source if isinstance(source, Path) else None

    def _locate(self, url: str, ls_url: str, task_id: int | None, project: int | None,
                token: str | None) -> Path | tuple[_Route, Target]:
        """Where ``url`` is read from: a file inside LOCAL_FILES_DOCUMENT_ROOT (and inside a local storage of
        ``project``), or an HTTP target the URL policy admitted (with the route, i.e. policy and session,
        that sends it)."""
        root = self._settings.local_files_document_root
        try:
            scheme = _scheme(url)
            if scheme == "file":
                return self._disk_path(file_url_path(url), url, ls_url, project, token)
            if scheme in CLOUD_SCHEMES:
                url = cloud_presign_path(url, task_id)
            elif url.startswith("upload/"):  # label-studio-tools accepts this legacy form
                url = "/data/" + url
            if url.startswith("/") and not url.startswith(("//", *LABEL_STUDIO_PREFIXES)):
                return self._disk_path(url, url, ls_url, project, token)
        except ValueError as exc:  # urllib's parsers on malformed file URLs (NUL bytes, bad hosts...)
            raise ImageFetchError(f"{describe(url)}: malformed URL ({exc})") from exc
        route = self._route(ls_url)
        target = None
        local = route.policy.relative_local_file(url)  # no Label Studio URL needed to read it from disk
        if local is None:
            target = route.policy.image_target(url)
            local = target.local_file
        if local is not None and root:
            # Where Label Studio reads d=; refused here (never asked over HTTP) when the project may not read it.
            path = self._disk_path(label_studio_local_path(local, root), url, ls_url, project, token)
            if path.is_file():
                return path
        if target is None:
            target = route.policy.image_target(url)
        return route, target  # not on this disk (or no root): ask over HTTP

    def _disk_path(self, raw: str, url: str, ls_url: str, project: int | None, token: str | None) -> Path:
        """``raw`` (a path on this disk) resolved inside LOCAL_FILES_DOCUMENT_ROOT and, for a task of ``project``,
        inside one of the project's local storages; ImageFetchError otherwise."""
        root = self._settings.local_files_document_root
        path = contained_path(raw, root, what=describe(url))
        if project is None:
            return path
        route = self._route(ls_url)
        storages = self._storages.paths(route.policy, route.session, self._auth(route, ls_url, token), project)
        return project_file(raw, document_root=root, storages=storages, project=project, what=describe(url))

    def _route(self, ls_url: str) -> _Route:
        with self._lock:
            route = self._routes.get(ls_url)
            if route is None:
                policy = UrlPolicy(ls_url, self._settings.allowed_hosts)  # refuses a malformed Label Studio URL
                if len(self._routes) >= MAX_ROUTES:  # dropped, not closed: another thread may be using it
                    self._routes.pop(next(iter(self._routes)))
                route = self._routes[ls_url] = _Route(policy, policy.session())
            return route

    def _auth(self, route: _Route, ls_url: str, token: str | None) -> LabelStudioAuth | None:
        """The authorization for Label Studio's requests (None when Label Studio or the token is unknown)."""
        key = token or self._settings.label_studio_api_key
        return self._auth_for(route, ls_url, key) if route.policy.label_studio and key else None

    def _auth_for(self, route: _Route, ls_url: str, token: str) -> LabelStudioAuth:
        with self._lock:
            auth = self._auths.get((ls_url, token))
            if auth is None:
                if len(self._auths) >= MAX_ROUTES:
                    self._auths.pop(next(iter(self._auths)))
                auth = LabelStudioAuth(route.policy, token, route.session, timeout_s=self._timeout_s)
                self._auths[(ls_url, token)] = auth
            return auth

    # --- reading ---

    def _read_file(self, path: Path, url: str) -> bytes:
        try:
            size = path.stat().st_size
            if not path.is_file():
                raise ImageFetchError(f"{describe(url)}: not a regular file")
            if size > self._max_bytes:
                raise ImageFetchError(
                    f"{describe(url)}: file of {size:,} bytes exceeds {self._max_bytes:,} (MAX_DOWNLOAD_MB)"
                )
            return path.read_bytes()
        except FileNotFoundError as exc:
            raise ImageFetchError(f"{describe(url)}: file not found") from exc
        except OSError as exc:
            raise ImageFetchError(f"{describe(url)}: cannot read file ({exc.strerror or exc})") from exc

    def _download(self, route: _Route, target: Target, auth: LabelStudioAuth | None, url: str,
                  cached: CachedDownload | None = None) -> tuple[bytes, str, str] | None:
        """(the bytes, their ETag and Last-Modified, "" when not given); None when the server answered that
        ``cached`` is still current (304 to the conditional request made from its validators)."""
        deadline = time.monotonic() + self._timeout_s
        conditions = cached.conditional_headers() if cached is not None else {}
        current, reauthorised = target, False
        for _ in range(MAX_REDIRECTS + 2):  # redirects plus one retry after a token refresh
            what = describe(url) if current == target else f"{describe(url)} (redirected to {describe(current.url)})"
            response = self._get(route, current, auth, deadline, what, conditions)
            status = response.status_code
            if status == 304 and conditions:
                response.close()
                return None
            if status in _REDIRECTS:
                response.close()
                location = response.headers.get("Location", "")
                if current.label_studio and "/user/login" in location.split("?", 1)[0]:
                    raise ImageFetchError(f"{describe(url)}: Label Studio asks for a login: check LABEL_STUDIO_API_KEY")
                try:
                    next_target = route.policy.redirect_target(current, location)
                except URLRefused as exc:
                    raise URLRefused(f"{describe(url)}: {exc.message}") from exc
                if next_target.url == current.url:
                    raise ImageFetchError(f"{describe(url)}: redirects to itself")
                current = next_target
                continue
            if status == 401 and current.label_studio and auth is not None and auth.refreshable and not reauthorised:
                response.close()
                auth.invalidate()
                reauthorised = True
                continue
            if status >= 400:
                response.close()
                raise _http_error(status, what, current.label_studio, with_key=auth is not None)
            etag, last_modified = response.headers.get("ETag", ""), response.headers.get("Last-Modified", "")
            return self._read_capped(response, url, deadline), etag, last_modified
        raise ImageFetchError(f"{describe(url)}: more than {MAX_REDIRECTS} redirects")

    def _get(
        self, route: _Route, target: Target, auth: LabelStudioAuth | None, deadline: float, what: str,
        conditions: dict[str, str] | None = None,
    ) -> requests.Response:
        """One request, no redirect followed; errors start with ``what`` (the URL, described)."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _timeout(what, self._timeout_s)
        try:
            return route.policy.send(
                route.session,
                "GET",
                target,
                authorization=auth.header if auth is not None else None,
                headers=conditions,
                stream=True,
                timeout=(min(CONNECT_TIMEOUT_S, remaining), remaining),
            )
        except URLRefused as exc:  # the connected address or the prepared request broke a rule
            raise URLRefused(f"{what}: {exc.message}") from exc
        # from None: requests' messages quote the whole URL, presigned query included (tracebacks are logged)
        except requests.Timeout:
            raise _timeout(what, self._timeout_s) from None
        except requests.RequestException as exc:
            raise ImageFetchError(f"{what}: cannot download ({failure_reason(exc)})") from None

    def _read_capped(self, response: requests.Response, url: str, deadline: float) -> bytes:
        too_big = f"{describe(url)}: download larger than {self._max_bytes:,} bytes (MAX_DOWNLOAD_MB); refused"
        with response:
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > self._max_bytes:
                raise ImageFetchError(too_big)
            body = bytearray()
            try:
                for chunk in response.iter_content(CHUNK_BYTES):
                    body += chunk
                    if len(body) > self._max_bytes:
                        raise ImageFetchError(too_big)
                    if time.monotonic() > deadline:
                        raise _timeout(describe(url), self._timeout_s)
            except requests.RequestException as exc:  # read timeouts surface here as ConnectionError
                raise ImageFetchError(
                    f"{describe(url)}: download interrupted or too slow (limit {self._timeout_s:g} s, "
                    f"DOWNLOAD_TIMEOUT_S): {failure_reason(exc)}"
                ) from None
        return bytes(body)


def _scheme(url: str) -> str:
    match = _SCHEME.match(url)
    return match.group(1).lower() if match else ""


def _timeout(what: str, timeout_s: float) -> ImageFetchError:
    return ImageFetchError(f"{what}: download took longer than {timeout_s:g} s (DOWNLOAD_TIMEOUT_S)")


def _http_error(status: int, what: str, to_label_studio: bool, *, with_key: bool) -> ImageFetchError:
    if status == 404:
        where = " in Label Studio" if to_label_studio else ""
        return ImageFetchError(f"{what}: not found{where} (HTTP 404)")
    if status in (401, 403) and to_label_studio and not with_key:
        return ImageFetchError(
            f"{what}: Label Studio asks for an API key (HTTP {status}) and none is known: set LABEL_STUDIO_API_KEY "
            "(or connect the backend from Label Studio, whose /setup call provides one)"
        )
    if status in (401, 403) and to_label_studio:
        return ImageFetchError(f"{what}: Label Studio refused access (HTTP {status}): check LABEL_STUDIO_API_KEY")
    if status >= 500 and to_label_studio:
        return ImageFetchError(f"{what}: Label Studio answered HTTP {status} (it does so for a missing upload too)")
    return ImageFetchError(f"{what}: HTTP {status} while downloading the image")
