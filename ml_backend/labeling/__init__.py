"""Label Studio's side of the conversation: labeling config, interactive context, mask results."""

from ml_backend.labeling.config import ControlTag, LabelConfig, parse_label_config
from ml_backend.labeling.context import PromptRegion, parse_context
from ml_backend.labeling.results import build_mask_results, build_prediction, choose_brush_label

__all__ = [
    "ControlTag",
    "LabelConfig",
    "PromptRegion",
    "build_mask_results",
    "build_prediction",
    "choose_brush_label",
    "parse_context",
    "parse_label_config",
]
