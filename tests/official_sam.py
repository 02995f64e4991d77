"""Tiny official SAM checkpoints with seeded random weights (no download).

The tiny architecture keeps every feature of the official ones: windowed blocks whose
grid (8) is not a multiple of the window (3), so window padding runs, two global
blocks, relative position tables, 2 heads of 16 (not the 64 of the official models,
so head inference is exercised), and the official decoder layout at a small width.
"""

from __future__ import annotations

from pathlib import Path

import ml_backend  # noqa: F401  (selects the torch backend before keras is imported)
from ml_backend.sam.convert import DECODER_NUM_HEADS, SamArchitecture
from benchmarks.official_sam import random_official_sam, save_official_checkpoint

TINY = SamArchitecture(
    image_size=128,
    patch_size=16,
    encoder_dim=32,
    encoder_depth=4,
    encoder_num_heads=2,
    encoder_mlp_dim=128,
    encoder_qkv_bias=True,
    window_size=3,
    global_attention_indices=(1, 3),
    prompt_dim=32,
    mask_in_channels=16,
    decoder_depth=2,
    decoder_num_heads=DECODER_NUM_HEADS,
    decoder_mlp_dim=64,
    num_multimask_outputs=3,
    iou_head_depth=3,
    iou_head_hidden_dim=32,
)


def tiny_official_sam(seed: int = 0):
    return random_official_sam(TINY, seed)


def tiny_checkpoint(directory: Path, seed: int = 0) -> Path:
    """Write ``sam_tiny_<seed>.pth`` (a state dict, like the official files) and return its path."""
    return save_official_checkpoint(tiny_official_sam(seed), Path(directory) / f"sam_tiny_{seed}.pth")
