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
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import cv2
import numpy as np

from ml_backend.formats.bounds import MaskFormatError
from ml_backend.formats.bridges import nearest_joints
from ml_backend.formats.small_parts import clear_small_parts, small_parts

if TYPE_CHECKING:
    from ml_backend.settings import Settings

_SUBPIXEL_BITS = 4  # cv2.fillPoly fixed-point fraction: 1/16 pixel
_DECIMALS = 6  # of a percentage: 1e-6 % of a 100 000-pixel side is 0.001 px
_NOTHING = np.zeros((0, 2), np.int32), np.zeros(0, np.int64)  # no outline: no vertices, no ends


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
    vertices, ends = mask_outlines(mask, options)
    return _pieces(vertices, ends)


def mask_to_points(mask: np.ndarray, options: PolygonOptions = PolygonOptions(), *,
                   array: bool = False) -> list[list[list[float]]] | list[np.ndarray]:
    """Label Studio's ``points`` of every polygon of ``mask`` (:func:`mask_to_polygons`, then
    :func:`polygon_to_percent`), converted all at once; ``array`` as in :func:`polygon_to_percent`."""
    vertices, ends = mask_outlines(mask, options)
    if not len(ends):
        return []
    height, width = np.shape(mask)
    points = _pieces(polygon_to_percent(vertices, width, height, array=True), ends)
    return points if array else [polygon.tolist() for polygon in points]


def _pieces(vertices: np.ndarray, ends: np.ndarray) -> list[np.ndarray]:
    """The outlines (views of ``vertices``) that end at ``ends``: slices, ~5x faster than ``np.split``."""
    ends = ends.tolist()
    return [vertices[start:end] for start, end in zip([0, *ends[:-1]], ends)]


def mask_outlines(mask: np.ndarray, options: PolygonOptions = PolygonOptions()) -> tuple[np.ndarray, np.ndarray]:
    """Every outline of :func:`mask_to_polygons` in one (N, 2) int32 array, and where each one ends."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"A mask must be a non-empty 2-D array, got shape {mask.shape}.")
    mask = mask.view(np.uint8) if mask.dtype == np.bool_ else (mask != 0).view(np.uint8)
    left, top, width, height = cv2.boundingRect(mask)  # IPP's is twice as fast: before it is switched off
    if width == 0:
        return _NOTHING
    # Work on the object's bounding box (OpenCV traces a copy with a background margin).
    with _without_ipp():
        return _outlines(mask[top:top + height, left:left + width], (left, top), options)


def _outlines(crop: np.ndarray, offset: tuple[int, int], options: PolygonOptions) -> tuple[np.ndarray, np.ndarray]:
    contours, hierarchy = _contours(crop, offset)
    if hierarchy is None:
        return _NOTHING
    parts = small_parts(crop, contours, hierarchy[0], offset, options.min_area)
    gone = parts.gone
    if parts.retrace:  # a filled hole held a component, which now joins the one around it
        crop = crop.copy()
        clear_small_parts(crop, contours, hierarchy[0], offset, parts)
        contours, hierarchy = _contours(crop, offset)
        gone = np.zeros(len(contours), bool)
    rings, component, rank = _rings(contours, hierarchy[0], gone, options.tolerance)
    if not rings:
        return _NOTHING
    return _bridge(rings, component, rank)


def _rings(contours: Sequence[np.ndarray], links: np.ndarray, gone: np.ndarray,
           tolerance: float) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """The simplified rings to write out, per kept component its outer contour then its holes in OpenCV's order;
    per ring, its component (0, 1, ...) and rank (0 for the outer contour, 1, 2, ... for its holes).

    A component whose simplified outline has fewer than three vertices is dropped with its holes, and so
    is such a hole; ``links``: OpenCV's hierarchy (next, previous, first child, parent) per contour.
    """
    parent = links[:, 3]
    outer = parent == -1
    kept = outer & ~gone
    wanted = np.flatnonzero(kept | (~outer & ~gone & kept[parent]))
    simplified = [_simplify(contours[k], tolerance) for k in wanted.tolist()]
    long_enough = np.zeros(len(contours), bool)
    long_enough[wanted] = np.fromiter((len(ring) >= 3 for ring in simplified), bool, len(wanted))
    kept &= long_enough
    place = np.zeros(len(contours), np.int64)  # a hole's place among its component's holes, from 1
    following = links[:, 0].tolist()
    for first in links[kept, 2].tolist():
        count, child = 1, first
        while child != -1:
            place[child] = count
            count, child = count + 1, following[child]
    owner = np.where(outer, np.arange(len(contours)), parent)
    rings = wanted[long_enough[wanted] & kept[owner[wanted]]]
    rings = rings[np.lexsort((place[rings], owner[rings]))]
    component = np.cumsum(outer[rings]) - 1
    rank = np.arange(len(rings)) - np.flatnonzero(outer[rings])[component]
    at = np.searchsorted(wanted, rings)
    return [simplified[k] for k in at.tolist()], component, rank


def _contours(crop: np.ndarray, offset: tuple[int, int]) -> tuple[Sequence[np.ndarray], np.ndarray | None]:
    return cv2.findContours(crop, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE, offset=offset)


@contextmanager
def _without_ipp() -> Iterator[None]:
    """Intel IPP off in this thread (OpenCV keeps the switch per thread) while outlines are made.

    With IPP on, OpenCV runs a CPUID instruction for each contour and each simplified outline it
    hands back, and CPUID traps to the hypervisor on a virtual machine: ~5 us each on this project's
    VM, 10-30 ms for a mask of 2 000 contours. The outlines are the same without it.
    """
    before = cv2.ipp.useIPP()
    cv2.ipp.setUseIPP(False)
    try:
        yield
    finally:
        cv2.ipp.setUseIPP(before)


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


def _simplify(contour: np.ndarray, tolerance: float) -> np.ndarray:
    if tolerance > 0 and len(contour) > 3:
        simplified = cv2.approxPolyDP(contour, tolerance, True)
        if len(simplified) >= 3:
            contour = simplified
    return contour.reshape(-1, 2)


def _bridge(rings: list[np.ndarray], component: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One outline per component, all in one array: each hole spliced in at its nearest vertex pair, there and
    back along one edge; and where each outline ends.

    Hole k joins the nearest vertex of its outer contour or of its component's holes before it
    (:func:`~ml_backend.formats.bridges.nearest_joints`: a tree of bridges, so the outline stays one
    loop); the loop is then written out once, each hole at its joint (:class:`_Walk`), as ranges of
    the rings' vertices gathered in one step.
    """
    sizes = np.fromiter((len(ring) for ring in rings), np.int64, len(rings))
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    outers = np.flatnonzero(rank == 0)
    holed = np.bincount(component, minlength=len(outers)) > 1  # per component: whether it has holes
    begin: list[int] = []  # per range of vertices (in the rings' order) in the outlines' order: first, last + 1
    end: list[int] = []
    walk = _Walk(rings, starts, sizes, component, rank, holed) if holed.any() else None
    ends = []
    for outer, first, last, has_holes in zip(outers.tolist(), starts[outers].tolist(),
                                             (starts + sizes)[outers].tolist(), holed.tolist()):
        if has_holes:
            walk.ranges(outer, begin, end)
        else:
            begin.append(first)
            end.append(last)
        ends.append(len(end))
    begin, end = np.array(begin, np.int64), np.array(end, np.int64)
    lengths = end - begin
    order = np.repeat(begin - np.cumsum(lengths) + lengths, lengths) + np.arange(int(lengths.sum()))
    # One x, y pair as one int64: a gather of rows, ~4x faster than numpy's on an (N, 2) array.
    points = np.concatenate(rings).reshape(-1, 2).astype(np.int32, copy=False)
    vertices = points.view(np.int64).reshape(-1)[order].view(np.int32).reshape(-1, 2)
    return vertices, np.cumsum(lengths)[np.array(ends) - 1]


