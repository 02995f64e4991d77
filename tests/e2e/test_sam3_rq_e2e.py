"""SAM 3 project pre-annotation on an RQ worker, end to end: a real Label Studio 1.23.2, Redis, the backend
with ``REDIS_URL`` (which only queues the job) and ``python -m ml_backend.sam3.worker --burst`` (which loads the
tiny random SAM 3 and writes the predictions through Label Studio's API with the URL and token the job carries).

What Label Studio stores is compared with what the test computes in its own process from the same checkpoint
and settings (labels, scores, masks), as in test_sam3_e2e.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from processes import stop, wait_for
from redis_fixture import redis_server  # noqa: F401  (fixture)

from e2e.servers import REPO, LabelStudio
from e2e.test_sam3_e2e import (
    CONFIG,
    SAM3_ENV,
    _expected,
    _job,
    _predictions,
    _project,
    checkpoint,  # noqa: F401  (fixture)
)
from ml_backend.brush import decode_rle
from ml_backend.labeling import parse_label_config

pytestmark = pytest.mark.redis


def test_an_rq_worker_pre_annotates_the_project(label_studio: LabelStudio, backend_factory, checkpoint,  # noqa: F811
                                                e2e_dir: Path, redis_server: str) -> None:  # noqa: F811
    model_dir = e2e_dir / "models-sam3-rq"
    env = {**SAM3_ENV, "SAM3_MODEL": str(checkpoint), "MODEL_DIR": str(model_dir), "REDIS_URL": redis_server}
    backend = backend_factory(**env)
    project, images = _project(label_studio, "sam3-rq", 3)

    answer = backend.post("/preannotate", json={"project": project})
    assert answer.status_code == 202 and answer.json()["state"] == "queued"
    assert backend.post("/preannotate", json={"project": project}).json()["job_id"] == answer.json()["job_id"]
    time.sleep(2)  # no worker yet: the web process must not run it itself
    status = backend.get("/status").json()["preannotation_jobs"]
    assert status["executor"] == "rq" and status["queue"] == [project]
    assert _job(backend, project)["state"] == "queued"
    assert all(predictions == [] for predictions in _predictions(label_studio, images).values())

    # The worker knows neither Label Studio's URL nor its token: the job carries them.
    worker_env = {k: v for k, v in os.environ.items() if k not in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY")}
    worker_env.update(env, IMAGE_CACHE_DIR=str(e2e_dir / "sam3-worker-cache"))
    log = e2e_dir / "sam3-worker.log"
    worker = subprocess.Popen([sys.executable, "-m", "ml_backend.sam3.worker", "--burst"], cwd=REPO, env=worker_env,
                              stdout=log.open("wb"), stderr=subprocess.STDOUT)
    try:
        assert worker.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        stop(worker)

    progress = wait_for(lambda: (p := _job(backend, project)).get("state") == "done" and p, 30, "done on /status",
                        log)
    assert (progress["total"], progress["written"], progress["skipped"], progress["failed"]) == (3, 3, 0, 0)
    version = f"sam3-{checkpoint.name}"
    assert progress["model_version"] == version and progress["job_id"] == answer.json()["job_id"]
    labels = set(parse_label_config(CONFIG).mask.labels)
    regions_seen = 0
    for task, predictions in _predictions(label_studio, images).items():
        assert len(predictions) == 1, f"task {task}: {len(predictions)} predictions"
        assert predictions[0]["model_version"] == version
        result = predictions[0]["result"]
        expected = _expected(checkpoint, images[task])
        assert [(r["value"]["brushlabels"][0], pytest.approx(r["score"], abs=1e-4)) for r in result] == \
            [(label, score) for label, score, _ in expected]
        for region, (_, _, mask) in zip(result, expected):
            assert region["type"] == "brushlabels" and region["from_name"] == "mask"
            assert region["value"]["brushlabels"][0] in labels
            got = decode_rle(region["value"]["rle"], region["original_height"], region["original_width"]) > 0
            assert got.any() and got.shape == mask.shape
            assert (got != mask).mean() < 1e-3  # bilinear upsampling may flip a pixel on the threshold
        regions_seen += len(result)
    assert regions_seen > 0  # the threshold lets some instances through: the comparison is not of empty lists
    worker_log = log.read_text()
    assert f"project {project} done: 3 written" in worker_log
    assert worker_log.count("SAM 3 ready") == 1  # loaded once, before the first job, not again by the job
