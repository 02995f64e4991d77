"""A line-by-line port of torchvision's CPU ``roi_align`` kernel (``roi_align_kernel.cpp``), test oracle only.

torchvision does not import beside our torch, so the tests need an independent, obviously-faithful copy:
scalar loops, no vectorisation, the kernel's own variable names. Slow; tiny inputs only.
"""

from __future__ import annotations

import math

import torch


def _bilinear(data, height, width, y, x):
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return torch.zeros(data.shape[0], dtype=data.dtype)
    y = max(y, 0.0)
    x = max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_high = y_low = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_high = x_low = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1.0 - ly, 1.0 - lx
    return (hy * hx * data[:, y_low, x_low] + hy * lx * data[:, y_low, x_high]
            + ly * hx * data[:, y_high, x_low] + ly * lx * data[:, y_high, x_high])


def roi_align(input: torch.Tensor, rois: torch.Tensor, output_size, spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False) -> torch.Tensor:
    """Same contract as ``torchvision.ops.roi_align``: NCHW input, (K, 5) rois or a list of (Ki, 4) per image."""
    if isinstance(rois, (list, tuple)):
        rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i), dtype=b.dtype), b], dim=1)
                          for i, b in enumerate(rois)])
    pooled_height, pooled_width = (output_size, output_size) if isinstance(output_size, int) else output_size
    channels, height, width = input.shape[1:]
    out = torch.zeros(rois.shape[0], channels, pooled_height, pooled_width, dtype=input.dtype)
    offset = 0.5 if aligned else 0.0
    for n in range(rois.shape[0]):
        batch, x1, y1, x2, y2 = (float(v) for v in rois[n])
        start_w, start_h = x1 * spatial_scale - offset, y1 * spatial_scale - offset
        end_w, end_h = x2 * spatial_scale - offset, y2 * spatial_scale - offset
        roi_width, roi_height = end_w - start_w, end_h - start_h
        if not aligned:
            roi_width, roi_height = max(roi_width, 1.0), max(roi_height, 1.0)
        bin_h, bin_w = roi_height / pooled_height, roi_width / pooled_width
        grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_height / pooled_height)
        grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_width / pooled_width)
        count = max(grid_h * grid_w, 1)
        data = input[int(batch)]
        for ph in range(pooled_height):
            for pw in range(pooled_width):
                acc = torch.zeros(channels, dtype=input.dtype)
                for iy in range(grid_h):
                    y = start_h + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                    for ix in range(grid_w):
                        x = start_w + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                        acc += _bilinear(data, height, width, y, x)
                out[n, :, ph, pw] = acc / count
    return out
