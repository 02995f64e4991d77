"""The brush RLE of the click bench's three shapes is byte for byte label-studio-sdk's ``mask2rle``
(the oracle, as in test_brush.py), and the array form the /predict answer uses holds the same bytes."""

from __future__ import annotations

import numpy as np
import pytest
from label_studio_sdk.converter import brush as sdk_brush  # the oracle: a test dependency, never skipped

from benchmarks.mask_formats import SHAPES
from ml_backend.brush import decode_rle, encode_rle, encode_rle_array

HEIGHT, WIDTH = 240, 320  # the SDK's encoder takes seconds on photo-sized masks


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_brush_rle_of_each_shape_is_the_sdks_byte_for_byte(name: str) -> None:
    mask = SHAPES[name](HEIGHT, WIDTH)
    ours = encode_rle(mask)
    assert ours == sdk_brush.mask2rle(mask.astype(np.uint8) * 255)
    assert encode_rle_array(mask).tolist() == ours
    np.testing.assert_array_equal(sdk_brush.decode_rle(ours).reshape(HEIGHT, WIDTH, 4)[:, :, 3] != 0, mask)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_photo_sized_shapes_round_trip(name: str) -> None:
    mask = SHAPES[name](3000, 4000)
    array = encode_rle_array(mask)
    assert array.dtype == np.uint8 and array.flags.c_contiguous
    np.testing.assert_array_equal(decode_rle(array.tolist(), 3000, 4000), mask)
