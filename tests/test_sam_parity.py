"""Our SamEngine against the official ``segment_anything.SamPredictor`` on the same checkpoint.

A tiny official SAM with seeded random weights is saved as a ``.pth`` file, loaded
through our one loading function (which converts it to a keras-hub preset), and both
pipelines segment the same non-square images from the same prompts in original
pixels. Masks must agree to IoU >= 0.99 and scores to 1e-3.

``segment_anything`` imports torchvision only to resize; where torchvision cannot be
imported, ``benchmarks.official_sam`` installs a stand-in that resizes exactly as
torchvision does for the calls ``SamPredictor`` makes (PIL bilinear).
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import ml_backend  # noqa: F401  (selects the torch backend before keras is imported)
from ml_backend.sam import Prompts, SamEngine, load_segmenter
from benchmarks.official_sam import official_predictor
from official_sam import tiny_checkpoint

MIN_IOU = 0.99
SCORE_ATOL = 1e-3


def _image(height: int, width: int, seed: int) -> np.ndarray:
    """A smooth random RGB image with a bright rectangle: structure at several scales."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC)).copy()
    image[height // 4 : height // 2, width // 3 : 2 * width // 3] = (250, 240, 30)
    image += rng.integers(0, 12, image.shape, dtype=np.uint8)
    return image


IMAGES = {
    "landscape": _image(150, 260, seed=3),  # wider than tall
    "portrait": _image(230, 110, seed=4),  # taller than wide
}

# Prompts as fractions of (width, height), so they fit both orientations.
PROMPTS = {
    "one positive point": dict(points=[(0.5, 0.4)], labels=[1], box=None),
    "positive and negative points": dict(points=[(0.45, 0.35), (0.8, 0.85)], labels=[1, 0], box=None),
    "box": dict(points=[], labels=[], box=(0.2, 0.15, 0.75, 0.6)),
    "box and points": dict(points=[(0.5, 0.4), (0.3, 0.55)], labels=[1, 0], box=(0.2, 0.15, 0.75, 0.6)),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("sam-ckpt"), seed=0)


@pytest.fixture(scope="module")
def engine(checkpoint, tmp_path_factory):
    segmenter = load_segmenter(str(checkpoint), converted_root=tmp_path_factory.mktemp("sam-presets"))
    return SamEngine(segmenter, cache_bytes=64 << 20)


@pytest.fixture(scope="module")
def predictor(checkpoint):
    return official_predictor(checkpoint)


def _in_pixels(spec: dict, image: np.ndarray) -> dict:
    height, width = image.shape[:2]
    points = [(fx * width, fy * height) for fx, fy in spec["points"]]
    box = spec["box"]
    if box is not None:
        box = (box[0] * width, box[1] * height, box[2] * width, box[3] * height)
    return dict(points=points, labels=list(spec["labels"]), box=box)


def _official(predictor, image: np.ndarray, prompt: dict) -> tuple[np.ndarray, float, np.ndarray]:
    predictor.set_image(image)
    single_point = len(prompt["points"]) == 1 and prompt["box"] is None
    masks, scores, low_res = predictor.predict(
        point_coords=np.asarray(prompt["points"], np.float32) if prompt["points"] else None,
        point_labels=np.asarray(prompt["labels"], np.int32) if prompt["points"] else None,
        box=None if prompt["box"] is None else np.asarray(prompt["box"], np.float32),
        multimask_output=single_point,
    )
    best = int(np.argmax(scores))  # the single mask when multimask_output is False
    return masks[best], float(scores[best]), low_res[best]


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / np.logical_or(a, b).sum())


@pytest.mark.parametrize("prompt_name", list(PROMPTS))
@pytest.mark.parametrize("image_name", list(IMAGES))
def test_masks_and_scores_match_the_official_predictor(engine, predictor, image_name, prompt_name):
    image = IMAGES[image_name]
    prompt = _in_pixels(PROMPTS[prompt_name], image)
    expected_mask, expected_score, expected_low_res = _official(predictor, image, prompt)
    # A mask of all or nothing would match trivially: the comparison must be about a shape.
    assert 0.02 < expected_mask.mean() < 0.98, f"degenerate reference mask ({expected_mask.mean():.3f} foreground)"

    result = engine.segment(image, Prompts.from_lists(**prompt))

    assert result.mask.shape == image.shape[:2] and result.mask.dtype == bool
    iou = _iou(result.mask, expected_mask)
    assert iou >= MIN_IOU, f"IoU {iou:.4f} with the official mask"
    assert result.score == pytest.approx(expected_score, abs=SCORE_ATOL)
    np.testing.assert_allclose(result.low_res_logits, expected_low_res, atol=1e-3)


def test_prompts_change_the_mask(engine):
    """The parity above means something only if different prompts give different masks."""
    image = IMAGES["landscape"]
    masks = [engine.segment(image, Prompts.from_lists(**_in_pixels(p, image))).mask for p in PROMPTS.values()]
    assert any(_iou(masks[0], other) < 0.95 for other in masks[1:])


@pytest.mark.parametrize("image_name", list(IMAGES))
def test_refining_with_previous_logits_matches_the_official_predictor(engine, predictor, image_name):
    """A second click fed the first result's low-res logits, as interactive annotation does."""
    image = IMAGES[image_name]
    first = _in_pixels(PROMPTS["one positive point"], image)
    second = _in_pixels(PROMPTS["positive and negative points"], image)
    _, _, previous_logits = _official(predictor, image, first)
    masks, scores, _ = predictor.predict(
        point_coords=np.asarray(second["points"], np.float32),
        point_labels=np.asarray(second["labels"], np.int32),
        mask_input=previous_logits[None],
        multimask_output=False,
    )
    assert 0.02 < masks[0].mean() < 0.98

    ours_first = engine.segment(image, Prompts.from_lists(**first))
    result = engine.segment(image, Prompts.from_lists(**second, mask_logits=ours_first.low_res_logits))

    assert _iou(result.mask, masks[0]) >= MIN_IOU
    assert result.score == pytest.approx(float(scores[0]), abs=SCORE_ATOL)


@pytest.mark.slow
def test_quick_bench_runs_and_its_masks_agree(capsys):
    """The benchmark command works end to end; its timings are printed, never asserted."""
    import json

    from benchmarks.sam import main

    assert main(["--quick", "--repeats", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["median"]) == {
        "first_click_s", "reference_first_click_s", "cached_click_s", "reference_predict_multimask_s",
        "reference_predict_single_s", "decoder_s", "reference_decoder_s", "hash_s",
    }
    assert all(len(runs) == 1 and runs[0] > 0 for runs in report["runs"].values())
    assert set(report["met"]) == set(report["ratios"]) == set(report["targets"])
    assert report["parity"]["mask_iou"] >= MIN_IOU
    assert report["parity"]["score_difference"] <= SCORE_ATOL
