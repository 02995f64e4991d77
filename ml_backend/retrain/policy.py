"""When to train: which webhooks count as accepted changes, and when enough of them have arrived.

Pure functions over :class:`~ml_backend.retrain.state.ProjectState`; no I/O.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ml_backend.retrain.spec import MIN_USABLE_PAIRS
from ml_backend.retrain.state import ProjectState
from ml_backend.security.limits import project_id
from ml_backend.settings import Settings
from ml_backend.trimaps import has_mask_result, is_accepted

START_TRAINING = "START_TRAINING"
ANNOTATION_EVENTS = frozenset({"ANNOTATION_CREATED", "ANNOTATION_UPDATED", "ANNOTATIONS_CREATED"})
DELETION_EVENTS = frozenset({"ANNOTATION_DELETED", "ANNOTATIONS_DELETED"})


def project_key(value: object) -> int | None:
    """A project's canonical id from a webhook's ``project`` (object or id) or ``/setup``'s ``"<id>.<ts>"``.

    The rule is :func:`ml_backend.security.limits.project_id`: ``"01"``, ``1`` and ``"1.1700000000"`` are
    the same project; negative, boolean, empty, out-of-range values and other scripts' digits (``"١"``)
    are no project.
    """
    key = project_id(value)
    return None if key is None else int(key)


def _annotations(payload: dict) -> list:
    if isinstance(payload.get("annotation"), dict):
        return [payload["annotation"]]
    annotations = payload.get("annotations")
    return annotations if isinstance(annotations, list) else []


def _task_id(payload: dict, annotation: dict) -> int | None:
    task = annotation.get("task", payload.get("task"))
    if isinstance(task, dict):
        task = task.get("id")
    return task if isinstance(task, int) and not isinstance(task, bool) and task >= 0 else None


@dataclass(frozen=True)
class Changes:
    """What one webhook changes: accepted annotations counted, tasks known to hold one, tasks that may not."""

    count: int = 0
    added: tuple[int, ...] = ()
    removed: tuple[int, ...] = ()


def accepted_changes(event: str, payload: dict, *, ground_truth_only: bool) -> Changes:
    """The accepted annotation changes a webhook brings.

    Created or updated: the annotations that are accepted now and hold a mask region (an edit of
    training data). Deleted: every deleted annotation (it may have been training data; the next
    export tells). Cancelling or un-marking ground truth is not counted.
    """
    annotations = [a for a in _annotations(payload) if isinstance(a, dict)]
    if event in DELETION_EVENTS:
        removed = tuple(t for a in annotations if (t := _task_id(payload, a)) is not None)
        return Changes(max(1, len(_annotations(payload))), (), removed)
    if event in ANNOTATION_EVENTS:
        accepted = [a for a in annotations
                    if is_accepted(a, ground_truth_only=ground_truth_only) and has_mask_result(a.get("result"))]
        added = tuple(t for a in accepted if (t := _task_id(payload, a)) is not None)
        return Changes(len(accepted), added, ())
    return Changes()


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(timestamp))


@dataclass(frozen=True)
class TrainingPolicy:
    """Train when ``min_annotations`` accepted changes arrived and ``min_interval_s`` passed since the
    last training ended; with ``schedule_s`` > 0 also every ``schedule_s`` when anything changed.

    Never starts a job without the data to split into training and validation images, and after
    failures waits ``backoff_s`` × 2^(failures − 1) (at most ``backoff_max_s``) before retrying.
    A forced trigger (Start Training) skips the threshold, interval and back-off, not the data check.
    """

    min_annotations: int = 10
    min_interval_s: float = 600.0
    schedule_s: float = 0.0
    backoff_s: float = 300.0
    backoff_max_s: float = 6 * 3600.0

    @classmethod
    def from_settings(cls, settings: Settings) -> "TrainingPolicy":
        return cls(settings.retrain_min_annotations, settings.retrain_min_interval_min * 60,
                   settings.retrain_schedule_min * 60, settings.retrain_backoff_min * 60,
                   settings.retrain_backoff_max_min * 60)

    def retry_after(self, state: ProjectState) -> float | None:
        """When the back-off after the last failures ends (None: no back-off)."""
        if state.failures <= 0 or state.last_finished_at is None:
            return None
        delay = min(self.backoff_max_s, self.backoff_s * 2 ** min(state.failures - 1, 32))
        return state.last_finished_at + delay

    def blocker(self, state: ProjectState, now: float, *, forced: bool = False) -> str | None:
        """Why no job may start now (None: one may)."""
        if state.running:
            return "a training job is running"
        known = len(state.tasks)
        asked = forced or state.pending or state.retry  # Start Training, its follow-up or its retry
        if known < MIN_USABLE_PAIRS and not (asked and state.usable is None):  # never exported: let one look
            source = "the last export and webhooks since" if state.usable is not None else "webhooks"
            return (f"not enough data: {source} show {known} task(s) with an accepted brush annotation; training "
                    f"needs at least {MIN_USABLE_PAIRS} (one to train on, one to validate)")
        if forced:
            return None
        retry_at = self.retry_after(state)
        if retry_at is not None and now < retry_at:
            return f"backing off after {state.failures} failed training(s): next attempt after {_when(retry_at)}"
        if state.last_finished_at is not None and now - state.last_finished_at < self.min_interval_s:
            return f"minimum interval: next training after {_when(state.last_finished_at + self.min_interval_s)}"
        return None

    def wanted(self, state: ProjectState, now: float) -> str | None:
        """Why a training is wanted (threshold, schedule, follow-up, retry), whether or not it may start now."""
        if state.pending:
            return "follow-up of triggers during the last run"
        if state.retry:
            return f"retry after {state.failures} failed training(s)"
        if state.changes <= 0:
            return None
        if state.changes >= max(1, self.min_annotations):
            return f"{state.changes} new accepted annotation(s)"
        since = float("inf") if state.last_finished_at is None else now - state.last_finished_at
        if self.schedule_s > 0 and since >= self.schedule_s:
            return f"schedule (every {self.schedule_s / 60:g} min, {state.changes} change(s))"
        return None

    def due(self, state: ProjectState, now: float) -> str | None:
        """Why a training should start now, or None (also None while one runs: see coalescing)."""
        if state.running:
            return None
        why = self.wanted(state, now)
        return why if why is not None and self.blocker(state, now) is None else None

    def explain(self, state: ProjectState, now: float) -> str | None:
        """For ``/is_training``: why nothing is training now although something may be wanted."""
        if state.running:
            return None
        if self.wanted(state, now) is None:
            missing = max(1, self.min_annotations) - state.changes
            return f"waiting for {missing} more accepted annotation(s)" if missing > 0 else None
        return self.blocker(state, now)
