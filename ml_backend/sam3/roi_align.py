"""RoIAlign in plain torch for keras-hub's SAM 3 box prompts on the torch backend.

keras-hub's ``sam3/roi_align.py`` sends the torch backend to ``torchvision.ops.roi_align``, and torchvision
does not import beside the torch we ship (NOTES: "operator torchvision::nms does not exist"). Its pure
keras-ops fallback materialises an (rois, 7, 7, H, W, C) tensor (~260 MB per box at SAM 3's 72x72 map),
so this module holds a vectorised torch version of torchvision's CPU kernel instead (``aligned=False``,
adaptive sampling grid, samples outside ``[-1, size]`` read as zero, exactly like torchvision), and
:func:`install` points the geometry encoder's one call at it. That one module attribute is the whole
patch; ``tests/test_sam3_roi_align.py`` proves this function equal to a line-by-line port of
torchvision's kernel and to keras-hub's own keras-ops path on random inputs.
"""

from __future__ import annotations

import torch


def _axis_samples(start: torch.Tensor, bins: torch.Tensor, out: int, grid: torch.Tensor, size: int):
    """Sample positions along one axis: (K, out * G) low/high indices, weights and validity."""
    g_max = max(int(grid.max().item()), 1) if grid.numel() else 1
    steps = torch.arange(g_max, dtype=start.dtype, device=start.device)
    cells = torch.arange(out, dtype=start.dtype, device=start.device)
    pos = (start[:, None, None] + cells[None, :, None] * bins[:, None, None]
           + (steps[None, None, :] + 0.5) * (bins / grid)[:, None, None])  # (K, out, G)
    used = steps[None, None, :] < grid[:, None, None]
    inside = (pos >= -1.0) & (pos <= size)
    pos = pos.clamp(min=0.0)
    low = pos.floor().long()
    at_edge = low >= size - 1
    low = torch.where(at_edge, torch.full_like(low, size - 1), low)
    high = torch.where(at_edge, low, low + 1)
    pos = torch.where(at_edge, low.to(pos.dtype), pos)
    frac = pos - low.to(pos.dtype)
    weight = (used & inside).to(pos.dtype)
    return low, high, frac, weight, g_max


def roi_align_nhwc(features: torch.Tensor, rois: torch.Tensor, output_size: tuple[int, int],
                   spatial_scale: float = 1.0) -> torch.Tensor:
    """torchvision's ``roi_align(aligned=False, sampling_ratio=-1)`` on channels-last features.

    ``features`` is (N, H, W, C); ``rois`` is (K, 5) rows of (batch index, x1, y1, x2, y2) in feature pixels
    before ``spatial_scale``. Returns (K, out_h, out_w, C).
    """
    out_dtype = features.dtype
    feats = features.float()
    rois = rois.to(device=feats.device, dtype=torch.float32)
    _, height, width, channels = feats.shape
    out_h, out_w = int(output_size[0]), int(output_size[1])
    k = rois.shape[0]
    if k == 0:
        return feats.new_zeros((0, out_h, out_w, channels)).to(out_dtype)
    batch = rois[:, 0].long()
    x1, y1, x2, y2 = (rois[:, i] * spatial_scale for i in range(1, 5))
    roi_w = (x2 - x1).clamp(min=1.0)
    roi_h = (y2 - y1).clamp(min=1.0)
    bin_h, bin_w = roi_h / out_h, roi_w / out_w
    grid_h, grid_w = torch.ceil(roi_h / out_h), torch.ceil(roi_w / out_w)
    ylo, yhi, ly, ywt, gh = _axis_samples(y1, bin_h, out_h, grid_h, height)
    xlo, xhi, lx, xwt, gw = _axis_samples(x1, bin_w, out_w, grid_w, width)
    # Interpolate rows first: (K, out_h*gh, W, C), then columns: (K, out_h*gh, out_w*gw, C).
    rows_lo = feats[batch[:, None], ylo.reshape(k, -1)]
    rows_hi = feats[batch[:, None], yhi.reshape(k, -1)]
    ly = ly.reshape(k, -1, 1, 1)
    rows = rows_lo * (1 - ly) + rows_hi * ly
    kk = torch.arange(k, device=feats.device)[:, None, None]
    ss = torch.arange(rows.shape[1], device=feats.device)[None, :, None]
    cols_lo = rows[kk, ss, xlo.reshape(k, 1, -1)]
    cols_hi = rows[kk, ss, xhi.reshape(k, 1, -1)]
    lx = lx.reshape(k, 1, -1, 1)
    samples = cols_lo * (1 - lx) + cols_hi * lx
    weights = ywt.reshape(k, -1, 1, 1) * xwt.reshape(k, 1, -1, 1)
    samples = (samples * weights).reshape(k, out_h, gh, out_w, gw, channels).sum(dim=(2, 4))
    count = (grid_h * grid_w).clamp(min=1.0)
    return (samples / count[:, None, None, None]).to(out_dtype)


def keras_hub_roi_align(feature_maps, rois, output_size, height, width, hidden_dim,
                        spatial_scale=1.0, aligned=False):
    """Drop-in for ``keras_hub.src.models.sam3.roi_align.roi_align`` (same signature) on the torch backend."""
    if aligned:  # keras-hub's SAM 3 never asks for it; refuse rather than compute something else
        raise NotImplementedError("aligned RoIAlign is not implemented")
    return roi_align_nhwc(feature_maps, rois, output_size, spatial_scale)


def install() -> None:
    """Make keras-hub's SAM 3 geometry encoder use :func:`keras_hub_roi_align` (idempotent)."""
    from keras_hub.src.models.sam3 import sam3_geometry_encoder

    sam3_geometry_encoder.roi_align = keras_hub_roi_align


__all__ = ["install", "keras_hub_roi_align", "roi_align_nhwc"]
