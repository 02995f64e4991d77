"""The parts of a Label Studio labeling config this backend serves.

We need one ``<Image>`` (and the task-data key its ``value`` reads), the mask tag that
receives our masks, and the ``<KeyPointLabels>`` / ``<RectangleLabels>`` tags (or their
label-less ``<KeyPoint>`` / ``<Rectangle>`` forms) whose smart regions carry prompts, all tied
together through ``toName``.

Mask tags are ``<BrushLabels>`` (brush RLE), ``<BitmaskLabels>`` (PNG) and ``<PolygonLabels>``
(outlines). The image is the first ``<Image>`` (in document order) that a mask tag points at.
Of the mask tags on it, the one named by ``mask_tag`` (the ``MASK_TAG`` setting) wins; else the
first BrushLabels, else the first BitmaskLabels, else the first PolygonLabels -- the lossless
forms first, since a polygon only approximates a mask. Tag and attribute names are matched case-insensitively, as
Label Studio does. The stdlib parser is enough here (expat refuses external entities and
caps entity expansion).
"""

from __future__ import annotations

import functools
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from ml_backend.errors import LabelConfigError

# Lower-case tag names; each is also the ``type`` of the results the tag produces.
KEYPOINT_TAGS = frozenset({"keypointlabels", "keypoint"})
RECTANGLE_TAGS = frozenset({"rectanglelabels", "rectangle"})
BRUSH_TAG = "brushlabels"
BITMASK_TAG = "bitmasklabels"
POLYGON_TAG = "polygonlabels"
MASK_TAGS = (BRUSH_TAG, BITMASK_TAG, POLYGON_TAG)  # the order of preference when a config has several

_EXAMPLE = (
    '<View><Image name="image" value="$image"/>'
    '<BrushLabels name="mask" toName="image"><Label value="Object"/></BrushLabels>'
    '<KeyPointLabels name="point" toName="image" smart="true"><Label value="Object"/></KeyPointLabels>'
    "</View>"
)


@dataclass(frozen=True)
class ControlTag:
    """A control tag: its ``name`` (a result's ``from_name``), target image, result type and labels."""

    name: str
    to_name: str
    result_type: str
    labels: tuple[str, ...]


@dataclass(frozen=True)
class LabelConfig:
    image_name: str  # the Image tag's name: results' ``to_name``
    image_key: str  # the task-data key holding the image URL (value="$image" -> "image")
    mask: ControlTag  # the tag our masks go to; its result_type says which form they take
    keypoints: tuple[ControlTag, ...] = ()
    rectangles: tuple[ControlTag, ...] = ()

    def prompt_tag(self, from_name: str) -> ControlTag | None:
        """The keypoint or rectangle tag named ``from_name``, if this config has one on our image."""
        return next((t for t in self.keypoints + self.rectangles if t.name == from_name), None)


def parse_label_config(xml: str, *, mask_tag: str | None = None) -> LabelConfig:
    """Parse ``xml``; raise :class:`LabelConfigError` with a fix the user can apply when we cannot serve it.

    ``mask_tag`` names the mask tag to use when the image has several (see the module docstring).
    Label Studio sends the same config with every click: a parsed config (immutable) is kept for the
    next request with the same text (``_CACHED_CONFIGS`` of them); a config that fails is parsed again.
    """
    if isinstance(xml, str) and (mask_tag is None or isinstance(mask_tag, str)):
        return _parse_cached(xml, mask_tag)
    return _parse(xml, mask_tag)


_CACHED_CONFIGS = 64


@functools.lru_cache(maxsize=_CACHED_CONFIGS)
def _parse_cached(xml: str, mask_tag: str | None) -> LabelConfig:
    return _parse(xml, mask_tag)


