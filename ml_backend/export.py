"""Accepted Label Studio annotations to a data set in the Oxford-Pets layout that ``training`` reads.

``OUT/images/<stem>.jpg`` and ``OUT/annotations/trimaps/<stem>.png`` with stem ``task-<id>``
(stable across exports, so ``training``'s validation split stays stable too).

Two sources: a running Label Studio (:func:`export_from_label_studio`: its export API with the
token, images through the backend's :class:`~ml_backend.images.ImageLoader`) and a JSON export
file plus the folder that holds its images (:func:`export_from_file`). One broken task never
stops an export: it is reported in :class:`ExportReport` with its reason and the rest are used.
"""

from __future__ import annotations

import json
import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
from PIL import Image

from ml_backend.errors import BackendError
from ml_backend.images.decode import load_image_file
from ml_backend.label_studio_api import LabelStudioAPIError, api_get
from ml_backend.settings import Settings
from ml_backend.trimaps import LabelRoles, accepted_annotation, annotation_to_trimap

logger = logging.getLogger(__name__)

IMAGES_SUBDIR = Path("images")
TRIMAPS_SUBDIR = Path("annotations") / "trimaps"
JPEG_QUALITY = 95

# (task, image URL) -> RGB uint8 array; raises BackendError when the image cannot be had.
ImageSource = Callable[[dict, str], np.ndarray]


class ExportError(BackendError):
    """The export as a whole cannot be made (unreachable Label Studio, unreadable export file)."""

    status_code = 502


@dataclass(frozen=True)
class ExportOptions:
    roles: LabelRoles = LabelRoles()
    boundary_width: int = 4
    ground_truth_only: bool = False
    max_pixels: int = Settings.max_image_pixels  # the largest mask size an annotation may declare

    @classmethod
    def from_settings(cls, settings: Settings) -> "ExportOptions":
        return cls(LabelRoles.from_settings(settings), settings.boundary_width, settings.retrain_ground_truth_only,
                   settings.max_image_pixels)


@dataclass
class ExportReport:
    """What an export wrote and what it left out (``skipped``: task label -> reason)."""

    out_dir: Path
    written: list[str] = field(default_factory=list)
    not_accepted: int = 0
    skipped: dict[str, str] = field(default_factory=dict)

    def summary(self) -> dict:
        return {"written": len(self.written), "not_accepted": self.not_accepted, "skipped": len(self.skipped),
                "skipped_reasons": dict(list(self.skipped.items())[:20])}

    def describe(self) -> str:
        lines = [f"{self.out_dir}: wrote {len(self.written)} image/trimap pair(s); "
                 f"{self.not_accepted} task(s) without an accepted annotation; {len(self.skipped)} skipped"]
        lines += [f"  skipped {task}: {reason}" for task, reason in self.skipped.items()]
        return "\n".join(lines)


# --- the writer ----------------------------------------------------------------------------

def image_keys_from_config(label_config: str | None) -> dict[str, str]:
    """``<Image name=... value="$key">`` of a labeling config as {name: key}; {} when unparsable."""
    if not label_config:
        return {}
    try:
        root = ET.fromstring(label_config)
    except ET.ParseError:
        return {}
    return {tag.get("name", ""): tag.get("value", "").lstrip("$")
            for tag in root.iter() if tag.tag.lower() == "image" and tag.get("value", "").startswith("$")}


def _image_url(task: dict, result: list, image_keys: dict[str, str]) -> str:
    data = task.get("data")
    if not isinstance(data, dict):
        raise BackendError("the task has no 'data' object")
    to_names = [item.get("to_name") for item in result if isinstance(item, dict) and isinstance(item.get("to_name"), str)]
    candidates = [image_keys.get(name) for name in to_names] + to_names + ["image"]
    for key in candidates:
        if isinstance(key, str) and isinstance(data.get(key), str) and data[key]:
            return data[key]
    strings = [value for value in data.values() if isinstance(value, str) and value]
    if len(strings) == 1:
        return strings[0]
    raise BackendError(f"cannot tell which of the task's data fields {sorted(data)} holds the image")


def _task_label(task: object, index: int) -> str:
    task_id = task.get("id") if isinstance(task, dict) else None
    return f"task {task_id}" if isinstance(task_id, int) else f"entry {index}"


def _save_pair(out_dir: Path, stem: str, image: np.ndarray, trimap: np.ndarray) -> None:
    """Write both files under temporary dot-names (ignored by ``training``), then rename them into place."""
    image_path = out_dir / IMAGES_SUBDIR / f"{stem}.jpg"
    trimap_path = out_dir / TRIMAPS_SUBDIR / f"{stem}.png"
    tmp_image = image_path.with_name(f".{stem}.jpg.tmp")
    tmp_trimap = trimap_path.with_name(f".{stem}.png.tmp")
    Image.fromarray(image).save(tmp_image, format="JPEG", quality=JPEG_QUALITY)
    Image.fromarray(trimap, mode="L").save(tmp_trimap, format="PNG")
    os.replace(tmp_trimap, trimap_path)
    os.replace(tmp_image, image_path)


