"""Batch pre-annotation with each project's promoted trimap model, reloaded when a new version is promoted.

A project is served by its own store's current version (``MODEL_DIR/projects/<id>/``); a project
without one, or a request without a project, by the base model: ``BASE_MODEL``, else the current
version of a single store of an older release at ``MODEL_DIR`` itself (so an upgrade serves what it
served before). Without either there is nothing to serve, and predictions are empty.

Each mask comes with a score in [0, 1], how sure the model is along the mask's edge
(:func:`training.predict.edge_confidence`), so Label Studio can sort tasks by it.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

logger = logging.getLogger(__name__)

NO_TRIMAP_VERSION = "trimap-none"  # the model version of a prediction no trimap model served


def trimap_model_version(version: str | None) -> str:
    """The ``model_version`` Label Studio sees for predictions of trimap ``version``."""
    return f"trimap-{version}" if version else NO_TRIMAP_VERSION


MODELS_HELD = 4  # loaded trimap models kept per process (a few MB each at the default size)


@dataclass(frozen=True)
class ModelSource:
    """What serves a project: ``version`` as shown in Label Studio, and the file it loads."""

    version: str
    path: Path
    project_version: bool  # the project's own promoted version (not the base model)


class TrimapMask(NamedTuple):
    """What the trimap model predicts for one image."""

    version: str  # the version that served it
    mask: np.ndarray | None  # the object at the image's size; None when smaller than the minimum area
    score: float  # :func:`training.predict.edge_confidence` of ``mask``, 0 when there is none


def resolve_base_model(model_dir: Path, base_model: str) -> Path | None:
    """``BASE_MODEL`` if set, else the current version of a single store at ``MODEL_DIR`` itself."""
    from training.layout import legacy_current_version

    if base_model:
        return Path(base_model)
    try:
        return legacy_current_version(model_dir)
    except Exception:  # an unreadable old pointer must not break serving
        logger.warning("could not read the single store in %s", model_dir, exc_info=True)
        return None


class TrimapPredictor:
    """Serves each project's current version, or the base model; checks the cheap ``current`` pointer per call."""

    def __init__(self, model_dir: Path, base_model: str = "", *, min_area: int = 0) -> None:
        self.model_dir = Path(model_dir)
        self.base_model = base_model
        self.min_area = min_area
        self._lock = threading.Lock()
        self._models: OrderedDict[tuple[Path, int], object] = OrderedDict()  # (file, mtime) -> model (LRU)

    def _store(self, project: int):
        from training.layout import project_store_dir
        from training.store import ModelStore

        return ModelStore(project_store_dir(self.model_dir, project))

    def source(self, project: int | None) -> ModelSource | None:
        """What serves ``project`` now (None: nothing to serve)."""
        from training.layout import base_model_file, base_model_name

        if project is not None:
            try:
                info = self._store(project).current()
            except Exception:  # a missing or half-written store must not break predictions
                logger.warning("could not read project %s's current trimap version", project, exc_info=True)
                info = None
            if info is not None:
                return ModelSource(info.id, info.model_path, True)
        base = resolve_base_model(self.model_dir, self.base_model)
        if base is None:
            return None
        try:
            return ModelSource(f"base-{base_model_name(base)}", base_model_file(base), False)
        except Exception as exc:
            logger.warning("base model unusable: %s", exc)
            return None

    def current_version(self, project: int | None = None) -> str | None:
        """The version serving ``project`` (``base-…`` for the base model), or None when nothing does."""
        source = self.source(project)
        return None if source is None else source.version

    def list_versions(self, project: int | None) -> list[dict]:
        """A project's stored versions with their validation IoU and whether each is current."""
        if project is None:
            return []
        return [
            {"id": v.id, "current": v.is_current, "promoted": v.promoted,
             "val_foreground_iou": v.metrics.get("val_foreground_iou"), "parent": v.metrics.get("parent"),
             "base_model": v.metrics.get("base_model")}
            for v in self._store(project).list_versions()
        ]

    def _model(self, source: ModelSource):
        import keras

        key = (source.path, source.path.stat().st_mtime_ns)  # a base model file replaced in place reloads too
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            logger.info("loading trimap model %s", source.version)
            model = keras.saving.load_model(source.path, compile=False)
            self._models[key] = model
            while len(self._models) > MODELS_HELD:
                self._models.popitem(last=False)
            return model

    def predict_mask(self, image: np.ndarray, *, include_boundary: bool,
                     project: int | None = None) -> TrimapMask | None:
        """The object mask and its score; None when nothing serves the project."""
        from training.predict import predict_object

        source = self.source(project)
        if source is None:
            return None
        predicted = predict_object(self._model(source), image, include_boundary=include_boundary)
        if int(predicted.mask.sum()) < max(1, self.min_area):
            return TrimapMask(source.version, None, 0.0)
        return TrimapMask(source.version, predicted.mask, predicted.score)


def mask_bounding_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """x1, y1, x2, y2 of a boolean mask's pixels (pixel-edge coordinates), None when empty."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)
