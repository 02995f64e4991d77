"""Concept pre-annotation rules: which phrase each label becomes, which instances become regions.

* **Prompts.** Every label of the labeling config's mask tag is a prompt, except those retraining maps to
  background or boundary (``BACKGROUND_LABELS``/``BOUNDARY_LABELS``: "Background" is no concept). The phrase
  is, first found: ``SAM3_PHRASES`` (``"Cat=tabby cat;Car=car"``), the ``<Label hint="...">``
  attribute, else the label's value itself.
* **Regions.** Each instance scoring above ``SAM3_SCORE_THRESHOLD`` and covering at least ``MIN_MASK_AREA``
  pixels becomes one region with its label and score, best first, at most ``SAM3_MAX_INSTANCES`` per image. Two masks (of any labels) overlapping with an
  IoU above ``SAM3_DEDUP_IOU`` are one object found twice: the higher score keeps it.
* **With the trimap model** (``PREANNOTATE=both``): the trimap model is fine-tuned on this project's accepted
  annotations, SAM 3 is not. An instance is kept only when at least ``SAM3_TRIMAP_MIN_OVERLAP`` of its area
  lies in the trimap foreground; before any trimap version is promoted, SAM 3 alone decides. When SAM 3
  keeps nothing, the trimap mask is the prediction (as with ``PREANNOTATE=trimap``).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass

import numpy as np

from ml_backend.errors import LabelConfigError
from ml_backend.sam3.engine import ConceptCandidate, ConceptInstance

MAX_PHRASE_CHARS = 200


@dataclass(frozen=True)
class ConceptPrompt:
    label: str  # the mask tag's label the regions go under
    phrase: str  # what SAM 3 reads


@dataclass(frozen=True)
class LabelledInstance:
    label: str
    instance: ConceptInstance


def _lower_attrs(element: ET.Element) -> dict[str, str]:
    return {key.lower(): value for key, value in element.attrib.items()}


def _label_hints(label_config: str, tag_name: str) -> dict[str, str]:
    """``hint`` attributes of the named control tag's ``<Label>`` children."""
    try:
        root = ET.fromstring(label_config)
    except ET.ParseError as exc:
        raise LabelConfigError(f"The labeling config is not valid XML ({exc}).") from exc
    tag = next((e for e in root.iter() if _lower_attrs(e).get("name", "").strip() == tag_name), None)
    hints = {}
    for child in tag.iter() if tag is not None else ():
        attrs = _lower_attrs(child)
        if isinstance(child.tag, str) and child.tag.lower() == "label" and attrs.get("hint", "").strip():
            hints[attrs.get("value", "")] = attrs["hint"].strip()
    return hints


def concept_prompts(label_config: str, labels: tuple[str, ...], tag_name: str, *, phrases: dict[str, str],
                    skip: tuple[str, ...]) -> list[ConceptPrompt]:
    """One prompt per label of the mask tag, in the config's order; ``skip`` holds lower-case label names."""
    hints = _label_hints(label_config, tag_name)
    prompts = []
    for label in labels:
        if label.lower() in skip:
            continue
        phrase = phrases.get(label.lower()) or hints.get(label) or label
        prompts.append(ConceptPrompt(label, phrase[:MAX_PHRASE_CHARS]))
    return prompts


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 0.0


def select_instances(found: list[tuple[str, list[ConceptCandidate | ConceptInstance]]], *, iou_threshold: float,
                     max_instances: int, min_area: int = 1) -> list[LabelledInstance]:
    """Best first; a mask of fewer than ``min_area`` pixels (``MIN_MASK_AREA``, as for every prediction) is
    dropped as if not found; a mask overlapping a kept one above ``iou_threshold`` is dropped.
    Masks are made one at a time and only until ``max_instances`` are kept: memory holds the kept ones."""
    candidates = sorted(((label, candidate) for label, instances in found for candidate in instances),
                        key=lambda item: -item[1].score)
    kept: list[LabelledInstance] = []
    for label, candidate in candidates:
        if len(kept) >= max_instances:
            break
        instance = candidate.materialize()
        if np.count_nonzero(instance.mask) >= max(min_area, 1) and all(mask_iou(instance.mask, other.instance.mask) <= iou_threshold
                                       for other in kept):
            kept.append(LabelledInstance(label, instance))
    return kept


def filter_by_trimap(kept: list[LabelledInstance], foreground: np.ndarray, min_overlap: float) -> list[LabelledInstance]:
    """Instances with at least ``min_overlap`` of their area inside the trimap model's foreground."""
    return [item for item in kept
            if np.count_nonzero(item.instance.mask & foreground) >= min_overlap * np.count_nonzero(item.instance.mask)]
