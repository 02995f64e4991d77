"""Our SAM 3 (keras-hub converter + :mod:`ml_backend.sam3`) against transformers' ``Sam3Model`` on the same
random checkpoint, images, phrases and boxes: scores, boxes and masks at the original size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sam3_fixture import checkpoint, sam3_engine  # noqa: F401  (fixtures)

from ml_backend.sam3.engine import Sam3Engine


@pytest.fixture(scope="module")
def engine(sam3_engine) -> Sam3Engine:
    return sam3_engine


@pytest.fixture(scope="module")
def reference(checkpoint: Path):
    from sam3_factory import reference_model

    return reference_model(checkpoint)


def _reference_outputs(reference, checkpoint: Path, engine: Sam3Engine, image: np.ndarray, phrases: list[str],
                       boxes: list[tuple] | None, labels: list[int] | None):
    """transformers' model on our resized pixels, its own tokenizer from the checkpoint, and the steps of its
    ``post_process_instance_segmentation`` (whose module imports torchvision, so they are spelled out here)."""
    from transformers import CLIPTokenizer

    height, width = image.shape[:2]
    tokens = CLIPTokenizer.from_pretrained(str(checkpoint))(phrases, padding="max_length", max_length=32,
                                                             truncation=True, return_tensors="pt")
    pixels = torch.from_numpy(engine._pixels(image)).permute(0, 3, 1, 2).repeat(len(phrases), 1, 1, 1)
    if boxes:
        xyxy = torch.tensor(boxes, dtype=torch.float32)
        cxcywh = torch.stack([(xyxy[:, 0] + xyxy[:, 2]) / 2 / width, (xyxy[:, 1] + xyxy[:, 3]) / 2 / height,
                              (xyxy[:, 2] - xyxy[:, 0]) / width, (xyxy[:, 3] - xyxy[:, 1]) / height], dim=1)
        box_labels = torch.tensor(labels)
    else:
        # transformers skips the geometry encoder without boxes; Meta's SAM 3 and keras-hub always run it
        # (its CLS token joins the prompt). A padding box gives transformers the same sequence.
        cxcywh, box_labels = torch.full((1, 4), -10.0), torch.tensor([-10])
    with torch.no_grad():
        out = reference(pixel_values=pixels, input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                        input_boxes=cxcywh[None].repeat(len(phrases), 1, 1),
                        input_boxes_labels=box_labels[None].repeat(len(phrases), 1))
        scores = out.pred_logits.sigmoid() * out.presence_logits.sigmoid()
        pboxes = out.pred_boxes * torch.tensor([width, height, width, height])
        masks = torch.nn.functional.interpolate(out.pred_masks.sigmoid(), size=(height, width), mode="bilinear",
                                                align_corners=False)
    return scores.numpy(), pboxes.numpy(), masks.numpy()


CASES = {
    "text, not square": ((90, 140), ["cat", "yellow school bus"], None, None),
    "text, tall": ((130, 70), ["Golden Retriever"], None, None),
    "text and a box": ((90, 140), ["cat", "tree"], [(10.0, 20.0, 70.0, 80.0)], [1]),
    "positive and negative boxes": ((100, 100), ["dog"], [(5.0, 5.0, 50.0, 60.0), (60.0, 40.0, 95.0, 90.0)],
                                    [1, 0]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_scores_boxes_masks_match_transformers(case: str, engine, reference, checkpoint) -> None:
    size, phrases, boxes, labels = CASES[case]
    image = np.random.default_rng(len(case)).integers(0, 256, (*size, 3), dtype=np.uint8)
    ours = engine.predict_raw(image, phrases, boxes, labels)
    scores, pboxes, masks = _reference_outputs(reference, checkpoint, engine, image, phrases, boxes, labels)
    assert ours.scores.shape == scores.shape and ours.mask_probabilities.shape == masks.shape
    assert scores.std() > 1e-3 and (masks > 0.5).any() and (masks < 0.5).any()  # not a comparison of constants
    np.testing.assert_allclose(ours.scores, scores, atol=2e-5)
    np.testing.assert_allclose(ours.boxes, pboxes, atol=1e-3)
    np.testing.assert_allclose(ours.mask_probabilities, masks, atol=1e-4)
    away = np.abs(masks - 0.5) > 1e-3  # a pixel exactly at the threshold may flip either way
    assert np.array_equal((ours.mask_probabilities > 0.5)[away], (masks > 0.5)[away])


def test_negative_box_changes_the_answer(engine) -> None:
    """A negative exemplar must reach the model as negative (keras-hub's backbone graph swaps mask and label)."""
    image = np.random.default_rng(5).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    box = [(10.0, 10.0, 60.0, 60.0)]
    positive = engine.predict_raw(image, ["dog"], box, [1]).scores
    negative = engine.predict_raw(image, ["dog"], box, [0]).scores
    assert np.abs(positive - negative).max() > 1e-4


def test_every_correction_is_needed(checkpoint, reference, engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the causal text mask, the reference epsilons or the engine's own graph, parity breaks."""
    from keras_hub.src.models.sam3 import sam3_text_encoder, sam3_utils

    image = np.random.default_rng(9).integers(0, 256, (90, 140, 3), dtype=np.uint8)
    scores, _, _ = _reference_outputs(reference, checkpoint, engine, image, ["cat"], None, None)
    monkeypatch.setattr(sam3_text_encoder, "create_bidirectional_mask", sam3_utils.create_bidirectional_mask)
    assert np.abs(engine.predict_raw(image, ["cat"]).scores - scores).max() > 1e-4
    monkeypatch.undo()
    for layer in engine.backbone.dot_product_scoring._flatten_layers():
        if hasattr(layer, "epsilon") and layer.epsilon == 1e-5:
            monkeypatch.setattr(layer, "epsilon", 1e-6)
    monkeypatch.setattr(engine.backbone.geometry_encoder.vision_layer_norm, "epsilon", 1e-6)
    for part in ("detr_encoder", "detr_decoder", "mask_decoder", "geometry_encoder"):
        for layer in getattr(engine.backbone, part)._flatten_layers():
            if type(layer).__name__ == "LayerNormalization":
                monkeypatch.setattr(layer, "epsilon", 1e-6)
    assert np.abs(engine.predict_raw(image, ["cat"]).scores - scores).max() > 1e-5


def test_segment_keeps_instances_above_the_threshold_best_first(engine) -> None:
    image = np.random.default_rng(11).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    raw = engine.predict_raw(image, ["cat", "dog"])
    threshold = float(np.median(raw.scores))
    found = engine.segment(image, ["cat", "dog"], threshold=threshold)
    for row, instances in enumerate(found):
        expected = np.sort(raw.scores[row][raw.scores[row] > threshold])[::-1]
        np.testing.assert_allclose([i.score for i in instances], expected, atol=1e-6)
        for instance in (candidate.materialize() for candidate in instances):
            query = int(np.argmin(np.abs(raw.scores[row] - instance.score)))
            assert instance.mask.shape == (60, 90)
            assert np.array_equal(instance.mask, raw.mask_probabilities[row, query] > 0.5)
            np.testing.assert_allclose(instance.box, raw.boxes[row, query], atol=1e-4)


def test_the_compared_engine_runs_the_fast_convolutions(engine) -> None:
    """The parity above is of the copy-free layers (ml_backend.sam3.fast_layers): loading installs them."""
    replaced = [layer for layer in engine.backbone.mask_decoder._flatten_layers() if "call" in vars(layer)]
    assert {type(layer).__name__ for layer in replaced} == {"Conv2D", "GroupNormalization"}


# --- From the image file, as a user starts: transformers' whole pipeline against our loader, engine, results ---

MASK_CONFIG = """<View><Image name="image" value="$image"/>
<BrushLabels name="tag" toName="image"><Label value="cat"/></BrushLabels></View>"""


def _file(directory: Path, name: str, size: tuple[int, int], orientation: int | None) -> Path:
    """A smooth, textured image (not noise: JPEG keeps it) saved as PNG, or as JPEG with an EXIF orientation."""
    from PIL import Image

    height, width = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    rng = np.random.default_rng(height * width)
    channels = [127 + 120 * np.sin(x / rng.uniform(3, 9) + rng.uniform(0, 6)) * np.cos(y / rng.uniform(3, 9))
                for _ in range(3)]
    picture = Image.fromarray(np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8))
    path = directory / name
    if orientation is None:
        picture.save(path)
    else:
        exif = Image.Exif()
        exif[0x0112] = orientation
        picture.save(path, quality=92, exif=exif)
    return path


FILE_CASES = {
    # name: (stored height, width), EXIF orientation, phrases, exemplar boxes (in the upright image), labels
    "png, odd and wide": ((97, 141), None, ["cat", "yellow school bus"], None, None),
    "jpeg turned by EXIF": ((75, 131), 6, ["Golden Retriever", "tree"], None, None),
    "jpeg mirrored by EXIF, with boxes": ((123, 89), 2, ["dog"], [[8.0, 10.0, 60.0, 70.0], [50.0, 60.0, 85.0, 110.0]],
                                          [1, 0]),
}


THRESHOLD = 0.0  # every query: all ten instances of each phrase are compared


@pytest.fixture(scope="module")
def reference_runs(checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    """Each case's file and the reference pipeline's outputs for it (one process for all cases)."""
    import json
    import subprocess
    import sys

    directory = tmp_path_factory.mktemp("sam3-files")
    runs, files = [], {}
    for number, (case, (size, orientation, phrases, boxes, labels)) in enumerate(FILE_CASES.items()):
        path = _file(directory, f"{number}.png" if orientation is None else f"{number}.jpg", size, orientation)
        files[case] = path
        runs.append({"image": str(path), "phrases": phrases, "boxes": boxes, "labels": labels,
                     "threshold": THRESHOLD, "out": str(directory / f"{number}.npz")})
    spec = directory / "spec.json"
    spec.write_text(json.dumps({"checkpoint": str(checkpoint), "runs": runs}))
    script = Path(__file__).resolve().parent / "sam3_reference_pipeline.py"
    done = subprocess.run([sys.executable, str(script), str(spec)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {case: (files[case], dict(np.load(run["out"]))) for case, run in zip(FILE_CASES, runs)}


@pytest.mark.parametrize("case", list(FILE_CASES))
def test_from_the_file_masks_and_scores_match_the_reference_pipeline(case: str, engine, reference_runs) -> None:
    """uint8 file -> transformers' load_image, Sam3Processor, Sam3Model, post_process_instance_segmentation,
    against our decoder (ml_backend.images), engine and brush results: the same pixels, masks at the original
    size with IoU >= 0.999 and scores within 1e-4."""
    from ml_backend import labeling
    from ml_backend.brush import decode_rle
    from ml_backend.images.decode import decode_image

    size, orientation, phrases, boxes, labels = FILE_CASES[case]
    path, reference = reference_runs[case]

    image = decode_image(path.read_bytes(), max_pixels=10**7)
    if orientation in (5, 6, 7, 8):
        assert image.shape[:2] == size[::-1]  # the EXIF turn is applied on both sides
    pixels = engine._pixels(image)
    assert np.array_equal(pixels, reference["pixels"].transpose(0, 2, 3, 1))  # bit for bit

    config = labeling.parse_label_config(MASK_CONFIG)
    found = engine.segment(image, phrases, threshold=THRESHOLD,
                           boxes=[tuple(b) for b in boxes] if boxes else None, box_labels=labels)
    compared = 0
    for index, candidates in enumerate(found):
        scores, masks = reference[f"scores_{index}"], reference[f"masks_{index}"]
        order = np.argsort(-scores, kind="stable")
        assert len(candidates) == len(scores) > 0
        np.testing.assert_allclose([c.score for c in candidates], scores[order], atol=1e-4)
        for candidate, expected in zip(candidates, masks[order]):
            ours = candidate.materialize().mask
            assert ours.shape == expected.shape == image.shape[:2]
            for result in labeling.build_mask_results(ours, config=config, label="cat", score=candidate.score):
                ours = decode_rle(result["value"]["rle"], *image.shape[:2])  # what Label Studio stores
            union = np.count_nonzero(ours | expected)
            if union:
                assert np.count_nonzero(ours & expected) / union >= 0.999
                compared += 1
            else:
                assert not ours.any()
    assert compared >= len(phrases) * 3  # masks that are not empty were compared


def test_the_float_resize_of_before_differs_from_the_reference(engine) -> None:
    """The test above can fail: resizing in float without rounding to uint8 (what the engine did) does not give
    the reference's pixels."""
    import torch
    import torch.nn.functional as F

    image = np.random.default_rng(3).integers(0, 256, (97, 141, 3), dtype=np.uint8)
    tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
    size = (engine.image_size, engine.image_size)
    old = ((F.interpolate(tensor, size=size, mode="bilinear", align_corners=False, antialias=True) - 0.5) / 0.5)
    assert np.abs(old.permute(0, 2, 3, 1).numpy() - engine._pixels(image)).max() > 1e-3
