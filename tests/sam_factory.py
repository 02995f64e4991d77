"""A tiny random-weight SAM built from keras-hub's real classes (no download)."""

from __future__ import annotations

from pathlib import Path

from official_sam import TINY

from ml_backend.sam.convert import build_segmenter

TINY_IMAGE_SIZE = TINY.image_size


def build_tiny_segmenter(seed: int = 0):
    """The converter's keras-hub builder on the tiny architecture, with Keras' seeded random init."""
    import keras

    keras.utils.set_random_seed(seed)
    return build_segmenter(TINY)


def save_tiny_preset(directory: Path, seed: int = 0) -> Path:
    build_tiny_segmenter(seed).save_to_preset(str(directory))
    return directory
