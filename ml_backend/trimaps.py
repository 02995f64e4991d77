"""Label Studio annotations to Oxford-Pets trimaps (1 foreground, 2 background, 3 boundary).

Which annotation of a task counts (:func:`accepted_annotation`): submitted (an export or a
webhook never carries drafts), not cancelled, optionally marked ground truth; of those the
most recently updated one. Deleted annotations are simply absent from an export.

How brush regions become a trimap (:func:`annotation_to_trimap`): each brush label has a role
(:class:`LabelRoles`, defaults by name, configurable). Unpainted pixels are background. When no
region carries a boundary label (the usual case: only the object is painted) the boundary is a
band ``boundary_width`` pixels wide centred on the foreground's edge, as in the Oxford trimaps;
the image border is not an edge. Where regions overlap the later one wins, as Label Studio draws
later regions on top. Non-brush results (the keypoints and rectangles that prompted SAM) are ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import IntEnum

import numpy as np
from PIL import Image

from ml_backend.brush import decode_rle
from ml_backend.errors import BackendError
from ml_backend.security.limits import DEFAULT_MAX_MASK_PIXELS, RequestLimitError, declared_mask_size
from ml_backend.settings import Settings

logger = logging.getLogger(__name__)


class TrimapValue(IntEnum):
    FOREGROUND = 1
    BACKGROUND = 2
    BOUNDARY = 3


class TrimapError(BackendError):
    """An annotation that cannot become a trimap (no usable brush region, inconsistent sizes)."""

    status_code = 422


@dataclass(frozen=True)
class LabelRoles:
    """Which brush label names mean foreground, background and boundary (compared case-insensitively).

    With ``foreground`` empty, every label that is neither background nor boundary (and a region
    without a label) is foreground; otherwise labels in none of the three lists are ignored.
    """

    foreground: tuple[str, ...] = ()
    background: tuple[str, ...] = ("background",)
    boundary: tuple[str, ...] = ("boundary", "border", "edge")

    @classmethod
    def from_settings(cls, settings: Settings) -> "LabelRoles":
        return cls(settings.foreground_labels, settings.background_labels, settings.boundary_labels)

    def role(self, label: str | None) -> TrimapValue | None:
        name = (label or "").strip().lower()
        if name and name in self.boundary:
            return TrimapValue.BOUNDARY
        if name and name in self.background:
            return TrimapValue.BACKGROUND
        if not self.foreground or name in self.foreground:
            return TrimapValue.FOREGROUND
        return None


# --- which annotation counts ---------------------------------------------------------------

def is_accepted(annotation: dict, *, ground_truth_only: bool) -> bool:
    """Submitted and not cancelled (and ground truth, when only those count)."""
    if not isinstance(annotation, dict) or annotation.get("was_cancelled"):
        return False
    return bool(annotation.get("ground_truth")) or not ground_truth_only


def _time(value: object) -> datetime:
    if isinstance(value, str) and value:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
        except ValueError:
            pass
    return datetime.min.replace(tzinfo=timezone.utc)


def accepted_annotation(task: dict, *, ground_truth_only: bool) -> dict | None:
    """The task's most recent accepted annotation (by update time, then id), or None."""
    annotations = task.get("annotations") if isinstance(task, dict) else None
    if not isinstance(annotations, list):
        return None
    accepted = [a for a in annotations if is_accepted(a, ground_truth_only=ground_truth_only)]
    if not accepted:
        return None
    return max(accepted, key=lambda a: (_time(a.get("updated_at") or a.get("created_at")),
                                        a.get("id") if isinstance(a.get("id"), int) else -1))


def has_brush_result(result: object) -> bool:
    return isinstance(result, list) and any(_is_brush(item) for item in result)


def _is_brush(item: object) -> bool:
    if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
        return False
    value = item["value"]
    return item.get("type") == "brushlabels" or (value.get("format") == "rle" and "rle" in value)


# --- regions to a trimap -------------------------------------------------------------------

def _region_size(item: dict, max_pixels: int) -> tuple[int, int]:
    try:
        return declared_mask_size(item.get("original_width"), item.get("original_height"), max_pixels=max_pixels,
                                  what=f"Brush region {_region_name(item)}")
    except RequestLimitError as exc:
        raise TrimapError(exc.message) from None


def _region_name(item: dict) -> str:
    region_id = item.get("id", "?")
    return repr(region_id)[:40] if not isinstance(region_id, str) else region_id[:40]


