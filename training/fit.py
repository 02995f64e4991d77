"""Fitting a version (from scratch or fine-tuning), evaluating it, and promoting it by the rule.

Promotion rule: a new version becomes current only if its validation foreground IoU beats the
trivial baselines on its validation images (predicting all background, which scores 0, and
predicting all foreground, which scores the foreground's share of the pixels) and the current
version's, measured now on the same validation images at their original size, by more than
``promotion_margin``. So a version that learned nothing is never served. Otherwise it is stored
with ``promotion.promoted = false`` and the reason.

While the training split is small, how long to fit and from which start (fine-tuning the parent,
its encoder with a fresh decoder, or from scratch) is decided by the rule in :mod:`training.selection`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from training.data import (
    DECODE_ERRORS, Pair, Split, dataset_fingerprint, files_fingerprint, load_image, load_trimap, scan_dataset,
    split_pairs,
)
from training.errors import DatasetError, FitInterrupted
from training.evaluation import EvalReport, evaluate_model
from training.model import (
    DEFAULT_IMAGE_SIZE, DEFAULT_WIDTH, average_of, build_model, check_image_size, compile_model, members,
    model_image_size, model_width, rebuild_at_size,
)
from training.pipeline import SkipLog, TrimapDataset
from training.selection import (
    DECODER, FINETUNE, SCRATCH, STARTS, Budget, Candidate, kept_name, small_data_budget, starts_to_try, to_keep,
    with_fresh_decoder,
)
from training.plots import plot_history, plot_predictions
from training.predict import predict_trimaps
from training.store import MODEL_FILE, SPLIT_FILE, ModelStore

log = logging.getLogger(__name__)

PREVIEW_IMAGES = 6


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
    start: str = "scratch"  # "finetune", "decoder" or "scratch": where the weights came from
    start_choice: dict[str, Any] | None = None  # every candidate's validation figures, when several were fitted

    @property
    def skipped_count(self) -> int:
        return len(self.skipped)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path), "skipped_count": self.skipped_count}


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


@dataclass
class _Fitted:
    """A candidate fitted on the training split: its best checkpoint (by validation loss) and its figures."""

    candidate: Candidate
    model: keras.Model
    result: EvalReport
    checkpoint: _BestCheckpoint
    stopper: keras.callbacks.EarlyStopping
    interrupted: bool


def _candidate_models(starts: Sequence[str], parent: keras.Model | None, size: int,
                      width: int) -> list[tuple[str, keras.Model]]:
    """The untrained model of each start, all made before any is trained (fine-tuning changes ``parent``).
    The fresh decoder of an averaged parent goes on its first (best) member's encoder."""
    width = model_width(parent) if parent is not None else width
    models = []
    for name in starts:
        if name == SCRATCH or parent is None:
            models.append((SCRATCH, build_model(size, width=width)))
        elif name == DECODER:
            models.append((DECODER, with_fresh_decoder(members(parent)[0], build_model(size, width=width))))
        else:
            models.append((FINETUNE, parent))
    return models


def _start_text(start: str, parent: str | None, base: str | None) -> str:
    source = f"version {parent}" if parent else f"base model {base}"
    return {SCRATCH: "from scratch", FINETUNE: f"fine-tuning {source}",
            DECODER: f"the encoder of {source} with a fresh decoder"}[start]


