"""Issue 21, item 9: a prediction Label Studio refuses (``POST /api/predictions`` failing) is that task's
failure: counted and logged, and the project job goes on with the other tasks. Only Label Studio refusing
every prediction, one after the other, stops the job (as failed, with the reason)."""

from __future__ import annotations

import logging
from pathlib import Path

from ml_backend.sam3.job import MAX_REFUSED_IN_A_ROW, JobContext, ProjectPreannotationJobs
from test_sam3_job import TOKEN, VERSION, fake_api


def run(url: str, state: Path) -> tuple[dict, list[int]]:
    predicted: list[int] = []

    def predict(task: dict, label_config: str, project: int) -> dict:
        predicted.append(task["id"])
        return {"result": [{"value": {"task": task["id"]}}], "score": 0.5, "model_version": VERSION}

    jobs = ProjectPreannotationJobs(JobContext(access=lambda: (url, TOKEN), predict=predict,
                                               model_version=lambda project: VERSION), state)
    jobs.start(7)
    assert jobs.wait_idle(30)
    return jobs.status()["projects"]["7"], predicted


def test_a_refused_prediction_fails_only_its_task(tmp_path: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING), fake_api(5, [], refuse={2}) as (url, stored):
        progress, predicted = run(url, tmp_path / "jobs.json")
    assert predicted == [1, 2, 3, 4, 5]
    assert [p["task"] for p in stored] == [1, 3, 4, 5]
    assert all(p["result"] == [{"value": {"task": p["task"]}}] for p in stored)
    assert (progress["state"], progress["written"], progress["failed"], progress["error"]) == ("done", 4, 1, "")
    assert "task 2: Label Studio did not store its SAM 3 prediction" in caplog.text and "HTTP 500" in caplog.text


def test_label_studio_refusing_every_prediction_stops_the_job_with_the_reason(tmp_path: Path) -> None:
    with fake_api(3 * MAX_REFUSED_IN_A_ROW, [], refuse=None) as (url, stored):
        progress, predicted = run(url, tmp_path / "jobs.json")
    assert stored == [] and len(predicted) == MAX_REFUSED_IN_A_ROW  # not an hour of SAM 3 for nothing
    assert progress["state"] == "failed" and progress["failed"] == MAX_REFUSED_IN_A_ROW
    assert f"refused {MAX_REFUSED_IN_A_ROW} predictions in a row" in progress["error"]
    assert "HTTP 500" in progress["error"]