def _region_labels(item: dict) -> list[str | None]:
    labels = item["value"].get("brushlabels")
    if labels is None or labels == []:
        return [None]
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise TrimapError(f"Brush region {_region_name(item)}: brushlabels must be a list of label names.")
    return labels


def _region_mask(item: dict, size: tuple[int, int], max_pixels: int) -> np.ndarray:
    value = item["value"]
    if value.get("format", "rle") != "rle" or not isinstance(value.get("rle"), list):
        raise TrimapError(f"Brush region {_region_name(item)} is not in Label Studio's RLE format.")
    width, height = _region_size(item, max_pixels)
    mask = decode_rle(value["rle"], height, width, max_pixels=max_pixels)
    if (width, height) != size:
        # Label Studio measured the image differently (EXIF rotation, replaced file): percentages hold.
        logger.warning("brush mask of %dx%d for a %dx%d image; resizing", width, height, *size)
        mask = np.asarray(Image.fromarray(mask).resize(size, Image.Resampling.NEAREST))
    return mask


def _disk_offsets(radius: int) -> list[tuple[int, int]]:
    r = np.arange(-radius, radius + 1)
    dy, dx = np.meshgrid(r, r, indexing="ij")
    inside = dy**2 + dx**2 <= radius**2 + radius  # the "+ radius" rounds the disk like a digital circle
    return list(zip(dy[inside].tolist(), dx[inside].tolist()))


def dilate(mask: np.ndarray, radius: int, *, outside: bool = False) -> np.ndarray:
    """Binary dilation with a disk; pixels beyond the border count as ``outside``.

    Hand-written (shifted ORs) because scipy is not a dependency and Pillow's max filter is square.
    """
    if radius <= 0:
        return mask.copy()
    height, width = mask.shape
    padded = np.pad(mask, radius, constant_values=outside)
    out = np.zeros_like(mask)
    for dy, dx in _disk_offsets(radius):
        out |= padded[radius + dy: radius + dy + height, radius + dx: radius + dx + width]
    return out


def erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary erosion with a disk; the image border does not erode the mask."""
    return ~dilate(~mask, radius, outside=False)


def boundary_band(foreground: np.ndarray, width: int) -> np.ndarray:
    """A band ``width`` pixels wide along the foreground's edge: ⌈w/2⌉ outside it, ⌊w/2⌋ inside."""
    if width <= 0 or not foreground.any():
        return np.zeros_like(foreground)
    return dilate(foreground, (width + 1) // 2) & ~erode(foreground, width // 2)


def annotation_to_trimap(
    result: Sequence[dict], *, size: tuple[int, int] | None = None, roles: LabelRoles = LabelRoles(),
    boundary_width: int = 4, max_pixels: int = DEFAULT_MAX_MASK_PIXELS,
) -> np.ndarray:
    """A (height, width) uint8 trimap from an annotation's ``result`` list.

    ``size`` is the (width, height) of the image the trimap must match (default: the brush
    regions' ``original_width``/``original_height``); no region may declare more than ``max_pixels``
    (checked before decoding). Raises :class:`TrimapError` (or the brush
    codec's ``InvalidRLEError``) when there is no usable brush region or one is malformed.
    """
    if not isinstance(result, list):
        raise TrimapError("An annotation's result must be a list.")
    brushes = [item for item in result if _is_brush(item)]
    if not brushes:
        raise TrimapError("The annotation has no brush region (only keypoints/rectangles or nothing).")
    if size is None:
        sizes = {_region_size(item, max_pixels) for item in brushes}
        if len(sizes) > 1:
            raise TrimapError(f"Brush regions disagree about the image size: {sorted(sizes)}.")
        size = sizes.pop()
    width, height = size
    trimap = np.full((height, width), TrimapValue.BACKGROUND, np.uint8)
    used, boundary_painted = 0, False
    for item in brushes:
        labels = _region_labels(item)
        role = next((r for r in map(roles.role, labels) if r is not None), None)
        if role is None:
            logger.debug("ignoring brush region with labels %s", labels)
            continue
        trimap[_region_mask(item, size, max_pixels)] = role
        boundary_painted |= role == TrimapValue.BOUNDARY
        used += 1
    if not used:
        raise TrimapError("No brush region carries a foreground, background or boundary label "
                          f"(labels seen: {_labels_seen(brushes)}).")
    if not boundary_painted:
        trimap[boundary_band(trimap == TrimapValue.FOREGROUND, boundary_width)] = TrimapValue.BOUNDARY
    return trimap


def _labels_seen(brushes: Iterable[dict]) -> list[str]:
    return sorted({str(label) for item in brushes for label in _region_labels(item) if label is not None})
