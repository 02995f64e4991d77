"""Our torch RoIAlign (keras-hub's SAM 3 box pooling on torch) equals torchvision's kernel and keras-hub's keras-ops path."""

from __future__ import annotations

import types

import keras
import numpy as np
import pytest
import torch

from ml_backend.sam3.roi_align import install, keras_hub_roi_align, roi_align_nhwc
from sam3_reference_roi_align import roi_align as reference_roi_align


def _random_rois(rng: np.random.Generator, count: int, height: int, width: int, batches: int, *, inside: bool):
    rows = []
    for _ in range(count):
        if inside:
            x1, x2 = np.sort(rng.uniform(0, width, 2))
            y1, y2 = np.sort(rng.uniform(0, height, 2))
        else:  # partly or wholly outside the map, and degenerate ones
            x1, x2 = np.sort(rng.uniform(-3, width + 3, 2))
            y1, y2 = np.sort(rng.uniform(-3, height + 3, 2))
        rows.append([rng.integers(batches), x1, y1, x2, y2])
    rows.append([0, 2.0, 2.0, 2.3, 2.1])  # smaller than one feature pixel
    rows.append([batches - 1, 0.0, 0.0, float(width), float(height)])  # the whole map
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize("inside", [True, False])
@pytest.mark.parametrize("output_size", [(7, 7), (3, 5)])
def test_matches_torchvision_kernel(inside: bool, output_size) -> None:
    rng = np.random.default_rng(7 if inside else 8)
    feats = torch.from_numpy(rng.standard_normal((2, 9, 13, 4)).astype(np.float32))  # NHWC, not square
    rois = _random_rois(rng, 12, 9, 13, 2, inside=inside)
    ours = roi_align_nhwc(feats, rois, output_size)
    ref = reference_roi_align(feats.permute(0, 3, 1, 2), rois, output_size).permute(0, 2, 3, 1)
    assert ours.shape == ref.shape == (rois.shape[0], *output_size, 4)
    assert float(ref.abs().max()) > 0.1  # the comparison is not between zeros
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


def test_matches_keras_hub_keras_ops_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """keras-hub's own non-torch implementation, forced on torch, agrees with ours for boxes inside the map."""
    from keras_hub.src.models.sam3 import roi_align as keras_hub_module

    monkeypatch.setattr(keras_hub_module, "backend",
                        types.SimpleNamespace(backend=lambda: "jax",
                                              standardize_dtype=keras.backend.standardize_dtype))
    rng = np.random.default_rng(3)
    feats = torch.from_numpy(rng.standard_normal((2, 8, 10, 3)).astype(np.float32))
    rois = _random_rois(rng, 6, 8, 10, 2, inside=True)
    theirs = keras_hub_module.roi_align(feats, rois, (7, 7), height=8, width=10, hidden_dim=3)
    ours = keras_hub_roi_align(feats, rois, (7, 7), height=8, width=10, hidden_dim=3)
    torch.testing.assert_close(ours, torch.as_tensor(theirs), rtol=1e-5, atol=1e-5)


def test_no_rois_and_half_precision() -> None:
    feats = torch.randn(1, 6, 6, 2)
    assert roi_align_nhwc(feats, torch.zeros((0, 5)), (7, 7)).shape == (0, 7, 7, 2)
    rois = torch.tensor([[0, 0.5, 1.0, 4.0, 5.5]])
    half = roi_align_nhwc(feats.to(torch.bfloat16), rois, (7, 7))
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), roi_align_nhwc(feats, rois, (7, 7)), rtol=2e-2, atol=2e-2)


def test_install_replaces_the_geometry_encoders_call() -> None:
    from keras_hub.src.models.sam3 import sam3_geometry_encoder

    install()
    install()
    assert sam3_geometry_encoder.roi_align is keras_hub_roi_align
    with pytest.raises(NotImplementedError):
        keras_hub_roi_align(torch.zeros(1, 2, 2, 1), torch.zeros(1, 5), (7, 7), 2, 2, 1, aligned=True)
