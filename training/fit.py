"""Fitting a version (from scratch or fine-tuning), evaluating it, and promoting it by the rule.

Promotion rule: a new version becomes current only if its validation foreground IoU beats the
trivial baselines on its validation images (predicting all background, which scores 0, and
predicting all foreground, which scores the foreground's share of the pixels) and the current
version's, measured now on the same validation images at their original size, by more than
``promotion_margin``. So a version that learned nothing is never served. Otherwise it is stored
with ``promotion.promoted = false`` and the reason.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from training.data import (
    DECODE_ERRORS, Pair, Problem, dataset_fingerprint, files_fingerprint, load_image, load_trimap, scan_dataset,
    split_pairs,
)
from training.errors import DatasetError, FitInterrupted
from training.model import (
    CLASS_NAMES, DEFAULT_IMAGE_SIZE, FOREGROUND, NUM_CLASSES, build_model, check_image_size, compile_model,
    model_image_size, rebuild_at_size,
)
from training.pipeline import SkipLog, TrimapDataset
from training.plots import plot_history, plot_predictions
from training.predict import predict_trimaps, probabilities, upsample
from training.store import MODEL_FILE, SPLIT_FILE, ModelStore

log = logging.getLogger(__name__)

PREVIEW_IMAGES = 6


@dataclass
class EvalReport:
    """Metrics at the images' original size. ``per_class_iou`` is keyed by class name."""

    foreground_iou: float
    per_class_iou: dict[str, float]
    pixel_accuracy: float
    images: int
    version: str | None = None
    skipped: list[str] = field(default_factory=list)
    # Foreground IoU of the trivial predictions on the same pixels: all background scores 0.
    all_foreground_iou: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FitReport:
    version_id: str
    promoted: bool
    val_foreground_iou: float
    baseline_version: str | None
    baseline_val_foreground_iou: float | None
    parent: str | None
    train_count: int
    val_count: int
    skipped: list[str]
    epochs_run: int
    best_epoch: int
    early_stopped: bool
    interrupted: bool
    path: Path
    promotion_reason: str = ""
    base_model: str | None = None

    @property
    def skipped_count(self) -> int:
        return len(self.skipped)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path), "skipped_count": self.skipped_count}


def _confusion_metrics(confusion: np.ndarray) -> tuple[dict[str, float], float]:
    """Per-class IoU (NaN-free: a class absent from both truth and prediction scores 0) and accuracy."""
    true_positive = np.diag(confusion).astype(np.float64)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - true_positive
    iou = np.divide(true_positive, union, out=np.zeros_like(true_positive), where=union > 0)
    accuracy = float(true_positive.sum() / max(1, confusion.sum()))
    return {name: float(iou[i]) for i, name in enumerate(CLASS_NAMES)}, accuracy


def evaluate_model(
    model: keras.Model, pairs: Sequence[Pair], *, batch_size: int = 16, skipped: SkipLog | None = None,
    verbose: int = 0,
) -> EvalReport:
    """Foreground IoU, per-class IoU and pixel accuracy, measured at each image's original size.

    Predictions are resized back to the trimap's size before comparing, so models with different
    input sizes are compared on exactly the same pixels.
    """
    skipped = skipped if skipped is not None else SkipLog()
    size = model_image_size(model)
    # A confusion matrix by np.bincount: keras.metrics.IoU.update_state took 2.5 s per 500×375 image.
    confusion = np.zeros(NUM_CLASSES * NUM_CLASSES, dtype=np.int64)
    progress = keras.utils.Progbar(len(pairs), unit_name="image") if verbose else None
    counted = 0
    for start in range(0, len(pairs), batch_size):
        inputs, truths = [], []
        for pair in pairs[start : start + batch_size]:
            if pair.stem in skipped:
                continue
            try:
                image = load_image(pair.image, size)
            except DECODE_ERRORS as exc:
                skipped.add(pair.stem, Problem(pair.image, f"unreadable image ({exc})"))
                continue
            try:
                truth = load_trimap(pair.trimap)
            except DECODE_ERRORS as exc:
                skipped.add(pair.stem, Problem(pair.trimap, f"unusable trimap ({exc})"))
                continue
            inputs.append(image)
            truths.append(truth)
        if inputs:
            for prob, truth in zip(probabilities(model, np.stack(inputs)), truths):
                predicted = upsample(prob, truth.shape[1], truth.shape[0]).argmax(axis=-1)
                confusion += np.bincount(truth.ravel().astype(np.int64) * NUM_CLASSES + predicted.ravel(),
                                         minlength=NUM_CLASSES * NUM_CLASSES)
            counted += len(inputs)
        if progress is not None:
            progress.update(min(len(pairs), start + batch_size))
    if counted == 0:
        raise DatasetError("no validation image could be evaluated; see the warnings above")
    matrix = confusion.reshape(NUM_CLASSES, NUM_CLASSES)
    per_class, accuracy = _confusion_metrics(matrix)
    return EvalReport(
        all_foreground_iou=float(matrix[FOREGROUND].sum() / max(1, matrix.sum())),
        foreground_iou=per_class[CLASS_NAMES[FOREGROUND]],
        per_class_iou=per_class,
        pixel_accuracy=accuracy,
        images=counted,
        skipped=[str(p) for p in skipped.problems],
    )


