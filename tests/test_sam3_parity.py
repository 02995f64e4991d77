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
