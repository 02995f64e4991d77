"""The model is the chapter's architecture, layer by layer, with logits instead of softmax."""

from __future__ import annotations

import numpy as np
import pytest

import training  # noqa: F401  (selects the torch backend before keras)
import keras
from training.model import build_model, model_image_size, rebuild_at_size

# (layer class, filters, strides, activation) in the chapter's order after Rescaling.
CHAPTER = [
    ("Conv2D", 64, 2, "relu"), ("Conv2D", 64, 1, "relu"),
    ("Conv2D", 128, 2, "relu"), ("Conv2D", 128, 1, "relu"),
    ("Conv2D", 256, 2, "relu"), ("Conv2D", 256, 1, "relu"),
    ("Conv2DTranspose", 256, 1, "relu"), ("Conv2DTranspose", 256, 2, "relu"),
    ("Conv2DTranspose", 128, 1, "relu"), ("Conv2DTranspose", 128, 2, "relu"),
    ("Conv2DTranspose", 64, 1, "relu"), ("Conv2DTranspose", 64, 2, "relu"),
    # The book's head is softmax; ours emits logits (softmax applied at prediction).
    ("Conv2D", 3, 1, "linear"),
]


def test_architecture_matches_the_chapter_layer_by_layer():
    model = build_model(200)
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    assert isinstance(layers[0], keras.layers.Rescaling)
    assert layers[0].scale == pytest.approx(1 / 255)
    convs = layers[1:]
    assert len(convs) == len(CHAPTER)
    for layer, (kind, filters, strides, activation) in zip(convs, CHAPTER):
        assert type(layer).__name__ == kind
        assert layer.filters == filters
        assert tuple(layer.kernel_size) == (3, 3)
        assert tuple(layer.strides) == (strides, strides)
        assert layer.padding == "same"
        assert layer.activation.__name__ == activation
    assert model.input_shape == (None, 200, 200, 3)
    assert model.output_shape == (None, 200, 200, 3)
    # The chapter's encoder ends on 25×25×256 feature maps at 200×200.
    assert model.get_layer(index=6).output.shape[1:] == (25, 25, 256)


@pytest.mark.parametrize("size", [0, 12, 100])
def test_image_size_must_be_a_multiple_of_8(size):
    with pytest.raises(ValueError, match="multiple of 8"):
        build_model(size)


def test_input_size_is_recoverable_from_a_saved_model(tmp_path):
    path = tmp_path / "m.keras"
    build_model(24).save(path)
    assert model_image_size(keras.saving.load_model(path, compile=False)) == 24


def test_rebuild_at_another_size_keeps_every_weight():
    model = build_model(16)
    bigger = rebuild_at_size(model, 32)
    assert model_image_size(bigger) == 32
    for before, after in zip(model.get_weights(), bigger.get_weights()):
        np.testing.assert_array_equal(before, after)
