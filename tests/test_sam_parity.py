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


# --- From the image file, as a user starts: the official README's cv2 reading against our decoder ---

def _saved(directory, name: str, image: np.ndarray, orientation: int | None):
    """``image`` stored upright as PNG, or stored turned back with an EXIF orientation that turns it upright."""
    path = directory / name
    if orientation is None:
        Image.fromarray(image).save(path)
        return path
    stored = Image.fromarray(image).transpose(Image.Transpose.ROTATE_90)  # orientation 6 turns it back
    exif = Image.Exif()
    exif[0x0112] = orientation
    stored.save(path, quality=95, exif=exif)
    return path


FILES = {"png, odd sizes": ("image.png", _image(151, 263, seed=7), None),
         "jpeg turned by EXIF": ("image.jpg", _image(137, 229, seed=8), 6)}


@pytest.mark.parametrize("file_case", list(FILES))
@pytest.mark.parametrize("prompt_name", ["one positive point", "box and points"])
def test_from_the_file_masks_and_scores_match_the_official_predictor(engine, predictor, tmp_path, file_case,
                                                                     prompt_name):
    """uint8 file -> ``cv2.imread`` + BGR to RGB + ``SamPredictor`` (the official README's steps) against our
    decoder (ml_backend.images), engine and brush result, masks compared at the original size."""
    import cv2

    from ml_backend import labeling
    from ml_backend.brush import decode_rle
    from ml_backend.images.decode import decode_image

    name, upright, orientation = FILES[file_case]
    path = _saved(tmp_path, name, upright, orientation)
    official_image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
    image = decode_image(path.read_bytes(), max_pixels=10**7)
    assert image.shape == official_image.shape == upright.shape  # both apply the EXIF turn
    assert np.abs(image.astype(int) - official_image).max() <= 1  # the same pixels (JPEG decoders may round)

    prompt = _in_pixels(PROMPTS[prompt_name], image)
    expected_mask, expected_score, _ = _official(predictor, official_image, prompt)
    assert 0.02 < expected_mask.mean() < 0.98
    result = engine.segment(image, Prompts.from_lists(**prompt))
    config = labeling.parse_label_config('<View><Image name="image" value="$image"/><BrushLabels name="tag" '
                                         'toName="image"><Label value="cat"/></BrushLabels></View>')
    [item] = labeling.build_mask_results(result.mask, config=config, label="cat", score=result.score)
    stored = decode_rle(item["value"]["rle"], item["original_height"], item["original_width"])
    assert _iou(stored, expected_mask) >= 0.999
    assert result.score == pytest.approx(expected_score, abs=1e-4)
