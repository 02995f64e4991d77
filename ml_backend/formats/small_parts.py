"""Which contours of a mask belong to parts under ``min_area`` pixels: components to drop, holes to fill.

The rule (:mod:`ml_backend.formats.polygon`): an 8-connected component of fewer than ``min_area``
pixels is dropped; then a hole (a 4-connected background part inside a kept component) of fewer
than ``min_area`` pixels is filled, counting the pixels of the dropped components inside it as
background. A hole of a dropped component is no part of its own.

The pixels are counted from the contours themselves, not from the image: OpenCV's contours
(``RETR_CCOMP``, ``CHAIN_APPROX_SIMPLE``) run through pixel centres, horizontally, vertically or
diagonally, so each is a closed lattice path, and Pick's theorem counts the lattice points it
encloses from its area A and the lattice steps B along it (a point passed twice counted twice):

- a component's outer contour holds A + B/2 + 1 pixels on or inside it (the component, its holes
  and whatever lies in them), and each of its holes' contours A - B/2 + 1 strictly inside it, so
  the component has the first less the sum of the second;
- a hole holds A - B/2 + 1 pixels strictly inside its contour: its background, and any components
  (with their holes) inside it. When every component in it is dropped, that is the hole's count.

A hole with a kept component inside its box is counted the first implementation's way, on the
image (rare: a tiny hole around a kept island); if it is filled, that island joins the component
around it and the caller must trace again, on the image with the small parts cleared
(:func:`clear_small_parts`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np


_PAIR_BLOCK = 1 << 20  # box pairs compared at a time


@dataclass(frozen=True)
class SmallParts:
    """Per contour: ``gone`` (a dropped component's outer contour or a filled hole's); ``retrace`` when a
    filled hole held a kept component; ``holes`` (the filled holes, for :func:`clear_small_parts`)."""

    gone: np.ndarray
    retrace: bool
    holes: np.ndarray


def small_parts(crop: np.ndarray, contours: Sequence[np.ndarray], links: np.ndarray, offset: tuple[int, int],
                min_area: int) -> SmallParts:
    """The contours of the parts of ``crop`` (uint8, 0/1; contours traced at ``offset``) under ``min_area``
    pixels; ``links``: OpenCV's hierarchy (next, previous, first child, parent) per contour."""
    count = len(contours)
    if min_area <= 1 or count == 0:
        return SmallParts(np.zeros(count, bool), False, np.zeros(0, np.int64))
    boxes, twice_area, steps = _geometry(contours)
    boxes[:, :2] -= offset
    parent = links[:, 3]
    outer = parent == -1
    holes = np.flatnonzero(~outer)
    inside = np.zeros(count, np.int64)  # twice the points strictly inside each hole's contour, summed per parent
    np.add.at(inside, parent[holes], twice_area[holes] - steps[holes] + 2)
    gone = outer & (twice_area + steps + 2 - inside < 2 * min_area)
    # A hole's contour box is its background's box one pixel larger on each side; n 4-connected pixels
    # span w columns and h rows with w + h - 1 <= n: only such boxes may hold a small hole.
    candidates = holes[~gone[parent[holes]] & (boxes[holes, 2] + boxes[holes, 3] < min_area + 5)]
    crowded = _holding(boxes[candidates], boxes[outer & ~gone]) if candidates.size else np.zeros(0, bool)
    simple, crowded = candidates[~crowded], candidates[crowded]
    filled = simple[twice_area[simple] - steps[simple] + 2 < 2 * min_area]
    counted = [k for k in crowded.tolist()
               if _hole_pixels(crop, contours, boxes, gone, k, offset) < min_area]
    gone[filled] = True
    gone[counted] = True
    return SmallParts(gone, bool(counted), np.sort(np.concatenate((filled, counted)).astype(np.int64)))


def clear_small_parts(crop: np.ndarray, contours: Sequence[np.ndarray], links: np.ndarray,
                      offset: tuple[int, int], parts: SmallParts) -> None:
    """Clear the dropped components and fill the filled holes of ``parts`` in ``crop`` (in place)."""
    boxes, _, _ = _geometry(contours)
    boxes[:, :2] -= offset
    for k in np.flatnonzero(parts.gone & (links[:, 3] == -1)).tolist():
        _set_part(crop, boxes[k], contours[k][0, 0] - offset, 0)
    for k in parts.holes.tolist():
        seed = _hole_seed(crop, contours[k], offset)
        if seed is not None:
            _set_part(crop, boxes[k], seed, 1)


