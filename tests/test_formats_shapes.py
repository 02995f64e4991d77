"""Every result form of the click bench's object shapes (compact blob, thin long structure, many holes, a
random SAM's noise-like mask) is what it was before the answer path got faster: identical bitmask pixels
after PNG decoding, polygon read-back IoU and vertex counts as the previous implementation gave, exact
outlines unsimplified."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import orjson
import pytest
from PIL import Image

from benchmarks.mask_formats import SHAPES
from ml_backend.formats import BITMASK, BRUSH, POLYGON, PolygonOptions, decode_bitmask, mask_values, region_mask

WIDTH, HEIGHT = 800, 600

# Read-back IoU and vertex count per (shape, tolerance) at 800x600 from the implementation before this
# change (quadratic hole bridging, connected components always counted), min_area 16.
BEFORE = {
    ("blob", 0.0): (1.0, 596), ("blob", 1.0): (0.9977777451814475, 45), ("blob", 2.0): (0.9965650367717217, 32),
    ("thin", 0.0): (1.0, 2604), ("thin", 1.0): (0.8983805357279914, 174), ("thin", 2.0): (0.8374639343049494, 93),
    ("holes", 0.0): (1.0, 6604), ("holes", 1.0): (0.9918924670884836, 1804), ("holes", 2.0): (0.9918924670884836, 1804),
    # The noise-like mask from the implementation before the hole search and the small-part counting
    # went local (per-hole Python search, connected components counted over the whole mask).
    ("noise", 0.0): (0.9724103736667199, 58533), ("noise", 1.0): (0.8843376392569856, 23381),
    ("noise", 2.0): (0.7972442394955507, 15129),
}


@pytest.fixture(scope="module", params=sorted(SHAPES))
def shape(request) -> tuple[str, np.ndarray]:
    return request.param, SHAPES[request.param](HEIGHT, WIDTH)


def _read(values: list[dict], result_type: str) -> np.ndarray:
    mask = np.zeros((HEIGHT, WIDTH), bool)
    for value in values:
        item = {"type": result_type, "original_width": WIDTH, "original_height": HEIGHT, "value": value}
        mask |= region_mask(item, (WIDTH, HEIGHT), max_pixels=WIDTH * HEIGHT)
    return mask


def test_the_shapes_are_what_their_names_say(shape) -> None:
    import cv2

    name, mask = shape
    contours, hierarchy = cv2.findContours(mask.view(np.uint8).copy(), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    holes = int((hierarchy[0][:, 3] != -1).sum())
    outers = len(contours) - holes
    assert {"blob": holes == 0 and mask.mean() > 0.2, "thin": holes == 0 and mask.mean() < 0.05,
            "holes": holes == 300, "noise": holes > 500 and outers > 500}[name]


def test_bitmask_pixels_are_identical_after_png_decoding(shape) -> None:
    _, mask = shape
    (value,) = mask_values(mask, BITMASK)
    png = base64.b64decode(value["imageDataURL"].split(",", 1)[1])
    with Image.open(io.BytesIO(png)) as image:
        rgba = np.asarray(image.convert("RGBA"))  # what a browser's canvas holds
    before = np.zeros((HEIGHT, WIDTH, 4), np.uint8)  # the previous encoder's RGBA: opaque black inside
    before[..., 3][mask] = 255
    np.testing.assert_array_equal(rgba, before)
    np.testing.assert_array_equal(decode_bitmask(value["imageDataURL"], max_pixels=WIDTH * HEIGHT), mask)


@pytest.mark.parametrize("tolerance", [0.0, 1.0, 2.0])
def test_polygons_read_back_as_before(shape, tolerance: float) -> None:
    name, mask = shape
    values = mask_values(mask, POLYGON, PolygonOptions(min_area=16, tolerance=tolerance))
    restored = _read(values, POLYGON)
    iou = float((restored & mask).sum() / (restored | mask).sum())
    assert (iou, sum(len(v["points"]) for v in values)) == BEFORE[(name, tolerance)]
    if tolerance == 0 and name != "noise":  # the noise drops specks and fills holes under min_area
        np.testing.assert_array_equal(restored, mask)  # unsimplified outlines, holes bridged: exact


def test_a_chain_of_many_holes_bridges_into_one_exact_outline() -> None:
    """2 000 holes in a row: each joins its neighbour, a chain far deeper than Python's recursion limit."""
    mask = np.ones((40, 8004), bool)
    mask[10:14, 2:8002] = False
    mask[10:14, 5:8002:4] = True  # 2000 holes of 3x4 pixels, one object column between neighbours
    values = mask_values(mask, POLYGON, PolygonOptions(min_area=1, tolerance=0))
    assert len(values) == 1
    restored = np.zeros_like(mask)
    for value in values:
        item = {"type": POLYGON, "original_width": 8004, "original_height": 40, "value": value}
        restored |= region_mask(item, (8004, 40), max_pixels=10**6)
    np.testing.assert_array_equal(restored, mask)


def test_the_answer_serialises_the_brush_array_as_the_rle_list(shape) -> None:
    _, mask = shape
    (listed,) = mask_values(mask, BRUSH)
    (arrayed,) = mask_values(mask, BRUSH, arrays=True)
    assert isinstance(arrayed["rle"], np.ndarray) and arrayed["rle"].dtype == np.uint8
    assert orjson.loads(orjson.dumps(arrayed, option=orjson.OPT_SERIALIZE_NUMPY)) == json.loads(json.dumps(listed))


def test_the_answer_serialises_the_polygon_arrays_as_the_points_lists(shape) -> None:
    _, mask = shape
    listed = mask_values(mask, POLYGON)
    arrayed = mask_values(mask, POLYGON, arrays=True)
    assert all(isinstance(value["points"], np.ndarray) for value in arrayed)
    assert orjson.dumps(arrayed, option=orjson.OPT_SERIALIZE_NUMPY) == orjson.dumps(listed)
