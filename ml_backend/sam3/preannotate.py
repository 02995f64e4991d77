"""One image to one Label Studio prediction with SAM 3 concepts (and, with ``PREANNOTATE=both``, the trimap model).

The rules are in :mod:`ml_backend.sam3.concepts`; this joins them to the engine and the result builder.

The prediction's score (what Label Studio's "Prediction score" column shows): with SAM 3 alone, the mean score
of the kept instances (0 with none); with ``both``, the geometric mean of that and the trimap mask's score (its
edge confidence) when SAM 3's instances are kept, the trimap's score when its mask is the prediction, and SAM 3's
alone before any trimap version serves the project.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ml_backend import labeling
from ml_backend.formats import PolygonOptions
from ml_backend.labeling.config import LabelConfig
from ml_backend.sam3 import concepts
from ml_backend.sam3.engine import WorkSlot
from ml_backend.settings import Settings


def sam3_model_version(source: str, trimap_version: str | None = None, *, with_trimap: bool = False) -> str:
    """``sam3-<preset or directory name>``, plus ``+trimap-<version>`` when the trimap model filters."""
    name = f"sam3-{Path(source).name or source}"
    return f"{name}+trimap-{trimap_version or 'none'}" if with_trimap else name


class ConceptPreannotator:
    def __init__(self, settings: Settings, engine: Callable[[], object], slot: WorkSlot | None = None) -> None:
        self.settings = settings
        self._engine = engine  # waits for SAM 3 to load
        self._slot = slot  # where each piece of SAM 3 work runs (the encode gate, for project jobs)

    @property
    def with_trimap(self) -> bool:
        return self.settings.preannotate == "both"

    def model_version(self, trimap_version: str | None) -> str:
        return sam3_model_version(self.settings.sam3_model, trimap_version, with_trimap=self.with_trimap)

    def prompts(self, label_config: str, config: LabelConfig) -> list[concepts.ConceptPrompt]:
        s = self.settings
        return concepts.concept_prompts(label_config, config.mask.labels, config.mask.name,
                                        phrases=dict(s.sam3_phrases), skip=s.background_labels + s.boundary_labels)

    def predict(self, image: np.ndarray, label_config: str, config: LabelConfig,
                trimap: tuple[str, np.ndarray, float] | None, trimap_label: str | None = None) -> dict:
        """The prediction for one image; ``trimap`` is (version, foreground, score) when the trimap model ran,
        and ``trimap_label`` the label its mask goes under when it is the prediction."""
        s = self.settings
        prompts = self.prompts(label_config, config)
        version = self.model_version(trimap[0] if trimap else None)
        if not prompts:
            return labeling.build_prediction([], 0.0, version)
        found = self._engine().segment(image, [p.phrase for p in prompts], threshold=s.sam3_score_threshold,
                                       slot=self._slot)
        kept = concepts.select_instances([(p.label, f) for p, f in zip(prompts, found)],
                                         iou_threshold=s.sam3_dedup_iou, max_instances=s.sam3_max_instances,
                                         min_area=s.min_mask_area)
        polygon = PolygonOptions.from_settings(s)
        if self.with_trimap and trimap is not None:
            kept = concepts.filter_by_trimap(kept, trimap[1], s.sam3_trimap_min_overlap)
            if not kept and trimap[1].any():
                label = labeling.choose_brush_label(config, trimap_label, s.brush_label or None)
                results = labeling.build_mask_results(trimap[1], config=config, label=label, score=trimap[2],
                                                      polygon=polygon)
                return labeling.build_prediction(results, trimap[2], version)
            prediction = instances_prediction(kept, config, polygon, version)
            prediction["score"] = float(np.sqrt(prediction["score"] * trimap[2]))  # both must be right
            return prediction
        return instances_prediction(kept, config, polygon, version)


def instances_prediction(kept: list[concepts.LabelledInstance], config: LabelConfig, polygon: PolygonOptions,
                         model_version: str) -> dict:
    """One region per kept instance in the mask tag's form, with its label and score; the prediction's score
    is their mean (0 with none)."""
    results = [result for item in kept
               for result in labeling.build_mask_results(item.instance.mask, config=config, label=item.label,
                                                         score=item.instance.score, polygon=polygon)]
    score = float(np.mean([item.instance.score for item in kept])) if kept else 0.0
    return labeling.build_prediction(results, score, model_version)
