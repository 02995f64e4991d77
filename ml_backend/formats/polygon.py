"""Masks as Label Studio ``PolygonLabels`` outlines, and outlines back to masks.

The value is ``{"points": [[x%, y%], ...], "closed": true, "polygonlabels": [...]}``, points in
percent of the image's original size (Label Studio 1.23.2 editor, ``regions/PolygonRegion.jsx``
``serialize()``; its COCO export turns them into pixels as ``x / 100 * original_width``).

Geometry. A vertex at mask pixel (col, row) stands for that pixel's centre, (col + 0.5, row + 0.5)
in the image's continuous coordinates. Contours come from OpenCV (``cv2.findContours``, Suzuki's
border following) through the centres of the object's boundary pixels, so an outline drawn in the
editor lies half a pixel inside the painted area's outer edge. Reading back
(:func:`polygon_to_mask`, ``cv2.fillPoly``) fills every pixel whose centre is inside or on the
outline: an unsimplified contour comes back pixel-exact.

Components and holes. One polygon per 8-connected component of at least ``min_area`` pixels
(smaller ones are dropped; holes smaller than ``min_area`` are filled). Label Studio polygons
have no holes, so each remaining hole is cut in with a *bridge*: the outline walks from its
nearest vertex to the hole's nearest vertex, around the hole in the opposite direction, and
back along the same zero-width edge. Even-odd and non-zero filling (the editor's canvas, our
reader) both leave the hole empty, and the bridge runs over object pixels, so nothing is lost
to it. Components whose outline has fewer than three vertices (lines one pixel wide) have no
area in Label Studio and are dropped.

Simplification: Douglas–Peucker (``cv2.approxPolyDP``) with ``tolerance`` pixels; 0 keeps every
corner of the pixel outline (``CHAIN_APPROX_SIMPLE``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from ml_backend.formats.bounds import MaskFormatError
from ml_backend.formats.bridges import nearest_joints

if TYPE_CHECKING:
    from ml_backend.settings import Settings

_SUBPIXEL_BITS = 4  # cv2.fillPoly fixed-point fraction: 1/16 pixel
_DECIMALS = 6  # of a percentage: 1e-6 % of a 100 000-pixel side is 0.001 px


@dataclass(frozen=True)
class PolygonOptions:
    """How masks become polygons: the smallest component/hole kept (pixels) and the simplification (pixels)."""

    min_area: int = 16
    tolerance: float = 1.0

    @classmethod
    def from_settings(cls, settings: "Settings") -> "PolygonOptions":
        return cls(settings.polygon_min_area, settings.polygon_tolerance)


def mask_to_polygons(mask: np.ndarray, options: PolygonOptions = PolygonOptions()) -> list[np.ndarray]:
    """One (N, 2) int array of x, y pixel indices per kept component (holes bridged in); [] for an empty mask."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"A mask must be a non-empty 2-D array, got shape {mask.shape}.")
    mask = mask.view(np.uint8) if mask.dtype == np.bool_ else (mask != 0).view(np.uint8)
    left, top, width, height = cv2.boundingRect(mask)
    if width == 0:
        return []
    # Work on the object's bounding box with a one-pixel margin: the outside is then one background part.
    crop = cv2.copyMakeBorder(mask[top:top + height, left:left + width], 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
    contours, hierarchy = _contours(crop, (left - 1, top - 1))
    if hierarchy is not None and _may_have_small_parts(contours, options.min_area):
        _drop_small_parts(crop, options.min_area)
        contours, hierarchy = _contours(crop, (left - 1, top - 1))
    if hierarchy is None:
        return []
    links = hierarchy[0]  # per contour: next, previous, first child, parent
    rings: list[np.ndarray] = []
    component: list[int] = []  # per ring: which kept outer contour it belongs to
    rank: list[int] = []  # per ring: 0 for the outer contour, 1, 2, ... for its holes
    for index, contour in enumerate(contours):
        if links[index][3] != -1:
            continue  # a hole: bridged into its outer contour below
        outer = _simplify(contour, options.tolerance)
        if len(outer) < 3:
            continue
        holes, child = [], links[index][2]
        while child != -1:
            hole = _simplify(contours[child], options.tolerance)
            if len(hole) >= 3:
                holes.append(hole)
            child = links[child][0]
        component += [component[-1] + 1 if component else 0] * (1 + len(holes))
        rank += range(1 + len(holes))
        rings += [outer, *holes]
    if not rings:
        return []
    return _bridge(rings, np.array(component), np.array(rank))


def _contours(crop: np.ndarray, offset: tuple[int, int]) -> tuple[Sequence[np.ndarray], np.ndarray | None]:
    return cv2.findContours(crop, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE, offset=offset)


def _may_have_small_parts(contours: Sequence[np.ndarray], min_area: int) -> bool:
    """Whether a component or hole of under ``min_area`` pixels may exist, from the contours' boxes alone.

    A connected part of n pixels spans at most n rows and n columns, and a hole's contour runs at most
    one pixel outside the hole: a part whose contour's box is min_area + 2 pixels wide or high (or
    more) is large. Only when some box is smaller do the connected components have to be counted.
    """
    if min_area <= 1:
        return False
    return any(w < min_area + 2 and h < min_area + 2 for _, _, w, h in map(cv2.boundingRect, contours))


def polygon_to_percent(polygon: np.ndarray, width: int, height: int) -> list[list[float]]:
    """Pixel-index vertices to Label Studio's ``points``: percent of the image size, at pixel centres."""
    scale = np.array([100.0 / width, 100.0 / height])
    return np.round((polygon + 0.5) * scale, _DECIMALS).tolist()


def polygon_to_mask(points: object, width: int, height: int) -> np.ndarray:
    """The (height, width) bool mask of one Label Studio ``points`` list (pixels whose centre is inside or on it).

    Vertices outside the image are moved onto its edge. ``closed`` is not consulted: like Label
    Studio's COCO export, an unfinished outline counts as closed. Raises :class:`MaskFormatError` when
    ``points`` is not a list of at least three [x, y] pairs of finite numbers.
    """
    vertices = _percent_points(points) * np.array([width / 100.0, height / 100.0]) - 0.5
    vertices = np.clip(vertices, -1.0, [width, height])
    fixed = np.round(vertices * (1 << _SUBPIXEL_BITS)).astype(np.int32)
    canvas = np.zeros((height, width), np.uint8)
    cv2.fillPoly(canvas, [fixed], 1, lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)
    return canvas.astype(bool)


def _percent_points(points: object) -> np.ndarray:
    if not isinstance(points, list) or len(points) < 3:
        raise MaskFormatError("A polygon's points must be a list of at least three [x, y] pairs.")
    if not all(isinstance(p, (list, tuple)) and len(p) == 2 and all(_finite(v) for v in p) for p in points):
        raise MaskFormatError("A polygon's points must be [x, y] pairs of finite numbers (percent of the image).")
    return np.array(points, np.float64)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _drop_small_parts(crop: np.ndarray, min_area: int) -> None:
    """Clear 8-connected components under ``min_area`` pixels and fill holes under it, in place.

    ``crop`` (uint8 0/1) has an empty one-pixel margin, so the background that reaches it is
    one 4-connected part and every other background part is a hole.
    """
    if min_area <= 1:
        return
    specks = _small_parts(crop, 8, min_area)
    if specks is not None:
        crop[specks] = 0
    holes = _small_parts(1 - crop, 4, min_area)
    if holes is not None:
        crop[holes] = 1


_LOOP_LIMIT = 64  # up to this many small parts are picked out box by box; more: one pass over the image


def _small_parts(image: np.ndarray, connectivity: int, min_area: int) -> np.ndarray | None:
    """The pixels of ``image``'s non-zero components under ``min_area`` pixels, None when there are none.

    The component at the corner (the margin, when ``image`` is the background) is never one.
    """
    _, labels, stats, _ = cv2.connectedComponentsWithStats(image, connectivity=connectivity)
    small = stats[:, cv2.CC_STAT_AREA] < min_area
    small[0] = small[labels[0, 0]] = False  # label 0: the zero pixels
    found = np.flatnonzero(small)
    if found.size == 0:
        return None
    if found.size > _LOOP_LIMIT:
        return small[labels]
    selected = np.zeros(image.shape, bool)
    for k in found:
        x, y, w, h = stats[k, :4]
        box = (slice(y, y + h), slice(x, x + w))
        selected[box] |= labels[box] == k
    return selected


def _simplify(contour: np.ndarray, tolerance: float) -> np.ndarray:
    if tolerance > 0 and len(contour) > 3:
        simplified = cv2.approxPolyDP(contour, tolerance, True)
        if len(simplified) >= 3:
            contour = simplified
    return contour.reshape(-1, 2)


def _bridge(rings: list[np.ndarray], component: np.ndarray, rank: np.ndarray) -> list[np.ndarray]:
    """One outline per component: each hole spliced in at its nearest vertex pair, there and back along one edge.

    Hole k joins the nearest vertex of its outer contour or of its component's holes before it
    (:func:`~ml_backend.formats.bridges.nearest_joints`: a tree of bridges, so the outline stays one
    loop); the loop is then written out once, each hole at its joint.
    """
    joints: list[dict[int, list[tuple[int, int]]]] = [{} for _ in rings]  # per ring: vertex -> [(hole, entry)]
    for hole, ring, vertex, entry in zip(*(a.tolist() for a in nearest_joints(rings, component, rank))):
        joints[ring].setdefault(vertex, []).append((hole, entry))
    return [np.concatenate(_walk(rings, joints, outer)) for outer in np.flatnonzero(rank == 0).tolist()]


def _walk(rings: list[np.ndarray], joints: list[dict[int, list[tuple[int, int]]]], outer: int) -> list[np.ndarray]:
    """The loop's pieces: each ring from its entry vertex, at a joint the joined hole (latest first) and
    back to the joint. A stack, not recursion: bridges can chain through many holes."""
    pieces: list[np.ndarray] = []
    stack = [_ring_steps(rings, joints, outer, 0)]
    while stack:
        step = next(stack[-1], None)
        if step is None:
            stack.pop()
        elif isinstance(step, tuple):
            stack.append(_ring_steps(rings, joints, *step))
        else:
            pieces.append(step)
    return pieces


def _ring_steps(rings: list[np.ndarray], joints: list[dict[int, list[tuple[int, int]]]], ring: int,
                start: int) -> Iterator[np.ndarray | tuple[int, int]]:
    """Yields the ring's vertices from ``start`` (arrays) and, at each joint, (hole, entry) to walk first."""
    vertices, n = rings[ring], len(rings[ring])
    rotated = np.concatenate((vertices[start:], vertices[:start])) if start else vertices
    done = 0
    for offset in sorted((vertex - start) % n for vertex in joints[ring]):
        vertex = (offset + start) % n
        yield rotated[done:offset + 1]
        for hole, entry in reversed(joints[ring][vertex]):
            yield hole, entry
            yield np.array((rings[hole][entry], vertices[vertex]))
        done = offset + 1
    yield rotated[done:]
