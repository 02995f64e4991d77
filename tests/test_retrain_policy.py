"""When to train: which webhooks count, thresholds, interval and schedule."""

from __future__ import annotations

import pytest

from ml_backend.retrain.policy import TrainingPolicy, accepted_changes, project_key
from ml_backend.retrain.state import ProjectState

BRUSH = [{"type": "brushlabels", "value": {"format": "rle", "rle": [0], "brushlabels": ["Pet"]}}]
POINT = [{"type": "keypointlabels", "value": {"x": 1, "y": 1, "keypointlabels": ["Pet"]}}]


def payload(action: str, **annotation) -> dict:
    return {"action": action, "project": {"id": 7, "title": "p"}, "task": {"id": 1},
            "annotation": {"id": 1, "result": BRUSH, "was_cancelled": False, "ground_truth": False, **annotation}}


@pytest.mark.parametrize("value, key", [
    ({"id": 7}, "7"), (7, "7"), ("7.1700000000", "7"), ("12", "12"), ("x.1", None), (None, None), (True, None),
    ({"title": "no id"}, None), (-1, None),
])
def test_project_key(value, key):
    assert project_key(value) == key


def test_accepted_changes():
    count = accepted_changes
    assert count("ANNOTATION_CREATED", payload("ANNOTATION_CREATED"), ground_truth_only=False) == 1
    assert count("ANNOTATION_UPDATED", payload("ANNOTATION_UPDATED"), ground_truth_only=False) == 1
    assert count("ANNOTATION_CREATED", payload("ANNOTATION_CREATED", was_cancelled=True), ground_truth_only=False) == 0
    assert count("ANNOTATION_CREATED", payload("ANNOTATION_CREATED", result=POINT), ground_truth_only=False) == 0
    assert count("ANNOTATION_CREATED", payload("ANNOTATION_CREATED"), ground_truth_only=True) == 0
    assert count("ANNOTATION_CREATED", payload("ANNOTATION_CREATED", ground_truth=True), ground_truth_only=True) == 1
    assert count("ANNOTATION_DELETED", {"action": "ANNOTATION_DELETED", "annotation": {"id": 3}},
                 ground_truth_only=False) == 1
    assert count("ANNOTATIONS_DELETED", {"annotations": [{"id": 3}, {"id": 4}]}, ground_truth_only=False) == 2
    assert count("TASKS_CREATED", {"tasks": [{"id": 1}]}, ground_truth_only=False) == 0
    assert count("ANNOTATION_CREATED", {"annotation": "junk"}, ground_truth_only=False) == 0


def test_threshold_and_interval():
    policy = TrainingPolicy(min_annotations=3, min_interval_s=600)
    assert policy.due(ProjectState(changes=2), now=1000) is None
    assert "3 new" in policy.due(ProjectState(changes=3), now=1000)  # never trained: no interval to wait
    assert policy.due(ProjectState(changes=5, last_finished_at=500), now=1000) is None  # 500 s < 600 s
    assert policy.due(ProjectState(changes=5, last_finished_at=400), now=1000) is not None
    assert policy.due(ProjectState(changes=5, running=True), now=1000) is None


def test_schedule_needs_some_change():
    policy = TrainingPolicy(min_annotations=10, min_interval_s=0, schedule_s=3600)
    assert policy.due(ProjectState(changes=0, last_finished_at=0), now=10_000) is None
    assert "schedule" in policy.due(ProjectState(changes=1, last_finished_at=0), now=10_000)
    assert policy.due(ProjectState(changes=1, last_finished_at=9_000), now=10_000) is None
    assert TrainingPolicy(min_annotations=10, schedule_s=0).due(ProjectState(changes=1, last_finished_at=0),
                                                                now=10**9) is None
