"""Property-based fuzzing of the parsers that read outside input: only our own error types escape.

Labeling configs (``/setup``'s schema, ``/predict``'s label_config), interactive contexts (after the
request limits, as the view applies them), brush RLE (webhooks, exports) and export parsing
(annotations to trimaps, whole exports). Thousands of generated inputs per run; each test's time is
bounded by its example count (a few to 30 seconds each on the 2-core development machine), not timed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ml_backend.brush import InvalidRLEError, decode_rle, encode_rle
from ml_backend.errors import BackendError
from ml_backend.export import write_dataset
from ml_backend.labeling import parse_context, parse_label_config
from ml_backend.security.limits import RequestLimits, check_context
from ml_backend.trimaps import annotation_to_trimap

FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), database=None)
SMALL_PIXELS = 1 << 16  # keeps each decode cheap; the bound itself is what is under test

CONFIG = parse_label_config("""<View><Image name="image" value="$img"/>
<BrushLabels name="mask" toName="image"><Label value="Cat"/></BrushLabels>
<KeyPointLabels name="kp" toName="image" smart="true"><Label value="Cat"/><Label value="Background"/></KeyPointLabels>
<RectangleLabels name="rect" toName="image" smart="true"><Label value="Cat"/></RectangleLabels></View>""")


# --- generators ----------------------------------------------------------------------------------

numbers = st.one_of(st.integers(-(10**30), 10**30), st.integers(-5, 200), st.just(10**400),
                    st.floats(allow_nan=True, allow_infinity=True), st.floats(-10, 110))
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                           max_leaves=6)


def maybe(strategy):
    """The value, or a random JSON value in its place."""
    return st.one_of(strategy, strategy, strategy, json_values)


context_item = st.fixed_dictionaries({}, optional={
    "from_name": maybe(st.sampled_from(["kp", "rect", "mask", "nope"])),
    "to_name": maybe(st.sampled_from(["image", "other"])),
    "type": maybe(st.sampled_from(["keypointlabels", "rectanglelabels", "KeyPointLabels", "brushlabels"])),
    "original_width": maybe(st.one_of(st.integers(-2, 5000), numbers)),
    "original_height": maybe(st.one_of(st.integers(-2, 5000), numbers)),
    "image_rotation": maybe(st.sampled_from([0, 90, 180, 270])),
    "is_positive": maybe(st.booleans()),
    "id": json_values,
    "value": maybe(st.fixed_dictionaries({}, optional={
        "x": maybe(numbers), "y": maybe(numbers), "width": maybe(numbers), "height": maybe(numbers),
        "rotation": maybe(numbers), "keypointlabels": maybe(st.lists(st.sampled_from(["Cat", "Background", "X"]))),
        "rectanglelabels": maybe(st.lists(st.sampled_from(["Cat", "X"]))), "labels": json_values})),
})
contexts = st.one_of(json_values, st.fixed_dictionaries({"result": maybe(st.lists(context_item, max_size=8))}))

tags = st.sampled_from(["View", "Image", "BrushLabels", "KeyPointLabels", "RectangleLabels", "KeyPoint", "Label",
                        "Header", "Choices", "brushlabels", "IMAGE", "Rectangle"])
attribute_values = st.one_of(st.sampled_from(["image", "$image", "$img", "true", "mask", "kp", "", "$"]),
                             st.text(max_size=8))
attributes = st.dictionaries(st.sampled_from(["name", "toName", "value", "smart", "toname", "NAME"]), attribute_values,
                             max_size=4)


@st.composite
def xml_elements(draw, depth: int = 0) -> str:
    tag = draw(tags)
    attrs = "".join(f' {k}="{_escape(v)}"' for k, v in draw(attributes).items())
    children = draw(st.lists(xml_elements(depth + 1), max_size=3)) if depth < 2 else []
    return f"<{tag}{attrs}>{''.join(children)}</{tag}>"


def _escape(text: str) -> str:
    return text.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")


label_configs = st.one_of(st.none(), json_values, st.text(max_size=200), xml_elements(),
                          st.builds(lambda body: f"<View>{body}</View>", st.lists(xml_elements(1), max_size=4).map("".join)),
                          st.sampled_from(['<!DOCTYPE x [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;">]><View>&b;</View>',
                                           '<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><View>&e;</View>',
                                           "<View>" * 500]))


# --- properties -----------------------------------------------------------------------------------

@settings(max_examples=600, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(label_configs)
def test_label_config_parsing_raises_only_our_errors(config) -> None:
    try:
        parsed = parse_label_config(config)
    except BackendError:
        return
    assert parsed.image_key and parsed.brush.name


@FUZZ
@given(contexts)
def test_interactive_context_parsing_raises_only_our_errors(context) -> None:
    try:
        if isinstance(context, dict):
            check_context(context, RequestLimits())
        regions = parse_context(context, CONFIG)
    except BackendError:
        return
    for region in regions:
        points = np.asarray(region.prompts.points, float)
        assert np.isfinite(points).all()
        assert (points[:, 0] <= region.original_width).all() and (points[:, 1] <= region.original_height).all()
        if region.prompts.box is not None:
            assert all(math.isfinite(v) for v in region.prompts.box)


@st.composite
def rle_inputs(draw):
    height, width = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    mask = rng.random((height, width)) < draw(st.sampled_from([0.0, 0.02, 0.5, 0.98, 1.0]))
    rle = encode_rle(mask)
    mutation = draw(st.sampled_from(["none", "flip", "truncate", "extend", "size", "random"]))
    if mutation == "flip" and rle:
        index = draw(st.integers(0, len(rle) - 1))
        rle[index] = draw(st.integers(0, 255))
    elif mutation == "truncate":
        rle = rle[: draw(st.integers(0, len(rle)))]
    elif mutation == "extend":
        rle = rle + draw(st.lists(st.integers(0, 255), max_size=20))
    elif mutation == "size":
        height, width = draw(st.integers(-3, 10**6)), draw(st.integers(-3, 10**6))
    elif mutation == "random":
        rle = draw(st.one_of(st.lists(st.integers(-300, 300), max_size=60), json_values))
    return rle, height, width


@FUZZ
@given(rle_inputs())
def test_rle_decoding_raises_only_invalid_rle(case) -> None:
    rle, height, width = case
    try:
        mask = decode_rle(rle, height, width, max_pixels=SMALL_PIXELS)
    except InvalidRLEError:
        return
    assert mask.shape == (height, width) and mask.dtype == bool


def test_rle_declaring_gigapixels_is_refused_before_allocating() -> None:
    header = ((32767 * 32768 * 4) << 24 | 7 << 19 | 2 << 15 | 3 << 11 | 7 << 7 | 15 << 3).to_bytes(7, "big")
    rle = list(header) + [0] * (1 << 20)
    with pytest.raises(InvalidRLEError, match="MAX_IMAGE_PIXELS"):
        decode_rle(rle, 32768, 32767)
    with pytest.raises(InvalidRLEError, match="more than a 8x8 mask can need"):
        decode_rle(rle, 8, 8)


brush_items = st.fixed_dictionaries({}, optional={
    "type": maybe(st.just("brushlabels")),
    "original_width": maybe(st.one_of(st.integers(1, 20), numbers)),
    "original_height": maybe(st.one_of(st.integers(1, 20), numbers)),
    "id": json_values,
    "to_name": json_values,
    "value": maybe(st.fixed_dictionaries({"format": maybe(st.just("rle"))}, optional={
        "rle": maybe(st.one_of(st.builds(lambda n: encode_rle(np.ones((n, n), bool)), st.integers(1, 20)),
                               st.lists(st.integers(-5, 300), max_size=30))),
        "brushlabels": maybe(st.lists(st.sampled_from(["Cat", "Background", "Boundary", "x"]), max_size=3)),
    })),
})
results = st.one_of(json_values, st.lists(brush_items, max_size=4))


@FUZZ
@given(results, st.one_of(st.none(), st.tuples(st.integers(1, 30), st.integers(1, 30))))
def test_annotation_to_trimap_raises_only_our_errors(result, size) -> None:
    try:
        trimap = annotation_to_trimap(result, size=size, max_pixels=SMALL_PIXELS)
    except BackendError:
        return
    assert trimap.dtype == np.uint8 and set(np.unique(trimap)) <= {1, 2, 3}


tasks = st.one_of(json_values, st.fixed_dictionaries({"id": maybe(st.integers(1, 50))}, optional={
    "data": maybe(st.fixed_dictionaries({"image": maybe(st.just("/data/upload/1/x.png"))})),
    "annotations": maybe(st.lists(st.fixed_dictionaries({"result": results}, optional={
        "was_cancelled": json_values, "ground_truth": json_values, "updated_at": json_values, "id": json_values}),
        max_size=3)),
}))


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz-export")


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
@given(st.lists(tasks, max_size=5))
def test_export_parsing_skips_and_reports_malformed_tasks(export_dir, export) -> None:
    image = np.zeros((12, 16, 3), np.uint8)
    report = write_dataset(export, export_dir, image_source=lambda task, url: image)
    assert len(report.written) + report.not_accepted + len(report.skipped) <= len(export)
    assert all(isinstance(reason, str) and reason for reason in report.skipped.values())
