"""Label Studio's three ways to store a mask (brush RLE, bitmask PNG, polygons): write one, read any back."""

from ml_backend.formats.bitmask import decode_bitmask, encode_bitmask
from ml_backend.formats.bounds import MaskFormatError, check_mask_size
from ml_backend.formats.polygon import PolygonOptions, mask_to_polygons, polygon_to_mask, polygon_to_percent
from ml_backend.formats.regions import (
    BITMASK,
    BRUSH,
    MASK_RESULT_TYPES,
    POLYGON,
    declared_size,
    mask_values,
    region_labels,
    region_mask,
    result_type_of,
)

__all__ = [
    "BITMASK",
    "BRUSH",
    "MASK_RESULT_TYPES",
    "POLYGON",
    "MaskFormatError",
    "PolygonOptions",
    "check_mask_size",
    "declared_size",
    "decode_bitmask",
    "encode_bitmask",
    "mask_to_polygons",
    "mask_values",
    "polygon_to_mask",
    "polygon_to_percent",
    "region_labels",
    "region_mask",
    "result_type_of",
]
