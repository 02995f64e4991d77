"""Webhooks, ``/train`` and ``/is_training`` through the app (Flask's test client), in-process jobs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ml_backend.app import create_app
from ml_backend.runtime import Runtime
from ml_backend.settings import Settings
from test_retrain import BRUSH, GatedJobs, created, gated  # noqa: F401  (fixture)


class StubEngine:
    source = "stub"
    cache: dict = {}
    store = None  # no embedding store


@pytest.fixture
def app_and_runtime(tmp_path: Path):
    settings = dataclasses.replace(Settings(), model_dir=tmp_path / "models", image_cache_dir=tmp_path / "cache",
                                   label_studio_url="http://ls", label_studio_api_key="key",
                                   retrain_min_annotations=2, retrain_min_interval_min=0)
    runtime = Runtime(settings, engine=StubEngine())
    runtime.retrainer.close()  # no ticker: the test drives everything
    return create_app(settings, runtime=runtime).test_client(), runtime


def test_webhooks_count_then_start_and_status_shows_it(app_and_runtime, gated: GatedJobs):
    client, runtime = app_and_runtime
    ignored = client.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": 4}, "tasks": []})
    assert ignored.status_code == 200 and ignored.json["status"] == "ignored"
    assert client.post("/webhook", json=created(4)).json["status"] == "counted"
    assert client.get("/is_training?project=4.1700000000").json["accepted_changes"] == 1
    answer = client.post("/webhook", json=created(4))
    assert answer.status_code == 200 and answer.json["status"] == "started"
    assert gated.started.acquire(timeout=10)
    status = client.get("/is_training?project=4").json
    assert status["is_training"] and status["job_id"] == answer.json["job_id"]
    assert client.post("/train", json={"project": "4.1700000000"}).json["status"] == "queued"
    gated.release.release()
    gated.release.release()
    runtime.retrainer.executor.join(30)
    runtime.retrainer.executor.join(30)  # the follow-up started from the first job's thread
    status = client.get("/is_training?project=4").json
    assert not status["is_training"] and status["trainings"] == 2 and gated.calls[0] == "2 new accepted annotation(s)"
    overview = client.get("/is_training").json
    assert set(overview["projects"]) == {"4"} and not overview["is_training"]


def test_malformed_webhooks_get_clear_answers(app_and_runtime):
    client, _ = app_and_runtime
    assert client.post("/webhook", data="nope").status_code == 415  # JSON bodies only
    assert client.post("/webhook", data="nope", content_type="application/json").status_code == 400
    answer = client.post("/webhook", json={"action": "ANNOTATION_CREATED", "annotation": {"result": BRUSH}})
    assert answer.status_code == 200 and "no project id" in answer.json["reason"]