class _BestCheckpoint(keras.callbacks.Callback):
    """Saves the best model by validation loss and records every epoch's logs.

    Hand-written rather than ``ModelCheckpoint`` because that writes in place: a Ctrl-C during the
    write would leave a torn file, and after Ctrl-C this file is all we keep.
    """

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.best = float("inf")
        self.best_epoch = 0
        self.history: dict[str, list[float]] = {}

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs or {}
        for key, value in logs.items():
            self.history.setdefault(key, []).append(float(value))
        val_loss = float(logs.get("val_loss", float("inf")))
        if val_loss < self.best:
            self.best, self.best_epoch = val_loss, epoch + 1
            tmp = self.path.with_name(f".{self.path.name}.tmp.keras")
            self.model.save(tmp)
            os.replace(tmp, self.path)


def _previous_split(store: ModelStore, version_ids: set[str]) -> tuple[set[str], set[str]]:
    """Validation and training stems recorded by the given versions."""
    val: set[str] = set()
    train: set[str] = set()
    for version_id in version_ids:
        split_path = store.get(version_id).path / SPLIT_FILE
        if split_path.is_file():
            recorded = json.loads(split_path.read_text(encoding="utf-8"))
            val.update(recorded.get("val", []))
            train.update(recorded.get("train", []))
    return val - train, train


def _library_versions() -> dict[str, str]:
    import PIL
    import torch

    return {
        "python": platform.python_version(), "keras": keras.__version__, "torch": torch.__version__,
        "numpy": np.__version__, "pillow": PIL.__version__, "keras_backend": keras.backend.backend(),
    }


def _device() -> str:
    import torch

    return f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"


def _preview(model: keras.Model, pairs: Sequence[Pair], path: Path) -> None:
    """A grid of predictions on a few validation images (skipping any that fail to load)."""
    images, truths, titles = [], [], []
    for pair in pairs:
        if len(images) == PREVIEW_IMAGES:
            break
        try:
            image, truth = load_image(pair.image), load_trimap(pair.trimap)
        except DECODE_ERRORS:
            continue  # already reported by the evaluation
        images.append(image)
        truths.append(truth)
        titles.append(pair.stem)
    if images:
        plot_predictions(images, truths, predict_trimaps(model, images), path, titles)


def load_base_model(path: str | Path) -> keras.Model:
    """A base model: a ``.keras`` file, or a version directory holding ``model.keras``."""
    from training.errors import StoreError
    from training.layout import base_model_file

    file = base_model_file(path)
    try:
        return keras.saving.load_model(file, compile=False)
    except (OSError, ValueError) as exc:
        raise StoreError(f"{file}: cannot load the base model ({exc})") from exc
    except Exception as exc:  # zipfile.BadZipFile and friends from a truncated file
        raise StoreError(f"{file}: cannot load the base model ({exc.__class__.__name__}: {exc})") from exc


def promotion_decision(iou: float, all_foreground_iou: float, baseline_iou: float | None,
                       margin: float) -> tuple[bool, str]:
    """(promote?, why) by the rule in this module's docstring."""
    if iou <= 0.0:
        return False, f"validation foreground IoU {iou:.4f} does not beat predicting all background (0)"
    if iou <= all_foreground_iou:
        return False, (f"validation foreground IoU {iou:.4f} does not beat predicting all foreground "
                       f"({all_foreground_iou:.4f})")
    if baseline_iou is not None and iou <= baseline_iou + margin:
        return False, (f"validation foreground IoU {iou:.4f} does not beat the current version's "
                       f"{baseline_iou:.4f} + margin {margin:.4f}")
    against = "no current version" if baseline_iou is None else f"current {baseline_iou:.4f}"
    return True, f"validation foreground IoU {iou:.4f} beats all foreground {all_foreground_iou:.4f} and {against}"


