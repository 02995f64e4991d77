"""Prompt and result types of the SAM engine, in original-image pixels."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ml_backend.errors import InvalidPromptError

POSITIVE = 1
NEGATIVE = 0


@dataclass(frozen=True)
class Prompts:
    """What the user asked for, in original-image pixel coordinates (x right, y down).

    ``points`` is (N, 2) float x, y; ``labels`` (N,) with 1 positive, 0 negative;
    ``box`` x1, y1, x2, y2; ``mask_logits`` the low-resolution logits of a previous
    result for the same image, fed back to refine the mask the user is building.
    """

    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2), np.float32))
    labels: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int32))
    box: tuple[float, float, float, float] | None = None
    mask_logits: np.ndarray | None = None

    @classmethod
    def from_lists(
        cls,
        points: list[tuple[float, float]] | None = None,
        labels: list[int] | None = None,
        box: tuple[float, float, float, float] | None = None,
        mask_logits: np.ndarray | None = None,
    ) -> "Prompts":
        points = points or []
        labels = [POSITIVE] * len(points) if labels is None else labels
        return cls(
            points=np.asarray(points, np.float32).reshape(-1, 2),
            labels=np.asarray(labels, np.int32).reshape(-1),
            box=None if box is None else tuple(float(v) for v in box),  # type: ignore[arg-type]
            mask_logits=mask_logits,
        )

    @property
    def is_single_point(self) -> bool:
        return len(self.points) == 1 and self.box is None

    def validate(self, width: int, height: int) -> None:
        """Raise :class:`InvalidPromptError` unless these prompts fit a ``width`` x ``height`` image."""
        if len(self.points) == 0 and self.box is None:
            raise InvalidPromptError("Empty prompt: give at least one point or a box.")
        if self.points.ndim != 2 or self.points.shape[1] != 2:
            raise InvalidPromptError(f"Points must be (N, 2) x, y pairs, got shape {self.points.shape}.")
        if self.labels.shape != (len(self.points),):
            raise InvalidPromptError(
                f"Got {len(self.points)} points but {self.labels.shape[0]} labels; give one label per point."
            )
        bad_labels = set(np.unique(self.labels).tolist()) - {POSITIVE, NEGATIVE}
        if bad_labels:
            raise InvalidPromptError(f"Point labels must be 1 (positive) or 0 (negative), got {sorted(bad_labels)}.")
        if not np.all(np.isfinite(self.points)):
            raise InvalidPromptError("Point coordinates must be finite numbers (got NaN or infinity).")
        for x, y in self.points.tolist():
            if not (0 <= x <= width and 0 <= y <= height):
                raise InvalidPromptError(
                    f"Point ({x:.1f}, {y:.1f}) lies outside the {width}x{height} image."
                )
        if self.box is not None:
            if len(self.box) != 4 or not all(math.isfinite(v) for v in self.box):
                raise InvalidPromptError("A box needs four finite numbers x1, y1, x2, y2.")
            x1, y1, x2, y2 = self.box
            if not (x1 < x2 and y1 < y2):
                raise InvalidPromptError(f"Box ({x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f}) has no area.")
            if x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height:
                raise InvalidPromptError(
                    f"Box ({x1:.1f}, {y1:.1f}, {x2:.1f}, {y2:.1f}) lies outside the {width}x{height} image."
                )
        if self.mask_logits is not None and np.asarray(self.mask_logits).ndim != 2:
            raise InvalidPromptError("Previous mask logits must be a 2-D array.")


@dataclass(frozen=True)
class SegmentationResult:
    """One mask at original size, SAM's predicted IoU, and the low-resolution logits for refinement."""

    mask: np.ndarray  # (H, W) bool
    score: float
    low_res_logits: np.ndarray  # (256, 256) float32
