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
    if hierarchy is None:
        return []
    gone = _drop_small_parts(crop, contours, hierarchy[0], (left - 1, top - 1), options.min_area)
    if gone is None:  # a filled hole may have held a component, which then joins the one around it
        contours, hierarchy = _contours(crop, (left - 1, top - 1))
        gone = set()
    links = hierarchy[0]  # per contour: next, previous, first child, parent
    rings: list[np.ndarray] = []
    component: list[int] = []  # per ring: which kept outer contour it belongs to
    rank: list[int] = []  # per ring: 0 for the outer contour, 1, 2, ... for its holes
    for index, contour in enumerate(contours):
        if links[index][3] != -1 or index in gone:
            continue  # a hole (bridged into its outer contour below), or a speck dropped
        outer = _simplify(contour, options.tolerance)
        if len(outer) < 3:
            continue
        holes, child = [], links[index][2]
        while child != -1:
            hole = _simplify(contours[child], options.tolerance) if child not in gone else ()
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


def polygon_to_percent(polygon: np.ndarray, width: int, height: int, *,
                       array: bool = False) -> list[list[float]] | np.ndarray:
    """Pixel-index vertices to Label Studio's ``points``: percent of the image size, at pixel centres.

    ``array``: an (N, 2) float64 array instead of lists, for a JSON encoder that writes numpy arrays
    (orjson writes the same text for it; a Python float per coordinate costs more than the rest).
    """
    scale = np.array([100.0 / width, 100.0 / height])
    points = np.round((polygon + 0.5) * scale, _DECIMALS)
    return points if array else points.tolist()


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


def _drop_small_parts(crop: np.ndarray, contours: Sequence[np.ndarray], links: np.ndarray, offset: tuple[int, int],
                      min_area: int) -> set[int] | None:
    """Clear 8-connected components under ``min_area`` pixels, then fill holes (4-connected background
    parts inside a component) under it, in ``crop`` (uint8 0/1, contours at ``offset``).

    Returns the contours that went with them (the components', their holes', the filled holes'):
    every other border is untouched, so the rest of the contours stay as they are, without tracing
    the whole crop again. None when a filled hole's box holds a kept component: then the contours
    must be traced again (that component now belongs to the one around the hole).

    Each part is counted in its own box, not over the whole crop: a component lies in its outer
    contour's box, a hole in its contour's box (the component's pixels around it), so labelling
    that box counts the part exactly. Only parts whose box says they may be small are counted: n
    8-connected pixels span at most n columns and n rows; a 4-connected hole of n pixels spans w
    columns and h rows with w + h - 1 <= n, and its contour's box is one pixel larger on each side.
    A hole of a removed component is no longer a part of its own (it joins the background around it).
    """
    if min_area <= 1:
        return set()
    boxes = np.array([cv2.boundingRect(contour) for contour in contours]).reshape(-1, 4)
    boxes[:, :2] -= offset
    outer = links[:, 3] == -1
    width, height = boxes[:, 2], boxes[:, 3]
    small = np.where(outer, np.maximum(width, height) < min_area, width + height < min_area + 5)
    gone = set()
    for k in np.flatnonzero(small & outer).tolist():
        if _clear_if_small(crop, boxes[k], contours[k][0, 0] - offset, 0, min_area):
            gone.add(k)
    filled = []
    for k in np.flatnonzero(small & ~outer).tolist():
        seed = _hole_pixel(crop, contours[k], offset) if links[k][3] not in gone else None
        if seed is not None and _clear_if_small(crop, boxes[k], seed, 1, min_area):
            filled.append(k)
    gone.update(filled)
    kept = boxes[outer & ~np.isin(np.arange(len(boxes)), list(gone))]
    for x, y, w, h in boxes[filled].tolist():
        inside = ((kept[:, 0] > x) & (kept[:, 1] > y) & (kept[:, 0] + kept[:, 2] < x + w)
                  & (kept[:, 1] + kept[:, 3] < y + h))
        if inside.any():
            return None
    return gone


def _hole_pixel(crop: np.ndarray, contour: np.ndarray, offset: tuple[int, int]) -> np.ndarray | None:
    """A pixel (x, y in ``crop``) of the hole whose contour this is: a background 4-neighbour of its first
    vertex (a border pixel has one in the hole) inside the contour (one across a thin wall is outside it)."""
    vertex = contour[0, 0]
    for step in ((1, 0), (0, 1), (-1, 0), (0, -1)):
        x, y = vertex + step
        if crop[y - offset[1], x - offset[0]] == 0 and cv2.pointPolygonTest(contour, (float(x), float(y)), False) > 0:
            return np.array((x, y)) - offset
    return None  # not seen: a border pixel always has a 4-neighbour in the hole it borders


def _clear_if_small(crop: np.ndarray, box: np.ndarray, seed: np.ndarray, value: int, min_area: int) -> bool:
    """Set the part of ``crop`` holding ``seed`` (x, y) to ``value`` when it has under ``min_area`` pixels.

    The part: 8-connected object pixels when ``value`` is 0 (a component), 4-connected background
    when it is 1 (a hole); it must lie inside ``box`` (x, y, w, h).
    """
    x, y, w, h = box.tolist()
    part = crop[y:y + h, x:x + w]
    image = part if value == 0 else (part == 0).view(np.uint8)
    _, labels, stats, _ = cv2.connectedComponentsWithStats(image, connectivity=8 if value == 0 else 4)
    label = labels[seed[1] - y, seed[0] - x]
    if label == 0 or stats[label, cv2.CC_STAT_AREA] >= min_area:
        return False
    part[labels == label] = value
    return True


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
