"""keras-hub's SAM 3 convolutions and group norms as single torch kernels, without Keras 3's per-call copies.

On the torch backend, Keras 3.15's ``Conv2D`` turns its channels-last input into a contiguous channels-first
copy, then back into channels-last memory (a second copy) before ``conv2d``, permutes the kernel, and adds the
bias as a separate pass; ``GroupNormalization`` is six element-wise passes over a reshaped tensor. An NHWC
tensor viewed as NCHW (``permute(0, 3, 1, 2)``) already *is* channels-last memory, which ``conv2d`` (bias
fused) and ``group_norm`` take as it is. In SAM 3 the pixel decoder runs once per phrase at a quarter of the
model's resolution, and those copies and passes took as long as the convolutions themselves
(``benchmarks/sam3.py``).

Hand-written because Keras offers no switch for it; :func:`use_fast_layers` replaces ``call`` on the given
model's own layers only (same signature, same result), so every other Keras model is untouched. Symbolic
calls (Keras's shape inference) still go through Keras's own code.
"""

from __future__ import annotations

import types


def _is_concrete(tensor) -> bool:
    import torch

    return isinstance(tensor, torch.Tensor) and tensor.device.type != "meta"


def _conv2d_call(layer, inputs):
    """``Conv2D.call`` for a channels-last layer with stride-1 or valid padding."""
    import torch.nn.functional as F
    from keras import ops

    if not _is_concrete(inputs):
        return type(layer).call(layer, inputs)
    bias = ops.convert_to_tensor(layer.bias) if layer.use_bias else None
    outputs = F.conv2d(inputs.permute(0, 3, 1, 2), ops.convert_to_tensor(layer.kernel).permute(3, 2, 0, 1), bias,
                       stride=tuple(layer.strides), padding=0 if layer.padding == "valid" else "same",
                       dilation=tuple(layer.dilation_rate), groups=layer.groups).permute(0, 2, 3, 1)
    return layer.activation(outputs) if layer.activation is not None else outputs


def _group_norm_call(layer, inputs):
    """``GroupNormalization.call`` over the last axis of a 4-D input; float32 statistics as Keras keeps them."""
    import torch.nn.functional as F
    from keras import ops

    if not _is_concrete(inputs) or inputs.ndim != 4:
        return type(layer).call(layer, inputs)
    gamma = ops.convert_to_tensor(layer.gamma).float() if layer.scale else None
    beta = ops.convert_to_tensor(layer.beta).float() if layer.center else None
    outputs = F.group_norm(inputs.permute(0, 3, 1, 2).float(), layer.groups, gamma, beta, layer.epsilon)
    return outputs.permute(0, 2, 3, 1).to(inputs.dtype)


def _replacement(layer):
    import keras

    if type(layer) is keras.layers.Conv2D and layer.data_format == "channels_last" and (
            layer.padding == "valid" or tuple(layer.strides) == (1, 1)):  # torch's "same" is Keras's at stride 1
        return _conv2d_call
    if type(layer) is keras.layers.GroupNormalization and layer.axis in (-1, 3):
        return _group_norm_call
    return None


def use_fast_layers(model) -> int:
    """Give each eligible ``Conv2D`` and ``GroupNormalization`` inside ``model`` its torch call; returns how many."""
    changed = 0
    for layer in model._flatten_layers(include_self=True, recursive=True):
        call = _replacement(layer)
        if call is not None:
            layer.call = types.MethodType(call, layer)
            changed += 1
    return changed
