"""Prediction at the original image size, for the backend and the ``predict`` command.

Class ids are 0 foreground, 1 background, 2 boundary (trimap value - 1); use
:func:`to_trimap_values` for Oxford-style 1/2/3. The model outputs logits (see
``training.model.build_model``): softmax is applied here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from training.data import DECODE_ERRORS, IMAGE_SUFFIXES, Problem, load_image
from training.model import BOUNDARY, FOREGROUND, NUM_CLASSES, model_image_size

log = logging.getLogger(__name__)

# Overlay colours per class id: foreground, background (left untouched), boundary.
CLASS_COLOURS = np.array([[255, 64, 32], [0, 0, 0], [255, 220, 0]], dtype=np.float32)
OVERLAY_ALPHA = 0.45


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 array of shape (H, W, 3), got {array.dtype} {array.shape}")
    return array


def resize_for_model(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize to the model's square input, as the training pipeline does."""
    return np.asarray(Image.fromarray(_as_rgb(image)).resize((size, size), Image.Resampling.BILINEAR))


def probabilities(model, inputs: np.ndarray) -> np.ndarray:
    """Class probabilities (N, S, S, 3) for a batch already at the model's input size."""
    logits = model.predict_on_batch(np.asarray(inputs, dtype=np.float32))
    return _softmax(np.asarray(logits, dtype=np.float32))


def upsample(probs: np.ndarray, width: int, height: int) -> np.ndarray:
    """Bilinear resize of (S, S, C) probabilities to (height, width, C)."""
    if probs.shape[:2] == (height, width):
        return probs
    channels = [
        np.asarray(Image.fromarray(probs[..., c]).resize((width, height), Image.Resampling.BILINEAR))
        for c in range(probs.shape[-1])
    ]
    return np.stack(channels, axis=-1)


def predict_trimaps(model, images: Sequence[np.ndarray], batch_size: int = 8) -> list[np.ndarray]:
    """Class ids (uint8, 0/1/2) for each RGB uint8 image, each at that image's own size."""
    size = model_image_size(model)
    results: list[np.ndarray] = []
    for start in range(0, len(images), batch_size):
        chunk = [_as_rgb(image) for image in images[start : start + batch_size]]
        probs = probabilities(model, np.stack([resize_for_model(image, size) for image in chunk]))
        for image, prob in zip(chunk, probs):
            height, width = image.shape[:2]
            results.append(upsample(prob, width, height).argmax(axis=-1).astype(np.uint8))
    return results


def mask_edge(mask: np.ndarray) -> np.ndarray:
    """Pixels with a 4-neighbour on the other side of the mask's edge (both sides of it)."""
    padded = np.pad(mask, 1, mode="edge")
    neighbours = (padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:])
    return np.logical_or.reduce([n != mask for n in neighbours])


def edge_confidence(probs: np.ndarray, mask: np.ndarray) -> float:
    """The prediction's score in [0, 1]: how sure the model is along the edge of its mask.

    The mean, over the pixels on both sides of the mask's edge, of each pixel's largest class
    probability, rescaled from [1/3, 1] (three classes: a coin toss to certainty) to [0, 1]. A
    model hesitates first where it draws the object's outline: a right mask has a sharp, sure
    edge; a wrong one (a missed part, a blob on the background, an image unlike its training
    images) has a soft one. Chosen by ``benchmarks/prediction_score.py`` over the expected IoU from
    per-pixel probabilities, the mean confidence inside the mask, the share of confident pixels
    and the agreement with a mirrored prediction: it was the only one whose rank correlation with
    the mask's true IoU reached 0.5 on both held-out sets (docs/active-learning.md). A mask
    without an edge (the whole image) is judged by its mean confidence; an empty mask scores 0.
    """
    inside = np.asarray(mask, dtype=bool)
    if not inside.any():
        return 0.0
    confidence = np.asarray(probs, dtype=np.float64).max(axis=-1)
    edge = mask_edge(inside)
    mean = confidence[edge].mean() if edge.any() else confidence[inside].mean()
    chance = 1.0 / probs.shape[-1]
    return float(np.clip((mean - chance) / (1.0 - chance), 0.0, 1.0))


