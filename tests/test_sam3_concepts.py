"""Prompt building, thresholds, de-duplication and the trimap combination of SAM 3 pre-annotation."""

from __future__ import annotations

import numpy as np
import pytest

from ml_backend.brush import decode_rle
from ml_backend.labeling import parse_label_config
from ml_backend.sam3.concepts import ConceptPrompt, concept_prompts, filter_by_trimap, mask_iou, select_instances
from ml_backend.sam3.engine import ConceptCandidate, ConceptInstance
from ml_backend.sam3.preannotate import ConceptPreannotator
from ml_backend.settings import Settings, SettingsError

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image">
    <Label value="Cat" hint="tabby cat"/>
    <Label value="Dog"/>
    <Label value="Background"/>
    <Label value="Car" background="#00f"/>
  </BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="Cat" hint="not this one"/></KeyPointLabels>
</View>"""


def _mask(shape, y0, y1, x0, x1) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def _inst(score: float, mask: np.ndarray) -> ConceptInstance:
    ys, xs = np.nonzero(mask)
    box = (float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)) if len(xs) else (0, 0, 0, 0)
    return ConceptInstance(score, box, mask)


def test_prompts_from_labels_hints_and_setting() -> None:
    config = parse_label_config(CONFIG)
    prompts = concept_prompts(CONFIG, config.mask.labels, config.mask.name, phrases={"car": "red car"},
                              skip=("background", "boundary"))
    assert prompts == [ConceptPrompt("Cat", "tabby cat"), ConceptPrompt("Dog", "Dog"), ConceptPrompt("Car", "red car")]


def test_phrases_setting_parsing_and_default_mode() -> None:
    settings = Settings.from_env({"SAM3_MODEL": "sam3_pcs", "SAM3_PHRASES": "Cat=tabby cat; Car = red car ;"})
    assert settings.preannotate == "sam3"  # SAM3_MODEL alone switches pre-annotation to SAM 3
    assert settings.sam3_phrases == (("cat", "tabby cat"), ("car", "red car"))
    assert Settings.from_env({}).preannotate == "trimap"
    assert Settings.from_env({"SAM3_MODEL": "x", "PREANNOTATE": "trimap"}).preannotate == "trimap"
    for env, message in [({"SAM3_PHRASES": "Cat"}, "Label=phrase"), ({"PREANNOTATE": "sam3"}, "SAM3_MODEL"),
                         ({"PREANNOTATE": "all"}, "trimap, sam3 or both"),
                         ({"SAM3_MODEL": "x", "SAM3_SCORE_THRESHOLD": "1.5"}, "between 0 and 1"),
                         ({"SAM3_PHRASES": "Cat=" + "x" * 201}, "200")]:
        with pytest.raises(SettingsError, match=message):
            Settings.from_env(env)


def test_duplicates_across_labels_keep_the_higher_score() -> None:
    shape = (40, 40)
    cat = _mask(shape, 0, 20, 0, 20)
    cat_again_as_dog = _mask(shape, 1, 20, 0, 20)  # IoU 0.95 with cat
    dog = _mask(shape, 25, 40, 25, 40)
    found = [("Cat", [_inst(0.8, cat)]), ("Dog", [_inst(0.9, cat_again_as_dog), _inst(0.6, dog)]),
             ("Car", [_inst(0.99, np.zeros(shape, bool))])]  # an empty mask is no region
    kept = select_instances(found, iou_threshold=0.7, max_instances=10)
    assert [(k.label, k.instance.score) for k in kept] == [("Dog", 0.9), ("Dog", 0.6)]
    kept = select_instances(found, iou_threshold=0.99, max_instances=10)  # below the threshold both stay
    assert [(k.label, k.instance.score) for k in kept] == [("Dog", 0.9), ("Cat", 0.8), ("Dog", 0.6)]
    assert len(select_instances(found, iou_threshold=0.99, max_instances=2)) == 2
    assert mask_iou(cat, cat_again_as_dog) == pytest.approx(380 / 400)


def test_masks_are_made_one_at_a_time_and_only_until_enough_are_kept() -> None:
    """The engine's candidates hold low-resolution logits; a full-size mask exists only when selection asks."""
    shape = (40, 40)
    made: list[float] = []

    def candidate(score: float, mask: np.ndarray) -> ConceptCandidate:
        def upsample() -> np.ndarray:
            made.append(score)
            return mask
        return ConceptCandidate(score, (0.0, 0.0, 1.0, 1.0), upsample)

    found = [("Cat", [candidate(0.5, _mask(shape, 0, 10, 0, 10)), candidate(0.9, _mask(shape, 0, 10, 0, 11))]),
             ("Dog", [candidate(0.7, _mask(shape, 20, 30, 20, 30)), candidate(0.6, _mask(shape, 30, 40, 0, 9)),
                      candidate(0.4, _mask(shape, 0, 5, 30, 40))])]
    kept = select_instances(found, iou_threshold=0.7, max_instances=2)
    assert [(k.label, k.instance.score) for k in kept] == [("Cat", 0.9), ("Dog", 0.7)]
    assert made == [0.9, 0.7]  # best first; the three others never reached the image's size
    made.clear()
    kept = select_instances(found, iou_threshold=0.7, max_instances=10)
    assert [k.instance.score for k in kept] == [0.9, 0.7, 0.6, 0.4]  # 0.5 duplicates 0.9
    assert made == [0.9, 0.7, 0.6, 0.5, 0.4]


