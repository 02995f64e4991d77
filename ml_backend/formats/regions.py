"""One mask in each of Label Studio's three mask result types, and any such region back to a mask.

- ``brushlabels``: ``{"format": "rle", "rle": [...]}`` (:mod:`ml_backend.brush`), at the declared size.
- ``bitmasklabels``: ``{"imageDataURL": "data:image/png;base64,..."}`` (:mod:`.bitmask`), at the PNG's size.
- ``polygonlabels``: ``{"points": [[x%, y%], ...], "closed": true}`` (:mod:`.polygon`), one region per
  component, drawn at whatever size is asked.

Readers resize a brush or bitmask mask to the image they are asked for (nearest neighbour) when
the declared size differs: Label Studio stretches a region over the image it shows.
"""

from __future__ import annotations

import logging

import numpy as np
from PIL import Image

from ml_backend.brush import decode_rle, encode_rle, encode_rle_array
from ml_backend.formats.bitmask import decode_bitmask, encode_bitmask
from ml_backend.formats.bounds import MaskFormatError, check_mask_size
from ml_backend.formats.polygon import PolygonOptions, mask_to_polygons, polygon_to_mask, polygon_to_percent

logger = logging.getLogger(__name__)

BRUSH, BITMASK, POLYGON = "brushlabels", "bitmasklabels", "polygonlabels"
# The label-less tags give results of these types, read the same way.
_TYPE_ALIASES = {"brush": BRUSH, "bitmask": BITMASK, "polygon": POLYGON}
MASK_RESULT_TYPES = (BRUSH, BITMASK, POLYGON)


def mask_values(mask: np.ndarray, result_type: str, polygon: PolygonOptions = PolygonOptions(), *,
                arrays: bool = False) -> list[dict]:
    """The ``value`` objects (without labels) that hold ``mask`` as ``result_type``; polygons: one per component.

    ``arrays``: a brush ``rle`` as a uint8 numpy array and polygon ``points`` as an (N, 2) float array
    instead of lists, for an answer serialised by a JSON encoder that writes numpy arrays (orjson, the
    /predict answer); same JSON, without a Python number per byte or coordinate.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.size == 0:
        raise ValueError(f"A mask must be a non-empty 2-D array (height, width), got shape {mask.shape}.")
    if result_type == BRUSH:
        return [{"format": "rle", "rle": encode_rle_array(mask) if arrays else encode_rle(mask)}]
    if result_type == BITMASK:
        return [{"imageDataURL": encode_bitmask(mask)}]
    if result_type == POLYGON:
        height, width = mask.shape
        return [{"points": polygon_to_percent(outline, width, height, array=arrays), "closed": True}
                for outline in mask_to_polygons(mask, polygon)]
    raise ValueError(f"{result_type!r} is not a mask result type ({', '.join(MASK_RESULT_TYPES)}).")


def result_type_of(item: object) -> str | None:
    """The mask result type of a result item (by ``type``, else by the shape of its value), or None."""
    if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
        return None
    declared = item.get("type")
    if isinstance(declared, str):
        declared = _TYPE_ALIASES.get(declared.lower(), declared.lower())
        if declared in MASK_RESULT_TYPES:
            return declared
    value = item["value"]
    if "rle" in value:
        return BRUSH
    if "imageDataURL" in value:
        return BITMASK
    if "points" in value and declared in (None, ""):
        return POLYGON
    return None


def region_labels(item: dict) -> list:
    """The labels of a mask region (``brushlabels``/``bitmasklabels``/``polygonlabels``), [] when none;
    :class:`MaskFormatError` when they are not a list of names (``brushlabels: 5``)."""
    value = item.get("value") if isinstance(item, dict) else None
    if not isinstance(value, dict):
        return []
    key = result_type_of(item) or ""
    labels = value.get(key)
    if labels is None:
        return []
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise MaskFormatError(f"Region {str(item.get('id', '?'))[:40]}: {key} must be a list of label names.")
    return labels


def declared_size(item: dict, *, max_pixels: int) -> tuple[int, int]:
    """A region's (``original_width``, ``original_height``), bounded by ``max_pixels``."""
    return check_mask_size(item.get("original_width"), item.get("original_height"), max_pixels=max_pixels,
                           what=f"Region {item.get('id', '?')}")


def region_mask(item: dict, size: tuple[int, int], *, max_pixels: int) -> np.ndarray:
    """The (height, width) bool mask of a mask region, for an image of ``size`` = (width, height).

    Raises :class:`MaskFormatError` (or the brush codec's ``InvalidRLEError``) naming the region
    when it is malformed, of no mask type, or declares more than ``max_pixels`` pixels.
    """
    result_type = result_type_of(item)
    if result_type is None:
        raise MaskFormatError(f"Region {item.get('id', '?') if isinstance(item, dict) else '?'} is not a brush, "
                              "bitmask or polygon region.")
    width, height = check_mask_size(*size, max_pixels=max_pixels, what="The image")
    value = item["value"]
    if result_type == POLYGON:
        return polygon_to_mask(value.get("points"), width, height)
    if result_type == BITMASK:
        mask = decode_bitmask(value.get("imageDataURL"), max_pixels=max_pixels)
    else:
        if value.get("format", "rle") != "rle" or not isinstance(value.get("rle"), list):
            raise MaskFormatError(f"Brush region {item.get('id', '?')} is not in Label Studio's RLE format.")
        declared_width, declared_height = declared_size(item, max_pixels=max_pixels)
        mask = decode_rle(value["rle"], declared_height, declared_width)
    if mask.shape != (height, width):
        # Label Studio measured the image differently (EXIF rotation, replaced file): it stretches the region.
        logger.warning("%s mask of %dx%d for a %dx%d image; resizing", result_type, mask.shape[1], mask.shape[0],
                       width, height)
        mask = np.asarray(Image.fromarray(mask).resize((width, height), Image.Resampling.NEAREST))
    return mask