def _parse(xml: str, mask_tag: str | None) -> LabelConfig:
    if not isinstance(xml, str) or not xml.strip():
        raise LabelConfigError(f"No labeling config was received. A config this backend serves looks like: {_EXAMPLE}")
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise LabelConfigError(f"The labeling config is not valid XML ({exc}).") from exc

    tags = [(element.tag.lower() if isinstance(element.tag, str) else "", _attributes(element), element)
            for element in root.iter()]
    images = [(attrs, element) for tag, attrs, element in tags if tag == "image"]
    if not images:
        raise LabelConfigError(
            f"The labeling config has no <Image> tag; this backend segments images. Example: {_EXAMPLE}"
        )
    masks = [(tag, attrs, element) for tag, attrs, element in tags if tag in MASK_TAGS]
    if not masks:
        name = images[0][0].get("name", "image")
        raise LabelConfigError(
            "The labeling config has no <BrushLabels>, <BitmaskLabels> or <PolygonLabels> tag to receive masks. Add "
            f'<BrushLabels name="mask" toName="{name}"><Label value="Object"/></BrushLabels>.'
        )

    image_names = [attrs.get("name", "") for attrs, _ in images]
    chosen = next((n for n in image_names if n and any(n in _targets(a) for _, a, _ in masks)), None)
    if chosen is None:
        targets = sorted({t for _, a, _ in masks for t in _targets(a)})
        raise LabelConfigError(
            f"No mask tag (BrushLabels, BitmaskLabels, PolygonLabels) points at an <Image>: their toName is "
            f"{targets or 'missing'} but the Image tags are named {image_names}. Set its toName to the Image's name."
        )
    image_attrs = images[image_names.index(chosen)][0]
    mask = _choose_mask_tag([(t, a, e) for t, a, e in masks if chosen in _targets(a)], chosen, mask_tag)
    if not mask.labels:
        raise LabelConfigError(
            f'<{_TAG_NAMES[mask.result_type]} name="{mask.name}"> has no labels: add at least one '
            '<Label value="..."/> inside it.'
        )

    def controls(kinds: frozenset[str]) -> tuple[ControlTag, ...]:
        return tuple(
            _control(attrs, element, chosen, tag)
            for tag, attrs, element in tags
            if tag in kinds and chosen in _targets(attrs)
        )

    return LabelConfig(
        image_name=chosen,
        image_key=_data_key(image_attrs, chosen),
        mask=mask,
        keypoints=controls(KEYPOINT_TAGS),
        rectangles=controls(RECTANGLE_TAGS),
    )


_TAG_NAMES = {BRUSH_TAG: "BrushLabels", BITMASK_TAG: "BitmaskLabels", POLYGON_TAG: "PolygonLabels"}


def _choose_mask_tag(
    candidates: list[tuple[str, dict[str, str], ET.Element]], image_name: str, wanted: str | None
) -> ControlTag:
    """The mask tag named ``wanted`` (when given), else the first of the most preferred type."""
    if wanted:
        named = [(t, a, e) for t, a, e in candidates if a.get("name", "").strip() == wanted]
        if not named:
            names = [a.get("name", "") for _, a, _ in candidates]
            raise LabelConfigError(
                f"MASK_TAG={wanted!r} is not a mask tag on image {image_name!r} (its mask tags: {names}); "
                "change the setting or the labeling config."
            )
        tag, attrs, element = named[0]
    else:
        tag, attrs, element = min(candidates, key=lambda c: MASK_TAGS.index(c[0]))
    return _control(attrs, element, image_name, tag)


def _attributes(element: ET.Element) -> dict[str, str]:
    return {key.lower(): value for key, value in element.attrib.items()}


def _targets(attrs: dict[str, str]) -> list[str]:
    return [name.strip() for name in attrs.get("toname", "").split(",") if name.strip()]


def _control(attrs: dict[str, str], element: ET.Element, image_name: str, result_type: str) -> ControlTag:
    name = attrs.get("name", "").strip()
    if not name:
        raise LabelConfigError(f'A <{element.tag}> tag on image "{image_name}" has no name attribute: add name="...".')
    labels = tuple(
        _attributes(child)["value"]
        for child in element.iter()
        if isinstance(child.tag, str) and child.tag.lower() == "label" and "value" in _attributes(child)
    )
    return ControlTag(name=name, to_name=image_name, result_type=result_type, labels=labels)


def _data_key(attrs: dict[str, str], image_name: str) -> str:
    if "valuelist" in attrs and "value" not in attrs:
        raise LabelConfigError(
            f'<Image name="{image_name}"> uses valueList (several images per task), which this backend does not '
            'support: use value="$image" with one image per task.'
        )
    value = attrs.get("value", "").strip()
    if not value.startswith("$") or len(value) < 2:
        raise LabelConfigError(
            f'<Image name="{image_name}"> must read its URL from the task data, like value="$image" (got {value!r}).'
        )
    return value[1:]