def test_trimap_filter_keeps_instances_inside_the_foreground() -> None:
    shape = (40, 40)
    inside, outside = _mask(shape, 0, 10, 0, 10), _mask(shape, 30, 40, 30, 40)
    foreground = _mask(shape, 0, 12, 0, 12)
    kept = select_instances([("Cat", [_inst(0.9, inside), _inst(0.8, outside)])], iou_threshold=0.7,
                            max_instances=10)
    assert [k.instance.score for k in filter_by_trimap(kept, foreground, 0.5)] == [0.9]


class FakeEngine:
    """Returns, per phrase, the instances the test planted; records what it was asked and the threshold."""

    def __init__(self, planted: dict[str, list[ConceptInstance]]) -> None:
        self.planted, self.calls = planted, []

    def segment(self, image, phrases, *, threshold, boxes=None, box_labels=None, slot=None):
        self.calls.append((list(phrases), threshold))
        return [[i for i in self.planted.get(p, []) if i.score > threshold] for p in phrases]


def _predictor(engine: FakeEngine, **env) -> ConceptPreannotator:
    settings = Settings.from_env({"SAM3_MODEL": "/models/sam3-tiny", "SAM3_SCORE_THRESHOLD": "0.5", **env})
    return ConceptPreannotator(settings, lambda: engine)


def test_prediction_holds_one_brush_region_per_instance_with_label_and_score() -> None:
    shape = (30, 50)
    cat, dog = _mask(shape, 2, 12, 3, 20), _mask(shape, 15, 28, 25, 45)
    engine = FakeEngine({"tabby cat": [_inst(0.9, cat), _inst(0.3, dog)], "Dog": [_inst(0.7, dog)]})
    predictor = _predictor(engine)
    image = np.zeros((*shape, 3), np.uint8)
    prediction = predictor.predict(image, CONFIG, parse_label_config(CONFIG), trimap=None)
    assert engine.calls == [(["tabby cat", "Dog", "Car"], 0.5)]
    assert prediction["model_version"] == "sam3-sam3-tiny"
    regions = prediction["result"]
    assert [(r["value"]["brushlabels"], r["score"]) for r in regions] == [(["Cat"], 0.9), (["Dog"], 0.7)]
    assert prediction["score"] == pytest.approx(0.8)
    for region, mask in zip(regions, (cat, dog)):
        assert (region["original_width"], region["original_height"]) == (50, 30)
        decoded = decode_rle(region["value"]["rle"], 30, 50)
        assert np.array_equal(decoded > 0, mask)
    assert len({r["id"] for r in regions}) == 2


