"""The two places where keras-hub 0.32's SAM 3 must be corrected to run like the reference on torch.

Both are one module attribute each, set by :func:`install` before a model is called (idempotent):

* **Box pooling.** keras-hub's geometry encoder calls ``torchvision.ops.roi_align`` on the torch backend and
  torchvision does not import beside our torch; :mod:`ml_backend.sam3.roi_align` holds a torch version of
  the same kernel.
* **Text attention mask.** SAM 3's text tower (Meta's ``VETextEncoder``, and ``transformers``'
  ``CLIPTextModel`` used by ``Sam3Model``) is causal: token *i* sees tokens ``0..i``. keras-hub's
  ``SAM3TextEncoder`` builds a bidirectional padding mask instead, so every token also sees the ones after it
  and the text features (hence every score) differ from the reference's. :func:`causal_padding_mask` gives it
  the causal mask, restricted to real tokens as transformers does.

A third difference is in the numbers, not the code: transformers' (and Meta's) geometry encoder, DETR
encoder and decoder, mask decoder and scoring head use ``nn.LayerNorm``'s default epsilon (1e-5) whatever
the checkpoint's ``layer_norm_eps`` says (1e-6), while keras-hub's converter passes ``layer_norm_eps`` to
them. :func:`match_reference_epsilons` sets those layer norms back to 1e-5 after loading (the vision and text
towers do read ``layer_norm_eps`` in transformers and are left alone).

``tests/test_sam3_parity.py`` fails without any one of these corrections and passes with all three.
"""

from __future__ import annotations

from keras import ops

from ml_backend.sam3.roi_align import keras_hub_roi_align


def causal_padding_mask(input_embeds, attention_mask):
    """(B, 1, S, S) boolean mask: query i may attend key j when j <= i and j is a real token."""
    seq_len = ops.shape(input_embeds)[1]
    causal = ops.tril(ops.ones((seq_len, seq_len), dtype="bool"))
    keys = ops.cast(attention_mask, "bool")[:, None, None, :]
    return ops.logical_and(causal[None, None, :, :], keys)


REFERENCE_LAYER_NORM_EPSILON = 1e-5
_DEFAULT_EPSILON_PARTS = ("geometry_encoder", "detr_encoder", "detr_decoder", "mask_decoder", "dot_product_scoring")


def match_reference_epsilons(backbone) -> int:
    """Give the layer norms the reference builds with ``nn.LayerNorm``'s default their 1e-5; returns how many."""
    import keras

    changed = 0
    for part in _DEFAULT_EPSILON_PARTS:
        for layer in getattr(backbone, part)._flatten_layers(include_self=True, recursive=True):
            if isinstance(layer, keras.layers.LayerNormalization):
                layer.epsilon = REFERENCE_LAYER_NORM_EPSILON
                changed += 1
    return changed


def install() -> None:
    """Point keras-hub's SAM 3 at the corrected box pooling and text mask."""
    from keras_hub.src.models.sam3 import sam3_geometry_encoder, sam3_text_encoder

    sam3_geometry_encoder.roi_align = keras_hub_roi_align
    sam3_text_encoder.create_bidirectional_mask = causal_padding_mask
