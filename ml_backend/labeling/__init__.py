"""Label Studio's side of the conversation: labeling config, interactive context, mask results."""

from ml_backend.labeling.config import ControlTag, LabelConfig, parse_label_config
from ml_backend.labeling.context import ContextPrompts, PromptRegion, group_regions, parse_context, read_context
from ml_backend.labeling.results import build_mask_results, build_prediction, choose_brush_label

__all__ = [
    "ContextPrompts",
    "ControlTag",
    "LabelConfig",
    "PromptRegion",
    "build_mask_results",
    "build_prediction",
    "choose_brush_label",
    "group_regions",
    "parse_context",
    "parse_label_config",
    "read_context",
]
