"""Interactive exemplars: a rectangle drawn under a configured label gives every similar instance (SAM 3).

A rectangle whose label is one of ``SAM3_EXEMPLAR_LABELS`` is not a SAM box: it goes to SAM 3 as a positive
exemplar box together with its label's phrase (the one concept pre-annotation reads, :mod:`.concepts`), and
the answer is one region per instance SAM 3 finds, under the mask label the rectangle's label maps to, by the
pre-annotation rules (``SAM3_SCORE_THRESHOLD``, ``SAM3_DEDUP_IOU``, ``SAM3_MAX_INSTANCES``).

Label Studio's editor sends, with each new rectangle, every rectangle of the same label on the image, so a
second box adds a second exemplar and the answer covers both. Each request is complete on its own; no prompt
state is kept. A request that mixes exemplar rectangles with other prompts, or exemplars of two labels, does
not come from the editor and is refused with a message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ml_backend import labeling
from ml_backend.errors import InvalidPromptError
from ml_backend.formats import PolygonOptions
from ml_backend.labeling import ContextPrompts, LabelConfig
from ml_backend.sam3 import concepts
from ml_backend.sam3.engine import ConceptCandidate
from ml_backend.sam3.preannotate import instances_prediction, sam3_model_version
from ml_backend.settings import Settings

Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class ExemplarPrompt:
    """Exemplar boxes of one label, in pixels of a ``size`` = (width, height) image."""

    label: str  # the rectangle's label
    boxes: tuple[Box, ...]
    size: tuple[int, int]

    def boxes_for(self, width: int, height: int) -> list[Box]:
        """The boxes in pixels of the image as loaded (Label Studio may have measured another size)."""
        sx, sy = width / self.size[0], height / self.size[1]
        return [(x1 * sx, y1 * sy, x2 * sx, y2 * sy) for x1, y1, x2, y2 in self.boxes]


class ExemplarSegmenter:
    """Recognises exemplar requests and answers them with SAM 3 (``segment`` runs the engine under the
    process's heavy-work gate and waits for SAM 3 to load)."""

    def __init__(self, settings: Settings,
                 segment: Callable[[np.ndarray, str, list[Box]], list[ConceptCandidate]]) -> None:
        self.settings = settings
        self._segment = segment

    def match(self, request: ContextPrompts) -> ExemplarPrompt | None:
        """The request's exemplar boxes, or None when it has none (then it is a SAM request)."""
        chosen = {name.lower() for name in self.settings.sam3_exemplar_labels}
        exemplars = [r for r in request.rectangles if r.label is not None and r.label.lower() in chosen]
        if not exemplars:
            return None
        labels = sorted({r.label.lower() for r in exemplars})
        if len(labels) > 1:
            raise InvalidPromptError(f"Exemplar rectangles of several labels ({', '.join(labels)}) in one request: "
                                     "send one label's rectangles at a time, as the editor does.")
        if len(exemplars) != len(request.rectangles) or request.points:
            raise InvalidPromptError(f"Rectangles labelled {exemplars[0].label!r} are SAM 3 exemplars "
                                     f"(SAM3_EXEMPLAR_LABELS) and cannot be combined with keypoints or other "
                                     "rectangles in one request.")
        return ExemplarPrompt(exemplars[0].label, tuple(r.box for r in exemplars), request.size)

    def phrase(self, label_config: str, config: LabelConfig, mask_label: str) -> str:
        s = self.settings
        prompt = concepts.concept_prompts(label_config, (mask_label,), config.mask.name,
                                          phrases=dict(s.sam3_phrases), skip=())
        return prompt[0].phrase

    def predict(self, image: np.ndarray, prompt: ExemplarPrompt, label_config: str, config: LabelConfig) -> dict:
        """One region per instance like the boxed ones, best first."""
        s = self.settings
        mask_label = labeling.choose_brush_label(config, prompt.label, s.brush_label or None)
        height, width = image.shape[:2]
        found = self._segment(image, self.phrase(label_config, config, mask_label), prompt.boxes_for(width, height))
        kept = concepts.select_instances([(mask_label, found)], iou_threshold=s.sam3_dedup_iou,
                                         max_instances=s.sam3_max_instances, min_area=s.min_mask_area)
        return instances_prediction(kept, config, PolygonOptions.from_settings(s), sam3_model_version(s.sam3_model))
