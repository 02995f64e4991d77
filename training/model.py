"""The chapter's from-scratch encoder-decoder for three-class trimap segmentation."""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras.layers import Average, Conv2D, Conv2DTranspose, Rescaling

NUM_CLASSES = 3
CLASS_NAMES = ("foreground", "background", "boundary")  # class id = trimap value - 1
FOREGROUND = 0
BOUNDARY = 2
DEFAULT_IMAGE_SIZE = 200
DEFAULT_WIDTH = 64  # the book's first layer's filters; the others have 2× and 4× as many
DOWNSAMPLING = 8  # three stride-2 convolutions: the input size must be a multiple of this
AVERAGE_NAME = "trimap_average"  # the name of an :func:`average_of` model
MEMBER_PREFIX = "member_"


def check_image_size(image_size: int) -> int:
    """Return ``image_size`` or raise ``ValueError`` if the model cannot take it."""
    if image_size < DOWNSAMPLING or image_size % DOWNSAMPLING:
        raise ValueError(f"image size must be a positive multiple of {DOWNSAMPLING} (got {image_size})")
    return image_size


def build_model(image_size: int = DEFAULT_IMAGE_SIZE, num_classes: int = NUM_CLASSES,
                width: int = DEFAULT_WIDTH) -> keras.Model:
    """The book's ``get_model`` layer for layer, except the head (see below).

    ``width`` scales every layer's filters (the book's is 64); benchmarks that must run in minutes
    on a CPU use a narrower model.

    The book ends with ``Conv2D(num_classes, 3, activation="softmax")`` and trains with
    ``sparse_categorical_crossentropy``; on the torch backend (keras >= 3.14) that crashes
    with "grad_input must be contiguous" (shared/NOTES.md). We therefore output linear
    logits, train with ``from_logits=True`` and apply softmax at prediction time
    (``training.predict``). The argmax, hence every IoU, is the same either way.
    """
    check_image_size(image_size)
    inputs = keras.Input(shape=(image_size, image_size, 3), name="image")
    x = Rescaling(1.0 / 255)(inputs)
    x = Conv2D(width, 3, strides=2, activation="relu", padding="same")(x)
    x = Conv2D(width, 3, activation="relu", padding="same")(x)
    x = Conv2D(2 * width, 3, strides=2, activation="relu", padding="same")(x)
    x = Conv2D(2 * width, 3, activation="relu", padding="same")(x)
    x = Conv2D(4 * width, 3, strides=2, activation="relu", padding="same")(x)
    x = Conv2D(4 * width, 3, activation="relu", padding="same")(x)

    x = Conv2DTranspose(4 * width, 3, activation="relu", padding="same")(x)
    x = Conv2DTranspose(4 * width, 3, strides=2, activation="relu", padding="same")(x)
    x = Conv2DTranspose(2 * width, 3, activation="relu", padding="same")(x)
    x = Conv2DTranspose(2 * width, 3, strides=2, activation="relu", padding="same")(x)
    x = Conv2DTranspose(width, 3, activation="relu", padding="same")(x)
    x = Conv2DTranspose(width, 3, strides=2, activation="relu", padding="same")(x)

    # Logits, not softmax: see the docstring.
    outputs = Conv2D(num_classes, 3, padding="same", name="logits")(x)
    return keras.Model(inputs, outputs, name="trimap_segmenter")


def average_of(models: Sequence[keras.Model]) -> keras.Model:
    """One model whose logits are the mean of ``models``' logits (same input size): an average of fits.

    The members keep their weights and are renamed ``member_0``, ``member_1``, ... (Keras needs unique
    names). It saves, loads and predicts like a single model; :func:`members` takes it apart again.
    """
    if len(models) < 2:
        raise ValueError("an average needs at least two models")
    size = model_image_size(models[0])
    for index, member in enumerate(models):
        member.name = f"{MEMBER_PREFIX}{index}"
    inputs = keras.Input(shape=(size, size, 3), name="image")
    outputs = Average(name="logits")([member(inputs) for member in models])
    return keras.Model(inputs, outputs, name=AVERAGE_NAME)


def members(model: keras.Model) -> list[keras.Model]:
    """The fits an :func:`average_of` model averages, in order; ``[model]`` for a single model."""
    if model.name != AVERAGE_NAME:
        return [model]
    return [layer for layer in model.layers if isinstance(layer, keras.Model)]


def rebuild_at_size(model: keras.Model, image_size: int) -> keras.Model:
    """The same weights in a model taking ``image_size`` inputs (all layers are size-independent)."""
    if model_image_size(model) == image_size:
        return model
    parts = members(model)
    if len(parts) > 1:
        return average_of([rebuild_at_size(part, image_size) for part in parts])
    resized = build_model(image_size, num_classes=int(model.output_shape[-1]), width=model_width(model))
    resized.set_weights(model.get_weights())
    return resized


def model_width(model: keras.Model) -> int:
    """The filters of the (first member's) first convolution: the ``width`` it was built with."""
    first = members(model)[0]
    return next(int(layer.filters) for layer in first.layers if isinstance(layer, Conv2D))


def model_image_size(model: keras.Model) -> int:
    """The square input size the model was built for, read from the model itself."""
    shape = model.input_shape
    height, width = shape[1], shape[2]
    if height is None or height != width:
        raise ValueError(f"expected a square fixed-size model input, got {shape}")
    return int(height)


def foreground_iou(name: str = "foreground_iou") -> keras.metrics.IoU:
    """The chapter's headline metric: IoU of class 0 (foreground).

    ``sparse_y_pred=False`` takes the argmax of the model output, which is the same for
    logits as for softmax probabilities.
    """
    return keras.metrics.IoU(
        num_classes=NUM_CLASSES,
        target_class_ids=(FOREGROUND,),
        name=name,
        sparse_y_true=True,
        sparse_y_pred=False,
    )


def compile_model(model: keras.Model, learning_rate: float = 1e-3) -> keras.Model:
    """Adam, cross-entropy on logits, foreground IoU (a fresh optimizer every time)."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[foreground_iou()],
    )
    return model
