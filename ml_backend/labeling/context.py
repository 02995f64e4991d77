"""Label Studio's interactive context (smart keypoints and rectangles) turned into SAM prompts.

Coordinates. Every context item gives ``x``/``y`` (and a rectangle's ``width``/``height``)
in percent of ``original_width``/``original_height``, the image's natural size as the
browser decoded it -- with its EXIF orientation applied, which is how our image loader
reads it too. ``image_rotation`` (0/90/180/270) is only how the editor shows the image: in
Label Studio 1.23 the rotate tool turns the whole Konva stage (``Image.rotate`` changes the
view rotation and zoom, never the regions), and each region serialises its own unrotated
coordinates with ``original_width``/``original_height`` of the unrotated image (older
editors rotated the points back before saving, with the same result). So the same click
gives the same numbers at any ``image_rotation``; we check that it is a number and do not
transform by it.

A rectangle's ``x``/``y`` is its top-left corner before rotation and ``rotation`` turns it
clockwise (y points down) about that corner, in pixel space. SAM takes axis-aligned boxes,
so a rotated rectangle becomes the bounding box of its four corners, clipped to the image.

This module reads one request (:func:`read_context`) and groups prompts into regions
(:func:`group_regions`); each item keeps its editor *group* (tag and labels), which
``ml_backend.prompt_state`` uses to combine requests, since the editor sends one group at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ml_backend.errors import InvalidPromptError
from ml_backend.labeling.config import KEYPOINT_TAGS, LabelConfig
from ml_backend.sam.prompts import NEGATIVE, POSITIVE, Prompts
from ml_backend.settings import DEFAULT_NEGATIVE_LABELS

PERCENT_TOLERANCE = 0.5  # percentage points a coordinate may stray outside 0-100 (then clamped)


@dataclass(frozen=True)
class PromptRegion:
    """The prompts for one brush region, in pixels of an ``original_width`` x ``original_height`` image.

    ``label`` is the prompt's label (a rectangle's, or the first positive keypoint's), used to
    choose the brush label; ``item_ids`` are the ids of the context items it was built from.
    """

    prompts: Prompts
    label: str | None
    original_width: int
    original_height: int
    item_ids: tuple[str, ...] = ()

    @property
    def original_size(self) -> tuple[int, int]:
        """(width, height) the prompts' pixels refer to."""
        return self.original_width, self.original_height


RECTANGLE_REACH = 0.25  # a keypoint refines a rectangle up to this fraction of its size beyond each side

GroupKey = tuple[str, tuple[str, ...]]  # (from_name, lower-cased labels): how the editor batches regions


@dataclass(frozen=True)
class KeyPoint:
    """One smart keypoint in pixels. ``positive`` folds ``is_positive`` and negative label names together;
    ``label`` is its first label that is not a negative one."""

    x: float
    y: float
    positive: bool
    label: str | None
    item_id: str | None
    group: GroupKey
    negative_label: bool = False  # labelled e.g. "Background" (the editor sends such clicks alone)


@dataclass(frozen=True)
class Rectangle:
    """One smart rectangle: its top-left ``anchor``, ``size`` and clockwise ``angle`` in pixels, and the
    axis-aligned ``box`` SAM gets."""

    anchor: tuple[float, float]
    size: tuple[float, float]
    angle: float  # radians, clockwise on screen
    box: tuple[float, float, float, float]
    label: str | None
    item_id: str | None
    group: GroupKey

    def contains(self, x: float, y: float, reach: float = 0.0) -> bool:
        """Whether (x, y) lies in the rectangle grown by ``reach`` times its size beyond each side."""
        dx, dy = x - self.anchor[0], y - self.anchor[1]
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        u, v = dx * cos + dy * sin, -dx * sin + dy * cos
        mu, mv = reach * self.size[0] + 1e-6, reach * self.size[1] + 1e-6
        return -mu <= u <= self.size[0] + mu and -mv <= v <= self.size[1] + mv

    def reaches(self, x: float, y: float) -> bool:
        """Whether a keypoint at (x, y) refines this rectangle (see ``RECTANGLE_REACH``)."""
        return self.contains(x, y, RECTANGLE_REACH)

    @property
    def area(self) -> float:
        return self.size[0] * self.size[1]


@dataclass(frozen=True)
class ContextPrompts:
    """The validated prompts of one request, in pixels of a ``size`` = (width, height) image."""

    points: tuple[KeyPoint, ...]
    rectangles: tuple[Rectangle, ...]
    size: tuple[int, int]

    @property
    def groups(self) -> set[GroupKey]:
        return {p.group for p in self.points} | {r.group for r in self.rectangles}


