"""Where an image URL points, and whether we may go there.

Pure functions, no I/O except resolving local paths: the loader decides *how* to read,
this module decides *what* a URL means and refuses what it must not touch.
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import Path
from urllib.parse import parse_qs, unquote, unquote_to_bytes, urlsplit
from urllib.request import url2pathname

from ml_backend.errors import ImageFetchError

# Paths Label Studio serves relative to its own URL (uploads, local files, presign, API).
LABEL_STUDIO_PREFIXES = ("/data/", "/tasks/", "/projects/", "/api/", "/storage-data/")
CLOUD_SCHEMES = ("s3", "gs", "azure-blob")
LOCAL_FILES_PATH = re.compile(r"/data/local-files/?$")
# Label Studio 1.23 sends cloud images as /tasks/<id>/resolve/?fileuri=<base64>; /presign/ is the older alias.
PRESIGN_PATH = re.compile(r"/(presign|resolve)/?$")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def describe(url: str, *, limit: int = 160) -> str:
    """A short, secret-free name for ``url`` in messages and logs.

    Data URIs are cut to their header; query strings of foreign hosts are dropped
    because presigned cloud URLs carry their signature there.
    """
    if url.startswith("data:"):
        return url.split(",", 1)[0][:limit] + ",..."
    try:
        parts = urlsplit(url)
    except ValueError:
        return url[:limit]
    if (
        parts.scheme in _DEFAULT_PORTS
        and parts.query
        and not parts.path.rstrip("/").endswith(("/local-files", "/presign", "/resolve"))
    ):
        url = f"{parts.scheme}://{parts.netloc}{parts.path}?..."
    return url if len(url) <= limit else url[: limit - 3] + "..."


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, lower-case host, port) with the scheme's default port filled in."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError as exc:
        raise ImageFetchError(f"{describe(url)}: malformed port in URL") from exc
    return parts.scheme.lower(), (parts.hostname or "").lower(), port or _DEFAULT_PORTS.get(parts.scheme.lower(), 0)


def host_allowed(host: str, patterns: tuple[str, ...]) -> bool:
    """True when ``host`` equals a pattern or matches a ``*.domain`` pattern (any depth below it)."""
    host = host.lower().rstrip(".")
    for pattern in patterns:
        pattern = pattern.lower().rstrip(".")
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]):
                return True
        elif host == pattern:
            return True
    return False


def is_presign_endpoint(url: str) -> bool:
    return bool(PRESIGN_PATH.search(urlsplit(url).path))


def local_files_param(url: str) -> str | None:
    """The ``d=`` path of a Label Studio local-files URL (relative or absolute), else None."""
    parts = urlsplit(url)
    if not LOCAL_FILES_PATH.search(parts.path):
        return None
    values = parse_qs(parts.query).get("d")
    return values[0] if values else None


def decode_data_uri(uri: str, *, max_bytes: int) -> bytes:
    """The bytes of a ``data:`` URI (base64 or percent-encoded), refusing oversize payloads."""
    header, sep, payload = uri.partition(",")
    if not sep:
        raise ImageFetchError(f"{describe(uri)}: malformed data URI (no comma)")
    # base64 inflates by 4/3: refuse before decoding anything huge.
    if len(payload) * 3 // 4 > max_bytes:
        raise ImageFetchError(f"{describe(uri)}: data URI larger than {max_bytes:,} bytes (MAX_DOWNLOAD_MB)")
    try:
        if header.lower().endswith(";base64"):
            data = base64.b64decode("".join(unquote(payload).split()), validate=True)
        else:
            data = unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as exc:
        raise ImageFetchError(f"{describe(uri)}: malformed base64 in data URI ({exc})") from exc
    if len(data) > max_bytes:
        raise ImageFetchError(f"{describe(uri)}: data URI larger than {max_bytes:,} bytes (MAX_DOWNLOAD_MB)")
    return data


def file_url_path(url: str) -> str:
    """The filesystem path of a ``file:`` URL (only local ones: no host or ``localhost``)."""
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ImageFetchError(f"{describe(url)}: file URLs on another host are not supported")
    return url2pathname(parts.path)


def contained_path(raw: str, root: str, *, what: str) -> Path:
    """Resolve ``raw`` (absolute, or relative to ``root``) and refuse anything outside ``root``.

    Symlinks and ``..`` are resolved first, so neither can escape the root.
    """
    if not root:
        raise ImageFetchError(f"{what}: reading local files needs LOCAL_FILES_DOCUMENT_ROOT to be set")
    try:
        base = Path(root).resolve()
        candidate = (base / raw).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # symlink loops, NUL bytes
        raise ImageFetchError(f"{what}: unusable local path ({exc})") from exc
    if not candidate.is_relative_to(base):
        raise ImageFetchError(f"{what}: path is outside LOCAL_FILES_DOCUMENT_ROOT ({base}); refused")
    return candidate


def cloud_presign_path(uri: str, task_id: int | None) -> str:
    """Label Studio's presign endpoint for a raw cloud URI (``s3://``, ``gs://``, ``azure-blob://``)."""
    if task_id is None:
        raise ImageFetchError(
            f"{describe(uri)}: a cloud storage URI needs the task id to ask Label Studio for a presigned URL"
        )
    encoded = base64.urlsafe_b64encode(uri.encode()).decode()
    return f"/tasks/{int(task_id)}/presign/?fileuri={encoded}"
