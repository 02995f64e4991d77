"""What a request may hold: the bounds on every input that reaches the backend from outside.

Views call these before any work starts, the parsers of stored data (brush RLE, annotations in
webhooks and exports) call the size checks before allocating; every refusal is a
:class:`RequestLimitError` with an HTTP status (413 for bodies, 415 for content types, 422
otherwise) and a message naming the setting that raises the limit.

* Body: JSON only (``Content-Type: application/json``: a cross-site ``text/plain`` form post
  cannot reach a view), at most ``MAX_REQUEST_MB`` on the routes Label Studio sends tasks and
  annotations to (:data:`LARGE_BODY_ROUTES`) and :data:`SMALL_BODY_BYTES` on the others (checked
  before reading), nesting at most :data:`MAX_JSON_DEPTH`. Parsing JSON costs up to ~40 times the
  text for empty objects and lists (``{"tasks":[{},{},...]}``), so before parsing a body may hold
  at most one ``{`` or ``[`` per :data:`MIN_BYTES_PER_CONTAINER` bytes (Label Studio's JSON has one
  per 20-40), which leaves short strings (~12 times) as the costliest body; and bodies being parsed
  at once in a process total at most ``MAX_REQUEST_MB`` (:class:`ParseGate`), so threads do not
  multiply that peak.
* Batch ``/predict``: at most ``MAX_TASKS_PER_REQUEST`` tasks.
* Interactive context: at most ``MAX_PROMPT_REGIONS`` rectangles and ``MAX_PROMPT_POINTS``
  keypoints; every number finite and within :data:`MAX_ABS_NUMBER` (a 400-digit integer, or
  1e400 that Python's JSON parser reads as infinity, is refused before any arithmetic); the
  declared image size at most ``MAX_IMAGE_PIXELS``.
* Masks: a brush region's declared ``original_width`` x ``original_height`` at most
  ``MAX_IMAGE_PIXELS``, and its RLE list no longer than such a mask can need, before decoding.
* ``/warmup``: ``limit`` at most ``MAX_WARMUP_TASKS``.
* Project ids: a non-negative int or ASCII digits (``"3"``, ``"03"``, ``"3.1700000000"`` from
  ``/setup``), normalised (``"03"`` is project ``"3"``; ``"٣"`` is no project).
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from ml_backend.errors import BackendError
from ml_backend.settings import Settings

MAX_ABS_NUMBER = 1e9  # coordinates are percent or pixels; nothing real comes near this
MAX_JSON_DEPTH = 64
MAX_PROJECT_ID = 2**63 - 1
DEFAULT_MAX_MASK_PIXELS = Settings().max_image_pixels
RLE_HEADER_BYTES = 7
SMALL_BODY_BYTES = 1 << 20  # /setup (a labeling config), /train, /versions, /preannotate: a few KB in practice
LARGE_BODY_ROUTES = frozenset({"/predict", "/webhook", "/warmup"})  # tasks, annotations: MAX_REQUEST_MB
MIN_BYTES_PER_CONTAINER = 8  # a body with more "{"/"[" than one per 8 bytes is refused unparsed
FREE_CONTAINERS = 1024  # small bodies are never refused for density
KEYPOINT_TYPES = frozenset({"keypointlabels", "keypoint"})
RECTANGLE_TYPES = frozenset({"rectanglelabels", "rectangle"})


class RequestLimitError(BackendError):
    """A request (or a stored annotation it carries) beyond what the backend accepts."""

    status_code = 422


@dataclass(frozen=True)
class RequestLimits:
    max_body_bytes: int = Settings().max_request_mb << 20
    max_tasks: int = Settings().max_tasks_per_request
    max_regions: int = Settings().max_prompt_regions
    max_points: int = Settings().max_prompt_points
    max_warmup_tasks: int = Settings().max_warmup_tasks
    max_pixels: int = Settings().max_image_pixels

    @classmethod
    def from_settings(cls, settings: Settings) -> "RequestLimits":
        return cls(settings.max_request_mb << 20, settings.max_tasks_per_request, settings.max_prompt_regions,
                   settings.max_prompt_points, settings.max_warmup_tasks, settings.max_image_pixels)


# --- the body --------------------------------------------------------------------------------

def body_too_large_message(limits: RequestLimits) -> str:
    return (f"The request body is larger than {limits.max_body_bytes >> 20} MB (MAX_REQUEST_MB): send fewer "
            "tasks per request or raise the limit.")


def route_body_limit(path: str, limits: RequestLimits) -> int:
    """The most bytes a body sent to ``path`` may hold."""
    return limits.max_body_bytes if path in LARGE_BODY_ROUTES else min(SMALL_BODY_BYTES, limits.max_body_bytes)


def before_request(limits: RequestLimits) -> Callable[[], object]:
    """A Flask ``before_request`` hook: the route's body limit, applied before the body is read (413)."""
    from flask import jsonify, request

    def guard() -> object:
        limit = route_body_limit(request.path, limits)
        request.max_content_length = limit  # also bounds a body sent without Content-Length
        if request.content_length is not None and request.content_length > limit:
            shown = f"{limit >> 20} MB (MAX_REQUEST_MB)" if limit == limits.max_body_bytes else f"{limit >> 10} KB"
            message = f"The request body is larger than {shown}, the most {request.path} takes."
            return jsonify({"error": message, "status": 413}), 413
        return None

    return guard