def read_context(
    context: Mapping[str, Any] | None,
    config: LabelConfig,
    *,
    negative_labels: Iterable[str] = DEFAULT_NEGATIVE_LABELS,
) -> ContextPrompts | None:
    """The keypoints and rectangles of Label Studio's interactive context; None when it has none.

    A keypoint is negative when ``is_positive`` is false or one of its labels is in
    ``negative_labels`` (case-insensitive). Raises :class:`InvalidPromptError` naming the
    offending item.
    """
    if context is None:
        return None
    if not isinstance(context, Mapping):
        raise InvalidPromptError(f"The interactive context must be a JSON object, got {type(context).__name__}.")
    items = context.get("result")
    if items is None:
        return None
    if not isinstance(items, list):
        raise InvalidPromptError(f"context.result must be a list of regions, got {type(items).__name__}.")

    negatives = {name.lower() for name in negative_labels}
    size: tuple[int, int] | None = None
    points: list[KeyPoint] = []
    rectangles: list[Rectangle] = []
    for index, item in enumerate(items):
        reader = _ItemReader(index, item, config)
        item_size = reader.original_size()
        if size is None:
            size = item_size
        elif item_size != size:
            raise InvalidPromptError(
                f"{reader.name} is for a {item_size[0]}x{item_size[1]} image but earlier items are for "
                f"{size[0]}x{size[1]}; all prompts must come from the same image."
            )
        if reader.tag.result_type in KEYPOINT_TAGS:
            points.append(reader.point(item_size, negatives))
        else:
            rectangles.append(reader.rectangle(item_size))
    if size is None:
        return None
    return ContextPrompts(tuple(points), tuple(rectangles), size)


def parse_context(
    context: Mapping[str, Any] | None,
    config: LabelConfig,
    *,
    negative_labels: Iterable[str] = DEFAULT_NEGATIVE_LABELS,
) -> list[PromptRegion]:
    """The request's prompts on their own (no memory of earlier requests): see :func:`group_regions`.
    No context, or an empty ``result``, gives []."""
    prompts = read_context(context, config, negative_labels=negative_labels)
    return [] if prompts is None else group_regions(prompts.points, prompts.rectangles, prompts.size)


def group_regions(
    points: Iterable[KeyPoint], rectangles: Iterable[Rectangle], size: tuple[int, int]
) -> list[PromptRegion]:
    """One :class:`PromptRegion` per rectangle (with the keypoints it reaches), plus one for the other keypoints.

    A keypoint refines the smallest rectangle that reaches it (the rectangle grown by
    ``RECTANGLE_REACH`` of its size beyond each side). Negative keypoints outside every
    rectangle, with no positive one beside them, are given to every rectangle (they can only
    remove area); with no rectangle either, there is nothing to segment and that is an error.
    """
    points, rectangles = list(points), list(rectangles)
    inside: list[list[KeyPoint]] = [[] for _ in rectangles]
    outside: list[KeyPoint] = []
    for point in points:
        holders = [i for i, rect in enumerate(rectangles) if rect.reaches(point.x, point.y)]
        if holders:
            inside[min(holders, key=lambda i: rectangles[i].area)].append(point)
        else:
            outside.append(point)

    outside_has_positive = any(p.positive for p in outside)
    if outside and not outside_has_positive:
        if not rectangles:
            raise InvalidPromptError(
                "All keypoints are negative (is_positive false, or a label such as 'Background'), so there is "
                "nothing to segment: click the object with its own label first, then Alt+click to remove areas."
            )
        inside = [group + outside for group in inside]

    regions = [_region(group, rect.box, rect.label, [rect.item_id], size) for group, rect in zip(inside, rectangles)]
    if outside_has_positive:
        label = next((p.label for p in outside if p.positive and p.label is not None), None)
        regions.append(_region(outside, None, label, [], size))
    return regions


def _region(
    points: list[KeyPoint],
    box: tuple[float, float, float, float] | None,
    label: str | None,
    item_ids: list[str | None],
    size: tuple[int, int],
) -> PromptRegion:
    prompts = Prompts.from_lists(
        points=[(p.x, p.y) for p in points],
        labels=[POSITIVE if p.positive else NEGATIVE for p in points],
        box=box,
    )
    prompts.validate(*size)
    ids = tuple(i for i in item_ids + [p.item_id for p in points] if i is not None)
    return PromptRegion(prompts=prompts, label=label, original_width=size[0], original_height=size[1], item_ids=ids)


