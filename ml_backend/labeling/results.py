"""Label Studio result items and predictions for our brush masks."""

from __future__ import annotations

import math
import uuid
from typing import Any

import numpy as np

from ml_backend.brush import encode_rle
from ml_backend.errors import LabelConfigError
from ml_backend.labeling.config import BRUSH_TAG, LabelConfig


def choose_brush_label(config: LabelConfig, prompt_label: str | None, override: str | None = None) -> str:
    """The brush label for a mask: ``override`` (the BRUSH_LABEL setting) when set, else the
    prompt's label when the brush tag has it, else the brush tag's first label.

    Names match exactly first, then case-insensitively; the brush tag's spelling is returned.
    """
    labels = config.brush.labels
    if override:
        found = _find(labels, override)
        if found is None:
            raise LabelConfigError(
                f"BRUSH_LABEL={override!r} is not a label of <BrushLabels name=\"{config.brush.name}\"> "
                f"(its labels: {list(labels)}); change the setting or add the label."
            )
        return found
    if prompt_label:
        found = _find(labels, prompt_label)
        if found is not None:
            return found
    return labels[0]


def _find(labels: tuple[str, ...], name: str) -> str | None:
    if name in labels:
        return name
    return next((label for label in labels if label.lower() == name.lower()), None)


def build_brush_result(
    mask: np.ndarray, *, config: LabelConfig, label: str, score: float, region_id: str | None = None
) -> dict[str, Any]:
    """A ``brushlabels`` result item for an (H, W) mask at the image's original size.

    ``region_id`` defaults to a fresh random id so that several masks in one prediction
    stay separate regions.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"A brush mask must be 2-D (height, width), got shape {mask.shape}.")
    if label not in config.brush.labels:
        raise LabelConfigError(f"{label!r} is not a label of <BrushLabels name=\"{config.brush.name}\">.")
    height, width = mask.shape
    return {
        "id": region_id or uuid.uuid4().hex[:10],
        "from_name": config.brush.name,
        "to_name": config.image_name,
        "type": BRUSH_TAG,
        "original_width": int(width),
        "original_height": int(height),
        "image_rotation": 0,
        "value": {"format": "rle", "rle": encode_rle(mask), "brushlabels": [label]},
        "score": _score(score),
        "readonly": False,
    }


def build_prediction(results: list[dict[str, Any]], score: float, model_version: str) -> dict[str, Any]:
    """One task's prediction: ``{result, score, model_version}``."""
    return {"result": list(results), "score": _score(score), "model_version": str(model_version)}


def _score(score: float) -> float:
    value = float(score)
    if not math.isfinite(value):
        raise ValueError(f"A prediction score must be a finite number, got {score!r}.")
    return value
