"""What non-HTTP image sources mean: data URIs, file paths, cloud URIs.

Pure functions, no I/O except resolving local paths. Whether and how an http(s) URL may be
requested, and with which credentials, is decided by :mod:`ml_backend.security.urls` only.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from urllib.parse import unquote, unquote_to_bytes, urlsplit
from urllib.request import url2pathname

from ml_backend.errors import ImageFetchError
from ml_backend.security.urls import describe

# Relative paths under these prefixes are Label Studio's (the URL policy decides which it serves
# with the token); any other absolute path is a file under LOCAL_FILES_DOCUMENT_ROOT.
LABEL_STUDIO_PREFIXES = ("/data/", "/tasks/", "/projects/", "/api/", "/storage-data/")
CLOUD_SCHEMES = ("s3", "gs", "azure-blob")


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