def _geometry(contours: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per contour: its box (x, y, w, h), twice its area and its lattice steps, for all contours at once."""
    sizes = np.fromiter((len(contour) for contour in contours), np.int64, len(contours))
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    last = starts + sizes - 1
    points = np.concatenate(contours).reshape(-1, 2)
    x, y = points[:, 0].astype(np.int64), points[:, 1].astype(np.int64)
    low_x, low_y = np.minimum.reduceat(x, starts), np.minimum.reduceat(y, starts)
    boxes = np.stack((low_x, low_y, np.maximum.reduceat(x, starts) - low_x + 1,
                      np.maximum.reduceat(y, starts) - low_y + 1), 1)
    next_x, next_y = np.empty_like(x), np.empty_like(y)
    next_x[:-1], next_y[:-1] = x[1:], y[1:]
    next_x[last], next_y[last] = x[starts], y[starts]  # each contour closes on its first point
    twice_area = np.abs(np.add.reduceat(x * next_y - next_x * y, starts))
    steps = np.add.reduceat(np.maximum(np.abs(next_x - x), np.abs(next_y - y)), starts)
    return boxes, twice_area, steps


def _holding(outside: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Per box of ``outside``: whether one of ``boxes`` lies strictly inside it (x, y, w, h each). Only the
    boxes that start within its columns are compared, ``_PAIR_BLOCK`` pairs at a time."""
    order = np.argsort(boxes[:, 0], kind="stable")
    left = boxes[order, 0]
    begin = np.searchsorted(left, outside[:, 0], "right")
    counts = np.maximum(np.searchsorted(left, outside[:, 0] + outside[:, 2], "left") - begin, 0)
    holding = np.zeros(len(outside), bool)
    totals = np.cumsum(counts)
    first = 0
    while first < len(outside):  # blocks of whole boxes of ``outside``, each at least one
        last = max(int(np.searchsorted(totals, totals[first] - counts[first] + _PAIR_BLOCK, "right")), first + 1)
        block = slice(first, last)
        which = np.repeat(np.arange(first, last), counts[block])
        ramp = np.arange(len(which)) - np.repeat(np.cumsum(counts[block]) - counts[block], counts[block])
        inside = _inside(boxes[order[begin[which] + ramp]], outside[which])
        holding[which[inside]] = True
        first = last
    return holding


def _inside(boxes: np.ndarray, around: np.ndarray) -> np.ndarray:
    """Whether each of ``boxes`` lies strictly inside ``around`` (x, y, w, h; broadcast)."""
    return ((boxes[..., 0] > around[..., 0]) & (boxes[..., 1] > around[..., 1])
            & (boxes[..., 0] + boxes[..., 2] < around[..., 0] + around[..., 2])
            & (boxes[..., 1] + boxes[..., 3] < around[..., 1] + around[..., 3]))


def _hole_pixels(crop: np.ndarray, contours: Sequence[np.ndarray], boxes: np.ndarray, gone: np.ndarray, hole: int,
                 offset: tuple[int, int]) -> int:
    """The pixels of a hole (4-connected background) with the dropped components inside its box counted as
    background; a large number when its seed is not found (the hole is then kept)."""
    seed = _hole_seed(crop, contours[hole], offset)
    if seed is None:
        return np.iinfo(np.int64).max
    x, y, w, h = boxes[hole].tolist()
    part = crop[y:y + h, x:x + w]
    background = part == 0
    dropped = np.flatnonzero(gone)
    dropped = dropped[_inside(boxes[dropped], boxes[hole])]
    if dropped.size:
        _, labels = cv2.connectedComponents(part, connectivity=8)
        firsts = np.array([contours[k][0, 0] for k in dropped.tolist()]) - offset - (x, y)
        background |= np.isin(labels, labels[firsts[:, 1], firsts[:, 0]])
    _, labels, stats, _ = cv2.connectedComponentsWithStats(background.view(np.uint8), connectivity=4)
    return int(stats[labels[seed[1] - y, seed[0] - x], cv2.CC_STAT_AREA])


def _hole_seed(crop: np.ndarray, contour: np.ndarray, offset: tuple[int, int]) -> np.ndarray | None:
    """A pixel (x, y in ``crop``) of the hole whose contour this is: a background 4-neighbour of its first
    vertex (a border pixel has one in the hole) inside the contour (one across a thin wall is outside it)."""
    vertex = contour[0, 0]
    for step in ((1, 0), (0, 1), (-1, 0), (0, -1)):
        x, y = vertex + step
        if crop[y - offset[1], x - offset[0]] == 0 and cv2.pointPolygonTest(contour, (float(x), float(y)), False) > 0:
            return np.array((x, y)) - offset
    return None  # not seen: a border pixel always has a 4-neighbour in the hole it borders


def _set_part(crop: np.ndarray, box: np.ndarray, seed: np.ndarray, value: int) -> None:
    """Set the part of ``crop`` holding ``seed`` (x, y) to ``value``: 8-connected object pixels when ``value``
    is 0 (a component), 4-connected background when it is 1 (a hole); it lies inside ``box`` (x, y, w, h)."""
    x, y, w, h = box.tolist()
    part = crop[y:y + h, x:x + w]
    image = part if value == 0 else (part == 0).view(np.uint8)
    _, labels = cv2.connectedComponents(image, connectivity=8 if value == 0 else 4)
    label = labels[seed[1] - y, seed[0] - x]
    if label:
        part[labels == label] = value
