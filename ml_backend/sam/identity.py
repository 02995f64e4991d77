"""Which SAM computed an embedding: a digest of everything that changes the image encoder's output.

Derived from the loaded encoder, not from where it was loaded: its class and config, its
input size, its variables' dtype and the bytes of every weight. The same weights loaded
from a preset name, a directory or a converted checkpoint get the same id; other weights,
another input size or another dtype get another one. Hashing the base encoder's 360 MB
takes ~0.3 s, once per process.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np

ID_LENGTH = 24


def model_identity(image_encoder) -> str:
    """A hex id for ``image_encoder`` (a Keras layer): equal ids mean interchangeable embeddings."""
    digest = hashlib.sha256()
    try:
        config = dict(image_encoder.get_config())
    except (NotImplementedError, TypeError):
        config = {}
    config.pop("name", None)  # Keras numbers layer names per process: "backbone_1" is the same model
    header = {
        "class": f"{type(image_encoder).__module__}.{type(image_encoder).__qualname__}",
        "config": config,
        "image_shape": list(getattr(image_encoder, "image_shape", []) or []),
        "dtype_policy": str(getattr(getattr(image_encoder, "dtype_policy", None), "name", "")),
    }
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    for index, variable in enumerate(image_encoder.weights):  # in build order; paths carry per-process numbering
        value = np.asarray(_to_numpy(variable))
        digest.update(f"{index}:{value.dtype}:{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).view(np.uint8).data)  # also bfloat16, which has no buffer format
    return digest.hexdigest()[:ID_LENGTH]


def _to_numpy(variable) -> np.ndarray:
    from keras import ops

    return ops.convert_to_numpy(variable.value)
