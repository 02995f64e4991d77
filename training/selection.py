"""The rule for fits on a small training set: a step budget, and the best of three starts.

A base model trained on another domain can be worse than no model: fine-tuned for the few
optimizer steps that a handful of images give (one batch per epoch), it keeps predicting what it
learned elsewhere, and nothing it produces beats predicting all foreground. From scratch, the
same few steps learn little either. So, while the training split is small (at most
``compare_max_train`` pairs):

1. **Budget.** Every fit gets at least :data:`MIN_STEPS` optimizer steps: an epoch repeats the few
   training pairs (each repeat with its own flips) until it holds ``ceil(MIN_STEPS / epochs)``
   batches, and a batch is no larger than the training set. Early stopping is off: a validation
   loss over one or two images is too noisy to stop on.
2. **Starts.** When there is a parent (the current version, or the base model), three candidates
   are fitted on the training split with that budget: fine-tuning the parent (:data:`FINETUNE`),
   the parent's encoder with a freshly initialised decoder (:data:`DECODER`: keeps the generic
   features, forgets what the old domain's object looked like), and from scratch (:data:`SCRATCH`).
3. **Choice.** Candidates are ranked by foreground IoU on the validation split that the promotion
   rule uses; candidates within :data:`TIE` of the best count as tied, and the tie goes to the
   lowest validation loss (a smoother measure than the IoU of one or two images). The version kept
   is the **average of the two best** (:func:`training.model.average_of`: the mean of their
   logits), or the best alone when either of the two learned nothing on the validation split
   (IoU 0) or is itself an average (an average never holds more than two fits). It then meets the
   promotion rule (:mod:`training.fit`) like any other version.

Why the average: on a handful of images two fits of the same start differ by more than the starts
do, so which candidate a one- or two-image validation split ranks first is partly luck. Keeping the
best alone stakes everything on that ranking; averaging the two best spreads the stake over two fits,
and an average of two fits is steadier than either. The price is serving and fine-tuning two fits
instead of one (the trimap model is small beside SAM). Measured in ``docs/first-annotations.md``.

Why this and not cross-validation: a 2-fold estimate on ten images judges every start by models
trained on five, a different problem from the one the final fit solves, and costs two extra fits
per start (an earlier version of this rule did that). Fitting each candidate once and judging it on
the promotion's own validation split costs one fit per start, makes the kept version exactly the
one that was judged, and keeps the comparison with the current version fair (no version of the
lineage trains on those images).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import keras
from keras.layers import Conv2DTranspose

MIN_STEPS = 150  # optimizer steps every fit of a small training set gets at least
FINETUNE, DECODER, SCRATCH = "finetune", "decoder", "scratch"
STARTS = (FINETUNE, DECODER, SCRATCH)  # also the order of preference on a full tie
TIE = 0.005  # validation IoUs this close count as equal


@dataclass(frozen=True)
class Budget:
    """How a training set is fitted: batch size, repeats per epoch, early-stopping patience."""

    batch_size: int
    repeat: int
    patience: int


def small_data_budget(train_count: int, batch_size: int, epochs: int) -> Budget:
    """At least :data:`MIN_STEPS` steps over ``epochs`` epochs; no early stopping."""
    batch = max(1, min(batch_size, train_count))
    steps_per_epoch = math.ceil(MIN_STEPS / epochs)
    repeat = max(1, math.ceil(steps_per_epoch * batch / train_count))
    return Budget(batch, repeat, patience=epochs)


def starts_to_try(start: str, *, small: bool, has_parent: bool) -> tuple[str, ...]:
    """The candidates a fit trains: ``start`` is ``"auto"`` (the rule) or one of :data:`STARTS` (forced)."""
    if not has_parent:
        return (SCRATCH,)
    if start != "auto":
        return (start,)
    return STARTS if small else (FINETUNE,)


def with_fresh_decoder(parent: keras.Model, fresh: keras.Model) -> keras.Model:
    """``fresh`` with the encoder weights of ``parent`` (same architecture): every layer before the
    first transposed convolution comes from the parent, the decoder keeps its fresh initialisation."""
    for source, target in zip(parent.layers, fresh.layers):
        if isinstance(target, Conv2DTranspose):
            break
        target.set_weights(source.get_weights())
    return fresh


@dataclass(frozen=True)
class Candidate:
    """One start, fitted on the training split and judged on the validation split."""

    start: str
    val_foreground_iou: float
    val_loss: float
    best_epoch: int
    averaged: bool = False  # the fit is already an average (fine-tuning an averaged parent)

    def to_dict(self) -> dict[str, float | int]:
        return {"val_foreground_iou": self.val_foreground_iou, "val_loss": self.val_loss,
                "best_epoch": self.best_epoch}


def choose(candidates: Sequence[Candidate]) -> Candidate:
    """The highest validation IoU; within :data:`TIE` of it the lowest validation loss, then :data:`STARTS` order."""
    if not candidates:
        raise ValueError("no candidate to choose from")
    best = max(c.val_foreground_iou for c in candidates)
    tied = [c for c in candidates if c.val_foreground_iou >= best - TIE]
    return min(tied, key=lambda c: (c.val_loss, STARTS.index(c.start)))


def to_keep(candidates: Sequence[Candidate]) -> tuple[Candidate, ...]:
    """The candidates whose average is kept, best first: the two best by :func:`choose`, or the best alone
    when there is one candidate, when either of the two scored 0 on the validation split, or when either is
    already an average."""
    best = choose(candidates)
    rest = [c for c in candidates if c is not best]
    if not rest:
        return (best,)
    second = choose(rest)
    if best.averaged or second.averaged or min(best.val_foreground_iou, second.val_foreground_iou) <= 0:
        return (best,)
    return best, second


def kept_name(kept: Sequence[Candidate]) -> str:
    """The ``start`` a version reports: one start, or the averaged starts joined by ``+`` (best first)."""
    return "+".join(c.start for c in kept)
