"""The rule for a project's first fits: how long to train on a handful of images, and from which start.

A base model trained on another domain can be worse than no model: fine-tuned for the few
optimizer steps that a handful of images give (one batch per epoch), it keeps predicting what it
learned elsewhere, and nothing it produces beats predicting all foreground. From scratch, the
same few steps learn little either. So, while the training split is small (at most
``compare_max_train`` pairs):

1. **Budget.** Every fit gets at least :data:`MIN_STEPS` optimizer steps: an epoch repeats the few
   training pairs (each repeat with its own flips) until it holds ``ceil(MIN_STEPS / epochs)``
   batches, and a batch is no larger than the training set. Early stopping is off: a validation
   loss over one or two images is too noisy to stop on.
2. **Start.** Two starts are compared, fine-tuning the parent (the current version, or the base
   model) and fitting from scratch, by k-fold cross-validation over all usable pairs
   (:data:`FOLDS` folds, or one per pair when fewer): each start is fitted on k-1 folds and
   predicts the held-out one, and the foreground IoU of those out-of-fold predictions, pooled over
   every image, is its estimate. The better start (fine-tuning on a tie) is then fitted on the
   training split, and that version meets the promotion rule (:mod:`training.fit`) like any other.

Cross-validation rather than the validation split because that split holds 20 % of the pairs:
one image at 5 to 9 annotations, too few to choose by. The promotion rule still uses the
validation split, which no version of the lineage has trained on, so the comparison with the
current version stays fair. The estimate of fine-tuning a project version is optimistic on pairs
that version was trained on; that only favours the start that was already the default.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import keras
import numpy as np

from training.data import Pair, seeded_rank
from training.evaluation import confusion_matrix, report
from training.model import NUM_CLASSES, compile_model
from training.pipeline import SkipLog, TrimapDataset

log = logging.getLogger(__name__)

MIN_STEPS = 60  # optimizer steps every fit of a small training set gets at least
FOLDS = 2
FINETUNE, SCRATCH = "finetune", "scratch"


@dataclass(frozen=True)
class Budget:
    """How a small training set is fitted: batch size, repeats per epoch, early-stopping patience."""

    batch_size: int
    repeat: int
    patience: int


def small_data_budget(train_count: int, batch_size: int, epochs: int) -> Budget:
    """At least :data:`MIN_STEPS` steps over ``epochs`` epochs; no early stopping."""
    batch = max(1, min(batch_size, train_count))
    steps_per_epoch = math.ceil(MIN_STEPS / epochs)
    repeat = max(1, math.ceil(steps_per_epoch * batch / train_count))
    return Budget(batch, repeat, patience=epochs)


def folds(pairs: Sequence[Pair], count: int, seed: int) -> list[list[Pair]]:
    """``count`` folds (at most one per pair) in seeded hash order, as even as can be."""
    ordered = sorted(pairs, key=lambda p: seeded_rank(p.stem, seed))
    count = max(2, min(count, len(ordered)))
    return [ordered[i::count] for i in range(count)]


@dataclass(frozen=True)
class StartChoice:
    start: str  # FINETUNE or SCRATCH
    estimates: dict[str, float]  # cross-validated foreground IoU of each start
    images: int  # images the estimates pool over

    def to_dict(self) -> dict[str, object]:
        return {"start": self.start, "cv_foreground_iou": self.estimates, "cv_images": self.images,
                "folds": FOLDS}


def cross_validated_iou(make_model: Callable[[], keras.Model], pairs: Sequence[Pair], *, size: int,
                        batch_size: int, epochs: int, learning_rate: float, seed: int, flip: bool,
                        workers: int | None, callbacks: Sequence[keras.callbacks.Callback] = (),
                        skipped: SkipLog | None = None) -> tuple[float, int]:
    """(pooled out-of-fold foreground IoU, images counted) of fitting ``make_model()`` with the small-data budget."""
    skipped = skipped if skipped is not None else SkipLog()
    matrix = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
    counted = 0
    for index, held_out in enumerate(folds(pairs, FOLDS, seed)):
        train = [p for p in pairs if p not in held_out]
        budget = small_data_budget(len(train), batch_size, epochs)
        model = compile_model(make_model(), learning_rate)
        data = TrimapDataset(train, size, budget.batch_size, shuffle=True, flip=flip, seed=seed + index,
                             skipped=skipped, workers=workers, repeat=budget.repeat)
        model.fit(data, epochs=epochs, verbose=0, callbacks=list(callbacks))
        fold_matrix, fold_count = confusion_matrix(model, held_out, skipped=skipped)
        matrix += fold_matrix
        counted += fold_count
    return report(matrix, counted).foreground_iou, counted


def choose_start(parent: keras.Model, fresh: Callable[[], keras.Model], pairs: Sequence[Pair], *, size: int,
                 batch_size: int, epochs: int, learning_rate: float, seed: int, flip: bool,
                 workers: int | None, callbacks: Sequence[keras.callbacks.Callback] = (),
                 skipped: SkipLog | None = None) -> StartChoice:
    """Fine-tune ``parent`` or fit ``fresh()`` from scratch, by cross-validation over ``pairs``."""
    starts: dict[str, Callable[[], keras.Model]] = {
        FINETUNE: lambda: _copy(parent),
        SCRATCH: fresh,
    }
    estimates: dict[str, float] = {}
    images = 0
    for name, make in starts.items():
        estimates[name], images = cross_validated_iou(
            make, pairs, size=size, batch_size=batch_size, epochs=epochs, learning_rate=learning_rate, seed=seed,
            flip=flip, workers=workers, callbacks=callbacks, skipped=skipped)
        log.info("start %s: cross-validated foreground IoU %.4f over %d images", name, estimates[name], images)
    start = SCRATCH if estimates[SCRATCH] > estimates[FINETUNE] else FINETUNE
    return StartChoice(start, estimates, images)


def _copy(model: keras.Model) -> keras.Model:
    """A model with the same architecture and weights, trained independently of ``model``."""
    copy = keras.models.clone_model(model)
    copy.set_weights(model.get_weights())
    return copy
