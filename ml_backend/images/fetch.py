"""Image bytes from wherever Label Studio keeps them, under size, time and host limits.

Sources, in the order they are recognised:

* ``data:`` URIs (base64 or percent-encoded);
* ``file:`` URLs and bare absolute paths, only inside ``LOCAL_FILES_DOCUMENT_ROOT``;
* Label Studio local-files URLs (``/data/local-files/?d=...``, relative or absolute):
  read straight from disk when the document root is set and holds the file, otherwise
  fetched from Label Studio;
* Label Studio's cloud-storage endpoints (``/tasks/<id>/resolve/?fileuri=...``, as
  Label Studio 1.23 sends cloud images, or the older ``/presign/``), and raw cloud URIs
  (``s3://``, ``gs://``, ``azure-blob://``) given with a task id, which are turned into one;
* paths relative to Label Studio (``/data/upload/...``, ``/tasks/...``, ``/projects/...``,
  ``/api/...``): prefixed with the Label Studio URL;
* absolute ``http(s)`` URLs: to Label Studio's origin (sent with its API key), or to a
  host in ``ALLOWED_HOSTS`` (sent without any credentials); anything else is refused.

Redirects are followed by hand (at most ``MAX_REDIRECTS``) and each target is checked
again: Label Studio's origin, the current origin and allowed hosts are accepted, and
so is *any* http(s) host when the redirect comes from Label Studio's own resolve/presign
endpoint (a 303): Label Studio, which we authenticated to, chose that target, and it is a
presigned cloud URL (S3, GCS, Azure) that carries its own signature. Credentials are
never sent outside Label Studio's origin. Downloads over HTTP are cached on disk.
"""

from __future__ import annotations

import http.cookiejar
import logging
import threading
import time
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import numpy as np
import requests

from ml_backend.errors import ImageFetchError
from ml_backend.images.auth import LabelStudioAuth
from ml_backend.images.cache import DownloadCache
from ml_backend.images.decode import decode_image
from ml_backend.images.sources import (
    CLOUD_SCHEMES,
    LABEL_STUDIO_PREFIXES,
    cloud_presign_path,
    contained_path,
    decode_data_uri,
    describe,
    file_url_path,
    host_allowed,
    is_presign_endpoint,
    local_files_param,
    origin,
)
from ml_backend.settings import Settings

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
CONNECT_TIMEOUT_S = 10.0
CHUNK_BYTES = 64 * 1024
MAX_AUTH_ENTRIES = 16
USER_AGENT = "sam-trimap-backend (Label Studio ML backend)"
_REDIRECTS = {301, 302, 303, 307, 308}