class ParseGate:
    """Bodies being parsed at once total at most ``capacity`` bytes (one larger body runs alone).

    Parsing is where a body's cost peaks (up to ~12 times its size after the density check);
    without this, ``THREADS`` bodies at the limit would cost ``THREADS`` times that.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._in_use = 0

    @contextmanager
    def hold(self, size: int, capacity: int) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: self._in_use == 0 or self._in_use + size <= capacity)
            self._in_use += size
        try:
            yield
        finally:
            with self._cond:
                self._in_use -= size
                self._cond.notify_all()


PARSE_GATE = ParseGate()


def check_density(body: bytes) -> None:
    """Refuse a body with more objects and lists than JSON Label Studio sends has, before parsing it."""
    containers = body.count(b"{") + body.count(b"[")
    if containers > len(body) // MIN_BYTES_PER_CONTAINER + FREE_CONTAINERS:
        raise RequestLimitError(f"The request body holds {containers} JSON objects and lists in {len(body)} bytes: "
                                f"more than one per {MIN_BYTES_PER_CONTAINER} bytes is refused unparsed (each "
                                "costs ~70 bytes of memory once parsed).", status_code=413)


def parse_json_body(content_type: str | None, body: bytes, limits: RequestLimits | None = None,
                    check: Callable[[dict], object] | None = None) -> dict:
    """The JSON object in ``body``; only for a JSON content type (415 otherwise), not denser in objects and
    lists than :func:`check_density` allows, parsed within the process's :data:`PARSE_GATE`.

    ``check`` (the route's count limits) runs inside the gate too: a refused body is freed before the next
    one is parsed (a parse holds the GIL, so a refused body's objects would otherwise outlive it).
    """
    mimetype = (content_type or "").split(";", 1)[0].strip().lower()
    if not (mimetype == "application/json" or (mimetype.startswith("application/") and mimetype.endswith("+json"))):
        raise RequestLimitError("Send the request body as JSON with 'Content-Type: application/json' "
                                f"(got {mimetype or 'no content type'!r}).", status_code=415)
    check_density(body)
    refused: RequestLimitError | None = None
    with PARSE_GATE.hold(len(body), (limits or RequestLimits()).max_body_bytes):
        try:
            data = _loads(body)
            _check_depth(data)
            if check is not None:
                check(data)
        except RequestLimitError as exc:
            refused, data = exc.with_traceback(None), None  # no frame keeps the parsed body alive
    if refused is not None:
        raise refused
    return data


def _loads(body: bytes) -> dict:
    try:
        data = json.loads(body)
    except RecursionError:
        raise RequestLimitError(f"The request body nests deeper than {MAX_JSON_DEPTH} levels.",
                                status_code=400) from None
    except (ValueError, UnicodeDecodeError):  # JSONDecodeError, bad UTF-8, a 5000-digit integer
        raise RequestLimitError("The request body is not valid JSON.", status_code=400) from None
    if not isinstance(data, dict):
        raise RequestLimitError("The request body must be a JSON object.", status_code=400)
    return data


def _check_depth(value: Any) -> None:
    """Refuse nesting past :data:`MAX_JSON_DEPTH` (iteratively: no recursion to exhaust)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise RequestLimitError(f"The request body nests deeper than {MAX_JSON_DEPTH} levels.", status_code=400)
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


# --- /predict ----------------------------------------------------------------------------------

def predict_request(data: Mapping[str, Any], limits: RequestLimits) -> tuple[list, dict | None]:
    """(tasks, context) of a ``/predict`` body, within the limits."""
    tasks = data.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise RequestLimitError("'tasks' must be a non-empty list of tasks.", status_code=400)
    if len(tasks) > limits.max_tasks:
        raise RequestLimitError(f"{len(tasks)} tasks in one request; at most {limits.max_tasks} "
                                "(MAX_TASKS_PER_REQUEST; Label Studio's ML batch size).", status_code=413)
    params = data.get("params") or {}
    if not isinstance(params, dict):
        raise RequestLimitError("'params' must be an object.", status_code=400)
    context = params.get("context")
    if context is not None and not isinstance(context, dict):
        raise RequestLimitError("'params.context' must be an object.", status_code=400)
    if context:
        check_context(context, limits)
    return tasks, context


def check_context(context: Mapping[str, Any], limits: RequestLimits) -> None:
    """Bound the interactive context before it is parsed: item counts, numbers, the declared size."""
    items = context.get("result")
    if not isinstance(items, list):
        return  # the context parser explains what is wrong with it
    if len(items) > limits.max_regions + limits.max_points:
        raise RequestLimitError(f"{len(items)} prompts in one request; at most {limits.max_regions} rectangles "
                                f"(MAX_PROMPT_REGIONS) and {limits.max_points} keypoints (MAX_PROMPT_POINTS).")
    kinds = [str(item.get("type", "")).lower() if isinstance(item, dict) else "" for item in items]
    rectangles = sum(kind in RECTANGLE_TYPES for kind in kinds)
    points = sum(kind in KEYPOINT_TYPES for kind in kinds)
    if rectangles > limits.max_regions:
        raise RequestLimitError(f"{rectangles} rectangles in one request; at most {limits.max_regions} "
                                "(MAX_PROMPT_REGIONS): each one is a separate mask.")
    if points > limits.max_points:
        raise RequestLimitError(f"{points} keypoints in one request; at most {limits.max_points} (MAX_PROMPT_POINTS).")
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            continue
        where = f"Context item {index}"
        check_numbers(item, where)
        width, height = item.get("original_width"), item.get("original_height")
        if _is_number(width) and _is_number(height) and width * height > limits.max_pixels:
            raise RequestLimitError(f"{where} declares a {width:g}x{height:g} image; at most {limits.max_pixels} "
                                    "pixels (MAX_IMAGE_PIXELS).")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_numbers(value: Any, where: str) -> None:
    """Every number inside ``value`` finite and within :data:`MAX_ABS_NUMBER` (no float overflow later)."""
    stack: list[tuple[Any, str]] = [(value, where)]
    while stack:
        item, path = stack.pop()
        if isinstance(item, dict):
            stack.extend((v, f"{path}.{k}") for k, v in item.items())
        elif isinstance(item, list):
            stack.extend((v, f"{path}[{i}]") for i, v in enumerate(item))
        elif _is_number(item):
            if isinstance(item, int):
                ok = -MAX_ABS_NUMBER <= item <= MAX_ABS_NUMBER  # int comparison: no overflow
            else:
                ok = math.isfinite(item) and abs(item) <= MAX_ABS_NUMBER
            if not ok:
                shown = f"{item:.3g}" if isinstance(item, float) else f"a {len(str(abs(item)))}-digit number"
                raise RequestLimitError(f"{path} is {shown}: numbers must be finite and within "
                                        f"±{MAX_ABS_NUMBER:g}.")


# --- masks ---------------------------------------------------------------------------------

def declared_mask_size(width: Any, height: Any, *, max_pixels: int = DEFAULT_MAX_MASK_PIXELS,
                       what: str = "The brush region") -> tuple[int, int]:
    """(width, height) of a declared mask: positive whole numbers whose product is at most ``max_pixels``."""
    sizes = []
    for raw in (width, height):
        if isinstance(raw, float) and math.isfinite(raw) and raw == int(raw):
            raw = int(raw)
        if not isinstance(raw, int) or isinstance(raw, bool) or raw < 1:
            raise RequestLimitError(f"{what} has no valid size: width and height must be positive whole numbers, "
                                    f"got {_shown(width)}x{_shown(height)}.")
        sizes.append(raw)
    if sizes[0] * sizes[1] > max_pixels:
        shown = "x".join(map(_shown, sizes))
        pixels = _shown(sizes[0] * sizes[1])
        raise RequestLimitError(f"{what} declares {shown} = {pixels} pixels, more than MAX_IMAGE_PIXELS={max_pixels}.")
    return sizes[0], sizes[1]


def _shown(value: Any) -> str:
    """A value for a message: numbers beyond 10**12 by their digit count, anything else cut short."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > 10**12:
        return f"<{len(str(abs(value)))}-digit number>"
    return repr(value)[:40]


def check_rle_length(length: int, width: int, height: int) -> None:
    """An RLE list longer than any encoding of a ``width`` x ``height`` mask can be is refused unread.

    The longest stream stores every RGBA byte literally: about one byte per value plus a 3-bit
    header per run of at most 8 values; twice the value count bounds it.
    """
    bound = 2 * width * height * 4 + RLE_HEADER_BYTES + 8
    if length > bound:
        raise RequestLimitError(f"Brush RLE has {length} numbers, more than a {width}x{height} mask can need.")


# --- /setup ----------------------------------------------------------------------------------

MAX_TOKEN_CHARS = 4096
MAX_URL_CHARS = 2048


def setup_hostname(value: Any) -> str | None:
    """``/setup``'s ``hostname``: Label Studio's http(s) address as the URL policy accepts it
    (:func:`ml_backend.security.urls.parse_label_studio_url`), or None when not sent."""
    from ml_backend.security.urls import URLRefused, parse_label_studio_url

    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > MAX_URL_CHARS:
        raise RequestLimitError("'hostname' must be Label Studio's http(s) address.")
    try:
        parse_label_studio_url(value)
    except URLRefused as exc:
        raise RequestLimitError(f"'hostname': {exc.message}") from None
    return value


def setup_token(value: Any) -> str | None:
    """``/setup``'s ``access_token``: printable ASCII (it becomes a header), or None when not sent."""
    if value is None or value == "":
        return None
    if not isinstance(value, str) or len(value) > MAX_TOKEN_CHARS or not value.isascii() or not value.isprintable() \
            or " " in value.strip():
        raise RequestLimitError("'access_token' must be a Label Studio API token (printable ASCII).")
    return value.strip()


# --- what the backend keeps ----------------------------------------------------------------------

def compact_url(url: str) -> str:
    """``url`` without the whitespace a base64 ``data:`` URI may be padded with (its decoder ignores it), so
    the URI kept for later is no longer than its image needs; any other URL unchanged."""
    if url[:5].lower() != "data:":
        return url
    header, sep, payload = url.partition(",")
    if not sep or not header.lower().endswith(";base64"):
        return url
    return header + sep + "".join(payload.split())


def url_key(url: str) -> str:
    """``url`` as kept in a key (prompt state, caches): itself up to :data:`MAX_URL_CHARS` characters, else its
    SHA-256, so a ``data:`` URI padded with whitespace to tens of MB costs 71 bytes wherever it is remembered."""
    if len(url) <= MAX_URL_CHARS:
        return url
    import hashlib

    return "sha256:" + hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()


# --- /warmup -------------------------------------------------------------------------------

def warmup_limit(value: Any, limits: RequestLimits, default: int) -> int:
    if value is None:
        return min(default, limits.max_warmup_tasks)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limits.max_warmup_tasks:
        raise RequestLimitError(f"'limit' must be a number of tasks from 1 to {limits.max_warmup_tasks} "
                                f"(MAX_WARMUP_TASKS), got {value!r:.40}.")
    return value


def warmup_tasks(tasks: Any, limits: RequestLimits) -> list:
    if not isinstance(tasks, list):
        raise RequestLimitError("Give a 'project' id, or 'tasks' with their 'label_config'.")
    if len(tasks) > limits.max_warmup_tasks:
        raise RequestLimitError(f"{len(tasks)} tasks to warm up; at most {limits.max_warmup_tasks} (MAX_WARMUP_TASKS).")
    return tasks


# --- project ids -------------------------------------------------------------------------------

def project_id(value: Any) -> str | None:
    """A project's canonical id from an int, a webhook's project object, or ``"<id>[.<timestamp>]"``.

    Only ASCII digits count (``str.isdigit`` accepts "٣" and "³"), leading zeros are dropped, and
    ids beyond a 64-bit integer are refused: one project, one key. None when it is not an id.
    """
    if isinstance(value, dict):
        value = value.get("id")
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        number = value
    elif isinstance(value, str):
        head = value.strip().split(".", 1)[0]
        if not head or not head.isascii() or not head.isdigit() or len(head) > 19:
            return None
        number = int(head)
    else:
        return None
    return str(number) if 0 <= number <= MAX_PROJECT_ID else None
