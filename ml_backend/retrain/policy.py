"""When to train: which webhooks count as accepted changes, and when enough of them have arrived.

Pure functions over :class:`~ml_backend.retrain.state.ProjectState`; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from ml_backend.retrain.state import ProjectState
from ml_backend.security.limits import project_id
from ml_backend.settings import Settings
from ml_backend.trimaps import has_mask_result, is_accepted

START_TRAINING = "START_TRAINING"
ANNOTATION_EVENTS = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED"})
DELETION_EVENTS = frozenset({"ANNOTATION_DELETED", "ANNOTATIONS_DELETED"})


def project_key(value: object) -> str | None:
    """A project's canonical id from a webhook's ``project`` (object or id) or ``/setup``'s ``"<id>.<ts>"``."""
    return project_id(value)


def _annotations(payload: dict) -> list:
    if isinstance(payload.get("annotation"), dict):
        return [payload["annotation"]]
    annotations = payload.get("annotations")
    return annotations if isinstance(annotations, list) else []


def accepted_changes(event: str, payload: dict, *, ground_truth_only: bool) -> int:
    """How many accepted annotation changes a webhook brings.

    Created or updated: the annotations that are accepted now and hold a mask region (an edit of
    training data). Deleted: every deleted annotation (it may have been training data; the next
    export tells). Cancelling or un-marking ground truth is not counted.
    """
    if event in DELETION_EVENTS:
        return max(1, len(_annotations(payload)))
    if event in ANNOTATION_EVENTS:
        return sum(1 for a in _annotations(payload)
                   if is_accepted(a, ground_truth_only=ground_truth_only) and has_mask_result(a.get("result")))
    return 0


@dataclass(frozen=True)
class TrainingPolicy:
    """Train when ``min_annotations`` accepted changes arrived and ``min_interval_s`` passed since the
    last training ended; with ``schedule_s`` > 0 also every ``schedule_s`` when anything changed."""

    min_annotations: int = 10
    min_interval_s: float = 600.0
    schedule_s: float = 0.0

    @classmethod
    def from_settings(cls, settings: Settings) -> "TrainingPolicy":
        return cls(settings.retrain_min_annotations, settings.retrain_min_interval_min * 60,
                   settings.retrain_schedule_min * 60)

    def due(self, state: ProjectState, now: float) -> str | None:
        """Why a training should start now, or None (also None while one runs: see coalescing)."""
        if state.running or state.changes <= 0:
            return None
        since = float("inf") if state.last_finished_at is None else now - state.last_finished_at
        if state.changes >= max(1, self.min_annotations) and since >= self.min_interval_s:
            return f"{state.changes} new accepted annotation(s)"
        if self.schedule_s > 0 and since >= self.schedule_s:
            return f"schedule (every {self.schedule_s / 60:g} min, {state.changes} change(s))"
        return None