class ImageLoader:
    """Loads task images for the backend; one per process, safe to share between threads."""

    def __init__(self, settings: Settings, *, cache: DownloadCache | None = None) -> None:
        self._settings = settings
        self._max_bytes = settings.max_download_bytes
        self._timeout_s = settings.download_timeout_s
        self._cache = (
            cache
            if cache is not None
            else DownloadCache(settings.image_cache_dir, settings.image_cache_mb * 1024 * 1024)
        )
        self._session = requests.Session()
        self._session.headers["User-Agent"] = USER_AGENT
        # No cookie state: each request stands alone, and nothing leaks between hosts or threads.
        self._session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        self._auths: dict[tuple[str, str], LabelStudioAuth] = {}
        self._auth_lock = threading.Lock()

    def close(self) -> None:
        self._session.close()

    def load(
        self, url: str, *, label_studio_url: str | None = None, token: str | None = None, task_id: int | None = None
    ) -> np.ndarray:
        """The image at ``url`` as an (H, W, 3) uint8 RGB array; see :func:`decode_image`.

        ``label_studio_url`` and ``token`` override LABEL_STUDIO_URL / LABEL_STUDIO_API_KEY
        (e.g. with what Label Studio sent to ``/setup``); ``task_id`` is needed only for
        raw cloud URIs. Raises ImageFetchError or InvalidImageError, nothing else.
        """
        data = self.fetch_bytes(url, label_studio_url=label_studio_url, token=token, task_id=task_id)
        return decode_image(data, max_pixels=self._settings.max_image_pixels, source=describe(url))

    def fetch_bytes(
        self, url: str, *, label_studio_url: str | None = None, token: str | None = None, task_id: int | None = None
    ) -> bytes:
        """The raw bytes at ``url`` (same arguments and errors as :meth:`load`)."""
        if not isinstance(url, str) or not url.strip():
            raise ImageFetchError(f"no image URL in the task (got {url!r})")
        url = url.strip()
        if url.startswith("data:"):
            return decode_data_uri(url, max_bytes=self._max_bytes)
        ls_url = (label_studio_url or self._settings.label_studio_url).strip().rstrip("/")
        try:
            local = self._local_path(url)
            if local is not None:
                return self._read_file(local, url)
            absolute = self._absolute_url(url, ls_url, task_id)
            cached = self._cache.get(absolute)
            if cached is not None:
                log.debug("image cache hit for %s", describe(absolute))
                return cached
            key = token or self._settings.label_studio_api_key
            auth = self._auth_for(ls_url, key) if ls_url and key else None
            data = self._download(absolute, ls_url, auth)
        except ValueError as exc:  # urllib's parsers on malformed URLs or redirect targets (bad IPv6, NUL bytes...)
            raise ImageFetchError(f"{describe(url)}: malformed URL ({exc})") from exc
        self._cache.put(absolute, data)
        return data

    # --- where the URL points ---

    def local_file(self, url: str) -> Path | None:
        """The file on this disk that :meth:`load` reads for ``url``, or None when it downloads.

        Raises ImageFetchError for a URL the loader refuses.
        """
        try:
            return self._local_path(url.strip())
        except ValueError as exc:
            raise ImageFetchError(f"{describe(url)}: malformed URL ({exc})") from exc

    def _local_path(self, url: str) -> Path | None:
        """The file to read from disk for ``url``, or None when it must be fetched over HTTP."""
        root = self._settings.local_files_document_root
        scheme = urlsplit(url).scheme.lower()
        if scheme == "file":
            return contained_path(file_url_path(url), root, what=describe(url))
        if url.startswith("/") or scheme in ("http", "https"):
            relative = local_files_param(url)
            if relative is not None:
                if not root:
                    return None
                path = contained_path(relative, root, what=describe(url))
                return path if path.is_file() else None  # not on this disk: ask Label Studio
        if url.startswith("/") and not url.startswith(LABEL_STUDIO_PREFIXES):
            return contained_path(url, root, what=describe(url))
        return None

    def _absolute_url(self, url: str, ls_url: str, task_id: int | None) -> str:
        if url.startswith("upload/"):  # label-studio-tools accepts this legacy form
            url = "/data/" + url
        scheme = urlsplit(url).scheme.lower()
        if scheme in CLOUD_SCHEMES:
            url, scheme = cloud_presign_path(url, task_id), ""
        if url.startswith("/"):
            if not ls_url:
                raise ImageFetchError(
                    f"{describe(url)}: a Label Studio path, but the Label Studio URL is unknown: set LABEL_STUDIO_URL "
                    "(or connect the backend from Label Studio, whose /setup call provides it)"
                )
            return ls_url + url
        if scheme not in ("http", "https"):
            raise ImageFetchError(
                f"{describe(url)}: unsupported image URL (use http(s), data:, file: or a Label Studio path)"
            )
        if ls_url and origin(url) == origin(ls_url):
            return url
        host = urlsplit(url).hostname or ""
        if host_allowed(host, self._settings.allowed_hosts):
            return url
        raise ImageFetchError(
            f"{describe(url)}: host {host!r} is neither Label Studio's ({ls_url or 'LABEL_STUDIO_URL unset'}) "
            "nor in ALLOWED_HOSTS; refused"
        )

    def _auth_for(self, ls_url: str, token: str) -> LabelStudioAuth:
        with self._auth_lock:
            auth = self._auths.get((ls_url, token))
            if auth is None:
                if len(self._auths) >= MAX_AUTH_ENTRIES:
                    self._auths.pop(next(iter(self._auths)))
                auth = LabelStudioAuth(ls_url, token, self._session, timeout_s=self._timeout_s)
                self._auths[(ls_url, token)] = auth
            return auth

    def _redirect_allowed(self, target: str, current: str, ls_url: str) -> bool:
        if urlsplit(target).scheme.lower() not in ("http", "https"):
            return False
        if origin(target) in {origin(current)} | ({origin(ls_url)} if ls_url else set()):
            return True
        if host_allowed(urlsplit(target).hostname or "", self._settings.allowed_hosts):
            return True
        return bool(ls_url) and origin(current) == origin(ls_url) and is_presign_endpoint(current)

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

    def _download(self, url: str, ls_url: str, auth: LabelStudioAuth | None) -> bytes:
        deadline = time.monotonic() + self._timeout_s
        current, reauthorised = url, False
        for _ in range(MAX_REDIRECTS + 2):  # redirects plus one retry after a token refresh
            to_ls = bool(ls_url) and origin(current) == origin(ls_url)
            headers = auth.header() if to_ls and auth is not None else {}
            response = self._get(current, headers, deadline)
            status = response.status_code
            if status in _REDIRECTS:
                response.close()
                location = response.headers.get("Location", "")
                if not location:
                    raise ImageFetchError(f"{describe(url)}: HTTP {status} redirect without a Location")
                target = urljoin(current, location)
                if to_ls and origin(target) == origin(ls_url) and "/user/login" in urlsplit(target).path:
                    raise ImageFetchError(f"{describe(url)}: Label Studio asks for a login: check LABEL_STUDIO_API_KEY")
                if target == current or not self._redirect_allowed(target, current, ls_url):
                    raise ImageFetchError(f"{describe(url)}: redirect to {describe(target)} refused (host not allowed)")
                current = target
                continue
            if status == 401 and to_ls and auth is not None and auth.refreshable and not reauthorised:
                response.close()
                auth.invalidate()
                reauthorised = True
                continue
            if status >= 400:
                response.close()
                what = describe(url) if current == url else f"{describe(url)} (redirected to {describe(current)})"
                raise _http_error(status, what, to_ls, with_key=auth is not None)
            return self._read_capped(response, url, deadline)
        raise ImageFetchError(f"{describe(url)}: more than {MAX_REDIRECTS} redirects")

    def _get(self, url: str, headers: dict[str, str], deadline: float) -> requests.Response:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _timeout(url, self._timeout_s)
        try:
            return self._session.get(
                url,
                headers=headers,
                stream=True,
                allow_redirects=False,
                timeout=(min(CONNECT_TIMEOUT_S, remaining), remaining),
            )
        except requests.Timeout as exc:
            raise _timeout(url, self._timeout_s) from exc
        except requests.RequestException as exc:
            raise ImageFetchError(f"{describe(url)}: cannot download ({type(exc).__name__}: {exc})") from exc

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
                        raise _timeout(url, self._timeout_s)
            except requests.RequestException as exc:  # read timeouts surface here as ConnectionError
                raise ImageFetchError(
                    f"{describe(url)}: download interrupted or too slow (limit {self._timeout_s:g} s, DOWNLOAD_TIMEOUT_S): {exc}"
                ) from exc
        return bytes(body)


def _timeout(url: str, timeout_s: float) -> ImageFetchError:
    return ImageFetchError(f"{describe(url)}: download took longer than {timeout_s:g} s (DOWNLOAD_TIMEOUT_S)")


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
