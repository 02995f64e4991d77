"""The three mask result forms: bitmask PNG as the editor writes it, polygons from contours, config selection,
and every form read back into trimaps with bounded sizes."""

from __future__ import annotations

import base64
import io
import json

import cv2
import numpy as np
import pytest
from PIL import Image

from ml_backend.errors import LabelConfigError
from ml_backend.formats import (
    BITMASK,
    BRUSH,
    POLYGON,
    MaskFormatError,
    PolygonOptions,
    check_mask_size,
    decode_bitmask,
    encode_bitmask,
    mask_to_polygons,
    mask_values,
    polygon_to_mask,
    polygon_to_percent,
    region_mask,
    result_type_of,
)
from ml_backend.labeling import build_mask_results, parse_label_config
from ml_backend.trimaps import TrimapValue, annotation_to_trimap, has_mask_result

EXACT = PolygonOptions(min_area=1, tolerance=0)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def disk_with_hole(shape=(90, 120), centre=(60, 45), radius=35, hole=12) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    cv2.circle(mask, centre, radius, 1, -1)
    cv2.circle(mask, centre, hole, 0, -1)
    return mask.astype(bool)


def png_bytes(data_url: str) -> bytes:
    assert data_url.startswith("data:image/png;base64,")
    return base64.b64decode(data_url.split(",", 1)[1])


def data_url(image: Image.Image, fmt: str = "PNG", media: str = "image/png") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return f"data:{media};base64," + base64.b64encode(buffer.getvalue()).decode()


def polygons_mask(mask: np.ndarray, options: PolygonOptions) -> np.ndarray:
    height, width = mask.shape
    out = np.zeros_like(mask, bool)
    for outline in mask_to_polygons(mask, options):
        out |= polygon_to_mask(polygon_to_percent(outline, width, height), width, height)
    return out


# --- bitmask --------------------------------------------------------------------


def test_bitmask_png_decodes_to_the_editors_form_black_opaque_on_transparent_at_image_size() -> None:
    mask = disk_with_hole()
    with Image.open(io.BytesIO(png_bytes(encode_bitmask(mask)))) as png:
        # a 1-bit palette PNG with transparency: decoded (as a browser does) to RGBA
        assert (png.format, png.mode, png.size, png.info.get("transparency")) == ("PNG", "P", (120, 90), 0)
        pixels = np.asarray(png.convert("RGBA"))
    np.testing.assert_array_equal(pixels[mask], np.tile([0, 0, 0, 255], (mask.sum(), 1)))
    np.testing.assert_array_equal(pixels[~mask], np.zeros(((~mask).sum(), 4)))


def test_bitmask_round_trips_exactly() -> None:
    mask = np.random.default_rng(1).random((37, 53)) > 0.5
    np.testing.assert_array_equal(decode_bitmask(encode_bitmask(mask), max_pixels=10**6), mask)


def test_bitmask_reader_uses_the_editors_alpha_rule() -> None:
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[1, 2] = (255, 0, 0, 1)  # faint but not transparent: inside, as the editor counts it
    rgba[3, 4] = (0, 0, 0, 255)
    rgba[0, 0] = (255, 255, 255, 0)  # white but transparent: outside
    expected = np.zeros((4, 5), bool)
    expected[1, 2] = expected[3, 4] = True
    np.testing.assert_array_equal(decode_bitmask(data_url(Image.fromarray(rgba, "RGBA")), max_pixels=100), expected)
    # Palette PNG with a transparent index (what other tools write): the same rule.
    palette = Image.fromarray(expected.astype(np.uint8), "L").convert("P")
    palette.info["transparency"] = 0
    np.testing.assert_array_equal(decode_bitmask(data_url(palette), max_pixels=100), expected)
    # No alpha channel at all: every pixel is opaque, so all inside.
    assert decode_bitmask(data_url(Image.new("RGB", (3, 2))), max_pixels=100).all()


@pytest.mark.parametrize("value, words", [
    (None, "must start with"),
    ("data:image/jpeg;base64,AAAA", "must start with"),
    ("data:image/png;base64,@@@", "not valid base64"),
    ("data:image/png;base64," + base64.b64encode(b"not a png").decode(), "not a readable PNG"),
])
def test_bitmask_reader_rejects_what_is_not_a_png_data_url(value, words) -> None:
    with pytest.raises(MaskFormatError, match=words) as info:
        decode_bitmask(value, max_pixels=10**6)
    assert info.value.status_code == 422


def test_bitmask_reader_checks_the_declared_size_before_decoding(monkeypatch) -> None:
    url = encode_bitmask(np.ones((300, 400), bool))
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded pixels of an oversized PNG"))
    with pytest.raises(MaskFormatError, match="400x300 = 120000 pixels, more than MAX_IMAGE_PIXELS=100000"):
        decode_bitmask(url, max_pixels=100_000)