@dataclass(frozen=True)
class ObjectPrediction:
    """The object mask (foreground, plus the boundary when asked) at the image's size and its score."""

    classes: np.ndarray  # class ids 0/1/2
    mask: np.ndarray  # bool
    score: float  # :func:`edge_confidence`, at the model's resolution
    probabilities: np.ndarray  # (H, W, 3) class probabilities the rest is made of


def _object(classes: np.ndarray, include_boundary: bool) -> np.ndarray:
    return (classes == FOREGROUND) | (include_boundary & (classes == BOUNDARY))


def predict_object(model, image_rgb_uint8: np.ndarray, *, include_boundary: bool = True) -> ObjectPrediction:
    """Class ids, the object mask and its :func:`edge_confidence` score, at the image's original size.

    The score is computed on the model's own output grid: at the image's size, the edge would lie
    in the band that bilinear upsampling smears, whatever the model's certainty.
    """
    image = _as_rgb(image_rgb_uint8)
    height, width = image.shape[:2]
    small = probabilities(model, resize_for_model(image, model_image_size(model))[None])[0]
    probs = upsample(small, width, height)
    classes = probs.argmax(axis=-1).astype(np.uint8)
    mask = _object(classes, include_boundary)
    small_mask = _object(small.argmax(axis=-1), include_boundary)
    score = edge_confidence(small, small_mask) if small_mask.any() else edge_confidence(probs, mask)
    return ObjectPrediction(classes, mask, score, probs)


def predict_trimap(model, image_rgb_uint8: np.ndarray) -> np.ndarray:
    """Class ids (uint8, 0 foreground / 1 background / 2 boundary) at the image's original size."""
    return predict_trimaps(model, [image_rgb_uint8])[0]


def to_trimap_values(class_ids: np.ndarray) -> np.ndarray:
    """Oxford trimap values 1/2/3 from class ids 0/1/2."""
    return (np.asarray(class_ids, dtype=np.uint8) + 1).astype(np.uint8)


def overlay(image: np.ndarray, class_ids: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """The image with foreground and boundary tinted; background pixels unchanged."""
    rgb = _as_rgb(image).astype(np.float32)
    tint = CLASS_COLOURS[np.clip(class_ids, 0, NUM_CLASSES - 1)]
    weight = np.where(class_ids[..., None] == 1, 0.0, alpha)
    return np.clip(rgb * (1 - weight) + tint * weight, 0, 255).astype(np.uint8)


@dataclass
class FolderPrediction:
    written: list[Path]
    skipped: list[Problem]


def predict_folder(model, images_dir: str | Path, out_dir: str | Path, batch_size: int = 8) -> FolderPrediction:
    """Write ``OUT/trimaps/<stem>.png`` (values 1/2/3) and ``OUT/overlays/<stem>.png`` for each image.

    Unreadable images are skipped with a warning naming them.
    """
    source, out = Path(images_dir), Path(out_dir)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: not a folder")
    paths = sorted(
        p for p in source.iterdir() if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )
    (out / "trimaps").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    skipped: list[Problem] = []
    for start in range(0, len(paths), batch_size):
        batch: list[tuple[Path, np.ndarray]] = []
        for path in paths[start : start + batch_size]:
            try:
                batch.append((path, load_image(path)))
            except DECODE_ERRORS as exc:
                skipped.append(Problem(path, f"unreadable image ({exc})"))
                log.warning("skipped %s", skipped[-1])
        if not batch:
            continue
        for (path, image), class_ids in zip(batch, predict_trimaps(model, [image for _, image in batch], batch_size)):
            mask_path = out / "trimaps" / f"{path.stem}.png"
            Image.fromarray(to_trimap_values(class_ids)).save(mask_path)
            Image.fromarray(overlay(image, class_ids)).save(out / "overlays" / f"{path.stem}.png")
            written.append(mask_path)
    return FolderPrediction(written, skipped)
