"""SAM 3 project pre-annotation against a real Label Studio 1.23.2: a project job writes one prediction per
task through ``POST /api/predictions``; killed half-way, a restarted backend resumes and writes only the rest.

The backend serves a tiny random SAM 3 (transformers' classes, saved as a Hugging Face checkpoint and loaded
through our loader); the test computes, in its own process with the same checkpoint and settings, what
every task's prediction must hold (labels, scores, masks) and compares it with what Label Studio stored.
"""

from __future__ import annotations

import io
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sam3_fixture import checkpoint  # noqa: F401  (fixture)

from e2e.servers import Backend, LabelStudio
from ml_backend.brush import decode_rle
from ml_backend.labeling import parse_label_config
from ml_backend.sam3.preannotate import ConceptPreannotator
from ml_backend.settings import Settings
from processes import wait_for


CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="mask" toName="image">
    <Label value="Cat" hint="tabby cat"/><Label value="Dog"/><Label value="Background"/>
  </BrushLabels>
</View>"""
SAM3_ENV = {"PREANNOTATE": "sam3", "SAM3_SCORE_THRESHOLD": "0.2", "SAM3_DEDUP_IOU": "0.5",
            "SAM3_ON_IMPORT": "false"}


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    height, width = int(rng.integers(40, 90)), int(rng.integers(40, 90))  # not square, different sizes
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _project(label_studio: LabelStudio, title: str, count: int) -> tuple[int, dict[int, bytes]]:
    project = label_studio.ok("POST", "/api/projects", json={"title": title, "label_config": CONFIG})["id"]
    images = {f"img{i}.png": _png(i) for i in range(count)}
    label_studio.ok("POST", f"/api/projects/{project}/import?return_task_ids=true",
                    files={name: (name, data) for name, data in images.items()})
    tasks = label_studio.ok("GET", f"/api/tasks?project={project}&page_size=100")["tasks"]
    by_task = {t["id"]: next(data for name, data in images.items() if t["data"]["image"].endswith("-" + name))
               for t in tasks}
    assert len(by_task) == count
    return project, by_task


def _predictions(label_studio: LabelStudio, task_ids) -> dict[int, list[dict]]:
    return {task: label_studio.ok("GET", f"/api/predictions?task={task}") for task in task_ids}


def _job(backend: Backend, project: int) -> dict:
    return backend.get("/status").json()["preannotation_jobs"]["projects"].get(str(project), {})


def _expected(checkpoint: Path, image_png: bytes) -> list[tuple[str, float, np.ndarray]]:
    from ml_backend.sam3.loading import load_sam3_engine

    global _ENGINE
    if _ENGINE is None:
        _ENGINE = load_sam3_engine(str(checkpoint), device="cpu")
    settings = Settings.from_env({**SAM3_ENV, "SAM3_MODEL": str(checkpoint)})
    image = np.asarray(Image.open(io.BytesIO(image_png)).convert("RGB"))
    prediction = ConceptPreannotator(settings, lambda: _ENGINE).predict(image, CONFIG, parse_label_config(CONFIG),
                                                                        trimap=None)
    return [(r["value"]["brushlabels"][0], r["score"],
             decode_rle(r["value"]["rle"], r["original_height"], r["original_width"]) > 0)
            for r in prediction["result"]]


_ENGINE = None


def test_project_job_writes_predictions_and_resumes_after_a_kill(label_studio, backend_factory, checkpoint,
                                                                 e2e_dir) -> None:
    env = {**SAM3_ENV, "SAM3_MODEL": str(checkpoint), "MODEL_DIR": str(e2e_dir / "models-sam3")}
    backend = backend_factory(**env)
    version = f"sam3-{checkpoint.name}"

    # 1. A whole project: one prediction per task, with the model version, the labels and the masks expected.
    project, images = _project(label_studio, "sam3-job", 4)
    assert backend.post("/preannotate", json={"project": project}).status_code == 202
    wait_for(lambda: _job(backend, project).get("state") == "done", 180, "SAM 3 job", backend.log)
    progress = _job(backend, project)
    assert (progress["total"], progress["written"], progress["skipped"], progress["failed"]) == (4, 4, 0, 0)
    stored = _predictions(label_studio, images)
    regions_seen = 0
    for task, predictions in stored.items():
        assert [p["model_version"] for p in predictions] == [version]
        result = predictions[0]["result"]
        expected = _expected(checkpoint, images[task])
        assert [(r["value"]["brushlabels"][0], pytest.approx(r["score"], abs=1e-4)) for r in result] == \
            [(label, score) for label, score, _ in expected]
        for region, (_, _, mask) in zip(result, expected):
            assert region["type"] == "brushlabels" and region["from_name"] == "mask"
            got = decode_rle(region["value"]["rle"], region["original_height"], region["original_width"]) > 0
            assert got.shape == mask.shape
            assert (got != mask).mean() < 1e-3  # bilinear upsampling may flip a pixel on the threshold
        regions_seen += len(result)
    assert regions_seen > 0  # the threshold lets some instances through: the comparison is not of empty lists

    # 2. Asking again writes nothing: Label Studio already holds this version's predictions.
    assert backend.post("/preannotate", json={"project": project}).status_code == 202
    wait_for(lambda: _job(backend, project).get("state") == "done", 60, "second SAM 3 job", backend.log)
    assert (_job(backend, project)["written"], _job(backend, project)["skipped"]) == (0, 4)

    # 3. Killed half-way (SIGKILL: no clean shutdown), restarted on the same MODEL_DIR: resumes, no duplicates.
    big, big_images = _project(label_studio, "sam3-resume", 24)
    assert backend.post("/preannotate", json={"project": big}).status_code == 202
    wait_for(lambda: _job(backend, big).get("written", 0) >= 2, 120, "first predictions", backend.log,
             interval_s=0.05)
    backend.process.send_signal(signal.SIGKILL)
    backend.process.wait(timeout=30)
    written_before = sum(1 for p in _predictions(label_studio, big_images).values() if p)
    assert 0 < written_before < 24, "the job finished before the kill: the resume was not exercised"
    restarted = backend_factory(**env)
    wait_for(lambda: _job(restarted, big).get("state") == "done", 180, "resumed SAM 3 job", restarted.log)
    progress = _job(restarted, big)
    assert progress["skipped"] >= written_before and progress["written"] + progress["skipped"] == 24
    after = _predictions(label_studio, big_images)
    assert all([p["model_version"] for p in predictions] == [version] for predictions in after.values())


def test_preannotate_rejects_bad_input(backend_factory, checkpoint, e2e_dir) -> None:
    backend = backend_factory(**SAM3_ENV, SAM3_MODEL=str(checkpoint), MODEL_DIR=str(e2e_dir / "models-sam3-bad"))
    for body, message in (({}, "project"), ({"project": "x"}, "project"), ({"project": True}, "project"),
                          ({"project": -1}, "project"), ({"project": 10**30}, "project"),
                          ([1], "must be a JSON object")):
        answer = backend.post("/preannotate", json=body)
        assert answer.status_code == 400 and message in answer.json()["error"]
    status = backend.get("/status").json()
    assert status["preannotate"] == "sam3" and status["sam3"]["state"] in ("loading", "ready")


def test_connecting_an_existing_project_preannotates_the_tasks_lacking_a_prediction(
        label_studio, backend_factory, checkpoint, e2e_dir) -> None:
    """SAM3_ON_CONNECT (default): connecting the backend to a project that already holds tasks (Settings >
    Model in Label Studio, here ``POST /api/ml``) writes a prediction for each task lacking one from the current
    model version, and none for a task that has one; with SAM3_ON_CONNECT=false connecting writes nothing."""
    version = f"sam3-{checkpoint.name}"
    project, images = _project(label_studio, "sam3-connect", 3)
    first = min(images)
    label_studio.ok("POST", "/api/predictions", json={"task": first, "result": [], "score": 0.0,
                                                       "model_version": version})
    backend = backend_factory(**SAM3_ENV, SAM3_MODEL=str(checkpoint), MODEL_DIR=str(e2e_dir / "models-connect"))
    label_studio.ok("POST", "/api/ml", json={"url": backend.url, "project": project, "title": "sam3",
                                             "is_interactive": False})
    wait_for(lambda: _job(backend, project).get("state") == "done", 180, "SAM 3 job on connect", backend.log)
    progress = _job(backend, project)
    assert (progress["total"], progress["written"], progress["skipped"], progress["failed"]) == (3, 2, 1, 0)
    stored = _predictions(label_studio, images)
    assert all([p["model_version"] for p in predictions] == [version] for predictions in stored.values())
    assert stored[first][0]["result"] == []  # the prediction it had was kept, not replaced
    for task in set(images) - {first}:
        expected = _expected(checkpoint, images[task])
        assert [r["value"]["brushlabels"][0] for r in stored[task][0]["result"]] == [label for label, _, _ in expected]

    off_project, off_images = _project(label_studio, "sam3-connect-off", 2)
    off = backend_factory(**SAM3_ENV, SAM3_MODEL=str(checkpoint), MODEL_DIR=str(e2e_dir / "models-connect-off"),
                          SAM3_ON_CONNECT="false")
    label_studio.ok("POST", "/api/ml", json={"url": off.url, "project": off_project, "title": "sam3 off",
                                             "is_interactive": False})
    assert _job(off, off_project) == {}  # no job was queued: its status knows nothing of the project
    assert all(not predictions for predictions in _predictions(label_studio, off_images).values())
