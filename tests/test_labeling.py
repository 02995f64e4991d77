"""Labeling config parsing, interactive context -> prompts, and brush results."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ml_backend.brush import decode_rle
from ml_backend.errors import InvalidPromptError, LabelConfigError
from ml_backend.labeling import (
    ControlTag,
    LabelConfig,
    build_mask_results,
    build_prediction,
    choose_brush_label,
    parse_context,
    parse_label_config,
)
from ml_backend.sam.prompts import NEGATIVE, POSITIVE

CONFIG = """
<View>
  <Image name="img" value="$photo" zoom="true"/>
  <BrushLabels name="mask" toName="img">
    <Label value="Cat" background="red"/>
    <Label value="Dog" background="blue"/>
  </BrushLabels>
  <KeyPointLabels name="kp" toName="img" smart="true">
    <Label value="Cat" smart="true"/>
    <Label value="Background" smart="true"/>
  </KeyPointLabels>
  <RectangleLabels name="rect" toName="img" smart="true">
    <Label value="Dog"/>
    <Label value="cat"/>
  </RectangleLabels>
</View>
"""

W, H = 200, 100  # the image size every context item below is expressed in


@pytest.fixture
def config() -> LabelConfig:
    return parse_label_config(CONFIG)


# --- config -------------------------------------------------------------------


def test_parses_image_brush_and_prompt_tags(config: LabelConfig) -> None:
    assert config.image_name == "img"
    assert config.image_key == "photo"
    assert config.mask == ControlTag("mask", "img", "brushlabels", ("Cat", "Dog"))
    assert config.keypoints == (ControlTag("kp", "img", "keypointlabels", ("Cat", "Background")),)
    assert config.rectangles == (ControlTag("rect", "img", "rectanglelabels", ("Dog", "cat")),)
    assert config.prompt_tag("kp") is config.keypoints[0]
    assert config.prompt_tag("rect") is config.rectangles[0]
    assert config.prompt_tag("mask") is None and config.prompt_tag("nope") is None


def test_chooses_the_image_that_has_brush_labels_and_its_prompt_tags_only() -> None:
    config = parse_label_config("""
    <View>
      <Image name="left" value="$a"/>
      <Image name="right" value="$b"/>
      <KeyPointLabels name="kp_left" toName="left"><Label value="X"/></KeyPointLabels>
      <KeyPoint name="kp_right" toName="right" smart="true"/>
      <Rectangle name="box_both" toName="left,right"/>
      <BrushLabels name="mask" toName="right"><Label value="X"/></BrushLabels>
    </View>""")
    assert (config.image_name, config.image_key) == ("right", "b")
    assert [t.name for t in config.keypoints] == ["kp_right"]
    assert config.keypoints[0].result_type == "keypoint" and config.keypoints[0].labels == ()
    assert [(t.name, t.result_type) for t in config.rectangles] == [("box_both", "rectangle")]


def test_tag_and_attribute_names_are_case_insensitive() -> None:
    config = parse_label_config(
        '<View><image NAME="i" Value="$url"/><brushlabels name="b" toname="i"><label value="A"/></brushlabels>'
        '<KEYPOINTLABELS name="k" TONAME="i"><Label value="A"/></KEYPOINTLABELS></View>'
    )
    assert (config.image_name, config.image_key, config.mask.labels) == ("i", "url", ("A",))
    assert config.keypoints[0].name == "k"


def test_config_without_prompt_tags_still_serves_batch_predictions() -> None:
    config = parse_label_config(
        '<View><Image name="i" value="$image"/><BrushLabels name="b" toName="i"><Label value="A"/></BrushLabels></View>'
    )
    assert config.keypoints == () and config.rectangles == ()


@pytest.mark.parametrize(
    "xml, message",
    [
        (None, "No labeling config"),
        ("   ", "No labeling config"),
        ("<View><Image name='i' value='$image'>", "not valid XML"),
        ("<View><BrushLabels name='b' toName='i'><Label value='A'/></BrushLabels></View>", "no <Image> tag"),
        ("<View><Image name='i' value='$image'/><Polygon name='p' toName='i'/></View>",
         'no <BrushLabels>, <BitmaskLabels> or <PolygonLabels>.*toName="i"'),
        ("<View><Image name='i' value='$image'/><PolygonLabels name='p' toName='i'/></View>",
         'PolygonLabels name="p"> has no labels'),
        ("<View><Image name='i' value='$image'/><BrushLabels name='b' toName='other'><Label value='A'/>"
         "</BrushLabels></View>", r"toName is \['other'\].*named \['i'\]"),
        ("<View><Image name='i' value='$image'/><BrushLabels name='b' toName='i'/></View>",
         'BrushLabels name="b"> has no labels'),
        ("<View><Image name='i' value='image'/><BrushLabels name='b' toName='i'><Label value='A'/></BrushLabels>"
         "</View>", r'value="\$image"'),
        ("<View><Image name='i' valueList='$images'/><BrushLabels name='b' toName='i'><Label value='A'/>"
         "</BrushLabels></View>", "valueList"),
        ("<View><Image name='i' value='$image'/><BrushLabels toName='i'><Label value='A'/></BrushLabels></View>",
         "has no name attribute"),
        ("<!DOCTYPE v [<!ENTITY e SYSTEM 'file:///etc/passwd'>]><View>&e;</View>", "not valid XML"),
    ],
)
def test_configs_we_cannot_serve_say_what_to_fix(xml: str | None, message: str) -> None:
    with pytest.raises(LabelConfigError, match=message) as info:
        parse_label_config(xml)  # type: ignore[arg-type]
    assert info.value.status_code == 422


# --- context ------------------------------------------------------------------


def keypoint(x: float, y: float, labels=("Cat",), positive=True, **extra) -> dict:
    item = {
        "original_width": W, "original_height": H, "image_rotation": 0,
        "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": list(labels)},
        "is_positive": positive, "from_name": "kp", "to_name": "img", "type": "keypointlabels",
    }
    item.update(extra)
    return item


def rectangle(x: float, y: float, w: float, h: float, rotation: float = 0, labels=("Dog",), **extra) -> dict:
    item = {
        "original_width": W, "original_height": H, "image_rotation": 0,
        "value": {"x": x, "y": y, "width": w, "height": h, "rotation": rotation, "rectanglelabels": list(labels)},
        "from_name": "rect", "to_name": "img", "type": "rectanglelabels",
    }
    item.update(extra)
    return item


def parse(config: LabelConfig, *items: dict, **kwargs):
    return parse_context({"result": list(items)}, config, **kwargs)


def test_one_positive_keypoint(config: LabelConfig) -> None:
    [region] = parse(config, keypoint(50, 25, id="a1"))
    np.testing.assert_allclose(region.prompts.points, [[100, 25]])
    assert region.prompts.labels.tolist() == [POSITIVE]
    assert region.prompts.box is None
    assert region.label == "Cat"
    assert region.original_size == (W, H) == (region.original_width, region.original_height)
    assert region.item_ids == ("a1",)


def test_positive_and_negative_keypoints_form_one_region(config: LabelConfig) -> None:
    [region] = parse(config, keypoint(50, 25), keypoint(10, 90, positive=False), keypoint(100, 0))
    np.testing.assert_allclose(region.prompts.points, [[100, 25], [20, 90], [200, 0]])
    assert region.prompts.labels.tolist() == [POSITIVE, NEGATIVE, POSITIVE]


def test_a_negative_label_name_makes_a_keypoint_negative(config: LabelConfig) -> None:
    [region] = parse(config, keypoint(50, 50), keypoint(5, 5, labels=["background"], positive=True))
    assert region.prompts.labels.tolist() == [POSITIVE, NEGATIVE]
    assert region.label == "Cat"


def test_negative_label_names_are_configurable(config: LabelConfig) -> None:
    [region] = parse(config, keypoint(5, 5, labels=["Background"]), negative_labels=("nope",))
    assert region.prompts.labels.tolist() == [POSITIVE]
    assert region.label == "Background"
    [region] = parse(config, keypoint(5, 5, labels=["Background"]), keypoint(9, 9), negative_labels=("CAT",))
    assert region.prompts.labels.tolist() == [POSITIVE, NEGATIVE]


def test_only_negative_keypoints_is_an_actionable_error(config: LabelConfig) -> None:
    with pytest.raises(InvalidPromptError, match="nothing to segment.*Alt\\+click"):
        parse(config, keypoint(5, 5, labels=["Background"]), keypoint(9, 9, positive=False))


def test_rectangle_becomes_a_box(config: LabelConfig) -> None:
    [region] = parse(config, rectangle(10, 20, 30, 40, id="r1"))
    assert region.prompts.box == pytest.approx((20, 20, 80, 60))
    assert len(region.prompts.points) == 0
    assert region.label == "Dog"
    assert region.item_ids == ("r1",)


@pytest.mark.parametrize(
    "rotation, expected",
    [
        # anchor (100, 20) px, width 40 px, height 40 px, turned clockwise about the anchor
        (90, (60, 20, 100, 60)),
        (180, (60, 0, 100, 20)),  # clipped at the top edge
        (-90, (100, 0, 140, 20)),  # same as 270; clipped at the top edge
        (45, (100 - 40 / math.sqrt(2), 20, 100 + 40 / math.sqrt(2), 20 + 40 * math.sqrt(2))),
    ],
)
def test_rotated_rectangle_becomes_its_axis_aligned_bounding_box(
    config: LabelConfig, rotation: float, expected: tuple
) -> None:
    [region] = parse(config, rectangle(50, 20, 20, 40, rotation=rotation))
    assert region.prompts.box == pytest.approx(expected)


def test_rotation_is_applied_in_pixels_not_percent(config: LabelConfig) -> None:
    # 20% of 200 px = 40 px wide, turned 90 degrees it spans 40 px downwards (40% of 100 px).
    [region] = parse(config, rectangle(50, 10, 20, 10, rotation=90))
    x1, y1, x2, y2 = region.prompts.box
    assert (y2 - y1) == pytest.approx(40) and (x2 - x1) == pytest.approx(10)


def test_keypoints_inside_a_rectangle_refine_it_and_others_form_their_own_region(config: LabelConfig) -> None:
    regions = parse(
        config,
        keypoint(20, 50, id="in"),  # (40, 50) px: inside the rectangle
        rectangle(10, 20, 30, 60, labels=["cat"], id="r"),  # (20, 20)-(80, 80) px
        keypoint(35, 30, positive=False, id="in-neg"),  # (70, 30) px: inside
        keypoint(90, 50, id="out"),  # (180, 50) px: outside
    )
    assert len(regions) == 2
    boxed, free = regions
    assert boxed.prompts.box == pytest.approx((20, 20, 80, 80))
    np.testing.assert_allclose(boxed.prompts.points, [[40, 50], [70, 30]])
    assert boxed.prompts.labels.tolist() == [POSITIVE, NEGATIVE]
    assert boxed.label == "cat" and boxed.item_ids == ("r", "in", "in-neg")
    assert free.prompts.box is None
    np.testing.assert_allclose(free.prompts.points, [[180, 50]])
    assert free.label == "Cat" and free.item_ids == ("out",)


def test_a_point_in_a_rotated_rectangles_bounding_box_but_outside_the_rectangle_is_not_inside(
    config: LabelConfig,
) -> None:
    # Square 40x40 px at (100, 20) turned 45 degrees: its bounding box's top-left corner area
    # (x 75, y 25) is outside the diamond; (100, 45) is inside.
    regions = parse(config, rectangle(50, 20, 20, 40, rotation=45), keypoint(37.5, 25), keypoint(50, 45))
    boxed, free = regions
    np.testing.assert_allclose(boxed.prompts.points, [[100, 45]])
    np.testing.assert_allclose(free.prompts.points, [[75, 25]])


def test_several_rectangles_give_one_region_each_and_nested_points_go_to_the_smallest(config: LabelConfig) -> None:
    regions = parse(
        config,
        rectangle(0, 0, 50, 100),  # (0, 0)-(100, 100) px
        rectangle(10, 10, 10, 20, labels=["cat"]),  # (20, 10)-(40, 30) px, inside the first
        rectangle(60, 10, 20, 50, labels=[]),
        keypoint(15, 20),  # (30, 20): inside both; the smaller wins
        keypoint(40, 80),  # (80, 80): only in the first
    )
    assert [r.prompts.box for r in regions] == [
        pytest.approx((0, 0, 100, 100)), pytest.approx((20, 10, 40, 30)), pytest.approx((120, 10, 160, 60)),
    ]
    assert [r.label for r in regions] == ["Dog", "cat", None]
    np.testing.assert_allclose(regions[0].prompts.points, [[80, 80]])
    np.testing.assert_allclose(regions[1].prompts.points, [[30, 20]])
    assert len(regions[2].prompts.points) == 0


def test_negative_keypoints_outside_all_rectangles_go_to_every_rectangle(config: LabelConfig) -> None:
    regions = parse(config, rectangle(0, 0, 10, 10), rectangle(50, 50, 10, 10), keypoint(90, 90, positive=False))
    assert len(regions) == 2
    for region in regions:
        np.testing.assert_allclose(region.prompts.points, [[180, 90]])
        assert region.prompts.labels.tolist() == [NEGATIVE]


@pytest.mark.parametrize("rotation", [0, 90, 180, 270])
def test_image_rotation_does_not_change_coordinates(config: LabelConfig, rotation: int) -> None:
    regions = parse(
        config, keypoint(50, 25, image_rotation=rotation), rectangle(10, 20, 30, 40, image_rotation=rotation)
    )
    assert regions[0].prompts.box == pytest.approx((20, 20, 80, 60))
    np.testing.assert_allclose(regions[1].prompts.points, [[100, 25]])


def test_coordinates_just_outside_0_100_are_clamped(config: LabelConfig) -> None:
    [region] = parse(config, keypoint(100.3, -0.2))
    np.testing.assert_allclose(region.prompts.points, [[200, 0]])


def test_rectangles_reaching_past_the_image_are_clipped(config: LabelConfig) -> None:
    [region] = parse(config, rectangle(80, 50, 40, 80))
    assert region.prompts.box == pytest.approx((160, 50, 200, 100))


@pytest.mark.parametrize("context", [None, {}, {"result": []}])
def test_no_context_means_no_regions(config: LabelConfig, context) -> None:
    assert parse_context(context, config) == []


def test_accepts_the_json_label_studio_sends(config: LabelConfig) -> None:
    body = json.loads(json.dumps({"result": [keypoint(50, 25), rectangle(10, 20, 30, 40)]}))
    assert len(parse_context(body, config)) == 2


def bad(item: dict, path: tuple, value) -> dict:
    target = item
    for key in path[:-1]:
        target = target[key]
    if value is KeyError:
        del target[path[-1]]
    else:
        target[path[-1]] = value
    return item


@pytest.mark.parametrize(
    "item, message",
    [
        (bad(keypoint(1, 1), ("from_name",), "mask"), r"from_name 'mask'.*not a KeyPointLabels.*\['kp', 'rect'\]"),
        (bad(keypoint(1, 1), ("from_name",), "unknown"), "from_name 'unknown'"),
        (bad(keypoint(1, 1), ("from_name",), KeyError), "from_name None"),
        (bad(keypoint(1, 1), ("type",), "rectanglelabels"), "type 'rectanglelabels'.*gives 'keypointlabels'"),
        (bad(keypoint(1, 1), ("to_name",), "other"), "points at 'other'"),
        (bad(keypoint(1, 1), ("value",), KeyError), "no 'value' object"),
        (bad(keypoint(1, 1), ("value", "x"), KeyError), "value.x is missing"),
        (bad(keypoint(1, 1), ("value", "x"), float("nan")), "value.x must be a finite number"),
        (bad(keypoint(1, 1), ("value", "y"), "12"), "value.y must be a finite number"),
        (bad(keypoint(1, 1), ("value", "y"), True), "value.y must be a finite number"),
        (bad(keypoint(1, 1), ("value", "x"), 150), "value.x = 150 is outside the image"),
        (bad(keypoint(1, 1), ("value", "y"), -3), "value.y = -3 is outside the image"),
        (bad(keypoint(1, 1), ("value", "keypointlabels"), "Cat"), "must be a list of label names"),
        (bad(keypoint(1, 1), ("is_positive",), "false"), "is_positive must be true or false"),
        (bad(keypoint(1, 1), ("original_width",), KeyError), "original_width must be a positive whole number"),
        (bad(keypoint(1, 1), ("original_height",), 0), "original_height must be a positive whole number"),
        (bad(keypoint(1, 1), ("original_width",), 10.5), "original_width must be a positive whole number"),
        (bad(keypoint(1, 1), ("image_rotation",), "90deg"), "image_rotation must be a finite number"),
        (bad(rectangle(1, 1, 5, 5), ("value", "width"), 0), "has no area"),
        (bad(rectangle(1, 1, 5, 5), ("value", "height"), None), "value.height must be a finite number"),
        (bad(rectangle(1, 1, 5, 5), ("value", "rotation"), "x"), "value.rotation must be a finite number"),
        (rectangle(100, 50, 10, 10), "lies outside the image"),
        ("not an object", "must be a JSON object"),
    ],
)
def test_bad_items_are_rejected_naming_the_item(config: LabelConfig, item, message: str) -> None:
    with pytest.raises(InvalidPromptError, match=message) as info:
        parse(config, keypoint(50, 50), item)
    assert "Context item 1" in info.value.message
    assert info.value.status_code == 422


def test_items_from_different_image_sizes_are_rejected(config: LabelConfig) -> None:
    with pytest.raises(InvalidPromptError, match="Context item 1.*400x100 image but earlier items are for 200x100"):
        parse(config, keypoint(1, 1), keypoint(2, 2, original_width=400))


@pytest.mark.parametrize("context", [["a"], "x", {"result": {"a": 1}}])
def test_malformed_context_is_rejected(config: LabelConfig, context) -> None:
    with pytest.raises(InvalidPromptError, match="must be"):
        parse_context(context, config)


# --- results ------------------------------------------------------------------


def test_choose_brush_label(config: LabelConfig) -> None:
    assert choose_brush_label(config, "Dog") == "Dog"
    assert choose_brush_label(config, "cat") == "Cat"  # the brush tag's spelling
    assert choose_brush_label(config, "Background") == "Cat"  # not a brush label: the first one
    assert choose_brush_label(config, None) == "Cat"
    assert choose_brush_label(config, "Cat", "dog") == "Dog"  # the setting wins
    assert choose_brush_label(config, "Dog", None) == "Dog"
    with pytest.raises(LabelConfigError, match=r"BRUSH_LABEL='Horse'.*\['Cat', 'Dog'\]"):
        choose_brush_label(config, "Cat", "Horse")


def test_brush_result_round_trips_the_mask(config: LabelConfig) -> None:
    mask = np.zeros((30, 40), bool)
    mask[5:20, 10:35] = True
    [result] = build_mask_results(mask, config=config, label="Dog", score=np.float32(0.875))
    assert isinstance(result["id"], str) and result["id"]
    assert (result["from_name"], result["to_name"], result["type"]) == ("mask", "img", "brushlabels")
    assert (result["original_width"], result["original_height"], result["image_rotation"]) == (40, 30, 0)
    assert result["value"]["format"] == "rle" and result["value"]["brushlabels"] == ["Dog"]
    assert result["score"] == 0.875 and type(result["score"]) is float
    assert result["readonly"] is False
    np.testing.assert_array_equal(decode_rle(result["value"]["rle"], 30, 40), mask)
    json.dumps(result)  # plain JSON types only


def test_brush_results_get_distinct_ids(config: LabelConfig) -> None:
    mask = np.ones((2, 2), bool)
    ids = {build_mask_results(mask, config=config, label="Cat", score=1)[0]["id"] for _ in range(5)}
    assert len(ids) == 5


def test_brush_result_rejects_bad_input(config: LabelConfig) -> None:
    with pytest.raises(LabelConfigError, match="'Horse' is not a label"):
        build_mask_results(np.ones((2, 2)), config=config, label="Horse", score=1)
    with pytest.raises(ValueError, match="2-D"):
        build_mask_results(np.ones((2, 2, 3)), config=config, label="Cat", score=1)
    with pytest.raises(ValueError, match="finite"):
        build_mask_results(np.ones((2, 2)), config=config, label="Cat", score=float("nan"))


def test_build_prediction() -> None:
    prediction = build_prediction([{"a": 1}], np.float64(0.5), "sam-base")
    assert prediction == {"result": [{"a": 1}], "score": 0.5, "model_version": "sam-base"}
    assert build_prediction([], 0, "v")["result"] == []
