"""The SAM engine: load any SAM source, embed an image once, decode many prompts."""

from ml_backend.sam.engine import ImageEmbedding, SamEngine
from ml_backend.sam.loading import KNOWN_PRESETS, default_source, load_segmenter
from ml_backend.sam.prompts import NEGATIVE, POSITIVE, Prompts, SegmentationResult

__all__ = [
    "KNOWN_PRESETS",
    "NEGATIVE",
    "POSITIVE",
    "ImageEmbedding",
    "Prompts",
    "SamEngine",
    "SegmentationResult",
    "default_source",
    "load_segmenter",
]
