"""Evaluation at the images' original size: foreground IoU, per-class IoU, pixel accuracy.

Predictions are resized back to each trimap's size before comparing, so models with different
input sizes are compared on exactly the same pixels. Counting is a confusion matrix by
``np.bincount``: ``keras.metrics.IoU.update_state`` took 2.5 s per 500×375 image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import keras
import numpy as np

from training.data import DECODE_ERRORS, Pair, Problem, load_image, load_trimap
from training.errors import DatasetError
from training.model import CLASS_NAMES, FOREGROUND, NUM_CLASSES, model_image_size
from training.pipeline import SkipLog
from training.predict import probabilities, upsample


@dataclass
class EvalReport:
    """Metrics at the images' original size. ``per_class_iou`` is keyed by class name."""

    foreground_iou: float
    per_class_iou: dict[str, float]
    pixel_accuracy: float
    images: int
    version: str | None = None
    skipped: list[str] = field(default_factory=list)
    # Foreground IoU of the trivial predictions on the same pixels: all background scores 0.
    all_foreground_iou: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _confusion_metrics(confusion: np.ndarray) -> tuple[dict[str, float], float]:
    """Per-class IoU (NaN-free: a class absent from both truth and prediction scores 0) and accuracy."""
    true_positive = np.diag(confusion).astype(np.float64)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - true_positive
    iou = np.divide(true_positive, union, out=np.zeros_like(true_positive), where=union > 0)
    accuracy = float(true_positive.sum() / max(1, confusion.sum()))
    return {name: float(iou[i]) for i, name in enumerate(CLASS_NAMES)}, accuracy


def confusion_matrix(
    model: keras.Model, pairs: Sequence[Pair], *, batch_size: int = 16, skipped: SkipLog | None = None,
    verbose: int = 0,
) -> tuple[np.ndarray, int]:
    """(NUM_CLASSES × NUM_CLASSES counts, truth by row, of every pixel at its image's original size;
    images counted). Unreadable files are recorded in ``skipped`` and left out."""
    skipped = skipped if skipped is not None else SkipLog()
    size = model_image_size(model)
    confusion = np.zeros(NUM_CLASSES * NUM_CLASSES, dtype=np.int64)
    progress = keras.utils.Progbar(len(pairs), unit_name="image") if verbose else None
    counted = 0
    for start in range(0, len(pairs), batch_size):
        inputs, truths = [], []
        for pair in pairs[start : start + batch_size]:
            if pair.stem in skipped:
                continue
            try:
                image = load_image(pair.image, size)
            except DECODE_ERRORS as exc:
                skipped.add(pair.stem, Problem(pair.image, f"unreadable image ({exc})"))
                continue
            try:
                truth = load_trimap(pair.trimap)
            except DECODE_ERRORS as exc:
                skipped.add(pair.stem, Problem(pair.trimap, f"unusable trimap ({exc})"))
                continue
            inputs.append(image)
            truths.append(truth)
        if inputs:
            for prob, truth in zip(probabilities(model, np.stack(inputs)), truths):
                predicted = upsample(prob, truth.shape[1], truth.shape[0]).argmax(axis=-1)
                confusion += np.bincount(truth.ravel().astype(np.int64) * NUM_CLASSES + predicted.ravel(),
                                         minlength=NUM_CLASSES * NUM_CLASSES)
            counted += len(inputs)
        if progress is not None:
            progress.update(min(len(pairs), start + batch_size))
    return confusion.reshape(NUM_CLASSES, NUM_CLASSES), counted


def report(matrix: np.ndarray, images: int, skipped: SkipLog | None = None) -> EvalReport:
    """The metrics of a confusion matrix (of one evaluation, or summed over several)."""
    if images == 0:
        raise DatasetError("no validation image could be evaluated; see the warnings above")
    per_class, accuracy = _confusion_metrics(matrix)
    return EvalReport(
        all_foreground_iou=float(matrix[FOREGROUND].sum() / max(1, matrix.sum())),
        foreground_iou=per_class[CLASS_NAMES[FOREGROUND]],
        per_class_iou=per_class,
        pixel_accuracy=accuracy,
        images=images,
        skipped=[str(p) for p in skipped.problems] if skipped is not None else [],
    )


def evaluate_model(
    model: keras.Model, pairs: Sequence[Pair], *, batch_size: int = 16, skipped: SkipLog | None = None,
    verbose: int = 0,
) -> EvalReport:
    """Foreground IoU, per-class IoU and pixel accuracy of ``model`` on ``pairs``."""
    skipped = skipped if skipped is not None else SkipLog()
    matrix, counted = confusion_matrix(model, pairs, batch_size=batch_size, skipped=skipped, verbose=verbose)
    return report(matrix, counted, skipped)
