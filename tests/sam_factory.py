"""A tiny random-weight SAM built from keras-hub's real classes (no download)."""

from __future__ import annotations

from pathlib import Path

import ml_backend  # noqa: F401  (selects the torch backend before keras is imported)

TINY_IMAGE_SIZE = 128


def build_tiny_segmenter(seed: int = 0):
    import keras
    import keras_hub

    keras.utils.set_random_seed(seed)
    image_encoder = keras_hub.models.ViTDetBackbone(
        hidden_size=32,
        num_layers=2,
        intermediate_dim=64,
        num_heads=2,
        global_attention_layer_indices=[1],
        patch_size=16,
        num_output_channels=32,
        window_size=4,
        image_shape=(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3),
    )
    prompt_encoder = keras_hub.layers.SAMPromptEncoder(
        hidden_size=32,
        image_embedding_size=(8, 8),
        input_image_size=(TINY_IMAGE_SIZE, TINY_IMAGE_SIZE),
        mask_in_channels=16,
    )
    mask_decoder = keras_hub.layers.SAMMaskDecoder(
        num_layers=2,
        hidden_size=32,
        intermediate_dim=64,
        num_heads=2,
        embedding_dim=32,
        num_multimask_outputs=3,
        iou_head_depth=3,
        iou_head_hidden_dim=32,
    )
    backbone = keras_hub.models.SAMBackbone(
        image_encoder=image_encoder, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder
    )
    return keras_hub.models.SAMImageSegmenter(backbone=backbone)


def save_tiny_preset(directory: Path, seed: int = 0) -> Path:
    build_tiny_segmenter(seed).save_to_preset(str(directory))
    return directory