def test_both_mode_filters_by_trimap_and_falls_back_to_its_mask() -> None:
    shape = (30, 50)
    cat, dog = _mask(shape, 2, 12, 3, 20), _mask(shape, 15, 28, 25, 45)
    engine = FakeEngine({"tabby cat": [_inst(0.9, cat)], "Dog": [_inst(0.7, dog)]})
    predictor = _predictor(engine, PREANNOTATE="both")
    config = parse_label_config(CONFIG)
    image = np.zeros((*shape, 3), np.uint8)
    prediction = predictor.predict(image, CONFIG, config, trimap=("v3", dog, 0.64))
    assert prediction["model_version"] == "sam3-sam3-tiny+trimap-v3"
    assert [r["value"]["brushlabels"] for r in prediction["result"]] == [["Dog"]]
    assert prediction["score"] == pytest.approx((0.7 * 0.64) ** 0.5)  # SAM 3's and the trimap's, both
    nothing_inside = _mask(shape, 0, 1, 48, 50)
    fallback = predictor.predict(image, CONFIG, config, trimap=("v3", nothing_inside, 0.3), trimap_label="Cat")
    assert [r["value"]["brushlabels"] for r in fallback["result"]] == [["Cat"]]
    assert np.array_equal(decode_rle(fallback["result"][0]["value"]["rle"], 30, 50) > 0, nothing_inside)
    assert fallback["score"] == fallback["result"][0]["score"] == pytest.approx(0.3)  # the trimap's own score
    alone = predictor.predict(image, CONFIG, config, trimap=None)  # no trimap version promoted yet
    assert alone["model_version"] == "sam3-sam3-tiny+trimap-none" and len(alone["result"]) == 2
    assert alone["score"] == pytest.approx(0.8)  # SAM 3's alone


def test_a_config_with_only_background_asks_nothing() -> None:
    config_xml = CONFIG.replace('<Label value="Cat" hint="tabby cat"/>', "").replace('<Label value="Dog"/>', "") \
        .replace('<Label value="Car" background="#00f"/>', "")
    engine = FakeEngine({})
    prediction = _predictor(engine).predict(np.zeros((8, 8, 3), np.uint8), config_xml,
                                            parse_label_config(config_xml), trimap=None)
    assert prediction["result"] == [] and engine.calls == []


def test_instances_below_min_mask_area_give_no_region() -> None:
    """MIN_MASK_AREA holds for SAM 3 as for every prediction: a tiny instance is dropped as if not found (it
    takes no place among SAM3_MAX_INSTANCES and hides nothing by de-duplication)."""
    shape = (30, 50)
    speck, cat = _mask(shape, 0, 3, 0, 5), _mask(shape, 10, 20, 10, 30)  # 15 and 200 pixels
    engine = FakeEngine({"tabby cat": [_inst(0.95, speck), _inst(0.9, cat)]})
    image = np.zeros((*shape, 3), np.uint8)
    config = parse_label_config(CONFIG)
    kept = _predictor(engine, MIN_MASK_AREA="16", SAM3_MAX_INSTANCES="1").predict(image, CONFIG, config, trimap=None)
    assert [np.count_nonzero(decode_rle(r["value"]["rle"], 30, 50)) for r in kept["result"]] == [200]
    both = _predictor(engine, MIN_MASK_AREA="15").predict(image, CONFIG, config, trimap=None)
    assert [r["score"] for r in both["result"]] == [0.95, 0.9]


@pytest.mark.parametrize("tag, result_type", [("BitmaskLabels", "bitmasklabels"), ("PolygonLabels", "polygonlabels")])
def test_regions_in_the_bitmask_and_polygon_forms(tag: str, result_type: str) -> None:
    """SAM 3's regions take the mask tag's form like every prediction: each reads back as its instance (a
    polygon as the outline the polygon settings promise)."""
    from ml_backend.formats import PolygonOptions, mask_values, region_mask

    shape = (30, 50)
    cat, dog = _mask(shape, 2, 12, 3, 20), _mask(shape, 15, 28, 25, 45)
    config_xml = CONFIG.replace("BrushLabels", tag)
    engine = FakeEngine({"tabby cat": [_inst(0.9, cat)], "Dog": [_inst(0.7, dog)]})
    predictor = _predictor(engine)
    prediction = predictor.predict(np.zeros((*shape, 3), np.uint8), config_xml, parse_label_config(config_xml),
                                   trimap=None)
    regions = prediction["result"]
    assert [(r["type"], r["value"][result_type], r["score"]) for r in regions] == [
        (result_type, ["Cat"], 0.9), (result_type, ["Dog"], 0.7)]
    for region, mask in zip(regions, (cat, dog)):
        restored = region_mask(region, (50, 30), max_pixels=10**6)
        if result_type == "polygonlabels":
            [value] = mask_values(mask, result_type, PolygonOptions.from_settings(predictor.settings))
            assert region["value"]["points"] == value["points"] and region["value"]["closed"]
            assert np.count_nonzero(restored & mask) / np.count_nonzero(restored | mask) > 0.8
        else:
            np.testing.assert_array_equal(restored, mask)
