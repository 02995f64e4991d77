"""Label Studio result items and predictions for our masks, in the form the labeling config asks for.

The config's mask tag (:attr:`LabelConfig.mask`) decides: ``BrushLabels`` gets one brush RLE
region, ``BitmaskLabels`` one PNG region, ``PolygonLabels`` one polygon region per connected
component (none for an empty mask). See :mod:`ml_backend.formats` for the encodings.
"""

from __future__ import annotations

import math
import uuid
from typing import Any

import numpy as np

from ml_backend.errors import LabelConfigError
from ml_backend.formats import PolygonOptions, mask_values
from ml_backend.labeling.config import LabelConfig


def choose_brush_label(config: LabelConfig, prompt_label: str | None, override: str | None = None) -> str:
    """The label for a mask: ``override`` (the BRUSH_LABEL setting) when set, else the prompt's
    label when the mask tag has it, else the mask tag's first label.

    Names match exactly first, then case-insensitively; the mask tag's spelling is returned.
    """
    labels = config.mask.labels
    if override:
        found = _find(labels, override)
        if found is None:
            raise LabelConfigError(
                f"BRUSH_LABEL={override!r} is not a label of the mask tag \"{config.mask.name}\" "
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


def build_mask_results(
    mask: np.ndarray, *, config: LabelConfig, label: str, score: float,
    polygon: PolygonOptions = PolygonOptions(), arrays: bool = False,
) -> list[dict[str, Any]]:
    """The result items holding an (H, W) mask at the image's original size, as the config's mask tag stores it.

    Each item gets a fresh random id, so that several masks in one prediction stay separate regions.
    ``polygon`` says how masks become polygons (used only for a ``PolygonLabels`` tag). ``arrays``: a
    brush RLE and polygon points as numpy arrays, for the /predict answer only (see
    :func:`ml_backend.formats.mask_values`).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"A mask must be 2-D (height, width), got shape {mask.shape}.")
    tag = config.mask
    if label not in tag.labels:
        raise LabelConfigError(f"{label!r} is not a label of the mask tag \"{tag.name}\" (its labels: "
                               f"{list(tag.labels)}).")
    value_score = _score(score)
    height, width = mask.shape
    return [
        {
            "id": uuid.uuid4().hex[:10],
            "from_name": tag.name,
            "to_name": config.image_name,
            "type": tag.result_type,
            "original_width": int(width),
            "original_height": int(height),
            "image_rotation": 0,
            "value": {**value, tag.result_type: [label]},
            "score": value_score,
            "readonly": False,
        }
        for value in mask_values(mask, tag.result_type, polygon, arrays=arrays)
    ]


def build_prediction(results: list[dict[str, Any]], score: float, model_version: str) -> dict[str, Any]:
    """One task's prediction: ``{result, score, model_version}``."""
    return {"result": list(results), "score": _score(score), "model_version": str(model_version)}


def _score(score: float) -> float:
    value = float(score)
    if not math.isfinite(value):
        raise ValueError(f"A prediction score must be a finite number, got {score!r}.")
    return value