def _fit_candidate(model: keras.Model, name: str, staged: Path, split: Split, *, size: int, budget: Budget,
                   epochs: int, learning_rate: float, seed: int, flip: bool, workers: int | None, verbose: int,
                   callbacks: Sequence[keras.callbacks.Callback], skipped: SkipLog) -> _Fitted | None:
    """Fit one candidate, keep its best epoch by validation loss, evaluate it; None if stopped before an epoch ended."""
    compile_model(model, learning_rate)
    train_data = TrimapDataset(split.train, size, budget.batch_size, shuffle=True, flip=flip, seed=seed,
                               skipped=skipped, workers=workers, repeat=budget.repeat)
    val_data = TrimapDataset(split.val, size, budget.batch_size, skipped=skipped, workers=workers)
    checkpoint = _BestCheckpoint(staged / f".candidate-{name}.keras")
    stopper = keras.callbacks.EarlyStopping(monitor="val_loss", patience=budget.patience)
    interrupted = False
    try:
        model.fit(train_data, validation_data=val_data, epochs=epochs, verbose=verbose,
                  callbacks=[checkpoint, stopper, *callbacks])
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted: keeping the best checkpoint so far (epoch %d)", checkpoint.best_epoch)
    if not checkpoint.path.is_file():
        return None
    best = keras.saving.load_model(checkpoint.path, compile=False)
    best.save(checkpoint.path)  # uncompiled: drops the optimizer state (2/3 of the file)
    result = evaluate_model(best, split.val, batch_size=budget.batch_size, skipped=skipped, verbose=verbose)
    log.info("%s: validation foreground IoU %.4f, loss %.4f", name, result.foreground_iou, checkpoint.best)
    candidate = Candidate(name, result.foreground_iou, checkpoint.best, checkpoint.best_epoch,
                          averaged=len(members(best)) > 1)
    return _Fitted(candidate, best, result, checkpoint, stopper, interrupted)


