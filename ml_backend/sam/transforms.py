"""Geometry between original images and SAM's padded square input.

This follows the official ``SamPredictor`` exactly: resize the longest side to the
model's input size (PIL bilinear, rounding as ``ResizeLongestSide``), pad bottom
and right, scale prompt coordinates by the same factors, and on the way back
upsample the low-resolution logits to the square, crop the padding, and resize to
the original size. keras-hub's ``SAMImageConverter`` centre-crops non-square
images, which misplaces masks, so it is not used.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# keras-hub's ViTDet backbone normalises [0, 1] inputs with these ImageNet statistics.
# The official SAM pads *after* normalising, so padding must be the mean colour here
# to become exactly zero after the backbone's own normalisation.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)


@dataclass(frozen=True)
class InputGeometry:
    """How one original image maps onto the model's square input."""

    original_size: tuple[int, int]  # (height, width)
    resized_size: tuple[int, int]  # (height, width) before padding
    input_size: int  # side of the model's square input

    @classmethod
    def for_image(cls, height: int, width: int, input_size: int) -> "InputGeometry":
        scale = input_size / max(height, width)
        resized = (int(height * scale + 0.5), int(width * scale + 0.5))
        return cls(original_size=(height, width), resized_size=resized, input_size=input_size)

    def scale_coords(self, coords: np.ndarray) -> np.ndarray:
        """Map ``(..., 2)`` x, y original pixels to model-input pixels."""
        (old_h, old_w), (new_h, new_w) = self.original_size, self.resized_size
        out = np.array(coords, dtype=np.float32, copy=True)
        out[..., 0] *= new_w / old_w
        out[..., 1] *= new_h / old_h
        return out


def prepare_image(image: np.ndarray, geometry: InputGeometry) -> np.ndarray:
    """Resize and pad an (H, W, 3) uint8 image to the (S, S, 3) float32 [0, 1] model input."""
    new_h, new_w = geometry.resized_size
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BILINEAR), np.float32) / 255.0
    square = np.empty((geometry.input_size, geometry.input_size, 3), np.float32)
    square[...] = IMAGENET_MEAN
    square[:new_h, :new_w] = resized
    return square


def logits_to_original(low_res_logits: torch.Tensor, geometry: InputGeometry) -> torch.Tensor:
    """Upsample (N, h, w) low-resolution logits to (N, H, W) logits at the original size."""
    x = low_res_logits[:, None].float()
    x = F.interpolate(x, (geometry.input_size, geometry.input_size), mode="bilinear", align_corners=False)
    new_h, new_w = geometry.resized_size
    x = x[..., :new_h, :new_w]
    x = F.interpolate(x, geometry.original_size, mode="bilinear", align_corners=False)
    return x[:, 0]


def logits_to_mask(low_res_logits: torch.Tensor, geometry: InputGeometry, threshold: float = 0.0) -> torch.Tensor:
    """(N, h, w) low-resolution logits to (N, H, W) bool masks at the original size (logit > threshold)."""
    return threshold_logits(logits_to_original(low_res_logits, geometry), threshold)


def threshold_logits(logits: torch.Tensor, threshold: float = 0.0) -> torch.Tensor:
    """``logits > threshold`` as a bool tensor on the logits' device.

    On the CPU the comparison is numpy's: torch 2.13's CPU kernel took 18 ms for the 12 M logits of a
    4000x3000 image on one thread, numpy's 2.5 ms, with the same result.
    """
    if logits.device.type == "cpu":
        return torch.from_numpy(logits.detach().numpy() > threshold)
    return logits > threshold