def write_dataset(tasks: Iterable[object], out_dir: str | Path, *, image_source: ImageSource,
                  options: ExportOptions = ExportOptions(), label_config: str | None = None) -> ExportReport:
    """Write one image/trimap pair per task with an accepted mask annotation (brush, bitmask or polygon)."""
    out = Path(out_dir)
    (out / IMAGES_SUBDIR).mkdir(parents=True, exist_ok=True)
    (out / TRIMAPS_SUBDIR).mkdir(parents=True, exist_ok=True)
    report = ExportReport(out)
    image_keys = image_keys_from_config(label_config)
    for index, task in enumerate(tasks):
        label = _task_label(task, index)
        if not isinstance(task, dict):
            report.skipped[label] = f"not a task object ({type(task).__name__})"
            continue
        annotation = accepted_annotation(task, ground_truth_only=options.ground_truth_only)
        if annotation is None:
            report.not_accepted += 1
            continue
        try:
            result = annotation.get("result")
            url = _image_url(task, result if isinstance(result, list) else [], image_keys)
            image = image_source(task, url)
            height, width = image.shape[:2]
            trimap = annotation_to_trimap(result, size=(width, height), roles=options.roles,
                                          boundary_width=options.boundary_width, max_pixels=options.max_pixels)
        except BackendError as exc:
            report.skipped[label] = exc.message
            logger.warning("export: skipped %s: %s", label, exc.message)
            continue
        stem = f"task-{task['id']}" if isinstance(task.get("id"), int) else f"entry-{index}"
        _save_pair(out, stem, image, trimap)
        report.written.append(stem)
    logger.info("export: %s", report.describe().splitlines()[0])
    return report


# --- source: a running Label Studio --------------------------------------------------------

def _api_get(url: str, token: str, path: str, params: dict | None = None):
    try:
        return api_get(url, token, path, params)
    except LabelStudioAPIError as exc:
        raise ExportError(exc.message) from exc


def export_from_label_studio(out_dir: str | Path, *, url: str, token: str, project: int, loader,
                             options: ExportOptions = ExportOptions()) -> ExportReport:
    """Export project ``project``'s annotated tasks through the API; images through ``loader`` (an ImageLoader)."""
    tasks = _api_get(url, token, f"/api/projects/{project}/export", {"exportType": "JSON"})
    if not isinstance(tasks, list):
        raise ExportError(f"Label Studio's export of project {project} is not a list of tasks")
    project_info = _api_get(url, token, f"/api/projects/{project}")
    label_config = project_info.get("label_config") if isinstance(project_info, dict) else None

    def image_source(task: dict, image_url: str) -> np.ndarray:
        task_id = task.get("id") if isinstance(task.get("id"), int) else None
        return loader.load(image_url, label_studio_url=url, token=token, task_id=task_id, project=project)

    return write_dataset(tasks, out_dir, image_source=image_source, options=options, label_config=label_config)


# --- source: an export file and its images ------------------------------------------------

def _contained(root: Path, relative: str) -> Path | None:
    relative = relative.lstrip("/")
    if not relative:
        return None
    candidate = (root / relative).resolve()
    return candidate if candidate.is_relative_to(root) and candidate.is_file() else None


def local_image_candidates(url: str) -> list[str]:
    """Paths, relative to an images folder, where the file behind a task's image URL may lie.

    ``/data/upload/3/x.jpg`` -> ``upload/3/x.jpg``, ``media/upload/3/x.jpg`` (a Label Studio data
    dir), ``3/x.jpg``, ``x.jpg``; ``/data/local-files/?d=dir/x.jpg`` -> ``dir/x.jpg``, ``x.jpg``;
    any other URL or path -> its path and its file name.
    """
    parts = urlsplit(url)
    path = unquote(parts.path)
    out: list[str] = []
    if path.rstrip("/").endswith("/data/local-files"):
        local = parse_qs(parts.query).get("d", [""])[0]
        out += [local]
        path = local
    elif "/data/upload/" in path:
        rest = path.split("/data/upload/", 1)[1]
        out += [f"upload/{rest}", f"media/upload/{rest}", rest]
    else:
        out.append(path)
    out.append(PurePosixPath(path).name)
    return [c for i, c in enumerate(out) if c and c not in out[:i]]


def file_image_source(images_dir: str | Path, *, max_pixels: int, loader=None) -> ImageSource:
    """Images from ``images_dir`` by the task URL's path or file name; else ``loader`` (if any) fetches them."""
    root = Path(images_dir).resolve()

    def image_source(task: dict, url: str) -> np.ndarray:
        for relative in local_image_candidates(url):
            path = _contained(root, relative)
            if path is not None:
                return load_image_file(path, max_pixels=max_pixels)
        if loader is not None and urlsplit(url).scheme in ("http", "https", "data", "s3", "gs", "azure-blob"):
            return loader.load(url, task_id=task.get("id") if isinstance(task.get("id"), int) else None)
        raise BackendError(f"image {url!r} not found under {root}")

    return image_source


def read_export_file(path: str | Path) -> list:
    """The task list of a Label Studio JSON export; :class:`ExportError` naming the file otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ExportError(f"{path}: cannot read the export file ({exc.strerror or exc})") from exc
    except (ValueError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path}: not a JSON file ({exc})") from exc
    if not isinstance(data, list):
        raise ExportError(f"{path}: not a Label Studio JSON export (expected a list of tasks, "
                          f"got {type(data).__name__})")
    return data


def export_from_file(export_file: str | Path, images_dir: str | Path, out_dir: str | Path, *,
                     max_pixels: int, options: ExportOptions = ExportOptions(), loader=None,
                     label_config: str | None = None) -> ExportReport:
    """Write the data set for a JSON export file whose images lie under ``images_dir``."""
    tasks = read_export_file(export_file)
    if not Path(images_dir).is_dir():
        raise ExportError(f"{images_dir}: the images folder does not exist")
    source = file_image_source(images_dir, max_pixels=max_pixels, loader=loader)
    return write_dataset(tasks, out_dir, image_source=source, options=options, label_config=label_config)