# --- polygons --------------------------------------------------------------------


def test_polygon_round_trip_is_exact_without_simplification_holes_included() -> None:
    mask = disk_with_hole()
    mask[5:9, 5:40] = True  # a second component
    polygons = mask_to_polygons(mask, EXACT)
    assert len(polygons) == 2
    np.testing.assert_array_equal(polygons_mask(mask, EXACT), mask)


def test_each_hole_is_bridged_into_one_outline_and_stays_empty() -> None:
    mask = disk_with_hole()
    mask[40:50, 20:28] = False  # a second hole, away from the first
    [outline] = mask_to_polygons(mask, EXACT)
    restored = polygon_to_mask(polygon_to_percent(outline, 120, 90), 120, 90)
    assert not restored[45, 60] and not restored[45, 24] and restored[45, 35]
    np.testing.assert_array_equal(restored, mask)
    # What dropping the holes instead would cost on this mask (the README quotes the figure).
    filled = disk_with_hole(hole=0)
    filled[40:50, 20:28] = True
    assert iou(filled, mask) < 0.92


def test_components_below_the_minimum_area_are_dropped_and_small_holes_filled() -> None:
    mask = np.zeros((40, 60), bool)
    mask[5:25, 5:25] = True  # 400 px
    mask[10:12, 10:12] = False  # a 4-px hole
    mask[30:33, 40:43] = True  # a 9-px speck
    options = PolygonOptions(min_area=10, tolerance=0)
    [outline] = mask_to_polygons(mask, options)
    restored = polygons_mask(mask, options)
    expected = np.zeros_like(mask)
    expected[5:25, 5:25] = True
    np.testing.assert_array_equal(restored, expected)
    assert len(mask_to_polygons(mask, PolygonOptions(min_area=4, tolerance=0))) == 2  # speck kept, hole cut in
    np.testing.assert_array_equal(polygons_mask(mask, PolygonOptions(min_area=4, tolerance=0)), mask)


def test_a_filled_hole_joins_the_island_inside_it_to_the_component_around_it() -> None:
    """The small parts are counted each in its box and the other contours kept as traced, except where a
    filled hole held a component: that component is now part of the one around it, one outline for both."""
    mask = np.zeros((40, 40), bool)
    mask[5:35, 5:35] = True
    mask[14:24, 14:24] = False  # a one-pixel ring of 36 background pixels ...
    mask[15:23, 15:23] = True  # ... around a 64-pixel island
    mask[30:32, 8:10] = False  # and a 4-pixel hole elsewhere
    [outline] = mask_to_polygons(mask, PolygonOptions(min_area=50, tolerance=0))
    expected = np.zeros_like(mask)
    expected[5:35, 5:35] = True
    np.testing.assert_array_equal(polygons_mask(mask, PolygonOptions(min_area=50, tolerance=0)), expected)
    assert len(outline) == 4  # the square's corners: nothing of the island's outline is left
    assert len(mask_to_polygons(mask, PolygonOptions(min_area=30, tolerance=0))) == 2  # ring kept: island apart


def test_tolerance_trades_vertices_for_accuracy() -> None:
    mask = disk_with_hole(shape=(300, 400), centre=(200, 150), radius=120, hole=40)
    counts, ious = [], []
    for tolerance in (0, 0.5, 1, 2, 4):
        options = PolygonOptions(min_area=16, tolerance=tolerance)
        counts.append(sum(len(p) for p in mask_to_polygons(mask, options)))
        ious.append(iou(polygons_mask(mask, options), mask))
    assert counts == sorted(counts, reverse=True) and counts[0] > 3 * counts[2]
    assert ious[0] == 1.0 and ious == sorted(ious, reverse=True)
    assert ious[2] >= 0.98  # the default tolerance, on a 240-px object


@pytest.mark.parametrize("mask", [np.zeros((1, 1), bool), np.zeros((30, 20), bool), np.ones((1, 1), bool),
                                  np.eye(8, dtype=bool), np.ones((3, 1), bool)])
def test_empty_tiny_and_zero_area_masks_give_no_polygon(mask) -> None:
    assert mask_to_polygons(mask, PolygonOptions(min_area=1, tolerance=0)) == []
    assert mask_values(mask, POLYGON, PolygonOptions(min_area=1, tolerance=0)) == []


def test_polygons_on_tiny_images_cover_the_whole_image() -> None:
    for shape in ((2, 2), (2, 3), (5, 7)):
        mask = np.ones(shape, bool)
        [outline] = mask_to_polygons(mask, PolygonOptions(min_area=1, tolerance=1))
        points = polygon_to_percent(outline, shape[1], shape[0])
        assert all(0 < x < 100 and 0 < y < 100 for x, y in points)
        np.testing.assert_array_equal(polygon_to_mask(points, shape[1], shape[0]), mask)