def _average(kept: Sequence[_Fitted], split: Split, *, size: int, budget: Budget, skipped: SkipLog,
             verbose: int) -> tuple[keras.Model, EvalReport, float]:
    """The average of the kept fits (:func:`training.model.average_of`), its validation figures and loss."""
    model = average_of([f.model for f in kept])
    result = evaluate_model(model, split.val, batch_size=budget.batch_size, skipped=skipped, verbose=verbose)
    # The loss as Keras reports a fit's validation loss: cross-entropy at the model's input size, per pixel.
    val_data = TrimapDataset(split.val, size, budget.batch_size, skipped=skipped, workers=1)
    cross_entropy = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction="sum")
    total, pixels = 0.0, 0
    for index in range(len(val_data)):
        images, trimaps = val_data[index]
        total += float(cross_entropy(trimaps, model.predict_on_batch(images)))
        pixels += trimaps.size
    return model, result, total / max(1, pixels)


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
    compare_max_train: int = 64,
    start: str = "auto",
    on_candidate: Callable[[str, keras.Model], None] | None = None,
    width: int = DEFAULT_WIDTH,
) -> FitReport:
    """Fit a new version on ``data_dir``, store it in ``model_dir`` and promote it by the rule.

    ``from_version``: ``None`` trains from scratch; ``"current"`` fine-tunes the current version
    if there is one (else ``base_model`` when given, else from scratch); any other value names the
    version to fine-tune. ``base_model``: a ``.keras`` file or a version directory of another store.
    ``image_size`` defaults to the parent's input size (200 from scratch). ``seed`` fixes the
    split, the shuffling and the flips (not the initial weights: that would reseed the caller's
    global random state). Ctrl-C stops fitting and keeps the best checkpoint so far (the
    version is then marked ``interrupted``). Up to ``compare_max_train`` training pairs the
    small-data rule of :mod:`training.selection` applies (0: never): at least its number of
    steps, and when there is a parent, the best of fine-tuning it, its encoder with a fresh
    decoder, and from scratch. ``start``: ``"auto"`` by that rule (else fine-tune when there is a
    parent); ``"finetune"``, ``"decoder"`` or ``"scratch"`` force one. ``on_candidate(start, model)``
    is called with each candidate once fitted (the learning-curve benchmark measures them all).
    ``width``: the filters of a model built from scratch without a parent (a parent's own otherwise).
    """
    started = time.perf_counter()
    if epochs < 1 or batch_size < 1 or patience < 0 or learning_rate < 0 or compare_max_train < 0:
        raise ValueError("epochs and batch_size must be >= 1, patience, learning_rate and compare_max_train >= 0")
    if start not in ("auto", *STARTS):
        raise ValueError(f"start must be auto, {', '.join(STARTS)} (got {start!r})")
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
    model: keras.Model | None = None
    if parent is not None or base is not None:
        parent_model = store.load_model(parent) if parent is not None else load_base_model(base)
        size = check_image_size(image_size or model_image_size(parent_model))
        model = rebuild_at_size(parent_model, size)
    else:
        size = check_image_size(image_size or DEFAULT_IMAGE_SIZE)

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
    small = len(split.train) <= compare_max_train
    budget = small_data_budget(len(split.train), batch_size, epochs) if small else Budget(batch_size, 1, patience)
    starts = starts_to_try(start, small=small, has_parent=model is not None)
    candidates = _candidate_models(starts, model, size, width)
    if len(starts) > 1:
        log.info("small training set: fitting %s and keeping the best on the validation split", ", ".join(starts))

    version_id = store.new_version_id()
    with store.staging(version_id) as staged:
        fitted: list[_Fitted] = []
        interrupted = False
        fit_started = time.perf_counter()
        for name, candidate in candidates:
            log.info("%s at %d×%d", _start_text(name, parent, base), size, size)
            outcome = _fit_candidate(candidate, name, staged, split, size=size, budget=budget, epochs=epochs,
                                     learning_rate=learning_rate, seed=seed, flip=flip, workers=workers,
                                     verbose=verbose, callbacks=callbacks, skipped=skipped)
            if outcome is not None:
                fitted.append(outcome)
                if on_candidate is not None:
                    on_candidate(name, outcome.model)
            if outcome is None or outcome.interrupted:
                interrupted = True  # Ctrl-C: no further candidate; keep the best one so far
                break
        fit_seconds = time.perf_counter() - fit_started
        if not fitted:
            raise FitInterrupted("interrupted before the first epoch ended: no version was written")
        kept = [next(f for f in fitted if f.candidate is c) for c in to_keep([f.candidate for f in fitted])]
        # History, best epoch and early stopping are the first (best) kept fit's.
        checkpoint, stopper, best, result = kept[0].checkpoint, kept[0].stopper, kept[0].model, kept[0].result
        start = kept_name([f.candidate for f in kept])
        choice = ({"start": start, "candidates": {f.candidate.start: f.candidate.to_dict() for f in fitted}}
                  if len(starts) > 1 else None)
        val_loss = checkpoint.best
        if len(kept) > 1:
            best, result, val_loss = _average(kept, split, size=size, budget=budget, skipped=skipped, verbose=verbose)
            best.save(staged / MODEL_FILE)
            choice["average"] = {"val_foreground_iou": result.foreground_iou, "val_loss": val_loss}
            log.info("keeping the average of %s: validation foreground IoU %.4f, loss %.4f",
                     " and ".join(f.candidate.start for f in kept), result.foreground_iou, val_loss)
        else:
            os.replace(checkpoint.path, staged / MODEL_FILE)
        for outcome in fitted:
            outcome.checkpoint.path.unlink(missing_ok=True)
        epochs_run = len(checkpoint.history.get("loss", []))
        eval_started = time.perf_counter()
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
                "start": start,
                "start_choice": choice,
                "val_foreground_iou": result.foreground_iou,
                "val_per_class_iou": result.per_class_iou,
                "val_pixel_accuracy": result.pixel_accuracy,
                "val_loss": val_loss,
                "best_epoch": checkpoint.best_epoch,
                "epochs_run": epochs_run,
                "early_stopped": bool(stopper.stopped_epoch),
                "interrupted": interrupted,
                "history": checkpoint.history,
                "params": {"image_size": size, "batch_size": budget.batch_size, "learning_rate": learning_rate,
                           "epochs": epochs, "patience": budget.patience, "seed": seed, "flip": flip,
                           "repeat": budget.repeat, "small_data_rule": small, "compare_max_train": compare_max_train},
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
                    "train_images_per_s": round(len(split.train) * budget.repeat * epochs_run / max(fit_seconds, 1e-9), 2),
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
        start=start, start_choice=metrics["start_choice"],
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
