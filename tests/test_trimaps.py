"""Annotations to trimaps, checked against hand-made masks and trimaps."""

from __future__ import annotations

import numpy as np
import pytest

from ml_backend.brush import encode_rle
from ml_backend.trimaps import (
    LabelRoles,
    TrimapError,
    accepted_annotation,
    annotation_to_trimap,
    boundary_band,
    has_mask_result,
)

FG, BG, BD = 1, 2, 3


def brush(mask: np.ndarray, label: str | None = "Object", **extra) -> dict:
    height, width = mask.shape
    labels = [label] if label else []
    return {"type": "brushlabels", "from_name": "tag", "to_name": "image", "original_width": width,
            "original_height": height, "value": {"format": "rle", "rle": encode_rle(mask), "brushlabels": labels},
            **extra}


def keypoint() -> dict:
    return {"type": "keypointlabels", "from_name": "kp", "to_name": "image", "original_width": 32,
            "original_height": 32, "value": {"x": 50, "y": 50, "width": 1, "keypointlabels": ["Object"]}}


def rect_mask(shape=(32, 32), rows=(10, 20), cols=(8, 20)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[rows[0]:rows[1], cols[0]:cols[1]] = True
    return mask


def test_foreground_only_gets_background_and_a_centred_boundary_band():
    trimap = annotation_to_trimap([keypoint(), brush(rect_mask())], boundary_width=2)
    expected = np.full((32, 32), BG, np.uint8)
    expected[9:21, 7:21] = BD  # one pixel outside the object (radius-1 disk is the 3x3 square)
    expected[11:19, 9:19] = FG  # the object minus its one-pixel inner rim
    np.testing.assert_array_equal(trimap, expected)


def test_band_width_zero_gives_no_boundary_and_wider_bands_grow_both_ways():
    plain = annotation_to_trimap([brush(rect_mask())], boundary_width=0)
    np.testing.assert_array_equal(plain == FG, rect_mask())
    assert not (plain == BD).any()
    wide = annotation_to_trimap([brush(rect_mask())], boundary_width=4)
    assert (wide[10:20, 8:20] != BG).all()  # the object's pixels are foreground or boundary
    assert wide[15, 6] == BD and wide[15, 5] == BG  # two pixels outside the left edge
    assert wide[15, 9] == BD and wide[15, 10] == FG  # two pixels inside it
    assert (wide == FG).sum() == 6 * 8


def test_image_border_is_not_an_object_edge():
    mask = rect_mask(rows=(0, 32), cols=(0, 16))  # the left half, touching three image borders
    trimap = annotation_to_trimap([brush(mask)], boundary_width=2)
    assert (trimap[:, :15] == FG).all()
    assert (trimap[:, 15:17] == BD).all()
    assert (trimap[:, 17:] == BG).all()


def test_painted_boundary_is_used_as_is_and_later_regions_win():
    boundary = np.zeros((32, 32), bool)
    boundary[5, :] = True
    background = rect_mask(rows=(10, 20), cols=(8, 12))
    result = [brush(rect_mask()), brush(background, "Background"), brush(boundary, "Edge")]
    trimap = annotation_to_trimap(result, boundary_width=4)
    expected = np.full((32, 32), BG, np.uint8)
    expected[10:20, 12:20] = FG
    expected[5, :] = BD
    np.testing.assert_array_equal(trimap, expected)


def test_configured_foreground_labels_ignore_others():
    roles = LabelRoles(foreground=("cat",))
    cat, dog = rect_mask(cols=(0, 5)), rect_mask(cols=(20, 25))
    trimap = annotation_to_trimap([brush(cat, "Cat"), brush(dog, "Dog")], roles=roles, boundary_width=0)
    np.testing.assert_array_equal(trimap == FG, cat)
    with pytest.raises(TrimapError, match="Dog"):
        annotation_to_trimap([brush(dog, "Dog")], roles=roles)


def test_mask_of_another_size_is_resized_to_the_image():
    trimap = annotation_to_trimap([brush(rect_mask((16, 16), (4, 8), (4, 8)))], size=(32, 32), boundary_width=0)
    np.testing.assert_array_equal(trimap == FG, rect_mask((32, 32), (8, 16), (8, 16)))


@pytest.mark.parametrize("result, message", [
    ([keypoint()], "no mask region"),
    ([], "no mask region"),
    ("nope", "must be a list"),
])
def test_unusable_results_raise_clear_errors(result, message):
    with pytest.raises(TrimapError, match=message):
        annotation_to_trimap(result)


def test_broken_rle_raises():
    item = brush(rect_mask())
    item["value"]["rle"] = item["value"]["rle"][:10]
    with pytest.raises(Exception, match="RLE"):
        annotation_to_trimap([item])


def test_band_is_empty_for_empty_foreground():
    assert not boundary_band(np.zeros((8, 8), bool), 4).any()


def test_accepted_annotation_rules():
    old = {"id": 1, "result": [], "updated_at": "2026-01-01T10:00:00Z"}
    new = {"id": 2, "result": [], "updated_at": "2026-01-02T10:00:00.5Z"}
    cancelled = {"id": 3, "was_cancelled": True, "updated_at": "2026-01-03T10:00:00Z"}
    truth = {"id": 4, "ground_truth": True, "updated_at": "2025-12-31T10:00:00Z"}
    task = {"id": 9, "annotations": [old, cancelled, new, truth]}
    assert accepted_annotation(task, ground_truth_only=False)["id"] == 2
    assert accepted_annotation(task, ground_truth_only=True)["id"] == 4
    assert accepted_annotation({"annotations": [cancelled]}, ground_truth_only=False) is None
    assert accepted_annotation({"id": 1}, ground_truth_only=False) is None


def test_has_mask_result():
    assert has_mask_result([keypoint(), brush(rect_mask())])
    assert not has_mask_result([keypoint()])
    assert not has_mask_result(None)
