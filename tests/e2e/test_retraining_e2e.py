"""Retraining end to end: a real Label Studio 1.23.2, Redis, our backend and an RQ worker.

Annotations posted to Label Studio reach the backend as webhooks; the third accepted one
starts a job that the worker runs (export through Label Studio's API, tiny fit, promotion);
"Retrieve Predictions" then gets predictions from the new version without a restart. Two
"Start Training" clicks during a run give one run and one coalesced follow-up, fine-tuned
from the current version.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from e2e.servers import REPO, Backend, LabelStudio, stop
from fake_label_studio import brush_result, pet_image
from processes import wait_for
from redis_fixture import redis_server  # noqa: F401  (fixture)

pytestmark = pytest.mark.redis

LABEL_CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image"><Label value="Pet"/></BrushLabels>
  <KeyPointLabels name="click" toName="image" smart="true"><Label value="Pet" smart="true"/></KeyPointLabels>
</View>
"""
SIZE = 48


def png(index: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pet_image(index, SIZE)[0]).save(buffer, format="PNG")
    return buffer.getvalue()


def brush(index: int) -> dict:
    return {**brush_result(pet_image(index, SIZE)[1]), "from_name": "mask"}


@pytest.fixture(scope="module")
def setup(e2e_dir: Path, label_studio: LabelStudio, backend_factory, redis_server) -> Iterator[dict]:
    model_dir = e2e_dir / "retraining-models"
    env = {"REDIS_URL": redis_server, "MODEL_DIR": str(model_dir), "RETRAIN_MIN_ANNOTATIONS": "3",
           "RETRAIN_MIN_INTERVAL_MIN": "0", "RETRAIN_IMAGE_SIZE": "32", "RETRAIN_EPOCHS": "2",
           "RETRAIN_BATCH_SIZE": "2"}
    backend = backend_factory(**env)
    log = e2e_dir / "rq-worker.log"
    worker = subprocess.Popen(
        [sys.executable, "-m", "ml_backend.retrain.worker"], cwd=REPO, stdout=log.open("wb"),
        stderr=subprocess.STDOUT, env={**os.environ, **env, "IMAGE_CACHE_DIR": str(e2e_dir / "worker-cache")})
    try:
        yield {"backend": backend, "model_dir": model_dir, "worker_log": log}
    finally:
        stop(worker)


def status(backend: Backend, project: int) -> dict:
    answer = backend.get(f"/is_training?project={project}")
    assert answer.status_code == 200, answer.text
    return answer.json()


def test_webhooks_train_promote_predict_and_coalesce(label_studio: LabelStudio, setup) -> None:
    backend: Backend = setup["backend"]
    project = label_studio.ok("POST", "/api/projects", json={"title": "retraining", "label_config": LABEL_CONFIG})
    ml = label_studio.ok("POST", "/api/ml", json={"url": backend.url, "project": project["id"],
                                                  "is_interactive": True, "title": "sam-trimap"})
    imported = label_studio.ok("POST", f"/api/projects/{project['id']}/import?return_task_ids=true",
                               files=[(f"file{i}", (f"pet-{i}.png", png(i))) for i in range(5)])
    tasks = sorted(imported["task_ids"])
    assert len(tasks) == 5, imported
    before = backend.post("/versions", json={}).json()["versions"]
    assert before == []

    def annotate(i: int, **extra) -> None:
        label_studio.ok("POST", f"/api/tasks/{tasks[i]}/annotations",
                        json={"result": [brush(i)], "lead_time": 1.0, **extra})

    annotate(0)
    annotate(1)
    annotate(2, was_cancelled=True)  # skipped: counts neither as a trigger nor as training data
    assert not status(backend, project["id"])["is_training"]
    assert status(backend, project["id"])["accepted_changes"] == 2
    annotate(3, ground_truth=True)  # the third accepted annotation: training starts

    state = wait_for(lambda: (s := status(backend, project["id"]))["last"] and s, 300, "the training job",
                     setup["worker_log"])
    last = state["last"]
    assert last["status"] == "succeeded", last
    assert last["export"]["written"] == 3 and last["export"]["not_accepted"] == 1
    assert last["promoted"] and last["parent"] is None

    versions = backend.post("/versions", json={}).json()["versions"]
    assert [v["id"] for v in versions] == [last["version"]]
    assert versions[0]["current"] and versions[0]["val_foreground_iou"] == pytest.approx(last["val_foreground_iou"])

    label_studio.ok("POST", f"/api/dm/actions?id=retrieve_tasks_predictions&project={project['id']}",
                    json={"selectedItems": {"all": False, "included": tasks}})
    for task_id in tasks:
        predictions = label_studio.ok("GET", f"/api/predictions?task={task_id}")
        assert [p["model_version"] for p in predictions] == [f"trimap-{last['version']}"], predictions

    # "Start Training" twice while the first of them runs: one run now, one coalesced follow-up.
    label_studio.ok("POST", f"/api/ml/{ml['id']}/train", json={})
    label_studio.ok("POST", f"/api/ml/{ml['id']}/train", json={})
    running = status(backend, project["id"])
    assert running["is_training"] and running["follow_up_queued"] and running["reason"] == "START_TRAINING"
    state = wait_for(lambda: (s := status(backend, project["id"]))["trainings"] == 3 and not s["is_training"] and s,
                     300, "the two further jobs", setup["worker_log"])
    first, second, third = state["history"]
    assert [second["reason"], third["status"]] == ["START_TRAINING", "succeeded"] and "follow-up" in third["reason"]
    assert second["parent"] == first["version"]  # fine-tuned from the current version
    listed = {v["id"]: v for v in backend.post("/versions", json={}).json()["versions"]}
    assert set(listed) == {first["version"], second["version"], third["version"]}
    current = [v for v in listed.values() if v["current"]]
    assert len(current) == 1
