"""Typed phrases: the annotator types "yellow school bus" and gets every instance SAM 3 finds (its own demo).

The labeling config holds a ``<TextArea>`` on the image; with Auto-Annotation on, Label Studio's editor (1.23.2)
sends what was typed as the interactive context's only item::

    {"value": {"text": ["yellow school bus"]}, "id": "...", "from_name": "<the TextArea's name>",
     "to_name": "image", "type": "textarea", "origin": "manual"}

The answer is one region per instance, by the pre-annotation rules (``SAM3_SCORE_THRESHOLD``,
``SAM3_DEDUP_IOU``, ``SAM3_MAX_INSTANCES``, ``MIN_MASK_AREA``: :mod:`.concepts`), under the mask label the phrase
names: a label spelled like the phrase, or whose SAM 3 phrase (``SAM3_PHRASES``, ``hint``) it is, compared
case-insensitively; else ``SAM3_TEXT_DEFAULT_LABEL``. SAM 3 reads the phrase as typed. A phrase that is empty,
longer than :data:`~.concepts.MAX_PHRASE_CHARS` or holds control characters is refused with a message.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from ml_backend.errors import InvalidPromptError, LabelConfigError
from ml_backend.formats import PolygonOptions
from ml_backend.labeling import LabelConfig
from ml_backend.sam3 import concepts
from ml_backend.sam3.engine import ConceptCandidate
from ml_backend.sam3.preannotate import instances_prediction, sam3_model_version
from ml_backend.settings import Settings

TEXTAREA = "textarea"


def typed_phrase(context: Mapping[str, Any]) -> str | None:
    """The phrase of an interactive context whose items are TextArea results, or None when it has none.

    The editor keeps each TextArea's submissions in one result (``value.text``, oldest first): the last one is
    what was just typed. Raises :class:`InvalidPromptError` for a phrase the annotator must change."""
    items = context.get("result")
    if not isinstance(items, list):
        return None
    typed = [item for item in items if isinstance(item, Mapping) and item.get("type") == TEXTAREA]
    if not typed:
        return None
    if len(typed) != len(items):
        raise InvalidPromptError("A typed phrase cannot be combined with keypoints or rectangles in one request: "
                                 "send the phrase alone, as the editor does.")
    value = typed[-1].get("value")
    texts = value.get("text") if isinstance(value, Mapping) else None
    if not isinstance(texts, list) or not texts or not isinstance(texts[-1], str):
        raise InvalidPromptError("The typed phrase must arrive as value.text, a list of strings (Label Studio's "
                                 "TextArea result).")
    return check_phrase(texts[-1])


def check_phrase(text: str) -> str:
    """The phrase without surrounding spaces; refused when empty, too long or holding control characters.

    The bound is :data:`~.concepts.MAX_PHRASE_CHARS` (200), the one concept pre-annotation cuts label phrases
    to: SAM 3's text encoder reads 32 tokens (about 20 words), so a longer text is a paste, not a phrase."""
    phrase = text.strip()
    if not phrase:
        raise InvalidPromptError("The typed phrase is empty: type what to find, e.g. \"yellow school bus\".")
    if len(phrase) > concepts.MAX_PHRASE_CHARS:
        raise InvalidPromptError(f"The typed phrase has {len(phrase)} characters; SAM 3 reads a short noun "
                                 f"phrase (at most {concepts.MAX_PHRASE_CHARS} characters): shorten it.")
    if any(unicodedata.category(char)[0] == "C" for char in phrase):
        raise InvalidPromptError("The typed phrase holds control or invisible characters (a line break, a tab, "
                                 "a pasted formatting mark): retype it on one line.")
    return phrase


class PhraseSegmenter:
    """Answers typed phrases with SAM 3 (``segment`` runs the engine under the process's encode gate, as an
    interactive request, and waits for SAM 3 to load)."""

    def __init__(self, settings: Settings, segment: Callable[[np.ndarray, str], list[ConceptCandidate]]) -> None:
        self.settings = settings
        self._segment = segment

    def mask_label(self, phrase: str, label_config: str, config: LabelConfig) -> str:
        """The mask tag's label named like ``phrase`` (its value or its SAM 3 phrase), else the default one."""
        s = self.settings
        wanted = phrase.lower()
        for prompt in concepts.concept_prompts(label_config, config.mask.labels, config.mask.name,
                                               phrases=dict(s.sam3_phrases), skip=()):
            if wanted in (prompt.label.lower(), prompt.phrase.lower()):
                return prompt.label
        default = s.sam3_text_default_label
        if not default:
            raise InvalidPromptError(
                f"No label of the mask tag \"{config.mask.name}\" is named {phrase!r} (its labels: "
                f"{list(config.mask.labels)}): type one of them, or ask the administrator to set "
                "SAM3_TEXT_DEFAULT_LABEL to the label other phrases go under.")
        found = next((label for label in config.mask.labels if label.lower() == default.lower()), None)
        if found is None:
            raise LabelConfigError(f"SAM3_TEXT_DEFAULT_LABEL={default!r} is not a label of the mask tag "
                                   f"\"{config.mask.name}\" (its labels: {list(config.mask.labels)}); change the "
                                   "setting or add the label.")
        return found

    def predict(self, image: np.ndarray, phrase: str, label_config: str, config: LabelConfig) -> dict:
        """One region per instance of ``phrase``, best first."""
        s = self.settings
        label = self.mask_label(phrase, label_config, config)
        kept = concepts.select_instances([(label, self._segment(image, phrase))], iou_threshold=s.sam3_dedup_iou,
                                         max_instances=s.sam3_max_instances, min_area=s.min_mask_area)
        return instances_prediction(kept, config, PolygonOptions.from_settings(s), sam3_model_version(s.sam3_model))