def fit(
    data_dir: str | Path,
    model_dir: str | Path,
    *,
    from_version: str | None = None,
    base_model: str | Path | None = None,
    epochs: int = 50,
    image_size: int | None = None,
    batch_size: int = 16,
    learning_rate: float = 1e-3,
    patience: int = 5,
    promotion_margin: float = 0.0,
    seed: int = 1337,
    flip: bool = True,
    workers: int | None = None,
    verbose: int = 1,
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> FitReport:
    """Fit a new version on ``data_dir``, store it in ``model_dir`` and promote it by the rule.

    ``from_version``: ``None`` trains from scratch; ``"current"`` fine-tunes the current version
    if there is one (else ``base_model`` when given, else from scratch); any other value names the
    version to fine-tune. ``base_model``: a ``.keras`` file or a version directory of another store.
    ``image_size`` defaults to the parent's input size (200 from scratch). ``seed`` fixes the
    split, the shuffling and the flips (not the initial weights: that would reseed the caller's
    global random state). Ctrl-C stops fitting and keeps the best checkpoint so far (the
    version is then marked ``interrupted``).
    """
    started = time.perf_counter()
    if epochs < 1 or batch_size < 1 or patience < 0 or learning_rate < 0:
        raise ValueError("epochs and batch_size must be >= 1, patience and learning_rate >= 0")
    store = ModelStore(model_dir)
    dataset = scan_dataset(data_dir)

    parent: str | None = None
    base: str | None = None
    if from_version == "current":
        parent = store.current_version_id()
        if parent is None and base_model:
            base = str(base_model)
        elif parent is None:
            log.info("no current version in %s: training from scratch", store.root)
    elif from_version is not None:
        parent = store.resolve(from_version)
    if parent is not None or base is not None:
        parent_model = store.load_model(parent) if parent is not None else load_base_model(base)
        size = check_image_size(image_size or model_image_size(parent_model))
        model = rebuild_at_size(parent_model, size)
        log.info("fine-tuning %s at %d×%d", f"version {parent}" if parent else f"base model {base}", size, size)
    else:
        size = check_image_size(image_size or DEFAULT_IMAGE_SIZE)
        model = build_model(size)
    compile_model(model, learning_rate)

    references = {v for v in (parent, store.current_version_id()) if v is not None}
    previous_val, previous_train = _previous_split(store, references)
    split = split_pairs(dataset.pairs, seed=seed, previous_val=previous_val, previous_train=previous_train)
    if not split.val or not split.train:
        raise DatasetError(
            f"{dataset.root}: {len(dataset.pairs)} usable pair(s) give {len(split.train)} training and "
            f"{len(split.val)} validation image(s); at least one of each is needed"
        )
    log.info("%d training and %d validation images at %d×%d", len(split.train), len(split.val), size, size)

    skipped = SkipLog()
    train_data = TrimapDataset(split.train, size, batch_size, shuffle=True, flip=flip, seed=seed,
                               skipped=skipped, workers=workers)
    val_data = TrimapDataset(split.val, size, batch_size, skipped=skipped, workers=workers)

    version_id = store.new_version_id()
    with store.staging(version_id) as staged:
        checkpoint = _BestCheckpoint(staged / MODEL_FILE)
        stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience)
        interrupted = False
        fit_started = time.perf_counter()
        try:
            model.fit(train_data, validation_data=val_data, epochs=epochs, verbose=verbose,
                      callbacks=[checkpoint, stopper, *callbacks])
        except KeyboardInterrupt:
            interrupted = True
            log.warning("interrupted: keeping the best checkpoint so far (epoch %d)", checkpoint.best_epoch)
        fit_seconds = time.perf_counter() - fit_started
        if not checkpoint.path.is_file():
            raise FitInterrupted("interrupted before the first epoch ended: no version was written")
        epochs_run = len(checkpoint.history.get("loss", []))

        best = keras.saving.load_model(checkpoint.path, compile=False)
        best.save(checkpoint.path)  # uncompiled: drops the optimizer state (2/3 of the file)
        eval_started = time.perf_counter()
        result = evaluate_model(best, split.val, batch_size=batch_size, skipped=skipped, verbose=verbose)
        plot_history(checkpoint.history, staged / "curves.png")
        _preview(best, split.val, staged / "predictions.png")
        (staged / SPLIT_FILE).write_text(json.dumps(
            {"seed": seed, "train": [p.stem for p in split.train], "val": [p.stem for p in split.val]}, indent=1))

        with store.lock():
            baseline_id = store.current_version_id()
            baseline_iou = None
            if baseline_id is None and base is not None:  # what the project is served until a version is promoted
                baseline_id = f"base model {base}"
                baseline_model = load_base_model(base)
            elif baseline_id is not None:
                baseline_model = store.load_model(baseline_id)
            if baseline_id is not None:
                baseline = evaluate_model(baseline_model, split.val, batch_size=batch_size, skipped=skipped)
                baseline_iou = baseline.foreground_iou
            promoted, promotion_reason = promotion_decision(result.foreground_iou, result.all_foreground_iou,
                                                            baseline_iou, promotion_margin)
            eval_seconds = time.perf_counter() - eval_started
            metrics = {
                "version": version_id,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "parent": parent,
                "base_model": base,
                "val_foreground_iou": result.foreground_iou,
                "val_per_class_iou": result.per_class_iou,
                "val_pixel_accuracy": result.pixel_accuracy,
                "val_loss": checkpoint.best,
                "best_epoch": checkpoint.best_epoch,
                "epochs_run": epochs_run,
                "early_stopped": bool(stopper.stopped_epoch),
                "interrupted": interrupted,
                "history": checkpoint.history,
                "params": {"image_size": size, "batch_size": batch_size, "learning_rate": learning_rate,
                           "epochs": epochs, "patience": patience, "seed": seed, "flip": flip},
                "data": {
                    "dir": str(dataset.root.resolve()),
                    "size": len(dataset.pairs),
                    "train_count": len(split.train),
                    "val_count": len(split.val),
                    "val_images_evaluated": result.images,
                    "fingerprint": dataset_fingerprint(dataset.pairs),
                    "val_fingerprint": files_fingerprint(split.val),
                    "skipped": [str(p) for p in dataset.problems + skipped.problems],
                },
                "promotion": {
                    "promoted": promoted,
                    "baseline_version": baseline_id,
                    "baseline_val_foreground_iou": baseline_iou,
                    "all_foreground_val_foreground_iou": result.all_foreground_iou,
                    "margin": promotion_margin,
                    "reason": promotion_reason,
                },
                "timings": {
                    "fit_s": round(fit_seconds, 2),
                    "eval_s": round(eval_seconds, 2),
                    "total_s": round(time.perf_counter() - started, 2),
                    "train_images_per_s": round(len(split.train) * epochs_run / max(fit_seconds, 1e-9), 2),
                },
                "device": _device(),
                "libraries": _library_versions(),
            }
            info = store.publish(staged, metrics, make_current=promoted)

    log.info("version %s %s: %s", version_id, "promoted" if promoted else "kept but not promoted",
             promotion_reason)
    return FitReport(
        version_id=version_id, promoted=promoted, val_foreground_iou=result.foreground_iou,
        baseline_version=baseline_id, baseline_val_foreground_iou=baseline_iou, parent=parent,
        train_count=len(split.train), val_count=len(split.val), skipped=metrics["data"]["skipped"],
        epochs_run=epochs_run, best_epoch=checkpoint.best_epoch, early_stopped=bool(stopper.stopped_epoch),
        interrupted=interrupted, path=info.path, promotion_reason=promotion_reason, base_model=base,
    )


def evaluate(
    data_dir: str | Path, model_dir: str | Path, *, version: str | None = None, subset: str = "all",
    batch_size: int = 16, verbose: int = 0,
) -> EvalReport:
    """Evaluate a stored version (default: current) on every usable pair of ``data_dir``, or only on
    the validation images recorded by that version (``subset="val"``)."""
    if subset not in ("all", "val"):
        raise ValueError(f"subset must be 'all' or 'val' (got {subset!r})")
    store = ModelStore(model_dir)
    version_id = store.resolve(version)
    dataset = scan_dataset(data_dir)
    pairs = dataset.pairs
    if subset == "val":
        val_stems, _ = _previous_split(store, {version_id})
        pairs = [p for p in pairs if p.stem in val_stems]
        if not pairs:
            raise DatasetError(f"{dataset.root}: none of version {version_id}'s validation images is here")
    skipped = SkipLog()
    report = evaluate_model(store.load_model(version_id), pairs, batch_size=batch_size, skipped=skipped,
                            verbose=verbose)
    report.version = version_id
    report.skipped = [str(p) for p in dataset.problems + skipped.problems]
    return report
