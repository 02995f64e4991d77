"""The polygon writer's faster parts: small parts counted from the contours (Pick's theorem) against a
whole-mask labelling, OpenCV's IPP switched off only while outlines are made, the percent points of all
outlines converted at once."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from ml_backend.formats import POLYGON, PolygonOptions, mask_to_polygons, mask_values, polygon_to_percent
from ml_backend.formats import polygon as polygon_module
from ml_backend.formats.polygon import mask_to_points
from ml_backend.formats.small_parts import small_parts


def random_masks(count: int, seed: int) -> list[np.ndarray]:
    """Pixel noise, smooth blobs, and thin background rings around islands (holes that hold a component)."""
    rng = np.random.default_rng(seed)
    masks = []
    for n in range(count):
        height, width = (int(v) for v in rng.integers(8, 60, 2))
        if n % 3 == 0:
            mask = rng.random((height, width)) < rng.uniform(0.2, 0.8)
        elif n % 3 == 1:
            coarse = rng.standard_normal((height // 4 + 2, width // 4 + 2)).astype(np.float32)
            mask = cv2.resize(coarse, (width, height)) > rng.uniform(-0.6, 0.6)
        else:
            mask = np.ones((height + 20, width + 20), bool)
            mask[:2], mask[-2:], mask[:, :2], mask[:, -2:] = False, False, False, False
            for _ in range(int(rng.integers(1, 6))):
                side, x, y, gap = (int(v) for v in (rng.integers(2, 8), rng.integers(3, width + 5),
                                                    rng.integers(3, height + 5), rng.integers(1, 3)))
                mask[y - gap:y + side + gap, x - gap:x + side + gap] = False
                mask[y:y + side, x:x + side] = True
        masks.append(mask)
    return masks


def labelled_small_parts(mask: np.ndarray, contours, links: np.ndarray, min_area: int) -> np.ndarray:
    """The rule, by labelling the whole mask: components under ``min_area`` pixels go; then holes (4-connected
    background inside a kept component, the dropped components counted as background) under it are filled."""
    image = mask.view(np.uint8)
    _, components = cv2.connectedComponents(image, connectivity=8)
    sizes = np.bincount(components.ravel())
    outer = links[:, 3] == -1
    gone = np.zeros(len(contours), bool)
    for k in np.flatnonzero(outer):
        x, y = contours[k][0, 0]
        gone[k] = sizes[components[y, x]] < min_area
    dropped = [components[contours[k][0, 0, 1], contours[k][0, 0, 0]] for k in np.flatnonzero(gone)]
    cleared = np.where(np.isin(components, dropped), 0, image)
    _, background = cv2.connectedComponents((cleared == 0).view(np.uint8), connectivity=4)
    background_sizes = np.bincount(background.ravel())
    for k in np.flatnonzero(~outer & ~gone[links[:, 3]]):
        vertex = contours[k][0, 0]
        for step in ((1, 0), (0, 1), (-1, 0), (0, -1)):  # the hole's pixel beside its first vertex
            x, y = vertex + step
            if cleared[y, x] == 0 and cv2.pointPolygonTest(contours[k], (float(x), float(y)), False) > 0:
                gone[k] = background_sizes[background[y, x]] < min_area
                break
    return gone


@pytest.mark.parametrize("min_area", [2, 9, 16, 40])
def test_small_parts_counted_from_contours_are_those_of_a_whole_mask_labelling(min_area: int) -> None:
    retraced = 0
    for mask in random_masks(150, seed=min_area):
        padded = np.pad(mask, 1).view(np.uint8)  # contours never on the image's edge, as the reference reads around
        contours, hierarchy = cv2.findContours(padded, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
        if hierarchy is None:
            continue
        parts = small_parts(padded, contours, hierarchy[0], (0, 0), min_area)
        np.testing.assert_array_equal(parts.gone, labelled_small_parts(padded, contours, hierarchy[0], min_area))
        retraced += parts.retrace
    # Some filled holes held a kept island (counted the labelled way): possible once a 1-pixel ring around
    # an island of min_area pixels has fewer than min_area.
    assert retraced > 0 or min_area < 40


def test_the_outlines_are_made_with_ipp_off_and_the_switch_is_left_as_it_was(monkeypatch) -> None:
    seen = []
    trace = polygon_module._contours
    monkeypatch.setattr(polygon_module, "_contours", lambda *args: seen.append(cv2.ipp.useIPP()) or trace(*args))
    mask = np.zeros((50, 60), bool)
    mask[10:40, 10:50] = True
    before = cv2.ipp.useIPP()
    try:
        for setting in (True, False):
            cv2.ipp.setUseIPP(setting)
            expected = cv2.ipp.useIPP()  # setUseIPP(True) leaves it off where OpenCV was built without IPP
            assert len(mask_to_polygons(mask)) == 1
            assert cv2.ipp.useIPP() == expected
    finally:
        cv2.ipp.setUseIPP(before)
    assert seen == [False, False]


@pytest.mark.parametrize("array", [False, True])
def test_the_points_of_all_outlines_at_once_are_each_outline_converted_alone(array: bool) -> None:
    mask = np.zeros((80, 240), bool)
    for n, part in enumerate(random_masks(3, seed=3)):  # noise, blobs, rings around islands
        part = part[:80, :80]
        mask[:part.shape[0], n * 80:n * 80 + part.shape[1]] = part
    options = PolygonOptions(min_area=4, tolerance=0.5)
    height, width = mask.shape
    points = mask_to_points(mask, options, array=array)
    outlines = mask_to_polygons(mask, options)
    one_by_one = [polygon_to_percent(outline, width, height, array=array) for outline in outlines]
    assert len(points) == len(one_by_one) > 2
    for mine, theirs in zip(points, one_by_one):
        if array:
            assert mine.flags.c_contiguous  # orjson writes only C-contiguous arrays
            np.testing.assert_array_equal(mine, theirs)
        else:
            assert mine == theirs
    listed = [polygon_to_percent(outline, width, height) for outline in outlines]
    assert [value["points"] for value in mask_values(mask, POLYGON, options)] == listed
    assert mask_to_points(np.zeros((5, 5), bool), options) == []


@pytest.mark.parametrize("block", [7, 1 << 20])
def test_boxes_holding_a_box_strictly_inside_them_are_found_in_blocks_of_pairs(monkeypatch, block: int) -> None:
    from ml_backend.formats import small_parts as module

    monkeypatch.setattr(module, "_PAIR_BLOCK", block)
    rng = np.random.default_rng(0)
    outside = np.concatenate((rng.integers(0, 100, (300, 2)), rng.integers(1, 30, (300, 2))), 1)
    boxes = np.concatenate((rng.integers(0, 100, (500, 2)), rng.integers(1, 10, (500, 2))), 1)
    x, y, w, h = (boxes[:, k] for k in range(4))
    expected = [bool(((x > a) & (y > b) & (x + w < a + c) & (y + h < b + d)).any()) for a, b, c, d in outside.tolist()]
    assert module._holding(outside, boxes).tolist() == expected
    assert 0 < sum(expected) < len(expected)