class _Walk:
    """The loop of a component with holes as ranges of vertex indices: each ring from its entry vertex (the
    outer contour from its first), at a joint the joined hole (latest first) and back to the joint."""

    def __init__(self, rings: list[np.ndarray], starts: np.ndarray, sizes: np.ndarray, component: np.ndarray,
                 rank: np.ndarray, holed: np.ndarray) -> None:
        bridged = np.flatnonzero(holed[component])  # the rings of components with holes: all a bridge may reach
        joints = nearest_joints([rings[k] for k in bridged.tolist()], component[bridged], rank[bridged])
        holes, ring, vertex, entry = bridged[joints[0]], bridged[joints[1]], joints[2], joints[3]
        first = np.zeros(len(sizes), np.int64)  # per ring: the vertex the walk enters it at
        first[holes] = entry
        place = (vertex - first[ring]) % sizes[ring]  # the joint's place in its ring's walk
        order = np.lexsort((-holes, place, ring))  # by ring, place, then the latest hole first
        self.starts, self.sizes, self.first = starts.tolist(), sizes.tolist(), first.tolist()
        self.hole, self.place, self.vertex = holes[order].tolist(), place[order].tolist(), vertex[order].tolist()
        every = np.arange(len(sizes))
        self.joints_from = np.searchsorted(ring[order], every, "left").tolist()
        self.joints_to = np.searchsorted(ring[order], every, "right").tolist()

    def ranges(self, outer: int, begin: list[int], end: list[int]) -> None:
        """Append the loop of the component whose outer contour is ``outer`` to ``begin`` and ``end``. A stack,
        not recursion: bridges can chain through many holes."""
        starts, sizes, first, joints_from, joints_to = (self.starts, self.sizes, self.first, self.joints_from,
                                                        self.joints_to)

        def rotated(ring: int, low: int, high: int) -> None:  # the ring's walk positions low..high-1
            if low < high:
                base, size, entry = starts[ring], sizes[ring], first[ring]
                low, high = entry + low, entry + high
                if high <= size or low >= size:
                    wrap = size if low >= size else 0
                    begin.append(base + low - wrap)
                    end.append(base + high - wrap)
                else:
                    begin.extend((base + low, base))
                    end.extend((base + size, base + high - size))

        stack: list[tuple[int, int, int, tuple[int, int] | None]] = []  # rings left at a joint
        ring, joint, done, back = outer, joints_from[outer], 0, None
        while True:
            if joint < joints_to[ring]:
                place, hole = self.place[joint] + 1, self.hole[joint]
                if place > done:
                    rotated(ring, done, place)
                    done = place
                stack.append((ring, joint + 1, done, back))
                back = (starts[hole] + first[hole], starts[ring] + self.vertex[joint])
                ring, joint, done = hole, joints_from[hole], 0
                continue
            rotated(ring, done, sizes[ring])
            if back is not None:  # back along the bridge: the hole's entry vertex, then the joint
                begin.extend(back)
                end.extend((back[0] + 1, back[1] + 1))
            if not stack:
                return
            ring, joint, done, back = stack.pop()
