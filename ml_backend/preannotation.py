"""Batch pre-annotation with the promoted trimap model, reloaded when a new version is promoted."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

FOREGROUND, BACKGROUND, BOUNDARY = 0, 1, 2  # class ids of training's trimap model


class TrimapPredictor:
    """Serves the store's current version; checks the cheap ``current`` pointer on every call."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        self._lock = threading.Lock()
        self._model = None
        self._version: str | None = None

    def _store(self):
        from training.store import ModelStore

        return ModelStore(self.model_dir)

    def current_version(self) -> str | None:
        """The promoted version id, or None when nothing has been promoted yet."""
        try:
            return self._store().current_version_id()
        except Exception:  # a missing or half-written model dir must not break predictions
            logger.warning("could not read the current trimap version in %s", self.model_dir, exc_info=True)
            return None

    def list_versions(self) -> list[dict]:
        """Every stored version with its validation IoU and whether it is current."""
        current = self.current_version()
        return [
            {"id": v.id, "current": v.id == current, "promoted": v.promoted,
             "val_foreground_iou": v.metrics.get("val_foreground_iou")}
            for v in self._store().list_versions()
        ]

    def model(self):
        """(version id, keras model) of the current version, reloading after a promotion; (None, None) if none."""
        version = self.current_version()
        if version is None:
            return None, None
        with self._lock:
            if version != self._version:
                logger.info("loading trimap model version %s", version)
                self._model = self._store().load_model(version)
                self._version = version
            return self._version, self._model

    def predict_mask(self, image: np.ndarray, *, include_boundary: bool) -> tuple[str, np.ndarray] | None:
        """(version, boolean object mask at the image's size), or None when no version is promoted."""
        from training.predict import predict_trimap

        version, model = self.model()
        if model is None:
            return None
        classes = predict_trimap(model, image)
        mask = classes == FOREGROUND
        if include_boundary:
            mask |= classes == BOUNDARY
        return version, mask


def mask_bounding_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """x1, y1, x2, y2 of a boolean mask's pixels (pixel-edge coordinates), None when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
