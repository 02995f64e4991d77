"""The copy-free torch calls given to SAM 3's Conv2D and GroupNormalization compute what Keras's own calls do."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import torch

from ml_backend.sam3.fast_layers import use_fast_layers


def _pair(layer_factory, input_shape, seed: int):
    """The same built layer twice (same weights): Keras's call and the fast one."""
    keras.utils.set_random_seed(seed)
    slow, fast = layer_factory(), layer_factory()
    slow.build(input_shape)
    fast.build(input_shape)
    rng = np.random.default_rng(seed)
    for a, b in zip(slow.weights, fast.weights):
        value = rng.normal(size=a.shape).astype("float32")
        a.assign(value)
        b.assign(value)
    return slow, fast


@pytest.mark.parametrize("make, shape", [
    (lambda: keras.layers.Conv2D(16, 3), (2, 13, 11, 8)),
    (lambda: keras.layers.Conv2D(16, 3, padding="same", activation="relu"), (2, 13, 11, 8)),
    (lambda: keras.layers.Conv2D(16, 1, use_bias=False), (1, 9, 9, 8)),
    (lambda: keras.layers.Conv2D(16, 3, strides=2), (1, 12, 10, 8)),
    (lambda: keras.layers.Conv2D(16, 3, dilation_rate=2, padding="same"), (1, 12, 10, 8)),
    (lambda: keras.layers.Conv2D(16, 3, groups=4), (1, 10, 10, 8)),
    (lambda: keras.layers.GroupNormalization(4, epsilon=1e-5), (2, 7, 9, 16)),
    (lambda: keras.layers.GroupNormalization(8, center=False), (1, 5, 6, 16)),
])
def test_fast_calls_give_keras_results(make, shape) -> None:
    slow, fast = _pair(make, shape, seed=len(shape) + shape[1])
    model = keras.Sequential([fast])
    assert use_fast_layers(model) == 1
    inputs = np.random.default_rng(1).normal(size=shape).astype("float32")
    expected = keras.ops.convert_to_numpy(slow(inputs))
    got = keras.ops.convert_to_numpy(fast(inputs))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # A non-contiguous input (as a slice gives) is the same computation too.
    wide = np.random.default_rng(2).normal(size=shape[:-1] + (2 * shape[-1],)).astype("float32")
    view = torch.from_numpy(wide)[..., ::2]
    np.testing.assert_allclose(keras.ops.convert_to_numpy(fast(view)),
                               keras.ops.convert_to_numpy(slow(view.contiguous())), rtol=1e-5, atol=1e-5)


def test_layers_whose_semantics_differ_in_torch_keep_the_keras_call() -> None:
    strided_same = keras.layers.Conv2D(4, 3, strides=2, padding="same")  # Keras pads it asymmetrically
    first = keras.layers.Conv2D(4, 3, data_format="channels_first")
    model = keras.Sequential([keras.Input((8, 8, 4)), strided_same, keras.layers.Conv2DTranspose(4, 2),
                              keras.layers.Permute((3, 1, 2)), first, keras.layers.GroupNormalization(2, axis=1)])
    assert use_fast_layers(model) == 0
    assert "call" not in vars(strided_same)


def test_symbolic_calls_still_infer_shapes() -> None:
    conv = keras.layers.Conv2D(8, 3, padding="same")
    norm = keras.layers.GroupNormalization(4)
    model = keras.Sequential([keras.Input((10, 12, 3)), conv, norm])
    assert use_fast_layers(model) == 2
    assert conv.compute_output_spec(keras.KerasTensor((None, 10, 12, 3))).shape == (None, 10, 12, 8)
    output = keras.Model(model.inputs, norm(conv(model.inputs[0])))
    assert output.output_shape == (None, 10, 12, 8)