class _ItemReader:
    """Validated access to one context item; every error names the item."""

    def __init__(self, index: int, item: Any, config: LabelConfig) -> None:
        self.name = f"Context item {index}"
        if not isinstance(item, Mapping):
            raise InvalidPromptError(f"{self.name} must be a JSON object, got {type(item).__name__}.")
        self.item = item
        from_name = item.get("from_name")
        self.name = f"Context item {index} (from_name {from_name!r})"
        tag = config.prompt_tag(from_name) if isinstance(from_name, str) else None
        if tag is None:
            known = [t.name for t in config.keypoints + config.rectangles]
            raise InvalidPromptError(
                f"{self.name} is not a KeyPointLabels or RectangleLabels tag on image {config.image_name!r} in the "
                f"labeling config (prompt tags: {known or 'none'}). Reload the project's labeling config."
            )
        self.tag = tag
        item_type = item.get("type")
        if not isinstance(item_type, str) or item_type.lower() != tag.result_type:
            raise InvalidPromptError(f"{self.name} has type {item_type!r}; tag {tag.name!r} gives {tag.result_type!r}.")
        to_name = item.get("to_name", config.image_name)
        if to_name != config.image_name:
            raise InvalidPromptError(f"{self.name} points at {to_name!r}, not at image {config.image_name!r}.")
        self.number(item.get("image_rotation", 0), "image_rotation")  # checked, not applied: see module doc
        value = item.get("value")
        if not isinstance(value, Mapping):
            raise InvalidPromptError(f"{self.name} has no 'value' object with its coordinates.")
        self.value = value
        item_id = item.get("id")
        self.item_id = None if item_id is None else str(item_id)

    def number(self, raw: Any, what: str) -> float:
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or not math.isfinite(raw):
            raise InvalidPromptError(f"{self.name}: {what} must be a finite number, got {raw!r}.")
        return float(raw)

    def original_size(self) -> tuple[int, int]:
        sizes = []
        for key in ("original_width", "original_height"):
            raw = self.item.get(key)
            number = self.number(raw, key) if raw is not None else math.nan
            if not (number >= 1 and number == int(number)):
                raise InvalidPromptError(f"{self.name}: {key} must be a positive whole number of pixels, got {raw!r}.")
            sizes.append(int(number))
        return sizes[0], sizes[1]

    def percent(self, key: str) -> float:
        if key not in self.value:
            raise InvalidPromptError(f"{self.name}: value.{key} is missing.")
        number = self.number(self.value[key], f"value.{key}")
        if not (-PERCENT_TOLERANCE <= number <= 100 + PERCENT_TOLERANCE):
            raise InvalidPromptError(
                f"{self.name}: value.{key} = {number:g} is outside the image (coordinates are percent, 0-100)."
            )
        return min(max(number, 0.0), 100.0)

    def labels(self) -> list[str]:
        raw = self.value.get(self.tag.result_type, self.value.get("labels", []))
        if not isinstance(raw, list) or not all(isinstance(label, str) for label in raw):
            raise InvalidPromptError(f"{self.name}: value.{self.tag.result_type} must be a list of label names.")
        return raw

    def group(self, labels: list[str]) -> GroupKey:
        return str(self.item.get("from_name")), tuple(label.lower() for label in labels)

    def point(self, size: tuple[int, int], negative_labels: set[str]) -> KeyPoint:
        x = self.percent("x") * size[0] / 100
        y = self.percent("y") * size[1] / 100
        is_positive = self.item.get("is_positive", True)
        if not isinstance(is_positive, bool):
            raise InvalidPromptError(f"{self.name}: is_positive must be true or false, got {is_positive!r}.")
        labels = self.labels()
        negative_label = any(label.lower() in negative_labels for label in labels)
        label = next((lab for lab in labels if lab.lower() not in negative_labels), None)
        return KeyPoint(x=x, y=y, positive=is_positive and not negative_label, label=label, item_id=self.item_id,
                        group=self.group(labels), negative_label=negative_label)

    def rectangle(self, size: tuple[int, int]) -> Rectangle:
        width, height = size
        ax = self.percent("x") * width / 100
        ay = self.percent("y") * height / 100
        w = self.number(self.value.get("width"), "value.width") * width / 100
        h = self.number(self.value.get("height"), "value.height") * height / 100
        if w <= 0 or h <= 0:
            raise InvalidPromptError(f"{self.name}: the rectangle has no area (width and height must be > 0).")
        angle = math.radians(self.number(self.value.get("rotation", 0) or 0, "value.rotation"))
        cos, sin = math.cos(angle), math.sin(angle)
        xs = [ax, ax + w * cos, ax - h * sin, ax + w * cos - h * sin]
        ys = [ay, ay + w * sin, ay + h * cos, ay + w * sin + h * cos]
        box = (max(min(xs), 0.0), max(min(ys), 0.0), min(max(xs), float(width)), min(max(ys), float(height)))
        if box[2] - box[0] < 1e-6 or box[3] - box[1] < 1e-6:
            raise InvalidPromptError(f"{self.name}: the rectangle lies outside the image.")
        labels = self.labels()
        return Rectangle(
            anchor=(ax, ay), size=(w, h), angle=angle, box=box, label=labels[0] if labels else None,
            item_id=self.item_id, group=self.group(labels),
        )