def test_a_component_touching_the_border_stays_exact() -> None:
    mask = np.zeros((20, 30), bool)
    mask[0:12, 0:30] = True
    mask[3:6, 10:15] = False
    np.testing.assert_array_equal(polygons_mask(mask, EXACT), mask)


@pytest.mark.parametrize("points, words", [
    (None, "at least three"),
    ([[1, 1], [2, 2]], "at least three"),
    ([[1, 1], [2, 2], [3]], "pairs of finite"),
    ([[1, 1], [2, 2], [float("nan"), 3]], "pairs of finite"),
    ([[1, 1], [2, 2], ["3", 3]], "pairs of finite"),
    ([[1, 1], [2, 2], [True, 3]], "pairs of finite"),
])
def test_polygon_reader_rejects_malformed_points(points, words) -> None:
    with pytest.raises(MaskFormatError, match=words):
        polygon_to_mask(points, 10, 10)


def test_polygon_vertices_outside_the_image_are_moved_onto_its_edge() -> None:
    huge = polygon_to_mask([[-1e300, -1e300], [1e300, -1e300], [1e300, 1e300], [-1e300, 1e300]], 6, 4)
    assert huge.all()


# --- results and config selection ---------------------------------------------------

CONFIGS = {
    BRUSH: '<BrushLabels name="m" toName="img"><Label value="Cat"/></BrushLabels>',
    BITMASK: '<BitmaskLabels name="m" toName="img"><Label value="Cat"/></BitmaskLabels>',
    POLYGON: '<PolygonLabels name="m" toName="img"><Label value="Cat"/></PolygonLabels>',
}


def config_xml(*tags: str) -> str:
    return f'<View><Image name="img" value="$image"/>{"".join(tags)}</View>'


@pytest.mark.parametrize("result_type", [BRUSH, BITMASK, POLYGON])
def test_results_take_the_form_of_the_configs_mask_tag_and_read_back(result_type) -> None:
    config = parse_label_config(config_xml(CONFIGS[result_type]))
    assert config.mask.result_type == result_type
    mask = disk_with_hole()
    results = build_mask_results(mask, config=config, label="Cat", score=0.5)
    [item] = results
    assert (item["type"], item["from_name"], item["to_name"]) == (result_type, "m", "img")
    assert (item["original_width"], item["original_height"]) == (120, 90)
    assert item["value"][result_type] == ["Cat"] and result_type_of(item) == result_type
    json.dumps(item)
    restored = region_mask(item, (120, 90), max_pixels=10**6)
    threshold = 1.0 if result_type != POLYGON else 0.97
    assert iou(restored, mask) >= threshold


def test_a_polygon_config_gets_one_region_per_component_and_none_for_an_empty_mask() -> None:
    config = parse_label_config(config_xml(CONFIGS[POLYGON]))
    mask = np.zeros((50, 50), bool)
    mask[2:20, 2:20] = mask[30:45, 30:45] = True
    results = build_mask_results(mask, config=config, label="Cat", score=1)
    assert len(results) == 2 and len({r["id"] for r in results}) == 2
    assert all(r["value"]["closed"] is True for r in results)
    assert build_mask_results(np.zeros((50, 50), bool), config=config, label="Cat", score=1) == []


def test_the_lossless_mask_tag_wins_unless_mask_tag_names_one() -> None:
    polygon = '<PolygonLabels name="p" toName="img"><Label value="A"/></PolygonLabels>'
    bitmask = '<BitmaskLabels name="b" toName="img"><Label value="A"/></BitmaskLabels>'
    brush = '<BrushLabels name="r" toName="img"><Label value="A"/></BrushLabels>'
    assert parse_label_config(config_xml(polygon, bitmask, brush)).mask.name == "r"
    assert parse_label_config(config_xml(polygon, bitmask)).mask.name == "b"
    assert parse_label_config(config_xml(polygon)).mask.result_type == POLYGON
    assert parse_label_config(config_xml(polygon, bitmask, brush), mask_tag="p").mask.name == "p"
    with pytest.raises(LabelConfigError, match=r"MASK_TAG='nope'.*\['p', 'b'\]"):
        parse_label_config(config_xml(polygon, bitmask), mask_tag="nope")


def test_a_mask_tag_on_another_image_does_not_count() -> None:
    xml = ('<View><Image name="a" value="$a"/><Image name="b" value="$b"/>'
           '<BrushLabels name="r" toName="b"><Label value="A"/></BrushLabels>'
           '<PolygonLabels name="p" toName="a"><Label value="A"/></PolygonLabels></View>')
    config = parse_label_config(xml)
    assert (config.image_name, config.mask.name) == ("a", "p")  # the first image with a mask tag


