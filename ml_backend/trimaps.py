"""Label Studio annotations to Oxford-Pets trimaps (1 foreground, 2 background, 3 boundary).

Which annotation of a task counts (:func:`accepted_annotation`): submitted (an export or a
webhook never carries drafts), not cancelled, optionally marked ground truth; of those the
most recently updated one. Deleted annotations are simply absent from an export.

How mask regions -- brush RLE, bitmask PNG or polygon, read by :mod:`ml_backend.formats` -- become
a trimap (:func:`annotation_to_trimap`): each region label has a role
(:class:`LabelRoles`, defaults by name, configurable). Unpainted pixels are background. When no
region carries a boundary label (the usual case: only the object is painted) the boundary is a
band ``boundary_width`` pixels wide centred on the foreground's edge, as in the Oxford trimaps;
the image border is not an edge. Where regions overlap the later one wins, as Label Studio draws
later regions on top. Other results (the keypoints and rectangles that prompted SAM) are ignored.
No declared size beyond ``max_pixels`` (the ``MAX_IMAGE_PIXELS`` setting) is ever allocated.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import IntEnum

import numpy as np

from ml_backend.errors import BackendError
from ml_backend.formats import declared_size, region_labels, region_mask, result_type_of
from ml_backend.settings import Settings

logger = logging.getLogger(__name__)


class TrimapValue(IntEnum):
    FOREGROUND = 1
    BACKGROUND = 2
    BOUNDARY = 3


class TrimapError(BackendError):
    """An annotation that cannot become a trimap (no usable mask region, inconsistent sizes)."""

    status_code = 422


@dataclass(frozen=True)
class LabelRoles:
    """Which mask label names mean foreground, background and boundary (compared case-insensitively).

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


def has_mask_result(result: object) -> bool:
    """Whether an annotation's result holds a brush, bitmask or polygon region."""
    return isinstance(result, list) and any(result_type_of(item) is not None for item in result)


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
    boundary_width: int = 4, max_pixels: int = Settings.max_image_pixels,
) -> np.ndarray:
    """A (height, width) uint8 trimap from an annotation's ``result`` list.

    ``size`` is the (width, height) of the image the trimap must match (default: the mask
    regions' ``original_width``/``original_height``). Raises :class:`TrimapError` (or the mask
    readers' ``MaskFormatError``/``InvalidRLEError``) when there is no usable mask region, one is
    malformed, or a size exceeds ``max_pixels``.
    """
    if not isinstance(result, list):
        raise TrimapError("An annotation's result must be a list.")
    regions = [item for item in result if result_type_of(item) is not None]
    if not regions:
        raise TrimapError("The annotation has no mask region (brush, bitmask or polygon; "
                          "only keypoints/rectangles or nothing).")
    if size is None:
        sizes = {declared_size(item, max_pixels=max_pixels) for item in regions}
        if len(sizes) > 1:
            raise TrimapError(f"Mask regions disagree about the image size: {sorted(sizes)}.")
        size = sizes.pop()
    width, height = size
    trimap = np.full((height, width), TrimapValue.BACKGROUND, np.uint8)
    used, boundary_painted = 0, False
    for item in regions:
        labels = region_labels(item) or [None]
        role = next((r for r in map(roles.role, labels) if r is not None), None)
        if role is None:
            logger.debug("ignoring mask region with labels %s", labels)
            continue
        trimap[region_mask(item, size, max_pixels=max_pixels)] = role
        boundary_painted |= role == TrimapValue.BOUNDARY
        used += 1
    if not used:
        raise TrimapError("No mask region carries a foreground, background or boundary label "
                          f"(labels seen: {_labels_seen(regions)}).")
    if not boundary_painted:
        trimap[boundary_band(trimap == TrimapValue.FOREGROUND, boundary_width)] = TrimapValue.BOUNDARY
    return trimap


def _labels_seen(regions: Iterable[dict]) -> list[str]:
    return sorted({str(label) for item in regions for label in region_labels(item)})
