"""The mask both result-format e2e tests save, read back and compare: components, a hole and curved edges."""

from __future__ import annotations

import cv2
import numpy as np

WIDTH, HEIGHT = 160, 120


def known_mask() -> np.ndarray:
    """A disk with a hole and a separate bar: components, a hole and curved edges."""
    mask = np.zeros((HEIGHT, WIDTH), np.uint8)
    cv2.circle(mask, (60, 60), 50, 1, -1)
    cv2.circle(mask, (60, 60), 15, 0, -1)
    mask[10:30, 120:150] = 1
    return mask.astype(bool)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())