def test_bitmask_labels_without_labels_say_what_to_add() -> None:
    with pytest.raises(LabelConfigError, match='<BitmaskLabels name="b"> has no labels'):
        parse_label_config(config_xml('<BitmaskLabels name="b" toName="img"/>'))


# --- read back into trimaps ----------------------------------------------------------


def region(result_type: str, mask: np.ndarray, label: str = "Cat") -> dict:
    config = parse_label_config(config_xml(CONFIGS[result_type].replace("Cat", label)))
    [item] = build_mask_results(mask, config=config, label=label, score=1)
    return item


@pytest.mark.parametrize("result_type", [BRUSH, BITMASK, POLYGON])
def test_annotations_in_every_form_become_the_same_trimap(result_type) -> None:
    mask = np.zeros((40, 50), bool)
    mask[10:30, 12:40] = True
    background = np.zeros_like(mask)
    background[0:5, 0:5] = True
    result = [region(result_type, mask), region(result_type, background, "Background")]
    assert has_mask_result(result)
    trimap = annotation_to_trimap(result, boundary_width=0)
    assert trimap.shape == (40, 50)
    np.testing.assert_array_equal(trimap == TrimapValue.FOREGROUND, mask)


def test_mixed_forms_paint_in_order_and_resize_to_the_image() -> None:
    mask = np.zeros((20, 25), bool)
    mask[5:15, 5:20] = True
    hole = np.zeros_like(mask)
    hole[8:12, 8:12] = True
    trimap = annotation_to_trimap([region(BITMASK, mask), region(POLYGON, hole, "Background")],
                                  size=(50, 40), boundary_width=0)
    expected = np.kron(mask & ~hole, np.ones((2, 2), bool))
    assert iou(trimap == TrimapValue.FOREGROUND, expected) > 0.9  # bitmask stretched, polygon drawn at 50x40


@pytest.mark.parametrize("result_type", [BRUSH, BITMASK, POLYGON])
def test_annotations_in_every_form_count_towards_retraining(result_type) -> None:
    from ml_backend.retrain.policy import accepted_changes

    annotation = {"result": [region(result_type, np.ones((8, 8), bool))], "was_cancelled": False}
    keypoints_only = {"result": [{"type": "keypointlabels", "value": {"x": 1, "y": 1}}], "was_cancelled": False}
    payload = {"annotation": annotation}
    assert accepted_changes("ANNOTATION_CREATED", payload, ground_truth_only=False).count == 1
    assert accepted_changes("ANNOTATION_CREATED", {"annotation": keypoints_only}, ground_truth_only=False).count == 0


@pytest.mark.parametrize("result_type", [BRUSH, BITMASK])
def test_declared_sizes_beyond_max_image_pixels_are_refused_before_allocating(result_type, monkeypatch) -> None:
    item = region(result_type, np.ones((4, 4), bool))
    item["original_width"] = item["original_height"] = 10**6
    monkeypatch.setattr(np, "full", lambda *a, **k: pytest.fail("allocated a trimap of the declared size"))
    with pytest.raises(MaskFormatError, match="MAX_IMAGE_PIXELS=1000000"):
        annotation_to_trimap([item], max_pixels=10**6)


def test_an_image_size_beyond_the_bound_is_refused_for_polygons_too() -> None:
    item = region(POLYGON, np.ones((4, 4), bool))
    with pytest.raises(MaskFormatError, match="MAX_IMAGE_PIXELS"):
        region_mask(item, (10**5, 10**5), max_pixels=10**8)


@pytest.mark.parametrize("width, height", [(0, 5), (-1, 5), (5, None), ("5", 5), (2.5, 4), (True, 3)])
def test_check_mask_size_rejects_what_is_not_a_size(width, height) -> None:
    with pytest.raises(MaskFormatError, match="positive whole numbers"):
        check_mask_size(width, height, max_pixels=100)


def test_check_mask_size_accepts_whole_floats() -> None:
    assert check_mask_size(4.0, 5, max_pixels=20) == (4, 5)


def test_the_benchmark_reports_every_form_with_brush_as_reference(capsys) -> None:
    from benchmarks.mask_formats import main

    assert main(["--size", "96x64", "--repeat", "1", "--json"]) == 0
    [result] = json.loads(capsys.readouterr().out)
    assert set(result["forms"]) == {BRUSH, BITMASK, POLYGON}
    assert result["forms"][BRUSH]["iou"] == result["forms"][BITMASK]["iou"] == 1.0
    assert 0.9 < result["forms"][POLYGON]["iou"] < 1.0
    tolerances = result["polygon_tolerances"]
    assert tolerances[0]["tolerance"] == 0 and tolerances[0]["iou"] == 1.0
    assert tolerances[-1]["vertices"] < tolerances[0]["vertices"]
    assert result["holes_filled_iou"] < 0.97  # the object has a hole: filling it would cost
