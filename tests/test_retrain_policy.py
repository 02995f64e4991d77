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
    ({"id": 7}, 7), (7, 7), ("7.1700000000", 7), ("12", 12), ("012", 12), ("\u0661\u0662", None), ("x.1", None),
    (None, None), (True, None), ({"title": "no id"}, None), (-1, None), (2**64, None), ("", None), (7.0, None),
])
def test_project_key(value, key):
    assert project_key(value) == key


def test_accepted_changes():
    def count(*args, **kwargs) -> int:
        return accepted_changes(*args, **kwargs).count

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
    assert policy.due(ProjectState(tasks=[1, 2], changes=2), now=1000) is None
    assert "3 new" in policy.due(ProjectState(tasks=[1, 2], changes=3), now=1000)  # never trained: no interval to wait
    assert policy.due(ProjectState(tasks=[1, 2], changes=5, last_finished_at=500), now=1000) is None  # 500 s < 600 s
    assert policy.due(ProjectState(tasks=[1, 2], changes=5, last_finished_at=400), now=1000) is not None
    assert policy.due(ProjectState(tasks=[1, 2], changes=5, running=True), now=1000) is None


def test_schedule_needs_some_change():
    policy = TrainingPolicy(min_annotations=10, min_interval_s=0, schedule_s=3600)
    assert policy.due(ProjectState(tasks=[1, 2], changes=0, last_finished_at=0), now=10_000) is None
    assert "schedule" in policy.due(ProjectState(tasks=[1, 2], changes=1, last_finished_at=0), now=10_000)
    assert policy.due(ProjectState(tasks=[1, 2], changes=1, last_finished_at=9_000), now=10_000) is None
    assert TrainingPolicy(min_annotations=10, schedule_s=0).due(ProjectState(tasks=[1, 2], changes=1, last_finished_at=0),
                                                                now=10**9) is None


def test_changes_name_the_tasks_that_hold_training_data():
    created = accepted_changes("ANNOTATION_CREATED", payload("ANNOTATION_CREATED"), ground_truth_only=False)
    assert created.added == (1,) and created.removed == ()
    deleted = accepted_changes("ANNOTATION_DELETED", {"annotation": {"id": 3, "task": 9}}, ground_truth_only=False)
    assert deleted.removed == (9,) and deleted.added == ()


def test_no_start_without_two_known_tasks_and_back_off_after_failures():
    policy = TrainingPolicy(min_annotations=1, min_interval_s=0, backoff_s=60, backoff_max_s=200)
    one = ProjectState(changes=3, tasks=[5])
    assert policy.due(one, now=10) is None and "not enough data" in policy.explain(one, now=10)
    assert policy.blocker(one, now=10, forced=True) is None  # never exported: Start Training may look
    one.usable = 1
    assert "not enough data" in policy.blocker(one, now=10, forced=True)
    failed = ProjectState(changes=0, tasks=[1, 2], failures=2, retry=True, last_finished_at=1000)
    assert policy.retry_after(failed) == 1120 and policy.due(failed, now=1119) is None
    assert policy.due(failed, now=1120) == "retry after 2 failed training(s)"
    assert policy.retry_after(ProjectState(failures=9, last_finished_at=0)) == 200
